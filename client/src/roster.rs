//! Signed group rosters (PROTOCOL.md §7.9): who is in a group is what its members
//! signed, not what the relay says.
//!
//! Every membership change is a statement signed (RSA-PSS) by the member who makes it
//! and naming the previous statement's hash, so the chain from the group's creation
//! cannot be forged, reordered or cut short by the server. Clients verify the chain,
//! keep the roster it yields, and hand the group key only to members of it and take
//! grants only from its admins. Two different statements at one place of a chain
//! prove a misbehaving server: the client says so.

use crate::e2e::{E2eError, Identity, PeerKey};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rsa::sha2::{Digest, Sha256};
use serde::{Deserialize, Serialize};

/// `prev` of a chain's first statement.
pub const NO_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Domain separation of roster signatures.
const CONTEXT: &str = "fastchat-roster-v1";

/// One signed membership change.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub group_id: i64,
    /// Its place in the chain, from 0 (the creation).
    pub seq: i32,
    /// The previous statement's hash ([`NO_PREV`] for the first).
    pub prev: String,
    /// `create`, `add`, `remove`, `promote` or `leave`.
    pub op: String,
    /// Who is created-with, added, removed, promoted, or leaves.
    pub user: String,
    /// Who signed it.
    pub by: String,
    /// The group key's epoch after it: 1 at the creation, one more at each `remove`
    /// and `leave`, unchanged otherwise.
    pub epoch: i32,
    /// The signer's clock, unix ms.
    pub ts: u64,
    /// Std base64 of the RSA-PSS(SHA-256) signature by `by` over [`Statement::signed`].
    pub sig: String,
}

impl Statement {
    /// An unsigned statement, stamped now (see [`Statement::signed_by`]).
    pub fn new(
        group_id: i64,
        seq: i32,
        prev: &str,
        op: &str,
        user: &str,
        by: &str,
        epoch: i32,
    ) -> Statement {
        Statement {
            group_id,
            seq,
            prev: prev.to_string(),
            op: op.to_string(),
            user: user.to_string(),
            by: by.to_string(),
            epoch,
            ts: fastchat_common::time::now_ms(),
            sig: String::new(),
        }
    }

    /// The epoch a statement of `op` after `roster` must carry.
    pub fn epoch_after(roster: Option<&Roster>, op: &str) -> i32 {
        match (roster, op) {
            (None, _) => 1,
            (Some(r), "remove" | "leave") => r.epoch.saturating_add(1),
            (Some(r), _) => r.epoch,
        }
    }

    /// Signs it with `me` (the key of `by`).
    pub fn signed_by(mut self, me: &Identity) -> Result<Statement, E2eError> {
        self.sig = STANDARD.encode(me.sign(&self.signed())?);
        Ok(self)
    }

    /// The bytes the signature covers: the context and every field, one per line.
    fn signed(&self) -> Vec<u8> {
        format!(
            "{CONTEXT}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
            self.group_id, self.seq, self.prev, self.op, self.user, self.by, self.epoch, self.ts
        )
        .into_bytes()
    }

    /// Lowercase hex SHA-256 of the signed bytes, a newline and the signature: what the
    /// next statement names as `prev`.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.signed());
        h.update(b"\n");
        h.update(self.sig.as_bytes());
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The JSON the relay stores.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a statement of strings and integers serialises")
    }

    /// Parses a stored statement.
    pub fn from_json(json: &str) -> Result<Statement, RosterError> {
        serde_json::from_str(json).map_err(|e| RosterError::Malformed(e.to_string()))
    }
}

/// The members of a group as its verified chain says, in the order they joined.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Roster {
    pub group_id: i64,
    /// The last statement applied, and its hash.
    pub seq: i32,
    pub head: String,
    /// The group key's epoch the chain has reached.
    pub epoch: i32,
    /// (user, role): `admin` or `member`.
    pub members: Vec<(String, String)>,
    /// The last statement applied (whose hash is `head`): what a different statement
    /// at its place is compared with (two of them prove a misbehaving server).
    #[serde(default)]
    pub last: Option<Statement>,
    /// The roster before `last` (`None` before the creation; its own `prior` is
    /// dropped): what a statement competing with `last` is checked against.
    #[serde(default)]
    pub prior: Option<Box<Roster>>,
}

impl Roster {
    /// Whether `user` is a member.
    pub fn is_member(&self, user: &str) -> bool {
        self.members.iter().any(|(u, _)| u == user)
    }

    /// Whether `user` is an admin.
    pub fn is_admin(&self, user: &str) -> bool {
        self.members.iter().any(|(u, r)| u == user && r == "admin")
    }

    /// The next statement's place and `prev`.
    pub fn next(&self) -> (i32, String) {
        (self.seq + 1, self.head.clone())
    }
}

/// Why a chain does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RosterError {
    #[error("a roster statement is not valid JSON: {0}")]
    Malformed(String),
    #[error("roster statement {seq} of group #{group_id} does not follow the chain: {why}")]
    Broken {
        group_id: i64,
        seq: i32,
        why: String,
    },
    #[error("roster statement {seq} of group #{group_id} is not signed by {by}")]
    BadSignature { group_id: i64, seq: i32, by: String },
}

/// Checks `s`'s signature against its signer's pinned key `by_key`.
pub fn verify(s: &Statement, by_key: &PeerKey) -> Result<(), RosterError> {
    let bad = || RosterError::BadSignature {
        group_id: s.group_id,
        seq: s.seq,
        by: s.by.clone(),
    };
    let sig = STANDARD.decode(&s.sig).map_err(|_| bad())?;
    by_key.verify(&s.signed(), &sig).map_err(|_| bad())
}

/// Whether `theirs` (whose signer's pinned key is `by_key`) proves with `roster` that
/// the server shows two histories of one group: another statement of the group at the
/// place of the roster's last one, naming the same previous statement, that follows
/// the roster before it as validly as the last one did (signed, by a member entitled
/// to make it, with the right epoch).
pub fn forks(roster: &Roster, theirs: &Statement, by_key: &PeerKey) -> bool {
    let Some(ours) = &roster.last else {
        return false;
    };
    theirs.group_id == roster.group_id
        && theirs.seq == ours.seq
        && theirs.prev == ours.prev
        && theirs.hash() != ours.hash()
        && apply(roster.prior.as_deref(), theirs, by_key).is_ok()
}

/// Applies `s` (whose signer's pinned key is `by_key`) to `roster` (`None` before the
/// creation): the new roster, or why `s` does not follow.
pub fn apply(
    roster: Option<&Roster>,
    s: &Statement,
    by_key: &PeerKey,
) -> Result<Roster, RosterError> {
    let broken = |why: &str| RosterError::Broken {
        group_id: s.group_id,
        seq: s.seq,
        why: why.to_string(),
    };
    verify(s, by_key)?;
    if s.epoch != Statement::epoch_after(roster, &s.op) {
        return Err(broken("its epoch does not follow the chain"));
    }
    let Some(r) = roster else {
        if s.seq != 0 || s.prev != NO_PREV || s.op != "create" || s.user != s.by {
            return Err(broken("a chain starts with its creator's `create`"));
        }
        return Ok(Roster {
            group_id: s.group_id,
            seq: 0,
            head: s.hash(),
            epoch: s.epoch,
            members: vec![(s.by.clone(), "admin".into())],
            last: Some(s.clone()),
            prior: None,
        });
    };
    if s.group_id != r.group_id {
        return Err(broken("it is of another group"));
    }
    if s.seq != r.seq + 1 || s.prev != r.head {
        return Err(broken("it does not name the previous statement"));
    }
    let mut members = r.members.clone();
    match s.op.as_str() {
        "add" if r.is_admin(&s.by) && !r.is_member(&s.user) => {
            members.push((s.user.clone(), "member".into()));
        }
        "remove" if r.is_admin(&s.by) && r.is_member(&s.user) && s.user != s.by => {
            members.retain(|(u, _)| *u != s.user);
        }
        "promote" if r.is_admin(&s.by) && r.is_member(&s.user) => {
            for (u, role) in &mut members {
                if *u == s.user {
                    *role = "admin".into();
                }
            }
        }
        "leave" if s.user == s.by && r.is_member(&s.user) => {
            members.retain(|(u, _)| *u != s.user);
            // As the relay does: the last admin leaving makes the longest-standing
            // member admin.
            if !members.iter().any(|(_, role)| role == "admin") {
                if let Some((_, role)) = members.first_mut() {
                    *role = "admin".into();
                }
            }
        }
        _ => return Err(broken(&format!("{} may not {} {}", s.by, s.op, s.user))),
    }
    Ok(Roster {
        group_id: r.group_id,
        seq: s.seq,
        head: s.hash(),
        epoch: s.epoch,
        members,
        last: Some(s.clone()),
        prior: Some(Box::new(Roster {
            prior: None,
            ..r.clone()
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> &'static [(String, Identity)] {
        static IDS: std::sync::OnceLock<Vec<(String, Identity)>> = std::sync::OnceLock::new();
        IDS.get_or_init(|| {
            ["alice", "bob", "carol"]
                .iter()
                .map(|n| (n.to_string(), Identity::generate().unwrap()))
                .collect()
        })
    }

    fn id(name: &str) -> &'static Identity {
        &ids().iter().find(|(n, _)| n == name).unwrap().1
    }

    fn step(r: Option<&Roster>, op: &str, user: &str, by: &str) -> Result<Roster, RosterError> {
        let (seq, prev) = r.map_or((0, NO_PREV.to_string()), Roster::next);
        let s = Statement::new(7, seq, &prev, op, user, by, Statement::epoch_after(r, op))
            .signed_by(id(by))
            .unwrap();
        apply(
            r,
            &Statement::from_json(&s.to_json()).unwrap(),
            id(by).peer_key(),
        )
    }

    #[test]
    fn a_chain_yields_the_members_its_admins_signed() {
        let r = step(None, "create", "alice", "alice").unwrap();
        let r = step(Some(&r), "add", "bob", "alice").unwrap();
        let r = step(Some(&r), "add", "carol", "alice").unwrap();
        assert!(r.is_member("carol") && !r.is_admin("bob"));
        // A member cannot add or remove; an admin can promote.
        assert!(step(Some(&r), "add", "mallory", "bob").is_err());
        assert!(step(Some(&r), "remove", "carol", "bob").is_err());
        let r = step(Some(&r), "promote", "bob", "alice").unwrap();
        let r = step(Some(&r), "remove", "carol", "bob").unwrap();
        assert_eq!(
            r.members,
            [
                ("alice".to_string(), "admin".to_string()),
                ("bob".into(), "admin".into())
            ]
        );
        // The last admin leaving promotes the longest-standing member.
        let r = step(Some(&r), "leave", "alice", "alice").unwrap();
        let r2 = step(Some(&r), "add", "carol", "bob").unwrap();
        let r3 = step(Some(&r2), "leave", "bob", "bob").unwrap();
        assert!(r3.is_admin("carol"));
    }

    #[test]
    fn forged_reordered_and_foreign_statements_are_refused() {
        let r = step(None, "create", "alice", "alice").unwrap();
        // Signed by someone else than it says.
        let (seq, prev) = r.next();
        let s = Statement::new(7, seq, &prev, "add", "mallory", "alice", 1)
            .signed_by(id("bob"))
            .unwrap();
        assert!(matches!(
            apply(Some(&r), &s, id("alice").peer_key()),
            Err(RosterError::BadSignature { .. })
        ));
        // Naming another previous statement, or the wrong place.
        let s = Statement::new(7, seq, NO_PREV, "add", "bob", "alice", 1)
            .signed_by(id("alice"))
            .unwrap();
        assert!(apply(Some(&r), &s, id("alice").peer_key()).is_err());
        let s = Statement::new(7, seq + 1, &prev, "add", "bob", "alice", 1)
            .signed_by(id("alice"))
            .unwrap();
        assert!(apply(Some(&r), &s, id("alice").peer_key()).is_err());
        // Another group's statement.
        let s = Statement::new(8, seq, &prev, "add", "bob", "alice", 1)
            .signed_by(id("alice"))
            .unwrap();
        assert!(apply(Some(&r), &s, id("alice").peer_key()).is_err());
        // A chain must start with its creator's create.
        let s = Statement::new(7, 0, NO_PREV, "create", "alice", "bob", 1)
            .signed_by(id("bob"))
            .unwrap();
        assert!(apply(None, &s, id("bob").peer_key()).is_err());
        // An epoch that does not follow: an `add` may not move it, a `remove` moves it
        // by exactly one.
        let (seq, prev) = r.next();
        let s = Statement::new(7, seq, &prev, "add", "bob", "alice", i32::MAX)
            .signed_by(id("alice"))
            .unwrap();
        assert!(apply(Some(&r), &s, id("alice").peer_key()).is_err());
        let r2 = step(Some(&r), "add", "bob", "alice").unwrap();
        let (seq, prev) = r2.next();
        let s = Statement::new(7, seq, &prev, "remove", "bob", "alice", 1)
            .signed_by(id("alice"))
            .unwrap();
        assert!(apply(Some(&r2), &s, id("alice").peer_key()).is_err());
        assert_eq!(step(Some(&r2), "remove", "bob", "alice").unwrap().epoch, 2);
        // Altered after signing.
        let (seq, prev) = r.next();
        let mut s = Statement::new(7, seq, &prev, "add", "bob", "alice", 1)
            .signed_by(id("alice"))
            .unwrap();
        s.user = "mallory".into();
        assert!(apply(Some(&r), &s, id("alice").peer_key()).is_err());
    }

    #[test]
    fn two_statements_at_one_place_prove_a_fork() {
        let r = step(None, "create", "alice", "alice").unwrap();
        let r = step(Some(&r), "add", "bob", "alice").unwrap();
        let r = step(Some(&r), "promote", "bob", "alice").unwrap();
        let ours = step(Some(&r), "add", "carol", "alice").unwrap();
        let theirs = step(Some(&r), "add", "dave", "bob").unwrap();
        let theirs = theirs.last.unwrap();
        let bob = id("bob").peer_key();
        assert!(forks(&ours, &theirs, bob));
        assert!(
            !forks(&ours, ours.last.as_ref().unwrap(), id("alice").peer_key()),
            "the same one"
        );
        // Another place, or another previous statement, is no proof of a fork.
        let later = step(Some(&ours), "add", "erin", "alice").unwrap();
        assert!(!forks(&later, &theirs, bob));
        assert!(!forks(&r, &theirs, bob));
        // Nor is one its signer was not entitled to make there (carol is no admin), nor
        // one of another group.
        let (seq, prev) = r.next();
        let by_carol = Statement::new(7, seq, &prev, "add", "dave", "carol", 1)
            .signed_by(id("carol"))
            .unwrap();
        assert!(!forks(&ours, &by_carol, id("carol").peer_key()));
        let other_group = Statement::new(8, seq, &prev, "add", "dave", "bob", 1)
            .signed_by(id("bob"))
            .unwrap();
        assert!(!forks(&ours, &other_group, bob));
        assert!(verify(&theirs, id("bob").peer_key()).is_ok());
        assert!(verify(&theirs, id("alice").peer_key()).is_err());
    }
}
