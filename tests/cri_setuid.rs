//! setuid through `runv cri`, end to end, as runc does it: a setuid-root
//! binary of the image, run by uid 1000, gets euid 0 when the container's
//! `no_new_privs` is false and keeps euid 1000 when it is true. The guest's
//! view of the rootfs honours setuid; the host's side of the share stays
//! nosuid (see `tests/security.sh`). Needs root, the installed guest,
//! docker-registry and a C compiler (the binary is built here); skips with
//! a printed reason otherwise.

mod common;

use std::path::Path;

use common::registry::{dir_layer, push_with_cmd, registry_or_skip, GZIP};
use common::registry_and_server;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;

/// A static program printing its real and effective uid.
const SOURCE: &str = r#"#include <stdio.h>
#include <unistd.h>
int main(void) { printf("%d %d\n", (int)getuid(), (int)geteuid()); return 0; }
"#;

/// A gzip layer holding `/euid` (mode 04755, owned by root) built from
/// SOURCE; None (the reason printed) when no compiler can build it.
fn setuid_layer(dir: &Path, test: &str) -> Option<(&'static str, Vec<u8>, Vec<u8>)> {
    let Some(cc) = ["cc", "gcc"].iter().find_map(|c| runv::helper::find_program(Path::new(c))) else {
        eprintln!("SKIP {test}: needs a C compiler (cc) to build the setuid probe");
        return None;
    };
    std::fs::write(dir.join("euid.c"), SOURCE).unwrap();
    let out = std::process::Command::new(cc)
        .args(["-static", "-O2", "-o"])
        .arg(dir.join("euid"))
        .arg(dir.join("euid.c"))
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!("SKIP {test}: cc -static failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let binary = std::fs::read(dir.join("euid")).unwrap();
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_uid(0);
    h.set_gid(0);
    h.set_mode(0o4755);
    h.set_size(binary.len() as u64);
    tar.append_data(&mut h, "euid", &binary[..]).unwrap();
    let tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    Some((GZIP, gz.finish().unwrap(), tar))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setuid_binary_escalates_only_without_no_new_privs() {
    let test = "a_setuid_binary_escalates_only_without_no_new_privs";
    if !common::e2e_ready(test) || !registry_or_skip(test) {
        return;
    }
    let build = tempfile::tempdir().unwrap();
    let Some(layer) = setuid_layer(build.path(), test) else { return };
    let (reg, cri, _) = registry_and_server().await;
    let rootfs = dir_layer(&Path::new(common::SHARE_DIR).join("rootfs"));
    let app = push_with_cmd(&reg, "runv/setuid:1", &[rootfs, layer], &["sleep", "1000"]).await;
    let channel = cri.channel().await;
    let mut images = ImageServiceClient::new(channel.clone());
    let mut rt = RuntimeServiceClient::new(channel);
    let image = Some(ImageSpec { image: app.clone(), ..Default::default() });
    images.pull_image(PullImageRequest { image: image.clone(), ..Default::default() }).await.unwrap();
    let pod_config = common::cri::pod_config("suid", "default", &cri.dir.path().join("pod-logs"));
    let pod = common::cri::run_pod(&mut rt, &cri, &pod_config).await;

    for (name, no_new_privs, want) in [("escalates", false, "1000 0\n"), ("confined", true, "1000 1000\n")] {
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata { name: name.into(), attempt: 0 }),
            image: image.clone(),
            log_path: format!("{name}.log"),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    run_as_user: Some(Int64Value { value: 1000 }),
                    no_new_privs,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = common::cri::start_container(&mut rt, &cri, &pod, &pod_config, config).await;
        let r = rt
            .exec_sync(ExecSyncRequest { container_id: id.clone(), cmd: vec!["/euid".into()], timeout: 60 })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.exit_code, 0, "{name}: {}", String::from_utf8_lossy(&r.stderr));
        assert_eq!(String::from_utf8_lossy(&r.stdout), want, "{name}: no_new_privs {no_new_privs}");
    }
    rt.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod.clone() }).await.unwrap();
    rt.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod }).await.unwrap();
    let left = cri.settled_leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}");
}
