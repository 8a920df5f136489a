//! The FastChat relay as a library: the `fastchat-relay` binary is [`server`] plus flag
//! parsing, and benchmarks drive [`worker`] directly.
//!
//! Layout: [`config`] (flags), [`message`] (the types about a message that the other
//! parts share), [`holds`] (messages delivered from memory, waiting for their
//! recipients' acks), [`tickets`] (tickets pushed by the auth server), [`session`]
//! (per-client delivery state), [`control`] (the link to the auth server), [`mesh`]
//! (links to the other relays), [`server`] (the poll loop and the protocol logic on
//! it), [`worker`] (the database work: jobs, batched transactions, files, groups).

pub mod config;
pub mod control;
pub mod holds;
pub mod mesh;
pub mod message;
pub mod server;
pub mod session;
pub mod tickets;
pub mod worker;
