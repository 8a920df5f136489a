//! The client link: `hello`, then a ticket or a resumption credential, then a session's
//! frames — each checked (state, limits, names, sizes) before it becomes a worker job.

use super::*;

/// Most ids one `ack` may carry.
const MAX_ACK_IDS: usize = 10_000;

impl Core {
    /// Sends an error frame and closes the connection once it is written.
    pub(super) fn fail(&mut self, io: &mut Links, token: Token, error: ErrorFrame) {
        if let Some((conn, _)) = client_ref(io, token) {
            warn!("closing {}: {:?}: {}", conn.peer, error.code, error.message);
            io.fail(token, &RelayToClient::Error(error));
        }
    }

    /// Makes `token` a session of the admitted user: welcome, then the backlog.
    pub(super) fn admit(
        &mut self,
        io: &mut Links,
        token: Token,
        admission: Admission,
        receive: bool,
    ) {
        let Some(client) = client_mut(io, token) else {
            return;
        };
        if client.conn.closing || self.stopping {
            return; // refused meanwhile (a frame out of turn) or the relay is stopping
        }
        info!("{} connected from {}", admission.user, client.conn.peer);
        client.conn.queue(&RelayToClient::Welcome {
            user: admission.user.clone(),
            user_id: admission.user_id,
        });
        let user_id = admission.user_id;
        *client.state = ClientState::Ready(Box::new(Session::new(
            admission.user,
            user_id,
            receive,
            self.cfg.page_size as usize,
        )));
        io.touch(token);
        // Registered locally before presence commits, so no live message completing
        // meanwhile can miss this session.
        self.local.entry(user_id).or_default().push(token);
        self.ready_sessions += 1;
        self.submit(Job::Login {
            conn: token,
            user_id,
            page: if receive { self.cfg.page_size } else { 0 },
        });
    }

    /// Closes a connection whose resumption credential is not valid, counting it
    /// against the client's address.
    pub(super) fn refuse_credential(&mut self, io: &mut Links, token: Token, user: &str) {
        if let Some((conn, _)) = client_ref(io, token) {
            info!(
                "refused a resumption credential for {user} from {}",
                conn.peer
            );
            self.resume_failures.add(&conn.peer.ip(), Instant::now());
        }
        self.fail(
            io,
            token,
            ErrorFrame::new(
                None,
                ErrorCode::BadCredentials,
                "the resumption credential is unknown, expired or revoked; log in again",
            ),
        );
    }

    pub(super) fn send(&mut self, io: &mut Links, token: Token, frame: &RelayToClient) {
        io.send(token, frame);
    }

    pub(super) fn reply_error(&mut self, io: &mut Links, token: Token, req: u64, why: Refusal) {
        self.send(io, token, &RelayToClient::Error(why.into_frame(Some(req))));
    }

    pub(super) fn client_frame(&mut self, io: &mut Links, token: Token, frame: ClientToRelay) {
        io.touch(token);
        let Some(client) = client_mut(io, token) else {
            return;
        };
        match (&mut *client.state, frame) {
            (ClientState::AwaitingHello, ClientToRelay::Hello { version }) => {
                if version != PROTOCOL_VERSION {
                    return self.fail(io,
                        token,
                        ErrorFrame::new(
                            None,
                            ErrorCode::BadVersion,
                            format!("protocol version {version} is not supported; this relay speaks {PROTOCOL_VERSION}"),
                        ),
                    );
                }
                *client.state = ClientState::AwaitingAuth;
                client.conn.queue(&RelayToClient::Hello {
                    version: PROTOCOL_VERSION,
                });
            }
            (
                ClientState::AwaitingAuth,
                ClientToRelay::Auth {
                    user,
                    ticket,
                    receive,
                },
            ) => match self.tickets.redeem(&ticket, &user, Instant::now()) {
                Ok(admission) => self.admit(io, token, admission, receive),
                Err(why) => {
                    info!(
                        "refused a ticket for {user} from {}: {why:?}",
                        client.conn.peer
                    );
                    self.fail(
                        io,
                        token,
                        ErrorFrame::new(
                            None,
                            ErrorCode::BadTicket,
                            "the ticket is unknown, used, expired or not yours; log in again",
                        ),
                    );
                }
            },
            (
                ClientState::AwaitingAuth,
                ClientToRelay::Resume {
                    user,
                    credential,
                    receive,
                },
            ) => {
                let addr = client.conn.peer.ip();
                if let Some(wait) = self.resume_failures.blocked_for(&addr, Instant::now()) {
                    info!("resume for {user} from {addr} rate limited");
                    let error = ErrorFrame::rate_limited(
                        None,
                        "too many refused credentials from this address; log in at the auth server",
                        wait.as_millis().try_into().unwrap_or(u64::MAX),
                    );
                    return self.fail(io, token, error);
                }
                if !valid_user_name(&user) || credential.len() > 128 {
                    return self.refuse_credential(io, token, &user);
                }
                *client.state = ClientState::Resuming { receive };
                self.submit(Job::Resume {
                    conn: token,
                    user,
                    credential,
                });
            }
            (
                ClientState::Ready(session),
                ClientToRelay::Send {
                    id,
                    to,
                    group_id,
                    body,
                },
            ) => {
                let (sender_id, sender) = (session.user_id, session.user.clone());
                let now = Instant::now();
                let (rate, burst) = (self.cfg.send_rate, self.cfg.send_burst);
                let budget = self
                    .send_budgets
                    .entry(sender_id)
                    .or_insert_with(|| Bucket::full(burst, now));
                if let Err(wait_ms) = budget.take(rate, burst, now) {
                    let error = ErrorFrame::rate_limited(
                        Some(id),
                        format!("sending too fast (at most {rate} messages a second); nothing was stored, retry later"),
                        wait_ms,
                    );
                    return self.send(io, token, &RelayToClient::Error(error));
                }
                if body.len() > self.cfg.max_body {
                    let max = self.cfg.max_body;
                    return self.reply_error(
                        io,
                        token,
                        id,
                        Refusal::new(
                            ErrorCode::TooLarge,
                            format!("message bodies are limited to {max} bytes"),
                        ),
                    );
                }
                if body.contains('\0') {
                    return self.reply_error(
                        io,
                        token,
                        id,
                        Refusal::new(ErrorCode::BadFrame, "bodies may not contain NUL characters"),
                    );
                }
                let target = match (to, group_id) {
                    (Some(to), None) if valid_user_name(&to) => Target::User(to),
                    (Some(to), None) => {
                        return self.reply_error(
                            io,
                            token,
                            id,
                            Refusal::new(
                                ErrorCode::UnknownUser,
                                format!("there is no user called {to:?}"),
                            ),
                        )
                    }
                    (None, Some(group_id)) => Target::Group(group_id),
                    _ => {
                        return self.reply_error(
                            io,
                            token,
                            id,
                            Refusal::new(
                                ErrorCode::BadFrame,
                                "a send names either `to` or `group_id`",
                            ),
                        )
                    }
                };
                self.counters.received += 1;
                self.submit(Job::Send {
                    conn: token,
                    req: id,
                    sender_id,
                    sender,
                    target,
                    body,
                });
            }
            (ClientState::Ready(session), frame) if file_op(&frame).is_some() => {
                let user_id = session.user_id;
                let Some((id, op)) = file_op(&frame) else {
                    return;
                };
                if let Err(why) = self.check_file_op(user_id, &op) {
                    return self.reply_error(io, token, id, why);
                }
                self.submit(Job::File {
                    conn: token,
                    req: id,
                    user_id,
                    op,
                });
            }
            (ClientState::Ready(session), frame) if group_op(&frame).is_some() => {
                let (user_id, user) = (session.user_id, session.user.clone());
                let Some((id, op)) = group_op(&frame) else {
                    return;
                };
                if let Err(why) = check_group_op(&op) {
                    return self.reply_error(io, token, id, why);
                }
                self.submit(Job::Group {
                    conn: token,
                    req: id,
                    user_id,
                    user,
                    op,
                });
            }
            (ClientState::Ready(session), ClientToRelay::Ack { msg_ids }) => {
                if msg_ids.len() > MAX_ACK_IDS {
                    return self.fail(
                        io,
                        token,
                        ErrorFrame::new(
                            None,
                            ErrorCode::BadFrame,
                            format!("at most {MAX_ACK_IDS} ids per ack"),
                        ),
                    );
                }
                let user_id = session.user_id;
                let next = session.acked(&msg_ids);
                if !msg_ids.is_empty() {
                    self.submit(Job::Ack { user_id, msg_ids });
                }
                if let Next::FetchAfter(after) = next {
                    self.submit(Job::FetchPending {
                        conn: token,
                        user_id,
                        after,
                        page: self.cfg.page_size,
                    });
                }
            }
            (ClientState::Ready(session), ClientToRelay::Key { id, user }) => {
                let user_id = session.user_id;
                if !valid_user_name(&user) {
                    return self.reply_error(
                        io,
                        token,
                        id,
                        Refusal::new(
                            ErrorCode::UnknownUser,
                            format!("there is no user called {user:?}"),
                        ),
                    );
                }
                self.submit(Job::LookupKey {
                    conn: token,
                    user_id,
                    req: id,
                    user,
                });
            }
            (ClientState::Ready(_), ClientToRelay::Ping { id }) => {
                client.conn.queue(&RelayToClient::Pong { id });
            }
            (_, frame) => self.fail(
                io,
                token,
                ErrorFrame::new(
                    None,
                    ErrorCode::BadState,
                    format!("{} is not allowed now", frame_name(&frame)),
                ),
            ),
        }
    }

    /// Limits on file operations, checked before any database work.
    pub(super) fn check_file_op(&mut self, user_id: i64, op: &FileOp) -> Result<(), Refusal> {
        match op {
            FileOp::Begin {
                size,
                chunks,
                target,
            } => {
                if *size > self.cfg.max_file_size {
                    return Err(Refusal::new(
                        ErrorCode::TooLarge,
                        format!(
                            "files are limited to {} MiB",
                            self.cfg.max_file_size / (1024 * 1024)
                        ),
                    ));
                }
                // Chunks of at least 1 KiB: a bound on rows per file.
                if u64::from(*chunks) > size / 1024 + 1 {
                    return Err(Refusal::new(
                        ErrorCode::BadFrame,
                        "too many chunks for the size",
                    ));
                }
                if let Target::User(to) = target {
                    if !valid_user_name(to) {
                        return Err(Refusal::new(
                            ErrorCode::UnknownUser,
                            format!("there is no user called {to:?}"),
                        ));
                    }
                }
                let now = Instant::now();
                let window = self.uploads.entry(user_id).or_insert((now, 0));
                if now.duration_since(window.0) >= Duration::from_secs(60) {
                    *window = (now, 0);
                }
                if window.1 >= self.cfg.uploads_per_minute {
                    return Err(Refusal::new(
                        ErrorCode::RateLimited,
                        format!(
                            "at most {} files per minute; try again shortly",
                            self.cfg.uploads_per_minute
                        ),
                    ));
                }
                window.1 += 1;
                Ok(())
            }
            FileOp::Put { data, .. } if data.contains('\0') => Err(Refusal::new(
                ErrorCode::BadFrame,
                "chunks may not contain NUL characters",
            )),
            _ => Ok(()),
        }
    }
}

fn frame_name(frame: &ClientToRelay) -> &'static str {
    match frame {
        ClientToRelay::Hello { .. } => "hello",
        ClientToRelay::Auth { .. } => "auth",
        ClientToRelay::Resume { .. } => "resume",
        ClientToRelay::Send { .. } => "send",
        ClientToRelay::Ack { .. } => "ack",
        ClientToRelay::Key { .. } => "key",
        ClientToRelay::Ping { .. } => "ping",
        ClientToRelay::GroupCreate { .. } => "group_create",
        ClientToRelay::GroupAdd { .. } => "group_add",
        ClientToRelay::GroupRemove { .. } => "group_remove",
        ClientToRelay::GroupPromote { .. } => "group_promote",
        ClientToRelay::GroupLeave { .. } => "group_leave",
        ClientToRelay::GroupList { .. } => "group_list",
        ClientToRelay::GroupMembers { .. } => "group_members",
        ClientToRelay::RosterAppend { .. } => "roster_append",
        ClientToRelay::RosterGet { .. } => "roster_get",
        ClientToRelay::FileBegin { .. } => "file_begin",
        ClientToRelay::FilePut { .. } => "file_put",
        ClientToRelay::FileStatus { .. } => "file_status",
        ClientToRelay::FileGet { .. } => "file_get",
        ClientToRelay::FileDone { .. } => "file_done",
    }
}

/// The file operation a frame asks for, with its request id (0 for `file_done`,
/// which has no reply).
fn file_op(frame: &ClientToRelay) -> Option<(u64, FileOp)> {
    Some(match frame.clone() {
        ClientToRelay::FileBegin {
            id,
            size,
            chunks,
            to,
            group_id,
        } => {
            let target = match (to, group_id) {
                (Some(to), None) => Target::User(to),
                (None, Some(g)) => Target::Group(g),
                _ => Target::User(String::new()),
            };
            (
                id,
                FileOp::Begin {
                    size,
                    chunks,
                    target,
                },
            )
        }
        ClientToRelay::FilePut {
            id,
            file_id,
            index,
            data,
        } => (
            id,
            FileOp::Put {
                file_id,
                index,
                data,
            },
        ),
        ClientToRelay::FileStatus { id, file_id } => (id, FileOp::Status { file_id }),
        ClientToRelay::FileGet {
            id,
            file_id,
            from,
            count,
        } => (
            id,
            FileOp::Get {
                file_id,
                from,
                count,
            },
        ),
        ClientToRelay::FileDone { file_id } => (0, FileOp::Done { file_id }),
        _ => return None,
    })
}

/// The group operation a frame asks for, with its request id.
fn group_op(frame: &ClientToRelay) -> Option<(u64, GroupOp)> {
    Some(match frame.clone() {
        ClientToRelay::GroupCreate { id, name } => (id, GroupOp::Create { name }),
        ClientToRelay::GroupAdd { id, group_id, user } => (id, GroupOp::Add { group_id, user }),
        ClientToRelay::GroupRemove { id, group_id, user } => {
            (id, GroupOp::Remove { group_id, user })
        }
        ClientToRelay::GroupPromote { id, group_id, user } => {
            (id, GroupOp::Promote { group_id, user })
        }
        ClientToRelay::GroupLeave { id, group_id } => (id, GroupOp::Leave { group_id }),
        ClientToRelay::GroupList { id } => (id, GroupOp::List),
        ClientToRelay::GroupMembers { id, group_id } => (id, GroupOp::Members { group_id }),
        ClientToRelay::RosterAppend {
            id,
            group_id,
            seq,
            prev,
            hash,
            statement,
        } => (
            id,
            GroupOp::RosterAppend {
                group_id,
                seq,
                prev,
                hash,
                statement,
            },
        ),
        ClientToRelay::RosterGet {
            id,
            group_id,
            from_seq,
        } => (id, GroupOp::Roster { group_id, from_seq }),
        _ => return None,
    })
}

/// Names in a group operation must be well-formed before they reach the database.
fn check_group_op(op: &GroupOp) -> Result<(), Refusal> {
    let invalid = |message: String| Err(Refusal::new(ErrorCode::InvalidName, message));
    match op {
        GroupOp::Create { name } if !valid_group_name(name) => invalid(
            "group names are 1-64 characters without control characters or outer spaces".into(),
        ),
        GroupOp::Add { user, .. }
        | GroupOp::Remove { user, .. }
        | GroupOp::Promote { user, .. }
            if !valid_user_name(user) =>
        {
            invalid(format!("there is no user called {user:?}"))
        }
        GroupOp::RosterAppend {
            seq,
            prev,
            hash,
            statement,
            ..
        } if *seq < 0
            || !is_hash(prev)
            || !is_hash(hash)
            || statement.is_empty()
            || statement.len() > crate::worker::groups::MAX_STATEMENT_BYTES =>
        {
            invalid(
                "a roster statement needs seq >= 0, prev and hash of 64 hex and at most 8 KiB"
                    .into(),
            )
        }
        GroupOp::Roster { from_seq, .. } if *from_seq < 0 => {
            invalid("from_seq must be >= 0".into())
        }
        _ => Ok(()),
    }
}

/// 64 lowercase hex characters (a SHA-256).
fn is_hash(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
