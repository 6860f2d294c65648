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
            let bundle = load(&a)?.bundle().clone();
            let spec = oci_spec::runtime::Spec::load(bundle.join("config.json"))
                .with_context(|| format!("reading {}/config.json", bundle.display()))?;
            let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
            let pid = builder(&a)?
                .with_executor(UnderContainerSeccomp { seccomp })
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

/// Runs an exec'd process under its container's seccomp profile. The
/// engine (libcontainer 0.7) builds an exec's spec without the container's
/// `linux.seccomp`, so without this a `kubectl exec` would run unfiltered.
/// This loads the profile as the last step before the exec, when the
/// capabilities are already dropped: a process without CAP_SYS_ADMIN gets
/// no_new_privs first (the kernel loads no filter otherwise), so an exec'd
/// process without CAP_SYS_ADMIN in a container with a profile cannot gain
/// privileges through setuid binaries even where the container's init could.
#[derive(Clone)]
struct UnderContainerSeccomp {
    seccomp: Option<oci_spec::runtime::LinuxSeccomp>,
}

impl libcontainer::workload::Executor for UnderContainerSeccomp {
    fn exec(&self, spec: &oci_spec::runtime::Spec) -> Result<(), libcontainer::workload::ExecutorError> {
        use libcontainer::workload::ExecutorError;
        if let Some(profile) = &self.seccomp {
            // With CAP_SYS_ADMIN (or no_new_privs already) it loads as is;
            // otherwise only after no_new_privs.
            if libcontainer::seccomp::initialize_seccomp(profile).is_err() {
                // SAFETY: prctl with integer arguments.
                if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                    return Err(ExecutorError::Other(format!("no_new_privs: {}", std::io::Error::last_os_error())));
                }
                libcontainer::seccomp::initialize_seccomp(profile)
                    .map_err(|e| ExecutorError::Other(format!("loading the container's seccomp profile: {e}")))?;
            }
        }
        libcontainer::workload::default::get_executor().exec(spec)
    }

    fn validate(&self, spec: &oci_spec::runtime::Spec) -> Result<(), libcontainer::workload::ExecutorValidationError> {
        libcontainer::workload::default::get_executor().validate(spec)
    }
}
