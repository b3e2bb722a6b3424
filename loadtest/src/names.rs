//! `loadtest names`: the distinct-name attack (issue 12, finding 2). Clients
//! with a token for `room:*` subscribe to (and unsubscribe from) a new made-up
//! name as fast as the node lets them, and optionally an API client publishes
//! to a new name each time; the gateway's RSS is sampled throughout. With
//! the stream bounds (`stream_empty_ttl_ms`, `replay_max_streams`,
//! `replay_max_bytes`) and the subscribe quotas, RSS levels off instead of
//! growing with the attack's length.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::scenario::worker::mint_token;
use crate::util::{self, Target};

#[derive(Debug, Args)]
pub struct NamesArgs {
    /// Gateway base URL (loopback), e.g. http://127.0.0.1:8080.
    #[arg(long)]
    pub url: String,
    /// The gateway's process id (its VmRSS is sampled).
    #[arg(long)]
    pub gateway_pid: u32,
    /// The gateway's JWT secret (tokens are minted for `room:*`).
    #[arg(long)]
    pub jwt_secret: String,
    /// Attacking WebSocket connections.
    #[arg(long, default_value_t = 20)]
    pub connections: u64,
    /// Distinct users among them (connections are spread over them).
    #[arg(long, default_value_t = 10)]
    pub users: u64,
    /// API publishes per second, each to a new name (0: none).
    #[arg(long, default_value_t = 0)]
    pub publish_rate: u64,
    /// API key for the publishes.
    #[arg(long, default_value = "")]
    pub api_key: String,
    /// Length of the attack, seconds.
    #[arg(long, default_value_t = 120)]
    pub duration: u64,
    /// Seconds between RSS samples.
    #[arg(long, default_value_t = 10)]
    pub sample: u64,
    /// Instead of new names: every connection subscribes to and leaves
    /// this one channel, `churn_rate` times a second each (presence
    /// churn: a join and a leave per cycle).
    #[arg(long)]
    pub churn_channel: Option<String>,
    /// Subscribe/unsubscribe cycles per second per connection, with
    /// `churn_channel`.
    #[arg(long, default_value_t = 10.0)]
    pub churn_rate: f64,
}

#[derive(Default)]
struct Counts {
    subscribed: AtomicU64,
    refused: AtomicU64,
    published: AtomicU64,
    publish_failed: AtomicU64,
}

pub async fn names(args: NamesArgs) -> anyhow::Result<()> {
    let target = Target::parse(&args.url)?;
    let counts = Arc::new(Counts::default());
    let end = Instant::now() + Duration::from_secs(args.duration);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.connections {
        let token = mint_token(&args.jwt_secret, &format!("attacker-{}", i % args.users))?;
        let (url, counts) = (format!("ws://{}/ws", target.host), counts.clone());
        let churn = args.churn_channel.clone().map(|c| (c, args.churn_rate));
        tasks.spawn(async move {
            let r = match churn {
                Some((channel, rate)) => churner(&url, &token, &channel, rate, end, &counts).await,
                None => subscriber(&url, &token, i, end, &counts).await,
            };
            if let Err(e) = r {
                eprintln!("attacker {i}: {e:#}");
            }
        });
    }
    if args.publish_rate > 0 {
        let (url, key, counts, rate) = (
            target.http_url("/api/publish"),
            args.api_key.clone(),
            counts.clone(),
            args.publish_rate,
        );
        tasks.spawn(async move { publisher(&url, &key, rate, end, &counts).await });
    }
    println!(
        "names: {} connections over {} users subscribing to new names, {} publishes/s to new names, {} s",
        args.connections, args.users, args.publish_rate, args.duration
    );
    println!(
        "{:>6} {:>10} {:>12} {:>10} {:>12}",
        "t_s", "rss_MiB", "subscribed", "refused", "published"
    );
    let t0 = Instant::now();
    let mut rss = Vec::new();
    loop {
        let kib = util::vm_rss_kib(args.gateway_pid).context("gateway gone")?;
        rss.push(kib);
        println!(
            "{:>6} {:>10.1} {:>12} {:>10} {:>12}",
            t0.elapsed().as_secs(),
            kib as f64 / 1024.0,
            counts.subscribed.load(Ordering::Relaxed),
            counts.refused.load(Ordering::Relaxed),
            counts.published.load(Ordering::Relaxed),
        );
        if Instant::now() >= end {
            break;
        }
        tokio::time::sleep(Duration::from_secs(args.sample).min(end - Instant::now())).await;
    }
    tasks.abort_all();
    let half = rss.len() / 2;
    let second_half_max = rss[half..].iter().max().copied().unwrap_or(0);
    let first_half_max = rss[..half.max(1)].iter().max().copied().unwrap_or(0);
    println!(
        "result: rss max first half {:.1} MiB, second half {:.1} MiB; {} subscribes accepted, {} refused, {} publishes ({} failed)",
        first_half_max as f64 / 1024.0,
        second_half_max as f64 / 1024.0,
        counts.subscribed.load(Ordering::Relaxed),
        counts.refused.load(Ordering::Relaxed),
        counts.published.load(Ordering::Relaxed),
        counts.publish_failed.load(Ordering::Relaxed),
    );
    Ok(())
}

/// One attacking connection: subscribes to new names `room:<conn>-<n>`,
/// 8 in flight, and after 100 accepted reconnects (which drops them all,
/// staying under `max_subscriptions`). Refusals (`rate_limited`) are
/// counted and the next name tried soon after, as a persistent attacker
/// would.
async fn subscriber(
    url: &str,
    token: &str,
    conn: u64,
    end: Instant,
    counts: &Counts,
) -> anyhow::Result<()> {
    let mut n = 0u64;
    while Instant::now() < end {
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
        ws.send(Message::text(format!(
            r#"{{"type":"connect","token":"{token}"}}"#
        )))
        .await?;
        let (mut in_flight, mut accepted) = (0u32, 0u32);
        while Instant::now() < end && accepted < 100 {
            while in_flight < 8 {
                n += 1;
                ws.send(Message::text(format!(
                    r#"{{"type":"subscribe","id":{n},"channel":"room:{conn}-{n}"}}"#
                )))
                .await?;
                in_flight += 1;
            }
            let next = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
            let Ok(Some(msg)) = next else { break };
            let Message::Text(text) = msg? else { continue };
            if text.contains(r#""type":"subscribed""#) {
                counts.subscribed.fetch_add(1, Ordering::Relaxed);
                in_flight -= 1;
                accepted += 1;
            } else if text.contains(r#""type":"error""#) && text.contains(r#""id":"#) {
                counts.refused.fetch_add(1, Ordering::Relaxed);
                in_flight -= 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let _ = ws.close(None).await;
    }
    Ok(())
}

/// Subscribes to and leaves `channel` `rate` times a second until `end`
/// (counted as subscribed per cycle).
async fn churner(
    url: &str,
    token: &str,
    channel: &str,
    rate: f64,
    end: Instant,
    counts: &Counts,
) -> anyhow::Result<()> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    ws.send(Message::text(format!(
        r#"{{"type":"connect","token":"{token}"}}"#
    )))
    .await?;
    let start = tokio::time::Instant::now();
    let mut i = 0u64;
    while Instant::now() < end {
        util::pace(start, i, rate).await;
        i += 1;
        ws.send(Message::text(format!(
            r#"{{"type":"subscribe","id":{i},"channel":"{channel}"}}"#
        )))
        .await?;
        ws.send(Message::text(format!(
            r#"{{"type":"unsubscribe","channel":"{channel}"}}"#
        )))
        .await?;
        // Read what came back so far (answers, joins and leaves).
        while let Ok(Some(msg)) =
            tokio::time::timeout(std::time::Duration::from_millis(1), ws.next()).await
        {
            if let Message::Text(t) = msg? {
                if t.contains(r#""type":"subscribed""#) {
                    counts.subscribed.fetch_add(1, Ordering::Relaxed);
                } else if t.contains(r#""type":"error""#) {
                    counts.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    Ok(())
}

/// Publishes to a new name `rate` times per second until `end`.
async fn publisher(url: &str, key: &str, rate: u64, end: Instant, counts: &Counts) {
    let http = reqwest::Client::new();
    let start = tokio::time::Instant::now();
    let mut i = 0u64;
    while Instant::now() < end {
        util::pace(start, i, rate as f64).await;
        let body = format!(r#"{{"channel":"pub:{i}","data":{{"n":{i}}}}}"#);
        let ok = http
            .post(url)
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        let c = if ok {
            &counts.published
        } else {
            &counts.publish_failed
        };
        c.fetch_add(1, Ordering::Relaxed);
        i += 1;
    }
}
