//! The QEMU backend: `qemu-system-x86_64 -M microvm`, with the agent's vsock
//! served by vhost-device-vsock (hybrid vsock on the host) and the shared
//! directory by a vhost-user-fs daemon.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
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
    vsock: Option<HelperProcess>,
    vm: Option<HelperProcess>,
    /// Kills the VM if this process dies (a jailed QEMU's `-runas` drops
    /// the parent-death signal). Declared after `vm`: it goes after it.
    guard: Option<crate::jailer::Guard>,
}

/// QEMU's `-sandbox` setting (its seccomp filter, Debian's QEMU has it).
pub const QEMU_SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// The same for a jailed QEMU. QEMU installs its filter before `-runas`
/// changes its uid, so the filter must let that one change through; after
/// it the process has no capability and no_new_privs, and cannot regain
/// privilege with or without set*id calls.
pub const QEMU_SANDBOX_JAILED: &str = "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny";
/// vhost-device-vsock's sockets in the socket directory.
const VHOST_VSOCK_SOCKET: &str = "vhost-vsock.sock";

/// vhost-user backends runv connected for QEMU. A jailed QEMU starts as
/// root, and the jail directory holding the backends' sockets belongs to
/// the sandbox's uid (vhost-device-vsock runs as it): QEMU resolving a name
/// there as root could be turned by a symlink towards another host socket.
/// runv connects without following one (`jailer::connect_nofollow`) and
/// QEMU gets the connections.
#[derive(Default)]
pub struct Connected {
    vsock: Option<UnixStream>,
    fs: Option<UnixStream>,
}

impl Connected {
    async fn to(vsock: &Path, fs: Option<&Path>) -> Result<Self, HypervisorError> {
        let vsock = Some(connect_when_listening(vsock).await?);
        let fs = match fs {
            Some(path) => Some(connect_when_listening(path).await?),
            None => None,
        };
        Ok(Self { vsock, fs })
    }
}

/// Connects to a backend's socket that exists: a backend binds before it
/// listens, so a refusal within HELPER_SOCKET_TIMEOUT is waited out.
async fn connect_when_listening(path: &Path) -> Result<UnixStream, HypervisorError> {
    let deadline = std::time::Instant::now() + HELPER_SOCKET_TIMEOUT;
    loop {
        match crate::jailer::connect_nofollow(path) {
            Ok(stream) => return Ok(stream),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => return Err(HypervisorError::Start(format!("connecting to {}: {e}", path.display()))),
        }
    }
}

impl Qemu {
    pub fn new(qemu: &Path, vhost_vsock: &Path, accel: &'static str) -> Self {
        Self {
            qemu: qemu.to_path_buf(),
            vhost_vsock: vhost_vsock.to_path_buf(),
            accel,
            vsock: None,
            vm: None,
            guard: None,
        }
    }

    /// The QEMU command line for `vm`; `vsock_socket` is the vhost-user
    /// socket of the vsock backend, if any. A backend in `connected` is
    /// handed to QEMU as that connection instead of its socket's name.
    pub fn command(&self, vm: &VmConfig, vsock_socket: Option<&Path>, connected: &Connected) -> Command {
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
            .args(["-object", &format!("memory-backend-memfd,id=mem,size={mem},share=on")])
            .args(["-global", "virtio-mmio.force-legacy=false"])
            .args(["-kernel"])
            .arg(&vm.kernel)
            // The guest's root: the agent's image, read-only (QEMU opens it
            // O_RDONLY and the device tells the guest so).
            .args(["-drive", &agent_drive(&vm.agent_image)])
            .args(["-device", "virtio-blk-device,drive=agent"])
            .args(["-append", &vm.cmdline])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
            // QEMU's own seccomp filter: no obsolete syscalls, no setuid or
            // other privilege changes, no fork/exec, no scheduler or
            // resource changes, from the start of guest execution on.
            .args(["-sandbox", if vm.jail.is_some() { QEMU_SANDBOX_JAILED } else { QEMU_SANDBOX }])
            .args(["-serial", &format!("file:{}", vm.console_path().display())]);
        let chardev = |id: &str, path: &Path, conn: &Option<UnixStream>| match conn {
            Some(conn) => format!("socket,id={id},fd={}", conn.as_raw_fd()),
            None => format!("socket,id={id},path={}", path.display()),
        };
        if let Some(sock) = vsock_socket {
            cmd.args(["-chardev", &chardev("vsock", sock, &connected.vsock)])
                .args(["-device", "vhost-user-vsock-device,chardev=vsock"]);
        }
        if let Some(sock) = &vm.shared_fs_socket {
            cmd.args(["-chardev", &chardev("fs", sock, &connected.fs)])
                .args(["-device", &format!("vhost-user-fs-device,chardev=fs,tag={}", vm.shared_fs_tag)]);
        }
        for (i, net) in vm.net_devices.iter().enumerate() {
            cmd.args(["-netdev", &format!("tap,id=net{i},fd={}", net.tap_fd)])
                .args(["-device", &format!("virtio-net-device,netdev=net{i},mac={}", net.mac)]);
        }
        if let Some(jail) = &vm.jail {
            // Once its devices are open: the sandbox's uid, chrooted into
            // the jail directory; in the sandbox's cgroup from the start.
            cmd.args(jail.qemu_args());
            jail.join_cgroups(&mut cmd);
        }
        // QEMU inherits the taps, the console pipe and the connected
        // backends under the same numbers.
        let conns = [&connected.vsock, &connected.fs].into_iter().flatten().map(AsRawFd::as_raw_fd);
        let fds: Vec<_> = vm.net_devices.iter().map(|n| n.tap_fd).chain(vm.console_fd).chain(conns).collect();
        crate::helper::inherit_fds(&mut cmd, fds);
        cmd
    }

    async fn start_vsock(&mut self, vm: &VmConfig) -> Result<PathBuf, HypervisorError> {
        let mut cmd = Command::new(&self.vhost_vsock);
        let socket = match &vm.jail {
            Some(jail) => {
                // It needs no privilege: the sandbox's uid, in the jail
                // directory, where its sockets are (named relative to it:
                // the directories above are closed to that uid).
                jail.confine_unprivileged(&mut cmd);
                let uds = vm.vsock_socket.file_name().unwrap_or_default().to_string_lossy().into_owned();
                cmd.arg(format!("--socket={VHOST_VSOCK_SOCKET}")).arg(format!("--uds-path={uds}"));
                jail.host_path(VHOST_VSOCK_SOCKET)
            }
            None => {
                let socket = vm.work_dir.join(VHOST_VSOCK_SOCKET);
                cmd.arg(format!("--socket={}", socket.display()))
                    .arg(format!("--uds-path={}", vm.vsock_socket.display()));
                socket
            }
        };
        cmd.arg(format!("--guest-cid={}", guest::GUEST_CID));
        let mut helper = HelperProcess::spawn("vhost-device-vsock", cmd, &vm.work_dir.join("vhost-vsock.log"))?;
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
        if vm.net_devices.iter().any(|n| n.rx_rate.is_some() || n.tx_rate.is_some()) {
            // Never a pod without the limit it was configured with.
            return Err(HypervisorError::Start(
                "net_rx_rate_limit and net_tx_rate_limit are enforced by the built-in VMM only \
                 (hypervisor = \"builtin\"); QEMU has no per-NIC rate limiter"
                    .into(),
            ));
        }
        let result = async {
            let vsock_socket = self.start_vsock(vm).await?;
            let connected = match vm.jail {
                Some(_) => Connected::to(&vsock_socket, vm.shared_fs_socket.as_deref()).await?,
                None => Connected::default(),
            };
            let cmd = self.command(vm, Some(&vsock_socket), &connected);
            let qemu = HelperProcess::spawn("qemu", cmd, &vm.work_dir.join("qemu.log"))?;
            drop(connected);
            let pid = qemu.pid();
            self.vm = Some(qemu);
            if let (Some(jail), Some(pid)) = (&vm.jail, pid) {
                let guard = crate::jailer::Guard::start(pid, jail.uid(), jail.gid())
                    .map_err(|e| HypervisorError::Start(format!("starting the VM's guard: {e}")))?;
                self.guard = Some(guard);
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            self.stop(Duration::ZERO).await;
        }
        result
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
        self.guard.take();
        if let Some(mut vsock) = self.vsock.take() {
            vsock.terminate(Duration::from_millis(500)).await;
        }
        exit
    }

    fn pids(&self) -> Vec<u32> {
        self.vm.iter().chain(self.vsock.iter()).filter_map(HelperProcess::pid).collect()
    }

    fn vm_pid(&self) -> Option<u32> {
        self.vm.as_ref().and_then(HelperProcess::pid)
    }

    fn kill(&mut self) {
        if let Some(vm) = self.vm.as_mut() {
            vm.kill();
        }
    }

    fn helper_exit(&mut self) -> Option<String> {
        let vsock = self.vsock.as_mut()?;
        vsock.try_wait().map(|exit| format!("{} ended ({exit})", vsock.name()))
    }

    fn diagnostics(&self) -> String {
        self.vm.as_ref().map(|vm| vm.log_tail(3)).unwrap_or_default()
    }
}

/// QEMU's `-drive` for the agent's image: raw and read-only, a comma in
/// the path escaped as QEMU's option syntax wants (`,,`).
fn agent_drive(image: &Path) -> String {
    let path = image.to_string_lossy().replace(',', ",,");
    format!("file={path},if=none,id=agent,format=raw,readonly=on")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::NetDeviceConfig;

    /// A backend that has bound its socket but not listened yet (the
    /// window in which runv once failed with "Connection refused") is
    /// waited for; a missing socket is not. (A socket whose backend died
    /// fails at HELPER_SOCKET_TIMEOUT; not tested here, since a test of
    /// this binary forking meanwhile may hold the listening socket open.)
    #[tokio::test]
    async fn a_backend_bound_but_not_yet_listening_is_waited_for() {
        use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backend.sock");
        let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
        bind(fd.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        assert_eq!(
            crate::jailer::connect_nofollow(&path).unwrap_err().kind(),
            std::io::ErrorKind::ConnectionRefused,
            "bound, not listening: refused"
        );
        let later = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            listen(&fd, Backlog::new(1).unwrap()).unwrap();
            fd
        });
        connect_when_listening(&path).await.expect("connected once it listened");
        drop(later.join().unwrap());
        // A path that is no socket fails at once, naming it.
        let err = connect_when_listening(&dir.path().join("absent.sock")).await.unwrap_err().to_string();
        assert!(err.contains("absent.sock"), "{err}");
    }

    fn vm() -> VmConfig {
        VmConfig {
            kernel: "/k/vmlinux".into(),
            agent_image: "/k/agent,1.img".into(),
            cmdline: "console=ttyS0".into(),
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

    #[tokio::test]
    async fn a_nic_rate_limit_is_refused_not_dropped() {
        let mut q = Qemu::new(Path::new("qemu-system-x86_64"), Path::new("vhost-device-vsock"), "tcg");
        let mut limited = vm();
        limited.net_devices =
            vec![NetDeviceConfig { tap_fd: 7, mac: "02:42:0a:00:00:05".into(), rx_rate: Some(1 << 20), tx_rate: None }];
        let err = q.start(&limited).await.unwrap_err().to_string();
        assert!(err.contains("net_rx_rate_limit") && err.contains("built-in VMM"), "{err}");
    }

    fn args(cmd: &Command) -> Vec<String> {
        cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn the_command_line_has_what_vhost_user_on_microvm_needs() {
        let q = Qemu::new(Path::new("qemu-system-x86_64"), Path::new("vhost-device-vsock"), "tcg");
        let a = args(&q.command(&vm(), Some(Path::new("/w/vhost-vsock.sock")), &Connected::default()));
        let joined = a.join(" ");
        for needle in [
            "-M microvm,acpi=off,memory-backend=mem",
            "-accel tcg",
            "-cpu max",
            "-smp 2",
            "memory-backend-memfd,id=mem,size=300M,share=on",
            "virtio-mmio.force-legacy=false",
            "-no-reboot",
            "-serial file:/w/console.log",
            "socket,id=vsock,path=/w/vhost-vsock.sock",
            "vhost-user-vsock-device,chardev=vsock",
            "socket,id=fs,path=/w/fs.sock",
            "vhost-user-fs-device,chardev=fs,tag=runv",
            // The agent's image, read-only, its comma escaped.
            "-drive file=/k/agent,,1.img,if=none,id=agent,format=raw,readonly=on",
            "-device virtio-blk-device,drive=agent",
        ] {
            assert!(joined.contains(needle), "missing '{needle}' in: {joined}");
        }
        assert!(!joined.contains("-netdev") && !joined.contains("-initrd"), "{joined}");
    }

    #[test]
    fn each_tap_becomes_a_virtio_net_device_with_the_pod_mac() {
        let q = Qemu::new(Path::new("qemu-system-x86_64"), Path::new("vhost-device-vsock"), "tcg");
        let mut with_net = vm();
        with_net.net_devices = vec![
            NetDeviceConfig { tap_fd: 7, mac: "02:42:0a:00:00:05".into(), rx_rate: None, tx_rate: None },
            NetDeviceConfig { tap_fd: 9, mac: "02:42:0a:00:01:05".into(), rx_rate: None, tx_rate: None },
        ];
        let joined = args(&q.command(&with_net, None, &Connected::default())).join(" ");
        for needle in [
            "-netdev tap,id=net0,fd=7",
            "-device virtio-net-device,netdev=net0,mac=02:42:0a:00:00:05",
            "-netdev tap,id=net1,fd=9",
            "-device virtio-net-device,netdev=net1,mac=02:42:0a:00:01:05",
        ] {
            assert!(joined.contains(needle), "missing '{needle}' in: {joined}");
        }
    }

    #[test]
    fn kvm_uses_the_host_cpu_and_no_devices_are_added_unasked() {
        let q = Qemu::new(Path::new("qemu-system-x86_64"), Path::new("vhost-device-vsock"), "kvm");
        let mut plain = vm();
        plain.shared_fs_socket = None;
        let joined = args(&q.command(&plain, None, &Connected::default())).join(" ");
        assert!(joined.contains("-accel kvm") && joined.contains("-cpu host"), "{joined}");
        assert!(!joined.contains("vhost-user"), "{joined}");
    }
}
