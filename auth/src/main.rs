//! `fastchat-auth`: the FastChat auth server.
//!
//! Layout: [`config`] (flags), [`accounts`] (names, passwords, the worker jobs),
//! [`ratelimit`] (failed logins), [`directory`] (live relays, least-loaded choice),
//! [`server`] (the poll loop tying them together).

mod accounts;
mod cluster_stats;
mod config;
mod directory;
mod ratelimit;
mod server;

use clap::Parser;
use fastchat_common::{error, hex, info};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn main() {
    let cfg = config::Config::parse();
    if let Some(config::Command::Stats { json }) = cfg.command {
        match cluster_stats::gather(&cfg.relay_listen, &cfg.secret_file) {
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
    let stop = Arc::new(AtomicBool::new(false));
    let (server, bound, waker) =
        server::AuthServer::new(cfg, db, keypair.clone(), secret, stop.clone())?;
    ctrlc::set_handler(move || {
        stop.store(true, Ordering::Relaxed);
        let _ = waker.wake();
    })?;
    info!("static key {}", hex::encode(&keypair.public));
    info!("listening for relays on {}", bound.relays);
    info!("listening for clients on {}", bound.clients);
    server.run()?;
    Ok(())
}
