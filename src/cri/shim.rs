//! `runv cri` as a shim v2 client: starts `containerd-shim-runv-v2` the way
//! containerd does (the `start` action in the bundle directory, the events
//! address in `TTRPC_ADDRESS`), talks to it over the task API, and serves
//! the events API shims publish to.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::{create_events, Events, TaskClient};
use containerd_shim_protos::ttrpc;
use containerd_shim_protos::ttrpc::r#async::{Server, TtrpcContext};
use tokio::sync::broadcast;

/// The containerd namespace `runv cri`'s shims run in (their state lives
/// apart from containerd's `k8s.io`).
pub const NAMESPACE: &str = "runv-cri";

/// How long one task API call may take before it is abandoned (a VM boot
/// under TCG included).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("starting the shim {shim}: {message}")]
    Start { shim: String, message: String },
    #[error("connecting to the shim at {address}: {message}")]
    Connect { address: String, message: String },
    #[error("{call}: {message}")]
    Call { call: &'static str, code: tonic::Code, message: String },
}

impl ShimError {
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::Start { .. } | Self::Connect { .. } => tonic::Code::Unavailable,
            Self::Call { code, .. } => *code,
        }
    }
}

impl From<ShimError> for tonic::Status {
    fn from(e: ShimError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

/// How shims are started for `runv cri`.
#[derive(Clone)]
pub struct ShimLauncher {
    pub binary: PathBuf,
    /// `-address`: the CRI socket (the shim hashes it into its socket path).
    pub address: String,
    /// The events API the shims publish to.
    pub events_address: String,
    /// The runv config the shim reads (`RUNV_CONFIG`), when not the default.
    pub config_path: Option<PathBuf>,
}

impl ShimLauncher {
    /// Runs `shim start` in `bundle` for task `id`; returns the task API
    /// address the shim serves.
    pub async fn start(&self, bundle: &Path, id: &str) -> Result<String, ShimError> {
        let shim = self.binary.display().to_string();
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.args(["-namespace", NAMESPACE, "-id", id, "-address", &self.address, "-publish-binary"])
            .arg(std::env::current_exe().unwrap_or_else(|_| PathBuf::from("runv")))
            .arg("start")
            .current_dir(bundle)
            .env("TTRPC_ADDRESS", &self.events_address)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        if let Some(config) = &self.config_path {
            cmd.env("RUNV_CONFIG", config);
        }
        let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
            .await
            .map_err(|_| ShimError::Start { shim: shim.clone(), message: "no answer within 30 s".into() })?
            .map_err(|e| ShimError::Start { shim: shim.clone(), message: e.to_string() })?;
        let address = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || !address.starts_with("unix://") {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(ShimError::Start { shim, message: format!("{} {stderr}", out.status) });
        }
        Ok(address)
    }

    /// Runs `shim delete` for `id`: the cleanup of a shim that is gone.
    pub async fn delete(&self, bundle: &Path, id: &str) {
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.args(["-namespace", NAMESPACE, "-id", id, "-address", &self.address, "-bundle"])
            .arg(bundle)
            .arg("delete")
            .current_dir(if bundle.is_dir() { bundle } else { Path::new("/") })
            .env("TTRPC_ADDRESS", &self.events_address)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(config) = &self.config_path {
            cmd.env("RUNV_CONFIG", config);
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), cmd.status()).await;
    }
}

/// A task API connection to one shim.
#[derive(Clone)]
pub struct Shim {
    client: TaskClient,
}

fn call_error(call: &'static str, e: ttrpc::Error) -> ShimError {
    let (code, message) = match e {
        ttrpc::Error::RpcStatus(s) => {
            let code = match s.code() {
                ttrpc::Code::NOT_FOUND => tonic::Code::NotFound,
                ttrpc::Code::ALREADY_EXISTS => tonic::Code::AlreadyExists,
                ttrpc::Code::INVALID_ARGUMENT => tonic::Code::InvalidArgument,
                ttrpc::Code::FAILED_PRECONDITION => tonic::Code::FailedPrecondition,
                ttrpc::Code::UNIMPLEMENTED => tonic::Code::Unimplemented,
                ttrpc::Code::DEADLINE_EXCEEDED => tonic::Code::DeadlineExceeded,
                ttrpc::Code::UNAVAILABLE => tonic::Code::Unavailable,
                _ => tonic::Code::Internal,
            };
            (code, s.message().to_string())
        }
        other => (tonic::Code::Unavailable, other.to_string()),
    };
    super::metrics::call_failed(call, code);
    ShimError::Call { call, code, message }
}

fn ctx(timeout: Option<Duration>) -> ttrpc::context::Context {
    let mut ctx = ttrpc::context::Context::default();
    if let Some(t) = timeout {
        ctx.timeout_nano = t.as_nanos() as i64;
    }
    ctx
}

impl Shim {
    pub async fn connect(address: &str) -> Result<Self, ShimError> {
        let client = ttrpc::r#async::Client::connect(address)
            .await
            .map_err(|e| ShimError::Connect { address: address.into(), message: e.to_string() })?;
        Ok(Self { client: TaskClient::new(client) })
    }

    pub async fn create(&self, req: api::CreateTaskRequest) -> Result<u32, ShimError> {
        let _timer = super::metrics::time_call("create");
        let r = self.client.create(ctx(Some(CALL_TIMEOUT)), &req).await.map_err(|e| call_error("create", e))?;
        Ok(r.pid)
    }

    pub async fn start(&self, id: &str, exec_id: &str) -> Result<u32, ShimError> {
        let _timer = super::metrics::time_call("start");
        let req = api::StartRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() };
        let r = self.client.start(ctx(Some(CALL_TIMEOUT)), &req).await.map_err(|e| call_error("start", e))?;
        Ok(r.pid)
    }

    /// Waits for the process to exit: (exit status, exited at in ns).
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<(u32, i64), ShimError> {
        let req = api::WaitRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() };
        let r = self.client.wait(ctx(None), &req).await.map_err(|e| call_error("wait", e))?;
        let at = r.exited_at.as_ref().map(|t| t.seconds * 1_000_000_000 + t.nanos as i64).unwrap_or_default();
        Ok((r.exit_status, at))
    }

    pub async fn state(&self, id: &str) -> Result<api::StateResponse, ShimError> {
        let _timer = super::metrics::time_call("state");
        let req = api::StateRequest { id: id.into(), ..Default::default() };
        self.client.state(ctx(Some(CALL_TIMEOUT)), &req).await.map_err(|e| call_error("state", e))
    }

    pub async fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<(), ShimError> {
        let _timer = super::metrics::time_call("kill");
        let req = api::KillRequest { id: id.into(), exec_id: exec_id.into(), signal, all, ..Default::default() };
        self.client.kill(ctx(Some(CALL_TIMEOUT)), &req).await.map_err(|e| call_error("kill", e))?;
        Ok(())
    }

    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<(), ShimError> {
        let _timer = super::metrics::time_call("delete");
        let req = api::DeleteRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() };
        self.client.delete(ctx(Some(CALL_TIMEOUT)), &req).await.map_err(|e| call_error("delete", e))?;
        Ok(())
    }

    pub async fn exec(&self, req: api::ExecProcessRequest) -> Result<(), ShimError> {
        let _timer = super::metrics::time_call("exec");
        self.client.exec(ctx(Some(CALL_TIMEOUT)), &req).await.map_err(|e| call_error("exec", e))?;
        Ok(())
    }

    pub async fn resize(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<(), ShimError> {
        let _timer = super::metrics::time_call("resize");
        let req = api::ResizePtyRequest { id: id.into(), exec_id: exec_id.into(), width, height, ..Default::default() };
        self.client.resize_pty(ctx(Some(CALL_TIMEOUT)), &req).await.map_err(|e| call_error("resize", e))?;
        Ok(())
    }

    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), ShimError> {
        let req = api::CloseIORequest { id: id.into(), exec_id: exec_id.into(), stdin: true, ..Default::default() };
        self.client.close_io(ctx(Some(CALL_TIMEOUT)), &req).await.map_err(|e| call_error("close_io", e))?;
        Ok(())
    }

    pub async fn update(&self, id: &str, resources_json: Vec<u8>) -> Result<(), ShimError> {
        let any = containerd_shim_protos::protobuf::well_known_types::any::Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
            value: resources_json,
            ..Default::default()
        };
        let req = api::UpdateTaskRequest { id: id.into(), resources: Some(any).into(), ..Default::default() };
        self.client.update(ctx(Some(CALL_TIMEOUT)), &req).await.map_err(|e| call_error("update", e))?;
        Ok(())
    }

    /// The container's cgroup metrics (cgroups v1 `Metrics`, as the shim
    /// reports them).
    pub async fn stats(&self, id: &str) -> Result<containerd_shim_protos::cgroups::metrics::Metrics, ShimError> {
        use containerd_shim_protos::protobuf::Message;
        let req = api::StatsRequest { id: id.into(), ..Default::default() };
        let r = self.client.stats(ctx(Some(CALL_TIMEOUT)), &req).await.map_err(|e| call_error("stats", e))?;
        let any = r.stats.into_option().unwrap_or_default();
        containerd_shim_protos::cgroups::metrics::Metrics::parse_from_bytes(&any.value).map_err(|e| ShimError::Call {
            call: "stats",
            code: tonic::Code::Internal,
            message: format!("malformed metrics: {e}"),
        })
    }

    pub async fn shutdown(&self, id: &str) -> Result<(), ShimError> {
        let req = api::ShutdownRequest { id: id.into(), now: true, ..Default::default() };
        match self.client.shutdown(ctx(Some(CALL_TIMEOUT)), &req).await {
            Ok(_) => Ok(()),
            // The shim exits while answering: the connection just closes.
            Err(ttrpc::Error::RemoteClosed) | Err(ttrpc::Error::LocalClosed) => Ok(()),
            Err(e) => Err(call_error("shutdown", e)),
        }
    }
}

/// One event a shim published: its topic and the event's type.
#[derive(Clone, Debug)]
pub struct ShimEvent {
    pub topic: String,
    pub type_url: String,
    pub value: Vec<u8>,
}

struct EventSink {
    tx: broadcast::Sender<ShimEvent>,
}

#[async_trait::async_trait]
impl Events for EventSink {
    async fn forward(&self, _ctx: &TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
        if let Some(envelope) = req.envelope.as_ref() {
            let event = envelope.event.as_ref();
            let _ = self.tx.send(ShimEvent {
                topic: envelope.topic.clone(),
                type_url: event.map(|a| a.type_url.clone()).unwrap_or_default(),
                value: event.map(|a| a.value.clone()).unwrap_or_default(),
            });
        }
        Ok(Empty::new())
    }
}

/// Serves the events API (`containerd.services.events.ttrpc.v1.Events`)
/// on `socket`; what shims forward is broadcast on the returned channel.
pub async fn serve_events(socket: &Path) -> anyhow::Result<(Server, broadcast::Sender<ShimEvent>)> {
    use anyhow::Context;
    let _ = std::fs::remove_file(socket);
    let (tx, _) = broadcast::channel(256);
    let services = create_events(Arc::new(EventSink { tx: tx.clone() }));
    let mut server = Server::new()
        .bind(&format!("unix://{}", socket.display()))
        .with_context(|| format!("binding {}", socket.display()))?
        .register_service(services);
    server.start().await.context("starting the events service")?;
    Ok((server, tx))
}
