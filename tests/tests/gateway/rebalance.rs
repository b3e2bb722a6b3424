//! Rebalancing after a rollout (issue 13, item 7).
//!
//! A Redis cluster behind HAProxy (TCP mode, `leastconn`, `/readyz` health
//! checks) starts with one node, and the 2,000 clients of the rolling test
//! (Rust SDK over WebSocket, JSON and MessagePack, and plain EventSources)
//! all connect through the balancer, so node0 holds every one: what a
//! rollout leaves on its oldest node. Three more nodes join, and the fourth
//! is drained at once. The rebalancer is on everywhere (margin 20 %, 150
//! moves per second per node at most, a check every 0.5 s, 2 s of steady
//! fleet first). Then:
//!
//! 1. while node3 drains (6 s of prestop), nothing moves: no node sends a
//!    rebalancing `reconnect`, no client reconnects;
//! 2. once it has gone, node0 moves its excess to node1 and node2, at most
//!    at its rate, until every node is within the margin of the average;
//! 3. every client has every message of every stream once, in order, with
//!    no `unrecoverable` (publishing ran throughout), and clients moved about
//!    once each.
//!
//! The figures (the distribution before and after, moves, their rate,
//! reconnects per client): `cargo test -p harness --test gateway rebalance
//! -- --nocapture`.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use harness::cluster::{Backbone, Cluster};
use harness::unique;

use super::rolling::{header, Fleet, Publisher, HEAVY, LOAD};
use super::R;

const MARGIN: f64 = 0.2;
const RATE: f64 = 150.0;

/// Each live node's open sessions (`gateway_connections`, WebSocket + SSE).
async fn distribution(c: &Cluster) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for i in c.live() {
        let n = c.node(i).metric("gateway_connections").await?;
        out.push((c.node_id(i).to_owned(), n as u64));
    }
    Ok(out)
}

/// Reconnects the rebalancer sent, over node0-2 (node3 only drains).
async fn moves(c: &Cluster) -> Result<u64> {
    let mut sum = 0.0;
    for i in 0..3 {
        sum += c
            .node(i)
            .metric("gateway_rebalance_reconnects_sent_total")
            .await?;
    }
    Ok(sum as u64)
}

/// Every node within the margin of the average.
fn balanced(d: &[(String, u64)]) -> bool {
    let total: u64 = d.iter().map(|(_, n)| n).sum();
    let average = total as f64 / d.len().max(1) as f64;
    d.iter()
        .all(|(_, n)| (*n as f64) <= average * (1.0 + MARGIN))
}

async fn rebalance_after_rollout(c: &mut Cluster, what: &str) -> R {
    let load = LOAD;
    header(what, &load);
    let lb = c.lb()?.addr;
    let t0 = Instant::now();
    let fleet = Fleet::connect(&unique("rebal"), &load, |_| lb).await?;
    let publisher = Publisher::start(lb, &fleet.channels, fleet.users(), &load);
    println!(
        "{what}: {} clients connected through the balancer in {:.1} s, all on the only node: {:?}",
        fleet.recs.len(),
        t0.elapsed().as_secs_f64(),
        distribution(c).await?
    );

    // Three nodes join (a rollout's newest); the last one drains at once.
    for _ in 0..3 {
        let i = c.add_node().await?;
        c.wait_lb(i, true, Duration::from_secs(10)).await?;
    }
    c.drain_node(3).await?;
    let drain_started = Instant::now();
    let before = distribution(c).await?;
    println!("{what}: node1-3 joined, node3 draining; sessions per node {before:?}");

    // 1. While node3 drains, nothing moves (node0 holds ~2,000 against an
    //    average of ~670: far over the margin).
    let mut polled = 0;
    loop {
        ensure!(
            moves(c).await? == 0,
            "{what}: the rebalancer moved connections while node3 drained ({:.1} s into its drain)",
            drain_started.elapsed().as_secs_f64()
        );
        polled += 1;
        if let Ok(status) = c.wait_node_exit(3, Duration::from_millis(200)).await {
            ensure!(status.success(), "{what}: node3 exited with {status}");
            break;
        }
        ensure!(
            drain_started.elapsed() < Duration::from_secs(30),
            "{what}: node3's drain did not end"
        );
    }
    let drained = drain_started.elapsed();
    let reconnected: u64 = (0..fleet.recs.len()).map(|i| fleet.reconnects(i)).sum();
    ensure!(
        reconnected == 0,
        "{what}: {reconnected} client reconnects while node3 drained (it held no client)"
    );
    let held = c.node(0).logs();
    ensure!(
        held.contains("rebalance: holding while a node drains"),
        "{what}: node0 never said it held back for the drain"
    );
    println!(
        "{what}: node3 drained and exited after {:.1} s; no move in {polled} polls of every node, no client reconnect",
        drained.as_secs_f64()
    );

    // 2. node3 gone: node0 moves its excess, at most at its rate. (A scrape
    //    that times out on a starved machine is tried again next time.)
    let gone = Instant::now();
    let mut first_move: Option<Instant> = None;
    let mut seen = None;
    let converged = loop {
        ensure!(
            gone.elapsed() < Duration::from_secs(90),
            "{what}: not within {MARGIN} of the average after 90 s: {seen:?} (sessions per node, moved)"
        );
        let (Ok(d), Ok(m)) = (distribution(c).await, moves(c).await) else {
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        };
        if m > 0 && first_move.is_none() {
            first_move = Some(Instant::now());
        }
        if m > 0 && balanced(&d) {
            break gone.elapsed();
        }
        seen = Some((d, m));
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // Let the last moves land and the rebalancers see the balance: quiet
    // for 3 s.
    let mut last = moves(c).await?;
    let mut last_change = Instant::now();
    let quiet = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Ok(now) = moves(c).await else { continue };
        if now != last {
            (last, last_change) = (now, Instant::now());
        } else if last_change.elapsed() >= Duration::from_secs(3) {
            break now;
        }
        ensure!(
            gone.elapsed() < Duration::from_secs(120),
            "{what}: still moving connections 120 s after the drain ({now} moved)"
        );
    };
    fleet.wait_connected(Duration::from_secs(30)).await?;
    let after = distribution(c).await?;
    let first = first_move.context("a first move")?;
    // From the first move seen to the last change seen (both polled).
    let moving_for = last_change.duration_since(first).as_secs_f64();
    let per_node: Vec<u64> = {
        let mut v = Vec::new();
        for i in 0..3 {
            v.push(
                c.node(i)
                    .metric("gateway_rebalance_reconnects_sent_total")
                    .await? as u64,
            );
        }
        v
    };
    println!(
        "{what}: within {:.0} % of the average {:.1} s after node3 left (first move after {:.1} s); sessions per node before {before:?}, after {after:?}; {quiet} moved (per node {per_node:?}), {:.0} per second over {:.1} s",
        MARGIN * 100.0,
        converged.as_secs_f64(),
        first.duration_since(gone).as_secs_f64(),
        quiet as f64 / moving_for.max(0.1),
        moving_for
    );
    ensure!(
        balanced(&after),
        "{what}: out of balance again once quiet: {after:?}"
    );
    ensure!(
        quiet as f64 <= load.clients() as f64,
        "{what}: {quiet} moves for {} clients: clients moved more than once",
        load.clients()
    );
    // One node moved them (node0), at most at its rate (and a round's
    // rounding) on average.
    ensure!(
        quiet as f64 <= RATE * (moving_for + 1.0) + 1.0,
        "{what}: {quiet} moves in {moving_for:.1} s is over {RATE}/s"
    );

    // 3. Nothing lost, nothing twice.
    let acked = publisher.stop(what).await?;
    let waited = fleet.wait_caught_up(&acked, Duration::from_secs(20)).await;
    println!(
        "{what}: caught up {} ms after the last publish",
        waited.as_millis()
    );
    fleet.check(what, &acked)?;
    let mean = fleet.mean_reconnects();
    ensure!(
        mean <= 1.0,
        "{what}: {mean:.2} reconnects per client on average (a move is one reconnect, and 2/3 of the clients at most move)"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_after_rollout_converges_within_the_margin_loses_nothing_and_waits_for_drains(
) -> R {
    let _turn = HEAVY.lock().await;
    let mut c = Cluster::builder(Backbone::Redis)
        .nodes(1)
        .slots(4)
        .env("GATEWAY_REBALANCE", true)
        .env("GATEWAY_REBALANCE_MARGIN", MARGIN)
        .env("GATEWAY_REBALANCE_RATE", RATE)
        .env("GATEWAY_REBALANCE_INTERVAL_MS", 500)
        .env("GATEWAY_REBALANCE_SETTLE_MS", 2_000)
        // node3's drain: 6 s of readiness 503 before anything else.
        .env("GATEWAY_DRAIN_PRESTOP_DELAY_MS", 6_000)
        .env("GATEWAY_DRAIN_BATCH_INTERVAL_MS", 200)
        .env("GATEWAY_DRAIN_BATCH_FRACTION", 0.2)
        .env("GATEWAY_RECONNECT_MIN_DELAY_MS", 100)
        .env("GATEWAY_RECONNECT_MAX_DELAY_MS", 1500)
        .env("GATEWAY_SSE_RETRY_MS", 1000)
        .env(
            "GATEWAY_LOG",
            "warn,gateway::drain=info,gateway::rebalance=info",
        )
        .start()
        .await?;
    let r = rebalance_after_rollout(&mut c, "rebalance").await;
    c.check(r)
}
