//! Direct messages end to end: real servers, real PostgreSQL, the real client.

mod harness;

use fastchat_client::chat::{Chat, Event};
use fastchat_client::connect::{AuthLink, RelayLink};
use fastchat_client::error::ClientError;
use fastchat_common::proto::ErrorCode;
use harness::{eventually, receive_n, Settings, TestNet, PASSWORD};
use std::time::Duration;

fn code_of(e: ClientError) -> ErrorCode {
    match e {
        ClientError::Refused { code, .. } => code,
        other => panic!("expected a refusal, got {other}"),
    }
}

#[test]
fn offline_message_is_read_once_through_the_cli() {
    let net = TestNet::start();
    let (ok, _, err) = net.cli("alice", &["register"]);
    assert!(ok, "register alice: {err}");
    let (ok, _, err) = net.cli("bob", &["register"]);
    assert!(ok, "register bob: {err}");

    let (ok, _, err) = net.cli("alice", &["send", "--to", "bob", "hello", "bob"]);
    assert!(ok, "send: {err}");
    assert_eq!(
        net.stored_messages(),
        2,
        "key offer and text are stored for bob"
    );

    let (ok, out, err) = net.cli("bob", &["read", "--json"]);
    assert!(ok, "read: {err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("read --json prints JSON lines"))
        .collect();
    assert_eq!(lines.len(), 1, "exactly one message: {out}");
    assert_eq!(lines[0]["from"], "alice");
    assert_eq!(lines[0]["text"], "hello bob");
    assert!(lines[0]["group"].is_null());
    assert!(lines[0]["msg_id"].is_i64());
    assert!(lines[0]["ts"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        net.stored_messages(),
        0,
        "acknowledged messages are deleted"
    );

    let (ok, out, err) = net.cli("bob", &["read", "--json"]);
    assert!(ok, "second read: {err}");
    assert_eq!(out, "", "nothing new on a second read");

    let (ok, out, _) = net.cli("alice", &["read"]);
    assert!(ok);
    assert_eq!(out, "");
}

#[test]
fn online_messages_are_pushed_in_order() {
    let net = TestNet::start();
    net.register("alice");
    net.register("bob");
    let mut bob = net.login("bob");
    // Drain the (empty) backlog so bob is live.
    let events = bob
        .receive(std::time::Instant::now() + Duration::from_secs(10))
        .unwrap();
    assert_eq!(events, vec![Event::Synced]);

    let sender = std::thread::spawn({
        let opts = net.opts("alice");
        move || {
            let mut alice = Chat::login(&opts, false).unwrap();
            for i in 0..200 {
                alice.send_text("bob", &format!("message {i}")).unwrap();
            }
        }
    });
    let got = receive_n(&mut bob, 200, Duration::from_secs(60));
    sender.join().unwrap();
    let texts: Vec<String> = got.iter().map(|m| m.text.clone()).collect();
    let expected: Vec<String> = (0..200).map(|i| format!("message {i}")).collect();
    assert_eq!(texts, expected);
    // Acknowledged as they arrived: nothing is left once bob has them all.
    eventually("messages left stored", 0, || net.stored_messages());
}

#[test]
fn servers_only_ever_hold_ciphertext() {
    let net = TestNet::start();
    net.register("alice");
    net.register("bob");
    let marker = format!(
        "MARKER-{}",
        fastchat_common::hex::encode(&rand::random::<[u8; 8]>())
    );
    let mut alice = Chat::login(&net.opts("alice"), false).unwrap();
    alice.send_text("bob", &format!("secret {marker}")).unwrap();
    alice.send_text("bob", &marker).unwrap();
    // While stored (bob offline) and after delivery.
    let dump = net.dump_database();
    assert!(dump.contains("alice"), "the dump does show rows");
    assert!(!dump.contains(&marker), "marker found in the database");
    let mut bob = net.login("bob");
    let got = receive_n(&mut bob, 2, Duration::from_secs(10));
    assert_eq!(got[1].text, marker);
    assert!(!net.dump_database().contains(&marker));
    let logs = format!("{}\n{}", net.auth.log(), net.relay(0).log());
    assert!(logs.contains("alice"), "logs are captured");
    assert!(!logs.contains(&marker), "marker found in a server log");
    // The client's own store is encrypted too: the database, its WAL and its journal.
    let dir = net.opts("bob").data_dir.join("bob");
    let mut checked = 0;
    for name in [
        "store.db",
        "store.db-wal",
        "store.db-shm",
        "store.db-journal",
    ] {
        if let Ok(bytes) = std::fs::read(dir.join(name)) {
            checked += 1;
            let found = bytes.windows(marker.len()).any(|w| w == marker.as_bytes());
            assert!(!found, "marker found in {name}");
        }
    }
    assert!(checked >= 2, "the store and its WAL were read");
}

#[test]
fn bad_credentials_and_tickets_are_refused() {
    let net = TestNet::start();
    net.register("alice");
    net.register("bob");
    let dir = net.opts("alice").data_dir;

    let mut auth = AuthLink::connect(&net.auth_addr, &dir).unwrap();
    assert_eq!(
        code_of(auth.login("alice", "wrong password").unwrap_err()),
        ErrorCode::BadCredentials
    );
    assert_eq!(
        code_of(auth.login("nobody", PASSWORD).unwrap_err()),
        ErrorCode::BadCredentials
    );

    // A ticket works once, for its own user only.
    let redirect = auth.login("alice", PASSWORD).unwrap();
    let mut for_bob = redirect.clone();
    for_bob.user = "bob".into();
    assert_eq!(
        code_of(RelayLink::connect(&for_bob, true).err().unwrap()),
        ErrorCode::BadTicket
    );
    assert_eq!(
        code_of(RelayLink::connect(&redirect, true).err().unwrap()),
        ErrorCode::BadTicket,
        "presenting a ticket for another user used it up"
    );
    let redirect = auth.login("alice", PASSWORD).unwrap();
    let session = RelayLink::connect(&redirect, true).unwrap();
    assert_eq!(session.user, "alice");
    assert_eq!(
        code_of(RelayLink::connect(&redirect, true).err().unwrap()),
        ErrorCode::BadTicket,
        "a ticket is single-use"
    );
    let mut forged = auth.login("alice", PASSWORD).unwrap();
    forged.ticket = "00".repeat(16);
    assert_eq!(
        code_of(RelayLink::connect(&forged, true).err().unwrap()),
        ErrorCode::BadTicket
    );
}

#[test]
fn expired_tickets_are_refused() {
    let net = TestNet::with(Settings {
        ticket_ttl_secs: 3,
        ..Settings::default()
    });
    net.register("alice");
    let mut auth = AuthLink::connect(&net.auth_addr, &net.opts("alice").data_dir).unwrap();
    let redirect = auth.login("alice", PASSWORD).unwrap();
    std::thread::sleep(Duration::from_millis(3300));
    assert_eq!(
        code_of(RelayLink::connect(&redirect, true).err().unwrap()),
        ErrorCode::BadTicket
    );
    let fresh = auth.login("alice", PASSWORD).unwrap();
    RelayLink::connect(&fresh, true).unwrap();
}

#[test]
fn failed_logins_are_rate_limited() {
    let net = TestNet::with(Settings {
        login_failures_per_user: 3,
        ..Settings::default()
    });
    net.register("alice");
    let mut auth = AuthLink::connect(&net.auth_addr, &net.opts("alice").data_dir).unwrap();
    for _ in 0..3 {
        assert_eq!(
            code_of(auth.login("alice", "wrong password").unwrap_err()),
            ErrorCode::BadCredentials
        );
    }
    match auth.login("alice", PASSWORD).unwrap_err() {
        ClientError::Refused {
            code: ErrorCode::RateLimited,
            retry_after_ms,
            ..
        } => assert!(retry_after_ms.unwrap() > 0),
        other => panic!("expected rate limiting, got {other}"),
    }
}

#[test]
fn message_survives_relay_sigkill_after_sent() {
    let mut net = TestNet::start();
    net.register("alice");
    net.register("bob");
    let mut alice = Chat::login(&net.opts("alice"), false).unwrap();
    let sent = alice.send_text("bob", "kept through a crash").unwrap();
    alice.close();
    net.kill_and_restart_relay();
    let mut bob = net.login("bob");
    let got = receive_n(&mut bob, 1, Duration::from_secs(10));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].text, "kept through a crash");
    assert_eq!(got[0].msg_id, sent.msg_id);
}

#[test]
fn unacknowledged_messages_are_redelivered_and_shown_once() {
    let net = TestNet::start();
    net.register("alice");
    net.register("bob");
    let mut alice = Chat::login(&net.opts("alice"), false).unwrap();
    alice.send_text("bob", "one").unwrap();
    // bob receives over a raw session and disconnects without acknowledging.
    let mut auth = AuthLink::connect(&net.auth_addr, &net.opts("bob").data_dir).unwrap();
    let redirect = auth.login("bob", PASSWORD).unwrap();
    let mut raw = RelayLink::connect(&redirect, true).unwrap();
    let mut msgs = 0;
    while let Some(f) = raw
        .recv(Some(std::time::Instant::now() + Duration::from_secs(5)))
        .unwrap()
    {
        match f {
            fastchat_common::proto::RelayToClient::Msg(_) => msgs += 1,
            fastchat_common::proto::RelayToClient::Synced {} => break,
            _ => {}
        }
    }
    assert_eq!(msgs, 2, "offer and text delivered");
    raw.close();
    assert_eq!(net.stored_messages(), 2, "not acknowledged, still stored");
    let mut bob = net.login("bob");
    let got = receive_n(&mut bob, 1, Duration::from_secs(10));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].text, "one");
}

#[test]
fn unknown_recipient_and_wrong_local_password_fail_clearly() {
    let net = TestNet::start();
    net.register("alice");
    let (ok, _, err) = net.cli("alice", &["send", "--to", "nobody", "hi"]);
    assert!(!ok);
    assert!(err.contains("no user called nobody"), "{err}");
    let mut opts = net.opts("alice");
    opts.password = "not the password".into();
    assert!(matches!(
        Chat::login(&opts, true).err().unwrap(),
        ClientError::Store(fastchat_client::store::StoreError::WrongPassword)
    ));
    let (ok, _, err) = net.cli("carol", &["send", "--to", "alice", "hi"]);
    assert!(!ok);
    assert!(err.contains("no account for carol"), "{err}");
}

#[test]
fn safety_numbers_match_and_key_changes_are_refused() {
    let net = TestNet::start();
    net.register("alice");
    net.register("bob");
    let (ok, a, err) = net.cli("alice", &["verify", "bob"]);
    assert!(ok, "{err}");
    let (ok, b, err) = net.cli("bob", &["verify", "alice"]);
    assert!(ok, "{err}");
    let number = |s: &str| -> String {
        s.lines()
            .filter(|l| l.starts_with("  "))
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(number(&a).split_whitespace().count(), 12);
    assert_eq!(number(&a), number(&b));

    // The server starts serving another key for bob: alice refuses to send.
    let mut db = postgres::Client::connect(&net.db_url, postgres::NoTls).unwrap();
    let other = fastchat_client::e2e::Identity::generate().unwrap();
    db.execute(
        "UPDATE users SET pubkey = $1 WHERE name = 'bob'",
        &[&other.public_pem()],
    )
    .unwrap();
    let (ok, _, err) = net.cli("alice", &["send", "--to", "bob", "hi"]);
    assert!(!ok);
    assert!(err.contains("DIFFERENT public key for bob"), "{err}");
    assert_eq!(net.stored_messages(), 0, "nothing was sent");
}

#[test]
fn changed_auth_server_key_is_refused() {
    let net = TestNet::start();
    net.register("alice");
    let dir = net.opts("alice").data_dir;
    let pins = dir.join("known_servers");
    let text = std::fs::read_to_string(&pins).unwrap();
    let addr = text.split_whitespace().next().unwrap().to_string();
    std::fs::write(&pins, format!("{addr} {}\n", "ab".repeat(32))).unwrap();
    let (ok, _, err) = net.cli("alice", &["read"]);
    assert!(!ok);
    assert!(err.contains("different key"), "{err}");
    assert!(
        err.contains("known_servers"),
        "names the file to edit: {err}"
    );
}

#[test]
fn send_fails_clearly_when_the_server_is_down() {
    let net = TestNet::start();
    net.register("alice");
    let dead = format!("127.0.0.1:{}", harness::free_port());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fastchat"))
        .args(["--server", &dead, "--user", "alice", "--data-dir"])
        .arg(&net.opts("alice").data_dir)
        .args(["send", "--to", "alice", "hi"])
        .env("FASTCHAT_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the server"), "{err}");
}

#[test]
fn relay_stops_gracefully_on_sigterm() {
    let mut net = TestNet::start();
    net.register("alice");
    net.register("bob");
    let mut bob = net.login("bob");
    // `synced` follows the presence commit.
    assert_eq!(
        bob.receive(std::time::Instant::now() + Duration::from_secs(10))
            .unwrap(),
        vec![Event::Synced]
    );
    let mut alice = Chat::login(&net.opts("alice"), false).unwrap();
    alice.send_text("bob", "before the stop").unwrap();
    let mut db = postgres::Client::connect(&net.db_url, postgres::NoTls).unwrap();
    let present: i64 = db
        .query_one("SELECT count(*) FROM presence", &[])
        .unwrap()
        .get(0);
    assert_eq!(present, 2, "alice and bob are present on the relay");
    let status = net
        .relay_mut(0)
        .terminate(Duration::from_secs(15))
        .expect("the relay exits after SIGTERM");
    assert!(status.success(), "clean exit: {status:?}");
    let present: i64 = db
        .query_one("SELECT count(*) FROM presence", &[])
        .unwrap()
        .get(0);
    assert_eq!(present, 0, "a stopping relay clears its presence rows");
}

/// A message from a peer whose key the server changed does not open; the client then
/// compares the server's key with the pin, says so in the event, and remembers it
/// across a restart (the terminal UI raises its warning from that at start).
#[test]
fn an_unopenable_message_from_a_changed_key_is_flagged_and_remembered() {
    use base64::Engine;
    let net = TestNet::start();
    net.register("alice");
    net.register("bob");
    let mut alice = net.login("alice");
    alice.send_text("bob", "hi bob").unwrap();
    assert!(alice.changed_keys().is_empty());

    // Bob "reinstalls": a new identity, which the server now serves for him.
    let other = fastchat_client::e2e::Identity::generate().unwrap();
    let mut db = postgres::Client::connect(&net.db_url, postgres::NoTls).unwrap();
    db.execute(
        "UPDATE users SET pubkey = $1 WHERE name = 'bob'",
        &[&other.public_pem()],
    )
    .unwrap();
    let mut new_bob = net.opts("bob");
    new_bob.data_dir = net.home.join("bob-reinstalled");
    std::fs::create_dir_all(&new_bob.data_dir).unwrap();
    fastchat_client::store::Store::create(
        &new_bob.data_dir,
        "bob",
        &new_bob.password,
        &base64::engine::general_purpose::STANDARD.encode(other.to_pkcs8_der()),
    )
    .unwrap();
    let mut bob = Chat::login(&new_bob, false).unwrap();
    bob.send_text("alice", "it is me, new phone").unwrap();
    bob.close();

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut flagged = false;
    while !flagged && std::time::Instant::now() < deadline {
        for e in alice.receive(deadline).unwrap() {
            match e {
                Event::Undecryptable {
                    from, key_changed, ..
                } => {
                    assert_eq!(from, "bob");
                    flagged |= key_changed;
                }
                Event::Message(m) => panic!("opened with a changed key: {m:?}"),
                _ => {}
            }
        }
    }
    assert!(flagged, "the failure names the key change");
    assert_eq!(alice.changed_keys(), ["bob"]);
    alice.close();
    let mut alice = Chat::login(&net.opts("alice"), false).unwrap();
    assert_eq!(alice.changed_keys(), ["bob"], "remembered across a restart");
    // Accepting the new key clears it.
    let fastchat_client::chat::KeyStatus::Changed { server_pem } =
        alice.check_peer_key("bob").unwrap()
    else {
        panic!("the key is still changed");
    };
    alice.accept_new_key("bob", server_pem).unwrap();
    assert!(alice.changed_keys().is_empty());
}
