//! Recovering messages that do not open here, in the spirit of Signal's retry receipts
//! for decryption errors (PROTOCOL.md §7.8).
//!
//! A stored message sealed with a key this client does not hold (lost to a crash, to an
//! old client's race, or not arrived yet) is kept in the inbox, held, and its key asked
//! for with a signed [`crate::e2e::Envelope::KeyRequest`]:
//!
//! - **direct text**: the request goes to the sender and names the held messages by
//!   server `msg_id`. The sender checks the signature against its pinned key of the
//!   requester, then offers the key again (a fresh signed offer) and sends again, with
//!   their original `mid` and time, those of its own messages *to the requester* that
//!   the relay stored under those ids. The requester shows each once (by `mid`).
//! - **group text**: the request names the group and key and goes to the sender if the
//!   relay lists them as a member, else to the group's admins. Whoever holds the key
//!   grants it, pairwise, if the relay lists the requester as a member; the requester
//!   takes a grant from a non-admin only for a key a held message of that group waits
//!   for, and never makes such a key current. The text itself is never re-sent pairwise.
//!
//! Bound ([`RecoveryPolicy`]): a request at once and after each interval but the last;
//! past the last, the user is told which message from whom could not be read and the
//! message leaves the inbox. Never a silent drop. A client never re-sends to anyone
//! whose request did not verify.

use crate::chat::{Chat, Event, SendTarget};
use crate::e2e::{self, KeyRequest, TextPayload};
use crate::error::ClientError;
use crate::store::InboxRow;
use fastchat_common::time;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// What a held message waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// A conversation key of its sender.
    Direct { key_id: String },
    /// A group key.
    Group { group_id: i64, key_id: String },
}

/// How long, and how often, a message's key is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryPolicy {
    /// A request goes at once; the next after `intervals[0]`, and so on; after the
    /// last interval the message is given up.
    pub intervals: Vec<Duration>,
}

impl Default for RecoveryPolicy {
    /// Three requests (at once, after 30 s, after 5 more minutes); given up 30 minutes
    /// after the last: 35.5 minutes in all.
    fn default() -> RecoveryPolicy {
        RecoveryPolicy {
            intervals: vec![
                Duration::from_secs(30),
                Duration::from_secs(300),
                Duration::from_secs(1800),
            ],
        }
    }
}

/// Requests older than this are not answered.
const MAX_REQUEST_AGE_MS: u64 = 7 * 24 * 3600 * 1000;

/// A request for the same key from the same requester is answered at most once in this
/// long (a relay replaying a request cannot make a client re-send over and over).
pub const ANSWER_INTERVAL: Duration = Duration::from_secs(10);

/// Admins asked for a group key when its sender is no longer a member.
const MAX_ADMINS_ASKED: usize = 3;

/// The recovery module's state in a [`Chat`].
#[derive(Default)]
pub(crate) struct RecoveryState {
    policy: RecoveryPolicy,
    /// Key requests answered lately, by (requester, group, key id): a replayed or
    /// repeated request within [`ANSWER_INTERVAL`] is not answered again.
    answered: HashMap<(String, Option<i64>, String), Instant>,
}

impl Chat {
    /// Sets how long, and how often, keys of messages that do not open are asked for.
    pub fn set_recovery_policy(&mut self, policy: RecoveryPolicy) {
        self.recovery.policy = policy;
    }

    /// Held messages still not open after a batch: the first time a request goes out
    /// and the user is told ([`Event::Recovering`]); when one is due it is asked for
    /// again; past the bound it is given up ([`Event::Undecryptable`]).
    pub(crate) fn recover(
        &mut self,
        held: Vec<(InboxRow, Option<Need>)>,
        events: &mut Vec<Event>,
    ) -> Result<(), ClientError> {
        let now = time::now_ms();
        // One request per (sender, need): direct messages are named together.
        let mut due: BTreeMap<(String, Option<i64>, String), Vec<i64>> = BTreeMap::new();
        let mut rows = Vec::new();
        for (row, need) in held {
            let Some(need) = need else { continue };
            if row.held && now < row.next_try_ms {
                continue;
            }
            let m = &row.entry;
            if row.held && row.tries as usize >= self.recovery.policy.intervals.len() {
                let key_id = match &need {
                    Need::Direct { key_id } | Need::Group { key_id, .. } => key_id,
                };
                let why = format!(
                    "could not be read: no key {key_id}, asked for {} times over {} s",
                    row.tries,
                    (now.saturating_sub(row.first_ms)) / 1000
                );
                // Into the history first, so the notice outlives a crash right after.
                self.store.push_history(&crate::store::HistoryEntry {
                    peer: m
                        .group_id
                        .map_or_else(|| m.from.clone(), crate::groups::conversation),
                    group: m.group.clone(),
                    from: m.from.clone(),
                    text: format!("a message from {} (#{}) {why}", m.from, m.msg_id),
                    ts: m.ts,
                    msg_id: Some(m.msg_id),
                    mid: String::new(),
                    outgoing: false,
                    state: crate::store::DeliveryState::Received,
                    file: false,
                })?;
                self.store.inbox_done(m.msg_id)?;
                events.push(Event::Undecryptable {
                    msg_id: m.msg_id,
                    from: m.from.clone(),
                    group_id: m.group_id,
                    why,
                    key_changed: false,
                });
                continue;
            }
            if !row.held {
                events.push(Event::Recovering {
                    msg_id: m.msg_id,
                    from: m.from.clone(),
                    group_id: m.group_id,
                });
            }
            let (group, key_id) = match &need {
                Need::Direct { key_id } => (None, key_id.clone()),
                Need::Group { group_id, key_id } => (Some(*group_id), key_id.clone()),
            };
            let ids = due
                .entry((m.from.clone(), group, key_id.clone()))
                .or_default();
            if group.is_none() && ids.len() < e2e::MAX_REQUESTED_MESSAGES {
                ids.push(m.msg_id);
            }
            rows.push((row, group, key_id));
        }
        // Counted as asked before the requests leave: a lost link asks again next time.
        for (row, group, key_id) in &rows {
            let tries = if row.held { row.tries + 1 } else { 1 };
            let wait = self
                .recovery
                .policy
                .intervals
                .get(tries as usize - 1)
                .copied()
                .unwrap_or_default();
            let next = now + wait.as_millis() as u64;
            self.store
                .hold(row.entry.msg_id, *group, key_id, tries, next)?;
        }
        for ((from, group_id, key_id), msg_ids) in due {
            let request = KeyRequest {
                key_id,
                group_id,
                msg_ids,
                ts: now,
            };
            match self.send_key_request(&from, request) {
                Ok(()) => {}
                Err(e) if crate::chat::connection_lost(&e) => return Err(e),
                // The next try asks again.
                Err(_) => {}
            }
        }
        Ok(())
    }

    /// Asks `peer` to offer key `key_id` again and send again the messages it sent here
    /// under `msg_ids` (direct), or for group `group_id`'s key `key_id`. (Done by itself
    /// for messages that do not open; public for tools and tests.)
    pub fn request_key(
        &mut self,
        peer: &str,
        key_id: &str,
        group_id: Option<i64>,
        msg_ids: &[i64],
    ) -> Result<(), ClientError> {
        let request = KeyRequest {
            key_id: key_id.to_string(),
            group_id,
            msg_ids: msg_ids
                .iter()
                .copied()
                .take(e2e::MAX_REQUESTED_MESSAGES)
                .collect(),
            ts: time::now_ms(),
        };
        self.send_key_request(peer, request)
    }

    /// Signs and sends a key request to the sender (direct), or to the sender or the
    /// group's admins (group).
    fn send_key_request(&mut self, from: &str, request: KeyRequest) -> Result<(), ClientError> {
        let me = self.user().to_string();
        let targets = match request.group_id {
            None => vec![from.to_string()],
            Some(group_id) => {
                let (_, members) = self.group_members(group_id)?;
                if members.iter().any(|m| m.user == from) {
                    vec![from.to_string()]
                } else {
                    members
                        .iter()
                        .filter(|m| m.role == "admin" && m.user != me)
                        .take(MAX_ADMINS_ASKED)
                        .map(|m| m.user.clone())
                        .collect()
                }
            }
        };
        for to in targets {
            if to == me {
                continue;
            }
            let body = e2e::make_key_request(&self.identity, &me, &to, &request)?.to_body();
            self.deliver(&SendTarget::User(to), &[body])?;
        }
        Ok(())
    }

    /// Answers a key request from `m.from`, if its signature verifies against the pinned
    /// key of the requester and it is recent: offers the direct key again and sends
    /// again what the requester is missing, or grants the group key to a member.
    pub(crate) fn answer_key_request(
        &mut self,
        m: &crate::store::InboxEntry,
        request: KeyRequest,
        sig: &str,
    ) -> Result<(), ClientError> {
        let me = self.user().to_string();
        if m.from == me || m.group_id.is_some() || !fastchat_common::proto::valid_user_name(&m.from)
        {
            return Ok(());
        }
        let requester = match self.pinned_key(&m.from) {
            Ok(k) => k,
            Err(ClientError::Refused { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        if e2e::open_key_request(&m.from, &me, &requester, &request, sig).is_err() {
            return Ok(());
        }
        if time::now_ms().saturating_sub(request.ts) > MAX_REQUEST_AGE_MS {
            return Ok(());
        }
        // Each request is answered once: a replay (same requester, same time) is not.
        if !self.store.remember_mid(&format!(
            "key-request/{}/{}/{}",
            m.from, request.key_id, request.ts
        ))? {
            return Ok(());
        }
        let asked = (m.from.clone(), request.group_id, request.key_id.clone());
        let now = std::time::Instant::now();
        self.recovery
            .answered
            .retain(|_, at| now.duration_since(*at) < ANSWER_INTERVAL);
        if self.recovery.answered.contains_key(&asked) {
            return Ok(());
        }
        self.recovery.answered.insert(asked, now);
        match request.group_id {
            None => self.resend_for(&m.from, &requester, &request),
            Some(group_id) => self.grant_requested(group_id, &m.from, &request.key_id),
        }
    }

    /// Offers `key_id` to `peer` again and sends again my texts to `peer` stored under
    /// the requested ids, sealed with that key. Only a key `peer` is known to hold
    /// (offered by them, or our offer of it stored): after a changed key is accepted,
    /// the new identity gets none of the old ones.
    fn resend_for(
        &mut self,
        peer: &str,
        peer_key: &e2e::PeerKey,
        request: &KeyRequest,
    ) -> Result<(), ClientError> {
        if !self
            .store
            .conversation(peer)?
            .shared
            .contains(&request.key_id)
        {
            return Ok(());
        }
        let Some(key) = self.conversation_key(peer, &request.key_id)? else {
            return Ok(());
        };
        let me = self.user().to_string();
        let mut bodies =
            vec![e2e::make_offer(&self.identity, &me, peer, peer_key, &key)?.to_body()];
        for msg_id in &request.msg_ids {
            let Some(entry) = self.store.sent_to(peer, *msg_id)? else {
                continue;
            };
            if entry.file || entry.mid.is_empty() {
                continue;
            }
            let payload = TextPayload {
                group_key: None,
                file: None,
                mid: entry.mid,
                ts: entry.ts,
                text: entry.text,
            };
            // A fresh counter: the re-send is a new payload (its `mid` keeps it shown once).
            let ctx = e2e::Context::direct(&me, peer).stamped(self.store.next_stamp(peer)?);
            bodies.push(e2e::seal_text_in(&key, &payload, &ctx)?.to_body());
        }
        self.deliver(&SendTarget::User(peer.to_string()), &bodies)?;
        Ok(())
    }

    /// Grants group key `key_id` to `member`, if it is the group's current key here and
    /// the relay lists them as a member. Older keys are never handed out this way (a
    /// new member must not read what came before they joined).
    fn grant_requested(
        &mut self,
        group_id: i64,
        member: &str,
        key_id: &str,
    ) -> Result<(), ClientError> {
        let conv = crate::groups::conversation(group_id);
        let Some((key, epoch)) = self.store.current_key(&conv)? else {
            return Ok(());
        };
        if key.id != key_id {
            return Ok(());
        }
        let holders = match self.key_holders(group_id) {
            Ok(holders) => holders,
            Err(ClientError::Refused { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        if !holders.iter().any(|u| u == member) {
            return Ok(());
        }
        self.grant(group_id, member, &key, epoch.unwrap_or(0))
    }
}
