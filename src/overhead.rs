//! `runv overhead`: what a pod costs beyond its containers, measured on a
//! real sandbox (with its pause process), and the RuntimeClass whose
//! `overhead.podFixed` covers it.
//!
//! Parts, each counted once:
//! - guest memory reserved at boot: the VM's RAM that the guest kernel
//!   never hands to its allocator (its own image, the page map of every
//!   RAM page, early tables): the VM's memory size - MemTotal. The host
//!   backs it (the VMM writes the image, the kernel initialises the page
//!   map), and no container can use it;
//! - guest kernel (in use): guest memory in use that is neither
//!   reclaimable cache nor process memory (kernel, slab, page tables, and
//!   any tmpfs): MemTotal - MemFree - Buffers - (Cached - Shmem) -
//!   AnonPages - SReclaimable;
//! - agent: its anonymous resident memory and the pages of its binary it
//!   keeps mapped (page cache of its read-only disk root, which the line
//!   above leaves out as cache, though the agent needs them resident);
//! - pause: its anonymous resident memory in the guest;
//! - host processes (VMM, virtiofsd, vhost-device-vsock, and the process
//!   owning the sandbox, which stands for the shim): their proportional set
//!   size without shared memory (guest RAM is mapped shared by all of them
//!   and is already counted inside the guest).

use std::time::Duration;

use serde::Serialize;

use crate::config::Config;
use crate::sandbox::{Sandbox, SandboxSpec};

#[derive(Clone, Debug, Serialize)]
pub struct Part {
    pub name: String,
    /// "guest" or "host".
    pub side: &'static str,
    pub memory_kib: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Overhead {
    pub parts: Vec<Part>,
    pub total_memory_kib: u64,
    /// CPU the idle sandbox's host processes used over the window.
    pub idle_cpu_millicores: u64,
    pub window_secs: f64,
    pub hypervisor: String,
}

/// Boots a sandbox with a pause process, lets it settle, measures it, and
/// tears it down.
pub async fn measure(config: &Config, settle: Duration, window: Duration) -> anyhow::Result<Overhead> {
    let spec = SandboxSpec {
        shared_dir: config.rootfs.clone(),
        read_only: true,
        vcpus: config.vcpus,
        memory_mib: config.memory_mib,
        netns: None,
        cgroup: None,
        dir_record: None,
    };
    let sandbox = Sandbox::start(config, &spec).await?;
    let result = measure_sandbox(&sandbox, spec.memory_mib, settle, window).await;
    sandbox.shutdown().await;
    result
}

async fn measure_sandbox(
    sandbox: &Sandbox,
    memory_mib: u32,
    settle: Duration,
    window: Duration,
) -> anyhow::Result<Overhead> {
    let agent = sandbox.agent();
    let req =
        runv_proto::agent::CreateSandboxRequest { hostname: "overhead".into(), pause: true, ..Default::default() };
    agent.create_sandbox(&req).await?;
    tokio::time::sleep(settle).await;

    let mut pids: Vec<(String, u32)> = sandbox.pids().into_iter().map(|pid| (process_name(pid), pid)).collect();
    pids.push(("runv (sandbox owner; the shim in containerd)".into(), std::process::id()));
    let cpu_before: u64 = pids.iter().map(|(_, pid)| cpu_ticks(*pid)).sum();
    let started = std::time::Instant::now();
    tokio::time::sleep(window).await;
    let cpu_after: u64 = pids.iter().map(|(_, pid)| cpu_ticks(*pid)).sum();
    let window_secs = started.elapsed().as_secs_f64();
    // SAFETY: sysconf has no preconditions.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cores = cpu_after.saturating_sub(cpu_before) as f64 / ticks_per_sec / window_secs;

    let details = agent.guest_details().await?;
    let m = details.memory.clone().unwrap_or_default();
    let mut parts = guest_kernel_parts(memory_mib, &m)?;
    parts.extend(guest_process_parts(memory_mib, &details)?);
    for (name, pid) in &pids {
        parts.push(Part { name: name.clone(), side: "host", memory_kib: private_pss_kib(*pid) });
    }
    let total_memory_kib = parts.iter().fold(0u64, |sum, p| sum.saturating_add(p.memory_kib));
    Ok(Overhead {
        parts,
        total_memory_kib,
        idle_cpu_millicores: (cores * 1000.0).ceil() as u64,
        window_secs,
        hypervisor: sandbox.describe_hypervisor(),
    })
}

/// The guest kernel's two parts from its /proc/meminfo figures, in a VM
/// of `memory_mib`: what it reserved at boot, and what it holds in use.
fn guest_kernel_parts(memory_mib: u32, m: &runv_proto::agent::MemoryInfo) -> anyhow::Result<Vec<Part>> {
    let ram_kib = u64::from(memory_mib) * 1024;
    if m.total_kib == 0 || m.total_kib > ram_kib {
        anyhow::bail!("the guest reports MemTotal {} KiB in a VM of {ram_kib} KiB", m.total_kib);
    }
    let in_use = m
        .total_kib
        .saturating_sub(m.free_kib)
        .saturating_sub(m.buffers_kib)
        .saturating_sub(m.cached_kib.saturating_sub(m.shmem_kib))
        .saturating_sub(m.anon_pages_kib)
        .saturating_sub(m.slab_reclaimable_kib);
    Ok(vec![
        Part {
            name: "guest kernel image, page map (reserved)".into(),
            side: "guest",
            memory_kib: ram_kib - m.total_kib,
        },
        Part { name: "guest kernel (in use)".into(), side: "guest", memory_kib: in_use },
    ])
}

/// The agent's and the pause process's parts, as the guest reports them:
/// the agent's own memory and the pages of its binary it keeps resident
/// (page cache of its disk root, which the kernel's in-use figure leaves
/// out as reclaimable cache). A figure larger than the VM's RAM is the
/// guest's error (or a lie), refused rather than summed.
fn guest_process_parts(
    memory_mib: u32,
    details: &runv_proto::agent::GuestDetailsResponse,
) -> anyhow::Result<Vec<Part>> {
    let ram_kib = u64::from(memory_mib) * 1024;
    let figure = |what: &str, kib: u64| {
        if kib > ram_kib {
            anyhow::bail!("the guest reports {what} of {kib} KiB in a VM of {ram_kib} KiB");
        }
        Ok(kib)
    };
    let agent = figure("the agent's anonymous memory", details.agent_anon_rss_kib)?
        + figure("the agent's resident file pages", details.agent_file_rss_kib)?;
    Ok(vec![
        Part { name: "agent (and its binary's resident pages)".into(), side: "guest", memory_kib: agent },
        Part {
            name: "pause".into(),
            side: "guest",
            memory_kib: figure("the pause process's memory", details.pause_anon_rss_kib)?,
        },
    ])
}

fn process_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| pid.to_string())
}

/// utime + stime of a process, in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    // The command name may hold spaces; fields resume after its ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 of the full line, utime 14, stime 15.
    let get = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(14) + get(15)
}

/// Proportional set size without shared memory (guest RAM), in KiB.
fn private_pss_kib(pid: u32) -> u64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else { return 0 };
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field("Pss_Anon") + field("Pss_File")
}

impl Overhead {
    /// PodFixed memory in MiB: the total with `margin_percent` added,
    /// rounded up.
    pub fn pod_fixed_memory_mib(&self, margin_percent: u32) -> u64 {
        let kib = self.total_memory_kib.saturating_mul(u64::from(100 + margin_percent));
        kib.div_ceil(100 * 1024)
    }

    /// PodFixed CPU in millicores, likewise; at least 10m.
    pub fn pod_fixed_cpu_millicores(&self, margin_percent: u32) -> u64 {
        (self.idle_cpu_millicores * u64::from(100 + margin_percent)).div_ceil(100).max(10)
    }

    pub fn table(&self, margin_percent: u32) -> String {
        let mut out = format!("{:<48} {:<6} {:>10}\n", "part", "side", "memory");
        for p in &self.parts {
            out += &format!("{:<48} {:<6} {:>6.1} MiB\n", p.name, p.side, p.memory_kib as f64 / 1024.0);
        }
        out += &format!(
            "idle CPU of the host processes over {:.0} s: {} m ({})\n",
            self.window_secs, self.idle_cpu_millicores, self.hypervisor
        );
        out += &format!(
            "RuntimeClass overhead.podFixed ({margin_percent}% margin): memory {}Mi, cpu {}m\n",
            self.pod_fixed_memory_mib(margin_percent),
            self.pod_fixed_cpu_millicores(margin_percent)
        );
        out += &format!("total PodFixed memory: {:.1} MiB\n", self.total_memory_kib as f64 / 1024.0);
        out
    }

    /// A `node.k8s.io/v1` RuntimeClass for handler `runv` carrying the
    /// measured overhead, scheduled onto nodes labelled for runv.
    pub fn runtime_class_yaml(&self, margin_percent: u32) -> String {
        format!(
            "# Measured by `runv overhead` ({}): {:.1} MiB in total, {}% margin added.\n\
             apiVersion: node.k8s.io/v1\n\
             kind: RuntimeClass\n\
             metadata:\n  name: runv\n\
             handler: runv\n\
             overhead:\n  podFixed:\n    memory: \"{}Mi\"\n    cpu: \"{}m\"\n\
             scheduling:\n  nodeSelector:\n    runv.io/runtime: \"true\"\n  tolerations:\n    - key: runv.io/runtime\n      operator: Exists\n      effect: NoSchedule\n",
            self.hypervisor,
            self.total_memory_kib as f64 / 1024.0,
            margin_percent,
            self.pod_fixed_memory_mib(margin_percent),
            self.pod_fixed_cpu_millicores(margin_percent)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Overhead {
        Overhead {
            parts: vec![
                Part { name: "a".into(), side: "guest", memory_kib: 10 * 1024 },
                Part { name: "b".into(), side: "host", memory_kib: 5 * 1024 + 1 },
            ],
            total_memory_kib: 15 * 1024 + 1,
            idle_cpu_millicores: 3,
            window_secs: 2.0,
            hypervisor: "qemu/tcg".into(),
        }
    }

    #[test]
    fn the_guest_kernel_counts_what_it_reserved_at_boot_and_what_it_holds() {
        // A 256 MiB guest as runv's kernel reports itself idle.
        let m = runv_proto::agent::MemoryInfo {
            total_kib: 245_632,
            free_kib: 225_392,
            buffers_kib: 0,
            cached_kib: 9_160,
            shmem_kib: 7_660,
            anon_pages_kib: 1_336,
            slab_reclaimable_kib: 0,
            ..Default::default()
        };
        let parts = guest_kernel_parts(256, &m).unwrap();
        assert_eq!(parts[0].memory_kib, 262_144 - 245_632);
        assert_eq!(parts[1].memory_kib, 245_632 - 225_392 - (9_160 - 7_660) - 1_336);
        // A MemTotal past the VM's size is no figure to publish.
        let wrong = runv_proto::agent::MemoryInfo { total_kib: 300_000, ..m };
        assert!(guest_kernel_parts(256, &wrong).unwrap_err().to_string().contains("MemTotal 300000"));
    }

    /// A guest that reports its processes' memory as u64::MAX (a wrapping
    /// sum would publish a tiny PodFixed) is refused with the figure named.
    #[test]
    fn a_guest_reporting_more_memory_than_its_vm_has_is_refused() {
        let honest = runv_proto::agent::GuestDetailsResponse {
            agent_anon_rss_kib: 900,
            agent_file_rss_kib: 3_000,
            pause_anon_rss_kib: 400,
            ..Default::default()
        };
        let parts = guest_process_parts(128, &honest).unwrap();
        assert_eq!((parts[0].memory_kib, parts[1].memory_kib), (3_900, 400));
        let lying = runv_proto::agent::GuestDetailsResponse { agent_file_rss_kib: u64::MAX, ..honest.clone() };
        let err = guest_process_parts(128, &lying).unwrap_err().to_string();
        assert!(err.contains("resident file pages") && err.contains(&u64::MAX.to_string()), "{err}");
        let lying = runv_proto::agent::GuestDetailsResponse { pause_anon_rss_kib: 128 * 1024 + 1, ..honest };
        assert!(guest_process_parts(128, &lying).unwrap_err().to_string().contains("pause"));
    }

    #[test]
    fn pod_fixed_rounds_up_with_the_margin() {
        let o = sample();
        assert_eq!(o.pod_fixed_memory_mib(0), 16);
        assert_eq!(o.pod_fixed_memory_mib(10), 17);
        assert_eq!(o.pod_fixed_cpu_millicores(10), 10);
    }

    #[test]
    fn the_table_ends_with_the_total_and_the_yaml_carries_the_overhead() {
        let o = sample();
        assert_eq!(o.table(10).lines().last(), Some("total PodFixed memory: 15.0 MiB"));
        let yaml = o.runtime_class_yaml(10);
        assert!(yaml.contains("handler: runv\n") && yaml.contains("memory: \"17Mi\"") && yaml.contains("cpu: \"10m\""));
    }

    #[test]
    fn cpu_ticks_reads_a_process_with_spaces_and_parentheses_in_its_name() {
        // A busy shell whose name ("a b) (c") would derail a parser that
        // splits /proc/PID/stat at the first ')' or on spaces.
        let dir = tempfile::tempdir().unwrap();
        let sh = dir.path().join("a b) (c");
        // A symlink, not a copy: the name comes from the path exec'd, and a
        // copy written here could still be open for writing in a child
        // another test forks at that moment (exec then fails with ETXTBSY).
        std::os::unix::fs::symlink("/bin/sh", &sh).unwrap();
        let mut child = std::process::Command::new(&sh).args(["-c", "while :; do :; done"]).spawn().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut ticks = 0;
        while ticks == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
            ticks = cpu_ticks(child.id());
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(ticks > 0, "no CPU time read for a busy process named {:?}", sh.file_name().unwrap());
        assert_eq!(cpu_ticks(u32::MAX), 0);
    }
}
