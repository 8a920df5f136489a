//! The auth server's poll loop: one thread owns both listeners and every connection;
//! password hashing and database work go to the worker pool and come back through the
//! completion channel and the waker.
//!
//! Client connection: `AwaitingHello → Ready`; a login that passes becomes a ticket
//! pushed to the least-loaded relay, and only when that relay confirms it does the
//! client get its `redirect`.
//! Relay control link: `AwaitingHello → AwaitingUp → Up` (in rotation while up).

use crate::accounts::{self, Credential, Done, Job, Worker};
use crate::config::Config;
use crate::directory::{RelayDirectory, RelayEntry};
use crate::ratelimit::LoginLimiter;
use crossbeam_channel::Receiver;
use fastchat_common::conn::{accept_pending, Connection, ReadStatus};
use fastchat_common::db::DbPool;
use fastchat_common::noise::{Role, StaticKeypair, KEY_LEN};
use fastchat_common::pool::{Completions, WorkerPool};
use fastchat_common::proto::{
    valid_user_name, AuthToClient, AuthToRelay, ClientToAuth, ErrorCode, ErrorFrame, RelayToAuth,
};
use fastchat_common::{hex, info, warn, PROTOCOL_VERSION};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLIENT_LISTENER: Token = Token(0);
const RELAY_LISTENER: Token = Token(1);
const WAKER: Token = Token(2);
const FIRST_PEER: usize = 3;

/// How long a relay has to confirm a ticket before the login fails over or fails.
const TICKET_CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a busy server logs a summary line.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(5);
/// Requests a client may have in flight at once.
const MAX_IN_FLIGHT: u32 = 4;

enum PeerState {
    ClientAwaitingHello,
    ClientReady { in_flight: u32 },
    RelayAwaitingHello,
    RelayAwaitingUp,
    RelayUp,
}

struct Peer {
    conn: Connection,
    state: PeerState,
}

/// A login waiting for its relay to confirm the ticket.
struct PendingRedirect {
    client: Token,
    req: u64,
    user: String,
    user_id: i64,
    relay: Token,
    deadline: Instant,
    credential: Option<Credential>,
}

/// Running totals for `stats` and the periodic summary.
#[derive(Default, Clone, Copy)]
struct Counters {
    registrations: u64,
    logins: u64,
    resumes: u64,
    failed_logins: u64,
}

/// Addresses the server is listening on, once bound.
pub struct Bound {
    pub clients: SocketAddr,
    pub relays: SocketAddr,
}

/// The running auth server.
pub struct AuthServer {
    cfg: Config,
    poll: Poll,
    client_listener: TcpListener,
    relay_listener: TcpListener,
    keypair: StaticKeypair,
    secret: [u8; KEY_LEN],
    peers: HashMap<Token, Peer>,
    next_token: usize,
    pool: WorkerPool<Job>,
    done_rx: Receiver<Done>,
    directory: RelayDirectory,
    limiter: LoginLimiter,
    pending: HashMap<String, PendingRedirect>,
    touched: HashSet<Token>,
    scratch: Vec<u8>,
    stop: Arc<AtomicBool>,
    counters: Counters,
    last_summary: Counters,
    last_summary_at: Instant,
    /// The most connections (clients and relays) held at once.
    max_connections: usize,
    /// When the server last warned that it was full.
    full_warned_at: Option<Instant>,
}

fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let sockaddr: SocketAddr = addr.parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr} is not an IP:port address"),
        )
    })?;
    TcpListener::bind(sockaddr)
}

impl AuthServer {
    /// Binds the listeners and starts the worker pool.
    pub fn new(
        cfg: Config,
        db: DbPool,
        keypair: StaticKeypair,
        secret: [u8; KEY_LEN],
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<(AuthServer, Bound, Arc<Waker>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut client_listener = bind(&cfg.listen)?;
        let mut relay_listener = bind(&cfg.relay_listen)?;
        poll.registry()
            .register(&mut client_listener, CLIENT_LISTENER, Interest::READABLE)?;
        poll.registry()
            .register(&mut relay_listener, RELAY_LISTENER, Interest::READABLE)?;
        let bound = Bound {
            clients: client_listener.local_addr()?,
            relays: relay_listener.local_addr()?,
        };
        let (done, done_rx) = Completions::new(waker.clone());
        let resume_ttl = Duration::from_secs(cfg.resume_ttl_secs);
        let pool = WorkerPool::start("auth-worker", cfg.workers, 16, |_| {
            let mut worker = Worker::new(db.clone(), done.clone(), resume_ttl);
            move |jobs| worker.run_batch(jobs)
        })?;
        let limiter = LoginLimiter::new(
            cfg.login_failures_per_user,
            cfg.login_failures_per_addr,
            Duration::from_secs(cfg.login_failure_window_secs),
        );
        Ok((
            AuthServer {
                poll,
                client_listener,
                relay_listener,
                keypair,
                secret,
                peers: HashMap::new(),
                next_token: FIRST_PEER,
                pool,
                done_rx,
                directory: RelayDirectory::default(),
                limiter,
                pending: HashMap::new(),
                touched: HashSet::new(),
                scratch: vec![0; 64 * 1024],
                stop,
                counters: Counters::default(),
                last_summary: Counters::default(),
                last_summary_at: Instant::now(),
                max_connections: cfg
                    .max_connections
                    .unwrap_or_else(fastchat_common::limits::default_max_connections),
                full_warned_at: None,
                cfg,
            },
            bound,
            waker,
        ))
    }

    /// Runs until the stop flag is set, then finishes the jobs in flight and returns.
    pub fn run(mut self) -> std::io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut last_sweep = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            if let Err(e) = self
                .poll
                .poll(&mut events, Some(Duration::from_millis(250)))
            {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for event in events.iter() {
                match event.token() {
                    CLIENT_LISTENER => self.accept(true),
                    RELAY_LISTENER => self.accept(false),
                    WAKER => {}
                    token => self.peer_ready(token, event.is_readable()),
                }
            }
            self.drain_completions();
            if last_sweep.elapsed() >= Duration::from_millis(250) {
                self.sweep();
                last_sweep = Instant::now();
            }
            if self.last_summary_at.elapsed() >= SUMMARY_INTERVAL {
                self.summarise();
            }
            self.flush_touched();
        }
        self.shut_down();
        Ok(())
    }

    fn shut_down(mut self) {
        info!("stopping: no new connections, finishing jobs in flight");
        let _ = self.poll.registry().deregister(&mut self.client_listener);
        let _ = self.poll.registry().deregister(&mut self.relay_listener);
        self.pool.shutdown();
        while let Ok(done) = self.done_rx.try_recv() {
            match done {
                Done::LoggedIn { conn, req, .. } => self.reply_error(
                    conn,
                    req,
                    ErrorCode::NoRelay,
                    "the auth server is shutting down; try again",
                ),
                other => self.complete(other),
            }
        }
        self.flush_touched();
        info!("stopped");
    }

    fn accept(&mut self, clients: bool) {
        let room = self.max_connections.saturating_sub(self.peers.len());
        let accepted = if clients {
            accept_pending(
                &self.client_listener,
                || Role::NxResponder(&self.keypair),
                self.cfg.max_frame,
                room,
            )
        } else {
            accept_pending(
                &self.relay_listener,
                || Role::PskResponder(&self.secret),
                self.cfg.max_frame,
                room,
            )
        };
        if accepted.refused > 0
            && self
                .full_warned_at
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            self.full_warned_at = Some(Instant::now());
            warn!(
                "full ({} connections, limit {}): closing new connections at once",
                self.peers.len(),
                self.max_connections
            );
        }
        for conn in accepted.connections {
            let state = if clients {
                PeerState::ClientAwaitingHello
            } else {
                PeerState::RelayAwaitingHello
            };
            let token = Token(self.next_token);
            self.next_token += 1;
            let mut peer = Peer { conn, state };
            if let Err(e) = peer.conn.update_interest(self.poll.registry(), token) {
                warn!("cannot register {}: {e}", peer.conn.peer);
                continue;
            }
            self.peers.insert(token, peer);
        }
    }

    fn peer_ready(&mut self, token: Token, readable: bool) {
        self.touched.insert(token);
        if !readable {
            return;
        }
        let Some(peer) = self.peers.get_mut(&token) else {
            return;
        };
        match peer.conn.read_ready(&mut self.scratch) {
            Ok(ReadStatus::Open) => {}
            Ok(ReadStatus::Eof) => {
                // Process what arrived before the close, then drop the connection.
                self.process_frames(token);
                self.close(token, "closed by peer");
                return;
            }
            Err(e) => {
                self.close(token, &format!("{e}"));
                return;
            }
        }
        self.process_frames(token);
    }

    fn process_frames(&mut self, token: Token) {
        loop {
            let Some(peer) = self.peers.get_mut(&token) else {
                return;
            };
            if peer.conn.closing {
                return;
            }
            let is_client = matches!(
                peer.state,
                PeerState::ClientAwaitingHello | PeerState::ClientReady { .. }
            );
            if is_client {
                match peer.conn.next_message::<ClientToAuth>() {
                    None => return,
                    Some(Ok(frame)) => self.client_frame(token, frame),
                    Some(Err(e)) => self.fail(token, e),
                }
            } else {
                match peer.conn.next_message::<RelayToAuth>() {
                    None => return,
                    Some(Ok(frame)) => self.relay_frame(token, frame),
                    Some(Err(e)) => self.fail(token, e),
                }
            }
        }
    }

    /// Sends an error and closes the connection once it is written.
    fn fail(&mut self, token: Token, error: ErrorFrame) {
        let Some(peer) = self.peers.get_mut(&token) else {
            return;
        };
        warn!(
            "closing {}: {:?}: {}",
            peer.conn.peer, error.code, error.message
        );
        match peer.state {
            PeerState::ClientAwaitingHello | PeerState::ClientReady { .. } => {
                peer.conn.queue(&AuthToClient::Error(error))
            }
            _ => peer.conn.queue(&AuthToRelay::Error(error)),
        }
        peer.conn.closing = true;
        self.touched.insert(token);
    }

    fn send_client(&mut self, token: Token, frame: &AuthToClient) {
        if let Some(peer) = self.peers.get_mut(&token) {
            peer.conn.queue(frame);
            self.touched.insert(token);
        }
    }

    fn reply_error(&mut self, token: Token, req: u64, code: ErrorCode, message: &str) {
        self.send_client(
            token,
            &AuthToClient::Error(ErrorFrame::new(Some(req), code, message)),
        );
    }

    fn client_frame(&mut self, token: Token, frame: ClientToAuth) {
        let Some(peer) = self.peers.get_mut(&token) else {
            return;
        };
        let addr = peer.conn.peer.ip();
        match (&mut peer.state, frame) {
            (PeerState::ClientAwaitingHello, ClientToAuth::Hello { version }) => {
                if version != PROTOCOL_VERSION {
                    return self.fail(token, version_error(version));
                }
                peer.state = PeerState::ClientReady { in_flight: 0 };
                peer.conn.queue(&AuthToClient::Hello {
                    version: PROTOCOL_VERSION,
                });
            }
            (PeerState::ClientReady { in_flight }, _) if *in_flight >= MAX_IN_FLIGHT => {
                self.fail(
                    token,
                    ErrorFrame::new(None, ErrorCode::BadState, "too many requests in flight"),
                );
            }
            (
                PeerState::ClientReady { in_flight },
                ClientToAuth::Register {
                    id,
                    user,
                    password,
                    pubkey,
                },
            ) => {
                if let Err((code, message)) =
                    accounts::check_registration(&user, &password, &pubkey)
                {
                    return self.reply_error(token, id, code, &message);
                }
                *in_flight += 1;
                let job = Job::Register {
                    conn: token,
                    req: id,
                    user,
                    password,
                    pubkey,
                };
                self.pool.submit(job.shard(), job);
            }
            (PeerState::ClientReady { in_flight }, ClientToAuth::Login { id, user, password }) => {
                if !valid_user_name(&user) || password.len() > accounts::MAX_PASSWORD_BYTES {
                    return self.reply_error(
                        token,
                        id,
                        ErrorCode::BadCredentials,
                        "unknown user or wrong password",
                    );
                }
                if let Err(wait) = self.limiter.begin(&user, addr, Instant::now()) {
                    info!("login for {user} from {addr} rate limited");
                    return self.rate_limited(token, id, wait);
                }
                *in_flight += 1;
                let job = Job::Login {
                    conn: token,
                    req: id,
                    user,
                    password,
                    addr,
                };
                self.pool.submit(job.shard(), job);
            }
            (
                PeerState::ClientReady { in_flight },
                ClientToAuth::Resume {
                    id,
                    user,
                    credential,
                },
            ) => {
                if !valid_user_name(&user) || credential.len() > 128 {
                    return self.reply_error(
                        token,
                        id,
                        ErrorCode::BadCredentials,
                        "unknown user or bad credential",
                    );
                }
                if let Err(wait) = self.limiter.begin(&user, addr, Instant::now()) {
                    return self.rate_limited(token, id, wait);
                }
                *in_flight += 1;
                let job = Job::Resume {
                    conn: token,
                    req: id,
                    user,
                    credential,
                    addr,
                };
                self.pool.submit(job.shard(), job);
            }
            (
                PeerState::ClientReady { in_flight },
                ClientToAuth::Logout {
                    id,
                    user,
                    credential,
                },
            ) => {
                if !valid_user_name(&user) || credential.len() > 128 {
                    return self.send_client(token, &AuthToClient::LoggedOut { id });
                }
                *in_flight += 1;
                let job = Job::Logout {
                    conn: token,
                    req: id,
                    user,
                    credential,
                };
                self.pool.submit(job.shard(), job);
            }
            (
                PeerState::ClientReady { in_flight },
                ClientToAuth::ChangePassword {
                    id,
                    user,
                    old_password,
                    new_password,
                },
            ) => {
                if new_password.chars().count() < accounts::MIN_PASSWORD_CHARS
                    || new_password.len() > accounts::MAX_PASSWORD_BYTES
                {
                    return self.reply_error(
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
                        token,
                        id,
                        ErrorCode::BadCredentials,
                        "unknown user or wrong password",
                    );
                }
                if let Err(wait) = self.limiter.begin(&user, addr, Instant::now()) {
                    return self.rate_limited(token, id, wait);
                }
                *in_flight += 1;
                let job = Job::ChangePassword {
                    conn: token,
                    req: id,
                    user,
                    old_password,
                    new_password,
                    addr,
                };
                self.pool.submit(job.shard(), job);
            }
            (_, frame) => self.fail(
                token,
                ErrorFrame::new(
                    None,
                    ErrorCode::BadState,
                    format!("{} is not allowed now", frame_name(&frame)),
                ),
            ),
        }
        self.touched.insert(token);
    }

    fn rate_limited(&mut self, token: Token, id: u64, wait: Duration) {
        let e = ErrorFrame::rate_limited(
            Some(id),
            format!(
                "too many failed logins; try again in {} s",
                wait.as_secs().max(1)
            ),
            wait.as_millis().try_into().unwrap_or(u64::MAX),
        );
        self.send_client(token, &AuthToClient::Error(e));
    }

    fn relay_frame(&mut self, token: Token, frame: RelayToAuth) {
        let Some(peer) = self.peers.get_mut(&token) else {
            return;
        };
        self.touched.insert(token);
        match (&peer.state, frame) {
            (PeerState::RelayAwaitingHello, RelayToAuth::Hello { version }) => {
                if version != PROTOCOL_VERSION {
                    return self.fail(token, version_error(version));
                }
                peer.state = PeerState::RelayAwaitingUp;
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
                },
            ) => {
                if hex::decode(&static_key).map(|k| k.len()) != Some(KEY_LEN) {
                    return self.fail(
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
                    },
                );
                if let Some(old) = stale {
                    self.close(old, "replaced by a newer link of the same relay");
                }
                self.broadcast_peers();
            }
            (PeerState::RelayAwaitingUp | PeerState::RelayUp, RelayToAuth::StatsRequest { id }) => {
                let stats = self.stats();
                peer_conn(&mut self.peers, token).queue(&AuthToRelay::Stats { id, stats });
            }
            (PeerState::RelayUp, RelayToAuth::Load { clients }) => {
                self.directory.set_load(token, clients);
            }
            (PeerState::RelayUp, RelayToAuth::TicketAccepted { ticket }) => {
                match self.pending.remove(&ticket) {
                    Some(p) if p.relay == token => self.redirect(p, &ticket),
                    Some(p) => {
                        // Confirmed by a relay it was not sent to: ignore, keep waiting.
                        self.pending.insert(ticket, p);
                    }
                    None => {}
                }
            }
            (_, frame) => self.fail(
                token,
                ErrorFrame::new(
                    None,
                    ErrorCode::BadState,
                    format!("{} is not allowed now", relay_frame_name(&frame)),
                ),
            ),
        }
    }

    fn redirect(&mut self, p: PendingRedirect, ticket: &str) {
        let Some(relay) = self.directory.get(p.relay) else {
            return self.reply_error(p.client, p.req, ErrorCode::NoRelay, "relay went away");
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
        self.send_client(p.client, &frame);
        self.release(p.client);
    }

    /// One request of the client finished.
    fn release(&mut self, token: Token) {
        if let Some(Peer {
            state: PeerState::ClientReady { in_flight },
            ..
        }) = self.peers.get_mut(&token)
        {
            *in_flight = in_flight.saturating_sub(1);
        }
    }

    /// Mints a ticket for the user and pushes it to the least-loaded relay.
    fn dispatch_ticket(
        &mut self,
        client: Token,
        req: u64,
        user: String,
        user_id: i64,
        credential: Option<Credential>,
    ) {
        let Some((relay, _)) = self.directory.pick_least_loaded() else {
            self.release(client);
            return self.reply_error(client, req, ErrorCode::NoRelay, "no relay is available");
        };
        let ticket = hex::encode(&rand::random::<[u8; 16]>());
        if let Some(peer) = self.peers.get_mut(&relay) {
            peer.conn.queue(&AuthToRelay::Ticket {
                ticket: ticket.clone(),
                user: user.clone(),
                user_id,
                ttl_ms: self.cfg.ticket_ttl_secs * 1000,
            });
            self.touched.insert(relay);
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

    /// Tells every relay in rotation the current set of relays.
    fn broadcast_peers(&mut self) {
        let relays = self.directory.peers();
        for token in self.directory.links() {
            if let Some(peer) = self.peers.get_mut(&token) {
                peer.conn.queue(&AuthToRelay::Peers {
                    relays: relays.clone(),
                });
                self.touched.insert(token);
            }
        }
    }

    /// The figures `stats` reports.
    fn stats(&self) -> serde_json::Value {
        let c = self.counters;
        serde_json::json!({
            "server": "auth",
            "connections": self.peers.len(),
            "relays": self.directory.describe(),
            "registrations": c.registrations,
            "logins": c.logins,
            "resumes": c.resumes,
            "failed_logins": c.failed_logins,
            "pending_tickets": self.pending.len(),
            "queue_depth": self.pool.queue_depth(),
        })
    }

    /// A one-line summary when something happened since the last one.
    fn summarise(&mut self) {
        let (now, last) = (self.counters, self.last_summary);
        let secs = self.last_summary_at.elapsed().as_secs_f64().max(0.001);
        let moved = now.logins + now.resumes + now.failed_logins + now.registrations
            != last.logins + last.resumes + last.failed_logins + last.registrations;
        if moved {
            info!(
                "summary: relays {}, connections {}, logins {:.1}/s, resumes {:.1}/s, failed {:.1}/s, registrations {:.1}/s, queue {}",
                self.directory.links().len(),
                self.peers.len(),
                (now.logins - last.logins) as f64 / secs,
                (now.resumes - last.resumes) as f64 / secs,
                (now.failed_logins - last.failed_logins) as f64 / secs,
                (now.registrations - last.registrations) as f64 / secs,
                self.pool.queue_depth(),
            );
        }
        self.last_summary = now;
        self.last_summary_at = Instant::now();
    }

    fn drain_completions(&mut self) {
        while let Ok(done) = self.done_rx.try_recv() {
            self.complete(done);
        }
    }

    fn complete(&mut self, done: Done) {
        match done {
            Done::Registered { conn, req, user } => {
                info!("registered {user}");
                self.counters.registrations += 1;
                self.release(conn);
                self.send_client(conn, &AuthToClient::Registered { id: req, user });
            }
            Done::LoggedIn {
                conn,
                req,
                user,
                user_id,
                addr,
                credential,
            } => {
                self.limiter.succeeded(&user, addr);
                if credential.is_some() {
                    self.counters.logins += 1;
                } else {
                    self.counters.resumes += 1;
                }
                if self.peers.contains_key(&conn) {
                    self.dispatch_ticket(conn, req, user, user_id, credential);
                } else {
                    self.release(conn);
                }
            }
            Done::LoggedOut { conn, req } => {
                self.release(conn);
                self.send_client(conn, &AuthToClient::LoggedOut { id: req });
            }
            Done::PasswordChanged {
                conn,
                req,
                user,
                addr,
            } => {
                info!("{user} changed their password; resumption credentials revoked");
                self.limiter.succeeded(&user, addr);
                self.release(conn);
                self.send_client(conn, &AuthToClient::PasswordChanged { id: req });
            }
            Done::Refused {
                conn,
                req,
                code,
                message,
                login,
            } => {
                if let Some((user, addr)) = login {
                    info!("failed login for {user} from {addr}: {code:?}");
                    self.counters.failed_logins += 1;
                }
                self.release(conn);
                self.reply_error(conn, req, code, &message);
            }
        }
    }

    /// Periodic work: tickets whose relay did not confirm, limiter expiry.
    fn sweep(&mut self) {
        let now = Instant::now();
        let late: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(t, _)| t.clone())
            .collect();
        for ticket in late {
            if let Some(p) = self.pending.remove(&ticket) {
                warn!("relay did not confirm the ticket for {} in time", p.user);
                self.release(p.client);
                self.reply_error(
                    p.client,
                    p.req,
                    ErrorCode::NoRelay,
                    "the relay did not answer; try again",
                );
            }
        }
        self.limiter.expire(now);
        // Connections that never finished their handshake and hello (slowloris).
        let deadline = Duration::from_secs(self.cfg.auth_deadline_secs);
        let stalled: Vec<Token> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                matches!(
                    p.state,
                    PeerState::ClientAwaitingHello
                        | PeerState::RelayAwaitingHello
                        | PeerState::RelayAwaitingUp
                ) && now.duration_since(p.conn.opened) >= deadline
            })
            .map(|(t, _)| *t)
            .collect();
        for token in stalled {
            self.close(token, "no hello before the deadline");
        }
    }

    fn close(&mut self, token: Token, why: &str) {
        let Some(mut peer) = self.peers.remove(&token) else {
            return;
        };
        let _ = peer.conn.flush();
        peer.conn.deregister(self.poll.registry());
        self.touched.remove(&token);
        if let Some(entry) = self.directory.remove(token) {
            warn!("relay {} left rotation: {why}", entry.relay_id);
            self.broadcast_peers();
            // Logins waiting on that relay go to another one.
            let orphaned: Vec<String> = self
                .pending
                .iter()
                .filter(|(_, p)| p.relay == token)
                .map(|(t, _)| t.clone())
                .collect();
            for ticket in orphaned {
                if let Some(p) = self.pending.remove(&ticket) {
                    self.dispatch_ticket(p.client, p.req, p.user, p.user_id, p.credential);
                }
            }
        } else {
            fastchat_common::debug!("connection {} closed: {why}", peer.conn.peer);
        }
    }

    fn flush_touched(&mut self) {
        let touched: Vec<Token> = self.touched.drain().collect();
        for token in touched {
            let Some(peer) = self.peers.get_mut(&token) else {
                continue;
            };
            match peer.conn.flush_and_rearm(self.poll.registry(), token) {
                Err(e) => self.close(token, &e.to_string()),
                Ok(true) => self.close(token, "closed after an error"),
                Ok(false) => {}
            }
        }
    }
}

fn version_error(version: u32) -> ErrorFrame {
    ErrorFrame::new(
        None,
        ErrorCode::BadVersion,
        format!(
            "protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}"
        ),
    )
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

fn relay_frame_name(frame: &RelayToAuth) -> &'static str {
    match frame {
        RelayToAuth::Hello { .. } => "hello",
        RelayToAuth::RelayUp { .. } => "relay_up",
        RelayToAuth::Load { .. } => "load",
        RelayToAuth::TicketAccepted { .. } => "ticket_accepted",
        RelayToAuth::StatsRequest { .. } => "stats_request",
    }
}

/// The connection behind `token`, which the caller has just seen in the map.
fn peer_conn(peers: &mut HashMap<Token, Peer>, token: Token) -> &mut Connection {
    &mut peers
        .get_mut(&token)
        .expect("the caller looked this peer up in the same turn")
        .conn
}
