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
use runv::image::{ImageError, ImageStore};

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
