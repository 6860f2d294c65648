//! The ttrpc service: the agent protocol's calls mapped onto the process
//! table and the guest.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use runv_proto::agent::*;
use runv_proto::agent_ttrpc::Agent;
use runv_proto::guest;
use tokio::sync::{Mutex, Notify};
use ttrpc::r#async::TtrpcContext;
use ttrpc::{Code, Error as RpcError};

use crate::container::{ContainerError, Containers};
use crate::process::{Process, ProcessTable, SpawnError};

type ProcessKey = (String, String);

pub struct AgentService {
    table: ProcessTable,
    containers: Containers,
    processes: Mutex<HashMap<ProcessKey, Arc<Process>>>,
    shutdown: Arc<Notify>,
    in_guest: bool,
}

impl AgentService {
    pub fn new(table: ProcessTable, containers: Containers, in_guest: bool) -> Self {
        Self { table, containers, processes: Mutex::default(), shutdown: Arc::default(), in_guest }
    }

    async fn insert_process(&self, container_id: &str, exec_id: &str, process: Arc<Process>) -> ttrpc::Result<()> {
        let mut processes = self.processes.lock().await;
        let key = (container_id.to_string(), exec_id.to_string());
        if processes.contains_key(&key) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("process '{exec_id}' already exists in container '{container_id}'"),
            ));
        }
        processes.insert(key, process);
        Ok(())
    }

    async fn check_exec_free(&self, container_id: &str, exec_id: &str) -> ttrpc::Result<()> {
        if self.processes.lock().await.contains_key(&(container_id.to_string(), exec_id.to_string())) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("process '{exec_id}' already exists in container '{container_id}'"),
            ));
        }
        Ok(())
    }

    pub fn shutdown_signal(&self) -> Arc<Notify> {
        self.shutdown.clone()
    }

    async fn process(&self, container_id: &str, exec_id: &str) -> ttrpc::Result<Arc<Process>> {
        self.processes
            .lock()
            .await
            .get(&(container_id.to_owned(), exec_id.to_owned()))
            .cloned()
            .ok_or_else(|| status(Code::NOT_FOUND, format!("no process '{exec_id}' in container '{container_id}'")))
    }

    async fn read(
        &self,
        container_id: &str,
        exec_id: &str,
        len: u32,
        stderr: bool,
    ) -> ttrpc::Result<ReadStreamResponse> {
        let process = self.process(container_id, exec_id).await?;
        let max = len.clamp(1, guest::MAX_READ_CHUNK) as usize;
        let data = process.read_output(stderr, max).await;
        let eof = data.is_empty();
        Ok(ReadStreamResponse { data, eof, ..Default::default() })
    }
}

fn container_status(e: ContainerError) -> RpcError {
    let code = match e {
        ContainerError::NotFound(_) => Code::NOT_FOUND,
        ContainerError::AlreadyExists(_) => Code::ALREADY_EXISTS,
        ContainerError::Invalid(_) => Code::INVALID_ARGUMENT,
        ContainerError::Failed(_) => Code::FAILED_PRECONDITION,
    };
    status(code, e.to_string())
}

fn status(code: Code, msg: impl Into<String>) -> RpcError {
    RpcError::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn mem_field(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[async_trait]
impl Agent for AgentService {
    async fn health(&self, _ctx: &TtrpcContext, _req: HealthRequest) -> ttrpc::Result<HealthResponse> {
        Ok(HealthResponse { status: "SERVING".into(), ..Default::default() })
    }

    async fn guest_details(
        &self,
        _ctx: &TtrpcContext,
        _req: GuestDetailsRequest,
    ) -> ttrpc::Result<GuestDetailsResponse> {
        let uname = nix::sys::utsname::uname().map_err(|e| status(Code::INTERNAL, format!("uname: {e}")))?;
        let meminfo = std::fs::read_to_string("/proc/meminfo")
            .map_err(|e| status(Code::INTERNAL, format!("reading /proc/meminfo: {e}")))?;
        let memory = MemoryInfo {
            total_kib: mem_field(&meminfo, "MemTotal"),
            free_kib: mem_field(&meminfo, "MemFree"),
            available_kib: mem_field(&meminfo, "MemAvailable"),
            buffers_kib: mem_field(&meminfo, "Buffers"),
            cached_kib: mem_field(&meminfo, "Cached"),
            shmem_kib: mem_field(&meminfo, "Shmem"),
            anon_pages_kib: mem_field(&meminfo, "AnonPages"),
            slab_reclaimable_kib: mem_field(&meminfo, "SReclaimable"),
            ..Default::default()
        };
        let status = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let own = status("self");
        let pause_anon_rss_kib =
            self.containers.pause_pid().await.map(|p| mem_field(&status(&p.to_string()), "RssAnon")).unwrap_or(0);
        Ok(GuestDetailsResponse {
            kernel_release: uname.release().to_string_lossy().into_owned(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            memory: Some(memory).into(),
            agent_anon_rss_kib: mem_field(&own, "RssAnon"),
            agent_file_rss_kib: mem_field(&own, "RssFile"),
            pause_anon_rss_kib,
            ..Default::default()
        })
    }

    async fn mount_shared(&self, _ctx: &TtrpcContext, req: MountSharedRequest) -> ttrpc::Result<Empty> {
        if req.tag.is_empty() {
            return Err(status(Code::INVALID_ARGUMENT, "mount_shared: tag is empty"));
        }
        if !req.mount_point.starts_with('/') || req.mount_point.split('/').any(|c| c == "..") {
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!("mount_shared: mount point '{}' must be an absolute path without '..'", req.mount_point),
            ));
        }
        std::fs::create_dir_all(&req.mount_point)
            .map_err(|e| status(Code::INTERNAL, format!("creating {}: {e}", req.mount_point)))?;
        // setuid is honoured in the guest (a container with
        // no_new_privileges false may run a setuid binary of its image, as
        // under runc); the host's side of the share stays nosuid and nodev,
        // so nothing the guest writes there gains privilege on the host.
        let mut flags = nix::mount::MsFlags::MS_NODEV;
        if req.read_only {
            flags |= nix::mount::MsFlags::MS_RDONLY;
        }
        nix::mount::mount(Some(req.tag.as_str()), req.mount_point.as_str(), Some("virtiofs"), flags, None::<&str>)
            .map_err(|e| {
                status(Code::INTERNAL, format!("mounting virtio-fs '{}' on {}: {e}", req.tag, req.mount_point))
            })?;
        Ok(Empty::new())
    }

    async fn run_process(&self, _ctx: &TtrpcContext, req: RunProcessRequest) -> ttrpc::Result<RunProcessResponse> {
        if req.exec_id.is_empty() {
            return Err(status(Code::INVALID_ARGUMENT, "run_process: exec_id is empty"));
        }
        if !req.container_id.is_empty() {
            return Err(status(
                Code::INVALID_ARGUMENT,
                "run_process: container_id must be empty (use ExecProcess for a process in a container)",
            ));
        }
        let key = (req.container_id.clone(), req.exec_id.clone());
        let mut processes = self.processes.lock().await;
        if processes.contains_key(&key) {
            return Err(status(Code::ALREADY_EXISTS, format!("process '{}' already exists", req.exec_id)));
        }
        let process = self.table.spawn(&req).map_err(|e| {
            let code = match e {
                SpawnError::NotFound(_) => Code::NOT_FOUND,
                SpawnError::PermissionDenied(_) => Code::PERMISSION_DENIED,
                SpawnError::Invalid(_) => Code::INVALID_ARGUMENT,
            };
            status(code, e.to_string())
        })?;
        let pid = process.pid as u32;
        processes.insert(key, process);
        Ok(RunProcessResponse { pid, ..Default::default() })
    }

    async fn write_stdin(&self, _ctx: &TtrpcContext, req: WriteStdinRequest) -> ttrpc::Result<WriteStdinResponse> {
        let process = self.process(&req.container_id, &req.exec_id).await?;
        let stdin = process.stdin.lock().await;
        let Some(stdin) = stdin.as_ref() else {
            return Err(status(Code::FAILED_PRECONDITION, "stdin is closed"));
        };
        let len =
            stdin.write_all(&req.data).await.map_err(|e| status(Code::INTERNAL, format!("writing stdin: {e}")))?;
        Ok(WriteStdinResponse { len: len as u32, ..Default::default() })
    }

    async fn close_stdin(&self, _ctx: &TtrpcContext, req: CloseStdinRequest) -> ttrpc::Result<Empty> {
        let process = self.process(&req.container_id, &req.exec_id).await?;
        let mut stdin = process.stdin.lock().await;
        if process.tty.is_some() {
            // A terminal has no separate stdin to close: send end-of-file.
            if let Some(s) = stdin.as_ref() {
                let _ = s.write_all(&[4]).await;
            }
        } else {
            stdin.take();
        }
        Ok(Empty::new())
    }

    async fn read_stdout(&self, _ctx: &TtrpcContext, req: ReadStreamRequest) -> ttrpc::Result<ReadStreamResponse> {
        self.read(&req.container_id, &req.exec_id, req.len, false).await
    }

    async fn read_stderr(&self, _ctx: &TtrpcContext, req: ReadStreamRequest) -> ttrpc::Result<ReadStreamResponse> {
        self.read(&req.container_id, &req.exec_id, req.len, true).await
    }

    async fn signal_process(&self, _ctx: &TtrpcContext, req: SignalProcessRequest) -> ttrpc::Result<Empty> {
        let process = self.process(&req.container_id, &req.exec_id).await?;
        if req.all && req.exec_id.is_empty() && !req.container_id.is_empty() {
            let sig = nix::sys::signal::Signal::try_from(req.signal as i32)
                .map_err(|_| status(Code::FAILED_PRECONDITION, format!("invalid signal number {}", req.signal)))?;
            let pids = self.containers.pids(&req.container_id).await.map_err(container_status)?;
            for pid in pids {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
            }
            return Ok(Empty::new());
        }
        process.signal(req.signal as i32).map_err(|e| status(Code::FAILED_PRECONDITION, format!("{e:#}")))?;
        Ok(Empty::new())
    }

    async fn wait_process(&self, _ctx: &TtrpcContext, req: WaitProcessRequest) -> ttrpc::Result<WaitProcessResponse> {
        let process = self.process(&req.container_id, &req.exec_id).await?;
        let exit = process.wait().await;
        if req.exec_id.is_empty() {
            // An OOM kill goes out before the exit it caused.
            self.containers.check_oom(&req.container_id).await;
        }
        Ok(WaitProcessResponse { status: exit.status, signal: exit.signal, ..Default::default() })
    }

    async fn tty_win_resize(&self, _ctx: &TtrpcContext, req: TtyWinResizeRequest) -> ttrpc::Result<Empty> {
        let process = self.process(&req.container_id, &req.exec_id).await?;
        let rows = u16::try_from(req.rows)
            .map_err(|_| status(Code::INVALID_ARGUMENT, format!("rows {} out of range", req.rows)))?;
        let cols = u16::try_from(req.cols)
            .map_err(|_| status(Code::INVALID_ARGUMENT, format!("cols {} out of range", req.cols)))?;
        process.resize(rows, cols).map_err(|e| status(Code::FAILED_PRECONDITION, format!("{e:#}")))?;
        Ok(Empty::new())
    }

    async fn remove_process(&self, _ctx: &TtrpcContext, req: RemoveProcessRequest) -> ttrpc::Result<Empty> {
        let key = (req.container_id.clone(), req.exec_id.clone());
        let mut processes = self.processes.lock().await;
        let Some(process) = processes.get(&key) else {
            return Err(status(
                Code::NOT_FOUND,
                format!("no process '{}' in container '{}'", req.exec_id, req.container_id),
            ));
        };
        if process.exit_status().is_none() {
            return Err(status(Code::FAILED_PRECONDITION, format!("process '{}' is still running", req.exec_id)));
        }
        processes.remove(&key);
        Ok(Empty::new())
    }

    async fn create_sandbox(&self, _ctx: &TtrpcContext, req: CreateSandboxRequest) -> ttrpc::Result<Empty> {
        self.containers.create_sandbox(&req, self.in_guest).await.map_err(container_status)?;
        Ok(Empty::new())
    }

    async fn setup_network(&self, _ctx: &TtrpcContext, req: SetupNetworkRequest) -> ttrpc::Result<Empty> {
        use crate::network::NetworkError;
        crate::network::setup(&req).await.map_err(|e| {
            let code = match e {
                NetworkError::Invalid(_) => Code::INVALID_ARGUMENT,
                NetworkError::NoSuchNic { .. } => Code::NOT_FOUND,
                _ => Code::INTERNAL,
            };
            status(code, format!("setup_network: {e}"))
        })?;
        Ok(Empty::new())
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        self.check_exec_free(&req.container_id, "").await?;
        let started = self.containers.create(&req.container_id, &req.oci_spec).await.map_err(container_status)?;
        let pid = started.process.pid as u32;
        self.insert_process(&req.container_id, "", started.process).await?;
        Ok(CreateContainerResponse { pid, ..Default::default() })
    }

    async fn start_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.start(&req.container_id).await.map_err(container_status)?;
        Ok(Empty::new())
    }

    async fn exec_process(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<ExecProcessResponse> {
        if req.exec_id.is_empty() {
            return Err(status(Code::INVALID_ARGUMENT, "exec_process: exec_id is empty"));
        }
        self.check_exec_free(&req.container_id, &req.exec_id).await?;
        let started =
            self.containers.exec(&req.container_id, &req.exec_id, &req.process).await.map_err(container_status)?;
        let pid = started.process.pid as u32;
        self.insert_process(&req.container_id, &req.exec_id, started.process).await?;
        Ok(ExecProcessResponse { pid, ..Default::default() })
    }

    async fn pause_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.pause(&req.container_id).await.map_err(container_status)?;
        Ok(Empty::new())
    }

    async fn resume_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.resume(&req.container_id).await.map_err(container_status)?;
        Ok(Empty::new())
    }

    async fn update_container(&self, _ctx: &TtrpcContext, req: UpdateContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.update(&req.container_id, &req.resources).await.map_err(container_status)?;
        Ok(Empty::new())
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        let u = self.containers.usage(&req.container_id).await.map_err(container_status)?;
        Ok(StatsContainerResponse {
            cpu_usage_ns: u.cpu_usage_ns,
            cpu_user_ns: u.cpu_user_ns,
            cpu_system_ns: u.cpu_system_ns,
            memory_usage_bytes: u.memory_usage,
            memory_limit_bytes: u.memory_limit,
            memory_working_set_bytes: u.memory_working_set,
            pids_current: u.pids_current,
            pids_limit: u.pids_limit,
            io_read_bytes: u.io_read_bytes,
            io_write_bytes: u.io_write_bytes,
            oom_kills: u.oom_kills,
            ..Default::default()
        })
    }

    async fn list_processes(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<ListProcessesResponse> {
        let pids = self.containers.pids(&req.container_id).await.map_err(container_status)?;
        Ok(ListProcessesResponse { pids: pids.into_iter().map(|p| p as u32).collect(), ..Default::default() })
    }

    async fn remove_container(&self, _ctx: &TtrpcContext, req: RemoveContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.remove(&req.container_id, req.force).await.map_err(container_status)?;
        self.processes.lock().await.retain(|(cid, _), _| *cid != req.container_id);
        Ok(Empty::new())
    }

    async fn get_oom_event(&self, _ctx: &TtrpcContext, _req: GetOomEventRequest) -> ttrpc::Result<OomEvent> {
        match self.containers.next_oom().await {
            Some(container_id) => Ok(OomEvent { container_id, ..Default::default() }),
            None => Err(status(Code::UNAVAILABLE, "the OOM watcher has stopped")),
        }
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        if self.in_guest {
            // The VM goes away with everything in it; only stop the work.
            self.containers.kill_all().await;
        } else {
            for id in self.containers.ids().await {
                let _ = self.containers.remove(&id, true).await;
            }
        }
        self.table.kill_all();
        if self.in_guest {
            nix::unistd::sync();
        }
        self.shutdown.notify_one();
        Ok(Empty::new())
    }
}
