//! `loadtest idle`: open many idle connections and measure what each costs
//! the gateway in resident memory.
//!
//! Connections are opened at a bounded rate with a bounded number of
//! handshakes in flight, each from one of several source addresses
//! (127.0.0.2 ...). When one process cannot hold them all (open-file
//! limit), they are spread over worker processes (this binary re-invoked
//! with the hidden `worker` subcommand); each worker prints one `READY` line
//! when its share is open and holds the connections until its stdin closes.

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use harness::sse::SseParser;
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::util::{self, Target};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportKind {
    Ws,
    Sse,
}

impl TransportKind {
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Ws => "ws",
            TransportKind::Sse => "sse",
        }
    }
}

/// What every opener (the parent or a worker) needs.
#[derive(Debug, Clone, Args)]
pub struct OpenArgs {
    /// Transport to open.
    #[arg(long, value_enum)]
    pub transport: TransportKind,
    /// Gateway base URL (loopback), e.g. http://127.0.0.1:8080.
    #[arg(long)]
    pub url: String,
    /// Channel every connection subscribes to.
    #[arg(long, default_value = "idle")]
    pub channel: String,
    /// Source addresses to spread connections over: 127.0.0.2 .. 127.0.0.(1+N).
    #[arg(long, default_value_t = 32)]
    pub source_ips: u32,
    /// Attempts per connection before it counts as failed.
    #[arg(long, default_value_t = 3)]
    pub attempts: u32,
    /// Per-attempt time limit (TCP connect + handshake + subscribe), seconds.
    #[arg(long, default_value_t = 10)]
    pub attempt_timeout: u64,
}

#[derive(Debug, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub open: OpenArgs,
    /// Connections to open in total.
    #[arg(long, default_value_t = 19_000)]
    pub connections: u64,
    /// The gateway's process id (its /proc/PID/status VmRSS is measured).
    #[arg(long)]
    pub gateway_pid: u32,
    /// New connections started per second (all workers together).
    #[arg(long, default_value_t = 5_000.0)]
    pub rate: f64,
    /// Handshakes in flight at once (all workers together).
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// Worker processes; 0 = as many as the open-file limit requires.
    #[arg(long, default_value_t = 0)]
    pub workers: u32,
    /// Wait after the last connection opened before measuring, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub settle: f64,
    /// Give up on the opening phase after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

/// The hidden `worker` subcommand: opens its share and holds it.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub open: OpenArgs,
    #[arg(long)]
    pub connections: u64,
    /// Index of this worker's first connection (spreads source addresses).
    #[arg(long, default_value_t = 0)]
    pub offset: u64,
    #[arg(long)]
    pub rate: f64,
    #[arg(long)]
    pub concurrency: usize,
    /// Exit after this many seconds even if stdin stays open.
    #[arg(long, default_value_t = 600)]
    pub hold_max: u64,
    /// Give up on the opening phase after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

/// What opening a batch of connections gave.
struct Opened {
    opened: u64,
    failed: u64,
    retries: u64,
    elapsed: Duration,
    /// Per connection: TCP connect to subscribed, µs.
    hist: Histogram<u64>,
    first_error: Option<String>,
    /// The connection tasks; dropping this closes every connection.
    holders: JoinSet<()>,
}

/// A WebSocket as the idle benchmark keeps it.
type Ws = WebSocketStream<TcpStream>;

async fn recv_text(ws: &mut Ws) -> anyhow::Result<String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(t.to_string()),
            Some(Ok(Message::Close(c))) => bail!("closed by the gateway: {c:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("connection closed"),
        }
    }
}

/// Waits for a frame of `kind` (e.g. `connected`); an `error` frame fails.
async fn expect_frame(ws: &mut Ws, kind: &str) -> anyhow::Result<()> {
    let want = format!("\"type\":\"{kind}\"");
    loop {
        let t = recv_text(ws).await?;
        if t.contains(&want) {
            return Ok(());
        }
        if t.contains("\"type\":\"error\"") {
            bail!("gateway answered: {t}");
        }
    }
}

async fn open_ws(target: &Target, src: std::net::Ipv4Addr, channel: &str) -> anyhow::Result<Ws> {
    let stream = util::connect_from(src, target.addr).await?;
    // Small buffers: the client side holds up to 19,000 of these.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let url = format!("ws://{}/ws", target.host);
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
    ws.send(Message::text(r#"{"type":"connect","id":1}"#))
        .await?;
    expect_frame(&mut ws, "connected").await?;
    ws.send(Message::text(format!(
        r#"{{"type":"subscribe","id":2,"channel":"{channel}"}}"#
    )))
    .await?;
    expect_frame(&mut ws, "subscribed").await?;
    Ok(ws)
}

/// Keeps a WebSocket open, answering the gateway's heartbeats.
async fn hold_ws(mut ws: Ws) {
    while let Some(Ok(m)) = ws.next().await {
        if let Message::Text(t) = m {
            if t.as_str().starts_with(r#"{"type":"ping""#)
                && ws.send(Message::text(r#"{"type":"pong"}"#)).await.is_err()
            {
                return;
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A raw HTTP/1.1 `GET /sse`: reads the response head and the `connected`
/// event.
pub(crate) async fn open_sse(
    target: &Target,
    src: std::net::Ipv4Addr,
    query: &str,
) -> anyhow::Result<TcpStream> {
    let mut stream = util::connect_from(src, target.addr).await?;
    let req = format!(
        "GET /sse?{query} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n",
        target.host
    );
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!(
                "closed before the connected event: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(head_end) = find(&buf, b"\r\n\r\n") {
            if !buf.starts_with(b"HTTP/1.1 200") {
                bail!(
                    "gateway answered: {}",
                    String::from_utf8_lossy(&buf).lines().next().unwrap_or("")
                );
            }
            let mut events = SseParser::default();
            events.feed(&buf[head_end + 4..]);
            if std::iter::from_fn(|| events.next_event())
                .any(|e| e.event.as_deref() == Some("connected"))
            {
                return Ok(stream);
            }
        }
        if buf.len() > 64 * 1024 {
            bail!("no connected event in the first 64 KiB");
        }
    }
}

/// Keeps an SSE stream open, discarding keep-alives.
async fn hold_sse(mut stream: TcpStream) {
    let mut buf = [0u8; 512];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

enum Held {
    Ws(Box<Ws>),
    Sse(TcpStream),
}

async fn open_one(args: &OpenArgs, target: &Target, i: u64) -> anyhow::Result<Held> {
    let src = util::source_ip(i, args.source_ips);
    match args.transport {
        TransportKind::Ws => Ok(Held::Ws(Box::new(
            open_ws(target, src, &args.channel).await?,
        ))),
        TransportKind::Sse => Ok(Held::Sse(
            open_sse(target, src, &format!("channel={}", args.channel)).await?,
        )),
    }
}

/// Opens `n` connections numbered `offset..offset+n`, paced at `rate`/s
/// with at most `concurrency` handshakes in flight.
async fn open_all(
    args: &OpenArgs,
    n: u64,
    offset: u64,
    rate: f64,
    concurrency: usize,
    timeout: Duration,
) -> anyhow::Result<Opened> {
    let target = Arc::new(Target::parse(&args.url)?);
    let args = Arc::new(args.clone());
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let retries = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<Duration, String>>();
    let mut holders = JoinSet::new();
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let pace_start = tokio::time::Instant::now();

    let mut hist = util::new_hist();
    let (mut opened, mut failed, mut first_error) = (0u64, 0u64, None);
    let mut note = |r: Result<Duration, String>, opened: &mut u64, failed: &mut u64| match r {
        Ok(d) => {
            *opened += 1;
            hist.saturating_record(d.as_micros() as u64);
        }
        Err(e) => {
            *failed += 1;
            first_error.get_or_insert(e);
        }
    };

    for k in 0..n {
        util::pace(pace_start, k, rate).await;
        let permit = tokio::select! {
            p = sem.clone().acquire_owned() => p.context("semaphore closed")?,
            _ = tokio::time::sleep_until(deadline) => break,
        };
        // Take in finished results now and then so the channel stays short.
        while let Ok(r) = rx.try_recv() {
            note(r, &mut opened, &mut failed);
        }
        let (target, args, tx, retries) =
            (target.clone(), args.clone(), tx.clone(), retries.clone());
        holders.spawn(async move {
            let t0 = Instant::now();
            let mut attempt = 0;
            let held = loop {
                attempt += 1;
                let r = tokio::time::timeout(
                    Duration::from_secs(args.attempt_timeout),
                    open_one(&args, &target, offset + k),
                )
                .await;
                match r {
                    Ok(Ok(held)) => break held,
                    Ok(Err(e)) if attempt >= args.attempts => {
                        let _ = tx.send(Err(format!("{e:#}")));
                        return;
                    }
                    Err(_) if attempt >= args.attempts => {
                        let _ = tx.send(Err("timed out".into()));
                        return;
                    }
                    _ => {
                        retries.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                    }
                }
            };
            drop(permit);
            let _ = tx.send(Ok(t0.elapsed()));
            match held {
                Held::Ws(ws) => hold_ws(*ws).await,
                Held::Sse(s) => hold_sse(s).await,
            }
        });
    }
    drop(tx);
    let spawned = holders.len() as u64;
    while opened + failed < spawned {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(r)) => note(r, &mut opened, &mut failed),
            Ok(None) | Err(_) => break,
        }
    }
    let elapsed = start.elapsed();
    let unaccounted = n - opened - failed;
    if unaccounted > 0 {
        failed += unaccounted;
        first_error.get_or_insert_with(|| format!("{unaccounted} not open within --timeout"));
    }
    Ok(Opened {
        opened,
        failed,
        retries: retries.load(Ordering::Relaxed),
        elapsed,
        hist,
        first_error,
        holders,
    })
}

/// The `worker` subcommand.
pub async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let o = open_all(
        &args.open,
        args.connections,
        args.offset,
        args.rate,
        args.concurrency,
        Duration::from_secs(args.timeout),
    )
    .await?;
    println!(
        "READY {} {} {} {} {} {}",
        o.opened,
        o.failed,
        o.retries,
        o.elapsed.as_micros(),
        util::hist_to_hex(&o.hist),
        o.first_error.unwrap_or_default().replace(['\n', '\r'], " ")
    );
    // Hold until the parent closes our stdin (or the safety limit).
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    });
    let _ = tokio::time::timeout(Duration::from_secs(args.hold_max), stdin_closed).await;
    drop(o.holders);
    Ok(())
}

struct WorkerResult {
    opened: u64,
    failed: u64,
    retries: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
    first_error: Option<String>,
}

fn parse_ready(line: &str) -> anyhow::Result<WorkerResult> {
    let mut f = line.trim_end().splitn(7, ' ');
    if f.next() != Some("READY") {
        bail!("worker said {line:?}");
    }
    let mut num = || -> anyhow::Result<u64> { Ok(f.next().context("short READY line")?.parse()?) };
    let (opened, failed, retries, elapsed_us) = (num()?, num()?, num()?, num()?);
    let hist = util::hist_from_hex(f.next().context("no histogram")?)?;
    let first_error = f.next().map(str::to_owned).filter(|s| !s.is_empty());
    Ok(WorkerResult {
        opened,
        failed,
        retries,
        elapsed: Duration::from_micros(elapsed_us),
        hist,
        first_error,
    })
}

/// How many processes `n` connections need under this process's open-file
/// limit (each keeps ~200 descriptors for itself).
fn workers_needed(n: u64) -> u32 {
    let per = util::nofile_limit().saturating_sub(200).max(100);
    n.div_ceil(per).max(1) as u32
}

/// The `idle` subcommand.
pub async fn idle(args: IdleArgs) -> anyhow::Result<()> {
    let pid = args.gateway_pid;
    let n = args.connections;
    let workers = if args.workers == 0 {
        workers_needed(n)
    } else {
        args.workers
    };
    let rss0 = util::vm_rss_kib(pid).context("gateway VmRSS (is --gateway-pid right?)")?;
    let fds0 = util::fd_count(pid).unwrap_or(0);
    println!(
        "idle: transport={} connections={} workers={} rate={}/s concurrency={} source_ips={} channel={}",
        args.open.transport.name(),
        n,
        workers,
        args.rate,
        args.concurrency,
        args.open.source_ips,
        args.open.channel
    );
    println!("gateway pid {pid}: before: VmRSS {rss0} KiB, open fds {fds0}");

    let timeout = Duration::from_secs(args.timeout);
    let jiffies0 = util::cpu_jiffies();
    // Results, and what keeps the connections open until we are done.
    let mut results = Vec::new();
    let mut local_holders = None;
    let mut children = Vec::new();
    if workers == 1 {
        let o = open_all(&args.open, n, 0, args.rate, args.concurrency, timeout).await?;
        results.push(WorkerResult {
            opened: o.opened,
            failed: o.failed,
            retries: o.retries,
            elapsed: o.elapsed,
            hist: o.hist,
            first_error: o.first_error,
        });
        local_holders = Some(o.holders);
    } else {
        let exe = std::env::current_exe().context("own executable")?;
        let mut offset = 0;
        for w in 0..u64::from(workers) {
            let share = n / u64::from(workers) + u64::from(w < n % u64::from(workers));
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.arg("worker")
                .args(["--transport", args.open.transport.name()])
                .args(["--url", &args.open.url])
                .args(["--channel", &args.open.channel])
                .args(["--source-ips", &args.open.source_ips.to_string()])
                .args(["--attempts", &args.open.attempts.to_string()])
                .args(["--attempt-timeout", &args.open.attempt_timeout.to_string()])
                .args(["--connections", &share.to_string()])
                .args(["--offset", &offset.to_string()])
                .args(["--rate", &(args.rate / f64::from(workers)).to_string()])
                .args([
                    "--concurrency",
                    &(args.concurrency / workers as usize).max(1).to_string(),
                ])
                .args(["--timeout", &args.timeout.to_string()])
                .args(["--hold-max", &(args.timeout + 120).to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true);
            let mut child = cmd.spawn().context("starting a worker process")?;
            let stdout = child.stdout.take().context("worker stdout")?;
            children.push((child, BufReader::new(stdout)));
            offset += share;
        }
        for (_, out) in children.iter_mut() {
            let mut line = String::new();
            let read =
                tokio::time::timeout(timeout + Duration::from_secs(30), out.read_line(&mut line))
                    .await;
            match read {
                Ok(Ok(n)) if n > 0 => results.push(parse_ready(&line)?),
                _ => bail!("a worker did not report (line {line:?})"),
            }
        }
    }

    let busy = util::cpu_busy_pct(&jiffies0, &util::cpu_jiffies());
    let opened: u64 = results.iter().map(|r| r.opened).sum();
    let failed: u64 = results.iter().map(|r| r.failed).sum();
    let retries: u64 = results.iter().map(|r| r.retries).sum();
    let elapsed = results.iter().map(|r| r.elapsed).max().unwrap_or_default();
    let mut hist = util::new_hist();
    for r in &results {
        hist.add(&r.hist).context("merging histograms")?;
    }
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let rss1 = util::vm_rss_kib(pid)?;
    let hwm = util::vm_hwm_kib(pid).unwrap_or(0);
    let fds1 = util::fd_count(pid).unwrap_or(0);
    let threads = util::threads(pid).unwrap_or(0);

    println!(
        "client: opened {opened}, failed {failed}, retries {retries}, in {:.2} s => connect rate {:.0} conn/s",
        elapsed.as_secs_f64(),
        opened as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    println!(
        "machine CPU busy while connecting: {}",
        busy.iter()
            .enumerate()
            .map(|(i, b)| format!("cpu{i} {b:.0}%"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "client: connect+handshake+subscribe latency {}",
        util::latency_line(&hist)
    );
    if let Some(e) = results.iter().find_map(|r| r.first_error.clone()) {
        println!("client: first error: {e}");
    }
    println!(
        "gateway pid {pid}: after {:.1} s settle: VmRSS {rss1} KiB (peak VmHWM {hwm} KiB), open fds {fds1}, threads {threads}",
        args.settle
    );
    let delta = rss1 as f64 - rss0 as f64;
    let per = if opened > 0 {
        delta / opened as f64
    } else {
        f64::NAN
    };
    println!("RESULT idle {}: {opened} connections, gateway VmRSS +{:.0} KiB => {:.2} KiB per connection; connect rate {:.0} conn/s",
        args.open.transport.name(), delta, per, opened as f64 / elapsed.as_secs_f64().max(1e-9));

    // Close everything: workers when their stdin closes, local tasks on drop.
    drop(local_holders);
    for (mut child, _) in children {
        drop(child.stdin.take());
        if tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .is_err()
        {
            let _ = child.start_kill();
        }
    }
    if failed > 0 {
        bail!("{failed} of {n} connections failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_roundtrip() {
        let mut h = util::new_hist();
        h.record(1500).unwrap();
        let line = format!("READY 10 1 2 3000 {} boom here\n", util::hist_to_hex(&h));
        let r = parse_ready(&line).unwrap();
        assert_eq!(
            (r.opened, r.failed, r.retries, r.elapsed),
            (10, 1, 2, Duration::from_micros(3000))
        );
        assert_eq!(r.hist.len(), 1);
        assert_eq!(r.first_error.as_deref(), Some("boom here"));
        assert!(parse_ready("nope").is_err());
    }

    #[test]
    fn find_works() {
        assert_eq!(find(b"abc\r\n\r\nx", b"\r\n\r\n"), Some(3));
        assert_eq!(find(b"abc", b"zz"), None);
    }
}
