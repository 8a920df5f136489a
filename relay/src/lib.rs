//! The FastChat relay as a library: the `fastchat-relay` binary is [`server`] plus flag
//! parsing, and benchmarks drive [`store`] directly.
//!
//! Layout: [`config`] (flags), [`tickets`] (tickets pushed by the auth server),
//! [`session`] (per-client delivery state), [`store`] (the worker jobs and their
//! batched transactions), [`groups`] (group membership operations), [`control`] (the
//! link to the auth server), [`mesh`] (links to the other relays), [`server`] (the poll
//! loop tying them together).

pub mod config;
pub mod control;
pub mod files;
pub mod groups;
pub mod mesh;
pub mod server;
pub mod session;
pub mod store;
pub mod tickets;
