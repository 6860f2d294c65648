//! The host side of the agent's opt-in debug console (config key
//! `debug_console`, off by default): runs a command as root in the guest,
//! outside every container, over the sandbox's hybrid vsock.

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use runv_proto::guest;

/// Most output kept from one command.
pub const MAX_OUTPUT: usize = 16 << 20;

/// Runs `argv` in the guest behind `vsock_socket` (a sandbox's
/// `vsock.sock`); returns its output (stdout and stderr together) and its
/// exit status.
pub async fn run(vsock_socket: &Path, argv: &[String]) -> Result<(Vec<u8>, i32), String> {
    let mut stream = super::agent::connect_hybrid_vsock(vsock_socket, guest::DEBUG_CONSOLE_VSOCK_PORT)
        .await
        .map_err(|e| format!("{e} (is debug_console = true in the config the sandbox started with?)"))?;
    let mut line = serde_json::to_vec(argv).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream.write_all(&line).await.map_err(|e| format!("sending the command: {e}"))?;
    let mut out = Vec::new();
    (&mut stream).take(MAX_OUTPUT as u64 + 256).read_to_end(&mut out).await.map_err(|e| format!("reading: {e}"))?;
    parse_reply(out)
}

/// Splits the agent's closing `<prefix><status>` line off the output.
fn parse_reply(mut out: Vec<u8>) -> Result<(Vec<u8>, i32), String> {
    let prefix = guest::DEBUG_CONSOLE_EXIT_PREFIX.as_bytes();
    let at = out
        .windows(prefix.len())
        .rposition(|w| w == prefix)
        .ok_or("the guest closed the console without an exit status (the VM may have died)")?;
    let status = std::str::from_utf8(&out[at + prefix.len()..])
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .ok_or("a malformed exit status from the guest")?;
    out.truncate(at);
    Ok((out, status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_line_is_split_off_and_a_missing_one_is_an_error() {
        let reply = format!("hello\n{}3\n", guest::DEBUG_CONSOLE_EXIT_PREFIX).into_bytes();
        assert_eq!(parse_reply(reply).unwrap(), (b"hello\n".to_vec(), 3));
        assert!(parse_reply(b"cut off".to_vec()).unwrap_err().contains("without an exit status"));
    }
}
