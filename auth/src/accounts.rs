//! Accounts: name and password rules, and the worker-side jobs that hash passwords
//! (argon2id) and read or write the `users` table. Runs on the worker pool, never on the
//! poll loop.

use crate::passwords::Passwords;
use crate::ratelimit::Attempt;
use fastchat_common::credential;
use fastchat_common::db::{DbConn, DbPool, HeldConnection};
use fastchat_common::pool::Alive;
use fastchat_common::pool::Completions;
use fastchat_common::proto::{valid_user_name, ErrorCode, Refusal};
use mio::Token;
use postgres::Statement;
use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::Duration;

/// Shortest password accepted at registration.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest password accepted (argon2 is fine with more; this bounds work per request).
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Largest public key accepted (a 3072-bit RSA SPKI PEM is ~630 bytes).
pub const MAX_PUBKEY_BYTES: usize = 4096;

/// Checks what `register` carries; the error to send back if something is wrong.
pub fn check_registration(user: &str, password: &str, pubkey: &str) -> Result<(), Refusal> {
    if !valid_user_name(user) {
        return Err(Refusal::new(
            ErrorCode::InvalidName,
            "user names are 1-32 characters of a-z, 0-9, '_', '.' and '-'",
        ));
    }
    if password.chars().count() < MIN_PASSWORD_CHARS || password.len() > MAX_PASSWORD_BYTES {
        return Err(Refusal::new(
            ErrorCode::WeakPassword,
            format!("passwords must be at least {MIN_PASSWORD_CHARS} characters"),
        ));
    }
    let pem = pubkey.trim();
    if pem.len() > MAX_PUBKEY_BYTES
        || !pem.starts_with("-----BEGIN PUBLIC KEY-----")
        || !pem.ends_with("-----END PUBLIC KEY-----")
    {
        return Err(Refusal::new(
            ErrorCode::BadKey,
            "the public key must be an RSA SubjectPublicKeyInfo PEM",
        ));
    }
    check_rsa_key(pem).map_err(|why| Refusal::new(ErrorCode::BadKey, why))
}

/// The key must parse as RSA (SubjectPublicKeyInfo) with e = 65537 and a modulus of
/// 2048 to 4096 bits: what clients accept as a peer's key (PROTOCOL.md §1.3).
fn check_rsa_key(pem: &str) -> Result<(), String> {
    use rsa::pkcs8::DecodePublicKey;
    use rsa::traits::PublicKeyParts;
    let key = rsa::PublicKey::from_public_key_pem(pem)
        .map_err(|_| "the public key is not an RSA SubjectPublicKeyInfo PEM".to_string())?;
    let bits = key.n().bit_width();
    if !(2048..=4096).contains(&bits) {
        return Err(format!(
            "the RSA key has {bits} bits; 2048 to 4096 are accepted"
        ));
    }
    if *key.e_bytes() != [1, 0, 1] {
        return Err("the RSA key's public exponent must be 65537".into());
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
        alive: Alive,
    },
    Login {
        conn: Token,
        req: u64,
        user: String,
        password: String,
        addr: IpAddr,
        alive: Alive,
    },
    Resume {
        conn: Token,
        req: u64,
        user: String,
        credential: String,
        addr: IpAddr,
        alive: Alive,
    },
    /// Runs even if the client has gone: a revocation asked for must happen.
    Logout {
        conn: Token,
        req: u64,
        user: String,
        credential: String,
    },
    ChangePassword {
        conn: Token,
        req: u64,
        user: String,
        old_password: String,
        new_password: String,
        addr: IpAddr,
        alive: Alive,
    },
}

impl Job {
    /// The request id the job answers.
    pub fn req(&self) -> u64 {
        match self {
            Job::Register { req, .. }
            | Job::Login { req, .. }
            | Job::Resume { req, .. }
            | Job::Logout { req, .. }
            | Job::ChangePassword { req, .. } => *req,
        }
    }

    /// What the login limiter counted for the job when it started, if anything.
    pub fn attempt(&self) -> Option<(Attempt, String)> {
        match self {
            Job::Login { user, .. } | Job::ChangePassword { user, .. } => {
                Some((Attempt::Password, user.clone()))
            }
            Job::Resume { user, .. } => Some((Attempt::Resume, user.clone())),
            Job::Register { .. } | Job::Logout { .. } => None,
        }
    }

    /// The client's address, for jobs the limiter counts.
    fn addr(&self) -> Option<IpAddr> {
        match self {
            Job::Login { addr, .. }
            | Job::Resume { addr, .. }
            | Job::ChangePassword { addr, .. } => Some(*addr),
            Job::Register { .. } | Job::Logout { .. } => None,
        }
    }

    /// Whether anyone still waits for the answer (a logout always runs).
    fn wanted(&self) -> bool {
        match self {
            Job::Register { alive, .. }
            | Job::Login { alive, .. }
            | Job::Resume { alive, .. }
            | Job::ChangePassword { alive, .. } => alive.is_alive(),
            Job::Logout { .. } => true,
        }
    }
    /// Shard key: jobs about one name run in order on one worker.
    pub fn shard(&self) -> u64 {
        let name = match self {
            Job::Register { user, .. }
            | Job::Login { user, .. }
            | Job::Resume { user, .. }
            | Job::Logout { user, .. }
            | Job::ChangePassword { user, .. } => user,
        };
        name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    }
}

/// A resumption credential handed to the client once, and when it expires (Unix ms).
#[derive(Debug, Clone)]
pub struct Credential {
    pub secret: String,
    pub expires_ms: u64,
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
        /// Minted for a password login; `None` for a resumption.
        credential: Option<Credential>,
    },
    LoggedOut {
        conn: Token,
        req: u64,
    },
    PasswordChanged {
        conn: Token,
        req: u64,
        user: String,
        addr: IpAddr,
    },
    /// Not run: the connection closed while the job waited.
    Skipped {
        attempt: Option<(Attempt, String)>,
        addr: Option<IpAddr>,
    },
    Refused {
        conn: Token,
        req: u64,
        why: Refusal,
        /// For a failed login: whose attempt it was (the limiter keeps counting it).
        login: Option<(String, IpAddr)>,
    },
}

/// A hash to verify against when the user does not exist, so an unknown name costs the
/// same time as a wrong password.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        Passwords::new()
            .hash("fastchat-timing-equaliser")
            .unwrap_or_default()
    })
}

/// A worker of the auth pool.
pub struct Worker {
    db: HeldConnection<Prepared>,
    done: Completions<Done>,
    /// How long resumption credentials stay valid.
    resume_ttl: Duration,
    passwords: Passwords,
}

/// The statement of the hot path (a login storm is resumptions), prepared once per
/// connection; the others run as argon2 allows, a few hundred per second at most.
struct Prepared {
    resume: Statement,
}

impl Prepared {
    fn new(conn: &mut DbConn) -> Result<Prepared, postgres::Error> {
        Ok(Prepared {
            resume: conn.prepare(credential::LOOKUP)?,
        })
    }
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
        why: Refusal::new(
            ErrorCode::StoreFailed,
            "the account store is unavailable; try again",
        ),
        login,
    }
}

fn name_taken(conn: Token, req: u64, user: &str) -> Done {
    Done::Refused {
        conn,
        req,
        why: Refusal::new(ErrorCode::NameTaken, format!("the name {user} is taken")),
        login: None,
    }
}

fn bad_credentials(conn: Token, req: u64, login: Option<(String, IpAddr)>) -> Done {
    Done::Refused {
        conn,
        req,
        why: Refusal::new(ErrorCode::BadCredentials, "unknown user or wrong password"),
        login,
    }
}

impl Worker {
    pub fn new(db: DbPool, done: Completions<Done>, resume_ttl: Duration) -> Worker {
        Worker {
            db: HeldConnection::new(db, Prepared::new),
            done,
            resume_ttl,
            passwords: Passwords::new(),
        }
    }

    /// Runs one batch; each job is independent (argon2 dominates, not commits).
    pub fn run_batch(&mut self, jobs: Vec<Job>) {
        let results: Vec<Done> = jobs
            .into_iter()
            .map(|job| {
                if job.wanted() {
                    self.run_job(job)
                } else {
                    // Its connection closed while it waited: no hash, no query, and
                    // the limiter gets its count back through this answer.
                    Done::Skipped {
                        attempt: job.attempt(),
                        addr: job.addr(),
                    }
                }
            })
            .collect();
        self.done.send_all(results);
    }

    fn run_job(&mut self, job: Job) -> Done {
        let (conn, req) = match &job {
            Job::Register { conn, req, .. }
            | Job::Login { conn, req, .. }
            | Job::Resume { conn, req, .. }
            | Job::Logout { conn, req, .. }
            | Job::ChangePassword { conn, req, .. } => (*conn, *req),
        };
        let who = match &job {
            Job::Login { user, addr, .. }
            | Job::Resume { user, addr, .. }
            | Job::ChangePassword { user, addr, .. } => Some((user.clone(), *addr)),
            _ => None,
        };
        let mut held = match self.db.take() {
            Ok(held) => held,
            Err(e) => return store_error(conn, req, who, e),
        };
        match self.run_with(&mut held.conn, &held.st, job) {
            Ok(done) => {
                self.db.give_back(held);
                done
            }
            Err(e) => store_error(conn, req, who, e),
        }
    }

    fn run_with(
        &mut self,
        client: &mut DbConn,
        st: &Prepared,
        job: Job,
    ) -> Result<Done, Box<dyn std::error::Error>> {
        Ok(match job {
            Job::Register {
                conn,
                req,
                user,
                password,
                pubkey,
                ..
            } => {
                // A taken name costs no hash: a flood of `register alice` is cheap.
                let taken = client.query_opt("SELECT 1 FROM users WHERE name = $1", &[&user])?;
                if taken.is_some() {
                    return Ok(name_taken(conn, req, &user));
                }
                let hash = self.passwords.hash(&password)?;
                let inserted = client.query_opt(
                    "INSERT INTO users (name, password_hash, pubkey) VALUES ($1, $2, $3)
                     ON CONFLICT (name) DO NOTHING RETURNING id",
                    &[&user, &hash, &pubkey.trim()],
                )?;
                match inserted {
                    Some(_) => Done::Registered { conn, req, user },
                    None => name_taken(conn, req, &user),
                }
            }
            Job::Login {
                conn,
                req,
                user,
                password,
                addr,
                ..
            } => match check_password(client, &mut self.passwords, &user, &password)? {
                Some(user_id) => {
                    let credential = self.mint_credential(client, user_id)?;
                    Done::LoggedIn {
                        conn,
                        req,
                        user,
                        user_id,
                        addr,
                        credential: Some(credential),
                    }
                }
                None => bad_credentials(conn, req, Some((user, addr))),
            },
            Job::Resume {
                conn,
                req,
                user,
                credential,
                addr,
                ..
            } => {
                let row = client.query_opt(&st.resume, &[&user, &credential::hash(&credential)])?;
                match row {
                    Some(row) => Done::LoggedIn {
                        conn,
                        req,
                        user,
                        user_id: row.get(0),
                        addr,
                        credential: None,
                    },
                    None => Done::Refused {
                        conn,
                        req,
                        why: Refusal::new(
                            ErrorCode::BadCredentials,
                            "the resumption credential is unknown, expired or revoked; \
                                  log in with the password",
                        ),
                        login: Some((user, addr)),
                    },
                }
            }
            Job::Logout {
                conn,
                req,
                user,
                credential,
            } => {
                client.execute(
                    "DELETE FROM resume_credentials r USING users u
                     WHERE r.user_id = u.id AND u.name = $1 AND r.hash = $2",
                    &[&user, &credential::hash(&credential)],
                )?;
                Done::LoggedOut { conn, req }
            }
            Job::ChangePassword {
                conn,
                req,
                user,
                old_password,
                new_password,
                addr,
                ..
            } => match check_password(client, &mut self.passwords, &user, &old_password)? {
                Some(user_id) => {
                    let hash = self.passwords.hash(&new_password)?;
                    let mut tx = client.transaction()?;
                    tx.execute(
                        "UPDATE users SET password_hash = $2 WHERE id = $1",
                        &[&user_id, &hash],
                    )?;
                    tx.execute(
                        "DELETE FROM resume_credentials WHERE user_id = $1",
                        &[&user_id],
                    )?;
                    tx.commit()?;
                    Done::PasswordChanged {
                        conn,
                        req,
                        user,
                        addr,
                    }
                }
                None => bad_credentials(conn, req, Some((user, addr))),
            },
        })
    }

    /// Makes a credential, keeps its hash, and drops the user's expired ones.
    fn mint_credential(
        &self,
        client: &mut DbConn,
        user_id: i64,
    ) -> Result<Credential, postgres::Error> {
        let secret = fastchat_common::hex::encode(&rand::random::<[u8; 32]>());
        let ttl_secs = self.resume_ttl.as_secs_f64();
        let row = client.query_one(
            "WITH gone AS (
                 DELETE FROM resume_credentials WHERE user_id = $1 AND expires_at <= now()
             )
             INSERT INTO resume_credentials (user_id, hash, expires_at)
             VALUES ($1, $2, now() + make_interval(secs => $3))
             RETURNING (extract(epoch FROM expires_at) * 1000)::int8",
            &[&user_id, &credential::hash(&secret), &ttl_secs],
        )?;
        Ok(Credential {
            secret,
            expires_ms: row.get::<_, i64>(0) as u64,
        })
    }
}

/// The user's id if `password` is theirs. Unknown users cost the same argon2 time.
fn check_password(
    client: &mut DbConn,
    passwords: &mut Passwords,
    user: &str,
    password: &str,
) -> Result<Option<i64>, postgres::Error> {
    let row = client.query_opt(
        "SELECT id, password_hash FROM users WHERE name = $1",
        &[&user],
    )?;
    let (user_id, phc): (Option<i64>, String) = match row {
        Some(r) => (Some(r.get(0)), r.get(1)),
        None => (None, dummy_hash().to_string()),
    };
    Ok(user_id.filter(|_| passwords.verify(password, &phc)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const ED25519: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAPqkkML3SHihGsFS5ib86d1a1EXbA9jfGixyGmKqtg0E=
-----END PUBLIC KEY-----
";
    const P256: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE0471loF9BEsGJqJb3OSJyU8ymNk3
HdNGMBjUuZokzAxY66Ic8UXj3ZzcgOcBYR6SOQO93p7xuBbffuhYEH1KPQ==
-----END PUBLIC KEY-----
";
    const RSA_1024: &str = "-----BEGIN PUBLIC KEY-----
MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDgBZ4CbMVgqYFn6rPJcRJc50vr
UaYdxmNRrlm3aR0dWuMhKkHDrzbEgmmLsucjn4KeWItlUmHpqGoRbubOAbel0PM5
x4tcKdOsQoRC9rrgihXQm64XdR2Ruv536SGt7MxvBaWDzCFv44a3DW8Zapg+iCUA
Ai97iBENq9j4MmxhcQIDAQAB
-----END PUBLIC KEY-----
";
    const RSA_E3: &str = "-----BEGIN PUBLIC KEY-----
MIIBIDANBgkqhkiG9w0BAQEFAAOCAQ0AMIIBCAKCAQEAu4Asay9zv662UNwr22hW
b+6T0nmUgpF75OOgIMRJTjL0fSRKWHlvwV/QVmxEA4w4w7k6HEXTji3NZe8ubSuj
9uymsm2f4+psLsggtQpBlbNgIaOiu9Vn9meHtPV4Lgd19NyyKCgITjSP45wKamVv
kxVnHnmaP/zRr9zJm2HTw1OLUmbkWOqi/MRXDMjA8E+0f2MoT8fhEv69aoC06TUt
PldbUq7K9vegXLFe4hirkg3SYyx9Gwy1odbY9EL6XXR5lKdld0xWhpBjWy0WIywZ
eStbe2z1JHUhoEQddRtq5AhbXiuyH9n+wMdjx/vLwCdquROZPhqmrdLyJ12jRu4F
IQIBAw==
-----END PUBLIC KEY-----
";
    pub(crate) const RSA_2048: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAwMm/bT7o41qTUyDj2XON
lV8+Ms+KgLi92rSALOAXJ80flcfv6dA4rGFD16wTsqU/kTAj8dU7pGqRv7bI6/mk
FQIZ/mBeLcklkx/LVV8icSxH+boxB5VJUtoDy+zw/VuMEZVDiIu0T6lU+5/KTHIu
C4TaZks96UBPadNWfqxy93VHBaKor8Wil0+0aseKz5txr5j9e5iruVlacNnNGhFl
7yvpoDQj5OgO42oivh9HlfxAyb5Dw4HlpwcBY1+ZUF41I3AMhkpJMF3vG0LPv6MU
Kt01RBdIEZml4yr+hKgBJ3exWmb8Mxz3FGWpW+ZdHH7Vw058PBdReFVIyJMPiMGE
fwIDAQAB
-----END PUBLIC KEY-----
";

    #[test]
    fn only_rsa_keys_of_2048_to_4096_bits_with_e_65537_register() {
        assert!(check_registration("alice", "password1", RSA_2048).is_ok());
        let garbage = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
        for (what, pem) in [
            ("garbage inside", garbage),
            ("Ed25519", ED25519),
            ("EC P-256", P256),
            ("RSA-1024", RSA_1024),
            ("RSA e=3", RSA_E3),
        ] {
            assert_eq!(
                check_registration("alice", "password1", pem).map_err(|e| e.code),
                Err(ErrorCode::BadKey),
                "{what}"
            );
        }
    }

    #[test]
    fn registration_checks() {
        let pem = RSA_2048;
        assert!(check_registration("alice", "password1", pem).is_ok());
        assert_eq!(
            check_registration("alice", "short", pem).unwrap_err().code,
            ErrorCode::WeakPassword
        );
        assert_eq!(
            check_registration("alice", "password1", "junk")
                .unwrap_err()
                .code,
            ErrorCode::BadKey
        );
        assert_eq!(
            check_registration("ALICE", "password1", pem)
                .unwrap_err()
                .code,
            ErrorCode::InvalidName
        );
    }

    #[test]
    fn the_dummy_hash_is_a_real_argon2_hash() {
        let mut p = Passwords::new();
        assert!(dummy_hash().starts_with("$argon2id$"));
        assert!(p.verify("fastchat-timing-equaliser", dummy_hash()));
        assert!(!p.verify("x", dummy_hash()));
    }

    #[test]
    fn a_worker_skips_the_jobs_of_closed_connections_without_the_database() {
        let poll = mio::Poll::new().unwrap();
        let waker = std::sync::Arc::new(mio::Waker::new(poll.registry(), Token(0)).unwrap());
        let (done, results) = Completions::new(waker);
        // A database that is not there: touching it would fail the job, not skip it.
        let mut worker = Worker::new(
            fastchat_common::db::unconnected(),
            done,
            Duration::from_secs(60),
        );
        let alive = Alive::new();
        alive.end();
        let addr: IpAddr = "127.0.0.2".parse().unwrap();
        worker.run_batch(vec![
            Job::Register {
                conn: Token(5),
                req: 1,
                user: "alice".into(),
                password: "password1".into(),
                pubkey: RSA_2048.into(),
                alive: alive.clone(),
            },
            Job::Login {
                conn: Token(5),
                req: 2,
                user: "alice".into(),
                password: "password1".into(),
                addr,
                alive,
            },
        ]);
        let got: Vec<Done> = results.try_iter().collect();
        assert!(matches!(
            &got[..],
            [
                Done::Skipped {
                    attempt: None,
                    addr: None
                },
                Done::Skipped {
                    attempt: Some((Attempt::Password, _)),
                    addr: Some(_)
                }
            ]
        ));
    }
}
