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
//! Files: [`jobs`] (what passes between the loop and the workers), `batch` (a run of
//! message jobs: resolve → quota → write → answer), `sql` (the prepared statements and
//! the reads outside a batch), `mailbox` (mailbox limits), [`files`] and [`groups`]
//! (file and group operations, a transaction each); this file: the worker, how it cuts
//! a batch into runs, and failure answers.

mod batch;
pub mod blocks;
pub mod files;
pub mod groups;
mod jobs;
pub mod mailbox;
mod sql;

pub use jobs::*;
pub use mailbox::StoreLimits;
use mailbox::*;
use sql::*;
pub use sql::{clear_stale_presence, delivery_epoch};

use crate::message::{Delivery, Message, Target};
use crate::session::PAGE_BYTES;
use blocks::BlockOp;
use files::FileOp;
use groups::{GroupOp, GroupOutcome};

use fastchat_common::credential;
use fastchat_common::db::{DbConn, DbPool, HeldConnection};
use fastchat_common::pool::Completions;
use fastchat_common::proto::{ErrorCode, GroupEvent, Refusal, RelayToClient};
use fastchat_common::{time, warn};
use mio::Token;
use postgres::{GenericClient, Statement};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    group_limits: groups::Limits,
    /// What may wait per recipient and per sender (see [`mailbox`]).
    limits: StoreLimits,
    mailboxes: Tallies,
    senders: Tallies,
    db: HeldConnection<Prepared>,
    /// Whether sends marked `hold` may be delivered from memory (cleared at shutdown,
    /// when everything is stored).
    holding: Arc<AtomicBool>,
}

const USER_CACHE_LIMIT: usize = 100_000;

/// A message row inserted by this batch: (msg_id, recipient).
type Inserted = (i64, i64);

impl Worker {
    pub fn new(
        db: DbPool,
        relay_id: String,
        done: Completions<Done>,
        metrics: Arc<StoreMetrics>,
        group_limits: groups::Limits,
        limits: StoreLimits,
        holding: Arc<AtomicBool>,
    ) -> Worker {
        Worker {
            relay_id,
            done,
            user_ids: HashMap::new(),
            metrics,
            group_limits,
            limits,
            mailboxes: Tallies::new(true),
            senders: Tallies::new(false),
            db: HeldConnection::new(db, Prepared::new),
            holding,
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
            } else if let Job::File { .. } | Job::Block { .. } = job {
                healthy &= self.commit_run(&mut held, std::mem::take(&mut run));
                healthy &= self.run_frames_op(&mut held.conn, job);
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

    /// Runs one file or block-list operation (a transaction answered with frames);
    /// `false` if the database failed.
    fn run_frames_op(&mut self, conn: &mut DbConn, job: Job) -> bool {
        let (token, req, ran, what) = match job {
            Job::File {
                conn: token,
                req,
                user_id,
                op,
            } => (
                token,
                req,
                files::run(conn, user_id, op, req, self.limits),
                "file",
            ),
            Job::Block {
                conn: token,
                req,
                user_id,
                op,
            } => (
                token,
                req,
                blocks::run(conn, user_id, op, req),
                "block list",
            ),
            _ => return true,
        };
        let (result, healthy) = match ran {
            Ok(Ok(frames)) => (
                Done::Frames {
                    conn: token,
                    frames,
                },
                true,
            ),
            Ok(Err(why)) => (
                Done::Failed {
                    conn: token,
                    req,
                    why,
                },
                true,
            ),
            Err(e) => {
                warn!("{what} operation failed: {e}");
                (
                    Done::Failed {
                        conn: token,
                        req,
                        why: Refusal::new(
                            ErrorCode::StoreFailed,
                            format!("the {what} store is unavailable; nothing changed, retry"),
                        ),
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
        let outcome = groups::run(conn, user_id, &user, op, req, self.group_limits);
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
                                message: Message { msg_id, ..message },
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
            Ok(GroupOutcome::Refused(why)) => Done::Failed {
                conn: token,
                req,
                why,
            },
            Err(e) => {
                warn!("group operation failed: {e}");
                self.done.send(Done::Failed {
                    conn: token,
                    req,
                    why: Refusal::new(
                        ErrorCode::StoreFailed,
                        "the group store is unavailable; nothing changed, retry",
                    ),
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

    /// Answers every job of a failed batch: nothing in it was committed.
    fn fail_all(&self, jobs: Vec<Job>) {
        let results = jobs.into_iter().filter_map(|job| match job {
            Job::Send { conn, req, .. }
            | Job::LookupKey { conn, req, .. }
            | Job::File { conn, req, .. }
            | Job::Block { conn, req, .. }
            | Job::Group { conn, req, .. } => Some(store_failed(conn, req)),
            Job::Login { conn, .. } | Job::FetchPending { conn, .. } => {
                Some(Done::LoginFailed { conn })
            }
            Job::Resume { conn, from, .. } => Some(Done::ResumeFailed { conn, from }),
            // The next mesh change or login catches up instead.
            Job::CatchUp { .. } => None,
            // An ack that did not commit is harmless: the message is delivered again.
            Job::Ack { conn, .. } => Some(Done::Acked { conn }),
            Job::Logout { .. } => None,
        });
        self.done.send_all(results.collect::<Vec<_>>());
    }
}

/// The answer to a request the store could not run: nothing of it was committed.
fn store_failed(conn: Token, req: u64) -> Done {
    Done::Failed {
        conn,
        req,
        why: Refusal::new(
            ErrorCode::StoreFailed,
            "the message store is unavailable; nothing was stored, retry",
        ),
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
