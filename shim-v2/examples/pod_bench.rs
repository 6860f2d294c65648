//! Benchmark: CRI RunPodSandbox until the first container runs, through
//! containerd's CRI plugin, for the `runv` and `runc` handlers alternately
//! in one run. Prints each run, the medians and, last, `ratio: X`
//! (runv / runc). Run by tests/bench/pod.sh.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::{container_config, cri_client, median, pod_config, ready, time_pod_to_running, Containerd};
use k8s_cri::v1::*;

async fn pod_to_running(
    cri: &mut k8s_cri::v1::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    handler: &str,
    n: usize,
    log_dir: &std::path::Path,
) -> Duration {
    // Host-network pods keep the node's hostname (runc refuses one).
    let config = PodSandboxConfig { hostname: String::new(), ..pod_config(&format!("bench-{handler}-{n}"), log_dir) };
    time_pod_to_running(cri, handler, config, container_config("app", &["sleep", "1000"])).await
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    if !ready("pod_bench") {
        std::process::exit(1);
    }
    let ctd = Containerd::start("");
    let mut cri = cri_client(&ctd.socket()).await;
    let log_dir = ctd.dir.path().join("pod-logs");
    std::fs::create_dir_all(&log_dir).unwrap();
    // Warm up both paths (image unpack, page cache).
    for handler in ["runv", "runc"] {
        pod_to_running(&mut cri, handler, 0, &log_dir).await;
    }
    let (mut runv, mut runc) = (Vec::new(), Vec::new());
    for n in 1..=runs {
        let a = pod_to_running(&mut cri, "runv", n, &log_dir).await;
        let b = pod_to_running(&mut cri, "runc", n, &log_dir).await;
        eprintln!("run {n}: runv {} ms, runc {} ms", a.as_millis(), b.as_millis());
        runv.push(a);
        runc.push(b);
    }
    let (a, b) = (median(runv), median(runc));
    println!("RunPodSandbox -> container running, runv (median of {runs}): {} ms", a.as_millis());
    println!("RunPodSandbox -> container running, runc (median of {runs}): {} ms", b.as_millis());
    println!("ratio: {:.2}", a.as_secs_f64() / b.as_secs_f64());
}
