//! Checking an OCI runtime spec before it reaches the container engine:
//! the rootfs and bind mounts must stay inside the directories the agent
//! may expose, sizes must be sane, and what the engine needs is filled in.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use oci_spec::runtime::{
    LinuxDevice, LinuxDeviceBuilder, LinuxDeviceType, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResources,
    Process, Spec,
};

/// Smallest memory limit a container may ask for; below this a typo (bytes
/// for MiB) is likelier than intent and the container could not even start.
pub const MIN_MEMORY_LIMIT: i64 = 4 << 20;
/// Largest sizes accepted at all (1 PiB; larger is nonsense in a VM).
pub const MAX_SIZE: i64 = 1 << 50;
pub const MAX_ID_LEN: usize = 128;

/// Directories whose contents containers may see: the shared directory
/// (rootfs and volumes from the host) and the agent's own sandbox files.
#[derive(Clone, Debug)]
pub struct AllowedRoots(pub Vec<PathBuf>);

impl AllowedRoots {
    /// Resolves `path` (following every symlink) and checks that it stays
    /// inside one of the allowed directories.
    pub fn resolve(&self, what: &str, path: &Path) -> Result<PathBuf> {
        if !path.is_absolute() {
            bail!("{what} '{}' is not an absolute path", path.display());
        }
        let real = path.canonicalize().with_context(|| format!("{what} '{}'", path.display()))?;
        for root in &self.0 {
            let root = root.canonicalize().unwrap_or_else(|_| root.clone());
            if real.starts_with(&root) {
                return Ok(real);
            }
        }
        bail!("{what} '{}' resolves to '{}', outside the shared directory", path.display(), real.display())
    }
}

/// Container and exec ids: what the engine and file names can carry.
pub fn check_id(what: &str, id: &str) -> Result<()> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        bail!("{what} must be 1 to {MAX_ID_LEN} characters, got {}", id.len());
    }
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) || id.starts_with('.') {
        bail!("{what} '{id}' may only contain letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

/// Parses and checks a container's spec; fixes up what the agent decides
/// (an absolute, resolved root; the cgroup path).
/// Namespace paths of the form `pause:<kind>` name the pod's pause process's
/// namespaces.
pub const PAUSE_NS_PREFIX: &str = "pause:";

pub fn prepare(container_id: &str, json: &[u8], allowed: &AllowedRoots, pause_pid: Option<i32>) -> Result<Spec> {
    let mut spec: Spec = serde_json::from_slice(json).context("malformed OCI spec")?;
    let Some(root) = spec.root().clone() else {
        bail!("the spec has no root");
    };
    let rootfs = allowed.resolve("root.path", root.path())?;
    if !rootfs.is_dir() {
        bail!("root.path '{}' is not a directory", root.path().display());
    }
    let mut root = root;
    root.set_path(rootfs);
    spec.set_root(Some(root));

    let Some(mut process) = spec.process().clone() else {
        bail!("the spec has no process");
    };
    check_process(&process)?;
    normalize_no_new_privileges(&mut process);
    spec.set_process(Some(process));
    if let Some(hostname) = spec.hostname() {
        if hostname.len() > 64 {
            bail!("hostname is {} characters long; at most 64", hostname.len());
        }
    }

    for m in spec.mounts().iter().flatten() {
        let is_bind =
            m.typ().as_deref() == Some("bind") || m.options().iter().flatten().any(|o| o == "bind" || o == "rbind");
        if is_bind {
            let Some(source) = m.source() else {
                bail!("bind mount on '{}' has no source", m.destination().display());
            };
            allowed.resolve(&format!("mount source for '{}'", m.destination().display()), source)?;
        }
        if !m.destination().is_absolute() {
            bail!("mount destination '{}' is not an absolute path", m.destination().display());
        }
    }

    // OCI hooks are host programs; the runtime runs none inside the guest
    // (as Kata), and the engine must not fork them under the agent.
    spec.set_hooks(None);

    let mut linux = spec.linux().clone().unwrap_or_default();
    if let Some(resources) = linux.resources() {
        check_resources(resources)?;
        if allows_every_device(resources) {
            // A privileged container: the spec's device list is the node's
            // (containerd lists the host's /dev); what the container gets
            // is every device of the guest, which is its whole machine.
            linux.set_devices(Some(devices_below(Path::new(GUEST_DEV))?));
        }
    }
    if let Some(mut namespaces) = linux.namespaces().clone() {
        // A cgroup namespace of its own, as runc gives a container on a
        // cgroup v2 host: its /sys/fs/cgroup is its own cgroup (memory.max
        // and the rest), not the guest's root.
        if !namespaces.iter().any(|ns| ns.typ() == LinuxNamespaceType::Cgroup) {
            namespaces.push(LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Cgroup).build()?);
        }
        let mut fixed = Vec::with_capacity(namespaces.len());
        for mut ns in namespaces {
            if let Some(path) = ns.path() {
                let text = path.to_string_lossy();
                if let Some(kind) = text.strip_prefix(PAUSE_NS_PREFIX) {
                    if !matches!(kind, "pid" | "ipc" | "uts") {
                        bail!("namespace path '{text}': the pause process holds only pid, ipc and uts");
                    }
                    let Some(pid) = pause_pid else {
                        bail!("namespace path '{text}': the sandbox has no pause process");
                    };
                    ns.set_path(Some(PathBuf::from(format!("/proc/{pid}/ns/{kind}"))));
                } else if !path.exists() {
                    bail!("namespace path '{}' does not exist", path.display());
                }
            }
            fixed.push(ns);
        }
        linux.set_namespaces(Some(fixed));
    }
    // The engine applies the root's propagation recursively and knows the
    // names only without runc's `r` (recursive) prefix: rshared, rslave,
    // rprivate and runbindable (what containerd and Kubernetes send) mean
    // what it does with shared, slave, private and unbindable.
    if let Some(propagation) = linux.rootfs_propagation().clone() {
        let plain = match propagation.as_str() {
            "shared" | "rshared" => "shared",
            "slave" | "rslave" => "slave",
            "private" | "rprivate" => "private",
            "unbindable" | "runbindable" => "unbindable",
            other => {
                bail!("rootfsPropagation '{other}' is not shared, slave, private or unbindable (r-prefixed or not)")
            }
        };
        linux.set_rootfs_propagation(Some(plain.to_string()));
    }
    if linux.cgroups_path().is_none() {
        linux.set_cgroups_path(Some(PathBuf::from(format!("/runv/{container_id}"))));
    }
    spec.set_linux(Some(linux));
    Ok(spec)
}

/// Where the guest's devices are (devtmpfs).
pub const GUEST_DEV: &str = "/dev";
/// Most device nodes a privileged container is given (a guest has a few
/// hundred; the cap keeps a strange /dev from growing the spec unbounded).
pub const MAX_DEVICES: usize = 4096;

/// Whether the device cgroup rules end by allowing every device, which is
/// how containerd (and `runv cri`) write a privileged container's.
pub fn allows_every_device(r: &LinuxResources) -> bool {
    r.devices().as_ref().and_then(|d| d.last()).is_some_and(|rule| {
        rule.allow()
            && matches!(rule.typ(), None | Some(LinuxDeviceType::A))
            && rule.major().is_none()
            && rule.minor().is_none()
            && rule.access().as_deref().is_none_or(|a| ["r", "w", "m"].iter().all(|c| a.contains(c)))
    })
}

/// The char and block devices under `dev`, as runc lists a host's for a
/// privileged container: without /dev/pts, /dev/shm, /dev/mqueue, /dev/fd
/// and /dev/console, which the engine sets up itself.
pub fn devices_below(dev: &Path) -> Result<Vec<LinuxDevice>> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut found = Vec::new();
    let mut dirs = vec![dev.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            let name = entry.file_name();
            let path = entry.path();
            // symlink_metadata: a link is skipped, never followed.
            let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
            let kind = meta.file_type();
            if kind.is_dir() {
                if dir == dev && matches!(name.to_str(), Some("pts" | "shm" | "mqueue" | "fd")) {
                    continue;
                }
                dirs.push(path);
                continue;
            }
            let typ = if kind.is_char_device() {
                LinuxDeviceType::C
            } else if kind.is_block_device() {
                LinuxDeviceType::B
            } else {
                continue;
            };
            if dir == dev && name == "console" {
                continue;
            }
            if found.len() == MAX_DEVICES {
                bail!("{} holds more than {MAX_DEVICES} devices", dev.display());
            }
            let rdev = meta.rdev();
            let device = LinuxDeviceBuilder::default()
                .path(Path::new(GUEST_DEV).join(path.strip_prefix(dev).unwrap_or(&path)))
                .typ(typ)
                .major(libc::major(rdev) as i64)
                .minor(libc::minor(rdev) as i64)
                .file_mode(meta.mode() & 0o7777)
                .uid(meta.uid())
                .gid(meta.gid())
                .build()
                .context("describing a device")?;
            found.push(device);
        }
    }
    found.sort_by(|a, b| a.path().cmp(b.path()));
    Ok(found)
}

/// `noNewPrivileges: false` as no field at all. The container engine
/// (libcontainer 0.7) loads a seccomp filter while it still has
/// CAP_SYS_ADMIN only when the field is absent, and after dropping
/// capabilities otherwise, where a filter without no_new_privs cannot be
/// loaded: a CRI container with a seccomp profile and privilege escalation
/// allowed (Kubernetes' default) would fail to start. Both mean the same.
pub fn normalize_no_new_privileges(process: &mut Process) {
    if process.no_new_privileges() == Some(false) {
        process.set_no_new_privileges(None);
    }
}

pub fn check_process(process: &Process) -> Result<()> {
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        bail!("process.args is empty");
    }
    if !process.cwd().is_absolute() {
        bail!("process.cwd '{}' is not an absolute path", process.cwd().display());
    }
    for kv in process.env().iter().flatten() {
        if !kv.contains('=') {
            bail!("process.env entry '{kv}' is not KEY=VALUE");
        }
    }
    Ok(())
}

pub fn check_resources(r: &LinuxResources) -> Result<()> {
    if let Some(mem) = r.memory() {
        for (key, value) in [("limit", mem.limit()), ("reservation", mem.reservation()), ("swap", mem.swap())] {
            match value {
                None | Some(-1) => {}
                Some(v) if v < 0 => bail!("memory.{key} {v} is negative"),
                Some(v) if v > MAX_SIZE => bail!("memory.{key} {v} is absurdly large"),
                Some(v) if key == "limit" && v < MIN_MEMORY_LIMIT => {
                    bail!("memory.limit {v} bytes is below the minimum of {MIN_MEMORY_LIMIT} bytes")
                }
                Some(_) => {}
            }
        }
    }
    if let Some(cpu) = r.cpu() {
        if let Some(shares) = cpu.shares() {
            if !(2..=262_144).contains(&shares) {
                bail!("cpu.shares {shares} is outside 2..=262144");
            }
        }
        if let Some(quota) = cpu.quota() {
            if quota != -1 && !(1000..=MAX_SIZE).contains(&quota) {
                bail!("cpu.quota {quota} is outside 1000..={MAX_SIZE} (or -1)");
            }
        }
        if let Some(period) = cpu.period() {
            if !(1000..=1_000_000).contains(&period) {
                bail!("cpu.period {period} is outside 1000..=1000000");
            }
        }
    }
    if let Some(pids) = r.pids() {
        let limit = pids.limit();
        if limit != -1 && !(1..=1 << 22).contains(&limit) {
            bail!("pids.limit {limit} is outside 1..={} (or -1)", 1 << 22);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepare_t(id: &str, json: &[u8], allowed: &AllowedRoots) -> Result<Spec> {
        prepare(id, json, allowed, None)
    }

    fn allowed(dir: &Path) -> AllowedRoots {
        AllowedRoots(vec![dir.to_path_buf()])
    }

    fn spec_json(root: &Path, extra: &str) -> Vec<u8> {
        format!(
            r#"{{"ociVersion":"1.0.2","root":{{"path":"{}"}},"process":{{"user":{{"uid":0,"gid":0}},"args":["sh"],"cwd":"/","env":["PATH=/bin"]}}{extra}}}"#,
            root.display()
        )
        .into_bytes()
    }

    #[test]
    fn a_good_spec_gets_a_resolved_root_and_a_cgroup_path() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("c1/rootfs");
        std::fs::create_dir_all(&rootfs).unwrap();
        let spec = prepare_t("c1", &spec_json(&dir.path().join("c1/./rootfs"), ""), &allowed(dir.path())).unwrap();
        assert_eq!(spec.root().as_ref().unwrap().path(), &rootfs.canonicalize().unwrap());
        assert_eq!(spec.linux().as_ref().unwrap().cgroups_path().as_deref(), Some(Path::new("/runv/c1")));
    }

    #[test]
    fn a_privileged_spec_gets_the_guests_devices_instead_of_the_nodes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("c1/rootfs")).unwrap();
        let rootfs = dir.path().join("c1/rootfs");
        // containerd's privileged spec: the node's devices, every device allowed.
        let node = r#"{"path":"/dev/node-only","type":"c","major":250,"minor":7}"#;
        let privileged = format!(
            r#","linux":{{"devices":[{node}],"resources":{{"devices":[{{"allow":false,"access":"rwm"}},{{"allow":true,"access":"rwm"}}]}}}}"#
        );
        let spec = prepare_t("c1", &spec_json(&rootfs, &privileged), &allowed(dir.path())).unwrap();
        let devices = spec.linux().as_ref().unwrap().devices().clone().unwrap();
        let paths: Vec<&Path> = devices.iter().map(|d| d.path().as_path()).collect();
        assert!(!paths.contains(&Path::new("/dev/node-only")), "{paths:?}");
        let null = devices.iter().find(|d| d.path() == Path::new("/dev/null")).expect("/dev/null listed");
        assert_eq!((null.typ(), null.major(), null.minor()), (LinuxDeviceType::C, 1, 3));
        assert!(paths.iter().all(|p| !p.starts_with("/dev/pts") && *p != Path::new("/dev/console")), "{paths:?}");

        // A plain spec keeps its own list.
        let plain = format!(
            r#","linux":{{"devices":[{node}],"resources":{{"devices":[{{"allow":false,"access":"rwm"}},{{"allow":true,"type":"c","major":1,"minor":3,"access":"rwm"}}]}}}}"#
        );
        let spec = prepare_t("c1", &spec_json(&rootfs, &plain), &allowed(dir.path())).unwrap();
        let devices = spec.linux().as_ref().unwrap().devices().clone().unwrap();
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].path(), Path::new("/dev/node-only"));
    }

    #[test]
    fn malformed_json_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = prepare_t("c1", b"{\"root\": [", &allowed(dir.path())).unwrap_err();
        assert!(format!("{e:#}").starts_with("malformed OCI spec"), "{e:#}");
    }

    #[test]
    fn a_root_escaping_the_shared_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir_all(shared.join("c1")).unwrap();
        std::fs::create_dir_all(dir.path().join("secret")).unwrap();
        // By `..`.
        let e = prepare_t("c1", &spec_json(&shared.join("c1/../../secret"), ""), &allowed(&shared)).unwrap_err();
        assert!(format!("{e:#}").contains("outside the shared directory"), "{e:#}");
        // By a symlink.
        std::os::unix::fs::symlink(dir.path().join("secret"), shared.join("link")).unwrap();
        let e = prepare_t("c1", &spec_json(&shared.join("link"), ""), &allowed(&shared)).unwrap_err();
        assert!(format!("{e:#}").contains("outside the shared directory"), "{e:#}");
        // A bind mount source by symlink.
        let extra = format!(
            r#","mounts":[{{"destination":"/data","type":"bind","source":"{}","options":["rbind"]}}]"#,
            shared.join("link").display()
        );
        let e = prepare_t("c1", &spec_json(&shared.join("c1"), &extra), &allowed(&shared)).unwrap_err();
        assert!(format!("{e:#}").contains("mount source for '/data'"), "{e:#}");
    }

    #[test]
    fn absurd_sizes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("r")).unwrap();
        for (resources, needle) in [
            (r#"{"memory":{"limit":1000}}"#, "below the minimum"),
            (r#"{"memory":{"limit":-5}}"#, "negative"),
            (r#"{"memory":{"limit":9223372036854775807}}"#, "absurdly large"),
            (r#"{"cpu":{"shares":0}}"#, "cpu.shares"),
            (r#"{"pids":{"limit":-7}}"#, "pids.limit"),
        ] {
            let extra = format!(r#","linux":{{"resources":{resources}}}"#);
            let e = prepare_t("c1", &spec_json(&dir.path().join("r"), &extra), &allowed(dir.path())).unwrap_err();
            assert!(format!("{e:#}").contains(needle), "{resources}: {e:#}");
        }
    }

    #[test]
    fn ids_are_checked() {
        assert!(check_id("container id", "abc-1_2.3").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", &"x".repeat(200)] {
            assert!(check_id("container id", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_spec_without_args_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let json = format!(
            r#"{{"root":{{"path":"{}"}},"process":{{"user":{{"uid":0,"gid":0}},"args":[],"cwd":"/"}}}}"#,
            dir.path().display()
        );
        let e = prepare_t("c1", json.as_bytes(), &allowed(dir.path())).unwrap_err();
        assert!(format!("{e:#}").contains("process.args is empty"), "{e:#}");
    }
}
