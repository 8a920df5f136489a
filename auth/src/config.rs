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
