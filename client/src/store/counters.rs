//! Send counters and replay windows (PROTOCOL.md §7.3; the logic is in `crate::replay`).

use super::{Store, StoreError};
use crate::replay::{Verdict, Window};
use rusqlite::{params, OptionalExtension};

impl Store {
    /// The next counter to seal into a payload for conversation `conv` (a peer, or
    /// `#<group id>`): one more than the last, in one statement, so processes of this
    /// user never use one twice.
    pub fn next_counter(&mut self, conv: &str) -> Result<u64, StoreError> {
        let h = self.sealer.hash("conv", conv);
        let n: i64 = self.write(|tx| {
            tx.query_row(
                "INSERT INTO send_counters (conv, n) VALUES (?1, 1)
                 ON CONFLICT (conv) DO UPDATE SET n = n + 1 RETURNING n",
                [&h],
                |r| r.get(0),
            )
        })?;
        Ok(n as u64)
    }

    /// What a payload of `sender` in `conv` with counter `n` is (`held`: it was kept
    /// unopened, waiting for its key).
    pub fn replay_verdict(
        &self,
        sender: &str,
        conv: &str,
        n: u64,
        held: bool,
    ) -> Result<Verdict, StoreError> {
        Ok(self.window(sender, conv)?.verdict(n, held))
    }

    /// Records counter `n` of `sender` in `conv` as acted on.
    pub fn replay_mark(&mut self, sender: &str, conv: &str, n: u64) -> Result<(), StoreError> {
        let h = self.window_hash(sender, conv);
        let peer = self.sealer.hash("peer", sender);
        self.write(|tx| {
            let mut window = read_window(tx, &h)?;
            window.mark(n);
            tx.execute(
                "INSERT INTO replay (h, peer, high, bits) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (h) DO UPDATE SET high = excluded.high, bits = excluded.bits",
                params![h, peer, window.high as i64, window.bits],
            )?;
            Ok(())
        })
    }

    fn window(&self, sender: &str, conv: &str) -> Result<Window, StoreError> {
        read_window(&self.conn, &self.window_hash(sender, conv)).map_err(|e| self.db_error(e))
    }

    fn window_hash(&self, sender: &str, conv: &str) -> Vec<u8> {
        self.sealer.hash("replay", &format!("{sender}\0{conv}"))
    }
}

/// The window kept under `h` (empty if none).
fn read_window(conn: &rusqlite::Connection, h: &[u8]) -> rusqlite::Result<Window> {
    conn.prepare_cached("SELECT high, bits FROM replay WHERE h = ?1")?
        .query_row([h], |r| {
            Ok(Window {
                high: r.get::<_, i64>(0)? as u64,
                bits: r.get(1)?,
            })
        })
        .optional()
        .map(Option::unwrap_or_default)
}
