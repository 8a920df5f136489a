//! The relays' control links to the auth server: `hello`, `relay_up` (into rotation),
//! load reports, ticket confirmations and `stats_request`s; a relay whose link closes
//! leaves rotation and the logins waiting on it go to another.

use super::{version_error, Core, PeerState, Peers};
use crate::directory::RelayEntry;
use fastchat_common::noise::KEY_LEN;
use fastchat_common::proto::{AuthToRelay, ErrorCode, ErrorFrame, RelayToAuth};
use fastchat_common::{hex, info, warn, PROTOCOL_VERSION};
use mio::Token;

impl Core {
    pub(super) fn relay_frame(&mut self, io: &mut Peers, token: Token, frame: RelayToAuth) {
        io.touch(token);
        let Some(peer) = io.get_mut(token) else {
            return;
        };
        match (&peer.state, frame) {
            (
                PeerState::RelayAwaitingHello | PeerState::StatsAwaitingHello,
                RelayToAuth::Hello { version },
            ) => {
                if version != PROTOCOL_VERSION {
                    return self.fail(io, token, version_error(version));
                }
                peer.state = match peer.state {
                    PeerState::StatsAwaitingHello => PeerState::Stats,
                    _ => PeerState::RelayAwaitingUp,
                };
                peer.conn.queue(&AuthToRelay::Hello {
                    version: PROTOCOL_VERSION,
                });
            }
            (
                PeerState::RelayAwaitingUp,
                RelayToAuth::RelayUp {
                    relay_id,
                    client_addr,
                    static_key,
                    mesh_addr,
                    clients,
                    stats_addr,
                },
            ) => {
                if hex::decode(&static_key).map(|k| k.len()) != Some(KEY_LEN) {
                    return self.fail(
                        io,
                        token,
                        ErrorFrame::new(None, ErrorCode::BadFrame, "static_key must be 64 hex"),
                    );
                }
                peer.state = PeerState::RelayUp;
                peer.conn.queue(&AuthToRelay::RelayWelcome {});
                info!(
                    "relay {relay_id} up at {client_addr} with {clients} clients (link {})",
                    peer.conn.peer
                );
                let stale = self.directory.add(
                    token,
                    RelayEntry {
                        relay_id,
                        client_addr,
                        static_key,
                        mesh_addr,
                        clients,
                        stats_addr,
                    },
                );
                if let Some(old) = stale {
                    self.close(io, old, "replaced by a newer link of the same relay");
                }
                self.broadcast_peers(io);
            }
            (
                PeerState::RelayAwaitingUp | PeerState::RelayUp | PeerState::Stats,
                RelayToAuth::StatsRequest { id },
            ) => {
                let stats = self.stats(io);
                io.send(token, &AuthToRelay::Stats { id, stats });
            }
            (PeerState::RelayUp, RelayToAuth::Load { clients }) => {
                self.directory.set_load(token, clients);
            }
            (PeerState::RelayUp, RelayToAuth::TicketAccepted { ticket }) => {
                match self.pending.remove(&ticket) {
                    Some(p) if p.relay == token => self.redirect(io, p, &ticket),
                    Some(p) => {
                        // Confirmed by a relay it was not sent to: ignore, keep waiting.
                        self.pending.insert(ticket, p);
                    }
                    None => {}
                }
            }
            (_, frame) => self.fail(
                io,
                token,
                ErrorFrame::new(
                    None,
                    ErrorCode::BadState,
                    format!("{} is not allowed now", relay_frame_name(&frame)),
                ),
            ),
        }
    }

    /// Tells every relay in rotation the current set of relays.
    pub(super) fn broadcast_peers(&mut self, io: &mut Peers) {
        let relays = self.directory.peers();
        for token in self.directory.links() {
            io.send(
                token,
                &AuthToRelay::Peers {
                    relays: relays.clone(),
                },
            );
        }
    }

    /// What a closed connection meant if it was a relay's link (false if it was not):
    /// it leaves rotation and the logins waiting on it go to another relay.
    pub(super) fn relay_closed(&mut self, io: &mut Peers, token: Token, why: &str) -> bool {
        let Some(entry) = self.directory.remove(token) else {
            return false;
        };
        warn!("relay {} left rotation: {why}", entry.relay_id);
        self.broadcast_peers(io);
        let orphaned: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.relay == token)
            .map(|(t, _)| t.clone())
            .collect();
        for ticket in orphaned {
            if let Some(p) = self.pending.remove(&ticket) {
                self.dispatch_ticket(io, p.client, p.req, p.user, p.user_id, p.credential);
            }
        }
        true
    }
}

fn relay_frame_name(frame: &RelayToAuth) -> &'static str {
    match frame {
        RelayToAuth::Hello { .. } => "hello",
        RelayToAuth::RelayUp { .. } => "relay_up",
        RelayToAuth::Load { .. } => "load",
        RelayToAuth::TicketAccepted { .. } => "ticket_accepted",
        RelayToAuth::StatsRequest { .. } => "stats_request",
    }
}
