//! What subscribing to made-up channel names can hold (issue 12, finding 2):
//! subscribes are rate-limited per connection and per user; a stream nobody
//! published to lives `stream_empty_ttl_ms` once nobody subscribes to it,
//! while a quiet channel's subscribers keep theirs (no spurious
//! `unrecoverable`), on the embedded node and on a Redis cluster.

use std::time::Duration;

use anyhow::ensure;
use harness::cluster::{Backbone, Cluster};
use harness::{Gateway, WsClient};
use protocol::{ClientFrame, Codec, ErrorCode, ServerFrame, Subscribe};
use serde_json::json;

use super::R;

/// Sends `n` subscribes to distinct names without waiting; counts the
/// `subscribed` and `rate_limited` answers.
async fn flood(ws: &mut WsClient, prefix: &str, n: u64) -> anyhow::Result<(u64, u64)> {
    for i in 0..n {
        let id = ws.id();
        ws.send(&ClientFrame::Subscribe(Subscribe {
            id: Some(id),
            channel: format!("{prefix}{i}"),
            since: None,
        }))
        .await?;
    }
    let (mut ok, mut limited) = (0, 0);
    while ok + limited < n {
        match ws.recv().await? {
            ServerFrame::Subscribed(_) => ok += 1,
            ServerFrame::Error(e) if e.code == ErrorCode::RateLimited => limited += 1,
            ServerFrame::Error(e) if e.code == ErrorCode::TooManySubscriptions => limited += 1,
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    Ok((ok, limited))
}

#[tokio::test]
async fn subscribes_are_rate_limited_per_connection_and_per_user() -> R {
    let gw = Gateway::builder()
        .env("subscribe_rate", 1)
        .env("subscribe_burst", 30)
        .env("user_subscribe_rate", 1)
        .env("user_subscribe_burst", 50)
        .env("max_subscriptions", 1000)
        .env("command_burst", 1000)
        .start()
        .await?;
    let token = gw.token("mallory", &["room:*"], &[], 600);
    let (mut a, _) = gw.ws_connected(Codec::Json, &token).await?;
    let (ok, limited) = flood(&mut a, "room:a", 100).await?;
    ensure!(
        (30..=31).contains(&ok) && ok + limited == 100,
        "one connection: {ok} subscribed, {limited} refused"
    );
    // A second connection of the same user has its own burst, but the
    // user's bucket (50) is shared: about 20 are left.
    let (mut b, _) = gw.ws_connected(Codec::Json, &token).await?;
    let (ok, _) = flood(&mut b, "room:b", 100).await?;
    ensure!(
        (19..=22).contains(&ok),
        "second connection: {ok} subscribed"
    );
    // SSE counts against the same user: refused with a readable 429.
    let (status, body) = gw
        .sse_error(
            &format!("?channel=room:s1&channel=room:s2&token={token}"),
            &[],
        )
        .await?;
    ensure!(status.as_u16() == 429, "SSE: {status} {body}");
    harness::assert_error_body(&body, ErrorCode::RateLimited);
    // Another user is not affected.
    let other = gw.token("alice", &["room:*"], &[], 600);
    let (mut c, _) = gw.ws_connected(Codec::Json, &other).await?;
    c.subscribe("room:fine", None).await?;
    Ok(())
}

/// A quiet channel's subscriber keeps its epoch past `stream_empty_ttl_ms`
/// (the node keeps the stream alive); a made-up name nobody subscribes to
/// any more is forgotten: a resume from it is told `epoch_changed`.
async fn empty_streams_expire_unless_subscribed(quiet_node: &Gateway, other_node: &Gateway) -> R {
    let token = quiet_node.token("u", &["*"], &[], 600);
    let (mut sub, _) = quiet_node.ws_connected(Codec::Json, &token).await?;
    let quiet = sub.subscribe("quiet", None).await?;
    let (mut gone, _) = other_node.ws_connected(Codec::Json, &token).await?;
    let forgotten = gone.subscribe("made-up", None).await?;
    gone.close().await;
    // Several TTLs of 600 ms.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = other_node.publish("quiet", json!("first")).await?;
    ensure!(
        r.epoch == quiet.epoch && r.seq == 1,
        "the subscribed stream kept its epoch: {r:?} vs {quiet:?}"
    );
    let m = sub.recv_message().await?;
    ensure!(m.seq == 1 && m.epoch == quiet.epoch, "{m:?}");
    let (mut back, _) = other_node.ws_connected(Codec::Json, &token).await?;
    let id = back.id();
    back.send(&ClientFrame::Subscribe(Subscribe {
        id: Some(id),
        channel: "made-up".into(),
        since: Some(protocol::Position::new(0, forgotten.epoch.as_str())),
    }))
    .await?;
    let mut told = false;
    for _ in 0..3 {
        if let ServerFrame::Unrecoverable(u) = back.recv().await? {
            ensure!(
                u.reason == protocol::UnrecoverableReason::EpochChanged,
                "{u:?}"
            );
            told = true;
            break;
        }
    }
    ensure!(told, "a resume from the forgotten stream was not told");
    Ok(())
}

#[tokio::test]
async fn embedded_empty_streams_expire_unless_subscribed() -> R {
    let gw = Gateway::builder()
        .env("stream_empty_ttl_ms", 600)
        .start()
        .await?;
    empty_streams_expire_unless_subscribed(&gw, &gw).await
}

/// On a Redis Cluster the keeper's batch spans several slots (the channel
/// and the user's stream): split per slot, it keeps them all.
#[tokio::test]
async fn redis_cluster_empty_streams_expire_unless_subscribed() -> R {
    let c = Cluster::builder(Backbone::Redis)
        .nodes(2)
        .redis_cluster()
        .env("stream_empty_ttl_ms", 600)
        .start()
        .await?;
    empty_streams_expire_unless_subscribed(c.node(0), c.node(1)).await
}

#[tokio::test]
async fn redis_empty_streams_expire_unless_subscribed() -> R {
    let c = Cluster::builder(Backbone::Redis)
        .env("stream_empty_ttl_ms", 600)
        .start()
        .await?;
    // The meta key of a never-published stream has the short TTL, in
    // Redis too.
    empty_streams_expire_unless_subscribed(c.node(0), c.node(1)).await?;
    let token = c.node(1).token("v", &["*"], &[], 600);
    let (mut ws, _) = c.node(1).ws_connected(Codec::Json, &token).await?;
    ws.subscribe("brief", None).await?;
    let mut conn = c.redis_conn().await?;
    let ttl: i64 = redis::cmd("PTTL")
        .arg("gw:{ch:brief}:m")
        .query_async(&mut conn)
        .await?;
    ensure!((1..=600).contains(&ttl), "PTTL of an empty stream: {ttl}");
    let ttl: i64 = redis::cmd("PTTL")
        .arg("gw:{ch:quiet}:m")
        .query_async(&mut conn)
        .await?;
    ensure!(ttl > 600, "a published stream keeps the long TTL: {ttl}");
    Ok(())
}
