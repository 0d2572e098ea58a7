//! The shadow report: a DryRun policy's desired replicas against the HPA's beside it, over a
//! period, from the two gauges the daemon exports in shadow mode
//! (`kscale_desired_replicas` and `kscale_shadow_hpa_desired_replicas`).
//!
//! Pure: the two series in, the figures out. Each sample stands for one `step` (the range
//! query's resolution), so replica-hours are `Σ replicas × step`, and time below is the number
//! of samples where one was below the other, times `step`. Samples present in only one series
//! (before the policy or the HPA existed, or a scrape gap) are left out and counted.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, TimeDelta, Utc};

/// How many of the largest gaps the report lists.
pub const LARGEST_GAPS: usize = 5;

/// One moment where the two disagreed.
#[derive(Debug, Clone, PartialEq)]
pub struct Gap {
    /// When.
    pub time: DateTime<Utc>,
    /// kscale's desired replicas.
    pub kscale: f64,
    /// The HPA's desired replicas.
    pub hpa: f64,
}

/// The figures of a shadow period.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowSummary {
    /// First and last sample both series have.
    pub start: DateTime<Utc>,
    /// Last such sample.
    pub end: DateTime<Utc>,
    /// The resolution each sample stands for.
    pub step: TimeDelta,
    /// Samples both series have.
    pub samples: usize,
    /// Samples only one series has (left out).
    pub unmatched: usize,
    /// kscale's replica-hours.
    pub kscale_replica_hours: f64,
    /// The HPA's replica-hours.
    pub hpa_replica_hours: f64,
    /// Minutes kscale wanted fewer replicas than the HPA.
    pub kscale_below_minutes: f64,
    /// Minutes the HPA wanted fewer replicas than kscale.
    pub hpa_below_minutes: f64,
    /// The largest disagreements, largest first (the earliest of equal ones first), at most
    /// [`LARGEST_GAPS`].
    pub largest_gaps: Vec<Gap>,
}

/// Why there is nothing to report.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ShadowError {
    /// No moment has both series.
    #[error(
        "no moment has both series ({kscale} samples of kscale_desired_replicas, {hpa} of kscale_shadow_hpa_desired_replicas): is the policy DryRun beside an HPA, and is the daemon scraped?"
    )]
    NoOverlap {
        /// Samples of kscale's series.
        kscale: usize,
        /// Samples of the HPA's series.
        hpa: usize,
    },
}

/// The figures of `kscale` against `hpa` (time-stamped replica counts), each sample standing
/// for `step`.
pub fn summarize(
    kscale: &[(DateTime<Utc>, f64)],
    hpa: &[(DateTime<Utc>, f64)],
    step: TimeDelta,
) -> Result<ShadowSummary, ShadowError> {
    let theirs: BTreeMap<DateTime<Utc>, f64> = hpa.iter().copied().collect();
    let both: Vec<(DateTime<Utc>, f64, f64)> = kscale
        .iter()
        .filter_map(|(t, k)| theirs.get(t).map(|h| (*t, *k, *h)))
        .collect();
    let (Some(first), Some(last)) = (both.first(), both.last()) else {
        return Err(ShadowError::NoOverlap {
            kscale: kscale.len(),
            hpa: hpa.len(),
        });
    };
    let hours = step.num_milliseconds() as f64 / 3_600_000.0;
    let minutes = hours * 60.0;
    let mut gaps: Vec<Gap> = both
        .iter()
        .filter(|(_, k, h)| k != h)
        .map(|&(time, kscale, hpa)| Gap { time, kscale, hpa })
        .collect();
    // Largest first; a stable sort keeps equal ones in time order.
    gaps.sort_by(|a, b| {
        (b.kscale - b.hpa)
            .abs()
            .total_cmp(&(a.kscale - a.hpa).abs())
    });
    gaps.truncate(LARGEST_GAPS);
    Ok(ShadowSummary {
        start: first.0,
        end: last.0,
        step,
        samples: both.len(),
        // Saturating: a series with repeated timestamps can match more than once.
        unmatched: (kscale.len() + hpa.len()).saturating_sub(2 * both.len()),
        kscale_replica_hours: both.iter().map(|(_, k, _)| k * hours).sum(),
        hpa_replica_hours: both.iter().map(|(_, _, h)| h * hours).sum(),
        kscale_below_minutes: both.iter().filter(|(_, k, h)| k < h).count() as f64 * minutes,
        hpa_below_minutes: both.iter().filter(|(_, k, h)| h < k).count() as f64 * minutes,
        largest_gaps: gaps,
    })
}

/// The report as text, headed by `what` (`shop/backend beside HPA backend`).
pub fn render(what: &str, s: &ShadowSummary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "shadow report: {what}, {} to {}, step {}s ({} samples{})",
        s.start.to_rfc3339(),
        s.end.to_rfc3339(),
        s.step.num_seconds(),
        s.samples,
        if s.unmatched > 0 {
            format!("; {} in only one series left out", s.unmatched)
        } else {
            String::new()
        }
    );
    let _ = writeln!(out, "{:<28}{:>10}{:>10}", "", "kscale", "HPA");
    let _ = writeln!(
        out,
        "{:<28}{:>10.1}{:>10.1}",
        "replica-hours", s.kscale_replica_hours, s.hpa_replica_hours
    );
    let _ = writeln!(
        out,
        "{:<28}{:>10.1}{:>10.1}",
        "minutes below the other", s.kscale_below_minutes, s.hpa_below_minutes
    );
    if s.largest_gaps.is_empty() {
        let _ = writeln!(out, "they agreed at every sample");
    } else {
        let _ = writeln!(out, "largest gaps (kscale − HPA):");
        for g in &s.largest_gaps {
            let _ = writeln!(
                out,
                "  {}  kscale {}, HPA {} ({:+})",
                g.time.to_rfc3339(),
                g.kscale,
                g.hpa,
                g.kscale - g.hpa
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    #[test]
    fn figures_of_two_series() {
        // Every 15 s: kscale 2, 2, 3, 5, 4; the HPA 2, 3, 3, 3, 4, and one HPA sample alone.
        let k: Vec<_> = [2.0, 2.0, 3.0, 5.0, 4.0]
            .iter()
            .enumerate()
            .map(|(i, v)| (at(15 * i as i64), *v))
            .collect();
        let mut h: Vec<_> = [2.0, 3.0, 3.0, 3.0, 4.0]
            .iter()
            .enumerate()
            .map(|(i, v)| (at(15 * i as i64), *v))
            .collect();
        h.push((at(75), 4.0));
        let s = summarize(&k, &h, TimeDelta::seconds(15)).unwrap();
        assert_eq!(s.samples, 5);
        assert_eq!(s.unmatched, 1);
        assert!((s.kscale_replica_hours - 16.0 * 15.0 / 3600.0).abs() < 1e-12);
        assert!((s.hpa_replica_hours - 15.0 * 15.0 / 3600.0).abs() < 1e-12);
        assert_eq!(s.kscale_below_minutes, 0.25);
        assert_eq!(s.hpa_below_minutes, 0.25);
        assert_eq!(
            s.largest_gaps,
            vec![
                Gap {
                    time: at(45),
                    kscale: 5.0,
                    hpa: 3.0
                },
                Gap {
                    time: at(15),
                    kscale: 2.0,
                    hpa: 3.0
                },
            ]
        );
        let text = render("shop/web beside HPA web", &s);
        assert!(text.contains("; 1 in only one series left out"), "{text}");
        assert!(text.contains("kscale 5, HPA 3 (+2)"), "{text}");
    }

    #[test]
    fn agreement_and_no_overlap() {
        let k = vec![(at(0), 2.0), (at(15), 2.0)];
        let s = summarize(&k, &k, TimeDelta::seconds(15)).unwrap();
        assert!(s.largest_gaps.is_empty());
        assert!(render("x", &s).contains("they agreed at every sample"));
        assert_eq!(
            summarize(&k, &[], TimeDelta::seconds(15)),
            Err(ShadowError::NoOverlap { kscale: 2, hpa: 0 })
        );
    }
}
