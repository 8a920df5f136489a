//! `fastchat-relay`: a FastChat relay. The work is in the `fastchat_relay` library
//! (see its crate documentation for the layout); this is flags, keys, the database and
//! the signal handler.

use clap::Parser;
use fastchat_common::{error, info, startup};
use fastchat_relay::{config, server, worker};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

fn main() {
    let cfg = config::Config::parse();
    fastchat_common::log::init(&cfg.id);
    if let Err(e) = run(cfg) {
        error!("{e}");
        std::process::exit(1);
    }
}

fn run(cfg: config::Config) -> Result<(), Box<dyn std::error::Error>> {
    cfg.check()?;
    let base = startup::prepare(
        &cfg.common.secret_file,
        &cfg.common.stats_secret_file,
        &cfg.key_file,
        &cfg.common.db_url,
        cfg.workers as u32 + 1,
        Duration::from_millis(cfg.common.db_timeout_ms),
    )?;
    let cleared = worker::clear_stale_presence(&base.db, &cfg.id)?;
    if cleared > 0 {
        info!("cleared {cleared} stale presence rows of a previous run");
    }
    let epoch = worker::delivery_epoch(&base.db)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (server, bound, waker) = server::RelayServer::new(
        cfg,
        epoch,
        base.db,
        base.keypair,
        base.secret,
        base.stats_secret,
        stop.clone(),
    )?;
    startup::stop_on_signal(stop, waker)?;
    info!("listening for clients on {bound}");
    info!("listening for relays on {}", server.mesh_addr());
    if let Some(stats) = server.stats_addr() {
        info!("listening for stats requests on {stats}");
    }
    server.run()?;
    Ok(())
}
