//! Scale to zero (or to an idle count) and back: `minReplicas: 0`, `spec.idleReplicas`,
//! `spec.cooldown` and `metrics[].activationThreshold`.
//!
//! A metric is *active* while its value is above its activation threshold. Where the policy
//! stands decides the bounds the ordinary evaluation then runs within:
//! - a metric is active: the count runs between `max(1, minReplicas)` and `maxReplicas`, and a
//!   target at the idle count wakes to at least that floor (rate limits and stabilization cannot
//!   hold it at the idle count);
//! - no metric is active, and the cooldown since the last active one runs (or some metric could
//!   not be read): nothing wakes and nothing goes idle; above the idle count the metrics decide,
//!   as in the HPA, but never below the current count's floor;
//! - every metric has been inactive for the cooldown: the proposal is the idle count and the
//!   descent follows `behavior.scaleDown` (stabilization and rate policies), one step at a time
//!   if the behavior says so.
//!
//! A target at 0 that kscale did not send there (`PolicyState::scaled_to_zero_time` unset) was
//! set to 0 by someone else: it stays at 0, as the HPA's `ScaledToZero` condition does (except
//! in `ExternalMetric` mode, where the HPA is the writer and judges that itself). A schedule's
//! floor above the idle count wakes a target kscale sent to 0.
//!
//! Pure, like the rest of `policy/`: the clock is an argument and the memory is the state.

use std::fmt::{self, Write as _};

use chrono::{DateTime, TimeDelta, Utc};

use super::compile::ZeroSettings;
use super::{CompiledPolicy, Decision, MetricOutcome, MetricState, Num, PolicyState, Rule};
use crate::crd::Mode;
use crate::model::DecisionCondition;

/// What the metrics say about activity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// This metric (the first such, by spec order) is above its activation threshold.
    Active(usize),
    /// Every metric is valid and at or below its threshold.
    Inactive,
    /// No metric is active, and some metric could not be read (or its answer was partial): the
    /// data cannot tell idle from busy, so it neither wakes nor idles.
    Unknown,
}

/// Where a policy with an idle state stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// A metric is active: the count runs at `max(1, minReplicas)` or more.
    Active,
    /// No metric is active but the cooldown has not run out (or the data is unknown): nothing
    /// wakes and nothing goes idle. `left` is the cooldown still to run.
    Cooling {
        /// The cooldown still to run (zero with unknown data).
        left: TimeDelta,
    },
    /// Every metric has been inactive for the cooldown: down to the idle count.
    Idle,
    /// The target is at 0 and kscale did not send it there: it stays at 0.
    PausedAtZero,
}

/// The zero/idle part of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroDecision {
    /// What the metrics said.
    pub activity: Activity,
    /// Where the policy stands.
    pub phase: Phase,
    /// The idle count that applies now (`idleReplicas` or 0, raised by an open schedule's floor).
    pub idle: i32,
    /// The policy's cooldown.
    pub cooldown: TimeDelta,
}

/// How [`super::evaluate`] goes on after [`plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plan {
    /// The decision is this count, without the metrics' arithmetic.
    Now(i32, Rule),
    /// Evaluate within `[floor, max]`. `wake`: the result is at least `floor` whatever
    /// stabilization, rate limits or a failing metric say. `idle`: the proposal is replaced by
    /// the idle count.
    Evaluate {
        /// The lower bound.
        floor: i32,
        /// A metric is active.
        wake: bool,
        /// Going to the idle count.
        idle: bool,
    },
}

/// The floors `plan` works between.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Floors {
    /// The effective lower bound while active: `spec.minReplicas` raised by open schedules.
    pub min: i32,
    /// The highest floor of the open schedules (`ScheduleBounds::open_floor`): the idle count
    /// never goes under it.
    pub schedule: Option<i32>,
}

/// Whether any metric is active, every one is inactive, or the data cannot tell.
pub fn activity(policy: &CompiledPolicy, metrics: &[MetricOutcome]) -> Activity {
    let mut unknown = false;
    for (i, (m, o)) in policy.metrics.iter().zip(metrics).enumerate() {
        match (o.state, o.value) {
            (state, Some(v)) if state.gave_value() && v > m.activation => {
                return Activity::Active(i);
            }
            // Partial data at or under the threshold cannot tell: the missing part may be above.
            (MetricState::Valid, Some(_)) | (MetricState::NoPods, _) => {}
            _ => unknown = true,
        }
    }
    if unknown || metrics.len() < policy.metrics.len() {
        Activity::Unknown
    } else {
        Activity::Inactive
    }
}

/// Decides the phase at `now`, updates `state` (the last active time; kscale's zero is forgotten
/// once the target runs replicas) and says how the evaluation goes on.
pub(crate) fn plan(
    policy: &CompiledPolicy,
    z: ZeroSettings,
    metrics: &[MetricOutcome],
    state: &mut PolicyState,
    current: i32,
    floors: Floors,
    now: DateTime<Utc>,
) -> (ZeroDecision, Plan) {
    let activity = activity(policy, metrics);
    if current > 0 {
        state.scaled_to_zero_time = None;
    }
    // Unknown data counts as activity for the cooldown; so does a history that never saw one
    // (a new policy waits a whole cooldown before it idles anything).
    if activity != Activity::Inactive || state.last_active_time.is_none() {
        state.last_active_time = Some(now);
    }
    let idle = z.idle.max(floors.schedule.unwrap_or(0));
    let active_min = z.active_min.max(floors.min);
    let left = state
        .last_active_time
        .map_or(z.cooldown, |t| t + z.cooldown - now);
    let phase = match activity {
        // In ExternalMetric mode the HPA is the writer and tells its own zero from a hand-set
        // one (its `ScaledToZero` condition); kscale keeps publishing what it would decide.
        _ if current == 0
            && z.idle == 0
            && state.scaled_to_zero_time.is_none()
            && policy.mode != Mode::ExternalMetric =>
        {
            Phase::PausedAtZero
        }
        Activity::Active(_) => Phase::Active,
        Activity::Unknown => Phase::Cooling {
            left: TimeDelta::zero(),
        },
        Activity::Inactive if left > TimeDelta::zero() => Phase::Cooling { left },
        Activity::Inactive => Phase::Idle,
    };
    let zero = ZeroDecision {
        activity,
        phase,
        idle,
        cooldown: z.cooldown,
    };
    let plan = match phase {
        Phase::PausedAtZero => Plan::Now(0, Rule::PausedAtZero),
        Phase::Active => Plan::Evaluate {
            floor: active_min,
            wake: true,
            idle: false,
        },
        // At or below the idle count nothing wakes (an open schedule's floor still lifts it).
        Phase::Cooling { .. } if current <= idle => Plan::Now(idle, Rule::Idle),
        // Above it the metrics decide as usual, never lifting the count to the active floor on
        // data that is not active.
        Phase::Cooling { .. } => Plan::Evaluate {
            floor: active_min.min(current).max(idle),
            wake: false,
            idle: false,
        },
        Phase::Idle if current <= idle => Plan::Now(idle, Rule::Idle),
        Phase::Idle => Plan::Evaluate {
            floor: idle,
            wake: false,
            idle: true,
        },
    };
    (zero, plan)
}

impl Decision {
    /// Whether the idle state could not be judged because some metric failed.
    pub(crate) fn data_unknown(&self) -> bool {
        self.zero.is_some_and(|z| z.activity == Activity::Unknown)
    }

    /// The `ScaledToZero` condition of a policy with an idle state (the HPA's name and reasons,
    /// from Kubernetes 1.36).
    pub(crate) fn zero_condition(&self) -> Option<DecisionCondition> {
        let z = self.zero?;
        Some(match z.phase {
            Phase::PausedAtZero => DecisionCondition {
                type_: "ScaledToZero",
                status: false,
                reason: "ScaledToZeroByOther",
                message: "the target was set to 0 replicas by someone other than kscale; kscale leaves it at 0 until it runs replicas again",
            },
            _ if self.replicas == 0 && self.state.scaled_to_zero_time.is_some() => {
                DecisionCondition {
                    type_: "ScaledToZero",
                    status: true,
                    reason: "ScaledToZero",
                    message: "kscale scaled the target to zero; it wakes when a metric is above its activationThreshold",
                }
            }
            _ => DecisionCondition {
                type_: "ScaledToZero",
                status: false,
                reason: "NotScaledToZero",
                message: "kscale did not scale the target to zero",
            },
        })
    }

    /// The zero/idle part of the reason: which metric is active, or how long the cooldown has
    /// to run, or that the count goes to the idle count.
    pub(crate) fn write_zero(&self, policy: &CompiledPolicy, s: &mut String) -> fmt::Result {
        let Some(z) = self.zero else { return Ok(()) };
        match (z.phase, z.activity) {
            (Phase::PausedAtZero, _) => s.push_str(
                ": the target was set to 0 replicas by someone other than kscale, so it stays at 0 until it runs replicas again",
            ),
            (Phase::Active, Activity::Active(i)) => {
                let m = &policy.metrics[i];
                let v = self.metrics.get(i).and_then(|o| o.value).unwrap_or(0.0);
                write!(
                    s,
                    "; active: {}={} is above its activationThreshold {}",
                    m.name,
                    Num(v),
                    Num(m.activation)
                )?;
            }
            (Phase::Cooling { .. }, Activity::Unknown) => s.push_str(
                "; some metric could not be read and none is active: neither waking nor going idle",
            ),
            (Phase::Cooling { left }, _) => write!(
                s,
                "; no metric is above its activationThreshold; cooldown {}s of {}s left before idle count {}",
                left.num_seconds(),
                z.cooldown.num_seconds(),
                z.idle
            )?,
            (Phase::Idle, _) => write!(
                s,
                "; no metric has been above its activationThreshold for the {}s cooldown: idle count {}",
                z.cooldown.num_seconds(),
                z.idle
            )?,
            (Phase::Active, _) => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ScalingPolicy;
    use crate::model::{Observation, Sample};
    use crate::policy::{CompiledPolicy, evaluate};

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn policy(extra: &str) -> CompiledPolicy {
        let p: ScalingPolicy = serde_yaml::from_str(&format!(
            "apiVersion: kscale.dev/v1alpha1\nkind: ScalingPolicy\nmetadata: {{name: p, namespace: d}}\nspec:\n  targetRef: {{kind: Deployment, name: w}}\n  minReplicas: 0\n  maxReplicas: 10\n  metrics:\n  - name: q\n    prometheus: {{query: 'sum(q)'}}\n    target: {{type: AverageValue, averageValue: \"10\"}}\n    activationThreshold: \"5\"\n{extra}"
        ))
        .unwrap();
        CompiledPolicy::from_resource(&p).unwrap()
    }

    fn obs(replicas: i32, q: Sample) -> Observation {
        Observation::steady(replicas, vec![q])
    }

    fn value(v: f64, now: DateTime<Utc>) -> Sample {
        Sample::Series {
            values: vec![v],
            timestamp: now,
        }
    }

    fn condition(d: &Decision) -> (bool, &'static str) {
        let c = d.zero_condition().unwrap();
        (c.status, c.reason)
    }

    /// At kscale's own zero a resource metric has no pods to read: that is the idle state, not a
    /// failure. No degraded condition, no failure count; an active queue still wakes the target.
    #[test]
    fn a_resource_metric_at_zero_is_idle_not_failing() {
        let p = policy(
            "  - name: cpu\n    resource: {name: cpu}\n    target: {type: Utilization, averageUtilization: 50}\n    activationThreshold: \"10\"\n",
        );
        let now = at(0);
        let idle = PolicyState {
            scaled_to_zero_time: Some(at(-600)),
            last_active_time: Some(at(-900)),
            ..PolicyState::default()
        };
        let no_pods = Sample::Error {
            message: "unable to get metrics: no pods".into(),
        };
        let mut o = obs(0, value(0.0, now));
        o.samples.push(no_pods.clone());
        let d = evaluate(&p, &o, &idle, now);
        assert_eq!((d.replicas, d.rule), (0, Rule::Idle), "{}", d.reason(&p));
        assert_eq!(d.metrics[1].state, MetricState::NoPods);
        assert!(!d.degraded, "{}", d.reason(&p));
        assert_eq!(d.state.consecutive_failures, 0);
        assert_eq!(condition(&d), (true, "ScaledToZero"));
        let available = d
            .conditions()
            .into_iter()
            .find(|c| c.type_ == "MetricsAvailable")
            .unwrap();
        assert!(available.status, "{available:?}");
        // The queue turns active: it wakes to ceil(30 / 10) = 3.
        let mut o = obs(0, value(30.0, now));
        o.samples.push(no_pods);
        let d = evaluate(&p, &o, &idle, now);
        assert_eq!(d.replicas, 3, "{}", d.reason(&p));
    }

    #[test]
    fn a_zero_someone_else_set_stays_and_kscales_own_wakes() {
        let p = policy("");
        let now = at(0);
        // Active (30 > 5), at 0, no record of kscale's zero: paused.
        let d = evaluate(&p, &obs(0, value(30.0, now)), &PolicyState::default(), now);
        assert_eq!((d.replicas, d.rule), (0, Rule::PausedAtZero));
        assert_eq!(condition(&d), (false, "ScaledToZeroByOther"));
        assert!(
            d.reason(&p).contains("someone other than kscale"),
            "{}",
            d.reason(&p)
        );
        // kscale's own zero wakes: ceil(30 / 10) = 3.
        let own = PolicyState {
            scaled_to_zero_time: Some(at(-60)),
            ..PolicyState::default()
        };
        let d = evaluate(&p, &obs(0, value(30.0, now)), &own, now);
        assert_eq!(d.replicas, 3, "{}", d.reason(&p));
        assert_eq!(condition(&d), (false, "NotScaledToZero"));
        // In ExternalMetric mode the HPA judges its zero; kscale publishes what it would do.
        let mut external = policy("");
        external.mode = Mode::ExternalMetric;
        let d = evaluate(
            &external,
            &obs(0, value(30.0, now)),
            &PolicyState::default(),
            now,
        );
        assert_eq!(d.replicas, 3, "{}", d.reason(&external));
    }

    #[test]
    fn kscales_zero_is_recorded_when_applied_and_forgotten_once_replicas_run() {
        let p =
            policy("  cooldown: 0s\n  behavior:\n    scaleDown: {stabilizationWindowSeconds: 0}\n");
        let now = at(0);
        let state = PolicyState {
            last_active_time: Some(at(-600)),
            ..PolicyState::default()
        };
        // 1 replica, 3 is inactive, the cooldown is over: idle count 0 (no stabilization, and
        // the default rate policy allows 100 % down).
        let mut d = evaluate(&p, &obs(1, value(3.0, now)), &state, now);
        assert_eq!((d.replicas, d.rule), (0, Rule::Idle), "{}", d.reason(&p));
        d.record_applied(&p, now);
        assert_eq!(d.state.scaled_to_zero_time, Some(now));
        assert_eq!(condition(&d), (true, "ScaledToZero"));
        // Someone scales it to 2: the record goes.
        let later = at(30);
        let d = evaluate(&p, &obs(2, value(3.0, later)), &d.state, later);
        assert_eq!(d.state.scaled_to_zero_time, None);
    }

    /// An open schedule's floor lifts the idle count even when it is under `spec.minReplicas`
    /// (it does not raise the effective minimum then, but an idle target still keeps it).
    #[test]
    fn an_open_schedule_floor_under_min_replicas_still_lifts_the_idle_count() {
        let p: ScalingPolicy = serde_yaml::from_str(
            "apiVersion: kscale.dev/v1alpha1\nkind: ScalingPolicy\nmetadata: {name: p, namespace: d}\nspec:\n  targetRef: {kind: Deployment, name: w}\n  minReplicas: 3\n  idleReplicas: 0\n  maxReplicas: 10\n  cooldown: 0s\n  behavior:\n    scaleDown: {stabilizationWindowSeconds: 0}\n  schedules:\n  - {cron: '0 0 * * *', duration: 24h, minReplicas: 2}\n  metrics:\n  - name: q\n    prometheus: {query: 'sum(q)'}\n    target: {type: AverageValue, averageValue: \"10\"}\n    activationThreshold: \"5\"\n",
        )
        .unwrap();
        let p = CompiledPolicy::from_resource(&p).unwrap();
        let now = at(0);
        let state = PolicyState {
            last_active_time: Some(at(-600)),
            ..PolicyState::default()
        };
        let d = evaluate(&p, &obs(5, value(3.0, now)), &state, now);
        assert_eq!(d.schedule.floor, None);
        assert_eq!(d.schedule.open_floor, Some(2));
        assert_eq!((d.replicas, d.rule), (2, Rule::Idle), "{}", d.reason(&p));
    }

    #[test]
    fn an_active_metric_wakes_even_when_another_fails_with_a_formula() {
        let p: ScalingPolicy = serde_yaml::from_str(
            "apiVersion: kscale.dev/v1alpha1\nkind: ScalingPolicy\nmetadata: {name: p, namespace: d}\nspec:\n  targetRef: {kind: Deployment, name: w}\n  minReplicas: 0\n  maxReplicas: 10\n  formula: max(a, b)\n  metrics:\n  - name: a\n    prometheus: {query: 'a'}\n    target: {type: AverageValue, averageValue: \"10\"}\n  - name: b\n    prometheus: {query: 'b'}\n    target: {type: AverageValue, averageValue: \"10\"}\n",
        )
        .unwrap();
        let p = CompiledPolicy::from_resource(&p).unwrap();
        let now = at(0);
        let own = PolicyState {
            scaled_to_zero_time: Some(at(-60)),
            ..PolicyState::default()
        };
        let mut o = obs(0, value(30.0, now));
        o.samples.push(Sample::Error {
            message: "down".into(),
        });
        let d = evaluate(&p, &o, &own, now);
        assert_eq!(d.replicas, 1, "{}", d.reason(&p));
        // With only the failing one, nothing wakes.
        o.samples[0] = value(0.0, now);
        let d = evaluate(&p, &o, &own, now);
        assert_eq!(d.replicas, 0, "{}", d.reason(&p));
        let active = d
            .conditions()
            .into_iter()
            .find(|c| c.type_ == "ScalingActive");
        assert_eq!(
            active.map(|c| (c.status, c.reason)),
            Some((false, "FailedGetMetrics"))
        );
    }
}
