//! The debug console: a root process in the guest, outside every container,
//! for debugging a sandbox and for the attack tests, which act as a
//! compromised guest would. Off unless the host put `runv.debug_console=1`
//! on the kernel command line, which it does only when runv's config sets
//! `debug_console = true` (as Kata's `debug_console_enabled`).
//!
//! Protocol on vsock port `guest::DEBUG_CONSOLE_VSOCK_PORT`, host only: the
//! host sends one line, a JSON array (the argv); the process runs with the
//! connection as its stdout and stderr (stdin is /dev/null); when it exits the agent
//! writes `guest::DEBUG_CONSOLE_EXIT_PREFIX<status>\n` and closes. The
//! agent's image holds no shell: the program comes from the guest's files (a
//! container's rootfs under the shared directory, for instance).

use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use nix::sys::socket::{
    accept, bind, getpeername, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use runv_proto::guest;

use crate::process::{ProcessIo, ProcessTable};

/// Longest argv line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// Whether the kernel command line enables the console.
pub fn requested() -> bool {
    std::fs::read_to_string("/proc/cmdline")
        .map(|c| c.split_whitespace().any(|w| w == guest::DEBUG_CONSOLE_CMDLINE_FLAG))
        .unwrap_or(false)
}

/// Listens and serves connections one thread each, forever.
pub fn serve(processes: ProcessTable, runtime: tokio::runtime::Handle) -> Result<()> {
    let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).context("vsock socket")?;
    bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, guest::DEBUG_CONSOLE_VSOCK_PORT))
        .context("binding the debug console port")?;
    listen(&fd, Backlog::new(4).expect("small backlog")).context("listening")?;
    let processes = Arc::new(processes);
    std::thread::Builder::new().name("debug-console".into()).spawn(move || loop {
        let Ok(conn) = accept(fd.as_raw_fd()) else { continue };
        // SAFETY: accept returned a new descriptor that nothing else owns.
        let conn: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(conn) };
        let (processes, runtime) = (processes.clone(), runtime.clone());
        std::thread::spawn(move || {
            if let Err(e) = session(conn, &processes, &runtime) {
                eprintln!("runv-agent: debug console: {e:#}");
            }
        });
    })?;
    eprintln!("runv-agent: DEBUG CONSOLE ENABLED on vsock port {}", guest::DEBUG_CONSOLE_VSOCK_PORT);
    Ok(())
}

fn session(conn: OwnedFd, processes: &ProcessTable, runtime: &tokio::runtime::Handle) -> Result<()> {
    let peer = getpeername::<VsockAddr>(conn.as_raw_fd()).context("peer address")?;
    if peer.cid() != libc::VMADDR_CID_HOST {
        bail!("refused a connection from CID {}: only the host may connect", peer.cid());
    }
    let mut line = String::new();
    std::io::BufReader::new(std::io::Read::take(std::fs::File::from(conn.try_clone()?), MAX_LINE))
        .read_line(&mut line)
        .context("reading the command")?;
    let argv: Vec<String> = serde_json::from_str(line.trim()).context("the command must be a JSON array of strings")?;
    let Some((program, args)) = argv.split_first() else { bail!("an empty command") };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        // No stdin: a half-closed hybrid vsock stream closes whole on some
        // backends, so the host never closes its side early.
        .stdin(Stdio::null())
        .stdout(Stdio::from(conn.try_clone()?))
        .stderr(Stdio::from(conn.try_clone()?));
    let status = match processes.spawn_command(&mut cmd, ProcessIo::default()) {
        Ok(process) => {
            let exit = runtime.block_on(process.wait());
            if exit.signal != 0 {
                128 + exit.signal as i32
            } else {
                exit.status
            }
        }
        Err(e) => {
            let mut out = std::fs::File::from(conn.try_clone()?);
            let _ = writeln!(out, "runv-agent: debug console: {program}: {e}");
            127
        }
    };
    drop(cmd);
    let mut out = std::fs::File::from(conn);
    let _ = writeln!(out, "{}{status}", guest::DEBUG_CONSOLE_EXIT_PREFIX);
    Ok(())
}
