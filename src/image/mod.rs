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
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::fsroot::{open_child, remove_child, FsRoot};

pub mod config;
pub mod hosts;
pub mod lease;

pub use hosts::{Endpoint, RegistryHosts};
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

/// What a pull reports as it goes, for a progress display (`runv run
/// --image`); every method has a default that does nothing. Layers are
/// numbered bottom first, as the manifest lists them.
pub trait PullProgress: Send + Sync {
    /// The manifest is read: each layer's digest and size in bytes.
    fn layers(&self, _layers: &[(String, u64)]) {}
    /// Layer `index` is already in the store.
    fn present(&self, _index: usize) {}
    /// `bytes` of layer `index` have arrived so far.
    fn fetched(&self, _index: usize, _bytes: u64) {}
    /// Layer `index` is fetched, verified and unpacked.
    fn done(&self, _index: usize) {}
}

/// A pull that reports nothing.
pub struct NoProgress;

impl PullProgress for NoProgress {}

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
    /// A record of no layers with `config` as its image configuration, for
    /// the unit tests of what reads it.
    #[cfg(test)]
    pub(crate) fn with_config(config: serde_json::Value) -> Self {
        Self {
            reference: "r/app:1".into(),
            digest: "sha256:x".into(),
            config_digest: String::new(),
            config,
            layers: Vec::new(),
        }
    }

    /// Bytes of the compressed layers.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

pub struct ImageStore {
    root: PathBuf,
    hosts: RegistryHosts,
    /// One registry client per endpoint's settings (clients keep tokens).
    clients: std::sync::Mutex<std::collections::HashMap<String, Client>>,
    limits: ImageLimits,
    /// Layers a pull in progress uses (by hex, counted): garbage collection
    /// keeps them even before the pull has written its image record.
    pinned: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

/// Keeps a pull's layers from garbage collection until dropped.
struct Pins<'a> {
    store: &'a ImageStore,
    hexes: Vec<String>,
}

impl Drop for Pins<'_> {
    fn drop(&mut self) {
        let mut pinned = self.store.pinned.lock().expect("pin lock");
        for h in &self.hexes {
            if let Some(n) = pinned.get_mut(h) {
                *n -= 1;
                if *n == 0 {
                    pinned.remove(h);
                }
            }
        }
    }
}

/// A name no other pull (in this or another process) uses.
fn unique_suffix() -> String {
    let mut b = [0u8; 8];
    rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()).expect("getrandom");
    hex::encode(b)
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
        // Layers keep their setuid files, file capabilities and device
        // nodes: nobody but root may reach them on the host.
        crate::helper::create_private_dir_all(root).map_err(io_err(root))?;
        for dir in ["blobs/sha256", "layers", "images", "tmp"] {
            crate::helper::create_private_dir_all(&root.join(dir)).map_err(io_err(root))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
            hosts: RegistryHosts { insecure: insecure.to_vec(), ..Default::default() },
            clients: Default::default(),
            limits: ImageLimits::default(),
            pinned: Default::default(),
        })
    }

    /// Sets where registries are pulled from (`hosts.toml` files, the auth
    /// file); the insecure list `open` was given is kept unless `hosts`
    /// has one.
    pub fn with_hosts(mut self, mut hosts: RegistryHosts) -> Self {
        if hosts.insecure.is_empty() {
            hosts.insecure = std::mem::take(&mut self.hosts.insecure);
        }
        self.hosts = hosts;
        self
    }

    fn client_for(&self, endpoint: &Endpoint) -> Result<Client, String> {
        let key = endpoint.client_key();
        let mut clients = self.clients.lock().expect("client lock");
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let client = Client::try_from(endpoint.client_config()?)
            .map_err(|e| format!("{}: the registry client: {e}", endpoint.origin))?;
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// Sets the caps on what one layer may hold.
    pub fn with_limits(mut self, limits: ImageLimits) -> Self {
        self.limits = limits;
        self
    }

    fn pin(&self, hexes: Vec<String>) -> Pins<'_> {
        let mut pinned = self.pinned.lock().expect("pin lock");
        for h in &hexes {
            *pinned.entry(h.clone()).or_default() += 1;
        }
        Pins { store: self, hexes }
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
    ///
    /// The registry's hosts (see [`hosts`]) are tried in order: a host that
    /// cannot serve the image (unreachable, an error, not found, content
    /// that fails its digest) passes it to the next; the error names what
    /// each host said.
    pub async fn pull(&self, reference: &str, auth: &RegistryAuth) -> Result<ImageRecord, ImageError> {
        self.pull_with_progress(reference, auth, &NoProgress).await
    }

    /// As [`pull`](Self::pull), telling `progress` how far it is.
    pub async fn pull_with_progress(
        &self,
        reference: &str,
        auth: &RegistryAuth,
        progress: &dyn PullProgress,
    ) -> Result<ImageRecord, ImageError> {
        let r = Self::parse(reference)?;
        let name = r.whole();
        let registry = r.registry().to_string();
        let endpoints = self.hosts.endpoints(&registry).map_err(|reason| ImageError::Pull {
            reference: name.clone(),
            reason: format!("registry hosts configuration: {reason}"),
        })?;
        let by_digest = r.digest().is_some();
        let usable: Vec<&Endpoint> = endpoints.iter().filter(|e| e.pull && (by_digest || e.resolve)).collect();
        if usable.is_empty() {
            return Err(ImageError::Pull {
                reference: name,
                reason: format!(
                    "no host of {registry} may {} (see the `capabilities` of its hosts.toml)",
                    if by_digest { "pull" } else { "resolve a tag" }
                ),
            });
        }
        let mut tried = Vec::new();
        for endpoint in usable {
            let failed = |reason: String| ImageError::Pull { reference: name.clone(), reason };
            let client = self.client_for(endpoint).map_err(failed)?;
            let auth = self.hosts.auth_for(&registry, endpoint, auth).map_err(failed)?;
            let mut at = r.clone();
            if endpoint.mirror || endpoint.host != registry {
                at.set_mirror_registry(endpoint.host.clone());
            }
            match self.pull_from(&client, &at, &name, &auth, progress).await {
                Ok(record) => return Ok(record),
                // The image itself is at fault, or the store: no other
                // host can help.
                Err(e @ (ImageError::Layer { .. } | ImageError::Io { .. } | ImageError::BadReference { .. })) => {
                    return Err(e)
                }
                Err(e) if endpoints.len() == 1 => return Err(e),
                Err(e) => {
                    let why = match e {
                        ImageError::Pull { reason, .. } => reason,
                        other => other.to_string(),
                    };
                    tracing::info!(image = %name, host = %endpoint.host, "pull failed, trying the next host: {why}");
                    tried.push(format!(
                        "{} ({}): {why}",
                        endpoint.host,
                        if endpoint.mirror { "mirror" } else { "server" }
                    ));
                }
            }
        }
        Err(ImageError::Pull { reference: name, reason: format!("every host failed: {}", tried.join("; ")) })
    }

    async fn pull_from(
        &self,
        client: &Client,
        r: &Reference,
        name: &str,
        auth: &RegistryAuth,
        progress: &dyn PullProgress,
    ) -> Result<ImageRecord, ImageError> {
        let name = name.to_string();
        let pull_err = |e: oci_client::errors::OciDistributionError| ImageError::Pull {
            reference: name.clone(),
            reason: e.to_string(),
        };
        let (manifest, digest, config) = client.pull_manifest_and_config(r, auth).await.map_err(pull_err)?;
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
        // A manifest of a million layers is refused before anything is
        // fetched, so no layer, log line or pin is spent on it.
        if manifest.layers.len() as u64 > self.limits.max_layers {
            return Err(ImageError::Pull {
                reference: name.clone(),
                reason: format!(
                    "its manifest lists {} layers, over the cap of {} (image_max_layers)",
                    manifest.layers.len(),
                    self.limits.max_layers
                ),
            });
        }
        let mut hexes = Vec::new();
        for layer in &manifest.layers {
            let hex = digest_hex(&layer.digest).ok_or_else(|| ImageError::Pull {
                reference: name.clone(),
                reason: format!("layer digest '{}' is not sha256", layer.digest),
            })?;
            if layer.size < 0 || layer.size as u64 > self.limits.max_layer_bytes {
                return Err(ImageError::Layer {
                    digest: layer.digest.clone(),
                    reason: format!(
                        "its size {} is over the cap of {} MiB (image_max_layer_mib)",
                        layer.size,
                        self.limits.max_layer_bytes >> 20
                    ),
                });
            }
            hexes.push(hex.to_string());
        }
        let pins = self.pin(hexes);
        progress.layers(&manifest.layers.iter().map(|l| (l.digest.clone(), l.size.max(0) as u64)).collect::<Vec<_>>());
        let mut layers = Vec::new();
        let count = manifest.layers.len();
        tracing::info!(image = %name, digest = %digest, "pulling {count} layers ({:.1} MiB) from {}",
            manifest.layers.iter().map(|l| l.size.max(0) as f64).sum::<f64>() / 1048576.0, r.resolve_registry());
        for (i, (layer, hex)) in manifest.layers.iter().zip(&pins.hexes).enumerate() {
            if self.blob_path(hex).is_file() {
                tracing::info!(image = %name, "layer {}/{count} {} already present", i + 1, layer.digest);
                progress.present(i);
            } else {
                let began = std::time::Instant::now();
                self.fetch_blob(client, r, layer, hex, &|bytes| progress.fetched(i, bytes)).await?;
                tracing::info!(image = %name, "layer {}/{count} {} fetched: {:.1} MiB in {:.1} s", i + 1, layer.digest,
                    layer.size.max(0) as f64 / 1048576.0, began.elapsed().as_secs_f64());
            }
            self.unpack(hex, &layer.media_type)?;
            progress.done(i);
            layers.push(LayerRecord {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
                size: layer.size.max(0) as u64,
            });
        }
        let record = ImageRecord { reference: name.clone(), digest, config_digest, config, layers };
        let path = self.record_path(&name);
        let tmp = path.with_extension(format!("tmp-{}", unique_suffix()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&record).expect("serialisable")).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        Ok(record)
    }

    async fn fetch_blob(
        &self,
        client: &Client,
        r: &Reference,
        layer: &oci_client::manifest::OciDescriptor,
        hex: &str,
        fetched: &(dyn Fn(u64) + Sync),
    ) -> Result<(), ImageError> {
        let tmp = self.root.join("tmp").join(format!("{hex}.{}", unique_suffix()));
        // Removes the partial blob however the fetch ends: an error, or the
        // pull dropped half way (an interrupted `runv run --image`).
        struct Partial<'a>(&'a Path);
        impl Drop for Partial<'_> {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(self.0);
            }
        }
        let _partial = Partial(&tmp);
        async {
            let file = tokio::fs::File::create(&tmp).await.map_err(io_err(&tmp))?;
            // The registry's bytes are counted as they arrive: a blob longer
            // than its cap is cut off, whatever its descriptor said.
            let mut writer = CappedWrite {
                inner: tokio::io::BufWriter::new(file),
                left: self.limits.max_layer_bytes,
                exceeded: false,
                written: 0,
                fetched,
            };
            client.pull_blob(r, layer, &mut writer).await.map_err(|e| {
                let reason = e.to_string();
                if writer.exceeded {
                    ImageError::Layer {
                        digest: layer.digest.clone(),
                        reason: format!(
                            "the registry sent more than {} MiB (image_max_layer_mib)",
                            self.limits.max_layer_bytes >> 20
                        ),
                    }
                } else if reason.to_lowercase().contains("digest") {
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
        .await
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
        let tmp = self.root.join("tmp").join(format!("layer-{hex}.{}", unique_suffix()));
        std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        let result = unpack_layer(reader, &tmp, &self.limits).map_err(layer_err);
        let result = result.and_then(|()| match std::fs::rename(&tmp, &dir) {
            Ok(()) => Ok(()),
            // Another pull unpacked the same layer first: theirs stands.
            Err(_) if dir.is_dir() => Ok(()),
            Err(e) => Err(ImageError::Io { path: dir.clone(), source: e }),
        });
        if tmp.exists() {
            let _ = crate::helper::remove_tree(&tmp);
        }
        result
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

    /// The stored image for a reference in any form a CRI client uses (see
    /// [`resolve`]).
    pub fn get(&self, wanted: &str) -> Option<ImageRecord> {
        resolve(&self.list(), wanted).cloned()
    }

    /// Removes an image, by any reference to it, with every other tag and
    /// digest reference to the same image, then every blob and layer no
    /// other image uses.
    pub fn remove(&self, wanted: &str) -> Result<ImageRecord, ImageError> {
        let all = self.list();
        let record = resolve(&all, wanted).cloned().ok_or_else(|| ImageError::NotFound(wanted.into()))?;
        for same in all.iter().filter(|r| r.digest == record.digest) {
            let path = self.record_path(&same.reference);
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
        self.collect_garbage()?;
        Ok(record)
    }

    /// Deletes blobs and unpacked layers that no stored image, pull in
    /// progress or live rootfs lease refers to.
    pub fn collect_garbage(&self) -> Result<(), ImageError> {
        // Pins first: a pull that pins after this point also finds its
        // blobs gone and fetches them again, never a half-deleted layer
        // (layers are renamed into place whole).
        let pinned: BTreeSet<String> = self.pinned.lock().expect("pin lock").keys().cloned().collect();
        let used: BTreeSet<String> = self
            .list()
            .iter()
            .flat_map(|i| i.layers.iter().filter_map(|l| digest_hex(&l.digest).map(str::to_owned)))
            .chain(pinned)
            .chain(self.leased_layers())
            .collect();
        for dir in ["blobs/sha256", "layers"] {
            let base = self.root.join(dir);
            for e in std::fs::read_dir(&base).map_err(io_err(&base))?.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !used.contains(&name) {
                    let p = e.path();
                    crate::helper::remove_tree(&p)
                        .map_err(|e| ImageError::Io { path: p.clone(), source: std::io::Error::other(e) })?;
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

/// An AsyncWrite that refuses bytes past its cap; `exceeded` tells a cap
/// hit apart from any other failure once the pull has wrapped the error.
/// Each write reports the running total to `fetched`.
struct CappedWrite<'a, W> {
    inner: W,
    left: u64,
    exceeded: bool,
    written: u64,
    fetched: &'a (dyn Fn(u64) + Sync),
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CappedWrite<'_, W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if buf.len() as u64 > self.left {
            self.exceeded = true;
            return std::task::Poll::Ready(Err(std::io::Error::other("blob over its size cap")));
        }
        let this = &mut *self;
        let r = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            this.left -= *n as u64;
            this.written += *n as u64;
            (this.fetched)(this.written);
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
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
/// Largest PAX, GNU long-name or long-link header: tar keeps these in
/// memory, so they get a cap of their own far below the layer's.
const MAX_HEADER_ENTRY: u64 = 1 << 20;
/// Extended attributes an image may carry onto the host: the `user.`
/// namespace and file capabilities. `trusted.` (overlayfs's own: a forged
/// opaque or redirect) and the rest of `security.` are never applied.
fn xattr_allowed(name: &str) -> bool {
    name.starts_with("user.") || name == "security.capability"
}

/// What an image may make the store hold (config keys
/// `image_max_layer_mib`, `image_max_unpacked_mib`, `image_max_layer_entries`,
/// `image_max_layers`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageLimits {
    /// Bytes of one layer blob as pulled (compressed).
    pub max_layer_bytes: u64,
    /// Bytes one layer's tar stream may expand to.
    pub max_unpacked_bytes: u64,
    /// Tar entries in one layer.
    pub max_entries: u64,
    /// Layers in one image's manifest.
    pub max_layers: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self { max_layer_bytes: 8 << 30, max_unpacked_bytes: 32 << 30, max_entries: 1_000_000, max_layers: 128 }
    }
}

/// Counts what is read and fails past the cap; `exceeded` tells a cap hit
/// apart from a broken stream after tar has wrapped the error.
struct CappedRead<R> {
    inner: R,
    left: u64,
    exceeded: std::rc::Rc<std::cell::Cell<bool>>,
}

impl<R: Read> Read for CappedRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            // One byte more than the cap is a stream past it.
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? == 0 {
                return Ok(0);
            }
            self.exceeded.set(true);
            return Err(std::io::Error::other("the layer is larger than its cap"));
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// One entry's metadata, from its header and the PAX / GNU records before it.
struct EntryMeta {
    path: PathBuf,
    link: Option<PathBuf>,
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: i64,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn bytes_path(b: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let b = b.strip_suffix(b"\0").unwrap_or(b);
    PathBuf::from(std::ffi::OsStr::from_bytes(b))
}

impl EntryMeta {
    fn collect<R: Read>(
        entry: &tar::Entry<'_, R>,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
        pax: Option<Vec<u8>>,
    ) -> Result<Self, String> {
        let h = entry.header();
        let num = |v: std::io::Result<u64>, what: &str| v.map_err(|e| format!("its {what}: {e}"));
        let id = |v: u64, what: &str| u32::try_from(v).map_err(|_| format!("its {what} {v} is out of range"));
        let mut meta = Self {
            path: long_name.as_deref().map(bytes_path).unwrap_or_else(|| bytes_path(&h.path_bytes())),
            link: long_link.as_deref().map(bytes_path).or_else(|| h.link_name_bytes().map(|b| bytes_path(&b))),
            uid: id(num(h.uid(), "uid")?, "uid")?,
            gid: id(num(h.gid(), "gid")?, "gid")?,
            mode: h.mode().map_err(|e| format!("its mode: {e}"))? & 0o7777,
            mtime: num(h.mtime(), "mtime")?.min(i64::MAX as u64) as i64,
            xattrs: Vec::new(),
        };
        for ext in tar::PaxExtensions::new(pax.as_deref().unwrap_or_default()) {
            let ext = ext.map_err(|e| format!("a PAX record: {e}"))?;
            let key = ext.key().map_err(|_| "a PAX record key is not UTF-8".to_string())?;
            let value = ext.value_bytes();
            let text = || std::str::from_utf8(value).map_err(|_| format!("PAX {key} is not UTF-8"));
            match key {
                "path" => meta.path = bytes_path(value),
                "linkpath" => meta.link = Some(bytes_path(value)),
                "uid" => meta.uid = text()?.parse().map_err(|_| format!("PAX uid {:?}", text()))?,
                "gid" => meta.gid = text()?.parse().map_err(|_| format!("PAX gid {:?}", text()))?,
                "mtime" => {
                    let t = text()?;
                    meta.mtime = t.split('.').next().unwrap_or(t).parse().map_err(|_| format!("PAX mtime {t:?}"))?
                }
                // Raw iteration frames entries by the header's size: a PAX
                // size that disagrees would desynchronise the stream.
                "size" if text()?.parse::<u64>().ok() != Some(entry.size()) => {
                    return Err(format!("a PAX size ({}) that differs from its header's is not supported", text()?))
                }
                k => {
                    if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                        if xattr_allowed(name) {
                            meta.xattrs.push((name.to_string(), value.to_vec()));
                        }
                    }
                }
            }
        }
        Ok(meta)
    }
}

/// Reads a PAX / GNU header entry's data, bounded.
fn read_header_entry(entry: &mut impl Read, size: u64) -> Result<Vec<u8>, String> {
    if size > MAX_HEADER_ENTRY {
        return Err(format!("a tar header record of {size} bytes (at most {MAX_HEADER_ENTRY})"));
    }
    let mut data = Vec::with_capacity(size as usize);
    entry.read_to_end(&mut data).map_err(|e| format!("reading a tar header record: {e}"))?;
    Ok(data)
}

/// Unpacks a layer tar into `dest` as an overlayfs lower layer. Every
/// entry is created through directory fds (`FsRoot`): an absolute name,
/// `..`, a symlinked parent or a hard link to anything outside the layer
/// is refused; `.wh.NAME` becomes a whiteout (character device 0/0) for
/// NAME and `.wh..wh..opq` marks its directory opaque. The stream is
/// bounded by `limits`. An error names the entry; `dest` is left for the
/// caller to remove.
/// The image `wanted` names among `images`, in every form CRI clients use,
/// as containerd resolves them:
/// - the image id (`sha256:<hex>`), or a unique prefix of its hex;
/// - a reference as pulled (`registry/repo:tag`, `repo@sha256:...`), with a
///   registry's defaults applied (`busybox` is
///   `docker.io/library/busybox:latest`);
/// - `repo@sha256:...` of an image pulled by tag, found by repository and
///   digest.
pub fn resolve<'a>(images: &'a [ImageRecord], wanted: &str) -> Option<&'a ImageRecord> {
    if let Some(hex) = wanted.strip_prefix("sha256:") {
        return images.iter().find(|i| i.digest.strip_prefix("sha256:") == Some(hex));
    }
    if wanted.len() >= 3
        && wanted.len() <= 64
        && wanted.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        let mut ids: Vec<&str> =
            images.iter().filter_map(|i| i.digest.strip_prefix("sha256:")).filter(|h| h.starts_with(wanted)).collect();
        ids.sort();
        ids.dedup();
        if let [id] = ids[..] {
            return images.iter().find(|i| i.digest.strip_prefix("sha256:") == Some(id));
        }
    }
    let r = wanted.parse::<Reference>().ok()?;
    if let Some(found) = images.iter().find(|i| i.reference == r.whole()) {
        return Some(found);
    }
    let digest = r.digest()?;
    images.iter().find(|i| {
        i.digest == digest
            && i.reference
                .parse::<Reference>()
                .is_ok_and(|p| p.registry() == r.registry() && p.repository() == r.repository())
    })
}

pub fn unpack_layer(reader: impl Read, dest: &Path, limits: &ImageLimits) -> Result<(), String> {
    let root = FsRoot::open(dest).map_err(|e| e.to_string())?;
    let exceeded = std::rc::Rc::new(std::cell::Cell::new(false));
    let capped = CappedRead { inner: reader, left: limits.max_unpacked_bytes, exceeded: exceeded.clone() };
    let over = || {
        format!("it unpacks to more than {} MiB (image_max_unpacked_mib)", limits.max_unpacked_bytes.div_ceil(1 << 20))
    };
    let mut archive = tar::Archive::new(capped);
    let entries = archive.entries().map_err(|e| format!("reading the tar stream: {e}"))?.raw(true);
    let (mut long_name, mut long_link, mut pax) = (None, None, None);
    for (count, entry) in entries.enumerate() {
        let mut entry = entry.map_err(|e| if exceeded.get() { over() } else { format!("reading a tar entry: {e}") })?;
        if count as u64 >= limits.max_entries {
            return Err(format!("it has more than {} entries (image_max_layer_entries)", limits.max_entries));
        }
        let size = entry.size();
        let kind = entry.header().entry_type();
        let record = match kind {
            tar::EntryType::GNULongName => &mut long_name,
            tar::EntryType::GNULongLink => &mut long_link,
            tar::EntryType::XHeader => &mut pax,
            tar::EntryType::XGlobalHeader => &mut None,
            _ => {
                let meta = EntryMeta::collect(&entry, long_name.take(), long_link.take(), pax.take())
                    .map_err(|e| format!("entry {}: {e}", String::from_utf8_lossy(&entry.header().path_bytes())))?;
                unpack_entry(&root, &mut entry, kind, &meta).map_err(|e| {
                    if exceeded.get() {
                        over()
                    } else {
                        format!("entry {}: {e}", meta.path.display())
                    }
                })?;
                continue;
            }
        };
        *record = Some(read_header_entry(&mut entry, size).map_err(|e| if exceeded.get() { over() } else { e })?);
    }
    Ok(())
}

fn os(e: impl Into<std::io::Error>) -> String {
    e.into().to_string()
}

/// Removes whatever is at `name` in `dir` (an entry replaces it), without
/// following a symlink or crossing a mount.
fn clear(dir: &impl AsFd, name: &OsStr) -> Result<(), String> {
    remove_child(dir, name).map_err(os)
}

fn unpack_entry<R: Read>(
    root: &FsRoot,
    entry: &mut tar::Entry<'_, R>,
    kind: tar::EntryType,
    meta: &EntryMeta,
) -> Result<(), String> {
    use tar::EntryType as T;
    let leaves = "its path is absolute, climbs out with `..` or is too long";
    let parts = FsRoot::components(&meta.path).map_err(|_| leaves.to_string())?;
    let Some((name, parents)) = parts.split_last() else {
        return Ok(()); // the layer's root itself (`./`)
    };
    let parent_rel: PathBuf = parents.iter().collect();
    let parent = root.mkdir_all(&parent_rel, 0o755).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::ENOTDIR) => "a parent directory is a symlink or not a directory".to_string(),
        _ => e.to_string(),
    })?;
    let name_str = name.to_string_lossy();
    if let Some(hidden) = name_str.strip_prefix(WHITEOUT_PREFIX) {
        if *name == OsStr::new(OPAQUE_WHITEOUT) {
            return rustix::fs::fsetxattr(&parent, "trusted.overlay.opaque", b"y", rustix::fs::XattrFlags::empty())
                .map_err(|e| format!("marking the directory opaque: {}", os(e)));
        }
        if hidden.is_empty() || hidden == "." || hidden == ".." {
            return Err("a whiteout that names nothing".into());
        }
        let hidden = OsStr::new(hidden);
        clear(&parent, hidden)?;
        return rustix::fs::mknodat(&parent, hidden, FileType::CharacterDevice, Mode::empty(), 0)
            .map_err(|e| format!("whiteout: {}", os(e)));
    }
    let (uid, gid) = (Some(rustix::fs::Uid::from_raw(meta.uid)), Some(rustix::fs::Gid::from_raw(meta.gid)));
    let mode = Mode::from_raw_mode(meta.mode);
    let time = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec { tv_sec: meta.mtime, tv_nsec: 0 },
        last_modification: rustix::fs::Timespec { tv_sec: meta.mtime, tv_nsec: 0 },
    };
    let open_strict = |flags: OFlags, mode: Mode| open_child(&parent, name, flags, mode).map_err(os);
    // chown clears setuid bits and file capabilities: mode and xattrs after it.
    let finish = |fd: &OwnedFd| -> Result<(), String> {
        rustix::fs::fchown(fd, uid, gid).map_err(|e| format!("owner: {}", os(e)))?;
        rustix::fs::fchmod(fd, mode).map_err(|e| format!("mode: {}", os(e)))?;
        for (k, v) in &meta.xattrs {
            rustix::fs::fsetxattr(fd, k.as_str(), v, rustix::fs::XattrFlags::empty())
                .map_err(|e| format!("xattr {k}: {}", os(e)))?;
        }
        Ok(())
    };
    match kind {
        T::Directory => {
            let is_dir = rustix::fs::statat(&parent, *name, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory);
            if !is_dir {
                clear(&parent, name)?;
                rustix::fs::mkdirat(&parent, *name, Mode::from_raw_mode(0o700)).map_err(os)?;
            }
            finish(&open_strict(OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())?)
        }
        T::Regular | T::Continuous => {
            clear(&parent, name)?;
            let fd = open_strict(OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY, Mode::from_raw_mode(0o600))?;
            let mut file = File::from(fd);
            std::io::copy(entry, &mut file).map_err(|e| format!("writing: {e}"))?;
            let fd = OwnedFd::from(file);
            finish(&fd)?;
            rustix::fs::futimens(&fd, &time).map_err(os)
        }
        T::Symlink => {
            let target = meta.link.as_ref().ok_or("a symlink without a target")?;
            clear(&parent, name)?;
            // The target is only text here: nothing on the host follows it.
            rustix::fs::symlinkat(target.as_path(), &parent, *name).map_err(os)?;
            rustix::fs::chownat(&parent, *name, uid, gid, AtFlags::SYMLINK_NOFOLLOW).map_err(os)?;
            rustix::fs::utimensat(&parent, *name, &time, AtFlags::SYMLINK_NOFOLLOW).map_err(os)
        }
        T::Link => {
            let target = meta.link.as_ref().ok_or("a hard link without a target")?;
            let outside = || format!("hard link target {} is not a file of this layer", target.display());
            let (tdir, tname) = root.parent(target, false).map_err(|_| outside())?;
            let st = rustix::fs::statat(&tdir, &tname, AtFlags::SYMLINK_NOFOLLOW).map_err(|_| outside())?;
            if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                return Err(outside());
            }
            if (tdir.as_raw_fd(), &tname) != (parent.as_raw_fd(), &name.to_os_string()) {
                clear(&parent, name)?;
            }
            // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink.
            rustix::fs::linkat(&tdir, &tname, &parent, *name, AtFlags::empty()).map_err(os)
        }
        T::Char | T::Block | T::Fifo => {
            let h = entry.header();
            let dev = |v: std::io::Result<Option<u32>>| v.ok().flatten().unwrap_or(0);
            let (major, minor) = (dev(h.device_major()), dev(h.device_minor()));
            let ft = match kind {
                T::Char => FileType::CharacterDevice,
                T::Block => FileType::BlockDevice,
                _ => FileType::Fifo,
            };
            clear(&parent, name)?;
            rustix::fs::mknodat(&parent, *name, ft, mode, rustix::fs::makedev(major, minor)).map_err(os)?;
            rustix::fs::chownat(&parent, *name, uid, gid, AtFlags::SYMLINK_NOFOLLOW).map_err(os)?;
            // mknod's mode went through the umask.
            rustix::fs::chmodat(&parent, *name, mode, AtFlags::empty()).map_err(os)
        }
        other => Err(format!("entry type {other:?} is not supported in a layer")),
    }
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

    fn limits() -> ImageLimits {
        ImageLimits::default()
    }

    /// A raw tar header: any name, type and link, as a hostile image would
    /// write them (tar::Builder refuses some of these itself).
    fn raw_entry(b: &mut tar::Builder<Vec<u8>>, name: &[u8], kind: tar::EntryType, link: &[u8], data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
        h.as_gnu_mut().unwrap().linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    /// (name, type, link target, data) of one raw entry.
    type RawEntry<'a> = (&'a [u8], tar::EntryType, &'a [u8], &'a [u8]);

    fn hostile(entries: &[RawEntry<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, link, data) in entries {
            raw_entry(&mut b, name, *kind, link, data);
        }
        b.into_inner().unwrap()
    }

    /// A layer dir beside an "outside" dir holding a file the layer must
    /// never touch.
    fn arena() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let (dest, outside) = (dir.path().join("layer"), dir.path().join("outside"));
        std::fs::create_dir(&dest).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"host").unwrap();
        (dir, dest, outside)
    }

    fn untouched(outside: &Path) {
        use std::os::unix::fs::MetadataExt;
        let names: Vec<_> = std::fs::read_dir(outside).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [std::ffi::OsString::from("keep")], "nothing was added outside the layer");
        assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"host");
        assert_eq!(std::fs::metadata(outside.join("keep")).unwrap().nlink(), 1, "no hard link to it");
    }

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
        unpack_layer(&layer[..], dir.path(), &limits()).unwrap();
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
    fn attack_layer_names_that_climb_or_are_absolute_are_refused() {
        println!("ATTACK a layer entry named ../ or /: tried");
        for name in [&b"../x/.wh.evil"[..], b"../outside/pwned", b"a/../../outside/pwned", b"/tmp/pwned"] {
            let (_d, dest, outside) = arena();
            let layer = hostile(&[(name, tar::EntryType::Regular, b"", b"x")]);
            let err = unpack_layer(&layer[..], &dest, &limits()).unwrap_err();
            assert!(err.contains("climbs out"), "{}: {err}", String::from_utf8_lossy(name));
            assert!(err.contains("entry "), "the error names the entry: {err}");
            untouched(&outside);
        }
        println!("ATTACK a layer entry named ../ or /: held");
    }

    #[test]
    fn attack_layer_symlinked_parents_are_refused() {
        println!("ATTACK a layer writing through a symlinked parent or whiteout: tried");
        let (_d, dest, outside) = arena();
        let target = outside.to_str().unwrap().as_bytes().to_vec();
        for second in [&b"evil/pwned"[..], b"evil/.wh.keep", b"evil/.wh..wh..opq", b"evil/sub/"] {
            let kind = if second.ends_with(b"/") { tar::EntryType::Directory } else { tar::EntryType::Regular };
            let layer = hostile(&[(b"evil", tar::EntryType::Symlink, &target, b""), (second, kind, b"", b"")]);
            let err = unpack_layer(&layer[..], &dest, &limits()).unwrap_err();
            assert!(err.contains("symlink"), "{}: {err}", String::from_utf8_lossy(second));
            untouched(&outside);
        }
        // A relative link that climbs, and one to an absolute path, alike.
        let layer = hostile(&[
            (b"a/", tar::EntryType::Directory, b"", b""),
            (b"a/up", tar::EntryType::Symlink, b"../../outside", b""),
            (b"a/up/pwned", tar::EntryType::Regular, b"", b"x"),
        ]);
        assert!(unpack_layer(&layer[..], &dest, &limits()).is_err());
        untouched(&outside);
        println!("ATTACK a layer writing through a symlinked parent or whiteout: held");
    }

    #[test]
    fn attack_layer_hard_links_stay_inside_the_layer() {
        println!("ATTACK a layer hard-linking a host file: tried");
        let (_d, dest, outside) = arena();
        let abs = outside.join("keep").to_str().unwrap().as_bytes().to_vec();
        for link in [&abs[..], b"../outside/keep", b"sym/keep"] {
            let layer = hostile(&[
                (b"sym", tar::EntryType::Symlink, outside.to_str().unwrap().as_bytes(), b""),
                (b"stolen", tar::EntryType::Link, link, b""),
            ]);
            let err = unpack_layer(&layer[..], &dest, &limits()).unwrap_err();
            assert!(err.contains("not a file of this layer"), "{}: {err}", String::from_utf8_lossy(link));
            untouched(&outside);
        }
        // A link inside the layer works.
        let layer = hostile(&[(b"f", tar::EntryType::Regular, b"", b"data"), (b"g", tar::EntryType::Link, b"f", b"")]);
        let fresh = tempfile::tempdir().unwrap();
        unpack_layer(&layer[..], fresh.path(), &limits()).unwrap();
        assert_eq!(std::fs::read(fresh.path().join("g")).unwrap(), b"data");
        println!("ATTACK a layer hard-linking a host file: held");
    }

    #[test]
    fn attack_layer_decompression_bomb_stops_at_the_cap() {
        println!("ATTACK a decompression bomb: tried");
        let dir = tempfile::tempdir().unwrap();
        let zeros = vec![0u8; 8 << 20];
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&tar_layer(&[("bomb", Some(&zeros))])).unwrap();
        let layer = gz.finish().unwrap();
        assert!(layer.len() < 64 << 10, "8 MiB of zeros gzip to {} bytes", layer.len());
        let small = ImageLimits { max_unpacked_bytes: 1 << 20, ..limits() };
        let gz = flate2::read::GzDecoder::new(&layer[..]);
        let err = unpack_layer(gz, dir.path(), &small).unwrap_err();
        assert!(err.contains("unpacks to more than 1 MiB"), "{err}");
        println!("ATTACK a decompression bomb: held");
    }

    #[test]
    fn attack_layer_entry_count_and_header_records_are_capped() {
        println!("ATTACK a layer with endless entries or a huge PAX header: tried");
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..20).map(|i| format!("f{i}")).collect();
        let entries: Vec<(&str, Option<&[u8]>)> = names.iter().map(|n| (n.as_str(), Some(&b""[..]))).collect();
        let err = unpack_layer(&tar_layer(&entries)[..], dir.path(), &ImageLimits { max_entries: 10, ..limits() })
            .unwrap_err();
        assert!(err.contains("more than 10 entries"), "{err}");
        // A PAX header that would be held in memory whole.
        let big = vec![b'a'; (MAX_HEADER_ENTRY + 1) as usize];
        let layer = hostile(&[(b"pax", tar::EntryType::XHeader, b"", &big), (b"f", tar::EntryType::Regular, b"", b"")]);
        let err = unpack_layer(&layer[..], dir.path(), &limits()).unwrap_err();
        assert!(err.contains("header record"), "{err}");
        println!("ATTACK a layer with endless entries or a huge PAX header: held");
    }

    #[test]
    fn attack_layer_trusted_xattrs_are_never_applied() {
        println!("ATTACK a layer forging overlayfs trusted.* xattrs: tried");
        let dir = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(1);
        h.set_mode(0o4755);
        h.set_uid(1234);
        h.set_gid(4321);
        let long = format!("{}/file", "d".repeat(200));
        b.append_pax_extensions([("SCHILY.xattr.trusted.overlay.redirect", &b"/etc"[..])]).unwrap();
        b.append_data(&mut h, &long, &b"x"[..]).unwrap();
        let layer = b.into_inner().unwrap();
        unpack_layer(&layer[..], dir.path(), &limits()).unwrap();
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(dir.path().join(&long)).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o4755, 1234, 4321));
        let p = std::ffi::CString::new(dir.path().join(&long).to_str().unwrap()).unwrap();
        let n = unsafe { libc::getxattr(p.as_ptr(), c"trusted.overlay.redirect".as_ptr(), std::ptr::null_mut(), 0) };
        assert!(n < 0, "a trusted.* xattr from an image is never applied");
        println!("ATTACK a layer forging overlayfs trusted.* xattrs: held");
    }

    #[test]
    fn attack_layer_rejected_leaves_nothing_and_gc_keeps_pinned_layers() {
        println!("ATTACK a rejected layer leaving files behind: tried");
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(&dir.path().join("store"), &[]).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("store")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "the store is private");
        let bad =
            hostile(&[(b"ok", tar::EntryType::Regular, b"", b"x"), (b"../escape", tar::EntryType::Regular, b"", b"")]);
        let hex = sha256_hex(&bad);
        std::fs::write(store.blob_path(&hex), &bad).unwrap();
        let err = store.unpack(&hex, "application/vnd.oci.image.layer.v1.tar").unwrap_err().to_string();
        assert!(err.contains(&format!("layer sha256:{hex}")) && err.contains("entry ../escape"), "{err}");
        assert!(!store.layer_dir(&hex).exists());
        assert_eq!(std::fs::read_dir(store.root.join("tmp")).unwrap().count(), 0, "no temp dir left");
        // A layer a pull is using survives garbage collection.
        let good = tar_layer(&[("f", Some(b"1"))]);
        let hex = sha256_hex(&good);
        std::fs::write(store.blob_path(&hex), &good).unwrap();
        let pins = store.pin(vec![hex.clone()]);
        store.unpack(&hex, "application/vnd.oci.image.layer.v1.tar").unwrap();
        store.collect_garbage().unwrap();
        assert!(store.layer_dir(&hex).is_dir() && store.blob_path(&hex).is_file());
        drop(pins);
        store.collect_garbage().unwrap();
        assert!(!store.layer_dir(&hex).exists() && !store.blob_path(&hex).exists());
        println!("ATTACK a rejected layer leaving files behind: held");
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
