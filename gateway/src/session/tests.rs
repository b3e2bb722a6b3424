//! The delivery rules (duplicate, gap, epoch change, unrecoverable, resume)
//! against the in-memory replay store and backbone: no processes, no
//! sockets. Integration tests prove the wiring; these prove the rules.

use std::time::Duration;

use protocol::{Codec, Position, ServerFrame, UnrecoverableReason};
use serde_json::json;

use super::*;
use crate::broker::MemoryBroker;
use crate::drain::{self, Drain};
use crate::hub::Hub;
use crate::replay::MemoryReplayStore;

const C: &str = "room";

struct Parts {
    ctx: Arc<SessionContext>,
    store: Arc<MemoryReplayStore>,
}

/// A node's session context on in-memory parts; the store keeps
/// `max_messages` per channel and forgets an idle stream after `meta_ttl`.
fn parts(max_messages: usize, meta_ttl: Duration) -> Parts {
    let store = Arc::new(MemoryReplayStore::new(
        Duration::from_secs(60),
        max_messages,
        meta_ttl,
    ));
    let hub = Arc::new(Hub::new(1 << 20));
    let broker = Arc::new(MemoryBroker::new(store.clone(), hub.clone()));
    let config = crate::config::Config::default();
    let drain = Arc::new(Drain::new(
        drain::Settings::from_config(&config),
        drain::Limits::from_config(&config),
    ));
    let ctx = Arc::new(SessionContext::new(
        "test".into(),
        hub,
        store.clone(),
        broker,
        Metrics::new(),
        drain,
        8,
    ));
    Parts { ctx, store }
}

fn session(p: &Parts) -> Session {
    let slot = p.ctx.drain.admit().expect("admitted");
    Session::new(p.ctx.clone(), slot, Codec::Json, Transport::Ws)
}

/// What the transport was handed, readably: `3@E` for a message,
/// `!too_old 4@E` for an unrecoverable, `+sub 0@E` for subscribed.
fn seen(out: &[Outgoing]) -> Vec<String> {
    out.iter()
        .map(|o| match o {
            Outgoing::Publication(p) | Outgoing::Replayed(p) => format!("{}@{}", p.seq, p.epoch),
            Outgoing::Frame(ServerFrame::Unrecoverable(u)) => {
                format!("!{} {}@{}", wire_name(&u.reason), u.seq, u.epoch)
            }
            Outgoing::Frame(ServerFrame::Subscribed(s)) => {
                format!("+sub {}@{} {:?}", s.seq, s.epoch, s.recovered)
            }
            Outgoing::Frame(f) => format!("{f:?}"),
        })
        .collect()
}

async fn publish(p: &Parts, n: u64) -> Arc<Publication> {
    match p
        .ctx
        .broker
        .publish(C, crate::message::Draft::new(json!({ "n": n }), 0))
        .await
        .expect("memory publish")
    {
        crate::replay::Appended::New(p) => p,
        other => panic!("no key, yet {other:?}"),
    }
}

/// Appends to the store only: a message the hub never saw (lost on the
/// backbone, say).
async fn append_only(p: &Parts, n: u64) -> Arc<Publication> {
    p.store
        .append(C, json!({ "n": n }), 0)
        .await
        .expect("append")
}

async fn drained(s: &mut Session) -> Vec<Outgoing> {
    let mut out = Vec::new();
    s.drain_queue(&mut out).await.expect("not behind");
    out
}

#[tokio::test]
async fn live_messages_arrive_once_in_order() {
    let p = parts(100, Duration::from_secs(60));
    let mut s = session(&p);
    let mut out = Vec::new();
    s.subscribe(None, C, None, &mut out)
        .await
        .expect("subscribe");
    let e = match &out[0] {
        Outgoing::Frame(ServerFrame::Subscribed(sub)) => sub.epoch.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(seen(&out), [format!("+sub 0@{e} None")]);
    for n in 1..=3 {
        publish(&p, n).await;
    }
    assert_eq!(
        seen(&drained(&mut s).await),
        [format!("1@{e}"), format!("2@{e}"), format!("3@{e}")]
    );
    assert!(drained(&mut s).await.is_empty(), "nothing twice");
}

#[tokio::test]
async fn duplicates_are_dropped() {
    let p = parts(100, Duration::from_secs(60));
    let mut s = session(&p);
    s.subscribe(None, C, None, &mut Vec::new())
        .await
        .expect("subscribe");
    let m1 = publish(&p, 1).await;
    let m2 = publish(&p, 2).await;
    drained(&mut s).await;
    let mut out = Vec::new();
    s.admit(m1, &mut out).await;
    s.admit(m2, &mut out).await;
    assert!(out.is_empty(), "{:?}", seen(&out));
    assert_eq!(s.position(C), Some(Position::new(2, &*p.store_epoch())));
}

#[tokio::test]
async fn a_gap_is_filled_from_the_store_before_the_message() {
    let p = parts(100, Duration::from_secs(60));
    let mut s = session(&p);
    s.subscribe(None, C, None, &mut Vec::new())
        .await
        .expect("subscribe");
    append_only(&p, 1).await;
    append_only(&p, 2).await;
    let m3 = append_only(&p, 3).await;
    let e = m3.epoch.to_string();
    let mut out = Vec::new();
    s.admit(m3, &mut out).await;
    assert_eq!(
        seen(&out),
        [format!("1@{e}"), format!("2@{e}"), format!("3@{e}")]
    );
}

#[tokio::test]
async fn a_gap_the_store_cannot_fill_is_announced_not_skipped() {
    // The store keeps 2 messages: 1..3 are gone when 5 arrives.
    let p = parts(2, Duration::from_secs(60));
    let mut s = session(&p);
    s.subscribe(None, C, None, &mut Vec::new())
        .await
        .expect("subscribe");
    for n in 1..=4 {
        append_only(&p, n).await;
    }
    let m5 = append_only(&p, 5).await;
    let e = m5.epoch.to_string();
    let mut out = Vec::new();
    s.admit(m5, &mut out).await;
    assert_eq!(seen(&out), [format!("!too_old 4@{e}"), format!("5@{e}")]);
    assert_eq!(s.position(C), Some(Position::new(5, &*e)));
}

#[tokio::test]
async fn a_new_epoch_is_announced_then_followed_from_its_start() {
    // The stream's history is forgotten (meta TTL) and starts again.
    let p = parts(100, Duration::from_millis(1));
    let mut s = session(&p);
    s.subscribe(None, C, None, &mut Vec::new())
        .await
        .expect("subscribe");
    let old = publish(&p, 1).await;
    drained(&mut s).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    p.store.sweep();
    append_only(&p, 2).await; // seq 1 of the new epoch, missed live
    let m = append_only(&p, 3).await; // seq 2 of the new epoch
    assert_ne!(m.epoch, old.epoch);
    assert_eq!(m.seq, 2, "a new epoch starts again at 1");
    let e = m.epoch.to_string();
    let mut out = Vec::new();
    s.admit(m, &mut out).await;
    // Never dropped as a duplicate of the old epoch's seq 1..2.
    assert_eq!(
        seen(&out),
        [
            format!("!epoch_changed 0@{e}"),
            format!("1@{e}"),
            format!("2@{e}")
        ]
    );
    // The old epoch's messages arriving late are not delivered again.
    let mut out = Vec::new();
    s.admit(old, &mut out).await;
    assert!(
        out.is_empty(),
        "a late old-epoch message switches nothing back: {:?}",
        seen(&out)
    );
    assert_eq!(s.position(C), Some(Position::new(2, &*e)));
}

#[tokio::test]
async fn a_resume_replays_exactly_what_was_missed() {
    let p = parts(100, Duration::from_secs(60));
    for n in 1..=5 {
        publish(&p, n).await;
    }
    let e = p.store_epoch();
    let mut s = session(&p);
    let mut out = Vec::new();
    s.subscribe(Some(1), C, Some(Position::new(2, &*e)), &mut out)
        .await
        .expect("subscribe");
    assert_eq!(
        seen(&out),
        [
            format!("+sub 5@{e} Some(true)"),
            format!("3@{e}"),
            format!("4@{e}"),
            format!("5@{e}")
        ]
    );
    // The seam: a live copy of 5 is a duplicate, 6 follows.
    publish(&p, 6).await;
    assert_eq!(seen(&drained(&mut s).await), [format!("6@{e}")]);
}

#[tokio::test]
async fn a_resume_that_cannot_be_served_says_why() {
    let p = parts(2, Duration::from_secs(60));
    for n in 1..=5 {
        publish(&p, n).await;
    }
    let e = p.store_epoch();
    let cases = [
        (Position::new(1, &*e), "too_old"),
        (Position::new(1, "OtherEpc"), "epoch_changed"),
        (Position::new(9, &*e), "bad_position"),
    ];
    for (since, reason) in cases {
        let mut s = session(&p);
        let mut out = Vec::new();
        s.subscribe(None, C, Some(since.clone()), &mut out)
            .await
            .expect("subscribe");
        assert_eq!(
            seen(&out),
            [
                format!("+sub 5@{e} Some(false)"),
                format!("!{reason} 5@{e}")
            ],
            "from {since:?}"
        );
        assert_eq!(s.position(C), Some(Position::new(5, &*e)));
    }
}

#[tokio::test]
async fn subscriptions_are_bounded_and_checked() {
    let p = parts(100, Duration::from_secs(60));
    let mut s = session(&p);
    for i in 0..8 {
        let c = format!("c{i}");
        s.check_new_subscription(&c).expect("under the limit");
        s.subscribe(None, &c, None, &mut Vec::new())
            .await
            .expect("subscribe");
    }
    assert_eq!(
        s.check_new_subscription("c0"),
        Err(ErrorCode::AlreadySubscribed)
    );
    assert_eq!(
        s.check_new_subscription("c9"),
        Err(ErrorCode::TooManySubscriptions)
    );
    assert_eq!(
        s.check_new_subscription("bad channel"),
        Err(ErrorCode::InvalidChannel)
    );
    assert!(s.unsubscribe("c0", &mut Vec::new()));
    assert!(!s.unsubscribe("c0", &mut Vec::new()));
    assert_eq!(p.ctx.drain.open_connections(), 1);
    drop(s);
    assert_eq!(p.ctx.drain.open_connections(), 0);
}

impl Parts {
    /// The channel's current epoch.
    fn store_epoch(&self) -> Arc<str> {
        let top = futures_util::FutureExt::now_or_never(self.store.top(C))
            .expect("the memory store answers at once")
            .expect("top");
        Arc::from(top.epoch.as_str())
    }
}

/// A reason as the wire names it (`too_old`).
fn wire_name(r: &UnrecoverableReason) -> String {
    serde_json::to_value(r)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// `exclude_client`: the answer for an own publish goes out in the
/// message's place (after what came before it), live and when a gap repair
/// meets it; unsubscribing answers what still waits.
#[tokio::test]
async fn an_own_excluded_publish_is_answered_in_its_place() {
    let p = parts(100, Duration::from_secs(60));
    let mut s = session(&p);
    s.subscribe(None, C, None, &mut Vec::new())
        .await
        .expect("subscribe");
    let m1 = publish(&p, 1).await;
    let e = m1.epoch.to_string();
    let m2 = publish(&p, 2).await;
    assert!(s.exclude_own(C, 2, &e, Some(7)));
    assert!(
        !s.exclude_own("elsewhere", 2, &e, Some(8)),
        "not subscribed"
    );
    publish(&p, 3).await;
    let answer = |id: u64, seq: u64| {
        format!(
            "{:?}",
            ServerFrame::Published(Published {
                id: Some(id),
                channel: C.into(),
                seq,
                epoch: e.clone(),
            })
        )
    };
    assert_eq!(
        seen(&drained(&mut s).await),
        [format!("1@{e}"), answer(7, 2), format!("3@{e}")]
    );
    assert!(!s.exclude_own(C, 2, &e, Some(9)), "already past it");

    // A gap repair meets it: 4 (own) and 5 only reach the store, 6 comes
    // live.
    let m4 = append_only(&p, 4).await;
    assert!(s.exclude_own(C, m4.seq, &e, Some(10)));
    append_only(&p, 5).await;
    let m6 = append_only(&p, 6).await;
    let mut out = Vec::new();
    s.admit(m6, &mut out).await;
    assert_eq!(
        seen(&out),
        [answer(10, 4), format!("5@{e}"), format!("6@{e}")]
    );

    // Still waiting when the client unsubscribes: answered then.
    assert!(s.exclude_own(C, 7, &e, Some(11)));
    let mut out = Vec::new();
    assert!(s.unsubscribe(C, &mut out));
    assert_eq!(seen(&out), [answer(11, 7)]);
    drop((m1, m2));
}

async fn publish_on(p: &Parts, channel: &str, n: u64) {
    p.ctx
        .broker
        .publish(channel, crate::message::Draft::new(json!({ "n": n }), 0))
        .await
        .expect("memory publish");
}

/// (channel, seq) of each message handed out.
fn delivered(out: &[Outgoing]) -> Vec<(String, u64)> {
    out.iter()
        .filter_map(|o| match o {
            Outgoing::Publication(p) | Outgoing::Replayed(p) => {
                Some((p.channel.to_string(), p.seq))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_session_with_many_subscriptions_reads_its_ready_logs_in_arrival_order() {
    let p = parts(100, Duration::from_secs(60));
    let mut s = session(&p);
    let mut out = Vec::new();
    // 100 subscriptions: tokens 0..100, so each ready bit stands for three
    // or four (3, 35, 67, 99 share one).
    for i in 0..100 {
        s.subscribe(None, &format!("ch{i}"), None, &mut out)
            .await
            .expect("subscribe");
    }
    assert_eq!(s.shared.take_ready(), 0, "subscribing marks nothing");
    // Traffic on a few channels sharing a ready bit (3, 67, 99).
    for (ch, n) in [
        ("ch3", 1),
        ("ch67", 1),
        ("ch99", 1),
        ("ch3", 2),
        ("ch67", 2),
    ] {
        publish_on(&p, ch, n).await;
    }
    let got = delivered(&drained(&mut s).await);
    let want: Vec<(String, u64)> = [
        ("ch3", 1),
        ("ch67", 1),
        ("ch99", 1),
        ("ch3", 2),
        ("ch67", 2),
    ]
    .iter()
    .map(|(c, n)| (c.to_string(), *n))
    .collect();
    assert_eq!(got, want, "every message once, in arrival order");
    assert!(drained(&mut s).await.is_empty(), "nothing twice");
    // One log with news (the fast path), its bit shared with a quiet one.
    publish_on(&p, "ch67", 3).await;
    assert_eq!(delivered(&drained(&mut s).await), [("ch67".to_string(), 3)]);
    // A token freed and reused: the new subscription gets its messages,
    // the old channel's do not come back.
    assert!(s.unsubscribe("ch3", &mut Vec::new()));
    s.subscribe(None, "fresh", None, &mut out)
        .await
        .expect("subscribe");
    publish_on(&p, "ch3", 3).await;
    publish_on(&p, "fresh", 1).await;
    publish_on(&p, "ch0", 1).await;
    assert_eq!(
        delivered(&drained(&mut s).await),
        [("fresh".to_string(), 1), ("ch0".to_string(), 1)]
    );
    // The last token freed: the slab shrinks; a new one takes the lowest
    // free index.
    assert!(s.unsubscribe("ch99", &mut Vec::new()));
    s.subscribe(None, "ch99", None, &mut out)
        .await
        .expect("subscribe");
    publish_on(&p, "ch99", 2).await;
    assert_eq!(delivered(&drained(&mut s).await), [("ch99".to_string(), 2)]);
}

#[tokio::test]
async fn a_wake_up_without_ready_logs_reads_nothing() {
    let p = parts(100, Duration::from_secs(60));
    let mut s = session(&p);
    let mut out = Vec::new();
    s.subscribe(None, C, None, &mut out)
        .await
        .expect("subscribe");
    // A control wake-up or the socket's I/O: nothing ready, nothing read.
    s.shared.signal.wake();
    assert!(drained(&mut s).await.is_empty());
    publish(&p, 1).await;
    assert_eq!(drained(&mut s).await.len(), 1);
}

#[test]
fn live_latency_is_sampled_once_per_100_ms_of_messages() {
    let t = 1_765_000_000_000u64; // a wall-clock ms of 2025
                                  // A new session's mark is 100 ms before its start.
    let mut last = (t - 100) as u32;
    assert!(latency_sample_due(&mut last, t));
    // Messages accepted within 100 ms of the sampled one are not sampled.
    assert!(!latency_sample_due(&mut last, t + 50));
    assert!(!latency_sample_due(&mut last, t + 99));
    assert!(latency_sample_due(&mut last, t + 100));
    // One from a node whose clock is 5 s behind waits for the pace.
    assert!(!latency_sample_due(&mut last, t - 4_900));
    assert!(!latency_sample_due(&mut last, t + 150));
    assert!(latency_sample_due(&mut last, t + 200));
    // A clock stepped back by more than a minute starts the pace again.
    assert!(latency_sample_due(&mut last, t - 120_000));
    assert!(!latency_sample_due(&mut last, t - 119_950));
    // Across the 32-bit wrap of the truncated milliseconds.
    let w = (1u64 << 32) * 400 + u32::MAX as u64 - 20;
    let mut last = (w - 100) as u32;
    assert!(latency_sample_due(&mut last, w));
    assert!(!latency_sample_due(&mut last, w + 60));
    assert!(latency_sample_due(&mut last, w + 100));
}
