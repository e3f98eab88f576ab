//! Logging (tracing subscriber) and metrics (Prometheus recorder) for the process.

use crate::config::{LogConfig, LogFormat};
use anyhow::Context as _;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use raftmq_server::MetricsRender;
use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::Duration;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Bucket bounds of histograms whose names end in `_seconds`: 50µs to 10s.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Bucket bounds of histograms whose names end in `_bytes`: 16B to 256MiB, by powers of 4.
/// Buckets for counts per operation (`*_per_batch`, e.g. proposals folded into one Raft entry).
pub const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

pub const BYTES_BUCKETS: &[f64] = &[
    16.0,
    64.0,
    256.0,
    1_024.0,
    4_096.0,
    16_384.0,
    65_536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
    268_435_456.0,
];

/// How often histograms are drained even when nobody scrapes `/metrics`.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Where the log filter came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FilterSource {
    /// `log.level` of the configuration.
    Config,
    /// The `RUST_LOG` environment variable, which overrides `log.level`.
    RustLog(String),
}

/// The log filter: `RUST_LOG` when set and not empty, otherwise `level` (from the config).
pub fn log_filter(
    level: &str,
    rust_log: Option<&str>,
) -> anyhow::Result<(EnvFilter, FilterSource)> {
    match rust_log.map(str::trim).filter(|s| !s.is_empty()) {
        Some(directives) => {
            let filter = EnvFilter::try_new(directives)
                .with_context(|| format!("parsing RUST_LOG `{directives}`"))?;
            Ok((filter, FilterSource::RustLog(directives.to_owned())))
        }
        None => {
            let filter = EnvFilter::try_new(level)
                .with_context(|| format!("parsing log.level `{level}`"))?;
            Ok((filter, FilterSource::Config))
        }
    }
}

/// Installs the global tracing subscriber (text or JSON lines on standard error).
pub fn init_tracing(log: &LogConfig) -> anyhow::Result<FilterSource> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, source) = log_filter(&log.level, rust_log.as_deref())?;
    let registry = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let installed = match log.format {
        LogFormat::Text => registry
            .with(fmt.with_ansi(std::io::stderr().is_terminal()))
            .try_init(),
        LogFormat::Json => registry
            .with(fmt.json().flatten_event(true).with_current_span(false))
            .try_init(),
    };
    installed.context("installing the tracing subscriber")?;
    Ok(source)
}

/// The Prometheus recorder settings: no HTTP listener of its own (the server's HTTP endpoint
/// renders it), and explicit buckets so `*_seconds`, `*_bytes` and `*_per_batch` histograms
/// export as histograms rather than summaries.
pub fn prometheus_builder() -> anyhow::Result<PrometheusBuilder> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_bytes".to_owned()), BYTES_BUCKETS))
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Suffix("_per_batch".to_owned()), COUNT_BUCKETS)
        })
        .context("configuring histogram buckets")
}

/// Installs the global metrics recorder and returns the handle that renders it.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    prometheus_builder()?
        .install_recorder()
        .context("installing the metrics recorder")
}

/// Describes the process-wide metrics and sets the constant ones. (The other crates describe
/// their own metrics.)
pub fn describe_metrics() {
    metrics::describe_gauge!(
        "raftmq_build_info",
        "Build information of the running broker; always 1."
    );
    metrics::gauge!("raftmq_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// The render callback given to the server's `/metrics` endpoint.
pub fn metrics_render(handle: PrometheusHandle) -> MetricsRender {
    Arc::new(move || handle.render())
}

/// Drains histogram buckets every `every` (the recorder needs it when scrapes are rare). Must
/// be called inside a tokio runtime; abort the task to stop it.
pub fn spawn_upkeep(handle: PrometheusHandle, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    })
}

/// Installs logging and metrics for the process and describes the metrics.
pub fn init(log: &LogConfig) -> anyhow::Result<PrometheusHandle> {
    let source = init_tracing(log)?;
    if let FilterSource::RustLog(directives) = source {
        tracing::info!(%directives, "log filter taken from RUST_LOG (overrides log.level)");
    }
    let handle = install_metrics()?;
    describe_metrics();
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` with a fresh recorder (not the global one) and returns the rendered output.
    fn render_with(f: impl FnOnce()) -> String {
        let recorder = prometheus_builder().expect("builder").build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, f);
        handle.render()
    }

    #[test]
    fn build_info_gauge_carries_the_version() {
        let out = render_with(describe_metrics);
        let line = format!(
            "raftmq_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(out.lines().any(|l| l == line), "{out}");
        assert!(
            out.contains("# HELP raftmq_build_info Build information"),
            "{out}"
        );
    }

    #[test]
    fn seconds_and_bytes_histograms_export_as_histograms() {
        let out = render_with(|| {
            metrics::histogram!("raftmq_test_latency_seconds").record(0.003);
            metrics::histogram!("raftmq_test_payload_bytes").record(1_000.0);
            metrics::histogram!("raftmq_test_other").record(1.0);
            metrics::histogram!("raftmq_test_items_per_batch").record(300.0);
        });
        assert!(
            out.contains("raftmq_test_items_per_batch_bucket{le=\"500\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("# TYPE raftmq_test_latency_seconds histogram"),
            "{out}"
        );
        assert!(
            out.contains("raftmq_test_latency_seconds_bucket{le=\"0.00005\"} 0"),
            "{out}"
        );
        assert!(
            out.contains("raftmq_test_latency_seconds_bucket{le=\"0.005\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("raftmq_test_latency_seconds_bucket{le=\"10\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("# TYPE raftmq_test_payload_bytes histogram"),
            "{out}"
        );
        assert!(
            out.contains("raftmq_test_payload_bytes_bucket{le=\"1024\"} 1"),
            "{out}"
        );
        assert!(out.contains("# TYPE raftmq_test_other summary"), "{out}");
    }

    #[test]
    fn buckets_are_increasing() {
        for buckets in [SECONDS_BUCKETS, BYTES_BUCKETS] {
            assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{buckets:?}");
        }
        assert_eq!(SECONDS_BUCKETS.first(), Some(&0.000_05));
        assert_eq!(SECONDS_BUCKETS.last(), Some(&10.0));
    }

    #[test]
    fn rust_log_overrides_the_configured_level() {
        let (_, source) = log_filter("info", None).expect("valid");
        assert_eq!(source, FilterSource::Config);
        let (_, source) = log_filter("info", Some("  ")).expect("valid");
        assert_eq!(source, FilterSource::Config);
        let (filter, source) = log_filter("info", Some("raftmq=trace")).expect("valid");
        assert_eq!(source, FilterSource::RustLog("raftmq=trace".into()));
        assert_eq!(filter.to_string(), "raftmq=trace");
        let err = log_filter("info", Some("raftmq=[[")).expect_err("invalid");
        assert!(
            format!("{err:#}").starts_with("parsing RUST_LOG `raftmq=[[`"),
            "{err:#}"
        );
    }
}
