//! The local store at size: 100,000 messages of history with 1,000 peers. Measures what
//! one send and one received message cost in the store, opening it and loading what the
//! terminal UI shows, a search, and the file size per message — and, for comparison,
//! what one save of the earlier whole-file store (format 1) cost at the same size.
//!
//! `cargo bench -p fastchat-client --bench store` (prints a table; no criterion: each
//! figure is a mean over many runs of a setup that takes a while to build).
//! `FASTCHAT_BENCH_MESSAGES` and `FASTCHAT_BENCH_PEERS` change the size.

use fastchat_client::e2e::{self, ConversationKey};
use fastchat_client::store::{
    DeliveryState, HistoryEntry, InboxEntry, MakeCurrent, PeerEntry, Store, StoreData,
};
use std::time::{Duration, Instant};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn mean(runs: usize, mut f: impl FnMut(usize)) -> Duration {
    let start = Instant::now();
    for i in 0..runs {
        f(i);
    }
    start.elapsed() / runs as u32
}

fn main() {
    let messages = env_usize("FASTCHAT_BENCH_MESSAGES", 100_000);
    let peers = env_usize("FASTCHAT_BENCH_PEERS", 1_000);
    let dir = std::env::temp_dir().join(format!("fastchat-store-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    let mut data = StoreData {
        user: "alice".into(),
        identity_der: "aWRlbnRpdHk=".into(),
        ..StoreData::default()
    };
    let peer = |i: usize| format!("peer{i:04}");
    for p in 0..peers {
        data.peers.insert(
            peer(p),
            PeerEntry {
                pubkey_pem: format!("-----BEGIN PUBLIC KEY-----\n{}\n", "A".repeat(560)),
                verified: false,
                key_changed: false,
            },
        );
        let key = ConversationKey::generate();
        let conv = data.conversations.entry(peer(p)).or_default();
        conv.keys.insert(key.id.clone(), key.key);
        conv.shared.insert(key.id.clone());
        conv.current = Some(key.id);
    }
    for i in 0..messages {
        let p = peer(i % peers);
        let outgoing = i % 2 == 0;
        let mid = e2e::new_message_id();
        data.history.push(HistoryEntry {
            peer: p.clone(),
            group: None,
            from: if outgoing { "alice".into() } else { p.clone() },
            text: format!("message {i}: {}", "lorem ipsum dolor sit amet ".repeat(4)),
            ts: 1_795_000_000_000 + i as u64,
            msg_id: Some(i as i64),
            mid: mid.clone(),
            outgoing,
            state: if outgoing {
                DeliveryState::Delivered
            } else {
                DeliveryState::Received
            },
            file: false,
        });
        data.seen_msg_ids.push_back(i as i64);
        if !outgoing {
            data.seen_mids.push_back(format!("{p}/{mid}"));
        }
    }

    let built = Instant::now();
    let mut store = Store::create(&dir, "alice", "pw", &data.identity_der).unwrap();
    store.import(&data).unwrap();
    let build_time = built.elapsed();
    drop(store);

    // Opening: the password's argon2id (a new store's parameters: m = 64 MiB, t = 3,
    // p = 4) is measured apart and taken off.
    let params = argon2::Params::new(64 * 1024, 3, 4, Some(32)).unwrap();
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let kdf = mean(3, |_| {
        let _ = argon.hash_password_into(b"pw", b"saltsaltsaltsalt", &mut [0u8; 32]);
    });
    let open = mean(5, |_| {
        let store = Store::open(&dir, "alice", "pw").unwrap();
        let recent = store.recent_history(10, 200, 5).unwrap();
        let groups = store.groups().unwrap();
        std::hint::black_box((recent, groups));
    });
    let open_no_kdf = open.saturating_sub(kdf);

    let mut store = Store::open(&dir, "alice", "pw").unwrap();
    // One send, as Chat does it in the store: the key (found), whether it is shared,
    // the pending entry, the key marked shared, the entry marked stored.
    let sends = 500;
    let send = mean(sends, |i| {
        let to = peer(i % peers);
        let (key, _) = store
            .current_or_new_key(&to, ConversationKey::generate)
            .unwrap();
        let shared = store.conversation(&to).unwrap().shared.contains(&key.id);
        let mid = e2e::new_message_id();
        store
            .push_history(&HistoryEntry {
                peer: to.clone(),
                group: None,
                from: "alice".into(),
                text: format!("bench send {i}"),
                ts: 1,
                msg_id: None,
                mid: mid.clone(),
                outgoing: true,
                state: DeliveryState::Pending,
                file: false,
            })
            .unwrap();
        if !shared {
            store.mark_shared(&to, &key.id).unwrap();
        }
        store.mark_stored(&mid, 10_000_000 + i as i64).unwrap();
    });
    // One received message: stored (one transaction, before the ack), read back from
    // the inbox, its key looked up, recorded, out of the inbox.
    let receive = mean(sends, |i| {
        let from = peer(i % peers);
        let msg_id = 20_000_000 + i as i64;
        store
            .store_batch(&[InboxEntry {
                msg_id,
                from: from.clone(),
                group_id: None,
                group: None,
                event: None,
                body: "x".repeat(400),
                ts: 1,
            }])
            .unwrap();
        let row = store.inbox().unwrap().pop().unwrap();
        let key_id = store.conversation(&from).unwrap().current.unwrap();
        std::hint::black_box(store.conversation_key(&from, &key_id).unwrap());
        store
            .record_received(&HistoryEntry {
                peer: from.clone(),
                group: None,
                from,
                text: format!("bench receive {i}"),
                ts: 1,
                msg_id: Some(msg_id),
                mid: e2e::new_message_id(),
                outgoing: false,
                state: DeliveryState::Received,
                file: false,
            })
            .unwrap();
        store.inbox_done(row.entry.msg_id).unwrap();
    });
    let search = mean(3, |_| {
        std::hint::black_box(store.search(None, "message 99999:").unwrap());
    });
    let search_one = mean(5, |_| {
        std::hint::black_box(store.search(Some(&peer(7)), "message 7").unwrap());
    });
    let _ = store.add_key(
        &peer(0),
        &ConversationKey::generate(),
        None,
        false,
        MakeCurrent::Never,
    );
    drop(store);
    let mut bytes = 0;
    for name in ["store.db", "store.db-wal"] {
        bytes += std::fs::metadata(dir.join("alice").join(name)).map_or(0, |m| m.len());
    }

    // The earlier store rewrote the whole file (JSON, one Fernet token, fsync) on every
    // save, twice per send and per received batch.
    let old_key = fernet::Fernet::new(&fernet::Fernet::generate_key()).unwrap();
    let old_path = dir.join("old-store");
    let old_save = mean(3, |_| {
        let json = serde_json::to_vec(&data).unwrap();
        let token = old_key.encrypt(&json);
        let mut f = std::fs::File::create(&old_path).unwrap();
        std::io::Write::write_all(&mut f, token.as_bytes()).unwrap();
        f.sync_all().unwrap();
    });
    let old_bytes = std::fs::metadata(&old_path).map_or(0, |m| m.len());
    let old_open = mean(3, |_| {
        let token = std::fs::read_to_string(&old_path).unwrap();
        let json = old_key.decrypt(&token).unwrap();
        std::hint::black_box(serde_json::from_slice::<StoreData>(&json).unwrap());
    });

    println!("store benchmark: {messages} messages, {peers} peers (built in {build_time:.2?})");
    println!("| measure | store (SQLite, format 2) | earlier store (format 1) |");
    println!("| --- | --- | --- |");
    println!(
        "| one send, store work | {:.3} ms | {:.1} ms (two whole-file saves) |",
        ms(send),
        2.0 * ms(old_save)
    );
    println!(
        "| one received message, store work | {:.3} ms | {:.1} ms (two saves per batch) |",
        ms(receive),
        2.0 * ms(old_save)
    );
    println!(
        "| open + UI's first page (no KDF; KDF {:.0} ms) | {:.1} ms | {:.1} ms |",
        ms(kdf),
        ms(open_no_kdf),
        ms(old_open)
    );
    println!("| search, all history | {:.0} ms | — |", ms(search));
    println!(
        "| search, one conversation | {:.1} ms | — |",
        ms(search_one)
    );
    println!(
        "| size per message | {} B | {} B |",
        bytes / messages as u64,
        old_bytes / messages as u64
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
