//! Publishing from a client, and the command rate limit.

use std::time::Instant;

use anyhow::{bail, ensure};
use harness::{Gateway, TIMEOUT};
use protocol::{ClientFrame, Codec, ErrorCode, Ping, Publish, ServerFrame, Subscribe};
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
