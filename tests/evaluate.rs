//! The evaluation core against the HPA controller's documented behavior, and its invariants.

use chrono::{DateTime, TimeDelta, Utc};
use kscale::crd::ScalingPolicy;
use kscale::model::{Observation, Sample};
use kscale::policy::{CompiledPolicy, PolicyState, Rule, evaluate};
use proptest::prelude::*;

fn t(s: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
}

fn policy(extra: &str) -> CompiledPolicy {
    let yaml = format!(
        r#"
apiVersion: kscale.dev/v1alpha1
kind: ScalingPolicy
metadata: {{name: p, namespace: default}}
spec:
  targetRef: {{apiVersion: apps/v1, kind: Deployment, name: web}}
  minReplicas: 2
  maxReplicas: 20
  metrics:
  - name: rps
    prometheus: {{query: 'sum(rate(x[1m]))'}}
    target: {{type: AverageValue, averageValue: "100"}}
  - name: queue
    prometheus: {{query: 'sum(q)'}}
    target: {{type: AverageValue, averageValue: "10"}}
{extra}"#
    );
    let p: ScalingPolicy = serde_yaml::from_str(&yaml).unwrap();
    CompiledPolicy::from_resource(&p).unwrap()
}

fn obs(replicas: i32, rps: Option<f64>, queue: Option<f64>, now: DateTime<Utc>) -> Observation {
    let s = |v: Option<f64>| match v {
        Some(v) => Sample::Series {
            values: vec![v],
            timestamp: now - TimeDelta::seconds(1),
        },
        None => Sample::Missing {
            reason: "query returned no series".into(),
        },
    };
    Observation::steady(replicas, vec![s(rps), s(queue)])
}

/// Runs a sequence of (seconds, rps) through the policy, applying each decision.
fn replay(p: &CompiledPolicy, start: i32, seq: &[(i64, f64)]) -> Vec<i32> {
    let mut state = PolicyState::default();
    let mut replicas = start;
    let mut out = Vec::new();
    for &(s, rps) in seq {
        let mut d = evaluate(p, &obs(replicas, Some(rps), Some(0.0), t(s)), &state, t(s));
        d.record_applied(p, t(s));
        replicas = d.replicas;
        state = d.state;
        out.push(replicas);
    }
    out
}

#[test]
fn max_across_metrics_like_the_hpa() {
    let p = policy("");
    let d = evaluate(
        &p,
        &obs(4, Some(400.0), Some(80.0), t(0)),
        &PolicyState::default(),
        t(0),
    );
    // rps proposes 4 (within tolerance), queue proposes ceil(80/10) = 8; legacy rule allows up to max(2*4, 4) = 8.
    assert_eq!(d.replicas, 8);
    assert_eq!(d.rule, Rule::Metrics(Some(1)));
    let reason = d.reason(&p);
    assert!(reason.starts_with("scale up 4→8: rps=400 (target 100/replica) → 4, queue=80 (target 10/replica) → 8; max → 8 (queue)"), "{reason}");
}

#[test]
fn legacy_scale_up_is_capped_at_double_or_four() {
    let p = policy("");
    let d = evaluate(
        &p,
        &obs(2, Some(5000.0), Some(0.0), t(0)),
        &PolicyState::default(),
        t(0),
    );
    assert_eq!(d.replicas, 4); // max(2*2, 4)
    let d = evaluate(
        &p,
        &obs(5, Some(5000.0), Some(0.0), t(0)),
        &PolicyState::default(),
        t(0),
    );
    assert_eq!(d.replicas, 10); // 2*5
}

#[test]
fn legacy_scale_down_waits_for_the_five_minute_window() {
    let p = policy("");
    // 10 replicas, then demand drops to 2 replicas' worth: held at 10 while the first
    // recommendation (10) is inside the window, which includes its boundary.
    let seq: Vec<(i64, f64)> = (0..=22)
        .map(|i| (i * 15, if i == 0 { 1000.0 } else { 200.0 }))
        .collect();
    let r = replay(&p, 10, &seq);
    assert_eq!(r[0], 10);
    // t=300: the recommendation at t=0 is exactly at the cutoff and still counts (Before is strict).
    assert_eq!(r[20], 10, "{r:?}");
    assert_eq!(r[21], 2, "{r:?}");
}

#[test]
fn behavior_rate_limits_use_period_start_replicas() {
    // Up: at most 1 pod per 60 s.
    let p = policy(
        r#"  behavior:
    scaleUp:
      policies: [{type: Pods, value: 1, periodSeconds: 60}]
"#,
    );
    let seq: Vec<(i64, f64)> = (0..9).map(|i| (i * 15, 2000.0)).collect();
    let r = replay(&p, 2, &seq);
    // +1 at t=0; t=15..45 blocked (1 added within 60 s); t=60: the event at t=0 is exactly 60 s
    // old, not strictly newer than the cutoff, so another +1.
    assert_eq!(r, vec![3, 3, 3, 3, 4, 4, 4, 4, 5]);
}

#[test]
fn behavior_scale_down_stabilization_and_percent_policy() {
    let p = policy(
        r#"  behavior:
    scaleDown:
      stabilizationWindowSeconds: 60
      policies: [{type: Percent, value: 50, periodSeconds: 60}]
"#,
    );
    let mut seq = vec![(0, 1600.0)];
    seq.extend((1..=12).map(|i| (i * 15, 200.0)));
    let r = replay(&p, 16, &seq);
    // Held at 16 while the recommendation of 16 (t=0) is strictly newer than the window's
    // cutoff (t=15..45); at t=60 it sits exactly on the cutoff and no longer counts. Then at most
    // -50 % of the period's starting count per 60 s: 16 → 8 at t=60, 8 → 4 at t=120 (the event at
    // t=60 is exactly on the cutoff), 4 → 2 at t=180.
    assert_eq!(r, vec![16, 16, 16, 16, 8, 8, 8, 8, 4, 4, 4, 4, 2]);
}

#[test]
fn select_policy_disabled_blocks_scale_down() {
    let p = policy(
        r#"  behavior:
    scaleDown:
      selectPolicy: Disabled
"#,
    );
    let r = replay(&p, 10, &[(0, 100.0), (400, 100.0), (800, 100.0)]);
    assert_eq!(r, vec![10, 10, 10]);
}

#[test]
fn per_direction_tolerance() {
    let p = policy(
        r#"  behavior:
    scaleUp:
      tolerance: "0.5"
"#,
    );
    // 4 replicas at 140 rps each = ratio 1.4, within an up-tolerance of 50 %.
    let d = evaluate(
        &p,
        &obs(4, Some(560.0), Some(0.0), t(0)),
        &PolicyState::default(),
        t(0),
    );
    assert_eq!(d.replicas, 4);
}

#[test]
fn partial_data_never_scales_down() {
    let p = policy("");
    // queue missing, rps says 2: HPA refuses to scale down on partial data.
    let d = evaluate(
        &p,
        &obs(8, Some(200.0), None, t(0)),
        &PolicyState::default(),
        t(0),
    );
    assert_eq!(d.replicas, 8);
    assert!(matches!(d.rule, Rule::Fallback(_)));
    assert!(
        d.reason(&p)
            .contains("queue missing: query returned no series"),
        "{}",
        d.reason(&p)
    );
    // but scales up on the valid metrics.
    let d = evaluate(
        &p,
        &obs(8, Some(1200.0), None, t(0)),
        &PolicyState::default(),
        t(0),
    );
    assert_eq!(d.replicas, 12);
}

#[test]
fn stale_nan_and_errors_hold() {
    let p = policy("  fallback: {staleAfter: 1m}\n");
    let now = t(1000);
    let mut o = obs(6, Some(100.0), Some(0.0), now);
    o.samples[0] = Sample::Series {
        values: vec![100.0],
        timestamp: now - TimeDelta::seconds(61),
    };
    o.samples[1] = Sample::Series {
        values: vec![f64::NAN],
        timestamp: now,
    };
    let d = evaluate(&p, &o, &PolicyState::default(), now);
    assert_eq!(d.replicas, 6);
    let r = d.reason(&p);
    assert!(
        r.contains("rps stale") && r.contains("queue invalid: query returned NaN"),
        "{r}"
    );
    o.samples = vec![
        Sample::Error {
            message: "timeout".into(),
        },
        Sample::Error {
            message: "timeout".into(),
        },
    ];
    assert_eq!(evaluate(&p, &o, &PolicyState::default(), now).replicas, 6);
}

#[test]
fn fallback_replicas_goes_up_never_down() {
    let p = policy("  fallback: {onFailure: Replicas, replicas: 9}\n");
    let mut o = obs(4, None, None, t(0));
    assert_eq!(evaluate(&p, &o, &PolicyState::default(), t(0)).replicas, 9);
    o.spec_replicas = 12;
    assert_eq!(evaluate(&p, &o, &PolicyState::default(), t(0)).replicas, 12);
}

#[test]
fn outside_bounds_is_clamped_directly() {
    let p = policy("");
    assert_eq!(
        evaluate(
            &p,
            &obs(30, Some(9999.0), Some(0.0), t(0)),
            &PolicyState::default(),
            t(0)
        )
        .replicas,
        20
    );
    assert_eq!(
        evaluate(
            &p,
            &obs(1, Some(0.0), Some(0.0), t(0)),
            &PolicyState::default(),
            t(0)
        )
        .replicas,
        2
    );
    // Target manually at 0 with min != 0: autoscaling is off.
    let d = evaluate(
        &p,
        &obs(0, Some(9999.0), Some(0.0), t(0)),
        &PolicyState::default(),
        t(0),
    );
    assert_eq!((d.replicas, d.rule), (0, Rule::ScalingDisabled));
}

#[test]
fn schedule_raises_the_floor() {
    // Every day 00:00-23:59 UTC: always active for this test.
    let p =
        policy("  schedules: [{name: always, cron: '0 0 * * *', duration: 24h, minReplicas: 7}]\n");
    let d = evaluate(
        &p,
        &obs(7, Some(10.0), Some(0.0), t(0)),
        &PolicyState::default(),
        t(0),
    );
    assert_eq!(d.replicas, 7);
    assert!(
        d.reason(&p).contains("always active (bounds 7–20)"),
        "{}",
        d.reason(&p)
    );
}

#[test]
fn formula_combines_proposals() {
    let p = policy("  formula: 'rps + queue'\n");
    let d = evaluate(
        &p,
        &obs(4, Some(400.0), Some(20.0), t(0)),
        &PolicyState::default(),
        t(0),
    );
    // rps 4 + queue 2 = 6
    assert_eq!(d.replicas, 6);
    assert_eq!(d.rule, Rule::Formula);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn invariants(
        start in 0i32..30,
        values in prop::collection::vec((prop::option::weighted(0.85, 0.0f64..5000.0), prop::option::weighted(0.9, 0.0f64..300.0)), 1..60),
        step in 5i64..120,
        with_behavior in any::<bool>(),
    ) {
        let p = policy(if with_behavior { "  behavior:\n    scaleDown:\n      stabilizationWindowSeconds: 120\n      policies: [{type: Pods, value: 2, periodSeconds: 30}]\n" } else { "" });
        let mut state = PolicyState::default();
        let mut replicas = start;
        for (i, (rps, queue)) in values.iter().enumerate() {
            let now = t(i as i64 * step);
            let o = obs(replicas, *rps, *queue, now);
            let d = evaluate(&p, &o, &state, now);
            // Deterministic.
            prop_assert_eq!(&d, &evaluate(&p, &o, &state, now));
            // Within bounds once the target is inside them (or autoscaling is off at 0).
            if replicas > 0 {
                prop_assert!(d.replicas >= 2 && d.replicas <= 20, "{} out of bounds", d.replicas);
            } else {
                prop_assert_eq!(d.replicas, 0);
            }
            // No scale-down on missing data.
            if (rps.is_none() || queue.is_none()) && (2..=20).contains(&replicas) {
                prop_assert!(d.replicas >= replicas, "scaled down {} -> {} on partial data", replicas, d.replicas);
            }
            // Scale-down rate limit: at most 2 pods per 30 s.
            if with_behavior && (2..=20).contains(&replicas) {
                prop_assert!(replicas - d.replicas <= 2, "removed {} pods at once", replicas - d.replicas);
            }
            let mut d = d;
            d.record_applied(&p, now);
            replicas = d.replicas;
            state = d.state;
        }
    }

    #[test]
    fn no_change_within_tolerance(replicas in 1i32..20, ratio in 0.9f64..=1.1) {
        let p = policy("");
        let rps = 100.0 * f64::from(replicas) * ratio;
        let d = evaluate(&p, &obs(replicas.max(2), Some(rps * f64::from(replicas.max(2)) / f64::from(replicas)), Some(0.0), t(0)), &PolicyState::default(), t(0));
        prop_assert_eq!(d.replicas, replicas.max(2));
    }
}

fn prediction(upper: f64) -> Option<kscale::policy::forecast::Prediction> {
    Some(kscale::policy::forecast::Prediction {
        point: upper,
        upper,
        model: kscale::policy::forecast::ModelKind::Trend,
        horizon: TimeDelta::seconds(60),
    })
}

#[test]
fn a_forecast_raises_the_proposal_and_names_itself_in_the_reason() {
    let p = policy("  forecast: {model: Trend}");
    let mut o = obs(5, Some(500.0), Some(10.0), t(0));
    o.forecasts = vec![prediction(900.0), None];
    let d = evaluate(&p, &o, &PolicyState::default(), t(0));
    assert_eq!(d.replicas, 9);
    let reason = d.reason(&p);
    assert!(
        reason.contains("Trend forecast 900 in 60s, upper bound 900 → 9"),
        "{reason}"
    );
}

/// Issue 16: at a flat 800 the reason read `rps=799.254 → 15 (Trend forecast 604.826 in 60s,
/// upper bound 1006.576 → 15)`, a point forecast below the value and no word that the upper
/// bound decided. Where it decides, the reason leads with it; where the current value decides,
/// the forecast is shown as before, with what it alone would need.
#[test]
fn a_reason_says_when_the_upper_bound_of_a_forecast_decided() {
    let p = policy("  forecast: {model: Trend}");
    let forecast = |point: f64, upper: f64| {
        Some(kscale::policy::forecast::Prediction {
            point,
            upper,
            ..prediction(upper).expect("a prediction")
        })
    };
    let mut o = obs(6, Some(800.0), Some(10.0), t(0));
    o.forecasts = vec![forecast(604.8, 1006.6), None];
    let d = evaluate(&p, &o, &PolicyState::default(), t(0));
    assert_eq!(d.replicas, 11);
    let reason = d.reason(&p);
    assert!(
        reason.contains("(upper bound 1006.6 of the Trend forecast 604.8 in 60s → 11)"),
        "{reason}"
    );
    o.forecasts = vec![forecast(300.0, 500.0), None];
    let reason = evaluate(&p, &o, &PolicyState::default(), t(0)).reason(&p);
    assert!(
        reason.contains("(Trend forecast 300 in 60s, upper bound 500 → 5)"),
        "{reason}"
    );
}

#[test]
fn a_forecast_never_scales_below_current_demand() {
    let p = policy("  forecast: {model: Trend}");
    let mut o = obs(5, Some(800.0), Some(10.0), t(0));
    o.forecasts = vec![prediction(100.0), prediction(0.0)];
    let d = evaluate(&p, &o, &PolicyState::default(), t(0));
    assert_eq!(d.replicas, 8);
}

#[test]
fn forecasts_are_ignored_without_spec_forecast() {
    let p = policy("");
    let mut o = obs(5, Some(500.0), Some(10.0), t(0));
    let plain = evaluate(&p, &o, &PolicyState::default(), t(0));
    o.forecasts = vec![prediction(900.0), prediction(900.0)];
    let with = evaluate(&p, &o, &PolicyState::default(), t(0));
    assert_eq!(plain, with);
}

#[test]
fn a_forecast_does_not_stand_in_for_a_missing_metric() {
    let p = policy("  forecast: {model: Trend}");
    let mut o = obs(5, None, Some(10.0), t(0));
    o.forecasts = vec![prediction(100.0), None];
    let d = evaluate(&p, &o, &PolicyState::default(), t(0));
    assert!(matches!(d.rule, Rule::Fallback(_)));
    assert_eq!(d.replicas, 5);
}

#[test]
fn forecast_settings_are_validated_with_their_field_paths() {
    let yaml = r#"
apiVersion: kscale.dev/v1alpha1
kind: ScalingPolicy
metadata: {name: p, namespace: default}
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
  maxReplicas: 20
  metrics:
  - name: rps
    prometheus: {query: 'sum(rate(x[1m]))'}
    target: {type: AverageValue, averageValue: "100"}
  forecast: {model: Trend, seasonality: Weekly, horizon: 48h, step: 5s, confidence: 30, minHeadroom: -1}
"#;
    let p: ScalingPolicy = serde_yaml::from_str(yaml).unwrap();
    let errors = CompiledPolicy::from_resource(&p).unwrap_err().to_string();
    for field in [
        "spec.forecast.seasonality",
        "spec.forecast.horizon",
        "spec.forecast.step",
        "spec.forecast.confidence",
        "spec.forecast.minHeadroom",
    ] {
        assert!(errors.contains(field), "{field} missing from {errors}");
    }
    let short = yaml.replace(
        "{model: Trend, seasonality: Weekly, horizon: 48h, step: 5s, confidence: 30, minHeadroom: -1}",
        "{seasonality: Weekly, history: 7d}",
    );
    let p: ScalingPolicy = serde_yaml::from_str(&short).unwrap();
    let errors = CompiledPolicy::from_resource(&p).unwrap_err().to_string();
    assert!(
        errors.contains("spec.forecast.history: must hold two seasons"),
        "{errors}"
    );
}

/// An answer with warnings (Prometheus `warnings`, Thanos partial responses) is partial data:
/// its low sum never scales down, a high one may scale up, the reason says partial; the same
/// numbers from a complete answer scale down.
#[test]
fn answers_with_warnings_hold_or_go_up_never_down() {
    let p = policy("  behavior: {scaleDown: {stabilizationWindowSeconds: 0}}");
    let now = t(0);
    let partial = |v: f64| Sample::Partial {
        values: vec![v],
        timestamp: now - TimeDelta::seconds(1),
        warnings: 2,
    };
    // Complete: rps 200 → 2, queue 20 → 2: down from 8 to 2.
    let o = obs(8, Some(200.0), Some(20.0), now);
    let d = evaluate(&p, &o, &PolicyState::default(), now);
    assert_eq!(d.replicas, 2, "{}", d.reason(&p));

    // The same rps from a partial answer: hold.
    let mut o = obs(8, Some(200.0), Some(20.0), now);
    o.samples[0] = partial(200.0);
    let d = evaluate(&p, &o, &PolicyState::default(), now);
    let reason = d.reason(&p);
    assert_eq!(d.replicas, 8, "{reason}");
    assert_eq!(d.metrics[0].state, kscale::policy::MetricState::Partial);
    assert!(reason.starts_with("hold 8→8"), "{reason}");
    assert!(
        reason.contains("partial data: the server answered with 2 warnings"),
        "{reason}"
    );

    // A partial answer that asks for more still scales up: 1200 / 100 → 12.
    o.samples[0] = partial(1200.0);
    let d = evaluate(&p, &o, &PolicyState::default(), now);
    assert_eq!(d.replicas, 12, "{}", d.reason(&p));
    assert!(d.reason(&p).contains("partial data"), "{}", d.reason(&p));

    // With a formula, a partial metric's value is used to go up, never down.
    let f = policy(
        "  formula: 'max(rps, queue)'\n  behavior: {scaleDown: {stabilizationWindowSeconds: 0}}",
    );
    o.samples[0] = partial(200.0);
    let d = evaluate(&f, &o, &PolicyState::default(), now);
    assert_eq!(d.replicas, 8, "{}", d.reason(&f));
    o.samples[0] = partial(1200.0);
    let d = evaluate(&f, &o, &PolicyState::default(), now);
    assert_eq!(d.replicas, 12, "{}", d.reason(&f));
}

proptest! {
    /// Whatever a partial answer says, the count never goes down.
    #[test]
    fn a_partial_answer_never_lowers_the_count(
        current in 2i32..20,
        rps in 0.0f64..5000.0,
        queue in 0.0f64..500.0,
        warnings in 1usize..5,
    ) {
        let p = policy("  behavior: {scaleDown: {stabilizationWindowSeconds: 0}}");
        let now = t(0);
        let mut o = obs(current, Some(rps), Some(queue), now);
        o.samples[0] = Sample::Partial {
            values: vec![rps],
            timestamp: now - TimeDelta::seconds(1),
            warnings,
        };
        let d = evaluate(&p, &o, &PolicyState::default(), now);
        prop_assert!(d.replicas >= current, "{}", d.reason(&p));
    }
}
