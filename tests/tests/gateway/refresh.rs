//! Token refresh: `refresh_required` before expiry; `refresh` keeps the
//! connection past the old expiry; no refresh means close 4005.

use std::time::Duration;

use anyhow::{bail, ensure};
use harness::{now_secs, Gateway, Incoming, WsClient};
use protocol::{ClientFrame, Codec, ErrorCode, Refresh, ServerFrame};
use serde_json::json;

use super::{check_message, R};

async fn expect_refresh_required(ws: &mut WsClient, exp: u64) -> R {
    match ws.recv().await? {
        ServerFrame::RefreshRequired(r) => {
            ensure!(
                r.expires_at == exp,
                "refresh_required for {} (token exp {exp})",
                r.expires_at
            );
            // It comes within the refresh window (2 s) of the expiry, not after it.
            ensure!(now_secs() < exp, "refresh_required after the expiry");
            Ok(())
        }
        other => bail!("expected refresh_required, got {other:?}"),
    }
}

#[tokio::test]
async fn refresh_keeps_the_connection_and_no_refresh_closes_4005() -> R {
    let gw = Gateway::builder()
        .env("refresh_window_ms", 2000)
        .start()
        .await?;

    let refreshed = async {
        let token = gw.token("r1", &["r"], &[], 3);
        let (mut ws, connected) = gw.ws_connected(Codec::Json, &token).await?;
        let old_exp = connected.expires_at.expect("the token has an expiry");
        let epoch = ws.subscribe("r", None).await?.epoch;
        expect_refresh_required(&mut ws, old_exp).await?;

        // A bad token is refused and the old one kept.
        ws.send(&ClientFrame::Refresh(Refresh {
            id: Some(7),
            token: "garbage".into(),
        }))
        .await?;
        ws.expect_error(ErrorCode::Unauthorized, Some(7)).await?;
        // A token of another user too.
        let other = gw.token("someone-else", &["r"], &[], 60);
        ws.send(&ClientFrame::Refresh(Refresh {
            id: Some(8),
            token: other,
        }))
        .await?;
        ws.expect_error(ErrorCode::Unauthorized, Some(8)).await?;

        let fresh = gw.token("r1", &["r"], &[], 60);
        let new_exp = now_secs() + 60;
        ws.send(&ClientFrame::Refresh(Refresh {
            id: Some(9),
            token: fresh,
        }))
        .await?;
        match ws.recv().await? {
            ServerFrame::Refreshed(r) => {
                assert_eq!(r.id, Some(9));
                let exp = r.expires_at.expect("new expiry");
                assert!(
                    (new_exp.saturating_sub(1)..=new_exp + 1).contains(&exp),
                    "{exp} vs {new_exp}"
                );
            }
            other => bail!("expected refreshed, got {other:?}"),
        }
        // Stay on well past the old expiry: nothing arrives, nothing closes.
        let until = Duration::from_secs((old_exp + 1).saturating_sub(now_secs()))
            + Duration::from_millis(300);
        match tokio::time::timeout(until, ws.next()).await {
            Err(_) => {}
            Ok(got) => bail!("expected silence past the old expiry, got {got:?}"),
        }
        assert!(now_secs() > old_exp);
        ws.roundtrip().await?;
        let p = gw.publish("r", json!("after expiry")).await?;
        check_message(
            &ws.recv_message().await?,
            "r",
            1,
            &epoch,
            &json!("after expiry"),
        );
        assert_eq!(p.seq, 1);
        anyhow::Ok(())
    };

    let not_refreshed = async {
        let token = gw.token("r2", &[], &[], 3);
        let (mut ws, connected) = gw.ws_connected(Codec::MsgPack, &token).await?;
        let exp = connected.expires_at.expect("the token has an expiry");
        expect_refresh_required(&mut ws, exp).await?;
        match ws.next().await? {
            Incoming::Closed {
                code: Some(4005), ..
            } => {}
            other => bail!("expected close 4005, got {other:?}"),
        }
        ensure!(now_secs() >= exp, "closed before the expiry");
        anyhow::Ok(())
    };

    let (a, b) = tokio::join!(refreshed, not_refreshed);
    a?;
    b?;
    Ok(())
}

/// A token's `exp` is client input: the far future (`u64::MAX`), on a node
/// that allows any lifetime, must not overflow the connection's timers
/// (it panicked the connection task once), and the default node refuses it.
#[tokio::test]
async fn far_future_token_expiry_neither_panics_nor_passes_the_lifetime_bound() -> R {
    let claims = harness::Claims {
        exp: Some(u64::MAX),
        ..harness::Claims::new("forever", &["f"], &[], 60)
    };
    let token = harness::hs256_token(harness::JWT_SECRET, &claims);

    let lax = Gateway::builder()
        .env("max_token_lifetime_secs", u64::MAX)
        .start()
        .await?;
    let mut ws = lax.ws(Codec::Json).await?;
    let connected = ws.hello(Some(&token)).await?;
    ensure!(connected.expires_at == Some(u64::MAX), "{connected:?}");
    ws.subscribe("f", None).await?;
    let r = lax.publish("f", json!({"n": 1})).await?;
    let m = ws.recv_message().await?;
    check_message(&m, "f", r.seq, &r.epoch, &json!({"n": 1}));
    ws.roundtrip().await?;

    let strict = Gateway::start().await?;
    let mut ws = strict.ws(Codec::Json).await?;
    ws.send(&ClientFrame::Connect(protocol::Connect {
        token: Some(token),
        ..Default::default()
    }))
    .await?;
    match ws.recv().await? {
        ServerFrame::Error(e) if e.code == ErrorCode::Unauthorized => {
            ensure!(e.message.contains("max_token_lifetime_secs"), "{e:?}");
        }
        other => bail!("expected unauthorized, got {other:?}"),
    }
    Ok(())
}
