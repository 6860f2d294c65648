//! `runv cri --metrics-address` read by parts runv did not write: Debian's
//! Prometheus scrapes it while a pod runs (its HTTP API must return the
//! series), `promtool check metrics` passes on what it serves, and the
//! CRI's ListMetricDescriptors/ListPodSandboxMetrics answer from the same
//! figures. Needs root, the installed guest, docker-registry and
//! prometheus (scripts/test.sh installs them); skips with a printed reason.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::registry::registry_or_skip;
use common::scrape::{http_get, metrics_address, promtool_check, sample, samples};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_runv_cri_and_the_cri_metrics_calls_answer() {
    let test = "prometheus_scrapes_runv_cri_and_the_cri_metrics_calls_answer";
    if !common::e2e_ready(test) || !registry_or_skip(test) {
        return;
    }
    for tool in ["prometheus", "promtool"] {
        if runv::helper::find_program(Path::new(tool)).is_none() {
            println!("SKIP {test}: needs {tool} (Debian's prometheus package; scripts/test.sh installs it)");
            return;
        }
    }
    let (_reg, cri, app) = common::registry_and_server_with_args(&["--metrics-address", "127.0.0.1:0"]).await;
    let addr = metrics_address(&cri.log()).unwrap_or_else(|| panic!("no metrics address printed: {}", cri.log()));
    let channel = cri.channel().await;
    common::cri::pull(&channel, &app).await;
    let mut rt = RuntimeServiceClient::new(channel);
    let pod_config = common::cri::pod_config("metered", "ops", &cri.dir.path().join("logs"));
    let pod = common::cri::run_pod(&mut rt, &cri, &pod_config).await;
    let container = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata { name: "app".into(), attempt: 0 }),
                image: Some(ImageSpec { image: app.clone(), ..Default::default() }),
                command: vec!["sh".into(), "-c".into(), "exec sleep 1000".into()],
                log_path: "app.log".into(),
                ..Default::default()
            }),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .container_id;
    rt.start_container(StartContainerRequest { container_id: container.clone() }).await.unwrap();
    let exec = rt
        .exec_sync(ExecSyncRequest { container_id: container.clone(), cmd: vec!["true".into()], timeout: 30 })
        .await
        .unwrap();
    assert_eq!(exec.into_inner().exit_code, 0);

    // What runv cri serves, as the text format, checked by promtool. The
    // shim rewrites its sandbox's figures every 2 s: wait for the exec's.
    let sandbox = format!("sandbox=\"{pod}\"");
    let ours = [sandbox.as_str(), "pod=\"metered\"", "namespace=\"ops\""];
    let exec_call = [&ours[..], &["call=\"exec_process\""]].concat();
    let deadline = Instant::now() + Duration::from_secs(20);
    let scrape = loop {
        let scrape = http_get(&addr, "/metrics");
        if samples(&scrape, "runv_agent_call_duration_seconds_count", &exec_call).0 >= 1.0 {
            break scrape;
        }
        assert!(Instant::now() < deadline, "the shim's agent calls never reached the scrape: {scrape}");
        std::thread::sleep(Duration::from_millis(500));
    };
    promtool_check(&scrape);
    assert_eq!(sample(&scrape, "runv_sandboxes{state=\"ready\"}"), Some(1.0), "{scrape}");
    assert_eq!(sample(&scrape, "runv_containers{state=\"running\"}"), Some(1.0), "{scrape}");
    // Pod start and VM boot by the backend the VM ran on, as its shim saw it.
    let backend = scrape
        .lines()
        .find_map(|l| l.strip_prefix("runv_vm_boot_duration_seconds_count{backend=\"")?.split_once('"'))
        .map(|(b, rest)| (b.to_string(), rest.trim_start_matches('}').trim().to_string()))
        .unwrap_or_else(|| panic!("no VM boot histogram: {scrape}"));
    assert!(["qemu/tcg", "qemu/kvm", "runv-vmm/kvm"].contains(&backend.0.as_str()) && backend.1 == "1", "{backend:?}");
    let started = format!("runv_pod_start_duration_seconds_count{{backend=\"{}\",result=\"ok\"}}", backend.0);
    assert_eq!(sample(&scrape, &started), Some(1.0), "{scrape}");
    let boot = samples(
        &scrape,
        "runv_sandbox_vm_boot_seconds",
        &[&ours[..], &[&format!("backend=\"{}\"", backend.0)]].concat(),
    );
    assert!(boot.1 == 1 && boot.0 > 0.0, "{scrape}");
    // The shim's own agent calls: the pause and app containers created, no
    // call timed out.
    let created = [&ours[..], &["call=\"create_container\""]].concat();
    assert!(samples(&scrape, "runv_agent_call_duration_seconds_count", &created).0 >= 2.0, "{scrape}");
    assert_eq!(samples(&scrape, "runv_agent_call_errors_total", &[&ours[..], &["kind=\"timeout\""]].concat()).0, 0.0);
    assert!(
        sample(&scrape, "runv_task_call_duration_seconds_count{call=\"create\"}").is_some_and(|v| v >= 2.0),
        "{scrape}"
    );
    assert!(
        sample(&scrape, "runv_task_call_duration_seconds_count{call=\"exec\"}").is_some_and(|v| v >= 1.0),
        "{scrape}"
    );
    assert!(
        sample(&scrape, "runv_image_pulls_total{result=\"ok\"}").is_some_and(|v| v >= 2.0),
        "app and pause: {scrape}"
    );
    assert!(sample(&scrape, "runv_image_pull_bytes_total").is_some_and(|v| v > 0.0), "{scrape}");
    let (guest_mem, n) = samples(&scrape, "runv_sandbox_guest_memory_working_set_bytes", &ours);
    assert!(n == 1 && guest_mem > 0.0, "{scrape}");
    let (host_rss, n) = samples(&scrape, "runv_sandbox_host_resident_memory_bytes", &ours);
    assert!(
        n >= 2 && host_rss > 16.0 * 1024.0 * 1024.0,
        "the sandbox's host processes hold {host_rss} bytes: {scrape}"
    );

    // Prometheus itself scrapes it, and its query API returns the series.
    let prom_dir = tempfile::tempdir().unwrap();
    let prom_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::fs::write(
        prom_dir.path().join("prometheus.yml"),
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: runv\n    static_configs:\n      - targets: ['{addr}']\n"),
    )
    .unwrap();
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", prom_dir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", prom_dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(prom_dir.path().join("prometheus.log")).unwrap())
        .spawn()
        .unwrap();
    let prom = format!("127.0.0.1:{prom_port}");
    let deadline = Instant::now() + Duration::from_secs(90);
    let answer = loop {
        let reply = std::net::TcpStream::connect(&prom)
            .ok()
            .map(|_| http_get(&prom, "/api/v1/query?query=runv_sandboxes%7Bstate%3D%22ready%22%7D"));
        if let Some(r) = reply.filter(|r| r.contains("\"value\":[")) {
            break r;
        }
        if Instant::now() > deadline {
            let _ = prometheus.kill();
            panic!(
                "Prometheus never returned the series: {}",
                std::fs::read_to_string(prom_dir.path().join("prometheus.log")).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    assert!(answer.contains("\"job\":\"runv\"") && answer.contains(",\"1\"]"), "{answer}");

    // The CRI's metrics calls, from the same figures.
    let descriptors =
        rt.list_metric_descriptors(ListMetricDescriptorsRequest {}).await.unwrap().into_inner().descriptors;
    assert!(descriptors.iter().any(|d| d.name == "runv_sandbox_host_resident_memory_bytes"), "{descriptors:?}");
    let pods = rt.list_pod_sandbox_metrics(ListPodSandboxMetricsRequest {}).await.unwrap().into_inner().pod_metrics;
    let ours = pods.iter().find(|p| p.pod_sandbox_id == pod).unwrap_or_else(|| panic!("{pods:?}"));
    let host = ours.metrics.iter().find(|m| m.name == "runv_sandbox_host_resident_memory_bytes").unwrap();
    assert!(host.value.as_ref().unwrap().value > 16 << 20, "{host:?}");
    assert_eq!(host.label_values, [pod.clone(), "metered".to_string(), "ops".to_string()]);

    rt.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod.clone() }).await.unwrap();
    rt.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod.clone() }).await.unwrap();
    let after = http_get(&addr, "/metrics");
    assert_eq!(sample(&after, "runv_sandboxes{state=\"ready\"}"), Some(0.0), "{after}");
    assert!(!after.contains(&sandbox), "a removed sandbox's series remain: {after}");
    let left = cri.settled_leftovers();
    assert!(left.is_empty(), "left behind: {left:?}");
}
