//! Protocol types of every link: one enum per direction, tagged by `"t"` in JSON.
//!
//! Requests carry a client-chosen `id` that the reply echoes. The first frame on every
//! link is `hello {version}` from each side. PROTOCOL.md at the repository root is the
//! reference for other implementations; keep the two in step.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Message ids from here up are delivery ids: a direct message a relay delivered from
/// memory (PROTOCOL.md §3, "What `sent` means"). Stored messages have ids below.
pub const DELIVERY_IDS: i64 = 1 << 62;

/// Whether `msg_id` names a message delivered from memory rather than a stored one.
pub fn is_delivery_id(msg_id: i64) -> bool {
    msg_id >= DELIVERY_IDS
}

/// Plaintext bytes per file chunk: a file of `size` bytes is exactly
/// `ceil(size / FILE_CHUNK_BYTES)` chunks (PROTOCOL.md §3, §7.6).
pub const FILE_CHUNK_BYTES: u64 = 32_768;

/// The longest `data` of a `file_put`: the Fernet token of a whole chunk (24 bytes of
/// nonce, index and count, then 32,768 of data: 32,800 bytes of AES-CBC, 57 of
/// version, time, IV and HMAC, in padded base64url).
pub const MAX_CHUNK_TOKEN: usize = 43_812;

/// Whether `name` is a valid user name: 1–32 of `[a-z0-9_.-]`.
pub fn valid_user_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

/// Machine-readable reason carried by every `error` frame.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame was not valid UTF-8 JSON.
    BadJson,
    /// The `"t"` tag names no frame of this link.
    UnknownTag,
    /// Known tag, but fields are missing or of the wrong type.
    BadFrame,
    /// A frame longer than the link's limit.
    FrameTooLong,
    /// The frame is not allowed in the connection's current state.
    BadState,
    /// The peer speaks an unsupported protocol version.
    BadVersion,
    /// A user name outside 1–32 of `[a-z0-9_.-]`.
    InvalidName,
    /// A password shorter than 8 characters.
    WeakPassword,
    /// Registration of a name that exists.
    NameTaken,
    /// Unknown user or wrong password (deliberately not told apart).
    BadCredentials,
    /// Too many failed logins; `retry_after_ms` says when to try again.
    RateLimited,
    /// No relay is available to take the client.
    NoRelay,
    /// A ticket that is unknown, used, expired or bound to another user.
    BadTicket,
    /// The named recipient does not exist.
    UnknownUser,
    /// A message body over the limit.
    TooLarge,
    /// The store could not commit; nothing was acknowledged. Retry.
    StoreFailed,
    /// A public key that is not a valid RSA public key in PEM.
    BadKey,
    /// The sender is not a member of the group (or it does not exist).
    NotMember,
    /// Only admins may do that.
    NotAdmin,
    /// The user is in the group already.
    AlreadyMember,
    /// The group has reached its maximum size.
    GroupFull,
    /// The recipient has too many messages waiting; nothing was stored.
    MailboxFull,
    /// A roster statement that does not follow the chain's head (another was appended
    /// first): fetch the chain and sign again.
    StaleHead,
    /// The recipient blocked the sender: nothing was stored.
    Blocked,
    /// The sender has as much waiting in the store (messages not yet fetched, files
    /// kept) as a user may: nothing was stored.
    OverQuota,
    /// Anything else on the server side.
    Internal,
}

impl ErrorCode {
    /// Whether the same request may succeed if retried later.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::RateLimited
                | ErrorCode::NoRelay
                | ErrorCode::StoreFailed
                | ErrorCode::Internal
        )
    }
}

/// The body of every `error` frame.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// The `id` of the request that failed, if the error answers one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub code: ErrorCode,
    /// A sentence for people.
    pub message: String,
    /// For `rate_limited`: milliseconds until a retry may succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl ErrorFrame {
    /// An error answering request `id` (or none).
    pub fn new(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> ErrorFrame {
        ErrorFrame {
            id,
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// A `rate_limited` error answering request `id` (or none), telling the client to
    /// wait `retry_after_ms` (at most an hour) before trying again.
    pub fn rate_limited(
        id: Option<u64>,
        message: impl Into<String>,
        retry_after_ms: u64,
    ) -> ErrorFrame {
        ErrorFrame {
            retry_after_ms: Some(retry_after_ms.min(3_600_000)),
            ..ErrorFrame::new(id, ErrorCode::RateLimited, message)
        }
    }
}

/// Why a server refused a request: the `code` and `message` of the `error` frame that
/// answers it. One shape for every refusal in the servers (checks before a job, a
/// worker's answer, a group or file operation), whatever step refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }

    /// The `error` frame answering request `id` (`None`: the connection's).
    pub fn into_frame(self, id: Option<u64>) -> ErrorFrame {
        ErrorFrame::new(id, self.code, self.message)
    }
}

/// Client → auth server (Noise `NX`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ClientToAuth {
    /// First frame. Reply: `hello`.
    Hello { version: u32 },
    /// Create an account. Reply: `registered` or `error`.
    Register {
        id: u64,
        user: String,
        password: String,
        /// The user's RSA public key, SubjectPublicKeyInfo PEM.
        pubkey: String,
    },
    /// Log in. Reply: `redirect` (with a resumption credential) or `error`.
    Login {
        id: u64,
        user: String,
        password: String,
    },
    /// Log in again with the resumption credential of an earlier login instead of the
    /// password (no argon2 on the server). Reply: `redirect` or `error`.
    Resume {
        id: u64,
        user: String,
        credential: String,
    },
    /// Revoke a resumption credential. Reply: `logged_out`.
    Logout {
        id: u64,
        user: String,
        credential: String,
    },
    /// Change the password; revokes every resumption credential of the user.
    /// Reply: `password_changed` or `error`.
    ChangePassword {
        id: u64,
        user: String,
        old_password: String,
        new_password: String,
    },
}

/// Auth server → client.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum AuthToClient {
    Hello {
        version: u32,
    },
    /// The account exists now; log in to chat.
    Registered {
        id: u64,
        user: String,
    },
    /// Go to this relay with this single-use ticket (valid 30 s, for `user` only).
    Redirect {
        id: u64,
        user: String,
        relay_addr: String,
        /// The relay's static Noise key, hex; the client's `NK` handshake uses it.
        relay_key: String,
        /// 128-bit random ticket, hex.
        ticket: String,
        /// After a password login: a new resumption credential (256-bit random, hex)
        /// for later `resume` requests, and when it expires (Unix ms).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        credential: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        credential_expires_ms: Option<u64>,
        /// Every relay in rotation (this one included), where a client holding a
        /// resumption credential may `resume` directly after losing its relay.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        relays: Vec<RelayAddr>,
    },
    /// The credential is revoked.
    LoggedOut {
        id: u64,
    },
    /// The password is changed and every resumption credential revoked.
    PasswordChanged {
        id: u64,
    },
    Error(ErrorFrame),
}

/// Relay → auth server, on the relay's control link (Noise `NNpsk0`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum RelayToAuth {
    Hello {
        version: u32,
    },
    /// Announces the relay; it enters rotation. Reply: `relay_welcome`, then `peers`.
    RelayUp {
        relay_id: String,
        /// Where clients reach the relay.
        client_addr: String,
        /// The relay's static Noise key, hex.
        static_key: String,
        /// Where other relays (and `stats` requests) reach the relay's mesh port.
        mesh_addr: String,
        clients: u32,
        /// Where operator tools reach the relay's stats port (read-only, with the stats
        /// secret); absent when it has none (and from older relays).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stats_addr: Option<String>,
    },
    /// Instead of `relay_up`, from an operator tool: reply `stats`.
    StatsRequest {
        id: u64,
    },
    /// The relay's current number of logged-in clients.
    Load {
        clients: u32,
    },
    /// The relay holds the ticket now; the auth server may redirect the client.
    TicketAccepted {
        ticket: String,
    },
}

/// Auth server → relay.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum AuthToRelay {
    Hello {
        version: u32,
    },
    /// The relay is in rotation.
    RelayWelcome {},
    /// Hold this ticket for `user` for `ttl_ms`. Reply: `ticket_accepted`.
    Ticket {
        ticket: String,
        user: String,
        user_id: i64,
        ttl_ms: u64,
    },
    /// Every relay in rotation (the receiver included), sent after `relay_welcome`
    /// and again whenever the set changes.
    Peers {
        relays: Vec<PeerRelay>,
    },
    /// The auth server's figures (reply to `stats_request`).
    Stats {
        id: u64,
        stats: serde_json::Value,
    },
    Error(ErrorFrame),
}

/// A relay as the directory lists it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PeerRelay {
    pub relay_id: String,
    pub mesh_addr: String,
}

/// Relay ↔ relay, on mesh links (Noise `NNpsk0`), both directions. The relay whose id
/// sorts first opens the link. Operator tools use the same port for `stats_request`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum MeshFrame {
    Hello {
        version: u32,
    },
    /// Who opened the link.
    MeshHello {
        relay_id: String,
    },
    /// A message stored for `recipient_id`, who has a session on the receiving relay:
    /// push it there now. (It stays stored until the recipient acknowledges it.)
    Deliver {
        recipient_id: i64,
        #[serde(flatten)]
        message: Message,
    },
    /// The recipient's client stored these messages delivered from memory (delivery
    /// ids the receiving relay was sent in `deliver` frames by the relay it answers):
    /// that relay may now answer their senders `sent`.
    Acked {
        recipient_id: i64,
        msg_ids: Vec<i64>,
    },
    /// Reply: `stats`.
    StatsRequest {
        id: u64,
    },
    Stats {
        id: u64,
        stats: serde_json::Value,
    },
    Error(ErrorFrame),
}

/// A stored message as the relay hands it on: to its recipient (`msg`), to the relay
/// where the recipient has a session (`deliver`), and as a worker reads it from its
/// row. One type, so a message is never copied field by field between them.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub msg_id: i64,
    pub from: String,
    /// For a group message or event: the group's id and name.
    #[serde(default)]
    pub group_id: Option<i64>,
    #[serde(default)]
    pub group: Option<String>,
    /// The ciphertext (empty for a group event).
    pub body: String,
    /// Milliseconds since the Unix epoch, when the relay stored it.
    pub ts: u64,
    /// A membership change, written by the server (not encrypted: the server knows who
    /// is in a group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<GroupEvent>,
}

/// Where clients reach a relay, and its static Noise key (hex).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RelayAddr {
    pub relay_addr: String,
    pub relay_key: String,
}

/// Client → relay (Noise `NK`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ClientToRelay {
    /// First frame. Reply: `hello`.
    Hello { version: u32 },
    /// Present the ticket from the auth server. Reply: `welcome`, then pending `msg`s
    /// oldest first and `synced` once the backlog is delivered (if `receive`).
    Auth {
        user: String,
        ticket: String,
        /// `false` for a send-only session: nothing is delivered to it.
        #[serde(default = "yes")]
        receive: bool,
    },
    /// Instead of `auth`: log in with a resumption credential from the auth server
    /// (one handshake, no auth server: how a client fails over). Replies as `auth`;
    /// an unknown, expired or revoked credential gets `bad_credentials`.
    Resume {
        user: String,
        credential: String,
        #[serde(default = "yes")]
        receive: bool,
    },
    /// Store and route an opaque ciphertext to a user (`to`) or to every other member
    /// of a group (`group_id`). Reply: `sent` once durable, or `error`.
    Send {
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group_id: Option<i64>,
        body: String,
    },
    /// Create a group with the sender as its admin. Reply: `group`.
    GroupCreate { id: u64, name: String },
    /// Add a user to a group (admins only): outright if the two share a group, else
    /// as an invitation the user accepts or declines. Reply: `group` (`invited`).
    GroupAdd {
        id: u64,
        group_id: i64,
        user: String,
    },
    /// Remove a member (admins only). Reply: `group`.
    GroupRemove {
        id: u64,
        group_id: i64,
        user: String,
    },
    /// Make a member an admin (admins only). Reply: `group`.
    GroupPromote {
        id: u64,
        group_id: i64,
        user: String,
    },
    /// Leave a group. Reply: `group`.
    GroupLeave { id: u64, group_id: i64 },
    /// Accept an invitation to a group: become a member. Reply: `group`.
    GroupAccept { id: u64, group_id: i64 },
    /// Decline an invitation to a group. Reply: `group` (role `none`).
    GroupDecline { id: u64, group_id: i64 },
    /// The sender's groups. Reply: `groups`.
    GroupList { id: u64 },
    /// Appends a signed roster statement (opaque to the relay; PROTOCOL.md §7.9) as
    /// number `seq` of the group's chain, after the statement whose hash is `prev`
    /// (members only). Reply: `roster_ok`, or `error` `stale_head` when `seq` and
    /// `prev` are not the chain's head.
    RosterAppend {
        id: u64,
        group_id: i64,
        seq: i32,
        prev: String,
        hash: String,
        statement: String,
    },
    /// The group's roster statements from number `from_seq` on, oldest first, as many
    /// as fit 48 KiB (at least one; none past the end): ask again from where a reply
    /// ended (members only). Reply: `roster`.
    RosterGet {
        id: u64,
        group_id: i64,
        from_seq: i32,
    },
    /// A group's members and roles (members only). Reply: `members`.
    GroupMembers { id: u64, group_id: i64 },
    /// Start an upload of `chunks` encrypted chunks for a user or a group's other
    /// members. Reply: `file_ready`, or `error` (`too_large`, `rate_limited`, ...).
    FileBegin {
        id: u64,
        size: u64,
        chunks: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group_id: Option<i64>,
    },
    /// One encrypted chunk (a Fernet token). Reply: `file_put_ok` once durable.
    FilePut {
        id: u64,
        file_id: i64,
        index: u32,
        data: String,
    },
    /// How many chunks of an upload are stored (they are always the first ones).
    /// Reply: `file_status`.
    FileStatus { id: u64, file_id: i64 },
    /// Up to `count` chunks from `from` on (recipients and the uploader). Reply:
    /// `file_chunk` frames, then `file_end`.
    FileGet {
        id: u64,
        file_id: i64,
        from: u32,
        count: u32,
    },
    /// The client has the file (or rejected it); the relay deletes it once every
    /// recipient is done.
    FileDone { file_id: i64 },
    /// The client has stored these messages; the relay deletes them.
    Ack { msg_ids: Vec<i64> },
    /// Look up a user's public key. Reply: `key` or `error`.
    Key { id: u64, user: String },
    /// Refuse direct messages, files and group additions from `user`, and stop
    /// receiving their group messages. Reply: `blocked` (the whole list).
    Block { id: u64, user: String },
    /// Undo `block`. Reply: `blocked`.
    Unblock { id: u64, user: String },
    /// The users this user blocked. Reply: `blocked`.
    BlockList { id: u64 },
    /// Reply: `pong`.
    Ping { id: u64 },
}

fn yes() -> bool {
    true
}

/// Relay → client.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum RelayToClient {
    Hello {
        version: u32,
    },
    /// The ticket was accepted: the session acts as `user`.
    Welcome {
        user: String,
        user_id: i64,
    },
    /// The message `id` is durably stored as `msg_id`.
    Sent {
        id: u64,
        msg_id: i64,
        ts: u64,
        /// A group send: members it was not stored for, their mailboxes being full
        /// (omitted when empty).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        full: Vec<String>,
    },
    /// A message for this user. Acknowledge with `ack` once stored.
    Msg(Message),
    /// An upload may start.
    FileReady {
        id: u64,
        file_id: i64,
    },
    /// A chunk is stored.
    FilePutOk {
        id: u64,
        file_id: i64,
        index: u32,
    },
    /// The first `stored` chunks of the file are stored.
    FileStatus {
        id: u64,
        file_id: i64,
        stored: u32,
    },
    /// A chunk of a download.
    FileChunk {
        id: u64,
        file_id: i64,
        index: u32,
        data: String,
    },
    /// The end of the chunks answering `file_get` `id` (`sent` of them).
    FileEnd {
        id: u64,
        file_id: i64,
        sent: u32,
    },
    /// A group after a change (or as created). `invited`: the `group_add` made an
    /// invitation rather than a member.
    Group {
        id: u64,
        group: GroupSummary,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        invited: bool,
    },
    /// The sender's groups.
    Groups {
        id: u64,
        groups: Vec<GroupSummary>,
    },
    /// A roster statement was appended as number `seq`.
    RosterOk {
        id: u64,
        group_id: i64,
        seq: i32,
    },
    /// Roster statements, oldest first.
    Roster {
        id: u64,
        group_id: i64,
        statements: Vec<String>,
    },
    /// A group's members.
    Members {
        id: u64,
        group: GroupSummary,
        members: Vec<GroupMember>,
    },
    /// Everything that was pending at login has been delivered.
    Synced {},
    Key {
        id: u64,
        user: String,
        pubkey: String,
    },
    /// The users this user blocked, by name.
    Blocked {
        id: u64,
        users: Vec<String>,
    },
    Pong {
        id: u64,
    },
    Error(ErrorFrame),
}

/// A group as its members see it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct GroupSummary {
    pub group_id: i64,
    pub name: String,
    /// The asking user's role: `admin` or `member` (`none` after leaving or removal;
    /// `invited` while an invitation waits for them).
    pub role: String,
    pub members: u32,
    /// The key epoch: bumped whenever someone leaves or is removed, so the remaining
    /// members' clients rotate the group key.
    pub epoch: i32,
}

/// A member and their role.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    pub user: String,
    pub role: String,
}

/// What happened in a group: `created`, `added`, `removed`, `promoted` or `left`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct GroupEvent {
    pub event: String,
    /// Who was created-with, added, removed, promoted, or who left.
    pub user: String,
    /// Who did it (for an automatic promotion when the last admin left: the leaver).
    pub by: String,
    /// The group's key epoch after the change.
    pub epoch: i32,
}

/// Whether `name` is an acceptable group name: 1–64 characters, no control characters.
pub fn valid_group_name(name: &str) -> bool {
    let chars = name.chars().count();
    (1..=64).contains(&chars) && !name.chars().any(char::is_control) && name.trim() == name
}

/// Why a frame's JSON could not be read as a protocol type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub code: ErrorCode,
    pub message: String,
}

/// Parses one frame's JSON as `T`, classifying failures into `bad_json`, `unknown_tag`
/// and `bad_frame`.
pub fn parse<T: DeserializeOwned>(json: &[u8]) -> Result<T, ParseError> {
    serde_json::from_slice(json).map_err(|e| {
        use serde_json::error::Category;
        // serde may stop at a type mismatch before it reaches broken syntax, so a Data
        // error is only a frame error if the bytes are valid JSON at all: read as a
        // `Value`, which checks every string's UTF-8 and every number's range (an
        // `IgnoredAny` skips both). Only failing frames pay for it, once: they close
        // the connection.
        let well_formed = || serde_json::from_slice::<serde_json::Value>(json).is_ok();
        let code = match e.classify() {
            Category::Data if !well_formed() => ErrorCode::BadJson,
            Category::Data if e.to_string().starts_with("unknown variant") => ErrorCode::UnknownTag,
            Category::Data => ErrorCode::BadFrame,
            _ => ErrorCode::BadJson,
        };
        ParseError {
            code,
            message: e.to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_look_as_documented() {
        let f = ClientToRelay::Send {
            id: 7,
            to: Some("bob".into()),
            group_id: None,
            body: "x".into(),
        };
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            r#"{"t":"send","id":7,"to":"bob","body":"x"}"#
        );
        let e = RelayToClient::Error(ErrorFrame::new(Some(3), ErrorCode::UnknownUser, "no"));
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"t":"error","id":3,"code":"unknown_user","message":"no"}"#
        );
        assert_eq!(
            serde_json::to_string(&RelayToClient::Synced {}).unwrap(),
            r#"{"t":"synced"}"#
        );
        let auth: ClientToRelay = parse(br#"{"t":"auth","user":"a","ticket":"b"}"#).unwrap();
        assert_eq!(
            auth,
            ClientToRelay::Auth {
                user: "a".into(),
                ticket: "b".into(),
                receive: true
            }
        );
    }

    #[test]
    fn user_names() {
        assert!(valid_user_name("alice"));
        assert!(valid_user_name("a.b-c_9"));
        assert!(valid_user_name(&"a".repeat(32)));
        assert!(!valid_user_name(""));
        assert!(!valid_user_name(&"a".repeat(33)));
        assert!(!valid_user_name("Alice"));
        assert!(!valid_user_name("al ice"));
        assert!(!valid_user_name("ålice"));
    }

    #[test]
    fn classifies_parse_failures() {
        assert_eq!(
            parse::<ClientToRelay>(b"{nope").unwrap_err().code,
            ErrorCode::BadJson
        );
        assert_eq!(
            parse::<ClientToRelay>(b"\xff\xfe").unwrap_err().code,
            ErrorCode::BadJson
        );
        assert_eq!(
            parse::<ClientToRelay>(br#"{"t":"launch"}"#)
                .unwrap_err()
                .code,
            ErrorCode::UnknownTag
        );
        assert_eq!(
            parse::<ClientToRelay>(br#"{"t":"send","id":"x"}"#)
                .unwrap_err()
                .code,
            ErrorCode::BadFrame
        );
        assert_eq!(
            parse::<ClientToRelay>(br#"[1,2]"#).unwrap_err().code,
            ErrorCode::BadFrame
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse::<ClientToRelay>(&bytes);
            let _ = parse::<ClientToAuth>(&bytes);
            let _ = parse::<RelayToAuth>(&bytes);
            let _ = parse::<AuthToRelay>(&bytes);
            let _ = parse::<MeshFrame>(&bytes);
        }

        #[test]
        fn arbitrary_json_objects_never_panic(
            tag in "[a-z_]{0,12}",
            id in any::<i64>(),
            s in ".{0,40}",
        ) {
            for json in [
                format!(r#"{{"t":"{tag}","id":{id},"user":{s:?},"to":{s:?},"body":{s:?}}}"#),
                format!(r#"{{"t":"{tag}","msg_ids":[{id}],"ticket":{s:?}}}"#),
            ] {
                let _ = parse::<ClientToRelay>(json.as_bytes());
                let _ = parse::<ClientToAuth>(json.as_bytes());
            }
        }
    }
}
