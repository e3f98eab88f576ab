//! `report`: a Markdown table comparing the JSON summaries of two runs, scenario by scenario,
//! with the ratio first / second for every metric.

use crate::cli::ReportArgs;
use crate::summary::{Summary, thousands};
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// A run: its name and its summaries by scenario (file stem).
type Run = (String, BTreeMap<String, Summary>);

pub fn run(args: &ReportArgs) -> Result<()> {
    let [first, second] = &args.runs[..] else {
        bail!("report compares exactly two runs");
    };
    let markdown = render(&load(first)?, &load(second)?, &args.note);
    match &args.out {
        Some(path) => {
            std::fs::write(path, markdown).with_context(|| format!("writing {}", path.display()))
        }
        None => {
            print!("{markdown}");
            Ok(())
        }
    }
}

/// Reads NAME=DIR: every `*.json` summary in DIR, keyed by file stem.
fn load(spec: &str) -> Result<Run> {
    let Some((name, dir)) = spec.split_once('=') else {
        bail!("expected NAME=DIR, got `{spec}`");
    };
    let mut summaries = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {dir}"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            summaries.insert(stem(&path), read_summary(&path)?);
        }
    }
    Ok((name.to_owned(), summaries))
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn read_summary(path: &Path) -> Result<Summary> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// One row of the table: a name (with ↑ when higher is better, ↓ when lower is), and how to
/// get the value from a summary.
struct Metric {
    name: &'static str,
    value: fn(&Summary) -> Option<f64>,
    /// Whether a ratio makes sense (not for percentages that are often zero).
    ratio: bool,
}

const METRICS: &[Metric] = &[
    Metric {
        name: "delivered msg/s ↑",
        value: |s| {
            s.messages
                .as_ref()
                .filter(|_| s.retained.is_none())
                .map(|m| m.delivered_per_s)
        },
        ratio: true,
    },
    Metric {
        name: "latency p50 ms ↓",
        value: |s| latency(s).map(|l| l.p50 / 1000.0),
        ratio: true,
    },
    Metric {
        name: "latency p99 ms ↓",
        value: |s| latency(s).map(|l| l.p99 / 1000.0),
        ratio: true,
    },
    Metric {
        name: "loss % ↓",
        value: |s| s.messages.as_ref().map(|m| m.loss_ratio * 100.0),
        ratio: false,
    },
    Metric {
        name: "broker CPU µs/msg ↓",
        value: |s| s.broker.and_then(|b| b.cpu_us_per_msg),
        ratio: true,
    },
    Metric {
        name: "… of it in the kernel µs/msg",
        value: |s| s.broker.and_then(|b| b.sys_us_per_msg),
        ratio: true,
    },
    Metric {
        name: "all retained received ms ↓",
        value: |s| s.retained.as_ref().and_then(|r| r.receive_all_ms),
        ratio: true,
    },
    Metric {
        name: "accepts/s ↑",
        value: |s| (s.scenario == "conn").then_some(s.connect.per_s),
        ratio: true,
    },
    Metric {
        name: "connect p99 ms ↓",
        value: |s| {
            let relevant = s.scenario == "conn" || s.scenario == "churn";
            s.connect.latency_ms.filter(|_| relevant).map(|l| l.p99)
        },
        ratio: true,
    },
    Metric {
        name: "broker CPU µs/conn ↓",
        value: |s| per_connection(s, s.broker.as_ref(), |b| b.cpu_seconds),
        ratio: true,
    },
    Metric {
        name: "… of it in the kernel µs/conn",
        value: |s| per_connection(s, s.broker.as_ref(), |b| b.sys_seconds),
        ratio: true,
    },
    Metric {
        name: "load tool CPU µs/conn (same tool for both)",
        value: |s| per_connection(s, s.load_tool.as_ref(), |t| t.cpu_seconds),
        ratio: false,
    },
    Metric {
        name: "broker RSS KiB/conn ↓",
        value: |s| {
            s.broker
                .and_then(|b| b.rss_per_conn_bytes)
                .map(|b| b / 1024.0)
        },
        ratio: true,
    },
    Metric {
        name: "cycles/s ↑",
        value: |s| s.churn.as_ref().map(|c| c.cycles_per_s),
        ratio: true,
    },
    Metric {
        name: "broker CPU µs/cycle ↓",
        value: |s| s.churn.as_ref().and_then(|c| c.broker_cpu_us_per_cycle),
        ratio: true,
    },
    Metric {
        name: "… of it in the kernel µs/cycle",
        value: |s| s.churn.as_ref().and_then(|c| c.broker_sys_us_per_cycle),
        ratio: true,
    },
];

/// A process's CPU (`seconds` of its `usage`: the broker's or the load tool's) per connection
/// established, µs (connection scenario: the connect and the idle hold).
fn per_connection(
    s: &Summary,
    usage: Option<&crate::procfs::BrokerUsage>,
    seconds: fn(&crate::procfs::BrokerUsage) -> f64,
) -> Option<f64> {
    let established = s.connect.established;
    usage
        .filter(|_| s.scenario == "conn" && established > 0)
        .map(|u| seconds(u) * 1e6 / established as f64)
}

/// The latency of `s`, unless it only measures socket-buffer queueing (QoS 0 floods).
fn latency(s: &Summary) -> Option<crate::summary::Percentiles> {
    s.latency_us.filter(|_| !s.is_qos0_flood())
}

/// A value with a precision that suits its magnitude.
fn number(value: f64) -> String {
    match value.abs() {
        v if v >= 1000.0 => thousands(value),
        v if v >= 10.0 => format!("{value:.1}"),
        v if v >= 0.1 => format!("{value:.2}"),
        _ => format!("{value:.3}"),
    }
}

fn cell(value: Option<f64>) -> String {
    value.map_or_else(|| "–".to_owned(), number)
}

/// The Markdown report.
fn render(first: &Run, second: &Run, notes: &[String]) -> String {
    let (a, a_runs) = first;
    let (b, b_runs) = second;
    let mut md = format!("# {a} vs {b}: latest benchmark run\n\n");
    for note in notes {
        let _ = writeln!(md, "{note}  ");
    }
    let _ = writeln!(
        md,
        "\n↑: higher is better, ↓: lower is better. The ratio is {a} / {b}.\n"
    );
    let _ = writeln!(md, "| scenario | metric | {a} | {b} | {a} / {b} |");
    md.push_str("|---|---|---:|---:|---:|\n");
    let mut scenarios: Vec<&String> = a_runs.keys().chain(b_runs.keys()).collect();
    scenarios.sort();
    scenarios.dedup();
    let mut problems = Vec::new();
    for key in scenarios {
        let (x, y) = (a_runs.get(key), b_runs.get(key));
        let title = x.or(y).map_or(key.as_str(), |s| s.description.as_str());
        let mut first_row = true;
        for metric in METRICS {
            let (vx, vy) = (x.and_then(metric.value), y.and_then(metric.value));
            if vx.is_none() && vy.is_none() {
                continue;
            }
            let ratio = match (vx, vy) {
                (Some(vx), Some(vy)) if metric.ratio && vy != 0.0 => format!("{:.2}", vx / vy),
                _ => "–".to_owned(),
            };
            let label = if std::mem::take(&mut first_row) {
                title
            } else {
                ""
            };
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {} | {ratio} |",
                metric.name,
                cell(vx),
                cell(vy)
            );
        }
        for (name, summary) in [(a, x), (b, y)] {
            match summary {
                None => problems.push(format!("{name} has no result for `{key}`")),
                Some(s) if s.error_count > 0 => problems.push(format!(
                    "{name} `{key}`: {} error(s), first: {}",
                    s.error_count,
                    s.errors.first().map_or("", String::as_str)
                )),
                Some(_) => {}
            }
        }
    }
    if !problems.is_empty() {
        md.push_str("\nProblems during the run:\n\n");
        for problem in problems {
            let _ = writeln!(md, "- {problem}");
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary::{MessageStats, Percentiles};

    fn p2p(delivered_per_s: f64, p99_us: f64) -> Summary {
        Summary {
            scenario: "p2p".into(),
            description: "p2p: 10 pairs".into(),
            messages: Some(MessageStats {
                delivered_per_s,
                ..MessageStats::default()
            }),
            latency_us: Some(Percentiles {
                p50: 100.0,
                p99: p99_us,
                ..Percentiles::default()
            }),
            ..Summary::default()
        }
    }

    #[test]
    fn renders_ratios_and_gaps() {
        let a: Run = (
            "raftmq".into(),
            BTreeMap::from([("01-p2p".into(), p2p(200_000.0, 2000.0))]),
        );
        let mut failing = p2p(100_000.0, 4000.0);
        failing.error_count = 1;
        failing.errors = vec!["connection reset".into()];
        let b: Run = (
            "mosquitto".into(),
            BTreeMap::from([
                ("01-p2p".into(), failing),
                ("02-fanout".into(), p2p(5.0, 1.0)),
            ]),
        );
        let md = render(&a, &b, &["Machine: test".into()]);
        assert!(md.starts_with("# raftmq vs mosquitto"), "{md}");
        assert!(md.contains("Machine: test"));
        assert!(
            md.contains("| p2p: 10 pairs | delivered msg/s ↑ | 200,000 | 100,000 | 2.00 |"),
            "{md}"
        );
        assert!(
            md.contains("|  | latency p99 ms ↓ | 2.00 | 4.00 | 0.50 |"),
            "{md}"
        );
        assert!(md.contains("|  | loss % ↓ | 0.000 | 0.000 | – |"), "{md}");
        assert!(md.contains("| – | 5.00 | – |"), "{md}");
        assert!(md.contains("raftmq has no result for `02-fanout`"), "{md}");
        assert!(
            md.contains("mosquitto `01-p2p`: 1 error(s), first: connection reset"),
            "{md}"
        );
    }

    #[test]
    fn kernel_share_and_cpu_per_connection_rows() {
        let usage = |cpu_seconds, sys_seconds| {
            crate::procfs::BrokerUsage {
                cpu_seconds,
                sys_seconds,
                ..Default::default()
            }
            .per_message(1_000_000)
        };
        let mut a = p2p(100_000.0, 1000.0);
        a.broker = Some(usage(3.0, 2.0));
        let mut b = p2p(100_000.0, 1000.0);
        b.broker = Some(usage(12.0, 9.0));
        let conn = |cpu_seconds, sys_seconds| Summary {
            scenario: "conn".into(),
            description: "conn: 1000 idle".into(),
            connect: crate::summary::ConnectStats {
                established: 1000,
                ..Default::default()
            },
            broker: Some(crate::procfs::BrokerUsage {
                cpu_seconds,
                sys_seconds,
                ..Default::default()
            }),
            load_tool: Some(crate::procfs::BrokerUsage {
                cpu_seconds: 0.07,
                sys_seconds: 0.06,
                ..Default::default()
            }),
            ..Summary::default()
        };
        let runs = |p: Summary, c: Summary, name: &str| -> Run {
            (
                name.into(),
                BTreeMap::from([("01-p2p".into(), p), ("02-conn".into(), c)]),
            )
        };
        let md = render(
            &runs(a, conn(0.04, 0.03), "raftmq"),
            &runs(b, conn(0.02, 0.01), "mosquitto"),
            &[],
        );
        assert!(
            md.contains("|  | broker CPU µs/msg ↓ | 3.00 | 12.0 | 0.25 |"),
            "{md}"
        );
        assert!(
            md.contains("|  | … of it in the kernel µs/msg | 2.00 | 9.00 | 0.22 |"),
            "{md}"
        );
        assert!(
            md.contains("|  | broker CPU µs/conn ↓ | 40.0 | 20.0 | 2.00 |"),
            "{md}"
        );
        assert!(
            md.contains("|  | … of it in the kernel µs/conn | 30.0 | 10.0 | 3.00 |"),
            "{md}"
        );
        assert!(
            md.contains("|  | load tool CPU µs/conn (same tool for both) | 70.0 | 70.0 | – |"),
            "{md}"
        );
    }

    #[test]
    fn no_latency_rows_for_qos0_floods() {
        let mut flood = p2p(1000.0, 5_000_000.0);
        flood.qos = Some(0);
        let runs =
            |s: &Summary| -> Run { ("x".into(), BTreeMap::from([("p2p".into(), s.clone())])) };
        let md = render(&runs(&flood), &runs(&flood), &[]);
        assert!(!md.contains("latency"), "{md}");
        flood.rate_per_s = Some(10_000.0);
        let md = render(&runs(&flood), &runs(&flood), &[]);
        assert!(md.contains("latency p99"), "{md}");
    }

    #[test]
    fn number_precision() {
        assert_eq!(number(123_456.7), "123,457");
        assert_eq!(number(12.345), "12.3");
        assert_eq!(number(1.2345), "1.23");
        assert_eq!(number(0.01234), "0.012");
    }
}
