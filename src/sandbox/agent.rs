//! The host's client of the guest agent: hybrid vsock (the host writes
//! `CONNECT <port>\n` on the VM's vsock Unix socket and reads `OK <n>\n`)
//! carrying ttrpc.

use std::path::Path;
use std::time::Duration;

use runv_proto::agent::*;

use crate::figures::{CallRecorder, Outcome};
use runv_proto::agent_ttrpc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use ttrpc::context::{self, Context};

/// How long one handshake or short call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("connecting to the agent on {path}: {message}")]
    Connect { path: String, message: String },
    /// The agent answered with an error status.
    #[error("{message}")]
    Status { code: ttrpc::Code, message: String },
    #[error("agent call {call} failed: {message}")]
    Transport { call: &'static str, message: String },
    /// The call's deadline passed with no answer.
    #[error("the guest agent did not answer {call} before its deadline (the guest is hung, overloaded or stopped)")]
    Timeout { call: &'static str },
}

impl AgentError {
    fn from_rpc(call: &'static str, e: ttrpc::Error) -> Self {
        match e {
            ttrpc::Error::RpcStatus(s) => AgentError::Status { code: s.code(), message: guest_text(s.message()) },
            // ttrpc's words for a call whose deadline passed.
            ttrpc::Error::Others(m) if m == "Request deadline elapsed" => AgentError::Timeout { call },
            other => AgentError::Transport { call, message: other.to_string() },
        }
    }

    pub fn code(&self) -> Option<ttrpc::Code> {
        match self {
            AgentError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// The most of a guest-written error message that reaches the host's
/// errors, logs and CRI statuses.
pub const GUEST_MESSAGE_MAX: usize = 4096;

/// A message the guest wrote, as the host passes it on: at most
/// `GUEST_MESSAGE_MAX` bytes (cut at a character boundary, the cut said),
/// control characters other than newline and tab shown escaped, so that a
/// hostile agent can neither grow every record that quotes it nor forge
/// lines in a log.
pub fn guest_text(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(GUEST_MESSAGE_MAX) + 32);
    for (i, c) in message.char_indices() {
        if out.len() >= GUEST_MESSAGE_MAX {
            out.push_str(&format!("… ({} more bytes from the guest cut)", message.len() - i));
            break;
        }
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Why a line could not be read.
#[derive(Debug)]
pub enum LineError {
    /// The peer closed before the newline.
    Closed,
    /// More bytes than allowed before the newline.
    TooLong,
    Io(std::io::Error),
}

/// Reads one line, without its newline and of at most `max` bytes, a byte
/// at a time: whatever follows the newline already belongs to the stream.
pub async fn read_line(stream: &mut UnixStream, max: usize) -> Result<Vec<u8>, LineError> {
    let mut line = Vec::with_capacity(max.min(64));
    loop {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte).await {
            Ok(0) => return Err(LineError::Closed),
            Ok(_) if byte[0] == b'\n' => return Ok(line),
            Ok(_) if line.len() < max => line.push(byte[0]),
            Ok(_) => return Err(LineError::TooLong),
            Err(e) => return Err(LineError::Io(e)),
        }
    }
}

/// Opens a stream to `port` in the guest through the hybrid vsock socket.
pub async fn connect_hybrid_vsock(uds: &Path, port: u32) -> Result<UnixStream, AgentError> {
    let err = |message: String| AgentError::Connect { path: uds.display().to_string(), message };
    let handshake = async {
        // The socket may sit in a jail directory its VMM's uid owns.
        let stream = crate::jailer::connect_nofollow(uds)
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .and_then(UnixStream::from_std);
        let mut stream = stream.map_err(|e| err(e.to_string()))?;
        stream.write_all(format!("CONNECT {port}\n").as_bytes()).await.map_err(|e| err(e.to_string()))?;
        let line = read_line(&mut stream, 64).await.map_err(|e| match e {
            LineError::Closed => err("closed during the handshake (nothing listens on the port yet)".into()),
            LineError::TooLong => err("handshake reply too long".into()),
            LineError::Io(e) => err(e.to_string()),
        })?;
        let reply = String::from_utf8_lossy(&line);
        if !reply.starts_with("OK ") {
            return Err(err(format!("unexpected handshake reply '{reply}'")));
        }
        Ok(stream)
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await.map_err(|_| err("no handshake reply".into()))?
}

#[derive(Clone)]
pub struct AgentClient {
    inner: agent_ttrpc::AgentClient,
    /// Every call with a deadline, timed (`crate::figures`).
    calls: CallRecorder,
}

fn short() -> Context {
    context::with_timeout(CALL_TIMEOUT.as_nanos() as i64)
}

/// For calls that start processes in the guest (slow under emulation).
fn long() -> Context {
    context::with_timeout(Duration::from_secs(60).as_nanos() as i64)
}

/// For calls that block until something happens in the guest.
fn unbounded() -> Context {
    context::Context::default()
}

impl AgentClient {
    pub fn new(stream: UnixStream) -> Self {
        let client = ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::from(stream));
        Self { inner: agent_ttrpc::AgentClient::new(client), calls: CallRecorder::default() }
    }

    /// The figures of this client's calls so far.
    pub fn calls(&self) -> &CallRecorder {
        &self.calls
    }

    /// Awaits a call with a deadline, recording its time and outcome.
    async fn timed<T>(
        &self,
        call: &'static str,
        rpc: impl std::future::Future<Output = Result<T, ttrpc::Error>>,
    ) -> Result<T, AgentError> {
        let began = std::time::Instant::now();
        let result = rpc.await.map_err(|e| AgentError::from_rpc(call, e));
        let outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err(AgentError::Timeout { .. }) => Outcome::TimedOut,
            Err(_) => Outcome::Failed,
        };
        self.calls.record(call, began.elapsed(), outcome);
        result
    }

    pub async fn health(&self, timeout: Duration) -> Result<HealthResponse, AgentError> {
        let ctx = context::with_timeout(timeout.as_nanos() as i64);
        self.timed("health", self.inner.health(ctx, &HealthRequest::new())).await
    }

    pub async fn guest_details(&self) -> Result<GuestDetailsResponse, AgentError> {
        self.timed("guest_details", self.inner.guest_details(short(), &GuestDetailsRequest::new())).await
    }

    pub async fn mount_shared(&self, tag: &str, mount_point: &str, read_only: bool) -> Result<(), AgentError> {
        let req =
            MountSharedRequest { tag: tag.into(), mount_point: mount_point.into(), read_only, ..Default::default() };
        self.timed("mount_shared", self.inner.mount_shared(short(), &req)).await?;
        Ok(())
    }

    pub async fn write_stdin(&self, container_id: &str, exec_id: &str, data: Vec<u8>) -> Result<(), AgentError> {
        let req = WriteStdinRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            data,
            ..Default::default()
        };
        self.inner.write_stdin(unbounded(), &req).await.map_err(|e| AgentError::from_rpc("write_stdin", e))?;
        Ok(())
    }

    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError> {
        let req =
            CloseStdinRequest { container_id: container_id.into(), exec_id: exec_id.into(), ..Default::default() };
        self.timed("close_stdin", self.inner.close_stdin(short(), &req)).await?;
        Ok(())
    }

    /// Next chunk of stdout (or stderr); `None` at end of stream.
    pub async fn read_output(
        &self,
        container_id: &str,
        exec_id: &str,
        stderr: bool,
    ) -> Result<Option<Vec<u8>>, AgentError> {
        let req = ReadStreamRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            len: runv_proto::guest::MAX_READ_CHUNK,
            ..Default::default()
        };
        let resp = if stderr {
            self.inner.read_stderr(unbounded(), &req).await.map_err(|e| AgentError::from_rpc("read_stderr", e))?
        } else {
            self.inner.read_stdout(unbounded(), &req).await.map_err(|e| AgentError::from_rpc("read_stdout", e))?
        };
        Ok(if resp.eof { None } else { Some(resp.data) })
    }

    pub async fn signal_process(&self, container_id: &str, exec_id: &str, signal: i32) -> Result<(), AgentError> {
        self.signal(container_id, exec_id, signal, false).await
    }

    /// Signals the process, or with `all` every process of the container.
    pub async fn signal(&self, container_id: &str, exec_id: &str, signal: i32, all: bool) -> Result<(), AgentError> {
        let req = SignalProcessRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            signal: signal as u32,
            all,
            ..Default::default()
        };
        self.timed("signal_process", self.inner.signal_process(short(), &req)).await?;
        Ok(())
    }

    pub async fn wait_process(&self, container_id: &str, exec_id: &str) -> Result<WaitProcessResponse, AgentError> {
        let req =
            WaitProcessRequest { container_id: container_id.into(), exec_id: exec_id.into(), ..Default::default() };
        self.inner.wait_process(unbounded(), &req).await.map_err(|e| AgentError::from_rpc("wait_process", e))
    }

    pub async fn resize(&self, container_id: &str, exec_id: &str, rows: u16, cols: u16) -> Result<(), AgentError> {
        let req = TtyWinResizeRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            rows: rows.into(),
            cols: cols.into(),
            ..Default::default()
        };
        self.timed("tty_win_resize", self.inner.tty_win_resize(short(), &req)).await?;
        Ok(())
    }

    pub async fn create_sandbox(&self, req: &CreateSandboxRequest) -> Result<(), AgentError> {
        self.timed("create_sandbox", self.inner.create_sandbox(short(), req)).await?;
        Ok(())
    }

    /// Configures the guest's NICs, routes and neighbours like the pod's.
    pub async fn setup_network(&self, req: &SetupNetworkRequest) -> Result<(), AgentError> {
        self.timed("setup_network", self.inner.setup_network(short(), req)).await?;
        Ok(())
    }

    /// Creates a container from an OCI spec; returns its init's guest pid.
    pub async fn create_container(
        &self,
        container_id: &str,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<u32, AgentError> {
        let oci_spec = serde_json::to_vec(spec).map_err(|e| AgentError::Transport {
            call: "create_container",
            message: format!("encoding the spec: {e}"),
        })?;
        let req = CreateContainerRequest { container_id: container_id.into(), oci_spec, ..Default::default() };
        let resp = self.timed("create_container", self.inner.create_container(long(), &req)).await?;
        Ok(resp.pid)
    }

    pub async fn start_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = ContainerRequest { container_id: container_id.into(), ..Default::default() };
        self.timed("start_container", self.inner.start_container(long(), &req)).await?;
        Ok(())
    }

    pub async fn remove_container(&self, container_id: &str, force: bool) -> Result<(), AgentError> {
        let req = RemoveContainerRequest { container_id: container_id.into(), force, ..Default::default() };
        self.timed("remove_container", self.inner.remove_container(long(), &req)).await?;
        Ok(())
    }

    /// Starts an extra process (an OCI Process) in a running container.
    pub async fn exec_process(
        &self,
        container_id: &str,
        exec_id: &str,
        process: &oci_spec::runtime::Process,
    ) -> Result<u32, AgentError> {
        let process = serde_json::to_vec(process).map_err(|e| AgentError::Transport {
            call: "exec_process",
            message: format!("encoding the process: {e}"),
        })?;
        let req = ExecProcessRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            process,
            ..Default::default()
        };
        let resp = self.timed("exec_process", self.inner.exec_process(long(), &req)).await?;
        Ok(resp.pid)
    }

    pub async fn pause_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = ContainerRequest { container_id: container_id.into(), ..Default::default() };
        self.timed("pause_container", self.inner.pause_container(long(), &req)).await?;
        Ok(())
    }

    pub async fn resume_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = ContainerRequest { container_id: container_id.into(), ..Default::default() };
        self.timed("resume_container", self.inner.resume_container(long(), &req)).await?;
        Ok(())
    }

    /// New resources, as the JSON of an OCI LinuxResources.
    pub async fn update_container(&self, container_id: &str, resources_json: Vec<u8>) -> Result<(), AgentError> {
        let req = UpdateContainerRequest {
            container_id: container_id.into(),
            resources: resources_json,
            ..Default::default()
        };
        self.timed("update_container", self.inner.update_container(long(), &req)).await?;
        Ok(())
    }

    pub async fn stats_container(&self, container_id: &str) -> Result<StatsContainerResponse, AgentError> {
        let req = ContainerRequest { container_id: container_id.into(), ..Default::default() };
        self.timed("stats_container", self.inner.stats_container(short(), &req)).await
    }

    pub async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>, AgentError> {
        let req = ContainerRequest { container_id: container_id.into(), ..Default::default() };
        let resp = self.timed("list_processes", self.inner.list_processes(short(), &req)).await?;
        Ok(resp.pids)
    }

    /// Waits for the next OOM kill in any container; returns its id.
    pub async fn next_oom_event(&self) -> Result<String, AgentError> {
        let resp = self
            .inner
            .get_oom_event(unbounded(), &GetOomEventRequest::new())
            .await
            .map_err(|e| AgentError::from_rpc("get_oom_event", e))?;
        Ok(resp.container_id)
    }

    pub async fn shutdown(&self) -> Result<(), AgentError> {
        self.timed("shutdown", self.inner.shutdown(short(), &ShutdownRequest::new())).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    #[test]
    fn attack_a_guest_error_message_is_capped_and_cannot_forge_log_lines() {
        let flood = "é".repeat(1 << 20);
        let status = ttrpc::get_status(ttrpc::Code::INTERNAL, flood.clone());
        let e = AgentError::from_rpc("create_container", ttrpc::Error::RpcStatus(status));
        let text = e.to_string();
        assert!(text.len() < GUEST_MESSAGE_MAX + 64, "{} bytes reached the host", text.len());
        assert!(text.ends_with(&format!("… ({} more bytes from the guest cut)", flood.len() - GUEST_MESSAGE_MAX)));
        let forged = guest_text("failed\r\x1b[2Klevel=info msg=\"all good\"\u{0}\nsecond line\ttab");
        assert_eq!(forged, "failed\\r\\u{1b}[2Klevel=info msg=\"all good\"\\u{0}\nsecond line\ttab");
        assert_eq!(guest_text("short"), "short");
    }

    /// A hybrid-vsock host socket that answers the handshake with `reply`
    /// and then writes `after` on the stream.
    async fn fake_vsock(reply: &'static [u8], after: &'static [u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut stream = tokio::io::BufReader::new(stream);
            let mut line = String::new();
            stream.read_line(&mut line).await.unwrap();
            assert_eq!(line, "CONNECT 1024\n");
            stream.get_mut().write_all(reply).await.unwrap();
            stream.get_mut().write_all(after).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        (dir, path)
    }

    #[tokio::test]
    async fn handshake_ok_leaves_the_guest_bytes_on_the_stream() {
        let (_dir, path) = fake_vsock(b"OK 1073741824\n", b"guest").await;
        let mut stream = connect_hybrid_vsock(&path, 1024).await.unwrap();
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"guest");
    }

    #[tokio::test]
    async fn a_refused_handshake_names_the_reply() {
        let (_dir, path) = fake_vsock(b"NO\n", b"").await;
        let err = connect_hybrid_vsock(&path, 1024).await.unwrap_err().to_string();
        assert!(err.contains("unexpected handshake reply 'NO'"), "{err}");
    }

    #[tokio::test]
    async fn a_closed_handshake_is_an_error() {
        let (_dir, path) = fake_vsock(b"", b"").await;
        let err = connect_hybrid_vsock(&path, 1024).await.unwrap_err().to_string();
        assert!(err.contains("closed during the handshake") || err.contains("no handshake reply"), "{err}");
    }

    #[tokio::test]
    async fn a_missing_socket_names_its_path() {
        let err = connect_hybrid_vsock(Path::new("/nonexistent/vsock.sock"), 1024).await.unwrap_err().to_string();
        assert!(err.contains("/nonexistent/vsock.sock"), "{err}");
    }
}
