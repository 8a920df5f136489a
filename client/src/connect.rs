//! Connections: the auth server (Noise `NX`, key pinned on first use) for register and
//! login, and the relay it redirects to (Noise `NK` with the key it handed out).

use crate::error::ClientError;
use crate::pins;
use fastchat_common::frame::{FrameError, DEFAULT_MAX_FRAME};
use fastchat_common::link::{Link, LinkError};
use fastchat_common::noise::{NoiseError, Role};
use fastchat_common::proto::{AuthToClient, ClientToAuth, ClientToRelay, RelayToClient};
use fastchat_common::{hex, PROTOCOL_VERSION};
use std::collections::VecDeque;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long to wait for a TCP connection and handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for a reply to a request.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a failing-over session waits for a relay to take its credential before it
/// tries elsewhere.
pub const RESUME_TIMEOUT: Duration = Duration::from_secs(10);

fn connect(addr: &str, role: Role<'_>) -> Result<Link, ClientError> {
    connect_from(addr, None, role)
}

fn connect_from(addr: &str, from: Option<IpAddr>, role: Role<'_>) -> Result<Link, ClientError> {
    Link::connect_from(addr, from, role, DEFAULT_MAX_FRAME, CONNECT_TIMEOUT).map_err(|e| match e {
        LinkError::Connect { source, .. } => ClientError::Unreachable {
            addr: addr.to_string(),
            why: source.to_string(),
        },
        LinkError::Timeout | LinkError::Closed => ClientError::Unreachable {
            addr: addr.to_string(),
            why: "no answer to the handshake".into(),
        },
        other => ClientError::Link(other),
    })
}

/// Where the auth server sent us.
#[derive(Debug, Clone)]
pub struct Redirect {
    pub user: String,
    pub relay_addr: String,
    pub relay_key: Vec<u8>,
    pub ticket: String,
    /// After a password login: a credential for later `resume`s, and its expiry (ms).
    pub credential: Option<(String, u64)>,
    /// Every relay in rotation, where the credential may be presented directly after a
    /// failover.
    pub relays: Vec<RelayTarget>,
}

/// A relay a client can reach: its address and static Noise key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTarget {
    pub addr: String,
    pub key: Vec<u8>,
}

fn decode_key(hex_key: &str) -> Result<Vec<u8>, ClientError> {
    hex::decode(hex_key).ok_or_else(|| ClientError::Protocol("a relay key is not hex".into()))
}

/// An open connection to the auth server.
pub struct AuthLink {
    link: Link,
    next_id: u64,
}

impl AuthLink {
    /// Connects, checks the server key against the pin in `data_dir`, says hello.
    pub fn connect(addr: &str, data_dir: &Path) -> Result<AuthLink, ClientError> {
        AuthLink::connect_from(addr, None, data_dir)
    }

    /// As [`AuthLink::connect`], from the local address `from` if given (tools that
    /// act as clients on several addresses: the load tester's abuse scenario).
    pub fn connect_from(
        addr: &str,
        from: Option<IpAddr>,
        data_dir: &Path,
    ) -> Result<AuthLink, ClientError> {
        let mut link = connect_from(addr, from, Role::NxInitiator)?;
        let key = link
            .remote_static()
            .ok_or_else(|| ClientError::Protocol("the auth server sent no static key".into()))?
            .to_vec();
        pins::check_or_pin(data_dir, addr, &key)?;
        link.send(&ClientToAuth::Hello {
            version: PROTOCOL_VERSION,
        })?;
        match link.recv::<AuthToClient>(Some(Instant::now() + REPLY_TIMEOUT))? {
            Some(AuthToClient::Hello { .. }) => Ok(AuthLink { link, next_id: 1 }),
            Some(AuthToClient::Error(e)) => Err(ClientError::from_frame(e)),
            Some(other) => Err(ClientError::Protocol(format!("{other:?}"))),
            None => Err(ClientError::Timeout),
        }
    }

    fn request(&mut self, frame: ClientToAuth, id: u64) -> Result<AuthToClient, ClientError> {
        self.link.send(&frame)?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            match self.link.recv::<AuthToClient>(Some(deadline))? {
                Some(AuthToClient::Error(e)) if e.id == Some(id) || e.id.is_none() => {
                    return Err(ClientError::from_frame(e))
                }
                Some(reply @ AuthToClient::Registered { id: got, .. })
                | Some(reply @ AuthToClient::Redirect { id: got, .. })
                | Some(reply @ AuthToClient::LoggedOut { id: got })
                | Some(reply @ AuthToClient::PasswordChanged { id: got })
                    if got == id =>
                {
                    return Ok(reply)
                }
                Some(_) => {}
                None => return Err(ClientError::Timeout),
            }
        }
    }

    /// Creates an account with the given public key.
    pub fn register(
        &mut self,
        user: &str,
        password: &str,
        pubkey: &str,
    ) -> Result<(), ClientError> {
        let id = self.next_id();
        let frame = ClientToAuth::Register {
            id,
            user: user.to_string(),
            password: password.to_string(),
            pubkey: pubkey.to_string(),
        };
        match self.request(frame, id)? {
            AuthToClient::Registered { .. } => Ok(()),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Logs in; the auth server answers with a relay, a ticket and a resumption
    /// credential.
    pub fn login(&mut self, user: &str, password: &str) -> Result<Redirect, ClientError> {
        let id = self.next_id();
        let frame = ClientToAuth::Login {
            id,
            user: user.to_string(),
            password: password.to_string(),
        };
        redirect_of(self.request(frame, id)?, user)
    }

    /// Logs in again with a resumption credential instead of the password.
    pub fn resume(&mut self, user: &str, credential: &str) -> Result<Redirect, ClientError> {
        let id = self.next_id();
        let frame = ClientToAuth::Resume {
            id,
            user: user.to_string(),
            credential: credential.to_string(),
        };
        redirect_of(self.request(frame, id)?, user)
    }

    /// Revokes a resumption credential.
    pub fn logout(&mut self, user: &str, credential: &str) -> Result<(), ClientError> {
        let id = self.next_id();
        let frame = ClientToAuth::Logout {
            id,
            user: user.to_string(),
            credential: credential.to_string(),
        };
        match self.request(frame, id)? {
            AuthToClient::LoggedOut { .. } => Ok(()),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Changes the password; the server revokes every resumption credential.
    pub fn change_password(&mut self, user: &str, old: &str, new: &str) -> Result<(), ClientError> {
        let id = self.next_id();
        let frame = ClientToAuth::ChangePassword {
            id,
            user: user.to_string(),
            old_password: old.to_string(),
            new_password: new.to_string(),
        };
        match self.request(frame, id)? {
            AuthToClient::PasswordChanged { .. } => Ok(()),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }
}

/// The redirect of a login as `user`; one for another user is refused (the ticket would
/// make a session under a name that is not ours).
fn redirect_of(reply: AuthToClient, user_asked: &str) -> Result<Redirect, ClientError> {
    if let AuthToClient::Redirect { user, .. } = &reply {
        if user != user_asked {
            return Err(ClientError::Protocol(format!(
                "the auth server logged in {user:?}, not {user_asked:?}: refusing the session"
            )));
        }
    }
    match reply {
        AuthToClient::Redirect {
            user,
            relay_addr,
            relay_key,
            ticket,
            credential,
            credential_expires_ms,
            relays,
            ..
        } => Ok(Redirect {
            user,
            relay_addr,
            relay_key: decode_key(&relay_key)?,
            ticket,
            credential: credential.map(|c| (c, credential_expires_ms.unwrap_or(0))),
            relays: relays
                .iter()
                .map(|r| {
                    Ok(RelayTarget {
                        addr: r.relay_addr.clone(),
                        key: decode_key(&r.relay_key)?,
                    })
                })
                .collect::<Result<_, ClientError>>()?,
        }),
        other => Err(ClientError::Protocol(format!("{other:?}"))),
    }
}

/// An authenticated session with a relay.
pub struct RelayLink {
    link: Link,
    pub user: String,
    pub user_id: i64,
    pub relay_addr: String,
    next_id: u64,
    /// Frames that arrived while waiting for a specific reply.
    stash: VecDeque<RelayToClient>,
    /// When something was last sent (see [`RelayLink::keep_alive`]).
    last_sent: Instant,
}

/// A session says something at least this often, so the relay's idle timeout (300 s by
/// default) never closes a live one.
pub const KEEPALIVE: Duration = Duration::from_secs(60);

impl RelayLink {
    /// Connects to the relay of `redirect` and presents the ticket. A `receive: false`
    /// session is send-only: the relay delivers nothing to it.
    pub fn connect(redirect: &Redirect, receive: bool) -> Result<RelayLink, ClientError> {
        let relay = RelayTarget {
            addr: redirect.relay_addr.clone(),
            key: redirect.relay_key.clone(),
        };
        let auth = ClientToRelay::Auth {
            user: redirect.user.clone(),
            ticket: redirect.ticket.clone(),
            receive,
        };
        RelayLink::open(&relay, &auth, REPLY_TIMEOUT)
    }

    /// Connects to `relay` directly and logs in with a resumption credential: one
    /// handshake and no auth server, which is how a session fails over.
    pub fn resume(
        relay: &RelayTarget,
        user: &str,
        credential: &str,
        receive: bool,
    ) -> Result<RelayLink, ClientError> {
        let resume = ClientToRelay::Resume {
            user: user.to_string(),
            credential: credential.to_string(),
            receive,
        };
        RelayLink::open(relay, &resume, RESUME_TIMEOUT)
    }

    /// Connects, says hello, presents `login` (`auth` or `resume`) and waits up to
    /// `timeout` for the welcome.
    fn open(
        relay: &RelayTarget,
        login: &ClientToRelay,
        timeout: Duration,
    ) -> Result<RelayLink, ClientError> {
        let expected = match login {
            ClientToRelay::Auth { user, .. } | ClientToRelay::Resume { user, .. } => user.clone(),
            _ => return Err(ClientError::Protocol("not a login frame".into())),
        };
        let mut link = connect(&relay.addr, Role::NkInitiator(&relay.key))?;
        link.queue(&ClientToRelay::Hello {
            version: PROTOCOL_VERSION,
        });
        link.queue(login);
        link.flush()?;
        let deadline = Instant::now() + timeout;
        loop {
            match link.recv::<RelayToClient>(Some(deadline))? {
                Some(RelayToClient::Hello { .. }) => {}
                Some(RelayToClient::Welcome { user, user_id }) => {
                    // Offers are signed with this name: only ever our own.
                    if user != expected {
                        return Err(ClientError::Protocol(format!(
                            "the relay welcomed {user:?}, not {expected:?}: refusing the session"
                        )));
                    }
                    return Ok(RelayLink {
                        link,
                        user,
                        user_id,
                        relay_addr: relay.addr.clone(),
                        next_id: 1,
                        stash: VecDeque::new(),
                        last_sent: Instant::now(),
                    });
                }
                Some(RelayToClient::Error(e)) => return Err(ClientError::from_frame(e)),
                Some(other) => return Err(ClientError::Protocol(format!("{other:?}"))),
                None => return Err(ClientError::Timeout),
            }
        }
    }

    /// A fresh request id.
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Queues a frame; it goes out with the next [`RelayLink::flush`].
    pub fn queue(&mut self, frame: &ClientToRelay) {
        self.link.queue(frame);
    }

    /// Sends everything queued.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.link.flush()?;
        self.last_sent = Instant::now();
        Ok(())
    }

    /// Sends a `ping` if nothing has been sent for [`KEEPALIVE`] (its `pong` is
    /// ignored where it arrives).
    pub fn keep_alive(&mut self) -> Result<(), ClientError> {
        if self.last_sent.elapsed() >= KEEPALIVE {
            let id = self.next_id();
            self.queue(&ClientToRelay::Ping { id });
            self.flush()?;
        }
        Ok(())
    }

    /// The next frame from the relay (stashed ones first); `None` at the deadline.
    pub fn recv(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<RelayToClient>, ClientError> {
        if let Some(frame) = self.stash.pop_front() {
            return Ok(Some(frame));
        }
        Ok(self.link.recv(deadline)?)
    }

    /// Waits for the reply to request `id` (a frame for which `is_reply` holds, or an
    /// error naming `id`), keeping other frames for later [`RelayLink::recv`] calls. A
    /// frame too long for this client abandons the request (a protocol error, not a lost
    /// connection: the frame was skipped and the link goes on).
    pub fn wait_reply(
        &mut self,
        id: u64,
        is_reply: impl Fn(&RelayToClient) -> bool,
    ) -> Result<RelayToClient, ClientError> {
        // It may have come while an earlier request was waited for: replies refused at
        // once (`rate_limited`, …) overtake those that wait for the database.
        let stashed = self.stash.iter().position(|f| match f {
            RelayToClient::Error(e) => e.id == Some(id),
            f => is_reply(f),
        });
        if let Some(frame) = stashed.and_then(|i| self.stash.remove(i)) {
            return match frame {
                RelayToClient::Error(e) => Err(ClientError::from_frame(e)),
                frame => Ok(frame),
            };
        }
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            let frame = match self.link.recv::<RelayToClient>(Some(deadline)) {
                Ok(frame) => frame,
                Err(e) => {
                    let e = ClientError::from(e);
                    return Err(match too_long(&e) {
                        Some(why) => {
                            ClientError::Protocol(format!("{why}; the request is abandoned"))
                        }
                        None => e,
                    });
                }
            };
            match frame {
                Some(RelayToClient::Error(e)) if e.id == Some(id) || e.id.is_none() => {
                    return Err(ClientError::from_frame(e))
                }
                Some(frame) if is_reply(&frame) => return Ok(frame),
                Some(frame) => self.stash.push_back(frame),
                None => return Err(ClientError::Timeout),
            }
        }
    }

    /// Fetches `user`'s public key (PEM) from the server.
    pub fn fetch_key(&mut self, user: &str) -> Result<String, ClientError> {
        let id = self.next_id();
        self.queue(&ClientToRelay::Key {
            id,
            user: user.to_string(),
        });
        self.flush()?;
        match self.wait_reply(
            id,
            |f| matches!(f, RelayToClient::Key { id: got, .. } if *got == id),
        )? {
            RelayToClient::Key { pubkey, .. } => Ok(pubkey),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// The established link and any frames already received, to carry on elsewhere
    /// (the load tester).
    pub fn into_link(self) -> (Link, Vec<RelayToClient>) {
        (self.link, self.stash.into_iter().collect())
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.link.close();
    }
}

/// If `e` is a frame longer than this client takes (skipped: the link is still in
/// step), what to tell the person.
pub fn too_long(e: &ClientError) -> Option<String> {
    match e {
        ClientError::Link(LinkError::Noise(NoiseError::Frame(FrameError::TooLong {
            len,
            max,
        }))) => Some(format!(
            "the relay sent a frame of {len} bytes, more than this client takes ({max})"
        )),
        _ => None,
    }
}
