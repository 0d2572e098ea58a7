//! What the controller remembers of its own writes: the scale events it applied, per policy.
//!
//! Rate limits (`behavior.*.policies`, such as `Pods: 1 per 600s`) count the scale events of
//! their period. Those events are kept in the policy's status, so a restart or a new leader
//! continues them; but a status write can fail (or be denied by RBAC) after the scale write
//! succeeded, and the event would then be lost and the limit would let one more step through at
//! every interval. So the controller also keeps the events it applied in memory, and the
//! history an evaluation starts from is the status' (checked and saturated,
//! [`PolicyState::sanitized`]) merged with memory's: the union of both
//! ([`PolicyState::merge_scale_events`]). Neither a failed status write nor a restart (status
//! still has what was written) loses an event.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use kube::ResourceExt;

use crate::crd::ScalingPolicy;
use crate::policy::PolicyState;

/// Per policy (`namespace/name`, and its uid so a re-created policy starts afresh): the scale
/// events and last scale time after this replica's last scale write.
#[derive(Default)]
pub struct ScaleMemory {
    entries: Mutex<HashMap<String, (Option<String>, PolicyState)>>,
}

fn key(p: &ScalingPolicy) -> String {
    format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any())
}

impl ScaleMemory {
    /// The history `p` is evaluated from at `now`: its status' history, sanitized, with the
    /// scale events this replica remembers merged in.
    pub fn history(&self, p: &ScalingPolicy, now: DateTime<Utc>) -> PolicyState {
        let mut history = p
            .status
            .as_ref()
            .map(|s| s.history.sanitized(now))
            .unwrap_or_default();
        if let Ok(entries) = self.entries.lock()
            && let Some((uid, remembered)) = entries.get(&key(p))
            && *uid == p.metadata.uid
        {
            history.merge_scale_events(remembered);
            // The stabilization windows count every evaluation's recommendation, but status is
            // written only when more than the time changed: this replica's memory holds the
            // ones not written. The newer list wins (another leader may have written since).
            let newest = |s: &PolicyState| s.recommendations.iter().map(|r| r.time).max();
            if !remembered.recommendations.is_empty() && newest(remembered) >= newest(&history) {
                history.recommendations = remembered.recommendations.clone();
            }
        }
        history
    }

    /// Remembers the scale events of `state`, the history after a scale write of `p` (the
    /// remembered recommendations stay).
    pub fn remember(&self, p: &ScalingPolicy, state: &PolicyState) {
        if let Ok(mut entries) = self.entries.lock() {
            let mut kept = state.scale_events_only();
            if let Some((uid, old)) = entries.get(&key(p))
                && *uid == p.metadata.uid
            {
                kept.recommendations = old.recommendations.clone();
            }
            entries.insert(key(p), (p.metadata.uid.clone(), kept));
        }
    }

    /// Remembers the recommendations of `state` (the windows' memory after an evaluation of
    /// `p`), after every evaluation: a status whose only news is the time is not written at
    /// once, and a window must not lose the recommendations it did not write.
    pub fn remember_recommendations(&self, p: &ScalingPolicy, state: &PolicyState) {
        if let Ok(mut entries) = self.entries.lock() {
            let entry = entries
                .entry(key(p))
                .or_insert_with(|| (p.metadata.uid.clone(), PolicyState::default()));
            if entry.0 != p.metadata.uid {
                *entry = (p.metadata.uid.clone(), PolicyState::default());
            }
            entry.1.recommendations = state.recommendations.clone();
        }
    }

    /// Remembers the last time a metric of `p` was active (`lastActiveTime`), after every
    /// evaluation: status is written at most every few seconds while nothing else changes, and
    /// the cooldown must run from the last active evaluation, not from the last one written.
    pub fn remember_activity(&self, p: &ScalingPolicy, last_active: Option<DateTime<Utc>>) {
        let Some(t) = last_active else { return };
        if let Ok(mut entries) = self.entries.lock() {
            let entry = entries
                .entry(key(p))
                .or_insert_with(|| (p.metadata.uid.clone(), PolicyState::default()));
            if entry.0 != p.metadata.uid {
                *entry = (p.metadata.uid.clone(), PolicyState::default());
            }
            entry.1.last_active_time = Some(entry.1.last_active_time.map_or(t, |old| old.max(t)));
        }
    }

    /// Forgets the policies for which `keep(namespace/name)` is false (deleted ones).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.retain(|k, _| keep(k));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::state::ScaleEvent;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn policy(uid: &str) -> ScalingPolicy {
        let mut p: ScalingPolicy = serde_yaml::from_str(
            "apiVersion: kscale.dev/v1alpha1\nkind: ScalingPolicy\nmetadata: {name: p, namespace: n}\nspec:\n  targetRef: {kind: Deployment, name: d}\n  maxReplicas: 3\n  metrics: []\n",
        )
        .unwrap();
        p.metadata.uid = Some(uid.into());
        p
    }

    #[test]
    fn an_event_missing_from_status_still_counts() {
        let memory = ScaleMemory::default();
        let mut p = policy("u1");
        let applied = PolicyState {
            scale_up_events: vec![ScaleEvent {
                change: 1,
                time: at(0),
            }],
            last_scale_time: Some(at(0)),
            ..PolicyState::default()
        };
        memory.remember(&p, &applied);
        // The status write failed: status has no event, memory does.
        let h = memory.history(&p, at(10));
        assert_eq!(h.scale_up_events, applied.scale_up_events);
        // A forged status event is saturated, and merged with memory's.
        let mut status = crate::crd::ScalingPolicyStatus::default();
        status.history.scale_up_events = vec![ScaleEvent {
            change: i32::MIN,
            time: at(5),
        }];
        p.status = Some(status);
        let h = memory.history(&p, at(10));
        assert_eq!(h.scale_up_events.len(), 2);
        assert!(h.scale_up_events.iter().all(|e| e.change >= 0));
        // A re-created policy (another uid) does not inherit the events.
        assert!(
            memory
                .history(&policy("u2"), at(10))
                .scale_up_events
                .is_empty()
        );
        memory.retain(|_| false);
        assert!(
            memory
                .history(&policy("u1"), at(10))
                .scale_up_events
                .is_empty()
        );
    }

    /// `fallback.failureThreshold`'s count comes back from status after a restart (a new
    /// process has nothing in memory).
    #[test]
    fn the_failure_count_is_read_back_from_status() {
        let mut p = policy("u1");
        let mut status = crate::crd::ScalingPolicyStatus::default();
        status.history.consecutive_failures = 2;
        p.status = Some(status);
        let json = serde_json::to_value(p.status.as_ref()).unwrap();
        assert_eq!(json["consecutiveFailures"], 2);
        p.status = serde_json::from_value(json).unwrap();
        let h = ScaleMemory::default().history(&p, at(0));
        assert_eq!(h.consecutive_failures, 2);
    }

    /// A review's finding: status is not written while only the time changes, so the
    /// recommendations of those evaluations live in memory; the window counts them, or a
    /// scale-down comes up to a refresh period early.
    #[test]
    fn recommendations_not_written_still_count_in_the_window() {
        use crate::policy::state::Recommendation;
        let memory = ScaleMemory::default();
        let mut p = policy("u1");
        let rec = |replicas, s| Recommendation {
            replicas,
            time: at(s),
        };
        // Status, last written at 0, has 4@0; the evaluations since said 4 at 100 and 200.
        let mut status = crate::crd::ScalingPolicyStatus::default();
        status.history.recommendations = vec![rec(4, 0)];
        p.status = Some(status);
        let evaluated = PolicyState {
            recommendations: vec![rec(4, 0), rec(4, 100), rec(4, 200)],
            ..PolicyState::default()
        };
        memory.remember_recommendations(&p, &evaluated);
        assert_eq!(
            memory.history(&p, at(201)).recommendations,
            evaluated.recommendations
        );
        // A scale write keeps them.
        memory.remember(&p, &PolicyState::default());
        assert_eq!(
            memory.history(&p, at(201)).recommendations,
            evaluated.recommendations
        );
        // A newer status (another leader wrote since) wins over older memory.
        let mut newer = crate::crd::ScalingPolicyStatus::default();
        newer.history.recommendations = vec![rec(2, 300)];
        p.status = Some(newer);
        assert_eq!(
            memory.history(&p, at(301)).recommendations,
            vec![rec(2, 300)]
        );
    }
}
