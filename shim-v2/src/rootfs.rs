//! The sandbox's shared directory on the host (served to the guest by
//! virtiofsd): each container's rootfs and bind-mounted volumes are
//! mounted under it, and the container's spec is rewritten to the paths
//! the guest sees.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use containerd_shim_protos::api::Mount as RootfsMount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use runv_proto::guest;

use crate::{ANNOTATION_CONTAINER_TYPE, ANNOTATION_SANDBOX_ID};

/// The grouping id of the shim for the bundle's container: a CRI pod's
/// containers share their sandbox's shim.
pub fn sandbox_grouping(config_json: &Path) -> Option<String> {
    let text = std::fs::read_to_string(config_json).ok()?;
    let spec: serde_json::Value = serde_json::from_str(&text).ok()?;
    let annotations = spec.get("annotations")?;
    if annotations.get(ANNOTATION_CONTAINER_TYPE)?.as_str()? == "sandbox" {
        return None;
    }
    annotations.get(ANNOTATION_SANDBOX_ID)?.as_str().map(str::to_owned)
}

pub struct SharedDir {
    path: PathBuf,
}

impl SharedDir {
    /// Creates the directory as a mount point of its own with shared
    /// propagation, so mounts made under it later reach virtiofsd's mount
    /// namespace too.
    pub fn create(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        mount(Some(path), path, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .with_context(|| format!("bind-mounting {} onto itself", path.display()))?;
        let shared = Self { path: path.to_path_buf() };
        mount(None::<&str>, path, None::<&str>, MsFlags::MS_SHARED, None::<&str>)
            .with_context(|| format!("making {} a shared mount", path.display()))?;
        Ok(shared)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn container_dir(&self, id: &str) -> PathBuf {
        self.path.join(id)
    }

    /// Mounts the container's rootfs (the snapshotter's mounts, or the
    /// bundle's `rootfs` directory) under the shared directory.
    pub fn mount_rootfs(&self, id: &str, mounts: &[RootfsMount], bundle: &Path) -> Result<()> {
        let target = self.container_dir(id).join("rootfs");
        std::fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
        if mounts.is_empty() {
            let source = bundle.join("rootfs");
            if !source.is_dir() {
                bail!("bundle {} has no rootfs directory and containerd passed no rootfs mounts", bundle.display());
            }
            mount(Some(&source), &target, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
                .with_context(|| format!("bind-mounting {}", source.display()))?;
            return Ok(());
        }
        for m in mounts {
            let (flags, data) = parse_options(&m.options);
            let fstype = if m.type_ == "bind" { None } else { Some(m.type_.as_str()) };
            let flags = if m.type_ == "bind" { flags | MsFlags::MS_BIND } else { flags };
            mount(Some(m.source.as_str()), &target, fstype, flags, (!data.is_empty()).then_some(data.as_str()))
                .with_context(|| format!("mounting the rootfs ({} {})", m.type_, m.source))?;
        }
        Ok(())
    }

    /// Makes a host path (a volume, a hosts or resolv.conf file) visible in
    /// the guest; returns the guest path to use in the spec.
    pub fn bind_volume(&self, id: &str, index: usize, source: &Path) -> Result<PathBuf> {
        let meta = std::fs::metadata(source).with_context(|| format!("mount source {}", source.display()))?;
        let dir = self.container_dir(id).join("mounts");
        std::fs::create_dir_all(&dir)?;
        let name = format!("{index}-{}", source.file_name().and_then(|n| n.to_str()).unwrap_or("volume"));
        let target = dir.join(&name);
        if meta.is_dir() {
            std::fs::create_dir_all(&target)?;
        } else {
            std::fs::write(&target, b"")?;
        }
        mount(Some(source), &target, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
            .with_context(|| format!("bind-mounting {}", source.display()))?;
        Ok(Path::new(guest::SHARED_MOUNT_POINT).join(id).join("mounts").join(name))
    }

    /// Unmounts and removes everything of one container.
    pub fn remove_container(&self, id: &str) {
        let dir = self.container_dir(id);
        unmount_below(&dir);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Unmounts everything and removes the directory.
    pub fn destroy(&self) {
        unmount_below(&self.path);
        let _ = umount2(&self.path, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

pub use runv::helper::unmount_below;

fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => {}
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "bind" => flags |= MsFlags::MS_BIND,
            other => data.push(other.to_string()),
        }
    }
    (flags, data.join(","))
}

/// The container's spec as the guest must see it: rootfs and volumes in
/// the shared directory, namespaces of the pod's sandbox in the guest, no
/// host hooks.
pub fn guest_spec(mut spec: Spec, id: &str, shared: &SharedDir, sandbox_guest_pid: Option<u32>) -> Result<Spec> {
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(Path::new(guest::SHARED_MOUNT_POINT).join(id).join("rootfs"));
    spec.set_root(Some(root));
    spec.set_hooks(None);
    if let Some(mounts) = spec.mounts().clone() {
        let mut fixed = Vec::with_capacity(mounts.len());
        for (i, mut m) in mounts.into_iter().enumerate() {
            let is_bind =
                m.typ().as_deref() == Some("bind") || m.options().iter().flatten().any(|o| o == "bind" || o == "rbind");
            if is_bind {
                if let Some(source) = m.source().clone() {
                    let guest_path = shared.bind_volume(id, i, &source)?;
                    m.set_source(Some(guest_path));
                }
            }
            fixed.push(m);
        }
        spec.set_mounts(Some(fixed));
    }
    if let Some(mut linux) = spec.linux().clone() {
        // Host namespace paths mean nothing in the guest. A pod container's
        // are its sandbox's: they become the sandbox container's namespaces
        // in the guest; anything else gets namespaces of its own.
        // The VM is the pod's network namespace (its NICs are the pod's
        // interfaces): a namespace given by path is not recreated inside.
        if let Some(namespaces) = linux.namespaces().clone() {
            let fixed: Vec<_> = namespaces
                .into_iter()
                .filter(|ns| !(ns.typ() == LinuxNamespaceType::Network && ns.path().is_some()))
                .map(|mut ns| {
                    let joined = ns.path().is_some().then_some(sandbox_guest_pid).flatten();
                    ns.set_path(joined.map(|pid| PathBuf::from(format!("/proc/{pid}/ns/{}", proc_ns_name(ns.typ())))));
                    ns
                })
                .collect();
            linux.set_namespaces(Some(fixed));
        }
        // A container sharing the "host" UTS namespace shares the guest's,
        // whose hostname the sandbox already set (a host-network pod).
        let own_uts = linux.namespaces().iter().flatten().any(|ns| ns.typ() == LinuxNamespaceType::Uts);
        if !own_uts {
            spec.set_hostname(None);
        }
        spec.set_linux(Some(linux));
    }
    Ok(spec)
}

/// The name of a namespace kind under /proc/PID/ns.
fn proc_ns_name(kind: LinuxNamespaceType) -> &'static str {
    match kind {
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Mount => "mnt",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Time => "time",
    }
}

/// The host network namespace a sandbox's first container names (CNI's, for
/// a CRI pod). None: no network namespace of its own, or a new empty one.
pub fn pod_netns(spec: &Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|ns| ns.typ() == LinuxNamespaceType::Network)?
        .path()
        .clone()
}

/// The sandbox a pod container belongs to, from the CRI annotations.
pub fn sandbox_of(spec: &Spec) -> Option<String> {
    let annotations = spec.annotations().as_ref()?;
    if annotations.get(ANNOTATION_CONTAINER_TYPE).map(String::as_str) == Some("sandbox") {
        return None;
    }
    annotations.get(ANNOTATION_SANDBOX_ID).cloned()
}
