//! The password's key: argon2id parameters and salt, as written in a store, and the
//! Fernet key they derive.

use super::StoreError;
use crate::e2e;
use argon2::{Algorithm, Argon2, Params, Version};
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use base64::Engine;
use fernet::Fernet;
use std::path::Path;

/// Salt length in bytes.
pub(crate) const SALT_LEN: usize = 16;
/// Largest argon2 memory cost accepted from a header (1 GiB), so a damaged or hostile file
/// cannot make us allocate without bound.
pub(crate) const MAX_M_COST_KIB: u32 = 1 << 20;
/// Largest argon2 time and parallelism costs accepted from a header.
pub(crate) const MAX_T_COST: u32 = 64;
pub(crate) const MAX_P_COST: u32 = 16;

/// Key-derivation parameters and salt, as in the header line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KdfHeader {
    pub(crate) m_cost: u32,
    pub(crate) t_cost: u32,
    pub(crate) p_cost: u32,
    pub(crate) salt: [u8; SALT_LEN],
}

/// Parameters of new stores: RFC 9106's second recommended option (m = 64 MiB, t = 3,
/// p = 4). The password is all that guards a stolen laptop's private key, and a client
/// hashes one password (at each open), so it can afford far more than a server that
/// hashes many (the auth server's m = 19 MiB, t = 2). Stores made earlier keep the
/// parameters their header names.
pub(crate) const NEW_M_COST_KIB: u32 = 64 * 1024;
pub(crate) const NEW_T_COST: u32 = 3;
pub(crate) const NEW_P_COST: u32 = 4;

impl KdfHeader {
    pub(crate) fn new_random() -> Result<KdfHeader, StoreError> {
        Ok(KdfHeader {
            m_cost: NEW_M_COST_KIB,
            t_cost: NEW_T_COST,
            p_cost: NEW_P_COST,
            salt: e2e::try_os_random::<SALT_LEN>().map_err(StoreError::Random)?,
        })
    }

    pub(crate) fn to_line(&self, magic: &str) -> String {
        format!(
            "{magic} argon2id m={} t={} p={} salt={}",
            self.m_cost,
            self.t_cost,
            self.p_cost,
            STANDARD.encode(self.salt)
        )
    }

    /// Parses the header line exactly; `path` is only for messages.
    pub(crate) fn parse(line: &str, magic: &str, path: &Path) -> Result<KdfHeader, StoreError> {
        let corrupt = |what: &str| {
            StoreError::Corrupt(format!("{}: bad header line ({what})", path.display()))
        };
        let rest = line
            .strip_prefix(magic)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or_else(|| corrupt("not the expected format"))?;
        let fields: Vec<&str> = rest.split(' ').collect();
        let [kdf, m, t, p, salt] = fields[..] else {
            return Err(corrupt("expected: argon2id m=.. t=.. p=.. salt=.."));
        };
        if kdf != "argon2id" {
            return Err(corrupt("key derivation is not argon2id"));
        }
        let number = |field: &str, name: &str, min: u32, max: u32| {
            field
                .strip_prefix(name)
                .and_then(|f| f.strip_prefix('='))
                .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|digits| digits.parse::<u32>().ok())
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| corrupt(&format!("{name} must be a number in {min}..={max}")))
        };
        let p_cost = number(p, "p", Params::MIN_P_COST, MAX_P_COST)?;
        let header = KdfHeader {
            m_cost: number(m, "m", Params::MIN_M_COST.max(8 * p_cost), MAX_M_COST_KIB)?,
            t_cost: number(t, "t", Params::MIN_T_COST, MAX_T_COST)?,
            p_cost,
            salt: salt
                .strip_prefix("salt=")
                .and_then(|b64| STANDARD.decode(b64).ok())
                .and_then(|bytes| <[u8; SALT_LEN]>::try_from(bytes).ok())
                .ok_or_else(|| corrupt("salt must be std base64 of 16 bytes"))?,
        };
        Ok(header)
    }

    /// argon2id(password, salt) → Fernet key.
    pub(crate) fn derive_key(&self, password: &str) -> Result<Fernet, StoreError> {
        let params = Params::new(self.m_cost, self.t_cost, self.p_cost, Some(32))
            .map_err(|e| StoreError::Kdf(e.to_string()))?;
        let mut raw = [0u8; 32];
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into(password.as_bytes(), &self.salt, &mut raw)
            .map_err(|e| StoreError::Kdf(e.to_string()))?;
        Fernet::new(&URL_SAFE.encode(raw))
            .ok_or_else(|| StoreError::Kdf("derived key is not a Fernet key".into()))
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    const M: &str = "fastchat-store v1";

    fn header() -> impl Strategy<Value = KdfHeader> {
        (
            1u32..=MAX_P_COST,
            any::<[u8; SALT_LEN]>(),
            0u32..1000,
            1u32..=MAX_T_COST,
        )
            .prop_map(|(p_cost, salt, m_extra, t_cost)| KdfHeader {
                m_cost: (8 * p_cost).max(Params::MIN_M_COST) + m_extra,
                t_cost,
                p_cost,
                salt,
            })
    }

    proptest! {
        #[test]
        fn fuzz_header_round_trip(h in header()) {
            prop_assert_eq!(KdfHeader::parse(&h.to_line(M), M, Path::new("s")).ok(), Some(h));
        }

        #[test]
        fn fuzz_header_mutated(
            h in header(),
            at in any::<usize>(),
            c in any::<char>(),
            line in "(?s).{0,120}",
        ) {
            // Any line parses to parameters within the bounds argon2 (and our memory
            // limit) accept, or is refused as corrupt.
            let good = h.to_line(M);
            let n = good.chars().count();
            let altered: String = good
                .chars()
                .enumerate()
                .map(|(i, x)| if i == at % n { c } else { x })
                .collect();
            for l in [altered.as_str(), line.as_str()] {
                match KdfHeader::parse(l, M, Path::new("s")) {
                    Ok(p) => {
                        prop_assert!(Params::new(p.m_cost, p.t_cost, p.p_cost, Some(32)).is_ok());
                        prop_assert!(p.m_cost <= MAX_M_COST_KIB);
                        prop_assert_eq!(KdfHeader::parse(&p.to_line(M), M, Path::new("s")).ok(), Some(p));
                    }
                    Err(e) => prop_assert!(matches!(e, StoreError::Corrupt(_)), "{e:?}"),
                }
            }
        }
    }
}
