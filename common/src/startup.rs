//! What both servers do before their poll loop starts: load the cluster secret and
//! their static key pair (made if missing), connect to PostgreSQL and apply the
//! migrations; and how a signal stops them.

use crate::db::DbPool;
use crate::noise::{StaticKeypair, KEY_LEN};
use crate::{hex, info};
use mio::Waker;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A server's keys and database, ready for its poll loop.
pub struct Prepared {
    pub secret: [u8; KEY_LEN],
    /// The stats port's secret, if its file exists.
    pub stats_secret: Option<[u8; KEY_LEN]>,
    pub keypair: StaticKeypair,
    pub db: DbPool,
}

/// Loads the keys, connects a pool of `pool_size` (waiting at most `db_timeout` for a
/// connection once running; see [`crate::db::connect`]) and migrates the schema.
pub fn prepare(
    secret_file: &Path,
    stats_secret_file: &Path,
    key_file: &Path,
    db_url: &str,
    pool_size: u32,
    db_timeout: Duration,
) -> Result<Prepared, Box<dyn std::error::Error>> {
    let secret = crate::keys::load_secret(secret_file)?;
    let stats_secret = if stats_secret_file.exists() {
        let stats = crate::keys::load_secret(stats_secret_file)?;
        if stats == secret {
            return Err("the stats secret must not be the cluster secret".into());
        }
        Some(stats)
    } else {
        info!(
            "no stats secret at {}: no stats port",
            stats_secret_file.display()
        );
        None
    };
    let (keypair, created) = crate::keys::load_or_create_keypair(key_file)?;
    if created {
        info!("generated a new static key at {}", key_file.display());
    }
    info!("static key {}", hex::encode(&keypair.public));
    let db = crate::db::connect(db_url, pool_size, db_timeout)?;
    let applied = crate::db::migrate(&mut *db.get()?)?;
    if !applied.is_empty() {
        info!("applied migrations {applied:?}");
    }
    Ok(Prepared {
        secret,
        stats_secret,
        keypair,
        db,
    })
}

/// Sets `stop` and wakes the poll loop on SIGINT or SIGTERM.
pub fn stop_on_signal(stop: Arc<AtomicBool>, waker: Arc<Waker>) -> Result<(), ctrlc::Error> {
    ctrlc::set_handler(move || {
        stop.store(true, Ordering::Relaxed);
        let _ = waker.wake();
    })
}
