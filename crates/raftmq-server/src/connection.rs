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
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Poll, ready};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Sleep;
use tracing::debug;

use crate::drain::{Drain, Phase};
use crate::limits::Permit;
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
    /// The node's drain: once started, the connection finishes its work and says goodbye.
    pub drain: Arc<Drain>,
    /// The connection's place in the admission counts, held until it closes.
    pub permit: Permit,
}
/// Upper bound on an asynchronous authentication decision: a little more than the longest
/// `auth.callout_timeout` ([`crate::auth::MAX_CALLOUT_TIMEOUT`]), so it only cuts a backend
/// without a timeout of its own, or a password check queued behind a storm (0x88, retry later).
const AUTH_TIMEOUT: Duration = Duration::from_secs(11);

/// Serves one client on `stream` (any transport) until it closes. `peer` is the client's
/// address (from the PROXY header when the listener uses one).
///
/// The future returned is most of an idle connection's memory (it is the connection's task),
/// so it is kept small on purpose: the state machine is built before the `async` block (its
/// inputs are not kept as well), the block rather than an `async fn` (which stores its
/// arguments twice), one watch on the server's [`Phase`] rather than one per event, and one
/// timer re-armed only when a deadline comes closer (a later one is picked up when it fires).
pub(crate) fn run<S>(
    mut stream: S,
    peer: SocketAddr,
    broker: Arc<Broker>,
    opts: ConnOptions,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin,
{
    let mut conn = Connection::new(broker, Some(peer), Instant::now());
    conn.set_cert_identity(opts.cert_identity);
    if let Some(code) = opts.refusal {
        conn.refuse(code);
    }
    let open = opts.drain.track();
    let permit = opts.permit;
    async move {
        gauge!(CONNECTIONS_CURRENT).increment(1.0);
        // The connection's one timer; `armed` while it runs (its deadline is the timer's).
        let mut timer = std::pin::pin!(tokio::time::sleep_until(tokio::time::Instant::now()));
        let mut armed = false;
        let mut stalled = false;
        let mut rbuf = BytesMut::new();
        let mut wbuf = BytesMut::new();
        let mut more = false;
        // The next change of the server's phase; one waiter for the connection's life (a new
        // one per loop pass would lock the drain's waiter list, shared by every connection,
        // twice per pass). A connection accepted as the drain began is told at once.
        let mut seen = Phase::Serving;
        let mut next = std::pin::pin!(open.drain().next_phase(seen));
        loop {
            // Every pass spends coop budget, so a connection with work ready on every pass
            // still lets the worker run other tasks now and then.
            tokio::task::consume_budget().await;
            // Once draining: stop reading, finish the commits in flight, then close (by the
            // drain's deadline).
            let draining = seen != Phase::Serving;
            if seen == Phase::Stopping {
                // Closes the connection: this is the last pass.
                conn.handle_shutdown(ReasonCode::SERVER_SHUTTING_DOWN, Instant::now());
            }
            // Write everything produced so far in one go.
            while let Some(packet) = conn.poll_transmit() {
                if let Err(e) = encode(&packet, conn.version(), &mut wbuf) {
                    debug!(peer = ?conn.peer(), error = %e, "dropping unencodable packet");
                }
            }
            if !wbuf.is_empty() {
                // While the client does not read, neither do we: memory stays at one write batch.
                // A client that accepts none of our bytes for this long is disconnected.
                let stall = permit.limits().write_stall_timeout.0;
                match write_out(&mut stream, &wbuf, timer.as_mut(), stall, &mut armed).await {
                    Ok(true) => wbuf.clear(),
                    Err(_) => {
                        conn.handle_transport_closed(Instant::now());
                        break;
                    }
                    Ok(false) => {
                        debug!(peer = ?conn.peer(), "client stopped reading: disconnecting");
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
            let drain_deadline = if draining {
                let deadline = open.drain().deadline().unwrap_or_else(Instant::now);
                if conn.pending_commit().is_none() || Instant::now() >= deadline {
                    conn.handle_drain(open.drain().server_reference(), Instant::now());
                    continue;
                }
                Some(deadline)
            } else {
                None
            };
            // CONNECT waits for a slow authentication (password hash, HTTP callout): the socket is
            // not read meanwhile (packets already decoded are held by the state machine).
            if let Some(mut pending) = conn.take_pending_auth() {
                // The connection's timer bounds the wait (re-armed for its own deadline after).
                let limit = Instant::now() + AUTH_TIMEOUT;
                timer.as_mut().reset(tokio::time::Instant::from_std(limit));
                armed = true;
                let result = loop {
                    tokio::select! {
                        r = &mut pending => break r,
                        () = &mut timer => {
                            armed = false;
                            break Err(ReasonCode::SERVER_UNAVAILABLE);
                        }
                        // A drain lets the decision finish; a stop does not.
                        p = &mut next, if seen != Phase::Stopping => {
                            seen = p;
                            next.set(open.drain().next_phase(seen));
                            if p == Phase::Stopping {
                                break Err(ReasonCode::SERVER_UNAVAILABLE);
                            }
                        }
                    }
                };
                let now = Instant::now();
                conn.handle_auth_result(result, now);
                more = conn.pump(now, PUMP_BATCH);
                continue;
            }
            if more && !draining {
                more = conn.pump(Instant::now(), PUMP_BATCH);
                continue;
            }
            let deadline = match (conn.poll_timeout(), drain_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            // Re-armed only for an earlier deadline: the timer firing early costs one pass,
            // re-arming on every packet (keep alive moves with each) costs a timer-wheel update.
            if let Some(d) = deadline
                && (!armed || d < timer.deadline().into_std())
            {
                timer.as_mut().reset(tokio::time::Instant::from_std(d));
                armed = true;
            }
            let pending_commit = conn.pending_commit();
            // Backpressure: while a subscriber this client publishes to is congested, its
            // socket is not read (its TCP window fills, so it slows down), for a bounded time.
            let paused = conn.reading_paused();
            tokio::select! {
                p = &mut next, if seen != Phase::Stopping => {
                    seen = p;
                    next.set(open.drain().next_phase(seen));
                }
                read = poll_fn(|cx| {
                    if rbuf.capacity() == rbuf.len() {
                        ready!(stream.poll_read_ready(cx))?;
                        rbuf.reserve(READ_BUFFER);
                    }
                    tokio_util::io::poll_read_buf(Pin::new(&mut stream), cx, &mut rbuf)
                }), if !draining && !paused => {
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
                                        debug!(peer = ?conn.peer(), error = %e, "malformed packet");
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
                _ = poll_fn(|cx| conn.poll_room(cx)), if paused => conn.handle_room(),
                () = &mut timer, if armed => {
                    armed = false;
                    conn.handle_timeout(Instant::now());
                }
                // An acknowledgement held back until its change is durable.
                _ = async move {
                    match pending_commit {
                        Some(c) => { let _ = c.await; }
                        None => std::future::pending().await,
                    }
                } => {
                    // Released acknowledgements (CONNACK above all) unblock deliveries.
                    let now = Instant::now();
                    conn.handle_commits(now);
                    more = conn.pump(now, PUMP_BATCH);
                }
            }
        }
        if !stalled {
            // Bounded: a peer that does not read must not hold the task.
            let stall = permit.limits().write_stall_timeout.0;
            timer.as_mut().reset((Instant::now() + stall).into());
            tokio::select! {
                _ = stream.shutdown() => {}
                () = &mut timer => {}
            }
        }
        let reason = if stalled {
            "write_stall"
        } else {
            conn.close_reason().map_or("transport_closed", close_label)
        };
        counter!(CONNECTIONS_CLOSED_TOTAL, "reason" => reason).increment(1);
        gauge!(CONNECTIONS_CURRENT).decrement(1.0);
        drop(permit);
        debug!(peer = ?conn.peer(), client_id = ?conn.client_id(), reason, "connection closed");
    }
}

/// Writes `buf` and flushes it; `Ok(false)` when the peer accepted no bytes for `stall` (a
/// slow reader that keeps taking bytes is not cut off). The stall clock is the connection's
/// `timer` (`armed` tells whether it runs), armed only once the socket is full: a write that
/// goes straight through costs no timer operation.
fn write_out<'a, S: AsyncWrite + Unpin>(
    stream: &'a mut S,
    buf: &'a [u8],
    mut timer: Pin<&'a mut Sleep>,
    stall: Duration,
    armed: &'a mut bool,
) -> impl Future<Output = std::io::Result<bool>> + 'a {
    let mut written = 0;
    let mut stall_armed = false;
    poll_fn(move |cx| {
        loop {
            let progress = if written < buf.len() {
                match Pin::new(&mut *stream).poll_write(cx, &buf[written..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                    }
                    Poll::Ready(Ok(n)) => {
                        written += n;
                        true
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => false,
                }
            } else {
                match Pin::new(&mut *stream).poll_flush(cx) {
                    Poll::Ready(result) => return Poll::Ready(result.map(|()| true)),
                    Poll::Pending => false,
                }
            };
            if progress {
                stall_armed = false;
                continue;
            }
            if !stall_armed {
                let deadline = Instant::now() + stall;
                timer.as_mut().reset(deadline.into());
                *armed = true;
                stall_armed = true;
            }
            if timer.as_mut().poll(cx).is_ready() {
                *armed = false;
                return Poll::Ready(Ok(false));
            }
            return Poll::Pending;
        }
    })
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
        CloseReason::CredentialsExpired => "credentials_expired",
        CloseReason::ReauthFailed(_) => "reauth_failed",
    }
}
