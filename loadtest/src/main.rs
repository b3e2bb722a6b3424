//! `loadtest`: benchmarks for the gateway.
//!
//! * `loadtest idle --transport ws|sse --connections N --gateway-pid PID --url URL`
//!   opens N idle connections and prints the gateway's resident memory per
//!   connection and the client-side connect rate.
//! * `loadtest fanout --subscribers N --rate R --duration S --url URL
//!   [--transport ws|sse]` measures deliveries per second and publish ->
//!   receive latency of one channel fanned out to N WebSocket (or SSE)
//!   subscribers.
//! * `loadtest run idle|broadcast|unicast|reconnect|drain ...` is the load
//!   generator on the Rust client SDK (worker processes, source-address
//!   spreading, HDR latency, loss and duplicate counts, JSON/SVG reports);
//!   see `scenario` and loadtest/README.md.
//!
//! * `loadtest rolling --clients N --nodes 3 --rate R` starts a cluster
//!   (redis, nats, nodes, HAProxy) and replaces every node, surge-style,
//!   under load: lost, duplicated, reconnects per client, drain time per
//!   node, delivery delay during the roll; see `rolling`.
//!
//! * `loadtest names --url URL --gateway-pid PID --jwt-secret S` is the
//!   distinct-name attack: gateway RSS while clients subscribe (and an API
//!   client publishes) to new names as fast as allowed; see `names` and
//!   `loadtest/bench-names.sh`.
//!
//! * `loadtest million --connections 1000000 --nodes 56` holds a million
//!   connections on 56 nodes with raw clients, broadcasts to all of them and
//!   counts every delivery; see `million` and `loadtest/bench-million.sh`.
//!
//! * `loadtest reference` is the thinnest fan-out server we can write, for
//!   `fanout` and `idle` to measure side by side with the gateway; see
//!   `reference` and `loadtest/bench.sh` (`SERVER=reference`).
//!
//! * `loadtest noise --percent 30` takes that share of a core (a noisy
//!   neighbour for `NOISE=30 loadtest/bench.sh`).
//!
//! Targets are loopback addresses only. `loadtest/bench.sh` runs the standard
//! set (see BENCHMARKS.md).

mod fanout;
mod idle;
mod million;
mod names;
mod noise;
mod rawsse;
mod rawws;
mod reference;
mod rolling;
mod scenario;
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
    /// Load generator on the Rust client SDK: `run idle|broadcast|unicast|reconnect|drain`.
    Run(scenario::RunArgs),
    /// Internal: one worker process of `run` (SDK clients).
    #[command(hide = true)]
    RunWorker(scenario::worker::RunWorkerArgs),
    /// Internal: one TCP proxy process of `run`.
    #[command(hide = true)]
    RunProxy(scenario::proxy::ProxyArgs),
    /// Rolling upgrade of a cluster behind HAProxy under load: loss, duplicates, reconnects, drain time, delay.
    Rolling(rolling::RollingArgs),
    /// Internal: one worker process of `rolling` (its clients).
    #[command(hide = true)]
    RollingWorker(rolling::RollingWorkerArgs),
    /// The distinct-name attack: subscribes and publishes to new names; gateway RSS over time.
    Names(names::NamesArgs),
    /// A million connections on one machine: many nodes, raw clients, broadcasts; memory, latency, loss.
    Million(million::MillionArgs),
    /// Internal: one worker process of `million` (its share of the connections).
    #[command(hide = true)]
    MillionWorker(million::MillionWorkerArgs),
    /// The thinnest fan-out server (the yardstick for the gateway): serves `fanout` and `idle`.
    Reference(reference::ReferenceArgs),
    /// A noisy neighbour: takes a share of one core until killed.
    Noise(noise::NoiseArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Noise(a) = &cli.command {
        return noise::noise(a);
    }
    let threads = match &cli.command {
        Command::Fanout(a) => a.threads,
        // 50-odd workers share two cores: one thread each.
        Command::MillionWorker(_) => Some(1),
        // As the gateway: GATEWAY_WORKER_THREADS, else one per CPU.
        Command::Reference(a) => a.threads.or_else(|| {
            std::env::var("GATEWAY_WORKER_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
        }),
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
            Command::Run(a) => scenario::run(a).await,
            Command::RunWorker(a) => scenario::worker::run_worker(a).await,
            Command::RunProxy(a) => scenario::proxy::run_proxy(a).await,
            Command::Rolling(a) => rolling::rolling(a).await,
            Command::RollingWorker(a) => rolling::worker(a).await,
            Command::Names(a) => names::names(a).await,
            Command::Million(a) => million::million(a).await,
            Command::MillionWorker(a) => million::worker(a).await,
            Command::Reference(a) => reference::reference(a).await,
            Command::Noise(_) => unreachable!("runs without a runtime"),
        }
    });
    // Don't wait for connection tasks still parked on their sockets.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    r
}
