//! RS256 connection tokens verified with a public key file.

use harness::{openssl_rsa_keypair, sign, Claims, Gateway, TempDir};
use jsonwebtoken::{Algorithm, EncodingKey};
use protocol::{ClientFrame, Codec, Connect, ErrorCode};
use serde_json::json;

use super::{check_message, R};

#[tokio::test]
async fn rs256_tokens_from_the_configured_key_connect_and_others_are_refused() -> R {
    let dir = TempDir::new()?;
    let (private, public) = openssl_rsa_keypair(dir.path(), "good")?;
    let (other_private, _) = openssl_rsa_keypair(dir.path(), "other")?;
    let gw = Gateway::builder()
        .unset("jwt_secret")
        .env("jwt_public_key_file", public.display())
        .env("jwt_algorithm", "RS256")
        .start()
        .await?;

    let claims = Claims::new("rsa-user", &["secure:*"], &[], 600);
    let token = sign(
        &claims,
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(&private)?,
    );
    let (mut ws, connected) = gw.ws_connected(Codec::Json, &token).await?;
    assert_eq!(connected.user, "rsa-user");
    assert_eq!(connected.expires_at, claims.exp);
    let epoch = ws.subscribe("secure:1", None).await?.epoch;
    gw.publish("secure:1", json!({"signed": "RS256"})).await?;
    check_message(
        &ws.recv_message().await?,
        "secure:1",
        1,
        &epoch,
        &json!({"signed": "RS256"}),
    );
    // SSE accepts it too.
    let mut sse = gw.sse(&["secure:1"], Some(&token), None).await?;
    assert_eq!(sse.next_event().await?.event.as_deref(), Some("connected"));

    // Signed with another key, or HS256 (no secret configured): refused.
    let forged = sign(
        &claims,
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(&other_private)?,
    );
    let hs = harness::hs256_token(harness::JWT_SECRET, &claims);
    for bad in [forged, hs] {
        let mut ws = gw.ws(Codec::MsgPack).await?;
        ws.send(&ClientFrame::Connect(Connect {
            resume: None,
            id: Some(1),
            token: Some(bad.clone()),
            since: None,
        }))
        .await?;
        ws.expect_error(ErrorCode::Unauthorized, Some(1)).await?;
        assert_eq!(ws.expect_close().await?, 4500);
        let (status, body) = gw
            .sse_error(&format!("?channel=secure:1&token={bad}"), &[])
            .await?;
        assert_eq!(status, 401, "{body}");
    }
    // The good connection is unaffected.
    gw.publish("secure:1", json!(2)).await?;
    check_message(&ws.recv_message().await?, "secure:1", 2, &epoch, &json!(2));
    Ok(())
}
