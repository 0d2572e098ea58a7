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

/// The most entries a policy's stored history keeps in each of its lists (recommendations,
/// scale-ups, scale-downs). Evaluation never needs more: with `spec.interval` at least 1s, a
/// stabilization window of at most 3600s holds at most 3601 recommendations and a rate-limit
/// period of at most 1800s at most 1801 events. The cap bounds what status holds (etcd's object
/// limit) and what is read back from it, a hand-edited status included.
pub const MAX_HISTORY_ENTRIES: usize = 4096;

impl PolicyState {
    /// This history with each list cut to its [`MAX_HISTORY_ENTRIES`] newest entries (their
    /// order kept); unchanged when within the cap.
    pub fn capped(mut self) -> PolicyState {
        fn cap<T>(list: &mut Vec<T>, time: impl Fn(&T) -> DateTime<Utc>) {
            if list.len() <= MAX_HISTORY_ENTRIES {
                return;
            }
            let mut times: Vec<DateTime<Utc>> = list.iter().map(&time).collect();
            times.sort_unstable_by(|a, b| b.cmp(a));
            let oldest_kept = times[MAX_HISTORY_ENTRIES - 1];
            // Entries at the boundary time may tie: keep the first ones until the cap.
            let mut newer = list.iter().filter(|e| time(e) > oldest_kept).count();
            list.retain(|e| {
                let t = time(e);
                if t > oldest_kept {
                    true
                } else if t == oldest_kept && newer < MAX_HISTORY_ENTRIES {
                    newer += 1;
                    true
                } else {
                    false
                }
            });
        }
        cap(&mut self.recommendations, |r| r.time);
        cap(&mut self.scale_up_events, |e| e.time);
        cap(&mut self.scale_down_events, |e| e.time);
        self
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    #[test]
    fn a_history_within_the_cap_is_unchanged() {
        let mut s = PolicyState::default();
        for i in 0..10 {
            s.record_recommendation(i, at(i64::from(i)), None);
        }
        assert_eq!(s.clone().capped(), s);
    }

    #[test]
    fn a_history_over_the_cap_keeps_its_newest_entries_in_order() {
        let n = MAX_HISTORY_ENTRIES + 100;
        let mut s = PolicyState::default();
        // Slots reused out of time order, and ties at the boundary.
        for i in 0..n as i64 {
            s.recommendations.push(Recommendation {
                replicas: i as i32,
                time: at(i / 2),
            });
            s.scale_up_events.push(ScaleEvent {
                change: 1,
                time: at(n as i64 - i),
            });
        }
        let c = s.clone().capped();
        assert_eq!(c.recommendations.len(), MAX_HISTORY_ENTRIES);
        assert_eq!(c.scale_up_events.len(), MAX_HISTORY_ENTRIES);
        assert_eq!(c.recommendations.last(), s.recommendations.last());
        assert_eq!(c.scale_up_events.first(), s.scale_up_events.first());
        assert!(c.recommendations.windows(2).all(|w| w[0].time <= w[1].time));
    }
}
