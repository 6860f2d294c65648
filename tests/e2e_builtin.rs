//! End to end on the built-in VMM: `runv run` with `hypervisor = "builtin"`
//! (runv-vmm: KVM, hybrid vsock to the agent, virtio-fs through virtiofsd).
//! Where `runv check` finds the built-in VMM can boot the guest, the
//! end-to-end scenarios run on it; elsewhere (this development machine's
//! nested KVM stops the guest kernel at FPU setup) they print SKIP with the
//! probe's reason, and what is checked instead is that the failure is one
//! clear line and leaves nothing behind.
//!
//! Run alone with `cargo test --release --test e2e_builtin`; scripts/test.sh
//! also runs it inside the L1 rig (scripts/l1.sh), where KVM boots Linux
//! and `RUNV_EXPECT_BUILTIN=1` turns a skip into a failure.

mod common;

use std::io::Write;
use std::process::Stdio;

use common::{e2e_ready, stderr, stdout, TestEnv};

fn builtin_env() -> TestEnv {
    TestEnv::new(&format!("hypervisor = \"builtin\"\nvmm = \"{}\"", env!("CARGO_BIN_EXE_runv-vmm")))
}

/// Whether the built-in VMM boots the guest here; prints why not otherwise.
fn builtin_boots(env: &TestEnv, test: &str) -> bool {
    let config = runv::config::Config::load(Some(&env.config)).unwrap();
    match runv::check::builtin_boots_guest(&config) {
        Ok(()) => true,
        Err(why) if std::env::var_os("RUNV_EXPECT_BUILTIN").is_some() => {
            panic!("{test}: RUNV_EXPECT_BUILTIN is set (the L1 rig) but runv check says the built-in VMM cannot boot the guest: {why}")
        }
        Err(why) => {
            eprintln!("SKIP {test} on the built-in VMM: runv check says it cannot boot the guest here ({why})");
            false
        }
    }
}

#[test]
fn run_on_the_builtin_vmm_streams_output_stdin_and_the_exit_code() {
    let test = "run_on_the_builtin_vmm_streams_output_stdin_and_the_exit_code";
    if !e2e_ready(test) {
        return;
    }
    let env = builtin_env();
    if !builtin_boots(&env, test) {
        // The same request fails in one clear line and leaves nothing.
        let out = env.run(&["--", "true"]);
        assert_eq!(out.status.code(), Some(125));
        let err = stderr(&out);
        assert!(err.starts_with("runv: error: ") && err.contains("runv vmm: error"), "stderr: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "stderr: {err}");
        let left = env.settled_leftovers();
        assert!(left.is_empty(), "left behind: {left:#?}");
        return;
    }
    let out = env.run(&["--", "uname", "-r"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(stdout(&out).starts_with("6.1."), "{}", stdout(&out));

    let out = env.run(&["--", "sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!((out.status.code(), stdout(&out).as_str(), stderr(&out).as_str()), (Some(3), "out\n", "err\n"));

    let mut child = env.runv().args(["run", "--", "cat"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    // A runv that ends early breaks the pipe: its stderr says why, first.
    let written = child.stdin.take().unwrap().write_all(&data);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    written.expect("writing runv's stdin");
    assert_eq!(out.stdout, data);

    let left = env.settled_leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}");
}
