//! Connection scenarios: `conn` (many idle connections) and `churn` (reconnect storms with
//! persistent sessions).

use crate::cli::{ChurnArgs, ConnArgs};
use crate::client::{Conn, Counters, Driver, Endpoint, Inbox, SessionOptions};
use crate::context::{ConnectLog, Context, qos};
use crate::procfs::BrokerUsage;
use crate::summary::{ChurnStats, Errors, Summary};
use anyhow::{Result, ensure};
use raftmq_codec::QoS;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

/// Opens `--clients` idle connections at `--rate` per second, holds them for `--duration`,
/// then closes them.
pub async fn conn(ctx: &Context, args: &ConnArgs) -> Result<Summary> {
    ensure!(
        args.rate >= 0.0 && args.rate.is_finite(),
        "--rate must be a number ≥ 0"
    );
    let endpoints = endpoints(ctx, args)?;
    let before = ctx.sample()?;
    let me_before = crate::procfs::sample(std::process::id())?;
    let permits = Arc::new(Semaphore::new(ctx.common.connect_concurrency as usize));
    let (stop, stopped) = watch::channel(false);
    let (results, mut handshakes) = mpsc::unbounded_channel();
    let open = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut connections = JoinSet::new();
    let mut ticks = tokio::time::interval_at(
        (started + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    let progress = |open: u64| {
        eprintln!(
            "[{:>4.0}s] {open} connections open",
            started.elapsed().as_secs_f64()
        );
    };
    for i in 0..args.clients {
        if args.rate > 0.0 {
            let due = started + Duration::from_secs_f64(f64::from(i) / args.rate);
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(due.into()) => break,
                    _ = ticks.tick() => progress(open.load(Relaxed)),
                }
            }
        }
        let permits = permits.clone();
        let endpoint = endpoints[i as usize % endpoints.len()].clone();
        let session = SessionOptions::clean(ctx.client_id('c', i));
        let (stopped, results, open) = (stopped.clone(), results.clone(), open.clone());
        let inbox = Inbox::new(ctx.run, 0, started, started);
        connections.spawn(async move {
            let permit = permits.acquire_owned().await?;
            let t = Instant::now();
            let connected = Conn::connect(&endpoint, &session).await;
            drop(permit);
            match connected {
                Ok((conn, _)) => {
                    open.fetch_add(1, Relaxed);
                    let _ = results.send(Some(t.elapsed()));
                    let driver = Driver::new(conn, stopped, Arc::new(Counters::default()), inbox);
                    let outcome = driver.run().await;
                    open.fetch_sub(1, Relaxed);
                    outcome.error.map_or(Ok(()), Err)
                }
                Err(e) => {
                    let _ = results.send(None);
                    Err(e)
                }
            }
        });
    }
    drop(results);
    let mut connect = ConnectLog::default();
    // Every attempt reports once (progress ticks are not attempts).
    while connect.attempted < u64::from(args.clients) {
        tokio::select! {
            result = handshakes.recv() => match result {
                Some(Some(took)) => connect.established(took),
                Some(None) => connect.failed(),
                None => break,
            },
            _ = ticks.tick() => progress(open.load(Relaxed)),
        }
    }
    connect.elapsed = started.elapsed();
    let loaded = ctx.sample()?;
    let held = Instant::now() + args.duration;
    while Instant::now() < held {
        tokio::select! {
            () = tokio::time::sleep_until(held.into()) => {}
            _ = ticks.tick() => progress(open.load(Relaxed)),
        }
    }
    let still_open = open.load(Relaxed);
    let end = ctx.sample()?;
    let me_end = crate::procfs::sample(std::process::id())?;
    stop.send_replace(true);
    let mut errors = Errors::default();
    for result in connections.join_all().await {
        if let Err(error) = result {
            errors.push(&error);
        }
    }

    let brokers = match args.addrs.len() {
        0 | 1 => String::new(),
        n => format!(" over {n} brokers"),
    };
    let mut summary = ctx.summary(
        "conn",
        format!(
            "{} idle connections{brokers} at {}, held {:?}",
            args.clients,
            if args.rate > 0.0 {
                format!("{} conn/s", args.rate)
            } else {
                "max rate".to_owned()
            },
            args.duration
        ),
    );
    summary.duration_s = args.duration.as_secs_f64();
    summary.connect = connect.stats();
    summary.load_tool = Some(BrokerUsage::between(me_before, me_before, me_end, me_end));
    if let (Some(before), Some(loaded), Some(end)) = (before, loaded, end) {
        summary.broker = Some(
            BrokerUsage::between(before, before, end, loaded)
                .per_connection(summary.connect.established),
        );
    }
    if still_open < summary.connect.established {
        errors.push(&anyhow::anyhow!(
            "{} connections were closed while held",
            summary.connect.established - still_open
        ));
    }
    errors.store(&mut summary);
    Ok(summary)
}

/// The endpoints `conn` connects to: every `--addr` (or --host/--port) from every `--bind`
/// address, in round-robin order.
fn endpoints(ctx: &Context, args: &ConnArgs) -> Result<Vec<Endpoint>> {
    let mut brokers = Vec::new();
    for addr in &args.addrs {
        brokers.push(ctx.endpoint_at(Some(addr))?);
    }
    if brokers.is_empty() {
        brokers.push(ctx.endpoint.clone());
    }
    if args.binds.is_empty() {
        return Ok(brokers);
    }
    // Every broker gets connections from every source address, whatever the two counts.
    let n = brokers.len() * args.binds.len();
    Ok((0..n)
        .map(|i| Endpoint {
            local: Some(args.binds[(i / brokers.len()) % args.binds.len()]),
            ..brokers[i % brokers.len()].clone()
        })
        .collect())
}

/// What one churning client did.
#[derive(Debug, Default)]
struct Churner {
    cycles: u64,
    resumed: u64,
    lost: u64,
    connect: ConnectLog,
    errors: Errors,
}

/// `--clients` clients reconnect in a loop for `--duration` with persistent sessions: each
/// connects with clean start false, subscribes if its session is new, and disconnects. Their
/// sessions are removed at the end (clean start, no expiry).
pub async fn churn(ctx: &Context, args: &ChurnArgs) -> Result<Summary> {
    let before = ctx.sample()?;
    let started = Instant::now();
    let deadline = started + args.duration;
    let loaded = ctx.sample_at(deadline);
    let cycles = Arc::new(AtomicU64::new(0));
    let mut clients = JoinSet::new();
    for i in 0..args.clients {
        let endpoint = ctx.endpoint.clone();
        let session = SessionOptions {
            client_id: ctx.client_id('c', i),
            clean_start: false,
            expiry: args.session_expiry,
            will: None,
        };
        let filter = ctx.topic(&format!("churn/{i}"));
        let qos = qos(args.qos);
        let cycles = cycles.clone();
        clients.spawn(async move {
            let mut me = Churner::default();
            while Instant::now() < deadline {
                match me.cycle(&endpoint, &session, &filter, qos).await {
                    Ok(()) => {
                        me.cycles += 1;
                        cycles.fetch_add(1, Relaxed);
                    }
                    Err(e) => {
                        me.errors.push(&e);
                        // Do not spin on a broker that refuses connections.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            let clean = SessionOptions::clean(session.client_id);
            let removed = async { Conn::connect(&endpoint, &clean).await?.0.close().await };
            if let Err(e) = removed.await {
                me.errors.push(&e.context("removing the session"));
            }
            me
        });
    }
    let mut ticks = tokio::time::interval_at(
        (started + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    let mut last = 0;
    let mut churners = Vec::new();
    loop {
        tokio::select! {
            joined = clients.join_next() => match joined {
                Some(churner) => churners.push(churner?),
                None => break,
            },
            _ = ticks.tick() => {
                let now = cycles.load(Relaxed);
                eprintln!("[{:>4.0}s] {} cycles/s", started.elapsed().as_secs_f64(), now - last);
                last = now;
            }
        }
    }

    let mut total = Churner::default();
    for churner in churners {
        total.cycles += churner.cycles;
        total.resumed += churner.resumed;
        total.lost += churner.lost;
        total.connect.merge(&churner.connect)?;
        total.errors.extend(churner.errors);
    }
    total.connect.elapsed = args.duration;
    let mut summary = ctx.summary(
        "churn",
        format!(
            "{} clients, persistent sessions (expiry {} s), QoS {} subscription",
            args.clients, args.session_expiry, args.qos
        ),
    );
    summary.duration_s = args.duration.as_secs_f64();
    summary.connect = total.connect.stats();
    let mut churn = ChurnStats {
        clients: args.clients.into(),
        cycles: total.cycles,
        cycles_per_s: total.cycles as f64 / args.duration.as_secs_f64(),
        resumed: total.resumed,
        lost: total.lost,
        broker_cpu_us_per_cycle: None,
        broker_sys_us_per_cycle: None,
    };
    if let (Some(before), Some(loaded)) = (before, loaded.await??) {
        let usage = BrokerUsage::between(before, before, loaded, loaded);
        churn.broker_cpu_us_per_cycle =
            (total.cycles > 0).then(|| usage.cpu_seconds * 1e6 / total.cycles as f64);
        churn.broker_sys_us_per_cycle =
            (total.cycles > 0).then(|| usage.sys_seconds * 1e6 / total.cycles as f64);
        summary.broker = Some(usage);
    }
    summary.churn = Some(churn);
    total.errors.store(&mut summary);
    Ok(summary)
}

impl Churner {
    /// Connects, subscribes if the session is new, disconnects.
    async fn cycle(
        &mut self,
        endpoint: &Endpoint,
        session: &SessionOptions,
        filter: &str,
        qos: QoS,
    ) -> Result<()> {
        let t = Instant::now();
        let (mut conn, present) = match Conn::connect(endpoint, session).await {
            Ok(connected) => connected,
            Err(e) => {
                self.connect.failed();
                return Err(e);
            }
        };
        self.connect.established(t.elapsed());
        if present {
            self.resumed += 1;
        } else {
            if self.cycles > 0 {
                self.lost += 1;
            }
            conn.subscribe(filter, qos, endpoint.timeout).await?;
        }
        conn.close().await
    }
}
