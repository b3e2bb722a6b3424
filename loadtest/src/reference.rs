//! `loadtest reference`: the thinnest fan-out server we can write, the
//! yardstick the gateway's CPU per delivery, tail latency and memory are
//! held against (issue 16, BENCHMARKS.md "Against the reference server").
//!
//! It speaks just enough of the gateway's protocol for `loadtest fanout` and
//! `loadtest idle` to drive it unchanged, and nothing else: no auth, no
//! replay, no limits, no heartbeats, no backpressure.
//!
//! * `GET /ws`: the upgrade, then `connect` is answered `connected` and
//!   `subscribe` `subscribed` (with the channel's seq); WebSocket pings are
//!   answered; every other frame is ignored.
//! * `GET /sse?channel=..`: a `text/event-stream` with a `connected` event
//!   whose id is a cursor `v1.00000000.ref-<seq>` per channel, then one
//!   `id:`/`data:` event per message.
//! * `POST /api/publish` `{"channel","data"}` (HTTP/1.1 keep-alive): the
//!   message is encoded once per transport (a WebSocket frame and an SSE
//!   event, shared by reference count), queued to every subscriber, and
//!   answered `{"seq":N}`.
//!
//! Each connection has one unbounded queue of shared frames and a writer
//! task that takes everything queued and writes it with one `write` (the
//! "one write per drained queue" of the issue's reference).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use clap::Args;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

#[derive(Debug, Args)]
pub struct ReferenceArgs {
    /// Address to listen on (port 0: any free port; the address is printed
    /// as `listening on http://...`, like the gateway).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub addr: SocketAddr,
    /// Runtime worker threads (default: `GATEWAY_WORKER_THREADS`, else one
    /// per CPU, as the gateway).
    #[arg(long)]
    pub threads: Option<usize>,
}

type Queue = mpsc::UnboundedSender<Bytes>;

/// Largest publish body read (a benchmark's messages are far smaller).
const MAX_BODY: usize = 1 << 20;

#[derive(Default)]
struct Channel {
    seq: u64,
    ws: Vec<Queue>,
    sse: Vec<Queue>,
}

#[derive(Default)]
struct State {
    channels: Mutex<HashMap<String, Channel>>,
}

/// The `reference` subcommand: serves until killed.
pub async fn reference(args: ReferenceArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    let state = Arc::new(State::default());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => {
                // Out of descriptors and the like: try again shortly.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let _ = serve(stream, state).await;
        });
    }
}

/// A parsed request head: method, target, the headers we use, and the
/// bytes read past it.
struct Head {
    method: String,
    path: String,
    ws_key: Option<String>,
    content_length: usize,
    rest: BytesMut,
}

async fn read_head(stream: &mut TcpStream, mut buf: BytesMut) -> anyhow::Result<Option<Head>> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        if let httparse::Status::Complete(n) = req.parse(&buf)? {
            let header = |name: &str| {
                req.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).into_owned())
            };
            let head = Head {
                method: req.method.unwrap_or("").to_owned(),
                path: req.path.unwrap_or("").to_owned(),
                ws_key: header("sec-websocket-key"),
                content_length: header("content-length")
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0),
                rest: buf.split_off(n),
            };
            return Ok(Some(head));
        }
        if buf.len() > 16 * 1024 {
            bail!("request head over 16 KiB");
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(None);
        }
    }
}

async fn serve(mut stream: TcpStream, state: Arc<State>) -> anyhow::Result<()> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let Some(head) = read_head(&mut stream, buf).await? else {
            return Ok(());
        };
        let route = head.path.split('?').next().unwrap_or("");
        match (head.method.as_str(), route) {
            ("GET", "/ws") => return websocket(stream, head, state).await,
            ("GET", "/sse") => return sse(stream, head, state).await,
            ("POST", "/api/publish") => {
                if head.content_length > MAX_BODY {
                    stream
                        .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await?;
                    return Ok(());
                }
                let mut body = head.rest;
                while body.len() < head.content_length {
                    if stream.read_buf(&mut body).await? == 0 {
                        return Ok(());
                    }
                }
                let rest = body.split_off(head.content_length);
                let answer = match publish(&state, &body) {
                    Ok(seq) => format!(r#"{{"seq":{seq}}}"#),
                    Err(e) => format!(r#"{{"error":{:?}}}"#, e.to_string()),
                };
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                    answer.len()
                );
                stream.write_all(reply.as_bytes()).await?;
                buf = rest;
            }
            _ => {
                stream
                    .write_all(
                        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    )
                    .await?;
                return Ok(());
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct PublishBody<'a> {
    #[serde(borrow)]
    channel: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    data: &'a serde_json::value::RawValue,
}

/// Encodes the message once per transport and queues it to every
/// subscriber of its channel; returns its seq.
fn publish(state: &State, body: &[u8]) -> anyhow::Result<u64> {
    let p: PublishBody<'_> = serde_json::from_slice(body).context("body")?;
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let mut channels = state.channels.lock();
    let ch = channels.entry(p.channel.to_string()).or_default();
    ch.seq += 1;
    let json = format!(
        r#"{{"type":"message","channel":{},"seq":{},"epoch":"ref","data":{},"ts":{ts}}}"#,
        serde_json::to_string(&p.channel)?,
        ch.seq,
        p.data.get()
    );
    if !ch.ws.is_empty() {
        let frame = ws_frame(1, json.as_bytes());
        ch.ws.retain(|q| q.send(frame.clone()).is_ok());
    }
    if !ch.sse.is_empty() {
        let event = Bytes::from(format!("id: v1.00000000.ref-{}\ndata: {json}\n\n", ch.seq));
        ch.sse.retain(|q| q.send(event.clone()).is_ok());
    }
    Ok(ch.seq)
}

/// An unmasked (server) WebSocket frame.
fn ws_frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut f = BytesMut::with_capacity(payload.len() + 10);
    f.extend_from_slice(&[0x80 | opcode]);
    match payload.len() {
        n if n < 126 => f.extend_from_slice(&[n as u8]),
        n if n <= 0xffff => {
            f.extend_from_slice(&[126]);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.extend_from_slice(&[127]);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f.freeze()
}

/// Takes everything queued and writes it with one `write_all`.
async fn writer(mut out: tokio::net::tcp::OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Bytes>) {
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        let res = match rx.try_recv() {
            Err(_) => out.write_all(&first).await,
            Ok(second) => {
                batch.clear();
                batch.extend_from_slice(&first);
                batch.extend_from_slice(&second);
                while let Ok(more) = rx.try_recv() {
                    batch.extend_from_slice(&more);
                }
                out.write_all(&batch).await
            }
        };
        if res.is_err() {
            return;
        }
    }
}

/// A client (masked) frame at the start of `buf`: opcode, unmasked payload,
/// total length; `None` if incomplete.
fn client_frame(buf: &[u8]) -> anyhow::Result<Option<(u8, Vec<u8>, usize)>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let opcode = buf[0] & 0x0f;
    if buf[1] & 0x80 == 0 {
        bail!("unmasked client frame");
    }
    let (hdr, len) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (4, u16::from_be_bytes([buf[2], buf[3]]) as usize),
        127 => bail!("frame too long"),
        126 => return Ok(None),
        n => (2, n as usize),
    };
    if buf.len() < hdr + 4 + len {
        return Ok(None);
    }
    let mask = [buf[hdr], buf[hdr + 1], buf[hdr + 2], buf[hdr + 3]];
    let payload = buf[hdr + 4..hdr + 4 + len]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect();
    Ok(Some((opcode, payload, hdr + 4 + len)))
}

/// The value of a JSON string field in a small frame.
fn field<'a>(frame: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    frame.get(key).and_then(|v| v.as_str())
}

async fn websocket(mut stream: TcpStream, head: Head, state: Arc<State>) -> anyhow::Result<()> {
    let key = head.ws_key.context("no Sec-WebSocket-Key")?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    stream
        .write_all(
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
    let (mut read, write) = stream.into_split();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(writer(write, rx));
    let mut buf = head.rest;
    loop {
        while let Some((opcode, payload, len)) = client_frame(&buf)? {
            let _ = buf.split_to(len);
            match opcode {
                1 => ws_command(&state, &tx, &payload),
                8 => return Ok(()),
                9 => {
                    let _ = tx.send(ws_frame(10, &payload));
                }
                _ => {}
            }
        }
        if read_more(&mut read, &mut buf).await? == 0 {
            return Ok(());
        }
    }
}

async fn read_more(read: &mut OwnedReadHalf, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < 256 {
        buf.reserve(1024);
    }
    read.read_buf(buf).await
}

/// Answers `connect` and `subscribe`; ignores everything else.
fn ws_command(state: &State, tx: &Queue, payload: &[u8]) {
    let Ok(frame) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return;
    };
    let id = frame.get("id").and_then(|v| v.as_u64()).unwrap_or(0);
    let answer = match field(&frame, "type") {
        Some("connect") => format!(r#"{{"type":"connected","id":{id},"client":"ref"}}"#),
        Some("subscribe") => {
            let Some(name) = field(&frame, "channel") else {
                return;
            };
            // Under the channel's lock: the answer is queued before any
            // message after `seq`.
            let mut channels = state.channels.lock();
            let ch = channels.entry(name.to_owned()).or_default();
            let answer = format!(
                r#"{{"type":"subscribed","id":{id},"channel":{},"seq":{},"epoch":"ref"}}"#,
                serde_json::Value::from(name),
                ch.seq
            );
            let _ = tx.send(ws_frame(1, answer.as_bytes()));
            ch.ws.push(tx.clone());
            return;
        }
        _ => return,
    };
    let _ = tx.send(ws_frame(1, answer.as_bytes()));
}

async fn sse(stream: TcpStream, head: Head, state: Arc<State>) -> anyhow::Result<()> {
    let names: Vec<String> = head
        .path
        .split_once('?')
        .map(|(_, q)| q)
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.strip_prefix("channel="))
        .map(str::to_owned)
        .collect();
    let (mut read, write) = stream.into_split();
    let (tx, rx) = mpsc::unbounded_channel();
    {
        let mut channels = state.channels.lock();
        let mut cursor = String::from("v1.00000000");
        for name in &names {
            let ch = channels.entry(name.clone()).or_default();
            cursor.push_str(&format!(".ref-{}", ch.seq));
        }
        let start = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n\
             retry: 2000\n\nevent: connected\nid: {cursor}\ndata: {{\"type\":\"connected\",\"client\":\"ref\"}}\n\n"
        );
        let _ = tx.send(Bytes::from(start));
        for name in &names {
            if let Some(ch) = channels.get_mut(name) {
                ch.sse.push(tx.clone());
            }
        }
    }
    drop(tx);
    let w = tokio::spawn(writer(write, rx));
    // Nothing comes from an SSE client; its end ends the stream.
    let mut sink = [0u8; 64];
    while read.read(&mut sink).await? > 0 {}
    w.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_is_encoded_once_per_transport_and_queued_in_order() {
        let state = State::default();
        let (ws_tx, mut ws_rx) = mpsc::unbounded_channel();
        let (sse_tx, mut sse_rx) = mpsc::unbounded_channel();
        ws_command(
            &state,
            &ws_tx,
            br#"{"type":"subscribe","id":2,"channel":"c"}"#,
        );
        state.channels.lock().get_mut("c").unwrap().sse.push(sse_tx);
        assert_eq!(
            publish(&state, br#"{"channel":"c","data":{"n":1}}"#).unwrap(),
            1
        );
        assert_eq!(
            publish(&state, br#"{"channel":"c","data":[2]}"#).unwrap(),
            2
        );
        let subscribed = ws_rx.try_recv().unwrap();
        assert!(subscribed.ends_with(br#""seq":0,"epoch":"ref"}"#));
        let m1 = ws_rx.try_recv().unwrap();
        assert_eq!(m1[0], 0x81);
        let body = std::str::from_utf8(&m1[2..]).unwrap();
        assert!(body.starts_with(
            r#"{"type":"message","channel":"c","seq":1,"epoch":"ref","data":{"n":1},"ts":"#
        ));
        assert!(ws_rx
            .try_recv()
            .unwrap()
            .windows(8)
            .any(|w| w == br#""seq":2,"#));
        let e1 = sse_rx.try_recv().unwrap();
        assert!(e1.starts_with(b"id: v1.00000000.ref-1\ndata: {\"type\":\"message\""));
        assert!(e1.ends_with(b"}\n\n"));
        assert!(publish(&state, b"{").is_err());
    }

    #[test]
    fn client_frames_are_unmasked() {
        let f = crate::rawws::client_frame(1, b"hello");
        let (op, payload, len) = client_frame(&f).unwrap().unwrap();
        assert_eq!((op, payload.as_slice(), len), (1, &b"hello"[..], f.len()));
        assert!(client_frame(&f[..f.len() - 1]).unwrap().is_none());
    }
}
