//! `runv check` and configuration errors, through the binary.

mod common;

use common::{stderr, stdout, TestEnv};

#[test]
fn check_prints_a_verdict_and_an_exit_status_scripts_can_use() {
    let env = TestEnv::new("");
    let out = env.runv().arg("check").output().unwrap();
    let text = stdout(&out);
    let verdict = text.lines().last().unwrap_or_default();
    assert!(verdict.starts_with("verdict: "), "stdout: {text}");
    let ready = verdict.starts_with("verdict: ready");
    assert_eq!(out.status.success(), ready, "stdout: {text}");
    for item in ["kvm", "qemu", "virtiofsd", "vhost-device-vsock", "kernel", "agent_image", "cgroup"] {
        assert!(text.lines().any(|l| l.split_whitespace().nth(1) == Some(item)), "no '{item}' line in: {text}");
    }
    let strict = env.runv().args(["check", "--require-kvm"]).output().unwrap();
    let kvm = verdict.contains("KVM boots the guest") || verdict.contains("built-in VMM on KVM");
    assert_eq!(strict.status.success(), ready && kvm);
    assert!(text.lines().any(|l| l.split_whitespace().nth(1) == Some("builtin-vmm")), "no builtin-vmm line: {text}");
}

#[test]
fn check_fails_when_the_kernel_is_missing() {
    let env = TestEnv::new("kernel = \"/nonexistent/vmlinux\"");
    let out = env.runv().arg("check").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("FAIL kernel"), "stdout: {text}");
    assert!(text.lines().last().unwrap().starts_with("verdict: not ready (fix: kernel"), "stdout: {text}");
}

#[test]
fn an_unknown_config_key_is_named() {
    let env = TestEnv::new("memory = 512");
    let out = env.runv().args(["run", "--", "true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert!(err.contains("unknown field `memory`") && err.contains("config.toml"), "stderr: {err}");
}

#[test]
fn bad_sizes_are_refused_before_anything_starts() {
    let env = TestEnv::new("");
    for (args, key) in [(["--cpus", "0"], "--cpus"), (["--memory", "999999999"], "--memory")] {
        let out = env.runv().arg("run").args(args).args(["--", "true"]).output().unwrap();
        assert_eq!(out.status.code(), Some(125));
        assert!(stderr(&out).contains(key), "stderr: {}", stderr(&out));
    }
    assert!(env.leftovers().is_empty());
}
