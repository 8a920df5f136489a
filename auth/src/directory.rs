//! The relay directory: which relays are live, where clients reach them, their keys and
//! loads, and the choice of the least-loaded relay for each login.

use mio::Token;
use std::collections::HashMap;

/// One live relay, keyed by the token of its control link.
#[derive(Debug, Clone)]
pub struct RelayEntry {
    pub relay_id: String,
    pub client_addr: String,
    pub static_key: String,
    /// Where other relays and operator tools reach the relay.
    pub mesh_addr: String,
    /// Clients the relay last reported, plus tickets sent to it since.
    pub clients: u32,
    /// Where operator tools reach the relay's stats port, if it has one.
    pub stats_addr: Option<String>,
}

/// Live relays. A relay is in rotation exactly while its control link is up.
#[derive(Default)]
pub struct RelayDirectory {
    relays: HashMap<Token, RelayEntry>,
}

impl RelayDirectory {
    /// Adds or replaces the relay on `link`. An older link announcing the same relay id
    /// is dropped from rotation and returned so the caller can close it.
    pub fn add(&mut self, link: Token, entry: RelayEntry) -> Option<Token> {
        let stale = self
            .relays
            .iter()
            .find(|(t, e)| **t != link && e.relay_id == entry.relay_id)
            .map(|(t, _)| *t);
        if let Some(t) = stale {
            self.relays.remove(&t);
        }
        self.relays.insert(link, entry);
        stale
    }

    /// Takes the relay on `link` out of rotation.
    pub fn remove(&mut self, link: Token) -> Option<RelayEntry> {
        self.relays.remove(&link)
    }

    /// Records the relay's own count of its clients.
    pub fn set_load(&mut self, link: Token, clients: u32) {
        if let Some(e) = self.relays.get_mut(&link) {
            e.clients = clients;
        }
    }

    /// The live relay with the fewest clients (ties go to the smallest id, so choices
    /// are predictable), counting the new client against it at once so a burst of
    /// logins spreads before the relays report.
    pub fn pick_least_loaded(&mut self) -> Option<(Token, RelayEntry)> {
        let (token, entry) = self
            .relays
            .iter_mut()
            .min_by(|a, b| (a.1.clients, &a.1.relay_id).cmp(&(b.1.clients, &b.1.relay_id)))?;
        entry.clients += 1;
        Some((*token, entry.clone()))
    }

    /// Every relay in rotation, for the `peers` frame, sorted by id.
    pub fn peers(&self) -> Vec<fastchat_common::proto::PeerRelay> {
        let mut out: Vec<_> = self
            .relays
            .values()
            .map(|e| fastchat_common::proto::PeerRelay {
                relay_id: e.relay_id.clone(),
                mesh_addr: e.mesh_addr.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.relay_id.cmp(&b.relay_id));
        out
    }

    /// Where clients reach every relay in rotation, sorted by id: the places a client
    /// may resume directly after losing its relay.
    pub fn client_addrs(&self) -> Vec<fastchat_common::proto::RelayAddr> {
        let mut relays: Vec<&RelayEntry> = self.relays.values().collect();
        relays.sort_by(|a, b| a.relay_id.cmp(&b.relay_id));
        relays
            .into_iter()
            .map(|e| fastchat_common::proto::RelayAddr {
                relay_addr: e.client_addr.clone(),
                relay_key: e.static_key.clone(),
            })
            .collect()
    }

    /// The control links of the relays in rotation.
    pub fn links(&self) -> Vec<Token> {
        self.relays.keys().copied().collect()
    }

    /// The directory as JSON, for `stats`.
    pub fn describe(&self) -> serde_json::Value {
        let mut relays: Vec<&RelayEntry> = self.relays.values().collect();
        relays.sort_by(|a, b| a.relay_id.cmp(&b.relay_id));
        serde_json::Value::Array(
            relays
                .into_iter()
                .map(|e| {
                    serde_json::json!({
                        "relay_id": e.relay_id,
                        "client_addr": e.client_addr,
                        "mesh_addr": e.mesh_addr,
                        "stats_addr": e.stats_addr,
                        "clients": e.clients,
                    })
                })
                .collect(),
        )
    }

    /// The relay on `link`, if it is in rotation.
    pub fn get(&self, link: Token) -> Option<&RelayEntry> {
        self.relays.get(&link)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, clients: u32) -> RelayEntry {
        RelayEntry {
            relay_id: id.into(),
            client_addr: "127.0.0.1:1".into(),
            static_key: "00".into(),
            mesh_addr: "127.0.0.1:2".into(),
            clients,
            stats_addr: None,
        }
    }

    #[test]
    fn spreads_logins_over_relays() {
        let mut d = RelayDirectory::default();
        d.add(Token(1), entry("r1", 0));
        d.add(Token(2), entry("r2", 0));
        d.add(Token(3), entry("r3", 5));
        let mut counts: HashMap<String, u32> = HashMap::new();
        for _ in 0..13 {
            let (_, e) = d.pick_least_loaded().unwrap();
            *counts.entry(e.relay_id).or_insert(0) += 1;
        }
        // r1 and r2 catch up with r3's 5, then all three share the rest.
        assert_eq!(counts["r1"], 6);
        assert_eq!(counts["r2"], 6);
        assert_eq!(counts["r3"], 1);
    }

    #[test]
    fn same_id_replaces_older_link_and_removal_leaves_rotation() {
        let mut d = RelayDirectory::default();
        d.add(Token(1), entry("r1", 0));
        assert_eq!(d.add(Token(2), entry("r1", 0)), Some(Token(1)));
        assert_eq!(d.relays.len(), 1);
        d.remove(Token(2));
        assert!(d.pick_least_loaded().is_none());
    }
}
