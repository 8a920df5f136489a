//! Operations: PostgreSQL going away and coming back under live sessions, and a relay
//! stopped with SIGTERM while its clients send. Its own test binary, and the outage
//! test stops a cluster of its own, so no other test loses its database.

mod harness;

use fastchat_client::chat::Chat;
use fastchat_client::connect::{AuthLink, RelayLink};
use fastchat_client::error::ClientError;
use fastchat_client::store::DeliveryState;
use fastchat_common::proto::{ClientToRelay, ErrorCode, RelayToClient};
use harness::{chat_through_a_fault, record, Cluster, Settings, Shown, TestNet, PASSWORD};
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// Receives until every one of `expected` was shown or `timeout` passed, then a little
/// longer so late duplicates would be seen.
fn receive_all(chat: &mut Chat, shown: &mut Shown, expected: &[(String, String)]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && !expected.iter().all(|m| shown.contains_key(m)) {
        let events = chat
            .receive(Instant::now() + Duration::from_millis(200))
            .unwrap();
        record(shown, events);
    }
    let events = chat
        .receive(Instant::now() + Duration::from_millis(500))
        .unwrap();
    record(shown, events);
}

/// A refusal's code and message (panics on any other error).
fn refusal(e: &ClientError) -> (ErrorCode, &str) {
    match e {
        ClientError::Refused { code, message, .. } => (*code, message.as_str()),
        other => panic!("expected a refusal from the server, got {other:?}"),
    }
}

/// Failed database work the relay logged so far.
fn store_failures(net: &TestNet) -> usize {
    let log = net.relay(0).log();
    log.lines()
        .filter(|l| l.contains("WARN") && l.contains("failed"))
        .count()
}

#[test]
fn a_database_outage_fails_sends_clearly_and_recovers_by_itself() {
    let cluster = Cluster::private();
    let timeout = vec!["--db-timeout-ms".to_string(), "1000".to_string()];
    let mut net = TestNet::on(
        &cluster,
        Settings {
            extra_auth_args: timeout.clone(),
            extra_relay_args: timeout,
            ..Settings::default()
        },
    );
    for user in ["alice", "bob", "carol"] {
        net.register(user);
    }
    let mut alice = net.login("alice");
    let mut bob = net.login("bob");
    let mut shown = Shown::new();
    let mut expected = Vec::new();
    for k in 0..5 {
        let text = format!("before the outage #{k}");
        alice
            .send_text("bob", &text)
            .expect("sent before the outage");
        expected.push(("alice".to_string(), text));
    }
    receive_all(&mut bob, &mut shown, &expected);
    assert!(
        expected.iter().all(|m| shown.get(m) == Some(&1)),
        "{shown:?}"
    );
    // A bare session of alice's, to send raw frames while the auth server cannot log
    // anyone in.
    let mut auth = AuthLink::connect(&net.auth_addr, &net.opts("alice").data_dir).unwrap();
    let mut raw = RelayLink::connect(&auth.login("alice", PASSWORD).unwrap(), false).unwrap();
    // Its login is recorded once a request of its own is answered (one user's jobs run
    // in order on one worker).
    raw.fetch_key("bob").unwrap();

    cluster.stop();

    // Raw sends are each refused with a clear, retryable error, never `sent`; the
    // relay's poll loop keeps answering meanwhile (stats are served by the poll loop,
    // never by a worker waiting for the database).
    let (replies, stats_answered) = std::thread::scope(|s| {
        let sender = s.spawn(|| {
            (0..4)
                .map(|k| {
                    let id = raw.next_id();
                    raw.queue(&ClientToRelay::Send {
                        id,
                        to: Some("bob".into()),
                        group_id: None,
                        body: format!("opaque {k}"),
                    });
                    raw.flush().unwrap();
                    raw.wait_reply(
                        id,
                        |f| matches!(f, RelayToClient::Sent { id: got, .. } if *got == id),
                    )
                })
                .collect::<Vec<_>>()
        });
        let mut answered = 0;
        while !sender.is_finished() {
            let stats = net.relay_stats(0);
            assert!(stats.is_object(), "{stats}");
            answered += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
        (sender.join().unwrap(), answered)
    });
    assert!(stats_answered >= 1);
    for reply in replies {
        let e = reply.expect_err("no `sent` while PostgreSQL is down");
        let (code, message) = refusal(&e);
        assert_eq!(code, ErrorCode::StoreFailed, "{e}");
        assert!(e.retryable(), "{e}");
        assert!(message.contains("unavailable"), "{message}");
    }
    net.relay(0)
        .wait_for("database unavailable", Duration::from_secs(10));
    // Through the library too: its key check falls back on the pinned key, the send
    // retries store_failed a few times, then gives up with it (kept pending).
    let e = alice
        .send_text("bob", "during the outage")
        .expect_err("no `sent` while PostgreSQL is down");
    let (code, message) = refusal(&e);
    assert_eq!(code, ErrorCode::StoreFailed, "{e}");
    assert!(e.retryable() && message.contains("unavailable"), "{e}");
    // A login is refused clearly too, not left hanging.
    let e = Chat::login(&net.opts("carol"), false)
        .err()
        .expect("no login while PostgreSQL is down");
    let (code, message) = refusal(&e);
    assert_eq!(code, ErrorCode::StoreFailed, "{e}");
    assert!(message.contains("unavailable"), "{message}");

    assert!(
        net.auth.is_running(),
        "the auth server rides the outage out"
    );
    assert!(
        net.relay_mut(0).is_running(),
        "the relay rides the outage out"
    );
    net.relay(0)
        .wait_for("database unavailable", Duration::from_secs(10));

    cluster.start();
    // From here on no batch fails: the workers' connections that died with the
    // database are replaced before a batch relies on them.
    let failures_before = store_failures(&net);

    // Sends work again without restarting anything (retried while the pools
    // reconnect, each try with a text of its own).
    let deadline = Instant::now() + Duration::from_secs(60);
    for attempt in 0.. {
        let text = format!("after the outage, try {attempt}");
        match alice.send_text("bob", &text) {
            Ok(_) => break,
            Err(e) if e.retryable() && Instant::now() < deadline => {}
            Err(e) => panic!("sending after PostgreSQL returned: {e}"),
        }
    }
    net.relay(0)
        .wait_for("database reachable again", Duration::from_secs(10));
    for k in 0..5 {
        let text = format!("after the outage #{k}");
        alice
            .send_text("bob", &text)
            .expect("sent after the outage");
    }
    // What failed during the outage is still pending; sent again it is stored now.
    alice.resend_pending().expect("resending what is pending");
    let history = &alice.store().history().unwrap();
    let outgoing: Vec<_> = history.iter().filter(|h| h.outgoing).collect();
    assert!(
        outgoing.iter().all(|h| h.state != DeliveryState::Pending),
        "everything alice wrote is stored now: {outgoing:?}"
    );
    let expected: Vec<(String, String)> = outgoing
        .iter()
        .map(|h| ("alice".to_string(), h.text.clone()))
        .collect();

    // Logins work again.
    let deadline = Instant::now() + Duration::from_secs(60);
    let carol = loop {
        match Chat::login(&net.opts("carol"), false) {
            Ok(chat) => break chat,
            Err(e) if e.retryable() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200))
            }
            Err(e) => panic!("login after PostgreSQL returned: {e}"),
        }
    };
    drop(carol);

    // bob saw every message alice had stored, each exactly once, and nothing else.
    receive_all(&mut bob, &mut shown, &expected);
    for m in &expected {
        assert_eq!(shown.get(m), Some(&1), "{m:?} shown exactly once");
    }
    assert_eq!(
        shown.len(),
        expected.len(),
        "nothing shown that was not sent"
    );
    assert_eq!(
        store_failures(&net),
        failures_before,
        "no batch failed once PostgreSQL was back:\n{}",
        net.relay(0).log()
    );
}

#[test]
fn a_relay_stopped_with_sigterm_under_load_loses_nothing() {
    let mut net = TestNet::with(Settings {
        relays: 2,
        ..Settings::default()
    });
    let users: Vec<String> = (0..6).map(|i| format!("user{i}")).collect();
    std::thread::scope(|s| {
        for chunk in users.chunks(2) {
            let net = &net;
            s.spawn(move || chunk.iter().for_each(|u| drop(net.register(u))));
        }
    });
    let chats: Vec<Chat> = users.iter().map(|u| net.login(u)).collect();
    let on_stopped: HashSet<String> = chats
        .iter()
        .filter(|c| net.relay_index(c.relay_addr()) == 1)
        .map(|c| c.user().to_string())
        .collect();
    assert_eq!(on_stopped.len(), 3, "logins spread over both relays");

    let run = chat_through_a_fault(chats, &users, 30, || {
        net.relay_mut(1).terminate(Duration::from_secs(60))
    });
    let status = run.fault.expect("the relay exits after SIGTERM");
    assert!(status.success(), "clean exit: {status:?}");
    let relay = net.relay(1);
    relay.wait_for("stopping: no new connections", Duration::from_secs(5));
    relay.wait_for("stopped;", Duration::from_secs(5));
    for (user, count) in &run.failovers {
        if on_stopped.contains(user) {
            assert!(*count >= 1, "{user} failed over: {:?}", run.failovers);
        }
    }
    run.assert_each_shown_once();
}
