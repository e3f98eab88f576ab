//! The raftmq broker binary as a library: command line, configuration, telemetry and the wiring
//! of the other crates (`main.rs` only parses arguments and reports errors).

pub mod cli;
pub mod config;
pub mod ctl;
pub mod docs;
pub mod passwd;
pub mod serve;
pub mod telemetry;
pub mod upgrade;

use anyhow::Context as _;
use cli::{Command, ConfigCommand};
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

/// Runs a parsed command line.
pub fn run(cli: cli::Cli) -> anyhow::Result<ExitCode> {
    match cli.into_command() {
        Command::Serve(args) => {
            let config = config::load(args.config.as_deref(), std::env::vars_os(), args.layer())
                .context("loading configuration")?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let data_dir = config.data_dir.clone();
            if let Err(e) = runtime.block_on(serve::serve(config)) {
                // A data dir of another store format: the operator's move, not a crash.
                if let Some(message) = upgrade::refusal(&e, &data_dir) {
                    eprintln!("{message}");
                    return Ok(ExitCode::from(upgrade::EXIT_INCOMPATIBLE_DATA_DIR));
                }
                return Err(e);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ctl(args) => {
            ctl::run(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Passwd(args) => {
            let message = passwd::run(&args)?;
            eprintln!("{message}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Default) => {
            write_stdout(docs::default_config_toml().as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Check { file }) => {
            let mut out = Vec::new();
            let ok = check_config_file(&file, &mut out)?;
            write_stdout(&out)?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// `raftmq config check FILE`: writes every problem of `file` (one per line) or `ok` to `out`;
/// returns whether the file is valid.
pub fn check_config_file(file: &Path, out: &mut impl Write) -> anyhow::Result<bool> {
    let problems = match config::read_file(file) {
        Ok(table) => match config::resolve(
            Some(table),
            config::Layer::default(),
            config::Layer::default(),
        ) {
            Ok(_) => Vec::new(),
            Err(invalid) => invalid.0.iter().map(ToString::to_string).collect(),
        },
        Err(e) => vec![format!("{e:#}")],
    };
    if problems.is_empty() {
        writeln!(out, "ok")?;
    }
    for p in &problems {
        writeln!(out, "{p}")?;
    }
    Ok(problems.is_empty())
}

/// Writes to standard output; a closed pipe (`raftmq config default | head`) is not an error.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result.context("writing to standard output"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> (bool, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raftmq.toml");
        std::fs::write(&path, text).expect("write");
        let mut out = Vec::new();
        let ok = check_config_file(&path, &mut out).expect("writes to a Vec");
        (ok, String::from_utf8(out).expect("utf-8"))
    }

    #[test]
    fn config_check_prints_ok_for_a_valid_file() {
        assert_eq!(
            check("node_id = 2\n[mqtt]\nmax_qos = 1\n"),
            (true, "ok\n".to_owned())
        );
        assert_eq!(check(""), (true, "ok\n".to_owned()));
    }

    #[test]
    fn config_check_prints_every_problem_one_per_line() {
        let (ok, out) = check("node_id = 0\n[mqtt]\nmax_qos = 3\nmax_inflihgt = 1\n");
        assert!(!ok);
        assert_eq!(
            out,
            "mqtt.max_inflihgt: unknown key (did you mean `mqtt.max_inflight`?)\n\
             node_id: must be at least 1\n\
             mqtt.max_qos: must be 0, 1 or 2\n"
        );
    }

    #[test]
    fn config_check_reports_unparsable_and_missing_files() {
        let (ok, out) = check("[mqtt\n");
        assert!(!ok);
        assert!(out.starts_with("parsing config file "), "{out}");
        let mut out = Vec::new();
        let ok =
            check_config_file(Path::new("/nonexistent/raftmq.toml"), &mut out).expect("writes");
        assert!(!ok);
        let out = String::from_utf8(out).expect("utf-8");
        assert!(
            out.starts_with("reading config file /nonexistent/raftmq.toml: "),
            "{out}"
        );
    }
}
