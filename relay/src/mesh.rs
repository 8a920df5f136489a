//! The relay mesh: one Noise (`NNpsk0`, cluster secret) link to every other relay in
//! the directory the auth server sends. The relay whose id sorts first dials; the other
//! accepts. A dialled link that drops is dialled again with backoff while the peer is
//! still in the directory. Messages for a user on another relay go over these links.
//!
//! The same port answers `stats_request` from operator tools.

use fastchat_common::proto::PeerRelay;
use mio::Token;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Where a mesh connection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshState {
    /// Waiting for the peer's `hello`.
    AwaitingHello,
    /// Accepted: waiting for `mesh_hello` (a relay) or `stats_request` (a tool).
    AwaitingIntro,
    /// A link with this relay.
    Up(String),
    /// An operator tool asking for stats.
    Admin,
}

/// One mesh connection (its socket is in the reactor's table under the same token).
pub struct MeshLink {
    pub state: MeshState,
    /// For links we dialled: the relay we dialled.
    pub dialled: Option<String>,
}

struct Dial {
    retry_at: Instant,
    backoff: Duration,
}

/// The mesh's state: the directory, the links, and who to dial when.
pub struct Mesh {
    me: String,
    /// Other relays in rotation: id → mesh address.
    peers: BTreeMap<String, String>,
    pub links: HashMap<Token, MeshLink>,
    /// Relay id → the link that is up to it.
    routes: HashMap<String, Token>,
    /// Relays we dial and are not connected to.
    dials: HashMap<String, Dial>,
}

impl Mesh {
    pub fn new(me: String) -> Mesh {
        Mesh {
            me,
            peers: BTreeMap::new(),
            links: HashMap::new(),
            routes: HashMap::new(),
            dials: HashMap::new(),
        }
    }

    /// Whether this relay dials `peer` (rather than waiting for it).
    fn dials_to(&self, peer: &str) -> bool {
        self.me.as_str() < peer
    }

    /// Takes a new directory from the auth server. Returns links to close: those to
    /// relays that left it.
    pub fn set_peers(&mut self, relays: &[PeerRelay], now: Instant) -> Vec<Token> {
        self.peers = relays
            .iter()
            .filter(|r| r.relay_id != self.me)
            .map(|r| (r.relay_id.clone(), r.mesh_addr.clone()))
            .collect();
        self.dials.retain(|id, _| self.peers.contains_key(id));
        let wanted: Vec<String> = self
            .peers
            .keys()
            .filter(|id| self.dials_to(id) && !self.connected_or_dialling(id))
            .cloned()
            .collect();
        for id in wanted {
            self.dials.insert(
                id,
                Dial {
                    retry_at: now,
                    backoff: MIN_BACKOFF,
                },
            );
        }
        self.links
            .iter()
            .filter(|(_, l)| {
                let peer = match &l.state {
                    MeshState::Up(id) => Some(id),
                    _ => l.dialled.as_ref(),
                };
                peer.is_some_and(|id| !self.peers.contains_key(id))
            })
            .map(|(t, _)| *t)
            .collect()
    }

    fn connected_or_dialling(&self, id: &str) -> bool {
        self.routes.contains_key(id)
            || self
                .links
                .values()
                .any(|l| l.dialled.as_deref() == Some(id))
    }

    /// Relays due to be dialled now, with their addresses; they count as dialling
    /// until [`Mesh::dial_failed`] or [`Mesh::link_closed`].
    pub fn due_dials(&mut self, now: Instant) -> Vec<(String, String)> {
        let due: Vec<String> = self
            .dials
            .iter()
            .filter(|(_, d)| d.retry_at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        due.into_iter()
            .filter_map(|id| {
                let addr = self.peers.get(&id)?.clone();
                Some((id, addr))
            })
            .collect()
    }

    /// A dial could not even start: try again later.
    pub fn dial_failed(&mut self, id: &str, now: Instant) {
        if let Some(d) = self.dials.get_mut(id) {
            let jitter = Duration::from_millis(
                rand::random::<u64>() % (d.backoff.as_millis() as u64 / 2 + 1),
            );
            d.retry_at = now + d.backoff + jitter;
            d.backoff = (d.backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// A dialled connection exists now (handshake pending).
    pub fn dialled(&mut self, token: Token, id: String) {
        // While the link exists it is not dialled again; closing it re-schedules.
        self.dials.remove(&id);
        self.links.insert(
            token,
            MeshLink {
                state: MeshState::AwaitingHello,
                dialled: Some(id),
            },
        );
    }

    /// An accepted connection.
    pub fn accepted(&mut self, token: Token) {
        self.links.insert(
            token,
            MeshLink {
                state: MeshState::AwaitingHello,
                dialled: None,
            },
        );
    }

    /// The link on `token` is up to relay `id`. Returns an older link to the same relay
    /// to close.
    pub fn link_up(&mut self, token: Token, id: String) -> Option<Token> {
        if let Some(link) = self.links.get_mut(&token) {
            link.state = MeshState::Up(id.clone());
        }
        if let Some(d) = self.dials.get_mut(&id) {
            d.backoff = MIN_BACKOFF;
        }
        self.dials.remove(&id);
        self.routes.insert(id, token).filter(|old| *old != token)
    }

    /// The link on `token` is gone; returns it. A dialled peer still in the directory is
    /// dialled again after a backoff.
    pub fn link_closed(&mut self, token: Token, now: Instant) -> Option<MeshLink> {
        let link = self.links.remove(&token)?;
        if let MeshState::Up(id) = &link.state {
            if self.routes.get(id) == Some(&token) {
                self.routes.remove(id);
            }
        }
        let peer = match &link.state {
            MeshState::Up(id) => Some(id.clone()),
            _ => link.dialled.clone(),
        };
        if let Some(id) = peer {
            if self.peers.contains_key(&id) && self.dials_to(&id) && !self.routes.contains_key(&id)
            {
                let backoff = self.dials.get(&id).map_or(MIN_BACKOFF, |d| d.backoff);
                self.dials.insert(
                    id.clone(),
                    Dial {
                        retry_at: now,
                        backoff,
                    },
                );
                self.dial_failed(&id, now);
            }
        }
        Some(link)
    }

    /// The link to relay `id`, if one is up.
    pub fn route(&self, id: &str) -> Option<Token> {
        self.routes.get(id).copied()
    }

    /// For `stats`: each relay in the directory and whether its link is up.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.peers
                .iter()
                .map(|(id, addr)| {
                    serde_json::json!({
                        "relay_id": id,
                        "mesh_addr": addr,
                        "link": if self.routes.contains_key(id) { "up" } else { "down" },
                    })
                })
                .collect(),
        )
    }

    /// Links that are up.
    pub fn links_up(&self) -> usize {
        self.routes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str) -> PeerRelay {
        PeerRelay {
            relay_id: id.into(),
            mesh_addr: format!("127.0.0.1:{}", id.len()),
        }
    }

    #[test]
    fn dials_only_relays_that_sort_after_it() {
        let mut m = Mesh::new("relay-2".into());
        let now = Instant::now();
        m.set_peers(&[peer("relay-1"), peer("relay-2"), peer("relay-3")], now);
        let due: Vec<String> = m.due_dials(now).into_iter().map(|(id, _)| id).collect();
        assert_eq!(due, vec!["relay-3".to_string()]);
        m.dial_failed("relay-3", now);
        assert!(m.due_dials(now).is_empty(), "backs off after a failure");
        assert_eq!(m.due_dials(now + MAX_BACKOFF * 2).len(), 1);
        // Leaving the directory stops the dialling.
        m.set_peers(&[peer("relay-1"), peer("relay-2")], now);
        assert!(m.due_dials(now + MAX_BACKOFF * 2).is_empty());
    }
}
