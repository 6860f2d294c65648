//! `runv run`: boot a sandbox, run one command in it with its stdio
//! streamed, exit with its status, tear everything down. The rootfs is a
//! host directory (the embedded busybox one by default) or an image's
//! (`--image`, see [`image`]).

pub mod image;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use oci_spec::runtime::{
    BoxBuilder, Capabilities, Capability, LinuxCapabilitiesBuilder, MountBuilder, ProcessBuilder, RootBuilder, Spec,
    UserBuilder,
};
use runv_proto::agent::CreateSandboxRequest;
use runv_proto::guest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::config::{check_memory, check_vcpus, Config};
use crate::sandbox::{AgentClient, AgentError, Sandbox, SandboxSpec};

/// Exit status when runv itself fails (as docker and podman use it).
pub const EXIT_RUNV_ERROR: i32 = 125;
/// The command exists but cannot be run.
pub const EXIT_CANNOT_EXECUTE: i32 = 126;
/// The command was not found in the guest.
pub const EXIT_NOT_FOUND: i32 = 127;

/// The one container `runv run` runs, and its init process's exec id.
const CONTAINER_ID: &str = "run";
const INIT: &str = "";
/// Hostname of the guest and the container.
const HOSTNAME: &str = "runv";
/// PATH of the command when neither the image nor `-e` gives one.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What docker gives a container by default, so `runv run` behaves alike.
const DEFAULT_CAPABILITIES: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fowner,
    Capability::Fsetid,
    Capability::Kill,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::NetRaw,
    Capability::SysChroot,
    Capability::Mknod,
    Capability::AuditWrite,
    Capability::Setfcap,
];

/// What `runv run`'s container runs: the command line, environment,
/// working directory and user (uid, gid, extra groups).
struct Plan {
    args: Vec<String>,
    env: Vec<String>,
    cwd: String,
    user: (u32, u32, Vec<u32>),
}

/// The OCI spec of `runv run`'s container: the shared rootfs, the runtime
/// spec's default namespaces and mounts, docker's default capabilities.
fn container_spec(
    plan: &Plan,
    tty: bool,
    (rows, cols): (u16, u16),
    read_only: bool,
) -> Result<Spec, oci_spec::OciSpecError> {
    let caps: Capabilities = DEFAULT_CAPABILITIES.iter().copied().collect();
    let capabilities =
        LinuxCapabilitiesBuilder::default().bounding(caps.clone()).effective(caps.clone()).permitted(caps).build()?;
    // Like `docker run --init`: the agent, mounted into the container, runs
    // as PID 1, forwards signals to the command and reaps orphans.
    let mut args = vec![guest::CONTAINER_INIT_PATH.to_string(), "init".into(), "--".into()];
    args.extend(plan.args.iter().cloned());
    let (uid, gid, ref groups) = plan.user;
    let user = UserBuilder::default().uid(uid).gid(gid).additional_gids(groups.clone()).build()?;
    let mut process = ProcessBuilder::default()
        .args(args)
        .env(plan.env.clone())
        .cwd(plan.cwd.clone())
        .user(user)
        .terminal(tty)
        .capabilities(capabilities)
        .no_new_privileges(true)
        .build()?;
    if tty {
        process.set_console_size(Some(BoxBuilder::default().height(rows as u64).width(cols as u64).build()?));
    }
    let root = RootBuilder::default().path(guest::SHARED_MOUNT_POINT).readonly(read_only).build()?;
    let init_mount = MountBuilder::default()
        .destination(guest::CONTAINER_INIT_PATH)
        .typ("bind")
        .source(guest::AGENT_BINARY)
        .options(vec!["bind".into(), "ro".into(), "nosuid".into(), "nodev".into()])
        .build()?;
    let mut spec = Spec::default();
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.push(init_mount);
    spec.set_mounts(Some(mounts));
    spec.set_process(Some(process));
    spec.set_root(Some(root));
    spec.set_hostname(Some(HOSTNAME.into()));
    Ok(spec)
}

#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub rootfs: Option<PathBuf>,
    /// An image reference whose rootfs and configuration to use instead.
    pub image: Option<String>,
    pub pull: image::PullPolicy,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u32>,
    pub tty: bool,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub command: Vec<String>,
}

/// A failure with the exit status runv should end with.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RunError {
    pub status: i32,
    pub message: String,
}

impl RunError {
    pub(crate) fn runv(message: impl Into<String>) -> Self {
        Self { status: EXIT_RUNV_ERROR, message: message.into() }
    }
}

/// Runs the command and returns its exit status.
pub async fn run(config: &Config, opts: RunOptions) -> Result<i32, RunError> {
    if opts.command.is_empty() && opts.image.is_none() {
        return Err(RunError::runv("no command given (usage: runv run [OPTIONS] -- CMD [ARGS...])"));
    }
    if opts.rootfs.is_some() && opts.image.is_some() {
        return Err(RunError::runv("--rootfs and --image both give the rootfs: pass one"));
    }
    for kv in &opts.env {
        if !kv.contains('=') || kv.starts_with('=') {
            return Err(RunError::runv(format!("--env '{kv}' is not KEY=VALUE")));
        }
    }
    if let Some(dir) = opts.workdir.as_deref().filter(|d| !d.starts_with('/')) {
        return Err(RunError::runv(format!("--workdir '{dir}' is not absolute")));
    }
    let vcpus = opts.cpus.unwrap_or(config.vcpus);
    check_vcpus(vcpus).map_err(|p| RunError::runv(format!("--cpus {p}")))?;
    let memory_mib = opts.memory_mib.unwrap_or(config.memory_mib);
    check_memory(memory_mib).map_err(|p| RunError::runv(format!("--memory {p}")))?;
    let mut signals = Signals::new().map_err(|e| RunError::runv(format!("installing signal handlers: {e}")))?;
    let interrupted = |sig: i32, during: &str| RunError {
        status: 128 + sig,
        message: format!("interrupted by signal {sig} {during}"),
    };

    // The image (its rootfs stays mounted until the sandbox is gone), or a
    // host directory.
    let image = match &opts.image {
        Some(reference) => Some(tokio::select! {
            r = image::prepare(config, reference, opts.pull) => r?,
            sig = signals.recv() => return Err(interrupted(sig, "while preparing the image")),
        }),
        None => None,
    };
    let (rootfs, read_only, plan) = match &image {
        Some(img) => {
            let p = image::process(&img.record, &opts.command, &opts.env, opts.workdir.as_deref(), img.user.0 == 0)?;
            let plan = Plan { args: p.args, env: p.env, cwd: p.cwd, user: img.user.clone() };
            // The lease's overlay is this run's own: writable.
            (img.lease.rootfs().to_path_buf(), false, plan)
        }
        None => {
            let rootfs = opts.rootfs.clone().unwrap_or_else(|| config.rootfs.clone());
            if !rootfs.is_dir() {
                let hint = if opts.rootfs.is_none() {
                    " (the default rootfs; run scripts/install.sh or pass --rootfs)"
                } else {
                    ""
                };
                return Err(RunError::runv(format!(
                    "rootfs '{}' does not exist or is not a directory{hint}",
                    rootfs.display()
                )));
            }
            let rootfs =
                rootfs.canonicalize().map_err(|e| RunError::runv(format!("rootfs '{}': {e}", rootfs.display())))?;
            let mut env = vec![format!("PATH={DEFAULT_PATH}"), "HOME=/root".to_string()];
            env.extend(opts.env.iter().cloned());
            let cwd = opts.workdir.clone().unwrap_or_else(|| "/".into());
            // The embedded default rootfs is shared by every run: keep it
            // pristine.
            (rootfs, opts.rootfs.is_none(), Plan { args: opts.command.clone(), env, cwd, user: (0, 0, Vec::new()) })
        }
    };

    let spec =
        SandboxSpec { shared_dir: rootfs, read_only, vcpus, memory_mib, netns: None, cgroup: None, dir_record: None };
    let sandbox = tokio::select! {
        r = Sandbox::start(config, &spec) => r.map_err(|e| RunError::runv(e.to_string()))?,
        sig = signals.recv() => return Err(interrupted(sig, "while booting")),
    };
    tracing::debug!(sandbox = sandbox.id(), hypervisor = %sandbox.describe_hypervisor(), "sandbox ready");
    let result = run_command(sandbox.agent(), &opts, plan, spec.read_only, &mut signals).await;
    sandbox.shutdown().await;
    // Unmounted only once the VM and virtiofsd are gone.
    drop(image);
    result
}

async fn run_command(
    agent: &AgentClient,
    opts: &RunOptions,
    mut plan: Plan,
    read_only: bool,
    signals: &mut Signals,
) -> Result<i32, RunError> {
    let stdin_is_tty = nix::unistd::isatty(std::io::stdin()).unwrap_or(false);
    let (rows, cols) = if opts.tty { terminal_size().unwrap_or((24, 80)) } else { (0, 0) };
    if opts.tty && !plan.env.iter().any(|kv| kv.starts_with("TERM=")) {
        plan.env.push(format!("TERM={}", std::env::var("TERM").unwrap_or_else(|_| "xterm".into())));
    }
    let spec = container_spec(&plan, opts.tty, (rows, cols), read_only)
        .map_err(|e| RunError::runv(format!("building the container spec: {e}")))?;
    let cannot_run = |e: AgentError| {
        let message = e.to_string();
        let status = if message.contains("not found") || message.contains("No such file") {
            EXIT_NOT_FOUND
        } else if message.contains("ermission denied") {
            EXIT_CANNOT_EXECUTE
        } else {
            EXIT_RUNV_ERROR
        };
        RunError { status, message: format!("cannot run '{}' in the guest: {message}", plan.args[0]) }
    };
    agent
        .create_sandbox(&CreateSandboxRequest { hostname: HOSTNAME.into(), ..Default::default() })
        .await
        .map_err(|e| RunError::runv(format!("preparing the sandbox: {e}")))?;
    agent.create_container(CONTAINER_ID, &spec).await.map_err(cannot_run)?;
    tracing::debug!("container created");
    if let Err(e) = agent.start_container(CONTAINER_ID).await {
        return Err(cannot_run(e));
    }

    tracing::debug!("container started");
    let _raw = if opts.tty && stdin_is_tty { RawTerminal::enter() } else { None };
    let stdout = tokio::spawn(pump_output(agent.clone(), false));
    let stderr = (!opts.tty).then(|| tokio::spawn(pump_output(agent.clone(), true)));
    let stdin = tokio::spawn(pump_stdin(agent.clone()));

    let wait = agent.wait_process(CONTAINER_ID, INIT);
    tokio::pin!(wait);
    let mut forwarded = false;
    let exit = loop {
        tokio::select! {
            r = &mut wait => break r.map_err(|e| RunError::runv(format!("waiting for the command: {e} (the VM may have died)")))?,
            sig = signals.recv() => {
                if sig == libc::SIGWINCH {
                    if let Some((r, c)) = terminal_size() {
                        let _ = agent.resize(CONTAINER_ID, INIT, r, c).await;
                    }
                } else if forwarded {
                    return Err(RunError { status: 128 + sig, message: format!("signal {sig} received twice; tearing the sandbox down") });
                } else {
                    // The first signal goes to the command; a second one ends runv.
                    forwarded = true;
                    let _ = agent.signal_process(CONTAINER_ID, INIT, sig).await;
                }
            }
        }
    };
    // The agent drains the streams once the process has exited.
    for pump in std::iter::once(stdout).chain(stderr) {
        match tokio::time::timeout(Duration::from_secs(10), pump).await {
            Ok(Ok(Err(e))) => tracing::warn!("output stream: {e}"),
            Ok(_) => {}
            Err(_) => tracing::warn!("output stream did not end"),
        }
    }
    tracing::debug!(status = exit.status, "command exited");
    stdin.abort();
    Ok(exit.status)
}

async fn pump_output(agent: AgentClient, stderr: bool) -> Result<(), AgentError> {
    let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> =
        if stderr { Box::new(tokio::io::stderr()) } else { Box::new(tokio::io::stdout()) };
    while let Some(data) = agent.read_output(CONTAINER_ID, INIT, stderr).await? {
        if out.write_all(&data).await.is_err() || out.flush().await.is_err() {
            // Our own stdout is gone (a closed pipe); keep draining the guest.
            continue;
        }
    }
    Ok(())
}

async fn pump_stdin(agent: AgentClient) {
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if agent.write_stdin(CONTAINER_ID, INIT, buf[..n].to_vec()).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = agent.close_stdin(CONTAINER_ID, INIT).await;
}

/// SIGINT, SIGTERM, SIGHUP (forwarded to the command) and SIGWINCH.
struct Signals {
    streams: Vec<(i32, Signal)>,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        let mut streams = Vec::new();
        for (num, kind) in [
            (libc::SIGINT, SignalKind::interrupt()),
            (libc::SIGTERM, SignalKind::terminate()),
            (libc::SIGHUP, SignalKind::hangup()),
            (libc::SIGWINCH, SignalKind::window_change()),
        ] {
            streams.push((num, signal(kind)?));
        }
        Ok(Self { streams })
    }

    async fn recv(&mut self) -> i32 {
        let futures = self.streams.iter_mut().map(|(num, s)| {
            let num = *num;
            Box::pin(async move {
                s.recv().await;
                num
            })
        });
        futures::future::select_all(futures).await.0
    }
}

fn terminal_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes into the winsize we own.
    let ok = unsafe { libc::ioctl(std::io::stdout().as_raw_fd(), libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Puts the host terminal in raw mode; restores it when dropped.
struct RawTerminal {
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    fn enter() -> Option<Self> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let saved = tcgetattr(std::io::stdin()).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(std::io::stdin(), SetArg::TCSANOW, &raw).ok()?;
        Some(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &self.saved);
    }
}
