//! What a user may make this relay do per second, all their sessions here together:
//! **sends** (one token per send or key lookup, and one per further recipient a group
//! send reached) and **bytes written** (a body times the recipients it reached, and
//! file chunks). Each is a token bucket; a cost known only after the store answered
//! (a group send's reach) is charged then and may put the bucket in debt, which later
//! requests wait out.

use super::*;

/// One user's buckets.
pub(super) struct Budget {
    sends: Bucket,
    bytes: Bucket,
}

impl Budget {
    fn full(cfg: &Config, now: Instant) -> Budget {
        Budget {
            sends: Bucket::full(cfg.send_burst, now),
            bytes: Bucket::full(cfg.send_bytes_burst, now),
        }
    }

    /// Whether both buckets are full again (the budget can be forgotten).
    pub(super) fn is_full(&mut self, cfg: &Config, now: Instant) -> bool {
        self.sends.is_full(cfg.send_rate, cfg.send_burst, now)
            && self
                .bytes
                .is_full(cfg.send_bytes_per_sec, cfg.send_bytes_burst, now)
    }
}

impl Core {
    /// Takes `sends` (0 or 1) send tokens and `bytes` of the byte budget for
    /// `user_id`, or answers `rate_limited` to request `id` and returns `false`.
    pub(super) fn spend(
        &mut self,
        io: &mut Links,
        token: Token,
        id: u64,
        user_id: i64,
        sends: bool,
        bytes: usize,
    ) -> bool {
        let cfg = &self.cfg;
        let now = Instant::now();
        let budget = budget_of(&mut self.budgets, cfg, user_id, now);
        let refused = if sends {
            budget
                .sends
                .take(cfg.send_rate, cfg.send_burst, now)
                .err()
                .map(|ms| (ms, format!("sending too fast (at most {} messages and key lookups a second); nothing was stored, retry later", cfg.send_rate)))
        } else {
            None
        };
        let refused = refused.or_else(|| {
            budget
                .bytes
                .spend(bytes as f64, cfg.send_bytes_per_sec, cfg.send_bytes_burst, now)
                .err()
                .map(|ms| (ms, format!("writing too fast (at most {} KiB a second of messages times their recipients, and file chunks); nothing was stored, retry later", cfg.send_bytes_per_sec as u64 / 1024)))
        });
        match refused {
            None => true,
            Some((wait_ms, why)) => {
                let error = ErrorFrame::rate_limited(Some(id), why, wait_ms);
                self.refuse_for_speed(io, token, error);
                false
            }
        }
    }

    /// A send of `user_id` reached `reached` recipients with `bytes` of bodies in all:
    /// what is beyond its first recipient is charged now.
    pub(super) fn charge_reach(&mut self, user_id: i64, reached: usize, bytes: usize) {
        if reached <= 1 {
            return;
        }
        let cfg = &self.cfg;
        let now = Instant::now();
        let budget = budget_of(&mut self.budgets, cfg, user_id, now);
        budget
            .sends
            .charge((reached - 1) as f64, cfg.send_rate, cfg.send_burst, now);
        let beyond_first = bytes - bytes / reached;
        budget.bytes.charge(
            beyond_first as f64,
            cfg.send_bytes_per_sec,
            cfg.send_bytes_burst,
            now,
        );
    }

    /// Forgets the budgets that are full again.
    pub(super) fn forget_full_budgets(&mut self, now: Instant) {
        let cfg = &self.cfg;
        self.budgets.retain(|_, b| !b.is_full(cfg, now));
    }
}

/// `user_id`'s budget, full if they had none.
fn budget_of<'a>(
    budgets: &'a mut HashMap<i64, Budget>,
    cfg: &Config,
    user_id: i64,
    now: Instant,
) -> &'a mut Budget {
    budgets
        .entry(user_id)
        .or_insert_with(|| Budget::full(cfg, now))
}
