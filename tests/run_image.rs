//! End to end: `runv run --image` pulls an image made here from a loopback
//! registry (docker-registry) into its own store, runs it with its own
//! configuration in a real guest, shows pull progress on a terminal and
//! leaves nothing behind, even when runv is killed mid-run.
//!
//! Run alone with `cargo test --release --test run_image`.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::registry::{dir_layer, push_with_config, registry_or_skip, Registry, GZIP};
use common::{e2e_ready, stderr, stdout, TestEnv, SHARE_DIR};

macro_rules! require {
    ($name:expr) => {
        if !e2e_ready($name) || !registry_or_skip($name) {
            return;
        }
    };
}

/// The default rootfs as one layer, and a layer of its own on top: an
/// `app` user in groups of its own, and a greeting in /app.
fn push_app(reg: &Registry) -> String {
    let base = dir_layer(&Path::new(SHARE_DIR).join("rootfs"));
    // /app belongs to the image's user, as a Dockerfile's `chown` leaves it.
    let mut tar = tar::Builder::new(Vec::new());
    let files: &[(&str, Option<&[u8]>, u64)] = &[
        ("app/", None, 1000),
        ("app/greeting", Some(b"greetings from the image\n"), 1000),
        ("etc/", None, 0),
        ("etc/passwd", Some(b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/app:/bin/sh\n"), 0),
        ("etc/group", Some(b"root:x:0:\napp:x:1000:\nextra:x:1234:app\n"), 0),
    ];
    for (path, data, owner) in files {
        let mut h = tar::Header::new_gnu();
        h.set_uid(*owner);
        h.set_gid(*owner);
        match data {
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                tar.append_data(&mut h, path, std::io::empty()).unwrap();
            }
            Some(bytes) => {
                h.set_mode(0o644);
                h.set_size(bytes.len() as u64);
                tar.append_data(&mut h, path, *bytes).unwrap();
            }
        }
    }
    let tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let top = (GZIP, gz.finish().unwrap(), tar);
    let config = serde_json::json!({
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": ["echo $GREETING in $(pwd) as $(id -u):$(id -g) groups $(id -G); cat greeting"],
        "Env": ["PATH=/bin:/sbin:/usr/bin:/usr/sbin", "GREETING=hello"],
        "WorkingDir": "/app",
        "User": "app",
    });
    tokio::runtime::Runtime::new().unwrap().block_on(push_with_config(reg, "runv/app:1", &[base, top], config))
}

/// A test environment whose image store is in the test's directory, so
/// the census sees a lease left behind (its overlay names the layers).
fn env_for(reg: &Registry) -> TestEnv {
    let env = TestEnv::new("");
    let mut config = std::fs::read_to_string(&env.config).unwrap();
    config.push_str(&format!(
        "cri_image_root = \"{}\"\ninsecure_registries = [\"{}\"]\n",
        env.dir.path().join("images").display(),
        reg.addr
    ));
    std::fs::write(&env.config, config).unwrap();
    env
}

fn leases(env: &TestEnv) -> Vec<String> {
    std::fs::read_dir(env.dir.path().join("images/run"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn assert_clean(env: &TestEnv) {
    let left = env.settled_leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}");
    assert!(leases(env).is_empty(), "rootfs leases left: {:?}", leases(env));
}

/// The image's Entrypoint, Cmd, Env, WorkingDir and User (with its groups
/// from the image's /etc/group) apply; `--` replaces Cmd, `-e` overrides
/// Env; the rootfs is writable and each run starts from the image again.
#[test]
fn run_image_runs_the_image_with_its_own_configuration() {
    require!("run_image_runs_the_image_with_its_own_configuration");
    let reg = Registry::start();
    let image = push_app(&reg);
    let env = env_for(&reg);

    let out = env.run(&["--image", &image]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("hello in /app as 1000:1000 groups 1000 1234"), "stdout: {text}");
    assert!(text.contains("greetings from the image"), "stdout: {text}");
    // Off a terminal the pull says what it fetched in one line.
    assert!(stderr(&out).contains(&format!("runv: pulled {image}: 2 layers")), "stderr: {}", stderr(&out));

    let out = env.run(&[
        "--image",
        &image,
        "-e",
        "GREETING=bye",
        "--",
        "echo $GREETING; echo scribble > /app/new && cat /app/new",
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "bye\nscribble\n");
    assert!(!stderr(&out).contains("pulled"), "the stored image was pulled again: {}", stderr(&out));

    let out = env.run(&["--image", &image, "--pull", "never", "--", "test -e /app/new && echo kept || echo gone"]);
    assert_eq!(stdout(&out), "gone\n", "stderr: {}", stderr(&out));
    assert_clean(&env);
}

#[test]
fn run_image_refuses_what_it_cannot_run_in_one_line() {
    require!("run_image_refuses_what_it_cannot_run_in_one_line");
    let reg = Registry::start();
    let env = env_for(&reg);
    let missing = format!("{}/runv/absent:1", reg.addr);
    let out = env.run(&["--image", &missing, "--pull", "never", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert!(err.contains(&format!("image {missing} is not in the store")) && err.contains("--pull never"), "{err}");
    let out = env.run(&["--image", &missing, "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("runv/absent"), "{}", stderr(&out));
    assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));
    assert_clean(&env);
}

/// On a terminal each layer gets a bar: its digest, bytes, and how it
/// ended (`script` gives runv a pseudo-terminal).
#[test]
fn run_image_shows_a_progress_bar_per_layer_on_a_terminal() {
    require!("run_image_shows_a_progress_bar_per_layer_on_a_terminal");
    let reg = Registry::start();
    let image = push_app(&reg);
    let env = env_for(&reg);
    let line = format!("{} --config {} run --image {image} -- true", env!("CARGO_BIN_EXE_runv"), env.config.display());
    let out = std::process::Command::new("script")
        .args(["-qefc", &line, "/dev/null"])
        .stdin(Stdio::null())
        .env_remove("RUNV_LOG")
        .output()
        .unwrap();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "output: {text}");
    let stored = runv::image::ImageStore::open(&env.dir.path().join("images"), &[]).unwrap().get(&image).unwrap();
    for layer in &stored.layers {
        let prefix = &layer.digest[7..19];
        assert!(text.contains(prefix), "no bar for layer {prefix}: {text}");
    }
    assert!(text.contains("pull complete"), "output: {text}");
    assert!(!text.contains("runv: pulled"), "the one-line summary is for pipes: {text}");
    assert_clean(&env);
}

/// A runv killed with SIGKILL leaves its rootfs mounted; the next
/// `runv run --image` unmounts and removes it, and an image removed from
/// the store meanwhile keeps its layers while the run lives.
#[test]
fn a_killed_runs_rootfs_is_swept_by_the_next_run() {
    require!("a_killed_runs_rootfs_is_swept_by_the_next_run");
    let reg = Registry::start();
    let image = push_app(&reg);
    let env = env_for(&reg);
    let mut child = env
        .runv()
        .args(["run", "--image", &image, "--", "touch /app/started; exec sleep 100"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let started =
        || leases(&env).iter().any(|l| env.dir.path().join("images/run").join(l).join("rw/upper/app/started").exists());
    while !started() {
        assert!(Instant::now() < deadline, "the command never started: {:?}", env.leftovers());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Removing the image while it runs: its layers stay for the run.
    let store = runv::image::ImageStore::open(&env.dir.path().join("images"), &[]).unwrap();
    store.remove(&image).unwrap();
    let layers = std::fs::read_dir(env.dir.path().join("images/layers")).unwrap().count();
    assert_eq!(layers, 2, "a running image's layers were collected");

    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(leases(&env).len(), 1, "the killed run's lease stays until the next run");
    let out = env.run(&["--image", &image, "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    // The next run's own rootfs went with it; the orphan's (and its
    // sandbox directory) went before.
    assert_clean(&env);
}
