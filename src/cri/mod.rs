//! `runv cri`: the bundled CRI v1 server (tonic, k8s-cri) on a Unix socket.
//!
//! Today it serves the ImageService in full, on the image store
//! (`crate::image`), and the RuntimeService's Version, Status and
//! RuntimeConfig. Pod and container calls answer UNIMPLEMENTED with a
//! message saying so (never a fake success): running pods through the shim
//! from here is the next step; until then pods run through containerd's CRI
//! plugin with the `runv` handler.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_cri::v1::image_service_server::{ImageService, ImageServiceServer};
use k8s_cri::v1::runtime_service_server::{RuntimeService, RuntimeServiceServer};
use k8s_cri::v1::*;
use oci_client::secrets::RegistryAuth;
use tonic::{Request, Response, Status};

use crate::image::{ImageError, ImageRecord, ImageStore};

/// The CRI API version served.
pub const CRI_API_VERSION: &str = "v1";

pub struct Cri {
    images: Arc<ImageStore>,
    image_root: PathBuf,
}

impl Cri {
    pub fn new(image_root: &Path, insecure_registries: &[String]) -> Result<Self, ImageError> {
        Ok(Self { images: Arc::new(ImageStore::open(image_root, insecure_registries)?), image_root: image_root.into() })
    }
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

fn to_cri(r: &ImageRecord) -> Image {
    // `registry/repository`, whether the image was pulled by tag or digest;
    // only a tag reference is a repo tag.
    let (repo, tagged) = match r.reference.parse::<oci_client::Reference>() {
        Ok(p) => (format!("{}/{}", p.registry(), p.repository()), p.digest().is_none()),
        Err(_) => (r.reference.clone(), false),
    };
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
        repo_tags: if tagged { vec![r.reference.clone()] } else { Vec::new() },
        repo_digests: vec![format!("{repo}@{}", r.digest)],
        size: r.size(),
        uid,
        username,
        spec: Some(ImageSpec { image: r.digest.clone(), ..Default::default() }),
        pinned: false,
    }
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
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(a.auth.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| Status::invalid_argument("auth: not base64 of user:password"))?;
        let (user, pass) =
            decoded.split_once(':').ok_or_else(|| Status::invalid_argument("auth: not base64 of user:password"))?;
        return Ok(RegistryAuth::Basic(user.into(), pass.into()));
    }
    Ok(RegistryAuth::Anonymous)
}

#[tonic::async_trait]
impl ImageService for Cri {
    async fn list_images(&self, req: Request<ListImagesRequest>) -> Result<Response<ListImagesResponse>, Status> {
        let filter = req.into_inner().filter.and_then(|f| f.image).map(|s| s.image).filter(|s| !s.is_empty());
        let images = self.images.list();
        let images = match filter {
            Some(f) => match self.images.get(&f) {
                Some(one) => vec![to_cri(&one)],
                None => Vec::new(),
            },
            None => images.iter().map(to_cri).collect(),
        };
        Ok(Response::new(ListImagesResponse { images }))
    }

    async fn image_status(&self, req: Request<ImageStatusRequest>) -> Result<Response<ImageStatusResponse>, Status> {
        let req = req.into_inner();
        let wanted = wanted_image(req.image, "ImageStatus")?;
        // A missing image is not an error: the answer has no image.
        let record = self.images.get(&wanted);
        let mut info = HashMap::new();
        if req.verbose {
            if let Some(r) = &record {
                info.insert("info".into(), serde_json::to_string(r).unwrap_or_default());
            }
        }
        Ok(Response::new(ImageStatusResponse { image: record.as_ref().map(to_cri), info }))
    }

    async fn pull_image(&self, req: Request<PullImageRequest>) -> Result<Response<PullImageResponse>, Status> {
        let req = req.into_inner();
        let wanted = wanted_image(req.image, "PullImage")?;
        let auth = auth_of(req.auth)?;
        let record = self.images.pull(&wanted, &auth).await.map_err(image_status)?;
        Ok(Response::new(PullImageResponse { image_ref: record.digest }))
    }

    async fn remove_image(&self, req: Request<RemoveImageRequest>) -> Result<Response<RemoveImageResponse>, Status> {
        let wanted = wanted_image(req.into_inner().image, "RemoveImage")?;
        match self.images.remove(&wanted) {
            // Removing what is not there succeeds, as the CRI asks.
            Ok(_) | Err(ImageError::NotFound(_)) => Ok(Response::new(RemoveImageResponse {})),
            Err(e) => Err(image_status(e)),
        }
    }

    async fn image_fs_info(&self, _req: Request<ImageFsInfoRequest>) -> Result<Response<ImageFsInfoResponse>, Status> {
        let (bytes, inodes) = usage(&self.image_root);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or_default();
        let fs = FilesystemUsage {
            timestamp: now,
            fs_id: Some(FilesystemIdentifier { mountpoint: self.image_root.display().to_string() }),
            used_bytes: Some(UInt64Value { value: bytes }),
            inodes_used: Some(UInt64Value { value: inodes }),
        };
        Ok(Response::new(ImageFsInfoResponse { image_filesystems: vec![fs], container_filesystems: Vec::new() }))
    }
}

/// Bytes and inodes used below `dir` (not following symlinks).
fn usage(dir: &Path) -> (u64, u64) {
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

const NO_PODS_YET: &str = "runv cri does not run pods yet (it serves images); run pods through containerd's CRI plugin with the runv runtime handler";

/// Trait methods answering UNIMPLEMENTED, written in the form
/// `#[tonic::async_trait]` gives async methods (it cannot see into a macro).
macro_rules! not_yet {
    ($($name:ident($req:ty) -> $resp:ty;)*) => {
        $(
            fn $name<'life0, 'async_trait>(
                &'life0 self,
                _req: Request<$req>,
            ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<$resp>, Status>> + Send + 'async_trait>>
            where
                'life0: 'async_trait,
                Self: 'async_trait,
            {
                Box::pin(async move { Err(Status::unimplemented(format!("{}: {NO_PODS_YET}", stringify!($name)))) })
            }
        )*
    };
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

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let conditions = vec![
            RuntimeCondition {
                r#type: "RuntimeReady".into(),
                status: false,
                reason: "PodsNotServed".into(),
                message: NO_PODS_YET.into(),
            },
            RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: false,
                reason: "PodsNotServed".into(),
                message: NO_PODS_YET.into(),
            },
        ];
        Ok(Response::new(StatusResponse {
            status: Some(RuntimeStatus { conditions }),
            info: HashMap::new(),
            ..Default::default()
        }))
    }

    async fn runtime_config(
        &self,
        _req: Request<RuntimeConfigRequest>,
    ) -> Result<Response<RuntimeConfigResponse>, Status> {
        // The cgroup driver runv's pods would use.
        let linux = LinuxRuntimeConfiguration { cgroup_driver: CgroupDriver::Cgroupfs as i32 };
        Ok(Response::new(RuntimeConfigResponse { linux: Some(linux) }))
    }

    not_yet! {
        run_pod_sandbox(RunPodSandboxRequest) -> RunPodSandboxResponse;
        stop_pod_sandbox(StopPodSandboxRequest) -> StopPodSandboxResponse;
        remove_pod_sandbox(RemovePodSandboxRequest) -> RemovePodSandboxResponse;
        pod_sandbox_status(PodSandboxStatusRequest) -> PodSandboxStatusResponse;
        list_pod_sandbox(ListPodSandboxRequest) -> ListPodSandboxResponse;
        create_container(CreateContainerRequest) -> CreateContainerResponse;
        start_container(StartContainerRequest) -> StartContainerResponse;
        stop_container(StopContainerRequest) -> StopContainerResponse;
        remove_container(RemoveContainerRequest) -> RemoveContainerResponse;
        list_containers(ListContainersRequest) -> ListContainersResponse;
        container_status(ContainerStatusRequest) -> ContainerStatusResponse;
        update_container_resources(UpdateContainerResourcesRequest) -> UpdateContainerResourcesResponse;
        reopen_container_log(ReopenContainerLogRequest) -> ReopenContainerLogResponse;
        exec_sync(ExecSyncRequest) -> ExecSyncResponse;
        exec(ExecRequest) -> ExecResponse;
        attach(AttachRequest) -> AttachResponse;
        port_forward(PortForwardRequest) -> PortForwardResponse;
        container_stats(ContainerStatsRequest) -> ContainerStatsResponse;
        list_container_stats(ListContainerStatsRequest) -> ListContainerStatsResponse;
        pod_sandbox_stats(PodSandboxStatsRequest) -> PodSandboxStatsResponse;
        list_pod_sandbox_stats(ListPodSandboxStatsRequest) -> ListPodSandboxStatsResponse;
        update_runtime_config(UpdateRuntimeConfigRequest) -> UpdateRuntimeConfigResponse;
        checkpoint_container(CheckpointContainerRequest) -> CheckpointContainerResponse;
        list_metric_descriptors(ListMetricDescriptorsRequest) -> ListMetricDescriptorsResponse;
        list_pod_sandbox_metrics(ListPodSandboxMetricsRequest) -> ListPodSandboxMetricsResponse;
    }

    type GetContainerEventsStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<ContainerEventResponse, Status>> + Send + 'static>>;

    async fn get_container_events(
        &self,
        _req: Request<GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        Err(Status::unimplemented(format!("get_container_events: {NO_PODS_YET}")))
    }
}

/// Serves CRI on the Unix socket `listen` until the process is stopped
/// (SIGINT/SIGTERM end it cleanly, removing the socket).
pub async fn serve(listen: &Path, image_root: &Path, insecure_registries: &[String]) -> anyhow::Result<()> {
    use anyhow::Context;
    let cri = Arc::new(Cri::new(image_root, insecure_registries)?);
    if let Some(dir) = listen.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(listen);
    let listener =
        tokio::net::UnixListener::bind(listen).with_context(|| format!("listening on {}", listen.display()))?;
    let incoming = async_stream_of(listener);
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    eprintln!("runv cri {} serving CRI {CRI_API_VERSION} on {}", env!("CARGO_PKG_VERSION"), listen.display());
    let result = tonic::transport::Server::builder()
        .add_service(RuntimeServiceServer::from_arc(cri.clone()))
        .add_service(ImageServiceServer::from_arc(cri))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = std::fs::remove_file(listen);
    result.context("serving CRI")
}

/// The listener's connections as the stream tonic takes.
fn async_stream_of(
    listener: tokio::net::UnixListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::UnixStream>> {
    futures::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| s);
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
    fn repo_tags_and_digests_come_from_the_reference() {
        let by_tag = to_cri(&record("127.0.0.1:5000/runv/app:1"));
        assert_eq!(by_tag.repo_tags, ["127.0.0.1:5000/runv/app:1"]);
        assert_eq!(by_tag.repo_digests, [format!("127.0.0.1:5000/runv/app@sha256:{}", "b".repeat(64))]);
        assert_eq!(by_tag.uid, Some(Int64Value { value: 1000 }));
        let by_digest = to_cri(&record(&format!("docker.io/library/busybox@sha256:{}", "a".repeat(64))));
        assert!(by_digest.repo_tags.is_empty());
        assert_eq!(by_digest.repo_digests, [format!("docker.io/library/busybox@sha256:{}", "b".repeat(64))]);
    }
}
