//! A decision written as a ScalingPolicy status: what the controller, the adapter and
//! `kscale dry-run` report, and the history a restart resumes from.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{MetricStatus, ScalingPolicyStatus};
use crate::policy::{CompiledPolicy, Decision};
use crate::units::format_quantity;

/// A chrono time as a Kubernetes `Time`.
pub fn k8s_time(t: DateTime<Utc>) -> Time {
    let ts = k8s_openapi::jiff::Timestamp::new(t.timestamp(), t.timestamp_subsec_nanos() as i32)
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    Time(ts)
}

/// Builds the status for `decision`, keeping each condition's `lastTransitionTime` from
/// `previous` when its status did not change (as Kubernetes conditions do).
pub fn status_from_decision(
    policy: &CompiledPolicy,
    decision: &Decision,
    previous: Option<&ScalingPolicyStatus>,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> ScalingPolicyStatus {
    let metrics = policy
        .metrics
        .iter()
        .zip(&decision.metrics)
        .map(|(m, o)| MetricStatus {
            name: m.name.clone(),
            state: o.state.as_str().to_string(),
            value: o.value.map(format_quantity),
            proposal: o.proposal,
            message: o.message.clone(),
            forecast: o.forecast.map(|(f, _)| format_quantity(f.upper)),
        })
        .collect();
    let conditions = decision
        .conditions()
        .into_iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let since = previous
                .and_then(|p| p.conditions.iter().find(|old| old.type_ == c.type_))
                .filter(|old| old.status == status)
                .map_or_else(|| k8s_time(now), |old| old.last_transition_time.clone());
            Condition {
                type_: c.type_.to_string(),
                status: status.to_string(),
                reason: c.reason.to_string(),
                message: c.message.to_string(),
                last_transition_time: since,
                observed_generation: generation,
            }
        })
        .collect();
    ScalingPolicyStatus {
        observed_generation: generation,
        current_replicas: Some(decision.current),
        desired_replicas: Some(decision.replicas),
        last_evaluation_time: Some(now),
        reason: Some(decision.reason(policy)),
        paused: decision.paused.map(|p| p.pause.label()),
        metrics,
        conditions,
        history: decision.state.clone().capped(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ScalingPolicy;
    use crate::model::{Observation, Sample};
    use crate::policy::{PolicyState, evaluate};

    #[test]
    fn status_round_trips_and_keeps_transition_times() {
        let p: ScalingPolicy = serde_yaml::from_str(
            r#"
apiVersion: kscale.dev/v1alpha1
kind: ScalingPolicy
metadata: {name: p, namespace: d}
spec:
  targetRef: {kind: Deployment, name: web}
  maxReplicas: 10
  metrics:
  - name: rps
    prometheus: {query: 'sum(x)'}
    target: {type: AverageValue, averageValue: "100"}
"#,
        )
        .unwrap();
        let policy = CompiledPolicy::from_resource(&p).unwrap();
        let t0 = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let obs = Observation::steady(
            2,
            vec![Sample::Series {
                values: vec![450.0],
                timestamp: t0,
            }],
        );
        let d = evaluate(&policy, &obs, &PolicyState::default(), t0);
        let s1 = status_from_decision(&policy, &d, None, Some(3), t0);
        assert_eq!(s1.desired_replicas, Some(4)); // legacy: max(2*2, 4)
        assert_eq!(s1.metrics[0].value.as_deref(), Some("450"));
        assert_eq!(s1.metrics[0].proposal, Some(5));
        assert_eq!(s1.metrics[0].forecast, None, "no spec.forecast");
        assert!(s1.reason.as_deref().unwrap().starts_with("scale up 2→4"));
        // Serializes as JSON and back, history included.
        let json = serde_json::to_value(&s1).unwrap();
        assert!(json["recommendations"].is_array());
        let back: ScalingPolicyStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, s1);
        // Same condition statuses a minute later keep their transition time.
        let t1 = t0 + chrono::TimeDelta::seconds(60);
        let s2 = status_from_decision(&policy, &d, Some(&s1), Some(3), t1);
        assert_eq!(s2.conditions[0].last_transition_time, k8s_time(t0));
        // A metric failure flips MetricsAvailable and moves its transition time.
        let failing = Observation {
            forecasts: Vec::new(),
            samples: vec![Sample::Error {
                message: "timeout".into(),
            }],
            ..obs
        };
        let d3 = evaluate(&policy, &failing, &s2.history, t1);
        let s3 = status_from_decision(&policy, &d3, Some(&s2), Some(3), t1);
        let ma = s3
            .conditions
            .iter()
            .find(|c| c.type_ == "MetricsAvailable")
            .unwrap();
        assert_eq!(
            (ma.status.as_str(), &ma.last_transition_time),
            ("False", &k8s_time(t1))
        );
        assert_eq!(s3.metrics[0].state, "Error");
        assert_eq!(s3.metrics[0].message.as_deref(), Some("timeout"));
    }
}
