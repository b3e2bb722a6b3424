//! Heartbeats: server pings, idle timeout (4002), connect timeout (4002).

use std::time::{Duration, Instant};

use anyhow::bail;
use protocol::{ClientFrame, Codec, Pong, ServerFrame};
use tests::{Gateway, Incoming};

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
