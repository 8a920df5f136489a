//! The chaos scenario's clients and audit: simulated people on the real client library
//! (failover, resends, the encrypted local store, duplicate suppression), sending direct
//! and group messages at a steady pace while `scripts/chaos.sh` kills and restarts
//! servers around them. Afterwards every message a sender saw `sent` for must have been
//! shown exactly once to each of its recipients.
//!
//! Each person writes to three fixed peers (a ring with a chord, so key exchanges stay
//! few) and to their group of ten; texts carry the run's tag, the sender and a number.

use fastchat_client::chat::{self, Chat, Event, Options};
use fastchat_client::e2e::Identity;
use fastchat_client::error::ClientError;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How the chaos run goes.
pub struct Plan {
    pub server: String,
    pub data_dir: PathBuf,
    pub users: usize,
    /// Seconds of sending.
    pub seconds: f64,
    /// Messages per second, each person.
    pub rate: f64,
    /// Seconds to wait for the last deliveries after sending stops.
    pub drain: f64,
    pub setup_threads: usize,
    pub progress: bool,
}

/// What the audit found.
#[derive(Debug, Default)]
pub struct Audit {
    pub sent: usize,
    pub failed_sends: usize,
    pub expected: usize,
    pub shown: usize,
    pub lost: usize,
    pub duplicates: usize,
    /// Shown but never reported `sent` (their send failed after the store had them).
    pub unconfirmed: usize,
    pub failovers: u64,
}

const GROUP_SIZE: usize = 10;
const PASSWORD: &str = "chaos-password-1";

/// Where a message went.
#[derive(Clone, Debug)]
enum To {
    User(usize),
    Group(usize),
}

/// Shared records of the run.
#[derive(Default)]
struct Records {
    /// (sender, text) → where it went, for every message reported `sent`.
    sent: HashMap<(usize, String), To>,
    /// (recipient, sender, text) → times shown.
    shown: HashMap<(usize, usize, String), usize>,
    failed: usize,
    errors_printed: usize,
}

fn name(i: usize) -> String {
    format!("chaos{i:03}")
}

fn peers(i: usize, n: usize) -> [usize; 3] {
    [(i + 1) % n, (i + 2) % n, (i + 7) % n]
}

/// Runs the scenario and audits it.
pub fn run(plan: &Plan) -> Result<Audit, Box<dyn std::error::Error>> {
    let n = plan.users.max(GROUP_SIZE);
    let tag = format!("{:08x}", rand::random::<u32>());
    let opts = |i: usize| Options {
        server: plan.server.clone(),
        data_dir: plan.data_dir.join(&tag),
        user: format!("{}{}", name(i), &tag[..4]),
        password: PASSWORD.into(),
    };
    let identity = Identity::generate()?;
    say(plan, &format!("registering {n} people (run {tag})"));
    crate::setup::parallel(n, plan.setup_threads, |i| {
        chat::register_with(&opts(i), &identity)
    })?;
    let chats: Vec<Chat> =
        crate::setup::parallel(n, plan.setup_threads, |i| Chat::login(&opts(i), true))?;
    let mut chats: Vec<Option<Chat>> = chats.into_iter().map(Some).collect();

    say(plan, "making the groups");
    let groups = n / GROUP_SIZE;
    let mut group_ids = Vec::new();
    for g in 0..groups {
        let admin = chats[g * GROUP_SIZE].as_mut().ok_or("no admin session")?;
        let id = admin.group_create(&format!("chaos {g}"))?.group_id;
        for m in 1..GROUP_SIZE {
            let i = g * GROUP_SIZE + m;
            let admin = chats[g * GROUP_SIZE].as_mut().ok_or("no admin session")?;
            if admin.group_add(id, &opts(i).user)?.invited {
                chats[i]
                    .as_mut()
                    .ok_or("no member session")?
                    .group_accept(id)?;
            }
        }
        group_ids.push(id);
    }
    let group_of = |i: usize| (i / GROUP_SIZE < groups).then_some(i / GROUP_SIZE);
    // Names by index, and the other way round to read events.
    let names: Vec<String> = (0..n).map(|i| opts(i).user).collect();
    let index: HashMap<String, usize> = names.iter().cloned().zip(0..).collect();

    let records = Mutex::new(Records::default());
    let done_sending = AtomicUsize::new(0);
    // Set by the watching thread once everything sent has been shown everywhere.
    let complete = AtomicBool::new(false);
    let started = Instant::now();
    let send_until = started + Duration::from_secs_f64(plan.seconds);
    let give_up = send_until + Duration::from_secs_f64(plan.drain);
    let interval = Duration::from_secs_f64(1.0 / plan.rate.max(0.01));
    say(
        plan,
        &format!(
            "{n} people sending for {:.0} s, {:.1} messages/s each",
            plan.seconds, plan.rate
        ),
    );

    let failovers: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = chats
            .iter_mut()
            .enumerate()
            .map(|(i, slot)| {
                let mut chat = slot.take().expect("each session once");
                let (tag, records, done_sending, index, group_ids, names, complete) = (
                    &tag,
                    &records,
                    &done_sending,
                    &index,
                    &group_ids,
                    &names,
                    &complete,
                );
                s.spawn(move || {
                    let show = |events: Vec<Event>| {
                        let mut r = records.lock().expect("records lock");
                        for e in events {
                            if let Event::Message(m) = e {
                                if let Some(&from) = index.get(&m.from) {
                                    *r.shown.entry((i, from, m.text)).or_insert(0) += 1;
                                }
                            }
                        }
                    };
                    // Members wait for their group's key before the run proper.
                    if let Some(g) = group_of(i) {
                        while chat.group_key_epoch(group_ids[g]).is_none()
                            && Instant::now() < send_until
                        {
                            match chat.receive(Instant::now() + Duration::from_millis(200)) {
                                Ok(events) => show(events),
                                Err(_) => std::thread::sleep(Duration::from_millis(200)),
                            }
                        }
                    }
                    let mut seq = 0u64;
                    let mut next = Instant::now();
                    while Instant::now() < send_until {
                        if Instant::now() >= next {
                            next += interval;
                            seq += 1;
                            let text = format!("{tag} {i} {seq}");
                            let to = match group_of(i) {
                                Some(g) if seq.is_multiple_of(3) => To::Group(g),
                                _ => To::User(peers(i, n)[(seq as usize) % 3]),
                            };
                            let result = match &to {
                                To::User(p) => chat.send_text(&names[*p], &text),
                                To::Group(g) => chat.send_group(group_ids[*g], &text),
                            };
                            let mut r = records.lock().expect("records lock");
                            match result {
                                Ok(_) => {
                                    r.sent.insert((i, text), to);
                                }
                                Err(e) => {
                                    r.failed += 1;
                                    if r.errors_printed < 10 {
                                        r.errors_printed += 1;
                                        eprintln!("  send failed ({}): {e}", chat.user());
                                    }
                                }
                            }
                        }
                        let wait = next.min(send_until);
                        match chat.receive(wait) {
                            Ok(events) => show(events),
                            Err(e) => note_receive_error(records, &chat, &e),
                        }
                    }
                    done_sending.fetch_add(1, Ordering::SeqCst);
                    // Then receive until everything sent anywhere is shown, or time is up.
                    while Instant::now() < give_up && !complete.load(Ordering::SeqCst) {
                        match chat.receive(Instant::now() + Duration::from_millis(300)) {
                            Ok(events) => show(events),
                            Err(e) => note_receive_error(records, &chat, &e),
                        }
                    }
                    // Linger, so a late duplicate would be seen.
                    if let Ok(events) = chat.receive(Instant::now() + Duration::from_secs(1)) {
                        show(events);
                    }
                    let failovers = chat.failovers() as u64;
                    chat.close();
                    failovers
                })
            })
            .collect();
        let mut last_report = Instant::now();
        while handles.iter().any(|h| !h.is_finished()) {
            std::thread::sleep(Duration::from_millis(500));
            if done_sending.load(Ordering::SeqCst) == n && all_shown(&records, n) {
                complete.store(true, Ordering::SeqCst);
            }
            if plan.progress && last_report.elapsed() >= Duration::from_secs(5) {
                last_report = Instant::now();
                let r = records.lock().expect("records lock");
                eprintln!(
                    "  t={:>4.0}s sent {} failed {} shown {}",
                    started.elapsed().as_secs_f64(),
                    r.sent.len(),
                    r.failed,
                    r.shown.values().sum::<usize>()
                );
            }
        }
        handles.into_iter().map(|h| h.join().unwrap_or(0)).collect()
    });

    let r = records.into_inner().expect("records lock");
    let mut audit = Audit {
        sent: r.sent.len(),
        failed_sends: r.failed,
        failovers: failovers.iter().sum(),
        ..Audit::default()
    };
    let mut expected: HashSet<(usize, usize, String)> = HashSet::new();
    for ((from, text), to) in &r.sent {
        for recipient in recipients(to, *from, n) {
            expected.insert((recipient, *from, text.clone()));
        }
    }
    audit.expected = expected.len();
    for key in &expected {
        match r.shown.get(key).copied().unwrap_or(0) {
            0 => {
                audit.lost += 1;
                if audit.lost <= 10 {
                    eprintln!("  lost: {:?}", key);
                }
            }
            1 => {}
            k => {
                audit.duplicates += 1;
                if audit.duplicates <= 10 {
                    eprintln!("  shown {k} times: {key:?}");
                }
            }
        }
    }
    for (key, count) in &r.shown {
        audit.shown += count;
        if !expected.contains(key) {
            audit.unconfirmed += 1;
            if *count > 1 {
                audit.duplicates += 1;
                eprintln!("  shown {count} times (send not confirmed): {key:?}");
            }
        }
    }
    Ok(audit)
}

/// Who must see a message.
fn recipients(to: &To, from: usize, n: usize) -> Vec<usize> {
    match to {
        To::User(p) => vec![*p],
        To::Group(g) => (g * GROUP_SIZE..((g + 1) * GROUP_SIZE).min(n))
            .filter(|m| *m != from)
            .collect(),
    }
}

/// Whether every message reported sent so far has been shown to all its recipients.
fn all_shown(records: &Mutex<Records>, n: usize) -> bool {
    let r = records.lock().expect("records lock");
    r.sent.iter().all(|((from, text), to)| {
        recipients(to, *from, n)
            .into_iter()
            .all(|m| r.shown.contains_key(&(m, *from, text.clone())))
    })
}

fn note_receive_error(records: &Mutex<Records>, chat: &Chat, e: &ClientError) {
    let mut r = records.lock().expect("records lock");
    if r.errors_printed < 10 {
        r.errors_printed += 1;
        eprintln!("  receive failed ({}): {e}", chat.user());
    }
    drop(r);
    // The session keeps trying on the next call; do not spin.
    std::thread::sleep(Duration::from_millis(500));
}

fn say(plan: &Plan, what: &str) {
    if plan.progress {
        eprintln!("  {what}");
    }
}
