//! The host side of port forwarding into a pod (the agent's
//! `port_forward`): a stream to `localhost:<port>` in the pod's network
//! namespace, which is the guest's own, so a listener bound to the guest's
//! loopback is reached as the CRI means it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use runv_proto::guest;

/// Longest answer read from the guest before the stream.
const MAX_REPLY: usize = 512;
/// How long the guest has to answer (it dials within 10 s).
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// Opens a stream to `localhost:<port>` in the guest behind `vsock_socket`.
/// An error says why, in the guest's words where it gave them.
pub async fn connect(vsock_socket: &Path, port: u16) -> Result<UnixStream, String> {
    let mut stream = super::agent::connect_hybrid_vsock(vsock_socket, guest::PORT_FORWARD_VSOCK_PORT)
        .await
        .map_err(|e| e.to_string())?;
    stream.write_all(format!("{port}\n").as_bytes()).await.map_err(|e| format!("asking for port {port}: {e}"))?;
    let answer = async {
        // A byte at a time: what follows the newline is the pod's data.
        let mut line = Vec::with_capacity(32);
        loop {
            let mut byte = [0u8; 1];
            match stream.read(&mut byte).await {
                Ok(0) => return Err("the guest closed the stream without an answer".to_string()),
                Ok(_) if byte[0] == b'\n' => return Ok(line),
                Ok(_) if line.len() < MAX_REPLY => line.push(byte[0]),
                Ok(_) => return Err(format!("the guest's answer is longer than {MAX_REPLY} bytes")),
                Err(e) => return Err(format!("reading the guest's answer: {e}")),
            }
        }
    };
    let line = tokio::time::timeout(REPLY_TIMEOUT, answer)
        .await
        .map_err(|_| format!("the guest did not answer within {REPLY_TIMEOUT:?}"))??;
    // Guest bytes: shown as text, without control characters.
    let text: String = String::from_utf8_lossy(&line).chars().filter(|c| !c.is_control()).collect();
    if format!("{text}\n") == guest::PORT_FORWARD_OK {
        return Ok(stream);
    }
    Err(text.strip_prefix("error: ").map(str::to_string).unwrap_or_else(|| format!("unexpected answer {text:?}")))
}

/// The hybrid vsock socket of the sandbox whose directory a shim recorded
/// in `shim_dir` (`sandbox-dir`): in its jail when it has one.
pub fn vsock_socket_of(shim_dir: &Path) -> Option<PathBuf> {
    let recorded = std::fs::read_to_string(shim_dir.join("sandbox-dir")).ok()?;
    let dir = PathBuf::from(recorded.trim());
    [dir.join("jail").join(super::VSOCK_SOCKET), dir.join(super::VSOCK_SOCKET)].into_iter().find(|p| p.exists())
}
