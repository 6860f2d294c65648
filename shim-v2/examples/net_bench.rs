//! Benchmark: TCP throughput and round-trip latency from the host to a pod,
//! for a runv pod and a runc pod on the same CNI bridge, in one run (runs
//! alternate). Prints the medians and, last, `ratio: X` (runv throughput /
//! runc throughput). Run by tests/bench/net.sh.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use common::{container_config, cri_client, median, networked_pod_config, ready, Containerd};
use k8s_cri::v1::*;

const SUBNET: u8 = 245;
/// In the pod: an echo server on 5001 and a sink on 5002.
const SERVERS: &str = "nc -ll -p 5001 -e cat & while true; do nc -l -p 5002 > /dev/null; done";

async fn pod(
    cri: &mut k8s_cri::v1::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    ctd: &Containerd,
    handler: &str,
) -> String {
    let log_dir = ctd.dir.path().join("logs").join(handler);
    std::fs::create_dir_all(&log_dir).unwrap();
    let config = networked_pod_config(&format!("net-{handler}"), &log_dir, DnsConfig::default());
    let pod = cri
        .run_pod_sandbox(RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: handler.into() })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox {handler}: {e}\n{}", ctd.log()))
        .into_inner()
        .pod_sandbox_id;
    let id = cri
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config("servers", &["sh", "-c", SERVERS])),
            sandbox_config: Some(config),
        })
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    cri.start_container(StartContainerRequest { container_id: id }).await.expect("StartContainer");
    let status = cri
        .pod_sandbox_status(PodSandboxStatusRequest { pod_sandbox_id: pod, verbose: false })
        .await
        .expect("PodSandboxStatus")
        .into_inner();
    let ip = status.status.and_then(|s| s.network).map(|n| n.ip).expect("a pod IP");
    // Wait for the echo server.
    let deadline = Instant::now() + Duration::from_secs(30);
    while rtt(&ip, 1).is_none() {
        assert!(Instant::now() < deadline, "the {handler} pod's servers did not come up");
        std::thread::sleep(Duration::from_millis(200));
    }
    ip
}

/// Median round trip of one byte over `n` exchanges.
fn rtt(ip: &str, n: usize) -> Option<Duration> {
    let mut s = TcpStream::connect_timeout(&format!("{ip}:5001").parse().unwrap(), Duration::from_secs(2)).ok()?;
    s.set_nodelay(true).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut times = Vec::with_capacity(n);
    let mut b = [0u8; 1];
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(b"x").ok()?;
        s.read_exact(&mut b).ok()?;
        times.push(t.elapsed());
    }
    Some(median(times))
}

/// MiB/s sending `mib` MiB until the pod has read it all and closed.
fn throughput(ip: &str, mib: usize) -> f64 {
    let chunk = vec![0x5au8; 64 * 1024];
    let t = Instant::now();
    let mut s = TcpStream::connect(format!("{ip}:5002")).expect("connecting to the sink");
    for _ in 0..mib * 16 {
        s.write_all(&chunk).expect("sending");
    }
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    mib as f64 / t.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(16);
    if !ready("net_bench") || !std::path::Path::new(common::CNI_BIN_DIR).join("bridge").exists() {
        eprintln!("net_bench needs scripts/install.sh (CNI plugins in {})", common::CNI_BIN_DIR);
        std::process::exit(1);
    }
    let ctd = Containerd::start_with_network("", SUBNET);
    let mut cri = cri_client(&ctd.socket()).await;
    let runv_ip = pod(&mut cri, &ctd, "runv").await;
    let runc_ip = pod(&mut cri, &ctd, "runc").await;
    let (mut tv, mut tc, mut rv, mut rc) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for n in 1..=runs {
        let a = throughput(&runv_ip, mib);
        let b = throughput(&runc_ip, mib);
        let ra = rtt(&runv_ip, 200).expect("runv echo");
        let rb = rtt(&runc_ip, 200).expect("runc echo");
        eprintln!("run {n}: runv {a:.1} MiB/s rtt {} us, runc {b:.1} MiB/s rtt {} us", ra.as_micros(), rb.as_micros());
        tv.push(a);
        tc.push(b);
        rv.push(ra);
        rc.push(rb);
    }
    let (tv, tc, rv, rc) = (median(tv), median(tc), median(rv), median(rc));
    println!("TCP throughput host -> runv pod ({mib} MiB, median of {runs}): {tv:.1} MiB/s");
    println!("TCP throughput host -> runc pod ({mib} MiB, median of {runs}): {tc:.1} MiB/s");
    println!("TCP round trip host -> runv pod (1 byte, median): {} us", rv.as_micros());
    println!("TCP round trip host -> runc pod (1 byte, median): {} us", rc.as_micros());
    println!("ratio: {:.3}", tv / tc);
    // Stopping the pods tears their network down (CNI DEL) before
    // containerd goes.
    for p in cri.list_pod_sandbox(ListPodSandboxRequest { filter: None }).await.unwrap().into_inner().items {
        let _ = cri.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: p.id.clone() }).await;
        let _ = cri.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: p.id }).await;
    }
}
