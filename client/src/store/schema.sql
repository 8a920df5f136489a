-- The client's local store, format 2 (see store/mod.rs and README.md).
--
-- Every secret is a Fernet token under the store's data key (`rec` columns); names are
-- looked up through keyed hashes (HMAC-SHA-256 under a key derived from the data key),
-- so the file holds no plaintext text, key or peer name. What stays in the clear is
-- what the relay sees anyway: server message ids, key ids, group ids and epochs, times,
-- and delivery states.

CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Pinned public keys: h = hash('peer', name); rec = {name, pubkey_pem, verified, key_changed}.
CREATE TABLE IF NOT EXISTS peers (
    h   BLOB PRIMARY KEY,
    rec TEXT NOT NULL
);

-- Conversation and group keys: conv = hash('conv', peer or '#<group id>'); rec = the
-- sealed {conv, key_id, key}. `shared`: the peer is known to hold it.
CREATE TABLE IF NOT EXISTS conv_keys (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    conv   BLOB NOT NULL,
    key_id TEXT NOT NULL,
    epoch  INTEGER,
    shared INTEGER NOT NULL DEFAULT 0,
    rec    TEXT NOT NULL,
    UNIQUE (conv, key_id)
);

-- The key a conversation sends with.
CREATE TABLE IF NOT EXISTS conv_current (
    conv   BLOB PRIMARY KEY,
    key_id TEXT NOT NULL
);

-- History, oldest first. dedup = hash('seen', from/mid) of a received text (NULL
-- otherwise): a text is shown once however often it arrives. mid = hash('mid', mid).
-- writer: the process (store handle) that wrote the row, so a UI can tell what other
-- processes of this user added.
CREATE TABLE IF NOT EXISTS history (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    conv     BLOB NOT NULL,
    mid      BLOB NOT NULL,
    dedup    BLOB UNIQUE,
    outgoing INTEGER NOT NULL,
    state    INTEGER NOT NULL,
    file     INTEGER NOT NULL,
    msg_id   INTEGER,
    ts       INTEGER NOT NULL,
    writer   INTEGER NOT NULL,
    rec      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS history_conv ON history (conv, id);
CREATE INDEX IF NOT EXISTS history_mid ON history (mid);
CREATE INDEX IF NOT EXISTS history_pending ON history (id) WHERE outgoing = 1 AND state = 0;

-- Duplicate detection windows (the newest MAX_SEEN_IDS of each).
CREATE TABLE IF NOT EXISTS seen_msg_ids (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id INTEGER NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS seen_mids (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    h   BLOB NOT NULL UNIQUE
);
-- Keyed hashes of (sender, group, body) of messages received: one message that arrives
-- under two server ids (delivered from memory, then stored; or sent again after a
-- failover, the same ciphertext) goes into the inbox once, even if it never opens.
CREATE TABLE IF NOT EXISTS seen_bodies (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    h   BLOB NOT NULL UNIQUE
);

-- Messages stored (and acknowledged) but not opened yet, in arrival order; `held` ones
-- wait for a key (need_group, need_key: what they wait for) and are being recovered.
CREATE TABLE IF NOT EXISTS inbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id     INTEGER NOT NULL UNIQUE,
    held       INTEGER NOT NULL DEFAULT 0,
    need_group INTEGER,
    need_key   TEXT,
    tries      INTEGER NOT NULL DEFAULT 0,
    next_try   INTEGER NOT NULL DEFAULT 0,
    first_ms   INTEGER NOT NULL,
    rec        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS inbox_need ON inbox (need_group, need_key) WHERE held = 1;

CREATE TABLE IF NOT EXISTS downloads (
    file_id INTEGER PRIMARY KEY,
    rec     TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS groups (
    group_id INTEGER PRIMARY KEY,
    rec      TEXT NOT NULL
);

-- Resumption credentials: server = hash('server', HOST:PORT).
CREATE TABLE IF NOT EXISTS resume (
    server BLOB PRIMARY KEY,
    rec    TEXT NOT NULL
);

-- Verified group rosters (PROTOCOL.md §7.9): rec = the sealed (group id, roster).
CREATE TABLE IF NOT EXISTS rosters (
    group_id INTEGER PRIMARY KEY,
    rec      TEXT NOT NULL
);

-- Format 3 --------------------------------------------------------------------------

-- The last counter used to send in a conversation (PROTOCOL.md §7.3): conv =
-- hash('conv', peer or '#<group id>'). The store's sender id is `meta` `sid`.
CREATE TABLE IF NOT EXISTS send_counters (
    conv BLOB PRIMARY KEY,
    n    INTEGER NOT NULL
);

-- Replay windows (see replay.rs): h = hash('replay', sender NUL conversation NUL the
-- sender's store id `sid`); high = the highest counter acted on, bits = which of the
-- 1,024 below it were.
CREATE TABLE IF NOT EXISTS replay (
    h    BLOB PRIMARY KEY,
    high INTEGER NOT NULL,
    bits BLOB NOT NULL
);

-- Proof of a misbehaving server (PROTOCOL.md §7.9): two signed roster statements of one
-- group at one place of its chain, both naming the same previous statement. rec = the
-- sealed {group_id, seq, ours, theirs, seen_ms}.
CREATE TABLE IF NOT EXISTS roster_forks (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    group_id INTEGER NOT NULL,
    rec      TEXT NOT NULL
);
