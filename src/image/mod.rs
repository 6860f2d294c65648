//! The OCI image store of the bundled CRI server: pulls from registries
//! (OCI distribution API through oci-client; plain HTTP only for registries
//! listed as insecure), keeps blobs by digest (every blob's digest is
//! verified), unpacks each layer once (gzip, zstd or plain tar; whiteouts
//! turned into overlayfs whiteouts and opaque directories), gives each
//! container a rootfs as an overlay of the image's layers, and collects
//! what no image uses any more when one is removed.
//!
//! Layout under the store's root:
//! `blobs/sha256/<hex>` (as pulled), `layers/<hex>/` (unpacked),
//! `images/<hex of the reference>.json` (one record per reference).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image reference '{reference}' is not valid: {reason}")]
    BadReference { reference: String, reason: String },
    #[error("pulling {reference}: {reason}")]
    Pull { reference: String, reason: String },
    #[error("blob {digest} of {reference}: content does not match its digest (got sha256:{actual})")]
    DigestMismatch { reference: String, digest: String, actual: String },
    #[error("layer {digest}: {reason}")]
    Layer { digest: String, reason: String },
    #[error("image {0} is not in the store")]
    NotFound(String),
    #[error("image store {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io { path: path.to_path_buf(), source }
}

/// One layer of a stored image.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerRecord {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
}

/// A pulled image, as the store keeps it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    /// The reference it was pulled by, normalised (`docker.io/library/x:tag`).
    pub reference: String,
    /// The manifest's digest (`sha256:...`), the image id.
    pub digest: String,
    pub config_digest: String,
    /// The image configuration (OCI image config JSON).
    pub config: serde_json::Value,
    /// Bottom layer first.
    pub layers: Vec<LayerRecord>,
}

impl ImageRecord {
    /// Bytes of the compressed layers.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

pub struct ImageStore {
    root: PathBuf,
    client: Client,
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The hex part of a `sha256:<hex>` digest, checked.
fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())).then_some(hex)
}

impl ImageStore {
    /// A store under `root`; registries in `insecure` (host[:port]) are
    /// reached over plain HTTP, every other one over HTTPS.
    pub fn open(root: &Path, insecure: &[String]) -> Result<Self, ImageError> {
        for dir in ["blobs/sha256", "layers", "images", "tmp"] {
            std::fs::create_dir_all(root.join(dir)).map_err(io_err(root))?;
        }
        let config = ClientConfig { protocol: ClientProtocol::HttpsExcept(insecure.to_vec()), ..Default::default() };
        Ok(Self { root: root.to_path_buf(), client: Client::new(config) })
    }

    fn parse(reference: &str) -> Result<Reference, ImageError> {
        if reference.trim().is_empty() {
            return Err(ImageError::BadReference { reference: reference.into(), reason: "it is empty".into() });
        }
        reference
            .parse::<Reference>()
            .map_err(|e| ImageError::BadReference { reference: reference.into(), reason: e.to_string() })
    }

    fn record_path(&self, reference: &str) -> PathBuf {
        self.root.join("images").join(format!("{}.json", sha256_hex(reference.as_bytes())))
    }

    fn blob_path(&self, hex: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(hex)
    }

    fn layer_dir(&self, hex: &str) -> PathBuf {
        self.root.join("layers").join(hex)
    }

    /// Pulls `reference` (manifest, config, layers), verifies every digest,
    /// unpacks layers not unpacked yet, and records the image.
    pub async fn pull(&self, reference: &str, auth: &RegistryAuth) -> Result<ImageRecord, ImageError> {
        let r = Self::parse(reference)?;
        let name = r.whole();
        let pull_err = |e: oci_client::errors::OciDistributionError| ImageError::Pull {
            reference: name.clone(),
            reason: e.to_string(),
        };
        let (manifest, digest, config) = self.client.pull_manifest_and_config(&r, auth).await.map_err(pull_err)?;
        let config_digest = manifest.config.digest.clone();
        let config_hex = digest_hex(&config_digest).ok_or_else(|| ImageError::Pull {
            reference: name.clone(),
            reason: format!("config digest '{config_digest}' is not sha256"),
        })?;
        let actual = sha256_hex(config.as_bytes());
        if actual != config_hex {
            return Err(ImageError::DigestMismatch { reference: name, digest: config_digest, actual });
        }
        let config: serde_json::Value = serde_json::from_str(&config)
            .map_err(|e| ImageError::Pull { reference: name.clone(), reason: format!("image config: {e}") })?;
        let mut layers = Vec::new();
        for layer in &manifest.layers {
            let hex = digest_hex(&layer.digest).ok_or_else(|| ImageError::Pull {
                reference: name.clone(),
                reason: format!("layer digest '{}' is not sha256", layer.digest),
            })?;
            if !self.blob_path(hex).is_file() {
                self.fetch_blob(&r, layer, hex).await?;
            }
            self.unpack(hex, &layer.media_type)?;
            layers.push(LayerRecord {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
                size: layer.size.max(0) as u64,
            });
        }
        let record = ImageRecord { reference: name.clone(), digest, config_digest, config, layers };
        let path = self.record_path(&name);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&record).expect("serialisable")).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        Ok(record)
    }

    async fn fetch_blob(
        &self,
        r: &Reference,
        layer: &oci_client::manifest::OciDescriptor,
        hex: &str,
    ) -> Result<(), ImageError> {
        let tmp = self.root.join("tmp").join(format!("{hex}.{}", std::process::id()));
        let result = async {
            let file = tokio::fs::File::create(&tmp).await.map_err(io_err(&tmp))?;
            let mut writer = tokio::io::BufWriter::new(file);
            self.client.pull_blob(r, layer, &mut writer).await.map_err(|e| {
                let reason = e.to_string();
                if reason.to_lowercase().contains("digest") {
                    ImageError::DigestMismatch {
                        reference: r.whole(),
                        digest: layer.digest.clone(),
                        actual: "(a different content)".into(),
                    }
                } else {
                    ImageError::Pull { reference: r.whole(), reason }
                }
            })?;
            use tokio::io::AsyncWriteExt;
            writer.flush().await.map_err(io_err(&tmp))?;
            // Checked again here, on what reached the disk.
            let actual = file_sha256(&tmp)?;
            if actual != hex {
                return Err(ImageError::DigestMismatch { reference: r.whole(), digest: layer.digest.clone(), actual });
            }
            let dest = self.blob_path(hex);
            std::fs::rename(&tmp, &dest).map_err(io_err(&dest))
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Unpacks blob `hex` into its layer directory, once.
    fn unpack(&self, hex: &str, media_type: &str) -> Result<(), ImageError> {
        let dir = self.layer_dir(hex);
        if dir.is_dir() {
            return Ok(());
        }
        let layer_err = |reason: String| ImageError::Layer { digest: format!("sha256:{hex}"), reason };
        let blob = self.blob_path(hex);
        let file = File::open(&blob).map_err(io_err(&blob))?;
        let reader: Box<dyn Read> = if media_type.ends_with("+zstd") || media_type.ends_with(".zstd") {
            Box::new(ruzstd::decoding::StreamingDecoder::new(file).map_err(|e| layer_err(format!("zstd: {e}")))?)
        } else if media_type.ends_with("+gzip") || media_type.ends_with(".gzip") || media_type.ends_with("tar.gzip") {
            Box::new(flate2::read::GzDecoder::new(file))
        } else if media_type.ends_with(".tar") || media_type.ends_with("diff.tar") {
            Box::new(file)
        } else {
            return Err(layer_err(format!("media type '{media_type}' is not a layer runv can unpack")));
        };
        let tmp = self.root.join("tmp").join(format!("layer-{hex}.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        let result = unpack_layer(reader, &tmp).map_err(layer_err);
        match result {
            Ok(()) => std::fs::rename(&tmp, &dir).map_err(io_err(&dir)),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    /// Every stored image.
    pub fn list(&self) -> Vec<ImageRecord> {
        let mut out: Vec<ImageRecord> = std::fs::read_dir(self.root.join("images"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
            .collect();
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        out
    }

    /// The stored image for a reference, or with a digest (`sha256:...`,
    /// the image id).
    pub fn get(&self, reference_or_id: &str) -> Option<ImageRecord> {
        if reference_or_id.starts_with("sha256:") {
            return self.list().into_iter().find(|i| i.digest == reference_or_id);
        }
        let r = Self::parse(reference_or_id).ok()?;
        let bytes = std::fs::read(self.record_path(&r.whole())).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Removes an image and every blob and layer no other image uses.
    pub fn remove(&self, reference_or_id: &str) -> Result<ImageRecord, ImageError> {
        let record = self.get(reference_or_id).ok_or_else(|| ImageError::NotFound(reference_or_id.into()))?;
        let path = self.record_path(&record.reference);
        std::fs::remove_file(&path).map_err(io_err(&path))?;
        self.collect_garbage()?;
        Ok(record)
    }

    /// Deletes blobs and unpacked layers that no stored image refers to.
    pub fn collect_garbage(&self) -> Result<(), ImageError> {
        let used: BTreeSet<String> = self
            .list()
            .iter()
            .flat_map(|i| i.layers.iter().filter_map(|l| digest_hex(&l.digest).map(str::to_owned)))
            .collect();
        for dir in ["blobs/sha256", "layers"] {
            let base = self.root.join(dir);
            for e in std::fs::read_dir(&base).map_err(io_err(&base))?.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !used.contains(&name) {
                    let p = e.path();
                    let r = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
                    r.map_err(io_err(&p))?;
                }
            }
        }
        Ok(())
    }

    /// The unpacked layer directories of `image`, top layer first (the
    /// order of overlayfs `lowerdir`).
    pub fn lower_dirs(&self, image: &ImageRecord) -> Result<Vec<PathBuf>, ImageError> {
        image
            .layers
            .iter()
            .rev()
            .map(|l| {
                let hex = digest_hex(&l.digest)
                    .ok_or_else(|| ImageError::Layer { digest: l.digest.clone(), reason: "not sha256".into() })?;
                let dir = self.layer_dir(hex);
                if dir.is_dir() {
                    Ok(dir)
                } else {
                    Err(ImageError::Layer { digest: l.digest.clone(), reason: "not unpacked (pull again)".into() })
                }
            })
            .collect()
    }

    /// Mounts a container rootfs at `target`: the image's layers under an
    /// overlay whose writable layer lives in `rw` (created here).
    pub fn mount_rootfs(&self, image: &ImageRecord, rw: &Path, target: &Path) -> Result<(), ImageError> {
        let lowers = self.lower_dirs(image)?;
        let (upper, work) = (rw.join("upper"), rw.join("work"));
        for d in [&upper, &work, &target.to_path_buf()] {
            std::fs::create_dir_all(d).map_err(io_err(d))?;
        }
        let mut lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        if lowerdir.is_empty() {
            // An image without layers: an empty lower directory.
            let empty = rw.join("empty");
            std::fs::create_dir_all(&empty).map_err(io_err(&empty))?;
            lowerdir.push(empty.display().to_string());
        }
        let options =
            format!("lowerdir={},upperdir={},workdir={}", lowerdir.join(":"), upper.display(), work.display());
        nix::mount::mount(
            Some("overlay"),
            target,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(options.as_str()),
        )
        .map_err(|e| ImageError::Io { path: target.to_path_buf(), source: e.into() })
    }
}

fn file_sha256(path: &Path) -> Result<String, ImageError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";

/// Unpacks a layer tar into `dest` as an overlayfs lower layer: entries stay
/// inside `dest` (tar's own checks against `..` and symlinked parents),
/// `.wh.NAME` becomes a whiteout (character device 0/0) for NAME, and
/// `.wh..wh..opq` marks its directory opaque.
pub fn unpack_layer(reader: impl Read, dest: &Path) -> Result<(), String> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    for entry in archive.entries().map_err(|e| format!("reading the tar stream: {e}"))? {
        let mut entry = entry.map_err(|e| format!("reading a tar entry: {e}"))?;
        let path = entry.path().map_err(|e| format!("a tar entry path: {e}"))?.into_owned();
        let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            // The root itself (`./`).
            continue;
        };
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            let parent = safe_join(dest, path.parent().unwrap_or(Path::new("")))?;
            std::fs::create_dir_all(&parent).map_err(|e| format!("{}: {e}", parent.display()))?;
            if name == OPAQUE_WHITEOUT {
                xattr_set(&parent, "trusted.overlay.opaque", b"y")?;
            } else {
                let target = parent.join(hidden);
                let _ = std::fs::remove_file(&target);
                nix::sys::stat::mknod(&target, nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::empty(), 0)
                    .map_err(|e| format!("whiteout {}: {e}", target.display()))?;
            }
            continue;
        }
        entry.unpack_in(dest).map_err(|e| format!("{}: {}", path.display(), error_chain(&e)))?;
    }
    Ok(())
}

/// An error with its causes ("a: b: c"); tar's errors name the path only
/// and keep the reason as the source.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(&format!(": {c}"));
        cause = c.source();
    }
    out
}

/// `dest/rel`, refusing absolute paths and `..`.
fn safe_join(dest: &Path, rel: &Path) -> Result<PathBuf, String> {
    let mut out = dest.to_path_buf();
    for c in rel.components() {
        match c {
            std::path::Component::Normal(p) => out.push(p),
            std::path::Component::CurDir => {}
            _ => return Err(format!("entry path {} leaves the layer", rel.display())),
        }
    }
    // A symlinked parent could lead outside: resolve and check.
    if let Ok(real) = out.canonicalize() {
        let root = dest.canonicalize().map_err(|e| e.to_string())?;
        if !real.starts_with(&root) {
            return Err(format!("entry path {} leaves the layer through a symlink", rel.display()));
        }
    }
    Ok(out)
}

fn xattr_set(path: &Path, name: &str, value: &[u8]) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let n = std::ffi::CString::new(name).map_err(|e| e.to_string())?;
    // SAFETY: NUL-terminated strings and a buffer we own.
    let r = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if r != 0 {
        return Err(format!("{name} on {}: {}", path.display(), std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Helper for tests and tools: a layer tar built from `(path, contents)`
/// entries (a `None` content makes a directory), gzip-compressed.
pub fn gzip_layer(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar_layer(entries)).expect("in memory");
    gz.finish().expect("in memory")
}

/// As `gzip_layer`, uncompressed.
pub fn tar_layer(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, content) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        match content {
            Some(data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                b.append_data(&mut h, path, *data).expect("in memory");
            }
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.set_mode(0o755);
                b.append_data(&mut h, path, std::io::empty()).expect("in memory");
            }
        }
    }
    b.into_inner().expect("in memory")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    #[test]
    fn whiteouts_become_overlay_whiteouts_and_opaque_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let layer = tar_layer(&[
            ("etc/", None),
            ("etc/kept", Some(b"k")),
            ("etc/.wh.gone", Some(b"")),
            ("var/cache/", None),
            ("var/cache/.wh..wh..opq", Some(b"")),
            ("var/cache/new", Some(b"n")),
        ]);
        unpack_layer(&layer[..], dir.path()).unwrap();
        assert_eq!(std::fs::read(dir.path().join("etc/kept")).unwrap(), b"k");
        let gone = std::fs::symlink_metadata(dir.path().join("etc/gone")).unwrap();
        assert!(gone.file_type().is_char_device());
        assert!(!dir.path().join("etc/.wh.gone").exists());
        assert!(dir.path().join("var/cache/new").exists());
        let mut buf = [0u8; 4];
        let p = std::ffi::CString::new(dir.path().join("var/cache").to_str().unwrap()).unwrap();
        let n = unsafe { libc::getxattr(p.as_ptr(), c"trusted.overlay.opaque".as_ptr(), buf.as_mut_ptr().cast(), 4) };
        assert_eq!((n, buf[0]), (1, b'y'));
    }

    #[test]
    fn entries_cannot_leave_the_layer() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("layer");
        std::fs::create_dir(&dest).unwrap();
        // A whiteout whose parent climbs out.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(0);
        // tar::Builder refuses `..` itself: write the name by hand.
        h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"../x/.wh.evil");
        h.set_cksum();
        b.append(&h, std::io::empty()).unwrap();
        let bytes = b.into_inner().unwrap();
        let err = unpack_layer(&bytes[..], &dest).unwrap_err();
        assert!(err.contains("leaves the layer"), "{err}");
        assert!(!dir.path().join("x").exists());
    }

    #[test]
    fn digests_and_references_are_checked() {
        assert_eq!(digest_hex(&format!("sha256:{}", "a".repeat(64))), Some(&*"a".repeat(64)));
        assert_eq!(digest_hex("sha256:abc"), None);
        assert_eq!(digest_hex(&format!("sha512:{}", "a".repeat(64))), None);
        assert_eq!(digest_hex(&format!("sha256:{}", "A".repeat(64))), None);
        assert!(matches!(ImageStore::parse(""), Err(ImageError::BadReference { .. })));
        assert!(matches!(ImageStore::parse("not a reference!"), Err(ImageError::BadReference { .. })));
        assert_eq!(ImageStore::parse("busybox").unwrap().whole(), "docker.io/library/busybox:latest");
    }
}
