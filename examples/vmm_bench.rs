//! Benchmark: process start to the first serial byte of a tiny PVH guest,
//! for the built-in VMM (`runv-vmm`, confined as in production) and for
//! `qemu-system-x86_64 -M microvm` booting the same guest under the same
//! KVM, alternating in one run; and the built-in VMM's RSS with a 128 MiB
//! guest. Prints each run, the medians, and `ratio: X` (ours / QEMU) last.
//! Run by tests/bench/vmm.sh.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use runv::vmm::process::tiny_pvh_elf;

/// Print one byte, then spin so the process stays up to be measured.
fn guest() -> Vec<u8> {
    vec![0x66, 0xba, 0xf8, 0x03, 0xb0, b'R', 0xee, 0xeb, 0xfe]
}

fn first_byte(mut cmd: Command) -> (Duration, Child) {
    let started = Instant::now();
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("starting the VMM");
    let mut out = child.stdout.take().unwrap();
    let mut b = [0u8; 1];
    match out.read(&mut b) {
        Ok(1) => (started.elapsed(), child),
        _ => {
            let _ = child.kill();
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("no serial byte from {:?}: {err}", cmd.get_program());
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        eprintln!("vmm_bench needs /dev/kvm");
        std::process::exit(1);
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, tiny_pvh_elf(&guest())).unwrap();
    let vmm = std::env::var("RUNV_VMM_BIN").unwrap_or_else(|_| "runv-vmm".into());
    let ours = || {
        let mut c = Command::new(&vmm);
        c.arg("--kernel").arg(&kernel).args(["--initramfs", "none", "--memory", "128"]);
        c
    };
    let qemu = || {
        let mut c = Command::new("qemu-system-x86_64");
        // (this nested KVM refuses the arch-capabilities MSR QEMU sets for `host`)
        c.args(["-M", "microvm", "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", "128M", "-kernel"])
            .arg(&kernel)
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot"]);
        c
    };
    // Warm the page cache for both.
    for cmd in [ours(), qemu()] {
        let (_, mut child) = first_byte(cmd);
        let _ = child.kill();
        let _ = child.wait();
    }
    let (mut a, mut b, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    for n in 1..=runs {
        let (t_ours, mut child) = first_byte(ours());
        std::thread::sleep(Duration::from_millis(100));
        let r = rss_kib(child.id());
        let _ = child.kill();
        let _ = child.wait();
        let (t_qemu, mut child) = first_byte(qemu());
        let _ = child.kill();
        let _ = child.wait();
        eprintln!("run {n}: runv-vmm {} us (RSS {r} KiB), qemu microvm {} us", t_ours.as_micros(), t_qemu.as_micros());
        a.push(t_ours);
        b.push(t_qemu);
        rss.push(r);
    }
    rss.sort();
    let (a, b) = (median(a), median(b));
    println!("start -> first serial byte, runv-vmm (median of {runs}): {:.1} ms", a.as_secs_f64() * 1e3);
    println!("start -> first serial byte, qemu -M microvm (median of {runs}): {:.1} ms", b.as_secs_f64() * 1e3);
    println!("runv-vmm RSS with a 128 MiB guest (median): {:.1} MiB", rss[rss.len() / 2] as f64 / 1024.0);
    println!("ratio: {:.3}", a.as_secs_f64() / b.as_secs_f64());
}
