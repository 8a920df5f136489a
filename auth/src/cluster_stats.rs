//! `fastchat-auth stats`: asks the running auth server for its figures and the relay
//! directory over its stats port, then each relay over its own stats port, with the
//! stats secret — a read-only credential: those ports answer `hello` and
//! `stats_request` only, so the tool cannot announce a relay (or evict one) as the
//! cluster secret could — and prints one table, or one JSON object with `--json`.

use fastchat_common::keys::load_secret;
use fastchat_common::link::Link;
use fastchat_common::noise::Role;
use fastchat_common::PROTOCOL_VERSION;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// Requests `stats` from the server at `addr` with a `{"t": tag, "id": 1}` frame.
fn ask(addr: &str, secret: &[u8; 32], tag: &str) -> Result<Value, String> {
    let mut link = Link::connect(
        addr,
        Role::PskInitiator(secret),
        1 << 20,
        Duration::from_secs(3),
    )
    .map_err(|e| format!("{addr}: {e}"))?;
    link.queue(&json!({"t": "hello", "version": PROTOCOL_VERSION}));
    link.queue(&json!({"t": tag, "id": 1}));
    link.flush().map_err(|e| format!("{addr}: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match link.recv::<Value>(Some(deadline)) {
            Ok(Some(frame)) if frame["t"] == "stats" => return Ok(frame["stats"].clone()),
            Ok(Some(frame)) if frame["t"] == "error" => {
                return Err(format!("{addr}: {}", frame["message"]))
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err(format!("{addr}: no answer")),
            Err(e) => return Err(format!("{addr}: {e}")),
        }
    }
}

/// Gathers the cluster's figures from the auth server's stats port at `auth_addr`.
pub fn gather(auth_addr: &str, secret_file: &Path) -> Result<Value, String> {
    let secret = load_secret(secret_file).map_err(|e| e.to_string())?;
    let auth = ask(auth_addr, &secret, "stats_request")?;
    let relays: Vec<Value> = auth["relays"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|r| match r["stats_addr"].as_str() {
            Some(addr) => ask(addr, &secret, "stats_request")
                .unwrap_or_else(|e| json!({"relay_id": r["relay_id"], "error": e})),
            None => json!({"relay_id": r["relay_id"], "error": "it has no stats port"}),
        })
        .collect();
    Ok(json!({"auth": auth, "relays": relays}))
}

/// Prints the figures as a table.
pub fn print_table(stats: &Value) {
    let a = &stats["auth"];
    println!(
        "auth: {} relays in rotation, {} connections, logins {}, resumes {}, failed logins {}, registrations {}, queue {}",
        a["relays"].as_array().map_or(0, Vec::len),
        a["connections"],
        a["logins"],
        a["resumes"],
        a["failed_logins"],
        a["registrations"],
        a["queue_depth"],
    );
    println!(
        "{:<12} {:>7} {:<10} {:<18} {:>9} {:>9} {:>9} {:>9} {:>6} {:>9} {:>5}",
        "relay",
        "clients",
        "auth link",
        "mesh links",
        "received",
        "delivered",
        "forwarded",
        "stored",
        "batch",
        "commit ms",
        "queue"
    );
    for r in stats["relays"].as_array().into_iter().flatten() {
        if let Some(err) = r.get("error") {
            println!(
                "{:<12} unreachable: {}",
                r["relay_id"].as_str().unwrap_or("?"),
                err
            );
            continue;
        }
        let mesh = r["mesh"].as_array().cloned().unwrap_or_default();
        let up = mesh.iter().filter(|m| m["link"] == "up").count();
        // serde_json's Display ignores widths: format numbers as numbers.
        let n = |k: &str| r[k].as_u64().unwrap_or(0);
        println!(
            "{:<12} {:>7} {:<10} {:<18} {:>9} {:>9} {:>9} {:>9} {:>6.1} {:>9.2} {:>5}",
            r["relay_id"].as_str().unwrap_or("?"),
            n("clients"),
            r["auth_link"].as_str().unwrap_or("?"),
            format!("{up}/{} up", mesh.len()),
            n("received"),
            n("delivered"),
            n("forwarded"),
            n("stored"),
            r["avg_batch"].as_f64().unwrap_or(0.0),
            r["avg_commit_ms"].as_f64().unwrap_or(0.0),
            n("queue_depth"),
        );
    }
}
