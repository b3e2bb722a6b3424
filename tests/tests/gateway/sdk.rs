//! The Rust client SDK (`client_sdk`) against a real gateway process:
//! delivery over WebSocket (JSON, MessagePack) and SSE, reconnecting by
//! itself after the connection is lost (dropped TCP connection, slow-consumer
//! close 4001, token expiry 4005) with every message delivered once and in
//! order, token refresh through the provider, and terminal failures.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use client_sdk::{
    Backoff, Client, ClientBuilder, Codec, ConnectionState, Error, Event, PublishOptions,
    Subscription,
};
use harness::{now_secs, within, Gateway, TIMEOUT};
use protocol::{ErrorCode, Message};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::{check_message, payload, R};

/// A builder for `gw` with fast test backoff.
fn sdk(gw: &Gateway) -> ClientBuilder {
    Client::builder(gw.url("")).backoff(Backoff::new(
        Duration::from_millis(50),
        Duration::from_millis(500),
    ))
}

async fn recv(sub: &mut Subscription) -> anyhow::Result<Message> {
    within(&format!("a message of {:?}", sub.channel()), sub.recv())
        .await?
        .with_context(|| format!("the subscription to {:?} ended", sub.channel()))
}

/// Receives messages `first..=last` of `channel`, in order, each checked
/// against `data(seq)`; returns the epoch.
async fn expect_seqs(
    sub: &mut Subscription,
    channel: &str,
    first: u64,
    last: u64,
    data: impl Fn(u64) -> Value,
) -> anyhow::Result<String> {
    let mut epoch = String::new();
    for seq in first..=last {
        let m = recv(sub).await?;
        ensure!(
            m.channel == channel && m.seq == seq,
            "expected {channel}#{seq}, got {}#{} (after {} in order)",
            m.channel,
            m.seq,
            seq - first
        );
        if epoch.is_empty() {
            epoch = m.epoch.clone();
        }
        check_message(&m, channel, seq, &epoch, &data(seq));
    }
    Ok(epoch)
}

/// Waits for an event matching `pred` (skipping others).
async fn wait_event(
    events: &mut broadcast::Receiver<Event>,
    what: &str,
    pred: impl Fn(&Event) -> bool,
) -> anyhow::Result<Event> {
    within(what, async {
        loop {
            match events.recv().await {
                Ok(e) if pred(&e) => return Ok(e),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => bail!("event channel closed: {e}"),
            }
        }
    })
    .await?
}

fn is_closed_with(e: &Event, code: u16) -> bool {
    matches!(e, Event::State(ConnectionState::Closed { code: Some(c), terminal: false, .. }) if *c == code)
}

#[tokio::test]
async fn sdk_websocket_json_and_msgpack_deliver_in_order_and_publish() -> R {
    let gw = Gateway::start().await?;
    for (codec, chan) in [(Codec::Json, "sdk-json"), (Codec::MsgPack, "sdk-msgpack")] {
        let user = format!("u-{chan}");
        let token = gw.token(&user, &[chan, "other"], &[chan], 600);
        let client = within("connect", sdk(&gw).websocket(codec).token(token).connect()).await??;
        let ConnectionState::Connected {
            node,
            client: conn_id,
        } = client.state()
        else {
            bail!("not connected: {:?}", client.state());
        };
        ensure!(!node.is_empty() && !conn_id.is_empty());
        let mut sub = within("subscribe", client.subscribe(chan)).await??;
        let mut mine = client.user_stream();

        for i in 1..=50 {
            gw.publish(chan, payload(i)).await?;
        }
        let epoch = expect_seqs(&mut sub, chan, 1, 50, payload).await?;

        // Publishing through the client: the answer names the message's place.
        let at = within("publish", client.publish(chan, payload(51))).await??;
        assert_eq!((at.seq, at.epoch.as_str()), (51, epoch.as_str()));
        let own = recv(&mut sub).await?;
        check_message(&own, chan, 51, &epoch, &payload(51));
        let from = own.from.context("a client's message carries from")?;
        assert_eq!(
            (from.user.as_deref(), from.client.as_str()),
            (Some(user.as_str()), conn_id.as_str())
        );
        // With exclude_client the client's own copy is not sent, and the
        // stream moves past it with no gap: the next message follows.
        let options = PublishOptions {
            exclude_client: true,
        };
        let at = within(
            "publish excluded",
            client.publish_with(chan, json!("mine"), options),
        )
        .await??;
        assert_eq!(at.seq, 52);
        gw.publish(chan, payload(53)).await?;
        expect_seqs(&mut sub, chan, 53, 53, payload).await?;

        // The user's own stream.
        gw.send(&user, json!({"hello": codec == Codec::Json}))
            .await?;
        let m = recv(&mut mine).await?;
        assert_eq!(
            (m.channel.as_str(), m.seq),
            (format!("$user:{user}").as_str(), 1)
        );

        // Refusals are errors of the call, and the client stays usable.
        match within("subscribe", client.subscribe("secret")).await? {
            Err(Error::Server {
                code: ErrorCode::PermissionDenied,
                ..
            }) => {}
            other => bail!("expected permission_denied, got {other:?}"),
        }
        match within("publish", client.publish("other", json!(1))).await? {
            Err(Error::Server {
                code: ErrorCode::PermissionDenied,
                temporary: false,
                ..
            }) => {}
            other => bail!("expected permission_denied, got {other:?}"),
        }
        assert!(matches!(
            client.subscribe(chan).await,
            Err(Error::AlreadySubscribed(_))
        ));
        // Too large for the server: refused locally, the connection stays.
        match within("publish", client.publish(chan, json!("x".repeat(70_000)))).await? {
            Err(Error::Server {
                code: ErrorCode::TooLarge,
                ..
            }) => {}
            other => bail!("expected too_large, got {other:?}"),
        }
        assert!(matches!(client.state(), ConnectionState::Connected { .. }));

        // Unsubscribe ends the stream; nothing more arrives.
        within("unsubscribe", client.unsubscribe(chan)).await??;
        gw.publish(chan, payload(54)).await?;
        assert!(within("end of stream", sub.recv()).await?.is_none());

        let stats = client.stats();
        assert_eq!(
            (
                stats.delivered,
                stats.duplicates,
                stats.reconnects,
                stats.gaps
            ),
            (53, 0, 0, 0),
            "{stats:?}"
        );
        let positions = within("positions", client.positions()).await??;
        assert!(
            positions
                .iter()
                .any(|(c, p)| c == &format!("$user:{user}") && p.seq == 1),
            "{positions:?}"
        );

        within("close", client.close()).await?;
        assert!(matches!(
            client.state(),
            ConnectionState::Closed {
                code: Some(1000),
                terminal: true,
                ..
            }
        ));
        assert!(matches!(
            client.publish(chan, json!(1)).await,
            Err(Error::Closed { .. })
        ));
        assert!(within("user stream end", mine.recv()).await?.is_none());
    }
    Ok(())
}

#[tokio::test]
async fn sdk_sse_delivers_and_resumes_when_the_channel_set_changes() -> R {
    let gw = Gateway::start().await?;
    let token = gw.token("sse-user", &["feed", "feed2"], &[], 600);
    let client = sdk(&gw).sse().token(token).build()?;
    let mut mine = client.user_stream();
    let mut feed = within("subscribe", client.subscribe("feed")).await??;
    assert!(matches!(client.state(), ConnectionState::Connected { .. }));
    assert!(matches!(
        client.publish("feed", json!(1)).await,
        Err(Error::Unsupported(_))
    ));

    for i in 1..=20 {
        gw.publish("feed", payload(i)).await?;
    }
    gw.send("sse-user", json!("direct")).await?;
    expect_seqs(&mut feed, "feed", 1, 20, payload).await?;
    assert_eq!(recv(&mut mine).await?.data, json!("direct"));

    // Adding a channel reopens the stream; `feed` goes on from where it was,
    // with messages published meanwhile neither lost nor repeated.
    let publisher = async {
        for i in 21..=40 {
            gw.publish("feed", payload(i)).await?;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        anyhow::Ok(())
    };
    let (published, feed2) = tokio::join!(publisher, client.subscribe("feed2"));
    published?;
    let mut feed2 = feed2?;
    gw.publish("feed2", payload(1)).await?;
    gw.send("sse-user", json!("again")).await?;
    expect_seqs(&mut feed, "feed", 21, 40, payload).await?;
    expect_seqs(&mut feed2, "feed2", 1, 1, payload).await?;
    assert_eq!(recv(&mut mine).await?.data, json!("again"));

    // Removing one reopens it again; the other keeps its place.
    within("unsubscribe", client.unsubscribe("feed2")).await??;
    gw.publish("feed", payload(41)).await?;
    expect_seqs(&mut feed, "feed", 41, 41, payload).await?;

    let stats = client.stats();
    assert_eq!(
        (stats.duplicates, stats.unrecoverable, stats.gaps),
        (0, 0, 0),
        "{stats:?}"
    );
    assert!(stats.connects >= 3 && stats.resumes >= 2, "{stats:?}");
    Ok(())
}

/// Publishes 1..=n to `chan` at a steady pace while `disrupt` runs.
async fn publish_steadily(gw: &Gateway, chan: &str, n: u64) -> anyhow::Result<()> {
    for i in 1..=n {
        let r = gw.publish(chan, payload(i)).await?;
        ensure!(r.seq == i, "published as seq {} instead of {i}", r.seq);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    Ok(())
}

async fn survive_drops(gw: &Gateway, builder: ClientBuilder, chan: &str) -> R {
    let token = gw.token(&format!("drop-{chan}"), &[chan], &[], 600);
    let client = builder.token(token).build()?;
    let mut sub = within("subscribe", client.subscribe(chan)).await??;
    // After the first connection: each `Connected` below is a reconnection.
    let mut events = client.events();
    const N: u64 = 300;
    let disrupt = async {
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            client.debug_drop_connection();
            wait_event(&mut events, "a reconnection", |e| {
                matches!(e, Event::State(ConnectionState::Connected { .. }))
            })
            .await?;
        }
        anyhow::Ok(())
    };
    let receive = expect_seqs(&mut sub, chan, 1, N, payload);
    let (p, d, r) = tokio::join!(publish_steadily(gw, chan, N), disrupt, receive);
    p?;
    d?;
    r?;
    let stats = client.stats();
    ensure!(
        stats.reconnects >= 3 && stats.connects >= 4,
        "{chan}: {stats:?}"
    );
    ensure!(
        stats.resumes >= 3,
        "{chan}: every reconnect resumes: {stats:?}"
    );
    ensure!(
        (stats.unrecoverable, stats.gaps, stats.delivered) == (0, 0, N),
        "{chan}: {stats:?}"
    );
    // Nothing more (no late duplicate).
    ensure!(
        tokio::time::timeout(Duration::from_millis(200), sub.recv())
            .await
            .is_err(),
        "{chan}: a message after the last one"
    );
    client.close().await;
    Ok(())
}

#[tokio::test]
async fn sdk_reconnects_after_dropped_connections_and_delivers_everything_once() -> R {
    let gw = Gateway::start().await?;
    let (a, b, c) = tokio::join!(
        survive_drops(&gw, sdk(&gw).websocket(Codec::Json), "drops-json"),
        survive_drops(&gw, sdk(&gw).websocket(Codec::MsgPack), "drops-msgpack"),
        survive_drops(&gw, sdk(&gw).sse(), "drops-sse"),
    );
    a?;
    b?;
    c?;
    Ok(())
}

fn big(i: u64) -> Value {
    // ~3.3 KB: the 4 KiB server queue holds one.
    json!({"i": i, "pad": "x".repeat(3200)})
}

#[tokio::test]
async fn sdk_resumes_after_a_slow_consumer_close_without_loss() -> R {
    let gw = Gateway::builder()
        .env("max_queue_bytes", 4096)
        .env("max_frame_bytes", 1024)
        .env("replay_max_messages", 100_000)
        .start()
        .await?;
    let chan = "firehose";
    let token = gw.token("slow", &[chan], &[], 600);
    // Small buffers everywhere, and the test does not read for a while: the
    // client stops reading its socket and the server cuts it (4001).
    let client = sdk(&gw)
        .token(token)
        .tcp_recv_buffer(4096)
        .subscription_buffer(1)
        .build()?;
    let mut events = client.events();
    let mut sub = within("subscribe", client.subscribe(chan)).await??;

    let deadline = Instant::now() + TIMEOUT;
    let mut published = 0u64;
    while gw.metric("gateway_slow_consumer_disconnects_total").await? == 0.0 {
        ensure!(
            Instant::now() < deadline,
            "no slow-consumer close after {published} messages"
        );
        for _ in 0..20 {
            published += 1;
            gw.publish(chan, big(published)).await?;
        }
    }
    for _ in 0..10 {
        published += 1;
        gw.publish(chan, big(published)).await?;
    }
    expect_seqs(&mut sub, chan, 1, published, big).await?;
    wait_event(&mut events, "close 4001", |e| {
        is_closed_with(e, 4001)
            || matches!(
                e,
                Event::State(ConnectionState::Closed {
                    code: None,
                    terminal: false,
                    ..
                })
            )
    })
    .await?;
    let stats = client.stats();
    ensure!(stats.reconnects >= 1 && stats.resumes >= 1, "{stats:?}");
    ensure!(
        (stats.unrecoverable, stats.delivered) == (0, published),
        "{stats:?}"
    );
    Ok(())
}

#[tokio::test]
async fn sdk_token_refresh_through_the_provider_and_fresh_token_after_4005() -> R {
    let gw = Gateway::builder()
        .env("refresh_window_ms", 2000)
        .start()
        .await?;
    let gw = &gw;

    // refresh_required -> provider -> refresh: the connection stays past the
    // first token's expiry.
    let refreshed = async {
        let calls = Arc::new(AtomicU32::new(0));
        let provider = {
            let (calls, gw_tokens) = (
                calls.clone(),
                (
                    gw.token("r1", &["r"], &[], 3),
                    gw.token("r1", &["r"], &[], 60),
                ),
            );
            move || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                let token = if n == 0 {
                    gw_tokens.0.clone()
                } else {
                    gw_tokens.1.clone()
                };
                async move { Ok::<_, std::io::Error>(token) }
            }
        };
        let client = within("connect", sdk(gw).token_provider(provider).connect()).await??;
        let started = now_secs();
        let mut events = client.events();
        let mut sub = within("subscribe", client.subscribe("r")).await??;
        wait_event(&mut events, "refreshed", |e| {
            matches!(e, Event::TokenRefreshed { .. })
        })
        .await?;
        // Past the first token's expiry (3 s), still the same connection.
        tokio::time::sleep(Duration::from_secs(
            (started + 4).saturating_sub(now_secs()),
        ))
        .await;
        gw.publish("r", payload(1)).await?;
        expect_seqs(&mut sub, "r", 1, 1, payload).await?;
        let stats = client.stats();
        ensure!((stats.connects, stats.reconnects) == (1, 0), "{stats:?}");
        ensure!(
            calls.load(Ordering::SeqCst) == 2,
            "provider called {} times",
            calls.load(Ordering::SeqCst)
        );
        anyhow::Ok(())
    };

    // The refreshed token is refused: the server closes with 4005 at the
    // expiry, and the client reconnects with a fresh token and resumes.
    let expired = async {
        let calls = Arc::new(AtomicU32::new(0));
        let provider = {
            let calls = calls.clone();
            let (first, fresh) = (
                gw.token("r2", &["r2"], &[], 3),
                gw.token("r2", &["r2"], &[], 60),
            );
            move || {
                let token = match calls.fetch_add(1, Ordering::SeqCst) {
                    0 => first.clone(),
                    1 => "not-a-token".to_owned(),
                    _ => fresh.clone(),
                };
                async move { Ok::<_, std::io::Error>(token) }
            }
        };
        let client = within(
            "connect",
            sdk(gw)
                .websocket(Codec::MsgPack)
                .token_provider(provider)
                .connect(),
        )
        .await??;
        let mut events = client.events();
        let mut sub = within("subscribe", client.subscribe("r2")).await??;
        let publisher = async {
            for i in 1..=40 {
                gw.publish("r2", payload(i)).await?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok(())
        };
        let watch = async {
            wait_event(&mut events, "refused refresh", |e| {
                matches!(e, Event::TokenError { .. })
            })
            .await?;
            within(
                "close 4005",
                wait_event(&mut events, "close 4005", |e| is_closed_with(e, 4005)),
            )
            .await??;
            wait_event(&mut events, "reconnected", |e| {
                matches!(e, Event::State(ConnectionState::Connected { .. }))
            })
            .await
        };
        let (p, w, r) = tokio::join!(
            publisher,
            watch,
            expect_seqs(&mut sub, "r2", 1, 40, payload)
        );
        p?;
        w?;
        r?;
        let stats = client.stats();
        ensure!(
            stats.connects == 2 && stats.resumes >= 1 && stats.unrecoverable == 0,
            "{stats:?}"
        );
        ensure!(
            calls.load(Ordering::SeqCst) == 3,
            "provider called {} times",
            calls.load(Ordering::SeqCst)
        );
        anyhow::Ok(())
    };

    // A fixed token cannot be renewed: at its expiry the client stops.
    let fixed = async {
        let client = within(
            "connect",
            sdk(gw).token(gw.token("r3", &[], &[], 2)).connect(),
        )
        .await??;
        let mut state = client.state_watch();
        within_for_state(&mut state, |s| {
            matches!(s, ConnectionState::Closed { terminal: true, .. })
        })
        .await?;
        let ConnectionState::Closed { code, .. } = client.state() else {
            unreachable!()
        };
        ensure!(code == Some(4005), "{:?}", client.state());
        anyhow::Ok(())
    };

    let (a, b, c) = tokio::join!(refreshed, expired, fixed);
    a?;
    b?;
    c?;
    Ok(())
}

async fn within_for_state(
    rx: &mut tokio::sync::watch::Receiver<ConnectionState>,
    pred: impl Fn(&ConnectionState) -> bool,
) -> anyhow::Result<()> {
    within("a connection state", rx.wait_for(|s| pred(s)))
        .await?
        .context("state channel closed")?;
    Ok(())
}

#[tokio::test]
async fn sdk_stops_on_a_refused_token() -> R {
    let gw = Gateway::start().await?;

    // WebSocket: error 101, close 4500 -> terminal.
    let err = within("connect", sdk(&gw).token("garbage").connect())
        .await?
        .expect_err("a bad token connects");
    match &err {
        Error::Closed {
            code: Some(4500), ..
        } => {}
        other => bail!("expected close 4500, got {other:?}"),
    }
    // An expired token with no provider: 102 + 4005 -> terminal as well.
    let expired = gw.token("old", &[], &[], -10);
    let err = within(
        "connect",
        sdk(&gw).websocket(Codec::MsgPack).token(expired).connect(),
    )
    .await?
    .expect_err("expired");
    assert!(
        matches!(
            err,
            Error::Closed {
                code: Some(4005),
                ..
            }
        ),
        "{err:?}"
    );

    // SSE: HTTP 401 -> terminal; the subscribe call reports it.
    let client = sdk(&gw).sse().token("garbage").build()?;
    match within("subscribe", client.subscribe("news")).await? {
        Err(Error::Closed { reason, .. }) if reason.contains("401") => {}
        other => bail!("expected a terminal 401, got {other:?}"),
    }
    assert!(matches!(
        client.state(),
        ConnectionState::Closed { terminal: true, .. }
    ));
    let stats = client.stats();
    assert_eq!(stats.reconnects, 0, "{stats:?}");
    Ok(())
}

/// A TCP forwarder standing in for a balancer: new connections go to the
/// current upstream, which the test switches; existing ones can be made
/// silent (bytes swallowed, sockets left open), like a dead network path.
struct Proxy {
    addr: std::net::SocketAddr,
    upstream: Arc<std::sync::Mutex<std::net::SocketAddr>>,
    /// Connections accepted before this generation forward nothing.
    stall: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    born: u64,
    stall: Arc<std::sync::atomic::AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if stall.load(Ordering::SeqCst) > born {
            // Silent from now on, and never closed.
            let _keep = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Proxy {
    async fn start(upstream: std::net::SocketAddr) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let upstream = Arc::new(std::sync::Mutex::new(upstream));
        let stall = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (current, stall_gen) = (upstream.clone(), stall.clone());
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let target = *current.lock().expect("proxy upstream lock");
                let born = stall_gen.load(Ordering::SeqCst);
                let stall = stall_gen.clone();
                tokio::spawn(async move {
                    if let Ok(outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
                        let (ir, iw) = inbound.into_split();
                        let (or, ow) = outbound.into_split();
                        tokio::join!(pump(ir, ow, born, stall.clone()), pump(or, iw, born, stall));
                    }
                });
            }
        });
        Ok(Self {
            addr,
            upstream,
            stall,
            task,
        })
    }

    fn route_to(&self, upstream: std::net::SocketAddr) {
        *self.upstream.lock().expect("proxy upstream lock") = upstream;
    }

    /// Every connection open now goes silent.
    fn stall_existing(&self) {
        self.stall.fetch_add(1, Ordering::SeqCst);
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until `events` showed a connection to `node` and an unrecoverable
/// notice for `channel`; returns every event seen.
async fn until_moved_to(
    events: &mut broadcast::Receiver<Event>,
    node: &str,
    channel: &str,
) -> anyhow::Result<Vec<Event>> {
    let mut seen = Vec::new();
    let (mut connected, mut notified) = (false, false);
    within(&format!("a connection to {node}"), async {
        loop {
            match events.recv().await {
                Ok(e) => {
                    connected |= matches!(&e, Event::State(ConnectionState::Connected { node: n, .. }) if n == node);
                    notified |= connected && matches!(&e, Event::Unrecoverable { channel: c, .. } if c == channel);
                    seen.push(e);
                    if connected && notified {
                        return Ok(());
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => bail!("event channel closed: {e}"),
            }
        }
    })
    .await??;
    Ok(seen)
}

#[tokio::test]
async fn sdk_follows_a_drain_to_another_node_with_its_resume_token() -> R {
    let a = Gateway::builder()
        .env("node_id", "gw-a")
        .env("GATEWAY_DRAIN_PRESTOP_DELAY_MS", 100)
        .env("GATEWAY_DRAIN_BATCH_INTERVAL_MS", 100)
        .env("GATEWAY_DRAIN_BATCH_FRACTION", 1.0)
        .env("GATEWAY_RECONNECT_MIN_DELAY_MS", 50)
        .env("GATEWAY_RECONNECT_MAX_DELAY_MS", 300)
        .env("GATEWAY_DRAIN_TIMEOUT_MS", 20_000)
        .start()
        .await?;
    let mut a = a;
    let b = Gateway::builder().env("node_id", "gw-b").start().await?;
    let proxy = Proxy::start(a.addr).await?;
    let url = proxy.url();
    let backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));

    let ws = Client::builder(&url)
        .backoff(backoff)
        .token(a.token("d-ws", &["news"], &[], 600))
        .build()?;
    let sse = Client::builder(&url)
        .backoff(backoff)
        .sse()
        .token(a.token("d-sse", &["news"], &[], 600))
        .build()?;
    let (mut ws_events, mut sse_events) = (ws.events(), sse.events());
    let mut ws_news = within("subscribe", ws.subscribe("news")).await??;
    let mut sse_news = within("subscribe", sse.subscribe("news")).await??;
    for c in [&ws, &sse] {
        assert!(
            matches!(c.state(), ConnectionState::Connected { node, .. } if node == "gw-a"),
            "{:?}",
            c.state()
        );
    }
    for i in 1..=3 {
        a.publish("news", payload(i)).await?;
    }
    expect_seqs(&mut ws_news, "news", 1, 3, payload).await?;
    expect_seqs(&mut sse_news, "news", 1, 3, payload).await?;

    // The balancer stops routing to A; A drains.
    proxy.route_to(b.addr);
    let res = a
        .http
        .post(a.url("/admin/drain"))
        .bearer_auth(harness::API_KEY)
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 202);

    for (name, events) in [("ws", &mut ws_events), ("sse", &mut sse_events)] {
        let seen = until_moved_to(events, "gw-b", "news")
            .await
            .with_context(|| name.to_owned())?;
        // Waited in the server's jitter window, not the backoff.
        let delays: Vec<Duration> = seen
            .iter()
            .filter_map(|e| match e {
                Event::State(ConnectionState::Reconnecting { delay, .. }) => Some(*delay),
                _ => None,
            })
            .collect();
        ensure!(
            delays.len() == 1
                && delays[0] >= Duration::from_millis(50)
                && delays[0] <= Duration::from_millis(300),
            "{name}: reconnect delays {delays:?}"
        );
        // B is another single node (its own memory store): the positions A
        // had are of another epoch, which the client is told.
        let lost: Vec<&str> = seen
            .iter()
            .filter_map(|e| match e {
                Event::Unrecoverable {
                    channel,
                    reason: protocol::UnrecoverableReason::EpochChanged,
                    ..
                } => Some(channel.as_str()),
                _ => None,
            })
            .collect();
        ensure!(
            lost.contains(&"news"),
            "{name}: unrecoverable notices {lost:?} in {seen:?}"
        );
        ensure!(
            !seen.iter().any(|e| matches!(
                e,
                Event::SubscriptionFailed { .. } | Event::ServerError { .. }
            )),
            "{name}: {seen:?}"
        );
    }
    // Delivery goes on from B.
    for i in 1..=3 {
        b.publish("news", payload(i)).await?;
    }
    expect_seqs(&mut ws_news, "news", 1, 3, payload).await?;
    expect_seqs(&mut sse_news, "news", 1, 3, payload).await?;
    // The WebSocket client presented A's resume token: B restored `news`
    // itself and the client did not subscribe it again (which B would have
    // refused as already subscribed).
    assert_eq!(b.metric("gateway_frames_rejected_total").await?, 0.0);
    let stats = ws.stats();
    assert_eq!(
        (stats.reconnects, stats.connects, stats.duplicates),
        (1, 2, 0),
        "{stats:?}"
    );
    let status = a.wait_exit(Duration::from_secs(15)).await?;
    assert!(status.success(), "drained gateway exits 0, got {status}");
    Ok(())
}

#[tokio::test]
async fn sdk_answers_pings_and_gives_up_a_silent_connection() -> R {
    let gw = Gateway::builder()
        .env("ping_interval_ms", 200)
        .env("idle_timeout_ms", 600)
        .env("sse_keepalive_ms", 200)
        .start()
        .await?;
    let proxy = Proxy::start(gw.addr).await?;
    let backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
    let token = gw.token("hb", &["hb"], &[], 600);
    let ws = within(
        "connect",
        Client::builder(proxy.url())
            .backoff(backoff)
            .token(&token)
            .connect(),
    )
    .await??;
    let sse = Client::builder(proxy.url())
        .backoff(backoff)
        .sse()
        .token(&token)
        .build()?;
    let (mut ws_events, mut sse_events) = (ws.events(), sse.events());
    let mut ws_hb = within("subscribe", ws.subscribe("hb")).await??;
    let mut sse_hb = within("subscribe", sse.subscribe("hb")).await??;

    // Answering the server's pings keeps the connection well past the
    // server's idle timeout (600 ms).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gw.publish("hb", payload(1)).await?;
    expect_seqs(&mut ws_hb, "hb", 1, 1, payload).await?;
    expect_seqs(&mut sse_hb, "hb", 1, 1, payload).await?;
    for c in [&ws, &sse] {
        let stats = c.stats();
        ensure!((stats.connects, stats.reconnects) == (1, 0), "{stats:?}");
    }

    // The path goes silent (no FIN, no RST): after 2.5 x 200 ms without a
    // byte the client gives the connection up, reconnects and resumes.
    proxy.stall_existing();
    let stalled = Instant::now();
    for i in 2..=5 {
        gw.publish("hb", payload(i)).await?;
    }
    for (name, events) in [("ws", &mut ws_events), ("sse", &mut sse_events)] {
        wait_event(events, "presumed dead", |e| {
            matches!(e, Event::State(ConnectionState::Closed { reason, .. }) if reason.contains("presumed dead"))
        })
        .await
        .with_context(|| name.to_owned())?;
        let after = stalled.elapsed();
        ensure!(
            after >= Duration::from_millis(450),
            "{name}: gave up after {after:?}"
        );
    }
    expect_seqs(&mut ws_hb, "hb", 2, 5, payload).await?;
    expect_seqs(&mut sse_hb, "hb", 2, 5, payload).await?;
    for c in [&ws, &sse] {
        let stats = c.stats();
        ensure!(
            (stats.connects, stats.duplicates, stats.unrecoverable) == (2, 0, 0),
            "{stats:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn sdk_waits_at_least_retry_after_when_the_node_refuses_sessions() -> R {
    // One session at a time: the others are refused (WebSocket: 503 with
    // Retry-After: 1; SSE: a stream with only `retry:` in 500..=1500 ms).
    let gw = Gateway::builder()
        .env("max_connections", 1)
        .env("admission_retry_ms", 1000)
        .start()
        .await?;
    let token = gw.token("adm", &["adm"], &[], 600);

    for (name, builder) in [
        ("ws", sdk(&gw).websocket(Codec::MsgPack)),
        ("sse", sdk(&gw).sse()),
    ] {
        let holder = within("connect", sdk(&gw).token(&token).connect()).await??;
        let client = builder.token(&token).build()?;
        let mut events = client.events();
        let subscribing = {
            let client = client.clone();
            tokio::spawn(async move { client.subscribe("adm").await })
        };
        let e = wait_event(&mut events, "a reconnect delay", |e| {
            matches!(e, Event::State(ConnectionState::Reconnecting { .. }))
        })
        .await
        .with_context(|| name.to_owned())?;
        let Event::State(ConnectionState::Reconnecting { delay, .. }) = e else {
            unreachable!()
        };
        let floor = if name == "ws" {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(500)
        };
        ensure!(
            delay >= floor,
            "{name}: retried after {delay:?}, the server asked for at least {floor:?}"
        );
        ensure!(client.stats().connects == 0, "{name}");
        // Room again: the client gets in by itself.
        holder.close().await;
        let mut sub = within("subscribe", subscribing).await???;
        gw.publish("adm", json!(name)).await?;
        ensure!(recv(&mut sub).await?.data == json!(name), "{name}");
        client.close().await;
        drop(sub);
        // The gateway counts the session closed once it sees the close.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// The SDK takes the frame limit the server advertises in `connected`: a
/// publish over it is refused locally (the server would close the
/// connection for good, 4502), one under it goes through.
#[tokio::test]
async fn sdk_adopts_the_servers_advertised_frame_limit() -> R {
    let gw = Gateway::builder()
        .env("max_frame_bytes", 1024)
        .start()
        .await?;
    let chan = "limits";
    let token = gw.token("limited", &[chan], &[chan], 600);
    // The SDK's own default (65,536) is far above the server's limit.
    let client = within("connect", sdk(&gw).token(token).connect()).await??;
    match within("publish", client.publish(chan, json!("x".repeat(2_000)))).await? {
        Err(Error::Server {
            code: ErrorCode::TooLarge,
            temporary: false,
            ..
        }) => {}
        other => bail!("expected a local too_large, got {other:?}"),
    }
    assert!(matches!(client.state(), ConnectionState::Connected { .. }));
    let pos = within("publish", client.publish(chan, json!("x".repeat(500)))).await??;
    assert_eq!(pos.seq, 1, "only the small publish reached the server");
    assert_eq!(client.stats().connects, 1, "the connection was never cut");
    Ok(())
}
