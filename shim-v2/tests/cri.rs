//! A pod through containerd's CRI plugin with the `runv` runtime handler,
//! driven by a kubelet-like CRI client (k8s-cri over tonic).
//!
//! Run alone with `cargo test --release -p containerd-shim-runv-v2 --test cri`.

mod common;

use std::time::{Duration, Instant};

use common::scrape::{sample, samples};
use common::{container_config, cri_client, pod_config, ready, Containerd};
use k8s_cri::v1::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_with_two_containers_runs_in_one_vm_through_containerd_cri() {
    if !ready("a_pod_with_two_containers_runs_in_one_vm_through_containerd_cri") {
        return;
    }
    let ctd = Containerd::start("");
    let mut cri = cri_client(&ctd.socket()).await;
    let log_dir = ctd.dir.path().join("pod-logs");
    std::fs::create_dir_all(&log_dir).unwrap();
    let config = pod_config("pod1", &log_dir);

    let started = Instant::now();
    let pod = cri
        .run_pod_sandbox(RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: "runv".into() })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", ctd.log()))
        .into_inner()
        .pod_sandbox_id;
    eprintln!("RunPodSandbox took {:?}", started.elapsed());

    let mut ids = Vec::new();
    for (name, args) in [
        ("web", vec!["sh", "-c", "echo web-started; hostname; exec sleep 1000"]),
        ("side", vec!["sh", "-c", "echo side-started; exec sleep 1000"]),
    ] {
        let id = cri
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config(name, &args)),
                sandbox_config: Some(config.clone()),
            })
            .await
            .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}\n{}", ctd.log()))
            .into_inner()
            .container_id;
        cri.start_container(StartContainerRequest { container_id: id.clone() })
            .await
            .unwrap_or_else(|e| panic!("StartContainer {name}: {e}"));
        ids.push(id);
    }

    // Both containers run in one VM behind one shim.
    let run_dir = ctd.dir.path().join("run").to_string_lossy().into_owned();
    let vms = common::hypervisor::vm_processes(&run_dir);
    assert_eq!(vms.len(), 1, "VMs for the pod: {vms:#?}");

    for id in &ids {
        let status = cri
            .container_status(ContainerStatusRequest { container_id: id.clone(), verbose: false })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        assert_eq!(status.state, ContainerState::ContainerRunning as i32, "{id}: {status:?}");
    }

    let exec = cri
        .exec_sync(ExecSyncRequest {
            container_id: ids[0].clone(),
            cmd: vec!["sh".into(), "-c".into(), "echo exec-out; uname -r; exit 4".into()],
            timeout: 30,
        })
        .await
        .unwrap_or_else(|e| panic!("ExecSync: {e}"))
        .into_inner();
    let out = String::from_utf8_lossy(&exec.stdout).into_owned();
    assert_eq!(exec.exit_code, 4, "stdout {out:?} stderr {:?}", String::from_utf8_lossy(&exec.stderr));
    assert!(out.starts_with("exec-out\n6.1."), "exec stdout: {out:?}");

    // The node's metrics endpoint for containerd's runv shims: this pod's
    // sandbox, its VM boot on the backend it ran on, the shim's agent
    // calls; the text format as promtool wants it. The shim rewrites its
    // figures every 2 s: wait for the exec's.
    let monitor = ctd.monitor();
    let sandbox = format!("sandbox=\"{pod}\"");
    let ours = [sandbox.as_str(), "pod=\"pod1\"", "namespace=\"default\""];
    let exec_call = [&ours[..], &["call=\"exec_process\""]].concat();
    let deadline = Instant::now() + Duration::from_secs(20);
    let scrape = loop {
        let scrape = monitor.scrape();
        if samples(&scrape, "runv_agent_call_duration_seconds_count", &exec_call).0 >= 1.0 {
            break scrape;
        }
        assert!(Instant::now() < deadline, "the shim's exec never reached runv monitor: {scrape}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    common::scrape::promtool_check(&scrape);
    assert_eq!(sample(&scrape, "runv_monitor_sandboxes{containerd_namespace=\"k8s.io\"}"), Some(1.0), "{scrape}");
    let backend = format!("backend=\"{}", common::hypervisor::backend_prefix());
    assert_eq!(samples(&scrape, "runv_vm_boot_duration_seconds_count", &[&backend]), (1.0, 1), "{scrape}");
    let (boot, n) = samples(&scrape, "runv_sandbox_vm_boot_seconds", &[&ours[..], &[backend.as_str()]].concat());
    assert!(n == 1 && boot > 0.0, "{scrape}");
    let (created, _) = samples(
        &scrape,
        "runv_agent_call_duration_seconds_count",
        &[&ours[..], &["call=\"create_container\""]].concat(),
    );
    assert!(created >= 3.0, "pause, web and side: {scrape}");
    let (vm_rss, n) = samples(&scrape, "runv_sandbox_host_resident_memory_bytes", &[sandbox.as_str()]);
    assert!(n >= 2 && vm_rss > 0.0, "{scrape}");
    eprintln!("runv monitor: VM boot {boot:.2} s ({backend}\"), host RSS {:.1} MiB", vm_rss / 1048576.0);

    // A host-network pod gets no network device: the VM has only loopback.
    let links = cri
        .exec_sync(ExecSyncRequest {
            container_id: ids[0].clone(),
            cmd: vec!["ls".into(), "/sys/class/net".into()],
            timeout: 30,
        })
        .await
        .unwrap()
        .into_inner();
    // (sit0 is the kernel's own IPv6-in-IPv4 placeholder, never configured.)
    let links = String::from_utf8_lossy(&links.stdout).into_owned();
    let nics: Vec<_> = links.split_whitespace().filter(|l| !matches!(*l, "lo" | "sit0")).collect();
    assert!(nics.is_empty(), "network devices in a host-network pod: {links}");

    // The container's output reaches its CRI log file.
    let log = log_dir.join("web.log");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut text = String::new();
    while Instant::now() < deadline {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("web-started") && text.contains("pod1-host") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(text.contains(" stdout F web-started"), "log: {text:?}");
    assert!(text.contains("pod1-host"), "the pod hostname is missing: {text:?}");

    for id in &ids {
        cri.stop_container(StopContainerRequest { container_id: id.clone(), timeout: 2 })
            .await
            .unwrap_or_else(|e| panic!("StopContainer: {e}"));
        cri.remove_container(RemoveContainerRequest { container_id: id.clone() })
            .await
            .unwrap_or_else(|e| panic!("RemoveContainer: {e}"));
    }
    cri.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod.clone() })
        .await
        .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", ctd.log()));
    cri.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod.clone() })
        .await
        .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}"));
    let listed = cri.list_pod_sandbox(ListPodSandboxRequest { filter: None }).await.unwrap().into_inner().items;
    assert!(listed.is_empty(), "pods left: {listed:?}");
    // Once the pod is gone, the monitor serves no sandbox.
    let after = monitor.scrape();
    assert!(!after.contains(&sandbox), "{after}");
    drop(monitor);
    ctd.assert_clean();
}

/// A hostPID or hostIPC pod cannot be served by a VM: containerd's CRI
/// plugin passes the shim's refusal on, naming the field, and nothing of
/// the attempt is left (no VM was booted for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_asking_for_the_nodes_pid_or_ipc_namespace_is_refused_by_name() {
    if !ready("a_pod_asking_for_the_nodes_pid_or_ipc_namespace_is_refused_by_name") {
        return;
    }
    let ctd = Containerd::start("");
    let mut cri = cri_client(&ctd.socket()).await;
    let log_dir = ctd.dir.path().join("pod-logs");
    std::fs::create_dir_all(&log_dir).unwrap();
    for (field, ns) in [
        ("hostPID", NamespaceOption { pid: NamespaceMode::Node as i32, ..Default::default() }),
        ("hostIPC", NamespaceOption { ipc: NamespaceMode::Node as i32, ..Default::default() }),
    ] {
        let mut config = pod_config(&field.to_lowercase(), &log_dir);
        let security = config.linux.as_mut().unwrap().security_context.as_mut().unwrap();
        security.namespace_options.as_mut().unwrap().pid = ns.pid;
        security.namespace_options.as_mut().unwrap().ipc = ns.ipc;
        let e = cri
            .run_pod_sandbox(RunPodSandboxRequest { config: Some(config), runtime_handler: "runv".into() })
            .await
            .expect_err(field);
        assert!(e.message().contains(&format!("({field}: true)")), "{field}: {e}");
    }
    let run_dir = ctd.dir.path().join("run").to_string_lossy().into_owned();
    assert!(common::hypervisor::vm_processes(&run_dir).is_empty(), "a VM was booted for a refused pod");
    ctd.assert_clean();
}
