//! A container's seccomp profile, from its CRI security context to the
//! OCI `linux.seccomp` the guest's container engine loads.
//!
//! - `RuntimeDefault` (and the names `runtime/default`, `docker/default`):
//!   runv's default profile, [`runtime_default`].
//! - `Unconfined`, `unconfined`, or nothing asked: no profile (the guest
//!   agent's vsock filter still covers every container).
//! - `Localhost` with an absolute path (or `localhost/<path>`): that file,
//!   read on the host, in the format of Docker's and containerd's profiles
//!   (OCI's fields plus `archMap`, `includes` and `excludes`, evaluated for
//!   the container's capabilities). A missing or malformed file fails
//!   CreateContainer, naming it.
//! - Any other name is refused, naming it.
//!
//! A privileged container gets no profile, as containerd gives it none.

use std::path::Path;

use k8s_cri::v1::security_profile::ProfileType;
use k8s_cri::v1::LinuxContainerSecurityContext;
use serde_json::{json, Value};

/// The largest Localhost profile read.
const MAX_PROFILE: u64 = 1 << 20;
const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// The namespace flags of clone(2) that only CAP_SYS_ADMIN may use here.
const CLONE_NAMESPACES: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// System calls the default profile refuses unless the container holds the
/// capability beside them (None: refused to every container). The
/// capability pairs are containerd's; the calls refused to all are those
/// its default allow-list leaves out that a container could use to reach
/// kernel state no namespace isolates (keyrings, modules, kexec, swap, the
/// new mount API, io_uring, userfaultfd, the clock).
const GUARDED: &[(&[&str], Option<&str>)] = &[
    (
        &[
            "bpf",
            "fanotify_init",
            "lookup_dcookie",
            "mount",
            "name_to_handle_at",
            "perf_event_open",
            "setdomainname",
            "sethostname",
            "setns",
            "umount2",
            "unshare",
            "quotactl",
            "syslog",
        ],
        Some("CAP_SYS_ADMIN"),
    ),
    (&["open_by_handle_at"], Some("CAP_DAC_READ_SEARCH")),
    (&["reboot"], Some("CAP_SYS_BOOT")),
    (&["chroot"], Some("CAP_SYS_CHROOT")),
    (&["init_module", "finit_module", "delete_module"], Some("CAP_SYS_MODULE")),
    (&["acct"], Some("CAP_SYS_PACCT")),
    (&["kcmp"], Some("CAP_SYS_PTRACE")),
    (&["iopl", "ioperm"], Some("CAP_SYS_RAWIO")),
    (&["settimeofday", "adjtimex"], Some("CAP_SYS_TIME")),
    (&["vhangup"], Some("CAP_SYS_TTY_CONFIG")),
    (&["get_mempolicy", "set_mempolicy", "mbind", "move_pages"], Some("CAP_SYS_NICE")),
    (
        &[
            "add_key",
            "keyctl",
            "request_key",
            "create_module",
            "get_kernel_syms",
            "query_module",
            "nfsservctl",
            "uselib",
            "ustat",
            "sysfs",
            "_sysctl",
            "kexec_load",
            "kexec_file_load",
            "swapon",
            "swapoff",
            "pivot_root",
            "clock_settime",
            "clock_adjtime",
            "userfaultfd",
            "open_tree",
            "move_mount",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "mount_setattr",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
        ],
        None,
    ),
];

/// The OCI `linux.seccomp` for a container with capabilities `caps`, or
/// None for none.
// The deprecated `seccomp_profile_path` is what kubelets before 1.23 send.
#[allow(deprecated)]
pub fn profile(security: &LinuxContainerSecurityContext, caps: &[String]) -> Result<Option<Value>, String> {
    if security.privileged {
        return Ok(None);
    }
    match &security.seccomp {
        Some(p) => match ProfileType::try_from(p.profile_type) {
            Ok(ProfileType::RuntimeDefault) => Ok(Some(runtime_default(caps))),
            Ok(ProfileType::Unconfined) => Ok(None),
            Ok(ProfileType::Localhost) => localhost(Path::new(&p.localhost_ref), caps).map(Some),
            Err(_) => {
                Err(format!("seccomp profile_type {} is not RuntimeDefault, Unconfined or Localhost", p.profile_type))
            }
        },
        None => match security.seccomp_profile_path.as_str() {
            "" | "unconfined" => Ok(None),
            "runtime/default" | "docker/default" => Ok(Some(runtime_default(caps))),
            name => match name.strip_prefix("localhost/") {
                Some(path) => localhost(Path::new(path), caps).map(Some),
                None => Err(format!(
                    "seccomp profile {name:?} is not runtime/default, docker/default, unconfined or localhost/<path>"
                )),
            },
        },
    }
}

/// runv's default profile: everything allowed but [`GUARDED`] calls
/// without their capability (EPERM), clone(2) with a namespace flag
/// without CAP_SYS_ADMIN (EPERM), and clone3(2) without CAP_SYS_ADMIN
/// (ENOSYS, so C libraries fall back to clone, whose flags a filter can
/// see).
pub fn runtime_default(caps: &[String]) -> Value {
    let has = |cap: &str| caps.iter().any(|c| c == cap);
    let mut syscalls = Vec::new();
    for (names, cap) in GUARDED {
        if cap.is_none_or(|c| !has(c)) {
            syscalls.push(json!({"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}));
        }
    }
    if !has("CAP_SYS_ADMIN") {
        for flag in CLONE_NAMESPACES {
            syscalls.push(json!({
                "names": ["clone"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": EPERM,
                "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
            }));
        }
        syscalls.push(json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS}));
    }
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": syscalls,
    })
}

/// A profile file on the host, in Docker's format (a superset of OCI's).
fn localhost(path: &Path, caps: &[String]) -> Result<Value, String> {
    use std::io::Read;
    let what = format!("seccomp profile localhost/{}", path.display());
    if !path.is_absolute() {
        return Err(format!("{what}: the path must be absolute"));
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PROFILE + 1).read_to_string(&mut text))
        .map_err(|e| format!("{what}: {e}"))?;
    if text.len() as u64 > MAX_PROFILE {
        return Err(format!("{what}: larger than {MAX_PROFILE} bytes"));
    }
    let docker: Value = serde_json::from_str(&text).map_err(|e| format!("{what}: not JSON: {e}"))?;
    from_docker(&docker, caps).map_err(|e| format!("{what}: {e}"))
}

/// Docker's profile format to OCI's: `archMap` flattened into
/// `architectures`, and each syscall rule kept only when its `includes`
/// hold for the container and its `excludes` do not (capabilities and
/// architectures; runv's guests are x86_64).
pub fn from_docker(docker: &Value, caps: &[String]) -> Result<Value, String> {
    let obj = docker.as_object().ok_or("not a JSON object")?;
    let default_action = obj.get("defaultAction").and_then(Value::as_str).ok_or("defaultAction is missing")?;
    let mut out = json!({"defaultAction": default_action});
    if let Some(errno) = obj.get("defaultErrnoRet") {
        out["defaultErrnoRet"] = errno.clone();
    }
    let mut arches: Vec<Value> = obj.get("architectures").and_then(Value::as_array).cloned().unwrap_or_default();
    for entry in obj.get("archMap").and_then(Value::as_array).into_iter().flatten() {
        arches.extend(entry.get("architecture").cloned());
        arches.extend(entry.get("subArchitectures").and_then(Value::as_array).cloned().unwrap_or_default());
    }
    if !arches.is_empty() {
        out["architectures"] = Value::Array(arches);
    }
    if let Some(flags) = obj.get("flags") {
        out["flags"] = flags.clone();
    }
    let list = |cond: Option<&Value>, key: &str| -> Vec<String> {
        cond.and_then(|c| c.get(key))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(String::from).collect())
            .unwrap_or_default()
    };
    // As Docker reads them: a rule is included when the container has all
    // of its `includes.caps` (and runs on one of its `includes.arches`), and
    // excluded when it has any of its `excludes.caps` (or runs on one of its
    // `excludes.arches`).
    let included = |cond: Option<&Value>| {
        let arches = list(cond, "arches");
        list(cond, "caps").iter().all(|c| caps.contains(c))
            && (arches.is_empty() || arches.iter().any(|a| a == "amd64"))
    };
    let excluded = |cond: Option<&Value>| {
        list(cond, "caps").iter().any(|c| caps.contains(c)) || list(cond, "arches").iter().any(|a| a == "amd64")
    };
    let mut syscalls = Vec::new();
    for (i, rule) in obj.get("syscalls").and_then(Value::as_array).into_iter().flatten().enumerate() {
        if !included(rule.get("includes")) || excluded(rule.get("excludes")) {
            continue;
        }
        let mut names: Vec<Value> = rule.get("names").and_then(Value::as_array).cloned().unwrap_or_default();
        names.extend(rule.get("name").cloned());
        if names.is_empty() {
            return Err(format!("syscalls[{i}] names no system call"));
        }
        let action = rule.get("action").and_then(Value::as_str).ok_or(format!("syscalls[{i}] has no action"))?;
        let mut r = json!({"names": names, "action": action});
        for key in ["errnoRet", "args"] {
            if let Some(v) = rule.get(key).filter(|v| !v.is_null()) {
                r[key] = v.clone();
            }
        }
        syscalls.push(r);
    }
    out["syscalls"] = Value::Array(syscalls);
    // What the container engine will read: OCI's own types say whether
    // every action, operator and architecture is one they know.
    serde_json::from_value::<oci_spec::runtime::LinuxSeccomp>(out.clone())
        .map_err(|e| format!("not a seccomp profile: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::SecurityProfile;

    fn caps(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn denied(profile: &Value) -> Vec<String> {
        let mut names: Vec<String> = profile["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r.get("args").is_none())
            .flat_map(|r| r["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_default_profile_follows_the_containers_capabilities() {
        let plain = runtime_default(&caps(&["CAP_CHOWN"]));
        let d = denied(&plain);
        for call in ["mount", "unshare", "sethostname", "keyctl", "ptrace_is_not_here", "clone3", "chroot"] {
            assert_eq!(d.contains(&call.to_string()), call != "ptrace_is_not_here", "{call}");
        }
        let clone_rules = plain["syscalls"].as_array().unwrap().iter().filter(|r| r["names"][0] == "clone").count();
        assert_eq!(clone_rules, 7);
        let admin = runtime_default(&caps(&["CAP_SYS_ADMIN", "CAP_SYS_CHROOT"]));
        let d = denied(&admin);
        assert!(
            !d.contains(&"mount".to_string())
                && !d.contains(&"chroot".to_string())
                && !d.contains(&"clone3".to_string())
        );
        assert!(d.contains(&"keyctl".to_string()) && d.contains(&"pivot_root".to_string()));
        assert!(admin["syscalls"].as_array().unwrap().iter().all(|r| r["names"][0] != "clone"));
        // It is a profile the container engine reads.
        serde_json::from_value::<oci_spec::runtime::LinuxSeccomp>(plain).unwrap();
    }

    #[test]
    #[allow(deprecated)]
    fn each_way_of_asking_is_honoured_or_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("deny-mkdir.json");
        std::fs::write(
            &file,
            r#"{"defaultAction": "SCMP_ACT_ALLOW",
                "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]}],
                "syscalls": [
                  {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                  {"names": ["chroot"], "action": "SCMP_ACT_ERRNO", "includes": {"caps": ["CAP_SYS_CHROOT"]}},
                  {"names": ["reboot"], "action": "SCMP_ACT_ERRNO", "excludes": {"caps": ["CAP_CHOWN"]}}
                ]}"#,
        )
        .unwrap();
        let ctx = |profile_type: ProfileType, reference: &str, path: &str| LinuxContainerSecurityContext {
            seccomp: (path.is_empty())
                .then(|| SecurityProfile { profile_type: profile_type as i32, localhost_ref: reference.into() }),
            seccomp_profile_path: path.into(),
            ..Default::default()
        };
        let c = caps(&["CAP_CHOWN"]);
        let got = profile(&ctx(ProfileType::Localhost, &file.to_string_lossy(), ""), &c).unwrap().unwrap();
        assert_eq!(got["architectures"], json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"]));
        // chroot's rule needs a capability it lacks; reboot's is excluded by one it has.
        assert_eq!(denied(&got), ["mkdir", "mkdirat"]);
        let by_path = profile(&ctx(ProfileType::RuntimeDefault, "", &format!("localhost/{}", file.display())), &c);
        assert_eq!(by_path.unwrap().unwrap(), got);
        assert!(profile(&ctx(ProfileType::RuntimeDefault, "", ""), &c).unwrap().is_some());
        assert!(profile(&ctx(ProfileType::RuntimeDefault, "", "docker/default"), &c).unwrap().is_some());
        assert!(profile(&ctx(ProfileType::Unconfined, "", ""), &c).unwrap().is_none());
        assert!(profile(&LinuxContainerSecurityContext::default(), &c).unwrap().is_none());
        let privileged = LinuxContainerSecurityContext { privileged: true, ..ctx(ProfileType::RuntimeDefault, "", "") };
        assert!(profile(&privileged, &c).unwrap().is_none());

        let e = profile(&ctx(ProfileType::Localhost, "/no/such/profile.json", ""), &c).unwrap_err();
        assert!(e.contains("/no/such/profile.json") && e.contains("No such file"), "{e}");
        let e = profile(&ctx(ProfileType::RuntimeDefault, "", "my-profile"), &c).unwrap_err();
        assert!(e.contains("\"my-profile\" is not runtime/default"), "{e}");
        std::fs::write(&file, r#"{"defaultAction": "SCMP_ACT_NOPE"}"#).unwrap();
        let e = profile(&ctx(ProfileType::Localhost, &file.to_string_lossy(), ""), &c).unwrap_err();
        assert!(e.contains("not a seccomp profile"), "{e}");
    }
}
