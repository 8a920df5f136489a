//! What the auth server counts: the `stats` figures and the periodic summary line.

use super::{Core, Peers};
use fastchat_common::info;
use std::time::{Duration, Instant};

/// How often a busy server logs a summary line.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(5);

/// Running totals for `stats` and the periodic summary.
#[derive(Default, Clone, Copy)]
pub(crate) struct Counters {
    pub registrations: u64,
    pub logins: u64,
    pub resumes: u64,
    pub failed_logins: u64,
    /// Requests answered `rate_limited` because a budget ran dry or a queue was full.
    pub busy: u64,
    /// Connections closed at accept: their address held as many as allowed.
    pub refused_per_addr: u64,
    /// Jobs a worker skipped because their connection had closed.
    pub skipped: u64,
}

impl Core {
    /// The figures `stats` reports.
    pub(super) fn stats(&self, io: &Peers) -> serde_json::Value {
        let c = self.counters;
        serde_json::json!({
            "server": "auth",
            "connections": io.len(),
            "relays": self.directory.describe(),
            "registrations": c.registrations,
            "logins": c.logins,
            "resumes": c.resumes,
            "failed_logins": c.failed_logins,
            "busy": c.busy,
            "refused_per_addr": c.refused_per_addr,
            "pending_tickets": self.pending.len(),
            "queue_depth": self.pool.queue_depth(),
        })
    }

    /// A one-line summary every [`SUMMARY_INTERVAL`] when something happened since the
    /// last one.
    pub(super) fn summarise_when_due(&mut self, io: &Peers) {
        if self.last_summary_at.elapsed() < SUMMARY_INTERVAL {
            return;
        }
        let (now, last) = (self.counters, self.last_summary);
        let secs = self.last_summary_at.elapsed().as_secs_f64().max(0.001);
        let moved = now.logins + now.resumes + now.failed_logins + now.registrations
            != last.logins + last.resumes + last.failed_logins + last.registrations;
        if moved {
            info!(
                "summary: relays {}, connections {}, logins {:.1}/s, resumes {:.1}/s, failed {:.1}/s, registrations {:.1}/s, queue {}",
                self.directory.links().len(),
                io.len(),
                (now.logins - last.logins) as f64 / secs,
                (now.resumes - last.resumes) as f64 / secs,
                (now.failed_logins - last.failed_logins) as f64 / secs,
                (now.registrations - last.registrations) as f64 / secs,
                self.pool.queue_depth(),
            );
        }
        self.last_summary = now;
        self.last_summary_at = Instant::now();
    }
}
