//! Limits both servers apply to what strangers can make them hold: how many
//! connections they take (from the process's descriptor limit unless configured), and
//! a token bucket for per-user rates.

use std::time::Instant;

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
