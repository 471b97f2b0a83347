//! When to renew a certificate: a pure function of its validity, tested
//! without a clock.

use std::time::{Duration, SystemTime};

/// The share of the lifetime after which a certificate is renewed...
pub const RENEW_AT: f64 = 0.5;
/// ...minus up to this share, at random, so agents started together do not
/// renew together.
pub const RENEW_JITTER: f64 = 0.1;

/// How long from `now` until a certificate valid from `not_before` to
/// `not_after` should be renewed; zero if that time has passed. `unit` is a
/// random sample in [0, 1).
pub fn renew_in(
    not_before: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
    unit: f64,
) -> Duration {
    let Ok(lifetime) = not_after.duration_since(not_before) else {
        return Duration::ZERO;
    };
    let share = RENEW_AT - RENEW_JITTER * unit.clamp(0.0, 1.0);
    let renew_at = not_before + lifetime.mul_f64(share);
    renew_at.duration_since(now).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[test]
    fn renews_a_24h_certificate_between_9_6h_and_12h_after_it_starts() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let end = start + DAY;
        assert_eq!(renew_in(start, end, start, 0.0), DAY / 2);
        let earliest = renew_in(start, end, start, 0.999_999);
        assert!(
            earliest > DAY.mul_f64(0.4) - Duration::from_secs(1),
            "{earliest:?}"
        );
        assert!(earliest < DAY / 2);
    }

    #[test]
    fn counts_from_now_and_never_goes_negative() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let end = start + DAY;
        let later = start + Duration::from_secs(3600);
        assert_eq!(
            renew_in(start, end, later, 0.0),
            DAY / 2 - Duration::from_secs(3600)
        );
        assert_eq!(renew_in(start, end, end, 0.5), Duration::ZERO);
        // A certificate whose NotAfter precedes NotBefore renews at once.
        assert_eq!(renew_in(end, start, start, 0.0), Duration::ZERO);
    }
}
