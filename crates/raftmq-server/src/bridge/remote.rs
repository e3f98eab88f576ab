//! The bridge's connection to the remote broker, through rumqttc (its MQTT 3.1.1 and MQTT 5
//! clients behind one small interface). One [`Remote`] is one network connection: it is never
//! reconnected by rumqttc; the bridge makes a new one (after a backoff) when it breaks, so
//! rumqttc keeps no state of its own across connections (what is not acknowledged is resent
//! from the bridge's local session instead).

use super::config::{BridgeConfig, BridgeMqttVersion};
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as p5;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_rustls::rustls;

/// A message received from the remote broker, kept until the local broker has it (then
/// acknowledged to the remote broker with [`Remote::ack`]).
#[derive(Debug)]
pub(crate) enum RemotePublish {
    V4(rumqttc::Publish),
    V5(p5::Publish),
}

impl RemotePublish {
    pub(crate) fn qos(&self) -> u8 {
        match self {
            RemotePublish::V4(p) => p.qos as u8,
            RemotePublish::V5(p) => p.qos as u8,
        }
    }
    pub(crate) fn retain(&self) -> bool {
        match self {
            RemotePublish::V4(p) => p.retain,
            RemotePublish::V5(p) => p.retain,
        }
    }
    pub(crate) fn payload(&self) -> &Bytes {
        match self {
            RemotePublish::V4(p) => &p.payload,
            RemotePublish::V5(p) => &p.payload,
        }
    }
    /// The topic, if it is UTF-8.
    pub(crate) fn topic(&self) -> Option<&str> {
        match self {
            RemotePublish::V4(p) => Some(&p.topic),
            RemotePublish::V5(p) => std::str::from_utf8(&p.topic).ok(),
        }
    }
    pub(crate) fn properties(&self) -> Option<&p5::PublishProperties> {
        match self {
            RemotePublish::V4(_) => None,
            RemotePublish::V5(p) => p.properties.as_ref(),
        }
    }
}

/// What happened on the remote connection, in order.
#[derive(Debug)]
pub(crate) enum RemoteEvent {
    /// CONNACK accepted, with what the remote broker announced (MQTT 5): its Maximum QoS
    /// and Maximum Packet Size.
    Connected {
        session_present: bool,
        max_qos: Option<u8>,
        max_packet_size: Option<u32>,
    },
    /// A PUBLISH request was put on the wire under this packet id (0 for QoS 0), in the order
    /// the requests were made.
    Sent(u16),
    /// The remote broker acknowledged a QoS 1 message (`ok`: with a success reason code).
    PubAck { pkid: u16, ok: bool },
    /// The remote broker received a QoS 2 message (PUBREC).
    PubRec { pkid: u16, ok: bool },
    /// A message from the remote broker.
    Publish(RemotePublish),
    /// SUBACK: the filters refused, by index.
    SubAck { refused: Vec<usize> },
    /// The connection ended (or never came up), with why.
    Closed(String),
}

enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// A connection to the remote broker (its event loop runs in its own task until the connection
/// ends or this is dropped).
pub(crate) struct Remote {
    client: Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Capacity of the request channel: more than can ever be outstanding (the local in-flight
/// window of messages to forward, acknowledgements of the remote's in-flight window, a few
/// control requests), so a request never waits.
fn request_capacity(cfg: &BridgeConfig) -> usize {
    usize::from(cfg.max_inflight) * 2 + 64
}

/// Events waiting for the bridge: when it does not take them (its local side is paused by
/// backpressure), the event loop stops reading the remote connection.
const EVENT_QUEUE: usize = 64;

/// Largest packet accepted from or sent to the remote broker.
fn max_packet(cfg_max: u64) -> usize {
    usize::try_from(cfg_max).unwrap_or(usize::MAX)
}

impl Remote {
    /// Starts connecting to the remote broker; the outcome arrives as the first event
    /// ([`RemoteEvent::Connected`] or [`RemoteEvent::Closed`]).
    pub(crate) fn connect(
        cfg: &BridgeConfig,
        password: Option<String>,
        tls: Option<Arc<rustls::ClientConfig>>,
        max_packet_size: u64,
    ) -> Result<(Remote, mpsc::Receiver<RemoteEvent>), String> {
        let (host, port) = cfg
            .host_port()
            .ok_or_else(|| format!("`{}` is not host:port", cfg.address))?;
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let cap = request_capacity(cfg);
        let transport = match tls {
            Some(config) => {
                rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(config))
            }
            None => rumqttc::Transport::Tcp,
        };
        let timeout = cfg.connect_timeout.0.as_secs().max(1);
        let max = max_packet(max_packet_size);
        let client_id = cfg.remote_client_id();
        let (client, task) = match cfg.mqtt_version {
            BridgeMqttVersion::V311 => {
                let mut o = rumqttc::MqttOptions::new(client_id, host, port);
                o.set_keep_alive(cfg.keep_alive.0)
                    .set_clean_session(cfg.clean_start)
                    .set_manual_acks(true)
                    .set_inflight(cfg.max_inflight)
                    .set_request_channel_capacity(cap)
                    .set_max_packet_size(max, max)
                    .set_transport(transport);
                if let Some(user) = &cfg.username {
                    o.set_credentials(user.clone(), password.unwrap_or_default());
                }
                let (client, mut eventloop) = rumqttc::AsyncClient::new(o, cap);
                eventloop.network_options.set_connection_timeout(timeout);
                let task = tokio::spawn(async move {
                    loop {
                        let event = match eventloop.poll().await {
                            Ok(e) => convert_v4(e),
                            Err(e) => Some(RemoteEvent::Closed(e.to_string())),
                        };
                        let closed = matches!(event, Some(RemoteEvent::Closed(_)));
                        if let Some(event) = event
                            && tx.send(event).await.is_err()
                        {
                            return;
                        }
                        if closed {
                            return;
                        }
                    }
                });
                (Client::V4(client), task)
            }
            BridgeMqttVersion::V5 => {
                let mut o = rumqttc::v5::MqttOptions::new(client_id, host, port);
                let expiry = if cfg.clean_start {
                    None
                } else {
                    Some(u32::try_from(cfg.session_expiry.0.as_secs()).unwrap_or(u32::MAX))
                };
                o.set_keep_alive(cfg.keep_alive.0)
                    .set_clean_start(cfg.clean_start)
                    .set_session_expiry_interval(expiry)
                    .set_manual_acks(true)
                    .set_receive_maximum(Some(cfg.max_inflight))
                    .set_outgoing_inflight_upper_limit(cfg.max_inflight)
                    .set_request_channel_capacity(cap)
                    .set_max_packet_size(u32::try_from(max).ok())
                    .set_connection_timeout(timeout)
                    .set_transport(transport);
                if let Some(user) = &cfg.username {
                    o.set_credentials(user.clone(), password.unwrap_or_default());
                }
                let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(o, cap);
                let task = tokio::spawn(async move {
                    loop {
                        let event = match eventloop.poll().await {
                            Ok(e) => convert_v5(e),
                            Err(e) => Some(RemoteEvent::Closed(e.to_string())),
                        };
                        let closed = matches!(event, Some(RemoteEvent::Closed(_)));
                        if let Some(event) = event
                            && tx.send(event).await.is_err()
                        {
                            return;
                        }
                        if closed {
                            return;
                        }
                    }
                });
                (Client::V5(client), task)
            }
        };
        Ok((Remote { client, task }, rx))
    }

    /// Subscribes to `filters` (no-local with MQTT 5: what the bridge forwards never comes
    /// back to it; retain as published; retained messages only for a new subscription).
    pub(crate) fn subscribe(&self, filters: &[String], qos: u8) -> Result<(), String> {
        if filters.is_empty() {
            return Ok(());
        }
        match &self.client {
            Client::V4(c) => c
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f.clone(), qos_v4(qos))),
                )
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_subscribe_many(filters.iter().map(|f| p5::Filter {
                    path: f.clone(),
                    qos: qos_v5(qos),
                    nolocal: true,
                    preserve_retain: true,
                    retain_forward_rule: p5::RetainForwardRule::OnNewSubscribe,
                }))
                .map_err(|e| e.to_string()),
        }
    }

    /// Publishes a message; it is put on the wire in the order of the calls (see
    /// [`RemoteEvent::Sent`]).
    pub(crate) fn publish(
        &self,
        topic: String,
        qos: u8,
        retain: bool,
        payload: Bytes,
        properties: Option<p5::PublishProperties>,
    ) -> Result<(), String> {
        match &self.client {
            Client::V4(c) => c
                .try_publish(topic, qos_v4(qos), retain, payload.to_vec())
                .map_err(|e| e.to_string()),
            Client::V5(c) => match properties {
                Some(props) => c
                    .try_publish_with_properties(topic, qos_v5(qos), retain, payload, props)
                    .map_err(|e| e.to_string()),
                None => c
                    .try_publish(topic, qos_v5(qos), retain, payload)
                    .map_err(|e| e.to_string()),
            },
        }
    }

    /// Acknowledges a message received (PUBACK, or PUBREC for QoS 2).
    pub(crate) fn ack(&self, publish: &RemotePublish) -> Result<(), String> {
        match (&self.client, publish) {
            (Client::V4(c), RemotePublish::V4(p)) => c.try_ack(p).map_err(|e| e.to_string()),
            (Client::V5(c), RemotePublish::V5(p)) => c.try_ack(p).map_err(|e| e.to_string()),
            _ => Ok(()),
        }
    }

    /// Sends DISCONNECT (best effort); the event loop ends when the connection closes.
    pub(crate) fn disconnect(&self) {
        match &self.client {
            Client::V4(c) => {
                let _ = c.try_disconnect();
            }
            Client::V5(c) => {
                let _ = c.try_disconnect();
            }
        }
    }

    /// Waits (at most `limit`) for the event loop to finish, e.g. after [`Self::disconnect`].
    pub(crate) async fn finish(mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, &mut self.task).await;
    }
}

fn qos_v4(qos: u8) -> rumqttc::QoS {
    match qos {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos_v5(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn convert_v4(event: rumqttc::Event) -> Option<RemoteEvent> {
    use rumqttc::{Event, Outgoing, Packet};
    Some(match event {
        Event::Incoming(Packet::ConnAck(c)) => RemoteEvent::Connected {
            session_present: c.session_present,
            max_qos: None,
            max_packet_size: None,
        },
        Event::Incoming(Packet::Publish(p)) => RemoteEvent::Publish(RemotePublish::V4(p)),
        Event::Incoming(Packet::PubAck(a)) => RemoteEvent::PubAck {
            pkid: a.pkid,
            ok: true,
        },
        Event::Incoming(Packet::PubRec(r)) => RemoteEvent::PubRec {
            pkid: r.pkid,
            ok: true,
        },
        Event::Incoming(Packet::SubAck(s)) => RemoteEvent::SubAck {
            refused: s
                .return_codes
                .iter()
                .enumerate()
                .filter(|(_, c)| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                .map(|(i, _)| i)
                .collect(),
        },
        Event::Incoming(Packet::Disconnect) => {
            RemoteEvent::Closed("the remote broker disconnected".into())
        }
        Event::Outgoing(Outgoing::Publish(pkid)) => RemoteEvent::Sent(pkid),
        _ => return None,
    })
}

fn convert_v5(event: rumqttc::v5::Event) -> Option<RemoteEvent> {
    use rumqttc::Outgoing;
    use rumqttc::v5::Event;
    use rumqttc::v5::mqttbytes::v5::Packet;
    Some(match event {
        Event::Incoming(Packet::ConnAck(c)) => RemoteEvent::Connected {
            session_present: c.session_present,
            max_qos: c.properties.as_ref().and_then(|p| p.max_qos),
            max_packet_size: c.properties.as_ref().and_then(|p| p.max_packet_size),
        },
        Event::Incoming(Packet::Publish(p)) => RemoteEvent::Publish(RemotePublish::V5(p)),
        Event::Incoming(Packet::PubAck(a)) => RemoteEvent::PubAck {
            pkid: a.pkid,
            ok: matches!(
                a.reason,
                p5::PubAckReason::Success | p5::PubAckReason::NoMatchingSubscribers
            ),
        },
        Event::Incoming(Packet::PubRec(r)) => RemoteEvent::PubRec {
            pkid: r.pkid,
            ok: matches!(
                r.reason,
                p5::PubRecReason::Success | p5::PubRecReason::NoMatchingSubscribers
            ),
        },
        Event::Incoming(Packet::SubAck(s)) => RemoteEvent::SubAck {
            refused: s
                .return_codes
                .iter()
                .enumerate()
                .filter(|(_, c)| !matches!(c, p5::SubscribeReasonCode::Success(_)))
                .map(|(i, _)| i)
                .collect(),
        },
        Event::Incoming(Packet::Disconnect(d)) => RemoteEvent::Closed(format!(
            "the remote broker disconnected ({:?})",
            d.reason_code
        )),
        Event::Outgoing(Outgoing::Publish(pkid)) => RemoteEvent::Sent(pkid),
        _ => return None,
    })
}

/// The rustls client configuration of a bridge with `tls = true` (ring, like every other TLS
/// in raftmq), or why it cannot be built, naming the key.
pub(crate) fn tls_config(
    cfg: &BridgeConfig,
    prefix: &str,
) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    if !cfg.tls {
        return Ok(None);
    }
    let read_certs = |key: &str, path: &std::path::Path| {
        let pem = std::fs::read(path)
            .map_err(|e| format!("{prefix}{key}: cannot read {}: {e}", path.display()))?;
        let certs = rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{prefix}{key}: {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "{prefix}{key}: no PEM certificate in {}",
                path.display()
            ));
        }
        Ok(certs)
    };
    let ca = cfg
        .tls_ca_file
        .as_deref()
        .ok_or_else(|| format!("{prefix}tls_ca_file: required when tls = true"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs("tls_ca_file", ca)? {
        roots
            .add(cert)
            .map_err(|e| format!("{prefix}tls_ca_file: {}: {e}", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("{prefix}tls: {e}"))?
        .with_root_certificates(roots);
    let config = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
        (Some(cert), Some(key)) => {
            let chain = read_certs("tls_cert_file", cert)?;
            let pem = std::fs::read(key)
                .map_err(|e| format!("{prefix}tls_key_file: cannot read {}: {e}", key.display()))?;
            let key_der = rustls_pemfile::private_key(&mut pem.as_slice())
                .map_err(|e| format!("{prefix}tls_key_file: {}: {e}", key.display()))?
                .ok_or_else(|| {
                    format!(
                        "{prefix}tls_key_file: no PEM private key in {}",
                        key.display()
                    )
                })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| format!("{prefix}tls_key_file: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Some(Arc::new(config)))
}
