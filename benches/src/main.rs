//! `raftmq-bench`: an MQTT load generator (in the spirit of emqtt-bench) for raftmq, Mosquitto
//! or any broker at host:port. See `benches/README.md`.

mod accounting;
mod cli;
mod client;
mod connections;
mod context;
mod failover;
mod messaging;
mod payload;
mod procfs;
mod recovery;
mod report;
mod retained;
mod summary;

use clap::Parser;
use cli::{Cli, Command};
use context::Context;
use messaging::Topology;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("raftmq-bench: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("raftmq-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    let (json, summary) = match &command {
        Command::P2p(args) => {
            let ctx = Context::new(&args.common)?;
            let topology = Topology::p2p(&ctx, args.clients);
            (
                &args.common.json,
                messaging::run(&ctx, args, topology).await?,
            )
        }
        Command::Fanout(args) => {
            let ctx = Context::new(&args.common)?;
            let topology = Topology::fanout(&ctx, args.clients);
            (
                &args.common.json,
                messaging::run(&ctx, args, topology).await?,
            )
        }
        Command::Fanin(args) => {
            let ctx = Context::new(&args.common)?;
            let topology = Topology::fanin(&ctx, args.clients);
            (
                &args.common.json,
                messaging::run(&ctx, args, topology).await?,
            )
        }
        Command::Shared(args) => {
            let load = &args.load;
            let ctx = Context::new(&load.common)?;
            let topology = Topology::shared(&ctx, load.clients, args.publishers);
            (
                &load.common.json,
                messaging::run(&ctx, load, topology).await?,
            )
        }
        Command::Retained(args) => {
            let ctx = Context::new(&args.common)?;
            (&args.common.json, retained::run(&ctx, args).await?)
        }
        Command::Conn(args) => {
            let ctx = Context::new(&args.common)?;
            (&args.common.json, connections::conn(&ctx, args).await?)
        }
        Command::Churn(args) => {
            let ctx = Context::new(&args.common)?;
            (&args.common.json, connections::churn(&ctx, args).await?)
        }
        Command::Failover(args) => (&args.json, failover::run(args).await?),
        Command::Report(args) => return report::run(args),
    };
    print!("{summary}");
    if let Some(path) = json {
        summary.write_json(path)?;
    }
    if let Some(failover) = &summary.failover {
        let problems = failover.problems();
        anyhow::ensure!(problems.is_empty(), "{}", problems.join("; "));
    }
    Ok(())
}
