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
