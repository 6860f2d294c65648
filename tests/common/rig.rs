//! A CRI server of a benchmark's own, either way into runv (containerd's
//! CRI plugin with the `runv` handler, or `runv cri`), on a CNI bridge
//! network, with a census of the host that reads no runv record. Used by
//! the fault matrix and the concurrency benchmark (examples/), which bring
//! the `containerd`, `cri` and `registry` test helpers as modules of the
//! same names.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;

use crate::{containerd, cri, registry};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Via {
    Containerd,
    RunvCri,
}

/// The container every pod runs: it ignores SIGTERM, so a StopContainer
/// stays in flight for its whole grace period.
pub const APP: [&str; 3] = ["sh", "-c", "trap '' TERM; exec sleep 1000"];

/// A server (containerd or `runv cri`) with its client, image and network.
pub struct Rig {
    pub via: Via,
    /// The CRI runtime handler pods ask for (`runv`; `runc` for a baseline
    /// through containerd).
    pub handler: &'static str,
    pub ctd: Option<containerd::Containerd>,
    pub cri: Option<cri::CriServer>,
    pub rt: RuntimeServiceClient<Channel>,
    pub image: String,
    pub dir: PathBuf,
    pub log_dir: PathBuf,
    pub baseline: BTreeSet<String>,
}

/// A bridge network for `dir`'s pods on 10.`subnet`.0.0/24.
pub fn cni_conf(dir: &Path, subnet: u8) -> String {
    containerd::cni::bridge_conflist("runv-faults", &format!("runvbr{subnet}"), subnet, &dir.join("cni-ipam"))
        .to_string()
}

pub const CONFIG: &str = "debug_console = true\n";

impl Rig {
    pub async fn containerd(subnet: u8) -> Self {
        let ctd = containerd::Containerd::start_with_network(CONFIG, subnet);
        let rt = containerd::cri_client(&ctd.socket()).await;
        let dir = ctd.dir.path().to_path_buf();
        Self::finish(Via::Containerd, Some(ctd), None, rt, containerd::IMAGE.into(), dir).await
    }

    pub async fn runv_cri(reg: &registry::Registry, app: &str, pause: &str, subnet: u8) -> Self {
        let server = cri::CriServer::start(&reg.addr, &format!("{CONFIG}cri_sandbox_image = \"{pause}\""));
        let dir = server.dir.path().to_path_buf();
        std::fs::write(dir.join("net.d/10-runv-faults.conflist"), cni_conf(&dir, subnet)).unwrap();
        let channel = server.channel().await;
        ImageServiceClient::new(channel.clone())
            .pull_image(PullImageRequest {
                image: Some(ImageSpec { image: app.into(), ..Default::default() }),
                ..Default::default()
            })
            .await
            .expect("pulling into runv cri");
        let rt = RuntimeServiceClient::new(channel);
        Self::finish(Via::RunvCri, None, Some(server), rt, app.into(), dir).await
    }

    pub async fn finish(
        via: Via,
        ctd: Option<containerd::Containerd>,
        cri: Option<cri::CriServer>,
        rt: RuntimeServiceClient<Channel>,
        image: String,
        dir: PathBuf,
    ) -> Self {
        let log_dir = dir.join("pod-logs");
        std::fs::create_dir_all(&log_dir).unwrap();
        let mut rig = Rig { via, handler: "runv", ctd, cri, rt, image, dir, log_dir, baseline: BTreeSet::new() };
        // One whole pod first: images unpacked, the bridge and the address
        // store made; the census after it is the baseline.
        let (pod, config) = rig.run_pod("warm").await.unwrap_or_else(|e| panic!("warm-up pod: {e}\n{}", rig.log()));
        rig.run_app(&pod, &config).await.unwrap_or_else(|e| panic!("warm-up container: {e}\n{}", rig.log()));
        let removed = rig.remove_pod(&pod).await;
        assert!(removed.is_empty(), "removing the warm-up pod: {removed:?}");
        std::thread::sleep(Duration::from_secs(2));
        rig.baseline = rig.census();
        rig
    }

    pub fn name(&self) -> &'static str {
        match self.via {
            Via::Containerd => "containerd",
            Via::RunvCri => "runv cri",
        }
    }

    pub fn log(&self) -> String {
        let text = match (&self.ctd, &self.cri) {
            (Some(c), _) => c.log(),
            (_, Some(s)) => s.log(),
            _ => String::new(),
        };
        text.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    pub fn pod_config(&self, name: &str) -> PodSandboxConfig {
        containerd::networked_pod_config(name, &self.log_dir, DnsConfig::default())
    }

    pub async fn run_pod(&mut self, name: &str) -> Result<(String, PodSandboxConfig), String> {
        let config = self.pod_config(name);
        let id = self
            .rt
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: self.handler.into(),
            })
            .await
            .map_err(|e| format!("RunPodSandbox: {}", e.message()))?
            .into_inner()
            .pod_sandbox_id;
        Ok((id, config))
    }

    pub fn app_request(&self, pod: &str, config: &PodSandboxConfig) -> CreateContainerRequest {
        CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(ContainerConfig {
                image: Some(ImageSpec { image: self.image.clone(), ..Default::default() }),
                ..containerd::container_config("app", &APP)
            }),
            sandbox_config: Some(config.clone()),
        }
    }

    pub async fn run_app(&mut self, pod: &str, config: &PodSandboxConfig) -> Result<String, String> {
        create_and_start(self.rt.clone(), self.app_request(pod, config)).await
    }

    /// Kills the server (SIGKILL) and starts it again on its state.
    pub async fn crash_server(&mut self) {
        self.kill_server();
        self.restart_server().await;
    }

    /// Kills the server (SIGKILL); its shims and pods stay.
    pub fn kill_server(&mut self) {
        match self.via {
            Via::Containerd => self.ctd.as_mut().unwrap().crash(),
            Via::RunvCri => self.cri.as_mut().unwrap().crash(),
        }
    }

    /// Starts the killed server again on its state and reconnects.
    pub async fn restart_server(&mut self) {
        match self.via {
            Via::Containerd => {
                let ctd = self.ctd.as_mut().unwrap();
                ctd.relaunch();
                self.rt = containerd::cri_client(&ctd.socket()).await;
            }
            Via::RunvCri => {
                let server = self.cri.as_mut().unwrap();
                server.relaunch();
                self.rt = RuntimeServiceClient::new(server.channel().await);
            }
        }
        // containerd's CRI plugin answers "not initialized" until it has
        // recovered its pods: as a kubelet does, wait for it (up to 60 s).
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline
            && self.rt.list_pod_sandbox(ListPodSandboxRequest { filter: None }).await.is_err()
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The pod's guest ends from inside: root in the guest (the debug
    /// console, outside every container, with the sandbox container's
    /// busybox) reboots it at once.
    pub async fn end_guest(&self, pod: &str) -> Result<(), String> {
        let sandboxes = self.dir.join("run/sandboxes");
        let socket = std::fs::read_dir(&sandboxes)
            .map_err(|e| format!("{}: {e}", sandboxes.display()))?
            .flatten()
            .map(|e| e.path())
            .flat_map(|p| [p.join("jail").join(runv::sandbox::VSOCK_SOCKET), p.join(runv::sandbox::VSOCK_SOCKET)])
            .find(|p| p.exists())
            .ok_or("no sandbox vsock socket")?;
        let busybox = format!("/run/runv/shared/{pod}/rootfs/bin/busybox");
        let argv = [busybox, "reboot".into(), "-f".into()];
        // The guest may end before it answers.
        let _ = tokio::time::timeout(Duration::from_secs(5), runv::sandbox::debug_console::run(&socket, &argv)).await;
        Ok(())
    }

    /// The pods named `name`.
    pub async fn pods_named(&mut self, name: &str) -> Result<Vec<PodSandbox>, String> {
        let items = self
            .rt
            .list_pod_sandbox(ListPodSandboxRequest { filter: None })
            .await
            .map_err(|e| format!("ListPodSandbox: {}", e.message()))?
            .into_inner()
            .items;
        Ok(items.into_iter().filter(|p| p.metadata.as_ref().is_some_and(|m| m.name == name)).collect())
    }

    pub async fn containers_of(&mut self, pod: &str) -> Result<Vec<Container>, String> {
        containers_of(&mut self.rt, pod).await
    }

    /// Stops and removes the pod and its containers; what failed.
    pub async fn remove_pod(&mut self, pod: &str) -> Vec<String> {
        remove_pod(&mut self.rt, pod).await
    }

    /// What is on the host, read from the kernel and the file system, not
    /// from runv's records.
    pub fn census(&self) -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        let needle = self.dir.to_string_lossy().into_owned();
        let servers: Vec<i32> =
            self.ctd.iter().map(|c| c.child.id() as i32).chain(self.cri.iter().map(|s| s.child.id() as i32)).collect();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            let cmdline = String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).unwrap_or_default())
                .replace('\0', " ");
            let argv0 = cmdline.split(' ').next().unwrap_or_default();
            let name = Path::new(argv0).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            let ours = ["qemu-system", "runv-vmm", "virtiofsd", "vhost-device-vsock", "containerd-shim"]
                .iter()
                .any(|p| name.starts_with(p));
            if !servers.contains(&pid) && (ours || cmdline.contains(&needle)) {
                found.insert(format!("process {pid} {name}"));
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for point in mounts.lines().filter_map(|l| l.split(' ').nth(4)) {
            if point.contains(&needle) || point.starts_with("/run/netns/") {
                found.insert(format!("mount {point}"));
            }
        }
        for (kind, dir) in [("link", "/sys/class/net"), ("netns", "/run/netns"), ("shim socket", "/run/containerd/s")] {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                found.insert(format!("{kind} {}", e.file_name().to_string_lossy()));
            }
        }
        for e in std::fs::read_dir("/sys/block").into_iter().flatten().flatten() {
            if e.path().join("loop/backing_file").exists() {
                found.insert(format!("loop device {}", e.file_name().to_string_lossy()));
            }
        }
        walk(Path::new("/sys/fs/cgroup"), 4, true, &mut |p| {
            found.insert(format!("cgroup {}", p.display()));
        });
        let mut files = vec![self.dir.join("run"), self.dir.join("cni-ipam")];
        match self.via {
            Via::RunvCri => files.extend(["state/pods", "state/containers"].map(|d| self.dir.join(d))),
            Via::Containerd => files.extend(
                [
                    "state/io.containerd.runtime.v2.task",
                    "root/io.containerd.grpc.v1.cri/sandboxes",
                    "root/io.containerd.grpc.v1.cri/containers",
                    "state/io.containerd.grpc.v1.cri",
                ]
                .map(|d| self.dir.join(d)),
            ),
        }
        for top in files {
            walk(&top, 12, false, &mut |p| {
                found.insert(format!("file {}", p.display()));
            });
        }
        found
    }

    /// The census, once it matches the baseline or 90 s have passed (a
    /// shim its containerd lost goes after 60 s idle); what it has beyond
    /// the baseline.
    pub fn leaked(&self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let extra: Vec<String> = self.census().difference(&self.baseline).cloned().collect();
            if extra.is_empty() || Instant::now() > deadline {
                return extra;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// Calls `f` on every entry below `dir` down to `depth` levels
/// (directories only when `dirs_only`), without following links.
pub fn walk(dir: &Path, depth: usize, dirs_only: bool, f: &mut dyn FnMut(&Path)) {
    if depth == 0 {
        return;
    }
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            f(&e.path());
            walk(&e.path(), depth - 1, dirs_only, f);
        } else if !dirs_only {
            f(&e.path());
        }
    }
}

/// The default rootfs pushed to `reg` as a busybox image and a pause
/// image (for `runv cri`); their references.
pub async fn push_images(reg: &registry::Registry) -> (String, String) {
    let rootfs = registry::dir_layer(&Path::new(containerd::SHARE_DIR).join("rootfs"));
    let app = registry::push_with_cmd(reg, "runv/busybox:1", std::slice::from_ref(&rootfs), &["sh"]).await;
    let pause = registry::push_with_cmd(reg, "runv/pause:1", &[rootfs], &["sleep", "2147483647"]).await;
    (app, pause)
}

pub async fn create_and_start(
    mut rt: RuntimeServiceClient<Channel>,
    req: CreateContainerRequest,
) -> Result<String, String> {
    let id = rt
        .create_container(req)
        .await
        .map_err(|e| format!("CreateContainer: {}", e.message()))?
        .into_inner()
        .container_id;
    rt.start_container(StartContainerRequest { container_id: id.clone() })
        .await
        .map_err(|e| format!("StartContainer: {}", e.message()))?;
    Ok(id)
}

pub async fn containers_of(rt: &mut RuntimeServiceClient<Channel>, pod: &str) -> Result<Vec<Container>, String> {
    let filter = ContainerFilter { pod_sandbox_id: pod.into(), ..Default::default() };
    Ok(rt
        .list_containers(ListContainersRequest { filter: Some(filter) })
        .await
        .map_err(|e| format!("ListContainers: {}", e.message()))?
        .into_inner()
        .containers)
}

/// Stops and removes pod `pod` and its containers; what failed.
pub async fn remove_pod(rt: &mut RuntimeServiceClient<Channel>, pod: &str) -> Vec<String> {
    let mut failed = Vec::new();
    let containers = containers_of(rt, pod).await.unwrap_or_else(|e| {
        failed.push(e);
        Vec::new()
    });
    for c in containers {
        let stop = StopContainerRequest { container_id: c.id.clone(), timeout: 0 };
        if let Err(e) = rt.stop_container(stop).await {
            failed.push(format!("StopContainer: {}", e.message()));
        }
        // containerd's CRI plugin may refuse a container whose task has
        // ended but whose exit it has not yet recorded ("still running"):
        // kubelet tries again, and so does this, for up to 10 s.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match rt.remove_container(RemoveContainerRequest { container_id: c.id.clone() }).await {
                Ok(_) => break,
                Err(e) if e.message().contains("still running") && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let stop = StopContainerRequest { container_id: c.id.clone(), timeout: 0 };
                    let _ = rt.stop_container(stop).await;
                }
                Err(e) => {
                    failed.push(format!("RemoveContainer: {}", e.message()));
                    break;
                }
            }
        }
    }
    if let Err(e) = rt.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod.into() }).await {
        failed.push(format!("StopPodSandbox: {}", e.message()));
    }
    if let Err(e) = rt.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod.into() }).await {
        failed.push(format!("RemovePodSandbox: {}", e.message()));
    }
    failed
}
