//! Exponential backoff with full jitter, as a pure function of the attempt
//! number and a random sample, so it can be tested without a clock.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(base: Duration, max: Duration) -> Self {
        Self { base, max }
    }

    /// The wait before retry number `failures` (1 after the first failure):
    /// uniform in [ceiling/2, ceiling], where the ceiling doubles from `base`
    /// up to `max`. Half the ceiling is kept so retries never bunch at zero.
    /// `unit` is a random sample in [0, 1).
    pub fn delay(&self, failures: u32, unit: f64) -> Duration {
        let exponent = failures.saturating_sub(1).min(30);
        let ceiling = self.base.saturating_mul(1u32 << exponent).min(self.max);
        ceiling.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }
}

/// A random sample in [0, 1) for jitter (not for cryptography).
pub fn jitter_sample() -> f64 {
    let mut bytes = [0u8; 8];
    // The system RNG does not fail on Linux; a zero sample is harmless anyway.
    let _ = aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut bytes);
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_base_up_to_max_with_jitter_in_the_upper_half() {
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(backoff.delay(1, 0.0), Duration::from_millis(500));
        let most = backoff.delay(1, 0.999_999);
        assert!(most > Duration::from_millis(999) && most < Duration::from_secs(1));
        assert_eq!(backoff.delay(2, 0.0), Duration::from_secs(1));
        assert_eq!(backoff.delay(4, 0.0), Duration::from_secs(4));
        assert_eq!(backoff.delay(7, 0.0), Duration::from_secs(30));
        assert_eq!(backoff.delay(7, 1.0), Duration::from_secs(60));
        assert_eq!(backoff.delay(1000, 1.0), Duration::from_secs(60));
    }

    #[test]
    fn samples_are_in_the_unit_interval() {
        for _ in 0..1000 {
            let sample = jitter_sample();
            assert!((0.0..1.0).contains(&sample));
        }
    }
}
