//! Evaluation and backtest speed.
//!
//! Targets (issue: the evaluation core): one evaluation of a 3-metric policy with behavior and a
//! full 300 s stabilization window under 2 µs (under 10 µs with a CEL formula); backtest
//! throughput at least 1 million evaluations per second per core. Forecasting (issue:
//! predictive scaling): a Holt-Winters refit on 7 days of one-minute buckets well under a
//! second (it runs every `refitEvery`, 6 h by default), and the per-evaluation forecast (observe
//! plus forecast between refits) under 5 µs.
//!
//! Run: `cargo bench --bench evaluate`

use std::hint::black_box;

use chrono::{DateTime, TimeDelta, Utc};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kscale::backtest::{BacktestConfig, run};
use kscale::crd::ScalingPolicy;
use kscale::model::{Observation, Sample};
use kscale::policy::{CompiledPolicy, PolicyState, evaluate};
use kscale::source::trace::Trace;

const POLICY: &str = r#"
apiVersion: kscale.dev/v1alpha1
kind: ScalingPolicy
metadata: {name: bench, namespace: default}
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
  minReplicas: 2
  maxReplicas: 50
  metrics:
  - name: rps
    prometheus: {query: 'sum(rate(http_requests_total[1m]))'}
    target: {type: AverageValue, averageValue: "100"}
  - name: p99
    prometheus: {query: 'histogram_quantile(0.99, rate(h_bucket[2m]))'}
    target: {type: Value, value: "250m"}
  - name: queue
    prometheus: {query: 'sum(queue_depth)'}
    target: {type: AverageValue, averageValue: "30"}
  behavior:
    scaleUp:
      stabilizationWindowSeconds: 60
      policies: [{type: Percent, value: 100, periodSeconds: 15}, {type: Pods, value: 4, periodSeconds: 15}]
    scaleDown:
      stabilizationWindowSeconds: 300
      policies: [{type: Percent, value: 10, periodSeconds: 60}]
"#;

fn compile(formula: Option<&str>) -> CompiledPolicy {
    let mut p: ScalingPolicy = serde_yaml::from_str(POLICY).expect("bench policy parses");
    p.spec.formula = formula.map(str::to_string);
    CompiledPolicy::from_resource(&p).expect("bench policy is valid")
}

fn t(s: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000 + s, 0).expect("valid time")
}

/// A state whose stabilization window is full: 20 recommendations 15 s apart, plus scale events.
fn warm_state(policy: &CompiledPolicy) -> PolicyState {
    let mut state = PolicyState::default();
    let mut replicas = 10;
    for i in 0..21 {
        let now = t(i * 15);
        let obs = observation(replicas, 900.0 + (i as f64 * 37.0) % 300.0, now);
        let mut d = evaluate(policy, &obs, &state, now);
        d.record_applied(policy, now);
        replicas = d.replicas;
        state = d.state;
    }
    assert!(state.recommendations.len() >= 20, "window must be full");
    state
}

fn observation(replicas: i32, rps: f64, now: DateTime<Utc>) -> Observation {
    Observation::steady(
        replicas,
        vec![
            Sample::Series {
                values: vec![rps],
                timestamp: now - TimeDelta::seconds(5),
            },
            Sample::Series {
                values: vec![0.21],
                timestamp: now - TimeDelta::seconds(5),
            },
            Sample::Series {
                values: vec![120.0, 80.0],
                timestamp: now - TimeDelta::seconds(5),
            },
        ],
    )
}

fn bench_evaluate(c: &mut Criterion) {
    for (name, formula) in [
        ("evaluate/3-metrics+behavior", None),
        (
            "evaluate/3-metrics+behavior+cel",
            Some("max(rps, p99, queue)"),
        ),
    ] {
        let policy = compile(formula);
        let state = warm_state(&policy);
        let now = t(21 * 15);
        let obs = observation(10, 1234.0, now);
        c.bench_function(name, |b| {
            b.iter(|| {
                black_box(evaluate(
                    black_box(&policy),
                    black_box(&obs),
                    black_box(&state),
                    now,
                ))
            })
        });
    }
}

fn bench_backtest(c: &mut Criterion) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/traces/elb_request_count_8c0756.csv");
    let trace = Trace::load(&path).expect("bundled trace loads");
    let mut p: ScalingPolicy = serde_yaml::from_str(POLICY).expect("bench policy parses");
    p.spec.metrics.truncate(1);
    let policy = CompiledPolicy::from_resource(&p).expect("valid");
    let config = BacktestConfig {
        scale: 30.0,
        capacity: Some(100.0),
        startup: TimeDelta::seconds(60),
        ..BacktestConfig::default()
    };
    let evaluations = run(&policy, &trace, &config, &mut |_, _| {})
        .expect("runs")
        .summary
        .evaluations;
    let mut group = c.benchmark_group("backtest");
    group.throughput(Throughput::Elements(evaluations));
    group.sample_size(10);
    group.bench_function("elb-14-days-15s", |b| {
        b.iter(|| black_box(run(&policy, &trace, &config, &mut |_, _| {}).expect("runs")))
    });
    group.finish();
}

fn bench_forecast(c: &mut Criterion) {
    use kscale::policy::forecast::{ForecastSettings, Forecaster, ModelKind, fit};
    // Seven days of one-minute buckets: a daily cycle, a weekly swell and noise.
    let n = 7 * 1440;
    let series: Vec<Option<f64>> = (0..n)
        .map(|i| {
            let day = (i as f64 / 1440.0) * std::f64::consts::TAU;
            let noise = ((i * 7919) % 101) as f64 / 101.0 - 0.5;
            Some(500.0 + 300.0 * day.sin() + 50.0 * (day / 7.0).sin() + 40.0 * noise)
        })
        .collect();
    let mut group = c.benchmark_group("forecast");
    group.sample_size(10);
    group.bench_function("refit-holt-winters-7d-1m", |b| {
        b.iter(|| {
            black_box(fit(
                black_box(&series),
                0,
                ModelKind::HoltWinters,
                1440,
                0.999,
            ))
        })
    });
    let settings = ForecastSettings {
        model: ModelKind::HoltWinters,
        season: TimeDelta::days(1),
        horizon: TimeDelta::seconds(60),
        history: TimeDelta::days(7),
        step: TimeDelta::minutes(1),
        refit: TimeDelta::days(365),
        confidence: 0.999,
        min_headroom: 0.5,
    };
    let mut f = Forecaster::new(settings, 100.0);
    let start = t(0);
    for (i, v) in series.iter().enumerate() {
        if let Some(v) = v {
            f.observe(start + TimeDelta::minutes(i as i64), *v);
        }
    }
    let mut now = start + TimeDelta::minutes(n as i64);
    let _ = f.forecast(now);
    let mut k = 0u64;
    group.bench_function("observe-and-forecast-15s", |b| {
        b.iter(|| {
            now += TimeDelta::seconds(15);
            k += 1;
            f.observe(now, 500.0 + (k % 50) as f64);
            black_box(f.forecast(now))
        })
    });
    group.finish();
}

criterion_group!(benches, bench_evaluate, bench_backtest, bench_forecast);
criterion_main!(benches);
