//! Everything both ends of a FastChat socket must agree on, and the server plumbing the
//! auth server and the relays share.
//!
//! - [`frame`]: the wire unit (u32 big-endian length + JSON), decoded incrementally.
//! - [`noise`]: Noise handshakes for each kind of link, and the codec that turns socket
//!   bytes into frames and frames into socket bytes.
//! - [`proto`]: the protocol types of every link, one enum per direction.
//! - [`link`]: a blocking Noise link over `std::net::TcpStream` (clients, tests).
//! - [`conn`]: a non-blocking server connection for a mio poll loop.
//! - [`reactor`]: the poll loop both servers run on (connections, accept, read, flush).
//! - [`flags`]: the command-line flags both servers take.
//! - [`pool`]: the fixed worker pool with batching that servers feed over channels.
//! - [`limits`]: connection caps and token buckets for what strangers can cost.
//! - [`db`]: the PostgreSQL connection pool and schema migrations.
//! - [`keys`]: server static keys and the cluster secret on disk.
//! - [`credential`]: how both servers check resumption credentials.
//! - [`startup`]: keys, database and signal handling as both servers start.
//! - [`log`], [`time`], [`hex`]: small helpers without extra dependencies.

pub mod conn;
pub mod credential;
#[cfg(feature = "server")]
pub mod db;
#[cfg(feature = "server")]
pub mod flags;
pub mod frame;
pub mod hex;
pub mod keys;
pub mod limits;
pub mod link;
pub mod log;
pub mod noise;
pub mod pool;
pub mod proto;
pub mod reactor;
#[cfg(feature = "server")]
pub mod startup;
pub mod time;

/// Version stated by the first frame on every link.
pub const PROTOCOL_VERSION: u32 = 2;
