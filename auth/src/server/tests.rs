//! The auth server's protocol logic without sockets, threads or a database: a
//! [`Bench`] holds the server's [`Core`] and a detached table of recorded connections,
//! feeds it frames and worker results, and reads back the frames it queued and the
//! jobs it submitted. (The integration tests keep the wire, argon2 and PostgreSQL.)

use super::*;
use crate::accounts::Credential;
use clap::Parser;
use crossbeam_channel::Receiver;
use fastchat_common::proto::{PeerRelay, RelayAddr};
use std::net::IpAddr;

const MAX_FRAME: usize = 1 << 20;

struct Bench {
    core: Core,
    io: Peers,
    jobs: Receiver<Job>,
}

impl Bench {
    fn new(flags: &[&str]) -> Bench {
        Bench::with_queue(flags, None)
    }

    /// With at most `queue` jobs waiting (the recording pool stands for one worker).
    fn with_queue(flags: &[&str], queue: Option<usize>) -> Bench {
        let mut args = vec!["fastchat-auth"];
        args.extend_from_slice(flags);
        let (pool, jobs) = WorkerPool::recording(queue);
        Bench {
            core: Core::new(Config::parse_from(args), pool),
            io: Io::detached(MAX_FRAME).expect("a poll registry"),
            jobs,
        }
    }

    fn accept(&mut self, listener: Listening, ip: &str) -> Token {
        let peer = SocketAddr::new(ip.parse().unwrap(), 40_000);
        let before = self.io.tokens();
        self.core.on_accept(
            &mut self.io,
            listener,
            Accepted {
                connections: vec![Connection::recorded(peer, MAX_FRAME)],
                refused: 0,
            },
        );
        self.io
            .tokens()
            .into_iter()
            .find(|t| !before.contains(t))
            .expect("the connection is held")
    }

    /// A client from `ip` past `hello`.
    fn client(&mut self, ip: &str) -> Token {
        let t = self.accept(Listening::Clients, ip);
        self.frame(
            t,
            ClientToAuth::Hello {
                version: PROTOCOL_VERSION,
            },
        );
        assert_eq!(
            self.out(t),
            [AuthToClient::Hello {
                version: PROTOCOL_VERSION
            }]
        );
        t
    }

    /// A relay's control link, in rotation with `clients` clients.
    fn relay(&mut self, id: &str, clients: u32) -> Token {
        let t = self.accept(Listening::Relays, "127.0.0.1");
        self.relay_frame(
            t,
            RelayToAuth::Hello {
                version: PROTOCOL_VERSION,
            },
        );
        self.relay_frame(
            t,
            RelayToAuth::RelayUp {
                relay_id: id.into(),
                client_addr: format!("{id}:7410"),
                static_key: "ab".repeat(32),
                mesh_addr: format!("{id}:7411"),
                clients,
                stats_addr: None,
            },
        );
        let out = self.relay_out(t);
        assert_eq!(
            out[..2],
            [
                AuthToRelay::Hello {
                    version: PROTOCOL_VERSION
                },
                AuthToRelay::RelayWelcome {}
            ]
        );
        assert!(matches!(out[2], AuthToRelay::Peers { .. }));
        t
    }

    fn frame(&mut self, t: Token, frame: ClientToAuth) {
        self.core.on_frame(&mut self.io, t, Inbound::Client(frame));
    }

    fn relay_frame(&mut self, t: Token, frame: RelayToAuth) {
        self.core.on_frame(&mut self.io, t, Inbound::Relay(frame));
    }

    fn out(&mut self, t: Token) -> Vec<AuthToClient> {
        self.io
            .recorded(t)
            .into_iter()
            .map(|v| serde_json::from_value(v).expect("an auth-to-client frame"))
            .collect()
    }

    fn relay_out(&mut self, t: Token) -> Vec<AuthToRelay> {
        self.io
            .recorded(t)
            .into_iter()
            .map(|v| serde_json::from_value(v).expect("an auth-to-relay frame"))
            .collect()
    }

    fn jobs(&mut self) -> Vec<Job> {
        self.jobs.try_iter().collect()
    }

    fn closing(&self, t: Token) -> bool {
        self.io.get(t).is_some_and(|l| l.conn.closing)
    }

    /// A password login from `client` that the worker accepted; returns the ticket the
    /// chosen relay was sent and that relay's link.
    fn logged_in(&mut self, client: Token, req: u64, user: &str, relays: &[Token]) -> String {
        self.frame(client, login(req, user, "password1"));
        let Some(Job::Login { addr, .. }) = self.jobs().pop() else {
            panic!("a login job");
        };
        self.core.on_completion(
            &mut self.io,
            Done::LoggedIn {
                conn: client,
                req,
                user: user.into(),
                user_id: 1,
                addr,
                credential: Some(Credential {
                    secret: "cred".into(),
                    expires_ms: 99,
                }),
            },
        );
        for r in relays {
            if let Some(AuthToRelay::Ticket {
                ticket, user: u, ..
            }) = self.relay_out(*r).pop()
            {
                assert_eq!(u, user);
                return ticket;
            }
        }
        panic!("no relay was sent a ticket");
    }
}

fn login(id: u64, user: &str, password: &str) -> ClientToAuth {
    ClientToAuth::Login {
        id,
        user: user.into(),
        password: password.into(),
    }
}

fn error_code(frames: &[AuthToClient]) -> Option<ErrorCode> {
    match frames {
        [AuthToClient::Error(e)] => Some(e.code),
        _ => None,
    }
}

fn refused_login(conn: Token, req: u64, user: &str, addr: IpAddr) -> Done {
    Done::Refused {
        conn,
        req,
        why: Refusal::new(ErrorCode::BadCredentials, "unknown user or wrong password"),
        login: Some((user.into(), addr)),
    }
}

#[test]
fn before_hello_nothing_else_is_accepted() {
    let mut b = Bench::new(&[]);
    let t = b.accept(Listening::Clients, "127.0.0.1");
    b.frame(t, login(1, "alice", "password1"));
    assert_eq!(error_code(&b.out(t)), Some(ErrorCode::BadState));
    assert!(b.closing(t));
    let t = b.accept(Listening::Clients, "127.0.0.1");
    b.frame(t, ClientToAuth::Hello { version: 1 });
    assert_eq!(error_code(&b.out(t)), Some(ErrorCode::BadVersion));
    let t = b.client("127.0.0.1");
    b.frame(
        t,
        ClientToAuth::Hello {
            version: PROTOCOL_VERSION,
        },
    );
    assert_eq!(error_code(&b.out(t)), Some(ErrorCode::BadState));
    assert!(b.jobs().is_empty());
}

#[test]
fn registrations_are_checked_before_any_hashing() {
    let mut b = Bench::new(&[]);
    let t = b.client("127.0.0.1");
    let register = |id, user: &str, password: &str, pubkey: &str| ClientToAuth::Register {
        id,
        user: user.into(),
        password: password.into(),
        pubkey: pubkey.into(),
    };
    for (frame, code) in [
        (
            register(1, "Not A Name", "password1", "k"),
            ErrorCode::InvalidName,
        ),
        (register(2, "alice", "short", "k"), ErrorCode::WeakPassword),
        (
            register(3, "alice", "password1", "not a key"),
            ErrorCode::BadKey,
        ),
    ] {
        b.frame(t, frame);
        assert_eq!(error_code(&b.out(t)), Some(code));
    }
    assert!(b.jobs().is_empty());
    assert!(!b.closing(t));
}

#[test]
fn malformed_logins_are_refused_without_a_job() {
    let mut b = Bench::new(&[]);
    let t = b.client("127.0.0.1");
    b.frame(t, login(1, "NO", "password1"));
    b.frame(t, login(2, "alice", &"p".repeat(10_000)));
    b.frame(
        t,
        ClientToAuth::Resume {
            id: 3,
            user: "alice".into(),
            credential: "c".repeat(129),
        },
    );
    let out = b.out(t);
    assert_eq!(out.len(), 3);
    assert!(out
        .iter()
        .all(|f| matches!(f, AuthToClient::Error(e) if e.code == ErrorCode::BadCredentials)));
    // A malformed logout has nothing to revoke: it is answered at once.
    b.frame(
        t,
        ClientToAuth::Logout {
            id: 4,
            user: "NO".into(),
            credential: "c".into(),
        },
    );
    assert_eq!(b.out(t), [AuthToClient::LoggedOut { id: 4 }]);
    b.frame(
        t,
        ClientToAuth::ChangePassword {
            id: 5,
            user: "alice".into(),
            old_password: "password1".into(),
            new_password: "short".into(),
        },
    );
    assert_eq!(error_code(&b.out(t)), Some(ErrorCode::WeakPassword));
    assert!(b.jobs().is_empty());
}

#[test]
fn a_login_is_redirected_only_once_its_relay_holds_the_ticket() {
    let mut b = Bench::new(&[]);
    let relay = b.relay("relay-1", 0);
    let c = b.client("127.0.0.2");
    let ticket = b.logged_in(c, 7, "alice", &[relay]);
    assert!(b.out(c).is_empty(), "no redirect before the relay confirms");
    b.relay_frame(
        relay,
        RelayToAuth::TicketAccepted {
            ticket: ticket.clone(),
        },
    );
    assert_eq!(
        b.out(c),
        [AuthToClient::Redirect {
            id: 7,
            user: "alice".into(),
            relay_addr: "relay-1:7410".into(),
            relay_key: "ab".repeat(32),
            ticket,
            credential: Some("cred".into()),
            credential_expires_ms: Some(99),
            relays: vec![RelayAddr {
                relay_addr: "relay-1:7410".into(),
                relay_key: "ab".repeat(32),
            }],
        }]
    );
}

#[test]
fn logins_go_to_the_least_loaded_relay_and_a_burst_spreads() {
    let mut b = Bench::new(&[]);
    let busy = b.relay("relay-a", 10);
    let idle = b.relay("relay-b", 0);
    b.relay_out(busy);
    let c = b.client("127.0.0.2");
    for req in 0..10 {
        b.logged_in(c, req, "alice", &[idle]);
        // Answered before the next, so the in-flight cap does not apply.
        b.core.release(&mut b.io, c);
    }
    // relay-b now counts 10 too; ties go to the smaller id.
    b.logged_in(c, 10, "alice", &[busy]);
    // A load report moves the choice.
    b.relay_frame(busy, RelayToAuth::Load { clients: 50 });
    b.core.release(&mut b.io, c);
    b.logged_in(c, 11, "alice", &[idle]);
}

#[test]
fn a_ticket_confirmed_by_the_wrong_relay_is_ignored() {
    let mut b = Bench::new(&[]);
    let r1 = b.relay("relay-1", 0);
    let r2 = b.relay("relay-2", 5);
    let c = b.client("127.0.0.2");
    let ticket = b.logged_in(c, 1, "alice", &[r1]);
    b.relay_frame(
        r2,
        RelayToAuth::TicketAccepted {
            ticket: ticket.clone(),
        },
    );
    assert!(b.out(c).is_empty());
    b.relay_frame(r1, RelayToAuth::TicketAccepted { ticket });
    assert!(matches!(b.out(c)[..], [AuthToClient::Redirect { .. }]));
}

#[test]
fn when_a_relay_goes_its_waiting_logins_go_to_another() {
    let mut b = Bench::new(&[]);
    let r1 = b.relay("relay-1", 0);
    let r2 = b.relay("relay-2", 5);
    b.relay_out(r1);
    let c = b.client("127.0.0.2");
    b.logged_in(c, 1, "alice", &[r1]);
    b.core.on_close(&mut b.io, r1, "peer closed");
    let out = b.relay_out(r2);
    // The directory changed, and the login's new ticket.
    assert!(
        matches!(&out[..], [AuthToRelay::Peers { relays }, AuthToRelay::Ticket { user, .. }]
        if relays == &[PeerRelay { relay_id: "relay-2".into(), mesh_addr: "relay-2:7411".into() }]
            && user == "alice")
    );
    b.core.on_close(&mut b.io, r2, "peer closed");
    assert_eq!(error_code(&b.out(c)), Some(ErrorCode::NoRelay));
}

#[test]
fn a_login_with_no_relay_or_no_confirmation_is_answered_no_relay() {
    let mut b = Bench::new(&[]);
    let c = b.client("127.0.0.2");
    b.frame(c, login(1, "alice", "password1"));
    let Some(Job::Login { addr, .. }) = b.jobs().pop() else {
        panic!("a login job");
    };
    b.core.on_completion(
        &mut b.io,
        Done::LoggedIn {
            conn: c,
            req: 1,
            user: "alice".into(),
            user_id: 1,
            addr,
            credential: None,
        },
    );
    assert_eq!(error_code(&b.out(c)), Some(ErrorCode::NoRelay));
    let relay = b.relay("relay-1", 0);
    b.logged_in(c, 2, "alice", &[relay]);
    // The relay never confirms.
    for p in b.core.pending.values_mut() {
        p.deadline = Instant::now();
    }
    b.core.on_tick(&mut b.io, Instant::now());
    assert_eq!(error_code(&b.out(c)), Some(ErrorCode::NoRelay));
    assert!(b.core.pending.is_empty());
}

#[test]
fn a_client_may_have_only_a_few_requests_in_flight() {
    let mut b = Bench::new(&[]);
    let c = b.client("127.0.0.2");
    for id in 0..4 {
        b.frame(c, login(id, "alice", "password1"));
    }
    assert_eq!(b.jobs().len(), 4);
    b.frame(c, login(4, "alice", "password1"));
    assert_eq!(error_code(&b.out(c)), Some(ErrorCode::BadState));
    assert!(b.closing(c));
    assert!(b.jobs().is_empty());
}

#[test]
fn failed_logins_hold_off_further_attempts() {
    let mut b = Bench::new(&[
        "--login-failures-per-user",
        "2",
        "--login-failures-per-addr",
        "100",
    ]);
    let c = b.client("127.0.0.2");
    let addr: IpAddr = "127.0.0.2".parse().unwrap();
    for id in 0..2 {
        b.frame(c, login(id, "alice", "wrong-password"));
        b.jobs();
        b.core
            .on_completion(&mut b.io, refused_login(c, id, "alice", addr));
        assert_eq!(error_code(&b.out(c)), Some(ErrorCode::BadCredentials));
    }
    b.frame(c, login(2, "alice", "password1"));
    match &b.out(c)[..] {
        [AuthToClient::Error(e)] => {
            assert_eq!(e.code, ErrorCode::RateLimited);
            assert!(e.retry_after_ms.is_some_and(|ms| ms > 0));
        }
        other => panic!("{other:?}"),
    }
    assert!(b.jobs().is_empty());
    // Other names are not held off.
    b.frame(c, login(3, "bob", "password1"));
    assert_eq!(b.jobs().len(), 1);
}

#[test]
fn relay_links_speak_in_turn() {
    let mut b = Bench::new(&[]);
    let t = b.accept(Listening::Relays, "127.0.0.1");
    b.relay_frame(t, RelayToAuth::Load { clients: 1 });
    assert!(
        matches!(&b.relay_out(t)[..], [AuthToRelay::Error(e)] if e.code == ErrorCode::BadState)
    );
    assert!(b.closing(t));
    let t = b.accept(Listening::Relays, "127.0.0.1");
    b.relay_frame(
        t,
        RelayToAuth::Hello {
            version: PROTOCOL_VERSION,
        },
    );
    b.relay_frame(
        t,
        RelayToAuth::RelayUp {
            relay_id: "relay-1".into(),
            client_addr: "a".into(),
            static_key: "short".into(),
            mesh_addr: "m".into(),
            clients: 0,
            stats_addr: None,
        },
    );
    assert!(
        matches!(&b.relay_out(t)[..], [AuthToRelay::Hello { .. }, AuthToRelay::Error(e)]
        if e.code == ErrorCode::BadFrame)
    );
    assert!(b.core.directory.peers().is_empty());
    // A tool asking for figures without joining rotation.
    let t = b.accept(Listening::Relays, "127.0.0.1");
    b.relay_frame(
        t,
        RelayToAuth::Hello {
            version: PROTOCOL_VERSION,
        },
    );
    b.relay_frame(t, RelayToAuth::StatsRequest { id: 4 });
    assert!(matches!(
        &b.relay_out(t)[..],
        [AuthToRelay::Hello { .. }, AuthToRelay::Stats { id: 4, .. }]
    ));
    assert!(b.core.directory.peers().is_empty());
}

#[test]
fn a_relay_announced_again_replaces_its_old_link() {
    let mut b = Bench::new(&[]);
    let old = b.relay("relay-1", 0);
    let new = b.relay("relay-1", 0);
    assert!(!b.io.contains(old));
    assert_eq!(b.core.directory.links(), [new]);
}

#[test]
fn the_sweep_closes_connections_that_never_said_hello() {
    let mut b = Bench::new(&[]);
    let silent = b.accept(Listening::Clients, "127.0.0.2");
    let talking = b.client("127.0.0.3");
    // Past the hello deadline (10 s), within the session deadline (60 s).
    let Some(long_ago) = Instant::now().checked_sub(Duration::from_secs(30)) else {
        return; // a machine up for less than that
    };
    for t in [silent, talking] {
        b.io.get_mut(t).unwrap().conn.opened = long_ago;
    }
    b.core.on_tick(&mut b.io, Instant::now());
    assert!(!b.io.contains(silent));
    assert!(b.io.contains(talking));
}

fn register(id: u64, user: &str) -> ClientToAuth {
    ClientToAuth::Register {
        id,
        user: user.into(),
        password: "password1".into(),
        pubkey: crate::accounts::tests::RSA_2048.into(),
    }
}

fn rate_limited(frames: &[AuthToClient]) -> bool {
    matches!(frames, [AuthToClient::Error(e)]
        if e.code == ErrorCode::RateLimited && e.retry_after_ms.is_some_and(|ms| ms > 0))
}

#[test]
fn a_full_queue_is_answered_at_once_and_costs_no_request_slot() {
    let mut b = Bench::with_queue(&[], Some(2));
    let c = b.client("127.0.0.2");
    for id in 0..2 {
        b.frame(c, login(id, &format!("user{id}"), "password1"));
    }
    b.frame(c, login(2, "user2", "password1"));
    assert!(rate_limited(&b.out(c)));
    assert!(!b.closing(c));
    assert_eq!(b.jobs().len(), 2);
    // Room again: the refused request took no slot and no limiter count.
    b.frame(c, login(3, "user2", "password1"));
    assert_eq!(b.jobs().len(), 1);
    assert!(b.out(c).is_empty());
}

#[test]
fn registrations_from_one_address_run_dry_others_do_not() {
    let mut b = Bench::new(&["--registrations-per-addr-per-minute", "2"]);
    let flood = b.client("127.0.0.2");
    b.frame(flood, register(1, "alice"));
    b.frame(flood, register(2, "alice"));
    assert_eq!(b.jobs().len(), 2);
    b.frame(flood, register(3, "alice"));
    assert!(rate_limited(&b.out(flood)));
    assert!(b.jobs().is_empty());
    // Another connection from the same address shares the budget; another address
    // does not.
    let again = b.client("127.0.0.2");
    b.frame(again, register(4, "bob"));
    assert!(rate_limited(&b.out(again)));
    let other = b.client("127.0.0.1");
    b.frame(other, register(5, "bob"));
    assert_eq!(b.jobs().len(), 1);
}

#[test]
fn password_attempts_from_one_address_are_limited() {
    let mut b = Bench::new(&[
        "--password-attempts-per-addr-per-minute",
        "3",
        "--login-failures-per-addr",
        "100",
    ]);
    let c = b.client("127.0.0.2");
    for id in 0..3 {
        b.frame(c, login(id, &format!("user{id}"), "guess"));
        b.jobs();
        b.core.release(&mut b.io, c);
    }
    b.frame(c, login(3, "user3", "guess"));
    assert!(rate_limited(&b.out(c)));
    assert!(b.jobs().is_empty());
}

#[test]
fn a_closed_connection_tells_its_waiting_jobs() {
    let mut b = Bench::new(&[]);
    let c = b.client("127.0.0.2");
    b.frame(c, login(1, "alice", "password1"));
    b.frame(c, register(2, "bob"));
    b.frame(
        c,
        ClientToAuth::Logout {
            id: 3,
            user: "alice".into(),
            credential: "c".repeat(64),
        },
    );
    let jobs = b.jobs();
    let alive = |j: &Job| match j {
        Job::Login { alive, .. } | Job::Register { alive, .. } => Some(alive.is_alive()),
        _ => None,
    };
    assert_eq!(
        jobs.iter().filter_map(alive).collect::<Vec<_>>(),
        [true, true]
    );
    b.core.on_close(&mut b.io, c, "peer closed");
    assert_eq!(
        jobs.iter().filter_map(alive).collect::<Vec<_>>(),
        [false, false]
    );
    // A skipped job gives the limiter its count back.
    b.core.on_completion(
        &mut b.io,
        Done::Skipped {
            attempt: Some((crate::ratelimit::Attempt::Password, "alice".into())),
            addr: Some("127.0.0.2".parse().unwrap()),
        },
    );
    assert_eq!(b.core.counters.skipped, 1);
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
    assert_eq!(b.io.len(), before, "the third was closed at accept");
    assert_eq!(b.core.counters.refused_per_addr, 1);
    b.client("127.0.0.1");
    // A closed one makes room.
    b.core.on_close(&mut b.io, first, "peer closed");
    b.client("127.0.0.2");
}

#[test]
fn a_client_connection_ends_at_the_session_deadline() {
    let mut b = Bench::new(&["--session-deadline-secs", "60"]);
    let old = b.client("127.0.0.2");
    let new = b.client("127.0.0.2");
    let Some(long_ago) = Instant::now().checked_sub(Duration::from_secs(61)) else {
        return;
    };
    b.io.get_mut(old).unwrap().conn.opened = long_ago;
    b.core.on_tick(&mut b.io, Instant::now());
    assert!(!b.io.contains(old));
    assert!(b.io.contains(new));
}

#[test]
fn failures_from_another_address_do_not_lock_the_user_out() {
    let mut b = Bench::new(&["--login-failures-per-user", "2"]);
    let attacker = b.client("127.0.0.3");
    let addr: IpAddr = "127.0.0.3".parse().unwrap();
    for id in 0..2 {
        b.frame(attacker, login(id, "lara", "wrong-password"));
        b.jobs();
        b.core
            .on_completion(&mut b.io, refused_login(attacker, id, "lara", addr));
    }
    b.frame(attacker, login(2, "lara", "wrong-password"));
    assert_eq!(
        error_code(&b.out(attacker)[2..]),
        Some(ErrorCode::RateLimited)
    );
    let lara = b.client("127.0.0.1");
    b.frame(lara, login(3, "lara", "password1"));
    assert_eq!(b.jobs().len(), 1);
    // Resumption refusals count against the address, not the name.
    for id in 4..30 {
        b.frame(
            attacker,
            ClientToAuth::Resume {
                id,
                user: "lara".into(),
                credential: "0".repeat(64),
            },
        );
        b.jobs();
        b.core.release(&mut b.io, attacker);
    }
    b.frame(
        lara,
        ClientToAuth::Resume {
            id: 31,
            user: "lara".into(),
            credential: "1".repeat(64),
        },
    );
    assert_eq!(b.jobs().len(), 1);
}

#[test]
fn the_stats_port_answers_figures_and_announces_no_relay() {
    let mut b = Bench::new(&[]);
    let t = b.accept(Listening::Stats, "127.0.0.1");
    b.relay_frame(
        t,
        RelayToAuth::Hello {
            version: PROTOCOL_VERSION,
        },
    );
    b.relay_frame(t, RelayToAuth::StatsRequest { id: 1 });
    assert!(matches!(
        &b.relay_out(t)[..],
        [AuthToRelay::Hello { .. }, AuthToRelay::Stats { id: 1, .. }]
    ));
    b.relay_frame(
        t,
        RelayToAuth::RelayUp {
            relay_id: "relay-1".into(),
            client_addr: "a".into(),
            static_key: "ab".repeat(32),
            mesh_addr: "m".into(),
            clients: 0,
            stats_addr: None,
        },
    );
    assert!(
        matches!(&b.relay_out(t)[..], [AuthToRelay::Error(e)] if e.code == ErrorCode::BadState)
    );
    assert!(b.core.directory.peers().is_empty());
}
