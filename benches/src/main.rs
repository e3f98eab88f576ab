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
mod wills;

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
        Command::P2p(args) => messages(args, |ctx| Topology::p2p(ctx, args.clients)).await?,
        Command::Fanout(args) => messages(args, |ctx| Topology::fanout(ctx, args.clients)).await?,
        Command::Fanin(args) => messages(args, |ctx| Topology::fanin(ctx, args.clients)).await?,
        Command::Shared(args) => {
            let load = &args.load;
            messages(load, |ctx| {
                Topology::shared(ctx, load.clients, args.publishers)
            })
            .await?
        }
        Command::Retained(args) => {
            let ctx = Context::new(&args.common)?;
            (&args.common.output.json, retained::run(&ctx, args).await?)
        }
        Command::Conn(args) => {
            let ctx = Context::new(&args.common)?;
            (
                &args.common.output.json,
                connections::conn(&ctx, args).await?,
            )
        }
        Command::Churn(args) => {
            let ctx = Context::new(&args.common)?;
            (
                &args.common.output.json,
                connections::churn(&ctx, args).await?,
            )
        }
        Command::Failover(args) => (&args.output.json, failover::run(args).await?),
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

/// Runs a message scenario with the topology `topology` makes for the run's context; returns
/// where to write its JSON summary, and the summary.
async fn messages(
    args: &cli::LoadArgs,
    topology: impl FnOnce(&Context) -> Topology,
) -> anyhow::Result<(&Option<std::path::PathBuf>, summary::Summary)> {
    let ctx = Context::new(&args.common)?;
    let topology = topology(&ctx);
    Ok((
        &args.common.output.json,
        messaging::run(&ctx, args, topology).await?,
    ))
}
