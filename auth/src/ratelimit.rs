//! Failed-login rate limiting, per user name and per client address.
//!
//! An attempt counts against both keys while it is being checked, so many parallel
//! guesses cannot slip past the limit; a success gives the user's count back.

use fastchat_common::limits::FailureCounter;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The limiter the auth server consults before every login.
pub struct LoginLimiter {
    users: FailureCounter<String>,
    addrs: FailureCounter<IpAddr>,
}

impl LoginLimiter {
    /// A limiter allowing `per_user` and `per_addr` failures per `window`.
    pub fn new(per_user: u32, per_addr: u32, window: Duration) -> Self {
        LoginLimiter {
            users: FailureCounter::new(per_user, window),
            addrs: FailureCounter::new(per_addr, window),
        }
    }

    /// Starts an attempt: `Err(wait)` if either key is over its limit, otherwise the
    /// attempt is counted until [`LoginLimiter::succeeded`] gives it back.
    pub fn begin(&mut self, user: &str, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        let user = user.to_string();
        let wait = [
            self.users.blocked_for(&user, now),
            self.addrs.blocked_for(&addr, now),
        ]
        .into_iter()
        .flatten()
        .max();
        if let Some(wait) = wait {
            return Err(wait);
        }
        self.users.add(&user, now);
        self.addrs.add(&addr, now);
        Ok(())
    }

    /// The attempt succeeded: the user's failures are forgotten, the address's count
    /// loses this attempt.
    pub fn succeeded(&mut self, user: &str, addr: IpAddr) {
        self.users.reset(&user.to_string());
        self.addrs.remove_one(&addr);
    }

    /// Drops windows that are over, bounding memory.
    pub fn expire(&mut self, now: Instant) {
        self.users.expire(now);
        self.addrs.expire(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_user_and_per_address() {
        let mut l = LoginLimiter::new(3, 5, Duration::from_secs(60));
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let t = Instant::now();
        for _ in 0..3 {
            l.begin("alice", a, t).unwrap();
        }
        assert!(
            l.begin("alice", b, t).is_err(),
            "user limit applies on any address"
        );
        l.begin("bob", a, t).unwrap();
        l.begin("carol", a, t).unwrap();
        assert!(
            l.begin("dave", a, t).is_err(),
            "address limit applies to any user"
        );
        assert!(l.begin("alice", b, t + Duration::from_secs(61)).is_ok());
        l.succeeded("bob", a);
        l.begin("dave", a, t + Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn success_clears_the_user() {
        let mut l = LoginLimiter::new(2, 100, Duration::from_secs(60));
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let t = Instant::now();
        l.begin("alice", a, t).unwrap();
        l.succeeded("alice", a);
        l.begin("alice", a, t).unwrap();
        l.begin("alice", a, t).unwrap();
        let wait = l.begin("alice", a, t).unwrap_err();
        assert_eq!(wait, Duration::from_secs(60));
    }
}
