//! One task per client connection: read → decode → [`Connection`] → encode → write.
//!
//! Writes are batched: every packet the state machine produced since the last write is encoded
//! into one buffer and written with one call. Deliveries are pumped in bounded batches so a
//! connection with a deep queue still reads its socket and notices shutdown.

use bytes::BytesMut;
use metrics::{counter, gauge};
use raftmq_codec::{ReasonCode, decode, encode};
use raftmq_core::{Broker, CloseReason, Connection};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::debug;

use crate::drain::Drain;
use crate::metrics::{CONNECTIONS_CLOSED_TOTAL, CONNECTIONS_CURRENT, DECODE_ERRORS_TOTAL};
use crate::stream::ReadReady;

/// Deliveries moved to the write buffer per wake-up before the socket is serviced again.
const PUMP_BATCH: usize = 256;
/// Read buffer allocated when input arrives: small, grows with the packets a client actually
/// sends. Once every byte read is decoded the buffer is released, so an idle connection holds
/// none (on transports that signal readability, see [`ReadReady`]).
const READ_BUFFER: usize = 512;
/// Write buffers up to this capacity are released after each write.
const WRITE_BUFFER_KEPT: usize = 1024;
/// What the listener knows about a connection before its first byte of MQTT.
pub(crate) struct ConnOptions {
    /// Identity from the verified client certificate (TLS listeners).
    pub cert_identity: Option<String>,
    /// Refuse the CONNECT with this code (over a connection limit).
    pub refusal: Option<ReasonCode>,
    /// A client that accepts none of our bytes for this long is disconnected
    /// (`limits.write_stall_timeout`).
    pub write_stall: Duration,
    /// The node's drain: once started, the connection finishes its work and says goodbye.
    pub drain: Arc<Drain>,
}
/// Upper bound on an asynchronous authentication decision: a little more than the longest
/// `auth.callout_timeout` ([`crate::auth::MAX_CALLOUT_TIMEOUT`]), so it only cuts a backend
/// without a timeout of its own, or a password check queued behind a storm (0x88, retry later).
const AUTH_TIMEOUT: Duration = Duration::from_secs(11);

/// Serves one client on `stream` (any transport) until it closes. `peer` is the client's
/// address (from the PROXY header when the listener uses one).
///
/// An `async` block rather than an `async fn`: the future is most of an idle connection's
/// memory, and an `async fn` stores its arguments twice in it (as arguments and as locals).
#[allow(clippy::manual_async_fn)] // on purpose, see above
pub(crate) fn run<S>(
    mut stream: S,
    peer: SocketAddr,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
    opts: ConnOptions,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin,
{
    async move {
        gauge!(CONNECTIONS_CURRENT).increment(1.0);
        let drain = opts.drain.clone();
        let _open = drain.track();
        let mut drain_started = drain.subscribe();
        // Once draining: stop reading, finish the commits in flight, then close (by the deadline).
        let mut drain_deadline: Option<Instant> = None;
        let mut conn = Connection::new(broker, Some(peer), Instant::now());
        conn.set_cert_identity(opts.cert_identity);
        if let Some(code) = opts.refusal {
            conn.refuse(code);
        }
        let mut stalled = false;
        let mut rbuf = BytesMut::new();
        let mut wbuf = BytesMut::new();
        let mut more = false;
        loop {
            // Every pass spends coop budget, so a connection with work ready on every pass
            // still lets the worker run other tasks now and then.
            tokio::task::consume_budget().await;
            // Write everything produced so far in one go.
            while let Some(packet) = conn.poll_transmit() {
                if let Err(e) = encode(&packet, conn.version(), &mut wbuf) {
                    debug!(%peer, error = %e, "dropping unencodable packet");
                }
            }
            if !wbuf.is_empty() {
                // While the client does not read, neither do we: memory stays at one write batch.
                match write_out(&mut stream, &wbuf, opts.write_stall).await {
                    Ok(true) => wbuf.clear(),
                    Err(_) => {
                        conn.handle_transport_closed(Instant::now());
                        break;
                    }
                    Ok(false) => {
                        debug!(%peer, "client stopped reading: disconnecting");
                        stalled = true;
                        conn.handle_transport_closed(Instant::now());
                        break;
                    }
                }
                // A small buffer is released (an idle connection keeps none; allocating the next
                // one is cheap); a larger one is kept while a burst lasts, up to 64 KiB.
                if wbuf.capacity() <= WRITE_BUFFER_KEPT || wbuf.capacity() > 64 * 1024 {
                    wbuf = BytesMut::new();
                }
            }
            if conn.is_closed() {
                break;
            }
            if let Some(deadline) = drain_deadline
                && (conn.pending_commit().is_none() || Instant::now() >= deadline)
            {
                conn.handle_drain(drain.server_reference(), Instant::now());
                continue;
            }
            // CONNECT waits for a slow authentication (password hash, HTTP callout): the socket is
            // not read meanwhile (packets already decoded are held by the state machine).
            if let Some(pending) = conn.take_pending_auth() {
                let result = tokio::select! {
                    r = tokio::time::timeout(AUTH_TIMEOUT, pending) => {
                        r.unwrap_or(Err(ReasonCode::SERVER_UNAVAILABLE))
                    }
                    _ = shutdown.changed() => Err(ReasonCode::SERVER_UNAVAILABLE),
                };
                let now = Instant::now();
                conn.handle_auth_result(result, now);
                more = conn.pump(now, PUMP_BATCH);
                continue;
            }
            if more && drain_deadline.is_none() {
                more = conn.pump(Instant::now(), PUMP_BATCH);
                continue;
            }
            let deadline = match (conn.poll_timeout(), drain_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
            .map(tokio::time::Instant::from_std);
            let commit = conn.pending_commit();
            tokio::select! {
                _ = crate::drain::started(&mut drain_started), if drain_deadline.is_none() => {
                    drain_deadline = Some(drain.deadline().unwrap_or_else(Instant::now));
                }
                read = async {
                    if rbuf.capacity() == rbuf.len() {
                        poll_fn(|cx| stream.poll_read_ready(cx)).await?;
                        rbuf.reserve(READ_BUFFER);
                    }
                    stream.read_buf(&mut rbuf).await
                }, if drain_deadline.is_none() => {
                    let now = Instant::now();
                    match read {
                        Ok(0) | Err(_) => {
                            conn.handle_transport_closed(now);
                            break;
                        }
                        Ok(_) => {
                            loop {
                                match decode(&mut rbuf, conn.version(), conn.max_incoming_packet_size()) {
                                    Ok(Some(packet)) => {
                                        conn.handle_packet(packet, now);
                                        if conn.is_closed() {
                                            break;
                                        }
                                    }
                                    Ok(None) => {
                                        if rbuf.is_empty() {
                                            // Packets decoded so far own their bytes: drop ours.
                                            rbuf = BytesMut::new();
                                        }
                                        break;
                                    }
                                    Err(e) => {
                                        debug!(%peer, error = %e, "malformed packet");
                                        counter!(DECODE_ERRORS_TOTAL).increment(1);
                                        conn.handle_decode_error(&e, now);
                                        break;
                                    }
                                }
                            }
                            more = conn.pump(now, PUMP_BATCH);
                        }
                    }
                }
                _ = poll_fn(|cx| conn.poll_session(cx)) => {
                    more = conn.pump(Instant::now(), PUMP_BATCH);
                }
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => conn.handle_timeout(Instant::now()),
                // An acknowledgement held back until its change is durable.
                _ = async {
                    match &commit {
                        Some(c) => { let _ = c.clone().await; }
                        None => std::future::pending().await,
                    }
                } => {
                    // Released acknowledgements (CONNACK above all) unblock deliveries.
                    let now = Instant::now();
                    conn.handle_commits(now);
                    more = conn.pump(now, PUMP_BATCH);
                }
                _ = shutdown.changed() => conn.handle_shutdown(ReasonCode::SERVER_SHUTTING_DOWN, Instant::now()),
            }
        }
        if !stalled {
            // Bounded: a peer that does not read must not hold the task.
            let _ = tokio::time::timeout(opts.write_stall, stream.shutdown()).await;
        }
        let reason = if stalled {
            "write_stall"
        } else {
            conn.close_reason().map_or("transport_closed", close_label)
        };
        counter!(CONNECTIONS_CLOSED_TOTAL, "reason" => reason).increment(1);
        gauge!(CONNECTIONS_CURRENT).decrement(1.0);
        debug!(%peer, client_id = ?conn.client_id(), reason, "connection closed");
    }
}

/// Writes `buf` and flushes it; `Ok(false)` when the peer accepted no bytes for `stall` (a
/// slow reader that keeps taking bytes is not cut off).
async fn write_out<S: AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &[u8],
    stall: Duration,
) -> std::io::Result<bool> {
    let mut written = 0;
    while written < buf.len() {
        match tokio::time::timeout(stall, stream.write(&buf[written..])).await {
            Err(_) => return Ok(false),
            Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => written += n,
            Ok(Err(e)) => return Err(e),
        }
    }
    match tokio::time::timeout(stall, stream.flush()).await {
        Err(_) => Ok(false),
        Ok(result) => result.map(|()| true),
    }
}

fn close_label(reason: CloseReason) -> &'static str {
    match reason {
        CloseReason::ClientDisconnect => "client_disconnect",
        CloseReason::TransportClosed => "transport_closed",
        CloseReason::ConnectRefused(_) => "connect_refused",
        CloseReason::ProtocolViolation(_) => "protocol_violation",
        CloseReason::KeepAliveTimeout => "keep_alive_timeout",
        CloseReason::TakenOver => "taken_over",
        CloseReason::ServerShutdown => "server_shutdown",
        CloseReason::StorageUnavailable => "storage_unavailable",
        CloseReason::Kicked => "kicked",
    }
}
