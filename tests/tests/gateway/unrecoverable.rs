//! Resumes that cannot be served: too old (count and time windows), epoch
//! changed, position ahead of the stream.

use std::time::{Duration, Instant};

use harness::{Gateway, WsClient};
use protocol::{Codec, ServerFrame, Unrecoverable, UnrecoverableReason};

use super::{as_subscribed, check_message, payload, pos, R};

#[track_caller]
fn as_unrecoverable(f: ServerFrame) -> Unrecoverable {
    match f {
        ServerFrame::Unrecoverable(u) => u,
        other => panic!("expected unrecoverable, got {other:?}"),
    }
}

/// Resumes `chan` from `since` and expects `subscribed{recovered:false}`,
/// then `unrecoverable{reason}` at (epoch, top).
async fn expect_unrecoverable(
    ws: &mut WsClient,
    chan: &str,
    since: protocol::Position,
    reason: UnrecoverableReason,
    epoch: &str,
    top: u64,
) -> R {
    let sub = ws.subscribe(chan, Some(since)).await?;
    assert_eq!(
        (sub.recovered, sub.seq, sub.epoch.as_str()),
        (Some(false), top, epoch),
        "{sub:?}"
    );
    let u = as_unrecoverable(ws.recv().await?);
    assert_eq!(
        (u.channel.as_str(), u.reason, u.epoch.as_str(), u.seq),
        (chan, reason, epoch, top),
        "{u:?}"
    );
    Ok(())
}

#[tokio::test]
async fn resume_beyond_the_count_window_is_too_old_then_live_continues() -> R {
    let gw = Gateway::builder()
        .env("replay_max_messages", 5)
        .start()
        .await?;
    let token = gw.token("w1", &["*"], &[], 600);
    let (mut ws, _) = gw.ws_connected(Codec::Json, &token).await?;
    let epoch = ws.subscribe("c", None).await?.epoch;
    for i in 1..=2 {
        gw.publish("c", payload(i)).await?;
    }
    for i in 1..=2 {
        check_message(&ws.recv_message().await?, "c", i, &epoch, &payload(i));
    }
    ws.abort();
    for i in 3..=12 {
        gw.publish("c", payload(i)).await?; // 10 missed, 5 kept (8..=12)
    }

    let (mut ws, _) = gw.ws_connected(Codec::Json, &token).await?;
    expect_unrecoverable(
        &mut ws,
        "c",
        pos(2, &epoch),
        UnrecoverableReason::TooOld,
        &epoch,
        12,
    )
    .await?;
    gw.publish("c", payload(13)).await?;
    check_message(&ws.recv_message().await?, "c", 13, &epoch, &payload(13));

    // Inside the window the same stream still resumes.
    let (mut ws2, _) = gw.ws_connected(Codec::MsgPack, &token).await?;
    let sub = ws2.subscribe("c", Some(pos(8, &epoch))).await?;
    assert_eq!((sub.recovered, sub.seq), (Some(true), 13));
    for i in 9..=13 {
        check_message(&ws2.recv_message().await?, "c", i, &epoch, &payload(i));
    }
    Ok(())
}

#[tokio::test]
async fn resume_beyond_the_time_window_is_too_old_then_live_continues() -> R {
    let gw = Gateway::builder()
        .env("replay_window_ms", 300)
        .start()
        .await?;
    let token = gw.token("w2", &["*"], &[], 600);
    let (mut ws, _) = gw.ws_connected(Codec::MsgPack, &token).await?;
    let epoch = ws.subscribe("t", None).await?.epoch;
    gw.publish("t", payload(1)).await?;
    check_message(&ws.recv_message().await?, "t", 1, &epoch, &payload(1));
    ws.abort();
    for i in 2..=3 {
        gw.publish("t", payload(i)).await?;
    }
    let missed_at = Instant::now();
    // The user stream too: one message missed.
    let user_epoch = gw.send("w2", payload(50)).await?.epoch;

    // Let the window pass (this wait is the scenario, not an assertion).
    tokio::time::sleep(
        Duration::from_millis(300).saturating_sub(missed_at.elapsed()) + Duration::from_millis(150),
    )
    .await;

    let mut ws = gw.ws(Codec::MsgPack).await?;
    ws.connect(Some(&token), Some(pos(0, &user_epoch))).await?;
    let sub = as_subscribed(ws.recv().await?);
    assert_eq!(
        (sub.channel.as_str(), sub.recovered, sub.seq),
        ("$user:w2", Some(false), 1)
    );
    let u = as_unrecoverable(ws.recv().await?);
    assert_eq!(
        (u.channel.as_str(), u.reason, u.seq),
        ("$user:w2", UnrecoverableReason::TooOld, 1)
    );

    expect_unrecoverable(
        &mut ws,
        "t",
        pos(1, &epoch),
        UnrecoverableReason::TooOld,
        &epoch,
        3,
    )
    .await?;
    gw.publish("t", payload(4)).await?;
    check_message(&ws.recv_message().await?, "t", 4, &epoch, &payload(4));
    gw.send("w2", payload(51)).await?;
    check_message(
        &ws.recv_message().await?,
        "$user:w2",
        2,
        &user_epoch,
        &payload(51),
    );
    Ok(())
}

#[tokio::test]
async fn resume_from_another_epoch_or_ahead_of_the_stream() -> R {
    let gw = Gateway::start().await?;
    let token = gw.token("w3", &["*"], &[], 600);
    let mut epoch = String::new();
    for i in 1..=3 {
        epoch = gw.publish("e", payload(i)).await?.epoch;
    }
    let (mut ws, _) = gw.ws_connected(Codec::Json, &token).await?;
    let stale = if epoch == "Stale0ld" {
        "Stale0le"
    } else {
        "Stale0ld"
    };
    expect_unrecoverable(
        &mut ws,
        "e",
        pos(2, stale),
        UnrecoverableReason::EpochChanged,
        &epoch,
        3,
    )
    .await?;
    gw.publish("e", payload(4)).await?;
    check_message(&ws.recv_message().await?, "e", 4, &epoch, &payload(4));

    // A position ahead of the stream is not one of its positions.
    let (mut ws2, _) = gw.ws_connected(Codec::MsgPack, &token).await?;
    expect_unrecoverable(
        &mut ws2,
        "e",
        pos(99, &epoch),
        UnrecoverableReason::BadPosition,
        &epoch,
        4,
    )
    .await?;
    gw.publish("e", payload(5)).await?;
    check_message(&ws2.recv_message().await?, "e", 5, &epoch, &payload(5));
    check_message(&ws.recv_message().await?, "e", 5, &epoch, &payload(5));

    // The user stream through connect.since, with an epoch it never had.
    let user_epoch = gw.send("w3", payload(9)).await?.epoch;
    let mut ws3 = gw.ws(Codec::Json).await?;
    ws3.connect(Some(&token), Some(pos(1, stale))).await?;
    let sub = as_subscribed(ws3.recv().await?);
    assert_eq!(
        (sub.recovered, sub.seq, sub.epoch.as_str()),
        (Some(false), 1, user_epoch.as_str())
    );
    let u = as_unrecoverable(ws3.recv().await?);
    assert_eq!(
        (u.channel.as_str(), u.reason, u.epoch.as_str(), u.seq),
        (
            "$user:w3",
            UnrecoverableReason::EpochChanged,
            user_epoch.as_str(),
            1
        )
    );
    gw.send("w3", payload(10)).await?;
    check_message(
        &ws3.recv_message().await?,
        "$user:w3",
        2,
        &user_epoch,
        &payload(10),
    );
    Ok(())
}
