//! The client's at-rest store: identity, pinned peer keys, conversation keys, de-duplication
//! state and history, in one file encrypted with a key derived from the user's password.
//!
//! # Location and permissions
//!
//! `{data_dir}/{user}/store`; the directories are made mode 0700 and the file is written
//! mode 0600. Every save writes `{path}.tmp` (0600), fsyncs it, renames it over the store
//! and fsyncs the directory, so a crash leaves either the old or the new store.
//!
//! # File format (two text lines)
//!
//! ```text
//! fastchat-store v1 argon2id m=19456 t=2 p=1 salt=<std base64 of 16 random bytes>
//! <Fernet token of the StoreData JSON>
//! ```
//!
//! The Fernet key is the url-safe base64 of the 32-byte argon2id (v0x13) output of
//! (password, salt) with the header's parameters (`m` in KiB). New stores use the values
//! shown (argon2's OWASP baseline, ~23 ms); a header with other values within sane bounds
//! is read and kept. The key is derived once in [`Store::create`] / [`Store::open`] and kept,
//! so [`Store::save`] does not re-run argon2. A token that does not verify means a wrong
//! password (or a file altered on disk): [`StoreError::WrongPassword`].

use crate::e2e;
use argon2::{Algorithm, Argon2, Params, Version};
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use base64::Engine;
use fernet::Fernet;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// How many server message ids and sender message ids are remembered (each); the oldest
/// are dropped first.
pub const MAX_SEEN_IDS: usize = 100_000;

/// First word and version of the header line.
const MAGIC: &str = "fastchat-store v1";
/// Salt length in bytes.
const SALT_LEN: usize = 16;
/// Largest argon2 memory cost accepted from a header (1 GiB), so a damaged or hostile file
/// cannot make us allocate without bound.
const MAX_M_COST_KIB: u32 = 1 << 20;
/// Largest argon2 time and parallelism costs accepted from a header.
const MAX_T_COST: u32 = 64;
const MAX_P_COST: u32 = 16;

/// Errors of the store. Messages name the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// There is no store for this user.
    #[error("no store at {}", path.display())]
    NotFound {
        /// Where the store was looked for.
        path: PathBuf,
    },
    /// [`Store::create`] found a store already there.
    #[error("a store already exists at {}", path.display())]
    AlreadyExists {
        /// The existing store.
        path: PathBuf,
    },
    /// The password does not decrypt the store (or the file was altered).
    #[error("wrong password: the store does not decrypt with it")]
    WrongPassword,
    /// A file system operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file is not a store, or its contents are damaged.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// The user name cannot be a directory name (empty, `.`, `..`, or has `/` or NUL).
    #[error("invalid user name {0:?} for a store directory")]
    InvalidUser(String),
    /// Deriving the key from the password failed.
    #[error("key derivation failed: {0}")]
    Kdf(String),
    /// Making a salt failed (the OS random number generator).
    #[error("cannot make a salt: {0}")]
    Random(e2e::E2eError),
}

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

/// A credential that logs in again without the password (see PROTOCOL.md).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ResumeCredential {
    pub credential: String,
    /// Unix ms.
    pub expires_ms: u64,
}

/// A group as this client last heard of it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct GroupState {
    pub name: String,
    /// The group's key epoch (it grows when someone leaves or is removed).
    pub epoch: i32,
    /// This user's role: `admin`, `member` or `none` (left or removed).
    pub role: String,
    /// How many members the group had when last heard (a summary from the relay, then
    /// counted along with membership events); `None` until then. Decides whether
    /// group messages get delivery receipts (see the receipts module).
    #[serde(default)]
    pub members: Option<u32>,
}

/// A received message as the relay delivered it, still encrypted.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct InboxEntry {
    pub msg_id: i64,
    pub from: String,
    #[serde(default)]
    pub group_id: Option<i64>,
    pub group: Option<String>,
    /// A group membership event (written by the server; then `body` is empty).
    #[serde(default)]
    pub event: Option<fastchat_common::proto::GroupEvent>,
    pub body: String,
    /// When the relay stored it, unix ms.
    pub ts: u64,
}

/// A peer's pinned public key.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PeerEntry {
    /// SubjectPublicKeyInfo PEM, as first seen.
    pub pubkey_pem: String,
    /// Whether the user compared safety numbers out of band (`verify PEER`).
    pub verified: bool,
    /// The server was last seen serving a different key for this peer than the pinned
    /// one, and the user has not accepted it yet: kept here so the warning survives a
    /// restart. Cleared when the server serves the pinned key again or the new key is
    /// accepted.
    #[serde(default)]
    pub key_changed: bool,
}

/// The keys of one conversation.
#[derive(Serialize, Deserialize, Default, Debug, Clone, PartialEq, Eq)]
pub struct ConversationKeys {
    /// Id of the key to send with, if any.
    pub current: Option<String>,
    /// Every key ever offered in either direction: key id → Fernet key.
    pub keys: BTreeMap<String, String>,
    /// Key ids the peer is known to be able to get: received from them, or offered by
    /// us and durably stored by the server. A key not in here is offered again before
    /// the next text that uses it.
    #[serde(default)]
    pub shared: BTreeSet<String>,
    /// For group keys: the epoch each key was made for.
    #[serde(default)]
    pub epochs: BTreeMap<String, i32>,
}

/// One message in the history.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The other party of a pairwise conversation (for a group: the group's conversation).
    pub peer: String,
    /// The group, if this was a group message.
    pub group: Option<String>,
    /// Who wrote it.
    pub from: String,
    /// The plaintext.
    pub text: String,
    /// Sender's timestamp, unix ms.
    pub ts: u64,
    /// Server message id, once known.
    pub msg_id: Option<i64>,
    /// Sender's message id (32 hex).
    pub mid: String,
    /// Whether we sent it.
    pub outgoing: bool,
    /// Delivery progress (outgoing) or `Received` (incoming).
    pub state: DeliveryState,
    /// A file announcement (its text is only the file's name): an outgoing one left
    /// pending is not resent at login (the announcement itself is not kept; send the
    /// file again).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub file: bool,
}

/// Delivery progress of a message, as the sender's UI shows it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Sent, not yet acknowledged by the server.
    Pending,
    /// The server stored it.
    Stored,
    /// The recipient's client stored it (receipt received).
    Delivered,
    /// An incoming message.
    Received,
}

/// Key-derivation parameters and salt, as in the header line.
#[derive(Clone, Debug, PartialEq, Eq)]
struct KdfHeader {
    m_cost: u32,
    t_cost: u32,
    p_cost: u32,
    salt: [u8; SALT_LEN],
}

impl KdfHeader {
    fn new_random() -> Result<KdfHeader, StoreError> {
        Ok(KdfHeader {
            m_cost: Params::DEFAULT_M_COST,
            t_cost: Params::DEFAULT_T_COST,
            p_cost: Params::DEFAULT_P_COST,
            salt: e2e::try_os_random::<SALT_LEN>().map_err(StoreError::Random)?,
        })
    }

    fn to_line(&self) -> String {
        format!(
            "{MAGIC} argon2id m={} t={} p={} salt={}",
            self.m_cost,
            self.t_cost,
            self.p_cost,
            STANDARD.encode(self.salt)
        )
    }

    /// Parses the header line exactly; `path` is only for messages.
    fn parse(line: &str, path: &Path) -> Result<KdfHeader, StoreError> {
        let corrupt = |what: &str| {
            StoreError::Corrupt(format!("{}: bad header line ({what})", path.display()))
        };
        let rest = line
            .strip_prefix(MAGIC)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or_else(|| corrupt("not a fastchat-store v1 file"))?;
        let fields: Vec<&str> = rest.split(' ').collect();
        let [kdf, m, t, p, salt] = fields[..] else {
            return Err(corrupt("expected: argon2id m=.. t=.. p=.. salt=.."));
        };
        if kdf != "argon2id" {
            return Err(corrupt("key derivation is not argon2id"));
        }
        let number = |field: &str, name: &str, min: u32, max: u32| {
            field
                .strip_prefix(name)
                .and_then(|f| f.strip_prefix('='))
                .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|digits| digits.parse::<u32>().ok())
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| corrupt(&format!("{name} must be a number in {min}..={max}")))
        };
        let p_cost = number(p, "p", Params::MIN_P_COST, MAX_P_COST)?;
        let header = KdfHeader {
            m_cost: number(m, "m", Params::MIN_M_COST.max(8 * p_cost), MAX_M_COST_KIB)?,
            t_cost: number(t, "t", Params::MIN_T_COST, MAX_T_COST)?,
            p_cost,
            salt: salt
                .strip_prefix("salt=")
                .and_then(|b64| STANDARD.decode(b64).ok())
                .and_then(|bytes| <[u8; SALT_LEN]>::try_from(bytes).ok())
                .ok_or_else(|| corrupt("salt must be std base64 of 16 bytes"))?,
        };
        Ok(header)
    }

    /// argon2id(password, salt) → Fernet key.
    fn derive_key(&self, password: &str) -> Result<Fernet, StoreError> {
        let params = Params::new(self.m_cost, self.t_cost, self.p_cost, Some(32))
            .map_err(|e| StoreError::Kdf(e.to_string()))?;
        let mut raw = [0u8; 32];
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into(password.as_bytes(), &self.salt, &mut raw)
            .map_err(|e| StoreError::Kdf(e.to_string()))?;
        Fernet::new(&URL_SAFE.encode(raw))
            .ok_or_else(|| StoreError::Kdf("derived key is not a Fernet key".into()))
    }
}

/// Which ids are in `StoreData::seen_*`, for O(1) look-ups (the lists are up to 100 000
/// long). Rebuilt when the lists were changed behind our back (their length differs).
#[derive(Default)]
struct SeenIndex {
    msg_ids: HashSet<i64>,
    mids: HashSet<String>,
}

/// An open, decrypted store. Changes are in memory until [`Store::save`].
pub struct Store {
    path: PathBuf,
    header: KdfHeader,
    /// Derived from the password once; `Fernet` zeroes itself on drop.
    key: Fernet,
    seen: SeenIndex,
    /// The decrypted contents.
    pub data: StoreData,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No key, no contents: they are secret.
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("user", &self.data.user)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Path of the store of `user` under `data_dir`: `{data_dir}/{user}/store`.
    pub fn path_for(data_dir: &Path, user: &str) -> PathBuf {
        data_dir.join(user).join("store")
    }

    /// Whether `user` has a store under `data_dir` (false for a name that cannot have one).
    pub fn exists(data_dir: &Path, user: &str) -> bool {
        check_user(user).is_ok() && Store::path_for(data_dir, user).is_file()
    }

    /// Creates the store (directories 0700, file 0600) with a fresh salt;
    /// [`StoreError::AlreadyExists`] if there is one.
    pub fn create(
        data_dir: &Path,
        user: &str,
        password: &str,
        data: StoreData,
    ) -> Result<Store, StoreError> {
        check_user(user)?;
        let path = Store::path_for(data_dir, user);
        if path.exists() {
            return Err(StoreError::AlreadyExists { path });
        }
        let dir = data_dir.join(user);
        fastchat_common::keys::create_private_dir(&dir).map_err(|source| io_error(&dir, source))?;
        // The user directory may have existed with looser permissions.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(|source| io_error(&dir, source))?;

        let header = KdfHeader::new_random()?;
        let key = header.derive_key(password)?;
        let mut store = Store {
            path,
            header,
            key,
            seen: SeenIndex::default(),
            data,
        };
        store.normalise_seen();
        // Link rather than rename: fails if another process created the store meanwhile.
        let tmp = store.write_tmp()?;
        let linked = fs::hard_link(&tmp, &store.path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StoreError::AlreadyExists { path: store.path });
            }
            Err(source) => return Err(io_error(&store.path, source)),
        }
        sync_dir(&dir)?;
        Ok(store)
    }

    /// Opens and decrypts; [`StoreError::WrongPassword`] when the Fernet token does not
    /// verify.
    pub fn open(data_dir: &Path, user: &str, password: &str) -> Result<Store, StoreError> {
        check_user(user)?;
        let path = Store::path_for(data_dir, user);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound { path })
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(StoreError::Corrupt(format!(
                    "{}: not a text file",
                    path.display()
                )))
            }
            Err(source) => return Err(io_error(&path, source)),
        };
        let (header_line, token) = split_lines(&text).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "{}: expected exactly two lines (header, token)",
                path.display()
            ))
        })?;
        let header = KdfHeader::parse(header_line, &path)?;
        let key = header.derive_key(password)?;
        let json = e2e::fernet_decrypt(&key, token).map_err(|_| StoreError::WrongPassword)?;
        let data: StoreData = serde_json::from_slice(&json).map_err(|e| {
            StoreError::Corrupt(format!(
                "{}: decrypted, but the contents are not valid: {e}",
                path.display()
            ))
        })?;
        let mut store = Store {
            path,
            header,
            key,
            seen: SeenIndex::default(),
            data,
        };
        store.normalise_seen();
        Ok(store)
    }

    /// Atomic save: writes `{path}.tmp` with mode 0600, fsyncs it, renames it over the store,
    /// fsyncs the directory. Does not re-derive the key.
    pub fn save(&self) -> Result<(), StoreError> {
        let tmp = self.write_tmp()?;
        fs::rename(&tmp, &self.path).map_err(|source| io_error(&self.path, source))?;
        if let Some(dir) = self.path.parent() {
            sync_dir(dir)?;
        }
        Ok(())
    }

    /// Re-encrypts the store under `new_password` (fresh salt) and saves it.
    pub fn change_password(&mut self, new_password: &str) -> Result<(), StoreError> {
        let header = KdfHeader::new_random()?;
        let key = header.derive_key(new_password)?;
        self.header = header;
        self.key = key;
        self.save()
    }

    /// Where this store lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The decrypted contents.
    pub fn data(&self) -> &StoreData {
        &self.data
    }

    /// The decrypted contents, for changing (then [`Store::save`]).
    pub fn data_mut(&mut self) -> &mut StoreData {
        &mut self.data
    }

    /// Records a server message id; true if it was new. Keeps at most [`MAX_SEEN_IDS`],
    /// dropping the oldest.
    pub fn remember_msg_id(&mut self, id: i64) -> bool {
        if self.seen.msg_ids.len() != self.data.seen_msg_ids.len() {
            self.normalise_seen();
        }
        if !self.seen.msg_ids.insert(id) {
            return false;
        }
        self.data.seen_msg_ids.push_back(id);
        while self.data.seen_msg_ids.len() > MAX_SEEN_IDS {
            if let Some(old) = self.data.seen_msg_ids.pop_front() {
                self.seen.msg_ids.remove(&old);
            }
        }
        true
    }

    /// Records a sender message id; true if it was new. Keeps at most [`MAX_SEEN_IDS`],
    /// dropping the oldest.
    pub fn remember_mid(&mut self, mid: &str) -> bool {
        if self.seen.mids.len() != self.data.seen_mids.len() {
            self.normalise_seen();
        }
        if self.seen.mids.contains(mid) {
            return false;
        }
        self.seen.mids.insert(mid.to_string());
        self.data.seen_mids.push_back(mid.to_string());
        while self.data.seen_mids.len() > MAX_SEEN_IDS {
            if let Some(old) = self.data.seen_mids.pop_front() {
                self.seen.mids.remove(&old);
            }
        }
        true
    }

    /// Drops duplicates and excess (oldest) entries from the seen lists and rebuilds the
    /// index, so that index and lists have the same length again.
    fn normalise_seen(&mut self) {
        let data = &mut self.data;
        let excess = data.seen_msg_ids.len().saturating_sub(MAX_SEEN_IDS);
        data.seen_msg_ids.drain(..excess);
        let mut msg_ids = HashSet::with_capacity(data.seen_msg_ids.len());
        data.seen_msg_ids.retain(|id| msg_ids.insert(*id));

        let excess = data.seen_mids.len().saturating_sub(MAX_SEEN_IDS);
        data.seen_mids.drain(..excess);
        let mut mids = HashSet::with_capacity(data.seen_mids.len());
        data.seen_mids.retain(|mid| mids.insert(mid.clone()));

        self.seen = SeenIndex { msg_ids, mids };
    }

    /// Encrypts the data into `{path}.tmp` (fresh, mode 0600, fsynced); returns its path.
    fn write_tmp(&self) -> Result<PathBuf, StoreError> {
        let json = serde_json::to_vec(&self.data).map_err(|e| {
            StoreError::Corrupt(format!(
                "{}: cannot encode contents: {e}",
                self.path.display()
            ))
        })?;
        let contents = format!("{}\n{}\n", self.header.to_line(), self.key.encrypt(&json));

        let mut tmp_name = self.path.clone().into_os_string();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        // A leftover from a crash may have other permissions: start afresh so the mode holds.
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(io_error(&tmp, source)),
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|source| io_error(&tmp, source))?;
        file.write_all(contents.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|source| io_error(&tmp, source))?;
        Ok(tmp)
    }
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

/// A user name becomes a directory name: refuse anything that would escape `data_dir`.
fn check_user(user: &str) -> Result<(), StoreError> {
    if user.is_empty() || user == "." || user == ".." || user.contains(['/', '\0']) {
        return Err(StoreError::InvalidUser(user.to_string()));
    }
    Ok(())
}

fn io_error(path: &Path, source: io::Error) -> StoreError {
    StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// fsync a directory, so a rename or link in it is durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| io_error(dir, source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!(
                "fastchat-store-test-{}-{name}-{n}",
                std::process::id()
            ));
            let _ = fs::remove_dir_all(&dir);
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn sample_data() -> StoreData {
        let mut data = StoreData {
            user: "alice".into(),
            identity_der: STANDARD.encode(b"not really a key"),
            ..StoreData::default()
        };
        data.peers.insert(
            "bob".into(),
            PeerEntry {
                pubkey_pem: "-----BEGIN PUBLIC KEY-----\n...".into(),
                verified: true,
                key_changed: false,
            },
        );
        data.conversations.insert(
            "bob".into(),
            ConversationKeys {
                current: Some("00112233445566ff".into()),
                keys: [("00112233445566ff".to_string(), "k".to_string())].into(),
                shared: ["00112233445566ff".to_string()].into(),
                epochs: BTreeMap::new(),
            },
        );
        data.history.push(HistoryEntry {
            peer: "bob".into(),
            group: None,
            from: "alice".into(),
            text: "hi bob".into(),
            ts: 17,
            msg_id: Some(5),
            mid: "0123456789abcdef0123456789abcdef".into(),
            outgoing: true,
            state: DeliveryState::Delivered,
            file: false,
        });
        data
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn create_then_open_round_trip() {
        let tmp = TempDir::new("roundtrip");
        assert!(!Store::exists(&tmp.0, "alice"));
        let mut store = Store::create(&tmp.0, "alice", "pw", sample_data()).unwrap();
        assert!(Store::exists(&tmp.0, "alice"));
        assert_eq!(store.path(), tmp.0.join("alice").join("store"));

        let opened = Store::open(&tmp.0, "alice", "pw").unwrap();
        assert_eq!(opened.data().history, sample_data().history);
        assert_eq!(opened.data().peers, sample_data().peers);
        assert_eq!(opened.data().conversations, sample_data().conversations);
        assert_eq!(opened.data().identity_der, sample_data().identity_der);

        // Changes survive a save; the salt (header) is kept; no temp file is left.
        let header = fs::read_to_string(store.path()).unwrap();
        store.data_mut().history[0].state = DeliveryState::Received;
        assert!(store.remember_msg_id(42));
        store.save().unwrap();
        let again = Store::open(&tmp.0, "alice", "pw").unwrap();
        assert_eq!(again.data().history[0].state, DeliveryState::Received);
        assert_eq!(again.data().seen_msg_ids, [42]);
        let after = fs::read_to_string(store.path()).unwrap();
        assert_eq!(header.lines().next(), after.lines().next());
        assert!(!tmp.0.join("alice").join("store.tmp").exists());
        // Plaintext does not appear on disk.
        assert!(!after.contains("hi bob"));
    }

    #[test]
    fn header_line_has_the_documented_format() {
        let tmp = TempDir::new("header");
        let store = Store::create(&tmp.0, "alice", "pw", StoreData::default()).unwrap();
        let text = fs::read_to_string(store.path()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let salt = lines[0]
            .strip_prefix("fastchat-store v1 argon2id m=19456 t=2 p=1 salt=")
            .unwrap();
        assert_eq!(STANDARD.decode(salt).unwrap().len(), 16);
        assert!(
            lines[1].starts_with("gAAAAA"),
            "a Fernet token: {}",
            lines[1]
        );
    }

    #[test]
    fn wrong_password_is_refused() {
        let tmp = TempDir::new("wrongpw");
        Store::create(&tmp.0, "alice", "right", sample_data()).unwrap();
        let r = Store::open(&tmp.0, "alice", "wrong");
        assert!(matches!(r, Err(StoreError::WrongPassword)), "{r:?}");
    }

    #[test]
    fn change_password_re_encrypts() {
        let tmp = TempDir::new("chpw");
        let mut store = Store::create(&tmp.0, "alice", "old", sample_data()).unwrap();
        let before = fs::read_to_string(store.path()).unwrap();
        store.change_password("new").unwrap();
        let after = fs::read_to_string(store.path()).unwrap();
        assert_ne!(before.lines().next(), after.lines().next(), "fresh salt");
        assert!(matches!(
            Store::open(&tmp.0, "alice", "old"),
            Err(StoreError::WrongPassword)
        ));
        let opened = Store::open(&tmp.0, "alice", "new").unwrap();
        assert_eq!(opened.data().history, sample_data().history);
    }

    #[test]
    fn files_are_private() {
        let tmp = TempDir::new("modes");
        let store = Store::create(&tmp.0, "alice", "pw", sample_data()).unwrap();
        assert_eq!(mode(store.path()), 0o600);
        assert_eq!(mode(&tmp.0.join("alice")), 0o700);
        store.save().unwrap();
        assert_eq!(mode(store.path()), 0o600);
    }

    #[test]
    fn create_refuses_an_existing_store() {
        let tmp = TempDir::new("exists");
        Store::create(&tmp.0, "alice", "pw", sample_data()).unwrap();
        let r = Store::create(&tmp.0, "alice", "other", StoreData::default());
        assert!(matches!(r, Err(StoreError::AlreadyExists { .. })), "{r:?}");
        // The original is untouched.
        assert!(Store::open(&tmp.0, "alice", "pw").is_ok());
    }

    #[test]
    fn missing_store_is_not_found() {
        let tmp = TempDir::new("missing");
        let r = Store::open(&tmp.0, "nobody", "pw");
        assert!(matches!(r, Err(StoreError::NotFound { .. })), "{r:?}");
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("nobody"), "{msg}");
    }

    #[test]
    fn corrupt_files_are_reported_as_corrupt() {
        let tmp = TempDir::new("corrupt");
        let store = Store::create(&tmp.0, "alice", "pw", sample_data()).unwrap();
        let good = fs::read_to_string(store.path()).unwrap();
        let (header, token) = good.trim_end().split_once('\n').unwrap();
        let salt = header.rsplit_once("salt=").unwrap().1;
        let bad_files = [
            String::new(),
            "hello\n".to_string(),
            format!("{header}\n"),
            format!("{header}\n{token}\nextra\n"),
            format!("fastchat-store v2 argon2id m=19456 t=2 p=1 salt={salt}\n{token}\n"),
            format!("fastchat-store v1 scrypt m=19456 t=2 p=1 salt={salt}\n{token}\n"),
            format!("fastchat-store v1 argon2id m=19456 t=2 salt={salt}\n{token}\n"),
            format!("fastchat-store v1 argon2id m=+19456 t=2 p=1 salt={salt}\n{token}\n"),
            format!("fastchat-store v1 argon2id m=99999999999 t=2 p=1 salt={salt}\n{token}\n"),
            format!("fastchat-store v1 argon2id m=19456 t=0 p=1 salt={salt}\n{token}\n"),
            format!("fastchat-store v1 argon2id t=2 m=19456 p=1 salt={salt}\n{token}\n"),
            format!("fastchat-store v1 argon2id m=19456 t=2 p=1 salt=AAAA\n{token}\n"),
            format!("fastchat-store v1 argon2id m=19456 t=2 p=1  salt={salt}\n{token}\n"),
        ];
        for bad in bad_files {
            fs::write(store.path(), &bad).unwrap();
            let r = Store::open(&tmp.0, "alice", "pw");
            match r {
                Err(StoreError::Corrupt(msg)) => assert!(msg.contains("alice"), "{msg}"),
                other => panic!("{bad:?}: expected Corrupt, got {other:?}"),
            }
        }
        // The good file still opens (and without a final newline too).
        fs::write(store.path(), good.trim_end()).unwrap();
        assert!(Store::open(&tmp.0, "alice", "pw").is_ok());
    }

    #[test]
    fn user_names_cannot_escape_the_data_dir() {
        let tmp = TempDir::new("names");
        for user in ["", ".", "..", "../x", "a/b", "a\0b"] {
            let r = Store::create(&tmp.0, user, "pw", StoreData::default());
            assert!(
                matches!(r, Err(StoreError::InvalidUser(_))),
                "{user:?}: {r:?}"
            );
            assert!(!Store::exists(&tmp.0, user));
        }
    }

    #[test]
    fn remember_ids_deduplicates_and_is_bounded() {
        let tmp = TempDir::new("remember");
        let mut store = Store::create(&tmp.0, "alice", "pw", StoreData::default()).unwrap();
        assert!(store.remember_msg_id(1));
        assert!(!store.remember_msg_id(1));
        assert!(store.remember_mid("m1"));
        assert!(!store.remember_mid("m1"));
        assert!(store.remember_mid("m2"));

        let n = i64::try_from(MAX_SEEN_IDS).unwrap();
        for id in 2..=n + 1 {
            assert!(store.remember_msg_id(id));
        }
        assert_eq!(store.data().seen_msg_ids.len(), MAX_SEEN_IDS);
        assert_eq!(store.data().seen_msg_ids.front(), Some(&2));
        // 1 was dropped as the oldest, so it counts as new again; the newest is still known.
        assert!(!store.remember_msg_id(n + 1));
        assert!(store.remember_msg_id(1));
        assert_eq!(store.data().seen_msg_ids.len(), MAX_SEEN_IDS);

        for i in 0..MAX_SEEN_IDS {
            store.remember_mid(&format!("x{i}"));
        }
        assert_eq!(store.data().seen_mids.len(), MAX_SEEN_IDS);
        assert!(store.remember_mid("m1"), "the oldest mids were dropped");
        assert!(!store.remember_mid("x99999"));
    }

    #[test]
    fn remember_ids_survives_direct_edits_and_reopen() {
        let tmp = TempDir::new("remember-edit");
        let mut data = StoreData::default();
        data.seen_msg_ids.extend([7, 7, 8]);
        let mut store = Store::create(&tmp.0, "alice", "pw", data).unwrap();
        assert_eq!(store.data().seen_msg_ids, [7, 8], "duplicates dropped");
        store.data_mut().seen_msg_ids.push_back(9);
        assert!(!store.remember_msg_id(9), "index follows a direct push");
        assert!(store.remember_mid("a"));
        store.save().unwrap();
        let mut again = Store::open(&tmp.0, "alice", "pw").unwrap();
        assert!(!again.remember_msg_id(8));
        assert!(!again.remember_mid("a"));
        assert!(again.remember_mid("b"));
    }
}

/// Property tests of the header and file parsing (run by `scripts/fuzz.sh` with many more
/// cases; failures are saved in `client/proptest-regressions/store.txt`).
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn header() -> impl Strategy<Value = KdfHeader> {
        (
            1u32..=MAX_P_COST,
            any::<[u8; SALT_LEN]>(),
            0u32..1000,
            1u32..=MAX_T_COST,
        )
            .prop_map(|(p_cost, salt, m_extra, t_cost)| KdfHeader {
                m_cost: (8 * p_cost).max(Params::MIN_M_COST) + m_extra,
                t_cost,
                p_cost,
                salt,
            })
    }

    proptest! {
        #[test]
        fn fuzz_header_round_trip(h in header()) {
            prop_assert_eq!(KdfHeader::parse(&h.to_line(), Path::new("s")).ok(), Some(h));
        }

        #[test]
        fn fuzz_header_mutated(
            h in header(),
            at in any::<usize>(),
            c in any::<char>(),
            line in "(?s).{0,120}",
        ) {
            // Any line parses to parameters within the bounds argon2 (and our memory
            // limit) accept, or is refused as corrupt.
            let good = h.to_line();
            let n = good.chars().count();
            let altered: String = good
                .chars()
                .enumerate()
                .map(|(i, x)| if i == at % n { c } else { x })
                .collect();
            for l in [altered.as_str(), line.as_str()] {
                match KdfHeader::parse(l, Path::new("s")) {
                    Ok(p) => {
                        prop_assert!(Params::new(p.m_cost, p.t_cost, p.p_cost, Some(32)).is_ok());
                        prop_assert!(p.m_cost <= MAX_M_COST_KIB);
                        prop_assert_eq!(KdfHeader::parse(&p.to_line(), Path::new("s")).ok(), Some(p));
                    }
                    Err(e) => prop_assert!(matches!(e, StoreError::Corrupt(_)), "{e:?}"),
                }
            }
        }

        #[test]
        fn fuzz_store_file_lines(text in "(?s).{0,200}") {
            if let Some((header, token)) = split_lines(&text) {
                prop_assert!(!token.is_empty() && !token.contains('\n'));
                prop_assert_eq!(format!("{header}\n{token}"), text.strip_suffix('\n').unwrap_or(&text));
            }
        }
    }
}
