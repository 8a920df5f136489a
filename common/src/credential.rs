//! Resumption credentials: minted by the auth server after a password login, presented
//! to the auth server (`resume`) or straight to a relay (`resume`, after a failover).
//! Both servers check them the same way, against the hash the auth server keeps.

use sha2::{Digest, Sha256};

/// What is kept of a credential: its SHA-256.
pub fn hash(credential: &str) -> Vec<u8> {
    Sha256::digest(credential.as_bytes()).to_vec()
}

/// The user's id if credential hash `$2` is `$1`'s and neither expired nor revoked.
pub const LOOKUP: &str = "SELECT u.id FROM users u JOIN resume_credentials r ON r.user_id = u.id
     WHERE u.name = $1 AND r.hash = $2 AND r.expires_at > now()";
