//! Exactly-once publishing (issue 14, item 4): a publish retried with the
//! same idempotency key, concurrently and to different nodes, is one
//! message at one position; subscribers get it once.

use anyhow::ensure;
use futures_util::future::join_all;
use harness::cluster::{Backbone, Cluster};
use harness::Gateway;
use protocol::Codec;
use serde_json::json;

use super::R;

async fn one_message_for_one_key(a: &Gateway, b: &Gateway) -> R {
    let token = a.token("watcher", &["orders"], &[], 600);
    let (mut ws, _) = a.ws_connected(Codec::Json, &token).await?;
    let sub = ws.subscribe("orders", None).await?;
    let attempts = (0..100).map(|i| {
        let node = if i % 2 == 0 { a } else { b };
        node.publish_once("orders", json!({"order": 17}), "order-17")
    });
    let results: Vec<_> = join_all(attempts)
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let first = &results[0];
    ensure!(
        results
            .iter()
            .all(|r| r.seq == first.seq && r.epoch == first.epoch),
        "one position for one key: {results:?}"
    );
    let fresh = results.iter().filter(|r| !r.duplicate).count();
    ensure!(fresh == 1, "{fresh} answers said the message was new");
    ensure!(
        first.seq == sub.seq + 1 && first.epoch == sub.epoch,
        "{first:?} after {sub:?}"
    );
    // Another key is another message; no key is always a new one.
    let other = b
        .publish_once("orders", json!({"order": 18}), "order-18")
        .await?;
    ensure!(other.seq == first.seq + 1 && !other.duplicate, "{other:?}");
    let end = a.publish("orders", json!("end")).await?;
    let got = ws
        .recv_messages("orders", first.seq, end.seq - first.seq + 1)
        .await?;
    ensure!(got[0].data == json!({"order": 17}), "{:?}", got[0]);
    // A key that is not printable ASCII is refused.
    let (status, _) = a
        .post_raw(
            "/api/publish",
            serde_json::to_vec(&json!({"channel": "orders", "data": 1, "idempotency_key": "a b"}))?,
            Some("application/json"),
            Some(harness::API_KEY),
        )
        .await?;
    ensure!(status.as_u16() == 400, "{status}");
    Ok(())
}

#[tokio::test]
async fn embedded_idempotent_publishes() -> R {
    let gw = Gateway::start().await?;
    one_message_for_one_key(&gw, &gw).await
}

#[tokio::test]
async fn redis_idempotent_publishes_across_nodes() -> R {
    let c = Cluster::builder(Backbone::Redis).start().await?;
    one_message_for_one_key(c.node(0), c.node(1)).await
}

#[tokio::test]
async fn redis_cluster_idempotent_publishes_across_nodes() -> R {
    let c = Cluster::builder(Backbone::Redis)
        .nodes(2)
        .redis_cluster()
        .start()
        .await?;
    one_message_for_one_key(c.node(0), c.node(1)).await
}

#[tokio::test]
async fn nats_idempotent_publishes_across_nodes() -> R {
    let c = Cluster::builder(Backbone::Nats).start().await?;
    one_message_for_one_key(c.node(0), c.node(1)).await
}

/// NATS backbone: storing and announcing are two steps, so a node can die
/// between them with the message stored and announced to nobody; its
/// publisher retries with the same key elsewhere. The retry must announce
/// the stored original. Here the dead node's half-done publish is made by a
/// node on the same Redis with the Redis backbone (it stores, then
/// PUBLISHes on Redis, which no NATS node hears).
#[tokio::test]
async fn nats_a_retry_announces_a_message_its_first_node_stored_but_never_announced() -> R {
    let c = Cluster::builder(Backbone::Nats).nodes(2).start().await?;
    let (a, b) = (c.node(0), c.node(1));
    let chan = harness::unique("orders");
    let (mut ws, _) = b
        .ws_connected(Codec::Json, &b.token("watcher", &["*"], &[], 600))
        .await?;
    let sub = ws.subscribe(&chan, None).await?;

    let half = Gateway::builder()
        .env("GATEWAY_REDIS_URL", c.redis.url())
        .env("GATEWAY_NODE_ID", "half")
        .start()
        .await?;
    let stored = half
        .publish_once(&chan, json!({"order": 1}), "order-1")
        .await?;
    ensure!(!stored.duplicate && stored.seq == sub.seq + 1, "{stored:?}");
    // Nothing announced it on NATS.
    if let Ok(f) = tokio::time::timeout(std::time::Duration::from_millis(500), ws.recv()).await {
        anyhow::bail!("nothing should have announced it on NATS yet: {f:?}");
    }

    let retry = a
        .publish_once(&chan, json!({"order": 1}), "order-1")
        .await?;
    ensure!(
        retry.duplicate && retry.seq == stored.seq && retry.epoch == stored.epoch,
        "{retry:?}"
    );
    let got = ws.recv_message().await?;
    ensure!(
        got.seq == stored.seq && got.data == json!({"order": 1}),
        "the retry announced the original: {got:?}"
    );
    ensure!(
        a.metric("gateway_publishes_reannounced_total").await? == 1.0,
        "counted"
    );
    Ok(())
}
