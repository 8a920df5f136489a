//! The relay's database work: jobs from the poll loop, run by the worker pool in
//! batches, one transaction per batch (group commit).
//!
//! Ordering rules that make routing race-free (DESIGN.md, "Routing a message"):
//! a batch commits its message inserts *then* reads the recipients' presence; a login
//! commits its presence row *then* reads the pending messages.
//!
//! Group membership operations run in a transaction of their own, in the batch's order,
//! so a member added before a group message gets it.
//!
//! Files: [`jobs`] (what passes between the loop and the workers), `sql` (the prepared
//! statements and the reads outside a batch), `mailbox` (mailbox limits); this file:
//! the worker and its batch.

mod jobs;
mod mailbox;
mod sql;

pub use jobs::*;
use mailbox::*;
pub use sql::clear_stale_presence;
use sql::*;

use crate::files::{self, FileOp};
use crate::groups::{self, GroupOp, GroupOutcome};
use crate::session::PAGE_BYTES;

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
