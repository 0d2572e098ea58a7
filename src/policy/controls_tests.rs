//! Pause, pin and the freezes (the last step of [`evaluate`]), and per-metric failover: a failed
//! metric absent from the formula, and `fallback.failureThreshold`.

use chrono::{DateTime, Utc};

use super::{CompiledPolicy, FailureAction, Pause, PolicyState, Rule, evaluate};
use crate::crd::ScalingPolicy;
use crate::model::{Observation, Sample};

fn at(s: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_750_000_000 + s, 0).unwrap()
}

/// Two Prometheus metrics, `rps` (100 per replica) and `queue` (10 per replica), at most 20
/// replicas (minReplicas defaults to 1),
/// with `spec` lines appended.
fn spec(extra: &str) -> Result<CompiledPolicy, String> {
    let yaml = format!(
        "apiVersion: kscale.dev/v1alpha1\nkind: ScalingPolicy\nmetadata: {{name: c, namespace: t}}\nspec:\n  targetRef: {{kind: Deployment, name: w}}\n  maxReplicas: 20\n  metrics:\n  - {{name: rps, prometheus: {{query: r}}, target: {{type: AverageValue, averageValue: '100'}}}}\n  - {{name: queue, prometheus: {{query: q}}, target: {{type: AverageValue, averageValue: '10'}}}}\n{extra}"
    );
    let p: ScalingPolicy = serde_yaml::from_str(&yaml).map_err(|e| e.to_string())?;
    CompiledPolicy::from_resource(&p).map_err(|e| e.to_string())
}

fn compiled(extra: &str) -> CompiledPolicy {
    spec(extra).unwrap_or_else(|e| panic!("{extra}: {e}"))
}

/// `replicas` running; `None` is a failed query.
fn seen(replicas: i32, rps: Option<f64>, queue: Option<f64>, now: DateTime<Utc>) -> Observation {
    let sample = |v: Option<f64>| match v {
        Some(v) => Sample::Series {
            values: vec![v],
            timestamp: now,
        },
        None => Sample::Error {
            message: "connection refused".into(),
        },
    };
    Observation::steady(replicas, vec![sample(rps), sample(queue)])
}

fn condition(d: &super::Decision, type_: &str) -> (bool, &'static str) {
    let c = d
        .conditions()
        .into_iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition"));
    (c.status, c.reason)
}

#[test]
fn paused_holds_and_says_what_the_metrics_would_do() {
    let p = compiled("  paused: true\n");
    assert_eq!(p.pause, Some(Pause::Hold));
    let d = evaluate(
        &p,
        &seen(4, Some(800.0), Some(0.0), at(0)),
        &PolicyState::default(),
        at(0),
    );
    assert_eq!((d.replicas, d.rule), (4, Rule::Paused(Pause::Hold)));
    assert_eq!(
        d.paused.map(|x| (x.evaluated, x.rule)),
        Some((8, Rule::Metrics(Some(0))))
    );
    let reason = d.reason(&p);
    assert!(
        reason.starts_with("hold 4→4: paused by spec.paused, holding the current count; without the pause: scale up 4→8: rps=800"),
        "{reason}"
    );
    assert_eq!(condition(&d, "Paused"), (true, "Paused"));
    // The metrics' conditions still describe the metrics.
    assert_eq!(condition(&d, "ScalingActive"), (true, "ValidMetricFound"));
    // The recommendation is kept: the stabilization window goes on under a pause.
    assert_eq!(d.state.recommendations.last().map(|r| r.replicas), Some(8));
    // A scale-down is held as well.
    let d = evaluate(
        &p,
        &seen(4, Some(100.0), Some(0.0), at(0)),
        &PolicyState::default(),
        at(0),
    );
    assert_eq!(d.replicas, 4);
}

#[test]
fn a_pin_goes_straight_to_its_count_past_rate_limits_schedules_and_a_hand_set_zero() {
    let p = compiled(
        "  pausedReplicas: 3\n  behavior:\n    scaleDown:\n      policies: [{type: Pods, value: 1, periodSeconds: 600}]\n  schedules:\n  - {cron: '0 0 * * *', duration: 24h, minReplicas: 10}\n",
    );
    assert_eq!(p.pause, Some(Pause::Pin(3)));
    // The schedule floor (10) and the rate limit (1 pod per 10 min) do not hold a pin.
    let d = evaluate(
        &p,
        &seen(12, Some(100.0), Some(0.0), at(0)),
        &PolicyState::default(),
        at(0),
    );
    assert_eq!((d.replicas, d.rule), (3, Rule::Paused(Pause::Pin(3))));
    assert!(
        d.reason(&p).starts_with(
            "scale down 12→3: pinned to 3 by spec.pausedReplicas; without the pause: hold 12→12"
        ),
        "{}",
        d.reason(&p)
    );
    assert_eq!(condition(&d, "Paused"), (true, "PinnedReplicas"));
    // A target someone scaled to 0 is brought to the pin: the pin is a person's explicit count.
    let d = evaluate(
        &p,
        &seen(0, Some(100.0), Some(0.0), at(0)),
        &PolicyState::default(),
        at(0),
    );
    assert_eq!(d.replicas, 3);
    // Applied, the pin's step counts as a scale event like any other.
    let mut d = evaluate(
        &p,
        &seen(5, Some(100.0), Some(0.0), at(0)),
        &PolicyState::default(),
        at(0),
    );
    d.record_applied(&p, at(0));
    assert_eq!(d.state.scale_down_events.len(), 1);
}

#[test]
fn scale_in_freeze_blocks_only_lowering() {
    let p = compiled(
        "  pausedScaleIn: true\n  behavior: {scaleDown: {stabilizationWindowSeconds: 0}}\n",
    );
    assert_eq!(p.pause, Some(Pause::ScaleIn));
    let down = evaluate(
        &p,
        &seen(8, Some(100.0), Some(0.0), at(0)),
        &PolicyState::default(),
        at(0),
    );
    assert_eq!(
        (down.replicas, down.rule),
        (8, Rule::Paused(Pause::ScaleIn))
    );
    assert!(
        down.reason(&p).starts_with(
            "hold 8→8: scale-in frozen by spec.pausedScaleIn; without the pause: scale down 8→1"
        ),
        "{}",
        down.reason(&p)
    );
    let up = evaluate(
        &p,
        &seen(2, Some(400.0), Some(0.0), at(0)),
        &PolicyState::default(),
        at(0),
    );
    assert_eq!((up.replicas, up.rule), (4, Rule::Metrics(Some(0))));
    assert!(
        up.reason(&p)
            .ends_with("; spec.pausedScaleIn freezes scale-in, not binding"),
        "{}",
        up.reason(&p)
    );
    assert_eq!(condition(&up, "Paused"), (true, "ScaleInFrozen"));
    // Even the clamp to maxReplicas is a scale-in.
    let above = evaluate(
        &p,
        &seen(25, Some(100.0), Some(0.0), at(0)),
        &PolicyState::default(),
        at(0),
    );
    assert_eq!(above.replicas, 25);
}

#[test]
fn scale_out_freeze_blocks_only_raising() {
    let p = compiled(
        "  pausedScaleOut: true\n  fallback: {onFailure: Replicas, replicas: 10}\n  behavior: {scaleDown: {stabilizationWindowSeconds: 0}}\n",
    );
    assert_eq!(p.pause, Some(Pause::ScaleOut));
    let up = evaluate(
        &p,
        &seen(2, Some(800.0), Some(0.0), at(0)),
        &PolicyState::default(),
        at(0),
    );
    assert_eq!((up.replicas, up.rule), (2, Rule::Paused(Pause::ScaleOut)));
    // The fallback going up is a scale-out too.
    let failing = evaluate(
        &p,
        &seen(2, None, None, at(0)),
        &PolicyState::default(),
        at(0),
    );
    assert_eq!(failing.paused.map(|x| x.evaluated), Some(10));
    assert_eq!(failing.replicas, 2);
    let down = evaluate(
        &p,
        &seen(8, Some(100.0), Some(0.0), at(0)),
        &PolicyState::default(),
        at(0),
    );
    assert!(down.replicas < 8);
    assert_eq!(condition(&down, "Paused"), (true, "ScaleOutFrozen"));
}

#[test]
fn both_freezes_hold_and_no_pause_is_reported_false() {
    assert_eq!(
        compiled("  pausedScaleIn: true\n  pausedScaleOut: true\n").pause,
        Some(Pause::Hold)
    );
    assert_eq!(
        compiled("  paused: false\n  pausedScaleIn: false\n").pause,
        None
    );
    let p = compiled("");
    let d = evaluate(
        &p,
        &seen(2, Some(200.0), Some(0.0), at(0)),
        &PolicyState::default(),
        at(0),
    );
    assert_eq!(
        (d.paused, condition(&d, "Paused")),
        (None, (false, "NotPaused"))
    );
}

#[test]
fn pause_fields_are_validated_naming_the_field() {
    for (extra, expected) in [
        (
            "  pausedReplicas: 3\n  paused: true\n",
            "spec.pausedReplicas: pins the count and cannot be combined",
        ),
        (
            "  pausedReplicas: 3\n  pausedScaleOut: true\n",
            "spec.pausedReplicas: pins the count and cannot be combined",
        ),
        (
            "  pausedReplicas: 21\n",
            "spec.pausedReplicas: 21 is outside [spec.minReplicas, spec.maxReplicas] = [1, 20]",
        ),
        ("  pausedReplicas: 0\n", "spec.pausedReplicas: 0 is outside"),
        (
            "  fallback: {failureThreshold: 0}\n",
            "spec.fallback.failureThreshold: must be between 1 and 1000",
        ),
        (
            "  fallback: {failureThreshold: 1001}\n",
            "spec.fallback.failureThreshold: must be between 1 and 1000",
        ),
    ] {
        let e = spec(extra)
            .err()
            .unwrap_or_else(|| panic!("{extra} validated"));
        assert!(e.contains(expected), "{extra}: {e}");
    }
    assert_eq!(
        compiled("  fallback: {failureThreshold: 3}\n").failure_threshold,
        3
    );
    assert_eq!(compiled("").failure_threshold, 1);
}

#[test]
fn a_formula_routes_around_a_failed_metric_and_may_scale_down() {
    let p = compiled("  formula: 'has(values.queue) ? max(rps, queue) : rps'\n");
    // Both valid: queue (8) wins.
    let d = evaluate(
        &p,
        &seen(4, Some(300.0), Some(80.0), at(0)),
        &PolicyState::default(),
        at(0),
    );
    assert_eq!(d.proposal, Some(8));
    // queue fails: the formula uses rps (3) and, as its author tested has(values.queue), the
    // count may fall (the legacy 5-minute window still applies: its recommendations are 4).
    let d = evaluate(
        &p,
        &seen(4, Some(300.0), None, at(0)),
        &PolicyState::default(),
        at(0),
    );
    assert_eq!((d.rule, d.proposal), (Rule::Formula, Some(3)));
    assert_eq!(d.state.consecutive_failures, 1);
    let reason = d.reason(&p);
    assert!(
        reason.contains("queue error: connection refused"),
        "{reason}"
    );
    assert!(
        reason.contains("; the formula ran without queue (absent)"),
        "{reason}"
    );
    // Past the window, it goes down to 3.
    let state = PolicyState::default();
    let later = evaluate(&p, &seen(4, Some(300.0), None, at(400)), &state, at(400));
    assert_eq!(
        later.replicas, 4,
        "the first evaluation recommends the current count"
    );
    let d = evaluate(
        &p,
        &seen(4, Some(300.0), None, at(800)),
        &later.state,
        at(800),
    );
    assert_eq!(d.replicas, 3);
}

#[test]
fn a_formula_reading_a_failed_metric_without_has_falls_back_naming_it() {
    let p =
        compiled("  formula: 'max(rps, queue)'\n  fallback: {onFailure: Replicas, replicas: 6}\n");
    let d = evaluate(
        &p,
        &seen(4, Some(300.0), None, at(0)),
        &PolicyState::default(),
        at(0),
    );
    assert_eq!(
        (d.rule, d.replicas),
        (Rule::Fallback(FailureAction::Replicas(6)), 6)
    );
    let e = d.formula_error.as_deref().unwrap_or_default();
    assert!(
        e.starts_with(
            "reads metric queue, which has no value at this evaluation (queue failed), so the fallback decides; a formula that tests has(values.queue) can go on without it"
        ),
        "{e}"
    );
    assert!(
        d.reason(&p).contains("; fallback goes up to 6 replicas"),
        "{}",
        d.reason(&p)
    );
}

#[test]
fn a_formula_that_does_not_test_a_failed_metric_never_scales_down() {
    // Iterating `values` silently skips the failed metric: not an explicit route around it.
    let p = compiled("  formula: 'values.all(m, values[m] < 500.0) ? 1 : 10'\n");
    let d = evaluate(
        &p,
        &seen(6, Some(300.0), None, at(0)),
        &PolicyState::default(),
        at(0),
    );
    assert_eq!(
        (d.rule, d.replicas),
        (Rule::Fallback(FailureAction::Hold), 6)
    );
    let reason = d.reason(&p);
    assert!(
        reason.contains("; formula → 1 would scale down, which kscale does not do while queue failed unless the formula tests has(values.<name>)"),
        "{reason}"
    );
    // It may still raise the count.
    let d = evaluate(
        &p,
        &seen(6, Some(900.0), None, at(0)),
        &PolicyState::default(),
        at(0),
    );
    assert_eq!(d.replicas, 10);
    // `'queue' in values` is an explicit test too.
    let p = compiled("  formula: \"'queue' in values ? queue : 1\"\n");
    let d = evaluate(
        &p,
        &seen(6, Some(300.0), None, at(0)),
        &PolicyState::default(),
        at(0),
    );
    assert_eq!((d.rule, d.proposal), (Rule::Formula, Some(1)));
}

#[test]
fn with_every_metric_failed_even_a_guarded_formula_never_scales_down() {
    let p = compiled("  formula: 'has(values.rps) ? rps : (has(values.queue) ? queue : 1)'\n");
    let d = evaluate(
        &p,
        &seen(5, None, None, at(0)),
        &PolicyState::default(),
        at(0),
    );
    assert_eq!(
        (d.rule, d.proposal, d.replicas),
        (Rule::Fallback(FailureAction::Hold), Some(1), 5)
    );
    assert!(
        d.reason(&p).contains(
            "; formula → 1 would scale down, which kscale never does with no metric valid"
        ),
        "{}",
        d.reason(&p)
    );
}

#[test]
fn a_formula_routing_around_a_failed_metric_never_goes_to_zero() {
    let p = compiled(
        "  minReplicas: 0\n  formula: 'has(values.queue) ? queue : 0'\n  behavior: {scaleDown: {stabilizationWindowSeconds: 0}}\n",
    );
    // Every metric inactive since long before the cooldown (5m): only failing data keeps it up.
    let idle_since = PolicyState {
        last_active_time: Some(at(-3600)),
        ..PolicyState::default()
    };
    let d = evaluate(&p, &seen(3, Some(0.0), None, at(0)), &idle_since, at(0));
    assert_eq!((d.rule, d.replicas), (Rule::Formula, 1), "{}", d.reason(&p));
    // With every metric valid (and inactive past the cooldown) the target may go to 0; with
    // `minReplicas: 0` the way there is the idle state's.
    let d = evaluate(
        &p,
        &seen(3, Some(0.0), Some(0.0), at(0)),
        &idle_since,
        at(0),
    );
    assert_eq!((d.rule, d.replicas), (Rule::Idle, 0), "{}", d.reason(&p));
}

#[test]
fn the_fallback_waits_for_failure_threshold_consecutive_failures() {
    let p = compiled("  fallback: {onFailure: Replicas, replicas: 10, failureThreshold: 3}\n");
    let mut state = PolicyState::default();
    let mut seen_counts = Vec::new();
    let mut replicas = Vec::new();
    for (i, rps) in [None, None, None, None, Some(400.0), None]
        .into_iter()
        .enumerate()
    {
        let now = at(15 * i as i64);
        let d = evaluate(&p, &seen(4, rps, Some(0.0), now), &state, now);
        if i == 0 {
            assert!(
                d.reason(&p)
                    .contains("; failure 1 of 3: the fallback applies at 3, holding until then"),
                "{}",
                d.reason(&p)
            );
            assert_eq!(condition(&d, "ScalingActive"), (false, "FailedGetMetrics"));
        }
        seen_counts.push(d.state.consecutive_failures);
        replicas.push(d.replicas);
        // A restart reads the count back from status.
        let json = serde_json::to_value(&d.state).unwrap();
        state = serde_json::from_value::<PolicyState>(json)
            .unwrap()
            .sanitized(now);
    }
    // Held twice, then the fallback; the count stops at the threshold; a good evaluation resets it.
    assert_eq!(seen_counts, [1, 2, 3, 3, 0, 1]);
    assert_eq!(replicas, [4, 4, 10, 10, 4, 4]);
}

#[test]
fn the_fallback_floor_waits_for_the_threshold_too() {
    // One metric fails, the other scales up: the floor (10) only from the 2nd failure.
    let p = compiled("  fallback: {onFailure: Replicas, replicas: 10, failureThreshold: 2}\n");
    let d1 = evaluate(
        &p,
        &seen(4, Some(600.0), None, at(0)),
        &PolicyState::default(),
        at(0),
    );
    assert_eq!(d1.replicas, 6);
    assert!(
        d1.reason(&p)
            .contains("some metrics failed (failure 1 of 2, no fallback floor yet)"),
        "{}",
        d1.reason(&p)
    );
    let d2 = evaluate(&p, &seen(4, Some(600.0), None, at(15)), &d1.state, at(15));
    assert_eq!(
        d2.replicas, 8,
        "the floor 10, within the legacy scale-up limit of 2×4"
    );
}

#[test]
fn without_the_new_fields_a_failure_decides_at_once_as_before() {
    let p = compiled("  fallback: {onFailure: Replicas, replicas: 10}\n");
    let d = evaluate(
        &p,
        &seen(4, None, None, at(0)),
        &PolicyState::default(),
        at(0),
    );
    assert_eq!((d.replicas, d.state.consecutive_failures), (10, 1));
    assert_eq!(d.paused, None);
}
