//! Administrative introspection and actions on the broker (what the admin API shows and does),
//! as plain data: listings of clients, subscriptions and retained messages, kicking a client,
//! clearing a retained message. Nothing here is on the hot path; listings copy what they show.

use super::{Broker, UNFENCED};
use crate::durability::{Commit, StateChange};
use crate::message::Message;
use crate::session::{ConnectionInfo, Session};
use crate::topic::matches;
use raftmq_codec::{ReasonCode, RetainHandling};
use std::sync::Arc;

/// One client (session) as the admin API lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientSummary {
    pub client_id: String,
    /// Whether a connection is attached.
    pub connected: bool,
    /// What the current (or last) connection of this node said in CONNECT; `None` for a session
    /// recovered from storage that has not reconnected since.
    pub connection: Option<ConnectionInfo>,
    /// Session Expiry Interval in seconds (`u32::MAX`: never).
    pub session_expiry_secs: u32,
    /// Whether the session is recorded in durable storage.
    pub persistent: bool,
    pub subscriptions: usize,
    /// Messages sent and not yet acknowledged.
    pub inflight: usize,
    /// Messages waiting to be sent.
    pub queued: usize,
}

/// One subscription as the admin API lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionSummary {
    pub client_id: String,
    /// The filter as subscribed (with `$share/group/` for a shared subscription).
    pub filter: String,
    pub share_group: Option<String>,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0, 1 or 2 (MQTT 5 §3.8.3.1).
    pub retain_handling: u8,
    pub subscription_id: Option<u32>,
}

/// What [`Broker::kick`] did.
#[derive(Debug)]
pub enum Kicked {
    /// No session with that client id.
    NotFound,
    /// The session exists but no connection is attached (and it was kept).
    NotConnected,
    /// The connection was told to close; the session is kept.
    Disconnected,
    /// The session was discarded (its connection, if any, told to close); the commit of its
    /// end resolves when that is durable.
    SessionDiscarded { was_connected: bool, commit: Commit },
}

fn summary(session: &Session) -> ClientSummary {
    let st = session.lock_unfenced(UNFENCED);
    ClientSummary {
        client_id: session.client_id().to_string(),
        connected: st.online,
        connection: st.connection.clone(),
        session_expiry_secs: st.expiry_secs,
        persistent: session.is_durable(),
        subscriptions: st.subscriptions.len(),
        inflight: st.outgoing.len(),
        queued: st.queue.len(),
    }
}

fn subscriptions_of(session: &Session) -> Vec<SubscriptionSummary> {
    session
        .subscriptions()
        .into_iter()
        .map(|rec| {
            let filter = match &rec.share_group {
                Some(group) => format!("$share/{group}/{}", rec.filter.as_str()),
                None => rec.filter.as_str().to_owned(),
            };
            let o = rec.entry.options;
            SubscriptionSummary {
                client_id: session.client_id().to_string(),
                filter,
                share_group: rec.share_group.as_deref().map(str::to_owned),
                qos: o.qos.as_u8(),
                no_local: o.no_local,
                retain_as_published: o.retain_as_published,
                retain_handling: match o.retain_handling {
                    RetainHandling::SendAtSubscribe => 0,
                    RetainHandling::SendIfNew => 1,
                    RetainHandling::DoNotSend => 2,
                },
                subscription_id: rec.entry.subscription_id,
            }
        })
        .collect()
}

impl Broker {
    /// Sessions whose client id starts with `prefix`, sorted by client id.
    pub fn list_clients(&self, prefix: &str) -> Vec<ClientSummary> {
        let mut sessions: Vec<Arc<Session>> = self
            .sessions
            .lock()
            .values()
            .filter(|s| s.client_id().starts_with(prefix))
            .cloned()
            .collect();
        sessions.sort_by(|a, b| a.client_id().cmp(b.client_id()));
        sessions.iter().map(|s| summary(s)).collect()
    }

    /// One client and its subscriptions.
    pub fn inspect_client(
        &self,
        client_id: &str,
    ) -> Option<(ClientSummary, Vec<SubscriptionSummary>)> {
        let session = self.session(client_id)?;
        Some((summary(&session), subscriptions_of(&session)))
    }

    /// Subscriptions of clients whose id starts with `client_prefix` and (when `topic` is
    /// given) whose filter matches that topic name, sorted by client id then filter.
    pub fn list_subscriptions(
        &self,
        client_prefix: &str,
        topic: Option<&str>,
    ) -> Vec<SubscriptionSummary> {
        let mut sessions: Vec<Arc<Session>> = self
            .sessions
            .lock()
            .values()
            .filter(|s| s.client_id().starts_with(client_prefix))
            .cloned()
            .collect();
        sessions.sort_by(|a, b| a.client_id().cmp(b.client_id()));
        sessions
            .iter()
            .flat_map(|s| subscriptions_of(s))
            .filter(|sub| {
                topic.is_none_or(|t| {
                    let bare = match &sub.share_group {
                        Some(g) => sub
                            .filter
                            .strip_prefix(&format!("$share/{g}/"))
                            .unwrap_or(&sub.filter)
                            .to_owned(),
                        None => sub.filter.clone(),
                    };
                    matches(&bare, t)
                })
            })
            .collect()
    }

    /// Retained messages whose topic matches `filter` (all of them, `$` topics included, when
    /// `None`), sorted by topic. An invalid filter matches nothing.
    pub fn list_retained(&self, filter: Option<&str>) -> Vec<Arc<Message>> {
        let mut found: Vec<Arc<Message>> = match filter {
            Some(f) => self
                .retained
                .matching(f, usize::MAX)
                .into_iter()
                .map(|(_, m)| m)
                .collect(),
            None => {
                let mut all = Vec::new();
                self.retained.for_each(|_, m| all.push(m.clone()));
                all
            }
        };
        found.sort_by(|a, b| a.topic.cmp(&b.topic));
        found
    }

    /// Clears the retained message of `topic` (durably): `None` when there was none, else the
    /// commit of the change.
    pub fn clear_retained(&self, topic: &str) -> Option<Commit> {
        let removed = self.remove_retained(topic)?;
        let changes = if removed.topic.starts_with("$SYS/") {
            Vec::new()
        } else {
            vec![StateChange::RetainedCleared {
                topic: removed.topic.clone(),
            }]
        };
        Some(self.propose(changes))
    }

    /// Disconnects the client `client_id` by administrative action: its connection closes,
    /// telling an MQTT 5 client DISCONNECT `code` (0x98 Administrative action). With
    /// `discard_session` the session is also ended (durably; no will is published), online or
    /// not; otherwise it stays (a will is handled as after any server-initiated disconnect).
    pub fn kick(&self, client_id: &str, code: ReasonCode, discard_session: bool) -> Kicked {
        let Some(session) = self.session(client_id) else {
            return Kicked::NotFound;
        };
        let online = {
            let mut st = session.lock_unfenced(UNFENCED);
            if st.online {
                st.kick = Some(code);
                Session::notify(&mut st);
            }
            st.online
        };
        if discard_session {
            return match self.end_session(client_id) {
                Some(commit) => Kicked::SessionDiscarded {
                    was_connected: online,
                    commit,
                },
                None => Kicked::NotFound,
            };
        }
        if online {
            Kicked::Disconnected
        } else {
            Kicked::NotConnected
        }
    }
}
