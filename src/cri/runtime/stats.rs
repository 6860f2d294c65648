//! ContainerStats, ListContainerStats, PodSandboxStats and
//! ListPodSandboxStats, read from the guest's cgroups through the shim.

use super::pods::pod_status_of;
use super::*;

impl Runtime {
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
        let (bytes, inodes) = crate::cri::usage(&self.store.container_dir(id).join("rw/upper"));
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
}
