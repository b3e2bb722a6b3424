//! Redis comes back with less history than it acknowledged (a restart from
//! an RDB snapshot, an AOF that is behind, keys evicted under `maxmemory`).
//! A (channel, epoch, seq) must never name two different messages: the
//! stream moves to a new epoch, and every subscriber either gets each
//! message published afterwards or an `unrecoverable` (`epoch_changed`) for
//! the channel first. Never a new message dropped as a duplicate.

use client_sdk::{Backoff, Client, Event};
use harness::cluster::{Persistence, Service};
use protocol::Message;

use super::*;

/// How Redis loses the tail of its history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// SIGKILL, then a restart from the snapshot `SAVE`d after message 5.
    Rdb,
    /// SIGKILL, the AOF cut back to where it was after message 5 (what the
    /// OS loses of an `appendfsync everysec` file when the machine dies),
    /// then a restart from it.
    AofBehind,
    /// Every key evicted under `maxmemory` (no restart).
    Evicted,
}

/// The AOF file Redis appends to (Redis 7's multi-part AOF).
fn incr_aof(redis: &Service) -> anyhow::Result<std::path::PathBuf> {
    let dir = redis
        .dir()
        .context("Redis keeps no files")?
        .join("appendonlydir");
    std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with(".incr.aof"))
        .with_context(|| format!("no *.incr.aof in {}", dir.display()))
}

async fn redis_cmd(c: &Cluster, args: &[&str]) -> anyhow::Result<redis::Value> {
    let mut conn = c.redis_conn().await?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    Ok(within(args[0], cmd.query_async::<redis::Value>(&mut conn)).await??)
}

/// The next message of an SDK subscription.
async fn sdk_recv(sub: &mut client_sdk::Subscription) -> anyhow::Result<Message> {
    within("an SDK message", sub.recv())
        .await?
        .context("the SDK subscription ended")
}

async fn history_loss(c: &mut Cluster, loss: Loss) -> R {
    let chan = "st";
    // A WebSocket on node0, a plain SSE stream on node1, and the Rust SDK.
    let mut clients = two_clients(c, chan).await?;

    let mut epoch = String::new();
    let mut before = Vec::new();
    let mut aof_len = 0;
    let mut sdk = None;
    for i in 1..=10u64 {
        if i == 6 {
            // The SDK's user joins after the snapshot: the registry Redis
            // comes back with does not know it (the node must re-announce it
            // for unicasts to find it).
            let client = Client::builder(c.node(1).url(""))
                .token(c.node(1).token("sdk10", &[chan], &[], 600))
                .backoff(Backoff::new(
                    Duration::from_millis(50),
                    Duration::from_millis(500),
                ))
                .connect()
                .await?;
            let events = client.events();
            let sub = client.subscribe(chan).await?;
            sdk = Some((client, events, sub));
        }
        let r = c.node(0).publish(chan, payload(i)).await?;
        ensure!(r.seq == i, "publish {i}: {r:?}");
        epoch = r.epoch.clone();
        before.push(Got::msg(i, &epoch, payload(i)));
        if i == 5 {
            match loss {
                Loss::Rdb => {
                    redis_cmd(c, &["SAVE"]).await?;
                }
                Loss::AofBehind => aof_len = std::fs::metadata(incr_aof(&c.redis)?)?.len(),
                Loss::Evicted => {}
            }
        }
    }
    for (_, label, rx) in &mut clients {
        expect_items(label, rx, &[(chan, before.clone())]).await?;
    }
    let (sdk, mut sdk_events, mut sdk_sub) = sdk.context("the SDK client")?;
    let mut sdk_user = sdk.user_stream();
    for i in 6..=10 {
        let m = sdk_recv(&mut sdk_sub).await?;
        ensure!(m.seq == i && m.epoch == epoch, "SDK before the loss: {m:?}");
    }
    // Positions taken before the loss, to resume from afterwards.
    let sse_cursor = match &clients[1].2 {
        Rx::Sse(sse) => sse.last_event_id.clone().context("SSE cursor")?,
        Rx::Ws(_) => bail!("the second client is the SSE one"),
    };

    match loss {
        Loss::Rdb => {
            c.redis.stop();
            c.redis.start().await?;
        }
        Loss::AofBehind => {
            c.redis.stop();
            let aof = incr_aof(&c.redis)?;
            let len = std::fs::metadata(&aof)?.len();
            ensure!(len > aof_len, "the AOF did not grow after message 5");
            std::fs::OpenOptions::new()
                .write(true)
                .open(&aof)?
                .set_len(aof_len)?;
            c.redis.start().await?;
        }
        Loss::Evicted => {
            redis_cmd(c, &["CONFIG", "SET", "maxmemory-policy", "allkeys-random"]).await?;
            // Below what the data takes: Redis evicts every key it can.
            redis_cmd(c, &["CONFIG", "SET", "maxmemory", "1"]).await?;
            let _ = redis_cmd(c, &["SET", "gw-test-evict", "x"]).await;
            redis_cmd(c, &["CONFIG", "SET", "maxmemory", "0"]).await?;
            let meta = c.redis_hash(&format!("gw:{{ch:{chan}}}:m")).await?;
            ensure!(meta.is_empty(), "the stream's meta survived: {meta:?}");
        }
    }
    c.wait_ready(true, Duration::from_secs(15))
        .await
        .context("nodes must be ready after Redis came back")?;
    // A node may not have noticed the restart yet: its first command on the
    // old connection fails (503, temporary). A backend retries; here a probe
    // channel takes those failures, so the channel's numbering stays exact.
    for i in 0..c.len() {
        within("a publish after the restart", async {
            loop {
                let (status, _) = c
                    .node(i)
                    .try_post("/api/publish", &json!({"channel": "probe", "data": i}))
                    .await?;
                if status == StatusCode::OK {
                    return anyhow::Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await??;
    }
    // Every other connection a node holds to Redis (registry, subscriber)
    // fails its first command after the restart and reconnects; the
    // heartbeat (every 400 ms here) does that for the registry's.
    tokio::time::sleep(Duration::from_millis(1_000)).await;

    // The first publishes to meet the stale state must not reuse (E, 6..10).
    let mut after = Vec::new();
    let mut new_epoch = String::new();
    for i in 11..=15u64 {
        let r = c.node(0).publish(chan, payload(i)).await?;
        ensure!(
            r.epoch != epoch,
            "message {i} acknowledged in the old epoch: {r:?} (seq reused)"
        );
        ensure!(
            new_epoch.is_empty() || r.epoch == new_epoch,
            "epoch moved twice: {r:?}"
        );
        new_epoch = r.epoch.clone();
        ensure!(r.seq == i - 10, "message {i}: {r:?}");
        after.push(Got::msg(i - 10, &new_epoch, payload(i)));
    }
    let epoch_changed = |seq: u64| Got::Unrecoverable {
        reason: UnrecoverableReason::EpochChanged,
        epoch: new_epoch.clone(),
        seq,
    };
    let mut want = vec![epoch_changed(0)];
    want.extend(after.clone());
    for (_, label, rx) in &mut clients {
        expect_items(label, rx, &[(chan, want.clone())])
            .await
            .with_context(|| format!("{label} after the loss ({loss:?})"))?;
    }
    // The SDK: its documented event, then every new message.
    within("the SDK's unrecoverable event", async {
        loop {
            match sdk_events.recv().await? {
                Event::Unrecoverable {
                    channel, reason, ..
                } if channel == chan => {
                    ensure!(
                        reason == UnrecoverableReason::EpochChanged,
                        "SDK: {reason:?}"
                    );
                    return anyhow::Ok(());
                }
                _ => {}
            }
        }
    })
    .await??;
    for i in 1..=5 {
        let m = sdk_recv(&mut sdk_sub).await?;
        ensure!(
            m.seq == i && m.epoch == new_epoch && m.data == payload(i + 10),
            "SDK after the loss: {m:?}"
        );
    }

    // Resumes from positions taken before the loss: told, then live.
    let mut ws = c.node(1).ws(Codec::Json).await?;
    ws.hello(Some(&c.node(1).token("late10", &[chan], &[], 600)))
        .await?;
    let (sub, early) = subscribe_amid(&mut ws, chan, Some(pos(7, &epoch))).await?;
    ensure!(
        early.is_empty() && sub.recovered == Some(false) && sub.epoch == new_epoch,
        "resume from 7 of the old epoch: {sub:?} {early:?}"
    );
    let mut resumed_ws = Rx::Ws(ws);
    expect_items(
        "WS resumed",
        &mut resumed_ws,
        &[(chan, vec![epoch_changed(5)])],
    )
    .await?;
    // The same user as the first SSE stream: its cursor names that user's
    // own stream too, which lost its history as well.
    let (user, _, _) = &clients[1];
    let token = c.node(0).token(user, &[chan], &[], 600);
    let mut sse = c
        .node(0)
        .sse(&[chan], Some(&token), Some(&sse_cursor))
        .await?;
    sse_connected(&mut sse).await?;
    let mut resumed_sse = Rx::Sse(sse);
    let got = resumed_sse.take(2).await.context("SSE resumed")?;
    let uchan = format!("$user:{user}");
    ensure!(
        got.get(chan) == Some(&vec![epoch_changed(5)])
            && matches!(
                got.get(&uchan).map(Vec::as_slice),
                Some([Got::Unrecoverable {
                    reason: UnrecoverableReason::EpochChanged,
                    ..
                }])
            ),
        "SSE resumed (Last-Event-ID {sse_cursor}): {got:?}"
    );

    let r = c.node(1).publish(chan, payload(16)).await?;
    ensure!(r.seq == 6 && r.epoch == new_epoch, "message 16: {r:?}");
    let m16 = Got::msg(6, &new_epoch, payload(16));
    for (label, rx) in clients
        .iter_mut()
        .map(|(_, l, rx)| (l.as_str(), rx))
        .chain([
            ("WS resumed", &mut resumed_ws),
            ("SSE resumed", &mut resumed_sse),
        ])
    {
        expect_items(label, rx, &[(chan, vec![m16.clone()])]).await?;
        rx.expect_quiet(Duration::from_millis(200))
            .await
            .with_context(|| label.to_owned())?;
    }
    let m = sdk_recv(&mut sdk_sub).await?;
    ensure!(m.seq == 6 && m.epoch == new_epoch, "SDK: {m:?}");
    // A unicast to the user who joined after the snapshot reaches it.
    let r = c.node(0).send("sdk10", json!({"to": "sdk10"})).await?;
    let m = sdk_recv(&mut sdk_user)
        .await
        .context("unicast after the loss")?;
    ensure!(
        m.seq == r.seq && m.epoch == r.epoch && m.data == json!({"to": "sdk10"}),
        "SDK user stream: {m:?}, sent {r:?}"
    );
    let stats = sdk.stats();
    ensure!(stats.gaps == 0, "SDK saw a silent gap: {stats:?}");

    if loss != Loss::Evicted {
        let resets = c
            .node(0)
            .metric_with("gateway_replay_streams_reset_total", "store_restarted")
            .await?;
        ensure!(resets >= 1.0, "node0 counted {resets} stream resets");
    }
    sdk.close().await;
    Ok(())
}

/// A two-node cluster on `backbone` whose Redis keeps `persistence`, put
/// through `loss`.
async fn run(backbone: Backbone, persistence: Persistence, loss: Loss) -> R {
    let mut c = Cluster::builder(backbone)
        .nodes(2)
        .redis_persistence(persistence)
        .start()
        .await?;
    let r = history_loss(&mut c, loss).await;
    c.check(r)
}

#[tokio::test]
async fn cluster_redis_restart_from_rdb_moves_streams_to_a_new_epoch_redis() -> R {
    run(Backbone::Redis, Persistence::Rdb, Loss::Rdb).await
}

#[tokio::test]
async fn cluster_redis_restart_from_rdb_moves_streams_to_a_new_epoch_nats() -> R {
    run(Backbone::Nats, Persistence::Rdb, Loss::Rdb).await
}

#[tokio::test]
async fn cluster_redis_restart_from_an_aof_behind_moves_streams_to_a_new_epoch() -> R {
    run(Backbone::Redis, Persistence::Aof, Loss::AofBehind).await
}

#[tokio::test]
async fn cluster_redis_keys_evicted_under_maxmemory_move_streams_to_a_new_epoch() -> R {
    run(Backbone::Redis, Persistence::None, Loss::Evicted).await
}
