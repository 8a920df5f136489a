//! A blocking Noise link over `std::net::TcpStream`, for clients and tests.
//!
//! The servers use [`crate::conn`] on mio instead; both share [`NoiseCodec`].

use crate::noise::{NoiseCodec, NoiseError, Role};
use crate::proto::{parse, ParseError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Why a link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Noise(#[from] NoiseError),
    #[error("the server closed the connection")]
    Closed,
    #[error("timed out waiting for the server")]
    Timeout,
    #[error("unexpected frame from the server: {}", .0.message)]
    Parse(ParseError),
}

/// An established, encrypted, framed connection.
pub struct Link {
    stream: TcpStream,
    codec: NoiseCodec,
    wire: Vec<u8>,
    read_buf: Vec<u8>,
}

impl Link {
    /// Connects to `addr` and completes the handshake for `role` within `timeout`.
    pub fn connect(
        addr: &str,
        role: Role<'_>,
        max_frame: usize,
        timeout: Duration,
    ) -> Result<Link, LinkError> {
        Link::connect_from(addr, None, role, max_frame, timeout)
    }

    /// As [`Link::connect`], from the local address `from` if given (port chosen by
    /// the OS): tools and tests that act as clients on several addresses (127.0.0.2, …).
    pub fn connect_from(
        addr: &str,
        from: Option<std::net::IpAddr>,
        role: Role<'_>,
        max_frame: usize,
        timeout: Duration,
    ) -> Result<Link, LinkError> {
        let connect_err = |source| LinkError::Connect {
            addr: addr.to_string(),
            source,
        };
        let sockaddr = addr
            .to_socket_addrs()
            .map_err(connect_err)?
            .next()
            .ok_or_else(|| {
                connect_err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "address resolves to nothing",
                ))
            })?;
        let stream = match from {
            None => TcpStream::connect_timeout(&sockaddr, timeout),
            Some(local) => bound_stream(local, sockaddr, timeout),
        }
        .map_err(connect_err)?;
        Link::handshake(stream, role, max_frame, timeout)
    }

    /// Completes the handshake for `role` on a stream connected or accepted elsewhere
    /// (from a chosen local address; the responder's side, for tools and tests — the
    /// servers use the mio loop) within `timeout`.
    pub fn over(
        stream: TcpStream,
        role: Role<'_>,
        max_frame: usize,
        timeout: Duration,
    ) -> Result<Link, LinkError> {
        Link::handshake(stream, role, max_frame, timeout)
    }

    fn handshake(
        stream: TcpStream,
        role: Role<'_>,
        max_frame: usize,
        timeout: Duration,
    ) -> Result<Link, LinkError> {
        stream.set_nodelay(true)?;
        let mut wire = Vec::new();
        let codec = NoiseCodec::new(role, max_frame, &mut wire)?;
        let mut link = Link {
            stream,
            codec,
            wire,
            read_buf: vec![0; 64 * 1024],
        };
        link.write_wire()?;
        let deadline = Instant::now() + timeout;
        while !link.codec.is_ready() {
            link.read_some(Some(deadline))?;
            link.write_wire()?;
        }
        Ok(link)
    }

    /// The peer's static key (NX: the server's key to pin).
    pub fn remote_static(&self) -> Option<&[u8]> {
        self.codec.remote_static()
    }

    /// Queues a frame without sending it.
    pub fn queue<T: Serialize>(&mut self, frame: &T) {
        self.codec.queue(frame);
    }

    /// Queues bytes into the plaintext stream exactly as given (hostile-input tests).
    pub fn queue_raw_bytes(&mut self, bytes: &[u8]) {
        self.codec.queue_raw_bytes(bytes);
    }

    /// Encrypts and writes everything queued.
    pub fn flush(&mut self) -> Result<(), LinkError> {
        self.codec.seal(&mut self.wire)?;
        self.write_wire()
    }

    /// Queues and sends one frame.
    pub fn send<T: Serialize>(&mut self, frame: &T) -> Result<(), LinkError> {
        self.queue(frame);
        self.flush()
    }

    /// Writes bytes straight to the socket, outside Noise (hostile-input tests).
    pub fn write_raw_wire(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    fn write_wire(&mut self) -> Result<(), LinkError> {
        if !self.wire.is_empty() {
            self.stream.write_all(&self.wire)?;
            self.wire.clear();
        }
        Ok(())
    }

    /// Reads once from the socket, honouring the deadline (`None`: wait forever).
    fn read_some(&mut self, deadline: Option<Instant>) -> Result<(), LinkError> {
        let timeout = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(LinkError::Timeout);
                }
                Some(left)
            }
            None => None,
        };
        self.stream.set_read_timeout(timeout)?;
        match self.stream.read(&mut self.read_buf) {
            Ok(0) => Err(LinkError::Closed),
            Ok(n) => {
                self.codec.receive(&self.read_buf[..n], &mut self.wire)?;
                Ok(())
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                Err(LinkError::Timeout)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The next frame's raw JSON, waiting until `deadline`; `Ok(None)` on timeout.
    pub fn recv_json(&mut self, deadline: Option<Instant>) -> Result<Option<Vec<u8>>, LinkError> {
        loop {
            if let Some(frame) = self.codec.next_frame().map_err(NoiseError::from)? {
                return Ok(Some(frame.to_vec()));
            }
            match self.read_some(deadline) {
                Ok(()) => {}
                Err(LinkError::Timeout) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// The next frame parsed as `T`, waiting until `deadline`; `Ok(None)` on timeout.
    pub fn recv<T: DeserializeOwned>(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<T>, LinkError> {
        match self.recv_json(deadline)? {
            Some(json) => parse(&json).map(Some).map_err(LinkError::Parse),
            None => Ok(None),
        }
    }

    /// The socket and the Noise session, to carry on elsewhere (the load tester moves
    /// established links onto mio). Everything written so far has been sent.
    pub fn into_parts(self) -> (TcpStream, NoiseCodec) {
        (self.stream, self.codec)
    }

    /// Shuts the socket down in both directions.
    pub fn close(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// A TCP connection to `to` from the local address `local`.
fn bound_stream(
    local: std::net::IpAddr,
    to: std::net::SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let domain = socket2::Domain::for_address(to);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    socket.bind(&std::net::SocketAddr::new(local, 0).into())?;
    socket.connect_timeout(&to.into(), timeout)?;
    Ok(socket.into())
}
