//! Benchmark: the fault matrix, run by tests/bench/faults.sh.
//!
//! Pods go through both ways into runv: containerd's CRI plugin with the
//! `runv` handler, and `runv cri`. Both run on a CNI bridge network.
//!
//! For each way, each part of a pod and each phase of its life, a pod is
//! taken to the phase and the part is killed with SIGKILL. The parts are
//! the VM, virtiofsd, vhost-device-vsock, the shim, the guest and the CRI
//! server (containerd or `runv cri`), and the VM while the server is down
//! (the server restarted after). The guest is ended from root inside it
//! (the agent is its PID 1: the agent's death is the guest's). The phases
//! are booting, creating, running, exec and stopping.
//!
//! After each kill:
//! - the request in flight must return (no hang);
//! - the server must answer;
//! - the pod must say what happened: NotReady, with exited containers and
//!   a reason; after a killed server, Ready again once it restarts;
//! - removing the pod must succeed;
//! - a census of the host must match the one taken before. The census
//!   reads processes, mounts, links, network namespaces, cgroups, files
//!   under the servers' runtime and state directories, CNI address leases,
//!   shim sockets and loop devices. It never reads runv's own records.
//!
//! Prints one line per case and `cycles: N, leaked: M, failed: F` last.
//! `faults ROUNDS` runs the whole matrix ROUNDS times. `faults short` runs
//! one case per part and way (the CI form). `RUNV_FAULTS_ONLY="Vmm Exec"`
//! (a part and a phase) runs that case alone.

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

use containerd::sandbox_processes as processes;
use k8s_cri::v1::*;
use rig::{create_and_start, Rig};
use tokio::task::JoinHandle;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Part {
    Vmm,
    Virtiofsd,
    Vsock,
    Shim,
    Guest,
    Server,
    /// The server killed, then the VM, then the server restarted: what
    /// died while the server was down must be reported, not forgotten.
    VmWhileServerDown,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Booting,
    Creating,
    Running,
    Exec,
    Stopping,
}

const PARTS: [Part; 7] =
    [Part::Vmm, Part::Virtiofsd, Part::Vsock, Part::Shim, Part::Guest, Part::Server, Part::VmWhileServerDown];
const PHASES: [Phase; 5] = [Phase::Booting, Phase::Creating, Phase::Running, Phase::Exec, Phase::Stopping];

/// How long a request in flight may take to return after the kill.
const REQUEST_DEADLINE: Duration = Duration::from_secs(90);

/// The program of a pod's process, as the first word of its command line.
fn program(part: Part) -> &'static str {
    match part {
        Part::Vmm => containerd::hypervisor::vm_program(),
        Part::Virtiofsd => "virtiofsd",
        Part::Vsock => "vhost-device-vsock",
        Part::Shim => "containerd-shim-runv-v2",
        Part::Guest | Part::Server | Part::VmWhileServerDown => unreachable!("not found by program"),
    }
}

/// The processes of `part` of this benchmark's pods. A shim is its
/// daemon: the `start` action that spawns it lives a moment and is not the
/// shim a kill is meant for.
fn targets(needle: &str, part: Part) -> Vec<(i32, String)> {
    let mut found = processes(needle, program(part));
    if part == Part::Shim {
        found.retain(|(pid, _)| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmdline.split(|b| *b == 0).rfind(|a| !a.is_empty()).is_none_or(|a| a != b"start")
        });
    }
    found
}

/// One case's outcome.
struct Outcome {
    line: String,
    leaked: Vec<String>,
    failed: Vec<String>,
}

fn spawn<F>(f: F) -> JoinHandle<Result<String, String>>
where
    F: std::future::Future<Output = Result<String, String>> + Send + 'static,
{
    tokio::spawn(f)
}

/// Polls `find` every 10 ms for up to 60 s.
async fn wait_for<T>(mut find: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(t) = find() {
            return Some(t);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

async fn case(rig: &mut Rig, part: Part, phase: Phase, n: usize) -> Outcome {
    let began = Instant::now();
    let name = format!("f{n}");
    let needle = rig.dir.to_string_lossy().into_owned();
    let mut notes: Vec<String> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    let mut pod: Option<String> = None;
    let mut in_flight: Option<(&str, JoinHandle<Result<String, String>>)> = None;

    // To the phase.
    if phase == Phase::Booting {
        let (mut rt, config) = (rig.rt.clone(), rig.pod_config(&name));
        in_flight = Some((
            "RunPodSandbox",
            spawn(async move {
                rt.run_pod_sandbox(RunPodSandboxRequest { config: Some(config), runtime_handler: "runv".into() })
                    .await
                    .map(|r| r.into_inner().pod_sandbox_id)
                    .map_err(|e| e.message().to_string())
            }),
        ));
        // The part's own process once it exists; the VM for the rest (the
        // shim is there before the boot begins: it is killed once the VM
        // is on its way up).
        let trigger = match part {
            Part::Vmm | Part::Virtiofsd | Part::Vsock => part,
            _ => Part::Vmm,
        };
        if wait_for(|| targets(&needle, trigger).first().cloned()).await.is_none() {
            failed.push(format!("no {} process appeared while the pod booted", program(trigger)));
        }
    } else {
        match rig.run_pod(&name).await {
            Ok((id, config)) => {
                pod = Some(id.clone());
                match phase {
                    Phase::Creating => {
                        let req = rig.app_request(&id, &config);
                        in_flight = Some(("CreateContainer", spawn(create_and_start(rig.rt.clone(), req))));
                        tokio::time::sleep(Duration::from_millis(150)).await;
                    }
                    _ => match rig.run_app(&id, &config).await {
                        Ok(app) => {
                            let mut rt = rig.rt.clone();
                            if phase == Phase::Exec {
                                let req = ExecSyncRequest {
                                    container_id: app,
                                    cmd: vec!["sleep".into(), "30".into()],
                                    timeout: 60,
                                };
                                in_flight = Some((
                                    "ExecSync",
                                    spawn(async move {
                                        let r = rt.exec_sync(req).await.map_err(|e| e.message().to_string())?;
                                        Ok(format!("exit {}", r.into_inner().exit_code))
                                    }),
                                ));
                                tokio::time::sleep(Duration::from_millis(700)).await;
                            } else if phase == Phase::Stopping {
                                let req = StopContainerRequest { container_id: app, timeout: 20 };
                                in_flight = Some((
                                    "StopContainer",
                                    spawn(async move {
                                        rt.stop_container(req).await.map_err(|e| e.message().to_string())?;
                                        Ok("stopped".into())
                                    }),
                                ));
                                tokio::time::sleep(Duration::from_millis(700)).await;
                            }
                        }
                        Err(e) => failed.push(format!("before the fault: {e}")),
                    },
                }
            }
            Err(e) => failed.push(format!("before the fault: {e}")),
        }
    }

    // The fault.
    match part {
        Part::Server => {
            rig.crash_server().await;
            notes.push(format!("{} killed and restarted", rig.name()));
        }
        Part::VmWhileServerDown => {
            rig.kill_server();
            match targets(&needle, Part::Vmm).first() {
                Some((pid, name)) => {
                    // SAFETY: killing the VM of this benchmark's pod.
                    unsafe { libc::kill(*pid, libc::SIGKILL) };
                    notes.push(format!("{} killed, then {name}, then {0} restarted", rig.name()));
                }
                None => failed.push("no VM process to kill".into()),
            }
            rig.restart_server().await;
        }
        Part::Guest => {
            let sandbox = pod.clone().unwrap_or_default();
            match rig.end_guest(&sandbox).await {
                Ok(()) => notes.push("guest rebooted from root inside it".into()),
                Err(e) => failed.push(format!("ending the guest: {e}")),
            }
        }
        _ => match targets(&needle, part).first() {
            Some((pid, name)) => {
                // SAFETY: killing a process of this benchmark's pod.
                unsafe { libc::kill(*pid, libc::SIGKILL) };
                notes.push(format!("killed {name}"));
            }
            None => failed.push(format!("no {} process to kill", program(part))),
        },
    }

    // The request in flight returns.
    if let Some((what, handle)) = in_flight {
        match tokio::time::timeout(REQUEST_DEADLINE, handle).await {
            Ok(Ok(Ok(_))) => notes.push(format!("{what}: ok")),
            Ok(Ok(Err(e))) => notes.push(format!("{what}: {}", first_line(&e))),
            Ok(Err(e)) => failed.push(format!("{what} panicked: {e}")),
            Err(_) => failed.push(format!("HANG: {what} did not return within {} s", REQUEST_DEADLINE.as_secs())),
        }
    }

    // The server answers.
    match tokio::time::timeout(Duration::from_secs(10), rig.rt.version(VersionRequest::default())).await {
        Ok(Ok(_)) => {}
        _ => failed.push(format!("{} did not answer Version", rig.name())),
    }

    // The pod says what happened.
    let pods = match rig.pods_named(&name).await {
        Ok(p) => p,
        Err(e) => {
            failed.push(e);
            Vec::new()
        }
    };
    for p in &pods {
        let expect_ready = part == Part::Server && phase != Phase::Booting;
        let deadline = Instant::now() + Duration::from_secs(60);
        let state = loop {
            let status = rig
                .rt
                .pod_sandbox_status(PodSandboxStatusRequest { pod_sandbox_id: p.id.clone(), verbose: false })
                .await
                .ok()
                .and_then(|r| r.into_inner().status);
            let ready = status.as_ref().is_some_and(|s| s.state == PodSandboxState::SandboxReady as i32);
            if ready == expect_ready || Instant::now() > deadline {
                break ready;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        notes.push(format!("pod {}", if state { "Ready" } else { "NotReady" }));
        if part == Part::Server {
            if phase != Phase::Booting && !state {
                failed.push("the pod did not survive the server's restart".into());
            }
        } else if state {
            failed.push("the pod still Ready 60 s after the fault".into());
        }
        for c in rig.containers_of(&p.id).await.unwrap_or_default() {
            let status = rig
                .rt
                .container_status(ContainerStatusRequest { container_id: c.id.clone(), verbose: false })
                .await
                .ok()
                .and_then(|r| r.into_inner().status);
            if let Some(s) = status {
                if s.state == ContainerState::ContainerExited as i32 {
                    notes.push(format!("app exited {} {} {:?}", s.exit_code, s.reason, first_line(&s.message)));
                    if s.reason.is_empty() {
                        failed.push("an exited container without a reason".into());
                    }
                } else {
                    notes.push(format!("app in state {}", s.state));
                }
            }
        }
        let removed = rig.remove_pod(&p.id).await;
        if removed.is_empty() {
            notes.push("removed".into());
        }
        failed.extend(removed);
    }
    if pods.is_empty() {
        notes.push("no pod listed".into());
    }

    let settling = Instant::now();
    let leaked = rig.leaked();
    if settling.elapsed() > Duration::from_secs(5) {
        notes.push(format!("the host settled after {} s", settling.elapsed().as_secs()));
    }
    let line = format!(
        "case {n}: {} {:?} {:?}: {}; leaked {} ({} s){}",
        rig.name(),
        part,
        phase,
        notes.join("; "),
        leaked.len(),
        began.elapsed().as_secs(),
        if failed.is_empty() { String::new() } else { format!("; FAILED: {}", failed.join("; ")) }
    );
    Outcome { line, leaked, failed }
}

fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or_default();
    line.chars().take(200).collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let arg = std::env::args().nth(1).unwrap_or_else(|| "1".into());
    let short = arg == "short";
    let rounds: usize = if short { 1 } else { arg.parse().expect("faults ROUNDS | faults short") };
    if !containerd::ready("faults") || !registry::registry_or_skip("faults") {
        std::process::exit(1);
    }
    if !Path::new(containerd::CNI_BIN_DIR).join("bridge").exists() {
        eprintln!("SKIP faults: needs the CNI plugins in {} (containernetworking-plugins)", containerd::CNI_BIN_DIR);
        std::process::exit(1);
    }
    let builtin = std::env::var("RUNV_TEST_HYPERVISOR").as_deref() == Ok("builtin");
    let reg = registry::Registry::start();
    let (app, pause) = rig::push_images(&reg).await;

    let mut rigs = vec![Rig::containerd(93).await, Rig::runv_cri(&reg, &app, &pause, 94).await];
    // Each census sees the whole host: the baselines after both rigs.
    for rig in rigs.iter_mut() {
        rig.baseline = rig.census();
    }
    let mut matrix = Vec::new();
    for part in PARTS {
        // The built-in VMM has no vsock helper; a guest has no busybox to
        // end itself with before its sandbox container exists.
        if part == Part::Vsock && builtin {
            continue;
        }
        for phase in PHASES {
            if part == Part::Guest && phase == Phase::Booting {
                continue;
            }
            // The short form: each part once, in the phase where it hurts
            // most (an exec in flight; the server mid-boot).
            let short_phase = match part {
                Part::Server => Phase::Booting,
                Part::VmWhileServerDown => Phase::Running,
                _ => Phase::Exec,
            };
            let only = std::env::var("RUNV_FAULTS_ONLY").ok();
            let picked = only.as_deref().is_none_or(|o| o == format!("{part:?} {phase:?}"));
            if picked && (!short || phase == short_phase || only.is_some()) {
                matrix.push((part, phase));
            }
        }
    }
    let (mut cycles, mut leaked, mut failed) = (0, 0, 0);
    let started = Instant::now();
    for _ in 0..rounds {
        for &(part, phase) in &matrix {
            for rig in rigs.iter_mut() {
                cycles += 1;
                let out = case(rig, part, phase, cycles).await;
                println!("{}", out.line);
                for l in &out.leaked {
                    println!("  LEAKED {l}");
                }
                if !out.leaked.is_empty() {
                    // Counted once; the next case starts from what is there now.
                    leaked += 1;
                    rig.baseline = rig.census();
                }
                if !out.failed.is_empty() {
                    failed += 1;
                }
                if !out.failed.is_empty() || !out.leaked.is_empty() {
                    println!("  server log (last lines):\n{}", rig.log());
                }
            }
        }
    }
    println!("time: {} s for {cycles} cycles", started.elapsed().as_secs());
    println!("cycles: {cycles}, leaked: {leaked}, failed: {failed}");
    drop(rigs);
    for bridge in ["runvbr93", "runvbr94"] {
        let _ = std::process::Command::new("ip").args(["link", "del", bridge]).output();
    }
    if leaked > 0 || failed > 0 {
        std::process::exit(1);
    }
}
