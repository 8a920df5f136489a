//! Pinned peer keys and conversation (and group) keys.
//!
//! A conversation key is made in a transaction that first looks for one, so two
//! processes of one user never make two keys for one conversation; keys from two devices
//! (or two sides offering at once) are all kept and all open what they sealed.

use super::sealed::Sealer;
use super::{ConversationKeys, PeerEntry, Store, StoreError};
use crate::e2e::ConversationKey;
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A sealed `peers` row: the name inside too, so a row moved under another name's hash
/// does not open as that name's.
#[derive(Serialize, Deserialize)]
struct PeerRecord {
    name: String,
    #[serde(flatten)]
    entry: PeerEntry,
}

/// A sealed `conv_keys` row.
#[derive(Serialize, Deserialize)]
struct KeyRecord {
    conv: String,
    key_id: String,
    key: String,
}

/// When a kept key becomes the one a conversation sends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MakeCurrent {
    /// Only if the conversation has none (a key offered by a peer).
    IfNone,
    /// If its epoch is at least the current key's (group keys).
    IfNewestEpoch,
    /// Never (a key kept only to read what it sealed).
    Never,
}

impl Store {
    /// The pinned key of `name`, if any.
    pub fn peer(&self, name: &str) -> Result<Option<PeerEntry>, StoreError> {
        let h = self.sealer.hash("peer", name);
        let rec: Option<String> = self.query_rec("SELECT rec FROM peers WHERE h = ?1", [&h])?;
        let Some(rec) = rec else { return Ok(None) };
        let rec: PeerRecord = self.sealer.open(&rec, "peers")?;
        if rec.name != name {
            return Err(StoreError::Corrupt(
                "a peers row is filed under another name".into(),
            ));
        }
        Ok(Some(rec.entry))
    }

    /// Every pinned key, by name.
    pub fn peers(&self) -> Result<Vec<(String, PeerEntry)>, StoreError> {
        let recs: Vec<String> = self.query_recs("SELECT rec FROM peers")?;
        let mut peers = recs
            .iter()
            .map(|rec| {
                let rec: PeerRecord = self.sealer.open(rec, "peers")?;
                Ok((rec.name, rec.entry))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        peers.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(peers)
    }

    /// Pins (or replaces) the key of `name`.
    pub fn put_peer(&mut self, name: &str, entry: &PeerEntry) -> Result<(), StoreError> {
        let h = self.sealer.hash("peer", name);
        let rec = self.seal_peer(name, entry);
        self.write(|tx| {
            tx.execute(
                "INSERT INTO peers (h, rec) VALUES (?1, ?2)
                 ON CONFLICT (h) DO UPDATE SET rec = excluded.rec",
                params![h, rec],
            )?;
            Ok(())
        })
    }

    /// Pins `entry` for `name` unless a key is pinned already (another process may have
    /// pinned it first); returns the pinned entry either way.
    pub fn pin_peer(&mut self, name: &str, entry: &PeerEntry) -> Result<PeerEntry, StoreError> {
        let h = self.sealer.hash("peer", name);
        let rec = self.seal_peer(name, entry);
        self.write(|tx| {
            tx.execute(
                "INSERT INTO peers (h, rec) VALUES (?1, ?2) ON CONFLICT (h) DO NOTHING",
                params![h, rec],
            )?;
            Ok(())
        })?;
        self.peer(name)?
            .ok_or_else(|| StoreError::Corrupt("a pinned key vanished".into()))
    }

    /// Changes the pinned entry of `name` with `f` (nothing if none is pinned), in one
    /// transaction.
    pub fn update_peer(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut PeerEntry),
    ) -> Result<Option<PeerEntry>, StoreError> {
        let h = self.sealer.hash("peer", name);
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| super::db_error(&path, e))?;
        let rec: Option<String> = tx
            .query_row("SELECT rec FROM peers WHERE h = ?1", [&h], |r| r.get(0))
            .optional()
            .map_err(|e| super::db_error(&path, e))?;
        let Some(rec) = rec else { return Ok(None) };
        let mut rec: PeerRecord = self.sealer.open(&rec, "peers")?;
        if rec.name != name {
            return Err(StoreError::Corrupt(
                "a peers row is filed under another name".into(),
            ));
        }
        f(&mut rec.entry);
        let sealed = self.sealer.seal(&rec);
        tx.execute("UPDATE peers SET rec = ?2 WHERE h = ?1", params![h, sealed])
            .map_err(|e| super::db_error(&path, e))?;
        tx.commit().map_err(|e| super::db_error(&path, e))?;
        Ok(Some(rec.entry))
    }

    fn seal_peer(&self, name: &str, entry: &PeerEntry) -> String {
        self.sealer.seal(&PeerRecord {
            name: name.to_string(),
            entry: entry.clone(),
        })
    }

    /// Every key of conversation `conv` (a peer, or a group's `#<id>`).
    pub fn conversation(&self, conv: &str) -> Result<ConversationKeys, StoreError> {
        let h = self.sealer.hash("conv", conv);
        let rows: Vec<(String, Option<i32>, bool, String)> = self
            .conn
            .prepare_cached(
                "SELECT key_id, epoch, shared, rec FROM conv_keys WHERE conv = ?1 ORDER BY seq",
            )
            .and_then(|mut s| {
                s.query_map([&h], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                    .collect()
            })
            .map_err(|e| self.db_error(e))?;
        let mut keys = ConversationKeys {
            current: self.current_key_id(&h)?,
            ..ConversationKeys::default()
        };
        for (key_id, epoch, shared, rec) in rows {
            let key = self.open_key(&rec, conv, &key_id)?;
            keys.keys.insert(key_id.clone(), key);
            if shared {
                keys.shared.insert(key_id.clone());
            }
            if let Some(epoch) = epoch {
                keys.epochs.insert(key_id, epoch);
            }
        }
        Ok(keys)
    }

    /// Every conversation's keys, by conversation.
    pub fn conversations(&self) -> Result<BTreeMap<String, ConversationKeys>, StoreError> {
        let recs: Vec<String> = self.query_recs("SELECT rec FROM conv_keys")?;
        let mut out = BTreeMap::new();
        for rec in recs {
            let rec: KeyRecord = self.sealer.open(&rec, "conv_keys")?;
            if let std::collections::btree_map::Entry::Vacant(slot) = out.entry(rec.conv) {
                let keys = self.conversation(slot.key())?;
                slot.insert(keys);
            }
        }
        Ok(out)
    }

    /// Key `key_id` of conversation `conv`, if held.
    pub fn conversation_key(
        &self,
        conv: &str,
        key_id: &str,
    ) -> Result<Option<ConversationKey>, StoreError> {
        let h = self.sealer.hash("conv", conv);
        let rec: Option<String> = self.query_rec(
            "SELECT rec FROM conv_keys WHERE conv = ?1 AND key_id = ?2",
            params![h, key_id],
        )?;
        rec.map(|rec| {
            Ok(ConversationKey {
                id: key_id.to_string(),
                key: self.open_key(&rec, conv, key_id)?,
            })
        })
        .transpose()
    }

    /// The key conversation `conv` sends with, and its epoch (group keys), if any.
    pub fn current_key(
        &self,
        conv: &str,
    ) -> Result<Option<(ConversationKey, Option<i32>)>, StoreError> {
        let h = self.sealer.hash("conv", conv);
        let row: Option<(String, Option<i32>, String)> = self
            .conn
            .prepare_cached(
                "SELECT k.key_id, k.epoch, k.rec FROM conv_current c
                 JOIN conv_keys k ON k.conv = c.conv AND k.key_id = c.key_id
                 WHERE c.conv = ?1",
            )
            .and_then(|mut s| {
                s.query_row([&h], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .optional()
            })
            .map_err(|e| self.db_error(e))?;
        row.map(|(key_id, epoch, rec)| {
            let key = self.open_key(&rec, conv, &key_id)?;
            Ok((ConversationKey { id: key_id, key }, epoch))
        })
        .transpose()
    }

    /// The key `conv` sends with; if it has none, `make()` is kept and made current —
    /// in one transaction that looks first, so concurrent processes agree on one key.
    /// Returns the key and whether it was made now.
    pub fn current_or_new_key(
        &mut self,
        conv: &str,
        make: impl FnOnce() -> ConversationKey,
    ) -> Result<(ConversationKey, bool), StoreError> {
        let h = self.sealer.hash("conv", conv);
        let path = self.path.clone();
        let err = |e| super::db_error(&path, e);
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        let existing: Option<(String, String)> = tx
            .query_row(
                "SELECT k.key_id, k.rec FROM conv_current c
                 JOIN conv_keys k ON k.conv = c.conv AND k.key_id = c.key_id
                 WHERE c.conv = ?1",
                [&h],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(err)?;
        if let Some((key_id, rec)) = existing {
            let key = open_key(&self.sealer, &rec, conv, &key_id)?;
            return Ok((ConversationKey { id: key_id, key }, false));
        }
        let key = make();
        let rec = seal_key(&self.sealer, conv, &key);
        tx.execute(
            "INSERT INTO conv_keys (conv, key_id, epoch, shared, rec) VALUES (?1, ?2, NULL, 0, ?3)
             ON CONFLICT (conv, key_id) DO NOTHING",
            params![h, key.id, rec],
        )
        .map_err(err)?;
        tx.execute(
            "INSERT INTO conv_current (conv, key_id) VALUES (?1, ?2)
             ON CONFLICT (conv) DO UPDATE SET key_id = excluded.key_id",
            params![h, key.id],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok((key, true))
    }

    /// Keeps `key` for `conv` and makes it current as `current` says; `shared`: the peer
    /// is known to hold it (only ever turns on). A key id already kept with other key
    /// material is refused (`Ok(false)`, nothing changes): the first one stays. Kept
    /// again with [`MakeCurrent::IfNewestEpoch`] (an admin's grant), its epoch becomes
    /// the one given; the decision to make it current uses the epoch kept.
    pub fn add_key(
        &mut self,
        conv: &str,
        key: &ConversationKey,
        epoch: Option<i32>,
        shared: bool,
        current: MakeCurrent,
    ) -> Result<bool, StoreError> {
        let h = self.sealer.hash("conv", conv);
        let rec = seal_key(&self.sealer, conv, key);
        let path = self.path.clone();
        let err = |e| super::db_error(&path, e);
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        let existing: Option<(String, Option<i32>)> = tx
            .query_row(
                "SELECT rec, epoch FROM conv_keys WHERE conv = ?1 AND key_id = ?2",
                params![h, key.id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(err)?;
        let epoch = match existing {
            Some((old, old_epoch)) => {
                if open_key(&self.sealer, &old, conv, &key.id)? != key.key {
                    return Ok(false);
                }
                let epoch = if current == MakeCurrent::IfNewestEpoch {
                    epoch
                } else {
                    old_epoch
                };
                tx.execute(
                    "UPDATE conv_keys SET shared = max(shared, ?3), epoch = ?4
                     WHERE conv = ?1 AND key_id = ?2",
                    params![h, key.id, shared, epoch],
                )
                .map_err(err)?;
                epoch
            }
            None => {
                tx.execute(
                    "INSERT INTO conv_keys (conv, key_id, epoch, shared, rec) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![h, key.id, epoch, shared, rec],
                )
                .map_err(err)?;
                epoch
            }
        };
        let make_current = match current {
            MakeCurrent::Never => false,
            MakeCurrent::IfNone => tx
                .query_row("SELECT 1 FROM conv_current WHERE conv = ?1", [&h], |_| {
                    Ok(())
                })
                .optional()
                .map_err(err)?
                .is_none(),
            MakeCurrent::IfNewestEpoch => {
                let now: Option<Option<i32>> = tx
                    .query_row(
                        "SELECT k.epoch FROM conv_current c
                         JOIN conv_keys k ON k.conv = c.conv AND k.key_id = c.key_id
                         WHERE c.conv = ?1",
                        [&h],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(err)?;
                match now {
                    None => true,
                    Some(now) => epoch.unwrap_or(0) >= now.unwrap_or(i32::MIN),
                }
            }
        };
        if make_current {
            tx.execute(
                "INSERT INTO conv_current (conv, key_id) VALUES (?1, ?2)
                 ON CONFLICT (conv) DO UPDATE SET key_id = excluded.key_id",
                params![h, key.id],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(true)
    }

    /// The peer of `conv` is known to hold key `key_id`.
    /// How many keys are kept for `conv`.
    pub fn key_count(&self, conv: &str) -> Result<u64, StoreError> {
        let h = self.sealer.hash("conv", conv);
        self.conn
            .query_row(
                "SELECT count(*) FROM conv_keys WHERE conv = ?1",
                [&h],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(|e| super::db_error(&self.path, e))
    }

    pub fn mark_shared(&mut self, conv: &str, key_id: &str) -> Result<(), StoreError> {
        let h = self.sealer.hash("conv", conv);
        self.write(|tx| {
            tx.execute(
                "UPDATE conv_keys SET shared = 1 WHERE conv = ?1 AND key_id = ?2",
                params![h, key_id],
            )?;
            Ok(())
        })
    }

    /// Pins a new key for `name` (a changed key the user accepted) and, in the same
    /// transaction, forgets which conversation keys their old identity held: none is
    /// current or shared any more (all are kept, to read old messages).
    pub fn replace_peer_key(&mut self, name: &str, entry: &PeerEntry) -> Result<(), StoreError> {
        let peer = self.sealer.hash("peer", name);
        let conv = self.sealer.hash("conv", name);
        let rec = self.seal_peer(name, entry);
        self.write(|tx| {
            tx.execute(
                "INSERT INTO peers (h, rec) VALUES (?1, ?2)
                 ON CONFLICT (h) DO UPDATE SET rec = excluded.rec",
                params![peer, rec],
            )?;
            tx.execute("DELETE FROM conv_current WHERE conv = ?1", [&conv])?;
            tx.execute("UPDATE conv_keys SET shared = 0 WHERE conv = ?1", [&conv])?;
            Ok(())
        })
    }

    /// Deletes key `key_id` of `conv` (and its place as current). For tests and repairs:
    /// what it sealed no longer opens here until it is recovered.
    pub fn delete_key(&mut self, conv: &str, key_id: &str) -> Result<(), StoreError> {
        let h = self.sealer.hash("conv", conv);
        self.write(|tx| {
            tx.execute(
                "DELETE FROM conv_keys WHERE conv = ?1 AND key_id = ?2",
                params![h, key_id],
            )?;
            tx.execute(
                "DELETE FROM conv_current WHERE conv = ?1 AND key_id = ?2",
                params![h, key_id],
            )?;
            Ok(())
        })
    }

    fn current_key_id(&self, h: &[u8]) -> Result<Option<String>, StoreError> {
        self.conn
            .prepare_cached("SELECT key_id FROM conv_current WHERE conv = ?1")
            .and_then(|mut s| s.query_row([h], |r| r.get(0)).optional())
            .map_err(|e| self.db_error(e))
    }

    fn open_key(&self, rec: &str, conv: &str, key_id: &str) -> Result<String, StoreError> {
        open_key(&self.sealer, rec, conv, key_id)
    }
}

fn seal_key(sealer: &Sealer, conv: &str, key: &ConversationKey) -> String {
    sealer.seal(&KeyRecord {
        conv: conv.to_string(),
        key_id: key.id.clone(),
        key: key.key.clone(),
    })
}

/// Opens a key record, checking that it belongs where it was found.
fn open_key(sealer: &Sealer, rec: &str, conv: &str, key_id: &str) -> Result<String, StoreError> {
    let rec: KeyRecord = sealer.open(rec, "conv_keys")?;
    if rec.conv != conv || rec.key_id != key_id {
        return Err(StoreError::Corrupt(
            "a key row is filed under another conversation".into(),
        ));
    }
    Ok(rec.key)
}
