//! The retained scenario: store N retained messages (one per topic), subscribe to them all with
//! one `#` filter and time their arrival, then clear them (empty retained publishes).

use crate::accounting::{Sent, tally_each};
use crate::cli::RetainedArgs;
use crate::client::{
    Conn, Counters, Driver, Endpoint, Inbox, Outcome, Plan, SessionOptions, subscribe_packet,
};
use crate::context::{ConnectLog, Context, qos};
use crate::payload::STAMP_LEN;
use crate::procfs::BrokerUsage;
use crate::summary::{Errors, MessageStats, RetainedStats, Summary};
use anyhow::{Result, ensure};
use raftmq_codec::{ByteStr, QoS};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub async fn run(ctx: &Context, args: &RetainedArgs) -> Result<Summary> {
    ensure!(
        args.payload >= STAMP_LEN,
        "--payload must be at least {STAMP_LEN} bytes"
    );
    let pub_endpoint = ctx.endpoint_at(args.sides.pub_addr.as_deref())?;
    let sub_endpoint = ctx.endpoint_at(args.sides.sub_addr.as_deref())?;
    let topics: Vec<ByteStr> = (0..args.topics)
        .map(|i| ctx.topic(&format!("retained/{i}")).into())
        .collect();
    let qos = qos(args.qos);
    let mut connect = ConnectLog::default();
    let mut errors = Errors::default();
    let before = ctx.sample()?;

    // Store.
    let started = Instant::now();
    let stored = publish_all(
        ctx,
        &pub_endpoint,
        &topics,
        Some(args.payload),
        qos,
        args,
        &mut connect,
    )
    .await?;
    let store_time = started.elapsed();
    let loaded = ctx.sample()?;
    ensure!(
        stored.sent == u64::from(args.topics),
        "published {} of {} retained messages within {:?}",
        stored.sent,
        args.topics,
        args.timeout
    );

    // Receive them all.
    let t = Instant::now();
    let (conn, _) =
        Conn::connect(&sub_endpoint, &SessionOptions::clean(ctx.client_id('s', 0))).await?;
    connect.established(t.elapsed());
    connect.elapsed += t.elapsed();
    let counters = Arc::new(Counters::default());
    let (stop, stopped) = watch::channel(false);
    let inbox = Inbox::new(ctx.run, 1, Instant::now(), Instant::now() + args.timeout);
    let driver = Driver::new(conn, stopped, counters.clone(), inbox)
        .sending(&subscribe_packet(&ctx.topic("retained/#"), qos))?;
    let subscribed_at = Instant::now();
    let receiving = tokio::spawn(driver.run());
    let deadline = subscribed_at + args.timeout;
    while counters.received.load(Relaxed) < stored.sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let cpu_end = ctx.sample()?;
    stop.send_replace(true);
    let received = receiving.await?;

    // Clear them, whatever happened.
    let cleared = publish_all(ctx, &pub_endpoint, &topics, None, qos, args, &mut connect).await?;

    let tally = tally_each(&received.inbox.log, &Sent(vec![stored.sent]), &[0]);
    let all_received = tally.delivered == stored.sent;
    let receive_time = received
        .inbox
        .last_new_at
        .filter(|_| all_received)
        .map(|at| at.duration_since(subscribed_at).as_secs_f64());
    let mut summary = ctx.summary(
        "retained",
        format!(
            "{} topics, QoS {}, {} B payload",
            args.topics, args.qos, args.payload
        ),
    );
    summary.qos = Some(args.qos);
    summary.duration_s = receive_time.unwrap_or(args.timeout.as_secs_f64());
    summary.connect = connect.stats();
    summary.retained = Some(RetainedStats {
        topics: args.topics.into(),
        store_ms: store_time.as_secs_f64() * 1000.0,
        receive_all_ms: receive_time.map(|s| s * 1000.0),
        receive_per_s: receive_time.map(|s| stored.sent as f64 / s),
    });
    summary.messages = Some(MessageStats {
        published: stored.sent,
        acked: stored.acked,
        rejected: stored.rejected,
        unacked: stored.unacked.into(),
        tally,
        foreign: received.inbox.foreign,
        offered_per_s: stored.sent as f64 / store_time.as_secs_f64(),
        delivered_per_s: receive_time.map_or(0.0, |s| tally.delivered as f64 / s),
        loss_ratio: tally.lost as f64 / stored.sent as f64,
    });
    // Over the store and receive phases: the receive phase alone is often shorter than the
    // 10 ms resolution of the CPU counters.
    if let (Some(before), Some(end), Some(loaded)) = (before, cpu_end, loaded) {
        summary.broker = Some(BrokerUsage::between(before, before, end, loaded));
    }
    for outcome in [&stored, &received, &cleared] {
        if let Some(error) = &outcome.error {
            errors.push(error);
        }
    }
    if cleared.sent < stored.sent {
        errors.push(&anyhow::anyhow!(
            "cleared only {} of {} retained topics",
            cleared.sent,
            stored.sent
        ));
    }
    errors.store(&mut summary);
    Ok(summary)
}

/// Publishes one retained message to each of `topics` from a new connection, with a stamped
/// payload of `payload` bytes, or an empty one (which clears the topic). Waits for the
/// acknowledgements, at most `--timeout`.
async fn publish_all(
    ctx: &Context,
    endpoint: &Endpoint,
    topics: &[ByteStr],
    payload: Option<usize>,
    qos: QoS,
    args: &RetainedArgs,
    connect: &mut ConnectLog,
) -> Result<Outcome> {
    let t = Instant::now();
    let (conn, _) = Conn::connect(endpoint, &SessionOptions::clean(ctx.client_id('p', 0))).await?;
    connect.established(t.elapsed());
    connect.elapsed += t.elapsed();
    let now = Instant::now();
    let plan = Plan {
        run: ctx.run,
        publisher: 0,
        topics: topics.to_vec(),
        qos,
        retain: true,
        payload,
        count: Some(topics.len() as u64),
        rate: None,
        window: args.inflight,
        start: now,
        until: None,
        measure_from: now,
    };
    let (stop, stopped) = watch::channel(false);
    let inbox = Inbox::new(ctx.run, 0, now, now);
    let mut publishing = tokio::spawn(
        Driver::new(conn, stopped, Arc::new(Counters::default()), inbox)
            .publishing(plan)
            .run(),
    );
    tokio::select! {
        done = &mut publishing => Ok(done?),
        () = tokio::time::sleep(args.timeout) => {
            stop.send_replace(true);
            Ok(publishing.await?)
        }
    }
}
