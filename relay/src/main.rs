//! `fastchat-relay`: a FastChat relay. The work is in the `fastchat_relay` library
//! (see its crate documentation for the layout); this is flags, keys, the database and
//! the signal handler.

use clap::Parser;
use fastchat_common::{error, hex, info};
use fastchat_relay::{config, server, store};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn main() {
    let cfg = config::Config::parse();
    fastchat_common::log::init(&cfg.id);
    if let Err(e) = run(cfg) {
        error!("{e}");
        std::process::exit(1);
    }
}

fn run(cfg: config::Config) -> Result<(), Box<dyn std::error::Error>> {
    let secret = fastchat_common::keys::load_secret(&cfg.secret_file)?;
    let (keypair, created) = fastchat_common::keys::load_or_create_keypair(&cfg.key_file)?;
    if created {
        info!("generated a new static key at {}", cfg.key_file.display());
    }
    let db = fastchat_common::db::connect(&cfg.db_url, cfg.workers as u32 + 1)?;
    let applied = fastchat_common::db::migrate(&mut *db.get()?)?;
    if !applied.is_empty() {
        info!("applied migrations {applied:?}");
    }
    let cleared = store::clear_stale_presence(&db, &cfg.id)?;
    if cleared > 0 {
        info!("cleared {cleared} stale presence rows of a previous run");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (server, bound, waker) =
        server::RelayServer::new(cfg, db, keypair.clone(), secret, stop.clone())?;
    ctrlc::set_handler(move || {
        stop.store(true, Ordering::Relaxed);
        let _ = waker.wake();
    })?;
    info!("static key {}", hex::encode(&keypair.public));
    info!("listening for clients on {bound}");
    info!("listening for relays on {}", server.mesh_addr());
    server.run()?;
    Ok(())
}
