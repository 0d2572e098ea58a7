//! Decision defects found by replaying public bug reports (issue 15, item 4): each input from
//! the issue, turned into a test with the right value, through the same `compile_spec` the CLI's
//! `validate` runs and the same `policy::evaluate` the controller and the backtest call.

use chrono::{DateTime, TimeDelta, Utc};
use kscale::crd::ScalingPolicy;
use kscale::model::{Observation, Sample};
use kscale::policy::{CompiledPolicy, PolicyState, Rule, evaluate};

fn t(s: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
}

/// Compiles a policy on one Deployment from its `spec` body (YAML, indented two spaces).
fn compile(spec: &str) -> Result<CompiledPolicy, String> {
    let yaml = format!(
        "apiVersion: kscale.dev/v1alpha1\nkind: ScalingPolicy\nmetadata: {{name: p, namespace: default}}\nspec:\n  targetRef: {{apiVersion: apps/v1, kind: Deployment, name: web}}\n{spec}"
    );
    let p: ScalingPolicy = serde_yaml::from_str(&yaml).map_err(|e| e.to_string())?;
    CompiledPolicy::from_resource(&p).map_err(|e| e.to_string())
}

fn policy(spec: &str) -> CompiledPolicy {
    compile(spec).unwrap_or_else(|e| panic!("{e}\n{spec}"))
}

/// One observation: `replicas` running and ready, one sample per metric (each a list of series).
fn obs(replicas: i32, series: &[&[f64]], now: DateTime<Utc>) -> Observation {
    Observation::steady(
        replicas,
        series
            .iter()
            .map(|values| Sample::Series {
                values: values.to_vec(),
                timestamp: now - TimeDelta::seconds(1),
            })
            .collect(),
    )
}

fn decide(p: &CompiledPolicy, o: &Observation, now: DateTime<Utc>) -> kscale::policy::Decision {
    evaluate(p, o, &PolicyState::default(), now)
}

// ---------------------------------------------------------------------------------------------
// Valid CEL rejected.

/// A policy with one metric `rps` (AverageValue 70, so its proposal at 300 is 5) and `formula`.
fn formula_policy(formula: &str) -> Result<CompiledPolicy, String> {
    compile(&format!(
        "  minReplicas: 1\n  maxReplicas: 100\n  formula: '{}'\n  metrics:\n  - name: rps\n    prometheus: {{query: 'sum(rate(x[1m]))'}}\n    target: {{type: AverageValue, averageValue: \"70\"}}\n",
        formula.replace('\'', "''")
    ))
}

#[test]
fn the_reported_formula_validates_and_gives_5_at_rps_300() {
    let p = formula_policy("math.ceil(values.rps / 70.0)").unwrap();
    let d = decide(&p, &obs(1, &[&[300.0]], t(0)), t(0));
    assert_eq!(d.rule, Rule::Formula);
    assert_eq!(d.proposal, Some(5), "{}", d.reason(&p));
}

/// Every function and extension the README promises a formula (`max`/`min`, CEL's math
/// extension, the standard library's operators, conversions, strings and macros) validates
/// through `compile_spec` and evaluates to the value worked out by hand, at rps 300 with one
/// replica running and ready (the metric `rps` proposes `ceil(300 / 70)` = 5).
#[test]
fn every_promised_cel_function_validates_and_evaluates() {
    let cases: &[(&str, i32)] = &[
        ("math.ceil(values.rps / 70.0)", 5),
        ("max(rps, 7)", 7),
        ("min(rps, 3)", 3),
        ("max([rps, 2, current])", 5),
        ("math.greatest(rps, 9, ready)", 9),
        ("math.least(rps, 4)", 4),
        ("math.greatest([1, 6, rps])", 6),
        ("math.least([8, rps])", 5),
        ("math.floor(values.rps / 70.0)", 4),
        ("math.round(values.rps / 80.0)", 4), // 3.75
        ("math.trunc(values.rps / 70.0)", 4),
        ("math.abs(1 - rps)", 4),
        ("math.abs(-2.5)", 3),
        ("math.sign(values.rps) * 2.0", 2),
        ("math.sign(-rps) + 2", 1),
        ("math.sqrt(values.rps + 24.0)", 18),
        ("math.sqrt(16)", 4),
        ("math.isNaN(values.rps) ? 1 : 2", 2),
        ("math.isInf(values.rps) ? 1 : 3", 3),
        ("math.isFinite(values.rps) ? 4 : 1", 4),
        ("math.bitAnd(rps, 3)", 1),
        ("math.bitOr(rps, 2)", 7),
        ("math.bitXor(rps, 1)", 4),
        ("math.bitNot(rps) + 10", 4),
        ("math.bitShiftLeft(rps, 1)", 10),
        ("math.bitShiftRight(rps, 1)", 2),
        ("rps + 2 * 3 - current / 1 + ready % 3", 11),
        ("rps > 4 ? rps : 1", 5),
        ("values.rps / 100.0", 3),
        ("int(values.rps) / 60", 5),
        ("int(double(rps)) + int(uint(rps))", 10),
        ("double(rps) * 1.5", 8),
        ("size(values) + size('abc') + size([1, 2])", 6),
        ("'rps' in values ? rps : 1", 5),
        ("has(values.rps) ? rps : 1", 5),
        ("values['rps'] / 60.0", 5),
        ("string(rps) == '5' ? 2 : 1", 2),
        (
            "'abc'.contains('b') && 'abc'.startsWith('a') && 'abc'.endsWith('c') ? 3 : 1",
            3,
        ),
        ("values.exists(m, values[m] > 100.0) ? max(rps, 6) : 1", 6),
        ("values.all(m, values[m] >= 0.0) ? 2 : 1", 2),
        ("values.exists_one(m, m == 'rps') ? 3 : 1", 3),
        ("[rps, 1, 2].map(x, x * 2).filter(x, x > 2).size()", 2),
        ("[rps, 1].map(x, x > 1, x + 1)[0]", 6),
        ("{'a': rps}['a']", 5),
        ("type(rps) == int ? 2 : 1", 2),
        // Valid formulas that fail or give no number only at the inputs `validate` tries (every
        // proposal and value 1): refusing them would be refusing valid CEL.
        ("[rps, 1].map(x, x > 1, x + 1)[0]", 6),
        ("60 / (rps - 1) + 1", 16),
        ("rps % (rps - 1)", 1),
        ("values.rps / (values.rps - 1.0) + 1.0", 3),
    ];
    let mut failures = Vec::new();
    for (formula, want) in cases {
        match formula_policy(formula) {
            Err(e) => failures.push(format!("{formula}: refused: {e}")),
            Ok(p) => {
                let d = decide(&p, &obs(1, &[&[300.0]], t(0)), t(0));
                if d.rule != Rule::Formula || d.proposal != Some(*want) {
                    failures.push(format!(
                        "{formula}: want {want}, got {:?} ({})",
                        d.proposal,
                        d.reason(&p)
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// What stays refused: a name CEL does not know, a result that is not a number at all.
#[test]
fn formulas_that_are_not_valid_stay_refused() {
    for (formula, why) in [
        ("math.ceiling(values.rps)", "Undeclared reference"),
        ("'abc'.matches('a')", "Undeclared reference"),
        ("'x'", "must evaluate to a number"),
        ("math.ceil(rps)", "math.ceil"),
    ] {
        let e = formula_policy(formula).unwrap_err();
        assert!(
            e.contains("spec.formula") && e.contains(why),
            "{formula}: {e}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Schedules explained and validated wrongly.

/// Two metrics-free bounds around `schedules` (YAML flow list), one metric `q` at 10/replica.
fn schedule_policy(min: i32, schedules: &str) -> Result<CompiledPolicy, String> {
    compile(&format!(
        "  minReplicas: {min}\n  maxReplicas: 20\n  schedules: {schedules}\n  metrics:\n  - name: q\n    prometheus: {{query: 'sum(q)'}}\n    target: {{type: AverageValue, averageValue: \"10\"}}\n"
    ))
}

#[test]
fn overlapping_floors_name_the_one_that_applies() {
    // Both open all day: office raises the floor to 5, lunch to 7; lunch's 7 applies.
    let p = schedule_policy(
        2,
        "[{name: office, cron: '0 0 * * *', duration: 24h, minReplicas: 5}, {name: lunch, cron: '0 0 * * *', duration: 24h, minReplicas: 7}]",
    )
    .unwrap();
    let d = decide(&p, &obs(7, &[&[10.0]], t(0)), t(0));
    assert_eq!((d.replicas, d.min_replicas), (7, 7));
    let reason = d.reason(&p);
    assert!(reason.contains("lunch active (bounds 7–20)"), "{reason}");
    assert!(!reason.contains("office"), "{reason}");

    // Listed the other way round, the answer is the same.
    let p = schedule_policy(
        2,
        "[{name: lunch, cron: '0 0 * * *', duration: 24h, minReplicas: 7}, {name: office, cron: '0 0 * * *', duration: 24h, minReplicas: 5}]",
    )
    .unwrap();
    let reason = decide(&p, &obs(7, &[&[10.0]], t(0)), t(0)).reason(&p);
    assert!(reason.contains("lunch active (bounds 7–20)"), "{reason}");
}

#[test]
fn a_floor_that_overrides_a_ceiling_says_so() {
    // office: floor 5; night: ceiling 3; both open. The floor wins: bounds 5–5.
    let p = schedule_policy(
        1,
        "[{name: night, cron: '0 0 * * *', duration: 24h, maxReplicas: 3}, {name: office, cron: '0 0 * * *', duration: 24h, minReplicas: 5}]",
    )
    .unwrap();
    let d = decide(&p, &obs(5, &[&[100.0]], t(0)), t(0));
    assert_eq!((d.min_replicas, d.max_replicas, d.replicas), (5, 5, 5));
    let reason = d.reason(&p);
    assert!(
        reason.contains("office active (bounds 5–5): the floor 5 overrides night's ceiling 3"),
        "{reason}"
    );

    // A floor and a ceiling from two schedules that agree: both are named.
    let p = schedule_policy(
        1,
        "[{name: night, cron: '0 0 * * *', duration: 24h, maxReplicas: 9}, {name: office, cron: '0 0 * * *', duration: 24h, minReplicas: 5}]",
    )
    .unwrap();
    let reason = decide(&p, &obs(5, &[&[50.0]], t(0)), t(0)).reason(&p);
    assert!(
        reason.contains("office active (bounds 5–9, ceiling 9 from night)"),
        "{reason}"
    );
}

#[test]
fn a_schedule_ceiling_under_spec_min_replicas_is_refused() {
    let e = schedule_policy(
        2,
        "[{name: quiet, cron: '0 0 * * *', duration: 24h, maxReplicas: 1}]",
    )
    .unwrap_err();
    assert!(
        e.contains("spec.schedules[0].maxReplicas") && e.contains("below spec.minReplicas (2)"),
        "{e}"
    );
    // The mirror case, as before.
    let e = schedule_policy(
        2,
        "[{name: busy, cron: '0 0 * * *', duration: 24h, minReplicas: 21}]",
    )
    .unwrap_err();
    assert!(
        e.contains("spec.schedules[0].minReplicas") && e.contains("above spec.maxReplicas"),
        "{e}"
    );
    // At spec.minReplicas exactly, the ceiling is fine.
    schedule_policy(
        2,
        "[{name: quiet, cron: '0 0 * * *', duration: 24h, maxReplicas: 2}]",
    )
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Large quantities saturate.

/// One Prometheus metric `q` with `target` (a flow mapping), bounds 1–`max`.
fn target_policy(target: &str, max: i32) -> CompiledPolicy {
    policy(&format!(
        "  minReplicas: 1\n  maxReplicas: {max}\n  metrics:\n  - name: q\n    prometheus: {{query: 'sum(q)'}}\n    target: {target}\n"
    ))
}

#[test]
fn a_peta_target_at_exactly_its_value_holds() {
    // 3e16 over 30 replicas is 1e15 per replica: the ratio is exactly 1.
    let p = target_policy("{type: AverageValue, averageValue: \"1P\"}", 100);
    let d = decide(&p, &obs(30, &[&[3e16]], t(0)), t(0));
    assert_eq!(d.replicas, 30, "{}", d.reason(&p));
    let reason = d.reason(&p);
    assert!(
        reason.contains("q=30000000000000000 (target 1000000000000000/replica) → 30"),
        "{reason}"
    );
}

#[test]
fn an_exa_target_is_shown_exactly_and_scales() {
    let p = target_policy("{type: AverageValue, averageValue: \"1E\"}", 100);
    // 3e19 over 10 replicas at 1e18 each: ratio 3, 30 wanted, the legacy step allows 20.
    let d = decide(&p, &obs(10, &[&[3e19]], t(0)), t(0));
    let reason = d.reason(&p);
    assert!(
        reason.contains("(target 1000000000000000000/replica) → 30"),
        "{reason}"
    );
    assert_eq!(d.replicas, 20, "{reason}");
    // At exactly 1e18 per replica it holds.
    let d = decide(&p, &obs(10, &[&[1e19]], t(0)), t(0));
    assert_eq!(d.replicas, 10, "{}", d.reason(&p));
    // A Value target of 8Ei: exact as well (ratio 2 on 4 ready replicas).
    let p = target_policy("{type: Value, value: \"8Ei\"}", 100);
    let d = decide(&p, &obs(4, &[&[2.0 * 8.0 * 2f64.powi(60)]], t(0)), t(0));
    assert_eq!(d.proposal, Some(8), "{}", d.reason(&p));
    assert!(
        d.reason(&p).contains("(target 9223372036854775808)"),
        "{}",
        d.reason(&p)
    );
}

#[test]
fn sums_past_int64_milli_units_stay_exact() {
    // Three series of 4e15 (1.2e19 milli-units in all, past i64): 12e15 over 1P per replica.
    let p = target_policy("{type: AverageValue, averageValue: \"1P\"}", 100);
    let d = decide(&p, &obs(12, &[&[4e15, 4e15, 4e15]], t(0)), t(0));
    assert_eq!(d.replicas, 12, "{}", d.reason(&p));
}

#[test]
fn values_and_quantities_past_the_exact_range_are_errors_not_saturated() {
    // A value past 10^29 holds the count, naming why.
    let p = target_policy("{type: AverageValue, averageValue: \"1P\"}", 100);
    let d = decide(&p, &obs(5, &[&[1e30]], t(0)), t(0));
    assert_eq!(d.replicas, 5);
    assert!(matches!(d.rule, Rule::Fallback(_)));
    let reason = d.reason(&p);
    assert!(
        reason.contains("q invalid") && reason.contains("10^29"),
        "{reason}"
    );
    // A target past it is refused at validation, naming the field.
    let e = compile(
        "  maxReplicas: 5\n  metrics:\n  - name: q\n    prometheus: {query: 'sum(q)'}\n    target: {type: Value, value: \"1e30\"}\n",
    )
    .unwrap_err();
    assert!(
        e.contains("spec.metrics[0].target.value") && e.contains("10^29"),
        "{e}"
    );
    // A resource AverageValue target past the pods' i64 milli-values is refused too.
    let e = compile(
        "  maxReplicas: 5\n  metrics:\n  - name: mem\n    resource: {name: memory}\n    target: {type: AverageValue, averageValue: \"9E\"}\n",
    )
    .unwrap_err();
    assert!(
        e.contains("spec.metrics[0].target.averageValue") && e.contains("per-pod"),
        "{e}"
    );
}

mod quantity_range {
    use super::*;
    use kscale::units::{Quantity, format_milli, format_quantity};
    use proptest::prelude::*;

    const SUFFIXES: [(&str, f64); 14] = [
        ("", 1.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("e18", 1e18),
    ];

    /// Kubernetes' largest documented quantity, 2^63-1, in milli-units.
    const MAX_MILLI: i128 = (i64::MAX as i128) * 1000;

    proptest! {
        /// Every quantity up to 2^63-1 in magnitude, written in milli-units, in units with a
        /// decimal point, or in exponent form, parses back to exactly its milli-units, and
        /// `format_milli` writes it back to the same number.
        #[test]
        fn every_quantity_parses_exactly(milli in -MAX_MILLI..=MAX_MILLI) {
            let units = format!(
                "{}{}.{:03}",
                if milli < 0 { "-" } else { "" },
                (milli / 1000).abs(),
                (milli % 1000).abs()
            );
            for text in [format!("{milli}m"), units, format!("{milli}e-3"), format_milli(milli)] {
                let q = Quantity::parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(q.milli(), milli, "{}", text);
            }
        }

        /// With a target of `a<suffix>` per replica and a value of exactly `a<suffix>` times
        /// the replicas (a float that holds it exactly), the ratio is 1 and the count holds;
        /// at twice that value it doubles. Over every suffix up to `E`, `Ei` and `e18`.
        #[test]
        fn the_ratio_is_exact_over_the_whole_range(
            // a·r·2·5^18 < 2^53: every value below is a float that holds it exactly.
            a in 1u32..20,
            r in 1i32..30,
            suffix in 0usize..SUFFIXES.len(),
        ) {
            let (name, multiplier) = SUFFIXES[suffix];
            let p = target_policy(
                &format!("{{type: AverageValue, averageValue: \"{a}{name}\"}}"),
                1000,
            );
            let value = f64::from(a) * multiplier * f64::from(r);
            let d = decide(&p, &obs(r, &[&[value]], t(0)), t(0));
            prop_assert_eq!(d.replicas, r, "{}", d.reason(&p));
            let d = decide(&p, &obs(r, &[&[2.0 * value]], t(0)), t(0));
            prop_assert_eq!(d.proposal, Some(2 * r), "{}", d.reason(&p));
            // Status and the adapter show the value exactly.
            prop_assert_eq!(
                Quantity::parse(&format_quantity(value)).map(|q| q.as_f64()),
                Ok(value)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Failures that leave no trace (the event itself: tests/defects_e2e.rs).

#[test]
fn the_reason_shows_how_many_series_went_into_a_sum() {
    let p = target_policy("{type: AverageValue, averageValue: \"100\"}", 10);
    let reason = decide(&p, &obs(3, &[&[100.0, 150.0, 50.0]], t(0)), t(0)).reason(&p);
    assert!(
        reason.contains("q=300 (sum of 3 series, target 100/replica) → 3"),
        "{reason}"
    );
    // One series: nothing to say.
    let reason = decide(&p, &obs(3, &[&[300.0]], t(0)), t(0)).reason(&p);
    assert!(
        reason.contains("q=300 (target 100/replica) → 3"),
        "{reason}"
    );
}
