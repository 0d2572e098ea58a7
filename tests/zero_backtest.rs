//! Scale to zero and back, replayed by `kscale backtest --format json` with timelines worked out
//! by hand: wake on activation, no wake at or below the threshold, the cooldown then a stepwise
//! descent under `behavior.scaleDown`, an idle count that does not flap, failing data that
//! neither wakes nor zeroes, and the issue's schedule input (a schedule's floor used to switch
//! off scale-from-zero).
//!
//! Every trace has one row a minute and every policy a 60s interval, so step `i` is minute `i`.

use std::path::Path;
use std::process::Command;

/// One row a minute from 2026-01-05 00:00 UTC; `None` is an empty cell.
fn trace(dir: &Path, values: &[Option<f64>]) -> String {
    let mut csv = String::from("timestamp,q\n");
    for (i, v) in values.iter().enumerate() {
        let cell = v.map(|v| v.to_string()).unwrap_or_default();
        csv.push_str(&format!(
            "2026-01-05 {:02}:{:02}:00,{cell}\n",
            i / 60,
            i % 60
        ));
    }
    let p = dir.join("trace.csv");
    std::fs::write(&p, csv).unwrap();
    p.to_str().unwrap().to_string()
}

/// A policy of one Prometheus metric `q` (target 10 per replica) with `extra` spec lines;
/// a line `  threshold: X` in `extra` becomes the metric's `activationThreshold`.
fn policy(dir: &Path, extra: &str) -> String {
    let (threshold, extra): (Vec<&str>, Vec<&str>) =
        extra.lines().partition(|l| l.starts_with("  threshold: "));
    let threshold = threshold
        .first()
        .map(|l| {
            format!(
                "    activationThreshold: \"{}\"\n",
                &l["  threshold: ".len()..]
            )
        })
        .unwrap_or_default();
    let body = format!(
        "apiVersion: kscale.dev/v1alpha1\nkind: ScalingPolicy\nmetadata: {{name: zero, namespace: t}}\nspec:\n  targetRef: {{apiVersion: apps/v1, kind: Deployment, name: w}}\n  interval: 60s\n  metrics:\n  - name: q\n    prometheus: {{query: 'sum(q)'}}\n    target: {{type: AverageValue, averageValue: \"10\"}}\n{threshold}{}\n",
        extra.join("\n")
    );
    let p = dir.join("policy.yaml");
    std::fs::write(&p, body).unwrap();
    p.to_str().unwrap().to_string()
}

/// Replays and returns each step's replica count and reason.
fn replay(extra: &str, values: &[Option<f64>], flags: &[&str]) -> (Vec<i64>, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let p = policy(dir.path(), extra);
    let t = trace(dir.path(), values);
    let mut args = vec!["backtest", "-p", &p, "-t", &t, "--format", "json"];
    args.extend_from_slice(flags);
    let o = Command::new(env!("CARGO_BIN_EXE_kscale"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let steps = v["steps"].as_array().unwrap();
    (
        steps
            .iter()
            .map(|s| s["replicas"].as_i64().unwrap())
            .collect(),
        steps
            .iter()
            .map(|s| s["reason"].as_str().unwrap_or_default().to_string())
            .collect(),
    )
}

fn all(v: f64, n: usize) -> Vec<Option<f64>> {
    vec![Some(v); n]
}

/// Zero to ten replicas, activation above 50, a 5m cooldown, one replica removed a minute.
const ZERO_TO_TEN: &str = "  minReplicas: 0\n  maxReplicas: 10\n  cooldown: 5m\n  behavior:\n    scaleDown:\n      stabilizationWindowSeconds: 0\n      policies: [{type: Pods, value: 1, periodSeconds: 60}]\n";

/// [`ZERO_TO_TEN`] with `activationThreshold: threshold`.
fn zero_policy(threshold: &str) -> String {
    format!("{ZERO_TO_TEN}  threshold: {threshold}\n")
}

#[test]
fn the_issue_schedule_input_scales_up_to_3() {
    // minReplicas 0, maxReplicas 3, q AverageValue 10, a schedule floor of 1 all day, q = 50,
    // from 0: ceil(50 / 10) = 5, clipped to maxReplicas 3 (legacy normalization allows 4 from 0).
    let spec = "  minReplicas: 0\n  maxReplicas: 3\n  schedules:\n  - {cron: \"0 0 * * *\", duration: 24h, minReplicas: 1}\n";
    let (replicas, reasons) = replay(spec, &all(50.0, 3), &["--initial-replicas", "0"]);
    assert_eq!(replicas, vec![3, 3, 3], "{reasons:#?}");
    assert!(reasons[0].starts_with("scale up 0→3"), "{}", reasons[0]);
    // The schedule alone wakes a target kscale sent to 0, with no metric active.
    let (replicas, reasons) = replay(spec, &all(0.0, 2), &["--initial-replicas", "0"]);
    assert_eq!(replicas, vec![1, 1], "{reasons:#?}");
}

#[test]
fn wakes_on_activation_and_not_at_or_below_the_threshold() {
    // 30, 40, 50: at or below 50, not active, the target stays at 0. 100: active, ceil(100/10)
    // = 10, the default scale-up from 0 allows 4 (Pods 4 per 15s).
    let mut values = all(30.0, 1);
    values.extend([Some(40.0), Some(50.0), Some(100.0)]);
    let (replicas, reasons) = replay(&zero_policy("50"), &values, &["--initial-replicas", "0"]);
    assert_eq!(replicas, vec![0, 0, 0, 4], "{reasons:#?}");
    assert!(reasons[2].contains("hold 0→0"), "{}", reasons[2]);
    assert!(
        reasons[3].contains("active: q=100 is above its activationThreshold 50"),
        "{}",
        reasons[3]
    );
}

#[test]
fn cooldown_then_one_step_a_minute_down_to_zero_and_awake_again() {
    // t0: 100 wakes 0→4. t1-t4: 40 is inactive (≤ 50); the metric proposes 4 (ratio 1), the
    // cooldown runs from t0. t5: 5m since t0, idle: one replica a minute, 4→3→2→1→0 (t5-t8).
    // t9: held at 0. t10: 100 wakes again, 0→4.
    let mut values = all(100.0, 1);
    values.extend(all(40.0, 9));
    values.push(Some(100.0));
    let (replicas, reasons) = replay(&zero_policy("50"), &values, &["--initial-replicas", "0"]);
    assert_eq!(
        replicas,
        vec![4, 4, 4, 4, 4, 3, 2, 1, 0, 0, 4],
        "{reasons:#?}"
    );
    assert!(
        reasons[4].contains("cooldown 60s of 300s left"),
        "{}",
        reasons[4]
    );
    assert!(
        reasons[5].contains("for the 300s cooldown: idle count 0"),
        "{}",
        reasons[5]
    );
}

#[test]
fn an_idle_count_does_not_flap() {
    // minReplicas 3, idleReplicas 1, cooldown 2m from the first evaluation (a new policy counts
    // as active once). q = 20 is inactive (≤ 50): t0-t1 hold 3 (the floor), t2-t3 one step a
    // minute to 1, then 1 stays (no bounce back to minReplicas 3). t8: 60 is active: the floor
    // is 3 again and ceil(60/10) = 6, of which the scale-up policies allow 1 + 4 = 5; t9: 6.
    let spec = ZERO_TO_TEN
        .replace("minReplicas: 0", "minReplicas: 3\n  idleReplicas: 1")
        .replace("cooldown: 5m", "cooldown: 2m");
    let spec = format!("{spec}  threshold: 50\n");
    let mut values = all(20.0, 8);
    values.extend(all(60.0, 2));
    let (replicas, reasons) = replay(&spec, &values, &[]);
    assert_eq!(replicas, vec![3, 3, 2, 1, 1, 1, 1, 1, 5, 6], "{reasons:#?}");
}

#[test]
fn failing_data_neither_wakes_nor_zeroes() {
    // A 30s staleness bound: an empty row leaves the last value stale.
    // At 0, t0-t1 stale: held at 0, even with fallback.replicas 2. t2: 100 wakes 0→4.
    // t3-t9 stale: held at 4 well past the 5m cooldown (unknown data restarts it each minute).
    // t10-: 40 is inactive (ratio 1, hold); the cooldown runs from t9: t10-t13 hold, t14-t17
    // step to 0.
    let spec =
        zero_policy("50") + "  fallback: {staleAfter: 30s, onFailure: Replicas, replicas: 2}\n";
    let mut values = vec![None, None, Some(100.0)];
    values.extend(vec![None; 7]);
    values.extend(all(40.0, 8));
    let (replicas, reasons) = replay(&spec, &values, &["--initial-replicas", "0"]);
    assert_eq!(
        replicas,
        vec![0, 0, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 3, 2, 1, 0],
        "{reasons:#?}"
    );
    assert!(
        reasons[0].contains("could not be read and none is active"),
        "{}",
        reasons[0]
    );
}
