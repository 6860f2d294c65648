//! Host processes a sandbox runs beside it (QEMU, virtiofsd,
//! vhost-device-vsock): started with their output in a log file, tied to
//! our lifetime, and always killed and reaped when dropped.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
#[error("starting {name} ({program}): {source}")]
pub struct SpawnError {
    name: &'static str,
    program: String,
    source: std::io::Error,
}

/// How a helper ended. The status is unknown when another reaper in this
/// process (the containerd shim's) collected it first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HelperExit(pub Option<ExitStatus>);

impl HelperExit {
    pub fn success(&self) -> bool {
        self.0.is_some_and(|s| s.success())
    }

    /// The exit code, if the process exited (rather than being killed).
    pub fn code(&self) -> Option<i32> {
        self.0.and_then(|s| s.code())
    }
}

impl std::fmt::Display for HelperExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(status) => write!(f, "{status}"),
            None => f.write_str("status collected by another reaper"),
        }
    }
}

pub struct HelperProcess {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
    exit: Option<HelperExit>,
}

impl HelperProcess {
    /// Starts `cmd` with stdout and stderr appended to `log`. The child gets
    /// SIGKILL if the thread that started it dies, so a killed runv leaves
    /// no helper behind; start helpers from a long-lived thread.
    pub fn spawn(name: &'static str, mut cmd: Command, log: &Path) -> Result<Self, SpawnError> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let err = |source| SpawnError { name, program: program.clone(), source };
        let out = File::options().create(true).append(true).open(log).map_err(err)?;
        let errf = out.try_clone().map_err(err)?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(errf);
        // SAFETY: prctl with integer arguments is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(err)?;
        Ok(Self { name, child: Some(child), log: log.to_path_buf(), exit: None })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How the process ended, if it has.
    pub fn try_wait(&mut self) -> Option<HelperExit> {
        if self.exit.is_none() {
            if let Some(child) = self.child.as_mut() {
                self.exit = match child.try_wait() {
                    Ok(status) => status.map(|s| HelperExit(Some(s))),
                    // Reaped by someone else: it has ended all the same.
                    Err(e) if e.raw_os_error() == Some(libc::ECHILD) => Some(HelperExit(None)),
                    Err(_) => None,
                };
            }
        }
        self.exit
    }

    /// Waits up to `timeout` for the process to end on its own.
    pub async fn wait_timeout(&mut self, timeout: Duration) -> Option<HelperExit> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Asks politely (SIGTERM), then kills after `grace`.
    pub async fn terminate(&mut self, grace: Duration) -> Option<HelperExit> {
        if self.try_wait().is_none() {
            if let Some(pid) = self.pid() {
                // SAFETY: signalling our own, not yet reaped child.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            if self.wait_timeout(grace).await.is_none() {
                self.kill();
            }
        }
        self.exit
    }

    /// SIGKILL and reap; idempotent.
    pub fn kill(&mut self) {
        if self.try_wait().is_some() {
            return;
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            self.exit = Some(HelperExit(child.wait().ok()));
        }
    }

    /// The last `lines` lines of the helper's log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

impl Drop for HelperProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The most of a log tail that goes into an error message, in bytes: a
/// guest console or a helper's log is written by a guest that may be
/// hostile, and the message travels to clients and into containerd's logs.
pub const LOG_TAIL_MAX: usize = 600;

/// The last `lines` non-empty lines of a text file, joined by " | ", with
/// control characters shown as '?' and at most `LOG_TAIL_MAX` bytes (the
/// end is kept: it says what happened last).
pub fn log_tail(path: &Path, lines: usize) -> String {
    // Only the end of the file can matter; a flooded log is not read whole.
    let mut text = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        use std::io::{Read, Seek, SeekFrom};
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
        let _ = f.take(64 * 1024).read_to_end(&mut text);
    }
    let text = String::from_utf8_lossy(&text);
    let kept: Vec<String> = text
        .lines()
        .map(|l| l.trim().chars().map(|c| if c.is_control() { '?' } else { c }).collect::<String>())
        .filter(|l| !l.is_empty())
        .collect();
    let joined = kept[kept.len().saturating_sub(lines)..].join(" | ");
    if joined.len() <= LOG_TAIL_MAX {
        return joined;
    }
    let mut start = joined.len() - LOG_TAIL_MAX;
    while !joined.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &joined[start..])
}

/// Waits until `path` exists (a helper's socket), or the helper dies, or
/// `timeout` passes.
pub async fn wait_for_path(helper: &mut HelperProcess, path: &Path, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if path.exists() {
            return Ok(());
        }
        if let Some(status) = helper.try_wait() {
            return Err(format!(
                "{} exited ({status}) before creating {}: {}",
                helper.name(),
                path.display(),
                helper.log_tail(3)
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!("{} did not create {} within {timeout:?}", helper.name(), path.display()));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Lets the child inherit `fds` under the same numbers (they are opened
/// close-on-exec here, so no other child gets them).
pub fn inherit_fds(cmd: &mut Command, fds: Vec<std::os::fd::RawFd>) {
    if fds.is_empty() {
        return;
    }
    // SAFETY: between fork and exec only fcntl runs, which is
    // async-signal-safe; the descriptors are the caller's, open.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Resolves a program name against PATH (a path with a '/' is taken as is).
pub fn find_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|dir| Path::new(dir).join(program)).find(|p| p.is_file())
}

/// Lazily unmounts every mount at or below `dir`, deepest first.
pub fn unmount_below(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir) && p != dir)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW);
    }
}

/// A process as recorded on disk for cleanup after a crash: its pid and its
/// start time (clock ticks after boot, `/proc/PID/stat` field 22), so a pid
/// that was reused by someone else's process is never signalled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessIdentity {
    pub pid: u32,
    pub start_time: u64,
}

impl ProcessIdentity {
    /// The identity of a live process.
    pub fn of(pid: u32) -> Option<Self> {
        Some(Self { pid, start_time: start_time(pid)? })
    }

    /// `"<pid> <start time>"`, one record line.
    pub fn record(&self) -> String {
        format!("{} {}", self.pid, self.start_time)
    }

    /// Parses a record line; a bare pid (an older record) has no identity
    /// to check and is refused.
    pub fn parse(line: &str) -> Option<Self> {
        let mut it = line.split_whitespace();
        let pid = it.next()?.parse().ok()?;
        let start_time = it.next()?.parse().ok()?;
        it.next().is_none().then_some(Self { pid, start_time })
    }

    /// Whether the pid still names the same process.
    pub fn is_alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time)
    }

    /// SIGKILLs the process if it is still the one recorded; true if sent.
    pub fn kill(&self) -> bool {
        // A pidfd pins the process between the check and the signal.
        let Ok(pidfd) = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(self.pid as i32).expect("nonzero"),
            rustix::process::PidfdFlags::empty(),
        ) else {
            return false;
        };
        if !self.is_alive() {
            return false;
        }
        rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL).is_ok()
    }
}

/// Field 22 of `/proc/PID/stat` (after the parenthesised command name,
/// which may itself hold spaces and parentheses).
fn start_time(pid: u32) -> Option<u64> {
    if pid == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Removes `path` and everything below it without following symlinks or
/// crossing a mount still in place (see `FsRoot::remove_all`).
pub fn remove_tree(path: &Path) -> Result<(), crate::fsroot::FsRootError> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else { return Ok(()) };
    match crate::fsroot::FsRoot::open(parent) {
        Ok(root) => root.remove_all(Path::new(name)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates `dir` and its missing parents as 0700 (root's state: nobody else
/// may look in), and makes `dir` itself 0700 if it already existed.
pub fn create_private_dir_all(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Writes `data` to `path` as a 0600 file (records may hold a pod's
/// environment, secrets included).
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = File::options().create(true).write(true).truncate(true).mode(0o600).open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(data)
}

/// This node's hostname ("" if it cannot be read): what a pod in the
/// node's UTS namespace (hostNetwork) has under runc.
pub fn node_hostname() -> String {
    nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default()
}

#[cfg(test)]
mod identity_tests {
    use super::*;

    #[test]
    fn a_recorded_process_is_recognised_and_a_reused_pid_is_not() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let id = ProcessIdentity::of(child.id()).unwrap();
        assert_eq!(ProcessIdentity::parse(&id.record()), Some(id));
        assert!(id.is_alive());
        let stranger = ProcessIdentity { start_time: id.start_time + 1, ..id };
        assert!(!stranger.kill(), "a pid with another start time is not ours");
        assert!(child.try_wait().unwrap().is_none(), "and it was not signalled");
        assert!(id.kill());
        assert!(!child.wait().unwrap().success());
        assert!(!id.is_alive());
        assert_eq!(ProcessIdentity::parse("1234"), None, "a bare pid is not an identity");
    }
}

#[cfg(test)]
mod log_tail_tests {
    use super::*;

    #[test]
    fn a_log_tail_keeps_the_last_lines_and_hides_control_characters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, "one\n\n  two  \nthree\x1b[2J\r\nfour\n").unwrap();
        assert_eq!(log_tail(&path, 3), "two | three?[2J | four");
        assert_eq!(log_tail(&dir.path().join("missing"), 3), "");
    }

    #[test]
    fn attack_a_flooded_log_line_is_cut_to_its_end() {
        println!("ATTACK a one-line console flood into an error message (unit): tried");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut flood = "é".repeat(1 << 20);
        flood.push_str("Kernel panic - not syncing: the end\n");
        std::fs::write(&path, flood).unwrap();
        let tail = log_tail(&path, 5);
        assert!(tail.len() <= LOG_TAIL_MAX + 3, "{} bytes", tail.len());
        assert!(tail.starts_with("...") && tail.ends_with("Kernel panic - not syncing: the end"), "{tail}");
        println!("ATTACK a one-line console flood into an error message (unit): held");
    }
}
