//! A hostile database operator against the end-to-end promise: messages copied,
//! re-attributed, re-routed and replayed with SQL straight into PostgreSQL, read by the
//! real clients. None may be shown as what it is not, or twice.

mod harness;

use fastchat_client::chat::{Chat, Event};
use fastchat_client::store::Store;
use harness::{add_member, TestNet, PASSWORD};
use std::time::{Duration, Instant};

/// Everything `chat` reports for `secs` seconds.
fn events_for(chat: &mut Chat, secs: u64) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut events = Vec::new();
    while Instant::now() < deadline {
        events.extend(
            chat.receive(Instant::now() + Duration::from_millis(300))
                .unwrap(),
        );
    }
    events
}

fn texts(events: &[Event]) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some((m.from.clone(), m.text.clone())),
            _ => None,
        })
        .collect()
}

fn refused(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::Undecryptable { why, .. } if why.contains("refused") || why.contains("did not come through")))
        .count()
}

fn db(net: &TestNet) -> postgres::Client {
    postgres::Client::connect(&net.db_url, postgres::NoTls).unwrap()
}

/// The body of the message waiting for `recipient` whose sender is `sender`.
fn waiting_body(net: &TestNet, recipient: &str, sender: &str) -> String {
    db(net)
        .query_one(
            "SELECT m.body FROM messages m JOIN users r ON r.id = m.recipient_id
             JOIN users s ON s.id = m.sender_id WHERE r.name = $1 AND s.name = $2
             ORDER BY m.id DESC LIMIT 1",
            &[&recipient, &sender],
        )
        .unwrap()
        .get(0)
}

/// Messages stored for `user`; with `system`, the relay's own membership events too.
fn messages_to(db: &mut postgres::Client, user: &str, system: bool) -> i64 {
    db.query_one(
        "SELECT count(*) FROM messages m JOIN users u ON u.id = m.recipient_id
         WHERE u.name = $1 AND ($2 OR NOT m.system)",
        &[&user, &system],
    )
    .unwrap()
    .get(0)
}

/// Writes a message row as the operator would.
fn insert(net: &TestNet, recipient: &str, sender: &str, group_id: Option<i64>, body: &str) {
    db(net)
        .execute(
            "INSERT INTO messages (recipient_id, sender_id, body, sent_at_ms, group_id)
             SELECT r.id, s.id, $3, 0, $4 FROM users r, users s WHERE r.name = $1 AND s.name = $2",
            &[&recipient, &sender, &body, &group_id],
        )
        .unwrap();
}

#[test]
fn a_message_reflected_to_its_sender_is_refused() {
    let net = TestNet::start();
    net.register("alice");
    net.register("bob");
    let mut alice = net.login("alice");
    alice.send_text("bob", "for bob's eyes").unwrap();
    // One key serves both directions: the operator copies alice's text to bob into
    // alice's own mailbox, as from bob.
    let body = waiting_body(&net, "bob", "alice");
    insert(&net, "alice", "bob", None, &body);
    // Rows the operator writes are delivered at the next login.
    alice.close();
    let mut alice = net.login("alice");
    let events = events_for(&mut alice, 4);
    assert!(texts(&events).is_empty(), "shown: {events:?}");
    assert_eq!(refused(&events), 1, "{events:?}");
    assert_eq!(alice.integrity_refusals(), 1);
    // Bob still reads it, once.
    let mut bob = net.login("bob");
    let events = events_for(&mut bob, 3);
    assert_eq!(texts(&events), [("alice".into(), "for bob's eyes".into())]);
}

#[test]
fn a_group_message_under_another_sender_or_outside_its_group_is_refused() {
    let net = TestNet::start();
    for u in ["alice", "bob", "carol"] {
        net.register(u);
    }
    let mut alice = net.login("alice");
    let g = alice.group_create("crew").unwrap();
    let mut bob = net.login("bob");
    add_member(&mut alice, g.group_id, &mut bob);
    alice.group_add(g.group_id, "carol").unwrap();
    // Bob takes his keys first, then is offline while alice writes.
    events_for(&mut bob, 3);
    bob.close();
    alice.send_group(g.group_id, "from alice").unwrap();
    let body = waiting_body(&net, "bob", "alice");
    // The same text again, as from carol; and as a direct message from alice (what a
    // removed member with an old key could send).
    insert(&net, "bob", "carol", Some(g.group_id), &body);
    insert(&net, "bob", "alice", None, &body);
    let mut bob = net.login("bob");
    let events = events_for(&mut bob, 5);
    assert_eq!(
        texts(&events),
        [("alice".into(), "from alice".into())],
        "only the real one: {events:?}"
    );
    assert_eq!(refused(&events), 2, "{events:?}");
}

#[test]
fn a_text_replayed_after_the_duplicate_window_is_not_shown_again() {
    let net = TestNet::start();
    net.register("alice");
    net.register("bob");
    let mut alice = Chat::login(&net.opts("alice"), false).unwrap();
    alice.send_text("bob", "only once").unwrap();
    let body = waiting_body(&net, "bob", "alice");
    let mut bob = net.login("bob");
    let events = events_for(&mut bob, 3);
    assert_eq!(texts(&events), [("alice".into(), "only once".into())]);
    bob.close();
    // Long after: the bounded windows of server and sender ids have moved on (as after
    // 100,000 other messages), and the operator writes the old ciphertext again.
    {
        let store = Store::open(&net.opts("bob").data_dir, "bob", PASSWORD).unwrap();
        drop(store);
        let conn =
            rusqlite::Connection::open(net.opts("bob").data_dir.join("bob/store.db")).unwrap();
        conn.execute_batch("DELETE FROM seen_mids; DELETE FROM seen_msg_ids;")
            .unwrap();
    }
    insert(&net, "bob", "alice", None, &body);
    let mut bob = net.login("bob");
    let events = events_for(&mut bob, 4);
    assert!(texts(&events).is_empty(), "shown again: {events:?}");
    bob.close();
    // Even with the history's record of it gone, the counter sealed inside refuses it
    // (quietly: a counter acted on before is a duplicate).
    rusqlite::Connection::open(net.opts("bob").data_dir.join("bob/store.db"))
        .unwrap()
        .execute_batch("DELETE FROM seen_msg_ids; UPDATE history SET dedup = NULL;")
        .unwrap();
    insert(&net, "bob", "alice", None, &body);
    let mut bob = net.login("bob");
    let events = events_for(&mut bob, 4);
    assert!(
        events.iter().all(|e| matches!(e, Event::Synced)),
        "shown again: {events:?}"
    );
    // A new message after all that is shown.
    alice.send_text("bob", "and this one").unwrap();
    let events = events_for(&mut bob, 3);
    assert_eq!(texts(&events), [("alice".into(), "and this one".into())]);
}

#[test]
fn a_welcome_for_another_user_is_refused() {
    use fastchat_client::connect::{RelayLink, RelayTarget};
    use fastchat_common::link::Link;
    use fastchat_common::noise::{Role, StaticKeypair};
    use fastchat_common::proto::{ClientToRelay, RelayToClient};
    // A relay (here a fake one with its own key) that welcomes the session under
    // another name: offers would then be signed as "mallory".
    let key = StaticKeypair::generate();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let private = StaticKeypair {
        private: key.private.clone(),
        public: key.public.clone(),
    };
    let relay = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut link = Link::over(
            stream,
            Role::NkResponder(&private),
            fastchat_common::frame::DEFAULT_MAX_FRAME,
            Duration::from_secs(5),
        )
        .unwrap();
        let deadline = Some(Instant::now() + Duration::from_secs(5));
        let hello = link.recv::<ClientToRelay>(deadline).unwrap();
        assert!(
            matches!(hello, Some(ClientToRelay::Hello { .. })),
            "{hello:?}"
        );
        let login = link.recv::<ClientToRelay>(deadline).unwrap();
        assert!(
            matches!(login, Some(ClientToRelay::Resume { .. })),
            "{login:?}"
        );
        link.send(&RelayToClient::Hello { version: 1 }).unwrap();
        link.send(&RelayToClient::Welcome {
            user: "mallory".into(),
            user_id: 7,
        })
        .unwrap();
        // Hold the link until the client has decided.
        let _ = link.recv::<ClientToRelay>(deadline);
    });
    let target = RelayTarget {
        addr,
        key: key.public.clone(),
    };
    let result = RelayLink::resume(&target, "alice", "a-credential", true);
    let Err(e) = result else {
        panic!("a session welcomed as another user was taken")
    };
    assert!(e.to_string().contains("mallory"), "{e}");
    relay.join().unwrap();
}

#[test]
fn a_grant_for_an_epoch_the_group_has_not_reached_never_becomes_current() {
    use fastchat_client::e2e::{self, Context, ConversationKey, GroupKeyGrant, TextPayload};
    let net = TestNet::start();
    for u in ["alice", "bob"] {
        net.register(u);
    }
    let mut alice = net.login("alice");
    let g = alice.group_create("crew").unwrap();
    let mut bob = net.login("bob");
    add_member(&mut alice, g.group_id, &mut bob);
    events_for(&mut bob, 3);
    assert_eq!(bob.group_key_epoch(g.group_id), Some(1));
    bob.close();
    // A grant from the admin's own pairwise key (as a colluding admin client, or
    // anyone holding that key, could write) for epoch 2^31-1.
    let key = {
        let store = Store::open(&net.opts("alice").data_dir, "alice", PASSWORD).unwrap();
        let (key, _) = store.current_key("bob").unwrap().unwrap();
        key
    };
    let fake = ConversationKey::generate();
    let payload = TextPayload {
        group_key: Some(GroupKeyGrant {
            group_id: g.group_id,
            key_id: fake.id.clone(),
            epoch: i32::MAX,
            key: fake.key.clone(),
        }),
        file: None,
        mid: e2e::new_message_id(),
        ts: fastchat_common::time::now_ms(),
        text: String::new(),
    };
    let body = e2e::seal_text_in(
        &key,
        &payload,
        &Context::direct("alice", "bob").stamped(e2e::Stamp {
            sid: "00112233445566ff".into(),
            n: 1,
        }),
    )
    .unwrap()
    .to_body();
    insert(&net, "bob", "alice", None, &body);
    let mut bob = net.login("bob");
    events_for(&mut bob, 3);
    assert_eq!(
        bob.group_key_epoch(g.group_id),
        Some(1),
        "the group's real epoch stays current"
    );
    // A rotation after a removal still takes over.
    net.register("carol");
    alice.group_add(g.group_id, "carol").unwrap();
    alice.group_remove(g.group_id, "carol").unwrap();
    events_for(&mut bob, 4);
    assert_eq!(bob.group_key_epoch(g.group_id), Some(2));
}

#[test]
fn a_ghost_member_the_operator_adds_is_handed_no_key() {
    let net = TestNet::start();
    for u in ["alice", "bob", "mallory"] {
        net.register(u);
    }
    let mut alice = net.login("alice");
    let g = alice.group_create("crew").unwrap();
    add_member(&mut alice, g.group_id, &mut net.login("bob"));
    alice.close();
    // The operator adds mallory to the group's rows and forges a removal (epoch + 1),
    // which makes an admin rotate the key and hand it to every member.
    let mut db = db(&net);
    db.batch_execute(&format!(
        "INSERT INTO group_members (group_id, user_id, role)
             SELECT {gid}, id, 'member' FROM users WHERE name = 'mallory';
         UPDATE groups SET epoch = epoch + 1 WHERE id = {gid};
         INSERT INTO messages (recipient_id, sender_id, body, sent_at_ms, group_id, system)
             SELECT a.id, a.id, '{{\"event\":\"removed\",\"user\":\"bob\",\"by\":\"alice\",\"epoch\":2}}',
                    0, {gid}, true
             FROM users a WHERE a.name = 'alice';",
        gid = g.group_id
    ))
    .unwrap();
    let mut alice = net.login("alice");
    let events = events_for(&mut alice, 4);
    assert!(
        events.iter().any(|e| matches!(e, Event::Group(_))),
        "the forged event arrived: {events:?}"
    );
    // The chain shows no removal, so the forged epoch moves nothing.
    assert_eq!(
        alice.group_key_epoch(g.group_id),
        Some(1),
        "no rotation on the relay's word"
    );
    let to_mallory = messages_to(&mut db, "mallory", true);
    assert_eq!(to_mallory, 0, "nothing was sent to the ghost");
    // A real rotation (alice removes carol, signed) goes to the roster's members only.
    net.register("carol");
    alice.group_add(g.group_id, "carol").unwrap();
    alice.group_remove(g.group_id, "carol").unwrap();
    assert_eq!(alice.group_key_epoch(g.group_id), Some(2));
    let to_mallory = messages_to(&mut db, "mallory", false);
    // (The relay's own membership events do reach the rows it lists: they hold no key.)
    assert_eq!(
        to_mallory, 0,
        "nothing was sent to the ghost after a rotation either"
    );
    let mut bob = net.login("bob");
    events_for(&mut bob, 3);
    assert_eq!(
        bob.group_key_epoch(g.group_id),
        Some(2),
        "bob, in the roster, got it"
    );
}

#[test]
fn an_altered_roster_is_a_warning_and_takes_no_grant() {
    let net = TestNet::start();
    for u in ["alice", "bob"] {
        net.register(u);
    }
    let mut alice = net.login("alice");
    let g = alice.group_create("crew").unwrap();
    alice.group_add(g.group_id, "bob").unwrap();
    // The operator rewrites the creation so that it names someone else. Bob has not
    // verified the chain yet: the grant alice sent him cannot be checked against it.
    db(&net)
        .execute(
            "UPDATE group_roster SET body = replace(body, '\"user\":\"alice\"', '\"user\":\"mallory\"')
             WHERE group_id = $1 AND seq = 0",
            &[&g.group_id],
        )
        .unwrap();
    alice
        .send_text("bob", "a direct message still arrives")
        .unwrap();
    let mut bob = net.login("bob");
    let events = events_for(&mut bob, 4);
    assert!(
        events.iter().any(
            |e| matches!(e, Event::Undecryptable { why, .. } if why.contains("does not verify"))
        ),
        "{events:?}"
    );
    assert_eq!(
        bob.group_key_epoch(g.group_id),
        None,
        "no key taken on a forged chain"
    );
    assert!(
        texts(&events).contains(&("alice".into(), "a direct message still arrives".into())),
        "{events:?}"
    );
    // Alice's own last statement altered: she is told at her next look at the chain.
    db(&net)
        .execute(
            "UPDATE group_roster SET body = replace(body, '\"user\":\"bob\"', '\"user\":\"mallory\"')
             WHERE group_id = $1 AND seq = 1",
            &[&g.group_id],
        )
        .unwrap();
    let err = alice.roster(g.group_id).unwrap_err().to_string();
    assert!(err.contains("does not verify"), "{err}");
}

#[test]
fn a_hidden_roster_hands_the_relay_no_say() {
    let net = TestNet::start();
    for u in ["alice", "bob", "mallory"] {
        net.register(u);
    }
    let mut alice = net.login("alice");
    // Bob joins another of alice's groups first, so that he is added to this one
    // outright without ever looking at its chain.
    let first = alice.group_create("first").unwrap();
    add_member(&mut alice, first.group_id, &mut net.login("bob"));
    let g = alice.group_create("crew").unwrap();
    assert!(
        !alice.group_add(g.group_id, "bob").unwrap().invited,
        "they share a group: added outright"
    );
    alice.group_promote(g.group_id, "bob").unwrap();
    alice.close();
    // Before bob has seen the chain, the operator hides it, adds a ghost and forges a
    // removal: with no chain to check, a client must not fall back to the relay's list.
    let mut db = db(&net);
    db.batch_execute(&format!(
        "DELETE FROM group_roster WHERE group_id = {gid};
         INSERT INTO group_members (group_id, user_id, role)
             SELECT {gid}, id, 'member' FROM users WHERE name = 'mallory';
         UPDATE groups SET epoch = epoch + 1 WHERE id = {gid};
         INSERT INTO messages (recipient_id, sender_id, body, sent_at_ms, group_id, system)
             SELECT b.id, a.id, '{{\"event\":\"removed\",\"user\":\"carol\",\"by\":\"alice\",\"epoch\":2}}',
                    0, {gid}, true
             FROM users a, users b WHERE a.name = 'alice' AND b.name = 'bob';",
        gid = g.group_id
    ))
    .unwrap();
    let mut bob = net.login("bob");
    let events = events_for(&mut bob, 4);
    let to_mallory = messages_to(&mut db, "mallory", false);
    assert_eq!(to_mallory, 0, "nothing was handed to the ghost");
    assert!(
        events.iter().any(
            |e| matches!(e, Event::Undecryptable { why, .. } if why.contains("no signed roster"))
        ),
        "said: {events:?}"
    );
    assert_eq!(bob.group_key_epoch(g.group_id), None, "no key taken");
}

#[test]
fn two_histories_of_a_group_are_kept_as_evidence_and_said() {
    let net = TestNet::start();
    for u in ["alice", "bob", "carol", "dave"] {
        net.register(u);
    }
    let mut alice = net.login("alice");
    let g = alice.group_create("crew").unwrap();
    let mut bob = net.login("bob");
    add_member(&mut alice, g.group_id, &mut bob);
    alice.group_promote(g.group_id, "bob").unwrap();
    events_for(&mut bob, 2);
    assert!(bob.roster(g.group_id).unwrap().is_some_and(|r| r.seq == 2));
    // Alice adds carol (statement 3); the operator then takes it away, so that bob's
    // next change is accepted at the same place: two histories of one group.
    alice.group_add(g.group_id, "carol").unwrap();
    db(&net)
        .execute(
            "DELETE FROM group_roster WHERE group_id = $1 AND seq = 3",
            &[&g.group_id],
        )
        .unwrap();
    bob.group_add(g.group_id, "dave").unwrap();
    // Alice sees a statement 3 that is not hers, signed, naming the same previous one.
    let err = alice.roster(g.group_id).unwrap_err().to_string();
    assert!(err.contains("two histories"), "{err}");
    let forks = alice.store().roster_forks(g.group_id).unwrap();
    assert_eq!(forks.len(), 1, "{forks:?}");
    assert!(forks[0].ours.contains("\"carol\"") && forks[0].theirs.contains("\"dave\""));
    alice.close();
    // And the evidence can be printed.
    let out = net
        .fastchat("alice")
        .args(["group", "evidence", &format!("#{}", g.group_id)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(line["seq"], 3);
    assert_eq!(line["ours"]["user"], "carol");
    assert_eq!(line["theirs"]["user"], "dave");
    assert_eq!(line["ours"]["prev"], line["theirs"]["prev"]);
}
