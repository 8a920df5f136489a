//! Command-line flags of `fastchat-auth`; each has an environment variable twin.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// The FastChat auth server: accounts, logins, tickets and the relay directory.
#[derive(Parser, Debug, Clone)]
#[command(name = "fastchat-auth", version)]
pub struct Config {
    /// Flags both servers take.
    #[command(flatten)]
    pub common: fastchat_common::flags::ServerFlags,
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
    /// The server's static Noise key pair; created (mode 0600) if missing.
    #[arg(
        long,
        env = "FASTCHAT_AUTH_KEY",
        default_value = ".fastchat/keys/auth.key"
    )]
    pub key_file: PathBuf,
    /// Worker threads for password hashing and database work.
    #[arg(long, env = "FASTCHAT_AUTH_WORKERS", default_value_t = 2)]
    pub workers: usize,
    /// Failed password logins allowed per user name from one client address within the
    /// window (then that address is held off for that name; the user elsewhere is not).
    #[arg(long, env = "FASTCHAT_LOGIN_FAILURES_PER_USER", default_value_t = 5)]
    pub login_failures_per_user: u32,
    /// Failed logins (passwords and resumption credentials) allowed per client address
    /// within the window, whatever the name.
    #[arg(long, env = "FASTCHAT_LOGIN_FAILURES_PER_ADDR", default_value_t = 20)]
    pub login_failures_per_addr: u32,
    /// Failed password logins per user name from all addresses within the window before
    /// that name's attempts are paced (one per --login-pace-ms), never refused outright.
    #[arg(
        long,
        env = "FASTCHAT_LOGIN_FAILURES_PER_USER_EVERYWHERE",
        default_value_t = 50
    )]
    pub login_failures_per_user_everywhere: u32,
    /// While a name is paced: one password attempt for it per this many milliseconds.
    #[arg(long, env = "FASTCHAT_LOGIN_PACE_MS", default_value_t = 1000)]
    pub login_pace_ms: u64,
    /// Length of the failed-login window, in seconds.
    #[arg(
        long,
        env = "FASTCHAT_LOGIN_FAILURE_WINDOW_SECS",
        default_value_t = 300
    )]
    pub login_failure_window_secs: u64,
    /// Registrations allowed per client address per minute (a steady refill; as many
    /// at once).
    #[arg(
        long,
        env = "FASTCHAT_REGISTRATIONS_PER_ADDR_PER_MINUTE",
        default_value_t = 5.0
    )]
    pub registrations_per_addr_per_minute: f64,
    /// Registrations allowed per second from all addresses together.
    #[arg(
        long,
        env = "FASTCHAT_REGISTRATIONS_PER_SECOND",
        default_value_t = 10.0
    )]
    pub registrations_per_second: f64,
    /// Password attempts (logins, password changes) per client address per minute.
    #[arg(
        long,
        env = "FASTCHAT_PASSWORD_ATTEMPTS_PER_ADDR_PER_MINUTE",
        default_value_t = 60.0
    )]
    pub password_attempts_per_addr_per_minute: f64,
    /// Jobs that may wait for each worker; beyond it requests are answered
    /// `rate_limited` at once.
    #[arg(long, env = "FASTCHAT_AUTH_QUEUE_PER_WORKER", default_value_t = 64)]
    pub queue_per_worker: usize,
    /// Client connections one address may hold at once (more are closed at accept).
    #[arg(
        long,
        env = "FASTCHAT_AUTH_MAX_CONNECTIONS_PER_ADDR",
        default_value_t = 32
    )]
    pub max_connections_per_addr: usize,
    /// Seconds a client connection may stay open in all (a login takes seconds).
    #[arg(
        long,
        env = "FASTCHAT_AUTH_SESSION_DEADLINE_SECS",
        default_value_t = 60
    )]
    pub session_deadline_secs: u64,
    /// How long a ticket stays valid, in seconds.
    #[arg(long, env = "FASTCHAT_TICKET_TTL_SECS", default_value_t = 30)]
    pub ticket_ttl_secs: u64,
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
    /// Connects to --stats-listen (the auth server's stats port) with the stats secret
    /// (--stats-secret-file); the cluster secret is not needed.
    Stats {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}
