//! PostgreSQL: the r2d2 connection pool and the schema migrations in `sql/`.
//!
//! Migrations are compiled in, applied in order at server start inside one transaction
//! each, under an advisory lock so an auth server and relays starting together do not
//! race, and recorded in `schema_migrations`. Applying them again changes nothing.

use crate::{debug, info, warn};
use postgres::NoTls;
use r2d2_postgres::PostgresConnectionManager;
use std::time::{Duration, Instant};

/// A pool of PostgreSQL connections.
pub type DbPool = r2d2::Pool<PostgresConnectionManager<NoTls>>;
/// One pooled connection.
pub type DbConn = r2d2::PooledConnection<PostgresConnectionManager<NoTls>>;

/// The schema, in order: (version, file name, SQL).
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "0001_init.sql", include_str!("../../sql/0001_init.sql")),
    (
        2,
        "0002_resume.sql",
        include_str!("../../sql/0002_resume.sql"),
    ),
    (
        3,
        "0003_groups.sql",
        include_str!("../../sql/0003_groups.sql"),
    ),
    (
        4,
        "0004_files.sql",
        include_str!("../../sql/0004_files.sql"),
    ),
    (
        5,
        "0005_queue_vacuum.sql",
        include_str!("../../sql/0005_queue_vacuum.sql"),
    ),
    (
        6,
        "0006_rosters.sql",
        include_str!("../../sql/0006_rosters.sql"),
    ),
    (
        7,
        "0007_blocks.sql",
        include_str!("../../sql/0007_blocks.sql"),
    ),
    (
        8,
        "0008_quotas.sql",
        include_str!("../../sql/0008_quotas.sql"),
    ),
    (
        9,
        "0009_invitations.sql",
        include_str!("../../sql/0009_invitations.sql"),
    ),
    (
        10,
        "0010_deliveries.sql",
        include_str!("../../sql/0010_deliveries.sql"),
    ),
];

/// Key of the advisory lock held while migrating.
const MIGRATION_LOCK: i64 = 0x0fa5_7c4a_7000_0001;

/// Why the database could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("bad database URL: {0}")]
    Url(postgres::Error),
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(r2d2::Error),
    #[error("migration {file} failed: {source}")]
    Migration {
        file: &'static str,
        source: postgres::Error,
    },
    #[error("database error: {0}")]
    Query(#[from] postgres::Error),
}

/// The default of `--db-timeout-ms`: how long a worker waits for a database connection
/// before it answers `store_failed`.
pub const DEFAULT_TIMEOUT_MS: u64 = 2000;

/// How long a server waits at start for its first database connection (PostgreSQL may
/// be starting alongside it).
pub const STARTUP_WAIT: Duration = Duration::from_secs(10);

/// Opens a pool of at most `size` connections to `url` (libpq key=value or URI form)
/// and checks, waiting up to [`STARTUP_WAIT`], that one connection can be made.
///
/// `timeout` bounds every later wait for a connection: while PostgreSQL is down a
/// worker's `get()` fails after `timeout` (and its batch is answered `store_failed`)
/// instead of blocking for long. The pool keeps reconnecting in the background, at
/// least every `timeout / 2`, so the first batch after PostgreSQL returns succeeds.
/// Unless the URL sets its own `connect_timeout`, `timeout` also bounds each
/// connection attempt (an unreachable host must not tie up the pool's helper threads).
pub fn connect(url: &str, size: u32, timeout: Duration) -> Result<DbPool, DbError> {
    let timeout = timeout.max(Duration::from_millis(100));
    let config = tuned(url, timeout)?;
    let manager = PostgresConnectionManager::new(config, NoTls);
    let pool = r2d2::Pool::builder()
        .max_size(size.max(1))
        .min_idle(Some(1))
        .connection_timeout(timeout)
        // Connections killed by a database restart are found and dropped at checkout.
        .test_on_check_out(true)
        .build_unchecked(manager);
    drop(
        pool.get_timeout(STARTUP_WAIT.max(timeout))
            .map_err(DbError::Connect)?,
    );
    Ok(pool)
}

/// A pool that has never connected and connects only when asked (then to nothing that
/// listens): for tests of a server's protocol logic, whose workers are not running.
pub fn unconnected() -> DbPool {
    let config: postgres::Config = "host=127.0.0.1 port=1 connect_timeout=1"
        .parse()
        .expect("a fixed, valid configuration");
    r2d2::Pool::builder()
        .max_size(1)
        .min_idle(Some(0))
        .build_unchecked(PostgresConnectionManager::new(config, NoTls))
}

/// A worker's own connection and the statements it prepared on it (`S`).
pub struct Held<S> {
    pub conn: DbConn,
    pub st: S,
    /// When its last batch ended.
    last_used: Instant,
}

/// A held connection idle this long is checked (one empty query) before a batch relies
/// on it: PostgreSQL may have restarted meanwhile, and the first batch after an outage
/// should not fail on a connection that died during it.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// A worker's database connection, kept from batch to batch: no pool checkout (and its
/// validity query) per batch, and the statements stay prepared (no parse and plan per
/// statement). Dropped after any error; the next [`HeldConnection::take`] connects and
/// prepares again.
pub struct HeldConnection<S> {
    pool: DbPool,
    prepare: fn(&mut DbConn) -> Result<S, postgres::Error>,
    held: Option<Held<S>>,
    /// Since when no database could be reached (logged once, not per batch).
    unavailable_since: Option<Instant>,
}

impl<S> HeldConnection<S> {
    /// Connections from `pool`, with `prepare` run on each new one.
    pub fn new(
        pool: DbPool,
        prepare: fn(&mut DbConn) -> Result<S, postgres::Error>,
    ) -> HeldConnection<S> {
        HeldConnection {
            pool,
            prepare,
            held: None,
            unavailable_since: None,
        }
    }

    /// The connection for a batch, made (and prepared) if there is none or the held one
    /// died. While PostgreSQL is down this fails after the pool's connection timeout
    /// (`--db-timeout-ms`), so the batch is refused promptly. Hand it back with
    /// [`HeldConnection::give_back`] if the batch went well; drop it otherwise.
    pub fn take(&mut self) -> Result<Held<S>, String> {
        if let Some(mut held) = self.held.take() {
            let fresh = held.last_used.elapsed() < IDLE_CHECK;
            if !held.conn.is_closed() && (fresh || held.conn.simple_query("").is_ok()) {
                return Ok(held);
            }
            debug!("the held database connection is gone; reconnecting");
        }
        let prepare = self.prepare;
        let connected = self
            .pool
            .get()
            .map_err(|e| e.to_string())
            .and_then(|mut conn| {
                let st = prepare(&mut conn).map_err(|e| e.to_string())?;
                Ok(Held {
                    conn,
                    st,
                    last_used: Instant::now(),
                })
            });
        match (&connected, self.unavailable_since) {
            (Ok(_), Some(since)) => {
                info!(
                    "database reachable again after {:.1} s",
                    since.elapsed().as_secs_f64()
                );
                self.unavailable_since = None;
            }
            (Err(e), None) => {
                warn!("database unavailable, refusing work until it returns: {e}");
                self.unavailable_since = Some(Instant::now());
            }
            _ => {}
        }
        connected
    }

    /// Keeps a connection whose batch went well for the next batch.
    pub fn give_back(&mut self, mut held: Held<S>) {
        held.last_used = Instant::now();
        self.held = Some(held);
    }
}

/// The connection settings of `url`, with what it leaves unset chosen for a server
/// that must notice a database host that vanished (not just one that closed its
/// sockets): `timeout` per connection attempt; TCP keepalive probes after 30 s idle,
/// every 5 s, 3 unanswered closing the connection; and 30 s for sent data to be
/// acknowledged. Otherwise a worker waiting on a dead host's socket would hang for the
/// kernel's defaults (hours for an idle wait, ~15 minutes for unacknowledged data).
pub fn tuned(url: &str, timeout: Duration) -> Result<postgres::Config, DbError> {
    let mut config: postgres::Config = url.parse().map_err(DbError::Url)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(timeout);
    }
    // The idle time has a default (2 hours) rather than "unset": only a URL that names
    // it keeps its own.
    if !url.contains("keepalives_idle") {
        config.keepalives_idle(Duration::from_secs(30));
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(Duration::from_secs(5));
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(3);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(Duration::from_secs(30));
    }
    // Generic plans for prepared statements: PostgreSQL's default re-plans a statement
    // with array parameters at every execution (its custom plans never look costlier),
    // and at low load, where each batch is one message, planning was the largest part
    // of PostgreSQL's CPU (BENCHMARKS.md, "Where a message's CPU goes at low load").
    // Every statement here is keyed by ids whose values do not change the best plan.
    let generic = "-c plan_cache_mode=force_generic_plan";
    let options = match config.get_options() {
        Some(theirs) if theirs.contains("plan_cache_mode") => theirs.to_string(),
        Some(theirs) => format!("{theirs} {generic}"),
        None => generic.to_string(),
    };
    config.options(&options);
    Ok(config)
}

/// Applies every migration not yet recorded. Returns the versions applied now.
pub fn migrate(client: &mut postgres::Client) -> Result<Vec<i32>, DbError> {
    let mut applied_now = Vec::new();
    for &(version, file, sql) in MIGRATIONS {
        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version integer PRIMARY KEY,
                 name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )?;
        let done = tx
            .query_opt(
                "SELECT 1 FROM schema_migrations WHERE version = $1",
                &[&version],
            )?
            .is_some();
        if !done {
            tx.batch_execute(sql)
                .map_err(|source| DbError::Migration { file, source })?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                &[&version, &file],
            )?;
            applied_now.push(version);
        }
        tx.commit()?;
    }
    Ok(applied_now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_timeouts_are_chosen_and_set_ones_kept() {
        let c = tuned("host=127.0.0.1 dbname=x", Duration::from_secs(2)).unwrap();
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(2)));
        assert!(c.get_keepalives());
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(c.get_keepalives_interval(), Some(Duration::from_secs(5)));
        assert_eq!(c.get_keepalives_retries(), Some(3));
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_secs(30)));

        let c = tuned(
            "host=127.0.0.1 dbname=x connect_timeout=9 keepalives_idle=7200 \
             keepalives_interval=1 keepalives_retries=9 tcp_user_timeout=4",
            Duration::from_secs(2),
        )
        .unwrap();
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(9)));
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(7200));
        assert_eq!(c.get_keepalives_interval(), Some(Duration::from_secs(1)));
        assert_eq!(c.get_keepalives_retries(), Some(9));
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_secs(4)));

        assert!(matches!(
            tuned("not a url ===", Duration::from_secs(1)),
            Err(DbError::Url(_))
        ));
    }

    #[test]
    fn prepared_statements_get_generic_plans_unless_the_url_says_otherwise() {
        let generic = "-c plan_cache_mode=force_generic_plan";
        let c = tuned("host=127.0.0.1 dbname=x", Duration::from_secs(1)).unwrap();
        assert_eq!(c.get_options(), Some(generic));
        let c = tuned(
            "host=127.0.0.1 dbname=x options='-c work_mem=8MB'",
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(
            c.get_options(),
            Some(format!("-c work_mem=8MB {generic}").as_str())
        );
        let c = tuned(
            "host=127.0.0.1 dbname=x options='-c plan_cache_mode=auto'",
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(c.get_options(), Some("-c plan_cache_mode=auto"));
    }
}
