//! Channel namespaces (issue 14, item 3): a `[[namespace]]` block's options
//! take effect for its channels only, and a bad block stops the node with a
//! message naming it and the key.

use std::time::Duration;

use anyhow::ensure;
use harness::{Gateway, TempDir};
use protocol::{ClientFrame, Codec, ErrorCode, Position, ServerFrame, UnrecoverableReason};
use serde_json::json;

use super::R;

const CONFIG: &str = r#"
[[namespace]]
name = "brief"
replay_window_ms = 300

[[namespace]]
name = "ro"
publish = false
history = false
"#;

#[tokio::test]
async fn namespace_options_take_effect_for_their_channels_only() -> R {
    let dir = TempDir::new()?;
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, CONFIG)?;
    let gw = Gateway::builder()
        .env("GATEWAY_CONFIG", file.display())
        .start()
        .await?;
    // A short replay window: a resume after it is told `too_old`, where the
    // default window (2 min) still recovers.
    let first_brief = gw.publish("brief:x", json!(1)).await?;
    let first_news = gw.publish("news", json!(1)).await?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let token = gw.token("u", &["*"], &["*"], 600);
    let (mut ws, _) = gw.ws_connected(Codec::Json, &token).await?;
    let news = ws
        .subscribe("news", Some(Position::new(0, first_news.epoch.clone())))
        .await?;
    ensure!(news.recovered == Some(true), "{news:?}");
    ensure!(ws.recv_message().await?.seq == 1);
    let brief = ws
        .subscribe("brief:x", Some(Position::new(0, first_brief.epoch.clone())))
        .await?;
    ensure!(brief.recovered == Some(false), "{brief:?}");
    match ws.recv().await? {
        ServerFrame::Unrecoverable(u) => ensure!(u.reason == UnrecoverableReason::TooOld, "{u:?}"),
        other => anyhow::bail!("expected unrecoverable, got {other:?}"),
    }
    // publish = false, history = false: refused to clients, whatever the
    // token allows; the backend still publishes and reads.
    ws.send(&ClientFrame::Publish(protocol::Publish {
        id: Some(5),
        channel: "ro:x".into(),
        data: json!(1),
        exclude_client: false,
    }))
    .await?;
    ws.expect_error(ErrorCode::PermissionDenied, Some(5))
        .await?;
    ws.send(&ClientFrame::History(protocol::History {
        id: Some(6),
        channel: "ro:x".into(),
        ..Default::default()
    }))
    .await?;
    ws.expect_error(ErrorCode::PermissionDenied, Some(6))
        .await?;
    gw.publish("ro:x", json!("from the backend")).await?;
    let h = gw
        .post_json("/api/history", &json!({"channel": "ro:x"}))
        .await?;
    ensure!(h["messages"].as_array().map(Vec::len) == Some(1), "{h}");
    // Others' channels publish as before.
    ws.send(&ClientFrame::Publish(protocol::Publish {
        id: Some(7),
        channel: "chat:x".into(),
        data: json!(1),
        exclude_client: false,
    }))
    .await?;
    match ws.recv().await? {
        ServerFrame::Published(p) => ensure!(p.id == Some(7)),
        other => anyhow::bail!("expected published, got {other:?}"),
    }
    Ok(())
}

#[test]
fn a_bad_namespace_block_stops_the_node_naming_the_key() -> R {
    let dir = TempDir::new()?;
    for (config, expect) in [
        (
            "[[namespace]]\nname = \"a\"\nreplay_window_ms = 0\n",
            "namespace[0] (\"a\"): replay_window_ms",
        ),
        (
            "[[namespace]]\nname = \"a\"\n[[namespace]]\nname = \"a\"\n",
            "namespace[1] (\"a\"): name",
        ),
        ("[[namespace]]\nname = \"a\"\nreplay = 1\n", "replay"),
    ] {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, config)?;
        let out = std::process::Command::new(harness::gateway_bin())
            .args(["--dev", "--addr", "127.0.0.1:0", "--config"])
            .arg(&file)
            .stdin(std::process::Stdio::null())
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "started with {config:?}");
        ensure!(stderr.contains(expect), "{config:?}: {stderr}");
    }
    Ok(())
}
