//! The command line: `raftmq [serve] [flags]`, `raftmq config default|check FILE`,
//! `raftmq ctl ...` (defined in [`crate::ctl`]).

use crate::config::{Layer, LogFormat};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use toml::Value;

/// raftmq: a clustered MQTT broker.
///
/// With no command, runs the broker (`raftmq serve`).
#[derive(Debug, Parser)]
#[command(
    name = "raftmq",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Flags of `serve`, accepted without the command name.
    #[command(flatten)]
    serve: ServeArgs,
}

impl Cli {
    /// The command to run (`serve` when none was given).
    pub fn into_command(self) -> Command {
        self.command.unwrap_or(Command::Serve(self.serve))
    }
}

/// A `raftmq` command.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker until SIGINT or SIGTERM (the default command).
    Serve(ServeArgs),
    /// Print or check configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Administer a running node through its admin API (HTTP).
    Ctl(crate::ctl::CtlArgs),
    /// Add, update or delete a user in a password file (auth.password_file), or with --scram in
    /// a SCRAM credentials file (auth.scram_file).
    Passwd(PasswdArgs),
}

/// `raftmq passwd FILE USER`: the password is read from standard input with
/// `--password-stdin` (for scripts), else prompted for (twice, not echoed) on a terminal.
#[derive(Debug, Args)]
pub struct PasswdArgs {
    /// The password file (created, mode 0600, if missing).
    pub file: PathBuf,
    /// The user name.
    pub username: String,
    /// Read the password from the first line of standard input.
    #[arg(long, conflicts_with = "delete")]
    pub password_stdin: bool,
    /// Remove the user instead.
    #[arg(long)]
    pub delete: bool,
    /// Write SCRAM-SHA-256 and SCRAM-SHA-512 credentials (salted keys, for MQTT 5 enhanced
    /// authentication) to a SCRAM credentials file (auth.scram_file) instead of an Argon2id hash
    /// to a password file.
    #[arg(long)]
    pub scram: bool,
}

/// `raftmq config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the default configuration as TOML, with a comment explaining every key.
    Default,
    /// Check a config file (merged over the defaults): print every problem and exit 1, or
    /// print "ok". Environment variables and flags are not considered.
    Check {
        /// The TOML file to check.
        file: PathBuf,
    },
}

/// Flags of `raftmq serve`; each overrides the config file and the `RAFTMQ_<SECTION>__<KEY>`
/// environment variables, and can itself be set from the environment variable shown.
#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// TOML config file (see `raftmq config default`).
    #[arg(short, long, value_name = "FILE", env = "RAFTMQ_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's id in the cluster [config: node_id].
    #[arg(long, value_name = "N", env = "RAFTMQ_NODE_ID", value_parser = clap::value_parser!(i64).range(1..))]
    pub node_id: Option<i64>,
    /// Derive the node id from a StatefulSet pod name: `raftmq-2` → ordinal 2 → node id 3
    /// (the name is read from `POD_NAME`, else `HOSTNAME`). Overrides --node-id.
    #[arg(long, env = "RAFTMQ_NODE_ID_FROM_ORDINAL", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false)]
    pub node_id_from_ordinal: bool,
    /// Directory for the node's state [config: data_dir].
    #[arg(long, value_name = "DIR", env = "RAFTMQ_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// MQTT TCP listener address, or "none" to disable it [config: listeners.tcp].
    #[arg(long, value_name = "ADDR", env = "RAFTMQ_MQTT_ADDR", value_parser = parse_listen_addr)]
    pub mqtt_addr: Option<ListenAddr>,
    /// HTTP (metrics, health) address, or "none" to disable it [config: http.addr].
    #[arg(long, value_name = "ADDR", env = "RAFTMQ_HTTP_ADDR", value_parser = parse_listen_addr)]
    pub http_addr: Option<ListenAddr>,
    /// Cluster listener address [config: cluster.addr].
    #[arg(long, value_name = "ADDR", env = "RAFTMQ_CLUSTER_ADDR")]
    pub cluster_addr: Option<SocketAddr>,
    /// Comma-separated host:port of nodes to join [config: cluster.seeds].
    #[arg(
        long,
        value_name = "HOST:PORT,...",
        env = "RAFTMQ_SEEDS",
        value_delimiter = ','
    )]
    pub seeds: Option<Vec<String>>,
    /// Log format [config: log.format].
    #[arg(long, value_name = "FORMAT", env = "RAFTMQ_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. "info" or "info,raftmq_server=debug" [config: log.level].
    #[arg(long, value_name = "LEVEL", env = "RAFTMQ_LOG_LEVEL")]
    pub log_level: Option<String>,
}

/// A listener address flag: an address, or disabled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// `none` or an empty value.
    Disabled,
    /// Listen on this address.
    At(SocketAddr),
}

fn parse_listen_addr(s: &str) -> Result<ListenAddr, String> {
    let s = s.trim();
    if s.is_empty() || s.eq_ignore_ascii_case("none") {
        return Ok(ListenAddr::Disabled);
    }
    s.parse().map(ListenAddr::At).map_err(|_| {
        format!("expected an address such as 0.0.0.0:1883 or [::]:1883, or \"none\" (got `{s}`)")
    })
}

impl ListenAddr {
    fn to_value(self) -> Value {
        match self {
            ListenAddr::Disabled => Value::String("none".to_owned()),
            ListenAddr::At(addr) => Value::String(addr.to_string()),
        }
    }
}

/// The node id for a StatefulSet pod: its ordinal (the digits after the last `-`) plus one.
pub fn node_id_from_pod_name(name: &str) -> Option<u64> {
    let ordinal: u64 = name.rsplit_once('-')?.1.parse().ok()?;
    ordinal.checked_add(1)
}

impl ServeArgs {
    /// The configuration layer these flags make (the top one).
    pub fn layer(&self) -> Layer {
        let mut layer = Layer::default();
        if let Some(n) = self.node_id {
            layer.set("node_id", Value::Integer(n), "--node-id");
        }
        if self.node_id_from_ordinal {
            let name = std::env::var("POD_NAME")
                .or_else(|_| std::env::var("HOSTNAME"))
                .unwrap_or_default();
            // An unusable name leaves node_id invalid (0), which the config check reports.
            let id = node_id_from_pod_name(&name).map_or(0, |id| i64::try_from(id).unwrap_or(0));
            layer.set("node_id", Value::Integer(id), "--node-id-from-ordinal");
        }
        if let Some(dir) = &self.data_dir {
            layer.set(
                "data_dir",
                Value::String(dir.to_string_lossy().into_owned()),
                "--data-dir",
            );
        }
        if let Some(addr) = self.mqtt_addr {
            layer.set("listeners.tcp", addr.to_value(), "--mqtt-addr");
        }
        if let Some(addr) = self.http_addr {
            layer.set("http.addr", addr.to_value(), "--http-addr");
        }
        if let Some(addr) = self.cluster_addr {
            layer.set(
                "cluster.addr",
                Value::String(addr.to_string()),
                "--cluster-addr",
            );
        }
        if let Some(seeds) = &self.seeds {
            let seeds = seeds.iter().map(|s| s.trim()).filter(|s| !s.is_empty());
            layer.set(
                "cluster.seeds",
                Value::Array(seeds.map(|s| Value::String(s.to_owned())).collect()),
                "--seeds",
            );
        }
        if let Some(format) = self.log_format {
            layer.set(
                "log.format",
                Value::String(format.as_str().to_owned()),
                "--log-format",
            );
        }
        if let Some(level) = &self.log_level {
            layer.set("log.level", Value::String(level.clone()), "--log-level");
        }
        layer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, FLAG_ONLY_ENV_VARS, env_layer, resolve};
    use clap::CommandFactory;
    use std::ffi::OsString;
    use std::path::Path;

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_from(std::iter::once("raftmq").chain(args.iter().copied()))
            .map(Cli::into_command)
    }

    fn serve_config(args: &[&str]) -> Config {
        let Ok(Command::Serve(serve)) = parse(args) else {
            panic!("not serve: {args:?}")
        };
        resolve(None, Layer::default(), serve.layer()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn no_command_means_serve_and_top_level_flags_are_serve_flags() {
        assert!(matches!(parse(&[]), Ok(Command::Serve(s)) if s.layer() == Layer::default()));
        assert_eq!(serve_config(&[]), Config::default());
        assert_eq!(serve_config(&["--node-id", "3"]).node_id, 3);
        assert_eq!(node_id_from_pod_name("raftmq-0"), Some(1));
        assert_eq!(node_id_from_pod_name("my-broker-raftmq-12"), Some(13));
        assert_eq!(node_id_from_pod_name("raftmq"), None);
        assert_eq!(node_id_from_pod_name("raftmq-x"), None);
        assert_eq!(serve_config(&["serve", "--node-id", "3"]).node_id, 3);
    }

    #[test]
    fn mqtt_addr_none_disables_the_listener() {
        assert_eq!(
            serve_config(&["serve", "--mqtt-addr", "none"])
                .listeners
                .tcp,
            None
        );
        assert_eq!(serve_config(&["--mqtt-addr", ""]).listeners.tcp, None);
        let config = serve_config(&["--http-addr", "NONE"]);
        assert_eq!(
            (config.http.addr, config.listeners),
            (None, Default::default())
        );
    }

    #[test]
    fn flags_set_their_config_keys() {
        let config = serve_config(&[
            "serve",
            "--node-id=5",
            "--data-dir=/var/lib/raftmq",
            "--mqtt-addr=127.0.0.1:1884",
            "--http-addr=[::1]:9200",
            "--cluster-addr=10.0.0.1:7000",
            "--seeds=a:1,b:2",
            "--log-format=json",
            "--log-level=debug,raftmq=trace",
        ]);
        assert_eq!(config.node_id, 5);
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/raftmq"));
        assert_eq!(
            config.listeners.tcp,
            Some(SocketAddr::from(([127, 0, 0, 1], 1884)))
        );
        assert_eq!(config.http.addr, "[::1]:9200".parse().ok());
        assert_eq!(config.cluster.addr, SocketAddr::from(([10, 0, 0, 1], 7000)));
        assert_eq!(config.cluster.seeds, ["a:1", "b:2"]);
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(config.log.level, "debug,raftmq=trace");
    }

    #[test]
    fn bad_flag_values_are_usage_errors() {
        for args in [
            &["--mqtt-addr", "localhost"][..],
            &["--node-id", "0"],
            &["--node-id", "x"],
            &["--log-format", "xml"],
            &["--cluster-addr", "nowhere"],
        ] {
            let err = parse(args).expect_err("rejected");
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
        let err = parse(&["--mqtt-addr", "localhost"]).expect_err("rejected");
        assert!(err.to_string().contains("\"none\""), "{err}");
    }

    #[test]
    fn serve_flags_do_not_mix_with_other_commands() {
        assert!(parse(&["--node-id", "2", "config", "default"]).is_err());
        assert!(matches!(
            parse(&["config", "default"]),
            Ok(Command::Config(ConfigCommand::Default))
        ));
        assert!(matches!(
            parse(&["config", "check", "x.toml"]),
            Ok(Command::Config(ConfigCommand::Check { file })) if file == Path::new("x.toml")
        ));
        assert!(parse(&["config", "check"]).is_err());
    }

    #[test]
    fn ctl_commands_parse_with_global_options() {
        use crate::ctl::{ClientsCmd, CtlCommand, Output};
        let Ok(Command::Ctl(ctl)) = parse(&[
            "ctl",
            "clients",
            "kick",
            "c1",
            "--discard-session",
            "--url",
            "http://10.0.0.1:9100",
            "--output",
            "json",
        ]) else {
            panic!("not ctl")
        };
        assert_eq!(ctl.url, "http://10.0.0.1:9100");
        assert_eq!(ctl.output, Output::Json);
        assert!(matches!(
            ctl.command,
            CtlCommand::Clients(ClientsCmd::Kick { ref client_id, discard_session: true }) if client_id == "c1"
        ));
        let Ok(Command::Ctl(ctl)) = parse(&["ctl", "drain", "--wait"]) else {
            panic!("not ctl")
        };
        assert_eq!(ctl.url, "http://127.0.0.1:9100");
        assert!(matches!(ctl.command, CtlCommand::Drain { wait: true, .. }));
        for bad in [
            &["ctl"][..],
            &["ctl", "publish"],
            &["ctl", "publish", "t", "--user-property", "novalue"],
            &["ctl", "cluster", "remove", "x"],
            &["ctl", "--output", "xml", "cluster", "status"],
        ] {
            assert_eq!(parse(bad).expect_err("rejected").exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn version_and_help_are_offered() {
        let err = parse(&["--version"]).expect_err("prints version");
        assert_eq!(err.kind(), clap::error::ErrorKind::DisplayVersion);
        assert!(err.to_string().contains(env!("CARGO_PKG_VERSION")));
        let err = parse(&["serve", "--help"]).expect_err("prints help");
        assert!(err.to_string().contains("[env: RAFTMQ_MQTT_ADDR="), "{err}");
    }

    /// Flag variables are either `RAFTMQ_<KEY>` names the environment layer also understands
    /// (same meaning) or listed as flag-only so the environment layer does not reject them.
    #[test]
    fn flag_env_vars_are_never_rejected_by_the_env_layer() {
        let cmd = Cli::command();
        // The environment variables the flags of `subcommand` read.
        let env_vars = |subcommand: &str| -> Vec<String> {
            cmd.find_subcommand(subcommand)
                .unwrap_or_else(|| panic!("no {subcommand} command"))
                .get_arguments()
                .filter_map(|a| a.get_env())
                .map(|v| v.to_string_lossy().into_owned())
                .collect()
        };
        let vars = env_vars("serve");
        assert_eq!(vars.len(), 10, "{vars:?}");
        for var in &vars {
            let value = if var == "RAFTMQ_NODE_ID" { "2" } else { "x" };
            let layer = env_layer([(OsString::from(var), OsString::from(value))]);
            assert!(layer.problems.is_empty(), "{var}: {:?}", layer.problems);
        }
        let ctl_vars = env_vars("ctl");
        assert_eq!(ctl_vars, ["RAFTMQ_ADMIN_TOKEN"]);
        for var in FLAG_ONLY_ENV_VARS {
            assert!(
                vars.iter().chain(&ctl_vars).any(|v| v == var),
                "{var} is not a flag's variable any more"
            );
        }
    }
}
