//! Direct messages delivered from memory (PROTOCOL.md §3, "What `sent` means"): to an
//! online recipient a relay pushes a message at once and answers its sender `sent` on
//! the recipient's `ack` (the recipient's client stored it), here or through the mesh;
//! what is not acknowledged within the delivery window is stored. Whatever fails in
//! between, nothing the sender was told is `sent` is lost, nothing is shown twice, and
//! nobody but the recipient can make a message count as delivered.

mod harness;

use fastchat_client::connect::{AuthLink, RelayLink};
use fastchat_common::proto::{is_delivery_id, ClientToRelay, RelayToClient};
use harness::{eventually, receive_n, record, Settings, Shown, TestNet, PASSWORD};
use std::time::{Duration, Instant};

fn with_window(ms: u64, relays: usize) -> TestNet {
    TestNet::with(Settings {
        relays,
        extra_relay_args: vec!["--delivery-window-ms".into(), ms.to_string()],
        ..Settings::default()
    })
}

fn figure(net: &TestNet, relay: usize, name: &str) -> u64 {
    net.relay_stats(relay)[name]
        .as_u64()
        .unwrap_or_else(|| panic!("relay {relay} reports {name}"))
}

/// A raw session of `user` that reads messages and never acknowledges them, and the
/// relay it is on.
fn silent_session(net: &TestNet, user: &str) -> (RelayLink, usize) {
    let mut auth = AuthLink::connect(&net.auth_addr, &net.home.join("raw")).unwrap();
    let redirect = auth.login(user, PASSWORD).unwrap();
    let relay = net.relay_index(&redirect.relay_addr);
    (RelayLink::connect(&redirect, true).unwrap(), relay)
}

/// The next message `link` is pushed (skipping other frames), within 20 s.
fn next_message(link: &mut RelayLink) -> fastchat_common::proto::Message {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match link.recv(Some(deadline)).expect("the link holds") {
            Some(RelayToClient::Msg(m)) => return m,
            Some(_) => {}
            None => panic!("no message within 20 s"),
        }
    }
}

/// Receives on `chat` for `wait`, counting what it shows into `shown`.
fn linger(chat: &mut fastchat_client::chat::Chat, shown: &mut Shown, wait: Duration) {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        record(shown, chat.receive(deadline).unwrap());
    }
}

#[test]
fn an_online_recipient_is_served_from_memory_and_nothing_is_stored() {
    let net = with_window(3_000, 1);
    net.register("alice");
    net.register("bob");
    let mut bob = net.login("bob");
    linger(&mut bob, &mut Shown::new(), Duration::from_millis(300));
    let alice = std::thread::spawn({
        let opts = net.opts("alice");
        move || {
            let mut alice = fastchat_client::chat::Chat::login(&opts, false).unwrap();
            (0..20)
                .map(|i| alice.send_text("bob", &format!("hello {i}")).unwrap())
                .collect::<Vec<_>>()
        }
    });
    let got = receive_n(&mut bob, 20, Duration::from_secs(30));
    let texts: Vec<String> = got.iter().map(|m| m.text.clone()).collect();
    let want: Vec<String> = (0..20).map(|i| format!("hello {i}")).collect();
    assert_eq!(texts, want, "in order, once each");
    let sent = alice.join().unwrap();
    assert!(
        sent.iter().all(|s| is_delivery_id(s.msg_id)),
        "each `sent` names a delivery id: {:?}",
        sent.iter().map(|s| s.msg_id).collect::<Vec<_>>()
    );
    // The key offer and the twenty texts: all held, all acknowledged by bob's client.
    let held = figure(&net, 0, "held");
    assert!(held >= 21, "held {held}");
    assert_eq!(figure(&net, 0, "held_acked"), held);
    assert_eq!(figure(&net, 0, "held_stored"), 0);
    // The only rows written are bob's delivery receipts to alice, whose session
    // does not receive.
    assert_eq!(
        figure(&net, 0, "stored") as i64,
        net.stored_receipts(),
        "no row written for alice's messages"
    );
    assert_eq!(net.stored_messages(), 0);
}

#[test]
fn messages_left_unacknowledged_past_the_window_are_stored_and_shown_once() {
    // Clients acknowledge a few ms after they receive: a 1 ms window ends first, so
    // each message is stored and pushed a second time.
    let net = with_window(1, 1);
    net.register("alice");
    net.register("bob");
    let mut bob = net.login("bob");
    let mut shown = Shown::new();
    linger(&mut bob, &mut shown, Duration::from_millis(300));
    let alice = std::thread::spawn({
        let opts = net.opts("alice");
        move || {
            let mut alice = fastchat_client::chat::Chat::login(&opts, false).unwrap();
            for i in 0..20 {
                alice.send_text("bob", &format!("late {i}")).unwrap();
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while shown.len() < 20 && Instant::now() < deadline {
        record(&mut shown, bob.receive(deadline).unwrap());
    }
    alice.join().unwrap();
    linger(&mut bob, &mut shown, Duration::from_millis(500));
    for i in 0..20 {
        let key = ("alice".to_string(), format!("late {i}"));
        assert_eq!(shown.get(&key), Some(&1), "{key:?} shown once");
    }
    assert_eq!(shown.len(), 20);
    let late = figure(&net, 0, "held_stored");
    assert!(late >= 1, "windows ended before the acks: {late}");
    assert!(figure(&net, 0, "stored") >= late);
    eventually("bob acknowledged the stored copies too", 0, || {
        net.stored_messages()
    });
}

#[test]
fn an_ack_from_anyone_but_the_recipient_does_not_answer_the_sender() {
    let net = with_window(4_000, 1);
    for u in ["alice", "bob", "mallory"] {
        net.register(u);
    }
    let (mut bob, _) = silent_session(&net, "bob");
    let (mut mallory, _) = silent_session(&net, "mallory");
    let alice = std::thread::spawn({
        let opts = net.opts("alice");
        move || {
            let mut alice = fastchat_client::chat::Chat::login(&opts, false).unwrap();
            alice.send_text("bob", "for bob only").unwrap()
        }
    });
    // The key offer comes first; mallory acknowledges it (delivery ids are guessable).
    let first = next_message(&mut bob);
    assert!(is_delivery_id(first.msg_id));
    mallory.queue(&ClientToRelay::Ack {
        msg_ids: vec![first.msg_id],
    });
    mallory.flush().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        figure(&net, 0, "held_acked"),
        0,
        "mallory's ack counts for nothing"
    );
    let waiting = figure(&net, 0, "holding");
    assert!(waiting >= 1, "still waiting for bob");
    assert_eq!(net.stored_messages(), 0);
    // Bob never acknowledges: at the window's end it is stored, and only then is
    // alice answered; the text that follows finds bob still online and is held too.
    eventually("stored at the window's end", true, || {
        figure(&net, 0, "held_stored") >= 1
    });
    let sent = alice.join().unwrap();
    assert!(!is_delivery_id(sent.msg_id), "the text was stored too");
    assert_eq!(figure(&net, 0, "held_acked"), 0);
    assert!(figure(&net, 0, "held_stored") >= waiting);
    drop(bob);
    let mut bob = net.login("bob");
    let mut shown = Shown::new();
    linger(&mut bob, &mut shown, Duration::from_secs(2));
    assert_eq!(
        shown.get(&("alice".to_string(), "for bob only".to_string())),
        Some(&1)
    );
}

#[test]
fn a_relay_killed_before_the_ack_loses_nothing_its_sender_was_told() {
    let mut net = with_window(5_000, 1);
    net.register("alice");
    net.register("bob");
    let (mut bob, _) = silent_session(&net, "bob");
    let alice = std::thread::spawn({
        let opts = net.opts("alice");
        move || {
            let mut alice = fastchat_client::chat::Chat::login(&opts, false).unwrap();
            alice
                .send_text("bob", "through the crash")
                .expect("the send is retried after the crash")
        }
    });
    // Alice's key offer is held for bob (who never acknowledges): the relay dies.
    let held = next_message(&mut bob);
    assert!(is_delivery_id(held.msg_id));
    net.kill_relay(0);
    drop(bob);
    net.restart_relay(0);
    let sent = alice.join().unwrap();
    assert!(!is_delivery_id(sent.msg_id), "bob is offline now: stored");
    let mut bob = net.login("bob");
    let mut shown = Shown::new();
    linger(&mut bob, &mut shown, Duration::from_secs(2));
    assert_eq!(
        shown.get(&("alice".to_string(), "through the crash".to_string())),
        Some(&1)
    );
    assert_eq!(shown.len(), 1);
}

/// Waits until relays `a` and `b` have their mesh link up.
fn mesh_up(net: &TestNet, a: usize, b: usize) {
    let up = |i: usize| {
        net.relay_stats(i)["mesh"]
            .as_array()
            .is_some_and(|peers| peers.iter().any(|p| p["link"] == "up"))
    };
    eventually("the mesh link is up", (true, true), || (up(a), up(b)));
}

/// Logs `user` in with the client until it is on another relay than `other`.
fn login_apart(net: &TestNet, user: &str, other: usize) -> fastchat_client::chat::Chat {
    for _ in 0..10 {
        let chat = net.login(user);
        if net.relay_index(chat.relay_addr()) != other {
            return chat;
        }
        drop(chat);
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("{user} never landed on another relay than {other}");
}

#[test]
fn across_relays_the_recipient_s_ack_comes_back_through_the_mesh() {
    let net = with_window(3_000, 2);
    net.register("alice");
    net.register("bob");
    let mut alice = net.login("alice");
    let a = net.relay_index(alice.relay_addr());
    let mut bob = login_apart(&net, "bob", a);
    let b = 1 - a;
    linger(&mut bob, &mut Shown::new(), Duration::from_millis(300));
    // Wait for the mesh link (alice's relay must know where bob is and reach it).
    mesh_up(&net, a, b);
    let sender = std::thread::spawn(move || {
        let sent: Vec<_> = (0..10)
            .map(|i| alice.send_text("bob", &format!("across {i}")).unwrap())
            .collect();
        (alice, sent)
    });
    let got = receive_n(&mut bob, 10, Duration::from_secs(30));
    assert_eq!(got.len(), 10);
    let (_alice, sent) = sender.join().unwrap();
    assert!(sent.iter().all(|s| is_delivery_id(s.msg_id)));
    let held = figure(&net, a, "held");
    assert!(held >= 11, "held {held}");
    assert_eq!(figure(&net, a, "held_acked"), held, "every ack came back");
    assert_eq!(figure(&net, a, "held_stored"), 0);
    assert!(figure(&net, b, "arrived") >= 11);
    // Bob's receipts to alice, which alice reads only after her sends, may have been
    // stored; nothing else was.
    assert_eq!(
        (figure(&net, a, "stored") + figure(&net, b, "stored")) as i64,
        net.stored_receipts()
    );
    assert_eq!(net.stored_messages(), 0);
}

#[test]
fn a_recipient_s_relay_lost_before_the_ack_is_covered_by_the_sender_s_relay() {
    let mut net = with_window(2_000, 2);
    net.register("alice");
    net.register("bob");
    let alice = net.login("alice");
    let a = net.relay_index(alice.relay_addr());
    let (mut bob, b) = (0..10)
        .find_map(|_| {
            let (link, relay) = silent_session(&net, "bob");
            (relay != a).then_some((link, relay))
        })
        .expect("bob lands on the other relay");
    mesh_up(&net, a, b);
    let sender = std::thread::spawn(move || {
        let mut alice = alice;
        alice.send_text("bob", "over a broken mesh").unwrap()
    });
    // The key offer reached bob through bob's relay, which dies before bob acks.
    let first = next_message(&mut bob);
    assert!(is_delivery_id(first.msg_id));
    net.kill_relay(b);
    drop(bob);
    let sent = sender.join().unwrap();
    assert!(!is_delivery_id(sent.msg_id), "stored: bob is gone");
    assert!(figure(&net, a, "held_stored") >= 1);
    let mut bob = net.login("bob");
    let mut shown = Shown::new();
    linger(&mut bob, &mut shown, Duration::from_secs(2));
    assert_eq!(
        shown.get(&("alice".to_string(), "over a broken mesh".to_string())),
        Some(&1)
    );
}
