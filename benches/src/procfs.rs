//! The broker's CPU time and resident memory, read from `/proc/PID/stat` and
//! `/proc/PID/status` (Linux).

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Clock ticks per second of the `utime`/`stime` fields. The kernel reports them in USER_HZ,
/// which is 100 on every Linux architecture (it is part of the user-space ABI).
const USER_HZ: u64 = 100;

/// One reading of a process's resource usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// User plus system CPU time of all its threads, in clock ticks.
    pub cpu_ticks: u64,
    /// The system (kernel) part of `cpu_ticks`.
    pub sys_ticks: u64,
    /// Resident set size, in KiB.
    pub rss_kib: u64,
}

/// Reads the usage of process `pid`.
pub fn sample(pid: u32) -> Result<Sample> {
    let read = |file: &str| {
        let path = format!("/proc/{pid}/{file}");
        std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))
    };
    let (user, sys) = parse_user_sys_ticks(&read("stat")?).context("parsing /proc/PID/stat")?;
    Ok(Sample {
        cpu_ticks: user + sys,
        sys_ticks: sys,
        rss_kib: parse_rss_kib(&read("status")?).context("no VmRSS in /proc/PID/status")?,
    })
}

/// The usage of processes `pids` summed (one broker made of several processes); `None` when
/// there are none.
pub fn sample_all(pids: &[u32]) -> Result<Option<Sample>> {
    let mut total: Option<Sample> = None;
    for pid in pids {
        let s = sample(*pid)?;
        let t = total.get_or_insert(Sample {
            cpu_ticks: 0,
            sys_ticks: 0,
            rss_kib: 0,
        });
        t.cpu_ticks += s.cpu_ticks;
        t.sys_ticks += s.sys_ticks;
        t.rss_kib += s.rss_kib;
    }
    Ok(total)
}

/// `(utime, stime)` from the content of `/proc/PID/stat`.
///
/// The second field is the command name in parentheses and may itself contain spaces and
/// parentheses, so fields are counted from the last `)`: utime and stime are fields 14 and 15,
/// i.e. the 12th and 13th after the name.
pub fn parse_user_sys_ticks(stat: &str) -> Option<(u64, u64)> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// `VmRSS` in KiB from the content of `/proc/PID/status`.
pub fn parse_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib = line.trim().strip_suffix("kB")?;
    kib.trim().parse().ok()
}

/// The broker's usage over a run: CPU time between two samples, memory at each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BrokerUsage {
    /// CPU time (user + system) used between the two samples.
    pub cpu_seconds: f64,
    /// Broker CPU time per delivered message, in µs (message scenarios).
    pub cpu_us_per_msg: Option<f64>,
    /// The system (kernel) part of `cpu_seconds`: TCP, wake-ups, system calls.
    #[serde(default)]
    pub sys_seconds: f64,
    /// The system part of `cpu_us_per_msg`.
    #[serde(default)]
    pub sys_us_per_msg: Option<f64>,
    /// RSS before the load started.
    pub rss_before_kib: u64,
    /// RSS under load (all connections open).
    pub rss_loaded_kib: u64,
    /// (loaded − before) / connections, in bytes (connection scenarios).
    pub rss_per_conn_bytes: Option<f64>,
}

impl BrokerUsage {
    /// Usage between `start` and `end` (CPU), with `before` and `loaded` memory.
    pub fn between(before: Sample, start: Sample, end: Sample, loaded: Sample) -> Self {
        BrokerUsage {
            cpu_seconds: end.cpu_ticks.saturating_sub(start.cpu_ticks) as f64 / USER_HZ as f64,
            cpu_us_per_msg: None,
            sys_seconds: end.sys_ticks.saturating_sub(start.sys_ticks) as f64 / USER_HZ as f64,
            sys_us_per_msg: None,
            rss_before_kib: before.rss_kib,
            rss_loaded_kib: loaded.rss_kib,
            rss_per_conn_bytes: None,
        }
    }

    /// Sets the CPU cost per message for `messages` delivered messages.
    pub fn per_message(mut self, messages: u64) -> Self {
        self.cpu_us_per_msg = (messages > 0).then(|| self.cpu_seconds * 1e6 / messages as f64);
        self.sys_us_per_msg = (messages > 0).then(|| self.sys_seconds * 1e6 / messages as f64);
        self
    }

    /// Sets the memory cost per connection for `connections` open connections.
    pub fn per_connection(mut self, connections: u64) -> Self {
        let grown = self.rss_loaded_kib.saturating_sub(self.rss_before_kib) as f64 * 1024.0;
        self.rss_per_conn_bytes = (connections > 0).then(|| grown / connections as f64);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real /proc/PID/stat line (mosquitto), with utime 1234 and stime 567.
    const STAT: &str = "4242 (mosquitto) S 1 4242 4242 0 -1 4194560 1500 0 0 0 1234 567 0 0 \
                        20 0 1 0 123456 12345678 1234 18446744073709551615 1 1 0 0 0 0 0 \
                        4096 0 0 0 0 17 1 0 0 0 0 0\n";

    const STATUS: &str = "Name:\tmosquitto\nUmask:\t0022\nState:\tS (sleeping)\n\
                          VmPeak:\t   20000 kB\nVmSize:\t   18000 kB\nVmHWM:\t    9000 kB\n\
                          VmRSS:\t    8312 kB\nRssAnon:\t     812 kB\nThreads:\t1\n";

    #[test]
    fn cpu_ticks_from_stat() {
        assert_eq!(parse_user_sys_ticks(STAT), Some((1234, 567)));
    }

    #[test]
    fn command_names_with_spaces_and_parentheses() {
        let stat = STAT.replace("(mosquitto)", "(tokio (worker) 1)");
        assert_eq!(parse_user_sys_ticks(&stat), Some((1234, 567)));
    }

    #[test]
    fn truncated_or_garbled_stat() {
        assert_eq!(parse_user_sys_ticks("4242 (x) S 1 2 3"), None);
        assert_eq!(parse_user_sys_ticks("no parenthesis"), None);
        assert_eq!(parse_user_sys_ticks(&STAT.replace("1234", "12x4")), None);
    }

    #[test]
    fn rss_from_status() {
        assert_eq!(parse_rss_kib(STATUS), Some(8312));
        // Kernel threads have no VmRSS line.
        assert_eq!(parse_rss_kib("Name:\tkthreadd\nState:\tS\n"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let s = sample(std::process::id()).expect("own /proc entry");
        assert!(s.rss_kib > 0);
    }

    #[test]
    fn several_processes_are_summed() {
        assert_eq!(sample_all(&[]).expect("nothing to read"), None);
        let own = std::process::id();
        let one = sample(own).expect("own /proc entry");
        let two = sample_all(&[own, own])
            .expect("own /proc entry")
            .expect("two samples");
        // RSS may move between the readings, but two readings are about twice one.
        assert!(two.rss_kib >= one.rss_kib && two.rss_kib <= 3 * one.rss_kib);
        assert!(sample_all(&[own, u32::MAX]).is_err());
    }

    #[test]
    fn usage_arithmetic() {
        let at = |cpu_ticks, rss_kib| Sample {
            cpu_ticks,
            sys_ticks: cpu_ticks / 5,
            rss_kib,
        };
        let usage = BrokerUsage::between(at(0, 1000), at(100, 1100), at(350, 1500), at(340, 3000))
            .per_message(500_000)
            .per_connection(1000);
        assert_eq!(usage.cpu_seconds, 2.5);
        assert_eq!(usage.cpu_us_per_msg, Some(5.0));
        assert_eq!(usage.sys_seconds, 0.5);
        assert_eq!(usage.sys_us_per_msg, Some(1.0));
        assert_eq!(usage.rss_per_conn_bytes, Some(2048.0));
        assert_eq!(BrokerUsage::default().per_message(0).cpu_us_per_msg, None);
    }
}
