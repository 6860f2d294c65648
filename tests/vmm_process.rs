//! `runv vmm` as a process under this machine's KVM, confined (seccomp,
//! no capabilities), booting a tiny PVH guest through the same ELF loader
//! and boot code a kernel gets. Skips with a printed reason without KVM.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use runv::vmm::process::{tiny_pvh_elf, tiny_serial_code};

fn kvm_or_skip(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if !ok {
        eprintln!("SKIP {test}: /dev/kvm is absent or not accessible");
    }
    ok
}

fn vmm(kernel: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runv"));
    cmd.arg("vmm").arg("--kernel").arg(kernel).args(["--initramfs", "none", "--memory", "16"]);
    cmd
}

#[test]
fn a_confined_vmm_boots_a_pvh_guest_that_prints_and_resets() {
    if !kvm_or_skip("a_confined_vmm_boots_a_pvh_guest_that_prints_and_resets") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, tiny_pvh_elf(&tiny_serial_code(b"hello from pvh\n"))).unwrap();
    let out = vmm(&kernel).output().unwrap();
    assert!(out.status.success(), "status {:?}, stderr {}", out.status, String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from pvh\n");

    // The console can go to a file; two vCPUs get an MP table; the
    // dedicated runv-vmm binary is the same VMM.
    let log = dir.path().join("console.log");
    let mut lean = Command::new(env!("CARGO_BIN_EXE_runv-vmm"));
    lean.arg("--kernel").arg(&kernel).args(["--initramfs", "none", "--memory", "16"]);
    let out = lean.arg("--console").arg(&log).args(["--vcpus", "2"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "hello from pvh\n");
}

#[test]
fn the_control_socket_stops_a_running_guest() {
    if !kvm_or_skip("the_control_socket_stops_a_running_guest") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("spin.elf");
    // Print, then spin: only a stop request ends it.
    let mut code = vec![0x66, 0xba, 0xf8, 0x03, 0xb0, b's', 0xee];
    code.extend_from_slice(&[0xeb, 0xfe]);
    std::fs::write(&kernel, tiny_pvh_elf(&code)).unwrap();
    let api = dir.path().join("api.sock");
    let mut child = vmm(&kernel).arg("--api-socket").arg(&api).stdout(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut conn = loop {
        if let Ok(c) = UnixStream::connect(&api) {
            break c;
        }
        assert!(Instant::now() < deadline, "no control socket");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    conn.write_all(b"status\n").unwrap();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "running\n");
    line.clear();
    conn.write_all(b"bogus\n").unwrap();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("unknown request 'bogus'"), "{line}");
    line.clear();
    conn.write_all(b"stop\n").unwrap();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "ok\n");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(2));
}

#[test]
fn a_missing_or_non_elf_kernel_is_a_clear_error() {
    if !kvm_or_skip("a_missing_or_non_elf_kernel_is_a_clear_error") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = vmm(&dir.path().join("nope")).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("loading the kernel"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"not an elf at all").unwrap();
    let out = vmm(&junk).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("uncompressed ELF vmlinux"), "{err}");
}
