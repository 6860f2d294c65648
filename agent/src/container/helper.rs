//! The container engine's side of the agent, run as a short-lived child
//! process (`runv-agent container-helper OP ...`). The engine clones and
//! waits for its own children, which must not happen inside the agent's
//! multi-threaded runtime, and whose exits the agent's reaper would take.
//!
//! The container's stdio arrives as descriptors 3, 4, 5 (`--stdio`); the
//! helper's own stdout carries the result (a pid), its stderr the error.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;

pub const SUBCOMMAND: &str = "container-helper";

#[derive(Default)]
struct Args {
    op: String,
    root: PathBuf,
    id: String,
    bundle: Option<PathBuf>,
    process: Option<PathBuf>,
    console_socket: Option<PathBuf>,
    stdio: bool,
    force: bool,
}

fn parse(args: &[String]) -> Result<Args> {
    let mut a = Args::default();
    let mut it = args.iter();
    a.op = it.next().context("missing operation")?.clone();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--root" => a.root = value()?.into(),
            "--id" => a.id = value()?,
            "--bundle" => a.bundle = Some(value()?.into()),
            "--process" => a.process = Some(value()?.into()),
            "--console-socket" => a.console_socket = Some(value()?.into()),
            "--stdio" => a.stdio = true,
            "--force" => a.force = true,
            other => bail!("unknown argument '{other}'"),
        }
    }
    Ok(a)
}

pub fn main(args: &[String]) -> ExitCode {
    // The engine explains failures in its log; keep its errors (or more,
    // with RUNV_AGENT_LOG=debug) on stderr, which becomes the reply.
    // A plain level filter unless asked for more: parsing filter directives
    // costs a noticeable part of this short process's life under emulation.
    let fmt = tracing_subscriber::fmt().with_writer(std::io::stderr).without_time().with_target(false).with_ansi(false);
    match std::env::var("RUNV_AGENT_LOG") {
        Ok(filter) => fmt.with_env_filter(tracing_subscriber::EnvFilter::new(filter)).init(),
        Err(_) => fmt.with_max_level(tracing::Level::ERROR).init(),
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn builder(a: &Args) -> Result<ContainerBuilder> {
    let mut b = ContainerBuilder::new(a.id.clone(), SyscallType::default())
        .with_root_path(a.root.clone())
        .context("container state directory")?
        .with_console_socket(a.console_socket.clone());
    if a.stdio {
        // SAFETY: the agent passed these three descriptors, and nothing
        // else in this process owns them.
        let (stdin, stdout, stderr) =
            unsafe { (OwnedFd::from_raw_fd(3), OwnedFd::from_raw_fd(4), OwnedFd::from_raw_fd(5)) };
        b = b.with_stdin(stdin).with_stdout(stdout).with_stderr(stderr);
    }
    Ok(b)
}

fn load(a: &Args) -> Result<Container> {
    Container::load(a.root.join(&a.id)).with_context(|| format!("loading container '{}'", a.id))
}

fn run(args: &[String]) -> Result<()> {
    let a = parse(args)?;
    match a.op.as_str() {
        "create" => {
            let bundle = a.bundle.clone().context("create needs --bundle")?;
            let container = builder(&a)?
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .context("creating the container")?;
            let pid = container.pid().context("the engine reported no init pid")?;
            println!("{pid}");
        }
        "exec" => {
            let process = a.process.clone().context("exec needs --process")?;
            let pid = builder(&a)?
                .as_tenant()
                .with_process(Some(process))
                .with_detach(true)
                .build()
                .context("starting the process")?;
            println!("{pid}");
        }
        "delete" => load(&a)?.delete(a.force).context("deleting the container")?,
        other => bail!("unknown operation '{other}'"),
    }
    Ok(())
}
