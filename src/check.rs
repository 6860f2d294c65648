//! `runv check`: what this host can do for runv, and whether KVM can boot
//! the guest (a short, cached boot probe).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use runv_proto::guest;

use crate::config::Config;
use crate::helper::{find_program, HelperProcess};
use crate::hypervisor::{Qemu, VmConfig};

/// A Linux guest reaches init in well under a second on hardware KVM; a
/// KVM that cannot run it stalls or fails, which this bounds on a host of
/// ordinary speed. Slower hosts (nested virtualization, emulated CPUs) get
/// it scaled by their measured speed (`probe_timeout`), up to
/// `PROBE_TIMEOUT_MAX`; `boot_probe_timeout_secs` overrides both.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
const PROBE_TIMEOUT_MAX: Duration = Duration::from_secs(300);
/// How long a cached probe answer holds: a success a week, a failure a
/// day (a host's KVM changes with its kernel, modules and firmware, which
/// the cache key covers only in part).
const PROBE_OK_TTL_SECS: u64 = 7 * 86_400;
const PROBE_FAIL_TTL_SECS: u64 = 86_400;

/// Why a boot probe gave no answer.
#[derive(Clone, Debug, PartialEq)]
pub enum ProbeError {
    /// The guest did not boot: the hypervisor failed or exited.
    Failed(String),
    /// The guest had not reached init when the probe's time ran out: no
    /// verdict on KVM, and never cached.
    TimedOut { after: Duration, speed: f64 },
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeError::Failed(why) => f.write_str(why),
            ProbeError::TimedOut { after, speed } => write!(
                f,
                "the boot probe timed out after {}s before the guest reached init (this host measured {speed:.1}x \
                 slower than the reference; raise boot_probe_timeout_secs to wait longer)",
                after.as_secs()
            ),
        }
    }
}

impl From<String> for ProbeError {
    fn from(why: String) -> Self {
        ProbeError::Failed(why)
    }
}

impl From<&str> for ProbeError {
    fn from(why: &str) -> Self {
        ProbeError::Failed(why.to_string())
    }
}

/// How much slower than the reference host this one runs a fixed CPU
/// workload (at least 1): the best of three short runs, so a busy moment
/// does not count.
pub fn host_slowdown() -> f64 {
    // The reference host (one core of a 2020s x86 server) does this loop
    // in about 20 ms.
    const REFERENCE: Duration = Duration::from_millis(20);
    let best = (0..3)
        .map(|_| {
            let started = Instant::now();
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            for _ in 0..20_000_000u32 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
            }
            std::hint::black_box(x);
            started.elapsed()
        })
        .min()
        .unwrap_or(REFERENCE);
    (best.as_secs_f64() / REFERENCE.as_secs_f64()).max(1.0)
}

/// The boot probe's time limit here, and the slowdown it was scaled by.
pub fn probe_timeout(config: &Config) -> (Duration, f64) {
    if config.boot_probe_timeout_secs > 0 {
        return (Duration::from_secs(config.boot_probe_timeout_secs), 1.0);
    }
    let speed = host_slowdown();
    (PROBE_TIMEOUT.mul_f64(speed).min(PROBE_TIMEOUT_MAX), speed)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug)]
pub struct Finding {
    pub level: Level,
    pub item: &'static str,
    pub detail: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
    pub kvm_boots_guest: bool,
    /// The built-in VMM boots the guest (sandboxes use it under `auto`).
    pub builtin_boots_guest: bool,
}

impl Report {
    fn add(&mut self, level: Level, item: &'static str, detail: impl Into<String>) {
        self.findings.push(Finding { level, item, detail: detail.into() });
    }

    /// Whether sandboxes can run here at all (perhaps only under TCG).
    pub fn ready(&self) -> bool {
        !self.findings.iter().any(|f| f.level == Level::Fail)
    }

    pub fn verdict(&self) -> String {
        if !self.ready() {
            let failed: Vec<&str> = self.findings.iter().filter(|f| f.level == Level::Fail).map(|f| f.item).collect();
            format!("verdict: not ready (fix: {})", failed.join(", "))
        } else if self.builtin_boots_guest {
            "verdict: ready (built-in VMM on KVM)".into()
        } else if self.kvm_boots_guest {
            "verdict: ready (qemu/kvm; KVM boots the guest)".into()
        } else {
            "verdict: ready (qemu/tcg software emulation; KVM cannot boot the guest here)".into()
        }
    }
}

/// Probes the host, including whether KVM boots the guest (a boot probe
/// whose answer is cached, see `kvm_boots_guest`).
pub fn check(config: &Config) -> Report {
    let mut r = Report::default();

    match kvm_ioctls::Kvm::new() {
        Ok(kvm) => {
            r.add(Level::Ok, "kvm", format!("/dev/kvm present, API version {}", kvm.get_api_version()));
            match kvm_probe(config) {
                Ok(()) => {
                    r.kvm_boots_guest = true;
                    r.add(Level::Ok, "kvm-boot", "KVM boots the guest kernel");
                }
                Err(why @ ProbeError::TimedOut { .. }) => r.add(Level::Warn, "kvm-boot", format!("unknown: {why}")),
                Err(why) => r.add(Level::Warn, "kvm-boot", format!("KVM cannot boot the guest: {why}")),
            }
        }
        Err(e) => r.add(Level::Warn, "kvm", format!("/dev/kvm unusable ({e}); guests run under TCG only")),
    }
    match builtin_probe(config) {
        Ok(()) => {
            r.builtin_boots_guest = true;
            r.add(Level::Ok, "builtin-vmm", "runv-vmm boots the guest kernel; `hypervisor = auto` uses it");
        }
        Err(why @ ProbeError::TimedOut { .. }) => {
            r.add(Level::Warn, "builtin-vmm", format!("unknown, sandboxes use QEMU: {why}"))
        }
        Err(why) => r.add(
            Level::Warn,
            "builtin-vmm",
            format!("runv-vmm cannot boot the guest here ({why}); sandboxes use QEMU"),
        ),
    }

    if Path::new("/dev/vhost-vsock").exists() {
        r.add(Level::Ok, "vhost-vsock", "/dev/vhost-vsock present");
    } else {
        r.add(Level::Ok, "vhost-vsock", "/dev/vhost-vsock absent; vsock is served by vhost-device-vsock");
    }

    for (item, program, version_arg) in [
        ("qemu", &config.qemu, "--version"),
        ("virtiofsd", &config.virtiofsd, "--version"),
        ("vhost-device-vsock", &config.vhost_vsock, "--version"),
    ] {
        match find_program(program) {
            Some(path) => {
                let version = program_version(&path, version_arg);
                r.add(Level::Ok, item, format!("{} ({version})", path.display()));
            }
            None => r.add(
                Level::Fail,
                item,
                format!("'{}' not found (install it, or set its path in the config)", program.display()),
            ),
        }
    }

    for (item, path) in [("kernel", &config.kernel), ("agent_image", &config.agent_image)] {
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => r.add(Level::Ok, item, format!("{} ({} KiB)", path.display(), m.len() / 1024)),
            _ => r.add(
                Level::Fail,
                item,
                format!("{} not found (run scripts/install.sh, or set `{item}` in the config)", path.display()),
            ),
        }
    }
    if config.rootfs.is_dir() {
        r.add(Level::Ok, "rootfs", format!("{} (default for `runv run`)", config.rootfs.display()));
    } else {
        r.add(Level::Warn, "rootfs", format!("{} missing; `runv run` needs --rootfs", config.rootfs.display()));
    }

    match cgroup_version() {
        Some(v) => r.add(Level::Ok, "cgroup", v),
        None => r.add(Level::Warn, "cgroup", "no cgroup filesystem mounted at /sys/fs/cgroup"),
    }
    match (config.jail, crate::jailer::describe(config)) {
        (true, Ok(jail)) => r.add(Level::Ok, "confinement", format!("{}; jailer: {jail}", confinement())),
        (true, Err(why)) => r.add(Level::Warn, "confinement", format!("{}; jailer: {why}", confinement())),
        (false, _) => r.add(
            Level::Warn,
            "confinement",
            format!(
                "{}; jailer OFF (jail = false): the VMM and its helpers run as root in the host's namespaces",
                confinement()
            ),
        ),
    }
    if config.debug_console {
        r.add(
            Level::Warn,
            "debug-console",
            "ON: root in every guest is one host command away; never for untrusted pods",
        );
    }
    r
}

/// What confines the host processes of a sandbox whatever the jailer
/// does, said as it is.
pub fn confinement() -> String {
    format!(
        "qemu -sandbox {} (elevateprivileges=allow when jailed, for -runas); runv-vmm: no capabilities, no_new_privs, seccomp per thread with argument filters; \
         virtiofsd: its namespace sandbox and seccomp; \
         shared dir: host-only staging tree, read-only guest view, nosuid,nodev",
        crate::hypervisor::QEMU_SANDBOX
    )
}

fn program_version(path: &Path, arg: &str) -> String {
    Command::new(path)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "version unknown".into())
}

fn cgroup_version() -> Option<String> {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        Some("v2 (unified)".into())
    } else if Path::new("/sys/fs/cgroup/memory").exists() {
        Some("v1".into())
    } else {
        None
    }
}

/// Whether KVM can boot the configured guest under QEMU: `Ok` or why not.
/// The answer is cached per host kernel, guest kernel, the agent's image and
/// hypervisor binaries (see `probe_cache_path`).
pub fn kvm_boots_guest(config: &Config) -> Result<(), String> {
    kvm_probe(config).map_err(|e| e.to_string())
}

fn kvm_probe(config: &Config) -> Result<(), ProbeError> {
    kvm_ioctls::Kvm::new().map_err(|e| format!("/dev/kvm unusable: {e}"))?;
    cached_probe(&probe_cache_path(config), || {
        let (timeout, speed) = probe_timeout(config);
        probe_boot(config, "kvm", timeout).map_err(|e| e.scaled(speed))
    })
}

impl ProbeError {
    fn scaled(self, speed: f64) -> Self {
        match self {
            ProbeError::TimedOut { after, .. } => ProbeError::TimedOut { after, speed },
            other => other,
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The cached answer at `cache` while it holds (see `PROBE_OK_TTL_SECS`),
/// else `probe`'s, which is then cached unless it timed out.
pub(crate) fn cached_probe(
    cache: &Path,
    probe: impl FnOnce() -> Result<Duration, ProbeError>,
) -> Result<(), ProbeError> {
    if let Some(answer) = cached_answer(cache) {
        return answer.map_err(ProbeError::Failed);
    }
    let result = probe();
    record_probe(cache, &result);
    result.map(|_| ())
}

/// The answer cached at `cache`, if it still holds. A record is
/// `ok <ms> <unix time>` or `fail <unix time> <why>`; anything else (an
/// older format) counts as absent.
pub(crate) fn cached_answer(cache: &Path) -> Option<Result<(), String>> {
    std::fs::read_to_string(cache).ok().and_then(|t| parse_probe_record(&t, now_secs()))
}

/// Records a probe's answer at `cache`; a timed-out probe has none.
pub(crate) fn record_probe(cache: &Path, result: &Result<Duration, ProbeError>) {
    let text = match result {
        Ok(elapsed) => format!("ok {} {}", elapsed.as_millis(), now_secs()),
        Err(ProbeError::Failed(why)) => format!("fail {} {why}", now_secs()),
        Err(ProbeError::TimedOut { .. }) => {
            let _ = std::fs::remove_file(cache);
            return;
        }
    };
    if let Some(parent) = cache.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let _ = std::fs::write(cache, text);
}

/// A cached probe answer that still holds at `now`.
fn parse_probe_record(text: &str, now: u64) -> Option<Result<(), String>> {
    let mut words = text.trim().splitn(3, ' ');
    match words.next()? {
        "ok" => {
            words.next()?.parse::<u64>().ok()?;
            let at: u64 = words.next()?.trim().parse().ok()?;
            (now.saturating_sub(at) < PROBE_OK_TTL_SECS && at <= now).then_some(Ok(()))
        }
        "fail" => {
            let at: u64 = words.next()?.parse().ok()?;
            let why = words.next().unwrap_or("").to_string();
            (now.saturating_sub(at) < PROBE_FAIL_TTL_SECS && at <= now).then_some(Err(why))
        }
        _ => None,
    }
}

/// Where boot probe answers are kept: host-wide, since they depend on the
/// host, the guest kernel, the agent's image and the hypervisor binaries only
/// (a probe under nested KVM can take seconds); the runtime directory when
/// that cannot be created.
pub const PROBE_CACHE_DIR: &str = "/var/cache/runv/probes";

pub(crate) fn probe_cache_path(config: &Config) -> PathBuf {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let qemu = find_program(&config.qemu);
    let vmm = find_program(&config.vmm);
    for p in [Some(&config.kernel), Some(&config.agent_image), qemu.as_ref(), vmm.as_ref()].into_iter().flatten() {
        p.hash(&mut h);
        if let Ok(m) = std::fs::metadata(p) {
            m.len().hash(&mut h);
            m.modified().ok().hash(&mut h);
        }
    }
    nix::sys::utsname::uname().ok().map(|u| u.release().to_owned()).hash(&mut h);
    // The CPU (its first entry in /proc/cpuinfo, which on a large host is
    // long and computed on every read) and what KVM was loaded with.
    use std::io::BufRead;
    let first_cpu: Vec<String> = std::fs::File::open("/proc/cpuinfo")
        .map(|f| std::io::BufReader::new(f).lines().map_while(Result::ok).take_while(|l| !l.is_empty()).collect())
        .unwrap_or_default();
    first_cpu.iter().find(|l| l.starts_with("model name")).hash(&mut h);
    first_cpu.iter().find(|l| l.starts_with("flags")).hash(&mut h);
    for module in ["kvm", "kvm_amd", "kvm_intel"] {
        let dir = Path::new("/sys/module").join(module).join("parameters");
        let mut params: Vec<(String, String)> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| {
                let value = std::fs::read_to_string(e.path()).unwrap_or_default();
                (e.file_name().to_string_lossy().into_owned(), value)
            })
            .collect();
        params.sort();
        params.hash(&mut h);
    }
    let name = format!("kvm-probe-{:016x}", h.finish());
    match std::fs::create_dir_all(PROBE_CACHE_DIR) {
        Ok(()) => Path::new(PROBE_CACHE_DIR).join(name),
        Err(_) => config.runtime_dir.join(name),
    }
}

/// Boots the guest with the probe flag under `accel` and waits for the
/// agent's marker on the console; returns the time to the marker.
pub fn probe_boot(config: &Config, accel: &'static str, timeout: Duration) -> Result<Duration, ProbeError> {
    if !config.kernel.is_file() || !config.agent_image.is_file() {
        return Err("guest kernel or the agent's image missing".into());
    }
    let dir = tempdir_in(&config.runtime_dir).map_err(|e| format!("creating a probe directory: {e}"))?;
    let result = (|| -> Result<Duration, ProbeError> {
        let vm = VmConfig {
            kernel: config.kernel.clone(),
            agent_image: config.agent_image.clone(),
            cmdline: format!("{} {}", guest::KERNEL_CMDLINE_BASE, guest::PROBE_CMDLINE_FLAG),
            vcpus: 1,
            memory_mib: 128,
            work_dir: dir.clone(),
            console_log: dir.join("console.log"),
            console_fd: None,
            vsock_socket: dir.join("vsock.sock"),
            shared_fs_socket: None,
            shared_fs_tag: String::new(),
            net_devices: Vec::new(),
            jail: None,
        };
        let cmd = Qemu::new(&config.qemu, &config.vhost_vsock, accel).command(
            &vm,
            None,
            &crate::hypervisor::Connected::default(),
        );
        let started = Instant::now();
        let mut qemu = HelperProcess::spawn("qemu", cmd, &dir.join("qemu.log")).map_err(|e| e.to_string())?;
        loop {
            let console = std::fs::read_to_string(&vm.console_log).unwrap_or_default();
            if console.contains(guest::PROBE_READY_MARKER) {
                return Ok(started.elapsed());
            }
            let qemu_log = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
            if qemu_log.contains("internal error") || qemu_log.contains("emulation failure") {
                return Err(format!(
                    "KVM internal error (emulation failure) {:.1}s into the boot",
                    started.elapsed().as_secs_f64()
                )
                .into());
            }
            if let Some(status) = qemu.try_wait() {
                let log = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
                let mut first = log.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
                first.truncate(160);
                return Err(format!("QEMU exited ({status}) before the guest reached init: {first}").into());
            }
            if started.elapsed() >= timeout {
                return Err(ProbeError::TimedOut { after: timeout, speed: 1.0 });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempdir_in(parent: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(parent)?;
    let dir = parent.join(format!("probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir)?;
    Ok(dir)
}

/// Whether the built-in VMM (`runv-vmm`) boots the configured guest to its
/// agent: `Ok` or why not. Cached like `kvm_boots_guest`.
pub fn builtin_boots_guest(config: &Config) -> Result<(), String> {
    builtin_probe(config).map_err(|e| e.to_string())
}

fn builtin_probe(config: &Config) -> Result<(), ProbeError> {
    let vmm = find_program(&config.vmm).ok_or_else(|| format!("'{}' not found", config.vmm.display()))?;
    kvm_ioctls::Kvm::new().map_err(|e| format!("/dev/kvm unusable: {e}"))?;
    cached_probe(&probe_cache_path(config).with_extension("builtin"), || {
        let (timeout, speed) = probe_timeout(config);
        probe_builtin(config, &vmm, timeout).map_err(|e| e.scaled(speed))
    })
}

/// Boots the guest with the probe flag under `runv-vmm` and waits for the
/// agent's marker on the console; returns the time to the marker.
pub fn probe_builtin(config: &Config, vmm: &Path, timeout: Duration) -> Result<Duration, ProbeError> {
    if !config.kernel.is_file() || !config.agent_image.is_file() {
        return Err("guest kernel or the agent's image missing".into());
    }
    let dir = tempdir_in(&config.runtime_dir).map_err(|e| format!("creating a probe directory: {e}"))?;
    let result = (|| -> Result<Duration, ProbeError> {
        let console = dir.join("console.log");
        let log = std::fs::File::create(dir.join("vmm.log")).map_err(|e| e.to_string())?;
        let started = Instant::now();
        let mut child = Command::new(vmm)
            .arg("--kernel")
            .arg(&config.kernel)
            .args(["--initramfs", "none"])
            .arg("--disk")
            .arg(crate::hypervisor::agent_disk_arg(&config.agent_image))
            .args(["--cmdline", &format!("{} {}", guest::KERNEL_CMDLINE_BASE, guest::PROBE_CMDLINE_FLAG)])
            .args(["--memory", "128"])
            .arg("--console")
            .arg(&console)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", vmm.display()))?;
        let outcome = loop {
            if std::fs::read_to_string(&console).unwrap_or_default().contains(guest::PROBE_READY_MARKER) {
                break Ok(started.elapsed());
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default();
                let mut why = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
                why.truncate(200);
                break Err(format!("runv-vmm exited ({status}) before the guest reached init: {why}").into());
            }
            if started.elapsed() >= timeout {
                break Err(ProbeError::TimedOut { after: timeout, speed: 1.0 });
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let _ = child.kill();
        let _ = child.wait();
        outcome
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_record_holds_until_it_expires_and_old_formats_count_as_absent() {
        let now = 1_000_000_000;
        assert_eq!(parse_probe_record(&format!("ok 1200 {}", now - 60), now), Some(Ok(())));
        assert_eq!(parse_probe_record(&format!("ok 1200 {}", now - PROBE_OK_TTL_SECS), now), None);
        assert_eq!(
            parse_probe_record(&format!("fail {} KVM internal error", now - 60), now),
            Some(Err("KVM internal error".into()))
        );
        assert_eq!(parse_probe_record(&format!("fail {} x", now - PROBE_FAIL_TTL_SECS), now), None);
        // A record from the future (a clock set back) does not hold.
        assert_eq!(parse_probe_record(&format!("ok 5 {}", now + 10), now), None);
        assert_eq!(parse_probe_record("ok 1200ms", now), None);
        assert_eq!(parse_probe_record("the guest did not reach init within 10s", now), None);
    }

    #[test]
    fn a_timed_out_probe_is_reported_as_such_and_never_cached() {
        let dir = std::env::temp_dir().join(format!("runv-probe-test-{}", std::process::id()));
        let cache = dir.join("kvm-probe-x");
        let timed_out = ProbeError::TimedOut { after: Duration::from_secs(40), speed: 4.0 };
        let e = cached_probe(&cache, || Err(timed_out.clone())).unwrap_err();
        assert_eq!(e, timed_out);
        assert!(e.to_string().contains("timed out after 40s") && e.to_string().contains("boot_probe_timeout_secs"));
        assert!(!cache.exists());
        // A failure is cached, and answers the next call without probing.
        let failed = cached_probe(&cache, || Err(ProbeError::Failed("emulation failure".into())));
        assert_eq!(failed, Err(ProbeError::Failed("emulation failure".into())));
        let again = cached_probe(&cache, || panic!("probed although an answer was cached"));
        assert_eq!(again, Err(ProbeError::Failed("emulation failure".into())));
        std::fs::remove_file(&cache).unwrap();
        assert_eq!(cached_probe(&cache, || Ok(Duration::from_millis(900))), Ok(()));
        assert!(std::fs::read_to_string(&cache).unwrap().starts_with("ok 900 "));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_probe_timeout_scales_with_the_host_unless_configured() {
        let mut config = Config::default();
        let (timeout, speed) = probe_timeout(&config);
        assert!(speed >= 1.0);
        assert!(timeout >= PROBE_TIMEOUT && timeout <= PROBE_TIMEOUT_MAX, "{timeout:?}");
        config.boot_probe_timeout_secs = 77;
        assert_eq!(probe_timeout(&config), (Duration::from_secs(77), 1.0));
    }
}
