//! The server's read and control API (issue 14): history over HTTP and the
//! WebSocket, node info and active channels, on the embedded node and on a
//! cluster.

use anyhow::ensure;
use harness::cluster::{Backbone, Cluster};
use harness::Gateway;
use protocol::{ClientFrame, Codec, HistoryResult, Position, ServerFrame, UnrecoverableReason};
use serde_json::{json, Value};

use super::R;

async fn history(gw: &Gateway, body: Value) -> anyhow::Result<HistoryResult> {
    Ok(serde_json::from_value(
        gw.post_json("/api/history", &body).await?,
    )?)
}

fn seqs(h: &HistoryResult) -> Vec<u64> {
    h.messages.iter().map(|m| m.seq).collect()
}

/// History returns exactly what the replay store holds, and its top; a
/// client loads the last N, then subscribes `since` the last one and gets
/// every later message once.
async fn history_then_follow(publisher: &Gateway, reader: &Gateway) -> R {
    let chan = harness::unique("hist");
    let mut sent = Vec::new();
    for i in 1..=5 {
        sent.push(publisher.publish(&chan, json!({"n": i})).await?);
    }
    let epoch = sent[0].epoch.clone();
    let all = history(reader, json!({"channel": chan})).await?;
    ensure!(
        seqs(&all) == [1, 2, 3, 4, 5] && all.seq == 5 && all.epoch == epoch,
        "{all:?}"
    );
    ensure!(all.messages[2].data == json!({"n": 3}), "{all:?}");
    let first2 = history(reader, json!({"channel": chan, "limit": 2})).await?;
    ensure!(seqs(&first2) == [1, 2], "{first2:?}");
    let last2 = history(
        reader,
        json!({"channel": chan, "limit": 2, "reverse": true}),
    )
    .await?;
    ensure!(seqs(&last2) == [5, 4], "{last2:?}");
    let after3 = history(
        reader,
        json!({"channel": chan, "since": {"seq": 3, "epoch": epoch}}),
    )
    .await?;
    ensure!(
        seqs(&after3) == [4, 5] && after3.unrecoverable.is_none(),
        "{after3:?}"
    );
    let other = history(
        reader,
        json!({"channel": chan, "since": {"seq": 3, "epoch": "nope"}}),
    )
    .await?;
    ensure!(
        other.messages.is_empty() && other.unrecoverable == Some(UnrecoverableReason::EpochChanged),
        "{other:?}"
    );

    // Over the WebSocket: the same answer, with the request's id; a channel
    // the token does not allow is refused.
    let token = reader.token("reader", &[&chan], &[], 600);
    let (mut ws, _) = reader.ws_connected(Codec::Json, &token).await?;
    ws.send(&ClientFrame::History(protocol::History {
        id: Some(9),
        channel: chan.clone(),
        limit: Some(3),
        reverse: Some(true),
        ..Default::default()
    }))
    .await?;
    let last3 = match ws.recv().await? {
        ServerFrame::History(h) => h,
        other => anyhow::bail!("expected history, got {other:?}"),
    };
    ensure!(
        last3.id == Some(9) && seqs(&last3) == [5, 4, 3],
        "{last3:?}"
    );
    ws.send(&ClientFrame::History(protocol::History {
        id: Some(10),
        channel: "not-mine".into(),
        ..Default::default()
    }))
    .await?;
    ws.expect_error(protocol::ErrorCode::PermissionDenied, Some(10))
        .await?;

    // Load, then follow: subscribe since the newest loaded message.
    let newest = &last3.messages[0];
    let sub = ws
        .subscribe(&chan, Some(Position::new(newest.seq, newest.epoch.clone())))
        .await?;
    ensure!(sub.recovered == Some(true), "{sub:?}");
    let six = publisher.publish(&chan, json!({"n": 6})).await?;
    let got = ws.recv_messages(&chan, 6, 1).await?;
    ensure!(got[0].seq == six.seq, "{got:?}");
    Ok(())
}

#[tokio::test]
async fn embedded_history() -> R {
    let gw = Gateway::start().await?;
    history_then_follow(&gw, &gw).await
}

#[tokio::test]
async fn redis_history_across_nodes() -> R {
    let c = Cluster::builder(Backbone::Redis).start().await?;
    history_then_follow(c.node(0), c.node(1)).await
}

#[tokio::test]
async fn redis_cluster_history_across_nodes() -> R {
    let c = Cluster::builder(Backbone::Redis)
        .nodes(2)
        .redis_cluster()
        .start()
        .await?;
    history_then_follow(c.node(0), c.node(1)).await
}

#[tokio::test]
async fn nats_history_across_nodes() -> R {
    let c = Cluster::builder(Backbone::Nats).start().await?;
    history_then_follow(c.node(0), c.node(1)).await
}

/// `/api/info` and `/api/channels` count what was opened: WebSocket `w0`
/// on `nodes[0]` subscribes `a`, `w1` on `nodes[1]` subscribes `a` and
/// `b`, an SSE stream on `nodes[1]` reads `a`.
async fn info_and_channels(nodes: &[&Gateway]) -> R {
    let (a, b) = (harness::unique("cha"), harness::unique("chb"));
    let tok = nodes[0].token("counted", &["*"], &[], 600);
    let (mut w0, _) = nodes[0].ws_connected(Codec::Json, &tok).await?;
    w0.subscribe(&a, None).await?;
    let last = nodes[nodes.len() - 1];
    let (mut w1, _) = last.ws_connected(Codec::Json, &tok).await?;
    w1.subscribe(&a, None).await?;
    w1.subscribe(&b, None).await?;
    let _sse = last.sse(&[&a], Some(&tok), None).await?;
    // Cluster nodes report with their heartbeat: wait for it.
    let want = vec![(a.clone(), 3), (b.clone(), 1)];
    let mut got = Vec::new();
    for _ in 0..50 {
        let r: protocol::api::ChannelsResult =
            serde_json::from_value(nodes[0].post_json("/api/channels", &json!({})).await?)?;
        got = r
            .channels
            .into_iter()
            .filter(|c| c.channel == a || c.channel == b)
            .map(|c| (c.channel, c.subscribers))
            .collect();
        if got == want {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    ensure!(got == want, "channels: {got:?}, expected {want:?}");
    let only_b: protocol::api::ChannelsResult = serde_json::from_value(
        nodes[0]
            .post_json("/api/channels", &json!({"pattern": format!("{b}*")}))
            .await?,
    )?;
    ensure!(
        only_b.channels.len() == 1 && only_b.channels[0].channel == b,
        "{only_b:?}"
    );
    let info: protocol::api::InfoResult =
        serde_json::from_value(nodes[0].post_json("/api/info", &json!({})).await?)?;
    ensure!(info.nodes.len() == nodes.len(), "{info:?}");
    let ws: u64 = info.nodes.iter().map(|n| n.ws).sum();
    let sse: u64 = info.nodes.iter().map(|n| n.sse).sum();
    ensure!(ws == 2 && sse == 1, "ws {ws}, sse {sse}: {info:?}");
    ensure!(
        info.nodes
            .iter()
            .all(|n| !n.draining && n.version == env!("CARGO_PKG_VERSION")),
        "{info:?}"
    );
    Ok(())
}

#[tokio::test]
async fn embedded_info_and_channels() -> R {
    let gw = Gateway::start().await?;
    info_and_channels(&[&gw]).await
}

#[tokio::test]
async fn redis_info_and_channels_over_the_cluster() -> R {
    let c = Cluster::builder(Backbone::Redis).start().await?;
    let all: Vec<&Gateway> = (0..c.len()).map(|i| c.node(i)).collect();
    info_and_channels(&all).await
}

#[tokio::test]
async fn redis_cluster_info_and_channels_over_the_cluster() -> R {
    let c = Cluster::builder(Backbone::Redis)
        .redis_cluster()
        .start()
        .await?;
    let all: Vec<&Gateway> = (0..c.len()).map(|i| c.node(i)).collect();
    info_and_channels(&all).await
}

/// A WebSocket client of `user` on `gw`, connected (its own stream
/// subscribed), with a token issued at `iat`.
async fn client_of(
    gw: &Gateway,
    user: &str,
    iat: u64,
) -> anyhow::Result<(harness::WsClient, String)> {
    let claims = harness::Claims {
        iat: Some(iat),
        ..harness::Claims::new(user, &[], &[], 600)
    };
    let token = harness::hs256_token(harness::JWT_SECRET, &claims);
    let (ws, _) = gw.ws_connected(Codec::Json, &token).await?;
    Ok((ws, token))
}

/// Server-side subscribe and unsubscribe, then disconnect (4006, then 4503
/// without reconnect) and revoke (4500, and refused afterwards, also on a
/// node that starts later) reach the user's connections on every node, and
/// only theirs.
async fn control_reaches_every_node(nodes: &[&Gateway]) -> R {
    let now = harness::now_secs();
    let user = harness::unique("ctl");
    let mut clients = Vec::new();
    for gw in nodes {
        clients.push(client_of(gw, &user, now).await?.0);
    }
    let (mut bystander, _) = client_of(nodes[0], &harness::unique("other"), now).await?;
    let admin = nodes[0];
    let chan = harness::unique("srv");

    // Subscribe from the server: each connection gets `subscribed` with
    // `server: true`, then the channel's messages.
    admin
        .post_json("/api/subscribe", &json!({"user": user, "channel": chan}))
        .await?;
    for ws in &mut clients {
        match ws.recv().await? {
            ServerFrame::Subscribed(s) => {
                ensure!(
                    s.channel == chan && s.server == Some(true) && s.id.is_none(),
                    "{s:?}"
                )
            }
            other => anyhow::bail!("expected subscribed, got {other:?}"),
        }
    }
    let m = nodes[nodes.len() - 1]
        .publish(&chan, json!("hello"))
        .await?;
    for ws in &mut clients {
        ensure!(ws.recv_message().await?.seq == m.seq);
    }
    admin
        .post_json("/api/unsubscribe", &json!({"user": user, "channel": chan}))
        .await?;
    for ws in &mut clients {
        match ws.recv().await? {
            ServerFrame::Unsubscribed(u) => {
                ensure!(u.channel == chan && u.server == Some(true), "{u:?}")
            }
            other => anyhow::bail!("expected unsubscribed, got {other:?}"),
        }
    }
    admin.publish(&chan, json!("after")).await?;
    for ws in &mut clients {
        ws.roundtrip().await?; // nothing of `chan` arrived before the pong
    }

    // Disconnect: 4006 (reconnect), then 4503 (do not).
    admin
        .post_json("/api/disconnect", &json!({"user": user, "reason": "test"}))
        .await?;
    for ws in &mut clients {
        ensure!(ws.expect_close().await? == 4006);
    }
    let mut clients = Vec::new();
    for gw in nodes {
        clients.push(client_of(gw, &user, now).await?.0);
    }
    admin
        .post_json(
            "/api/disconnect",
            &json!({"user": user, "reconnect": false}),
        )
        .await?;
    for ws in &mut clients {
        ensure!(ws.expect_close().await? == 4503);
    }

    // Revoke: open connections close with 4500; the old token is refused
    // on every node; a token issued after the revocation is accepted.
    let mut clients = Vec::new();
    let mut token = String::new();
    for gw in nodes {
        let (ws, t) = client_of(gw, &user, now).await?;
        clients.push(ws);
        token = t;
    }
    admin
        .post_json("/api/revoke", &json!({"user": user}))
        .await?;
    for ws in &mut clients {
        ensure!(ws.expect_close().await? == 4500);
    }
    for gw in nodes {
        let mut ws = gw.ws(Codec::Json).await?;
        ws.send(&ClientFrame::Connect(protocol::Connect {
            id: Some(1),
            token: Some(token.clone()),
            ..Default::default()
        }))
        .await?;
        let e = ws
            .expect_error(protocol::ErrorCode::Unauthorized, Some(1))
            .await?;
        ensure!(e.message.contains("revoked"), "{e:?}");
    }
    client_of(nodes[0], &user, harness::now_secs() + 2).await?;
    // The bystander saw none of it.
    bystander.roundtrip().await?;
    Ok(())
}

#[tokio::test]
async fn embedded_control() -> R {
    let gw = Gateway::start().await?;
    control_reaches_every_node(&[&gw]).await
}

#[tokio::test]
async fn redis_control_across_nodes_and_revocation_outlives_a_restart() -> R {
    let mut c = Cluster::builder(Backbone::Redis)
        .nodes(2)
        .slots(3)
        .start()
        .await?;
    control_reaches_every_node(&[c.node(0), c.node(1)]).await?;
    // A node started after the revocation refuses the revoked user's old
    // tokens too (the revocation is in Redis).
    let user = harness::unique("late");
    let claims = harness::Claims {
        iat: Some(harness::now_secs() - 5),
        ..harness::Claims::new(&user, &[], &[], 600)
    };
    let token = harness::hs256_token(harness::JWT_SECRET, &claims);
    c.node(0)
        .post_json("/api/revoke", &json!({"user": user}))
        .await?;
    let i = c.add_node().await?;
    let mut ws = c.node(i).ws(Codec::Json).await?;
    ws.send(&ClientFrame::Connect(protocol::Connect {
        id: Some(1),
        token: Some(token),
        ..Default::default()
    }))
    .await?;
    ws.expect_error(protocol::ErrorCode::Unauthorized, Some(1))
        .await?;
    Ok(())
}

/// Disconnect, server-side subscribe and revoke, routed over shard
/// channels; the revocation stored on the cluster.
#[tokio::test]
async fn redis_cluster_control_across_nodes() -> R {
    let c = Cluster::builder(Backbone::Redis)
        .nodes(2)
        .redis_cluster()
        .start()
        .await?;
    control_reaches_every_node(&[c.node(0), c.node(1)]).await
}

#[tokio::test]
async fn nats_control_across_nodes() -> R {
    let c = Cluster::builder(Backbone::Nats).nodes(2).start().await?;
    control_reaches_every_node(&[c.node(0), c.node(1)]).await
}

/// A publish key cannot use the control calls (403); the admin key can.
#[tokio::test]
async fn control_calls_need_an_admin_key() -> R {
    let gw = Gateway::start().await?;
    for path in [
        "/api/disconnect",
        "/api/revoke",
        "/api/subscribe",
        "/api/unsubscribe",
    ] {
        let body = json!({"user": "u", "channel": "c"});
        let body = if path.ends_with("subscribe") {
            body
        } else {
            json!({"user": "u"})
        };
        let (status, answer) = gw
            .post_raw(
                path,
                serde_json::to_vec(&body)?,
                Some("application/json"),
                Some("test-api-key-2"),
            )
            .await?;
        ensure!(status.as_u16() == 403, "{path}: {status} {answer}");
        let (status, answer) = gw
            .post_raw(
                path,
                serde_json::to_vec(&body)?,
                Some("application/json"),
                Some(harness::API_KEY),
            )
            .await?;
        ensure!(status.as_u16() == 200, "{path}: {status} {answer}");
    }
    Ok(())
}

/// A server-side subscription survives the client's reconnects: the client
/// subscribes again with its position (its token alone does not allow the
/// channel) and resumes like any other subscription; after
/// `/api/unsubscribe` it may not.
async fn server_subscription_survives_reconnects(a: &Gateway, b: &Gateway) -> R {
    let user = harness::unique("srvsub");
    let chan = harness::unique("granted");
    let (mut ws, token) = client_of(a, &user, harness::now_secs()).await?;
    a.post_json("/api/subscribe", &json!({"user": user, "channel": chan}))
        .await?;
    let sub = match ws.recv().await? {
        ServerFrame::Subscribed(s) => s,
        other => anyhow::bail!("expected subscribed, got {other:?}"),
    };
    let first = a.publish(&chan, json!(1)).await?;
    ensure!(ws.recv_message().await?.seq == first.seq);
    ws.abort();
    let missed = a.publish(&chan, json!(2)).await?;
    // Back on the other node, with the same token, from its position.
    let (mut again, _) = b.ws_connected(Codec::Json, &token).await?;
    let resumed = again
        .subscribe(&chan, Some(Position::new(first.seq, sub.epoch.clone())))
        .await?;
    ensure!(resumed.recovered == Some(true), "{resumed:?}");
    ensure!(again.recv_message().await?.seq == missed.seq);
    a.post_json("/api/unsubscribe", &json!({"user": user, "channel": chan}))
        .await?;
    ensure!(matches!(again.recv().await?, ServerFrame::Unsubscribed(_)));
    let id = again.id();
    again
        .send(&ClientFrame::Subscribe(protocol::Subscribe {
            id: Some(id),
            channel: chan.clone(),
            since: None,
        }))
        .await?;
    again
        .expect_error(protocol::ErrorCode::PermissionDenied, Some(id))
        .await?;
    Ok(())
}

#[tokio::test]
async fn embedded_server_subscription_survives_reconnects() -> R {
    let gw = Gateway::start().await?;
    server_subscription_survives_reconnects(&gw, &gw).await
}

#[tokio::test]
async fn redis_server_subscription_survives_reconnects_across_nodes() -> R {
    let c = Cluster::builder(Backbone::Redis).nodes(2).start().await?;
    server_subscription_survives_reconnects(c.node(0), c.node(1)).await
}

#[tokio::test]
async fn redis_cluster_server_subscription_survives_reconnects_across_nodes() -> R {
    let c = Cluster::builder(Backbone::Redis)
        .nodes(2)
        .redis_cluster()
        .start()
        .await?;
    server_subscription_survives_reconnects(c.node(0), c.node(1)).await
}
