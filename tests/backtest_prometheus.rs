//! `kscale backtest --prometheus` against the real test Prometheus, backfilled with a known
//! history (`promtool tsdb create-blocks-from openmetrics` into its data folder): the replica
//! timeline is the trace backtest's on the same data, forecast included.

mod support;

use std::fmt::Write as _;
use std::process::Command;
use std::time::{Duration, Instant};

fn kscale(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_kscale"))
        .args(args)
        .output()
        .expect("run kscale");
    assert!(
        out.status.success(),
        "kscale {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

fn timeline(doc: &serde_json::Value) -> Vec<(String, i64, i64)> {
    doc["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            (
                s["time"].as_str().unwrap_or_default().to_string(),
                s["replicas"].as_i64().unwrap_or(-1),
                s["ready_replicas"].as_i64().unwrap_or(-1),
            )
        })
        .collect()
}

#[test]
fn prometheus_backtest_replays_the_trace_backtest() {
    let Some(env) = support::testenv() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    // A unique metric, so reruns against the same Prometheus do not see each other's data.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let metric = format!("kscale_backfill_{nanos}");
    // Six hours of one-minute samples, ending three hours ago (inside the 1d retention and
    // clear of the head block): a daily-like wave plus a ramp and a step.
    let now = chrono::Utc::now().timestamp();
    let start = (now - 9 * 3600) / 60 * 60;
    let n = 360;
    let value = |k: i64| {
        let wave = 400.0 + 300.0 * (k as f64 * std::f64::consts::TAU / 120.0).sin();
        let ramp = if k > 200 { 3.0 * (k - 200) as f64 } else { 0.0 };
        let step = if (280..300).contains(&k) { 500.0 } else { 0.0 };
        (wave + ramp + step).round()
    };
    let mut csv = String::from("timestamp,value\n");
    let mut om = format!("# TYPE {metric} gauge\n");
    for k in 0..n {
        let t = start + 60 * k;
        let time = chrono::DateTime::from_timestamp(t, 0).expect("time");
        let _ = writeln!(csv, "{},{}", time.format("%Y-%m-%d %H:%M:%S"), value(k));
        let _ = writeln!(om, "{metric} {} {t}", value(k));
    }
    om.push_str("# EOF\n");
    let trace = dir.path().join("trace.csv");
    let openmetrics = dir.path().join("history.om");
    std::fs::write(&trace, csv).expect("write trace");
    std::fs::write(&openmetrics, om).expect("write openmetrics");
    let status = Command::new("promtool")
        .args(["tsdb", "create-blocks-from", "openmetrics"])
        .arg(&openmetrics)
        .arg(env.dir.join("prometheus/data"))
        .output()
        .expect("run promtool (Debian package prometheus)");
    assert!(
        status.status.success(),
        "promtool: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    // Prometheus picks new blocks up at its next block reload (about once a minute).
    let query = format!("count_over_time({metric}[12h])");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let count = support::prometheus_scalar(env, &query).expect("query Prometheus");
        if count == Some(n as f64) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never loaded the backfilled blocks ({count:?} samples)"
        );
        std::thread::sleep(Duration::from_secs(2));
    }

    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            r#"apiVersion: kscale.dev/v1alpha1
kind: ScalingPolicy
metadata: {{name: web, namespace: default}}
spec:
  targetRef: {{apiVersion: apps/v1, kind: Deployment, name: web}}
  minReplicas: 1
  maxReplicas: 40
  metrics:
  - name: demand
    prometheus: {{query: '{metric}'}}
    target: {{type: AverageValue, averageValue: "100"}}
  forecast: {{model: Trend, history: 2h, refitEvery: 30m}}
"#
        ),
    )
    .expect("write policy");
    let common = ["--capacity", "100", "--startup", "60s", "--format", "json"];
    let policy = policy.to_str().expect("utf-8 path");
    let mut args = vec!["backtest", "--policy", policy, "--trace"];
    args.push(trace.to_str().expect("utf-8 path"));
    args.extend(common);
    let from_trace = kscale(&args);
    let (from, to) = (start.to_string(), (start + 60 * (n - 1)).to_string());
    let mut args = vec![
        "backtest",
        "--policy",
        policy,
        "--prometheus",
        &env.prometheus_url,
        "--from",
        &from,
        "--to",
        &to,
    ];
    args.extend(common);
    let from_prometheus = kscale(&args);
    // Every second: 21,541 steps, read in three range queries of at most 10,000.
    args.extend(["--step", "1s"]);
    let fine = kscale(&args);

    let a = timeline(&from_trace);
    let b = timeline(&from_prometheus);
    assert_eq!(
        a.len(),
        4 * (n as usize - 1) + 1,
        "15s steps over the trace"
    );
    assert_eq!(a, b, "the replica timelines differ");
    assert_eq!(
        a,
        timeline(&fine),
        "chunked 1s history gives another timeline"
    );
    assert!(
        a.iter().map(|s| s.1).max() > a.iter().map(|s| s.1).min(),
        "the history should make the policy scale"
    );
    let reasons = from_prometheus["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter(|s| {
            s["reason"]
                .as_str()
                .is_some_and(|r| r.contains("Trend forecast"))
        })
        .count();
    assert!(reasons > 0, "the forecast never showed in a reason");

    // --compare with a policy of its own query and metric name: its history is read too, and
    // its timeline is that policy's trace backtest on the same data.
    let other = dir.path().join("other.yaml");
    std::fs::write(
        &other,
        format!(
            r#"apiVersion: kscale.dev/v1alpha1
kind: ScalingPolicy
metadata: {{name: halved, namespace: default}}
spec:
  targetRef: {{apiVersion: apps/v1, kind: Deployment, name: web}}
  minReplicas: 1
  maxReplicas: 40
  metrics:
  - name: load
    prometheus: {{query: '{metric} / 2'}}
    target: {{type: AverageValue, averageValue: "50"}}
"#
        ),
    )
    .expect("write compare policy");
    let other = other.to_str().expect("utf-8 path");
    let mut args = vec![
        "backtest",
        "--policy",
        policy,
        "--compare",
        other,
        "--prometheus",
        &env.prometheus_url,
        "--from",
        &from,
        "--to",
        &to,
    ];
    args.extend(common);
    let compared = kscale(&args);
    assert_eq!(timeline(&compared), a, "the main policy's timeline changed");
    let mut args = vec!["backtest", "--policy", other, "--trace"];
    args.push(trace.to_str().expect("utf-8 path"));
    args.extend(["--metric", "load=value", "--scale", "0.5"]);
    args.extend(common);
    let other_from_trace = kscale(&args);
    assert_eq!(
        timeline(&compared["compare"]),
        timeline(&other_from_trace),
        "the compared policy's timeline differs from its trace backtest"
    );
    // The controller's forecast state after a restart: rebuilt from the same history with
    // range queries, it forecasts at once.
    let source = kscale::source::prometheus::PrometheusSource::new(
        &kscale::source::prometheus::PrometheusConfig {
            url: env.prometheus_url.clone(),
            ..Default::default()
        },
    )
    .expect("Prometheus source");
    let compiled = kscale::policy::CompiledPolicy::from_resource(
        &serde_yaml::from_str(&std::fs::read_to_string(policy).expect("policy")).expect("yaml"),
    )
    .expect("valid policy");
    let end = chrono::DateTime::from_timestamp(start + 60 * (n - 1), 0).expect("time");
    let now = end + chrono::TimeDelta::seconds(15);
    let forecasts = kscale::controller::forecast::Forecasts::default();
    let predicted = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(forecasts.predict(&source, "default/web", Some(1), &compiled, &[], now));
    let p = predicted[0].expect("a forecast from the re-read history alone");
    let last = value(n - 1);
    assert!(
        (p.point - last).abs() < 0.2 * last,
        "forecast {p:?} far from the last value {last}"
    );
    for key in [
        "replica_hours",
        "slo_violation_minutes",
        "scaling_actions",
        "ratio_to_oracle",
        "elasticity",
    ] {
        assert_eq!(
            from_trace["summary"][key], from_prometheus["summary"][key],
            "summary {key}"
        );
    }
}
