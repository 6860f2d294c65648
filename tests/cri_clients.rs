//! `runv cri` through CRI clients we did not write. Python grpcio, with its
//! default `unix://` channel, pulls an image, runs a pod with a container,
//! execs in it and removes everything (tests/clients/cri_grpcio.py); it
//! also calls Version with each `:authority` real clients send (the socket
//! path as grpc-go 1.26-era crictl and kubelet send it, grpcio's
//! percent-encoded path, `localhost`), and names a pod and a container by
//! the 13-character prefix crictl prints; an image pushed under three tags
//! is listed once with all three, found by every reference form and
//! removed with all of them by its id. Needs root, the installed guest,
//! docker-registry and Python's grpcio and grpcio-tools (scripts/test.sh
//! installs them); skips with a printed reason otherwise.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::registry::{dir_layer, push_with_cmd, registry_or_skip};
use common::registry_and_server;

/// Whether python3 has grpcio and grpcio-tools; prints why the test skips
/// otherwise.
fn grpcio_or_skip(test: &str) -> bool {
    let ok = Command::new("python3").args(["-c", "import grpc, grpc_tools"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP {test}: needs Python's grpcio and grpcio-tools (python3 -m pip install grpcio grpcio-tools)");
    }
    ok
}

/// The CRI v1 proto this build's k8s-cri was generated from (in cargo's
/// registry: only this platform's packages, all already downloaded).
fn cri_proto() -> PathBuf {
    let platform = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline", "--filter-platform", &platform, "--manifest-path"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .output()
        .expect("cargo metadata");
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let k8s_cri = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "k8s-cri")
        .expect("k8s-cri among the packages");
    let manifest = PathBuf::from(k8s_cri["manifest_path"].as_str().unwrap());
    let proto = manifest.parent().unwrap().join("proto/v1.proto");
    assert!(proto.is_file(), "{} is missing", proto.display());
    proto
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_with_its_default_channel_runs_a_pod() {
    let test = "grpcio_with_its_default_channel_runs_a_pod";
    if !common::e2e_ready(test) || !registry_or_skip(test) || !grpcio_or_skip(test) {
        return;
    }
    let (reg, cri, app) = registry_and_server().await;
    // The same image under two more tags (the same manifest, so one image).
    let rootfs = dir_layer(&std::path::Path::new(common::SHARE_DIR).join("rootfs"));
    let mut tags = Vec::new();
    for tag in ["2", "latest"] {
        tags.push(push_with_cmd(&reg, &format!("runv/busybox:{tag}"), std::slice::from_ref(&rootfs), &["sh"]).await);
    }
    let logs = cri.dir.path().join("pod-logs");
    let out = Command::new("timeout")
        .arg("600")
        .arg("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/cri_grpcio.py"))
        .arg(cri.socket())
        .arg(cri_proto())
        .arg(&app)
        .arg(&logs)
        .args(&tags)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the grpcio client failed ({}):\n{stdout}\n{}\nserver log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        cri.log()
    );
    let r: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    eprintln!("grpcio saw: {r:#}");
    for authority in ["default", "socket path", "localhost"] {
        assert_eq!(
            r["version"][authority],
            serde_json::json!(["runv", "v1"]),
            "Version with the {authority} authority"
        );
    }
    assert!(r["pulled"].as_str().unwrap().starts_with("sha256:"), "{r}");
    let mut all_tags = vec![app.clone()];
    all_tags.extend(tags.iter().cloned());
    all_tags.sort();
    assert_eq!(r["image_tags"], serde_json::json!(all_tags), "ImageStatus gives every tag of the image");
    assert_eq!(r["listed_with_tag"], serde_json::json!([all_tags]), "ListImages lists the image once, with every tag");
    for form in ["tag", "repo@digest", "id", "id prefix", "untagged repo of :latest"] {
        assert_eq!(r["status_by"][form], true, "ImageStatus by {form}: {}", r["status_by"]);
    }
    assert_eq!(r["tags_after_remove"], serde_json::json!([]), "RemoveImage by id left tags");
    assert_eq!(r["pod_state"], "SANDBOX_READY");
    assert_eq!(r["exec"]["stdout"], "grpcio-host\n");
    assert_eq!(r["exec"]["stderr"], "to-stderr\n");
    assert_eq!(r["exec"]["exit_code"], 3);
    assert_eq!(r["by_prefix"], serde_json::json!({"container": true, "pod": true}), "ids by their 13-character prefix");
    let missing = &r["errors"]["missing container"];
    assert_eq!(missing[0], "NOT_FOUND");
    assert!(missing[1].as_str().unwrap().contains("no-such-container"), "{missing}");
    let bad = &r["errors"]["pod without metadata"];
    assert_eq!(bad[0], "INVALID_ARGUMENT", "{bad}");
    assert!(bad[1].as_str().unwrap().contains("metadata"), "{bad}");
    assert_eq!(r["pods_after"], 0);
    let left = cri.settled_leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}");
    assert!(!cri.log().contains("CRI connection closed"), "a grpcio connection was refused:\n{}", cri.log());
}
