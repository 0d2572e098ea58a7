//! What an evaluation remembers between runs: the HPA's recommendation history and scale events.
//!
//! Kept in the ScalingPolicy status so a restart or a leader change does not forget the
//! stabilization window (the HPA keeps it in memory only, and flaps after a restart).

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

/// One raw (pre-stabilization) recommendation.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub struct Recommendation {
    /// Replicas recommended.
    pub replicas: i32,
    /// When.
    pub time: DateTime<Utc>,
}

/// One applied scaling step, for rate limits over a period.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub struct ScaleEvent {
    /// Replicas added or removed (a positive number).
    pub change: i32,
    /// When.
    pub time: DateTime<Utc>,
}

/// Evaluation state; an empty state is where a new policy starts.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyState {
    /// Recent recommendations (the stabilization window's memory).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recommendations: Vec<Recommendation>,
    /// Recent scale-ups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scale_up_events: Vec<ScaleEvent>,
    /// Recent scale-downs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scale_down_events: Vec<ScaleEvent>,
    /// When the target was last rescaled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<DateTime<Utc>>,
}

impl PolicyState {
    /// Records a raw recommendation, reusing the slot of one older than `cutoff` (the last such
    /// slot, as the HPA controller does) so the history stays bounded.
    pub(crate) fn record_recommendation(
        &mut self,
        replicas: i32,
        now: DateTime<Utc>,
        old_slot: Option<usize>,
    ) {
        let rec = Recommendation {
            replicas,
            time: now,
        };
        match old_slot.and_then(|i| self.recommendations.get_mut(i)) {
            Some(slot) => *slot = rec,
            None => self.recommendations.push(rec),
        }
    }

    /// Records that the target was rescaled from `from` to `to` at `now`. `longest_up` and
    /// `longest_down` are the longest policy periods of each direction: an event older than that
    /// has its slot reused, as the HPA controller does.
    pub fn record_scale(
        &mut self,
        from: i32,
        to: i32,
        now: DateTime<Utc>,
        longest_up: TimeDelta,
        longest_down: TimeDelta,
    ) {
        if from == to {
            return;
        }
        let (events, longest) = if to > from {
            (&mut self.scale_up_events, longest_up)
        } else {
            (&mut self.scale_down_events, longest_down)
        };
        let event = ScaleEvent {
            change: (to - from).abs(),
            time: now,
        };
        // The HPA overwrites the last event older than the direction's longest period.
        let cutoff = now - longest;
        match events.iter().rposition(|e| e.time < cutoff) {
            Some(i) => events[i] = event,
            None => events.push(event),
        }
        self.last_scale_time = Some(now);
    }
}
