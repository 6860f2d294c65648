//! The sandbox's shared directory on the host (served to the guest by
//! virtiofsd): each container's rootfs and bind-mounted volumes are
//! mounted under it, and the container's spec is rewritten to the paths
//! the guest sees.

use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use containerd_shim_protos::api::Mount as RootfsMount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use runv::fsroot::{proc_fd_path, FsRoot};
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

/// The sandbox's shared directory, in two trees (the layout Kata adopted
/// after CVE-2020-2026):
///
/// - `mounts/`, the staging tree: host-only. Every rootfs and volume of the
///   sandbox is mounted here, through fds (`FsRoot`), never through a path
///   the guest could have redirected.
/// - `shared/`, what virtiofsd serves: a read-only bind of the staging tree
///   with slave propagation. Mounts made in `mounts/` appear here with their
///   own flags (a rootfs stays writable), but the guest can create nothing
///   where the host resolves paths: no symlink planted by root in the guest
///   can point a host mount, write or removal elsewhere.
///
/// Both are nosuid and nodev on the host; the guest's own mount decides
/// what setuid does inside.
pub struct SharedDir {
    staging: FsRoot,
    view: PathBuf,
}

/// Flags of every mount the host makes for the guest: the host never runs
/// a setuid binary or opens a device node of a guest-writable tree.
const HOST_SIDE: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);

impl SharedDir {
    /// Creates both trees under `dir` (the shim's private directory).
    pub fn create(dir: &Path) -> Result<Self> {
        let (staging, view) = (dir.join("mounts"), dir.join("shared"));
        for d in [&staging, &view] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .with_context(|| format!("creating {}", d.display()))?;
        }
        let remove = || {
            let _ = umount2(&view, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW);
            let _ = umount2(&staging, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW);
            let _ = std::fs::remove_dir(&view);
            let _ = std::fs::remove_dir(&staging);
        };
        let made = (|| -> Result<()> {
            // The staging tree: a mount of its own in a fresh peer group, so
            // what is mounted below reaches the view (and virtiofsd's copy of
            // it) and nothing else.
            mount(Some(&staging), &staging, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .with_context(|| format!("bind-mounting {} onto itself", staging.display()))?;
            remount(&staging, HOST_SIDE)?;
            mount(None::<&str>, &staging, None::<&str>, MsFlags::MS_PRIVATE, None::<&str>)
                .and_then(|()| mount(None::<&str>, &staging, None::<&str>, MsFlags::MS_SHARED, None::<&str>))
                .with_context(|| format!("making {} a shared mount", staging.display()))?;
            // The guest's view: read-only, receiving the staging tree's mounts.
            mount(Some(&staging), &view, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .with_context(|| format!("bind-mounting {} on {}", staging.display(), view.display()))?;
            mount(None::<&str>, &view, None::<&str>, MsFlags::MS_SLAVE, None::<&str>)
                .with_context(|| format!("making {} a slave mount", view.display()))?;
            remount(&view, HOST_SIDE | MsFlags::MS_RDONLY)
        })();
        if let Err(e) = made {
            remove();
            return Err(e);
        }
        match FsRoot::open(&staging) {
            Ok(staging) => Ok(Self { staging, view }),
            Err(e) => {
                remove();
                Err(e.into())
            }
        }
    }

    /// The directory virtiofsd serves to the guest.
    pub fn path(&self) -> &Path {
        &self.view
    }

    /// Mounts the container's rootfs (the snapshotter's mounts, or the
    /// bundle's `rootfs` directory) at `<id>/rootfs`.
    pub fn mount_rootfs(&self, id: &str, mounts: &[RootfsMount], bundle: &Path) -> Result<()> {
        check_id(id)?;
        let rel = Path::new(id).join("rootfs");
        let target = self.staging.mkdir_all(&rel, 0o755)?;
        if mounts.is_empty() {
            let source = bundle.join("rootfs");
            if !source.is_dir() {
                bail!("bundle {} has no rootfs directory and containerd passed no rootfs mounts", bundle.display());
            }
            bind_onto(&source, &target, false).with_context(|| format!("bind-mounting {}", source.display()))?;
            return Ok(());
        }
        for m in mounts {
            let (flags, data) = parse_options(&m.options);
            if m.type_ == "bind" || flags.contains(MsFlags::MS_BIND) {
                bind_onto(Path::new(&m.source), &target, flags.contains(MsFlags::MS_RDONLY))
                    .with_context(|| format!("bind-mounting the rootfs {}", m.source))?;
                continue;
            }
            // A new filesystem (containerd's overlay): its flags are set at
            // mount time, so the copy in the guest's view has them too.
            mount(
                Some(m.source.as_str()),
                &proc_fd_path(&target),
                Some(m.type_.as_str()),
                flags | HOST_SIDE,
                (!data.is_empty()).then_some(data.as_str()),
            )
            .with_context(|| format!("mounting the rootfs ({} {})", m.type_, m.source))?;
        }
        Ok(())
    }

    /// Makes a host path (a volume, a hosts or resolv.conf file) visible in
    /// the guest at `<id>/mounts/<index>-<name>`; returns the guest path to
    /// use in the spec. A read-only volume is read-only on the host side too.
    pub fn bind_volume(&self, id: &str, index: usize, source: &Path, read_only: bool) -> Result<PathBuf> {
        check_id(id)?;
        // The source is resolved once: the tree taken from it says whether
        // its mount point must be a directory or a file.
        let tree = detached_tree(source, read_only).with_context(|| format!("mount source {}", source.display()))?;
        let is_dir = rustix::fs::fstat(&tree)
            .map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory)
            .with_context(|| format!("mount source {}", source.display()))?;
        let name = format!("{index}-{}", source.file_name().and_then(|n| n.to_str()).unwrap_or("volume"));
        let rel = Path::new(id).join("mounts").join(&name);
        let target =
            if is_dir { self.staging.mkdir_all(&rel, 0o755)? } else { self.staging.create_file(&rel, 0o644)? };
        attach(&tree, &target).with_context(|| format!("bind-mounting {}", source.display()))?;
        Ok(Path::new(guest::SHARED_MOUNT_POINT).join(id).join("mounts").join(name))
    }

    /// Unmounts and removes everything of one container. Removal never
    /// crosses a mount that failed to come off.
    pub fn remove_container(&self, id: &str) {
        if check_id(id).is_err() {
            return;
        }
        unmount_below(&self.view.join(id));
        unmount_below(&self.staging.path().join(id));
        if let Err(e) = self.staging.remove_all(Path::new(id)) {
            log::warn!("removing container {id}'s shared directory: {e}");
        }
    }

    /// Unmounts everything and removes both trees.
    pub fn destroy(&self) {
        unmount_below(&self.view);
        unmount_below(self.staging.path());
        for d in [&self.view, self.staging.path()] {
            let _ = umount2(d, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW);
        }
        let _ = std::fs::remove_dir(&self.view);
        if let Err(e) = runv::helper::remove_tree(self.staging.path()) {
            log::warn!("removing {}: {e}", self.staging.path().display());
        }
    }
}

/// Container ids become path components here: containerd's identifier
/// rule (letters and digits, with `.`, `_`, `-` between), at most 76.
pub fn check_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 76
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && !id.contains("..");
    if !ok {
        bail!("container id {id:?} is not a valid identifier (letters, digits and . _ - between them, at most 76)");
    }
    Ok(())
}

/// Bind-mounts `source` (a host path) recursively onto the opened target,
/// with the new mount API: the target is the fd, not a path.
fn bind_onto(source: &Path, target: &impl AsFd, read_only: bool) -> std::io::Result<()> {
    attach(&detached_tree(source, read_only)?, target)
}

/// A recursive clone of the mount tree at `source`, not attached anywhere
/// yet, with nosuid, nodev (and ro) set: set before it is attached, so the
/// copy that propagates into the guest's view has them too (a remount
/// afterwards would change the staging mount only).
fn detached_tree(source: &Path, read_only: bool) -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::mount::{open_tree, OpenTreeFlags};
    let tree = open_tree(
        rustix::fs::CWD,
        source,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC | OpenTreeFlags::AT_RECURSIVE,
    )?;
    let mut attr = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
    if read_only {
        attr |= libc::MOUNT_ATTR_RDONLY;
    }
    let attr = libc::mount_attr { attr_set: attr, attr_clr: 0, propagation: 0, userns_fd: 0 };
    // SAFETY: a valid fd, a NUL-terminated empty path and a mount_attr of
    // the size given.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            std::os::fd::AsRawFd::as_raw_fd(&tree),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(tree)
}

/// Attaches a detached tree onto the opened target.
fn attach(tree: &impl AsFd, target: &impl AsFd) -> std::io::Result<()> {
    use rustix::mount::{move_mount, MoveMountFlags};
    move_mount(
        tree,
        "",
        target,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )?;
    Ok(())
}

/// Sets the per-mount flags of the bind mount at `path`.
fn remount(path: &Path, flags: MsFlags) -> Result<()> {
    mount(None::<&str>, path, None::<&str>, MsFlags::MS_REMOUNT | MsFlags::MS_BIND | flags, None::<&str>)
        .with_context(|| format!("setting mount flags {flags:?} on {}", path.display()))
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
                    let read_only = m.options().iter().flatten().any(|o| o == "ro");
                    let guest_path = shared.bind_volume(id, i, &source, read_only)?;
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
        // (The spec still holds the namespaces as asked; only the network
        // one was dropped above.)
        if !has_namespace(&spec, LinuxNamespaceType::Uts) {
            spec.set_hostname(None);
        }
        spec.set_linux(Some(linux));
    }
    Ok(spec)
}

/// Refuses a CRI container (one containerd's CRI plugin made: it carries
/// the container-type annotation) that asks for the node's PID or IPC
/// namespace: containerd leaves the namespace out of the spec for a
/// hostPID or hostIPC pod, and a VM pod cannot share the node's. The node's
/// network (hostNetwork) is served: the VM's own loopback, the node's
/// hostname.
pub fn check_host_namespaces(spec: &Spec) -> Result<()> {
    if !spec.annotations().as_ref().is_some_and(|a| a.contains_key(ANNOTATION_CONTAINER_TYPE)) {
        return Ok(());
    }
    for (kind, field) in [(LinuxNamespaceType::Pid, "hostPID"), (LinuxNamespaceType::Ipc, "hostIPC")] {
        if !has_namespace(spec, kind) {
            bail!(
                "the pod asks for the node's {} namespace ({field}: true); a runv pod runs in a VM of its own \
                 and cannot share it (README: How runv pods differ from runc pods)",
                proc_ns_name(kind)
            );
        }
    }
    Ok(())
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
/// Whether `spec` asks for a namespace of `kind` (its own, or one joined by
/// path): without one the process shares the node's.
pub fn has_namespace(spec: &Spec, kind: LinuxNamespaceType) -> bool {
    spec.linux().as_ref().and_then(|l| l.namespaces().as_ref()).is_some_and(|n| n.iter().any(|ns| ns.typ() == kind))
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cri_pod_asking_for_the_nodes_pid_or_ipc_namespace_is_refused_by_name() {
        let mut spec = Spec::default();
        assert!(check_host_namespaces(&spec).is_ok(), "not a CRI container: its namespaces are its own business");
        spec.set_annotations(Some([(ANNOTATION_CONTAINER_TYPE.to_string(), "sandbox".to_string())].into()));
        assert!(check_host_namespaces(&spec).is_ok(), "the default spec has every namespace");
        for (kind, field) in [(LinuxNamespaceType::Pid, "hostPID"), (LinuxNamespaceType::Ipc, "hostIPC")] {
            let mut s = spec.clone();
            let mut linux = s.linux().clone().unwrap();
            let kept: Vec<_> = linux.namespaces().clone().unwrap().into_iter().filter(|n| n.typ() != kind).collect();
            linux.set_namespaces(Some(kept));
            s.set_linux(Some(linux));
            let e = check_host_namespaces(&s).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains("cannot share"), "{e}");
        }
    }
    use std::os::unix::fs::symlink;

    fn mount_options(path: &Path) -> Option<String> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        info.lines()
            .rfind(|l| l.split_whitespace().nth(4) == Some(path.to_str().unwrap()))
            .and_then(|l| l.split_whitespace().nth(5).map(str::to_owned))
    }

    fn mounts_below(dir: &Path) -> usize {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        info.lines().filter(|l| l.split_whitespace().nth(4).is_some_and(|p| Path::new(p).starts_with(dir))).count()
    }

    fn root_or_skip(test: &str) -> bool {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIP {test}: needs root to mount");
            return false;
        }
        true
    }

    /// A private mount namespace for the test thread's process would hide
    /// nothing here: the test mounts under its own temp dir and removes
    /// every mount before it returns, even on failure (`Cleanup`).
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            unmount_below(&self.0);
        }
    }

    #[test]
    fn attack_shared_dir_guest_view_is_read_only_and_teardown_follows_nothing() {
        if !root_or_skip("attack_shared_dir_guest_view_is_read_only_and_teardown_follows_nothing") {
            return;
        }
        println!("ATTACK symlinks in the shared directory (host mounts, unit): tried");
        let tmp = tempfile::tempdir().unwrap();
        let _cleanup = Cleanup(tmp.path().to_path_buf());
        let dir = tmp.path().join("shim");
        let bundle = tmp.path().join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs/bin")).unwrap();
        std::fs::write(bundle.join("rootfs/bin/tool"), b"image").unwrap();
        let volume = tmp.path().join("volume");
        std::fs::create_dir(&volume).unwrap();
        std::fs::write(volume.join("data"), b"volume").unwrap();
        let hosts = tmp.path().join("hosts");
        std::fs::write(&hosts, b"127.0.0.1 localhost\n").unwrap();

        let shared = SharedDir::create(&dir).unwrap();
        let view = shared.path().to_path_buf();
        assert_eq!(view, dir.join("shared"));
        // Root in the guest (through virtiofsd) cannot create anything where
        // the host resolves paths: not a symlink for the next container, not
        // a file beside a rootfs.
        let e = symlink("/etc", view.join("c2")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");

        shared.mount_rootfs("c1", &[], &bundle).unwrap();
        let guest_vol = shared.bind_volume("c1", 0, &volume, false).unwrap();
        assert_eq!(guest_vol, Path::new(guest::SHARED_MOUNT_POINT).join("c1/mounts/0-volume"));
        shared.bind_volume("c1", 1, &hosts, true).unwrap();
        // The mounts made in the staging tree appear in the view...
        assert_eq!(std::fs::read(view.join("c1/rootfs/bin/tool")).unwrap(), b"image");
        assert_eq!(std::fs::read(view.join("c1/mounts/0-volume/data")).unwrap(), b"volume");
        assert_eq!(std::fs::read(view.join("c1/mounts/1-hosts")).unwrap(), b"127.0.0.1 localhost\n");
        // ...writable where the container may write, read-only where not.
        std::fs::write(view.join("c1/rootfs/new"), b"w").unwrap();
        assert_eq!(std::fs::read(bundle.join("rootfs/new")).unwrap(), b"w");
        let e = std::fs::write(view.join("c1/mounts/1-hosts"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        let e = std::fs::write(view.join("c1/evil"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        // The host never runs setuid files or opens devices from these trees.
        for p in [view.join("c1/rootfs"), view.join("c1/mounts/0-volume"), dir.join("mounts/c1/rootfs")] {
            let opts = mount_options(&p).unwrap_or_else(|| panic!("{} is not a mount", p.display()));
            assert!(opts.contains("nosuid") && opts.contains("nodev"), "{}: {opts}", p.display());
        }

        // A guest that writes through the rootfs and the volume plants
        // symlinks there; teardown follows none of them.
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"host").unwrap();
        symlink(&outside, view.join("c1/rootfs/escape")).unwrap();
        symlink(&outside, volume.join("escape")).unwrap();
        shared.remove_container("c1");
        assert_eq!(mounts_below(&dir.join("mounts/c1")) + mounts_below(&view.join("c1")), 0);
        assert!(!dir.join("mounts/c1").exists());
        assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"host");
        assert_eq!(std::fs::read(bundle.join("rootfs/bin/tool")).unwrap(), b"image", "the image is untouched");
        assert_eq!(std::fs::read(volume.join("data")).unwrap(), b"volume", "the volume is untouched");

        shared.destroy();
        assert_eq!(mounts_below(&dir), 0);
        assert!(!view.exists() && !dir.join("mounts").exists());
        println!("ATTACK symlinks in the shared directory (host mounts, unit): held");
    }

    #[test]
    fn ids_that_are_not_identifiers_never_become_paths() {
        for bad in ["", "..", "../x", "a/b", "-x", ".hidden", "x\ny", &"a".repeat(77)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
        for good in ["c1", "a.b_c-d", &"f".repeat(64)] {
            check_id(good).unwrap();
        }
    }
}
