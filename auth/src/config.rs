//! Command-line flags of `fastchat-auth`; each has an environment variable twin.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// The FastChat auth server: accounts, logins, tickets and the relay directory.
#[derive(Parser, Debug, Clone)]
#[command(name = "fastchat-auth", version)]
pub struct Config {
    /// Address clients connect to (Noise NX).
    #[arg(long, env = "FASTCHAT_AUTH_LISTEN", default_value = "127.0.0.1:7400")]
    pub listen: String,
    /// Address relays connect their control links to (Noise NNpsk0).
    #[arg(
        long,
        env = "FASTCHAT_AUTH_RELAY_LISTEN",
        default_value = "127.0.0.1:7401"
    )]
    pub relay_listen: String,
    /// PostgreSQL connection string (libpq key=value or URI).
    #[arg(
        long,
        env = "FASTCHAT_DB_URL",
        default_value = "host=127.0.0.1 port=54329 user=fastchat dbname=fastchat"
    )]
    pub db_url: String,
    /// Milliseconds a worker waits for a database connection before it answers
    /// `store_failed` (while PostgreSQL is down); also the connect timeout.
    #[arg(long, env = "FASTCHAT_DB_TIMEOUT_MS", default_value_t = fastchat_common::db::DEFAULT_TIMEOUT_MS)]
    pub db_timeout_ms: u64,
    /// The server's static Noise key pair; created (mode 0600) if missing.
    #[arg(
        long,
        env = "FASTCHAT_AUTH_KEY",
        default_value = ".fastchat/keys/auth.key"
    )]
    pub key_file: PathBuf,
    /// The cluster secret shared with the relays (64 hex characters).
    #[arg(
        long,
        env = "FASTCHAT_SECRET_FILE",
        default_value = ".fastchat/cluster.secret"
    )]
    pub secret_file: PathBuf,
    /// Worker threads for password hashing and database work.
    #[arg(long, env = "FASTCHAT_AUTH_WORKERS", default_value_t = 2)]
    pub workers: usize,
    /// Largest frame accepted, in bytes.
    #[arg(long, env = "FASTCHAT_MAX_FRAME", default_value_t = fastchat_common::frame::DEFAULT_MAX_FRAME)]
    pub max_frame: usize,
    /// Failed logins allowed per user name within the window.
    #[arg(long, env = "FASTCHAT_LOGIN_FAILURES_PER_USER", default_value_t = 5)]
    pub login_failures_per_user: u32,
    /// Failed logins allowed per client address within the window.
    #[arg(long, env = "FASTCHAT_LOGIN_FAILURES_PER_ADDR", default_value_t = 20)]
    pub login_failures_per_addr: u32,
    /// Length of the failed-login window, in seconds.
    #[arg(
        long,
        env = "FASTCHAT_LOGIN_FAILURE_WINDOW_SECS",
        default_value_t = 300
    )]
    pub login_failure_window_secs: u64,
    /// How long a ticket stays valid, in seconds.
    #[arg(long, env = "FASTCHAT_TICKET_TTL_SECS", default_value_t = 30)]
    pub ticket_ttl_secs: u64,
    /// Seconds a new connection has to complete its handshake and hello (and, on a
    /// relay, present its ticket) before it is closed.
    #[arg(long, env = "FASTCHAT_AUTH_DEADLINE_SECS", default_value_t = 10)]
    pub auth_deadline_secs: u64,
    /// Most client connections held at once; more are closed as they arrive
    /// [default: the process's descriptor limit less 256].
    #[arg(long, env = "FASTCHAT_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    #[command(subcommand)]
    pub command: Option<Command>,
    /// How long a resumption credential stays valid, in seconds.
    #[arg(long, env = "FASTCHAT_RESUME_TTL_SECS", default_value_t = 7 * 24 * 3600)]
    pub resume_ttl_secs: u64,
}

/// Operator commands (without one, the server runs).
#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Print the running cluster's figures: the auth server's, then each relay's.
    /// Connects to --relay-listen with the cluster secret.
    Stats {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}
