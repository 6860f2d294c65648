//! Processes the agent runs: spawning into a root directory, their stdio,
//! and the reaper that collects every child's exit (the agent is PID 1, or
//! a child subreaper on a host).

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use runv_proto::agent::RunProcessRequest;
use tokio::sync::watch;

use crate::stream::FdStream;

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How a process ended, in the shell's convention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitStatus {
    pub status: i32,
    pub signal: u32,
}

impl ExitStatus {
    fn from_wait(status: WaitStatus) -> Option<Self> {
        match status {
            WaitStatus::Exited(_, code) => Some(Self { status: code, signal: 0 }),
            WaitStatus::Signaled(_, sig, _) => Some(Self { status: 128 + sig as i32, signal: sig as u32 }),
            _ => None,
        }
    }
}

pub struct Process {
    pub pid: i32,
    pub stdin: tokio::sync::Mutex<Option<FdStream>>,
    stdout: Option<Arc<OutputBuffer>>,
    stderr: Option<Arc<OutputBuffer>>,
    /// The pty master, kept for window resizes.
    pub tty: Option<OwnedFd>,
    exit_tx: watch::Sender<Option<ExitStatus>>,
}

impl Process {
    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit_tx.borrow()
    }

    pub async fn wait(&self) -> ExitStatus {
        let mut rx = self.exit_tx.subscribe();
        loop {
            if let Some(status) = *rx.borrow_and_update() {
                return status;
            }
            // The sender lives as long as `self`, so this cannot fail.
            let _ = rx.changed().await;
        }
    }

    /// Long-poll read of stdout (or stderr): waits for data, returns at
    /// most `max` bytes, or an empty vector at end of stream.
    pub async fn read_output(&self, stderr: bool, max: usize) -> Vec<u8> {
        match if stderr { &self.stderr } else { &self.stdout } {
            Some(buffer) => buffer.read(max).await,
            None => Vec::new(),
        }
    }

    pub fn signal(&self, signal: i32) -> Result<()> {
        if self.exit_status().is_some() {
            bail!("process {} has already exited", self.pid);
        }
        let sig = Signal::try_from(signal).with_context(|| format!("invalid signal number {signal}"))?;
        nix::sys::signal::kill(Pid::from_raw(self.pid), sig).with_context(|| format!("signalling process {}", self.pid))
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        let Some(tty) = &self.tty else {
            bail!("process {} has no terminal", self.pid);
        };
        let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads a winsize we own.
        if unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
            return Err(io::Error::last_os_error()).context("setting the terminal size");
        }
        Ok(())
    }
}

/// How much of a process's stdout (and of its stderr) the agent holds for
/// a reader that is slow to come: the process writes on without waiting
/// for the host's round trips; only a reader that stops altogether makes
/// it wait once this is full.
pub const OUTPUT_BUFFER_BYTES: usize = 1 << 20;

/// One output stream, drained continuously into a bounded buffer by its
/// own task and read from the buffer by the long-poll calls.
pub struct OutputBuffer {
    state: Mutex<OutputState>,
    data_ready: tokio::sync::Notify,
    space_ready: tokio::sync::Notify,
}

#[derive(Default)]
struct OutputState {
    data: std::collections::VecDeque<u8>,
    eof: bool,
}

impl OutputBuffer {
    /// Starts draining `fd`. Once the process has exited the stream is only
    /// drained of what is there, so a grandchild that keeps it open cannot
    /// hold readers forever.
    fn pump(fd: OwnedFd, mut exit_rx: watch::Receiver<Option<ExitStatus>>) -> io::Result<Arc<Self>> {
        let stream = FdStream::new(fd)?;
        let buffer =
            Arc::new(Self { state: Mutex::default(), data_ready: Default::default(), space_ready: Default::default() });
        let b = buffer.clone();
        tokio::spawn(async move {
            loop {
                let space = OUTPUT_BUFFER_BYTES.saturating_sub(b.lock().data.len());
                if space == 0 {
                    let notified = b.space_ready.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    if b.lock().data.len() >= OUTPUT_BUFFER_BYTES {
                        notified.await;
                    }
                    continue;
                }
                let exited = exit_rx.borrow_and_update().is_some();
                match stream.try_read(space.min(64 * 1024)) {
                    Ok(Some(data)) if data.is_empty() => break,
                    Ok(Some(data)) => {
                        b.lock().data.extend(data);
                        b.data_ready.notify_waiters();
                    }
                    Ok(None) if exited => break,
                    Ok(None) => {
                        tokio::select! {
                            r = stream.readable() => if r.is_err() { break },
                            _ = exit_rx.changed() => {}
                        }
                    }
                    Err(_) => break,
                }
            }
            b.lock().eof = true;
            b.data_ready.notify_waiters();
        });
        Ok(buffer)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutputState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn read(&self, max: usize) -> Vec<u8> {
        loop {
            let notified = self.data_ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                if !state.data.is_empty() {
                    let n = max.min(state.data.len());
                    let chunk: Vec<u8> = state.data.drain(..n).collect();
                    drop(state);
                    self.space_ready.notify_waiters();
                    return chunk;
                }
                if state.eof {
                    return Vec::new();
                }
            }
            notified.await;
        }
    }
}

/// Our ends of a process's stdio.
#[derive(Default)]
pub struct ProcessIo {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    /// The pty master, when the process has a terminal.
    pub tty: Option<OwnedFd>,
}

/// The process's ends of its stdio pipes.
pub struct ChildIo {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

impl ProcessIo {
    /// Three pipes: ours and the child's ends.
    pub fn pipes() -> Result<(Self, ChildIo)> {
        let (in_r, in_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let ours = Self { stdin: Some(in_w), stdout: Some(out_r), stderr: Some(err_r), tty: None };
        Ok((ours, ChildIo { stdin: in_r, stdout: out_w, stderr: err_w }))
    }

    /// A terminal: stdin and stdout both go through the pty master.
    pub fn terminal(master: OwnedFd) -> Result<Self> {
        set_cloexec(&master)?;
        Ok(Self {
            stdin: Some(master.try_clone()?),
            stdout: Some(master.try_clone()?),
            stderr: None,
            tty: Some(master),
        })
    }
}

/// How many exits of processes nobody registered (yet) are remembered.
const MAX_UNCLAIMED_EXITS: usize = 1024;

#[derive(Default)]
struct Children {
    by_pid: HashMap<i32, Arc<Process>>,
    /// Exits reaped before their process was registered (a container init
    /// that dies at once), or of orphans nobody will ask about.
    unclaimed: HashMap<i32, ExitStatus>,
    unclaimed_order: std::collections::VecDeque<i32>,
}

/// Every process the agent watches, by pid, and the reaper that collects
/// every child's exit.
#[derive(Clone)]
pub struct ProcessTable {
    children: Arc<Mutex<Children>>,
    /// Held (shared) while a child is being spawned, and (exclusive) by the
    /// reaper: when exec fails, the standard library waits for the child
    /// itself, and a reaper that collected it first would make that wait
    /// fail and panic.
    spawning: Arc<std::sync::RwLock<()>>,
}

impl ProcessTable {
    /// Creates the table and starts the reaper on the current runtime.
    pub fn new() -> Result<Self> {
        // On a host the agent is no PID 1; become the reaper of our subtree.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let table = Self { children: Arc::default(), spawning: Arc::default() };
        let mut sigchld =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).context("listening for SIGCHLD")?;
        let reaper = table.clone();
        tokio::spawn(async move {
            loop {
                reaper.reap();
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(table)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Children> {
        self.children.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Collects every exited child; watched ones get their status recorded.
    fn reap(&self) {
        let _no_spawn = self.spawning.write().unwrap_or_else(|e| e.into_inner());
        let mut children = self.lock();
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => {
                    let (Some(pid), Some(exit)) = (status.pid(), ExitStatus::from_wait(status)) else {
                        continue;
                    };
                    let pid = pid.as_raw();
                    if let Some(process) = children.by_pid.remove(&pid) {
                        process.exit_tx.send_replace(Some(exit));
                    } else {
                        children.unclaimed.insert(pid, exit);
                        children.unclaimed_order.push_back(pid);
                        while children.unclaimed_order.len() > MAX_UNCLAIMED_EXITS {
                            if let Some(old) = children.unclaimed_order.pop_front() {
                                children.unclaimed.remove(&old);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Watches `pid` (a child or an orphan we reap) with its stdio.
    pub fn register(&self, pid: i32, io: ProcessIo) -> Result<Arc<Process>> {
        let (exit_tx, _) = watch::channel(None);
        let process = Arc::new(Process {
            pid,
            stdin: tokio::sync::Mutex::new(io.stdin.map(FdStream::new).transpose()?),
            stdout: io.stdout.map(|fd| OutputBuffer::pump(fd, exit_tx.subscribe())).transpose()?,
            stderr: io.stderr.map(|fd| OutputBuffer::pump(fd, exit_tx.subscribe())).transpose()?,
            tty: io.tty,
            exit_tx,
        });
        let mut children = self.lock();
        if let Some(exit) = children.unclaimed.remove(&pid) {
            children.unclaimed_order.retain(|p| *p != pid);
            process.exit_tx.send_replace(Some(exit));
        } else {
            children.by_pid.insert(pid, process.clone());
        }
        Ok(process)
    }

    /// Spawns `cmd` and watches it; its exit status comes from the reaper.
    pub fn spawn_command(&self, cmd: &mut Command, io: ProcessIo) -> io::Result<Arc<Process>> {
        let child = {
            let _spawning = self.spawning.read().unwrap_or_else(|e| e.into_inner());
            cmd.spawn()?
        };
        self.register(child.id() as i32, io).map_err(io::Error::other)
    }

    /// Starts a process as the request describes.
    pub fn spawn(&self, req: &RunProcessRequest) -> Result<Arc<Process>, SpawnError> {
        self.try_spawn(req).map_err(|e| match e.downcast::<SpawnError>() {
            Ok(spawn) => spawn,
            Err(other) => SpawnError::Invalid(format!("{other:#}")),
        })
    }

    fn try_spawn(&self, req: &RunProcessRequest) -> Result<Arc<Process>> {
        if req.args.is_empty() {
            bail!("no command given (args is empty)");
        }
        let root = non_empty_or(&req.root, "/");
        let cwd = non_empty_or(&req.cwd, "/");
        if !root.starts_with('/') {
            bail!("root '{root}' is not an absolute path");
        }
        if !cwd.starts_with('/') {
            bail!("cwd '{cwd}' is not an absolute path");
        }
        if !std::path::Path::new(root).is_dir() {
            bail!("root '{root}' is not a directory in the guest");
        }
        if !std::path::Path::new(root).join(cwd.trim_start_matches('/')).is_dir() {
            bail!("cwd '{cwd}' is not a directory in root '{root}'");
        }
        let setup = ChildSetup::new(root, cwd, req.terminal)?;

        let mut cmd = Command::new(&req.args[0]);
        cmd.args(&req.args[1..]).env_clear();
        let mut has_path = false;
        for kv in &req.env {
            let Some((k, v)) = kv.split_once('=') else {
                bail!("environment entry '{kv}' is not KEY=VALUE");
            };
            has_path |= k == "PATH";
            cmd.env(k, v);
        }
        if !has_path {
            let (k, v) = DEFAULT_PATH.split_once('=').expect("constant has '='");
            cmd.env(k, v);
        }

        let io = if req.terminal {
            let pty = nix::pty::openpty(
                Some(&nix::pty::Winsize {
                    ws_row: req.rows.clamp(1, u16::MAX as u32) as u16,
                    ws_col: req.cols.clamp(1, u16::MAX as u32) as u16,
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                }),
                None,
            )
            .context("opening a pty")?;
            cmd.stdin(Stdio::from(pty.slave.try_clone()?))
                .stdout(Stdio::from(pty.slave.try_clone()?))
                .stderr(Stdio::from(pty.slave));
            ProcessIo::terminal(pty.master)?
        } else {
            let (ours, child) = ProcessIo::pipes()?;
            cmd.stdin(Stdio::from(child.stdin)).stdout(Stdio::from(child.stdout)).stderr(Stdio::from(child.stderr));
            ours
        };

        // SAFETY: the closure only makes async-signal-safe system calls on
        // data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || setup.enter());
        }
        self.spawn_command(&mut cmd, io).map_err(|e| spawn_error(&req.args[0], e))
    }

    /// Kills every process the agent watches.
    pub fn kill_all(&self) {
        for pid in self.lock().by_pid.keys() {
            let _ = nix::sys::signal::kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
    }
}

/// Why a process could not be started; the service maps each kind to its
/// own status code so callers can tell "not found" from bad requests.
#[derive(Debug)]
pub enum SpawnError {
    NotFound(String),
    PermissionDenied(String),
    Invalid(String),
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpawnError::NotFound(m) | SpawnError::PermissionDenied(m) | SpawnError::Invalid(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for SpawnError {}

fn spawn_error(program: &str, e: io::Error) -> anyhow::Error {
    let err = match e.kind() {
        io::ErrorKind::NotFound => SpawnError::NotFound(format!("executable file not found: '{program}'")),
        io::ErrorKind::PermissionDenied => {
            SpawnError::PermissionDenied(format!("permission denied executing '{program}'"))
        }
        _ => SpawnError::Invalid(format!("cannot start '{program}': {e}")),
    };
    err.into()
}

fn non_empty_or<'a>(s: &'a str, default: &'a str) -> &'a str {
    if s.is_empty() {
        default
    } else {
        s
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors that we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error()).context("creating a pipe");
    }
    // SAFETY: both descriptors were just created and are owned by no one else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn set_cloexec(fd: &OwnedFd) -> Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error()).context("setting FD_CLOEXEC");
    }
    Ok(())
}

/// What the child does between fork and exec: a session of its own, the
/// terminal, a private mount namespace with /proc, /sys and /dev in the new
/// root, then chroot and chdir. Everything is prepared before the fork.
struct ChildSetup {
    root: CString,
    cwd: CString,
    terminal: bool,
    mounts: Vec<(CString, CString, CString, libc::c_ulong)>,
}

impl ChildSetup {
    fn new(root: &str, cwd: &str, terminal: bool) -> Result<Self> {
        let mut mounts = Vec::new();
        if root != "/" {
            let base = std::path::Path::new(root);
            for (source, target, fstype, flags) in [
                ("proc", "proc", "proc", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC),
                ("sysfs", "sys", "sysfs", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY),
                ("/dev", "dev", "", libc::MS_BIND | libc::MS_REC),
            ] {
                let path = base.join(target);
                if path.is_dir() {
                    mounts.push((cstr(source)?, cstr(path.to_str().unwrap_or_default())?, cstr(fstype)?, flags));
                }
            }
        }
        Ok(Self { root: cstr(root)?, cwd: cstr(cwd)?, terminal, mounts })
    }

    fn enter(&self) -> io::Result<()> {
        // SAFETY: raw system calls on pre-built C strings, in the forked child.
        unsafe {
            check(libc::setsid())?;
            if self.terminal {
                check(libc::ioctl(0, libc::TIOCSCTTY, 0))?;
            }
            if !self.mounts.is_empty() {
                check(libc::unshare(libc::CLONE_NEWNS))?;
                check(libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                for (source, target, fstype, flags) in &self.mounts {
                    let fstype = if fstype.is_empty() { std::ptr::null() } else { fstype.as_ptr() };
                    check(libc::mount(source.as_ptr(), target.as_ptr(), fstype, *flags, std::ptr::null()))?;
                }
            }
            check(libc::chroot(self.root.as_ptr()))?;
            check(libc::chdir(self.cwd.as_ptr()))?;
        }
        Ok(())
    }
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn cstr(s: &str) -> Result<CString> {
    CString::new(s).with_context(|| format!("'{s}' contains a NUL byte"))
}
