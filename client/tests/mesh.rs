//! Many relays: forwarding over the mesh, balancing, failover, resumption, stale
//! presence. Real servers, real PostgreSQL, the real client library.

mod harness;

use fastchat_client::chat::{Chat, Event};
use fastchat_client::connect::{AuthLink, RelayLink};
use fastchat_client::error::ClientError;
use fastchat_common::proto::ErrorCode;
use harness::{
    chat_through_a_fault, eventually, receive_n, Settings, TestNet, MESH_LINK_UP, PASSWORD,
};
use std::time::{Duration, Instant};

fn three_relays() -> TestNet {
    TestNet::with(Settings {
        relays: 3,
        ..Settings::default()
    })
}

fn name(i: usize) -> String {
    format!("user{i:02}")
}

/// Registers users in parallel (RSA key generation dominates).
fn register_all(net: &TestNet, users: &[String]) {
    std::thread::scope(|s| {
        for chunk in users.chunks(users.len().div_ceil(4)) {
            s.spawn(move || {
                for u in chunk {
                    net.register(u);
                }
            });
        }
    });
}

/// Logs users in one after another; returns their sessions.
fn login_all(net: &TestNet, users: &[String]) -> Vec<Chat> {
    users.iter().map(|u| net.login(u)).collect()
}

fn relay_counts(net: &TestNet, chats: &[Chat]) -> Vec<usize> {
    let mut counts = vec![0; net.relays.len()];
    for c in chats {
        counts[net.relay_index(c.relay_addr())] += 1;
    }
    counts
}

#[test]
fn all_pairs_across_three_relays_arrive_once_and_logins_balance() {
    let net = three_relays();
    let users: Vec<String> = (0..30).map(name).collect();
    register_all(&net, &users);
    let chats = login_all(&net, &users);

    // Balancing: 30 logins one after another over 3 relays.
    let counts = relay_counts(&net, &chats);
    let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
    assert!(max - min <= 1, "logins spread evenly: {counts:?}");

    let received: Vec<Vec<(String, String)>> = std::thread::scope(|s| {
        let handles: Vec<_> = chats
            .into_iter()
            .enumerate()
            .map(|(i, mut chat)| {
                let users = &users;
                s.spawn(move || {
                    for (j, peer) in users.iter().enumerate() {
                        if j != i {
                            chat.send_text(peer, &format!("{} to {peer}", users[i]))
                                .unwrap();
                        }
                    }
                    receive_n(&mut chat, users.len() - 1, Duration::from_secs(120))
                        .into_iter()
                        .map(|m| (m.from, m.text))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut total = 0;
    for (i, got) in received.iter().enumerate() {
        let mut from: Vec<&str> = got.iter().map(|(f, _)| f.as_str()).collect();
        from.sort();
        let expected: Vec<&str> = users
            .iter()
            .filter(|u| **u != users[i])
            .map(String::as_str)
            .collect();
        assert_eq!(
            from, expected,
            "{} got one message from every other user",
            users[i]
        );
        for (f, text) in got {
            assert_eq!(text, &format!("{f} to {}", users[i]));
        }
        total += got.len();
    }
    assert_eq!(total, 870);
    let forwarded: u64 = (0..3)
        .map(|i| net.relay_stats(i)["forwarded"].as_u64().unwrap())
        .sum();
    assert!(forwarded > 0, "messages crossed the mesh");
    // Everything was acknowledged, wherever it was stored.
    eventually("messages left stored", 0, || net.stored_messages());
}

#[test]
fn messages_flow_through_a_relay_crash_without_loss_or_duplicates() {
    let mut net = three_relays();
    let users: Vec<String> = (0..9).map(name).collect();
    register_all(&net, &users);
    let chats = login_all(&net, &users);
    let counts = relay_counts(&net, &chats);
    assert_eq!(counts, vec![3, 3, 3]);

    // Kill relay-2 once traffic is flowing.
    let run = chat_through_a_fault(chats, &users, 25, || net.kill_relay(1));
    assert!(
        run.failovers.iter().filter(|(_, f)| *f > 0).count() >= 3,
        "the killed relay's clients failed over: {:?}",
        run.failovers
    );
    run.assert_each_shown_once();
}

#[test]
fn sessions_fail_over_straight_to_another_relay_while_the_auth_server_is_down() {
    let mut net = TestNet::with(Settings {
        relays: 2,
        ..Settings::default()
    });
    let users: Vec<String> = (0..4).map(name).collect();
    register_all(&net, &users);
    let chats = login_all(&net, &users);
    assert_eq!(relay_counts(&net, &chats), vec![2, 2]);

    // With the auth server gone, the only way on is the credential presented to the
    // other relay the auth server listed at login. (The fault comes after 40 sends of
    // 120, so every session still has sends to make through it.)
    let run = chat_through_a_fault(chats, &users, 30, || {
        net.auth.kill();
        net.kill_relay(0);
    });
    let failed_over: Vec<&(String, u32)> = run.failovers.iter().filter(|(_, f)| *f > 0).collect();
    assert!(
        failed_over.len() >= 2,
        "the killed relay's clients failed over: {:?}",
        run.failovers
    );
    run.assert_each_shown_once();
    assert!(
        net.relay(1).log().matches("connected from").count() >= 4,
        "relay 2 took the failed-over sessions"
    );
}

#[test]
fn a_failover_with_a_revoked_credential_logs_in_with_the_password() {
    let mut net = three_relays();
    net.register("alice");
    net.register("bob");
    let mut alice = net.login("alice");
    let mut bob = net.login("bob");
    // Revoke every credential of alice's (the password stays the same).
    let mut db = postgres::Client::connect(&net.db_url, postgres::NoTls).unwrap();
    db.execute("DELETE FROM resume_credentials", &[]).unwrap();
    let before = net.auth_stats();
    net.kill_relay(net.relay_index(alice.relay_addr()));
    alice
        .send_text("bob", "after the failover")
        .expect("the send fails over");
    assert_eq!(alice.failovers(), 1);
    // One relay refused the credential; alice forgot it rather than trying another,
    // and logged in with her password.
    let refusals: usize = (0..3)
        .filter(|&i| net.relays[i].is_some())
        .map(|i| {
            net.relay(i)
                .log()
                .matches("refused a resumption credential")
                .count()
        })
        .sum();
    assert_eq!(refusals, 1);
    let after = net.auth_stats();
    assert_eq!(
        after["logins"].as_u64().unwrap(),
        before["logins"].as_u64().unwrap() + 1
    );
    let got = receive_n(&mut bob, 1, Duration::from_secs(30));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].text, "after the failover");
}

#[test]
fn a_restarted_relay_rejoins_the_mesh_and_gets_clients() {
    let mut net = three_relays();
    let users: Vec<String> = (0..4).map(name).collect();
    register_all(&net, &users);
    net.kill_relay(1);
    net.restart_relay(1);
    net.relay(1)
        .wait_for_count(MESH_LINK_UP, 2, Duration::from_secs(30));
    // The restarted relay is the least loaded: with one client on each of the others,
    // the third login lands on it.
    let chats = login_all(&net, &users[..3]);
    let on_restarted: Vec<&Chat> = chats
        .iter()
        .filter(|c| net.relay_index(c.relay_addr()) == 1)
        .collect();
    assert_eq!(on_restarted.len(), 1, "{:?}", relay_counts(&net, &chats));
    let target = on_restarted[0].user().to_string();
    let mut chats = chats;
    let idx = chats.iter().position(|c| c.user() == target).unwrap();
    let mut receiver = chats.remove(idx);
    assert_eq!(
        receiver
            .receive(Instant::now() + Duration::from_secs(10))
            .unwrap(),
        vec![Event::Synced]
    );
    for sender in chats.iter_mut() {
        sender.send_text(&target, "welcome back").unwrap();
    }
    let got = receive_n(&mut receiver, 2, Duration::from_secs(20));
    assert_eq!(got.len(), 2);
    assert!(
        net.relay_stats(1)["arrived"].as_u64().unwrap() >= 1,
        "forwarded to the restarted relay"
    );
}

#[test]
fn stale_presence_does_not_lose_messages() {
    let mut net = TestNet::with(Settings {
        relays: 2,
        ..Settings::default()
    });
    register_all(&net, &["alice".into(), "bob".into()]);
    // bob lands on relay-1 (first login), then relay-1 dies without cleaning up.
    let mut bob = net.login("bob");
    assert_eq!(net.relay_index(bob.relay_addr()), 0);
    // `synced` follows the presence commit.
    assert_eq!(
        bob.receive(Instant::now() + Duration::from_secs(10))
            .unwrap(),
        vec![Event::Synced]
    );
    net.kill_relay(0);
    drop(bob);
    let mut db = postgres::Client::connect(&net.db_url, postgres::NoTls).unwrap();
    let stale: i64 = db
        .query_one(
            "SELECT count(*) FROM presence WHERE relay_id = 'relay-1'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(stale, 1, "relay-1 left its presence row behind");
    // A message while bob is nowhere, then bob on relay-2 and a live one.
    let mut alice = Chat::login(&net.opts("alice"), false).unwrap();
    alice.send_text("bob", "while away").unwrap();
    let mut bob = net.login("bob");
    assert_eq!(net.relay_index(bob.relay_addr()), 1);
    let got = receive_n(&mut bob, 1, Duration::from_secs(10));
    assert_eq!(got[0].text, "while away");
    alice.send_text("bob", "live").unwrap();
    let got = receive_n(&mut bob, 1, Duration::from_secs(10));
    assert_eq!(got.len(), 1, "delivered despite the stale presence row");
    assert_eq!(got[0].text, "live");
    // A restarted relay-1 clears its stale rows.
    net.restart_relay(0);
    let stale: i64 = db
        .query_one(
            "SELECT count(*) FROM presence WHERE relay_id = 'relay-1'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(stale, 0);
}

fn code_of(e: ClientError) -> ErrorCode {
    match e {
        ClientError::Refused { code, .. } => code,
        other => panic!("expected a refusal, got {other}"),
    }
}

#[test]
fn resumption_credentials_log_in_without_the_password() {
    let net = TestNet::with(Settings {
        relays: 2,
        ..Settings::default()
    });
    net.register("alice");
    let dir = net.opts("alice").data_dir;
    let mut auth = AuthLink::connect(&net.auth_addr, &dir).unwrap();
    let first = auth.login("alice", PASSWORD).unwrap();
    let (credential, expires) = first
        .credential
        .clone()
        .expect("a password login hands out a credential");
    assert_eq!(credential.len(), 64);
    assert!(expires > fastchat_common::time::now_ms());
    let before = net.auth_stats();

    let again = auth.resume("alice", &credential).unwrap();
    assert!(
        again.credential.is_none(),
        "a resumption keeps the credential it used"
    );
    let session = RelayLink::connect(&again, true).unwrap();
    assert_eq!(session.user, "alice");
    let after = net.auth_stats();
    assert_eq!(after["resumes"], before["resumes"].as_u64().unwrap() + 1);
    assert_eq!(
        after["logins"], before["logins"],
        "no password check (argon2) for a resume"
    );

    // Bound to the user, unguessable, revocable.
    net.register("bob");
    assert_eq!(
        code_of(auth.resume("bob", &credential).unwrap_err()),
        ErrorCode::BadCredentials
    );
    assert_eq!(
        code_of(auth.resume("alice", &"0".repeat(64)).unwrap_err()),
        ErrorCode::BadCredentials
    );
    auth.logout("alice", &credential).unwrap();
    assert_eq!(
        code_of(auth.resume("alice", &credential).unwrap_err()),
        ErrorCode::BadCredentials
    );
    // The password still works, and a password change revokes every credential.
    let fresh = auth.login("alice", PASSWORD).unwrap().credential.unwrap().0;
    auth.resume("alice", &fresh).unwrap();
    auth.change_password("alice", PASSWORD, "a brand new password")
        .unwrap();
    assert_eq!(
        code_of(auth.resume("alice", &fresh).unwrap_err()),
        ErrorCode::BadCredentials
    );
    assert_eq!(
        code_of(auth.login("alice", PASSWORD).unwrap_err()),
        ErrorCode::BadCredentials
    );
    auth.login("alice", "a brand new password").unwrap();
}

#[test]
fn expired_resumption_credentials_are_refused() {
    let net = TestNet::with(Settings {
        extra_auth_args: vec!["--resume-ttl-secs".into(), "1".into()],
        ..Settings::default()
    });
    net.register("alice");
    let mut auth = AuthLink::connect(&net.auth_addr, &net.opts("alice").data_dir).unwrap();
    let credential = auth.login("alice", PASSWORD).unwrap().credential.unwrap().0;
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        code_of(auth.resume("alice", &credential).unwrap_err()),
        ErrorCode::BadCredentials
    );
    auth.login("alice", PASSWORD).unwrap();
}

#[test]
fn the_cli_reuses_its_saved_login_and_logout_revokes_it() {
    let net = TestNet::start();
    let (ok, _, err) = net.cli("alice", &["register"]);
    assert!(ok, "{err}");
    let (ok, _, err) = net.cli("alice", &["read"]);
    assert!(ok, "{err}");
    let logins = net.auth_stats()["logins"].as_u64().unwrap();
    for _ in 0..3 {
        let (ok, _, err) = net.cli("alice", &["read"]);
        assert!(ok, "{err}");
    }
    let stats = net.auth_stats();
    assert_eq!(
        stats["logins"], logins,
        "later runs resume instead of checking the password"
    );
    assert!(stats["resumes"].as_u64().unwrap() >= 3);
    let (ok, out, err) = net.cli("alice", &["logout"]);
    assert!(ok, "{err}");
    assert!(out.contains("Logged out"));
    let (ok, _, err) = net.cli("alice", &["read"]);
    assert!(ok, "{err}");
    assert_eq!(
        net.auth_stats()["logins"],
        logins + 1,
        "after logout the password is checked again"
    );
}

#[test]
fn the_cli_changes_the_password_everywhere() {
    let net = TestNet::start();
    net.register("alice");
    let opts = net.opts("alice");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fastchat"))
        .args(["--server", &opts.server, "--user", "alice", "--data-dir"])
        .arg(&opts.data_dir)
        .arg("passwd")
        .env("FASTCHAT_PASSWORD", PASSWORD)
        .env("FASTCHAT_NEW_PASSWORD", "another long password")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, _, err) = net.cli("alice", &["read"]);
    assert!(!ok, "the old password no longer opens the store");
    assert!(err.contains("wrong password"), "{err}");
    let mut new_opts = opts.clone();
    new_opts.password = "another long password".into();
    Chat::login(&new_opts, true).unwrap();
}
