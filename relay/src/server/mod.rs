//! The relay on the shared reactor (`fastchat_common::reactor`): one thread owns both
//! listeners, every client connection, the mesh links and the control link to the auth
//! server; database work goes to the worker pool and comes back through the completion
//! channel and the waker.
//!
//! Files: [`clients`] (the client link's frames, checked before they become jobs),
//! [`completions`] (what workers' results mean for connections), [`routing`] (where a
//! stored message goes), [`from_memory`] (direct messages delivered before they are
//! stored, answered on the recipient's ack), [`mesh_links`] (links to other relays), [`auth_link`] (the
//! control link to the auth server), [`figures`] (stats and the summary line); this
//! file: the connection kinds, setup and shutdown, the reactor hooks, the sweep, close.
//!
//! Client connection: `AwaitingHello → AwaitingAuth → Ready(Session)`, through
//! `Resuming` while a worker checks a resumption credential presented instead of a
//! ticket. A frame that does not fit the state gets an `error` frame and the
//! connection closes.

mod auth_link;
mod budgets;
mod clients;
mod completions;
mod figures;
mod from_memory;
mod mesh_links;
mod routing;
#[cfg(test)]
mod tests;

use crate::config::Config;
use crate::control::{Announcement, ControlLink, Phase};
use crate::holds::Holds;
use crate::mesh::{Mesh, MeshState};
use crate::message::{Message, Target};
use crate::session::{Next, Session};
use crate::tickets::{Admission, TicketBook};
use crate::worker::blocks::BlockOp;
use crate::worker::files::FileOp;
use crate::worker::groups::GroupOp;
use crate::worker::{Done, Job, StoreMetrics, Worker};
use fastchat_common::conn::{Accepted, Connection};
use fastchat_common::db::DbPool;
use fastchat_common::limits::{client_key, Bucket, FailureCounter, PerAddr};
use fastchat_common::noise::{Role, StaticKeypair, KEY_LEN};
use fastchat_common::pool::WorkerPool;
use fastchat_common::proto::{
    is_delivery_id, valid_group_name, valid_user_name, AuthToRelay, ClientToRelay, ErrorCode,
    ErrorFrame, MeshFrame, Refusal, RelayToAuth, RelayToClient,
};
use fastchat_common::reactor::{Accepting, Handler, Io, Link, Reactor};
use fastchat_common::{debug, hex, info, warn, PROTOCOL_VERSION};
use figures::{Counters, SUMMARY_INTERVAL};
use mio::{Token, Waker};
use routing::deliver;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The `conn` of jobs no connection waits for (the file retention sweep).
const NO_CONN: Token = Token(usize::MAX);

/// Most connections on the stats port at once.
const MAX_STATS_LINKS: usize = 16;

/// How often the sweep runs (deadlines, idle sessions, slow readers).
const TICK: Duration = Duration::from_millis(500);

pub(crate) enum ClientState {
    AwaitingHello,
    AwaitingAuth,
    /// A `resume`'s credential is being checked by a worker.
    Resuming {
        receive: bool,
    },
    Ready(Box<Session>),
}

/// What a connection of the relay is: a client's, a mesh link (its state is in
/// [`Mesh`]), or the control link to the auth server (its state is in
/// [`ControlLink`]).
pub(crate) enum Peer {
    Client(ClientState),
    Mesh,
    Control,
    /// An operator tool on the stats port (`true` once it has said `hello`): it may ask
    /// for figures and nothing else.
    Stats(bool),
}

/// A frame of one of the relay's links.
pub(crate) enum Inbound {
    Client(ClientToRelay),
    Mesh(MeshFrame),
    Control(AuthToRelay),
    /// On the stats port: mesh frames, of which only `hello` and `stats_request` pass.
    Stats(MeshFrame),
}

/// The relay's listeners.
#[derive(Clone, Copy)]
pub(crate) enum Listening {
    Clients,
    Mesh,
    Stats,
}

/// The reactor's table of the relay's connections.
type Links = Io<Peer>;

/// A client connection, seen through the table.
struct ClientMut<'a> {
    conn: &'a mut Connection,
    state: &'a mut ClientState,
}

fn client_mut(io: &mut Links, token: Token) -> Option<ClientMut<'_>> {
    match io.get_mut(token)? {
        Link {
            conn,
            state: Peer::Client(state),
        } => Some(ClientMut { conn, state }),
        _ => None,
    }
}

fn client_ref(io: &Links, token: Token) -> Option<(&Connection, &ClientState)> {
    match io.get(token)? {
        Link {
            conn,
            state: Peer::Client(state),
        } => Some((conn, state)),
        _ => None,
    }
}

/// The running relay: the reactor and the relay's logic on it.
pub struct RelayServer {
    reactor: Reactor<Core>,
    core: Core,
    stop: Arc<AtomicBool>,
    /// Builds a worker like the pool's (for the shutdown's last batch).
    make_worker: Box<dyn Fn() -> Worker + Send>,
}

/// Everything but the connections.
pub(crate) struct Core {
    cfg: Config,
    public_addr: String,
    keypair: StaticKeypair,
    secret: [u8; KEY_LEN],
    /// Sessions of each user on this relay.
    local: HashMap<i64, Vec<Token>>,
    pool: WorkerPool<Job>,
    control: ControlLink,
    tickets: TicketBook,
    db: DbPool,
    /// Authenticated sessions (kept as a count: it is read every poll turn).
    ready_sessions: u32,
    /// Uploads started per user in the current minute: (window start, count).
    uploads: HashMap<i64, (Instant, u32)>,
    /// Budgets of users who sent lately (full ones are forgotten; see `budgets`).
    budgets: HashMap<i64, budgets::Budget>,
    /// Refused resumption credentials per client address.
    resume_failures: FailureCounter<IpAddr>,
    /// The most client connections held at once.
    max_connections: usize,
    /// Connections closed at accept because the relay was full, since the last summary.
    refused: usize,
    /// Client connections per address (capped).
    per_addr: PerAddr,
    /// When the file retention sweep last ran.
    last_file_sweep: Instant,
    /// Set once shutdown has begun: sessions end without per-user presence jobs.
    stopping: bool,
    mesh_addr: String,
    /// Where operator tools reach the stats port, if there is one.
    stats_addr: Option<String>,
    /// Connections on the stats port.
    stats_links: usize,
    mesh: Mesh,
    metrics: Arc<StoreMetrics>,
    counters: Counters,
    last_summary: (Counters, u64, u64, u64),
    last_summary_at: Instant,
    /// Direct messages delivered from memory, waiting for their recipients' acks.
    holds: Holds,
    /// Whether workers may decide to deliver from memory (shared with them).
    holding: Arc<AtomicBool>,
    /// Set once the pool has stopped (shutdown): stores still due wait here for the
    /// last batch.
    unstored: Option<Vec<Job>>,
}

impl RelayServer {
    /// Binds the listeners and starts the worker pool; `epoch`: this run's delivery
    /// id epoch ([`crate::worker::delivery_epoch`]).
    pub fn new(
        cfg: Config,
        epoch: i64,
        db: DbPool,
        keypair: StaticKeypair,
        secret: [u8; KEY_LEN],
        stats_secret: Option<[u8; KEY_LEN]>,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<(RelayServer, SocketAddr, Arc<Waker>)> {
        let mut listeners = vec![
            (
                cfg.listen.as_str(),
                Accepting::Nk(keypair.clone()),
                Listening::Clients,
            ),
            (
                cfg.mesh_listen.as_str(),
                Accepting::Psk(secret),
                Listening::Mesh,
            ),
        ];
        if let Some(stats) = stats_secret {
            listeners.push((
                cfg.common.stats_listen.as_str(),
                Accepting::Psk(stats),
                Listening::Stats,
            ));
        }
        let (reactor, bound, done) = Reactor::new(
            cfg.common.max_frame,
            Duration::from_millis(100),
            TICK,
            listeners,
        )?;
        let public_addr = cfg
            .public_addr
            .clone()
            .unwrap_or_else(|| bound[0].to_string());
        let mesh_addr = match &cfg.mesh_public_addr {
            Some(a) => a.clone(),
            None => bound[1].to_string(),
        };
        let metrics = Arc::new(StoreMetrics::default());
        let window = Duration::from_millis(cfg.delivery_window_ms);
        let holding = Arc::new(AtomicBool::new(!window.is_zero()));
        let make_worker = {
            let (db, cfg, done, metrics, holding) = (
                db.clone(),
                cfg.clone(),
                done.clone(),
                metrics.clone(),
                holding.clone(),
            );
            move || {
                Worker::new(
                    db.clone(),
                    cfg.id.clone(),
                    done.clone(),
                    metrics.clone(),
                    crate::worker::groups::Limits {
                        group_size: cfg.max_group_size,
                        groups_per_user: cfg.max_groups_per_user,
                        invitations: cfg.max_invitations,
                    },
                    crate::worker::StoreLimits {
                        max_pending: cfg.max_pending,
                        max_pending_bytes: cfg.max_pending_bytes,
                        max_stored_bytes: cfg.max_stored_bytes_per_user,
                    },
                    holding.clone(),
                )
            }
        };
        let pool = WorkerPool::start("relay-worker", cfg.workers, cfg.max_batch, |_| {
            let mut worker = make_worker();
            move |jobs| worker.run_batch(jobs)
        })?;
        let waker = reactor.waker();
        let mut core = Core::new(
            cfg,
            Addresses {
                public: public_addr,
                mesh: mesh_addr,
                stats: bound.get(2).map(|a| a.to_string()),
            },
            keypair,
            secret,
            pool,
            db,
            metrics,
        );
        core.holds = Holds::new(window, epoch);
        core.holding = holding;
        Ok((
            RelayServer {
                reactor,
                core,
                stop,
                make_worker: Box::new(make_worker),
            },
            bound[0],
            waker,
        ))
    }

    /// The address other relays reach this one at.
    pub fn mesh_addr(&self) -> &str {
        &self.core.mesh_addr
    }

    /// The stats port's address, if there is one.
    pub fn stats_addr(&self) -> Option<&str> {
        self.core.stats_addr.as_deref()
    }

    /// Runs until the stop flag is set, then finishes the batches in flight, answers
    /// what they committed, and returns.
    pub fn run(mut self) -> std::io::Result<()> {
        self.reactor.run(&mut self.core, &self.stop)?;
        self.shut_down();
        Ok(())
    }

    fn shut_down(mut self) {
        info!("stopping: no new connections, finishing the batches in flight");
        let (reactor, core) = (&mut self.reactor, &mut self.core);
        // Nothing more is delivered from memory: what is held is stored by the
        // batches still to run, and what a running batch decided to hold by a last one.
        core.holding.store(false, Ordering::Relaxed);
        for held in core.holds.take_all() {
            core.store_held(held);
        }
        core.pool.shutdown();
        core.unstored = Some(Vec::new());
        reactor.drain_completions(core);
        let last = core.unstored.take().unwrap_or_default();
        if !last.is_empty() {
            info!("storing {} messages held at shutdown", last.len());
            (self.make_worker)().run_batch(last);
            reactor.drain_completions(core);
        }
        reactor.flush(core);
        core.flush_before_closing(&mut reactor.io, Duration::from_secs(2));
        core.stopping = true;
        let clients: Vec<Token> = reactor
            .io
            .iter()
            .filter(|(_, l)| matches!(l.state, Peer::Client(_)))
            .map(|(t, _)| t)
            .collect();
        for token in clients {
            core.close(&mut reactor.io, token, "relay stopping");
        }
        // The poll loop is done, so it may block now: nobody is on this relay any more.
        match crate::worker::clear_stale_presence(&core.db, &core.cfg.id) {
            Ok(n) => info!("stopped; cleared {n} presence rows"),
            Err(e) => warn!("stopped; could not clear presence rows (cleared at next start): {e}"),
        }
    }
}

/// Where clients and other relays reach this relay (as announced to the auth server).
pub(crate) struct Addresses {
    pub public: String,
    pub mesh: String,
    /// The stats port, when there is a stats secret.
    pub stats: Option<String>,
}

impl Core {
    /// The relay's logic with no connection yet: `pool` takes its jobs, `db` is used
    /// only at shutdown.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: Config,
        addresses: Addresses,
        keypair: StaticKeypair,
        secret: [u8; KEY_LEN],
        pool: WorkerPool<Job>,
        db: DbPool,
        metrics: Arc<StoreMetrics>,
    ) -> Core {
        let max_connections = cfg
            .common
            .max_connections
            .unwrap_or_else(fastchat_common::limits::default_max_connections);
        let mesh = Mesh::new(cfg.id.clone());
        let control = ControlLink::new(cfg.auth.clone());
        let per_addr = PerAddr::new(cfg.max_connections_per_addr);
        let resume_failures = FailureCounter::new(
            cfg.resume_failures_per_addr,
            Duration::from_secs(cfg.resume_failure_window_secs),
        );
        Core {
            cfg,
            public_addr: addresses.public,
            keypair,
            secret,
            local: HashMap::new(),
            pool,
            control,
            tickets: TicketBook::default(),
            db,
            ready_sessions: 0,
            uploads: HashMap::new(),
            budgets: HashMap::new(),
            resume_failures,
            max_connections,
            refused: 0,
            per_addr,
            last_file_sweep: Instant::now(),
            stopping: false,
            mesh_addr: addresses.mesh,
            stats_addr: addresses.stats,
            stats_links: 0,
            mesh,
            metrics,
            counters: Counters::default(),
            last_summary: (Counters::default(), 0, 0, 0),
            last_summary_at: Instant::now(),
            holds: Holds::new(Duration::ZERO, 0),
            holding: Arc::new(AtomicBool::new(false)),
            unstored: None,
        }
    }
}

impl Handler for Core {
    type State = Peer;
    type Frame = Inbound;
    type Done = Done;
    type Listener = Listening;

    fn decode(state: &Peer, conn: &mut Connection) -> Option<Result<Inbound, ErrorFrame>> {
        match state {
            Peer::Client(_) => conn.next_message().map(|r| r.map(Inbound::Client)),
            Peer::Mesh => conn.next_message().map(|r| r.map(Inbound::Mesh)),
            Peer::Control => conn.next_message().map(|r| r.map(Inbound::Control)),
            Peer::Stats(_) => conn.next_message().map(|r| r.map(Inbound::Stats)),
        }
    }

    fn on_frame(&mut self, io: &mut Links, token: Token, frame: Inbound) {
        match frame {
            Inbound::Client(frame) => self.client_frame(io, token, frame),
            Inbound::Mesh(frame) => self.mesh_frame(io, token, frame),
            Inbound::Control(frame) => self.control_frame(io, frame),
            Inbound::Stats(frame) => self.stats_frame(io, token, frame),
        }
    }

    fn on_bad_stream(&mut self, io: &mut Links, token: Token, error: ErrorFrame) {
        match io.get(token).map(|l| &l.state) {
            Some(Peer::Client(_)) => self.fail(io, token, error),
            Some(Peer::Mesh) => self.fail_mesh(io, token, error),
            Some(Peer::Control) => self.control_down(io, &error.message),
            Some(Peer::Stats(_)) => {
                io.fail(token, &MeshFrame::Error(error));
            }
            None => {}
        }
    }

    /// Connections the relay may still take: clients and mesh links count against
    /// the same descriptor budget.
    fn room(&self, io: &Links, listener: Listening) -> usize {
        if let Listening::Stats = listener {
            // Operator tools: a few at once are plenty.
            return MAX_STATS_LINKS.saturating_sub(self.stats_links);
        }
        self.max_connections
            .saturating_sub(self.client_count(io) + self.mesh.links.len())
    }

    fn on_accept(&mut self, io: &mut Links, listener: Listening, accepted: Accepted) {
        match listener {
            Listening::Clients => {
                if accepted.refused > 0 {
                    if self.refused == 0 {
                        warn!(
                            "full ({} connections): closing new connections at once",
                            self.client_count(io)
                        );
                    }
                    self.refused += accepted.refused;
                }
                for conn in accepted.connections {
                    let state = Peer::Client(ClientState::AwaitingHello);
                    if !io.add_counted(&mut self.per_addr, conn, state) {
                        self.refused += 1;
                    }
                }
            }
            Listening::Mesh => {
                for conn in accepted.connections {
                    if let Some(token) = io.add(conn, Peer::Mesh) {
                        self.mesh.accepted(token);
                    }
                }
            }
            Listening::Stats => {
                for conn in accepted.connections {
                    if io.add(conn, Peer::Stats(false)).is_some() {
                        self.stats_links += 1;
                    }
                }
            }
        }
    }

    fn on_close(&mut self, io: &mut Links, token: Token, why: &str) {
        if matches!(io.get(token).map(|l| &l.state), Some(Peer::Control)) {
            self.control_down(io, why);
        } else {
            self.close(io, token, why);
        }
    }

    fn on_completion(&mut self, io: &mut Links, done: Done) {
        self.complete(io, done);
    }

    fn on_tick(&mut self, io: &mut Links, _: Instant) {
        self.sweep(io);
    }

    fn before_poll(&mut self, io: &mut Links) {
        self.maybe_connect_control(io);
        self.dial_mesh(io);
    }

    fn wake_at(&self) -> Option<Instant> {
        self.holds.next_deadline()
    }

    fn after_turn(&mut self, io: &mut Links) {
        self.end_windows();
        self.report_load(io);
        if self.last_summary_at.elapsed() >= SUMMARY_INTERVAL {
            self.summarise();
        }
    }
}

impl Core {
    /// Client connections held (the table also holds mesh links and the control link).
    fn client_count(&self, io: &Links) -> usize {
        io.len()
            - self.mesh.links.len()
            - self.stats_links
            - usize::from(self.control.token.is_some())
    }

    /// At shutdown: gives clients up to `grace` to take what is queued for them (the
    /// last `sent` replies above all), so they need not resend what was committed. The
    /// poll loop is done, so waiting here blocks no one.
    fn flush_before_closing(&mut self, io: &mut Links, grace: Duration) {
        let deadline = Instant::now() + grace;
        loop {
            let mut waiting = false;
            for (_, link) in io.iter_mut() {
                if matches!(link.state, Peer::Client(_))
                    && link.conn.flush().is_ok()
                    && !link.conn.is_flushed()
                {
                    waiting = true;
                }
            }
            if !waiting || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Periodic work: expired tickets, connections that never logged in.
    fn sweep(&mut self, io: &mut Links) {
        let now = Instant::now();
        self.holds.tick(now);
        self.tickets.expire(now);
        self.uploads
            .retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(60));
        if now.duration_since(self.last_file_sweep) >= Duration::from_secs(60) {
            self.last_file_sweep = now;
            self.submit(Job::File {
                conn: NO_CONN,
                req: 0,
                user_id: 0,
                op: FileOp::Expire {
                    retention_secs: self.cfg.file_retention_secs,
                },
            });
        }
        self.forget_full_budgets(now);
        self.resume_failures.expire(now);
        // One pass over the clients: what each has outstayed, if anything.
        let idle = Duration::from_secs(self.cfg.idle_timeout_secs);
        let stall = Duration::from_secs(self.cfg.output_stall_secs);
        let deadline = Duration::from_secs(self.cfg.common.auth_deadline_secs);
        let mut closing: Vec<(Token, &str)> = Vec::new();
        for (token, link) in io.iter_mut() {
            if matches!(link.state, Peer::Stats(false))
                && now.duration_since(link.conn.opened) >= deadline
            {
                closing.push((token, "no hello before the deadline"));
            }
            let Peer::Client(state) = &mut link.state else {
                continue;
            };
            let conn = &link.conn;
            let mut held = 0;
            let why = match state {
                ClientState::Ready(session) => {
                    session.forget_backlog(now);
                    held = session.held_bytes();
                    if !idle.is_zero() && now.duration_since(conn.last_read) >= idle {
                        Some("silent for longer than the idle timeout")
                    } else {
                        None
                    }
                }
                _ if now.duration_since(conn.opened) >= deadline => {
                    Some("no ticket or introduction before the deadline")
                }
                _ => None,
            };
            // Clients that stopped reading: what they have not acknowledged stays
            // stored and comes at their next login. (Mesh links are never cut for this.)
            let waiting = conn.pending_output();
            let why = why
                .or_else(|| {
                    (waiting > self.cfg.max_output_bytes && conn.stalled_for() >= stall)
                        .then_some("not reading: too much output waiting")
                })
                .or_else(|| {
                    (waiting + held > self.cfg.hard_output_bytes)
                        .then_some("reading too slowly: more output waiting than the hard limit")
                });
            if let Some(why) = why {
                closing.push((token, why));
            }
        }
        closing.extend(self.mesh.links.iter().filter_map(|(t, l)| {
            (matches!(l.state, MeshState::AwaitingHello | MeshState::AwaitingIntro)
                && io
                    .get(*t)
                    .is_some_and(|c| now.duration_since(c.conn.opened) >= deadline))
            .then_some((*t, "no ticket or introduction before the deadline"))
        }));
        for (token, why) in closing {
            self.close(io, token, why);
        }
    }

    // ----- control link -------------------------------------------------------------

    // ----- mesh ---------------------------------------------------------------------

    // ----- figures ------------------------------------------------------------------

    // ----- clients ------------------------------------------------------------------

    fn submit(&mut self, job: Job) {
        let shard = job.shard();
        if !self.pool.submit(shard, job) {
            warn!("worker pool is stopped; job dropped");
        }
    }

    fn close(&mut self, io: &mut Links, token: Token, why: &str) {
        let Some(link) = io.remove(token) else {
            return;
        };
        let peer = link.conn.peer;
        if let Some(mesh_link) = self.mesh.link_closed(token, Instant::now()) {
            self.holds.link_closed(token);
            match mesh_link.state {
                MeshState::Up(id) => {
                    warn!("mesh link to {id} closed: {why}");
                    self.catch_up_all(io);
                }
                _ => debug!("mesh connection {peer} closed: {why}"),
            }
            return;
        }
        let state = match link.state {
            Peer::Client(state) => state,
            Peer::Stats(_) => {
                self.stats_links -= 1;
                return;
            }
            Peer::Mesh | Peer::Control => return,
        };
        self.per_addr.disconnect(peer.ip());
        if let ClientState::Ready(session) = state {
            self.ready_sessions = self.ready_sessions.saturating_sub(1);
            info!("{} disconnected: {why}", session.user);
            let user_id = session.user_id;
            let now_empty = match self.local.get_mut(&user_id) {
                Some(tokens) => {
                    tokens.retain(|t| *t != token);
                    tokens.is_empty()
                }
                None => true,
            };
            if now_empty {
                self.local.remove(&user_id);
                if !self.stopping {
                    self.submit(Job::Logout { user_id });
                }
            }
        } else {
            debug!("connection {peer} closed: {why}");
        }
    }
}
