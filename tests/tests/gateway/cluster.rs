//! Cluster mode: real redis-server, nats-server, several gateway nodes (and
//! HAProxy) on loopback; see `harness::cluster`. Every test asserts message by
//! message: per channel, sequences contiguous, data intact, exactly once.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use futures_util::future::try_join_all;
use harness::cluster::{msgs, post_api, sse_at, Backbone, Cluster, Got, Rx};
use harness::failover::{RedisAuth, ServerAuth};
use harness::{within, Gateway, Incoming, PublishResult, SseClient, TempDir, WsClient, TIMEOUT};
use protocol::{
    ClientFrame, Codec, Position, ServerFrame, SseCursor, Subscribe, Subscribed,
    UnrecoverableReason,
};
use reqwest::StatusCode;
use serde_json::{json, Value};

use super::{payload, pos, R};

type Items = BTreeMap<String, Vec<Got>>;

/// `got` must equal `want` item by item (the first difference is reported).
fn same(what: &str, got: &[Got], want: &[Got]) -> R {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        ensure!(
            g == w,
            "{what}: item {i} differs\n  got:  {g:?}\n  want: {w:?}"
        );
    }
    ensure!(
        got.len() == want.len(),
        "{what}: {} items, want {}\n  got:  {got:?}\n  want: {want:?}",
        got.len(),
        want.len()
    );
    Ok(())
}

/// Every channel of `got` is in `want` and equal to it, and vice versa.
fn same_items(what: &str, got: &Items, want: &[(&str, Vec<Got>)]) -> R {
    for channel in got.keys() {
        ensure!(
            want.iter().any(|(c, _)| c == channel),
            "{what}: unexpected items of channel {channel}: {:?}",
            got[channel]
        );
    }
    for (channel, items) in want {
        let empty = Vec::new();
        same(
            &format!("{what} [{channel}]"),
            got.get(*channel).unwrap_or(&empty),
            items,
        )?;
    }
    Ok(())
}

/// Total items of `want` (to know how many to take).
fn count(want: &[(&str, Vec<Got>)]) -> usize {
    want.iter().map(|(_, v)| v.len()).sum()
}

/// Takes exactly what `want` names from `rx` and compares per channel.
async fn expect_items(what: &str, rx: &mut Rx, want: &[(&str, Vec<Got>)]) -> R {
    let got = rx.take(count(want)).await.context(what.to_owned())?;
    same_items(what, &got, want)
}

/// The first event of an SSE stream must be `connected`; returns it.
async fn sse_connected(sse: &mut SseClient) -> anyhow::Result<(String, protocol::Connected)> {
    let (ev, f) = sse.next_frame().await?;
    match f {
        ServerFrame::Connected(c) if ev.event.as_deref() == Some("connected") => {
            Ok((ev.id.unwrap_or_default(), c))
        }
        other => bail!("expected the connected event, got {ev:?} {other:?}"),
    }
}

/// Sends `subscribe` and reads up to its `subscribed`, keeping the messages
/// of other channels that arrive meanwhile.
async fn subscribe_amid(
    ws: &mut WsClient,
    channel: &str,
    since: Option<Position>,
) -> anyhow::Result<(Subscribed, Vec<(String, Got)>)> {
    let id = ws.id();
    ws.send(&ClientFrame::Subscribe(Subscribe {
        id: Some(id),
        channel: channel.into(),
        since,
    }))
    .await?;
    let mut before = Vec::new();
    loop {
        match ws.recv().await? {
            ServerFrame::Subscribed(s) if s.id == Some(id) => return Ok((s, before)),
            ServerFrame::Message(m) => before.push((
                m.channel,
                Got::Msg {
                    seq: m.seq,
                    epoch: m.epoch,
                    data: m.data,
                },
            )),
            other => bail!("waiting for subscribed {id}: got {other:?}"),
        }
    }
}

fn report(what: &str, values: &[f64]) {
    eprintln!("{what}: {values:?}");
}

// ---------------------------------------------------------------------------
// 1. Broadcast across nodes, concurrent publishers on different nodes
// ---------------------------------------------------------------------------

async fn broadcast(c: &Cluster) -> R {
    let chan = "news:cluster";
    let mut rxs: Vec<(String, Rx)> = Vec::new();
    for i in 0..c.len() {
        let gw = c.node(i);
        let token = gw.token(&format!("b{i}"), &["news:*"], &[], 600);
        for codec in [Codec::Json, Codec::MsgPack] {
            let (mut ws, connected) = gw.ws_connected(codec, &token).await?;
            ensure!(connected.node == c.node_id(i), "{connected:?}");
            let s = ws.subscribe(chan, None).await?;
            ensure!(s.seq == 0 && s.recovered.is_none(), "{s:?}");
            rxs.push((format!("{}/ws-{codec:?}", c.node_id(i)), Rx::Ws(ws)));
        }
        let mut sse = gw.sse(&[chan], Some(&token), None).await?;
        let (_, connected) = sse_connected(&mut sse).await?;
        ensure!(connected.node == c.node_id(i), "{connected:?}");
        rxs.push((format!("{}/sse", c.node_id(i)), Rx::Sse(sse)));
    }

    // Two publishing lanes per node, all at once: sequences interleave
    // across nodes (and with NATS, may reach a node out of order).
    const LANES: usize = 2;
    const PER_LANE: u64 = 25;
    let total = (c.len() * LANES) as u64 * PER_LANE;
    let lanes: Vec<(usize, usize)> = (0..c.len())
        .flat_map(|i| (0..LANES).map(move |l| (i, l)))
        .collect();
    let publishers = lanes.iter().map(|&(i, lane)| async move {
        let mut out = Vec::new();
        for k in 0..PER_LANE {
            let data = json!({"from": format!("{}-{lane}", c.node_id(i)), "k": k, "p": payload(k)});
            let r = c.node(i).publish(chan, data.clone()).await?;
            out.push((r, data));
        }
        anyhow::Ok(out)
    });
    let receivers = rxs.iter_mut().map(|(name, rx)| async move {
        rx.take(total as usize)
            .await
            .with_context(|| format!("receiving on {name}"))
    });
    let (published, received) = tokio::join!(try_join_all(publishers), try_join_all(receivers));
    let published = published?;
    let received = received?;

    let epoch = published[0][0].0.epoch.clone();
    let mut by_seq: BTreeMap<u64, Value> = BTreeMap::new();
    for lane in &published {
        // A lane publishes one after the other: its sequences increase.
        ensure!(
            lane.windows(2).all(|w| w[0].0.seq < w[1].0.seq),
            "one lane's sequences go back: {:?}",
            lane.iter().map(|(r, _)| r.seq).collect::<Vec<_>>()
        );
        for (r, data) in lane {
            ensure!(r.epoch == epoch && r.channel == chan, "{r:?}");
            ensure!(
                by_seq.insert(r.seq, data.clone()).is_none(),
                "seq {} given to two publishes",
                r.seq
            );
        }
    }
    ensure!(
        by_seq.keys().copied().eq(1..=total),
        "the API gave sequences other than 1..={total}"
    );
    let want = msgs(&epoch, by_seq.iter().map(|(s, d)| (*s, d)));
    for ((name, _), got) in rxs.iter().zip(&received) {
        same_items(name, got, &[(chan, want.clone())])?;
    }

    // Nothing else was pending: the next thing each gets is the next message.
    let end = c.node(1).publish(chan, json!("end")).await?;
    ensure!(end.seq == total + 1, "{end:?}");
    for (name, rx) in &mut rxs {
        expect_items(
            name,
            rx,
            &[(chan, vec![Got::msg(total + 1, &epoch, json!("end"))])],
        )
        .await?;
    }

    let mut dup = Vec::new();
    let mut replayed = Vec::new();
    for i in 0..c.len() {
        dup.push(
            c.node(i)
                .metric("gateway_duplicates_suppressed_total")
                .await?,
        );
        replayed.push(c.node(i).metric("gateway_messages_replayed_total").await?);
    }
    report(
        &format!("{:?} broadcast: duplicates suppressed per node", c.backbone),
        &dup,
    );
    report(
        &format!(
            "{:?} broadcast: gap repairs (replayed) per node",
            c.backbone
        ),
        &replayed,
    );
    Ok(())
}

#[tokio::test]
async fn cluster_broadcast_reaches_every_subscriber_once_in_order_redis() -> R {
    let c = Cluster::builder(Backbone::Redis).start().await?;
    let r = broadcast(&c).await;
    c.check(r)
}

#[tokio::test]
async fn cluster_broadcast_reaches_every_subscriber_once_in_order_nats() -> R {
    let c = Cluster::builder(Backbone::Nats).start().await?;
    let r = broadcast(&c).await;
    c.check(r)
}

// ---------------------------------------------------------------------------
// 2. Unicast reaches only the user's connections, only on their nodes
// ---------------------------------------------------------------------------

async fn unicast(c: &Cluster) -> R {
    // user -> (node, transport) of each of their connections
    let layout: [(&str, &[(usize, &str)]); 3] = [
        ("alice", &[(0, "ws"), (1, "sse")]),
        ("bob", &[(1, "ws"), (2, "sse")]),
        ("carol", &[(2, "ws")]),
    ];
    let mut rxs: Vec<(String, String, Rx)> = Vec::new(); // (user, label, rx)
    for (user, conns) in layout {
        for &(node, transport) in conns {
            let gw = c.node(node);
            let token = gw.token(user, &["quiet:*"], &[], 600);
            let label = format!("{user}@{}/{transport}", c.node_id(node));
            let rx = if transport == "ws" {
                let (ws, connected) = gw.ws_connected(Codec::MsgPack, &token).await?;
                ensure!(connected.node == c.node_id(node), "{connected:?}");
                Rx::Ws(ws)
            } else {
                let quiet = format!("quiet:{user}");
                let mut sse = gw.sse(&[&quiet], Some(&token), None).await?;
                sse_connected(&mut sse).await?;
                Rx::Sse(sse)
            };
            rxs.push((user.to_owned(), label, rx));
        }
    }
    let holders: HashMap<&str, Vec<usize>> = layout
        .iter()
        .map(|(u, conns)| (*u, conns.iter().map(|(n, _)| *n).collect()))
        .collect();

    let mut before = c.backbone_received().await?;
    // (user, node the API call goes to, messages); the sending node holds
    // none of the user's connections, or only one of them.
    for (user, from, n) in [("alice", 2, 5u64), ("bob", 0, 3), ("carol", 1, 2)] {
        let channel = format!("$user:{user}");
        let mut want = Vec::new();
        for k in 1..=n {
            let data = json!({"to": user, "k": k, "p": payload(k)});
            let r = c.node(from).send(user, data.clone()).await?;
            ensure!(
                r.seq == k && r.channel == channel && r.user.as_deref() == Some(user),
                "{r:?}"
            );
            want.push(Got::msg(r.seq, &r.epoch, data));
        }
        for (u, label, rx) in &mut rxs {
            if u == user {
                expect_items(label, rx, &[(&channel, want.clone())]).await?;
            }
        }
        let now = c.backbone_received().await?;
        let grew: Vec<f64> = now.iter().zip(&before).map(|(a, b)| a - b).collect();
        let expected: Vec<f64> = (0..c.len())
            .map(|i| {
                if holders[user].contains(&i) {
                    n as f64
                } else {
                    0.0
                }
            })
            .collect();
        ensure!(
            grew == expected,
            "{:?}: {n} sends to {user} (on nodes {:?}): backbone_received grew by {grew:?} per node, want {expected:?}",
            c.backbone,
            holders[user]
        );
        before = now;
    }
    // Nobody got anything else, and no node received anything late.
    try_join_all(rxs.iter_mut().map(|(_, label, rx)| async move {
        rx.expect_quiet(Duration::from_millis(300))
            .await
            .context(label.clone())
    }))
    .await?;
    let after = c.backbone_received().await?;
    ensure!(
        after == before,
        "late backbone messages: {before:?} -> {after:?}"
    );
    Ok(())
}

#[tokio::test]
async fn cluster_unicast_reaches_only_the_users_connections_and_nodes_redis() -> R {
    let c = Cluster::builder(Backbone::Redis).start().await?;
    let r = unicast(&c).await;
    c.check(r)
}

#[tokio::test]
async fn cluster_unicast_reaches_only_the_users_connections_and_nodes_nats() -> R {
    let c = Cluster::builder(Backbone::Nats).start().await?;
    let r = unicast(&c).await;
    c.check(r)
}

// ---------------------------------------------------------------------------
// 3. Resume on another node after an abrupt disconnect
// ---------------------------------------------------------------------------

async fn resume_elsewhere(c: &Cluster) -> R {
    let chan = "room:9";
    let (a, b, p) = (c.node(0), c.node(1), c.node(2));
    let ws_user = "rw";
    let sse_user = "rs";
    let ws_token = a.token(ws_user, &["room:*"], &[], 600);
    let sse_token = a.token(sse_user, &["room:*"], &[], 600);
    let (ws_uchan, sse_uchan) = (format!("$user:{ws_user}"), format!("$user:{sse_user}"));

    let (ws, _) = a.ws_connected(Codec::Json, &ws_token).await?;
    let mut ws = ws;
    let epoch = ws.subscribe(chan, None).await?.epoch;
    let mut sse = a.sse(&[chan], Some(&sse_token), None).await?;
    sse_connected(&mut sse).await?;

    let mut room: BTreeMap<u64, Value> = BTreeMap::new();
    let mut user_msgs: HashMap<&str, (String, BTreeMap<u64, Value>)> = HashMap::new();
    async fn publish_n(
        p: &Gateway,
        chan: &str,
        range: std::ops::RangeInclusive<u64>,
        into: &mut BTreeMap<u64, Value>,
    ) -> R {
        for i in range {
            let r = p.publish(chan, payload(i)).await?;
            ensure!(r.seq == i, "{r:?}");
            into.insert(i, payload(i));
        }
        Ok(())
    }
    async fn send_n(
        p: &Gateway,
        user: &str,
        range: std::ops::RangeInclusive<u64>,
        into: &mut (String, BTreeMap<u64, Value>),
    ) -> R {
        for i in range {
            let data = json!({"user": user, "i": i});
            let r = p.send(user, data.clone()).await?;
            ensure!(r.seq == i, "{r:?}");
            into.0 = r.epoch;
            into.1.insert(i, data);
        }
        Ok(())
    }
    user_msgs.insert(ws_user, Default::default());
    user_msgs.insert(sse_user, Default::default());

    publish_n(p, chan, 1..=10, &mut room).await?;
    for u in [ws_user, sse_user] {
        send_n(p, u, 1..=3, user_msgs.get_mut(u).expect("inserted")).await?;
    }
    let want_room = |r: std::ops::RangeInclusive<u64>, room: &BTreeMap<u64, Value>| {
        msgs(&epoch, r.map(|s| (s, &room[&s])))
    };
    let want_user = |u: &str,
                     r: std::ops::RangeInclusive<u64>,
                     m: &HashMap<&str, (String, BTreeMap<u64, Value>)>| {
        let (e, d) = &m[u];
        msgs(e, r.map(|s| (s, &d[&s])))
    };
    let mut ws_rx = Rx::Ws(ws);
    expect_items(
        "ws on A",
        &mut ws_rx,
        &[
            (chan, want_room(1..=10, &room)),
            (&ws_uchan, want_user(ws_user, 1..=3, &user_msgs)),
        ],
    )
    .await?;
    let mut sse_rx = Rx::Sse(sse);
    expect_items(
        "sse on A",
        &mut sse_rx,
        &[
            (chan, want_room(1..=10, &room)),
            (&sse_uchan, want_user(sse_user, 1..=3, &user_msgs)),
        ],
    )
    .await?;
    let Rx::Sse(sse) = sse_rx else { unreachable!() };
    let cursor = sse.last_event_id.clone().context("SSE gave event ids")?;
    let Rx::Ws(ws) = ws_rx else { unreachable!() };

    // In flight when the connections die abruptly.
    publish_n(p, chan, 11..=15, &mut room).await?;
    ws.abort();
    drop(sse);
    // Published while the clients are away.
    publish_n(p, chan, 16..=30, &mut room).await?;
    for u in [ws_user, sse_user] {
        send_n(p, u, 4..=5, user_msgs.get_mut(u).expect("inserted")).await?;
    }

    // Both resume on node B while node C keeps publishing.
    let user_epoch = |u: &str| user_msgs[u].0.clone();
    let (ws_uepoch, sse_uepoch) = (user_epoch(ws_user), user_epoch(sse_user));
    let mut live_room = BTreeMap::new();
    let mut live_users: (String, BTreeMap<u64, Value>, String, BTreeMap<u64, Value>) =
        Default::default();
    let publisher = async {
        for i in 31..=60 {
            let r = p.publish(chan, payload(i)).await?;
            ensure!(r.seq == i, "{r:?}");
            live_room.insert(i, payload(i));
            if i % 15 == 0 {
                let n = i / 15 + 3; // 5.. -> 6, 7
                for (u, epoch, into) in [
                    (ws_user, &mut live_users.0, &mut live_users.1),
                    (sse_user, &mut live_users.2, &mut live_users.3),
                ] {
                    let data = json!({"user": u, "i": n});
                    let r = p.send(u, data.clone()).await?;
                    ensure!(r.seq == n, "{r:?}");
                    *epoch = r.epoch;
                    into.insert(n, data);
                }
            }
            tokio::task::yield_now().await;
        }
        anyhow::Ok(())
    };
    let ws_resume = async {
        let mut ws = b.ws(Codec::Json).await?;
        let connected = ws
            .connect(Some(&ws_token), Some(pos(3, &ws_uepoch)))
            .await?;
        ensure!(connected.node == c.node_id(1), "{connected:?}");
        let us = ws.recv_subscribed().await?;
        ensure!(
            us.channel == ws_uchan && us.recovered == Some(true) && us.epoch == ws_uepoch,
            "{us:?}"
        );
        let (s, before) = subscribe_amid(&mut ws, chan, Some(pos(10, &epoch))).await?;
        ensure!(
            s.recovered == Some(true) && s.epoch == epoch && (30..=60).contains(&s.seq),
            "{s:?}"
        );
        let mut rx = Rx::Ws(ws);
        // room 11..=60 and user 4..=7, minus what came before `subscribed`
        let rest = rx.take(50 + 4 - before.len()).await?;
        anyhow::Ok((rx, before, rest))
    };
    let sse_resume = async {
        let mut sse = b.sse(&[chan], Some(&sse_token), Some(&cursor)).await?;
        let (id, connected) = sse_connected(&mut sse).await?;
        ensure!(connected.node == c.node_id(1), "{connected:?}");
        ensure!(
            id == cursor,
            "the stream restarts at its cursor: {id} vs {cursor}"
        );
        let mut rx = Rx::Sse(sse);
        let got = rx.take(50 + 4).await?;
        anyhow::Ok((rx, got))
    };
    let (published, ws_done, sse_done) = tokio::join!(publisher, ws_resume, sse_resume);
    published?;
    let (mut ws_rx, before, rest) = ws_done.context("ws resume on B")?;
    let (mut sse_rx, sse_got) = sse_done.context("sse resume on B")?;
    room.extend(live_room);
    for (u, e, d) in [
        (ws_user, live_users.0, live_users.1),
        (sse_user, live_users.2, live_users.3),
    ] {
        let m = user_msgs.get_mut(u).expect("inserted");
        ensure!(e == m.0, "user stream epoch changed");
        m.1.extend(d);
    }
    let mut ws_got: Items = BTreeMap::new();
    for (ch, g) in before {
        ws_got.entry(ch).or_default().push(g);
    }
    for (ch, g) in rest {
        ws_got.entry(ch.clone()).or_default().extend(g);
    }
    same_items(
        "ws resumed on B",
        &ws_got,
        &[
            (chan, want_room(11..=60, &room)),
            (&ws_uchan, want_user(ws_user, 4..=7, &user_msgs)),
        ],
    )?;
    same_items(
        "sse resumed on B",
        &sse_got,
        &[
            (chan, want_room(11..=60, &room)),
            (&sse_uchan, want_user(sse_user, 4..=7, &user_msgs)),
        ],
    )?;
    let _ = sse_uepoch;
    // No late duplicate is pending.
    let end = p.publish(chan, json!("end")).await?;
    ensure!(end.seq == 61);
    for (name, rx) in [("ws", &mut ws_rx), ("sse", &mut sse_rx)] {
        expect_items(
            name,
            rx,
            &[(chan, vec![Got::msg(61, &epoch, json!("end"))])],
        )
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn cluster_resume_on_another_node_loses_and_duplicates_nothing_redis() -> R {
    let c = Cluster::builder(Backbone::Redis).start().await?;
    let r = resume_elsewhere(&c).await;
    c.check(r)
}

#[tokio::test]
async fn cluster_resume_on_another_node_loses_and_duplicates_nothing_nats() -> R {
    let c = Cluster::builder(Backbone::Nats).start().await?;
    let r = resume_elsewhere(&c).await;
    c.check(r)
}

// ---------------------------------------------------------------------------
// 4. Reconnect storm: identical resumes are merged into shared reads
// ---------------------------------------------------------------------------

async fn storm(c: &Cluster) -> R {
    const WS: usize = 150;
    const SSE: usize = 50;
    const HISTORY: u64 = 60;
    const FROM: u64 = 5;
    let chan = "storm";
    let gw = c.node(0);
    let ws_token = gw.token("storm-ws", &[chan], &[], 600);
    let sse_token = gw.token("storm-sse", &[chan], &[], 600);
    let names = [chan, "$user:storm-sse"];

    // The SSE clients share a user, so one cursor fits them all; its user
    // stream position comes from a first stream.
    let mut first = gw.sse(&[chan], Some(&sse_token), None).await?;
    let (id, _) = sse_connected(&mut first).await?;
    let start = SseCursor::decode(&id, &names)?;
    drop(first);

    let mut data = BTreeMap::new();
    let mut epoch = String::new();
    for i in 1..=HISTORY {
        let d = json!({"i": i, "pad": "x".repeat(1000), "p": payload(i)});
        let r = c.node(1).publish(chan, d.clone()).await?;
        ensure!(r.seq == i);
        epoch = r.epoch;
        data.insert(i, d);
    }
    let cursor = SseCursor::encode(&names, &[&pos(FROM, &epoch), &start[1]]);

    let mut wss = try_join_all((0..WS).map(|i| {
        let codec = if i % 2 == 0 {
            Codec::Json
        } else {
            Codec::MsgPack
        };
        let token = ws_token.clone();
        async move { gw.ws_connected(codec, &token).await.map(|(ws, _)| ws) }
    }))
    .await?;
    let merged_before = gw
        .metric_with("gateway_replay_reads_total", "merged=\"true\"")
        .await?;

    // The storm: every WebSocket sends its resume at once, and the SSE
    // streams open meanwhile.
    let mut ids = Vec::new();
    for ws in &mut wss {
        let id = ws.id();
        ws.send(&ClientFrame::Subscribe(Subscribe {
            id: Some(id),
            channel: chan.into(),
            since: Some(pos(FROM, &epoch)),
        }))
        .await?;
        ids.push(id);
    }
    let sses = try_join_all(
        (0..SSE).map(|_| async { gw.sse(&[chan], Some(&sse_token), Some(&cursor)).await }),
    )
    .await?;

    let want = msgs(&epoch, (FROM + 1..=HISTORY).map(|s| (s, &data[&s])));
    let mut rxs = Vec::new();
    for (n, (mut ws, id)) in wss.into_iter().zip(ids).enumerate() {
        let s = ws.recv_subscribed().await?;
        ensure!(
            s.id == Some(id) && s.recovered == Some(true) && s.seq == HISTORY && s.epoch == epoch,
            "ws {n}: {s:?}"
        );
        let mut rx = Rx::Ws(ws);
        expect_items(&format!("ws {n}"), &mut rx, &[(chan, want.clone())]).await?;
        rxs.push(rx);
    }
    for (n, mut sse) in sses.into_iter().enumerate() {
        let (id, _) = sse_connected(&mut sse).await?;
        ensure!(id == cursor, "sse {n}: cursor {id}");
        let mut rx = Rx::Sse(sse);
        expect_items(&format!("sse {n}"), &mut rx, &[(chan, want.clone())]).await?;
        rxs.push(rx);
    }
    let merged = gw
        .metric_with("gateway_replay_reads_total", "merged=\"true\"")
        .await?
        - merged_before;
    let unmerged = gw
        .metric_with("gateway_replay_reads_total", "merged=\"false\"")
        .await?;
    eprintln!("storm: {merged} merged replay reads, {unmerged} store reads on node0");
    ensure!(
        merged > 0.0,
        "no replay read was merged during a storm of {} identical resumes ({unmerged} store reads)",
        WS + SSE
    );

    // Live delivery goes on, exactly once, for every one of them.
    let end = c.node(2).publish(chan, json!("end")).await?;
    ensure!(end.seq == HISTORY + 1);
    let last = vec![Got::msg(HISTORY + 1, &epoch, json!("end"))];
    try_join_all(rxs.iter_mut().enumerate().map(|(n, rx)| {
        let last = last.clone();
        async move { expect_items(&format!("client {n}"), rx, &[(chan, last)]).await }
    }))
    .await?;
    Ok(())
}

#[tokio::test]
async fn cluster_reconnect_storm_merges_identical_replay_reads() -> R {
    let c = Cluster::builder(Backbone::Redis).start().await?;
    let r = storm(&c).await;
    c.check(r)
}

// ---------------------------------------------------------------------------
// 5. A node killed with SIGKILL
// ---------------------------------------------------------------------------

async fn node_killed(c: &mut Cluster) -> R {
    let user = "dora";
    let ukey = format!("gw:{{u:{user}}}");
    let alive1 = "gw:{nodes}:alive:node1";
    let token = c.node(0).token(user, &[], &[], 600);
    let uchan = format!("$user:{user}");

    let (ws0, _) = c.node(0).ws_connected(Codec::Json, &token).await?;
    let (mut ws1, _) = c.node(1).ws_connected(Codec::MsgPack, &token).await?;
    let mut ws0 = Rx::Ws(ws0);
    let hash = c.redis_hash(&ukey).await?;
    ensure!(
        hash == HashMap::from([("node0".into(), "1".into()), ("node1".into(), "1".into())]),
        "{ukey} = {hash:?}"
    );
    ensure!(c.redis_exists(alive1).await?, "{alive1} missing");

    let r1 = c.node(2).send(user, json!({"n": 1})).await?;
    let m1 = vec![Got::msg(1, &r1.epoch, json!({"n": 1}))];
    expect_items("node0 ws", &mut ws0, &[(&uchan, m1.clone())]).await?;
    let mut ws1_rx = Rx::Ws(ws1);
    expect_items("node1 ws", &mut ws1_rx, &[(&uchan, m1)]).await?;
    let Rx::Ws(w) = ws1_rx else { unreachable!() };
    ws1 = w;

    let killed_at = Instant::now();
    c.kill_node(1);
    // Its connection ends without a close frame.
    match ws1.next().await? {
        Incoming::Closed { code: None, .. } => {}
        other => bail!("connection on the killed node: {other:?}"),
    }
    // Its liveness key expires within the TTL (it was refreshed at most a
    // heartbeat before the kill).
    let deadline = killed_at + c.registry_ttl + Duration::from_secs(3);
    while c.redis_exists(alive1).await? {
        ensure!(
            Instant::now() < deadline,
            "{alive1} still there {:?} after the kill (TTL {:?})",
            killed_at.elapsed(),
            c.registry_ttl
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let expired_after = killed_at.elapsed();
    eprintln!(
        "node1's alive key expired {expired_after:?} after SIGKILL (TTL {:?})",
        c.registry_ttl
    );
    ensure!(
        expired_after <= c.registry_ttl + Duration::from_millis(500),
        "alive key expired only {expired_after:?} after the kill (TTL {:?})",
        c.registry_ttl
    );
    // Lookups may lag the registry's live-node cache (a fraction of the TTL).
    tokio::time::sleep(c.registry_ttl / 4).await;

    let before = c.backbone_received().await?;
    let r2 = c.node(2).send(user, json!({"n": 2})).await?;
    ensure!(r2.seq == 2 && r2.epoch == r1.epoch, "{r2:?}");
    expect_items(
        "node0 ws after the kill",
        &mut ws0,
        &[(&uchan, vec![Got::msg(2, &r1.epoch, json!({"n": 2}))])],
    )
    .await?;
    let after = c.backbone_received().await?;
    ensure!(
        after[0] - before[0] == 1.0 && after[2] == before[2],
        "backbone received {before:?} -> {after:?}"
    );
    let hash = c.redis_hash(&ukey).await?;
    ensure!(
        hash == HashMap::from([("node0".into(), "1".into())]),
        "after a unicast, the dead node must be gone from {ukey}: {hash:?}"
    );

    // The lost connection comes back through the balancer, lands on a live
    // node and resumes its user stream.
    let lb = c.lb()?;
    let mut ws = WsClient::open_at(lb.addr, Codec::Json).await?;
    let connected = ws.connect(Some(&token), Some(pos(1, &r1.epoch))).await?;
    ensure!(connected.node != "node1", "{connected:?}");
    let s = ws.recv_subscribed().await?;
    ensure!(
        s.channel == uchan && s.recovered == Some(true) && s.seq == 2,
        "{s:?}"
    );
    let mut back = Rx::Ws(ws);
    expect_items(
        "resumed via LB",
        &mut back,
        &[(&uchan, vec![Got::msg(2, &r1.epoch, json!({"n": 2}))])],
    )
    .await?;
    // New connections through the balancer only reach live nodes.
    for _ in 0..4 {
        let mut w = WsClient::open_at(lb.addr, Codec::Json).await?;
        let t = c.node(0).token("eve", &[], &[], 600);
        let conn = w.hello(Some(&t)).await?;
        ensure!(conn.node != "node1", "{conn:?}");
    }
    let r3 = lb.send(user, json!({"n": 3})).await?;
    ensure!(r3.seq == 3);
    for (name, rx) in [("node0 ws", &mut ws0), ("resumed", &mut back)] {
        expect_items(
            name,
            rx,
            &[(&uchan, vec![Got::msg(3, &r1.epoch, json!({"n": 3}))])],
        )
        .await?;
    }
    let hash = c.redis_hash(&ukey).await?;
    ensure!(!hash.contains_key("node1"), "{ukey} = {hash:?}");
    Ok(())
}

#[tokio::test]
async fn cluster_killed_node_expires_and_unicast_reaches_the_live_one() -> R {
    let mut c = Cluster::builder(Backbone::Redis).haproxy().start().await?;
    let r = node_killed(&mut c).await;
    c.check(r)
}

// ---------------------------------------------------------------------------
// 6. Backbone / store restarts
// ---------------------------------------------------------------------------

/// Two subscribers of `chan` (WS on node0, SSE on node1), each with a user
/// stream; returns them with their user channel names.
async fn two_clients(c: &Cluster, chan: &str) -> anyhow::Result<Vec<(String, String, Rx)>> {
    let token_w = c.node(0).token("rw6", &[chan], &[], 600);
    let token_s = c.node(1).token("rs6", &[chan], &[], 600);
    let (mut ws, _) = c.node(0).ws_connected(Codec::Json, &token_w).await?;
    ws.subscribe(chan, None).await?;
    let mut sse = c.node(1).sse(&[chan], Some(&token_s), None).await?;
    sse_connected(&mut sse).await?;
    Ok(vec![
        ("rw6".into(), "ws@node0".into(), Rx::Ws(ws)),
        ("rs6".into(), "sse@node1".into(), Rx::Sse(sse)),
    ])
}

async fn redis_restart(c: &mut Cluster) -> R {
    let chan = "live";
    let mut clients = two_clients(c, chan).await?;
    let mut epoch = String::new();
    let mut want_chan = Vec::new();
    for i in 1..=3u64 {
        let r = c.node((i % 2) as usize).publish(chan, payload(i)).await?;
        epoch = r.epoch.clone();
        want_chan.push(Got::msg(i, &epoch, payload(i)));
    }
    for (user, label, rx) in &mut clients {
        let r = c.node(1).send(user, json!({"hi": user.clone()})).await?;
        let uchan = format!("$user:{user}");
        expect_items(
            label,
            rx,
            &[
                (chan, want_chan.clone()),
                (
                    &uchan,
                    vec![Got::msg(1, &r.epoch, json!({"hi": user.clone()}))],
                ),
            ],
        )
        .await?;
    }

    c.redis.stop();
    let stopped = Instant::now();
    c.wait_ready(false, Duration::from_secs(10))
        .await
        .context("nodes must report degraded with Redis down")?;
    eprintln!("degraded {:?} after Redis stopped", stopped.elapsed());
    for (_, label, rx) in &mut clients {
        rx.alive()
            .await
            .context(format!("{label} during the outage"))?;
    }
    // The API refuses what it cannot store: never 200 during the outage.
    // (All at once: each waits out the Redis client's reconnect attempts.)
    let calls: Vec<(usize, &str, Value)> = (0..c.len())
        .flat_map(|i| {
            [
                (
                    i,
                    "/api/publish",
                    json!({"channel": chan, "data": "during outage"}),
                ),
                (
                    i,
                    "/api/send",
                    json!({"user": "rw6", "data": "during outage"}),
                ),
            ]
        })
        .collect();
    let cr: &Cluster = c;
    let answers = try_join_all(calls.iter().map(|(i, path, body)| async move {
        let (status, answer) = cr.node(*i).try_post(path, body).await?;
        anyhow::Ok((*i, *path, status, answer))
    }))
    .await?;
    for (i, path, status, answer) in answers {
        ensure!(
            status == StatusCode::SERVICE_UNAVAILABLE
                && answer["error"]["name"] == "unavailable"
                && answer["error"]["temporary"] == true,
            "{} {path} with Redis down: {status} {answer}",
            c.node_id(i)
        );
    }
    eprintln!(
        "API refused during the outage ({:?} after the stop)",
        stopped.elapsed()
    );

    c.redis.start().await?;
    let restarted = Instant::now();
    c.wait_ready(true, Duration::from_secs(15))
        .await
        .context("nodes must be ready again after Redis came back")?;
    eprintln!("ready {:?} after Redis restarted", restarted.elapsed());

    // Redis came back empty: every stream starts at a new epoch, and the
    // clients are told so before its first message. Right away (no other
    // message would reveal a lost one): one message to each user, then the
    // channel's.
    let mut want_user = HashMap::new();
    for (user, _, _) in &clients {
        let data = json!({"after": user.clone()});
        let r = c.node(0).send(user, data.clone()).await?;
        ensure!(r.seq == 1, "after the restart: {r:?}");
        want_user.insert(user.clone(), Got::msg(1, &r.epoch, data));
    }
    let mut new_chan = Vec::new();
    let mut new_epoch = String::new();
    for i in 1..=4u64 {
        let r = c
            .node((i % 2) as usize)
            .publish(chan, payload(100 + i))
            .await?;
        ensure!(r.seq == i && r.epoch != epoch, "after the restart: {r:?}");
        new_epoch = r.epoch.clone();
        new_chan.push(Got::msg(i, &new_epoch, payload(100 + i)));
    }
    let epoch_changed = |e: &str| Got::Unrecoverable {
        reason: UnrecoverableReason::EpochChanged,
        epoch: e.to_owned(),
        seq: 0,
    };
    for (user, label, rx) in &mut clients {
        let mut want_c = vec![epoch_changed(&new_epoch)];
        want_c.extend(new_chan.clone());
        let Got::Msg { epoch: uepoch, .. } = &want_user[user] else {
            unreachable!()
        };
        let want_u = vec![epoch_changed(uepoch), want_user[user].clone()];
        let uchan = format!("$user:{user}");
        expect_items(label, rx, &[(chan, want_c), (&uchan, want_u)])
            .await
            .context("after the Redis restart")?;
    }
    for (_, label, rx) in &mut clients {
        rx.alive()
            .await
            .context(format!("{label} after the outage"))?;
        rx.expect_quiet(Duration::from_millis(200))
            .await
            .context(label.clone())?;
    }
    Ok(())
}

#[tokio::test]
async fn cluster_redis_restart_keeps_clients_and_refuses_then_delivers() -> R {
    let mut c = Cluster::builder(Backbone::Redis).nodes(2).start().await?;
    let r = redis_restart(&mut c).await;
    c.check(r)
}

/// What was published to one stream: accepted (seq -> data) and refused.
#[derive(Default)]
struct Stream {
    epoch: String,
    accepted: BTreeMap<u64, Value>,
    refused: Vec<Value>,
}

impl Stream {
    /// Records a publish answer (200: accepted, 503: refused).
    fn record(&mut self, status: StatusCode, answer: Value, data: Value) -> R {
        if status == StatusCode::OK {
            let r: PublishResult = serde_json::from_value(answer)?;
            ensure!(
                self.epoch.is_empty() || r.epoch == self.epoch,
                "epoch changed: {r:?}"
            );
            self.epoch = r.epoch;
            ensure!(
                self.accepted.insert(r.seq, data).is_none(),
                "seq {} twice",
                r.seq
            );
        } else {
            ensure!(
                status == StatusCode::SERVICE_UNAVAILABLE && answer["error"]["temporary"] == true,
                "publish: {status} {answer}"
            );
            self.refused.push(data);
        }
        Ok(())
    }

    fn top(&self) -> u64 {
        self.accepted.keys().last().copied().unwrap_or(0)
    }

    /// `items` must be every seq `from..=top` once, in order: an accepted
    /// one with its data, any other one a refused publish stored anyway.
    fn check(&self, label: &str, items: &[Got], from: u64) -> R {
        let mut refused = self.refused.clone();
        ensure!(
            items.len() as u64 == self.top() + 1 - from,
            "{label}: {} items for seqs {from}..={}: {items:?}",
            items.len(),
            self.top()
        );
        for (n, item) in items.iter().enumerate() {
            let seq = from + n as u64;
            match item {
                Got::Msg {
                    seq: s,
                    epoch,
                    data,
                } if *s == seq && *epoch == self.epoch => match self.accepted.get(&seq) {
                    Some(d) => ensure!(d == data, "{label}: seq {seq}: {data} != {d}"),
                    None => {
                        let i = refused.iter().position(|r| r == data).with_context(|| {
                            format!("{label}: seq {seq} is no publish of ours: {data}")
                        })?;
                        refused.remove(i);
                        eprintln!("{label}: seq {seq} was refused by the API, stored, delivered");
                    }
                },
                other => {
                    bail!("{label}: item {n} should be message {seq}: {other:?}\nall: {items:?}")
                }
            }
        }
        Ok(())
    }
}

/// Publishes `data` to a channel or (`$user:<id>`) a user stream through
/// `gw`, whatever the answer: (stream, status, answer, data).
async fn publish_any(
    gw: &Gateway,
    stream: &str,
    data: Value,
) -> anyhow::Result<(String, StatusCode, Value, Value)> {
    let (path, body) = match stream.strip_prefix("$user:") {
        Some(user) => ("/api/send", json!({"user": user, "data": data})),
        None => ("/api/publish", json!({"channel": stream, "data": data})),
    };
    let (status, answer) = gw.try_post(path, &body).await?;
    Ok((stream.to_owned(), status, answer, data))
}

async fn nats_restart(c: &mut Cluster) -> R {
    let chan = "live";
    let mut clients = two_clients(c, chan).await?;
    let mut streams: HashMap<String, Stream> = HashMap::new();
    let uchans: Vec<String> = clients
        .iter()
        .map(|(u, _, _)| format!("$user:{u}"))
        .collect();
    fn record(
        streams: &mut HashMap<String, Stream>,
        answers: Vec<(String, StatusCode, Value, Value)>,
        must_accept: bool,
    ) -> anyhow::Result<Vec<u16>> {
        let mut statuses = Vec::new();
        for (stream, status, answer, data) in answers {
            ensure!(
                !must_accept || status == StatusCode::OK,
                "{stream}: {status} {answer}"
            );
            statuses.push(status.as_u16());
            streams
                .entry(stream)
                .or_default()
                .record(status, answer, data)?;
        }
        Ok(statuses)
    }

    // Before: 3 on the channel, 1 to each user; all delivered.
    let mut answers = Vec::new();
    for i in 1..=3u64 {
        answers.push(publish_any(c.node((i % 2) as usize), chan, payload(i)).await?);
    }
    for u in &uchans {
        answers.push(publish_any(c.node(1), u, json!({"before": u})).await?);
    }
    record(&mut streams, answers, true)?;
    let (chan_from, user_from) = (4, 2);
    for ((_, label, rx), u) in clients.iter_mut().zip(&uchans) {
        let got = rx.take(4).await.context(label.clone())?;
        ensure!(got.len() == 2, "{label}: {got:?}");
        streams[chan].check(label, &got[chan], 1)?;
        streams[u].check(label, &got[u], 1)?;
    }

    c.nats.as_mut().context("NATS")?.stop();
    let stopped = Instant::now();
    c.wait_ready(false, Duration::from_secs(10))
        .await
        .context("nodes must report degraded with NATS down")?;
    eprintln!("degraded {:?} after NATS stopped", stopped.elapsed());
    for (_, label, rx) in &mut clients {
        rx.alive()
            .await
            .context(format!("{label} during the outage"))?;
    }
    // With NATS down the API may accept (the message is in Redis) or
    // refuse; what it accepted must reach every client once NATS is back.
    let mut answers = Vec::new();
    for k in 0..6u64 {
        let data = json!({"outage": k, "p": payload(k)});
        answers.push(publish_any(c.node((k % 2) as usize), chan, data).await?);
    }
    for (n, u) in uchans.iter().enumerate() {
        answers.push(publish_any(c.node(n % 2), u, json!({"outage": u})).await?);
    }
    let statuses = record(&mut streams, answers, false)?;
    eprintln!("publishes with NATS down answered {statuses:?}");

    c.nats.as_mut().context("NATS")?.start().await?;
    let restarted = Instant::now();
    c.wait_ready(true, Duration::from_secs(15))
        .await
        .context("nodes must be ready again after NATS came back")?;
    eprintln!("ready {:?} after NATS restarted", restarted.elapsed());
    // Right away: to each user, then on the channel; all accepted.
    let mut answers = Vec::new();
    for (n, u) in uchans.iter().enumerate() {
        answers.push(publish_any(c.node(n % 2), u, json!({"after": u})).await?);
    }
    for k in 0..4u64 {
        answers.push(publish_any(c.node((k % 2) as usize), chan, json!({"after": k})).await?);
    }
    record(&mut streams, answers, true)?;

    // Every seq after the first part arrives once, in order, nothing else.
    for ((_, label, rx), u) in clients.iter_mut().zip(&uchans) {
        let n = (streams[chan].top() + 1 - chan_from) + (streams[u].top() + 1 - user_from);
        let got = rx.take(n as usize).await.context(label.clone())?;
        ensure!(got.len() == 2, "{label}: {got:?}");
        streams[chan].check(label, &got[chan], chan_from)?;
        streams[u].check(label, &got[u], user_from)?;
        rx.expect_quiet(Duration::from_millis(200))
            .await
            .context(label.clone())?;
        rx.alive().await.context(label.clone())?;
    }
    Ok(())
}

#[tokio::test]
async fn cluster_nats_restart_keeps_clients_and_delivers_every_accepted_publish() -> R {
    let mut c = Cluster::builder(Backbone::Nats).nodes(2).start().await?;
    let r = nats_restart(&mut c).await;
    c.check(r)
}

// ---------------------------------------------------------------------------
// 6b. A NATS cluster: the server a node is connected to dies mid-stream
// ---------------------------------------------------------------------------

/// Publishes `total` messages to `chan`, one every `gap`, through node 0
/// and node 1 in turn, counting them in `sent`; every answer, in order.
async fn steady_load(
    c: &Cluster,
    chan: &str,
    total: u64,
    gap: Duration,
    sent: &std::sync::atomic::AtomicU64,
) -> anyhow::Result<Vec<(String, StatusCode, Value, Value)>> {
    let mut answers = Vec::new();
    for k in 0..total {
        let data = json!({"k": k, "p": payload(k)});
        answers.push(publish_any(c.node((k % 2) as usize), chan, data).await?);
        sent.store(k + 1, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(gap).await;
    }
    Ok(answers)
}

async fn nats_server_killed(c: &mut Cluster) -> R {
    use std::sync::atomic::{AtomicU64, Ordering};
    let chan = "live";
    let mut clients = two_clients(c, chan).await?;
    let nats = c.nats_cluster.as_ref().context("NATS cluster")?;
    let victim = nats.wait_server_of("node0", TIMEOUT).await?;
    let other = nats.wait_server_of("node1", TIMEOUT).await?;
    eprintln!("node0 on NATS server {victim}, node1 on {other}");
    let pid = nats.servers[victim].service.pid().context("victim pid")?;

    // 300 publishes over ~4 s; the server dies after the 100th.
    let sent = AtomicU64::new(0);
    let load = steady_load(c, chan, 300, Duration::from_millis(10), &sent);
    let kill = async {
        while sent.load(Ordering::SeqCst) < 100 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let status = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()?;
        ensure!(status.success(), "kill -KILL {pid}: {status}");
        let killed = Instant::now();
        // The node moves to a server that is still there.
        let deadline = killed + Duration::from_secs(10);
        loop {
            if let Some(now) = nats.server_of("node0").await? {
                if now != victim {
                    eprintln!(
                        "node0 on NATS server {now} {:?} after the kill",
                        killed.elapsed()
                    );
                    return Ok(now);
                }
            }
            ensure!(
                Instant::now() < deadline,
                "node0 did not move to another NATS server in 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (answers, moved) = tokio::join!(load, kill);
    let (answers, _moved) = (answers?, moved?);
    c.nats_cluster.as_mut().context("NATS cluster")?.servers[victim]
        .service
        .stop();

    let mut stream = Stream::default();
    let mut statuses = BTreeMap::<u16, usize>::new();
    for (_, status, answer, data) in answers {
        *statuses.entry(status.as_u16()).or_default() += 1;
        stream.record(status, answer, data)?;
    }
    eprintln!("publish answers: {statuses:?}");
    ensure!(
        stream.accepted.len() >= 250,
        "most publishes must be accepted: {statuses:?}"
    );
    c.wait_ready(true, Duration::from_secs(10)).await?;
    ensure!(
        c.node(0)
            .logs()
            .contains("nats backbone: reconnected; catching up from the replay store"),
        "node0 did not catch up from the replay store after moving"
    );
    // Every seq, once, in order, on both nodes; nothing more.
    for (_, label, rx) in clients.iter_mut() {
        let n = stream.top() as usize;
        let got = rx.take(n).await.context(label.clone())?;
        ensure!(got.len() == 1, "{label}: {:?}", got.keys());
        stream.check(label, &got[chan], 1)?;
        rx.expect_quiet(Duration::from_millis(300))
            .await
            .context(label.clone())?;
        rx.alive().await.context(label.clone())?;
    }
    Ok(())
}

#[tokio::test]
async fn nats_cluster_server_killed_mid_stream_node_moves_and_subscribers_lose_nothing() -> R {
    let mut c = Cluster::builder(Backbone::Nats)
        .nodes(2)
        .nats_servers(3)
        .start()
        .await?;
    let r = nats_server_killed(&mut c).await;
    c.check(r)
}

// ---------------------------------------------------------------------------
// 6c. Redis Sentinel: the master dies mid-stream, a replica is promoted
// ---------------------------------------------------------------------------

/// What was published to one channel across epochs: accepted
/// ((epoch, seq) -> data) and refused (503; may be stored anyway).
#[derive(Default)]
struct Epochs {
    accepted: BTreeMap<(String, u64), Value>,
    refused: Vec<Value>,
}

impl Epochs {
    fn record(&mut self, status: StatusCode, answer: Value, data: Value) -> R {
        if status == StatusCode::OK {
            let r: PublishResult = serde_json::from_value(answer)?;
            ensure!(
                self.accepted
                    .insert((r.epoch.clone(), r.seq), data)
                    .is_none(),
                "({}, {}) acknowledged twice: a position given to two messages",
                r.epoch,
                r.seq
            );
        } else {
            ensure!(
                status == StatusCode::SERVICE_UNAVAILABLE && answer["error"]["temporary"] == true,
                "publish: {status} {answer}"
            );
            self.refused.push(data);
        }
        Ok(())
    }

    /// `items` (one subscriber's, in order): within an epoch contiguous
    /// sequences; an epoch ends only with an `unrecoverable` that names the
    /// next one. Every accepted publish is delivered with its data, unless
    /// its epoch was announced lost before it arrived. A delivered message
    /// that was not accepted must be a refused publish (stored anyway).
    fn check(&self, label: &str, items: &[Got]) -> anyhow::Result<usize> {
        let mut refused = self.refused.clone();
        let mut delivered = std::collections::HashSet::new();
        // Per ended epoch: the last seq delivered in it.
        let mut ended: HashMap<String, u64> = HashMap::new();
        let mut at: Option<(String, u64)> = None;
        let mut announced = 0;
        for (n, item) in items.iter().enumerate() {
            match item {
                Got::Msg { seq, epoch, data } => {
                    match &at {
                        Some((e, last)) => ensure!(
                            e == epoch && *seq == last + 1,
                            "{label}: item {n} ({epoch}, {seq}) after ({e}, {last}): a silent gap, a duplicate or an unannounced epoch\nall: {items:?}"
                        ),
                        None => ensure!(*seq == 1, "{label}: first item {item:?}"),
                    }
                    match self.accepted.get(&(epoch.clone(), *seq)) {
                        Some(d) => ensure!(d == data, "{label}: ({epoch}, {seq}): {data} != {d}"),
                        None => {
                            let i = refused.iter().position(|r| r == data).with_context(|| {
                                format!("{label}: ({epoch}, {seq}) is no publish of ours: {data}")
                            })?;
                            refused.remove(i);
                        }
                    }
                    delivered.insert((epoch.clone(), *seq));
                    at = Some((epoch.clone(), *seq));
                }
                Got::Unrecoverable { reason, epoch, seq } => {
                    ensure!(
                        *reason == UnrecoverableReason::EpochChanged,
                        "{label}: item {n}: {item:?}"
                    );
                    if let Some((e, last)) = at.take() {
                        ensure!(
                            &e != epoch,
                            "{label}: item {n} names the current epoch: {item:?}"
                        );
                        ended.insert(e, last);
                    }
                    announced += 1;
                    at = Some((epoch.clone(), *seq));
                }
            }
        }
        for (epoch, seq) in self.accepted.keys() {
            let lost_announced = ended.get(epoch).is_some_and(|last| seq > last);
            ensure!(
                delivered.contains(&(epoch.clone(), *seq)) || lost_announced,
                "{label}: accepted ({epoch}, {seq}) silently missing\nall: {items:?}"
            );
        }
        Ok(announced)
    }
}

/// `sigkill`: the master is SIGKILLed (the sentinels find it down after
/// 1 s); else `SENTINEL FAILOVER` demotes it while it runs.
async fn sentinel_failover(c: &mut Cluster, sigkill: bool) -> R {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let chan = "live";
    let mut clients = two_clients(c, chan).await?;
    let sentinels = c.sentinels.as_ref().context("sentinels")?;
    let replica = sentinels.replica.port;
    let master_pid = c.redis.pid().context("master pid")?;

    // Publishes every 10 ms through both nodes until told to stop; the
    // master is SIGKILLed (or demoted) after the 100th, the load goes on until a
    // replica was promoted and 1.5 s more.
    let (sent, stop) = (AtomicU64::new(0), AtomicBool::new(false));
    let load = async {
        let mut answers = Vec::new();
        let mut k = 0u64;
        while !stop.load(Ordering::SeqCst) && k < 3_000 {
            let data = json!({"k": k, "p": payload(k)});
            answers.push(publish_any(c.node((k % 2) as usize), chan, data).await?);
            k += 1;
            sent.store(k, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::Ok(answers)
    };
    let kill = async {
        let stopping = async {
            while sent.load(Ordering::SeqCst) < 100 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            if sigkill {
                let status = std::process::Command::new("kill")
                    .args(["-KILL", &master_pid.to_string()])
                    .status()?;
                ensure!(status.success(), "kill -KILL {master_pid}: {status}");
            } else {
                sentinels.sentinels[0].failover().await?;
            }
            let killed = Instant::now();
            sentinels
                .wait_master(replica, Duration::from_secs(20))
                .await?;
            eprintln!("replica promoted {:?} after the fault", killed.elapsed());
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            anyhow::Ok(())
        };
        let r = stopping.await;
        stop.store(true, Ordering::SeqCst);
        r
    };
    let (answers, killed) = tokio::join!(load, kill);
    let (answers, ()) = (answers?, killed?);
    if sigkill {
        c.redis.stop();
    }

    let mut epochs = Epochs::default();
    let mut statuses = BTreeMap::<u16, usize>::new();
    for (_, status, answer, data) in answers {
        *statuses.entry(status.as_u16()).or_default() += 1;
        epochs.record(status, answer, data)?;
    }
    eprintln!("publish answers during the failover: {statuses:?}");
    c.wait_ready(true, Duration::from_secs(15)).await?;
    // Both nodes publish on the new master; the last one marks the end.
    let mut last = Value::Null;
    for k in 0..6u64 {
        let data = json!({"after": k});
        let (_, status, answer, data) = publish_any(c.node((k % 2) as usize), chan, data).await?;
        ensure!(
            status == StatusCode::OK,
            "after the failover: {status} {answer}"
        );
        epochs.record(status, answer, data.clone())?;
        last = data;
    }
    let epochs_seen: std::collections::BTreeSet<&String> =
        epochs.accepted.keys().map(|(e, _)| e).collect();
    eprintln!(
        "accepted {} publishes in {} epochs",
        epochs.accepted.len(),
        epochs_seen.len()
    );
    ensure!(
        epochs_seen.len() >= 2,
        "the promoted replica has another run_id: streams must move to a new epoch"
    );
    for (_, label, rx) in clients.iter_mut() {
        let mut items = Vec::new();
        loop {
            let (channel, item) = rx.item().await.context(label.clone())?;
            ensure!(channel == chan, "{label}: item of {channel}: {item:?}");
            let end = matches!(&item, Got::Msg { data, .. } if *data == last);
            items.push(item);
            if end {
                break;
            }
        }
        let announced = epochs.check(label, &items)?;
        eprintln!(
            "{label}: {} items, {announced} epoch change(s) announced",
            items.len()
        );
        ensure!(
            announced >= 1,
            "{label}: the epoch moved without an announcement"
        );
        rx.expect_quiet(Duration::from_millis(300))
            .await
            .context(label.clone())?;
        rx.alive().await.context(label.clone())?;
    }
    Ok(())
}

#[tokio::test]
async fn sentinel_master_killed_mid_stream_every_publish_delivered_or_announced() -> R {
    let mut c = Cluster::builder(Backbone::Redis)
        .nodes(2)
        .redis_sentinel()
        .start()
        .await?;
    let r = sentinel_failover(&mut c, true).await;
    c.check(r)
}

#[tokio::test]
async fn sentinel_failover_command_mid_stream_every_publish_delivered_or_announced() -> R {
    let mut c = Cluster::builder(Backbone::Redis)
        .nodes(2)
        .redis_sentinel()
        .start()
        .await?;
    let r = sentinel_failover(&mut c, false).await;
    c.check(r)
}

#[tokio::test]
async fn sentinel_master_killed_with_a_nats_cluster_backbone_every_publish_delivered_or_announced(
) -> R {
    let mut c = Cluster::builder(Backbone::Nats)
        .nodes(2)
        .nats_servers(3)
        .redis_sentinel()
        .start()
        .await?;
    let r = sentinel_failover(&mut c, true).await;
    c.check(r)
}

// ---------------------------------------------------------------------------
// 6d. Redis Cluster: 3 masters + 3 replicas, sharded pub/sub
// ---------------------------------------------------------------------------

fn redis_cluster() -> harness::cluster::ClusterBuilder {
    Cluster::builder(Backbone::Redis).redis_cluster()
}

#[tokio::test]
async fn redis_cluster_broadcast_reaches_every_subscriber_once_in_order() -> R {
    let c = redis_cluster().nodes(2).start().await?;
    let r = broadcast(&c).await;
    c.check(r)
}

/// The unicast layout spreads three users over three nodes.
#[tokio::test]
async fn redis_cluster_unicast_reaches_only_the_users_connections_and_nodes() -> R {
    let c = redis_cluster().nodes(3).start().await?;
    let r = unicast(&c).await;
    c.check(r)
}

/// Subscribers on node0, publisher node2, resume on node1.
#[tokio::test]
async fn redis_cluster_resume_on_another_node_loses_and_duplicates_nothing() -> R {
    let c = redis_cluster().nodes(3).start().await?;
    let r = resume_elsewhere(&c).await;
    c.check(r)
}

/// The master holding the channel's slot is SIGKILLed (`sigkill`; its
/// replica is promoted ~2-3 s later), or its replica takes over by `CLUSTER
/// FAILOVER` (the old master drops the nodes' shard subscriptions and
/// becomes a replica), while both nodes publish every 10 ms: every
/// accepted publish reaches both subscribers, or the channel is announced
/// `unrecoverable` (`epoch_changed`) before it; never a silent gap, and
/// the channel lives on in a new epoch on the promoted replica.
async fn redis_cluster_failover(c: &mut Cluster, sigkill: bool) -> R {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let chan = "live";
    let mut clients = two_clients(c, chan).await?;
    let rc = c.redis_cluster.as_ref().context("redis cluster")?;
    let slot = rc.slot_of(&format!("gw:{{ch:{chan}}}:m")).await?;
    let master = rc.master_of(slot).await?;
    let master_pid = rc.servers[master].pid().context("master pid")?;
    // The subscribers' user stream (maybe on the same master): a unicast
    // after the failover must arrive.
    let other = "$user:rw6";
    let other_slot = rc.slot_of(&format!("gw:{{ch:{other}}}:m")).await?;
    eprintln!(
        "channel slot {slot} on server {master}; {other} slot {other_slot} on server {}",
        rc.master_of(other_slot).await?
    );

    let (sent, stop) = (AtomicU64::new(0), AtomicBool::new(false));
    let load = async {
        let mut answers = Vec::new();
        let mut k = 0u64;
        while !stop.load(Ordering::SeqCst) && k < 3_000 {
            let data = json!({"k": k, "p": payload(k)});
            answers.push(publish_any(c.node((k % 2) as usize), chan, data).await?);
            k += 1;
            sent.store(k, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::Ok(answers)
    };
    let kill = async {
        let stopping = async {
            while sent.load(Ordering::SeqCst) < 100 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let killed = Instant::now();
            if sigkill {
                let status = std::process::Command::new("kill")
                    .args(["-KILL", &master_pid.to_string()])
                    .status()?;
                ensure!(status.success(), "kill -KILL {master_pid}: {status}");
            } else {
                rc.manual_failover(slot).await?;
            }
            let promoted = rc
                .wait_failover(slot, master, Duration::from_secs(20))
                .await?;
            eprintln!(
                "server {promoted} took slot {slot} over {:?} after the fault (sigkill: {sigkill})",
                killed.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            anyhow::Ok(())
        };
        let r = stopping.await;
        stop.store(true, Ordering::SeqCst);
        r
    };
    let (answers, killed) = tokio::join!(load, kill);
    let (answers, ()) = (answers?, killed?);
    if sigkill {
        c.redis_cluster.as_mut().context("redis cluster")?.servers[master].stop();
    }

    let mut epochs = Epochs::default();
    let mut statuses = BTreeMap::<u16, usize>::new();
    for (_, status, answer, data) in answers {
        *statuses.entry(status.as_u16()).or_default() += 1;
        epochs.record(status, answer, data)?;
    }
    eprintln!("publish answers during the failover: {statuses:?}");
    ensure!(
        statuses.get(&200).copied().unwrap_or(0) > 100,
        "too few publishes accepted to test anything: {statuses:?}"
    );
    c.wait_ready(true, Duration::from_secs(15)).await?;
    let mut last = Value::Null;
    for k in 0..6u64 {
        let data = json!({"after": k});
        let (_, status, answer, data) = publish_any(c.node((k % 2) as usize), chan, data).await?;
        ensure!(
            status == StatusCode::OK,
            "after the failover: {status} {answer}"
        );
        epochs.record(status, answer, data.clone())?;
        last = data;
    }
    let epochs_seen: std::collections::BTreeSet<&String> =
        epochs.accepted.keys().map(|(e, _)| e).collect();
    eprintln!(
        "accepted {} publishes in {} epochs",
        epochs.accepted.len(),
        epochs_seen.len()
    );
    ensure!(
        epochs_seen.len() >= 2,
        "the promoted replica has another run_id: the stream must move to a new epoch"
    );
    for (_, label, rx) in clients.iter_mut() {
        let mut items = Vec::new();
        loop {
            let (channel, item) = rx.item().await.context(label.clone())?;
            ensure!(channel == chan, "{label}: item of {channel}: {item:?}");
            let end = matches!(&item, Got::Msg { data, .. } if *data == last);
            items.push(item);
            if end {
                break;
            }
        }
        let announced = epochs.check(label, &items)?;
        eprintln!(
            "{label}: {} items, {announced} epoch change(s) announced",
            items.len()
        );
        ensure!(
            announced >= 1,
            "{label}: the epoch moved without an announcement"
        );
        rx.expect_quiet(Duration::from_millis(300))
            .await
            .context(label.clone())?;
        rx.alive().await.context(label.clone())?;
    }
    // A unicast still reaches the user's connection after the failover.
    // (If the user stream's slot was the killed master's, its epoch moved
    // too: announced first.)
    let r = c.node(1).send("rw6", json!({"after": "failover"})).await?;
    let (mut channel, mut item) = clients[0].2.item().await.context("unicast after")?;
    if channel == other
        && matches!(&item, Got::Unrecoverable { reason, epoch, .. } if *reason == UnrecoverableReason::EpochChanged && *epoch == r.epoch)
    {
        (channel, item) = clients[0].2.item().await.context("unicast after")?;
    }
    ensure!(
        channel == other
            && matches!(&item, Got::Msg { seq, epoch, data } if *seq == r.seq && *epoch == r.epoch && *data == json!({"after": "failover"})),
        "unicast after the failover: {channel} {item:?} (sent {r:?})"
    );
    Ok(())
}

#[tokio::test]
async fn redis_cluster_master_killed_mid_stream_every_publish_delivered_or_announced() -> R {
    let mut c = redis_cluster().nodes(2).start().await?;
    let r = redis_cluster_failover(&mut c, true).await;
    c.check(r)
}

#[tokio::test]
async fn redis_cluster_manual_failover_mid_stream_every_publish_delivered_or_announced() -> R {
    let mut c = redis_cluster().nodes(2).start().await?;
    let r = redis_cluster_failover(&mut c, false).await;
    c.check(r)
}

/// The replay store's function library is on every master after start,
/// and a master that lost it (`FUNCTION FLUSH`, as a master added to the
/// cluster would lack it) gets it again at the next call: publishes on
/// channels of every master go on in the same epoch.
#[tokio::test]
async fn redis_cluster_function_library_is_on_every_master_and_reloaded() -> R {
    let c = redis_cluster().nodes(2).start().await?;
    let r = async {
        let rc = c.redis_cluster.as_ref().context("redis cluster")?;
        // One channel per master.
        let mut by_master: BTreeMap<usize, String> = BTreeMap::new();
        for i in 0..200 {
            let chan = format!("lib:{i}");
            let slot = rc.slot_of(&format!("gw:{{ch:{chan}}}:m")).await?;
            by_master.entry(rc.master_of(slot).await?).or_insert(chan);
            if by_master.len() == 3 {
                break;
            }
        }
        ensure!(by_master.len() == 3, "channels on {by_master:?}");
        let function = |cmd: &str| {
            let mut f = redis::cmd("FUNCTION");
            f.arg(cmd);
            f
        };
        let mut first = Vec::new();
        for (&m, chan) in &by_master {
            let mut conn = redis::Client::open(rc.servers[m].url())?
                .get_multiplexed_async_connection()
                .await?;
            let libs: Vec<redis::Value> = function("LIST").query_async(&mut conn).await?;
            ensure!(libs.len() == 1, "master {m}: libraries {libs:?}");
            first.push(c.node(0).publish(chan, json!(1)).await?);
            let _: String = function("FLUSH").query_async(&mut conn).await?;
            let libs: Vec<redis::Value> = function("LIST").query_async(&mut conn).await?;
            ensure!(libs.is_empty(), "master {m} still has {libs:?}");
        }
        for ((_, chan), before) in by_master.iter().zip(&first) {
            let after = c.node(1).publish(chan, json!(2)).await?;
            ensure!(
                after.seq == before.seq + 1 && after.epoch == before.epoch,
                "{chan}: {before:?} then {after:?}"
            );
        }
        anyhow::Ok(())
    }
    .await;
    c.check(r)
}

/// Starts a `--dev` gateway with `env`; it must exit by itself (within
/// the harness's timeout: no hang), unsuccessfully, saying each of `want`
/// on stderr. Returns everything it printed.
async fn refused_at_start(env: &[(&str, &str)], want: &[&str]) -> anyhow::Result<String> {
    let out = within(
        "the gateway refusing its config",
        tokio::process::Command::new(harness::gateway_bin())
            .args(["--dev", "--addr", "127.0.0.1:0"])
            .envs(env.iter().copied())
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && want.iter().all(|w| stderr.contains(w)),
        "{env:?}: {} {stderr}",
        out.status
    );
    Ok(format!("{}{stderr}", String::from_utf8_lossy(&out.stdout)))
}

/// `redis_cluster_urls` is one of three ways to name Redis: checked at start.
#[tokio::test]
async fn redis_cluster_settings_are_checked_at_start() -> R {
    let cases: [(&[(&str, &str)], &str); 3] = [
        (
            &[
                ("GATEWAY_REDIS_CLUSTER_URLS", "redis://127.0.0.1:1"),
                ("GATEWAY_REDIS_URL", "redis://127.0.0.1:1"),
            ],
            "set only one of redis_url, redis_sentinels, redis_cluster_urls",
        ),
        (
            &[("GATEWAY_REDIS_CLUSTER_URLS", "127.0.0.1:1")],
            "is not a redis://host:port URL",
        ),
        (
            &[
                ("GATEWAY_REDIS_CLUSTER_URLS", "redis://127.0.0.1:1"),
                ("GATEWAY_REDIS_MIN_REPLICA_ACKS", "1"),
            ],
            "redis_min_replica_acks is not supported with redis_cluster_urls",
        ),
    ];
    for (env, want) in cases {
        refused_at_start(env, &[want]).await?;
    }
    Ok(())
}

/// `redis_min_replica_acks = 1`: answered once the replica has the
/// message; with the replica gone, 503 (temporary) after the ack timeout.
#[tokio::test]
async fn redis_min_replica_acks_answers_after_the_replica_and_503_without_it() -> R {
    let mut c = Cluster::builder(Backbone::Redis)
        .nodes(1)
        .redis_sentinel()
        .env("GATEWAY_REDIS_MIN_REPLICA_ACKS", 1)
        .env("GATEWAY_REDIS_REPLICA_ACK_TIMEOUT_MS", 300)
        .start()
        .await?;
    let r = async {
        for i in 1..=3u64 {
            let r = c.node(0).publish("acked", payload(i)).await?;
            ensure!(r.seq == i, "{r:?}");
        }
        c.sentinels.as_mut().context("sentinels")?.replica.stop();
        let started = Instant::now();
        let (_, status, answer, _) = publish_any(c.node(0), "acked", payload(4)).await?;
        let took = started.elapsed();
        ensure!(
            status == StatusCode::SERVICE_UNAVAILABLE && answer["error"]["temporary"] == true,
            "without the replica: {status} {answer}"
        );
        ensure!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(3),
            "answered after {took:?}"
        );
        let missing = c
            .node(0)
            .metric("gateway_publish_replica_acks_missing_total")
            .await?;
        ensure!(missing == 1.0, "replica acks missing counted {missing}");
        anyhow::Ok(())
    }
    .await;
    c.check(r)
}

/// The failover settings are checked at start, with a message naming them.
#[tokio::test]
async fn failover_settings_are_checked_at_start() -> R {
    let cases: [(&[(&str, &str)], &str); 3] = [
        (
            &[("GATEWAY_REDIS_SENTINELS", "127.0.0.1:1")],
            "redis_sentinels and redis_master_name go together",
        ),
        (
            &[
                ("GATEWAY_REDIS_SENTINELS", "127.0.0.1:1"),
                ("GATEWAY_REDIS_MASTER_NAME", "gw"),
                ("GATEWAY_REDIS_URL", "redis://127.0.0.1:1"),
            ],
            "set redis_url or redis_sentinels, not both",
        ),
        (
            &[("GATEWAY_REDIS_MIN_REPLICA_ACKS", "1")],
            "redis_min_replica_acks needs Redis",
        ),
    ];
    for (env, want) in cases {
        refused_at_start(env, &[want]).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 6e. Redis and Sentinel with passwords
// ---------------------------------------------------------------------------

fn redis_auth(username: Option<&str>, sentinel_password: Option<&str>) -> RedisAuth {
    RedisAuth {
        server: ServerAuth {
            username: username.map(str::to_owned),
            password: "srv-pass-7".into(),
        },
        sentinel_password: sentinel_password.map(str::to_owned),
    }
}

/// Which databases of the Redis at `url` hold keys (`INFO keyspace`).
async fn databases_with_keys(url: &str) -> anyhow::Result<Vec<String>> {
    let mut conn = within(
        "redis connect",
        redis::Client::open(url)?.get_multiplexed_async_connection(),
    )
    .await??;
    let info: String = redis::cmd("INFO")
        .arg("keyspace")
        .query_async(&mut conn)
        .await?;
    Ok(info
        .lines()
        .filter_map(|l| l.split_once(':').map(|(db, _)| db.to_owned()))
        .filter(|db| db.starts_with("db"))
        .collect())
}

/// A Redis that requires an ACL user's password, given to the nodes as
/// settings (`redis_url` carries none) with a database number: messages
/// cross nodes, and the keys are in that database.
#[tokio::test]
async fn redis_password_user_and_db_settings_reach_a_password_protected_redis() -> R {
    let c = Cluster::builder(Backbone::Redis)
        .nodes(2)
        .redis_auth(redis_auth(Some("gw-app"), None))
        .env("GATEWAY_REDIS_DB", 5)
        .start()
        .await?;
    let r = async {
        let chan = "locked";
        let mut clients = two_clients(&c, chan).await?;
        for k in 1..=3u64 {
            let r = c.node((k % 2) as usize).publish(chan, json!({"k": k})).await?;
            ensure!(r.seq == k, "{r:?}");
        }
        for (_, label, rx) in clients.iter_mut() {
            for k in 1..=3u64 {
                let (channel, item) = rx.item().await.context(label.clone())?;
                ensure!(
                    channel == chan
                        && matches!(&item, Got::Msg { seq, data, .. } if *seq == k && *data == json!({"k": k})),
                    "{label}: {channel} {item:?}"
                );
            }
        }
        let dbs = databases_with_keys(&c.redis.url()).await?;
        ensure!(dbs == ["db5"], "keys in {dbs:?}, not only in db5");
        anyhow::Ok(())
    }
    .await;
    c.check(r)
}

/// Servers with an ACL user's password, sentinels with a password of
/// their own, a database number: the nodes find the master through the
/// sentinels, deliver across nodes and survive the master's SIGKILL with
/// the same check as without passwords; the promoted replica holds the
/// keys in that database.
#[tokio::test]
async fn sentinel_with_passwords_master_killed_every_publish_delivered_or_announced() -> R {
    let mut c = Cluster::builder(Backbone::Redis)
        .nodes(2)
        .redis_sentinel()
        .redis_auth(redis_auth(Some("gw-app"), Some("sent-pass-3")))
        .env("GATEWAY_REDIS_DB", 2)
        .start()
        .await?;
    let r = async {
        sentinel_failover(&mut c, true).await?;
        let replica = &c.sentinels.as_ref().context("sentinels")?.replica;
        let dbs = databases_with_keys(&replica.url()).await?;
        ensure!(dbs == ["db2"], "keys in {dbs:?}, not only in db2");
        anyhow::Ok(())
    }
    .await;
    c.check(r)
}

/// A wrong or missing password (the servers' or the sentinels') stops a
/// node at start, saying why, instead of leaving it retrying.
#[tokio::test]
async fn sentinel_wrong_passwords_stop_the_node_at_start_with_the_reason() -> R {
    let auth = redis_auth(None, Some("sent-pass-3"));
    let master = harness::cluster::Service::start_opts(
        harness::cluster::ServiceKind::Redis,
        harness::cluster::ServiceOptions {
            persistence: harness::cluster::Persistence::Rdb,
            auth: Some(auth.server.clone()),
            ..Default::default()
        },
    )
    .await?;
    let sentinels = harness::failover::Sentinels::start(&master, Some(&auth)).await?;
    let addrs = sentinels.addrs();
    let base = [
        ("GATEWAY_REDIS_SENTINELS", addrs.as_str()),
        ("GATEWAY_REDIS_MASTER_NAME", harness::failover::MASTER_NAME),
    ];
    let with = |more: &[(&'static str, &'static str)]| {
        let mut env = base.to_vec();
        env.extend_from_slice(more);
        env
    };
    let no_master = "no master for redis_master_name \"gw\" at start";
    let hint = "check redis_password";
    // The servers' password wrong: the master refuses the ROLE check.
    let printed = refused_at_start(
        &with(&[
            ("GATEWAY_REDIS_PASSWORD", "wrong-pass"),
            ("GATEWAY_REDIS_SENTINEL_PASSWORD", "sent-pass-3"),
        ]),
        &[no_master, "AuthenticationFailed", hint],
    )
    .await?;
    // The sentinels' password wrong, then missing.
    refused_at_start(
        &with(&[
            ("GATEWAY_REDIS_PASSWORD", "srv-pass-7"),
            ("GATEWAY_REDIS_SENTINEL_PASSWORD", "wrong-pass"),
        ]),
        &[no_master, "AuthenticationFailed", hint],
    )
    .await?;
    refused_at_start(
        &with(&[("GATEWAY_REDIS_PASSWORD", "srv-pass-7")]),
        &[no_master, hint],
    )
    .await?;
    // No password in what the node printed.
    ensure!(
        !printed.contains("wrong-pass") && !printed.contains("sent-pass-3"),
        "a password in the output: {printed}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 7. scripts/cluster.sh
// ---------------------------------------------------------------------------

/// Runs `scripts/cluster.sh` with `args`, output to `log`; waits for it.
async fn cluster_script(args: &[&str], log: &std::path::Path) -> anyhow::Result<()> {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace")?;
    let out = std::fs::File::create(log)?;
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(workspace.join("scripts/cluster.sh"))
        .args(args)
        .current_dir(workspace)
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    for (k, _) in std::env::vars() {
        if k.starts_with("GATEWAY_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            ensure!(status.success(), "cluster.sh {args:?}: {status}\n{text}");
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "cluster.sh {args:?} still running after 60 s\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a process runs (a zombie no longer does).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
    }
}

/// Runs `down` (and kills what is left) on drop, whatever the test did.
struct ScriptCluster {
    dir: TempDir,
    pids: Vec<u32>,
}

impl Drop for ScriptCluster {
    fn drop(&mut self) {
        let dir = self.dir.path().to_string_lossy().into_owned();
        let _ = std::process::Command::new("bash")
            .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cluster.sh"))
            .args(["down", "--dir", &dir])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        for pid in &self.pids {
            if running(*pid) {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status();
            }
        }
    }
}

#[tokio::test]
async fn cluster_script_up_serves_through_the_balancer_and_down_leaves_nothing() -> R {
    cluster_script_round("redis").await
}

/// `--backbone redis-cluster`: six redis-servers made a Redis Cluster, the
/// nodes on `redis_cluster_urls`.
#[tokio::test]
async fn cluster_script_with_a_redis_cluster_serves_and_down_leaves_nothing() -> R {
    cluster_script_round("redis-cluster").await
}

/// `cluster.sh up --backbone <backbone>`: a subscriber through the balancer
/// gets what is published through it; `down` ends every process and
/// frees every address.
async fn cluster_script_round(backbone: &str) -> R {
    let bin = harness::gateway_bin(); // built, for the script to find
    let profile = bin
        .parent()
        .and_then(|d| d.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("debug");
    let mut sc = ScriptCluster {
        dir: TempDir::new()?,
        pids: Vec::new(),
    };
    let dir = sc.dir.path().join("cluster");
    let dir_s = dir.to_string_lossy().into_owned();
    let mut up: Vec<&str> = vec!["up", "--dir", &dir_s, "--backbone", backbone];
    if profile == "release" {
        up.push("--release");
    }
    cluster_script(&up, &sc.dir.path().join("up.log")).await?;
    let logs = |dir: &std::path::Path| {
        let mut names: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        names.retain(|p| p.extension().is_some_and(|e| e == "log"));
        names.sort();
        let mut out = String::new();
        for path in names {
            out.push_str(&format!(
                "---- {} ----\n{}\n",
                path.display(),
                std::fs::read_to_string(&path).unwrap_or_default()
            ));
        }
        out
    };
    let mut pids = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "pid") {
            pids.push(std::fs::read_to_string(&path)?.trim().parse::<u32>()?);
        }
    }
    sc.pids = pids.clone();
    // One or six redis-servers, nats, 3 nodes, haproxy.
    let servers = if backbone == "redis-cluster" { 6 } else { 1 };
    ensure!(pids.len() == servers + 5, "pid files: {pids:?}");
    let env: HashMap<String, String> = std::fs::read_to_string(dir.join("env"))?
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect();
    let lb = env.get("LB_URL").context("LB_URL in env")?.clone();
    let node_urls: Vec<String> = env
        .get("NODE_URLS")
        .context("NODE_URLS")?
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    ensure!(node_urls.len() == 3, "{node_urls:?}");
    ensure!(
        env.get("BACKBONE").map(String::as_str) == Some(backbone),
        "{env:?}"
    );

    let body = async {
        let http = reqwest::Client::builder().no_proxy().build()?;
        let chan = "demo";
        let mut sse = sse_at(&http, &lb, &[chan], None, None).await?;
        let (_, connected) = sse_connected(&mut sse).await?;
        ensure!(connected.node.starts_with("node"), "{connected:?}");
        let mut rx = Rx::Sse(sse);
        let mut want = Vec::new();
        for i in 1..=10u64 {
            let (status, answer) = post_api(
                &http,
                &format!("{lb}/api/publish"),
                &json!({"channel": chan, "data": payload(i)}),
            )
            .await?;
            ensure!(
                status == StatusCode::OK,
                "publish via LB: {status} {answer}"
            );
            let r: PublishResult = serde_json::from_value(answer)?;
            ensure!(r.seq == i, "{r:?}");
            want.push(Got::msg(i, &r.epoch, payload(i)));
        }
        expect_items("sse via LB", &mut rx, &[(chan, want)]).await?;
        anyhow::Ok(())
    };
    body.await.map_err(|e| e.context(logs(&dir)))?;

    let down_at = Instant::now();
    cluster_script(&["down", "--dir", &dir_s], &sc.dir.path().join("down.log")).await?;
    while let Some(pid) = pids.iter().find(|p| running(**p)) {
        ensure!(
            down_at.elapsed() < TIMEOUT,
            "process {pid} still running after `down`"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut urls = node_urls.clone();
    urls.push(lb.clone());
    urls.push(env.get("NATS_URL").context("NATS_URL")?.clone());
    let redis = match backbone {
        "redis-cluster" => "REDIS_CLUSTER_URLS",
        _ => "REDIS_URL",
    };
    let redis_urls: Vec<&str> = env.get(redis).context("redis")?.split(',').collect();
    ensure!(
        redis_urls.len() == if redis == "REDIS_URL" { 1 } else { 6 },
        "{redis}: {redis_urls:?}"
    );
    urls.extend(redis_urls.into_iter().map(str::to_owned));
    for url in urls {
        let addr = url.split("://").nth(1).context("addr")?;
        let connect = within("connect", tokio::net::TcpStream::connect(addr)).await?;
        ensure!(
            connect.is_err(),
            "{addr} still accepts connections after `down`"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 7. Redis comes back with less history than it acknowledged
// ---------------------------------------------------------------------------

#[path = "history_loss.rs"]
mod history_loss;

/// A resume token is a bearer credential for its lifetime: it is accepted
/// once, on any node (the claim is in the registry, Redis).
#[tokio::test]
async fn a_resume_token_is_accepted_once_across_the_cluster() -> R {
    let c = Cluster::builder(Backbone::Redis).nodes(3).start().await?;
    let token = c.node(0).token("ann", &["news"], &[], 600);
    let (mut ws, _) = c.node(0).ws_connected(Codec::Json, &token).await?;
    ws.subscribe("news", None).await?;
    c.drain_node(0).await?;
    let resume = loop {
        if let ServerFrame::Reconnect(r) = ws.recv().await? {
            break r.token;
        }
    };
    let connect = |id| {
        ClientFrame::Connect(protocol::Connect {
            id: Some(id),
            token: None,
            since: None,
            resume: Some(resume.clone()),
        })
    };
    let mut first = WsClient::open_at(c.node(1).addr, Codec::Json).await?;
    first.send(&connect(1)).await?;
    match first.recv().await? {
        ServerFrame::Connected(k) => ensure!(k.user == "ann" && k.resumed == ["news"], "{k:?}"),
        other => bail!("expected connected, got {other:?}"),
    }
    let mut again = WsClient::open_at(c.node(2).addr, Codec::Json).await?;
    again.send(&connect(2)).await?;
    let e = again
        .expect_error(protocol::ErrorCode::Unauthorized, Some(2))
        .await?;
    ensure!(e.message.contains("already used"), "{e:?}");
    Ok(())
}
