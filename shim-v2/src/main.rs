//! containerd-shim-runv-v2: runv as a containerd runtime
//! (`runtime_type = "io.containerd.runv.v2"`). One shim and one microVM per
//! pod: containers of a CRI pod (`io.kubernetes.cri.sandbox-id`) are routed
//! to their sandbox's shim; a plain `ctr run` container gets a VM of its own.

mod localhost;
mod oom;
mod rootfs;
mod task;

use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use anyhow::Context;

use async_trait::async_trait;
use containerd_shim::asynchronous::{run, spawn, ExitSignal, Shim};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Error, Flags, StartOpts};
use containerd_shim_protos::api::DeleteResponse;

/// The runtime id containerd knows this shim by.
pub const RUNTIME_ID: &str = "io.containerd.runv.v2";

/// CRI annotations that group a pod's containers into one sandbox.
pub const ANNOTATION_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const ANNOTATION_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// The pod's name and namespace on its sandbox container (for metrics).
pub const ANNOTATION_SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
pub const ANNOTATION_SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";

struct RunvShim {
    id: String,
    namespace: String,
    address: String,
    exit: Arc<ExitSignal>,
}

#[async_trait]
impl Shim for RunvShim {
    type T = task::TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Self {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            address: args.address.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    /// `start`: runs in the bundle directory; a pod's later containers
    /// share the shim (and VM) of their sandbox.
    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        spawn_daemon(opts, None).await
    }

    /// `delete`: containerd's cleanup after the shim died; removes what the
    /// dead shim left (VM processes, mounts, files) for this id.
    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        // containerd passes no runtime options to `delete`: the ConfigPath
        // `start` was given is in the bundle (this process's directory).
        if std::env::var_os("RUNV_CONFIG").is_none() {
            if let Some(path) = recorded_config_path(std::path::Path::new(".")) {
                // SAFETY: set before any other thread of this process reads the environment.
                unsafe { std::env::set_var("RUNV_CONFIG", path) };
            }
        }
        let config = task::load_config().map_err(|e| Error::Other(e.to_string()))?;
        task::cleanup_leftovers(&config, &self.namespace, &self.id);
        // A shim killed outright leaves its socket behind.
        let socket = containerd_shim::socket_address(&self.address, &self.namespace, &self.id);
        let _ = std::fs::remove_file(socket.trim_start_matches("unix://"));
        Ok(DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: Some(containerd_shim::util::timestamp()?).into(),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        task::TaskService::new(self.namespace.clone(), self.id.clone(), publisher, self.exit.clone())
    }
}

/// The `start` action, answered with a plain socket address: the form
/// containerd 1.6 reads (later versions accept it too), where the shim
/// crate replies with JSON that containerd 1.6 cannot parse.
async fn start_action(flags: Flags) -> Result<(), Error> {
    let opts = StartOpts {
        id: flags.id.clone(),
        publish_binary: flags.publish_binary.clone(),
        address: flags.address.clone(),
        ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
        namespace: flags.namespace.clone(),
        debug: flags.debug,
        ..Default::default()
    };
    // containerd's CRI plugin passes the runtime options on stdin; their
    // ConfigPath names the runv config the shim daemon reads.
    let mut options = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut options).await;
    let config_path = config_path_from_options(&options);
    if let Some(path) = &config_path {
        record_config_path(std::path::Path::new("."), path)
            .map_err(|e| Error::Other(format!("recording the config path in the bundle: {e}")))?;
    }
    let address = spawn_daemon(opts, config_path).await?;
    // The bundle's `address` file is how a restarted containerd finds the
    // shim again (it reads it to reconnect); without it, containerd takes
    // the live shim for dead and cleans up under the running pod.
    std::fs::write("address", &address).map_err(|e| Error::Other(format!("writing the bundle's address file: {e}")))?;
    use tokio::io::AsyncWriteExt;
    let mut stdout = tokio::io::stdout();
    stdout.write_all(address.as_bytes()).await.map_err(|e| Error::Other(format!("writing the address: {e}")))?;
    stdout.flush().await.map_err(|e| Error::Other(format!("writing the address: {e}")))?;
    Ok(())
}

/// Starts the daemon for the bundle in the current directory (or finds the
/// one serving its pod) and returns its address.
async fn spawn_daemon(opts: StartOpts, config_path: Option<String>) -> Result<String, Error> {
    let grouping = rootfs::sandbox_grouping(std::path::Path::new("config.json")).unwrap_or_else(|| opts.id.clone());
    let vars: Vec<(&str, &str)> = config_path.iter().map(|p| ("RUNV_CONFIG", p.as_str())).collect();
    spawn(opts, &grouping, vars).await
}

/// The file in a bundle that keeps the runtime options' ConfigPath for the
/// shim's `delete`, which containerd runs in the bundle without options.
const CONFIG_PATH_FILE: &str = "runv-config-path";

fn record_config_path(bundle: &std::path::Path, path: &str) -> std::io::Result<()> {
    std::fs::write(bundle.join(CONFIG_PATH_FILE), path)
}

fn recorded_config_path(bundle: &std::path::Path) -> Option<String> {
    let path = std::fs::read_to_string(bundle.join(CONFIG_PATH_FILE)).ok()?;
    Some(path.trim().to_string()).filter(|p| !p.is_empty())
}

/// `config_path` (field 2) of containerd's `runtimeoptions.v1.Options`.
fn config_path_from_options(bytes: &[u8]) -> Option<String> {
    let mut input = protobuf::CodedInputStream::from_bytes(bytes);
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        let (field, wire_type) = (tag >> 3, tag & 7);
        match (field, wire_type) {
            (2, 2) => return input.read_string().ok().filter(|p| !p.is_empty()),
            (_, 2) => {
                input.read_bytes().ok()?;
            }
            (_, 0) => {
                input.read_raw_varint64().ok()?;
            }
            _ => return None,
        }
    }
    None
}

/// The shim daemon: serves the task API on the socket containerd gave
/// `start`, under both service names containerd speaks: `containerd.task.v2.Task`
/// (containerd 1.x) and `containerd.task.v3.Task` (2.x), the same messages.
async fn serve(flags: Flags) -> anyhow::Result<()> {
    use containerd_shim_protos::shim_async::create_task;
    use containerd_shim_protos::ttrpc::r#async::Server;

    // containerd 1.6 reads the shim's log from the `log` FIFO in the bundle.
    if let Ok(log) = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open("log") {
        // SAFETY: pointing stderr at the log FIFO we just opened.
        unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&log), 2) };
    }
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").context("TTRPC_ADDRESS is not set")?;
    let publisher = RemotePublisher::new(&ttrpc_address).await.context("connecting to containerd's event service")?;
    let exit = Arc::new(ExitSignal::default());
    let service = task::TaskService::new(flags.namespace.clone(), flags.id.clone(), publisher, exit.clone());
    let mut services = create_task(Arc::new(service.clone()));
    for (name, svc) in create_task(Arc::new(service)) {
        services.insert(name.replace(".v3.", ".v2."), svc);
    }
    let socket = flags.socket.strip_prefix("unix://").unwrap_or(&flags.socket).to_string();
    if let Some(dir) = std::path::Path::new(&socket).parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A pod's shim already serves this socket: it takes the container.
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        // SAFETY: replacing stdout with stderr, which ends `start`'s wait.
        unsafe { libc::dup2(2, 1) };
        return Ok(());
    }
    let _ = std::fs::remove_file(&socket);
    let mut server = Server::new()
        .bind(&format!("unix://{socket}"))
        .with_context(|| format!("binding {socket}"))?
        .register_service(services);
    server.start().await.context("starting the task service")?;
    // `start` waits for our stdout to close: the service is up.
    // SAFETY: replacing stdout with stderr.
    unsafe { libc::dup2(2, 1) };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        () = exit.wait() => {}
        _ = term.recv() => {}
    }
    let _ = server.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Ok(flags) = containerd_shim::parse(&args[1..]) {
        match flags.action.as_str() {
            "start" => {
                if let Err(e) = start_action(flags).await {
                    eprintln!("{RUNTIME_ID}: {e}");
                    std::process::exit(1);
                }
                return;
            }
            "" if !flags.version && !flags.info => {
                if let Err(e) = serve(flags).await {
                    eprintln!("{RUNTIME_ID}: {e:#}");
                    std::process::exit(1);
                }
                return;
            }
            _ => {}
        }
    }
    run::<RunvShim>(RUNTIME_ID, None).await;
}

#[cfg(test)]
mod tests {
    use super::{config_path_from_options, record_config_path, recorded_config_path};

    fn options(type_url: &str, config_path: &str) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut out = protobuf::CodedOutputStream::vec(&mut bytes);
        out.write_string(1, type_url).unwrap();
        out.write_string(2, config_path).unwrap();
        out.flush().unwrap();
        drop(out);
        bytes
    }

    #[test]
    fn delete_finds_the_config_path_start_was_given() {
        let bundle = tempfile::tempdir().unwrap();
        assert_eq!(recorded_config_path(bundle.path()), None);
        record_config_path(bundle.path(), "/etc/runv/pod.toml").unwrap();
        assert_eq!(recorded_config_path(bundle.path()).as_deref(), Some("/etc/runv/pod.toml"));
    }

    #[test]
    fn the_config_path_comes_from_the_runtime_options() {
        assert_eq!(
            config_path_from_options(&options("runv", "/etc/runv/pod.toml")).as_deref(),
            Some("/etc/runv/pod.toml")
        );
        assert_eq!(config_path_from_options(&options("runv", "")), None);
        assert_eq!(config_path_from_options(b""), None);
        assert_eq!(config_path_from_options(&[0xff, 0xff, 0xff]), None);
    }
}
