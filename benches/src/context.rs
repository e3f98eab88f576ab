//! What all scenarios share: the run id and names derived from it, endpoints, broker sampling,
//! opening many connections, and the per-second progress line.

use crate::cli::CommonArgs;
use crate::client::{Counters, Endpoint, latency_histogram};
use crate::procfs::{self, Sample};
use crate::summary::{ConnectStats, Percentiles, Summary};
use anyhow::{Context as _, Result, anyhow};
use hdrhistogram::Histogram;
use raftmq_codec::{ProtocolVersion, QoS};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// One run of one scenario.
pub struct Context {
    /// Random id of this run: in client ids, topics and payload stamps, so concurrent or
    /// earlier runs never mix.
    pub run: u32,
    pub common: CommonArgs,
    /// The broker at --host/--port.
    pub endpoint: Endpoint,
}

impl Context {
    pub fn new(common: &CommonArgs) -> Result<Self> {
        let addr = resolve(&format!("{}:{}", common.host, common.port))?;
        let version = match common.mqtt_version {
            5 => ProtocolVersion::V5,
            _ => ProtocolVersion::V3_1_1,
        };
        Ok(Context {
            run: std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish() as u32,
            common: common.clone(),
            endpoint: Endpoint {
                addr,
                local: None,
                version,
                keep_alive: common.keep_alive,
                timeout: common.connect_timeout,
            },
        })
    }

    /// The endpoint at `addr` (HOST:PORT) if given, else the default one.
    pub fn endpoint_at(&self, addr: Option<&str>) -> Result<Endpoint> {
        Ok(match addr {
            Some(addr) => Endpoint {
                addr: resolve(addr)?,
                ..self.endpoint.clone()
            },
            None => self.endpoint.clone(),
        })
    }

    /// Client id of the `i`th client with `role` (a letter), at most 23 characters.
    pub fn client_id(&self, role: char, i: u32) -> String {
        format!("rb{:08x}{role}{i}", self.run)
    }

    /// A topic of this run.
    pub fn topic(&self, path: &str) -> String {
        format!("raftmq-bench/{:08x}/{path}", self.run)
    }

    /// A summary skeleton for `scenario`.
    pub fn summary(&self, scenario: &str, description: String) -> Summary {
        let version = match self.endpoint.version {
            ProtocolVersion::V5 => "MQTT 5.0",
            _ => "MQTT 3.1.1",
        };
        Summary {
            scenario: scenario.to_owned(),
            description: format!("{scenario}: {description}, {version}"),
            label: self.common.output.label.clone(),
            mqtt_version: self.endpoint.version.level(),
            ..Summary::default()
        }
    }

    /// The broker's usage now (summed over its processes), if --broker-pid was given.
    pub fn sample(&self) -> Result<Option<Sample>> {
        procfs::sample_all(&self.common.broker_pid)
    }

    /// The broker's usage at `at` (sampled by a task sleeping until then).
    pub fn sample_at(&self, at: Instant) -> tokio::task::JoinHandle<Result<Option<Sample>>> {
        let pids = self.common.broker_pid.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            procfs::sample_all(&pids)
        })
    }

    /// Opens `count` connections with `open(i)`, at most --connect-concurrency at a time.
    /// Fails on the first failure (the others are aborted).
    pub async fn open_all<T, F, Fut>(&self, count: u32, open: F) -> Result<(Vec<T>, ConnectLog)>
    where
        F: Fn(u32) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let permits = Arc::new(Semaphore::new(self.common.connect_concurrency as usize));
        let started = Instant::now();
        let mut tasks = JoinSet::new();
        for i in 0..count {
            let permits = permits.clone();
            let opening = open(i);
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await?;
                let t = Instant::now();
                let value = opening.await?;
                anyhow::Ok((i, value, t.elapsed()))
            });
        }
        let mut opened: Vec<Option<T>> = (0..count).map(|_| None).collect();
        let mut log = ConnectLog::default();
        while let Some(joined) = tasks.join_next().await {
            let (i, value, took) =
                joined?.with_context(|| format!("opening {count} connections"))?;
            opened[i as usize] = Some(value);
            log.established(took);
        }
        log.elapsed = started.elapsed();
        let opened = opened
            .into_iter()
            .map(|v| v.ok_or_else(|| anyhow!("lost a connection")));
        Ok((opened.collect::<Result<_>>()?, log))
    }
}

/// Connection attempts: outcomes, handshake latencies and time spent connecting.
#[derive(Debug)]
pub struct ConnectLog {
    pub attempted: u64,
    pub failed: u64,
    /// Handshake latencies of established connections, µs.
    latency: Histogram<u64>,
    /// Wall time spent connecting.
    pub elapsed: Duration,
}

impl Default for ConnectLog {
    fn default() -> Self {
        ConnectLog {
            attempted: 0,
            failed: 0,
            latency: latency_histogram(),
            elapsed: Duration::ZERO,
        }
    }
}

impl ConnectLog {
    /// A connection established after `took`.
    pub fn established(&mut self, took: Duration) {
        self.attempted += 1;
        self.latency
            .saturating_record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1));
    }

    /// A connection attempt that failed.
    pub fn failed(&mut self) {
        self.attempted += 1;
        self.failed += 1;
    }

    /// Adds the attempts of `other`, made after ours.
    pub fn merge(&mut self, other: &ConnectLog) -> Result<()> {
        self.attempted += other.attempted;
        self.failed += other.failed;
        self.latency.add(&other.latency)?;
        self.elapsed += other.elapsed;
        Ok(())
    }

    pub fn stats(&self) -> ConnectStats {
        let established = self.attempted - self.failed;
        let seconds = self.elapsed.as_secs_f64();
        ConnectStats {
            attempted: self.attempted,
            established,
            failed: self.failed,
            per_s: if seconds > 0.0 {
                established as f64 / seconds
            } else {
                0.0
            },
            latency_ms: Percentiles::of(&self.latency, 1000.0),
        }
    }
}

/// The first address `addr` (HOST:PORT) resolves to.
fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .ok_or_else(|| anyhow!("{addr} resolves to no address"))
}

/// `--qos` as a QoS (clap has checked the range).
pub fn qos(level: u8) -> QoS {
    QoS::from_u8(level).unwrap_or(QoS::ExactlyOnce)
}

/// The per-second progress line of a message scenario, on stderr.
pub struct Progress {
    counters: Arc<Counters>,
    /// Copies each published message should be delivered as.
    copies: u64,
    started: Instant,
    last: (u64, u64),
}

impl Progress {
    pub fn new(counters: Arc<Counters>, copies: u64) -> Self {
        Progress {
            counters,
            copies,
            started: Instant::now(),
            last: (0, 0),
        }
    }

    /// Prints rates since the last call, and copies still in flight.
    pub fn tick(&mut self) {
        let sent = self.counters.sent.load(Relaxed);
        let received = self.counters.received.load(Relaxed);
        let (last_sent, last_received) = std::mem::replace(&mut self.last, (sent, received));
        eprintln!(
            "[{:>4.0}s] sent {:>9} msg/s  received {:>9} msg/s  in flight {:>9}",
            self.started.elapsed().as_secs_f64(),
            sent - last_sent,
            received - last_received,
            (sent * self.copies).saturating_sub(received),
        );
    }
}
