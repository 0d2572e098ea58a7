//! The samples of `pods`, `object` and `external` metrics at an evaluation
//! ([`crate::source::custom`] does the reading): what each needs of the target is checked first,
//! as for the other sources, so a missing selector or unreadable pods fail the metric naming why.

use k8s_openapi::api::autoscaling::v2::CrossVersionObjectReference;
use k8s_openapi::api::core::v1::Pod;

use super::Context;
use crate::model::Sample;
use crate::policy::{MetricSource, Target};
use crate::source::custom;

/// A `Value` target's proposal multiplies by the ready pods (External and Object metrics, and
/// Prometheus ones, which follow the External rules): without them the metric fails, naming why
/// the pods are unknown.
pub fn value_needs_pods(pods_unknown: &Option<String>, target: Target) -> Option<Sample> {
    match (pods_unknown, target) {
        (Some(why), Target::Value(_)) => Some(Sample::Error {
            message: format!(
                "{why}; a Value target multiplies by the ready pods, which kscale does not make up"
            ),
        }),
        _ => None,
    }
}

/// The sample of a `pods`, `object` or `external` metric; `None` for the other sources.
pub async fn sample(
    ctx: &Context,
    namespace: &str,
    source: &MetricSource,
    target: Target,
    (selector, pods, pods_unknown): (Option<&str>, Option<&[Pod]>, &Option<String>),
) -> Option<Sample> {
    if let Some(s) = value_needs_pods(pods_unknown, target) {
        return Some(s);
    }
    Some(match source {
        MetricSource::Prometheus { .. } | MetricSource::Resource { .. } => return None,
        MetricSource::Pods { metric } => match (selector, pods) {
            (Some(selector), Some(pods)) => {
                custom::pods_metric(&ctx.client, namespace, metric, selector, pods).await
            }
            _ => Sample::Error {
                message: pods_unknown
                    .clone()
                    .unwrap_or_else(|| "the target's pods are unknown".into()),
            },
        },
        MetricSource::Object {
            api_version,
            kind,
            name,
            metric,
        } => {
            let reference = CrossVersionObjectReference {
                api_version: Some(api_version.clone()),
                kind: kind.clone(),
                name: name.clone(),
            };
            match crate::actuate::described_resource(
                &ctx.client,
                Some(&ctx.kinds),
                namespace,
                &reference,
            )
            .await
            {
                Ok(ar) => {
                    custom::object_metric(
                        &ctx.client,
                        namespace,
                        (&ar.plural, &ar.group, kind, name),
                        metric,
                    )
                    .await
                }
                Err(e) => Sample::Error {
                    message: format!(
                        "unable to get metric {}: describedObject {api_version} {kind} {name}: {e}",
                        metric.name
                    ),
                },
            }
        }
        MetricSource::External { metric } => {
            custom::external_metric(&ctx.client, namespace, metric).await
        }
    })
}
