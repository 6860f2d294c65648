//! A `runv cri` of the test's own (config, state, socket in a temporary
//! directory) and a kubelet-like client for it.

#[path = "hypervisor.rs"]
pub mod hypervisor;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

pub struct CriServer {
    pub child: Child,
    pub dir: tempfile::TempDir,
    /// More arguments of `runv cri` (after `--listen`).
    pub args: Vec<String>,
}

/// The `runv` binary of this build (tests know it; an example finds it
/// beside its own directory in the same target dir).
pub fn runv_path() -> PathBuf {
    option_env!("CARGO_BIN_EXE_runv").map(PathBuf::from).unwrap_or_else(|| {
        let exe = std::env::current_exe().unwrap();
        exe.parent().and_then(Path::parent).unwrap().join("runv")
    })
}

/// The shim beside `runv` (the same build), else the installed one.
pub fn shim_path() -> PathBuf {
    let sibling = runv_path().with_file_name("containerd-shim-runv-v2");
    if sibling.is_file() {
        return sibling;
    }
    PathBuf::from("containerd-shim-runv-v2")
}

impl CriServer {
    /// Starts `runv cri` with its state in a fresh directory; `extra` is
    /// more config (TOML lines).
    pub fn start(insecure: &str, extra: &str) -> Self {
        Self::start_with_args(insecure, extra, &[])
    }

    /// As `start`, with more arguments of `runv cri`.
    pub fn start_with_args(insecure: &str, extra: &str, args: &[&str]) -> Self {
        let dir = tempfile::Builder::new().prefix("runv-cri-").tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("net.d")).unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "runtime_dir = \"{0}/run\"\ncri_image_root = \"{0}/images\"\ncri_state_root = \"{0}/state\"\n\
                 cni_conf_dir = \"{0}/net.d\"\ncri_shim = \"{1}\"\ninsecure_registries = [\"{insecure}\"]\n{2}{extra}\n",
                dir.path().display(),
                shim_path().display(),
                hypervisor::test_hypervisor(extra, runv_path().parent().unwrap()),
            ),
        )
        .unwrap();
        let args = args.iter().map(|a| a.to_string()).collect();
        let mut server = CriServer { child: Command::new("true").spawn().unwrap(), dir, args };
        server.launch();
        server
    }

    fn launch(&mut self) {
        let socket = self.socket();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("cri.log")).unwrap();
        self.child = Command::new(runv_path())
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .arg("cri")
            .arg("--listen")
            .arg(&socket)
            .args(&self.args)
            .env_remove("RUNV_LOG")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "runv cri did not listen: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (SIGTERM) and starts it again on the same state.
    pub fn restart(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        self.launch();
    }

    /// Kills the server (SIGKILL: no word to its shims or pods) and starts
    /// it again on the same state, as after a crash.
    pub fn crash_and_restart(&mut self) {
        self.crash();
        self.launch();
    }

    /// Kills the server (SIGKILL); `relaunch` starts it again.
    pub fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn relaunch(&mut self) {
        self.launch();
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("cri.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("cri.log")).unwrap_or_default()
    }

    pub async fn channel(&self) -> Channel {
        let socket = self.socket();
        Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
            }))
            .await
            .unwrap()
    }

    /// What the server's pods left: state directories, processes, mounts.
    pub fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        let state = self.dir.path().join("state");
        for kind in ["pods", "containers"] {
            for e in std::fs::read_dir(state.join(kind)).into_iter().flatten().flatten() {
                found.push(format!("{}", e.path().display()));
            }
        }
        let run = self.dir.path().join("run");
        for e in std::fs::read_dir(run.join("sandboxes")).into_iter().flatten().flatten() {
            found.push(format!("{}", e.path().display()));
        }
        for ns in std::fs::read_dir(run.join("shim")).into_iter().flatten().flatten() {
            for e in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                found.push(format!("{}", e.path().display()));
            }
        }
        let needle = self.dir.path().to_string_lossy().into_owned();
        let server = self.child.id().to_string();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if name != server && String::from_utf8_lossy(&cmdline).contains(&needle) && name.parse::<u32>().is_ok() {
                found.push(format!("process {name}: {}", String::from_utf8_lossy(&cmdline).replace('\0', " ")));
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        found.extend(mounts.lines().filter(|l| l.contains(&needle)).map(|l| format!("mount {l}")));
        found
    }

    /// Waits up to 30 s for `leftovers` to come back empty and returns what remains.
    pub fn settled_leftovers(&self) -> Vec<String> {
        // A VM's teardown under nested virtualization (L1) can take more
        // than seconds; something leaked stays past any wait.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.leftovers().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.leftovers()
    }
}

/// Prints the last lines of every log under `dir` (the server's, each
/// sandbox's console, VMM and helper logs), for a test that failed.
fn print_log_tails(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let path = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            print_log_tails(&path);
        } else if path.extension().is_some_and(|x| x == "log") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- {} (last lines)", path.display());
            for l in &lines[lines.len().saturating_sub(15)..] {
                eprintln!("{l}");
            }
        }
    }
}

impl Drop for CriServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_log_tails(self.dir.path());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Whatever a failed test left: no shim or VM may outlive it.
        let needle = self.dir.path().to_string_lossy().into_owned();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                if let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() {
                    // SAFETY: signalling a process of this test.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        runv::helper::unmount_below(self.dir.path());
    }
}

/// A pod's config as a kubelet sends the simplest one: its name and
/// namespace (uid `uid-<name>`), its logs under `log_dir`.
pub fn pod_config(name: &str, namespace: &str, log_dir: &Path) -> k8s_cri::v1::PodSandboxConfig {
    k8s_cri::v1::PodSandboxConfig {
        metadata: Some(k8s_cri::v1::PodSandboxMetadata {
            name: name.into(),
            namespace: namespace.into(),
            uid: format!("uid-{name}"),
            attempt: 0,
        }),
        log_directory: log_dir.display().to_string(),
        ..Default::default()
    }
}

/// Pulls `image` into the server behind `channel`.
pub async fn pull(channel: &Channel, image: &str) {
    let req = k8s_cri::v1::PullImageRequest {
        image: Some(k8s_cri::v1::ImageSpec { image: image.into(), ..Default::default() }),
        ..Default::default()
    };
    k8s_cri::v1::image_service_client::ImageServiceClient::new(channel.clone())
        .pull_image(req)
        .await
        .unwrap_or_else(|e| panic!("PullImage {image}: {e}"));
}

/// Runs a pod with the `runv` handler; panics with the server's log when
/// it fails. Returns the pod's id.
pub async fn run_pod(
    rt: &mut k8s_cri::v1::runtime_service_client::RuntimeServiceClient<Channel>,
    cri: &CriServer,
    config: &k8s_cri::v1::PodSandboxConfig,
) -> String {
    let req = k8s_cri::v1::RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: "runv".into() };
    rt.run_pod_sandbox(req)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", cri.log()))
        .into_inner()
        .pod_sandbox_id
}

/// Creates and starts a container in `pod`; panics with the server's log
/// when either fails. Returns the container's id.
pub async fn start_container(
    rt: &mut k8s_cri::v1::runtime_service_client::RuntimeServiceClient<Channel>,
    cri: &CriServer,
    pod: &str,
    pod_config: &k8s_cri::v1::PodSandboxConfig,
    config: k8s_cri::v1::ContainerConfig,
) -> String {
    let name = config.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default();
    let id = rt
        .create_container(k8s_cri::v1::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}\n{}", cri.log()))
        .into_inner()
        .container_id;
    rt.start_container(k8s_cri::v1::StartContainerRequest { container_id: id.clone() })
        .await
        .unwrap_or_else(|e| panic!("StartContainer {name}: {e}\n{}", cri.log()));
    id
}
