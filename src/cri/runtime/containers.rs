//! CreateContainer, StartContainer, StopContainer, RemoveContainer,
//! ContainerStatus, ListContainers, UpdateContainerResources and
//! ReopenContainerLog.

use super::*;

impl Runtime {
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
    pub(super) async fn attach_output(&self, c: &ContainerRecord) {
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

    pub(super) fn container_of<'a>(st: &'a State, id: &str, call: &str) -> Result<&'a ContainerRecord, Status> {
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

    /// The image ids containers still use (RemoveImage refuses them).
    pub async fn images_in_use(&self) -> Vec<String> {
        self.state.lock().await.containers.values().map(|c| c.image_ref.clone()).collect()
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
