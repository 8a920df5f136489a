//! The local store with several processes of one user, lost keys and crashes: real
//! servers, real `fastchat` processes.

mod harness;

use fastchat_client::chat::{Chat, Event};
use fastchat_client::recovery::RecoveryPolicy;
use fastchat_client::store::Store;
use harness::{add_member, eventually, Settings, TestNet, PASSWORD};
use std::collections::HashMap;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Starts `fastchat read --wait SECS --json` for `user`, its stdout and stderr in files.
fn reader(net: &TestNet, user: &str, secs: u64, tag: &str) -> (Child, std::path::PathBuf) {
    let out = net.home.join(format!("{user}-{tag}.out"));
    let child = net
        .fastchat(user)
        .args(["read", "--wait", &secs.to_string(), "--json"])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(out.with_extension("err")).unwrap())
        .spawn()
        .expect("starting fastchat read");
    (child, out)
}

/// The (from, text) pairs a reader printed, with how often.
fn printed(out: &std::path::Path) -> HashMap<(String, String), usize> {
    let mut seen = HashMap::new();
    for line in std::fs::read_to_string(out).unwrap_or_default().lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        if let (Some(from), Some(text)) = (v["from"].as_str(), v["text"].as_str()) {
            *seen
                .entry((from.to_string(), text.to_string()))
                .or_insert(0) += 1;
        }
    }
    seen
}

/// Waits until a receiving session of `user` is up (its presence is committed).
fn wait_logged_in(net: &TestNet, user: &str) {
    let mut db = postgres::Client::connect(&net.db_url, postgres::NoTls).unwrap();
    eventually(&format!("{user}'s reader logged in"), true, || {
        db.query_one(
            "SELECT count(*) FROM presence p JOIN users u ON u.id = p.user_id WHERE u.name = $1",
            &[&user],
        )
        .map(|r| r.get::<_, i64>(0) > 0)
        .unwrap_or(false)
    });
}

#[test]
fn a_reader_and_sends_of_the_same_user_share_one_store() {
    let net = TestNet::start();
    let users = ["u1", "u2", "u3"];
    for u in users {
        net.register(u);
    }
    let readers: Vec<_> = users
        .iter()
        .map(|u| (u, reader(&net, u, 40, "live")))
        .collect();
    for u in users {
        wait_logged_in(&net, u);
    }
    std::thread::sleep(Duration::from_secs(2));
    for round in ["pair", "reply"] {
        for a in users {
            for b in users {
                if a != b {
                    let (ok, _, err) =
                        net.cli(a, &["send", "--to", b, &format!("{round}-{a}-{b}")]);
                    assert!(ok, "{a} → {b}: {err}");
                }
            }
        }
    }
    for (user, (mut child, out)) in readers {
        let want: Vec<(String, String)> = ["pair", "reply"]
            .iter()
            .flat_map(|round| {
                users
                    .iter()
                    .filter(|a| *a != user)
                    .map(move |a| (a.to_string(), format!("{round}-{a}-{user}")))
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(45);
        while Instant::now() < deadline && !want.iter().all(|w| printed(&out).contains_key(w)) {
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = child.kill();
        let _ = child.wait();
        let got = printed(&out);
        let errors = std::fs::read_to_string(out.with_extension("err")).unwrap_or_default();
        for w in &want {
            assert_eq!(
                got.get(w),
                Some(&1),
                "{user} printed {w:?} once: {got:?}\n{errors}"
            );
        }
        assert_eq!(got.len(), want.len(), "{user}: {got:?}");
        assert!(!errors.contains("could not be opened"), "{user}: {errors}");
        // Every conversation has one key, made in one place.
        let store = Store::open(&net.opts(user).data_dir, user, PASSWORD).unwrap();
        for peer in users.iter().filter(|p| **p != *user) {
            let keys = store.conversation(peer).unwrap().keys.len();
            assert!((1..=2).contains(&keys), "{user}/{peer}: {keys} keys");
        }
    }
}

#[test]
fn twenty_concurrent_sends_and_two_readers_lose_no_key_and_no_history() {
    // The auth server counts a user's logins in flight against their failure limit:
    // 22 at once must not trip it here.
    let net = TestNet::with(Settings {
        login_failures_per_user: 50,
        ..Settings::default()
    });
    let peers = ["bob", "carol", "dave", "erin"];
    net.register("alice");
    for p in peers {
        net.register(p);
    }
    let first = reader(&net, "alice", 30, "first");
    let second = reader(&net, "alice", 30, "second");
    wait_logged_in(&net, "alice");
    std::thread::sleep(Duration::from_secs(2));
    let sends: Vec<_> = (0..20)
        .map(|i| {
            let to = peers[i % peers.len()];
            net.fastchat("alice")
                .args(["send", "--to", to, &format!("note {i} to {to}")])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in sends {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (mut child, _) in [first, second] {
        let _ = child.kill();
        let _ = child.wait();
    }
    let store = Store::open(&net.opts("alice").data_dir, "alice", PASSWORD).unwrap();
    let history = store.history().unwrap();
    for i in 0..20 {
        let to = peers[i % peers.len()];
        let text = format!("note {i} to {to}");
        let rows: Vec<_> = history.iter().filter(|h| h.text == text).collect();
        assert_eq!(rows.len(), 1, "{text}: {rows:?}");
        assert_eq!(rows[0].peer, to);
    }
    for p in peers {
        assert_eq!(
            store.conversation(p).unwrap().keys.len(),
            1,
            "one key for alice/{p} however many sends raced"
        );
        let mut chat = net.login(p);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut got = Vec::new();
        while got.len() < 5 && Instant::now() < deadline {
            for e in chat.receive(deadline).unwrap() {
                match e {
                    Event::Message(m) => got.push(m.text),
                    e @ (Event::Undecryptable { .. } | Event::Recovering { .. }) => {
                        panic!("{p} could not open a message: {e:?}")
                    }
                    _ => {}
                }
            }
        }
        got.sort();
        let mut want: Vec<String> = (0..20)
            .filter(|i| peers[i % peers.len()] == p)
            .map(|i| format!("note {i} to {p}"))
            .collect();
        want.sort();
        assert_eq!(got, want, "{p} got each once");
    }
}

/// Receives on both sessions until `want` holds for `bob`'s shown texts.
fn exchange(
    alice: &mut Chat,
    bob: &mut Chat,
    shown: &mut HashMap<String, usize>,
    want: &[&str],
) -> Vec<Event> {
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !want.iter().all(|w| shown.contains_key(*w)) {
        alice
            .receive(Instant::now() + Duration::from_millis(300))
            .unwrap();
        for e in bob
            .receive(Instant::now() + Duration::from_millis(300))
            .unwrap()
        {
            if let Event::Message(m) = &e {
                *shown.entry(m.text.clone()).or_insert(0) += 1;
            }
            events.push(e);
        }
    }
    events
}

#[test]
fn a_lost_conversation_key_is_recovered_and_each_message_shown_once() {
    let net = TestNet::start();
    for u in ["alice", "bob", "carol"] {
        net.register(u);
    }
    let mut alice = net.login("alice");
    let mut bob = net.login("bob");
    alice.send_text("bob", "one").unwrap();
    let mut shown = HashMap::new();
    exchange(&mut alice, &mut bob, &mut shown, &["one"]);

    // Bob's store loses the key (as the old store's last-writer-wins race did).
    let key_id = {
        let mut store = Store::open(&net.opts("bob").data_dir, "bob", PASSWORD).unwrap();
        let conv = store.conversation("alice").unwrap();
        let key_id = conv.current.clone().unwrap();
        store.delete_key("alice", &key_id).unwrap();
        key_id
    };
    alice.send_text("bob", "two").unwrap();
    alice.send_text("bob", "three").unwrap();
    let events = exchange(&mut alice, &mut bob, &mut shown, &["two", "three"]);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Recovering { from, .. } if from == "alice")),
        "bob was told while it was recovered: {events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::Undecryptable { .. })),
        "{events:?}"
    );
    // A little longer: no copy shows again.
    exchange(&mut alice, &mut bob, &mut shown, &["never"]);
    assert_eq!(shown.get("one"), Some(&1));
    assert_eq!(shown.get("two"), Some(&1), "{shown:?}");
    assert_eq!(shown.get("three"), Some(&1), "{shown:?}");
    let store = Store::open(&net.opts("bob").data_dir, "bob", PASSWORD).unwrap();
    assert!(
        store.conversation_key("alice", &key_id).unwrap().is_some(),
        "the key is back"
    );
    assert_eq!(store.inbox_len().unwrap(), 0, "nothing left held");

    // Someone else asking for the key of alice and bob gets nothing: the request is
    // checked against carol's own key and names no message alice sent carol.
    let mut carol = net.login("carol");
    let mut carol_store_events = Vec::new();
    {
        let ids: Vec<i64> = store
            .history()
            .unwrap()
            .iter()
            .filter_map(|h| h.msg_id)
            .collect();
        carol.request_key("alice", &key_id, None, &ids).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        alice
            .receive(Instant::now() + Duration::from_millis(300))
            .unwrap();
        carol_store_events.extend(
            carol
                .receive(Instant::now() + Duration::from_millis(300))
                .unwrap(),
        );
    }
    assert!(
        !carol_store_events
            .iter()
            .any(|e| matches!(e, Event::Message(_))),
        "{carol_store_events:?}"
    );
}

#[test]
fn a_message_whose_key_never_comes_is_reported_not_dropped() {
    let net = TestNet::start();
    for u in ["alice", "bob"] {
        net.register(u);
    }
    let mut alice = Chat::login(&net.opts("alice"), false).unwrap();
    alice.send_text("bob", "first").unwrap();
    let mut bob = net.login("bob");
    bob.set_recovery_policy(RecoveryPolicy {
        intervals: vec![Duration::from_millis(500), Duration::from_millis(500)],
    });
    let mut shown = HashMap::new();
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    // Alice never reads (a send-only session): her key is never offered again. Bob
    // deletes the key before the message opens.
    let mut store = Store::open(&net.opts("bob").data_dir, "bob", PASSWORD).unwrap();
    while Instant::now() < deadline && shown.is_empty() {
        for e in bob
            .receive(Instant::now() + Duration::from_millis(300))
            .unwrap()
        {
            if let Event::Message(m) = &e {
                shown.insert(m.text.clone(), 1);
            }
        }
    }
    let key_id = store.conversation("alice").unwrap().current.unwrap();
    store.delete_key("alice", &key_id).unwrap();
    alice.send_text("bob", "second").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline
        && !events
            .iter()
            .any(|e| matches!(e, Event::Undecryptable { .. }))
    {
        events.extend(
            bob.receive(Instant::now() + Duration::from_millis(300))
                .unwrap(),
        );
    }
    let given_up: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Undecryptable { from, why, .. } => Some((from.clone(), why.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(given_up.len(), 1, "{events:?}");
    assert_eq!(given_up[0].0, "alice");
    assert!(given_up[0].1.contains("could not be read"), "{given_up:?}");
    assert!(events.iter().any(|e| matches!(e, Event::Recovering { .. })));
    assert_eq!(store.inbox_len().unwrap(), 0);
}

#[test]
fn a_lost_group_key_is_asked_for_and_the_text_opens() {
    let net = TestNet::start();
    for u in ["alice", "bob"] {
        net.register(u);
    }
    let mut alice = net.login("alice");
    let mut bob = net.login("bob");
    let g = alice.group_create("crew").unwrap();
    add_member(&mut alice, g.group_id, &mut bob);
    alice.send_group(g.group_id, "hello crew").unwrap();
    let mut shown = HashMap::new();
    exchange(&mut alice, &mut bob, &mut shown, &["hello crew"]);
    let conv = format!("#{}", g.group_id);
    {
        let mut store = Store::open(&net.opts("bob").data_dir, "bob", PASSWORD).unwrap();
        let key_id = store.conversation(&conv).unwrap().current.unwrap();
        store.delete_key(&conv, &key_id).unwrap();
    }
    alice.send_group(g.group_id, "still there?").unwrap();
    let events = exchange(&mut alice, &mut bob, &mut shown, &["still there?"]);
    assert_eq!(shown.get("still there?"), Some(&1), "{events:?}");
    assert!(events.iter().any(|e| matches!(e, Event::Recovering { .. })));
}

#[test]
fn a_reader_killed_mid_batch_loses_nothing_it_acknowledged() {
    let net = TestNet::start();
    net.register("alice");
    net.register("bob");
    let mut alice = Chat::login(&net.opts("alice"), false).unwrap();
    let n = 300;
    for i in 0..n {
        alice.send_text("bob", &format!("m{i:03}")).unwrap();
    }
    alice.close();
    for round in 0..3 {
        let (mut child, out) = reader(&net, "bob", 20, &format!("kill{round}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline
            && std::fs::read_to_string(&out)
                .unwrap_or_default()
                .lines()
                .count()
                < 20 * (round + 1)
            && child.try_wait().unwrap().is_none()
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        // SIGKILL: no chance to clean up.
        let _ = child.kill();
        let _ = child.wait();
    }
    // What the relay still holds was never acknowledged; everything else must be in
    // bob's history. A last reader takes the rest.
    let (mut child, _) = reader(&net, "bob", 3, "last");
    let _ = child.wait();
    let store = Store::open(&net.opts("bob").data_dir, "bob", PASSWORD).unwrap();
    let history = store.history().unwrap();
    for i in 0..n {
        let text = format!("m{i:03}");
        let count = history.iter().filter(|h| h.text == text).count();
        assert_eq!(count, 1, "{text} is in bob's history once");
    }
    assert_eq!(store.inbox_len().unwrap(), 0);
    eventually("the relay holds nothing for bob", 0, || {
        net.stored_messages()
    });
}

#[test]
fn a_key_request_from_a_name_that_is_no_user_gets_nothing() {
    // A database operator adds a "user" named like a group's conversation (`#<id>`)
    // and writes a key request from it: the client must not answer with the group's key
    // or history (they are kept under that name).
    let net = TestNet::start();
    for u in ["alice", "bob"] {
        net.register(u);
    }
    let mut alice = net.login("alice");
    let mut bob = net.login("bob");
    let g = alice.group_create("crew").unwrap();
    add_member(&mut alice, g.group_id, &mut bob);
    alice.send_group(g.group_id, "group secret").unwrap();
    let mut shown = HashMap::new();
    exchange(&mut alice, &mut bob, &mut shown, &["group secret"]);
    let conv = format!("#{}", g.group_id);
    let (key_id, msg_ids) = {
        let store = Store::open(&net.opts("bob").data_dir, "bob", PASSWORD).unwrap();
        let key_id = store.conversation(&conv).unwrap().current.unwrap();
        let ids: Vec<i64> = store
            .history()
            .unwrap()
            .iter()
            .filter_map(|h| h.msg_id)
            .collect();
        (key_id, ids)
    };
    let attacker = fastchat_client::e2e::Identity::generate().unwrap();
    let body = fastchat_client::e2e::make_key_request(
        &attacker,
        &conv,
        "bob",
        &fastchat_client::e2e::KeyRequest {
            key_id,
            group_id: None,
            msg_ids,
            ts: fastchat_common::time::now_ms(),
        },
    )
    .unwrap()
    .to_body();
    let mut db = postgres::Client::connect(&net.db_url, postgres::NoTls).unwrap();
    db.execute(
        "INSERT INTO users (name, password_hash, pubkey) VALUES ($1, 'x', $2)",
        &[&conv, &attacker.public_pem()],
    )
    .unwrap();
    db.execute(
        "INSERT INTO messages (recipient_id, sender_id, body, sent_at_ms)
         SELECT r.id, s.id, $2, 0 FROM users r, users s WHERE r.name = 'bob' AND s.name = $1",
        &[&conv, &body],
    )
    .unwrap();
    bob.close();
    let mut bob = net.login("bob");
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut events = Vec::new();
    while Instant::now() < deadline {
        events.extend(
            bob.receive(Instant::now() + Duration::from_millis(300))
                .unwrap(),
        );
    }
    assert!(
        events.iter().any(
            |e| matches!(e, Event::Undecryptable { from, why, .. } if *from == conv && why.contains("not a user name"))
        ),
        "{events:?}"
    );
    let sent_to_attacker: i64 = db
        .query_one(
            "SELECT count(*) FROM messages m JOIN users u ON u.id = m.recipient_id WHERE u.name = $1",
            &[&conv],
        )
        .unwrap()
        .get(0);
    assert_eq!(sent_to_attacker, 0, "nothing was sent to the fake user");
}
