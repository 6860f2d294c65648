//! CRI requests turned into OCI runtime specs for the shim, the way
//! containerd's CRI plugin builds them: the sandbox (pause) container and
//! the pod's containers, with the CRI annotations that group them into one
//! shim and one VM.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use k8s_cri::v1::*;
use serde_json::{json, Value};
use tonic::Status;

use crate::image::config::{command_line, environment, image_config, image_groups_of, resolve_user};
use crate::image::ImageRecord;
use crate::sandbox::sizing::{
    ANNOTATION_SANDBOX_CPU_PERIOD, ANNOTATION_SANDBOX_CPU_QUOTA, ANNOTATION_SANDBOX_CPU_SHARES,
    ANNOTATION_SANDBOX_MEMORY,
};

pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
pub const SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
pub const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
pub const IMAGE_NAME: &str = "io.kubernetes.cri.image-name";

/// The capabilities a container gets unless its security context changes
/// them (containerd's and Docker's default set).
const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability the guest kernel knows: what `ALL` adds and what a
/// privileged container gets (inside its VM, as Kata gives it).
const ALL_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The container's capabilities, as containerd computes them: privileged
/// means all; otherwise the default set, then `ALL` added or dropped
/// first (so `add: [ALL], drop: [CHOWN]` is all but CAP_CHOWN), then the
/// single names. A name the kernel does not know is refused, naming it.
fn capabilities(security: &LinuxContainerSecurityContext) -> Result<Vec<String>, String> {
    if security.privileged {
        return Ok(ALL_CAPABILITIES.iter().map(|s| s.to_string()).collect());
    }
    let mut caps: Vec<String> = DEFAULT_CAPABILITIES.iter().map(|s| s.to_string()).collect();
    let Some(cap) = &security.capabilities else { return Ok(caps) };
    let is_all = |c: &String| c.eq_ignore_ascii_case("ALL");
    if cap.add_capabilities.iter().any(is_all) {
        caps = ALL_CAPABILITIES.iter().map(|s| s.to_string()).collect();
    }
    if cap.drop_capabilities.iter().any(is_all) {
        caps.clear();
    }
    let name = |c: &String| -> Result<String, String> {
        let upper = c.to_uppercase();
        let full = if upper.starts_with("CAP_") { upper } else { format!("CAP_{upper}") };
        if ALL_CAPABILITIES.contains(&full.as_str()) {
            Ok(full)
        } else {
            Err(format!("capability {c:?} is not a Linux capability"))
        }
    };
    for add in cap.add_capabilities.iter().filter(|c| !is_all(c)) {
        let add = name(add)?;
        if !caps.contains(&add) {
            caps.push(add);
        }
    }
    for drop in cap.drop_capabilities.iter().filter(|c| !is_all(c)) {
        let drop = name(drop)?;
        caps.retain(|c| *c != drop);
    }
    Ok(caps)
}

fn default_mounts() -> Vec<Value> {
    vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        // containerd's: the container's own cgroup (it has a cgroup
        // namespace in the guest), read-only unless privileged.
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
    ]
}

/// The pod's files every container mounts: /etc/hosts, /etc/resolv.conf,
/// /etc/hostname, written into the pod directory.
pub fn write_pod_files(dir: &Path, config: &PodSandboxConfig, ips: &[String]) -> std::io::Result<()> {
    let mut hosts = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if let Some(ip) = ips.first() {
        hosts.push_str(&format!("{ip}\t{}\n", config.hostname));
    }
    std::fs::write(dir.join("hosts"), hosts)?;
    let resolv = match &config.dns_config {
        Some(dns) => {
            let mut text = String::new();
            if !dns.searches.is_empty() {
                text.push_str(&format!("search {}\n", dns.searches.join(" ")));
            }
            for server in &dns.servers {
                text.push_str(&format!("nameserver {server}\n"));
            }
            if !dns.options.is_empty() {
                text.push_str(&format!("options {}\n", dns.options.join(" ")));
            }
            text
        }
        // No DNS settings: the host's, as containerd does.
        None => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
    };
    std::fs::write(dir.join("resolv.conf"), resolv)?;
    std::fs::write(dir.join("hostname"), format!("{}\n", config.hostname))
}

fn namespace_options(config: &PodSandboxConfig) -> NamespaceOption {
    config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default()
}

/// Whether the pod uses the node's network (no netns, no CNI).
pub fn host_network(config: &PodSandboxConfig) -> bool {
    namespace_options(config).network == NamespaceMode::Node as i32
}

/// Checks what RunPodSandbox needs of its config.
pub fn validate_pod(config: Option<&PodSandboxConfig>) -> Result<&PodSandboxConfig, Status> {
    let config = config.ok_or_else(|| Status::invalid_argument("RunPodSandbox: config is missing"))?;
    let meta = config
        .metadata
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("RunPodSandbox: config.metadata is missing"))?;
    for (field, value) in [("name", &meta.name), ("namespace", &meta.namespace), ("uid", &meta.uid)] {
        if value.trim().is_empty() {
            return Err(Status::invalid_argument(format!("RunPodSandbox: config.metadata.{field} is empty")));
        }
    }
    if !config.log_directory.is_empty() && !Path::new(&config.log_directory).is_absolute() {
        return Err(Status::invalid_argument(format!(
            "RunPodSandbox: config.log_directory {:?} is not an absolute path",
            config.log_directory
        )));
    }
    let ns = namespace_options(config);
    host_namespaces_refused("RunPodSandbox", "linux.security_context.namespace_options", &ns)?;
    Ok(config)
}

/// A VM pod cannot share the node's PID or IPC namespace: asking for
/// either is refused, naming the field. (The node's network is served: the
/// VM's own loopback and the node's hostname.)
fn host_namespaces_refused(call: &str, path: &str, ns: &NamespaceOption) -> Result<(), Status> {
    for (mode, field, kind) in [(ns.pid, "pid", "hostPID"), (ns.ipc, "ipc", "hostIPC")] {
        if mode == NamespaceMode::Node as i32 {
            return Err(Status::invalid_argument(format!(
                "{call}: {path}.{field} is NODE ({kind}); a runv pod runs in a VM of its own and cannot share \
                 the node's {field} namespace (README: How runv pods differ from runc pods)"
            )));
        }
    }
    Ok(())
}

/// Checks what CreateContainer needs of its config.
pub fn validate_container(config: Option<&ContainerConfig>) -> Result<&ContainerConfig, Status> {
    let config = config.ok_or_else(|| Status::invalid_argument("CreateContainer: config is missing"))?;
    let meta = config
        .metadata
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("CreateContainer: config.metadata is missing"))?;
    if meta.name.trim().is_empty() {
        return Err(Status::invalid_argument("CreateContainer: config.metadata.name is empty"));
    }
    if config.image.as_ref().map(|i| i.image.trim().is_empty()).unwrap_or(true) {
        return Err(Status::invalid_argument("CreateContainer: config.image is empty"));
    }
    if Path::new(&config.log_path).is_absolute() {
        return Err(Status::invalid_argument(format!(
            "CreateContainer: config.log_path {:?} must be relative to the pod's log directory",
            config.log_path
        )));
    }
    for m in &config.mounts {
        if !Path::new(&m.container_path).is_absolute() {
            return Err(Status::invalid_argument(format!(
                "CreateContainer: mount container_path {:?} is not absolute",
                m.container_path
            )));
        }
        if !Path::new(&m.host_path).exists() {
            return Err(Status::invalid_argument(format!(
                "CreateContainer: mount {}: host path {:?} does not exist",
                m.container_path, m.host_path
            )));
        }
    }
    Ok(config)
}

fn resources_json(r: &LinuxContainerResources) -> Value {
    let mut cpu = serde_json::Map::new();
    if r.cpu_shares > 0 {
        cpu.insert("shares".into(), json!(r.cpu_shares));
    }
    if r.cpu_quota > 0 {
        cpu.insert("quota".into(), json!(r.cpu_quota));
    }
    if r.cpu_period > 0 {
        cpu.insert("period".into(), json!(r.cpu_period));
    }
    if !r.cpuset_cpus.is_empty() {
        cpu.insert("cpus".into(), json!(r.cpuset_cpus));
    }
    if !r.cpuset_mems.is_empty() {
        cpu.insert("mems".into(), json!(r.cpuset_mems));
    }
    let mut out = json!({ "cpu": cpu });
    if r.memory_limit_in_bytes > 0 {
        out["memory"] = json!({ "limit": r.memory_limit_in_bytes });
    }
    out
}

/// The OCI `LinuxResources` JSON for UpdateContainerResources.
pub fn update_resources(r: &LinuxContainerResources) -> Vec<u8> {
    resources_json(r).to_string().into_bytes()
}

fn spec_from(value: Value) -> Result<oci_spec::runtime::Spec, Status> {
    serde_json::from_value(value).map_err(|e| Status::internal(format!("building the OCI spec: {e}")))
}

/// The sandbox (pause) container's spec.
pub fn sandbox_spec(
    id: &str,
    config: &PodSandboxConfig,
    image: &ImageRecord,
    netns: Option<&Path>,
) -> Result<oci_spec::runtime::Spec, Status> {
    let meta = config.metadata.clone().unwrap_or_default();
    let ns = namespace_options(config);
    let mut namespaces = vec![json!({"type": "ipc"}), json!({"type": "mount"})];
    if ns.pid != NamespaceMode::Node as i32 {
        namespaces.push(json!({"type": "pid"}));
    }
    if ns.network != NamespaceMode::Node as i32 {
        namespaces.push(json!({"type": "uts"}));
    }
    if let Some(path) = netns {
        namespaces.push(json!({"type": "network", "path": path}));
    }
    let mut annotations: HashMap<String, String> = HashMap::from([
        (CONTAINER_TYPE.into(), "sandbox".into()),
        (SANDBOX_ID.into(), id.into()),
        (SANDBOX_NAME.into(), meta.name.clone()),
        (SANDBOX_NAMESPACE.into(), meta.namespace.clone()),
        (SANDBOX_UID.into(), meta.uid.clone()),
    ]);
    // The pod's resources size the VM (see runv::sandbox::sizing).
    if let Some(r) = config.linux.as_ref().and_then(|l| l.resources.as_ref()) {
        for (key, value) in [
            (ANNOTATION_SANDBOX_MEMORY, r.memory_limit_in_bytes),
            (ANNOTATION_SANDBOX_CPU_QUOTA, r.cpu_quota),
            (ANNOTATION_SANDBOX_CPU_PERIOD, r.cpu_period),
            (ANNOTATION_SANDBOX_CPU_SHARES, r.cpu_shares),
        ] {
            if value > 0 {
                annotations.insert(key.into(), value.to_string());
            }
        }
    }
    let c = image_config(image);
    let args = command_line(image, &[], &[]);
    if args.is_empty() {
        return Err(Status::failed_precondition(format!(
            "the sandbox image {} has no entrypoint or cmd",
            image.reference
        )));
    }
    spec_from(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 65535, "gid": 65535},
            "args": args,
            "env": environment(image, []),
            "cwd": c["WorkingDir"].as_str().filter(|d| !d.is_empty()).unwrap_or("/"),
            "capabilities": {"bounding": DEFAULT_CAPABILITIES, "effective": DEFAULT_CAPABILITIES, "permitted": DEFAULT_CAPABILITIES},
            "noNewPrivileges": true,
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": config.hostname,
        "mounts": default_mounts(),
        "annotations": annotations,
        "linux": {"namespaces": namespaces, "sysctl": pod_sysctls(config)?},
    }))
}

/// The pod's sysctls, for the sandbox's spec and each container's (as
/// containerd sets them): applied in the guest by libcontainer, in the
/// container's namespaces. A key or value that cannot be a sysctl is named.
fn pod_sysctls(config: &PodSandboxConfig) -> Result<HashMap<String, String>, Status> {
    let sysctls = config.linux.as_ref().map(|l| l.sysctls.clone()).unwrap_or_default();
    for (key, value) in &sysctls {
        let key_ok = !key.is_empty()
            && key.len() <= 256
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
            && !key.split(['.', '/']).any(|part| part.is_empty() || part == "..");
        if !key_ok {
            return Err(Status::invalid_argument(format!("linux.sysctls: {key:?} is not a sysctl name")));
        }
        if value.len() > 4096 || value.contains('\0') {
            return Err(Status::invalid_argument(format!("linux.sysctls: the value of {key} is not a sysctl value")));
        }
    }
    Ok(sysctls)
}

pub struct ContainerContext<'a> {
    pub id: &'a str,
    pub pod_id: &'a str,
    pub pod_config: &'a PodSandboxConfig,
    pub pod_dir: &'a Path,
    pub netns: Option<&'a Path>,
    pub image: &'a ImageRecord,
    pub image_lowers: &'a [PathBuf],
}

/// A pod container's spec.
pub fn container_spec(cx: &ContainerContext, config: &ContainerConfig) -> Result<oci_spec::runtime::Spec, Status> {
    let invalid = |m: String| Status::invalid_argument(format!("CreateContainer: {m}"));
    let meta = config.metadata.clone().unwrap_or_default();
    let pod_meta = cx.pod_config.metadata.clone().unwrap_or_default();
    let linux = config.linux.clone().unwrap_or_default();
    let security = linux.security_context.clone().unwrap_or_default();
    let args = command_line(cx.image, &config.command, &config.args);
    if args.is_empty() {
        return Err(invalid(format!("neither the config nor the image {} gives a command", cx.image.reference)));
    }
    let c = image_config(cx.image);
    let cwd = match config.working_dir.as_str() {
        "" => c["WorkingDir"].as_str().filter(|d| !d.is_empty()).unwrap_or("/").to_string(),
        d if Path::new(d).is_absolute() => d.to_string(),
        d => return Err(invalid(format!("working_dir {d:?} is not absolute"))),
    };
    let (mut uid, mut gid) = if !security.run_as_username.is_empty() {
        resolve_user(&security.run_as_username, cx.image_lowers).map_err(invalid)?
    } else {
        resolve_user(c["User"].as_str().unwrap_or_default(), cx.image_lowers).map_err(invalid)?
    };
    if security.run_as_group.is_some() && security.run_as_user.is_none() && security.run_as_username.is_empty() {
        return Err(invalid("run_as_group is set without run_as_user or run_as_username".into()));
    }
    if security.privileged
        && !cx.pod_config.linux.as_ref().and_then(|l| l.security_context.as_ref()).is_some_and(|s| s.privileged)
    {
        return Err(invalid(
            "a privileged container needs a privileged pod (linux.security_context.privileged of the pod)".into(),
        ));
    }
    // Groups the image's /etc/group lists the user in, by name (resolved
    // before run_as_user may change the uid, as containerd does).
    let user_name = if !security.run_as_username.is_empty() {
        security.run_as_username.clone()
    } else {
        c["User"].as_str().unwrap_or_default().split(':').next().unwrap_or_default().to_string()
    };
    if let Some(u) = &security.run_as_user {
        uid = u32::try_from(u.value).map_err(|_| invalid(format!("run_as_user {} is out of range", u.value)))?;
    }
    if let Some(g) = &security.run_as_group {
        gid = u32::try_from(g.value).map_err(|_| invalid(format!("run_as_group {} is out of range", g.value)))?;
    }
    let caps = capabilities(&security).map_err(invalid)?;
    let seccomp = super::seccomp::profile(&security, &caps).map_err(invalid)?;
    let ns = security.namespace_options.clone().unwrap_or_default();
    // "Join the sandbox's namespace": a path the shim replaces with the
    // sandbox container's namespace inside the guest (host paths mean
    // nothing there); the path only has to be present.
    let sandbox_ns = |kind: &str| json!({"type": kind, "path": format!("/proc/sandbox/{}/ns/{kind}", cx.pod_id)});
    let mut namespaces = vec![json!({"type": "mount"}), sandbox_ns("ipc")];
    if !host_network(cx.pod_config) {
        namespaces.push(sandbox_ns("uts"));
    }
    host_namespaces_refused("CreateContainer", "linux.security_context.namespace_options", &ns)?;
    match ns.pid {
        p if p == NamespaceMode::Pod as i32 => namespaces.push(sandbox_ns("pid")),
        _ => namespaces.push(json!({"type": "pid"})),
    }
    if let Some(path) = cx.netns {
        namespaces.push(json!({"type": "network", "path": path}));
    }
    let mut mounts = default_mounts();
    if security.privileged {
        // As containerd does for a privileged container: /sys and its
        // cgroup writable (the guest's, inside the VM).
        for m in mounts.iter_mut().filter(|m| m["destination"] == "/sys" || m["destination"] == "/sys/fs/cgroup") {
            let mut options: Vec<Value> =
                m["options"].as_array().into_iter().flatten().filter(|o| *o != "ro").cloned().collect();
            options.push(json!("rw"));
            m["options"] = json!(options);
        }
    }
    let user_paths: Vec<&str> = config.mounts.iter().map(|m| m.container_path.as_str()).collect();
    for (file, dest) in [("hosts", "/etc/hosts"), ("resolv.conf", "/etc/resolv.conf"), ("hostname", "/etc/hostname")] {
        if !user_paths.contains(&dest) {
            let ro = if security.readonly_rootfs { "ro" } else { "rw" };
            mounts.push(json!({"destination": dest, "type": "bind", "source": cx.pod_dir.join(file), "options": ["rbind", "rprivate", ro]}));
        }
    }
    for m in &config.mounts {
        let propagation = match m.propagation {
            p if p == MountPropagation::PropagationHostToContainer as i32 => "rslave",
            p if p == MountPropagation::PropagationBidirectional as i32 => "rshared",
            _ => "rprivate",
        };
        let ro = if m.readonly { "ro" } else { "rw" };
        mounts.push(json!({"destination": m.container_path, "type": "bind", "source": m.host_path, "options": ["rbind", propagation, ro]}));
    }
    let annotations: HashMap<String, String> = HashMap::from([
        (CONTAINER_TYPE.into(), "container".into()),
        (SANDBOX_ID.into(), cx.pod_id.into()),
        (SANDBOX_NAME.into(), pod_meta.name.clone()),
        (SANDBOX_NAMESPACE.into(), pod_meta.namespace.clone()),
        (SANDBOX_UID.into(), pod_meta.uid.clone()),
        (CONTAINER_NAME.into(), meta.name.clone()),
        (IMAGE_NAME.into(), config.image.as_ref().map(|i| i.image.clone()).unwrap_or_default()),
    ]);
    let mut linux_json = json!({"namespaces": namespaces, "sysctl": pod_sysctls(cx.pod_config)?});
    if let Some(r) = &linux.resources {
        linux_json["resources"] = resources_json(r);
    }
    if security.privileged {
        // containerd's rule for a privileged container: every device
        // allowed. The agent then gives it every device of the guest.
        linux_json["resources"]["devices"] = json!([{"allow": true, "access": "rwm"}]);
    }
    if let Some(profile) = seccomp {
        linux_json["seccomp"] = profile;
    }
    // Privileged: nothing of /proc masked or read-only (inside the VM).
    if !security.masked_paths.is_empty() && !security.privileged {
        linux_json["maskedPaths"] = json!(security.masked_paths);
    }
    if !security.readonly_paths.is_empty() && !security.privileged {
        linux_json["readonlyPaths"] = json!(security.readonly_paths);
    }
    let mut groups: Vec<i64> = image_groups_of(&user_name, uid, cx.image_lowers);
    for g in &security.supplemental_groups {
        if *g < 0 || *g > i64::from(u32::MAX) {
            return Err(invalid(format!("supplemental group {g} is out of range")));
        }
        if !groups.contains(g) {
            groups.push(*g);
        }
    }
    groups.retain(|g| *g != i64::from(gid));
    spec_from(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": config.tty,
            "user": {"uid": uid, "gid": gid, "additionalGids": groups},
            "args": args,
            "env": environment(cx.image, config.envs.iter().map(|kv| (kv.key.clone(), kv.value.clone()))),
            "cwd": cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": security.no_new_privs,
        },
        "root": {"path": "rootfs", "readonly": security.readonly_rootfs},
        "mounts": mounts,
        "annotations": annotations,
        "linux": linux_json,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(config: serde_json::Value) -> ImageRecord {
        ImageRecord::with_config(config)
    }

    #[test]
    fn pod_sysctls_reach_the_specs_and_bad_ones_are_named() {
        let mut pod = PodSandboxConfig {
            linux: Some(LinuxPodSandboxConfig {
                sysctls: HashMap::from([("kernel.shm_rmid_forced".into(), "1".into())]),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(pod_sysctls(&pod).unwrap()["kernel.shm_rmid_forced"], "1");
        for bad in ["", "kernel..x", "../../etc/passwd", "net/../x", "a b"] {
            pod.linux.as_mut().unwrap().sysctls = HashMap::from([(bad.to_string(), "1".to_string())]);
            let e = pod_sysctls(&pod).unwrap_err();
            assert!(e.message().contains("is not a sysctl name"), "{bad:?}: {}", e.message());
        }
    }

    #[test]
    fn host_pid_and_ipc_are_refused_by_field_and_host_network_is_served() {
        let with = |ns: NamespaceOption| PodSandboxConfig {
            metadata: Some(PodSandboxMetadata { name: "p".into(), namespace: "n".into(), uid: "u".into(), attempt: 0 }),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(ns),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let node = NamespaceMode::Node as i32;
        let e = validate_pod(Some(&with(NamespaceOption { pid: node, ..Default::default() }))).unwrap_err();
        assert!(e.message().contains("namespace_options.pid is NODE (hostPID)"), "{}", e.message());
        let e = validate_pod(Some(&with(NamespaceOption { ipc: node, ..Default::default() }))).unwrap_err();
        assert!(e.message().contains("namespace_options.ipc is NODE (hostIPC)"), "{}", e.message());
        assert!(validate_pod(Some(&with(NamespaceOption { network: node, ..Default::default() }))).is_ok());
    }

    #[test]
    fn bad_configs_are_named() {
        assert!(validate_pod(None).unwrap_err().message().contains("config is missing"));
        let mut pod = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata { name: "p".into(), namespace: "".into(), uid: "u".into(), attempt: 0 }),
            ..Default::default()
        };
        assert!(validate_pod(Some(&pod)).unwrap_err().message().contains("metadata.namespace"));
        pod.metadata.as_mut().unwrap().namespace = "ns".into();
        pod.log_directory = "relative".into();
        assert!(validate_pod(Some(&pod)).unwrap_err().message().contains("log_directory"));
        let c = ContainerConfig {
            metadata: Some(ContainerMetadata { name: "c".into(), attempt: 0 }),
            image: Some(ImageSpec { image: "i".into(), ..Default::default() }),
            mounts: vec![Mount {
                container_path: "/data".into(),
                host_path: "/does/not/exist".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(validate_container(Some(&c)).unwrap_err().message().contains("/does/not/exist"));
    }

    #[test]
    fn the_sandbox_spec_carries_the_grouping_and_sizing_annotations() {
        let img = image(json!({"config": {"Cmd": ["/pause"]}}));
        let pod = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "p".into(),
                namespace: "ns".into(),
                uid: "u".into(),
                attempt: 0,
            }),
            hostname: "h".into(),
            linux: Some(LinuxPodSandboxConfig {
                resources: Some(LinuxContainerResources { memory_limit_in_bytes: 1 << 30, ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let spec = sandbox_spec("id1", &pod, &img, Some(Path::new("/run/netns/x"))).unwrap();
        let a = spec.annotations().clone().unwrap();
        assert_eq!(a[CONTAINER_TYPE], "sandbox");
        assert_eq!(a[SANDBOX_ID], "id1");
        assert_eq!(a[ANNOTATION_SANDBOX_MEMORY], (1u64 << 30).to_string());
        assert_eq!(spec.process().as_ref().unwrap().args().as_ref().unwrap(), &["/pause".to_string()]);
        let netns = spec.linux().as_ref().unwrap().namespaces().as_ref().unwrap();
        assert!(netns.iter().any(|n| n.path().as_deref() == Some(Path::new("/run/netns/x"))));
    }

    /// container_spec for `security` in a pod (privileged or not) whose
    /// image has `app` (uid 1000) in groups 1234 and 50000.
    fn spec_with(
        security: LinuxContainerSecurityContext,
        pod_privileged: bool,
    ) -> Result<oci_spec::runtime::Spec, Status> {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("layer");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/app:/bin/sh\n").unwrap();
        std::fs::write(
            root.join("etc/group"),
            "root:x:0:\napp:x:1000:\nextra:x:1234:app\nmore:x:50000:other,app\nnot:x:7:other\n",
        )
        .unwrap();
        let img = image(json!({"config": {"Cmd": ["sh"], "User": "app"}}));
        let pod = PodSandboxConfig {
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    privileged: pod_privileged,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let lowers = vec![root];
        let cx = ContainerContext {
            id: "c",
            pod_id: "p",
            pod_config: &pod,
            pod_dir: dir.path(),
            netns: None,
            image: &img,
            image_lowers: &lowers,
        };
        let config = ContainerConfig {
            linux: Some(LinuxContainerConfig { security_context: Some(security), ..Default::default() }),
            ..Default::default()
        };
        container_spec(&cx, &config)
    }

    fn caps_of(spec: &oci_spec::runtime::Spec) -> Vec<String> {
        let caps = spec.process().as_ref().unwrap().capabilities().as_ref().unwrap().effective().clone().unwrap();
        let mut names: Vec<String> = caps.iter().map(|c| format!("CAP_{c}")).collect();
        names.sort();
        names
    }

    #[test]
    fn capabilities_all_and_privileged_mean_every_capability() {
        let with = |add: &[&str], drop: &[&str]| LinuxContainerSecurityContext {
            capabilities: Some(Capability {
                add_capabilities: add.iter().map(|s| s.to_string()).collect(),
                drop_capabilities: drop.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let all = caps_of(&spec_with(with(&["ALL"], &[]), false).unwrap());
        assert_eq!(all.len(), ALL_CAPABILITIES.len(), "{all:?}");
        let but_chown = caps_of(&spec_with(with(&["ALL"], &["CHOWN"]), false).unwrap());
        assert_eq!(but_chown.len(), ALL_CAPABILITIES.len() - 1);
        assert!(!but_chown.contains(&"CAP_CHOWN".to_string()));
        assert_eq!(caps_of(&spec_with(with(&["SYS_ADMIN"], &["ALL"]), false).unwrap()), ["CAP_SYS_ADMIN"]);
        let e = spec_with(with(&["NOT_A_CAP"], &[]), false).unwrap_err();
        assert!(e.message().contains("\"NOT_A_CAP\" is not a Linux capability"), "{e}");
        let privileged = LinuxContainerSecurityContext { privileged: true, ..Default::default() };
        let spec = spec_with(privileged.clone(), true).unwrap();
        assert_eq!(caps_of(&spec).len(), ALL_CAPABILITIES.len());
        // Every device allowed, as containerd writes it: the agent's cue.
        let rules = spec.linux().as_ref().and_then(|l| l.resources().as_ref()).and_then(|r| r.devices().clone());
        let rules = rules.expect("a privileged container has device rules");
        assert!(rules.len() == 1 && rules[0].allow() && rules[0].major().is_none() && rules[0].typ().is_none());
        let plain = spec_with(LinuxContainerSecurityContext::default(), true).unwrap();
        assert!(plain
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.devices().as_ref())
            .is_none());
        let e = spec_with(privileged, false).unwrap_err();
        assert!(e.message().contains("privileged pod"), "{e}");
    }

    #[test]
    fn groups_come_from_the_image_and_the_request_and_run_as_group_needs_a_user() {
        let security = LinuxContainerSecurityContext { supplemental_groups: vec![1234, 77], ..Default::default() };
        let spec = spec_with(security, false).unwrap();
        let user = spec.process().as_ref().unwrap().user().clone();
        assert_eq!((user.uid(), user.gid()), (1000, 1000));
        assert_eq!(user.additional_gids().clone().unwrap(), [1234, 50000, 77]);
        let e = spec_with(
            LinuxContainerSecurityContext { run_as_group: Some(Int64Value { value: 5 }), ..Default::default() },
            false,
        )
        .unwrap_err();
        assert!(e.message().contains("run_as_group is set without run_as_user"), "{e}");
    }
}
