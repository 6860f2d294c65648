//! RunPodSandbox, StopPodSandbox, RemovePodSandbox, PodSandboxStatus and
//! ListPodSandbox: one shim and one microVM per pod.

use super::*;

impl Runtime {
    pub async fn run_pod(self: &Arc<Self>, req: RunPodSandboxRequest) -> Result<String, Status> {
        let mut config = spec::validate_pod(req.config.as_ref())?.clone();
        if config.hostname.is_empty() && spec::host_network(&config) {
            // The kubelet sends no hostname for a hostNetwork pod: it has
            // the node's (runc's pod shares the node's UTS namespace).
            config.hostname = crate::helper::node_hostname();
        }
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
            let deleted = |r: Result<(), crate::cri::shim::ShimError>| {
                r.map_or_else(|e| e.code() == tonic::Code::NotFound, |()| true)
            };
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
        Some(self.config().runtime_dir.join("shim").join(crate::cri::shim::NAMESPACE).join(pod_id))
    }

    /// The hybrid vsock socket of ready pod `id`'s VM, where port
    /// forwarding reaches `localhost` in the pod (the guest).
    pub async fn pod_vsock_socket(&self, id: &str) -> Result<std::path::PathBuf, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("PortForward: pod_sandbox_id is empty"));
        }
        {
            let st = self.state.lock().await;
            let pod = st.pods.get(id).ok_or_else(|| Status::not_found(format!("pod sandbox {id} not found")))?;
            if pod.state != PodState::Ready {
                return Err(Status::failed_precondition(format!("pod sandbox {id} is not ready")));
            }
        }
        self.shim_state_dir(id)
            .and_then(|dir| crate::sandbox::port_forward::vsock_socket_of(&dir))
            .ok_or_else(|| Status::failed_precondition(format!("pod sandbox {id}: its VM's vsock socket is not there")))
    }
}

pub(super) fn pod_status_of(pod: &PodRecord) -> PodSandboxStatus {
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
