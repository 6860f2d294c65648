//! The pod's pause process (`runv-agent pause`): PID 1 of new PID, IPC and
//! UTS namespaces that the pod's containers join. It reaps what its
//! namespace orphans and exits on SIGTERM or SIGINT.

use std::process::ExitCode;

pub const SUBCOMMAND: &str = "pause";

extern "C" fn exit_now(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(0) }
}

pub fn main(args: &[String]) -> ExitCode {
    let hostname = match args {
        [] => None,
        [flag, h] if flag == "--hostname" => Some(h.clone()),
        _ => {
            eprintln!("usage: runv-agent pause [--hostname NAME]");
            return ExitCode::from(2);
        }
    };
    // SAFETY: unshare with constant flags in this single-threaded helper.
    if unsafe { libc::unshare(libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) } < 0 {
        eprintln!("creating the pod namespaces: {}", std::io::Error::last_os_error());
        return ExitCode::FAILURE;
    }
    if let Some(h) = hostname {
        if let Err(e) = nix::unistd::sethostname(&h) {
            eprintln!("setting the pod hostname '{h}': {e}");
            return ExitCode::FAILURE;
        }
    }
    // SAFETY: this process is single-threaded; the child only makes system calls.
    match unsafe { libc::fork() } {
        -1 => {
            eprintln!("starting the pause process: {}", std::io::Error::last_os_error());
            ExitCode::FAILURE
        }
        0 => unsafe {
            // PID 1 of the pod's PID namespace. Let go of the caller's pipes.
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            libc::signal(libc::SIGTERM, exit_now as *const () as libc::sighandler_t);
            libc::signal(libc::SIGINT, exit_now as *const () as libc::sighandler_t);
            loop {
                libc::pause();
                while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
            }
        },
        child => {
            println!("{child}");
            ExitCode::SUCCESS
        }
    }
}
