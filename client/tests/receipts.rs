//! Delivery receipts end to end: the recipient's client stores a message and sends an
//! encrypted receipt; the sender's history moves from stored to delivered.

mod harness;

use fastchat_client::chat::{Chat, Event};
use fastchat_client::store::DeliveryState;
use harness::{add_member, eventually, receive_n, TestNet};
use std::time::{Duration, Instant};

/// Receives until a `Delivered` event comes (or `timeout`); returns its mids.
fn wait_delivered(chat: &mut Chat, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        for e in chat.receive(deadline).expect("receiving") {
            if let Event::Delivered { mids, .. } = e {
                return mids;
            }
        }
    }
    panic!("no Delivered event within {timeout:?}");
}

/// The delivery state of `user`'s own history entries, in order.
fn own_states(chat: &Chat) -> Vec<(String, DeliveryState)> {
    chat.store()
        .history()
        .unwrap()
        .iter()
        .filter(|h| h.outgoing)
        .map(|h| (h.text.clone(), h.state))
        .collect()
}

#[test]
fn a_direct_message_becomes_delivered_when_the_recipient_stores_it() {
    let net = TestNet::start();
    net.register("alice");
    net.register("bob");
    let mut alice = net.login("alice");
    alice.send_text("bob", "one").unwrap();
    alice.send_text("bob", "two").unwrap();
    assert_eq!(
        own_states(&alice),
        vec![
            ("one".to_string(), DeliveryState::Stored),
            ("two".to_string(), DeliveryState::Stored)
        ]
    );

    let mut bob = net.login("bob");
    let got = receive_n(&mut bob, 2, Duration::from_secs(20));
    assert_eq!(got.len(), 2);

    let mut delivered = wait_delivered(&mut alice, Duration::from_secs(20));
    // Both may come in one receipt or, if bob's batches were split, in two.
    if delivered.len() < 2 {
        delivered.extend(wait_delivered(&mut alice, Duration::from_secs(20)));
    }
    let mids: Vec<String> = alice
        .store()
        .history()
        .unwrap()
        .iter()
        .map(|h| h.mid.clone())
        .collect();
    assert_eq!(delivered, mids);
    assert_eq!(
        own_states(&alice),
        vec![
            ("one".to_string(), DeliveryState::Delivered),
            ("two".to_string(), DeliveryState::Delivered)
        ]
    );
    // Receipts show as no text, and are not receipted in turn.
    let events = bob
        .receive(Instant::now() + Duration::from_secs(1))
        .unwrap();
    assert!(events.is_empty(), "{events:?}");
    eventually("messages left stored", 0, || net.stored_messages());
    eventually("receipts left stored", 0, || net.stored_receipts());

    // It survives a restart of the sender.
    alice.close();
    let alice = Chat::login(&net.opts("alice"), false).unwrap();
    assert!(own_states(&alice)
        .iter()
        .all(|(_, s)| *s == DeliveryState::Delivered));
}

#[test]
fn the_cli_reader_sends_receipts_and_never_prints_them() {
    let net = TestNet::start();
    net.register("alice");
    net.register("bob");
    let mut alice = Chat::login(&net.opts("alice"), false).unwrap();
    alice.send_text("bob", "hello").unwrap();
    alice.close();
    let (ok, out, err) = net.cli("bob", &["read"]);
    assert!(ok, "bob read: {err}");
    assert!(out.contains("hello"), "{out}");
    eventually("bob's receipt waiting for alice", 1, || {
        net.stored_receipts()
    });
    let (ok, out, err) = net.cli("alice", &["read", "--json"]);
    assert!(ok, "alice read: {err}");
    assert_eq!(out, "", "a receipt is not a message");
    assert!(!err.contains("could not be opened"), "{err}");
    eventually("receipts left stored", 0, || net.stored_receipts());
    let alice = Chat::login(&net.opts("alice"), false).unwrap();
    assert_eq!(
        own_states(&alice),
        vec![("hello".to_string(), DeliveryState::Delivered)]
    );
}

#[test]
fn a_group_message_becomes_delivered_on_a_members_receipt() {
    let net = TestNet::start();
    net.register("alice");
    net.register("bob");
    let mut alice = net.login("alice");
    let g = alice.group_create("crew").unwrap();
    add_member(&mut alice, g.group_id, &mut net.login("bob"));
    alice.send_group(g.group_id, "hi crew").unwrap();

    let mut bob = net.login("bob");
    let got = receive_n(&mut bob, 1, Duration::from_secs(20));
    assert_eq!(got[0].text, "hi crew");

    let delivered = wait_delivered(&mut alice, Duration::from_secs(20));
    let entry = alice
        .store()
        .history()
        .unwrap()
        .iter()
        .find(|h| h.outgoing && h.text == "hi crew")
        .cloned()
        .unwrap();
    assert_eq!(delivered, vec![entry.mid]);
    assert_eq!(entry.state, DeliveryState::Delivered);
}

#[test]
fn messages_left_pending_are_sent_again_at_login_and_shown_once() {
    use fastchat_client::store::{HistoryEntry, Store};
    let net = TestNet::start();
    net.register("alice");
    net.register("bob");
    let mut alice = Chat::login(&net.opts("alice"), false).unwrap();
    alice.send_text("bob", "one").unwrap();
    alice.close();

    // As after a crash (or a failed send): "one" stored by the relay but still pending
    // here (its copy must be dropped by bob), "two" never sent at all.
    let opts = net.opts("alice");
    let mut store = Store::open(&opts.data_dir, "alice", &opts.password).unwrap();
    let one = store.history().unwrap()[0].mid.clone();
    store
        .set_delivery_state(&one, DeliveryState::Pending)
        .unwrap();
    let two_mid = fastchat_client::e2e::new_message_id();
    store
        .push_history(&HistoryEntry {
            peer: "bob".into(),
            group: None,
            from: "alice".into(),
            text: "two".into(),
            ts: fastchat_common::time::now_ms(),
            msg_id: None,
            mid: two_mid.clone(),
            outgoing: true,
            state: DeliveryState::Pending,
            file: false,
        })
        .unwrap();
    drop(store);

    // A receiving login sends both again, oldest first.
    let alice = net.login("alice");
    assert_eq!(
        own_states(&alice),
        vec![
            ("one".to_string(), DeliveryState::Stored),
            ("two".to_string(), DeliveryState::Stored)
        ]
    );
    alice.close();
    let mut bob = net.login("bob");
    let mut got = receive_n(&mut bob, 3, Duration::from_secs(8));
    got.sort_by_key(|m| m.ts);
    let texts: Vec<&str> = got.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["one", "two"], "each shown once");
    assert_eq!(got[1].mid, two_mid, "sent again under its own mid");
}
