//! Backtests: replay recorded demand through a policy with a simulated clock.
//!
//! Semantics (documented in README.md):
//! - evaluations at `t0 + k·interval` up to the last sample, where `t0` is the first sample plus
//!   the warm-up (history that only the forecasts learn from, fed at every interval as the
//!   evaluations would have; 0 by default);
//! - a metric's value at `t` is the latest sample at or before `t`, as a Prometheus instant query
//!   sees it: older than the 5-minute lookback it is missing; the policy's `fallback.staleAfter`
//!   is applied by the evaluator as in production;
//! - the decision at `t` takes effect at `t`; a new replica is ready `startup` after it was added;
//!   scale-down removes the newest replicas first;
//! - resource (CPU/memory) metrics have no trace column of their own by default: with a capacity
//!   they are derived from demand (each ready pod requests one unit and uses demand / (ready ·
//!   capacity) of it), or a column can be mapped to them as utilization percent.

pub mod plot;
pub mod report;
pub mod shadow;
pub mod verdict;

use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;

use crate::model::{Observation, PodPhase, PodSample, PodUsage, Sample};
use crate::policy::forecast::ForecastState;
use crate::policy::{CompiledPolicy, MetricSource, PolicyState, effective_bounds, evaluate};
use crate::source::trace::Trace;

/// Prometheus' default lookback for instant queries.
pub const PROMETHEUS_LOOKBACK: TimeDelta = TimeDelta::seconds(300);

/// Why a backtest cannot run; each names the flag, metric or column at fault.
#[derive(Debug, thiserror::Error)]
pub enum BacktestError {
    /// A `--metric NAME=COLUMN` names a metric the policy does not have.
    #[error(
        "--metric {metric}={column}: the policy {policy} has no metric {metric:?} (it has: {known})"
    )]
    UnknownMetric {
        /// Policy name.
        policy: String,
        /// Metric named.
        metric: String,
        /// Column named.
        column: String,
        /// The policy's metrics.
        known: String,
    },
    /// A column that does not exist in the trace.
    #[error("{trace}: no column {column:?} (columns: {known}); named by {by}")]
    UnknownColumn {
        /// Trace file.
        trace: String,
        /// Column named.
        column: String,
        /// The trace's columns.
        known: String,
        /// Which flag or metric named it.
        by: String,
    },
    /// A Prometheus metric with no column.
    #[error(
        "metric {metric:?} of policy {policy} has no trace column: name one with --metric {metric}=COLUMN (columns: {known})"
    )]
    UnmappedMetric {
        /// Policy name.
        policy: String,
        /// Metric.
        metric: String,
        /// The trace's columns.
        known: String,
    },
    /// A resource metric with neither a column nor a capacity.
    #[error(
        "metric {metric:?} of policy {policy} is a resource metric: give --capacity to derive utilization from demand, or map a column of utilization percent with --metric {metric}=COLUMN"
    )]
    ResourceNeedsCapacity {
        /// Policy name.
        policy: String,
        /// Metric.
        metric: String,
    },
    /// A bad numeric option.
    #[error("{flag}: {message}")]
    BadOption {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// How to replay a trace.
#[derive(Debug, Clone)]
pub struct BacktestConfig {
    /// `(metric, column)` pairs from `--metric`.
    pub metric_columns: Vec<(String, String)>,
    /// The column that is demand (for capacity, SLO and oracle); default: the first mapped column.
    pub demand_column: Option<String>,
    /// Every trace value is multiplied by this.
    pub scale: f64,
    /// Demand one ready replica absorbs.
    pub capacity: Option<f64>,
    /// Time from adding a replica to it being ready.
    pub startup: TimeDelta,
    /// Replicas at the start (default: the policy's minReplicas).
    pub initial_replicas: Option<i32>,
    /// Keep a reason string for every step (JSON output).
    pub keep_reasons: bool,
    /// The trace's first stretch is history only: forecasts learn from it, evaluations and
    /// figures start after it.
    pub warmup: TimeDelta,
}

impl Default for BacktestConfig {
    fn default() -> Self {
        BacktestConfig {
            metric_columns: Vec::new(),
            demand_column: None,
            scale: 1.0,
            capacity: None,
            startup: TimeDelta::zero(),
            initial_replicas: None,
            keep_reasons: false,
            warmup: TimeDelta::zero(),
        }
    }
}

/// Where each metric's samples come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feed {
    /// A trace column, as a Prometheus series.
    Column(usize),
    /// A trace column, as the utilization percent of every ready pod.
    Utilization(usize),
    /// A trace column, as the value of a pods metric on every ready pod.
    PodValue(usize),
    /// Derived from demand and capacity.
    Derived,
}

/// One evaluation of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Evaluation time.
    pub time: DateTime<Utc>,
    /// Replicas after this evaluation's decision.
    pub replicas: i32,
    /// Ready replicas at this time (after the decision).
    pub ready_replicas: i32,
    /// Each metric's value as the policy saw it, `None` when missing.
    pub metrics: Vec<Option<f64>>,
    /// The decision's reason (when kept).
    pub reason: Option<String>,
}

/// The figures of a run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    /// Policy name.
    pub policy: String,
    /// First evaluation.
    pub start: DateTime<Utc>,
    /// Last evaluation.
    pub end: DateTime<Utc>,
    /// Number of evaluations.
    pub evaluations: u64,
    /// Replica-hours run.
    pub replica_hours: f64,
    /// Number of changes of the replica count.
    pub scaling_actions: u64,
    /// Scale-ups among them.
    pub scale_ups: u64,
    /// Scale-downs among them.
    pub scale_downs: u64,
    /// Fewest replicas run.
    pub min_replicas: i32,
    /// Most replicas run.
    pub max_replicas: i32,
    /// Evaluations where a metric was missing, stale or invalid.
    pub degraded_evaluations: u64,
    /// Minutes where demand exceeded ready capacity (needs a capacity).
    pub slo_violation_minutes: Option<f64>,
    /// When: each run of consecutive evaluations with demand above ready capacity.
    pub slo_violations: Vec<Violation>,
    /// Replica-hours of a perfect-foresight oracle held to the policy's bounds (needs a
    /// capacity): it never runs fewer than the policy's floor nor more than its ceiling at that
    /// time (schedules included), so the ratio does not blame the policy for its own
    /// `minReplicas`.
    pub oracle_replica_hours: Option<f64>,
    /// Replica-hours of the same oracle without the policy's bounds: exactly the replicas demand
    /// needs, 0 when idle (needs a capacity).
    pub oracle_unbounded_replica_hours: Option<f64>,
    /// Our replica-hours over the bounded oracle's.
    pub ratio_to_oracle: Option<f64>,
    /// SPEC RG elasticity metrics (needs a capacity), see [`Elasticity`].
    pub elasticity: Option<Elasticity>,
}

/// A stretch of consecutive evaluations with demand above ready capacity.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Violation {
    /// First evaluation short of capacity.
    pub start: DateTime<Utc>,
    /// The end of the last one (its time plus the interval).
    pub end: DateTime<Utc>,
    /// The largest demand in the stretch (scaled).
    pub peak_demand: f64,
    /// The replicas ready when demand peaked.
    pub ready_replicas: i32,
}

impl Violation {
    /// "2015-03-13 20:54–20:55 UTC: demand up to 655.4, 5 ready replicas (capacity 500)".
    pub fn describe(&self, capacity: f64) -> String {
        let same_day = self.start.date_naive() == self.end.date_naive();
        let end = if same_day {
            self.end.format("%H:%M")
        } else {
            self.end.format("%Y-%m-%d %H:%M")
        };
        format!(
            "{}–{end} UTC: demand up to {:.1}, {} ready replicas (capacity {})",
            self.start.format("%Y-%m-%d %H:%M"),
            self.peak_demand,
            self.ready_replicas,
            f64::from(self.ready_replicas) * capacity
        )
    }
}

/// The SPEC Research Group's elasticity metrics (Herbst et al., "Ready for Rain? A View from
/// SPEC Research on the Future of Cloud Metrics", 2016): demand `d` is the replicas needed
/// (`ceil(demand / capacity)`), supply `s` the ready replicas, each evaluation weighted by its
/// interval. Accuracies are normalised by `max(d, 1)` so an idle period (d = 0) counts as one
/// replica of demand.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Default)]
pub struct Elasticity {
    /// θ_U: mean of `max(d − s, 0) / d`, percent.
    pub accuracy_under: f64,
    /// θ_O: mean of `max(s − d, 0) / d`, percent.
    pub accuracy_over: f64,
    /// τ_U: share of time with `s < d`, percent.
    pub timeshare_under: f64,
    /// τ_O: share of time with `s > d`, percent.
    pub timeshare_over: f64,
}

impl Elasticity {
    /// Adds one evaluation (sums; [`Elasticity::finish`] turns them into percentages).
    fn add(&mut self, needed: f64, ready: f64) {
        let d = needed.max(1.0);
        self.accuracy_under += (needed - ready).max(0.0) / d;
        self.accuracy_over += (ready - needed).max(0.0) / d;
        self.timeshare_under += f64::from(u8::from(ready < needed));
        self.timeshare_over += f64::from(u8::from(ready > needed));
    }

    fn finish(self, n: u64) -> Elasticity {
        let k = if n == 0 { 0.0 } else { 100.0 / n as f64 };
        Elasticity {
            accuracy_under: self.accuracy_under * k,
            accuracy_over: self.accuracy_over * k,
            timeshare_under: self.timeshare_under * k,
            timeshare_over: self.timeshare_over * k,
        }
    }
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct Run {
    /// Figures.
    pub summary: Summary,
    /// Every evaluation.
    pub steps: Vec<Step>,
    /// Demand at each step (scaled), when a demand column exists.
    pub demand: Vec<Option<f64>>,
}

/// A column cursor: the latest non-empty sample at or before a moving time.
struct Cursor<'a> {
    times: &'a [DateTime<Utc>],
    values: &'a [Option<f64>],
    next: usize,
    last: Option<(f64, DateTime<Utc>)>,
}

impl<'a> Cursor<'a> {
    fn new(trace: &'a Trace, column: usize) -> Cursor<'a> {
        Cursor {
            times: &trace.times,
            values: &trace.values[column],
            next: 0,
            last: None,
        }
    }

    /// Latest sample at or before `t` within the lookback; `t` must not decrease.
    fn at(&mut self, t: DateTime<Utc>) -> Option<(f64, DateTime<Utc>)> {
        while self.next < self.times.len() && self.times[self.next] <= t {
            if let Some(v) = self.values[self.next] {
                self.last = Some((v, self.times[self.next]));
            }
            self.next += 1;
        }
        self.last
            .filter(|(_, ts)| t.signed_duration_since(*ts) <= PROMETHEUS_LOOKBACK)
    }
}

fn resolve_feeds(
    policy: &CompiledPolicy,
    trace: &Trace,
    config: &BacktestConfig,
) -> Result<(Vec<Feed>, Option<usize>), BacktestError> {
    let known_columns = || trace.columns.join(", ");
    let column = |name: &str, by: String| {
        trace
            .column(name)
            .ok_or_else(|| BacktestError::UnknownColumn {
                trace: trace.path.display().to_string(),
                column: name.to_string(),
                known: known_columns(),
                by,
            })
    };
    let mut feeds: Vec<Option<Feed>> = vec![None; policy.metrics.len()];
    for (metric, col) in &config.metric_columns {
        let Some(i) = policy.metrics.iter().position(|m| &m.name == metric) else {
            return Err(BacktestError::UnknownMetric {
                policy: policy.name.clone(),
                metric: metric.clone(),
                column: col.clone(),
                known: policy
                    .metrics
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let c = column(col, format!("--metric {metric}={col}"))?;
        feeds[i] = Some(match policy.metrics[i].source {
            MetricSource::Prometheus { .. }
            | MetricSource::Object { .. }
            | MetricSource::External { .. } => Feed::Column(c),
            MetricSource::Resource { .. } => Feed::Utilization(c),
            MetricSource::Pods { .. } => Feed::PodValue(c),
        });
    }
    let prometheus_count = policy
        .metrics
        .iter()
        .filter(|m| matches!(m.source, MetricSource::Prometheus { .. }))
        .count();
    for (i, m) in policy.metrics.iter().enumerate() {
        if feeds[i].is_some() {
            continue;
        }
        feeds[i] = Some(match m.source {
            MetricSource::Pods { .. } => match trace.column(&m.name) {
                Some(c) => Feed::PodValue(c),
                None => {
                    return Err(BacktestError::UnmappedMetric {
                        policy: policy.name.clone(),
                        metric: m.name.clone(),
                        known: known_columns(),
                    });
                }
            },
            MetricSource::Prometheus { .. }
            | MetricSource::Object { .. }
            | MetricSource::External { .. } => {
                if let Some(c) = trace.column(&m.name) {
                    Feed::Column(c)
                } else if trace.columns.len() == 1 && prometheus_count == 1 {
                    Feed::Column(0)
                } else {
                    return Err(BacktestError::UnmappedMetric {
                        policy: policy.name.clone(),
                        metric: m.name.clone(),
                        known: known_columns(),
                    });
                }
            }
            MetricSource::Resource { .. } => {
                if config.capacity.is_none() {
                    return Err(BacktestError::ResourceNeedsCapacity {
                        policy: policy.name.clone(),
                        metric: m.name.clone(),
                    });
                }
                Feed::Derived
            }
        });
    }
    let feeds: Vec<Feed> = feeds
        .into_iter()
        .map(|f| f.unwrap_or(Feed::Derived))
        .collect();
    let demand = match &config.demand_column {
        Some(name) => Some(column(name, "--demand".to_string())?),
        None => feeds
            .iter()
            .find_map(|f| match f {
                Feed::Column(c) => Some(*c),
                _ => None,
            })
            .or(if trace.columns.len() == 1 {
                Some(0)
            } else {
                None
            }),
    };
    if feeds.contains(&Feed::Derived) && demand.is_none() {
        return Err(BacktestError::BadOption {
            flag: "--demand",
            message: format!(
                "resource metrics are derived from demand; name the demand column (columns: {})",
                known_columns()
            ),
        });
    }
    Ok((feeds, demand))
}

/// Replays `trace` through `policy`. Deterministic: the same inputs give the same run.
/// `progress` is called with (done, total) evaluations every few thousand steps.
pub fn run(
    policy: &CompiledPolicy,
    trace: &Trace,
    config: &BacktestConfig,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Run, BacktestError> {
    if !(config.scale.is_finite() && config.scale > 0.0) {
        return Err(BacktestError::BadOption {
            flag: "--scale",
            message: format!("must be a positive number, got {}", config.scale),
        });
    }
    if let Some(c) = config.capacity
        && !(c.is_finite() && c > 0.0)
    {
        return Err(BacktestError::BadOption {
            flag: "--capacity",
            message: format!("must be a positive number, got {c}"),
        });
    }
    if config.startup < TimeDelta::zero() {
        return Err(BacktestError::BadOption {
            flag: "--startup",
            message: "must not be negative".into(),
        });
    }
    let (feeds, demand_col) = resolve_feeds(policy, trace, config)?;
    let (Some(&first), Some(&t_end)) = (trace.times.first(), trace.times.last()) else {
        return Err(BacktestError::BadOption {
            flag: "--trace",
            message: format!("{}: trace has no rows", trace.path.display()),
        });
    };
    if config.warmup < TimeDelta::zero() || first + config.warmup > t_end {
        return Err(BacktestError::BadOption {
            flag: "--warmup",
            message: format!(
                "must be between 0 and the trace's span ({}s)",
                (t_end - first).num_seconds()
            ),
        });
    }
    let t0 = first + config.warmup;
    let interval = policy.interval;
    let total = (t_end.signed_duration_since(t0).num_milliseconds()
        / interval.num_milliseconds().max(1)) as u64
        + 1;

    let mut cursors: Vec<Option<Cursor>> = feeds
        .iter()
        .map(|f| match f {
            Feed::Column(c) | Feed::Utilization(c) | Feed::PodValue(c) => {
                Some(Cursor::new(trace, *c))
            }
            Feed::Derived => None,
        })
        .collect();
    let mut demand_cursor = demand_col.map(|c| Cursor::new(trace, c));

    let initial = config
        .initial_replicas
        .unwrap_or(policy.min_replicas)
        .max(0);
    // Birth times of the running replicas, oldest first; initial ones are ready at t0.
    let mut births: Vec<DateTime<Utc>> = vec![t0 - config.startup; initial as usize];
    let mut replicas = initial;
    let mut state = PolicyState::default();
    if initial == 0 && policy.zero.is_some_and(|z| z.idle == 0) {
        // The replay is kscale's own run: a start at 0 is a zero kscale set (so it wakes on an
        // active metric), not one a person set by hand (which would stay at 0).
        state.scaled_to_zero_time = Some(t0);
    }
    let mut forecasts = ForecastState::new(policy);
    if forecasts.is_active() {
        // The warm-up is history only, as the controller re-reads it after a start: each
        // forecast metric's value at every interval before t0.
        for (i, feed) in feeds.iter().enumerate() {
            if let Feed::Column(c) = feed {
                let mut cursor = Cursor::new(trace, *c);
                let mut t = first;
                while t < t0 {
                    if let Some((v, _)) = cursor.at(t) {
                        forecasts.observe_metric(i, t, v * config.scale);
                    }
                    t += interval;
                }
            }
        }
    }
    let mut obs = Observation::steady(replicas, Vec::with_capacity(feeds.len()));
    let step_hours = interval.num_milliseconds() as f64 / 3_600_000.0;
    let step_minutes = step_hours * 60.0;
    let mut steps = Vec::with_capacity(total as usize);
    let mut demand_series = Vec::with_capacity(total as usize);
    let mut summary = Summary {
        policy: policy.name.clone(),
        start: t0,
        end: t0,
        evaluations: 0,
        replica_hours: 0.0,
        scaling_actions: 0,
        scale_ups: 0,
        scale_downs: 0,
        min_replicas: i32::MAX,
        max_replicas: i32::MIN,
        degraded_evaluations: 0,
        slo_violation_minutes: config.capacity.map(|_| 0.0),
        slo_violations: Vec::new(),
        oracle_replica_hours: None,
        oracle_unbounded_replica_hours: None,
        ratio_to_oracle: None,
        elasticity: None,
    };
    let mut bounds = Vec::with_capacity(total as usize);
    let mut elasticity = Elasticity::default();
    let mut elasticity_steps = 0u64;
    let ready_at = |births: &[DateTime<Utc>], t: DateTime<Utc>| {
        births.partition_point(|b| *b + config.startup <= t) as i32
    };

    let mut k: i64 = 0;
    loop {
        let t = t0 + interval * (k as i32);
        if t > t_end {
            break;
        }
        let demand = demand_cursor
            .as_mut()
            .and_then(|c| c.at(t))
            .map(|(v, _)| v * config.scale);
        let ready = ready_at(&births, t);
        obs.spec_replicas = replicas;
        obs.status_replicas = replicas;
        obs.ready_replicas = ready;
        obs.pods = replicas;
        obs.samples.clear();
        for (feed, cursor) in feeds.iter().zip(cursors.iter_mut()) {
            let sample = match (feed, cursor.as_mut().and_then(|c| c.at(t))) {
                (Feed::Column(_), Some((v, ts))) => Sample::Series {
                    values: vec![v * config.scale],
                    timestamp: ts,
                },
                (Feed::Utilization(_), Some((v, ts))) => {
                    pods_sample(replicas, ready, &births, ts, (v * 10.0).round() as i64)
                }
                (Feed::PodValue(_), Some((v, ts))) => pods_sample(
                    replicas,
                    ready,
                    &births,
                    ts,
                    (v * config.scale * 1000.0).round() as i64,
                ),
                (Feed::Derived, _) => match (demand, config.capacity) {
                    (Some(d), Some(c)) if ready > 0 => {
                        let per_pod_milli = (1000.0 * d / (f64::from(ready) * c)).round() as i64;
                        pods_sample(replicas, ready, &births, t, per_pod_milli)
                    }
                    (Some(_), Some(_)) => pods_sample(replicas, 0, &births, t, 0),
                    _ => Sample::Missing {
                        reason: "no demand sample within the 5m lookback".into(),
                    },
                },
                (_, None) => Sample::Missing {
                    reason: "no sample within Prometheus' 5m lookback".into(),
                },
            };
            obs.samples.push(sample);
        }

        if forecasts.is_active() {
            obs.forecasts = forecasts.observe_and_forecast(&obs.samples, t);
        }
        let mut decision = evaluate(policy, &obs, &state, t);
        decision.record_applied(policy, t);
        let reason = config.keep_reasons.then(|| decision.reason(policy));
        if decision.degraded {
            summary.degraded_evaluations += 1;
        }
        let new = decision.replicas.max(0);
        if new > replicas {
            births.extend(std::iter::repeat_n(t, (new - replicas) as usize));
            summary.scale_ups += 1;
            summary.scaling_actions += 1;
        } else if new < replicas {
            births.truncate(new as usize);
            summary.scale_downs += 1;
            summary.scaling_actions += 1;
        }
        replicas = new;
        let metrics = decision.metrics.iter().map(|m| m.value).collect();
        state = decision.state;
        let ready = ready_at(&births, t);
        summary.replica_hours += f64::from(replicas) * step_hours;
        summary.min_replicas = summary.min_replicas.min(replicas);
        summary.max_replicas = summary.max_replicas.max(replicas);
        if let (Some(c), Some(d)) = (config.capacity, demand) {
            if let Some(v) = summary.slo_violation_minutes.as_mut()
                && d > f64::from(ready) * c
            {
                *v += step_minutes;
                match summary.slo_violations.last_mut() {
                    Some(last) if last.end == t => {
                        last.end = t + interval;
                        if d > last.peak_demand {
                            (last.peak_demand, last.ready_replicas) = (d, ready);
                        }
                    }
                    _ => summary.slo_violations.push(Violation {
                        start: t,
                        end: t + interval,
                        peak_demand: d,
                        ready_replicas: ready,
                    }),
                }
            }
            elasticity.add(needed_replicas(d, c) as f64, f64::from(ready));
            elasticity_steps += 1;
        }
        summary.evaluations += 1;
        summary.end = t;
        steps.push(Step {
            time: t,
            replicas,
            ready_replicas: ready,
            metrics,
            reason,
        });
        demand_series.push(demand);
        bounds.push(ReplicaBounds::at(policy, t));
        if summary.evaluations.is_multiple_of(8192) {
            progress(summary.evaluations, total);
        }
        k += 1;
    }
    progress(summary.evaluations, total);
    if let Some(c) = config.capacity {
        let needed = oracle_replicas(&demand_series, c, config.startup, interval);
        let bounded = needed.iter().zip(&bounds).map(|(n, b)| b.clamp(*n));
        let oracle = replica_hours(bounded, interval);
        summary.oracle_replica_hours = Some(oracle);
        summary.oracle_unbounded_replica_hours =
            Some(replica_hours(needed.iter().copied(), interval));
        summary.ratio_to_oracle = (oracle > 0.0).then(|| summary.replica_hours / oracle);
        summary.elasticity = Some(elasticity.finish(elasticity_steps));
    }
    Ok(Run {
        summary,
        steps,
        demand: demand_series,
    })
}

/// Builds the pod list a metrics.k8s.io source would see: `ready` pods ready and measured,
/// the rest still starting (pending); every ready pod uses `usage_milli` of its 1000m request.
fn pods_sample(
    replicas: i32,
    ready: i32,
    births: &[DateTime<Utc>],
    measured: DateTime<Utc>,
    usage_milli: i64,
) -> Sample {
    let long_ago = births.first().copied().unwrap_or(measured) - TimeDelta::hours(1);
    let pods = (0..replicas.max(0) as usize)
        .map(|i| {
            let is_ready = (i as i32) < ready;
            PodSample {
                name: format!("pod-{i}"),
                phase: if is_ready {
                    PodPhase::Running
                } else {
                    PodPhase::Pending
                },
                deleting: false,
                ready: Some((is_ready, long_ago)),
                start_time: Some(long_ago),
                request_milli: Some(1000),
                usage: is_ready.then_some(PodUsage {
                    milli: usage_milli,
                    timestamp: measured,
                    window_seconds: 15,
                }),
            }
        })
        .collect();
    Sample::Pods(pods)
}

/// Replicas needed to serve `demand`: `ceil(demand / capacity)`.
pub fn needed_replicas(demand: f64, capacity: f64) -> i64 {
    (demand / capacity).ceil().max(0.0) as i64
}

/// The replica bounds a policy holds a target to at one time: what the bounded oracle respects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaBounds {
    /// The floor while demand needs a replica (`minReplicas`, raised by an open schedule).
    pub min: i32,
    /// The floor while demand needs none: `min`, or with `minReplicas: 0` / `idleReplicas`
    /// the idle count (unless an open schedule sets a floor).
    pub idle: i32,
    /// The ceiling (`maxReplicas`, lowered by an open schedule).
    pub max: i32,
}

impl ReplicaBounds {
    /// The bounds `policy` is held to at `t` (the evaluator's own effective bounds).
    pub fn at(policy: &CompiledPolicy, t: DateTime<Utc>) -> ReplicaBounds {
        let (min, max, by) = effective_bounds(policy, t);
        match policy.zero {
            Some(z) if by.floor.is_none() => ReplicaBounds {
                min: min.max(z.active_min).min(max),
                idle: z.idle.min(max),
                max,
            },
            _ => ReplicaBounds {
                min,
                idle: min,
                max,
            },
        }
    }

    /// `needed` replicas held within these bounds.
    pub fn clamp(&self, needed: i64) -> i64 {
        let floor = if needed == 0 { self.idle } else { self.min };
        needed
            .max(i64::from(floor))
            .min(i64::from(self.max.max(floor)))
    }
}

/// Replica-hours of a count per step of `interval`.
pub fn replica_hours(counts: impl IntoIterator<Item = i64>, interval: TimeDelta) -> f64 {
    let total: i64 = counts.into_iter().sum();
    total as f64 * interval.num_milliseconds() as f64 / 3_600_000.0
}

/// The replicas a perfect-foresight oracle runs at each step, unbounded: exactly the replicas
/// needed (`ceil(demand / capacity)`) for every moment up to `startup` ahead, so each replica is
/// ready when its demand arrives.
pub fn oracle_replicas(
    demand: &[Option<f64>],
    capacity: f64,
    startup: TimeDelta,
    interval: TimeDelta,
) -> Vec<i64> {
    let needed: Vec<i64> = demand
        .iter()
        .map(|d| d.map_or(0, |d| needed_replicas(d, capacity)))
        .collect();
    let ahead = (startup.num_milliseconds() as f64 / interval.num_milliseconds().max(1) as f64)
        .ceil() as usize;
    // Sliding-window maximum over [i, i + ahead] with a monotonic deque.
    let mut deque: std::collections::VecDeque<usize> = std::collections::VecDeque::new();
    let n = needed.len();
    let mut out = Vec::with_capacity(n);
    let mut next = 0usize;
    for i in 0..n {
        while next < n && next <= i + ahead {
            while deque.back().is_some_and(|&j| needed[j] <= needed[next]) {
                deque.pop_back();
            }
            deque.push_back(next);
            next += 1;
        }
        while deque.front().is_some_and(|&j| j < i) {
            deque.pop_front();
        }
        out.push(deque.front().map_or(0, |&j| needed[j]));
    }
    out
}

/// Replica-hours of the unbounded perfect-foresight oracle ([`oracle_replicas`]).
pub fn oracle_unbounded_replica_hours(
    demand: &[Option<f64>],
    capacity: f64,
    startup: TimeDelta,
    interval: TimeDelta,
) -> f64 {
    replica_hours(
        oracle_replicas(demand, capacity, startup, interval),
        interval,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elasticity_metrics_follow_the_spec_rg_definitions() {
        let mut e = Elasticity::default();
        // needed 4, ready 2: 50 % under; needed 2, ready 3: 50 % over; exact; idle with 1 ready.
        e.add(4.0, 2.0);
        e.add(2.0, 3.0);
        e.add(3.0, 3.0);
        e.add(0.0, 1.0);
        let e = e.finish(4);
        assert!((e.accuracy_under - 12.5).abs() < 1e-9, "{e:?}");
        assert!((e.accuracy_over - 37.5).abs() < 1e-9, "{e:?}");
        assert!((e.timeshare_under - 25.0).abs() < 1e-9, "{e:?}");
        assert!((e.timeshare_over - 50.0).abs() < 1e-9, "{e:?}");
    }

    #[test]
    fn oracle_starts_replicas_early() {
        let iv = TimeDelta::seconds(60);
        // Needs 0,0,5,0 with 60s startup: replicas 0,5,5,0 -> 10 replica-minutes.
        let d = [Some(0.0), Some(0.0), Some(50.0), Some(0.0)];
        let h = oracle_unbounded_replica_hours(&d, 10.0, TimeDelta::seconds(60), iv);
        assert!((h - 10.0 / 60.0).abs() < 1e-9, "{h}");
        let h0 = oracle_unbounded_replica_hours(&d, 10.0, TimeDelta::zero(), iv);
        assert!((h0 - 5.0 / 60.0).abs() < 1e-9, "{h0}");
    }

    fn policy(yaml_spec: &str) -> CompiledPolicy {
        let doc = format!(
            "apiVersion: kscale.dev/v1alpha1\nkind: ScalingPolicy\nmetadata: {{name: p}}\nspec:\n  targetRef: {{kind: Deployment, name: web}}\n{yaml_spec}  metrics:\n  - name: rps\n    prometheus: {{query: 'sum(x)'}}\n    target: {{type: AverageValue, averageValue: \"10\"}}\n"
        );
        let spec: crate::crd::ScalingPolicy = serde_yaml::from_str(&doc).expect("test policy");
        CompiledPolicy::from_resource(&spec).expect("valid test policy")
    }

    #[test]
    fn bounded_oracle_runs_within_min_and_max_replicas() {
        let p = policy("  minReplicas: 3\n  maxReplicas: 6\n");
        let t = DateTime::from_timestamp(0, 0).expect("epoch");
        let b = ReplicaBounds::at(&p, t);
        assert_eq!(
            b,
            ReplicaBounds {
                min: 3,
                idle: 3,
                max: 6
            }
        );
        // Needs 0, 2, 5, 9: the floor lifts 0 and 2 to 3, the ceiling caps 9 at 6.
        assert_eq!([0, 2, 5, 9].map(|n| b.clamp(n)), [3, 3, 5, 6]);
        let iv = TimeDelta::minutes(60);
        let d = [Some(0.0), Some(20.0), Some(50.0), Some(90.0)];
        let needed = oracle_replicas(&d, 10.0, TimeDelta::zero(), iv);
        assert_eq!(needed, [0, 2, 5, 9]);
        assert!((replica_hours(needed.iter().map(|n| b.clamp(*n)), iv) - 17.0).abs() < 1e-9);
        assert!(
            (oracle_unbounded_replica_hours(&d, 10.0, TimeDelta::zero(), iv) - 16.0).abs() < 1e-9
        );
    }

    #[test]
    fn bounded_oracle_goes_idle_only_where_the_policy_can() {
        // minReplicas 0: idle at 0, at least 1 while anything is needed.
        let p = policy("  minReplicas: 0\n  maxReplicas: 4\n");
        let b = ReplicaBounds::at(&p, DateTime::from_timestamp(0, 0).expect("epoch"));
        assert_eq!([0, 1, 3, 7].map(|n| b.clamp(n)), [0, 1, 3, 4]);
        // idleReplicas 1 under minReplicas 2.
        let p = policy("  minReplicas: 2\n  idleReplicas: 1\n  maxReplicas: 4\n");
        let b = ReplicaBounds::at(&p, DateTime::from_timestamp(0, 0).expect("epoch"));
        assert_eq!([0, 1, 3].map(|n| b.clamp(n)), [1, 2, 3]);
    }

    #[test]
    fn bounded_oracle_follows_an_open_schedule() {
        // A schedule open all day raises the floor to 5 and wins over the idle count.
        let p = policy(
            "  minReplicas: 0\n  maxReplicas: 8\n  schedules:\n  - {cron: \"0 0 * * *\", duration: 24h, minReplicas: 5}\n",
        );
        let t = DateTime::parse_from_rfc3339("2026-01-02T12:00:00Z")
            .expect("time")
            .with_timezone(&Utc);
        let b = ReplicaBounds::at(&p, t);
        assert_eq!([0, 7, 9].map(|n| b.clamp(n)), [5, 7, 8]);
    }
}
