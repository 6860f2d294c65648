//! Benchmark: CRI RunPodSandbox until the first container runs, through
//! `runv cri` and through containerd's CRI plugin with the `runv` handler
//! (the same shim, the same guest), alternately in one run. Prints each
//! run, the medians and, last, `ratio: X` (runv cri / containerd). Run by
//! tests/bench/cri.sh.
//!
//! `cri_bench RUNS vmm` compares backends instead: two `runv cri` servers,
//! one on the built-in VMM and one on QEMU with KVM, alternately; `ratio`
//! is then built-in / QEMU (tests/bench/l1.sh runs it inside the L1 rig).

// Test helpers shared with the test suites; the benchmark uses a part.
// Both harnesses bring the same small hypervisor helper module.
#![allow(clippy::duplicate_mod)]
#[path = "../shim-v2/tests/common/mod.rs"]
mod containerd;
#[allow(dead_code)]
#[path = "../tests/common/cri.rs"]
mod cri;
#[allow(dead_code)]
#[path = "../tests/common/registry.rs"]
mod registry;

use std::path::Path;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;

/// The backends `cri_bench RUNS vmm` compares, in the order it samples them.
const BACKENDS: [&str; 2] = ["built-in VMM", "QEMU/KVM"];
/// Failed pod starts per backend that `vmm` mode retries before it gives up.
const MAX_FAILED_STARTS: usize = 3;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    if !containerd::ready("cri_bench") || !registry::registry_or_skip("cri_bench") {
        std::process::exit(1);
    }
    // runv cri pulls from a loopback registry; containerd imports the same
    // rootfs as its images.
    let reg = registry::Registry::start();
    let rootfs = registry::dir_layer(&Path::new(containerd::SHARE_DIR).join("rootfs"));
    let app = registry::push_with_cmd(&reg, "runv/busybox:1", std::slice::from_ref(&rootfs), &["sh"]).await;
    let pause = registry::push_with_cmd(&reg, "runv/pause:1", &[rootfs], &["sleep", "2147483647"]).await;
    let sandbox_image = format!("cri_sandbox_image = \"{pause}\"");
    let start_server = |extra: &str| {
        let server = cri::CriServer::start(&reg.addr, &format!("{sandbox_image}\n{extra}"));
        let app = app.clone();
        async move {
            let channel = server.channel().await;
            ImageServiceClient::new(channel.clone())
                .pull_image(PullImageRequest {
                    image: Some(ImageSpec { image: app, ..Default::default() }),
                    ..Default::default()
                })
                .await
                .expect("pulling into runv cri");
            (server, RuntimeServiceClient::new(channel))
        }
    };
    let ours_container = || ContainerConfig {
        image: Some(ImageSpec { image: app.clone(), ..Default::default() }),
        ..containerd::container_config("app", &["sleep", "1000"])
    };
    if std::env::args().nth(2).as_deref() == Some("vmm") {
        let (_builtin_server, mut builtin) = start_server("hypervisor = \"builtin\"").await;
        let (_qemu_server, mut qemu) = start_server("hypervisor = \"qemu\"\naccel = \"kvm\"").await;
        let log_dir = tempfile::tempdir().unwrap();
        let pod = |name: String| containerd::pod_config(&name, log_dir.path());
        // Under nested virtualization (the L1 rig) a guest now and then dies
        // or stalls on either backend: a failed start is printed and
        // counted, and the sample is taken again, up to MAX_FAILED_STARTS
        // per backend.
        let mut failed = [0usize; 2];
        let mut sample = async |cri: &mut RuntimeServiceClient<_>, backend: usize, name: String| {
            let mut attempt = 0;
            loop {
                let config = pod(format!("{name}-{attempt}"));
                match containerd::try_time_pod_to_running(cri, "runv", config, ours_container()).await {
                    Ok(t) => return t,
                    Err(e) => {
                        failed[backend] += 1;
                        eprintln!("FAILED START: {} pod {name}: {e}", BACKENDS[backend]);
                        if failed[backend] > MAX_FAILED_STARTS {
                            eprintln!("{}: more than {MAX_FAILED_STARTS} failed pod starts", BACKENDS[backend]);
                            std::process::exit(1);
                        }
                        attempt += 1;
                    }
                }
            }
        };
        sample(&mut builtin, 0, "warm-a".into()).await;
        sample(&mut qemu, 1, "warm-b".into()).await;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for n in 1..=runs {
            let x = sample(&mut builtin, 0, format!("a-{n}")).await;
            let y = sample(&mut qemu, 1, format!("b-{n}")).await;
            eprintln!("run {n}: built-in VMM {} ms, QEMU/KVM {} ms", x.as_millis(), y.as_millis());
            a.push(x);
            b.push(y);
        }
        println!("failed pod starts (retried), built-in VMM: {}", failed[0]);
        println!("failed pod starts (retried), QEMU/KVM: {}", failed[1]);
        let (x, y) = (containerd::median(a), containerd::median(b));
        println!("runv cri RunPodSandbox -> container running, built-in VMM (median of {runs}): {} ms", x.as_millis());
        println!("runv cri RunPodSandbox -> container running, QEMU/KVM (median of {runs}): {} ms", y.as_millis());
        println!("ratio: {:.2}", x.as_secs_f64() / y.as_secs_f64());
        return;
    }
    let (_server, mut ours) = start_server("").await;
    let ctd = containerd::Containerd::start("");
    let mut theirs = containerd::cri_client(&ctd.socket()).await;
    let log_dir = ctd.dir.path().join("pod-logs");
    std::fs::create_dir_all(&log_dir).unwrap();

    let pod = |name: String| containerd::pod_config(&name, &log_dir);
    let theirs_container = || containerd::container_config("app", &["sleep", "1000"]);
    // Warm up both paths (image unpack, page cache).
    containerd::time_pod_to_running(&mut ours, "runv", pod("warm-a".into()), ours_container()).await;
    containerd::time_pod_to_running(&mut theirs, "runv", pod("warm-b".into()), theirs_container()).await;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for n in 1..=runs {
        let x = containerd::time_pod_to_running(&mut ours, "runv", pod(format!("a-{n}")), ours_container()).await;
        let y = containerd::time_pod_to_running(&mut theirs, "runv", pod(format!("b-{n}")), theirs_container()).await;
        eprintln!("run {n}: runv cri {} ms, containerd + runv shim {} ms", x.as_millis(), y.as_millis());
        a.push(x);
        b.push(y);
    }
    let (x, y) = (containerd::median(a), containerd::median(b));
    println!("RunPodSandbox -> container running, runv cri (median of {runs}): {} ms", x.as_millis());
    println!(
        "RunPodSandbox -> container running, containerd CRI, runv handler (median of {runs}): {} ms",
        y.as_millis()
    );
    println!("ratio: {:.2}", x.as_secs_f64() / y.as_secs_f64());
}
