//! End to end through Debian's containerd and ctr: a containerd of the
//! test's own (root, state, socket), an image made at test time, and
//! `--runtime io.containerd.runv.v2`.
//!
//! Run alone with `cargo test --release -p containerd-shim-runv-v2`.

mod common;

use std::time::{Duration, Instant};

use common::{ready, text, Containerd, IMAGE};

#[test]
fn ctr_run_prints_the_guest_output_and_exit_code_and_leaves_nothing() {
    if !ready("ctr_run_prints_the_guest_output_and_exit_code_and_leaves_nothing") {
        return;
    }
    let ctd = Containerd::start("");
    let out = ctd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        "io.containerd.runv.v2",
        IMAGE,
        "c1",
        "sh",
        "-c",
        "echo hello; uname -r; echo oops >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}\nlog: {}", text(&out.stderr), ctd.log());
    let stdout = text(&out.stdout);
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "hello");
    assert!(lines[1].starts_with("6.1.") && lines[1] != host.trim(), "kernel {}", lines[1]);
    assert!(text(&out.stderr).contains("oops"), "stderr: {}", text(&out.stderr));
    ctd.assert_clean();
}

#[test]
fn exec_kill_and_delete_through_ctr_task() {
    if !ready("exec_kill_and_delete_through_ctr_task") {
        return;
    }
    let ctd = Containerd::start("");
    let run = ctd.ctr(&[
        "run",
        "-d",
        "--runtime",
        "io.containerd.runv.v2",
        IMAGE,
        "c2",
        "sh",
        "-c",
        "echo started > /tmp/state; exec sleep 1000",
    ]);
    assert!(run.status.success(), "ctr run -d: {}\nlog: {}", text(&run.stderr), ctd.log());
    let exec = ctd.ctr(&["task", "exec", "--exec-id", "e1", "c2", "sh", "-c", "cat /tmp/state; echo from-exec"]);
    assert_eq!(exec.status.code(), Some(0), "exec: {}", text(&exec.stderr));
    assert_eq!(text(&exec.stdout), "started\nfrom-exec\n");
    let ps = ctd.ctr(&["task", "ps", "c2"]);
    assert!(ps.status.success(), "task ps: {}", text(&ps.stderr));
    let kill = ctd.ctr(&["task", "kill", "-s", "SIGKILL", "c2"]);
    assert!(kill.status.success(), "kill: {}", text(&kill.stderr));
    ctd.wait_task_stopped("c2");
    assert!(ctd.ctr(&["task", "rm", "c2"]).status.success());
    assert!(ctd.ctr(&["container", "rm", "c2"]).status.success());
    ctd.assert_clean();
}

#[test]
fn a_missing_kernel_fails_the_task_clearly_and_leaves_nothing() {
    if !ready("a_missing_kernel_fails_the_task_clearly_and_leaves_nothing") {
        return;
    }
    let ctd = Containerd::start("kernel = \"/nonexistent/vmlinux\"");
    let out = ctd.ctr(&["run", "--rm", "--runtime", "io.containerd.runv.v2", IMAGE, "c3", "true"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("guest kernel /nonexistent/vmlinux not found"), "stderr: {err}");
    let _ = ctd.ctr(&["container", "rm", "c3"]);
    ctd.assert_clean();
}

#[test]
fn a_killed_shim_is_cleaned_up_by_containerd() {
    if !ready("a_killed_shim_is_cleaned_up_by_containerd") {
        return;
    }
    let ctd = Containerd::start("");
    let run = ctd.ctr(&["run", "-d", "--runtime", "io.containerd.runv.v2", IMAGE, "c4", "sleep", "1000"]);
    assert!(run.status.success(), "ctr run -d: {}", text(&run.stderr));
    let dir = ctd.dir.path().to_string_lossy().into_owned();
    let shim =
        common::find_process(|c| c.contains("containerd-shim-runv-v2") && c.contains("-id c4") && c.contains(&dir));
    let shim = shim.expect("the shim process");
    // SAFETY: killing the shim this test started.
    unsafe { libc::kill(shim, libc::SIGKILL) };
    // containerd notices, runs `shim delete`, and that removes the VM.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ls = text(&ctd.ctr(&["task", "ls"]).stdout);
        if !ls.lines().any(|l| l.starts_with("c4") && l.contains("RUNNING")) {
            break;
        }
        assert!(Instant::now() < deadline, "containerd still sees the task running: {ls}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = ctd.ctr(&["task", "rm", "-f", "c4"]);
    let _ = ctd.ctr(&["container", "rm", "c4"]);
    ctd.assert_clean();
    let sockets: Vec<_> = std::fs::read_dir("/run/containerd/s").into_iter().flatten().flatten().collect();
    let ours = sockets.iter().filter(|e| {
        let hash = e.file_name().to_string_lossy().into_owned();
        containerd_shim_socket_hash_matches(&ctd, &hash)
    });
    assert_eq!(ours.count(), 0, "the dead shim's socket is left");
}

#[test]
fn a_shim_killed_while_its_vm_boots_is_cleaned_up_by_containerd() {
    if !ready("a_shim_killed_while_its_vm_boots_is_cleaned_up_by_containerd") {
        return;
    }
    let ctd = Containerd::start("");
    let run = ctd
        .ctr_cmd(&["run", "-d", "--runtime", "io.containerd.runv.v2", IMAGE, "c9", "sleep", "1000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The moment the sandbox's directory exists the VM is on its way up
    // and the shim has not yet recorded anything but that directory.
    let sandboxes = ctd.dir.path().join("run/sandboxes");
    let dir = ctd.dir.path().to_string_lossy().into_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    let shim = loop {
        let booting = std::fs::read_dir(&sandboxes).into_iter().flatten().flatten().next().is_some();
        let shim = common::find_process(|c| {
            c.contains("containerd-shim-runv-v2") && c.contains("-id c9") && c.contains(&dir) && !c.ends_with("start")
        });
        if let (true, Some(shim)) = (booting, shim) {
            break shim;
        }
        assert!(Instant::now() < deadline, "no sandbox started booting: {}", ctd.log());
        std::thread::sleep(Duration::from_millis(5));
    };
    // SAFETY: killing the shim this test started.
    unsafe { libc::kill(shim, libc::SIGKILL) };
    let out = common::output_within(run, Duration::from_secs(60)).expect("ctr run answers once its shim is gone");
    assert!(!out.status.success(), "ctr run succeeded with its shim killed mid-boot");
    let _ = ctd.ctr(&["task", "rm", "-f", "c9"]);
    let _ = ctd.ctr(&["container", "rm", "c9"]);
    // containerd's `shim delete` finds the sandbox directory the dead shim
    // recorded before booting: the VM, its helpers, jail and cgroups go.
    ctd.assert_clean();
}

/// Whether `hash` names the socket of container c4 of this containerd.
fn containerd_shim_socket_hash_matches(ctd: &Containerd, hash: &str) -> bool {
    let address = ctd.socket().to_string_lossy().into_owned();
    containerd_shim::socket_address(&address, "runv-test", "c4").ends_with(hash)
}

#[test]
fn an_unknown_sandbox_id_is_a_clear_error_and_starts_no_vm() {
    if !ready("an_unknown_sandbox_id_is_a_clear_error_and_starts_no_vm") {
        return;
    }
    let ctd = Containerd::start("");
    let out = ctd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        "io.containerd.runv.v2",
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=no-such-pod",
        IMAGE,
        "c5",
        "true",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("sandbox no-such-pod does not run in this shim"), "stderr: {err}");
    let _ = ctd.ctr(&["container", "rm", "c5"]);
    ctd.assert_clean();
}

#[test]
fn a_killed_vm_ends_the_task_and_leaves_nothing() {
    if !ready("a_killed_vm_ends_the_task_and_leaves_nothing") {
        return;
    }
    lose_the_sandbox("c6", "qemu-system", "the sandbox VM ended (the VM process ended: signal: 9");
}

#[test]
fn a_killed_helper_takes_its_vm_and_leaves_nothing() {
    if !ready("a_killed_helper_takes_its_vm_and_leaves_nothing") {
        return;
    }
    lose_the_sandbox("c12", "virtiofsd", "virtiofsd ended (signal: 9");
    lose_the_sandbox("c13", "vhost-device-vsock", "vhost-device-vsock ended (signal: 9");
}

/// Runs container `id` with an exec in it, SIGKILLs the sandbox's process
/// whose command line starts with `program`, and checks that the exec
/// fails with `why` in its error (not a made-up exit status), the task
/// stops, and removing it leaves nothing.
fn lose_the_sandbox(id: &str, program: &str, why: &str) {
    let ctd = Containerd::start("");
    let run = ctd.ctr(&["run", "-d", "--runtime", "io.containerd.runv.v2", IMAGE, id, "sleep", "1000"]);
    assert!(run.status.success(), "ctr run -d: {}", text(&run.stderr));
    let mut exec = ctd
        .ctr_cmd(&["task", "exec", "--exec-id", "long", id, "sh", "-c", "echo up; exec sleep 1000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = exec.stdout.take().unwrap();
    let (up_tx, up) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        let _ = up_tx.send(line);
    });
    assert_eq!(up.recv_timeout(Duration::from_secs(30)).as_deref(), Ok("up\n"), "the exec never started");
    let dir = ctd.dir.path().to_string_lossy().into_owned();
    let target = common::sandbox_processes(&dir, program).first().map(|p| p.0);
    // SAFETY: killing a process of the sandbox this test started.
    unsafe { libc::kill(target.unwrap_or_else(|| panic!("the sandbox's {program}")), libc::SIGKILL) };
    let exec = common::output_within(exec, Duration::from_secs(30)).expect("the exec outlived its sandbox by 30 s");
    assert!(!exec.status.success(), "the exec succeeded without its sandbox");
    let err = text(&exec.stderr);
    assert!(err.contains(why), "exec stderr: {err}");
    ctd.wait_task_stopped(id);
    assert!(ctd.ctr(&["task", "rm", id]).status.success());
    assert!(ctd.ctr(&["container", "rm", id]).status.success());
    ctd.assert_clean();
}

/// Starts the shim the way containerd does and speaks the task API to it
/// directly, with bundles containerd would never hand over.
#[test]
fn a_bundle_without_or_with_a_malformed_config_json_is_refused() {
    if !ready("a_bundle_without_or_with_a_malformed_config_json_is_refused") {
        return;
    }
    use containerd_shim_protos::api::{CreateTaskRequest, ShutdownRequest};
    use containerd_shim_protos::shim_async::TaskClient;
    use containerd_shim_protos::ttrpc::context;

    let ctd = Containerd::start("");
    let bundle = ctd.dir.path().join("bad-bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_containerd-shim-runv-v2"))
        .args(["-namespace", "runv-test", "-id", "bad1", "-address"])
        .arg(ctd.socket())
        .args(["-publish-binary", "containerd", "start"])
        .current_dir(&bundle)
        .env("TTRPC_ADDRESS", ctd.dir.path().join("containerd.sock.ttrpc"))
        .env("RUNV_CONFIG", ctd.dir.path().join("runv.toml"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "shim start: {}", text(&out.stderr));
    let address = text(&out.stdout).trim().to_string();
    assert!(address.starts_with("unix://"), "start replied {address:?}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = containerd_shim_protos::ttrpc::r#async::Client::connect(&address).await.unwrap();
        let task = TaskClient::new(client);
        let ctx = || context::with_timeout(Duration::from_secs(30).as_nanos() as i64);
        let req = CreateTaskRequest {
            id: "bad1".into(),
            bundle: bundle.to_string_lossy().into_owned(),
            ..Default::default()
        };
        let missing = task.create(ctx(), &req).await.unwrap_err().to_string();
        assert!(missing.contains("config.json"), "{missing}");
        std::fs::write(bundle.join("config.json"), b"{\"ociVersion\": [").unwrap();
        let malformed = task.create(ctx(), &req).await.unwrap_err().to_string();
        assert!(malformed.contains("config.json"), "{malformed}");
        // The shim keeps serving after bad input, then shuts down cleanly.
        task.shutdown(ctx(), &ShutdownRequest { id: "bad1".into(), ..Default::default() }).await.unwrap();
    });
    ctd.assert_clean();
}

#[test]
fn the_vm_is_sized_from_the_container_limits_and_bad_sizes_are_refused() {
    if !ready("the_vm_is_sized_from_the_container_limits_and_bad_sizes_are_refused") {
        return;
    }
    let ctd = Containerd::start("guest_overhead_mib = 64");
    // 192 MiB and 1.5 CPUs: a 256 MiB, 2-vCPU VM.
    let out = ctd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        "io.containerd.runv.v2",
        "--memory-limit",
        "201326592",
        "--cpus",
        "1.5",
        IMAGE,
        "c7",
        "sh",
        "-c",
        "nproc; head -1 /proc/meminfo",
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "2", "vCPUs: {stdout}");
    let total_kib: u64 = lines[1].split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!((200 * 1024..=256 * 1024).contains(&total_kib), "MemTotal {total_kib} KiB");

    let bad = ctd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        "io.containerd.runv.v2",
        "--annotation",
        "io.kubernetes.cri.sandbox-memory=lots",
        IMAGE,
        "c8",
        "true",
    ]);
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("io.kubernetes.cri.sandbox-memory: 'lots' is not a whole number"),
        "stderr: {}",
        text(&bad.stderr)
    );
    let _ = ctd.ctr(&["container", "rm", "c8"]);
    ctd.assert_clean();
}

#[test]
fn a_terminal_task_gets_a_pty_through_ctr() {
    if !ready("a_terminal_task_gets_a_pty_through_ctr") {
        return;
    }
    let ctd = Containerd::start("");
    // ctr -t wants a terminal of its own: util-linux's script gives it one.
    let ctr = format!(
        "ctr -a {} -n runv-test run --rm -t --runtime io.containerd.runv.v2 {IMAGE} c9 sh -c 'tty; [ -t 1 ] && echo is-a-tty'",
        ctd.socket().display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &ctr, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {}", text(&out.stderr));
    assert!(stdout.contains("/dev/pts/") && stdout.contains("is-a-tty"), "stdout: {stdout:?}");
    ctd.assert_clean();
}

#[test]
fn a_network_namespace_that_does_not_exist_is_a_clear_error_and_leaves_nothing() {
    if !ready("a_network_namespace_that_does_not_exist_is_a_clear_error_and_leaves_nothing") {
        return;
    }
    let ctd = Containerd::start("");
    let out = ctd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        "io.containerd.runv.v2",
        "--with-ns",
        "network:/run/netns/runv-no-such-netns",
        IMAGE,
        "c9",
        "true",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("network namespace /run/netns/runv-no-such-netns"), "stderr: {err}");
    let _ = ctd.ctr(&["container", "rm", "c9"]);
    ctd.assert_clean();
}

/// A network namespace like CNI's: eth0 on a veth whose peer is on the host.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("runv-ctr-{tag}-{}", std::process::id());
        let host = format!("rvc{tag}{}", std::process::id() % 100_000);
        let script = format!(
            "ip netns add {name} && ip link add {host} type veth peer name eth0 netns {name} && \
             ip link set {host} up && ip -n {name} addr add 10.246.0.2/24 dev eth0 && ip -n {name} link set eth0 up"
        );
        let out = std::process::Command::new("sh").arg("-c").arg(&script).output().unwrap();
        assert!(out.status.success(), "{script}: {}", text(&out.stderr));
        Netns(name)
    }

    fn ip(&self, args: &str) -> String {
        let out =
            std::process::Command::new("ip").args(["-n", &self.0]).args(args.split_whitespace()).output().unwrap();
        text(&out.stdout)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn a_vm_death_removes_the_pod_network_tap_and_filters() {
    if !ready("a_vm_death_removes_the_pod_network_tap_and_filters") {
        return;
    }
    let netns = Netns::new("a");
    let ctd = Containerd::start("");
    let ns = format!("network:/run/netns/{}", netns.0);
    let run =
        ctd.ctr(&["run", "-d", "--runtime", "io.containerd.runv.v2", "--with-ns", &ns, IMAGE, "c10", "sleep", "1000"]);
    assert!(run.status.success(), "ctr run -d: {}", text(&run.stderr));
    // The guest has the pod's address on its eth0.
    let exec = ctd.ctr(&["task", "exec", "--exec-id", "ip", "c10", "ip", "-o", "-4", "addr", "show", "eth0"]);
    assert!(text(&exec.stdout).contains("inet 10.246.0.2/24"), "{}{}", text(&exec.stdout), text(&exec.stderr));
    assert!(netns.ip("-o link show").contains("tap0_runv"));
    let filters = std::process::Command::new("ip")
        .args(["netns", "exec", &netns.0, "tc", "filter", "show", "dev", "eth0", "ingress"])
        .output()
        .unwrap();
    assert!(text(&filters.stdout).contains("tap0_runv"), "{}", text(&filters.stdout));

    let run_dir = ctd.dir.path().join("run").to_string_lossy().into_owned();
    let qemu = common::find_process(|c| c.starts_with("qemu-system") && c.contains(&run_dir));
    // SAFETY: killing the VM this test started.
    unsafe { libc::kill(qemu.expect("the VM process"), libc::SIGKILL) };
    ctd.wait_task_stopped("c10");
    assert!(ctd.ctr(&["task", "rm", "c10"]).status.success());
    assert!(ctd.ctr(&["container", "rm", "c10"]).status.success());
    ctd.assert_clean();
    assert!(!netns.ip("-o link show").contains("tap0_runv"), "{}", netns.ip("-o link show"));
    let qdiscs = std::process::Command::new("ip")
        .args(["netns", "exec", &netns.0, "tc", "qdisc", "show", "dev", "eth0"])
        .output()
        .unwrap();
    assert!(!text(&qdiscs.stdout).contains("ingress"), "{}", text(&qdiscs.stdout));
}

#[test]
fn an_interface_runv_cannot_carry_fails_the_task_clearly_and_leaves_nothing() {
    if !ready("an_interface_runv_cannot_carry_fails_the_task_clearly_and_leaves_nothing") {
        return;
    }
    let netns = Netns::new("b");
    netns.ip("link add br7 type bridge");
    let ctd = Containerd::start("");
    let ns = format!("network:/run/netns/{}", netns.0);
    let out = ctd.ctr(&["run", "--rm", "--runtime", "io.containerd.runv.v2", "--with-ns", &ns, IMAGE, "c11", "true"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("interface br7") && err.contains("type bridge"), "stderr: {err}");
    let _ = ctd.ctr(&["container", "rm", "c11"]);
    ctd.assert_clean();
    let links = netns.ip("-o link show");
    assert!(!links.contains("_runv"), "{links}");
}

#[test]
fn a_hung_guest_holds_up_no_other_request_and_its_calls_time_out_clearly() {
    if !ready("a_hung_guest_holds_up_no_other_request_and_its_calls_time_out_clearly") {
        return;
    }
    let ctd = Containerd::start("");
    let run = ctd.ctr(&["run", "-d", "--runtime", "io.containerd.runv.v2", IMAGE, "c11", "sleep", "1000"]);
    assert!(run.status.success(), "ctr run -d: {}", text(&run.stderr));
    let run_dir = ctd.dir.path().join("run").to_string_lossy().into_owned();
    let vm = common::find_process(|c| c.starts_with("qemu-system") && c.contains(&run_dir)).expect("the VM process");
    // The whole guest stops: its agent answers nothing.
    // SAFETY: stopping the VM this test started.
    unsafe { libc::kill(vm, libc::SIGSTOP) };
    // An exec's Start waits on the silent agent (up to its 60 s deadline)...
    let exec = ctd
        .ctr_cmd(&["task", "exec", "--exec-id", "e1", "c11", "true"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // ...while every other request to the shim is answered: the task list
    // (State) at once, and a kill, which needs the agent, with a clear
    // error when its own deadline passes.
    let ls = common::output_within(
        ctd.ctr_cmd(&["task", "ls"]).stdout(std::process::Stdio::piped()).spawn().unwrap(),
        Duration::from_secs(20),
    )
    .expect("ctr task ls waited behind the exec on the hung guest");
    assert!(text(&ls.stdout).lines().any(|l| l.starts_with("c11") && l.contains("RUNNING")), "{}", text(&ls.stdout));
    let kill = ctd.ctr(&["task", "kill", "-s", "SIGUSR1", "c11"]);
    assert!(!kill.status.success());
    let err = text(&kill.stderr);
    assert!(err.contains("the guest agent did not answer signal_process before its deadline"), "kill stderr: {err}");
    let mut exec = exec;
    assert!(exec.try_wait().unwrap().is_none(), "the exec ended while the guest was stopped");
    // The guest goes on, and so does the exec.
    // SAFETY: resuming the VM stopped above.
    unsafe { libc::kill(vm, libc::SIGCONT) };
    let exec = common::output_within(exec, Duration::from_secs(60)).expect("the exec did not end once the guest ran");
    assert!(exec.status.success(), "exec after the guest resumed: {}", text(&exec.stderr));
    let kill = ctd.ctr(&["task", "kill", "-s", "SIGKILL", "c11"]);
    assert!(kill.status.success(), "kill: {}", text(&kill.stderr));
    ctd.wait_task_stopped("c11");
    assert!(ctd.ctr(&["task", "rm", "c11"]).status.success());
    assert!(ctd.ctr(&["container", "rm", "c11"]).status.success());
    ctd.assert_clean();
}

#[test]
fn a_restarted_containerd_finds_its_runv_task_again() {
    if !ready("a_restarted_containerd_finds_its_runv_task_again") {
        return;
    }
    let mut ctd = Containerd::start("");
    let run = ctd.ctr(&["run", "-d", "--runtime", "io.containerd.runv.v2", IMAGE, "c14", "sleep", "1000"]);
    assert!(run.status.success(), "ctr run -d: {}", text(&run.stderr));
    // containerd dies (its shims live on) and starts again on its state: it
    // reconnects to the shim through the bundle's address file.
    ctd.crash_and_restart();
    let ls = text(&ctd.ctr(&["task", "ls"]).stdout);
    assert!(
        ls.lines().any(|l| l.starts_with("c14") && l.contains("RUNNING")),
        "after the restart: {ls}\n{}",
        ctd.log()
    );
    let exec = ctd.ctr(&["task", "exec", "--exec-id", "after", "c14", "echo", "still here"]);
    assert_eq!(text(&exec.stdout), "still here\n", "exec after the restart: {}", text(&exec.stderr));
    let kill = ctd.ctr(&["task", "kill", "-s", "SIGKILL", "c14"]);
    assert!(kill.status.success(), "kill: {}", text(&kill.stderr));
    ctd.wait_task_stopped("c14");
    assert!(ctd.ctr(&["task", "rm", "c14"]).status.success());
    assert!(ctd.ctr(&["container", "rm", "c14"]).status.success());
    ctd.assert_clean();
}
