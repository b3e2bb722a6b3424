//! Reading a channel's stored messages (`POST /api/history`, the
//! WebSocket `history` command): what the replay store holds, cut to the
//! request's `limit` and order, and the stream's top, so a client can load
//! the last N messages and then subscribe with `since` and miss nothing.

use protocol::{HistoryResult, Message, Position, HISTORY_DEFAULT_LIMIT, HISTORY_MAX_LIMIT};

use crate::message::Publication;
use crate::replay::{Recovery, ReplayStore, StoreError};

/// Reads `channel`'s history: messages after `since` (or every stored one),
/// at most `limit` (default 100, capped at 1,000); with `reverse`, the
/// newest `limit` of them, newest first.
pub async fn read(
    store: &dyn ReplayStore,
    channel: &str,
    since: Option<&Position>,
    limit: Option<u64>,
    reverse: bool,
) -> Result<HistoryResult, StoreError> {
    let limit = limit
        .unwrap_or(HISTORY_DEFAULT_LIMIT)
        .min(HISTORY_MAX_LIMIT) as usize;
    let (publications, top, unrecoverable) = match since {
        None => {
            let (p, top) = store.buffered(channel).await?;
            (p, top, None)
        }
        Some(since) => match store.read_since(channel, since).await? {
            Recovery::Recovered { publications, top } => (publications, top, None),
            Recovery::Unrecoverable { reason, top } => (Vec::new(), top, Some(reason)),
        },
    };
    let chosen: Vec<&std::sync::Arc<Publication>> = if reverse {
        publications.iter().rev().take(limit).collect()
    } else {
        publications.iter().take(limit).collect()
    };
    Ok(HistoryResult {
        id: None,
        channel: channel.to_owned(),
        messages: chosen.into_iter().map(|p| message(p)).collect(),
        epoch: top.epoch,
        seq: top.seq,
        unrecoverable,
    })
}

fn message(p: &Publication) -> Message {
    Message {
        channel: p.channel.to_string(),
        seq: p.seq,
        epoch: p.epoch.to_string(),
        data: p.data.to_value(),
        ts: Some(p.ts),
        from: p.from().cloned(),
    }
}
