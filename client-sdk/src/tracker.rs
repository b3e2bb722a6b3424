//! Per-channel position tracking and duplicate detection.

use protocol::Position;

/// What to do with an incoming `message`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Next in sequence (or the first one seen): hand it to the application.
    Deliver,
    /// `seq` at or below the last one delivered in the same epoch: drop it.
    Duplicate,
    /// `seq` beyond `last + 1` in the same epoch without an `unrecoverable`
    /// notice: something was skipped. Do not deliver; resume from the last
    /// position instead.
    Gap,
}

/// Where the application is in one channel stream: the last (seq, epoch)
/// delivered to it, or adopted from the server (`subscribed`, `unrecoverable`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Tracker {
    pos: Option<Position>,
}

impl Tracker {
    pub(crate) fn position(&self) -> Option<&Position> {
        self.pos.as_ref()
    }

    /// Judges a message and, when it is to be delivered, advances the
    /// position to it (reusing the epoch string when it did not change).
    pub(crate) fn admit(&mut self, seq: u64, epoch: &str) -> Verdict {
        match &mut self.pos {
            Some(p) if p.epoch == epoch => {
                if seq <= p.seq {
                    Verdict::Duplicate
                } else if seq == p.seq + 1 {
                    p.seq = seq;
                    Verdict::Deliver
                } else {
                    Verdict::Gap
                }
            }
            // Another epoch without a notice (or nothing known yet): follow
            // the stream from this message.
            Some(p) => {
                p.seq = seq;
                p.epoch.clear();
                p.epoch.push_str(epoch);
                Verdict::Deliver
            }
            None => {
                self.pos = Some(Position::new(seq, epoch));
                Verdict::Deliver
            }
        }
    }

    /// Moves past `seq` when it is the next one (a message the server
    /// skipped for us, in its place); anything else changes nothing.
    pub(crate) fn pass(&mut self, seq: u64, epoch: &str) {
        if let Some(p) = &mut self.pos {
            if p.epoch == epoch && seq == p.seq + 1 {
                p.seq = seq;
            }
        }
    }

    /// Sets the position unconditionally (`unrecoverable`, SSE start cursor).
    pub(crate) fn adopt(&mut self, seq: u64, epoch: &str) {
        match &mut self.pos {
            Some(p) => {
                p.seq = seq;
                if p.epoch != epoch {
                    p.epoch.clear();
                    p.epoch.push_str(epoch);
                }
            }
            None => self.pos = Some(Position::new(seq, epoch)),
        }
    }

    /// Applies a `subscribed` frame (delivery contract, rule 1): with
    /// `recovered: true` the replay starts after the position we sent, so it
    /// stays; with `recovered: false` the `unrecoverable` that follows sets it;
    /// without `recovered` (no `since` sent) live delivery starts after
    /// (`epoch`, `seq`).
    pub(crate) fn subscribed(&mut self, seq: u64, epoch: &str, recovered: Option<bool>) {
        match (recovered, &self.pos) {
            (Some(_), _) => {}
            (None, Some(p)) if p.epoch == epoch && p.seq >= seq => {}
            (None, _) => self.adopt(seq, epoch),
        }
    }

    /// Forgets the position (another user's stream, a new subscription).
    pub(crate) fn reset(&mut self) {
        self.pos = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivers_in_order_and_drops_duplicates() {
        let mut t = Tracker::default();
        t.subscribed(5, "e1", None);
        assert_eq!(t.position(), Some(&Position::new(5, "e1")));
        assert_eq!(t.admit(5, "e1"), Verdict::Duplicate);
        assert_eq!(t.admit(3, "e1"), Verdict::Duplicate);
        assert_eq!(t.admit(6, "e1"), Verdict::Deliver);
        assert_eq!(t.admit(6, "e1"), Verdict::Duplicate);
        assert_eq!(t.admit(7, "e1"), Verdict::Deliver);
        assert_eq!(t.position(), Some(&Position::new(7, "e1")));
    }

    #[test]
    fn gap_is_not_delivered_and_keeps_the_position() {
        let mut t = Tracker::default();
        t.adopt(10, "e");
        assert_eq!(t.admit(12, "e"), Verdict::Gap);
        assert_eq!(t.position(), Some(&Position::new(10, "e")));
        assert_eq!(t.admit(11, "e"), Verdict::Deliver);
        assert_eq!(t.admit(12, "e"), Verdict::Deliver);
    }

    #[test]
    fn passing_an_own_message_moves_only_to_the_next() {
        let mut t = Tracker::default();
        t.adopt(10, "e");
        t.pass(12, "e");
        t.pass(11, "f");
        assert_eq!(t.position(), Some(&Position::new(10, "e")));
        t.pass(11, "e");
        assert_eq!(t.admit(12, "e"), Verdict::Deliver);
    }

    #[test]
    fn epochs_and_unrecoverable() {
        let mut t = Tracker::default();
        assert_eq!(
            t.admit(4, "a"),
            Verdict::Deliver,
            "first message seen is taken as is"
        );
        // `unrecoverable` moves the position, even backwards, and to a new epoch.
        t.adopt(0, "b");
        assert_eq!(t.position(), Some(&Position::new(0, "b")));
        assert_eq!(
            t.admit(4, "a"),
            Verdict::Deliver,
            "a message of another epoch is followed"
        );
        t.adopt(100, "b");
        assert_eq!(t.admit(100, "b"), Verdict::Duplicate);
        assert_eq!(t.admit(101, "b"), Verdict::Deliver);
        t.reset();
        assert_eq!(t.position(), None);
    }

    #[test]
    fn subscribed_rules() {
        // With `since` (recovered present) our position stays.
        let mut t = Tracker::default();
        t.adopt(3, "e");
        t.subscribed(9, "e", Some(true));
        assert_eq!(t.position(), Some(&Position::new(3, "e")));
        t.subscribed(9, "x", Some(false));
        assert_eq!(t.position(), Some(&Position::new(3, "e")));
        // Without: adopt the server's top, unless we are already there or later.
        t.subscribed(2, "e", None);
        assert_eq!(t.position(), Some(&Position::new(3, "e")));
        t.subscribed(7, "e", None);
        assert_eq!(t.position(), Some(&Position::new(7, "e")));
        t.subscribed(1, "f", None);
        assert_eq!(t.position(), Some(&Position::new(1, "f")));
    }
}
