//! The `ScalingPolicy` custom resource (`kscale.dev/v1alpha1`): spec, status and the CRD.
//!
//! The Rust types are the only source of the schema: `kscale crd` prints it, and the OpenAPI
//! constraints plus CEL `x-kubernetes-validations` rules here are what the apiserver enforces at
//! admission. Shapes are reused from `autoscaling/v2` wherever one exists: `targetRef` is the HPA's
//! `scaleTargetRef`, `metrics[].target` is `MetricTarget`, `behavior` is
//! `HorizontalPodAutoscalerBehavior`.

use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscalerBehavior, MetricTarget,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::state::PolicyState;

/// Pattern for Go-style durations accepted by `interval`, `duration` and `staleAfter`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h|d))+$";

/// What a ScalingPolicy does with its decision.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum Mode {
    /// kscale is the writer: it patches the target's `scale` subresource.
    #[default]
    Controller,
    /// kscale evaluates and publishes the metrics and the decision through
    /// `external.metrics.k8s.io`; an HPA stays the writer.
    ExternalMetric,
    /// kscale evaluates and reports in status, events and metrics, and never writes.
    DryRun,
}

/// Desired state of a ScalingPolicy.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kscale.dev",
    version = "v1alpha1",
    kind = "ScalingPolicy",
    plural = "scalingpolicies",
    shortname = "sp",
    namespaced,
    status = "ScalingPolicyStatus",
    printcolumn = r#"{"name":"Reference","type":"string","jsonPath":".status.reference"}"#,
    printcolumn = r#"{"name":"Targets","type":"string","jsonPath":".status.targets"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Min","type":"integer","jsonPath":".spec.minReplicas"}"#,
    printcolumn = r#"{"name":"Max","type":"integer","jsonPath":".spec.maxReplicas"}"#,
    printcolumn = r#"{"name":"Current","type":"integer","jsonPath":".status.currentReplicas"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.desiredReplicas"}"#,
    printcolumn = r#"{"name":"Paused","type":"string","jsonPath":".status.paused"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.shortReason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Detail","type":"string","jsonPath":".status.reason","priority":1}"#
)]
#[x_kube(validation = Rule::new("!has(self.minReplicas) || self.minReplicas <= self.maxReplicas").message("spec.maxReplicas must be at least spec.minReplicas").field_path(".maxReplicas"))]
#[x_kube(validation = Rule::new("!has(self.pausedReplicas) || !((has(self.paused) && self.paused) || (has(self.pausedScaleIn) && self.pausedScaleIn) || (has(self.pausedScaleOut) && self.pausedScaleOut))").message("spec.pausedReplicas pins the count and cannot be combined with spec.paused, spec.pausedScaleIn or spec.pausedScaleOut").field_path(".pausedReplicas"))]
#[x_kube(validation = Rule::new("!has(self.pausedReplicas) || (self.pausedReplicas <= self.maxReplicas && self.pausedReplicas >= (has(self.minReplicas) ? self.minReplicas : 1))").message("spec.pausedReplicas must be within [spec.minReplicas, spec.maxReplicas] (minReplicas defaults to 1)").field_path(".pausedReplicas"))]
#[x_kube(validation = Rule::new("!has(self.idleReplicas) || self.idleReplicas < (has(self.minReplicas) ? self.minReplicas : 1)").message("spec.idleReplicas must be below spec.minReplicas").field_path(".idleReplicas"))]
#[x_kube(validation = Rule::new("!has(self.cooldown) || has(self.idleReplicas) || (has(self.minReplicas) && self.minReplicas == 0)").message("spec.cooldown only applies with spec.minReplicas 0 or spec.idleReplicas").field_path(".cooldown"))]
#[x_kube(validation = Rule::new("!self.metrics.exists(m, has(m.activationThreshold)) || has(self.idleReplicas) || (has(self.minReplicas) && self.minReplicas == 0)").message("metrics[].activationThreshold only applies with spec.minReplicas 0 or spec.idleReplicas").field_path(".metrics"))]
#[x_kube(validation = Rule::new("!((has(self.minReplicas) && self.minReplicas == 0) || has(self.idleReplicas)) || self.metrics.all(m, !has(m.resource) || has(m.activationThreshold))").message("metrics[].activationThreshold is required on a resource metric when spec.minReplicas is 0 or spec.idleReplicas is set: a running pod always uses some cpu and memory, so with the default of 0 the target would never go idle").field_path(".metrics"))]
#[x_kube(validation = Rule::new("!((has(self.minReplicas) && self.minReplicas == 0) || (has(self.idleReplicas) && self.idleReplicas == 0)) || self.metrics.exists(m, has(m.prometheus) || has(m.object) || has(m.external))").message("spec.minReplicas 0 (or spec.idleReplicas 0) needs a prometheus, object or external metric to wake the target: resource and pods metrics have no pods to read at 0 replicas").field_path(".minReplicas"))]
#[x_kube(validation = Rule::new("!has(self.schedules) || self.schedules.all(s, !has(s.maxReplicas) || s.maxReplicas >= (has(self.minReplicas) ? self.minReplicas : 1))").message("a schedule's maxReplicas must be at least spec.minReplicas (default 1)").field_path(".schedules"))]
#[x_kube(validation = Rule::new("!has(self.schedules) || self.schedules.all(s, !has(s.minReplicas) || s.minReplicas <= self.maxReplicas)").message("a schedule's minReplicas must be at most spec.maxReplicas").field_path(".schedules"))]
#[x_kube(validation = Rule::new("!has(self.takeover) || !has(self.mode) || self.mode == 'Controller'").message("spec.takeover needs mode Controller: kscale becomes the writer of the target").field_path(".takeover"))]
#[serde(rename_all = "camelCase")]
pub struct ScalingPolicySpec {
    /// The workload to scale, as an HPA's `scaleTargetRef`: any kind with a `scale` subresource.
    pub target_ref: CrossVersionObjectReference,
    /// What kscale does with its decision (default `Controller`).
    #[serde(default)]
    pub mode: Mode,
    /// Lower bound for the replica count (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub min_replicas: Option<i32>,
    /// Upper bound for the replica count.
    #[schemars(range(min = 1))]
    pub max_replicas: i32,
    /// The replica count while every metric is inactive (at or below its
    /// `activationThreshold`) for `cooldown`: an integer below `minReplicas`, at least 0
    /// (KEDA's `idleReplicaCount`). Unset: 0 when `minReplicas` is 0, otherwise no idle state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub idle_replicas: Option<i32>,
    /// How long every metric must stay inactive before the target goes down to the idle count
    /// (0, or `idleReplicas`), a Go-style duration (default `5m`, at most `24h`; KEDA's
    /// `cooldownPeriod`). Only with `minReplicas: 0` or `idleReplicas`. The descent itself
    /// follows `behavior.scaleDown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h|d))+$"),
        length(max = 64)
    )]
    #[x_kube(validation = Rule::new(r"!self.matches('^([0-9]+(\\.[0-9]+)?(ns|us|ms|s|m|h|d))+$') || self.contains('d') || duration(self) <= duration('24h')").message("spec.cooldown must be at most 24h"))]
    pub cooldown: Option<String>,
    /// How often the policy is evaluated, a Go-style duration (default `15s`, at least `1s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h|d))+$"),
        length(max = 64)
    )]
    #[x_kube(validation = Rule::new(r"!self.matches('^([0-9]+(\\.[0-9]+)?(ns|us|ms|s|m|h|d))+$') || self.contains('d') || duration(self) >= duration('1s')").message("spec.interval must be at least 1s"))]
    pub interval: Option<String>,
    /// The Prometheus this policy's queries go to, with its credentials; the daemon's default
    /// (`--prometheus-url`) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusServer>,
    /// The signals to scale on; each proposes a replica count.
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = Rule::new("self.all(m, self.exists_one(n, n.name == m.name))").message("metric names must be unique"))]
    pub metrics: Vec<MetricSpec>,
    /// A CEL expression over the metrics' proposals (each metric's name) and values
    /// (`values.<name>`), plus `current` and `ready`; its result is the desired replica count.
    /// Default: the largest proposal, as the HPA does. kscale estimates its worst-case cost when
    /// it compiles the policy and refuses one over 100000 units (nested comprehensions multiply);
    /// admission only bounds its length, as no CEL rule can bound its nesting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub formula: Option<String>,
    /// Scaling behavior, exactly the HPA's (`autoscaling/v2`), per-direction tolerance included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behavior: Option<HorizontalPodAutoscalerBehavior>,
    /// Time windows that override the replica bounds (for example, more replicas in working hours).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub schedules: Vec<ScheduleSpec>,
    /// What to do when metrics are missing, stale, invalid or failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackSpec>,
    /// Predictive scaling: each Prometheus metric is also forecast `horizon` ahead, and the
    /// policy sizes for the larger of the current value and the forecast's upper bound. Off when
    /// unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forecast: Option<ForecastSpec>,
    /// Pause (KEDA's `autoscaling.keda.sh/paused`): `true` holds the target at its current
    /// replica count, whatever the metrics say. Evaluation goes on (status shows what the
    /// metrics would decide) and nothing is written. Default `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
    /// Pin (KEDA's `autoscaling.keda.sh/paused-replicas`): run exactly this many replicas,
    /// whatever the metrics, schedules or fallback say, reached in one step (no stabilization
    /// or rate limit). Must be within [`minReplicas`, `maxReplicas`]; not combinable with
    /// `paused`, `pausedScaleIn` or `pausedScaleOut`. Unset by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub paused_replicas: Option<i32>,
    /// Freeze scale-in (KEDA's `autoscaling.keda.sh/paused-scale-in`): `true` lets the count
    /// hold or rise, never fall (schedule ceilings and `maxReplicas` clamps included). Default
    /// `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_scale_in: Option<bool>,
    /// Freeze scale-out (KEDA's `autoscaling.keda.sh/paused-scale-out`): `true` lets the count
    /// hold or fall, never rise (schedule floors, `minReplicas` clamps and the fallback
    /// included). Default `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_scale_out: Option<bool>,
    /// Take over from the HPA that drives the target today (KEDA calls it transferring the
    /// HPA's ownership). At its first evaluation as leader kscale stops the HPA as `action`
    /// says, and carries on from the current count with its scale-down window full of that count:
    /// the first decision does not jump, and nothing scales down before the window has passed.
    /// Mode `Controller` only. The hand-back is in the README.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub takeover: Option<TakeoverSpec>,
}

/// What `spec.takeover` does to the HPA it replaces.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum TakeoverAction {
    /// Keep the HPA, inert: both directions' `selectPolicy: Disabled`, `minReplicas` 1 and
    /// `maxReplicas` 2147483647 (an HPA still forces its bounds on the count otherwise), with
    /// its previous settings kept in the annotation `kscale.dev/restore-patch` for the hand-back.
    #[default]
    Disable,
    /// Delete the HPA.
    Delete,
}

/// The HPA a policy replaces (`spec.takeover`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TakeoverSpec {
    /// The HPA's name, in the policy's namespace. Its `scaleTargetRef` must be the policy's
    /// target.
    #[schemars(length(min = 1, max = 253))]
    pub hpa: String,
    /// `Disable` (default) or `Delete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<TakeoverAction>,
}

/// The forecasting model.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum ForecastModel {
    /// Additive Holt-Winters exponential smoothing: level, damped trend and a daily or weekly
    /// season. Falls back to `Trend` while there are fewer than two seasons of history.
    #[default]
    HoltWinters,
    /// Holt's linear exponential smoothing with a damped trend, for ramps.
    Trend,
}

/// The season of a Holt-Winters model.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum Seasonality {
    /// A 24-hour cycle.
    #[default]
    Daily,
    /// A 7-day cycle.
    Weekly,
}

/// `spec.forecast`: predictive scaling on the Prometheus metrics.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.seasonality) || !has(self.model) || self.model == 'HoltWinters'").message("forecast.seasonality only applies to the HoltWinters model").field_path(".seasonality"))]
#[serde(rename_all = "camelCase")]
pub struct ForecastSpec {
    /// `HoltWinters` (default) or `Trend`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ForecastModel>,
    /// `Daily` (default) or `Weekly` (HoltWinters only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seasonality: Option<Seasonality>,
    /// The target's pod start-up time, from scale-up to ready (default `60s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h|d))+$"))]
    pub startup: Option<String>,
    /// How far ahead to size for (default: `startup`, so new pods are ready when the forecast
    /// demand arrives). At most 24h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h|d))+$"))]
    pub horizon: Option<String>,
    /// History the model learns from and re-reads from Prometheus after a restart (default: 7d
    /// for a daily season, 21d for a weekly one, 1d for Trend). HoltWinters needs two seasons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h|d))+$"))]
    pub history: Option<String>,
    /// Width of the time buckets the history is averaged into (default `1m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h|d))+$"))]
    pub step: Option<String>,
    /// How often the model is refitted (default `6h`; also each time the kept history has
    /// doubled since the last fit, so a young history is not left with its first fit); in
    /// between, new data only updates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h|d))+$"))]
    pub refit_every: Option<String>,
    /// Headroom: the policy sizes for the forecast times one plus this percentile of the model's
    /// relative one-step errors over its history (default 99.9; between 50 and 100, where 100 is
    /// the largest error seen). Higher means more headroom where the forecast has been less
    /// accurate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 50.0, max = 100.0))]
    pub confidence: Option<f64>,
    /// The least headroom over the forecast, in units of each metric's target (default 0). With
    /// an `AverageValue` target it is spare capacity in replicas: 0.5 keeps half a replica's
    /// worth of demand above the forecast even where the history has been calm, for bursts the
    /// history has not shown yet. The learned headroom (`confidence`) applies where it is larger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub min_headroom: Option<f64>,
}

/// One signal of a policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("(has(self.prometheus) ? 1 : 0) + (has(self.resource) ? 1 : 0) + (has(self.pods) ? 1 : 0) + (has(self.object) ? 1 : 0) + (has(self.external) ? 1 : 0) == 1").message("exactly one of prometheus, resource, pods, object or external must be set"))]
#[x_kube(validation = Rule::new("self.target.type in ['Value', 'AverageValue', 'Utilization']").message("target.type must be one of Value, AverageValue, Utilization").field_path(".target.type"))]
#[x_kube(validation = Rule::new("self.target.type != 'Value' || has(self.target.value)").message("target.value is required when target.type is Value").field_path(".target"))]
#[x_kube(validation = Rule::new("self.target.type != 'AverageValue' || has(self.target.averageValue)").message("target.averageValue is required when target.type is AverageValue").field_path(".target"))]
#[x_kube(validation = Rule::new("self.target.type != 'Utilization' || has(self.target.averageUtilization)").message("target.averageUtilization is required when target.type is Utilization").field_path(".target"))]
#[x_kube(validation = Rule::new("self.target.type != 'Utilization' || has(self.resource)").message("target.type Utilization is only valid for resource metrics").field_path(".target.type"))]
#[x_kube(validation = Rule::new("!has(self.resource) || self.target.type != 'Value'").message("resource metrics take a Utilization or AverageValue target").field_path(".target.type"))]
#[x_kube(validation = Rule::new("!has(self.pods) || self.target.type == 'AverageValue'").message("pods metrics take an AverageValue target").field_path(".target.type"))]
#[serde(rename_all = "camelCase")]
pub struct MetricSpec {
    /// Name of the metric, used in the formula, status and exported metrics.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z_][a-z0-9_]*$"))]
    pub name: String,
    /// A PromQL query; its result (summed over series) is the metric's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusSource>,
    /// A resource metric of the target's pods from `metrics.k8s.io`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<ResourceSource>,
    /// A metric of each of the target's pods from `custom.metrics.k8s.io` (the HPA's `Pods`
    /// source): averaged over the pods, with the HPA's missing- and unready-pod rules. Takes an
    /// `AverageValue` target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<PodsMetricSource>,
    /// A metric describing one object of the policy's namespace from `custom.metrics.k8s.io`
    /// (the HPA's `Object` source). Takes a `Value` or an `AverageValue` target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<ObjectMetricSource>,
    /// A metric from `external.metrics.k8s.io` (the HPA's `External` source): the values of
    /// every series matching the selector are summed. Takes a `Value` or an `AverageValue`
    /// target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalMetricSource>,
    /// The target value, exactly the HPA's `MetricTarget`.
    pub target: MetricTarget,
    /// A quantity in the metric's own units (percent for a `Utilization` target; default 0;
    /// KEDA's term): the metric is *active* while its value is above it. With `minReplicas: 0`
    /// (or `idleReplicas`), a target at the idle count wakes when any metric is active, and goes
    /// back to it only once every metric has been inactive for `spec.cooldown`. Not negative:
    /// `kscale validate` and the controller refuse one below 0 (no CEL rule on a quantity of
    /// unbounded length fits the apiserver's cost budget, as for `target.value`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_threshold: Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
}

/// A Prometheus metric source.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusSource {
    /// An instant PromQL query.
    #[schemars(length(min = 1, max = 4096))]
    pub query: String,
}

/// A Prometheus server of one policy (Prometheus, Thanos, Mimir, Cortex or any server of the
/// Prometheus HTTP API).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusServer {
    /// The base URL, such as `https://thanos-query.monitoring:9090`; a path prefix is kept.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("prometheus.url must start with http:// or https://"))]
    pub url: String,
    /// A Secret in the policy's namespace with the credentials, by key: `token` (bearer
    /// token), or `username` and `password` (basic auth); `ca.crt` (PEM CA bundle for https);
    /// `tls.crt` and `tls.key` (client certificate). Re-read every evaluation, so rotation needs
    /// no restart. The Secret must carry the label `kscale.dev/prometheus-credentials: "true"`
    /// (so only someone who may write it can lend it to kscale); otherwise nothing is sent and
    /// the policy reports the missing label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// Extra HTTP headers on every query, such as a tenant ID (`X-Scope-OrgID`). Not secret:
    /// put secrets in the Secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub headers: Vec<HttpHeader>,
    /// The bound on this server's queries in one evaluation, a Go-style duration (default: the
    /// daemon's `--prometheus-timeout`); at most 60s. A server that answers later delays only
    /// the policies that name it: their queries become errors and their fallback applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 32),
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h|d))+$")
    )]
    #[x_kube(validation = Rule::new("!self.contains('d') && duration(self) > duration('0s') && duration(self) <= duration('60s')").message("prometheus.timeout must be longer than 0 and at most 60s"))]
    pub timeout: Option<String>,
}

/// A Secret in the policy's own namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// An HTTP header.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpHeader {
    /// The header name.
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
    )]
    pub name: String,
    /// The header value.
    #[schemars(length(max = 4096))]
    pub value: String,
}

/// A resource metric source (`metrics.k8s.io`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResourceSource {
    /// `cpu` or `memory`.
    #[x_kube(validation = Rule::new("self in ['cpu', 'memory']").message("resource.name must be cpu or memory"))]
    pub name: String,
    /// Only this container's usage and requests count (like `ContainerResource`); all when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// A metric of a metrics API, by name and label selector (`autoscaling/v2`'s
/// `MetricIdentifier`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MetricIdentifier {
    /// The metric's name in the metrics API: letters, digits and `_ . : | -`, at most 253
    /// characters, not `.` or `..` (it is a segment of the request path).
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[A-Za-z0-9_.:|-]+$"))]
    #[x_kube(validation = Rule::new("self != '.' && self != '..'").message("metric.name must not be . or .."))]
    pub name: String,
    /// Selects among the metric's series (passed to the metrics API as its label selector);
    /// all series when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// `metrics[].pods`: a metric of each of the target's pods from `custom.metrics.k8s.io/v1beta2`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodsMetricSource {
    /// The metric and its selector.
    pub metric: MetricIdentifier,
}

/// `metrics[].object`: a metric of one object in the policy's namespace from
/// `custom.metrics.k8s.io/v1beta2`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.describedObject.kind != '' && self.describedObject.name != ''").message("object.describedObject needs a kind and a name").field_path(".describedObject"))]
#[serde(rename_all = "camelCase")]
pub struct ObjectMetricSource {
    /// The object the metric describes (`apiVersion` defaults to `v1`, the core group), in the
    /// policy's namespace.
    pub described_object: CrossVersionObjectReference,
    /// The metric and its selector.
    pub metric: MetricIdentifier,
}

/// `metrics[].external`: a metric from `external.metrics.k8s.io/v1beta1`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalMetricSource {
    /// The metric and its selector.
    pub metric: MetricIdentifier,
}

/// A time window that overrides the replica bounds.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.minReplicas) || has(self.maxReplicas)").message("a schedule must set minReplicas or maxReplicas"))]
#[x_kube(validation = Rule::new("!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas").message("schedule maxReplicas must be at least its minReplicas").field_path(".maxReplicas"))]
#[serde(rename_all = "camelCase")]
pub struct ScheduleSpec {
    /// A label for status and reasons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When the window opens: a five-field cron expression (minute hour day-of-month month day-of-week).
    #[schemars(length(min = 1, max = 256))]
    pub cron: String,
    /// How long the window stays open after each start, a Go-style duration.
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h|d))+$"))]
    pub duration: String,
    /// IANA time zone the cron expression is read in (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Replica floor while the window is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub min_replicas: Option<i32>,
    /// Replica ceiling while the window is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_replicas: Option<i32>,
}

/// What a failing metric leads to.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum OnFailure {
    /// Keep the current replica count (never scale down on bad data).
    #[default]
    Hold,
    /// Go up to `fallback.replicas` (never down: a higher current count is held).
    Replicas,
}

/// Safe behavior when metrics fail.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.onFailure) || self.onFailure != 'Replicas' || has(self.replicas)").message("fallback.replicas is required when onFailure is Replicas").field_path(".replicas"))]
#[x_kube(validation = Rule::new("!has(self.replicas) || !has(self.onFailure) || self.onFailure == 'Replicas'").message("fallback.replicas only applies with onFailure: Replicas").field_path(".replicas"))]
#[serde(rename_all = "camelCase")]
pub struct FallbackSpec {
    /// A sample older than this counts as missing (default: Prometheus' 5m lookback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h|d))+$"))]
    pub stale_after: Option<String>,
    /// `Hold` (default) or `Replicas` (with `replicas`, or implied when `replicas` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<OnFailure>,
    /// The replica count to go up to while metrics fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
    /// How many consecutive evaluations must fail (a metric missing, stale, invalid, partial
    /// or failing, or the formula failing) before the fallback applies, as KEDA's
    /// `fallback.failureThreshold`; before that the decision holds the current count. Between 1
    /// and 1000, default 1 (the fallback applies at the first failure). The count is kept in
    /// `status.consecutiveFailures`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub failure_threshold: Option<i32>,
}

/// Observed state of a ScalingPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingPolicyStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replica count of the target when last evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_replicas: Option<i32>,
    /// Replica count the last evaluation decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// When the last evaluation ran (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_evaluation_time: Option<chrono::DateTime<chrono::Utc>>,
    /// The last decision's reason, one line (the `Detail` column of `kubectl get sp -o wide`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The last decision in a few words, at most 60 characters (the `Reason` column of
    /// `kubectl get sp`): the change, what decided it and any limit that clipped it, such as
    /// `scale up 3→5 by rps` or `hold 6→6 by fallback Hold, ScaleDownStabilized`; the reason code
    /// of the `Ready` condition when the policy could not be evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 60))]
    pub short_reason: Option<String>,
    /// Each metric against its target, as the HPA's `TARGETS` column shows them (the `Targets`
    /// column of `kubectl get sp`): `<value>/<target> (<metric>)`, comma-separated, such as
    /// `112500m/70 (rps), 43%/60% (cpu)`. A Prometheus metric with an `AverageValue` target
    /// shows its value per current replica, as the HPA does; a metric without a value shows its
    /// state (`<Missing>/70 (rps)`). At most 120 characters: metrics past that are counted
    /// (`+ 2 more`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 120))]
    pub targets: Option<String>,
    /// The target as the HPA's `REFERENCE` column shows it, `<kind>/<name>`, such as
    /// `Deployment/backend` (the `Reference` column of `kubectl get sp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Per-metric values and proposals of the last evaluation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<MetricStatus>,
    /// What pauses the policy, when something does (`spec.paused`, `spec.pausedReplicas`,
    /// `spec.pausedScaleIn`, `spec.pausedScaleOut`): `Hold`, `Pinned to N`, `ScaleIn frozen`
    /// or `ScaleOut frozen`. Absent when autoscaling is not paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<String>,
    /// Ready, AbleToScale, ScalingActive, ScalingLimited, MetricsAvailable, Paused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Shadow mode: a DryRun policy whose target an HPA drives records, at every evaluation,
    /// what the HPA wanted beside what kscale would do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowStatus>,
    /// `spec.takeover` done: the HPA, what was done to it, when, and the count carried on from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub takeover: Option<TakeoverStatus>,
    /// Stabilization and rate-limit history, kept so a restart or failover does not flap.
    #[serde(flatten)]
    pub history: PolicyState,
}

/// A takeover from an HPA, as done (`status.takeover`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TakeoverStatus {
    /// The HPA's name.
    pub hpa: String,
    /// `Disable`, `Delete`, or `Absent` when no such HPA existed at the first evaluation.
    pub action: String,
    /// When.
    pub time: chrono::DateTime<chrono::Utc>,
    /// The replica count kscale carried on from.
    pub replicas: i32,
}

/// A DryRun policy beside the HPA that drives its target (shadow mode), at one evaluation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShadowStatus {
    /// The HPA's name.
    pub hpa: String,
    /// The HPA's `status.desiredReplicas` when kscale evaluated (replicas).
    pub hpa_desired_replicas: i32,
    /// kscale's `desiredReplicas` minus the HPA's (replicas; 0 when they agree, positive when
    /// kscale would run more).
    pub divergence: i32,
}

/// One metric's last observation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricStatus {
    /// The metric's name.
    pub name: String,
    /// `Valid`, `Missing`, `Stale`, `Invalid`, `Error`, `Partial` (a value from an answer
    /// with warnings, which never scales down), or `NoPods` (a resource metric of a target at 0
    /// replicas: nothing to measure, which is not a failure).
    pub state: String,
    /// The value as a quantity string, when valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The replica count this metric proposed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposal: Option<i32>,
    /// Why the metric is not valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// With `spec.forecast`: the forecast value sized for (the upper bound at the horizon), as a
    /// quantity string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forecast: Option<String>,
}

/// The CRD as the apiserver gets it.
pub fn crd()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    ScalingPolicy::crd()
}

/// The CRD as YAML, as `kscale crd` prints it and `deploy/` commits it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&crd())
}
