//! Send counters and replay windows (PROTOCOL.md §7.3; the logic is in `crate::replay`).

use super::{Store, StoreError};
use crate::e2e::Stamp;
use crate::replay::{Verdict, Window};
use rusqlite::{params, OptionalExtension};

impl Store {
    /// The stamp to seal into the next payload for conversation `conv` (a peer, or
    /// `#<group id>`): this store's sender id and one more than the last counter, taken
    /// in one statement, so processes of this user never use one twice.
    pub fn next_stamp(&mut self, conv: &str) -> Result<Stamp, StoreError> {
        let h = self.sealer.hash("conv", conv);
        let sid = self.sid()?;
        let n: i64 = self.write(|tx| {
            tx.query_row(
                "INSERT INTO send_counters (conv, n) VALUES (?1, 1)
                 ON CONFLICT (conv) DO UPDATE SET n = n + 1 RETURNING n",
                [&h],
                |r| r.get(0),
            )
        })?;
        Ok(Stamp { sid, n: n as u64 })
    }

    /// This store's random sender id (made with the store: a new install has a new one,
    /// so its counters starting again are not taken for replays).
    pub fn sid(&self) -> Result<String, StoreError> {
        if let Some(sid) = self.sid.get() {
            return Ok(sid.clone());
        }
        let sid: String = self
            .conn
            .query_row("SELECT value FROM meta WHERE name = 'sid'", [], |r| {
                r.get(0)
            })
            .map_err(|e| self.db_error(e))?;
        Ok(self.sid.get_or_init(|| sid).clone())
    }

    /// What a payload of `sender` in `conv` with `stamp` is (`held`: it was kept
    /// unopened, waiting for its key).
    pub fn replay_verdict(
        &self,
        sender: &str,
        conv: &str,
        stamp: &Stamp,
        held: bool,
    ) -> Result<Verdict, StoreError> {
        let h = self.window_hash(sender, conv, stamp);
        let window = read_window(&self.conn, &h).map_err(|e| self.db_error(e))?;
        Ok(window.verdict(stamp.n, held))
    }

    /// Records `stamp` of `sender` in `conv` as acted on.
    pub fn replay_mark(
        &mut self,
        sender: &str,
        conv: &str,
        stamp: &Stamp,
    ) -> Result<(), StoreError> {
        let h = self.window_hash(sender, conv, stamp);
        self.write(|tx| {
            let mut window = read_window(tx, &h)?;
            window.mark(stamp.n);
            tx.execute(
                "INSERT INTO replay (h, high, bits) VALUES (?1, ?2, ?3)
                 ON CONFLICT (h) DO UPDATE SET high = excluded.high, bits = excluded.bits",
                params![h, window.high as i64, window.bits],
            )?;
            Ok(())
        })
    }

    fn window_hash(&self, sender: &str, conv: &str, stamp: &Stamp) -> Vec<u8> {
        self.sealer
            .hash("replay", &format!("{sender}\0{conv}\0{}", stamp.sid))
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
