//! A WebSocket client that stops reading is cut as a slow consumer (4001)
//! and loses nothing when it resumes.

use std::time::Instant;

use anyhow::ensure;
use harness::{Gateway, WsClient, WsOptions, TIMEOUT};
use protocol::{Codec, ServerFrame};
use serde_json::{json, Value};

use super::{check_message, pos, R};

fn data(i: u64) -> Value {
    // ~3.3 KB per frame: the 4 KiB queue holds one.
    json!({"i": i, "pad": "x".repeat(3200)})
}

#[tokio::test]
async fn slow_consumer_is_cut_with_4001_and_resume_recovers_everything() -> R {
    let gw = Gateway::builder()
        .env("max_queue_bytes", 4096)
        .env("max_frame_bytes", 1024)
        .env("replay_max_messages", 100_000)
        .start()
        .await?;
    let chan = "firehose";
    let token = gw.token("slow", &[chan], &[], 600);

    // A small receive buffer so the server's writes block soon.
    let mut slow = WsClient::open(
        &gw,
        WsOptions {
            codec: Some(Codec::Json),
            recv_buffer: Some(4096),
        },
    )
    .await?;
    slow.hello(Some(&token)).await?;
    let epoch = slow.subscribe(chan, None).await?.epoch;
    // A healthy subscriber on the same channel is not affected.
    let (mut fast, _) = gw.ws_connected(Codec::MsgPack, &token).await?;
    fast.subscribe(chan, None).await?;

    // `slow` is no longer polled. Publish one request at a time (a reading
    // client keeps up with that easily) until the node reports the cut.
    let deadline = Instant::now() + TIMEOUT;
    let mut published = 0u64;
    loop {
        for _ in 0..20 {
            published += 1;
            let r = gw.publish(chan, data(published)).await?;
            assert_eq!(r.seq, published);
            check_message(
                &fast.recv_message().await?,
                chan,
                published,
                &epoch,
                &data(published),
            );
        }
        if gw.metric("gateway_slow_consumer_disconnects_total").await? > 0.0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no slow-consumer disconnect after {published} messages ({} KiB) to a client that does not read",
            published * 3300 / 1024
        );
    }
    // More while it is gone.
    for _ in 0..10 {
        published += 1;
        gw.publish(chan, data(published)).await?;
        check_message(
            &fast.recv_message().await?,
            chan,
            published,
            &epoch,
            &data(published),
        );
    }

    // Reading again: what was written before the cut, in order, then 4001.
    let (frames, code) = slow.read_until_close().await?;
    assert_eq!(code, Some(4001), "close code after {} frames", frames.len());
    let mut seqs = Vec::new();
    for f in frames {
        match f {
            ServerFrame::Message(m) => {
                let next = seqs.len() as u64 + 1;
                check_message(&m, chan, next, &epoch, &data(next));
                seqs.push(m.seq);
            }
            other => panic!("unexpected frame before the close: {other:?}"),
        }
    }
    let last = seqs.len() as u64;
    assert!(
        last < published,
        "the slow client got everything ({last}) and yet was cut"
    );

    // Resume from the last position: everything else, nothing twice.
    let (mut again, _) = gw.ws_connected(Codec::Json, &token).await?;
    let sub = again.subscribe(chan, Some(pos(last, &epoch))).await?;
    assert_eq!((sub.recovered, sub.seq), (Some(true), published), "{sub:?}");
    for i in last + 1..=published {
        let m = again.recv_message().await?;
        check_message(&m, chan, i, &epoch, &data(i));
        seqs.push(m.seq);
    }
    assert_eq!(seqs, (1..=published).collect::<Vec<_>>());
    // The healthy subscriber got everything, and stays connected.
    fast.roundtrip().await?;
    Ok(())
}
