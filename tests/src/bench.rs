//! What `ferry-bench` makes of its samples: medians and spreads per setup,
//! ratios against the baselines, the targets checked, and the table
//! printed and written into BENCHMARKS.md. Pure, so it is tested here.

use std::collections::BTreeMap;

use serde::Serialize;

/// The ways the same two pods are connected, in the order runs alternate:
/// no mesh, Ferry, and two TLS proxy baselines (stunnel, HAProxy).
pub const SETUPS: [&str; 4] = ["no-mesh", "ferry", "stunnel", "haproxy"];

/// Samples of one metric (e.g. `rr.perSecond`) per setup, one per round.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Samples(pub BTreeMap<String, BTreeMap<String, Vec<f64>>>);

impl Samples {
    pub fn add(&mut self, metric: &str, setup: &str, value: f64) {
        self.0
            .entry(metric.to_owned())
            .or_default()
            .entry(setup.to_owned())
            .or_default()
            .push(value);
    }

    /// The median of `metric` for `setup`, if it was measured.
    pub fn median(&self, metric: &str, setup: &str) -> Option<f64> {
        self.0.get(metric)?.get(setup).map(|v| median(v))
    }

    pub fn summary(&self) -> BTreeMap<String, BTreeMap<String, Summary>> {
        self.0
            .iter()
            .map(|(metric, setups)| {
                let per_setup = setups
                    .iter()
                    .map(|(setup, values)| (setup.clone(), Summary::of(values)))
                    .collect();
                (metric.clone(), per_setup)
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub rounds: usize,
}

impl Summary {
    pub fn of(values: &[f64]) -> Self {
        Self {
            median: median(values),
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            rounds: values.len(),
        }
    }

    /// Half the range as a share of the median: the noise a reader should
    /// allow for.
    pub fn spread(&self) -> f64 {
        if self.median == 0.0 {
            return 0.0;
        }
        (self.max - self.min) / 2.0 / self.median
    }
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// One target of the issue: `ferry`'s median of `metric` against a
/// baseline's, or against a fixed bound.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub what: String,
    pub value: f64,
    pub target: String,
    pub met: bool,
}

/// `ferry / baseline` of `metric`'s medians; `higher_is_better` decides the
/// direction in which `bound` must be passed.
pub fn ratio_check(
    samples: &Samples,
    metric: &str,
    baseline: &str,
    bound: f64,
    higher_is_better: bool,
) -> Option<Check> {
    let ferry = samples.median(metric, "ferry")?;
    let base = samples.median(metric, baseline)?;
    let ratio = ferry / base;
    let (met, op) = if higher_is_better {
        (ratio >= bound, "≥")
    } else {
        (ratio <= bound, "≤")
    };
    Some(Check {
        what: format!("{metric} ferry/{baseline}"),
        value: ratio,
        target: format!("{op} {bound}"),
        met,
    })
}

/// `ferry / best` of `metric`'s medians, where `best` is whichever of
/// `baselines` has the better median (the higher, or the lower when
/// `higher_is_better` is false): Ferry against the strongest proxy a user
/// could run in its place, whichever that is for this load.
pub fn best_baseline_check(
    samples: &Samples,
    metric: &str,
    baselines: &[&str],
    bound: f64,
    higher_is_better: bool,
) -> Option<Check> {
    let better = |a: f64, b: f64| if higher_is_better { a > b } else { a < b };
    let best = baselines
        .iter()
        .filter_map(|&b| Some((b, samples.median(metric, b)?)))
        .reduce(|best, next| if better(next.1, best.1) { next } else { best })?;
    ratio_check(samples, metric, best.0, bound, higher_is_better).map(|mut check| {
        check.what = format!("{metric} ferry/best ({})", best.0);
        check
    })
}

pub fn bound_check(what: &str, value: f64, bound: f64, unit: &str) -> Check {
    Check {
        what: what.to_owned(),
        value,
        target: format!("≤ {bound} {unit}"),
        met: value <= bound,
    }
}

/// The results as a Markdown table: each metric's median (± spread) per
/// setup, one column per [`SETUPS`] entry in that order.
pub fn markdown(samples: &Samples, checks: &[Check]) -> String {
    let mut out = format!(
        "| metric | {} |\n| --- |{}\n",
        SETUPS.join(" | "),
        " --- |".repeat(SETUPS.len())
    );
    for (metric, setups) in samples.summary() {
        out.push_str(&format!("| {metric} |"));
        for setup in SETUPS {
            match setups.get(setup) {
                Some(s) => out.push_str(&format!(
                    " {} ±{:.0}% |",
                    number(s.median),
                    s.spread() * 100.0
                )),
                None => out.push_str(" – |"),
            }
        }
        out.push('\n');
    }
    out.push_str("\n| target | value | wanted | met |\n| --- | --- | --- | --- |\n");
    for check in checks {
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            check.what,
            number(check.value),
            check.target,
            if check.met { "yes" } else { "**no**" }
        ));
    }
    out
}

/// Three significant digits, without an exponent.
fn number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// Replaces the text between `<!-- bench:start -->` and `<!-- bench:end -->`
/// in `document` with `table`.
pub fn replace_results(document: &str, table: &str) -> Option<String> {
    const START: &str = "<!-- bench:start -->";
    const END: &str = "<!-- bench:end -->";
    let start = document.find(START)? + START.len();
    let end = document[start..].find(END)? + start;
    Some(format!(
        "{}\n{}\n{}",
        &document[..start],
        table.trim_end(),
        &document[end..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn ratios_are_checked_in_the_direction_that_is_better() {
        let mut samples = Samples::default();
        for (setup, v) in [("ferry", 60.0), ("no-mesh", 100.0), ("stunnel", 50.0)] {
            samples.add("rr.perSecond", setup, v);
            samples.add("rr.p99Micros", setup, v);
        }
        let check = ratio_check(&samples, "rr.perSecond", "no-mesh", 0.5, true).unwrap();
        assert!(check.met && (check.value - 0.6).abs() < 1e-9);
        let latency = ratio_check(&samples, "rr.p99Micros", "stunnel", 1.0, false).unwrap();
        assert!(!latency.met, "ferry's p99 is above stunnel's");
        assert!(ratio_check(&samples, "crr.perSecond", "stunnel", 3.0, true).is_none());
    }

    #[test]
    fn the_best_baseline_is_the_better_one_in_the_metric_s_direction() {
        let mut samples = Samples::default();
        for (setup, rate, p99) in [
            ("ferry", 90.0, 50.0),
            ("stunnel", 60.0, 40.0),
            ("haproxy", 100.0, 80.0),
        ] {
            samples.add("rr.perSecond", setup, rate);
            samples.add("rr.p99Micros", setup, p99);
        }
        let both = ["stunnel", "haproxy"];
        let rate = best_baseline_check(&samples, "rr.perSecond", &both, 1.0, true).unwrap();
        assert_eq!(rate.what, "rr.perSecond ferry/best (haproxy)");
        assert!(!rate.met && (rate.value - 0.9).abs() < 1e-9);
        let p99 = best_baseline_check(&samples, "rr.p99Micros", &both, 1.0, false).unwrap();
        assert_eq!(p99.what, "rr.p99Micros ferry/best (stunnel)");
        assert!(!p99.met && (p99.value - 1.25).abs() < 1e-9);
        // A baseline that did not run is no baseline; none at all, no check.
        let only = best_baseline_check(&samples, "rr.perSecond", &["stunnel", "envoy"], 1.0, true);
        assert!(only.unwrap().met);
        assert!(best_baseline_check(&samples, "rr.perSecond", &["envoy"], 1.0, true).is_none());
    }

    #[test]
    fn the_table_replaces_only_the_marked_section() {
        let doc = "# B\nintro\n<!-- bench:start -->\nold\n<!-- bench:end -->\nafter\n";
        let new = replace_results(doc, "| new |\n").unwrap();
        assert_eq!(
            new,
            "# B\nintro\n<!-- bench:start -->\n| new |\n<!-- bench:end -->\nafter\n"
        );
        assert!(replace_results("no markers", "x").is_none());
    }

    #[test]
    fn spread_is_half_the_range_over_the_median() {
        let s = Summary::of(&[90.0, 100.0, 110.0]);
        assert!((s.spread() - 0.1).abs() < 1e-9);
        let mut samples = Samples::default();
        samples.add("bulk.MiBPerSecond", "ferry", 100.0);
        let table = markdown(&samples, &[]);
        assert!(
            table.contains("| bulk.MiBPerSecond | – | 100 ±0% | – | – |"),
            "{table}"
        );
    }

    #[test]
    fn the_table_has_a_column_per_setup() {
        let mut samples = Samples::default();
        for (setup, v) in [
            ("no-mesh", 400.0),
            ("ferry", 100.0),
            ("stunnel", 80.0),
            ("haproxy", 90.0),
        ] {
            samples.add("bulk.MiBPerSecond", setup, v);
        }
        let table = markdown(&samples, &[]);
        let mut lines = table.lines();
        assert_eq!(
            lines.next(),
            Some("| metric | no-mesh | ferry | stunnel | haproxy |")
        );
        assert_eq!(lines.next(), Some("| --- | --- | --- | --- | --- |"));
        assert_eq!(
            lines.next(),
            Some("| bulk.MiBPerSecond | 400 ±0% | 100 ±0% | 80.0 ±0% | 90.0 ±0% |")
        );
    }
}
