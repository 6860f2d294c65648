//! Benchmark: concurrent pod starts, run by tests/bench/concurrent.sh.
//!
//! PODS pods (default 20) start at once through each way: containerd's CRI
//! plugin with the `runc` handler (the baseline), the same containerd with
//! the `runv` handler, and `runv cri`. All run on a CNI bridge network.
//! Each pod runs a container and an ExecSync in it. Then all are removed,
//! again at once.
//!
//! For each way it prints starts/s (pods / wall time until the last pod
//! ran its exec), the p50 and p99 of one pod's RunPodSandbox-to-running
//! time, failures, hangs (no answer within 5 minutes) and leaks (the
//! census of tests/common/rig.rs against the one taken before).
//! Last it prints `ratio: X`, the runv handler's p50 over runc's.

// Test helpers shared with the test suites; the benchmark uses a part.
#![allow(clippy::duplicate_mod)]
#[path = "../shim-v2/tests/common/mod.rs"]
mod containerd;
#[allow(dead_code)]
#[path = "../tests/common/cri.rs"]
mod cri;
#[allow(dead_code)]
#[path = "../tests/common/registry.rs"]
mod registry;
#[path = "../tests/common/rig.rs"]
mod rig;

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_cri::v1::*;
use rig::{create_and_start, Rig};

/// How long one pod may take to run its exec, or to be removed.
const HANG: Duration = Duration::from_secs(300);

struct Figures {
    way: String,
    starts_per_s: f64,
    p50: Duration,
    p99: Duration,
    failures: usize,
    hangs: usize,
    leaked: usize,
}

/// The value below which `q` of the sorted samples fall.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

async fn burst(rig: &mut Rig, way: &str, pods: usize) -> Figures {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..pods {
        let mut rt = rig.rt.clone();
        let config = rig.pod_config(&format!("{}-{n}", rig.handler));
        let handler = rig.handler;
        let app = rig.app_request("", &config);
        tasks.push(tokio::spawn(async move {
            let one = async {
                let t0 = Instant::now();
                let pod = rt
                    .run_pod_sandbox(RunPodSandboxRequest { config: Some(config), runtime_handler: handler.into() })
                    .await
                    .map_err(|e| format!("RunPodSandbox: {}", e.message()))?
                    .into_inner()
                    .pod_sandbox_id;
                let id = create_and_start(rt.clone(), CreateContainerRequest { pod_sandbox_id: pod.clone(), ..app })
                    .await
                    .map_err(|e| format!("{e} (pod {pod})"))?;
                let to_running = t0.elapsed();
                let r = rt
                    .exec_sync(ExecSyncRequest { container_id: id, cmd: vec!["echo".into(), "ok".into()], timeout: 60 })
                    .await
                    .map_err(|e| format!("ExecSync: {}", e.message()))?
                    .into_inner();
                if r.stdout != b"ok\n" || r.exit_code != 0 {
                    return Err(format!(
                        "ExecSync answered exit {} {:?}",
                        r.exit_code,
                        String::from_utf8_lossy(&r.stdout)
                    ));
                }
                Ok(to_running)
            };
            match tokio::time::timeout(HANG, one).await {
                Ok(r) => r.map_err(Some),
                Err(_) => Err(None),
            }
        }));
    }
    let (mut times, mut failures, mut hangs) = (Vec::new(), 0, 0);
    for t in tasks {
        match t.await.expect("a pod task panicked") {
            Ok(d) => times.push(d),
            Err(Some(e)) => {
                failures += 1;
                println!("  {way}: FAILED: {e}");
            }
            Err(None) => {
                hangs += 1;
                println!("  {way}: HANG: a pod did not run its exec within {} s", HANG.as_secs());
            }
        }
    }
    let wall = started.elapsed();
    // Every pod goes, at once.
    let ids: Vec<String> = rig
        .rt
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
        .map(|r| r.into_inner().items.into_iter().map(|p| p.id).collect())
        .unwrap_or_default();
    let mut removals = Vec::new();
    for id in ids {
        let mut rt = rig.rt.clone();
        removals.push(tokio::spawn(async move { tokio::time::timeout(HANG, rig::remove_pod(&mut rt, &id)).await }));
    }
    for r in removals {
        match r.await.expect("a removal panicked") {
            Ok(failed) if failed.is_empty() => {}
            Ok(failed) => {
                failures += 1;
                println!("  {way}: FAILED removing a pod: {}", failed.join("; "));
            }
            Err(_) => {
                hangs += 1;
                println!("  {way}: HANG: a pod was not removed within {} s", HANG.as_secs());
            }
        }
    }
    let leaked = rig.leaked();
    for l in &leaked {
        println!("  {way}: LEAKED {l}");
    }
    if !leaked.is_empty() {
        rig.baseline = rig.census();
    }
    times.sort();
    Figures {
        way: way.into(),
        starts_per_s: times.len() as f64 / wall.as_secs_f64(),
        p50: quantile(&times, 0.5),
        p99: quantile(&times, 0.99),
        failures,
        hangs,
        leaked: leaked.len(),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let pods: usize = std::env::args().nth(1).map(|a| a.parse().expect("concurrent [PODS]")).unwrap_or(20);
    if !containerd::ready("concurrent") || !registry::registry_or_skip("concurrent") {
        std::process::exit(1);
    }
    if !Path::new(containerd::CNI_BIN_DIR).join("bridge").exists() {
        eprintln!(
            "SKIP concurrent: needs the CNI plugins in {} (containernetworking-plugins)",
            containerd::CNI_BIN_DIR
        );
        std::process::exit(1);
    }
    let reg = registry::Registry::start();
    let (app, pause) = rig::push_images(&reg).await;

    let mut ctd = Rig::containerd(95).await;
    let mut ours = Rig::runv_cri(&reg, &app, &pause, 96).await;
    // Each census sees the whole host: the baselines after both rigs.
    ctd.baseline = ctd.census();
    ours.baseline = ours.census();
    let mut figures = Vec::new();
    ctd.handler = "runc";
    figures.push(burst(&mut ctd, "containerd + runc", pods).await);
    ctd.handler = "runv";
    figures.push(burst(&mut ctd, "containerd + runv", pods).await);
    figures.push(burst(&mut ours, "runv cri", pods).await);
    println!("{pods} pods at once, each RunPodSandbox + a container + an ExecSync, then all removed at once:");
    for f in &figures {
        println!(
            "{}: {:.2} starts/s, p50 {} ms, p99 {} ms, failures {}, hangs {}, leaked {}",
            f.way,
            f.starts_per_s,
            f.p50.as_millis(),
            f.p99.as_millis(),
            f.failures,
            f.hangs,
            f.leaked
        );
    }
    let bad: usize = figures.iter().map(|f| f.failures + f.hangs + f.leaked).sum();
    println!("ratio: {:.2}", figures[1].p50.as_secs_f64() / figures[0].p50.as_secs_f64().max(1e-9));
    drop((ctd, ours));
    for bridge in ["runvbr95", "runvbr96"] {
        let _ = std::process::Command::new("ip").args(["link", "del", bridge]).output();
    }
    if bad > 0 {
        std::process::exit(1);
    }
}
