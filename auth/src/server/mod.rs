//! The auth server on the shared reactor (`fastchat_common::reactor`): one thread owns
//! both listeners and every connection; password hashing and database work go to the
//! worker pool and come back through the completion channel and the waker.
//!
//! Client connection: `AwaitingHello → Ready`; a login that passes becomes a ticket
//! pushed to the least-loaded relay, and only when that relay confirms it does the
//! client get its `redirect` ([`clients`]). Relay control link: `AwaitingHello →
//! AwaitingUp → Up`, in rotation while up ([`relays`]). Figures: [`figures`].

mod clients;
mod figures;
mod relays;
#[cfg(test)]
mod tests;

use crate::accounts::{Credential, Done, Job, Worker};
use crate::budgets::{BudgetLimits, Budgets};
use crate::config::Config;
use crate::directory::RelayDirectory;
use crate::ratelimit::{Limits, LoginLimiter};
use fastchat_common::conn::{Accepted, Connection};
use fastchat_common::db::DbPool;
use fastchat_common::limits::PerAddr;
use fastchat_common::noise::{StaticKeypair, KEY_LEN};
use fastchat_common::pool::{Alive, WorkerPool};
use fastchat_common::proto::{
    AuthToClient, AuthToRelay, ClientToAuth, ErrorCode, ErrorFrame, Refusal, RelayToAuth,
};
use fastchat_common::reactor::{Accepting, Handler, Io, Reactor};
use fastchat_common::{info, warn, PROTOCOL_VERSION};
use figures::Counters;
use mio::{Token, Waker};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most connections on the stats port at once.
const MAX_STATS_LINKS: usize = 16;

/// How often the sweep runs (tickets not confirmed, handshake deadlines).
const TICK: Duration = Duration::from_millis(250);

/// What a connection is, and how far it has come.
pub(crate) enum PeerState {
    ClientAwaitingHello,
    ClientReady {
        in_flight: u32,
        /// Shared with this connection's jobs: ended when it closes, so workers skip
        /// them.
        alive: Alive,
    },
    RelayAwaitingHello,
    RelayAwaitingUp,
    RelayUp,
    /// An operator tool on the stats port: `hello`, then `stats_request`s only.
    StatsAwaitingHello,
    Stats,
}

impl PeerState {
    fn is_client(&self) -> bool {
        matches!(
            self,
            PeerState::ClientAwaitingHello | PeerState::ClientReady { .. }
        )
    }
}

/// A frame of either link.
pub(crate) enum Inbound {
    Client(ClientToAuth),
    Relay(RelayToAuth),
}

/// The two listeners.
#[derive(Clone, Copy)]
pub(crate) enum Listening {
    Clients,
    Relays,
    Stats,
}

/// A login waiting for its relay to confirm the ticket.
pub(crate) struct PendingRedirect {
    client: Token,
    req: u64,
    user: String,
    user_id: i64,
    relay: Token,
    deadline: Instant,
    credential: Option<Credential>,
}

/// Addresses the server is listening on, once bound.
pub struct Bound {
    pub clients: SocketAddr,
    pub relays: SocketAddr,
    /// The stats port, when there is a stats secret.
    pub stats: Option<SocketAddr>,
}

/// The running auth server: the reactor and the server's logic on it.
pub struct AuthServer {
    reactor: Reactor<Core>,
    core: Core,
    stop: Arc<AtomicBool>,
}

/// Everything but the connections.
pub(crate) struct Core {
    cfg: Config,
    pool: WorkerPool<Job>,
    directory: RelayDirectory,
    limiter: LoginLimiter,
    pending: HashMap<String, PendingRedirect>,
    counters: Counters,
    last_summary: Counters,
    last_summary_at: Instant,
    /// The most connections (clients and relays) held at once.
    max_connections: usize,
    /// Registrations and password attempts per address.
    budgets: Budgets,
    /// Client connections per address (capped).
    per_addr: PerAddr,
    /// When the server last warned that it was full.
    full_warned_at: Option<Instant>,
}

type Peers = Io<PeerState>;

impl AuthServer {
    /// Binds the listeners and starts the worker pool.
    pub fn new(
        cfg: Config,
        db: DbPool,
        keypair: StaticKeypair,
        secret: [u8; KEY_LEN],
        stats_secret: Option<[u8; KEY_LEN]>,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<(AuthServer, Bound, Arc<Waker>)> {
        let mut listeners = vec![
            (
                cfg.listen.as_str(),
                Accepting::Nx(keypair),
                Listening::Clients,
            ),
            (
                cfg.relay_listen.as_str(),
                Accepting::Psk(secret),
                Listening::Relays,
            ),
        ];
        if let Some(stats) = stats_secret {
            listeners.push((
                cfg.common.stats_listen.as_str(),
                Accepting::Psk(stats),
                Listening::Stats,
            ));
        }
        let (reactor, bound, done) = Reactor::new(cfg.common.max_frame, TICK, TICK, listeners)?;
        let resume_ttl = Duration::from_secs(cfg.resume_ttl_secs);
        let pool = WorkerPool::bounded(
            "auth-worker",
            cfg.workers,
            16,
            Some(cfg.queue_per_worker),
            |_| {
                let mut worker = Worker::new(db.clone(), done.clone(), resume_ttl);
                move |jobs| worker.run_batch(jobs)
            },
        )?;
        let waker = reactor.waker();
        let core = Core::new(cfg, pool);
        let bound = Bound {
            clients: bound[0],
            relays: bound[1],
            stats: bound.get(2).copied(),
        };
        Ok((
            AuthServer {
                reactor,
                core,
                stop,
            },
            bound,
            waker,
        ))
    }

    /// Runs until the stop flag is set, then finishes the jobs in flight and returns.
    pub fn run(mut self) -> std::io::Result<()> {
        self.reactor.run(&mut self.core, &self.stop)?;
        self.shut_down();
        Ok(())
    }

    fn shut_down(mut self) {
        info!("stopping: no new connections, finishing jobs in flight");
        let (reactor, core) = (&mut self.reactor, &mut self.core);
        core.pool.shutdown();
        while let Ok(done) = reactor.completions().try_recv() {
            match done {
                Done::LoggedIn { conn, req, .. } => core.reply_error(
                    &mut reactor.io,
                    conn,
                    req,
                    ErrorCode::NoRelay,
                    "the auth server is shutting down; try again",
                ),
                other => core.complete(&mut reactor.io, other),
            }
        }
        reactor.flush(core);
        info!("stopped");
    }
}

impl Core {
    /// The server's logic with no connection yet; `pool` takes its jobs.
    pub(crate) fn new(cfg: Config, pool: WorkerPool<Job>) -> Core {
        let limiter = LoginLimiter::new(Limits {
            per_user_addr: cfg.login_failures_per_user,
            per_addr: cfg.login_failures_per_addr,
            per_user: cfg.login_failures_per_user_everywhere,
            pace: Duration::from_millis(cfg.login_pace_ms),
            window: Duration::from_secs(cfg.login_failure_window_secs),
        });
        Core {
            pool,
            directory: RelayDirectory::default(),
            limiter,
            pending: HashMap::new(),
            counters: Counters::default(),
            last_summary: Counters::default(),
            last_summary_at: Instant::now(),
            max_connections: cfg
                .common
                .max_connections
                .unwrap_or_else(fastchat_common::limits::default_max_connections),
            full_warned_at: None,
            budgets: Budgets::new(
                BudgetLimits {
                    registrations_per_addr_per_minute: cfg.registrations_per_addr_per_minute,
                    registrations_per_second: cfg.registrations_per_second,
                    password_attempts_per_addr_per_minute: cfg
                        .password_attempts_per_addr_per_minute,
                },
                Instant::now(),
            ),
            per_addr: PerAddr::new(cfg.max_connections_per_addr),
            cfg,
        }
    }
}

impl Handler for Core {
    type State = PeerState;
    type Frame = Inbound;
    type Done = Done;
    type Listener = Listening;

    fn decode(state: &PeerState, conn: &mut Connection) -> Option<Result<Inbound, ErrorFrame>> {
        if state.is_client() {
            conn.next_message().map(|r| r.map(Inbound::Client))
        } else {
            conn.next_message().map(|r| r.map(Inbound::Relay))
        }
    }

    fn on_frame(&mut self, io: &mut Peers, token: Token, frame: Inbound) {
        match frame {
            Inbound::Client(frame) => self.client_frame(io, token, frame),
            Inbound::Relay(frame) => self.relay_frame(io, token, frame),
        }
    }

    /// Sends the error and closes the connection once it is written.
    fn on_bad_stream(&mut self, io: &mut Peers, token: Token, error: ErrorFrame) {
        self.fail(io, token, error);
    }

    fn room(&self, io: &Peers, listener: Listening) -> usize {
        let room = self.max_connections.saturating_sub(io.len());
        if let Listening::Stats = listener {
            // Operator tools: a few at once are plenty (counted only when one comes).
            let held = io
                .iter()
                .filter(|(_, p)| {
                    matches!(p.state, PeerState::StatsAwaitingHello | PeerState::Stats)
                })
                .count();
            return room.min(MAX_STATS_LINKS.saturating_sub(held));
        }
        room
    }

    fn on_accept(&mut self, io: &mut Peers, listener: Listening, accepted: Accepted) {
        if accepted.refused > 0
            && self
                .full_warned_at
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            self.full_warned_at = Some(Instant::now());
            warn!(
                "full ({} connections, limit {}): closing new connections at once",
                io.len(),
                self.max_connections
            );
        }
        for conn in accepted.connections {
            match listener {
                Listening::Clients => {
                    let state = PeerState::ClientAwaitingHello;
                    if !io.add_counted(&mut self.per_addr, conn, state) {
                        self.counters.refused_per_addr += 1;
                    }
                }
                Listening::Relays => drop(io.add(conn, PeerState::RelayAwaitingHello)),
                Listening::Stats => drop(io.add(conn, PeerState::StatsAwaitingHello)),
            }
        }
    }

    fn on_close(&mut self, io: &mut Peers, token: Token, why: &str) {
        self.close(io, token, why);
    }

    fn on_completion(&mut self, io: &mut Peers, done: Done) {
        self.complete(io, done);
    }

    fn on_tick(&mut self, io: &mut Peers, now: Instant) {
        self.sweep(io, now);
    }

    fn after_turn(&mut self, io: &mut Peers) {
        self.summarise_when_due(io);
    }
}

impl Core {
    /// Sends an error and closes the connection once it is written.
    fn fail(&mut self, io: &mut Peers, token: Token, error: ErrorFrame) {
        let Some(peer) = io.get(token) else {
            return;
        };
        warn!(
            "closing {}: {:?}: {}",
            peer.conn.peer, error.code, error.message
        );
        if peer.state.is_client() {
            io.fail(token, &AuthToClient::Error(error));
        } else {
            io.fail(token, &AuthToRelay::Error(error));
        }
    }

    fn reply_error(
        &mut self,
        io: &mut Peers,
        token: Token,
        req: u64,
        code: ErrorCode,
        message: &str,
    ) {
        self.refuse(io, token, req, Refusal::new(code, message));
    }

    /// Answers request `req` with the refusal's `error` frame.
    fn refuse(&mut self, io: &mut Peers, token: Token, req: u64, why: Refusal) {
        io.send(token, &AuthToClient::Error(why.into_frame(Some(req))));
    }

    /// Periodic work: tickets whose relay did not confirm, limiter expiry, handshake
    /// deadlines.
    fn sweep(&mut self, io: &mut Peers, now: Instant) {
        let late: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(t, _)| t.clone())
            .collect();
        for ticket in late {
            if let Some(p) = self.pending.remove(&ticket) {
                warn!("relay did not confirm the ticket for {} in time", p.user);
                self.release(io, p.client);
                self.reply_error(
                    io,
                    p.client,
                    p.req,
                    ErrorCode::NoRelay,
                    "the relay did not answer; try again",
                );
            }
        }
        self.limiter.expire(now);
        self.budgets.expire(now);
        // Connections that never finished their handshake and hello (slowloris), and
        // clients past the session deadline (a login takes seconds; an idle socket
        // would only hold a place another client needs).
        let deadline = Duration::from_secs(self.cfg.common.auth_deadline_secs);
        let session = Duration::from_secs(self.cfg.session_deadline_secs);
        let stalled: Vec<(Token, &str)> = io
            .iter()
            .filter_map(|(t, p)| {
                let age = now.duration_since(p.conn.opened);
                match p.state {
                    PeerState::ClientAwaitingHello
                    | PeerState::RelayAwaitingHello
                    | PeerState::RelayAwaitingUp
                    | PeerState::StatsAwaitingHello
                        if age >= deadline =>
                    {
                        Some((t, "no hello before the deadline"))
                    }
                    PeerState::ClientReady { .. } if age >= session => {
                        Some((t, "open for longer than the session deadline"))
                    }
                    _ => None,
                }
            })
            .collect();
        for (token, why) in stalled {
            self.close(io, token, why);
        }
    }

    /// Takes the connection out; a relay's leaves rotation and its waiting logins go
    /// to another relay.
    fn close(&mut self, io: &mut Peers, token: Token, why: &str) {
        let Some(peer) = io.remove(token) else {
            return;
        };
        if peer.state.is_client() {
            self.per_addr.disconnect(peer.conn.peer.ip());
        }
        if let PeerState::ClientReady { alive, .. } = &peer.state {
            alive.end();
        }
        if !self.relay_closed(io, token, why) {
            fastchat_common::debug!("connection {} closed: {why}", peer.conn.peer);
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
