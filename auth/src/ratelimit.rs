//! Failed-login rate limiting that an attacker elsewhere cannot turn into a lockout.
//!
//! - **Password attempts** count per (user, address): five wrong passwords for `alice`
//!   from one address hold off that address for `alice`, not Alice at home. They also
//!   count per address (guessing many names from one place) and per user from
//!   everywhere; a user past the global threshold is not locked out but *paced*: one
//!   attempt per `pace` for that name, from anywhere, until the window ends.
//! - **Resumption attempts** count per address only: a credential is 256 random bits,
//!   so guessing one is hopeless and failures say nothing about the user.
//!
//! An attempt counts while it is being checked, so many parallel guesses cannot slip
//! past the limit; a success gives it back (and clears the (user, address) pair).

use fastchat_common::limits::FailureCounter;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// What is being tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// A password (login or password change): argon2, and a guess at a secret people
    /// choose.
    Password,
    /// A resumption credential.
    Resume,
}

/// The limits of a [`LoginLimiter`].
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Password failures per (user, address) in a window.
    pub per_user_addr: u32,
    /// Failures (of either kind) per address in a window.
    pub per_addr: u32,
    /// Password failures per user from all addresses before attempts for the user are
    /// paced.
    pub per_user: u32,
    /// One paced attempt per user per this long.
    pub pace: Duration,
    pub window: Duration,
}

/// The limiter the auth server consults before every login.
pub struct LoginLimiter {
    pairs: FailureCounter<(String, IpAddr)>,
    addrs: FailureCounter<IpAddr>,
    users: FailureCounter<String>,
    /// Users being paced: when their next attempt may start.
    next_paced: HashMap<String, Instant>,
    pace: Duration,
    /// (user, address) pairs that logged in with the password lately, and when: they
    /// are not paced (Alice at home gets in while strangers are paced for her name).
    known: HashMap<(String, IpAddr), Instant>,
}

/// How long a password success exempts its (user, address) pair from pacing.
const KNOWN_FOR: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most pairs remembered (the oldest are forgotten first when it is full).
const MAX_KNOWN: usize = 100_000;

impl LoginLimiter {
    pub fn new(limits: Limits) -> Self {
        LoginLimiter {
            pairs: FailureCounter::new(limits.per_user_addr, limits.window),
            addrs: FailureCounter::new(limits.per_addr, limits.window),
            users: FailureCounter::new(limits.per_user, limits.window),
            next_paced: HashMap::new(),
            pace: limits.pace,
            known: HashMap::new(),
        }
    }

    /// Starts an attempt: `Err(wait)` if it may not start now, otherwise it is counted
    /// until [`LoginLimiter::succeeded`] gives it back.
    pub fn begin(
        &mut self,
        attempt: Attempt,
        user: &str,
        addr: IpAddr,
        now: Instant,
    ) -> Result<(), Duration> {
        if attempt == Attempt::Resume {
            if let Some(wait) = self.addrs.blocked_for(&addr, now) {
                return Err(wait);
            }
            self.addrs.add(&addr, now);
            return Ok(());
        }
        let pair = (user.to_string(), addr);
        let wait = [
            self.pairs.blocked_for(&pair, now),
            self.addrs.blocked_for(&addr, now),
        ]
        .into_iter()
        .flatten()
        .max();
        if let Some(wait) = wait {
            return Err(wait);
        }
        let user = pair.0.clone();
        if self.users.blocked_for(&user, now).is_some() && !self.known.contains_key(&pair) {
            match self.next_paced.get(&user) {
                Some(next) if *next > now => return Err(*next - now),
                _ => {
                    self.next_paced.insert(user.clone(), now + self.pace);
                }
            }
        }
        self.pairs.add(&pair, now);
        self.addrs.add(&addr, now);
        self.users.add(&user, now);
        Ok(())
    }

    /// The attempt succeeded: it is given back, and a password success forgets the
    /// (user, address) pair's failures and exempts the pair from pacing for a while.
    pub fn succeeded(&mut self, attempt: Attempt, user: &str, addr: IpAddr, now: Instant) {
        self.abandoned(attempt, user, addr);
        if attempt == Attempt::Password {
            let pair = (user.to_string(), addr);
            self.pairs.reset(&pair);
            if self.known.len() >= MAX_KNOWN {
                self.known
                    .retain(|_, at| now.duration_since(*at) < KNOWN_FOR / 2);
            }
            self.known.insert(pair, now);
        }
    }

    /// The attempt was never checked (its connection closed first, or the queue was
    /// full): only its own count is given back — nothing is forgiven.
    pub fn abandoned(&mut self, attempt: Attempt, user: &str, addr: IpAddr) {
        self.addrs.remove_one(&addr);
        if attempt == Attempt::Password {
            self.pairs.remove_one(&(user.to_string(), addr));
            self.users.remove_one(&user.to_string());
        }
    }

    /// Drops windows that are over, bounding memory.
    pub fn expire(&mut self, now: Instant) {
        self.pairs.expire(now);
        self.addrs.expire(now);
        self.users.expire(now);
        self.next_paced.retain(|_, next| *next > now);
        self.known
            .retain(|_, at| now.duration_since(*at) < KNOWN_FOR);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_user_addr: u32, per_addr: u32, per_user: u32) -> Limits {
        Limits {
            per_user_addr,
            per_addr,
            per_user,
            pace: Duration::from_secs(1),
            window: Duration::from_secs(60),
        }
    }

    const P: Attempt = Attempt::Password;

    #[test]
    fn failures_elsewhere_do_not_lock_the_user_out() {
        let mut l = LoginLimiter::new(limits(3, 100, 100));
        let home: IpAddr = "127.0.0.1".parse().unwrap();
        let attacker: IpAddr = "127.0.0.3".parse().unwrap();
        let t = Instant::now();
        for _ in 0..3 {
            l.begin(P, "alice", attacker, t).unwrap();
        }
        assert!(l.begin(P, "alice", attacker, t).is_err(), "held off there");
        assert!(l.begin(P, "alice", home, t).is_ok(), "not at home");
        assert!(
            l.begin(P, "bob", attacker, t).is_ok(),
            "nor for other names"
        );
        assert!(l
            .begin(P, "alice", attacker, t + Duration::from_secs(61))
            .is_ok());
    }

    #[test]
    fn an_address_guessing_many_names_is_held_off() {
        let mut l = LoginLimiter::new(limits(3, 5, 100));
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let t = Instant::now();
        for name in ["a", "b", "c", "d", "e"] {
            l.begin(P, name, a, t).unwrap();
        }
        assert!(l.begin(P, "f", a, t).is_err());
        l.succeeded(P, "e", a, t);
        l.begin(P, "f", a, t).unwrap();
    }

    #[test]
    fn a_user_attacked_from_everywhere_is_paced_not_locked_out() {
        let mut l = LoginLimiter::new(limits(3, 100, 4));
        let t = Instant::now();
        for i in 0..4 {
            let addr: IpAddr = format!("127.0.1.{i}").parse().unwrap();
            l.begin(P, "alice", addr, t).unwrap();
        }
        let home: IpAddr = "127.0.0.1".parse().unwrap();
        // Past the threshold: one attempt per second for the name.
        l.begin(P, "alice", home, t).unwrap();
        let wait = l.begin(P, "alice", home, t).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        l.begin(P, "alice", home, t + Duration::from_secs(1))
            .unwrap();
    }

    #[test]
    fn resumptions_count_per_address_only() {
        let mut l = LoginLimiter::new(limits(2, 3, 2));
        let attacker: IpAddr = "127.0.0.3".parse().unwrap();
        let home: IpAddr = "127.0.0.1".parse().unwrap();
        let t = Instant::now();
        for _ in 0..3 {
            l.begin(Attempt::Resume, "alice", attacker, t).unwrap();
        }
        assert!(l.begin(Attempt::Resume, "alice", attacker, t).is_err());
        assert!(l.begin(Attempt::Resume, "alice", home, t).is_ok());
        assert!(l.begin(P, "alice", home, t).is_ok());
    }

    #[test]
    fn success_clears_the_pair() {
        let mut l = LoginLimiter::new(limits(2, 100, 100));
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let t = Instant::now();
        l.begin(P, "alice", a, t).unwrap();
        l.succeeded(P, "alice", a, t);
        l.begin(P, "alice", a, t).unwrap();
        l.begin(P, "alice", a, t).unwrap();
        let wait = l.begin(P, "alice", a, t).unwrap_err();
        assert_eq!(wait, Duration::from_secs(60));
    }

    #[test]
    fn an_abandoned_attempt_forgives_nothing() {
        let mut l = LoginLimiter::new(limits(3, 100, 100));
        let a: IpAddr = "127.0.0.3".parse().unwrap();
        let t = Instant::now();
        l.begin(P, "alice", a, t).unwrap();
        l.begin(P, "alice", a, t).unwrap();
        // A third, abandoned (the attacker closed at once): only it is given back.
        l.begin(P, "alice", a, t).unwrap();
        l.abandoned(P, "alice", a);
        l.begin(P, "alice", a, t).unwrap();
        assert!(
            l.begin(P, "alice", a, t).is_err(),
            "the two failures still count"
        );
    }

    #[test]
    fn an_address_that_logged_in_before_is_not_paced() {
        let mut l = LoginLimiter::new(limits(3, 100, 2));
        let home: IpAddr = "127.0.0.1".parse().unwrap();
        let t = Instant::now();
        l.begin(P, "alice", home, t).unwrap();
        l.succeeded(P, "alice", home, t);
        for i in 0..2 {
            let addr: IpAddr = format!("127.0.1.{i}").parse().unwrap();
            l.begin(P, "alice", addr, t).unwrap();
        }
        // Strangers are paced; home is not.
        let stranger: IpAddr = "127.0.2.1".parse().unwrap();
        l.begin(P, "alice", stranger, t).unwrap();
        assert!(l
            .begin(P, "alice", "127.0.2.2".parse().unwrap(), t)
            .is_err());
        l.begin(P, "alice", home, t).unwrap();
        l.begin(P, "alice", home, t).unwrap();
    }
}
