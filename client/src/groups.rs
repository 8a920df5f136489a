//! Groups on the client: membership requests to the relay, the group keys, and the
//! group side of receiving.
//!
//! Group keys are Fernet keys kept under the conversation `#<group id>`, each with the
//! group epoch it was made for. The creating admin makes the first; the admin who adds a
//! member hands them the newest over their pairwise channel (an ordinary end-to-end
//! message whose payload carries the key); when a member leaves or is removed, an admin
//! makes a key for the new epoch and hands it to every remaining member — the removing
//! admin at once, any other admin when it reads the event (so an admin who was offline
//! does it when it comes online). Grants are accepted only from admins of the group.
//! Senders use the newest key they hold; old keys stay, to read history.

use crate::chat::{Chat, Event, GroupNotice, Opened, SendTarget, Sent};
use crate::e2e::{self, ConversationKey, GroupKeyGrant, TextPayload};
use crate::error::ClientError;
use crate::store::{DeliveryState, GroupState, HistoryEntry, InboxEntry, MakeCurrent};
use fastchat_common::proto::{
    ClientToRelay, ErrorCode, GroupEvent, GroupMember, GroupSummary, RelayToClient,
};
use fastchat_common::time;
use std::collections::BTreeMap;

/// What `group_add` did.
#[derive(Debug, Clone)]
pub struct Added {
    /// The group after the change.
    pub group: GroupSummary,
    /// The user shares no group with this one, so the relay invited them: nothing of
    /// the group reaches them until they accept.
    pub invited: bool,
}

/// Longest a group request waits out the relay's send budget in all.
pub const GROUP_BUDGET_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The conversation under which a group's keys (and history) are kept.
pub(crate) fn conversation(group_id: i64) -> String {
    format!("#{group_id}")
}

fn refused(code: ErrorCode, message: String) -> ClientError {
    ClientError::Refused {
        code,
        message,
        retry_after_ms: None,
    }
}

impl Chat {
    /// Sends a group request and waits for its reply, failing over if the relay goes.
    /// A membership change is charged by the members it reaches, so adding many people
    /// in a row can run into the send budget: it waits as the relay says, up to
    /// [`GROUP_BUDGET_WAIT`] in all, rather than fail.
    fn group_request(
        &mut self,
        make: impl Fn(u64) -> ClientToRelay,
    ) -> Result<RelayToClient, ClientError> {
        let started = std::time::Instant::now();
        loop {
            let reply = self.request(&make, |f, id| {
                matches!(f,
                    RelayToClient::Group { id: got, .. }
                    | RelayToClient::Groups { id: got, .. }
                    | RelayToClient::Members { id: got, .. } if *got == id)
            });
            match reply {
                Err(ClientError::Refused {
                    code: ErrorCode::RateLimited,
                    retry_after_ms: Some(ms),
                    ..
                }) if started.elapsed() + std::time::Duration::from_millis(ms)
                    <= GROUP_BUDGET_WAIT =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                }
                other => return other,
            }
        }
    }

    fn expect_group(&mut self, reply: RelayToClient) -> Result<GroupSummary, ClientError> {
        self.expect_change(reply).map(|added| added.group)
    }

    fn expect_change(&mut self, reply: RelayToClient) -> Result<Added, ClientError> {
        match reply {
            RelayToClient::Group { group, invited, .. } => {
                self.remember_group(&group)?;
                Ok(Added { group, invited })
            }
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    fn remember_group(&mut self, g: &GroupSummary) -> Result<(), ClientError> {
        self.store.update_group(g.group_id, |_| GroupState {
            name: g.name.clone(),
            epoch: g.epoch,
            role: g.role.clone(),
            members: Some(g.members),
        })?;
        Ok(())
    }

    /// Creates a group with this user as admin, and its first key.
    pub fn group_create(&mut self, name: &str) -> Result<GroupSummary, ClientError> {
        let reply = self.group_request(|id| ClientToRelay::GroupCreate {
            id,
            name: name.to_string(),
        })?;
        let group = self.expect_group(reply)?;
        // The chain starts with this user's signed `create` (7.9).
        let me = self.user().to_string();
        self.roster_append(group.group_id, "create", &me)?;
        self.new_group_key(group.group_id, group.epoch)?;
        Ok(group)
    }

    /// This user's groups.
    pub fn groups(&mut self) -> Result<Vec<GroupSummary>, ClientError> {
        match self.group_request(|id| ClientToRelay::GroupList { id })? {
            RelayToClient::Groups { groups, .. } => {
                for g in &groups {
                    self.remember_group(g)?;
                }
                Ok(groups)
            }
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Finds one of this user's groups by name, or by `#ID`. Unknown and ambiguous
    /// names are errors that say what to do.
    pub fn resolve_group(&mut self, name: &str) -> Result<GroupSummary, ClientError> {
        let groups = self.groups()?;
        if let Some(id) = name.strip_prefix('#').and_then(|n| n.parse::<i64>().ok()) {
            return groups
                .into_iter()
                .find(|g| g.group_id == id)
                .ok_or_else(|| {
                    refused(ErrorCode::NotMember, format!("you are in no group #{id}"))
                });
        }
        let mut matching: Vec<GroupSummary> =
            groups.into_iter().filter(|g| g.name == name).collect();
        match matching.len() {
            0 => Err(refused(
                ErrorCode::NotMember,
                format!("you are in no group called {name:?} (see `fastchat group list`)"),
            )),
            1 => Ok(matching.remove(0)),
            _ => {
                let ids: Vec<String> = matching
                    .iter()
                    .map(|g| format!("#{}", g.group_id))
                    .collect();
                Err(ClientError::Usage(format!(
                    "you are in several groups called {name:?}; name one by id: {}",
                    ids.join(", ")
                )))
            }
        }
    }

    /// A group's members and their roles.
    pub fn group_members(
        &mut self,
        group_id: i64,
    ) -> Result<(GroupSummary, Vec<GroupMember>), ClientError> {
        match self.group_request(|id| ClientToRelay::GroupMembers { id, group_id })? {
            RelayToClient::Members { group, members, .. } => {
                self.remember_group(&group)?;
                Ok((group, members))
            }
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Adds `user` (admins only) and hands them the newest group key. Someone who
    /// shares no group with this user is invited rather than added (`invited`): they
    /// are on the signed roster and hold the key from now on (this admin chose them),
    /// but the relay stores nothing of the group for them until they accept.
    pub fn group_add(&mut self, group_id: i64, user: &str) -> Result<Added, ClientError> {
        let reply = self.group_request(|id| ClientToRelay::GroupAdd {
            id,
            group_id,
            user: user.to_string(),
        })?;
        let added = self.expect_change(reply)?;
        // Signed into the roster before the key is handed over: members grant only to
        // those the chain shows.
        let roster = self.roster_append(group_id, "add", user)?;
        match self.newest_group_key(group_id)? {
            Some((key, epoch)) => self.grant(group_id, user, &key, epoch)?,
            // An admin without a key: make one for the chain's epoch (everyone gets it).
            None => self.rotate(group_id, roster.epoch)?,
        }
        Ok(added)
    }

    /// Accepts an invitation: after checking the group's signed roster (it must
    /// verify, and show this user added by an admin), becomes a member; the group's
    /// messages reach this user from now on.
    pub fn group_accept(&mut self, group_id: i64) -> Result<GroupSummary, ClientError> {
        let me = self.user().to_string();
        if let Some(roster) = self.roster(group_id)? {
            if !roster.is_member(&me) {
                return Err(ClientError::Protocol(format!(
                    "the signed roster of group #{group_id} does not show you invited: \
                     not accepted (the server may be misbehaving)"
                )));
            }
        }
        let reply = self.group_request(|id| ClientToRelay::GroupAccept { id, group_id })?;
        self.expect_group(reply)
    }

    /// Declines an invitation. The signed `leave` goes first (the invitation put this
    /// user on the roster), so the admins rotate the key this user was handed.
    pub fn group_decline(&mut self, group_id: i64) -> Result<GroupSummary, ClientError> {
        self.sign_leave(group_id)?;
        let reply = self.group_request(|id| ClientToRelay::GroupDecline { id, group_id })?;
        self.expect_group(reply)
    }

    /// The invitations waiting for this user's answer.
    pub fn invitations(&mut self) -> Result<Vec<GroupSummary>, ClientError> {
        Ok(self
            .groups()?
            .into_iter()
            .filter(|g| g.role == "invited")
            .collect())
    }

    /// Appends this user's signed `leave` to the group's roster; a group without a
    /// chain (an older client's) is left all the same.
    fn sign_leave(&mut self, group_id: i64) -> Result<(), ClientError> {
        let me = self.user().to_string();
        match self.roster_append(group_id, "leave", &me) {
            Ok(_) | Err(ClientError::Usage(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes `user` (admins only) and rotates the key so they cannot read what follows.
    /// The relay's refusals (not an admin, not a member) come first, as for every
    /// change; the remover itself rotates, so other admins need not see the signed
    /// `remove` before the relay's `removed` event.
    pub fn group_remove(&mut self, group_id: i64, user: &str) -> Result<GroupSummary, ClientError> {
        let reply = self.group_request(|id| ClientToRelay::GroupRemove {
            id,
            group_id,
            user: user.to_string(),
        })?;
        let group = self.expect_group(reply)?;
        // The chain's epoch is the one keys are made for (the relay's is only a hint).
        let roster = self.roster_append(group_id, "remove", user)?;
        self.rotate(group_id, roster.epoch)?;
        Ok(group)
    }

    /// Makes `user` an admin (admins only).
    pub fn group_promote(
        &mut self,
        group_id: i64,
        user: &str,
    ) -> Result<GroupSummary, ClientError> {
        let reply = self.group_request(|id| ClientToRelay::GroupPromote {
            id,
            group_id,
            user: user.to_string(),
        })?;
        let group = self.expect_group(reply)?;
        self.roster_append(group_id, "promote", user)?;
        Ok(group)
    }

    /// Leaves the group. Its keys stay, to read the history. The signed `leave` goes
    /// first (only members may append to the chain).
    pub fn group_leave(&mut self, group_id: i64) -> Result<GroupSummary, ClientError> {
        self.sign_leave(group_id)?;
        let reply = self.group_request(|id| ClientToRelay::GroupLeave { id, group_id })?;
        self.expect_group(reply)
    }

    /// Who may be handed the group key: the members of the verified roster, and nobody
    /// for a group whose chain the relay does not show (hiding the chain must not hand
    /// the say back to the relay's list).
    pub(crate) fn key_holders(&mut self, group_id: i64) -> Result<Vec<String>, ClientError> {
        Ok(self
            .roster(group_id)?
            .map(|r| r.members.into_iter().map(|(u, _)| u).collect())
            .unwrap_or_default())
    }

    /// Encrypts `text` with the newest group key and sends it to every other member;
    /// returns once the relay has stored it for all of them.
    pub fn send_group(&mut self, group_id: i64, text: &str) -> Result<Sent, ClientError> {
        crate::chat::check_text(text)?;
        self.send_group_payload(group_id, text, None)
    }

    /// Sends a group payload: a text or a file announcement.
    pub(crate) fn send_group_payload(
        &mut self,
        group_id: i64,
        text: &str,
        file: Option<e2e::FileOffer>,
    ) -> Result<Sent, ClientError> {
        let payload = TextPayload {
            group_key: None,
            file,
            mid: e2e::new_message_id(),
            ts: time::now_ms(),
            text: text.to_string(),
        };
        self.send_sealed_group(group_id, payload, true)
    }

    /// Seals `payload` with the newest group key and sends it; `record` puts it into
    /// the history first (pending).
    pub(crate) fn send_sealed_group(
        &mut self,
        group_id: i64,
        payload: TextPayload,
        record: bool,
    ) -> Result<Sent, ClientError> {
        let state = self.store.group(group_id)?;
        // An admin whose newest key predates the group's epoch rotates first (the
        // chain's epoch and roles as last verified here; the relay's say nothing).
        if let Some(roster) = self.store.roster(group_id)? {
            let newest = self.newest_group_key(group_id)?.map_or(0, |(_, e)| e);
            if roster.is_admin(self.user()) && newest < roster.epoch {
                self.rotate(group_id, roster.epoch)?;
            }
        }
        let Some((key, epoch)) = self.newest_group_key(group_id)? else {
            return Err(refused(
                ErrorCode::NotMember,
                format!(
                    "no key for group #{group_id} yet: an admin hands it over when they are online"
                ),
            ));
        };
        let stamp = self.store.next_stamp(&conversation(group_id))?;
        let ctx = e2e::Context::group(self.user(), group_id, epoch).stamped(stamp);
        let body = e2e::seal_group_text_in(&key, &payload, &ctx)?.to_body();
        if record {
            let name = state.map(|s| s.name);
            self.record_outgoing(&conversation(group_id), name, &payload)?;
        }
        let sent = self.deliver(&SendTarget::Group(group_id), &[body])?;
        self.record_stored(&payload.mid, &sent)?;
        Ok(sent)
    }

    /// The epoch of the newest key held for the group, if any.
    pub fn group_key_epoch(&self, group_id: i64) -> Option<i32> {
        self.newest_group_key(group_id)
            .ok()
            .flatten()
            .map(|(_, epoch)| epoch)
    }

    /// The newest key held for the group, and its epoch.
    fn newest_group_key(
        &self,
        group_id: i64,
    ) -> Result<Option<(ConversationKey, i32)>, ClientError> {
        Ok(self
            .store
            .current_key(&conversation(group_id))?
            .map(|(key, epoch)| (key, epoch.unwrap_or(0))))
    }

    /// Keeps a group key; it becomes the one to send with as `current` says.
    fn keep_group_key(
        &mut self,
        group_id: i64,
        key: &ConversationKey,
        epoch: i32,
        current: MakeCurrent,
    ) -> Result<(), ClientError> {
        self.store
            .add_key(&conversation(group_id), key, Some(epoch), false, current)?;
        Ok(())
    }

    /// Makes a key for `epoch` and keeps it (committed before it is handed out).
    fn new_group_key(&mut self, group_id: i64, epoch: i32) -> Result<ConversationKey, ClientError> {
        let key = ConversationKey::generate();
        self.keep_group_key(group_id, &key, epoch, MakeCurrent::IfNewestEpoch)?;
        Ok(key)
    }

    /// Hands a group key to `user` over the pairwise channel.
    pub(crate) fn grant(
        &mut self,
        group_id: i64,
        user: &str,
        key: &ConversationKey,
        epoch: i32,
    ) -> Result<(), ClientError> {
        let grant = GroupKeyGrant {
            group_id,
            key_id: key.id.clone(),
            epoch,
            key: key.key.clone(),
        };
        self.send_pairwise(user, "", Some(grant))?;
        Ok(())
    }

    /// Makes a key for `epoch` and hands it to every other current member.
    pub fn rotate(&mut self, group_id: i64, epoch: i32) -> Result<(), ClientError> {
        // Only those the signed roster shows: a member the relay adds on its own (a
        // ghost) gets nothing.
        let holders = self.key_holders(group_id)?;
        let key = self.new_group_key(group_id, epoch)?;
        let me = self.user().to_string();
        for user in holders.iter().filter(|u| **u != me) {
            self.grant(group_id, user, &key, epoch)?;
        }
        Ok(())
    }

    /// A group key from `from`: kept if `from` is an admin of the group right now.
    pub(crate) fn accept_grant(
        &mut self,
        from: &str,
        grant: GroupKeyGrant,
    ) -> Result<Option<Event>, ClientError> {
        let group_id = grant.group_id;
        let notice = |why: String| {
            Ok(Some(Event::Undecryptable {
                msg_id: 0,
                from: from.to_string(),
                group_id: Some(group_id),
                why,
                key_changed: false,
            }))
        };
        // Who is an admin, and who a member: the verified roster, never the relay's list.
        // A chain that does not verify, or none at all, takes no grant, and is said
        // (never an error that would hold up the inbox).
        let roster = match self.roster(group_id) {
            Ok(Some(r)) => r,
            Ok(None) => {
                return notice(format!(
                    "WARNING: the server shows no signed roster of group #{group_id}, so a \
                     key from {from} cannot be checked and is not taken"
                ))
            }
            // Not (or no longer) a member: who granted it cannot be checked, so the key
            // is not taken, and what was sent while this user was a member stays
            // unreadable. Said, not silent.
            Err(ClientError::Refused { .. }) => {
                return notice(format!(
                    "a key for group #{group_id} came after you left it and cannot be checked: \
                     messages sent to you while you were a member cannot be read"
                ))
            }
            Err(ClientError::Protocol(why)) => return notice(why),
            Err(e) => return Err(e),
        };
        let (from_admin, from_member, epoch) =
            (roster.is_admin(from), roster.is_member(from), roster.epoch);
        // A key for an epoch the group has not reached (by its chain, else the relay's
        // word) would win over every later rotation: removing someone would then revoke
        // nothing. Refused.
        if grant.epoch > epoch || grant.epoch < 0 {
            return Ok(None);
        }
        let key = ConversationKey {
            id: grant.key_id,
            key: grant.key,
        };
        // A member may hand over a key that a held message of the group waits for (a
        // recovery this client asked for) if it opens that message: kept to read, never
        // to send with.
        let asked = !from_admin
            && from_member
            && self.store.waits_for_group_key(grant.group_id, &key.id)?
            && self.opens_a_held_text(grant.group_id, &key)?;
        if !from_admin && !asked {
            return Ok(None);
        }
        // A malformed key would only fail later; check it now.
        if e2e::seal_text(
            &key,
            &TextPayload {
                group_key: None,
                file: None,
                mid: e2e::new_message_id(),
                ts: 0,
                text: String::new(),
            },
        )
        .is_err()
        {
            return Ok(None);
        }
        let current = if from_admin {
            MakeCurrent::IfNewestEpoch
        } else {
            MakeCurrent::Never
        };
        self.keep_group_key(grant.group_id, &key, grant.epoch, current)?;
        Ok(None)
    }

    /// Whether `key` opens a held text of group `group_id` sealed with it.
    fn opens_a_held_text(&self, group_id: i64, key: &ConversationKey) -> Result<bool, ClientError> {
        Ok(self.store.inbox()?.iter().filter(|r| r.held).any(|r| {
            matches!(
                e2e::Envelope::from_body(&r.entry.body),
                Ok(e2e::Envelope::GroupText { group_id: g, key_id, token, epoch, .. })
                    if g == group_id && key_id == key.id
                        && e2e::open_text_in(key, &token, &e2e::Context::group(&r.entry.from, g, epoch)).is_ok()
            )
        }))
    }

    /// A membership event: shown, and remembered.
    pub(crate) fn group_event(
        &mut self,
        m: &InboxEntry,
        group_id: i64,
        event: GroupEvent,
    ) -> Result<Opened, ClientError> {
        let kept = self.store.group(group_id)?;
        let name = m
            .group
            .clone()
            .or_else(|| kept.as_ref().map(|g| g.name.clone()))
            .unwrap_or_else(|| format!("#{group_id}"));
        // Shown and counted once, however often it arrives (by its server id: the relay
        // writes events).
        let new = self.store.record_once(
            &HistoryEntry {
                peer: conversation(group_id),
                group: Some(name.clone()),
                from: m.from.clone(),
                text: describe(&event, &name),
                ts: m.ts,
                msg_id: Some(m.msg_id),
                mid: String::new(),
                outgoing: false,
                state: DeliveryState::Received,
                file: false,
            },
            &format!("event/{group_id}/{}", m.msg_id),
        )?;
        if !new {
            return Ok(Opened::Nothing);
        }
        let me = self.user().to_string();
        self.store.update_group(group_id, |state| {
            // A group first heard of: its events come to members, and to the invited.
            let invited = event.event == "invited" && event.user == me;
            let mut state = state.unwrap_or_else(|| GroupState {
                name: name.clone(),
                epoch: event.epoch,
                role: if invited { "invited" } else { "member" }.into(),
                members: None,
            });
            state.epoch = state.epoch.max(event.epoch);
            // Keep the member count (known from a summary) in step with the events.
            state.members = state.members.map(|n| match event.event.as_str() {
                "added" | "joined" => n.saturating_add(1),
                "removed" | "left" => n.saturating_sub(1),
                _ => n,
            });
            if event.user == me {
                match event.event.as_str() {
                    "removed" | "left" | "declined" => state.role = "none".into(),
                    "promoted" | "created" => state.role = "admin".into(),
                    "added" => state.role = "member".into(),
                    // An invitation read late, once taken up, changes nothing.
                    "invited" if !matches!(state.role.as_str(), "member" | "admin") => {
                        state.role = "invited".into()
                    }
                    // An invitation may have become an admin's place meanwhile.
                    "joined" if state.role != "admin" => state.role = "member".into(),
                    _ => {}
                }
            }
            state
        })?;
        let waiting = event.event == "invited"
            && event.user == me
            && self
                .store
                .group(group_id)?
                .is_some_and(|g| g.role == "invited");
        Ok(Opened::Shown(Event::Group(GroupNotice {
            msg_id: m.msg_id,
            group_id,
            group: name,
            event,
            ts: m.ts,
            waiting,
        })))
    }

    /// Opens a group text, or holds it until its key arrives.
    pub(crate) fn open_group_text(
        &mut self,
        m: InboxEntry,
        held: bool,
        group_id: i64,
        epoch: i32,
        key_id: &str,
        token: &str,
    ) -> Result<Opened, ClientError> {
        let Some(key) = self.conversation_key(&conversation(group_id), key_id)? else {
            return Ok(Opened::Held(Some(crate::recovery::Need::Group {
                group_id,
                key_id: key_id.to_string(),
            })));
        };
        let ctx = e2e::Context::group(&m.from, group_id, epoch);
        let undecryptable = |why: String| {
            Ok(Opened::Shown(Event::Undecryptable {
                msg_id: m.msg_id,
                from: m.from.clone(),
                group_id: Some(group_id),
                why,
                key_changed: false,
            }))
        };
        let (payload, stamp) = match e2e::open_text_in(&key, token, &ctx) {
            Ok(p) => p,
            Err(e) => return undecryptable(e.to_string()),
        };
        let (from, conv) = (m.from.clone(), conversation(group_id));
        if let Some(instead) = self.not_fresh(&m, &conv, &stamp, held)? {
            return Ok(instead);
        }
        let opened = self.show_group_text(m, group_id, payload)?;
        // Marked once acted on: a crash in between opens it again (idempotent).
        self.store.replay_mark(&from, &conv, &stamp)?;
        Ok(opened)
    }

    /// Acts on an opened group text: a file announcement, or a text to show.
    fn show_group_text(
        &mut self,
        m: InboxEntry,
        group_id: i64,
        payload: TextPayload,
    ) -> Result<Opened, ClientError> {
        // Opened: owed a receipt, a duplicate too (receipts are idempotent).
        self.owe_receipt(&m.from, Some(group_id), &payload.mid);
        let name = match m.group.clone() {
            Some(name) => Some(name),
            None => self.store.group(group_id)?.map(|g| g.name),
        };
        if let Some(offer) = payload.file {
            let seen = format!("{}/{}", m.from, payload.mid);
            if self.store.seen_mid(&seen)? {
                return Ok(Opened::Nothing);
            }
            let opened = self.receive_file(&m, name, &payload.mid, offer)?;
            self.store.remember_mid(&seen)?;
            return Ok(opened);
        }
        self.show_received(m, conversation(group_id), Some(group_id), name, payload)
    }

    /// After a batch: invitations from people this user is no stranger to are
    /// accepted; and for each group where someone left, declined or was removed and
    /// our newest key is older than the new epoch, an admin (checked with the server)
    /// rotates.
    pub(crate) fn after_events(&mut self, events: &mut [Event]) -> Result<(), ClientError> {
        let me = self.user().to_string();
        let mut due: BTreeMap<i64, i32> = BTreeMap::new();
        for e in events.iter() {
            if let Event::Group(n) = e {
                if matches!(n.event.event.as_str(), "removed" | "left" | "declined")
                    && n.event.user != me
                {
                    let epoch = due.entry(n.group_id).or_insert(n.event.epoch);
                    *epoch = (*epoch).max(n.event.epoch);
                }
            }
        }
        for (group_id, epoch) in due {
            let newest = self.newest_group_key(group_id)?.map_or(0, |(_, e)| e);
            if newest >= epoch {
                continue;
            }
            // The chain decides (a removal the relay announces without its signed
            // statement moves no epoch); the relay's word only for a group without one.
            let target = match self.roster(group_id) {
                Ok(Some(r)) => {
                    (r.is_admin(&me) && r.epoch >= epoch && newest < r.epoch).then_some(r.epoch)
                }
                // No chain shown: nothing to rotate for, whatever the relay says.
                Ok(None) => None,
                Err(ClientError::Protocol(_)) | Err(ClientError::Refused { .. }) => continue,
                Err(e) => return Err(e),
            };
            if let Some(target) = target {
                match self.rotate(group_id, target) {
                    // A roster that does not verify: nobody is handed a key (the
                    // warning shows on the user's next group operation).
                    Ok(()) | Err(ClientError::Protocol(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        // Then the invitations from people this user knows (after the rotations, so
        // that a failure here holds none of them up).
        for e in events.iter_mut() {
            if let Event::Group(n) = e {
                if n.waiting && self.accepts_on_arrival(n.group_id, &n.event.by)? {
                    match self.group_accept(n.group_id) {
                        Ok(_) => n.waiting = false,
                        // Answered already, withdrawn, or a roster that does not
                        // verify: the invitation stays for the user.
                        Err(ClientError::Refused { .. }) | Err(ClientError::Protocol(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether an invitation to `group_id` that the relay says `by` made is taken up
    /// without asking: it still waits, `by` is no stranger to this user, and the
    /// group's chain verifies and shows `by` an admin and this user on it (the relay's
    /// word for who invited is not enough).
    fn accepts_on_arrival(&mut self, group_id: i64, by: &str) -> Result<bool, ClientError> {
        if self
            .store
            .group(group_id)?
            .is_none_or(|g| g.role != "invited")
            || self.is_stranger(by)?
        {
            return Ok(false);
        }
        let me = self.user().to_string();
        Ok(match self.roster(group_id) {
            Ok(Some(r)) => r.is_admin(by) && r.is_member(&me),
            Ok(None) | Err(ClientError::Refused { .. }) | Err(ClientError::Protocol(_)) => false,
            Err(e) => return Err(e),
        })
    }
}

/// A membership event in words.
pub fn describe(event: &GroupEvent, group: &str) -> String {
    match event.event.as_str() {
        "created" => format!("{} created {group}", event.by),
        "added" => format!("{} added {} to {group}", event.by, event.user),
        "invited" => format!("{} invited {} to {group}", event.by, event.user),
        "joined" => format!("{} joined {group}", event.user),
        "declined" => format!("{} declined the invitation to {group}", event.user),
        "removed" => format!("{} removed {} from {group}", event.by, event.user),
        "promoted" if event.by == event.user => {
            format!("{} is now an admin of {group}", event.user)
        }
        "promoted" => format!("{} made {} an admin of {group}", event.by, event.user),
        "left" => format!("{} left {group}", event.user),
        other => format!("{group}: {other} {}", event.user),
    }
}
