//! What the workers' results mean for the connections: pages of backlog, sent replies,
//! group and file answers, resumptions and failures.

use super::*;

impl Core {
    /// The store could not record a login or check a credential: the connection ends.
    fn login_failed(&mut self, io: &mut Links, conn: Token) {
        self.fail(
            io,
            conn,
            ErrorFrame::new(
                None,
                ErrorCode::StoreFailed,
                "the message store is unavailable; log in again later",
            ),
        )
    }

    pub(super) fn complete(&mut self, io: &mut Links, done: Done) {
        match done {
            Done::Pending {
                conn,
                messages,
                more,
                ..
            } => {
                let Some(ClientMut {
                    state: ClientState::Ready(session),
                    ..
                }) = client_mut(io, conn)
                else {
                    return;
                };
                if !session.receive {
                    return;
                }
                let (out, synced) = session.page_arrived(messages, more);
                self.counters.delivered += out.len() as u64;
                for m in out {
                    self.send(io, conn, &deliver(m));
                }
                if synced {
                    self.send(io, conn, &RelayToClient::Synced {});
                }
            }
            Done::CatchUp { conn, messages } => {
                let Some((_, ClientState::Ready(session))) = client_ref(io, conn) else {
                    return;
                };
                if !session.receive || session.in_backlog() {
                    return;
                }
                self.counters.delivered += messages.len() as u64;
                for m in messages {
                    self.send(io, conn, &deliver(m));
                }
            }
            Done::Resumed {
                conn,
                from,
                user,
                user_id,
            } => {
                // The attempt was counted when it started: a valid credential gives it
                // back, even if the connection closed meanwhile.
                if user_id.is_some() {
                    self.resume_failures.remove_one(&from);
                }
                let Some((_, ClientState::Resuming { receive })) = client_ref(io, conn) else {
                    return; // closed meanwhile
                };
                let receive = *receive;
                match user_id {
                    Some(user_id) => self.admit(io, conn, Admission { user, user_id }, receive),
                    None => self.refuse_credential(io, conn, &user),
                }
            }
            Done::ResumeFailed { conn, from } => {
                self.resume_failures.remove_one(&from);
                self.login_failed(io, conn)
            }
            Done::LoginFailed { conn } => self.login_failed(io, conn),
            Done::Sent {
                conn,
                req,
                msg_id,
                ts,
                deliveries,
                full,
            } => {
                let bytes = deliveries.iter().map(|d| d.message.body.len()).sum();
                self.answered(io, conn, deliveries.len(), bytes);
                let sent = RelayToClient::Sent {
                    id: req,
                    msg_id,
                    ts,
                    full,
                };
                self.reply_in_order(io, conn, req, sent);
                self.route(io, deliveries);
            }
            Done::Hold {
                held,
                remote_relays,
            } => self.deliver_held(io, held, &remote_relays),
            Done::AfterHeld { held } => self.store_in_order(held),
            Done::Acked { conn } => self.answered(io, conn, 0, 0),
            Done::Frames { conn, frames } => {
                self.answered(io, conn, 0, 0);
                for frame in &frames {
                    self.send(io, conn, frame);
                }
            }
            Done::Group {
                conn,
                reply,
                deliveries,
            } => {
                // A membership change writes an event row per member: charged like a
                // group send's reach (the rows' bodies are empty).
                self.answered(io, conn, deliveries.len(), 0);
                self.send(io, conn, &reply);
                self.route(io, deliveries);
            }
            Done::Failed { conn, req, why } => {
                self.answered(io, conn, 0, 0);
                let error = RelayToClient::Error(why.into_frame(Some(req)));
                self.reply_in_order(io, conn, req, error);
            }
            Done::Key {
                conn,
                req,
                user,
                pubkey,
            } => {
                self.answered(io, conn, 0, 0);
                match pubkey {
                    Some(pubkey) => self.send(
                        io,
                        conn,
                        &RelayToClient::Key {
                            id: req,
                            user,
                            pubkey,
                        },
                    ),
                    None => self.reply_error(
                        io,
                        conn,
                        req,
                        Refusal::new(
                            ErrorCode::UnknownUser,
                            format!("there is no user called {user}"),
                        ),
                    ),
                }
            }
        }
    }
}
