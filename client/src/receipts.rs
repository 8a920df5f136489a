//! Delivery receipts: after a receive batch is stored, acknowledged and opened, the
//! client tells each sender, end to end encrypted, which of their messages it now holds;
//! a sender that gets a receipt marks those history entries
//! [`DeliveryState::Delivered`]. Receipts are ordinary `send` frames to the server,
//! sealed as an [`crate::e2e::Envelope::Receipt`] (PROTOCOL.md §7.7).
//!
//! - Messages are named only by the sender's message id (`mid`), the random 128-bit id
//!   inside the authenticated ciphertext — never by the server's `msg_id`, which the
//!   (untrusted) relay chooses and could point at a message it dropped. So receipts
//!   are written after the batch is opened, for the texts that opened (duplicates
//!   included: a receipt is idempotent, and a resent message needs one too). Grants of
//!   group keys, offers, receipts and messages that did not open get none.
//! - A receipt is only RSA-free Fernet work, and the RSA decryption of an offer runs only
//!   after the offer's RSA-PSS signature verified against the pinned key, so a server
//!   cannot use receipts (or their timing) as an oracle for RSA ciphertexts of its own.
//! - The sender marks delivered only its own outgoing entries named in the receipt:
//!   direct entries whose peer is the receipt's sender, and group entries (a group's
//!   member list is not always known here, and a mid is unguessable: only members saw
//!   it). Group texts get receipts only in groups of at most [`MAX_GROUP_FOR_RECEIPTS`]
//!   members, so a big group does not multiply its traffic.
//! - Receipts are best effort: one per peer per batch (split past [`MAX_MIDS`]), sealed
//!   with a conversation key both sides hold, not resent after a failover, their
//!   replies (`sent` or `error`) dropped. A receipt that cannot be sent (no shared key
//!   yet) is skipped: the message simply stays "stored".

use crate::chat::{Chat, Event, Opened};
use crate::e2e::{self, ConversationKey, ReceiptPayload};
use crate::error::ClientError;
use crate::store::InboxEntry;
use fastchat_common::proto::ClientToRelay;
use fastchat_common::time;
use std::collections::{BTreeMap, HashSet};

/// Most message ids in one receipt, so a receipt stays far below the body limit. A
/// receipt naming more is refused whole (it costs the receiver a history scan).
pub const MAX_MIDS: usize = 256;

/// Group texts get receipts only in groups of at most this many members (everyone would
/// otherwise send the sender a pairwise receipt for every message).
pub const MAX_GROUP_FOR_RECEIPTS: u32 = 32;

/// The receipts module's state in a [`Chat`].
#[derive(Default)]
pub(crate) struct ReceiptState {
    /// Request ids of receipts sent and not yet answered: their replies (or refusals)
    /// are dropped, a receipt is only a hint.
    sent: HashSet<u64>,
    /// Texts opened that still owe a receipt: (sender, group, their mid).
    due: Vec<(String, Option<i64>, String)>,
}

impl ReceiptState {
    /// Whether `id` was a receipt's request (then its reply is dropped, and forgotten).
    pub(crate) fn answered(&mut self, id: u64) -> bool {
        self.sent.remove(&id)
    }

    /// Request ids start again on a new link: the old link's unanswered receipts must
    /// not swallow new replies.
    pub(crate) fn link_changed(&mut self) {
        self.sent.clear();
    }
}

impl Chat {
    /// Notes an opened text that owes its sender a receipt (`group`: the group it was
    /// sent to, if any).
    pub(crate) fn owe_receipt(&mut self, from: &str, group: Option<i64>, mid: &str) {
        self.receipts
            .due
            .push((from.to_string(), group, mid.to_string()));
    }

    /// Whether texts of `group_id` get receipts: it is small enough. The member count
    /// is asked once when not known (then kept, and counted along with events).
    fn receipts_in_group(&mut self, group_id: i64) -> bool {
        let known = self
            .store
            .group(group_id)
            .ok()
            .flatten()
            .and_then(|g| g.members);
        let members = match known {
            Some(n) => Some(n),
            None => self.group_members(group_id).ok().map(|(g, _)| g.members),
        };
        members.is_some_and(|n| n <= MAX_GROUP_FOR_RECEIPTS)
    }

    /// Sends the receipts the texts opened so far owe. Replies are not waited for;
    /// `receive` drops them.
    pub(crate) fn send_receipts(&mut self) -> Result<(), ClientError> {
        let due = std::mem::take(&mut self.receipts.due);
        if due.is_empty() {
            return Ok(());
        }
        let me = self.user().to_string();
        let mut groups: BTreeMap<i64, bool> = BTreeMap::new();
        let mut by_peer: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (peer, group, mid) in due {
            if peer == me {
                continue;
            }
            if let Some(g) = group {
                let wanted = match groups.get(&g) {
                    Some(w) => *w,
                    None => {
                        let w = self.receipts_in_group(g);
                        groups.insert(g, w);
                        w
                    }
                };
                if !wanted {
                    continue;
                }
            }
            let mids = by_peer.entry(peer).or_default();
            if !mids.contains(&mid) {
                mids.push(mid);
            }
        }
        let mut queued = false;
        for (peer, mids) in by_peer {
            let Some(key) = self.receipt_key(&peer)? else {
                continue;
            };
            for chunk in mids.chunks(MAX_MIDS) {
                let payload = ReceiptPayload {
                    mid: e2e::new_message_id(),
                    ts: time::now_ms(),
                    mids: chunk.to_vec(),
                };
                let ctx = e2e::Context::direct(&me, &peer).stamped(self.store.next_stamp(&peer)?);
                let body = e2e::seal_receipt_in(&key, &payload, &ctx)?.to_body();
                let id = self.relay.next_id();
                self.relay.queue(&ClientToRelay::Send {
                    id,
                    to: Some(peer.clone()),
                    group_id: None,
                    body,
                });
                self.receipts.sent.insert(id);
                queued = true;
            }
        }
        if queued {
            self.relay.flush()?;
        }
        Ok(())
    }

    /// A conversation key `peer` is known to hold: the current one if shared, else the
    /// shared one with the greatest id (ids are random, so that is an arbitrary one of
    /// them; any works, the peer holds them all). "Shared" means the peer offered it or
    /// the relay stored our offer of it; accepting a changed key for the peer forgets
    /// them all (its new identity holds none), so no receipt goes until a key is
    /// shared again.
    fn receipt_key(&self, peer: &str) -> Result<Option<ConversationKey>, ClientError> {
        let conv = self.store.conversation(peer)?;
        let Some(id) = conv
            .current
            .as_ref()
            .filter(|id| conv.shared.contains(*id))
            .or_else(|| {
                conv.shared
                    .iter()
                    .rev()
                    .find(|id| conv.keys.contains_key(*id))
            })
        else {
            return Ok(None);
        };
        self.conversation_key(peer, id)
    }

    /// A receipt from `m.from`: the messages it names move to delivered. A receipt that
    /// does not open, or names more than [`MAX_MIDS`] messages, is dropped quietly (it
    /// would only ever be a hint). Receipts are idempotent, so they do not take places
    /// in the duplicate-detection window of real messages.
    pub(crate) fn open_receipt(
        &mut self,
        m: &InboxEntry,
        key_id: &str,
        token: &str,
    ) -> Result<Opened, ClientError> {
        let key = self.conversation_key(&m.from, key_id)?;
        let ctx = e2e::Context::direct(&m.from, self.user());
        let Some(Ok((receipt, stamp))) = key.map(|key| e2e::open_receipt_in(&key, token, &ctx))
        else {
            return Ok(Opened::Nothing);
        };
        if receipt.mids.len() > MAX_MIDS || self.not_fresh(m, &m.from, &stamp, false)?.is_some() {
            return Ok(Opened::Nothing);
        }
        let delivered = self.store.mark_delivered(&m.from, &receipt.mids)?;
        self.store.replay_mark(&m.from, &m.from, &stamp)?;
        if delivered.is_empty() {
            return Ok(Opened::Nothing);
        }
        Ok(Opened::Shown(Event::Delivered {
            peer: m.from.clone(),
            mids: delivered,
        }))
    }
}
