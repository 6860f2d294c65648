//! The image store against a real registry on loopback (Debian's
//! docker-registry, started here), with images pushed at test time: pulls
//! over plain HTTP for a listed registry, gzip and zstd layers, whiteouts
//! through a real overlay mount, layers unpacked once and shared, garbage
//! collection, and the failures (bad reference, unknown image, unreachable
//! registry, a blob whose content no longer matches its digest). Needs root
//! (overlay mounts) and docker-registry; skips with a printed reason.

mod common;

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::registry::{base_layer, push, registry_or_skip, sha, top_layer, Registry};
use oci_client::secrets::RegistryAuth;
use runv::image::{ImageError, ImageLimits, ImageStore, RegistryHosts};

fn ready(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP {test}: needs root (overlay mounts)");
        return false;
    }
    registry_or_skip(test)
}

fn mount_check(store: &ImageStore, image: &runv::image::ImageRecord, dir: &Path) {
    let target = dir.join("rootfs");
    store.mount_rootfs(image, &dir.join("rw"), &target).unwrap();
    // Unmounted even when a check fails.
    let checks = std::panic::catch_unwind(|| {
        assert_eq!(std::fs::read_to_string(target.join("bin/hello")).unwrap(), "hello from layer 1\n");
        assert_eq!(std::fs::read_to_string(target.join("etc/added")).unwrap(), "new\n");
        assert!(!target.join("etc/removed").exists(), "the whiteout did not hide etc/removed");
        let cache: Vec<_> =
            std::fs::read_dir(target.join("var/cache")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(cache, ["fresh"], "the opaque directory shows lower entries");
        // The container writes to its own layer only.
        std::fs::write(target.join("etc/added"), "changed\n").unwrap();
    });
    nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH).unwrap();
    if let Err(panic) = checks {
        std::panic::resume_unwind(panic);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_pulled_from_a_registry_become_overlay_rootfs_and_are_collected() {
    if !ready("images_pulled_from_a_registry_become_overlay_rootfs_and_are_collected") {
        return;
    }
    let reg = Registry::start();
    let one = push(&reg, "runv/app:1", &[base_layer(), top_layer()]).await;
    let two = push(&reg, "runv/base:1", &[base_layer()]).await;

    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&dir.path().join("store"), std::slice::from_ref(&reg.addr)).unwrap();
    let image = store.pull(&one, &RegistryAuth::Anonymous).await.unwrap();
    assert_eq!(image.reference, one);
    assert_eq!(image.layers.len(), 2);
    assert_eq!(image.config["config"]["Cmd"][0], "sh");
    assert!(image.digest.starts_with("sha256:"));
    assert_eq!(store.get(&one).unwrap(), image);
    assert_eq!(store.get(&image.digest).unwrap(), image);
    mount_check(&store, &image, &dir.path().join("c1"));
    // The image's layers were not changed by the container.
    mount_check(&store, &image, &dir.path().join("c2"));

    // A second pull and a second image share the unpacked base layer.
    let lowers = store.lower_dirs(&image).unwrap();
    let base_inode = std::fs::metadata(&lowers[1]).unwrap().ino();
    store.pull(&one, &RegistryAuth::Anonymous).await.unwrap();
    let base = store.pull(&two, &RegistryAuth::Anonymous).await.unwrap();
    assert_eq!(store.lower_dirs(&base).unwrap(), vec![lowers[1].clone()]);
    assert_eq!(std::fs::metadata(&lowers[1]).unwrap().ino(), base_inode, "the base layer was unpacked again");
    assert_eq!(store.list().len(), 2);

    // Removing one image keeps what the other uses; removing both leaves
    // nothing.
    store.remove(&one).unwrap();
    assert!(!lowers[0].exists() && lowers[1].exists());
    assert!(store.get(&one).is_none());
    store.remove(&base.digest).unwrap();
    for sub in ["blobs/sha256", "layers", "images", "tmp"] {
        let left: Vec<_> = std::fs::read_dir(dir.path().join("store").join(sub)).unwrap().collect();
        assert!(left.is_empty(), "{sub} keeps {left:?}");
    }
    assert!(matches!(store.remove(&one), Err(ImageError::NotFound(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_references_unknown_images_unreachable_registries_and_corrupt_blobs_fail_clearly() {
    if !ready("bad_references_unknown_images_unreachable_registries_and_corrupt_blobs_fail_clearly") {
        return;
    }
    let reg = Registry::start();
    let name = push(&reg, "runv/corrupt:1", &[base_layer(), top_layer()]).await;
    let dir = tempfile::tempdir().unwrap();
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let store =
        ImageStore::open(&dir.path().join("store"), &[reg.addr.clone(), format!("127.0.0.1:{closed}")]).unwrap();

    let err = store.pull("Not A Reference!", &RegistryAuth::Anonymous).await.unwrap_err();
    assert!(matches!(err, ImageError::BadReference { .. }), "{err}");
    let err = store.pull("", &RegistryAuth::Anonymous).await.unwrap_err().to_string();
    assert!(err.contains("is empty"), "{err}");

    let err = store.pull(&format!("{}/runv/nothing:1", reg.addr), &RegistryAuth::Anonymous).await.unwrap_err();
    assert!(matches!(err, ImageError::Pull { .. }), "{err}");
    assert!(err.to_string().contains("runv/nothing:1"), "{err}");

    let err = store.pull(&format!("127.0.0.1:{closed}/runv/x:1"), &RegistryAuth::Anonymous).await.unwrap_err();
    assert!(matches!(err, ImageError::Pull { .. }), "{err}");

    // Corrupt the top layer's blob in the registry's storage.
    let (_, data, _) = top_layer();
    let file = reg.blob_file(&sha(&data));
    let mut bad = std::fs::read(&file).unwrap();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    std::fs::write(&file, bad).unwrap();
    let err = store.pull(&name, &RegistryAuth::Anonymous).await.unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&sha(&data)), "{err}");
    // Nothing of the bad blob stays, and no image was recorded.
    assert!(store.get(&name).is_none());
    let tmp: Vec<_> = std::fs::read_dir(dir.path().join("store/tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "{tmp:?}");
    assert!(!dir.path().join("store/blobs/sha256").join(sha(&data)).exists());
}

#[tokio::test]
async fn attack_an_image_of_more_layers_than_the_cap_is_refused_before_any_fetch() {
    let test = "attack_an_image_of_more_layers_than_the_cap_is_refused_before_any_fetch";
    if !ready(test) {
        return;
    }
    println!("ATTACK an image listing more layers than image_max_layers: tried");
    let reg = Registry::start();
    let name = push(&reg, "runv/deep:1", &[base_layer(), top_layer(), base_layer()]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&dir.path().join("store"), std::slice::from_ref(&reg.addr))
        .unwrap()
        .with_limits(ImageLimits { max_layers: 2, ..Default::default() });
    let err = store.pull(&name, &RegistryAuth::Anonymous).await.unwrap_err().to_string();
    assert!(
        err.contains("lists 3 layers, over the cap of 2 (image_max_layers)") && err.contains("runv/deep:1"),
        "{err}"
    );
    // Nothing was fetched, nothing recorded.
    assert!(store.get(&name).is_none());
    let blobs = dir.path().join("store/blobs/sha256");
    let fetched: Vec<_> = std::fs::read_dir(&blobs).map(|d| d.collect()).unwrap_or_default();
    assert!(fetched.is_empty(), "{fetched:?}");
    // Within the cap the same image pulls.
    let store = ImageStore::open(&dir.path().join("store"), std::slice::from_ref(&reg.addr))
        .unwrap()
        .with_limits(ImageLimits { max_layers: 3, ..Default::default() });
    assert_eq!(store.pull(&name, &RegistryAuth::Anonymous).await.unwrap().layers.len(), 3);
    println!("ATTACK an image listing more layers than image_max_layers: held");
}

/// A `hosts.toml` for `registry` in a fresh registry hosts directory.
fn hosts_dir(registry: &str, text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join(registry)).unwrap();
    std::fs::write(dir.path().join(registry).join("hosts.toml"), text).unwrap();
    dir
}

fn store_with_hosts(root: &Path, hosts: &Path) -> ImageStore {
    ImageStore::open(root, &[])
        .unwrap()
        .with_hosts(RegistryHosts { config_path: Some(hosts.to_path_buf()), ..Default::default() })
}

fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_mirror_serves_registry_k8s_io_and_a_dead_mirror_passes_to_the_next() {
    if !ready("a_loopback_mirror_serves_registry_k8s_io_and_a_dead_mirror_passes_to_the_next") {
        return;
    }
    let reg = Registry::start();
    push(&reg, "pause:3.10", &[base_layer()]).await;
    let (dead, dead_server) = (closed_port(), closed_port());
    // No name resolution, no redirect: registry.k8s.io's images come from
    // the mirror because its hosts.toml says so. The first mirror is down.
    let hosts = hosts_dir(
        "registry.k8s.io",
        &format!(
            "server = \"https://registry.k8s.io\"\n\n\
             [host.\"http://127.0.0.1:{dead}\"]\n  capabilities = [\"pull\", \"resolve\"]\n\n\
             [host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            reg.addr
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_hosts(&dir.path().join("store"), hosts.path());
    let image = store.pull("registry.k8s.io/pause:3.10", &RegistryAuth::Anonymous).await.unwrap();
    assert_eq!(image.reference, "registry.k8s.io/pause:3.10");
    assert_eq!(store.get("registry.k8s.io/pause:3.10").unwrap(), image);
    mount_base_check(&store, &image, dir.path());

    // A mirror that may only pull serves a digest but not a tag; then the
    // error names every host tried and what each said.
    let hosts = hosts_dir(
        "registry.k8s.io",
        &format!(
            "server = \"http://127.0.0.1:{dead_server}\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\"]\n",
            reg.addr
        ),
    );
    let store = store_with_hosts(&dir.path().join("store2"), hosts.path());
    let by_digest = format!("registry.k8s.io/pause@{}", image.digest);
    assert_eq!(store.pull(&by_digest, &RegistryAuth::Anonymous).await.unwrap().digest, image.digest);
    let err = store.pull("registry.k8s.io/pause:3.10", &RegistryAuth::Anonymous).await.unwrap_err().to_string();
    assert!(err.contains(&format!("every host failed: 127.0.0.1:{dead_server} (server)")), "{err}");
    assert!(!err.contains(&reg.addr), "a pull-only mirror resolved a tag: {err}");

    // A hosts.toml runv cannot honour is refused, naming file and key.
    let hosts = hosts_dir("registry.k8s.io", "[host.\"https://m\"]\n  client = [\"a.pem\", \"b.pem\"]\n");
    let store = store_with_hosts(&dir.path().join("store3"), hosts.path());
    let err = store.pull("registry.k8s.io/pause:3.10", &RegistryAuth::Anonymous).await.unwrap_err().to_string();
    assert!(err.contains("registry.k8s.io/hosts.toml [host.\"https://m\"]: `client` lists 2"), "{err}");
}

fn mount_base_check(store: &ImageStore, image: &runv::image::ImageRecord, dir: &Path) {
    let target = dir.join("rootfs");
    store.mount_rootfs(image, &dir.join("rw"), &target).unwrap();
    let hello = std::fs::read_to_string(target.join("bin/hello"));
    nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH).unwrap();
    assert_eq!(hello.unwrap(), "hello from layer 1\n");
}

/// As `ready`, and openssl to make certificates with (the reason printed
/// when it is missing).
fn tls_ready(test: &str) -> bool {
    if !ready(test) {
        return false;
    }
    let found = runv::helper::find_program(Path::new("openssl")).is_some();
    if !found {
        eprintln!("SKIP {test}: needs openssl (scripts/test.sh installs it)");
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_registry_is_pulled_from_with_its_ca_or_skip_verify_and_refused_without() {
    let test = "a_tls_registry_is_pulled_from_with_its_ca_or_skip_verify_and_refused_without";
    if !tls_ready(test) {
        return;
    }
    let plain = Registry::start();
    push(&plain, "runv/tls:1", &[base_layer()]).await;
    let tls = Registry::start_tls_over(&plain);
    let reference = format!("{}/runv/tls:1", tls.addr);
    let dir = tempfile::tempdir().unwrap();

    // No configuration: HTTPS with the system's roots, which do not know
    // the test CA.
    let empty = tempfile::tempdir().unwrap();
    let store = store_with_hosts(&dir.path().join("s1"), empty.path());
    let err = store.pull(&reference, &RegistryAuth::Anonymous).await.unwrap_err();
    assert!(matches!(err, ImageError::Pull { .. }), "{err}");

    // `ca`, relative to the hosts.toml's directory.
    let hosts = hosts_dir(&tls.addr, "ca = \"ca.pem\"\n");
    std::fs::copy(tls.dir.path().join("ca.pem"), hosts.path().join(&tls.addr).join("ca.pem")).unwrap();
    let store = store_with_hosts(&dir.path().join("s2"), hosts.path());
    let image = store.pull(&reference, &RegistryAuth::Anonymous).await.unwrap();
    assert_eq!(image.reference, reference);

    // `skip_verify`, no CA.
    let hosts = hosts_dir(&tls.addr, "skip_verify = true\n");
    let store = store_with_hosts(&dir.path().join("s3"), hosts.path());
    store.pull(&reference, &RegistryAuth::Anonymous).await.unwrap();

    // A `ca` that is not a certificate is named.
    let hosts = hosts_dir(&tls.addr, "ca = \"/etc/hostname\"\n");
    let store = store_with_hosts(&dir.path().join("s4"), hosts.path());
    let err = store.pull(&reference, &RegistryAuth::Anonymous).await.unwrap_err().to_string();
    assert!(err.contains("ca /etc/hostname is not a PEM certificate"), "{err}");
}

/// A registry that demands a client certificate (docker-registry's
/// `clientcas`) refuses a pull without one and serves it with the `client`
/// pair of containerd's hosts.toml, as separate files or as one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_wants_a_client_certificate_gets_the_one_hosts_toml_names() {
    let test = "a_registry_that_wants_a_client_certificate_gets_the_one_hosts_toml_names";
    if !tls_ready(test) {
        return;
    }
    let plain = Registry::start();
    push(&plain, "runv/mtls:1", &[base_layer()]).await;
    let mtls = Registry::start_mtls_over(&plain);
    let reference = format!("{}/runv/mtls:1", mtls.addr);
    let dir = tempfile::tempdir().unwrap();
    let files = mtls.dir.path();

    // The CA alone: the TLS handshake fails for want of a certificate.
    let hosts = hosts_dir(&mtls.addr, &format!("ca = \"{}\"\n", files.join("ca.pem").display()));
    let store = store_with_hosts(&dir.path().join("s1"), hosts.path());
    let err = store.pull(&reference, &RegistryAuth::Anonymous).await.unwrap_err();
    assert!(matches!(err, ImageError::Pull { .. }), "{err}");

    // `client = [[cert, key]]`.
    let text = format!("ca = \"{0}/ca.pem\"\nclient = [[\"{0}/client.pem\", \"{0}/client.key\"]]\n", files.display());
    let hosts = hosts_dir(&mtls.addr, &text);
    let store = store_with_hosts(&dir.path().join("s2"), hosts.path());
    let image = store.pull(&reference, &RegistryAuth::Anonymous).await.unwrap();
    assert_eq!(image.reference, reference);

    // `client = "both.pem"`: certificate and key in one file, relative to
    // the hosts.toml's directory.
    let hosts = hosts_dir(&mtls.addr, &format!("ca = \"{}/ca.pem\"\nclient = \"both.pem\"\n", files.display()));
    let both = [std::fs::read(files.join("client.pem")).unwrap(), std::fs::read(files.join("client.key")).unwrap()];
    std::fs::write(hosts.path().join(&mtls.addr).join("both.pem"), both.concat()).unwrap();
    let store = store_with_hosts(&dir.path().join("s3"), hosts.path());
    store.pull(&reference, &RegistryAuth::Anonymous).await.unwrap();
}
