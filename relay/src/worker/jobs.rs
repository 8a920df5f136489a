//! What passes between the poll loop and the workers: jobs and their results.

use super::*;
use crate::holds::Held;
use std::net::IpAddr;

/// Work for the pool. Every job is sharded by the user it acts for.
#[derive(Debug)]
pub enum Job {
    /// Record presence, then read the first page of pending messages.
    Login {
        conn: Token,
        user_id: i64,
        page: i64,
    },
    /// Read the next page of pending messages after `after`.
    FetchPending {
        conn: Token,
        user_id: i64,
        after: i64,
        page: i64,
    },
    /// Store a message durably — or, with `hold` and a direct message whose recipient
    /// is online, answer `Done::Hold` to deliver it from memory (see `crate::holds`).
    /// `behind`: the loop holds earlier messages from the sender to this recipient, so
    /// if this one is to be stored, it goes back (`Done::AfterHeld`) to be stored after
    /// them, keeping the sender's order.
    Send {
        conn: Token,
        req: u64,
        sender_id: i64,
        sender: String,
        target: Target,
        body: String,
        hold: bool,
        behind: bool,
    },
    /// Re-read what is stored for a live session: after a mesh link went down or
    /// came back, a message another relay committed may never have been forwarded.
    CatchUp {
        conn: Token,
        user_id: i64,
        limit: i64,
    },
    /// Delete messages the recipient has stored (answered `Acked`, so the session
    /// counts it in flight until then).
    Ack {
        conn: Token,
        user_id: i64,
        msg_ids: Vec<i64>,
    },
    /// The user's last session on this relay ended.
    Logout { user_id: i64 },
    /// Check a resumption credential a client presented instead of a ticket, from the
    /// (limits') address `from`.
    Resume {
        conn: Token,
        from: IpAddr,
        user: String,
        credential: String,
    },
    /// Look up a user's public key.
    LookupKey {
        conn: Token,
        user_id: i64,
        req: u64,
        user: String,
    },
    /// A file operation.
    File {
        conn: Token,
        req: u64,
        user_id: i64,
        op: FileOp,
    },
    /// A change to, or a read of, the user's block list.
    Block {
        conn: Token,
        req: u64,
        user_id: i64,
        op: BlockOp,
    },
    /// A group operation.
    Group {
        conn: Token,
        req: u64,
        user_id: i64,
        user: String,
        op: GroupOp,
    },
}

impl Job {
    /// The worker shard: the acting user's id.
    pub fn shard(&self) -> u64 {
        match self {
            Job::Login { user_id, .. }
            | Job::FetchPending { user_id, .. }
            | Job::CatchUp { user_id, .. }
            | Job::Ack { user_id, .. }
            | Job::Logout { user_id }
            | Job::LookupKey { user_id, .. }
            | Job::File { user_id, .. }
            | Job::Block { user_id, .. }
            | Job::Group { user_id, .. } => *user_id as u64,
            Job::Send { sender_id, .. } => *sender_id as u64,
            // No id yet: any stable spread will do.
            Job::Resume { user, .. } => user
                .bytes()
                .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b.into())),
        }
    }
}

/// Results for the poll loop.
#[derive(Debug)]
pub enum Done {
    /// An `ack` of `conn` was committed (or failed: the messages are delivered again).
    Acked { conn: Token },
    /// A page of pending messages (`more`: the page was full).
    Pending {
        conn: Token,
        messages: Vec<Message>,
        more: bool,
    },
    /// A resumption credential checked: the user's id, or `None` if it is not valid.
    Resumed {
        conn: Token,
        from: IpAddr,
        user: String,
        user_id: Option<i64>,
    },
    /// What is stored for a live session (delivered again; clients drop what they have).
    CatchUp { conn: Token, messages: Vec<Message> },
    /// The login could not be recorded; the session must end.
    LoginFailed { conn: Token },
    /// A resumption credential could not be checked (the store failed); the attempt
    /// from `from` is not the client's failure.
    ResumeFailed { conn: Token, from: IpAddr },
    /// The message is durable (`msg_id`: its id, or for a group message the first
    /// member's copy); deliver it.
    Sent {
        conn: Token,
        req: u64,
        msg_id: i64,
        ts: u64,
        deliveries: Vec<Delivery>,
        /// Group members it was not stored for (their mailboxes are full), by name.
        full: Vec<String>,
    },
    /// A direct message for a recipient who is online, not stored: deliver it from
    /// memory and answer its sender once the recipient acknowledges it, or store it
    /// when the delivery window ends (`crate::holds`). `remote_relays`: the other
    /// relays where the recipient has sessions.
    Hold {
        held: Held,
        remote_relays: Vec<String>,
    },
    /// A direct message to store that was sent `behind` messages the loop holds for
    /// the same recipient: nothing was written; the loop stores those, then this.
    AfterHeld { held: Held },
    /// A request was refused or failed; nothing was stored.
    Failed { conn: Token, req: u64, why: Refusal },
    Key {
        conn: Token,
        req: u64,
        user: String,
        pubkey: Option<String>,
    },
    /// Frames answering a request (file operations).
    Frames {
        conn: Token,
        frames: Vec<RelayToClient>,
    },
    /// A group operation's reply and the events it wrote.
    Group {
        conn: Token,
        reply: RelayToClient,
        deliveries: Vec<Delivery>,
    },
}
