//! runv-agent: PID 1 of a runv microVM. It mounts the basics, reaps
//! orphans, and serves the agent protocol over ttrpc on vsock port 1024.
//!
//! It also runs on a host as an ordinary process (`--listen unix:///path`),
//! which is how its tests run without a VM.

use runv_agent::{container, init, process, service};

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use runv_proto::guest;

const USAGE: &str = "\
runv-agent: the runv guest agent (PID 1 in the microVM)

Usage: runv-agent [--listen ADDRESS] [--state-dir DIR] [--allow-dir DIR]...

Options:
  --listen ADDRESS   ttrpc address to serve: vsock://-1:1024 (default in a
                     guest), or unix:///path/agent.sock to run on a host
  --state-dir DIR    container state, bundles and sandbox files
                     (default /run/runv)
  --allow-dir DIR    a directory container rootfs and bind mounts may come
                     from (repeatable; default the shared directory
                     /run/runv/shared)
  --help             print this help
  --version          print the agent version
";

fn main() -> ExitCode {
    // Subcommands run as helpers, or as a container's init (then PID 1 of
    // the container's namespace, which is not the guest's init).
    let all: Vec<String> = std::env::args().collect();
    match all.get(1).map(String::as_str) {
        Some(container::helper::SUBCOMMAND) => return container::helper::main(&all[2..]),
        Some(container::pause::SUBCOMMAND) => return container::pause::main(&all[2..]),
        Some(container::init::SUBCOMMAND) => return container::init::main(&all[2..]),
        _ => {}
    }
    let pid1 = std::process::id() == 1;
    let mut listen = format!("vsock://-1:{}", guest::AGENT_VSOCK_PORT);
    let mut state_dir = std::path::PathBuf::from(guest::AGENT_STATE_DIR);
    let mut allow_dirs = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            // The kernel hands unknown command-line words to init; a guest
            // agent ignores what it does not know.
            "--listen" if !pid1 => match args.next() {
                Some(addr) => listen = addr,
                None => return usage_error("--listen needs an address"),
            },
            "--state-dir" if !pid1 => match args.next() {
                Some(dir) => state_dir = dir.into(),
                None => return usage_error("--state-dir needs a directory"),
            },
            "--allow-dir" if !pid1 => match args.next() {
                Some(dir) => allow_dirs.push(std::path::PathBuf::from(dir)),
                None => return usage_error("--allow-dir needs a directory"),
            },
            "--help" | "-h" if !pid1 => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--version" if !pid1 => {
                println!("runv-agent {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            other if !pid1 => return usage_error(&format!("unknown argument '{other}'")),
            _ => {}
        }
    }

    if pid1 {
        if let Err(e) = init::switch_root_to_tmpfs().and_then(|()| init::setup()) {
            eprintln!("runv-agent: guest setup failed: {e:#}");
            init::power_off();
        }
        if init::probe_requested() {
            println!("{}", guest::PROBE_READY_MARKER);
            init::power_off();
        }
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runv-agent: cannot start the async runtime: {e}");
            return fail(pid1);
        }
    };
    if allow_dirs.is_empty() {
        allow_dirs.push(guest::SHARED_MOUNT_POINT.into());
    }
    allow_dirs.push(state_dir.join("sandbox"));
    // Containers may bind-mount the agent itself as their init.
    if let Ok(exe) = std::env::current_exe() {
        allow_dirs.push(exe);
    }
    let paths = container::Paths {
        state: state_dir.join("containers"),
        bundles: state_dir.join("bundles"),
        consoles: state_dir.join("consoles"),
        sandbox: state_dir.join("sandbox"),
        allowed: container::spec::AllowedRoots(allow_dirs),
    };
    match runtime.block_on(serve(&listen, pid1, paths)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("runv-agent: {e:#}");
            fail(pid1)
        }
    }
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("runv-agent: {msg}\n\n{USAGE}");
    ExitCode::from(2)
}

fn fail(pid1: bool) -> ExitCode {
    if pid1 {
        init::power_off();
    }
    ExitCode::FAILURE
}

async fn serve(listen: &str, pid1: bool, paths: container::Paths) -> Result<()> {
    if let Some(path) = listen.strip_prefix("unix://") {
        // A stale socket from an earlier run would make bind fail.
        let _ = std::fs::remove_file(path);
    }
    let processes = process::ProcessTable::new()?;
    if pid1 && runv_agent::debug_console::requested() {
        runv_agent::debug_console::serve(processes.clone(), tokio::runtime::Handle::current())
            .context("starting the debug console")?;
    }
    if pid1 {
        // Before vsock sockets are denied: its listener is one.
        runv_agent::port_forward::serve().context("starting port forwarding")?;
        // localhost works in every pod, a pod network or none.
        runv_agent::network::loopback_up().await.context("bringing the loopback up")?;
    }
    let containers = container::Containers::new(processes.clone(), paths)?;
    let service = Arc::new(service::AgentService::new(processes, containers, pid1));
    let shutdown = service.shutdown_signal();
    let listener =
        ttrpc::asynchronous::transport::Listener::bind(listen).with_context(|| format!("binding {listen}"))?;
    let listener = if listen.starts_with("vsock://") { host_only(listener) } else { listener };
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(listener)
        .register_service(runv_proto::agent_ttrpc::create_agent(service));
    server.start().await.context("starting the ttrpc server")?;
    eprintln!("runv-agent {} serving on {listen}", env!("CARGO_PKG_VERSION"));
    if pid1 {
        // Tell the host we serve; it connects to us only then. That is the
        // last vsock socket the guest makes: from here on nothing in it may
        // make one, the agent included.
        let notified = tokio::task::spawn_blocking(init::notify_host_ready).await;
        if let Ok(Err(e)) = notified {
            eprintln!("runv-agent: could not tell the host it is ready: {e:#}");
        }
        init::deny_vsock_sockets().context("denying vsock sockets in the guest")?;
    }
    shutdown.notified().await;
    // Let the reply to Shutdown reach the caller before the guest goes away.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    if pid1 {
        init::power_off();
    }
    Ok(())
}

/// The agent serves the host only: a vsock connection from any other CID
/// (another guest, or this guest itself should a loopback transport exist)
/// is closed unanswered. The guest kernel is also built without vsock
/// loopback, so a container cannot reach this port at all.
fn host_only(listener: ttrpc::asynchronous::transport::Listener) -> ttrpc::asynchronous::transport::Listener {
    use futures::StreamExt;
    ttrpc::asynchronous::transport::Listener::new(listener.filter_map(|conn| async move {
        match conn {
            Ok(socket) => {
                let peer = socket
                    .as_raw_fd()
                    .and_then(|fd| nix::sys::socket::getpeername::<nix::sys::socket::VsockAddr>(fd).ok());
                match peer {
                    Some(addr) if addr.cid() == libc::VMADDR_CID_HOST => Some(Ok(socket)),
                    other => {
                        eprintln!("runv-agent: refused a vsock connection from {other:?}: only the host may connect");
                        None
                    }
                }
            }
            Err(e) => Some(Err(e)),
        }
    }))
}
