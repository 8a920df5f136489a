//! The poll loop both servers run on, written once.
//!
//! A [`Reactor`] owns the mio `Poll`, the listeners, the waker and the completion
//! channel of the worker pool; its [`Io`] owns every connection, by token, with the
//! server's state for it. The server is a [`Handler`]: it decodes frames for a
//! connection's state and answers them, takes completions and ticks, and says what
//! closing a connection means to it. The reactor does the rest — accept, read until
//! `WouldBlock`, hand over whole frames, flush every connection something was queued
//! on (once per turn, so frames of one turn share Noise messages and writes), re-arm
//! write interest, close what failed or finished closing — and never blocks.
//!
//! One turn: `before_poll` → poll (at most `wait`) → accepts and reads → completions →
//! `on_tick` when due → `after_turn` → flush of touched connections.

use crate::conn::{accept_pending, Accepted, Connection, ReadStatus};
use crate::noise::{Role, StaticKeypair, KEY_LEN};
use crate::pool::Completions;
use crate::proto::ErrorFrame;
use crossbeam_channel::Receiver;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The waker's token; listeners take the next ones, connections those after.
const WAKER: Token = Token(0);

/// One connection and the server's state for it.
pub struct Link<S> {
    pub conn: Connection,
    pub state: S,
}

/// How a listener's connections start their Noise session.
pub enum Accepting {
    /// Clients of the auth server (NX: the server's static key in the handshake).
    Nx(StaticKeypair),
    /// Clients of a relay (NK: they know its key).
    Nk(StaticKeypair),
    /// Servers with the cluster secret.
    Psk([u8; KEY_LEN]),
}

impl Accepting {
    fn role(&self) -> Role<'_> {
        match self {
            Accepting::Nx(k) => Role::NxResponder(k),
            Accepting::Nk(k) => Role::NkResponder(k),
            Accepting::Psk(s) => Role::PskResponder(s),
        }
    }
}

struct Listener<L> {
    token: Token,
    socket: TcpListener,
    accepting: Accepting,
    kind: L,
}

/// The connections of a server, and what its hooks may do with them.
pub struct Io<S> {
    registry: Registry,
    links: HashMap<Token, Link<S>>,
    touched: HashSet<Token>,
    next_token: usize,
    max_frame: usize,
}

impl<S> Io<S> {
    /// A table outside any reactor, for tests of a server's protocol logic: hold
    /// [`Connection::recorded`] connections in it, call the handler's hooks, and read
    /// what they did with [`Io::recorded`].
    pub fn detached(max_frame: usize) -> std::io::Result<Io<S>> {
        Ok(Io {
            registry: Poll::new()?.registry().try_clone()?,
            links: HashMap::new(),
            touched: HashSet::new(),
            next_token: 1,
            max_frame,
        })
    }

    /// The frames queued on a recorded connection since the last call (see
    /// [`Connection::take_recorded`]); empty if the connection is gone.
    pub fn recorded(&mut self, token: Token) -> Vec<serde_json::Value> {
        self.touched.remove(&token);
        self.links
            .get_mut(&token)
            .map(|l| l.conn.take_recorded())
            .unwrap_or_default()
    }

    /// Writes what `conn` has queued, registers it and keeps it with `state`; `None`
    /// (logged) if it cannot be written to or registered.
    pub fn add(&mut self, mut conn: Connection, state: S) -> Option<Token> {
        let token = Token(self.next_token);
        self.next_token += 1;
        // What an initiator queued (its first handshake message) goes out at once.
        if let Err(e) = conn.flush() {
            crate::debug!("cannot start a connection to {}: {e}", conn.peer);
            return None;
        }
        if let Err(e) = conn.update_interest(&self.registry, token) {
            crate::warn!("cannot register {}: {e}", conn.peer);
            return None;
        }
        self.links.insert(token, Link { conn, state });
        Some(token)
    }

    /// As [`Io::add`], for a connection whose address `per_addr` counts: `false` (the
    /// connection dropped, so closed at once) if its address holds as many as allowed.
    /// Whoever removes it gives the count back (`per_addr.disconnect`).
    pub fn add_counted(
        &mut self,
        per_addr: &mut crate::limits::PerAddr,
        conn: Connection,
        state: S,
    ) -> bool {
        let addr = conn.peer.ip();
        if !per_addr.connect(addr) {
            crate::debug!("{addr} holds as many connections as allowed: closed");
            return false;
        }
        if self.add(conn, state).is_none() {
            per_addr.disconnect(addr);
        }
        true
    }

    /// Takes a connection out (written what it can, deregistered). The caller does
    /// what closing it means (see [`Handler::on_close`]).
    pub fn remove(&mut self, token: Token) -> Option<Link<S>> {
        let mut link = self.links.remove(&token)?;
        let _ = link.conn.flush();
        link.conn.deregister(&self.registry);
        self.touched.remove(&token);
        Some(link)
    }

    /// Queues `frame` on the connection (written at the end of the turn); false if
    /// there is no such connection.
    pub fn send<T: Serialize>(&mut self, token: Token, frame: &T) -> bool {
        match self.links.get_mut(&token) {
            Some(link) => {
                link.conn.queue(frame);
                self.touched.insert(token);
                true
            }
            None => false,
        }
    }

    /// Queues `frame` (an error) and closes the connection once it is written; reads
    /// nothing more from it.
    pub fn fail<T: Serialize>(&mut self, token: Token, frame: &T) {
        if let Some(link) = self.links.get_mut(&token) {
            link.conn.queue(frame);
            link.conn.closing = true;
            self.touched.insert(token);
        }
    }

    /// Marks a connection for the end-of-turn flush (its output was queued directly).
    pub fn touch(&mut self, token: Token) {
        self.touched.insert(token);
    }

    pub fn get(&self, token: Token) -> Option<&Link<S>> {
        self.links.get(&token)
    }

    pub fn get_mut(&mut self, token: Token) -> Option<&mut Link<S>> {
        self.links.get_mut(&token)
    }

    pub fn contains(&self, token: Token) -> bool {
        self.links.contains_key(&token)
    }

    /// Connections held.
    pub fn len(&self) -> usize {
        self.links.len()
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (Token, &Link<S>)> {
        self.links.iter().map(|(t, l)| (*t, l))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (Token, &mut Link<S>)> {
        self.links.iter_mut().map(|(t, l)| (*t, l))
    }

    /// Every token held (a copy, to close some while walking them).
    pub fn tokens(&self) -> Vec<Token> {
        self.links.keys().copied().collect()
    }
}

/// A server's side of the loop. `State` is what it keeps per connection, `Frame` what
/// it reads from one (it may depend on the state: a server with several kinds of link
/// reads several protocols), `Done` what its workers send back, `Listener` its names
/// for its listeners.
pub trait Handler: Sized {
    type State;
    type Frame;
    type Done;
    type Listener: Copy;

    /// The next whole frame of `conn`, parsed as what a connection in `state` sends:
    /// `None` until one is complete, an error frame when the stream is malformed.
    fn decode(
        state: &Self::State,
        conn: &mut Connection,
    ) -> Option<Result<Self::Frame, ErrorFrame>>;

    /// A frame from `token`.
    fn on_frame(&mut self, io: &mut Io<Self::State>, token: Token, frame: Self::Frame);

    /// A malformed stream from `token`: usually [`Io::fail`] with the error.
    fn on_bad_stream(&mut self, io: &mut Io<Self::State>, token: Token, error: ErrorFrame);

    /// How many more connections `listener` may take now (the rest are closed at once).
    fn room(&self, io: &Io<Self::State>, listener: Self::Listener) -> usize;

    /// Connections `listener` accepted (to [`Io::add`] with their first state), and how
    /// many it closed at once for want of room.
    fn on_accept(&mut self, io: &mut Io<Self::State>, listener: Self::Listener, accepted: Accepted);

    /// `token` must close (`why`): the peer closed, a read or write failed, or it
    /// finished closing. Take it out with [`Io::remove`] and do what that means.
    fn on_close(&mut self, io: &mut Io<Self::State>, token: Token, why: &str);

    /// A worker's result.
    fn on_completion(&mut self, io: &mut Io<Self::State>, done: Self::Done);

    /// Periodic work, every [`Reactor::tick`] at most.
    fn on_tick(&mut self, io: &mut Io<Self::State>, now: Instant);

    /// Before each poll (dial what is due).
    fn before_poll(&mut self, _io: &mut Io<Self::State>) {}

    /// When the handler next has work of its own due (the poll waits no longer).
    fn wake_at(&self) -> Option<Instant> {
        None
    }

    /// After each turn's events, completions and tick, before the flush.
    fn after_turn(&mut self, _io: &mut Io<Self::State>) {}
}

/// A new loop, the addresses its listeners are bound to, and the sending side of its
/// completion channel (for the worker pool).
pub type Built<H> = (
    Reactor<H>,
    Vec<SocketAddr>,
    Completions<<H as Handler>::Done>,
);

/// The loop of one server.
pub struct Reactor<H: Handler> {
    poll: Poll,
    pub io: Io<H::State>,
    listeners: Vec<Listener<H::Listener>>,
    done_rx: Receiver<H::Done>,
    waker: Arc<Waker>,
    scratch: Vec<u8>,
    wait: Duration,
    tick: Duration,
    last_tick: Instant,
}

impl<H: Handler> Reactor<H> {
    /// A loop whose connections are made with frames of at most `max_frame` bytes,
    /// polling at least every `wait` and ticking every `tick`; `listeners` are bound and
    /// registered, each with how its connections start and the server's name for it.
    /// Gives the bound addresses in the order given, and the completion channel's
    /// sending side (its waker is this loop's, see [`Reactor::waker`]).
    pub fn new(
        max_frame: usize,
        wait: Duration,
        tick: Duration,
        listeners: Vec<(&str, Accepting, H::Listener)>,
    ) -> std::io::Result<Built<H>> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut bound = Vec::new();
        let mut held = Vec::new();
        for (i, (addr, accepting, kind)) in listeners.into_iter().enumerate() {
            let token = Token(1 + i);
            let mut socket = TcpListener::bind(parse_addr(addr)?)?;
            poll.registry()
                .register(&mut socket, token, Interest::READABLE)?;
            bound.push(socket.local_addr()?);
            held.push(Listener {
                token,
                socket,
                accepting,
                kind,
            });
        }
        let io = Io {
            registry: poll.registry().try_clone()?,
            links: HashMap::new(),
            touched: HashSet::new(),
            next_token: 1 + held.len(),
            max_frame,
        };
        let (done, done_rx) = Completions::new(waker.clone());
        Ok((
            Reactor {
                poll,
                io,
                listeners: held,
                done_rx,
                waker,
                scratch: vec![0; 64 * 1024],
                wait,
                tick,
                last_tick: Instant::now(),
            },
            bound,
            done,
        ))
    }

    /// The waker of this loop's poll.
    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    /// Runs turns until `stop` is set, then stops listening (connections stay, for the
    /// server's own shutdown).
    pub fn run(&mut self, handler: &mut H, stop: &AtomicBool) -> std::io::Result<()> {
        let mut events = Events::with_capacity(1024);
        while !stop.load(Ordering::Relaxed) {
            handler.before_poll(&mut self.io);
            let wait = handler.wake_at().map_or(self.wait, |at| {
                at.saturating_duration_since(Instant::now()).min(self.wait)
            });
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for event in events.iter() {
                let token = event.token();
                if token == WAKER {
                    continue;
                }
                if let Some(i) = self.listeners.iter().position(|l| l.token == token) {
                    self.accept(handler, i);
                } else {
                    self.ready(handler, token, event.is_readable() || event.is_error());
                }
            }
            self.drain_completions(handler);
            if self.last_tick.elapsed() >= self.tick {
                self.last_tick = Instant::now();
                handler.on_tick(&mut self.io, self.last_tick);
            }
            handler.after_turn(&mut self.io);
            self.flush(handler);
        }
        for listener in &mut self.listeners {
            let _ = self.poll.registry().deregister(&mut listener.socket);
        }
        Ok(())
    }

    /// Hands every completion waiting to the handler.
    pub fn drain_completions(&mut self, handler: &mut H) {
        while let Ok(done) = self.done_rx.try_recv() {
            handler.on_completion(&mut self.io, done);
        }
    }

    /// The completion channel (for a shutdown that treats what is left specially).
    pub fn completions(&self) -> &Receiver<H::Done> {
        &self.done_rx
    }

    /// Writes what was queued this turn and re-arms interest; closes what failed or
    /// finished closing.
    pub fn flush(&mut self, handler: &mut H) {
        let touched: Vec<Token> = self.io.touched.drain().collect();
        for token in touched {
            let Some(link) = self.io.links.get_mut(&token) else {
                continue;
            };
            match link.conn.flush_and_rearm(&self.io.registry, token) {
                Err(e) => handler.on_close(&mut self.io, token, &e.to_string()),
                Ok(true) => handler.on_close(&mut self.io, token, "closed after an error"),
                Ok(false) => {}
            }
        }
    }

    fn accept(&mut self, handler: &mut H, i: usize) {
        let listener = &self.listeners[i];
        let room = handler.room(&self.io, listener.kind);
        let accepted = accept_pending(
            &listener.socket,
            || listener.accepting.role(),
            self.io.max_frame,
            room,
        );
        handler.on_accept(&mut self.io, listener.kind, accepted);
    }

    fn ready(&mut self, handler: &mut H, token: Token, readable: bool) {
        let Some(link) = self.io.links.get_mut(&token) else {
            return;
        };
        self.io.touched.insert(token);
        if !readable {
            return;
        }
        let status = match link.conn.read_ready(&mut self.scratch) {
            Ok(status) => status,
            Err(e) => return handler.on_close(&mut self.io, token, &e.to_string()),
        };
        // What arrived before a close is processed first.
        self.frames(handler, token);
        if status == ReadStatus::Eof {
            handler.on_close(&mut self.io, token, "closed by peer");
        }
    }

    /// Hands over every whole frame `token` has, until it is gone or closing.
    fn frames(&mut self, handler: &mut H, token: Token) {
        loop {
            let Some(link) = self.io.links.get_mut(&token) else {
                return;
            };
            if link.conn.closing {
                return;
            }
            match H::decode(&link.state, &mut link.conn) {
                None => return,
                Some(Ok(frame)) => handler.on_frame(&mut self.io, token, frame),
                Some(Err(e)) => handler.on_bad_stream(&mut self.io, token, e),
            }
        }
    }
}

fn parse_addr(addr: &str) -> std::io::Result<SocketAddr> {
    addr.parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr} is not an IP:port address"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::Link;
    use serde::Deserialize;
    use std::sync::Mutex;

    /// What the test server reads and writes.
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    #[serde(tag = "t", rename_all = "snake_case")]
    enum Frame {
        Echo { n: u32 },
        Bye,
        Error { why: String },
        Done { what: String },
    }

    const SECRET: [u8; KEY_LEN] = [7; KEY_LEN];

    /// Echoes, fails on `bye`, forwards completions to every connection, and records
    /// what happened.
    #[derive(Default)]
    struct Echo {
        closed: Arc<Mutex<Vec<String>>>,
        ticks: Arc<Mutex<u32>>,
    }

    impl Handler for Echo {
        type State = u32;
        type Frame = Frame;
        type Done = String;
        type Listener = ();

        fn decode(_: &u32, conn: &mut Connection) -> Option<Result<Frame, ErrorFrame>> {
            conn.next_message()
        }

        fn on_frame(&mut self, io: &mut Io<u32>, token: Token, frame: Frame) {
            if let Some(link) = io.get_mut(token) {
                link.state += 1;
            }
            match frame {
                Frame::Bye => io.fail(token, &Frame::Error { why: "bye".into() }),
                other => {
                    io.send(token, &other);
                }
            }
        }

        fn on_bad_stream(&mut self, io: &mut Io<u32>, token: Token, error: ErrorFrame) {
            io.fail(token, &Frame::Error { why: error.message });
        }

        fn room(&self, io: &Io<u32>, _: ()) -> usize {
            2usize.saturating_sub(io.len())
        }

        fn on_accept(&mut self, io: &mut Io<u32>, _: (), accepted: Accepted) {
            for conn in accepted.connections {
                io.add(conn, 0);
            }
        }

        fn on_close(&mut self, io: &mut Io<u32>, token: Token, why: &str) {
            let frames = io.remove(token).map_or(0, |l| l.state);
            self.closed
                .lock()
                .unwrap()
                .push(format!("{frames} frames: {why}"));
        }

        fn on_completion(&mut self, io: &mut Io<u32>, done: String) {
            for token in io.tokens() {
                io.send(token, &Frame::Done { what: done.clone() });
            }
        }

        fn on_tick(&mut self, _: &mut Io<u32>, _: Instant) {
            *self.ticks.lock().unwrap() += 1;
        }
    }

    struct Running {
        addr: String,
        stop: Arc<AtomicBool>,
        waker: Arc<Waker>,
        done: Completions<String>,
        closed: Arc<Mutex<Vec<String>>>,
        ticks: Arc<Mutex<u32>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            let _ = self.waker.wake();
            if let Some(t) = self.thread.take() {
                t.join().unwrap();
            }
        }
    }

    fn start() -> Running {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handler = Echo::default();
        let (closed, ticks) = (handler.closed.clone(), handler.ticks.clone());
        let thread = std::thread::spawn(move || {
            let mut handler = handler;
            let (mut reactor, bound, done) = Reactor::<Echo>::new(
                4096,
                Duration::from_millis(20),
                Duration::from_millis(20),
                vec![("127.0.0.1:0", Accepting::Psk(SECRET), ())],
            )
            .unwrap();
            tx.send((bound[0], reactor.waker(), done)).unwrap();
            reactor.run(&mut handler, &flag).unwrap();
        });
        let (addr, waker, done) = rx.recv().unwrap();
        Running {
            addr: addr.to_string(),
            stop,
            waker,
            done,
            closed,
            ticks,
            thread: Some(thread),
        }
    }

    fn connect(r: &Running) -> Link {
        Link::connect(
            &r.addr,
            Role::PskInitiator(&SECRET),
            4096,
            Duration::from_secs(5),
        )
        .unwrap()
    }

    fn recv(link: &mut Link) -> Option<Frame> {
        link.recv(Some(Instant::now() + Duration::from_secs(5)))
            .ok()
            .flatten()
    }

    /// Waits until `what` holds.
    fn eventually(what: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !what() {
            assert!(Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn frames_are_answered_in_order_and_completions_reach_the_handler() {
        let r = start();
        let mut link = connect(&r);
        for n in 0..3 {
            link.queue(&Frame::Echo { n });
        }
        link.flush().unwrap();
        for n in 0..3 {
            assert_eq!(recv(&mut link), Some(Frame::Echo { n }));
        }
        r.done.send("stored".into());
        assert_eq!(
            recv(&mut link),
            Some(Frame::Done {
                what: "stored".into()
            })
        );
        eventually(|| *r.ticks.lock().unwrap() > 0);
        // The peer closing is a close with what it had sent counted.
        drop(link);
        eventually(|| r.closed.lock().unwrap().len() == 1);
        assert_eq!(r.closed.lock().unwrap()[0], "3 frames: closed by peer");
    }

    #[test]
    fn a_failed_or_malformed_connection_gets_its_error_then_closes_alone() {
        let r = start();
        let mut other = connect(&r);
        let mut link = connect(&r);
        link.send(&Frame::Bye).unwrap();
        assert_eq!(recv(&mut link), Some(Frame::Error { why: "bye".into() }));
        assert_eq!(recv(&mut link), None, "closed after its error");
        let mut bad = connect(&r);
        bad.queue_raw_bytes(br#"{"t":"nonsense"}"#);
        bad.flush().unwrap();
        assert!(matches!(recv(&mut bad), Some(Frame::Error { .. })));
        eventually(|| r.closed.lock().unwrap().len() == 2);
        assert!(r
            .closed
            .lock()
            .unwrap()
            .iter()
            .all(|why| why.ends_with("closed after an error")));
        // The other connection is untouched.
        other.send(&Frame::Echo { n: 9 }).unwrap();
        assert_eq!(recv(&mut other), Some(Frame::Echo { n: 9 }));
    }

    #[test]
    fn beyond_its_room_a_listener_closes_new_connections_at_once() {
        let r = start();
        let mut first = connect(&r);
        let _second = connect(&r);
        first.send(&Frame::Echo { n: 1 }).unwrap();
        assert_eq!(recv(&mut first), Some(Frame::Echo { n: 1 }));
        let third = Link::connect(
            &r.addr,
            Role::PskInitiator(&SECRET),
            4096,
            Duration::from_secs(2),
        );
        assert!(third.is_err(), "the third connection is refused");
    }
}
