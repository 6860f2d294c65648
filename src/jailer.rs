//! The jailer: every host process of a sandbox runs confined, as
//! Firecracker's jailer confines Firecracker.
//!
//! Each sandbox gets a uid and gid of its own, leased from a configured
//! range (`jail_uid_base`, `jail_uid_count`; no passwd entry is needed), a
//! jail directory (`<sandbox dir>/jail`, owned by that uid, mode 0700) that
//! holds every socket its VM process uses, and a cgroup (the pod's, or
//! `runv/<sandbox id>`) that every one of its host processes joins before
//! it runs a single instruction of its own.
//!
//! - The built-in VMM opens `/dev/kvm`, the kernel and the agent's disk image as
//!   root, then [`enter`]s the jail: new mount, IPC, UTS and network
//!   namespaces, `pivot_root` into the jail directory (which holds nothing
//!   but its sockets), an empty bounding set, and the sandbox's uid and gid
//!   with no supplementary groups; its seccomp filter follows.
//! - QEMU does the same with `-runas uid:gid -chroot <jail>` after it has
//!   opened its devices, under its own `-sandbox` filter.
//! - vhost-device-vsock runs as the sandbox's uid from the start (it needs
//!   no privilege), in the jail directory, with no capabilities.
//! - virtiofsd needs root to serve files of every owner; it keeps its own
//!   namespace sandbox and seccomp filter, and joins the cgroup.
//!
//! The host connects to the sockets in the jail directory as root. It never
//! follows a symlink there (the jail's uid owns that directory, nothing
//! above it): it opens each socket with `O_PATH | O_NOFOLLOW` and connects
//! through the descriptor.

use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::config::Config;

/// Where uid leases live: one file per uid in use, host-wide, whatever the
/// runtime directory of the runv that took it.
pub const LEASE_DIR: &str = "/run/runv/jail-uids";
/// The jail directory's name inside a sandbox directory.
pub const JAIL_DIR: &str = "jail";
/// What a sandbox directory records about its jail, for cleanup after a
/// crash (`containerd-shim-runv-v2 delete`).
pub const RECORD: &str = "jail.record";
/// Where cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// cgroup v1 controllers a sandbox joins where they are mounted apart
/// (cpuset is left alone: a new cpuset cgroup starts with no CPUs).
const V1_CONTROLLERS: [&str; 6] = ["memory", "pids", "cpu,cpuacct", "cpu", "cpuacct", "blkio"];
/// How long the sandbox's processes get to leave the cgroup after SIGKILL.
const CGROUP_DRAIN: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("no free uid in jail_uid_base..+jail_uid_count ({base}..{end}): {count} sandboxes hold them all")]
    NoFreeUid { base: u32, end: u64, count: u32 },
    #[error("jail {what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("cgroup path '{0}' must be relative or absolute without '..' or '.'")]
    BadCgroup(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JailError + 'a {
    move |source| JailError::Io { what, path: path.to_path_buf(), source }
}

/// One sandbox's confinement on the host side.
#[derive(Debug)]
pub struct Jail {
    uid: u32,
    gid: u32,
    root: PathBuf,
    root_fd: OwnedFd,
    cgroups: Vec<PathBuf>,
    lease: PathBuf,
}

impl Jail {
    /// Leases a uid, makes the jail directory in `sandbox_dir` and the
    /// sandbox's cgroup (`cgroup`, relative to each hierarchy's root, or
    /// `runv/<sandbox_id>`), and records them in `sandbox_dir`.
    pub fn create(
        config: &Config,
        sandbox_dir: &Path,
        sandbox_id: &str,
        cgroup: Option<&Path>,
    ) -> Result<Self, JailError> {
        let cgroup_rel = match cgroup {
            Some(path) => relative_cgroup(path)?,
            None => Path::new("runv").join(sandbox_id),
        };
        let (uid, lease) = lease_uid(config, sandbox_dir)?;
        let root = sandbox_dir.join(JAIL_DIR);
        let made = make_jail_dir(&root, uid).and_then(|fd| Ok((fd, make_cgroups(&cgroup_rel)?)));
        let (root_fd, cgroups) = match made {
            Ok(made) => made,
            Err(e) => {
                let _ = std::fs::remove_file(&lease);
                return Err(e);
            }
        };
        // From here on, dropping the jail undoes what was done.
        let jail = Jail { uid, gid: uid, root, root_fd, cgroups, lease };
        let record = format!(
            "uid {uid}\nlease {}\n{}",
            jail.lease.display(),
            jail.cgroups.iter().map(|c| format!("cgroup {}\n", c.display())).collect::<String>()
        );
        let record_path = sandbox_dir.join(RECORD);
        crate::helper::write_private(&record_path, record.as_bytes()).map_err(io("recording", &record_path))?;
        Ok(jail)
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }

    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// The jail directory as the host sees it.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The host path of `name` in the jail directory.
    pub fn host_path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Hands `name` (a socket the host made in the jail directory) to the
    /// sandbox's uid, without following a symlink.
    pub fn give(&self, name: &str) -> Result<(), JailError> {
        rustix::fs::chownat(
            &self.root_fd,
            name,
            Some(uid_of(self.uid)),
            Some(gid_of(self.gid)),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| JailError::Io { what: "chown", path: self.host_path(name), source: e.into() })
    }

    /// The process `cmd` starts joins the sandbox's cgroups before it runs.
    pub fn join_cgroups(&self, cmd: &mut Command) {
        let procs: Vec<CString> = self.cgroups.iter().map(|c| cstring(&c.join("cgroup.procs"))).collect();
        // SAFETY: between fork and exec the closure makes only
        // async-signal-safe system calls on memory allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                for path in &procs {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let err = std::io::Error::last_os_error();
                    libc::close(fd);
                    if written != 1 {
                        return Err(err);
                    }
                }
                Ok(())
            });
        }
    }

    /// The process `cmd` starts runs as the sandbox's uid and gid, with no
    /// supplementary groups, no capabilities (bounding set included) and
    /// no_new_privs, in the jail directory, and in the sandbox's cgroups.
    /// Relative paths it is given resolve in the jail directory.
    pub fn confine_unprivileged(&self, cmd: &mut Command) {
        self.join_cgroups(cmd);
        let root = cstring(&self.root);
        let (uid, gid) = (self.uid, self.gid);
        // SAFETY: as in `join_cgroups`.
        unsafe {
            cmd.pre_exec(move || {
                if libc::chdir(root.as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                drop_ids(uid, gid)
            });
        }
    }

    /// The `--jail` argument of `runv-vmm` for this jail.
    pub fn vmm_arg(&self) -> String {
        format!("uid={},gid={},root={}", self.uid, self.gid, self.root.display())
    }

    /// QEMU's own confinement for this jail: it changes to the sandbox's
    /// uid and into the jail directory once its devices are open.
    pub fn qemu_args(&self) -> Vec<String> {
        vec!["-runas".into(), format!("{}:{}", self.uid, self.gid), "-chroot".into(), self.root.display().to_string()]
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        kill_cgroups(&self.cgroups);
        remove_cgroups(&self.cgroups);
        let _ = std::fs::remove_file(&self.lease);
    }
}

/// Undoes what a jail recorded in `sandbox_dir`, after the runv that made
/// it died: kills what is left in its cgroups, removes them, and frees its
/// uid. The record's paths are checked to be runv's own.
pub fn cleanup_recorded(sandbox_dir: &Path) {
    let Ok(text) = std::fs::read_to_string(sandbox_dir.join(RECORD)) else { return };
    let mut cgroups = vec![];
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("cgroup", path)) if Path::new(path).starts_with(CGROUP_ROOT) && !path.contains("/..") => {
                cgroups.push(PathBuf::from(path))
            }
            Some(("lease", path)) if Path::new(path).parent() == Some(Path::new(LEASE_DIR)) => {
                // Only a lease that still names this sandbox.
                let holder = std::fs::read_to_string(path).unwrap_or_default();
                if Path::new(holder.trim()) == sandbox_dir {
                    let _ = std::fs::remove_file(path);
                }
            }
            _ => {}
        }
    }
    kill_cgroups(&cgroups);
    remove_cgroups(&cgroups);
}

/// Connects to the Unix socket at `path` as root without following a
/// symlink in its last component (the jail directory's owner could have
/// put one there to turn root's connect towards another host socket).
pub fn connect_nofollow(path: &Path) -> std::io::Result<std::os::unix::net::UnixStream> {
    use rustix::fs::{FileType, Mode, OFlags};
    let fd = rustix::fs::open(path, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
    let st = rustix::fs::fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Socket {
        return Err(std::io::Error::other(format!("{} is not a socket", path.display())));
    }
    std::os::unix::net::UnixStream::connect(crate::fsroot::proc_fd_path(&fd))
}

/// What confinement sandboxes get on this host, for `runv check`.
pub fn describe(config: &Config) -> Result<String, String> {
    let end = u64::from(config.jail_uid_base) + u64::from(config.jail_uid_count);
    let cgroups = match cgroup_hierarchies() {
        (true, _) => "cgroup v2".to_string(),
        (false, v1) if v1.is_empty() => {
            return Err(
                "no cgroup hierarchy under /sys/fs/cgroup: sandboxes stay in the cgroup of whoever starts them".into()
            )
        }
        (false, v1) => format!(
            "cgroup v1 ({})",
            v1.iter()
                .filter_map(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    Ok(format!(
        "uids {}..{end}, own PID/mount/IPC/UTS/network namespaces and pivot_root (runv-vmm), -runas and -chroot (QEMU), {cgroups}",
        config.jail_uid_base
    ))
}

/// Leases the first free uid from a start that depends on the sandbox
/// directory (so concurrent sandboxes rarely probe the same uids). A lease
/// whose sandbox directory is gone is stale and taken over.
fn lease_uid(config: &Config, sandbox_dir: &Path) -> Result<(u32, PathBuf), JailError> {
    let dir = Path::new(LEASE_DIR);
    crate::helper::create_private_dir_all(dir).map_err(io("creating", dir))?;
    let count = config.jail_uid_count.max(1);
    let start =
        sandbox_dir.as_os_str().as_bytes().iter().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(*b)));
    for i in 0..count {
        let uid = config.jail_uid_base + (start.wrapping_add(i) % count);
        let path = dir.join(uid.to_string());
        match create_exclusive(&path, sandbox_dir) {
            Ok(()) => return Ok((uid, path)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                if !holder.is_empty() && !Path::new(holder).exists() {
                    // The sandbox that held it is gone without freeing it.
                    let _ = std::fs::remove_file(&path);
                    if create_exclusive(&path, sandbox_dir).is_ok() {
                        return Ok((uid, path));
                    }
                }
            }
            Err(e) => return Err(JailError::Io { what: "leasing a uid in", path: dir.to_path_buf(), source: e }),
        }
    }
    Err(JailError::NoFreeUid {
        base: config.jail_uid_base,
        end: u64::from(config.jail_uid_base) + u64::from(count),
        count,
    })
}

fn create_exclusive(path: &Path, content: &Path) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(content.as_os_str().as_bytes())
}

fn relative_cgroup(path: &Path) -> Result<PathBuf, JailError> {
    let mut rel = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => rel.push(n),
            _ => return Err(JailError::BadCgroup(path.display().to_string())),
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(JailError::BadCgroup(path.display().to_string()));
    }
    Ok(rel)
}

/// (cgroup v2 unified at /sys/fs/cgroup, v1 hierarchies a sandbox joins).
fn cgroup_hierarchies() -> (bool, Vec<PathBuf>) {
    let root = Path::new(CGROUP_ROOT);
    if root.join("cgroup.controllers").exists() {
        return (true, vec![root.to_path_buf()]);
    }
    let mut seen = vec![];
    let mut dirs = vec![];
    for name in V1_CONTROLLERS {
        let dir = root.join(name);
        if !dir.join("cgroup.procs").exists() {
            continue;
        }
        // cpu and cpuacct are often one hierarchy under two names.
        let real = dir.canonicalize().unwrap_or_else(|_| dir.clone());
        let id = std::fs::metadata(&real).map(|m| std::os::unix::fs::MetadataExt::dev(&m)).ok();
        if seen.contains(&id) {
            continue;
        }
        seen.push(id);
        dirs.push(dir);
    }
    (false, dirs)
}

fn make_cgroups(rel: &Path) -> Result<Vec<PathBuf>, JailError> {
    let (v2, hierarchies) = cgroup_hierarchies();
    let mut made = vec![];
    for root in hierarchies {
        let dir = root.join(rel);
        if v2 {
            // Controllers reach the new cgroup only through every parent's
            // subtree_control (the root's is the init system's business).
            let mut parent = root.clone();
            for c in rel.parent().into_iter().flat_map(|p| p.components()) {
                parent.push(c);
                let _ = std::fs::create_dir(&parent);
                for ctrl in ["+memory", "+pids", "+cpu"] {
                    let _ = std::fs::write(parent.join("cgroup.subtree_control"), ctrl);
                }
            }
        }
        if let Err(e) = std::fs::create_dir_all(&dir) {
            remove_cgroups(&made);
            return Err(JailError::Io { what: "creating cgroup", path: dir, source: e });
        }
        made.push(dir);
    }
    Ok(made)
}

fn cgroup_pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// SIGKILLs every process in `cgroups` (the cgroup says they are the
/// sandbox's, whatever their pid was before) and waits for them to leave.
fn kill_cgroups(cgroups: &[PathBuf]) {
    let deadline = Instant::now() + CGROUP_DRAIN;
    loop {
        let pids: Vec<i32> = cgroups.iter().flat_map(|c| cgroup_pids(c)).collect();
        if pids.is_empty() || Instant::now() >= deadline {
            return;
        }
        for c in cgroups {
            // cgroup v2 kills the whole cgroup at once, with no pid race.
            if std::fs::write(c.join("cgroup.kill"), "1").is_err() {
                for pid in cgroup_pids(c) {
                    // SAFETY: kill with integer arguments.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn remove_cgroups(cgroups: &[PathBuf]) {
    for dir in cgroups {
        // An exited process can take a moment to leave the cgroup.
        let deadline = Instant::now() + CGROUP_DRAIN;
        while std::fs::remove_dir(dir).is_err_and(|e| e.kind() != std::io::ErrorKind::NotFound) {
            if Instant::now() >= deadline {
                tracing::warn!("removing cgroup {}: still busy", dir.display());
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The jail directory: new, 0700, owned by the sandbox's uid.
fn make_jail_dir(root: &Path, uid: u32) -> Result<OwnedFd, JailError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(root).map_err(io("creating", root))?;
    let fd = open_dir(root)?;
    rustix::fs::fchown(&fd, Some(uid_of(uid)), Some(gid_of(uid))).map_err(|e| JailError::Io {
        what: "chown",
        path: root.to_path_buf(),
        source: e.into(),
    })?;
    Ok(fd)
}

fn open_dir(path: &Path) -> Result<OwnedFd, JailError> {
    use rustix::fs::{Mode, OFlags};
    rustix::fs::open(path, OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::RDONLY, Mode::empty())
        .map_err(|e| JailError::Io { what: "opening", path: path.to_path_buf(), source: e.into() })
}

fn uid_of(uid: u32) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(uid)
}

fn gid_of(gid: u32) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(gid)
}

fn cstring(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("paths have no NUL byte")
}

/// Empties the bounding set, then changes to `uid`/`gid` with no
/// supplementary groups (which clears every capability), and sets
/// no_new_privs. Async-signal-safe: it runs between fork and exec too.
fn drop_ids(uid: u32, gid: u32) -> std::io::Result<()> {
    drop_bounding_set();
    // SAFETY: system calls with integer arguments or null pointers.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(gid, gid, gid) != 0
            || libc::setresuid(uid, uid, uid) != 0
            || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Kills a jailed process when the runv process that started it dies. A
/// process that changes its uid itself (QEMU's `-runas`) loses the
/// parent-death signal it was started with; its guard keeps one: a forked
/// child of runv, as the jail's uid with no capability (a process of the
/// same uid is all it may signal), that waits for its parent's death
/// (SIGTERM as its parent-death signal) or the target's exit, and on the
/// first SIGKILLs the target through a pidfd. Dropping the guard ends it.
#[derive(Debug)]
pub struct Guard {
    pid: i32,
}

impl Guard {
    /// Starts a guard for `pid` (a child of this process, not yet reaped).
    pub fn start(pid: u32, uid: u32, gid: u32) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let pidfd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(pid as i32).ok_or_else(|| std::io::Error::other("pid 0"))?,
            rustix::process::PidfdFlags::empty(),
        )?;
        let pidfd = pidfd.as_raw_fd();
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: the child makes only raw system calls on values prepared
        // before the fork (no allocation, no lock), and leaves with _exit.
        match unsafe { libc::fork() } {
            -1 => Err(std::io::Error::last_os_error()),
            0 => unsafe { guard_child(parent, pidfd, uid, gid) },
            child => Ok(Self { pid: child }),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid as u32
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: our own child, reaped here and nowhere else.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// The guard's whole life, in the forked child.
///
/// # Safety
/// Only in the child of a fork; never returns.
unsafe fn guard_child(parent: i32, pidfd: i32, uid: u32, gid: u32) -> ! {
    // Keep only the pidfd (as 0) and a signalfd (as 1): the guard must not
    // hold the parent's sockets, pipes or files open.
    libc::dup2(pidfd, 0);
    let mut set: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut set);
    libc::sigaddset(&mut set, libc::SIGTERM);
    libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    let sfd = libc::signalfd(-1, &set, 0);
    if sfd < 0 || libc::dup2(sfd, 1) < 0 {
        libc::_exit(1);
    }
    libc::syscall(libc::SYS_close_range, 2u32, u32::MAX, 0u32);
    if drop_ids(uid, gid).is_err() {
        libc::syscall(libc::SYS_pidfd_send_signal, 0, libc::SIGKILL, std::ptr::null::<libc::siginfo_t>(), 0);
        libc::_exit(1);
    }
    // After the uid change, which clears it.
    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0);
    let orphaned = libc::getppid() != parent;
    let mut fds = [
        libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: 1, events: libc::POLLIN, revents: 0 },
    ];
    while !orphaned && libc::poll(fds.as_mut_ptr(), 2, -1) < 0 {}
    if orphaned || fds[1].revents != 0 {
        libc::syscall(libc::SYS_pidfd_send_signal, 0, libc::SIGKILL, std::ptr::null::<libc::siginfo_t>(), 0);
    }
    libc::_exit(0)
}

/// Empties the capability bounding set (needs CAP_SETPCAP; unknown
/// capability numbers fail harmlessly). Async-signal-safe.
pub fn drop_bounding_set() {
    for cap in 0..=63 {
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
    }
}

/// `runv-vmm --jail uid=U,gid=G,root=DIR`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailArg {
    pub uid: u32,
    pub gid: u32,
    pub root: PathBuf,
}

impl std::str::FromStr for JailArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut uid, mut gid, mut root) = (None, None, None);
        for part in s.split(',') {
            let (key, value) = part.split_once('=').ok_or_else(|| format!("'{part}' is not key=value"))?;
            let id = || {
                value
                    .parse::<u32>()
                    .ok()
                    .filter(|&v| v != 0)
                    .ok_or_else(|| format!("{key} '{value}' is not a non-zero id"))
            };
            match key {
                "uid" => uid = Some(id()?),
                "gid" => gid = Some(id()?),
                "root" if Path::new(value).is_absolute() => root = Some(PathBuf::from(value)),
                "root" => return Err(format!("root '{value}' is not an absolute path")),
                _ => return Err(format!("unknown jail key '{key}' (uid, gid, root)")),
            }
        }
        match (uid, gid, root) {
            (Some(uid), Some(gid), Some(root)) => Ok(JailArg { uid, gid, root }),
            _ => Err("a jail needs uid, gid and root".into()),
        }
    }
}

/// Moves the calling process into its jail, after [`enter_pid_namespace`]:
/// new mount, IPC, UTS and network namespaces, `pivot_root` into
/// `jail.root` (remounted nosuid, nodev, noexec), then the jail's uid and
/// gid with no capabilities and no_new_privs, and SIGKILL as its
/// parent-death signal. The process must still be single-threaded (a
/// namespace or root change reaches only the calling thread) and keeps
/// every descriptor it has open. Relative paths resolve in the jail
/// before and after.
pub fn enter(jail: &JailArg, pid_namespace: PidNamespace) -> Result<(), String> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    use nix::sched::{unshare, CloneFlags};
    single_threaded("entering the jail")?;
    fn step(what: &'static str) -> impl Fn(nix::Error) -> String {
        move |e| format!("{what}: {e}")
    }
    let parent_alive = pid_namespace.0;
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWNET)
        .map_err(step("unsharing namespaces"))?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(step("making mounts private"))?;
    let root = &jail.root;
    mount(Some(root), root, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(step("binding the jail"))?;
    let locked = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(None::<&str>, root, None::<&str>, locked, None::<&str>).map_err(step("locking the jail mount"))?;
    nix::unistd::chdir(root).map_err(step("entering the jail directory"))?;
    nix::unistd::pivot_root(".", ".").map_err(step("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step("detaching the host's root"))?;
    nix::unistd::chdir("/").map_err(step("chdir /"))?;
    drop_ids(jail.uid, jail.gid).map_err(|e| format!("changing to uid {} gid {}: {e}", jail.uid, jail.gid))?;
    // A change of uid clears the parent-death signal: set it again, then
    // go if the reaper went before it was set (its end of the pipe closed;
    // its pid is not visible from this namespace).
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    if is_closed(&parent_alive) {
        return Err("the reaper outside the jail's PID namespace is gone".into());
    }
    Ok(())
}

fn single_threaded(what: &str) -> Result<(), String> {
    let threads = std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(1);
    if threads != 1 {
        return Err(format!("{what} needs a single-threaded process, this one has {threads} threads"));
    }
    Ok(())
}

/// The jail's PID namespace, entered: the read end of a pipe whose write
/// end only the reaper holds (its closing means the reaper is gone).
pub struct PidNamespace(OwnedFd);

/// The first step into a jail: unshares the PID namespace and forks. The
/// caller goes on in the child, pid 1 of the new namespace; the process
/// that was started stays outside as its [reaper](reap) and never returns
/// from here. Call it before creating anything bound to the process's
/// memory (a KVM VM belongs to the address space that created it, which a
/// fork does not carry over), while single-threaded.
pub fn enter_pid_namespace(jail: &JailArg) -> Result<PidNamespace, String> {
    use std::os::fd::AsRawFd;
    single_threaded("entering the jail's PID namespace")?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID)
        .map_err(|e| format!("unsharing the PID namespace: {e}"))?;
    let (alive_rx, alive_tx) = rustix::pipe::pipe().map_err(|e| format!("a pipe for the reaper: {e}"))?;
    let runv = std::os::unix::process::parent_id() as libc::pid_t;
    // The reaper's signals are blocked before the fork, so none sent the
    // moment the init exists is lost (an ignored signal that is not
    // blocked is discarded), and SIGCHLD is the default, so the init's
    // exit is never reaped away unseen by an inherited SIG_IGN.
    // SAFETY: signal calls on sets owned here.
    let old = unsafe {
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        libc::sigprocmask(libc::SIG_BLOCK, &reaper_signals(), &mut old);
        old
    };
    // SAFETY: the process is single-threaded (checked by the caller); the
    // parent makes only raw system calls from here on (see reap).
    match unsafe { libc::fork() } {
        -1 => Err(format!("forking the jail's init: {}", std::io::Error::last_os_error())),
        0 => {
            // SAFETY: restoring the mask the process had.
            unsafe { libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
            drop(alive_tx);
            // SAFETY: prctl with integer arguments.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
            if is_closed(&alive_rx) {
                return Err("the reaper outside the jail's PID namespace is gone".into());
            }
            Ok(PidNamespace(alive_rx))
        }
        child => {
            drop(alive_rx);
            reap(child, jail, runv, alive_tx.as_raw_fd())
        }
    }
}

/// Whether the write end of the pipe `rx` reads from is closed everywhere.
fn is_closed(rx: &OwnedFd) -> bool {
    let mut fds = [rustix::event::PollFd::new(rx, rustix::event::PollFlags::IN)];
    let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
    rustix::event::poll(&mut fds, Some(&zero)).is_ok_and(|n| n > 0)
        && fds[0].revents().intersects(rustix::event::PollFlags::HUP | rustix::event::PollFlags::ERR)
}

/// The reaper: the process runv started, left outside the jail's PID
/// namespace holding nothing but stdio and the pipe that tells the jail's
/// init it lives. It drops to the jail's uid (no capability,
/// no_new_privs, SIGKILL as its own parent-death signal, so runv's death
/// ends it and, through the init's parent-death signal, the VM), narrows
/// itself to the few system calls below, and waits: SIGTERM, SIGINT,
/// SIGHUP or SIGQUIT SIGKILL the init; the init's end becomes its own (the
/// same exit code, or death by the same signal), so runv sees the VMM's
/// exit as if there were no reaper.
fn reap(child: libc::pid_t, jail: &JailArg, runv: libc::pid_t, alive_tx: std::os::fd::RawFd) -> ! {
    let filter = reaper_filter();
    // SAFETY: raw system calls on values owned here; nothing below
    // allocates or takes a lock once the filter is built.
    unsafe {
        // Its own name: `ps` and tests tell it from the VMM it reaps.
        libc::prctl(libc::PR_SET_NAME, REAPER_NAME.as_ptr(), 0, 0, 0);
        // Blocked since before the fork (enter_pid_namespace).
        let set = reaper_signals();
        let fail = |_why: &str| -> ! {
            libc::kill(child, libc::SIGKILL);
            libc::_exit(1)
        };
        // The VM's descriptors (KVM, disks, taps, boot files) are the init's alone.
        let above = |fd: i32| (fd + 1) as libc::c_uint;
        libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, (alive_tx - 1).max(2) as libc::c_uint, 0);
        libc::syscall(libc::SYS_close_range, above(alive_tx), libc::c_uint::MAX, 0);
        if drop_ids(jail.uid, jail.gid).is_err() {
            fail("ids");
        }
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        if libc::getppid() != runv {
            fail("runv is gone");
        }
        match &filter {
            Ok(f) if seccompiler::apply_filter(f).is_ok() => {}
            _ => fail("seccomp"),
        }
        // A kill the init is not yet open to: until it has dropped to the
        // jail's uid (a moment after the fork) it is root, and a signal
        // from this uid fails with EPERM. Retried every 20 ms until it
        // lands (or the init is gone).
        let mut kill_pending = false;
        let retry = libc::timespec { tv_sec: 0, tv_nsec: 20_000_000 };
        loop {
            if kill_pending && (libc::kill(child, libc::SIGKILL) == 0 || *libc::__errno_location() != libc::EPERM) {
                kill_pending = false;
            }
            let mut status = 0;
            if libc::waitpid(child, &mut status, libc::WNOHANG) == child {
                if libc::WIFSIGNALED(status) {
                    let sig = libc::WTERMSIG(status);
                    libc::signal(sig, libc::SIG_DFL);
                    let mut only: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut only);
                    libc::sigaddset(&mut only, sig);
                    libc::sigprocmask(libc::SIG_UNBLOCK, &only, std::ptr::null_mut());
                    libc::kill(libc::getpid(), sig);
                    libc::_exit(128 + sig);
                }
                libc::_exit(libc::WEXITSTATUS(status));
            }
            let sig = if kill_pending {
                libc::sigtimedwait(&set, std::ptr::null_mut(), &retry)
            } else {
                libc::sigwaitinfo(&set, std::ptr::null_mut())
            };
            if sig > 0 && sig != libc::SIGCHLD {
                kill_pending = true;
            }
        }
    }
}

/// The signals the reaper waits for: its child's end and the four that
/// end the jail.
fn reaper_signals() -> libc::sigset_t {
    // SAFETY: filling a set owned here.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT] {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// The reaper's process name (`/proc/PID/comm`; its command line stays
/// runv-vmm's).
pub const REAPER_NAME: &std::ffi::CStr = c"runv-vmm-reaper";

/// The reaper's seccomp filter: waiting, signals, its own end; anything
/// else kills it (and so, by its parent-death signal, the jail's init).
fn reaper_filter() -> Result<seccompiler::BpfProgram, String> {
    use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
    let allowed = [
        libc::SYS_wait4,
        libc::SYS_rt_sigtimedwait,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigreturn,
        libc::SYS_kill,
        libc::SYS_getpid,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ];
    let rules = allowed.into_iter().map(|nr| (nr, Vec::new())).collect();
    let filter = SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| e.to_string())?;
    filter.try_into().map_err(|e: seccompiler::BackendError| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the kernel says of `pid` and its descendants: state, where it
    /// sleeps, its signals and its kernel stack (for a child that hung).
    fn describe_tree(pid: i32) -> String {
        let mut out = String::new();
        let mut todo = vec![pid];
        while let Some(p) = todo.pop() {
            let read = |f: &str| std::fs::read_to_string(format!("/proc/{p}/{f}")).unwrap_or_default();
            let status: Vec<String> = read("status")
                .lines()
                .filter(|l| {
                    ["State", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "Uid", "Seccomp"].iter().any(|k| l.starts_with(k))
                })
                .map(str::to_string)
                .collect();
            out += &format!("pid {p}: {}; wchan {}; stack:\n{}\n", status.join(", "), read("wchan"), read("stack"));
            let children = read(&format!("task/{p}/children"));
            todo.extend(children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
        }
        out
    }

    /// Waits up to 20 s for the test's child `pid` and returns its wait
    /// status; a child still running then is SIGKILLed and the test fails
    /// (a hang here once held a CI run for its whole time).
    fn wait_child(pid: i32) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut status = 0;
        // SAFETY: waiting for a child of this test.
        while unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == 0 {
            if Instant::now() > deadline {
                let report = describe_tree(pid);
                // SAFETY: ending the test's own child before failing.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                panic!("the child {pid} did not end within 20 s:\n{report}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        status
    }

    #[test]
    fn jail_arguments_parse_or_say_why_not() {
        let a: JailArg = "uid=990000001,gid=990000001,root=/run/x/jail".parse().unwrap();
        assert_eq!(a, JailArg { uid: 990000001, gid: 990000001, root: "/run/x/jail".into() });
        for (bad, why) in [
            ("uid=0,gid=5,root=/j", "non-zero"),
            ("uid=5,gid=5,root=j", "absolute"),
            ("uid=5,gid=5", "needs uid, gid and root"),
            ("uid=5,gid=5,root=/j,caps=all", "unknown jail key 'caps'"),
            ("uid", "key=value"),
        ] {
            let e = bad.parse::<JailArg>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn cgroup_paths_stay_below_the_hierarchy() {
        assert_eq!(relative_cgroup(Path::new("/kubepods/pod1/abc")).unwrap(), Path::new("kubepods/pod1/abc"));
        assert_eq!(relative_cgroup(Path::new("runv/x")).unwrap(), Path::new("runv/x"));
        for bad in ["/a/../../etc", "/", "./a", ""] {
            assert!(relative_cgroup(Path::new(bad)).is_err(), "{bad}");
        }
    }

    /// A process that entered a jail sees only the jail directory, is the
    /// jail's uid with no capability, has no network, and still reaches
    /// the sockets the host put in its jail (by relative name).
    #[test]
    fn attack_a_jailed_process_reaches_nothing_but_its_jail() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIP attack_a_jailed_process_reaches_nothing_but_its_jail: needs root");
            return;
        }
        println!("ATTACK a jailed process reaching host files, network or privilege: tried");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("host-secret"), b"secret").unwrap();
        let root = dir.path().join("jail");
        let uid = 990_065_000;
        make_jail_dir(&root, uid).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(root.join("host.sock")).unwrap();
        std::os::unix::fs::chown(root.join("host.sock"), Some(uid), Some(uid)).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        let arg = JailArg { uid, gid: uid, root: root.clone() };
        std::env::set_current_dir(&root).unwrap();
        // SAFETY: the child runs the checks below and leaves with _exit;
        // no other thread of this test process holds a lock it needs.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let mut failures = 0u8;
            let mut check = |bit: u8, ok: bool| {
                if !ok {
                    failures |= bit;
                }
            };
            check(1, enter_pid_namespace(&arg).and_then(|ns| enter(&arg, ns)).is_ok());
            // SAFETY: getuid/getgid have no preconditions.
            check(2, unsafe { libc::getuid() == uid && libc::getgid() == uid });
            let names: Vec<_> =
                std::fs::read_dir("/").map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
            check(4, names == ["host.sock"] && std::fs::metadata("/etc/passwd").is_err());
            check(8, std::os::unix::net::UnixStream::connect("host.sock").is_ok());
            check(16, std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
            // No capability: the bounding set lacks CAP_SYS_ADMIN (21) and
            // chown fails.
            // SAFETY: prctl with integer arguments.
            check(32, unsafe { libc::prctl(libc::PR_CAPBSET_READ, 21, 0, 0, 0) } == 0);
            check(64, std::os::unix::fs::chown("host.sock", Some(0), Some(0)).is_err());
            // The init of a PID namespace of its own: no host process to see or signal.
            // SAFETY: getpid and kill with integer arguments.
            check(128, unsafe { libc::getpid() == 1 && libc::kill(-1, 0) != 0 });
            // SAFETY: leaving the forked child without running the parent's destructors.
            unsafe { libc::_exit(i32::from(failures)) };
        }
        let status = wait_child(pid);
        std::env::set_current_dir("/").unwrap();
        assert!(libc::WIFEXITED(status), "the jailed child died: {status:#x}");
        let failures = libc::WEXITSTATUS(status);
        listener.set_nonblocking(true).unwrap();
        assert!(listener.accept().is_ok(), "the jailed child reached its socket");
        assert_eq!(failures, 0, "failed checks (bits: 1 enter, 2 ids, 4 only the jail visible, 8 its socket, 16 no network, 32 no bounding set, 64 no chown, 128 pid 1 alone)");
        assert_eq!(std::fs::read(dir.path().join("host-secret")).unwrap(), b"secret");
        println!("ATTACK a jailed process reaching host files, network or privilege: held");
    }

    /// The reaper outside the jail's PID namespace: a SIGTERM to it (what
    /// runv's process handling may send) SIGKILLs the init and the reaper
    /// ends the same way; runv's death (the reaper SIGKILLed) ends the init.
    #[test]
    fn the_jails_init_ends_with_its_reaper_and_the_reaper_with_it() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIP the_jails_init_ends_with_its_reaper_and_the_reaper_with_it: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("jail");
        make_jail_dir(&root, 990_065_001).unwrap();
        let arg = JailArg { uid: 990_065_001, gid: 990_065_001, root };
        let start = || {
            // SAFETY: the child enters the jail and sleeps; it leaves with _exit.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                let code = if enter_pid_namespace(&arg).and_then(|ns| enter(&arg, ns)).is_ok() { 0 } else { 1 };
                if code == 0 {
                    // SAFETY: waiting for a signal.
                    unsafe { libc::pause() };
                }
                // SAFETY: leaving the forked child.
                unsafe { libc::_exit(code) };
            }
            // The init is the reaper's only child.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
                if let Some(init) = children.split_whitespace().next() {
                    return (pid, init.parse::<i32>().unwrap());
                }
                assert!(Instant::now() < deadline, "the jail's init never started");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let gone = |pid: i32| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z ")) {
                assert!(Instant::now() < deadline, "process {pid} outlived its reaper");
                std::thread::sleep(Duration::from_millis(10));
            }
        };

        let (reaper, init) = start();
        // SAFETY: signalling the reaper forked above.
        unsafe { libc::kill(reaper, libc::SIGTERM) };
        let status = wait_child(reaper);
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL, "status {status:#x}");
        gone(init);

        let (reaper, init) = start();
        // SAFETY: as above.
        unsafe { libc::kill(reaper, libc::SIGKILL) };
        wait_child(reaper);
        gone(init);
    }
}
