//! The verdict line: one policy's backtest figures against another's, in one sentence.
//!
//! `backend-default: −23 % replica-hours, −90 % SLO-violation minutes, −40 % scaling actions vs
//! backend-hpa-cpu`. Each figure is the relative change from the compared policy's; a figure the
//! compared policy has at 0 cannot be a percentage, so it reads `0 vs 0` when both are 0 and
//! `+N (from 0)` otherwise. SLO-violation minutes appear only when both runs have them (a
//! capacity was given). Pure: the same summaries give the same line.

use super::Summary;

/// The verdict line of `ours` against `baseline`.
pub fn verdict(ours: &Summary, baseline: &Summary) -> String {
    let mut parts = vec![change(
        ours.replica_hours,
        baseline.replica_hours,
        1,
        "replica-hours",
    )];
    if let (Some(a), Some(b)) = (ours.slo_violation_minutes, baseline.slo_violation_minutes) {
        parts.push(change(a, b, 1, "SLO-violation minutes"));
    }
    parts.push(change(
        ours.scaling_actions as f64,
        baseline.scaling_actions as f64,
        0,
        "scaling actions",
    ));
    format!(
        "{}: {} vs {}",
        ours.policy,
        parts.join(", "),
        baseline.policy
    )
}

/// One figure's change: `−23 % what`, `+4 % what`, `±0 % what`, `0 vs 0 what` or
/// `+12.5 (from 0) what`. `decimals` is the figure's own precision (for the from-0 case).
fn change(ours: f64, baseline: f64, decimals: usize, what: &str) -> String {
    if baseline == 0.0 {
        return if ours == 0.0 {
            format!("0 vs 0 {what}")
        } else {
            format!("+{ours:.decimals$} (from 0) {what}")
        };
    }
    let pct = (ours - baseline) / baseline * 100.0;
    if ours == baseline {
        return format!("±0 % {what}");
    }
    // Whole percent, except that a change under 1 % keeps one decimal so it never reads as 0.
    let magnitude = if pct.abs() < 0.95 {
        format!("{:.1}", pct.abs())
    } else {
        format!("{:.0}", pct.abs())
    };
    let sign = if pct < 0.0 { '\u{2212}' } else { '+' };
    format!("{sign}{magnitude} % {what}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;

    fn summary(policy: &str, hours: f64, slo: Option<f64>, actions: u64) -> Summary {
        let t = DateTime::from_timestamp(0, 0).expect("epoch");
        Summary {
            policy: policy.into(),
            start: t,
            end: t,
            evaluations: 1,
            replica_hours: hours,
            scaling_actions: actions,
            scale_ups: 0,
            scale_downs: 0,
            min_replicas: 0,
            max_replicas: 0,
            degraded_evaluations: 0,
            slo_violation_minutes: slo,
            slo_violations: Vec::new(),
            oracle_replica_hours: None,
            oracle_unbounded_replica_hours: None,
            ratio_to_oracle: None,
            elasticity: None,
        }
    }

    #[test]
    fn the_verdict_gives_each_change_against_the_compared_policy() {
        let ours = summary("default", 950.0, Some(5.0), 610);
        let hpa = summary("backend-hpa-cpu", 1233.7, Some(50.0), 1017);
        assert_eq!(
            verdict(&ours, &hpa),
            "default: \u{2212}23 % replica-hours, \u{2212}90 % SLO-violation minutes, \
             \u{2212}40 % scaling actions vs backend-hpa-cpu"
        );
        // And the other way round: increases carry a plus.
        assert_eq!(
            verdict(&hpa, &ours),
            "backend-hpa-cpu: +30 % replica-hours, +900 % SLO-violation minutes, \
             +67 % scaling actions vs default"
        );
    }

    #[test]
    fn the_verdict_is_honest_about_zero_baselines_and_small_changes() {
        let ours = summary("a", 100.0, Some(0.0), 7);
        let base = summary("b", 100.0, Some(0.0), 0);
        assert_eq!(
            verdict(&ours, &base),
            "a: ±0 % replica-hours, 0 vs 0 SLO-violation minutes, +7 (from 0) scaling actions vs b"
        );
        let ours = summary("a", 100.4, Some(2.5), 0);
        let base = summary("b", 100.0, Some(0.0), 0);
        assert_eq!(
            verdict(&ours, &base),
            "a: +0.4 % replica-hours, +2.5 (from 0) SLO-violation minutes, 0 vs 0 scaling actions vs b"
        );
    }

    #[test]
    fn the_verdict_leaves_out_slo_minutes_without_a_capacity() {
        let ours = summary("a", 50.0, None, 10);
        let base = summary("b", 100.0, None, 20);
        assert_eq!(
            verdict(&ours, &base),
            "a: \u{2212}50 % replica-hours, \u{2212}50 % scaling actions vs b"
        );
    }
}
