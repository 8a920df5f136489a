//! Getting simulated users onto relays: registration (once per name: later runs reuse
//! the accounts), a password login per user for a resumption credential, then as many
//! sessions as asked through resumption (no argon2 on the server), each handed over to
//! the mio driver with its Noise session.

use fastchat_client::connect::{AuthLink, RelayLink, RelayTarget};
use fastchat_client::error::ClientError;
use fastchat_common::conn::Connection;
use fastchat_common::proto::{ErrorCode, RelayToClient};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The password every simulated user has.
pub const PASSWORD: &str = "fastchat-load-password";

/// Where to reach the cluster and keep the pinned server key.
#[derive(Clone)]
pub struct Target {
    pub server: String,
    pub data_dir: PathBuf,
}

/// A simulated user with a resumption credential.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct User {
    pub name: String,
    pub credential: String,
}

/// A session on a relay, ready for the driver.
pub struct Session {
    pub user: usize,
    pub conn: Connection,
    /// Frames that arrived during the handshake.
    pub early: Vec<RelayToClient>,
}

/// The name of simulated user `i`.
pub fn user_name(i: usize) -> String {
    format!("load{i:05}")
}

pub fn retrying<T>(mut f: impl FnMut() -> Result<T, ClientError>) -> Result<T, ClientError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut backoff = Duration::from_millis(20);
    loop {
        match f() {
            Err(e) if e.retryable() && Instant::now() < deadline => {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// Runs `work(i)` for i in 0..n on `threads` threads; the first error wins.
pub fn parallel<T: Send>(
    n: usize,
    threads: usize,
    work: impl Fn(usize) -> Result<T, ClientError> + Sync,
) -> Result<Vec<T>, ClientError> {
    let next = Mutex::new(0usize);
    let results: Mutex<Vec<Option<T>>> = Mutex::new((0..n).map(|_| None).collect());
    let failure: Mutex<Option<ClientError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let i = {
                    let mut next = next.lock().expect("lock");
                    if *next >= n || failure.lock().expect("lock").is_some() {
                        return;
                    }
                    *next += 1;
                    *next - 1
                };
                match work(i) {
                    Ok(v) => results.lock().expect("lock")[i] = Some(v),
                    Err(e) => {
                        *failure.lock().expect("lock") = Some(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().expect("lock") {
        return Err(e);
    }
    Ok(results
        .into_inner()
        .expect("lock")
        .into_iter()
        .map(|v| v.expect("every index ran"))
        .collect())
}

/// Makes sure users 0..n exist and logs each in once with the password.
pub fn users(
    target: &Target,
    n: usize,
    pubkey: &str,
    threads: usize,
) -> Result<Vec<User>, ClientError> {
    users_from(target, n, pubkey, threads, |_| None)
}

/// As [`users`], user `i` registering and logging in from the local address `from(i)`
/// if given (to stay within the servers' per-address limits).
pub fn users_from(
    target: &Target,
    n: usize,
    pubkey: &str,
    threads: usize,
    from: impl Fn(usize) -> Option<std::net::IpAddr> + Sync,
) -> Result<Vec<User>, ClientError> {
    parallel(n, threads, |i| {
        let name = user_name(i);
        retrying(|| {
            let mut auth = AuthLink::connect_from(&target.server, from(i), &target.data_dir)?;
            match auth.register(&name, PASSWORD, pubkey) {
                Ok(()) => {}
                Err(ClientError::Refused {
                    code: ErrorCode::NameTaken,
                    ..
                }) => {}
                Err(e) => return Err(e),
            }
            let redirect = auth.login(&name, PASSWORD)?;
            let credential = redirect
                .credential
                .map(|(c, _)| c)
                .ok_or_else(|| ClientError::Protocol("no resumption credential".into()))?;
            Ok(User {
                name: name.clone(),
                credential,
            })
        })
    })
}

/// Opens a session for `user` through resumption at the auth server and hands it over
/// to mio.
pub fn session(target: &Target, users: &[User], user: usize) -> Result<Session, ClientError> {
    retrying(|| {
        let mut auth = AuthLink::connect(&target.server, &target.data_dir)?;
        let u = &users[user];
        let redirect = auth.resume(&u.name, &u.credential)?;
        handover(RelayLink::connect(&redirect, true)?, user)
    })
}

/// The relays the auth server lists for direct resumption.
pub fn relays(target: &Target, user: &User) -> Result<Vec<RelayTarget>, ClientError> {
    let mut auth = AuthLink::connect(&target.server, &target.data_dir)?;
    Ok(auth.resume(&user.name, &user.credential)?.relays)
}

/// Opens a session for `user` by presenting the credential straight to `relay` (one
/// handshake, as a failing-over client does) and hands it over to mio.
pub fn direct_session(
    relay: &RelayTarget,
    users: &[User],
    user: usize,
) -> Result<Session, ClientError> {
    retrying(|| {
        let u = &users[user];
        handover(
            RelayLink::resume(relay, &u.name, &u.credential, true)?,
            user,
        )
    })
}

/// The established session as a non-blocking connection for the driver.
fn handover(relay: RelayLink, user: usize) -> Result<Session, ClientError> {
    let (link, early) = relay.into_link();
    let (stream, codec) = link.into_parts();
    stream
        .set_nonblocking(true)
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    let peer = stream
        .peer_addr()
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    let conn = Connection::from_established(mio::net::TcpStream::from_std(stream), peer, codec);
    Ok(Session { user, conn, early })
}

/// The directory for the load tester's pinned server key.
pub fn data_dir(home: &Path) -> PathBuf {
    home.join("load")
}
