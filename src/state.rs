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
    /// Consecutive failed evaluations (a metric unusable or the formula failing), counted up to
    /// `spec.fallback.failureThreshold` and reset by an evaluation without failure. Kept in
    /// status so a restart or a new leader does not start the count again.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub consecutive_failures: i32,
    /// When kscale itself scaled the target to 0 (`minReplicas: 0` or `idleReplicas: 0`), while
    /// the target is still at 0. A target at 0 without it was set there by someone else, and
    /// stays there. Cleared as soon as the target runs replicas again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaled_to_zero_time: Option<DateTime<Utc>>,
    /// The last evaluation at which a metric was active (above its `activationThreshold`) or
    /// could not be read (failing data never counts as idle): the cooldown runs from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_active_time: Option<DateTime<Utc>>,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
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
    pub fn capped(self) -> PolicyState {
        PolicyState {
            recommendations: newest(self.recommendations, |r| r.time),
            scale_up_events: newest(self.scale_up_events, |e| e.time),
            scale_down_events: newest(self.scale_down_events, |e| e.time),
            last_scale_time: self.last_scale_time,
            consecutive_failures: self.consecutive_failures,
            scaled_to_zero_time: self.scaled_to_zero_time,
            last_active_time: self.last_active_time,
        }
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

    /// A state read back from a ScalingPolicy status, checked and saturated so that nothing in it
    /// can overflow, panic or block scaling forever, whoever wrote it (a status is writable by
    /// anyone with `update` on `scalingpolicies/status`, and a restart trusts it):
    /// - a recommendation's replicas below 0 become 0;
    /// - a scale event's `change` below 0 becomes 0 (an event is a count of replicas added or
    ///   removed; a negative one, such as a forged `-2147483648`, counts nothing);
    /// - a time after `now` becomes `now`, so a forged future event is counted once, as if it had
    ///   just happened, instead of holding a rate limit or a stabilization window forever (a
    ///   forged future `lastActiveTime` restarts the cooldown once, no more);
    /// - each list keeps at most [`MAX_HISTORY_ENTRIES`] entries, the newest, in their order;
    /// - a negative failure count becomes 0 (a forged huge one only makes the fallback apply at
    ///   once, which is what `failureThreshold: 1`, the default, does anyway).
    pub fn sanitized(&self, now: DateTime<Utc>) -> PolicyState {
        let recommendations = newest(
            self.recommendations
                .iter()
                .map(|r| Recommendation {
                    replicas: r.replicas.max(0),
                    time: r.time.min(now),
                })
                .collect(),
            |r| r.time,
        );
        let events = |list: &[ScaleEvent]| {
            newest(
                list.iter()
                    .map(|e| ScaleEvent {
                        change: e.change.max(0),
                        time: e.time.min(now),
                    })
                    .collect(),
                |e| e.time,
            )
        };
        PolicyState {
            recommendations,
            scale_up_events: events(&self.scale_up_events),
            scale_down_events: events(&self.scale_down_events),
            last_scale_time: self.last_scale_time.map(|t| t.min(now)),
            consecutive_failures: self.consecutive_failures.max(0),
            scaled_to_zero_time: self.scaled_to_zero_time.map(|t| t.min(now)),
            last_active_time: self.last_active_time.map(|t| t.min(now)),
        }
    }

    /// Adds the scale events of `other` that this state lacks (the union of both, in this
    /// state's order followed by the new ones), and the later of both last scale times. This is
    /// how the controller merges the events it applied and keeps in memory with those read back
    /// from status: a scale event lost from status (a status write that failed or was denied)
    /// still counts against the rate limits. Lists stay within [`MAX_HISTORY_ENTRIES`].
    pub fn merge_scale_events(&mut self, other: &PolicyState) {
        fn union(into: &mut Vec<ScaleEvent>, from: &[ScaleEvent]) {
            for e in from {
                if !into.contains(e) {
                    into.push(*e);
                }
            }
            let all = std::mem::take(into);
            *into = newest(all, |e| e.time);
        }
        union(&mut self.scale_up_events, &other.scale_up_events);
        union(&mut self.scale_down_events, &other.scale_down_events);
        let later = |a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>| match (a, b) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        // kscale's own zero: the one of the later record, and only while it is kscale's last
        // scale (a later scale of its own woke the target since). A zero that status forgot
        // (its write failed) is taken from `other` when it is newer than status' last scale; one
        // that status cleared since (the target ran replicas) is not, as status' last scale is
        // that zero's own time.
        let status_scale = self.last_scale_time;
        if let Some(z) = other.scaled_to_zero_time
            && status_scale.is_none_or(|t| z > t)
        {
            self.scaled_to_zero_time = later(self.scaled_to_zero_time, Some(z));
        }
        self.last_scale_time = later(self.last_scale_time, other.last_scale_time);
        self.last_active_time = later(self.last_active_time, other.last_active_time);
        if let (Some(z), Some(t)) = (self.scaled_to_zero_time, self.last_scale_time)
            && z < t
        {
            self.scaled_to_zero_time = None;
        }
    }

    /// Only the scale events and the last scale time (what the controller keeps in memory).
    pub fn scale_events_only(&self) -> PolicyState {
        PolicyState {
            recommendations: Vec::new(),
            ..self.clone()
        }
    }
}

/// `list` with at most [`MAX_HISTORY_ENTRIES`] entries: the newest by `time`, in their order.
fn newest<T>(list: Vec<T>, time: impl Fn(&T) -> DateTime<Utc>) -> Vec<T> {
    if list.len() <= MAX_HISTORY_ENTRIES {
        return list;
    }
    let mut times: Vec<DateTime<Utc>> = list.iter().map(&time).collect();
    times.sort_unstable();
    // Keep entries at or after the cutoff, and of those at the cutoff only as many as fit.
    let cutoff = times[times.len() - MAX_HISTORY_ENTRIES];
    let mut at_cutoff = times[times.len() - MAX_HISTORY_ENTRIES..]
        .iter()
        .filter(|t| **t == cutoff)
        .count();
    list.into_iter()
        .filter(|e| {
            let t = time(e);
            if t > cutoff {
                true
            } else if t == cutoff && at_cutoff > 0 {
                at_cutoff -= 1;
                true
            } else {
                false
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    #[test]
    fn forged_values_are_saturated() {
        let now = at(1000);
        let forged = PolicyState {
            recommendations: vec![Recommendation {
                replicas: -5,
                time: at(999_999),
            }],
            scale_up_events: vec![ScaleEvent {
                change: i32::MIN,
                time: at(10),
            }],
            scale_down_events: vec![ScaleEvent {
                change: i32::MAX,
                time: DateTime::<Utc>::MAX_UTC,
            }],
            last_scale_time: Some(DateTime::<Utc>::MAX_UTC),
            consecutive_failures: -7,
            scaled_to_zero_time: Some(DateTime::<Utc>::MAX_UTC),
            last_active_time: Some(DateTime::<Utc>::MAX_UTC),
        };
        let s = forged.sanitized(now);
        assert_eq!(
            s.recommendations[0],
            Recommendation {
                replicas: 0,
                time: now
            }
        );
        assert_eq!(
            s.scale_up_events[0],
            ScaleEvent {
                change: 0,
                time: at(10)
            }
        );
        assert_eq!(
            s.scale_down_events[0],
            ScaleEvent {
                change: i32::MAX,
                time: now
            }
        );
        assert_eq!(s.last_scale_time, Some(now));
        assert_eq!(s.consecutive_failures, 0);
        assert_eq!(s.scaled_to_zero_time, Some(now));
        assert_eq!(s.last_active_time, Some(now));
        // A sane state is unchanged.
        let sane = PolicyState {
            recommendations: vec![Recommendation {
                replicas: 3,
                time: at(5),
            }],
            scale_up_events: vec![ScaleEvent {
                change: 1,
                time: at(6),
            }],
            scale_down_events: Vec::new(),
            last_scale_time: Some(at(6)),
            consecutive_failures: 2,
            scaled_to_zero_time: Some(at(6)),
            last_active_time: Some(at(4)),
        };
        assert_eq!(sane.sanitized(now), sane);
    }

    #[test]
    fn long_lists_keep_the_newest_in_order() {
        let n = MAX_HISTORY_ENTRIES + 10;
        let list: Vec<ScaleEvent> = (0..n)
            .map(|i| ScaleEvent {
                change: 1,
                time: at((n - i) as i64),
            })
            .collect();
        let state = PolicyState {
            scale_up_events: list.clone(),
            ..PolicyState::default()
        };
        let s = state.sanitized(at(1_000_000));
        assert_eq!(s.scale_up_events.len(), MAX_HISTORY_ENTRIES);
        assert_eq!(s.scale_up_events[..], list[..MAX_HISTORY_ENTRIES]);
        // Equal times: still exactly the cap.
        let same: Vec<ScaleEvent> = (0..n)
            .map(|_| ScaleEvent {
                change: 1,
                time: at(1),
            })
            .collect();
        let state = PolicyState {
            scale_down_events: same,
            ..PolicyState::default()
        };
        assert_eq!(
            state.sanitized(at(2)).scale_down_events.len(),
            MAX_HISTORY_ENTRIES
        );
    }

    #[test]
    fn merging_is_the_union_and_keeps_the_later_scale_time() {
        let e1 = ScaleEvent {
            change: 1,
            time: at(1),
        };
        let e2 = ScaleEvent {
            change: 1,
            time: at(2),
        };
        let mut status = PolicyState {
            scale_up_events: vec![e1],
            last_scale_time: Some(at(1)),
            ..PolicyState::default()
        };
        let memory = PolicyState {
            scale_up_events: vec![e1, e2],
            last_scale_time: Some(at(2)),
            ..PolicyState::default()
        };
        status.merge_scale_events(&memory);
        assert_eq!(status.scale_up_events, vec![e1, e2]);
        assert_eq!(status.last_scale_time, Some(at(2)));
        // Merging again changes nothing.
        let before = status.clone();
        status.merge_scale_events(&memory);
        assert_eq!(status, before);
    }

    #[test]
    fn kscales_zero_survives_a_lost_status_write_and_not_a_later_wake() {
        // kscale scaled to 0 at 10 (memory), the status write failed (status: last scale at 5).
        let memory = PolicyState {
            last_scale_time: Some(at(10)),
            scaled_to_zero_time: Some(at(10)),
            last_active_time: Some(at(4)),
            ..PolicyState::default()
        };
        let mut status = PolicyState {
            last_scale_time: Some(at(5)),
            last_active_time: Some(at(3)),
            ..PolicyState::default()
        };
        status.merge_scale_events(&memory);
        assert_eq!(status.scaled_to_zero_time, Some(at(10)));
        assert_eq!(status.last_active_time, Some(at(4)));
        // Status recorded the zero, then cleared it when the target ran replicas again: memory's
        // older record does not bring it back.
        let mut status = PolicyState {
            last_scale_time: Some(at(10)),
            ..PolicyState::default()
        };
        status.merge_scale_events(&memory);
        assert_eq!(status.scaled_to_zero_time, None);
        // kscale woke it at 20 (memory) but status still says zero at 10: the later scale wins.
        let woke = PolicyState {
            last_scale_time: Some(at(20)),
            ..PolicyState::default()
        };
        let mut status = memory.clone();
        status.merge_scale_events(&woke);
        assert_eq!(status.scaled_to_zero_time, None);
    }

    fn arb_time() -> impl Strategy<Value = DateTime<Utc>> {
        prop_oneof![
            (-10_000i64..10_000).prop_map(at),
            Just(DateTime::<Utc>::MAX_UTC),
            Just(DateTime::<Utc>::MIN_UTC),
        ]
    }

    fn arb_state() -> impl Strategy<Value = PolicyState> {
        let rec = (any::<i32>(), arb_time())
            .prop_map(|(replicas, time)| Recommendation { replicas, time });
        let ev =
            || (any::<i32>(), arb_time()).prop_map(|(change, time)| ScaleEvent { change, time });
        (
            proptest::collection::vec(rec, 0..20),
            proptest::collection::vec(ev(), 0..20),
            proptest::collection::vec(ev(), 0..20),
            proptest::option::of(arb_time()),
        )
            .prop_map(
                |(recommendations, scale_up_events, scale_down_events, last_scale_time)| {
                    PolicyState {
                        recommendations,
                        scale_up_events,
                        scale_down_events,
                        last_scale_time,
                        ..PolicyState::default()
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Whatever a status says, its sanitized state is within bounds, and evaluating a policy
        /// with rate limits on it neither panics nor overflows (debug builds check overflow).
        #[test]
        fn any_status_history_is_safe(state in arb_state(), current in 0i32..1000, desired in 0i32..100_000) {
            use crate::policy::behavior::{normalize_with_behavior, Behavior, RateKind, RatePolicy, Rules, SelectPolicy};
            let now = at(0);
            let s = state.sanitized(now);
            prop_assert!(s.recommendations.iter().all(|r| r.replicas >= 0 && r.time <= now));
            prop_assert!(s.scale_up_events.iter().chain(&s.scale_down_events).all(|e| e.change >= 0 && e.time <= now));
            prop_assert!(s.last_scale_time.is_none_or(|t| t <= now));
            prop_assert_eq!(s.sanitized(now), s.clone());
            let rules = |select| Rules {
                stabilization: TimeDelta::seconds(300),
                select,
                policies: vec![
                    RatePolicy { kind: RateKind::Pods, value: 1, period: TimeDelta::seconds(600) },
                    RatePolicy { kind: RateKind::Percent, value: 100, period: TimeDelta::seconds(60) },
                ],
            };
            for select in [SelectPolicy::Max, SelectPolicy::Min] {
                let behavior = Behavior { up: rules(select), down: rules(select) };
                // Unsanitized too: the arithmetic itself saturates.
                for mut st in [s.clone(), state.clone()] {
                    let n = normalize_with_behavior(&behavior, &mut st, current, desired, 0, i32::MAX, now);
                    prop_assert!(n.replicas >= 0);
                }
            }
        }
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
