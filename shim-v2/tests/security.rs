//! Real attacks on the real stack: containerd's CRI plugin, the runv shim,
//! QEMU (TCG here), virtiofsd and the agent, with the attacker as root in
//! the guest outside every container (the agent's opt-in debug console,
//! the position a container escape to the guest kernel gives). Each attack
//! prints `ATTACK <name>: held` or `ATTACK <name>: ESCAPED <what>`;
//! `tests/security.sh` counts them.
//!
//! Run alone with `cargo test --release -p containerd-shim-runv-v2 --test security`.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{container_config, cri_client, pod_config, ready, Containerd, SHARE_DIR};
use k8s_cri::v1::*;

#[derive(Default)]
struct Attacks {
    escaped: Vec<String>,
}

impl Attacks {
    fn record(&mut self, name: &str, escaped: Option<String>) {
        println!("ATTACK {name}: tried");
        match escaped {
            None => println!("ATTACK {name}: held"),
            Some(what) => {
                println!("ATTACK {name}: ESCAPED {what}");
                self.escaped.push(format!("{name}: {what}"));
            }
        }
    }
}

/// Root in the guest: a busybox shell from a container's rootfs, run by the
/// agent's debug console outside every container.
struct GuestRoot {
    vsock: PathBuf,
    busybox: String,
}

impl GuestRoot {
    async fn sh(&self, script: &str) -> (String, i32) {
        let argv = [self.busybox.clone(), "sh".into(), "-c".into(), script.into()];
        let (out, status) = runv::sandbox::debug_console::run(&self.vsock, &argv)
            .await
            .unwrap_or_else(|e| panic!("debug console: {e}"));
        (String::from_utf8_lossy(&out).into_owned(), status)
    }
}

/// What /proc says of one host process of a sandbox.
#[derive(Debug)]
struct Proc {
    name: String,
    seccomp: String,
    nnp: String,
    cap_eff: String,
    uid: String,
    own_mnt: bool,
    root: PathBuf,
    cgroup: String,
}

/// Whether a user that is neither the owner nor in the group could read
/// `path` if `base` (the runtime dir runv made) were reachable: every
/// directory from `base` down searchable by others, the file readable.
/// (The test's own temp dir above `base` is private and does not count.)
fn readable_by_others(path: &Path, base: &Path) -> bool {
    let mut p = path.to_path_buf();
    let Ok(m) = std::fs::symlink_metadata(&p) else { return false };
    if m.file_type().is_symlink() || m.permissions().mode() & 0o004 == 0 {
        return false;
    }
    while p.pop() && p.starts_with(base) {
        match std::fs::metadata(&p) {
            Ok(d) if d.permissions().mode() & 0o001 != 0 => {}
            _ => return false,
        }
    }
    true
}

fn files_below(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let Ok(m) = std::fs::symlink_metadata(&p) else { continue };
        // Mounts of the sandbox (rootfs, volumes) are the pod's own files.
        if m.is_dir() && m.dev() == std::fs::metadata(dir).map(|d| d.dev()).unwrap_or(0) {
            files_below(&p, out);
        }
        out.push(p);
    }
}

fn mounts_below(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .map(str::to_owned)
        .collect()
}

async fn create_started(
    cri: &mut runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    pod: &str,
    sandbox: &PodSandboxConfig,
    config: ContainerConfig,
) -> String {
    let id = cri
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(sandbox.clone()),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer: {e}"))
        .into_inner()
        .container_id;
    cri.start_container(StartContainerRequest { container_id: id.clone() })
        .await
        .unwrap_or_else(|e| panic!("StartContainer: {e}"));
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_in_the_guest_gets_nothing_on_the_host() {
    if !ready("root_in_the_guest_gets_nothing_on_the_host") {
        return;
    }
    let ctd = Containerd::start("debug_console = true\nconsole_log_max_kib = 256\n");
    let mut cri = cri_client(&ctd.socket()).await;
    let tmp = ctd.dir.path().to_path_buf();
    let log_dir = tmp.join("pod-logs");
    std::fs::create_dir_all(&log_dir).unwrap();
    // Host data the attacks aim at: a canary directory outside everything,
    // and a volume the pod may write.
    let canary = tmp.join("canary");
    std::fs::create_dir(&canary).unwrap();
    std::fs::write(canary.join("keep"), b"host").unwrap();
    let volume = tmp.join("volume");
    std::fs::create_dir(&volume).unwrap();
    std::fs::write(volume.join("data"), b"volume").unwrap();

    let sandbox = pod_config("attacked", &log_dir);
    let pod = cri
        .run_pod_sandbox(RunPodSandboxRequest { config: Some(sandbox.clone()), runtime_handler: "runv".into() })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", ctd.log()))
        .into_inner()
        .pod_sandbox_id;
    let c1 = create_started(&mut cri, &pod, &sandbox, container_config("c1", &["sleep", "1000"])).await;

    let shim_dir = tmp.join("run/shim/k8s.io").join(&pod);
    let sandbox_dir = std::fs::read_to_string(shim_dir.join("sandbox-dir")).expect("the shim records its sandbox");
    let guest = GuestRoot {
        vsock: Path::new(sandbox_dir.trim()).join("jail/vsock.sock"),
        busybox: format!("/run/runv/shared/{c1}/rootfs/bin/busybox"),
    };
    let (me, status) = guest.sh("id -u; cat /proc/self/cgroup").await;
    assert_eq!((me.lines().next(), status), (Some("0"), 0), "the console is root in the guest: {me}");
    let mut attacks = Attacks::default();
    let staging = shim_dir.join("mounts");
    let host_view = shim_dir.join("shared");

    // 1. CVE-2020-2026's move: plant symlinks where the host will mount the
    //    next container's rootfs and volumes.
    let (out, _) = guest
        .sh(&format!(
            "cd /run/runv/shared; ln -s {c} next 2>&1; mkdir next2 2>&1; ln -s {c} {c1}/mounts 2>&1; \
             ln -s {c} {c1}/planted 2>&1; true",
            c = canary.display()
        ))
        .await;
    let planted: Vec<_> = ["next", "next2", "planted"]
        .iter()
        .flat_map(|n| [staging.join(n), staging.join(&c1).join(n)])
        .filter(|p| std::fs::symlink_metadata(p).is_ok())
        .collect();
    attacks.record(
        "symlinks planted in the shared directory for the next container",
        (!planted.is_empty() || !out.contains("Read-only file system"))
            .then(|| format!("host saw {planted:?}; guest said {out:?}")),
    );

    // 2. Remount the share read-write from the guest and plant again.
    let (out, _) = guest
        .sh(&format!(
            "mount -o remount,rw /run/runv/shared 2>&1; ln -s {} /run/runv/shared/next3 2>&1; true",
            canary.display()
        ))
        .await;
    attacks.record(
        "the share remounted read-write in the guest",
        std::fs::symlink_metadata(staging.join("next3")).is_ok().then(|| format!("planted on the host: {out}")),
    );

    // 3. Swap a container's rootfs mount point for a symlink.
    let (out, _) = guest
        .sh(&format!(
            "cd /run/runv/shared/{c1}; mv rootfs rootfs.old 2>&1; rmdir rootfs 2>&1; ln -s {} rootfs 2>&1; true",
            canary.display()
        ))
        .await;
    let rootfs_mounted = mounts_below(&staging).iter().any(|m| m.ends_with(&format!("{c1}/rootfs")));
    attacks.record(
        "a container's rootfs mount point replaced by a symlink",
        (!rootfs_mounted
            || std::fs::symlink_metadata(staging.join(&c1).join("rootfs")).unwrap().file_type().is_symlink())
        .then(|| format!("guest said {out:?}")),
    );

    // 4. Symlinks inside what the guest may write (a rootfs, a volume),
    //    then the host creates and removes a container next to them.
    let mut c2_config = container_config("c2", &["sleep", "1000"]);
    c2_config.mounts = vec![Mount {
        container_path: "/data".into(),
        host_path: volume.to_string_lossy().into_owned(),
        ..Default::default()
    }];
    let c2 = create_started(&mut cri, &pod, &sandbox, c2_config).await;
    let (out, _) = guest
        .sh(&format!(
            "cd /run/runv/shared/{c2}; for d in rootfs mounts/*-volume; do ln -s {c} $d/escape 2>&1; \
             ln -s {c}/keep $d/keep-link 2>&1; done; ls mounts",
            c = canary.display()
        ))
        .await;
    cri.stop_container(StopContainerRequest { container_id: c2.clone(), timeout: 5 }).await.unwrap();
    cri.remove_container(RemoveContainerRequest { container_id: c2.clone() }).await.unwrap();
    let left = mounts_below(&staging.join(&c2));
    let canary_ok = std::fs::read(canary.join("keep")).ok().as_deref() == Some(&b"host"[..])
        && std::fs::read_dir(&canary).unwrap().count() == 1;
    attacks.record(
        "symlinks in a writable rootfs and volume at container teardown",
        (!canary_ok
            || !left.is_empty()
            || staging.join(&c2).exists()
            || std::fs::read(volume.join("data")).ok().as_deref() != Some(&b"volume"[..]))
        .then(|| format!("canary ok {canary_ok}, mounts left {left:?}, guest said {out:?}")),
    );

    // 5. Flood the serial console.
    let (out, _) = guest.sh("head -c 4194304 /dev/zero | tr '\\0' 'x' > /dev/ttyS0 2>&1; echo flooded").await;
    let console = Path::new(sandbox_dir.trim()).join("console.log");
    let kept = std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0)
        + std::fs::metadata(console.with_extension("log.1")).map(|m| m.len()).unwrap_or(0);
    attacks.record(
        "a console flood (4 MiB against a 256 KiB cap)",
        (kept > 256 * 1024 + 64 * 1024 || !out.contains("flooded")).then(|| format!("{kept} bytes kept: {out}")),
    );

    // 5b. Write the agent's image, which every VM on the node boots from:
    //     the block device set writable, the root remounted read-write,
    //     the agent overwritten through the filesystem and the disk's
    //     first blocks through the device.
    let image_path = Path::new(SHARE_DIR).join("agent.img");
    let image_before = std::fs::read(&image_path).expect("the installed agent image");
    let (out, _) = guest
        .sh("blockdev --setrw /dev/vda 2>&1; mount -o remount,rw / 2>&1; echo owned > /init 2>&1; \
             dd if=/dev/zero of=/dev/vda bs=4096 count=16 conv=notrunc,fsync 2>&1; sync; true")
        .await;
    println!("the guest, writing the agent's image: {out}");
    attacks.record(
        "root in the guest writing the agent's image (the node's other VMs boot from it)",
        (std::fs::read(&image_path).ok() != Some(image_before))
            .then(|| format!("the image changed; guest said {out:?}")),
    );

    // 6. Read the host's runv state from a container.
    let probe = cri
        .exec_sync(ExecSyncRequest {
            container_id: c1.clone(),
            cmd: vec!["sh".into(), "-c".into(), format!("ls {} 2>&1; ls /run/runv 2>&1; true", tmp.display())],
            timeout: 30,
        })
        .await
        .unwrap()
        .into_inner();
    let seen = String::from_utf8_lossy(&probe.stdout).into_owned();
    attacks.record(
        "a container reading the host's runv state",
        (seen.contains("containerd.sock") || seen.contains("sandbox-dir")).then(|| seen.clone()),
    );

    // 7. Host users: nothing of the sandbox's state is readable by others
    //    (the pod's own mounts aside).
    let mut files = Vec::new();
    files_below(&tmp.join("run"), &mut files);
    let exposed: Vec<_> = files.into_iter().filter(|p| readable_by_others(p, &tmp.join("run"))).collect();
    attacks.record(
        "host users reading the sandbox's state files",
        (!exposed.is_empty()).then(|| format!("readable by others: {exposed:#?}")),
    );

    // 8. What /proc shows of the sandbox's host processes: each jailed
    //    (README, "Security model"). The VM process and vhost-device-vsock
    //    run as the sandbox's own uid with no capability and no_new_privs,
    //    QEMU chrooted into the jail directory under its seccomp filter;
    //    virtiofsd in a mount namespace of its own under seccomp; all of
    //    them in the sandbox's cgroup, none in the shim's.
    let sandbox_dir = sandbox_dir.trim().to_string();
    let sandbox_id = Path::new(&sandbox_dir).file_name().unwrap().to_string_lossy().into_owned();
    let own_mnt = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let mut seen = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline =
            String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).unwrap_or_default()).replace('\0', " ");
        let link = |l: &str| std::fs::read_link(e.path().join(l)).unwrap_or_default();
        // vhost-device-vsock names its sockets relative to its jail directory.
        if !cmdline.contains(&sandbox_dir) && !link("cwd").starts_with(&sandbox_dir) {
            continue;
        }
        let name = cmdline.split_whitespace().next().unwrap_or("").rsplit('/').next().unwrap_or("").to_string();
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).unwrap_or("?").trim().to_string();
        let uid = field("Uid:").split_whitespace().next().unwrap_or("?").to_string();
        let cgroups = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        // cgroup v2 (`0::/path`) or v1's memory hierarchy.
        let cgroup = cgroups
            .lines()
            .find(|l| l.starts_with("0::") && !l.ends_with("::/"))
            .or_else(|| cgroups.lines().find(|l| l.split(':').nth(1) == Some("memory")))
            .and_then(|l| l.rsplit(':').next())
            .unwrap_or("?")
            .to_string();
        let p = Proc {
            name,
            seccomp: field("Seccomp:"),
            nnp: field("NoNewPrivs:"),
            cap_eff: field("CapEff:"),
            uid,
            own_mnt: link("ns/mnt") != own_mnt,
            root: link("root"),
            cgroup,
        };
        println!("CONFINEMENT pid {}: {p:?}", e.file_name().to_string_lossy());
        seen.push(p);
    }
    struct Check<'a>(&'a str, bool);
    // The pod's cgroup (containerd's CRI names `/k8s.io/<pod id>` when the
    // pod has no cgroup parent), or runv's own for a sandbox without one.
    let in_cgroup =
        |p: &Proc| p.cgroup == format!("/k8s.io/{pod}") || p.cgroup.ends_with(&format!("/runv/{sandbox_id}"));
    let jailed =
        |p: &Proc| p.uid != "0" && p.uid != "?" && p.cap_eff == "0000000000000000" && p.nnp == "1" && in_cgroup(p);
    let qemu = seen.iter().find(|p| p.name.starts_with("qemu-system"));
    let vsock = seen.iter().find(|p| p.name == "vhost-device-vsock");
    let checks = [
        Check(
            "QEMU runs as the sandbox's uid, chrooted into its jail, under seccomp",
            qemu.is_some_and(|q| jailed(q) && q.seccomp == "2" && q.root == Path::new(&sandbox_dir).join("jail")),
        ),
        Check(
            "vhost-device-vsock runs as the same uid",
            vsock.is_some_and(|v| jailed(v) && qemu.is_some_and(|q| q.uid == v.uid)),
        ),
        Check(
            "virtiofsd is in its own mount namespace under seccomp",
            seen.iter().any(|p| p.name == "virtiofsd" && p.seccomp == "2" && p.own_mnt),
        ),
        Check("every host process of the sandbox is in its cgroup", seen.len() >= 3 && seen.iter().all(in_cgroup)),
    ];
    let failed: Vec<_> = checks.iter().filter(|c| !c.1).map(|c| c.0).collect();
    attacks.record(
        "the sandbox's host processes holding host privilege",
        (!failed.is_empty()).then(|| format!("{failed:?} in {seen:#?}")),
    );

    // 9. Open a vsock socket in the guest, the way to the agent and the
    //    host: as root outside every container (the agent's own binary,
    //    asked to listen on a vsock port) and from a container.
    let (out, _) =
        guest.sh("/proc/1/exe --listen vsock://-1:2000 --state-dir /tmp/attack-agent 2>&1 | head -c 2000; true").await;
    let probe = cri
        .exec_sync(ExecSyncRequest {
            container_id: c1.clone(),
            cmd: vec!["grep".into(), "Seccomp:".into(), "/proc/self/status".into()],
            timeout: 30,
        })
        .await
        .unwrap()
        .into_inner();
    let seccomp = String::from_utf8_lossy(&probe.stdout).into_owned();
    attacks.record(
        "a vsock socket opened in the guest (root outside containers, and a container)",
        (!out.contains("Address family not supported") || !seccomp.contains('2'))
            .then(|| format!("root said {out:?}; the container's {seccomp:?}")),
    );

    // The sandbox still serves after all of this.
    let alive = cri
        .exec_sync(ExecSyncRequest { container_id: c1.clone(), cmd: vec!["echo".into(), "alive".into()], timeout: 30 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(String::from_utf8_lossy(&alive.stdout), "alive\n");
    assert!(host_view.join(&c1).join("rootfs/bin/busybox").exists());

    cri.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod.clone() }).await.unwrap();
    cri.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod.clone() }).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while shim_dir.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!shim_dir.exists(), "the shim's directory is removed");
    assert_eq!(std::fs::read(canary.join("keep")).unwrap(), b"host");
    ctd.assert_clean();
    assert!(attacks.escaped.is_empty(), "escaped: {:#?}", attacks.escaped);
}
