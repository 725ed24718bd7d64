//! Throttles that keep production storage from being starved: a byte-rate limiter (per job
//! and global, both applied) and the `release_cpu_time` pause.
//!
//! How they combine: before each read a request waits for its bytes on every limiter that
//! applies (the job's and the process's), and after each request its stream sleeps
//! `release_cpu_time` milliseconds. The rate limits cap throughput outright; the pause lowers
//! it further on fast paths and yields the source host's CPU between requests, so the effective
//! rate is the smaller of the limit and `streams × request / (request time + pause)`.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How much unused allowance may accumulate, as time at the full rate: a short burst after an
/// idle spell, never more.
const BURST: Duration = Duration::from_millis(100);

/// A byte-rate limit shared by every request it applies to.
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_second: u64,
    next_free: Mutex<Instant>,
}

impl RateLimiter {
    /// A limiter of `bytes_per_second` (at least 1).
    pub fn new(bytes_per_second: u64) -> Self {
        Self { bytes_per_second: bytes_per_second.max(1), next_free: Mutex::new(Instant::now()) }
    }

    /// The rate in bytes per second.
    pub fn rate(&self) -> u64 {
        self.bytes_per_second
    }

    /// Waits until `bytes` may pass.
    pub async fn take(&self, bytes: u64) {
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_second as f64);
        let start = {
            let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let start = (*next).max(now.checked_sub(BURST).unwrap_or(now));
            *next = start + cost;
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

/// The `release_cpu_time` knob: milliseconds each stream sleeps after each request. 0 is full
/// speed; with many hosts copying at once, the seed advises the number of concurrent hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReleaseCpuTime(pub u32);

impl ReleaseCpuTime {
    /// Sleeps the configured pause, if any.
    pub async fn pause(self) {
        if self.0 > 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(self.0))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_limit_spaces_requests_by_their_size() {
        let limiter = RateLimiter::new(10 << 20);
        let t0 = Instant::now();
        for _ in 0..20 {
            limiter.take(1 << 20).await;
        }
        // 20 MiB at 10 MiB/s: the first 100 ms are the allowed burst, the rest is paced.
        let elapsed = t0.elapsed();
        assert!(elapsed >= Duration::from_millis(1800) && elapsed <= Duration::from_millis(2000), "{elapsed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_pause_is_in_milliseconds() {
        let t0 = Instant::now();
        ReleaseCpuTime(25).pause().await;
        ReleaseCpuTime(0).pause().await;
        assert_eq!(t0.elapsed(), Duration::from_millis(25));
    }
}
