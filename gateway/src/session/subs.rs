//! A session's subscriptions: a slab whose index is also the reader's
//! *token* in its channel's log, so the hub can say which subscription
//! became ready ([`crate::hub::SessionShared::take_ready`]) and the session
//! reads only those logs.
//!
//! A slab, not a map: an idle connection holds one or two subscriptions,
//! and a `Vec` of exactly that many entries is a fraction of a hash map's
//! smallest table (4 buckets and control bytes). Lookups by name (commands:
//! subscribe, unsubscribe, publish) scan it; deliveries never look a name
//! up, they come with their token.

use std::sync::Arc;

use crate::hub::Subscription;

pub(super) struct SubState {
    pub(super) channel: Arc<str>,
    pub(super) epoch: Arc<str>,
    pub(super) last: u64,
    /// The session's reader slot in the channel's log.
    pub(super) sub: Subscription,
}

/// The slab. A free index is `None`; trailing free indices are trimmed,
/// so [`Subs::bound`] bounds the tokens in use. Token 0 lives inline, in
/// the session (in its connection's task): a broadcast that reaches a
/// one-subscription session reads its state from memory the task touches
/// anyway, not from a heap block of its own gone cold since the last
/// delivery (one cache miss per delivery; issue 16). Tokens from 1 are in
/// `rest` (index `token - 1`), so two subscriptions cost what a two-entry
/// `Vec` did.
#[derive(Default)]
pub(super) struct Subs {
    first: Option<SubState>,
    rest: Vec<Option<SubState>>,
}

impl Subs {
    fn slots(&self) -> impl Iterator<Item = &Option<SubState>> {
        std::iter::once(&self.first).chain(self.rest.iter())
    }

    pub(super) fn index_of(&self, channel: &str) -> Option<usize> {
        self.slots()
            .position(|e| e.as_ref().is_some_and(|s| *s.channel == *channel))
    }

    pub(super) fn get(&self, channel: &str) -> Option<&SubState> {
        self.index_of(channel).and_then(|i| self.at(i))
    }

    pub(super) fn contains(&self, channel: &str) -> bool {
        self.index_of(channel).is_some()
    }

    pub(super) fn at(&self, i: usize) -> Option<&SubState> {
        match i {
            0 => self.first.as_ref(),
            _ => self.rest.get(i - 1).and_then(Option::as_ref),
        }
    }

    pub(super) fn at_mut(&mut self, i: usize) -> Option<&mut SubState> {
        match i {
            0 => self.first.as_mut(),
            _ => self.rest.get_mut(i - 1).and_then(Option::as_mut),
        }
    }

    /// One past the highest token in use.
    pub(super) fn bound(&self) -> usize {
        match self.rest.len() {
            0 => usize::from(self.first.is_some()),
            n => n + 1,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.iter().count()
    }

    /// The token the next [`Subs::insert`] takes: the lowest free index.
    pub(super) fn next_token(&self) -> usize {
        self.slots()
            .position(Option::is_none)
            .unwrap_or(self.rest.len() + 1)
    }

    /// Puts `st` at `token` (from [`Subs::next_token`], nothing inserted
    /// since).
    pub(super) fn insert(&mut self, token: usize, st: SubState) {
        let Some(i) = token.checked_sub(1) else {
            debug_assert!(self.first.is_none(), "token in use");
            self.first = Some(st);
            return;
        };
        if i == self.rest.len() {
            // Exact growth while small: most connections hold one or two.
            if self.rest.len() < 4 {
                self.rest.reserve_exact(1);
            }
            self.rest.push(Some(st));
        } else {
            debug_assert!(self.rest[i].is_none(), "token in use");
            self.rest[i] = Some(st);
        }
    }

    pub(super) fn remove(&mut self, channel: &str) -> Option<SubState> {
        let st = match self.index_of(channel)? {
            0 => self.first.take(),
            i => self.rest[i - 1].take(),
        };
        while self.rest.last().is_some_and(Option::is_none) {
            self.rest.pop();
        }
        if self.rest.is_empty() {
            self.rest = Vec::new();
        }
        st
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &SubState> {
        self.slots().flatten()
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut SubState> {
        self.first.iter_mut().chain(self.rest.iter_mut().flatten())
    }
}

/// The tokens whose ready bit is set in `bits` (bit `t % 32` stands for
/// every token `t`, `t + 32`, ...), below `bound`, ascending per bit.
pub(super) fn ready_tokens(bits: u32, bound: usize) -> impl Iterator<Item = usize> {
    const STEP: usize = crate::hub::READY_BITS as usize;
    let mut rest = bits;
    std::iter::from_fn(move || {
        if rest == 0 {
            return None;
        }
        let bit = rest.trailing_zeros() as usize;
        rest &= rest - 1;
        Some(bit)
    })
    .flat_map(move |bit| (bit..bound).step_by(STEP))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{ready_tokens, SubState, Subs};
    use crate::hub::{ChannelLog, Subscription};

    fn sub(channel: &str) -> SubState {
        SubState {
            channel: channel.into(),
            epoch: "e".into(),
            last: 0,
            sub: Subscription {
                log: Arc::new(ChannelLog::new(1024)),
                slot: 0,
                cursor: 0,
            },
        }
    }

    fn names(subs: &Subs) -> Vec<(usize, String)> {
        (0..subs.bound())
            .filter_map(|t| subs.at(t).map(|s| (t, s.channel.to_string())))
            .collect()
    }

    /// Tokens are the lowest free index, token 0 (inline) included; a
    /// freed token is reused; trailing free tokens are trimmed from the
    /// bound.
    #[test]
    fn tokens_are_reused_lowest_first_and_the_bound_follows_the_highest() {
        let mut subs = Subs::default();
        assert_eq!((subs.bound(), subs.next_token()), (0, 0));
        for c in ["a", "b", "c"] {
            let t = subs.next_token();
            subs.insert(t, sub(c));
        }
        assert_eq!(
            names(&subs),
            [(0, "a".into()), (1, "b".into()), (2, "c".into())]
        );
        assert_eq!((subs.bound(), subs.len()), (3, 3));
        assert_eq!(subs.remove("a").map(|s| s.channel), Some("a".into()));
        assert_eq!(
            (subs.bound(), subs.next_token(), subs.index_of("c")),
            (3, 0, Some(2))
        );
        subs.insert(subs.next_token(), sub("d"));
        assert_eq!(subs.index_of("d"), Some(0));
        assert!(subs.remove("c").is_some());
        assert_eq!((subs.bound(), subs.next_token()), (2, 2));
        assert!(subs.remove("b").is_some());
        assert_eq!((subs.bound(), subs.len(), subs.next_token()), (1, 1, 1));
        assert!(subs.remove("d").is_some());
        assert!(subs.remove("d").is_none());
        assert_eq!((subs.bound(), subs.len(), subs.next_token()), (0, 0, 0));
        // Token 0 free, token 1 in use: the bound still covers it.
        subs.insert(0, sub("x"));
        subs.insert(1, sub("y"));
        assert!(subs.remove("x").is_some());
        assert_eq!((subs.bound(), subs.next_token()), (2, 0));
        assert_eq!(
            subs.iter_mut()
                .map(|s| s.channel.to_string())
                .collect::<Vec<_>>(),
            ["y"]
        );
    }

    #[test]
    fn a_ready_bit_stands_for_every_token_of_its_residue() {
        let v: Vec<usize> = ready_tokens(0b101, 3).collect();
        assert_eq!(v, [0, 2]);
        let v: Vec<usize> = ready_tokens(1 << 3, 100).collect();
        assert_eq!(v, [3, 35, 67, 99]);
        let v: Vec<usize> = ready_tokens(1 << 31 | 1, 70).collect();
        assert_eq!(v, [0, 32, 64, 31, 63]);
        assert_eq!(ready_tokens(0, 100).count(), 0);
        assert_eq!(ready_tokens(u32::MAX, 0).count(), 0);
    }
}
