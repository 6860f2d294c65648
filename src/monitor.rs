//! `runv monitor --metrics-address ADDR`: one Prometheus endpoint for every
//! runv sandbox on the node that containerd runs (as kata-monitor serves
//! Kata's shims). Each containerd-shim-runv-v2 records its sandbox's
//! figures and processes in its state directory
//! (`runtime_dir/shim/<namespace>/<id>`); the monitor reads them at each
//! scrape, so it holds no state of its own worth keeping, talks to no shim
//! and no guest, and a hung or dead shim cannot hold up a scrape.
//!
//! Served: `runv_monitor_up`, `runv_monitor_sandboxes` (by containerd namespace), the VM boot
//! histogram `runv_vm_boot_duration_seconds` by backend (each sandbox
//! counted once, when first seen), and per sandbox: its agent calls
//! (`runv_agent_call_duration_seconds`, `runv_agent_call_errors_total`),
//! its boot (`runv_sandbox_vm_boot_seconds`), and its host processes'
//! resident memory and CPU time (`runv_sandbox_host_resident_memory_bytes`,
//! `runv_sandbox_host_cpu_seconds_total`, the same names `runv cri`
//! serves).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use prometheus::{CounterVec, GaugeVec, HistogramOpts, HistogramVec, IntGaugeVec, Opts, Registry};

use crate::figures::{host_processes, proc_usage, SandboxFigures};

/// The most sandbox directories read in one scrape (a node runs far fewer
/// pods; the directory is root's, but a bound keeps a scrape bounded).
const MAX_SANDBOXES: usize = 4096;

pub struct Monitor {
    shim_root: PathBuf,
    registry: Registry,
    sandboxes: IntGaugeVec,
    vm_boot: HistogramVec,
    host_rss: GaugeVec,
    host_cpu: CounterVec,
    up: prometheus::Gauge,
    /// Sandboxes whose boot is already in `vm_boot`.
    seen: Mutex<HashSet<String>>,
}

/// One sandbox as found on disk.
struct Found {
    id: String,
    namespace: String,
    dir: PathBuf,
    /// Its live processes, by name.
    processes: Vec<(String, u32)>,
}

impl Monitor {
    /// A monitor of the shims whose state is under `runtime_dir`.
    pub fn new(runtime_dir: &Path) -> Result<Self, prometheus::Error> {
        let (host_rss, host_cpu) = crate::figures::host_process_metrics()?;
        let m = Monitor {
            shim_root: runtime_dir.join("shim"),
            registry: Registry::new(),
            sandboxes: IntGaugeVec::new(
                Opts::new("runv_monitor_sandboxes", "Running runv sandboxes, by containerd namespace"),
                &["containerd_namespace"],
            )?,
            vm_boot: HistogramVec::new(
                HistogramOpts::new(
                    "runv_vm_boot_duration_seconds",
                    "Time from VM start to the guest agent's readiness, as each shim measured it, by backend",
                )
                .buckets(vec![0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0]),
                &["backend"],
            )?,
            host_rss,
            host_cpu,
            up: prometheus::Gauge::new("runv_monitor_up", "1 while runv monitor serves")?,
            seen: Mutex::new(HashSet::new()),
        };
        for c in [
            Box::new(m.sandboxes.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.vm_boot.clone()),
            Box::new(m.host_rss.clone()),
            Box::new(m.host_cpu.clone()),
            Box::new(m.up.clone()),
        ] {
            m.registry.register(c)?;
        }
        m.up.set(1.0);
        Ok(m)
    }

    /// Every sandbox directory with a live process in it.
    fn find(&self) -> Vec<Found> {
        let mut found = Vec::new();
        for ns in std::fs::read_dir(&self.shim_root).into_iter().flatten().flatten() {
            let namespace = ns.file_name().to_string_lossy().into_owned();
            for sb in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                if found.len() >= MAX_SANDBOXES {
                    tracing::warn!("more than {MAX_SANDBOXES} sandbox directories under {}", self.shim_root.display());
                    return found;
                }
                let dir = sb.path();
                let processes = if dir.is_dir() { host_processes(&dir) } else { Vec::new() };
                if !processes.is_empty() {
                    let id = sb.file_name().to_string_lossy().into_owned();
                    found.push(Found { id, namespace: namespace.clone(), dir, processes });
                }
            }
        }
        found
    }

    /// Reads every sandbox's record and processes, and encodes the lot.
    pub fn scrape(&self) -> String {
        let found = self.find();
        self.sandboxes.reset();
        self.host_rss.reset();
        self.host_cpu.reset();
        let mut recorded = Vec::new();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for f in &found {
            self.sandboxes.with_label_values(&[f.namespace.as_str()]).inc();
            let figures = SandboxFigures::read(&f.dir).unwrap_or_default();
            for (name, pid) in &f.processes {
                let Some((rss, cpu)) = proc_usage(*pid) else { continue };
                let labels = [f.id.as_str(), figures.pod.as_str(), figures.namespace.as_str(), name.as_str()];
                self.host_rss.with_label_values(&labels).add(rss as f64);
                self.host_cpu.with_label_values(&labels).inc_by(cpu);
            }
            if !figures.backend.is_empty() {
                if seen.insert(f.id.clone()) {
                    self.vm_boot.with_label_values(&[figures.backend.as_str()]).observe(figures.boot_seconds);
                }
                recorded.push((f.id.clone(), figures));
            }
        }
        // Forget what is gone, so the set stays as large as the node's pods.
        seen.retain(|id| found.iter().any(|f| &f.id == id));
        drop(seen);
        crate::figures::encode(&self.registry, &recorded)
    }
}

/// Serves `GET /metrics` on `address` until SIGINT or SIGTERM.
pub async fn serve(address: &str, runtime_dir: &Path) -> anyhow::Result<()> {
    let monitor = Arc::new(Monitor::new(runtime_dir)?);
    let bound = crate::cri::metrics::serve_text(address, move || {
        let monitor = monitor.clone();
        async move { tokio::task::spawn_blocking(move || monitor.scrape()).await.unwrap_or_default() }
    })
    .await?;
    eprintln!(
        "runv monitor: sandboxes under {}, metrics on http://{bound}/metrics",
        runtime_dir.join("shim").display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sandbox_with_a_live_process_is_served_once_and_a_dead_one_is_not() {
        let root = tempfile::tempdir().unwrap();
        let live = root.path().join("shim/k8s.io/aaa");
        let dead = root.path().join("shim/k8s.io/bbb");
        for d in [&live, &dead] {
            std::fs::create_dir_all(d).unwrap();
            SandboxFigures { backend: "qemu/tcg".into(), boot_seconds: 2.5, ..Default::default() }.write(d).unwrap();
        }
        // This process stands for the live sandbox's VM; the dead one's
        // pid record names a process that is not there.
        let me = crate::helper::ProcessIdentity::of(std::process::id()).unwrap();
        std::fs::write(live.join("pids"), me.record()).unwrap();
        let gone = crate::helper::ProcessIdentity { start_time: me.start_time + 1, ..me };
        std::fs::write(dead.join("pids"), gone.record()).unwrap();

        let monitor = Monitor::new(root.path()).unwrap();
        let text = monitor.scrape();
        assert!(text.contains("runv_monitor_up 1"), "{text}");
        assert!(text.contains(r#"runv_monitor_sandboxes{containerd_namespace="k8s.io"} 1"#), "{text}");
        assert!(
            text.contains(r#"runv_sandbox_vm_boot_seconds{backend="qemu/tcg",namespace="",pod="",sandbox="aaa"} 2.5"#),
            "{text}"
        );
        assert!(!text.contains(r#"sandbox="bbb""#), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("runv_sandbox_host_resident_memory_bytes{") && l.contains(r#"sandbox="aaa""#)),
            "{text}"
        );
        // A second scrape does not count the same boot again.
        let text = monitor.scrape();
        assert!(text.contains(r#"runv_vm_boot_duration_seconds_count{backend="qemu/tcg"} 1"#), "{text}");
    }
}
