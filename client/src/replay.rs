//! Replay windows (PROTOCOL.md §7.3): every end-to-end payload carries a counter `n`,
//! sealed inside it, that its sender counts up per conversation (the peer, or the
//! group). A receiver keeps, per (sender, conversation), the highest counter it has
//! acted on and which of the [`WINDOW`] below it it has seen, and refuses a counter it
//! has seen or one that has fallen out of the window — so the relay cannot replay a
//! payload, however long after, even one (a grant, a receipt) that shows nothing.
//!
//! The exception is a message the client holds unopened (it waited for a key that the
//! recovery of §7.8 brought): it was delivered once, when it was fresh, and may be far
//! below the window by the time it opens; only a counter seen before refuses it.

/// How far below the highest counter seen a counter is still taken (out of order).
pub const WINDOW: u64 = 1024;

/// How far above the highest counter seen a counter may jump (counters used by sends
/// that never reached the relay, say). More is refused: a jump to near `u64::MAX` by
/// someone holding the group key would make every later real one look old.
pub const MAX_JUMP: u64 = 1 << 20;

/// One (sender, conversation)'s window.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Window {
    /// The highest counter acted on (0: none yet).
    pub high: u64,
    /// Bit `i` (byte `i / 8`, bit `i % 8`): counter `high - i` was acted on.
    pub bits: Vec<u8>,
}

/// What to do with a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not seen: act on it (then [`Window::mark`] it).
    Fresh,
    /// Acted on before: a replay.
    Seen,
    /// [`WINDOW`] or more below the highest: a replay, or too late to tell.
    TooOld,
    /// More than [`MAX_JUMP`] above the highest: forged.
    TooFar,
}

impl Window {
    /// What a payload with counter `n` is; `held`: it was delivered before and kept
    /// unopened.
    pub fn verdict(&self, n: u64, held: bool) -> Verdict {
        if n == 0 {
            return Verdict::TooOld;
        }
        if n > self.high {
            return if self.high > 0 && n - self.high > MAX_JUMP {
                Verdict::TooFar
            } else {
                Verdict::Fresh
            };
        }
        let back = self.high - n;
        if back >= WINDOW {
            return if held {
                Verdict::Fresh
            } else {
                Verdict::TooOld
            };
        }
        if self.bit(back) {
            Verdict::Seen
        } else {
            Verdict::Fresh
        }
    }

    /// Records counter `n` as acted on.
    pub fn mark(&mut self, n: u64) {
        self.bits.resize((WINDOW / 8) as usize, 0);
        if n > self.high {
            let shift = n - self.high;
            self.shift(shift);
            self.high = n;
        }
        let back = self.high - n;
        if back < WINDOW {
            self.bits[(back / 8) as usize] |= 1 << (back % 8);
        }
    }

    fn bit(&self, back: u64) -> bool {
        self.bits
            .get((back / 8) as usize)
            .is_some_and(|b| b & (1 << (back % 8)) != 0)
    }

    /// Moves every bit `by` places further back (dropping those that leave the window).
    fn shift(&mut self, by: u64) {
        if by >= WINDOW {
            self.bits.iter_mut().for_each(|b| *b = 0);
            return;
        }
        let mut moved = vec![0u8; self.bits.len()];
        for back in 0..WINDOW - by {
            if self.bit(back) {
                let to = back + by;
                moved[(to / 8) as usize] |= 1 << (to % 8);
            }
        }
        self.bits = moved;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_counter_is_taken_once_in_any_order_within_the_window() {
        let mut w = Window::default();
        for n in [3, 1, 2, 10, 5] {
            assert_eq!(w.verdict(n, false), Verdict::Fresh, "{n}");
            w.mark(n);
            assert_eq!(w.verdict(n, false), Verdict::Seen, "{n} again");
        }
        assert_eq!(w.high, 10);
        for n in [4, 6, 7, 8, 9] {
            assert_eq!(w.verdict(n, false), Verdict::Fresh, "{n} was skipped");
        }
        for n in [1, 2, 3, 5, 10] {
            assert_eq!(w.verdict(n, false), Verdict::Seen, "{n}");
        }
    }

    #[test]
    fn counters_out_of_the_window_are_refused_unless_held() {
        let mut w = Window::default();
        w.mark(5);
        w.mark(5 + WINDOW - 1);
        assert_eq!(w.verdict(5, false), Verdict::Seen, "still in the window");
        w.mark(5 + WINDOW);
        assert_eq!(w.verdict(5, false), Verdict::TooOld);
        assert_eq!(w.verdict(6, false), Verdict::Fresh, "the edge");
        assert_eq!(
            w.verdict(4, true),
            Verdict::Fresh,
            "a held message opens late"
        );
        assert_eq!(w.verdict(0, false), Verdict::TooOld, "no counter");
        w.mark(10 * WINDOW);
        assert_eq!(w.verdict(5 + WINDOW, false), Verdict::TooOld);
        assert_eq!(w.verdict(10 * WINDOW, true), Verdict::Seen);
        assert_eq!(w.verdict(10 * WINDOW + MAX_JUMP, false), Verdict::Fresh);
        assert_eq!(
            w.verdict(10 * WINDOW + MAX_JUMP + 1, false),
            Verdict::TooFar
        );
        assert_eq!(w.verdict(u64::MAX, false), Verdict::TooFar);
        // The first counter of a window may be anything (a member joining late).
        assert_eq!(Window::default().verdict(u64::MAX, false), Verdict::Fresh);
    }

    #[test]
    fn a_jump_keeps_what_stays_in_the_window() {
        let mut w = Window::default();
        for n in 1..=100 {
            w.mark(n);
        }
        w.mark(600);
        for n in 1..=100 {
            assert_eq!(w.verdict(n, false), Verdict::Seen, "{n}");
        }
        assert_eq!(w.verdict(300, false), Verdict::Fresh);
        w.mark(100 + WINDOW);
        assert_eq!(w.verdict(100, false), Verdict::TooOld);
        assert_eq!(w.verdict(600, false), Verdict::Seen);
    }
}
