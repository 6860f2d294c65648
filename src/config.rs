//! runv configuration: `/etc/runv/config.toml`, every key optional.
//!
//! The sample with every key and its default is `deploy/config.toml`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the configuration is read from when no path is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/runv/config.toml";
/// Where `scripts/install.sh` puts the guest kernel, the agent's image and
/// the rootfs.
pub const DEFAULT_SHARE_DIR: &str = "/usr/local/share/runv";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {key} {problem}")]
    Invalid { path: PathBuf, key: &'static str, problem: String },
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorKind {
    /// The built-in VMM where KVM can boot the guest, else QEMU.
    #[default]
    Auto,
    Qemu,
    Builtin,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM where `runv check` finds it can boot the guest, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub hypervisor: HypervisorKind,
    pub accel: Accel,
    pub kernel: PathBuf,
    /// The guest's root: a read-only ext4 image holding the agent as
    /// `/init`, attached as the VM's first virtio-blk disk.
    pub agent_image: PathBuf,
    /// Root filesystem `runv run` uses when given no `--rootfs`.
    pub rootfs: PathBuf,
    /// Extra guest kernel parameters, appended to runv's own.
    pub kernel_params: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Memory a VM gets on top of its pod's memory limit, for the guest
    /// kernel, the agent and the pause process (see the sizing rule in the README).
    pub guest_overhead_mib: u32,
    /// Seconds to wait for the agent to answer after the VM starts.
    pub boot_timeout_secs: u64,
    /// Seconds the boot probe (`runv check`, `hypervisor = auto`) waits for
    /// the guest to reach init; 0 scales 10 s by the host's measured speed.
    pub boot_probe_timeout_secs: u64,
    /// Per-sandbox state (sockets, logs), removed with the sandbox.
    pub runtime_dir: PathBuf,
    pub qemu: PathBuf,
    /// The built-in VMM binary.
    pub vmm: PathBuf,
    pub virtiofsd: PathBuf,
    pub vhost_vsock: PathBuf,
    /// tracing filter for runv's own log on stderr (error, warn, info, debug).
    pub log_level: String,
    /// Where `runv cri` and `runv run --image` keep pulled images.
    pub cri_image_root: PathBuf,
    /// Registries (`host[:port]`) `runv cri` may reach over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// containerd-style registry hosts directory: `<registry>/hosts.toml`
    /// (mirrors, server, capabilities, ca, skip_verify), `_default/hosts.toml`
    /// for every other registry; a missing directory configures nothing.
    pub registry_config_path: PathBuf,
    /// A docker-style `config.json` with registry credentials by host; a
    /// missing file holds none.
    pub registry_auth_file: PathBuf,
    /// Where `runv cri` keeps its pods' and containers' state and bundles.
    pub cri_state_root: PathBuf,
    /// The image of every pod's sandbox (pause) container, pulled on first use.
    pub cri_sandbox_image: String,
    /// `host:port` of `runv cri`'s streaming server (exec, attach,
    /// port-forward); port 0 picks a free one.
    pub cri_stream_address: String,
    /// The shim `runv cri` runs pods with (the `runv` runtime handler).
    pub cri_shim: PathBuf,
    /// CNI network configurations (`*.conflist`, `*.conf`; the first by name is used).
    pub cni_conf_dir: PathBuf,
    /// CNI plugin binaries.
    pub cni_bin_dir: PathBuf,
    /// Largest layer blob `runv cri` pulls (compressed), MiB.
    pub image_max_layer_mib: u64,
    /// Largest size one layer may unpack to, MiB (a decompression bomb stops here).
    pub image_max_unpacked_mib: u64,
    /// Most tar entries in one layer.
    pub image_max_layer_entries: u64,
    /// Most layers in one image (a manifest listing more is refused before
    /// any layer is fetched).
    pub image_max_layers: u64,
    /// Most bytes a second a pod's VM receives on each NIC (0: unlimited);
    /// enforced by the built-in VMM's virtio-net (a token bucket).
    pub net_rx_rate_limit: u64,
    /// Most bytes a second a pod's VM sends on each NIC (0: unlimited).
    pub net_tx_rate_limit: u64,
    /// Most of a guest's console kept on the host per sandbox, KiB
    /// (`console.log` plus the rotated `console.log.1`).
    pub console_log_max_kib: u64,
    /// The agent's debug console (a root command in the guest, outside any
    /// container, through `runv debug-console`): for debugging and tests only.
    pub debug_console: bool,
    /// Confine each sandbox's host processes (see `src/jailer.rs`): a uid of
    /// its own, namespaces and pivot_root (runv-vmm), -runas/-chroot (QEMU),
    /// a cgroup. Off only for debugging.
    pub jail: bool,
    /// First uid (and gid) sandboxes get; each running sandbox holds one.
    pub jail_uid_base: u32,
    /// How many uids from `jail_uid_base` sandboxes may use.
    pub jail_uid_count: u32,
}

impl Default for Config {
    fn default() -> Self {
        let share = Path::new(DEFAULT_SHARE_DIR);
        Self {
            hypervisor: HypervisorKind::Auto,
            accel: Accel::Auto,
            kernel: share.join("vmlinux"),
            agent_image: share.join("agent.img"),
            rootfs: share.join("rootfs"),
            kernel_params: String::new(),
            vcpus: 1,
            memory_mib: 256,
            guest_overhead_mib: 64,
            boot_timeout_secs: 30,
            boot_probe_timeout_secs: 0,
            runtime_dir: PathBuf::from("/run/runv"),
            qemu: PathBuf::from("qemu-system-x86_64"),
            vmm: PathBuf::from("runv-vmm"),
            virtiofsd: PathBuf::from("virtiofsd"),
            vhost_vsock: PathBuf::from("vhost-device-vsock"),
            log_level: "warn".into(),
            cri_image_root: PathBuf::from("/var/lib/runv/images"),
            insecure_registries: Vec::new(),
            registry_config_path: PathBuf::from("/etc/runv/certs.d"),
            registry_auth_file: PathBuf::from("/etc/runv/auth.json"),
            cri_state_root: PathBuf::from("/var/lib/runv/cri"),
            cri_sandbox_image: "registry.k8s.io/pause:3.10".into(),
            cri_stream_address: "127.0.0.1:0".into(),
            cri_shim: PathBuf::from("containerd-shim-runv-v2"),
            cni_conf_dir: PathBuf::from("/etc/cni/net.d"),
            cni_bin_dir: PathBuf::from("/usr/lib/cni"),
            image_max_layer_mib: 8192,
            image_max_unpacked_mib: 32768,
            image_max_layer_entries: 1_000_000,
            image_max_layers: 128,
            console_log_max_kib: 1024,
            net_rx_rate_limit: 0,
            net_tx_rate_limit: 0,
            debug_console: false,
            jail: true,
            jail_uid_base: 990_000_000,
            jail_uid_count: 65536,
        }
    }
}

/// Largest VM a config may ask for; beyond this a typo is likelier than intent.
pub const MAX_VCPUS: u32 = 256;
pub const MAX_MEMORY_MIB: u32 = 1024 * 1024;
pub const MIN_MEMORY_MIB: u32 = 64;

impl Config {
    /// Loads `path`, or the default path when it exists, or the defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        Self::parse(&text, &path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        // A key of earlier releases gets a pointer to what replaced it.
        if text.parse::<toml::Table>().is_ok_and(|t| t.contains_key("initramfs")) {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key: "initramfs",
                problem: "is no longer read: runv boots the guest from the agent's read-only disk image; \
                          set `agent_image` (scripts/install.sh makes agent.img) instead"
                    .into(),
            });
        }
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string() + &e.span().map(|s| format!(" (at byte {})", s.start)).unwrap_or_default(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, problem: String| ConfigError::Invalid { path: path.to_path_buf(), key, problem };
        check_vcpus(self.vcpus).map_err(|p| invalid("vcpus", p))?;
        check_memory(self.memory_mib).map_err(|p| invalid("memory_mib", p))?;
        if self.guest_overhead_mib > 4096 {
            return Err(invalid(
                "guest_overhead_mib",
                format!("must be at most 4096 MiB, got {}", self.guest_overhead_mib),
            ));
        }
        for (key, value) in [
            ("image_max_layer_mib", self.image_max_layer_mib),
            ("image_max_unpacked_mib", self.image_max_unpacked_mib),
            ("image_max_layer_entries", self.image_max_layer_entries),
            ("image_max_layers", self.image_max_layers),
            ("console_log_max_kib", self.console_log_max_kib),
        ] {
            if value == 0 || value > 1 << 40 {
                return Err(invalid(key, format!("must be between 1 and {}, got {value}", 1u64 << 40)));
            }
        }
        if self.jail_uid_base == 0 || self.jail_uid_count == 0 {
            return Err(invalid(
                "jail_uid_base",
                "and jail_uid_count must be non-zero (uid 0 is root, which a jail must not be)".into(),
            ));
        }
        if u64::from(self.jail_uid_base) + u64::from(self.jail_uid_count) > u64::from(u32::MAX) {
            return Err(invalid(
                "jail_uid_count",
                format!("{} uids from {} run past the largest uid", self.jail_uid_count, self.jail_uid_base),
            ));
        }
        if self.boot_timeout_secs == 0 {
            return Err(invalid("boot_timeout_secs", "must be at least 1".into()));
        }
        Ok(())
    }
}

impl Config {
    /// Where `runv cri` and `runv run --image` pull each registry's images from.
    pub fn registry_hosts(&self) -> crate::image::RegistryHosts {
        crate::image::RegistryHosts {
            config_path: Some(self.registry_config_path.clone()),
            insecure: self.insecure_registries.clone(),
            auth_file: Some(self.registry_auth_file.clone()),
        }
    }

    /// The image store's caps on one layer.
    pub fn image_limits(&self) -> crate::image::ImageLimits {
        crate::image::ImageLimits {
            max_layer_bytes: self.image_max_layer_mib << 20,
            max_unpacked_bytes: self.image_max_unpacked_mib << 20,
            max_entries: self.image_max_layer_entries,
            max_layers: self.image_max_layers,
        }
    }
}

pub fn check_vcpus(vcpus: u32) -> Result<(), String> {
    if !(1..=MAX_VCPUS).contains(&vcpus) {
        return Err(format!("must be between 1 and {MAX_VCPUS}, got {vcpus}"));
    }
    Ok(())
}

pub fn check_memory(mib: u32) -> Result<(), String> {
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
        return Err(format!("must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, got {mib}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_gives_defaults() {
        let c = Config::parse("", Path::new("t.toml")).unwrap();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.hypervisor, HypervisorKind::Auto);
        assert_eq!(c.kernel, Path::new(DEFAULT_SHARE_DIR).join("vmlinux"));
    }

    #[test]
    fn keys_override_defaults() {
        let c =
            Config::parse("hypervisor = \"qemu\"\naccel = \"tcg\"\nvcpus = 2\nmemory_mib = 512\n", Path::new("t.toml"))
                .unwrap();
        assert_eq!(c.hypervisor, HypervisorKind::Qemu);
        assert_eq!(c.accel, Accel::Tcg);
        assert_eq!((c.vcpus, c.memory_mib), (2, 512));
    }

    /// `deploy/config.toml` is the reference users copy: every key, each
    /// at its default.
    #[test]
    fn the_sample_config_names_every_key_at_its_default() {
        let text = include_str!("../deploy/config.toml");
        let sample = Config::parse(text, Path::new("deploy/config.toml")).unwrap();
        assert_eq!(format!("{sample:#?}"), format!("{:#?}", Config::default()));
        let table: toml::Table = text.parse().unwrap();
        let debug = format!("{:#?}", Config::default());
        // Top-level fields are the lines indented by four spaces in `{:#?}`.
        let fields: Vec<&str> = debug
            .lines()
            .filter(|l| l.starts_with("    ") && !l.starts_with("     "))
            .filter_map(|l| l.trim().split_once(':').map(|(k, _)| k))
            .collect();
        assert!(fields.len() > 20 && fields.contains(&"image_max_layers"), "{fields:?}");
        let missing: Vec<_> = fields.iter().filter(|k| !table.contains_key(**k)).collect();
        assert!(missing.is_empty(), "keys missing from deploy/config.toml: {missing:?}");
    }

    #[test]
    fn the_retired_initramfs_key_points_to_agent_image() {
        let e = Config::parse("initramfs = \"/x.cpio\"\n", Path::new("t.toml")).unwrap_err().to_string();
        assert!(e.contains("t.toml: initramfs is no longer read") && e.contains("agent_image"), "{e}");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::parse("vcpu = 2\n", Path::new("t.toml")).unwrap_err().to_string();
        assert!(e.contains("unknown field `vcpu`"), "{e}");
        assert!(e.contains("t.toml"), "{e}");
    }

    #[test]
    fn bad_values_are_rejected_with_the_key() {
        let e = Config::parse("memory_mib = 1\n", Path::new("t.toml")).unwrap_err().to_string();
        assert!(e.contains("memory_mib must be between"), "{e}");
        let e = Config::parse("vcpus = 0\n", Path::new("t.toml")).unwrap_err().to_string();
        assert!(e.contains("vcpus"), "{e}");
        let e = Config::parse("hypervisor = \"xen\"\n", Path::new("t.toml")).unwrap_err().to_string();
        assert!(e.contains("xen"), "{e}");
        let e = Config::parse("jail_uid_base = 0\n", Path::new("t.toml")).unwrap_err().to_string();
        assert!(e.contains("jail_uid_base") && e.contains("root"), "{e}");
        let e = Config::parse("jail_uid_base = 4294967000\n", Path::new("t.toml")).unwrap_err().to_string();
        assert!(e.contains("jail_uid_count"), "{e}");
    }

    #[test]
    fn missing_default_file_is_fine_but_missing_given_file_is_not() {
        let e = Config::load(Some(Path::new("/nonexistent/runv.toml"))).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/runv.toml"), "{e}");
    }
}
