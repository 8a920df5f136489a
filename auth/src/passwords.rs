//! Password hashes: argon2id PHC strings, computed on memory each worker keeps.
//!
//! The argon2 crate's `hash_password` and `verify_password` allocate and zero the whole
//! work area (19 MiB with the default parameters) for every hash, and glibc keeps such
//! areas in its per-thread arenas: the auth server's resident memory reached 280–380 MB
//! under registration load. A worker's [`Passwords`] allocates its area once and reuses
//! it (argon2 overwrites every block, so it needs no zeroing). The strings are the
//! standard PHC format, the same the crate writes and reads.

use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
use argon2::{Algorithm, Argon2, Block, Params, Version};

/// The most work memory a stored hash may ask for (64 MiB, in 1 KiB blocks): ours use
/// 19 MiB; a row asking for more was not written by us and is refused, not obeyed.
const MAX_BLOCKS: usize = 64 * 1024;
/// The most passes a stored hash may ask for (ours make 2), for the same reason.
const MAX_T_COST: u32 = 16;

/// One worker's argon2 work area.
#[derive(Default)]
pub struct Passwords {
    memory: Vec<Block>,
}

impl Passwords {
    pub fn new() -> Passwords {
        Passwords::default()
    }

    fn compute(
        &mut self,
        algorithm: Algorithm,
        version: Version,
        params: &Params,
        password: &[u8],
        salt: &[u8],
        out: &mut [u8],
    ) -> Result<(), String> {
        let blocks = params.block_count();
        if blocks > MAX_BLOCKS || params.t_cost() > MAX_T_COST {
            return Err(format!(
                "a hash asking for {blocks} KiB of memory and {} passes",
                params.t_cost()
            ));
        }
        if self.memory.len() < blocks {
            self.memory.resize(blocks, Block::new());
        }
        Argon2::new(algorithm, version, params.clone())
            .hash_password_into_with_memory(password, salt, out, &mut self.memory[..blocks])
            .map_err(|e| e.to_string())
    }

    /// A new PHC string for `password`: argon2id with the crate's default parameters
    /// (m = 19,456 KiB, t = 2, p = 1) and a random 16-byte salt.
    pub fn hash(&mut self, password: &str) -> Result<String, String> {
        let params = Params::default();
        let salt: [u8; 16] = rand::random();
        let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
        let (algorithm, version) = (Algorithm::Argon2id, Version::V0x13);
        self.compute(
            algorithm,
            version,
            &params,
            password.as_bytes(),
            &salt,
            &mut out,
        )?;
        let phc = PasswordHash {
            algorithm: algorithm.ident(),
            version: Some(version.into()),
            params: ParamsString::try_from(&params).map_err(|e| e.to_string())?,
            salt: Some(Salt::new(&salt).map_err(|e| e.to_string())?),
            hash: Some(Output::new(&out).map_err(|e| e.to_string())?),
        };
        Ok(phc.to_string())
    }

    /// Whether `password` is the one hashed in the PHC string `phc` (`false` for
    /// anything that is not a well-formed argon2 hash). Compared in constant time.
    pub fn verify(&mut self, password: &str, phc: &str) -> bool {
        let Ok(parsed) = PasswordHash::new(phc) else {
            return false;
        };
        let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else {
            return false;
        };
        let Ok(algorithm) = Algorithm::try_from(parsed.algorithm.as_str()) else {
            return false;
        };
        let Ok(version) = parsed
            .version
            .map_or(Ok(Version::default()), Version::try_from)
        else {
            return false;
        };
        let Ok(params) = Params::try_from(&parsed) else {
            return false;
        };
        let mut out = vec![0u8; expected.len()];
        if self
            .compute(
                algorithm,
                version,
                &params,
                password.as_bytes(),
                salt.as_ref(),
                &mut out,
            )
            .is_err()
        {
            return false;
        }
        Output::new(&out).is_ok_and(|computed| computed == *expected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{PasswordHasher, PasswordVerifier};

    #[test]
    fn our_hashes_are_the_crates_hashes() {
        let mut p = Passwords::new();
        let ours = p.hash("correct horse").unwrap();
        assert!(
            ours.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{ours}"
        );
        // The crate reads ours...
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(Argon2::default()
            .verify_password(b"correct horse", &parsed)
            .is_ok());
        assert!(Argon2::default()
            .verify_password(b"wrong", &parsed)
            .is_err());
        // ...and we read the crate's (the rows written before this module).
        let theirs = Argon2::default()
            .hash_password(b"battery staple")
            .unwrap()
            .to_string();
        assert!(p.verify("battery staple", &theirs));
        assert!(!p.verify("battery stapler", &theirs));
        assert!(p.verify("correct horse", &ours));
        assert!(!p.verify("correct horsE", &ours));
        // Salted: the same password hashes differently each time.
        assert_ne!(p.hash("correct horse").unwrap(), ours);
    }

    #[test]
    fn malformed_or_greedy_hashes_never_verify() {
        let mut p = Passwords::new();
        for phc in [
            "",
            "not a hash",
            "$argon2id$v=19$m=19456,t=2,p=1$",
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ",
            "$argon2id$v=99$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
            "$scrypt$ln=15,r=8,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
            // 4 GiB of work memory: refused, not allocated; a million passes: refused.
            "$argon2id$v=19$m=4194304,t=1,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
            "$argon2id$v=19$m=19456,t=1000000,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
        ] {
            assert!(!p.verify("password", phc), "{phc}");
        }
        assert!(p.memory.len() <= MAX_BLOCKS);
    }
}
