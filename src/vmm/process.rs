//! `runv vmm`: the built-in VMM as a process of its own. It sets the VM up
//! (opening everything it will need), serves a small control socket, drops
//! every capability, installs a seccomp filter, and runs the guest; its
//! exit status tells how the guest ended. A VMM fault never takes its
//! caller down.
//!
//! Control socket protocol (one line per request): `stop` ends the VM
//! (answer `ok`); `status` answers `running`.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::devices::virtio::block::Block;
use super::devices::virtio::fs::VhostUserFs;
use super::devices::virtio::net::{check_tap, Mac, Net, RateLimits};
use super::devices::virtio::vsock::device::Vsock;
use super::vm::{BootFiles, Vm, VmError, VmExitReason};

/// Where the guest console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Console {
    /// No serial device at all (fastest).
    Off,
    Stdout,
    File(PathBuf),
}

impl std::str::FromStr for Console {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "off" => Console::Off,
            "-" | "stdout" => Console::Stdout,
            "" => return Err("empty console target (use off, stdout or a file path)".into()),
            path => Console::File(path.into()),
        })
    }
}

/// A virtio-blk disk: `PATH` or `PATH,ro`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    pub read_only: bool,
}

impl std::str::FromStr for Disk {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, read_only) = match s.rsplit_once(',') {
            Some((p, "ro")) => (p, true),
            Some((p, "rw")) => (p, false),
            Some((_, opt)) => return Err(format!("unknown disk option '{opt}' (ro or rw)")),
            None => (s, false),
        };
        if path.is_empty() {
            return Err("empty disk path".into());
        }
        Ok(Disk { path: path.into(), read_only })
    }
}

/// A virtio-net device on an inherited tap: `fd=N,mac=MAC`, and
/// optionally `rx_rate=BYTES,tx_rate=BYTES` (bytes a second each way).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetArg {
    pub tap_fd: i32,
    pub mac: Mac,
    pub limits: RateLimits,
}

impl std::str::FromStr for NetArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut fd, mut mac, mut limits) = (None, None, RateLimits::default());
        let rate = |v: &str| {
            v.parse::<u64>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("rate '{v}' is not a number of bytes a second above 0"))
        };
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("rx_rate", v)) => limits.rx = Some(rate(v)?),
                Some(("tx_rate", v)) => limits.tx = Some(rate(v)?),
                Some(("fd", v)) => {
                    fd = Some(
                        v.parse::<i32>()
                            .ok()
                            .filter(|&n| n > 2)
                            .ok_or_else(|| format!("tap fd '{v}' is not a descriptor number above 2 (stdio)"))?,
                    )
                }
                Some(("mac", v)) => mac = Some(v.parse::<Mac>()?),
                _ => return Err(format!("unknown net option '{part}' (fd=N,mac=MAC[,rx_rate=N][,tx_rate=N])")),
            }
        }
        match (fd, mac) {
            (Some(tap_fd), Some(mac)) => Ok(NetArg { tap_fd, mac, limits }),
            _ => Err(format!("'{s}' needs both fd=N and mac=MAC")),
        }
    }
}

/// The command line of `runv vmm` and `runv-vmm`.
#[derive(Clone, Debug, clap::Args)]
pub struct VmmArgs {
    /// Uncompressed ELF guest kernel (vmlinux; PVH entry or the 64-bit
    /// boot protocol). Default: the configured kernel.
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Initramfs (default none; `none` for none). runv boots its guest
    /// from the agent's disk image instead (`--disk`).
    #[arg(long, value_name = "FILE")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line (virtio-mmio devices are appended).
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1")]
    pub cmdline: String,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=32))]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=1048576))]
    pub memory: u32,
    /// Serial console: a file, `stdout` (or `-`), or `off` (fastest).
    #[arg(long, default_value = "stdout")]
    pub console: Console,
    /// A virtio-blk disk on a raw image: PATH or PATH,ro (repeatable).
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    pub disks: Vec<Disk>,
    /// Control socket (line requests: `stop`, `status`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// A virtio-vsock device whose host side is this Unix socket (hybrid
    /// vsock: write `CONNECT <port>\n`; guest connections to port P reach
    /// `PATH_P`).
    #[arg(long, value_name = "PATH")]
    pub vsock: Option<PathBuf>,
    /// The guest's vsock CID.
    #[arg(long, default_value_t = 3)]
    pub vsock_cid: u64,
    /// A virtio-fs device served by the vhost-user backend (virtiofsd)
    /// listening on this socket.
    #[arg(long, value_name = "PATH", requires = "fs_tag")]
    pub fs_socket: Option<PathBuf>,
    /// The virtio-fs tag the guest mounts.
    #[arg(long, value_name = "TAG")]
    pub fs_tag: Option<String>,
    /// A virtio-net device on tap queue N, which the VMM inherits open
    /// (IFF_TAP|IFF_NO_PI; with IFF_VNET_HDR, checksum and segmentation
    /// offloads are offered), with the guest NIC's MAC (repeatable).
    #[arg(long = "net", value_name = "fd=N,mac=MAC")]
    pub nets: Vec<NetArg>,
    /// Skip the seccomp filter and the capability drop (debugging only).
    #[arg(long)]
    pub no_sandbox: bool,
    /// Enter a jail once /dev/kvm, the kernel, the initramfs, the console
    /// and the disks are open: new mount, IPC, UTS and network namespaces,
    /// pivot_root into DIR (socket paths are then relative to it; start the
    /// VMM in DIR), then uid U and gid G with no capabilities.
    #[arg(long, value_name = "uid=U,gid=G,root=DIR")]
    pub jail: Option<crate::jailer::JailArg>,
}

/// Runs the VMM from its command line; the exit status says how the guest
/// ended (0 reset or shutdown, 2 stopped, 1 failure).
pub fn main(args: VmmArgs, config: &crate::config::Config) -> std::process::ExitCode {
    use std::process::ExitCode;
    let opts = VmmOptions {
        kernel: args.kernel.unwrap_or_else(|| config.kernel.clone()),
        initramfs: match args.initramfs {
            Some(p) if p.as_os_str() == "none" => None,
            p => p,
        },
        cmdline: args.cmdline,
        vcpus: args.vcpus,
        memory_mib: args.memory,
        console: args.console,
        disks: args.disks,
        api_socket: args.api_socket,
        vsock: args.vsock.map(|uds| (args.vsock_cid, uds)),
        fs: args.fs_socket.zip(args.fs_tag),
        nets: args.nets,
        sandbox: !args.no_sandbox,
        jail: args.jail,
    };
    match run(&opts) {
        Ok(VmExitReason::Reset | VmExitReason::Shutdown) => ExitCode::SUCCESS,
        Ok(VmExitReason::Stopped) => ExitCode::from(2),
        Ok(VmExitReason::Failed(why)) => {
            eprintln!("runv vmm: error: the guest stopped: {why}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("runv vmm: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Clone, Debug)]
pub struct VmmOptions {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub console: Console,
    pub disks: Vec<Disk>,
    pub api_socket: Option<PathBuf>,
    /// (guest CID, host Unix socket) of the vsock device.
    pub vsock: Option<(u64, PathBuf)>,
    /// (vhost-user socket, tag) of the virtio-fs device.
    pub fs: Option<(PathBuf, String)>,
    /// virtio-net devices on inherited taps.
    pub nets: Vec<NetArg>,
    /// Install the seccomp filter and drop capabilities (on by default).
    pub sandbox: bool,
    pub jail: Option<crate::jailer::JailArg>,
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("console {path}: {source}")]
    Console { path: PathBuf, source: std::io::Error },
    #[error("disk {path}: {source}")]
    Disk { path: PathBuf, source: std::io::Error },
    #[error("virtio-fs: {0}")]
    Fs(super::devices::virtio::fs::FsError),
    #[error("vsock socket {path}: {source}")]
    Vsock { path: PathBuf, source: std::io::Error },
    #[error("virtio-net on fd {fd}: {reason}")]
    Net { fd: i32, reason: String },
    #[error("control socket {path}: {source}")]
    Api { path: PathBuf, source: std::io::Error },
    #[error("confining the VMM: {0}")]
    Confine(String),
}

/// Sets the VM up, confines the process and runs the guest to its end.
pub fn run(opts: &VmmOptions) -> Result<VmExitReason, VmmError> {
    // Jailed, this goes on as pid 1 of a PID namespace of its own (the
    // process runv started stays outside, as its reaper), before the VM
    // exists: a KVM VM is bound to the address space that created it.
    let pid_namespace = match &opts.jail {
        Some(jail) => Some(crate::jailer::enter_pid_namespace(jail).map_err(VmmError::Confine)?),
        None => None,
    };
    let mut vm = Vm::new(opts.vcpus, u64::from(opts.memory_mib) << 20)?;
    match &opts.console {
        Console::Off => {}
        Console::Stdout => vm.add_serial(Box::new(std::io::stdout()))?,
        Console::File(path) => {
            let f = File::options()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmmError::Console { path: path.clone(), source })?;
            vm.add_serial(Box::new(f))?
        }
    }
    vm.add_i8042()?;
    for (i, disk) in opts.disks.iter().enumerate() {
        let dev = Block::open(&disk.path, disk.read_only, &format!("runv{i}"))
            .map_err(|source| VmmError::Disk { path: disk.path.clone(), source })?;
        vm.add_virtio(Box::new(dev))?;
    }
    let boot = BootFiles::open(&opts.kernel, opts.initramfs.as_deref())?;
    if let (Some(jail), Some(pid_namespace)) = (&opts.jail, pid_namespace) {
        // Nothing past this point can reach a host file but the sockets in
        // the jail directory and what is already open.
        crate::jailer::enter(jail, pid_namespace).map_err(VmmError::Confine)?;
    }
    if let Some((cid, uds)) = &opts.vsock {
        let dev = Vsock::new(*cid, uds).map_err(|source| VmmError::Vsock { path: uds.clone(), source })?;
        vm.add_virtio(Box::new(dev))?;
    }
    if let Some((socket, tag)) = &opts.fs {
        vm.add_virtio(Box::new(VhostUserFs::connect(socket, tag).map_err(VmmError::Fs)?))?;
    }
    for net in &opts.nets {
        vm.add_virtio(Box::new(open_net(net)?))?;
    }
    vm.load_kernel(boot, &opts.cmdline)?;
    let stop = Arc::new(AtomicBool::new(false));
    let api = match &opts.api_socket {
        Some(path) => Some((path, bind_api(path)?)),
        None => None,
    };
    if opts.sandbox {
        confine()?;
    }
    if let Some((path, listener)) = api {
        serve_api(path, listener, stop.clone())?;
    }
    Ok(vm.run(stop)?)
}

/// Takes the inherited tap of `net`, after checking it is one.
fn open_net(net: &NetArg) -> Result<Net, VmmError> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let err = |reason: String| VmmError::Net { fd: net.tap_fd, reason };
    // SAFETY: F_GETFD only asks whether the number is an open descriptor.
    if unsafe { libc::fcntl(net.tap_fd, libc::F_GETFD) } < 0 {
        return Err(err("no such open descriptor (the VMM inherits its taps)".into()));
    }
    // SAFETY: the descriptor is open and was handed to this process for
    // this device alone; from here the device owns it.
    let tap = File::from(unsafe { OwnedFd::from_raw_fd(net.tap_fd) });
    check_tap(&tap).map_err(err)?;
    Net::new(tap, net.mac, net.limits).map_err(|e| err(e.to_string()))
}

fn bind_api(path: &PathBuf) -> Result<UnixListener, VmmError> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|source| VmmError::Api { path: path.clone(), source })
}

fn serve_api(path: &std::path::Path, listener: UnixListener, stop: Arc<AtomicBool>) -> Result<(), VmmError> {
    std::thread::Builder::new()
        .name("vmm-api".into())
        .spawn(move || {
            super::seccomp::enter(super::seccomp::Role::Api);
            for conn in listener.incoming().flatten() {
                let Ok(mut out) = conn.try_clone() else { continue };
                for line in BufReader::new(conn).lines() {
                    let Ok(line) = line else { break };
                    let reply = match line.trim() {
                        "stop" => {
                            stop.store(true, Ordering::SeqCst);
                            "ok"
                        }
                        "status" => "running",
                        other => {
                            let _ = writeln!(out, "error: unknown request '{other}' (stop or status)");
                            continue;
                        }
                    };
                    let _ = writeln!(out, "{reply}");
                }
            }
        })
        .map_err(|source| VmmError::Api { path: path.to_path_buf(), source })?;
    Ok(())
}

/// Drops every capability and installs the seccomp filters (see
/// `super::seccomp`).
pub fn confine() -> Result<(), VmmError> {
    drop_capabilities()?;
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(VmmError::Confine(format!("no_new_privs: {}", std::io::Error::last_os_error())));
    }
    super::seccomp::confine().map_err(VmmError::Confine)
}

fn drop_capabilities() -> Result<(), VmmError> {
    // The bounding set first (needs CAP_SETPCAP, which goes next).
    crate::jailer::drop_bounding_set();
    // SAFETY: as above.
    unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = Header { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let data = [Data::default(); 2];
    // SAFETY: capset reads a header and two data structs we own.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(VmmError::Confine(format!("dropping capabilities: {}", std::io::Error::last_os_error())));
    }
    Ok(())
}

/// A minimal ELF64 guest with a PVH entry note (Xen PHYS32_ENTRY), whose
/// one segment holds `code` (32-bit protected-mode code) at 1 MiB. Both
/// the built-in VMM and `qemu -M microvm -kernel` boot it: tests and the
/// VMM benchmark use it.
pub fn tiny_pvh_elf(code: &[u8]) -> Vec<u8> {
    tiny_elf(code, true)
}

/// As `tiny_pvh_elf`; without the PVH note the VMM enters `code` in 64-bit
/// mode through the Linux 64-bit boot protocol (`rsi` = boot_params).
pub fn tiny_elf(code: &[u8], pvh_note: bool) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    const CODE_OFFSET: u64 = 0x1000;
    let phoff = 64u64;
    let note_offset = phoff + 2 * 56;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(LOAD as u32).to_le_bytes());

    let mut elf = Vec::new();
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    elf.extend_from_slice(&phoff.to_le_bytes());
    elf.extend_from_slice(&0u64.to_le_bytes()); // no sections
    elf.extend_from_slice(&0u32.to_le_bytes());
    elf.extend_from_slice(&64u16.to_le_bytes()); // ehsize
    elf.extend_from_slice(&56u16.to_le_bytes()); // phentsize
    elf.extend_from_slice(&(if pvh_note { 2u16 } else { 1 }).to_le_bytes()); // phnum
    elf.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    let phdr = |elf: &mut Vec<u8>, kind: u32, flags: u32, offset: u64, addr: u64, size: u64, align: u64| {
        elf.extend_from_slice(&kind.to_le_bytes());
        elf.extend_from_slice(&flags.to_le_bytes());
        elf.extend_from_slice(&offset.to_le_bytes());
        elf.extend_from_slice(&addr.to_le_bytes());
        elf.extend_from_slice(&addr.to_le_bytes());
        elf.extend_from_slice(&size.to_le_bytes());
        elf.extend_from_slice(&size.to_le_bytes());
        elf.extend_from_slice(&align.to_le_bytes());
    };
    phdr(&mut elf, 1, 5, CODE_OFFSET, LOAD, code.len() as u64, 0x1000); // PT_LOAD r-x
    if pvh_note {
        phdr(&mut elf, 4, 4, note_offset, 0, note.len() as u64, 4); // PT_NOTE
        elf.extend_from_slice(&note);
    }
    elf.resize(CODE_OFFSET as usize, 0);
    elf.extend_from_slice(code);
    elf
}

/// 32-bit code for `tiny_pvh_elf`: print `text` on the serial port, then
/// reset through the i8042, then halt.
pub fn tiny_serial_code(text: &[u8]) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in text {
        code.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b; out dx, al
    }
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // i8042 reset
    code.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp back to hlt
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_and_disk_arguments_parse_or_say_why_not() {
        assert_eq!("off".parse::<Console>().unwrap(), Console::Off);
        assert_eq!("-".parse::<Console>().unwrap(), Console::Stdout);
        assert_eq!("/tmp/c.log".parse::<Console>().unwrap(), Console::File("/tmp/c.log".into()));
        assert!("".parse::<Console>().is_err());
        assert_eq!("/d.img,ro".parse::<Disk>().unwrap(), Disk { path: "/d.img".into(), read_only: true });
        assert_eq!("/d.img".parse::<Disk>().unwrap(), Disk { path: "/d.img".into(), read_only: false });
        assert!("/d.img,fast".parse::<Disk>().unwrap_err().contains("unknown disk option 'fast'"));
        assert!(",ro".parse::<Disk>().is_err());
        let net: NetArg = "fd=5,mac=02:42:0a:00:00:05".parse().unwrap();
        assert_eq!((net.tap_fd, net.mac), (5, "02:42:0a:00:00:05".parse().unwrap()));
        assert_eq!(net.limits, RateLimits::default());
        let net: NetArg = "fd=5,mac=02:42:0a:00:00:05,rx_rate=1000,tx_rate=2000".parse().unwrap();
        assert_eq!(net.limits, RateLimits { rx: Some(1000), tx: Some(2000) });
        assert!("fd=5,mac=02:00:00:00:00:01,rx_rate=0".parse::<NetArg>().unwrap_err().contains("rate '0'"));
        assert!("fd=5".parse::<NetArg>().unwrap_err().contains("needs both"));
        assert!("fd=1,mac=02:00:00:00:00:01".parse::<NetArg>().unwrap_err().contains("above 2"));
        assert!("fd=5,mac=02:00:00:00:00:01,queues=4".parse::<NetArg>().unwrap_err().contains("'queues=4'"));
    }

    #[test]
    fn the_tiny_elf_has_a_pvh_note_linux_loader_finds() {
        use linux_loader::loader::elf::{Elf, PvhBootCapability};
        use linux_loader::loader::KernelLoader;
        use vm_memory::GuestAddress;
        let elf = tiny_pvh_elf(&tiny_serial_code(b"x"));
        let mem = super::super::devices::virtio::Mem::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let r = Elf::load(&mem, None, &mut std::io::Cursor::new(&elf), Some(GuestAddress(0x10_0000))).unwrap();
        assert_eq!(r.pvh_boot_cap, PvhBootCapability::PvhEntryPresent(GuestAddress(0x10_0000)));
    }
}
