//! Files end to end: to an offline peer and to a group, tampering, hostile names, and a
//! relay killed in the middle of an upload.

mod harness;

use fastchat_client::chat::{self, Chat, Event};
use fastchat_client::e2e::Identity;
use fastchat_client::files::{FileReceived, StrangerFiles};
use harness::{add_member, eventually, Settings, TestNet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn shared_identity() -> &'static Identity {
    static ID: std::sync::OnceLock<Identity> = std::sync::OnceLock::new();
    ID.get_or_init(|| Identity::generate().unwrap())
}

fn register(net: &TestNet, users: &[&str]) {
    for u in users {
        chat::register_with(&net.opts(u), shared_identity()).unwrap();
    }
}

/// A file of `size` pseudo-random bytes.
fn random_file(dir: &Path, name: &str, size: usize) -> PathBuf {
    let mut x = 0x1234_5678_9abc_def1u64;
    let bytes: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Receives until a file arrives (or something is rejected); returns the events.
fn receive_files(chat: &mut Chat, n: usize) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        for e in chat
            .receive(Instant::now() + Duration::from_millis(200))
            .unwrap()
        {
            if matches!(e, Event::File(_) | Event::Undecryptable { .. }) {
                got.push(e);
            }
        }
    }
    got
}

/// A session that downloads files from strangers of any size: these tests are about
/// transfer, and alice is a stranger to bob here (files from strangers have their own
/// test, `files_from_strangers_wait_for_a_choice`).
fn accepting(net: &TestNet, user: &str) -> Chat {
    let mut chat = net.login(user);
    chat.set_stranger_files(StrangerFiles::Accept);
    chat
}

fn file_of(e: &Event) -> &FileReceived {
    match e {
        Event::File(f) => f,
        other => panic!("expected a file, got {other:?}"),
    }
}

#[test]
fn five_mib_to_an_offline_peer_arrives_byte_identical() {
    let net = TestNet::start();
    register(&net, &["alice", "bob"]);
    let src = random_file(&net.home.join("src"), "photo.bin", 5 * 1024 * 1024 + 123);
    let mut alice = Chat::login(&net.opts("alice"), false).unwrap();
    let sent = alice.send_file(Some("bob"), None, &src, None).unwrap();
    assert_eq!(sent.chunks, 161);
    assert_eq!(sent.chunks_uploaded, 161, "nothing sent twice");
    // Stored as ciphertext only.
    let mut db = postgres::Client::connect(&net.db_url, postgres::NoTls).unwrap();
    let stored: i64 = db
        .query_one("SELECT count(*) FROM file_chunks", &[])
        .unwrap()
        .get(0);
    assert_eq!(stored, 161);

    let mut bob = accepting(&net, "bob");
    let got = receive_files(&mut bob, 1);
    let f = file_of(&got[0]);
    assert_eq!(f.name, "photo.bin");
    assert_eq!(f.from, "alice");
    assert_eq!(f.size, 5 * 1024 * 1024 + 123);
    assert_eq!(
        std::fs::read(&f.path).unwrap(),
        std::fs::read(&src).unwrap()
    );
    assert!(f
        .path
        .starts_with(net.opts("bob").data_dir.join("bob/downloads")));
    // Every recipient is done: the relay let go of it.
    eventually("files left stored", 0, || {
        db.query_one("SELECT count(*) FROM files", &[])
            .unwrap()
            .get::<_, i64>(0)
    });
}

#[test]
fn a_group_of_three_each_get_the_file_once() {
    let net = TestNet::with(Settings {
        relays: 2,
        ..Settings::default()
    });
    register(&net, &["alice", "bob", "carol"]);
    let mut alice = net.login("alice");
    let mut bob = net.login("bob");
    let mut carol = net.login("carol");
    let gid = alice.group_create("trio").unwrap().group_id;
    add_member(&mut alice, gid, &mut bob);
    add_member(&mut alice, gid, &mut carol);
    for c in [&mut bob, &mut carol] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while c.group_key_epoch(gid).is_none() {
            assert!(Instant::now() < deadline);
            c.receive(Instant::now() + Duration::from_millis(100))
                .unwrap();
        }
    }
    let src = random_file(&net.home.join("src"), "notes.txt", 100_000);
    alice.send_file(None, Some(gid), &src, None).unwrap();
    for c in [&mut bob, &mut carol] {
        let got = receive_files(c, 1);
        let f = file_of(&got[0]);
        assert_eq!(f.group.as_deref(), Some("trio"));
        assert_eq!(f.group_id, Some(gid));
        assert_eq!(
            std::fs::read(&f.path).unwrap(),
            std::fs::read(&src).unwrap()
        );
        // Once: nothing more arrives.
        let more = c
            .receive(Instant::now() + Duration::from_millis(500))
            .unwrap();
        assert!(more.iter().all(|e| !matches!(e, Event::File(_))));
    }
    let saved: Vec<_> = std::fs::read_dir(net.opts("bob").data_dir.join("bob/downloads"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .collect();
    assert_eq!(saved.len(), 1);

    // After a restart the file is still listed, in the group's conversation (found by
    // group id, not by its name), as the terminal UI loads it.
    let path = saved[0].path();
    bob.close();
    let bob = Chat::login(&net.opts("bob"), false).unwrap();
    let mut model = fastchat_client::ui::model::Model::new("bob", "relay");
    model.load(
        &bob.store().recent_history(10, 200, 5).unwrap(),
        &bob.store().groups().unwrap(),
    );
    let conv = model
        .get(&format!("#{gid}"))
        .expect("the group's conversation");
    assert_eq!(conv.title, "#trio");
    let want = format!("file notes.txt (100000 bytes) saved to {}", path.display());
    assert!(
        conv.lines.iter().any(|l| l.text == want
            && matches!(&l.kind, fastchat_client::ui::model::LineKind::Message { from, .. } if from == "alice")),
        "{:#?}",
        conv.lines
    );
    assert!(
        model.get("#trio").is_none(),
        "no conversation made up from the name"
    );
}

#[test]
fn a_tampered_chunk_is_detected_and_the_file_is_not_saved() {
    let net = TestNet::start();
    register(&net, &["alice", "bob"]);
    let src = random_file(&net.home.join("src"), "contract.pdf", 200_000);
    let mut alice = Chat::login(&net.opts("alice"), false).unwrap();
    alice.send_file(Some("bob"), None, &src, None).unwrap();
    // Alter one character of one stored chunk.
    let mut db = postgres::Client::connect(&net.db_url, postgres::NoTls).unwrap();
    db.execute(
        "UPDATE file_chunks SET data = overlay(data placing
             (CASE WHEN substr(data, 60, 1) = 'A' THEN 'B' ELSE 'A' END) from 60 for 1)
         WHERE idx = 3",
        &[],
    )
    .unwrap();
    let mut bob = net.login("bob");
    let got = receive_files(&mut bob, 1);
    match &got[0] {
        Event::Undecryptable { why, .. } => assert!(why.contains("rejected"), "{why}"),
        other => panic!("the file must be rejected, got {other:?}"),
    }
    let downloads = net.opts("bob").data_dir.join("bob/downloads");
    let saved: Vec<_> = std::fs::read_dir(&downloads)
        .map(|rd| rd.flatten().filter(|e| e.path().is_file()).collect())
        .unwrap_or_default();
    assert!(saved.is_empty(), "nothing saved: {saved:?}");
    let partial: Vec<_> = std::fs::read_dir(downloads.join(".partial"))
        .map(|rd| rd.flatten().collect())
        .unwrap_or_default();
    assert!(partial.is_empty(), "no partial file left");
}

#[test]
fn hostile_names_are_saved_inside_the_downloads_directory() {
    let net = TestNet::start();
    register(&net, &["alice", "bob"]);
    let src = random_file(&net.home.join("src"), "x", 1000);
    let mut alice = Chat::login(&net.opts("alice"), false).unwrap();
    for name in ["../../etc/passwd", "/etc/passwd", "..", "../../etc/passwd"] {
        alice
            .send_file(Some("bob"), None, &src, Some(name))
            .unwrap();
    }
    // Through the CLI, with a downloads directory of its own and JSON output.
    let downloads = net.home.join("dl");
    let (ok, out, err) = net.cli(
        "bob",
        &["read", "--json", "--downloads", downloads.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    let files: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("file").is_some())
        .collect();
    assert_eq!(files.len(), 4, "{out}");
    let mut paths: Vec<PathBuf> = files
        .iter()
        .map(|f| PathBuf::from(f["file"]["path"].as_str().unwrap()))
        .collect();
    for (f, p) in files.iter().zip(&paths) {
        assert!(p.starts_with(&downloads), "{p:?} is inside {downloads:?}");
        assert_eq!(p.parent().unwrap(), downloads, "directly inside: {p:?}");
        assert_eq!(f["file"]["size"], 1000);
        assert_eq!(f["file"]["sha256"].as_str().unwrap().len(), 64);
        assert_eq!(std::fs::read(p).unwrap(), std::fs::read(&src).unwrap());
    }
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), 4, "nothing overwritten: {paths:?}");
    assert!(downloads.join("passwd").exists() && downloads.join("passwd (1)").exists());
    assert!(!net.home.join("etc/passwd").exists());
}

#[test]
fn an_upload_broken_by_a_relay_kill_completes_after_failover() {
    let mut net = TestNet::with(Settings {
        relays: 2,
        ..Settings::default()
    });
    register(&net, &["alice", "bob"]);
    let src = random_file(&net.home.join("src"), "big.bin", 8 * 1024 * 1024);
    let mut alice = Chat::login(&net.opts("alice"), false).unwrap();
    let alice_relay = net.relay_index(alice.relay_addr());
    let db_url = net.db_url.clone();
    let sent = std::thread::scope(|s| {
        let upload = s.spawn(|| alice.send_file(Some("bob"), None, &src, None));
        // Kill alice's relay once part of the file is stored.
        let mut db = postgres::Client::connect(&db_url, postgres::NoTls).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let stored: i64 = db
                .query_one("SELECT count(*) FROM file_chunks", &[])
                .unwrap()
                .get(0);
            if stored >= 40 {
                break;
            }
            assert!(Instant::now() < deadline, "the upload makes progress");
            std::thread::sleep(Duration::from_millis(5));
        }
        net.kill_relay(alice_relay);
        upload.join().unwrap()
    })
    .unwrap();
    assert_eq!(sent.chunks, 256);
    assert!(
        sent.chunks_uploaded <= sent.chunks + 16,
        "only chunks not yet acknowledged are sent again: {} for {}",
        sent.chunks_uploaded,
        sent.chunks
    );
    assert!(alice.failovers() >= 1);
    let mut bob = accepting(&net, "bob");
    let got = receive_files(&mut bob, 1);
    assert_eq!(
        std::fs::read(&file_of(&got[0]).path).unwrap(),
        std::fs::read(&src).unwrap()
    );
}

#[test]
fn a_download_broken_by_a_relay_kill_resumes_after_failover() {
    let mut net = TestNet::with(Settings {
        relays: 2,
        ..Settings::default()
    });
    register(&net, &["alice", "bob"]);
    let src = random_file(&net.home.join("src"), "movie.bin", 8 * 1024 * 1024);
    let mut alice = Chat::login(&net.opts("alice"), false).unwrap();
    let sent = alice.send_file(Some("bob"), None, &src, None).unwrap();
    let mut bob = accepting(&net, "bob");
    let bob_relay = net.relay_index(bob.relay_addr());
    let partial = net
        .opts("bob")
        .data_dir
        .join(format!("bob/downloads/.partial/{}.part", sent.file_id));
    let got = std::thread::scope(|s| {
        let download = s.spawn(|| receive_files(&mut bob, 1));
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::fs::metadata(&partial).map_or(0, |m| m.len()) < 1024 * 1024 {
            assert!(Instant::now() < deadline, "the download makes progress");
            std::thread::sleep(Duration::from_millis(2));
        }
        net.kill_relay(bob_relay);
        download.join().unwrap()
    });
    assert_eq!(
        std::fs::read(&file_of(&got[0]).path).unwrap(),
        std::fs::read(&src).unwrap()
    );
    assert!(
        bob.failovers() >= 1,
        "bob's session failed over mid-download"
    );
}

#[test]
fn texts_are_shown_while_a_large_file_is_still_downloading() {
    let net = TestNet::start();
    register(&net, &["alice", "bob"]);
    let src = random_file(&net.home.join("src"), "large.bin", 8 * 1024 * 1024);
    let mut alice = Chat::login(&net.opts("alice"), false).unwrap();
    let mut bob = accepting(&net, "bob");
    alice.send_file(Some("bob"), None, &src, None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut order = Vec::new();
    let mut sent_text = false;
    while !order.iter().any(|e: &String| e == "file") {
        assert!(Instant::now() < deadline, "{order:?}");
        for e in bob
            .receive(Instant::now() + Duration::from_millis(50))
            .unwrap()
        {
            match e {
                Event::Message(m) => order.push(m.text),
                Event::File(_) => order.push("file".into()),
                _ => {}
            }
        }
        // Once bob is downloading, alice writes.
        if !sent_text && bob.downloads_in_progress() > 0 {
            alice.send_text("bob", "while the file moves").unwrap();
            sent_text = true;
        }
    }
    assert!(sent_text);
    assert_eq!(
        order,
        vec!["while the file moves".to_string(), "file".to_string()],
        "the text is shown before the file has finished"
    );
}

#[test]
fn an_empty_file_arrives_empty() {
    let net = TestNet::start();
    register(&net, &["alice", "bob"]);
    let src = random_file(&net.home.join("src"), "empty.txt", 0);
    let mut alice = Chat::login(&net.opts("alice"), false).unwrap();
    let sent = alice.send_file(Some("bob"), None, &src, None).unwrap();
    assert_eq!(sent.size, 0);
    let mut bob = net.login("bob");
    let got = receive_files(&mut bob, 1);
    assert_eq!(got.len(), 1, "{got:?}");
    let f = file_of(&got[0]);
    assert_eq!(f.size, 0);
    assert_eq!(std::fs::read(&f.path).unwrap(), Vec::<u8>::new());
}

#[test]
fn files_from_strangers_wait_for_a_choice() {
    let net = TestNet::start();
    register(&net, &["mallory", "bob", "alice"]);
    let big = random_file(&net.home.join("src"), "big.bin", 2 * 1024 * 1024);
    let small = random_file(&net.home.join("src"), "small.bin", 100_000);
    let mut mallory = Chat::login(&net.opts("mallory"), false).unwrap();
    mallory.send_file(Some("bob"), None, &big, None).unwrap();
    mallory.send_file(Some("bob"), None, &small, None).unwrap();
    let downloads = net.opts("bob").data_dir.join("bob/downloads");
    let saved = |name: &str| downloads.join(name).exists();

    // `read`: a stranger's small file downloads, the large one is held and listed.
    let (ok, out, err) = net.cli("bob", &["read"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("mallory sent a file: small.bin"), "{out}");
    assert!(
        err.contains(
            "mallory (someone you never wrote to) sent a file, held: big.bin (2097152 bytes)"
        ) && err.contains("--accept-files-from-strangers"),
        "{err}"
    );
    assert!(saved("small.bin") && !saved("big.bin"));
    // Still held (and listed) at the next `read`, in JSON too.
    let (ok, out, _) = net.cli("bob", &["read", "--json"]);
    let held: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(ok && held["held_file"]["name"] == "big.bin", "{out}");

    // Someone bob wrote to is no stranger.
    let (ok, _, err) = net.cli("bob", &["send", "--to", "alice", "hi"]);
    assert!(ok, "{err}");
    let mut alice = Chat::login(&net.opts("alice"), false).unwrap();
    let from_alice = random_file(&net.home.join("src"), "from-alice.bin", 2 * 1024 * 1024);
    alice
        .send_file(Some("bob"), None, &from_alice, None)
        .unwrap();
    let (ok, out, err) = net.cli("bob", &["read"]);
    assert!(
        ok && out.contains("alice sent a file: from-alice.bin"),
        "{out}{err}"
    );

    // The flag downloads what was held, several at once.
    for k in 0..6 {
        mallory
            .send_file(Some("bob"), None, &big, Some(&format!("more{k}.bin")))
            .unwrap();
    }
    let (ok, out, err) = net.cli("bob", &["read", "--accept-files-from-strangers"]);
    assert!(
        ok && out.contains("mallory sent a file: big.bin"),
        "{out}{err}"
    );
    for name in ["big.bin", "more0.bin", "more5.bin"] {
        assert_eq!(
            std::fs::read(downloads.join(name)).unwrap(),
            std::fs::read(&big).unwrap(),
            "{name}: {out}{err}"
        );
    }

    // Asking for every file (as the terminal UI does): held, then refused; the relay
    // lets go of it.
    let sent = mallory
        .send_file(Some("bob"), None, &small, Some("again.bin"))
        .unwrap();
    let mut bob = net.login("bob");
    bob.set_stranger_files(StrangerFiles::Ask);
    let deadline = Instant::now() + Duration::from_secs(30);
    let held = loop {
        assert!(Instant::now() < deadline, "no held file");
        let events = bob
            .receive(Instant::now() + Duration::from_millis(200))
            .unwrap();
        if let Some(Event::FileHeld(h)) =
            events.into_iter().find(|e| matches!(e, Event::FileHeld(_)))
        {
            break h;
        }
    };
    assert_eq!(
        (held.file_id, held.name.as_str()),
        (sent.file_id, "again.bin")
    );
    assert_eq!(bob.held_files().unwrap(), vec![held.clone()]);
    assert!(bob.reject_file(held.file_id).unwrap());
    assert!(!bob.reject_file(held.file_id).unwrap(), "refused once");
    assert!(bob.held_files().unwrap().is_empty());
    let mut db = postgres::Client::connect(&net.db_url, postgres::NoTls).unwrap();
    eventually("the refused file left stored", 0, || {
        db.query_one("SELECT count(*) FROM files WHERE id = $1", &[&held.file_id])
            .unwrap()
            .get::<_, i64>(0)
    });
    assert!(!saved("again.bin"));
}
