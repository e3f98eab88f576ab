//! Command line: one subcommand per scenario, plus `report`.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// MQTT load generator: drives any broker at host:port over MQTT 3.1.1 or 5.0.
///
/// Every run is bounded in time, prints progress every second on stderr and a summary on
/// stdout (`--json FILE` also writes it as JSON).
#[derive(Debug, Parser)]
#[command(name = "raftmq-bench", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// N publisher/subscriber pairs, each pair on its own topic.
    P2p(LoadArgs),
    /// One publisher, N subscribers of its topic (each message is delivered N times).
    Fanout(LoadArgs),
    /// N publishers on their own topics, one subscriber of all of them through `+`.
    Fanin(LoadArgs),
    /// N subscribers in one shared subscription group ($share/bench/TOPIC): each message is
    /// delivered to exactly one of them.
    Shared(SharedArgs),
    /// Publish N retained messages, then time a `#` subscription receiving them all; clears
    /// them afterwards.
    Retained(RetainedArgs),
    /// Open N idle connections at a given rate, hold them, and report accepts/s and the
    /// broker's memory per connection.
    Conn(ConnArgs),
    /// Connect/disconnect storm: N clients with persistent sessions (clean start false, session
    /// expiry) reconnect in a loop; their sessions are removed at the end.
    Churn(ChurnArgs),
    /// Failover time of a cluster: steady QoS 1/2 traffic between a persistent subscriber and
    /// a publisher, SIGKILL one node, and time how long until both are reconnected and messages
    /// flow again; checks that no acknowledged message is missing.
    Failover(FailoverArgs),
    /// Render the JSON summaries of two runs as a Markdown table with ratios.
    Report(ReportArgs),
}

/// Options of every scenario.
#[derive(Clone, Debug, Args)]
pub struct CommonArgs {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker MQTT port.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// MQTT protocol level: 4 (3.1.1) or 5 (5.0).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(4..=5))]
    pub mqtt_version: u8,
    /// Keep alive in seconds (0: none); connections ping after half of it without sending.
    #[arg(long, default_value_t = 60)]
    pub keep_alive: u16,
    /// Most connection handshakes in progress at once.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub connect_concurrency: u32,
    /// Bound on each handshake (TCP connect → CONNACK) and SUBSCRIBE → SUBACK.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// PID of the broker process: report its CPU time and RSS (from /proc). Repeat it, or
    /// give a comma-separated list, for a broker made of several processes: their CPU times
    /// and RSS are summed.
    #[arg(long, value_name = "PID", value_delimiter = ',')]
    pub broker_pid: Vec<u32>,
    #[command(flatten)]
    pub output: RunOutput,
}

/// What a run leaves behind besides the printed summary.
#[derive(Clone, Debug, Default, Args)]
pub struct RunOutput {
    /// Also write the summary as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Name of the broker under test (or of the run), recorded in the summary.
    #[arg(long)]
    pub label: Option<String>,
}

/// Where the publishing and the subscribing side connect, when not at --host/--port (e.g. two
/// nodes of a cluster).
#[derive(Clone, Debug, Args)]
pub struct SideAddrs {
    /// Publish through this HOST:PORT instead of --host/--port (e.g. one cluster node).
    #[arg(long, value_name = "HOST:PORT")]
    pub pub_addr: Option<String>,
    /// Subscribe through this HOST:PORT instead of --host/--port (e.g. another node).
    #[arg(long, value_name = "HOST:PORT")]
    pub sub_addr: Option<String>,
}

/// Options of the message scenarios (p2p, fanout, fanin, shared).
#[derive(Clone, Debug, Args)]
pub struct LoadArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub sides: SideAddrs,
    /// Pairs (p2p), subscribers (fanout, shared) or publishers (fanin).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub clients: u32,
    /// QoS of publishes and subscriptions.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Payload size in bytes (at least 24: the stamp carrying publisher, sequence and time).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Total publish rate in msg/s, split evenly across publishers; 0: as fast as possible
    /// (bounded by the in-flight window for QoS 1/2 and by TCP backpressure).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// How long to publish after the warm-up (the measured window).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Publishing before the measured window; excluded from rates, latency and CPU.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// QoS 1/2 messages each publisher may have unacknowledged.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,
    /// After publishing ends, how long to wait for acknowledgements and messages in transit.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Give subscribers persistent sessions with this Session Expiry Interval (seconds; on
    /// MQTT 3.1.1 any value > 0 means clean session 0). QoS 1/2 publishes to them then take the
    /// broker's durable path (raftmq: committed through Raft before the PUBACK). 0: clean
    /// sessions.
    #[arg(long, default_value_t = 0)]
    pub sub_session_expiry: u32,
}

/// Options of `shared`.
#[derive(Clone, Debug, Args)]
pub struct SharedArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// Publishers feeding the group (all on the same topic).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub publishers: u32,
}

/// Options of `retained`.
#[derive(Clone, Debug, Args)]
pub struct RetainedArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub sides: SideAddrs,
    /// Retained topics to publish (one message each).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub topics: u32,
    /// QoS of the publishes and of the subscription.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Payload size in bytes (at least 24).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// QoS 1/2 messages the publisher may have unacknowledged.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,
    /// Bound on each phase (store, receive, clear).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Options of `conn`.
#[derive(Clone, Debug, Args)]
pub struct ConnArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Connections to open.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub clients: u32,
    /// Connections opened per second; 0: as fast as --connect-concurrency allows.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// How long to hold the connections open once all are established.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Spread the connections round-robin over these brokers (HOST:PORT; repeat it or give a
    /// comma-separated list) instead of --host/--port: the nodes of a cluster, or several
    /// broker processes.
    #[arg(long = "addr", value_name = "HOST:PORT", value_delimiter = ',')]
    pub addrs: Vec<String>,
    /// Local (source) addresses to connect from, round-robin (e.g. 127.0.0.2,127.0.0.3 on
    /// loopback): each one has its own range of ephemeral ports.
    #[arg(long = "bind", value_name = "IP", value_delimiter = ',')]
    pub binds: Vec<std::net::IpAddr>,
}

/// Options of `churn`.
#[derive(Clone, Debug, Args)]
pub struct ChurnArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Clients, each with its own persistent session, reconnecting in a loop.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub clients: u32,
    /// How long to churn.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Session Expiry Interval in seconds (MQTT 5; 3.1.1 sessions persist until removed).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..))]
    pub session_expiry: u32,
    /// QoS of the subscription each session holds.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
}

/// Options of `failover`.
#[derive(Clone, Debug, Args)]
pub struct FailoverArgs {
    /// MQTT addresses of the cluster's nodes (HOST:PORT, comma-separated or repeated). The
    /// --*-node options are 0-based indexes into this list.
    #[arg(
        long = "addrs",
        value_name = "HOST:PORT",
        value_delimiter = ',',
        required = true
    )]
    pub addrs: Vec<String>,
    /// The node the subscriber connects to first.
    #[arg(long, default_value_t = 0)]
    pub sub_node: usize,
    /// The node the publisher connects to first.
    #[arg(long, default_value_t = 1)]
    pub pub_node: usize,
    /// PID of the process to SIGKILL after --before (`kill -9 PID`).
    #[arg(long, value_name = "PID")]
    pub kill_pid: u32,
    /// The node that --kill-pid serves: reconnecting clients try it last.
    #[arg(long)]
    pub killed_node: usize,
    /// Publish rate in msg/s.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// QoS of the publishes and of the subscription: 1 or 2.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub qos: u8,
    /// Steady load before the kill.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub before: Duration,
    /// The longest wait for recovery after the kill; then the run stops as "not recovered".
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub after: Duration,
    /// Once recovered, how long to keep publishing (to see the delivery settle).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub settle: Duration,
    /// After publishing stops, the longest wait for outstanding acknowledgements and for every
    /// acknowledged message to arrive.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain: Duration,
    /// MQTT protocol level: 4 (3.1.1, clean session 0) or 5 (5.0, clean start 0 and
    /// --session-expiry; follows Server References).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(4..=5))]
    pub mqtt_version: u8,
    /// Session Expiry Interval of both clients, seconds (MQTT 5). Their sessions are removed
    /// at the end of the run.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..))]
    pub session_expiry: u32,
    /// Keep alive in seconds (0: none).
    #[arg(long, default_value_t = 10)]
    pub keep_alive: u16,
    /// Bound on each connection attempt (TCP connect → CONNACK) and SUBSCRIBE → SUBACK.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Pause after a failed connection attempt before the next one.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub retry_delay: Duration,
    /// QoS 1/2 messages the publisher may have unacknowledged (at most the broker's Receive
    /// Maximum). When the window is full, publishing pauses; it resumes at --rate, without a
    /// burst.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,
    /// Payload size in bytes (at least 24).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Measure no wills. Otherwise clients with wills connect to --killed-node before the
    /// kill (a persistent session with --session-expiry, a client without a session, and on
    /// MQTT 5 a persistent session with --will-delay), and a watcher on a surviving node times
    /// their arrival and checks that each arrives exactly once.
    #[arg(long)]
    pub no_wills: bool,
    /// Will Delay Interval of the third will client, seconds (MQTT 5); 0: no such client.
    #[arg(long, default_value_t = 2)]
    pub will_delay: u32,
    /// The node the will watcher subscribes on (not --killed-node). Default: --pub-node, or
    /// the first node not killed if that is --killed-node.
    #[arg(long)]
    pub will_node: Option<usize>,
    #[command(flatten)]
    pub output: RunOutput,
}

/// Options of `report`.
#[derive(Clone, Debug, Args)]
pub struct ReportArgs {
    /// The two runs to compare, as NAME=DIR where DIR holds SCENARIO.json summaries. The
    /// ratio column is first / second.
    #[arg(num_args = 2, required = true, value_name = "NAME=DIR")]
    pub runs: Vec<String>,
    /// Write the Markdown to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// A line to print under the title (repeatable), e.g. the machine and versions.
    #[arg(long)]
    pub note: Vec<String>,
}

/// Parses `250ms`, `10s`, `1.5s`, `2m`, `1h`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration such as 500ms, 10s, 2m or 1h"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown duration unit `{other}` (ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("`{s}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn scenario_flags_parse() {
        let cli = Cli::try_parse_from([
            "raftmq-bench",
            "p2p",
            "--clients",
            "4",
            "--qos",
            "1",
            "--rate",
            "1000",
            "--duration",
            "5s",
            "--mqtt-version",
            "5",
            "--json",
            "out.json",
        ])
        .expect("parses");
        let Command::P2p(args) = cli.command else {
            panic!("p2p expected");
        };
        assert_eq!((args.clients, args.qos, args.rate), (4, 1, 1000.0));
        assert_eq!(args.duration, Duration::from_secs(5));
        assert_eq!(args.common.mqtt_version, 5);
        assert!(Cli::try_parse_from(["raftmq-bench", "p2p", "--qos", "3"]).is_err());
        assert!(Cli::try_parse_from(["raftmq-bench", "p2p", "--mqtt-version", "3"]).is_err());
    }

    #[test]
    fn failover_flags_parse() {
        let base = [
            "raftmq-bench",
            "failover",
            "--addrs",
            "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3",
            "--kill-pid",
            "42",
            "--killed-node",
            "2",
        ];
        let cli = Cli::try_parse_from(base).expect("parses");
        let Command::Failover(args) = cli.command else {
            panic!("failover expected");
        };
        assert_eq!(args.addrs.len(), 3);
        assert_eq!((args.kill_pid, args.killed_node), (42, 2));
        assert_eq!((args.sub_node, args.pub_node, args.qos), (0, 1, 1));
        assert_eq!((args.rate, args.mqtt_version), (1000.0, 5));
        assert_eq!(args.before, Duration::from_secs(3));
        assert_eq!(args.after, Duration::from_secs(20));
        assert_eq!(args.retry_delay, Duration::from_millis(50));
        assert_eq!(
            (args.no_wills, args.will_delay, args.will_node),
            (false, 2, None)
        );
        let with = |extra: &[&'static str]| {
            Cli::try_parse_from(base.iter().chain(extra).copied().collect::<Vec<_>>())
        };
        assert!(with(&["--qos", "2"]).is_ok());
        assert!(
            with(&["--qos", "0"]).is_err(),
            "QoS 0 has no acknowledgement"
        );
        assert!(with(&["--mqtt-version", "4"]).is_ok());
        let missing_pid = [
            "raftmq-bench",
            "failover",
            "--addrs",
            "a:1",
            "--killed-node",
            "0",
        ];
        assert!(Cli::try_parse_from(missing_pid).is_err());
    }
}
