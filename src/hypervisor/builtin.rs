//! The built-in VMM backend: each sandbox's VM is a `runv-vmm` process
//! (its own, confined), with the agent's vsock served by the VMM itself
//! (hybrid vsock on the sandbox's socket) and the shared directory by the
//! sandbox's virtiofsd through the VMM's vhost-user-fs frontend.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use runv_proto::guest;

use super::{Hypervisor, HypervisorError, VmConfig, VmExit};
use crate::helper::{HelperExit, HelperProcess};

/// `runv-vmm`'s exit status when it was stopped through its socket.
const EXIT_STOPPED: i32 = 2;

pub struct Builtin {
    vmm: PathBuf,
    api_socket: Option<PathBuf>,
    vm: Option<HelperProcess>,
}

impl Builtin {
    pub fn new(vmm: &Path) -> Self {
        Self { vmm: vmm.to_path_buf(), api_socket: None, vm: None }
    }

    /// The `runv-vmm` command line for `vm`.
    pub fn command(&self, vm: &VmConfig) -> Command {
        let mut cmd = Command::new(&self.vmm);
        // Jailed, the VMM runs in the jail directory and names its sockets
        // relative to it: the same names before and after its pivot_root.
        let socket = |path: &Path| -> PathBuf {
            match &vm.jail {
                Some(_) => path.file_name().map(PathBuf::from).unwrap_or_default(),
                None => path.to_path_buf(),
            }
        };
        cmd.arg("--kernel")
            .arg(&vm.kernel)
            .args(["--initramfs", "none"])
            .arg("--disk")
            .arg(agent_disk_arg(&vm.agent_image))
            .args(["--cmdline", &vm.cmdline])
            .args(["--vcpus", &vm.vcpus.to_string()])
            .args(["--memory", &vm.memory_mib.to_string()])
            .arg("--console")
            .arg(vm.console_path())
            .arg("--vsock")
            .arg(socket(&vm.vsock_socket))
            .args(["--vsock-cid", &guest::GUEST_CID.to_string()])
            .arg("--api-socket")
            .arg(socket(&api_socket(vm)));
        if let Some(sock) = &vm.shared_fs_socket {
            cmd.arg("--fs-socket").arg(socket(sock)).args(["--fs-tag", &vm.shared_fs_tag]);
        }
        for net in &vm.net_devices {
            let mut arg = format!("fd={},mac={}", net.tap_fd, net.mac);
            for (key, rate) in [("rx_rate", net.rx_rate), ("tx_rate", net.tx_rate)] {
                if let Some(rate) = rate {
                    arg.push_str(&format!(",{key}={rate}"));
                }
            }
            cmd.arg("--net").arg(arg);
        }
        if let Some(jail) = &vm.jail {
            cmd.arg("--jail").arg(jail.vmm_arg()).current_dir(jail.root());
            jail.join_cgroups(&mut cmd);
        }
        // The VMM inherits the taps and the console pipe under the same numbers.
        let fds: Vec<_> = vm.net_devices.iter().map(|n| n.tap_fd).chain(vm.console_fd).collect();
        crate::helper::inherit_fds(&mut cmd, fds);
        cmd
    }
}

/// `runv-vmm --disk` for the agent's image: read-only (the VMM splits the
/// option at the last comma, so a path with commas in it stays whole).
pub fn agent_disk_arg(image: &Path) -> std::ffi::OsString {
    let mut arg = image.as_os_str().to_owned();
    arg.push(",ro");
    arg
}

/// The VMM's control socket, beside the vsock socket.
fn api_socket(vm: &VmConfig) -> PathBuf {
    vm.vsock_socket.with_file_name("vmm.sock")
}

fn exit_of(status: HelperExit) -> VmExit {
    match status.code() {
        Some(0) => VmExit::GuestShutdown,
        Some(EXIT_STOPPED) => VmExit::Stopped,
        _ => VmExit::Failed(status.to_string()),
    }
}

#[async_trait::async_trait]
impl Hypervisor for Builtin {
    fn describe(&self) -> String {
        "runv-vmm/kvm".into()
    }

    async fn start(&mut self, vm: &VmConfig) -> Result<(), HypervisorError> {
        let cmd = self.command(vm);
        self.api_socket = Some(api_socket(vm));
        self.vm = Some(HelperProcess::spawn("runv-vmm", cmd, &vm.work_dir.join("vmm.log"))?);
        Ok(())
    }

    fn try_exit(&mut self) -> Option<VmExit> {
        self.vm.as_mut()?.try_wait().map(exit_of)
    }

    async fn stop(&mut self, grace: Duration) -> VmExit {
        let Some(vm) = self.vm.as_mut() else { return VmExit::Failed("never started".into()) };
        if let Some(status) = vm.wait_timeout(grace).await {
            return exit_of(status);
        }
        // Ask the VMM to stop its vCPUs, then make sure.
        if let Some(sock) = &self.api_socket {
            // Jailed, the VMM's uid owns the directory: no symlink is followed.
            if let Ok(mut s) = crate::jailer::connect_nofollow(sock) {
                let _ = s.write_all(b"stop\n");
            }
        }
        match vm.wait_timeout(Duration::from_millis(500)).await {
            Some(status) => match exit_of(status) {
                VmExit::GuestShutdown => VmExit::GuestShutdown,
                _ => VmExit::Stopped,
            },
            None => {
                vm.kill();
                VmExit::Stopped
            }
        }
    }

    /// The process runv started and, jailed, the VMM it continues as: the
    /// init of the jail's PID namespace, its only child.
    fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.vm.iter().filter_map(HelperProcess::pid).collect();
        if let Some(&pid) = pids.first() {
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
            pids.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
        pids
    }

    fn vm_pid(&self) -> Option<u32> {
        self.vm.as_ref().and_then(HelperProcess::pid)
    }

    fn kill(&mut self) {
        // Jailed, this is the reaper: its death ends the VMM too.
        if let Some(vm) = self.vm.as_mut() {
            vm.kill();
        }
    }

    fn diagnostics(&self) -> String {
        self.vm.as_ref().map(|vm| vm.log_tail(3)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::NetDeviceConfig;

    fn vm() -> VmConfig {
        VmConfig {
            kernel: "/k/vmlinux".into(),
            agent_image: "/k/agent.img".into(),
            cmdline: "console=ttyS0 reboot=k".into(),
            vcpus: 2,
            memory_mib: 300,
            work_dir: "/w".into(),
            console_log: "/w/console.log".into(),
            console_fd: None,
            vsock_socket: "/w/vsock.sock".into(),
            shared_fs_socket: Some("/w/fs.sock".into()),
            shared_fs_tag: "runv".into(),
            net_devices: vec![],
            jail: None,
        }
    }

    #[test]
    fn the_vmm_gets_the_vm_its_vsock_and_its_shared_directory() {
        let b = Builtin::new(Path::new("runv-vmm"));
        let cmd = b.command(&vm());
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let joined = args.join(" ");
        for needle in [
            "--kernel /k/vmlinux",
            "--initramfs none",
            "--disk /k/agent.img,ro",
            "--vcpus 2",
            "--memory 300",
            "--console /w/console.log",
            "--vsock /w/vsock.sock",
            "--vsock-cid 3",
            "--fs-socket /w/fs.sock --fs-tag runv",
            "--api-socket /w/vmm.sock",
        ] {
            assert!(joined.contains(needle), "missing '{needle}' in {joined}");
        }
        assert!(args.contains(&"console=ttyS0 reboot=k".to_string()));
    }

    #[test]
    fn each_tap_becomes_a_virtio_net_device_with_the_pod_mac() {
        let b = Builtin::new(Path::new("runv-vmm"));
        let mut with_net = vm();
        with_net.net_devices.push(NetDeviceConfig {
            tap_fd: 7,
            mac: "02:42:0a:00:00:05".into(),
            rx_rate: None,
            tx_rate: None,
        });
        with_net.net_devices.push(NetDeviceConfig {
            tap_fd: 9,
            mac: "02:42:0a:00:01:05".into(),
            rx_rate: Some(1 << 20),
            tx_rate: None,
        });
        let args: Vec<String> = b.command(&with_net).get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let joined = args.join(" ");
        assert!(
            joined.contains("--net fd=7,mac=02:42:0a:00:00:05 --net fd=9,mac=02:42:0a:00:01:05,rx_rate=1048576"),
            "{joined}"
        );
        // What the VMM parses is what the backend writes.
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            vmm: crate::vmm::process::VmmArgs,
        }
        let parsed = Cli::try_parse_from(std::iter::once("runv-vmm".to_string()).chain(args)).unwrap();
        assert_eq!(parsed.vmm.nets.iter().map(|n| n.tap_fd).collect::<Vec<_>>(), [7, 9]);
    }
}
