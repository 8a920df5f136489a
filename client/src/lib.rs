//! FastChat client library: the end-to-end crypto, the local encrypted store, and the
//! session that talks to the auth server and a relay. Shared by `fastchat` and
//! `fastchat-load`.

pub mod e2e;
pub mod store;
