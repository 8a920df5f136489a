//! A session's side of signed rosters: fetching and verifying a group's chain, and
//! appending the statements of the changes this user makes (see the roster module).

use crate::chat::Chat;
use crate::error::ClientError;
use crate::roster::{self, Roster, RosterError, Statement, NO_PREV};
use crate::store::RosterFork;
use fastchat_common::proto::{ClientToRelay, ErrorCode, RelayToClient};

/// Tries to append one statement when other members append at the same time.
const APPEND_TRIES: usize = 5;

impl Chat {
    /// The group's roster as its verified chain says, brought up to date from the
    /// relay; `None` for a group whose chain has no statement yet (made by an older
    /// client) when none was ever seen here. A chain that does not verify — a forged
    /// or altered statement, or one that does not follow what this client verified
    /// before (two histories of one group: the server is misbehaving) — is an error,
    /// and nothing is granted on it.
    pub fn roster(&mut self, group_id: i64) -> Result<Option<Roster>, ClientError> {
        let mut roster = self.store.roster(group_id)?;
        loop {
            // From the last statement verified here (it must come back unchanged), or
            // from the creation.
            let from_seq = roster.as_ref().map_or(0, |r| r.seq);
            let reply = self.request(
                |id| ClientToRelay::RosterGet {
                    id,
                    group_id,
                    from_seq,
                },
                |f, id| matches!(f, RelayToClient::Roster { id: got, .. } if *got == id),
            )?;
            let RelayToClient::Roster { statements, .. } = reply else {
                return Err(ClientError::Protocol(format!("{reply:?}")));
            };
            let mut statements = statements
                .iter()
                .map(|json| Statement::from_json(json))
                .collect::<Result<Vec<_>, _>>()
                .map_err(untrusted(group_id))?;
            if let Some(r) = &roster {
                self.check_head(r, statements.first())?;
                statements.remove(0);
            }
            if statements.is_empty() {
                break;
            }
            for statement in statements {
                if statement.group_id != group_id {
                    return Err(untrusted(group_id)(RosterError::Broken {
                        group_id,
                        seq: statement.seq,
                        why: "it is of another group".into(),
                    }));
                }
                let key = self.pinned_key(&statement.by)?;
                let next = roster::apply(roster.as_ref(), &statement, &key)
                    .map_err(untrusted(group_id))?;
                roster = Some(next);
            }
        }
        if let Some(r) = &roster {
            self.store.put_roster(r)?;
        }
        Ok(roster)
    }

    /// The relay's statement at the place of `r`'s last must be that one. Another one,
    /// signed and naming the same previous statement, proves that the server shows two
    /// histories of the group: kept as evidence and said.
    fn check_head(&mut self, r: &Roster, first: Option<&Statement>) -> Result<(), ClientError> {
        let group_id = r.group_id;
        let broken = |why: String| {
            untrusted(group_id)(RosterError::Broken {
                group_id,
                seq: r.seq,
                why,
            })
        };
        let Some(theirs) = first else {
            return Err(broken("the server no longer shows it".into()));
        };
        if theirs.seq == r.seq && theirs.hash() == r.head {
            return Ok(());
        }
        // A signer whose key cannot be had proves nothing (and must not hold up anything).
        let key = self.pinned_key(&theirs.by).ok();
        if key.is_some_and(|key| roster::forks(r, theirs, &key)) {
            let ours = r.last.clone().expect("forks() needs the last statement");
            self.store.put_roster_fork(&RosterFork {
                group_id,
                seq: r.seq,
                ours: ours.to_json(),
                theirs: theirs.to_json(),
                seen_ms: fastchat_common::time::now_ms(),
            })?;
            return Err(ClientError::Protocol(format!(
                "WARNING: the server shows two histories of group #{group_id}: statement {} \
                 is {} {} by {} here and {} {} by {} there, both signed and following the \
                 same statement. The server is misbehaving; nobody is handed the group's \
                 key. Both are kept as evidence (`fastchat group evidence #{group_id}`).",
                r.seq, ours.op, ours.user, ours.by, theirs.op, theirs.user, theirs.by
            )));
        }
        Err(broken(
            "the server shows another statement in its place than the one verified here".into(),
        ))
    }

    /// Signs `op` of `user` on the chain's head and appends it; when another member
    /// appended first (`stale_head`), fetches the chain and signs again. A group whose
    /// chain is empty gets its `create` first if this user made the group.
    pub(crate) fn roster_append(
        &mut self,
        group_id: i64,
        op: &str,
        user: &str,
    ) -> Result<Roster, ClientError> {
        let me = self.user().to_string();
        for _ in 0..APPEND_TRIES {
            let current = self.roster(group_id)?;
            let (seq, prev) = current
                .as_ref()
                .map_or((0, NO_PREV.to_string()), Roster::next);
            let epoch = Statement::epoch_after(current.as_ref(), op);
            let statement = Statement::new(group_id, seq, &prev, op, user, &me, epoch)
                .signed_by(&self.identity)?;
            // What others would refuse is never appended.
            let next = roster::apply(current.as_ref(), &statement, self.identity.peer_key())
                .map_err(|e| ClientError::Usage(format!("cannot {op} {user}: {e}")))?;
            let result = self.request(
                |id| ClientToRelay::RosterAppend {
                    id,
                    group_id,
                    seq,
                    prev: prev.clone(),
                    hash: statement.hash(),
                    statement: statement.to_json(),
                },
                |f, id| matches!(f, RelayToClient::RosterOk { id: got, .. } if *got == id),
            );
            match result {
                Ok(_) => {
                    self.store.put_roster(&next)?;
                    return Ok(next);
                }
                Err(ClientError::Refused {
                    code: ErrorCode::StaleHead,
                    ..
                }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Refused {
            code: ErrorCode::StaleHead,
            message: format!("group #{group_id}'s roster kept changing; try again"),
            retry_after_ms: Some(1000),
        })
    }
}

/// A chain that does not verify, as the user sees it.
fn untrusted(group_id: i64) -> impl Fn(RosterError) -> ClientError {
    move |e| {
        ClientError::Protocol(format!(
            "WARNING: the server's roster of group #{group_id} does not verify ({e}); \
             it may be misbehaving, so nobody is handed the group's key"
        ))
    }
}
