//! Stabilization windows and rate limits, with the HPA controller's arithmetic.
//!
//! Order matters and follows the controller: stabilize first (the min of recent recommendations
//! when going up, the max when going down), then apply the rate policies to the stabilized value
//! against the replica count at the start of each policy's period, then clamp to min/max.

use chrono::{DateTime, TimeDelta, Utc};

use super::state::{PolicyState, ScaleEvent};

/// How several rate policies of one direction combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectPolicy {
    /// The policy allowing the largest change (default).
    Max,
    /// The policy allowing the smallest change.
    Min,
    /// No scaling in this direction.
    Disabled,
}

/// A rate policy's unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateKind {
    /// An absolute number of pods per period.
    Pods,
    /// A percentage of the period's starting replica count.
    Percent,
}

/// One rate policy (`HPAScalingPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RatePolicy {
    /// Pods or Percent.
    pub kind: RateKind,
    /// How many pods, or what percentage.
    pub value: i32,
    /// The period the change is counted over.
    pub period: TimeDelta,
}

/// One direction's rules (`HPAScalingRules`, defaults applied).
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// Stabilization window.
    pub stabilization: TimeDelta,
    /// How policies combine.
    pub select: SelectPolicy,
    /// Rate policies.
    pub policies: Vec<RatePolicy>,
}

impl Rules {
    /// The longest policy period, which bounds how long scale events matter.
    pub fn longest_period(&self) -> TimeDelta {
        self.policies
            .iter()
            .map(|p| p.period)
            .max()
            .unwrap_or(TimeDelta::zero())
    }
}

/// Both directions' rules (`HorizontalPodAutoscalerBehavior`, defaults applied).
#[derive(Debug, Clone, PartialEq)]
pub struct Behavior {
    /// Scale-up rules.
    pub up: Rules,
    /// Scale-down rules.
    pub down: Rules,
}

/// Whether stabilization changed the raw recommendation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stabilization {
    /// The raw recommendation stood.
    ReadyForNewScale,
    /// A lower recent recommendation held a scale-up back.
    ScaleUpStabilized,
    /// A higher recent recommendation held a scale-down back.
    ScaleDownStabilized,
}

/// What limited the stabilized value, in the HPA's `ScalingLimited` reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Nothing limited it.
    DesiredWithinRange,
    /// A scale-up rate policy.
    ScaleUpLimit,
    /// `maxReplicas`.
    TooManyReplicas,
    /// A scale-down rate policy.
    ScaleDownLimit,
    /// `minReplicas`.
    TooFewReplicas,
}

impl Limit {
    /// The HPA's condition reason.
    pub fn reason(self) -> &'static str {
        match self {
            Limit::DesiredWithinRange => "DesiredWithinRange",
            Limit::ScaleUpLimit => "ScaleUpLimit",
            Limit::TooManyReplicas => "TooManyReplicas",
            Limit::ScaleDownLimit => "ScaleDownLimit",
            Limit::TooFewReplicas => "TooFewReplicas",
        }
    }

    /// The HPA's condition message.
    pub fn message(self) -> &'static str {
        match self {
            Limit::DesiredWithinRange => "the desired count is within the acceptable range",
            Limit::ScaleUpLimit => {
                "the desired replica count is increasing faster than the maximum scale rate"
            }
            Limit::TooManyReplicas => {
                "the desired replica count is more than the maximum replica count"
            }
            Limit::ScaleDownLimit => {
                "the desired replica count is decreasing faster than the maximum scale rate"
            }
            Limit::TooFewReplicas => {
                "the desired replica count is less than the minimum replica count"
            }
        }
    }
}

/// The outcome of normalization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Normalized {
    /// The final replica count.
    pub replicas: i32,
    /// The value after stabilization, before rate limits and bounds.
    pub stabilized: i32,
    /// Whether stabilization changed the raw recommendation.
    pub stabilization: Stabilization,
    /// What limited the stabilized value (`DesiredWithinRange` when nothing did).
    pub limit: Limit,
}

/// Replicas changed within `period` before `now` (strictly newer events only).
fn changed_within(events: &[ScaleEvent], period: TimeDelta, now: DateTime<Utc>) -> i32 {
    let cutoff = now - period;
    events
        .iter()
        .filter(|e| e.time > cutoff)
        .fold(0i32, |acc, e| acc.saturating_add(e.change))
}

fn period_start(current: i32, policy: &RatePolicy, state: &PolicyState, now: DateTime<Utc>) -> i32 {
    let added = changed_within(&state.scale_up_events, policy.period, now);
    let removed = changed_within(&state.scale_down_events, policy.period, now);
    // Saturating: the events come from status, which is not to be trusted to stay in range
    // (status values are sanitized when read, and the arithmetic cannot overflow either way).
    current.saturating_sub(added).saturating_add(removed)
}

/// A scaling direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Up,
    Down,
}

/// The furthest count the direction's rate policies allow from `current`: the highest for
/// scale-up, the lowest for scale-down. `Max` picks the policy allowing the largest change and
/// `Min` the smallest, so their combining functions swap between directions.
fn rate_limit(
    direction: Direction,
    current: i32,
    rules: &Rules,
    state: &PolicyState,
    now: DateTime<Utc>,
) -> i32 {
    let largest_change = match direction {
        Direction::Up => std::cmp::max,
        Direction::Down => std::cmp::min,
    };
    let smallest_change = match direction {
        Direction::Up => std::cmp::min,
        Direction::Down => std::cmp::max,
    };
    let pick: fn(i32, i32) -> i32 = match rules.select {
        SelectPolicy::Disabled => return current,
        SelectPolicy::Max => largest_change,
        SelectPolicy::Min => smallest_change,
    };
    let mut result: Option<i32> = None;
    for policy in &rules.policies {
        let start = period_start(current, policy, state, now);
        let proposed = match (direction, policy.kind) {
            (Direction::Up, RateKind::Pods) => start.saturating_add(policy.value),
            (Direction::Down, RateKind::Pods) => start.saturating_sub(policy.value),
            // Rounded up, or a small percentage would never add a replica.
            (Direction::Up, RateKind::Percent) => {
                let p = (f64::from(start) * (1.0 + f64::from(policy.value) / 100.0)).ceil();
                p.clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32
            }
            // Go's int32(float64) conversion truncates toward zero.
            (Direction::Down, RateKind::Percent) => {
                (f64::from(start) * (1.0 - f64::from(policy.value) / 100.0)).trunc() as i32
            }
        };
        result = Some(result.map_or(proposed, |r| pick(r, proposed)));
    }
    // With no policies the controller's fold returns its starting sentinel.
    result.unwrap_or(match (direction, rules.select) {
        (Direction::Up, SelectPolicy::Min) | (Direction::Down, SelectPolicy::Max) => i32::MAX,
        _ => i32::MIN,
    })
}

/// The highest count the scale-up policies allow from `current`.
pub fn scale_up_limit(current: i32, rules: &Rules, state: &PolicyState, now: DateTime<Utc>) -> i32 {
    rate_limit(Direction::Up, current, rules, state, now)
}

/// The lowest count the scale-down policies allow from `current`.
pub fn scale_down_limit(
    current: i32,
    rules: &Rules,
    state: &PolicyState,
    now: DateTime<Utc>,
) -> i32 {
    rate_limit(Direction::Down, current, rules, state, now)
}

/// `normalizeDesiredReplicasWithBehaviors`: stabilize, record the raw recommendation, then apply
/// rate limits and bounds.
pub fn normalize_with_behavior(
    behavior: &Behavior,
    state: &mut PolicyState,
    current: i32,
    desired: i32,
    min: i32,
    max: i32,
    now: DateTime<Utc>,
) -> Normalized {
    let up_cutoff = now - behavior.up.stabilization;
    let down_cutoff = now - behavior.down.stabilization;
    let mut up_rec = desired;
    let mut down_rec = desired;
    let mut old_slot = None;
    for (i, rec) in state.recommendations.iter().enumerate() {
        if rec.time > up_cutoff {
            up_rec = up_rec.min(rec.replicas);
        }
        if rec.time > down_cutoff {
            down_rec = down_rec.max(rec.replicas);
        }
        if rec.time < up_cutoff && rec.time < down_cutoff {
            old_slot = Some(i);
        }
    }
    let mut stabilized = current;
    if stabilized < up_rec {
        stabilized = up_rec;
    }
    if stabilized > down_rec {
        stabilized = down_rec;
    }
    state.record_recommendation(desired, now, old_slot);
    let stabilization = if stabilized == desired {
        Stabilization::ReadyForNewScale
    } else if desired >= current {
        Stabilization::ScaleUpStabilized
    } else {
        Stabilization::ScaleDownStabilized
    };

    let (replicas, limit) = if stabilized > current {
        let limit = scale_up_limit(current, &behavior.up, state, now).max(current);
        let (allowed, why) = if max > limit {
            (limit, Limit::ScaleUpLimit)
        } else {
            (max, Limit::TooManyReplicas)
        };
        if stabilized > allowed {
            (allowed, why)
        } else {
            (stabilized, Limit::DesiredWithinRange)
        }
    } else if stabilized < current {
        let limit = scale_down_limit(current, &behavior.down, state, now).min(current);
        let (allowed, why) = if min < limit {
            (limit, Limit::ScaleDownLimit)
        } else {
            (min, Limit::TooFewReplicas)
        };
        if stabilized < allowed {
            (allowed, why)
        } else {
            (stabilized, Limit::DesiredWithinRange)
        }
    } else {
        (stabilized, Limit::DesiredWithinRange)
    };
    Normalized {
        replicas,
        stabilized,
        stabilization,
        limit,
    }
}

/// `normalizeDesiredReplicas` (no `behavior`): the max of the recommendations within the
/// downscale window, then at most `max(2 * current, 4)` and the bounds.
pub fn normalize_legacy(
    window: TimeDelta,
    state: &mut PolicyState,
    current: i32,
    desired: i32,
    min: i32,
    max: i32,
    now: DateTime<Utc>,
) -> Normalized {
    let cutoff = now - window;
    let mut stabilized = desired;
    let mut old_slot = None;
    for (i, rec) in state.recommendations.iter().enumerate() {
        if rec.time < cutoff {
            old_slot = Some(i);
        } else if rec.replicas > stabilized {
            stabilized = rec.replicas;
        }
    }
    state.record_recommendation(desired, now, old_slot);
    let stabilization = if stabilized == desired {
        Stabilization::ReadyForNewScale
    } else {
        Stabilization::ScaleDownStabilized
    };
    let up_limit = current.saturating_mul(2).max(4);
    let (allowed_max, max_why) = if max > up_limit {
        (up_limit, Limit::ScaleUpLimit)
    } else {
        (max, Limit::TooManyReplicas)
    };
    let (replicas, limit) = if stabilized < min {
        (min, Limit::TooFewReplicas)
    } else if stabilized > allowed_max {
        (allowed_max, max_why)
    } else {
        (stabilized, Limit::DesiredWithinRange)
    };
    Normalized {
        replicas,
        stabilized,
        stabilization,
        limit,
    }
}
