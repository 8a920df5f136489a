//! FastChat client library, shared by `fastchat` (terminal UI and scriptable CLI) and
//! `fastchat-load`.
//!
//! - [`e2e`]: RSA identities, signed key offers, Fernet texts, safety numbers.
//! - [`store`]: the local store, encrypted with a key derived from the password.
//! - [`pins`]: auth server keys pinned on first use.
//! - [`connect`]: the auth server and relay connections.
//! - [`chat`]: end-to-end encrypted sending and receiving on top of them.
//! - [`groups`]: group membership and group keys.
//! - [`files`]: end-to-end encrypted file transfer.
//! - [`replay`]: replay windows of the counters sealed in every payload.
//! - [`receipts`]: delivery receipts (pending → stored → delivered).
//! - [`blocks`]: blocking users (kept and enforced by the relay).
//! - [`ui`]: the terminal UI of `fastchat` (screen model, rendering, terminal, backend).
//! - [`error`]: the errors a person may see.

pub mod blocks;
pub mod chat;
pub mod connect;
pub mod e2e;
pub mod error;
pub mod files;
pub mod group_roster;
pub mod groups;
pub mod pins;
pub mod receipts;
pub mod recovery;
pub mod replay;
pub mod roster;
pub mod store;
pub mod text;
pub mod ui;
