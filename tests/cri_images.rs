//! `runv cri` through a kubelet-like CRI client on its Unix socket: the
//! image service against a loopback registry (images pushed at test time),
//! the runtime service's version and status, bad requests to both services
//! (no VM needed), and 50 clients at once. Needs root and docker-registry; skips with a printed reason.

mod common;

use std::path::Path;

use common::cri::CriServer;
use common::registry::{base_layer, push, registry_or_skip, top_layer, Registry};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;

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
    let cri = CriServer::start(&reg.addr, "");
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
    let cri = CriServer::start(&reg.addr, &format!("cri_sandbox_image = \"{}/runv/no-pause:1\"", reg.addr));
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
    assert!(status.conditions.iter().any(|c| c.r#type == "RuntimeReady" && c.status));
    // No CNI configuration: the network condition says so.
    assert!(status.conditions.iter().any(|c| c.r#type == "NetworkReady" && !c.status && c.message.contains("net.d")));

    // Pod and container calls: missing fields, unknown ids, unknown handler.
    let invalid = tonic::Code::InvalidArgument;
    let not_found = tonic::Code::NotFound;
    let meta = |name: &str, ns: &str, uid: &str| PodSandboxMetadata {
        name: name.into(),
        namespace: ns.into(),
        uid: uid.into(),
        attempt: 0,
    };
    let pod = |m: PodSandboxMetadata| Some(PodSandboxConfig { metadata: Some(m), ..Default::default() });
    let e = runtime.run_pod_sandbox(RunPodSandboxRequest::default()).await.unwrap_err();
    assert_eq!((e.code(), e.message().contains("config is missing")), (invalid, true), "{e}");
    let e = runtime
        .run_pod_sandbox(RunPodSandboxRequest { config: pod(meta("p", "", "u")), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!((e.code(), e.message().contains("metadata.namespace is empty")), (invalid, true), "{e}");
    let e = runtime
        .run_pod_sandbox(RunPodSandboxRequest { config: pod(meta("p", "ns", "u")), runtime_handler: "kata".into() })
        .await
        .unwrap_err();
    assert_eq!((e.code(), e.message().contains("\"kata\"")), (invalid, true), "{e}");
    // The sandbox image cannot be pulled: a clear error, nothing left.
    let e = runtime
        .run_pod_sandbox(RunPodSandboxRequest { config: pod(meta("p", "ns", "u")), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert!(e.message().contains("sandbox image"), "{e}");
    assert!(cri.leftovers().is_empty(), "{:?}", cri.leftovers());
    assert!(runtime.list_pod_sandbox(ListPodSandboxRequest::default()).await.unwrap().into_inner().items.is_empty());

    let e = runtime.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: "".into() }).await.unwrap_err();
    assert_eq!(e.code(), invalid, "{e}");
    let e = runtime.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: "nope".into() }).await.unwrap_err();
    assert_eq!((e.code(), e.message().contains("nope")), (not_found, true), "{e}");
    // Removing what is not there succeeds, as the CRI asks.
    runtime.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: "nope".into() }).await.unwrap();
    runtime.remove_container(RemoveContainerRequest { container_id: "nope".into() }).await.unwrap();
    let e = runtime
        .pod_sandbox_status(PodSandboxStatusRequest { pod_sandbox_id: "nope".into(), verbose: false })
        .await
        .unwrap_err();
    assert_eq!(e.code(), not_found, "{e}");
    let container = ContainerConfig {
        metadata: Some(ContainerMetadata { name: "c".into(), attempt: 0 }),
        image: spec("busybox"),
        ..Default::default()
    };
    let e = runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: "nope".into(),
            config: Some(container.clone()),
            sandbox_config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), not_found, "{e}");
    let e = runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: "nope".into(),
            config: Some(ContainerConfig { image: None, ..container }),
            sandbox_config: None,
        })
        .await
        .unwrap_err();
    assert_eq!((e.code(), e.message().contains("config.image is empty")), (invalid, true), "{e}");
    let e = runtime.start_container(StartContainerRequest { container_id: "".into() }).await.unwrap_err();
    assert_eq!(e.code(), invalid, "{e}");
    let e = runtime
        .container_status(ContainerStatusRequest { container_id: "nope".into(), verbose: false })
        .await
        .unwrap_err();
    assert_eq!(e.code(), not_found, "{e}");
    let e = runtime
        .exec_sync(ExecSyncRequest { container_id: "nope".into(), cmd: vec!["true".into()], timeout: 1 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), not_found, "{e}");
    let e = runtime.exec(ExecRequest { container_id: "nope".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), invalid, "{e}");
    let e =
        runtime.port_forward(PortForwardRequest { pod_sandbox_id: "nope".into(), port: vec![80] }).await.unwrap_err();
    assert_eq!((e.code(), e.message().contains("nope")), (not_found, true), "{e}");
    let e = runtime.checkpoint_container(CheckpointContainerRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e}");
    assert!(!e.message().is_empty());

    // 50 clients at once, each on its own connection.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let channel = cri.channel().await;
        tasks.push(tokio::spawn(async move {
            let mut rt = RuntimeServiceClient::new(channel.clone());
            let mut im = ImageServiceClient::new(channel);
            rt.version(VersionRequest::default()).await.map(|_| ())?;
            im.list_images(ListImagesRequest::default()).await.map(|_| ())?;
            rt.list_pod_sandbox(ListPodSandboxRequest::default()).await.map(|_| ())?;
            rt.list_containers(ListContainersRequest::default()).await.map(|_| ())?;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_k8s_io_is_pulled_from_the_mirror_its_hosts_toml_names() {
    let test = "registry_k8s_io_is_pulled_from_the_mirror_its_hosts_toml_names";
    if !registry_or_skip(test) {
        return;
    }
    let reg = Registry::start();
    push(&reg, "pause:3.10", &[base_layer()]).await;
    let hosts = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(hosts.path().join("registry.k8s.io")).unwrap();
    std::fs::write(
        hosts.path().join("registry.k8s.io/hosts.toml"),
        format!(
            "server = \"https://registry.k8s.io\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            reg.addr
        ),
    )
    .unwrap();
    // Not in insecure_registries: the plain-HTTP mirror is the hosts.toml's word.
    let cri = CriServer::start("none", &format!("registry_config_path = \"{}\"", hosts.path().display()));
    let mut images = ImageServiceClient::new(cri.channel().await);
    let pulled = images
        .pull_image(PullImageRequest { image: spec("registry.k8s.io/pause:3.10"), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .image_ref;
    let listed = images.list_images(ListImagesRequest { filter: None }).await.unwrap().into_inner().images;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, pulled);
    assert_eq!(listed[0].repo_tags, ["registry.k8s.io/pause:3.10"]);
}
