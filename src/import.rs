//! `kscale import`: HorizontalPodAutoscalers written as equivalent ScalingPolicies.
//!
//! An HPA of `autoscaling/v1`, `v2beta2` or `v2` (read from the cluster, which serves every
//! HPA as `v2`, or from YAML files as `kubectl get hpa -o yaml` writes them, `List`s included)
//! becomes a ScalingPolicy on the same `scaleTargetRef` with the same bounds, metrics and
//! `behavior` (the same Kubernetes types, carried field for field), so that kscale's
//! HPA-compatible arithmetic gives the HPA's decisions. What kscale cannot carry is named
//! field by field, and an HPA with any such field is not imported: a policy scaling on a subset
//! of the HPA's signals would decide differently while claiming to be its equivalent.
//!
//! Defaults are the HPA's own (`SetDefaults_HorizontalPodAutoscaler`): `minReplicas` 1, and a
//! `cpu` `Utilization` target of 80 % when no metric is given. The interval is the HPA
//! controller's default sync period, 15 s.

use std::fmt;

use k8s_openapi::api::autoscaling::{v1, v2};
use serde_yaml::Value;

use crate::crd::{
    ExternalMetricSource, MetricIdentifier, MetricSpec, Mode, ObjectMetricSource, PodsMetricSource,
    ResourceSource, ScalingPolicy, ScalingPolicySpec,
};

/// The annotation naming the HPA a policy was imported from (`autoscaling/v2
/// HorizontalPodAutoscaler shop/backend`).
pub const IMPORTED_FROM: &str = "kscale.dev/imported-from";

/// The HPA controller's default `--horizontal-pod-autoscaler-sync-period`.
pub const HPA_SYNC_PERIOD: &str = "15s";

/// The `cpu` utilization the HPA defaults to when it names no metric (percent).
pub const HPA_DEFAULT_CPU_UTILIZATION: i32 = 80;

/// A field of an HPA that kscale cannot carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotCarried {
    /// `namespace/name` of the HPA (or `FILE document N` when it has no name).
    pub hpa: String,
    /// The field path in the HPA (`spec.metrics[1].type`).
    pub field: String,
    /// Why.
    pub why: String,
}

impl fmt::Display for NotCarried {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.hpa, self.field, self.why)
    }
}

/// The ScalingPolicy equivalent to `hpa` in mode `mode`, or every field that cannot be carried.
/// `api_version` is the version the HPA was written in (for the annotation).
pub fn from_v2(
    hpa: &v2::HorizontalPodAutoscaler,
    api_version: &str,
    mode: Mode,
) -> Result<ScalingPolicy, Vec<NotCarried>> {
    let name = hpa.metadata.name.clone().unwrap_or_default();
    let namespace = hpa.metadata.namespace.clone();
    let shown = shown(hpa);
    let not_carried = |field: String, why: String| NotCarried {
        hpa: shown.clone(),
        field,
        why,
    };
    let mut problems = Vec::new();
    let spec = &hpa.spec;
    let mut metrics = Vec::new();
    match spec.metrics.as_deref() {
        None | Some([]) => metrics.push(MetricSpec {
            name: "cpu".into(),
            resource: Some(ResourceSource {
                name: "cpu".into(),
                container: None,
            }),
            ..custom_metric(
                "",
                &v2::MetricTarget {
                    type_: "Utilization".into(),
                    average_utilization: Some(HPA_DEFAULT_CPU_UTILIZATION),
                    ..Default::default()
                },
            )
        }),
        Some(list) => {
            for (i, m) in list.iter().enumerate() {
                match metric(m, &format!("spec.metrics[{i}]")) {
                    Ok(spec) => metrics.push(spec),
                    Err((field, why)) => problems.push(not_carried(field, why)),
                }
            }
        }
    }
    // Names are the formula's identifiers and must be unique: `cpu`, then `cpu_2`.
    // At minReplicas 0 a resource metric keeps the HPA's meaning: pods that use any cpu or
    // memory propose at least one replica, so the target stays up (kscale asks for the
    // threshold to be written out: it is what keeps a target from ever going idle).
    if spec.min_replicas == Some(0) {
        for m in metrics.iter_mut().filter(|m| m.resource.is_some()) {
            m.activation_threshold.get_or_insert_with(|| {
                k8s_openapi::apimachinery::pkg::api::resource::Quantity("0".into())
            });
        }
    }
    // A renamed one skips any name taken, a later metric's own included (`cpu`, `cpu`,
    // `cpu_2` become `cpu`, `cpu_3`, `cpu_2`).
    let mut taken: std::collections::HashSet<String> = std::collections::HashSet::new();
    let own: Vec<String> = metrics.iter().map(|m| m.name.clone()).collect();
    for (i, m) in metrics.iter_mut().enumerate() {
        if taken.contains(&m.name) {
            m.name = (2..)
                .map(|n| format!("{}_{n}", m.name))
                .find(|c| !taken.contains(c) && !own[i + 1..].contains(c))
                .unwrap_or_default();
        }
        taken.insert(m.name.clone());
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut policy = ScalingPolicy::new(
        &name,
        ScalingPolicySpec {
            target_ref: spec.scale_target_ref.clone(),
            mode,
            min_replicas: Some(spec.min_replicas.unwrap_or(1)),
            max_replicas: spec.max_replicas,
            interval: Some(HPA_SYNC_PERIOD.into()),
            metrics,
            behavior: spec.behavior.clone(),
            ..empty_spec()
        },
    );
    policy.metadata.namespace = namespace;
    // A deploy tool's tracking labels stay behind: the policy is not that tool's object
    // until it is in the tool's source ([`notes`] names each one left).
    policy.metadata.labels = hpa.metadata.labels.as_ref().and_then(|labels| {
        let kept: std::collections::BTreeMap<String, String> = labels
            .iter()
            .filter(|(k, _)| !is_tracking_label(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        (!kept.is_empty()).then_some(kept)
    });
    policy.metadata.annotations = Some(
        [(
            IMPORTED_FROM.to_string(),
            format!("{api_version} HorizontalPodAutoscaler {shown}"),
        )]
        .into(),
    );
    Ok(policy)
}

/// Labels by which a deploy tool (Helm, Argo CD, Flux) recognises its own objects. Copied onto
/// an imported policy, they would make the tool treat the policy as its own and prune it, or
/// report it out of sync.
pub const TRACKING_LABELS: &[&str] = &[
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "argocd.argoproj.io/instance",
    "helm.sh/chart",
    "kustomize.toolkit.fluxcd.io/name",
    "kustomize.toolkit.fluxcd.io/namespace",
    "helm.toolkit.fluxcd.io/name",
    "helm.toolkit.fluxcd.io/namespace",
];

fn is_tracking_label(key: &str) -> bool {
    TRACKING_LABELS.contains(&key)
}

/// What an import of `hpa` carries differently from the HPA, each named by field, for standard
/// error beside the policy written: the tracking labels left behind, and a `minReplicas: 0`
/// (kscale goes to 0 after every metric was inactive for `spec.cooldown`, the HPA as soon as
/// its proposal is 0).
pub fn notes(hpa: &v2::HorizontalPodAutoscaler) -> Vec<NotCarried> {
    let shown = shown(hpa);
    let mut out: Vec<NotCarried> = hpa
        .metadata
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| is_tracking_label(k))
        .map(|(k, _)| NotCarried {
            hpa: shown.clone(),
            field: format!("metadata.labels[{k}]"),
            why: "not copied: a deploy tool's tracking label (add the policy to that tool's source to have it managed)".into(),
        })
        .collect();
    if hpa.spec.min_replicas == Some(0) {
        out.push(NotCarried {
            hpa: shown,
            field: "spec.minReplicas".into(),
            why: "0 carried: kscale goes to 0 once every metric has been at or under its activationThreshold (0; written out on resource metrics, so running pods that use any cpu or memory keep the target up, as in the HPA) for spec.cooldown (default 5m), the HPA as soon as every proposal is 0".into(),
        });
    }
    out
}

/// How an HPA is named in what import reports: `namespace/name`, or the name alone.
fn shown(hpa: &v2::HorizontalPodAutoscaler) -> String {
    let name = hpa.metadata.name.clone().unwrap_or_default();
    match &hpa.metadata.namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name,
    }
}

/// A spec with nothing set, for struct update syntax.
fn empty_spec() -> ScalingPolicySpec {
    ScalingPolicySpec {
        target_ref: Default::default(),
        mode: Mode::default(),
        min_replicas: None,
        max_replicas: 0,
        idle_replicas: None,
        cooldown: None,
        interval: None,
        prometheus: None,
        metrics: Vec::new(),
        formula: None,
        behavior: None,
        schedules: Vec::new(),
        fallback: None,
        forecast: None,
        paused: None,
        paused_replicas: None,
        paused_scale_in: None,
        paused_scale_out: None,
        takeover: None,
    }
}

/// One HPA metric as a kscale metric, or the field that cannot be carried and why.
fn metric(m: &v2::MetricSpec, path: &str) -> Result<MetricSpec, (String, String)> {
    let resource = |name: &str, container: Option<&str>, target: &v2::MetricTarget, field: &str| {
        if name != "cpu" && name != "memory" {
            return Err((
                format!("{path}.{field}.name"),
                format!("resource {name:?}: kscale reads cpu and memory only"),
            ));
        }
        let metric_name = match container {
            Some(c) => identifier(&format!("{name}_{c}")),
            None => name.to_string(),
        };
        Ok(MetricSpec {
            name: metric_name,
            resource: Some(ResourceSource {
                name: name.to_string(),
                container: container.map(str::to_string),
            }),
            ..custom_metric("", target)
        })
    };
    match m.type_.as_str() {
        "Resource" => {
            let r = required(m.resource.as_ref(), path, "resource", "Resource")?;
            resource(&r.name, None, &r.target, "resource")
        }
        "ContainerResource" => {
            let r = required(
                m.container_resource.as_ref(),
                path,
                "containerResource",
                "ContainerResource",
            )?;
            resource(&r.name, Some(&r.container), &r.target, "containerResource")
        }
        "Pods" => {
            let p = required(m.pods.as_ref(), path, "pods", "Pods")?;
            let metric = identifier_of(&p.metric, &format!("{path}.pods.metric"))?;
            Ok(MetricSpec {
                pods: Some(PodsMetricSource { metric }),
                ..custom_metric(&p.metric.name, &p.target)
            })
        }
        "Object" => {
            let o = required(m.object.as_ref(), path, "object", "Object")?;
            let metric = identifier_of(&o.metric, &format!("{path}.object.metric"))?;
            Ok(MetricSpec {
                object: Some(ObjectMetricSource {
                    described_object: o.described_object.clone(),
                    metric,
                }),
                ..custom_metric(&o.metric.name, &o.target)
            })
        }
        "External" => {
            let e = required(m.external.as_ref(), path, "external", "External")?;
            let metric = identifier_of(&e.metric, &format!("{path}.external.metric"))?;
            Ok(MetricSpec {
                external: Some(ExternalMetricSource { metric }),
                ..custom_metric(&e.metric.name, &e.target)
            })
        }
        other => Err((
            format!("{path}.type"),
            format!(
                "unknown metric type {other:?} (expected Resource, ContainerResource, Pods, Object or External)"
            ),
        )),
    }
}

/// The source field of metric type `type_`, or the field that is missing.
fn required<'a, T>(
    source: Option<&'a T>,
    path: &str,
    field: &str,
    type_: &str,
) -> Result<&'a T, (String, String)> {
    source.ok_or_else(|| {
        (
            format!("{path}.{field}"),
            format!("missing for type {type_}"),
        )
    })
}

/// A kscale metric named after a metrics-API metric, with the HPA's target and no source yet.
fn custom_metric(name: &str, target: &v2::MetricTarget) -> MetricSpec {
    MetricSpec {
        name: identifier(name),
        prometheus: None,
        resource: None,
        pods: None,
        object: None,
        external: None,
        target: target.clone(),
        activation_threshold: None,
    }
}

/// An HPA's `MetricIdentifier` as kscale's, or the field if its name is not one kscale can put
/// in a request path.
fn identifier_of(
    m: &v2::MetricIdentifier,
    path: &str,
) -> Result<MetricIdentifier, (String, String)> {
    if !crate::policy::compile::is_api_metric_name(&m.name) {
        return Err((
            format!("{path}.name"),
            format!(
                "{:?}: kscale reads metric names of letters, digits and _ . : | - only",
                m.name
            ),
        ));
    }
    Ok(MetricIdentifier {
        name: m.name.clone(),
        selector: m.selector.clone(),
    })
}

/// `text` as a metric name (`^[a-z_][a-z0-9_]*$`, at most 63 characters).
fn identifier(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out.chars().take(63).collect()
}

/// An `autoscaling/v1` HPA in `autoscaling/v2` terms, as the apiserver converts it: its
/// `targetCPUUtilizationPercentage` (default 80) is a `cpu` `Utilization` metric.
pub fn v1_to_v2(hpa: &v1::HorizontalPodAutoscaler) -> v2::HorizontalPodAutoscaler {
    let s = &hpa.spec;
    let spec = v2::HorizontalPodAutoscalerSpec {
        scale_target_ref: v2::CrossVersionObjectReference {
            api_version: s.scale_target_ref.api_version.clone(),
            kind: s.scale_target_ref.kind.clone(),
            name: s.scale_target_ref.name.clone(),
        },
        min_replicas: s.min_replicas,
        max_replicas: s.max_replicas,
        metrics: Some(vec![v2::MetricSpec {
            type_: "Resource".into(),
            resource: Some(v2::ResourceMetricSource {
                name: "cpu".into(),
                target: v2::MetricTarget {
                    type_: "Utilization".into(),
                    average_utilization: Some(
                        s.target_cpu_utilization_percentage
                            .unwrap_or(HPA_DEFAULT_CPU_UTILIZATION),
                    ),
                    ..Default::default()
                },
            }),
            ..Default::default()
        }]),
        behavior: None,
    };
    v2::HorizontalPodAutoscaler {
        metadata: hpa.metadata.clone(),
        spec,
        status: None,
    }
}

/// Why a file's document could not be read as an HPA.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file cannot be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Not YAML, or not an HPA of a known version.
    #[error("{path} document {document}: {message}")]
    Document {
        /// File.
        path: String,
        /// 1-based document number.
        document: usize,
        /// What is wrong, naming the field.
        message: String,
    },
}

/// The HPAs of YAML `text` (several documents, `List`s and `HorizontalPodAutoscalerList`s
/// included; documents of other kinds are skipped), each with the version it was written in.
pub fn hpas_of_yaml(
    path: &str,
    text: &str,
) -> Result<Vec<(String, v2::HorizontalPodAutoscaler)>, ImportError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let bad = |message: String| ImportError::Document {
            path: path.to_string(),
            document,
            message,
        };
        let value = <Value as serde::Deserialize>::deserialize(doc)
            .map_err(|e| bad(format!("not valid YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        collect(&value, &bad, &mut out)?;
    }
    Ok(out)
}

fn collect(
    value: &Value,
    bad: &dyn Fn(String) -> ImportError,
    out: &mut Vec<(String, v2::HorizontalPodAutoscaler)>,
) -> Result<(), ImportError> {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    if kind == "List" || kind == "HorizontalPodAutoscalerList" {
        if let Some(items) = value.get("items").and_then(Value::as_sequence) {
            for item in items {
                // `kubectl get hpa -o yaml` lists items with their own kind; a typed list may not.
                let mut item = item.clone();
                if kind == "HorizontalPodAutoscalerList"
                    && let Value::Mapping(m) = &mut item
                {
                    m.entry("kind".into())
                        .or_insert_with(|| "HorizontalPodAutoscaler".into());
                    m.entry("apiVersion".into())
                        .or_insert_with(|| api_version.into());
                }
                collect(&item, bad, out)?;
            }
        }
        return Ok(());
    }
    if kind != "HorizontalPodAutoscaler" {
        return Ok(());
    }
    let parse_err =
        |e: serde_yaml::Error| bad(format!("{api_version} HorizontalPodAutoscaler: {e}"));
    let hpa = match api_version {
        "autoscaling/v2" => serde_yaml::from_value::<v2::HorizontalPodAutoscaler>(value.clone())
            .map_err(parse_err)?,
        // v2beta2's schema is v2's (v2 only promoted it): read under v2's apiVersion.
        "autoscaling/v2beta2" => {
            let mut as_v2 = value.clone();
            if let Value::Mapping(m) = &mut as_v2 {
                m.insert("apiVersion".into(), "autoscaling/v2".into());
            }
            serde_yaml::from_value::<v2::HorizontalPodAutoscaler>(as_v2).map_err(parse_err)?
        }
        "autoscaling/v1" => v1_to_v2(
            &serde_yaml::from_value::<v1::HorizontalPodAutoscaler>(value.clone())
                .map_err(parse_err)?,
        ),
        other => {
            return Err(bad(format!(
                "apiVersion {other:?}: kscale imports autoscaling/v1, autoscaling/v2beta2 and autoscaling/v2 (apply the HPA to a cluster and import it from there: the apiserver serves every HPA as autoscaling/v2)"
            )));
        }
    };
    out.push((api_version.to_string(), hpa));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::CompiledPolicy;

    fn one(yaml: &str) -> Result<ScalingPolicy, Vec<NotCarried>> {
        let hpas = hpas_of_yaml("t.yaml", yaml).unwrap();
        assert_eq!(hpas.len(), 1);
        from_v2(&hpas[0].1, &hpas[0].0, Mode::DryRun)
    }

    #[test]
    fn a_v2_hpa_carries_every_field_and_compiles() {
        let p = one(
            r#"
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: backend, namespace: shop, labels: {app: backend}}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: backend}
  minReplicas: 3
  maxReplicas: 20
  metrics:
  - type: Resource
    resource: {name: cpu, target: {type: Utilization, averageUtilization: 50}}
  - type: ContainerResource
    containerResource: {name: memory, container: app-server, target: {type: AverageValue, averageValue: 200Mi}}
  behavior:
    scaleDown:
      stabilizationWindowSeconds: 120
      policies: [{type: Pods, value: 1, periodSeconds: 60}]
      selectPolicy: Min
    scaleUp:
      tolerance: "0.05"
"#,
        )
        .unwrap();
        assert_eq!(p.metadata.name.as_deref(), Some("backend"));
        assert_eq!(p.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(
            p.metadata.annotations.as_ref().unwrap()[IMPORTED_FROM],
            "autoscaling/v2 HorizontalPodAutoscaler shop/backend"
        );
        let s = &p.spec;
        assert_eq!(s.mode, Mode::DryRun);
        assert_eq!((s.min_replicas, s.max_replicas), (Some(3), 20));
        assert_eq!(s.target_ref.name, "backend");
        assert_eq!(s.interval.as_deref(), Some("15s"));
        assert_eq!(s.metrics.len(), 2);
        assert_eq!(s.metrics[0].name, "cpu");
        assert_eq!(s.metrics[1].name, "memory_app_server");
        assert_eq!(
            s.metrics[1].resource.as_ref().unwrap().container.as_deref(),
            Some("app-server")
        );
        let b = s.behavior.as_ref().unwrap();
        assert_eq!(
            b.scale_down.as_ref().unwrap().stabilization_window_seconds,
            Some(120)
        );
        assert!(b.scale_up.as_ref().unwrap().tolerance.is_some());
        CompiledPolicy::from_resource(&p).expect("an imported policy compiles");
    }

    /// A review's findings: tracking labels were copied, `minReplicas: 0` went without a word,
    /// and a renamed duplicate could take a later metric's own name.
    #[test]
    fn tracking_labels_stay_behind_and_zero_and_renames_are_accounted_for() {
        let yaml = r#"
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: worker
  namespace: jobs
  labels: {app: worker, app.kubernetes.io/managed-by: Helm, app.kubernetes.io/instance: jobs}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: worker}
  minReplicas: 0
  maxReplicas: 20
  metrics:
  - type: External
    external: {metric: {name: queue}, target: {type: AverageValue, averageValue: "10"}}
  - type: Resource
    resource: {name: cpu, target: {type: Utilization, averageUtilization: 50}}
  - type: Resource
    resource: {name: cpu, target: {type: Utilization, averageUtilization: 60}}
  - type: ContainerResource
    containerResource: {name: cpu, container: "2", target: {type: Utilization, averageUtilization: 70}}
"#;
        let p = one(yaml).unwrap();
        assert_eq!(
            p.metadata.labels,
            Some([("app".to_string(), "worker".to_string())].into())
        );
        let names: Vec<&str> = p.spec.metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["queue", "cpu", "cpu_3", "cpu_2"]);
        assert_eq!(p.spec.min_replicas, Some(0));
        CompiledPolicy::from_resource(&p).expect("an external metric wakes it from 0");
        let hpas = hpas_of_yaml("t.yaml", yaml).unwrap();
        let notes: Vec<String> = notes(&hpas[0].1).iter().map(|n| n.to_string()).collect();
        assert_eq!(notes.len(), 3, "{notes:#?}");
        assert!(notes[0].starts_with("jobs/worker: metadata.labels[app.kubernetes.io/instance]: not copied: a deploy tool's tracking label"), "{notes:#?}");
        assert!(
            notes[1].starts_with(
                "jobs/worker: metadata.labels[app.kubernetes.io/managed-by]: not copied"
            ),
            "{notes:#?}"
        );
        assert!(
            notes[2].starts_with(
                "jobs/worker: spec.minReplicas: 0 carried: kscale goes to 0 once every metric"
            ),
            "{notes:#?}"
        );
    }

    #[test]
    fn v1_and_v2beta2_and_lists_are_read_with_the_hpas_defaults() {
        let hpas = hpas_of_yaml(
            "t.yaml",
            r#"
apiVersion: v1
kind: List
items:
- apiVersion: autoscaling/v1
  kind: HorizontalPodAutoscaler
  metadata: {name: a, namespace: n}
  spec:
    scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: a}
    maxReplicas: 5
- apiVersion: autoscaling/v1
  kind: HorizontalPodAutoscaler
  metadata: {name: b, namespace: n}
  spec:
    scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: b}
    minReplicas: 2
    maxReplicas: 5
    targetCPUUtilizationPercentage: 60
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: a}
---
apiVersion: autoscaling/v2beta2
kind: HorizontalPodAutoscaler
metadata: {name: c}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: StatefulSet, name: c}
  maxReplicas: 4
"#,
        )
        .unwrap();
        let versions: Vec<&str> = hpas.iter().map(|(v, _)| v.as_str()).collect();
        assert_eq!(
            versions,
            ["autoscaling/v1", "autoscaling/v1", "autoscaling/v2beta2"]
        );
        let policies: Vec<ScalingPolicy> = hpas
            .iter()
            .map(|(v, h)| from_v2(h, v, Mode::Controller).unwrap())
            .collect();
        let cpu = |p: &ScalingPolicy| p.spec.metrics[0].target.average_utilization;
        // The HPA's defaults: minReplicas 1, cpu at 80 %.
        assert_eq!(policies[0].spec.min_replicas, Some(1));
        assert_eq!(cpu(&policies[0]), Some(80));
        assert_eq!(cpu(&policies[1]), Some(60));
        assert_eq!(policies[1].spec.min_replicas, Some(2));
        assert_eq!(cpu(&policies[2]), Some(80));
        assert_eq!(policies[2].spec.target_ref.kind, "StatefulSet");
        for p in &policies {
            CompiledPolicy::from_resource(p).expect("compiles");
        }
    }

    #[test]
    fn what_cannot_be_carried_is_named_field_by_field() {
        let e = one(r#"
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: q, namespace: shop}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: q}
  maxReplicas: 5
  metrics:
  - type: Resource
    resource: {name: cpu, target: {type: Utilization, averageUtilization: 50}}
  - type: External
    external: {metric: {name: "queue/depth"}, target: {type: AverageValue, averageValue: "30"}}
  - type: Resource
    resource: {name: ephemeral-storage, target: {type: AverageValue, averageValue: 1Gi}}
"#)
        .unwrap_err();
        let text: Vec<String> = e.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 2, "{text:?}");
        assert!(
            text[0].starts_with("shop/q: spec.metrics[1].external.metric.name: \"queue/depth\""),
            "{text:?}"
        );
        assert!(
            text[1].starts_with(
                "shop/q: spec.metrics[2].resource.name: resource \"ephemeral-storage\""
            ),
            "{text:?}"
        );
        let e = hpas_of_yaml(
            "t.yaml",
            "apiVersion: autoscaling/v2beta1\nkind: HorizontalPodAutoscaler\nmetadata: {name: x}\n",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("t.yaml document 1: apiVersion \"autoscaling/v2beta1\""),
            "{e}"
        );
    }

    #[test]
    fn pods_object_and_external_metrics_are_carried_one_to_one() {
        let p = one(r#"
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: q, namespace: shop}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: q}
  maxReplicas: 9
  metrics:
  - type: Pods
    pods: {metric: {name: http_requests, selector: {matchLabels: {verb: GET}}}, target: {type: AverageValue, averageValue: 500m}}
  - type: Object
    object:
      describedObject: {apiVersion: networking.k8s.io/v1, kind: Ingress, name: main}
      metric: {name: requests-per-second}
      target: {type: Value, value: 2k}
  - type: External
    external: {metric: {name: queue_depth, selector: {matchExpressions: [{key: queue, operator: In, values: [orders]}]}}, target: {type: AverageValue, averageValue: "30"}}
"#)
        .unwrap();
        let m = &p.spec.metrics;
        assert_eq!(
            m.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            ["http_requests", "requests_per_second", "queue_depth"]
        );
        let pods = m[0].pods.as_ref().unwrap();
        assert_eq!(pods.metric.name, "http_requests");
        assert_eq!(
            pods.metric
                .selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()["verb"],
            "GET"
        );
        assert_eq!(m[0].target.average_value.as_ref().unwrap().0, "500m");
        let o = m[1].object.as_ref().unwrap();
        assert_eq!(o.described_object.kind, "Ingress");
        assert_eq!(o.metric.name, "requests-per-second");
        assert_eq!(m[1].target.type_, "Value");
        assert!(m[2].external.as_ref().unwrap().metric.selector.is_some());
        let compiled = CompiledPolicy::from_resource(&p).expect("an imported policy compiles");
        match &compiled.metrics[2].source {
            crate::policy::MetricSource::External { metric } => {
                assert_eq!(metric.selector, "queue in (orders)");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn container_names_become_metric_names() {
        assert_eq!(identifier("cpu_app-server.v2"), "cpu_app_server_v2");
        assert_eq!(identifier("9lives"), "_9lives");
    }
}
