//! Limits both servers apply to what strangers can make them hold: how many
//! connections they take (from the process's descriptor limit unless configured), a
//! token bucket for per-user rates, and failure counts per key in fixed windows (failed
//! logins and resumptions).

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Descriptors kept back from clients: listeners, peer links, database connections,
/// log files, and a margin for the moments between accept and close.
const RESERVED_DESCRIPTORS: usize = 256;

/// The most client connections a server takes when not told: the process's soft
/// descriptor limit less a reserve (`/proc/self/limits`; 10,000 if it cannot be read).
pub fn default_max_connections() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| open_files_soft_limit(&limits))
        .map_or(10_000, |n| n.saturating_sub(RESERVED_DESCRIPTORS).max(16))
}

/// The soft "Max open files" limit in the text of `/proc/self/limits`.
fn open_files_soft_limit(limits: &str) -> Option<usize> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    soft.parse().ok()
}

/// The address a client's limits are kept under: an IPv4 address as it is (an
/// IPv4-mapped IPv6 address as its IPv4), an IPv6 address by its /64 — one host is
/// usually given a whole /64, so counting each of its 2^64 addresses apart would be no
/// limit at all.
pub fn client_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    use std::net::{IpAddr, Ipv6Addr};
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Connections held per client address (by [`client_key`]), with a cap: so one address
/// cannot take every place a server has. See [`crate::reactor::Io::add_counted`].
pub struct PerAddr {
    max: usize,
    held: HashMap<std::net::IpAddr, usize>,
}

impl PerAddr {
    pub fn new(max: usize) -> PerAddr {
        PerAddr {
            max,
            held: HashMap::new(),
        }
    }

    /// Counts a new connection from `addr`; `false` (not counted) if that address
    /// already holds as many as allowed.
    pub fn connect(&mut self, addr: std::net::IpAddr) -> bool {
        let held = self.held.entry(client_key(addr)).or_insert(0);
        if *held >= self.max {
            return false;
        }
        *held += 1;
        true
    }

    /// A connection from `addr` closed.
    pub fn disconnect(&mut self, addr: std::net::IpAddr) {
        let addr = client_key(addr);
        if let Some(held) = self.held.get_mut(&addr) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.held.remove(&addr);
            }
        }
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token, or says in how many milliseconds one will be there.
    pub fn take(&mut self, rate: f64, burst: f64, now: Instant) -> Result<(), u64> {
        self.refill(rate, burst, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else if rate <= 0.0 {
            Err(u64::MAX)
        } else {
            Err((((1.0 - self.tokens) / rate) * 1000.0).ceil() as u64)
        }
    }

    /// Takes `n` tokens whatever is there: the bucket may go into debt (down to
    /// `-burst`), which later `take`s wait out. For costs known only afterwards (the
    /// recipients a group send reached).
    pub fn charge(&mut self, n: f64, rate: f64, burst: f64, now: Instant) {
        self.refill(rate, burst, now);
        self.tokens = (self.tokens - n).max(-burst);
    }

    /// Spends `n` tokens if the bucket is not in debt (it may go into debt by this
    /// spend, down to `-burst`), or says in how many milliseconds it will be out of
    /// debt. For amounts that vary (bytes).
    pub fn spend(&mut self, n: f64, rate: f64, burst: f64, now: Instant) -> Result<(), u64> {
        self.refill(rate, burst, now);
        if self.tokens >= 0.0 {
            self.tokens = (self.tokens - n).max(-burst);
            Ok(())
        } else if rate <= 0.0 {
            Err(u64::MAX)
        } else {
            Err(((-self.tokens / rate) * 1000.0).ceil() as u64)
        }
    }

    /// Whether the bucket has refilled completely (it can be forgotten).
    pub fn is_full(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        self.refill(rate, burst, now);
        self.tokens >= burst
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.last = now;
    }
}

struct Window {
    start: Instant,
    count: u32,
}

/// Counts failures per key in fixed windows: a key with `limit` failures in its
/// current window is blocked until the window ends.
pub struct FailureCounter<K> {
    limit: u32,
    window: Duration,
    entries: HashMap<K, Window>,
}

impl<K: Hash + Eq + Clone> FailureCounter<K> {
    pub fn new(limit: u32, window: Duration) -> Self {
        FailureCounter {
            limit,
            window,
            entries: HashMap::new(),
        }
    }

    /// Time left until `key` may try again, if it is blocked now.
    pub fn blocked_for(&self, key: &K, now: Instant) -> Option<Duration> {
        let w = self.entries.get(key)?;
        let end = w.start + self.window;
        (w.count >= self.limit && end > now).then(|| end - now)
    }

    /// Counts one failure (or attempt) against `key`.
    pub fn add(&mut self, key: &K, now: Instant) {
        let w = self.entries.entry(key.clone()).or_insert(Window {
            start: now,
            count: 0,
        });
        if w.start + self.window <= now {
            *w = Window {
                start: now,
                count: 0,
            };
        }
        w.count += 1;
    }

    /// Takes one count back.
    pub fn remove_one(&mut self, key: &K) {
        if let Some(w) = self.entries.get_mut(key) {
            w.count = w.count.saturating_sub(1);
        }
    }

    /// Forgets `key`.
    pub fn reset(&mut self, key: &K) {
        self.entries.remove(key);
    }

    /// Drops windows that are over, bounding memory.
    pub fn expire(&mut self, now: Instant) {
        let window = self.window;
        self.entries.retain(|_, w| w.start + window > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn connections_are_capped_per_address() {
        let mut b = PerAddr::new(2);
        let a: std::net::IpAddr = "127.0.0.2".parse().unwrap();
        assert!(b.connect(a) && b.connect(a));
        assert!(!b.connect(a));
        assert!(b.connect("127.0.0.1".parse().unwrap()));
        b.disconnect(a);
        assert!(b.connect(a));
    }

    #[test]
    fn an_ipv6_host_is_one_client_by_its_64() {
        let key = |s: &str| client_key(s.parse().unwrap()).to_string();
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:ffff::9"), "2001:db8:1:2::");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
    }

    #[test]
    fn reads_the_soft_descriptor_limit() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max processes             95000                95000                processes \n\
                    Max open files            20000                20000                files     \n";
        assert_eq!(open_files_soft_limit(text), Some(20_000));
        assert_eq!(open_files_soft_limit("nothing here"), None);
        assert!(default_max_connections() >= 16);
    }

    #[test]
    fn a_bucket_allows_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::full(3.0, t0);
        for _ in 0..3 {
            assert_eq!(b.take(10.0, 3.0, t0), Ok(()));
        }
        assert_eq!(b.take(10.0, 3.0, t0), Err(100), "one token every 100 ms");
        assert_eq!(b.take(10.0, 3.0, t0 + Duration::from_millis(100)), Ok(()));
        assert!(!b.is_full(10.0, 3.0, t0 + Duration::from_millis(100)));
        assert!(b.is_full(10.0, 3.0, t0 + Duration::from_secs(1)));
        let mut never = Bucket::full(0.0, t0);
        assert_eq!(never.take(0.0, 0.0, t0), Err(u64::MAX));
    }
}
