//! Where a registry's images are pulled from, read the way containerd reads
//! it: a directory (`registry_config_path`) of `<registry>/hosts.toml`
//! files (containerd's `docs/hosts.md` format), falling back to
//! `_default/hosts.toml`, then to the registry itself over HTTPS (plain
//! HTTP for one listed in `insecure_registries`). Credentials come from the
//! CRI request for the image's own registry, and from a docker-style
//! `config.json` (`registry_auth_file`) for any host.
//!
//! A `hosts.toml`:
//!
//! ```toml
//! server = "https://registry.k8s.io"        # tried last; default https://<registry>
//!
//! [host."http://10.0.0.5:5000"]             # mirrors, tried in file order
//!   capabilities = ["pull", "resolve"]      # default: pull, resolve, push
//!
//! [host."https://mirror.internal"]
//!   ca = "mirror-ca.pem"                    # relative to this file's directory
//!   skip_verify = false
//!   client = [["client.pem", "client.key"]] # or "both.pem": cert and key in one file
//!   [host."https://mirror.internal".header]
//!     x-team = "infra"                      # or a list: sent once per value
//! ```
//!
//! A host with `resolve` may turn a tag into a digest; a host with only
//! `pull` serves references by digest. `client` and `header` reach the
//! registry client through runv's patched oci-client
//! (`third_party/README.md`); one client certificate per host.

use std::path::{Path, PathBuf};

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

/// One place to pull a registry's images from, in the order tried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `host[:port]` contacted.
    pub host: String,
    pub plain_http: bool,
    pub skip_verify: bool,
    /// PEM files of extra certificate authorities.
    pub ca: Vec<PathBuf>,
    pub pull: bool,
    pub resolve: bool,
    /// A mirror (any host but the registry's own server).
    pub mirror: bool,
    /// A client certificate and its key (None: in the certificate's file).
    pub client: Option<(PathBuf, Option<PathBuf>)>,
    /// Headers sent with every request to this host.
    pub headers: Vec<(String, String)>,
    /// Where this endpoint was configured, for errors.
    pub origin: String,
}

impl Endpoint {
    /// The registry client's settings for this endpoint.
    pub fn client_config(&self) -> Result<ClientConfig, String> {
        let mut extra = Vec::new();
        for path in &self.ca {
            let data = std::fs::read(path).map_err(|e| format!("{}: ca {}: {e}", self.origin, path.display()))?;
            if !data.windows(11).any(|w| w == b"-----BEGIN ") {
                return Err(format!("{}: ca {} is not a PEM certificate", self.origin, path.display()));
            }
            extra.push(Certificate { encoding: CertificateEncoding::Pem, data });
        }
        let identity = match &self.client {
            None => None,
            Some((cert, key)) => Some(self.identity_pem(cert, key.as_deref())?),
        };
        Ok(ClientConfig {
            protocol: if self.plain_http { ClientProtocol::Http } else { ClientProtocol::Https },
            accept_invalid_certificates: self.skip_verify,
            extra_root_certificates: extra,
            client_identity_pem: identity,
            extra_headers: self.headers.clone(),
            ..Default::default()
        })
    }

    /// The client certificate and its key as one PEM buffer.
    fn identity_pem(&self, cert: &Path, key: Option<&Path>) -> Result<Vec<u8>, String> {
        let read = |what: &str, path: &Path| {
            let data =
                std::fs::read(path).map_err(|e| format!("{}: client {what} {}: {e}", self.origin, path.display()))?;
            if !data.windows(11).any(|w| w == b"-----BEGIN ") {
                return Err(format!("{}: client {what} {} is not PEM", self.origin, path.display()));
            }
            Ok(data)
        };
        let mut pem = read("certificate", cert)?;
        if let Some(key) = key {
            pem.push(b'\n');
            pem.extend(read("key", key)?);
        }
        if !pem.windows(11).any(|w| w == b"PRIVATE KEY") {
            let file = key.unwrap_or(cert);
            return Err(format!("{}: client key {}: no PEM private key in it", self.origin, file.display()));
        }
        Ok(pem)
    }

    /// What distinguishes one client from another (a client is kept per key).
    pub fn client_key(&self) -> String {
        format!(
            "{}|{}|{}|{:?}|{:?}|{:?}",
            self.host, self.plain_http, self.skip_verify, self.ca, self.client, self.headers
        )
    }
}

/// The registry hosts configuration.
#[derive(Clone, Debug, Default)]
pub struct RegistryHosts {
    /// The `hosts.toml` directory; None or missing: none is read.
    pub config_path: Option<PathBuf>,
    /// Registries reached over plain HTTP when no `hosts.toml` names them.
    pub insecure: Vec<String>,
    /// A docker-style `config.json` with credentials by host.
    pub auth_file: Option<PathBuf>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostSettings {
    capabilities: Option<Vec<String>>,
    ca: Option<OneOrMany>,
    skip_verify: Option<bool>,
    override_path: Option<bool>,
    client: Option<toml::Value>,
    header: Option<toml::Table>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The docker.io registry's real server.
const DOCKER_HUB: &str = "registry-1.docker.io";

impl RegistryHosts {
    /// The hosts to pull `registry`'s images from, mirrors first.
    pub fn endpoints(&self, registry: &str) -> Result<Vec<Endpoint>, String> {
        if let Some(dir) = &self.config_path {
            for name in [host_dir_name(registry), "_default".to_string()] {
                let file = dir.join(&name).join("hosts.toml");
                match std::fs::read_to_string(&file) {
                    Ok(text) => return parse_hosts(&text, &file, registry),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("reading {}: {e}", file.display())),
                }
            }
        }
        Ok(vec![Endpoint {
            host: default_server(registry),
            plain_http: self.insecure.iter().any(|i| i == registry),
            skip_verify: false,
            ca: Vec::new(),
            pull: true,
            resolve: true,
            mirror: false,
            client: None,
            headers: Vec::new(),
            origin: "the registry itself".into(),
        }])
    }

    /// The credentials for `host`: `given` (the CRI request's) when `host`
    /// is the image's own registry, else the auth file's entry for `host`,
    /// else none.
    pub fn auth_for(&self, registry: &str, endpoint: &Endpoint, given: &RegistryAuth) -> Result<RegistryAuth, String> {
        let own = endpoint.host == registry || endpoint.host == default_server(registry);
        if own && !matches!(given, RegistryAuth::Anonymous) {
            return Ok(given.clone());
        }
        let Some(file) = &self.auth_file else { return Ok(RegistryAuth::Anonymous) };
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
            Err(e) => return Err(format!("reading {}: {e}", file.display())),
        };
        auth_from_docker_config(&text, &endpoint.host, own.then_some(registry))
            .map_err(|e| format!("{}: {e}", file.display()))
    }
}

/// containerd's directory name for a registry host (`host:port` as is;
/// docker.io's images live under `docker.io`).
fn host_dir_name(registry: &str) -> String {
    if registry == "index.docker.io" || registry == DOCKER_HUB {
        "docker.io".into()
    } else {
        registry.to_string()
    }
}

fn default_server(registry: &str) -> String {
    if registry == "docker.io" || registry == "index.docker.io" {
        DOCKER_HUB.into()
    } else {
        registry.to_string()
    }
}

/// Parses one `hosts.toml` (at `file`, for `registry`).
pub fn parse_hosts(text: &str, file: &Path, registry: &str) -> Result<Vec<Endpoint>, String> {
    let bad = |what: String| format!("{}: {what}", file.display());
    let mut table: toml::Table = toml::from_str(text).map_err(|e| bad(e.message().to_string()))?;
    // `server` and `host` beside the server's own settings.
    let server = match table.remove("server") {
        None => None,
        Some(toml::Value::String(s)) => Some(s),
        Some(_) => return Err(bad("`server` must be a URL string".into())),
    };
    let hosts = match table.remove("host") {
        None => toml::Table::new(),
        Some(toml::Value::Table(t)) => t,
        Some(_) => return Err(bad("`host` must be a table of hosts".into())),
    };
    let settings: HostSettings =
        toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| bad(e.message().to_string()))?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (url, value) in &hosts {
        let origin = format!("{} [host.\"{url}\"]", file.display());
        let host: HostSettings =
            value.clone().try_into().map_err(|e: toml::de::Error| format!("{origin}: {}", e.message()))?;
        out.push(endpoint(url, &host, base, &origin, true)?);
    }
    let server = server.unwrap_or_else(|| format!("https://{}", default_server(registry)));
    let origin = format!("{} server", file.display());
    let server = endpoint(&server, &settings, base, &origin, false)?;
    out.push(server);
    Ok(out)
}

fn endpoint(url: &str, s: &HostSettings, base: &Path, origin: &str, mirror: bool) -> Result<Endpoint, String> {
    let bad = |what: String| Err(format!("{origin}: {what}"));
    let client = match &s.client {
        None => None,
        Some(value) => Some(client_pair(value).map_err(|e| format!("{origin}: `client` {e}"))?),
    };
    let client = client.map(|(cert, key)| (base.join(cert), key.map(|k| base.join(k))));
    let headers = match &s.header {
        None => Vec::new(),
        Some(table) => headers(table).map_err(|e| format!("{origin}: `header` {e}"))?,
    };
    let with_scheme = if url.contains("://") { url.to_string() } else { format!("https://{url}") };
    let (scheme, rest) = with_scheme.split_once("://").expect("a scheme");
    let plain_http = match scheme {
        "http" => true,
        "https" => false,
        other => return bad(format!("scheme '{other}' is neither http nor https")),
    };
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if host.is_empty() || host.contains(['?', '#', '@', ' ']) {
        return bad(format!("'{url}' does not name a host"));
    }
    let path = path.trim_end_matches('/');
    // containerd appends /v2 unless `override_path`; runv's client speaks
    // the distribution API at /v2 only.
    let full =
        if s.override_path == Some(true) || path.ends_with("/v2") { path.to_string() } else { format!("{path}/v2") };
    if full != "/v2" {
        return bad(format!("path '{full}': runv pulls only from a registry's /v2 (no path prefix)"));
    }
    let mut pull = true;
    let mut resolve = true;
    if let Some(caps) = &s.capabilities {
        pull = false;
        resolve = false;
        for c in caps {
            match c.as_str() {
                "pull" => pull = true,
                "resolve" => resolve = true,
                "push" => {}
                other => return bad(format!("capability '{other}' is not one of pull, resolve, push")),
            }
        }
    }
    let ca = match &s.ca {
        None => Vec::new(),
        Some(OneOrMany::One(p)) => vec![p.clone()],
        Some(OneOrMany::Many(v)) => v.clone(),
    };
    Ok(Endpoint {
        host: host.to_string(),
        plain_http,
        skip_verify: s.skip_verify.unwrap_or(false),
        ca: ca.into_iter().map(|p| base.join(p)).collect(),
        pull,
        resolve,
        mirror,
        client,
        headers,
        origin: origin.to_string(),
    })
}

/// containerd's `client`: `"both.pem"`, `["both.pem"]`, `[["cert", "key"]]`
/// or `[["both.pem", ""]]`; runv presents one certificate per host.
fn client_pair(value: &toml::Value) -> Result<(String, Option<String>), String> {
    use toml::Value;
    let pairs: Vec<&Value> = match value {
        Value::String(_) => vec![value],
        Value::Array(items) => items.iter().collect(),
        _ => return Err("must be a file or a list of [certificate, key] pairs".into()),
    };
    let [pair] = pairs[..] else {
        return Err(format!("lists {} certificates; runv presents one per host", pairs.len()));
    };
    let (cert, key) = match pair {
        Value::String(file) => (file.clone(), None),
        Value::Array(p) => match &p[..] {
            [Value::String(cert)] => (cert.clone(), None),
            [Value::String(cert), Value::String(key)] => (cert.clone(), Some(key.clone()).filter(|k| !k.is_empty())),
            _ => return Err("pair must be [certificate, key] (file names)".into()),
        },
        _ => return Err("must be a file or a list of [certificate, key] pairs".into()),
    };
    if cert.is_empty() {
        return Err("names no certificate file".into());
    }
    Ok((cert, key))
}

/// containerd's `header` table: a name to a value or a list of values.
fn headers(table: &toml::Table) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (name, value) in table {
        if http::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(format!("{name:?} is not an HTTP header name"));
        }
        let values: Vec<&toml::Value> = match value {
            toml::Value::Array(items) => items.iter().collect(),
            one => vec![one],
        };
        let mut joined = Vec::new();
        for v in values {
            let Some(v) = v.as_str() else {
                return Err(format!("{name}: values must be strings"));
            };
            if http::HeaderValue::from_str(v).is_err() {
                return Err(format!("{name}: {v:?} is not an HTTP header value"));
            }
            joined.push(v);
        }
        // A list is one field with its values comma-separated (RFC 9110
        // 5.3), the same to a server as the field repeated.
        out.push((name.clone(), joined.join(", ")));
    }
    Ok(out)
}

/// `user:password` from base64, as docker configs and CRI's `auth` hold it.
pub fn decode_basic_auth(encoded: &str) -> Option<(String, String)> {
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some((user.to_string(), pass.to_string()))
}

/// The credentials a docker-style `config.json` holds for `host` (also
/// under `https://host`, and docker.io's under its legacy index URL).
fn auth_from_docker_config(text: &str, host: &str, registry: Option<&str>) -> Result<RegistryAuth, String> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        auths: std::collections::BTreeMap<String, Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        #[serde(default)]
        auth: String,
        #[serde(default)]
        username: String,
        #[serde(default)]
        password: String,
        #[serde(default)]
        registrytoken: String,
        #[serde(default)]
        identitytoken: String,
    }
    let file: File = serde_json::from_str(text).map_err(|e| format!("not a docker config.json: {e}"))?;
    let mut keys = vec![host.to_string(), format!("https://{host}"), format!("http://{host}")];
    if let Some(r) = registry {
        keys.push(r.to_string());
        if r == "docker.io" {
            keys.push("https://index.docker.io/v1/".into());
        }
    }
    let Some((key, e)) = keys.iter().find_map(|k| file.auths.get(k).map(|e| (k, e))) else {
        return Ok(RegistryAuth::Anonymous);
    };
    if !e.registrytoken.is_empty() {
        return Ok(RegistryAuth::Bearer(e.registrytoken.clone()));
    }
    if !e.identitytoken.is_empty() {
        return Err(format!("auths.\"{key}\": identitytoken (an OAuth refresh token) is not supported"));
    }
    if !e.username.is_empty() {
        return Ok(RegistryAuth::Basic(e.username.clone(), e.password.clone()));
    }
    if !e.auth.is_empty() {
        let (user, pass) =
            decode_basic_auth(&e.auth).ok_or_else(|| format!("auths.\"{key}\".auth is not base64 of user:password"))?;
        return Ok(RegistryAuth::Basic(user, pass));
    }
    Ok(RegistryAuth::Anonymous)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(dir: &Path) -> RegistryHosts {
        RegistryHosts { config_path: Some(dir.to_path_buf()), insecure: vec!["plain:5000".into()], auth_file: None }
    }

    #[test]
    fn mirrors_come_in_file_order_then_the_server() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("registry.k8s.io")).unwrap();
        std::fs::write(
            dir.path().join("registry.k8s.io/hosts.toml"),
            r#"
server = "https://registry.k8s.io"

[host."http://10.0.0.9:5000"]
  capabilities = ["pull", "resolve"]

[host."https://a.mirror/v2"]
  capabilities = ["pull"]
  ca = ["ca.pem", "/etc/other.pem"]
  skip_verify = true

[host."b.mirror:8443"]
"#,
        )
        .unwrap();
        let e = hosts(dir.path()).endpoints("registry.k8s.io").unwrap();
        let names: Vec<_> = e.iter().map(|e| e.host.as_str()).collect();
        assert_eq!(names, ["10.0.0.9:5000", "a.mirror", "b.mirror:8443", "registry.k8s.io"]);
        assert!(e[0].plain_http && e[0].pull && e[0].resolve && e[0].mirror);
        assert!(!e[1].plain_http && e[1].pull && !e[1].resolve && e[1].skip_verify);
        assert_eq!(e[1].ca, [dir.path().join("registry.k8s.io/ca.pem"), PathBuf::from("/etc/other.pem")]);
        assert!(e[2].pull && e[2].resolve && !e[2].plain_http);
        assert!(!e[3].mirror && !e[3].plain_http);
    }

    #[test]
    fn without_a_file_the_registry_itself_or_the_default_file() {
        let dir = tempfile::tempdir().unwrap();
        let h = hosts(dir.path());
        assert_eq!(h.endpoints("docker.io").unwrap()[0].host, "registry-1.docker.io");
        let plain = h.endpoints("plain:5000").unwrap();
        assert_eq!(plain.len(), 1);
        assert!(plain[0].plain_http && !plain[0].mirror);
        std::fs::create_dir_all(dir.path().join("_default")).unwrap();
        std::fs::write(dir.path().join("_default/hosts.toml"), "[host.\"http://cache:5000\"]\n").unwrap();
        let e = h.endpoints("quay.io").unwrap();
        assert_eq!(e.iter().map(|e| e.host.as_str()).collect::<Vec<_>>(), ["cache:5000", "quay.io"]);
        let none = RegistryHosts { config_path: Some(dir.path().join("missing")), ..Default::default() };
        assert_eq!(none.endpoints("quay.io").unwrap()[0].host, "quay.io");
    }

    #[test]
    fn bad_files_name_the_file_and_the_key() {
        let file = Path::new("/etc/runv/certs.d/r.io/hosts.toml");
        for (text, want) in [
            ("[host.\"https://m\"]\nclient = [\"a.pem\", \"b.pem\"]\n", "`client` lists 2 certificates"),
            ("[host.\"https://m\"]\nclient = [[\"a\", \"b\", \"c\"]]\n", "`client` pair must be"),
            ("client = 5\n", "server: `client` must be a file"),
            ("[header]\n\"bad header\" = \"y\"\n", "server: `header` \"bad header\" is not an HTTP header name"),
            ("[header]\nx = 5\n", "`header` x: values must be strings"),
            ("[header]\nx = \"a\\nb\"\n", "is not an HTTP header value"),
            ("[host.\"https://m\"]\ncapabilities = [\"push\", \"fly\"]\n", "capability 'fly'"),
            ("[host.\"ftp://m\"]\n", "scheme 'ftp'"),
            ("[host.\"https://m/prefix\"]\n", "path '/prefix/v2'"),
            ("[host.\"https://m/prefix\"]\noverride_path = true\n", "path '/prefix'"),
            ("serverr = \"https://x\"\n", "unknown field `serverr`"),
            ("[host.\"https://m\"]\nskip_verify = \"yes\"\n", "[host.\"https://m\"]"),
        ] {
            let err = parse_hosts(text, file, "r.io").unwrap_err();
            assert!(err.starts_with(&file.display().to_string()), "{err}");
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let ok = parse_hosts("[host.\"https://m/v2/\"]\n", file, "r.io").unwrap();
        assert_eq!(ok[0].host, "m");
    }

    #[test]
    fn client_certificates_and_headers_in_containerds_forms() {
        let file = Path::new("/etc/runv/certs.d/r.io/hosts.toml");
        let base = Path::new("/etc/runv/certs.d/r.io");
        let text = r#"
client = "both.pem"
[header]
  x-one = "1"
  x-many = ["a", "b"]

[host."https://m1"]
  client = [["/abs/c.pem", "c.key"]]
[host."https://m2"]
  client = [["m2.pem", ""]]
"#;
        let e = parse_hosts(text, file, "r.io").unwrap();
        assert_eq!(e[0].client, Some((PathBuf::from("/abs/c.pem"), Some(base.join("c.key")))));
        assert_eq!(e[1].client, Some((base.join("m2.pem"), None)));
        assert!(e[0].headers.is_empty(), "a mirror gets its own headers only");
        assert_eq!(e[2].client, Some((base.join("both.pem"), None)));
        let pairs: Vec<(&str, &str)> = e[2].headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(pairs, [("x-one", "1"), ("x-many", "a, b")]);
        assert_ne!(e[0].client_key(), e[1].client_key());
    }

    #[test]
    fn a_client_certificate_without_its_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n")
            .unwrap();
        std::fs::write(dir.path().join("hosts.toml"), "").unwrap();
        let e = parse_hosts("client = \"cert.pem\"\n", &dir.path().join("hosts.toml"), "r.io").unwrap();
        let err = e[0].client_config().err().unwrap();
        assert!(err.contains("client key") && err.contains("no PEM private key"), "{err}");
        let e = parse_hosts("client = [[\"cert.pem\", \"missing.key\"]]\n", &dir.path().join("hosts.toml"), "r.io")
            .unwrap();
        let err = e[0].client_config().err().unwrap();
        assert!(err.contains("client key") && err.contains("missing.key"), "{err}");
    }

    /// The headers reach the wire: a loopback listener stands in for the
    /// registry and records the first request.
    #[tokio::test]
    async fn headers_are_sent_with_each_request() {
        use std::io::{BufRead, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
            let mut head = Vec::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                head.push(line.trim_end().to_lowercase());
            }
            let mut conn = conn;
            let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            head
        });
        let file = Path::new("/etc/runv/certs.d/r.io/hosts.toml");
        let text = format!("[host.\"http://{addr}\".header]\nx-team = \"infra\"\nx-many = [\"a\", \"b\"]\n");
        let endpoint = parse_hosts(&text, file, "r.io").unwrap().remove(0);
        let client = oci_client::Client::try_from(endpoint.client_config().unwrap()).unwrap();
        let reference: oci_client::Reference = format!("{addr}/x/y:1").parse().unwrap();
        let _ = client.pull_manifest(&reference, &RegistryAuth::Anonymous).await;
        let head = seen.join().unwrap();
        assert!(head.contains(&"x-team: infra".to_string()), "{head:#?}");
        assert!(head.contains(&"x-many: a, b".to_string()), "{head:#?}");
    }

    #[test]
    fn credentials_come_from_the_request_for_the_registry_and_from_the_auth_file_by_host() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auth.json");
        std::fs::write(
            &file,
            r#"{"auths": {
                "mirror:5000": {"auth": "bWlycm9yOnNlY3JldA=="},
                "https://quay.io": {"username": "q", "password": "p"},
                "https://index.docker.io/v1/": {"registrytoken": "tok"},
                "broken:1": {"auth": "%%%"}
            }}"#,
        )
        .unwrap();
        let h = RegistryHosts { auth_file: Some(file.clone()), ..Default::default() };
        let at = |host: &str, mirror: bool| Endpoint {
            host: host.into(),
            plain_http: false,
            skip_verify: false,
            ca: vec![],
            pull: true,
            resolve: true,
            mirror,
            client: None,
            headers: Vec::new(),
            origin: String::new(),
        };
        let given = RegistryAuth::Basic("cri".into(), "pw".into());
        assert!(h.auth_for("quay.io", &at("quay.io", false), &given).unwrap() == given);
        assert!(
            h.auth_for("quay.io", &at("mirror:5000", true), &given).unwrap()
                == RegistryAuth::Basic("mirror".into(), "secret".into())
        );
        assert!(
            h.auth_for("quay.io", &at("quay.io", false), &RegistryAuth::Anonymous).unwrap()
                == RegistryAuth::Basic("q".into(), "p".into())
        );
        assert!(
            h.auth_for("docker.io", &at("registry-1.docker.io", false), &RegistryAuth::Anonymous).unwrap()
                == RegistryAuth::Bearer("tok".into())
        );
        assert!(h.auth_for("x.io", &at("x.io", false), &RegistryAuth::Anonymous).unwrap() == RegistryAuth::Anonymous);
        let Err(err) = h.auth_for("x", &at("broken:1", true), &RegistryAuth::Anonymous) else {
            panic!("a broken auth entry was accepted")
        };
        assert!(err.contains("auth.json") && err.contains("auths.\"broken:1\".auth"), "{err}");
    }
}
