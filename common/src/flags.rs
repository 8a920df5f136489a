//! The flags both servers take, one `clap` struct flattened into each server's own
//! (each has an environment variable twin).

use std::path::PathBuf;

/// Database, cluster secret and connection limits: the same for the auth server and
/// every relay.
#[derive(clap::Args, Debug, Clone)]
pub struct ServerFlags {
    /// PostgreSQL connection string (libpq key=value or URI).
    #[arg(
        long,
        env = "FASTCHAT_DB_URL",
        default_value = "host=127.0.0.1 port=54329 user=fastchat dbname=fastchat"
    )]
    pub db_url: String,
    /// Milliseconds a worker waits for a database connection before it answers
    /// `store_failed` (while PostgreSQL is down); also the connect timeout.
    #[arg(long, env = "FASTCHAT_DB_TIMEOUT_MS", default_value_t = crate::db::DEFAULT_TIMEOUT_MS)]
    pub db_timeout_ms: u64,
    /// The cluster secret the servers share (64 hex characters).
    #[arg(
        long,
        env = "FASTCHAT_SECRET_FILE",
        default_value = ".fastchat/cluster.secret"
    )]
    pub secret_file: PathBuf,
    /// The operator tools' read-only credential (64 hex characters, like the cluster
    /// secret but another one): a connection to --stats-listen made with it may ask for
    /// figures and nothing else. Without the file there is no stats port.
    #[arg(
        long,
        env = "FASTCHAT_STATS_SECRET_FILE",
        default_value = ".fastchat/stats.secret"
    )]
    pub stats_secret_file: PathBuf,
    /// The stats port (Noise NNpsk0 with the stats secret).
    #[arg(long, env = "FASTCHAT_STATS_LISTEN", default_value = "127.0.0.1:0")]
    pub stats_listen: String,
    /// Largest frame accepted, in bytes.
    #[arg(long, env = "FASTCHAT_MAX_FRAME", default_value_t = crate::frame::DEFAULT_MAX_FRAME)]
    pub max_frame: usize,
    /// Seconds a new connection has to complete its handshake and hello (and, on a
    /// relay, present its ticket) before it is closed.
    #[arg(long, env = "FASTCHAT_AUTH_DEADLINE_SECS", default_value_t = 10)]
    pub auth_deadline_secs: u64,
    /// Most client connections held at once; more are closed as they arrive
    /// [default: the process's descriptor limit less 256].
    #[arg(long, env = "FASTCHAT_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
}
