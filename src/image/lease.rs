//! A container rootfs outside the CRI (`runv run --image`): an overlay of
//! an image's layers with a writable layer of its own, under the store's
//! `run/<random>/`, owned by one process.
//!
//! The lease's `owner` record names its process (pid and start time) and
//! the layers it mounts: garbage collection keeps those layers while the
//! owner lives, whoever removes the image meanwhile. Dropping the lease
//! unmounts and removes it; a lease whose owner died without doing so
//! (SIGKILL) is swept by the next lease taken from the store.

use std::path::{Path, PathBuf};

use super::{digest_hex, io_err, unique_suffix, ImageError, ImageRecord, ImageStore};
use crate::helper::ProcessIdentity;

const OWNER: &str = "owner";

/// A mounted rootfs; unmounted and removed when dropped.
#[derive(Debug)]
pub struct RootfsLease {
    dir: PathBuf,
    rootfs: PathBuf,
}

impl RootfsLease {
    /// The mounted rootfs.
    pub fn rootfs(&self) -> &Path {
        &self.rootfs
    }
}

impl Drop for RootfsLease {
    fn drop(&mut self) {
        release(&self.dir);
    }
}

fn release(dir: &Path) {
    crate::helper::unmount_below(dir);
    if let Err(e) = crate::helper::remove_tree(dir) {
        tracing::warn!("removing {}: {e}", dir.display());
    }
}

/// A lease's record: its owner's identity, then one layer hex per line.
fn read_owner(dir: &Path) -> Option<(ProcessIdentity, Vec<String>)> {
    let text = std::fs::read_to_string(dir.join(OWNER)).ok()?;
    let mut lines = text.lines();
    let owner = ProcessIdentity::parse(lines.next()?)?;
    Some((owner, lines.map(str::to_owned).collect()))
}

impl ImageStore {
    fn leases_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    /// Mounts a rootfs of `image` for this process, after sweeping the
    /// leases of processes that died holding one.
    pub fn lease_rootfs(&self, image: &ImageRecord) -> Result<RootfsLease, ImageError> {
        let base = self.leases_dir();
        crate::helper::create_private_dir_all(&base).map_err(io_err(&base))?;
        self.sweep_leases();
        let dir = base.join(unique_suffix());
        let owner = ProcessIdentity::of(std::process::id()).ok_or_else(|| ImageError::Io {
            path: PathBuf::from("/proc/self/stat"),
            source: std::io::Error::other("cannot read this process's start time"),
        })?;
        let hexes: Vec<&str> = image.layers.iter().filter_map(|l| digest_hex(&l.digest)).collect();
        let lease = RootfsLease { rootfs: dir.join("rootfs"), dir };
        // The record goes first: a lease is never mounted without one.
        crate::helper::create_private_dir_all(&lease.dir).map_err(io_err(&lease.dir))?;
        let record = std::iter::once(owner.record()).chain(hexes.iter().map(|h| h.to_string())).collect::<Vec<_>>();
        let path = lease.dir.join(OWNER);
        crate::helper::write_private(&path, format!("{}\n", record.join("\n")).as_bytes()).map_err(io_err(&path))?;
        self.mount_rootfs(image, &lease.dir.join("rw"), &lease.rootfs)?;
        Ok(lease)
    }

    /// Layer hexes that live leases mount.
    pub(super) fn leased_layers(&self) -> Vec<String> {
        let entries = std::fs::read_dir(self.leases_dir()).into_iter().flatten().flatten();
        entries
            .filter_map(|e| read_owner(&e.path()))
            .filter(|(owner, _)| owner.is_alive())
            .flat_map(|(_, hexes)| hexes)
            .collect()
    }

    /// Unmounts and removes the leases whose owner is gone.
    fn sweep_leases(&self) {
        for e in std::fs::read_dir(self.leases_dir()).into_iter().flatten().flatten() {
            let dir = e.path();
            match read_owner(&dir) {
                Some((owner, _)) if owner.is_alive() => {}
                // No record: its owner died before writing it, or it is not
                // a lease; either way nobody uses it, unless it was made a
                // moment ago by a process about to write its record.
                None if recent(&dir) => {}
                _ => {
                    tracing::info!("removing the rootfs lease {} of a process that is gone", dir.display());
                    release(&dir);
                }
            }
        }
    }
}

/// Whether `dir` changed in the last minute.
fn recent(dir: &Path) -> bool {
    std::fs::metadata(dir)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < std::time::Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, ImageStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path(), &[]).unwrap();
        (dir, store)
    }

    fn lease_dir(store: &ImageStore, owner: &str, hexes: &[&str]) -> PathBuf {
        let dir = store.leases_dir().join(unique_suffix());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(OWNER), format!("{owner}\n{}\n", hexes.join("\n"))).unwrap();
        dir
    }

    #[test]
    fn a_live_owners_layers_are_leased_and_a_dead_owners_lease_is_swept() {
        let (_d, store) = store();
        let me = ProcessIdentity::of(std::process::id()).unwrap();
        let live = lease_dir(&store, &me.record(), &["aa", "bb"]);
        // Same pid, another start time: a reused pid, so a dead owner.
        let dead = lease_dir(&store, &format!("{} {}", me.pid, me.start_time + 1), &["cc"]);
        let mut leased = store.leased_layers();
        leased.sort();
        assert_eq!(leased, ["aa", "bb"]);
        store.sweep_leases();
        assert!(live.is_dir(), "a live owner's lease was swept");
        assert!(!dead.exists(), "a dead owner's lease was kept");
    }

    #[test]
    fn a_fresh_lease_without_its_record_yet_is_left_alone() {
        let (_d, store) = store();
        let dir = store.leases_dir().join("fresh");
        std::fs::create_dir_all(&dir).unwrap();
        store.sweep_leases();
        assert!(dir.is_dir());
    }
}
