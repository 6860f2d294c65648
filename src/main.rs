use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use runv::check::Level;
use runv::config::Config;
use runv::run::{RunOptions, EXIT_RUNV_ERROR};

/// runv: every pod in its own KVM microVM.
///
/// `runv run` boots a microVM and runs one command in it as a container;
/// `runv check` tells what this host can do; `runv overhead` measures what
/// a pod costs beyond its containers. containerd runs pods through
/// containerd-shim-runv-v2. Configuration is read from
/// /etc/runv/config.toml when present (see deploy/config.toml).
#[derive(Parser)]
#[command(name = "runv", version)]
struct Cli {
    /// Configuration file (default /etc/runv/config.toml, if present).
    #[arg(long, global = true, env = "RUNV_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a microVM, run CMD inside it and exit with its status.
    ///
    /// The root filesystem (default: the embedded busybox rootfs; or a host
    /// directory; or an OCI image's, pulled into the store runv cri uses)
    /// is shared into the guest over virtio-fs; CMD's stdin, stdout and
    /// stderr are streamed; the VM and everything around it is removed
    /// afterwards. With --image, CMD replaces the image's Cmd (its
    /// Entrypoint, Env, WorkingDir and User apply) and may be left out.
    /// Exit status: CMD's own, 125 when runv fails, 126 when CMD cannot be
    /// executed, 127 when it is not found in the guest.
    Run {
        /// Host directory to use as the guest's root filesystem.
        #[arg(long, value_name = "DIR", conflicts_with = "image")]
        rootfs: Option<PathBuf>,
        /// Run an OCI image (e.g. registry.example/app:1): its layers as a
        /// writable rootfs discarded afterwards, its configuration for CMD.
        /// A pull shows a progress bar per layer when stdout is a terminal.
        #[arg(long, value_name = "REF")]
        image: Option<String>,
        /// When to pull the image: missing (not in the store), always, never.
        #[arg(long, value_enum, default_value_t = runv::run::image::PullPolicy::Missing, requires = "image")]
        pull: runv::run::image::PullPolicy,
        /// vCPUs of the microVM (default from the config: 1).
        #[arg(long, value_name = "N")]
        cpus: Option<u32>,
        /// Memory of the microVM in MiB (default from the config: 256).
        #[arg(long, value_name = "MiB")]
        memory: Option<u32>,
        /// Give CMD a terminal (and put this one in raw mode).
        #[arg(short = 't', long)]
        tty: bool,
        /// Set an environment variable for CMD (repeatable).
        #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Working directory of CMD inside the rootfs.
        #[arg(short = 'w', long, value_name = "DIR")]
        workdir: Option<String>,
        /// The command and its arguments, after `--` (with --image: the
        /// image's Cmd when left out).
        #[arg(
            required_unless_present = "image",
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        command: Vec<String>,
    },
    /// Measure what a pod costs beyond its containers, on a real sandbox.
    ///
    /// Boots a sandbox with its pause process, lets it settle, measures the
    /// guest kernel, the agent and pause in the guest, and the host
    /// processes (VMM, virtiofsd, vhost-device-vsock, the sandbox owner),
    /// plus the idle CPU over a window; prints a table, or a RuntimeClass
    /// whose overhead.podFixed covers the total with a margin.
    Overhead {
        /// table, yaml (a RuntimeClass) or json.
        #[arg(long, default_value = "table", value_parser = ["table", "yaml", "json"])]
        format: String,
        /// Seconds to let the sandbox settle before measuring.
        #[arg(long, default_value_t = 2)]
        settle: u64,
        /// Seconds over which idle CPU is measured.
        #[arg(long, default_value_t = 3)]
        window: u64,
        /// Percent added to the measured figures in the RuntimeClass.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=200))]
        margin: u32,
    },
    /// Run the built-in VMM: one KVM microVM in this process.
    ///
    /// Sandboxes start it with the built-in hypervisor backend; it can also
    /// be run by hand (or as the lighter `runv-vmm` binary). It sets the VM
    /// up, drops every capability, installs a seccomp filter and runs the
    /// guest. Exit status: 0 when the guest reset or shut down (how runv
    /// guests stop), 2 when stopped through the control socket, 1 on any
    /// failure (one line on stderr).
    Vmm(runv::vmm::process::VmmArgs),
    /// Serve the CRI (v1) on a Unix socket: the kubelet's or crictl's
    /// endpoint for nodes without containerd.
    ///
    /// Pods run on containerd-shim-runv-v2 (one microVM each), images come
    /// from OCI registries, pod networks from CNI; exec, attach and
    /// port-forward stream over WebSocket from the streaming server. Runs
    /// until SIGINT or SIGTERM; pods keep running and a restarted server
    /// takes them back.
    Cri {
        /// The socket to serve on.
        #[arg(long, default_value = "/run/runv/cri.sock", value_name = "PATH")]
        listen: PathBuf,
        /// Serve Prometheus metrics on http://ADDRESS/metrics (host:port;
        /// port 0 picks one, printed at start). Off when not given.
        #[arg(long, value_name = "ADDRESS")]
        metrics_address: Option<String>,
    },
    /// Serve Prometheus metrics for every runv sandbox containerd runs on
    /// this node, read from the shims' state under runtime_dir (as
    /// kata-monitor does for Kata): VM boot by backend, agent call latency
    /// and errors, host memory and CPU per sandbox process. Runs until
    /// SIGINT or SIGTERM.
    Monitor {
        /// Serve on http://ADDRESS/metrics (host:port; port 0 picks one,
        /// printed at start).
        #[arg(long, value_name = "ADDRESS")]
        metrics_address: String,
    },
    /// Run CMD as root in a sandbox's guest, outside every container.
    ///
    /// Needs `debug_console = true` in the config the sandbox started with
    /// (off by default; for debugging and the attack tests). SOCKET is the
    /// sandbox's `vsock.sock` (runtime_dir/sandboxes/<id>/jail/vsock.sock). CMD runs
    /// from the guest's own files, e.g. a container's rootfs under
    /// /run/runv/shared/<container>/rootfs; its output is printed and its
    /// exit status returned.
    DebugConsole {
        /// The sandbox's vsock socket.
        socket: PathBuf,
        /// The command and its arguments, after `--`.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Report what this host offers runv and whether KVM can boot the guest.
    ///
    /// Exit status 0 when sandboxes can run (perhaps only under TCG
    /// software emulation), 1 when not.
    Check {
        /// Exit 1 unless KVM can boot the guest (no TCG fallback).
        #[arg(long)]
        require_kvm: bool,
    },
}

/// The async runtime a command runs on; None (the reason printed) when it
/// cannot start.
fn async_runtime(mut builder: tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    match builder.enable_all().build() {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("runv: error: starting the async runtime: {e}");
            None
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("runv: error: {e}");
            return ExitCode::from(EXIT_RUNV_ERROR as u8);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUNV_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log_level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();

    match cli.command {
        Command::Vmm(args) => runv::vmm::process::main(args, &config),
        Command::Cri { listen, metrics_address } => {
            let Some(runtime) = async_runtime(tokio::runtime::Builder::new_multi_thread()) else {
                return ExitCode::from(EXIT_RUNV_ERROR as u8);
            };
            match runtime.block_on(runv::cri::serve(
                &listen,
                config.clone(),
                cli.config.as_deref(),
                metrics_address.as_deref(),
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("runv: error: {e:#}");
                    ExitCode::from(EXIT_RUNV_ERROR as u8)
                }
            }
        }
        Command::Monitor { metrics_address } => {
            let Some(runtime) = async_runtime(tokio::runtime::Builder::new_current_thread()) else {
                return ExitCode::from(EXIT_RUNV_ERROR as u8);
            };
            match runtime.block_on(runv::monitor::serve(&metrics_address, &config.runtime_dir)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("runv: error: {e:#}");
                    ExitCode::from(EXIT_RUNV_ERROR as u8)
                }
            }
        }
        Command::DebugConsole { socket, command } => {
            let Some(runtime) = async_runtime(tokio::runtime::Builder::new_current_thread()) else {
                return ExitCode::from(EXIT_RUNV_ERROR as u8);
            };
            match runtime.block_on(runv::sandbox::debug_console::run(&socket, &command)) {
                Ok((output, status)) => {
                    use std::io::Write;
                    let _ = std::io::stdout().write_all(&output);
                    ExitCode::from(status.clamp(0, 255) as u8)
                }
                Err(e) => {
                    eprintln!("runv: error: debug console {}: {e}", socket.display());
                    ExitCode::from(EXIT_RUNV_ERROR as u8)
                }
            }
        }
        Command::Check { require_kvm } => {
            let report = runv::check::check(&config);
            for f in &report.findings {
                let tag = match f.level {
                    Level::Ok => "ok  ",
                    Level::Warn => "warn",
                    Level::Fail => "FAIL",
                };
                println!("{tag} {:<19} {}", f.item, f.detail);
            }
            println!("{}", report.verdict());
            let ok = report.ready() && (!require_kvm || report.kvm_boots_guest || report.builtin_boots_guest);
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Overhead { format, settle, window, margin } => {
            let Some(runtime) = async_runtime(tokio::runtime::Builder::new_current_thread()) else {
                return ExitCode::from(EXIT_RUNV_ERROR as u8);
            };
            let measured = runtime.block_on(runv::overhead::measure(
                &config,
                std::time::Duration::from_secs(settle),
                std::time::Duration::from_secs(window.max(1)),
            ));
            match measured {
                Ok(o) => {
                    match format.as_str() {
                        "yaml" => print!("{}", o.runtime_class_yaml(margin)),
                        "json" => println!("{}", serde_json::to_string_pretty(&o).unwrap_or_default()),
                        _ => print!("{}", o.table(margin)),
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("runv: error: measuring the overhead: {e:#}");
                    ExitCode::from(EXIT_RUNV_ERROR as u8)
                }
            }
        }
        Command::Run { rootfs, image, pull, cpus, memory, tty, env, workdir, command } => {
            // One thread: helpers are tied to the thread that starts them
            // (PR_SET_PDEATHSIG), which must outlive them.
            let Some(runtime) = async_runtime(tokio::runtime::Builder::new_current_thread()) else {
                return ExitCode::from(EXIT_RUNV_ERROR as u8);
            };
            let opts = RunOptions { rootfs, image, pull, cpus, memory_mib: memory, tty, env, workdir, command };
            let status = match runtime.block_on(runv::run::run(&config, opts)) {
                Ok(status) => status,
                Err(e) => {
                    eprintln!("runv: error: {e}");
                    e.status
                }
            };
            // Blocking stdin reads must not hold the exit.
            runtime.shutdown_background();
            ExitCode::from(status.clamp(0, 255) as u8)
        }
    }
}
