//! The shim v2 task service: containerd's calls mapped onto one sandbox
//! (microVM) and the guest agent's container calls.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::api;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused, TaskResumed,
    TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageDyn;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::{self, Code};
use runv::config::Config;
use runv::sandbox::sizing::{vm_size, ContainerLimits, CpuLimit, PodResources, SizingError, VmSize};
use runv::sandbox::{AgentClient, Sandbox, SandboxSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

use crate::rootfs::{guest_spec, has_namespace, pod_netns, unmount_below, SharedDir};

type TtrpcResult<T> = Result<T, ttrpc::Error>;

/// Reads `RUNV_CONFIG`, else /etc/runv/config.toml, else the defaults.
pub fn load_config() -> anyhow::Result<Config> {
    let path = std::env::var_os("RUNV_CONFIG").map(PathBuf::from);
    Ok(Config::load(path.as_deref())?)
}

/// The shim's own state directory for a sandbox: the shared directory and
/// the pids of what it runs, for `delete` after a crash.
fn shim_dir(config: &Config, namespace: &str, id: &str) -> PathBuf {
    config.runtime_dir.join("shim").join(namespace).join(id)
}

/// Kills what a dead shim left running for `id` and removes its mounts and
/// files.
pub fn cleanup_leftovers(config: &Config, namespace: &str, id: &str) {
    let dir = shim_dir(config, namespace, id);
    if let Ok(text) = std::fs::read_to_string(dir.join("pids")) {
        // Only processes that are still the ones this shim started.
        for id in text.lines().filter_map(runv::helper::ProcessIdentity::parse) {
            id.kill();
        }
    }
    if let Ok(record) = std::fs::read_to_string(dir.join("network")) {
        runv::network::detach_leftovers(&record);
    }
    if let Ok(text) = std::fs::read_to_string(dir.join(runv::sandbox::DIR_RECORD)) {
        let sandbox_dir = Path::new(text.trim());
        runv::jailer::cleanup_recorded(sandbox_dir);
        let _ = runv::helper::remove_tree(sandbox_dir);
    }
    unmount_below(&dir);
    for tree in ["shared", "mounts"] {
        let _ = nix::mount::umount2(
            &dir.join(tree),
            nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW,
        );
    }
    if let Err(e) = runv::helper::remove_tree(&dir) {
        log::warn!("removing {}: {e}", dir.display());
    }
}

/// The cgroup the sandbox's host processes join: the first container's
/// `linux.cgroupsPath` (the pod's cgroup under CRI, as runc would make it),
/// in its cgroupfs form; the systemd form (`slice:prefix:name`) and none
/// leave runv's default, `runv/<sandbox id>`.
fn pod_cgroup(spec: &oci_spec::runtime::Spec) -> Option<PathBuf> {
    let path = spec.linux().as_ref()?.cgroups_path().clone()?;
    (!path.as_os_str().is_empty() && !path.to_string_lossy().contains(':')).then_some(path)
}

fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn agent_error(what: &str, e: runv::sandbox::AgentError) -> ttrpc::Error {
    let code = e.code().unwrap_or(Code::UNAVAILABLE);
    status(code, format!("{what}: {e}"))
}

/// How a process ended: its exit status, when, and, when the shim lost it
/// (the VM died, or its agent stopped answering) rather than saw it exit,
/// why (Wait answers with that error; the status is then 255).
type Exit = (u32, Timestamp, Option<String>);

/// One process of a container: the init (exec id "") or an exec.
struct ProcessEntry {
    status: api::Status,
    terminal: bool,
    stdin: String,
    stdout: String,
    stderr: String,
    /// An exec's OCI process, kept from Exec until Start.
    spec: Option<oci_spec::runtime::Process>,
    /// A Start is in flight (the agent call runs without the state lock).
    starting: bool,
    exit: watch::Sender<Option<Exit>>,
    /// The stdin copier, told to drain the FIFO before CloseIO closes the
    /// guest side.
    stdin_pump: Option<StdinPump>,
}

struct StdinPump {
    close: watch::Sender<bool>,
    drained: watch::Receiver<bool>,
}

impl ProcessEntry {
    fn new(terminal: bool, stdin: &str, stdout: &str, stderr: &str) -> Self {
        Self {
            status: api::Status::CREATED,
            terminal,
            stdin: stdin.into(),
            stdout: stdout.into(),
            stderr: stderr.into(),
            spec: None,
            starting: false,
            exit: watch::channel(None).0,
            stdin_pump: None,
        }
    }
}

struct Container {
    bundle: String,
    /// The init's pid in the guest (a pod's containers join the sandbox
    /// container's namespaces through it).
    guest_pid: u32,
    processes: HashMap<String, ProcessEntry>,
    /// A Delete is in flight.
    deleting: bool,
}

/// What the shim knows. Its lock is held only to read or change these
/// records, never across a VM boot or an agent call: a slow or hung guest
/// must not keep containerd from asking about, or acting on, anything else.
#[derive(Default)]
struct State {
    config: Option<Config>,
    sandbox: Option<Sandbox>,
    shared: Option<Arc<SharedDir>>,
    containers: HashMap<String, Container>,
    /// Containers whose Create is in flight: their ids are taken, and the
    /// sandbox stays up for them.
    creating: HashSet<String>,
    /// The last containers deleted (at most `RECENTLY_DELETED`): an OOM
    /// kill the guest reports just after the exit it caused still names
    /// a container of this sandbox.
    deleted: std::collections::VecDeque<String>,
    /// containerd's PortForward into the pod's VM (pods with a network
    /// namespace of their own).
    forwarder: Option<crate::localhost::Forwarder>,
}

const RECENTLY_DELETED: usize = 64;

#[derive(Clone)]
pub struct TaskService {
    namespace: String,
    id: String,
    publisher: Arc<RemotePublisher>,
    exit: Arc<ExitSignal>,
    state: Arc<Mutex<State>>,
    /// Held while the sandbox boots or is torn down (and so across those
    /// only): one boot, and no teardown under a Create that needs the VM.
    lifecycle: Arc<Mutex<()>>,
}

/// How long a Delete waits for the Create of the same container.
const CREATE_WAIT: Duration = Duration::from_secs(180);
/// How long a shim with no container, and none being created, stays.
const IDLE_EXIT: Duration = Duration::from_secs(60);

impl TaskService {
    pub fn new(namespace: String, id: String, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> Self {
        let service = Self {
            namespace,
            id,
            publisher: Arc::new(publisher),
            exit,
            state: Arc::default(),
            lifecycle: Arc::default(),
        };
        service.watch_idle();
        service
    }

    /// Ends the shim once it has had no container, and none being
    /// created, for `IDLE_EXIT`. containerd sends Create right after it
    /// starts a shim and Shutdown right after the last Delete; a shim idle
    /// that long was lost by its containerd (one killed between the two,
    /// for example) and would otherwise run forever.
    fn watch_idle(&self) {
        let service = self.clone();
        tokio::spawn(async move {
            let mut idle_since = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let idle = {
                    let state = service.state.lock().await;
                    state.containers.is_empty() && state.creating.is_empty()
                };
                if !idle {
                    idle_since = Instant::now();
                } else if idle_since.elapsed() >= IDLE_EXIT && service.stop_sandbox_if_unused(None).await {
                    log::warn!(
                        "sandbox {}: no container for {} s (its containerd lost track of this shim); exiting",
                        service.id,
                        IDLE_EXIT.as_secs()
                    );
                    service.exit.signal();
                    return;
                }
            }
        });
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let ctx = ttrpc::context::Context::default();
        if let Err(e) = self.publisher.publish(ctx, topic, &self.namespace, event).await {
            log::warn!("publishing {topic}: {e}");
        }
    }

    /// Boots the sandbox's VM on first use, sized from the first
    /// container's spec (the CRI sandbox's annotations, or a lone
    /// container's own limits); returns its agent and shared directory.
    async fn ensure_sandbox(&self, first: &oci_spec::runtime::Spec) -> TtrpcResult<(AgentClient, Arc<SharedDir>)> {
        let _lifecycle = self.lifecycle.lock().await;
        {
            let state = self.state.lock().await;
            if let (Some(sandbox), Some(shared)) = (&state.sandbox, &state.shared) {
                return Ok((sandbox.agent().clone(), shared.clone()));
            }
        }
        // A pod without a UTS namespace of its own (hostNetwork; the
        // kubelet sends no hostname then) has the node's hostname, as
        // runc's shares the node's.
        let node =
            (!has_namespace(first, oci_spec::runtime::LinuxNamespaceType::Uts)).then(runv::helper::node_hostname);
        let hostname = first.hostname().as_deref().filter(|h| !h.is_empty()).or(node.as_deref());
        let config = load_config().map_err(|e| status(Code::FAILED_PRECONDITION, format!("runv config: {e}")))?;
        let size = vm_size_for(first, &config).map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let dir = shim_dir(&config, &self.namespace, &self.id);
        runv::helper::create_private_dir_all(&dir)
            .map_err(|e| status(Code::INTERNAL, format!("creating {}: {e}", dir.display())))?;
        let shared = match SharedDir::create(&dir) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                let _ = runv::helper::remove_tree(&dir);
                return Err(status(Code::INTERNAL, format!("{e:#}")));
            }
        };
        let spec = SandboxSpec {
            shared_dir: shared.path().to_path_buf(),
            read_only: false,
            vcpus: size.vcpus,
            memory_mib: size.memory_mib,
            netns: pod_netns(first),
            cgroup: pod_cgroup(first),
            dir_record: Some(dir.join(runv::sandbox::DIR_RECORD)),
        };
        let sandbox = match Sandbox::start(&config, &spec).await {
            Ok(s) => s,
            Err(e) => {
                shared.destroy();
                let _ = runv::helper::remove_tree(&dir);
                return Err(status(Code::FAILED_PRECONDITION, format!("starting the sandbox VM: {e}")));
            }
        };
        let pids: Vec<String> =
            sandbox.pids().into_iter().filter_map(runv::helper::ProcessIdentity::of).map(|id| id.record()).collect();
        let _ = runv::helper::write_private(&dir.join("pids"), pids.join("\n").as_bytes());
        if let Some(network) = sandbox.network() {
            let _ = runv::helper::write_private(&dir.join("network"), network.record().as_bytes());
        }
        let agent = sandbox.agent().clone();
        let req = runv_proto::agent::CreateSandboxRequest {
            sandbox_id: self.id.clone(),
            hostname: hostname.unwrap_or_default().to_string(),
            ..Default::default()
        };
        if let Err(e) = agent.create_sandbox(&req).await {
            sandbox.shutdown().await;
            shared.destroy();
            cleanup_leftovers(&config, &self.namespace, &self.id);
            return Err(agent_error("preparing the sandbox", e));
        }
        // OOM kills in the guest become containerd events. The guest's word
        // is data: only containers of this sandbox, deduplicated and rate
        // limited (`OomFilter`), anything else dropped and counted.
        let service = self.clone();
        let oom_agent = agent.clone();
        tokio::spawn(async move {
            let mut filter = crate::oom::OomFilter::default();
            while let Ok(container_id) = oom_agent.next_oom_event().await {
                let known = {
                    let state = service.state.lock().await;
                    state.containers.contains_key(&container_id) || state.deleted.contains(&container_id)
                };
                match filter.admit(&container_id, known, Instant::now()) {
                    crate::oom::Verdict::Publish => {
                        service
                            .publish(
                                topics::TASK_OOM_EVENT_TOPIC,
                                Box::new(TaskOOM { container_id, ..Default::default() }),
                            )
                            .await
                    }
                    crate::oom::Verdict::Drop { report } => {
                        if let Some(line) = report {
                            log::warn!("sandbox {}: {line}", service.id);
                        }
                        tokio::time::sleep(crate::oom::DROP_PAUSE).await;
                    }
                }
            }
        });
        let annotation = |key: &str| first.annotations().as_ref().and_then(|a| a.get(key)).cloned().unwrap_or_default();
        let pod = (annotation(crate::ANNOTATION_SANDBOX_NAME), annotation(crate::ANNOTATION_SANDBOX_NAMESPACE));
        // Recorded before the sandbox is reported up, so that whoever
        // started it (runv cri) finds its boot figures at once.
        let figures = sandbox.figures();
        let record = runv::figures::SandboxFigures { pod: pod.0.clone(), namespace: pod.1.clone(), ..figures.clone() };
        if let Err(e) = record.write(&dir) {
            log::warn!("sandbox {}: recording its figures in {}: {e}", self.id, dir.display());
        }
        let sandbox_id = sandbox.id().to_string();
        let forwarder = spec.netns.as_deref().and_then(|netns| {
            let socket = runv::sandbox::port_forward::vsock_socket_of(&dir)?;
            crate::localhost::start(netns, socket)
                .inspect_err(|e| log::warn!("sandbox {}: no PortForward through containerd: {e:#}", self.id))
                .ok()
        });
        let mut state = self.state.lock().await;
        state.config = Some(config);
        state.sandbox = Some(sandbox);
        state.forwarder = forwarder;
        state.shared = Some(shared.clone());
        drop(state);
        // Only once the sandbox is in the state: a watcher that looked
        // before would find none and end, and nothing would notice a
        // helper's death (the localhost forwarder's iptables run made
        // that window wide enough to lose).
        self.watch_sandbox(sandbox_id, dir.clone(), pod, figures);
        Ok((agent, shared))
    }

    fn vm_pid(state: &State) -> u32 {
        state.sandbox.as_ref().and_then(Sandbox::vm_pid).unwrap_or(0)
    }

    /// Stops the VM and removes every trace of the sandbox once no
    /// container is left and no Create but `creating` (the caller's own,
    /// failing) is in flight; returns whether it did.
    async fn stop_sandbox_if_unused(&self, creating: Option<&str>) -> bool {
        let _lifecycle = self.lifecycle.lock().await;
        let (sandbox, shared, config) = {
            let mut state = self.state.lock().await;
            if !state.containers.is_empty() || state.creating.iter().any(|c| Some(c.as_str()) != creating) {
                return false;
            }
            state.forwarder = None;
            (state.sandbox.take(), state.shared.take(), state.config.clone())
        };
        if let Some(sandbox) = sandbox {
            sandbox.shutdown().await;
        }
        if let Some(shared) = shared {
            shared.destroy();
        }
        if let Some(config) = &config {
            cleanup_leftovers(config, &self.namespace, &self.id);
        }
        true
    }

    /// Why a process's wait failed: what ended the sandbox, once the
    /// backend has seen it (the agent's connection may drop a moment
    /// earlier), or the agent's silence.
    async fn lost_reason(&self, e: &runv::sandbox::AgentError) -> String {
        match self.sandbox_fault().await {
            Some(fault) => format!("{fault} while the process ran"),
            None => format!("the guest agent lost the process: {e}"),
        }
    }

    /// What ended the sandbox, if something has or does within 2 s.
    async fn sandbox_fault(&self) -> Option<String> {
        for _ in 0..20 {
            let fault = self.state.lock().await.sandbox.as_mut().and_then(Sandbox::fault);
            if fault.is_some() {
                return fault;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// An agent call's failure as an answer: when the agent gave no answer
    /// (its connection went, or the deadline passed), what ended the
    /// sandbox, if something did, names the cause.
    async fn agent_failure(&self, what: &str, e: runv::sandbox::AgentError) -> ttrpc::Error {
        if e.code().is_none() {
            if let Some(fault) = self.sandbox_fault().await {
                return status(Code::UNAVAILABLE, format!("{what}: {fault}"));
            }
        }
        agent_error(what, e)
    }

    /// Watches the sandbox `id` until it goes: a helper it cannot run
    /// without that ends takes the VM with it (`Sandbox::fault`), and every
    /// process in it is then reported lost.
    /// Watches the sandbox for faults, and keeps its figures (boot,
    /// agent calls: `runv::figures`) recorded in `dir` for `runv cri` and
    /// `runv monitor`, rewritten when they changed, at most every 2 s.
    fn watch_sandbox(
        &self,
        id: String,
        dir: PathBuf,
        (pod, namespace): (String, String),
        written: runv::figures::SandboxFigures,
    ) {
        let service = self.clone();
        tokio::spawn(async move {
            let mut written = Some(written);
            for tick in 1u64.. {
                let figures = {
                    let mut state = service.state.lock().await;
                    let Some(sandbox) = state.sandbox.as_mut().filter(|s| s.id() == id) else { return };
                    if let Some(fault) = sandbox.fault() {
                        log::warn!("sandbox {}: {fault}", service.id);
                        return;
                    }
                    (tick % 4 == 0).then(|| sandbox.figures())
                };
                if let Some(figures) = figures.filter(|f| written.as_ref() != Some(f)) {
                    let record = runv::figures::SandboxFigures {
                        pod: pod.clone(),
                        namespace: namespace.clone(),
                        ..figures.clone()
                    };
                    if let Err(e) = record.write(&dir) {
                        log::warn!("sandbox {}: recording its figures in {}: {e}", service.id, dir.display());
                    }
                    written = Some(figures);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }

    /// Copies the process's stdio between containerd's FIFOs and the agent,
    /// then waits for it and records and publishes its exit.
    fn run_process(&self, agent: AgentClient, container_id: &str, exec_id: &str, entry: &mut ProcessEntry, pid: u32) {
        let (cid, eid) = (container_id.to_string(), exec_id.to_string());
        let stdout = copy_out(agent.clone(), &cid, &eid, &entry.stdout, false);
        let stderr = (!entry.terminal).then(|| copy_out(agent.clone(), &cid, &eid, &entry.stderr, true)).flatten();
        let stdin = copy_in(agent.clone(), &cid, &eid, &entry.stdin).map(|(task, pump)| {
            entry.stdin_pump = Some(pump);
            task
        });
        let exit_tx = entry.exit.clone();
        let service = self.clone();
        tokio::spawn(async move {
            let (code, lost) = match agent.wait_process(&cid, &eid).await {
                Ok(w) => (w.status as u32, None),
                // The VM or its agent went away: the process is gone too.
                Err(e) => {
                    let why = service.lost_reason(&e).await;
                    log::warn!("sandbox {}: process {cid}/{eid}: {why}", service.id);
                    (255, Some(why))
                }
            };
            for pump in [stdout, stderr].into_iter().flatten() {
                let _ = tokio::time::timeout(Duration::from_secs(5), pump).await;
            }
            if let Some(s) = stdin {
                s.abort();
            }
            let exited_at = containerd_shim::util::timestamp().unwrap_or_default();
            {
                let mut state = service.state.lock().await;
                if let Some(p) = state.containers.get_mut(&cid).and_then(|c| c.processes.get_mut(&eid)) {
                    p.status = api::Status::STOPPED;
                }
            }
            exit_tx.send_replace(Some((code, exited_at.clone(), lost)));
            let event = TaskExit {
                container_id: cid.clone(),
                id: if eid.is_empty() { cid.clone() } else { eid.clone() },
                pid,
                exit_status: code,
                exited_at: Some(exited_at).into(),
                ..Default::default()
            };
            service.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(event)).await;
        });
    }
}

/// The VM size for a sandbox whose first container has `spec` (see
/// `runv::sandbox::sizing`).
fn vm_size_for(spec: &oci_spec::runtime::Spec, config: &Config) -> Result<VmSize, SizingError> {
    let annotations = spec.annotations().clone().unwrap_or_default();
    let pod = PodResources::from_annotations(&annotations)?;
    let is_cri_sandbox = annotations.get(crate::ANNOTATION_CONTAINER_TYPE).map(String::as_str) == Some("sandbox");
    if is_cri_sandbox {
        return vm_size(&pod, config);
    }
    let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
    let memory_limit_bytes =
        resources.as_ref().and_then(|r| r.memory().as_ref()?.limit()).filter(|l| *l > 0).map(|l| l as u64);
    let cpu_limit = resources.as_ref().and_then(|r| {
        let cpu = r.cpu().as_ref()?;
        let quota = cpu.quota().filter(|q| *q > 0)? as u64;
        Some(CpuLimit { quota_us: quota, period_us: cpu.period().filter(|p| *p > 0).unwrap_or(100_000) })
    });
    vm_size(&pod.with_containers(&[ContainerLimits { memory_limit_bytes, cpu_limit }]), config)
}

/// Streams one output of a guest process into containerd's FIFO.
fn copy_out(agent: AgentClient, cid: &str, eid: &str, path: &str, stderr: bool) -> Option<JoinHandle<()>> {
    if path.is_empty() {
        return None;
    }
    let (cid, eid, path) = (cid.to_string(), eid.to_string(), path.to_string());
    Some(tokio::spawn(async move {
        // Read-write, so that opening never waits for containerd's reader.
        let mut out = match tokio::net::unix::pipe::OpenOptions::new().read_write(true).open_sender(&path) {
            Ok(o) => o,
            Err(e) => {
                log::warn!("opening {path}: {e}");
                return;
            }
        };
        while let Ok(Some(data)) = agent.read_output(&cid, &eid, stderr).await {
            if out.write_all(&data).await.is_err() {
                break;
            }
        }
        // Opened read-write, the FIFO keeps what was written only while it
        // is open: closing it before containerd's reader has opened it (a
        // short exec right after a containerd restart, or under load) lost
        // the whole output. Close once the reader has taken it all, or
        // after OUTPUT_DRAIN_LIMIT (a reader that never comes).
        let deadline = tokio::time::Instant::now() + OUTPUT_DRAIN_LIMIT;
        while fifo_unread(&out) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }))
}

/// How long a finished process's output waits in its FIFO for containerd
/// to read it.
const OUTPUT_DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Bytes written to a FIFO and not yet read (0 when that cannot be told).
fn fifo_unread(fifo: &impl std::os::fd::AsRawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes an int we own; the descriptor is open.
    if unsafe { libc::ioctl(fifo.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
        return 0;
    }
    n.max(0) as usize
}

/// Streams containerd's stdin FIFO into the guest process. CloseIO (not
/// the FIFO's end: the FIFO is open read-write) drains it and then closes
/// the guest side.
fn copy_in(agent: AgentClient, cid: &str, eid: &str, path: &str) -> Option<(JoinHandle<()>, StdinPump)> {
    if path.is_empty() {
        return None;
    }
    let (cid, eid, path) = (cid.to_string(), eid.to_string(), path.to_string());
    let (close, mut close_rx) = watch::channel(false);
    let (drained_tx, drained) = watch::channel(false);
    let task = tokio::spawn(async move {
        let Ok(mut input) = tokio::net::unix::pipe::OpenOptions::new().read_write(true).open_receiver(&path) else {
            drained_tx.send_replace(true);
            return;
        };
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            tokio::select! {
                r = input.read(&mut buf) => match r {
                    Ok(n) if n > 0 => {
                        if agent.write_stdin(&cid, &eid, buf[..n].to_vec()).await.is_err() {
                            break;
                        }
                    }
                    _ => break,
                },
                _ = async { let _ = close_rx.wait_for(|c| *c).await; } => {
                    while let Ok(n) = input.try_read(&mut buf) {
                        if n == 0 || agent.write_stdin(&cid, &eid, buf[..n].to_vec()).await.is_err() {
                            break;
                        }
                    }
                    break;
                }
            }
        }
        drained_tx.send_replace(true);
    });
    Some((task, StdinPump { close, drained }))
}

/// Runs `f` on a task of its own and waits for it: dropping the wait (a
/// cancelled request) does not stop `f`.
async fn detached<T: Send + 'static>(
    f: impl std::future::Future<Output = TtrpcResult<T>> + Send + 'static,
) -> TtrpcResult<T> {
    tokio::spawn(f).await.unwrap_or_else(|e| Err(status(Code::INTERNAL, format!("the request's task failed: {e}"))))
}

fn not_found(what: &str) -> ttrpc::Error {
    status(Code::NOT_FOUND, format!("{what} not found"))
}

#[async_trait]
impl Task for TaskService {
    async fn create(&self, _ctx: &TtrpcContext, req: api::CreateTaskRequest) -> TtrpcResult<api::CreateTaskResponse> {
        let this = self.clone();
        detached(async move { this.create_task(req).await }).await
    }

    async fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let this = self.clone();
        detached(async move { this.start_task(req).await }).await
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let spec_any =
            req.spec.as_ref().ok_or_else(|| status(Code::INVALID_ARGUMENT, "exec without a process spec"))?;
        let process: oci_spec::runtime::Process = serde_json::from_slice(&spec_any.value).map_err(|e| {
            status(Code::INVALID_ARGUMENT, format!("exec {}: malformed process spec: {e}", req.exec_id))
        })?;
        let mut state = self.state.lock().await;
        let container = state.containers.get_mut(&req.id).ok_or_else(|| not_found(&format!("container {}", req.id)))?;
        if req.exec_id.is_empty() || container.processes.contains_key(&req.exec_id) {
            return Err(status(Code::ALREADY_EXISTS, format!("exec id {:?} is empty or in use", req.exec_id)));
        }
        let mut entry = ProcessEntry::new(req.terminal, &req.stdin, &req.stdout, &req.stderr);
        entry.spec = Some(process);
        container.processes.insert(req.exec_id.clone(), entry);
        drop(state);
        let event = TaskExecAdded { container_id: req.id.clone(), exec_id: req.exec_id.clone(), ..Default::default() };
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(event)).await;
        Ok(api::Empty::new())
    }

    async fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        let state = self.state.lock().await;
        let pid = Self::vm_pid(&state);
        let container = state.containers.get(&req.id).ok_or_else(|| not_found(&format!("container {}", req.id)))?;
        let p = container
            .processes
            .get(&req.exec_id)
            .ok_or_else(|| not_found(&format!("process {} in {}", req.exec_id, req.id)))?;
        let exit = p.exit.borrow().clone();
        Ok(api::StateResponse {
            id: if req.exec_id.is_empty() { req.id.clone() } else { req.exec_id.clone() },
            bundle: container.bundle.clone(),
            pid,
            status: p.status.into(),
            stdin: p.stdin.clone(),
            stdout: p.stdout.clone(),
            stderr: p.stderr.clone(),
            terminal: p.terminal,
            exit_status: exit.as_ref().map(|e| e.0).unwrap_or_default(),
            exited_at: exit.map(|e| e.1).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let mut rx = {
            let state = self.state.lock().await;
            let container = state.containers.get(&req.id).ok_or_else(|| not_found(&format!("container {}", req.id)))?;
            let p = container
                .processes
                .get(&req.exec_id)
                .ok_or_else(|| not_found(&format!("process {} in {}", req.exec_id, req.id)))?;
            p.exit.subscribe()
        };
        loop {
            if let Some((code, at, lost)) = rx.borrow_and_update().clone() {
                if let Some(why) = lost {
                    return Err(status(Code::UNAVAILABLE, why));
                }
                return Ok(api::WaitResponse { exit_status: code, exited_at: Some(at).into(), ..Default::default() });
            }
            if rx.changed().await.is_err() {
                return Err(status(Code::NOT_FOUND, "the process was deleted"));
            }
        }
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let agent = {
            let state = self.state.lock().await;
            let container = state.containers.get(&req.id).ok_or_else(|| not_found(&format!("container {}", req.id)))?;
            let p = container
                .processes
                .get(&req.exec_id)
                .ok_or_else(|| not_found(&format!("process {} in {}", req.exec_id, req.id)))?;
            if p.status == api::Status::STOPPED {
                return Err(status(Code::NOT_FOUND, "process already finished"));
            }
            state.sandbox.as_ref().map(|s| s.agent().clone()).ok_or_else(|| not_found("sandbox"))?
        };
        agent
            .signal(&req.id, &req.exec_id, req.signal as i32, req.all)
            .await
            .map_err(|e| agent_error("signalling the process", e))?;
        Ok(api::Empty::new())
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        let this = self.clone();
        detached(async move { this.delete_task(req).await }).await
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let agent = self.agent_for(&req.id).await?;
        let pids = agent.list_processes(&req.id).await.map_err(|e| agent_error("listing processes", e))?;
        let processes = pids.into_iter().map(|pid| api::ProcessInfo { pid, ..Default::default() }).collect::<Vec<_>>();
        Ok(api::PidsResponse { processes, ..Default::default() })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let this = self.clone();
        detached(async move { this.pause_task(req).await }).await
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        let this = self.clone();
        detached(async move { this.resume_task(req).await }).await
    }

    async fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let resources =
            req.resources.as_ref().ok_or_else(|| status(Code::INVALID_ARGUMENT, "update without resources"))?;
        let agent = self.agent_for(&req.id).await?;
        agent.update_container(&req.id, resources.value.clone()).await.map_err(|e| agent_error("updating", e))?;
        Ok(api::Empty::new())
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        use containerd_shim_protos::cgroups::metrics::{CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat};
        let agent = self.agent_for(&req.id).await?;
        let s = agent.stats_container(&req.id).await.map_err(|e| agent_error("reading stats", e))?;
        let metrics = Metrics {
            cpu: Some(CPUStat {
                usage: Some(CPUUsage {
                    total: s.cpu_usage_ns,
                    user: s.cpu_user_ns,
                    kernel: s.cpu_system_ns,
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            })
            .into(),
            memory: Some(MemoryStat {
                usage: Some(MemoryEntry {
                    usage: s.memory_usage_bytes,
                    limit: s.memory_limit_bytes,
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            })
            .into(),
            pids: Some(PidsStat { current: s.pids_current, limit: s.pids_limit, ..Default::default() }).into(),
            ..Default::default()
        };
        let any = containerd_shim::util::convert_to_any(Box::new(metrics))
            .map_err(|e| status(Code::INTERNAL, format!("encoding metrics: {e}")))?;
        Ok(api::StatsResponse { stats: Some(any).into(), ..Default::default() })
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        let agent = self.agent_for(&req.id).await?;
        let (rows, cols) = (req.height.min(u16::MAX as u32) as u16, req.width.min(u16::MAX as u32) as u16);
        agent.resize(&req.id, &req.exec_id, rows, cols).await.map_err(|e| agent_error("resizing the terminal", e))?;
        Ok(api::Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        if req.stdin {
            let agent = self.agent_for(&req.id).await?;
            let pump = {
                let mut state = self.state.lock().await;
                state
                    .containers
                    .get_mut(&req.id)
                    .and_then(|c| c.processes.get_mut(&req.exec_id))
                    .and_then(|p| p.stdin_pump.take())
            };
            if let Some(mut pump) = pump {
                // What the client wrote before closing reaches the process first.
                pump.close.send_replace(true);
                let _ = tokio::time::timeout(Duration::from_secs(5), pump.drained.wait_for(|d| *d)).await;
            }
            agent.close_stdin(&req.id, &req.exec_id).await.map_err(|e| agent_error("closing stdin", e))?;
        }
        Ok(api::Empty::new())
    }

    async fn checkpoint(&self, _ctx: &TtrpcContext, _req: api::CheckpointTaskRequest) -> TtrpcResult<api::Empty> {
        Err(status(Code::UNIMPLEMENTED, "checkpoint is not supported by runv (the container runs in a microVM)"))
    }

    async fn connect(&self, _ctx: &TtrpcContext, _req: api::ConnectRequest) -> TtrpcResult<api::ConnectResponse> {
        let state = self.state.lock().await;
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: Self::vm_pid(&state),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        let this = self.clone();
        detached(async move { this.shutdown_task(req).await }).await
    }
}

/// The task calls that change the shim's records and the sandbox, run to
/// completion on a task of their own: ttrpc drops a request's handler when
/// its client goes away or its deadline passes, and a Create dropped
/// half-way would leave its reservation, its mounts and a VM behind.
impl TaskService {
    async fn create_task(&self, req: api::CreateTaskRequest) -> TtrpcResult<api::CreateTaskResponse> {
        let bundle = Path::new(&req.bundle);
        let spec = oci_spec::runtime::Spec::load(bundle.join("config.json"))
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("bundle {}: config.json: {e}", bundle.display())))?;
        crate::rootfs::check_id(&req.id).map_err(|e| status(Code::INVALID_ARGUMENT, format!("{e:#}")))?;
        crate::rootfs::check_host_namespaces(&spec).map_err(|e| status(Code::INVALID_ARGUMENT, format!("{e:#}")))?;
        {
            let mut state = self.state.lock().await;
            if state.containers.contains_key(&req.id) || state.creating.contains(&req.id) {
                return Err(status(Code::ALREADY_EXISTS, format!("container {} already exists", req.id)));
            }
            if let Some(sandbox) = crate::rootfs::sandbox_of(&spec) {
                if !state.containers.contains_key(&sandbox) {
                    return Err(status(
                        Code::NOT_FOUND,
                        format!("container {}: its sandbox {sandbox} does not run in this shim", req.id),
                    ));
                }
            }
            state.creating.insert(req.id.clone());
        }
        let created = self.create_in_sandbox(&req, spec).await;
        let mut state = self.state.lock().await;
        state.creating.remove(&req.id);
        let guest_pid = match created {
            Ok(pid) => pid,
            Err(e) => {
                drop(state);
                self.stop_sandbox_if_unused(None).await;
                return Err(e);
            }
        };
        let pid = Self::vm_pid(&state);
        let mut processes = HashMap::new();
        processes.insert(String::new(), ProcessEntry::new(req.terminal, &req.stdin, &req.stdout, &req.stderr));
        state
            .containers
            .insert(req.id.clone(), Container { bundle: req.bundle.clone(), guest_pid, processes, deleting: false });
        drop(state);
        let event = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: Some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            })
            .into(),
            pid,
            ..Default::default()
        };
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(event)).await;
        Ok(api::CreateTaskResponse { pid, ..Default::default() })
    }

    async fn start_task(&self, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let (agent, spec) = {
            let mut state = self.state.lock().await;
            let agent = state.sandbox.as_ref().map(|s| s.agent().clone()).ok_or_else(|| not_found("sandbox"))?;
            let entry = Self::process_mut(&mut state, &req.id, &req.exec_id)?;
            if entry.status != api::Status::CREATED || entry.starting {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("process {:?} is not in the created state", req.exec_id),
                ));
            }
            entry.starting = true;
            (agent, entry.spec.clone())
        };
        let started = if req.exec_id.is_empty() {
            match agent.start_container(&req.id).await {
                Ok(()) => Ok(()),
                Err(e) => Err(self.agent_failure("starting the container", e).await),
            }
        } else {
            // An exec's process spec, kept since Exec.
            match spec {
                Some(spec) => match agent.exec_process(&req.id, &req.exec_id, &spec).await {
                    Ok(_) => Ok(()),
                    Err(e) => Err(self.agent_failure(&format!("starting exec {}", req.exec_id), e).await),
                },
                None => Err(status(Code::INTERNAL, "exec without a process spec")),
            }
        };
        let mut state = self.state.lock().await;
        let pid = Self::vm_pid(&state);
        let entry = Self::process_mut(&mut state, &req.id, &req.exec_id)?;
        entry.starting = false;
        started?;
        entry.status = api::Status::RUNNING;
        self.run_process(agent, &req.id, &req.exec_id, entry, pid);
        drop(state);
        if req.exec_id.is_empty() {
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart { container_id: req.id.clone(), pid, ..Default::default() }),
            )
            .await;
        } else {
            let event = TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            };
            self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(event)).await;
        }
        Ok(api::StartResponse { pid, ..Default::default() })
    }

    async fn delete_task(&self, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        // A container whose Create is still in flight (its client went
        // away, or gave up at its deadline) is deleted once it exists.
        let deadline = Instant::now() + CREATE_WAIT;
        while self.state.lock().await.creating.contains(&req.id) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (pid, code, at, agent, shared) = {
            let mut state = self.state.lock().await;
            let pid = Self::vm_pid(&state);
            // A sandbox that has ended has no guest to ask: the delete is
            // answered at once, not after the agent call's deadline.
            let agent = state.sandbox.as_mut().and_then(|s| s.fault().is_none().then(|| s.agent().clone()));
            let shared = state.shared.clone();
            let container =
                state.containers.get_mut(&req.id).ok_or_else(|| not_found(&format!("container {}", req.id)))?;
            if container.deleting {
                return Err(status(Code::FAILED_PRECONDITION, format!("container {} is being deleted", req.id)));
            }
            let p = container
                .processes
                .get(&req.exec_id)
                .ok_or_else(|| not_found(&format!("process {} in {}", req.exec_id, req.id)))?;
            if p.status == api::Status::RUNNING || p.status == api::Status::PAUSED || p.starting {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("process {:?} of {} is still running", req.exec_id, req.id),
                ));
            }
            let (code, at, _) =
                p.exit.borrow().clone().unwrap_or((0, containerd_shim::util::timestamp().unwrap_or_default(), None));
            if !req.exec_id.is_empty() {
                container.processes.remove(&req.exec_id);
                return Ok(api::DeleteResponse {
                    pid,
                    exit_status: code,
                    exited_at: Some(at).into(),
                    ..Default::default()
                });
            }
            container.deleting = true;
            (pid, code, at, agent, shared)
        };
        if let Some(agent) = agent {
            if let Err(e) = agent.remove_container(&req.id, true).await {
                log::warn!("removing container {} in the guest: {e}", req.id);
            }
        }
        if let Some(shared) = &shared {
            shared.remove_container(&req.id);
        }
        {
            let mut state = self.state.lock().await;
            if state.containers.remove(&req.id).is_some() {
                if state.deleted.len() == RECENTLY_DELETED {
                    state.deleted.pop_front();
                }
                state.deleted.push_back(req.id.clone());
            }
        }
        self.stop_sandbox_if_unused(None).await;
        let event = TaskDelete {
            container_id: req.id.clone(),
            pid,
            exit_status: code,
            exited_at: Some(at.clone()).into(),
            ..Default::default()
        };
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(event)).await;
        Ok(api::DeleteResponse { pid, exit_status: code, exited_at: Some(at).into(), ..Default::default() })
    }

    async fn pause_task(&self, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let agent = self.agent_for(&req.id).await?;
        agent.pause_container(&req.id).await.map_err(|e| agent_error("pausing", e))?;
        self.set_init_status(&req.id, api::Status::PAUSED).await;
        self.publish(
            topics::TASK_PAUSED_EVENT_TOPIC,
            Box::new(TaskPaused { container_id: req.id, ..Default::default() }),
        )
        .await;
        Ok(api::Empty::new())
    }

    async fn resume_task(&self, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        let agent = self.agent_for(&req.id).await?;
        agent.resume_container(&req.id).await.map_err(|e| agent_error("resuming", e))?;
        self.set_init_status(&req.id, api::Status::RUNNING).await;
        self.publish(
            topics::TASK_RESUMED_EVENT_TOPIC,
            Box::new(TaskResumed { container_id: req.id, ..Default::default() }),
        )
        .await;
        Ok(api::Empty::new())
    }

    async fn shutdown_task(&self, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        // Other containers of the pod may still run in this shim's VM.
        if self.stop_sandbox_if_unused(None).await {
            self.exit.signal();
        }
        Ok(api::Empty::new())
    }
}

impl TaskService {
    /// Create's work past its checks, with the id reserved: the VM (booted
    /// on first use), the rootfs in the shared directory, the container in
    /// the guest. Returns the init's guest pid; on error the container's
    /// part of the shared directory is gone again.
    async fn create_in_sandbox(&self, req: &api::CreateTaskRequest, spec: oci_spec::runtime::Spec) -> TtrpcResult<u32> {
        let bundle = Path::new(&req.bundle);
        let (agent, shared) = self.ensure_sandbox(&spec).await?;
        let sandbox_pid = match crate::rootfs::sandbox_of(&spec) {
            Some(sandbox) => self.state.lock().await.containers.get(&sandbox).map(|c| c.guest_pid),
            None => None,
        };
        let prepared = shared
            .mount_rootfs(&req.id, &req.rootfs, bundle)
            .and_then(|()| guest_spec(spec, &req.id, &shared, sandbox_pid));
        let gspec = match prepared {
            Ok(s) => s,
            Err(e) => {
                shared.remove_container(&req.id);
                return Err(status(Code::FAILED_PRECONDITION, format!("container {}: {e:#}", req.id)));
            }
        };
        match agent.create_container(&req.id, &gspec).await {
            Ok(pid) => Ok(pid),
            Err(e) => {
                shared.remove_container(&req.id);
                Err(self.agent_failure(&format!("creating container {}", req.id), e).await)
            }
        }
    }

    fn process_mut<'a>(state: &'a mut State, id: &str, exec_id: &str) -> TtrpcResult<&'a mut ProcessEntry> {
        state
            .containers
            .get_mut(id)
            .ok_or_else(|| not_found(&format!("container {id}")))?
            .processes
            .get_mut(exec_id)
            .ok_or_else(|| not_found(&format!("process {exec_id} in {id}")))
    }

    async fn agent_for(&self, container_id: &str) -> TtrpcResult<AgentClient> {
        let state = self.state.lock().await;
        if !state.containers.contains_key(container_id) {
            return Err(not_found(&format!("container {container_id}")));
        }
        state.sandbox.as_ref().map(|s| s.agent().clone()).ok_or_else(|| not_found("sandbox"))
    }

    async fn set_init_status(&self, container_id: &str, status: api::Status) {
        let mut state = self.state.lock().await;
        if let Some(p) = state.containers.get_mut(container_id).and_then(|c| c.processes.get_mut("")) {
            p.status = status;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_left_in_a_fifo_is_counted_until_a_reader_takes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut out = tokio::net::unix::pipe::OpenOptions::new().read_write(true).open_sender(&path).unwrap();
        assert_eq!(fifo_unread(&out), 0);
        tokio::io::AsyncWriteExt::write_all(&mut out, b"still here\n").await.unwrap();
        assert_eq!(fifo_unread(&out), 11, "what no reader took yet");
        let mut reader = std::fs::File::open(&path).unwrap();
        let mut got = [0u8; 11];
        std::io::Read::read_exact(&mut reader, &mut got).unwrap();
        assert_eq!(&got, b"still here\n");
        assert_eq!(fifo_unread(&out), 0);
    }
}
