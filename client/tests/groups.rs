//! Groups end to end: fan-out across relays, offline members, removal with key
//! rotation, refused operations, a group of 100, and the CLI.

mod harness;

use fastchat_client::chat::{self, Chat, Event};
use fastchat_client::e2e::{self, ConversationKey, Envelope, Identity};
use fastchat_client::error::ClientError;
use fastchat_client::store::Store;
use fastchat_common::proto::ErrorCode;
use harness::{add_member, receive_n, Settings, TestNet, PASSWORD};
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn code_of(e: ClientError) -> ErrorCode {
    match e {
        ClientError::Refused { code, .. } => code,
        other => panic!("expected a refusal, got {other}"),
    }
}

/// One identity for every test user: key generation is not what these tests test.
fn shared_identity() -> &'static Identity {
    static ID: std::sync::OnceLock<Identity> = std::sync::OnceLock::new();
    ID.get_or_init(|| Identity::generate().unwrap())
}

fn register(net: &TestNet, users: &[&str]) {
    for u in users {
        chat::register_with(&net.opts(u), shared_identity()).unwrap();
    }
}

/// Receives until the session holds a key for the group (at least `epoch`); returns
/// the texts that arrived meanwhile (other members may already be writing).
fn wait_for_key(chat: &mut Chat, group_id: i64, epoch: i32) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut early = Vec::new();
    while chat.group_key_epoch(group_id).is_none_or(|e| e < epoch) {
        assert!(
            Instant::now() < deadline,
            "{} got no key for epoch {epoch}",
            chat.user()
        );
        for e in chat
            .receive(Instant::now() + Duration::from_millis(100))
            .unwrap()
        {
            if let Event::Message(m) = e {
                early.push((m.from, m.text));
            }
        }
    }
    early
}

/// Receives until `n` group texts arrived (events are skipped).
fn group_texts(chat: &mut Chat, n: usize) -> Vec<(String, String)> {
    receive_n(chat, n, Duration::from_secs(60))
        .into_iter()
        .map(|m| {
            assert!(m.group.is_some(), "a group message: {m:?}");
            (m.from, m.text)
        })
        .collect()
}

#[test]
fn a_group_of_five_over_three_relays_gets_every_message_once_in_order() {
    let net = TestNet::with(Settings {
        relays: 3,
        ..Settings::default()
    });
    let users = ["alice", "bob", "carol", "dave", "erin"];
    register(&net, &users);
    let mut chats: Vec<Chat> = users.iter().map(|u| net.login(u)).collect();
    let relays: std::collections::HashSet<usize> = chats
        .iter()
        .map(|c| net.relay_index(c.relay_addr()))
        .collect();
    assert_eq!(relays.len(), 3, "members are spread over the three relays");

    let group = chats[0].group_create("team").unwrap();
    let (admin, others) = chats.split_at_mut(1);
    for member in others {
        add_member(&mut admin[0], group.group_id, member);
    }
    let received = std::thread::scope(|s| {
        let handles: Vec<_> = chats
            .into_iter()
            .map(|mut chat| {
                s.spawn(move || {
                    // Texts that came while waiting for the key count too.
                    let mut got = wait_for_key(&mut chat, group.group_id, 1);
                    for k in 0..20 {
                        chat.send_group(group.group_id, &format!("{} {k}", chat.user()))
                            .unwrap();
                    }
                    let me = chat.user().to_string();
                    let rest = 80 - got.len();
                    got.extend(group_texts(&mut chat, rest));
                    (me, got)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    for (me, got) in received {
        assert_eq!(got.len(), 80, "{me} got all 80");
        let mut per_sender: HashMap<String, Vec<String>> = HashMap::new();
        for (from, text) in got {
            assert_ne!(from, me);
            per_sender.entry(from).or_default().push(text);
        }
        assert_eq!(per_sender.len(), 4);
        for (from, texts) in per_sender {
            let expected: Vec<String> = (0..20).map(|k| format!("{from} {k}")).collect();
            assert_eq!(
                texts, expected,
                "{me}: {from}'s messages once each, in order"
            );
        }
    }
}

#[test]
fn an_offline_member_gets_the_messages_and_the_key_at_login() {
    let net = TestNet::with(Settings {
        relays: 2,
        ..Settings::default()
    });
    register(&net, &["alice", "bob", "carol"]);
    let mut alice = net.login("alice");
    let mut carol = net.login("carol");
    let group = alice.group_create("club").unwrap();
    add_member(&mut alice, group.group_id, &mut carol);
    // bob takes up the invitation, then is away while the group talks.
    add_member(&mut alice, group.group_id, &mut net.login("bob"));
    wait_for_key(&mut carol, group.group_id, 1);
    alice.send_group(group.group_id, "from alice").unwrap();
    carol.send_group(group.group_id, "from carol").unwrap();

    let mut bob = net.login("bob");
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while events
        .iter()
        .filter(|e| matches!(e, Event::Message(_)))
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "bob's events: {events:?}");
        events.extend(
            bob.receive(Instant::now() + Duration::from_millis(200))
                .unwrap(),
        );
    }
    let texts: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(format!("{}: {}", m.from, m.text)),
            _ => None,
        })
        .collect();
    assert_eq!(texts, vec!["alice: from alice", "carol: from carol"]);
    let notices: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Group(n) => Some(format!("{} {}", n.event.event, n.event.user)),
            _ => None,
        })
        .collect();
    assert_eq!(
        notices,
        vec!["invited bob", "joined bob"],
        "bob sees that he was invited and joined"
    );
}

#[test]
fn a_removed_member_gets_nothing_new_and_cannot_read_after_rotation() {
    let net = TestNet::with(Settings {
        relays: 2,
        ..Settings::default()
    });
    register(&net, &["alice", "bob", "carol"]);
    let mut alice = net.login("alice");
    let mut bob = net.login("bob");
    let mut carol = net.login("carol");
    let group = alice.group_create("secret").unwrap();
    add_member(&mut alice, group.group_id, &mut bob);
    add_member(&mut alice, group.group_id, &mut carol);
    wait_for_key(&mut bob, group.group_id, 1);
    wait_for_key(&mut carol, group.group_id, 1);
    bob.send_group(group.group_id, "before").unwrap();
    assert_eq!(group_texts(&mut carol, 1)[0].1, "before");

    let after = alice.group_remove(group.group_id, "carol").unwrap();
    assert_eq!(after.epoch, 2);
    wait_for_key(&mut bob, group.group_id, 2);
    bob.send_group(group.group_id, "after the rotation")
        .unwrap();

    // carol hears of her removal and nothing else.
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline {
        events.extend(carol.receive(deadline).unwrap());
    }
    assert!(
        events.iter().all(|e| !matches!(e, Event::Message(_))),
        "nothing new for carol: {events:?}"
    );
    assert!(events.iter().any(
        |e| matches!(e, Event::Group(n) if n.event.event == "removed" && n.event.user == "carol")
    ));

    // The ciphertext alice's copy holds, handed to carol's keys: none of them opens it.
    let mut db = postgres::Client::connect(&net.db_url, postgres::NoTls).unwrap();
    let body: String = db
        .query_one(
            "SELECT body FROM messages WHERE group_id = $1 AND NOT system ORDER BY id DESC LIMIT 1",
            &[&group.group_id],
        )
        .unwrap()
        .get(0);
    let Envelope::GroupText {
        token,
        epoch,
        key_id,
        ..
    } = Envelope::from_body(&body).unwrap()
    else {
        panic!("a group text")
    };
    assert_eq!(epoch, 2);
    drop(carol);
    let store = Store::open(&net.opts("carol").data_dir, "carol", PASSWORD).unwrap();
    let keys = &store
        .conversation(&format!("#{}", group.group_id))
        .unwrap()
        .keys;
    assert!(!keys.is_empty(), "carol kept the old keys");
    assert!(!keys.contains_key(&key_id));
    for (id, key) in keys {
        let k = ConversationKey {
            id: id.clone(),
            key: key.clone(),
        };
        assert!(
            e2e::open_text(&k, &token).is_err(),
            "carol's key {id} must not open it"
        );
    }
    // alice, still in, reads it.
    let got = group_texts(&mut alice, 2);
    assert_eq!(got.last().unwrap().1, "after the rotation");
}

#[test]
fn refused_operations_are_refused_and_the_group_still_works() {
    let net = TestNet::with(Settings {
        extra_relay_args: vec!["--max-group-size".into(), "3".into()],
        ..Settings::default()
    });
    register(&net, &["alice", "bob", "carol", "dave"]);
    let mut alice = net.login("alice");
    let mut bob = net.login("bob");
    let mut dave = Chat::login(&net.opts("dave"), false).unwrap();
    let gid = alice.group_create("team").unwrap().group_id;
    add_member(&mut alice, gid, &mut bob);
    wait_for_key(&mut bob, gid, 1);

    // Not a member: cannot send, look at members, or add.
    assert_eq!(
        code_of(dave.send_group(gid, "hi").unwrap_err()),
        ErrorCode::NotMember
    );
    assert_eq!(
        code_of(dave.group_members(gid).unwrap_err()),
        ErrorCode::NotMember
    );
    assert_eq!(
        code_of(dave.group_add(gid, "carol").unwrap_err()),
        ErrorCode::NotMember
    );
    // Not an admin.
    assert_eq!(
        code_of(bob.group_add(gid, "carol").unwrap_err()),
        ErrorCode::NotAdmin
    );
    assert_eq!(
        code_of(bob.group_remove(gid, "alice").unwrap_err()),
        ErrorCode::NotAdmin
    );
    assert_eq!(
        code_of(bob.group_promote(gid, "bob").unwrap_err()),
        ErrorCode::NotAdmin
    );
    // No such user, already a member.
    assert_eq!(
        code_of(alice.group_add(gid, "nobody").unwrap_err()),
        ErrorCode::UnknownUser
    );
    assert_eq!(
        code_of(alice.group_add(gid, "bob").unwrap_err()),
        ErrorCode::AlreadyMember
    );
    // Full at 3, an invitation waiting counted.
    assert!(alice.group_add(gid, "carol").unwrap().invited);
    assert_eq!(
        code_of(alice.group_add(gid, "dave").unwrap_err()),
        ErrorCode::GroupFull
    );
    // A group that does not exist looks like one you are not in.
    assert_eq!(
        code_of(alice.group_members(gid + 1000).unwrap_err()),
        ErrorCode::NotMember
    );

    // Still works.
    alice.send_group(gid, "still here").unwrap();
    assert_eq!(
        group_texts(&mut bob, 1),
        vec![("alice".into(), "still here".into())]
    );
    let (_, members) = alice.group_members(gid).unwrap();
    let roles: Vec<String> = members
        .iter()
        .map(|m| format!("{}:{}", m.user, m.role))
        .collect();
    assert_eq!(roles, vec!["alice:admin", "bob:member", "carol:invited"]);
}

#[test]
fn the_last_admin_leaving_promotes_the_longest_standing_member_who_rotates() {
    let net = TestNet::start();
    register(&net, &["alice", "bob", "carol"]);
    let mut alice = net.login("alice");
    let mut bob = net.login("bob");
    let mut carol = net.login("carol");
    let gid = alice.group_create("trio").unwrap().group_id;
    add_member(&mut alice, gid, &mut bob);
    add_member(&mut alice, gid, &mut carol);
    wait_for_key(&mut bob, gid, 1);
    wait_for_key(&mut carol, gid, 1);
    alice.group_leave(gid).unwrap();
    // bob reads the events, finds himself admin, and rotates; carol gets the new key.
    wait_for_key(&mut bob, gid, 2);
    wait_for_key(&mut carol, gid, 2);
    let (_, members) = carol.group_members(gid).unwrap();
    let roles: Vec<String> = members
        .iter()
        .map(|m| format!("{}:{}", m.user, m.role))
        .collect();
    assert_eq!(roles, vec!["bob:admin", "carol:member"]);
    assert_eq!(
        alice.group_key_epoch(gid),
        Some(1),
        "the leaver has no new key"
    );
    carol.send_group(gid, "just us").unwrap();
    assert_eq!(group_texts(&mut bob, 1)[0].1, "just us");
}

#[test]
fn a_group_of_100_reaches_all_99_others_once() {
    let net = TestNet::start();
    let users: Vec<String> = (0..100).map(|i| format!("m{i:03}")).collect();
    std::thread::scope(|s| {
        for chunk in users.chunks(25) {
            let net = &net;
            s.spawn(move || {
                for u in chunk {
                    chat::register_with(&net.opts(u), shared_identity()).unwrap();
                }
            });
        }
    });
    let mut admin = Chat::login(&net.opts(&users[0]), false).unwrap();
    let gid = admin.group_create("hundred").unwrap().group_id;
    for u in &users[1..] {
        assert!(admin.group_add(gid, u).unwrap().invited);
    }
    // Each takes up the invitation.
    std::thread::scope(|s| {
        for chunk in users[1..].chunks(25) {
            let net = &net;
            s.spawn(move || {
                for u in chunk {
                    net.login(u).group_accept(gid).unwrap();
                }
            });
        }
    });
    assert_eq!(admin.group_members(gid).unwrap().1.len(), 100);
    admin.send_group(gid, "hello all").unwrap();
    let mut db = postgres::Client::connect(&net.db_url, postgres::NoTls).unwrap();
    let copies: i64 = db
        .query_one(
            "SELECT count(*) FROM messages WHERE group_id = $1 AND NOT system",
            &[&gid],
        )
        .unwrap()
        .get(0);
    assert_eq!(copies, 99, "stored once for each other member");
    let counts: Vec<usize> = std::thread::scope(|s| {
        let handles: Vec<_> = users[1..]
            .chunks(25)
            .map(|chunk| {
                let net = &net;
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|u| {
                            let mut chat = net.login(u);
                            let mut texts = 0;
                            let deadline = Instant::now() + Duration::from_secs(30);
                            let mut synced = false;
                            while !(synced && texts >= 1) && Instant::now() < deadline {
                                for e in chat.receive(deadline).unwrap() {
                                    match e {
                                        Event::Message(m) if m.text == "hello all" => texts += 1,
                                        Event::Synced => synced = true,
                                        _ => {}
                                    }
                                }
                            }
                            // Anything more would be a duplicate.
                            for e in chat
                                .receive(Instant::now() + Duration::from_millis(100))
                                .unwrap()
                            {
                                if matches!(e, Event::Message(_)) {
                                    texts += 1;
                                }
                            }
                            texts
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(counts.len(), 99);
    assert!(
        counts.iter().all(|c| *c == 1),
        "each member once: {counts:?}"
    );
}

#[test]
fn the_cli_runs_groups_by_name() {
    let net = TestNet::start();
    register(&net, &["alice", "bob"]);
    let cli_ok = |user: &str, args: &[&str]| -> String {
        let (ok, out, err) = net.cli(user, args);
        assert!(ok, "fastchat {args:?} as {user}: {err}");
        out
    };
    let out = cli_ok("alice", &["group", "create", "book club"]);
    assert!(out.contains("book club"), "{out}");
    let out = cli_ok("alice", &["group", "add", "book club", "bob"]);
    assert!(out.contains("invited bob"), "{out}");
    let members = cli_ok("bob", &["group", "members", "book club"]);
    assert!(
        members.contains("alice (admin)") && members.contains("  bob (invited"),
        "{members}"
    );
    // bob reads (the invitation, and the key), is told how to answer, and accepts.
    let (ok, out, err) = net.cli("bob", &["read"]);
    assert!(ok, "{err}");
    assert!(out.contains("alice invited bob to book club"), "{out}");
    assert!(err.contains("fastchat group accept"), "{err}");
    let invitations = cli_ok("bob", &["group", "invitations"]);
    assert!(invitations.contains("book club"), "{invitations}");
    cli_ok("bob", &["group", "accept", "book club"]);
    assert_eq!(cli_ok("bob", &["group", "invitations"]), "");
    cli_ok("bob", &["send", "--group", "book club", "chapter", "one"]);
    let out = cli_ok("alice", &["read", "--json"]);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let events: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l.get("event").is_some()).collect();
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "invited" && e["user"] == "bob" && e["group"] == "book club"),
        "{out}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "joined" && e["user"] == "bob"),
        "{out}"
    );
    let texts: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("text").is_some()).collect();
    assert_eq!(texts.len(), 1, "{out}");
    assert_eq!(texts[0]["group"], "book club");
    assert_eq!(texts[0]["from"], "bob");
    assert_eq!(texts[0]["text"], "chapter one");

    // Unknown and ambiguous names are clear errors.
    let (ok, _, err) = net.cli("alice", &["send", "--group", "no such", "x"]);
    assert!(!ok && err.contains("no group called"), "{err}");
    cli_ok("alice", &["group", "create", "book club"]);
    let (ok, _, err) = net.cli("alice", &["send", "--group", "book club", "x"]);
    assert!(!ok && err.contains("several groups called"), "{err}");
    let list = cli_ok("alice", &["group", "list"]);
    assert_eq!(list.lines().count(), 2, "{list}");
}

#[test]
fn an_invitation_keeps_its_place_and_the_relay_promotes_as_the_roster_does() {
    let net = TestNet::start();
    register(&net, &["alice", "bob", "carol"]);
    let mut alice = net.login("alice");
    let mut bob = net.login("bob");
    let mut carol = net.login("carol");
    let gid = alice.group_create("line").unwrap().group_id;
    // bob is invited first and waits; carol is invited after him and accepts.
    assert!(alice.group_add(gid, "bob").unwrap().invited);
    add_member(&mut alice, gid, &mut carol);
    let roles = |chat: &mut Chat| -> Vec<String> {
        let (_, members) = chat.group_members(gid).unwrap();
        members
            .iter()
            .map(|m| format!("{}:{}", m.user, m.role))
            .collect()
    };
    assert_eq!(
        roles(&mut carol),
        vec!["alice:admin", "bob:invited", "carol:member"]
    );
    // The last admin leaves: the longest-standing place is bob's invitation, as on the
    // signed roster, so it is the admin's place now (he still has to accept)...
    alice.group_leave(gid).unwrap();
    assert!(carol.roster(gid).unwrap().unwrap().is_admin("bob"));
    assert_eq!(roles(&mut carol), vec!["bob:invited", "carol:member"]);
    // ...and when he declines, carol is promoted, on the relay and on the roster alike.
    bob.group_decline(gid).unwrap();
    assert_eq!(roles(&mut carol), vec!["carol:admin"]);
    assert!(carol.roster(gid).unwrap().unwrap().is_admin("carol"));
    // She can do an admin's work there.
    assert!(carol.group_add(gid, "alice").unwrap().invited);
}
