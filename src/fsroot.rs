//! Paths inside trees that someone else can write: a layer being unpacked
//! (the image's author), a container's rootfs and the sandbox's shared
//! directory (root in the guest). Host code never resolves such a path
//! with plain path calls: every lookup here is an `openat2` beneath a
//! directory fd with no symlinks, no magic links and no `..`, and every
//! change acts on the fds it returns. Removal never crosses a mount point,
//! so a mount that failed to come off cannot take the host data behind it.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

/// Longest relative path accepted (PATH_MAX): bounds the depth of every
/// walk, and of the recursion in `remove_all`.
pub const MAX_REL_PATH: usize = 4096;

/// Resolution that stays below the root and follows nothing.
const STRICT: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS).union(ResolveFlags::NO_MAGICLINKS);

#[derive(Debug, thiserror::Error)]
#[error("{}: {what}: {source}", display(root, rel))]
pub struct FsRootError {
    root: PathBuf,
    rel: PathBuf,
    what: &'static str,
    #[source]
    source: std::io::Error,
}

impl FsRootError {
    /// The OS error behind it (`ELOOP` for a symlink on the way, `EXDEV`
    /// for a mount point, `EINVAL` for a path that is not plainly relative).
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

fn display(root: &Path, rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        root.display().to_string()
    } else {
        format!("{} (in {})", rel.display(), root.display())
    }
}

/// A directory opened once; paths below it are resolved only through it.
#[derive(Debug)]
pub struct FsRoot {
    fd: OwnedFd,
    path: PathBuf,
}

impl FsRoot {
    /// Opens `path`, a directory the host chose (its last component must
    /// not be a symlink).
    pub fn open(path: &Path) -> Result<Self, FsRootError> {
        let fd = rustix::fs::open(
            path,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| FsRootError {
            root: path.into(),
            rel: PathBuf::new(),
            what: "opening",
            source: e.into(),
        })?;
        Ok(Self { fd, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn err(&self, rel: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> FsRootError + '_ {
        let rel = rel.to_path_buf();
        move |source| FsRootError { root: self.path.clone(), rel, what, source }
    }

    /// The components of a plainly relative path; `.` is skipped, and
    /// anything that could climb (`..`, `/`) is refused.
    pub fn components(rel: &Path) -> std::io::Result<Vec<&OsStr>> {
        if rel.as_os_str().len() > MAX_REL_PATH {
            return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
        }
        rel.components()
            .filter(|c| *c != Component::CurDir)
            .map(|c| match c {
                Component::Normal(n) => Ok(n),
                _ => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
            })
            .collect()
    }

    fn checked(&self, rel: &Path) -> Result<PathBuf, FsRootError> {
        let parts = Self::components(rel).map_err(self.err(rel, "path"))?;
        Ok(parts.iter().collect())
    }

    fn open_beneath(&self, rel: &Path, flags: OFlags, resolve: ResolveFlags) -> Result<OwnedFd, FsRootError> {
        let clean = self.checked(rel)?;
        let target: &Path = if clean.as_os_str().is_empty() { Path::new(".") } else { &clean };
        rustix::fs::openat2(&self.fd, target, flags | OFlags::CLOEXEC | OFlags::NOFOLLOW, Mode::empty(), resolve)
            .map_err(|e| self.err(rel, "opening")(e.into()))
    }

    /// Opens the directory `rel` (for reading, `fsetxattr`, or as a dirfd).
    pub fn open_dir(&self, rel: &Path) -> Result<OwnedFd, FsRootError> {
        self.open_beneath(rel, OFlags::DIRECTORY | OFlags::RDONLY, STRICT)
    }

    /// An `O_PATH` fd of `rel`, whatever it is (a mount target).
    pub fn open_path(&self, rel: &Path) -> Result<OwnedFd, FsRootError> {
        self.open_beneath(rel, OFlags::PATH, STRICT)
    }

    /// Creates `rel` and its missing parents as directories with `mode`
    /// (existing ones are kept as they are) and opens it. A symlink or a
    /// non-directory on the way is an error, never followed.
    pub fn mkdir_all(&self, rel: &Path, mode: u32) -> Result<OwnedFd, FsRootError> {
        let parts = Self::components(rel).map_err(self.err(rel, "path"))?;
        let mut dir = self.open_dir(Path::new(""))?;
        for part in parts {
            match rustix::fs::mkdirat(&dir, part, Mode::from_raw_mode(mode)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(self.err(rel, "creating a directory")(e.into())),
            }
            dir = open_child(&dir, part, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())
                .map_err(self.err(rel, "opening a directory"))?;
        }
        Ok(dir)
    }

    /// The parent directory of `rel` (created if `create`) and the last
    /// component's name.
    pub fn parent(&self, rel: &Path, create: bool) -> Result<(OwnedFd, OsString), FsRootError> {
        let parts = Self::components(rel).map_err(self.err(rel, "path"))?;
        let Some((name, parents)) = parts.split_last() else {
            return Err(self.err(rel, "path")(std::io::Error::from_raw_os_error(libc::EINVAL)));
        };
        let parent: PathBuf = parents.iter().collect();
        let dir = if create { self.mkdir_all(&parent, 0o755)? } else { self.open_dir(&parent)? };
        Ok((dir, name.to_os_string()))
    }

    /// Opens the regular file `rel` for writing, creating it (and its
    /// parents) if missing; never truncates, never follows a symlink.
    pub fn create_file(&self, rel: &Path, mode: u32) -> Result<OwnedFd, FsRootError> {
        let (dir, name) = self.parent(rel, true)?;
        let fd = open_child(&dir, &name, OFlags::CREATE | OFlags::WRONLY, Mode::from_raw_mode(mode))
            .map_err(self.err(rel, "creating a file"))?;
        let st = rustix::fs::fstat(&fd).map_err(|e| self.err(rel, "stat")(e.into()))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(self.err(rel, "creating a file")(std::io::Error::from_raw_os_error(libc::EEXIST)));
        }
        Ok(fd)
    }

    /// Removes `rel` and everything below it without crossing a mount
    /// point or following a symlink (a symlink is removed, not followed).
    /// A mount still in place below is an error (`EXDEV`) and stays.
    /// Missing is fine.
    pub fn remove_all(&self, rel: &Path) -> Result<(), FsRootError> {
        let (dir, name) = match self.parent(rel, false) {
            Ok(p) => p,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        };
        remove_child(&dir, &name).map_err(self.err(rel, "removing"))
    }

    /// Reads the regular file `rel` as if this root were `/` (symlinks in
    /// the tree resolve inside it: `RESOLVE_IN_ROOT`), at most `max` bytes.
    /// For reading an image's own files (`etc/passwd`).
    pub fn read_in_root(&self, rel: &Path, max: usize) -> Result<Vec<u8>, FsRootError> {
        use std::io::Read;
        let fd = rustix::fs::openat2(
            &self.fd,
            rel,
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV,
        )
        .map_err(|e| self.err(rel, "opening")(e.into()))?;
        let st = rustix::fs::fstat(&fd).map_err(|e| self.err(rel, "stat")(e.into()))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(self.err(rel, "reading")(std::io::Error::other("not a regular file")));
        }
        let mut out = Vec::new();
        std::fs::File::from(fd).take(max as u64 + 1).read_to_end(&mut out).map_err(|e| self.err(rel, "reading")(e))?;
        if out.len() > max {
            return Err(self.err(rel, "reading")(std::io::Error::other(format!("larger than {max} bytes"))));
        }
        Ok(out)
    }
}

/// Opens `name`, one entry of `dir`, with `flags`: never through a
/// symlink or magic link, never anywhere but in `dir` (`O_NOFOLLOW`,
/// `O_CLOEXEC` always). Every single-step open of the walks here and of
/// the layer unpacker goes through this one call.
pub fn open_child(dir: &impl AsFd, name: &OsStr, flags: OFlags, mode: Mode) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::openat2(dir, name, flags | OFlags::NOFOLLOW | OFlags::CLOEXEC, mode, STRICT)?)
}

/// Removes whatever is at `name` in `dir` as `remove_at` does; missing is fine.
pub fn remove_child(dir: &impl AsFd, name: &OsStr) -> std::io::Result<()> {
    match remove_at(dir.as_fd(), name) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Removes `name` in `dir`, recursively for a directory, refusing to
/// enter a mount point (`RESOLVE_NO_XDEV` gives `EXDEV`).
pub fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> std::io::Result<()> {
    let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return Ok(rustix::fs::unlinkat(dir, name, AtFlags::empty())?);
    }
    let sub = rustix::fs::openat2(
        dir,
        name,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        STRICT | ResolveFlags::NO_XDEV,
    )?;
    loop {
        // Read a batch, then remove it: removing while iterating can skip entries.
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(&sub)? {
            let entry = entry?;
            let n = entry.file_name().to_bytes();
            if n != b"." && n != b".." {
                use std::os::unix::ffi::OsStrExt;
                names.push(OsStr::from_bytes(n).to_os_string());
            }
            if names.len() >= 1024 {
                break;
            }
        }
        if names.is_empty() {
            break;
        }
        for n in &names {
            remove_at(sub.as_fd(), n)?;
        }
    }
    Ok(rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?)
}

/// `/proc/self/fd/N`: how mount(2) is given a target that was opened
/// safely (the kernel resolves the fd, not a path).
pub fn proc_fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree() -> (tempfile::TempDir, FsRoot) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        let root = FsRoot::open(&dir.path().join("root")).unwrap();
        (dir, root)
    }

    #[test]
    fn paths_that_climb_or_are_absolute_are_refused() {
        let (_d, root) = tree();
        for bad in ["../x", "a/../../x", "/etc", "a/.."] {
            let e = root.mkdir_all(Path::new(bad), 0o755).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{bad}: {e}");
        }
        let long = "a/".repeat(MAX_REL_PATH);
        assert_eq!(root.mkdir_all(Path::new(&long), 0o755).unwrap_err().raw_os_error(), Some(libc::ENAMETOOLONG));
    }

    #[test]
    fn attack_symlinks_on_the_way_are_never_followed() {
        println!("ATTACK a symlink on a host path walk: tried");
        let (d, root) = tree();
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        symlink(&outside, root.path().join("link")).unwrap();
        symlink("../outside", root.path().join("rel")).unwrap();
        for via in ["link/new", "rel/new"] {
            // ELOOP, or ENOTDIR where the link is the last step of a walk
            // (an unfollowed symlink is no directory): refused either way.
            let refused = [Some(libc::ELOOP), Some(libc::ENOTDIR)];
            let e = root.mkdir_all(Path::new(via), 0o755).unwrap_err();
            assert!(refused.contains(&e.raw_os_error()), "{via}: {e}");
            let e = root.create_file(Path::new(via), 0o644).unwrap_err();
            assert!(refused.contains(&e.raw_os_error()), "{via}: {e}");
        }
        // A symlink as the file itself is not followed either.
        symlink(outside.join("target"), root.path().join("file")).unwrap();
        assert!(root.create_file(Path::new("file"), 0o644).is_err());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "nothing was made outside");
        println!("ATTACK a symlink on a host path walk: held");
    }

    #[test]
    fn remove_all_removes_symlinks_not_their_targets() {
        let (d, root) = tree();
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"k").unwrap();
        root.mkdir_all(Path::new("a/b"), 0o755).unwrap();
        symlink(&outside, root.path().join("a/b/link")).unwrap();
        std::fs::write(root.path().join("a/f"), b"x").unwrap();
        root.remove_all(Path::new("a")).unwrap();
        assert!(!root.path().join("a").exists());
        assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"k");
        root.remove_all(Path::new("a")).unwrap();
    }

    #[test]
    fn attack_removal_never_crosses_a_mount() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIP attack_removal_never_crosses_a_mount: needs root to mount");
            return;
        }
        println!("ATTACK teardown through a mount left in place: tried");
        let (d, root) = tree();
        let data = d.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("precious"), b"p").unwrap();
        root.mkdir_all(Path::new("c/vol"), 0o755).unwrap();
        let target = root.path().join("c/vol");
        nix::mount::mount(Some(&data), &target, None::<&str>, nix::mount::MsFlags::MS_BIND, None::<&str>).unwrap();
        let e = root.remove_all(Path::new("c")).unwrap_err();
        nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH).unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::EXDEV), "{e}");
        assert_eq!(std::fs::read(data.join("precious")).unwrap(), b"p", "the mounted data is untouched");
        root.remove_all(Path::new("c")).unwrap();
        println!("ATTACK teardown through a mount left in place: held");
    }

    #[test]
    fn attack_image_file_reads_resolve_inside_the_image() {
        println!("ATTACK an image /etc/passwd linking to a host file: tried");
        let (d, root) = tree();
        std::fs::write(d.path().join("secret"), b"host").unwrap();
        root.mkdir_all(Path::new("etc"), 0o755).unwrap();
        std::fs::write(root.path().join("etc/real"), b"image").unwrap();
        // An absolute link and a climbing one both land inside the root.
        symlink("/etc/real", root.path().join("etc/abs")).unwrap();
        symlink("../../../../secret", root.path().join("etc/climb")).unwrap();
        assert_eq!(root.read_in_root(Path::new("etc/abs"), 100).unwrap(), b"image");
        assert!(root.read_in_root(Path::new("etc/climb"), 100).is_err(), "no /secret inside the root");
        assert!(root.read_in_root(Path::new("etc/real"), 2).is_err(), "bounded");
        assert!(root.read_in_root(Path::new("etc"), 100).is_err(), "regular files only");
        println!("ATTACK an image /etc/passwd linking to a host file: held");
    }
}
