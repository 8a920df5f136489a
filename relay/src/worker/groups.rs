//! Group membership operations, each in a transaction of its own on a worker.
//!
//! The group row is locked (`FOR UPDATE`) for the length of an operation, so two admins
//! changing one group at once take turns. Every change writes an event row for each
//! member concerned, in the same transaction, so events reach members in order with the
//! messages — and only after they are durable.

use super::blocks::IS_BLOCKED;
use crate::message::Message;
use fastchat_common::db::DbConn;
use fastchat_common::proto::{
    ErrorCode, GroupEvent, GroupMember, GroupSummary, Refusal, RelayToClient,
};
use fastchat_common::time;
use postgres::Transaction;

/// What a member asked for.
#[derive(Debug, Clone)]
pub enum GroupOp {
    Create {
        name: String,
    },
    Add {
        group_id: i64,
        user: String,
    },
    Remove {
        group_id: i64,
        user: String,
    },
    Promote {
        group_id: i64,
        user: String,
    },
    Leave {
        group_id: i64,
    },
    Accept {
        group_id: i64,
    },
    Decline {
        group_id: i64,
    },
    List,
    Members {
        group_id: i64,
    },
    RosterAppend {
        group_id: i64,
        seq: i32,
        prev: String,
        hash: String,
        statement: String,
    },
    Roster {
        group_id: i64,
        from_seq: i32,
    },
}

/// Most invitations of one inviter that may wait for one user (of the
/// `--max-invitations` in all), so that one stranger cannot take every place.
pub const INVITATIONS_PER_INVITER: i64 = 5;

/// Largest roster statement kept.
pub const MAX_STATEMENT_BYTES: usize = 8 * 1024;

/// Most statements read for one `roster` reply, and most bytes of statements in it
/// (the reply must fit a frame): the client asks again from where a reply ended.
const ROSTER_PAGE: i64 = 200;
const ROSTER_PAGE_BYTES: usize = 48 * 1024;

/// `prev` of a chain's first statement.
const NO_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// How an operation ended.
pub enum GroupOutcome {
    /// Committed: the reply, and the event rows written (msg_id, recipient, message).
    Done {
        reply: RelayToClient,
        events: Vec<(i64, i64, Message)>,
    },
    /// Refused; nothing changed.
    Refused(Refusal),
}

fn refused(code: ErrorCode, message: impl Into<String>) -> Result<GroupOutcome, postgres::Error> {
    Ok(GroupOutcome::Refused(Refusal::new(code, message)))
}

/// The limits group operations keep.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most members of a group, invitations waiting included.
    pub group_size: i64,
    /// Most groups a user is in.
    pub groups_per_user: i64,
    /// Most invitations waiting for one user.
    pub invitations: i64,
}

/// Who may do an operation on a group.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Needs {
    /// A member.
    Member,
    /// An admin.
    Admin,
    /// A member, or someone an invitation waits for (the roster, the member list).
    MemberOrInvited,
}

/// An invitation waiting for a user: who made it, the role it carries, and its place
/// in the order of standing.
struct Invite {
    invited_by: i64,
    role: String,
    seq: i64,
}

/// Runs `op` for `actor` in one transaction.
pub fn run(
    conn: &mut DbConn,
    actor_id: i64,
    actor: &str,
    op: GroupOp,
    req: u64,
    limits: Limits,
) -> Result<GroupOutcome, postgres::Error> {
    let mut tx = conn.transaction()?;
    let outcome = Op {
        tx: &mut tx,
        actor_id,
        actor,
        req,
    }
    .run(op, limits)?;
    if let GroupOutcome::Done { .. } = outcome {
        tx.commit()?;
    }
    Ok(outcome)
}

struct Op<'a, 't> {
    tx: &'a mut Transaction<'t>,
    actor_id: i64,
    actor: &'a str,
    req: u64,
}

/// The group as locked for a change: (name, epoch).
type Locked = (String, i32);

impl Op<'_, '_> {
    fn run(&mut self, op: GroupOp, limits: Limits) -> Result<GroupOutcome, postgres::Error> {
        match op {
            GroupOp::Create { name } => self.create(&name, limits.groups_per_user),
            GroupOp::Add { group_id, user } => self.add(group_id, &user, limits),
            GroupOp::Remove { group_id, user } => self.remove(group_id, &user),
            GroupOp::Promote { group_id, user } => self.promote(group_id, &user),
            GroupOp::Leave { group_id } => self.leave(group_id),
            GroupOp::Accept { group_id } => self.accept(group_id, limits),
            GroupOp::Decline { group_id } => self.decline(group_id),
            GroupOp::List => self.list(),
            GroupOp::Members { group_id } => self.members(group_id),
            GroupOp::RosterAppend {
                group_id,
                seq,
                prev,
                hash,
                statement,
            } => self.roster_append(group_id, seq, &prev, &hash, &statement),
            GroupOp::Roster { group_id, from_seq } => self.roster(group_id, from_seq),
        }
    }

    /// Appends a statement if it follows the head (the group row is locked, so two
    /// appends take turns and the second is told `stale_head`). The relay cannot check
    /// the signature's meaning; members' clients verify the whole chain.
    fn roster_append(
        &mut self,
        group_id: i64,
        seq: i32,
        prev: &str,
        hash: &str,
        statement: &str,
    ) -> Result<GroupOutcome, postgres::Error> {
        if let Err(refusal) = self.require(group_id, Needs::MemberOrInvited)? {
            return Ok(refusal);
        }
        let head: Option<(i32, String)> = self
            .tx
            .query_opt(
                "SELECT seq, hash FROM group_roster WHERE group_id = $1 ORDER BY seq DESC LIMIT 1",
                &[&group_id],
            )?
            .map(|r| (r.get(0), r.get(1)));
        let (next, head_hash) = match &head {
            Some((s, h)) => (s + 1, h.as_str()),
            None => (0, NO_PREV),
        };
        if seq != next || prev != head_hash {
            return refused(
                ErrorCode::StaleHead,
                format!("the roster's next statement is number {next}, after {head_hash}"),
            );
        }
        self.tx.execute(
            "INSERT INTO group_roster (group_id, seq, hash, body) VALUES ($1, $2, $3, $4)",
            &[&group_id, &seq, &hash, &statement],
        )?;
        Ok(GroupOutcome::Done {
            reply: RelayToClient::RosterOk {
                id: self.req,
                group_id,
                seq,
            },
            events: Vec::new(),
        })
    }

    /// The chain from `from_seq` on (members, and those invited: they verify it before
    /// accepting, and sign their `leave` on it when they decline).
    fn roster(&mut self, group_id: i64, from_seq: i32) -> Result<GroupOutcome, postgres::Error> {
        if let Err(refusal) = self.require(group_id, Needs::MemberOrInvited)? {
            return Ok(refusal);
        }
        let rows = self.tx.query(
            "SELECT body FROM group_roster WHERE group_id = $1 AND seq >= $2
             ORDER BY seq LIMIT $3",
            &[&group_id, &from_seq, &ROSTER_PAGE],
        )?;
        let mut statements: Vec<String> = Vec::new();
        let mut bytes = 0;
        for row in rows {
            let body: String = row.get(0);
            bytes += body.len() + 3;
            if bytes > ROSTER_PAGE_BYTES && !statements.is_empty() {
                break;
            }
            statements.push(body);
        }
        Ok(GroupOutcome::Done {
            reply: RelayToClient::Roster {
                id: self.req,
                group_id,
                statements,
            },
            events: Vec::new(),
        })
    }

    fn lock(&mut self, group_id: i64) -> Result<Option<Locked>, postgres::Error> {
        Ok(self
            .tx
            .query_opt(
                "SELECT name, epoch FROM groups WHERE id = $1 FOR UPDATE",
                &[&group_id],
            )?
            .map(|r| (r.get(0), r.get(1))))
    }

    fn role_of(&mut self, group_id: i64, user_id: i64) -> Result<Option<String>, postgres::Error> {
        Ok(self
            .tx
            .query_opt(
                "SELECT role FROM group_members WHERE group_id = $1 AND user_id = $2",
                &[&group_id, &user_id],
            )?
            .map(|r| r.get(0)))
    }

    /// The invitation waiting for `user_id` to the group, if any.
    fn invite_of(
        &mut self,
        group_id: i64,
        user_id: i64,
    ) -> Result<Option<Invite>, postgres::Error> {
        Ok(self
            .tx
            .query_opt(
                "SELECT invited_by, role, seq FROM group_invites WHERE group_id = $1 AND user_id = $2",
                &[&group_id, &user_id],
            )?
            .map(|r| Invite {
                invited_by: r.get(0),
                role: r.get(1),
                seq: r.get(2),
            }))
    }

    fn user_id_of(&mut self, name: &str) -> Result<Option<i64>, postgres::Error> {
        Ok(self
            .tx
            .query_opt("SELECT id FROM users WHERE name = $1", &[&name])?
            .map(|r| r.get(0)))
    }

    fn member_ids(&mut self, group_id: i64) -> Result<Vec<i64>, postgres::Error> {
        Ok(self
            .tx
            .query(
                "SELECT user_id FROM group_members WHERE group_id = $1 ORDER BY joined_seq",
                &[&group_id],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    fn summary(&mut self, group_id: i64) -> Result<GroupSummary, postgres::Error> {
        let row = self.tx.query_one(
            "SELECT g.name, g.epoch,
                    (SELECT count(*) FROM group_members WHERE group_id = g.id),
                    COALESCE(
                        (SELECT role FROM group_members WHERE group_id = g.id AND user_id = $2),
                        (SELECT 'invited' FROM group_invites WHERE group_id = g.id AND user_id = $2))
             FROM groups g WHERE g.id = $1",
            &[&group_id, &self.actor_id],
        )?;
        Ok(GroupSummary {
            group_id,
            name: row.get(0),
            epoch: row.get(1),
            members: row.get::<_, i64>(2) as u32,
            role: row
                .get::<_, Option<String>>(3)
                .unwrap_or_else(|| "none".into()),
        })
    }

    /// The actor must be as `needs` says: the locked group, or the refusal. A group
    /// that does not exist looks like one the actor is not in.
    fn require(
        &mut self,
        group_id: i64,
        needs: Needs,
    ) -> Result<Result<Locked, GroupOutcome>, postgres::Error> {
        let not_member = || {
            GroupOutcome::Refused(Refusal::new(
                ErrorCode::NotMember,
                format!("you are not a member of group {group_id}"),
            ))
        };
        let Some(locked) = self.lock(group_id)? else {
            return Ok(Err(not_member()));
        };
        match self.role_of(group_id, self.actor_id)?.as_deref() {
            None if needs == Needs::MemberOrInvited
                && self.invite_of(group_id, self.actor_id)?.is_some() =>
            {
                Ok(Ok(locked))
            }
            None => Ok(Err(not_member())),
            Some("admin") => Ok(Ok(locked)),
            Some(_) if needs == Needs::Admin => Ok(Err(GroupOutcome::Refused(Refusal::new(
                ErrorCode::NotAdmin,
                format!("only admins of {} may do that", locked.0),
            )))),
            Some(_) => Ok(Ok(locked)),
        }
    }

    /// The actor must have an invitation waiting: the locked group and the invitation,
    /// or the refusal. A group that does not exist looks like one with no invitation.
    fn require_invitation(
        &mut self,
        group_id: i64,
    ) -> Result<Result<(Locked, Invite), GroupOutcome>, postgres::Error> {
        let found = match self.lock(group_id)? {
            Some(locked) => self
                .invite_of(group_id, self.actor_id)?
                .map(|invite| (locked, invite)),
            None => None,
        };
        Ok(found.ok_or_else(|| {
            GroupOutcome::Refused(Refusal::new(
                ErrorCode::NotMember,
                format!("you have no invitation to group {group_id}"),
            ))
        }))
    }

    /// Writes `event` for each of `recipients`, from the actor.
    fn emit(
        &mut self,
        group_id: i64,
        name: &str,
        recipients: &[i64],
        event: GroupEvent,
    ) -> Result<Vec<(i64, i64, Message)>, postgres::Error> {
        let now = time::now_ms();
        let body = serde_json::to_string(&event).expect("a GroupEvent serialises to JSON");
        let rows = self.tx.query(
            "INSERT INTO messages (recipient_id, id, sender_id, body, sent_at_ms, group_id, system)
             SELECT r, nextval(pg_get_serial_sequence('messages', 'id')), $2, $3, $4, $5, true
             FROM unnest($1::int8[]) AS r
             RETURNING id, recipient_id",
            &[&recipients, &self.actor_id, &body, &(now as i64), &group_id],
        )?;
        Ok(rows
            .iter()
            .map(|r| {
                let msg_id: i64 = r.get(0);
                (
                    msg_id,
                    r.get(1),
                    Message {
                        msg_id,
                        from: self.actor.to_string(),
                        body: String::new(),
                        ts: now,
                        group_id: Some(group_id),
                        group: Some(name.to_string()),
                        event: Some(event.clone()),
                    },
                )
            })
            .collect())
    }

    fn done(
        &mut self,
        group_id: i64,
        events: Vec<(i64, i64, Message)>,
    ) -> Result<GroupOutcome, postgres::Error> {
        self.done_as(group_id, events, false)
    }

    /// The `group` reply; `invited`: the change was an invitation.
    fn done_as(
        &mut self,
        group_id: i64,
        events: Vec<(i64, i64, Message)>,
        invited: bool,
    ) -> Result<GroupOutcome, postgres::Error> {
        let group = self.summary(group_id)?;
        Ok(GroupOutcome::Done {
            reply: RelayToClient::Group {
                id: self.req,
                group,
                invited,
            },
            events,
        })
    }

    /// How many invitations to the group wait.
    fn invited_count(&mut self, group_id: i64) -> Result<i64, postgres::Error> {
        Ok(self
            .tx
            .query_one(
                "SELECT count(*) FROM group_invites WHERE group_id = $1",
                &[&group_id],
            )?
            .get(0))
    }

    /// Whether the two users are together in some group.
    fn share_a_group(&mut self, a: i64, b: i64) -> Result<bool, postgres::Error> {
        Ok(self
            .tx
            .query_opt(
                "SELECT 1 FROM group_members x JOIN group_members y ON y.group_id = x.group_id
                 WHERE x.user_id = $1 AND y.user_id = $2 LIMIT 1",
                &[&a, &b],
            )?
            .is_some())
    }

    /// How many groups `user_id` is in.
    fn groups_of(&mut self, user_id: i64) -> Result<i64, postgres::Error> {
        Ok(self
            .tx
            .query_one(
                "SELECT count(*) FROM group_members WHERE user_id = $1",
                &[&user_id],
            )?
            .get(0))
    }

    /// The actor may be in one more group (their row locked for the rest of the
    /// operation), or the refusal.
    fn room_for_another_group(
        &mut self,
        max_groups: i64,
    ) -> Result<Option<GroupOutcome>, postgres::Error> {
        self.lock_user(self.actor_id)?;
        let mine = self.groups_of(self.actor_id)?;
        if mine < max_groups {
            return Ok(None);
        }
        Ok(Some(GroupOutcome::Refused(Refusal::new(
            ErrorCode::GroupFull,
            format!("you are in {mine} groups, the most allowed; leave one first"),
        ))))
    }

    fn create(&mut self, name: &str, max_groups: i64) -> Result<GroupOutcome, postgres::Error> {
        if let Some(refusal) = self.room_for_another_group(max_groups)? {
            return Ok(refusal);
        }
        let group_id: i64 = self
            .tx
            .query_one(
                "INSERT INTO groups (name, created_by) VALUES ($1, $2) RETURNING id",
                &[&name, &self.actor_id],
            )?
            .get(0);
        self.tx.execute(
            "INSERT INTO group_members (group_id, user_id, role) VALUES ($1, $2, 'admin')",
            &[&group_id, &self.actor_id],
        )?;
        let event = GroupEvent {
            event: "created".into(),
            user: self.actor.to_string(),
            by: self.actor.to_string(),
            epoch: 1,
        };
        let events = self.emit(group_id, name, &[self.actor_id], event)?;
        self.done(group_id, events)
    }

    fn add(
        &mut self,
        group_id: i64,
        user: &str,
        limits: Limits,
    ) -> Result<GroupOutcome, postgres::Error> {
        let max_size = limits.group_size;
        let (name, epoch) = match self.require(group_id, Needs::Admin)? {
            Ok(locked) => locked,
            Err(refusal) => return Ok(refusal),
        };
        let Some(user_id) = self.user_id_of(user)? else {
            return refused(
                ErrorCode::UnknownUser,
                format!("there is no user called {user}"),
            );
        };
        if self
            .tx
            .query_opt(IS_BLOCKED, &[&user_id, &self.actor_id])?
            .is_some()
        {
            return refused(
                ErrorCode::Blocked,
                format!("{user} does not accept group additions from you"),
            );
        }
        if self.role_of(group_id, user_id)?.is_some() {
            return refused(
                ErrorCode::AlreadyMember,
                format!("{user} is already in {name}"),
            );
        }
        if self.invite_of(group_id, user_id)?.is_some() {
            return refused(
                ErrorCode::AlreadyMember,
                format!("{user} is invited to {name} already"),
            );
        }
        self.lock_user(user_id)?;
        let members = self.member_ids(group_id)?;
        if members.len() as i64 + self.invited_count(group_id)? >= max_size {
            return refused(
                ErrorCode::GroupFull,
                format!("{name} is full ({max_size} members and invitations)"),
            );
        }
        let theirs = self.groups_of(user_id)?;
        if theirs >= limits.groups_per_user {
            return refused(
                ErrorCode::GroupFull,
                format!("{user} is in {theirs} groups, the most allowed"),
            );
        }
        // Someone who shares no group with the admin is asked first (and nothing of
        // the group is stored for them until they accept).
        let invite = !self.share_a_group(self.actor_id, user_id)?;
        if invite {
            let waiting: i64 = self
                .tx
                .query_one(
                    "SELECT count(*) FROM group_invites WHERE user_id = $1",
                    &[&user_id],
                )?
                .get(0);
            if waiting >= limits.invitations {
                return refused(
                    ErrorCode::GroupFull,
                    format!("{user} has {waiting} invitations waiting, the most allowed"),
                );
            }
            // One inviter cannot take every place alone.
            let mine: i64 = self
                .tx
                .query_one(
                    "SELECT count(*) FROM group_invites WHERE user_id = $1 AND invited_by = $2",
                    &[&user_id, &self.actor_id],
                )?
                .get(0);
            if mine >= INVITATIONS_PER_INVITER {
                return refused(
                    ErrorCode::GroupFull,
                    format!(
                        "{mine} of your invitations wait for {user}, the most allowed; \
                         they may answer them first"
                    ),
                );
            }
            self.tx.execute(
                "INSERT INTO group_invites (user_id, group_id, invited_by, seq)
                 VALUES ($1, $2, $3, nextval(pg_get_serial_sequence('group_members', 'joined_seq')))",
                &[&user_id, &group_id, &self.actor_id],
            )?;
        } else {
            self.tx.execute(
                "INSERT INTO group_members (group_id, user_id, role) VALUES ($1, $2, 'member')",
                &[&group_id, &user_id],
            )?;
        }
        let mut recipients = members;
        recipients.push(user_id);
        let event = GroupEvent {
            event: if invite { "invited" } else { "added" }.into(),
            user: user.to_string(),
            by: self.actor.to_string(),
            epoch,
        };
        let events = self.emit(group_id, &name, &recipients, event)?;
        self.done_as(group_id, events, invite)
    }

    /// The actor takes up their invitation: a member from now on, in the place the
    /// invitation had.
    fn accept(&mut self, group_id: i64, limits: Limits) -> Result<GroupOutcome, postgres::Error> {
        let ((name, epoch), invite) = match self.require_invitation(group_id)? {
            Ok(found) => found,
            Err(refusal) => return Ok(refusal),
        };
        if let Some(refusal) = self.room_for_another_group(limits.groups_per_user)? {
            return Ok(refusal);
        }
        self.tx.execute(
            "DELETE FROM group_invites WHERE group_id = $1 AND user_id = $2",
            &[&group_id, &self.actor_id],
        )?;
        self.tx.execute(
            "INSERT INTO group_members (group_id, user_id, role, joined_seq) VALUES ($1, $2, $3, $4)",
            &[&group_id, &self.actor_id, &invite.role, &invite.seq],
        )?;
        let recipients = self.member_ids(group_id)?;
        let by: String = self
            .tx
            .query_opt(
                "SELECT name FROM users WHERE id = $1",
                &[&invite.invited_by],
            )?
            .map_or_else(String::new, |r| r.get(0));
        let event = GroupEvent {
            event: "joined".into(),
            user: self.actor.to_string(),
            by,
            epoch,
        };
        let events = self.emit(group_id, &name, &recipients, event)?;
        self.done(group_id, events)
    }

    /// The actor turns their invitation down. The key epoch moves, as their signed
    /// `leave` says (they were handed the key at invitation), so an admin rotates.
    fn decline(&mut self, group_id: i64) -> Result<GroupOutcome, postgres::Error> {
        let ((name, _), _) = match self.require_invitation(group_id)? {
            Ok(found) => found,
            Err(refusal) => return Ok(refusal),
        };
        let epoch = self.take_out(group_id, self.actor_id)?;
        let members = self.member_ids(group_id)?;
        let mut recipients = members.clone();
        recipients.push(self.actor_id);
        let event = GroupEvent {
            event: "declined".into(),
            user: self.actor.to_string(),
            by: self.actor.to_string(),
            epoch,
        };
        let mut events = self.emit(group_id, &name, &recipients, event)?;
        // The signed `leave` promotes as a member's does.
        events.extend(self.promote_if_headless(group_id, &name, epoch, &members)?);
        self.done(group_id, events)
    }

    /// Takes `user_id` out (a member, or an invitation) and bumps the key epoch;
    /// returns the new epoch.
    fn take_out(&mut self, group_id: i64, user_id: i64) -> Result<i32, postgres::Error> {
        self.tx.execute(
            "DELETE FROM group_members WHERE group_id = $1 AND user_id = $2",
            &[&group_id, &user_id],
        )?;
        self.tx.execute(
            "DELETE FROM group_invites WHERE group_id = $1 AND user_id = $2",
            &[&group_id, &user_id],
        )?;
        Ok(self
            .tx
            .query_one(
                "UPDATE groups SET epoch = epoch + 1 WHERE id = $1 RETURNING epoch",
                &[&group_id],
            )?
            .get(0))
    }

    /// Removes a member, or withdraws an invitation (the invited are on the roster).
    fn remove(&mut self, group_id: i64, user: &str) -> Result<GroupOutcome, postgres::Error> {
        let (name, _) = match self.require(group_id, Needs::Admin)? {
            Ok(locked) => locked,
            Err(refusal) => return Ok(refusal),
        };
        let Some(user_id) = self.user_id_of(user)? else {
            return refused(
                ErrorCode::UnknownUser,
                format!("there is no user called {user}"),
            );
        };
        if user_id == self.actor_id {
            return refused(ErrorCode::BadState, "to leave a group, use leave");
        }
        if self.role_of(group_id, user_id)?.is_none()
            && self.invite_of(group_id, user_id)?.is_none()
        {
            return refused(ErrorCode::NotMember, format!("{user} is not in {name}"));
        }
        let epoch = self.take_out(group_id, user_id)?;
        // The remaining members, and the removed one, who learns of it.
        let mut recipients = self.member_ids(group_id)?;
        recipients.push(user_id);
        let event = GroupEvent {
            event: "removed".into(),
            user: user.to_string(),
            by: self.actor.to_string(),
            epoch,
        };
        let events = self.emit(group_id, &name, &recipients, event)?;
        self.done(group_id, events)
    }

    fn promote(&mut self, group_id: i64, user: &str) -> Result<GroupOutcome, postgres::Error> {
        let (name, epoch) = match self.require(group_id, Needs::Admin)? {
            Ok(locked) => locked,
            Err(refusal) => return Ok(refusal),
        };
        let Some(user_id) = self.user_id_of(user)? else {
            return refused(
                ErrorCode::UnknownUser,
                format!("there is no user called {user}"),
            );
        };
        match self.role_of(group_id, user_id)?.as_deref() {
            None if self.invite_of(group_id, user_id)?.is_some() => {
                return refused(
                    ErrorCode::NotMember,
                    format!("{user} has not accepted the invitation to {name} yet"),
                )
            }
            None => return refused(ErrorCode::NotMember, format!("{user} is not in {name}")),
            Some("admin") => return self.done(group_id, Vec::new()),
            Some(_) => {}
        }
        self.tx.execute(
            "UPDATE group_members SET role = 'admin' WHERE group_id = $1 AND user_id = $2",
            &[&group_id, &user_id],
        )?;
        let recipients = self.member_ids(group_id)?;
        let event = GroupEvent {
            event: "promoted".into(),
            user: user.to_string(),
            by: self.actor.to_string(),
            epoch,
        };
        let events = self.emit(group_id, &name, &recipients, event)?;
        self.done(group_id, events)
    }

    fn leave(&mut self, group_id: i64) -> Result<GroupOutcome, postgres::Error> {
        let (name, _) = match self.require(group_id, Needs::Member)? {
            Ok(locked) => locked,
            Err(refusal) => return Ok(refusal),
        };
        let epoch = self.take_out(group_id, self.actor_id)?;
        let remaining = self.member_ids(group_id)?;
        let mut events = Vec::new();
        if remaining.is_empty() {
            self.tx
                .execute("DELETE FROM groups WHERE id = $1", &[&group_id])?;
            // Invitations to a group that is gone are withdrawn, and their users told.
            let withdrawn = self.tx.query(
                "DELETE FROM group_invites i USING users u
                 WHERE i.group_id = $1 AND u.id = i.user_id RETURNING i.user_id, u.name",
                &[&group_id],
            )?;
            for row in withdrawn {
                let event = GroupEvent {
                    event: "removed".into(),
                    user: row.get(1),
                    by: self.actor.to_string(),
                    epoch,
                };
                events.extend(self.emit(group_id, &name, &[row.get(0)], event)?);
            }
            let group = GroupSummary {
                group_id,
                name,
                role: "none".into(),
                members: 0,
                epoch,
            };
            return Ok(GroupOutcome::Done {
                reply: RelayToClient::Group {
                    id: self.req,
                    group,
                    invited: false,
                },
                events,
            });
        }
        let left = GroupEvent {
            event: "left".into(),
            user: self.actor.to_string(),
            by: self.actor.to_string(),
            epoch,
        };
        events.extend(self.emit(group_id, &name, &remaining, left)?);
        events.extend(self.promote_if_headless(group_id, &name, epoch, &remaining)?);
        self.done(group_id, events)
    }

    /// With no admin left (the last one left, or declined the admin's place an
    /// invitation had come to hold), promotes the longest-standing place, as the
    /// signed roster does: whose `add` came first, which may be an invitation still
    /// waiting (it then makes an admin when accepted). The event goes to `recipients`.
    fn promote_if_headless(
        &mut self,
        group_id: i64,
        name: &str,
        epoch: i32,
        recipients: &[i64],
    ) -> Result<Vec<(i64, i64, Message)>, postgres::Error> {
        let admins: i64 = self
            .tx
            .query_one(
                "SELECT (SELECT count(*) FROM group_members WHERE group_id = $1 AND role = 'admin')
                      + (SELECT count(*) FROM group_invites WHERE group_id = $1 AND role = 'admin')",
                &[&group_id],
            )?
            .get(0);
        if admins > 0 {
            return Ok(Vec::new());
        }
        let Some(row) = self.tx.query_opt(
            "WITH eldest AS (
                 SELECT user_id, invited FROM (
                     SELECT user_id, joined_seq AS seq, false AS invited
                       FROM group_members WHERE group_id = $1
                     UNION ALL
                     SELECT user_id, seq, true FROM group_invites WHERE group_id = $1
                 ) standing ORDER BY seq LIMIT 1),
             m AS (UPDATE group_members SET role = 'admin'
                   WHERE group_id = $1 AND user_id = (SELECT user_id FROM eldest WHERE NOT invited)),
             i AS (UPDATE group_invites SET role = 'admin'
                   WHERE group_id = $1 AND user_id = (SELECT user_id FROM eldest WHERE invited))
             SELECT u.name FROM users u WHERE u.id = (SELECT user_id FROM eldest)",
            &[&group_id],
        )?
        else {
            return Ok(Vec::new());
        };
        let promoted = GroupEvent {
            event: "promoted".into(),
            user: row.get(0),
            by: self.actor.to_string(),
            epoch,
        };
        self.emit(group_id, name, recipients, promoted)
    }

    /// Locks a user's row for the rest of the operation, after the group's (always in
    /// that order): the counts of their groups and invitations then hold against
    /// operations on other groups at the same time.
    fn lock_user(&mut self, user_id: i64) -> Result<(), postgres::Error> {
        self.tx
            .query_opt("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", &[&user_id])?;
        Ok(())
    }

    fn list(&mut self) -> Result<GroupOutcome, postgres::Error> {
        let rows = self.tx.query(
            "SELECT g.id, g.name, mine.role, g.epoch,
                    (SELECT count(*) FROM group_members WHERE group_id = g.id)
             FROM (SELECT group_id, role FROM group_members WHERE user_id = $1
                   UNION ALL
                   SELECT group_id, 'invited' FROM group_invites WHERE user_id = $1) mine
             JOIN groups g ON g.id = mine.group_id
             ORDER BY g.id",
            &[&self.actor_id],
        )?;
        let groups = rows
            .iter()
            .map(|r| GroupSummary {
                group_id: r.get(0),
                name: r.get(1),
                role: r.get(2),
                epoch: r.get(3),
                members: r.get::<_, i64>(4) as u32,
            })
            .collect();
        Ok(GroupOutcome::Done {
            reply: RelayToClient::Groups {
                id: self.req,
                groups,
            },
            events: Vec::new(),
        })
    }

    /// The members, and those invited (role `invited`), in order of standing.
    fn members(&mut self, group_id: i64) -> Result<GroupOutcome, postgres::Error> {
        if let Err(refusal) = self.require(group_id, Needs::MemberOrInvited)? {
            return Ok(refusal);
        }
        let rows = self.tx.query(
            "SELECT u.name, s.role FROM (
                 SELECT user_id, role, joined_seq AS seq FROM group_members WHERE group_id = $1
                 UNION ALL
                 SELECT user_id, 'invited', seq FROM group_invites WHERE group_id = $1
             ) s JOIN users u ON u.id = s.user_id
             ORDER BY s.seq",
            &[&group_id],
        )?;
        let members = rows
            .iter()
            .map(|r| GroupMember {
                user: r.get(0),
                role: r.get(1),
            })
            .collect();
        let group = self.summary(group_id)?;
        Ok(GroupOutcome::Done {
            reply: RelayToClient::Members {
                id: self.req,
                group,
                members,
            },
            events: Vec::new(),
        })
    }
}
