//! Exec, ExecSync and Attach: processes started next to a container,
//! and their stdio.

use super::*;

/// Most bytes of one ExecSync stream kept (containerd's cap since
/// CVE-2022-31030): ExecSync answers in one message, so output past this is
/// read and dropped, never held.
pub const EXEC_SYNC_MAX_OUTPUT: usize = 16 << 20;

/// One ExecSync stream, bounded.
#[derive(Default)]
struct CappedOutput {
    data: Vec<u8>,
    dropped: u64,
}

impl CappedOutput {
    fn push(&mut self, d: &[u8]) {
        let room = EXEC_SYNC_MAX_OUTPUT.saturating_sub(self.data.len());
        let kept = d.len().min(room);
        self.data.extend_from_slice(&d[..kept]);
        self.dropped += (d.len() - kept) as u64;
    }
}

/// A process started with Exec, with its stdio.
pub struct ExecSession {
    shim: Shim,
    pub container_id: String,
    pub exec_id: String,
    dir: PathBuf,
    pub stdout: Option<tokio::net::unix::pipe::Receiver>,
    pub stderr: Option<tokio::net::unix::pipe::Receiver>,
    pub stdin: Option<tokio::net::unix::pipe::Sender>,
}

impl ExecSession {
    pub async fn wait(&self) -> Result<i32, Status> {
        Ok(self.shim.wait(&self.container_id, &self.exec_id).await?.0 as i32)
    }

    pub async fn kill(&self) {
        let _ = self.shim.kill(&self.container_id, &self.exec_id, libc::SIGKILL as u32, false).await;
    }

    pub async fn close_stdin(&self) {
        let _ = self.shim.close_stdin(&self.container_id, &self.exec_id).await;
    }

    pub async fn resize(&self, width: u32, height: u32) {
        let _ = self.shim.resize(&self.container_id, &self.exec_id, width, height).await;
    }

    /// Deletes the exec in the shim and its FIFOs.
    pub async fn close(self) {
        let _ = self.shim.delete(&self.container_id, &self.exec_id).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Runtime {
    /// Starts `cmd` in running container `id` with FIFOs for the stdio asked for.
    pub async fn exec(&self, id: &str, cmd: &[String], tty: bool, stdin: bool) -> Result<ExecSession, Status> {
        if cmd.is_empty() {
            return Err(Status::invalid_argument("exec: cmd is empty"));
        }
        let pod_id = {
            let st = self.state.lock().await;
            let c = Self::container_of(&st, id, "exec")?;
            if c.state != ContainerState::Running {
                return Err(Status::failed_precondition(format!("container {id} is not running")));
            }
            c.pod_id.clone()
        };
        let cdir = self.store.container_dir(id);
        let bundle = oci_spec::runtime::Spec::load(cdir.join("config.json"))
            .map_err(|e| Status::internal(format!("reading container {id}'s spec: {e}")))?;
        let mut process = bundle.process().clone().unwrap_or_default();
        process.set_args(Some(cmd.to_vec()));
        process.set_terminal(Some(tty));
        let exec_id = new_id()[..16].to_string();
        let dir = cdir.join(format!("exec-{exec_id}"));
        std::fs::create_dir_all(&dir).map_err(internal("creating the exec directory"))?;
        let session = async {
            mkfifo(&dir.join("stdout"))?;
            let out = logs::open_fifo_reader(&dir.join("stdout")).map_err(internal("opening stdout"))?;
            let err = if tty {
                None
            } else {
                mkfifo(&dir.join("stderr"))?;
                Some(logs::open_fifo_reader(&dir.join("stderr")).map_err(internal("opening stderr"))?)
            };
            let input = if stdin {
                mkfifo(&dir.join("stdin"))?;
                let tx = tokio::net::unix::pipe::OpenOptions::new()
                    .read_write(true)
                    .open_sender(dir.join("stdin"))
                    .map_err(internal("opening stdin"))?;
                Some(tx)
            } else {
                None
            };
            let shim = self.shim(&pod_id).await?;
            let spec_json = serde_json::to_vec(&process).map_err(|e| Status::internal(e.to_string()))?;
            let fifo = |name: &str, on: bool| if on { dir.join(name).display().to_string() } else { String::new() };
            let req = api::ExecProcessRequest {
                id: id.into(),
                exec_id: exec_id.clone(),
                terminal: tty,
                stdin: fifo("stdin", stdin),
                stdout: fifo("stdout", true),
                stderr: fifo("stderr", !tty),
                spec: Some(containerd_shim_protos::protobuf::well_known_types::any::Any {
                    type_url: PROCESS_TYPE_URL.into(),
                    value: spec_json,
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            };
            shim.exec(req).await?;
            if let Err(e) = shim.start(id, &exec_id).await {
                let _ = shim.delete(id, &exec_id).await;
                return Err(e.into());
            }
            Ok(ExecSession {
                shim,
                container_id: id.into(),
                exec_id: exec_id.clone(),
                dir: dir.clone(),
                stdout: Some(out),
                stderr: err,
                stdin: input,
            })
        }
        .await;
        if session.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        session
    }

    pub async fn exec_sync(&self, req: ExecSyncRequest) -> Result<ExecSyncResponse, Status> {
        let mut session = self.exec(&req.container_id, &req.cmd, false, false).await?;
        let (finish_tx, finish_rx) = watch::channel(false);
        let collect = |rx: Option<tokio::net::unix::pipe::Receiver>| {
            let buf = Arc::new(std::sync::Mutex::new(CappedOutput::default()));
            let sink_buf = buf.clone();
            let handle = rx.map(|rx| {
                logs::pump(rx, finish_rx.clone(), move |d: Vec<u8>| {
                    sink_buf.lock().unwrap().push(&d);
                    std::future::ready(())
                })
            });
            (buf, handle)
        };
        let (stdout, out_task) = collect(session.stdout.take());
        let (stderr, err_task) = collect(session.stderr.take());
        let waited = if req.timeout > 0 {
            match tokio::time::timeout(Duration::from_secs(req.timeout as u64), session.wait()).await {
                Ok(r) => r,
                Err(_) => {
                    session.kill().await;
                    let _ = tokio::time::timeout(Duration::from_secs(10), session.wait()).await;
                    finish_tx.send_replace(true);
                    session.close().await;
                    return Err(Status::deadline_exceeded(format!(
                        "ExecSync: {:?} did not finish within {} s",
                        req.cmd, req.timeout
                    )));
                }
            }
        } else {
            session.wait().await
        };
        finish_tx.send_replace(true);
        for t in [out_task, err_task].into_iter().flatten() {
            let _ = t.await;
        }
        session.close().await;
        let exit_code = waited?;
        let take = |b: Arc<std::sync::Mutex<CappedOutput>>| std::mem::take(&mut *b.lock().unwrap());
        let (stdout, mut stderr) = (take(stdout), take(stderr));
        let mut err = std::mem::take(&mut stderr.data);
        // The note goes on stderr, so stdout stays byte-exact up to the cap.
        for (name, dropped) in [("stdout", stdout.dropped), ("stderr", stderr.dropped)] {
            if dropped > 0 {
                err.extend_from_slice(
                    format!("\n[runv: ExecSync {name} truncated at {EXEC_SYNC_MAX_OUTPUT} bytes, {dropped} bytes dropped]\n")
                        .as_bytes(),
                );
            }
        }
        Ok(ExecSyncResponse { stdout: stdout.data, stderr: err, exit_code })
    }

    /// What an attached client needs: the container's output and stdin.
    pub async fn attach(
        &self,
        id: &str,
    ) -> Result<(broadcast::Receiver<(logs::Stream, Vec<u8>)>, Option<PathBuf>, watch::Receiver<bool>), Status> {
        let st = self.state.lock().await;
        let c = Self::container_of(&st, id, "attach")?;
        if c.state != ContainerState::Running {
            return Err(Status::failed_precondition(format!("container {id} is not running")));
        }
        let output = st.outputs.get(id).ok_or_else(|| Status::internal(format!("container {id} has no output")))?;
        let stdin = self.store.container_dir(id).join("stdin");
        Ok((output.subscribe(), stdin.exists().then_some(stdin), output.finished()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attack_exec_sync_output_is_capped() {
        println!("ATTACK ExecSync output past 16 MiB: tried");
        let mut out = CappedOutput::default();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..20 {
            out.push(&chunk);
        }
        assert_eq!(out.data.len(), EXEC_SYNC_MAX_OUTPUT);
        assert_eq!(out.dropped, 4 << 20);
        out.push(b"more");
        assert_eq!((out.data.len(), out.dropped), (EXEC_SYNC_MAX_OUTPUT, (4 << 20) + 4));
        println!("ATTACK ExecSync output past 16 MiB: held");
    }
}
