//! `runv-agent init -- CMD ARGS...`: a minimal init for containers that
//! want one (`runv run` uses it, like `docker run --init`). It runs CMD,
//! forwards the signals it gets to CMD, reaps every orphan, and exits with
//! CMD's status (128 + N when CMD died of signal N; 127 when CMD is not
//! found, 126 when it cannot be executed).

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

pub const SUBCOMMAND: &str = "init";

const FORWARDED: &[Signal] = &[
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
    Signal::SIGCONT,
];

pub fn main(args: &[String]) -> ExitCode {
    let cmd = match args {
        [dashdash, cmd @ ..] if dashdash == "--" && !cmd.is_empty() => cmd,
        _ => {
            eprintln!("usage: runv-agent init -- CMD [ARGS...]");
            return ExitCode::from(2);
        }
    };
    let mut set = SigSet::empty();
    for s in FORWARDED.iter().chain([&Signal::SIGCHLD]) {
        set.add(*s);
    }
    if let Err(e) = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None) {
        eprintln!("runv-init: blocking signals: {e}");
        return ExitCode::from(126);
    }
    let mut command = Command::new(&cmd[0]);
    command.args(&cmd[1..]);
    // SAFETY: sigprocmask is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
                .map_err(std::io::Error::from)
        });
    }
    let child = match command.spawn() {
        Ok(c) => Pid::from_raw(c.id() as i32),
        Err(e) => {
            let (what, code) = match e.kind() {
                std::io::ErrorKind::NotFound => ("executable file not found", 127),
                std::io::ErrorKind::PermissionDenied => ("permission denied", 126),
                _ => ("cannot execute", 126),
            };
            if code == 127 {
                eprintln!("runv-init: {}: {what}", cmd[0]);
            } else {
                eprintln!("runv-init: {}: {what} ({e})", cmd[0]);
            }
            return ExitCode::from(code);
        }
    };
    loop {
        let Ok(sig) = set.wait() else { continue };
        if sig != Signal::SIGCHLD {
            let _ = nix::sys::signal::kill(child, sig);
            continue;
        }
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == child => return ExitCode::from(code as u8),
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => return ExitCode::from(128 + sig as u8),
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}
