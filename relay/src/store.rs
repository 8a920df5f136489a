//! The relay's database work: jobs from the poll loop, run by the worker pool in
//! batches, one transaction per batch (group commit).
//!
//! Ordering rules that make routing race-free (DESIGN.md, "Routing a message"):
//! a batch commits its message inserts *then* reads the recipients' presence; a login
//! commits its presence row *then* reads the pending messages.
//!
//! Group membership operations run in a transaction of their own, in the batch's order,
//! so a member added before a group message gets it.

use crate::files::{self, FileOp};
use crate::groups::{self, GroupOp, GroupOutcome};
use crate::session::PAGE_BYTES;

/// Most bytes of bodies one catch-up delivers again (a live session acknowledges as it
/// goes, so it holds little; more waits for its next login), well inside the hard
/// output limit's least value.
const CATCH_UP_BYTES: usize = 2 * PAGE_BYTES;
use fastchat_common::credential;
use fastchat_common::db::{DbConn, DbPool, HeldConnection};
use fastchat_common::pool::Completions;
use fastchat_common::proto::{ErrorCode, GroupEvent, RelayToClient};
use fastchat_common::{time, warn};
use mio::Token;
use postgres::{GenericClient, Statement};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A stored message as it is delivered.
#[derive(Debug, Clone)]
pub struct Stored {
    pub msg_id: i64,
    pub from: String,
    pub body: String,
    pub ts: u64,
    pub group_id: Option<i64>,
    pub group: Option<String>,
    /// A membership event (then `body` is empty).
    pub event: Option<GroupEvent>,
}

/// A stored message and where its recipient has sessions.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub recipient_id: i64,
    pub message: Stored,
    /// Relays other than this one where the recipient has sessions.
    pub remote_relays: Vec<String>,
}

/// Who a message is for.
#[derive(Debug, Clone)]
pub enum Target {
    User(String),
    Group(i64),
}

/// Work for the pool. Every job is sharded by the user it acts for.
#[derive(Debug)]
pub enum Job {
    /// Record presence, then read the first page of pending messages.
    Login {
        conn: Token,
        user_id: i64,
        page: i64,
    },
    /// Read the next page of pending messages after `after`.
    FetchPending {
        conn: Token,
        user_id: i64,
        after: i64,
        page: i64,
    },
    /// Store a message durably.
    Send {
        conn: Token,
        req: u64,
        sender_id: i64,
        sender: String,
        target: Target,
        body: String,
    },
    /// Re-read what is stored for a live session: after a mesh link went down or
    /// came back, a message another relay committed may never have been forwarded.
    CatchUp {
        conn: Token,
        user_id: i64,
        limit: i64,
    },
    /// Delete messages the recipient has stored.
    Ack { user_id: i64, msg_ids: Vec<i64> },
    /// The user's last session on this relay ended.
    Logout { user_id: i64 },
    /// Check a resumption credential a client presented instead of a ticket.
    Resume {
        conn: Token,
        user: String,
        credential: String,
    },
    /// Look up a user's public key.
    LookupKey {
        conn: Token,
        user_id: i64,
        req: u64,
        user: String,
    },
    /// A file operation.
    File {
        conn: Token,
        req: u64,
        user_id: i64,
        op: FileOp,
    },
    /// A group operation.
    Group {
        conn: Token,
        req: u64,
        user_id: i64,
        user: String,
        op: GroupOp,
    },
}

impl Job {
    /// The worker shard: the acting user's id.
    pub fn shard(&self) -> u64 {
        match self {
            Job::Login { user_id, .. }
            | Job::FetchPending { user_id, .. }
            | Job::CatchUp { user_id, .. }
            | Job::Ack { user_id, .. }
            | Job::Logout { user_id }
            | Job::LookupKey { user_id, .. }
            | Job::File { user_id, .. }
            | Job::Group { user_id, .. } => *user_id as u64,
            Job::Send { sender_id, .. } => *sender_id as u64,
            // No id yet: any stable spread will do.
            Job::Resume { user, .. } => user
                .bytes()
                .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b.into())),
        }
    }
}

/// Results for the poll loop.
#[derive(Debug)]
pub enum Done {
    /// A page of pending messages (`more`: the page was full).
    Pending {
        conn: Token,
        messages: Vec<Stored>,
        more: bool,
    },
    /// A resumption credential checked: the user's id, or `None` if it is not valid.
    Resumed {
        conn: Token,
        user: String,
        user_id: Option<i64>,
    },
    /// What is stored for a live session (delivered again; clients drop what they have).
    CatchUp { conn: Token, messages: Vec<Stored> },
    /// The login could not be recorded; the session must end.
    LoginFailed { conn: Token },
    /// The message is durable (`msg_id`: its id, or for a group message the first
    /// member's copy); deliver it.
    Sent {
        conn: Token,
        req: u64,
        msg_id: i64,
        ts: u64,
        deliveries: Vec<Delivery>,
    },
    /// A request was refused or failed; nothing was stored.
    Failed {
        conn: Token,
        req: u64,
        code: ErrorCode,
        message: String,
    },
    Key {
        conn: Token,
        req: u64,
        user: String,
        pubkey: Option<String>,
    },
    /// Frames answering a request (file operations).
    Frames {
        conn: Token,
        frames: Vec<RelayToClient>,
    },
    /// A group operation's reply and the events it wrote.
    Group {
        conn: Token,
        reply: RelayToClient,
        deliveries: Vec<Delivery>,
    },
}

/// The relay's hot statements, prepared once per connection.
pub struct Prepared {
    locate: Statement,
    names: Statement,
    store: Statement,
    waiting: Statement,
    member: Statement,
    group_insert: Statement,
    presence: Statement,
    key: Statement,
    pending: Statement,
    resume: Statement,
}

impl Prepared {
    fn new(conn: &mut DbConn) -> Result<Prepared, postgres::Error> {
        Ok(Prepared {
            locate: conn.prepare(LOCATE)?,
            names: conn.prepare("SELECT name, id FROM users WHERE name = ANY($1)")?,
            // The batch's direct messages and acknowledgements in one statement (one
            // round trip, and its own transaction when the batch has nothing else).
            // Acknowledgements delete exact (recipient, id) pairs with a plan shape no
            // plan choice can change: one primary-key probe per pair inside a
            // subquery, then a TID scan (a join with `unnest` let a generic plan, or
            // stale statistics, scan the whole table). Ids are drawn as unnest
            // produces the rows, in input order.
            store: conn.prepare(
                "WITH acked AS (
                     DELETE FROM messages WHERE ctid = ANY (ARRAY(
                         SELECT (SELECT m.ctid FROM messages m
                                 WHERE m.recipient_id = a.r AND m.id = a.i)
                         FROM unnest($5::int8[], $6::int8[]) AS a(r, i)))
                 )
                 INSERT INTO messages (recipient_id, id, sender_id, body, sent_at_ms)
                 SELECT r, nextval('messages_id_seq'), s, b, t
                 FROM unnest($1::int8[], $2::int8[], $3::text[], $4::int8[])
                      WITH ORDINALITY AS x(r, s, b, t, o)
                 ORDER BY o
                 RETURNING id",
            )?,
            // Messages waiting for each recipient, counted up to a limit.
            waiting: conn.prepare(
                "SELECT r, (SELECT count(*) FROM (SELECT 1 FROM messages m
                            WHERE m.recipient_id = r LIMIT $2) w)
                 FROM unnest($1::int8[]) AS r",
            )?,
            member: conn.prepare("SELECT g.name FROM group_members gm JOIN groups g ON g.id = gm.group_id WHERE gm.group_id = $1 AND gm.user_id = $2")?,
            group_insert: conn.prepare("INSERT INTO messages (recipient_id, id, sender_id, body, sent_at_ms, group_id) SELECT gm.user_id, nextval(pg_get_serial_sequence('messages', 'id')), $2, $3, $4, $1 FROM group_members gm WHERE gm.group_id = $1 AND gm.user_id <> $2 ORDER BY gm.joined_seq RETURNING id, recipient_id")?,
            // A batch's presence changes in one statement: the users whose last change
            // in the batch is a login ($1), and those whose last is a logout ($2);
            // no user is in both, nor twice in one.
            presence: conn.prepare(
                "WITH gone AS (
                     DELETE FROM presence WHERE user_id = ANY($2::int8[]) AND relay_id = $3
                 )
                 INSERT INTO presence (user_id, relay_id) SELECT u, $3 FROM unnest($1::int8[]) u
                 ON CONFLICT (user_id, relay_id) DO UPDATE SET since = now()",
            )?,
            key: conn.prepare("SELECT pubkey FROM users WHERE name = $1")?,
            resume: conn.prepare(credential::LOOKUP)?,
            // The page is cut from the recipient's index range first, then joined: a
            // prepared statement's generic plan cannot see the LIMIT, and joining first
            // would read the whole backlog for every page.
            pending: conn.prepare(
                "SELECT m.id, u.name, m.body, m.sent_at_ms, m.group_id, g.name, m.system
                 FROM (SELECT * FROM messages WHERE recipient_id = $1 AND id > $2
                       ORDER BY id LIMIT $3) m
                 JOIN users u ON u.id = m.sender_id
                 LEFT JOIN groups g ON g.id = m.group_id
                 ORDER BY m.id",
            )?,
        })
    }
}

const LOCATE: &str =
    "SELECT user_id, relay_id FROM presence WHERE user_id = ANY($1) AND relay_id <> $2";

type Held = fastchat_common::db::Held<Prepared>;

/// Figures the workers keep for the relay's summary and `stats`.
#[derive(Default)]
pub struct StoreMetrics {
    pub batches: AtomicU64,
    pub jobs: AtomicU64,
    pub messages_stored: AtomicU64,
    /// Total time spent in committed batches, microseconds.
    pub commit_micros: AtomicU64,
    pub failed_batches: AtomicU64,
}

/// A worker's state: its database pool and a cache of user names to ids (names and
/// ids never change once created, so the cache never goes stale).
pub struct Worker {
    relay_id: String,
    done: Completions<Done>,
    user_ids: HashMap<String, i64>,
    metrics: Arc<StoreMetrics>,
    max_group_size: i64,
    /// Most messages stored for one recipient (see [`Mailbox`]).
    max_pending: i64,
    mailboxes: HashMap<i64, Mailbox>,
    db: HeldConnection<Prepared>,
}

const USER_CACHE_LIMIT: usize = 100_000;

/// A message row inserted by this batch: (msg_id, recipient).
type Inserted = (i64, i64);

/// What a worker knows of how many messages wait for a recipient: counted in the
/// database now and then (counting stops at the limit, so a full mailbox costs at most
/// one index range of that length), and counted up by the worker's own inserts in
/// between. Acknowledgements and other workers' inserts show at the next count, so the
/// limit is kept to within what arrives between counts.
struct Mailbox {
    waiting: i64,
    counted_at: Instant,
}

/// A count is used this long before the database is asked again...
const MAILBOX_RECOUNT: Duration = Duration::from_secs(10);
/// ...or this long, for a mailbox at its limit (its owner may be reading it down).
const FULL_MAILBOX_RECOUNT: Duration = Duration::from_secs(1);

/// A group message's rows: the group's name and one row per other member.
type GroupRows = (String, Vec<Inserted>);

impl Worker {
    pub fn new(
        db: DbPool,
        relay_id: String,
        done: Completions<Done>,
        metrics: Arc<StoreMetrics>,
        max_group_size: i64,
        max_pending: i64,
    ) -> Worker {
        Worker {
            relay_id,
            done,
            user_ids: HashMap::new(),
            metrics,
            max_group_size,
            max_pending,
            mailboxes: HashMap::new(),
            db: HeldConnection::new(db, Prepared::new),
        }
    }

    /// Runs one batch: runs of message jobs in one transaction each, group operations
    /// in their own, in the order they came.
    pub fn run_batch(&mut self, jobs: Vec<Job>) {
        let Ok(mut held) = self.db.take() else {
            return self.fail_all(jobs);
        };
        let mut healthy = true;
        let mut run = Vec::new();
        for job in jobs {
            if let Job::Group { .. } = job {
                healthy &= self.commit_run(&mut held, std::mem::take(&mut run));
                healthy &= self.run_group_op(&mut held.conn, job);
            } else if let Job::File { .. } = job {
                healthy &= self.commit_run(&mut held, std::mem::take(&mut run));
                healthy &= self.run_file_op(&mut held.conn, job);
            } else {
                run.push(job);
            }
        }
        healthy &= self.commit_run(&mut held, run);
        if healthy {
            self.db.give_back(held);
        }
    }

    /// Commits a run of message jobs; `false` if the database failed.
    fn commit_run(&mut self, held: &mut Held, jobs: Vec<Job>) -> bool {
        if jobs.is_empty() {
            return true;
        }
        let started = Instant::now();
        let (results, after_commit) = match self.commit_batch(&mut held.conn, &held.st, &jobs) {
            Ok(answered) => answered,
            Err(e) => {
                warn!("batch of {} jobs failed: {e}", jobs.len());
                self.metrics.failed_batches.fetch_add(1, Ordering::Relaxed);
                self.fail_all(jobs);
                return false;
            }
        };
        let m = &self.metrics;
        m.batches.fetch_add(1, Ordering::Relaxed);
        m.jobs.fetch_add(jobs.len() as u64, Ordering::Relaxed);
        m.commit_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        let stored: usize = results
            .iter()
            .map(|r| match r {
                Done::Sent { deliveries, .. } => deliveries.len(),
                _ => 0,
            })
            .sum();
        m.messages_stored
            .fetch_add(stored as u64, Ordering::Relaxed);
        self.done.send_all(results);
        match after_commit {
            None => true,
            Some(e) => {
                warn!("database failed after a commit of {} jobs: {e}", jobs.len());
                self.metrics.failed_batches.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Runs one file operation; `false` if the database failed.
    fn run_file_op(&mut self, conn: &mut DbConn, job: Job) -> bool {
        let Job::File {
            conn: token,
            req,
            user_id,
            op,
        } = job
        else {
            return true;
        };
        let (result, healthy) = match files::run(conn, user_id, op, req) {
            Ok(Ok(frames)) => (
                Done::Frames {
                    conn: token,
                    frames,
                },
                true,
            ),
            Ok(Err((code, message))) => (
                Done::Failed {
                    conn: token,
                    req,
                    code,
                    message,
                },
                true,
            ),
            Err(e) => {
                warn!("file operation failed: {e}");
                (
                    Done::Failed {
                        conn: token,
                        req,
                        code: ErrorCode::StoreFailed,
                        message: "the file store is unavailable; retry".into(),
                    },
                    false,
                )
            }
        };
        self.done.send(result);
        healthy
    }

    /// Runs one group operation; `false` if the database failed.
    fn run_group_op(&mut self, conn: &mut DbConn, job: Job) -> bool {
        let Job::Group {
            conn: token,
            req,
            user_id,
            user,
            op,
        } = job
        else {
            return true;
        };
        let outcome = groups::run(conn, user_id, &user, op, req, self.max_group_size);
        let result = match outcome {
            Ok(GroupOutcome::Done { reply, events }) => {
                match self.locate_unprepared(conn, events.iter().map(|(_, r, _)| *r).collect()) {
                    Ok(where_is) => Done::Group {
                        conn: token,
                        reply,
                        deliveries: events
                            .into_iter()
                            .map(|(msg_id, recipient_id, message)| Delivery {
                                recipient_id,
                                remote_relays: where_is
                                    .get(&recipient_id)
                                    .cloned()
                                    .unwrap_or_default(),
                                message: Stored { msg_id, ..message },
                            })
                            .collect(),
                    },
                    // Committed; the events reach members at their next login.
                    Err(_) => Done::Group {
                        conn: token,
                        reply,
                        deliveries: Vec::new(),
                    },
                }
            }
            Ok(GroupOutcome::Refused(code, message)) => Done::Failed {
                conn: token,
                req,
                code,
                message,
            },
            Err(e) => {
                warn!("group operation failed: {e}");
                self.done.send(Done::Failed {
                    conn: token,
                    req,
                    code: ErrorCode::StoreFailed,
                    message: "the group store is unavailable; nothing changed, retry".into(),
                });
                return false;
            }
        };
        self.done.send(result);
        true
    }

    /// Where each recipient has sessions, other than on this relay (for the rare group
    /// operations, which run on the same connection without the prepared set at hand).
    fn locate_unprepared(
        &self,
        conn: &mut DbConn,
        recipients: Vec<i64>,
    ) -> Result<HashMap<i64, Vec<String>>, postgres::Error> {
        let st = conn.prepare(LOCATE)?;
        self.locate(conn, &st, recipients)
    }

    /// Where each recipient has sessions, other than on this relay.
    fn locate(
        &self,
        conn: &mut DbConn,
        locate: &Statement,
        recipients: Vec<i64>,
    ) -> Result<HashMap<i64, Vec<String>>, postgres::Error> {
        let mut where_is: HashMap<i64, Vec<String>> = HashMap::new();
        if recipients.is_empty() {
            return Ok(where_is);
        }
        for row in conn.query(locate, &[&recipients, &self.relay_id])? {
            where_is.entry(row.get(0)).or_default().push(row.get(1));
        }
        Ok(where_is)
    }

    /// Commits a run of message jobs, then answers them. `Err`: nothing was committed.
    /// `Ok` with an error: the commit held but the database failed after it (the
    /// connection must be dropped); the answers already say what holds.
    fn commit_batch(
        &mut self,
        conn: &mut DbConn,
        st: &Prepared,
        jobs: &[Job],
    ) -> Result<(Vec<Done>, Option<postgres::Error>), postgres::Error> {
        let now = time::now_ms();

        // Resolve recipient names, from the cache where possible.
        let unknown: Vec<&str> = jobs
            .iter()
            .filter_map(|j| match j {
                Job::Send {
                    target: Target::User(to),
                    ..
                } if !self.user_ids.contains_key(to) => Some(to.as_str()),
                _ => None,
            })
            .collect();
        if !unknown.is_empty() {
            if self.user_ids.len() > USER_CACHE_LIMIT {
                self.user_ids.clear();
            }
            for row in conn.query(&st.names, &[&unknown])? {
                self.user_ids.insert(row.get(0), row.get(1));
            }
        }

        // Direct sends to known users, (job position, recipient); those to recipients
        // with full mailboxes are taken out and refused, nothing stored.
        let mut direct: Vec<(usize, i64)> = jobs
            .iter()
            .enumerate()
            .filter_map(|(i, j)| match j {
                Job::Send {
                    target: Target::User(to),
                    ..
                } => self.user_ids.get(to).map(|r| (i, *r)),
                _ => None,
            })
            .collect();
        let refused = self.full_mailboxes(conn, st, &mut direct)?;

        // The usual batch is only direct messages and acknowledgements, or only logins,
        // logouts and credential checks (a login storm): one statement, its own
        // transaction. Anything else goes in an explicit transaction.
        let is_direct = |j: &Job| {
            matches!(
                j,
                Job::Send {
                    target: Target::User(_),
                    ..
                } | Job::Ack { .. }
            )
        };
        let is_presence = |j: &Job| {
            matches!(
                j,
                Job::Login { .. } | Job::Logout { .. } | Job::Resume { .. }
            )
        };
        let (direct_rows, group_rows) = if jobs.iter().all(is_direct) {
            (
                self.store_direct(&mut **conn, st, jobs, &direct, now)?,
                Vec::new(),
            )
        } else if jobs.iter().all(is_presence) {
            self.store_presence(&mut **conn, st, jobs)?;
            (Vec::new(), Vec::new())
        } else {
            let mut tx = conn.transaction()?;
            let direct_rows = self.store_direct(&mut tx, st, jobs, &direct, now)?;
            let group_rows = store_group(&mut tx, st, jobs, now)?;
            self.store_presence(&mut tx, st, jobs)?;
            tx.commit()?;
            (direct_rows, group_rows)
        };

        // Everything below runs after the commit, so a failure from here on must not turn
        // a stored message into "nothing was stored": the sends are still answered
        // `sent` (pushed to recipients on this relay now; recipients elsewhere get them
        // at their next login or catch-up), the reads fail on their own, and the
        // worker drops the connection.
        let mut after_commit: Option<postgres::Error> = None;

        // Where are the recipients?
        let recipients: Vec<i64> = direct_rows
            .iter()
            .map(|(_, r)| *r)
            .chain(
                group_rows
                    .iter()
                    .flatten()
                    .flat_map(|(_, rows)| rows.iter().map(|(_, r)| *r)),
            )
            .collect();
        let where_is = self
            .locate(conn, &st.locate, recipients)
            .unwrap_or_else(|e| {
                after_commit = Some(e);
                HashMap::new()
            });
        let located = |recipient_id: i64, message: Stored| Delivery {
            recipient_id,
            remote_relays: where_is.get(&recipient_id).cloned().unwrap_or_default(),
            message,
        };

        let mut results = Vec::new();
        let mut direct_rows = direct_rows.into_iter();
        let mut group_rows = group_rows.into_iter();
        for (i, job) in jobs.iter().enumerate() {
            match job {
                Job::Send {
                    conn: token, req, ..
                } if refused.contains(&i) => {
                    results.push(Done::Failed {
                        conn: *token,
                        req: *req,
                        code: ErrorCode::MailboxFull,
                        message: format!(
                            "the recipient has {} or more messages waiting; nothing was stored, try again later",
                            self.max_pending
                        ),
                    });
                }
                Job::Send {
                    conn: token,
                    req,
                    sender,
                    target,
                    body,
                    ..
                } => {
                    let stored = |msg_id, group_id, group| Stored {
                        msg_id,
                        from: sender.clone(),
                        body: body.clone(),
                        ts: now,
                        group_id,
                        group,
                        event: None,
                    };
                    match target {
                        Target::User(to) if !self.user_ids.contains_key(to) => {
                            results.push(Done::Failed {
                                conn: *token,
                                req: *req,
                                code: ErrorCode::UnknownUser,
                                message: format!("there is no user called {to}"),
                            });
                        }
                        Target::User(_) => {
                            let (msg_id, recipient_id) = direct_rows
                                .next()
                                .expect("one inserted row per send to a known user, in order");
                            results.push(Done::Sent {
                                conn: *token,
                                req: *req,
                                msg_id,
                                ts: now,
                                deliveries: vec![located(recipient_id, stored(msg_id, None, None))],
                            });
                        }
                        Target::Group(group_id) => match group_rows
                            .next()
                            .expect("one entry per group send, in order")
                        {
                            None => results.push(Done::Failed {
                                conn: *token,
                                req: *req,
                                code: ErrorCode::NotMember,
                                message: format!("you are not a member of group {group_id}"),
                            }),
                            Some((name, rows)) => results.push(Done::Sent {
                                conn: *token,
                                req: *req,
                                msg_id: rows.first().map_or(0, |(id, _)| *id),
                                ts: now,
                                deliveries: rows
                                    .into_iter()
                                    .map(|(msg_id, r)| {
                                        located(
                                            r,
                                            stored(msg_id, Some(*group_id), Some(name.clone())),
                                        )
                                    })
                                    .collect(),
                            }),
                        },
                    }
                }
                Job::Login {
                    conn: token,
                    user_id,
                    page,
                }
                | Job::FetchPending {
                    conn: token,
                    user_id,
                    page,
                    ..
                } => {
                    let after = match job {
                        Job::FetchPending { after, .. } => *after,
                        _ => 0,
                    };
                    match unless_failed(&mut after_commit, || {
                        fetch_pending(conn, &st.pending, *user_id, after, *page, Some(PAGE_BYTES))
                    }) {
                        Some((messages, more)) => results.push(Done::Pending {
                            conn: *token,
                            more,
                            messages,
                        }),
                        None => results.push(Done::LoginFailed { conn: *token }),
                    }
                }
                Job::CatchUp {
                    conn: token,
                    user_id,
                    limit,
                } => {
                    // A catch-up that fails is left to the next mesh change or login.
                    if let Some((messages, _)) = unless_failed(&mut after_commit, || {
                        fetch_pending(conn, &st.pending, *user_id, 0, *limit, Some(CATCH_UP_BYTES))
                    }) {
                        results.push(Done::CatchUp {
                            conn: *token,
                            messages,
                        });
                    }
                }
                Job::LookupKey {
                    conn: token,
                    req,
                    user,
                    ..
                } => match unless_failed(&mut after_commit, || conn.query_opt(&st.key, &[user])) {
                    Some(row) => results.push(Done::Key {
                        conn: *token,
                        req: *req,
                        user: user.clone(),
                        pubkey: row.map(|r| r.get(0)),
                    }),
                    None => results.push(store_failed(*token, *req)),
                },
                Job::Resume {
                    conn: token,
                    user,
                    credential,
                } => match unless_failed(&mut after_commit, || {
                    conn.query_opt(&st.resume, &[user, &credential::hash(credential)])
                }) {
                    Some(row) => results.push(Done::Resumed {
                        conn: *token,
                        user: user.clone(),
                        user_id: row.map(|r| r.get(0)),
                    }),
                    None => results.push(Done::LoginFailed { conn: *token }),
                },
                Job::Ack { .. } | Job::Logout { .. } | Job::Group { .. } | Job::File { .. } => {}
            }
        }
        Ok((results, after_commit))
    }

    /// Takes the sends whose recipient's mailbox is full out of `direct` (job position,
    /// recipient) and returns their positions: counts what is stale in one statement,
    /// then admits sends in order while there is room, counting them in.
    fn full_mailboxes(
        &mut self,
        conn: &mut DbConn,
        st: &Prepared,
        direct: &mut Vec<(usize, i64)>,
    ) -> Result<HashSet<usize>, postgres::Error> {
        let now = Instant::now();
        let mut incoming: HashMap<i64, i64> = HashMap::new();
        for (_, r) in direct.iter() {
            *incoming.entry(*r).or_default() += 1;
        }
        let stale: Vec<i64> = incoming
            .iter()
            .filter(|(r, k)| match self.mailboxes.get(r) {
                None => true,
                Some(m) => {
                    let age = now.duration_since(m.counted_at);
                    age >= MAILBOX_RECOUNT
                        || (m.waiting + **k > self.max_pending && age >= FULL_MAILBOX_RECOUNT)
                }
            })
            .map(|(r, _)| *r)
            .collect();
        if !stale.is_empty() {
            if self.mailboxes.len() > USER_CACHE_LIMIT {
                self.mailboxes.clear();
            }
            for row in conn.query(&st.waiting, &[&stale, &self.max_pending])? {
                self.mailboxes.insert(
                    row.get(0),
                    Mailbox {
                        waiting: row.get(1),
                        counted_at: now,
                    },
                );
            }
        }
        let mut refused = HashSet::new();
        direct.retain(|(i, r)| match self.mailboxes.get_mut(r) {
            Some(m) if m.waiting >= self.max_pending => {
                refused.insert(*i);
                false
            }
            Some(m) => {
                m.waiting += 1;
                true
            }
            None => true,
        });
        Ok(refused)
    }

    /// Records the batch's logins and logouts on this relay: each user ends as their
    /// last job in the batch says (a logout then a login of one user leaves them here).
    fn store_presence(
        &self,
        db: &mut impl GenericClient,
        st: &Prepared,
        jobs: &[Job],
    ) -> Result<(), postgres::Error> {
        let mut last: HashMap<i64, bool> = HashMap::new();
        for job in jobs {
            match job {
                Job::Login { user_id, .. } => last.insert(*user_id, true),
                Job::Logout { user_id } => last.insert(*user_id, false),
                _ => None,
            };
        }
        if last.is_empty() {
            return Ok(());
        }
        let (mut here, mut gone) = (Vec::new(), Vec::new());
        for (user_id, on) in last {
            if on { &mut here } else { &mut gone }.push(user_id);
        }
        db.execute(&st.presence, &[&here, &gone, &self.relay_id])?;
        Ok(())
    }

    /// Inserts the batch's direct messages (ids drawn in order, so one sender's
    /// messages keep their order) and deletes its acknowledged messages, in one
    /// statement. `direct` holds the sends to store, (job position, recipient), in job
    /// order. Returns (msg_id, recipient) for each, in the same order.
    fn store_direct(
        &self,
        db: &mut impl GenericClient,
        st: &Prepared,
        jobs: &[Job],
        direct: &[(usize, i64)],
        now: u64,
    ) -> Result<Vec<Inserted>, postgres::Error> {
        let mut recipients = Vec::with_capacity(direct.len());
        let mut senders = Vec::with_capacity(direct.len());
        let mut bodies = Vec::with_capacity(direct.len());
        for &(i, recipient) in direct {
            if let Job::Send {
                sender_id, body, ..
            } = &jobs[i]
            {
                recipients.push(recipient);
                senders.push(*sender_id);
                bodies.push(body.as_str());
            }
        }
        // Acknowledgements: only the acknowledging user's own rows (exact pairs).
        let mut ack_users: Vec<i64> = Vec::new();
        let mut ack_ids: Vec<i64> = Vec::new();
        for job in jobs {
            if let Job::Ack { user_id, msg_ids } = job {
                ack_users.extend(std::iter::repeat_n(*user_id, msg_ids.len()));
                ack_ids.extend(msg_ids);
            }
        }
        if recipients.is_empty() && ack_ids.is_empty() {
            return Ok(Vec::new());
        }
        let stamps = vec![now as i64; recipients.len()];
        let mut ids: Vec<i64> = db
            .query(
                &st.store,
                &[
                    &recipients,
                    &senders,
                    &bodies,
                    &stamps,
                    &ack_users,
                    &ack_ids,
                ],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        // Drawn in input order, so sorted they line up with the input.
        ids.sort_unstable();
        Ok(ids.into_iter().zip(recipients).collect())
    }

    /// Answers every job of a failed batch: nothing in it was committed.
    fn fail_all(&self, jobs: Vec<Job>) {
        let results = jobs.into_iter().filter_map(|job| match job {
            Job::Send { conn, req, .. }
            | Job::LookupKey { conn, req, .. }
            | Job::File { conn, req, .. }
            | Job::Group { conn, req, .. } => Some(store_failed(conn, req)),
            Job::Login { conn, .. } | Job::FetchPending { conn, .. } | Job::Resume { conn, .. } => {
                Some(Done::LoginFailed { conn })
            }
            // The next mesh change or login catches up instead.
            Job::CatchUp { .. } => None,
            // An ack that did not commit is harmless: the message is delivered again.
            Job::Ack { .. } | Job::Logout { .. } => None,
        });
        self.done.send_all(results.collect::<Vec<_>>());
    }
}

/// The answer to a request the store could not run: nothing of it was committed.
fn store_failed(conn: Token, req: u64) -> Done {
    Done::Failed {
        conn,
        req,
        code: ErrorCode::StoreFailed,
        message: "the message store is unavailable; nothing was stored, retry".into(),
    }
}

/// Runs `query` unless an earlier one of the batch failed; a failure is kept in
/// `failed` (the worker then drops its connection). `None` when it did not run or failed.
fn unless_failed<T>(
    failed: &mut Option<postgres::Error>,
    query: impl FnOnce() -> Result<T, postgres::Error>,
) -> Option<T> {
    if failed.is_some() {
        return None;
    }
    query().map_err(|e| *failed = Some(e)).ok()
}

/// Stores the batch's group messages: one row per other member, one statement per
/// message, only if the sender is a member. One entry per group send, in job order:
/// the group's name and the rows, or `None` for a sender who is not a member.
fn store_group(
    tx: &mut postgres::Transaction<'_>,
    st: &Prepared,
    jobs: &[Job],
    now: u64,
) -> Result<Vec<Option<GroupRows>>, postgres::Error> {
    let mut group_rows = Vec::new();
    for job in jobs {
        if let Job::Send {
            sender_id,
            target: Target::Group(group_id),
            body,
            ..
        } = job
        {
            let Some(member) = tx.query_opt(&st.member, &[group_id, sender_id])? else {
                group_rows.push(None);
                continue;
            };
            let rows = tx.query(
                &st.group_insert,
                &[group_id, sender_id, body, &(now as i64)],
            )?;
            group_rows.push(Some((
                member.get(0),
                rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
            )));
        }
    }
    Ok(group_rows)
}

/// Pending messages of `user_id` after id `after`, oldest first.
/// Up to `page` messages stored for `user_id` after id `after`, oldest first, cut after
/// `max_bytes` of bodies if given (at least one is returned). The flag: more may wait
/// (the page was full or cut).
fn fetch_pending(
    conn: &mut DbConn,
    pending: &Statement,
    user_id: i64,
    after: i64,
    page: i64,
    max_bytes: Option<usize>,
) -> Result<(Vec<Stored>, bool), postgres::Error> {
    let rows = conn.query(pending, &[&user_id, &after, &page])?;
    let full = rows.len() as i64 >= page;
    let mut bytes = 0usize;
    let keep = rows
        .iter()
        .take_while(|r| {
            let size = r.get::<_, &str>(2).len();
            let fits = bytes == 0 || max_bytes.is_none_or(|max| bytes + size <= max);
            bytes += size;
            fits
        })
        .count();
    let cut = keep < rows.len();
    let messages = rows[..keep]
        .iter()
        .map(|r| {
            let system: bool = r.get(6);
            let body: String = r.get(2);
            let event = if system {
                serde_json::from_str::<GroupEvent>(&body).ok()
            } else {
                None
            };
            Stored {
                msg_id: r.get(0),
                from: r.get(1),
                body: if system { String::new() } else { body },
                ts: r.get::<_, i64>(3) as u64,
                group_id: r.get(4),
                group: r.get(5),
                event,
            }
        })
        .collect();
    Ok((messages, full || cut))
}

/// Removes presence rows a previous run of this relay left behind.
pub fn clear_stale_presence(
    db: &DbPool,
    relay_id: &str,
) -> Result<u64, Box<dyn std::error::Error>> {
    Ok(db
        .get()?
        .execute("DELETE FROM presence WHERE relay_id = $1", &[&relay_id])?)
}
