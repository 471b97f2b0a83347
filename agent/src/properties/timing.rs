//! Renewal timing and backoff.

use super::*;

// Renewal.

fn instants() -> impl Strategy<Value = SystemTime> {
    (0u64..4_000_000_000, 0u32..1_000_000_000)
        .prop_map(|(secs, nanos)| SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Up to ten years, down to nothing.
fn lifetimes() -> impl Strategy<Value = Duration> {
    prop_oneof![
        8 => (0u64..10 * 365 * 86_400, 0u32..1_000_000_000)
            .prop_map(|(secs, nanos)| Duration::new(secs, nanos)),
        1 => (0u64..10_000).prop_map(Duration::from_nanos),
        1 => Just(Duration::ZERO),
    ]
}

/// Samples in [0, 1), and at times far outside it.
fn samples() -> impl Strategy<Value = f64> {
    prop_oneof![4 => 0.0..1.0f64, 1 => -1e6..1e6f64]
}

/// What float rounding of a lifetime of years may cost.
const ROUNDING: Duration = Duration::from_micros(1);

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn a_certificate_renews_40_to_50_percent_into_its_lifetime(
        start in instants(),
        lifetime in lifetimes(),
        unit in samples(),
    ) {
        let wait = renew_in(start, start + lifetime, start, unit);
        let earliest = lifetime.mul_f64(RENEW_AT - RENEW_JITTER);
        let latest = lifetime.mul_f64(RENEW_AT);
        prop_assert!(
            wait + ROUNDING >= earliest && wait <= latest + ROUNDING,
            "renews {:?} into {:?}", wait, lifetime
        );
        if !lifetime.is_zero() {
            prop_assert!(wait < lifetime, "renews {:?} into {:?}, at or after expiry", wait, lifetime);
        }
    }

    #[test]
    fn renewal_is_never_due_after_expiry(
        start in instants(),
        lifetime in lifetimes(),
        elapsed in 0.0..2.0f64,
        unit in samples(),
    ) {
        let expiry = start + lifetime;
        let now = start + lifetime.mul_f64(elapsed);
        let wait = renew_in(start, expiry, now, unit);
        prop_assert!(wait <= lifetime);
        prop_assert!(
            wait.is_zero() || now + wait < expiry,
            "at {:?} into {:?} it waits {:?}", now.duration_since(start), lifetime, wait
        );
    }

    #[test]
    fn renewal_comes_sooner_as_the_clock_runs(
        start in instants(),
        lifetime in lifetimes(),
        elapsed in 0.0..1.5f64,
        later in 0.0..1.5f64,
        unit in samples(),
    ) {
        let expiry = start + lifetime;
        let now = start + lifetime.mul_f64(elapsed);
        let gap = lifetime.mul_f64(later);
        let first = renew_in(start, expiry, now, unit);
        let second = renew_in(start, expiry, now + gap, unit);
        prop_assert_eq!(second, first.saturating_sub(gap));
    }

    #[test]
    fn a_larger_sample_never_renews_later(
        start in instants(),
        lifetime in lifetimes(),
        elapsed in 0.0..1.0f64,
        a in samples(),
        b in samples(),
    ) {
        let (low, high) = if a <= b { (a, b) } else { (b, a) };
        let now = start + lifetime.mul_f64(elapsed);
        let expiry = start + lifetime;
        prop_assert!(renew_in(start, expiry, now, high) <= renew_in(start, expiry, now, low));
    }

    #[test]
    fn a_certificate_that_ends_before_it_starts_renews_at_once(
        start in instants(),
        lifetime in lifetimes(),
        now in instants(),
        unit in samples(),
    ) {
        prop_assume!(!lifetime.is_zero());
        prop_assert_eq!(renew_in(start + lifetime, start, now, unit), Duration::ZERO);
    }
}

// Backoff.

/// Bases and caps in whole milliseconds, as configurations write them; the
/// base may exceed the cap.
fn backoffs() -> impl Strategy<Value = Backoff> {
    (1u64..10_000, 1u64..600_000).prop_map(|(base, max)| {
        Backoff::new(Duration::from_millis(base), Duration::from_millis(max))
    })
}

fn failures() -> impl Strategy<Value = u32> {
    prop_oneof![3 => 0u32..40, 1 => any::<u32>()]
}

/// The ceiling after `failures` failures: the base, doubled per further
/// failure, never above the cap.
fn ceiling(backoff: &Backoff, failures: u32) -> Duration {
    let mut ceiling = backoff.base.min(backoff.max);
    for _ in 1..failures {
        if ceiling == backoff.max {
            break;
        }
        ceiling = (ceiling * 2).min(backoff.max);
    }
    ceiling
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn a_delay_lies_in_the_upper_half_of_a_ceiling_that_never_passes_the_cap(
        backoff in backoffs(),
        failures in failures(),
        unit in samples(),
    ) {
        let ceiling = ceiling(&backoff, failures);
        let delay = backoff.delay(failures, unit);
        prop_assert!(delay <= backoff.max, "{:?} over the cap {:?}", delay, backoff.max);
        prop_assert!(
            delay >= ceiling / 2 && delay <= ceiling,
            "after {} failures: {:?}, not in [{:?}, {:?}]", failures, delay, ceiling / 2, ceiling
        );
    }

    #[test]
    fn delays_never_fall_as_failures_mount(
        backoff in backoffs(),
        a in failures(),
        b in failures(),
        unit in samples(),
    ) {
        let (fewer, more) = (a.min(b), a.max(b));
        prop_assert!(backoff.delay(more, unit) >= backoff.delay(fewer, unit));
    }

    #[test]
    fn the_ceiling_doubles_until_the_cap(backoff in backoffs(), failures in 1u32..40) {
        let now = backoff.delay(failures, 1.0);
        let next = backoff.delay(failures + 1, 1.0);
        prop_assert_eq!(next, (now * 2).min(backoff.max));
    }

    #[test]
    fn after_a_success_the_delays_start_over_from_the_base(
        backoff in backoffs(),
        failures in failures(),
        unit in samples(),
    ) {
        // The pool counts failures from 0 again after a success, so the next
        // delay is the first one's.
        let first = backoff.delay(1, unit);
        prop_assert_eq!(backoff.delay(0, unit), first);
        prop_assert!(first <= backoff.base.min(backoff.max));
        prop_assert!(first <= backoff.delay(failures, unit));
    }
}
