//! `runv vmm` as a process under this machine's KVM, confined (seccomp,
//! no capabilities), booting a tiny PVH guest through the same ELF loader
//! and boot code a kernel gets. Skips with a printed reason without KVM.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::kvm_or_skip;
use runv::vmm::process::{tiny_elf, tiny_pvh_elf, tiny_serial_code};

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
fn without_a_pvh_note_the_guest_enters_64_bit_mode_with_boot_params() {
    if !kvm_or_skip("without_a_pvh_note_the_guest_enters_64_bit_mode_with_boot_params") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny64.elf");
    // Print the low byte of boot_params.hdr.boot_flag (0xaa55) at rsi+0x1fe,
    // then reset.
    let mut code = vec![0x8a, 0x86, 0xfe, 0x01, 0x00, 0x00]; // mov al, [rsi+0x1fe]
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xee]); // mov dx, 0x3f8; out dx, al
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4]); // i8042 reset
    std::fs::write(&kernel, tiny_elf(&code, false)).unwrap();
    let out = vmm(&kernel).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, [0x55]);
}

#[test]
fn a_pvh_guest_finds_the_start_info_in_ebx() {
    if !kvm_or_skip("a_pvh_guest_finds_the_start_info_in_ebx") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("pvh.elf");
    // The low byte of hvm_start_info.magic (0x336ec578), then nr_modules
    // (0: no initramfs) as a digit.
    let mut code = vec![0x8a, 0x03]; // mov al, [ebx]
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xee]); // mov dx, 0x3f8; out dx, al
    code.extend_from_slice(&[0x8a, 0x43, 0x0c, 0x04, b'0', 0xee]); // mov al, [ebx+12]; add al, '0'; out dx, al
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4]);
    std::fs::write(&kernel, tiny_pvh_elf(&code)).unwrap();
    let out = vmm(&kernel).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, [0x78, b'0']);
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
