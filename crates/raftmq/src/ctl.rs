//! `raftmq ctl`: the admin API from the command line (cluster membership, clients,
//! subscriptions, retained messages, publish, drain). Talks HTTP through
//! [`raftmq_server::admin_client`]; prints tables or JSON.

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use raftmq_server::admin_client::{AdminClient, encode_path};
use serde_json::{Value, json};
use std::io::Write as _;
use std::time::{Duration, Instant};

/// Environment variable the server reads its admin token from; `ctl` falls back to it, so a
/// command run inside the broker's container (the Helm preStop hook) needs no flag.
const SERVER_TOKEN_ENV: &str = "RAFTMQ_HTTP__ADMIN_TOKEN";

/// `raftmq ctl ...`
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Base URL of the node's HTTP endpoint.
    #[arg(long, global = true, default_value = "http://127.0.0.1:9100")]
    pub url: String,
    /// Admin API bearer token (the node's http.admin_token); falls back to
    /// RAFTMQ_HTTP__ADMIN_TOKEN.
    #[arg(
        long,
        global = true,
        env = "RAFTMQ_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// How `ctl` prints answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// The API's JSON, pretty-printed.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Cluster status and membership changes.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Connected and persistent clients.
    #[command(subcommand)]
    Clients(ClientsCmd),
    /// Subscriptions.
    #[command(subcommand)]
    Subscriptions(SubscriptionsCmd),
    /// Retained messages.
    #[command(subcommand)]
    Retained(RetainedCmd),
    /// Publish a message through the broker (durable rules apply).
    Publish(PublishArgs),
    /// Drain the node: refuse new connections, leave readiness, hand clients off.
    Drain {
        /// Wait until every connection is closed (or the node's drain timeout passed).
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, value_name = "SECS", default_value_t = 120)]
        wait_timeout: u64,
    },
    /// Show the drain status.
    DrainStatus,
    /// Bridges to other brokers, as this node sees them (`active`: this node runs it).
    Bridges,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// This node's view of the cluster: leader, term, voters, members.
    Status,
    /// This node's view of every shard (Raft group): leader, term, voters, learners.
    Shards,
    /// Add a node (as learner, promoted to voter once caught up).
    Add {
        /// The new node's id.
        #[arg(long)]
        node_id: u64,
        /// Its cluster address, host:port.
        #[arg(long)]
        cluster_addr: String,
        /// Its MQTT address, host:port.
        #[arg(long, default_value = "")]
        mqtt_addr: String,
    },
    /// Remove a node from the membership.
    Remove {
        /// The node's id.
        node_id: u64,
    },
}

/// Paging of list commands.
#[derive(Debug, Args)]
pub struct Paging {
    /// Skip this many entries.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Show at most this many (1..=1000).
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

#[derive(Debug, Subcommand)]
pub enum ClientsCmd {
    /// List clients (sorted by client id).
    List {
        /// Only client ids starting with this.
        #[arg(long)]
        prefix: Option<String>,
        #[command(flatten)]
        paging: Paging,
    },
    /// One client, with its subscriptions.
    Show { client_id: String },
    /// Disconnect a client (MQTT 5: DISCONNECT 0x98 Administrative action).
    Kick {
        client_id: String,
        /// Also end its session (subscriptions and queued messages), durably.
        #[arg(long)]
        discard_session: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SubscriptionsCmd {
    /// List subscriptions.
    List {
        /// Only clients whose id starts with this.
        #[arg(long)]
        client_id: Option<String>,
        /// Only subscriptions matching this topic name.
        #[arg(long)]
        topic: Option<String>,
        #[command(flatten)]
        paging: Paging,
    },
}

#[derive(Debug, Subcommand)]
pub enum RetainedCmd {
    /// List retained messages.
    List {
        /// Only topics matching this filter (wildcards allowed).
        #[arg(long)]
        filter: Option<String>,
        #[command(flatten)]
        paging: Paging,
    },
    /// Clear the retained message of a topic.
    Delete { topic: String },
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Topic name.
    topic: String,
    /// Payload (UTF-8 text, or base64 with --base64).
    #[arg(default_value = "")]
    payload: String,
    /// QoS 0, 1 or 2.
    #[arg(long, default_value_t = 0)]
    qos: u8,
    /// Set the RETAIN flag.
    #[arg(long)]
    retain: bool,
    /// The payload argument is base64.
    #[arg(long)]
    base64: bool,
    /// Content Type property.
    #[arg(long)]
    content_type: Option<String>,
    /// Response Topic property.
    #[arg(long)]
    response_topic: Option<String>,
    /// Correlation Data property (UTF-8).
    #[arg(long)]
    correlation_data: Option<String>,
    /// Message Expiry Interval in seconds.
    #[arg(long, value_name = "SECS")]
    message_expiry: Option<u32>,
    /// User property, KEY=VALUE (repeatable).
    #[arg(long = "user-property", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    user_properties: Vec<(String, String)>,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE (got `{s}`)"))
}

/// Runs `raftmq ctl`.
pub fn run(args: CtlArgs) -> anyhow::Result<()> {
    let token = args
        .token
        .clone()
        .filter(|t| !t.is_empty())
        .or_else(|| std::env::var(SERVER_TOKEN_ENV).ok());
    if token
        .as_deref()
        .is_some_and(|t| t.chars().any(|c| c.is_control()))
    {
        bail!("the admin token contains control characters");
    }
    let client = AdminClient::new(&args.url, token)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let out = runtime.block_on(execute(&client, &args.command))?;
    let text = match args.output {
        Output::Json => format!("{}\n", serde_json::to_string_pretty(&out.json)?),
        Output::Table => out.table,
    };
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to standard output"),
    }
}

/// An answer, in both forms.
struct Answer {
    json: Value,
    table: String,
}

fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode_path(v, false))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// One page of the list at `path` (narrowed by the `filters` that are set), with a table of
/// `columns` (header, field).
async fn list(
    client: &AdminClient,
    path: &str,
    mut filters: Vec<(&str, Option<String>)>,
    p: &Paging,
    columns: &[(&str, &str)],
) -> anyhow::Result<Answer> {
    filters.push(("offset", Some(p.offset.to_string())));
    filters.push(("limit", Some(p.limit.to_string())));
    let json = client.get(&format!("{path}{}", query(&filters))).await?;
    let table = list_table(&json, columns);
    Ok(Answer { json, table })
}

async fn execute(client: &AdminClient, cmd: &CtlCommand) -> anyhow::Result<Answer> {
    Ok(match cmd {
        CtlCommand::Cluster(ClusterCmd::Status) => {
            let v = client.get("/api/v1/cluster").await?;
            let table = cluster_table(&v);
            Answer { json: v, table }
        }
        CtlCommand::Cluster(ClusterCmd::Shards) => {
            let v = client.get("/api/v1/cluster").await?;
            let table = shards_table(&v);
            Answer {
                json: json!({"shard_count": v["shard_count"], "shards": v["shards"]}),
                table,
            }
        }
        CtlCommand::Cluster(ClusterCmd::Add {
            node_id,
            cluster_addr,
            mqtt_addr,
        }) => {
            let body =
                json!({"node_id": node_id, "cluster_addr": cluster_addr, "mqtt_addr": mqtt_addr});
            let v = client.post("/api/v1/cluster/nodes", &body).await?;
            Answer {
                json: v,
                table: format!("node {node_id} added\n"),
            }
        }
        CtlCommand::Cluster(ClusterCmd::Remove { node_id }) => {
            let v = client
                .delete(&format!("/api/v1/cluster/nodes/{node_id}"))
                .await?;
            Answer {
                json: v,
                table: format!("node {node_id} removed\n"),
            }
        }
        CtlCommand::Clients(ClientsCmd::List { prefix, paging: p }) => {
            list(
                client,
                "/api/v1/clients",
                vec![("client_id", prefix.clone())],
                p,
                &[
                    ("CLIENT ID", "client_id"),
                    ("CONNECTED", "connected"),
                    ("USERNAME", "username"),
                    ("PEER", "peer"),
                    ("PROTO", "protocol_version"),
                    ("CLEAN", "clean_start"),
                    ("EXPIRY", "session_expiry_secs"),
                    ("SUBS", "subscriptions"),
                    ("INFLIGHT", "inflight"),
                    ("QUEUED", "queued"),
                ],
            )
            .await?
        }
        CtlCommand::Clients(ClientsCmd::Show { client_id }) => {
            let v = client
                .get(&format!(
                    "/api/v1/clients/{}",
                    encode_path(client_id, false)
                ))
                .await?;
            let mut table = String::new();
            if let Some(obj) = v.as_object() {
                for (k, val) in obj.iter().filter(|(k, _)| *k != "subscription_list") {
                    table.push_str(&format!("{k:<20} {}\n", cell(val)));
                }
            }
            let subs = json!({"items": v.get("subscription_list").cloned().unwrap_or_default()});
            table.push('\n');
            table.push_str(&list_table(&subs, SUB_COLUMNS));
            Answer { json: v, table }
        }
        CtlCommand::Clients(ClientsCmd::Kick {
            client_id,
            discard_session,
        }) => {
            let path = format!(
                "/api/v1/clients/{}{}",
                encode_path(client_id, false),
                if *discard_session {
                    "?discard_session=true"
                } else {
                    ""
                }
            );
            let v = client.delete(&path).await?;
            let table = if *discard_session {
                format!("client {client_id}: session discarded\n")
            } else {
                format!("client {client_id}: disconnected\n")
            };
            Answer { json: v, table }
        }
        CtlCommand::Subscriptions(SubscriptionsCmd::List {
            client_id,
            topic,
            paging: p,
        }) => {
            let filters = vec![("client_id", client_id.clone()), ("topic", topic.clone())];
            list(client, "/api/v1/subscriptions", filters, p, SUB_COLUMNS).await?
        }
        CtlCommand::Retained(RetainedCmd::List { filter, paging: p }) => {
            let columns = [
                ("TOPIC", "topic"),
                ("QOS", "qos"),
                ("BYTES", "payload_bytes"),
                ("PAYLOAD", "payload"),
            ];
            let filters = vec![("filter", filter.clone())];
            list(client, "/api/v1/retained", filters, p, &columns).await?
        }
        CtlCommand::Retained(RetainedCmd::Delete { topic }) => {
            let v = client
                .delete(&format!("/api/v1/retained/{}", encode_path(topic, true)))
                .await?;
            Answer {
                json: v,
                table: format!("retained message on {topic} cleared\n"),
            }
        }
        CtlCommand::Publish(p) => {
            let mut props = json!({});
            if let Some(ct) = &p.content_type {
                props["content_type"] = json!(ct);
            }
            if let Some(rt) = &p.response_topic {
                props["response_topic"] = json!(rt);
            }
            if let Some(cd) = &p.correlation_data {
                props["correlation_data"] = json!(cd);
            }
            if let Some(e) = p.message_expiry {
                props["message_expiry_interval"] = json!(e);
            }
            if !p.user_properties.is_empty() {
                let map: serde_json::Map<String, Value> = p
                    .user_properties
                    .iter()
                    .map(|(k, v)| (k.clone(), json!(v)))
                    .collect();
                props["user_properties"] = Value::Object(map);
            }
            let body = json!({
                "topic": p.topic,
                "payload": p.payload,
                "payload_encoding": if p.base64 { "base64" } else { "utf8" },
                "qos": p.qos,
                "retain": p.retain,
                "properties": props,
            });
            let v = client.post("/api/v1/publish", &body).await?;
            let table = format!(
                "published to {} ({} subscriber{})\n",
                p.topic,
                v["delivered_to"],
                if v["delivered_to"] == 1 { "" } else { "s" }
            );
            Answer { json: v, table }
        }
        CtlCommand::Drain { wait, wait_timeout } => {
            let mut v = client.post("/api/v1/drain", &json!({})).await?;
            if *wait {
                let deadline = Instant::now() + Duration::from_secs(*wait_timeout);
                while v["complete"] != true {
                    if Instant::now() >= deadline {
                        bail!(
                            "drain of {} not complete after {wait_timeout}s: {} connections open",
                            client.url(),
                            v["connections"]
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    v = client.get("/api/v1/drain").await?;
                }
            }
            let table = drain_table(&v);
            Answer { json: v, table }
        }
        CtlCommand::DrainStatus => {
            let v = client.get("/api/v1/drain").await?;
            let table = drain_table(&v);
            Answer { json: v, table }
        }
        CtlCommand::Bridges => {
            let v = client.get("/api/v1/bridges").await?;
            let table = list_table(
                &v,
                &[
                    ("NAME", "name"),
                    ("ADDRESS", "address"),
                    ("ACTIVE", "active"),
                    ("STATE", "state"),
                    ("FORWARDED", "messages_forwarded"),
                    ("RECEIVED", "messages_received"),
                    ("QUEUED", "queued"),
                    ("LAST ERROR", "last_error"),
                ],
            );
            Answer { json: v, table }
        }
    })
}

const SUB_COLUMNS: &[(&str, &str)] = &[
    ("CLIENT ID", "client_id"),
    ("FILTER", "filter"),
    ("QOS", "qos"),
    ("NO LOCAL", "no_local"),
    ("RAP", "retain_as_published"),
    ("RH", "retain_handling"),
    ("SUB ID", "subscription_id"),
];

/// A JSON value as a table cell (`-` for null).
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `{"items": [...]}` as aligned columns, with a total line when the answer is paged.
fn list_table(v: &Value, columns: &[(&str, &str)]) -> String {
    let items = v["items"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|item| columns.iter().map(|(_, key)| cell(&item[*key])).collect())
        .collect();
    let mut widths: Vec<usize> = columns.iter().map(|(h, _)| h.len()).collect();
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(
        columns.iter().map(|(h, _)| (*h).to_owned()).collect(),
        &mut out,
    );
    for row in rows {
        line(row, &mut out);
    }
    if let Some(total) = v["total"].as_u64() {
        out.push_str(&format!(
            "({} of {total} shown, offset {})\n",
            items.len(),
            v["offset"]
        ));
    }
    out
}

fn cluster_table(v: &Value) -> String {
    let mut out = String::new();
    for key in [
        "node_id",
        "state",
        "leader",
        "term",
        "last_log_index",
        "last_applied",
        "healthy",
    ] {
        out.push_str(&format!("{key:<16} {}\n", cell(&v[key])));
    }
    out.push_str(&format!("{:<16} {}\n", "voters", cell(&v["voters"])));
    out.push_str("\nNODE  CLUSTER ADDR            MQTT ADDR\n");
    if let Some(nodes) = v["nodes"].as_object() {
        for (id, n) in nodes {
            out.push_str(&format!(
                "{id:<5} {:<23} {}\n",
                cell(&n["cluster_addr"]),
                cell(&n["mqtt_addr"])
            ));
        }
    }
    out
}

/// One line per shard of `GET /api/v1/cluster`: `SHARD LEADER TERM VOTERS LEARNERS`.
fn shards_table(v: &Value) -> String {
    let ids = |v: &Value| {
        let ids: Vec<String> = v
            .as_array()
            .map(|a| a.iter().map(cell).collect())
            .unwrap_or_default();
        if ids.is_empty() {
            "-".to_owned()
        } else {
            ids.join(",")
        }
    };
    let mut out = format!(
        "{:<6} {:<7} {:<6} {:<16} LEARNERS\n",
        "SHARD", "LEADER", "TERM", "VOTERS"
    );
    for shard in v["shards"].as_array().into_iter().flatten() {
        let line = format!(
            "{:<6} {:<7} {:<6} {:<16} {}",
            cell(&shard["id"]),
            cell(&shard["leader"]),
            cell(&shard["term"]),
            ids(&shard["voters"]),
            ids(&shard["learners"])
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn drain_table(v: &Value) -> String {
    format!(
        "draining     {}\ncomplete     {}\nconnections  {}\nelapsed_ms   {}\ntimeout_ms   {}\n",
        cell(&v["draining"]),
        cell(&v["complete"]),
        cell(&v["connections"]),
        cell(&v["elapsed_ms"]),
        cell(&v["timeout_ms"])
    )
}
