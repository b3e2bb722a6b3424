//! Presence (issue 14, item 2): who is subscribed to a channel of a
//! presence-enabled namespace, on every node; a SIGKILLed node's entries
//! go within `presence_ttl_ms`.

use std::time::{Duration, Instant};

use anyhow::ensure;
use harness::cluster::{Backbone, Cluster};
use harness::{Gateway, TempDir};
use protocol::{ClientFrame, Codec, PresenceResult, PresenceStats, ServerFrame};
use serde_json::json;

use super::R;

const CONFIG: &str = "[[namespace]]\nname = \"room\"\npresence = true\n";

async fn listed(gw: &Gateway, channel: &str) -> anyhow::Result<Vec<String>> {
    let r: PresenceResult = serde_json::from_value(
        gw.post_json("/api/presence", &json!({"channel": channel}))
            .await?,
    )?;
    Ok(r.members.into_iter().map(|m| m.user).collect())
}

/// Polls until `channel`'s users are `want` (within `limit`); how long.
async fn until_listed(
    gw: &Gateway,
    channel: &str,
    want: &[&str],
    limit: Duration,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    loop {
        let got = listed(gw, channel).await?;
        if got == want {
            return Ok(t0.elapsed());
        }
        ensure!(
            t0.elapsed() < limit,
            "presence of {channel}: {got:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn presence_lists_members_on_every_node_and_forgets_a_killed_one() -> R {
    presence_lists_members_on_every_node_and_forgets_a_killed_one_on(false).await
}

#[tokio::test]
async fn redis_cluster_presence_lists_members_on_every_node_and_forgets_a_killed_one() -> R {
    presence_lists_members_on_every_node_and_forgets_a_killed_one_on(true).await
}

/// On one Redis, or on a Redis Cluster (`redis_cluster`).
async fn presence_lists_members_on_every_node_and_forgets_a_killed_one_on(
    redis_cluster: bool,
) -> R {
    let dir = TempDir::new()?;
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, CONFIG)?;
    let mut c = redis_builder(redis_cluster)
        .nodes(2)
        .env("GATEWAY_CONFIG", file.display())
        .env("presence_ttl_ms", 2000)
        .env("presence_flush_ms", 200)
        .start()
        .await?;
    let tok = |u: &str| c.node(0).token(u, &["room:*", "news"], &[], 600);
    let (mut ann, _) = c.node(0).ws_connected(Codec::Json, &tok("ann")).await?;
    ann.subscribe("room:1", None).await?;
    let (mut bob, _) = c.node(1).ws_connected(Codec::Json, &tok("bob")).await?;
    bob.subscribe("room:1", None).await?;
    bob.subscribe("news", None).await?;
    until_listed(c.node(0), "room:1", &["ann", "bob"], Duration::from_secs(5)).await?;
    let stats: PresenceStats = serde_json::from_value(
        c.node(1)
            .post_json("/api/presence_stats", &json!({"channel": "room:1"}))
            .await?,
    )?;
    ensure!(stats.clients == 2 && stats.users == 2, "{stats:?}");
    // Over the WebSocket, with the client ids of `connected`.
    ann.send(&ClientFrame::Presence(protocol::PresenceQuery {
        id: Some(4),
        channel: "room:1".into(),
    }))
    .await?;
    match ann.recv().await? {
        ServerFrame::Presence(p) => ensure!(p.id == Some(4) && p.members.len() == 2, "{p:?}"),
        other => anyhow::bail!("expected presence, got {other:?}"),
    }
    // A namespace without presence: refused, clearly.
    bob.send(&ClientFrame::PresenceStats(protocol::PresenceQuery {
        id: Some(5),
        channel: "news".into(),
    }))
    .await?;
    bob.expect_error(protocol::ErrorCode::BadRequest, Some(5))
        .await?;
    // An unsubscribe leaves at the next flush; a SIGKILLed node's members
    // go within presence_ttl_ms (2 s).
    ann.send(&ClientFrame::Unsubscribe(protocol::Unsubscribe {
        id: Some(6),
        channel: "room:1".into(),
    }))
    .await?;
    ensure!(matches!(ann.recv().await?, ServerFrame::Unsubscribed(_)));
    until_listed(c.node(1), "room:1", &["bob"], Duration::from_secs(3)).await?;
    ann.subscribe("room:1", None).await?;
    until_listed(c.node(0), "room:1", &["ann", "bob"], Duration::from_secs(3)).await?;
    c.kill_node(1);
    let gone = until_listed(c.node(0), "room:1", &["ann"], Duration::from_secs(8)).await?;
    eprintln!("a killed node's presence entries went after {gone:?}");
    Ok(())
}

#[tokio::test]
async fn embedded_presence() -> R {
    let dir = TempDir::new()?;
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, CONFIG)?;
    let gw = Gateway::builder()
        .env("GATEWAY_CONFIG", file.display())
        .start()
        .await?;
    let (mut a, _) = gw
        .ws_connected(Codec::Json, &gw.token("ann", &["room:*"], &[], 600))
        .await?;
    a.subscribe("room:2", None).await?;
    let (mut a2, _) = gw
        .ws_connected(Codec::Json, &gw.token("ann", &["room:*"], &[], 600))
        .await?;
    a2.subscribe("room:2", None).await?;
    ensure!(listed(&gw, "room:2").await? == ["ann", "ann"]);
    let stats: PresenceStats = serde_json::from_value(
        gw.post_json("/api/presence_stats", &json!({"channel": "room:2"}))
            .await?,
    )?;
    ensure!(stats.clients == 2 && stats.users == 1, "{stats:?}");
    drop(a2);
    until_listed(&gw, "room:2", &["ann"], Duration::from_secs(3)).await?;
    Ok(())
}

/// Join and leave frames (namespace `join_leave`) reach the channel's
/// subscribers on every node, once each.
#[tokio::test]
async fn join_and_leave_arrive_once_on_every_node() -> R {
    join_and_leave_arrive_once_on_every_node_on(false).await
}

#[tokio::test]
async fn redis_cluster_join_and_leave_arrive_once_on_every_node() -> R {
    join_and_leave_arrive_once_on_every_node_on(true).await
}

/// On one Redis, or on a Redis Cluster (`redis_cluster`).
async fn join_and_leave_arrive_once_on_every_node_on(redis_cluster: bool) -> R {
    let dir = TempDir::new()?;
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        "[[namespace]]\nname = \"room\"\npresence = true\njoin_leave = true\n",
    )?;
    let c = redis_builder(redis_cluster)
        .nodes(2)
        .env("GATEWAY_CONFIG", file.display())
        .env("presence_flush_ms", 100)
        .start()
        .await?;
    let tok = |u: &str| c.node(0).token(u, &["room:*"], &[], 600);
    let (mut ann, _) = c.node(0).ws_connected(Codec::Json, &tok("ann")).await?;
    ann.subscribe("room:j", None).await?;
    // Her own join first.
    match ann.recv().await? {
        ServerFrame::Join(j) => ensure!(j.user == "ann" && j.channel == "room:j", "{j:?}"),
        other => anyhow::bail!("expected join, got {other:?}"),
    }
    let (mut bob, _) = c.node(1).ws_connected(Codec::Json, &tok("bob")).await?;
    bob.subscribe("room:j", None).await?;
    match ann.recv().await? {
        ServerFrame::Join(j) => ensure!(j.user == "bob", "{j:?}"),
        other => anyhow::bail!("expected bob's join, got {other:?}"),
    }
    bob.send(&ClientFrame::Unsubscribe(protocol::Unsubscribe {
        id: Some(3),
        channel: "room:j".into(),
    }))
    .await?;
    match ann.recv().await? {
        ServerFrame::Leave(l) => ensure!(l.user == "bob", "{l:?}"),
        other => anyhow::bail!("expected bob's leave, got {other:?}"),
    }
    // Nothing twice: the next frame is the pong.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ann.roundtrip().await?;
    Ok(())
}

fn redis_builder(redis_cluster: bool) -> harness::cluster::ClusterBuilder {
    let b = Cluster::builder(Backbone::Redis);
    if redis_cluster {
        b.redis_cluster()
    } else {
        b
    }
}
