//! How much one client address — and everyone together — may make the auth server do
//! before it answers `rate_limited` instead: registrations (each an argon2 hash and a
//! new row) and password attempts (each an argon2 verification). (Connections held per
//! address are `fastchat_common::limits::PerAddr`'s.)
//! Token buckets refill steadily, so a person who registers once or mistypes a password
//! never notices them; a flood from one address runs dry in seconds and costs the
//! others nothing.

use fastchat_common::limits::Bucket;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The limits (from the server's flags).
#[derive(Clone, Copy, Debug)]
pub struct BudgetLimits {
    pub registrations_per_addr_per_minute: f64,
    pub registrations_per_second: f64,
    pub password_attempts_per_addr_per_minute: f64,
}

/// The buckets.
pub struct Budgets {
    limits: BudgetLimits,
    registrations: HashMap<IpAddr, Bucket>,
    all_registrations: Bucket,
    passwords: HashMap<IpAddr, Bucket>,
}

impl Budgets {
    pub fn new(limits: BudgetLimits, now: Instant) -> Budgets {
        Budgets {
            limits,
            registrations: HashMap::new(),
            all_registrations: Bucket::full(limits.registrations_per_second, now),
            passwords: HashMap::new(),
        }
    }

    /// A registration from `addr` may go to a worker now; `Err(wait)` if not.
    pub fn register(&mut self, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        let per_minute = self.limits.registrations_per_addr_per_minute;
        let (rate, burst) = (per_minute / 60.0, per_minute);
        let global = self.limits.registrations_per_second;
        let mine = self
            .registrations
            .entry(addr)
            .or_insert_with(|| Bucket::full(burst, now));
        // This address's budget first: a flood from one address must not use up the
        // global one that others need (the address's own token is the one spent when
        // the global budget refuses).
        mine.take(rate, burst, now).map_err(Duration::from_millis)?;
        self.all_registrations
            .take(global, global, now)
            .map_err(Duration::from_millis)
    }

    /// A password attempt (login or change) from `addr` may go to a worker now.
    pub fn password(&mut self, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        let per_minute = self.limits.password_attempts_per_addr_per_minute;
        let (rate, burst) = (per_minute / 60.0, per_minute);
        self.passwords
            .entry(addr)
            .or_insert_with(|| Bucket::full(burst, now))
            .take(rate, burst, now)
            .map_err(Duration::from_millis)
    }

    /// Forgets full buckets (their addresses have been quiet), bounding memory.
    pub fn expire(&mut self, now: Instant) {
        let l = self.limits;
        let r = l.registrations_per_addr_per_minute;
        self.registrations
            .retain(|_, b| !b.is_full(r / 60.0, r, now));
        let p = l.password_attempts_per_addr_per_minute;
        self.passwords.retain(|_, b| !b.is_full(p / 60.0, p, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets() -> Budgets {
        Budgets::new(
            BudgetLimits {
                registrations_per_addr_per_minute: 3.0,
                registrations_per_second: 4.0,
                password_attempts_per_addr_per_minute: 2.0,
            },
            Instant::now(),
        )
    }

    #[test]
    fn registrations_are_limited_per_address_and_in_all() {
        let mut b = budgets();
        let t = Instant::now();
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        for _ in 0..3 {
            b.register(a, t).unwrap();
        }
        let wait = b.register(a, t).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(20));
        // Another address has its own budget, but everyone shares the global one.
        let c: IpAddr = "127.0.0.3".parse().unwrap();
        b.register(c, t).unwrap();
        assert!(b.register("127.0.0.4".parse().unwrap(), t).is_err());
        // The budget refills.
        assert!(b.register(a, t + Duration::from_secs(21)).is_ok());
    }

    #[test]
    fn password_attempts_are_limited_per_address() {
        let mut b = budgets();
        let t = Instant::now();
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        b.password(a, t).unwrap();
        b.password(a, t).unwrap();
        assert!(b.password(a, t).is_err());
        assert!(b.password("127.0.0.1".parse().unwrap(), t).is_ok());
    }
}
