//! Links to the other relays: dialling the ones this relay dials, the introduction on
//! both sides, stats requests from tools, and messages other relays deliver.

use super::*;

impl Core {
    /// Dials the relays the mesh wants links to.
    pub(super) fn dial_mesh(&mut self, io: &mut Links) {
        let now = Instant::now();
        for (id, addr) in self.mesh.due_dials(now) {
            let Ok(sockaddr) = addr.parse::<SocketAddr>() else {
                warn!("relay {id} announced a bad mesh address {addr:?}");
                self.mesh.dial_failed(&id, now);
                continue;
            };
            let stream = match mio::net::TcpStream::connect(sockaddr) {
                Ok(s) => s,
                Err(e) => {
                    debug!("cannot dial {id} at {addr}: {e}");
                    self.mesh.dial_failed(&id, now);
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let mut conn = match Connection::new(
                stream,
                sockaddr,
                Role::PskInitiator(&self.secret),
                self.cfg.common.max_frame,
            ) {
                Ok(c) => c,
                Err(e) => {
                    warn!("cannot start a mesh session with {id}: {e}");
                    self.mesh.dial_failed(&id, now);
                    continue;
                }
            };
            conn.queue(&MeshFrame::Hello {
                version: PROTOCOL_VERSION,
            });
            conn.queue(&MeshFrame::MeshHello {
                relay_id: self.cfg.id.clone(),
            });
            match io.add(conn, Peer::Mesh) {
                Some(token) => self.mesh.dialled(token, id),
                None => self.mesh.dial_failed(&id, now),
            }
        }
    }

    pub(super) fn fail_mesh(&mut self, io: &mut Links, token: Token, error: ErrorFrame) {
        if let Some(link) = io.get(token) {
            warn!(
                "closing mesh connection {}: {:?}: {}",
                link.conn.peer, error.code, error.message
            );
            io.fail(token, &MeshFrame::Error(error));
        }
    }

    pub(super) fn mesh_frame(&mut self, io: &mut Links, token: Token, frame: MeshFrame) {
        let Some(link) = self.mesh.links.get_mut(&token) else {
            return;
        };
        io.touch(token);
        match (&link.state, frame) {
            (MeshState::AwaitingHello, MeshFrame::Hello { version }) => {
                if version != PROTOCOL_VERSION {
                    return self.fail_mesh(
                        io,
                        token,
                        ErrorFrame::new(
                            None,
                            ErrorCode::BadVersion,
                            format!("this relay speaks protocol {PROTOCOL_VERSION}"),
                        ),
                    );
                }
                match link.dialled.clone() {
                    // We dialled: our introduction is already sent, the link is up.
                    Some(id) => {
                        info!("mesh link to {id} is up");
                        if let Some(old) = self.mesh.link_up(token, id) {
                            self.close(io, old, "replaced by a newer link");
                        }
                        self.catch_up_all(io);
                    }
                    None => {
                        link.state = MeshState::AwaitingIntro;
                        io.send(
                            token,
                            &MeshFrame::Hello {
                                version: PROTOCOL_VERSION,
                            },
                        );
                    }
                }
            }
            (MeshState::AwaitingIntro, MeshFrame::MeshHello { relay_id }) => {
                if !valid_relay_id(&relay_id) || relay_id == self.cfg.id {
                    return self.fail_mesh(
                        io,
                        token,
                        ErrorFrame::new(None, ErrorCode::BadFrame, "bad relay id"),
                    );
                }
                info!("mesh link from {relay_id} is up");
                if let Some(old) = self.mesh.link_up(token, relay_id) {
                    self.close(io, old, "replaced by a newer link");
                }
                self.catch_up_all(io);
            }
            (
                MeshState::AwaitingIntro | MeshState::Admin | MeshState::Up(_),
                MeshFrame::StatsRequest { id },
            ) => {
                if link.state == MeshState::AwaitingIntro {
                    link.state = MeshState::Admin;
                }
                let stats = self.stats(io);
                io.send(token, &MeshFrame::Stats { id, stats });
            }
            (
                MeshState::Up(_),
                MeshFrame::Deliver {
                    recipient_id,
                    message,
                },
            ) => {
                self.counters.arrived += 1;
                let id = message.msg_id;
                let reached = self.deliver_local(io, recipient_id, message);
                // Delivered from memory by the other relay: the ack goes back to it.
                if is_delivery_id(id) && reached > 0 {
                    self.holds.arrived(id, token, recipient_id, Instant::now());
                }
            }
            (
                MeshState::Up(_),
                MeshFrame::Acked {
                    recipient_id,
                    msg_ids,
                },
            ) => {
                if msg_ids.len() > super::clients::MAX_ACK_IDS {
                    return self.fail_mesh(
                        io,
                        token,
                        ErrorFrame::new(None, ErrorCode::BadFrame, "too many ids in one acked"),
                    );
                }
                self.acked_from_memory(io, recipient_id, &msg_ids);
            }
            (_, MeshFrame::Error(e)) => {
                warn!("mesh peer reported {:?}: {}", e.code, e.message);
                self.close(io, token, "peer reported an error");
            }
            (_, _) => self.fail_mesh(
                io,
                token,
                ErrorFrame::new(None, ErrorCode::BadState, "frame not allowed now"),
            ),
        }
    }
}

impl Core {
    /// A frame on the stats port: `hello`, then `stats_request`s; anything else (a
    /// `mesh_hello`, a `deliver`) is refused and the connection closed — the stats
    /// secret reads figures and does nothing else.
    pub(super) fn stats_frame(&mut self, io: &mut Links, token: Token, frame: MeshFrame) {
        io.touch(token);
        let hello_done = matches!(io.get(token).map(|l| &l.state), Some(Peer::Stats(true)));
        match (hello_done, frame) {
            (false, MeshFrame::Hello { version }) if version == PROTOCOL_VERSION => {
                if let Some(link) = io.get_mut(token) {
                    link.state = Peer::Stats(true);
                }
                io.send(
                    token,
                    &MeshFrame::Hello {
                        version: PROTOCOL_VERSION,
                    },
                );
            }
            (true, MeshFrame::StatsRequest { id }) => {
                let stats = self.stats(io);
                io.send(token, &MeshFrame::Stats { id, stats });
            }
            (_, frame) => {
                let why = match frame {
                    MeshFrame::Hello { version } if version != PROTOCOL_VERSION => ErrorFrame::new(
                        None,
                        ErrorCode::BadVersion,
                        format!("this relay speaks protocol {PROTOCOL_VERSION}"),
                    ),
                    _ => ErrorFrame::new(
                        None,
                        ErrorCode::BadState,
                        "the stats port answers hello and stats_request only",
                    ),
                };
                io.fail(token, &MeshFrame::Error(why));
            }
        }
    }
}

/// Relay ids: letters, digits, '_', '.', '-', 1–64 characters.
fn valid_relay_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}
