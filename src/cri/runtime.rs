//! The pods and containers of `runv cri`: each pod is one shim (and one
//! microVM), started and driven over the shim v2 task API exactly as
//! containerd drives it; records persist under the state root.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim_protos::api;
use k8s_cri::v1::*;
use tokio::sync::{broadcast, watch, Mutex};
use tonic::Status;

use super::logs::{self, Output};
use super::network;
use super::shim::{Shim, ShimLauncher};
use super::spec;
use super::store::{decode, encode, ContainerRecord, ContainerState, PodRecord, PodState, Store};
use crate::config::Config;
use crate::image::{ImageRecord, ImageStore};

/// The runtime handlers `runv cri` serves ("" is the default: runv).
pub const HANDLERS: &[&str] = &["runv"];

const PROCESS_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";

pub fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or_default()
}

/// A fresh 64-hex-digit id, as containerd makes them.
/// `id` itself when it is one of `ids`, else the one id it is a prefix of;
/// a prefix of several is refused, naming them.
fn resolve_id<'a>(kind: &str, ids: impl Iterator<Item = &'a String>, id: &str) -> Result<String, Status> {
    if id.is_empty() {
        return Ok(String::new());
    }
    let mut matches = Vec::new();
    for candidate in ids {
        if candidate == id {
            return Ok(id.to_string());
        }
        if candidate.starts_with(id) {
            matches.push(candidate.clone());
        }
    }
    match matches.len() {
        0 => Ok(id.to_string()),
        1 => Ok(matches.remove(0)),
        _ => {
            matches.sort();
            Err(Status::invalid_argument(format!(
                "{kind} id {id:?} is ambiguous: it starts {} ids ({})",
                matches.len(),
                matches.join(", ")
            )))
        }
    }
}

pub fn new_id() -> String {
    let mut bytes = [0u8; 32];
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: getrandom writes at most the given length into the buffer.
        let n = unsafe { libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            panic!("getrandom: {}", std::io::Error::last_os_error());
        }
    }
    hex::encode(bytes)
}

fn mkfifo(path: &Path) -> Result<(), Status> {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(|e| Status::internal(format!("creating the FIFO {}: {e}", path.display())))
}

fn internal(what: &str) -> impl Fn(std::io::Error) -> Status + '_ {
    move |e| Status::internal(format!("{what}: {e}"))
}

/// Writes a bundle's `config.json`: 0600 from the start, since a spec holds
/// the pod's environment (secrets too).
fn save_spec(spec: &oci_spec::runtime::Spec, bundle: &Path) -> std::io::Result<()> {
    crate::helper::write_private(&bundle.join("config.json"), &serde_json::to_vec(spec).map_err(std::io::Error::other)?)
}

/// Most bytes of one ExecSync stream kept (containerd's cap since
/// CVE-2022-31030): ExecSync answers in one message, so output past this is
/// read and dropped, never held.
pub const EXEC_SYNC_MAX_OUTPUT: usize = 16 << 20;

/// One ExecSync stream, bounded.
#[derive(Default)]
struct CappedOutput {
    data: Vec<u8>,
    dropped: u64,
}

impl CappedOutput {
    fn push(&mut self, d: &[u8]) {
        let room = EXEC_SYNC_MAX_OUTPUT.saturating_sub(self.data.len());
        let kept = d.len().min(room);
        self.data.extend_from_slice(&d[..kept]);
        self.dropped += (d.len() - kept) as u64;
    }
}

#[derive(Default)]
struct State {
    pods: HashMap<String, PodRecord>,
    containers: HashMap<String, ContainerRecord>,
    shims: HashMap<String, Shim>,
    outputs: HashMap<String, Output>,
    /// Containers the guest OOM-killed (their exit reason).
    oom: std::collections::HashSet<String>,
}

pub struct Runtime {
    config: Config,
    store: Store,
    images: Arc<ImageStore>,
    launcher: ShimLauncher,
    state: Mutex<State>,
    events: broadcast::Sender<ContainerEventResponse>,
}

/// A process started with Exec, with its stdio.
pub struct ExecSession {
    shim: Shim,
    pub container_id: String,
    pub exec_id: String,
    dir: PathBuf,
    pub stdout: Option<tokio::net::unix::pipe::Receiver>,
    pub stderr: Option<tokio::net::unix::pipe::Receiver>,
    pub stdin: Option<tokio::net::unix::pipe::Sender>,
}

impl ExecSession {
    pub async fn wait(&self) -> Result<i32, Status> {
        Ok(self.shim.wait(&self.container_id, &self.exec_id).await?.0 as i32)
    }

    pub async fn kill(&self) {
        let _ = self.shim.kill(&self.container_id, &self.exec_id, libc::SIGKILL as u32, false).await;
    }

    pub async fn close_stdin(&self) {
        let _ = self.shim.close_stdin(&self.container_id, &self.exec_id).await;
    }

    pub async fn resize(&self, width: u32, height: u32) {
        let _ = self.shim.resize(&self.container_id, &self.exec_id, width, height).await;
    }

    /// Deletes the exec in the shim and its FIFOs.
    pub async fn close(self) {
        let _ = self.shim.delete(&self.container_id, &self.exec_id).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Runtime {
    pub async fn open(config: Config, images: Arc<ImageStore>, launcher: ShimLauncher) -> anyhow::Result<Arc<Self>> {
        let store = Store::open(&config.cri_state_root)?;
        let (events, _) = broadcast::channel(256);
        let rt = Arc::new(Self { config, store, images, launcher, state: Mutex::default(), events });
        rt.recover().await;
        Ok(rt)
    }

    /// Takes back what a previous `runv cri` ran: reconnects to the pods'
    /// shims, resumes log copying and exit watching; a pod whose shim is
    /// gone is cleaned up and reported not ready.
    async fn recover(self: &Arc<Self>) {
        for dir in self.store.orphans() {
            crate::helper::unmount_below(&dir);
            let _ = std::fs::remove_dir_all(&dir);
        }
        let pods = self.store.pods();
        let containers = self.store.containers();
        {
            let mut st = self.state.lock().await;
            st.pods = pods.iter().map(|p| (p.id.clone(), p.clone())).collect();
            st.containers = containers.iter().map(|c| (c.id.clone(), c.clone())).collect();
        }
        for pod in pods.into_iter().filter(|p| p.state == PodState::Ready) {
            match Shim::connect(&pod.shim_address).await {
                Ok(shim) => {
                    self.state.lock().await.shims.insert(pod.id.clone(), shim);
                    self.watch_exit(&pod.id, &pod.id);
                    for c in containers.iter().filter(|c| c.pod_id == pod.id) {
                        if c.state == ContainerState::Running || c.state == ContainerState::Created {
                            self.attach_output(c).await;
                        }
                        if c.state == ContainerState::Running {
                            self.watch_exit(&pod.id, &c.id);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("pod {}: {e}; marking it not ready", pod.id);
                    let _ = self.stop_pod(&pod.id).await;
                }
            }
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn events(&self) -> broadcast::Receiver<ContainerEventResponse> {
        self.events.subscribe()
    }

    /// Follows the shims' OOM events (the exit reason of an OOM-killed
    /// container).
    pub fn follow_shim_events(self: &Arc<Self>, mut rx: broadcast::Receiver<super::shim::ShimEvent>) {
        let rt = self.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(e) if e.topic == containerd_shim_protos::topics::TASK_OOM_EVENT_TOPIC => {
                        use containerd_shim_protos::protobuf::Message;
                        if let Ok(oom) = containerd_shim_protos::events::task::TaskOOM::parse_from_bytes(&e.value) {
                            // Guest-sent data: only a container of ours counts.
                            let mut st = rt.state.lock().await;
                            if st.containers.contains_key(&oom.container_id) {
                                st.oom.insert(oom.container_id);
                            }
                        }
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
    }

    async fn shim(&self, pod_id: &str) -> Result<Shim, Status> {
        let address = {
            let st = self.state.lock().await;
            if let Some(s) = st.shims.get(pod_id) {
                return Ok(s.clone());
            }
            let pod =
                st.pods.get(pod_id).ok_or_else(|| Status::not_found(format!("pod sandbox {pod_id} not found")))?;
            if pod.state != PodState::Ready {
                return Err(Status::failed_precondition(format!("pod sandbox {pod_id} is not ready")));
            }
            pod.shim_address.clone()
        };
        let shim = Shim::connect(&address).await?;
        self.state.lock().await.shims.insert(pod_id.to_string(), shim.clone());
        Ok(shim)
    }

    async fn image_for(&self, reference: &str, pull: bool) -> Result<ImageRecord, Status> {
        if let Some(i) = self.images.get(reference) {
            return Ok(i);
        }
        if !pull {
            return Err(Status::not_found(format!("image {reference} is not present; pull it first")));
        }
        let result = self.images.pull(reference, &oci_client::secrets::RegistryAuth::Anonymous).await;
        super::metrics::pulled(&result);
        result.map_err(|e| Status::unavailable(format!("pulling the sandbox image {reference}: {e}")))
    }

    /// The overlay rootfs mount (for the shim) of a container of `image`
    /// whose writable layer lives in `dir/rw` (a read-only root is the
    /// spec's business: overlayfs wants an upper dir over a single layer).
    fn rootfs_mount(&self, image: &ImageRecord, dir: &Path) -> Result<api::Mount, Status> {
        let lowers = self.images.lower_dirs(image).map_err(|e| Status::internal(e.to_string()))?;
        let mut lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        let rw = dir.join("rw");
        let (upper, work) = (rw.join("upper"), rw.join("work"));
        let mut dirs = vec![upper.clone(), work.clone(), dir.join("rootfs")];
        if lowerdir.is_empty() {
            // An image without layers: an empty lower directory.
            let empty = rw.join("empty");
            lowerdir.push(empty.display().to_string());
            dirs.push(empty);
        }
        for d in &dirs {
            std::fs::create_dir_all(d).map_err(internal("creating the container's directories"))?;
        }
        let options = vec![
            format!("lowerdir={}", lowerdir.join(":")),
            format!("upperdir={}", upper.display()),
            format!("workdir={}", work.display()),
        ];
        Ok(api::Mount { type_: "overlay".into(), source: "overlay".into(), options, ..Default::default() })
    }

    fn emit(&self, container_id: &str, kind: ContainerEventType) {
        let _ = self.events.send(ContainerEventResponse {
            container_id: container_id.into(),
            container_event_type: kind as i32,
            created_at: now_ns(),
            ..Default::default()
        });
    }

    // --- pods ---------------------------------------------------------------

    pub async fn run_pod(self: &Arc<Self>, req: RunPodSandboxRequest) -> Result<String, Status> {
        let config = spec::validate_pod(req.config.as_ref())?.clone();
        let handler = if req.runtime_handler.is_empty() { "runv" } else { req.runtime_handler.as_str() };
        if !HANDLERS.contains(&handler) {
            return Err(Status::invalid_argument(format!(
                "RunPodSandbox: unknown runtime handler {handler:?} (runv cri serves: {})",
                HANDLERS.join(", ")
            )));
        }
        let meta = config.metadata.clone().unwrap_or_default();
        let id = new_id();
        let mut pod = PodRecord {
            id: id.clone(),
            config: encode(&config),
            handler: handler.into(),
            created_at: now_ns(),
            state: PodState::NotReady,
            shim_address: String::new(),
            netns: None,
            ips: Vec::new(),
        };
        {
            // Checked and reserved under one lock: two requests for the
            // same pod cannot both pass.
            let mut st = self.state.lock().await;
            let same = st.pods.values().find(|p| {
                decode::<PodSandboxConfig>(&p.config).and_then(|c| c.metadata).is_some_and(|m| {
                    m.name == meta.name
                        && m.namespace == meta.namespace
                        && m.uid == meta.uid
                        && m.attempt == meta.attempt
                })
            });
            if let Some(p) = same {
                return Err(Status::already_exists(format!(
                    "RunPodSandbox: pod {}/{} (uid {}, attempt {}) already exists as {}",
                    meta.namespace, meta.name, meta.uid, meta.attempt, p.id
                )));
            }
            st.pods.insert(id.clone(), pod.clone());
        }
        let image = match self.image_for(&self.config.cri_sandbox_image, true).await {
            Ok(i) => i,
            Err(e) => {
                self.state.lock().await.pods.remove(&id);
                return Err(e);
            }
        };
        let dir = self.store.pod_dir(&id);
        // The record on disk first: a crash from here on leaves something
        // a restarted server can clean up.
        if let Err(e) = self.store.save_pod(&pod) {
            self.state.lock().await.pods.remove(&id);
            return Err(Status::internal(format!("saving the pod record: {e}")));
        }
        match self.start_pod(&mut pod, &config, &image, &dir).await {
            Ok(()) => {
                pod.state = PodState::Ready;
                self.store.save_pod(&pod).map_err(internal("saving the pod record"))?;
                self.state.lock().await.pods.insert(id.clone(), pod);
                self.watch_exit(&id, &id);
                Ok(id)
            }
            Err(e) => {
                self.state.lock().await.pods.insert(id.clone(), pod);
                let _ = self.remove_pod(&id).await;
                Err(e)
            }
        }
    }

    async fn start_pod(
        &self,
        pod: &mut PodRecord,
        config: &PodSandboxConfig,
        image: &ImageRecord,
        dir: &Path,
    ) -> Result<(), Status> {
        if !spec::host_network(config) {
            if let Some(net) = network::setup(&self.config, &pod.id, config, dir).await? {
                pod.netns = Some(net.netns.clone());
                pod.ips = net.ips.clone();
                self.store.save_pod(pod).map_err(internal("saving the pod record"))?;
            }
        }
        spec::write_pod_files(dir, config, &pod.ips)
            .map_err(internal("writing the pod's hosts/resolv.conf/hostname"))?;
        let oci = spec::sandbox_spec(&pod.id, config, image, pod.netns.as_deref())?;
        save_spec(&oci, dir).map_err(|e| Status::internal(format!("writing the sandbox spec: {e}")))?;
        let rootfs = self.rootfs_mount(image, dir)?;
        let address = self.launcher.start(dir, &pod.id).await?;
        pod.shim_address = address.clone();
        self.store.save_pod(pod).map_err(internal("saving the pod record"))?;
        let shim = Shim::connect(&address).await?;
        self.state.lock().await.shims.insert(pod.id.clone(), shim.clone());
        let req = api::CreateTaskRequest {
            id: pod.id.clone(),
            bundle: dir.display().to_string(),
            rootfs: vec![rootfs],
            ..Default::default()
        };
        shim.create(req).await?;
        shim.start(&pod.id, "").await?;
        Ok(())
    }

    /// Watches task `task_id` of pod `pod_id` (the sandbox or a container)
    /// and records its exit.
    fn watch_exit(self: &Arc<Self>, pod_id: &str, task_id: &str) {
        let (rt, pod_id, task_id) = (self.clone(), pod_id.to_string(), task_id.to_string());
        tokio::spawn(async move {
            let Ok(shim) = rt.shim(&pod_id).await else { return };
            // An error names how the task was lost: its VM ended, its
            // agent went silent, or the shim itself went away.
            let (code, at, lost) = match shim.wait(&task_id, "").await {
                Ok((code, at)) => (code as i32, at, None),
                Err(e) => (255, now_ns(), Some(e.to_string())),
            };
            if task_id == pod_id {
                let mut st = rt.state.lock().await;
                if let Some(p) = st.pods.get_mut(&pod_id) {
                    if p.state == PodState::Ready {
                        p.state = PodState::NotReady;
                        let _ = rt.store.save_pod(p);
                    }
                }
            } else {
                rt.container_exited(&task_id, code, at, lost).await;
            }
        });
    }

    async fn container_exited(&self, id: &str, code: i32, at: i64, lost: Option<String>) {
        let output = {
            let mut st = self.state.lock().await;
            let oom = st.oom.remove(id);
            let Some(c) = st.containers.get_mut(id) else { return };
            if c.state == ContainerState::Exited {
                return;
            }
            c.state = ContainerState::Exited;
            c.exit_code = code;
            c.finished_at = at;
            c.reason = if oom {
                "OOMKilled".into()
            } else if let Some(why) = lost {
                // Kata's word for a container whose VM went away.
                c.message = why;
                "Error".into()
            } else if code == 0 {
                "Completed".into()
            } else {
                "Error".into()
            };
            let _ = self.store.save_container(c);
            st.outputs.remove(id)
        };
        if let Some(o) = output {
            o.finish().await;
        }
        self.emit(id, ContainerEventType::ContainerStoppedEvent);
    }

    pub async fn stop_pod(&self, id: &str) -> Result<(), Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("StopPodSandbox: pod_sandbox_id is empty"));
        }
        let (pod, containers) = {
            let st = self.state.lock().await;
            let pod =
                st.pods.get(id).cloned().ok_or_else(|| Status::not_found(format!("pod sandbox {id} not found")))?;
            let containers: Vec<ContainerRecord> = st.containers.values().filter(|c| c.pod_id == id).cloned().collect();
            (pod, containers)
        };
        let shim = self.state.lock().await.shims.remove(id);
        let shim = match shim {
            Some(s) => Some(s),
            None if !pod.shim_address.is_empty() => Shim::connect(&pod.shim_address).await.ok(),
            None => None,
        };
        // Whether the shim deleted every task and exited by itself.
        let mut clean = false;
        if let Some(shim) = &shim {
            let live: Vec<&ContainerRecord> = containers.iter().filter(|c| c.state != ContainerState::Exited).collect();
            for c in &live {
                let _ = shim.kill(&c.id, "", libc::SIGKILL as u32, true).await;
            }
            for c in &live {
                if c.state == ContainerState::Running {
                    let exit = tokio::time::timeout(Duration::from_secs(10), shim.wait(&c.id, "")).await;
                    let (code, at, lost) = match exit {
                        Ok(Ok((code, at))) => (code as i32, at, None),
                        Ok(Err(e)) => (255, now_ns(), Some(e.to_string())),
                        Err(_) => (128 + libc::SIGKILL, now_ns(), None),
                    };
                    self.container_exited(&c.id, code, at, lost).await;
                } else {
                    self.container_exited(&c.id, 128 + libc::SIGKILL, now_ns(), None).await;
                }
            }
            // Every task goes, exited ones too: the shim stops the VM with
            // its last task.
            let deleted =
                |r: Result<(), super::shim::ShimError>| r.map_or_else(|e| e.code() == tonic::Code::NotFound, |()| true);
            clean = true;
            for c in &containers {
                clean &= deleted(shim.delete(&c.id, "").await);
            }
            let _ = shim.kill(id, "", libc::SIGKILL as u32, true).await;
            let _ = tokio::time::timeout(Duration::from_secs(10), shim.wait(id, "")).await;
            clean &= deleted(shim.delete(id, "").await);
            clean &= shim.shutdown(id).await.is_ok();
        }
        if !pod.shim_address.is_empty() && !clean {
            // Whatever a shim that died or did not answer left behind.
            self.launcher.delete(&self.store.pod_dir(id), id).await;
        }
        for c in containers.iter().filter(|c| c.state != ContainerState::Exited) {
            self.container_exited(&c.id, 128 + libc::SIGKILL, now_ns(), None).await;
        }
        if let Some(netns) = &pod.netns {
            let config = decode::<PodSandboxConfig>(&pod.config).unwrap_or_default();
            network::teardown(&self.config, id, netns, &config, &self.store.pod_dir(id)).await;
        }
        let mut st = self.state.lock().await;
        if let Some(p) = st.pods.get_mut(id) {
            p.state = PodState::NotReady;
            p.shim_address.clear();
            p.netns = None;
            self.store.save_pod(p).map_err(internal("saving the pod record"))?;
        }
        Ok(())
    }

    pub async fn remove_pod(&self, id: &str) -> Result<(), Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("RemovePodSandbox: pod_sandbox_id is empty"));
        }
        if !self.state.lock().await.pods.contains_key(id) {
            // Removing what is not there succeeds, as the CRI asks.
            return Ok(());
        }
        self.stop_pod(id).await?;
        let mut st = self.state.lock().await;
        let ids: Vec<String> = st.containers.values().filter(|c| c.pod_id == id).map(|c| c.id.clone()).collect();
        for cid in ids {
            st.containers.remove(&cid);
            st.outputs.remove(&cid);
            let dir = self.store.container_dir(&cid);
            crate::helper::unmount_below(&dir);
            std::fs::remove_dir_all(&dir).or_else(ignore_missing).map_err(internal("removing a container"))?;
        }
        st.pods.remove(id);
        st.shims.remove(id);
        let dir = self.store.pod_dir(id);
        crate::helper::unmount_below(&dir);
        std::fs::remove_dir_all(&dir).or_else(ignore_missing).map_err(internal("removing the pod"))?;
        Ok(())
    }

    pub async fn pod_status(&self, id: &str, verbose: bool) -> Result<PodSandboxStatusResponse, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("PodSandboxStatus: pod_sandbox_id is empty"));
        }
        let st = self.state.lock().await;
        let pod = st.pods.get(id).ok_or_else(|| Status::not_found(format!("pod sandbox {id} not found")))?;
        let mut info = HashMap::new();
        if verbose {
            info.insert(
                "info".into(),
                serde_json::json!({"shimAddress": pod.shim_address, "netns": pod.netns, "handler": pod.handler})
                    .to_string(),
            );
        }
        Ok(PodSandboxStatusResponse {
            status: Some(pod_status_of(pod)),
            info,
            containers_statuses: Vec::new(),
            timestamp: now_ns(),
        })
    }

    pub async fn list_pods(&self, filter: Option<PodSandboxFilter>) -> Vec<k8s_cri::v1::PodSandbox> {
        let st = self.state.lock().await;
        let f = filter.unwrap_or_default();
        st.pods
            .values()
            .map(pod_status_of)
            .filter(|p| f.id.is_empty() || p.id.starts_with(&f.id))
            .filter(|p| f.state.as_ref().is_none_or(|s| s.state == p.state))
            .filter(|p| f.label_selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
            .map(|p| k8s_cri::v1::PodSandbox {
                id: p.id,
                metadata: p.metadata,
                state: p.state,
                created_at: p.created_at,
                labels: p.labels,
                annotations: p.annotations,
                runtime_handler: p.runtime_handler,
            })
            .collect()
    }

    /// The host processes of a pod's sandbox (VM, virtiofsd, vsock device)
    /// by name and pid, from its shim's record, each only while it is
    /// still the process the shim started.
    pub async fn host_processes(&self, pod_id: &str) -> Vec<(String, u32)> {
        self.shim_state_dir(pod_id).map(|dir| crate::figures::host_processes(&dir)).unwrap_or_default()
    }

    /// What the pod's shim measured of its sandbox (`crate::figures`).
    pub fn figures(&self, pod_id: &str) -> Option<crate::figures::SandboxFigures> {
        crate::figures::SandboxFigures::read(&self.shim_state_dir(pod_id)?)
    }

    /// The state directory of the shim that runs `pod_id`.
    fn shim_state_dir(&self, pod_id: &str) -> Option<std::path::PathBuf> {
        if pod_id.is_empty() || pod_id.contains('/') || pod_id.starts_with('.') {
            return None;
        }
        Some(self.config().runtime_dir.join("shim").join(super::shim::NAMESPACE).join(pod_id))
    }

    // --- containers ---------------------------------------------------------

    pub async fn create_container(self: &Arc<Self>, req: CreateContainerRequest) -> Result<String, Status> {
        if req.pod_sandbox_id.is_empty() {
            return Err(Status::invalid_argument("CreateContainer: pod_sandbox_id is empty"));
        }
        let config = spec::validate_container(req.config.as_ref())?.clone();
        let meta = config.metadata.clone().unwrap_or_default();
        let reference = config.image.as_ref().map(|i| i.image.clone()).unwrap_or_default();
        let (pod, pod_config) = {
            let st = self.state.lock().await;
            let pod = st
                .pods
                .get(&req.pod_sandbox_id)
                .cloned()
                .ok_or_else(|| Status::not_found(format!("pod sandbox {} not found", req.pod_sandbox_id)))?;
            if pod.state != PodState::Ready {
                return Err(Status::failed_precondition(format!("pod sandbox {} is not ready", pod.id)));
            }
            let clash = st.containers.values().find(|c| {
                c.pod_id == pod.id
                    && decode::<ContainerConfig>(&c.config)
                        .and_then(|c| c.metadata)
                        .is_some_and(|m| m.name == meta.name && m.attempt == meta.attempt)
            });
            if let Some(c) = clash {
                return Err(Status::already_exists(format!(
                    "CreateContainer: container {} (attempt {}) already exists in pod {} as {}",
                    meta.name, meta.attempt, pod.id, c.id
                )));
            }
            let pod_config = decode::<PodSandboxConfig>(&pod.config).unwrap_or_default();
            (pod, pod_config)
        };
        let image = self.image_for(&reference, false).await?;
        let lowers = self.images.lower_dirs(&image).map_err(|e| Status::internal(e.to_string()))?;
        let id = new_id();
        let pod_dir = self.store.pod_dir(&pod.id);
        let cx = spec::ContainerContext {
            id: &id,
            pod_id: &pod.id,
            pod_config: &pod_config,
            pod_dir: &pod_dir,
            netns: pod.netns.as_deref(),
            image: &image,
            image_lowers: &lowers,
        };
        let oci = spec::container_spec(&cx, &config)?;
        let log_path = (!pod_config.log_directory.is_empty() && !config.log_path.is_empty())
            .then(|| Path::new(&pod_config.log_directory).join(&config.log_path));
        let record = ContainerRecord {
            id: id.clone(),
            pod_id: pod.id.clone(),
            config: encode(&config),
            image: reference,
            image_ref: image.digest.clone(),
            created_at: now_ns(),
            started_at: 0,
            finished_at: 0,
            exit_code: 0,
            state: ContainerState::Created,
            reason: String::new(),
            message: String::new(),
            log_path,
        };
        let dir = self.store.container_dir(&id);
        let made = async {
            std::fs::create_dir_all(&dir).map_err(internal("creating the container directory"))?;
            save_spec(&oci, &dir).map_err(|e| Status::internal(format!("writing the spec: {e}")))?;
            let rootfs = self.rootfs_mount(&image, &dir)?;
            mkfifo(&dir.join("stdout"))?;
            if !config.tty {
                mkfifo(&dir.join("stderr"))?;
            }
            if config.stdin {
                mkfifo(&dir.join("stdin"))?;
            }
            self.attach_output(&record).await;
            let path = |name: &str| {
                let p = dir.join(name);
                if p.exists() {
                    p.display().to_string()
                } else {
                    String::new()
                }
            };
            let shim = self.shim(&pod.id).await?;
            let req = api::CreateTaskRequest {
                id: id.clone(),
                bundle: dir.display().to_string(),
                rootfs: vec![rootfs],
                terminal: config.tty,
                stdin: path("stdin"),
                stdout: path("stdout"),
                stderr: path("stderr"),
                ..Default::default()
            };
            shim.create(req).await?;
            self.store.save_container(&record).map_err(internal("saving the container record"))?;
            Ok::<_, Status>(())
        }
        .await;
        if let Err(e) = made {
            if let Some(o) = self.state.lock().await.outputs.remove(&id) {
                o.finish().await;
            }
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        self.state.lock().await.containers.insert(id.clone(), record);
        self.emit(&id, ContainerEventType::ContainerCreatedEvent);
        Ok(id)
    }

    /// Starts copying a container's FIFOs into its log.
    async fn attach_output(&self, c: &ContainerRecord) {
        let dir = self.store.container_dir(&c.id);
        let stderr = dir.join("stderr");
        match Output::start(&dir.join("stdout"), stderr.exists().then_some(stderr.as_path()), c.log_path.clone()) {
            Ok(o) => {
                self.state.lock().await.outputs.insert(c.id.clone(), o);
            }
            Err(e) => tracing::warn!("container {}: reading its output: {e}", c.id),
        }
    }

    /// The pod whose id is `id` or, as containerd resolves ids, the one
    /// pod whose id starts with it (crictl prints 13 characters); `id`
    /// unchanged when no pod matches, so each call says what it says about
    /// an unknown pod.
    pub async fn pod_id(&self, id: &str) -> Result<String, Status> {
        resolve_id("pod sandbox", self.state.lock().await.pods.keys(), id)
    }

    /// The container whose id is `id` or the one whose id starts with it.
    pub async fn container_id(&self, id: &str) -> Result<String, Status> {
        resolve_id("container", self.state.lock().await.containers.keys(), id)
    }

    fn container_of<'a>(st: &'a State, id: &str, call: &str) -> Result<&'a ContainerRecord, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument(format!("{call}: container_id is empty")));
        }
        st.containers.get(id).ok_or_else(|| Status::not_found(format!("container {id} not found")))
    }

    pub async fn start_container(self: &Arc<Self>, id: &str) -> Result<(), Status> {
        let pod_id = {
            let st = self.state.lock().await;
            let c = Self::container_of(&st, id, "StartContainer")?;
            if c.state != ContainerState::Created {
                return Err(Status::failed_precondition(format!("container {id} is {:?}, not created", c.state)));
            }
            c.pod_id.clone()
        };
        let shim = self.shim(&pod_id).await?;
        if let Err(e) = shim.start(id, "").await {
            let mut st = self.state.lock().await;
            if let Some(c) = st.containers.get_mut(id) {
                c.state = ContainerState::Exited;
                c.exit_code = 128;
                c.finished_at = now_ns();
                c.reason = "StartError".into();
                c.message = e.to_string();
                let _ = self.store.save_container(c);
            }
            return Err(e.into());
        }
        {
            let mut st = self.state.lock().await;
            if let Some(c) = st.containers.get_mut(id) {
                c.state = ContainerState::Running;
                c.started_at = now_ns();
                self.store.save_container(c).map_err(internal("saving the container record"))?;
            }
        }
        self.watch_exit(&pod_id, id);
        self.emit(id, ContainerEventType::ContainerStartedEvent);
        Ok(())
    }

    pub async fn stop_container(&self, id: &str, timeout_s: i64) -> Result<(), Status> {
        let (pod_id, state, stop_signal) = {
            let st = self.state.lock().await;
            let c = Self::container_of(&st, id, "StopContainer")?;
            let signal = self
                .images
                .get(&c.image_ref)
                .and_then(|i| i.config["config"]["StopSignal"].as_str().and_then(signal_number))
                .unwrap_or(libc::SIGTERM);
            (c.pod_id.clone(), c.state, signal)
        };
        if state != ContainerState::Running {
            return Ok(());
        }
        let shim = self.shim(&pod_id).await?;
        if timeout_s > 0 {
            let _ = shim.kill(id, "", stop_signal as u32, false).await;
            if let Ok(Ok((code, at))) =
                tokio::time::timeout(Duration::from_secs(timeout_s as u64), shim.wait(id, "")).await
            {
                self.container_exited(id, code as i32, at, None).await;
                return Ok(());
            }
        }
        let _ = shim.kill(id, "", libc::SIGKILL as u32, true).await;
        match tokio::time::timeout(Duration::from_secs(30), shim.wait(id, "")).await {
            Ok(Ok((code, at))) => {
                self.container_exited(id, code as i32, at, None).await;
                Ok(())
            }
            // Lost with its VM (or its shim): stopped all the same.
            Ok(Err(e)) => {
                self.container_exited(id, 255, now_ns(), Some(e.to_string())).await;
                Ok(())
            }
            Err(_) => Err(Status::deadline_exceeded(format!("container {id} did not stop after SIGKILL"))),
        }
    }

    pub async fn remove_container(&self, id: &str) -> Result<(), Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("RemoveContainer: container_id is empty"));
        }
        let Some(c) = self.state.lock().await.containers.get(id).cloned() else {
            return Ok(());
        };
        if c.state == ContainerState::Running {
            self.stop_container(id, 0).await?;
        }
        if let Ok(shim) = self.shim(&c.pod_id).await {
            let _ = shim.delete(id, "").await;
        }
        let output = {
            let mut st = self.state.lock().await;
            st.containers.remove(id);
            st.outputs.remove(id)
        };
        if let Some(o) = output {
            o.finish().await;
        }
        let dir = self.store.container_dir(id);
        crate::helper::unmount_below(&dir);
        std::fs::remove_dir_all(&dir).or_else(ignore_missing).map_err(internal("removing the container"))?;
        self.emit(id, ContainerEventType::ContainerDeletedEvent);
        Ok(())
    }

    pub async fn container_status(&self, id: &str, verbose: bool) -> Result<ContainerStatusResponse, Status> {
        let st = self.state.lock().await;
        let c = Self::container_of(&st, id, "ContainerStatus")?;
        let mut info = HashMap::new();
        if verbose {
            info.insert("info".into(), serde_json::json!({"podId": c.pod_id, "imageRef": c.image_ref}).to_string());
        }
        Ok(ContainerStatusResponse { status: Some(container_status_of(c)), info })
    }

    pub async fn list_containers(&self, filter: Option<ContainerFilter>) -> Vec<Container> {
        let st = self.state.lock().await;
        let f = filter.unwrap_or_default();
        st.containers
            .values()
            .filter(|c| f.id.is_empty() || c.id.starts_with(&f.id))
            .filter(|c| f.pod_sandbox_id.is_empty() || c.pod_id.starts_with(&f.pod_sandbox_id))
            .map(|c| (c, container_status_of(c)))
            .filter(|(_, s)| f.state.as_ref().is_none_or(|v| v.state == s.state))
            .filter(|(_, s)| f.label_selector.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|(c, s)| Container {
                id: s.id,
                pod_sandbox_id: c.pod_id.clone(),
                metadata: s.metadata,
                image: s.image,
                image_ref: s.image_ref,
                state: s.state,
                created_at: s.created_at,
                labels: s.labels,
                annotations: s.annotations,
                image_id: c.image_ref.clone(),
            })
            .collect()
    }

    pub async fn update_resources(&self, req: UpdateContainerResourcesRequest) -> Result<(), Status> {
        let pod_id = {
            let st = self.state.lock().await;
            let c = Self::container_of(&st, &req.container_id, "UpdateContainerResources")?;
            if c.state == ContainerState::Exited {
                return Err(Status::failed_precondition(format!("container {} has exited", c.id)));
            }
            c.pod_id.clone()
        };
        let linux = req
            .linux
            .ok_or_else(|| Status::invalid_argument("UpdateContainerResources: linux resources are missing"))?;
        let shim = self.shim(&pod_id).await?;
        shim.update(&req.container_id, spec::update_resources(&linux)).await?;
        Ok(())
    }

    pub async fn reopen_log(&self, id: &str) -> Result<(), Status> {
        let st = self.state.lock().await;
        let c = Self::container_of(&st, id, "ReopenContainerLog")?;
        if c.state != ContainerState::Running {
            return Err(Status::failed_precondition(format!("container {id} is not running")));
        }
        let output =
            st.outputs.get(id).ok_or_else(|| Status::internal(format!("container {id} has no output copier")))?;
        output.reopen().map_err(internal("reopening the container log"))
    }

    // --- exec ---------------------------------------------------------------

    /// Starts `cmd` in running container `id` with FIFOs for the stdio asked for.
    pub async fn exec(&self, id: &str, cmd: &[String], tty: bool, stdin: bool) -> Result<ExecSession, Status> {
        if cmd.is_empty() {
            return Err(Status::invalid_argument("exec: cmd is empty"));
        }
        let pod_id = {
            let st = self.state.lock().await;
            let c = Self::container_of(&st, id, "exec")?;
            if c.state != ContainerState::Running {
                return Err(Status::failed_precondition(format!("container {id} is not running")));
            }
            c.pod_id.clone()
        };
        let cdir = self.store.container_dir(id);
        let bundle = oci_spec::runtime::Spec::load(cdir.join("config.json"))
            .map_err(|e| Status::internal(format!("reading container {id}'s spec: {e}")))?;
        let mut process = bundle.process().clone().unwrap_or_default();
        process.set_args(Some(cmd.to_vec()));
        process.set_terminal(Some(tty));
        let exec_id = new_id()[..16].to_string();
        let dir = cdir.join(format!("exec-{exec_id}"));
        std::fs::create_dir_all(&dir).map_err(internal("creating the exec directory"))?;
        let session = async {
            mkfifo(&dir.join("stdout"))?;
            let out = logs::open_fifo_reader(&dir.join("stdout")).map_err(internal("opening stdout"))?;
            let err = if tty {
                None
            } else {
                mkfifo(&dir.join("stderr"))?;
                Some(logs::open_fifo_reader(&dir.join("stderr")).map_err(internal("opening stderr"))?)
            };
            let input = if stdin {
                mkfifo(&dir.join("stdin"))?;
                let tx = tokio::net::unix::pipe::OpenOptions::new()
                    .read_write(true)
                    .open_sender(dir.join("stdin"))
                    .map_err(internal("opening stdin"))?;
                Some(tx)
            } else {
                None
            };
            let shim = self.shim(&pod_id).await?;
            let spec_json = serde_json::to_vec(&process).map_err(|e| Status::internal(e.to_string()))?;
            let fifo = |name: &str, on: bool| if on { dir.join(name).display().to_string() } else { String::new() };
            let req = api::ExecProcessRequest {
                id: id.into(),
                exec_id: exec_id.clone(),
                terminal: tty,
                stdin: fifo("stdin", stdin),
                stdout: fifo("stdout", true),
                stderr: fifo("stderr", !tty),
                spec: Some(containerd_shim_protos::protobuf::well_known_types::any::Any {
                    type_url: PROCESS_TYPE_URL.into(),
                    value: spec_json,
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            };
            shim.exec(req).await?;
            if let Err(e) = shim.start(id, &exec_id).await {
                let _ = shim.delete(id, &exec_id).await;
                return Err(e.into());
            }
            Ok(ExecSession {
                shim,
                container_id: id.into(),
                exec_id: exec_id.clone(),
                dir: dir.clone(),
                stdout: Some(out),
                stderr: err,
                stdin: input,
            })
        }
        .await;
        if session.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        session
    }

    pub async fn exec_sync(&self, req: ExecSyncRequest) -> Result<ExecSyncResponse, Status> {
        let mut session = self.exec(&req.container_id, &req.cmd, false, false).await?;
        let (finish_tx, finish_rx) = watch::channel(false);
        let collect = |rx: Option<tokio::net::unix::pipe::Receiver>| {
            let buf = Arc::new(std::sync::Mutex::new(CappedOutput::default()));
            let sink_buf = buf.clone();
            let handle = rx.map(|rx| {
                logs::pump(rx, finish_rx.clone(), move |d: Vec<u8>| {
                    sink_buf.lock().unwrap().push(&d);
                    std::future::ready(())
                })
            });
            (buf, handle)
        };
        let (stdout, out_task) = collect(session.stdout.take());
        let (stderr, err_task) = collect(session.stderr.take());
        let waited = if req.timeout > 0 {
            match tokio::time::timeout(Duration::from_secs(req.timeout as u64), session.wait()).await {
                Ok(r) => r,
                Err(_) => {
                    session.kill().await;
                    let _ = tokio::time::timeout(Duration::from_secs(10), session.wait()).await;
                    finish_tx.send_replace(true);
                    session.close().await;
                    return Err(Status::deadline_exceeded(format!(
                        "ExecSync: {:?} did not finish within {} s",
                        req.cmd, req.timeout
                    )));
                }
            }
        } else {
            session.wait().await
        };
        finish_tx.send_replace(true);
        for t in [out_task, err_task].into_iter().flatten() {
            let _ = t.await;
        }
        session.close().await;
        let exit_code = waited?;
        let take = |b: Arc<std::sync::Mutex<CappedOutput>>| std::mem::take(&mut *b.lock().unwrap());
        let (stdout, mut stderr) = (take(stdout), take(stderr));
        let mut err = std::mem::take(&mut stderr.data);
        // The note goes on stderr, so stdout stays byte-exact up to the cap.
        for (name, dropped) in [("stdout", stdout.dropped), ("stderr", stderr.dropped)] {
            if dropped > 0 {
                err.extend_from_slice(
                    format!("\n[runv: ExecSync {name} truncated at {EXEC_SYNC_MAX_OUTPUT} bytes, {dropped} bytes dropped]\n")
                        .as_bytes(),
                );
            }
        }
        Ok(ExecSyncResponse { stdout: stdout.data, stderr: err, exit_code })
    }

    /// What an attached client needs: the container's output and stdin.
    pub async fn attach(
        &self,
        id: &str,
    ) -> Result<(broadcast::Receiver<(logs::Stream, Vec<u8>)>, Option<PathBuf>, watch::Receiver<bool>), Status> {
        let st = self.state.lock().await;
        let c = Self::container_of(&st, id, "attach")?;
        if c.state != ContainerState::Running {
            return Err(Status::failed_precondition(format!("container {id} is not running")));
        }
        let output = st.outputs.get(id).ok_or_else(|| Status::internal(format!("container {id} has no output")))?;
        let stdin = self.store.container_dir(id).join("stdin");
        Ok((output.subscribe(), stdin.exists().then_some(stdin), output.finished()))
    }

    // --- stats --------------------------------------------------------------

    pub async fn container_stats(&self, id: &str) -> Result<ContainerStats, Status> {
        let c = {
            let st = self.state.lock().await;
            Self::container_of(&st, id, "ContainerStats")?.clone()
        };
        let config = decode::<ContainerConfig>(&c.config).unwrap_or_default();
        let attributes = ContainerAttributes {
            id: c.id.clone(),
            metadata: config.metadata.clone(),
            labels: config.labels.clone(),
            annotations: config.annotations.clone(),
        };
        let now = now_ns();
        let mut stats = ContainerStats { attributes: Some(attributes), ..Default::default() };
        if c.state == ContainerState::Running {
            let m = self.shim(&c.pod_id).await?.stats(id).await?;
            stats.cpu = Some(CpuUsage {
                timestamp: now,
                usage_core_nano_seconds: m.cpu.usage.as_ref().map(|u| UInt64Value { value: u.total }),
                usage_nano_cores: None,
            });
            let usage = m.memory.usage.as_ref().map(|u| u.usage).unwrap_or_default();
            stats.memory = Some(MemoryUsage {
                timestamp: now,
                working_set_bytes: Some(UInt64Value { value: usage }),
                usage_bytes: Some(UInt64Value { value: usage }),
                ..Default::default()
            });
        }
        let (bytes, inodes) = super::usage(&self.store.container_dir(id).join("rw/upper"));
        stats.writable_layer = Some(FilesystemUsage {
            timestamp: now,
            fs_id: Some(FilesystemIdentifier { mountpoint: self.config.cri_state_root.display().to_string() }),
            used_bytes: Some(UInt64Value { value: bytes }),
            inodes_used: Some(UInt64Value { value: inodes }),
        });
        Ok(stats)
    }

    pub async fn list_container_stats(&self, filter: Option<ContainerStatsFilter>) -> Vec<ContainerStats> {
        let f = filter.unwrap_or_default();
        let ids: Vec<String> = {
            let st = self.state.lock().await;
            st.containers
                .values()
                .filter(|c| f.id.is_empty() || c.id.starts_with(&f.id))
                .filter(|c| f.pod_sandbox_id.is_empty() || c.pod_id == f.pod_sandbox_id)
                .filter(|c| {
                    let labels = decode::<ContainerConfig>(&c.config).unwrap_or_default().labels;
                    f.label_selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                })
                .map(|c| c.id.clone())
                .collect()
        };
        let mut out = Vec::new();
        for id in ids {
            if let Ok(s) = self.container_stats(&id).await {
                out.push(s);
            }
        }
        out
    }

    pub async fn pod_stats(&self, id: &str) -> Result<PodSandboxStats, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("PodSandboxStats: pod_sandbox_id is empty"));
        }
        let status = {
            let st = self.state.lock().await;
            pod_status_of(st.pods.get(id).ok_or_else(|| Status::not_found(format!("pod sandbox {id} not found")))?)
        };
        let containers = self
            .list_container_stats(Some(ContainerStatsFilter { pod_sandbox_id: id.into(), ..Default::default() }))
            .await;
        let now = now_ns();
        let sum = |f: &dyn Fn(&ContainerStats) -> Option<u64>| containers.iter().filter_map(f).sum::<u64>();
        let cpu = sum(&|c| c.cpu.as_ref()?.usage_core_nano_seconds.as_ref().map(|v| v.value));
        let mem = sum(&|c| c.memory.as_ref()?.working_set_bytes.as_ref().map(|v| v.value));
        let linux = LinuxPodSandboxStats {
            cpu: Some(CpuUsage {
                timestamp: now,
                usage_core_nano_seconds: Some(UInt64Value { value: cpu }),
                ..Default::default()
            }),
            memory: Some(MemoryUsage {
                timestamp: now,
                working_set_bytes: Some(UInt64Value { value: mem }),
                usage_bytes: Some(UInt64Value { value: mem }),
                ..Default::default()
            }),
            containers,
            ..Default::default()
        };
        Ok(PodSandboxStats {
            attributes: Some(PodSandboxAttributes {
                id: status.id,
                metadata: status.metadata,
                labels: status.labels,
                annotations: status.annotations,
            }),
            linux: Some(linux),
            windows: None,
        })
    }

    pub async fn list_pod_stats(&self, filter: Option<PodSandboxStatsFilter>) -> Vec<PodSandboxStats> {
        let f = filter.unwrap_or_default();
        let pods = self.list_pods(None).await;
        let mut out = Vec::new();
        for p in pods.into_iter().filter(|p| p.state == PodSandboxState::SandboxReady as i32) {
            if (!f.id.is_empty() && !p.id.starts_with(&f.id))
                || !f.label_selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
            {
                continue;
            }
            if let Ok(s) = self.pod_stats(&p.id).await {
                out.push(s);
            }
        }
        out
    }

    /// The pod's IP, where port forwarding dials: the node reaches pod IPs,
    /// and the pod's ports live in its VM behind that address.
    pub async fn pod_ip(&self, id: &str) -> Result<String, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("PortForward: pod_sandbox_id is empty"));
        }
        let st = self.state.lock().await;
        let pod = st.pods.get(id).ok_or_else(|| Status::not_found(format!("pod sandbox {id} not found")))?;
        if pod.state != PodState::Ready {
            return Err(Status::failed_precondition(format!("pod sandbox {id} is not ready")));
        }
        pod.ips.first().cloned().ok_or_else(|| {
            Status::failed_precondition(format!(
                "pod sandbox {id} has no pod IP (host network, or no CNI network): runv cri forwards ports to the pod IP"
            ))
        })
    }

    /// The image ids containers still use (RemoveImage refuses them).
    pub async fn images_in_use(&self) -> Vec<String> {
        self.state.lock().await.containers.values().map(|c| c.image_ref.clone()).collect()
    }
}

fn ignore_missing(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

fn signal_number(name: &str) -> Option<i32> {
    let name = name.trim().to_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    if let Ok(n) = name.parse::<i32>() {
        return Some(n);
    }
    Some(match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "WINCH" => libc::SIGWINCH,
        _ => return None,
    })
}

fn pod_status_of(pod: &PodRecord) -> PodSandboxStatus {
    let config = decode::<PodSandboxConfig>(&pod.config).unwrap_or_default();
    let options =
        config.linux.as_ref().and_then(|l| l.security_context.as_ref()).and_then(|s| s.namespace_options.clone());
    PodSandboxStatus {
        id: pod.id.clone(),
        metadata: config.metadata.clone(),
        state: if pod.state == PodState::Ready {
            PodSandboxState::SandboxReady as i32
        } else {
            PodSandboxState::SandboxNotready as i32
        },
        created_at: pod.created_at,
        network: Some(PodSandboxNetworkStatus {
            ip: pod.ips.first().cloned().unwrap_or_default(),
            additional_ips: pod.ips.iter().skip(1).map(|ip| PodIp { ip: ip.clone() }).collect(),
        }),
        linux: Some(LinuxPodSandboxStatus { namespaces: Some(Namespace { options }) }),
        labels: config.labels.clone(),
        annotations: config.annotations.clone(),
        runtime_handler: pod.handler.clone(),
    }
}

fn container_status_of(c: &ContainerRecord) -> ContainerStatus {
    let config = decode::<ContainerConfig>(&c.config).unwrap_or_default();
    let state = match c.state {
        ContainerState::Created => k8s_cri::v1::ContainerState::ContainerCreated,
        ContainerState::Running => k8s_cri::v1::ContainerState::ContainerRunning,
        ContainerState::Exited => k8s_cri::v1::ContainerState::ContainerExited,
    };
    ContainerStatus {
        id: c.id.clone(),
        metadata: config.metadata.clone(),
        state: state as i32,
        created_at: c.created_at,
        started_at: c.started_at,
        finished_at: c.finished_at,
        exit_code: c.exit_code,
        image: config.image.clone(),
        image_ref: c.image_ref.clone(),
        reason: c.reason.clone(),
        message: c.message.clone(),
        labels: config.labels.clone(),
        annotations: config.annotations.clone(),
        mounts: config.mounts.clone(),
        log_path: c.log_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        resources: None,
        image_id: c.image_ref.clone(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unique_prefix_names_its_id_and_an_ambiguous_one_is_refused() {
        let ids: Vec<String> = vec!["abc123".into(), "abd456".into(), "abc".into()];
        assert_eq!(resolve_id("pod sandbox", ids.iter(), "abd").unwrap(), "abd456");
        // A whole id wins over the longer ids it prefixes.
        assert_eq!(resolve_id("pod sandbox", ids.iter(), "abc").unwrap(), "abc");
        assert_eq!(resolve_id("pod sandbox", ids.iter(), "zzz").unwrap(), "zzz");
        let e = resolve_id("container", ids.iter(), "ab").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("container id \"ab\" is ambiguous") && e.message().contains("abc123"), "{e}");
    }

    #[test]
    fn attack_exec_sync_output_is_capped() {
        println!("ATTACK ExecSync output past 16 MiB: tried");
        let mut out = CappedOutput::default();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..20 {
            out.push(&chunk);
        }
        assert_eq!(out.data.len(), EXEC_SYNC_MAX_OUTPUT);
        assert_eq!(out.dropped, 4 << 20);
        out.push(b"more");
        assert_eq!((out.data.len(), out.dropped), (EXEC_SYNC_MAX_OUTPUT, (4 << 20) + 4));
        println!("ATTACK ExecSync output past 16 MiB: held");
    }
}
