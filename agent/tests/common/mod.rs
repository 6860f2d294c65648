//! The agent run on the host as an ordinary process, for its tests: own
//! state and shared directories, private mount and network namespaces, and a process
//! group that dropping it kills whole (helpers, pause process and all).

#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use runv_proto::agent_ttrpc::AgentClient;
use ttrpc::context;

pub struct HostAgent {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl HostAgent {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("runv-agent-test-").tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        std::fs::create_dir_all(dir.path().join("shared")).unwrap();
        // unshare execs the agent, which keeps the pid.
        let child = Command::new("unshare")
            .args(["--mount", "--net", "--propagation", "private", env!("CARGO_BIN_EXE_runv-agent")])
            .arg("--listen")
            .arg(format!("unix://{}", socket.display()))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--allow-dir")
            .arg(dir.path().join("shared"))
            .process_group(0)
            .spawn()
            .unwrap();
        // The socket file appears at bind, before the agent listens: wait
        // until a connection is accepted, not merely for the file.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "the agent did not listen on {}", socket.display());
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, dir, socket }
    }

    pub async fn client(&self) -> AgentClient {
        let c = ttrpc::r#async::Client::connect(&format!("unix://{}", self.socket.display())).await.unwrap();
        AgentClient::new(c)
    }

    pub fn shared(&self) -> PathBuf {
        self.dir.path().join("shared")
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        // SAFETY: signalling the process group we created.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

pub fn ctx() -> context::Context {
    context::with_timeout(Duration::from_secs(30).as_nanos() as i64)
}

/// Whether the test runs as root; prints why `test` skips otherwise, in
/// the `SKIP <test>: <reason>` form scripts/test.sh counts.
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIP {test}: the host agent tests need root (chroot, namespaces, cgroups)");
    }
    root
}

pub fn code_of<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> (ttrpc::Code, String) {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_string()),
        other => panic!("expected an error status, got {other:?}"),
    }
}
