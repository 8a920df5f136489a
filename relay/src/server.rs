//! The relay on the shared reactor (`fastchat_common::reactor`): one thread owns both
//! listeners, every client connection, the mesh links and the control link to the auth
//! server; database work goes to the worker pool and comes back through the completion
//! channel and the waker.
//!
//! Client connection: `AwaitingHello → AwaitingAuth → Ready(Session)`, through
//! `Resuming` while a worker checks a resumption credential presented instead of a
//! ticket. A frame that does not fit the state gets an `error` frame and the
//! connection closes.

use crate::config::Config;
use crate::control::{Announcement, ControlLink, Phase};
use crate::files::FileOp;
use crate::groups::GroupOp;
use crate::mesh::{Mesh, MeshState};
use crate::session::{Next, Session};
use crate::store::{Done, Job, StoreMetrics, Stored, Target, Worker};
use crate::tickets::{Admission, TicketBook};
use fastchat_common::conn::{Accepted, Connection};
use fastchat_common::db::DbPool;
use fastchat_common::limits::{Bucket, FailureCounter};
use fastchat_common::noise::{Role, StaticKeypair, KEY_LEN};
use fastchat_common::pool::{Completions, WorkerPool};
use fastchat_common::proto::{
    valid_group_name, valid_user_name, AuthToRelay, ClientToRelay, ErrorCode, ErrorFrame,
    MeshFrame, RelayToAuth, RelayToClient,
};
use fastchat_common::reactor::{Accepting, Handler, Io, Link, Reactor};
use fastchat_common::{debug, hex, info, warn, PROTOCOL_VERSION};
use mio::{Token, Waker};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The `conn` of jobs no connection waits for (the file retention sweep).
const NO_CONN: Token = Token(usize::MAX);

/// How often the sweep runs (deadlines, idle sessions, slow readers).
const TICK: Duration = Duration::from_millis(500);

/// How often a busy relay logs a summary line.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(5);

/// Running totals for `stats` and the periodic summary.
#[derive(Default, Clone, Copy)]
struct Counters {
    /// `send` frames accepted.
    received: u64,
    /// `msg` frames pushed to local sessions.
    delivered: u64,
    /// Messages forwarded to other relays.
    forwarded: u64,
    /// Messages other relays forwarded to us.
    arrived: u64,
}

/// Most ids one `ack` may carry.
const MAX_ACK_IDS: usize = 10_000;

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
}

/// A frame of one of the relay's links.
pub(crate) enum Inbound {
    Client(ClientToRelay),
    Mesh(MeshFrame),
    Control(AuthToRelay),
}

/// The relay's listeners.
#[derive(Clone, Copy)]
pub(crate) enum Listening {
    Clients,
    Mesh,
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
    mesh_addr: String,
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
    /// Send budgets of users who sent lately (full buckets are forgotten).
    send_budgets: HashMap<i64, Bucket>,
    /// Refused resumption credentials per client address.
    resume_failures: FailureCounter<IpAddr>,
    /// The most client connections held at once.
    max_connections: usize,
    /// Connections closed at accept because the relay was full, since the last summary.
    refused: usize,
    /// When the file retention sweep last ran.
    last_file_sweep: Instant,
    /// Set once shutdown has begun: sessions end without per-user presence jobs.
    stopping: bool,
    mesh_addr: String,
    mesh: Mesh,
    metrics: Arc<StoreMetrics>,
    counters: Counters,
    last_summary: (Counters, u64, u64, u64),
    last_summary_at: Instant,
}

impl RelayServer {
    /// Binds the listeners and starts the worker pool.
    pub fn new(
        cfg: Config,
        db: DbPool,
        keypair: StaticKeypair,
        secret: [u8; KEY_LEN],
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<(RelayServer, SocketAddr, Arc<Waker>)> {
        let mut done = None;
        let (reactor, bound) = Reactor::new(
            cfg.max_frame,
            Duration::from_millis(100),
            TICK,
            vec![
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
            ],
            |waker| {
                let (tx, rx) = Completions::new(waker);
                done = Some(tx);
                rx
            },
        )?;
        let done = done.expect("Reactor::new makes the completion channel");
        let public_addr = cfg
            .public_addr
            .clone()
            .unwrap_or_else(|| bound[0].to_string());
        let mesh_addr = match &cfg.mesh_public_addr {
            Some(a) => a.clone(),
            None => bound[1].to_string(),
        };
        let metrics = Arc::new(StoreMetrics::default());
        let pool = WorkerPool::start("relay-worker", cfg.workers, cfg.max_batch, |_| {
            let mut worker = Worker::new(
                db.clone(),
                cfg.id.clone(),
                done.clone(),
                metrics.clone(),
                cfg.max_group_size,
                cfg.max_pending,
            );
            move |jobs| worker.run_batch(jobs)
        })?;
        let max_connections = cfg
            .max_connections
            .unwrap_or_else(fastchat_common::limits::default_max_connections);
        let mesh = Mesh::new(cfg.id.clone());
        let control = ControlLink::new(cfg.auth.clone());
        let resume_failures = FailureCounter::new(
            cfg.resume_failures_per_addr,
            Duration::from_secs(cfg.resume_failure_window_secs),
        );
        let waker = reactor.waker();
        let core = Core {
            cfg,
            public_addr,
            keypair,
            secret,
            local: HashMap::new(),
            pool,
            control,
            tickets: TicketBook::default(),
            db,
            ready_sessions: 0,
            uploads: HashMap::new(),
            send_budgets: HashMap::new(),
            resume_failures,
            max_connections,
            refused: 0,
            last_file_sweep: Instant::now(),
            stopping: false,
            mesh_addr: mesh_addr.clone(),
            mesh,
            metrics,
            counters: Counters::default(),
            last_summary: (Counters::default(), 0, 0, 0),
            last_summary_at: Instant::now(),
        };
        Ok((
            RelayServer {
                reactor,
                core,
                stop,
                mesh_addr,
            },
            bound[0],
            waker,
        ))
    }

    /// The address other relays reach this one at.
    pub fn mesh_addr(&self) -> &str {
        &self.mesh_addr
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
        core.pool.shutdown();
        reactor.drain_completions(core);
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
        match crate::store::clear_stale_presence(&core.db, &core.cfg.id) {
            Ok(n) => info!("stopped; cleared {n} presence rows"),
            Err(e) => warn!("stopped; could not clear presence rows (cleared at next start): {e}"),
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
        }
    }

    fn on_frame(&mut self, io: &mut Links, token: Token, frame: Inbound) {
        match frame {
            Inbound::Client(frame) => self.client_frame(io, token, frame),
            Inbound::Mesh(frame) => self.mesh_frame(io, token, frame),
            Inbound::Control(frame) => self.control_frame(io, frame),
        }
    }

    fn on_bad_stream(&mut self, io: &mut Links, token: Token, error: ErrorFrame) {
        match io.get(token).map(|l| &l.state) {
            Some(Peer::Client(_)) => self.fail(io, token, error),
            Some(Peer::Mesh) => self.fail_mesh(io, token, error),
            Some(Peer::Control) => self.control_down(io, &error.message),
            None => {}
        }
    }

    fn room(&self, io: &Links, _: Listening) -> usize {
        self.room(io)
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
                    io.add(conn, Peer::Client(ClientState::AwaitingHello));
                }
            }
            Listening::Mesh => {
                for conn in accepted.connections {
                    if let Some(token) = io.add(conn, Peer::Mesh) {
                        self.mesh.accepted(token);
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

    fn after_turn(&mut self, io: &mut Links) {
        self.report_load(io);
        if self.last_summary_at.elapsed() >= SUMMARY_INTERVAL {
            self.summarise();
        }
    }
}

impl Core {
    /// Client connections held (the table also holds mesh links and the control link).
    fn client_count(&self, io: &Links) -> usize {
        io.len() - self.mesh.links.len() - usize::from(self.control.token.is_some())
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
        let (rate, burst) = (self.cfg.send_rate, self.cfg.send_burst);
        self.send_budgets
            .retain(|_, budget| !budget.is_full(rate, burst, now));
        self.resume_failures.expire(now);
        // One pass over the clients: what each has outstayed, if anything.
        let idle = Duration::from_secs(self.cfg.idle_timeout_secs);
        let stall = Duration::from_secs(self.cfg.output_stall_secs);
        let deadline = Duration::from_secs(self.cfg.auth_deadline_secs);
        let mut closing: Vec<(Token, &str)> = Vec::new();
        for (token, link) in io.iter_mut() {
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

    fn maybe_connect_control(&mut self, io: &mut Links) {
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
            clients: self.clients_count(),
        };
        match self.control.connect(&self.secret, self.cfg.max_frame, &me) {
            Ok(conn) => match io.add(conn, Peer::Control) {
                Some(token) => self.control.token = Some(token),
                None => self.control_down(io, "cannot start the connection"),
            },
            Err(e) => {
                self.control.down(&e, now);
            }
        }
    }

    fn control_down(&mut self, io: &mut Links, why: &str) {
        if let Some(token) = self.control.down(why, Instant::now()) {
            io.remove(token);
        }
    }

    fn control_frame(&mut self, io: &mut Links, frame: AuthToRelay) {
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

    fn clients_count(&self) -> u32 {
        self.ready_sessions
    }

    /// Tells the auth server the client count when it changed.
    fn report_load(&mut self, io: &mut Links) {
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

    // ----- mesh ---------------------------------------------------------------------

    /// Dials the relays the mesh wants links to.
    fn dial_mesh(&mut self, io: &mut Links) {
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
                self.cfg.max_frame,
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

    fn fail_mesh(&mut self, io: &mut Links, token: Token, error: ErrorFrame) {
        if let Some(link) = io.get(token) {
            warn!(
                "closing mesh connection {}: {:?}: {}",
                link.conn.peer, error.code, error.message
            );
            io.fail(token, &MeshFrame::Error(error));
        }
    }

    fn mesh_frame(&mut self, io: &mut Links, token: Token, frame: MeshFrame) {
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
                    msg_id,
                    from,
                    group_id,
                    group,
                    body,
                    ts,
                    event,
                },
            ) => {
                self.counters.arrived += 1;
                self.deliver_local(
                    io,
                    recipient_id,
                    Stored {
                        msg_id,
                        from,
                        body,
                        ts,
                        group_id,
                        group,
                        event,
                    },
                );
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

    // ----- figures ------------------------------------------------------------------

    /// The figures `stats` reports.
    fn stats(&self, io: &Links) -> serde_json::Value {
        let m = &self.metrics;
        let batches = m.batches.load(Ordering::Relaxed);
        let c = self.counters;
        serde_json::json!({
            "server": "relay",
            "relay_id": self.cfg.id,
            "client_addr": self.public_addr,
            "mesh_addr": self.mesh_addr,
            "clients": self.clients_count(),
            "connections": self.client_count(io),
            "auth_link": self.control.describe(),
            "mesh": self.mesh.describe(),
            "received": c.received,
            "delivered": c.delivered,
            "forwarded": c.forwarded,
            "arrived": c.arrived,
            "stored": m.messages_stored.load(Ordering::Relaxed),
            "batches": batches,
            "failed_batches": m.failed_batches.load(Ordering::Relaxed),
            "avg_batch": m.jobs.load(Ordering::Relaxed) as f64 / batches.max(1) as f64,
            "avg_commit_ms": m.commit_micros.load(Ordering::Relaxed) as f64 / 1000.0 / batches.max(1) as f64,
            "queue_depth": self.pool.queue_depth(),
        })
    }

    /// A one-line summary when something moved since the last one.
    fn summarise(&mut self) {
        let m = &self.metrics;
        let now = (
            self.counters,
            m.batches.load(Ordering::Relaxed),
            m.jobs.load(Ordering::Relaxed),
            m.commit_micros.load(Ordering::Relaxed),
        );
        let (last, last_batches, last_jobs, last_micros) = self.last_summary;
        let secs = self.last_summary_at.elapsed().as_secs_f64().max(0.001);
        let moved = now.1 != last_batches
            || now.0.delivered != last.delivered
            || now.0.arrived != last.arrived;
        if moved {
            let batches = (now.1 - last_batches).max(1) as f64;
            info!(
                "summary: clients {}, in {:.0}/s, out {:.0}/s, forwarded {:.0}/s, queue {}, batch {:.1}, commit {:.2} ms, mesh links {}",
                self.clients_count(),
                (now.0.received - last.received) as f64 / secs,
                (now.0.delivered - last.delivered) as f64 / secs,
                (now.0.forwarded - last.forwarded) as f64 / secs,
                self.pool.queue_depth(),
                (now.2 - last_jobs) as f64 / batches,
                (now.3 - last_micros) as f64 / 1000.0 / batches,
                self.mesh.links_up(),
            );
        }
        if self.refused > 0 {
            warn!(
                "full: closed {} new connections at once in the last {secs:.0} s (limit {})",
                std::mem::take(&mut self.refused),
                self.max_connections
            );
        }
        self.last_summary = now;
        self.last_summary_at = Instant::now();
    }

    // ----- clients ------------------------------------------------------------------

    /// Connections the relay may still take: clients and mesh links count against
    /// the same descriptor budget.
    fn room(&self, io: &Links) -> usize {
        self.max_connections
            .saturating_sub(self.client_count(io) + self.mesh.links.len())
    }

    /// Sends an error frame and closes the connection once it is written.
    fn fail(&mut self, io: &mut Links, token: Token, error: ErrorFrame) {
        if let Some((conn, _)) = client_ref(io, token) {
            warn!("closing {}: {:?}: {}", conn.peer, error.code, error.message);
            io.fail(token, &RelayToClient::Error(error));
        }
    }

    /// Makes `token` a session of the admitted user: welcome, then the backlog.
    fn admit(&mut self, io: &mut Links, token: Token, admission: Admission, receive: bool) {
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
    fn refuse_credential(&mut self, io: &mut Links, token: Token, user: &str) {
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

    fn send(&mut self, io: &mut Links, token: Token, frame: &RelayToClient) {
        io.send(token, frame);
    }

    fn reply_error(
        &mut self,
        io: &mut Links,
        token: Token,
        req: u64,
        code: ErrorCode,
        message: String,
    ) {
        self.send(
            io,
            token,
            &RelayToClient::Error(ErrorFrame::new(Some(req), code, message)),
        );
    }

    fn client_frame(&mut self, io: &mut Links, token: Token, frame: ClientToRelay) {
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
                        ErrorCode::TooLarge,
                        format!("message bodies are limited to {max} bytes"),
                    );
                }
                if body.contains('\0') {
                    return self.reply_error(
                        io,
                        token,
                        id,
                        ErrorCode::BadFrame,
                        "bodies may not contain NUL characters".into(),
                    );
                }
                let target = match (to, group_id) {
                    (Some(to), None) if valid_user_name(&to) => Target::User(to),
                    (Some(to), None) => {
                        return self.reply_error(
                            io,
                            token,
                            id,
                            ErrorCode::UnknownUser,
                            format!("there is no user called {to:?}"),
                        )
                    }
                    (None, Some(group_id)) => Target::Group(group_id),
                    _ => {
                        return self.reply_error(
                            io,
                            token,
                            id,
                            ErrorCode::BadFrame,
                            "a send names either `to` or `group_id`".into(),
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
                if let Err((code, message)) = self.check_file_op(user_id, &op) {
                    return self.reply_error(io, token, id, code, message);
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
                if let Err(message) = check_group_op(&op) {
                    return self.reply_error(io, token, id, ErrorCode::InvalidName, message);
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
                        ErrorCode::UnknownUser,
                        format!("there is no user called {user:?}"),
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
    fn check_file_op(&mut self, user_id: i64, op: &FileOp) -> Result<(), (ErrorCode, String)> {
        match op {
            FileOp::Begin {
                size,
                chunks,
                target,
            } => {
                if *size > self.cfg.max_file_size {
                    return Err((
                        ErrorCode::TooLarge,
                        format!(
                            "files are limited to {} MiB",
                            self.cfg.max_file_size / (1024 * 1024)
                        ),
                    ));
                }
                // Chunks of at least 1 KiB: a bound on rows per file.
                if u64::from(*chunks) > size / 1024 + 1 {
                    return Err((ErrorCode::BadFrame, "too many chunks for the size".into()));
                }
                if let Target::User(to) = target {
                    if !valid_user_name(to) {
                        return Err((
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
                    return Err((
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
            FileOp::Put { data, .. } if data.contains('\0') => Err((
                ErrorCode::BadFrame,
                "chunks may not contain NUL characters".into(),
            )),
            _ => Ok(()),
        }
    }

    fn submit(&mut self, job: Job) {
        let shard = job.shard();
        if !self.pool.submit(shard, job) {
            warn!("worker pool is stopped; job dropped");
        }
    }

    fn complete(&mut self, io: &mut Links, done: Done) {
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
                user,
                user_id,
            } => {
                let Some((_, ClientState::Resuming { receive })) = client_ref(io, conn) else {
                    return; // closed meanwhile
                };
                let receive = *receive;
                match user_id {
                    Some(user_id) => self.admit(io, conn, Admission { user, user_id }, receive),
                    None => self.refuse_credential(io, conn, &user),
                }
            }
            Done::LoginFailed { conn } => self.fail(
                io,
                conn,
                ErrorFrame::new(
                    None,
                    ErrorCode::StoreFailed,
                    "the message store is unavailable; log in again later",
                ),
            ),
            Done::Sent {
                conn,
                req,
                msg_id,
                ts,
                deliveries,
            } => {
                self.send(
                    io,
                    conn,
                    &RelayToClient::Sent {
                        id: req,
                        msg_id,
                        ts,
                    },
                );
                self.route(io, deliveries);
            }
            Done::Frames { conn, frames } => {
                for frame in &frames {
                    self.send(io, conn, frame);
                }
            }
            Done::Group {
                conn,
                reply,
                deliveries,
            } => {
                self.send(io, conn, &reply);
                self.route(io, deliveries);
            }
            Done::Failed {
                conn,
                req,
                code,
                message,
            } => self.reply_error(io, conn, req, code, message),
            Done::Key {
                conn,
                req,
                user,
                pubkey,
            } => match pubkey {
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
                    ErrorCode::UnknownUser,
                    format!("there is no user called {user}"),
                ),
            },
        }
    }

    /// Every live session re-reads what is stored for it: messages another relay
    /// committed but could not forward (it died, or the link was down) arrive now
    /// rather than at the next login. Clients drop what they already have.
    fn catch_up_all(&mut self, io: &mut Links) {
        if self.stopping {
            return;
        }
        let sessions: Vec<(Token, i64)> = io
            .iter()
            .filter_map(|(t, l)| match &l.state {
                Peer::Client(ClientState::Ready(s)) if s.receive && !s.in_backlog() => {
                    Some((t, s.user_id))
                }
                _ => None,
            })
            .collect();
        if !sessions.is_empty() {
            info!(
                "catching up {} sessions after a mesh change",
                sessions.len()
            );
        }
        for (conn, user_id) in sessions {
            self.submit(Job::CatchUp {
                conn,
                user_id,
                limit: self.cfg.page_size,
            });
        }
    }

    /// Pushes stored messages to their recipients' sessions, here and on other relays.
    fn route(&mut self, io: &mut Links, deliveries: Vec<crate::store::Delivery>) {
        for d in deliveries {
            for relay in &d.remote_relays {
                self.forward(io, relay, d.recipient_id, &d.message);
            }
            self.deliver_local(io, d.recipient_id, d.message);
        }
    }

    /// Sends a stored message to the relay where its recipient has a session. Without a
    /// link it simply waits in the table for the recipient's next login.
    fn forward(&mut self, io: &mut Links, relay: &str, recipient_id: i64, m: &Stored) {
        let Some(token) = self.mesh.route(relay) else {
            debug!(
                "no link to {relay}: message {} waits in the store",
                m.msg_id
            );
            return;
        };
        if io.send(
            token,
            &MeshFrame::Deliver {
                recipient_id,
                msg_id: m.msg_id,
                from: m.from.clone(),
                group_id: m.group_id,
                group: m.group.clone(),
                body: m.body.clone(),
                ts: m.ts,
                event: m.event.clone(),
            },
        ) {
            self.counters.forwarded += 1;
        }
    }

    /// Pushes a freshly stored message to the recipient's sessions on this relay.
    fn deliver_local(&mut self, io: &mut Links, recipient_id: i64, message: Stored) {
        let Some(tokens) = self.local.get(&recipient_id) else {
            return;
        };
        for token in tokens.clone() {
            let live = match client_mut(io, token) {
                Some(ClientMut {
                    state: ClientState::Ready(session),
                    ..
                }) => session.live(message.clone()),
                _ => None,
            };
            if let Some(m) = live {
                io.send(token, &deliver(m));
                self.counters.delivered += 1;
            }
        }
    }

    fn close(&mut self, io: &mut Links, token: Token, why: &str) {
        let Some(link) = io.remove(token) else {
            return;
        };
        let peer = link.conn.peer;
        if let Some(mesh_link) = self.mesh.link_closed(token, Instant::now()) {
            match mesh_link.state {
                MeshState::Up(id) => {
                    warn!("mesh link to {id} closed: {why}");
                    self.catch_up_all(io);
                }
                _ => debug!("mesh connection {peer} closed: {why}"),
            }
            return;
        }
        let Peer::Client(state) = link.state else {
            return;
        };
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

fn deliver(m: Stored) -> RelayToClient {
    RelayToClient::Msg {
        msg_id: m.msg_id,
        from: m.from,
        group_id: m.group_id,
        group: m.group,
        body: m.body,
        ts: m.ts,
        event: m.event,
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
fn check_group_op(op: &GroupOp) -> Result<(), String> {
    match op {
        GroupOp::Create { name } if !valid_group_name(name) => {
            Err("group names are 1-64 characters without control characters or outer spaces".into())
        }
        GroupOp::Add { user, .. }
        | GroupOp::Remove { user, .. }
        | GroupOp::Promote { user, .. }
            if !valid_user_name(user) =>
        {
            Err(format!("there is no user called {user:?}"))
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
            || statement.len() > crate::groups::MAX_STATEMENT_BYTES =>
        {
            Err(
                "a roster statement needs seq >= 0, prev and hash of 64 hex and at most 8 KiB"
                    .into(),
            )
        }
        GroupOp::Roster { from_seq, .. } if *from_seq < 0 => Err("from_seq must be >= 0".into()),
        _ => Ok(()),
    }
}

/// 64 lowercase hex characters (a SHA-256).
fn is_hash(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Relay ids: letters, digits, '_', '.', '-', 1–64 characters.
fn valid_relay_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}
