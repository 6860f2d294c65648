//! End to end through Debian's containerd and ctr: a containerd of the
//! test's own (root, state, socket), an image made at test time, and
//! `--runtime io.containerd.runv.v2`.
//!
//! Run alone with `cargo test --release -p containerd-shim-runv-v2`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SHARE_DIR: &str = "/usr/local/share/runv";
const IMAGE: &str = "docker.io/library/runv-test:latest";

struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
}

fn ready(test: &str) -> bool {
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
    for f in ["vmlinux", "initramfs.cpio", "rootfs"] {
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
    fn start(runv_config: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("runv-ctd-").tempdir().unwrap();
        let d = dir.path().to_path_buf();
        std::fs::write(
            d.join("config.toml"),
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n[grpc]\n  address = \"{0}/containerd.sock\"\n[ttrpc]\n  address = \"{0}/containerd.sock.ttrpc\"\n",
                d.display()
            ),
        )
        .unwrap();
        std::fs::write(d.join("runv.toml"), format!("runtime_dir = \"{}/run\"\n{runv_config}\n", d.display())).unwrap();
        let shim_dir = Path::new(env!("CARGO_BIN_EXE_containerd-shim-runv-v2")).parent().unwrap().to_path_buf();
        let path = format!("{}:{}", shim_dir.display(), std::env::var("PATH").unwrap_or_default());
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .env("PATH", path)
            .env("RUNV_CONFIG", d.join("runv.toml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let ctd = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ctd.socket().exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(ctd.socket().exists(), "containerd did not start: {}", ctd.log());
        let image = d.join("image.tar");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/make-oci-image.sh");
        let made =
            Command::new(script).arg(Path::new(SHARE_DIR).join("rootfs")).arg(IMAGE).arg(&image).status().unwrap();
        assert!(made.success(), "making the test image");
        let out = ctd.ctr(&["images", "import", image.to_str().unwrap()]);
        assert!(out.status.success(), "ctr images import: {}", String::from_utf8_lossy(&out.stderr));
        ctd
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("-a").arg(self.socket()).args(["-n", "runv-test"]).args(args).stdin(Stdio::null());
        cmd
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args).output().unwrap()
    }

    /// What the test's sandboxes left: runv state, processes, mounts.
    fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        let run = self.dir.path().join("run");
        for sub in ["sandboxes", "shim/runv-test"] {
            for e in std::fs::read_dir(run.join(sub)).into_iter().flatten().flatten() {
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

    fn assert_clean(&self) {
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

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn ctr_run_prints_the_guest_output_and_exit_code_and_leaves_nothing() {
    if !ready("ctr_run_prints_the_guest_output_and_exit_code_and_leaves_nothing") {
        return;
    }
    let ctd = Containerd::start("");
    let out = ctd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        "io.containerd.runv.v2",
        IMAGE,
        "c1",
        "sh",
        "-c",
        "echo hello; uname -r; echo oops >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}\nlog: {}", text(&out.stderr), ctd.log());
    let stdout = text(&out.stdout);
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "hello");
    assert!(lines[1].starts_with("6.1.") && lines[1] != host.trim(), "kernel {}", lines[1]);
    assert!(text(&out.stderr).contains("oops"), "stderr: {}", text(&out.stderr));
    ctd.assert_clean();
}

#[test]
fn exec_kill_and_delete_through_ctr_task() {
    if !ready("exec_kill_and_delete_through_ctr_task") {
        return;
    }
    let ctd = Containerd::start("");
    let run = ctd.ctr(&[
        "run",
        "-d",
        "--runtime",
        "io.containerd.runv.v2",
        IMAGE,
        "c2",
        "sh",
        "-c",
        "echo started > /tmp/state; exec sleep 1000",
    ]);
    assert!(run.status.success(), "ctr run -d: {}\nlog: {}", text(&run.stderr), ctd.log());
    let exec = ctd.ctr(&["task", "exec", "--exec-id", "e1", "c2", "sh", "-c", "cat /tmp/state; echo from-exec"]);
    assert_eq!(exec.status.code(), Some(0), "exec: {}", text(&exec.stderr));
    assert_eq!(text(&exec.stdout), "started\nfrom-exec\n");
    let ps = ctd.ctr(&["task", "ps", "c2"]);
    assert!(ps.status.success(), "task ps: {}", text(&ps.stderr));
    let kill = ctd.ctr(&["task", "kill", "-s", "SIGKILL", "c2"]);
    assert!(kill.status.success(), "kill: {}", text(&kill.stderr));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ls = text(&ctd.ctr(&["task", "ls"]).stdout);
        if ls.lines().any(|l| l.starts_with("c2") && l.contains("STOPPED")) {
            break;
        }
        assert!(Instant::now() < deadline, "the task did not stop: {ls}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ctd.ctr(&["task", "rm", "c2"]).status.success());
    assert!(ctd.ctr(&["container", "rm", "c2"]).status.success());
    ctd.assert_clean();
}

#[test]
fn a_missing_kernel_fails_the_task_clearly_and_leaves_nothing() {
    if !ready("a_missing_kernel_fails_the_task_clearly_and_leaves_nothing") {
        return;
    }
    let ctd = Containerd::start("kernel = \"/nonexistent/vmlinux\"");
    let out = ctd.ctr(&["run", "--rm", "--runtime", "io.containerd.runv.v2", IMAGE, "c3", "true"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("guest kernel /nonexistent/vmlinux not found"), "stderr: {err}");
    let _ = ctd.ctr(&["container", "rm", "c3"]);
    ctd.assert_clean();
}

#[test]
fn a_killed_shim_is_cleaned_up_by_containerd() {
    if !ready("a_killed_shim_is_cleaned_up_by_containerd") {
        return;
    }
    let ctd = Containerd::start("");
    let run = ctd.ctr(&["run", "-d", "--runtime", "io.containerd.runv.v2", IMAGE, "c4", "sleep", "1000"]);
    assert!(run.status.success(), "ctr run -d: {}", text(&run.stderr));
    let needle = "-id c4";
    let shim = std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
        let cmdline = text(&std::fs::read(e.path().join("cmdline")).unwrap_or_default()).replace('\0', " ");
        (cmdline.contains("containerd-shim-runv-v2")
            && cmdline.contains(needle)
            && cmdline.contains(&*ctd.dir.path().to_string_lossy()))
        .then(|| e.file_name().to_string_lossy().parse::<i32>().unwrap())
    });
    let shim = shim.expect("the shim process");
    // SAFETY: killing the shim this test started.
    unsafe { libc::kill(shim, libc::SIGKILL) };
    // containerd notices, runs `shim delete`, and that removes the VM.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ls = text(&ctd.ctr(&["task", "ls"]).stdout);
        if !ls.lines().any(|l| l.starts_with("c4") && l.contains("RUNNING")) {
            break;
        }
        assert!(Instant::now() < deadline, "containerd still sees the task running: {ls}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = ctd.ctr(&["task", "rm", "-f", "c4"]);
    let _ = ctd.ctr(&["container", "rm", "c4"]);
    ctd.assert_clean();
    let sockets: Vec<_> = std::fs::read_dir("/run/containerd/s").into_iter().flatten().flatten().collect();
    let ours = sockets.iter().filter(|e| {
        let hash = e.file_name().to_string_lossy().into_owned();
        containerd_shim_socket_hash_matches(&ctd, &hash)
    });
    assert_eq!(ours.count(), 0, "the dead shim's socket is left");
}

/// Whether `hash` names the socket of container c4 of this containerd.
fn containerd_shim_socket_hash_matches(ctd: &Containerd, hash: &str) -> bool {
    let address = ctd.socket().to_string_lossy().into_owned();
    containerd_shim::socket_address(&address, "runv-test", "c4").ends_with(hash)
}
