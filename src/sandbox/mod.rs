//! One pod's microVM: its work directory, the shared-directory daemon, the
//! hypervisor, and the agent client. Dropping a `Sandbox` kills whatever it
//! started and removes its directory, on every path.

pub mod agent;
mod console;
pub mod debug_console;
pub mod port_forward;
pub mod sizing;
mod virtiofsd;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runv_proto::guest;

pub use agent::{AgentClient, AgentError};
use virtiofsd::Virtiofsd;

use crate::config::{Config, HypervisorKind};
use crate::helper::log_tail;
use crate::hypervisor::{self, Builtin, Hypervisor, HypervisorError, NetDeviceConfig, Qemu, VmConfig, VmExit};
use crate::jailer::{Jail, JailError};
use crate::network::{NetworkError, PodNetwork};

/// How long a guest whose agent did not answer the shutdown call may take
/// to end by itself before the VM is killed.
const UNACKNOWLEDGED_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// What a sandbox is made of.
#[derive(Clone, Debug)]
pub struct SandboxSpec {
    /// Host directory shared into the guest over virtio-fs.
    pub shared_dir: PathBuf,
    /// Share the directory read-only (the guest cannot change it).
    pub read_only: bool,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The pod's network namespace (made by CNI): its interfaces are
    /// bridged into the VM. None: the VM has no network device.
    pub netns: Option<PathBuf>,
    /// The pod's cgroup (relative to each hierarchy's root), which the
    /// sandbox's host processes join; None: `runv/<sandbox id>`.
    pub cgroup: Option<PathBuf>,
    /// A file `Sandbox::start` writes the sandbox directory's path to
    /// before it creates the directory, before anything is started: a
    /// cleanup after the caller died mid-boot finds the jail and its
    /// cgroups there.
    pub dir_record: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("guest kernel {0} not found (set `kernel` in the config, or run scripts/install.sh)")]
    KernelMissing(PathBuf),
    #[error("the agent's image {0} not found (set `agent_image` in the config, or run scripts/install.sh)")]
    AgentImageMissing(PathBuf),
    #[error("shared directory {0} does not exist or is not a directory")]
    SharedDirMissing(PathBuf),
    #[error("{0}")]
    Unsupported(String),
    #[error("creating sandbox directory {path}: {source}")]
    WorkDir { path: PathBuf, source: std::io::Error },
    #[error("starting virtiofsd: {0}")]
    Virtiofsd(String),
    #[error("starting the VM: {0}")]
    Hypervisor(#[from] HypervisorError),
    #[error("the guest agent did not answer within {timeout:?} ({what}); last console lines: {console}")]
    BootTimeout { timeout: Duration, what: String, console: String },
    #[error("the VM exited while booting ({exit:?}); last console lines: {console}; {diagnostics}")]
    VmExited { exit: VmExit, console: String, diagnostics: String },
    #[error("agent: {0}")]
    Agent(#[from] AgentError),
    #[error("confining the sandbox: {0}")]
    Jail(#[from] JailError),
    #[error("pod network: {0}")]
    Network(#[from] NetworkError),
}

pub struct Sandbox {
    id: String,
    dir: PathBuf,
    console_log: PathBuf,
    console: Option<console::ConsoleLog>,
    hypervisor: Box<dyn Hypervisor>,
    virtiofsd: Option<Virtiofsd>,
    agent: Option<AgentClient>,
    network: Option<PodNetwork>,
    /// What ended the sandbox, once something has (see `fault`).
    fault: Option<String>,
    /// When `fault` first saw a helper gone.
    helper_gone_at: Option<Instant>,
    /// VM start to the agent's readiness.
    boot_time: Duration,
    /// Last, so that it goes after every process it confines: dropping it
    /// kills what is left in the sandbox's cgroup and removes the cgroup.
    jail: Option<Arc<Jail>>,
}

impl Sandbox {
    /// Boots a sandbox and waits until its agent answers. On error nothing
    /// it started is left behind; the same holds if the future is dropped.
    pub async fn start(config: &Config, spec: &SandboxSpec) -> Result<Self, SandboxError> {
        if !config.kernel.is_file() {
            return Err(SandboxError::KernelMissing(config.kernel.clone()));
        }
        if !config.agent_image.is_file() {
            return Err(SandboxError::AgentImageMissing(config.agent_image.clone()));
        }
        if !spec.shared_dir.is_dir() {
            return Err(SandboxError::SharedDirMissing(spec.shared_dir.clone()));
        }
        let hypervisor = select_hypervisor(config).await?;
        let id = new_sandbox_id();
        let dir = config.runtime_dir.join("sandboxes").join(&id);
        // Recorded before it exists: the owner can be killed at any point
        // after this, and cleanup after it (`shim delete`) must find every
        // directory that may have been made (a recorded one that never was
        // is nothing to remove).
        if let Some(record) = &spec.dir_record {
            crate::helper::write_private(record, dir.to_string_lossy().as_bytes())
                .map_err(|source| SandboxError::WorkDir { path: record.clone(), source })?;
        }
        create_private_dir(&dir).map_err(|source| SandboxError::WorkDir { path: dir.clone(), source })?;
        let mut sandbox = Sandbox {
            id,
            console_log: dir.join("console.log"),
            console: None,
            dir,
            hypervisor,
            virtiofsd: None,
            agent: None,
            network: None,
            fault: None,
            helper_gone_at: None,
            boot_time: Duration::ZERO,
            jail: None,
        };
        sweep_orphans(&config.runtime_dir.join("sandboxes"), &sandbox.dir);
        let owner = crate::helper::ProcessIdentity::of(std::process::id()).map(|o| o.record()).unwrap_or_default();
        crate::helper::write_private(&sandbox.dir.join(OWNER_RECORD), owner.as_bytes())
            .map_err(|source| SandboxError::WorkDir { path: sandbox.dir.join(OWNER_RECORD), source })?;
        if config.jail {
            let jail = Jail::create(config, &sandbox.dir, &sandbox.id, spec.cgroup.as_deref())?;
            sandbox.jail = Some(Arc::new(jail));
        }
        if let Some(netns) = &spec.netns {
            let netns = netns.clone();
            let network = tokio::task::spawn_blocking(move || PodNetwork::attach(&netns))
                .await
                .map_err(|e| SandboxError::Unsupported(format!("pod network setup panicked: {e}")))??;
            sandbox.network = Some(network);
        }
        sandbox.boot(config, spec).await?;
        Ok(sandbox)
    }

    async fn boot(&mut self, config: &Config, spec: &SandboxSpec) -> Result<(), SandboxError> {
        let jail = self.jail.clone();
        // Every socket the VM process uses is in its jail directory.
        let socket_dir = jail.as_ref().map_or(self.dir.clone(), |j| j.root().to_path_buf());
        let virtiofsd = Virtiofsd::start(
            &config.virtiofsd,
            &spec.shared_dir,
            spec.read_only,
            &self.dir,
            &socket_dir,
            jail.as_deref(),
        )
        .await
        .map_err(SandboxError::Virtiofsd)?;
        let mut cmdline = guest::KERNEL_CMDLINE_BASE.to_string();
        if config.debug_console {
            tracing::warn!(sandbox = %self.id, "debug_console is on: root in this guest is one host command away");
            cmdline.push(' ');
            cmdline.push_str(guest::DEBUG_CONSOLE_CMDLINE_FLAG);
        }
        if !config.kernel_params.trim().is_empty() {
            cmdline.push(' ');
            cmdline.push_str(config.kernel_params.trim());
        }
        let vsock_socket = socket_dir.join(VSOCK_SOCKET);
        // Listen for the agent's readiness call before the guest can make it.
        let ready_name = format!("{VSOCK_SOCKET}_{}", guest::AGENT_READY_VSOCK_PORT);
        let ready_path = socket_dir.join(&ready_name);
        let ready = tokio::net::UnixListener::bind(&ready_path)
            .map_err(|source| SandboxError::WorkDir { path: ready_path.clone(), source })?;
        if let Some(jail) = &jail {
            // The VM process connects to it as the jail's uid.
            jail.give(&ready_name)?;
            jail.give(virtiofsd::SOCKET)?;
        }
        let console = console::ConsoleLog::start(&self.console_log, config.console_log_max_kib << 10)
            .map_err(|source| SandboxError::WorkDir { path: self.console_log.clone(), source })?;
        let vm = VmConfig {
            kernel: config.kernel.clone(),
            agent_image: config.agent_image.clone(),
            cmdline,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            work_dir: self.dir.clone(),
            console_log: self.console_log.clone(),
            console_fd: console.write_fd(),
            vsock_socket: vsock_socket.clone(),
            shared_fs_socket: Some(virtiofsd.socket().to_path_buf()),
            shared_fs_tag: guest::SHARED_FS_TAG.to_string(),
            net_devices: self
                .network
                .iter()
                .flat_map(|n| &n.devices)
                .map(|d| NetDeviceConfig {
                    tap_fd: d.tap.as_raw_fd(),
                    mac: d.mac.clone(),
                    // 0 is no limit.
                    rx_rate: Some(config.net_rx_rate_limit).filter(|&r| r > 0),
                    tx_rate: Some(config.net_tx_rate_limit).filter(|&r| r > 0),
                })
                .collect(),
            jail,
        };
        self.virtiofsd = Some(virtiofsd);
        tracing::debug!(sandbox = %self.id, hypervisor = %self.hypervisor.describe(), "starting VM");
        let booting = Instant::now();
        let started = self.hypervisor.start(&vm).await;
        let mut console = console;
        console.close_write_end();
        self.console = Some(console);
        started?;
        let agent = self.wait_for_agent(&ready, &vsock_socket, Duration::from_secs(config.boot_timeout_secs)).await?;
        self.boot_time = booting.elapsed();
        agent.mount_shared(guest::SHARED_FS_TAG, guest::SHARED_MOUNT_POINT, spec.read_only).await?;
        if let Some(network) = &self.network {
            agent.setup_network(&network.guest).await?;
        }
        self.agent = Some(agent);
        Ok(())
    }

    /// Waits for the agent's readiness call, then connects to it. A VM that
    /// exits meanwhile, or a deadline that passes, ends the wait.
    async fn wait_for_agent(
        &mut self,
        ready: &tokio::net::UnixListener,
        vsock_socket: &Path,
        timeout: Duration,
    ) -> Result<AgentClient, SandboxError> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut announced = false;
        let mut last_error = String::from("the agent has not announced itself");
        loop {
            if let Some(exit) = self.hypervisor.try_exit() {
                return Err(SandboxError::VmExited {
                    exit,
                    console: log_tail(&self.console_log, 5),
                    diagnostics: self.hypervisor.diagnostics(),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(SandboxError::BootTimeout {
                    timeout,
                    what: last_error,
                    console: log_tail(&self.console_log, 5),
                });
            }
            if !announced {
                // Poll the VM's state every few milliseconds while waiting.
                if let Ok(Ok((mut stream, _))) = tokio::time::timeout(Duration::from_millis(20), ready.accept()).await {
                    // The connection is the announcement; its message is
                    // taken (at most one read, for at most READY_READ)
                    // before closing, so that the agent's write does not
                    // race the close and print a broken pipe on the
                    // console. The guest cannot hold the boot up longer.
                    let mut message = [0u8; 16];
                    let _ = tokio::time::timeout(READY_READ, tokio::io::AsyncReadExt::read(&mut stream, &mut message))
                        .await;
                    announced = true;
                    tracing::debug!(sandbox = %self.id, elapsed = ?started.elapsed(), "agent announced itself");
                }
                continue;
            }
            match agent::connect_hybrid_vsock(vsock_socket, guest::AGENT_VSOCK_PORT).await {
                Ok(stream) => {
                    let client = AgentClient::new(stream);
                    match client.health(Duration::from_secs(2)).await {
                        Ok(_) => {
                            tracing::debug!(sandbox = %self.id, elapsed = ?started.elapsed(), "agent ready");
                            return Ok(client);
                        }
                        Err(e) => last_error = e.to_string(),
                    }
                }
                Err(e) => last_error = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// What the sandbox measured of itself so far (`crate::figures`): its
    /// backend, boot time and agent calls; no pod or namespace.
    pub fn figures(&self) -> crate::figures::SandboxFigures {
        crate::figures::SandboxFigures {
            backend: self.hypervisor.describe(),
            boot_seconds: self.boot_time.as_secs_f64(),
            agent_calls: self.agent.as_ref().map(|a| a.calls().snapshot()).unwrap_or_default(),
            ..Default::default()
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Host pids of every process the sandbox runs (VM, helpers).
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = self.hypervisor.pids();
        pids.extend(self.virtiofsd.as_ref().and_then(Virtiofsd::pid));
        pids
    }

    /// The pod network as bridged into the VM, if the sandbox has one.
    pub fn network(&self) -> Option<&PodNetwork> {
        self.network.as_ref()
    }

    pub fn vm_pid(&self) -> Option<u32> {
        self.hypervisor.vm_pid()
    }

    pub fn describe_hypervisor(&self) -> String {
        self.hypervisor.describe()
    }

    pub fn agent(&self) -> &AgentClient {
        self.agent.as_ref().expect("a started sandbox has an agent")
    }

    /// How the VM ended, if it has (a guest crash, a killed VMM).
    pub fn vm_exit(&mut self) -> Option<VmExit> {
        self.hypervisor.try_exit()
    }

    /// What ended the sandbox, if something has: the VM's end, or the end
    /// of a helper the VM cannot run without (virtiofsd, the vsock
    /// backend), after which the VM is killed, so that the sandbox ends as
    /// one and every process in it is reported lost (as Kata does when
    /// virtiofsd dies). The first answer sticks.
    ///
    /// A helper also ends by itself when the VM goes (it sees its peer
    /// leave), a moment before the VM is reaped: a helper is blamed only
    /// once it has been gone for a second with the VM still running.
    pub fn fault(&mut self) -> Option<String> {
        if self.fault.is_some() {
            return self.fault.clone();
        }
        if let Some(exit) = self.hypervisor.try_exit() {
            self.fault = Some(vm_end(&exit, &log_tail(&self.console_log, 3), &self.hypervisor.diagnostics()));
            return self.fault.clone();
        }
        let helper = match self.virtiofsd.as_mut().and_then(Virtiofsd::try_exit) {
            Some(exit) => Some(format!("virtiofsd ended ({exit})")),
            None => self.hypervisor.helper_exit(),
        };
        let why = helper?;
        let since = *self.helper_gone_at.get_or_insert_with(Instant::now);
        if since.elapsed() < HELPER_GRACE {
            return None;
        }
        self.hypervisor.kill();
        self.fault = Some(format!("{why}, so the sandbox VM was stopped"));
        self.fault.clone()
    }

    /// Asks the agent to stop every process and sync, then ends the VM,
    /// stops the helpers and removes the sandbox directory.
    ///
    /// Once the agent has acknowledged, nothing in the guest is left to
    /// save (the shared directory is written through to the host), so the
    /// VM is stopped at once rather than waiting for the guest kernel's own
    /// reboot path, as Kata and Firecracker do.
    pub async fn shutdown(mut self) -> VmExit {
        let acknowledged = match self.agent.take() {
            Some(agent) => match agent.shutdown().await {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(sandbox = %self.id, "agent shutdown: {e}");
                    false
                }
            },
            None => false,
        };
        let grace = if acknowledged { Duration::ZERO } else { UNACKNOWLEDGED_SHUTDOWN_GRACE };
        tracing::debug!(sandbox = %self.id, acknowledged, "stopping the VM");
        let exit = self.hypervisor.stop(grace).await;
        if let Some(mut fs) = self.virtiofsd.take() {
            fs.stop().await;
        }
        if let Some(network) = self.network.take() {
            let _ = tokio::task::spawn_blocking(move || network.detach()).await;
        }
        tracing::debug!(sandbox = %self.id, ?exit, "sandbox stopped");
        exit
        // Drop removes the directory.
    }
}

/// How long the host waits for the agent's readiness message on a
/// connection it has accepted.
const READY_READ: Duration = Duration::from_secs(1);

/// How a running sandbox's VM ended, with what the guest's console and the
/// VM process said last: a guest that panicked, or a vCPU that hit a triple
/// fault, says so to the client rather than only in the sandbox's logs.
fn vm_end(exit: &VmExit, console: &str, vmm: &str) -> String {
    let mut why = format!("the sandbox VM ended ({exit}");
    if !console.is_empty() {
        why += &format!("; last console lines: {console}");
    }
    if !vmm.is_empty() {
        why += &format!("; the VM process said: {vmm}");
    }
    why + ")"
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Dropping the helpers kills them, and the pod network's taps and
        // filters; the directory goes with them.
        self.virtiofsd.take();
        self.network.take();
        if std::env::var_os("RUNV_KEEP_SANDBOX_DIR").is_some() {
            eprintln!("runv: kept sandbox directory {} (RUNV_KEEP_SANDBOX_DIR)", self.dir.display());
            return;
        }
        // Missing is fine (remove_tree says nothing then).
        if let Err(e) = crate::helper::remove_tree(&self.dir) {
            tracing::warn!(sandbox = %self.id, "removing {}: {e}", self.dir.display());
        }
    }
}

/// The backend for a sandbox: under `auto`, the built-in VMM wherever it
/// runs sandboxes on this host, QEMU elsewhere.
async fn select_hypervisor(config: &Config) -> Result<Box<dyn Hypervisor>, SandboxError> {
    let builtin = || -> Box<dyn Hypervisor> { Box::new(Builtin::new(&config.vmm)) };
    match config.hypervisor {
        HypervisorKind::Builtin => Ok(builtin()),
        HypervisorKind::Qemu => Ok(qemu_backend(config)),
        HypervisorKind::Auto => match builtin_runs_sandboxes(config).await {
            Ok(()) => Ok(builtin()),
            Err(why) => {
                tracing::debug!("not using the built-in VMM: {why}");
                Ok(qemu_backend(config))
            }
        },
    }
}

fn qemu_backend(config: &Config) -> Box<dyn Hypervisor> {
    let (accel, warning) = hypervisor::choose_accel(config.accel, || crate::check::kvm_boots_guest(config));
    if let Some(w) = warning {
        eprintln!("runv: warning: {w}");
    }
    Box::new(Qemu::new(&config.qemu, &config.vhost_vsock, accel))
}

/// Whether the built-in VMM runs sandboxes on this host: it boots the guest
/// (the boot probe), and a whole sandbox on it (vsock to the agent, the
/// shared directory over virtio-fs) starts and answers. Cached per kernel,
/// agent image, QEMU and host kernel, like the boot probe.
async fn builtin_runs_sandboxes(config: &Config) -> Result<(), String> {
    let probe_config = config.clone();
    tokio::task::spawn_blocking(move || crate::check::builtin_boots_guest(&probe_config))
        .await
        .map_err(|e| format!("boot probe: {e}"))??;
    let cache = crate::check::probe_cache_path(config).with_extension("builtin-sandbox");
    // Recorded the same way as the boot probes (this probe is async).
    if let Some(answer) = crate::check::cached_answer(&cache) {
        return answer;
    }
    let mut forced = config.clone();
    forced.hypervisor = HypervisorKind::Builtin;
    let spec = SandboxSpec {
        shared_dir: config.rootfs.clone(),
        read_only: true,
        vcpus: 1,
        memory_mib: 128,
        netns: None,
        cgroup: None,
        dir_record: None,
    };
    let started = Instant::now();
    let result = match Box::pin(Sandbox::start(&forced, &spec)).await {
        Ok(sandbox) => {
            sandbox.shutdown().await;
            Ok(started.elapsed())
        }
        Err(e) => Err(crate::check::ProbeError::Failed(format!("a sandbox on the built-in VMM failed: {e}"))),
    };
    crate::check::record_probe(&cache, &result);
    result.map(|_| ()).map_err(|e| e.to_string())
}

/// How long a helper must have been gone, the VM still running, before
/// `Sandbox::fault` blames it.
const HELPER_GRACE: Duration = Duration::from_secs(1);

/// The hybrid vsock socket's name (in the jail directory, or the sandbox
/// directory when jails are off).
pub const VSOCK_SOCKET: &str = "vsock.sock";

/// The file in a sandbox owner's directory (a shim's) that names the
/// sandbox's directory (`SandboxSpec::dir_record`).
pub const DIR_RECORD: &str = "sandbox-dir";
/// The process that made a sandbox directory (pid and start time).
const OWNER_RECORD: &str = "owner";

/// Cleans up after sandboxes whose owner died without a word (a `runv run`
/// killed with SIGKILL): what is left in their cgroups, their uid leases,
/// their directories. A QEMU that changed its uid lost its parent-death
/// signal, so this is what stops it.
fn sweep_orphans(sandboxes: &Path, ours: &Path) {
    if std::env::var_os("RUNV_KEEP_SANDBOX_DIR").is_some() {
        return;
    }
    for entry in std::fs::read_dir(sandboxes).into_iter().flatten().flatten() {
        let dir = entry.path();
        if dir == ours {
            continue;
        }
        let Ok(owner) = std::fs::read_to_string(dir.join(OWNER_RECORD)) else { continue };
        let Some(owner) = crate::helper::ProcessIdentity::parse(owner.trim()) else { continue };
        if owner.is_alive() {
            continue;
        }
        tracing::info!("cleaning up sandbox {} (its runv process is gone)", dir.display());
        crate::jailer::cleanup_recorded(&dir);
        if let Err(e) = crate::helper::remove_tree(&dir) {
            tracing::warn!("removing {}: {e}", dir.display());
        }
    }
}

fn new_sandbox_id() -> String {
    let mut bytes = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut bytes);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = dir.parent() {
        crate::helper::create_private_dir_all(parent)?;
    }
    std::fs::DirBuilder::new().mode(0o700).create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_that_ended_says_what_its_console_and_its_vmm_said_last() {
        assert_eq!(vm_end(&VmExit::GuestShutdown, "", ""), "the sandbox VM ended (the guest shut down)");
        assert_eq!(
            vm_end(
                &VmExit::GuestShutdown,
                "Kernel panic - not syncing: Attempted to kill init!",
                "vcpu0: shutdown exit"
            ),
            "the sandbox VM ended (the guest shut down; last console lines: Kernel panic - not syncing: \
             Attempted to kill init!; the VM process said: vcpu0: shutdown exit)"
        );
    }
}
