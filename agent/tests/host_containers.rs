//! Containers through the agent running on the host (root, cgroups of the
//! host), driven over ttrpc as the host side drives the guest's agent.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{code_of, ctx, root_or_skip, HostAgent};
use runv_proto::agent::*;
use runv_proto::agent_ttrpc::AgentClient;
use serde_json::json;
use ttrpc::context;

/// A busybox rootfs for container `id` in the agent's shared directory.
fn rootfs(agent: &HostAgent, id: &str) -> PathBuf {
    let root = agent.shared().join(id).join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "echo", "ls", "sleep", "hostname", "head", "tr", "stty", "ps", "tty", "true"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    root
}

fn spec(root: &Path, args: &[&str], extra: serde_json::Value) -> Vec<u8> {
    let mut spec = json!({
        "ociVersion": "1.0.2",
        "root": { "path": root, "readonly": false },
        "hostname": "box",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": ["PATH=/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_KILL", "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN"],
                "effective": ["CAP_KILL", "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN"],
                "permitted": ["CAP_KILL", "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN"]
            },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
            "noNewPrivileges": true
        },
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
            { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"] }
        ],
        "linux": {
            "namespaces": [ { "type": "pid" }, { "type": "mount" }, { "type": "ipc" }, { "type": "uts" } ],
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"]
        }
    });
    merge(&mut spec, extra);
    serde_json::to_vec(&spec).unwrap()
}

fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

async fn create(c: &AgentClient, id: &str, spec: Vec<u8>) -> u32 {
    c.create_container(ctx(), &CreateContainerRequest { container_id: id.into(), oci_spec: spec, ..Default::default() })
        .await
        .unwrap_or_else(|e| panic!("create {id}: {e:?}"))
        .pid
}

async fn start(c: &AgentClient, id: &str) {
    c.start_container(ctx(), &ContainerRequest { container_id: id.into(), ..Default::default() })
        .await
        .unwrap_or_else(|e| panic!("start {id}: {e:?}"));
}

async fn read_all(c: &AgentClient, id: &str, exec: &str, stderr: bool) -> String {
    let mut all = Vec::new();
    loop {
        let req = ReadStreamRequest { container_id: id.into(), exec_id: exec.into(), len: 4096, ..Default::default() };
        let resp = if stderr { c.read_stderr(ctx(), &req).await } else { c.read_stdout(ctx(), &req).await }.unwrap();
        if resp.eof {
            return String::from_utf8_lossy(&all).into_owned();
        }
        all.extend_from_slice(&resp.data);
    }
}

async fn wait(c: &AgentClient, id: &str, exec: &str) -> WaitProcessResponse {
    c.wait_process(ctx(), &WaitProcessRequest { container_id: id.into(), exec_id: exec.into(), ..Default::default() })
        .await
        .unwrap()
}

async fn remove(c: &AgentClient, id: &str) {
    c.remove_container(ctx(), &RemoveContainerRequest { container_id: id.into(), force: true, ..Default::default() })
        .await
        .unwrap_or_else(|e| panic!("remove {id}: {e:?}"));
}

/// Nothing of container `id` may remain: no cgroup, no state, no bundle,
/// no mount of its rootfs.
fn assert_nothing_left(agent: &HostAgent, id: &str) {
    for dir in [
        format!("/sys/fs/cgroup/memory/runv/{id}"),
        format!("/sys/fs/cgroup/pids/runv/{id}"),
        format!("/sys/fs/cgroup/runv/{id}"),
    ] {
        assert!(!Path::new(&dir).exists(), "cgroup {dir} left behind");
    }
    assert!(!agent.dir.path().join("state/containers").join(id).exists(), "engine state left behind");
    assert!(!agent.dir.path().join("state/bundles").join(id).exists(), "bundle left behind");
    let mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", agent.child.id())).unwrap();
    let rootfs = agent.shared().join(id);
    assert!(!mounts.contains(&*rootfs.to_string_lossy()), "a mount of {} is left", rootfs.display());
}

#[tokio::test]
async fn a_container_is_isolated_and_reports_output_and_exit_code() {
    if !root_or_skip("a_container_is_isolated_and_reports_output_and_exit_code") {
        return;
    }
    let agent = HostAgent::start();
    let c = agent.client().await;
    let root = rootfs(&agent, "iso");
    std::fs::write(root.join("etc/marker"), "inside\n").unwrap();
    let script = "echo pid=$$; hostname; ls /; cat /etc/marker; echo oops >&2; exit 3";
    let pid = create(&c, "iso", spec(&root, &["sh", "-c", script], json!({}))).await;
    assert!(pid > 1);
    start(&c, "iso").await;
    let (out, err) = tokio::join!(read_all(&c, "iso", "", false), read_all(&c, "iso", "", true));
    assert_eq!(out, "pid=1\nbox\nbin\ndev\netc\nproc\nsys\ntmp\ninside\n");
    assert_eq!(err, "oops\n");
    assert_eq!(wait(&c, "iso", "").await.status, 3);
    // Its namespaces are its own.
    remove(&c, "iso").await;
    assert_nothing_left(&agent, "iso");
}

#[tokio::test]
async fn exec_joins_a_running_container_and_signals_reach_it() {
    if !root_or_skip("exec_joins_a_running_container_and_signals_reach_it") {
        return;
    }
    let agent = HostAgent::start();
    let c = agent.client().await;
    let root = rootfs(&agent, "ex");
    let init = "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.1; done";
    create(&c, "ex", spec(&root, &["sh", "-c", init], json!({}))).await;
    start(&c, "ex").await;
    let first = c
        .read_stdout(ctx(), &ReadStreamRequest { container_id: "ex".into(), len: 64, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(first.data, b"ready\n");

    let process = json!({ "args": ["sh", "-c", "hostname; cat /proc/1/cmdline | tr '\\0' ' '; echo"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0} });
    let exec = ExecProcessRequest {
        container_id: "ex".into(),
        exec_id: "e1".into(),
        process: serde_json::to_vec(&process).unwrap(),
        ..Default::default()
    };
    c.exec_process(ctx(), &exec).await.unwrap();
    let out = read_all(&c, "ex", "e1", false).await;
    assert!(out.starts_with("box\nsh -c trap"), "exec output: {out:?}");
    assert_eq!(wait(&c, "ex", "e1").await.status, 0);

    let pids =
        c.list_processes(ctx(), &ContainerRequest { container_id: "ex".into(), ..Default::default() }).await.unwrap();
    assert!(!pids.pids.is_empty());

    c.signal_process(ctx(), &SignalProcessRequest { container_id: "ex".into(), signal: 15, ..Default::default() })
        .await
        .unwrap();
    let rest = read_all(&c, "ex", "", false).await;
    assert!(rest.contains("got-term"), "{rest:?}");
    assert_eq!(wait(&c, "ex", "").await.status, 7);
    remove(&c, "ex").await;
    assert_nothing_left(&agent, "ex");
}

#[tokio::test]
async fn a_memory_limit_is_enforced_and_the_oom_kill_is_reported() {
    if !root_or_skip("a_memory_limit_is_enforced_and_the_oom_kill_is_reported") {
        return;
    }
    let agent = HostAgent::start();
    let c = agent.client().await;
    let root = rootfs(&agent, "oom");
    let hog = "x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo survived";
    let limits = json!({ "linux": { "resources": { "memory": { "limit": 16777216, "swap": 16777216 } } } });
    create(&c, "oom", spec(&root, &["sh", "-c", hog], limits)).await;
    let oom = tokio::spawn({
        let c = c.clone();
        async move {
            c.get_oom_event(
                context::with_timeout(Duration::from_secs(60).as_nanos() as i64),
                &GetOomEventRequest::new(),
            )
            .await
        }
    });
    start(&c, "oom").await;
    let out = read_all(&c, "oom", "", false).await;
    let w = wait(&c, "oom", "").await;
    assert!(!out.contains("survived"), "the allocation was not stopped: {out:?}");
    assert_ne!(w.status, 0);
    let event = oom.await.unwrap().unwrap();
    assert_eq!(event.container_id, "oom");
    let stats =
        c.stats_container(ctx(), &ContainerRequest { container_id: "oom".into(), ..Default::default() }).await.unwrap();
    assert_eq!(stats.memory_limit_bytes, 16 << 20);
    assert!(stats.oom_kills >= 1, "{stats:?}");
    remove(&c, "oom").await;
    assert_nothing_left(&agent, "oom");
}

#[tokio::test]
async fn a_terminal_container_follows_resizes() {
    if !root_or_skip("a_terminal_container_follows_resizes") {
        return;
    }
    let agent = HostAgent::start();
    let c = agent.client().await;
    // Ids as containerd makes them (64 hex digits): the console socket of
    // a terminal process must still fit a Unix socket path.
    let id = "5f0c8e2a".repeat(8);
    let exec_id = "a1b2c3d4".repeat(8);
    let root = rootfs(&agent, &id);
    let s = spec(&root, &["sh", "-c", "read go; tty; stty size"], json!({ "process": { "terminal": true } }));
    create(&c, &id, s).await;
    start(&c, &id).await;
    c.tty_win_resize(
        ctx(),
        &TtyWinResizeRequest { container_id: id.clone(), rows: 40, cols: 120, ..Default::default() },
    )
    .await
    .unwrap();
    // A terminal exec beside it, with its own size.
    let process = json!({ "args": ["sh", "-c", "read go; tty; stty size"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}, "terminal": true });
    let exec = ExecProcessRequest {
        container_id: id.clone(),
        exec_id: exec_id.clone(),
        process: serde_json::to_vec(&process).unwrap(),
        ..Default::default()
    };
    c.exec_process(ctx(), &exec).await.unwrap_or_else(|e| panic!("a terminal exec with 64-hex ids: {e:?}"));
    c.tty_win_resize(
        ctx(),
        &TtyWinResizeRequest {
            container_id: id.clone(),
            exec_id: exec_id.clone(),
            rows: 20,
            cols: 70,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // The exec first: the container's init ending kills every process of
    // its PID namespace, the exec too.
    for exec in [exec_id.as_str(), ""] {
        c.write_stdin(
            ctx(),
            &WriteStdinRequest {
                container_id: id.clone(),
                exec_id: exec.into(),
                data: b"go\n".to_vec(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        if !exec.is_empty() {
            let out = read_all(&c, &id, exec, false).await;
            assert!(out.contains("/dev/pts/1") && out.contains("20 70"), "exec output: {out:?}");
            assert_eq!(wait(&c, &id, exec).await.status, 0);
        }
    }
    let out = read_all(&c, &id, "", false).await;
    assert!(out.contains("/dev/pts/0") && out.contains("40 120"), "output: {out:?}");
    assert_eq!(wait(&c, &id, "").await.status, 0);
    remove(&c, &id).await;
    assert_nothing_left(&agent, &id);
    let consoles = std::fs::read_dir(agent.dir.path().join("state/consoles")).unwrap().count();
    assert_eq!(consoles, 0, "console sockets left behind");
}

#[tokio::test]
async fn pause_resume_and_update_act_on_the_cgroup() {
    if !root_or_skip("pause_resume_and_update_act_on_the_cgroup") {
        return;
    }
    let agent = HostAgent::start();
    let c = agent.client().await;
    let root = rootfs(&agent, "pr");
    create(&c, "pr", spec(&root, &["sh", "-c", "while :; do :; done"], json!({}))).await;
    start(&c, "pr").await;
    let req = ContainerRequest { container_id: "pr".into(), ..Default::default() };
    let cpu = || async { c.stats_container(ctx(), &req).await.unwrap().cpu_usage_ns };
    c.pause_container(ctx(), &req).await.unwrap();
    let a = cpu().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = cpu().await;
    assert!(b - a < 20_000_000, "a paused container used {} ns of CPU in 300 ms", b - a);
    c.resume_container(ctx(), &req).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let d = cpu().await;
    assert!(d - b > 20_000_000, "a resumed container used only {} ns of CPU in 300 ms", d - b);

    let resources = json!({ "memory": { "limit": 33554432 } });
    c.update_container(
        ctx(),
        &UpdateContainerRequest {
            container_id: "pr".into(),
            resources: serde_json::to_vec(&resources).unwrap(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let stats = c.stats_container(ctx(), &req).await.unwrap();
    assert_eq!(stats.memory_limit_bytes, 32 << 20);
    remove(&c, "pr").await;
    assert_nothing_left(&agent, "pr");
}

#[tokio::test]
async fn containers_join_the_pause_process_namespaces() {
    if !root_or_skip("containers_join_the_pause_process_namespaces") {
        return;
    }
    let agent = HostAgent::start();
    let c = agent.client().await;
    let sandbox = CreateSandboxRequest {
        sandbox_id: "pod1".into(),
        hostname: "podhost".into(),
        dns_servers: vec!["10.0.0.10".into()],
        dns_searches: vec!["svc.cluster.local".into()],
        pause: true,
        ..Default::default()
    };
    c.create_sandbox(ctx(), &sandbox).await.unwrap();
    let resolv = std::fs::read_to_string(agent.dir.path().join("state/sandbox/resolv.conf")).unwrap();
    assert_eq!(resolv, "nameserver 10.0.0.10\nsearch svc.cluster.local\n");
    let root = rootfs(&agent, "member");
    let extra = json!({
        "hostname": null,
        "linux": { "namespaces": [ { "type": "pid", "path": "pause:pid" }, { "type": "uts", "path": "pause:uts" }, { "type": "ipc", "path": "pause:ipc" }, { "type": "mount" } ] },
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/etc/resolv.conf", "type": "bind", "source": agent.dir.path().join("state/sandbox/resolv.conf"), "options": ["rbind", "ro"] }
        ]
    });
    create(&c, "member", spec(&root, &["sh", "-c", "hostname; echo $$; cat /etc/resolv.conf"], extra)).await;
    start(&c, "member").await;
    let out = read_all(&c, "member", "", false).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "podhost");
    assert_ne!(lines[1], "1", "the container should not be PID 1 of the pod namespace");
    assert_eq!(&lines[2..], ["nameserver 10.0.0.10", "search svc.cluster.local"]);
    assert_eq!(wait(&c, "member", "").await.status, 0);
    remove(&c, "member").await;
    assert_nothing_left(&agent, "member");
}

#[tokio::test]
async fn bad_container_requests_get_clear_errors_and_the_agent_keeps_serving() {
    if !root_or_skip("bad_container_requests_get_clear_errors_and_the_agent_keeps_serving") {
        return;
    }
    let agent = HostAgent::start();
    let c = agent.client().await;
    let root = rootfs(&agent, "ok");
    std::fs::create_dir_all(agent.dir.path().join("secret")).unwrap();
    std::os::unix::fs::symlink(agent.dir.path().join("secret"), agent.shared().join("escape")).unwrap();

    let cases: Vec<(&str, Vec<u8>, ttrpc::Code, &str)> = vec![
        ("bad1", b"{not json".to_vec(), ttrpc::Code::INVALID_ARGUMENT, "malformed OCI spec"),
        (
            "bad2",
            spec(&agent.shared().join("ok/../../secret"), &["true"], json!({})),
            ttrpc::Code::INVALID_ARGUMENT,
            "outside the shared directory",
        ),
        (
            "bad3",
            spec(&agent.shared().join("escape"), &["true"], json!({})),
            ttrpc::Code::INVALID_ARGUMENT,
            "outside the shared directory",
        ),
        (
            "bad4",
            spec(&root, &["true"], json!({ "linux": { "resources": { "memory": { "limit": 12 } } } })),
            ttrpc::Code::INVALID_ARGUMENT,
            "below the minimum",
        ),
        ("../x", spec(&root, &["true"], json!({})), ttrpc::Code::INVALID_ARGUMENT, "may only contain"),
        ("bad5", spec(&root, &["/bin/no-such-binary"], json!({})), ttrpc::Code::FAILED_PRECONDITION, ""),
    ];
    for (id, s, code, text) in cases {
        let r = c
            .create_container(
                ctx(),
                &CreateContainerRequest { container_id: id.into(), oci_spec: s, ..Default::default() },
            )
            .await;
        if code == ttrpc::Code::FAILED_PRECONDITION {
            // A missing binary shows when the container starts (or is created).
            if r.is_ok() {
                let started =
                    c.start_container(ctx(), &ContainerRequest { container_id: id.into(), ..Default::default() }).await;
                if started.is_ok() {
                    assert_eq!(wait(&c, id, "").await.status, 127);
                }
                remove(&c, id).await;
            }
            continue;
        }
        let (got, message) = code_of(r);
        assert_eq!(got, code, "{id}: {message}");
        assert!(message.contains(text), "{id}: {message}");
    }
    for (name, r) in [
        (
            "start",
            code_of(
                c.start_container(ctx(), &ContainerRequest { container_id: "nobody".into(), ..Default::default() })
                    .await,
            ),
        ),
        (
            "stats",
            code_of(
                c.stats_container(ctx(), &ContainerRequest { container_id: "nobody".into(), ..Default::default() })
                    .await,
            ),
        ),
        (
            "remove",
            code_of(
                c.remove_container(
                    ctx(),
                    &RemoveContainerRequest { container_id: "nobody".into(), ..Default::default() },
                )
                .await,
            ),
        ),
    ] {
        assert_eq!(r.0, ttrpc::Code::NOT_FOUND, "{name}: {}", r.1);
    }
    assert_eq!(c.health(ctx(), &HealthRequest::new()).await.unwrap().status, "SERVING");
    for id in ["bad1", "bad2", "bad3", "bad4", "bad5"] {
        assert_nothing_left(&agent, id);
    }
}

#[tokio::test]
async fn user_rlimits_no_new_privileges_seccomp_and_read_only_root_apply() {
    if !root_or_skip("user_rlimits_no_new_privileges_seccomp_and_read_only_root_apply") {
        return;
    }
    let agent = HostAgent::start();
    let c = agent.client().await;
    let root = rootfs(&agent, "sec");
    for applet in ["id", "grep", "mkdir", "touch"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    let script = "id -u; id -g; ulimit -n; grep NoNewPrivs /proc/self/status; grep CapEff /proc/self/status; \
                  mkdir /tmp/d 2>&1 || echo mkdir-denied; touch /x 2>&1 || echo root-read-only";
    let extra = json!({
        "root": { "readonly": true },
        "process": {
            "user": { "uid": 1000, "gid": 1000 },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 321, "soft": 321 }],
            "capabilities": { "bounding": [], "effective": [], "permitted": [] }
        },
        "linux": {
            "seccomp": {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64"],
                "syscalls": [{ "names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1 }]
            }
        }
    });
    create(&c, "sec", spec(&root, &["sh", "-c", script], extra)).await;
    start(&c, "sec").await;
    let out = read_all(&c, "sec", "", false).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..3], ["1000", "1000", "321"], "output: {out}");
    assert_eq!(lines[3].split_whitespace().collect::<Vec<_>>(), ["NoNewPrivs:", "1"], "output: {out}");
    assert_eq!(lines[4], "CapEff:\t0000000000000000", "output: {out}");
    assert!(
        out.contains("Operation not permitted") && out.contains("mkdir-denied"),
        "seccomp did not deny mkdir: {out}"
    );
    assert!(out.contains("root-read-only"), "the root was writable: {out}");
    assert_eq!(wait(&c, "sec", "").await.status, 0);
    remove(&c, "sec").await;
    assert_nothing_left(&agent, "sec");
}

/// A seccomp profile with privilege escalation allowed (`noNewPrivileges:
/// false`, what CRI sends by default) and no CAP_SYS_ADMIN, for the init
/// and for an exec: the filter loads (the engine must load it while it
/// still holds CAP_SYS_ADMIN) and is enforced.
#[tokio::test]
async fn a_seccomp_profile_applies_without_no_new_privileges() {
    if !root_or_skip("a_seccomp_profile_applies_without_no_new_privileges") {
        return;
    }
    let agent = HostAgent::start();
    let c = agent.client().await;
    let root = rootfs(&agent, "nnp");
    for applet in ["grep", "mkdir"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    let script = "grep -E 'NoNewPrivs|^Seccomp:' /proc/self/status; mkdir /tmp/d 2>&1 || echo mkdir-denied; \
                  read go";
    let extra = json!({
        "process": { "noNewPrivileges": false },
        "linux": {
            "seccomp": {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64"],
                "syscalls": [{ "names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1 }]
            }
        }
    });
    create(&c, "nnp", spec(&root, &["sh", "-c", script], extra)).await;
    start(&c, "nnp").await;
    let process = json!({ "args": ["sh", "-c", "mkdir /tmp/e 2>&1 || echo exec-mkdir-denied"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}, "noNewPrivileges": false });
    let exec = ExecProcessRequest {
        container_id: "nnp".into(),
        exec_id: "e1".into(),
        process: serde_json::to_vec(&process).unwrap(),
        ..Default::default()
    };
    c.exec_process(ctx(), &exec).await.unwrap_or_else(|e| panic!("exec with noNewPrivileges false: {e:?}"));
    let exec_out = read_all(&c, "nnp", "e1", false).await;
    let exec_err = read_all(&c, "nnp", "e1", true).await;
    let exec_status = wait(&c, "nnp", "e1").await.status;
    assert!(exec_out.contains("exec-mkdir-denied"), "the exec was not filtered ({exec_status}): {exec_out} {exec_err}");
    c.write_stdin(
        ctx(),
        &WriteStdinRequest { container_id: "nnp".into(), data: b"go\n".to_vec(), ..Default::default() },
    )
    .await
    .unwrap();
    let out = read_all(&c, "nnp", "", false).await;
    assert!(out.contains("NoNewPrivs:\t0"), "no_new_privs was set: {out}");
    assert!(out.contains("Seccomp:\t2"), "no filter: {out}");
    assert!(out.contains("mkdir-denied"), "seccomp did not deny mkdir: {out}");
    assert_eq!(wait(&c, "nnp", "").await.status, 0);
    remove(&c, "nnp").await;
    assert_nothing_left(&agent, "nnp");
}

/// Root propagation as containerd and Kubernetes name it (rshared, rslave,
/// rprivate) is taken; a name that is none of them is refused by name.
#[tokio::test]
async fn root_propagation_takes_the_recursive_names() {
    if !root_or_skip("root_propagation_takes_the_recursive_names") {
        return;
    }
    let agent = HostAgent::start();
    let c = agent.client().await;
    for (id, propagation) in [("prop-shared", "rshared"), ("prop-slave", "rslave"), ("prop-private", "rprivate")] {
        let root = rootfs(&agent, id);
        let s = spec(&root, &["true"], json!({ "linux": { "rootfsPropagation": propagation } }));
        create(&c, id, s).await;
        start(&c, id).await;
        assert_eq!(wait(&c, id, "").await.status, 0, "{propagation}");
        remove(&c, id).await;
        assert_nothing_left(&agent, id);
    }
    let root = rootfs(&agent, "prop-bad");
    let s = spec(&root, &["true"], json!({ "linux": { "rootfsPropagation": "sideways" } }));
    let (code, msg) = code_of(
        c.create_container(
            ctx(),
            &CreateContainerRequest { container_id: "prop-bad".into(), oci_spec: s, ..Default::default() },
        )
        .await,
    );
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("rootfsPropagation 'sideways'"), "{msg}");
    assert_nothing_left(&agent, "prop-bad");
}
