//! `fastchat-auth`: the FastChat auth server.
//!
//! Layout: [`config`] (flags), [`accounts`] (names, passwords, the worker jobs),
//! [`ratelimit`] (failed logins), [`directory`] (live relays, least-loaded choice),
//! [`server`] (the poll loop tying them together).

mod accounts;
mod cluster_stats;
mod config;
mod directory;
mod passwords;
mod ratelimit;
mod server;

use clap::Parser;
use fastchat_common::{error, info, startup};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

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
    let base = startup::prepare(
        &cfg.secret_file,
        &cfg.key_file,
        &cfg.db_url,
        cfg.workers as u32 + 1,
        Duration::from_millis(cfg.db_timeout_ms),
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let (server, bound, waker) =
        server::AuthServer::new(cfg, base.db, base.keypair, base.secret, stop.clone())?;
    startup::stop_on_signal(stop, waker)?;
    info!("listening for relays on {}", bound.relays);
    info!("listening for clients on {}", bound.clients);
    server.run()?;
    Ok(())
}
