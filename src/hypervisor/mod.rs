//! Hypervisor backends: one trait, with the built-in VMM (`runv-vmm`) and
//! QEMU behind it.

mod builtin;
mod qemu;

use std::path::PathBuf;
use std::time::Duration;

pub use builtin::{agent_disk_arg, Builtin};
pub use qemu::{Connected, Qemu, QEMU_SANDBOX};

use crate::config::Accel;
use crate::helper::HelperExit;

/// What a backend needs to start one sandbox's VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    /// The guest's root disk: the agent's read-only image, attached
    /// read-only as the first virtio-blk device (`/dev/vda`).
    pub agent_image: PathBuf,
    pub cmdline: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Directory for the VM's sockets and logs (owned by the sandbox).
    pub work_dir: PathBuf,
    /// Guest console output goes here, unless `console_fd` is set.
    pub console_log: PathBuf,
    /// The write end of a pipe the VM process inherits for the console
    /// (the sandbox reads the other end into a bounded log).
    pub console_fd: Option<std::os::fd::RawFd>,
    /// Host Unix socket of the guest's hybrid vsock: the host connects here
    /// and writes `CONNECT <port>\n`; guest-initiated connections to port P
    /// arrive at `<vsock_socket>_P`.
    pub vsock_socket: PathBuf,
    /// vhost-user socket of the virtio-fs daemon serving the shared dir.
    pub shared_fs_socket: Option<PathBuf>,
    pub shared_fs_tag: String,
    /// virtio-net devices, each on a tap the VM process inherits.
    pub net_devices: Vec<NetDeviceConfig>,
    /// The sandbox's confinement; None runs everything as the caller. With
    /// a jail, every socket above is in the jail directory.
    pub jail: Option<std::sync::Arc<crate::jailer::Jail>>,
}

impl VmConfig {
    /// The path the VM process opens for its console.
    pub fn console_path(&self) -> PathBuf {
        match self.console_fd {
            Some(fd) => PathBuf::from(format!("/proc/self/fd/{fd}")),
            None => self.console_log.clone(),
        }
    }
}

/// One virtio-net device: an open tap queue and the guest NIC's MAC.
#[derive(Clone, Debug)]
pub struct NetDeviceConfig {
    pub tap_fd: std::os::fd::RawFd,
    pub mac: String,
    /// Most bytes a second into the guest (`net_rx_rate_limit`); None: unlimited.
    pub rx_rate: Option<u64>,
    /// Most bytes a second out of the guest (`net_tx_rate_limit`).
    pub tx_rate: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("{0}")]
    Start(String),
    #[error(transparent)]
    Spawn(#[from] crate::helper::SpawnError),
}

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest rebooted or powered off, which runv guests do to stop.
    GuestShutdown,
    /// runv stopped the VM (after the agent had shut the guest down, or
    /// because it did not).
    Stopped,
    /// The VM process failed or was killed; the status says how.
    Failed(String),
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::GuestShutdown => f.write_str("the guest shut down"),
            VmExit::Stopped => f.write_str("stopped by runv"),
            VmExit::Failed(how) => write!(f, "the VM process ended: {how}"),
        }
    }
}

/// A running VM as a backend presents it to the sandbox.
#[async_trait::async_trait]
pub trait Hypervisor: Send {
    /// Short name for messages ("qemu/tcg").
    fn describe(&self) -> String;
    /// Starts the VM; on error nothing is left running.
    async fn start(&mut self, vm: &VmConfig) -> Result<(), HypervisorError>;
    /// How the VM ended, if it has.
    fn try_exit(&mut self) -> Option<VmExit>;
    /// Waits up to `grace` for the VM to end by itself, then stops it, and
    /// stops every helper process the backend started.
    async fn stop(&mut self, grace: Duration) -> VmExit;
    /// The last lines the VM process printed, for error messages.
    fn diagnostics(&self) -> String;
    /// Host pids of the VM process and its helpers, for cleanup by a
    /// process that outlives this one (the shim's `delete`).
    fn pids(&self) -> Vec<u32>;
    /// Host pid of the VM process.
    fn vm_pid(&self) -> Option<u32>;
    /// Kills the VM process at once; its end then shows in `try_exit`.
    fn kill(&mut self);
    /// A helper process the VM cannot run without that has ended: its
    /// name and how.
    fn helper_exit(&mut self) -> Option<String> {
        None
    }
}

fn exit_from_status(exit: HelperExit) -> VmExit {
    if exit.success() {
        VmExit::GuestShutdown
    } else {
        VmExit::Failed(exit.to_string())
    }
}

/// Which QEMU accelerator to use for `accel`, and whether that choice is a
/// fallback the user should hear about.
pub fn choose_accel(
    accel: Accel,
    kvm_boots_guest: impl FnOnce() -> Result<(), String>,
) -> (&'static str, Option<String>) {
    match accel {
        Accel::Kvm => ("kvm", None),
        Accel::Tcg => ("tcg", None),
        Accel::Auto => match kvm_boots_guest() {
            Ok(()) => ("kvm", None),
            Err(why) => (
                "tcg",
                Some(format!(
                    "KVM cannot boot the guest here ({why}); using QEMU TCG software emulation (slow). Set accel = \"tcg\" in the config to silence this."
                )),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_accelerators_never_probe() {
        let probe = || -> Result<(), String> { panic!("probed") };
        assert_eq!(choose_accel(Accel::Kvm, probe), ("kvm", None));
        assert_eq!(choose_accel(Accel::Tcg, probe), ("tcg", None));
    }

    #[test]
    fn auto_falls_back_to_tcg_with_the_reason() {
        assert_eq!(choose_accel(Accel::Auto, || Ok(())), ("kvm", None));
        let (accel, warning) = choose_accel(Accel::Auto, || Err("emulation failure".into()));
        assert_eq!(accel, "tcg");
        assert!(warning.unwrap().contains("emulation failure"));
    }
}
