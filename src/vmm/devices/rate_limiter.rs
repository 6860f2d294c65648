//! A token bucket, one per direction of a NIC (virtio-net's rx and tx), as
//! Firecracker limits its devices: `rate` bytes a second refill a bucket
//! holding at most `burst`; a frame goes when the bucket holds its length,
//! else it waits until the bucket would. The caller passes the time in,
//! so the arithmetic is tested without sleeping.

use std::time::{Duration, Instant};

/// The smallest bucket: one largest frame must always fit.
pub const MIN_BURST: u64 = 64 << 10;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `rate` bytes a second (at least 1) with a burst of a tenth of a
    /// second's worth, and never less than `MIN_BURST`; it starts full.
    pub fn new(rate: u64, now: Instant) -> Self {
        let rate = rate.max(1);
        let burst = (rate / 10).max(MIN_BURST);
        Self { rate, burst, tokens: burst as f64, last: now }
    }

    pub fn burst(&self) -> u64 {
        self.burst
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.burst as f64);
        self.last = now.max(self.last);
    }

    /// Takes the tokens of `bytes` when the bucket holds them (a frame
    /// larger than the bucket needs it full, and empties it).
    pub fn take(&mut self, bytes: u64, now: Instant) -> bool {
        self.refill(now);
        let need = bytes.min(self.burst) as f64;
        if self.tokens + 1e-6 < need {
            return false;
        }
        self.tokens = (self.tokens - need).max(0.0);
        true
    }

    /// How long from `now` until `take(bytes)` would succeed.
    pub fn wait_for(&mut self, bytes: u64, now: Instant) -> Duration {
        self.refill(now);
        let missing = bytes.min(self.burst) as f64 - self.tokens;
        if missing <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(missing / self.rate as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_lets_its_burst_through_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1 << 20, t0);
        assert_eq!(b.burst(), 104857); // a tenth of a second of 1 MiB/s
        assert!(b.take(100_000, t0));
        assert!(!b.take(10_000, t0), "the burst is spent");
        let wait = b.wait_for(10_000, t0);
        assert!((wait.as_secs_f64() - (10_000.0 - 4_857.0) / 1_048_576.0).abs() < 1e-4, "{wait:?}");
        assert!(!b.take(10_000, t0 + wait / 2));
        assert!(b.take(10_000, t0 + wait + Duration::from_micros(1)));
        // Refills stop at the burst, however long it was idle.
        let later = t0 + Duration::from_secs(3600);
        assert!(b.take(104_857, later));
        assert!(!b.take(1_000, later));
    }

    #[test]
    fn slow_rates_still_pass_the_largest_frame() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, t0);
        assert_eq!(b.burst(), MIN_BURST);
        assert!(b.take(65_547, t0), "one frame larger than the bucket takes it whole");
        assert!(!b.take(1, t0));
        assert_eq!(b.wait_for(1_000, t0), Duration::from_secs(1));
        // Time going backwards (a caller's stale `now`) never adds tokens.
        assert!(!b.take(1, t0.checked_sub(Duration::from_secs(5)).unwrap_or(t0)));
    }
}
