//! CRI requests into OCI specs: any CreateContainer / RunPodSandbox
//! message a client can send, decoded as `runv cri` decodes it, validated
//! and translated. It must not panic; what it refuses it refuses with an
//! error. Input: a protobuf CreateContainerRequest.
#![no_main]

use std::path::{Path, PathBuf};

use k8s_cri::v1::CreateContainerRequest;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use runv::cri::spec::{container_spec, sandbox_spec, validate_container, validate_pod, ContainerContext};
use runv::image::ImageRecord;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = CreateContainerRequest::decode(data) else { return };
    let Ok(pod) = validate_pod(req.sandbox_config.as_ref()) else { return };
    let dir = tempfile::tempdir().unwrap();
    // An image with a config a registry could serve: user, env, cmd.
    let image = ImageRecord {
        reference: "registry.test/fuzz:1".into(),
        digest: format!("sha256:{}", "0".repeat(64)),
        config_digest: format!("sha256:{}", "1".repeat(64)),
        config: serde_json::json!({"config": {"User": "1000:1000", "Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/w"}}),
        layers: Vec::new(),
    };
    let _ = sandbox_spec("0123456789abcdef", pod, &image, Some(Path::new("/run/netns/fuzz")));
    let Ok(config) = validate_container(req.config.as_ref()) else { return };
    let lowers: Vec<PathBuf> = Vec::new();
    let cx = ContainerContext {
        id: "fedcba9876543210",
        pod_id: "0123456789abcdef",
        pod_config: pod,
        pod_dir: dir.path(),
        netns: Some(Path::new("/run/netns/fuzz")),
        image: &image,
        image_lowers: &lowers,
    };
    let _ = container_spec(&cx, config);
});
