//! CRI conformance, as a table: the same specs (what Kubernetes expects of
//! a pod) run against containerd's CRI plugin with the `runc` handler (the
//! baseline), containerd with the `runv` handler, and `runv cri`. Each
//! spec states what each path must do; where a VM cannot do what runc
//! does, it states what runv does instead (the rows of the README table
//! "How runv pods differ from runc pods") and that is checked too.
//! Prints one row per spec, then `N passed, N failed` and exits non-zero
//! on a failure. Run by tests/bench/conformance.sh.
//!
//! Every id is containerd's or runv cri's own (64 hex digits); every
//! container is driven through the CRI only.

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
#[path = "../tests/common/spdy.rs"]
mod spdy;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;

#[derive(Clone, Copy, PartialEq)]
enum Via {
    Runc,
    ContainerdRunv,
    RunvCri,
}

impl Via {
    fn label(self) -> &'static str {
        match self {
            Via::Runc => "containerd+runc",
            Via::ContainerdRunv => "containerd+runv",
            Via::RunvCri => "runv cri",
        }
    }
    fn is_runv(self) -> bool {
        self != Via::Runc
    }
}

/// One CRI endpoint and what a pod on it needs.
struct Target {
    path: Via,
    rt: RuntimeServiceClient<Channel>,
    handler: &'static str,
    image: String,
    log_dir: PathBuf,
    /// The default pod: (id, config), made on first use.
    pod: Option<(String, PodSandboxConfig)>,
    serial: u32,
}

type Outcome = Result<(), String>;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Target {
    fn pod_config(&mut self, name: &str) -> PodSandboxConfig {
        self.serial += 1;
        // Unique per path: two paths share one containerd.
        let name = format!("{name}-{}-{}", self.handler, self.serial);
        let mut config = containerd::pod_config(&name, &self.log_dir);
        // The pods here use the node's network, and so its UTS namespace:
        // runc refuses a hostname there, and the kubelet sends none.
        config.hostname = String::new();
        config.dns_config = Some(DnsConfig {
            servers: vec!["10.9.8.7".into()],
            searches: vec!["conformance.example".into()],
            options: vec!["ndots:3".into()],
        });
        config
    }

    fn privileged_pod_config(&mut self, name: &str) -> PodSandboxConfig {
        let mut config = self.pod_config(name);
        let linux = config.linux.get_or_insert_with(Default::default);
        linux.security_context.get_or_insert_with(Default::default).privileged = true;
        config
    }

    async fn run_pod(&mut self, config: &PodSandboxConfig) -> Result<String, tonic::Status> {
        let req = RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: self.handler.into() };
        Ok(self.rt.run_pod_sandbox(req).await?.into_inner().pod_sandbox_id)
    }

    async fn remove_pod(&mut self, id: &str) {
        let _ = self.rt.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: id.into() }).await;
        let _ = self.rt.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id.into() }).await;
    }

    async fn default_pod(&mut self) -> Result<(String, PodSandboxConfig), String> {
        if let Some(p) = &self.pod {
            return Ok(p.clone());
        }
        let config = self.pod_config("conformance");
        let id = self.run_pod(&config).await.map_err(|e| format!("RunPodSandbox: {}", e.message()))?;
        self.pod = Some((id, config));
        Ok(self.pod.clone().unwrap())
    }

    fn container(&self, name: &str, args: &[&str]) -> ContainerConfig {
        ContainerConfig {
            image: Some(ImageSpec { image: self.image.clone(), ..Default::default() }),
            ..containerd::container_config(name, args)
        }
    }

    async fn create(
        &mut self,
        pod: &(String, PodSandboxConfig),
        config: ContainerConfig,
    ) -> Result<String, tonic::Status> {
        let req = CreateContainerRequest {
            pod_sandbox_id: pod.0.clone(),
            config: Some(config),
            sandbox_config: Some(pod.1.clone()),
        };
        Ok(self.rt.create_container(req).await?.into_inner().container_id)
    }

    async fn start(&mut self, pod: &(String, PodSandboxConfig), config: ContainerConfig) -> Result<String, String> {
        let name = config.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default();
        let id = self.create(pod, config).await.map_err(|e| format!("CreateContainer {name}: {}", e.message()))?;
        self.rt
            .start_container(StartContainerRequest { container_id: id.clone() })
            .await
            .map_err(|e| format!("StartContainer {name}: {}", e.message()))?;
        Ok(id)
    }

    async fn remove(&mut self, id: &str) {
        let _ = self.rt.stop_container(StopContainerRequest { container_id: id.into(), timeout: 0 }).await;
        let _ = self.rt.remove_container(RemoveContainerRequest { container_id: id.into() }).await;
    }

    async fn exec(&mut self, id: &str, script: &str) -> Result<(i32, String), String> {
        let req = ExecSyncRequest {
            container_id: id.into(),
            cmd: vec!["sh".into(), "-c".into(), script.into()],
            timeout: 60,
        };
        let r = self.rt.exec_sync(req).await.map_err(|e| format!("ExecSync: {}", e.message()))?.into_inner();
        if r.exit_code != 0 && std::env::var_os("RUNV_CONFORMANCE_DEBUG").is_some() {
            eprintln!("exec {script:?}: exit {} stderr {:?}", r.exit_code, text(&r.stderr));
        }
        Ok((r.exit_code, text(&r.stdout)))
    }

    /// Starts `config` (running `sleep`) in `pod`, runs `script` in it
    /// and removes it: the script's exit code and stdout.
    async fn probe_in(
        &mut self,
        pod: &(String, PodSandboxConfig),
        mut config: ContainerConfig,
        script: &str,
    ) -> Result<(i32, String), String> {
        if config.command.is_empty() {
            config.command = vec!["sleep".into(), "1000".into()];
        }
        let id = self.start(pod, config).await?;
        let out = self.exec(&id, script).await;
        self.remove(&id).await;
        out
    }

    /// Starts a web server on the pod's 127.0.0.1:`port` answering
    /// `on-localhost`; returns its container's id once it listens.
    async fn local_server(
        &mut self,
        pod: &(String, PodSandboxConfig),
        name: &str,
        port: i32,
    ) -> Result<String, String> {
        let serve = format!(
            "mkdir -p /tmp/w && echo on-localhost > /tmp/w/index.html && exec httpd -f -p 127.0.0.1:{port} -h /tmp/w"
        );
        let id = self.start(pod, self.container(name, &["sh", "-c", &serve])).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.exec(&id, &format!("netstat -ltn | grep -q 127.0.0.1:{port}")).await?.0 != 0 {
            if Instant::now() > deadline {
                self.remove(&id).await;
                return Err(format!("nothing listens on 127.0.0.1:{port} in the container"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(id)
    }

    async fn probe(&mut self, config: ContainerConfig, script: &str) -> Result<(i32, String), String> {
        let pod = self.default_pod().await?;
        self.probe_in(&pod, config, script).await
    }

    async fn status(&mut self, id: &str) -> Result<ContainerStatus, String> {
        let req = ContainerStatusRequest { container_id: id.into(), verbose: false };
        let r = self.rt.container_status(req).await.map_err(|e| format!("ContainerStatus: {}", e.message()))?;
        r.into_inner().status.ok_or_else(|| "ContainerStatus: no status".into())
    }

    async fn wait_exited(&mut self, id: &str, within: Duration) -> Result<ContainerStatus, String> {
        let deadline = Instant::now() + within;
        loop {
            let s = self.status(id).await?;
            if s.state == ContainerState::ContainerExited as i32 {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(format!("still {:?} after {within:?}", ContainerState::try_from(s.state)));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn expect_eq(what: &str, got: &(i32, String), want: (i32, &str)) -> Outcome {
    if got.0 == want.0 && got.1 == want.1 {
        Ok(())
    } else {
        Err(format!("{what}: got exit {} {:?}, want exit {} {:?}", got.0, got.1, want.0, want.1))
    }
}

fn security(f: impl FnOnce(&mut LinuxContainerSecurityContext)) -> Option<LinuxContainerConfig> {
    let mut s = LinuxContainerSecurityContext::default();
    f(&mut s);
    Some(LinuxContainerConfig { security_context: Some(s), ..Default::default() })
}

fn seccomp(kind: security_profile::ProfileType, localhost: &str) -> Option<SecurityProfile> {
    Some(SecurityProfile { profile_type: kind as i32, localhost_ref: localhost.into() })
}

/// The effective capability set of the probing shell.
const CAP_EFF: &str = "grep CapEff /proc/self/status | cut -f2";
const SECCOMP_MODE: &str = "grep '^Seccomp:' /proc/self/status | cut -f2";

fn cap_bits(hex: &str) -> u64 {
    u64::from_str_radix(hex.trim(), 16).unwrap_or(0)
}

const SPECS: &[&str] = &[
    "exec_sync returns stdout and the exit code",
    "args, env and working dir apply",
    "the pod's DNS config reaches the container",
    "run_as_user, run_as_group and supplemental groups apply",
    "run_as_group without run_as_user is refused",
    "a read-only rootfs cannot be written",
    "drop ALL capabilities leaves none",
    "add ALL capabilities gives SYS_ADMIN and NET_ADMIN",
    "RuntimeDefault seccomp is enforced",
    "a Localhost profile denies sethostname even with SYS_ADMIN",
    "Unconfined seccomp is unconfined",
    "a missing Localhost seccomp profile fails CreateContainer",
    "a hostPath volume is shared, read-only where asked",
    "HostToContainer: a later node mount under a volume",
    "the container's output reaches its CRI log",
    "a finished container is Exited, Completed, code 0",
    "StopContainer ends a container ignoring SIGTERM (137)",
    "a container over its memory limit is OOMKilled",
    "UpdateContainerResources changes the memory limit",
    "ContainerStats reports memory in use",
    "pod sysctls apply in the pod",
    "shareProcessNamespace: containers see the sandbox",
    "a privileged container can make a bridge and sees tun",
    "hostNetwork: the node's hostname",
    "hostPID",
    "hostIPC",
    "Bidirectional: a container's mount under a volume reaches the node",
    "PortForward reaches a server on the pod's localhost",
    "containers of one pod reach each other over localhost",
    "Exec over SPDY/3.1 (kubectl's transport): stdin, stdout, stderr, the exit code",
    "PortForward over SPDY/3.1 (kubectl's transport) reaches the pod's localhost",
];

async fn run_spec(t: &mut Target, n: usize, scratch: &Path) -> Outcome {
    use security_profile::ProfileType;
    let runv = t.path.is_runv();
    match n {
        0 => {
            let got = t.probe(t.container("exec", &[]), "echo out; echo err >&2; exit 3").await?;
            expect_eq("sh -c", &got, (3, "out\n"))
        }
        1 => {
            let mut c = t.container("env", &[]);
            c.envs = vec![KeyValue { key: "GREETING".into(), value: "hello world".into() }];
            c.working_dir = "/tmp".into();
            c.args = vec!["1000".into()];
            c.command = vec!["sleep".into()];
            c.linux = security(|s| {
                s.namespace_options = Some(NamespaceOption {
                    pid: NamespaceMode::Container as i32,
                    network: NamespaceMode::Node as i32,
                    ..Default::default()
                })
            });
            let got = t.probe(c, "echo \"$GREETING\"; pwd; cat /proc/1/cmdline | tr '\\0' ' '").await?;
            expect_eq("env, pwd, pid 1", &got, (0, "hello world\n/tmp\nsleep 1000 "))
        }
        2 => {
            let got = t
                .probe(t.container("dns", &[]), "grep -E '^(nameserver|search|options)' /etc/resolv.conf | sort")
                .await?;
            expect_eq("resolv.conf", &got, (0, "nameserver 10.9.8.7\noptions ndots:3\nsearch conformance.example\n"))
        }
        3 => {
            let mut c = t.container("user", &[]);
            c.linux = security(|s| {
                s.run_as_user = Some(Int64Value { value: 1000 });
                s.run_as_group = Some(Int64Value { value: 1000 });
                s.supplemental_groups = vec![50000];
            });
            let got = t.probe(c, "id -u; id -g; id -G | tr ' ' '\\n' | grep -c '^50000$'").await?;
            expect_eq("id", &got, (0, "1000\n1000\n1\n"))
        }
        4 => {
            let pod = t.default_pod().await?;
            let mut c = t.container("group-only", &["sleep", "1000"]);
            c.linux = security(|s| s.run_as_group = Some(Int64Value { value: 1000 }));
            match t.create(&pod, c).await {
                Ok(id) => {
                    t.remove(&id).await;
                    Err("CreateContainer succeeded".into())
                }
                Err(e) if e.message().to_lowercase().contains("group") => Ok(()),
                Err(e) => Err(format!("refused without naming the group: {}", e.message())),
            }
        }
        5 => {
            let mut c = t.container("ro", &[]);
            c.linux = security(|s| s.readonly_rootfs = true);
            let got = t.probe(c, "touch /probe 2>/dev/null; echo $?").await?;
            if got.1.lines().next().is_some_and(|l| l != "0") {
                Ok(())
            } else {
                Err(format!("touch /probe succeeded: {got:?}"))
            }
        }
        6 => {
            let mut c = t.container("drop-all", &[]);
            c.linux = security(|s| {
                s.capabilities = Some(Capability { drop_capabilities: vec!["ALL".into()], ..Default::default() })
            });
            let got = t.probe(c, CAP_EFF).await?;
            expect_eq("CapEff", &got, (0, "0000000000000000\n"))
        }
        7 => {
            let mut c = t.container("add-all", &[]);
            c.linux = security(|s| {
                s.capabilities = Some(Capability { add_capabilities: vec!["ALL".into()], ..Default::default() })
            });
            let got = t.probe(c, CAP_EFF).await?;
            let bits = cap_bits(&got.1);
            // CAP_NET_ADMIN is 12, CAP_SYS_ADMIN 21.
            if bits & (1 << 12) != 0 && bits & (1 << 21) != 0 {
                Ok(())
            } else {
                Err(format!("CapEff {:?}", got.1.trim()))
            }
        }
        8 => {
            let (kind, want) =
                if n == 8 { (ProfileType::RuntimeDefault, "2\n") } else { (ProfileType::Unconfined, "0\n") };
            let mut c = t.container("seccomp", &[]);
            c.linux = security(|s| s.seccomp = seccomp(kind, ""));
            let got = t.probe(c, SECCOMP_MODE).await?;
            expect_eq("Seccomp mode", &got, (0, want))
        }
        9 => {
            // containerd's RuntimeDefault lets sethostname through to a
            // holder of CAP_SYS_ADMIN (runc shows it); a Localhost profile
            // that denies it is read on the node and enforced.
            let profile = scratch.join("deny-sethostname.json");
            let json = r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["sethostname"],"action":"SCMP_ACT_ERRNO"}]}"#;
            std::fs::write(&profile, json).map_err(|e| e.to_string())?;
            let mut c = t.container("sethostname", &[]);
            c.linux = security(|s| {
                s.seccomp = seccomp(ProfileType::Localhost, &profile.display().to_string());
                s.capabilities = Some(Capability { add_capabilities: vec!["SYS_ADMIN".into()], ..Default::default() });
            });
            // In a UTS namespace of its own, so that a profile letting the
            // call through renames nothing shared (runc's pod here uses the
            // node's namespaces).
            let got = t.probe(c, "unshare -u sh -c 'hostname renamed 2>/dev/null; echo $?' || echo no-unshare").await?;
            match got.1.as_str() {
                "0\n" => Err("sethostname was allowed".into()),
                "no-unshare\n" => Err(format!("unshare -u failed: {got:?}")),
                _ => Ok(()),
            }
        }
        10 => {
            let mut c = t.container("seccomp", &[]);
            c.linux = security(|s| s.seccomp = seccomp(ProfileType::Unconfined, ""));
            // Under runv the guest's one inherited filter (AF_VSOCK sockets
            // denied) shows as mode 2; nothing else is filtered.
            let got = t.probe(c, SECCOMP_MODE).await?;
            expect_eq("Seccomp mode", &got, (0, if runv { "2\n" } else { "0\n" }))
        }
        11 => {
            let pod = t.default_pod().await?;
            let mut c = t.container("missing-profile", &["sleep", "1000"]);
            let missing = scratch.join("no-such-profile.json");
            c.linux = security(|s| s.seccomp = seccomp(ProfileType::Localhost, &missing.display().to_string()));
            match t.create(&pod, c).await {
                Ok(id) => {
                    t.remove(&id).await;
                    Err("CreateContainer succeeded".into())
                }
                Err(e) if e.message().contains("no-such-profile") => Ok(()),
                Err(e) => Err(format!("the error does not name the profile: {}", e.message())),
            }
        }
        12 => {
            let dir = scratch.join(format!("volume-{}", t.serial));
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            std::fs::write(dir.join("greeting"), "from the node\n").map_err(|e| e.to_string())?;
            let mut c = t.container("volume", &[]);
            let mount = |path: &str, readonly| Mount {
                container_path: path.into(),
                host_path: dir.display().to_string(),
                readonly,
                ..Default::default()
            };
            c.mounts = vec![mount("/ro", true), mount("/rw", false)];
            let got = t
                .probe(c, "cat /ro/greeting; touch /ro/x 2>/dev/null && echo ro-written; echo back > /rw/answer && echo rw-ok")
                .await?;
            expect_eq("volume", &got, (0, "from the node\nrw-ok\n"))?;
            let back = std::fs::read_to_string(dir.join("answer")).unwrap_or_default();
            if back == "back\n" {
                Ok(())
            } else {
                Err(format!("the node reads {back:?} from the volume"))
            }
        }
        13 => {
            // The node's later mount appears in the container: under runv
            // through virtio-fs (virtiofsd's view of the volume is a slave
            // of the node's).
            let dir = scratch.join(format!("propagation-{}", t.serial));
            std::fs::create_dir_all(dir.join("sub")).map_err(|e| e.to_string())?;
            // The volume's source must be a shared mount for propagation.
            let bind = |args: &[&str]| std::process::Command::new("mount").args(args).status().map(|s| s.success());
            bind(&["--bind", &dir.display().to_string(), &dir.display().to_string()]).map_err(|e| e.to_string())?;
            bind(&["--make-shared", &dir.display().to_string()]).map_err(|e| e.to_string())?;
            let mut c = t.container("propagation", &["sleep", "1000"]);
            c.mounts = vec![Mount {
                container_path: "/vol".into(),
                host_path: dir.display().to_string(),
                propagation: MountPropagation::PropagationHostToContainer as i32,
                ..Default::default()
            }];
            let pod = t.default_pod().await?;
            let result = async {
                let id = t.start(&pod, c).await?;
                let sub = dir.join("sub");
                bind(&["-t", "tmpfs", "-o", "size=1m", "later", &sub.display().to_string()])
                    .map_err(|e| e.to_string())?;
                std::fs::write(sub.join("mark"), "mounted later\n").map_err(|e| e.to_string())?;
                let got = t.exec(&id, "cat /vol/sub/mark 2>/dev/null || echo absent").await;
                t.remove(&id).await;
                got
            }
            .await;
            let _ = std::process::Command::new("umount").arg("-l").arg(dir.join("sub")).status();
            let _ = std::process::Command::new("umount").arg("-l").arg(&dir).status();
            let got = result?;
            expect_eq("/vol/sub/mark", &got, (0, "mounted later\n"))
        }
        14 => {
            let pod = t.default_pod().await?;
            let c = t.container("logger", &["sh", "-c", "echo to-the-log; sleep 1000"]);
            let log = PathBuf::from(&pod.1.log_directory).join(&c.log_path);
            let id = t.start(&pod, c).await?;
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut text = String::new();
            while Instant::now() < deadline && !text.contains(" stdout F to-the-log") {
                text = std::fs::read_to_string(&log).unwrap_or_default();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            t.remove(&id).await;
            if text.contains(" stdout F to-the-log") {
                Ok(())
            } else {
                Err(format!("{}: {text:?}", log.display()))
            }
        }
        15 => {
            let pod = t.default_pod().await?;
            let id = t.start(&pod, t.container("done", &["true"])).await?;
            let s = t.wait_exited(&id, Duration::from_secs(60)).await;
            t.remove(&id).await;
            let s = s?;
            if s.exit_code == 0 && s.reason == "Completed" {
                Ok(())
            } else {
                Err(format!("exit {} reason {:?}", s.exit_code, s.reason))
            }
        }
        16 => {
            let pod = t.default_pod().await?;
            let c = t.container("stubborn", &["sh", "-c", "trap '' TERM; touch /tmp/trapped; exec sleep 1000"]);
            let id = t.start(&pod, c).await?;
            // Stopped once SIGTERM is ignored (the shell may not have got
            // that far when StartContainer answers).
            let deadline = Instant::now() + Duration::from_secs(30);
            while t.exec(&id, "test -e /tmp/trapped").await?.0 != 0 {
                if Instant::now() > deadline {
                    return Err("the container never set its trap".into());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let stopped = t.rt.stop_container(StopContainerRequest { container_id: id.clone(), timeout: 1 }).await;
            let s = t.status(&id).await;
            t.remove(&id).await;
            stopped.map_err(|e| format!("StopContainer: {}", e.message()))?;
            let s = s?;
            if s.state == ContainerState::ContainerExited as i32 && s.exit_code == 137 {
                Ok(())
            } else {
                Err(format!("state {} exit {} reason {:?}", s.state, s.exit_code, s.reason))
            }
        }
        17 => {
            let pod = t.default_pod().await?;
            let mut c = t.container("hog", &["sh", "-c", "sleep 1; tail /dev/zero"]);
            c.linux = Some(LinuxContainerConfig {
                resources: Some(LinuxContainerResources { memory_limit_in_bytes: 32 << 20, ..Default::default() }),
                ..Default::default()
            });
            let id = t.start(&pod, c).await?;
            let s = t.wait_exited(&id, Duration::from_secs(120)).await;
            t.remove(&id).await;
            let s = s?;
            if s.reason == "OOMKilled" {
                Ok(())
            } else {
                Err(format!("exit {} reason {:?}", s.exit_code, s.reason))
            }
        }
        18 => {
            let pod = t.default_pod().await?;
            let mut c = t.container("resized", &["sleep", "1000"]);
            c.linux = Some(LinuxContainerConfig {
                resources: Some(LinuxContainerResources { memory_limit_in_bytes: 96 << 20, ..Default::default() }),
                ..Default::default()
            });
            let id = t.start(&pod, c).await?;
            let update =
                t.rt.update_container_resources(UpdateContainerResourcesRequest {
                    container_id: id.clone(),
                    linux: Some(LinuxContainerResources { memory_limit_in_bytes: 64 << 20, ..Default::default() }),
                    ..Default::default()
                })
                .await;
            let got = t
                .exec(
                    &id,
                    "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes",
                )
                .await;
            t.remove(&id).await;
            update.map_err(|e| format!("UpdateContainerResources: {}", e.message()))?;
            expect_eq("memory limit", &got?, (0, "67108864\n"))
        }
        19 => {
            let pod = t.default_pod().await?;
            let id = t.start(&pod, t.container("busy", &["sleep", "1000"])).await?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            let stats = t.rt.container_stats(ContainerStatsRequest { container_id: id.clone() }).await;
            t.remove(&id).await;
            let stats = stats.map_err(|e| format!("ContainerStats: {}", e.message()))?.into_inner().stats;
            let used = stats.and_then(|s| s.memory).and_then(|m| m.working_set_bytes).map(|v| v.value).unwrap_or(0);
            if used > 0 {
                Ok(())
            } else {
                Err(format!("working set {used} bytes"))
            }
        }
        20 => {
            let mut config = t.pod_config("sysctls");
            let linux = config.linux.get_or_insert_with(Default::default);
            linux.sysctls.insert("kernel.shm_rmid_forced".into(), "1".into());
            let id = t.run_pod(&config).await.map_err(|e| format!("RunPodSandbox: {}", e.message()))?;
            let got = t
                .probe_in(&(id.clone(), config), t.container("sysctl", &[]), "cat /proc/sys/kernel/shm_rmid_forced")
                .await;
            t.remove_pod(&id).await;
            expect_eq("kernel.shm_rmid_forced", &got?, (0, "1\n"))
        }
        21 => {
            let pod = t.default_pod().await?;
            let mut c = t.container("shared-pid", &[]);
            c.linux = security(|s| {
                s.namespace_options = Some(NamespaceOption {
                    pid: NamespaceMode::Pod as i32,
                    network: NamespaceMode::Node as i32,
                    ..Default::default()
                })
            });
            let got = t.probe_in(&pod, c, "cat /proc/1/cmdline | tr '\\0' ' '").await?;
            // Pid 1 is the sandbox's process (the pause image runs sleep).
            expect_eq("pid 1", &got, (0, "sleep 2147483647 "))
        }
        22 => {
            let config = t.privileged_pod_config("privileged");
            let id = t.run_pod(&config).await.map_err(|e| format!("RunPodSandbox: {}", e.message()))?;
            let mut c = t.container("privileged", &[]);
            c.linux = security(|s| s.privileged = true);
            let got = t
                .probe_in(
                    &(id.clone(), config),
                    c,
                    // A network namespace of its own: runc's pod here has the node's.
                    "unshare -n sh -c 'brctl addbr br-conf && echo bridge'; test -c /dev/net/tun && echo tun; true",
                )
                .await;
            t.remove_pod(&id).await;
            expect_eq("privileged", &got?, (0, "bridge\ntun\n"))
        }
        23 => {
            // No hostname sent: the node's.
            let config = t.pod_config("host-network");
            let node = nix::unistd::gethostname().map_err(|e| e.to_string())?.to_string_lossy().into_owned();
            let id = t.run_pod(&config).await.map_err(|e| format!("RunPodSandbox: {}", e.message()))?;
            let got = t.probe_in(&(id.clone(), config), t.container("hostname", &[]), "hostname").await;
            t.remove_pod(&id).await;
            expect_eq("hostname", &got?, (0, &format!("{node}\n")))
        }
        24 | 25 => {
            let (field, kind) = if n == 24 { ("hostPID", "pid") } else { ("hostIPC", "ipc") };
            let check = format!("readlink /proc/self/ns/{kind}");
            let node = std::fs::read_link(format!("/proc/self/ns/{kind}")).map_err(|e| e.to_string())?;
            let mut config = t.pod_config(if n == 24 { "host-pid" } else { "host-ipc" });
            let ns = config
                .linux
                .get_or_insert_with(Default::default)
                .security_context
                .get_or_insert_with(Default::default)
                .namespace_options
                .get_or_insert_with(Default::default);
            if n == 24 {
                ns.pid = NamespaceMode::Node as i32;
            } else {
                ns.ipc = NamespaceMode::Node as i32;
            }
            match t.run_pod(&config).await {
                Ok(id) if runv => {
                    t.remove_pod(&id).await;
                    Err(format!("{field} was accepted: a VM cannot give it"))
                }
                Ok(id) => {
                    let got = t.probe_in(&(id.clone(), config), t.container("host-ns", &[]), &check).await;
                    t.remove_pod(&id).await;
                    expect_eq(&check, &got?, (0, &format!("{}\n", node.display())))
                }
                Err(e) if runv && e.message().contains(field) => Ok(()),
                Err(e) => Err(format!("RunPodSandbox: {}", e.message())),
            }
        }
        26 => {
            // runc: the container's mount propagates to the node. runv: it
            // is made in the guest's kernel and stays there (the README
            // table says so); what the container writes into it stays too.
            let dir = scratch.join(format!("bidirectional-{}-{}", t.handler, t.serial));
            std::fs::create_dir_all(dir.join("sub")).map_err(|e| e.to_string())?;
            let shell = |cmd: &str| std::process::Command::new("sh").arg("-c").arg(cmd).status().map(|s| s.success());
            let d = dir.display().to_string();
            shell(&format!("mount --bind {d} {d} && mount --make-shared {d}")).map_err(|e| e.to_string())?;
            let config = t.privileged_pod_config("bidirectional");
            let result = async {
                let id = t.run_pod(&config).await.map_err(|e| format!("RunPodSandbox: {}", e.message()))?;
                let mut c = t.container("mounter", &[]);
                c.linux = security(|s| s.privileged = true);
                c.mounts = vec![Mount {
                    container_path: "/vol".into(),
                    host_path: d.clone(),
                    propagation: MountPropagation::PropagationBidirectional as i32,
                    ..Default::default()
                }];
                let got = t
                    .probe_in(
                        &(id.clone(), config.clone()),
                        c,
                        "mount -t tmpfs inside /vol/sub && echo from-the-pod > /vol/sub/mark && echo mounted",
                    )
                    .await;
                t.remove_pod(&id).await;
                got
            }
            .await;
            let seen = std::fs::read_to_string(dir.join("sub/mark")).unwrap_or_default();
            let _ = shell(&format!("umount -l {d}/sub 2>/dev/null; umount -l {d}"));
            expect_eq("mount in the container", &result?, (0, "mounted\n"))?;
            let want = if runv { "" } else { "from-the-pod\n" };
            if seen == want {
                Ok(())
            } else {
                Err(format!("the node reads {seen:?} from sub/mark, want {want:?}"))
            }
        }
        27 => {
            // The pods here use the node's network: containerd dials the
            // node's localhost, which reaches runc's server and not the VM
            // (the README table says so); runv cri reaches the guest's.
            let pod = t.default_pod().await?;
            let port = 18000 + t.serial as i32;
            let id = t.local_server(&pod, "local-server", port).await?;
            let got = port_forward_get(&mut t.rt, &pod.0, port).await;
            t.remove(&id).await;
            match (t.path, got) {
                (Via::ContainerdRunv, Err(e)) if e.contains("refused") || e.contains("connect") => Ok(()),
                (Via::ContainerdRunv, other) => Err(format!("a hostNetwork runv pod's port was reached: {other:?}")),
                (_, Ok(body)) if body.contains("on-localhost") => Ok(()),
                (_, other) => Err(format!("{other:?}")),
            }
        }
        28 => {
            let pod = t.default_pod().await?;
            let port = 18500 + t.serial as i32;
            let serve = format!(
                "mkdir -p /tmp/w && echo from-the-neighbour > /tmp/w/index.html && exec httpd -f -p 127.0.0.1:{port} -h /tmp/w"
            );
            let server = t.start(&pod, t.container("neighbour", &["sh", "-c", &serve])).await?;
            let fetch = format!(
                "for i in $(seq 1 50); do wget -qO- http://127.0.0.1:{port}/ 2>/dev/null && exit 0; sleep 0.2; done; exit 1"
            );
            let got = t.probe_in(&pod, t.container("client", &[]), &fetch).await;
            t.remove(&server).await;
            expect_eq("wget from the other container", &got?, (0, "from-the-neighbour\n"))
        }
        29 => {
            let client = spdy_client()?;
            let pod = t.default_pod().await?;
            let id = t.start(&pod, t.container("spdy-exec", &["sleep", "1000"])).await?;
            let req = ExecRequest {
                container_id: id.clone(),
                cmd: vec!["sh".into(), "-c".into(), "read l; echo got $l; echo err >&2; exit 4".into()],
                tty: false,
                stdin: true,
                stdout: true,
                stderr: true,
            };
            let url = t.rt.exec(req).await.map_err(|e| format!("Exec: {}", e.message()))?.into_inner().url;
            let r = spdy::run(&client, &["exec", &url, "-stdin", "it\n"]);
            t.remove(&id).await;
            let r = r?;
            let status: serde_json::Value = serde_json::from_str(r["error"].as_str().unwrap_or_default())
                .map_err(|e| format!("the error stream holds no Status ({e}): {r}"))?;
            let got = (r["protocol"].as_str(), r["stdout"].as_str(), r["stderr"].as_str());
            let exit = status["details"]["causes"][0]["message"].as_str();
            if got == (Some("v4.channel.k8s.io"), Some("got it\n"), Some("err\n")) && exit == Some("4") {
                Ok(())
            } else {
                Err(format!("{r}"))
            }
        }
        30 => {
            // As 27, through kubectl's transport.
            let client = spdy_client()?;
            let pod = t.default_pod().await?;
            let port = 18700 + t.serial as i32;
            let id = t.local_server(&pod, "spdy-server", port).await?;
            let req = PortForwardRequest { pod_sandbox_id: pod.0.clone(), port: vec![port] };
            let url = t.rt.port_forward(req).await.map_err(|e| format!("PortForward: {}", e.message()))?;
            let r = spdy::run(&client, &["portforward", &url.into_inner().url, "-port", &port.to_string()]);
            t.remove(&id).await;
            let r = r?;
            let (data, error) =
                (r["data"][0].as_str().unwrap_or_default(), r["errors"][0].as_str().unwrap_or_default());
            match t.path {
                Via::ContainerdRunv if data.is_empty() && !error.is_empty() => Ok(()),
                Via::ContainerdRunv => Err(format!("a hostNetwork runv pod's port was reached: {r}")),
                _ if data.contains("on-localhost") && error.is_empty() => Ok(()),
                _ => Err(format!("{r}")),
            }
        }
        _ => unreachable!(),
    }
}

/// The SPDY client, built once.
fn spdy_client() -> Result<PathBuf, String> {
    static CLIENT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| spdy::client_or_skip("the SPDY specs"))
        .clone()
        .ok_or_else(|| "needs Go and spdystream".into())
}

/// GET / through PortForward to `port` of `pod` over the streaming
/// server's WebSocket protocol (`v4.channel.k8s.io`, `?port=` in the URL
/// as the kubelet's library wants it); the response, or the error channel.
async fn port_forward_get(rt: &mut RuntimeServiceClient<Channel>, pod: &str, port: i32) -> Result<String, String> {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let url = rt
        .port_forward(PortForwardRequest { pod_sandbox_id: pod.into(), port: vec![port] })
        .await
        .map_err(|e| format!("PortForward: {}", e.message()))?
        .into_inner()
        .url;
    let url = format!("{}?port={port}", url.replacen("http://", "ws://", 1));
    let mut request = url.as_str().into_client_request().map_err(|e| e.to_string())?;
    request.headers_mut().insert("Sec-WebSocket-Protocol", "v4.channel.k8s.io".parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(request).await.map_err(|e| format!("{url}: {e}"))?;
    let (mut tx, mut rx) = ws.split();
    let (mut data, mut seen) = (Vec::new(), [false, false]);
    loop {
        let next = tokio::time::timeout(Duration::from_secs(30), rx.next()).await.map_err(|_| "stalled".to_string())?;
        match next {
            Some(Ok(Message::Binary(b))) => match b.split_first() {
                // The first message of each channel is its port.
                Some((&ch @ (0 | 1), _)) if !seen[ch as usize] => {
                    seen[ch as usize] = true;
                    if seen == [true, true] {
                        let get = [&[0u8][..], b"GET / HTTP/1.0\r\n\r\n"].concat();
                        tx.send(Message::Binary(get.into())).await.map_err(|e| e.to_string())?;
                    }
                }
                Some((0, rest)) => data.extend_from_slice(rest),
                Some((1, rest)) if !rest.is_empty() => return Err(text(rest)),
                _ => {}
            },
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.to_string()),
        }
        if text(&data).contains("on-localhost\n") {
            break;
        }
    }
    let _ = tx.send(Message::Close(None)).await;
    Ok(text(&data))
}

/// What a runv path does differently, by design (the README table).
fn differs(n: usize, via: Via) -> Option<&'static str> {
    if via == Via::Runc {
        return None;
    }
    match n {
        10 => Some("mode 2: the guest's one filter, AF_VSOCK sockets denied"),
        26 => Some("the mount stays in the guest"),
        27 | 30 if via == Via::ContainerdRunv => {
            Some("through containerd, a hostNetwork pod's ports are not reachable")
        }
        24 | 25 => Some("refused, naming the field"),
        _ => None,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !containerd::ready("conformance") || !registry::registry_or_skip("conformance") {
        std::process::exit(1);
    }
    let scratch = tempfile::Builder::new().prefix("runv-conformance-").tempdir().unwrap();
    let reg = registry::Registry::start();
    let rootfs = registry::dir_layer(&Path::new(containerd::SHARE_DIR).join("rootfs"));
    let app = registry::push_with_cmd(&reg, "runv/busybox:1", std::slice::from_ref(&rootfs), &["sh"]).await;
    let pause = registry::push_with_cmd(&reg, "runv/pause:1", &[rootfs], &["sleep", "2147483647"]).await;
    let server = cri::CriServer::start(&reg.addr, &format!("cri_sandbox_image = \"{pause}\""));
    let channel = server.channel().await;
    ImageServiceClient::new(channel.clone())
        .pull_image(PullImageRequest {
            image: Some(ImageSpec { image: app.clone(), ..Default::default() }),
            ..Default::default()
        })
        .await
        .expect("pulling into runv cri");
    let ctd = containerd::Containerd::start("");
    let ctd_logs = ctd.dir.path().join("pod-logs");
    let ours_logs = scratch.path().join("pod-logs");
    std::fs::create_dir_all(&ctd_logs).unwrap();
    std::fs::create_dir_all(&ours_logs).unwrap();
    let mut targets = Vec::new();
    for path in [Via::Runc, Via::ContainerdRunv, Via::RunvCri] {
        let (rt, image, log_dir) = match path {
            Via::RunvCri => (RuntimeServiceClient::new(channel.clone()), app.clone(), ours_logs.clone()),
            _ => (containerd::cri_client(&ctd.socket()).await, containerd::IMAGE.to_string(), ctd_logs.clone()),
        };
        let handler = if path == Via::Runc { "runc" } else { "runv" };
        targets.push(Target { path, rt, handler, image, log_dir, pod: None, serial: 0 });
    }

    let only: Option<Vec<usize>> = std::env::var("RUNV_CONFORMANCE_SPECS")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect());
    let (mut passed, mut failed) = (0, 0);
    let mut rows = Vec::new();
    for (n, name) in SPECS.iter().enumerate() {
        if only.as_ref().is_some_and(|o| !o.contains(&n)) {
            continue;
        }
        let mut cells = Vec::new();
        for t in targets.iter_mut() {
            let started = Instant::now();
            let outcome = tokio::time::timeout(Duration::from_secs(240), run_spec(t, n, scratch.path()))
                .await
                .unwrap_or_else(|_| Err("no answer within 240 s".into()));
            let cell = match (&outcome, differs(n, t.path)) {
                (Ok(()), Some(_)) => {
                    passed += 1;
                    "differs (by design)".to_string()
                }
                (Ok(()), None) => {
                    passed += 1;
                    "pass".to_string()
                }
                (Err(e), _) => {
                    failed += 1;
                    eprintln!("FAIL {name} [{}]: {e}", t.path.label());
                    "FAIL".to_string()
                }
            };
            eprintln!("{n:2} {name} [{}]: {cell} ({:.1} s)", t.path.label(), started.elapsed().as_secs_f64());
            cells.push(cell);
        }
        rows.push((n, name, cells, differs(n, Via::ContainerdRunv).or(differs(n, Via::RunvCri))));
    }
    for t in targets.iter_mut() {
        if let Some((id, _)) = t.pod.take() {
            t.remove_pod(&id).await;
        }
    }

    println!("| # | spec | containerd+runc | containerd+runv | runv cri |");
    println!("|---|---|---|---|---|");
    for (n, name, cells, why) in &rows {
        let name = match why {
            Some(why) => format!("{name} (runv: {why})"),
            None => name.to_string(),
        };
        println!("| {n} | {name} | {} |", cells.join(" | "));
    }
    let left = server.settled_leftovers();
    if !left.is_empty() {
        eprintln!("FAIL runv cri left behind: {left:#?}");
        failed += 1;
    }
    drop(server);
    ctd.assert_clean();
    println!("{passed} passed, {failed} failed");
    // exit() runs no destructors: stop containerd and the registry and
    // remove their directories and the scratch directory first, so that a
    // run leaves nothing behind.
    drop(targets);
    drop(ctd);
    drop(reg);
    drop(scratch);
    std::process::exit(if failed == 0 { 0 } else { 1 });
}
