//! The admin API under `/api/v1/` (JSON in and out): clients, subscriptions, retained messages,
//! publishing, cluster membership and draining. Protected by a bearer token when
//! `http.admin_token` is set. Every bad request gets a 4xx answer with `{"error": "..."}` naming
//! what is wrong.

use crate::ClusterAdminError;
use crate::http::HttpState;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use bytes::Bytes;
use raftmq_codec::{ByteStr, PublishProperties, QoS, ReasonCode};
use raftmq_core::Message;
use raftmq_core::broker::{ClientSummary, Kicked, SubscriptionSummary};
use raftmq_core::topic::{TopicFilter, TopicName};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A JSON error answer: `{"error": message}` with a status code.
#[derive(Debug)]
pub(crate) struct ApiError(StatusCode, String);

impl ApiError {
    fn bad_request(msg: impl Into<String>) -> Self {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }
    fn not_found(msg: impl Into<String>) -> Self {
        ApiError(StatusCode::NOT_FOUND, msg.into())
    }
    fn unavailable(msg: impl Into<String>) -> Self {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.0, Json(json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError::bad_request(format!("bad query string: {}", e.body_text()))
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError(e.status(), format!("bad JSON body: {}", e.body_text()))
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        ApiError::bad_request(format!("bad path: {}", e.body_text()))
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

/// Proof that the request carries the admin token (or that none is configured).
pub(crate) struct Admin;

impl FromRequestParts<HttpState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, ApiError> {
        let Some(token) = &state.admin_token else {
            return Ok(Admin);
        };
        let given = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        match given {
            Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => Ok(Admin),
            Some(_) => Err(ApiError(
                StatusCode::UNAUTHORIZED,
                "wrong admin token".to_owned(),
            )),
            None => Err(ApiError(
                StatusCode::UNAUTHORIZED,
                "admin token required: send `Authorization: Bearer <token>` (http.admin_token)"
                    .to_owned(),
            )),
        }
    }
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn routes() -> Router<HttpState> {
    Router::new()
        .route("/api/v1/cluster/nodes", post(add_node))
        .route("/api/v1/cluster/nodes/{id}", delete(remove_node))
        .route("/api/v1/clients", get(list_clients))
        .route("/api/v1/clients/{id}", get(show_client).delete(kick_client))
        .route("/api/v1/subscriptions", get(list_subscriptions))
        .route("/api/v1/retained", get(list_retained))
        .route("/api/v1/retained/{*topic}", delete(delete_retained))
        .route("/api/v1/publish", post(publish))
        .route("/api/v1/drain", get(drain_status).post(start_drain))
        .route("/api/v1/bridges", get(list_bridges))
        .route("/api/v1/bridges/{name}", get(show_bridge))
}

/// `GET /api/v1/bridges`: every bridge configured, as this node sees it (`active`: this node
/// runs it now), as `{"items": [...]}` (not paged: there are as many as configured).
async fn list_bridges(_: Admin, State(state): State<HttpState>) -> ApiResult {
    let items: Vec<Value> = state
        .bridges
        .iter()
        .map(|b| b.to_json(&state.broker))
        .collect();
    Ok(Json(json!({ "items": items })))
}

/// `GET /api/v1/bridges/{name}`: one bridge.
async fn show_bridge(
    _: Admin,
    State(state): State<HttpState>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let Path(name) = path?;
    state
        .bridges
        .iter()
        .find(|b| b.config().name == name)
        .map(|b| Json(b.to_json(&state.broker)))
        .ok_or_else(|| ApiError::not_found(format!("no bridge named `{name}`")))
}

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// One page of `items` (sorted), as `{"total", "offset", "limit", "items"}`.
fn page<T>(
    items: Vec<T>,
    offset: Option<usize>,
    limit: Option<usize>,
    to_json: impl Fn(&T) -> Value,
) -> ApiResult {
    let offset = offset.unwrap_or(0);
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(format!(
            "limit: must be between 1 and {MAX_LIMIT} (got {limit})"
        )));
    }
    let total = items.len();
    let shown: Vec<Value> = items.iter().skip(offset).take(limit).map(to_json).collect();
    Ok(Json(json!({
        "total": total,
        "offset": offset,
        "limit": limit,
        "items": shown,
    })))
}

fn client_json(c: &ClientSummary) -> Value {
    let conn = c.connection.as_ref();
    json!({
        "client_id": c.client_id,
        "username": conn.and_then(|i| i.username.clone()),
        "peer": conn.and_then(|i| i.peer).map(|p| p.to_string()),
        "protocol_version": conn.map(|i| i.protocol_level),
        "connected": c.connected,
        "clean_start": conn.map(|i| i.clean_start),
        "session_expiry_secs": c.session_expiry_secs,
        "persistent": c.persistent,
        "subscriptions": c.subscriptions,
        "inflight": c.inflight,
        "queued": c.queued,
    })
}

fn subscription_json(s: &SubscriptionSummary) -> Value {
    json!({
        "client_id": s.client_id,
        "filter": s.filter,
        "share_group": s.share_group,
        "qos": s.qos,
        "no_local": s.no_local,
        "retain_as_published": s.retain_as_published,
        "retain_handling": s.retain_handling,
        "subscription_id": s.subscription_id,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientsQuery {
    /// Client id prefix.
    client_id: Option<String>,
    offset: Option<usize>,
    limit: Option<usize>,
}

async fn list_clients(
    _: Admin,
    State(state): State<HttpState>,
    query: Result<Query<ClientsQuery>, QueryRejection>,
) -> ApiResult {
    let Query(q) = query?;
    let clients = state
        .broker
        .list_clients(q.client_id.as_deref().unwrap_or(""));
    page(clients, q.offset, q.limit, client_json)
}

async fn show_client(
    _: Admin,
    State(state): State<HttpState>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let Path(id) = id?;
    let (client, subs) = state
        .broker
        .inspect_client(&id)
        .ok_or_else(|| ApiError::not_found(format!("no client `{id}`")))?;
    let mut v = client_json(&client);
    v["subscription_list"] = Value::Array(subs.iter().map(subscription_json).collect());
    Ok(Json(v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KickQuery {
    #[serde(default)]
    discard_session: bool,
}

async fn kick_client(
    _: Admin,
    State(state): State<HttpState>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<KickQuery>, QueryRejection>,
) -> ApiResult {
    let Path(id) = id?;
    let Query(q) = query?;
    match state
        .broker
        .kick(&id, ReasonCode::ADMINISTRATIVE_ACTION, q.discard_session)
    {
        Kicked::NotFound => Err(ApiError::not_found(format!("no client `{id}`"))),
        Kicked::NotConnected => Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "client `{id}` is not connected (add ?discard_session=true to remove its session)"
            ),
        )),
        Kicked::Disconnected => Ok(Json(json!({
            "client_id": id,
            "disconnected": true,
            "session_discarded": false,
        }))),
        Kicked::SessionDiscarded {
            was_connected,
            commit,
        } => {
            commit.await.map_err(|e| {
                ApiError::unavailable(format!("the session's removal is not durable: {e}"))
            })?;
            Ok(Json(json!({
                "client_id": id,
                "disconnected": was_connected,
                "session_discarded": true,
            })))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscriptionsQuery {
    /// Client id prefix.
    client_id: Option<String>,
    /// Only subscriptions that match this topic name.
    topic: Option<String>,
    offset: Option<usize>,
    limit: Option<usize>,
}

async fn list_subscriptions(
    _: Admin,
    State(state): State<HttpState>,
    query: Result<Query<SubscriptionsQuery>, QueryRejection>,
) -> ApiResult {
    let Query(q) = query?;
    if let Some(topic) = &q.topic {
        TopicName::new(topic, state.broker.topic_limits())
            .map_err(|e| ApiError::bad_request(format!("topic: {e}")))?;
    }
    let subs = state
        .broker
        .list_subscriptions(q.client_id.as_deref().unwrap_or(""), q.topic.as_deref());
    page(subs, q.offset, q.limit, subscription_json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetainedQuery {
    /// A topic filter (wildcards allowed).
    filter: Option<String>,
    offset: Option<usize>,
    limit: Option<usize>,
}

fn retained_json(m: &Arc<Message>) -> Value {
    let mut v = json!({
        "topic": m.topic.to_string(),
        "qos": m.qos.as_u8(),
        "payload_bytes": m.payload.len(),
    });
    match std::str::from_utf8(&m.payload) {
        Ok(text) => v["payload"] = Value::String(text.to_owned()),
        Err(_) => v["payload_base64"] = Value::String(base64_encode(&m.payload)),
    }
    if let Some(ct) = &m.properties.content_type {
        v["content_type"] = Value::String(ct.to_string());
    }
    v
}

async fn list_retained(
    _: Admin,
    State(state): State<HttpState>,
    query: Result<Query<RetainedQuery>, QueryRejection>,
) -> ApiResult {
    let Query(q) = query?;
    if let Some(filter) = &q.filter {
        TopicFilter::new(filter, state.broker.topic_limits())
            .map_err(|e| ApiError::bad_request(format!("filter: {e}")))?;
    }
    let found = state.broker.list_retained(q.filter.as_deref());
    page(found, q.offset, q.limit, retained_json)
}

async fn delete_retained(
    _: Admin,
    State(state): State<HttpState>,
    topic: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let Path(topic) = topic?;
    let commit = state
        .broker
        .clear_retained(&topic)
        .ok_or_else(|| ApiError::not_found(format!("no retained message on `{topic}`")))?;
    commit
        .await
        .map_err(|e| ApiError::unavailable(format!("the removal is not durable: {e}")))?;
    Ok(Json(json!({ "topic": topic, "cleared": true })))
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum PayloadEncoding {
    Utf8,
    Base64,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PublishPropertiesBody {
    content_type: Option<String>,
    response_topic: Option<String>,
    /// UTF-8 text.
    correlation_data: Option<String>,
    message_expiry_interval: Option<u32>,
    payload_format_indicator: Option<bool>,
    #[serde(default)]
    user_properties: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    topic: String,
    #[serde(default)]
    payload: String,
    payload_encoding: Option<PayloadEncoding>,
    #[serde(default)]
    qos: u8,
    #[serde(default)]
    retain: bool,
    #[serde(default)]
    properties: PublishPropertiesBody,
}

async fn publish(
    _: Admin,
    State(state): State<HttpState>,
    body: Result<Json<PublishBody>, JsonRejection>,
) -> ApiResult {
    let Json(b) = body?;
    let broker = &state.broker;
    let cfg = broker.config();
    TopicName::new(&b.topic, broker.topic_limits())
        .map_err(|e| ApiError::bad_request(format!("topic: {e}")))?;
    let qos = QoS::from_u8(b.qos)
        .filter(|q| q.as_u8() <= cfg.max_qos)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "qos: must be 0..={} (got {})",
                cfg.max_qos.min(2),
                b.qos
            ))
        })?;
    if b.retain && !cfg.retain_available {
        return Err(ApiError::bad_request(
            "retain: retained messages are disabled (mqtt.retain_available = false)",
        ));
    }
    let payload = match b.payload_encoding.unwrap_or(PayloadEncoding::Utf8) {
        PayloadEncoding::Utf8 => Bytes::from(b.payload.into_bytes()),
        PayloadEncoding::Base64 => base64_decode(&b.payload)
            .map(Bytes::from)
            .ok_or_else(|| ApiError::bad_request("payload: not valid base64"))?,
    };
    let max = usize::try_from(cfg.max_packet_size.0).unwrap_or(usize::MAX);
    if payload.len() > max {
        return Err(ApiError::bad_request(format!(
            "payload: {} bytes, more than mqtt.max_packet_size ({max})",
            payload.len()
        )));
    }
    let p = b.properties;
    if let Some(rt) = &p.response_topic {
        TopicName::new(rt, broker.topic_limits())
            .map_err(|e| ApiError::bad_request(format!("properties.response_topic: {e}")))?;
    }
    let now = Instant::now();
    let message = Arc::new(Message {
        topic: ByteStr::from(b.topic.as_str()),
        payload,
        qos,
        retain: b.retain,
        properties: PublishProperties {
            payload_format_indicator: p.payload_format_indicator,
            content_type: p.content_type.as_deref().map(ByteStr::from),
            response_topic: p.response_topic.as_deref().map(ByteStr::from),
            correlation_data: p.correlation_data.map(|c| Bytes::from(c.into_bytes())),
            user_properties: p
                .user_properties
                .iter()
                .map(|(k, v)| (ByteStr::from(k.as_str()), ByteStr::from(v.as_str())))
                .collect(),
            ..Default::default()
        },
        expires_at: p
            .message_expiry_interval
            .map(|s| now + Duration::from_secs(u64::from(s))),
        received_at: now,
        origin: None,
    });
    // The publisher's path: stored durably for persistent subscribers (and retained) first.
    let routed = broker.route(message, None, now);
    routed.commit.await.map_err(|e| {
        ApiError::unavailable(format!("not published: durable storage refused it ({e})"))
    })?;
    Ok(Json(
        json!({ "topic": b.topic, "delivered_to": routed.offered }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddNodeBody {
    node_id: u64,
    cluster_addr: String,
    #[serde(default)]
    mqtt_addr: String,
}

/// The cluster this node belongs to; 404 when it runs alone.
fn clustered(state: &HttpState) -> Result<&dyn crate::ClusterControl, ApiError> {
    state
        .cluster
        .as_deref()
        .ok_or_else(|| ApiError::not_found("not clustered"))
}

fn cluster_error(e: ClusterAdminError) -> ApiError {
    let status = match &e {
        ClusterAdminError::NotFound(_) => StatusCode::NOT_FOUND,
        ClusterAdminError::Conflict(_) => StatusCode::CONFLICT,
        ClusterAdminError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        ClusterAdminError::Failed(_) => StatusCode::BAD_GATEWAY,
    };
    ApiError(status, e.to_string())
}

async fn add_node(
    _: Admin,
    State(state): State<HttpState>,
    body: Result<Json<AddNodeBody>, JsonRejection>,
) -> ApiResult {
    let Json(b) = body?;
    let cluster = clustered(&state)?;
    if b.node_id == 0 {
        return Err(ApiError::bad_request("node_id: must be at least 1"));
    }
    if check_host_port(&b.cluster_addr).is_none() {
        return Err(ApiError::bad_request(format!(
            "cluster_addr: expected host:port (got `{}`)",
            b.cluster_addr
        )));
    }
    if !b.mqtt_addr.is_empty() && check_host_port(&b.mqtt_addr).is_none() {
        return Err(ApiError::bad_request(format!(
            "mqtt_addr: expected host:port (got `{}`)",
            b.mqtt_addr
        )));
    }
    cluster
        .add_node(b.node_id, b.cluster_addr, b.mqtt_addr)
        .await
        .map_err(cluster_error)?;
    Ok(Json(json!({ "node_id": b.node_id, "added": true })))
}

fn check_host_port(s: &str) -> Option<()> {
    let (host, port) = s.rsplit_once(':')?;
    (!host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)).then_some(())
}

async fn remove_node(
    _: Admin,
    State(state): State<HttpState>,
    id: Result<Path<u64>, PathRejection>,
) -> ApiResult {
    let Path(id) = id.map_err(|e| {
        ApiError::bad_request(format!("node id: expected a number ({})", e.body_text()))
    })?;
    let cluster = clustered(&state)?;
    cluster.remove_node(id).await.map_err(cluster_error)?;
    Ok(Json(json!({ "node_id": id, "removed": true })))
}

async fn drain_status(_: Admin, State(state): State<HttpState>) -> ApiResult {
    Ok(Json(json!(state.drain.status(Instant::now()))))
}

async fn start_drain(_: Admin, State(state): State<HttpState>) -> ApiResult {
    if state.drain.start(Instant::now()) {
        tracing::info!("draining: new MQTT connections refused, clients handed off");
    }
    Ok(Json(json!(state.drain.status(Instant::now()))))
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub(crate) fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding optional, whitespace ignored); `None` when invalid.
pub(crate) fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let digits = digits
        .strip_suffix(b"==")
        .or_else(|| digits.strip_suffix(b"="))
        .unwrap_or(&digits);
    if digits.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for &d in digits {
        let v = B64.iter().position(|c| *c == d)?;
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_rejects_garbage() {
        for (raw, text) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (&[0xff, 0x00, 0xfe], "/wD+"),
        ] {
            assert_eq!(base64_encode(raw), text);
            assert_eq!(base64_decode(text).as_deref(), Some(raw));
        }
        assert_eq!(base64_decode("Zm9vYg").as_deref(), Some(&b"foob"[..]));
        assert_eq!(base64_decode("Zm9v!"), None);
        assert_eq!(base64_decode("Z"), None);
    }

    #[test]
    fn token_comparison_needs_equal_bytes() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
