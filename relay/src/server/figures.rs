//! What the relay counts: the `stats` figures and the periodic summary line.

use super::*;

/// How often a busy relay logs a summary line.
pub(super) const SUMMARY_INTERVAL: Duration = Duration::from_secs(5);

/// Running totals for `stats` and the periodic summary.
#[derive(Default, Clone, Copy)]
pub(super) struct Counters {
    /// `send` frames accepted.
    pub(super) received: u64,
    /// `msg` frames pushed to local sessions.
    pub(super) delivered: u64,
    /// Messages forwarded to other relays.
    pub(super) forwarded: u64,
    /// Messages other relays forwarded to us.
    pub(super) arrived: u64,
    /// Direct messages delivered from memory (held for their recipients' acks).
    pub(super) held: u64,
    /// Of those, acknowledged by their recipients within the window (never stored).
    pub(super) held_acked: u64,
    /// Of those, stored when the window ended unacknowledged.
    pub(super) held_stored: u64,
}

impl Core {
    /// The figures `stats` reports.
    pub(super) fn stats(&self, io: &Links) -> serde_json::Value {
        let m = &self.metrics;
        let batches = m.batches.load(Ordering::Relaxed);
        let c = self.counters;
        serde_json::json!({
            "server": "relay",
            "relay_id": self.cfg.id,
            "client_addr": self.public_addr,
            "mesh_addr": self.mesh_addr,
            "clients": self.clients_count(),
            "connections": self.client_count(io),
            "auth_link": self.control.describe(),
            "mesh": self.mesh.describe(),
            "received": c.received,
            "delivered": c.delivered,
            "forwarded": c.forwarded,
            "arrived": c.arrived,
            "held": c.held,
            "held_acked": c.held_acked,
            "held_stored": c.held_stored,
            "holding": self.holds.len(),
            "holding_paused": self.holds.paused(Instant::now()),
            "stored": m.messages_stored.load(Ordering::Relaxed),
            "batches": batches,
            "failed_batches": m.failed_batches.load(Ordering::Relaxed),
            "avg_batch": m.jobs.load(Ordering::Relaxed) as f64 / batches.max(1) as f64,
            "avg_commit_ms": m.commit_micros.load(Ordering::Relaxed) as f64 / 1000.0 / batches.max(1) as f64,
            "queue_depth": self.pool.queue_depth(),
        })
    }

    /// A one-line summary when something moved since the last one.
    pub(super) fn summarise(&mut self) {
        let m = &self.metrics;
        let now = (
            self.counters,
            m.batches.load(Ordering::Relaxed),
            m.jobs.load(Ordering::Relaxed),
            m.commit_micros.load(Ordering::Relaxed),
        );
        let (last, last_batches, last_jobs, last_micros) = self.last_summary;
        let secs = self.last_summary_at.elapsed().as_secs_f64().max(0.001);
        let moved = now.1 != last_batches
            || now.0.delivered != last.delivered
            || now.0.arrived != last.arrived;
        if moved {
            let batches = (now.1 - last_batches).max(1) as f64;
            info!(
                "summary: clients {}, in {:.0}/s, out {:.0}/s, forwarded {:.0}/s, from memory {:.0}/s (stored after the window {:.0}/s), queue {}, batch {:.1}, commit {:.2} ms, mesh links {}",
                self.clients_count(),
                (now.0.received - last.received) as f64 / secs,
                (now.0.delivered - last.delivered) as f64 / secs,
                (now.0.forwarded - last.forwarded) as f64 / secs,
                (now.0.held - last.held) as f64 / secs,
                (now.0.held_stored - last.held_stored) as f64 / secs,
                self.pool.queue_depth(),
                (now.2 - last_jobs) as f64 / batches,
                (now.3 - last_micros) as f64 / 1000.0 / batches,
                self.mesh.links_up(),
            );
        }
        if self.refused > 0 {
            warn!(
                "full: closed {} new connections at once in the last {secs:.0} s (limit {})",
                std::mem::take(&mut self.refused),
                self.max_connections
            );
        }
        self.last_summary = now;
        self.last_summary_at = Instant::now();
    }
}
