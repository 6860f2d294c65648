//! PID 1 duties: the filesystems every guest needs, the console, and a
//! clean way out.

use std::fs;
use std::os::fd::AsRawFd;

use anyhow::{Context, Result};
use nix::mount::{mount, MsFlags};
use runv_proto::guest;

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const MOUNTS: &[Mount] = &[
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC),
        data: None,
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC),
        data: None,
    },
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620"),
    },
    Mount {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    Mount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    Mount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC),
        data: None,
    },
];

/// Set in the environment of the agent once it runs from the tmpfs root.
const SWITCHED_ENV: &str = "RUNV_AGENT_SWITCHED_ROOT";

/// Moves the agent from an initramfs onto a tmpfs root and re-executes it
/// there, as switch_root does: the initramfs cannot be pivot_root'ed away
/// from, and containers need pivot_root. Returns only when already
/// switched, or when the root is not an initramfs: runv boots the agent
/// from its read-only disk image (`agent_image`), whose root containers
/// can pivot away from as it is.
pub fn switch_root_to_tmpfs() -> Result<()> {
    if std::env::var_os(SWITCHED_ENV).is_some() || !root_is_initramfs()? {
        return Ok(());
    }
    let new_root = "/newroot";
    fs::create_dir_all(new_root).context("creating /newroot")?;
    mount(Some("tmpfs"), new_root, Some("tmpfs"), MsFlags::empty(), Some("mode=0755"))
        .context("mounting the tmpfs root")?;
    fs::copy("/init", "/newroot/init").context("copying the agent to the tmpfs root")?;
    // Free the initramfs copy once this process image is replaced.
    let _ = fs::remove_file("/init");
    std::env::set_current_dir(new_root).context("entering /newroot")?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).context("moving the tmpfs root onto /")?;
    nix::unistd::chroot(".").context("chroot into the tmpfs root")?;
    std::env::set_current_dir("/").context("entering /")?;
    let err = std::os::unix::process::CommandExt::exec(std::process::Command::new("/init").env(SWITCHED_ENV, "1"));
    Err(err).context("re-executing the agent from the tmpfs root")
}

/// Whether `/` is the kernel's initramfs (a ramfs or tmpfs rootfs) rather
/// than a mounted disk.
fn root_is_initramfs() -> Result<bool> {
    let fs = nix::sys::statfs::statfs("/").context("statfs /")?;
    let kind = fs.filesystem_type();
    // RAMFS_MAGIC (linux/magic.h; nix does not name it).
    const RAMFS_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0x8584_58f6);
    Ok(kind == RAMFS_MAGIC || kind == nix::sys::statfs::TMPFS_MAGIC)
}

/// Mounts the basics and points stdio at the console.
pub fn setup() -> Result<()> {
    for m in MOUNTS {
        fs::create_dir_all(m.target).with_context(|| format!("creating {}", m.target))?;
        mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data)
            .with_context(|| format!("mounting {} on {}", m.fstype, m.target))?;
    }
    // The agent's image (or an initramfs) has no /dev/console node, so the kernel started us
    // without stdio; take the console now that devtmpfs is there.
    let console = fs::OpenOptions::new().read(true).write(true).open("/dev/console").context("opening /dev/console")?;
    for fd in 0..3 {
        // SAFETY: plain dup2 onto the standard descriptors.
        if unsafe { libc::dup2(console.as_raw_fd(), fd) } < 0 {
            return Err(std::io::Error::last_os_error()).context("redirecting stdio to the console");
        }
    }
    let _ = fs::remove_file("/dev/ptmx");
    std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx").context("linking /dev/ptmx")?;
    std::env::set_var("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    Ok(())
}

/// Connects to the host's readiness port and says so.
pub fn notify_host_ready() -> Result<()> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
    let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .context("creating a vsock socket")?;
    let addr = VsockAddr::new(guest::HOST_CID, guest::AGENT_READY_VSOCK_PORT);
    connect(fd.as_raw_fd(), &addr).context("connecting to the host")?;
    let mut stream = std::fs::File::from(fd);
    std::io::Write::write_all(&mut stream, guest::AGENT_READY_MESSAGE).context("writing the ready message")?;
    Ok(())
}

/// Denies `socket(AF_VSOCK, ...)` (EAFNOSUPPORT) to every thread of the
/// agent and to everything it starts from now on: containers, their execs,
/// the pause process, debug-console commands. The agent has made the only
/// vsock sockets the guest needs (its listeners and its readiness call),
/// and nothing in a guest but the agent may talk to the host. A seccomp
/// filter is inherited and cannot be removed, whatever a container's own
/// profile says (or whether it may load one at all). The guest kernel has
/// no 32-bit or x32 syscall entry (tinyconfig), so `socket` on x86-64 is
/// the only way to make a socket; a process of any other architecture is
/// killed by the filter.
pub fn deny_vsock_sockets() -> Result<()> {
    use libseccomp::{ScmpAction, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};
    let mut filter = ScmpFilterContext::new(ScmpAction::Allow).context("a seccomp filter")?;
    filter
        .add_rule_conditional(
            ScmpAction::Errno(libc::EAFNOSUPPORT),
            ScmpSyscall::from_name("socket").context("the socket syscall")?,
            &[ScmpArgCompare::new(0, ScmpCompareOp::Equal, libc::AF_VSOCK as u64)],
        )
        .context("the vsock rule")?;
    // Every thread, now; and no no_new_privs, which would reach every
    // container and stop its setuid binaries (the agent is root with
    // CAP_SYS_ADMIN, which is what loading a filter needs without it).
    filter.set_ctl_tsync(true).context("thread sync")?;
    filter.set_ctl_nnp(false).context("no_new_privs")?;
    filter.load().context("loading the filter")?;
    Ok(())
}

/// Whether the kernel command line asks for a boot probe.
pub fn probe_requested() -> bool {
    fs::read_to_string("/proc/cmdline")
        .map(|c| c.split_whitespace().any(|w| w == guest::PROBE_CMDLINE_FLAG))
        .unwrap_or(false)
}

/// Ends the VM: the guest boots with `reboot=t` and the hypervisor turns a
/// reboot into its own exit (a poweroff without ACPI would halt forever).
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Only reached if reboot failed; PID 1 must never return.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
