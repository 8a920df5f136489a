//! The client link of the auth server: `hello`, then registrations, logins,
//! resumptions, logouts and password changes (at most [`MAX_IN_FLIGHT`] at once), each
//! a worker job; a login that passes becomes a ticket its relay must confirm before the
//! client is redirected.

use super::{version_error, Core, PeerState, Peers, PendingRedirect};
use crate::accounts::{self, Credential, Done, Job};
use crate::ratelimit::Attempt;
use fastchat_common::limits::client_key;
use fastchat_common::pool::{Alive, Refused};
use fastchat_common::proto::{
    valid_user_name, AuthToClient, AuthToRelay, ClientToAuth, ErrorCode, ErrorFrame,
};
use fastchat_common::reactor::Link;
use fastchat_common::{hex, info, PROTOCOL_VERSION};
use mio::Token;
use std::time::{Duration, Instant};

/// How long a relay has to confirm a ticket before the login fails over or fails.
const TICKET_CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests a client may have in flight at once.
const MAX_IN_FLIGHT: u32 = 4;
/// What a client is told to wait when the workers' queues are full.
const BUSY_RETRY: Duration = Duration::from_secs(1);

impl Core {
    pub(super) fn client_frame(&mut self, io: &mut Peers, token: Token, frame: ClientToAuth) {
        io.touch(token);
        let Some(peer) = io.get_mut(token) else {
            return;
        };
        let addr = client_key(peer.conn.peer.ip());
        let now = Instant::now();
        let (in_flight, alive) = match (&mut peer.state, &frame) {
            (PeerState::ClientAwaitingHello, ClientToAuth::Hello { version }) => {
                if *version != PROTOCOL_VERSION {
                    return self.fail(io, token, version_error(*version));
                }
                peer.state = PeerState::ClientReady {
                    in_flight: 0,
                    alive: Alive::new(),
                };
                peer.conn.queue(&AuthToClient::Hello {
                    version: PROTOCOL_VERSION,
                });
                return;
            }
            (PeerState::ClientReady { in_flight, alive }, f)
                if !matches!(f, ClientToAuth::Hello { .. }) =>
            {
                (*in_flight, alive.clone())
            }
            (_, frame) => {
                let name = frame_name(frame);
                return self.fail(
                    io,
                    token,
                    ErrorFrame::new(
                        None,
                        ErrorCode::BadState,
                        format!("{name} is not allowed now"),
                    ),
                );
            }
        };
        if in_flight >= MAX_IN_FLIGHT {
            return self.fail(
                io,
                token,
                ErrorFrame::new(None, ErrorCode::BadState, "too many requests in flight"),
            );
        }
        let job = match frame {
            ClientToAuth::Register {
                id,
                user,
                password,
                pubkey,
            } => {
                if let Err(why) = accounts::check_registration(&user, &password, &pubkey) {
                    return self.refuse(io, token, id, why);
                }
                if let Err(wait) = self.budgets.register(addr, now) {
                    info!("registration from {addr} rate limited");
                    return self.busy(
                        io,
                        token,
                        id,
                        "too many registrations; try again later",
                        wait,
                    );
                }
                Job::Register {
                    conn: token,
                    req: id,
                    user,
                    password,
                    pubkey,
                    alive,
                }
            }
            ClientToAuth::Login { id, user, password } => {
                if !valid_user_name(&user) || password.len() > accounts::MAX_PASSWORD_BYTES {
                    return self.reply_error(
                        io,
                        token,
                        id,
                        ErrorCode::BadCredentials,
                        "unknown user or wrong password",
                    );
                }
                if !self.password_attempt(io, token, id, &user, addr, now) {
                    return;
                }
                Job::Login {
                    conn: token,
                    req: id,
                    user,
                    password,
                    addr,
                    alive,
                }
            }
            ClientToAuth::Resume {
                id,
                user,
                credential,
            } => {
                if !valid_user_name(&user) || credential.len() > 128 {
                    return self.reply_error(
                        io,
                        token,
                        id,
                        ErrorCode::BadCredentials,
                        "unknown user or bad credential",
                    );
                }
                if let Err(wait) = self.limiter.begin(Attempt::Resume, &user, addr, now) {
                    return self.rate_limited(io, token, id, wait);
                }
                Job::Resume {
                    conn: token,
                    req: id,
                    user,
                    credential,
                    addr,
                    alive,
                }
            }
            ClientToAuth::Logout {
                id,
                user,
                credential,
            } => {
                if !valid_user_name(&user) || credential.len() > 128 {
                    io.send(token, &AuthToClient::LoggedOut { id });
                    return;
                }
                Job::Logout {
                    conn: token,
                    req: id,
                    user,
                    credential,
                }
            }
            ClientToAuth::ChangePassword {
                id,
                user,
                old_password,
                new_password,
            } => {
                if new_password.chars().count() < accounts::MIN_PASSWORD_CHARS
                    || new_password.len() > accounts::MAX_PASSWORD_BYTES
                {
                    return self.reply_error(
                        io,
                        token,
                        id,
                        ErrorCode::WeakPassword,
                        &format!(
                            "passwords must be at least {} characters",
                            accounts::MIN_PASSWORD_CHARS
                        ),
                    );
                }
                if !valid_user_name(&user) || old_password.len() > accounts::MAX_PASSWORD_BYTES {
                    return self.reply_error(
                        io,
                        token,
                        id,
                        ErrorCode::BadCredentials,
                        "unknown user or wrong password",
                    );
                }
                if !self.password_attempt(io, token, id, &user, addr, now) {
                    return;
                }
                Job::ChangePassword {
                    conn: token,
                    req: id,
                    user,
                    old_password,
                    new_password,
                    addr,
                    alive,
                }
            }
            ClientToAuth::Hello { .. } => return,
        };
        self.enqueue(io, token, job);
    }

    /// Whether a password attempt (a login or a password change) for `user` from `addr`
    /// may go to a worker now: the address's budget and the login limiter; if not, it
    /// is answered `rate_limited`.
    fn password_attempt(
        &mut self,
        io: &mut Peers,
        token: Token,
        id: u64,
        user: &str,
        addr: std::net::IpAddr,
        now: Instant,
    ) -> bool {
        if let Err(wait) = self.budgets.password(addr, now) {
            let why = "too many password attempts from this address; try again later";
            self.busy(io, token, id, why, wait);
            return false;
        }
        if let Err(wait) = self.limiter.begin(Attempt::Password, user, addr, now) {
            info!("password attempt for {user} from {addr} rate limited");
            self.rate_limited(io, token, id, wait);
            return false;
        }
        true
    }

    /// Hands `job` to its worker, or — the worker's queue being full — answers at once
    /// that the server is busy (and gives back what the limiter counted for it).
    fn enqueue(&mut self, io: &mut Peers, token: Token, job: Job) {
        let req = job.req();
        let attempt = job.attempt();
        match self.pool.try_submit(job.shard(), job) {
            Ok(()) => {
                if let Some(Link {
                    state: PeerState::ClientReady { in_flight, .. },
                    ..
                }) = io.get_mut(token)
                {
                    *in_flight += 1;
                }
            }
            Err(refused) => {
                if let (Some((attempt, user)), Some(link)) = (attempt, io.get(token)) {
                    let addr = client_key(link.conn.peer.ip());
                    self.limiter.abandoned(attempt, &user, addr);
                }
                self.counters.busy += 1;
                let why = match refused {
                    Refused::Full => "the server is busy; try again in a moment",
                    Refused::Stopped => "the server is stopping; try again",
                };
                self.busy(io, token, req, why, BUSY_RETRY);
            }
        }
    }

    /// Answers `rate_limited` with the time to wait: a limit on how often, not a
    /// verdict on who.
    fn busy(&mut self, io: &mut Peers, token: Token, id: u64, message: &str, wait: Duration) {
        let e = ErrorFrame::rate_limited(
            Some(id),
            message,
            wait.as_millis().try_into().unwrap_or(u64::MAX),
        );
        io.send(token, &AuthToClient::Error(e));
    }

    pub(super) fn rate_limited(&mut self, io: &mut Peers, token: Token, id: u64, wait: Duration) {
        let e = ErrorFrame::rate_limited(
            Some(id),
            format!(
                "too many failed logins; try again in {} s",
                wait.as_secs().max(1)
            ),
            wait.as_millis().try_into().unwrap_or(u64::MAX),
        );
        io.send(token, &AuthToClient::Error(e));
    }

    pub(super) fn complete(&mut self, io: &mut Peers, done: Done) {
        match done {
            Done::Registered { conn, req, user } => {
                info!("registered {user}");
                self.counters.registrations += 1;
                self.release(io, conn);
                io.send(conn, &AuthToClient::Registered { id: req, user });
            }
            Done::LoggedIn {
                conn,
                req,
                user,
                user_id,
                addr,
                credential,
            } => {
                let attempt = if credential.is_some() {
                    Attempt::Password
                } else {
                    Attempt::Resume
                };
                self.limiter.succeeded(attempt, &user, addr, Instant::now());
                if credential.is_some() {
                    self.counters.logins += 1;
                } else {
                    self.counters.resumes += 1;
                }
                if io.contains(conn) {
                    self.dispatch_ticket(io, conn, req, user, user_id, credential);
                } else {
                    self.release(io, conn);
                }
            }
            Done::Skipped { attempt, addr } => {
                self.counters.skipped += 1;
                if let (Some((attempt, user)), Some(addr)) = (attempt, addr) {
                    self.limiter.abandoned(attempt, &user, addr);
                }
            }
            Done::LoggedOut { conn, req } => {
                self.release(io, conn);
                io.send(conn, &AuthToClient::LoggedOut { id: req });
            }
            Done::PasswordChanged {
                conn,
                req,
                user,
                addr,
            } => {
                info!("{user} changed their password; resumption credentials revoked");
                self.limiter
                    .succeeded(Attempt::Password, &user, addr, Instant::now());
                self.release(io, conn);
                io.send(conn, &AuthToClient::PasswordChanged { id: req });
            }
            Done::Refused {
                conn,
                req,
                why,
                login,
            } => {
                if let Some((user, addr)) = login {
                    info!("failed login for {user} from {addr}: {:?}", why.code);
                    self.counters.failed_logins += 1;
                }
                self.release(io, conn);
                self.refuse(io, conn, req, why);
            }
        }
    }

    pub(super) fn redirect(&mut self, io: &mut Peers, p: PendingRedirect, ticket: &str) {
        let Some(relay) = self.directory.get(p.relay) else {
            return self.reply_error(io, p.client, p.req, ErrorCode::NoRelay, "relay went away");
        };
        let frame = AuthToClient::Redirect {
            id: p.req,
            user: p.user.clone(),
            relay_addr: relay.client_addr.clone(),
            relay_key: relay.static_key.clone(),
            ticket: ticket.to_string(),
            credential_expires_ms: p.credential.as_ref().map(|c| c.expires_ms),
            credential: p.credential.map(|c| c.secret),
            relays: self.directory.client_addrs(),
        };
        info!("{} logged in, sent to {}", p.user, relay.relay_id);
        io.send(p.client, &frame);
        self.release(io, p.client);
    }

    /// One request of the client finished.
    pub(super) fn release(&mut self, io: &mut Peers, token: Token) {
        if let Some(Link {
            state: PeerState::ClientReady { in_flight, .. },
            ..
        }) = io.get_mut(token)
        {
            *in_flight = in_flight.saturating_sub(1);
        }
    }

    /// Mints a ticket for the user and pushes it to the least-loaded relay.
    pub(super) fn dispatch_ticket(
        &mut self,
        io: &mut Peers,
        client: Token,
        req: u64,
        user: String,
        user_id: i64,
        credential: Option<Credential>,
    ) {
        let Some((relay, _)) = self.directory.pick_least_loaded() else {
            self.release(io, client);
            return self.reply_error(io, client, req, ErrorCode::NoRelay, "no relay is available");
        };
        let ticket = hex::encode(&rand::random::<[u8; 16]>());
        if let Some(peer) = io.get_mut(relay) {
            peer.conn.queue(&AuthToRelay::Ticket {
                ticket: ticket.clone(),
                user: user.clone(),
                user_id,
                ttl_ms: self.cfg.ticket_ttl_secs * 1000,
            });
            io.touch(relay);
        }
        self.pending.insert(
            ticket,
            PendingRedirect {
                client,
                req,
                user,
                user_id,
                relay,
                deadline: Instant::now() + TICKET_CONFIRM_TIMEOUT,
                credential,
            },
        );
    }
}

fn frame_name(frame: &ClientToAuth) -> &'static str {
    match frame {
        ClientToAuth::Hello { .. } => "hello",
        ClientToAuth::Register { .. } => "register",
        ClientToAuth::Login { .. } => "login",
        ClientToAuth::Resume { .. } => "resume",
        ClientToAuth::Logout { .. } => "logout",
        ClientToAuth::ChangePassword { .. } => "change_password",
    }
}
