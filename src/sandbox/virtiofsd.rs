//! The virtio-fs daemon that serves a sandbox's shared directory to the
//! guest over vhost-user.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::helper::{wait_for_path, HelperProcess};
use crate::jailer::Jail;

/// The vhost-user socket's name in the socket directory.
pub const SOCKET: &str = "virtiofsd.sock";

pub struct Virtiofsd {
    process: HelperProcess,
    socket: PathBuf,
}

impl Virtiofsd {
    /// Starts virtiofsd on `shared_dir` with its socket in `socket_dir` and
    /// its log in `work_dir`, and waits for the socket. It stays root (it
    /// serves files of every owner) but in its own namespaces under its
    /// seccomp filter, and in the sandbox's cgroup.
    pub async fn start(
        program: &Path,
        shared_dir: &Path,
        read_only: bool,
        work_dir: &Path,
        socket_dir: &Path,
        jail: Option<&Jail>,
    ) -> Result<Self, String> {
        let socket = socket_dir.join(SOCKET);
        let mut cmd = Command::new(program);
        cmd.arg(format!("--socket-path={}", socket.display()))
            .arg(format!("--shared-dir={}", shared_dir.display()))
            // Its defaults, said aloud: a new mount, PID and network
            // namespace with only the shared directory in it, and a
            // seccomp filter that kills on anything else.
            .arg("--sandbox=namespace")
            .arg("--seccomp=kill")
            // The host may change the directory under the guest (later
            // containers' rootfs and volumes appear there), so no caching.
            .arg("--cache=never")
            .arg("--log-level=error");
        if read_only {
            cmd.arg("--readonly");
        }
        if let Some(jail) = jail {
            jail.join_cgroups(&mut cmd);
        }
        let mut process =
            HelperProcess::spawn("virtiofsd", cmd, &work_dir.join("virtiofsd.log")).map_err(|e| e.to_string())?;
        wait_for_path(&mut process, &socket, Duration::from_secs(10)).await?;
        Ok(Self { process, socket })
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// How virtiofsd ended, if it has.
    pub fn try_exit(&mut self) -> Option<crate::helper::HelperExit> {
        self.process.try_wait()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// virtiofsd exits by itself once the VM has gone; kill it if not.
    pub async fn stop(&mut self) {
        if self.process.wait_timeout(Duration::from_millis(500)).await.is_none() {
            self.process.terminate(Duration::from_millis(500)).await;
        }
    }
}
