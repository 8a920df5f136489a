//! The relay's poll loop: one thread owns the client listener, every client connection
//! and the control link to the auth server; database work goes to the worker pool and
//! comes back through the completion channel and the waker.
//!
//! Client connection: `AwaitingHello → AwaitingAuth → Ready(Session)`. A frame that
//! does not fit the state gets an `error` frame and the connection closes.

use crate::config::Config;
use crate::control::{Announcement, ControlLink, Phase};
use crate::session::{Next, Session};
use crate::store::{Done, Job, Worker};
use crate::tickets::{Admission, TicketBook};
use crossbeam_channel::Receiver;
use fastchat_common::conn::{Connection, ReadStatus};
use fastchat_common::db::DbPool;
use fastchat_common::noise::{Role, StaticKeypair, KEY_LEN};
use fastchat_common::pool::{Completions, WorkerPool};
use fastchat_common::proto::{
    valid_user_name, AuthToRelay, ClientToRelay, ErrorCode, ErrorFrame, RelayToAuth, RelayToClient,
};
use fastchat_common::{debug, hex, info, warn, PROTOCOL_VERSION};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const CONTROL: Token = Token(2);
const FIRST_CLIENT: usize = 3;

/// Most ids one `ack` may carry.
const MAX_ACK_IDS: usize = 10_000;

enum ClientState {
    AwaitingHello,
    AwaitingAuth,
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
    /// Set once shutdown has begun: sessions end without per-user presence jobs.
    stopping: bool,
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
        let (done, done_rx) = Completions::new(waker.clone());
        let pool = WorkerPool::start("relay-worker", cfg.workers, cfg.max_batch, |_| {
            let mut worker = Worker::new(db.clone(), cfg.id.clone(), done.clone());
            move |jobs| worker.run_batch(jobs)
        })?;
        let control = ControlLink::new(cfg.auth.clone());
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
                stopping: false,
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
                    WAKER => {}
                    CONTROL => self.control_ready(event.is_readable() || event.is_error()),
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
        }
        self.shut_down();
        Ok(())
    }

    fn shut_down(mut self) {
        info!("stopping: no new connections, finishing the batches in flight");
        let _ = self.poll.registry().deregister(&mut self.listener);
        self.pool.shutdown();
        self.drain_completions();
        self.flush_touched();
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

    /// Periodic work: expired tickets, connections that never logged in.
    fn sweep(&mut self) {
        let now = Instant::now();
        self.tickets.expire(now);
        let deadline = Duration::from_secs(self.cfg.auth_deadline_secs);
        let stalled: Vec<Token> = self
            .clients
            .iter()
            .filter(|(_, c)| {
                !matches!(c.state, ClientState::Ready(_))
                    && now.duration_since(c.conn.opened) >= deadline
            })
            .map(|(t, _)| *t)
            .collect();
        for token in stalled {
            self.close(token, "no ticket before the deadline");
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
        self.clients
            .values()
            .filter(|c| matches!(c.state, ClientState::Ready(_)))
            .count() as u32
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

    // ----- clients ------------------------------------------------------------------

    fn accept(&mut self) {
        loop {
            let (stream, addr) = match self.listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!("accept failed: {e}");
                    return;
                }
            };
            let _ = stream.set_nodelay(true);
            let conn = match Connection::new(
                stream,
                addr,
                Role::NkResponder(&self.keypair),
                self.cfg.max_frame,
            ) {
                Ok(c) => c,
                Err(e) => {
                    warn!("cannot start a session with {addr}: {e}");
                    continue;
                }
            };
            let token = Token(self.next_token);
            self.next_token += 1;
            let mut client = Client {
                conn,
                state: ClientState::AwaitingHello,
            };
            if let Err(e) = client.conn.update_interest(self.poll.registry(), token) {
                warn!("cannot register {addr}: {e}");
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
                Ok(admission) => {
                    info!("{} connected from {}", admission.user, client.conn.peer);
                    client.conn.queue(&RelayToClient::Welcome {
                        user: admission.user.clone(),
                        user_id: admission.user_id,
                    });
                    let user_id = admission.user_id;
                    client.state = ClientState::Ready(Box::new(Session::new(
                        admission.user,
                        user_id,
                        receive,
                    )));
                    // Registered locally before presence commits, so no live message
                    // completing meanwhile can miss this session.
                    self.local.entry(user_id).or_default().push(token);
                    self.submit(Job::Login {
                        conn: token,
                        user_id,
                        page: if receive { self.cfg.page_size } else { 0 },
                    });
                }
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
            (ClientState::Ready(session), ClientToRelay::Send { id, to, body }) => {
                let (sender_id, sender) = (session.user_id, session.user.clone());
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
                if !valid_user_name(&to) {
                    return self.reply_error(
                        token,
                        id,
                        ErrorCode::UnknownUser,
                        format!("there is no user called {to:?}"),
                    );
                }
                self.submit(Job::Send {
                    conn: token,
                    req: id,
                    sender_id,
                    sender,
                    to,
                    body,
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
                for m in out {
                    self.send(conn, &deliver(m));
                }
                if synced {
                    self.send(conn, &RelayToClient::Synced {});
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
                recipient_id,
                message,
                remote_relays,
            } => {
                let (msg_id, ts) = (message.msg_id, message.ts);
                self.send(
                    conn,
                    &RelayToClient::Sent {
                        id: req,
                        msg_id,
                        ts,
                    },
                );
                self.deliver_local(recipient_id, message);
                if !remote_relays.is_empty() {
                    debug!(
                        "message {msg_id} waits for a recipient on {remote_relays:?} (no mesh link)"
                    );
                }
            }
            Done::SendFailed {
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
            Done::KeyFailed { conn, req } => self.reply_error(
                conn,
                req,
                ErrorCode::StoreFailed,
                "the key store is unavailable; retry".into(),
            ),
        }
    }

    /// Pushes a freshly stored message to the recipient's sessions on this relay.
    fn deliver_local(&mut self, recipient_id: i64, message: crate::store::Stored) {
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
                }
            }
        }
    }

    fn close(&mut self, token: Token, why: &str) {
        let Some(mut client) = self.clients.remove(&token) else {
            return;
        };
        let _ = client.conn.flush();
        client.conn.deregister(self.poll.registry());
        self.touched.remove(&token);
        if let ClientState::Ready(session) = client.state {
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
            let Some(client) = self.clients.get_mut(&token) else {
                continue;
            };
            let result = client
                .conn
                .flush()
                .and_then(|()| Ok(client.conn.update_interest(self.poll.registry(), token)?));
            match result {
                Err(e) => self.close(token, &e.to_string()),
                Ok(()) if client.conn.closing && client.conn.is_flushed() => {
                    self.close(token, "closed after an error")
                }
                Ok(()) => {}
            }
        }
    }
}

fn deliver(m: crate::store::Stored) -> RelayToClient {
    RelayToClient::Msg {
        msg_id: m.msg_id,
        from: m.from,
        group: None,
        body: m.body,
        ts: m.ts,
    }
}

fn frame_name(frame: &ClientToRelay) -> &'static str {
    match frame {
        ClientToRelay::Hello { .. } => "hello",
        ClientToRelay::Auth { .. } => "auth",
        ClientToRelay::Send { .. } => "send",
        ClientToRelay::Ack { .. } => "ack",
        ClientToRelay::Key { .. } => "key",
        ClientToRelay::Ping { .. } => "ping",
    }
}
