//! Where a stored message goes: the recipient's sessions on this relay and the relays
//! where it has others, and the catch-up after a mesh change.

use super::*;

impl Core {
    /// Every live session re-reads what is stored for it: messages another relay
    /// committed but could not forward (it died, or the link was down) arrive now
    /// rather than at the next login. Clients drop what they already have.
    pub(super) fn catch_up_all(&mut self, io: &mut Links) {
        if self.stopping {
            return;
        }
        let sessions: Vec<(Token, i64)> = io
            .iter()
            .filter_map(|(t, l)| match &l.state {
                Peer::Client(ClientState::Ready(s)) if s.receive && !s.in_backlog() => {
                    Some((t, s.user_id))
                }
                _ => None,
            })
            .collect();
        if !sessions.is_empty() {
            info!(
                "catching up {} sessions after a mesh change",
                sessions.len()
            );
        }
        for (conn, user_id) in sessions {
            self.submit(Job::CatchUp {
                conn,
                user_id,
                limit: self.cfg.page_size,
            });
        }
    }

    /// Pushes stored messages to their recipients' sessions, here and on other relays.
    pub(super) fn route(&mut self, io: &mut Links, deliveries: Vec<crate::message::Delivery>) {
        for d in deliveries {
            for relay in &d.remote_relays {
                let _ = self.forward(io, relay, d.recipient_id, &d.message);
            }
            self.deliver_local(io, d.recipient_id, d.message);
        }
    }

    /// Sends a message to the relay where its recipient has a session; `false` if
    /// there is no link to it (a stored message then waits in the table for the
    /// recipient's next login).
    pub(super) fn forward(
        &mut self,
        io: &mut Links,
        relay: &str,
        recipient_id: i64,
        m: &Message,
    ) -> bool {
        let Some(token) = self.mesh.route(relay) else {
            debug!("no link to {relay} for message {}", m.msg_id);
            return false;
        };
        let sent = io.send(
            token,
            &MeshFrame::Deliver {
                recipient_id,
                message: m.clone(),
            },
        );
        self.counters.forwarded += u64::from(sent);
        sent
    }

    /// Pushes a message to the recipient's sessions on this relay; how many took it
    /// (sessions that receive; one in its backlog takes it after).
    pub(super) fn deliver_local(
        &mut self,
        io: &mut Links,
        recipient_id: i64,
        message: Message,
    ) -> usize {
        let Some(tokens) = self.local.get(&recipient_id) else {
            return 0;
        };
        let mut reached = 0;
        for token in tokens.clone() {
            // A receiving session takes it now, or after its backlog.
            let (live, receives) = match client_mut(io, token) {
                Some(ClientMut {
                    state: ClientState::Ready(session),
                    ..
                }) => (session.live(message.clone()), session.receive),
                _ => (None, false),
            };
            match live {
                Some(m) => {
                    if io.send(token, &deliver(m)) {
                        self.counters.delivered += 1;
                        reached += 1;
                    }
                }
                None => reached += usize::from(receives),
            }
        }
        reached
    }
}

pub(super) fn deliver(m: Message) -> RelayToClient {
    RelayToClient::Msg(m)
}
