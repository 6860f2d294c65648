//! `runv cri` through a kubelet-like CRI client on its Unix socket: the
//! image service against a loopback registry (images pushed at test time),
//! the runtime service's version and status, UNIMPLEMENTED (with a reason)
//! for the pod calls it does not serve yet, bad requests, and 50 clients at
//! once. Needs root and docker-registry; skips with a printed reason.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::registry::{base_layer, push, registry_or_skip, top_layer, Registry};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint, Uri};

struct CriServer {
    child: Child,
    dir: tempfile::TempDir,
}

impl CriServer {
    fn start(insecure: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "runtime_dir = \"{0}/run\"\ncri_image_root = \"{0}/images\"\ninsecure_registries = [\"{insecure}\"]\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let socket = dir.path().join("cri.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_runv"))
            .arg("--config")
            .arg(&config)
            .arg("cri")
            .arg("--listen")
            .arg(&socket)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "runv cri did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        CriServer { child, dir }
    }

    fn socket(&self) -> std::path::PathBuf {
        self.dir.path().join("cri.sock")
    }

    async fn channel(&self) -> Channel {
        let socket = self.socket();
        Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
            }))
            .await
            .unwrap()
    }
}

impl Drop for CriServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec { image: image.into(), ..Default::default() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_service_pulls_lists_inspects_and_removes() {
    let test = "the_image_service_pulls_lists_inspects_and_removes";
    if !registry_or_skip(test) {
        return;
    }
    let reg = Registry::start();
    let name = push(&reg, "runv/app:1", &[base_layer(), top_layer()]).await;
    let cri = CriServer::start(&reg.addr);
    let mut images = ImageServiceClient::new(cri.channel().await);

    let pulled = images
        .pull_image(PullImageRequest { image: spec(&name), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .image_ref;
    assert!(pulled.starts_with("sha256:"), "{pulled}");

    let listed = images.list_images(ListImagesRequest { filter: None }).await.unwrap().into_inner().images;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, pulled);
    assert_eq!(listed[0].repo_tags, std::slice::from_ref(&name));
    assert!(listed[0].repo_digests[0].ends_with(&pulled), "{:?}", listed[0].repo_digests);
    assert!(listed[0].size > 0);

    let status =
        images.image_status(ImageStatusRequest { image: spec(&name), verbose: true }).await.unwrap().into_inner();
    assert_eq!(status.image.unwrap().id, pulled);
    assert!(status.info["info"].contains("layers"), "{:?}", status.info);
    // By id too.
    let by_id = images.image_status(ImageStatusRequest { image: spec(&pulled), verbose: false }).await.unwrap();
    assert_eq!(by_id.into_inner().image.unwrap().repo_tags, std::slice::from_ref(&name));

    let fs = images.image_fs_info(ImageFsInfoRequest {}).await.unwrap().into_inner();
    assert!(fs.image_filesystems[0].used_bytes.as_ref().unwrap().value > 0);

    images.remove_image(RemoveImageRequest { image: spec(&name) }).await.unwrap();
    assert!(images.list_images(ListImagesRequest { filter: None }).await.unwrap().into_inner().images.is_empty());
    // Removing again, or asking about what is gone, is not an error.
    images.remove_image(RemoveImageRequest { image: spec(&name) }).await.unwrap();
    let gone = images.image_status(ImageStatusRequest { image: spec(&name), verbose: false }).await.unwrap();
    assert!(gone.into_inner().image.is_none());
    let left: Vec<_> = std::fs::read_dir(cri.dir.path().join("images/layers")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_right_status_and_the_server_keeps_serving_many_clients() {
    let test = "bad_requests_get_the_right_status_and_the_server_keeps_serving_many_clients";
    if !registry_or_skip(test) {
        return;
    }
    let reg = Registry::start();
    let cri = CriServer::start(&reg.addr);
    let channel = cri.channel().await;
    let mut images = ImageServiceClient::new(channel.clone());
    let mut runtime = RuntimeServiceClient::new(channel);

    let code = |r: Result<tonic::Response<PullImageResponse>, tonic::Status>| r.unwrap_err();
    let e = code(images.pull_image(PullImageRequest::default()).await);
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("image is empty"), "{e}");
    let e = code(images.pull_image(PullImageRequest { image: spec("Not A Reference!"), ..Default::default() }).await);
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let e = code(
        images
            .pull_image(PullImageRequest { image: spec(&format!("{}/runv/none:1", reg.addr)), ..Default::default() })
            .await,
    );
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert!(e.message().contains("runv/none:1"), "{e}");
    let bad_auth = AuthConfig { auth: "%%%".into(), ..Default::default() };
    let e = code(
        images
            .pull_image(PullImageRequest { image: spec("busybox"), auth: Some(bad_auth), ..Default::default() })
            .await,
    );
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");

    let version = runtime.version(VersionRequest { version: "v1".into() }).await.unwrap().into_inner();
    assert_eq!((version.runtime_name.as_str(), version.runtime_api_version.as_str()), ("runv", "v1"));
    let status = runtime.status(StatusRequest { verbose: false }).await.unwrap().into_inner().status.unwrap();
    assert!(status.conditions.iter().any(|c| c.r#type == "RuntimeReady" && !c.status && !c.message.is_empty()));
    let e = runtime.run_pod_sandbox(RunPodSandboxRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);
    assert!(e.message().contains("does not run pods yet"), "{e}");

    // 50 clients at once, each on its own connection.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let channel = cri.channel().await;
        tasks.push(tokio::spawn(async move {
            let mut rt = RuntimeServiceClient::new(channel.clone());
            let mut im = ImageServiceClient::new(channel);
            rt.version(VersionRequest::default()).await.map(|_| ())?;
            im.list_images(ListImagesRequest::default()).await.map(|_| ())?;
            if i % 5 == 0 {
                // Bad input in the crowd changes nothing for the others.
                let _ = im.pull_image(PullImageRequest::default()).await;
            }
            Ok::<_, tonic::Status>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    runtime.version(VersionRequest::default()).await.unwrap();
    assert!(Path::new(&cri.socket()).exists());
}
