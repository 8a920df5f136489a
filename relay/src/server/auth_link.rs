//! The control link to the auth server, as the relay drives it: dialling it when due,
//! its frames (tickets, the directory of relays), load reports, and what its loss
//! means.

use super::*;

impl Core {
    pub(super) fn maybe_connect_control(&mut self, io: &mut Links) {
        let now = Instant::now();
        if !self.control.due(now) {
            return;
        }
        let key_hex = hex::encode(&self.keypair.public);
        let me = Announcement {
            relay_id: &self.cfg.id,
            client_addr: &self.public_addr,
            static_key_hex: &key_hex,
            mesh_addr: &self.mesh_addr,
            stats_addr: self.stats_addr.as_deref(),
            clients: self.clients_count(),
        };
        match self
            .control
            .connect(&self.secret, self.cfg.common.max_frame, &me)
        {
            Ok(conn) => match io.add(conn, Peer::Control) {
                Some(token) => self.control.token = Some(token),
                None => self.control_down(io, "cannot start the connection"),
            },
            Err(e) => {
                self.control.down(&e, now);
            }
        }
    }

    pub(super) fn control_down(&mut self, io: &mut Links, why: &str) {
        if let Some(token) = self.control.down(why, Instant::now()) {
            io.remove(token);
        }
    }

    pub(super) fn control_frame(&mut self, io: &mut Links, frame: AuthToRelay) {
        match frame {
            AuthToRelay::Hello { version } if version == PROTOCOL_VERSION => {}
            AuthToRelay::Hello { version } => {
                self.control_down(io, &format!("auth server speaks protocol {version}"))
            }
            AuthToRelay::RelayWelcome {} => self.control.welcomed(),
            AuthToRelay::Ticket {
                ticket,
                user,
                user_id,
                ttl_ms,
            } => {
                self.tickets.insert(
                    ticket.clone(),
                    Admission { user, user_id },
                    Duration::from_millis(ttl_ms),
                    Instant::now(),
                );
                if let Some(token) = self.control.token {
                    io.send(token, &RelayToAuth::TicketAccepted { ticket });
                }
            }
            AuthToRelay::Peers { relays } => {
                let names: Vec<&str> = relays.iter().map(|r| r.relay_id.as_str()).collect();
                info!("relays in rotation: {names:?}");
                for token in self.mesh.set_peers(&relays, Instant::now()) {
                    self.close(io, token, "relay left the directory");
                }
            }
            AuthToRelay::Stats { .. } => {}
            AuthToRelay::Error(e) => {
                warn!("auth server refused us: {:?}: {}", e.code, e.message);
                self.control_down(io, "refused by the auth server");
            }
        }
    }

    pub(super) fn clients_count(&self) -> u32 {
        self.ready_sessions
    }

    /// Tells the auth server the client count when it changed.
    pub(super) fn report_load(&mut self, io: &mut Links) {
        if self.control.phase != Phase::Up {
            return;
        }
        let clients = self.clients_count();
        if self.control.reported_clients == Some(clients) {
            return;
        }
        self.control.reported_clients = Some(clients);
        if let Some(token) = self.control.token {
            io.send(token, &RelayToAuth::Load { clients });
        }
    }
}
