//! A non-blocking server-side connection: socket, Noise codec and output queue.
//!
//! Owned by a mio poll loop. Reads go until `WouldBlock`; frames queued during one poll
//! turn are sealed into as few Noise messages as possible and written with one `write`
//! where the socket allows; a short write keeps the rest queued and the loop registers
//! `WRITABLE` interest only while something is queued.

use crate::frame::FrameError;
use crate::noise::{NoiseCodec, NoiseError, Role};
use crate::proto::{parse, ErrorCode, ErrorFrame};
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::{self, Read, Write};
use std::net::SocketAddr;

/// Accepts every connection waiting on `listener` (until `WouldBlock`), sets
/// TCP_NODELAY, and starts a Noise session as `role()` on each — at most `room` of
/// them; the rest are closed at once. Failures are logged and skipped; the caller
/// registers what it gets.
pub fn accept_pending<'k>(
    listener: &mio::net::TcpListener,
    role: impl Fn() -> Role<'k>,
    max_frame: usize,
    room: usize,
) -> Accepted {
    let mut accepted = Accepted::default();
    loop {
        let (stream, addr) = match listener.accept() {
            Ok(pair) => pair,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return accepted,
            Err(e) => {
                crate::warn!("accept failed: {e}");
                return accepted;
            }
        };
        if accepted.connections.len() >= room {
            // Full: closed at once (dropped), so the client hears it and tries
            // elsewhere instead of waiting in the listen queue.
            accepted.refused += 1;
            continue;
        }
        let _ = stream.set_nodelay(true);
        match Connection::new(stream, addr, role(), max_frame) {
            Ok(conn) => accepted.connections.push(conn),
            Err(e) => crate::warn!("cannot start a session with {addr}: {e}"),
        }
    }
}

/// What [`accept_pending`] took: the new connections, and how many it closed at once
/// because the server was full.
#[derive(Default)]
pub struct Accepted {
    pub connections: Vec<Connection>,
    pub refused: usize,
}

/// What a read turn found.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadStatus {
    /// The socket is still open.
    Open,
    /// The peer closed its side.
    Eof,
}

/// Why a connection must be dropped.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Noise(#[from] NoiseError),
}

/// One socket of a poll loop — or, in tests of the servers' protocol logic, a
/// connection without a socket whose frames are kept as queued (see
/// [`Connection::recorded`]).
pub struct Connection {
    /// `None` for a recorded connection.
    stream: Option<TcpStream>,
    pub peer: SocketAddr,
    codec: NoiseCodec,
    /// Encrypted bytes not yet accepted by the kernel, from `written` on.
    wire_out: Vec<u8>,
    written: usize,
    /// Set when the connection should close once its output is flushed.
    pub closing: bool,
    registered: Option<Interest>,
    /// When the connection was accepted or opened (for handshake and login deadlines).
    pub opened: std::time::Instant,
    /// When bytes last arrived (for idle timeouts).
    pub last_read: std::time::Instant,
    /// When the peer last took output (or there was none waiting): how long a reader
    /// has been stuck.
    last_drained: std::time::Instant,
}

impl Connection {
    /// Wraps an accepted or connecting stream; an initiator queues its first handshake
    /// message at once.
    pub fn new(
        stream: TcpStream,
        peer: SocketAddr,
        role: Role<'_>,
        max_frame: usize,
    ) -> Result<Connection, NoiseError> {
        let mut wire_out = Vec::new();
        let codec = NoiseCodec::new(role, max_frame, &mut wire_out)?;
        Ok(Connection::with(Some(stream), peer, codec, wire_out))
    }

    fn with(
        stream: Option<TcpStream>,
        peer: SocketAddr,
        codec: NoiseCodec,
        wire_out: Vec<u8>,
    ) -> Connection {
        let now = std::time::Instant::now();
        Connection {
            stream,
            peer,
            codec,
            wire_out,
            written: 0,
            closing: false,
            registered: None,
            opened: now,
            last_read: now,
            last_drained: now,
        }
    }

    /// Wraps a stream whose handshake was done elsewhere (see
    /// [`crate::link::Link::into_parts`]).
    pub fn from_established(stream: TcpStream, peer: SocketAddr, codec: NoiseCodec) -> Connection {
        Connection::with(Some(stream), peer, codec, Vec::new())
    }

    /// A connection from `peer` with no socket, for tests of a server's protocol logic
    /// without I/O: nothing is read or written, and every frame queued on it stays
    /// queued until [`Connection::take_recorded`] takes it.
    pub fn recorded(peer: SocketAddr, max_frame: usize) -> Connection {
        let mut discarded = Vec::new();
        // An NX initiator needs no key; its handshake never finishes here, so the codec
        // never seals: queued frames stay as they were queued.
        let codec = NoiseCodec::new(Role::NxInitiator, max_frame, &mut discarded)
            .expect("an NX initiator needs no key");
        Connection::with(None, peer, codec, Vec::new())
    }

    /// The frames queued on a [`Connection::recorded`] connection since the last call,
    /// as JSON, in order (empty for a real connection, whose frames are sealed).
    pub fn take_recorded(&mut self) -> Vec<serde_json::Value> {
        let bytes = self.codec.take_queued();
        let mut frames = Vec::new();
        let mut rest = &bytes[..];
        while rest.len() >= 4 {
            let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let json = &rest[4..4 + len];
            frames.push(serde_json::from_slice(json).expect("queued frames are JSON"));
            rest = &rest[4 + len..];
        }
        frames
    }

    /// Whether the handshake is done.
    pub fn is_ready(&self) -> bool {
        self.codec.is_ready()
    }

    /// Reads until `WouldBlock`, feeding the codec. `scratch` is the poll loop's shared
    /// read buffer, so idle connections own no read buffer of their own.
    pub fn read_ready(&mut self, scratch: &mut [u8]) -> Result<ReadStatus, ConnError> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(ReadStatus::Open);
        };
        loop {
            match stream.read(scratch) {
                Ok(0) => return Ok(ReadStatus::Eof),
                Ok(n) => {
                    self.last_read = std::time::Instant::now();
                    self.codec.receive(&scratch[..n], &mut self.wire_out)?
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ReadStatus::Open),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The next complete frame parsed as `T`: `None` while incomplete, `Some(Err(..))`
    /// with the `error` frame to send (then close) when the stream is malformed.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Option<Result<T, ErrorFrame>> {
        match self.codec.next_frame() {
            Ok(None) => None,
            Ok(Some(json)) => {
                Some(parse(json).map_err(|e| ErrorFrame::new(None, e.code, e.message)))
            }
            Err(e @ FrameError::TooLong { .. }) => Some(Err(ErrorFrame::new(
                None,
                ErrorCode::FrameTooLong,
                e.to_string(),
            ))),
        }
    }

    /// Queues a frame for the next flush.
    pub fn queue<T: Serialize>(&mut self, frame: &T) {
        self.codec.queue(frame);
    }

    /// Seals queued frames and writes as much as the socket takes.
    pub fn flush(&mut self) -> Result<(), ConnError> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(());
        };
        if self.written == self.wire_out.len() {
            self.last_drained = std::time::Instant::now();
        }
        self.codec.seal(&mut self.wire_out)?;
        while self.written < self.wire_out.len() {
            match stream.write(&self.wire_out[self.written..]) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(n) => {
                    self.written += n;
                    self.last_drained = std::time::Instant::now();
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::NotConnected =>
                {
                    break
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if self.written == self.wire_out.len() {
            self.wire_out.clear();
            self.written = 0;
            // Give back the memory a burst needed; idle sockets stay small.
            if self.wire_out.capacity() > crate::frame::IDLE_CAPACITY {
                self.wire_out = Vec::new();
            }
        }
        Ok(())
    }

    /// Encrypted bytes waiting for the peer to read them (after a flush: what the
    /// kernel would not take).
    pub fn pending_output(&self) -> usize {
        self.wire_out.len() - self.written
    }

    /// How long output has been waiting without the peer taking any of it.
    pub fn stalled_for(&self) -> std::time::Duration {
        if self.pending_output() == 0 {
            std::time::Duration::ZERO
        } else {
            self.last_drained.elapsed()
        }
    }

    /// Whether everything queued has been written.
    pub fn is_flushed(&self) -> bool {
        self.written == self.wire_out.len() && !self.codec.has_queued()
    }

    /// Registers the socket, or updates its interest: `READABLE`, plus `WRITABLE` only
    /// while output is pending.
    pub fn update_interest(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let wanted = if self.is_flushed() {
            Interest::READABLE
        } else {
            Interest::READABLE | Interest::WRITABLE
        };
        let Some(stream) = self.stream.as_mut() else {
            return Ok(());
        };
        match self.registered {
            None => registry.register(stream, token, wanted)?,
            Some(current) if current == wanted => return Ok(()),
            Some(_) => registry.reregister(stream, token, wanted)?,
        }
        self.registered = Some(wanted);
        Ok(())
    }

    /// Writes what is queued and re-arms the poll interest; `Ok(true)` when the
    /// connection should close now (it was closing and everything is written).
    pub fn flush_and_rearm(
        &mut self,
        registry: &Registry,
        token: Token,
    ) -> Result<bool, ConnError> {
        self.flush()?;
        self.update_interest(registry, token)?;
        Ok(self.closing && self.is_flushed())
    }

    /// Removes the socket from the poll.
    pub fn deregister(&mut self, registry: &Registry) {
        if let (Some(_), Some(stream)) = (self.registered.take(), self.stream.as_mut()) {
            let _ = registry.deregister(stream);
        }
    }
}
