//! A decision written as a ScalingPolicy status: what the controller, the adapter and
//! `kscale dry-run` report, and the history a restart resumes from.

use chrono::{DateTime, Utc};
use k8s_openapi::api::autoscaling::v2::CrossVersionObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{MetricStatus, ScalingPolicyStatus};
use crate::policy::behavior::{Limit, Stabilization};
use crate::policy::compile::{FailureAction, MetricSource, Target};
use crate::policy::{CompiledPolicy, Decision, Rule};
use crate::units::format_quantity;

/// The longest `status.shortReason`, in characters (also its schema's `maxLength`).
pub const MAX_SHORT_REASON_CHARS: usize = 60;
/// The longest `status.targets`, in characters (also its schema's `maxLength`).
pub const MAX_TARGETS_CHARS: usize = 120;

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
        short_reason: Some(short_reason(policy, decision)),
        targets: Some(targets(policy, decision)),
        // Set by the controller from `spec.targetRef`, which the compiled policy does not keep.
        reference: None,
        paused: decision.paused.map(|p| p.pause.label()),
        metrics,
        conditions,
        // Set by the controller when an HPA drives a DryRun policy's target.
        shadow: None,
        // A takeover is done once; its record stays.
        takeover: previous.and_then(|p| p.takeover.clone()),
        history: decision.state.clone().capped(),
    }
}

/// `status.reference`: the target as the HPA's `REFERENCE` column shows it, `<kind>/<name>`.
pub fn reference(target: &CrossVersionObjectReference) -> String {
    format!("{}/{}", target.kind, target.name)
}

/// `status.shortReason`: the change, what decided it and the limit that clipped it, in at
/// most [`MAX_SHORT_REASON_CHARS`] characters (`scale up 3→5 by rps`,
/// `hold 6→6 by fallback Hold, ScaleDownStabilized`).
pub fn short_reason(policy: &CompiledPolicy, decision: &Decision) -> String {
    let verb = match decision.replicas.cmp(&decision.current) {
        std::cmp::Ordering::Greater => "scale up",
        std::cmp::Ordering::Less => "scale down",
        std::cmp::Ordering::Equal => "hold",
    };
    let by = match decision.rule {
        Rule::ScalingDisabled => "scaling disabled at 0",
        Rule::AboveMax => "above maxReplicas",
        Rule::BelowMin => "below minReplicas",
        Rule::Metrics(Some(i)) => policy.metrics.get(i).map_or("metrics", |m| m.name.as_str()),
        Rule::Metrics(None) => "metrics",
        Rule::Formula => "formula",
        Rule::Fallback(FailureAction::Hold) => "fallback Hold",
        Rule::Fallback(FailureAction::Replicas(_)) => "fallback replicas",
        Rule::Paused(_) => "spec.paused*",
        Rule::PausedAtZero => "zero set by another",
        Rule::Idle => "idle",
    };
    // A bound that clipped the count decided it, whatever proposed before: say which bound
    // (`at minReplicas 3`, `at schedule working-hours floor 5`), not the rule it overrode.
    let schedule = |i: Option<usize>| i.and_then(|i| policy.schedules.get(i));
    let bound = decision.normalized.and_then(|n| match n.limit {
        Limit::TooFewReplicas => Some(match schedule(decision.schedule.floor) {
            Some(s) => format!("at schedule {} floor {}", s.label, decision.min_replicas),
            None => format!("at minReplicas {}", decision.min_replicas),
        }),
        Limit::TooManyReplicas => Some(match schedule(decision.schedule.ceiling) {
            Some(s) => format!("at schedule {} ceiling {}", s.label, decision.max_replicas),
            None => format!("at maxReplicas {}", decision.max_replicas),
        }),
        _ => None,
    });
    let mut out = match &bound {
        Some(bound) => format!("{verb} {}→{} {bound}", decision.current, decision.replicas),
        None => format!("{verb} {}→{} by {by}", decision.current, decision.replicas),
    };
    if let Some(n) = decision.normalized {
        match n.stabilization {
            Stabilization::ScaleUpStabilized => out.push_str(", ScaleUpStabilized"),
            Stabilization::ScaleDownStabilized => out.push_str(", ScaleDownStabilized"),
            Stabilization::ReadyForNewScale => {}
        }
        if bound.is_none() && n.limit != Limit::DesiredWithinRange {
            out.push_str(", ");
            out.push_str(n.limit.reason());
        }
    }
    truncate_chars(out, MAX_SHORT_REASON_CHARS)
}

/// `status.targets`: each metric against its target as the HPA's `TARGETS` column shows them
/// (`112500m/70 (rps), 43%/60% (cpu)`), in at most [`MAX_TARGETS_CHARS`] characters; the
/// metrics that do not fit are counted (`+ 2 more`).
pub fn targets(policy: &CompiledPolicy, decision: &Decision) -> String {
    let entries: Vec<String> = policy
        .metrics
        .iter()
        .zip(&decision.metrics)
        .map(|(m, o)| {
            let (value, target) = match m.target {
                Target::Utilization(p) => (
                    o.value.map(|v| format!("{}%", format_quantity(v))),
                    format!("{p}%"),
                ),
                Target::AverageValue(_) => {
                    // A Prometheus value is the total: per replica, as the HPA shows an
                    // External AverageValue (the total at 0 replicas). A resource value is
                    // already an average over pods.
                    let per_replica = |v: f64| match m.source {
                        MetricSource::Prometheus { .. }
                        | MetricSource::Object { .. }
                        | MetricSource::External { .. }
                            if decision.current > 0 =>
                        {
                            v / f64::from(decision.current)
                        }
                        _ => v,
                    };
                    (
                        o.value.map(|v| format_quantity(per_replica(v))),
                        format_quantity(m.target.value()),
                    )
                }
                Target::Value(_) => (
                    o.value.map(format_quantity),
                    format_quantity(m.target.value()),
                ),
            };
            let value = value.unwrap_or_else(|| format!("<{}>", o.state.as_str()));
            format!("{value}/{target} ({})", m.name)
        })
        .collect();
    let mut out = String::new();
    for (i, entry) in entries.iter().enumerate() {
        let more = entries.len() - i - 1;
        let tail = if more > 0 {
            format!(", + {more} more")
        } else {
            String::new()
        };
        let separator = if i == 0 { "" } else { ", " };
        let fits =
            out.chars().count() + separator.len() + entry.chars().count() + tail.chars().count()
                <= MAX_TARGETS_CHARS;
        if !fits {
            let rest = entries.len() - i;
            let note = if i == 0 {
                format!("+ {rest} more")
            } else {
                format!(", + {rest} more")
            };
            out.push_str(&note);
            break;
        }
        out.push_str(separator);
        out.push_str(entry);
    }
    truncate_chars(out, MAX_TARGETS_CHARS)
}

/// `text` cut to at most `max` characters, with `…` where it was cut.
pub fn truncate_chars(text: String, max: usize) -> String {
    if text.chars().count() <= max {
        return text;
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
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
        // The kubectl columns: the value per replica against the target, and a short reason.
        assert_eq!(s1.targets.as_deref(), Some("225/100 (rps)"));
        assert_eq!(
            s1.short_reason.as_deref(),
            Some("scale up 2→4 by rps, ScaleUpLimit")
        );
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

    /// A new user's finding: `hold 5→5 by formula, ScaleDownStabilized, TooFewReplicas` where a
    /// schedule's floor of 5 decided. The bound that decided is named, with its value.
    #[test]
    fn the_short_reason_names_the_bound_that_decided() {
        let policy = |extra: &str| {
            let p: ScalingPolicy = serde_yaml::from_str(&format!(
                r#"
apiVersion: kscale.dev/v1alpha1
kind: ScalingPolicy
metadata: {{name: p, namespace: d}}
spec:
  targetRef: {{kind: Deployment, name: web}}
  minReplicas: 2
  maxReplicas: 4
  metrics:
  - name: rps
    prometheus: {{query: 'sum(rps)'}}
    target: {{type: AverageValue, averageValue: "100"}}
  behavior: {{scaleDown: {{stabilizationWindowSeconds: 0}}}}
{extra}"#
            ))
            .unwrap();
            CompiledPolicy::from_resource(&p).unwrap()
        };
        let t0 = "2026-11-30T12:00:00Z".parse::<DateTime<Utc>>().unwrap();
        let rps = |v: f64| {
            Observation::steady(
                3,
                vec![Sample::Series {
                    values: vec![v],
                    timestamp: t0,
                }],
            )
        };
        let reason = |p: &CompiledPolicy, v: f64| {
            short_reason(p, &evaluate(p, &rps(v), &PolicyState::default(), t0))
        };
        let plain = policy("");
        assert_eq!(reason(&plain, 100.0), "scale down 3→2 at minReplicas 2");
        assert_eq!(reason(&plain, 900.0), "scale up 3→4 at maxReplicas 4");
        assert_eq!(reason(&plain, 300.0), "hold 3→3 by rps");
        let scheduled = policy(
            "  schedules:\n  - {name: working-hours, cron: '0 8 * * *', duration: 10h, minReplicas: 3}\n",
        );
        assert_eq!(
            reason(&scheduled, 100.0),
            "hold 3→3 at schedule working-hours floor 3"
        );
    }

    #[test]
    fn the_targets_column_stays_within_its_bound() {
        let metrics: String = (0..16)
            .map(|i| {
                format!(
                    "  - name: a_metric_with_a_rather_long_name_{i:02}\n    prometheus: {{query: 'sum(x)'}}\n    target: {{type: Value, value: \"10\"}}\n"
                )
            })
            .collect();
        let p: ScalingPolicy = serde_yaml::from_str(&format!(
            "apiVersion: kscale.dev/v1alpha1\nkind: ScalingPolicy\nmetadata: {{name: p}}\nspec:\n  targetRef: {{kind: Deployment, name: web}}\n  maxReplicas: 10\n  metrics:\n{metrics}"
        ))
        .unwrap();
        let policy = CompiledPolicy::from_resource(&p).unwrap();
        let t0 = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let mut samples: Vec<Sample> = (0..16)
            .map(|_| Sample::Series {
                values: vec![12.5],
                timestamp: t0,
            })
            .collect();
        samples[0] = Sample::Missing {
            reason: "empty".into(),
        };
        let d = evaluate(
            &policy,
            &Observation::steady(2, samples),
            &PolicyState::default(),
            t0,
        );
        let t = targets(&policy, &d);
        assert!(t.chars().count() <= MAX_TARGETS_CHARS, "{t}");
        assert!(
            t.starts_with("<Missing>/10 (a_metric_with_a_rather_long_name_00), 12500m/10 (a_metric_with_a_rather_long_name_01), + 14 more"),
            "{t}"
        );
        let r = short_reason(&policy, &d);
        assert!(r.chars().count() <= MAX_SHORT_REASON_CHARS, "{r}");
        // A missing metric forbids a scale-down only: the others may still raise the count.
        assert_eq!(r, "scale up 2→3 by a_metric_with_a_rather_long_name_01");
        // A metric name of 63 characters still fits the short reason, cut with an ellipsis.
        let long = truncate_chars("x".repeat(100), MAX_SHORT_REASON_CHARS);
        assert_eq!(long.chars().count(), MAX_SHORT_REASON_CHARS);
        assert!(long.ends_with('…'));
    }
}
