//! What a sandbox's host side measures of itself: how long its VM took to
//! boot on which backend, and every agent call with a deadline (latency,
//! errors, timeouts), by call. The process that runs the sandbox (a shim,
//! `runv run`) keeps them and writes them as a record (`figures.json`) in
//! its state directory; `runv cri` and `runv monitor` read the records and
//! serve them as Prometheus metrics (`families`).
//!
//! The record is written by a host process, but it is read back by another
//! one, so reading it is capped and a record that does not parse is
//! skipped: it is never trusted to size anything.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::proto::{Bucket, Counter, Histogram, LabelPair, Metric, MetricFamily, MetricType};
use serde::{Deserialize, Serialize};

/// Upper bounds of the agent call latency buckets, seconds (an agent call
/// under KVM takes around a millisecond; under nested TCG, seconds).
pub const CALL_BUCKETS: [f64; 13] = [0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];

/// The name of the record in a sandbox owner's state directory.
pub const RECORD: &str = "figures.json";

/// The most of a record that is read (a record holds one entry per call
/// name, a few KiB).
const RECORD_MAX: u64 = 256 << 10;

/// One agent call's figures since the sandbox started.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CallFigures {
    pub count: u64,
    pub sum_seconds: f64,
    /// Calls per bucket of `CALL_BUCKETS` (not cumulative); calls slower
    /// than the last bound are counted in `count` only.
    pub buckets: Vec<u64>,
    /// Calls that failed, timeouts included.
    pub errors: u64,
    /// Calls whose deadline passed with no answer.
    pub timeouts: u64,
}

/// A sandbox's figures, as recorded.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SandboxFigures {
    /// The backend the VM ran on (`builtin`, `qemu/tcg`, `qemu/kvm`).
    pub backend: String,
    /// VM start to the agent's readiness, seconds.
    pub boot_seconds: f64,
    /// The Kubernetes pod and namespace, where known.
    #[serde(default)]
    pub pod: String,
    #[serde(default)]
    pub namespace: String,
    pub agent_calls: BTreeMap<String, CallFigures>,
}

/// The agent calls of one sandbox, counted as they happen.
#[derive(Clone, Debug, Default)]
pub struct CallRecorder(Arc<Mutex<BTreeMap<&'static str, CallFigures>>>);

/// How an agent call ended.
pub enum Outcome {
    Ok,
    Failed,
    TimedOut,
}

impl CallRecorder {
    pub fn record(&self, call: &'static str, took: Duration, outcome: Outcome) {
        let mut calls = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let f = calls.entry(call).or_default();
        let secs = took.as_secs_f64();
        f.count += 1;
        f.sum_seconds += secs;
        f.buckets.resize(CALL_BUCKETS.len(), 0);
        if let Some(i) = CALL_BUCKETS.iter().position(|b| secs <= *b) {
            f.buckets[i] += 1;
        }
        match outcome {
            Outcome::Ok => {}
            Outcome::Failed => f.errors += 1,
            Outcome::TimedOut => {
                f.errors += 1;
                f.timeouts += 1;
            }
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, CallFigures> {
        let calls = self.0.lock().unwrap_or_else(|e| e.into_inner());
        calls.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }
}

impl SandboxFigures {
    /// Writes the record into `dir` (0600, replaced whole: a reader sees
    /// the old record or the new one).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join(format!(".{RECORD}.tmp"));
        crate::helper::write_private(&tmp, &serde_json::to_vec(self).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, dir.join(RECORD))
    }

    /// The record in `dir`, if there is one that parses.
    pub fn read(dir: &Path) -> Option<Self> {
        use std::io::Read;
        let file = std::fs::File::open(dir.join(RECORD)).ok()?;
        let mut text = Vec::new();
        file.take(RECORD_MAX).read_to_end(&mut text).ok()?;
        serde_json::from_slice(&text).ok()
    }
}

/// The live processes a sandbox owner recorded in `dir` (its `pids`
/// record: only those still the processes it started), each with its
/// name from `/proc`.
pub fn host_processes(dir: &Path) -> Vec<(String, u32)> {
    let text = std::fs::read_to_string(dir.join("pids")).unwrap_or_default();
    text.lines()
        .filter_map(crate::helper::ProcessIdentity::parse)
        .filter(|p| p.is_alive())
        .map(|p| {
            let comm = std::fs::read_to_string(format!("/proc/{}/comm", p.pid)).unwrap_or_default();
            (comm.trim().to_string(), p.pid)
        })
        .collect()
}

/// The host processes' figures per sandbox, as `runv cri` and `runv
/// monitor` both serve them: resident memory and CPU time by process.
pub fn host_process_metrics() -> Result<(prometheus::GaugeVec, prometheus::CounterVec), prometheus::Error> {
    let labels = ["sandbox", "pod", "namespace", "process"];
    let rss = prometheus::GaugeVec::new(
        prometheus::Opts::new(
            "runv_sandbox_host_resident_memory_bytes",
            "Resident memory of a sandbox's host processes (the VM's is its guest's memory as the host sees it), by process",
        ),
        &labels,
    )?;
    let cpu = prometheus::CounterVec::new(
        prometheus::Opts::new(
            "runv_sandbox_host_cpu_seconds_total",
            "CPU time of a sandbox's host processes (vCPUs included), by process",
        ),
        &labels,
    )?;
    Ok((rss, cpu))
}

/// A process's resident bytes and CPU seconds (user + system), from /proc.
pub fn proc_usage(pid: u32) -> Option<(u64, f64)> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split(' ').nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let (page, hz) = unsafe { (libc::sysconf(libc::_SC_PAGESIZE), libc::sysconf(libc::_SC_CLK_TCK)) };
    let ticks = crate::overhead::cpu_ticks(pid);
    Some((pages * page.max(1) as u64, ticks as f64 / hz.max(1) as f64))
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}

/// A series with `labels`, in name order (as the prometheus crate's own
/// collectors write them).
fn series(mut labels: Vec<LabelPair>) -> Metric {
    labels.sort_by(|a, b| a.name().cmp(b.name()));
    Metric::from_label(labels)
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

/// Per-sandbox metric families of `sandboxes` (each with its sandbox id):
/// `runv_agent_call_duration_seconds` (a histogram by call) and
/// `runv_agent_call_errors_total` (by call and kind), labelled with the
/// sandbox, its pod and namespace, and `runv_sandbox_vm_boot_seconds` (by
/// backend). Families with no series are left out.
pub fn families(sandboxes: &[(String, SandboxFigures)]) -> Vec<MetricFamily> {
    let (mut calls, mut errors, mut boots) = (Vec::new(), Vec::new(), Vec::new());
    for (id, f) in sandboxes {
        let base = || vec![label("sandbox", id), label("pod", &f.pod), label("namespace", &f.namespace)];
        let mut boot = series([base(), vec![label("backend", &f.backend)]].concat());
        let mut gauge = prometheus::proto::Gauge::default();
        gauge.set_value(f.boot_seconds);
        boot.set_gauge(gauge);
        boots.push(boot);
        for (call, c) in &f.agent_calls {
            let mut h = Histogram::default();
            h.set_sample_count(c.count);
            h.set_sample_sum(c.sum_seconds);
            let mut cumulative = 0;
            h.set_bucket(
                CALL_BUCKETS
                    .iter()
                    .enumerate()
                    .map(|(i, bound)| {
                        cumulative += c.buckets.get(i).copied().unwrap_or(0);
                        let mut b = Bucket::default();
                        b.set_upper_bound(*bound);
                        b.set_cumulative_count(cumulative.min(c.count));
                        b
                    })
                    .collect(),
            );
            let mut m = series([base(), vec![label("call", call)]].concat());
            m.set_histogram(h);
            calls.push(m);
            for (kind, n) in [("timeout", c.timeouts), ("error", c.errors.saturating_sub(c.timeouts))] {
                let mut counter = Counter::default();
                counter.set_value(n as f64);
                let mut m = series([base(), vec![label("call", call), label("kind", kind)]].concat());
                m.set_counter(counter);
                errors.push(m);
            }
        }
    }
    [
        family(
            "runv_agent_call_duration_seconds",
            "Time a guest agent call with a deadline took, measured by the sandbox's owner (shim or runv run), by call",
            MetricType::HISTOGRAM,
            calls,
        ),
        family(
            "runv_agent_call_errors_total",
            "Guest agent calls that failed, by call and kind (timeout: no answer before the deadline; error: any other)",
            MetricType::COUNTER,
            errors,
        ),
        family(
            "runv_sandbox_vm_boot_seconds",
            "Time from VM start to the guest agent's readiness, by the backend the VM ran on",
            MetricType::GAUGE,
            boots,
        ),
    ]
    .into_iter()
    .filter(|f| !f.get_metric().is_empty())
    .collect()
}

/// `registry`'s metrics and the per-sandbox families of `sandboxes`, in
/// the Prometheus text format.
pub fn encode(registry: &prometheus::Registry, sandboxes: &[(String, SandboxFigures)]) -> String {
    use prometheus::Encoder;
    let mut all = registry.gather();
    all.extend(families(sandboxes));
    let mut out = Vec::new();
    if let Err(e) = prometheus::TextEncoder::new().encode(&all, &mut out) {
        tracing::warn!("encoding metrics: {e}");
    }
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_bucketed_and_a_record_round_trips_and_encodes() {
        let calls = CallRecorder::default();
        calls.record("exec_process", Duration::from_millis(3), Outcome::Ok);
        calls.record("exec_process", Duration::from_millis(300), Outcome::Failed);
        calls.record("exec_process", Duration::from_secs(200), Outcome::TimedOut);
        let f = SandboxFigures {
            backend: "qemu/tcg".into(),
            boot_seconds: 1.5,
            pod: "web".into(),
            namespace: "default".into(),
            agent_calls: calls.snapshot(),
        };
        let c = &f.agent_calls["exec_process"];
        assert_eq!((c.count, c.errors, c.timeouts), (3, 2, 1));
        assert_eq!(c.buckets.iter().sum::<u64>(), 2, "the 200 s call is past the last bucket");
        let dir = tempfile::tempdir().unwrap();
        f.write(dir.path()).unwrap();
        assert_eq!(SandboxFigures::read(dir.path()), Some(f.clone()));
        std::fs::write(dir.path().join(RECORD), b"{not json").unwrap();
        assert_eq!(SandboxFigures::read(dir.path()), None);

        let mut text = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &families(&[("abc".into(), f)]), &mut text)
            .unwrap();
        let text = String::from_utf8(text).unwrap();
        for line in [
            r#"runv_agent_call_duration_seconds_bucket{call="exec_process",namespace="default",pod="web",sandbox="abc",le="0.005"} 1"#,
            r#"runv_agent_call_duration_seconds_bucket{call="exec_process",namespace="default",pod="web",sandbox="abc",le="0.5"} 2"#,
            r#"runv_agent_call_duration_seconds_bucket{call="exec_process",namespace="default",pod="web",sandbox="abc",le="+Inf"} 3"#,
            r#"runv_agent_call_duration_seconds_count{call="exec_process",namespace="default",pod="web",sandbox="abc"} 3"#,
            r#"runv_agent_call_errors_total{call="exec_process",kind="timeout",namespace="default",pod="web",sandbox="abc"} 1"#,
            r#"runv_agent_call_errors_total{call="exec_process",kind="error",namespace="default",pod="web",sandbox="abc"} 1"#,
            r#"runv_sandbox_vm_boot_seconds{backend="qemu/tcg",namespace="default",pod="web",sandbox="abc"} 1.5"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in:\n{text}");
        }
    }
}
