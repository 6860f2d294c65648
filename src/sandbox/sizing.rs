//! How big a pod's VM is: the one rule every path uses (the shim, `runv
//! run`, the bundled CRI).
//!
//! The rule:
//! - Memory: the pod's memory limit (the sandbox's `sandbox-memory`
//!   annotation, else the sum of its containers' limits when every
//!   container has one), rounded up to MiB, plus the guest's own overhead
//!   (`guest_overhead_mib`), plus what the guest kernel reserves at boot in
//!   proportion to the VM's memory (its page map and RAM-sized tables:
//!   1/56 of it, `GUEST_RESERVED_SHARE`), so a big limit still fits beside
//!   the overhead. A pod without a memory limit gets the configured default
//!   (`memory_mib`).
//! - vCPUs: the pod's CPU limit (`sandbox-cpu-quota` / `sandbox-cpu-period`,
//!   else the sum of the containers' quota / period), rounded up, at least
//!   one. CPU shares alone are a relative weight, not a limit: they leave
//!   the configured default (`vcpus`).
//! - Values that are negative, not numbers, or beyond what one VM may have
//!   are errors naming the annotation, never a huge VM.

use std::collections::HashMap;

use crate::config::{Config, MAX_MEMORY_MIB, MAX_VCPUS};

pub const ANNOTATION_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
pub const ANNOTATION_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const ANNOTATION_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const ANNOTATION_SANDBOX_CPU_SHARES: &str = "io.kubernetes.cri.sandbox-cpu-shares";

const MIB: u64 = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizingError {
    #[error("annotation {key}: '{value}' is not a whole number of {unit}")]
    NotANumber { key: &'static str, value: String, unit: &'static str },
    #[error("annotation {key}: {value} {problem}")]
    OutOfRange { key: &'static str, value: i64, problem: String },
    #[error("the pod asks for {what}, more than one VM may have ({max})")]
    TooLarge { what: String, max: String },
}

/// A CPU limit as the kernel's CFS bandwidth expresses it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuLimit {
    pub quota_us: u64,
    pub period_us: u64,
}

impl CpuLimit {
    fn cpus(&self) -> f64 {
        self.quota_us as f64 / self.period_us as f64
    }
}

/// What the pod asks for, from whichever source knows it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodResources {
    pub memory_limit_bytes: Option<u64>,
    pub cpu_limit: Option<CpuLimit>,
    pub cpu_shares: Option<u64>,
}

/// One container's limits, where a path knows them before the VM starts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ContainerLimits {
    pub memory_limit_bytes: Option<u64>,
    pub cpu_limit: Option<CpuLimit>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u32,
}

fn number(
    annotations: &HashMap<String, String>,
    key: &'static str,
    unit: &'static str,
) -> Result<Option<i64>, SizingError> {
    match annotations.get(key) {
        None => Ok(None),
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => {
            v.trim().parse::<i64>().map(Some).map_err(|_| SizingError::NotANumber { key, value: v.clone(), unit })
        }
    }
}

fn non_negative(key: &'static str, v: Option<i64>) -> Result<Option<u64>, SizingError> {
    match v {
        Some(v) if v < 0 => Err(SizingError::OutOfRange { key, value: v, problem: "is negative".into() }),
        Some(0) | None => Ok(None),
        Some(v) => Ok(Some(v as u64)),
    }
}

impl PodResources {
    /// Reads the sandbox annotations containerd's CRI plugin sets.
    pub fn from_annotations(annotations: &HashMap<String, String>) -> Result<Self, SizingError> {
        let memory = non_negative(ANNOTATION_SANDBOX_MEMORY, number(annotations, ANNOTATION_SANDBOX_MEMORY, "bytes")?)?;
        let quota = number(annotations, ANNOTATION_SANDBOX_CPU_QUOTA, "microseconds")?;
        let period = non_negative(
            ANNOTATION_SANDBOX_CPU_PERIOD,
            number(annotations, ANNOTATION_SANDBOX_CPU_PERIOD, "microseconds")?,
        )?;
        let shares =
            non_negative(ANNOTATION_SANDBOX_CPU_SHARES, number(annotations, ANNOTATION_SANDBOX_CPU_SHARES, "shares")?)?;
        // A quota of -1 means "no limit", as in the kernel.
        let quota = match quota {
            Some(-1) | None | Some(0) => None,
            Some(q) if q < 0 => {
                return Err(SizingError::OutOfRange {
                    key: ANNOTATION_SANDBOX_CPU_QUOTA,
                    value: q,
                    problem: "is negative (only -1, no limit, is)".into(),
                })
            }
            Some(q) => Some(q as u64),
        };
        let cpu_limit = match (quota, period) {
            (Some(quota_us), Some(period_us)) => {
                if !(1_000..=1_000_000).contains(&period_us) {
                    return Err(SizingError::OutOfRange {
                        key: ANNOTATION_SANDBOX_CPU_PERIOD,
                        value: period_us as i64,
                        problem: "is outside 1000..=1000000 microseconds".into(),
                    });
                }
                Some(CpuLimit { quota_us, period_us })
            }
            // A quota without a period uses the kernel's default period.
            (Some(quota_us), None) => Some(CpuLimit { quota_us, period_us: 100_000 }),
            _ => None,
        };
        Ok(Self { memory_limit_bytes: memory, cpu_limit, cpu_shares: shares })
    }

    /// Fills what the sandbox annotations did not say from the containers'
    /// own limits, when every container has one.
    pub fn with_containers(mut self, containers: &[ContainerLimits]) -> Self {
        if containers.is_empty() {
            return self;
        }
        if self.memory_limit_bytes.is_none() && containers.iter().all(|c| c.memory_limit_bytes.is_some()) {
            self.memory_limit_bytes = Some(containers.iter().filter_map(|c| c.memory_limit_bytes).sum());
        }
        if self.cpu_limit.is_none() && containers.iter().all(|c| c.cpu_limit.is_some()) {
            let cpus: f64 = containers.iter().filter_map(|c| c.cpu_limit).map(|l| l.cpus()).sum();
            self.cpu_limit = Some(CpuLimit { quota_us: (cpus * 100_000.0).ceil() as u64, period_us: 100_000 });
        }
        self
    }
}

/// The share of a VM's memory its guest kernel reserves at boot and never
/// hands out, beyond a fixed part: 64 bytes of page map per 4 KiB page
/// (1/64) and the hash tables it sizes by RAM. Measured on runv's guest
/// kernel (`runv run -- head -1 /proc/meminfo` in VMs of 256, 512 and
/// 1024 MiB: MemTotal falls 1.71% short of each added MiB); 1/56 keeps a
/// margin.
pub const GUEST_RESERVED_SHARE: (u64, u64) = (1, 56);

/// The VM for `pod` under `config`: see the module documentation.
pub fn vm_size(pod: &PodResources, config: &Config) -> Result<VmSize, SizingError> {
    let memory_mib = match pod.memory_limit_bytes {
        Some(bytes) => {
            // vm = wanted + vm * share, so vm = wanted / (1 - share).
            let wanted = bytes.div_ceil(MIB) + u64::from(config.guest_overhead_mib);
            let (num, den) = GUEST_RESERVED_SHARE;
            let mib = (wanted * den).div_ceil(den - num);
            if mib > u64::from(MAX_MEMORY_MIB) {
                return Err(SizingError::TooLarge { what: format!("{mib} MiB"), max: format!("{MAX_MEMORY_MIB} MiB") });
            }
            // Never below what a guest needs to boot.
            (mib as u32).max(crate::config::MIN_MEMORY_MIB)
        }
        None => config.memory_mib,
    };
    let vcpus = match pod.cpu_limit {
        Some(limit) => {
            let cpus = limit.cpus().ceil().max(1.0);
            if cpus > f64::from(MAX_VCPUS) {
                return Err(SizingError::TooLarge { what: format!("{cpus} CPUs"), max: format!("{MAX_VCPUS}") });
            }
            cpus as u32
        }
        None => config.vcpus,
    };
    Ok(VmSize { vcpus, memory_mib })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn config() -> Config {
        Config { vcpus: 1, memory_mib: 256, guest_overhead_mib: 64, ..Config::default() }
    }

    fn size(pairs: &[(&str, &str)], containers: &[ContainerLimits]) -> Result<VmSize, SizingError> {
        let pod = PodResources::from_annotations(&annotations(pairs))?.with_containers(containers);
        vm_size(&pod, &config())
    }

    #[test]
    fn a_pod_without_limits_gets_the_configured_default() {
        assert_eq!(size(&[], &[]), Ok(VmSize { vcpus: 1, memory_mib: 256 }));
    }

    #[test]
    fn sandbox_annotations_size_the_vm_plus_the_guest_overhead() {
        let s = size(
            &[
                (ANNOTATION_SANDBOX_MEMORY, "536870912"),
                (ANNOTATION_SANDBOX_CPU_QUOTA, "250000"),
                (ANNOTATION_SANDBOX_CPU_PERIOD, "100000"),
            ],
            &[],
        );
        // 512 MiB + 64 MiB overhead, and 1/56 of the VM for the guest
        // kernel's page map (576 * 56 / 55 = 586.5); 2.5 CPUs round up to 3.
        assert_eq!(s, Ok(VmSize { vcpus: 3, memory_mib: 587 }));
    }

    #[test]
    fn one_container_with_limits_sizes_the_vm() {
        let c = ContainerLimits {
            memory_limit_bytes: Some(100 * MIB + 1),
            cpu_limit: Some(CpuLimit { quota_us: 50_000, period_us: 100_000 }),
        };
        // 100 MiB and one byte round up to 101 MiB (165 * 56 / 55 = 168);
        // half a CPU is one vCPU.
        assert_eq!(size(&[], &[c]), Ok(VmSize { vcpus: 1, memory_mib: 168 }));
    }

    #[test]
    fn several_containers_add_up_and_one_without_a_limit_means_no_limit() {
        let limited = |mib: u64, quota: u64| ContainerLimits {
            memory_limit_bytes: Some(mib * MIB),
            cpu_limit: Some(CpuLimit { quota_us: quota, period_us: 100_000 }),
        };
        assert_eq!(size(&[], &[limited(128, 150_000), limited(64, 100_000)]), Ok(VmSize { vcpus: 3, memory_mib: 261 }));
        let unlimited = ContainerLimits::default();
        assert_eq!(size(&[], &[limited(128, 150_000), unlimited]), Ok(VmSize { vcpus: 1, memory_mib: 256 }));
    }

    #[test]
    fn a_big_limit_still_fits_beside_the_overhead_and_the_page_map() {
        // 4 GiB: the guest kernel's page map alone (1/64) would eat the
        // whole 64 MiB overhead; the VM grows by what it reserves.
        let s = size(&[(ANNOTATION_SANDBOX_MEMORY, &(4096 * MIB).to_string())], &[]).unwrap();
        // What the guest kernel leaves after its share, as measured (1.71%).
        let usable = s.memory_mib as f64 * (1.0 - 0.0171);
        assert!(usable >= 4096.0 + 64.0, "{s:?} leaves {usable:.0} MiB");
    }

    #[test]
    fn cpu_shares_alone_do_not_change_the_size() {
        assert_eq!(size(&[(ANNOTATION_SANDBOX_CPU_SHARES, "2048")], &[]), Ok(VmSize { vcpus: 1, memory_mib: 256 }));
    }

    #[test]
    fn a_quota_of_minus_one_is_no_limit() {
        assert_eq!(
            size(&[(ANNOTATION_SANDBOX_CPU_QUOTA, "-1"), (ANNOTATION_SANDBOX_CPU_PERIOD, "100000")], &[]),
            Ok(VmSize { vcpus: 1, memory_mib: 256 })
        );
    }

    #[test]
    fn bad_values_are_errors_naming_the_annotation_never_a_huge_vm() {
        for (pairs, needle) in [
            (vec![(ANNOTATION_SANDBOX_MEMORY, "-5")], "sandbox-memory: -5 is negative"),
            (vec![(ANNOTATION_SANDBOX_MEMORY, "lots")], "sandbox-memory: 'lots' is not a whole number"),
            (vec![(ANNOTATION_SANDBOX_MEMORY, "1Gi")], "sandbox-memory: '1Gi' is not a whole number"),
            (vec![(ANNOTATION_SANDBOX_MEMORY, "9223372036854775807")], "more than one VM may have"),
            (vec![(ANNOTATION_SANDBOX_CPU_QUOTA, "-7")], "sandbox-cpu-quota: -7 is negative"),
            (
                vec![(ANNOTATION_SANDBOX_CPU_QUOTA, "100000000"), (ANNOTATION_SANDBOX_CPU_PERIOD, "1000")],
                "more than one VM may have",
            ),
            (
                vec![(ANNOTATION_SANDBOX_CPU_QUOTA, "100000"), (ANNOTATION_SANDBOX_CPU_PERIOD, "5")],
                "sandbox-cpu-period: 5 is outside",
            ),
            (vec![(ANNOTATION_SANDBOX_CPU_SHARES, "x")], "sandbox-cpu-shares: 'x'"),
        ] {
            let e = size(&pairs, &[]).unwrap_err().to_string();
            assert!(e.contains(needle), "{pairs:?}: {e}");
        }
    }
}
