//! The client's at-rest store: identity, pinned peer keys, conversation and group keys,
//! duplicate detection, the inbox of messages not opened yet, and history — an embedded
//! SQLite database (format 3), safe for several processes of one user at once.
//!
//! # Location and permissions
//!
//! `{data_dir}/{user}/store.db` (with SQLite's `-wal` and `-shm` beside it); directories
//! mode 0700, files 0600. A store of the earlier format (`{data_dir}/{user}/store`, see
//! [`legacy`]) is converted on first open with the same password and removed once the
//! new one is committed.
//!
//! # Encryption
//!
//! A random 32-byte data key seals every secret record (Fernet: AES-128-CBC +
//! HMAC-SHA-256): the private key, conversation and group keys, texts, peer and group
//! names, file names, credentials. The data key is wrapped (Fernet again) by the key
//! derived from the password with argon2id (parameters and salt in `meta.kdf`), so a
//! password change rewraps one key. Look-ups go through keyed hashes (HMAC-SHA-256
//! under a key derived from the data key), so the file shows no plaintext and no names.
//!
//! # Concurrency and durability
//!
//! WAL mode, `synchronous=FULL`, a 30 s busy timeout. Every change is its own
//! transaction (read-modify-write ones `BEGIN IMMEDIATE`), nothing is cached that
//! another process may change, so processes of one user see each other's writes at
//! once. A received batch is committed before it is acknowledged.

mod counters;
mod history;
mod kdf;
mod keys;
pub(crate) mod legacy;
mod sealed;
mod state;

pub use history::HistoryRow;
pub use keys::MakeCurrent;
pub use legacy::StoreData;
pub use state::{InboxRow, RosterFork};

use kdf::KdfHeader;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use sealed::Sealer;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How many server message ids and sender message ids are remembered (each); the oldest
/// are dropped first. (Received texts are also kept apart by their history rows, without
/// a bound.)
pub const MAX_SEEN_IDS: usize = 100_000;

/// The store format this code writes (`PRAGMA user_version`).
const FORMAT: i64 = 3;
/// First words of the `meta.kdf` line.
const KDF_MAGIC: &str = "fastchat-store v2";
/// How long a statement waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
const SCHEMA: &str = include_str!("schema.sql");

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
    /// The database refused a statement (a full disk, a damaged file, a lock held too
    /// long by another process).
    #[error("store database {}: {why}", path.display())]
    Db {
        /// The database file.
        path: PathBuf,
        why: String,
    },
    /// The user name cannot be a directory name (empty, `.`, `..`, or has `/` or NUL).
    #[error("invalid user name {0:?} for a store directory")]
    InvalidUser(String),
    /// Deriving the key from the password failed.
    #[error("key derivation failed: {0}")]
    Kdf(String),
    /// Making a salt failed (the OS random number generator).
    #[error("cannot make a salt: {0}")]
    Random(crate::e2e::E2eError),
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

/// A received message as the relay delivered it, still encrypted: the wire's
/// [`Message`](fastchat_common::proto::Message), kept sealed in the inbox as JSON.
pub type InboxEntry = fastchat_common::proto::Message;

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

impl DeliveryState {
    fn code(self) -> i64 {
        match self {
            DeliveryState::Pending => 0,
            DeliveryState::Stored => 1,
            DeliveryState::Delivered => 2,
            DeliveryState::Received => 3,
        }
    }

    fn from_code(code: i64) -> DeliveryState {
        match code {
            0 => DeliveryState::Pending,
            1 => DeliveryState::Stored,
            2 => DeliveryState::Delivered,
            _ => DeliveryState::Received,
        }
    }
}

/// The sealed `meta` record of who this store belongs to.
#[derive(Serialize, Deserialize)]
struct Owner {
    user: String,
    /// Std base64 of [`crate::e2e::Identity::to_pkcs8_der`].
    identity_der: String,
}

/// An open store: a database connection and the data key. Holds nothing else that
/// another process could change.
pub struct Store {
    path: PathBuf,
    conn: Connection,
    user: String,
    identity_der: String,
    sealer: Sealer,
    /// Random per handle: the `writer` of the history rows it adds.
    writer: i64,
    /// Rows added to the seen windows by this handle (they are pruned now and then).
    seen_added: u64,
    /// The store's sender id once read (it never changes).
    sid: std::cell::OnceCell<String>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No key, no contents: they are secret.
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Path of the store of `user` under `data_dir`: `{data_dir}/{user}/store.db`.
    pub fn path_for(data_dir: &Path, user: &str) -> PathBuf {
        data_dir.join(user).join("store.db")
    }

    /// Path of a store of the earlier format, `{data_dir}/{user}/store`.
    pub fn legacy_path_for(data_dir: &Path, user: &str) -> PathBuf {
        data_dir.join(user).join("store")
    }

    /// Whether `user` has a store (of either format) under `data_dir`.
    pub fn exists(data_dir: &Path, user: &str) -> bool {
        check_user(user).is_ok()
            && (Store::path_for(data_dir, user).is_file()
                || Store::legacy_path_for(data_dir, user).is_file())
    }

    /// Creates the store of `user` (directories 0700, files 0600) holding `identity_der`
    /// (std base64 of the PKCS#8 DER private key); [`StoreError::AlreadyExists`] if there
    /// is one.
    pub fn create(
        data_dir: &Path,
        user: &str,
        password: &str,
        identity_der: &str,
    ) -> Result<Store, StoreError> {
        let data = StoreData {
            user: user.to_string(),
            identity_der: identity_der.to_string(),
            ..StoreData::default()
        };
        Store::create_with(data_dir, user, password, &data)
    }

    /// Creates the store with everything in `data` (a converted earlier store). Built
    /// under a temporary name and linked into place, so a half-made store is never seen
    /// and two processes creating at once cannot both succeed.
    fn create_with(
        data_dir: &Path,
        user: &str,
        password: &str,
        data: &StoreData,
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
        let password_key = header.derive_key(password)?;
        let data_key = Sealer::new_data_key()?;
        let sealer = Sealer::new(&data_key)?;
        let tmp = dir.join(format!(
            "store.db.new-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let built = (|| {
            let mut store = Store::connect(&tmp, user, &data.identity_der, sealer, true)?;
            // Not linked into place yet: made durable by one fsync at the end.
            store
                .conn
                .pragma_update(None, "synchronous", "OFF")
                .map_err(|e| store.db_error(e))?;
            store.init(&header, &Sealer::wrap(&password_key, &data_key))?;
            store.import(data)?;
            // Closing checkpoints the WAL into the file and removes it.
            store
                .conn
                .pragma_update(None, "wal_checkpoint", "TRUNCATE")
                .map_err(|e| store.db_error(e))?;
            Ok::<Sealer, StoreError>(store.sealer)
        })();
        let sealer = match built {
            Ok(sealer) => sealer,
            Err(e) => {
                remove_db_files(&tmp);
                return Err(e);
            }
        };
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|source| io_error(&tmp, source))?;
        let linked = fs::hard_link(&tmp, &path);
        remove_db_files(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StoreError::AlreadyExists { path });
            }
            Err(source) => return Err(io_error(&path, source)),
        }
        sync_dir(&dir)?;
        Store::connect(&path, user, &data.identity_der, sealer, false)
    }

    /// Opens the store with the password ([`StoreError::WrongPassword`] when it does not
    /// unwrap the data key), converting a store of the earlier format first.
    pub fn open(data_dir: &Path, user: &str, password: &str) -> Result<Store, StoreError> {
        check_user(user)?;
        let path = Store::path_for(data_dir, user);
        let legacy = Store::legacy_path_for(data_dir, user);
        if !path.exists() {
            if !legacy.exists() {
                return Err(StoreError::NotFound { path });
            }
            Store::convert(data_dir, user, password, &legacy)?;
        } else if legacy.exists() {
            // A conversion committed the new store and stopped before removing the old.
            fs::remove_file(&legacy).map_err(|source| io_error(&legacy, source))?;
        }
        let mut conn = open_connection(&path, false)?;
        upgrade(&mut conn, &path)?;
        let db_error = |e: rusqlite::Error| db_error(&path, e);
        let meta = |name: &str| -> Result<String, StoreError> {
            conn.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db_error)?
            .ok_or_else(|| StoreError::Corrupt(format!("{}: no {name} in meta", path.display())))
        };
        let header = KdfHeader::parse(&meta("kdf")?, KDF_MAGIC, &path)?;
        let wrapped = meta("data_key")?;
        let owner = meta("owner")?;
        let password_key = header.derive_key(password)?;
        let data_key = Sealer::unwrap(&password_key, &wrapped).ok_or(StoreError::WrongPassword)?;
        let sealer = Sealer::new(&data_key)?;
        let owner: Owner = sealer.open(&owner, "owner")?;
        if owner.user != user {
            return Err(StoreError::Corrupt(format!(
                "{}: the store belongs to another user",
                path.display()
            )));
        }
        drop(conn);
        Store::connect(&path, user, &owner.identity_der, sealer, false)
    }

    /// Converts a store of the earlier format (same password): the new store is built
    /// and committed, then the old file removed. Another process converting at the same
    /// time is fine: one of the two new stores is linked into place, the other dropped.
    fn convert(
        data_dir: &Path,
        user: &str,
        password: &str,
        legacy: &Path,
    ) -> Result<(), StoreError> {
        let data = legacy::read(legacy, password)?;
        if data.user != user && !data.user.is_empty() {
            return Err(StoreError::Corrupt(format!(
                "{}: the store belongs to {:?}",
                legacy.display(),
                data.user
            )));
        }
        match Store::create_with(data_dir, user, password, &data) {
            Ok(_) | Err(StoreError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
        match fs::remove_file(legacy) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(io_error(legacy, source)),
        }
        if let Some(dir) = legacy.parent() {
            sync_dir(dir)?;
        }
        Ok(())
    }

    /// A handle on an existing (or, with `create`, new) database file.
    fn connect(
        path: &Path,
        user: &str,
        identity_der: &str,
        sealer: Sealer,
        create: bool,
    ) -> Result<Store, StoreError> {
        let conn = open_connection(path, create)?;
        Ok(Store {
            path: path.to_path_buf(),
            conn,
            user: user.to_string(),
            identity_der: identity_der.to_string(),
            sealer,
            writer: rand::random::<i64>(),
            seen_added: 0,
            sid: std::cell::OnceCell::new(),
        })
    }

    /// Makes the tables and the `meta` rows of a new store.
    fn init(&mut self, header: &KdfHeader, wrapped: &str) -> Result<(), StoreError> {
        let owner = self.sealer.seal(&Owner {
            user: self.user.clone(),
            identity_der: self.identity_der.clone(),
        });
        let kdf = header.to_line(KDF_MAGIC);
        self.write(|tx| {
            tx.execute_batch(SCHEMA)?;
            let mut put = tx.prepare("INSERT INTO meta (name, value) VALUES (?1, ?2)")?;
            put.execute(["kdf", &kdf])?;
            put.execute(["data_key", wrapped])?;
            put.execute(["owner", &owner])?;
            put.execute(["sid", &new_sid()])?;
            drop(put);
            tx.pragma_update(None, "user_version", FORMAT)?;
            Ok(())
        })
    }

    /// Re-wraps the data key under `new_password` (fresh salt): one row changes.
    pub fn change_password(&mut self, new_password: &str) -> Result<(), StoreError> {
        let header = KdfHeader::new_random()?;
        let password_key = header.derive_key(new_password)?;
        let wrapped = Sealer::wrap(&password_key, self.sealer.data_key());
        let kdf = header.to_line(KDF_MAGIC);
        self.write(|tx| {
            tx.execute("UPDATE meta SET value = ?1 WHERE name = 'kdf'", [&kdf])?;
            tx.execute(
                "UPDATE meta SET value = ?1 WHERE name = 'data_key'",
                [&wrapped],
            )?;
            Ok(())
        })
    }

    /// Where this store lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The user this store belongs to.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Std base64 of the PKCS#8 DER private key.
    pub fn identity_der(&self) -> &str {
        &self.identity_der
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction (the write lock is taken first, so
    /// a read-modify-write cannot interleave with another process's).
    fn write<T>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| db_error(&path, e))?;
        let value = f(&tx).map_err(|e| db_error(&path, e))?;
        tx.commit().map_err(|e| db_error(&path, e))?;
        Ok(value)
    }

    fn db_error(&self, e: rusqlite::Error) -> StoreError {
        db_error(&self.path, e)
    }

    /// The one text column of the row `sql` finds, if any (a sealed record).
    fn query_rec(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Option<String>, StoreError> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| s.query_row(params, |r| r.get(0)).optional())
            .map_err(|e| self.db_error(e))
    }

    /// The one text column of every row `sql` finds (sealed records).
    fn query_recs(&self, sql: &str) -> Result<Vec<String>, StoreError> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(|e| self.db_error(e))
    }
}

/// Opens the database file with the store's settings. `create` makes the file (0600)
/// first; otherwise a missing file is an error, never an empty store.
/// Brings a store of an earlier SQLite format up to [`FORMAT`]: format 3 adds the
/// tables of send counters, replay windows and roster evidence, and the store's random
/// sender id (`meta` `sid`). In one `BEGIN IMMEDIATE` that reads the format again, so
/// processes opening one store at once upgrade it once.
fn upgrade(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let db_error = |e: rusqlite::Error| db_error(path, e);
    let format = |c: &Connection| -> rusqlite::Result<i64> {
        c.pragma_query_value(None, "user_version", |r| r.get(0))
    };
    let found = format(conn).map_err(db_error)?;
    if found == 2 {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_error)?;
        if format(&tx).map_err(db_error)? == 2 {
            tx.execute_batch(SCHEMA).map_err(db_error)?;
            tx.execute(
                "INSERT OR IGNORE INTO meta (name, value) VALUES ('sid', ?1)",
                [new_sid()],
            )
            .map_err(db_error)?;
            tx.pragma_update(None, "user_version", FORMAT)
                .map_err(db_error)?;
        }
        tx.commit().map_err(db_error)?;
    } else if found != FORMAT {
        return Err(StoreError::Corrupt(format!(
            "{}: store format {found}, this client reads format {FORMAT}",
            path.display()
        )));
    }
    Ok(())
}

/// A store's random sender id: 16 lower-case hex characters (PROTOCOL.md §7.3).
fn new_sid() -> String {
    fastchat_common::hex::encode(&rand::random::<[u8; 8]>())
}

fn open_connection(path: &Path, create: bool) -> Result<Connection, StoreError> {
    if create {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| io_error(path, source))?;
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| db_error(path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| db_error(path, e))?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(|e| db_error(path, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Db {
            path: path.to_path_buf(),
            why: format!("cannot use WAL mode (got {mode})"),
        });
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(|e| db_error(path, e))?;
    // Secrets deleted are overwritten, not left in free pages.
    conn.pragma_update(None, "secure_delete", "ON")
        .map_err(|e| db_error(path, e))?;
    Ok(conn)
}

/// Removes a database file and its WAL and shared-memory files (best effort).
fn remove_db_files(path: &Path) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        let _ = fs::remove_file(PathBuf::from(name));
    }
}

/// A user name becomes a directory name: refuse anything that would escape `data_dir`.
fn check_user(user: &str) -> Result<(), StoreError> {
    if user.is_empty() || user == "." || user == ".." || user.contains(['/', '\0']) {
        return Err(StoreError::InvalidUser(user.to_string()));
    }
    Ok(())
}

pub(crate) fn io_error(path: &Path, source: io::Error) -> StoreError {
    StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn db_error(path: &Path, e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::NotADatabase => {
            StoreError::Corrupt(format!("{}: not a store database", path.display()))
        }
        e => StoreError::Db {
            path: path.to_path_buf(),
            why: e.to_string(),
        },
    }
}

/// fsync a directory, so a rename or link in it is durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| io_error(dir, source))
}

#[cfg(test)]
mod tests;
