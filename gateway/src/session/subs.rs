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
/// so `entries.len()` bounds the tokens in use.
#[derive(Default)]
pub(super) struct Subs {
    entries: Vec<Option<SubState>>,
}

impl Subs {
    pub(super) fn index_of(&self, channel: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.as_ref().is_some_and(|s| *s.channel == *channel))
    }

    pub(super) fn get(&self, channel: &str) -> Option<&SubState> {
        self.index_of(channel).and_then(|i| self.at(i))
    }

    pub(super) fn contains(&self, channel: &str) -> bool {
        self.index_of(channel).is_some()
    }

    pub(super) fn at(&self, i: usize) -> Option<&SubState> {
        self.entries.get(i).and_then(Option::as_ref)
    }

    pub(super) fn at_mut(&mut self, i: usize) -> Option<&mut SubState> {
        self.entries.get_mut(i).and_then(Option::as_mut)
    }

    /// One past the highest token in use.
    pub(super) fn bound(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn len(&self) -> usize {
        self.entries.iter().flatten().count()
    }

    /// The token the next [`Subs::insert`] takes: the lowest free index.
    pub(super) fn next_token(&self) -> usize {
        self.entries
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.entries.len())
    }

    /// Puts `st` at `token` (from [`Subs::next_token`], nothing inserted
    /// since).
    pub(super) fn insert(&mut self, token: usize, st: SubState) {
        if token == self.entries.len() {
            // Exact growth while small: most connections hold one or two.
            if self.entries.len() < 4 {
                self.entries.reserve_exact(1);
            }
            self.entries.push(Some(st));
        } else {
            debug_assert!(self.entries[token].is_none(), "token in use");
            self.entries[token] = Some(st);
        }
    }

    pub(super) fn remove(&mut self, channel: &str) -> Option<SubState> {
        let i = self.index_of(channel)?;
        let st = self.entries[i].take();
        while self.entries.last().is_some_and(Option::is_none) {
            self.entries.pop();
        }
        if self.entries.is_empty() {
            self.entries = Vec::new();
        }
        st
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &SubState> {
        self.entries.iter().flatten()
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut SubState> {
        self.entries.iter_mut().flatten()
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
    use super::ready_tokens;

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
