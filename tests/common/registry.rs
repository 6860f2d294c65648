//! A loopback OCI registry (Debian's docker-registry) for tests, and
//! images pushed to it at test time.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use runv::image::{gzip_layer, tar_layer};
use sha2::{Digest, Sha256};

/// Whether docker-registry is installed; prints why the test skips otherwise.
pub fn registry_or_skip(test: &str) -> bool {
    let found = runv::helper::find_program(Path::new("docker-registry")).is_some();
    if !found {
        eprintln!("SKIP {test}: needs docker-registry (scripts/install.sh)");
    }
    found
}

struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    /// Clients must present a certificate this CA signed.
    client_ca: Option<PathBuf>,
}

pub struct Registry {
    child: Child,
    pub dir: tempfile::TempDir,
    pub addr: String,
}

impl Registry {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        Self::serve(dir, &data, None)
    }

    /// A second registry over the same storage, serving HTTPS with a
    /// certificate for 127.0.0.1 signed by a CA made here (`ca.pem` in the
    /// returned registry's directory).
    pub fn start_tls_over(plain: &Registry) -> Self {
        Self::start_tls(plain, false)
    }

    /// As `start_tls_over`, and the registry refuses any client without a
    /// certificate signed by the same CA (`client.pem` and `client.key` in
    /// the returned registry's directory).
    pub fn start_mtls_over(plain: &Registry) -> Self {
        Self::start_tls(plain, true)
    }

    fn start_tls(plain: &Registry, client_auth: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(d).output().expect("openssl");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=runv test CA"],
            ]
            .concat(),
        );
        openssl(
            &[&["req"][..], &ec, &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]].concat(),
        );
        std::fs::write(
            d.join("ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        ]);
        if client_auth {
            openssl(
                &[&["req"][..], &ec, &["-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=runv"]].concat(),
            );
            std::fs::write(d.join("client-ext"), "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n").unwrap();
            openssl(&[
                "x509",
                "-req",
                "-in",
                "client.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "client.pem",
                "-days",
                "2",
                "-extfile",
                "client-ext",
            ]);
        }
        let tls = TlsFiles {
            cert: d.join("server.pem"),
            key: d.join("server.key"),
            client_ca: client_auth.then(|| d.join("ca.pem")),
        };
        Self::serve(dir, &plain.dir.path().join("data"), Some(tls))
    }

    fn serve(dir: tempfile::TempDir, data: &Path, tls: Option<TlsFiles>) -> Self {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        let tls = tls
            .map(|t| {
                let clientcas =
                    t.client_ca.map(|ca| format!("    clientcas:\n      - {}\n", ca.display())).unwrap_or_default();
                format!("  tls:\n    certificate: {}\n    key: {}\n{clientcas}", t.cert.display(), t.key.display())
            })
            .unwrap_or_default();
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n{tls}",
                data.display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Registry { child, dir, addr }
    }

    /// The stored file of blob `hex`.
    pub fn blob_file(&self, hex: &str) -> PathBuf {
        self.dir.path().join(format!("data/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Pushes an image whose layers are `layers` ((media type, bytes, the
/// uncompressed tar)).
pub async fn push(reg: &Registry, name: &str, layers: &[(&str, Vec<u8>, Vec<u8>)]) -> String {
    push_with_cmd(reg, name, layers, &["sh"]).await
}

/// A gzip layer holding the contents of directory `dir`.
pub fn dir_layer(dir: &Path) -> (&'static str, Vec<u8>, Vec<u8>) {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder.append_dir_all(".", dir).unwrap();
    let tar = builder.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    (GZIP, gz.finish().unwrap(), tar)
}

/// As `push`, with the image's command.
pub async fn push_with_cmd(reg: &Registry, name: &str, layers: &[(&str, Vec<u8>, Vec<u8>)], cmd: &[&str]) -> String {
    let config = serde_json::json!({ "Cmd": cmd, "Env": ["PATH=/bin:/sbin:/usr/bin:/usr/sbin"] });
    push_with_config(reg, name, layers, config).await
}

/// As `push`, with `config` as the image configuration's `config` object
/// (Entrypoint, Cmd, Env, WorkingDir, User...).
pub async fn push_with_config(
    reg: &Registry,
    name: &str,
    layers: &[(&str, Vec<u8>, Vec<u8>)],
    config: serde_json::Value,
) -> String {
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(vec![reg.addr.clone()]),
        ..Default::default()
    });
    let reference: Reference = format!("{}/{name}", reg.addr).parse().unwrap();
    let diff_ids: Vec<String> = layers.iter().map(|(_, _, tar)| format!("sha256:{}", sha(tar))).collect();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let image_layers: Vec<ImageLayer> =
        layers.iter().map(|(mt, data, _)| ImageLayer::new(data.clone(), mt.to_string(), None)).collect();
    client
        .push(
            &reference,
            &image_layers,
            Config::oci_v1(config.to_string().into_bytes(), None),
            &RegistryAuth::Anonymous,
            None,
        )
        .await
        .unwrap();
    reference.whole()
}

pub const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

pub fn base_layer() -> (&'static str, Vec<u8>, Vec<u8>) {
    let entries: &[(&str, Option<&[u8]>)] = &[
        ("bin/", None),
        ("bin/hello", Some(b"hello from layer 1\n")),
        ("etc/", None),
        ("etc/removed", Some(b"old\n")),
        ("var/", None),
        ("var/cache/", None),
        ("var/cache/old", Some(b"old\n")),
    ];
    (GZIP, gzip_layer(entries), tar_layer(entries))
}

pub fn top_layer() -> (&'static str, Vec<u8>, Vec<u8>) {
    let entries: &[(&str, Option<&[u8]>)] = &[
        ("etc/", None),
        ("etc/.wh.removed", Some(b"")),
        ("etc/added", Some(b"new\n")),
        ("var/cache/", None),
        ("var/cache/.wh..wh..opq", Some(b"")),
        ("var/cache/fresh", Some(b"fresh\n")),
    ];
    let tar = tar_layer(entries);
    let zst = ruzstd::encoding::compress_to_vec(&tar[..], ruzstd::encoding::CompressionLevel::Fastest);
    (ZSTD, zst, tar)
}
