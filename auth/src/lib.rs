//! The FastChat auth server as a library: the `fastchat-auth` binary is [`server`] plus
//! flag parsing.
//!
//! Layout: [`config`] (flags), [`accounts`] (names, passwords, the worker jobs),
//! [`passwords`] (argon2id), [`ratelimit`] (failed logins), [`budgets`] (how often one
//! address may register, try passwords, connect), [`directory`] (live relays,
//! least-loaded choice), [`server`] (the reactor's handler tying them together),
//! [`cluster_stats`] (`fastchat-auth stats`).

pub mod accounts;
pub mod budgets;
pub mod cluster_stats;
pub mod config;
pub mod directory;
pub mod passwords;
pub mod ratelimit;
pub mod server;
