//! What the relay's parts pass one another about a message: the message itself (the
//! wire's [`Message`], as a worker reads it from its row and as it goes to a client or
//! another relay), who it is for ([`Target`]), and where its recipient is
//! ([`Delivery`]). Here, not in the worker or the server, so that sessions, files,
//! groups and the worker depend on it and not on one another.

pub use fastchat_common::proto::Message;

/// Who a message (or a file) is for.
#[derive(Debug, Clone)]
pub enum Target {
    User(String),
    Group(i64),
}

/// A stored message and where its recipient has sessions.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub recipient_id: i64,
    pub message: Message,
    /// Relays other than this one where the recipient has sessions.
    pub remote_relays: Vec<String>,
}
