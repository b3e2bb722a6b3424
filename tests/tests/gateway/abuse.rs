//! Hostile clients, at a size this machine takes: every connection has a
//! deadline in every state, and limits hold under concurrency. After each,
//! the node is checked healthy: both listeners answer `/livez`, and a fresh
//! client subscribes and receives.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use harness::{Gateway, WsClient};
use protocol::Codec;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::R;

/// `/livez` on the client listener and on the operations listener, and a
/// fresh WebSocket client that subscribes and receives.
async fn healthy(gw: &Gateway) -> R {
    let (status, _) = gw.get("/livez").await?;
    ensure!(
        status.is_success(),
        "/livez on the client listener: {status}"
    );
    let admin = gw.admin_addr().await?;
    let mut tcp = TcpStream::connect(admin).await?;
    tcp.write_all(b"GET /livez HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_string(&mut answer)).await??;
    ensure!(
        answer.starts_with("HTTP/1.1 200"),
        "/livez on the operations listener: {answer}"
    );
    let mut ws = gw.ws(Codec::Json).await?;
    ws.hello(Some(&gw.token("healthy", &["h"], &[], 600)))
        .await?;
    ws.subscribe("h", None).await?;
    let r = gw.publish("h", json!({"ok": true})).await?;
    let m = ws.recv_message().await?;
    ensure!(m.seq == r.seq, "{m:?}");
    Ok(())
}

/// Waits until the server closes `tcp` (EOF or reset); how long it took.
async fn closed_by_server(tcp: &mut TcpStream, limit: Duration) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((t0 + limit).into(), tcp.read(&mut buf)).await {
            Err(_) => bail!("still open after {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(t0.elapsed()),
            Ok(Ok(_)) => {} // a response, then the close
        }
    }
}

#[tokio::test]
async fn slow_heads_and_idle_keep_alive_connections_are_closed() -> R {
    let gw = Gateway::builder()
        .env("request_head_timeout_ms", 600)
        .env("admin_addr", "127.0.0.1:0")
        .start()
        .await?;
    // A request line, then a header byte now and then: never a whole head.
    let mut slow = TcpStream::connect(gw.addr).await?;
    slow.write_all(b"GET /livez HTTP/1.1\r\n").await?;
    let dribble = async {
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if slow.write_all(b"x").await.is_err() {
                break;
            }
        }
    };
    dribble.await;
    let took = closed_by_server(&mut slow, Duration::from_secs(5)).await?;
    eprintln!("slow head closed {took:?} after its last byte");
    // One request, then nothing: the keep-alive connection goes.
    let mut idle = TcpStream::connect(gw.addr).await?;
    idle.write_all(b"GET /livez HTTP/1.1\r\nhost: x\r\n\r\n")
        .await?;
    let took = closed_by_server(&mut idle, Duration::from_secs(5)).await?;
    ensure!(
        took >= Duration::from_millis(500),
        "closed too early: {took:?}"
    );
    // A slow SSE head on the raw-socket path has the same deadline.
    let mut sse = TcpStream::connect(gw.addr).await?;
    sse.write_all(b"GET /sse?channel=x HTTP/1.1\r\n").await?;
    closed_by_server(&mut sse, Duration::from_secs(5)).await?;
    healthy(&gw).await
}

#[tokio::test]
async fn control_frames_do_not_extend_the_connect_deadline() -> R {
    let gw = Gateway::builder()
        .env("connect_timeout_ms", 800)
        .env("admin_addr", "127.0.0.1:0")
        .start()
        .await?;
    let mut ws = gw.ws(Codec::Json).await?;
    let t0 = Instant::now();
    // A ping every 200 ms, never `connect`.
    let closed = loop {
        if t0.elapsed() > Duration::from_secs(5) {
            bail!("still open after 5 s of pings without connect");
        }
        let ping = tokio_tungstenite::tungstenite::Message::Ping(vec![1].into());
        if ws.send_raw(ping).await.is_err() {
            break t0.elapsed();
        }
        match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            Ok(Ok(harness::Incoming::Frame(_))) | Err(_) => {}
            Ok(_) => break t0.elapsed(),
        }
    };
    ensure!(closed < Duration::from_secs(3), "closed after {closed:?}");
    healthy(&gw).await
}

#[tokio::test]
async fn max_connections_holds_for_upgrades_that_never_send_connect() -> R {
    let gw = Gateway::builder()
        .env("max_connections", 5)
        .env("admin_addr", "127.0.0.1:0")
        .start()
        .await?;
    // Ten upgrades at once, none sends `connect`: five places only.
    let opens = (0..10).map(|_| WsClient::open_at(gw.addr, Codec::Json));
    let results = futures_util::future::join_all(opens).await;
    let held: Vec<WsClient> = results.into_iter().filter_map(Result::ok).collect();
    ensure!(
        held.len() == 5,
        "{} upgrades accepted with max_connections = 5",
        held.len()
    );
    drop(held);
    // The places come back when they go.
    tokio::time::sleep(Duration::from_millis(300)).await;
    healthy(&gw).await
}

#[tokio::test]
async fn pending_connections_are_capped_and_the_operations_listener_answers() -> R {
    let gw = Gateway::builder()
        .env("max_pending_connections", 3)
        .env("admin_addr", "127.0.0.1:0")
        .start()
        .await?;
    // Three silent connections take the pending places; more are closed
    // at once, while the operations listener keeps answering.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(gw.addr).await?);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(gw.addr).await?;
    let took = closed_by_server(&mut extra, Duration::from_secs(2)).await?;
    eprintln!("a connection over max_pending_connections closed after {took:?}");
    drop(silent);
    tokio::time::sleep(Duration::from_millis(200)).await;
    healthy(&gw).await?;
    let shed = gw.metric_with("gateway_connections_shed_total", "").await?;
    ensure!(shed >= 1.0, "shed connections not counted");
    Ok(())
}

#[tokio::test]
async fn a_client_that_never_reads_is_cut_after_the_write_stall_deadline() -> R {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let gw = Gateway::builder()
        .env("write_stall_timeout_ms", 1_000)
        .env("admin_addr", "127.0.0.1:0")
        .start()
        .await?;
    // A small receive window, so the node's writes block soon.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let tcp = socket.connect(gw.addr).await?;
    let request = format!("ws://{}/ws", gw.addr).into_client_request()?;
    let (mut ws, _) = tokio_tungstenite::client_async(request, tcp).await?;
    let token = gw.token("mute", &[], &[], 600);
    ws.send(Message::text(format!(
        r#"{{"type":"connect","token":"{token}"}}"#
    )))
    .await?;
    // Commands, and never a read of their replies (pongs, rate-limit errors).
    let ping = Message::text(r#"{"type":"ping","id":1}"#);
    let t0 = Instant::now();
    let cut = loop {
        ensure!(t0.elapsed() < Duration::from_secs(20), "not cut after 20 s");
        let sent = tokio::time::timeout(Duration::from_millis(200), async {
            for _ in 0..500 {
                ws.feed(ping.clone()).await?;
            }
            ws.flush().await
        })
        .await;
        if matches!(sent, Ok(Err(_))) {
            break t0.elapsed();
        }
        let stalls = gw.metric_with("gateway_write_stalls_total", "ws").await?;
        if stalls >= 1.0 {
            break t0.elapsed();
        }
    };
    eprintln!("a client that never reads was cut after {cut:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.metric_with("gateway_connections", "ws").await? > 0.0 {
        ensure!(Instant::now() < deadline, "the connection is still counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    healthy(&gw).await
}

#[tokio::test]
async fn hangup_and_user_signals_are_ignored_and_quit_drains() -> R {
    let mut gw = Gateway::builder()
        .env("admin_addr", "127.0.0.1:0")
        .env("drain_prestop_delay_ms", 100)
        .env("drain_timeout_ms", 2_000)
        .start()
        .await?;
    let pid = gw.pid().to_string();
    let kill = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()?;
        ensure!(status.success(), "kill {sig} {pid}: {status}");
        anyhow::Ok(())
    };
    for sig in ["-HUP", "-USR1", "-USR2"] {
        kill(sig)?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        ensure!(gw.is_running(), "{sig} killed the node");
    }
    healthy(&gw).await?;
    ensure!(gw.logs().contains("signal ignored"), "not logged");
    kill("-QUIT")?;
    let status = gw.wait_exit(Duration::from_secs(15)).await?;
    ensure!(status.success(), "after SIGQUIT: {status}");
    ensure!(gw.logs().contains("drain: done"), "SIGQUIT did not drain");
    Ok(())
}

/// The issue's smaller findings: each answered clearly, nothing lost.
#[tokio::test]
async fn odd_inputs_get_clear_answers() -> R {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::Message;

    let gw = Gateway::builder()
        .env("admin_addr", "127.0.0.1:0")
        .start()
        .await?;
    let token = gw.token("odd", &["odd"], &[], 600);

    // A non-ASCII Last-Event-ID is no cursor: 400, not a stream from the top.
    let mut tcp = TcpStream::connect(gw.addr).await?;
    let head = format!(
        "GET /sse?channel=odd&token={token} HTTP/1.1\r\nhost: x\r\nlast-event-id: v1.\u{e9}t\u{e9}\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer);
    ensure!(
        answer.starts_with("HTTP/1.1 400"),
        "non-ASCII Last-Event-ID: {answer}"
    );

    // A 1 MB Last-Event-ID on the raw SSE path: a readable 431, not a reset.
    let mut tcp = TcpStream::connect(gw.addr).await?;
    let big = format!(
        "GET /sse?channel=odd HTTP/1.1\r\nhost: x\r\nlast-event-id: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let (mut rd, mut wr) = tcp.split();
    let write = async {
        let _ = wr.write_all(big.as_bytes()).await;
    };
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut answer));
    let (_, read) = tokio::join!(write, read);
    read??;
    let answer = String::from_utf8_lossy(&answer);
    ensure!(
        answer.starts_with("HTTP/1.1 431"),
        "1 MB Last-Event-ID: {answer:.80}"
    );

    // A close frame with a code no endpoint may send (999): answered with a
    // close frame (1002), not a dropped connection.
    let mut ws = gw.ws(Codec::Json).await?;
    ws.hello(Some(&token)).await?;
    ws.send_raw(Message::Close(Some(CloseFrame {
        code: WsCloseCode::from(999),
        reason: "".into(),
    })))
    .await?;
    let code = loop {
        match ws.next().await? {
            harness::Incoming::Frame(_) => continue,
            harness::Incoming::Closed { code, .. } => break code,
        }
    };
    ensure!(code == Some(1002), "close 999 answered with {code:?}");

    // A batch with one malformed item: that item fails alone.
    let (status, body) = gw
        .post_raw(
            "/api/batch",
            json!({"items": [
                {"channel": "odd", "data": 1},
                {"channel": "odd"},
                {"user": "odd", "data": 2}
            ]})
            .to_string(),
            Some("application/json"),
            Some(harness::API_KEY),
        )
        .await?;
    ensure!(status.is_success(), "batch: {status} {body}");
    let results = body["results"].as_array().cloned().unwrap_or_default();
    ensure!(
        results.len() == 3
            && results[0]["seq"] == 1
            && results[1]["error"]["name"] == "bad_request"
            && results[2]["channel"] == "$user:odd",
        "batch results: {body}"
    );
    healthy(&gw).await
}

#[tokio::test]
async fn a_dribbled_api_body_gets_408_within_the_deadline() -> R {
    let gw = Gateway::builder()
        .env("request_head_timeout_ms", 600)
        .env("admin_addr", "127.0.0.1:0")
        .start()
        .await?;
    let mut tcp = TcpStream::connect(gw.addr).await?;
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{",
        harness::API_KEY
    );
    tcp.write_all(head.as_bytes()).await?;
    let t0 = Instant::now();
    let (mut rd, mut wr) = tcp.split();
    let dribble = async {
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if wr.write_all(b" ").await.is_err() {
                break;
            }
        }
    };
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut answer));
    let (_, read) = tokio::join!(dribble, read);
    read??;
    let answer = String::from_utf8_lossy(&answer);
    ensure!(
        answer.starts_with("HTTP/1.1 408"),
        "dribbled body: {answer:.200}"
    );
    ensure!(
        t0.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t0.elapsed()
    );
    healthy(&gw).await
}
