use super::*;
use crate::e2e::ConversationKey;
use crate::replay::Verdict;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "fastchat-store-test-{}-{name}-{n}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn entry(peer: &str, from: &str, text: &str, mid: &str, outgoing: bool) -> HistoryEntry {
    HistoryEntry {
        peer: peer.into(),
        group: None,
        from: from.into(),
        text: text.into(),
        ts: 17,
        msg_id: Some(5),
        mid: mid.into(),
        outgoing,
        state: if outgoing {
            DeliveryState::Stored
        } else {
            DeliveryState::Received
        },
        file: false,
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn new_store(dir: &TempDir) -> Store {
    Store::create(&dir.0, "alice", "pw", "aWRlbnRpdHk=").unwrap()
}

/// Every byte of the database and its WAL and shared-memory files.
fn all_bytes(store: &Store) -> Vec<u8> {
    let mut bytes = Vec::new();
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = store.path().as_os_str().to_owned();
        name.push(suffix);
        if let Ok(b) = fs::read(PathBuf::from(name)) {
            bytes.extend(b);
        }
    }
    bytes
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn create_then_open_round_trip() {
    let tmp = TempDir::new("roundtrip");
    assert!(!Store::exists(&tmp.0, "alice"));
    let mut store = new_store(&tmp);
    assert!(Store::exists(&tmp.0, "alice"));
    assert_eq!(store.path(), tmp.0.join("alice").join("store.db"));
    store
        .put_peer(
            "bob",
            &PeerEntry {
                pubkey_pem: "PEM".into(),
                verified: true,
                key_changed: false,
            },
        )
        .unwrap();
    store
        .push_history(&entry("bob", "alice", "hi bob", "m1", true))
        .unwrap();
    drop(store);
    let opened = Store::open(&tmp.0, "alice", "pw").unwrap();
    assert_eq!(opened.identity_der(), "aWRlbnRpdHk=");
    assert_eq!(opened.peer("bob").unwrap().unwrap().pubkey_pem, "PEM");
    assert_eq!(opened.history().unwrap()[0].text, "hi bob");
    assert!(opened.peer("carol").unwrap().is_none());
}

#[test]
fn wrong_password_is_refused_and_a_change_rewraps_the_key() {
    let tmp = TempDir::new("password");
    let mut store = new_store(&tmp);
    store
        .push_history(&entry("bob", "alice", "kept", "m1", true))
        .unwrap();
    assert!(matches!(
        Store::open(&tmp.0, "alice", "wrong"),
        Err(StoreError::WrongPassword)
    ));
    store.change_password("new").unwrap();
    assert!(matches!(
        Store::open(&tmp.0, "alice", "pw"),
        Err(StoreError::WrongPassword)
    ));
    let opened = Store::open(&tmp.0, "alice", "new").unwrap();
    assert_eq!(opened.history().unwrap()[0].text, "kept");
}

#[test]
fn files_are_private_and_hold_no_plaintext() {
    let tmp = TempDir::new("private");
    let mut store = new_store(&tmp);
    let marker = "marker-7f3a9c-plaintext";
    store
        .push_history(&entry("zoe-the-peer", "alice", marker, "m1", true))
        .unwrap();
    let key = ConversationKey::generate();
    store
        .add_key("zoe-the-peer", &key, None, true, MakeCurrent::IfNone)
        .unwrap();
    store
        .put_peer(
            "zoe-the-peer",
            &PeerEntry {
                pubkey_pem: "-----BEGIN PUBLIC KEY-----".into(),
                verified: false,
                key_changed: false,
            },
        )
        .unwrap();
    let bytes = all_bytes(&store);
    assert!(!bytes.is_empty());
    for secret in [marker, "zoe-the-peer", key.key.as_str(), "BEGIN PUBLIC KEY"] {
        assert!(!contains(&bytes, secret), "{secret} is in the file");
    }
    assert_eq!(mode(&tmp.0.join("alice")), 0o700);
    for suffix in ["", "-wal", "-shm"] {
        let mut name = store.path().as_os_str().to_owned();
        name.push(suffix);
        let path = PathBuf::from(name);
        if path.exists() {
            assert_eq!(mode(&path), 0o600, "{}", path.display());
        }
    }
}

#[test]
fn create_refuses_an_existing_store_and_bad_names() {
    let tmp = TempDir::new("exists");
    new_store(&tmp);
    let r = Store::create(&tmp.0, "alice", "other", "x");
    assert!(matches!(r, Err(StoreError::AlreadyExists { .. })), "{r:?}");
    assert!(Store::open(&tmp.0, "alice", "pw").is_ok());
    for user in ["", ".", "..", "../x", "a/b", "a\0b"] {
        let r = Store::create(&tmp.0, user, "pw", "x");
        assert!(matches!(r, Err(StoreError::InvalidUser(_))), "{user:?}");
        assert!(!Store::exists(&tmp.0, user));
    }
    let r = Store::open(&tmp.0, "nobody", "pw");
    assert!(matches!(r, Err(StoreError::NotFound { .. })), "{r:?}");
    // No half-made files are left behind.
    let names: Vec<String> = fs::read_dir(tmp.0.join("alice"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".new-")), "{names:?}");
}

#[test]
fn a_damaged_file_is_reported_not_opened_as_empty() {
    let tmp = TempDir::new("damaged");
    let store = new_store(&tmp);
    let path = store.path().to_path_buf();
    drop(store);
    fs::write(&path, b"this is not a database at all, just some text").unwrap();
    let r = Store::open(&tmp.0, "alice", "pw");
    assert!(
        matches!(r, Err(StoreError::Corrupt(_)) | Err(StoreError::Db { .. })),
        "{r:?}"
    );
}

#[test]
fn processes_agree_on_one_conversation_key() {
    let tmp = TempDir::new("onekey");
    drop(new_store(&tmp));
    let dir = tmp.0.clone();
    let keys: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let dir = dir.clone();
                s.spawn(move || {
                    let mut store = Store::open(&dir, "alice", "pw").unwrap();
                    let (key, _) = store
                        .current_or_new_key("bob", ConversationKey::generate)
                        .unwrap();
                    key.id
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
    let store = Store::open(&dir, "alice", "pw").unwrap();
    assert_eq!(store.conversation("bob").unwrap().keys.len(), 1);
}

#[test]
fn a_key_kept_by_one_handle_is_seen_by_another_at_once() {
    let tmp = TempDir::new("seen");
    let mut a = new_store(&tmp);
    let b = Store::open(&tmp.0, "alice", "pw").unwrap();
    let key = ConversationKey::generate();
    a.add_key("bob", &key, None, false, MakeCurrent::IfNone)
        .unwrap();
    assert_eq!(
        b.conversation_key("bob", &key.id).unwrap(),
        Some(key.clone())
    );
    // A second key offered by the peer is kept beside it; the current one stays.
    let other = ConversationKey::generate();
    a.add_key("bob", &other, None, true, MakeCurrent::IfNone)
        .unwrap();
    let conv = b.conversation("bob").unwrap();
    assert_eq!(conv.current.as_deref(), Some(key.id.as_str()));
    assert_eq!(conv.keys.len(), 2);
    assert!(conv.shared.contains(&other.id) && !conv.shared.contains(&key.id));
}

#[test]
fn group_keys_follow_the_newest_epoch_unless_kept_only_to_read() {
    let tmp = TempDir::new("epochs");
    let mut s = new_store(&tmp);
    let (k1, k2, k3) = (
        ConversationKey::generate(),
        ConversationKey::generate(),
        ConversationKey::generate(),
    );
    s.add_key("#4", &k2, Some(2), false, MakeCurrent::IfNewestEpoch)
        .unwrap();
    s.add_key("#4", &k1, Some(1), false, MakeCurrent::IfNewestEpoch)
        .unwrap();
    assert_eq!(s.current_key("#4").unwrap().unwrap().0, k2);
    s.add_key("#4", &k3, Some(9), false, MakeCurrent::Never)
        .unwrap();
    assert_eq!(s.current_key("#4").unwrap().unwrap(), (k2.clone(), Some(2)));
    assert!(s.conversation_key("#4", &k3.id).unwrap().is_some());
}

#[test]
fn a_received_text_is_recorded_once() {
    let tmp = TempDir::new("once");
    let mut s = new_store(&tmp);
    let e = entry("bob", "bob", "hello", "m1", false);
    assert!(s.record_received(&e).unwrap());
    assert!(!s.record_received(&e).unwrap());
    // The same mid from someone else is another message.
    assert!(s
        .record_received(&entry("carol", "carol", "hello", "m1", false))
        .unwrap());
    assert_eq!(s.history_len().unwrap(), 2);
}

#[test]
fn only_the_recipient_marks_a_direct_message_delivered() {
    let tmp = TempDir::new("delivered");
    let mut s = new_store(&tmp);
    s.push_history(&entry("bob", "alice", "hi", "m1", true))
        .unwrap();
    s.push_history(&entry("carol", "alice", "hi", "m2", true))
        .unwrap();
    s.push_history(&entry("#4", "alice", "hi all", "g1", true))
        .unwrap();
    s.push_history(&entry("#4", "dave", "incoming", "g2", false))
        .unwrap();
    let states = |s: &Store| -> Vec<DeliveryState> {
        s.history().unwrap().iter().map(|h| h.state).collect()
    };
    assert!(s
        .mark_delivered("carol", &["m1".into()])
        .unwrap()
        .is_empty());
    assert_eq!(
        s.mark_delivered("bob", &["m2".into(), "m1".into()])
            .unwrap(),
        ["m1"]
    );
    assert!(s.mark_delivered("bob", &["m1".into()]).unwrap().is_empty());
    assert_eq!(
        s.mark_delivered("dave", &["g1".into(), "g2".into()])
            .unwrap(),
        ["g1"]
    );
    assert_eq!(
        states(&s),
        [
            DeliveryState::Delivered,
            DeliveryState::Stored,
            DeliveryState::Delivered,
            DeliveryState::Received
        ]
    );
}

#[test]
fn history_pages_recent_search_and_other_writers() {
    let tmp = TempDir::new("pages");
    let mut a = new_store(&tmp);
    let mut b = Store::open(&tmp.0, "alice", "pw").unwrap();
    for i in 0..30 {
        let peer = if i % 3 == 0 { "carol" } else { "bob" };
        a.push_history(&entry(
            peer,
            "alice",
            &format!("Line {i}"),
            &format!("m{i}"),
            true,
        ))
        .unwrap();
    }
    let start = a.last_history_id().unwrap();
    let page = a.history_page("bob", None, 5).unwrap();
    let texts: Vec<&str> = page.iter().map(|(_, h)| h.text.as_str()).collect();
    assert_eq!(
        texts,
        ["Line 23", "Line 25", "Line 26", "Line 28", "Line 29"]
    );
    let older = a.history_page("bob", Some(page[0].0), 2).unwrap();
    let texts: Vec<&str> = older.iter().map(|(_, h)| h.text.as_str()).collect();
    assert_eq!(texts, ["Line 20", "Line 22"]);
    let recent = a.recent_history(5, 2, 2).unwrap();
    let texts: Vec<&str> = recent.iter().map(|(_, h)| h.text.as_str()).collect();
    assert_eq!(texts, ["Line 24", "Line 27", "Line 28", "Line 29"]);
    // Only the most recent conversation (bob) gets the long page.
    let recent = a.recent_history(1, 3, 1).unwrap();
    let texts: Vec<&str> = recent.iter().map(|(_, h)| h.text.as_str()).collect();
    assert_eq!(texts, ["Line 26", "Line 27", "Line 28", "Line 29"]);
    assert_eq!(a.search(None, "line 2").unwrap().len(), 11);
    assert_eq!(a.search(Some("carol"), "LINE 2").unwrap().len(), 3);
    assert!(a.search(None, "nothing like it").unwrap().is_empty());
    // What another handle (process) writes shows up as theirs; our own does not.
    b.push_history(&entry("bob", "alice", "from the other process", "x1", true))
        .unwrap();
    a.push_history(&entry("bob", "alice", "mine", "x2", true))
        .unwrap();
    let others = a.history_from_others(start).unwrap();
    let texts: Vec<&str> = others.iter().map(|(_, h)| h.text.as_str()).collect();
    assert_eq!(texts, ["from the other process"]);
}

#[test]
fn a_batch_is_stored_once_and_leaves_the_inbox_when_done() {
    let tmp = TempDir::new("inbox");
    let mut s = new_store(&tmp);
    let m = |msg_id| InboxEntry {
        msg_id,
        from: "bob".into(),
        group_id: None,
        group: None,
        event: None,
        body: format!("body {msg_id}"),
        ts: 1,
    };
    assert_eq!(s.store_batch(&[m(1), m(2)]).unwrap(), 2);
    assert_eq!(s.store_batch(&[m(2), m(3)]).unwrap(), 1, "2 was seen");
    s.inbox_done(1).unwrap();
    let ids: Vec<i64> = s.inbox().unwrap().iter().map(|r| r.entry.msg_id).collect();
    assert_eq!(ids, [2, 3]);
    s.hold(3, Some(7), "00112233445566ff", 1, 99).unwrap();
    assert!(s.waits_for_group_key(7, "00112233445566ff").unwrap());
    assert!(!s.waits_for_group_key(7, "ffeeddccbbaa0099").unwrap());
    let row = s.inbox().unwrap().pop().unwrap();
    assert!(row.held && row.tries == 1 && row.next_try_ms == 99);
    // Done once opened: a message already seen is not stored again.
    s.inbox_done(2).unwrap();
    assert_eq!(s.store_batch(&[m(2)]).unwrap(), 0);
}

#[test]
fn one_message_under_two_server_ids_goes_into_the_inbox_once() {
    let tmp = TempDir::new("two-ids");
    let mut s = new_store(&tmp);
    let m = |msg_id, from: &str, group_id, body: &str| InboxEntry {
        msg_id,
        from: from.into(),
        group_id,
        group: group_id.map(|g: i64| format!("g{g}")),
        event: None,
        body: body.into(),
        ts: 1,
    };
    // Delivered from memory (a delivery id), then stored and pushed again.
    let delivered = (1i64 << 62) + 5;
    assert_eq!(
        s.store_batch(&[m(delivered, "bob", None, "ct")]).unwrap(),
        1
    );
    assert_eq!(s.store_batch(&[m(40, "bob", None, "ct")]).unwrap(), 0);
    // The same ciphertext from someone else, or in a group, is another message.
    assert_eq!(
        s.store_batch(&[m(41, "carol", None, "ct"), m(42, "bob", Some(3), "ct")])
            .unwrap(),
        2
    );
    // Group events have no body: each is its own.
    let event = |msg_id| InboxEntry {
        event: Some(fastchat_common::proto::GroupEvent {
            event: "added".into(),
            user: "dan".into(),
            by: "bob".into(),
            epoch: 2,
        }),
        ..m(msg_id, "bob", Some(3), "")
    };
    assert_eq!(s.store_batch(&[event(43), event(44)]).unwrap(), 2);
    let ids: Vec<i64> = s.inbox().unwrap().iter().map(|r| r.entry.msg_id).collect();
    assert_eq!(ids, [delivered, 41, 42, 43, 44]);
}

#[test]
fn seen_windows_are_bounded() {
    let tmp = TempDir::new("bounded");
    let mut s = new_store(&tmp);
    let n = MAX_SEEN_IDS + 10;
    let path = s.path.clone();
    s.write(|tx| {
        let mut put = tx.prepare("INSERT INTO seen_msg_ids (msg_id) VALUES (?1)")?;
        for id in 0..n as i64 {
            put.execute([id])?;
        }
        Ok(())
    })
    .unwrap();
    s.prune_seen().unwrap();
    let ids = s.seen_msg_ids().unwrap();
    assert_eq!(ids.len(), MAX_SEEN_IDS, "{}", path.display());
    assert_eq!(ids[0], 10, "the oldest go first");
    assert!(s.remember_mid("bob/m1").unwrap());
    assert!(!s.remember_mid("bob/m1").unwrap());
}

/// The fixture was written by the store of format 1 (one Fernet file), with the
/// plaintext it holds beside it.
#[test]
fn a_format_1_store_is_converted_with_everything_in_it() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v1");
    let expected: StoreData =
        serde_json::from_str(&fs::read_to_string(fixture.join("expected.json")).unwrap()).unwrap();
    let tmp = TempDir::new("convert");
    fs::create_dir_all(tmp.0.join("alice")).unwrap();
    let old = Store::legacy_path_for(&tmp.0, "alice");
    fs::copy(fixture.join("alice/store"), &old).unwrap();
    assert!(Store::exists(&tmp.0, "alice"));

    // A wrong password converts nothing and keeps the old file.
    assert!(matches!(
        Store::open(&tmp.0, "alice", "wrong"),
        Err(StoreError::WrongPassword)
    ));
    assert!(old.exists() && !Store::path_for(&tmp.0, "alice").exists());

    let store = Store::open(&tmp.0, "alice", "fixture-password").unwrap();
    assert!(!old.exists(), "the old file is removed once converted");
    let got = store.export().unwrap();
    assert_eq!(got.user, expected.user);
    assert_eq!(got.identity_der, expected.identity_der);
    assert_eq!(got.peers, expected.peers);
    assert_eq!(got.conversations, expected.conversations);
    assert_eq!(got.history, expected.history);
    assert_eq!(got.downloads, expected.downloads);
    assert_eq!(got.groups, expected.groups);
    assert_eq!(got.resume, expected.resume);
    assert_eq!(got.inbox, expected.inbox);
    assert_eq!(got.seen_msg_ids, expected.seen_msg_ids);
    drop(store);
    // The seen mids came along (as hashes): a text seen before is not new.
    let mut store = Store::open(&tmp.0, "alice", "fixture-password").unwrap();
    assert!(!store
        .remember_mid("bob/00000000000000000000000000000002")
        .unwrap());
    assert!(
        !store.record_received(&expected.history[1]).unwrap(),
        "a received text of the old history is not shown again"
    );
    // The identity still parses as a key.
    let der = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        store.identity_der(),
    )
    .unwrap();
    assert!(crate::e2e::Identity::from_pkcs8_der(&der).is_ok());
}

#[test]
fn a_key_id_kept_with_other_material_is_refused_and_admin_epochs_win() {
    let tmp = TempDir::new("conflict");
    let mut s = new_store(&tmp);
    let real = ConversationKey::generate();
    let fake = ConversationKey {
        id: real.id.clone(),
        key: ConversationKey::generate().key,
    };
    // A member's (asked-for) copy with an inflated epoch, kept only to read.
    assert!(s
        .add_key("#4", &real, Some(i32::MAX), false, MakeCurrent::Never)
        .unwrap());
    // Another key under the same id does not replace it.
    assert!(!s
        .add_key("#4", &fake, Some(3), false, MakeCurrent::IfNewestEpoch)
        .unwrap());
    assert_eq!(
        s.conversation_key("#4", &real.id).unwrap(),
        Some(real.clone())
    );
    assert!(s.current_key("#4").unwrap().is_none());
    // The admin's grant of the same key sets its epoch and makes it current.
    assert!(s
        .add_key("#4", &real, Some(3), false, MakeCurrent::IfNewestEpoch)
        .unwrap());
    assert_eq!(s.current_key("#4").unwrap(), Some((real.clone(), Some(3))));
    let next = ConversationKey::generate();
    s.add_key("#4", &next, Some(4), false, MakeCurrent::IfNewestEpoch)
        .unwrap();
    assert_eq!(
        s.current_key("#4").unwrap().unwrap().0,
        next,
        "rotation still wins"
    );
}

#[test]
fn rows_altered_in_the_file_are_refused() {
    let tmp = TempDir::new("altered");
    let mut s = new_store(&tmp);
    s.push_history(&entry("bob", "bob", "bob's words", "m1", false))
        .unwrap();
    s.update_group(4, |_| GroupState {
        name: "four".into(),
        epoch: 1,
        role: "admin".into(),
        members: Some(2),
    })
    .unwrap();
    s.update_group(5, |_| GroupState {
        name: "five".into(),
        epoch: 1,
        role: "member".into(),
        members: Some(2),
    })
    .unwrap();
    // A received text turned into a pending one of mine (which would be sent again at
    // login under my name).
    s.conn
        .execute("UPDATE history SET outgoing = 1, state = 0", [])
        .unwrap();
    assert!(matches!(s.pending_outgoing(), Err(StoreError::Corrupt(_))));
    // Group rows swapped.
    s.conn
        .execute(
            "UPDATE groups SET rec = (SELECT rec FROM groups WHERE group_id = 5) WHERE group_id = 4",
            [],
        )
        .unwrap();
    assert!(matches!(s.group(4), Err(StoreError::Corrupt(_))));
    assert!(s.group(5).unwrap().is_some());
}

#[test]
fn counters_count_up_and_windows_are_per_sender_store() {
    let dir = TempDir::new("counters");
    let mut store = new_store(&dir);
    let sid = store.sid().unwrap();
    assert_eq!(sid.len(), 16);
    let stamps: Vec<u64> = (0..3).map(|_| store.next_stamp("bob").unwrap().n).collect();
    assert_eq!(stamps, [1, 2, 3]);
    assert_eq!(store.next_stamp("#7").unwrap().n, 1, "per conversation");
    // A second handle (another process) continues the count.
    let mut other = Store::open(&dir.0, "alice", "pw").unwrap();
    assert_eq!(other.next_stamp("bob").unwrap().n, 4);
    // Receiving: one window per (sender, conversation, sender's store).
    let old = crate::e2e::Stamp {
        sid: "00000000000000aa".into(),
        n: 5,
    };
    let reinstalled = crate::e2e::Stamp {
        sid: "00000000000000bb".into(),
        n: 1,
    };
    assert_eq!(
        store.replay_verdict("bob", "bob", &old, false).unwrap(),
        Verdict::Fresh
    );
    store.replay_mark("bob", "bob", &old).unwrap();
    assert_eq!(
        store.replay_verdict("bob", "bob", &old, false).unwrap(),
        Verdict::Seen
    );
    assert_eq!(
        other.replay_verdict("bob", "bob", &old, false).unwrap(),
        Verdict::Seen
    );
    assert_eq!(
        store.replay_verdict("bob", "#7", &old, false).unwrap(),
        Verdict::Fresh
    );
    assert_eq!(
        store
            .replay_verdict("bob", "bob", &reinstalled, false)
            .unwrap(),
        Verdict::Fresh,
        "a new install of bob starts again at 1"
    );
}

#[test]
fn a_format_2_store_is_upgraded_on_open() {
    let dir = TempDir::new("upgrade");
    let store = new_store(&dir);
    let path = store.path().to_path_buf();
    drop(store);
    // As the previous format left it: no counters, windows, evidence or sender id.
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch(
        "DROP TABLE send_counters; DROP TABLE replay; DROP TABLE roster_forks;
         DELETE FROM meta WHERE name = 'sid'; PRAGMA user_version = 2;",
    )
    .unwrap();
    drop(conn);
    let mut store = Store::open(&dir.0, "alice", "pw").unwrap();
    assert_eq!(store.sid().unwrap().len(), 16);
    assert_eq!(store.next_stamp("bob").unwrap().n, 1);
    let again = Store::open(&dir.0, "alice", "pw").unwrap();
    assert_eq!(again.sid().unwrap(), store.sid().unwrap(), "upgraded once");
}
