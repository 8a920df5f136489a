//! The relay's control link to the auth server: connect (Noise `NNpsk0` with the
//! cluster secret), announce the relay, report client counts, take tickets; reconnect
//! with backoff and jitter whenever it drops.

use fastchat_common::conn::Connection;
use fastchat_common::noise::{Role, KEY_LEN};
use fastchat_common::proto::RelayToAuth;
use fastchat_common::{info, warn, PROTOCOL_VERSION};
use mio::Token;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Where the link stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No connection; the next attempt is due at `retry_at`.
    Down,
    /// Connected or connecting; `hello` and `relay_up` are queued or sent.
    Announcing,
    /// The auth server has the relay in rotation.
    Up,
}

/// The control link and its reconnect schedule.
pub struct ControlLink {
    pub auth_addr: String,
    /// The link's connection in the reactor's table, while there is one.
    pub token: Option<Token>,
    pub phase: Phase,
    retry_at: Instant,
    backoff: Duration,
    /// Client count last sent to the auth server.
    pub reported_clients: Option<u32>,
}

/// What the relay announces about itself.
pub struct Announcement<'a> {
    pub relay_id: &'a str,
    pub client_addr: &'a str,
    pub static_key_hex: &'a str,
    pub mesh_addr: &'a str,
    pub stats_addr: Option<&'a str>,
    pub clients: u32,
}

impl ControlLink {
    /// A link that will connect on the first [`ControlLink::due`] check.
    pub fn new(auth_addr: String) -> ControlLink {
        ControlLink {
            auth_addr,
            token: None,
            phase: Phase::Down,
            retry_at: Instant::now(),
            backoff: MIN_BACKOFF,
            reported_clients: None,
        }
    }

    /// Whether a connection attempt is due now.
    pub fn due(&self, now: Instant) -> bool {
        self.phase == Phase::Down && now >= self.retry_at
    }

    /// Starts a non-blocking connection and queues the announcement; the frames go out
    /// once the handshake completes. The caller puts the connection in its table and
    /// the token in [`ControlLink::token`].
    pub fn connect(
        &mut self,
        secret: &[u8; KEY_LEN],
        max_frame: usize,
        me: &Announcement<'_>,
    ) -> Result<Connection, String> {
        let addr: SocketAddr = self
            .auth_addr
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", self.auth_addr))?
            .next()
            .ok_or_else(|| format!("{} resolves to nothing", self.auth_addr))?;
        let stream = mio::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let mut conn = Connection::new(stream, addr, Role::PskInitiator(secret), max_frame)
            .map_err(|e| e.to_string())?;
        conn.queue(&RelayToAuth::Hello {
            version: PROTOCOL_VERSION,
        });
        conn.queue(&RelayToAuth::RelayUp {
            relay_id: me.relay_id.to_string(),
            client_addr: me.client_addr.to_string(),
            static_key: me.static_key_hex.to_string(),
            mesh_addr: me.mesh_addr.to_string(),
            clients: me.clients,
            stats_addr: me.stats_addr.map(str::to_string),
        });
        self.reported_clients = Some(me.clients);
        self.phase = Phase::Announcing;
        Ok(conn)
    }

    /// For `stats`: the link's state.
    pub fn describe(&self) -> &'static str {
        match self.phase {
            Phase::Down => "down",
            Phase::Announcing => "connecting",
            Phase::Up => "up",
        }
    }

    /// The auth server welcomed us.
    pub fn welcomed(&mut self) {
        self.phase = Phase::Up;
        self.backoff = MIN_BACKOFF;
        info!("registered with auth server at {}", self.auth_addr);
    }

    /// The link failed or closed: schedule the next attempt; gives the token of its
    /// connection to take out.
    pub fn down(&mut self, why: &str, now: Instant) -> Option<Token> {
        if self.phase == Phase::Up {
            warn!("lost the auth server link: {why}");
        } else {
            fastchat_common::debug!("auth server link attempt failed: {why}");
        }
        self.phase = Phase::Down;
        // Jitter spreads the reconnects of many relays after an auth restart.
        let jitter = Duration::from_millis(
            rand::random::<u64>() % (self.backoff.as_millis() as u64 / 2 + 1),
        );
        self.retry_at = now + self.backoff + jitter;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.reported_clients = None;
        self.token.take()
    }
}
