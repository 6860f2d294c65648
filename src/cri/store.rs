//! What `runv cri` remembers of its pods and containers: one directory per
//! pod or container under the state root, holding its record (JSON), its
//! bundle (`config.json`, `rootfs`) and, for a container, its stdio FIFOs.
//! A restarted `runv cri` reads the records back and keeps control.

use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};

const RECORD: &str = "record.json";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum PodState {
    Ready,
    NotReady,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodRecord {
    pub id: String,
    /// The CRI `PodSandboxConfig` as sent, protobuf-encoded (base64).
    pub config: String,
    pub handler: String,
    pub created_at: i64,
    pub state: PodState,
    /// The shim's task API address (`unix://...`).
    pub shim_address: String,
    /// The pod's network namespace (a bind mount), when it has one.
    pub netns: Option<PathBuf>,
    /// The pod's addresses from CNI, first the primary one.
    pub ips: Vec<String>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum ContainerState {
    Created,
    Running,
    Exited,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub pod_id: String,
    /// The CRI `ContainerConfig` as sent, protobuf-encoded (base64).
    pub config: String,
    /// The image as asked for, and the id (digest) it resolved to.
    pub image: String,
    pub image_ref: String,
    pub created_at: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub exit_code: i32,
    pub state: ContainerState,
    pub reason: String,
    pub message: String,
    /// The CRI log file (pod log directory + the container's log path);
    /// None when the kubelet asked for no log.
    pub log_path: Option<PathBuf>,
}

pub fn encode<M: prost::Message>(message: &M) -> String {
    base64::engine::general_purpose::STANDARD.encode(message.encode_to_vec())
}

pub fn decode<M: prost::Message + Default>(text: &str) -> Option<M> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(text).ok()?;
    M::decode(bytes.as_slice()).ok()
}

/// The state root: `pods/<id>/` and `containers/<id>/`.
#[derive(Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn open(root: &Path) -> std::io::Result<Self> {
        // Records hold pods' environments and bundles: root's eyes only.
        crate::helper::create_private_dir_all(root)?;
        for d in ["pods", "containers"] {
            crate::helper::create_private_dir_all(&root.join(d))?;
        }
        Ok(Self { root: root.to_path_buf() })
    }

    pub fn pod_dir(&self, id: &str) -> PathBuf {
        self.root.join("pods").join(id)
    }

    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.root.join("containers").join(id)
    }

    pub fn save_pod(&self, pod: &PodRecord) -> std::io::Result<()> {
        write_record(&self.pod_dir(&pod.id), pod)
    }

    pub fn save_container(&self, c: &ContainerRecord) -> std::io::Result<()> {
        write_record(&self.container_dir(&c.id), c)
    }

    /// Every record under `pods/` (or `containers/`); a directory whose
    /// record is missing or unreadable (a crash during creation) is
    /// returned by `orphans`.
    pub fn pods(&self) -> Vec<PodRecord> {
        read_records(&self.root.join("pods"))
    }

    pub fn containers(&self) -> Vec<ContainerRecord> {
        read_records(&self.root.join("containers"))
    }

    /// Directories without a readable record: what a crash mid-creation left.
    pub fn orphans(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for kind in ["pods", "containers"] {
            for e in std::fs::read_dir(self.root.join(kind)).into_iter().flatten().flatten() {
                let record = std::fs::read(e.path().join(RECORD)).ok();
                if record.and_then(|r| serde_json::from_slice::<serde_json::Value>(&r).ok()).is_none() {
                    found.push(e.path());
                }
            }
        }
        found
    }
}

fn write_record<T: Serialize>(dir: &Path, record: &T) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{RECORD}.tmp"));
    crate::helper::write_private(&tmp, &serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, dir.join(RECORD))
}

fn read_records<T: for<'de> Deserialize<'de>>(dir: &Path) -> Vec<T> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path().join(RECORD)).ok()?).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_reopen_and_half_made_ones_are_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let config = k8s_cri::v1::PodSandboxConfig { hostname: "h".into(), ..Default::default() };
        let pod = PodRecord {
            id: "p1".into(),
            config: encode(&config),
            handler: "runv".into(),
            created_at: 1,
            state: PodState::Ready,
            shim_address: "unix:///x".into(),
            netns: None,
            ips: Vec::new(),
        };
        store.save_pod(&pod).unwrap();
        std::fs::create_dir_all(store.container_dir("half")).unwrap();
        let again = Store::open(dir.path()).unwrap();
        let pods = again.pods();
        assert_eq!(pods.len(), 1);
        assert_eq!(decode::<k8s_cri::v1::PodSandboxConfig>(&pods[0].config).unwrap().hostname, "h");
        assert_eq!(again.orphans(), vec![again.container_dir("half")]);
        assert!(decode::<k8s_cri::v1::PodSandboxConfig>("not base64!").is_none());
    }
}
