//! `abuse`: the floods of the abuse-resistance work at once, each from its own loopback
//! address, against a running cluster with its default limits (`scripts/abuse.sh`
//! restarts it so), while normal people chat from other addresses. Reports what the
//! attackers got, the normal users' delivery latency and password logins, and what the
//! servers spent: CPU, resident memory, database growth.
//!
//! The floods: registrations (12 connections, 4 `register`s each, ~250 frames/s in
//! all), wrong passwords for a normal user, a group send of 30,000-byte bodies to 20
//! offline victims as fast as the relay allows (fan-out, mailboxes, the quota; the
//! victims accept the stranger's invitation once, as if tricked into it — the worst
//! case: a victim who does not accept gets nothing of the group), file
//! uploads that break the chunk rules, and a user holding every session a relay allows
//! with requests pipelined on each.

use crate::setup::{self, Target, PASSWORD};
use fastchat_client::connect::{AuthLink, Redirect, RelayLink};
use fastchat_client::error::ClientError;
use fastchat_common::proto::{ClientToRelay, ErrorCode, RelayToClient};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The attackers' addresses, one per flood.
const REGISTRATIONS_FROM: &str = "127.0.0.2";
const LOCKOUT_FROM: &str = "127.0.0.3";
const FANOUT_FROM: &str = "127.0.0.4";
const SESSIONS_FROM: &str = "127.0.0.5";
/// Where the timed password logins of a normal user come from.
const PROBE_FROM: &str = "127.0.0.6";
/// Normal users register from 127.0.1.x, this many per address (the auth server's
/// default allows 5 registrations a minute from one address).
const USERS_PER_ADDRESS: usize = 4;

/// Offline users the fan-out attacker puts in its group.
pub const VICTIMS: usize = 20;
const FANOUT_BODY: usize = 30_000;

/// What the attackers did and what they were told.
#[derive(Default)]
pub struct Counters {
    pub registrations_tried: AtomicU64,
    pub registrations_done: AtomicU64,
    pub registrations_limited: AtomicU64,
    pub wrong_logins: AtomicU64,
    pub wrong_logins_limited: AtomicU64,
    pub fanout_sent: AtomicU64,
    pub fanout_limited: AtomicU64,
    pub fanout_over_quota: AtomicU64,
    pub bad_uploads_refused: AtomicU64,
    pub sessions_opened: AtomicU64,
    pub sessions_refused: AtomicU64,
    pub requests_answered: AtomicU64,
    pub requests_limited: AtomicU64,
    pub attacker_errors: AtomicU64,
}

impl Counters {
    pub fn json(&self) -> serde_json::Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "registrations": {"tried": g(&self.registrations_tried), "done": g(&self.registrations_done), "rate_limited": g(&self.registrations_limited)},
            "wrong_logins": {"tried": g(&self.wrong_logins), "rate_limited": g(&self.wrong_logins_limited)},
            "fanout": {"sent": g(&self.fanout_sent), "rate_limited": g(&self.fanout_limited), "over_quota": g(&self.fanout_over_quota)},
            "bad_uploads_refused": g(&self.bad_uploads_refused),
            "sessions": {"opened": g(&self.sessions_opened), "refused": g(&self.sessions_refused), "requests_answered": g(&self.requests_answered), "requests_limited": g(&self.requests_limited)},
            "attacker_errors": g(&self.attacker_errors),
        })
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("a loopback address")
}

/// The source address of normal user `i`.
pub fn normal_address(i: usize) -> IpAddr {
    ip(&format!("127.0.1.{}", 1 + i / USERS_PER_ADDRESS))
}

fn refused_with(e: &ClientError) -> Option<ErrorCode> {
    match e {
        ClientError::Refused { code, .. } => Some(*code),
        _ => None,
    }
}

/// The floods, running until [`Attack::stop`].
pub struct Attack {
    pub counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Password login times of the normal user probed, while the floods ran.
    pub probe_logins: Arc<Mutex<Vec<Duration>>>,
}

impl Attack {
    /// Sets up the attackers' accounts and starts every flood. `victim` is a normal
    /// user (whose password is guessed and whose logins are timed). With `db_url`,
    /// what an earlier run left for the fan-out's victims is deleted first (they never
    /// log in to read it, and it would count against the attacker's quota).
    pub fn start(
        target: &Target,
        pubkey: &str,
        victim: &str,
        db_url: Option<&str>,
    ) -> Result<Attack, ClientError> {
        if let Some(url) = db_url {
            let cleared = postgres::Client::connect(url, postgres::NoTls).and_then(|mut db| {
                db.execute(
                    "DELETE FROM messages WHERE recipient_id IN
                         (SELECT id FROM users WHERE name LIKE 'abuse-%')",
                    &[],
                )
            });
            if let Err(e) = cleared {
                return Err(ClientError::Protocol(format!(
                    "clearing the victims' mailboxes: {e}"
                )));
            }
        }
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let probe_logins = Arc::new(Mutex::new(Vec::new()));
        let fanout = account(target, FANOUT_FROM, "abuse-fanout", pubkey)?;
        let victims: Vec<String> = (0..VICTIMS)
            .map(|i| format!("abuse-victim{i:02}"))
            .collect();
        // Victims register from the fan-out attacker's neighbours, 4 to an address.
        let mut victim_logins = Vec::new();
        for (i, v) in victims.iter().enumerate() {
            let from = format!("127.0.2.{}", 1 + i / USERS_PER_ADDRESS);
            let login = account(target, &from, v, pubkey)?;
            victim_logins.push((from, login));
        }
        let sessions = account(target, SESSIONS_FROM, "abuse-sessions", pubkey)?;
        let mut threads = Vec::new();
        let spawn = |threads: &mut Vec<JoinHandle<()>>, f: Box<dyn FnOnce() + Send>| {
            threads.push(std::thread::spawn(f));
        };
        for t in 0..12 {
            let (target, c, stop, key) = (
                target.clone(),
                counters.clone(),
                stop.clone(),
                pubkey.to_string(),
            );
            spawn(
                &mut threads,
                Box::new(move || register_flood(&target, &key, t, &c, &stop)),
            );
        }
        {
            let (target, c, stop, v) = (
                target.clone(),
                counters.clone(),
                stop.clone(),
                victim.to_string(),
            );
            spawn(
                &mut threads,
                Box::new(move || wrong_passwords(&target, &v, &c, &stop)),
            );
        }
        {
            let (target, c, stop) = (target.clone(), counters.clone(), stop.clone());
            spawn(
                &mut threads,
                Box::new(move || fan_out(&target, &fanout, &victims, &victim_logins, &c, &stop)),
            );
        }
        for _ in 0..8 {
            let (target, c, stop, r) = (
                target.clone(),
                counters.clone(),
                stop.clone(),
                sessions.clone(),
            );
            spawn(
                &mut threads,
                Box::new(move || hold_sessions(&target, &r, 5, &c, &stop)),
            );
        }
        {
            let (target, stop, v, logins) = (
                target.clone(),
                stop.clone(),
                victim.to_string(),
                probe_logins.clone(),
            );
            spawn(
                &mut threads,
                Box::new(move || probe(&target, &v, &logins, &stop)),
            );
        }
        Ok(Attack {
            counters,
            stop,
            threads,
            probe_logins,
        })
    }

    pub fn stop(self) -> (Arc<Counters>, Vec<Duration>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let logins = self.probe_logins.lock().unwrap().clone();
        (self.counters, logins)
    }
}

/// Registers `name` from `from` unless it exists, then logs in: its redirect.
fn account(target: &Target, from: &str, name: &str, pubkey: &str) -> Result<Redirect, ClientError> {
    setup::retrying(|| {
        let mut auth = AuthLink::connect_from(&target.server, Some(ip(from)), &target.data_dir)?;
        match auth.register(name, PASSWORD, pubkey) {
            Ok(()) => {}
            Err(e) if refused_with(&e) == Some(ErrorCode::NameTaken) => {}
            Err(e) => return Err(e),
        }
        auth.login(name, PASSWORD)
    })
}

/// A new ticket for the account `logged_in` logged in as (tickets expire in seconds;
/// its resumption credential lasts).
fn fresh(target: &Target, from: &str, logged_in: &Redirect) -> Result<Redirect, ClientError> {
    let Some((credential, _)) = &logged_in.credential else {
        return Err(ClientError::Protocol("no resumption credential".into()));
    };
    AuthLink::connect_from(&target.server, Some(ip(from)), &target.data_dir)?
        .resume(&logged_in.user, credential)
}

/// Handshake, `hello`, four `register`s of fresh names, close — again and again.
fn register_flood(target: &Target, pubkey: &str, thread: usize, c: &Counters, stop: &AtomicBool) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        match AuthLink::connect_from(
            &target.server,
            Some(ip(REGISTRATIONS_FROM)),
            &target.data_dir,
        ) {
            Ok(mut auth) => {
                for _ in 0..4 {
                    n += 1;
                    c.registrations_tried.fetch_add(1, Ordering::Relaxed);
                    let name = format!("flood{thread:02}x{n}x{}", std::process::id());
                    match auth.register(&name, PASSWORD, pubkey) {
                        Ok(()) => c.registrations_done.fetch_add(1, Ordering::Relaxed),
                        Err(e) if refused_with(&e) == Some(ErrorCode::RateLimited) => {
                            c.registrations_limited.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(_) => c.attacker_errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }
            Err(_) => {
                c.attacker_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        // About 20 frames a second per thread, as the measured flood.
        std::thread::sleep(Duration::from_millis(200).saturating_sub(started.elapsed()));
    }
}

/// Wrong passwords for `victim`, from one address, one connection each.
fn wrong_passwords(target: &Target, victim: &str, c: &Counters, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match AuthLink::connect_from(&target.server, Some(ip(LOCKOUT_FROM)), &target.data_dir) {
            Ok(mut auth) => {
                c.wrong_logins.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = auth.login(victim, "not the password") {
                    if refused_with(&e) == Some(ErrorCode::RateLimited) {
                        c.wrong_logins_limited.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Err(_) => {
                c.attacker_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The fan-out attacker: files that break the chunk rules, then a group of offline
/// victims and 30,000-byte bodies to it, 64 in flight, as fast as the relay allows.
fn fan_out(
    target: &Target,
    account: &Redirect,
    victims: &[String],
    victim_logins: &[(String, Redirect)],
    c: &Counters,
    stop: &AtomicBool,
) {
    let run = || -> Result<(), ClientError> {
        let mut relay = RelayLink::connect(&fresh(target, FANOUT_FROM, account)?, false)?;
        let ask = |relay: &mut RelayLink, frame: &dyn Fn(u64) -> ClientToRelay| {
            let id = relay.next_id();
            relay.queue(&frame(id));
            relay.flush()?;
            relay.wait_reply(id, |f| !matches!(f, RelayToClient::Msg(_)))
        };
        // A file of 100 MiB claimed in 102,401 chunks, and an oversize chunk.
        let bad_count = |id| ClientToRelay::FileBegin {
            id,
            size: 100 * 1024 * 1024,
            chunks: 102_401,
            to: Some(victims[0].clone()),
            group_id: None,
        };
        if ask(&mut relay, &bad_count).is_err() {
            c.bad_uploads_refused.fetch_add(1, Ordering::Relaxed);
        }
        let good = |id| ClientToRelay::FileBegin {
            id,
            size: 32_768,
            chunks: 1,
            to: Some(victims[0].clone()),
            group_id: None,
        };
        if let Ok(RelayToClient::FileReady { file_id, .. }) = ask(&mut relay, &good) {
            let put = |id| ClientToRelay::FilePut {
                id,
                file_id,
                index: 0,
                data: "A".repeat(65_000),
            };
            if ask(&mut relay, &put).is_err() {
                c.bad_uploads_refused.fetch_add(1, Ordering::Relaxed);
            }
        }
        let group_id = match ask(&mut relay, &|id| ClientToRelay::GroupCreate {
            id,
            name: "abuse".into(),
        })? {
            RelayToClient::Group { group, .. } => group.group_id,
            other => return Err(ClientError::Protocol(format!("{other:?}"))),
        };
        for v in victims {
            let add = |id| ClientToRelay::GroupAdd {
                id,
                group_id,
                user: v.clone(),
            };
            // Already a member (an earlier run's group is a new one each time).
            let _ = ask(&mut relay, &add);
        }
        // The victims take up the stranger's invitation (the worst case).
        for (from, login) in victim_logins {
            let mut theirs = RelayLink::connect(&fresh(target, from, login)?, false)?;
            let _ = ask(&mut theirs, &|id| ClientToRelay::GroupAccept {
                id,
                group_id,
            });
            theirs.close();
        }
        // Random letters: the store cannot compress them away (as it would a repeated
        // one), so they take the room ciphertext takes.
        let body: String = (0..FANOUT_BODY)
            .map(|_| char::from(b'a' + rand::random::<u8>() % 26))
            .collect();
        let mut in_flight = 0usize;
        while !stop.load(Ordering::Relaxed) {
            while in_flight < 64 {
                let id = relay.next_id();
                relay.queue(&ClientToRelay::Send {
                    id,
                    to: None,
                    group_id: Some(group_id),
                    body: body.clone(),
                });
                in_flight += 1;
            }
            relay.flush()?;
            let Some(frame) = relay.recv(Some(Instant::now() + Duration::from_secs(5)))? else {
                continue;
            };
            match frame {
                RelayToClient::Sent { .. } => {
                    in_flight -= 1;
                    c.fanout_sent.fetch_add(1, Ordering::Relaxed);
                }
                RelayToClient::Error(e) if e.id.is_some() => {
                    in_flight -= 1;
                    match e.code {
                        ErrorCode::RateLimited => {
                            c.fanout_limited.fetch_add(1, Ordering::Relaxed);
                            let wait = e.retry_after_ms.unwrap_or(100).min(1000);
                            std::thread::sleep(Duration::from_millis(wait));
                        }
                        ErrorCode::OverQuota => {
                            c.fanout_over_quota.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(200));
                        }
                        _ => {
                            c.attacker_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    };
    if run().is_err() {
        c.attacker_errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Opens `count` sessions of one user through its resumption credential (again when
/// one is closed) and keeps 256 `key` requests in flight on each, whatever it is told.
fn hold_sessions(
    target: &Target,
    redirect: &Redirect,
    count: usize,
    c: &Counters,
    stop: &AtomicBool,
) {
    let mut links: Vec<RelayLink> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        while links.len() < count && !stop.load(Ordering::Relaxed) {
            let opened =
                fresh(target, SESSIONS_FROM, redirect).and_then(|r| RelayLink::connect(&r, false));
            match opened {
                Ok(link) => {
                    c.sessions_opened.fetch_add(1, Ordering::Relaxed);
                    links.push(link);
                }
                Err(_) => {
                    c.sessions_refused.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(500));
                    break;
                }
            }
        }
        let mut alive = Vec::new();
        for mut link in links.drain(..) {
            for _ in 0..256 {
                let id = link.next_id();
                link.queue(&ClientToRelay::Key {
                    id,
                    user: redirect.user.clone(),
                });
            }
            let mut ok = link.flush().is_ok();
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut answered = 0;
            while ok && answered < 256 {
                match link.recv(Some(deadline)) {
                    Ok(Some(RelayToClient::Key { .. })) => {
                        answered += 1;
                        c.requests_answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Some(RelayToClient::Error(e))) if e.id.is_some() => {
                        answered += 1;
                        c.requests_limited.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => ok = false,
                }
            }
            if ok {
                alive.push(link);
            }
        }
        links = alive;
    }
}

/// A normal user's password login from its own address every 2 s, timed.
fn probe(target: &Target, user: &str, logins: &Mutex<Vec<Duration>>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let ok = AuthLink::connect_from(&target.server, Some(ip(PROBE_FROM)), &target.data_dir)
            .and_then(|mut auth| auth.login(user, PASSWORD))
            .is_ok();
        if ok {
            logins.lock().unwrap().push(started.elapsed());
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}
