//! A containerd of the test's own (root, state, socket) with runv as a
//! runtime, the test images imported, and a census of what runv left.

#![allow(dead_code)]

#[path = "../../../tests/common/hypervisor.rs"]
pub mod hypervisor;
#[path = "../../../tests/common/scrape.rs"]
pub mod scrape;

#[path = "../../../tests/common/cni.rs"]
pub mod cni;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const SHARE_DIR: &str = "/usr/local/share/runv";
pub const IMAGE: &str = "docker.io/library/runv-test:latest";
/// The pod sandbox ("pause") image the CRI plugin is configured with.
pub const PAUSE_IMAGE: &str = "docker.io/library/runv-pause:latest";

/// containerd's CRI plugin with the `runv` runtime handler. CNI reads the
/// test directory's `net.d` (empty unless a test asks for a pod network, and
/// then pods without one use the host network); runc here cannot write a
/// negative oom_score_adj, hence restrict_oom_score_adj.
const CRI_CONFIG: &str = r#"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/library/runv-pause:latest"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runv]
      runtime_type = "io.containerd.runv.v2"
"#;

pub struct Containerd {
    pub child: Child,
    pub dir: tempfile::TempDir,
    /// The CNI bridge this containerd's pod network uses, removed on drop.
    pub bridge: Option<String>,
    /// The network namespaces that existed before; any other `cni-*` one
    /// is this containerd's, and a failed test's are removed on drop.
    pub netns_before: Vec<String>,
}

/// The names under /run/netns.
/// A running `runv monitor`, ended when dropped.
pub struct Monitor {
    child: Child,
    pub addr: String,
}

impl Monitor {
    pub fn scrape(&self) -> String {
        scrape::http_get(&self.addr, "/metrics")
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn netns_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Debian's containernetworking-plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

pub fn ready(test: &str) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_string());
    }
    for p in ["containerd", "ctr", "qemu-system-x86_64", "virtiofsd", "vhost-device-vsock"] {
        if runv::helper::find_program(Path::new(p)).is_none() {
            missing.push(p.to_string());
        }
    }
    for f in ["vmlinux", "agent.img", "rootfs"] {
        if !Path::new(SHARE_DIR).join(f).exists() {
            missing.push(format!("{SHARE_DIR}/{f}"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    eprintln!("SKIP {test}: needs {} (run scripts/install.sh as root)", missing.join(", "));
    false
}

impl Containerd {
    /// Starts containerd with the shim on its PATH, runv's runtime state
    /// inside the test directory, and the test image imported.
    pub fn start(runv_config: &str) -> Self {
        Self::start_with(runv_config, None)
    }

    /// As `start`, with a pod network: CNI's bridge plugin on bridge
    /// `runvbr<subnet>` with host-local addresses from 10.<subnet>.0.0/24
    /// (the host is 10.<subnet>.0.1).
    pub fn start_with_network(runv_config: &str, subnet: u8) -> Self {
        Self::start_with(runv_config, Some(subnet))
    }

    fn start_with(runv_config: &str, subnet: Option<u8>) -> Self {
        let dir = tempfile::Builder::new().prefix("runv-ctd-").tempdir().unwrap();
        let d = dir.path().to_path_buf();
        std::fs::create_dir_all(d.join("net.d")).unwrap();
        let bridge = subnet.map(|s| {
            let bridge = format!("runvbr{s}");
            let conf = cni::bridge_conflist("runv-test", &bridge, s, &d.join("cni-ipam"));
            std::fs::write(d.join("net.d/10-runv-test.conflist"), conf.to_string()).unwrap();
            bridge
        });
        std::fs::write(
            d.join("config.toml"),
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n[grpc]\n  address = \"{0}/containerd.sock\"\n[ttrpc]\n  address = \"{0}/containerd.sock.ttrpc\"\n{1}\n[plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"{CNI_BIN_DIR}\"\n  conf_dir = \"{0}/net.d\"\n",
                d.display(),
                CRI_CONFIG
            ),
        )
        .unwrap();
        // Tests know the shim's path; the benchmark (an example) finds it
        // beside its own directory in the same target dir.
        let shim = option_env!("CARGO_BIN_EXE_containerd-shim-runv-v2").map(PathBuf::from).unwrap_or_else(|| {
            let exe = std::env::current_exe().unwrap();
            exe.parent().and_then(Path::parent).unwrap().join("containerd-shim-runv-v2")
        });
        let shim_dir = shim.parent().unwrap().to_path_buf();
        std::fs::write(
            d.join("runv.toml"),
            format!(
                "runtime_dir = \"{}/run\"\n{}{runv_config}\n",
                d.display(),
                hypervisor::test_hypervisor(runv_config, &shim_dir)
            ),
        )
        .unwrap();
        std::fs::write(d.join("shim-dir"), shim_dir.to_string_lossy().as_bytes()).unwrap();
        let child = Command::new("true").spawn().unwrap();
        let mut ctd = Self { child, dir, bridge, netns_before: netns_names() };
        ctd.launch();
        // From this crate (shim-v2) or the root package (the CRI benchmark).
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let script = [root.join("../tests/fixtures/make-oci-image.sh"), root.join("tests/fixtures/make-oci-image.sh")]
            .into_iter()
            .find(|p| p.exists())
            .expect("tests/fixtures/make-oci-image.sh");
        for (name, cmd) in [(IMAGE, r#"["sh"]"#), (PAUSE_IMAGE, r#"["sleep","2147483647"]"#)] {
            let image = d.join("image.tar");
            let made = Command::new(&script)
                .arg(Path::new(SHARE_DIR).join("rootfs"))
                .arg(name)
                .arg(&image)
                .arg(cmd)
                .status()
                .unwrap();
            assert!(made.success(), "making the test image {name}");
            for ns in ["runv-test", "k8s.io"] {
                let out = Command::new("ctr")
                    .arg("-a")
                    .arg(ctd.socket())
                    .args(["-n", ns, "images", "import", image.to_str().unwrap()])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "ctr images import: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        ctd
    }

    /// Starts containerd on the test directory's config and state (the
    /// shim on its PATH) and waits until it answers.
    fn launch(&mut self) {
        let d = self.dir.path();
        let shim_dir = std::fs::read_to_string(d.join("shim-dir")).unwrap();
        let path = format!("{shim_dir}:{}", std::env::var("PATH").unwrap_or_default());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(d.join("containerd.log")).unwrap();
        self.child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .env("PATH", path)
            .env("RUNV_CONFIG", d.join("runv.toml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        // Wait for a connection to be accepted: the file appears at bind.
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            assert!(Instant::now() < deadline, "containerd did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `runv monitor` (this build's) on the test's runv config: the node's
    /// metrics endpoint for the shims this containerd runs.
    pub fn monitor(&self) -> Monitor {
        let d = self.dir.path();
        let shim_dir = std::fs::read_to_string(d.join("shim-dir")).unwrap();
        let log = d.join("monitor.log");
        let child = Command::new(Path::new(&shim_dir).join("runv"))
            .args(["monitor", "--metrics-address", "127.0.0.1:0"])
            .env("RUNV_CONFIG", d.join("runv.toml"))
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // Ended by its Drop however the wait below ends.
        let mut monitor = Monitor { child, addr: String::new() };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(addr) = scrape::metrics_address(&text) {
                monitor.addr = addr;
                return monitor;
            }
            assert!(Instant::now() < deadline, "runv monitor printed no address: {text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills containerd (SIGKILL: its shims and pods stay) and starts it
    /// again on the same state, as after a crash.
    pub fn crash_and_restart(&mut self) {
        self.crash();
        self.launch();
    }

    /// Kills containerd (SIGKILL); `relaunch` starts it again.
    pub fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(self.socket());
    }

    pub fn relaunch(&mut self) {
        self.launch();
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("-a").arg(self.socket()).args(["-n", "runv-test"]).args(args).stdin(Stdio::null());
        cmd
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args).output().unwrap()
    }

    /// What the test's sandboxes left: runv state, processes, mounts.
    pub fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        let run = self.dir.path().join("run");
        for e in std::fs::read_dir(run.join("sandboxes")).into_iter().flatten().flatten() {
            found.push(format!("{}", e.path().display()));
        }
        for ns in std::fs::read_dir(run.join("shim")).into_iter().flatten().flatten() {
            for e in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                found.push(format!("{}", e.path().display()));
            }
        }
        let needle = run.to_string_lossy().into_owned();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                found.push(format!("process {}", e.file_name().to_string_lossy()));
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        found.extend(mounts.lines().filter(|l| l.contains(&needle)).map(|l| format!("mount {l}")));
        found
    }

    /// Waits until `ctr task ls` shows the task stopped.
    pub fn wait_task_stopped(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ls = text(&self.ctr(&["task", "ls"]).stdout);
            if ls.lines().any(|l| l.starts_with(id) && l.contains("STOPPED")) {
                return;
            }
            assert!(Instant::now() < deadline, "task {id} did not stop: {ls}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn assert_clean(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.leftovers().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let left = self.leftovers();
        assert!(left.is_empty(), "left behind: {left:#?}\ncontainerd log: {}", self.log());
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Whatever a failed test left: no shim may outlive its containerd.
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
        runv_unmount_below(self.dir.path());
        if let Some(bridge) = &self.bridge {
            // Pods a failed test left: their processes (runc's too) and
            // network namespaces.
            for ns in netns_names() {
                if ns.starts_with("cni-") && !self.netns_before.contains(&ns) {
                    let pids = Command::new("ip").args(["netns", "pids", &ns]).output();
                    for pid in pids.map(|o| text(&o.stdout)).unwrap_or_default().split_whitespace() {
                        if let Ok(pid) = pid.parse::<i32>() {
                            // SAFETY: signalling a process of this test's pod.
                            unsafe { libc::kill(pid, libc::SIGKILL) };
                        }
                    }
                    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
                }
            }
            let _ = Command::new("ip").args(["link", "del", bridge]).output();
        }
    }
}

fn runv_unmount_below(dir: &Path) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|p| p.starts_with(&*dir.to_string_lossy()))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").arg("-l").arg(p).status();
    }
}

/// The processes of a test's sandboxes: those whose command line (or
/// working directory) mentions `needle` and whose program
/// (its file name) starts with `prefix`; a jailed VMM's reaper is left out
/// (the VM is the VMM itself).
pub fn sandbox_processes(needle: &str, prefix: &str) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline =
            String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).unwrap_or_default()).replace('\0', " ");
        let argv0 = cmdline.split(' ').next().unwrap_or_default();
        let name = Path::new(argv0).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let reaper = hypervisor::is_vmm_reaper(&e.path());
        // A jailed helper names its sockets relative to its jail directory,
        // its working directory.
        let cwd = std::fs::read_link(e.path().join("cwd")).unwrap_or_default();
        let ours = cmdline.contains(needle) || cwd.starts_with(needle);
        if ours && name.starts_with(prefix) && !reaper {
            found.push((pid, name));
        }
    }
    found
}

/// The first process whose command line (arguments joined by spaces)
/// matches.
pub fn find_process(matches: impl Fn(&str) -> bool) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let cmdline = text(&std::fs::read(e.path().join("cmdline")).unwrap_or_default()).replace('\0', " ");
        let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
        matches(&cmdline).then_some(pid)
    })
}

/// The child's output once it ends within `limit`; `None` (and the child
/// killed) when it does not.
pub fn output_within(mut child: std::process::Child, limit: Duration) -> Option<Output> {
    let deadline = Instant::now() + limit;
    while child.try_wait().ok()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().ok()
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// --- a kubelet-like CRI client -----------------------------------------------

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint, Uri};

pub async fn cri_client(socket: &Path) -> RuntimeServiceClient<Channel> {
    let socket = socket.to_path_buf();
    let channel = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
        }))
        .await
        .expect("connecting to containerd's CRI service");
    RuntimeServiceClient::new(channel)
}

pub fn pod_config(name: &str, log_dir: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: format!("{name}-host"),
        log_directory: log_dir.to_string_lossy().into_owned(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                // The host network: no netns, so the VM gets no network device.
                namespace_options: Some(NamespaceOption { network: NamespaceMode::Node as i32, ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A pod on the pod network (CNI), with its own DNS settings.
pub fn networked_pod_config(name: &str, log_dir: &Path, dns: DnsConfig) -> PodSandboxConfig {
    let mut config = pod_config(name, log_dir);
    config.dns_config = Some(dns);
    config.linux = Some(LinuxPodSandboxConfig {
        security_context: Some(LinuxSandboxSecurityContext {
            namespace_options: Some(NamespaceOption { network: NamespaceMode::Pod as i32, ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    });
    config
}

pub fn container_config(name: &str, args: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(ImageSpec { image: IMAGE.into(), ..Default::default() }),
        command: args.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

/// Times RunPodSandbox -> CreateContainer -> StartContainer until the
/// container reports running, then stops and removes the pod (untimed).
pub async fn time_pod_to_running(
    cri: &mut RuntimeServiceClient<Channel>,
    handler: &str,
    config: PodSandboxConfig,
    container: ContainerConfig,
) -> Duration {
    try_time_pod_to_running(cri, handler, config, container).await.unwrap_or_else(|e| panic!("{e}"))
}

/// `time_pod_to_running`, with a failed step returned as an error naming
/// it; the pod, if it was made, is removed either way.
pub async fn try_time_pod_to_running(
    cri: &mut RuntimeServiceClient<Channel>,
    handler: &str,
    config: PodSandboxConfig,
    container: ContainerConfig,
) -> Result<Duration, String> {
    let started = Instant::now();
    let pod = cri
        .run_pod_sandbox(RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: handler.into() })
        .await
        .map_err(|e| format!("RunPodSandbox: {}", e.message()))?
        .into_inner()
        .pod_sandbox_id;
    let result = async {
        let id = cri
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container),
                sandbox_config: Some(config),
            })
            .await
            .map_err(|e| format!("CreateContainer: {}", e.message()))?
            .into_inner()
            .container_id;
        let running = async {
            cri.start_container(StartContainerRequest { container_id: id.clone() })
                .await
                .map_err(|e| format!("StartContainer: {}", e.message()))?;
            loop {
                let status = cri
                    .container_status(ContainerStatusRequest { container_id: id.clone(), verbose: false })
                    .await
                    .map_err(|e| format!("ContainerStatus: {}", e.message()))?
                    .into_inner()
                    .status
                    .ok_or("ContainerStatus: no status")?;
                if status.state == ContainerState::ContainerRunning as i32 {
                    return Ok::<_, String>(started.elapsed());
                }
                if status.state == ContainerState::ContainerExited as i32 {
                    return Err(format!("the container exited: {} {}", status.reason, status.message));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        .await;
        let _ = cri.stop_container(StopContainerRequest { container_id: id.clone(), timeout: 0 }).await;
        let _ = cri.remove_container(RemoveContainerRequest { container_id: id }).await;
        running
    }
    .await;
    let _ = cri.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod.clone() }).await;
    let _ = cri.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod }).await;
    result
}

/// The median of the benchmarks' samples.
pub fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}
