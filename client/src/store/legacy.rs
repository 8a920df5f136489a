//! The store of earlier versions (format 1): one file, `{data_dir}/{user}/store`, of two
//! text lines — `fastchat-store v1 argon2id m=.. t=.. p=.. salt=..` and a Fernet token
//! (key: argon2id of the password) of the whole [`StoreData`] as JSON. Read once, to
//! convert it (see [`super::Store::open`]); never written.

use super::kdf::KdfHeader;
use super::{
    ConversationKeys, GroupState, HistoryEntry, InboxEntry, PeerEntry, ResumeCredential, StoreError,
};
use crate::e2e;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::io;
use std::path::Path;

/// First word and version of the header line.
pub(crate) const MAGIC: &str = "fastchat-store v1";

/// Everything the client keeps between runs.
#[derive(Serialize, Deserialize, Default, Debug, Clone)]
#[serde(default)]
pub struct StoreData {
    /// The user this store belongs to.
    pub user: String,
    /// Std base64 of [`e2e::Identity::to_pkcs8_der`].
    pub identity_der: String,
    /// Pinned public keys, by user name.
    pub peers: BTreeMap<String, PeerEntry>,
    /// Conversation keys, by conversation (peer name or group).
    pub conversations: BTreeMap<String, ConversationKeys>,
    /// Server message ids already stored, oldest first (bounded; see
    /// [`Store::remember_msg_id`]). Change only through the `remember_*` methods.
    pub seen_msg_ids: VecDeque<i64>,
    /// Sender message ids already shown, oldest first (bounded; see
    /// [`Store::remember_mid`]). Change only through the `remember_*` methods.
    pub seen_mids: VecDeque<String>,
    /// Conversation history, oldest first.
    pub history: Vec<HistoryEntry>,
    /// Downloads not finished yet.
    pub downloads: Vec<crate::files::PendingDownload>,
    /// The groups this user is or was in, by id.
    pub groups: BTreeMap<i64, GroupState>,
    /// The resumption credential of the last password login, per auth server.
    pub resume: BTreeMap<String, ResumeCredential>,
    /// Messages stored (and acknowledged) but not yet decrypted. Keeping the raw
    /// ciphertext first lets the client acknowledge before it decrypts, so nothing it
    /// sends back depends on a decryption.
    pub inbox: Vec<InboxEntry>,
}

/// Reads and decrypts a format-1 store; [`StoreError::WrongPassword`] when the token does
/// not verify under the password.
pub(crate) fn read(path: &Path, password: &str) -> Result<StoreData, StoreError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StoreError::NotFound {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            return Err(StoreError::Corrupt(format!(
                "{}: not a text file",
                path.display()
            )))
        }
        Err(source) => return Err(super::io_error(path, source)),
    };
    let (header_line, token) = split_lines(&text).ok_or_else(|| {
        StoreError::Corrupt(format!(
            "{}: expected exactly two lines (header, token)",
            path.display()
        ))
    })?;
    let header = KdfHeader::parse(header_line, MAGIC, path)?;
    let key = header.derive_key(password)?;
    let json = e2e::fernet_decrypt(&key, token).map_err(|_| StoreError::WrongPassword)?;
    serde_json::from_slice(&json).map_err(|e| {
        StoreError::Corrupt(format!(
            "{}: decrypted, but the contents are not valid: {e}",
            path.display()
        ))
    })
}

/// Splits "header\ntoken\n" (final newline optional); None unless exactly two lines.
fn split_lines(text: &str) -> Option<(&str, &str)> {
    let text = text.strip_suffix('\n').unwrap_or(text);
    let (header, token) = text.split_once('\n')?;
    if token.is_empty() || token.contains('\n') {
        return None;
    }
    Some((header, token))
}

impl super::Store {
    /// Everything in the store, decrypted, in the earlier format's shape (the sender
    /// message ids of the seen window are kept only as keyed hashes and are left out).
    pub fn export(&self) -> Result<StoreData, StoreError> {
        Ok(StoreData {
            user: self.user.clone(),
            identity_der: self.identity_der.clone(),
            peers: self.peers()?.into_iter().collect(),
            conversations: self.conversations()?,
            seen_msg_ids: self.seen_msg_ids()?.into(),
            seen_mids: VecDeque::new(),
            history: self.history()?,
            downloads: self.downloads()?,
            groups: self.groups()?,
            resume: self.resume_all()?,
            inbox: self.inbox()?.into_iter().map(|r| r.entry).collect(),
        })
    }

    /// Adds everything in `data` (an earlier store, converted; a bulk load): its history,
    /// seen windows and inbox in one transaction, the small tables through the ordinary
    /// calls.
    pub fn import(&mut self, data: &StoreData) -> Result<(), StoreError> {
        use super::keys::MakeCurrent;
        use crate::e2e::ConversationKey;
        for (name, entry) in &data.peers {
            self.put_peer(name, entry)?;
        }
        for (conv, keys) in &data.conversations {
            for (key_id, key) in &keys.keys {
                let key = ConversationKey {
                    id: key_id.clone(),
                    key: key.clone(),
                };
                let current = if keys.current.as_deref() == Some(key_id.as_str()) {
                    MakeCurrent::IfNewestEpoch
                } else {
                    MakeCurrent::Never
                };
                self.add_key(
                    conv,
                    &key,
                    keys.epochs.get(key_id).copied(),
                    keys.shared.contains(key_id),
                    current,
                )?;
            }
        }
        for (id, group) in &data.groups {
            self.update_group(*id, |_| group.clone())?;
        }
        for (server, credential) in &data.resume {
            self.set_resume(server, Some(credential))?;
        }
        for download in &data.downloads {
            self.add_download(download)?;
        }
        self.import_history(data)
    }

    /// History and the seen windows, in bulk. A received text's de-duplication key is
    /// set only if no other row has it (the old store could hold a duplicate).
    fn import_history(&mut self, data: &StoreData) -> Result<(), StoreError> {
        let writer = self.writer;
        let rows: Vec<_> = data
            .history
            .iter()
            .map(|h| {
                let dedup = (!h.outgoing && !h.mid.is_empty())
                    .then(|| self.sealer.hash("seen", &format!("{}/{}", h.from, h.mid)));
                let (conv, mid, rec) = self.seal_history(h);
                (conv, mid, dedup, h, rec)
            })
            .collect();
        let now = fastchat_common::time::now_ms() as i64;
        let inbox: Vec<(i64, String)> = data
            .inbox
            .iter()
            .map(|m| (m.msg_id, self.sealer.seal(m)))
            .collect();
        let seen_mids: Vec<Vec<u8>> = data
            .seen_mids
            .iter()
            .map(|m| self.sealer.hash("seen", m))
            .collect();
        self.write(|tx| {
            let mut put = tx.prepare(
                "INSERT INTO history (conv, mid, dedup, outgoing, state, file, msg_id, ts, writer, rec)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (dedup) DO NOTHING",
            )?;
            for (conv, mid, dedup, h, rec) in &rows {
                put.execute(rusqlite::params![
                    conv,
                    mid,
                    dedup,
                    h.outgoing,
                    h.state.code(),
                    h.file,
                    h.msg_id,
                    h.ts as i64,
                    writer,
                    rec
                ])?;
            }
            let mut seen =
                tx.prepare("INSERT INTO seen_msg_ids (msg_id) VALUES (?1) ON CONFLICT DO NOTHING")?;
            for id in &data.seen_msg_ids {
                seen.execute([id])?;
            }
            let mut seen = tx.prepare("INSERT INTO seen_mids (h) VALUES (?1) ON CONFLICT DO NOTHING")?;
            for h in &seen_mids {
                seen.execute([h])?;
            }
            let mut put = tx.prepare(
                "INSERT INTO inbox (msg_id, first_ms, rec) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
            )?;
            for (msg_id, rec) in &inbox {
                put.execute(rusqlite::params![msg_id, now, rec])?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn fuzz_store_file_lines(text in "(?s).{0,200}") {
            if let Some((header, token)) = split_lines(&text) {
                prop_assert!(!token.is_empty() && !token.contains('\n'));
                prop_assert_eq!(format!("{header}\n{token}"), text.strip_suffix('\n').unwrap_or(&text));
            }
        }
    }
}
