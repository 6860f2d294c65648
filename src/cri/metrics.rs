//! `runv cri`'s Prometheus metrics (`runv cri --metrics-address`), in the
//! Prometheus text format (the `prometheus` crate's encoder), and the same
//! figures for the CRI's `ListMetricDescriptors`/`ListPodSandboxMetrics`.
//!
//! Counted as they happen: pod starts and VM boots (histograms, by the
//! backend the shim ran the VM on), task API calls to the
//! shims (each one an agent call in the guest: latency by call, errors by
//! call and code), image pulls (by result) and their bytes, streaming
//! sessions opened (by kind). Read at each scrape: sandboxes and
//! containers by state, each ready sandbox's guest CPU time and working set
//! (from its containers' cgroups in the guest), and each sandbox's host
//! processes (VM, virtiofsd, vsock device, shim) by resident memory and
//! CPU time, read from `/proc`, and what each pod's shim recorded of its
//! sandbox (`crate::figures`: agent call latency and errors, boot).

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use k8s_cri::v1::*;
use prometheus::{
    CounterVec, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

use super::runtime::Runtime;
use crate::figures::{proc_usage, SandboxFigures};

pub struct Metrics {
    registry: Registry,
    pub pod_start: HistogramVec,
    pub vm_boot: HistogramVec,
    pub task_calls: HistogramVec,
    pub task_errors: IntCounterVec,
    pub pulls: IntCounterVec,
    pub pull_bytes: prometheus::IntCounter,
    pub streams: IntCounterVec,
    sandboxes: IntGaugeVec,
    containers: IntGaugeVec,
    // Counters set anew at each scrape from cumulative figures (reset,
    // then incremented by the figure).
    guest_cpu: CounterVec,
    guest_memory: GaugeVec,
    host_rss: GaugeVec,
    host_cpu: CounterVec,
    up: Gauge,
}

const SANDBOX_LABELS: [&str; 3] = ["sandbox", "pod", "namespace"];

fn build() -> Result<Metrics, prometheus::Error> {
    let registry = Registry::new();
    // A VM boot under TCG takes seconds; on KVM, well under one.
    let start_buckets = vec![0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0];
    let (host_rss, host_cpu) = crate::figures::host_process_metrics()?;
    let call_buckets = vec![0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];
    let m = Metrics {
        pod_start: HistogramVec::new(
            HistogramOpts::new(
                "runv_pod_start_duration_seconds",
                "Time RunPodSandbox took (pause image, network, VM boot, sandbox container), by the backend its VM ran on (none: no VM booted) and result",
            )
            .buckets(start_buckets.clone()),
            &["backend", "result"],
        )?,
        vm_boot: HistogramVec::new(
            HistogramOpts::new(
                "runv_vm_boot_duration_seconds",
                "Time from VM start to the guest agent's readiness, as the pod's shim measured it, by backend",
            )
            .buckets(start_buckets),
            &["backend"],
        )?,
        task_calls: HistogramVec::new(
            HistogramOpts::new(
                "runv_task_call_duration_seconds",
                "Time a shim task API call took (each reaches the guest agent), by call",
            )
            .buckets(call_buckets),
            &["call"],
        )?,
        task_errors: IntCounterVec::new(
            Opts::new("runv_task_call_errors_total", "Shim task API calls that failed, by call and gRPC code"),
            &["call", "code"],
        )?,
        pulls: IntCounterVec::new(Opts::new("runv_image_pulls_total", "Image pulls, by result"), &["result"])?,
        pull_bytes: prometheus::IntCounter::new(
            "runv_image_pull_bytes_total",
            "Compressed bytes of the layers of images pulled",
        )?,
        streams: IntCounterVec::new(
            Opts::new("runv_stream_sessions_total", "Streaming sessions served, by kind (exec, attach, portforward)"),
            &["kind"],
        )?,
        sandboxes: IntGaugeVec::new(Opts::new("runv_sandboxes", "Pod sandboxes, by state"), &["state"])?,
        containers: IntGaugeVec::new(Opts::new("runv_containers", "Containers, by state"), &["state"])?,
        guest_cpu: CounterVec::new(
            Opts::new("runv_sandbox_guest_cpu_seconds_total", "CPU time of a sandbox's containers in its guest"),
            &SANDBOX_LABELS,
        )?,
        guest_memory: GaugeVec::new(
            Opts::new("runv_sandbox_guest_memory_working_set_bytes", "Working set of a sandbox's containers in its guest"),
            &SANDBOX_LABELS,
        )?,
        host_rss,
        host_cpu,
        up: Gauge::new("runv_cri_up", "1 while runv cri serves")?,
        registry,
    };
    for c in [
        Box::new(m.pod_start.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(m.vm_boot.clone()),
        Box::new(m.task_calls.clone()),
        Box::new(m.task_errors.clone()),
        Box::new(m.pulls.clone()),
        Box::new(m.pull_bytes.clone()),
        Box::new(m.streams.clone()),
        Box::new(m.sandboxes.clone()),
        Box::new(m.containers.clone()),
        Box::new(m.guest_cpu.clone()),
        Box::new(m.guest_memory.clone()),
        Box::new(m.host_rss.clone()),
        Box::new(m.host_cpu.clone()),
        Box::new(m.up.clone()),
    ] {
        m.registry.register(c)?;
    }
    m.up.set(1.0);
    Ok(m)
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| build().expect("metric definitions are valid"));

/// Times one shim task API call: observed when dropped.
pub struct CallTimer {
    call: &'static str,
    began: Instant,
}

impl Drop for CallTimer {
    fn drop(&mut self) {
        METRICS.task_calls.with_label_values(&[self.call]).observe(self.began.elapsed().as_secs_f64());
    }
}

pub fn time_call(call: &'static str) -> CallTimer {
    CallTimer { call, began: Instant::now() }
}

/// Counts a RunPodSandbox: its time, by the backend its VM ran on (from
/// the shim's record, `figures`), and that VM's boot.
pub fn pod_started(took: std::time::Duration, ok: bool, figures: Option<&SandboxFigures>) {
    let backend = figures.map_or("none", |f| f.backend.as_str());
    METRICS.pod_start.with_label_values(&[backend, if ok { "ok" } else { "error" }]).observe(took.as_secs_f64());
    if let Some(f) = figures {
        METRICS.vm_boot.with_label_values(&[backend]).observe(f.boot_seconds);
    }
}

pub fn call_failed(call: &'static str, code: tonic::Code) {
    METRICS.task_errors.with_label_values(&[call, &format!("{code:?}")]).inc();
}

/// Counts a pull (PullImage, or the pause image a pod start pulls).
pub fn pulled(result: &Result<crate::image::ImageRecord, crate::image::ImageError>) {
    METRICS.pulls.with_label_values(&[if result.is_ok() { "ok" } else { "error" }]).inc();
    if let Ok(record) = result {
        METRICS.pull_bytes.inc_by(record.layers.iter().map(|l| l.size).sum());
    }
}

/// A ready sandbox's guest figures from its stats: its id, metadata, CPU
/// time (ns) and working set (bytes).
fn guest_figures(s: &PodSandboxStats) -> Option<(String, PodSandboxMetadata, u64, u64)> {
    let attrs = s.attributes.as_ref()?;
    let meta = attrs.metadata.clone().unwrap_or_default();
    let linux = s.linux.as_ref();
    let cpu = linux.and_then(|l| l.cpu.as_ref()?.usage_core_nano_seconds.as_ref()).map_or(0, |v| v.value);
    let mem = linux.and_then(|l| l.memory.as_ref()?.working_set_bytes.as_ref()).map_or(0, |v| v.value);
    Some((attrs.id.clone(), meta, cpu, mem))
}

impl Metrics {
    /// Reads the figures that are read, not counted, and encodes everything.
    pub async fn scrape(&self, runtime: &Runtime) -> String {
        let pods = self.refresh(runtime).await;
        // Each sandbox's own figures, as its shim recorded them.
        let mut recorded = Vec::new();
        for p in pods {
            if let Some(f) = runtime.figures(&p.id) {
                recorded.push((p.id, f));
            }
        }
        crate::figures::encode(&self.registry, &recorded)
    }

    /// Sets the figures read at each scrape; returns the pods it listed.
    async fn refresh(&self, runtime: &Runtime) -> Vec<PodSandbox> {
        let pods = runtime.list_pods(None).await;
        self.sandboxes.reset();
        for state in ["ready", "notready"] {
            self.sandboxes.with_label_values(&[state]).set(0);
        }
        for p in &pods {
            let state = if p.state == PodSandboxState::SandboxReady as i32 { "ready" } else { "notready" };
            self.sandboxes.with_label_values(&[state]).inc();
        }
        self.containers.reset();
        for state in ["created", "running", "exited", "unknown"] {
            self.containers.with_label_values(&[state]).set(0);
        }
        for c in runtime.list_containers(None).await {
            let state = match ContainerState::try_from(c.state) {
                Ok(ContainerState::ContainerCreated) => "created",
                Ok(ContainerState::ContainerRunning) => "running",
                Ok(ContainerState::ContainerExited) => "exited",
                _ => "unknown",
            };
            self.containers.with_label_values(&[state]).inc();
        }
        self.guest_cpu.reset();
        self.guest_memory.reset();
        for s in runtime.list_pod_stats(None).await {
            let Some((id, meta, cpu, mem)) = guest_figures(&s) else { continue };
            let labels = [id.as_str(), meta.name.as_str(), meta.namespace.as_str()];
            self.guest_cpu.with_label_values(&labels).inc_by(cpu as f64 / 1e9);
            self.guest_memory.with_label_values(&labels).set(mem as f64);
        }
        self.host_rss.reset();
        self.host_cpu.reset();
        for p in &pods {
            let meta = p.metadata.clone().unwrap_or_default();
            for (name, pid) in runtime.host_processes(&p.id).await {
                let Some((rss, cpu)) = proc_usage(pid) else { continue };
                let labels = [p.id.as_str(), meta.name.as_str(), meta.namespace.as_str(), name.as_str()];
                self.host_rss.with_label_values(&labels).add(rss as f64);
                self.host_cpu.with_label_values(&labels).inc_by(cpu);
            }
        }
        pods
    }

    /// The descriptors of the per-sandbox figures, for
    /// `ListMetricDescriptors`.
    pub fn descriptors() -> Vec<MetricDescriptor> {
        let d = |name: &str, help: &str| MetricDescriptor {
            name: name.into(),
            help: help.into(),
            label_keys: vec!["sandbox".into(), "pod".into(), "namespace".into()],
        };
        vec![
            d("runv_sandbox_guest_cpu_seconds_total", "CPU time of a sandbox's containers in its guest"),
            d("runv_sandbox_guest_memory_working_set_bytes", "Working set of a sandbox's containers in its guest"),
            d("runv_sandbox_host_resident_memory_bytes", "Resident memory of a sandbox's host processes, all together"),
        ]
    }

    /// Each ready sandbox's figures, for `ListPodSandboxMetrics`.
    pub async fn pod_sandbox_metrics(runtime: &Runtime) -> Vec<PodSandboxMetrics> {
        let now = super::runtime::now_ns();
        let mut out = Vec::new();
        for s in runtime.list_pod_stats(None).await {
            let Some((id, meta, cpu, mem)) = guest_figures(&s) else { continue };
            let labels = vec![id.clone(), meta.name, meta.namespace];
            let mut rss = 0u64;
            for (_, pid) in runtime.host_processes(&id).await {
                rss += proc_usage(pid).map_or(0, |(r, _)| r);
            }
            let metric = |name: &str, kind: MetricType, value: u64| Metric {
                name: name.into(),
                timestamp: now,
                metric_type: kind as i32,
                label_values: labels.clone(),
                value: Some(UInt64Value { value }),
            };
            out.push(PodSandboxMetrics {
                pod_sandbox_id: id,
                metrics: vec![
                    // Whole seconds: the CRI carries integers.
                    metric("runv_sandbox_guest_cpu_seconds_total", MetricType::Counter, cpu / 1_000_000_000),
                    metric("runv_sandbox_guest_memory_working_set_bytes", MetricType::Gauge, mem),
                    metric("runv_sandbox_host_resident_memory_bytes", MetricType::Gauge, rss),
                ],
                container_metrics: Vec::new(),
            });
        }
        out
    }
}

/// Serves `GET /metrics` on `address` until the process ends.
pub async fn serve(address: &str, runtime: Arc<Runtime>) -> anyhow::Result<std::net::SocketAddr> {
    serve_text(address, move || {
        let runtime = runtime.clone();
        async move { METRICS.scrape(&runtime).await }
    })
    .await
}

/// Binds `address` and serves `GET /metrics` with what `scrape` returns
/// (the Prometheus text format) on a task of its own, until the process
/// ends; returns the address bound.
pub async fn serve_text<F, Fut>(address: &str, scrape: F) -> anyhow::Result<std::net::SocketAddr>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = String> + Send + 'static,
{
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("--metrics-address {address}: cannot listen"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let scrape = scrape.clone();
            async move { ([(axum::http::header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], scrape().await) }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("the metrics server stopped: {e}");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_follow_prometheus_conventions_and_encode() {
        let _t = time_call("state");
        drop(_t);
        call_failed("kill", tonic::Code::Unavailable);
        METRICS.pulls.with_label_values(&["ok"]).inc();
        let text = crate::figures::encode(&METRICS.registry, &[]);
        for family in METRICS.registry.gather() {
            let name = family.name();
            assert!(name.starts_with("runv_"), "{name}");
            if family.get_field_type() == prometheus::proto::MetricType::COUNTER {
                assert!(name.ends_with("_total"), "{name}");
            }
        }
        assert!(text.contains("runv_task_call_duration_seconds_bucket{call=\"state\""), "{text}");
        assert!(text.contains("runv_task_call_errors_total{call=\"kill\",code=\"Unavailable\"} 1"), "{text}");
        assert!(proc_usage(std::process::id()).is_some_and(|(rss, _)| rss > 0));
    }
}
