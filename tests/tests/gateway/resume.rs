//! WebSocket resume after a forced disconnect: channels (`subscribe.since`)
//! and the user stream (`connect.since`).

use harness::Gateway;
use protocol::{Codec, ServerFrame};
use serde_json::json;

use super::{as_subscribed, check_message, payload, pos, R};

#[tokio::test]
async fn ws_channel_resume_after_abrupt_disconnect_has_no_gap_and_no_duplicate() -> R {
    for codec in [Codec::Json, Codec::MsgPack] {
        let gw = Gateway::start().await?;
        let chan = "room:1";
        let token = gw.token("u1", &["room:*"], &[], 600);

        let (mut ws, _) = gw.ws_connected(codec, &token).await?;
        let epoch = ws.subscribe(chan, None).await?.epoch;
        for i in 1..=10 {
            gw.publish(chan, payload(i)).await?;
        }
        for i in 1..=10 {
            check_message(&ws.recv_message().await?, chan, i, &epoch, &payload(i));
        }
        // Messages published after the last one read are in flight or queued
        // when the connection dies: the client never read them.
        for i in 11..=15 {
            gw.publish(chan, payload(i)).await?;
        }
        ws.abort();
        for i in 16..=30 {
            gw.publish(chan, payload(i)).await?;
        }

        // Reconnect while messages keep coming: the resume read races the
        // live ones, and the client must still see each seq exactly once.
        let publisher = async {
            for i in 31..=60 {
                gw.publish(chan, payload(i)).await?;
                tokio::task::yield_now().await;
            }
            anyhow::Ok(())
        };
        let resumer = async {
            let (mut ws, _) = gw.ws_connected(codec, &token).await?;
            let sub = ws.subscribe(chan, Some(pos(10, &epoch))).await?;
            assert_eq!(sub.recovered, Some(true), "{sub:?}");
            assert_eq!(sub.epoch, epoch);
            assert!(
                (30..=60).contains(&sub.seq),
                "subscribed.seq {} is the top when it subscribed",
                sub.seq
            );
            for i in 11..=60 {
                check_message(&ws.recv_message().await?, chan, i, &epoch, &payload(i));
            }
            anyhow::Ok(ws)
        };
        let (published, resumed) = tokio::join!(publisher, resumer);
        published?;
        let mut ws = resumed?;
        // And nothing more was queued (no late duplicate).
        gw.publish(chan, json!("after")).await?;
        check_message(&ws.recv_message().await?, chan, 61, &epoch, &json!("after"));
    }
    Ok(())
}

#[tokio::test]
async fn ws_user_stream_resume_via_connect_since() -> R {
    let gw = Gateway::start().await?;
    let token = gw.token("u2", &[], &[], 600);
    let chan = "$user:u2";

    let (mut ws, _) = gw.ws_connected(Codec::MsgPack, &token).await?;
    let mut epoch = String::new();
    for i in 1..=5 {
        epoch = gw.send("u2", payload(i)).await?.epoch;
    }
    for i in 1..=5 {
        check_message(&ws.recv_message().await?, chan, i, &epoch, &payload(i));
    }
    ws.abort();
    for i in 6..=10 {
        gw.send("u2", payload(i)).await?;
    }

    let mut ws = gw.ws(Codec::MsgPack).await?;
    let connected = ws.connect(Some(&token), Some(pos(5, &epoch))).await?;
    assert_eq!(connected.user_channel.as_deref(), Some(chan));
    let sub = as_subscribed(ws.recv().await?);
    assert_eq!(
        (
            sub.channel.as_str(),
            sub.seq,
            sub.recovered,
            sub.epoch.as_str()
        ),
        (chan, 10, Some(true), epoch.as_str())
    );
    for i in 6..=10 {
        check_message(&ws.recv_message().await?, chan, i, &epoch, &payload(i));
    }
    for i in 11..=12 {
        gw.send("u2", payload(i)).await?;
    }
    for i in 11..=12 {
        check_message(&ws.recv_message().await?, chan, i, &epoch, &payload(i));
    }

    // A second connection of the same user without `since` starts at the top.
    let mut other = gw.ws(Codec::Json).await?;
    other.connect(Some(&token), None).await?;
    match other.recv().await? {
        ServerFrame::Subscribed(s) => assert_eq!((s.seq, s.recovered), (12, None)),
        f => panic!("expected subscribed, got {f:?}"),
    }
    Ok(())
}
