//! One run of message jobs as one transaction (group commit), in four steps:
//! **resolve** (recipient names to ids, from the cache where possible; a group send's
//! members), **limits** (first the probe of direct sends that may be delivered from
//! memory: blocked, or online and then not stored at all, see `crate::holds`; then
//! what each other send may store: recipients with room in their
//! mailboxes, within the sender's quota, see [`super::mailbox`]), **write** (one
//! statement for the usual batch, else one transaction), **answer** (after the commit:
//! where the recipients are, then one result per job, in order).

use super::*;
use crate::holds::Held;

/// What the limits decided for a send, by job position.
enum Decision {
    Direct {
        recipient: i64,
    },
    /// Not stored: the recipient is online (on these relays), so it is delivered from
    /// memory.
    Hold {
        recipient: i64,
        relays: Vec<String>,
    },
    /// The recipient blocked the sender (found by the probe; nothing drawn or stored).
    Blocked,
    /// To be stored after the messages the loop holds from the sender to `recipient`
    /// (the send was `behind` them): nothing written here.
    AfterHeld {
        recipient: i64,
    },
    Group {
        group_id: i64,
        name: String,
        recipients: Vec<i64>,
        /// Members left out because their mailboxes are full.
        full: Vec<String>,
    },
    UnknownUser,
    NotMember,
    Refused(Admitted),
}

/// What the write step stored.
struct Written {
    /// Per direct send stored, in job order: its id, the recipient, and whether the
    /// recipient blocked the sender (then nothing was stored).
    direct: Vec<(i64, i64, bool)>,
    /// Per group send stored, in job order: its rows.
    groups: Vec<Vec<Inserted>>,
}

impl Worker {
    /// Commits a run of message jobs, then answers them. `Err`: nothing was committed.
    /// `Ok` with an error: the commit held but the database failed after it (the
    /// connection must be dropped); the answers already say what holds.
    pub(super) fn commit_batch(
        &mut self,
        conn: &mut DbConn,
        st: &Prepared,
        jobs: &[Job],
    ) -> Result<(Vec<Done>, Option<postgres::Error>), postgres::Error> {
        let now = time::now_ms();
        self.resolve(conn, st, jobs)?;
        let decisions = self.decide(conn, st, jobs)?;
        let written = self.write(conn, st, jobs, &decisions, now)?;
        Ok(self.answer(conn, st, jobs, &decisions, written, now))
    }

    /// Resolve: learns the ids of the recipients the cache does not know.
    fn resolve(
        &mut self,
        conn: &mut DbConn,
        st: &Prepared,
        jobs: &[Job],
    ) -> Result<(), postgres::Error> {
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
        if unknown.is_empty() {
            return Ok(());
        }
        if self.user_ids.len() > USER_CACHE_LIMIT {
            self.user_ids.clear();
        }
        for row in conn.query(&st.names, &[&unknown])? {
            self.user_ids.insert(row.get(0), row.get(1));
        }
        Ok(())
    }

    /// Limits: each send's recipients (a group's other members, if the sender is one,
    /// less those who blocked the sender), then what the limits admit. One decision per
    /// send; `None` for the jobs that are not sends.
    fn decide(
        &mut self,
        conn: &mut DbConn,
        st: &Prepared,
        jobs: &[Job],
    ) -> Result<Vec<Option<Decision>>, postgres::Error> {
        let mut probed = self.probe(conn, st, jobs)?;
        let mut decisions: Vec<Option<Decision>> = Vec::with_capacity(jobs.len());
        let mut wanted = Vec::new();
        // Beside each of `wanted`: the group's name for a group send.
        let mut group_names: Vec<Option<String>> = Vec::new();
        for (i, job) in jobs.iter().enumerate() {
            let Job::Send {
                sender_id,
                target,
                body,
                behind,
                ..
            } = job
            else {
                decisions.push(None);
                continue;
            };
            let (recipients, group_name) = match target {
                Target::User(to) => match self.user_ids.get(to) {
                    Some(r) => match probed.remove(&i) {
                        Some((true, _)) => {
                            decisions.push(Some(Decision::Blocked));
                            continue;
                        }
                        Some((false, relays)) if !relays.is_empty() => {
                            let relays = relays.into_iter().filter(|r| *r != self.relay_id);
                            decisions.push(Some(Decision::Hold {
                                recipient: *r,
                                relays: relays.collect(),
                            }));
                            continue;
                        }
                        _ if *behind => {
                            decisions.push(Some(Decision::AfterHeld { recipient: *r }));
                            continue;
                        }
                        _ => (vec![*r], None),
                    },
                    None => {
                        decisions.push(Some(Decision::UnknownUser));
                        continue;
                    }
                },
                Target::Group(group_id) => {
                    let Some(member) = conn.query_opt(&st.member, &[group_id, sender_id])? else {
                        decisions.push(Some(Decision::NotMember));
                        continue;
                    };
                    let members = conn
                        .query(&st.members, &[group_id, sender_id])?
                        .iter()
                        .map(|r| r.get(0))
                        .collect();
                    (members, Some(member.get::<_, String>(0)))
                }
            };
            group_names.push(group_name);
            wanted.push(Wanted {
                job: i,
                sender: *sender_id,
                bytes: body.len() as i64,
                recipients,
                direct: matches!(target, Target::User(_)),
            });
            decisions.push(None);
        }
        let admitted = self.admit(conn, st, &wanted)?;
        for ((w, a), group_name) in wanted.into_iter().zip(admitted).zip(group_names) {
            let Job::Send { target, .. } = &jobs[w.job] else {
                continue;
            };
            decisions[w.job] = Some(match (target, group_name, a) {
                (Target::Group(group_id), Some(name), Admitted::Store { recipients, full }) => {
                    Decision::Group {
                        group_id: *group_id,
                        name,
                        recipients,
                        full: self.names_of(conn, &full)?,
                    }
                }
                (_, _, Admitted::Store { recipients, .. }) => Decision::Direct {
                    recipient: recipients[0],
                },
                (_, _, refused) => Decision::Refused(refused),
            });
        }
        Ok(decisions)
    }

    /// The probe, for the direct sends that may be delivered from memory: by job
    /// position, whether the recipient blocked the sender and the relays where the
    /// recipient has sessions. Empty when nothing may be held (then no statement runs).
    fn probe(
        &self,
        conn: &mut DbConn,
        st: &Prepared,
        jobs: &[Job],
    ) -> Result<HashMap<usize, (bool, Vec<String>)>, postgres::Error> {
        let mut at = Vec::new();
        let (mut recipients, mut senders) = (Vec::new(), Vec::new());
        if self.holding.load(Ordering::Relaxed) {
            for (i, job) in jobs.iter().enumerate() {
                if let Job::Send {
                    sender_id,
                    target: Target::User(to),
                    hold: true,
                    ..
                } = job
                {
                    if let Some(r) = self.user_ids.get(to) {
                        at.push(i);
                        recipients.push(*r);
                        senders.push(*sender_id);
                    }
                }
            }
        }
        if at.is_empty() {
            return Ok(HashMap::new());
        }
        let rows = conn.query(&st.probe, &[&recipients, &senders])?;
        Ok(at
            .into_iter()
            .zip(rows.iter().map(|r| (r.get(0), r.get(1))))
            .collect())
    }

    /// The names of `ids` (members a group send left out: rare, so not cached).
    fn names_of(&self, conn: &mut DbConn, ids: &[i64]) -> Result<Vec<String>, postgres::Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(conn
            .query(
                "SELECT name FROM users WHERE id = ANY($1) ORDER BY name",
                &[&ids],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Write: the usual batch is only direct messages and acknowledgements, or only
    /// logins, logouts and credential checks (a login storm): one statement, its own
    /// transaction. Anything else goes in an explicit transaction.
    fn write(
        &mut self,
        conn: &mut DbConn,
        st: &Prepared,
        jobs: &[Job],
        decisions: &[Option<Decision>],
        now: u64,
    ) -> Result<Written, postgres::Error> {
        let direct: Vec<(usize, i64)> = decisions
            .iter()
            .enumerate()
            .filter_map(|(i, d)| match d {
                Some(Decision::Direct { recipient }) => Some((i, *recipient)),
                _ => None,
            })
            .collect();
        let groups: Vec<(usize, i64, &[i64])> = decisions
            .iter()
            .enumerate()
            .filter_map(|(i, d)| match d {
                Some(Decision::Group {
                    group_id,
                    recipients,
                    ..
                }) => Some((i, *group_id, recipients.as_slice())),
                _ => None,
            })
            .collect();
        let is_presence = |j: &Job| {
            matches!(
                j,
                Job::Login { .. } | Job::Logout { .. } | Job::Resume { .. }
            )
        };
        let has_presence = jobs
            .iter()
            .any(|j| matches!(j, Job::Login { .. } | Job::Logout { .. }));
        if groups.is_empty() && !has_presence {
            return Ok(Written {
                direct: self.store_direct(&mut **conn, st, jobs, &direct, now)?,
                groups: Vec::new(),
            });
        }
        if jobs.iter().all(is_presence) {
            self.store_presence(&mut **conn, st, jobs)?;
            return Ok(Written {
                direct: Vec::new(),
                groups: Vec::new(),
            });
        }
        let mut tx = conn.transaction()?;
        let direct = self.store_direct(&mut tx, st, jobs, &direct, now)?;
        let groups = store_group(&mut tx, st, jobs, &groups, now)?;
        self.store_presence(&mut tx, st, jobs)?;
        tx.commit()?;
        Ok(Written { direct, groups })
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
    /// order. Returns (msg_id, recipient, blocked) for each, in the same order.
    fn store_direct(
        &self,
        db: &mut impl GenericClient,
        st: &Prepared,
        jobs: &[Job],
        direct: &[(usize, i64)],
        now: u64,
    ) -> Result<Vec<(i64, i64, bool)>, postgres::Error> {
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
            if let Job::Ack {
                user_id, msg_ids, ..
            } = job
            {
                ack_users.extend(std::iter::repeat_n(*user_id, msg_ids.len()));
                ack_ids.extend(msg_ids);
            }
        }
        if recipients.is_empty() && ack_ids.is_empty() {
            return Ok(Vec::new());
        }
        let stamps = vec![now as i64; recipients.len()];
        let mut ids: Vec<(i64, bool)> = db
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
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        // Drawn in input order, so sorted they line up with the input.
        ids.sort_unstable();
        Ok(ids
            .into_iter()
            .zip(recipients)
            .map(|((id, blocked), r)| (id, r, blocked))
            .collect())
    }

    /// Answer: everything here runs after the commit, so a failure from here on must
    /// not turn a stored message into "nothing was stored": the sends are still
    /// answered `sent` (pushed to recipients on this relay now; recipients elsewhere
    /// get them at their next login or catch-up), the reads fail on their own, and the
    /// worker drops the connection (the returned error).
    fn answer(
        &self,
        conn: &mut DbConn,
        st: &Prepared,
        jobs: &[Job],
        decisions: &[Option<Decision>],
        written: Written,
        now: u64,
    ) -> (Vec<Done>, Option<postgres::Error>) {
        let mut after_commit: Option<postgres::Error> = None;
        let recipients: Vec<i64> = written
            .direct
            .iter()
            .filter(|(_, _, blocked)| !blocked)
            .map(|(_, r, _)| *r)
            .chain(written.groups.iter().flatten().map(|(_, r)| *r))
            .collect();
        let where_is = self
            .locate(conn, &st.locate, recipients)
            .unwrap_or_else(|e| {
                after_commit = Some(e);
                HashMap::new()
            });
        let located = |recipient_id: i64, message: Message| Delivery {
            recipient_id,
            remote_relays: where_is.get(&recipient_id).cloned().unwrap_or_default(),
            message,
        };
        let l = self.limits;
        let mut results = Vec::new();
        let mut direct_rows = written.direct.into_iter();
        let mut group_rows = written.groups.into_iter();
        for (i, job) in jobs.iter().enumerate() {
            let Job::Send {
                conn: token,
                req,
                sender_id,
                sender,
                target,
                body,
                ..
            } = job
            else {
                results.extend(read(conn, st, job, &mut after_commit));
                continue;
            };
            let stored = |msg_id, group_id, group| Message {
                msg_id,
                from: sender.clone(),
                body: body.clone(),
                ts: now,
                group_id,
                group,
                event: None,
            };
            let failed = |code, message: String| Done::Failed {
                conn: *token,
                req: *req,
                why: Refusal::new(code, message),
            };
            let sent = |msg_id, deliveries, full| Done::Sent {
                conn: *token,
                req: *req,
                msg_id,
                ts: now,
                deliveries,
                full,
            };
            // Named only in refusals (no allocation for a send that is stored).
            let to = || match target {
                Target::User(to) => to.clone(),
                Target::Group(group_id) => format!("group {group_id}"),
            };
            let decision = decisions[i].as_ref().expect("a decision for every send");
            let blocked = || {
                failed(
                    ErrorCode::Blocked,
                    format!(
                        "{} does not accept messages from you; nothing was stored",
                        to()
                    ),
                )
            };
            let held = |recipient_id: i64| Held {
                conn: *token,
                req: *req,
                sender_id: *sender_id,
                sender: sender.clone(),
                to: to(),
                recipient_id,
                body: body.clone(),
                ts: now,
            };
            results.push(match decision {
                Decision::Hold { recipient, relays } => Done::Hold {
                    held: held(*recipient),
                    remote_relays: relays.clone(),
                },
                Decision::AfterHeld { recipient } => Done::AfterHeld {
                    held: held(*recipient),
                },
                Decision::Blocked => blocked(),
                Decision::UnknownUser => failed(
                    ErrorCode::UnknownUser,
                    format!("there is no user called {}", to()),
                ),
                Decision::NotMember => failed(
                    ErrorCode::NotMember,
                    format!("you are not a member of {}", to()),
                ),
                Decision::Refused(Admitted::MailboxFull) => failed(
                    ErrorCode::MailboxFull,
                    format!(
                        "the recipient has {} messages waiting (or {} MiB of them), the most allowed; nothing was stored, try again later",
                        l.max_pending,
                        l.max_pending_bytes / (1024 * 1024)
                    ),
                ),
                Decision::Refused(_) => failed(
                    ErrorCode::OverQuota,
                    format!(
                        "you have {} MiB (or {MAX_SENDER_ROWS} messages) waiting for their recipients or in files, the most allowed; nothing was stored, it frees as they are fetched",
                        l.max_stored_bytes / (1024 * 1024)
                    ),
                ),
                Decision::Direct { .. } => {
                    let (msg_id, recipient_id, blocked_by_recipient) = direct_rows
                        .next()
                        .expect("one inserted row per direct send admitted, in order");
                    if blocked_by_recipient {
                        blocked()
                    } else {
                        sent(
                            msg_id,
                            vec![located(recipient_id, stored(msg_id, None, None))],
                            Vec::new(),
                        )
                    }
                }
                Decision::Group {
                    group_id, name, full, ..
                } => {
                    let rows = group_rows
                        .next()
                        .expect("one entry per group send admitted, in order");
                    sent(
                        rows.first().map_or(0, |(id, _)| *id),
                        rows.into_iter()
                            .map(|(msg_id, r)| {
                                located(r, stored(msg_id, Some(*group_id), Some(name.clone())))
                            })
                            .collect(),
                        full.clone(),
                    )
                }
            });
        }
        (results, after_commit)
    }
}

/// The answer to a job that reads (after the batch's commit, so what it reads
/// includes what the batch wrote): backlog pages, catch-ups, keys, credentials, and
/// that an ack is done. `None` for jobs with no answer.
fn read(
    conn: &mut DbConn,
    st: &Prepared,
    job: &Job,
    after_commit: &mut Option<postgres::Error>,
) -> Option<Done> {
    match job {
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
            Some(
                match unless_failed(after_commit, || {
                    fetch_pending(conn, &st.pending, *user_id, after, *page, Some(PAGE_BYTES))
                }) {
                    Some((messages, more)) => Done::Pending {
                        conn: *token,
                        more,
                        messages,
                    },
                    None => Done::LoginFailed { conn: *token },
                },
            )
        }
        // A catch-up that fails is left to the next mesh change or login.
        Job::CatchUp {
            conn: token,
            user_id,
            limit,
        } => unless_failed(after_commit, || {
            fetch_pending(conn, &st.pending, *user_id, 0, *limit, Some(CATCH_UP_BYTES))
        })
        .map(|(messages, _)| Done::CatchUp {
            conn: *token,
            messages,
        }),
        Job::LookupKey {
            conn: token,
            req,
            user,
            ..
        } => Some(
            match unless_failed(after_commit, || conn.query_opt(&st.key, &[user])) {
                Some(row) => Done::Key {
                    conn: *token,
                    req: *req,
                    user: user.clone(),
                    pubkey: row.map(|r| r.get(0)),
                },
                None => store_failed(*token, *req),
            },
        ),
        Job::Resume {
            conn: token,
            from,
            user,
            credential,
        } => Some(
            match unless_failed(after_commit, || {
                conn.query_opt(&st.resume, &[user, &credential::hash(credential)])
            }) {
                Some(row) => Done::Resumed {
                    conn: *token,
                    from: *from,
                    user: user.clone(),
                    user_id: row.map(|r| r.get(0)),
                },
                None => Done::ResumeFailed {
                    conn: *token,
                    from: *from,
                },
            },
        ),
        // Committed with the batch (its deletes are in the batch's statement).
        Job::Ack { conn: token, .. } => Some(Done::Acked { conn: *token }),
        Job::Send { .. }
        | Job::Logout { .. }
        | Job::Group { .. }
        | Job::File { .. }
        | Job::Block { .. } => None,
    }
}
