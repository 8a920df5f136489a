//! The relay's and auth server's limits on what one client can make them hold or do:
//! connections, unread output, silence, and sending rate. Each test starts servers with
//! a small limit and checks both sides of it: past the limit the clear refusal (or the
//! close), within it normal service, and nothing half-stored or lost.

mod harness;

use fastchat_client::connect::{AuthLink, RelayLink};
use fastchat_client::error::ClientError;
use fastchat_common::link::Link;
use fastchat_common::noise::Role;
use fastchat_common::proto::{ClientToRelay, ErrorCode, RelayToClient};
use harness::{Settings, TestNet, PASSWORD};
use std::collections::HashSet;
use std::time::{Duration, Instant};

fn net_with_relay_args(args: &[&str]) -> TestNet {
    TestNet::with(Settings {
        extra_relay_args: args.iter().map(|a| a.to_string()).collect(),
        ..Settings::default()
    })
}

/// A raw session for `user` (registered already) straight through the protocol.
fn session(net: &TestNet, user: &str, receive: bool) -> RelayLink {
    let mut auth = AuthLink::connect(&net.auth_addr, &net.home.join("raw")).unwrap();
    let redirect = auth.login(user, PASSWORD).unwrap();
    RelayLink::connect(&redirect, receive).unwrap()
}

fn send_frame(link: &mut RelayLink, to: &str, body: String) -> u64 {
    let id = link.next_id();
    link.queue(&ClientToRelay::Send {
        id,
        to: Some(to.to_string()),
        group_id: None,
        body,
    });
    id
}

/// Replies to the requests `ids`: (sent ids, rate-limit errors with their retry times).
fn replies(link: &mut RelayLink, ids: &[u64]) -> (Vec<u64>, Vec<Option<u64>>) {
    let (sent, refused) = replies_with(link, ids, ErrorCode::RateLimited);
    (
        sent,
        refused.into_iter().map(|e| e.retry_after_ms).collect(),
    )
}

/// Replies to the requests `ids`: the sent ids, and the refusals (all with `code`).
fn replies_with(
    link: &mut RelayLink,
    ids: &[u64],
    code: ErrorCode,
) -> (Vec<u64>, Vec<fastchat_common::proto::ErrorFrame>) {
    let wanted: HashSet<u64> = ids.iter().copied().collect();
    let (mut sent, mut limited) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(30);
    while sent.len() + limited.len() < ids.len() {
        match link.recv(Some(deadline)).unwrap() {
            Some(RelayToClient::Sent { id, .. }) if wanted.contains(&id) => sent.push(id),
            Some(RelayToClient::Error(e)) if e.id.is_some_and(|id| wanted.contains(&id)) => {
                assert_eq!(e.code, code, "{e:?}");
                limited.push(e);
            }
            Some(_) => {}
            None => panic!("no reply to every send within 30 s"),
        }
    }
    (sent, limited)
}

#[test]
fn sends_over_the_rate_are_refused_with_a_retry_time_and_nothing_stored() {
    // Slow enough that the library's sends below (each a commit and two fsynced store
    // saves) outrun it even on a loaded machine.
    let net = net_with_relay_args(&["--send-rate", "0.5", "--send-burst", "5"]);
    net.register("alice");
    net.register("bob");
    let mut alice = session(&net, "alice", false);
    let ids: Vec<u64> = (0..20)
        .map(|i| send_frame(&mut alice, "bob", format!("body {i}")))
        .collect();
    alice.flush().unwrap();
    let (sent, refusals) = replies_with(&mut alice, &ids, ErrorCode::RateLimited);
    assert!(refusals.iter().all(|e| e.message.contains("too fast")));
    let limited: Vec<Option<u64>> = refusals.iter().map(|e| e.retry_after_ms).collect();
    assert!(
        (5..=7).contains(&sent.len()),
        "the burst goes through, little more: {} sent",
        sent.len()
    );
    assert!(limited.iter().all(|r| r.is_some_and(|ms| ms > 0)));
    // Exactly what was acknowledged is stored (bob is offline).
    assert_eq!(net.stored_messages(), sent.len() as i64);

    // After the advised wait, sending works again.
    let wait = limited.iter().flatten().max().copied().unwrap_or(200);
    std::thread::sleep(Duration::from_millis(wait + 50));
    let id = send_frame(&mut alice, "bob", "after the wait".into());
    alice.flush().unwrap();
    let (sent_now, _) = replies(&mut alice, &[id]);
    assert_eq!(sent_now, vec![id]);

    // The library reports the refusal as a clear, retryable error.
    let mut chat = net.login("alice");
    let mut refused = None;
    for i in 0..20 {
        match chat.send_text("bob", &format!("library {i}")) {
            Ok(_) => {}
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("the library's sends hit the limit too");
    assert!(
        matches!(
            e,
            ClientError::Refused {
                code: ErrorCode::RateLimited,
                retry_after_ms: Some(_),
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.retryable());
    assert!(e.to_string().contains("too fast"), "{e}");
}

#[test]
fn a_full_relay_closes_new_connections_and_serves_the_ones_it_has() {
    let net = net_with_relay_args(&["--max-connections", "2"]);
    net.register("alice");
    net.register("bob");
    let mut alice = session(&net, "alice", true);
    let _bob = session(&net, "bob", true);
    net.relay(0)
        .wait_for("bob connected from", Duration::from_secs(10));
    // A third connection is closed before its handshake completes.
    let key = net.relay_key(0);
    let third = Link::connect(
        &net.relay_addrs[0],
        Role::NkInitiator(&key),
        1 << 16,
        Duration::from_secs(5),
    );
    assert!(third.is_err(), "the relay is full");
    net.relay(0)
        .wait_for("closing new connections at once", Duration::from_secs(10));
    // The sessions it holds still work.
    let id = send_frame(&mut alice, "bob", "still here".into());
    alice.flush().unwrap();
    alice
        .wait_reply(id, |f| matches!(f, RelayToClient::Sent { .. }))
        .unwrap();
    // Once one leaves, there is room again.
    alice.close();
    drop(alice);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = Link::connect(
            &net.relay_addrs[0],
            Role::NkInitiator(&key),
            1 << 16,
            Duration::from_secs(5),
        );
        if attempt.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "room after a session left");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_full_auth_server_closes_new_connections() {
    let net = TestNet::with(Settings {
        extra_auth_args: vec!["--max-connections".into(), "3".into()],
        // The held links below never say hello: the handshake deadline must not free
        // their places before the extra connection tries.
        auth_deadline_secs: 30,
        ..Settings::default()
    });
    // The relay's control link is one of the three.
    let held: Vec<Link> = (0..2)
        .map(|_| {
            Link::connect(
                &net.auth_addr,
                Role::NxInitiator,
                1 << 16,
                Duration::from_secs(5),
            )
            .unwrap()
        })
        .collect();
    let extra = Link::connect(
        &net.auth_addr,
        Role::NxInitiator,
        1 << 16,
        Duration::from_secs(5),
    );
    assert!(extra.is_err(), "the auth server is full");
    net.auth
        .wait_for("closing new connections at once", Duration::from_secs(10));
    drop(held);
}

#[test]
fn a_silent_session_is_closed_and_a_pinging_one_is_not() {
    let net = net_with_relay_args(&["--idle-timeout-secs", "4"]);
    net.register("alice");
    net.register("bob");
    let mut silent = session(&net, "alice", true);
    let mut pinging = session(&net, "bob", true);
    let started = Instant::now();
    let mut pings = 0u64;
    // bob pings every 500 ms for 9 s; alice says nothing.
    while started.elapsed() < Duration::from_secs(9) {
        pings += 1;
        pinging.queue(&ClientToRelay::Ping { id: pings });
        pinging.flush().unwrap();
        pinging
            .wait_reply(pings, |f| matches!(f, RelayToClient::Pong { .. }))
            .expect("a pinging session stays open");
        std::thread::sleep(Duration::from_millis(500));
    }
    let closed = loop {
        match silent.recv(Some(Instant::now() + Duration::from_secs(10))) {
            Ok(Some(_)) => continue,
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert!(closed, "the silent session was closed");
    net.relay(0).wait_for(
        "silent for longer than the idle timeout",
        Duration::from_secs(5),
    );
}

#[test]
fn a_client_that_stops_reading_is_cut_off_and_gets_everything_at_its_next_login() {
    let net = net_with_relay_args(&["--max-output-bytes", "65536", "--output-stall-secs", "1"]);
    net.register("alice");
    net.register("bob");
    // bob logs in and never reads.
    let stalled = session(&net, "bob", true);
    let mut alice = session(&net, "alice", false);
    let count = 400;
    flood(&mut alice, count);
    net.relay(0).wait_for(
        "not reading: too much output waiting",
        Duration::from_secs(30),
    );
    drop(stalled);

    // At its next login bob gets all of them, once each.
    receive_all(&mut session(&net, "bob", true), count);
}

/// Receives (acknowledging as it goes) until `count` messages have arrived, each once.
fn receive_all(bob: &mut RelayLink, count: usize) {
    let mut got = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < count {
        assert!(Instant::now() < deadline, "only {} of {count}", got.len());
        let mut acks = Vec::new();
        while let Some(frame) = bob
            .recv(Some(Instant::now() + Duration::from_millis(200)))
            .unwrap()
        {
            if let RelayToClient::Msg(m) = frame {
                let msg_id = m.msg_id;
                assert!(got.insert(msg_id), "message {msg_id} twice");
                acks.push(msg_id);
            }
            if acks.len() >= 100 {
                break;
            }
        }
        if !acks.is_empty() {
            bob.queue(&ClientToRelay::Ack { msg_ids: acks });
            bob.flush().unwrap();
        }
    }
}

/// Sends `count` messages of 40 KiB from alice to bob, all answered `sent`.
fn flood(alice: &mut RelayLink, count: usize) {
    let body = "x".repeat(40 * 1024);
    let mut ids = Vec::new();
    for i in 0..count {
        ids.push(send_frame(alice, "bob", format!("{i} {body}")));
        if i % 50 == 49 {
            alice.flush().unwrap();
        }
    }
    alice.flush().unwrap();
    let (sent, limited) = replies(alice, &ids);
    assert_eq!((sent.len(), limited.len()), (count, 0));
}

#[test]
fn a_client_reading_a_trickle_is_cut_off_at_the_hard_limit_and_loses_nothing() {
    // The stall rule cannot fire here (600 s): only the hard limit can.
    let net = net_with_relay_args(&[
        "--max-output-bytes",
        "65536",
        "--output-stall-secs",
        "600",
        "--hard-output-bytes",
        "4194304",
    ]);
    net.register("alice");
    net.register("bob");
    let mut trickle = session(&net, "bob", true);
    let mut alice = session(&net, "alice", false);
    let count = 400;
    let cut = std::thread::scope(|s| {
        // bob reads one frame every 100 ms (~400 KB/s), never acknowledging.
        let reader = s.spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                match trickle.recv(Some(Instant::now() + Duration::from_millis(50))) {
                    Ok(_) => std::thread::sleep(Duration::from_millis(100)),
                    Err(_) => return true,
                }
            }
            false
        });
        flood(&mut alice, count);
        reader.join().unwrap()
    });
    assert!(cut, "the trickling session was closed");
    let log = net.relay(0).log();
    assert!(
        log.contains("more output waiting than the hard limit"),
        "{log}"
    );
    assert!(!log.contains("not reading: too much output waiting"));

    // Everything is still stored, and the next login pages it out in pieces of at most
    // 1 MiB at the client's pace: 16 MB of backlog passes a 4 MiB limit.
    receive_all(&mut session(&net, "bob", true), count);
}

#[test]
fn a_full_mailbox_refuses_direct_messages_until_it_is_read() {
    let net = net_with_relay_args(&["--max-pending", "3"]);
    net.register("alice");
    net.register("bob");
    let mut alice = session(&net, "alice", false);
    let ids: Vec<u64> = (0..5)
        .map(|i| send_frame(&mut alice, "bob", format!("body {i}")))
        .collect();
    alice.flush().unwrap();
    let (sent, refusals) = replies_with(&mut alice, &ids, ErrorCode::MailboxFull);
    assert_eq!((sent.len(), refusals.len()), (3, 2));
    assert!(
        refusals[0].message.contains("messages waiting"),
        "{:?}",
        refusals[0]
    );
    assert_eq!(net.stored_messages(), 3, "nothing stored for the refused");

    // bob reads and acknowledges them; once the relay counts again there is room.
    let mut bob = session(&net, "bob", true);
    let mut got = Vec::new();
    while got.len() < 3 {
        match bob
            .recv(Some(Instant::now() + Duration::from_secs(10)))
            .unwrap()
        {
            Some(RelayToClient::Msg(m)) => got.push(m.msg_id),
            Some(_) => {}
            None => panic!("bob got {} of 3", got.len()),
        }
    }
    bob.queue(&ClientToRelay::Ack { msg_ids: got });
    bob.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let id = send_frame(&mut alice, "bob", "room again?".into());
        alice.flush().unwrap();
        let (sent, _) = replies_with(&mut alice, &[id], ErrorCode::MailboxFull);
        if sent == vec![id] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the mailbox never had room again"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_refusal_that_overtakes_an_earlier_reply_is_not_waited_for() {
    // Two tokens, and none more during the test. A first text to a new peer is a key
    // lookup, then a key offer and the text sent together: the lookup and the offer
    // take the tokens (the offer waits for its commit), the text is refused at once,
    // and its refusal arrives before the offer's `sent`. The library must find it
    // among what came while it waited for the offer, not wait for it again.
    let net = net_with_relay_args(&["--send-rate", "0.02", "--send-burst", "2"]);
    net.register("alice");
    net.register("bob");
    let mut alice = net.login("alice");
    let started = Instant::now();
    let refused = alice.send_text("bob", "hello");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "the refusal was waited for until the reply timeout: {took:?}"
    );
    match refused {
        Err(ClientError::Refused {
            code: ErrorCode::RateLimited,
            ..
        }) => {}
        other => panic!("expected the text's rate_limited refusal, got {other:?}"),
    }
}
