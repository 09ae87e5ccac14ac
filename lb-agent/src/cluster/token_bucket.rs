//! A token bucket: at most `rate` events per second on average, `burst` at once. Pure:
//! the clock comes in as an argument.

use std::time::{Duration, Instant};

/// Allows events at a bounded rate.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket refilled with `per_second` tokens a second, holding `burst` at most.
    pub fn new(per_second: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self { per_second: per_second.max(0.0), burst, tokens: burst, at: now }
    }

    /// Takes one token if there is one; returns whether it did.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.checked_duration_since(self.at).unwrap_or(Duration::ZERO);
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.per_second).min(self.burst);
        self.at = self.at.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let t = Instant::now();
        let mut b = TokenBucket::new(5.0, 3, t);
        assert_eq!((0..10).filter(|_| b.take(t)).count(), 3, "the burst");
        assert!(!b.take(t + Duration::from_millis(100)), "half a token");
        assert!(b.take(t + Duration::from_millis(200)), "one token after 1/5 s");
        let later = t + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.take(later)).count(), 3, "refilled to the burst, not beyond");
        assert!(!b.take(t), "a clock that goes back adds nothing");
    }
}
