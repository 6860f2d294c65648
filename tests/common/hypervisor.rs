//! Which hypervisor the end-to-end tests run on: one rule for every test
//! harness (runv run, `runv cri`, containerd's shims).

use std::path::{Path, PathBuf};

/// The config lines that put a test's sandboxes on the built-in VMM of
/// this build when `RUNV_TEST_HYPERVISOR` says so (scripts/test.sh sets it
/// inside the L1 rig) and `extra` picks no hypervisor of its own; `vmm_dir`
/// holds this build's runv-vmm.
pub fn test_hypervisor(extra: &str, vmm_dir: &Path) -> String {
    match std::env::var("RUNV_TEST_HYPERVISOR") {
        Ok(h) if !extra.contains("hypervisor") => {
            let vmm = vmm_dir.join("runv-vmm");
            let vmm = if vmm.is_file() { vmm } else { PathBuf::from("runv-vmm") };
            format!("hypervisor = \"{h}\"\nvmm = \"{}\"\n", vmm.display())
        }
        _ => String::new(),
    }
}

/// The program a test VM runs as under the hypervisor the tests run on
/// (`RUNV_TEST_HYPERVISOR`; QEMU otherwise, as on this development host),
/// for tests that find a pod's VM among the host's processes.
pub fn vm_program() -> &'static str {
    match std::env::var("RUNV_TEST_HYPERVISOR").as_deref() {
        Ok("builtin") => "runv-vmm",
        _ => "qemu-system",
    }
}

/// How a sandbox's figures name the backend its VM ran on under the
/// hypervisor the tests run on (a prefix: QEMU's accelerator is the host's).
pub fn backend_prefix() -> &'static str {
    match std::env::var("RUNV_TEST_HYPERVISOR").as_deref() {
        Ok("builtin") => "runv-vmm/kvm",
        _ => "qemu/",
    }
}

/// The command lines of the VM processes whose command line mentions
/// `needle` (a test's own directory).
pub fn vm_processes(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline =
            String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).unwrap_or_default()).replace('\0', " ");
        let program = cmdline.split(' ').next().unwrap_or_default();
        // A jailed runv-vmm is two processes: the VMM and, outside its PID
        // namespace, its reaper; one VM.
        let reaper = is_vmm_reaper(&e.path());
        if cmdline.contains(needle)
            && !reaper
            && Path::new(program).file_name().is_some_and(|f| f.to_string_lossy().starts_with(vm_program()))
        {
            found.push(cmdline);
        }
    }
    found
}

/// Whether the process at `proc_dir` (`/proc/PID`) is a jailed runv-vmm's
/// reaper: it names itself so a moment after it forks the VMM, and until
/// then it is already the parent of a runv-vmm.
pub fn is_vmm_reaper(proc_dir: &Path) -> bool {
    if std::fs::read_to_string(proc_dir.join("comm")).is_ok_and(|c| c.trim() == "runv-vmm-reaper") {
        return true;
    }
    let Some(pid) = proc_dir.file_name() else { return false };
    let children = std::fs::read_to_string(proc_dir.join("task").join(pid).join("children")).unwrap_or_default();
    children.split_whitespace().any(|child| {
        let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        Path::new(&*String::from_utf8_lossy(argv0)).file_name().is_some_and(|f| f.to_string_lossy() == "runv-vmm")
    })
}
