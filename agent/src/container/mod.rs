//! Containers in the guest, from OCI runtime specs, run by youki's
//! libcontainer in a helper process (see `helper`). The agent watches their
//! processes like any other and keeps their stdio.

pub mod cgroup;
pub mod helper;
pub mod init;
pub mod pause;
pub mod spec;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use oci_spec::runtime::{LinuxResources, Process as OciProcess};
use tokio::sync::{mpsc, Mutex};

use crate::process::{Process, ProcessIo, ProcessTable};
use cgroup::Cgroup;
use spec::AllowedRoots;

/// How often cgroups are checked for OOM kills.
const OOM_POLL: Duration = Duration::from_millis(200);

/// Where the agent keeps container state, bundles and console sockets.
#[derive(Clone, Debug)]
pub struct Paths {
    /// libcontainer's state directory.
    pub state: PathBuf,
    /// One bundle directory (config.json, exec process files) per container.
    pub bundles: PathBuf,
    /// The console sockets of terminal processes while they start (short
    /// names: a Unix socket path has at most 108 bytes).
    pub consoles: PathBuf,
    /// The pod's hostname, hosts and resolv.conf, for containers to mount.
    pub sandbox: PathBuf,
    /// What containers may see: rootfs and bind sources must lie here.
    pub allowed: AllowedRoots,
}

struct Container {
    bundle: PathBuf,
    cgroup: Cgroup,
    oom_seen: u64,
}

impl Container {
    /// Whether the kernel OOM-killed in this container since the last
    /// call; counts it as seen.
    fn new_oom_kill(&mut self) -> bool {
        let kills = self.cgroup.oom_kills();
        let new = kills > self.oom_seen;
        self.oom_seen = self.oom_seen.max(kills);
        new
    }
}

pub struct Containers {
    table: ProcessTable,
    paths: Paths,
    containers: Arc<Mutex<HashMap<String, Container>>>,
    oom_rx: Mutex<mpsc::Receiver<String>>,
    oom_tx: mpsc::Sender<String>,
    pause: Mutex<Option<Arc<Process>>>,
    /// Numbers the console sockets of terminal processes.
    console_seq: std::sync::atomic::AtomicU64,
}

/// Why a container call failed, so the service can answer with the
/// matching status code.
#[derive(Debug)]
pub enum ContainerError {
    NotFound(String),
    AlreadyExists(String),
    /// The request itself is wrong (spec, ids, sizes, paths).
    Invalid(String),
    /// The engine or the guest failed to do it.
    Failed(String),
}

impl std::fmt::Display for ContainerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotFound(m) | Self::AlreadyExists(m) | Self::Invalid(m) | Self::Failed(m) => f.write_str(m),
        }
    }
}

fn invalid(e: anyhow::Error) -> ContainerError {
    ContainerError::Invalid(format!("{e:#}"))
}

fn failed(e: anyhow::Error) -> ContainerError {
    ContainerError::Failed(format!("{e:#}"))
}

type CResult<T> = std::result::Result<T, ContainerError>;

/// A started process and its stdio, ready to be watched.
pub struct Started {
    pub process: Arc<Process>,
}

impl Containers {
    pub fn new(table: ProcessTable, paths: Paths) -> Result<Self> {
        for dir in [&paths.state, &paths.bundles, &paths.consoles, &paths.sandbox] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let containers: Arc<Mutex<HashMap<String, Container>>> = Arc::default();
        let (oom_tx, oom_rx) = mpsc::channel(64);
        let watched = containers.clone();
        let poll_tx = oom_tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(OOM_POLL).await;
                let mut map = watched.lock().await;
                for (id, c) in map.iter_mut() {
                    if c.new_oom_kill() {
                        let _ = poll_tx.try_send(id.clone());
                    }
                }
            }
        });
        Ok(Self {
            table,
            paths,
            containers,
            oom_rx: Mutex::new(oom_rx),
            oom_tx,
            pause: Mutex::default(),
            console_seq: Default::default(),
        })
    }

    /// Pod-level setup: hostname, hosts and resolv.conf files, and the
    /// pause process whose namespaces containers join ("pause:pid" paths).
    pub async fn create_sandbox(&self, req: &runv_proto::agent::CreateSandboxRequest, in_guest: bool) -> CResult<()> {
        if !req.sandbox_id.is_empty() {
            spec::check_id("sandbox id", &req.sandbox_id).map_err(invalid)?;
        }
        let hostname = if req.hostname.is_empty() { "runv" } else { req.hostname.as_str() };
        if hostname.len() > 64 || !hostname.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
            return Err(ContainerError::Invalid(format!("hostname '{hostname}' is not a valid host name")));
        }
        let mut resolv = String::new();
        for server in &req.dns_servers {
            if server.parse::<std::net::IpAddr>().is_err() {
                return Err(ContainerError::Invalid(format!("DNS server '{server}' is not an IP address")));
            }
            resolv.push_str(&format!("nameserver {server}\n"));
        }
        for (key, words) in [("search", &req.dns_searches), ("options", &req.dns_options)] {
            if words.iter().any(|w| w.is_empty() || w.contains(char::is_whitespace)) {
                return Err(ContainerError::Invalid(format!("DNS {key} entries must be single words")));
            }
            if !words.is_empty() {
                resolv.push_str(&format!("{key} {}\n", words.join(" ")));
            }
        }
        let hosts = format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n");
        for (name, text) in [("hostname", format!("{hostname}\n")), ("hosts", hosts), ("resolv.conf", resolv)] {
            let path = self.paths.sandbox.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display())).map_err(failed)?;
        }
        if in_guest {
            nix::unistd::sethostname(hostname).context("setting the guest hostname").map_err(failed)?;
        }
        if req.pause {
            let mut pause = self.pause.lock().await;
            if pause.as_ref().is_some_and(|p| p.exit_status().is_none()) {
                return Err(ContainerError::AlreadyExists("the sandbox already has a pause process".into()));
            }
            let args = [pause::SUBCOMMAND, "--hostname", hostname];
            let out = self.agent_subcommand(&args, None).await.map_err(failed)?;
            let pid = parse_pid(&out).map_err(failed)?;
            *pause = Some(self.table.register(pid, ProcessIo::default()).map_err(failed)?);
        }
        Ok(())
    }

    /// The pause process's pid, while it runs.
    pub async fn pause_pid(&self) -> Option<i32> {
        self.pause.lock().await.as_ref().filter(|p| p.exit_status().is_none()).map(|p| p.pid)
    }

    /// Creates a container (its init waits to be started) from spec JSON.
    pub async fn create(&self, id: &str, spec_json: &[u8]) -> CResult<Started> {
        spec::check_id("container id", id).map_err(invalid)?;
        if self.containers.lock().await.contains_key(id) {
            return Err(ContainerError::AlreadyExists(format!("container '{id}' already exists")));
        }
        let pause_pid = self.pause_pid().await;
        let spec = spec::prepare(id, spec_json, &self.paths.allowed, pause_pid).map_err(invalid)?;
        let terminal = spec.process().as_ref().and_then(|p| p.terminal()).unwrap_or(false);
        let cgroup_path = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()).unwrap_or_default();
        let bundle = self.paths.bundles.join(id);
        let _ = std::fs::remove_dir_all(&bundle);
        std::fs::create_dir_all(&bundle).with_context(|| format!("creating {}", bundle.display())).map_err(failed)?;
        let result = async {
            spec.save(bundle.join("config.json")).context("writing config.json")?;
            let bundle_arg = bundle.to_string_lossy().into_owned();
            let (pid, io) = self.run_with_stdio(id, "create", &["--bundle", &bundle_arg], terminal).await?;
            let process = self.table.register(pid, io)?;
            let cgroup = Cgroup::open(&cgroup_path, id)?;
            let oom_seen = cgroup.oom_kills();
            self.containers.lock().await.insert(id.to_string(), Container { bundle: bundle.clone(), cgroup, oom_seen });
            Ok(Started { process })
        }
        .await
        .map_err(failed);
        if result.is_err() {
            let _ = self.helper("delete", id, &["--force"]).await;
            let _ = std::fs::remove_dir_all(&bundle);
        }
        result
    }

    pub async fn start(&self, id: &str) -> CResult<()> {
        self.known(id).await?;
        self.in_process(id, "starting", |c| c.start()).await
    }

    /// Runs an engine call that forks nothing (the agent strips hooks from
    /// specs) in this process, off the async threads.
    async fn in_process(
        &self,
        id: &str,
        what: &'static str,
        op: impl FnOnce(&mut libcontainer::container::Container) -> Result<(), libcontainer::error::LibcontainerError>
            + Send
            + 'static,
    ) -> CResult<()> {
        let dir = self.paths.state.join(id);
        let id = id.to_string();
        tokio::task::spawn_blocking(move || {
            let mut c =
                libcontainer::container::Container::load(dir).with_context(|| format!("loading container '{id}'"))?;
            op(&mut c).with_context(|| format!("{what} container '{id}'"))
        })
        .await
        .map_err(|e| failed(e.into()))?
        .map_err(failed)
    }

    /// SIGKILLs every process of every container (the guest is going away).
    pub async fn kill_all(&self) {
        for c in self.containers.lock().await.values() {
            for pid in c.cgroup.pids().unwrap_or_default() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }

    /// Runs an extra process (OCI Process JSON) in a running container.
    pub async fn exec(&self, id: &str, exec_id: &str, process_json: &[u8]) -> CResult<Started> {
        spec::check_id("exec id", exec_id).map_err(invalid)?;
        let bundle = self.known(id).await?;
        let mut process: OciProcess =
            serde_json::from_slice(process_json).context("malformed OCI process").map_err(invalid)?;
        spec::check_process(&process).map_err(invalid)?;
        spec::normalize_no_new_privileges(&mut process);
        let terminal = process.terminal().unwrap_or(false);
        let file = bundle.join(format!("exec-{exec_id}.json"));
        std::fs::write(&file, serde_json::to_vec(&process).map_err(|e| failed(e.into()))?)
            .with_context(|| format!("writing {}", file.display()))
            .map_err(failed)?;
        let file_arg = file.to_string_lossy().into_owned();
        let result = self.run_with_stdio(id, "exec", &["--process", &file_arg], terminal).await;
        let _ = std::fs::remove_file(&file);
        let (pid, io) = result.map_err(failed)?;
        Ok(Started { process: self.table.register(pid, io).map_err(failed)? })
    }

    pub async fn pause(&self, id: &str) -> CResult<()> {
        self.known(id).await?;
        self.in_process(id, "pausing", |c| c.pause()).await
    }

    pub async fn resume(&self, id: &str) -> CResult<()> {
        self.known(id).await?;
        self.in_process(id, "resuming", |c| c.resume()).await
    }

    pub async fn update(&self, id: &str, resources_json: &[u8]) -> CResult<()> {
        let resources: LinuxResources =
            serde_json::from_slice(resources_json).context("malformed OCI resources").map_err(invalid)?;
        spec::check_resources(&resources).map_err(invalid)?;
        let map = self.containers.lock().await;
        let c = map.get(id).ok_or_else(|| not_found(id))?;
        c.cgroup.update(&resources).map_err(failed)
    }

    pub async fn usage(&self, id: &str) -> CResult<cgroup::Usage> {
        let map = self.containers.lock().await;
        map.get(id).ok_or_else(|| not_found(id))?.cgroup.usage().map_err(failed)
    }

    pub async fn pids(&self, id: &str) -> CResult<Vec<i32>> {
        let map = self.containers.lock().await;
        map.get(id).ok_or_else(|| not_found(id))?.cgroup.pids().map_err(failed)
    }

    /// Removes a container: with `force`, kills what still runs first.
    pub async fn remove(&self, id: &str, force: bool) -> CResult<()> {
        self.known(id).await?;
        if force {
            if let Ok(pids) = self.pids(id).await {
                for pid in pids {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
        let force_arg: &[&str] = if force { &["--force"] } else { &[] };
        self.helper("delete", id, force_arg).await.map_err(failed)?;
        if let Some(c) = self.containers.lock().await.remove(id) {
            let _ = std::fs::remove_dir_all(&c.bundle);
        }
        Ok(())
    }

    /// Reports an OOM kill in container `id` not reported yet, at once:
    /// called when its process ends, so that the kill is known before the
    /// exit is (the host deletes the container on its exit, and the poll
    /// would come too late).
    pub async fn check_oom(&self, id: &str) {
        if self.containers.lock().await.get_mut(id).is_some_and(Container::new_oom_kill) {
            let _ = self.oom_tx.try_send(id.to_string());
        }
    }

    /// Waits for the next OOM kill in any container.
    pub async fn next_oom(&self) -> Option<String> {
        self.oom_rx.lock().await.recv().await
    }

    /// Ids of every container, for shutdown.
    pub async fn ids(&self) -> Vec<String> {
        self.containers.lock().await.keys().cloned().collect()
    }

    async fn known(&self, id: &str) -> CResult<PathBuf> {
        match self.containers.lock().await.get(id) {
            Some(c) => Ok(c.bundle.clone()),
            None => Err(not_found(id)),
        }
    }

    /// Runs the helper with the new process's stdio: pipes, or a terminal
    /// whose master the engine hands back over a console socket.
    async fn run_with_stdio(&self, id: &str, op: &str, args: &[&str], terminal: bool) -> Result<(i32, ProcessIo)> {
        if terminal {
            // Named by a counter, not by the container and exec ids: two
            // 64-hex ids (containerd's) would pass the 108 bytes a Unix
            // socket path may have.
            let n = self.console_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let console_path = &self.paths.consoles.join(format!("{n}.sock"));
            let _ = std::fs::remove_file(console_path);
            let listener = std::os::unix::net::UnixListener::bind(console_path)
                .with_context(|| format!("binding console socket {}", console_path.display()))?;
            let console_arg = console_path.to_string_lossy().into_owned();
            let mut all = args.to_vec();
            all.extend(["--console-socket", &console_arg]);
            let out = self.helper_output(op, id, &all, None).await;
            let master = out.as_ref().ok().map(|_| receive_pty_master(&listener));
            let _ = std::fs::remove_file(console_path);
            let pid = parse_pid(&out?)?;
            let master = master.expect("set when the helper succeeded")?;
            Ok((pid, ProcessIo::terminal(master)?))
        } else {
            let (ours, child) = ProcessIo::pipes()?;
            let mut all = args.to_vec();
            all.push("--stdio");
            let out = self.helper_output(op, id, &all, Some([child.stdin, child.stdout, child.stderr])).await;
            match out {
                Ok(out) => Ok((parse_pid(&out)?, ours)),
                Err(e) => {
                    // The container's own setup logs its failure on the
                    // container's stderr: make it part of the error.
                    let said = ours.stderr.as_ref().map(drain).unwrap_or_default();
                    let said = said.trim();
                    if said.is_empty() {
                        Err(e)
                    } else {
                        Err(e.context(said.to_string()))
                    }
                }
            }
        }
    }

    async fn helper(&self, op: &str, id: &str, args: &[&str]) -> Result<()> {
        self.helper_output(op, id, args, None).await.map(|_| ())
    }

    /// Runs `runv-agent container-helper OP` and returns its stdout; its
    /// stderr becomes the error.
    async fn helper_output(&self, op: &str, id: &str, args: &[&str], stdio: Option<[OwnedFd; 3]>) -> Result<String> {
        let state = self.paths.state.to_string_lossy().into_owned();
        let mut all = vec![helper::SUBCOMMAND, op, "--root", &state, "--id", id];
        all.extend(args);
        self.agent_subcommand(&all, stdio).await
    }

    /// Runs this binary with `args` (a helper subcommand) and returns its
    /// stdout; its stderr becomes the error. `stdio` goes to fds 3, 4, 5.
    async fn agent_subcommand(&self, args: &[&str], stdio: Option<[OwnedFd; 3]>) -> Result<String> {
        let op = args.get(1).or(args.first()).copied().unwrap_or("helper").to_string();
        let op = op.as_str();
        let exe = std::env::current_exe().context("locating the agent binary")?;
        let mut cmd = Command::new(exe);
        cmd.args(args);
        let (out_r, out_w) = os_pipe()?;
        let (err_r, err_w) = os_pipe()?;
        cmd.stdin(Stdio::null()).stdout(Stdio::from(out_w)).stderr(Stdio::from(err_w));
        if let Some(fds) = stdio {
            // Move the descriptors above the target numbers first, so that
            // placing one on 3, 4 or 5 cannot clobber another.
            let high: Vec<OwnedFd> = fds.iter().map(|fd| dup_above(fd, 10)).collect::<Result<_>>()?;
            drop(fds);
            let raw: Vec<RawFd> = high.iter().map(|fd| fd.as_raw_fd()).collect();
            // SAFETY: dup2 is async-signal-safe; the descriptors stay open
            // (owned by `high`) until after spawn returns.
            unsafe {
                cmd.pre_exec(move || {
                    for (target, fd) in (3..).zip(&raw) {
                        if libc::dup2(*fd, target) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
            let process = self
                .table
                .spawn_command(&mut cmd, ProcessIo { stdout: Some(out_r), stderr: Some(err_r), ..Default::default() });
            drop(cmd);
            drop(high);
            return finish_helper(process?, op).await;
        }
        let process = self
            .table
            .spawn_command(&mut cmd, ProcessIo { stdout: Some(out_r), stderr: Some(err_r), ..Default::default() })?;
        drop(cmd);
        finish_helper(process, op).await
    }
}

async fn finish_helper(process: Arc<Process>, op: &str) -> Result<String> {
    let exit = process.wait().await;
    let out = read_to_end(&process, false).await;
    let err = read_to_end(&process, true).await;
    if exit.status != 0 {
        let err = err.trim();
        bail!(
            "{}",
            if err.is_empty() { format!("container {op} failed (status {})", exit.status) } else { err.to_string() }
        );
    }
    Ok(out)
}

async fn read_to_end(process: &Process, stderr: bool) -> String {
    let mut all = Vec::new();
    loop {
        let chunk = process.read_output(stderr, 64 * 1024).await;
        if chunk.is_empty() {
            break;
        }
        all.extend(chunk);
    }
    String::from_utf8_lossy(&all).into_owned()
}

/// What a pipe holds right now, without waiting.
fn drain(fd: &OwnedFd) -> String {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    // SAFETY: fcntl and read on a descriptor we own, into a buffer we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        loop {
            let n = libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len());
            if n <= 0 || all.len() > 64 * 1024 {
                break;
            }
            all.extend_from_slice(&buf[..n as usize]);
        }
    }
    String::from_utf8_lossy(&all).into_owned()
}

fn not_found(id: &str) -> ContainerError {
    ContainerError::NotFound(format!("no container '{id}'"))
}

fn parse_pid(out: &str) -> Result<i32> {
    out.trim().parse().with_context(|| format!("the container engine printed '{}' instead of a pid", out.trim()))
}

fn os_pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors that we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error()).context("creating a pipe");
    }
    // SAFETY: both were just created and belong to nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn dup_above(fd: &OwnedFd, min: RawFd) -> Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we own.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
    if new < 0 {
        return Err(std::io::Error::last_os_error()).context("duplicating a descriptor");
    }
    // SAFETY: just created.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Accepts the engine's console-socket connection and takes the pty
/// master it sends (SCM_RIGHTS).
fn receive_pty_master(listener: &std::os::unix::net::UnixListener) -> Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    listener.set_nonblocking(true)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("waiting for the container's terminal"),
        }
    };
    stream.set_nonblocking(false)?;
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
        .context("receiving the terminal")?;
    for c in msg.cmsgs().context("reading the terminal message")? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel just installed this descriptor for us.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    bail!("the container engine sent no terminal")
}
