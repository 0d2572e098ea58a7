//! The evaluation core: one pure, deterministic function from (policy, observation, state, now)
//! to a [`Decision`]. No I/O, no clock reads, no randomness. The controller, the metrics adapter
//! and the backtest all call [`evaluate`].
//!
//! In its default (HPA-compatible) form the arithmetic is the HorizontalPodAutoscaler
//! controller's: per-metric proposals, the max across metrics, no scale-down on partial data,
//! direct clamps when the current count is outside the bounds, then stabilization, rate limits
//! and bounds. On top: the CEL formula, schedules and the failure fallback.

pub mod behavior;
pub mod compile;
#[cfg(test)]
mod controls_tests;
pub mod external_names;
pub mod forecast;
pub mod formula;
pub mod formula_cost;
pub mod promql;
pub mod replicas;
pub mod schedule;
pub use crate::state;
pub mod zero;

use std::fmt::{self, Write as _};

use chrono::{DateTime, Utc};

pub use compile::{
    CompiledMetric, CompiledPolicy, FailureAction, FieldError, MetricSource, Pause, Target,
    ValidationErrors, compile_spec,
};
pub use state::PolicyState;

use crate::model::{DecisionCondition, Observation, Sample};
use behavior::{Limit, Normalized, Stabilization};
use forecast::Prediction;
use replicas::ResourceTarget;

/// How usable one metric's sample was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricState {
    /// A number the evaluator used.
    Valid,
    /// No data (empty result, no sample).
    Missing,
    /// Data older than the staleness bound.
    Stale,
    /// NaN, infinite, or unusable for the target (for example no ready pods).
    Invalid,
    /// The source failed.
    Error,
    /// A number from an answer that says it is incomplete (Prometheus `warnings`): its proposal
    /// may hold or raise the count, never lower it.
    Partial,
    /// A resource metric of a target at 0 replicas: there are no pods to measure, which is
    /// what an idle target is, not a failure. It is inactive, proposes nothing and never
    /// counts as failing (no degraded condition, no failure count, no Warning event).
    NoPods,
}

impl MetricState {
    /// The sample gave a number the evaluator used: complete, or partial (which may hold or raise
    /// the count, never lower it).
    pub fn gave_value(self) -> bool {
        matches!(self, MetricState::Valid | MetricState::Partial)
    }

    /// Nothing is wrong with the data: a complete number, or no pods to measure at 0 replicas.
    /// Only metrics in such a state let a proposal lower the count.
    pub fn is_complete(self) -> bool {
        matches!(self, MetricState::Valid | MetricState::NoPods)
    }

    /// The metric failed (missing, stale, invalid or an error): it proposes nothing, counts toward
    /// `fallback.failureThreshold` and the degraded condition, and is reported in a Warning event
    /// and in `kscale_source_errors_total`. Partial data and `NoPods` are not failures.
    pub fn is_failure(self) -> bool {
        !matches!(
            self,
            MetricState::Valid | MetricState::Partial | MetricState::NoPods
        )
    }

    /// The state as a predicate for a sentence about the metric: `failed`, `is missing`,
    /// `is stale`, `is invalid` (NaN or infinite), `is partial`, `has no pods`, `is valid`.
    pub fn described(self) -> &'static str {
        match self {
            MetricState::Valid => "is valid",
            MetricState::Missing => "is missing",
            MetricState::Stale => "is stale",
            MetricState::Invalid => "is invalid",
            MetricState::Error => "failed",
            MetricState::Partial => "is partial",
            MetricState::NoPods => "has no pods",
        }
    }

    /// The name used in status and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricState::Valid => "Valid",
            MetricState::Missing => "Missing",
            MetricState::Stale => "Stale",
            MetricState::Invalid => "Invalid",
            MetricState::Error => "Error",
            MetricState::Partial => "Partial",
            MetricState::NoPods => "NoPods",
        }
    }
}

/// What one metric contributed.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricOutcome {
    /// Usable or why not.
    pub state: MetricState,
    /// The value: sum of series (Prometheus), utilization percent or average usage (resource).
    pub value: Option<f64>,
    /// Replicas this metric proposes.
    pub proposal: Option<i32>,
    /// Why the metric is not usable.
    pub message: Option<String>,
    /// The forecast and the replicas it proposes, when `spec.forecast` made one.
    pub forecast: Option<(Prediction, i32)>,
    /// How many series were summed into the value (Prometheus metrics with a value).
    pub series: Option<usize>,
}

impl MetricOutcome {
    /// The forecast as reasons show it, the point forecast and the upper bound sized for
    /// (the point plus the headroom): `HoltWinters forecast 480 in 60s, upper bound 530 → 6`.
    /// Where the forecast decided the metric's proposal and its headroom is above 0, the upper
    /// bound decided, not the point forecast (which may be below the current value), and the
    /// note leads with it: `upper bound 530 of the HoltWinters forecast 480 in 60s → 6`.
    pub fn forecast_note(&self) -> Option<String> {
        self.forecast.map(|(f, p)| {
            let (model, point, upper) = (f.model.as_str(), Num(f.point), Num(f.upper));
            let horizon = f.horizon.num_seconds();
            if self.proposal == Some(p) && f.upper > f.point {
                format!("upper bound {upper} of the {model} forecast {point} in {horizon}s → {p}")
            } else {
                format!("{model} forecast {point} in {horizon}s, upper bound {upper} → {p}")
            }
        })
    }

    fn failed(state: MetricState, message: String) -> MetricOutcome {
        MetricOutcome {
            state,
            value: None,
            proposal: None,
            message: Some(message),
            forecast: None,
            series: None,
        }
    }
}

/// Which rule produced the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The target runs 0 replicas and `minReplicas` is not 0: autoscaling is off, as in the HPA.
    ScalingDisabled,
    /// Current count above the (effective) maximum: clamped directly.
    AboveMax,
    /// Current count below the (effective) minimum: clamped directly.
    BelowMin,
    /// The metrics' proposals, combined by max; `Some(i)` names the winning metric.
    Metrics(Option<usize>),
    /// The CEL formula.
    Formula,
    /// Metrics failed and the fallback decided (or, before `failureThreshold` consecutive
    /// failures, held the count).
    Fallback(FailureAction),
    /// `spec.paused`, `spec.pausedReplicas` or a freeze overrode the evaluated count.
    Paused(Pause),
    /// The target is at 0, set there by someone other than kscale (`minReplicas: 0`): it stays.
    PausedAtZero,
    /// No metric is active: the idle count (held, or gone down to under `behavior.scaleDown`).
    Idle,
}

/// What a pause overrode: the evaluation's own result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paused {
    /// The pause in force.
    pub pause: Pause,
    /// The count the evaluation decided before the pause.
    pub evaluated: i32,
    /// The rule that decided it.
    pub rule: Rule,
}

/// The result of one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The replica count to run.
    pub replicas: i32,
    /// The count the target ran (`scale.spec.replicas`).
    pub current: i32,
    /// The combined proposal before stabilization and limits, when metrics decided.
    pub proposal: Option<i32>,
    /// The rule that decided.
    pub rule: Rule,
    /// Per-metric outcomes, in spec order.
    pub metrics: Vec<MetricOutcome>,
    /// Stabilization and limits, when they ran.
    pub normalized: Option<Normalized>,
    /// Effective bounds (after schedules).
    pub min_replicas: i32,
    /// Effective upper bound.
    pub max_replicas: i32,
    /// The schedules that set the bounds, if any was open.
    pub schedule: ScheduleBounds,
    /// Some metric was not valid.
    pub degraded: bool,
    /// The formula failed (its error), when there is one.
    pub formula_error: Option<String>,
    /// The pause in force and what it overrode, when the policy is paused.
    pub paused: Option<Paused>,
    /// The state to keep for the next evaluation.
    pub state: PolicyState,
    /// With `minReplicas: 0` or `idleReplicas`: activity and phase.
    pub zero: Option<zero::ZeroDecision>,
}

/// Which schedules set the bounds in force, for the reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScheduleBounds {
    /// The first active schedule, if any is open.
    pub active: Option<usize>,
    /// The schedule whose floor applies (the highest; the first of equal ones).
    pub floor: Option<usize>,
    /// The schedule whose ceiling applies (the lowest; the first of equal ones).
    pub ceiling: Option<usize>,
    /// A ceiling the floor overrode: the lowest ceiling when it was under the floor.
    pub overridden_ceiling: Option<i32>,
    /// The highest floor of the open schedules, even one at or under `spec.minReplicas` (with
    /// scale to zero, an idle target still keeps it).
    pub open_floor: Option<i32>,
}

/// The bounds in force at `now`: the spec's, raised by the highest open floor and lowered by the
/// lowest open ceiling; a ceiling under the floor gives way to the floor (and the reason says so).
/// Public for the backtest's bounded oracle, which must respect the same bounds.
pub fn effective_bounds(policy: &CompiledPolicy, now: DateTime<Utc>) -> (i32, i32, ScheduleBounds) {
    let mut min = policy.min_replicas;
    let mut max = policy.max_replicas;
    let mut by = ScheduleBounds::default();
    for (i, s) in policy.schedules.iter().enumerate() {
        if !s.is_active(now) {
            continue;
        }
        by.active.get_or_insert(i);
        by.open_floor = by.open_floor.max(s.min_replicas);
        if let Some(m) = s.min_replicas.filter(|m| *m > min) {
            min = m;
            by.floor = Some(i);
        }
        if let Some(m) = s.max_replicas.filter(|m| *m < max) {
            max = m;
            by.ceiling = Some(i);
        }
    }
    if max < min {
        by.overridden_ceiling = Some(max);
        max = min;
    }
    (min, max, by)
}

fn metric_outcome(
    policy: &CompiledPolicy,
    metric: &CompiledMetric,
    sample: Option<&Sample>,
    forecast: Option<Prediction>,
    obs: &Observation,
    now: DateTime<Utc>,
) -> MetricOutcome {
    let tol = policy.tolerances;
    match sample {
        None => MetricOutcome::failed(MetricState::Missing, "no sample was taken".into()),
        Some(Sample::Missing { reason }) => {
            MetricOutcome::failed(MetricState::Missing, reason.clone())
        }
        Some(Sample::Error { message }) => {
            MetricOutcome::failed(MetricState::Error, message.clone())
        }
        Some(Sample::Series { values, timestamp }) => {
            series_outcome(policy, metric, values, *timestamp, forecast, obs, now)
        }
        Some(Sample::Partial {
            values,
            timestamp,
            warnings,
        }) => {
            let mut outcome =
                series_outcome(policy, metric, values, *timestamp, forecast, obs, now);
            if outcome.state == MetricState::Valid {
                outcome.state = MetricState::Partial;
                outcome.message = Some(crate::model::partial_note(*warnings));
            } else if let Some(m) = &mut outcome.message {
                m.push(' ');
                m.push_str(&crate::model::partial_note(*warnings));
            }
            outcome
        }
        Some(Sample::Pods(pods)) => {
            let (is_cpu, target) = match (&metric.source, metric.target) {
                (MetricSource::Resource { cpu, .. }, Target::Utilization(u)) => {
                    (*cpu, ResourceTarget::Utilization(u))
                }
                (
                    source @ (MetricSource::Resource { .. } | MetricSource::Pods { .. }),
                    Target::AverageValue(v),
                ) => {
                    // compile.rs keeps per-pod targets within the pods' i64 milli-values. A pods
                    // metric follows the HPA's GetMetricReplicas: the plain average with the
                    // missing- and unready-pod rules, no CPU readiness rules.
                    let cpu = matches!(source, MetricSource::Resource { cpu: true, .. });
                    match i64::try_from(v) {
                        Ok(v) => (cpu, ResourceTarget::AverageMilli(v)),
                        Err(_) => {
                            return MetricOutcome::failed(
                                MetricState::Invalid,
                                "the target is above the largest per-pod usage in milli-units"
                                    .into(),
                            );
                        }
                    }
                }
                _ => return MetricOutcome::failed(
                    MetricState::Invalid,
                    "pod samples need a resource metric (Utilization or AverageValue target) or a pods metric (AverageValue)"
                        .into(),
                ),
            };
            match replicas::resource(
                pods,
                is_cpu,
                target,
                obs.spec_replicas,
                tol,
                now,
                policy.readiness,
            ) {
                Ok(p) => MetricOutcome {
                    state: MetricState::Valid,
                    value: Some(p.value),
                    proposal: Some(p.replicas),
                    message: None,
                    forecast: None,
                    series: None,
                },
                Err(message) => MetricOutcome::failed(MetricState::Invalid, message),
            }
        }
    }
}

/// The outcome of a Prometheus (or trace) series: staleness, emptiness, non-finite values, then
/// the HPA's arithmetic for the target, and the forecast on top.
fn series_outcome(
    policy: &CompiledPolicy,
    metric: &CompiledMetric,
    values: &[f64],
    timestamp: DateTime<Utc>,
    forecast: Option<Prediction>,
    obs: &Observation,
    now: DateTime<Utc>,
) -> MetricOutcome {
    let tol = policy.tolerances;
    let age = now.signed_duration_since(timestamp);
    if age > policy.stale_after {
        return MetricOutcome::failed(
            MetricState::Stale,
            format!(
                "sample is {}s old, older than the {}s staleness bound",
                age.num_seconds(),
                policy.stale_after.num_seconds()
            ),
        );
    }
    if values.is_empty() {
        return MetricOutcome::failed(MetricState::Missing, "query returned no series".into());
    }
    if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
        return MetricOutcome::failed(MetricState::Invalid, format!("query returned {bad}"));
    }
    let value: f64 = values.iter().sum();
    let propose = |values: &[f64]| match metric.target {
        Target::Value(t) => replicas::external_value(
            replicas::sum_milli_value(values)?,
            t,
            obs.spec_replicas,
            obs.ready_replicas,
            obs.pods,
            tol,
        ),
        // An Object metric is one value: the HPA's GetObjectPerPodMetricReplicas has no
        // overflow rule for a negative one (the External sum's).
        Target::AverageValue(t) => Ok(replicas::external_average(
            if matches!(metric.source, MetricSource::Object { .. }) {
                replicas::sum_milli_value(values)?
            } else {
                replicas::sum_milli_average(values)?
            },
            t,
            obs.status_replicas,
            tol,
        )),
        Target::Utilization(_) => Err("Utilization needs a resource metric".into()),
    };
    let proposal = match propose(values) {
        Ok(p) => p,
        Err(message) => return MetricOutcome::failed(MetricState::Invalid, message),
    };
    // The forecast only ever adds: the proposal is at least what current demand needs.
    let forecast = policy
        .forecast
        .and(forecast)
        .filter(|f| f.upper.is_finite())
        .and_then(|f| propose(&[f.upper]).ok().map(|p| (f, p)));
    MetricOutcome {
        state: MetricState::Valid,
        value: Some(value),
        proposal: Some(forecast.map_or(proposal, |(_, p)| p.max(proposal))),
        message: None,
        forecast,
        series: Some(values.len()),
    }
}

/// Evaluates `policy` against `obs` at `now`, starting from `state`.
///
/// Pure and deterministic. The returned decision carries the next state; after the decision is
/// acted on (the target rescaled), record it with [`PolicyState::record_scale`] through
/// [`Decision::record_applied`]. A pause (`spec.paused*`) is the last step, over what the
/// metrics decided ([`apply_pause`]).
pub fn evaluate(
    policy: &CompiledPolicy,
    obs: &Observation,
    state: &PolicyState,
    now: DateTime<Utc>,
) -> Decision {
    let mut decision = evaluate_metrics(policy, obs, state, now);
    if let Some(pause) = policy.pause {
        apply_pause(&mut decision, pause);
    }
    decision
}

/// The last step of an evaluation: a pause overrides the evaluated count. `Hold` keeps the
/// current count and `Pin(n)` sets `n` (both always decide); `ScaleIn` never lowers the count
/// and `ScaleOut` never raises it (they decide only where they bind). The state (the
/// recommendations, the failure count) is the evaluation's, so the stabilization window goes
/// on as if nothing were paused.
pub fn apply_pause(decision: &mut Decision, pause: Pause) {
    let evaluated = decision.replicas;
    let current = decision.current;
    let replicas = match pause {
        Pause::Hold => current,
        Pause::Pin(n) => n,
        Pause::ScaleIn => evaluated.max(current),
        Pause::ScaleOut => evaluated.min(current),
    };
    decision.paused = Some(Paused {
        pause,
        evaluated,
        rule: decision.rule,
    });
    if matches!(pause, Pause::Hold | Pause::Pin(_)) || replicas != evaluated {
        decision.rule = Rule::Paused(pause);
        decision.replicas = replicas;
    }
}

/// Consecutive failed evaluations including this one, counted up to `threshold` (so a lasting
/// failure leaves the count, and the status, unchanged).
fn failure_count(state: &PolicyState, failing: bool, threshold: i32) -> i32 {
    if failing {
        state
            .consecutive_failures
            .max(0)
            .saturating_add(1)
            .min(threshold.max(1))
    } else {
        0
    }
}

fn evaluate_metrics(
    policy: &CompiledPolicy,
    obs: &Observation,
    state: &PolicyState,
    now: DateTime<Utc>,
) -> Decision {
    let current = obs.spec_replicas;
    let (min, max, schedule) = effective_bounds(policy, now);
    let mut next = state.clone();
    if next.recommendations.is_empty() {
        next.record_recommendation(current, now, None);
    }
    let metrics: Vec<MetricOutcome> = policy
        .metrics
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let forecast = obs.forecasts.get(i).copied().flatten();
            metric_outcome(policy, m, obs.samples.get(i), forecast, obs, now)
        })
        .collect();
    // A target at 0 runs no pods: its resource metrics have nothing to measure.
    let mut metrics = metrics;
    if current == 0 {
        for (m, o) in policy.metrics.iter().zip(metrics.iter_mut()) {
            if m.source.per_pod() {
                *o = MetricOutcome::failed(
                    MetricState::NoPods,
                    "no pods to measure at 0 replicas".into(),
                );
            }
        }
    }
    // Metrics without a usable number, and those whose number may be too low (partial data):
    // either kind forbids a scale-down.
    let invalid = metrics.iter().filter(|m| !m.state.is_complete()).count();
    let unusable = metrics.iter().filter(|m| m.state.is_failure()).count();
    // A failed evaluation: a metric not valid (or, below, the formula failing).
    next.consecutive_failures = failure_count(state, invalid > 0, policy.failure_threshold);
    let mut decision = Decision {
        replicas: current,
        current,
        proposal: None,
        rule: Rule::Metrics(None),
        metrics,
        normalized: None,
        min_replicas: min,
        max_replicas: max,
        schedule,
        degraded: invalid > 0,
        formula_error: None,
        paused: None,
        state: next,
        zero: None,
    };

    // As in the HPA, a target at 0 turns autoscaling off, unless the policy itself may idle at 0
    // (`spec.minReplicas`, not a schedule's floor, says so).
    if current == 0 && policy.min_replicas != 0 && policy.zero.is_none_or(|z| z.idle != 0) {
        decision.rule = Rule::ScalingDisabled;
        decision.replicas = 0;
        return decision;
    }
    let mut min = min;
    let mut zero_plan = None;
    if let Some(z) = policy.zero {
        let (status, plan) = zero::plan(
            policy,
            z,
            &decision.metrics,
            &mut decision.state,
            current,
            zero::Floors {
                min,
                schedule: schedule.open_floor,
            },
            now,
        );
        decision.zero = Some(status);
        match plan {
            zero::Plan::Now(replicas, rule) => {
                decision.rule = rule;
                decision.replicas = replicas.min(max);
                return decision;
            }
            zero::Plan::Evaluate { floor, wake, idle } => {
                min = floor.min(max);
                decision.min_replicas = min;
                zero_plan = Some((wake, idle));
            }
        }
    }
    let waking = zero_plan.is_some_and(|(wake, _)| wake);
    if current > max {
        decision.rule = Rule::AboveMax;
        decision.replicas = max;
        return decision;
    }
    if current < min && !waking {
        decision.rule = Rule::BelowMin;
        decision.replicas = min;
        return decision;
    }

    // Combine the valid proposals: the formula, or the max as the HPA does (first metric wins ties).
    // A metric without a usable number is absent from the formula, which may route around it.
    let (raw, rule) = match &policy.formula {
        Some(formula) => {
            let present: Vec<Option<(i32, f64)>> = decision
                .metrics
                .iter()
                .map(|m| match (m.state, m.proposal, m.value) {
                    (state, Some(p), Some(v)) if state.gave_value() => Some((p, v)),
                    _ => None,
                })
                .collect();
            match formula.evaluate_present(&present, current, obs.ready_replicas) {
                Ok(r) => (Some(r), Rule::Formula),
                Err(e) => {
                    decision.formula_error = Some(absent_note(e, policy, &present));
                    decision.state.consecutive_failures =
                        failure_count(state, true, policy.failure_threshold);
                    (None, Rule::Formula)
                }
            }
        }
        None => {
            let mut best: Option<(i32, usize)> = None;
            for (i, m) in decision.metrics.iter().enumerate() {
                if let Some(p) = m.proposal
                    && best.is_none_or(|(b, _)| p > b)
                {
                    best = Some((p, i));
                }
            }
            (best.map(|(p, _)| p), Rule::Metrics(best.map(|(_, i)| i)))
        }
    };

    // Never scale down on partial data; the fallback decides instead. A formula may, when it
    // tests the presence of every metric that failed (its author routed around them), no
    // number is partial and some metric has a number.
    let may_scale_down = match &policy.formula {
        Some(f) => {
            unusable < decision.metrics.len()
                && decision.metrics.iter().zip(&policy.metrics).all(|(o, m)| {
                    o.state.is_complete() || (o.state.is_failure() && f.tests_presence_of(&m.name))
                })
        }
        None => invalid == 0,
    };
    let failed = match raw {
        None => true,
        Some(r) => r < current && !may_scale_down,
    };
    // The fallback applies from the `failureThreshold`-th consecutive failure; before, hold.
    let fallback_applies = decision.state.consecutive_failures >= policy.failure_threshold;
    if failed {
        decision.rule = Rule::Fallback(policy.on_failure);
        decision.proposal = raw;
        decision.replicas = match policy.on_failure {
            FailureAction::Replicas(n) if n > current && fallback_applies => n.min(max),
            _ => current,
        };
        if waking {
            // An active metric is work to do, whatever the others say.
            decision.replicas = decision.replicas.max(min);
        }
        return decision;
    }
    let mut raw = raw.unwrap_or(current).max(0);
    if let (true, true, FailureAction::Replicas(n)) =
        (invalid > 0, fallback_applies, policy.on_failure)
    {
        raw = raw.max(n);
    }
    // A formula routing around a failed metric never takes a running target to 0.
    if unusable > 0 && current > 0 {
        raw = raw.max(1);
    }
    decision.rule = rule;
    match zero_plan {
        Some((true, _)) => raw = raw.max(min),
        Some((_, true)) => {
            raw = min;
            decision.rule = Rule::Idle;
        }
        _ => {}
    }
    decision.proposal = Some(raw);
    let normalized = match &policy.behavior {
        Some(b) => {
            behavior::normalize_with_behavior(b, &mut decision.state, current, raw, min, max, now)
        }
        None => behavior::normalize_legacy(
            policy.downscale_window,
            &mut decision.state,
            current,
            raw,
            min,
            max,
            now,
        ),
    };
    decision.replicas = normalized.replicas;
    if waking {
        // Waking is a direct clamp to the active floor, as the HPA's below-minReplicas one is.
        decision.replicas = decision.replicas.max(min);
    }
    decision.normalized = Some(normalized);
    decision
}

/// A formula error, with the metrics the formula saw as absent named (it read one without
/// `has(values.<name>)`, most likely).
fn absent_note(error: String, policy: &CompiledPolicy, present: &[Option<(i32, f64)>]) -> String {
    let absent: Vec<&str> = policy
        .metrics
        .iter()
        .zip(present)
        .filter(|(_, p)| p.is_none())
        .map(|(m, _)| m.name.as_str())
        .collect();
    if absent.is_empty() {
        return error;
    }
    // The usual case: the formula read a metric that failed. Say that, not the CEL error.
    if let Some(name) = absent
        .iter()
        .find(|n| error.contains(&format!("Undeclared reference to '{n}'")))
    {
        return format!(
            "reads metric {name}, which has no value at this evaluation ({} failed), so the fallback decides; a formula that tests has(values.{name}) can go on without it",
            absent.join(", ")
        );
    }
    format!(
        "{error} (absent from the formula because they failed: {}; test them with has(values.<name>))",
        absent.join(", ")
    )
}

impl Decision {
    /// The rule the metrics decided by, under any pause.
    pub fn evaluated_rule(&self) -> Rule {
        self.paused.map_or(self.rule, |p| p.rule)
    }

    /// Whether a metric's number came from a partial answer ([`MetricState::Partial`]).
    pub fn has_partial(&self) -> bool {
        self.metrics.iter().any(|m| m.state == MetricState::Partial)
    }

    /// Records in the state that the decision was carried out at `now` (the target now runs
    /// `self.replicas`), so rate limits count it. Only policies with `behavior` keep scale
    /// events, as in the HPA; every policy keeps the last scale time.
    pub fn record_applied(&mut self, policy: &CompiledPolicy, now: DateTime<Utc>) {
        if self.replicas == self.current {
            return;
        }
        match &policy.behavior {
            Some(b) => self.state.record_scale(
                self.current,
                self.replicas,
                now,
                b.up.longest_period(),
                b.down.longest_period(),
            ),
            None => self.state.last_scale_time = Some(now),
        }
        // kscale's own zero, told apart from one someone else set.
        self.state.scaled_to_zero_time = (self.replicas == 0).then_some(now);
    }

    /// The HPA-style conditions of this decision.
    pub fn conditions(&self) -> Vec<DecisionCondition> {
        let mut out = Vec::with_capacity(4);
        let able = match self.normalized.map(|n| n.stabilization) {
            Some(Stabilization::ScaleUpStabilized) => DecisionCondition {
                type_: "AbleToScale",
                status: true,
                reason: "ScaleUpStabilized",
                message: "recent recommendations were lower than current one, applying the lowest recent recommendation",
            },
            Some(Stabilization::ScaleDownStabilized) => DecisionCondition {
                type_: "AbleToScale",
                status: true,
                reason: "ScaleDownStabilized",
                message: "recent recommendations were higher than current one, applying the highest recent recommendation",
            },
            // The HPA writes "recommended size matches current size" here whatever the sizes;
            // kscale says so only when they match.
            _ if self.replicas == self.current => DecisionCondition {
                type_: "AbleToScale",
                status: true,
                reason: "ReadyForNewScale",
                message: "recommended size matches current size",
            },
            _ => DecisionCondition {
                type_: "AbleToScale",
                status: true,
                reason: "ReadyForNewScale",
                message: "no stabilization window holds the recommendation back",
            },
        };
        out.push(able);
        out.push(match self.evaluated_rule() {
            Rule::ScalingDisabled | Rule::PausedAtZero => DecisionCondition {
                type_: "ScalingActive",
                status: false,
                reason: "ScalingDisabled",
                message: "scaling is disabled since the replica count of the target is zero",
            },
            // Held at the idle count because some metric failed: as the fallback does.
            _ if matches!(self.rule, Rule::Fallback(_))
                || (self.rule == Rule::Idle && self.data_unknown()) =>
            {
                DecisionCondition {
                    type_: "ScalingActive",
                    status: false,
                    reason: "FailedGetMetrics",
                    message: "the metrics needed for a decision are missing, stale or invalid; the fallback applies",
                }
            }
            _ => DecisionCondition {
                type_: "ScalingActive",
                status: true,
                reason: "ValidMetricFound",
                message: "the replica count was calculated from valid metrics",
            },
        });
        let limit = self.normalized.map_or(
            match self.evaluated_rule() {
                Rule::AboveMax => Limit::TooManyReplicas,
                Rule::BelowMin => Limit::TooFewReplicas,
                _ => Limit::DesiredWithinRange,
            },
            |n| n.limit,
        );
        out.push(DecisionCondition {
            type_: "ScalingLimited",
            status: limit != Limit::DesiredWithinRange,
            reason: limit.reason(),
            message: limit.message(),
        });
        out.push(if self.degraded {
            DecisionCondition {
                type_: "MetricsAvailable",
                status: false,
                reason: "MetricsDegraded",
                message: "some metrics are missing, stale, invalid or failing",
            }
        } else {
            DecisionCondition {
                type_: "MetricsAvailable",
                status: true,
                reason: "AllMetricsValid",
                message: "every metric returned a valid, fresh value",
            }
        });
        out.push(self.pause_condition());
        out.extend(self.zero_condition());
        out
    }

    /// The `Paused` condition: which of `spec.paused*` is in force, if any.
    pub fn pause_condition(&self) -> DecisionCondition {
        let (status, reason, message) = match self.paused.map(|p| p.pause) {
            None => (
                false,
                "NotPaused",
                "no spec.paused* field is set; kscale scales the target",
            ),
            Some(Pause::Hold) => (
                true,
                "Paused",
                "spec.paused holds the current replica count",
            ),
            Some(Pause::Pin(_)) => (
                true,
                "PinnedReplicas",
                "spec.pausedReplicas pins the replica count",
            ),
            Some(Pause::ScaleIn) => (
                true,
                "ScaleInFrozen",
                "spec.pausedScaleIn lets the replica count hold or rise, never fall",
            ),
            Some(Pause::ScaleOut) => (
                true,
                "ScaleOutFrozen",
                "spec.pausedScaleOut lets the replica count hold or fall, never rise",
            ),
        };
        DecisionCondition {
            type_: "Paused",
            status,
            reason,
            message,
        }
    }

    /// One line a person can read: the values, the proposals, which rule won and what clipped it.
    pub fn reason(&self, policy: &CompiledPolicy) -> String {
        let mut s = String::with_capacity(160);
        // Writing to a String cannot fail.
        let _ = match self.paused {
            Some(p) => self.write_paused_reason(policy, p, &mut s),
            None => self.write_reason(policy, &mut s),
        };
        s
    }

    /// A paused decision's reason: what the pause did, then what the evaluation alone decided.
    fn write_paused_reason(
        &self,
        policy: &CompiledPolicy,
        p: Paused,
        s: &mut String,
    ) -> fmt::Result {
        let evaluated = Decision {
            replicas: p.evaluated,
            rule: p.rule,
            paused: None,
            ..self.clone()
        };
        if self.rule != Rule::Paused(p.pause) {
            // A freeze that does not bind: the evaluation decided.
            evaluated.write_reason(policy, s)?;
            let field = match p.pause {
                Pause::ScaleOut => "spec.pausedScaleOut freezes scale-out",
                _ => "spec.pausedScaleIn freezes scale-in",
            };
            return write!(s, "; {field}, not binding");
        }
        let verb = match self.replicas.cmp(&self.current) {
            std::cmp::Ordering::Greater => "scale up",
            std::cmp::Ordering::Less => "scale down",
            std::cmp::Ordering::Equal => "hold",
        };
        write!(s, "{verb} {}→{}: ", self.current, self.replicas)?;
        match p.pause {
            Pause::Hold => write!(s, "paused by spec.paused, holding the current count")?,
            Pause::Pin(n) => write!(s, "pinned to {n} by spec.pausedReplicas")?,
            Pause::ScaleIn => write!(s, "scale-in frozen by spec.pausedScaleIn")?,
            Pause::ScaleOut => write!(s, "scale-out frozen by spec.pausedScaleOut")?,
        }
        s.push_str("; without the pause: ");
        evaluated.write_reason(policy, s)
    }

    fn write_reason(&self, policy: &CompiledPolicy, s: &mut String) -> fmt::Result {
        let verb = match self.replicas.cmp(&self.current) {
            std::cmp::Ordering::Greater => "scale up",
            std::cmp::Ordering::Less => "scale down",
            std::cmp::Ordering::Equal => "hold",
        };
        write!(s, "{verb} {}→{}", self.current, self.replicas)?;
        match self.rule {
            Rule::ScalingDisabled => {
                return write!(
                    s,
                    ": target runs 0 replicas and minReplicas is {}, autoscaling is off until it is scaled up",
                    self.min_replicas
                );
            }
            Rule::AboveMax => {
                write!(
                    s,
                    ": current count is above maxReplicas {}",
                    self.max_replicas
                )?;
                return self.write_schedule(policy, s);
            }
            Rule::BelowMin => {
                write!(
                    s,
                    ": current count is below minReplicas {}",
                    self.min_replicas
                )?;
                return self.write_schedule(policy, s);
            }
            Rule::PausedAtZero => return self.write_zero(policy, s),
            Rule::Idle if self.normalized.is_none() => {
                write!(s, ": ")?;
                self.write_values(policy, s)?;
                self.write_zero(policy, s)?;
                return self.write_schedule(policy, s);
            }
            _ => {}
        }
        s.push_str(": ");
        self.write_values(policy, s)?;
        self.write_rule(policy, s)?;
        self.write_zero(policy, s)?;
        self.write_schedule(policy, s)
    }

    /// Each metric's value, target and proposal, or why it is unusable.
    fn write_values(&self, policy: &CompiledPolicy, s: &mut String) -> fmt::Result {
        for (i, (m, o)) in policy.metrics.iter().zip(&self.metrics).enumerate() {
            if i > 0 {
                s.push_str(", ");
            }
            match (o.value, o.proposal) {
                (Some(v), Some(p)) => {
                    write!(s, "{}={}", m.name, Num(v))?;
                    let sum = match o.series {
                        Some(n) if n > 1 => format!("sum of {n} series, "),
                        _ => String::new(),
                    };
                    match m.target {
                        Target::Value(t) => write!(s, " ({sum}target {})", Milli(t))?,
                        Target::AverageValue(t) => {
                            write!(s, " ({sum}target {}/replica)", Milli(t))?
                        }
                        Target::Utilization(u) => write!(s, "% (target {u}%)")?,
                    }
                    write!(s, " → {p}")?;
                    if let Some(note) = o.forecast_note() {
                        write!(s, " ({note})")?;
                    }
                    if o.state == MetricState::Partial {
                        write!(s, " {}", o.message.as_deref().unwrap_or("(partial data)"))?;
                    }
                }
                _ => write!(
                    s,
                    "{} {}: {}",
                    m.name,
                    o.state.as_str().to_lowercase(),
                    o.message.as_deref().unwrap_or("unusable")
                )?,
            }
        }
        Ok(())
    }

    /// The rule that decided and what clipped it.
    fn write_rule(&self, policy: &CompiledPolicy, s: &mut String) -> fmt::Result {
        match self.rule {
            Rule::Fallback(action) => {
                match (&self.formula_error, policy.formula.is_some()) {
                    (Some(e), _) => write!(s, "; formula {e}")?,
                    (None, true) if self.metrics.iter().all(|m| !m.state.gave_value()) => write!(
                        s,
                        "; formula → {} would scale down, which kscale never does with no metric valid",
                        self.proposal.unwrap_or(0)
                    )?,
                    (None, true) => write!(
                        s,
                        "; formula → {} would scale down, which kscale does not do while {} {} unless the formula tests has(values.<name>) for each failed metric",
                        self.proposal.unwrap_or(0),
                        self.names_where(policy, |o, m| o.state == MetricState::Partial
                            || (o.state != MetricState::Valid
                                && !policy
                                    .formula
                                    .as_ref()
                                    .is_some_and(|f| f.tests_presence_of(&m.name)))),
                        if self.has_partial() {
                            "failed or is partial"
                        } else {
                            "failed"
                        }
                    )?,
                    (None, _) if self.proposal.is_some() && self.has_partial() => s.push_str(
                        "; the metrics would scale down, which kscale never does on partial data",
                    ),
                    (None, false) if self.proposal.is_some() => s.push_str(
                        "; valid metrics alone would scale down, which partial data never does",
                    ),
                    _ => s.push_str("; no valid metric"),
                }
                let failures = self.state.consecutive_failures;
                match action {
                    _ if failures < policy.failure_threshold => write!(
                        s,
                        "; failure {failures} of {}: the fallback applies at {}, holding until then",
                        policy.failure_threshold, policy.failure_threshold
                    )?,
                    FailureAction::Hold => s.push_str("; fallback Hold keeps the current count"),
                    FailureAction::Replicas(n) if self.replicas > self.current => {
                        write!(s, "; fallback goes up to {n} replicas")?
                    }
                    FailureAction::Replicas(n) => write!(
                        s,
                        "; fallback of {n} replicas is not above the current count, holding"
                    )?,
                }
            }
            Rule::Formula => write!(
                s,
                "; formula {:?} → {}",
                policy.formula.as_ref().map_or("", |f| f.source()),
                self.proposal.unwrap_or(0)
            )?,
            Rule::Metrics(Some(i)) if policy.metrics.len() > 1 => {
                write!(
                    s,
                    "; max → {} ({})",
                    self.proposal.unwrap_or(0),
                    policy.metrics[i].name
                )?;
            }
            _ => {}
        }
        let only_partial = self.metrics.iter().all(|m| m.state.gave_value());
        if self.has_partial() && !matches!(self.rule, Rule::Fallback(_)) {
            s.push_str("; partial data may raise the count, never lower it");
        }
        if self.degraded && !only_partial && !matches!(self.rule, Rule::Fallback(_)) {
            if self.rule == Rule::Formula {
                write!(
                    s,
                    "; the formula ran without {} (absent)",
                    self.names_where(policy, |o, _| !matches!(
                        o.state,
                        MetricState::Valid | MetricState::Partial
                    ))
                )?;
            }
            let failures = self.state.consecutive_failures;
            match policy.on_failure {
                FailureAction::Replicas(_) if failures < policy.failure_threshold => write!(
                    s,
                    "; some metrics failed (failure {failures} of {}, no fallback floor yet)",
                    policy.failure_threshold
                )?,
                FailureAction::Replicas(n) => {
                    write!(s, "; some metrics failed, fallback floor {n}")?
                }
                FailureAction::Hold if self.rule == Rule::Formula => {
                    s.push_str("; some metrics failed, the formula decided without them")
                }
                FailureAction::Hold => {
                    s.push_str("; some metrics failed, scaling up on the valid ones")
                }
            }
        }
        if let Some(n) = self.normalized {
            match n.stabilization {
                Stabilization::ScaleUpStabilized => {
                    write!(s, "; scale-up stabilized to {}", n.stabilized)?
                }
                Stabilization::ScaleDownStabilized => write!(
                    s,
                    "; scale-down stabilized to {} (highest recommendation in the window)",
                    n.stabilized
                )?,
                Stabilization::ReadyForNewScale => {}
            }
            match n.limit {
                Limit::DesiredWithinRange => {}
                Limit::ScaleUpLimit => write!(s, "; scale-up rate limit allows {}", n.replicas)?,
                Limit::ScaleDownLimit => {
                    write!(s, "; scale-down rate limit allows {}", n.replicas)?
                }
                Limit::TooManyReplicas => {
                    write!(s, "; clipped to maxReplicas {}", self.max_replicas)?
                }
                Limit::TooFewReplicas => {
                    write!(s, "; raised to minReplicas {}", self.min_replicas)?
                }
            }
        }
        Ok(())
    }

    /// The names of the metrics whose outcome passes `pick`, comma-separated.
    fn names_where(
        &self,
        policy: &CompiledPolicy,
        pick: impl Fn(&MetricOutcome, &CompiledMetric) -> bool,
    ) -> String {
        self.metrics
            .iter()
            .zip(&policy.metrics)
            .filter(|(o, m)| pick(o, m))
            .map(|(_, m)| m.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn write_schedule(&self, policy: &CompiledPolicy, s: &mut String) -> fmt::Result {
        let by = self.schedule;
        let label = |i: Option<usize>| i.and_then(|i| policy.schedules.get(i)).map(|s| &s.label);
        let Some(first) = label(by.floor.or(by.ceiling).or(by.active)) else {
            return Ok(());
        };
        write!(
            s,
            "; {first} active (bounds {}–{}",
            self.min_replicas, self.max_replicas
        )?;
        let ceiling = label(by.ceiling).filter(|_| by.ceiling != by.floor);
        match (by.overridden_ceiling, ceiling) {
            (Some(m), Some(c)) => write!(
                s,
                "): the floor {} overrides {c}'s ceiling {m}",
                self.min_replicas
            ),
            (Some(m), None) => write!(
                s,
                "): the floor {} overrides the ceiling {m}",
                self.min_replicas
            ),
            (None, Some(c)) if by.floor.is_some() => {
                write!(s, ", ceiling {} from {c})", self.max_replicas)
            }
            _ => s.write_char(')'),
        }
    }
}

/// Milli-units printed exactly as units (`1000000000000000000`, `0.25`).
struct Milli(i128);

impl fmt::Display for Milli {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, frac) = (self.0 / 1000, (self.0 % 1000).abs());
        if self.0 < 0 && whole == 0 {
            f.write_str("-")?;
        }
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let text = format!("{whole}.{frac:03}");
            f.write_str(text.trim_end_matches('0'))
        }
    }
}

/// A number printed compactly (no trailing zeros, at most 3 decimals).
struct Num(f64);

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        if v == v.trunc() && v.abs() < 1e15 {
            write!(f, "{}", v as i64)
        } else if v.abs() < 1e-3 {
            // Too small for 3 decimals (which would print 0): 4 significant digits.
            let text = format!("{v:.3e}");
            let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
            let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
            write!(f, "{mantissa}e{exponent}")
        } else {
            let text = format!("{v:.3}");
            f.write_str(text.trim_end_matches('0').trim_end_matches('.'))
        }
    }
}

#[cfg(test)]
mod num_tests {
    use super::Num;

    /// Values in reasons: integers whole, others to 3 decimals, and values too small for 3
    /// decimals in 4 significant digits (never a misleading 0).
    #[test]
    fn reasons_never_print_a_small_value_as_zero() {
        let shown = |v: f64| Num(v).to_string();
        assert_eq!(shown(300.0), "300");
        assert_eq!(shown(0.0), "0");
        assert_eq!(shown(1.25), "1.25");
        assert_eq!(shown(0.001), "0.001");
        assert_eq!(shown(2e-9), "2e-9");
        assert_eq!(shown(1e-300), "1e-300");
        assert_eq!(shown(-1.2345e-5), "-1.234e-5");
    }
}
