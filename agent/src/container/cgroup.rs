//! A container's cgroup: stats, resource updates, its processes, and its
//! OOM-kill count (cgroup v2 in the guest; v1 too, for hosts that have it).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use libcgroups::common::{AnyCgroupManager, CgroupConfig, CgroupManager, ControllerOpt};
use oci_spec::runtime::LinuxResources;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

pub struct Cgroup {
    path: PathBuf,
    manager: AnyCgroupManager,
}

/// What `StatsContainer` reports.
#[derive(Debug, Default)]
pub struct Usage {
    pub cpu_usage_ns: u64,
    pub cpu_user_ns: u64,
    pub cpu_system_ns: u64,
    pub memory_usage: u64,
    pub memory_limit: u64,
    pub memory_working_set: u64,
    pub pids_current: u64,
    pub pids_limit: u64,
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
    pub oom_kills: u64,
}

/// "No limit" as the kernel spells it, in either hierarchy.
fn limit_or_zero(v: u64) -> u64 {
    if v >= i64::MAX as u64 / 2 {
        0
    } else {
        v
    }
}

impl Cgroup {
    pub fn open(path: &Path, container_id: &str) -> Result<Self> {
        let manager = libcgroups::common::create_cgroup_manager(CgroupConfig {
            cgroup_path: path.to_path_buf(),
            systemd_cgroup: false,
            container_name: container_id.to_string(),
        })
        .with_context(|| format!("opening cgroup {}", path.display()))?;
        Ok(Self { path: path.to_path_buf(), manager })
    }

    pub fn update(&self, resources: &LinuxResources) -> Result<()> {
        let opt = ControllerOpt { resources, disable_oom_killer: false, oom_score_adj: None, freezer_state: None };
        self.manager.apply(&opt).map_err(|e| anyhow::anyhow!("{e}")).context("applying resources")
    }

    pub fn pids(&self) -> Result<Vec<i32>> {
        let pids = self.manager.get_all_pids().map_err(|e| anyhow::anyhow!("{e}")).context("listing processes")?;
        Ok(pids.into_iter().map(|p| p.as_raw()).collect())
    }

    pub fn usage(&self) -> Result<Usage> {
        // cgroup v2 (the guest's): read the files themselves; the library
        // also wants the PSI files, which a kernel without CONFIG_PSI lacks.
        if Path::new(CGROUP_ROOT).join("cgroup.controllers").exists() {
            let rel = self.path.strip_prefix("/").unwrap_or(&self.path);
            return v2_usage(&Path::new(CGROUP_ROOT).join(rel)).map(|u| Usage { oom_kills: self.oom_kills(), ..u });
        }
        let s = self.manager.stats().map_err(|e| anyhow::anyhow!("{e}")).context("reading cgroup stats")?;
        let inactive_file = s
            .memory
            .stats
            .get("inactive_file")
            .or_else(|| s.memory.stats.get("total_inactive_file"))
            .copied()
            .unwrap_or(0);
        let (mut read, mut write) = (0, 0);
        for d in &s.blkio.service_bytes {
            match d.op_type.as_deref() {
                Some("read") | Some("Read") => read += d.value,
                Some("write") | Some("Write") => write += d.value,
                _ => {}
            }
        }
        Ok(Usage {
            cpu_usage_ns: s.cpu.usage.usage_total,
            cpu_user_ns: s.cpu.usage.usage_user,
            cpu_system_ns: s.cpu.usage.usage_kernel,
            memory_usage: s.memory.memory.usage,
            memory_limit: limit_or_zero(s.memory.memory.limit),
            memory_working_set: s.memory.memory.usage.saturating_sub(inactive_file),
            pids_current: s.pids.current,
            pids_limit: limit_or_zero(s.pids.limit),
            io_read_bytes: read,
            io_write_bytes: write,
            oom_kills: self.oom_kills(),
        })
    }

    /// How many processes the kernel OOM-killed in this cgroup so far.
    pub fn oom_kills(&self) -> u64 {
        let rel = self.path.strip_prefix("/").unwrap_or(&self.path);
        let candidates = [
            Path::new(CGROUP_ROOT).join(rel).join("memory.events"),
            Path::new(CGROUP_ROOT).join("memory").join(rel).join("memory.oom_control"),
        ];
        for file in candidates {
            if let Ok(text) = std::fs::read_to_string(&file) {
                return text
                    .lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
            }
        }
        0
    }
}

/// The `key value` lines of a cgroup v2 file (`cpu.stat`, `memory.stat`).
fn keyed(text: &str) -> std::collections::HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// A single-value cgroup v2 file; "max" (no limit) and absence read as 0.
fn single(dir: &Path, file: &str) -> u64 {
    std::fs::read_to_string(dir.join(file)).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
}

fn v2_usage(dir: &Path) -> Result<Usage> {
    let cpu = keyed(
        &std::fs::read_to_string(dir.join("cpu.stat"))
            .with_context(|| format!("reading {}/cpu.stat", dir.display()))?,
    );
    let memory = keyed(&std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default());
    let usage = single(dir, "memory.current");
    let (mut read, mut write) = (0, 0);
    for line in std::fs::read_to_string(dir.join("io.stat")).unwrap_or_default().lines() {
        for field in line.split_whitespace().skip(1) {
            match field.split_once('=') {
                Some(("rbytes", v)) => read += v.parse::<u64>().unwrap_or(0),
                Some(("wbytes", v)) => write += v.parse::<u64>().unwrap_or(0),
                _ => {}
            }
        }
    }
    let us = |k: &str| cpu.get(k).copied().unwrap_or(0) * 1000;
    Ok(Usage {
        cpu_usage_ns: us("usage_usec"),
        cpu_user_ns: us("user_usec"),
        cpu_system_ns: us("system_usec"),
        memory_usage: usage,
        memory_limit: single(dir, "memory.max"),
        memory_working_set: usage.saturating_sub(memory.get("inactive_file").copied().unwrap_or(0)),
        pids_current: single(dir, "pids.current"),
        pids_limit: single(dir, "pids.max"),
        io_read_bytes: read,
        io_write_bytes: write,
        oom_kills: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_v2_files_are_read_without_pressure_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n").unwrap();
        std::fs::write(d.join("memory.current"), "4096\n").unwrap();
        std::fs::write(d.join("memory.max"), "max\n").unwrap();
        std::fs::write(d.join("memory.stat"), "anon 1024\ninactive_file 1024\n").unwrap();
        std::fs::write(d.join("pids.current"), "3\n").unwrap();
        std::fs::write(d.join("io.stat"), "254:0 rbytes=10 wbytes=20 rios=1 wios=2\n").unwrap();
        let u = v2_usage(d).unwrap();
        assert_eq!((u.cpu_usage_ns, u.cpu_user_ns, u.cpu_system_ns), (1_500_000, 1_000_000, 500_000));
        assert_eq!((u.memory_usage, u.memory_limit, u.memory_working_set), (4096, 0, 3072));
        assert_eq!((u.pids_current, u.pids_limit, u.io_read_bytes, u.io_write_bytes), (3, 0, 10, 20));
        assert!(v2_usage(&d.join("missing")).is_err());
    }
}
