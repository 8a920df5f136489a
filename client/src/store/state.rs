//! Duplicate-detection windows, the inbox, downloads, groups and saved logins.

use super::{GroupState, InboxEntry, ResumeCredential, Store, StoreError, MAX_SEEN_IDS};
use crate::files::PendingDownload;
use rusqlite::{params, OptionalExtension};
use std::collections::BTreeMap;

/// The seen windows are trimmed to [`MAX_SEEN_IDS`] after this many additions by one
/// handle (so they may briefly hold this many more).
const PRUNE_EVERY: u64 = 1024;

/// Proof that a server showed two histories of one group (PROTOCOL.md §7.9): the
/// statement this client verified and another, both signed, at one place of the chain
/// and naming the same previous statement. Statements as the relay's JSON.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RosterFork {
    pub group_id: i64,
    pub seq: i32,
    pub ours: String,
    pub theirs: String,
    /// When this client saw it, unix ms.
    pub seen_ms: u64,
}

/// A stored message not opened yet, with its recovery state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxRow {
    pub entry: InboxEntry,
    /// Waiting for a key (see [`Store::hold`]).
    pub held: bool,
    /// Requests sent for its key so far.
    pub tries: u32,
    /// When the next request (or, past the last, giving up) is due, unix ms.
    pub next_try_ms: u64,
    /// When it was stored, unix ms (local clock).
    pub first_ms: u64,
}

impl Store {
    /// Records a sender message id (`from/mid`, or any other text); true if it was new.
    /// Keeps the newest [`MAX_SEEN_IDS`].
    pub fn remember_mid(&mut self, mid: &str) -> Result<bool, StoreError> {
        let h = self.sealer.hash("seen", mid);
        let new = self.write(|tx| {
            Ok(tx.execute(
                "INSERT INTO seen_mids (h) VALUES (?1) ON CONFLICT (h) DO NOTHING",
                [&h],
            )? == 1)
        })?;
        if new {
            self.seen_added(1)?;
        }
        Ok(new)
    }

    /// The server message ids in the seen window, oldest first.
    pub fn seen_msg_ids(&self) -> Result<Vec<i64>, StoreError> {
        self.conn
            .prepare_cached("SELECT msg_id FROM seen_msg_ids ORDER BY seq")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(|e| self.db_error(e))
    }

    /// What tells one message from another before it is opened, whatever server id it
    /// came under: its sender, group and ciphertext (a message sent again is the same
    /// ciphertext; a fresh one never is). `None` for group events, which have no body.
    fn body_key(&self, m: &InboxEntry) -> Option<Vec<u8>> {
        if m.event.is_some() || m.body.is_empty() {
            return None;
        }
        let group = m.group_id.map_or_else(String::new, |g| g.to_string());
        Some(
            self.sealer
                .hash("body", &format!("{}\0{group}\0{}", m.from, m.body)),
        )
    }

    /// Whether a sender message id (as given to [`Store::remember_mid`]) is in the window.
    pub fn seen_mid(&self, mid: &str) -> Result<bool, StoreError> {
        let h = self.sealer.hash("seen", mid);
        self.conn
            .prepare_cached("SELECT 1 FROM seen_mids WHERE h = ?1")
            .and_then(|mut s| s.query_row([&h], |_| Ok(())).optional())
            .map(|r| r.is_some())
            .map_err(|e| self.db_error(e))
    }

    /// Stores a received batch in one transaction, before it is acknowledged: each
    /// message whose server id is new goes into the inbox. Returns how many were new.
    pub fn store_batch(&mut self, batch: &[InboxEntry]) -> Result<usize, StoreError> {
        let now = fastchat_common::time::now_ms() as i64;
        let sealed: Vec<(i64, Option<Vec<u8>>, String)> = batch
            .iter()
            .map(|m| (m.msg_id, self.body_key(m), self.sealer.seal(m)))
            .collect();
        let (new, seen_added) = self.write(|tx| {
            let mut seen = tx.prepare_cached(
                "INSERT INTO seen_msg_ids (msg_id) VALUES (?1) ON CONFLICT (msg_id) DO NOTHING",
            )?;
            let mut seen_body = tx.prepare_cached(
                "INSERT INTO seen_bodies (h) VALUES (?1) ON CONFLICT (h) DO NOTHING",
            )?;
            let mut inbox = tx.prepare_cached(
                "INSERT INTO inbox (msg_id, first_ms, rec) VALUES (?1, ?2, ?3)
                 ON CONFLICT (msg_id) DO NOTHING",
            )?;
            let (mut new, mut added) = (0, 0);
            for (msg_id, body_key, rec) in &sealed {
                if seen.execute([msg_id])? == 0 {
                    continue;
                }
                added += 1;
                // The same message under another server id: had already.
                if let Some(h) = body_key {
                    if seen_body.execute([h])? == 0 {
                        continue;
                    }
                    added += 1;
                }
                inbox.execute(params![msg_id, now, rec])?;
                new += 1;
            }
            Ok((new, added))
        })?;
        self.seen_added(seen_added)?;
        Ok(new)
    }

    /// Everything stored and not opened yet (held ones included), in arrival order.
    pub fn inbox(&self) -> Result<Vec<InboxRow>, StoreError> {
        let rows: Vec<(String, bool, u32, i64, i64)> = self
            .conn
            .prepare_cached("SELECT rec, held, tries, next_try, first_ms FROM inbox ORDER BY seq")
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect()
            })
            .map_err(|e| self.db_error(e))?;
        rows.into_iter()
            .map(|(rec, held, tries, next_try, first_ms)| {
                Ok(InboxRow {
                    entry: self.sealer.open(&rec, "inbox")?,
                    held,
                    tries,
                    next_try_ms: next_try as u64,
                    first_ms: first_ms as u64,
                })
            })
            .collect()
    }

    /// How many messages wait in the inbox.
    pub fn inbox_len(&self) -> Result<usize, StoreError> {
        self.conn
            .query_row("SELECT count(*) FROM inbox", [], |r| r.get::<_, i64>(0))
            .map(|n| n as usize)
            .map_err(|e| self.db_error(e))
    }

    /// Message `msg_id` is opened (or given up): out of the inbox.
    pub fn inbox_done(&mut self, msg_id: i64) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute("DELETE FROM inbox WHERE msg_id = ?1", [msg_id])?;
            Ok(())
        })
    }

    /// Message `msg_id` waits for key `key_id` (of group `group`, or of its sender):
    /// `tries` requests sent so far, the next (or giving up) due at `next_try_ms`.
    pub fn hold(
        &mut self,
        msg_id: i64,
        group: Option<i64>,
        key_id: &str,
        tries: u32,
        next_try_ms: u64,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE inbox SET held = 1, need_group = ?2, need_key = ?3, tries = ?4, next_try = ?5
                 WHERE msg_id = ?1",
                params![msg_id, group, key_id, tries, next_try_ms as i64],
            )?;
            Ok(())
        })
    }

    /// Whether a held message of group `group` waits for key `key_id` (so a grant of
    /// exactly that key was asked for).
    pub fn waits_for_group_key(&self, group: i64, key_id: &str) -> Result<bool, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT 1 FROM inbox WHERE held = 1 AND need_group = ?1 AND need_key = ?2 LIMIT 1",
            )
            .and_then(|mut s| s.query_row(params![group, key_id], |_| Ok(())).optional())
            .map(|r| r.is_some())
            .map_err(|e| self.db_error(e))
    }

    /// Downloads not finished yet.
    pub fn downloads(&self) -> Result<Vec<PendingDownload>, StoreError> {
        let recs: Vec<String> = self.query_recs("SELECT rec FROM downloads ORDER BY file_id")?;
        recs.iter()
            .map(|r| self.sealer.open(r, "downloads"))
            .collect()
    }

    /// The unfinished download of `file_id`, if any.
    pub fn download(&self, file_id: i64) -> Result<Option<PendingDownload>, StoreError> {
        let rec: Option<String> =
            self.query_rec("SELECT rec FROM downloads WHERE file_id = ?1", [file_id])?;
        rec.map(|r| self.sealer.open(&r, "downloads")).transpose()
    }

    /// Keeps a download to do (one per file: a second announcement of it changes nothing).
    pub fn add_download(&mut self, d: &PendingDownload) -> Result<(), StoreError> {
        let rec = self.sealer.seal(d);
        self.write(|tx| {
            tx.execute(
                "INSERT INTO downloads (file_id, rec) VALUES (?1, ?2) ON CONFLICT (file_id) DO NOTHING",
                params![d.offer.file_id, rec],
            )?;
            Ok(())
        })
    }

    /// Replaces the download of the same file (an accepted held file).
    pub fn put_download(&mut self, d: &PendingDownload) -> Result<(), StoreError> {
        let rec = self.sealer.seal(d);
        self.write(|tx| {
            tx.execute(
                "INSERT INTO downloads (file_id, rec) VALUES (?1, ?2)
                 ON CONFLICT (file_id) DO UPDATE SET rec = excluded.rec",
                params![d.offer.file_id, rec],
            )?;
            Ok(())
        })
    }

    /// Takes the download of `file_id` out (finished or failed); `None` if another
    /// process took it first.
    pub fn take_download(&mut self, file_id: i64) -> Result<Option<PendingDownload>, StoreError> {
        let rec: Option<String> = self.write(|tx| {
            let rec = tx
                .query_row(
                    "SELECT rec FROM downloads WHERE file_id = ?1",
                    [file_id],
                    |r| r.get(0),
                )
                .optional()?;
            tx.execute("DELETE FROM downloads WHERE file_id = ?1", [file_id])?;
            Ok(rec)
        })?;
        rec.map(|r| self.sealer.open(&r, "downloads")).transpose()
    }

    /// The groups this user is or was in, by id.
    pub fn groups(&self) -> Result<BTreeMap<i64, GroupState>, StoreError> {
        let rows: Vec<(i64, String)> = self
            .conn
            .prepare_cached("SELECT group_id, rec FROM groups ORDER BY group_id")
            .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
            .map_err(|e| self.db_error(e))?;
        rows.into_iter()
            .map(|(id, rec)| Ok((id, self.open_group(id, &rec)?)))
            .collect()
    }

    /// Opens a `groups` record, checking it is filed under its own id.
    fn open_group(&self, group_id: i64, rec: &str) -> Result<GroupState, StoreError> {
        let (id, state): (i64, GroupState) = self.sealer.open(rec, "groups")?;
        if id != group_id {
            return Err(StoreError::Corrupt(format!(
                "group row {group_id} was altered"
            )));
        }
        Ok(state)
    }

    /// What is known of group `group_id`.
    pub fn group(&self, group_id: i64) -> Result<Option<GroupState>, StoreError> {
        let rec: Option<String> =
            self.query_rec("SELECT rec FROM groups WHERE group_id = ?1", [group_id])?;
        rec.map(|r| self.open_group(group_id, &r)).transpose()
    }

    /// Changes what is known of group `group_id` in one transaction: `f` gets the state
    /// kept (if any) and returns the new one.
    pub fn update_group(
        &mut self,
        group_id: i64,
        f: impl FnOnce(Option<GroupState>) -> GroupState,
    ) -> Result<GroupState, StoreError> {
        let path = self.path.clone();
        let err = |e| super::db_error(&path, e);
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        let rec: Option<String> = tx
            .query_row(
                "SELECT rec FROM groups WHERE group_id = ?1",
                [group_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        let old = match rec {
            Some(r) => {
                let (id, state): (i64, GroupState) = self.sealer.open(&r, "groups")?;
                if id != group_id {
                    return Err(StoreError::Corrupt(format!(
                        "group row {group_id} was altered"
                    )));
                }
                Some(state)
            }
            None => None,
        };
        let new = f(old);
        tx.execute(
            "INSERT INTO groups (group_id, rec) VALUES (?1, ?2)
             ON CONFLICT (group_id) DO UPDATE SET rec = excluded.rec",
            params![group_id, self.sealer.seal(&(group_id, &new))],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(new)
    }

    /// The verified roster of group `group_id`, as last checked.
    pub fn roster(&self, group_id: i64) -> Result<Option<crate::roster::Roster>, StoreError> {
        let rec: Option<String> =
            self.query_rec("SELECT rec FROM rosters WHERE group_id = ?1", [group_id])?;
        let Some(rec) = rec else { return Ok(None) };
        let (id, roster): (i64, crate::roster::Roster) = self.sealer.open(&rec, "rosters")?;
        if id != group_id || roster.group_id != group_id {
            return Err(StoreError::Corrupt(format!(
                "roster row {group_id} was altered"
            )));
        }
        Ok(Some(roster))
    }

    /// Keeps a verified roster; one older than the one kept (a lower `seq`, as another
    /// process may have gone further) changes nothing.
    pub fn put_roster(&mut self, roster: &crate::roster::Roster) -> Result<(), StoreError> {
        let rec = self.sealer.seal(&(roster.group_id, roster));
        let group_id = roster.group_id;
        let newer = match self.roster(group_id)? {
            Some(kept) => roster.seq > kept.seq,
            None => true,
        };
        if !newer {
            return Ok(());
        }
        self.write(|tx| {
            tx.execute(
                "INSERT INTO rosters (group_id, rec) VALUES (?1, ?2)
                 ON CONFLICT (group_id) DO UPDATE SET rec = excluded.rec",
                params![group_id, rec],
            )?;
            Ok(())
        })
    }

    /// Keeps proof of a misbehaving server: two signed statements at one place of
    /// group `fork.group_id`'s chain (kept once each).
    pub fn put_roster_fork(&mut self, fork: &RosterFork) -> Result<(), StoreError> {
        if self
            .roster_forks(fork.group_id)?
            .iter()
            .any(|f| f.theirs == fork.theirs)
        {
            return Ok(());
        }
        let rec = self.sealer.seal(fork);
        self.write(|tx| {
            tx.execute(
                "INSERT INTO roster_forks (group_id, rec) VALUES (?1, ?2)",
                params![fork.group_id, rec],
            )?;
            Ok(())
        })
    }

    /// The proofs kept for group `group_id`, oldest first.
    pub fn roster_forks(&self, group_id: i64) -> Result<Vec<RosterFork>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT rec FROM roster_forks WHERE group_id = ?1 ORDER BY id")
            .map_err(|e| self.db_error(e))?;
        let recs: Vec<String> = stmt
            .query_map([group_id], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.db_error(e))?;
        let forks: Vec<RosterFork> = recs
            .iter()
            .map(|r| self.sealer.open(r, "roster_forks"))
            .collect::<Result<_, _>>()?;
        if forks.iter().any(|f| f.group_id != group_id) {
            return Err(StoreError::Corrupt(format!(
                "a roster_forks row of group {group_id} was altered"
            )));
        }
        Ok(forks)
    }

    /// The saved resumption credential for auth server `server`.
    pub fn resume(&self, server: &str) -> Result<Option<ResumeCredential>, StoreError> {
        let h = self.sealer.hash("server", server);
        let rec: Option<String> =
            self.query_rec("SELECT rec FROM resume WHERE server = ?1", [&h])?;
        let rec: Option<(String, ResumeCredential)> =
            rec.map(|r| self.sealer.open(&r, "resume")).transpose()?;
        Ok(rec.filter(|(s, _)| s == server).map(|(_, c)| c))
    }

    /// Every saved credential, by auth server.
    pub fn resume_all(&self) -> Result<BTreeMap<String, ResumeCredential>, StoreError> {
        let recs: Vec<String> = self.query_recs("SELECT rec FROM resume")?;
        recs.iter().map(|r| self.sealer.open(r, "resume")).collect()
    }

    /// Saves (or, with `None`, forgets) the credential for `server`; returns what was
    /// there.
    pub fn set_resume(
        &mut self,
        server: &str,
        credential: Option<&ResumeCredential>,
    ) -> Result<Option<ResumeCredential>, StoreError> {
        let old = self.resume(server)?;
        let h = self.sealer.hash("server", server);
        let rec = credential.map(|c| self.sealer.seal(&(server, c)));
        self.write(|tx| {
            match rec {
                Some(rec) => tx.execute(
                    "INSERT INTO resume (server, rec) VALUES (?1, ?2)
                     ON CONFLICT (server) DO UPDATE SET rec = excluded.rec",
                    params![h, rec],
                )?,
                None => tx.execute("DELETE FROM resume WHERE server = ?1", [&h])?,
            };
            Ok(())
        })?;
        Ok(old)
    }

    /// Forgets every saved credential (a password change revokes them all).
    pub fn clear_resume(&mut self) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute("DELETE FROM resume", [])?;
            Ok(())
        })
    }

    /// Counts additions to the seen windows; trims them now and then.
    fn seen_added(&mut self, n: u64) -> Result<(), StoreError> {
        let before = self.seen_added;
        self.seen_added += n;
        if before / PRUNE_EVERY == self.seen_added / PRUNE_EVERY {
            return Ok(());
        }
        self.prune_seen()
    }

    /// Keeps the newest [`MAX_SEEN_IDS`] of each window.
    pub(crate) fn prune_seen(&mut self) -> Result<(), StoreError> {
        let keep = MAX_SEEN_IDS as i64;
        self.write(|tx| {
            tx.execute(
                "DELETE FROM seen_msg_ids WHERE seq <= (SELECT max(seq) FROM seen_msg_ids) - ?1",
                [keep],
            )?;
            tx.execute(
                "DELETE FROM seen_mids WHERE seq <= (SELECT max(seq) FROM seen_mids) - ?1",
                [keep],
            )?;
            tx.execute(
                "DELETE FROM seen_bodies WHERE seq <= (SELECT max(seq) FROM seen_bodies) - ?1",
                [keep],
            )?;
            Ok(())
        })
    }
}
