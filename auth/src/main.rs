//! `fastchat-auth`: the FastChat auth server. The work is in the `fastchat_auth` library
//! (see its crate documentation for the layout); this is flags, keys, the database and
//! the signal handler.

use clap::Parser;
use fastchat_auth::{cluster_stats, config, server};
use fastchat_common::{error, info, startup};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

fn main() {
    let cfg = config::Config::parse();
    if let Some(config::Command::Stats { json }) = cfg.command {
        match cluster_stats::gather(&cfg.common.stats_listen, &cfg.common.stats_secret_file) {
            Ok(stats) if json => println!("{stats}"),
            Ok(stats) => cluster_stats::print_table(&stats),
            Err(e) => {
                eprintln!("fastchat-auth stats: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    fastchat_common::log::init("auth");
    if let Err(e) = run(cfg) {
        error!("{e}");
        std::process::exit(1);
    }
}

fn run(cfg: config::Config) -> Result<(), Box<dyn std::error::Error>> {
    let base = startup::prepare(
        &cfg.common.secret_file,
        &cfg.common.stats_secret_file,
        &cfg.key_file,
        &cfg.common.db_url,
        cfg.workers as u32 + 1,
        Duration::from_millis(cfg.common.db_timeout_ms),
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let (server, bound, waker) = server::AuthServer::new(
        cfg,
        base.db,
        base.keypair,
        base.secret,
        base.stats_secret,
        stop.clone(),
    )?;
    startup::stop_on_signal(stop, waker)?;
    if let Some(stats) = bound.stats {
        info!("listening for stats requests on {stats}");
    }
    info!("listening for relays on {}", bound.relays);
    info!("listening for clients on {}", bound.clients);
    server.run()?;
    Ok(())
}
