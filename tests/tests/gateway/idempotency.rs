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
