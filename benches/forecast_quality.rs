//! Forecast quality benchmark: on every trace in `../shared/traces/` (or `$KSCALE_TRACES`), a
//! forecasting policy against the HPA-equivalent policy tuned to zero SLO-violation minutes and
//! against the perfect-foresight oracle. Prints the Markdown report committed as
//! `benches/forecast_quality.md`:
//!
//! ```text
//! cargo bench --bench forecast_quality > benches/forecast_quality.md
//! ```
//!
//! Set-up, the same for every trace (no per-trace tuning of the forecasting policy):
//! - each trace is resampled to one row a minute by linear interpolation between its samples
//!   (gaps longer than an hour stay gaps), and scaled so its peak needs 20 replicas of
//!   capacity 100;
//! - pod start-up 60 s, interval 15 s, both policies start at 20 replicas, bounds 1..60;
//! - the first two days are history only (forecasts learn from them; figures cover the rest);
//! - the HPA-equivalent policy is the HPA's defaults (10 % tolerance, 5-minute scale-down window)
//!   with an `AverageValue` target of `u · capacity`; `u` is bisected per trace to the largest
//!   value with zero SLO-violation minutes (the HPA gets per-trace tuning, the forecast does not).

use std::fmt::Write as _;
use std::path::PathBuf;

use chrono::{DateTime, TimeDelta, Utc};
use kscale::backtest::{BacktestConfig, Run, run};
use kscale::crd::ScalingPolicy;
use kscale::policy::CompiledPolicy;
use kscale::source::trace::Trace;

const CAPACITY: f64 = 100.0;
const PEAK_REPLICAS: f64 = 20.0;
const STARTUP_SECONDS: i64 = 60;
/// The first two days are history only (two daily seasons), as after a controller start.
const WARMUP_DAYS: i64 = 2;

/// The forecasting policy, the same for every trace; `{confidence}` is each of [`CONFIDENCES`].
const FORECAST_SPEC: &str = r#"
  forecast:
    model: HoltWinters
    seasonality: Daily
    confidence: {confidence}
  behavior:
    scaleUp: {tolerance: "0"}
    scaleDown: {stabilizationWindowSeconds: 120}
"#;

/// Two global settings of the headroom: the default, the 99.9th percentile of the model's
/// relative errors, and the largest error seen (100).
const CONFIDENCES: [&str; 2] = ["99.9", "100"];

fn policy(name: &str, target: f64, extra: &str) -> CompiledPolicy {
    let yaml = format!(
        r#"
apiVersion: kscale.dev/v1alpha1
kind: ScalingPolicy
metadata: {{name: {name}}}
spec:
  targetRef: {{apiVersion: apps/v1, kind: Deployment, name: web}}
  minReplicas: 1
  maxReplicas: 60
  metrics:
  - name: demand
    prometheus: {{query: demand}}
    target: {{type: AverageValue, averageValue: "{target:.3}"}}
{extra}"#
    );
    let resource: ScalingPolicy = match serde_yaml::from_str(&yaml) {
        Ok(r) => r,
        Err(e) => panic!("bench policy {name}: {e}"),
    };
    match CompiledPolicy::from_resource(&resource) {
        Ok(p) => p,
        Err(e) => panic!("bench policy {name}: {e}"),
    }
}

/// One row a minute, linearly interpolated; gaps over an hour stay gaps.
fn resample(trace: &Trace) -> Trace {
    let points: Vec<(DateTime<Utc>, f64)> = trace
        .times
        .iter()
        .zip(&trace.values[0])
        .filter_map(|(t, v)| v.filter(|v| v.is_finite()).map(|v| (*t, v)))
        .collect();
    let peak = points.iter().map(|(_, v)| *v).fold(0.0f64, f64::max);
    let scale = if peak > 0.0 {
        PEAK_REPLICAS * CAPACITY / peak
    } else {
        1.0
    };
    let mut times = Vec::new();
    let mut values = Vec::new();
    let Some(&(first, _)) = points.first() else {
        return Trace {
            path: trace.path.clone(),
            columns: vec!["demand".into()],
            times,
            values: vec![values],
        };
    };
    let start = first + TimeDelta::seconds((60 - first.timestamp().rem_euclid(60)) % 60);
    let mut t = start;
    let mut i = 0;
    while let Some(&(last, _)) = points.last()
        && t <= last
    {
        while i + 1 < points.len() && points[i + 1].0 <= t {
            i += 1;
        }
        let (t0, v0) = points[i];
        let value = match points.get(i + 1) {
            _ if t == t0 => Some(v0),
            Some(&(t1, v1)) if t1 - t0 <= TimeDelta::hours(1) => {
                let f = (t - t0).num_milliseconds() as f64 / (t1 - t0).num_milliseconds() as f64;
                Some(v0 + f * (v1 - v0))
            }
            _ => None,
        };
        times.push(t);
        values.push(value.map(|v| v * scale));
        t += TimeDelta::minutes(1);
    }
    Trace {
        path: trace.path.clone(),
        columns: vec!["demand".into()],
        times,
        values: vec![values],
    }
}

fn config() -> BacktestConfig {
    BacktestConfig {
        capacity: Some(CAPACITY),
        startup: TimeDelta::seconds(STARTUP_SECONDS),
        initial_replicas: Some(PEAK_REPLICAS as i32),
        warmup: TimeDelta::days(WARMUP_DAYS),
        ..BacktestConfig::default()
    }
}

fn replay(policy: &CompiledPolicy, trace: &Trace) -> Run {
    match run(policy, trace, &config(), &mut |_, _| {}) {
        Ok(r) => r,
        Err(e) => panic!("{}: {e}", trace.path.display()),
    }
}

fn violations(r: &Run) -> f64 {
    r.summary.slo_violation_minutes.unwrap_or(f64::INFINITY)
}

/// The largest target fraction `u` (to 0.005) with zero SLO-violation minutes, and its run.
fn tune_hpa(trace: &Trace) -> (f64, Run) {
    let (mut lo, mut hi) = (0.02, 1.0);
    let mut best = None;
    let top = replay(&policy("hpa", hi * CAPACITY, ""), trace);
    if violations(&top) == 0.0 {
        return (hi, top);
    }
    while hi - lo > 0.005 {
        let mid = (lo + hi) / 2.0;
        let r = replay(&policy("hpa", mid * CAPACITY, ""), trace);
        if violations(&r) == 0.0 {
            lo = mid;
            best = Some((mid, r));
        } else {
            hi = mid;
        }
    }
    match best {
        Some(b) => b,
        None => (lo, replay(&policy("hpa", lo * CAPACITY, ""), trace)),
    }
}

fn main() {
    let dir = std::env::var_os("KSCALE_TRACES").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/traces"),
        PathBuf::from,
    );
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(d) => d
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "csv"))
            .collect(),
        Err(e) => panic!("{}: {e} (set KSCALE_TRACES)", dir.display()),
    };
    files.sort();
    let forecasts: Vec<(String, CompiledPolicy)> = CONFIDENCES
        .iter()
        .map(|c| {
            let spec = FORECAST_SPEC.replace("{confidence}", c);
            (
                format!("forecast, confidence {c}"),
                policy("forecast", CAPACITY, &spec),
            )
        })
        .collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Forecast quality\n\nMade by `cargo bench --bench forecast_quality > benches/forecast_quality.md` \
         (set-up in the header of `benches/forecast_quality.rs`). Traces: `../shared/traces/`, each \
         resampled to one row a minute and scaled so its peak needs {PEAK_REPLICAS} replicas of capacity \
         {CAPACITY}; pod start-up {STARTUP_SECONDS} s; evaluation every 15 s. The first {WARMUP_DAYS} \
         days of every trace are history only (the forecasts learn from them, as the controller \
         re-reads history after a start); every figure covers the rest.\n\n\
         Forecasting policy, identical on every trace, run with each `confidence` of {CONFIDENCES:?}: \
         target {CAPACITY}/replica, and\n\n```yaml{FORECAST_SPEC}```\n\n\
         HPA-equivalent: the HPA's defaults with target `u · {CAPACITY}`, `u` bisected per trace to the \
         largest value with zero SLO-violation minutes. Accuracy and timeshare are the SPEC RG \
         elasticity metrics (θ_U/θ_O, τ_U/τ_O, percent; supply = ready replicas). The bar: forecast \
         with 0 SLO-violation minutes, replica-hours ≤ 1.25 × oracle and ≥ 15 % below the tuned HPA.\n"
    );
    let _ = writeln!(
        out,
        "| trace | policy | replica-hours | × oracle | SLO-violation min | scaling actions | θ_U % | θ_O % | τ_U % | τ_O % |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    let mut verdicts = String::new();
    for file in &files {
        let raw = match Trace::load(file) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        let trace = resample(&raw);
        let name = file
            .file_name()
            .map_or_else(String::new, |f| f.to_string_lossy().into_owned());
        let runs: Vec<(String, Run, f64)> = forecasts
            .iter()
            .map(|(label, p)| {
                let started = std::time::Instant::now();
                let r = replay(p, &trace);
                (label.clone(), r, started.elapsed().as_secs_f64())
            })
            .collect();
        let (u, hpa) = tune_hpa(&trace);
        let hpa_label = format!("HPA-equivalent, u = {u:.3}");
        for (label, r) in runs
            .iter()
            .map(|(l, r, _)| (l, r))
            .chain([(&hpa_label, &hpa)])
        {
            let s = &r.summary;
            let e = s.elasticity.unwrap_or_default();
            let _ = writeln!(
                out,
                "| {name} | {label} | {:.1} | {:.3} | {:.2} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
                s.replica_hours,
                s.ratio_to_oracle.unwrap_or(f64::NAN),
                violations(r),
                s.scaling_actions,
                e.accuracy_under,
                e.accuracy_over,
                e.timeshare_under,
                e.timeshare_over,
            );
        }
        let hpa_ratio = hpa.summary.ratio_to_oracle.unwrap_or(f64::NAN);
        let goal = 0.85 * hpa_ratio;
        let _ = writeln!(
            verdicts,
            "- {name}: oracle {:.1} replica-hours; the tuned HPA runs {hpa_ratio:.3} × oracle, so \
             15 % below it is {goal:.3} × oracle{}",
            hpa.summary.oracle_replica_hours.unwrap_or(f64::NAN),
            if goal < 1.0 {
                " (below the oracle: no policy without SLO violations can get there)"
            } else {
                ""
            }
        );
        for (label, f, seconds) in &runs {
            let ratio = f.summary.ratio_to_oracle.unwrap_or(f64::NAN);
            let saving = 1.0 - f.summary.replica_hours / hpa.summary.replica_hours;
            let ok = violations(f) == 0.0 && ratio <= 1.25 && saving >= 0.15;
            let verdict = if ok {
                "meets the bar"
            } else {
                "misses the bar"
            };
            let _ = writeln!(
                verdicts,
                "  - {label}: {:.2} SLO-violation minutes, {ratio:.3} × oracle, {:.1} % fewer \
                 replica-hours than the tuned HPA: **{verdict}** (replay {seconds:.1} s, {} evaluations)",
                violations(f),
                saving * 100.0,
                f.summary.evaluations,
            );
        }
    }
    let _ = writeln!(out, "\n## Verdict per trace\n\n{verdicts}");
    print!("{out}");
}
