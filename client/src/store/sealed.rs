//! Records at rest: every secret the store keeps is a Fernet token under the store's
//! random data key, and every name it looks up by is a keyed hash, so the file shows no
//! plaintext and no peer names.

use super::StoreError;
use crate::e2e;
use base64::engine::general_purpose::URL_SAFE;
use base64::Engine;
use fernet::Fernet;
use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::Sha256;

/// The data key: 32 random bytes (a Fernet key: 16 for HMAC, 16 for AES), wrapped in the
/// store by the key derived from the password.
pub(crate) struct Sealer {
    fernet: Fernet,
    /// The data key itself (url-safe base64), to wrap it again under a new password.
    data_key: String,
    /// HMAC-SHA-256 key of the look-up hashes: HMAC(data key, "fastchat-store lookup").
    lookup: [u8; 32],
}

impl Sealer {
    /// The sealer of a data key given as url-safe base64 (as wrapped in `meta`).
    pub(crate) fn new(data_key_b64: &str) -> Result<Sealer, StoreError> {
        let raw = URL_SAFE
            .decode(data_key_b64)
            .ok()
            .filter(|k| k.len() == 32)
            .ok_or_else(|| StoreError::Corrupt("the data key is not 32 bytes".into()))?;
        let fernet = Fernet::new(data_key_b64)
            .ok_or_else(|| StoreError::Corrupt("the data key is not a Fernet key".into()))?;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&raw).expect("HMAC takes any key");
        mac.update(b"fastchat-store lookup");
        let lookup = mac.finalize().into_bytes().into();
        Ok(Sealer {
            fernet,
            data_key: data_key_b64.to_string(),
            lookup,
        })
    }

    /// The data key, url-safe base64.
    pub(crate) fn data_key(&self) -> &str {
        &self.data_key
    }

    /// A fresh random data key, url-safe base64.
    pub(crate) fn new_data_key() -> Result<String, StoreError> {
        let raw = e2e::try_os_random::<32>().map_err(StoreError::Random)?;
        Ok(URL_SAFE.encode(raw))
    }

    /// The keyed hash of `name` in `domain` (domains keep a peer called "x" apart from a
    /// conversation called "x").
    pub(crate) fn hash(&self, domain: &str, name: &str) -> Vec<u8> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.lookup).expect("any key");
        mac.update(domain.as_bytes());
        mac.update(&[0]);
        mac.update(name.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// Seals a record (its JSON).
    pub(crate) fn seal<T: Serialize>(&self, value: &T) -> String {
        let json = serde_json::to_vec(value).expect("store records serialise to JSON");
        self.fernet.encrypt(&json)
    }

    /// Opens a record; a token that does not verify, or JSON of another shape, is
    /// [`StoreError::Corrupt`] (`what` names it).
    pub(crate) fn open<T: DeserializeOwned>(
        &self,
        token: &str,
        what: &str,
    ) -> Result<T, StoreError> {
        let json = e2e::fernet_decrypt(&self.fernet, token)
            .map_err(|_| StoreError::Corrupt(format!("{what}: a record does not verify")))?;
        serde_json::from_slice(&json)
            .map_err(|e| StoreError::Corrupt(format!("{what}: a record is not valid: {e}")))
    }

    /// Fernet token of raw bytes (the wrapped data key under the password key).
    pub(crate) fn wrap(password_key: &Fernet, data_key_b64: &str) -> String {
        password_key.encrypt(data_key_b64.as_bytes())
    }

    /// Unwraps the data key; `None` when the password key does not verify the token.
    pub(crate) fn unwrap(password_key: &Fernet, wrapped: &str) -> Option<String> {
        let raw = e2e::fernet_decrypt(password_key, wrapped).ok()?;
        String::from_utf8(raw).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_keyed_and_domain_separated() {
        let a = Sealer::new(&Sealer::new_data_key().unwrap()).unwrap();
        let b = Sealer::new(&Sealer::new_data_key().unwrap()).unwrap();
        assert_eq!(a.hash("peer", "bob"), a.hash("peer", "bob"));
        assert_ne!(a.hash("peer", "bob"), b.hash("peer", "bob"));
        assert_ne!(a.hash("peer", "bob"), a.hash("conv", "bob"));
        assert_ne!(a.hash("pe", "erbob"), a.hash("peer", "bob"));
    }

    #[test]
    fn records_round_trip_and_other_keys_fail() {
        let a = Sealer::new(&Sealer::new_data_key().unwrap()).unwrap();
        let b = Sealer::new(&Sealer::new_data_key().unwrap()).unwrap();
        let token = a.seal(&("secret text", 7));
        assert!(!token.contains("secret"));
        let back: (String, i32) = a.open(&token, "t").unwrap();
        assert_eq!(back, ("secret text".to_string(), 7));
        assert!(b.open::<(String, i32)>(&token, "t").is_err());
        assert!(Sealer::new("short").is_err());
    }
}
