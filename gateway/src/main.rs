//! The `gateway` binary: `gateway [--addr HOST:PORT] [--dev] [--config FILE]`
//! serves; `gateway token ...` mints a connection token.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gateway::auth::{now_secs, Auth, Claims};
use gateway::config::{Config, Overrides};
use gateway::node::Node;
use tracing::{info, warn};

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "Real-time WebSocket and SSE gateway"
)]
struct Cli {
    /// Address to listen on (env GATEWAY_ADDR).
    #[arg(long, global = true)]
    addr: Option<std::net::SocketAddr>,
    /// Separate address for the operations routes only (env GATEWAY_ADMIN_ADDR).
    #[arg(long, global = true)]
    admin_addr: Option<std::net::SocketAddr>,
    /// Dev mode: anonymous connections and API calls allowed (env GATEWAY_DEV).
    #[arg(long, global = true)]
    dev: bool,
    /// TOML config file (env GATEWAY_CONFIG).
    #[arg(long, global = true, env = "GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// This node's name (env GATEWAY_NODE_ID).
    #[arg(long, global = true)]
    node_id: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Serve,
    /// Print an HS256 connection token signed with GATEWAY_JWT_SECRET.
    Token {
        /// The user id (`sub`).
        #[arg(long)]
        user: String,
        /// Channel patterns the token may subscribe to (repeat or comma-separate).
        #[arg(long, value_delimiter = ',')]
        subscribe: Vec<String>,
        /// Channel patterns the token may publish on.
        #[arg(long, value_delimiter = ',')]
        publish: Vec<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

/// The handled signals, each with whether it drains.
type Signals = Vec<(&'static str, tokio::signal::unix::Signal, bool)>;

/// Installs the handlers: SIGTERM, SIGINT and SIGQUIT drain; SIGHUP,
/// SIGUSR1 and SIGUSR2 are logged and ignored (nothing is reloadable at run
/// time: configuration changes roll out as a restart, which the drain makes
/// lossless); by default each would kill the process with no drain and no
/// close frames. Called before the node says it listens: a signal sent
/// from then on finds its handler (installing them when the shutdown
/// future is first polled left a window where SIGHUP killed the node).
fn install_signals() -> Signals {
    use tokio::signal::unix::{signal, SignalKind};
    let kinds = [
        ("SIGTERM", SignalKind::terminate(), true),
        ("SIGINT", SignalKind::interrupt(), true),
        ("SIGQUIT", SignalKind::quit(), true),
        ("SIGHUP", SignalKind::hangup(), false),
        ("SIGUSR1", SignalKind::user_defined1(), false),
        ("SIGUSR2", SignalKind::user_defined2(), false),
    ];
    let mut streams = Vec::new();
    for (name, kind, drains) in kinds {
        match signal(kind) {
            Ok(s) => streams.push((name, s, drains)),
            Err(e) => warn!(signal = name, error = %e, "cannot handle signal"),
        }
    }
    streams
}

/// Resolves when the node must drain and exit (a draining signal).
async fn shutdown_signal(mut streams: Signals) {
    if streams.is_empty() {
        // No handler: the node can only be killed; keep serving.
        std::future::pending::<()>().await;
    }
    loop {
        let next = futures_util::future::select_all(streams.iter_mut().map(|(name, s, drains)| {
            Box::pin(async move { s.recv().await.map(|_| (*name, *drains)) })
        }));
        match next.await.0 {
            Some((name, true)) => {
                info!(signal = name, "draining");
                return;
            }
            Some((name, false)) => info!(
                signal = name,
                "signal ignored (nothing to reload; roll out a restart instead)"
            ),
            None => {}
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let overrides = Overrides {
        addr: cli.addr,
        admin_addr: cli.admin_addr,
        dev: cli.dev.then_some(true),
        node_id: cli.node_id,
    };
    let token_only = matches!(cli.command, Some(Command::Token { .. }));
    let mut config = match Config::load(cli.config.as_deref(), overrides) {
        Ok(c) => c,
        // Minting needs only the secret; don't demand API keys for it.
        Err(_) if token_only => Config {
            dev: true,
            ..Config::load(
                cli.config.as_deref(),
                Overrides {
                    dev: Some(true),
                    ..Default::default()
                },
            )?
        },
        Err(e) => {
            eprintln!("gateway: {e}");
            std::process::exit(2);
        }
    };
    if let Some(Command::Token {
        user,
        subscribe,
        publish,
        ttl,
    }) = cli.command
    {
        config.dev = true;
        let auth = Auth::from_config(&config)?;
        protocol::validate_user(&user).context("--user")?;
        let now = now_secs();
        let claims = Claims {
            sub: user,
            exp: Some(now.saturating_add(ttl)),
            iat: Some(now),
            subscribe,
            publish,
            typ: None,
        };
        println!("{}", auth.mint(&claims)?);
        return Ok(());
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        runtime.worker_threads(config.worker_threads);
    }
    runtime.enable_all().build()?.block_on(serve(config))
}

/// Runs the node until it has drained.
async fn serve(config: Config) -> anyhow::Result<()> {
    gateway::telemetry::init_logging(&config);
    let unknown = Config::unknown_env();
    if !unknown.is_empty() {
        warn!(
            variables = %unknown.join(", "),
            "ignoring GATEWAY_* environment variables that name no setting (Kubernetes service links, scripts' own variables?)"
        );
    }
    if config.dev {
        warn!("DEV MODE: anonymous connections and unauthenticated publish API calls are accepted. Never run this in production.");
    }
    let prometheus = gateway::telemetry::init_metrics();
    let listener = gateway::server::bind(config.addr, config.listen_backlog)
        .with_context(|| format!("binding {}", config.addr))?;
    let admin = match config.admin_addr {
        Some(a) => Some(
            gateway::server::bind(a, config.listen_backlog)
                .with_context(|| format!("binding admin_addr {a}"))?,
        ),
        None => None,
    };
    let addr = listener.local_addr()?;
    let signals = install_signals();
    let node = Node::build(config, prometheus).await?;
    info!(node = %node.id, %addr, mode = node.mode(), backbone = node.broker.kind(), "gateway listening");
    // Machine-readable lines on stdout, for scripts and test harnesses.
    println!("listening on http://{addr}");
    if let Some(admin) = admin {
        let admin_addr = admin.local_addr()?;
        info!(%admin_addr, "operations routes listening");
        println!("admin listening on http://{admin_addr}");
        tokio::spawn(gateway::server::serve_ops(admin, node.clone()));
    }
    gateway::server::run(listener, node, shutdown_signal(signals)).await;
    Ok(())
}
