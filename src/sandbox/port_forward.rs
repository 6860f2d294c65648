//! The host side of port forwarding into a pod (the agent's
//! `port_forward`): a stream to `localhost:<port>` in the pod's network
//! namespace, which is the guest's own, so a listener bound to the guest's
//! loopback is reached as the CRI means it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
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
    let line = tokio::time::timeout(REPLY_TIMEOUT, super::agent::read_line(&mut stream, MAX_REPLY))
        .await
        .map_err(|_| format!("the guest did not answer within {REPLY_TIMEOUT:?}"))?
        .map_err(|e| match e {
            super::agent::LineError::Closed => "the guest closed the stream without an answer".to_string(),
            super::agent::LineError::TooLong => format!("the guest's answer is longer than {MAX_REPLY} bytes"),
            super::agent::LineError::Io(e) => format!("reading the guest's answer: {e}"),
        })?;
    answer_of(&line).map(|()| stream)
}

/// The agent's one-line answer (without its newline): `Ok` for
/// `guest::PORT_FORWARD_OK`, else its reason, as `guest_text` shows guest
/// bytes (control characters escaped, the length capped).
pub fn answer_of(line: &[u8]) -> Result<(), String> {
    if guest::PORT_FORWARD_OK.strip_suffix('\n').is_some_and(|ok| line == ok.as_bytes()) {
        return Ok(());
    }
    let text = super::agent::guest_text(&String::from_utf8_lossy(line));
    Err(text.strip_prefix("error: ").map(str::to_string).unwrap_or_else(|| format!("unexpected answer {text:?}")))
}

/// The hybrid vsock socket of the sandbox whose directory a shim recorded
/// in `shim_dir` (`sandbox-dir`): in its jail when it has one.
pub fn vsock_socket_of(shim_dir: &Path) -> Option<PathBuf> {
    let recorded = std::fs::read_to_string(shim_dir.join(super::DIR_RECORD)).ok()?;
    let dir = PathBuf::from(recorded.trim());
    let jailed = dir.join(crate::jailer::JAIL_DIR).join(super::VSOCK_SOCKET);
    [jailed, dir.join(super::VSOCK_SOCKET)].into_iter().find(|p| p.exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guests_answer_is_ok_or_a_reason_shown_plainly() {
        assert_eq!(answer_of(b"ok"), Ok(()));
        assert_eq!(answer_of(b"error: connection refused"), Err("connection refused".into()));
        // Control characters are escaped, as every guest text is shown.
        assert_eq!(answer_of(b"error: \x1b[2Jgone\r"), Err("\\u{1b}[2Jgone\\r".into()));
        assert!(answer_of(b"ok\r").is_err());
        assert!(answer_of(b"ok ").unwrap_err().contains("unexpected answer"));
        assert!(answer_of(b"\xff\xfe").is_err());
    }
}
