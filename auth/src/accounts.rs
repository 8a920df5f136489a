//! Accounts: name and password rules, and the worker-side jobs that hash passwords
//! (argon2id) and read or write the `users` table. Runs on the worker pool, never on the
//! poll loop.

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use fastchat_common::db::DbPool;
use fastchat_common::pool::Completions;
use fastchat_common::proto::{valid_user_name, ErrorCode};
use mio::Token;
use std::net::IpAddr;
use std::sync::OnceLock;

/// Shortest password accepted at registration.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest password accepted (argon2 is fine with more; this bounds work per request).
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Largest public key accepted (a 3072-bit RSA SPKI PEM is ~630 bytes).
pub const MAX_PUBKEY_BYTES: usize = 4096;

/// Checks what `register` carries; the error to send back if something is wrong.
pub fn check_registration(
    user: &str,
    password: &str,
    pubkey: &str,
) -> Result<(), (ErrorCode, String)> {
    if !valid_user_name(user) {
        return Err((
            ErrorCode::InvalidName,
            "user names are 1-32 characters of a-z, 0-9, '_', '.' and '-'".into(),
        ));
    }
    if password.chars().count() < MIN_PASSWORD_CHARS || password.len() > MAX_PASSWORD_BYTES {
        return Err((
            ErrorCode::WeakPassword,
            format!("passwords must be at least {MIN_PASSWORD_CHARS} characters"),
        ));
    }
    let pem = pubkey.trim();
    if pem.len() > MAX_PUBKEY_BYTES
        || !pem.starts_with("-----BEGIN PUBLIC KEY-----")
        || !pem.ends_with("-----END PUBLIC KEY-----")
    {
        return Err((
            ErrorCode::BadKey,
            "the public key must be an RSA SubjectPublicKeyInfo PEM".into(),
        ));
    }
    Ok(())
}

/// Work for the pool.
#[derive(Debug)]
pub enum Job {
    Register {
        conn: Token,
        req: u64,
        user: String,
        password: String,
        pubkey: String,
    },
    Login {
        conn: Token,
        req: u64,
        user: String,
        password: String,
        addr: IpAddr,
    },
}

impl Job {
    /// Shard key: jobs about one name run in order on one worker.
    pub fn shard(&self) -> u64 {
        let name = match self {
            Job::Register { user, .. } | Job::Login { user, .. } => user,
        };
        name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    }
}

/// Results for the poll loop.
#[derive(Debug)]
pub enum Done {
    Registered {
        conn: Token,
        req: u64,
        user: String,
    },
    LoggedIn {
        conn: Token,
        req: u64,
        user: String,
        user_id: i64,
        addr: IpAddr,
    },
    Refused {
        conn: Token,
        req: u64,
        code: ErrorCode,
        message: String,
        /// For a failed login: whose attempt it was (the limiter keeps counting it).
        login: Option<(String, IpAddr)>,
    },
}

/// A hash to verify against when the user does not exist, so an unknown name costs the
/// same time as a wrong password.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        Argon2::default()
            .hash_password(b"fastchat-timing-equaliser")
            .map(|h| h.to_string())
            .unwrap_or_default()
    })
}

fn verify(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// Runs one batch of jobs; each job is independent (argon2 dominates, not commits).
pub fn run_batch(db: &DbPool, done: &Completions<Done>, jobs: Vec<Job>) {
    let results: Vec<Done> = jobs.into_iter().map(|job| run_job(db, job)).collect();
    done.send_all(results);
}

fn store_error(
    conn: Token,
    req: u64,
    login: Option<(String, IpAddr)>,
    e: impl std::fmt::Display,
) -> Done {
    fastchat_common::warn!("database error: {e}");
    Done::Refused {
        conn,
        req,
        code: ErrorCode::StoreFailed,
        message: "the account store is unavailable; try again".into(),
        login,
    }
}

fn run_job(db: &DbPool, job: Job) -> Done {
    match job {
        Job::Register {
            conn,
            req,
            user,
            password,
            pubkey,
        } => {
            let hash = match Argon2::default().hash_password(password.as_bytes()) {
                Ok(h) => h.to_string(),
                Err(e) => return store_error(conn, req, None, e),
            };
            let mut client = match db.get() {
                Ok(c) => c,
                Err(e) => return store_error(conn, req, None, e),
            };
            let inserted = client.query_opt(
                "INSERT INTO users (name, password_hash, pubkey) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO NOTHING RETURNING id",
                &[&user, &hash, &pubkey.trim()],
            );
            match inserted {
                Ok(Some(_)) => Done::Registered { conn, req, user },
                Ok(None) => Done::Refused {
                    conn,
                    req,
                    code: ErrorCode::NameTaken,
                    message: format!("the name {user} is taken"),
                    login: None,
                },
                Err(e) => store_error(conn, req, None, e),
            }
        }
        Job::Login {
            conn,
            req,
            user,
            password,
            addr,
        } => {
            let who = Some((user.clone(), addr));
            let mut client = match db.get() {
                Ok(c) => c,
                Err(e) => return store_error(conn, req, who, e),
            };
            let row = match client.query_opt(
                "SELECT id, password_hash FROM users WHERE name = $1",
                &[&user],
            ) {
                Ok(row) => row,
                Err(e) => return store_error(conn, req, who, e),
            };
            let (user_id, phc): (Option<i64>, String) = match row {
                Some(r) => (Some(r.get(0)), r.get(1)),
                None => (None, dummy_hash().to_string()),
            };
            match (verify(&password, &phc), user_id) {
                (true, Some(user_id)) => Done::LoggedIn {
                    conn,
                    req,
                    user,
                    user_id,
                    addr,
                },
                _ => Done::Refused {
                    conn,
                    req,
                    code: ErrorCode::BadCredentials,
                    message: "unknown user or wrong password".into(),
                    login: who,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_checks() {
        let pem = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
        assert!(check_registration("alice", "password1", pem).is_ok());
        assert_eq!(
            check_registration("alice", "short", pem).unwrap_err().0,
            ErrorCode::WeakPassword
        );
        assert_eq!(
            check_registration("alice", "password1", "junk")
                .unwrap_err()
                .0,
            ErrorCode::BadKey
        );
        assert_eq!(
            check_registration("ALICE", "password1", pem).unwrap_err().0,
            ErrorCode::InvalidName
        );
    }

    #[test]
    fn hashes_verify() {
        let h = Argon2::default()
            .hash_password(b"password1")
            .unwrap()
            .to_string();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify("password1", &h));
        assert!(!verify("password2", &h));
        assert!(!verify("password1", "not a hash"));
        assert!(!verify("x", dummy_hash()));
    }
}
