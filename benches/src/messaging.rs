//! The message scenarios (p2p, fanout, fanin, shared): one engine, four topologies.
//!
//! Timeline: subscribers connect and subscribe, then publishers connect; publishing starts for
//! everyone at once and lasts warm-up + duration; then up to `--drain` for acknowledgements and
//! messages in transit, ending early once every expected copy has arrived.
//!
//! The measured window is the `--duration` after the warm-up. Offered rate: messages published
//! in it; delivered rate: first receipts arriving in it (so an overloaded broker still
//! delivering a backlog shows its real delivery rate); broker CPU per message: CPU time in it
//! divided by those receipts. Latency covers the messages published in the window, whenever
//! they arrive. Loss, duplicates and ordering cover the whole run, warm-up and drain included.

use crate::accounting::{Sent, Tally, tally_each, tally_group};
use crate::cli::LoadArgs;
use crate::client::{
    Conn, Counters, Driver, Inbox, Outcome, Plan, SessionOptions, latency_histogram,
};
use crate::context::{Context, Progress, qos};
use crate::payload::STAMP_LEN;
use crate::procfs::BrokerUsage;
use crate::summary::{Errors, MessageStats, Percentiles, Summary};
use anyhow::{Result, ensure};
use raftmq_codec::ByteStr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Who publishes where and who listens to whom.
pub struct Topology {
    scenario: &'static str,
    description: String,
    /// The topic of each publisher (the index is the publisher id).
    publishers: Vec<String>,
    subscribers: Vec<Subscriber>,
    /// The subscribers form one shared group: each message must reach exactly one of them.
    shared: bool,
}

struct Subscriber {
    filter: String,
    /// The publishers whose every message this subscriber must receive.
    hears: Vec<u32>,
}

impl Topology {
    /// `n` publisher/subscriber pairs on their own topics.
    pub fn p2p(ctx: &Context, n: u32) -> Self {
        let topic = |i| ctx.topic(&format!("p2p/{i}"));
        Topology {
            scenario: "p2p",
            description: format!("{n} pairs"),
            publishers: (0..n).map(topic).collect(),
            subscribers: (0..n)
                .map(|i| Subscriber {
                    filter: topic(i),
                    hears: vec![i],
                })
                .collect(),
            shared: false,
        }
    }

    /// One publisher, `n` subscribers of its topic.
    pub fn fanout(ctx: &Context, n: u32) -> Self {
        let topic = ctx.topic("fanout");
        Topology {
            scenario: "fanout",
            description: format!("1 publisher → {n} subscribers"),
            publishers: vec![topic.clone()],
            subscribers: (0..n)
                .map(|_| Subscriber {
                    filter: topic.clone(),
                    hears: vec![0],
                })
                .collect(),
            shared: false,
        }
    }

    /// `n` publishers on their own topics, one wildcard subscriber.
    pub fn fanin(ctx: &Context, n: u32) -> Self {
        Topology {
            scenario: "fanin",
            description: format!("{n} publishers → 1 subscriber (+)"),
            publishers: (0..n).map(|i| ctx.topic(&format!("fanin/{i}"))).collect(),
            subscribers: vec![Subscriber {
                filter: ctx.topic("fanin/+"),
                hears: (0..n).collect(),
            }],
            shared: false,
        }
    }

    /// `publishers` publishers on one topic, a shared group of `n` subscribers.
    pub fn shared(ctx: &Context, n: u32, publishers: u32) -> Self {
        let topic = ctx.topic("shared");
        Topology {
            scenario: "shared",
            description: format!("{publishers} publisher(s) → group of {n} subscribers"),
            publishers: vec![topic.clone(); publishers as usize],
            subscribers: (0..n)
                .map(|_| Subscriber {
                    filter: format!("$share/bench/{topic}"),
                    hears: (0..publishers).collect(),
                })
                .collect(),
            shared: true,
        }
    }

    /// How many copies of a message of `publisher` must be delivered.
    fn copies(&self, publisher: u32) -> u64 {
        if self.shared {
            1
        } else {
            self.subscribers
                .iter()
                .filter(|s| s.hears.contains(&publisher))
                .count() as u64
        }
    }
}

/// Runs `topology` with the load options `args`.
pub async fn run(ctx: &Context, args: &LoadArgs, topology: Topology) -> Result<Summary> {
    ensure!(
        args.payload >= STAMP_LEN,
        "--payload must be at least {STAMP_LEN} bytes"
    );
    ensure!(
        args.rate >= 0.0 && args.rate.is_finite(),
        "--rate must be a number ≥ 0"
    );
    let pub_endpoint = ctx.endpoint_at(args.sides.pub_addr.as_deref())?;
    let sub_endpoint = ctx.endpoint_at(args.sides.sub_addr.as_deref())?;
    let qos = qos(args.qos);
    const ROUTE_SETTLE: std::time::Duration = std::time::Duration::from_millis(500);
    let publishers = topology.publishers.len() as u32;
    let before = ctx.sample()?;

    // Subscribers first, so that nothing published is missed.
    let (subscribers, sub_connect) = ctx
        .open_all(topology.subscribers.len() as u32, |i| {
            let endpoint = sub_endpoint.clone();
            let session = match args.sub_session_expiry {
                0 => SessionOptions::clean(ctx.client_id('s', i)),
                // A new persistent session: clean start on v5 (with expiry), clean session 0 on
                // 3.1.1 (client ids are unique per run, so nothing old is resumed).
                expiry => SessionOptions {
                    client_id: ctx.client_id('s', i),
                    clean_start: ctx.common.mqtt_version == 5,
                    expiry,
                    will: None,
                },
            };
            let filter = topology.subscribers[i as usize].filter.clone();
            async move {
                let (mut conn, _) = Conn::connect(&endpoint, &session).await?;
                conn.subscribe(&filter, qos, endpoint.timeout).await?;
                Ok(conn)
            }
        })
        .await?;
    // Across cluster nodes a subscription reaches the publishers' node asynchronously (route
    // announcements between nodes): give it a moment so the run measures steady-state routing,
    // not subscription propagation.
    if args.sides.pub_addr != args.sides.sub_addr {
        tokio::time::sleep(ROUTE_SETTLE).await;
    }
    let (publisher_conns, pub_connect) = ctx
        .open_all(publishers, |i| {
            let endpoint = pub_endpoint.clone();
            let session = SessionOptions::clean(ctx.client_id('p', i));
            async move { Ok(Conn::connect(&endpoint, &session).await?.0) }
        })
        .await?;

    let start = Instant::now();
    let measure_from = start + args.warmup;
    let until = measure_from + args.duration;
    let deadline = until + args.drain;
    let counters = Arc::new(Counters::default());
    let (stop, stopped) = watch::channel(false);
    let cpu_start = ctx.sample_at(measure_from);
    let cpu_end = ctx.sample_at(until);

    let mut subscriber_tasks = JoinSet::new();
    for (i, conn) in subscribers.into_iter().enumerate() {
        let inbox = Inbox::new(ctx.run, publishers, measure_from, until);
        let driver = Driver::new(conn, stopped.clone(), counters.clone(), inbox);
        subscriber_tasks.spawn(async move { (i, driver.run().await) });
    }
    let rate = (args.rate > 0.0).then(|| args.rate / f64::from(publishers));
    let mut publisher_tasks = JoinSet::new();
    for (i, conn) in publisher_conns.into_iter().enumerate() {
        let plan = Plan {
            run: ctx.run,
            publisher: i as u32,
            topics: vec![ByteStr::from(topology.publishers[i].as_str())],
            qos,
            retain: false,
            payload: Some(args.payload),
            count: None,
            rate,
            window: args.inflight,
            start,
            until: Some(until),
            measure_from,
        };
        let inbox = Inbox::new(ctx.run, 0, measure_from, until);
        let driver = Driver::new(conn, stopped.clone(), counters.clone(), inbox).publishing(plan);
        publisher_tasks.spawn(async move { (i, driver.run().await) });
    }

    // Publishers end by themselves once done and acknowledged, or at the deadline.
    let mut progress = Progress::new(counters.clone(), topology.copies(0));
    let mut ticks = tokio::time::interval_at(
        (start + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    let hard_stop = tokio::time::sleep_until(deadline.into());
    tokio::pin!(hard_stop);
    let mut published = Vec::new();
    loop {
        tokio::select! {
            joined = publisher_tasks.join_next() => match joined {
                Some(joined) => published.push(joined?),
                None => break,
            },
            _ = ticks.tick() => progress.tick(),
            () = &mut hard_stop, if !*stop.borrow() => { stop.send_replace(true); }
        }
    }
    published.sort_by_key(|(i, _)| *i);
    let published: Vec<Outcome> = published.into_iter().map(|(_, o)| o).collect();
    let sent = Sent(published.iter().map(|o| o.sent).collect());

    // Wait for the copies still in transit.
    let expected: u64 = (0..publishers)
        .map(|p| sent.0[p as usize] * topology.copies(p))
        .sum();
    while counters.received.load(Relaxed) < expected && Instant::now() < deadline {
        tokio::select! {
            _ = ticks.tick() => progress.tick(),
            () = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
    stop.send_replace(true);
    let mut received: Vec<_> = subscriber_tasks.join_all().await;
    received.sort_by_key(|(i, _)| *i);
    let received: Vec<Outcome> = received.into_iter().map(|(_, o)| o).collect();

    let mut summary = ctx.summary(
        topology.scenario,
        format!(
            "{}, QoS {}, {} B payload, {}",
            topology.description,
            args.qos,
            args.payload,
            match rate {
                Some(_) => format!("{} msg/s", args.rate),
                None => "max rate".to_owned(),
            }
        ),
    );
    let window = args.duration.as_secs_f64();
    summary.qos = Some(args.qos);
    summary.rate_per_s = rate.map(|_| args.rate);
    summary.duration_s = window;
    let mut connect = sub_connect;
    connect.merge(&pub_connect)?;
    summary.connect = connect.stats();

    let tally = if topology.shared {
        let logs: Vec<_> = received.iter().map(|o| &o.inbox.log).collect();
        tally_group(&logs, &sent, &(0..publishers).collect::<Vec<_>>())
    } else {
        let mut tally = Tally::default();
        for (subscriber, outcome) in topology.subscribers.iter().zip(&received) {
            tally += tally_each(&outcome.inbox.log, &sent, &subscriber.hears);
        }
        tally
    };
    let measured: u64 = received.iter().map(|o| o.inbox.measured).sum();
    let mut latency = latency_histogram();
    for h in received.iter().filter_map(|o| o.inbox.latency.as_ref()) {
        latency.add(h)?;
    }
    summary.latency_us = Percentiles::of(&latency, 1.0);
    summary.messages = Some(MessageStats {
        published: sent.0.iter().sum(),
        acked: published.iter().map(|o| o.acked).sum(),
        rejected: published.iter().map(|o| o.rejected).sum(),
        unacked: published.iter().map(|o| u64::from(o.unacked)).sum(),
        tally,
        foreign: received.iter().map(|o| o.inbox.foreign).sum(),
        offered_per_s: published.iter().map(|o| o.sent_measured).sum::<u64>() as f64 / window,
        delivered_per_s: measured as f64 / window,
        loss_ratio: if tally.expected == 0 {
            0.0
        } else {
            tally.lost as f64 / tally.expected as f64
        },
    });
    if let (Some(before), Some(start), Some(end)) = (before, cpu_start.await??, cpu_end.await??) {
        summary.broker = Some(BrokerUsage::between(before, start, end, end).per_message(measured));
    }
    let mut errors = Errors::default();
    for error in published
        .iter()
        .chain(&received)
        .filter_map(|o| o.error.as_ref())
    {
        errors.push(error);
    }
    errors.store(&mut summary);
    Ok(summary)
}
