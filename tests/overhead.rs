//! `runv overhead` on a real sandbox: every part measured, the parts adding
//! up, and a RuntimeClass that validates against the Kubernetes schemas.

mod common;

use common::{e2e_ready, stderr, stdout, TestEnv};

#[test]
fn overhead_measures_every_part_and_they_add_up() {
    if !e2e_ready("overhead_measures_every_part_and_they_add_up") {
        return;
    }
    let env = TestEnv::new("");
    let out = env.runv().args(["overhead", "--format", "json", "--settle", "1", "--window", "1"]).output().unwrap();
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let parts = report["parts"].as_array().unwrap();
    let names: Vec<&str> = parts.iter().map(|p| p["name"].as_str().unwrap()).collect();
    for wanted in ["guest kernel", "agent", "pause", "qemu", "virtiofsd", "vhost-device", "runv"] {
        assert!(names.iter().any(|n| n.starts_with(wanted)), "no {wanted} part in {names:?}");
    }
    let mut sum = 0;
    for p in parts {
        let kib = p["memory_kib"].as_u64().unwrap();
        assert!(kib > 0, "part {} measured 0", p["name"]);
        sum += kib;
    }
    assert_eq!(sum, report["total_memory_kib"].as_u64().unwrap());
    assert!(env.settled_leftovers().is_empty(), "left: {:?}", env.leftovers());
}

#[test]
fn the_runtime_class_validates_and_its_quantities_are_well_formed() {
    if !e2e_ready("the_runtime_class_validates_and_its_quantities_are_well_formed") {
        return;
    }
    let env = TestEnv::new("");
    let out = env.runv().args(["overhead", "--format", "yaml", "--settle", "1", "--window", "1"]).output().unwrap();
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let yaml = stdout(&out);
    let memory = yaml.lines().find_map(|l| l.trim().strip_prefix("memory: ")).unwrap().trim_matches('"');
    let cpu = yaml.lines().find_map(|l| l.trim().strip_prefix("cpu: ")).unwrap().trim_matches('"');
    let mib: u64 = memory.strip_suffix("Mi").expect("memory in Mi").parse().expect("a whole number of Mi");
    let millicores: u64 = cpu.strip_suffix('m').expect("cpu in m").parse().expect("a whole number of m");
    assert!(mib > 0 && millicores >= 10, "{yaml}");
    let file = env.dir.path().join("runtimeclass.yaml");
    std::fs::write(&file, &yaml).unwrap();
    match std::process::Command::new("kubernetes-validate").arg("--strict").arg(&file).output() {
        Ok(v) => assert!(v.status.success(), "kubernetes-validate: {}{}\n{yaml}", stdout(&v), stderr(&v)),
        Err(e) => panic!("kubernetes-validate is missing ({e}); scripts/test.sh installs it from PyPI"),
    }
}
