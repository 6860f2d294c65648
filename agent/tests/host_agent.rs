//! The agent run on the host as an ordinary process on a Unix socket,
//! driven over ttrpc exactly as the host side drives it in a guest.

mod common;

use std::time::{Duration, Instant};

use common::{ctx, root_or_skip, HostAgent};
use runv_proto::agent::*;
use runv_proto::agent_ttrpc::AgentClient;

fn err_code(e: ttrpc::Error) -> ttrpc::Code {
    match e {
        ttrpc::Error::RpcStatus(s) => s.code(),
        other => panic!("expected a status, got {other:?}"),
    }
}

fn run_req(exec_id: &str, args: &[&str]) -> RunProcessRequest {
    RunProcessRequest {
        exec_id: exec_id.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn read_all(c: &AgentClient, exec_id: &str, stderr: bool) -> Vec<u8> {
    let mut all = Vec::new();
    loop {
        let req = ReadStreamRequest { exec_id: exec_id.into(), len: 4096, ..Default::default() };
        let resp = if stderr { c.read_stderr(ctx(), &req).await } else { c.read_stdout(ctx(), &req).await }.unwrap();
        if resp.eof {
            return all;
        }
        all.extend_from_slice(&resp.data);
    }
}

async fn wait(c: &AgentClient, exec_id: &str) -> WaitProcessResponse {
    c.wait_process(ctx(), &WaitProcessRequest { exec_id: exec_id.into(), ..Default::default() }).await.unwrap()
}

#[tokio::test]
async fn health_and_guest_details_answer() {
    let agent = HostAgent::start();
    let c = agent.client().await;
    let h = c.health(ctx(), &HealthRequest::new()).await.unwrap();
    assert_eq!(h.status, "SERVING");
    let d = c.guest_details(ctx(), &GuestDetailsRequest::new()).await.unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(d.kernel_release, host.trim());
    assert_eq!(d.agent_version, env!("CARGO_PKG_VERSION"));
    let mem = d.memory.unwrap();
    assert!(mem.total_kib > 0 && mem.free_kib <= mem.total_kib, "{mem:?}");
}

#[tokio::test]
async fn a_process_streams_stdout_and_stderr_and_reports_its_exit_code() {
    if !root_or_skip("a_process_streams_stdout_and_stderr_and_reports_its_exit_code") {
        return;
    }
    let agent = HostAgent::start();
    let c = agent.client().await;
    c.run_process(ctx(), &run_req("p1", &["sh", "-c", "for i in 1 2 3; do echo out$i; done; echo oops >&2; exit 5"]))
        .await
        .unwrap();
    let (out, err) = tokio::join!(read_all(&c, "p1", false), read_all(&c, "p1", true));
    assert_eq!(String::from_utf8(out).unwrap(), "out1\nout2\nout3\n");
    assert_eq!(String::from_utf8(err).unwrap(), "oops\n");
    let w = wait(&c, "p1").await;
    assert_eq!((w.status, w.signal), (5, 0));
    c.remove_process(ctx(), &RemoveProcessRequest { exec_id: "p1".into(), ..Default::default() }).await.unwrap();
    let gone =
        c.wait_process(ctx(), &WaitProcessRequest { exec_id: "p1".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err_code(gone), ttrpc::Code::NOT_FOUND);
}

#[tokio::test]
async fn stdin_reaches_the_process_and_closing_it_ends_the_input() {
    if !root_or_skip("stdin_reaches_the_process_and_closing_it_ends_the_input") {
        return;
    }
    let agent = HostAgent::start();
    let c = agent.client().await;
    c.run_process(ctx(), &run_req("cat", &["cat"])).await.unwrap();
    for chunk in ["hello ", "agent\n"] {
        let r = c
            .write_stdin(
                ctx(),
                &WriteStdinRequest { exec_id: "cat".into(), data: chunk.as_bytes().to_vec(), ..Default::default() },
            )
            .await
            .unwrap();
        assert_eq!(r.len as usize, chunk.len());
    }
    c.close_stdin(ctx(), &CloseStdinRequest { exec_id: "cat".into(), ..Default::default() }).await.unwrap();
    assert_eq!(read_all(&c, "cat", false).await, b"hello agent\n");
    assert_eq!(wait(&c, "cat").await.status, 0);
}

#[tokio::test]
async fn signals_end_a_process_with_128_plus_the_signal() {
    if !root_or_skip("signals_end_a_process_with_128_plus_the_signal") {
        return;
    }
    let agent = HostAgent::start();
    let c = agent.client().await;
    c.run_process(ctx(), &run_req("sleep", &["sleep", "100"])).await.unwrap();
    c.signal_process(ctx(), &SignalProcessRequest { exec_id: "sleep".into(), signal: 15, ..Default::default() })
        .await
        .unwrap();
    let w = wait(&c, "sleep").await;
    assert_eq!((w.status, w.signal), (143, 15));
    let again = c
        .signal_process(ctx(), &SignalProcessRequest { exec_id: "sleep".into(), signal: 15, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err_code(again), ttrpc::Code::FAILED_PRECONDITION);
}

#[tokio::test]
async fn a_terminal_process_gets_a_pty_that_follows_resizes() {
    if !root_or_skip("a_terminal_process_gets_a_pty_that_follows_resizes") {
        return;
    }
    let agent = HostAgent::start();
    let c = agent.client().await;
    let mut req = run_req("tty", &["sh", "-c", "read go; stty size"]);
    req.terminal = true;
    req.rows = 24;
    req.cols = 80;
    c.run_process(ctx(), &req).await.unwrap();
    c.tty_win_resize(ctx(), &TtyWinResizeRequest { exec_id: "tty".into(), rows: 33, cols: 101, ..Default::default() })
        .await
        .unwrap();
    c.write_stdin(ctx(), &WriteStdinRequest { exec_id: "tty".into(), data: b"go\n".to_vec(), ..Default::default() })
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&read_all(&c, "tty", false).await).into_owned();
    assert!(out.contains("33 101"), "output: {out:?}");
    assert_eq!(wait(&c, "tty").await.status, 0);
}

#[tokio::test]
async fn a_process_in_a_root_directory_sees_only_that_root() {
    if !root_or_skip("a_process_in_a_root_directory_sees_only_that_root") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("bin")).unwrap();
    std::fs::create_dir_all(root.path().join("proc")).unwrap();
    std::fs::copy("/bin/busybox", root.path().join("bin/busybox")).unwrap();
    std::fs::write(root.path().join("marker"), "inside\n").unwrap();
    let agent = HostAgent::start();
    let c = agent.client().await;
    let mut req = run_req(
        "ls",
        &[
            "/bin/busybox",
            "sh",
            "-c",
            "/bin/busybox ls / ; /bin/busybox cat /marker; /bin/busybox test -e /proc/self/status && echo proc",
        ],
    );
    req.root = root.path().to_string_lossy().into_owned();
    c.run_process(ctx(), &req).await.unwrap();
    let out = String::from_utf8(read_all(&c, "ls", false).await).unwrap();
    assert_eq!(out, "bin\nmarker\nproc\ninside\nproc\n");
    assert_eq!(wait(&c, "ls").await.status, 0);
    // The proc mount lived in the process's own mount namespace only.
    let mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", agent.child.id())).unwrap();
    assert!(!mounts.contains(&*root.path().to_string_lossy()), "a mount leaked: {mounts}");
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_the_agent_keeps_serving() {
    if !root_or_skip("bad_requests_get_clear_errors_and_the_agent_keeps_serving") {
        return;
    }
    let agent = HostAgent::start();
    let c = agent.client().await;
    let cases: Vec<(RunProcessRequest, ttrpc::Code, &str)> = vec![
        (run_req("nf", &["no-such-binary-anywhere"]), ttrpc::Code::NOT_FOUND, "executable file not found"),
        (run_req("", &["true"]), ttrpc::Code::INVALID_ARGUMENT, "exec_id is empty"),
        (run_req("noargs", &[]), ttrpc::Code::INVALID_ARGUMENT, "no command given"),
        (
            RunProcessRequest { env: vec!["NOEQUALS".into()], ..run_req("env", &["true"]) },
            ttrpc::Code::INVALID_ARGUMENT,
            "not KEY=VALUE",
        ),
        (
            RunProcessRequest { root: "relative/root".into(), ..run_req("rel", &["true"]) },
            ttrpc::Code::INVALID_ARGUMENT,
            "not an absolute path",
        ),
        (
            RunProcessRequest { root: "/no/such/root".into(), ..run_req("nr", &["true"]) },
            ttrpc::Code::INVALID_ARGUMENT,
            "not a directory",
        ),
        (
            RunProcessRequest { cwd: "/no/such/dir".into(), ..run_req("cwd", &["true"]) },
            ttrpc::Code::INVALID_ARGUMENT,
            "cwd",
        ),
    ];
    for (req, code, text) in cases {
        match c.run_process(ctx(), &req).await {
            Err(ttrpc::Error::RpcStatus(s)) => {
                assert_eq!(s.code(), code, "{req:?}: {}", s.message());
                assert!(s.message().contains(text), "{req:?}: {}", s.message());
            }
            other => panic!("{req:?}: expected an error status, got {other:?}"),
        }
    }
    c.run_process(ctx(), &run_req("dup", &["sleep", "5"])).await.unwrap();
    let dup = c.run_process(ctx(), &run_req("dup", &["true"])).await.unwrap_err();
    assert_eq!(err_code(dup), ttrpc::Code::ALREADY_EXISTS);
    let unknown =
        c.read_stdout(ctx(), &ReadStreamRequest { exec_id: "nobody".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err_code(unknown), ttrpc::Code::NOT_FOUND);
    let bad_signal = c
        .signal_process(ctx(), &SignalProcessRequest { exec_id: "dup".into(), signal: 9999, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err_code(bad_signal), ttrpc::Code::FAILED_PRECONDITION);
    let mount = c
        .mount_shared(
            ctx(),
            &MountSharedRequest { tag: "x".into(), mount_point: "/a/../b".into(), ..Default::default() },
        )
        .await
        .unwrap_err();
    assert_eq!(err_code(mount), ttrpc::Code::INVALID_ARGUMENT);
    assert_eq!(c.health(ctx(), &HealthRequest::new()).await.unwrap().status, "SERVING");
}

#[tokio::test]
async fn cut_off_and_garbage_frames_do_not_stop_the_agent() {
    use std::io::Write;
    let agent = HostAgent::start();
    // Half a ttrpc header, then hang up.
    let mut s = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
    s.write_all(&[0, 0, 0]).unwrap();
    drop(s);
    // A header announcing a huge frame, followed by junk.
    let mut s = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
    let _ = s.write_all(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, 1, 0]);
    let _ = s.write_all(&[0xAA; 64]);
    drop(s);
    let c = agent.client().await;
    assert_eq!(c.health(ctx(), &HealthRequest::new()).await.unwrap().status, "SERVING");
}

#[tokio::test]
async fn shutdown_stops_every_process_and_the_host_agent_exits() {
    if !root_or_skip("shutdown_stops_every_process_and_the_host_agent_exits") {
        return;
    }
    let mut agent = HostAgent::start();
    let c = agent.client().await;
    let pid = c.run_process(ctx(), &run_req("long", &["sleep", "100"])).await.unwrap().pid;
    c.shutdown(ctx(), &ShutdownRequest::new()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = agent.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the agent did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists() || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.contains(") Z ")
        },
        "process {pid} survived the shutdown"
    );
}

#[tokio::test]
async fn a_process_writes_on_while_nobody_reads_and_nothing_is_lost() {
    if !root_or_skip("a_process_writes_on_while_nobody_reads_and_nothing_is_lost") {
        return;
    }
    let agent = HostAgent::start();
    let c = agent.client().await;
    // 512 KiB, eight times a pipe's capacity, written before anyone reads.
    c.run_process(ctx(), &run_req("big", &["sh", "-c", "head -c 524288 /dev/zero; echo done >&2"])).await.unwrap();
    let w = tokio::time::timeout(Duration::from_secs(10), wait(&c, "big")).await;
    assert_eq!(w.expect("the writer blocked on an unread stdout").status, 0);
    assert_eq!(c.health(ctx(), &HealthRequest::new()).await.unwrap().status, "SERVING");
    let out = read_all(&c, "big", false).await;
    assert_eq!(out.len(), 524288);
    assert!(out.iter().all(|b| *b == 0));
    assert_eq!(read_all(&c, "big", true).await, b"done\n");
}
