//! End to end: `runv run` boots a real guest (QEMU; TCG where KVM cannot
//! boot Linux), runs a command and leaves nothing behind.
//!
//! Run alone with `cargo test --release --test e2e_run`.

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{e2e_ready, stderr, stdout, TestEnv};

macro_rules! require_e2e {
    ($name:expr) => {
        if !e2e_ready($name) {
            return;
        }
    };
}

fn assert_clean(env: &TestEnv) {
    let left = env.settled_leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}");
}

/// What /proc says of a process.
fn proc_status(pid: &str, field: &str) -> String {
    status_field(&std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default(), field)
}

/// The first word of `field` in a `/proc/PID/status` text.
fn status_field(status: &str, field: &str) -> String {
    status.lines().find_map(|l| l.strip_prefix(field)).unwrap_or("?").split_whitespace().next().unwrap_or("?").into()
}

/// During `runv run`, /proc shows the VM process (QEMU or runv-vmm) and
/// vhost-device-vsock as the sandbox's own uid, with no capability and
/// no_new_privs, the VM process under seccomp with only its jail directory
/// for a root (runv-vmm also in mount, network, PID, IPC and UTS
/// namespaces of its own, its reaper outside the PID one unprivileged),
/// all in the sandbox's cgroup; afterwards nothing of the jail is left.
#[test]
fn the_vm_runs_jailed_and_the_jail_goes_with_it() {
    require_e2e!("the_vm_runs_jailed_and_the_jail_goes_with_it");
    let env = TestEnv::new("boot_timeout_secs = 120");
    let mut child = env.runv().args(["run", "--", "sleep", "8"]).stdin(Stdio::null()).spawn().unwrap();
    let needle = env.dir.path().to_string_lossy().into_owned();
    let program = common::cri::hypervisor::vm_program();
    let deadline = Instant::now() + Duration::from_secs(120);
    // The VM process drops root once its devices are open, then installs
    // its seccomp filter (QEMU the other way round).
    let vm = loop {
        let found = common::processes_mentioning(&needle).into_iter().find(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let name = String::from_utf8_lossy(cmdline.split(|b| *b == 0).next().unwrap_or_default()).into_owned();
            // One reading of its status: the reaper names itself, drops
            // root and installs its filter within microseconds of the
            // fork, and field-by-field readings (its old name, then its
            // new uid and filter) once took it for the VMM (twice in L1).
            // A jailed runv-vmm is also told by its own PID namespace (two
            // NSpid entries), which the reaper stays outside of.
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let own_pid_namespace = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .is_some_and(|ids| ids.split_whitespace().count() > 1);
            name.rsplit('/').next().unwrap_or_default().starts_with(program)
                && status_field(&status, "Name:") != "runv-vmm-reaper"
                && (program != "runv-vmm" || own_pid_namespace)
                && status_field(&status, "Uid:") != "0"
                && status_field(&status, "Seccomp:") == "2"
        });
        if let Some(pid) = found {
            break pid.to_string();
        }
        assert!(Instant::now() < deadline, "no {program} process gave up root under seccomp: {:?}", env.leftovers());
        std::thread::sleep(Duration::from_millis(50));
    };
    let uid: u32 = proc_status(&vm, "Uid:").parse().unwrap();
    assert!(uid >= 990_000_000, "uid {uid} is not from the jail range");
    assert_eq!(proc_status(&vm, "CapEff:"), "0000000000000000");
    assert_eq!(proc_status(&vm, "NoNewPrivs:"), "1");
    // Its root is the jail directory: its sockets, none of the host's files.
    let root = std::path::PathBuf::from(format!("/proc/{vm}/root"));
    if !root.join("vsock.sock").exists() {
        // Say whether the VM was still there.
        let alive = std::path::Path::new(&format!("/proc/{vm}")).exists();
        panic!(
            "the jail holds the vsock socket: not in {} (VM process alive: {alive}, runv: {:?})",
            root.display(),
            child.try_wait()
        );
    }
    assert!(!root.join("etc").exists() && !root.join("usr").exists(), "the host's files are in the jail");
    let ns = |pid: &str, kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap();
    if program == "runv-vmm" {
        for kind in ["mnt", "net", "pid", "ipc", "uts"] {
            assert_ne!(ns(&vm, kind), ns("self", kind), "runv-vmm shares the host's {kind} namespace");
        }
        // Outside its PID namespace, the process runv started waits for it,
        // as unprivileged and as filtered.
        let stat = std::fs::read_to_string(format!("/proc/{vm}/stat")).unwrap();
        let reaper = stat.rsplit_once(')').unwrap().1.split_whitespace().nth(1).unwrap().to_string();
        assert_eq!(proc_status(&reaper, "Name:"), "runv-vmm-reaper");
        assert_eq!(proc_status(&reaper, "Uid:"), uid.to_string());
        assert_eq!(proc_status(&reaper, "CapEff:"), "0000000000000000");
        assert_eq!(proc_status(&reaper, "NoNewPrivs:"), "1");
        assert_eq!(proc_status(&reaper, "Seccomp:"), "2");
        let fds = std::fs::read_dir(format!("/proc/{reaper}/fd")).unwrap().count();
        assert!(fds <= 4, "the reaper holds {fds} descriptors (stdio and one pipe at most)");
    } else {
        let vsock = common::processes_mentioning("--uds-path=vsock.sock")
            .into_iter()
            .find(|p| std::fs::read_link(format!("/proc/{p}/cwd")).is_ok_and(|c| c.starts_with(&needle)))
            .expect("vhost-device-vsock runs in the jail directory");
        assert_eq!(proc_status(&vsock.to_string(), "Uid:"), uid.to_string());
        assert_eq!(proc_status(&vsock.to_string(), "CapEff:"), "0000000000000000");
        // QEMU starts as root: it is handed its vhost-user connections
        // rather than resolving socket names in the jail-owned directory.
        let args = String::from_utf8_lossy(&std::fs::read(format!("/proc/{vm}/cmdline")).unwrap()).replace('\0', " ");
        for id in ["vsock", "fs"] {
            assert!(
                args.contains(&format!("socket,id={id},fd=")),
                "QEMU's {id} chardev is not a passed connection: {args}"
            );
        }
        assert!(!args.contains(",path="), "QEMU resolves a socket name itself: {args}");
    }
    let cgroup = std::fs::read_to_string(format!("/proc/{vm}/cgroup")).unwrap();
    let line = cgroup
        .lines()
        .find(|l| l.starts_with("0::") && !l.ends_with("::/"))
        .or_else(|| cgroup.lines().find(|l| l.split(':').nth(1) == Some("memory")))
        .unwrap_or_default();
    let sandbox_cgroup = line.rsplit(':').next().unwrap_or_default().to_string();
    assert!(sandbox_cgroup.starts_with("/runv/"), "the VM is not in its sandbox's cgroup: {cgroup}");
    // A stalled guest must fail the test, not hang it.
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("runv run did not end within 300 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(0));
    assert_clean(&env);
    let name = sandbox_cgroup.rsplit('/').next().unwrap();
    assert!(common::cgroups_named(name).is_empty(), "the sandbox's cgroup is left");
}

/// Nothing in a guest but the agent may make a vsock socket: the agent's
/// filter reaches every container, whatever profile it asked for.
#[test]
fn a_container_runs_under_the_agents_vsock_filter() {
    require_e2e!("a_container_runs_under_the_agents_vsock_filter");
    let env = TestEnv::new("");
    let out = env.run(&["--", "grep", "Seccomp:", "/proc/self/status"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out).split_whitespace().collect::<Vec<_>>(), ["Seccomp:", "2"]);
    assert_clean(&env);
}

#[test]
fn run_prints_the_guest_kernel_release_not_the_hosts() {
    require_e2e!("run_prints_the_guest_kernel_release_not_the_hosts");
    let env = TestEnv::new("");
    let out = env.run(&["--", "uname", "-r"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let guest = stdout(&out).trim().to_string();
    let host = nix::sys::utsname::uname().unwrap().release().to_string_lossy().into_owned();
    assert!(guest.starts_with("6.1."), "guest release '{guest}'");
    assert_ne!(guest, host, "the command ran on the host");
    assert_clean(&env);
}

#[test]
fn run_streams_stdout_and_stderr_and_returns_the_exit_code() {
    require_e2e!("run_streams_stdout_and_stderr_and_returns_the_exit_code");
    let env = TestEnv::new("");
    let out = env.run(&["--", "sh", "-c", "echo out1; echo err1 >&2; echo out2; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "out1\nout2\n");
    assert!(stderr(&out).contains("err1\n"), "stderr: {}", stderr(&out));
    assert_clean(&env);
}

#[test]
fn run_reports_death_by_signal_as_128_plus_signal() {
    require_e2e!("run_reports_death_by_signal_as_128_plus_signal");
    let env = TestEnv::new("");
    let out = env.run(&["--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(137), "stderr: {}", stderr(&out));
    assert_clean(&env);
}

#[test]
fn run_forwards_stdin_byte_for_byte() {
    require_e2e!("run_forwards_stdin_byte_for_byte");
    let env = TestEnv::new("");
    // 1 MiB of varied bytes, counted and summed inside the guest.
    let data: Vec<u8> = (0..1024 * 1024u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let mut child = env
        .runv()
        .args(["run", "--", "sh", "-c", "wc -c; echo done"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // A runv that ends early breaks the pipe: its stderr says why, first.
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    let written = writer.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    written.expect("writing runv's stdin");
    assert_eq!(stdout(&out).split_whitespace().collect::<Vec<_>>(), ["1048576", "done"]);

    let echo = env.runv().args(["run", "--", "cat"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut echo = echo;
    echo.stdin.take().unwrap().write_all(b"hello from the host\n").unwrap();
    let out = echo.wait_with_output().unwrap();
    assert_eq!(stdout(&out), "hello from the host\n");
    assert_clean(&env);
}

#[test]
fn run_shares_a_writable_rootfs_and_keeps_the_default_read_only() {
    require_e2e!("run_shares_a_writable_rootfs_and_keeps_the_default_read_only");
    let env = TestEnv::new("");
    let rootfs = env.rootfs_copy();
    std::fs::write(rootfs.join("from-host"), "host data\n").unwrap();
    let out = env.run(&[
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "cat /from-host; echo guest data > /from-guest",
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "host data\n");
    assert_eq!(std::fs::read_to_string(rootfs.join("from-guest")).unwrap(), "guest data\n");

    let out = env.run(&["--", "sh", "-c", "touch /x"]);
    assert_ne!(out.status.code(), Some(0), "the default rootfs must be read-only");
    assert!(stderr(&out).contains("Read-only file system"), "stderr: {}", stderr(&out));
    assert_clean(&env);
}

#[test]
fn run_sizes_the_vm_from_cpus_and_memory() {
    require_e2e!("run_sizes_the_vm_from_cpus_and_memory");
    let env = TestEnv::new("");
    let out = env.run(&["--cpus", "2", "--memory", "192", "--", "sh", "-c", "nproc; head -1 /proc/meminfo"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("2"));
    let total_kib: u64 = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!((150 * 1024..=192 * 1024).contains(&total_kib), "MemTotal {total_kib} KiB");
    assert_clean(&env);
}

#[test]
fn run_gives_a_terminal_with_tty() {
    require_e2e!("run_gives_a_terminal_with_tty");
    let env = TestEnv::new("");
    let out = env.run(&["-t", "--", "sh", "-c", "[ -t 0 ] && [ -t 1 ] && echo is-a-tty; tty"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("is-a-tty"), "stdout: {text}");
    assert!(text.contains("/dev/pts/"), "stdout: {text}");
    assert_clean(&env);
}

#[test]
fn command_not_found_exits_127_with_one_line() {
    require_e2e!("command_not_found_exits_127_with_one_line");
    let env = TestEnv::new("accel = \"auto\"");
    let out = env.run(&["--", "no-such-command"]);
    assert_eq!(out.status.code(), Some(127));
    let err = stderr(&out);
    let line = err.lines().find(|l| l.contains("no-such-command")).unwrap_or_default();
    assert!(line.contains("not found"), "stderr: {err}");
    assert_clean(&env);
}

#[test]
fn the_command_runs_in_an_isolated_container() {
    require_e2e!("the_command_runs_in_an_isolated_container");
    let env = TestEnv::new("");
    let script = "hostname; ls /proc | grep -c '^[0-9]'; grep CapEff /proc/self/status; cat /proc/1/cmdline | tr '\\0' ' '; echo";
    let out = env.run(&["--", "sh", "-c", script]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "runv", "hostname: {text}");
    // Its own PID namespace: the init, the shell, ls and grep at most.
    let pids: u32 = lines[1].parse().unwrap();
    assert!(pids <= 5, "{pids} processes visible: {text}");
    // Docker's default capability set, not the agent's full one.
    assert_eq!(lines[2], "CapEff:\t00000000a80425fb");
    assert!(lines[3].starts_with("/dev/runv-init init -- sh -c"), "PID 1 is {}", lines[3]);
    assert_clean(&env);
}

#[test]
fn missing_rootfs_is_a_one_line_error_before_anything_starts() {
    require_e2e!("missing_rootfs_is_a_one_line_error_before_anything_starts");
    let env = TestEnv::new("");
    let out = env.run(&["--rootfs", "/nonexistent/rootfs", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(stderr(&out), "runv: error: rootfs '/nonexistent/rootfs' does not exist or is not a directory\n");
    assert!(!env.runtime_dir.join("sandboxes").exists() || env.leftovers().is_empty());
}

#[test]
fn missing_kernel_is_a_one_line_error() {
    require_e2e!("missing_kernel_is_a_one_line_error");
    let env = TestEnv::new("kernel = \"/nonexistent/vmlinux\"");
    let out = env.run(&["--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "stderr: {err}");
    assert!(err.contains("guest kernel /nonexistent/vmlinux not found"), "stderr: {err}");
    assert_clean(&env);
}

#[test]
fn a_guest_that_never_answers_times_out_and_is_torn_down() {
    require_e2e!("a_guest_that_never_answers_times_out_and_is_torn_down");
    let probe = TestEnv::new("");
    // An agent image whose init sleeps instead of serving the agent.
    let stage = probe.dir.path().join("stage");
    std::fs::create_dir_all(stage.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", stage.join("bin/busybox")).unwrap();
    std::fs::write(stage.join("init"), "#!/bin/busybox sh\nexec /bin/busybox sleep 1000\n").unwrap();
    std::process::Command::new("chmod").arg("755").arg(stage.join("init")).status().unwrap();
    let image = probe.dir.path().join("silent.img");
    std::fs::File::create(&image).unwrap().set_len(8 << 20).unwrap();
    let status = std::process::Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-O", "^has_journal", "-d"])
        .arg(&stage)
        .arg(&image)
        .status()
        .unwrap();
    assert!(status.success());

    let env = TestEnv::new(&format!("agent_image = \"{}\"\nboot_timeout_secs = 4\naccel = \"tcg\"", image.display()));
    let started = Instant::now();
    let out = env.run(&["--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "stderr: {err}");
    assert!(err.contains("did not answer within 4s"), "stderr: {err}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_clean(&env);
}

#[test]
fn a_guest_that_dies_while_booting_is_reported() {
    require_e2e!("a_guest_that_dies_while_booting_is_reported");
    // No init at that path: the kernel panics, and panic=-1 ends the VM.
    let env = TestEnv::new("kernel_params = \"init=/no-such-init\"\naccel = \"tcg\"");
    let out = env.run(&["--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "stderr: {err}");
    assert!(err.contains("the VM exited while booting"), "stderr: {err}");
    assert_clean(&env);
}

fn interrupt_after(env: &TestEnv, wait_for_guest: bool) -> std::process::Output {
    let marker = env.dir.path().join("rootfs/started");
    let rootfs = env.rootfs_copy();
    let child = env
        .runv()
        .args(["run", "--rootfs", rootfs.to_str().unwrap(), "--", "sh", "-c", "touch /started; exec sleep 100"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    if wait_for_guest {
        while !marker.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(marker.exists(), "the command never started");
    } else {
        // Mid-boot: the sandbox directory exists, the agent is not up yet.
        let sandboxes = env.runtime_dir.join("sandboxes");
        let started = || std::fs::read_dir(&sandboxes).map(|mut d| d.next().is_some()).unwrap_or(false);
        while !started() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(started(), "no sandbox directory appeared");
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn ctrl_c_reaches_the_command_and_everything_is_torn_down() {
    require_e2e!("ctrl_c_reaches_the_command_and_everything_is_torn_down");
    let env = TestEnv::new("");
    let out = interrupt_after(&env, true);
    // sleep dies of the forwarded SIGINT: 128 + 2.
    assert_eq!(out.status.code(), Some(130), "stderr: {}", stderr(&out));
    assert_clean(&env);
}

#[test]
fn ctrl_c_while_booting_tears_everything_down() {
    require_e2e!("ctrl_c_while_booting_tears_everything_down");
    let env = TestEnv::new("");
    let out = interrupt_after(&env, false);
    assert_eq!(out.status.code(), Some(130), "stderr: {}", stderr(&out));
    assert_clean(&env);
}

#[test]
fn killed_runv_leaves_no_helper_running() {
    require_e2e!("killed_runv_leaves_no_helper_running");
    let env = TestEnv::new("");
    let mut child = env.runv().args(["run", "--", "sleep", "100"]).stdin(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::processes_mentioning(&env.dir.path().to_string_lossy()).len() < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // The sandbox directory stays (nobody ran its cleanup), but no process
    // may outlive runv: the helpers die with it.
    for _ in 0..50 {
        if common::processes_mentioning(&env.dir.path().to_string_lossy()).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = common::processes_mentioning(&env.dir.path().to_string_lossy());
    assert!(left.is_empty(), "processes left: {left:?}");
    // The next sandbox start cleans up after the dead one: its directory,
    // its cgroups, its uid lease.
    let sandboxes = env.runtime_dir.join("sandboxes");
    let orphans: Vec<_> = std::fs::read_dir(&sandboxes).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(orphans.len(), 1, "the killed run's sandbox directory stays until then");
    let out = env.run(&["--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_dir(&sandboxes).unwrap().count(), 0, "the orphan's directory is removed");
    let orphan = orphans[0].to_string_lossy().into_owned();
    let cgroups = common::cgroups_named(&orphan);
    assert!(cgroups.is_empty(), "the orphan's cgroups are left: {cgroups:?}");
    let leases: Vec<_> = std::fs::read_dir("/run/runv/jail-uids")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| std::fs::read_to_string(e.path()).unwrap_or_default().contains(&orphan))
        .collect();
    assert!(leases.is_empty(), "the orphan's uid lease is left: {leases:?}");
}
