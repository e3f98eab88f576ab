//! `raftmq`: the broker executable.

use clap::Parser as _;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Usage errors exit with 2 (and --help/--version with 0) inside `parse`.
    let cli = raftmq::cli::Cli::parse();
    match raftmq::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
