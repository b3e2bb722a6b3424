//! Heartbeats: server pings, idle timeout (4002), connect timeout (4002).

use std::time::{Duration, Instant};

use anyhow::bail;
use harness::{Gateway, Incoming};
use protocol::{ClientFrame, Codec, Pong, ServerFrame};

use super::R;

#[tokio::test]
async fn answering_pings_keeps_a_connection_and_silence_closes_it_4002() -> R {
    let gw = Gateway::builder()
        .env("ping_interval_ms", 200)
        .env("idle_timeout_ms", 600)
        .env("connect_timeout_ms", 500)
        .start()
        .await?;
    let token = gw.token("hb", &[], &[], 600);

    let alive = async {
        let (mut ws, connected) = gw.ws_connected(Codec::Json, &token).await?;
        assert_eq!(connected.ping_interval_ms, 200);
        ws.auto_pong = false;
        let start = Instant::now();
        let mut pings = 0;
        while start.elapsed() < Duration::from_millis(1600) {
            let left = Duration::from_millis(1600).saturating_sub(start.elapsed());
            match tokio::time::timeout(left, ws.next()).await {
                Err(_) => break,
                Ok(Ok(Incoming::Frame(ServerFrame::Ping(_)))) => {
                    pings += 1;
                    ws.send(&ClientFrame::Pong(Pong { id: None })).await?;
                }
                Ok(other) => bail!("unexpected {other:?} after {:?}", start.elapsed()),
            }
        }
        assert!(
            pings >= 5,
            "only {pings} pings in 1.6 s at a 200 ms interval"
        );
        ws.roundtrip().await?;
        anyhow::Ok(())
    };

    let silent = async {
        let (mut ws, _) = gw.ws_connected(Codec::MsgPack, &token).await?;
        ws.auto_pong = false;
        let start = Instant::now();
        let (frames, code) = ws.read_until_close().await?;
        assert_eq!(code, Some(4002), "frames: {frames:?}");
        assert!(
            frames.iter().all(|f| matches!(f, ServerFrame::Ping(_))),
            "{frames:?}"
        );
        assert!(
            start.elapsed() >= Duration::from_millis(550),
            "closed after {:?}",
            start.elapsed()
        );
        anyhow::Ok(())
    };

    let no_connect = async {
        let mut ws = gw.ws(Codec::Json).await?;
        let start = Instant::now();
        assert_eq!(ws.expect_close().await?, 4002);
        assert!(
            start.elapsed() >= Duration::from_millis(450),
            "closed after {:?}",
            start.elapsed()
        );
        anyhow::Ok(())
    };

    let (a, b, c) = tokio::join!(alive, silent, no_connect);
    a?;
    b?;
    c?;
    Ok(())
}

/// WebSocket-level pings get their pongs while publications stream out: the
/// pongs (written by tungstenite) and the publications (written straight to
/// the socket) never interleave inside a frame, and none is lost.
#[tokio::test]
async fn websocket_pings_get_pongs_between_streamed_publications() -> R {
    use tokio_tungstenite::tungstenite::Message;
    let gw = Gateway::start().await?;
    let channel = harness::unique("pongs");
    let token = gw.token("pinger", &[&channel], &[], 600);
    let (mut ws, _) = gw.ws_connected(Codec::Json, &token).await?;
    let first = ws.subscribe(&channel, None).await?.seq + 1;
    const MESSAGES: u64 = 400;
    const PINGS: usize = 40;
    let publisher = async {
        for i in 0..MESSAGES {
            gw.publish(
                &channel,
                serde_json::json!({ "i": i, "pad": "x".repeat(512) }),
            )
            .await?;
        }
        anyhow::Ok(())
    };
    let reader = async {
        let mut got = 0;
        let mut pinged = 0;
        while got < MESSAGES {
            if pinged < PINGS && got >= pinged as u64 * (MESSAGES / PINGS as u64) {
                ws.send_raw(Message::Ping(vec![pinged as u8; 3].into()))
                    .await?;
                pinged += 1;
            }
            let m = ws.recv_messages(&channel, first + got, 1).await?;
            assert_eq!(m[0].data["i"], got);
            got += 1;
        }
        // Pongs still in flight arrive before the answer to this.
        ws.roundtrip().await?;
        anyhow::Ok(pinged)
    };
    let (p, r) = tokio::join!(publisher, reader);
    p?;
    let pinged = r?;
    let want: Vec<Vec<u8>> = (0..pinged).map(|i| vec![i as u8; 3]).collect();
    assert_eq!(ws.ws_pongs, want);
    Ok(())
}
