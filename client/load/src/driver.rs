//! The traffic driver: every simulated session on one mio poll loop, real Noise, real
//! Fernet on every message, latency measured from just before encryption at the sender
//! to just after decryption at the recipient.
//!
//! All simulated users share one Fernet key (handing out keys is not what is measured);
//! the bodies the servers see are ordinary `text` / `group_text` envelopes.

use crate::acklog::{AckLog, Acks};
use crate::setup::Session;
use fastchat_client::e2e::{self, ConversationKey, Envelope, TextPayload};
use fastchat_common::conn::ReadStatus;
use fastchat_common::proto::{ClientToRelay, RelayToClient};
use mio::{Events, Poll, Token};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// How sending is paced.
#[derive(Clone, Copy, Debug)]
pub enum Pace {
    /// Each sender keeps this many messages waiting for `sent`.
    Closed { window: usize },
    /// This many messages per second in all, spread over the senders.
    Open { rate: f64 },
    /// Nothing (drain, idle).
    Quiet,
}

/// Who a sender writes to.
#[derive(Clone, Debug)]
pub enum To {
    /// A user by name, expecting this many deliveries (their sessions).
    User(String),
    /// A group by id, expecting this many deliveries (the other members).
    Group(i64, u32),
}

/// What the driver measured.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub errors: u64,
    /// Deliveries per second over the run.
    pub rate: f64,
    /// Send → decrypted at the recipient, microseconds, sorted.
    pub latencies: Vec<u32>,
    /// For an open-loop run: how late each message was queued for writing after the
    /// time its rate scheduled it at, microseconds, sorted (empty for a closed loop).
    /// A driver that cannot keep up shows here, not as a slow server.
    pub lateness: Vec<u32>,
    pub seconds: f64,
    /// With durable acknowledgements (the default): the syncs of the ack log over the
    /// run, see [`crate::acklog`]; `None` when acks were sent without storing anything.
    pub ack_syncs: Option<u64>,
}

struct Sess {
    session: Session,
    in_flight: usize,
    acks: Vec<i64>,
    next_req: u64,
    /// Requests in flight: request id → message number.
    requests: HashMap<u64, u64>,
}

/// The driver.
pub struct Driver {
    poll: Poll,
    sessions: Vec<Sess>,
    key: ConversationKey,
    padding: String,
    start: Instant,
    next_mid: u64,
    /// Message number → deliveries still expected.
    expected: HashMap<u64, u32>,
    acked: HashSet<u64>,
    /// How many stored (acknowledged) messages still expect deliveries: kept as a
    /// count, since it is read every poll turn.
    awaiting: usize,
    seen: HashMap<(usize, u64), i64>,
    out: Outcome,
    last_delivery: Instant,
    scratch: Vec<u8>,
    /// Stop sending after this many messages.
    limit: u64,
    /// Marks this driver's messages (the high half of every message id), so messages
    /// left over from an earlier run are told apart.
    salt: u64,
    /// Whether a run waits for deliveries (not while filling an offline user's queue).
    await_deliveries: bool,
    /// Where acknowledged ids are written before they are acknowledged (`None`:
    /// `--volatile-acks`).
    ack_log: Option<AckLog>,
}

/// Ack logs made by this process (each driver has its own file).
static ACK_LOGS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Driver {
    /// A driver for these sessions; `size` is the plaintext size of each message.
    pub fn new(
        sessions: Vec<Session>,
        key: ConversationKey,
        size: usize,
    ) -> std::io::Result<Driver> {
        let poll = Poll::new()?;
        let mut driver = Driver {
            poll,
            sessions: Vec::new(),
            key,
            padding: "x".repeat(size.saturating_sub(24)),
            start: Instant::now(),
            next_mid: 1,
            expected: HashMap::new(),
            acked: HashSet::new(),
            awaiting: 0,
            seen: HashMap::new(),
            out: Outcome::default(),
            last_delivery: Instant::now(),
            scratch: vec![0; 256 * 1024],
            limit: u64::MAX,
            salt: rand::random::<u64>(),
            await_deliveries: true,
            ack_log: Some(AckLog::create(&std::env::temp_dir().join(format!(
                "fastchat-load-acks-{}-{}",
                std::process::id(),
                ACK_LOGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            )))?),
        };
        for s in sessions {
            driver.add(s)?;
        }
        Ok(driver)
    }

    /// Acknowledges without writing anything first (`--volatile-acks`): cheaper for
    /// the driver, but then an ack no longer means "stored" and the figures say so.
    pub fn volatile_acks(&mut self) {
        self.ack_log = None;
    }

    /// Adds a session (e.g. offline users logging in for a drain).
    pub fn add(&mut self, session: Session) -> std::io::Result<()> {
        let i = self.sessions.len();
        let mut sess = Sess {
            session,
            in_flight: 0,
            acks: Vec::new(),
            next_req: 1,
            requests: HashMap::new(),
        };
        sess.session
            .conn
            .update_interest(self.poll.registry(), Token(i))?;
        let early = std::mem::take(&mut sess.session.early);
        self.sessions.push(sess);
        for frame in early {
            self.frame(i, frame);
        }
        Ok(())
    }

    fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// Queues one message from session `i`.
    fn send(&mut self, i: usize, to: &To) {
        let mid = self.next_mid;
        self.next_mid += 1;
        let payload = TextPayload {
            group_key: None,
            file: None,
            mid: format!("{:016x}{mid:016x}", self.salt),
            ts: fastchat_common::time::now_ms(),
            text: format!("{} {}", self.now_us(), self.padding),
        };
        let (to_user, group_id, expect, envelope) = match to {
            To::User(u) => (
                Some(u.clone()),
                None,
                1,
                e2e::seal_text(&self.key, &payload),
            ),
            To::Group(g, n) => (
                None,
                Some(*g),
                *n,
                e2e::seal_group_text(&self.key, *g, 1, &payload),
            ),
        };
        let Ok(envelope) = envelope else {
            self.out.errors += 1;
            return;
        };
        let sess = &mut self.sessions[i];
        let id = sess.next_req;
        sess.next_req += 1;
        sess.requests.insert(id, mid);
        sess.in_flight += 1;
        sess.session.conn.queue(&ClientToRelay::Send {
            id,
            to: to_user,
            group_id,
            body: envelope.to_body(),
        });
        self.expected.insert(mid, expect);
        self.out.sent += 1;
    }

    fn frame(&mut self, i: usize, frame: RelayToClient) {
        match frame {
            RelayToClient::Sent { id, .. } => {
                let sess = &mut self.sessions[i];
                sess.in_flight = sess.in_flight.saturating_sub(1);
                if let Some(mid) = sess.requests.remove(&id) {
                    self.acked.insert(mid);
                    self.out.acked += 1;
                    // (Its deliveries may all have arrived before `sent` did.)
                    if self.expected.contains_key(&mid) {
                        self.awaiting += 1;
                    }
                }
            }
            RelayToClient::Msg(m) => {
                self.sessions[i].acks.push(m.msg_id);
                if let Some(log) = &mut self.ack_log {
                    log.record(m.msg_id, &m.body);
                }
                self.delivered(i, m.msg_id, &m.body);
            }
            RelayToClient::Error(e) => {
                self.out.errors += 1;
                if let Some(id) = e.id {
                    let sess = &mut self.sessions[i];
                    sess.in_flight = sess.in_flight.saturating_sub(1);
                    if let Some(mid) = sess.requests.remove(&id) {
                        self.expected.remove(&mid);
                    }
                }
                if self.out.errors <= 5 {
                    eprintln!("fastchat-load: relay error {:?}: {}", e.code, e.message);
                }
            }
            _ => {}
        }
    }

    fn delivered(&mut self, i: usize, msg_id: i64, body: &str) {
        let token = match Envelope::from_body(body) {
            Ok(Envelope::Text { token, .. }) | Ok(Envelope::GroupText { token, .. }) => token,
            _ => return,
        };
        let Ok(payload) = e2e::open_text(&self.key, &token) else {
            self.out.errors += 1;
            return;
        };
        let now = self.now_us();
        let (Ok(salt), Ok(mid)) = (
            u64::from_str_radix(&payload.mid[..16], 16),
            u64::from_str_radix(&payload.mid[16..], 16),
        ) else {
            return;
        };
        if salt != self.salt {
            // Left over from an earlier run: acknowledged, not counted.
            return;
        }
        let user = self.sessions[i].session.user;
        if let Some(first) = self.seen.insert((user, mid), msg_id) {
            self.out.duplicates += 1;
            if std::env::var_os("FASTCHAT_LOAD_DEBUG").is_some() {
                eprintln!(
                    "duplicate: user {user} message {mid} (relay ids {first} then {msg_id}) at {} us",
                    self.now_us()
                );
            }
            return;
        }
        if std::env::var_os("FASTCHAT_LOAD_DEBUG").is_some() && mid % 50_000 == 0 {
            eprintln!("sample: user {user} message {mid} relay id {msg_id}");
        }
        self.out.delivered += 1;
        self.last_delivery = Instant::now();
        if let Some(sent_us) = payload
            .text
            .split(' ')
            .next()
            .and_then(|t| t.parse::<u64>().ok())
        {
            self.out
                .latencies
                .push(now.saturating_sub(sent_us).min(u32::MAX as u64) as u32);
        }
        if let Some(left) = self.expected.get_mut(&mid) {
            *left = left.saturating_sub(1);
            if *left == 0 {
                self.expected.remove(&mid);
                if self.acked.contains(&mid) {
                    self.awaiting -= 1;
                }
            }
        }
    }

    /// Reads what arrived, acknowledges deliveries, writes what is queued.
    fn turn(&mut self, events: &mut Events, timeout: Duration) -> std::io::Result<()> {
        self.poll.poll(events, Some(timeout))?;
        let ready: Vec<usize> = events.iter().map(|e| e.token().0).collect();
        for i in ready {
            let status = self.sessions[i].session.conn.read_ready(&mut self.scratch);
            match status {
                Ok(ReadStatus::Open) => {}
                Ok(ReadStatus::Eof) | Err(_) => {
                    self.out.errors += 1;
                    continue;
                }
            }
            loop {
                match self.sessions[i]
                    .session
                    .conn
                    .next_message::<RelayToClient>()
                {
                    None => break,
                    Some(Ok(frame)) => self.frame(i, frame),
                    Some(Err(_)) => {
                        self.out.errors += 1;
                        break;
                    }
                }
            }
        }
        self.flush()
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // What this turn acknowledges is on disk first, as a client's store would be.
        if let Some(log) = &mut self.ack_log {
            let acks: Acks = self
                .sessions
                .iter_mut()
                .enumerate()
                .filter(|(_, s)| !s.acks.is_empty())
                .map(|(i, s)| (i, std::mem::take(&mut s.acks)))
                .collect();
            log.submit(acks);
            for (i, msg_ids) in log.synced() {
                self.sessions[i]
                    .session
                    .conn
                    .queue(&ClientToRelay::Ack { msg_ids });
            }
        }
        self.flush_sessions()
    }

    /// Writes what is queued on every session.
    fn flush_sessions(&mut self) -> std::io::Result<()> {
        for (i, sess) in self.sessions.iter_mut().enumerate() {
            if !sess.acks.is_empty() {
                let msg_ids = std::mem::take(&mut sess.acks);
                sess.session.conn.queue(&ClientToRelay::Ack { msg_ids });
            }
            if !sess.session.conn.is_flushed() {
                let _ = sess.session.conn.flush();
                sess.session
                    .conn
                    .update_interest(self.poll.registry(), Token(i))?;
            }
        }
        Ok(())
    }

    /// Runs traffic: `senders` (session index, recipient choice) for `seconds`, then
    /// waits up to `drain` for the deliveries still expected.
    pub fn run(
        &mut self,
        senders: &[usize],
        mut pick: impl FnMut(usize) -> To,
        pace: Pace,
        seconds: f64,
        drain: Duration,
        progress: bool,
    ) -> std::io::Result<Outcome> {
        let mut events = Events::with_capacity(4096);
        self.start = Instant::now();
        let started = Instant::now();
        let send_until = started + Duration::from_secs_f64(seconds);
        let mut last_report = Instant::now();
        let mut rr = 0usize;
        if let Pace::Closed { window } = pace {
            for &s in senders {
                for _ in 0..window {
                    if self.out.sent < self.limit {
                        let to = pick(s);
                        self.send(s, &to);
                    }
                }
            }
            self.flush()?;
        }
        loop {
            let now = Instant::now();
            let sending = now < send_until && self.out.sent < self.limit;
            if !sending && (self.outstanding() == 0 || now >= send_until + drain) {
                break;
            }
            self.turn(&mut events, Duration::from_millis(1))?;
            if sending {
                match pace {
                    Pace::Closed { window } => {
                        for &s in senders {
                            while self.sessions[s].in_flight < window && self.out.sent < self.limit
                            {
                                let to = pick(s);
                                self.send(s, &to);
                            }
                        }
                    }
                    Pace::Open { rate } => {
                        let due = (rate * started.elapsed().as_secs_f64()) as u64;
                        let mut budget = due
                            .min(self.limit)
                            .saturating_sub(self.out.sent)
                            .min(10_000);
                        let now_us = started.elapsed().as_micros() as u64;
                        while budget > 0 && !senders.is_empty() {
                            let s = senders[rr % senders.len()];
                            rr += 1;
                            // Message number k is due at (k + 1) / rate seconds.
                            let due_us = ((self.out.sent + 1) as f64 * 1e6 / rate) as u64;
                            let late = now_us.saturating_sub(due_us).min(u32::MAX as u64);
                            self.out.lateness.push(late as u32);
                            let to = pick(s);
                            self.send(s, &to);
                            budget -= 1;
                        }
                    }
                    Pace::Quiet => {}
                }
                self.flush()?;
            }
            if progress && last_report.elapsed() >= Duration::from_secs(1) {
                last_report = Instant::now();
                eprint!(
                    "\r  t={:>5.1}s sent {:>9} stored {:>9} delivered {:>9} waiting {:>7} errors {}   ",
                    started.elapsed().as_secs_f64(),
                    self.out.sent,
                    self.out.acked,
                    self.out.delivered,
                    self.outstanding(),
                    self.out.errors
                );
            }
        }
        // Acknowledge what arrived last, so it is not delivered again to a later run.
        self.flush()?;
        if let Some(log) = &mut self.ack_log {
            for (i, msg_ids) in log.wait_all() {
                self.sessions[i]
                    .session
                    .conn
                    .queue(&ClientToRelay::Ack { msg_ids });
            }
            self.flush_sessions()?;
        }
        if progress {
            eprintln!();
        }
        let mut out = std::mem::take(&mut self.out);
        out.ack_syncs = self.ack_log.as_ref().map(|log| log.syncs());
        out.lost = self
            .expected
            .iter()
            .filter(|(mid, _)| self.acked.contains(mid))
            .map(|(_, left)| *left as u64)
            .sum();
        let span = self
            .last_delivery
            .saturating_duration_since(started)
            .as_secs_f64();
        out.seconds = span.max(0.001);
        out.rate = out.delivered as f64 / out.seconds;
        out.latencies.sort_unstable();
        out.lateness.sort_unstable();
        Ok(out)
    }

    /// Sends exactly `limit` messages (closed loop) and waits only for `sent`, not for
    /// deliveries: fills an offline user's queue.
    pub fn run_limited(
        &mut self,
        senders: &[usize],
        pick: impl FnMut(usize) -> To,
        pace: Pace,
        limit: u64,
        progress: bool,
    ) -> std::io::Result<Outcome> {
        self.limit = limit;
        self.await_deliveries = false;
        let out = self.run(
            senders,
            pick,
            pace,
            3600.0,
            Duration::from_secs(60),
            progress,
        );
        self.limit = u64::MAX;
        self.await_deliveries = true;
        out
    }

    /// What the run still waits for: `sent` replies, and (normally) deliveries of
    /// messages the relay has stored.
    fn outstanding(&self) -> usize {
        let deliveries = if self.await_deliveries {
            self.awaiting
        } else {
            0
        };
        deliveries + self.sessions.iter().map(|s| s.in_flight).sum::<usize>()
    }
}

/// The `q` quantile of sorted latencies, in milliseconds.
pub fn quantile_ms(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64 / 1000.0
}
