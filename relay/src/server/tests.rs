//! The relay's protocol logic without sockets, threads or a database: a [`Bench`] holds
//! the relay's [`Core`] and a detached connection table of recorded connections, feeds
//! it frames and worker results, and reads back what it did — the frames it queued on
//! each connection, the jobs it submitted, the connections it closed or is closing.
//! (The integration tests keep the wire and PostgreSQL.)

use super::*;
use crate::message::Delivery;
use clap::Parser;
use crossbeam_channel::Receiver;
use fastchat_common::conn::Connection;
use fastchat_common::proto::PeerRelay;

struct Bench {
    core: Core,
    io: Links,
    jobs: Receiver<Job>,
}

const MAX_FRAME: usize = 1 << 20;

impl Bench {
    fn new(flags: &[&str]) -> Bench {
        let mut args = vec!["fastchat-relay", "--id", "relay-1"];
        args.extend_from_slice(flags);
        let cfg = Config::parse_from(args);
        let (pool, jobs) = WorkerPool::recording(None);
        let core = Core::new(
            cfg,
            Addresses {
                public: "127.0.0.1:7410".into(),
                mesh: "127.0.0.1:7411".into(),
                stats: Some("127.0.0.1:7412".into()),
            },
            StaticKeypair::generate(),
            [7; KEY_LEN],
            pool,
            fastchat_common::db::unconnected(),
            Arc::new(StoreMetrics::default()),
        );
        Bench {
            core,
            io: Io::detached(MAX_FRAME).expect("a poll registry"),
            jobs,
        }
    }

    /// A new client connection from `ip`, as accepted.
    fn client(&mut self, ip: &str) -> Token {
        let peer = SocketAddr::new(ip.parse().unwrap(), 40_000);
        let accepted = Accepted {
            connections: vec![Connection::recorded(peer, MAX_FRAME)],
            refused: 0,
        };
        let before: Vec<Token> = self.io.tokens();
        self.core
            .on_accept(&mut self.io, Listening::Clients, accepted);
        self.io
            .tokens()
            .into_iter()
            .find(|t| !before.contains(t))
            .expect("the connection is held")
    }

    fn frame(&mut self, token: Token, frame: ClientToRelay) {
        self.core
            .on_frame(&mut self.io, token, Inbound::Client(frame));
    }

    fn done(&mut self, done: Done) {
        self.core.on_completion(&mut self.io, done);
    }

    /// What the relay queued on `token` since the last look.
    fn out(&mut self, token: Token) -> Vec<RelayToClient> {
        self.io
            .recorded(token)
            .into_iter()
            .map(|v| serde_json::from_value(v).expect("a relay-to-client frame"))
            .collect()
    }

    fn mesh_out(&mut self, token: Token) -> Vec<MeshFrame> {
        self.io
            .recorded(token)
            .into_iter()
            .map(|v| serde_json::from_value(v).expect("a mesh frame"))
            .collect()
    }

    /// The jobs submitted since the last look.
    fn jobs(&mut self) -> Vec<Job> {
        self.jobs.try_iter().collect()
    }

    fn closing(&self, token: Token) -> bool {
        self.io.get(token).is_some_and(|l| l.conn.closing)
    }

    fn gone(&self, token: Token) -> bool {
        !self.io.contains(token)
    }

    /// The auth server hands this relay a ticket for `user`.
    fn ticket(&mut self, ticket: &str, user: &str, user_id: i64) {
        self.core.control_frame(
            &mut self.io,
            AuthToRelay::Ticket {
                ticket: ticket.into(),
                user: user.into(),
                user_id,
                ttl_ms: 30_000,
            },
        );
    }

    /// A connection from `ip` past `hello`, waiting for its ticket.
    fn introduced(&mut self, ip: &str) -> Token {
        let t = self.client(ip);
        self.frame(
            t,
            ClientToRelay::Hello {
                version: PROTOCOL_VERSION,
            },
        );
        assert_eq!(
            self.out(t),
            [RelayToClient::Hello {
                version: PROTOCOL_VERSION
            }]
        );
        t
    }

    /// `user` logged in from `ip` with an empty backlog, delivered (`synced` seen).
    fn logged_in(&mut self, ip: &str, user: &str, user_id: i64) -> Token {
        let t = self.introduced(ip);
        let ticket = format!("ticket-{user}-{}", t.0);
        self.ticket(&ticket, user, user_id);
        self.frame(
            t,
            ClientToRelay::Auth {
                user: user.into(),
                ticket,
                receive: true,
            },
        );
        let jobs = self.jobs();
        assert!(
            matches!(jobs[..], [Job::Login { conn, user_id: u, .. }] if conn == t && u == user_id)
        );
        self.done(Done::Pending {
            conn: t,
            messages: vec![],
            more: false,
        });
        assert_eq!(
            self.out(t),
            [
                RelayToClient::Welcome {
                    user: user.into(),
                    user_id
                },
                RelayToClient::Synced {}
            ]
        );
        t
    }

    /// A mesh link from another relay, introduced and up.
    fn mesh_up(&mut self, relay_id: &str) -> Token {
        let peer = SocketAddr::new("127.0.0.9".parse().unwrap(), 41_000);
        let accepted = Accepted {
            connections: vec![Connection::recorded(peer, MAX_FRAME)],
            refused: 0,
        };
        let before = self.io.tokens();
        self.core.on_accept(&mut self.io, Listening::Mesh, accepted);
        let t = self
            .io
            .tokens()
            .into_iter()
            .find(|t| !before.contains(t))
            .unwrap();
        for frame in [
            MeshFrame::Hello {
                version: PROTOCOL_VERSION,
            },
            MeshFrame::MeshHello {
                relay_id: relay_id.into(),
            },
        ] {
            self.core.on_frame(&mut self.io, t, Inbound::Mesh(frame));
        }
        assert_eq!(
            self.mesh_out(t),
            [MeshFrame::Hello {
                version: PROTOCOL_VERSION
            }]
        );
        t
    }
}

fn stored(msg_id: i64, from: &str, body: &str) -> Message {
    Message {
        msg_id,
        from: from.into(),
        body: body.into(),
        ts: 1_000 + msg_id as u64,
        group_id: None,
        group: None,
        event: None,
    }
}

fn delivery(recipient_id: i64, m: Message, remote: &[&str]) -> Delivery {
    Delivery {
        recipient_id,
        message: m,
        remote_relays: remote.iter().map(|r| r.to_string()).collect(),
    }
}

fn error_code(frames: &[RelayToClient]) -> Option<ErrorCode> {
    match frames {
        [RelayToClient::Error(e)] => Some(e.code),
        _ => None,
    }
}

fn send_to(id: u64, to: &str, body: &str) -> ClientToRelay {
    ClientToRelay::Send {
        id,
        to: Some(to.into()),
        group_id: None,
        body: body.into(),
    }
}

/// One frame of every kind a client may send.
fn every_client_frame() -> Vec<ClientToRelay> {
    vec![
        ClientToRelay::Hello {
            version: PROTOCOL_VERSION,
        },
        ClientToRelay::Auth {
            user: "alice".into(),
            ticket: "t".into(),
            receive: true,
        },
        ClientToRelay::Resume {
            user: "alice".into(),
            credential: "c".into(),
            receive: true,
        },
        send_to(1, "bob", "x"),
        ClientToRelay::GroupCreate {
            id: 1,
            name: "g".into(),
        },
        ClientToRelay::GroupAdd {
            id: 1,
            group_id: 1,
            user: "bob".into(),
        },
        ClientToRelay::GroupRemove {
            id: 1,
            group_id: 1,
            user: "bob".into(),
        },
        ClientToRelay::GroupPromote {
            id: 1,
            group_id: 1,
            user: "bob".into(),
        },
        ClientToRelay::GroupLeave { id: 1, group_id: 1 },
        ClientToRelay::GroupList { id: 1 },
        ClientToRelay::GroupMembers { id: 1, group_id: 1 },
        ClientToRelay::RosterAppend {
            id: 1,
            group_id: 1,
            seq: 0,
            prev: "0".repeat(64),
            hash: "1".repeat(64),
            statement: "s".into(),
        },
        ClientToRelay::RosterGet {
            id: 1,
            group_id: 1,
            from_seq: 0,
        },
        ClientToRelay::FileBegin {
            id: 1,
            size: 10,
            chunks: 1,
            to: Some("bob".into()),
            group_id: None,
        },
        ClientToRelay::FilePut {
            id: 1,
            file_id: 1,
            index: 0,
            data: "d".into(),
        },
        ClientToRelay::FileStatus { id: 1, file_id: 1 },
        ClientToRelay::FileGet {
            id: 1,
            file_id: 1,
            from: 0,
            count: 1,
        },
        ClientToRelay::FileDone { file_id: 1 },
        ClientToRelay::Ack { msg_ids: vec![1] },
        ClientToRelay::Key {
            id: 1,
            user: "bob".into(),
        },
        ClientToRelay::Block {
            id: 1,
            user: "bob".into(),
        },
        ClientToRelay::Unblock {
            id: 1,
            user: "bob".into(),
        },
        ClientToRelay::BlockList { id: 1 },
        ClientToRelay::Ping { id: 1 },
    ]
}

fn is_login_frame(f: &ClientToRelay) -> bool {
    matches!(
        f,
        ClientToRelay::Hello { .. } | ClientToRelay::Auth { .. } | ClientToRelay::Resume { .. }
    )
}

#[test]
fn before_hello_every_other_frame_is_refused_and_the_connection_closes() {
    let mut b = Bench::new(&[]);
    for frame in every_client_frame() {
        if matches!(frame, ClientToRelay::Hello { .. }) {
            continue;
        }
        let t = b.client("127.0.0.1");
        b.frame(t, frame.clone());
        assert_eq!(
            error_code(&b.out(t)),
            Some(ErrorCode::BadState),
            "{frame:?}"
        );
        assert!(b.closing(t), "{frame:?}");
    }
    assert!(b.jobs().is_empty());
}

#[test]
fn a_wrong_protocol_version_is_refused() {
    let mut b = Bench::new(&[]);
    let t = b.client("127.0.0.1");
    b.frame(
        t,
        ClientToRelay::Hello {
            version: PROTOCOL_VERSION - 1,
        },
    );
    assert_eq!(error_code(&b.out(t)), Some(ErrorCode::BadVersion));
    assert!(b.closing(t));
}

#[test]
fn after_hello_only_a_ticket_or_a_credential_is_accepted() {
    let mut b = Bench::new(&[]);
    for frame in every_client_frame() {
        if matches!(
            frame,
            ClientToRelay::Auth { .. } | ClientToRelay::Resume { .. }
        ) {
            continue;
        }
        let t = b.introduced("127.0.0.1");
        b.frame(t, frame.clone());
        assert_eq!(
            error_code(&b.out(t)),
            Some(ErrorCode::BadState),
            "{frame:?}"
        );
        assert!(b.closing(t));
    }
    assert!(b.jobs().is_empty());
}

#[test]
fn a_session_refuses_a_second_login() {
    let mut b = Bench::new(&[]);
    for frame in every_client_frame().into_iter().filter(is_login_frame) {
        let t = b.logged_in("127.0.0.1", "alice", 1);
        b.frame(t, frame.clone());
        assert_eq!(
            error_code(&b.out(t)),
            Some(ErrorCode::BadState),
            "{frame:?}"
        );
        assert!(b.closing(t));
    }
}

#[test]
fn a_ticket_admits_its_user_once_and_only_its_user() {
    let mut b = Bench::new(&[]);
    b.ticket("t0", "alice", 1);
    // Somebody else's name with Alice's ticket: refused, and the ticket is spent (a
    // ticket is never tried twice).
    for user in ["mallory", "alice"] {
        let t = b.introduced("127.0.0.2");
        b.frame(
            t,
            ClientToRelay::Auth {
                user: user.into(),
                ticket: "t0".into(),
                receive: true,
            },
        );
        assert_eq!(error_code(&b.out(t)), Some(ErrorCode::BadTicket));
        assert!(b.closing(t));
    }
    b.ticket("t1", "alice", 1);
    // Alice's, once.
    let t = b.introduced("127.0.0.1");
    b.frame(
        t,
        ClientToRelay::Auth {
            user: "alice".into(),
            ticket: "t1".into(),
            receive: true,
        },
    );
    assert_eq!(
        b.out(t),
        [RelayToClient::Welcome {
            user: "alice".into(),
            user_id: 1
        }]
    );
    let page = b.core.cfg.page_size;
    assert!(matches!(
        b.jobs()[..],
        [Job::Login { user_id: 1, page: p, .. }] if p == page
    ));
    let again = b.introduced("127.0.0.1");
    b.frame(
        again,
        ClientToRelay::Auth {
            user: "alice".into(),
            ticket: "t1".into(),
            receive: true,
        },
    );
    assert_eq!(error_code(&b.out(again)), Some(ErrorCode::BadTicket));
    assert!(b.jobs().is_empty());
}

#[test]
fn a_send_only_session_reads_no_backlog_and_gets_no_messages() {
    let mut b = Bench::new(&[]);
    b.ticket("t1", "alice", 1);
    let t = b.introduced("127.0.0.1");
    b.frame(
        t,
        ClientToRelay::Auth {
            user: "alice".into(),
            ticket: "t1".into(),
            receive: false,
        },
    );
    assert!(matches!(b.jobs()[..], [Job::Login { page: 0, .. }]));
    b.out(t);
    let bob = b.logged_in("127.0.0.2", "bob", 2);
    b.done(Done::Sent {
        conn: bob,
        req: 5,
        msg_id: 10,
        ts: 1,
        deliveries: vec![delivery(1, stored(10, "bob", "hi"), &[])],
        full: Vec::new(),
    });
    assert!(b.out(t).is_empty());
}

#[test]
fn sends_are_checked_before_they_become_jobs() {
    let mut b = Bench::new(&["--max-body", "16"]);
    let t = b.logged_in("127.0.0.1", "alice", 1);
    let cases: Vec<(ClientToRelay, ErrorCode)> = vec![
        (send_to(1, "bob", &"x".repeat(17)), ErrorCode::TooLarge),
        (send_to(2, "bob", "a\0b"), ErrorCode::BadFrame),
        (send_to(3, "no such name!", "x"), ErrorCode::UnknownUser),
        (
            ClientToRelay::Send {
                id: 4,
                to: Some("bob".into()),
                group_id: Some(1),
                body: "x".into(),
            },
            ErrorCode::BadFrame,
        ),
        (
            ClientToRelay::Send {
                id: 5,
                to: None,
                group_id: None,
                body: "x".into(),
            },
            ErrorCode::BadFrame,
        ),
    ];
    for (frame, code) in cases {
        b.frame(t, frame.clone());
        let out = b.out(t);
        assert_eq!(error_code(&out), Some(code), "{frame:?}");
        // A refused request is answered; the session goes on.
        assert!(!b.closing(t));
    }
    assert!(b.jobs().is_empty());
    b.frame(t, send_to(6, "bob", "ciphertext"));
    let jobs = b.jobs();
    assert!(matches!(
        &jobs[..],
        [Job::Send { req: 6, sender_id: 1, target: Target::User(to), body, .. }]
            if to == "bob" && body == "ciphertext"
    ));
    assert!(
        b.out(t).is_empty(),
        "no answer before the message is durable"
    );
}

#[test]
fn sending_faster_than_the_budget_is_refused_with_a_wait() {
    let mut b = Bench::new(&["--send-rate", "1", "--send-burst", "3"]);
    let t = b.logged_in("127.0.0.1", "alice", 1);
    for id in 1..=4 {
        b.frame(t, send_to(id, "bob", "x"));
    }
    assert_eq!(b.jobs().len(), 3);
    match &b.out(t)[..] {
        [RelayToClient::Error(e)] => {
            assert_eq!((e.code, e.id), (ErrorCode::RateLimited, Some(4)));
            assert!(e.retry_after_ms.is_some_and(|ms| ms > 0 && ms <= 1_000));
        }
        other => panic!("{other:?}"),
    }
    // The budget is the user's, not the connection's.
    let t2 = b.logged_in("127.0.0.1", "alice", 1);
    b.frame(t2, send_to(5, "bob", "x"));
    assert!(b.jobs().is_empty());
    assert_eq!(error_code(&b.out(t2)), Some(ErrorCode::RateLimited));
}

#[test]
fn a_client_sending_through_its_refusals_is_closed() {
    let mut b = Bench::new(&["--send-rate", "1", "--send-burst", "1"]);
    let t = b.logged_in("127.0.0.1", "alice", 1);
    b.frame(t, send_to(1, "bob", "x"));
    assert_eq!(b.jobs().len(), 1);
    // Sends and key lookups take the same budget; each refusal is answered until the
    // session has had a burst of them, then the link is closed.
    let burst = crate::session::REFUSALS_BURST as u64;
    let mut refused = 0u64;
    for id in 2..burst * 2 {
        if id % 2 == 0 {
            b.frame(t, send_to(id, "bob", "x"));
        } else {
            b.frame(
                t,
                ClientToRelay::Key {
                    id,
                    user: "bob".into(),
                },
            );
        }
        if b.closing(t) {
            break;
        }
        refused += 1;
    }
    assert!(b.closing(t), "never closed");
    assert!(
        (burst..burst + 1_000).contains(&refused),
        "{refused} refusals"
    );
    assert!(b.jobs().is_empty());
}

#[test]
fn acks_count_in_flight_so_a_flood_of_them_queues_no_more() {
    let mut b = Bench::new(&["--max-in-flight", "2"]);
    let t = b.logged_in("127.0.0.1", "bob", 2);
    b.jobs(); // the login
    let ack = |id| ClientToRelay::Ack { msg_ids: vec![id] };
    for id in 1..=5 {
        b.frame(t, ack(id));
    }
    let jobs = b.jobs();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    assert!(
        !b.closing(t) && b.out(t).is_empty(),
        "acks are never answered"
    );
    // One committed: room for one more.
    b.done(Done::Acked { conn: t });
    b.frame(t, ack(6));
    assert!(matches!(&b.jobs()[..], [Job::Ack { msg_ids, .. }] if msg_ids == &vec![6]));
}

#[test]
fn writing_more_bytes_than_the_budget_is_refused_with_a_wait() {
    let mut b = Bench::new(&["--send-bytes-per-sec", "1000", "--send-bytes-burst", "2500"]);
    let t = b.logged_in("127.0.0.1", "alice", 1);
    let body = "y".repeat(2_000);
    b.frame(t, send_to(1, "bob", &body));
    b.frame(t, send_to(2, "bob", &body));
    // The second took the bucket into debt; the third waits it out.
    b.frame(t, send_to(3, "bob", &body));
    assert_eq!(b.jobs().len(), 2);
    match &b.out(t)[..] {
        [RelayToClient::Error(e)] => {
            assert_eq!((e.code, e.id), (ErrorCode::RateLimited, Some(3)));
            assert!(e.message.contains("writing too fast"), "{}", e.message);
            assert!(e.retry_after_ms.is_some_and(|ms| ms > 1_000 && ms <= 2_500));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_durable_send_is_answered_and_pushed_to_every_session_of_the_recipient() {
    let mut b = Bench::new(&[]);
    let alice = b.logged_in("127.0.0.1", "alice", 1);
    let bob1 = b.logged_in("127.0.0.2", "bob", 2);
    let bob2 = b.logged_in("127.0.0.3", "bob", 2);
    b.done(Done::Sent {
        conn: alice,
        req: 7,
        msg_id: 42,
        ts: 1_234,
        deliveries: vec![delivery(2, stored(42, "alice", "ct"), &[])],
        full: Vec::new(),
    });
    assert_eq!(
        b.out(alice),
        [RelayToClient::Sent {
            id: 7,
            msg_id: 42,
            ts: 1_234,
            full: Vec::new(),
        }]
    );
    for bob in [bob1, bob2] {
        assert_eq!(b.out(bob), [deliver(stored(42, "alice", "ct"))]);
    }
}

#[test]
fn live_messages_wait_for_the_backlog_and_are_not_shown_twice() {
    let mut b = Bench::new(&["--page-size", "2"]);
    let alice = b.logged_in("127.0.0.1", "alice", 1);
    b.ticket("tb", "bob", 2);
    let bob = b.introduced("127.0.0.2");
    b.frame(
        bob,
        ClientToRelay::Auth {
            user: "bob".into(),
            ticket: "tb".into(),
            receive: true,
        },
    );
    b.jobs();
    b.out(bob);
    // Live messages arrive before the first page: held back.
    for id in [3, 5] {
        b.done(Done::Sent {
            conn: alice,
            req: id as u64,
            msg_id: id,
            ts: 0,
            deliveries: vec![delivery(2, stored(id, "alice", "live"), &[])],
            full: Vec::new(),
        });
    }
    assert!(b.out(bob).is_empty());
    // A full page (it holds message 3 too): more may wait.
    b.done(Done::Pending {
        conn: bob,
        messages: vec![stored(1, "carol", "old"), stored(3, "alice", "live")],
        more: true,
    });
    assert_eq!(
        b.out(bob),
        [
            deliver(stored(1, "carol", "old")),
            deliver(stored(3, "alice", "live"))
        ]
    );
    // Acknowledging the page asks for the next one after its last id.
    b.frame(
        bob,
        ClientToRelay::Ack {
            msg_ids: vec![1, 3],
        },
    );
    let jobs = b.jobs();
    assert!(matches!(jobs[0], Job::Ack { user_id: 2, .. }));
    assert!(matches!(
        jobs[1],
        Job::FetchPending {
            user_id: 2,
            after: 3,
            ..
        }
    ));
    // The last page: then what was held (not message 3 again), then `synced`.
    b.done(Done::Pending {
        conn: bob,
        messages: vec![stored(4, "carol", "old")],
        more: false,
    });
    assert_eq!(
        b.out(bob),
        [
            deliver(stored(4, "carol", "old")),
            deliver(stored(5, "alice", "live")),
            RelayToClient::Synced {}
        ]
    );
    // A late live copy of a paged message is dropped; new ones flow at once.
    for id in [4, 6] {
        b.done(Done::Sent {
            conn: alice,
            req: 0,
            msg_id: id,
            ts: 0,
            deliveries: vec![delivery(2, stored(id, "alice", "live"), &[])],
            full: Vec::new(),
        });
    }
    assert_eq!(b.out(bob), [deliver(stored(6, "alice", "live"))]);
}

#[test]
fn acks_are_bounded_and_empty_acks_cost_nothing() {
    let mut b = Bench::new(&[]);
    let t = b.logged_in("127.0.0.1", "alice", 1);
    b.frame(t, ClientToRelay::Ack { msg_ids: vec![] });
    assert!(b.jobs().is_empty());
    b.frame(
        t,
        ClientToRelay::Ack {
            msg_ids: (0..10_001).collect(),
        },
    );
    assert_eq!(error_code(&b.out(t)), Some(ErrorCode::BadFrame));
    assert!(b.closing(t));
    assert!(b.jobs().is_empty());
}

#[test]
fn ping_key_and_group_requests() {
    let mut b = Bench::new(&[]);
    let t = b.logged_in("127.0.0.1", "alice", 1);
    b.frame(t, ClientToRelay::Ping { id: 9 });
    assert_eq!(b.out(t), [RelayToClient::Pong { id: 9 }]);
    b.frame(
        t,
        ClientToRelay::Key {
            id: 10,
            user: "bad name!".into(),
        },
    );
    assert_eq!(error_code(&b.out(t)), Some(ErrorCode::UnknownUser));
    b.frame(
        t,
        ClientToRelay::Key {
            id: 11,
            user: "bob".into(),
        },
    );
    assert!(matches!(&b.jobs()[..], [Job::LookupKey { req: 11, user, .. }] if user == "bob"));
    b.done(Done::Key {
        conn: t,
        req: 11,
        user: "bob".into(),
        pubkey: None,
    });
    assert_eq!(error_code(&b.out(t)), Some(ErrorCode::UnknownUser));
    b.frame(
        t,
        ClientToRelay::GroupCreate {
            id: 12,
            name: " padded ".into(),
        },
    );
    assert_eq!(error_code(&b.out(t)), Some(ErrorCode::InvalidName));
    b.frame(
        t,
        ClientToRelay::RosterAppend {
            id: 13,
            group_id: 1,
            seq: 0,
            prev: "not hex".into(),
            hash: "1".repeat(64),
            statement: "s".into(),
        },
    );
    assert_eq!(error_code(&b.out(t)), Some(ErrorCode::InvalidName));
    assert!(b.jobs().is_empty());
    b.frame(
        t,
        ClientToRelay::GroupAdd {
            id: 14,
            group_id: 3,
            user: "bob".into(),
        },
    );
    assert!(matches!(
        &b.jobs()[..],
        [Job::Group {
            req: 14,
            op: GroupOp::Add { group_id: 3, .. },
            ..
        }]
    ));
}

#[test]
fn uploads_are_checked_against_size_chunks_and_rate() {
    let mut b = Bench::new(&["--uploads-per-minute", "2"]);
    let t = b.logged_in("127.0.0.1", "alice", 1);
    let begin = |id, size, chunks| ClientToRelay::FileBegin {
        id,
        size,
        chunks,
        to: Some("bob".into()),
        group_id: None,
    };
    let max = b.core.cfg.max_file_size;
    b.frame(t, begin(1, max + 1, 1));
    assert_eq!(error_code(&b.out(t)), Some(ErrorCode::TooLarge));
    b.frame(t, begin(2, 2_048, 100));
    assert_eq!(error_code(&b.out(t)), Some(ErrorCode::BadFrame));
    // Exactly ceil(size / 32,768) chunks: not more (100 MiB as 102,401 chunks), not
    // fewer.
    b.frame(t, begin(2, 100 << 20, 102_401));
    assert_eq!(error_code(&b.out(t)), Some(ErrorCode::BadFrame));
    b.frame(t, begin(2, 32_769, 1));
    assert_eq!(error_code(&b.out(t)), Some(ErrorCode::BadFrame));
    b.frame(
        t,
        ClientToRelay::FilePut {
            id: 2,
            file_id: 1,
            index: 0,
            data: "x".repeat(fastchat_common::proto::MAX_CHUNK_TOKEN + 1),
        },
    );
    assert_eq!(error_code(&b.out(t)), Some(ErrorCode::TooLarge));
    assert!(b.jobs().is_empty());
    b.frame(t, begin(3, 2_048, 1));
    b.frame(t, begin(4, 2_048, 1));
    b.frame(t, begin(5, 2_048, 1));
    assert_eq!(error_code(&b.out(t)), Some(ErrorCode::RateLimited));
    assert_eq!(b.jobs().len(), 2);
    b.frame(
        t,
        ClientToRelay::FilePut {
            id: 6,
            file_id: 1,
            index: 0,
            data: "a\0".into(),
        },
    );
    assert_eq!(error_code(&b.out(t)), Some(ErrorCode::BadFrame));
}

#[test]
fn a_resumption_is_checked_by_a_worker_and_refusals_are_counted_per_address() {
    let mut b = Bench::new(&["--resume-failures-per-addr", "2"]);
    let resume = |credential: &str| ClientToRelay::Resume {
        user: "alice".into(),
        credential: credential.into(),
        receive: true,
    };
    let t = b.introduced("127.0.0.5");
    b.frame(t, resume("good"));
    assert!(
        matches!(&b.jobs()[..], [Job::Resume { user, credential, .. }]
        if user == "alice" && credential == "good")
    );
    // A frame while the credential is checked is out of turn (on another connection
    // in that state, so this one goes on).
    let waiting = b.introduced("127.0.0.5");
    b.frame(waiting, resume("other"));
    b.jobs();
    b.frame(waiting, ClientToRelay::Ping { id: 1 });
    assert_eq!(error_code(&b.out(waiting)), Some(ErrorCode::BadState));
    assert!(b.closing(waiting));
    b.done(Done::Resumed {
        conn: t,
        from: "127.0.0.5".parse().unwrap(),
        user: "alice".into(),
        user_id: Some(1),
    });
    assert_eq!(
        b.out(t),
        [RelayToClient::Welcome {
            user: "alice".into(),
            user_id: 1
        }]
    );
    assert!(matches!(&b.jobs()[..], [Job::Login { user_id: 1, .. }]));
    for _ in 0..2 {
        let t = b.introduced("127.0.0.6");
        b.frame(t, resume("bad"));
        b.jobs();
        b.done(Done::Resumed {
            conn: t,
            from: "127.0.0.6".parse().unwrap(),
            user: "alice".into(),
            user_id: None,
        });
        assert_eq!(error_code(&b.out(t)), Some(ErrorCode::BadCredentials));
        assert!(b.closing(t));
    }
    // That address is held off without a worker job; another address is not.
    let t = b.introduced("127.0.0.6");
    b.frame(t, resume("good"));
    assert_eq!(error_code(&b.out(t)), Some(ErrorCode::RateLimited));
    assert!(b.jobs().is_empty());
    let t = b.introduced("127.0.0.7");
    b.frame(t, resume("good"));
    assert_eq!(b.jobs().len(), 1);
    // A malformed credential is refused without a job, and counted.
    let t = b.introduced("127.0.0.8");
    b.frame(t, resume(&"x".repeat(129)));
    assert_eq!(error_code(&b.out(t)), Some(ErrorCode::BadCredentials));
    assert!(b.jobs().is_empty());
}

#[test]
fn a_resumption_answered_after_its_connection_closed_admits_nobody() {
    let mut b = Bench::new(&["--resume-failures-per-addr", "1"]);
    let t = b.introduced("127.0.0.1");
    b.frame(
        t,
        ClientToRelay::Resume {
            user: "alice".into(),
            credential: "c".into(),
            receive: true,
        },
    );
    b.jobs();
    b.core.on_close(&mut b.io, t, "peer closed");
    b.done(Done::Resumed {
        conn: t,
        from: "127.0.0.1".parse().unwrap(),
        user: "alice".into(),
        user_id: Some(1),
    });
    assert!(b.core.local.is_empty());
    assert_eq!(b.core.ready_sessions, 0);
    assert!(b.jobs().is_empty());
    // The credential was valid: the attempt's count is given back all the same, and
    // so is one the store failed to check.
    let resume = || ClientToRelay::Resume {
        user: "alice".into(),
        credential: "c".into(),
        receive: true,
    };
    let again = b.introduced("127.0.0.1");
    b.frame(again, resume());
    assert_eq!(b.jobs().len(), 1, "{:?}", b.out(again));
    b.done(Done::ResumeFailed {
        conn: again,
        from: "127.0.0.1".parse().unwrap(),
    });
    assert_eq!(error_code(&b.out(again)), Some(ErrorCode::StoreFailed));
    let third = b.introduced("127.0.0.1");
    b.frame(third, resume());
    assert_eq!(b.jobs().len(), 1, "{:?}", b.out(third));
}

#[test]
fn the_last_session_of_a_user_to_close_ends_their_presence() {
    let mut b = Bench::new(&[]);
    let one = b.logged_in("127.0.0.1", "alice", 1);
    let two = b.logged_in("127.0.0.2", "alice", 1);
    assert_eq!(b.core.clients_count(), 2);
    b.core.on_close(&mut b.io, one, "peer closed");
    assert!(b.jobs().is_empty());
    b.core.on_close(&mut b.io, two, "peer closed");
    assert!(matches!(b.jobs()[..], [Job::Logout { user_id: 1 }]));
    assert_eq!(b.core.clients_count(), 0);
    assert!(b.gone(one) && b.gone(two));
}

#[test]
fn a_store_failure_at_login_ends_the_session() {
    let mut b = Bench::new(&[]);
    let t = b.logged_in("127.0.0.1", "alice", 1);
    b.done(Done::LoginFailed { conn: t });
    assert_eq!(error_code(&b.out(t)), Some(ErrorCode::StoreFailed));
    assert!(b.closing(t));
}

#[test]
fn the_sweep_closes_late_logins_idle_sessions_and_stuck_readers() {
    let mut b = Bench::new(&["--idle-timeout-secs", "60"]);
    let late = b.introduced("127.0.0.1");
    let idle = b.logged_in("127.0.0.2", "alice", 1);
    let fresh = b.logged_in("127.0.0.3", "bob", 2);
    let long_ago = |secs| Instant::now().checked_sub(Duration::from_secs(secs));
    let (Some(past_deadline), Some(past_idle)) = (long_ago(3_600), long_ago(61)) else {
        return; // a machine up for less than an hour: nothing to set back
    };
    b.io.get_mut(late).unwrap().conn.opened = past_deadline;
    b.io.get_mut(idle).unwrap().conn.last_read = past_idle;
    b.core.on_tick(&mut b.io, Instant::now());
    assert!(b.gone(late));
    assert!(b.gone(idle));
    assert!(!b.gone(fresh));
    assert!(matches!(b.jobs()[..], [Job::Logout { user_id: 1 }]));
}

#[test]
fn messages_for_sessions_on_other_relays_go_over_the_mesh_link() {
    let mut b = Bench::new(&[]);
    let alice = b.logged_in("127.0.0.1", "alice", 1);
    let link = b.mesh_up("relay-2");
    let m = stored(42, "alice", "ct");
    b.done(Done::Sent {
        conn: alice,
        req: 1,
        msg_id: 42,
        ts: 1,
        deliveries: vec![delivery(2, m.clone(), &["relay-2", "relay-3"])],
        full: Vec::new(),
    });
    // relay-3 has no link: the message waits in the store for the next login.
    assert_eq!(
        b.mesh_out(link),
        [MeshFrame::Deliver {
            recipient_id: 2,
            message: m,
        }]
    );
    assert_eq!(b.core.counters.forwarded, 1);
}

#[test]
fn a_message_another_relay_delivers_reaches_the_local_session() {
    let mut b = Bench::new(&[]);
    let bob = b.logged_in("127.0.0.2", "bob", 2);
    let link = b.mesh_up("relay-2");
    b.core.on_frame(
        &mut b.io,
        link,
        Inbound::Mesh(MeshFrame::Deliver {
            recipient_id: 2,
            message: stored(8, "alice", "ct"),
        }),
    );
    assert_eq!(b.out(bob), [deliver(stored(8, "alice", "ct"))]);
}

#[test]
fn a_mesh_link_coming_up_or_going_down_makes_live_sessions_catch_up() {
    let mut b = Bench::new(&[]);
    let bob = b.logged_in("127.0.0.2", "bob", 2);
    b.ticket("tc", "carol", 3);
    let carol = b.introduced("127.0.0.3");
    b.frame(
        carol,
        ClientToRelay::Auth {
            user: "carol".into(),
            ticket: "tc".into(),
            receive: true,
        },
    );
    b.jobs();
    let link = b.mesh_up("relay-2");
    // Bob is live; Carol is still reading her backlog, which will include it anyway.
    let catch_up = |jobs: Vec<Job>| -> Vec<Token> {
        jobs.into_iter()
            .filter_map(|j| match j {
                Job::CatchUp { conn, .. } => Some(conn),
                _ => None,
            })
            .collect()
    };
    assert_eq!(catch_up(b.jobs()), [bob]);
    b.core.on_close(&mut b.io, link, "peer closed");
    assert_eq!(catch_up(b.jobs()), [bob]);
    assert!(b.core.mesh.route("relay-2").is_none());
    // What the catch-up finds is delivered (the client drops what it has).
    b.done(Done::CatchUp {
        conn: bob,
        messages: vec![stored(9, "alice", "ct")],
    });
    assert_eq!(b.out(bob), [deliver(stored(9, "alice", "ct"))]);
    let _ = carol;
}

#[test]
fn mesh_links_speak_in_turn() {
    let mut b = Bench::new(&[]);
    let peer = SocketAddr::new("127.0.0.9".parse().unwrap(), 41_000);
    let open = |b: &mut Bench| {
        let before = b.io.tokens();
        b.core.on_accept(
            &mut b.io,
            Listening::Mesh,
            Accepted {
                connections: vec![Connection::recorded(peer, MAX_FRAME)],
                refused: 0,
            },
        );
        b.io.tokens()
            .into_iter()
            .find(|t| !before.contains(t))
            .unwrap()
    };
    let mesh = |b: &mut Bench, t, f| b.core.on_frame(&mut b.io, t, Inbound::Mesh(f));
    let deliver_frame = MeshFrame::Deliver {
        recipient_id: 2,
        message: stored(1, "x", ""),
    };
    // A delivery before the introduction.
    let t = open(&mut b);
    mesh(&mut b, t, deliver_frame.clone());
    assert!(matches!(&b.mesh_out(t)[..], [MeshFrame::Error(e)] if e.code == ErrorCode::BadState));
    assert!(b.closing(t));
    // A wrong version; then a relay claiming this relay's own id.
    let t = open(&mut b);
    mesh(&mut b, t, MeshFrame::Hello { version: 1 });
    assert!(matches!(&b.mesh_out(t)[..], [MeshFrame::Error(e)] if e.code == ErrorCode::BadVersion));
    let t = open(&mut b);
    mesh(
        &mut b,
        t,
        MeshFrame::Hello {
            version: PROTOCOL_VERSION,
        },
    );
    mesh(
        &mut b,
        t,
        MeshFrame::MeshHello {
            relay_id: "relay-1".into(),
        },
    );
    let out = b.mesh_out(t);
    assert!(
        matches!(&out[..], [MeshFrame::Hello { .. }, MeshFrame::Error(e)] if e.code == ErrorCode::BadFrame)
    );
    // Operator tools may ask for figures without introducing themselves.
    let t = open(&mut b);
    mesh(
        &mut b,
        t,
        MeshFrame::Hello {
            version: PROTOCOL_VERSION,
        },
    );
    mesh(&mut b, t, MeshFrame::StatsRequest { id: 3 });
    let out = b.mesh_out(t);
    assert!(matches!(
        &out[..],
        [MeshFrame::Hello { .. }, MeshFrame::Stats { id: 3, .. }]
    ));
    // ...but such a link delivers nothing.
    mesh(&mut b, t, deliver_frame);
    assert!(b.closing(t));
}

#[test]
fn a_newer_link_from_the_same_relay_replaces_the_old_one() {
    let mut b = Bench::new(&[]);
    let old = b.mesh_up("relay-2");
    let new = b.mesh_up("relay-2");
    assert!(b.gone(old));
    assert_eq!(b.core.mesh.route("relay-2"), Some(new));
}

#[test]
fn relays_leaving_the_directory_lose_their_links() {
    let mut b = Bench::new(&[]);
    let link = b.mesh_up("relay-2");
    b.core.control_frame(
        &mut b.io,
        AuthToRelay::Peers {
            relays: vec![PeerRelay {
                relay_id: "relay-1".into(),
                mesh_addr: "127.0.0.1:7411".into(),
            }],
        },
    );
    assert!(b.gone(link));
}

#[test]
fn the_relay_refuses_connections_beyond_its_room() {
    let mut b = Bench::new(&["--max-connections", "2"]);
    b.client("127.0.0.1");
    assert_eq!(b.core.room(&b.io, Listening::Clients), 1);
    b.mesh_up("relay-2");
    assert_eq!(b.core.room(&b.io, Listening::Clients), 0);
    assert_eq!(b.core.room(&b.io, Listening::Mesh), 0);
}

#[test]
fn a_session_may_have_only_so_many_requests_unanswered() {
    let mut b = Bench::new(&["--max-in-flight", "2"]);
    let t = b.logged_in("127.0.0.1", "alice", 1);
    b.frame(t, send_to(1, "bob", "x"));
    b.frame(
        t,
        ClientToRelay::Key {
            id: 2,
            user: "bob".into(),
        },
    );
    b.frame(t, send_to(3, "bob", "x"));
    assert_eq!(b.jobs().len(), 2);
    match &b.out(t)[..] {
        [RelayToClient::Error(e)] => {
            assert_eq!((e.code, e.id), (ErrorCode::RateLimited, Some(3)));
        }
        other => panic!("{other:?}"),
    }
    assert!(!b.closing(t), "refused, not cut off");
    // A `file_done` at the cap has nobody to answer: dropped.
    b.frame(t, ClientToRelay::FileDone { file_id: 1 });
    assert!(b.jobs().is_empty() && b.out(t).is_empty());
    // Pings are no jobs: always answered.
    b.frame(t, ClientToRelay::Ping { id: 4 });
    assert_eq!(b.out(t), [RelayToClient::Pong { id: 4 }]);
    // An answer frees a place.
    b.done(Done::Key {
        conn: t,
        req: 2,
        user: "bob".into(),
        pubkey: Some("k".into()),
    });
    b.out(t);
    b.frame(t, send_to(5, "bob", "x"));
    assert_eq!(b.jobs().len(), 1);
}

#[test]
fn a_group_send_costs_its_sender_one_token_per_recipient() {
    let mut b = Bench::new(&["--send-rate", "1", "--send-burst", "10"]);
    let alice = b.logged_in("127.0.0.1", "alice", 1);
    b.frame(
        alice,
        ClientToRelay::Send {
            id: 1,
            to: None,
            group_id: Some(7),
            body: "ct".into(),
        },
    );
    assert_eq!(b.jobs().len(), 1);
    // It reached 8 members.
    let deliveries = (2..10)
        .map(|r| delivery(r, stored(r, "alice", "ct"), &[]))
        .collect();
    b.done(Done::Sent {
        conn: alice,
        req: 1,
        msg_id: 2,
        ts: 0,
        deliveries,
        full: Vec::new(),
    });
    b.out(alice);
    // 10 tokens, 1 for the send and 7 more for its reach: 2 left.
    for id in 2..5 {
        b.frame(alice, send_to(id, "bob", "x"));
    }
    assert_eq!(b.jobs().len(), 2);
    assert_eq!(error_code(&b.out(alice)), Some(ErrorCode::RateLimited));
}

#[test]
fn a_user_may_have_only_so_many_sessions() {
    let mut b = Bench::new(&["--max-sessions-per-user", "2"]);
    b.logged_in("127.0.0.1", "alice", 1);
    b.logged_in("127.0.0.2", "alice", 1);
    b.ticket("t3", "alice", 1);
    let third = b.introduced("127.0.0.3");
    b.frame(
        third,
        ClientToRelay::Auth {
            user: "alice".into(),
            ticket: "t3".into(),
            receive: true,
        },
    );
    assert_eq!(error_code(&b.out(third)), Some(ErrorCode::RateLimited));
    assert!(b.closing(third));
    assert!(b.jobs().is_empty());
    // Others are not affected.
    b.logged_in("127.0.0.3", "bob", 2);
}

#[test]
fn one_address_may_hold_only_so_many_connections() {
    let mut b = Bench::new(&["--max-connections-per-addr", "2"]);
    let first = b.client("127.0.0.2");
    b.client("127.0.0.2");
    let before = b.io.len();
    b.core.on_accept(
        &mut b.io,
        Listening::Clients,
        Accepted {
            connections: vec![Connection::recorded(
                "127.0.0.2:40000".parse().unwrap(),
                MAX_FRAME,
            )],
            refused: 0,
        },
    );
    assert_eq!(b.io.len(), before, "closed at accept");
    b.client("127.0.0.1");
    b.core.on_close(&mut b.io, first, "peer closed");
    b.client("127.0.0.2");
}

#[test]
fn resumptions_count_against_the_address_as_they_start() {
    let mut b = Bench::new(&["--resume-failures-per-addr", "2"]);
    let resume = || ClientToRelay::Resume {
        user: "alice".into(),
        credential: "c".into(),
        receive: true,
    };
    // Two in parallel from one address: both start, a third waits for neither.
    let (one, two, three) = (
        b.introduced("127.0.0.6"),
        b.introduced("127.0.0.6"),
        b.introduced("127.0.0.6"),
    );
    b.frame(one, resume());
    b.frame(two, resume());
    b.frame(three, resume());
    assert_eq!(b.jobs().len(), 2);
    assert_eq!(error_code(&b.out(three)), Some(ErrorCode::RateLimited));
    // A success gives its count back.
    b.done(Done::Resumed {
        conn: one,
        from: "127.0.0.6".parse().unwrap(),
        user: "alice".into(),
        user_id: Some(1),
    });
    let four = b.introduced("127.0.0.6");
    b.frame(four, resume());
    assert!(b.jobs().iter().any(|j| matches!(j, Job::Resume { .. })));
    let _ = two;
}

#[test]
fn the_stats_port_answers_figures_and_nothing_else() {
    let mut b = Bench::new(&[]);
    let open = |b: &mut Bench| {
        let before = b.io.tokens();
        b.core.on_accept(
            &mut b.io,
            Listening::Stats,
            Accepted {
                connections: vec![Connection::recorded(
                    "127.0.0.1:40001".parse().unwrap(),
                    MAX_FRAME,
                )],
                refused: 0,
            },
        );
        b.io.tokens()
            .into_iter()
            .find(|t| !before.contains(t))
            .unwrap()
    };
    let hello = MeshFrame::Hello {
        version: PROTOCOL_VERSION,
    };
    let t = open(&mut b);
    for f in [hello.clone(), MeshFrame::StatsRequest { id: 5 }] {
        b.core.on_frame(&mut b.io, t, Inbound::Stats(f));
    }
    assert!(matches!(
        &b.mesh_out(t)[..],
        [MeshFrame::Hello { .. }, MeshFrame::Stats { id: 5, .. }]
    ));
    // Not a relay: no introduction, no deliveries, and it is no client either.
    for f in [
        MeshFrame::MeshHello {
            relay_id: "relay-2".into(),
        },
        MeshFrame::Deliver {
            recipient_id: 2,
            message: stored(1, "x", "y"),
        },
    ] {
        let t = open(&mut b);
        b.core.on_frame(&mut b.io, t, Inbound::Stats(hello.clone()));
        b.core.on_frame(&mut b.io, t, Inbound::Stats(f));
        assert!(
            matches!(&b.mesh_out(t)[..], [MeshFrame::Hello { .. }, MeshFrame::Error(e)] if e.code == ErrorCode::BadState)
        );
        assert!(b.closing(t));
    }
    assert!(b.core.mesh.route("relay-2").is_none());
    assert_eq!(b.core.client_count(&b.io), 0);
}
