//! Reading metrics in tests: a Prometheus recorder for the test process (for counters the code
//! under test records and no API exposes) and a parser for one sample of the text format (what
//! a node's `/metrics` serves).

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

/// The metrics recorded in this test process so far, in the Prometheus text format. The first
/// call installs the process-wide recorder: call it before what is to be counted happens.
pub fn render() -> String {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                .expect("no other metrics recorder in a test process")
        })
        .render()
}

/// The value of the sample `name` (with its labels as rendered, e.g.
/// `x_total{peer="2"}`) in the Prometheus text `metrics`, if present.
pub fn metric(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(name)
            .filter(|rest| rest.starts_with(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_reads_one_sample_by_its_full_name() {
        let text = "# TYPE x counter\nx_total{peer=\"2\"} 7\nx_total{peer=\"20\"} 1\ny 2.5\n";
        assert_eq!(metric(text, "x_total{peer=\"2\"}"), Some(7.0));
        assert_eq!(metric(text, "y"), Some(2.5));
        assert_eq!(metric(text, "x_total"), None);
    }

    #[test]
    fn render_shows_what_this_process_counted() {
        let before = metric(&render(), "raftmq_tests_probe_total").unwrap_or(0.0);
        ::metrics::counter!("raftmq_tests_probe_total").increment(2);
        assert_eq!(
            metric(&render(), "raftmq_tests_probe_total"),
            Some(before + 2.0)
        );
    }
}
