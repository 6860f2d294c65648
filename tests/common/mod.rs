//! Shared helpers for runv's end-to-end tests: a private runtime directory
//! and config per test, the installed guest assets, and a leftover census.

#![allow(dead_code)]

pub mod cni;
pub mod cri;
pub mod registry;
pub mod scrape;
pub mod spdy;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const SHARE_DIR: &str = "/usr/local/share/runv";

pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub runtime_dir: PathBuf,
}

/// A registry holding the default rootfs as a busybox image and a pause
/// image, and a `runv cri` using that pause image; returns the busybox
/// image's reference too.
pub async fn registry_and_server() -> (registry::Registry, cri::CriServer, String) {
    registry_and_server_with_args(&[]).await
}

/// As `registry_and_server`, with more arguments of `runv cri`.
pub async fn registry_and_server_with_args(args: &[&str]) -> (registry::Registry, cri::CriServer, String) {
    registry_and_server_with("", args).await
}

/// As `registry_and_server`, with more config (TOML lines) and more
/// arguments of `runv cri`.
pub async fn registry_and_server_with(extra: &str, args: &[&str]) -> (registry::Registry, cri::CriServer, String) {
    use registry::{dir_layer, push_with_cmd, Registry};
    let reg = Registry::start();
    let rootfs = dir_layer(&Path::new(SHARE_DIR).join("rootfs"));
    let app = push_with_cmd(&reg, "runv/busybox:1", std::slice::from_ref(&rootfs), &["sh"]).await;
    let pause = push_with_cmd(&reg, "runv/pause:1", &[rootfs], &["sleep", "2147483647"]).await;
    let cri = cri::CriServer::start_with_args(&reg.addr, &format!("cri_sandbox_image = \"{pause}\"\n{extra}"), args);
    (reg, cri, app)
}

/// Whether /dev/kvm can be used; prints why the test skips otherwise.
pub fn kvm_or_skip(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if !ok {
        eprintln!("SKIP {test}: /dev/kvm is absent or not accessible");
    }
    ok
}

/// Whether the end-to-end prerequisites are here; prints why not otherwise.
pub fn e2e_ready(test: &str) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("root".to_string());
    }
    for f in ["vmlinux", "agent.img", "rootfs"] {
        if !Path::new(SHARE_DIR).join(f).exists() {
            missing.push(format!("{SHARE_DIR}/{f}"));
        }
    }
    for p in ["qemu-system-x86_64", "virtiofsd", "vhost-device-vsock"] {
        if runv::helper::find_program(Path::new(p)).is_none() {
            missing.push(p.to_string());
        }
    }
    if missing.is_empty() {
        return true;
    }
    eprintln!("SKIP {test}: needs {} (run scripts/install.sh as root)", missing.join(", "));
    false
}

impl TestEnv {
    /// A runtime directory of its own and a config with `extra` appended.
    /// `RUNV_TEST_HYPERVISOR=builtin` (set by scripts/test.sh inside the L1
    /// rig) runs every test that does not pick its hypervisor on the
    /// built-in VMM of this build.
    pub fn new(extra: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("runv-test-").tempdir().expect("tempdir");
        let runtime_dir = dir.path().join("run");
        let config = dir.path().join("config.toml");
        let mut text = format!("runtime_dir = \"{}\"\n", runtime_dir.display());
        text.push_str(&cri::hypervisor::test_hypervisor(
            extra,
            Path::new(env!("CARGO_BIN_EXE_runv-vmm")).parent().unwrap(),
        ));
        text.push_str(&format!("{extra}\n"));
        std::fs::write(&config, text).expect("config");
        Self { dir, config, runtime_dir }
    }

    pub fn runv(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_runv"));
        cmd.arg("--config").arg(&self.config).env_remove("RUNV_LOG");
        cmd
    }

    /// `runv run ARGS`, stdin from /dev/null.
    pub fn run(&self, args: &[&str]) -> Output {
        self.runv().arg("run").args(args).stdin(std::process::Stdio::null()).output().expect("spawning runv")
    }

    /// Everything a sandbox of this test left behind: sandbox directories,
    /// processes and mounts that mention the test's directory.
    pub fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.runtime_dir.join("sandboxes")) {
            for e in entries.flatten() {
                found.push(format!("sandbox dir {}", e.path().display()));
            }
        }
        let needle = self.dir.path().to_string_lossy().into_owned();
        for pid in processes_mentioning(&needle) {
            found.push(format!("process {pid}"));
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for line in mounts.lines().filter(|l| l.contains(&needle)) {
            found.push(format!("mount {line}"));
        }
        // A uid lease names its sandbox's directory.
        for e in std::fs::read_dir(runv::jailer::LEASE_DIR).into_iter().flatten().flatten() {
            if std::fs::read_to_string(e.path()).unwrap_or_default().contains(&needle) {
                found.push(format!("uid lease {}", e.path().display()));
            }
        }
        found
    }

    /// Waits up to 5 s for the census to come back empty (helpers are reaped
    /// asynchronously after a forced exit) and returns what remains.
    pub fn settled_leftovers(&self) -> Vec<String> {
        for _ in 0..50 {
            if self.leftovers().is_empty() {
                return Vec::new();
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        self.leftovers()
    }

    /// A writable copy of the default rootfs inside the test directory.
    pub fn rootfs_copy(&self) -> PathBuf {
        let dst = self.dir.path().join("rootfs");
        let ok = Command::new("cp").arg("-a").arg(Path::new(SHARE_DIR).join("rootfs")).arg(&dst).status().expect("cp");
        assert!(ok.success(), "copying the rootfs");
        dst
    }
}

/// cgroup directories named `name` under runv's default parent, in every
/// hierarchy under /sys/fs/cgroup (v1) or the unified one (v2).
pub fn cgroups_named(name: &str) -> Vec<std::path::PathBuf> {
    let root = std::path::Path::new("/sys/fs/cgroup");
    let mut dirs = vec![root.join("runv").join(name)];
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        dirs.push(e.path().join("runv").join(name));
    }
    dirs.into_iter().filter(|d| d.is_dir()).collect()
}

pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
