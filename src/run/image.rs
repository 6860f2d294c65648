//! `runv run --image REF`: an image from the store `runv cri` uses
//! (`cri_image_root`), pulled when the pull policy says so (with a progress
//! bar per layer on a terminal), mounted as this run's writable rootfs, and
//! what its configuration says of the command (Docker's rules: arguments
//! after `--` replace the image's Cmd, its Entrypoint stays; its Env,
//! WorkingDir and User apply unless overridden).

use std::sync::Mutex;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use oci_client::secrets::RegistryAuth;

use super::RunError;
use crate::config::Config;
use crate::image::config::{command_line, environment, image_config, image_groups_of, resolve_user};
use crate::image::lease::RootfsLease;
use crate::image::{ImageRecord, ImageStore, PullProgress};

/// When `runv run --image` pulls (as `docker run --pull` and
/// `podman run --pull`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PullPolicy {
    /// Pull only when the store does not have the image.
    #[default]
    Missing,
    /// Pull every time (layers already stored are not fetched again).
    Always,
    /// Never pull; fail when the store does not have the image.
    Never,
}

/// The image's rootfs, mounted for this run, and the process it describes.
pub struct RunImage {
    pub record: ImageRecord,
    pub lease: RootfsLease,
    /// uid, gid and the extra groups of the image's user.
    pub user: (u32, u32, Vec<u32>),
}

/// What the command line, the environment and the working directory of the
/// run are, from the image and the options.
#[derive(Debug)]
pub struct ImageProcess {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
}

/// Finds or pulls `reference` and mounts its rootfs.
pub async fn prepare(config: &Config, reference: &str, policy: PullPolicy) -> Result<RunImage, RunError> {
    let store = ImageStore::open(&config.cri_image_root, &config.insecure_registries)
        .map_err(|e| RunError::runv(e.to_string()))?
        .with_limits(config.image_limits())
        .with_hosts(config.registry_hosts());
    let stored = store.get(reference).filter(|r| store.lower_dirs(r).is_ok());
    let record = match (policy, stored) {
        (PullPolicy::Missing, Some(r)) => r,
        (PullPolicy::Never, Some(r)) => r,
        (PullPolicy::Never, None) => {
            return Err(RunError::runv(format!(
                "image {reference} is not in the store ({}) and --pull never forbids pulling it",
                config.cri_image_root.display()
            )))
        }
        (PullPolicy::Missing | PullPolicy::Always, _) => pull(&store, reference).await?,
    };
    let lowers = store.lower_dirs(&record).map_err(|e| RunError::runv(e.to_string()))?;
    let user = image_config(&record)["User"].as_str().unwrap_or_default().to_string();
    let (uid, gid) = resolve_user(&user, &lowers)
        .map_err(|e| RunError::runv(format!("image {}: its User: {e}", record.reference)))?;
    let groups = image_groups_of(&user, uid, &lowers).into_iter().filter_map(|g| u32::try_from(g).ok()).collect();
    let lease = store.lease_rootfs(&record).map_err(|e| RunError::runv(format!("mounting the image's rootfs: {e}")))?;
    Ok(RunImage { record, lease, user: (uid, gid, groups) })
}

async fn pull(store: &ImageStore, reference: &str) -> Result<ImageRecord, RunError> {
    // Bars only where someone watches: stdout on a terminal, drawn on
    // stderr so the command's own output stays clean.
    let terminal = nix::unistd::isatty(std::io::stdout()).unwrap_or(false);
    let bars = Bars::new(if terminal { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() });
    let began = Instant::now();
    let record = store
        .pull_with_progress(reference, &RegistryAuth::Anonymous, &bars)
        .await
        .map_err(|e| RunError::runv(e.to_string()))?;
    let fetched = bars.fetched_bytes();
    if !terminal && fetched > 0 {
        eprintln!(
            "runv: pulled {}: {} layers, {:.1} MiB fetched in {:.1} s",
            record.reference,
            record.layers.len(),
            fetched as f64 / 1048576.0,
            began.elapsed().as_secs_f64()
        );
    }
    Ok(record)
}

/// The command, environment and working directory of a run of `image`.
/// `command` replaces the image's Cmd; `set` (KEY=VALUE) goes over the
/// image's Env; PATH and HOME get defaults when neither gives them.
pub fn process(
    image: &ImageRecord,
    command: &[String],
    set: &[String],
    workdir: Option<&str>,
    root_user: bool,
) -> Result<ImageProcess, RunError> {
    let args = command_line(image, &[], command);
    if args.is_empty() {
        return Err(RunError::runv(format!(
            "image {} gives no command (no Entrypoint or Cmd): give one after --",
            image.reference
        )));
    }
    let mut env = environment(
        image,
        set.iter().map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.to_string())
        }),
    );
    for (key, default) in [("PATH", super::DEFAULT_PATH), ("HOME", if root_user { "/root" } else { "/" })] {
        if !env.iter().any(|kv| kv.split_once('=').is_some_and(|(k, _)| k == key)) {
            env.push(format!("{key}={default}"));
        }
    }
    let image_dir = image_config(image)["WorkingDir"].as_str().filter(|d| !d.is_empty()).unwrap_or("/");
    Ok(ImageProcess { args, env, cwd: workdir.unwrap_or(image_dir).to_string() })
}

/// One bar per layer (indicatif), or nothing drawn when hidden.
struct Bars {
    multi: MultiProgress,
    bars: Mutex<Vec<ProgressBar>>,
    fetched: Mutex<Vec<u64>>,
}

impl Bars {
    fn new(target: ProgressDrawTarget) -> Self {
        Self { multi: MultiProgress::with_draw_target(target), bars: Default::default(), fetched: Default::default() }
    }

    fn fetched_bytes(&self) -> u64 {
        self.fetched.lock().expect("progress lock").iter().sum()
    }

    fn with_bar(&self, index: usize, f: impl FnOnce(&ProgressBar)) {
        if let Some(bar) = self.bars.lock().expect("progress lock").get(index) {
            f(bar)
        }
    }
}

impl PullProgress for Bars {
    fn layers(&self, layers: &[(String, u64)]) {
        let style = ProgressStyle::with_template("{prefix} [{bar:30}] {bytes:>10}/{total_bytes:<10} {msg}")
            .expect("a valid template")
            .progress_chars("=> ");
        let mut bars = self.bars.lock().expect("progress lock");
        for (digest, size) in layers {
            let bar = self.multi.add(ProgressBar::new(*size));
            bar.set_style(style.clone());
            let short = digest.strip_prefix("sha256:").unwrap_or(digest);
            bar.set_prefix(short[..short.len().min(12)].to_string());
            bar.set_message("waiting");
            bars.push(bar);
        }
        *self.fetched.lock().expect("progress lock") = vec![0; layers.len()];
    }

    fn present(&self, index: usize) {
        self.with_bar(index, |b| {
            b.set_position(b.length().unwrap_or(0));
            b.finish_with_message("already present");
        });
    }

    fn fetched(&self, index: usize, bytes: u64) {
        if let Some(n) = self.fetched.lock().expect("progress lock").get_mut(index) {
            *n = bytes;
        }
        self.with_bar(index, |b| {
            b.set_position(bytes);
            let whole = b.length().is_some_and(|len| bytes >= len);
            b.set_message(if whole { "verifying and unpacking" } else { "fetching" });
        });
    }

    fn done(&self, index: usize) {
        self.with_bar(index, |b| b.finish_with_message("pull complete"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn image(config: serde_json::Value) -> ImageRecord {
        ImageRecord::with_config(config)
    }

    #[test]
    fn the_command_replaces_cmd_and_keeps_the_entrypoint() {
        let img = image(json!({"config": {"Entrypoint": ["/ep"], "Cmd": ["a"], "WorkingDir": "/app"}}));
        let p = process(&img, &[], &[], None, true).unwrap();
        assert_eq!(p.args, ["/ep", "a"]);
        assert_eq!(p.cwd, "/app");
        let p = process(&img, &["b".into()], &[], Some("/w"), true).unwrap();
        assert_eq!(p.args, ["/ep", "b"]);
        assert_eq!(p.cwd, "/w");
    }

    #[test]
    fn an_image_without_a_command_needs_one() {
        let img = image(json!({"config": {}}));
        let e = process(&img, &[], &[], None, true).unwrap_err();
        assert!(e.message.contains("gives no command"), "{}", e.message);
        assert_eq!(process(&img, &["sh".into()], &[], None, true).unwrap().args, ["sh"]);
    }

    #[test]
    fn options_override_the_image_environment_and_defaults_fill_the_rest() {
        let img = image(json!({"config": {"Cmd": ["sh"], "Env": ["PATH=/bin", "A=1"]}}));
        let p = process(&img, &[], &["A=2".into(), "B=".into()], None, false).unwrap();
        assert_eq!(p.env, ["PATH=/bin", "A=2", "B=", "HOME=/"]);
    }
}
