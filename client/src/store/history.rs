//! The history: one row per message, indexed by conversation, paged, searched.

use super::{DeliveryState, HistoryEntry, Store, StoreError};
use rusqlite::{params, Row};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// The sealed part of a history row.
#[derive(Serialize, Deserialize)]
struct HistoryRecord {
    peer: String,
    group: Option<String>,
    from: String,
    text: String,
    mid: String,
    /// Also in the clear (for the indexes), and checked against it on every read, so a
    /// row cannot be turned into one of mine (which `resend_pending` would send).
    #[serde(default)]
    outgoing: bool,
    #[serde(default)]
    file: bool,
}

/// A history entry with its row id (ids grow: a larger id was written later).
pub type HistoryRow = (i64, HistoryEntry);

const COLUMNS: &str = "id, outgoing, state, file, msg_id, ts, rec, conv";

impl Store {
    /// Adds an entry (a message we send, an event, a file); returns its row id.
    pub fn push_history(&mut self, entry: &HistoryEntry) -> Result<i64, StoreError> {
        self.insert_history(entry, None)
            .map(|id| id.unwrap_or_default())
    }

    /// Adds a received text unless one with the same sender and `mid` is there already:
    /// true if it was new (then it is shown). However often a text arrives, and however
    /// long after, it is shown once.
    pub fn record_received(&mut self, entry: &HistoryEntry) -> Result<bool, StoreError> {
        self.record_once(entry, &format!("{}/{}", entry.from, entry.mid))
    }

    /// Adds an entry unless one was added under `key` before: true if it was new.
    pub fn record_once(&mut self, entry: &HistoryEntry, key: &str) -> Result<bool, StoreError> {
        let dedup = self.sealer.hash("seen", key);
        Ok(self.insert_history(entry, Some(dedup))?.is_some())
    }

    fn insert_history(
        &mut self,
        entry: &HistoryEntry,
        dedup: Option<Vec<u8>>,
    ) -> Result<Option<i64>, StoreError> {
        let (conv, mid, rec) = self.seal_history(entry);
        let writer = self.writer;
        self.write(|tx| {
            let n = tx.execute(
                "INSERT INTO history (conv, mid, dedup, outgoing, state, file, msg_id, ts, writer, rec)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (dedup) DO NOTHING",
                params![
                    conv,
                    mid,
                    dedup,
                    entry.outgoing,
                    entry.state.code(),
                    entry.file,
                    entry.msg_id,
                    entry.ts as i64,
                    writer,
                    rec
                ],
            )?;
            Ok((n == 1).then(|| tx.last_insert_rowid()))
        })
    }

    /// The conversation hash, mid hash and sealed record of a history row.
    pub(super) fn seal_history(&self, entry: &HistoryEntry) -> (Vec<u8>, Vec<u8>, String) {
        let rec = self.sealer.seal(&HistoryRecord {
            peer: entry.peer.clone(),
            group: entry.group.clone(),
            from: entry.from.clone(),
            text: entry.text.clone(),
            mid: entry.mid.clone(),
            outgoing: entry.outgoing,
            file: entry.file,
        });
        (
            self.sealer.hash("conv", &entry.peer),
            self.sealer.hash("mid", &entry.mid),
            rec,
        )
    }

    /// The relay stored a message we sent (`mid`) as `msg_id`: a pending entry becomes
    /// stored (a later state stays).
    pub fn mark_stored(&mut self, mid: &str, msg_id: i64) -> Result<(), StoreError> {
        let h = self.sealer.hash("mid", mid);
        self.write(|tx| {
            tx.execute(
                "UPDATE history SET msg_id = ?2, state = max(state, 1)
                 WHERE mid = ?1 AND outgoing = 1",
                params![h, msg_id],
            )?;
            Ok(())
        })
    }

    /// Marks delivered my outgoing entries a receipt from `from` names by `mid`: direct
    /// entries only if their peer is `from`, group entries (conversation `#<id>`) from
    /// anyone. Returns the mids newly marked, in the receipt's order.
    pub fn mark_delivered(
        &mut self,
        from: &str,
        mids: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let direct = self.sealer.hash("conv", from);
        let mut wanted = Vec::new();
        let mut seen = HashSet::new();
        for mid in mids {
            if seen.insert(mid.as_str()) {
                wanted.push((mid.clone(), self.sealer.hash("mid", mid)));
            }
        }
        let sealer = &self.sealer;
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| super::db_error(&path, e))?;
        let mut delivered = Vec::new();
        {
            let mut find = tx
                .prepare_cached(
                    "SELECT id, conv, state, rec FROM history WHERE mid = ?1 AND outgoing = 1",
                )
                .map_err(|e| super::db_error(&path, e))?;
            let mut mark = tx
                .prepare_cached("UPDATE history SET state = 2 WHERE id = ?1")
                .map_err(|e| super::db_error(&path, e))?;
            for (mid, h) in &wanted {
                let rows: Vec<(i64, Vec<u8>, i64, String)> = find
                    .query_map([h], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                    .and_then(|rows| rows.collect())
                    .map_err(|e| super::db_error(&path, e))?;
                let mut marked = false;
                for (id, conv, state, rec) in rows {
                    let rec: HistoryRecord = sealer.open(&rec, "history")?;
                    let from_recipient = rec.peer.starts_with('#') || conv == direct;
                    if from_recipient && rec.mid == *mid && state != 2 {
                        mark.execute([id]).map_err(|e| super::db_error(&path, e))?;
                        marked = true;
                    }
                }
                if marked {
                    delivered.push(mid.clone());
                }
            }
        }
        tx.commit().map_err(|e| super::db_error(&path, e))?;
        Ok(delivered)
    }

    /// Sets the delivery state of my message `mid` (a repair, or a test's crash).
    pub fn set_delivery_state(
        &mut self,
        mid: &str,
        state: DeliveryState,
    ) -> Result<(), StoreError> {
        let h = self.sealer.hash("mid", mid);
        self.write(|tx| {
            tx.execute(
                "UPDATE history SET state = ?2 WHERE mid = ?1 AND outgoing = 1",
                params![h, state.code()],
            )?;
            Ok(())
        })
    }

    /// My messages still pending (a failed send, a crash before the relay answered),
    /// oldest first.
    pub fn pending_outgoing(&self) -> Result<Vec<HistoryEntry>, StoreError> {
        let rows = self.query_history(
            &format!("SELECT {COLUMNS} FROM history WHERE outgoing = 1 AND state = 0 ORDER BY id"),
            [],
        )?;
        Ok(rows.into_iter().map(|(_, e)| e).collect())
    }

    /// The message I sent to `peer` that the relay stored as `msg_id`, if any.
    pub fn sent_to(&self, peer: &str, msg_id: i64) -> Result<Option<HistoryEntry>, StoreError> {
        let conv = self.sealer.hash("conv", peer);
        let rows = self.query_history(
            &format!(
                "SELECT {COLUMNS} FROM history
                 WHERE conv = ?1 AND msg_id = ?2 AND outgoing = 1 ORDER BY id LIMIT 1"
            ),
            params![conv, msg_id],
        )?;
        Ok(rows.into_iter().next().map(|(_, e)| e))
    }

    /// Every entry, oldest first (small stores, tests and exports).
    pub fn history(&self) -> Result<Vec<HistoryEntry>, StoreError> {
        let rows = self.query_history(&format!("SELECT {COLUMNS} FROM history ORDER BY id"), [])?;
        Ok(rows.into_iter().map(|(_, e)| e).collect())
    }

    /// Whether this user ever wrote in the direct conversation with `peer`.
    pub fn wrote_to(&self, peer: &str) -> Result<bool, StoreError> {
        let h = self.sealer.hash("conv", peer);
        self.conn
            .prepare_cached("SELECT 1 FROM history WHERE conv = ?1 AND outgoing = 1 LIMIT 1")
            .and_then(|mut s| s.exists(params![h]))
            .map_err(|e| self.db_error(e))
    }

    /// Up to `limit` entries of conversation `conv` written before row `before` (the
    /// newest if `None`), oldest first.
    pub fn history_page(
        &self,
        conv: &str,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<HistoryRow>, StoreError> {
        let h = self.sealer.hash("conv", conv);
        let mut rows = self.query_history(
            &format!(
                "SELECT {COLUMNS} FROM history WHERE conv = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3"
            ),
            params![h, before.unwrap_or(i64::MAX), limit as i64],
        )?;
        rows.reverse();
        Ok(rows)
    }

    /// What a UI shows at start, oldest first: the newest `per_recent` entries of the
    /// `recent` conversations written to last, and the newest `per_other` of every other
    /// one. One index range per conversation; only what is returned is decrypted.
    pub fn recent_history(
        &self,
        recent: usize,
        per_recent: usize,
        per_other: usize,
    ) -> Result<Vec<HistoryRow>, StoreError> {
        let convs: Vec<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT conv FROM history GROUP BY conv ORDER BY max(id) DESC")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(|e| self.db_error(e))?;
        let mut rows = Vec::new();
        for (i, conv) in convs.into_iter().enumerate() {
            let limit = if i < recent { per_recent } else { per_other };
            rows.extend(self.query_history(
                &format!("SELECT {COLUMNS} FROM history WHERE conv = ?1 ORDER BY id DESC LIMIT ?2"),
                params![conv, limit as i64],
            )?);
        }
        rows.sort_by_key(|(id, _)| *id);
        Ok(rows)
    }

    /// Entries written after row `after` by other processes of this user (another
    /// `send`, a reader, another UI), oldest first.
    pub fn history_from_others(&self, after: i64) -> Result<Vec<HistoryRow>, StoreError> {
        self.query_history(
            &format!("SELECT {COLUMNS} FROM history WHERE id > ?1 AND writer != ?2 ORDER BY id"),
            params![after, self.writer],
        )
    }

    /// The id of the newest row (0 when there is none).
    pub fn last_history_id(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("SELECT coalesce(max(id), 0) FROM history", [], |r| r.get(0))
            .map_err(|e| self.db_error(e))
    }

    /// How many entries there are.
    pub fn history_len(&self) -> Result<usize, StoreError> {
        self.conn
            .query_row("SELECT count(*) FROM history", [], |r| r.get::<_, i64>(0))
            .map(|n| n as usize)
            .map_err(|e| self.db_error(e))
    }

    /// Entries whose text holds `text` (case-insensitive), oldest first: of conversation
    /// `conv` only, if given. Each record is decrypted to match (nothing is indexed in
    /// the clear).
    pub fn search(&self, conv: Option<&str>, text: &str) -> Result<Vec<HistoryRow>, StoreError> {
        let needle = text.to_lowercase();
        let (sql, h) = match conv {
            Some(conv) => (
                format!("SELECT {COLUMNS} FROM history WHERE conv = ?1 ORDER BY id"),
                Some(self.sealer.hash("conv", conv)),
            ),
            None => (format!("SELECT {COLUMNS} FROM history ORDER BY id"), None),
        };
        let mut stmt = self
            .conn
            .prepare_cached(&sql)
            .map_err(|e| self.db_error(e))?;
        let mut rows = match &h {
            Some(h) => stmt.query([h]),
            None => stmt.query([]),
        }
        .map_err(|e| self.db_error(e))?;
        let mut found = Vec::new();
        while let Some(row) = rows.next().map_err(|e| self.db_error(e))? {
            let (id, entry) = self.history_row(row)?;
            if entry.text.to_lowercase().contains(&needle) {
                found.push((id, entry));
            }
        }
        Ok(found)
    }

    fn query_history(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<HistoryRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(sql)
            .map_err(|e| self.db_error(e))?;
        let mut rows = stmt.query(params).map_err(|e| self.db_error(e))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(|e| self.db_error(e))? {
            out.push(self.history_row(row)?);
        }
        Ok(out)
    }

    /// A row of [`COLUMNS`].
    fn history_row(&self, row: &Row<'_>) -> Result<HistoryRow, StoreError> {
        let get = |e: rusqlite::Error| self.db_error(e);
        let id: i64 = row.get(0).map_err(get)?;
        let rec: String = row.get(6).map_err(get)?;
        let conv: Vec<u8> = row.get(7).map_err(get)?;
        let rec: HistoryRecord = self.sealer.open(&rec, "history")?;
        let outgoing: bool = row.get(1).map_err(get)?;
        let file: bool = row.get(3).map_err(get)?;
        if rec.outgoing != outgoing
            || rec.file != file
            || conv != self.sealer.hash("conv", &rec.peer)
        {
            return Err(StoreError::Corrupt(format!("history row {id} was altered")));
        }
        let entry = HistoryEntry {
            peer: rec.peer,
            group: rec.group,
            from: rec.from,
            text: rec.text,
            ts: row.get::<_, i64>(5).map_err(get)? as u64,
            msg_id: row.get(4).map_err(get)?,
            mid: rec.mid,
            outgoing,
            state: DeliveryState::from_code(row.get(2).map_err(get)?),
            file,
        };
        Ok((id, entry))
    }
}
