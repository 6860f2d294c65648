//! The pods and containers of `runv cri`: each pod is one shim (and one
//! microVM), started and driven over the shim v2 task API exactly as
//! containerd drives it; records persist under the state root.
//!
//! One file per CRI concern: `pods` (the sandbox calls), `containers`
//! (container lifecycle, resources, logs), `exec` (Exec, ExecSync, Attach),
//! `stats`, and `events` (exits and OOM kills as the shims report them).
//! This file holds what they share: the state, the shim connections,
//! recovery after a restart, ids.

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

mod containers;
mod events;
mod exec;
mod pods;
mod stats;

pub use exec::{ExecSession, EXEC_SYNC_MAX_OUTPUT};

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
                            // One that already exited was killed by it (the
                            // exit can be seen first): its reason is mended.
                            let mut st = rt.state.lock().await;
                            let st = &mut *st;
                            match st.containers.get_mut(&oom.container_id) {
                                Some(c) if c.state == ContainerState::Exited => {
                                    c.reason = "OOMKilled".into();
                                    let _ = rt.store.save_container(c);
                                }
                                Some(_) => {
                                    st.oom.insert(oom.container_id);
                                }
                                None => {}
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
}

fn ignore_missing(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
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
}
