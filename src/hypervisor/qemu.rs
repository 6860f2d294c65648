//! The QEMU backend: `qemu-system-x86_64 -M microvm`, with the agent's vsock
//! served by vhost-device-vsock (hybrid vsock on the host) and the shared
//! directory by a vhost-user-fs daemon.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use runv_proto::guest;

use super::{exit_from_status, Hypervisor, HypervisorError, VmConfig, VmExit};
use crate::helper::{wait_for_path, HelperProcess};

/// How long a freshly started helper may take to create its socket.
const HELPER_SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Qemu {
    qemu: PathBuf,
    vhost_vsock: PathBuf,
    accel: &'static str,
    agent_socket: PathBuf,
    vsock: Option<HelperProcess>,
    vm: Option<HelperProcess>,
}

impl Qemu {
    pub fn new(qemu: &Path, vhost_vsock: &Path, accel: &'static str) -> Self {
        Self {
            qemu: qemu.to_path_buf(),
            vhost_vsock: vhost_vsock.to_path_buf(),
            accel,
            agent_socket: PathBuf::new(),
            vsock: None,
            vm: None,
        }
    }

    /// The QEMU command line for `vm`; `vsock_socket` is the vhost-user
    /// socket of the vsock backend, if any.
    pub fn command(&self, vm: &VmConfig, vsock_socket: Option<&Path>) -> Command {
        let mut cmd = Command::new(&self.qemu);
        let mem = format!("{}M", vm.memory_mib);
        // vhost-user devices need guest memory the backend can map: a shared
        // memfd. microvm only lists virtio-mmio devices on the kernel command
        // line with ACPI off, and only modern virtio suits vhost-user.
        cmd.args(["-M", "microvm,acpi=off,memory-backend=mem"])
            .args(["-accel", self.accel])
            .args(["-cpu", if self.accel == "kvm" { "host" } else { "max" }])
            .args(["-smp", &vm.vcpus.to_string()])
            .args(["-m", &mem])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            ])
            .args(["-global", "virtio-mmio.force-legacy=false"])
            .args(["-kernel"])
            .arg(&vm.kernel)
            .args(["-initrd"])
            .arg(&vm.initramfs)
            .args(["-append", &vm.cmdline])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .args(["-serial", &format!("file:{}", vm.console_log.display())]);
        if let Some(sock) = vsock_socket {
            cmd.args([
                "-chardev",
                &format!("socket,id=vsock,path={}", sock.display()),
            ])
            .args(["-device", "vhost-user-vsock-device,chardev=vsock"]);
        }
        if let Some(sock) = &vm.shared_fs_socket {
            cmd.args(["-chardev", &format!("socket,id=fs,path={}", sock.display())])
                .args([
                    "-device",
                    &format!("vhost-user-fs-device,chardev=fs,tag={}", vm.shared_fs_tag),
                ]);
        }
        cmd
    }

    async fn start_vsock(&mut self, vm: &VmConfig) -> Result<PathBuf, HypervisorError> {
        let socket = vm.work_dir.join("vhost-vsock.sock");
        let mut cmd = Command::new(&self.vhost_vsock);
        cmd.arg(format!("--guest-cid={}", guest::GUEST_CID))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--uds-path={}", self.agent_socket.display()));
        let mut helper = HelperProcess::spawn(
            "vhost-device-vsock",
            cmd,
            &vm.work_dir.join("vhost-vsock.log"),
        )?;
        let ready = wait_for_path(&mut helper, &socket, HELPER_SOCKET_TIMEOUT).await;
        self.vsock = Some(helper);
        ready.map_err(HypervisorError::Start)?;
        Ok(socket)
    }
}

#[async_trait::async_trait]
impl Hypervisor for Qemu {
    fn describe(&self) -> String {
        format!("qemu/{}", self.accel)
    }

    async fn start(&mut self, vm: &VmConfig) -> Result<(), HypervisorError> {
        self.agent_socket = vm.work_dir.join("vsock.sock");
        let result = async {
            let vsock_socket = self.start_vsock(vm).await?;
            let cmd = self.command(vm, Some(&vsock_socket));
            self.vm = Some(HelperProcess::spawn(
                "qemu",
                cmd,
                &vm.work_dir.join("qemu.log"),
            )?);
            Ok(())
        }
        .await;
        if result.is_err() {
            self.stop(Duration::ZERO).await;
        }
        result
    }

    fn agent_socket(&self) -> PathBuf {
        self.agent_socket.clone()
    }

    fn try_exit(&mut self) -> Option<VmExit> {
        self.vm.as_mut()?.try_wait().map(exit_from_status)
    }

    async fn stop(&mut self, grace: Duration) -> VmExit {
        let exit = match self.vm.as_mut() {
            Some(vm) => match vm.wait_timeout(grace).await {
                Some(status) => exit_from_status(status),
                None => {
                    vm.kill();
                    VmExit::Stopped
                }
            },
            None => VmExit::Failed("never started".into()),
        };
        if let Some(mut vsock) = self.vsock.take() {
            vsock.terminate(Duration::from_millis(500)).await;
        }
        exit
    }

    fn diagnostics(&self) -> String {
        self.vm
            .as_ref()
            .map(|vm| vm.log_tail(3))
            .unwrap_or_default()
    }
}
