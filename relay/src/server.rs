//! The relay's poll loop: one thread owns the client listener, every client connection
//! and the control link to the auth server; database work goes to the worker pool and
//! comes back through the completion channel and the waker.
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
use crossbeam_channel::Receiver;
use fastchat_common::conn::{accept_pending, Connection, ReadStatus};
use fastchat_common::db::DbPool;
use fastchat_common::limits::{Bucket, FailureCounter};
use fastchat_common::noise::{Role, StaticKeypair, KEY_LEN};
use fastchat_common::pool::{Completions, WorkerPool};
use fastchat_common::proto::{
    valid_group_name, valid_user_name, AuthToRelay, ClientToRelay, ErrorCode, ErrorFrame,
    MeshFrame, RelayToAuth, RelayToClient,
};
use fastchat_common::{debug, hex, info, warn, PROTOCOL_VERSION};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const CONTROL: Token = Token(2);
const MESH_LISTENER: Token = Token(3);
const FIRST_CLIENT: usize = 4;

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

enum ClientState {
    AwaitingHello,
    AwaitingAuth,
    /// A `resume`'s credential is being checked by a worker.
    Resuming {
        receive: bool,
    },
    Ready(Box<Session>),
}

struct Client {
    conn: Connection,
    state: ClientState,
}

/// The running relay.
pub struct RelayServer {
    cfg: Config,
    poll: Poll,
    listener: TcpListener,
    public_addr: String,
    keypair: StaticKeypair,
    secret: [u8; KEY_LEN],
    clients: HashMap<Token, Client>,
    /// Sessions of each user on this relay.
    local: HashMap<i64, Vec<Token>>,
    next_token: usize,
    pool: WorkerPool<Job>,
    done_rx: Receiver<Done>,
    control: ControlLink,
    tickets: TicketBook,
    touched: HashSet<Token>,
    scratch: Vec<u8>,
    stop: Arc<AtomicBool>,
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
    mesh_listener: TcpListener,
    mesh_addr: String,
    mesh: Mesh,
    metrics: Arc<StoreMetrics>,
    counters: Counters,
    last_summary: (Counters, u64, u64, u64),
    last_summary_at: Instant,
}

impl RelayServer {
    /// Binds the listener and starts the worker pool.
    pub fn new(
        cfg: Config,
        db: DbPool,
        keypair: StaticKeypair,
        secret: [u8; KEY_LEN],
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<(RelayServer, SocketAddr, Arc<Waker>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let addr: SocketAddr = cfg.listen.parse().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is not an IP:port address", cfg.listen),
            )
        })?;
        let mut listener = TcpListener::bind(addr)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let bound = listener.local_addr()?;
        let public_addr = cfg.public_addr.clone().unwrap_or_else(|| bound.to_string());
        let mesh_sockaddr: SocketAddr = cfg.mesh_listen.parse().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is not an IP:port address", cfg.mesh_listen),
            )
        })?;
        let mut mesh_listener = TcpListener::bind(mesh_sockaddr)?;
        poll.registry()
            .register(&mut mesh_listener, MESH_LISTENER, Interest::READABLE)?;
        let mesh_addr = match &cfg.mesh_public_addr {
            Some(a) => a.clone(),
            None => mesh_listener.local_addr()?.to_string(),
        };
        let (done, done_rx) = Completions::new(waker.clone());
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
        Ok((
            RelayServer {
                cfg,
                poll,
                listener,
                public_addr,
                keypair,
                secret,
                clients: HashMap::new(),
                local: HashMap::new(),
                next_token: FIRST_CLIENT,
                pool,
                done_rx,
                control,
                tickets: TicketBook::default(),
                touched: HashSet::new(),
                scratch: vec![0; 64 * 1024],
                stop,
                db,
                ready_sessions: 0,
                uploads: HashMap::new(),
                send_budgets: HashMap::new(),
                resume_failures,
                max_connections,
                refused: 0,
                last_file_sweep: Instant::now(),
                stopping: false,
                mesh_listener,
                mesh_addr,
                mesh,
                metrics,
                counters: Counters::default(),
                last_summary: (Counters::default(), 0, 0, 0),
                last_summary_at: Instant::now(),
            },
            bound,
            waker,
        ))
    }

    /// Runs until the stop flag is set, then finishes the batches in flight, answers
    /// what they committed, and returns.
    pub fn run(mut self) -> std::io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut last_sweep = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            self.maybe_connect_control();
            self.dial_mesh();
            if let Err(e) = self
                .poll
                .poll(&mut events, Some(Duration::from_millis(100)))
            {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    MESH_LISTENER => self.accept_mesh(),
                    WAKER => {}
                    CONTROL => self.control_ready(event.is_readable() || event.is_error()),
                    token if self.mesh.links.contains_key(&token) => {
                        self.mesh_ready(token, event.is_readable() || event.is_error())
                    }
                    token => self.client_ready(token, event.is_readable()),
                }
            }
            self.drain_completions();
            if last_sweep.elapsed() >= Duration::from_millis(500) {
                self.sweep();
                last_sweep = Instant::now();
            }
            self.report_load();
            self.flush_touched();
            if self.last_summary_at.elapsed() >= SUMMARY_INTERVAL {
                self.summarise();
            }
        }
        self.shut_down();
        Ok(())
    }

    fn shut_down(mut self) {
        info!("stopping: no new connections, finishing the batches in flight");
        let _ = self.poll.registry().deregister(&mut self.listener);
        let _ = self.poll.registry().deregister(&mut self.mesh_listener);
        self.pool.shutdown();
        self.drain_completions();
        self.flush_touched();
        self.flush_before_closing(Duration::from_secs(2));
        self.stopping = true;
        let tokens: Vec<Token> = self.clients.keys().copied().collect();
        for token in tokens {
            self.close(token, "relay stopping");
        }
        // The poll loop is done, so it may block now: nobody is on this relay any more.
        match crate::store::clear_stale_presence(&self.db, &self.cfg.id) {
            Ok(n) => info!("stopped; cleared {n} presence rows"),
            Err(e) => warn!("stopped; could not clear presence rows (cleared at next start): {e}"),
        }
    }

    /// At shutdown: gives clients up to `grace` to take what is queued for them (the
    /// last `sent` replies above all), so they need not resend what was committed. The
    /// poll loop is done, so waiting here blocks no one.
    fn flush_before_closing(&mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        loop {
            let mut waiting = false;
            for client in self.clients.values_mut() {
                if client.conn.flush().is_ok() && !client.conn.is_flushed() {
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
    fn sweep(&mut self) {
        let now = Instant::now();
        self.tickets.expire(now);
        self.uploads
            .retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(60));
        if now.duration_since(self.last_file_sweep) >= Duration::from_secs(60) {
            self.last_file_sweep = now;
            self.submit(Job::File {
                conn: LISTENER,
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
        for (token, client) in self.clients.iter_mut() {
            let conn = &client.conn;
            let mut held = 0;
            let why = match &mut client.state {
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
                closing.push((*token, why));
            }
        }
        closing.extend(self.mesh.links.iter().filter_map(|(t, l)| {
            (matches!(l.state, MeshState::AwaitingHello | MeshState::AwaitingIntro)
                && now.duration_since(l.conn.opened) >= deadline)
                .then_some((*t, "no ticket or introduction before the deadline"))
        }));
        for (token, why) in closing {
            self.close(token, why);
        }
    }

    // ----- control link -------------------------------------------------------------

    fn maybe_connect_control(&mut self) {
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
        if let Err(e) = self.control.connect(&self.secret, self.cfg.max_frame, &me) {
            self.control.down(&e, now);
            return;
        }
        let registry = self.poll.registry();
        let ok = self
            .control
            .conn
            .as_mut()
            .map(|c| c.flush().is_ok() && c.update_interest(registry, CONTROL).is_ok());
        if ok != Some(true) {
            self.control_down("cannot start the connection");
        }
    }

    fn control_down(&mut self, why: &str) {
        if let Some(mut conn) = self.control.down(why, Instant::now()) {
            conn.deregister(self.poll.registry());
        }
    }

    fn control_ready(&mut self, readable: bool) {
        let Some(conn) = self.control.conn.as_mut() else {
            return;
        };
        if readable {
            match conn.read_ready(&mut self.scratch) {
                Ok(ReadStatus::Open) => {}
                Ok(ReadStatus::Eof) => return self.control_down("closed by the auth server"),
                Err(e) => return self.control_down(&e.to_string()),
            }
        }
        loop {
            let Some(conn) = self.control.conn.as_mut() else {
                return;
            };
            match conn.next_message::<AuthToRelay>() {
                None => break,
                Some(Ok(frame)) => self.control_frame(frame),
                Some(Err(e)) => return self.control_down(&e.message),
            }
        }
        self.flush_control();
    }

    fn control_frame(&mut self, frame: AuthToRelay) {
        match frame {
            AuthToRelay::Hello { version } if version == PROTOCOL_VERSION => {}
            AuthToRelay::Hello { version } => {
                self.control_down(&format!("auth server speaks protocol {version}"))
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
                if let Some(conn) = self.control.conn.as_mut() {
                    conn.queue(&RelayToAuth::TicketAccepted { ticket });
                }
            }
            AuthToRelay::Peers { relays } => {
                let names: Vec<&str> = relays.iter().map(|r| r.relay_id.as_str()).collect();
                info!("relays in rotation: {names:?}");
                for token in self.mesh.set_peers(&relays, Instant::now()) {
                    self.close(token, "relay left the directory");
                }
            }
            AuthToRelay::Stats { .. } => {}
            AuthToRelay::Error(e) => {
                warn!("auth server refused us: {:?}: {}", e.code, e.message);
                self.control_down("refused by the auth server");
            }
        }
    }

    fn flush_control(&mut self) {
        let registry = self.poll.registry();
        let result = match self.control.conn.as_mut() {
            Some(conn) => conn.flush().map_err(|e| e.to_string()).and_then(|()| {
                conn.update_interest(registry, CONTROL)
                    .map_err(|e| e.to_string())
            }),
            None => return,
        };
        if let Err(e) = result {
            self.control_down(&e);
        }
    }

    fn clients_count(&self) -> u32 {
        self.ready_sessions
    }

    /// Tells the auth server the client count when it changed.
    fn report_load(&mut self) {
        if self.control.phase != Phase::Up {
            return;
        }
        let clients = self.clients_count();
        if self.control.reported_clients == Some(clients) {
            return;
        }
        self.control.reported_clients = Some(clients);
        if let Some(conn) = self.control.conn.as_mut() {
            conn.queue(&RelayToAuth::Load { clients });
        }
        self.flush_control();
    }

    // ----- mesh ---------------------------------------------------------------------

    /// The address other relays reach this one at.
    pub fn mesh_addr(&self) -> &str {
        &self.mesh_addr
    }

    fn accept_mesh(&mut self) {
        let accepted = accept_pending(
            &self.mesh_listener,
            || Role::PskResponder(&self.secret),
            self.cfg.max_frame,
            self.room(),
        );
        for mut conn in accepted.connections {
            let token = Token(self.next_token);
            self.next_token += 1;
            if let Err(e) = conn.update_interest(self.poll.registry(), token) {
                warn!("cannot register {}: {e}", conn.peer);
                continue;
            }
            self.mesh.accepted(token, conn);
        }
    }

    /// Dials the relays the mesh wants links to.
    fn dial_mesh(&mut self) {
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
            let token = Token(self.next_token);
            self.next_token += 1;
            if conn.flush().is_err() || conn.update_interest(self.poll.registry(), token).is_err() {
                self.mesh.dial_failed(&id, now);
                continue;
            }
            self.mesh.dialled(token, id, conn);
        }
    }

    fn mesh_ready(&mut self, token: Token, readable: bool) {
        self.touched.insert(token);
        if !readable {
            return;
        }
        let Some(link) = self.mesh.links.get_mut(&token) else {
            return;
        };
        match link.conn.read_ready(&mut self.scratch) {
            Ok(ReadStatus::Open) => self.process_mesh_frames(token),
            Ok(ReadStatus::Eof) => {
                self.process_mesh_frames(token);
                self.close(token, "closed by peer");
            }
            Err(e) => self.close(token, &e.to_string()),
        }
    }

    fn process_mesh_frames(&mut self, token: Token) {
        loop {
            let Some(link) = self.mesh.links.get_mut(&token) else {
                return;
            };
            if link.conn.closing {
                return;
            }
            match link.conn.next_message::<MeshFrame>() {
                None => return,
                Some(Ok(frame)) => self.mesh_frame(token, frame),
                Some(Err(e)) => self.fail_mesh(token, e),
            }
        }
    }

    fn fail_mesh(&mut self, token: Token, error: ErrorFrame) {
        if let Some(link) = self.mesh.links.get_mut(&token) {
            warn!(
                "closing mesh connection {}: {:?}: {}",
                link.conn.peer, error.code, error.message
            );
            link.conn.queue(&MeshFrame::Error(error));
            link.conn.closing = true;
            self.touched.insert(token);
        }
    }

    fn mesh_frame(&mut self, token: Token, frame: MeshFrame) {
        let Some(link) = self.mesh.links.get_mut(&token) else {
            return;
        };
        self.touched.insert(token);
        match (&link.state, frame) {
            (MeshState::AwaitingHello, MeshFrame::Hello { version }) => {
                if version != PROTOCOL_VERSION {
                    return self.fail_mesh(
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
                            self.close(old, "replaced by a newer link");
                        }
                        self.catch_up_all();
                    }
                    None => {
                        link.conn.queue(&MeshFrame::Hello {
                            version: PROTOCOL_VERSION,
                        });
                        link.state = MeshState::AwaitingIntro;
                    }
                }
            }
            (MeshState::AwaitingIntro, MeshFrame::MeshHello { relay_id }) => {
                if !valid_relay_id(&relay_id) || relay_id == self.cfg.id {
                    return self.fail_mesh(
                        token,
                        ErrorFrame::new(None, ErrorCode::BadFrame, "bad relay id"),
                    );
                }
                info!("mesh link from {relay_id} is up");
                if let Some(old) = self.mesh.link_up(token, relay_id) {
                    self.close(old, "replaced by a newer link");
                }
                self.catch_up_all();
            }
            (
                MeshState::AwaitingIntro | MeshState::Admin | MeshState::Up(_),
                MeshFrame::StatsRequest { id },
            ) => {
                if link.state == MeshState::AwaitingIntro {
                    link.state = MeshState::Admin;
                }
                let stats = self.stats();
                if let Some(link) = self.mesh.links.get_mut(&token) {
                    link.conn.queue(&MeshFrame::Stats { id, stats });
                }
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
                self.close(token, "peer reported an error");
            }
            (_, _) => self.fail_mesh(
                token,
                ErrorFrame::new(None, ErrorCode::BadState, "frame not allowed now"),
            ),
        }
    }

    // ----- figures ------------------------------------------------------------------

    /// The figures `stats` reports.
    fn stats(&self) -> serde_json::Value {
        let m = &self.metrics;
        let batches = m.batches.load(Ordering::Relaxed);
        let c = self.counters;
        serde_json::json!({
            "server": "relay",
            "relay_id": self.cfg.id,
            "client_addr": self.public_addr,
            "mesh_addr": self.mesh_addr,
            "clients": self.clients_count(),
            "connections": self.clients.len(),
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
    fn room(&self) -> usize {
        self.max_connections
            .saturating_sub(self.clients.len() + self.mesh.links.len())
    }

    fn accept(&mut self) {
        let accepted = accept_pending(
            &self.listener,
            || Role::NkResponder(&self.keypair),
            self.cfg.max_frame,
            self.room(),
        );
        if accepted.refused > 0 {
            if self.refused == 0 {
                warn!(
                    "full ({} connections): closing new connections at once",
                    self.clients.len()
                );
            }
            self.refused += accepted.refused;
        }
        for conn in accepted.connections {
            let token = Token(self.next_token);
            self.next_token += 1;
            let mut client = Client {
                conn,
                state: ClientState::AwaitingHello,
            };
            if let Err(e) = client.conn.update_interest(self.poll.registry(), token) {
                warn!("cannot register {}: {e}", client.conn.peer);
                continue;
            }
            self.clients.insert(token, client);
        }
    }

    fn client_ready(&mut self, token: Token, readable: bool) {
        self.touched.insert(token);
        if !readable {
            return;
        }
        let Some(client) = self.clients.get_mut(&token) else {
            return;
        };
        match client.conn.read_ready(&mut self.scratch) {
            Ok(ReadStatus::Open) => self.process_frames(token),
            Ok(ReadStatus::Eof) => {
                self.process_frames(token);
                self.close(token, "closed by client");
            }
            Err(e) => self.close(token, &e.to_string()),
        }
    }

    fn process_frames(&mut self, token: Token) {
        loop {
            let Some(client) = self.clients.get_mut(&token) else {
                return;
            };
            if client.conn.closing {
                return;
            }
            match client.conn.next_message::<ClientToRelay>() {
                None => return,
                Some(Ok(frame)) => self.client_frame(token, frame),
                Some(Err(e)) => self.fail(token, e),
            }
        }
    }

    /// Sends an error frame and closes the connection once it is written.
    fn fail(&mut self, token: Token, error: ErrorFrame) {
        if let Some(client) = self.clients.get_mut(&token) {
            warn!(
                "closing {}: {:?}: {}",
                client.conn.peer, error.code, error.message
            );
            client.conn.queue(&RelayToClient::Error(error));
            client.conn.closing = true;
            self.touched.insert(token);
        }
    }

    /// Makes `token` a session of the admitted user: welcome, then the backlog.
    fn admit(&mut self, token: Token, admission: Admission, receive: bool) {
        let Some(client) = self.clients.get_mut(&token) else {
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
        self.touched.insert(token);
        let user_id = admission.user_id;
        client.state = ClientState::Ready(Box::new(Session::new(
            admission.user,
            user_id,
            receive,
            self.cfg.page_size as usize,
        )));
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
    fn refuse_credential(&mut self, token: Token, user: &str) {
        if let Some(client) = self.clients.get(&token) {
            info!(
                "refused a resumption credential for {user} from {}",
                client.conn.peer
            );
            self.resume_failures
                .add(&client.conn.peer.ip(), Instant::now());
        }
        self.fail(
            token,
            ErrorFrame::new(
                None,
                ErrorCode::BadCredentials,
                "the resumption credential is unknown, expired or revoked; log in again",
            ),
        );
    }

    fn send(&mut self, token: Token, frame: &RelayToClient) {
        if let Some(client) = self.clients.get_mut(&token) {
            client.conn.queue(frame);
            self.touched.insert(token);
        }
    }

    fn reply_error(&mut self, token: Token, req: u64, code: ErrorCode, message: String) {
        self.send(
            token,
            &RelayToClient::Error(ErrorFrame::new(Some(req), code, message)),
        );
    }

    fn client_frame(&mut self, token: Token, frame: ClientToRelay) {
        let Some(client) = self.clients.get_mut(&token) else {
            return;
        };
        self.touched.insert(token);
        match (&mut client.state, frame) {
            (ClientState::AwaitingHello, ClientToRelay::Hello { version }) => {
                if version != PROTOCOL_VERSION {
                    return self.fail(
                        token,
                        ErrorFrame::new(
                            None,
                            ErrorCode::BadVersion,
                            format!("protocol version {version} is not supported; this relay speaks {PROTOCOL_VERSION}"),
                        ),
                    );
                }
                client.state = ClientState::AwaitingAuth;
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
                Ok(admission) => self.admit(token, admission, receive),
                Err(why) => {
                    info!(
                        "refused a ticket for {user} from {}: {why:?}",
                        client.conn.peer
                    );
                    self.fail(
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
                    return self.fail(token, error);
                }
                if !valid_user_name(&user) || credential.len() > 128 {
                    return self.refuse_credential(token, &user);
                }
                client.state = ClientState::Resuming { receive };
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
                    return self.send(token, &RelayToClient::Error(error));
                }
                if body.len() > self.cfg.max_body {
                    let max = self.cfg.max_body;
                    return self.reply_error(
                        token,
                        id,
                        ErrorCode::TooLarge,
                        format!("message bodies are limited to {max} bytes"),
                    );
                }
                if body.contains('\0') {
                    return self.reply_error(
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
                            token,
                            id,
                            ErrorCode::UnknownUser,
                            format!("there is no user called {to:?}"),
                        )
                    }
                    (None, Some(group_id)) => Target::Group(group_id),
                    _ => {
                        return self.reply_error(
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
                    return self.reply_error(token, id, code, message);
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
                    return self.reply_error(token, id, ErrorCode::InvalidName, message);
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

    fn drain_completions(&mut self) {
        while let Ok(done) = self.done_rx.try_recv() {
            self.complete(done);
        }
    }

    fn complete(&mut self, done: Done) {
        match done {
            Done::Pending {
                conn,
                messages,
                more,
                ..
            } => {
                let Some(Client {
                    state: ClientState::Ready(session),
                    ..
                }) = self.clients.get_mut(&conn)
                else {
                    return;
                };
                if !session.receive {
                    return;
                }
                let (out, synced) = session.page_arrived(messages, more);
                self.counters.delivered += out.len() as u64;
                for m in out {
                    self.send(conn, &deliver(m));
                }
                if synced {
                    self.send(conn, &RelayToClient::Synced {});
                }
            }
            Done::CatchUp { conn, messages } => {
                let Some(Client {
                    state: ClientState::Ready(session),
                    ..
                }) = self.clients.get(&conn)
                else {
                    return;
                };
                if !session.receive || session.in_backlog() {
                    return;
                }
                self.counters.delivered += messages.len() as u64;
                for m in messages {
                    self.send(conn, &deliver(m));
                }
            }
            Done::Resumed {
                conn,
                user,
                user_id,
            } => {
                let Some(Client {
                    state: ClientState::Resuming { receive },
                    ..
                }) = self.clients.get(&conn)
                else {
                    return; // closed meanwhile
                };
                let receive = *receive;
                match user_id {
                    Some(user_id) => self.admit(conn, Admission { user, user_id }, receive),
                    None => self.refuse_credential(conn, &user),
                }
            }
            Done::LoginFailed { conn } => self.fail(
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
                    conn,
                    &RelayToClient::Sent {
                        id: req,
                        msg_id,
                        ts,
                    },
                );
                self.route(deliveries);
            }
            Done::Frames { conn, frames } => {
                for frame in &frames {
                    self.send(conn, frame);
                }
            }
            Done::Group {
                conn,
                reply,
                deliveries,
            } => {
                self.send(conn, &reply);
                self.route(deliveries);
            }
            Done::Failed {
                conn,
                req,
                code,
                message,
            } => self.reply_error(conn, req, code, message),
            Done::Key {
                conn,
                req,
                user,
                pubkey,
            } => match pubkey {
                Some(pubkey) => self.send(
                    conn,
                    &RelayToClient::Key {
                        id: req,
                        user,
                        pubkey,
                    },
                ),
                None => self.reply_error(
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
    fn catch_up_all(&mut self) {
        if self.stopping {
            return;
        }
        let sessions: Vec<(Token, i64)> = self
            .clients
            .iter()
            .filter_map(|(t, c)| match &c.state {
                ClientState::Ready(s) if s.receive && !s.in_backlog() => Some((*t, s.user_id)),
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
    fn route(&mut self, deliveries: Vec<crate::store::Delivery>) {
        for d in deliveries {
            for relay in &d.remote_relays {
                self.forward(relay, d.recipient_id, &d.message);
            }
            self.deliver_local(d.recipient_id, d.message);
        }
    }

    /// Sends a stored message to the relay where its recipient has a session. Without a
    /// link it simply waits in the table for the recipient's next login.
    fn forward(&mut self, relay: &str, recipient_id: i64, m: &Stored) {
        let Some(token) = self.mesh.route(relay) else {
            debug!(
                "no link to {relay}: message {} waits in the store",
                m.msg_id
            );
            return;
        };
        if let Some(link) = self.mesh.links.get_mut(&token) {
            link.conn.queue(&MeshFrame::Deliver {
                recipient_id,
                msg_id: m.msg_id,
                from: m.from.clone(),
                group_id: m.group_id,
                group: m.group.clone(),
                body: m.body.clone(),
                ts: m.ts,
                event: m.event.clone(),
            });
            self.touched.insert(token);
            self.counters.forwarded += 1;
        }
    }

    /// Pushes a freshly stored message to the recipient's sessions on this relay.
    fn deliver_local(&mut self, recipient_id: i64, message: Stored) {
        let Some(tokens) = self.local.get(&recipient_id) else {
            return;
        };
        for token in tokens.clone() {
            if let Some(Client {
                state: ClientState::Ready(session),
                conn,
            }) = self.clients.get_mut(&token)
            {
                if let Some(m) = session.live(message.clone()) {
                    conn.queue(&deliver(m));
                    self.touched.insert(token);
                    self.counters.delivered += 1;
                }
            }
        }
    }

    fn close(&mut self, token: Token, why: &str) {
        if let Some(mut link) = self.mesh.link_closed(token, Instant::now()) {
            let _ = link.conn.flush();
            link.conn.deregister(self.poll.registry());
            self.touched.remove(&token);
            match link.state {
                MeshState::Up(id) => {
                    warn!("mesh link to {id} closed: {why}");
                    self.catch_up_all();
                }
                _ => debug!("mesh connection {} closed: {why}", link.conn.peer),
            }
            return;
        }
        let Some(mut client) = self.clients.remove(&token) else {
            return;
        };
        let _ = client.conn.flush();
        client.conn.deregister(self.poll.registry());
        self.touched.remove(&token);
        if let ClientState::Ready(session) = client.state {
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
            debug!("connection {} closed: {why}", client.conn.peer);
        }
    }

    fn flush_touched(&mut self) {
        let touched: Vec<Token> = self.touched.drain().collect();
        for token in touched {
            let conn = match self.clients.get_mut(&token) {
                Some(client) => &mut client.conn,
                None => match self.mesh.links.get_mut(&token) {
                    Some(link) => &mut link.conn,
                    None => continue,
                },
            };
            match conn.flush_and_rearm(self.poll.registry(), token) {
                Err(e) => self.close(token, &e.to_string()),
                Ok(true) => self.close(token, "closed after an error"),
                Ok(false) => {}
            }
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
