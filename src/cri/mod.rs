//! `runv cri`: the bundled CRI v1 server (tonic, k8s-cri) on a Unix socket.
//!
//! The ImageService runs on the image store (`crate::image`); the
//! RuntimeService runs each pod on `containerd-shim-runv-v2`, started and
//! driven over the shim v2 task API as containerd does (`runtime`), with
//! CNI pod networks (`network`), CRI logs (`logs`), state that survives a
//! restart (`store`) and a streaming server for exec and attach (`stream`).

pub mod authority;
pub mod logs;
pub mod metrics;
pub mod network;
pub mod runtime;
pub mod seccomp;
pub mod shim;
pub mod spdy;
pub mod spec;
pub mod store;
pub mod stream;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use k8s_cri::v1::image_service_server::{ImageService, ImageServiceServer};
use k8s_cri::v1::runtime_service_server::{RuntimeService, RuntimeServiceServer};
use k8s_cri::v1::*;
use oci_client::secrets::RegistryAuth;
use tonic::{Request, Response, Status};

use crate::config::Config;
use crate::image::{ImageError, ImageRecord, ImageStore};

/// The CRI API version served.
pub const CRI_API_VERSION: &str = "v1";

pub struct Cri {
    images: Arc<ImageStore>,
    runtime: Arc<runtime::Runtime>,
    streams: Arc<stream::StreamServer>,
}

fn image_status(e: ImageError) -> Status {
    match e {
        ImageError::BadReference { .. } => Status::invalid_argument(e.to_string()),
        ImageError::NotFound(_) => Status::not_found(e.to_string()),
        ImageError::DigestMismatch { .. } => Status::data_loss(e.to_string()),
        ImageError::Pull { .. } => Status::unavailable(e.to_string()),
        ImageError::Layer { .. } | ImageError::Io { .. } => Status::internal(e.to_string()),
    }
}

/// One CRI image for the stored references `refs` to the same image (one
/// per tag or digest it was pulled by): its tags and `repo@digest` forms.
fn to_cri(refs: &[&ImageRecord]) -> Image {
    let r = refs[0];
    let mut repo_tags = Vec::new();
    let mut repo_digests = Vec::new();
    for each in refs {
        // `registry/repository`, whether the image was pulled by tag or
        // digest; only a tag reference is a repo tag.
        let (repo, tagged) = match each.reference.parse::<oci_client::Reference>() {
            Ok(p) => (format!("{}/{}", p.registry(), p.repository()), p.digest().is_none()),
            Err(_) => (each.reference.clone(), false),
        };
        if tagged && !repo_tags.contains(&each.reference) {
            repo_tags.push(each.reference.clone());
        }
        let digest = format!("{repo}@{}", r.digest);
        if !repo_digests.contains(&digest) {
            repo_digests.push(digest);
        }
    }
    repo_tags.sort();
    repo_digests.sort();
    let user = r.config["config"]["User"].as_str().unwrap_or_default();
    let (uid, username) = match user.split(':').next().unwrap_or_default() {
        "" => (Some(Int64Value { value: 0 }), String::new()),
        u => match u.parse::<i64>() {
            Ok(n) => (Some(Int64Value { value: n }), String::new()),
            Err(_) => (None, u.to_string()),
        },
    };
    Image {
        id: r.digest.clone(),
        repo_tags,
        repo_digests,
        size: r.size(),
        uid,
        username,
        spec: Some(ImageSpec { image: r.digest.clone(), ..Default::default() }),
        pinned: false,
    }
}

/// The stored images grouped by image (id), one CRI image each.
fn by_image(records: &[ImageRecord]) -> Vec<Image> {
    let mut ids: Vec<&str> = records.iter().map(|r| r.digest.as_str()).collect();
    ids.sort();
    ids.dedup();
    ids.into_iter().map(|id| to_cri(&records.iter().filter(|r| r.digest == id).collect::<Vec<_>>())).collect()
}

fn wanted_image(spec: Option<ImageSpec>, call: &str) -> Result<String, Status> {
    let image = spec.map(|s| s.image).unwrap_or_default();
    if image.trim().is_empty() {
        return Err(Status::invalid_argument(format!("{call}: image is empty")));
    }
    Ok(image)
}

fn auth_of(auth: Option<AuthConfig>) -> Result<RegistryAuth, Status> {
    let Some(a) = auth else { return Ok(RegistryAuth::Anonymous) };
    if !a.registry_token.is_empty() {
        return Ok(RegistryAuth::Bearer(a.registry_token));
    }
    if !a.username.is_empty() {
        return Ok(RegistryAuth::Basic(a.username, a.password));
    }
    if !a.auth.is_empty() {
        // base64("user:password"), as in a docker config.
        let (user, pass) = crate::image::hosts::decode_basic_auth(&a.auth)
            .ok_or_else(|| Status::invalid_argument("auth: not base64 of user:password"))?;
        return Ok(RegistryAuth::Basic(user, pass));
    }
    Ok(RegistryAuth::Anonymous)
}

#[tonic::async_trait]
impl ImageService for Cri {
    async fn list_images(&self, req: Request<ListImagesRequest>) -> Result<Response<ListImagesResponse>, Status> {
        let filter = req.into_inner().filter.and_then(|f| f.image).map(|s| s.image).filter(|s| !s.is_empty());
        let all = self.images.list();
        let images = match filter {
            Some(f) => match crate::image::resolve(&all, &f) {
                Some(one) => vec![to_cri(&all.iter().filter(|i| i.digest == one.digest).collect::<Vec<_>>())],
                None => Vec::new(),
            },
            None => by_image(&all),
        };
        Ok(Response::new(ListImagesResponse { images }))
    }

    async fn image_status(&self, req: Request<ImageStatusRequest>) -> Result<Response<ImageStatusResponse>, Status> {
        let req = req.into_inner();
        let wanted = wanted_image(req.image, "ImageStatus")?;
        // A missing image is not an error: the answer has no image.
        let all = self.images.list();
        let record = crate::image::resolve(&all, &wanted).cloned();
        let mut info = HashMap::new();
        if req.verbose {
            if let Some(r) = &record {
                info.insert("info".into(), serde_json::to_string(r).unwrap_or_default());
            }
        }
        // Only the references to this image: its tags, not every image's.
        let image = record.map(|r| to_cri(&all.iter().filter(|i| i.digest == r.digest).collect::<Vec<_>>()));
        Ok(Response::new(ImageStatusResponse { image, info }))
    }

    async fn pull_image(&self, req: Request<PullImageRequest>) -> Result<Response<PullImageResponse>, Status> {
        let req = req.into_inner();
        let wanted = wanted_image(req.image, "PullImage")?;
        let auth = auth_of(req.auth)?;
        let result = self.images.pull(&wanted, &auth).await;
        metrics::pulled(&result);
        let record = result.map_err(image_status)?;
        Ok(Response::new(PullImageResponse { image_ref: record.digest }))
    }

    async fn remove_image(&self, req: Request<RemoveImageRequest>) -> Result<Response<RemoveImageResponse>, Status> {
        let wanted = wanted_image(req.into_inner().image, "RemoveImage")?;
        if let Some(image) = self.images.get(&wanted) {
            if self.runtime.images_in_use().await.contains(&image.digest) {
                return Err(Status::failed_precondition(format!(
                    "RemoveImage: image {wanted} is used by a container; remove the container first"
                )));
            }
        }
        match self.images.remove(&wanted) {
            // Removing what is not there succeeds, as the CRI asks.
            Ok(_) | Err(ImageError::NotFound(_)) => Ok(Response::new(RemoveImageResponse {})),
            Err(e) => Err(image_status(e)),
        }
    }

    async fn image_fs_info(&self, _req: Request<ImageFsInfoRequest>) -> Result<Response<ImageFsInfoResponse>, Status> {
        let (bytes, inodes) = usage(&self.runtime.config().cri_image_root);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or_default();
        let fs = FilesystemUsage {
            timestamp: now,
            fs_id: Some(FilesystemIdentifier {
                mountpoint: self.runtime.config().cri_image_root.display().to_string(),
            }),
            used_bytes: Some(UInt64Value { value: bytes }),
            inodes_used: Some(UInt64Value { value: inodes }),
        };
        Ok(Response::new(ImageFsInfoResponse { image_filesystems: vec![fs], container_filesystems: Vec::new() }))
    }
}

/// Bytes and inodes used below `dir` (not following symlinks).
pub(crate) fn usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let (mut bytes, mut inodes) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.path().symlink_metadata() else { continue };
            inodes += 1;
            bytes += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (bytes, inodes)
}

/// Trait methods answering UNIMPLEMENTED with a reason, written in the form
/// `#[tonic::async_trait]` gives async methods (it cannot see into a macro).
macro_rules! unsupported {
    ($($name:ident($req:ty) -> $resp:ty: $why:expr;)*) => {
        $(
            fn $name<'life0, 'async_trait>(
                &'life0 self,
                _req: Request<$req>,
            ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<$resp>, Status>> + Send + 'async_trait>>
            where
                'life0: 'async_trait,
                Self: 'async_trait,
            {
                Box::pin(async move { Err(Status::unimplemented(format!("{}: {}", stringify!($name), $why))) })
            }
        )*
    };
}

fn network_condition(config: &Config) -> RuntimeCondition {
    let (status, reason, message) = match network::network_ready(config) {
        Ok(()) => (true, String::new(), String::new()),
        Err(e) => (false, "NoCNIConfig".to_string(), format!("{e}: pods on the pod network get loopback only")),
    };
    RuntimeCondition { r#type: "NetworkReady".into(), status, reason, message }
}

#[tonic::async_trait]
impl RuntimeService for Cri {
    async fn version(&self, _req: Request<VersionRequest>) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(VersionResponse {
            version: "0.1.0".into(),
            runtime_name: "runv".into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: CRI_API_VERSION.into(),
        }))
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let runtime_ready = RuntimeCondition { r#type: "RuntimeReady".into(), status: true, ..Default::default() };
        let mut info = HashMap::new();
        if req.into_inner().verbose {
            info.insert(
                "config".into(),
                serde_json::json!({
                    "handlers": runtime::HANDLERS,
                    "shim": self.runtime.config().cri_shim,
                    "sandboxImage": self.runtime.config().cri_sandbox_image,
                    "streamServer": self.streams.addr().to_string(),
                    "cniConfDir": self.runtime.config().cni_conf_dir,
                })
                .to_string(),
            );
        }
        let handlers = runtime::HANDLERS
            .iter()
            .map(|h| RuntimeHandler { name: h.to_string(), features: Some(RuntimeHandlerFeatures::default()) })
            .collect();
        Ok(Response::new(StatusResponse {
            status: Some(RuntimeStatus { conditions: vec![runtime_ready, network_condition(self.runtime.config())] }),
            info,
            runtime_handlers: handlers,
            ..Default::default()
        }))
    }

    async fn runtime_config(
        &self,
        _req: Request<RuntimeConfigRequest>,
    ) -> Result<Response<RuntimeConfigResponse>, Status> {
        // The cgroup driver runv's pods use.
        let linux = LinuxRuntimeConfiguration { cgroup_driver: CgroupDriver::Cgroupfs as i32 };
        Ok(Response::new(RuntimeConfigResponse { linux: Some(linux) }))
    }

    async fn run_pod_sandbox(
        &self,
        req: Request<RunPodSandboxRequest>,
    ) -> Result<Response<RunPodSandboxResponse>, Status> {
        let began = std::time::Instant::now();
        let result = self.runtime.run_pod(req.into_inner()).await;
        let figures = result.as_ref().ok().and_then(|id| self.runtime.figures(id));
        metrics::pod_started(began.elapsed(), result.is_ok(), figures.as_ref());
        Ok(Response::new(RunPodSandboxResponse { pod_sandbox_id: result? }))
    }

    async fn stop_pod_sandbox(
        &self,
        req: Request<StopPodSandboxRequest>,
    ) -> Result<Response<StopPodSandboxResponse>, Status> {
        self.runtime.stop_pod(&self.runtime.pod_id(&req.into_inner().pod_sandbox_id).await?).await?;
        Ok(Response::new(StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        req: Request<RemovePodSandboxRequest>,
    ) -> Result<Response<RemovePodSandboxResponse>, Status> {
        self.runtime.remove_pod(&self.runtime.pod_id(&req.into_inner().pod_sandbox_id).await?).await?;
        Ok(Response::new(RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        req: Request<PodSandboxStatusRequest>,
    ) -> Result<Response<PodSandboxStatusResponse>, Status> {
        let req = req.into_inner();
        let id = self.runtime.pod_id(&req.pod_sandbox_id).await?;
        Ok(Response::new(self.runtime.pod_status(&id, req.verbose).await?))
    }

    async fn list_pod_sandbox(
        &self,
        req: Request<ListPodSandboxRequest>,
    ) -> Result<Response<ListPodSandboxResponse>, Status> {
        Ok(Response::new(ListPodSandboxResponse { items: self.runtime.list_pods(req.into_inner().filter).await }))
    }

    async fn create_container(
        &self,
        req: Request<CreateContainerRequest>,
    ) -> Result<Response<CreateContainerResponse>, Status> {
        let mut req = req.into_inner();
        req.pod_sandbox_id = self.runtime.pod_id(&req.pod_sandbox_id).await?;
        let container_id = self.runtime.create_container(req).await?;
        Ok(Response::new(CreateContainerResponse { container_id }))
    }

    async fn start_container(
        &self,
        req: Request<StartContainerRequest>,
    ) -> Result<Response<StartContainerResponse>, Status> {
        self.runtime.start_container(&self.runtime.container_id(&req.into_inner().container_id).await?).await?;
        Ok(Response::new(StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        req: Request<StopContainerRequest>,
    ) -> Result<Response<StopContainerResponse>, Status> {
        let req = req.into_inner();
        self.runtime.stop_container(&self.runtime.container_id(&req.container_id).await?, req.timeout).await?;
        Ok(Response::new(StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        req: Request<RemoveContainerRequest>,
    ) -> Result<Response<RemoveContainerResponse>, Status> {
        self.runtime.remove_container(&self.runtime.container_id(&req.into_inner().container_id).await?).await?;
        Ok(Response::new(RemoveContainerResponse {}))
    }

    async fn list_containers(
        &self,
        req: Request<ListContainersRequest>,
    ) -> Result<Response<ListContainersResponse>, Status> {
        Ok(Response::new(ListContainersResponse {
            containers: self.runtime.list_containers(req.into_inner().filter).await,
        }))
    }

    async fn container_status(
        &self,
        req: Request<ContainerStatusRequest>,
    ) -> Result<Response<ContainerStatusResponse>, Status> {
        let req = req.into_inner();
        let id = self.runtime.container_id(&req.container_id).await?;
        Ok(Response::new(self.runtime.container_status(&id, req.verbose).await?))
    }

    async fn update_container_resources(
        &self,
        req: Request<UpdateContainerResourcesRequest>,
    ) -> Result<Response<UpdateContainerResourcesResponse>, Status> {
        let mut req = req.into_inner();
        req.container_id = self.runtime.container_id(&req.container_id).await?;
        self.runtime.update_resources(req).await?;
        Ok(Response::new(UpdateContainerResourcesResponse {}))
    }

    async fn reopen_container_log(
        &self,
        req: Request<ReopenContainerLogRequest>,
    ) -> Result<Response<ReopenContainerLogResponse>, Status> {
        self.runtime.reopen_log(&self.runtime.container_id(&req.into_inner().container_id).await?).await?;
        Ok(Response::new(ReopenContainerLogResponse {}))
    }

    async fn exec_sync(&self, req: Request<ExecSyncRequest>) -> Result<Response<ExecSyncResponse>, Status> {
        let mut req = req.into_inner();
        req.container_id = self.runtime.container_id(&req.container_id).await?;
        Ok(Response::new(self.runtime.exec_sync(req).await?))
    }

    async fn exec(&self, req: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        let mut req = req.into_inner();
        req.container_id = self.runtime.container_id(&req.container_id).await?;
        if req.cmd.is_empty() {
            return Err(Status::invalid_argument("Exec: cmd is empty"));
        }
        if !(req.stdin || req.stdout || req.stderr) {
            return Err(Status::invalid_argument("Exec: one of stdin, stdout and stderr must be set"));
        }
        if req.tty && req.stderr {
            return Err(Status::invalid_argument("Exec: tty and stderr cannot both be set"));
        }
        self.runtime.container_status(&req.container_id, false).await?;
        Ok(Response::new(ExecResponse { url: self.streams.exec_url(req)? }))
    }

    async fn attach(&self, req: Request<AttachRequest>) -> Result<Response<AttachResponse>, Status> {
        let mut req = req.into_inner();
        req.container_id = self.runtime.container_id(&req.container_id).await?;
        if !(req.stdin || req.stdout || req.stderr) {
            return Err(Status::invalid_argument("Attach: one of stdin, stdout and stderr must be set"));
        }
        self.runtime.container_status(&req.container_id, false).await?;
        Ok(Response::new(AttachResponse { url: self.streams.attach_url(req)? }))
    }

    async fn port_forward(&self, req: Request<PortForwardRequest>) -> Result<Response<PortForwardResponse>, Status> {
        let mut req = req.into_inner();
        req.pod_sandbox_id = self.runtime.pod_id(&req.pod_sandbox_id).await?;
        self.runtime.pod_vsock_socket(&req.pod_sandbox_id).await?;
        if let Some(p) = req.port.iter().find(|p| !(1..=65535).contains(*p)) {
            return Err(Status::invalid_argument(format!("PortForward: port {p} is out of range")));
        }
        Ok(Response::new(PortForwardResponse { url: self.streams.port_forward_url(req)? }))
    }

    async fn container_stats(
        &self,
        req: Request<ContainerStatsRequest>,
    ) -> Result<Response<ContainerStatsResponse>, Status> {
        let stats =
            self.runtime.container_stats(&self.runtime.container_id(&req.into_inner().container_id).await?).await?;
        Ok(Response::new(ContainerStatsResponse { stats: Some(stats) }))
    }

    async fn list_container_stats(
        &self,
        req: Request<ListContainerStatsRequest>,
    ) -> Result<Response<ListContainerStatsResponse>, Status> {
        Ok(Response::new(ListContainerStatsResponse {
            stats: self.runtime.list_container_stats(req.into_inner().filter).await,
        }))
    }

    async fn pod_sandbox_stats(
        &self,
        req: Request<PodSandboxStatsRequest>,
    ) -> Result<Response<PodSandboxStatsResponse>, Status> {
        let stats = self.runtime.pod_stats(&self.runtime.pod_id(&req.into_inner().pod_sandbox_id).await?).await?;
        Ok(Response::new(PodSandboxStatsResponse { stats: Some(stats) }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        req: Request<ListPodSandboxStatsRequest>,
    ) -> Result<Response<ListPodSandboxStatsResponse>, Status> {
        Ok(Response::new(ListPodSandboxStatsResponse {
            stats: self.runtime.list_pod_stats(req.into_inner().filter).await,
        }))
    }

    unsupported! {
        update_runtime_config(UpdateRuntimeConfigRequest) -> UpdateRuntimeConfigResponse:
            "runv cri takes pod addresses from the CNI configuration in cni_conf_dir; it renders no CNI template from the pod CIDR";
        checkpoint_container(CheckpointContainerRequest) -> CheckpointContainerResponse:
            "checkpointing is not supported (the container runs in a microVM)";
    }

    async fn list_metric_descriptors(
        &self,
        _req: Request<ListMetricDescriptorsRequest>,
    ) -> Result<Response<ListMetricDescriptorsResponse>, Status> {
        Ok(Response::new(ListMetricDescriptorsResponse { descriptors: metrics::Metrics::descriptors() }))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _req: Request<ListPodSandboxMetricsRequest>,
    ) -> Result<Response<ListPodSandboxMetricsResponse>, Status> {
        Ok(Response::new(ListPodSandboxMetricsResponse {
            pod_metrics: metrics::Metrics::pod_sandbox_metrics(&self.runtime).await,
        }))
    }

    type GetContainerEventsStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<ContainerEventResponse, Status>> + Send + 'static>>;

    async fn get_container_events(
        &self,
        _req: Request<GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        let rx = self.runtime.events();
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(e) => return Some((Ok(e), rx)),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Serves CRI on the Unix socket `listen` until SIGINT or SIGTERM (which
/// remove the socket; pods keep running and a restarted server takes them
/// back). `config_path` is handed to the shims.
pub async fn serve(
    listen: &Path,
    config: Config,
    config_path: Option<&Path>,
    metrics_address: Option<&str>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let images = Arc::new(
        ImageStore::open(&config.cri_image_root, &config.insecure_registries)?
            .with_limits(config.image_limits())
            .with_hosts(config.registry_hosts()),
    );
    if let Some(dir) = listen.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::helper::create_private_dir_all(&config.cri_state_root)
        .with_context(|| format!("creating {}", config.cri_state_root.display()))?;
    let events_socket = config.cri_state_root.join("events.sock");
    let (events_server, shim_events) = shim::serve_events(&events_socket).await?;
    let launcher = shim::ShimLauncher {
        binary: crate::helper::find_program(&config.cri_shim).unwrap_or_else(|| config.cri_shim.clone()),
        address: listen.display().to_string(),
        events_address: format!("unix://{}", events_socket.display()),
        config_path: config_path.map(Path::to_path_buf),
    };
    let runtime = runtime::Runtime::open(config.clone(), images.clone(), launcher).await?;
    runtime.follow_shim_events(shim_events.subscribe());
    let (streams, stream_listener) = stream::StreamServer::bind(&config.cri_stream_address).await?;
    streams.clone().serve(stream_listener, runtime.clone());
    let metrics_addr = match metrics_address {
        Some(address) => Some(metrics::serve(address, runtime.clone()).await?),
        None => None,
    };
    let cri = Arc::new(Cri { images, runtime, streams: streams.clone() });
    let _ = std::fs::remove_file(listen);
    let listener =
        tokio::net::UnixListener::bind(listen).with_context(|| format!("listening on {}", listen.display()))?;
    {
        // The CRI socket is root's (as containerd's), whatever the umask.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(listen, std::fs::Permissions::from_mode(0o660))
            .with_context(|| format!("setting the mode of {}", listen.display()))?;
    }
    let incoming = async_stream_of(listener);
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    eprintln!(
        "runv cri {} serving CRI {CRI_API_VERSION} on {} (streaming on {}{})",
        env!("CARGO_PKG_VERSION"),
        listen.display(),
        streams.addr(),
        metrics_addr.map(|a| format!(", metrics on http://{a}/metrics")).unwrap_or_default()
    );
    let result = tonic::transport::Server::builder()
        .add_service(RuntimeServiceServer::from_arc(cri.clone()))
        .add_service(ImageServiceServer::from_arc(cri))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = std::fs::remove_file(listen);
    let mut events_server = events_server;
    let _ = events_server.shutdown().await;
    let _ = std::fs::remove_file(&events_socket);
    result.context("serving CRI")
}

/// The listener's connections as the stream tonic takes, each through
/// [`authority::accept_any_authority`] so every gRPC client gets an answer.
fn async_stream_of(
    listener: tokio::net::UnixListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::io::DuplexStream>> {
    futures::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| authority::accept_any_authority(s));
        Some((next, l))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(reference: &str) -> ImageRecord {
        ImageRecord {
            reference: reference.into(),
            digest: format!("sha256:{}", "b".repeat(64)),
            config_digest: String::new(),
            config: serde_json::json!({ "config": { "User": "1000:1000" } }),
            layers: Vec::new(),
        }
    }

    #[test]
    fn every_tag_of_an_image_is_one_image_and_any_reference_finds_it() {
        let mut other = record("127.0.0.1:5000/runv/other:1");
        other.digest = format!("sha256:{}", "c".repeat(64));
        let all = vec![
            record("127.0.0.1:5000/runv/app:1"),
            record("127.0.0.1:5000/runv/app:2"),
            record("127.0.0.1:5000/runv/app:latest"),
            other,
        ];
        let images = by_image(&all);
        assert_eq!(images.len(), 2);
        let app = images.iter().find(|i| i.id == all[0].digest).unwrap();
        assert_eq!(
            app.repo_tags,
            ["127.0.0.1:5000/runv/app:1", "127.0.0.1:5000/runv/app:2", "127.0.0.1:5000/runv/app:latest"]
        );
        assert_eq!(app.repo_digests, [format!("127.0.0.1:5000/runv/app@sha256:{}", "b".repeat(64))]);
        let found = |wanted: &str| crate::image::resolve(&all, wanted).map(|r| r.digest.clone());
        let app_id = Some(all[0].digest.clone());
        for wanted in [
            "127.0.0.1:5000/runv/app:2".to_string(),
            "127.0.0.1:5000/runv/app".to_string(),
            format!("127.0.0.1:5000/runv/app@sha256:{}", "b".repeat(64)),
            format!("sha256:{}", "b".repeat(64)),
            "b".repeat(64),
            "bbbbbbbbbbbb".to_string(),
        ] {
            assert_eq!(found(&wanted), app_id, "{wanted}");
        }
        assert_eq!(found("127.0.0.1:5000/runv/app:3"), None);
        assert_eq!(found(&format!("127.0.0.1:5000/runv/nope@sha256:{}", "b".repeat(64))), None);
        assert_eq!(found("cccc").as_deref(), Some(&*format!("sha256:{}", "c".repeat(64))));
    }

    #[test]
    fn repo_tags_and_digests_come_from_the_reference() {
        let by_tag = to_cri(&[&record("127.0.0.1:5000/runv/app:1")]);
        assert_eq!(by_tag.repo_tags, ["127.0.0.1:5000/runv/app:1"]);
        assert_eq!(by_tag.repo_digests, [format!("127.0.0.1:5000/runv/app@sha256:{}", "b".repeat(64))]);
        assert_eq!(by_tag.uid, Some(Int64Value { value: 1000 }));
        let by_digest = to_cri(&[&record(&format!("docker.io/library/busybox@sha256:{}", "a".repeat(64)))]);
        assert!(by_digest.repo_tags.is_empty());
        assert_eq!(by_digest.repo_digests, [format!("docker.io/library/busybox@sha256:{}", "b".repeat(64))]);
    }
}
