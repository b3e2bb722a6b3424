//! `loadtest`: benchmarks for the gateway.
//!
//! * `loadtest idle --transport ws|sse --connections N --gateway-pid PID --url URL`
//!   opens N idle connections and prints the gateway's resident memory per
//!   connection and the client-side connect rate.
//! * `loadtest fanout --subscribers N --rate R --duration S --url URL`
//!   measures deliveries per second and publish -> receive latency of one
//!   channel fanned out to N WebSocket subscribers.
//!
//! Targets are loopback addresses only. `loadtest/bench.sh` runs the standard
//! set (see BENCHMARKS.md).

mod fanout;
mod idle;
mod rawws;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "loadtest",
    about = "Benchmarks for the gateway (loopback targets only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Idle connections: gateway memory per connection, connect rate.
    Idle(idle::IdleArgs),
    /// One channel fanned out to many WebSocket subscribers: throughput, latency, loss.
    Fanout(fanout::FanoutArgs),
    /// Internal: one worker process of `idle`.
    #[command(hide = true)]
    Worker(idle::WorkerArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Fanout(a) => a.threads,
        _ => None,
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(t) = threads {
        rt.worker_threads(t.max(1));
    }
    let rt = rt.build()?;
    let r = rt.block_on(async move {
        match cli.command {
            Command::Idle(a) => idle::idle(a).await,
            Command::Fanout(a) => fanout::fanout(a).await,
            Command::Worker(a) => idle::worker(a).await,
        }
    });
    // Don't wait for connection tasks still parked on their sockets.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    r
}
