//! Publishing from a client, and the command rate limit.

use std::time::Instant;

use anyhow::{bail, ensure};
use harness::cluster::{Backbone, Cluster};
use harness::{Gateway, TIMEOUT};
use protocol::{ClientFrame, Codec, ErrorCode, Ping, Publish, Publisher, ServerFrame, Subscribe};
use serde_json::json;

use super::{check_message, payload, R};

#[tokio::test]
async fn client_publish_allowed_by_the_token_reaches_subscribers() -> R {
    let gw = Gateway::start().await?;
    let (mut reader, _) = gw
        .ws_connected(Codec::Json, &gw.token("reader", &["chat:*"], &[], 600))
        .await?;
    let (mut writer, _) = gw
        .ws_connected(Codec::MsgPack, &gw.token("writer", &[], &["chat:*"], 600))
        .await?;
    let epoch = reader.subscribe("chat:1", None).await?.epoch;

    for i in 1..=20u64 {
        let id = 100 + i;
        writer
            .send(&ClientFrame::Publish(Publish {
                id: Some(id),
                channel: "chat:1".into(),
                data: payload(i),
                exclude_client: false,
            }))
            .await?;
        match writer.recv().await? {
            ServerFrame::Published(p) => {
                assert_eq!(
                    (p.id, p.channel.as_str(), p.seq, p.epoch.as_str()),
                    (Some(id), "chat:1", i, epoch.as_str())
                );
            }
            other => bail!("expected published, got {other:?}"),
        }
    }
    for i in 1..=20u64 {
        check_message(
            &reader.recv_message().await?,
            "chat:1",
            i,
            &epoch,
            &payload(i),
        );
    }
    // API publishes interleave in the same sequence.
    let r = gw.publish("chat:1", json!("from the API")).await?;
    assert_eq!(r.seq, 21);
    check_message(
        &reader.recv_message().await?,
        "chat:1",
        21,
        &epoch,
        &json!("from the API"),
    );
    // Not allowed: another channel.
    writer
        .send(&ClientFrame::Publish(Publish {
            id: Some(7),
            channel: "news".into(),
            data: json!(1),
            exclude_client: false,
        }))
        .await?;
    writer
        .expect_error(ErrorCode::PermissionDenied, Some(7))
        .await?;
    Ok(())
}

#[tokio::test]
async fn command_flood_is_rate_limited_with_a_temporary_error() -> R {
    let gw = Gateway::builder()
        .env("command_rate", 5)
        .env("command_burst", 5)
        .start()
        .await?;
    let (mut ws, _) = gw
        .ws_connected(Codec::Json, &gw.token("flood", &["f"], &[], 600))
        .await?;

    const N: u64 = 30;
    for id in 1..=N {
        ws.send(&ClientFrame::Ping(Ping { id: Some(id) })).await?;
    }
    let (mut pongs, mut limited, mut answered) = (Vec::new(), 0, Vec::new());
    for _ in 1..=N {
        match ws.recv().await? {
            ServerFrame::Pong(p) => {
                let id = p.id.expect("pong carries the ping's id");
                pongs.push(id);
                answered.push(id);
            }
            ServerFrame::Error(e) => {
                assert_eq!(e.code, ErrorCode::RateLimited, "{e:?}");
                assert_eq!(e.name, "rate_limited");
                assert!(e.temporary, "rate_limited is temporary: {e:?}");
                answered.push(e.id.expect("the refusal names the refused command"));
                limited += 1;
            }
            other => bail!("unexpected {other:?}"),
        }
    }
    answered.sort_unstable();
    assert_eq!(
        answered,
        (1..=N).collect::<Vec<_>>(),
        "every command answered once, by id"
    );
    assert!(pongs.len() >= 5, "the burst of 5 passes: {pongs:?}");
    assert!(
        limited >= 10,
        "a flood of {N} at 5/s: only {limited} refused"
    );
    assert!(
        pongs.windows(2).all(|w| w[0] < w[1]),
        "answers in order: {pongs:?}"
    );

    // The connection stays open: after a backoff commands pass again.
    let deadline = Instant::now() + TIMEOUT;
    let mut id = 1000;
    let mut epoch = None;
    while epoch.is_none() {
        id += 1;
        ws.send(&ClientFrame::Subscribe(Subscribe {
            id: Some(id),
            channel: "f".into(),
            since: None,
        }))
        .await?;
        match ws.recv().await? {
            ServerFrame::Subscribed(s) if s.id == Some(id) => epoch = Some(s.epoch),
            ServerFrame::Error(e) if e.code == ErrorCode::RateLimited && e.temporary => {
                ensure!(Instant::now() < deadline, "still rate limited");
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                // backoff
            }
            other => bail!("unexpected {other:?}"),
        }
    }
    let epoch = epoch.unwrap_or_default();
    gw.publish("f", json!("ok")).await?;
    check_message(&ws.recv_message().await?, "f", 1, &epoch, &json!("ok"));
    Ok(())
}

/// `from` and `exclude_client`, with the writer on `a` and the reader on
/// `b`: a client-published message names its publisher (from the
/// connection, whatever the frame says), in live delivery, history and
/// replays; with `exclude_client` the writer gets its answer in the
/// message's place and no copy, and the next message in order.
async fn from_and_exclusion(a: &Gateway, b: &Gateway) -> R {
    let chan = harness::unique("chat:x");
    let (writer_user, reader_user) = (harness::unique("w"), harness::unique("r"));
    let (mut writer, w_conn) = a
        .ws_connected(
            Codec::MsgPack,
            &a.token(&writer_user, &["chat:*"], &["chat:*"], 600),
        )
        .await?;
    let (mut reader, _) = b
        .ws_connected(Codec::Json, &b.token(&reader_user, &["chat:*"], &[], 600))
        .await?;
    let epoch = writer.subscribe(&chan, None).await?.epoch;
    reader.subscribe(&chan, None).await?;
    let writer_is = Publisher {
        user: Some(writer_user.clone()),
        client: w_conn.client.clone(),
    };

    // 1: a forged `from` in the frame is ignored (raw JSON: the typed frame
    // has no such field).
    let forged = json!({"type": "publish", "id": 1, "channel": chan, "data": "one",
        "from": {"user": "admin", "client": "x"}});
    let mut forged_writer = b
        .ws_connected(
            Codec::Json,
            &b.token(&writer_user, &["chat:*"], &["chat:*"], 600),
        )
        .await?
        .0;
    forged_writer
        .send_raw(tokio_tungstenite::tungstenite::Message::text(
            forged.to_string(),
        ))
        .await?;
    let forged_conn = match forged_writer.recv().await? {
        ServerFrame::Published(p) => {
            ensure!(p.seq == 1, "{p:?}");
            reader.recv_message().await?.from
        }
        other => bail!("expected published, got {other:?}"),
    };
    let forged_from = forged_conn.expect("a client-published message has from");
    ensure!(
        forged_from.user.as_deref() == Some(writer_user.as_str()) && forged_from.client != "x",
        "from comes from the connection: {forged_from:?}"
    );
    ensure!(writer.recv_message().await?.from == Some(forged_from.clone()));

    // 2: published normally: everyone, the writer too, gets it with `from`.
    writer
        .send(&ClientFrame::Publish(Publish {
            id: Some(2),
            channel: chan.clone(),
            data: json!("two"),
            exclude_client: false,
        }))
        .await?;
    // The answer and the writer's own copy, in either order.
    let mut own = Vec::new();
    for _ in 0..2 {
        match writer.recv().await? {
            ServerFrame::Published(p) => ensure!(p.seq == 2, "{p:?}"),
            ServerFrame::Message(m) => own.push(m),
            other => bail!("unexpected {other:?}"),
        }
    }
    ensure!(
        own.len() == 1 && own[0].seq == 2 && own[0].from.as_ref() == Some(&writer_is),
        "{own:?}"
    );
    let m = reader.recv_message().await?;
    ensure!(m.seq == 2 && m.from.as_ref() == Some(&writer_is), "{m:?}");

    // 3 from the API (no `from`), then 4 from the writer with
    // exclude_client, sent before the writer read 3: the writer gets 3,
    // then the answer for 4 in 4's place, and no copy of 4.
    a.publish(&chan, json!("three")).await?;
    writer
        .send(&ClientFrame::Publish(Publish {
            id: Some(4),
            channel: chan.clone(),
            data: json!("four"),
            exclude_client: true,
        }))
        .await?;
    let m = writer.recv_message().await?;
    ensure!(m.seq == 3 && m.from.is_none(), "{m:?}");
    match writer.recv().await? {
        ServerFrame::Published(p) => {
            ensure!(p.id == Some(4) && p.seq == 4 && p.epoch == epoch, "{p:?}")
        }
        other => bail!("expected published 4 in 4's place, got {other:?}"),
    }
    let m = reader.recv_message().await?;
    ensure!(m.seq == 3 && m.from.is_none(), "{m:?}");
    let m = reader.recv_message().await?;
    ensure!(m.seq == 4 && m.from.as_ref() == Some(&writer_is), "{m:?}");

    // 5 from the API: everyone gets it next.
    a.publish(&chan, json!("five")).await?;
    for (who, ws) in [("writer", &mut writer), ("reader", &mut reader)] {
        let m = ws.recv_message().await?;
        ensure!(
            m.seq == 5 && m.from.is_none() && m.epoch == epoch,
            "{who}: {m:?}"
        );
    }

    // The store keeps `from`: history and a replay (which has no exclusion).
    let h = b
        .post_json("/api/history", &json!({"channel": chan}))
        .await?;
    let froms: Vec<Option<String>> = h["messages"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| m["from"]["client"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let (f, w) = (
        Some(forged_from.client.clone()),
        Some(w_conn.client.clone()),
    );
    ensure!(
        froms == vec![f.clone(), w.clone(), None, w.clone(), None],
        "history: {h}"
    );
    let (mut late, _) = a
        .ws_connected(Codec::Json, &a.token(&reader_user, &["chat:*"], &[], 600))
        .await?;
    late.subscribe(&chan, Some(super::pos(0, &epoch))).await?;
    let replayed = late.recv_messages(&chan, 1, 5).await?;
    let froms: Vec<Option<String>> = replayed
        .iter()
        .map(|m| m.from.as_ref().map(|f| f.client.clone()))
        .collect();
    ensure!(froms == vec![f, w.clone(), None, w, None], "{replayed:?}");
    Ok(())
}

#[tokio::test]
async fn embedded_from_and_exclude_client() -> R {
    let gw = Gateway::start().await?;
    from_and_exclusion(&gw, &gw).await
}

#[tokio::test]
async fn redis_from_and_exclude_client_across_nodes() -> R {
    let c = Cluster::builder(Backbone::Redis).nodes(2).start().await?;
    from_and_exclusion(c.node(0), c.node(1)).await
}

#[tokio::test]
async fn nats_from_and_exclude_client_across_nodes() -> R {
    let c = Cluster::builder(Backbone::Nats).nodes(2).start().await?;
    from_and_exclusion(c.node(0), c.node(1)).await
}

#[tokio::test]
async fn redis_cluster_from_and_exclude_client_across_nodes() -> R {
    let c = Cluster::builder(Backbone::Redis)
        .redis_cluster()
        .nodes(2)
        .start()
        .await?;
    from_and_exclusion(c.node(0), c.node(1)).await
}
