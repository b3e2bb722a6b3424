//! The client against a scripted WebSocket server (this process, loopback):
//! what the connection task does with frames a real gateway would not send.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use protocol::{ClientFrame, Codec};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::{Client, Event, Position};

const WAIT: Duration = Duration::from_secs(5);

fn mp_str(out: &mut Vec<u8>, s: &str) {
    out.push(0xa0 | s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// A `message` frame of `news` at `seq` (epoch `e`) that the client cannot
/// decode: JSON `data` 200 levels deep (serde_json stops at 128), MessagePack
/// `data` a map with an integer key (no JSON value has one).
fn undecodable(codec: Codec, seq: u8) -> WsMessage {
    match codec {
        Codec::Json => WsMessage::text(format!(
            r#"{{"type":"message","channel":"news","seq":{seq},"epoch":"e","data":{}0{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        )),
        Codec::MsgPack => {
            let mut b = vec![0x85];
            for (k, v) in [("type", "message"), ("channel", "news")] {
                mp_str(&mut b, k);
                mp_str(&mut b, v);
            }
            mp_str(&mut b, "seq");
            b.push(seq);
            mp_str(&mut b, "epoch");
            mp_str(&mut b, "e");
            mp_str(&mut b, "data");
            b.extend_from_slice(&[0x81, 0x01, 0xa1, b'x']); // {1: "x"}
            WsMessage::binary(b)
        }
    }
}

fn frame(codec: Codec, v: serde_json::Value) -> WsMessage {
    let bytes = codec.encode(&v);
    match codec {
        Codec::Json => WsMessage::text(String::from_utf8(bytes.to_vec()).expect("utf-8")),
        Codec::MsgPack => WsMessage::binary(bytes),
    }
}

#[allow(clippy::result_large_err)] // the signature of tungstenite's callback
fn echo_subprotocol(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    if let Some(p) = req.headers().get("sec-websocket-protocol") {
        resp.headers_mut()
            .insert("sec-websocket-protocol", p.clone());
    }
    Ok(resp)
}

/// Accepts one WebSocket, answers `connect` and `subscribe` (of `news`, at
/// seq 0 of epoch `e`), then sends message 1, an undecodable message 2 (twice:
/// the second is a duplicate), and message 3. Counts the connections.
async fn scripted_server(listener: TcpListener, codec: Codec) {
    let (tcp, _) = listener.accept().await.expect("accept");
    let mut ws = tokio_tungstenite::accept_hdr_async(tcp, echo_subprotocol)
        .await
        .expect("upgrade");
    while let Some(Ok(msg)) = ws.next().await {
        let decoded = match &msg {
            WsMessage::Text(t) => codec.decode_client(t.as_bytes()),
            WsMessage::Binary(b) => codec.decode_client(b),
            _ => continue,
        };
        let replies = match decoded.expect("a client frame") {
            ClientFrame::Connect(c) => vec![frame(
                codec,
                json!({"type": "connected", "id": c.id, "client": "c1", "user": "",
                       "ping_interval_ms": 25000, "node": "n1"}),
            )],
            ClientFrame::Subscribe(s) => vec![
                frame(
                    codec,
                    json!({"type": "subscribed", "id": s.id, "channel": "news", "epoch": "e", "seq": 0}),
                ),
                frame(
                    codec,
                    json!({"type": "message", "channel": "news", "seq": 1, "epoch": "e", "data": "one"}),
                ),
                undecodable(codec, 2),
                undecodable(codec, 2),
                frame(
                    codec,
                    json!({"type": "message", "channel": "news", "seq": 3, "epoch": "e", "data": "three"}),
                ),
            ],
            _ => vec![],
        };
        for r in replies {
            ws.send(r).await.expect("send");
        }
    }
}

#[tokio::test]
async fn a_message_that_does_not_decode_is_reported_and_skipped_without_reconnecting() {
    for codec in [Codec::Json, Codec::MsgPack] {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(scripted_server(listener, codec));
        let client = timeout(
            WAIT,
            Client::builder(format!("http://127.0.0.1:{port}"))
                .websocket(codec)
                .connect(),
        )
        .await
        .expect("in time")
        .expect("connects");
        let mut events = client.events();
        let mut sub = client.subscribe("news").await.expect("subscribes");

        let first = timeout(WAIT, sub.recv())
            .await
            .expect("in time")
            .expect("message 1");
        assert_eq!((first.seq, first.data), (1, json!("one")));
        let next = timeout(WAIT, sub.recv())
            .await
            .expect("in time")
            .expect("message 3");
        assert_eq!(
            (next.seq, next.data),
            (3, json!("three")),
            "{codec:?}: the message after the undecodable one is delivered, not a gap"
        );

        let reported = timeout(WAIT, async {
            loop {
                match events.recv().await.expect("events") {
                    e @ Event::UndecodableMessage { .. } => return e,
                    _ => continue,
                }
            }
        })
        .await
        .expect("an UndecodableMessage event");
        let Event::UndecodableMessage {
            channel,
            position,
            error,
        } = reported
        else {
            unreachable!()
        };
        assert_eq!(channel.as_deref(), Some("news"));
        assert_eq!(position, Some(Position::new(2, "e")));
        assert!(!error.is_empty());

        let stats = client.stats();
        assert_eq!(
            stats.undecodable, 1,
            "{codec:?}: reported once (the replay is a duplicate)"
        );
        assert_eq!(stats.duplicates, 1, "{codec:?}");
        assert_eq!(stats.delivered, 2, "{codec:?}");
        assert_eq!(
            (stats.gaps, stats.reconnects, stats.connects),
            (0, 0, 1),
            "{codec:?}"
        );
        assert_eq!(
            client.positions().await.expect("positions"),
            vec![("news".to_owned(), Position::new(3, "e"))]
        );
        client.close().await;
        server.abort();
    }
}
