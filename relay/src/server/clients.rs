//! The client link: `hello`, then a ticket or a resumption credential, then a session's
//! frames — each checked (state, limits, names, sizes) before it becomes a worker job.

use super::*;
use crate::session::{REFUSALS_BURST, REFUSALS_PER_SEC};
use fastchat_common::proto::{is_delivery_id, FILE_CHUNK_BYTES, MAX_CHUNK_TOKEN};

/// Most ids one `ack` may carry (also a mesh `acked`).
pub(super) const MAX_ACK_IDS: usize = 10_000;

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
        let sessions = self.local.get(&admission.user_id).map_or(0, Vec::len);
        if sessions >= self.cfg.max_sessions_per_user {
            info!(
                "{} has {sessions} sessions here already: refused",
                admission.user
            );
            let error = ErrorFrame::rate_limited(
                None,
                format!(
                    "{} has {sessions} sessions on this relay, the most allowed; close one first",
                    admission.user
                ),
                10_000,
            );
            return self.fail(io, token, error);
        }
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

    /// Closes a connection whose resumption credential is not valid (it was counted
    /// against the client's address when it was presented).
    pub(super) fn refuse_credential(&mut self, io: &mut Links, token: Token, user: &str) {
        if let Some((conn, _)) = client_ref(io, token) {
            info!(
                "refused a resumption credential for {user} from {}",
                conn.peer
            );
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

    /// Submits a job that answers one of the session's requests, counting it as in
    /// flight until its completion ([`Core::answered`]).
    fn submit_for(&mut self, io: &mut Links, token: Token, job: Job) {
        if let Some(ClientMut {
            state: ClientState::Ready(session),
            ..
        }) = client_mut(io, token)
        {
            session.in_flight += 1;
        }
        self.submit(job);
    }

    /// Refuses a request of `token`'s session for speed with `error` — or, once the
    /// session has had more such refusals than [`REFUSALS_PER_SEC`] allows (bursts of
    /// [`REFUSALS_BURST`]: a client sending through its `retry_after_ms`), closes the
    /// connection: each refusal costs the relay a decryption and an encryption, and
    /// nothing else would slow such a client down.
    pub(super) fn refuse_for_speed(&mut self, io: &mut Links, token: Token, error: ErrorFrame) {
        if let Some(ClientMut {
            state: ClientState::Ready(session),
            ..
        }) = client_mut(io, token)
        {
            let now = Instant::now();
            if session
                .refusals
                .take(REFUSALS_PER_SEC, REFUSALS_BURST, now)
                .is_err()
            {
                let closing = ErrorFrame::rate_limited(
                    None,
                    format!("more than {REFUSALS_BURST} requests were refused for speed without a pause; closing"),
                    1_000,
                );
                return self.fail(io, token, closing);
            }
        }
        self.send(io, token, &RelayToClient::Error(error));
    }

    /// A request of `conn`'s session was answered; `reached`: the recipients a send
    /// reached, and `bytes` the bodies stored for them, charged to the sender's budget
    /// beyond what its first recipient took (a send to a group of 100 costs 99 more).
    pub(super) fn answered(&mut self, io: &mut Links, conn: Token, reached: usize, bytes: usize) {
        let Some(ClientMut {
            state: ClientState::Ready(session),
            ..
        }) = client_mut(io, conn)
        else {
            return;
        };
        session.in_flight = session.in_flight.saturating_sub(1);
        let user_id = session.user_id;
        self.charge_reach(user_id, reached, bytes);
    }

    pub(super) fn send(&mut self, io: &mut Links, token: Token, frame: &RelayToClient) {
        io.send(token, frame);
    }

    pub(super) fn reply_error(&mut self, io: &mut Links, token: Token, req: u64, why: Refusal) {
        self.send(io, token, &RelayToClient::Error(why.into_frame(Some(req))));
    }

    /// A worker's (or an ack's) reply to request `req` of `token`'s session: a send's
    /// reply goes out after those of its earlier sends, in request order (PROTOCOL.md
    /// §3); any other at once.
    pub(super) fn reply_in_order(
        &mut self,
        io: &mut Links,
        token: Token,
        req: u64,
        frame: RelayToClient,
    ) {
        let frames = match client_mut(io, token) {
            Some(ClientMut {
                state: ClientState::Ready(session),
                ..
            }) => session.reply(req, frame),
            _ => vec![frame],
        };
        for frame in &frames {
            self.send(io, token, frame);
        }
    }

    pub(super) fn client_frame(&mut self, io: &mut Links, token: Token, frame: ClientToRelay) {
        io.touch(token);
        let Some(client) = client_mut(io, token) else {
            return;
        };
        if let ClientState::Ready(session) = &*client.state {
            if session.in_flight >= self.cfg.max_in_flight && becomes_job(&frame) {
                let id = request_id(&frame);
                if id.is_none() {
                    return; // a `file_done` at the cap: nobody waits for its answer
                }
                let error = ErrorFrame::rate_limited(
                    id,
                    format!(
                        "{} requests are waiting for replies; wait for them before sending more",
                        self.cfg.max_in_flight
                    ),
                    100,
                );
                return self.refuse_for_speed(io, token, error);
            }
        }
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
                let addr = client_key(client.conn.peer.ip());
                if let Some(wait) = self.resume_failures.blocked_for(&addr, Instant::now()) {
                    info!("resume for {user} from {addr} rate limited");
                    let error = ErrorFrame::rate_limited(
                        None,
                        "too many refused credentials from this address; log in at the auth server",
                        wait.as_millis().try_into().unwrap_or(u64::MAX),
                    );
                    return self.fail(io, token, error);
                }
                // Counted as it starts (a success gives it back), so parallel
                // connections cannot all slip past the limit.
                self.resume_failures.add(&addr, Instant::now());
                if !valid_user_name(&user) || credential.len() > 128 {
                    return self.refuse_credential(io, token, &user);
                }
                *client.state = ClientState::Resuming { receive };
                self.submit(Job::Resume {
                    conn: token,
                    from: addr,
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
                if !self.spend(io, token, id, sender_id, true, body.len()) {
                    return;
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
                        return self.reply_error(io, token, id, no_user_called(&to))
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
                let behind = match &target {
                    Target::User(to) => self.holds.holds_pair(sender_id, to),
                    Target::Group(_) => false,
                };
                self.submit_for(
                    io,
                    token,
                    Job::Send {
                        conn: token,
                        req: id,
                        sender_id,
                        sender,
                        target,
                        body,
                        // Behind held ones, held too (so it keeps their order)
                        // unless the recipient went away meanwhile.
                        hold: self.holds.room(Instant::now()) || (behind && self.holds.enabled()),
                        behind,
                    },
                );
                if let Some(ClientMut {
                    state: ClientState::Ready(session),
                    ..
                }) = client_mut(io, token)
                {
                    session.send_waiting(id);
                }
            }
            (ClientState::Ready(session), frame) if file_op(&frame).is_some() => {
                let user_id = session.user_id;
                let Some((id, op)) = file_op(&frame) else {
                    return;
                };
                // A download asks for more output: not while the client is not reading
                // what it has (the hard limit would cut it off later anyway).
                if matches!(op, FileOp::Get { .. })
                    && client.conn.pending_output() > self.cfg.max_output_bytes
                {
                    let error = ErrorFrame::rate_limited(
                        Some(id),
                        "read what was sent before asking for more chunks",
                        1_000,
                    );
                    return self.send(io, token, &RelayToClient::Error(error));
                }
                if let Err(why) = self.check_file_op(user_id, &op) {
                    return self.reply_error(io, token, id, why);
                }
                if let FileOp::Put { data, .. } = &op {
                    if !self.spend(io, token, id, user_id, false, data.len()) {
                        return;
                    }
                }
                self.submit_for(
                    io,
                    token,
                    Job::File {
                        conn: token,
                        req: id,
                        user_id,
                        op,
                    },
                );
            }
            (ClientState::Ready(session), frame) if group_op(&frame).is_some() => {
                let (user_id, user) = (session.user_id, session.user.clone());
                let Some((id, op)) = group_op(&frame) else {
                    return;
                };
                if let Err(why) = check_group_op(&op) {
                    return self.reply_error(io, token, id, why);
                }
                // Group operations take the send budget (their event rows are charged
                // by how many members they reach once done).
                if !self.spend(io, token, id, user_id, true, 0) {
                    return;
                }
                self.submit_for(
                    io,
                    token,
                    Job::Group {
                        conn: token,
                        req: id,
                        user_id,
                        user,
                        op,
                    },
                );
            }
            (ClientState::Ready(session), frame) if block_op(&frame).is_some() => {
                let user_id = session.user_id;
                let Some((id, op)) = block_op(&frame) else {
                    return;
                };
                if let BlockOp::Add { user } | BlockOp::Remove { user } = &op {
                    if !valid_user_name(user) {
                        return self.reply_error(io, token, id, no_user_called(user));
                    }
                }
                self.submit_for(
                    io,
                    token,
                    Job::Block {
                        conn: token,
                        req: id,
                        user_id,
                        op,
                    },
                );
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
                // Acks count in flight like requests, so a flood of them cannot queue
                // work without bound; one past the cap is not stored (its messages
                // are delivered again at the next login, which the client drops as
                // duplicates), but the session's paging goes on.
                let room = session.in_flight < self.cfg.max_in_flight;
                // Messages delivered from memory are acknowledged here, with no job.
                let (from_memory, msg_ids): (Vec<i64>, Vec<i64>) =
                    msg_ids.into_iter().partition(|id| is_delivery_id(*id));
                if !from_memory.is_empty() {
                    self.acked_from_memory(io, user_id, &from_memory);
                }
                if !msg_ids.is_empty() && room {
                    self.submit_for(
                        io,
                        token,
                        Job::Ack {
                            conn: token,
                            user_id,
                            msg_ids,
                        },
                    );
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
                    return self.reply_error(io, token, id, no_user_called(&user));
                }
                if !self.spend(io, token, id, user_id, true, 0) {
                    return;
                }
                self.submit_for(
                    io,
                    token,
                    Job::LookupKey {
                        conn: token,
                        user_id,
                        req: id,
                        user,
                    },
                );
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
                // Exactly as many chunks as the size needs: each holds at most one
                // chunk's token (see `Put`), so what is stored is bounded by the size.
                let needed = size.div_ceil(FILE_CHUNK_BYTES);
                if u64::from(*chunks) != needed {
                    return Err(Refusal::new(
                        ErrorCode::BadFrame,
                        format!("a file of {size} bytes is {needed} chunks of {FILE_CHUNK_BYTES} bytes"),
                    ));
                }
                if let Target::User(to) = target {
                    if !valid_user_name(to) {
                        return Err(no_user_called(to));
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
            FileOp::Put { data, .. } if data.len() > MAX_CHUNK_TOKEN => Err(Refusal::new(
                ErrorCode::TooLarge,
                format!("a chunk's data is at most {MAX_CHUNK_TOKEN} bytes (one sealed chunk of {FILE_CHUNK_BYTES})"),
            )),
            FileOp::Put { data, .. } if data.contains('\0') => Err(Refusal::new(
                ErrorCode::BadFrame,
                "chunks may not contain NUL characters",
            )),
            _ => Ok(()),
        }
    }
}

/// Whether a frame of a session becomes a worker job (whose completion answers it).
fn becomes_job(frame: &ClientToRelay) -> bool {
    matches!(
        frame,
        ClientToRelay::Send { .. } | ClientToRelay::Key { .. }
    ) || file_op(frame).is_some()
        || group_op(frame).is_some()
        || block_op(frame).is_some()
}

/// The request id a frame carries, if it has one.
fn request_id(frame: &ClientToRelay) -> Option<u64> {
    match frame {
        ClientToRelay::Send { id, .. } | ClientToRelay::Key { id, .. } => Some(*id),
        ClientToRelay::FileDone { .. } => None,
        f => file_op(f)
            .map(|(id, _)| id)
            .or_else(|| group_op(f).map(|(id, _)| id))
            .or_else(|| block_op(f).map(|(id, _)| id)),
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
        ClientToRelay::Block { .. } => "block",
        ClientToRelay::Unblock { .. } => "unblock",
        ClientToRelay::BlockList { .. } => "block_list",
        ClientToRelay::GroupCreate { .. } => "group_create",
        ClientToRelay::GroupAdd { .. } => "group_add",
        ClientToRelay::GroupRemove { .. } => "group_remove",
        ClientToRelay::GroupPromote { .. } => "group_promote",
        ClientToRelay::GroupLeave { .. } => "group_leave",
        ClientToRelay::GroupAccept { .. } => "group_accept",
        ClientToRelay::GroupDecline { .. } => "group_decline",
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
fn block_op(frame: &ClientToRelay) -> Option<(u64, BlockOp)> {
    let frame = frame.clone();
    Some(match frame {
        ClientToRelay::Block { id, user } => (id, BlockOp::Add { user }),
        ClientToRelay::Unblock { id, user } => (id, BlockOp::Remove { user }),
        ClientToRelay::BlockList { id } => (id, BlockOp::List),
        _ => return None,
    })
}

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
        ClientToRelay::GroupAccept { id, group_id } => (id, GroupOp::Accept { group_id }),
        ClientToRelay::GroupDecline { id, group_id } => (id, GroupOp::Decline { group_id }),
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

/// The refusal of a malformed user name (no such user can exist; the database is not
/// asked).
fn no_user_called(name: &str) -> Refusal {
    Refusal::new(
        ErrorCode::UnknownUser,
        format!("there is no user called {name:?}"),
    )
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
