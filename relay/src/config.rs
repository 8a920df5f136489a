//! Command-line flags of `fastchat-relay`; each has an environment variable twin.

use clap::Parser;
use std::path::PathBuf;

/// A FastChat relay: client sessions, routing, the offline store.
#[derive(Parser, Debug, Clone)]
#[command(name = "fastchat-relay", version)]
pub struct Config {
    /// Flags both servers take.
    #[command(flatten)]
    pub common: fastchat_common::flags::ServerFlags,
    /// This relay's name, unique in the cluster (recorded in presence rows).
    #[arg(long, env = "FASTCHAT_RELAY_ID", default_value = "relay-1")]
    pub id: String,
    /// Address clients connect to (Noise NK).
    #[arg(long, env = "FASTCHAT_RELAY_LISTEN", default_value = "127.0.0.1:7410")]
    pub listen: String,
    /// Address the auth server hands to clients; defaults to the bound listen address.
    #[arg(long, env = "FASTCHAT_RELAY_PUBLIC_ADDR")]
    pub public_addr: Option<String>,
    /// Address other relays (and `stats` requests) connect to (Noise NNpsk0).
    #[arg(
        long,
        env = "FASTCHAT_RELAY_MESH_LISTEN",
        default_value = "127.0.0.1:0"
    )]
    pub mesh_listen: String,
    /// Mesh address announced to the other relays; defaults to the bound mesh address.
    #[arg(long, env = "FASTCHAT_RELAY_MESH_PUBLIC_ADDR")]
    pub mesh_public_addr: Option<String>,
    /// The auth server's address for relay control links.
    #[arg(
        long,
        env = "FASTCHAT_AUTH_RELAY_ADDR",
        default_value = "127.0.0.1:7401"
    )]
    pub auth: String,
    /// The relay's static Noise key pair; created (mode 0600) if missing.
    #[arg(
        long,
        env = "FASTCHAT_RELAY_KEY",
        default_value = ".fastchat/keys/relay-1.key"
    )]
    pub key_file: PathBuf,
    /// Database worker threads (each commits its own batches).
    #[arg(long, env = "FASTCHAT_RELAY_WORKERS", default_value_t = 4)]
    pub workers: usize,
    /// Milliseconds a direct message delivered from memory to an online recipient may
    /// wait for the recipient's `ack` (its client stored it) before the relay stores
    /// it; its sender is answered `sent` at whichever comes first. 0: store every
    /// message before delivering it.
    #[arg(long, env = "FASTCHAT_DELIVERY_WINDOW_MS", default_value_t = 100)]
    pub delivery_window_ms: u64,
    /// Most jobs a worker commits in one transaction.
    #[arg(long, env = "FASTCHAT_RELAY_MAX_BATCH", default_value_t = 256)]
    pub max_batch: usize,
    /// Largest message body accepted, in bytes.
    #[arg(long, env = "FASTCHAT_MAX_BODY", default_value_t = 48 * 1024)]
    pub max_body: usize,
    /// Largest file accepted, in bytes.
    #[arg(long, env = "FASTCHAT_MAX_FILE_SIZE", default_value_t = 100 * 1024 * 1024)]
    pub max_file_size: u64,
    /// Files a user may start uploading per minute.
    #[arg(long, env = "FASTCHAT_UPLOADS_PER_MINUTE", default_value_t = 30)]
    pub uploads_per_minute: u32,
    /// Seconds a file is kept for recipients who have not downloaded it.
    #[arg(long, env = "FASTCHAT_FILE_RETENTION_SECS", default_value_t = 7 * 24 * 3600)]
    pub file_retention_secs: u64,
    /// Most messages stored for one recipient: direct messages to a recipient with
    /// this many waiting are refused (`mailbox_full`), nothing stored.
    #[arg(long, env = "FASTCHAT_MAX_PENDING", default_value_t = 200_000)]
    pub max_pending: i64,
    /// Most bytes of message bodies waiting for one recipient (direct and group
    /// deliveries): a direct message past it is refused (`mailbox_full`), a group
    /// message is not stored for that member.
    #[arg(long, env = "FASTCHAT_MAX_PENDING_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_pending_bytes: i64,
    /// A user's storage quota, in bytes: the messages they sent that wait for their
    /// recipients (a group message once per member) and the files they uploaded that
    /// are kept. Past it (or past --max-pending such messages), sends and uploads are
    /// refused (`over_quota`) until recipients fetch what waits.
    #[arg(long, env = "FASTCHAT_MAX_STORED_BYTES_PER_USER", default_value_t = 1024 * 1024 * 1024)]
    pub max_stored_bytes_per_user: i64,
    /// Most members a group may have.
    #[arg(long, env = "FASTCHAT_MAX_GROUP_SIZE", default_value_t = 256)]
    pub max_group_size: i64,
    /// Most groups a user may be in: creating or being added to another is refused
    /// (`group_full`). With --max-invitations, also what keeps a `groups` reply (a
    /// user's groups and invitations, up to ~360 bytes each) inside a frame: the two
    /// may come to at most 170.
    #[arg(long, env = "FASTCHAT_MAX_GROUPS_PER_USER", default_value_t = 100)]
    pub max_groups_per_user: i64,
    /// Most invitations that may wait for one user's answer (a `group_add` by someone
    /// they share no group with is an invitation; at most 5 of them from one inviter);
    /// more are refused (`group_full`).
    #[arg(long, env = "FASTCHAT_MAX_INVITATIONS", default_value_t = 50)]
    pub max_invitations: i64,
    /// Stored messages delivered per page at login; the next page is fetched once the
    /// client has acknowledged half of the previous one.
    #[arg(long, env = "FASTCHAT_PAGE_SIZE", default_value_t = 1000)]
    pub page_size: i64,
    /// Seconds a logged-in session may stay silent (clients send a `ping` every 60 s
    /// when they have nothing else to say) before it is closed; 0: never.
    #[arg(long, env = "FASTCHAT_IDLE_TIMEOUT_SECS", default_value_t = 300)]
    pub idle_timeout_secs: u64,
    /// Bytes a session may leave unread: a client with more than this waiting that
    /// has taken none of it for `--output-stall-secs` is closed (it stopped reading);
    /// its undelivered messages stay stored for its next login.
    #[arg(long, env = "FASTCHAT_MAX_OUTPUT_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_output_bytes: usize,
    /// Output a client may have waiting (plus live messages held back for it) before
    /// it is closed at once, reading or not: a client reading a trickle cannot make
    /// the relay hold more. Its messages stay stored for its next login. At least 4 MiB
    /// (a backlog page, the half page before it, a catch-up and escaping must fit).
    #[arg(long, env = "FASTCHAT_HARD_OUTPUT_BYTES", default_value_t = 16 << 20, value_parser = at_least_4_mib)]
    pub hard_output_bytes: usize,
    /// Seconds a client may take none of its waiting output (see `--max-output-bytes`).
    #[arg(long, env = "FASTCHAT_OUTPUT_STALL_SECS", default_value_t = 10)]
    pub output_stall_secs: u64,
    /// Messages a user may send per second, on average (all their sessions on this
    /// relay together); over it, sends get a `rate_limited` error with a retry time.
    #[arg(long, env = "FASTCHAT_SEND_RATE", default_value_t = 2000.0)]
    pub send_rate: f64,
    /// Messages a user may send in a burst above the rate.
    #[arg(long, env = "FASTCHAT_SEND_BURST", default_value_t = 4000.0)]
    pub send_burst: f64,
    /// Bytes a user may have this relay write per second, on average: each message
    /// body once per recipient it reaches, and file chunks. Over it, sends and chunks
    /// get `rate_limited` with a retry time.
    #[arg(long, env = "FASTCHAT_SEND_BYTES_PER_SEC", default_value_t = 2.0 * 1024.0 * 1024.0)]
    pub send_bytes_per_sec: f64,
    /// Bytes a user may have written in a burst above that rate.
    #[arg(long, env = "FASTCHAT_SEND_BYTES_BURST", default_value_t = 16.0 * 1024.0 * 1024.0)]
    pub send_bytes_burst: f64,
    /// Refused resumption credentials allowed per client address within the window;
    /// then that address's `resume`s get `rate_limited` without a database lookup.
    #[arg(long, env = "FASTCHAT_RESUME_FAILURES_PER_ADDR", default_value_t = 20)]
    pub resume_failures_per_addr: u32,
    /// Requests (sends, key lookups, group and file operations) a session may have
    /// unanswered at once; beyond, `rate_limited` at once.
    #[arg(long, env = "FASTCHAT_RELAY_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub max_in_flight: u32,
    /// Sessions one user may have on this relay at once; beyond, `rate_limited` (closed).
    #[arg(
        long,
        env = "FASTCHAT_RELAY_MAX_SESSIONS_PER_USER",
        default_value_t = 32
    )]
    pub max_sessions_per_user: usize,
    /// Client connections one address may hold at once (more are closed at accept).
    #[arg(
        long,
        env = "FASTCHAT_RELAY_MAX_CONNECTIONS_PER_ADDR",
        default_value_t = 256
    )]
    pub max_connections_per_addr: usize,
    /// Length of the refused-resumption window, in seconds.
    #[arg(
        long,
        env = "FASTCHAT_RESUME_FAILURE_WINDOW_SECS",
        default_value_t = 300
    )]
    pub resume_failure_window_secs: u64,
}

/// Most groups and invitations of one user together that a `groups` reply holds
/// within a frame (each up to ~360 bytes of JSON; the frame limit is 64 KiB).
pub const MAX_LISTED_GROUPS: i64 = 170;

impl Config {
    /// Checks what the flags' parsers cannot see alone.
    pub fn check(&self) -> Result<(), String> {
        if self.max_groups_per_user + self.max_invitations > MAX_LISTED_GROUPS {
            return Err(format!(
                "--max-groups-per-user ({}) and --max-invitations ({}) come to more than \
                 {MAX_LISTED_GROUPS}, more than a `groups` reply can hold in a frame",
                self.max_groups_per_user, self.max_invitations
            ));
        }
        if self.delivery_window_ms > MAX_DELIVERY_WINDOW_MS {
            return Err(format!(
                "--delivery-window-ms ({}) is over {MAX_DELIVERY_WINDOW_MS}: a message that \
                 long unacknowledged is better stored",
                self.delivery_window_ms
            ));
        }
        Ok(())
    }
}

/// The longest delivery window: messages delivered from memory are held (and their
/// senders' requests count in flight) for at most this long.
pub const MAX_DELIVERY_WINDOW_MS: u64 = 5_000;

/// Parses a byte count of at least 4 MiB.
fn at_least_4_mib(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    if n < 4 << 20 {
        return Err(format!(
            "{n} is below the least that works, 4194304 (4 MiB)"
        ));
    }
    Ok(n)
}
