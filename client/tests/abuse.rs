//! Hostile clients against running servers (issue 15): each test has an attacker on
//! another loopback address (127.0.0.2, 127.0.0.3) and asserts both halves — the
//! attacker is refused or limited, and a normal user on 127.0.0.1 is still served,
//! within a generous bound (the machines are shared and noisy).

mod harness;

use fastchat_client::chat::GroupNotice;
use fastchat_client::connect::{AuthLink, RelayLink};
use fastchat_client::e2e::Identity;
use fastchat_client::error::ClientError;
use fastchat_common::link::{Link, LinkError};
use fastchat_common::proto::{AuthToClient, ClientToAuth, ClientToRelay, ErrorCode, RelayToClient};
use harness::{add_member, auth_from, auth_hello_from, Settings, TestNet, PASSWORD};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The auth server's own defaults for the limits the harness raises for other tests.
fn default_auth_limits() -> Vec<String> {
    [
        ("--registrations-per-addr-per-minute", "5"),
        ("--registrations-per-second", "10"),
        ("--password-attempts-per-addr-per-minute", "60"),
        ("--max-connections-per-addr", "32"),
    ]
    .into_iter()
    .flat_map(|(f, v)| [f.to_string(), v.to_string()])
    .collect()
}

fn with_defaults() -> TestNet {
    TestNet::with(Settings {
        extra_auth_args: default_auth_limits(),
        ..Settings::default()
    })
}

/// How long a normal password login takes, from 127.0.0.1.
fn timed_login(net: &TestNet, user: &str) -> Duration {
    let started = Instant::now();
    let mut auth = AuthLink::connect(&net.auth_addr, &net.opts(user).data_dir).unwrap();
    auth.login(user, PASSWORD).unwrap();
    started.elapsed()
}

#[test]
fn a_registration_flood_is_limited_and_others_still_log_in() {
    let net = with_defaults();
    net.register("alice");
    let pubkey = Identity::generate().unwrap().public_pem();
    let stop = Arc::new(AtomicBool::new(false));
    let (limited, answered) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    // 8 connections from 127.0.0.2, each pipelining `register alice` (a valid request
    // for a taken name) as fast as the server answers: what once queued thousands of
    // argon2 hashes on alice's worker.
    let flooders: Vec<_> = (0..8)
        .map(|_| {
            let mut link = auth_hello_from(&net, "127.0.0.2");
            let (stop, limited, answered, pubkey) = (
                stop.clone(),
                limited.clone(),
                answered.clone(),
                pubkey.clone(),
            );
            std::thread::spawn(move || {
                let mut id = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..4 {
                        id += 1;
                        link.queue(&ClientToAuth::Register {
                            id,
                            user: "alice".into(),
                            password: "a long enough password".into(),
                            pubkey: pubkey.clone(),
                        });
                    }
                    if link.flush().is_err() {
                        return;
                    }
                    for _ in 0..4 {
                        match link
                            .recv::<AuthToClient>(Some(Instant::now() + Duration::from_secs(60)))
                        {
                            Ok(Some(AuthToClient::Error(e))) => {
                                answered.fetch_add(1, Ordering::Relaxed);
                                if e.code == ErrorCode::RateLimited {
                                    limited.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Ok(Some(_)) => {
                                answered.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => return,
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let took = timed_login(&net, "alice");
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.join().unwrap();
    }
    let (limited, answered) = (
        limited.load(Ordering::Relaxed),
        answered.load(Ordering::Relaxed),
    );
    eprintln!("flood: {answered} answers, {limited} rate limited; alice's login took {took:?}");
    assert!(
        limited > 0,
        "the flood was never limited ({answered} answers)"
    );
    assert!(took < Duration::from_secs(30), "alice waited {took:?}");
}

#[test]
fn one_address_cannot_hold_every_connection_and_idle_ones_end() {
    let net = TestNet::with(Settings {
        extra_auth_args: [
            default_auth_limits(),
            vec!["--session-deadline-secs".into(), "3".into()],
        ]
        .concat(),
        ..Settings::default()
    });
    net.register("alice");
    // 32 connections past hello from 127.0.0.2 are held; the 33rd is closed at once.
    let held: Vec<Link> = (0..32)
        .map(|_| auth_hello_from(&net, "127.0.0.2"))
        .collect();
    let refused = match auth_from(&net, "127.0.0.2") {
        Err(_) => true,
        Ok(mut link) => {
            let _ = link.send(&ClientToAuth::Hello {
                version: fastchat_common::PROTOCOL_VERSION,
            });
            matches!(
                link.recv_json(Some(Instant::now() + Duration::from_secs(10))),
                Err(LinkError::Closed) | Err(LinkError::Io(_))
            )
        }
    };
    assert!(refused, "a 33rd connection from one address was accepted");
    // Another address is served meanwhile.
    assert!(timed_login(&net, "alice") < Duration::from_secs(30));
    // Held connections end at the session deadline (3 s here, plus the sweep).
    std::thread::sleep(Duration::from_secs(5));
    for mut link in held {
        match link.recv_json(Some(Instant::now() + Duration::from_secs(10))) {
            Err(LinkError::Closed) | Err(LinkError::Io(_)) => {}
            other => panic!("an idle connection was kept past the deadline: {other:?}"),
        }
    }
    // And their places are free again.
    drop(auth_hello_from(&net, "127.0.0.2"));
}

#[test]
fn failed_logins_from_elsewhere_do_not_lock_the_user_out() {
    let net = TestNet::start();
    net.register("lara");
    let mut attacker = auth_hello_from(&net, "127.0.0.3");
    let mut refusal = |frame: ClientToAuth| -> ErrorCode {
        attacker.send(&frame).unwrap();
        match attacker.recv::<AuthToClient>(Some(Instant::now() + Duration::from_secs(30))) {
            Ok(Some(AuthToClient::Error(e))) => e.code,
            other => panic!("expected a refusal, got {other:?}"),
        }
    };
    for id in 0..5 {
        let code = refusal(ClientToAuth::Login {
            id,
            user: "lara".into(),
            password: "wrong password".into(),
        });
        assert_eq!(code, ErrorCode::BadCredentials);
    }
    // The attacker's address is held off for that name...
    let code = refusal(ClientToAuth::Login {
        id: 5,
        user: "lara".into(),
        password: "another guess".into(),
    });
    assert_eq!(code, ErrorCode::RateLimited);
    // ...and bogus resumptions count against its address only.
    for id in 6..12 {
        refusal(ClientToAuth::Resume {
            id,
            user: "lara".into(),
            credential: "0".repeat(64),
        });
    }
    // Lara, at home, is not locked out.
    let mut auth = AuthLink::connect(&net.auth_addr, &net.opts("lara").data_dir).unwrap();
    match auth.login("lara", PASSWORD) {
        Ok(_) => {}
        Err(ClientError::Refused { code, message, .. }) => {
            panic!("lara was refused: {code:?}: {message}")
        }
        Err(e) => panic!("{e}"),
    }
}

/// A raw relay session for `user` (registered already).
fn relay_session(net: &TestNet, user: &str) -> RelayLink {
    let mut auth = AuthLink::connect(&net.auth_addr, &net.home.join("raw")).unwrap();
    let redirect = auth.login(user, PASSWORD).unwrap();
    RelayLink::connect(&redirect, true).unwrap()
}

/// The reply to request `id` on `link`: `Ok(frame)` or the refusal's code.
fn reply(link: &mut RelayLink, id: u64) -> Result<RelayToClient, ErrorCode> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match link.recv(Some(deadline)).unwrap() {
            Some(RelayToClient::Error(e)) if e.id == Some(id) => return Err(e.code),
            Some(f @ RelayToClient::FileReady { id: got, .. })
            | Some(f @ RelayToClient::FilePutOk { id: got, .. })
                if got == id =>
            {
                return Ok(f)
            }
            Some(_) => {}
            None => panic!("no reply to {id} within 30 s"),
        }
    }
}

#[test]
fn a_file_cannot_store_more_than_its_size() {
    let net = TestNet::start();
    net.register("mallory");
    net.register("bob");
    let mut m = relay_session(&net, "mallory");
    let begin = |m: &mut RelayLink, size: u64, chunks: u32| {
        let id = m.next_id();
        m.queue(&ClientToRelay::FileBegin {
            id,
            size,
            chunks,
            to: Some("bob".into()),
            group_id: None,
        });
        m.flush().unwrap();
        reply(m, id)
    };
    // 64 KiB announced as 64 chunks (of ~65 KB each, once): refused, as is a file with
    // fewer chunks than its size needs.
    assert_eq!(begin(&mut m, 65_536, 64).unwrap_err(), ErrorCode::BadFrame);
    assert_eq!(begin(&mut m, 65_536, 1).unwrap_err(), ErrorCode::BadFrame);
    let Ok(RelayToClient::FileReady { file_id, .. }) = begin(&mut m, 65_536, 2) else {
        panic!("a well-formed upload is refused");
    };
    // Each chunk's data is at most one sealed chunk's token.
    let put = |m: &mut RelayLink, index: u32, data: String| {
        let id = m.next_id();
        m.queue(&ClientToRelay::FilePut {
            id,
            file_id,
            index,
            data,
        });
        m.flush().unwrap();
        reply(m, id)
    };
    let max = fastchat_common::proto::MAX_CHUNK_TOKEN;
    assert_eq!(
        put(&mut m, 0, "x".repeat(max + 1)).unwrap_err(),
        ErrorCode::TooLarge
    );
    assert_eq!(
        put(&mut m, 0, "x".repeat(60_000)).unwrap_err(),
        ErrorCode::TooLarge
    );
    assert!(put(&mut m, 0, "x".repeat(max)).is_ok());
    // The relay goes on serving others.
    let mut bob = net.login("bob");
    bob.send_text("mallory", "still here").unwrap();
}

#[test]
fn empty_and_overlong_texts_are_refused_in_words_before_anything_is_sent() {
    let net = TestNet::start();
    net.register("alice");
    net.register("bob");
    let (ok, _, err) = net.cli("alice", &["send", "--to", "bob", "  "]);
    assert!(!ok);
    assert!(err.contains("empty"), "{err}");
    let long = "x".repeat(40_000);
    let (ok, _, err) = net.cli("alice", &["send", "--to", "bob", &long]);
    assert!(!ok);
    assert!(
        err.contains("at most 32000 characters") && err.contains("--file"),
        "{err}"
    );
    assert!(!err.contains("frame of"), "{err}");
    assert_eq!(net.stored_messages(), 0);
    // The longest text that is allowed goes through.
    let (ok, _, err) = net.cli("alice", &["send", "--to", "bob", &"y".repeat(32_000)]);
    assert!(ok, "{err}");
    assert!(
        net.stored_messages() >= 1,
        "the text (after its key offer) is stored"
    );
}

#[test]
fn the_stats_credential_reads_figures_and_does_nothing_else() {
    let net = TestNet::start();
    let stats_file = net.home.join("stats.secret");
    // The operator tool works with the stats secret alone.
    let out = std::process::Command::new(harness::binary("fastchat-auth"))
        .args([
            "--stats-listen",
            &net.auth_stats_addr,
            "--stats-secret-file",
        ])
        .arg(&stats_file)
        .args(["--secret-file", "/nonexistent", "stats", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let figures: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(figures["auth"]["server"], "auth");
    let relays = figures["relays"].as_array().unwrap();
    assert_eq!(relays.len(), 1);
    assert!(relays[0]["error"].is_null(), "{relays:?}");
    let stats = fastchat_common::keys::load_secret(&stats_file).unwrap();
    let frames_then_close = |addr: &str, frames: &[serde_json::Value]| -> Vec<String> {
        let mut link = Link::connect(
            addr,
            fastchat_common::noise::Role::PskInitiator(&stats),
            1 << 20,
            Duration::from_secs(5),
        )
        .unwrap();
        for f in frames {
            link.queue(f);
        }
        link.flush().unwrap();
        let mut tags = Vec::new();
        loop {
            match link.recv::<serde_json::Value>(Some(Instant::now() + Duration::from_secs(10))) {
                Ok(Some(f)) => tags.push(format!("{} {}", f["t"], f["code"])),
                Ok(None) => panic!("neither an answer nor a close: {tags:?}"),
                Err(_) => return tags,
            }
        }
    };
    let hello = serde_json::json!({"t": "hello", "version": fastchat_common::PROTOCOL_VERSION});
    // It cannot announce (or evict) a relay at the auth server...
    let tags = frames_then_close(
        &net.auth_stats_addr,
        &[
            hello.clone(),
            serde_json::json!({"t": "relay_up", "relay_id": "relay-1", "client_addr": "127.0.0.1:1",
                "static_key": "ab".repeat(32), "mesh_addr": "127.0.0.1:2", "clients": 0}),
        ],
    );
    assert_eq!(tags, ["\"hello\" null", "\"error\" \"bad_state\""]);
    let directory = net.auth_stats()["relays"].clone();
    assert_eq!(
        directory[0]["client_addr"].as_str(),
        Some(net.relay_addrs[0].as_str())
    );
    // ...nor speak as a relay on a relay's stats port...
    let relay_stats = relays[0]["relay_id"].clone();
    assert_eq!(relay_stats, "relay-1");
    let relay_stats_addr = net
        .relay(0)
        .wait_for("listening for stats requests on", Duration::from_secs(1));
    let tags = frames_then_close(
        &relay_stats_addr,
        &[
            hello,
            serde_json::json!({"t": "mesh_hello", "relay_id": "relay-9"}),
        ],
    );
    assert_eq!(tags, ["\"hello\" null", "\"error\" \"bad_state\""]);
    // ...and the cluster's own ports do not take it at all.
    assert!(Link::connect(
        &net.auth_relay_addr,
        fastchat_common::noise::Role::PskInitiator(&stats),
        1 << 20,
        Duration::from_secs(3),
    )
    .and_then(|mut l| {
        l.send(&serde_json::json!({"t": "hello", "version": fastchat_common::PROTOCOL_VERSION}))?;
        l.recv_json(Some(Instant::now() + Duration::from_secs(5)))
    })
    .is_err());
}

fn refused_with<T: std::fmt::Debug>(result: Result<T, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn nobody_can_be_put_in_groups_without_bound() {
    let net = TestNet::with(Settings {
        extra_relay_args: vec!["--max-groups-per-user".into(), "2".into()],
        ..Settings::default()
    });
    for u in ["mallory", "bob"] {
        net.register(u);
    }
    let mut mallory = net.login("mallory");
    let mut bob = net.login("bob");
    let g1 = mallory.group_create("one").unwrap();
    let g2 = mallory.group_create("two").unwrap();
    assert_eq!(
        refused_with(mallory.group_create("three")),
        ErrorCode::GroupFull,
        "a third group for its maker"
    );
    bob.group_create("bob's").unwrap();
    add_member(&mut mallory, g1.group_id, &mut bob);
    assert_eq!(
        refused_with(mallory.group_add(g2.group_id, "bob")),
        ErrorCode::GroupFull,
        "a third group for bob"
    );
    // Leaving makes room.
    mallory.group_leave(g2.group_id).unwrap();
    mallory.group_create("three").unwrap();
    assert_eq!(bob.groups().unwrap().len(), 2);
}

#[test]
fn a_peer_cannot_fill_the_store_with_key_offers() {
    use fastchat_client::chat::{Event, MAX_KEYS_PER_PEER};
    use fastchat_client::e2e::{make_offer, ConversationKey, PeerKey};
    let net = TestNet::start();
    net.register("bob");
    let mallory = Identity::generate().unwrap();
    let mut auth = AuthLink::connect(&net.auth_addr, &net.home.join("raw")).unwrap();
    auth.register("mallory", PASSWORD, &mallory.public_pem())
        .unwrap();
    let mut m = relay_session(&net, "mallory");
    let id = m.next_id();
    m.queue(&ClientToRelay::Key {
        id,
        user: "bob".into(),
    });
    m.flush().unwrap();
    let bob_key = loop {
        match m
            .recv(Some(Instant::now() + Duration::from_secs(10)))
            .unwrap()
        {
            Some(RelayToClient::Key { pubkey, .. }) => break PeerKey::from_pem(&pubkey).unwrap(),
            Some(_) => {}
            None => panic!("no key for bob"),
        }
    };
    let offers = MAX_KEYS_PER_PEER as usize + 4;
    let mut ids = Vec::new();
    for _ in 0..offers {
        let offer = make_offer(
            &mallory,
            "mallory",
            "bob",
            &bob_key,
            &ConversationKey::generate(),
        )
        .unwrap();
        let id = m.next_id();
        m.queue(&ClientToRelay::Send {
            id,
            to: Some("bob".into()),
            group_id: None,
            body: offer.to_body(),
        });
        ids.push(id);
    }
    m.flush().unwrap();
    let mut sent = 0;
    while sent < offers {
        match m
            .recv(Some(Instant::now() + Duration::from_secs(30)))
            .unwrap()
        {
            Some(RelayToClient::Sent { .. }) => sent += 1,
            Some(RelayToClient::Error(e)) => panic!("{e:?}"),
            Some(_) => {}
            None => panic!("{sent} of {offers} offers stored"),
        }
    }
    let mut bob = net.login("bob");
    let mut refused = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while refused < 4 && Instant::now() < deadline {
        for event in bob
            .receive(Instant::now() + Duration::from_secs(2))
            .unwrap()
        {
            if let Event::Undecryptable { why, .. } = event {
                assert!(why.contains("offered more than"), "{why}");
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 4, "offers beyond {MAX_KEYS_PER_PEER} are refused");
}

#[test]
fn a_frame_too_long_for_the_client_abandons_the_request_not_the_link() {
    use fastchat_client::connect::Redirect;
    use fastchat_common::noise::{Role, StaticKeypair};
    use serde_json::{json, Value};
    // A relay that answers a key lookup with a frame over the client's limit, then
    // goes on normally.
    let keypair = StaticKeypair::generate();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let kp = keypair.clone();
    let relay = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut link = Link::over(
            stream,
            Role::NkResponder(&kp),
            1 << 20,
            Duration::from_secs(5),
        )
        .unwrap();
        let deadline = || Some(Instant::now() + Duration::from_secs(10));
        let next = |link: &mut Link| link.recv::<Value>(deadline()).unwrap().unwrap();
        assert_eq!(next(&mut link)["t"], "hello");
        assert_eq!(next(&mut link)["t"], "auth");
        link.queue(&json!({"t": "hello", "version": fastchat_common::PROTOCOL_VERSION}));
        link.queue(&json!({"t": "welcome", "user": "alice", "user_id": 1}));
        link.flush().unwrap();
        let ask = next(&mut link);
        assert_eq!(ask["t"], "key");
        let huge =
            json!({"t": "key", "id": ask["id"], "user": "bob", "pubkey": "k".repeat(70_000)});
        let mut raw = Vec::new();
        fastchat_common::frame::encode_raw_into(huge.to_string().as_bytes(), &mut raw);
        link.queue_raw_bytes(&raw);
        link.flush().unwrap();
        // The client's link is still in step: its next request is answered normally.
        let ask = next(&mut link);
        assert_eq!(ask["user"], "carol");
        link.send(&json!({"t": "key", "id": ask["id"], "user": "carol", "pubkey": "PEM"}))
            .unwrap();
    });
    let redirect = Redirect {
        user: "alice".into(),
        relay_addr: addr,
        relay_key: keypair.public.clone(),
        ticket: "t".into(),
        credential: None,
        relays: Vec::new(),
    };
    let mut link = RelayLink::connect(&redirect, true).unwrap();
    match link.fetch_key("bob") {
        Err(ClientError::Protocol(why)) => {
            assert!(why.contains("more than this client takes"), "{why}")
        }
        other => panic!("expected the request abandoned, got {other:?}"),
    }
    assert_eq!(link.fetch_key("carol").unwrap(), "PEM");
    relay.join().unwrap();
}

#[test]
fn one_user_cannot_take_a_relay_with_sessions_requests_or_resumptions() {
    let net = TestNet::with(Settings {
        extra_relay_args: [
            "--max-sessions-per-user",
            "3",
            "--max-in-flight",
            "16",
            "--resume-failures-per-addr",
            "20",
        ]
        .map(String::from)
        .to_vec(),
        ..Settings::default()
    });
    net.register("mallory");
    net.register("bob");
    // Sessions: the fourth of one user is refused.
    let mut held: Vec<RelayLink> = (0..3).map(|_| relay_session(&net, "mallory")).collect();
    let mut auth = AuthLink::connect(&net.auth_addr, &net.home.join("raw")).unwrap();
    let redirect = auth.login("mallory", PASSWORD).unwrap();
    match RelayLink::connect(&redirect, true) {
        Err(ClientError::Refused {
            code: ErrorCode::RateLimited,
            ..
        }) => {}
        other => panic!("a fourth session: {:?}", other.map(|_| "admitted")),
    }
    // Requests: 200 key lookups at once; beyond 16 unanswered they are refused at once.
    let m = &mut held[0];
    let ids: Vec<u64> = (0..200)
        .map(|_| {
            let id = m.next_id();
            m.queue(&ClientToRelay::Key {
                id,
                user: "bob".into(),
            });
            id
        })
        .collect();
    m.flush().unwrap();
    let (mut answered, mut limited) = (0, 0);
    while answered + limited < ids.len() {
        match m
            .recv(Some(Instant::now() + Duration::from_secs(30)))
            .unwrap()
        {
            Some(RelayToClient::Key { .. }) => answered += 1,
            Some(RelayToClient::Error(e)) if e.code == ErrorCode::RateLimited => limited += 1,
            Some(_) => {}
            None => panic!("{answered} answered, {limited} limited of {}", ids.len()),
        }
    }
    assert!(
        limited > 0 && answered >= 16,
        "{answered} answered, {limited} limited"
    );
    // Resumptions: 25 bogus credentials at once from 127.0.0.2 — counted as they
    // start, so the ones past 20 are refused without a lookup.
    let key = net.relay_key(0);
    // Every handshake first, then every resumption at once.
    let mut links: Vec<Link> = (0..25)
        .map(|_| {
            let stream = harness::tcp_from("127.0.0.2", &net.relay_addrs[0]).unwrap();
            Link::over(
                stream,
                fastchat_common::noise::Role::NkInitiator(&key),
                1 << 20,
                Duration::from_secs(5),
            )
            .unwrap()
        })
        .collect();
    for l in &mut links {
        l.queue(&ClientToRelay::Hello {
            version: fastchat_common::PROTOCOL_VERSION,
        });
        l.queue(&ClientToRelay::Resume {
            user: "mallory".into(),
            credential: "0".repeat(64),
            receive: true,
        });
        l.flush().unwrap();
    }
    let mut codes = Vec::new();
    for mut l in links {
        loop {
            match l.recv::<RelayToClient>(Some(Instant::now() + Duration::from_secs(30))) {
                Ok(Some(RelayToClient::Error(e))) => {
                    codes.push(e.code);
                    break;
                }
                Ok(Some(_)) => {}
                other => panic!("{other:?}"),
            }
        }
    }
    assert!(codes.contains(&ErrorCode::RateLimited), "{codes:?}");
    // Bob, meanwhile, is served.
    let mut bob = net.login("bob");
    bob.send_text("mallory", "still here").unwrap();
}

/// Rows waiting for `recipient` from `sender` in the relays' store.
fn rows_from(net: &TestNet, sender: &str, recipient: &str) -> i64 {
    let mut db = postgres::Client::connect(&net.db_url, postgres::NoTls).unwrap();
    db.query_one(
        "SELECT count(*) FROM messages m JOIN users s ON s.id = m.sender_id
         JOIN users r ON r.id = m.recipient_id WHERE s.name = $1 AND r.name = $2",
        &[&sender, &recipient],
    )
    .unwrap()
    .get(0)
}

fn refusal<T: std::fmt::Debug>(result: Result<T, ClientError>) -> (ErrorCode, String) {
    match result {
        Err(ClientError::Refused { code, message, .. }) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_blocked_user_gets_nothing_to_the_blocker_until_unblocked() {
    use harness::receive_n;
    let net = TestNet::start();
    for u in ["alice", "mallory", "carol"] {
        net.register(u);
    }
    let mut alice = net.login("alice");
    let mut mallory = net.login("mallory");
    let mut carol = net.login("carol");

    // A group with all three, made before the block (alice hands out the key).
    let group = alice.group_create("all").unwrap();
    add_member(&mut alice, group.group_id, &mut mallory);
    add_member(&mut alice, group.group_id, &mut carol);
    for chat in [&mut mallory, &mut carol] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while chat.group_key_epoch(group.group_id).is_none() {
            assert!(Instant::now() < deadline, "no group key");
            chat.receive(Instant::now() + Duration::from_millis(100))
                .unwrap();
        }
    }

    mallory.send_text("alice", "before").unwrap();
    let got = receive_n(&mut alice, 1, Duration::from_secs(30));
    assert_eq!(got[0].text, "before");

    // The CLI blocks and lists.
    let (ok, out, err) = net.cli("alice", &["block", "mallory"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("Blocked mallory.") && out.contains("Blocked: mallory"),
        "{out}"
    );
    assert_eq!(alice.blocked().unwrap(), vec!["mallory".to_string()]);

    // Direct messages, files and group additions are refused, in words.
    let (code, message) = refusal(mallory.send_text("alice", "after the block"));
    assert_eq!(code, ErrorCode::Blocked);
    assert!(
        message.contains("does not accept messages from you"),
        "{message}"
    );
    let file = net.home.join("gift.bin");
    std::fs::write(&file, vec![7u8; 100_000]).unwrap();
    let (code, _) = refusal(mallory.send_file(Some("alice"), None, &file, None));
    assert_eq!(code, ErrorCode::Blocked);
    let theirs = mallory.group_create("trap").unwrap();
    let (code, _) = refusal(mallory.group_add(theirs.group_id, "alice"));
    assert_eq!(code, ErrorCode::Blocked);

    // In the shared group, mallory's messages reach carol but not alice; carol's reach
    // alice.
    mallory.send_group(group.group_id, "to the group").unwrap();
    let got = receive_n(&mut carol, 1, Duration::from_secs(30));
    assert_eq!(got[0].text, "to the group");
    carol.send_group(group.group_id, "from carol").unwrap();
    let got = receive_n(&mut alice, 1, Duration::from_secs(30));
    assert_eq!(
        (got[0].from.as_str(), got[0].text.as_str()),
        ("carol", "from carol")
    );
    let later = receive_n(&mut alice, 1, Duration::from_secs(1));
    assert!(later.is_empty(), "alice was shown {later:?}");
    // Nothing from mallory waits for alice either (receipts for mallory still go out).
    assert_eq!(rows_from(&net, "mallory", "alice"), 0);

    // Blocking is per blocker: alice may still write to mallory.
    alice.send_text("mallory", "bye").unwrap();

    // Unblocked, mallory reaches alice again.
    let (ok, out, err) = net.cli("alice", &["unblock", "mallory"]);
    assert!(ok && out.contains("You have blocked no one."), "{out}{err}");
    mallory.send_text("alice", "sorry").unwrap();
    let got = receive_n(&mut alice, 1, Duration::from_secs(30));
    assert_eq!(got[0].text, "sorry");

    // Bad input: unknown users and oneself.
    assert_eq!(refusal(alice.block("nobody")).0, ErrorCode::UnknownUser);
    assert_eq!(refusal(alice.block("alice")).0, ErrorCode::BadFrame);
    let (ok, _, err) = net.cli("alice", &["block", "Not A Name"]);
    assert!(!ok && err.contains("no user called"), "{err}");
}

fn relay_flags(flags: &[(&str, &str)]) -> Settings {
    Settings {
        extra_relay_args: flags
            .iter()
            .flat_map(|(f, v)| [f.to_string(), v.to_string()])
            .collect(),
        ..Settings::default()
    }
}

/// Rows waiting for `user` in the relays' store.
fn rows_for(net: &TestNet, user: &str) -> i64 {
    let mut db = postgres::Client::connect(&net.db_url, postgres::NoTls).unwrap();
    db.query_one(
        "SELECT count(*) FROM messages m JOIN users u ON u.id = m.recipient_id WHERE u.name = $1",
        &[&user],
    )
    .unwrap()
    .get(0)
}

/// Logs `user` in, takes (and acknowledges) everything waiting, and logs out: what
/// waits for them is counted from nothing.
fn read_everything(net: &TestNet, user: &str) {
    let (ok, _, err) = net.cli(user, &["read"]);
    assert!(ok, "{err}");
    harness::eventually(&format!("rows left for {user}"), 0, || rows_for(net, user));
}

#[test]
fn group_deliveries_and_bytes_count_toward_a_mailbox() {
    let net = TestNet::with(relay_flags(&[
        ("--max-pending", "6"),
        ("--max-pending-bytes", "150000"),
    ]));
    for u in ["mallory", "bob", "carol", "alice", "dave"] {
        net.register(u);
    }
    let mut mallory = net.login("mallory");
    let group = mallory.group_create("spam").unwrap();
    // Bob and carol join and take the key, then read everything and go offline.
    for u in ["bob", "carol"] {
        let mut chat = net.login(u);
        add_member(&mut mallory, group.group_id, &mut chat);
        let deadline = Instant::now() + Duration::from_secs(30);
        while chat.group_key_epoch(group.group_id).is_none() {
            assert!(Instant::now() < deadline, "no group key for {u}");
            chat.receive(Instant::now() + Duration::from_millis(100))
                .unwrap();
        }
    }
    for u in ["bob", "carol"] {
        read_everything(&net, u);
    }
    // The relay counted these mailboxes while they held the events and the key; near
    // a limit it counts again once its count is a second old (PROTOCOL.md §3).
    std::thread::sleep(Duration::from_millis(1100));

    // A group send reaches each member's mailbox and counts there: the seventh is
    // stored for nobody, and says so.
    for k in 0..6 {
        let sent = mallory
            .send_group(group.group_id, &format!("spam {k}"))
            .unwrap();
        assert!(sent.full.is_empty(), "{k}: {sent:?}");
    }
    let sent = mallory.send_group(group.group_id, "one too many").unwrap();
    assert_eq!(sent.full, vec!["bob".to_string(), "carol".to_string()]);
    assert_eq!(rows_for(&net, "bob"), 6, "bob's mailbox kept its limit");
    // So a direct message to bob is refused as well...
    let mut alice = net.login("alice");
    assert_eq!(
        refusal(alice.send_text("bob", "hello")).0,
        ErrorCode::MailboxFull
    );
    // ...until he reads.
    read_everything(&net, "bob");
    harness::eventually("alice's message accepted", true, || {
        alice.send_text("bob", "hello").is_ok()
    });

    // Bytes count too: long texts fill dave's 150,000 bytes before his 6 messages.
    let long = "x".repeat(30_000);
    let mut stored = 0;
    let refused = loop {
        match alice.send_text("dave", &long) {
            Ok(_) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < 6, "the byte limit never held");
    };
    assert!(
        matches!(
            &refused,
            ClientError::Refused {
                code: ErrorCode::MailboxFull,
                ..
            }
        ),
        "{refused}"
    );
    assert!((2..=4).contains(&stored), "{stored} long texts stored");
}

#[test]
fn a_senders_storage_is_bounded_by_a_quota() {
    let net = TestNet::with(relay_flags(&[("--max-stored-bytes-per-user", "200000")]));
    for u in ["mallory", "bob", "carol"] {
        net.register(u);
    }
    let mut mallory = net.login("mallory");
    let long = "y".repeat(30_000);
    let mut stored = 0;
    let refused = loop {
        let to = if stored % 2 == 0 { "bob" } else { "carol" };
        match mallory.send_text(to, &long) {
            Ok(_) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < 10, "the quota never held");
    };
    let ClientError::Refused { code, message, .. } = &refused else {
        panic!("{refused}");
    };
    assert_eq!(*code, ErrorCode::OverQuota, "{message}");
    assert!(message.contains("frees as they are fetched"), "{message}");
    assert!((3..=5).contains(&stored), "{stored} long texts stored");
    // Files count against the same quota.
    let file = net.home.join("big.bin");
    std::fs::write(&file, vec![1u8; 150_000]).unwrap();
    assert_eq!(
        refusal(mallory.send_file(Some("bob"), None, &file, None)).0,
        ErrorCode::OverQuota
    );
    // Others are not affected by mallory's quota.
    let mut carol = net.login("carol");
    carol.send_text("bob", &long).unwrap();
    // What the recipients fetch frees the quota.
    read_everything(&net, "bob");
    read_everything(&net, "carol");
    harness::eventually("mallory may send again", true, || {
        mallory.send_text("bob", "hi").is_ok()
    });
    mallory.send_file(Some("bob"), None, &file, None).unwrap();
}

#[test]
fn what_a_user_makes_the_relay_write_is_limited_by_bytes_and_fan_out() {
    let net = TestNet::with(relay_flags(&[
        ("--send-bytes-per-sec", "50000"),
        ("--send-bytes-burst", "100000"),
    ]));
    for u in ["mallory", "bob", "carol", "alice"] {
        net.register(u);
    }
    let mut mallory = net.login("mallory");
    let group = mallory.group_create("big").unwrap();
    add_member(&mut mallory, group.group_id, &mut net.login("bob"));
    add_member(&mut mallory, group.group_id, &mut net.login("carol"));
    let long = "w".repeat(30_000);
    // Each send writes ~41 KB for each of two members: the budget goes into debt at
    // the second and refuses the third, saying when to come back.
    let mut stored = 0;
    let refused = loop {
        match mallory.send_group(group.group_id, &long) {
            Ok(_) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < 5, "the byte budget never held");
    };
    let ClientError::Refused {
        code,
        message,
        retry_after_ms,
    } = &refused
    else {
        panic!("{refused}");
    };
    assert_eq!(*code, ErrorCode::RateLimited, "{message}");
    assert!(message.contains("writing too fast"), "{message}");
    assert!(
        retry_after_ms.is_some_and(|ms| ms > 100),
        "{retry_after_ms:?}"
    );
    assert!((1..=3).contains(&stored), "{stored}");
    // Another user's budget is their own.
    let mut alice = net.login("alice");
    alice.send_text("bob", &long).unwrap();
    // Once the debt is paid, mallory may write again.
    std::thread::sleep(Duration::from_millis(retry_after_ms.unwrap() + 100));
    mallory.send_group(group.group_id, "short").unwrap();
}

/// Group texts (not the relay's events; not direct messages, such as a key grant)
/// waiting for `recipient` from `sender`.
fn group_texts_waiting(net: &TestNet, sender: &str, recipient: &str) -> i64 {
    let mut db = postgres::Client::connect(&net.db_url, postgres::NoTls).unwrap();
    db.query_one(
        "SELECT count(*) FROM messages m JOIN users s ON s.id = m.sender_id
         JOIN users r ON r.id = m.recipient_id
         WHERE s.name = $1 AND r.name = $2 AND NOT m.system AND m.group_id IS NOT NULL",
        &[&sender, &recipient],
    )
    .unwrap()
    .get(0)
}

/// The events `chat` reads within `secs`.
fn group_notices(chat: &mut fastchat_client::chat::Chat, secs: u64) -> Vec<GroupNotice> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut notices = Vec::new();
    while Instant::now() < deadline {
        for e in chat
            .receive(Instant::now() + Duration::from_millis(200))
            .unwrap()
        {
            if let fastchat_client::chat::Event::Group(n) = e {
                notices.push(n);
            }
        }
    }
    notices
}

#[test]
fn a_stranger_can_only_invite_and_nothing_of_the_group_reaches_the_invited_before_they_accept() {
    use harness::receive_n;
    let net = TestNet::with(relay_flags(&[("--max-invitations", "2")]));
    for u in ["mallory", "bob", "alice", "carol"] {
        net.register(u);
    }
    let mut mallory = net.login("mallory");
    let mut bob = net.login("bob");

    // mallory shares no group with bob: her addition is an invitation.
    let spam = mallory.group_create("spam").unwrap();
    let added = mallory.group_add(spam.group_id, "bob").unwrap();
    assert!(added.invited, "a stranger's addition is an invitation");
    assert_eq!(added.group.members, 1, "an invitation is no member");
    let (code, _) = refusal(mallory.group_add(spam.group_id, "bob"));
    assert_eq!(code, ErrorCode::AlreadyMember, "invited once");
    // What she sends to the group is stored for nobody.
    mallory.send_group(spam.group_id, "buy now").unwrap();
    assert_eq!(
        group_texts_waiting(&net, "mallory", "bob"),
        0,
        "nothing for bob"
    );

    // bob is told, and asked; nothing is accepted for him.
    let notices = group_notices(&mut bob, 3);
    assert!(
        notices
            .iter()
            .any(|n| n.event.event == "invited" && n.event.user == "bob" && n.waiting),
        "{notices:?}"
    );
    let waiting: Vec<String> = bob
        .invitations()
        .unwrap()
        .into_iter()
        .map(|g| g.name)
        .collect();
    assert_eq!(waiting, vec!["spam".to_string()]);
    let (code, _) = refusal(bob.send_group(spam.group_id, "hello?"));
    assert_eq!(code, ErrorCode::NotMember, "an invitation sends nothing");
    let (_, members) = bob.group_members(spam.group_id).unwrap();
    let roles: Vec<String> = members
        .iter()
        .map(|m| format!("{}:{}", m.user, m.role))
        .collect();
    assert_eq!(roles, vec!["mallory:admin", "bob:invited"]);

    // At most 2 invitations wait for one user.
    let maybe = mallory.group_create("maybe").unwrap();
    assert!(mallory.group_add(maybe.group_id, "bob").unwrap().invited);
    let third = mallory.group_create("third").unwrap();
    let (code, message) = refusal(mallory.group_add(third.group_id, "bob"));
    assert_eq!(code, ErrorCode::GroupFull);
    assert!(message.contains("invitations waiting"), "{message}");

    // Declining takes bob off the group (and moves its key on); the slot is free again.
    let declined = bob.group_decline(spam.group_id).unwrap();
    assert_eq!(declined.role, "none");
    let (g, members) = mallory.group_members(spam.group_id).unwrap();
    assert_eq!(members.len(), 1, "{members:?}");
    assert_eq!(g.epoch, 2, "the key epoch moved with the signed leave");
    assert!(mallory.group_add(third.group_id, "bob").unwrap().invited);

    // Accepting makes bob a member: what mallory sends next reaches him, once.
    let joined = bob.group_accept(maybe.group_id).unwrap();
    assert_eq!(joined.role, "member");
    assert_eq!(joined.members, 2);
    mallory.send_group(maybe.group_id, "welcome").unwrap();
    let got = receive_n(&mut bob, 1, Duration::from_secs(30));
    assert_eq!(
        (got[0].from.as_str(), got[0].text.as_str()),
        ("mallory", "welcome")
    );
    let (code, _) = refusal(bob.group_accept(maybe.group_id));
    assert_eq!(code, ErrorCode::NotMember, "no invitation left to accept");

    // Someone this user wrote to is no stranger: the invitation is accepted on arrival,
    // and the group's messages reach them from then on.
    let mut alice = net.login("alice");
    let mut carol = net.login("carol");
    carol.send_text("alice", "hi alice").unwrap();
    receive_n(&mut alice, 1, Duration::from_secs(30));
    let club = alice.group_create("club").unwrap();
    assert!(alice.group_add(club.group_id, "carol").unwrap().invited);
    let notices = group_notices(&mut carol, 3);
    assert!(
        notices
            .iter()
            .any(|n| n.event.event == "invited" && n.event.user == "carol" && !n.waiting),
        "accepted on arrival: {notices:?}"
    );
    assert!(carol.invitations().unwrap().is_empty());
    alice.send_group(club.group_id, "you're in").unwrap();
    let got = receive_n(&mut carol, 1, Duration::from_secs(30));
    assert_eq!(got[0].text, "you're in");
    // And once the two share a group, an addition is outright.
    let second = alice.group_create("second").unwrap();
    assert!(!alice.group_add(second.group_id, "carol").unwrap().invited);
}
