//! Direct messages delivered from memory (`crate::holds`): pushed to an online
//! recipient at once, their senders answered `sent` on the recipient's `ack` (here or
//! passed back through the mesh), stored when the delivery window ends first.

use super::*;
use crate::holds::Held;

impl Core {
    /// A worker found the recipient online: push the message to their sessions here
    /// and forward it to the relays where they have others, then hold it for their
    /// ack. Reaching nobody (no receiving session here, no link to their relays), or
    /// with no delivery id to give it, it is stored now.
    pub(super) fn deliver_held(&mut self, io: &mut Links, held: Held, remote_relays: &[String]) {
        let id = match self.unstored {
            None => self.holds.next_id(),
            Some(_) => None, // shutting down: everything is stored
        };
        let Some(id) = id else {
            return self.store_in_order(held);
        };
        let message = Message {
            msg_id: id,
            from: held.sender.clone(),
            group_id: None,
            group: None,
            body: held.body.clone(),
            ts: held.ts,
            event: None,
        };
        let mut reached = 0;
        for relay in remote_relays {
            reached += usize::from(self.forward(io, relay, held.recipient_id, &message));
        }
        reached += self.deliver_local(io, held.recipient_id, message);
        if reached == 0 {
            return self.store_in_order(held);
        }
        self.counters.held += 1;
        self.holds.hold(id, held, Instant::now());
    }

    /// `user_id` acknowledged the delivery ids `ids` (their client stored them): the
    /// messages held here for them are durable, so their senders are answered; those
    /// other relays delivered go back to those relays. Ids that are neither (acked
    /// twice, stored meanwhile, someone else's) change nothing.
    pub(super) fn acked_from_memory(&mut self, io: &mut Links, user_id: i64, ids: &[i64]) {
        for &id in ids {
            if let Some(held) = self.holds.acked(user_id, id) {
                self.answer_held(io, held, id);
            }
        }
        for (link, msg_ids) in self.holds.remote_acked(user_id, ids) {
            io.send(
                link,
                &MeshFrame::Acked {
                    recipient_id: user_id,
                    msg_ids,
                },
            );
        }
    }

    /// The recipient stored a held message: its sender is answered `sent`.
    fn answer_held(&mut self, io: &mut Links, held: Held, msg_id: i64) {
        self.counters.held_acked += 1;
        self.answered(io, held.conn, 1, held.body.len());
        let sent = RelayToClient::Sent {
            id: held.req,
            msg_id,
            ts: held.ts,
            full: Vec::new(),
        };
        self.reply_in_order(io, held.conn, held.req, sent);
    }

    /// Stores the held messages whose delivery window has ended unacknowledged.
    pub(super) fn end_windows(&mut self) {
        let now = Instant::now();
        if self.holds.next_deadline().is_none_or(|at| at > now) {
            return;
        }
        for held in self.holds.expired(now) {
            self.counters.held_stored += 1;
            self.store_held(held);
        }
    }

    /// Stores `held` after whatever is still held from its sender to its recipient
    /// (stored first, in order), so the sender's messages keep their order in the store.
    pub(super) fn store_in_order(&mut self, held: Held) {
        for earlier in self.holds.take_pair(held.sender_id, &held.to) {
            self.counters.held_stored += 1;
            self.store_held(earlier);
        }
        self.store_held(held);
    }

    /// Stores a message that was (or would have been) delivered from memory, as any
    /// send: its sender is answered after the commit, and the recipient gets it again
    /// (their client shows it once). Once the pool has stopped (shutdown), kept for
    /// the relay's last batch.
    pub(super) fn store_held(&mut self, held: Held) {
        let job = Job::Send {
            conn: held.conn,
            req: held.req,
            sender_id: held.sender_id,
            sender: held.sender,
            target: Target::User(held.to),
            body: held.body,
            hold: false,
            behind: false,
        };
        match &mut self.unstored {
            Some(unstored) => unstored.push(job),
            None => self.submit(job),
        }
    }
}
