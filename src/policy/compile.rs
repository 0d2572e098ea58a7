//! Validation: a `ScalingPolicySpec` becomes a [`CompiledPolicy`] or a list of problems, each
//! naming its field. `kscale validate`, the backtest and the controller all go through here, so a
//! policy that validates is a policy that evaluates.

use std::fmt;

use chrono::TimeDelta;
use k8s_openapi::api::autoscaling::v2::{HPAScalingRules, MetricTarget};

use super::behavior::{Behavior, RateKind, RatePolicy, Rules, SelectPolicy};
use super::forecast::{ForecastSettings, ModelKind};
use super::formula::Formula;
use super::replicas::{ReadinessSettings, Tolerances};
use super::schedule::Schedule;
use crate::crd::{
    ForecastModel, ForecastSpec, Mode, OnFailure, ScalingPolicy, ScalingPolicySpec, Seasonality,
};
use crate::units::{Quantity, parse_duration};

/// The HPA controller's default tolerance (`--horizontal-pod-autoscaler-tolerance`).
pub const DEFAULT_TOLERANCE: f64 = 0.1;
/// The HPA controller's default scale-down stabilization (`--horizontal-pod-autoscaler-downscale-stabilization`).
pub const DEFAULT_DOWNSCALE_WINDOW: TimeDelta = TimeDelta::seconds(300);
/// Default evaluation interval (the HPA's sync period).
pub const DEFAULT_INTERVAL: TimeDelta = TimeDelta::seconds(15);
/// The ceiling on `spec.prometheus.timeout` (checked here and at admission): the longest one
/// server's queries may hold its own policies' evaluation.
pub const MAX_PROMETHEUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The shortest `spec.interval` a policy may ask for (also the CRD's admission rule): below it a
/// policy would run in a hot loop on a daemon every tenant shares, and rewrite its status and
/// query Prometheus as often.
pub const MIN_INTERVAL: TimeDelta = TimeDelta::seconds(1);
/// The most points of one metric's history a forecast holds (`spec.forecast.history /
/// spec.forecast.step`), and so the most one history read asks Prometheus for.
pub const MAX_HISTORY_STEPS: i64 = 100_000;
/// Default staleness bound: Prometheus' instant-query lookback.
pub const DEFAULT_STALE_AFTER: TimeDelta = TimeDelta::seconds(300);

/// One problem with a policy, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, such as `spec.metrics[0].target.type`.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in a policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct ValidationErrors(pub Vec<FieldError>);

/// Where a metric's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricSource {
    /// An instant PromQL query.
    Prometheus {
        /// The query.
        query: String,
    },
    /// Pod resource usage from metrics.k8s.io.
    Resource {
        /// `true` for cpu, `false` for memory.
        cpu: bool,
        /// Only this container, if set.
        container: Option<String>,
    },
    /// A metric of each of the target's pods from custom.metrics.k8s.io (the HPA's `Pods`).
    Pods {
        /// The metric.
        metric: MetricRef,
    },
    /// A metric of one object from custom.metrics.k8s.io (the HPA's `Object`).
    Object {
        /// The described object's `apiVersion` (`v1` when the spec leaves it out).
        api_version: String,
        /// Its kind.
        kind: String,
        /// Its name, in the policy's namespace.
        name: String,
        /// The metric.
        metric: MetricRef,
    },
    /// A metric from external.metrics.k8s.io (the HPA's `External`).
    External {
        /// The metric.
        metric: MetricRef,
    },
}

impl MetricSource {
    /// Whether the value is measured on the target's pods (resource and pods metrics): nothing
    /// to read at 0 replicas, and the HPA's missing- and unready-pod rules apply.
    pub fn per_pod(&self) -> bool {
        matches!(
            self,
            MetricSource::Resource { .. } | MetricSource::Pods { .. }
        )
    }
}

/// A metric of a metrics API, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricRef {
    /// The metric's name (a path segment, checked against [`is_api_metric_name`]).
    pub name: String,
    /// The selector as label-selector text (`a=b,c in (x,y)`, sorted by key as Kubernetes
    /// renders one); empty for all series.
    pub selector: String,
}

/// Whether `name` may name a metric of a metrics API: 1 to 253 characters of letters, digits
/// and `_ . : | -`, and not `.` or `..` (the name is a segment of the request path). The CRD
/// has the same pattern.
pub fn is_api_metric_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '|' | '-'))
}

/// A label key (`[prefix/]name`: a DNS subdomain prefix of at most 253 characters, a name of 1
/// to 63 characters of alphanumerics and `-_.`, starting and ending alphanumeric).
fn is_label_key(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
    }) && !name.is_empty()
        && is_label_value(name)
}

/// A label value: empty, or at most 63 alphanumerics and `-_.`, starting and ending
/// alphanumeric.
fn is_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

/// A `LabelSelector` as label-selector text, as Kubernetes' `LabelSelectorAsSelector` renders
/// it (requirements sorted by key), each key, operator and value checked; errors name the field.
pub fn selector_text(
    errors: &mut Vec<FieldError>,
    path: &str,
    selector: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
) -> String {
    let Some(selector) = selector else {
        return String::new();
    };
    let mut requirements: Vec<(String, String)> = Vec::new();
    for (k, v) in selector.match_labels.iter().flatten() {
        let field = format!("{path}.matchLabels");
        if !is_label_key(k) {
            errors.push(err(field, format!("{k:?} is not a valid label key")));
        } else if !is_label_value(v) {
            errors.push(err(
                format!("{field}.{k}"),
                format!("{v:?} is not a valid label value"),
            ));
        } else {
            requirements.push((k.clone(), format!("{k}={v}")));
        }
    }
    for (i, e) in selector.match_expressions.iter().flatten().enumerate() {
        let field = format!("{path}.matchExpressions[{i}]");
        if !is_label_key(&e.key) {
            errors.push(err(
                format!("{field}.key"),
                format!("{:?} is not a valid label key", e.key),
            ));
            continue;
        }
        let values = e.values.as_deref().unwrap_or_default();
        if let Some(bad) = values.iter().find(|v| !is_label_value(v)) {
            errors.push(err(
                format!("{field}.values"),
                format!("{bad:?} is not a valid label value"),
            ));
            continue;
        }
        let mut sorted = values.to_vec();
        sorted.sort();
        let text = match e.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                errors.push(err(
                    format!("{field}.values"),
                    format!("must not be empty for operator {}", e.operator),
                ));
                continue;
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                errors.push(err(
                    format!("{field}.values"),
                    format!("must be empty for operator {}", e.operator),
                ));
                continue;
            }
            "In" => format!("{} in ({})", e.key, sorted.join(",")),
            "NotIn" => format!("{} notin ({})", e.key, sorted.join(",")),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            other => {
                errors.push(err(
                    format!("{field}.operator"),
                    unknown_value(other, &["In", "NotIn", "Exists", "DoesNotExist"]),
                ));
                continue;
            }
        };
        requirements.push((e.key.clone(), text));
    }
    requirements.sort_by(|a, b| a.0.cmp(&b.0));
    requirements
        .into_iter()
        .map(|(_, t)| t)
        .collect::<Vec<_>>()
        .join(",")
}

fn metric_ref(
    errors: &mut Vec<FieldError>,
    path: &str,
    m: &crate::crd::MetricIdentifier,
) -> MetricRef {
    if !is_api_metric_name(&m.name) {
        errors.push(err(
            format!("{path}.name"),
            format!(
                "{:?} is not a valid metric name (1 to 253 letters, digits and _ . : | -, not . or ..)",
                m.name
            ),
        ));
    }
    MetricRef {
        name: m.name.clone(),
        selector: selector_text(errors, &format!("{path}.selector"), m.selector.as_ref()),
    }
}

/// A metric target in milli-units, as the HPA compares them (exact: 128 bits hold every
/// Kubernetes quantity in milli-units, where the HPA's `MilliValue` saturates past `i64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The whole metric against a value.
    Value(i128),
    /// The metric per replica against a value.
    AverageValue(i128),
    /// Percent of the pods' requests.
    Utilization(i32),
}

impl Target {
    /// The target in the metric's own units (a `Utilization` target in percent).
    pub fn value(self) -> f64 {
        match self {
            Target::Value(m) | Target::AverageValue(m) => m as f64 / 1000.0,
            Target::Utilization(p) => f64::from(p),
        }
    }
}

/// A validated metric.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledMetric {
    /// Its name.
    pub name: String,
    /// Its source.
    pub source: MetricSource,
    /// Its target.
    pub target: Target,
    /// `activationThreshold` in the metric's own units (0 when unset): the metric is active
    /// while its value is above it.
    pub activation: f64,
}

/// What failing metrics lead to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureAction {
    /// Keep the current count.
    Hold,
    /// Go up to this count (never down).
    Replicas(i32),
}

/// The most consecutive failed evaluations `spec.fallback.failureThreshold` may wait for.
pub const MAX_FAILURE_THRESHOLD: i32 = 1000;

/// What `spec.paused`, `spec.pausedReplicas`, `spec.pausedScaleIn` and `spec.pausedScaleOut`
/// ask for: the last step of an evaluation, over whatever the metrics decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// Hold the current count (`paused`, or both freezes).
    Hold,
    /// Run exactly this many replicas (`pausedReplicas`).
    Pin(i32),
    /// Never lower the count (`pausedScaleIn`).
    ScaleIn,
    /// Never raise the count (`pausedScaleOut`).
    ScaleOut,
}

impl Pause {
    /// How status (`status.paused`, the printer column) and events name it.
    pub fn label(self) -> String {
        match self {
            Pause::Hold => "Hold".into(),
            Pause::Pin(n) => format!("Pinned to {n}"),
            Pause::ScaleIn => "ScaleIn frozen".into(),
            Pause::ScaleOut => "ScaleOut frozen".into(),
        }
    }
}

/// A validated policy, ready to evaluate.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    /// `namespace/name` (or just the name), for messages.
    pub name: String,
    /// What to do with decisions.
    pub mode: Mode,
    /// Lower bound.
    pub min_replicas: i32,
    /// Upper bound.
    pub max_replicas: i32,
    /// Evaluation interval.
    pub interval: TimeDelta,
    /// Metrics, in spec order.
    pub metrics: Vec<CompiledMetric>,
    /// Optional formula.
    pub formula: Option<Formula>,
    /// Behavior with HPA defaults filled in; `None` means the HPA's legacy normalization.
    pub behavior: Option<Behavior>,
    /// Tolerance per direction.
    pub tolerances: Tolerances,
    /// Legacy (no `behavior`) downscale stabilization window.
    pub downscale_window: TimeDelta,
    /// Pod readiness timings for CPU metrics.
    pub readiness: ReadinessSettings,
    /// Schedules.
    pub schedules: Vec<Schedule>,
    /// Samples older than this are stale.
    pub stale_after: TimeDelta,
    /// What failing metrics lead to.
    pub on_failure: FailureAction,
    /// `spec.forecast`, when set.
    pub forecast: Option<ForecastSettings>,
    /// The policy's own Prometheus, when it names one.
    pub prometheus: Option<PrometheusServer>,
    /// Consecutive failed evaluations before the fallback applies (`spec.fallback.failureThreshold`,
    /// default 1).
    pub failure_threshold: i32,
    /// `spec.paused*`, when one pauses the policy.
    pub pause: Option<Pause>,
    /// Scale to zero (or to an idle count) and back: set with `minReplicas: 0` or
    /// `idleReplicas`.
    pub zero: Option<ZeroSettings>,
}

/// The default `spec.cooldown`.
pub const DEFAULT_COOLDOWN: TimeDelta = TimeDelta::minutes(5);
/// The longest `spec.cooldown` (also the CRD's admission rule).
pub const MAX_COOLDOWN: TimeDelta = TimeDelta::hours(24);

/// What `minReplicas: 0` or `spec.idleReplicas` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroSettings {
    /// The count while every metric is inactive (`idleReplicas`, or 0).
    pub idle: i32,
    /// The least count while a metric is active or the cooldown runs: `minReplicas`, at least 1.
    pub active_min: i32,
    /// How long every metric must stay inactive before the target goes to `idle`.
    pub cooldown: TimeDelta,
}

/// A policy's own Prometheus server, validated. Equal servers share one client and one query per
/// distinct query, as the daemon's default does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PrometheusServer {
    /// Base URL.
    pub url: String,
    /// Name of the credentials Secret in the policy's namespace.
    pub secret: Option<String>,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// Bound on one query (`None`: the daemon's).
    pub timeout: Option<std::time::Duration>,
}

impl CompiledPolicy {
    /// Validates and compiles a ScalingPolicy object.
    pub fn from_resource(policy: &ScalingPolicy) -> Result<CompiledPolicy, ValidationErrors> {
        let mut errors = Vec::new();
        let name = match (&policy.metadata.namespace, &policy.metadata.name) {
            (Some(ns), Some(n)) => format!("{ns}/{n}"),
            (None, Some(n)) => n.clone(),
            (_, None) => {
                errors.push(err("metadata.name", "is required".into()));
                String::new()
            }
        };
        // Names published by the external metrics adapter must not collide across policies.
        if let Some(n) = &policy.metadata.name {
            for (i, m) in policy.spec.metrics.iter().enumerate() {
                if let Some(owner) = crate::policy::external_names::decision_name_owner(n, &m.name)
                {
                    errors.push(err(
                        format!("spec.metrics[{i}].name"),
                        format!(
                            "{:?} in a policy named {n:?} would publish the external metric {:?}, the name of policy {owner:?}'s decision (<policy>-desired-replicas); rename the metric",
                            m.name,
                            crate::policy::external_names::external_name(n, &m.name)
                        ),
                    ));
                }
            }
        }
        match compile_spec(&policy.spec, name) {
            Ok(c) if errors.is_empty() => Ok(c),
            Ok(_) => Err(ValidationErrors(errors)),
            Err(ValidationErrors(more)) => {
                errors.extend(more);
                Err(ValidationErrors(errors))
            }
        }
    }
}

fn err(path: impl Into<String>, message: String) -> FieldError {
    FieldError {
        path: path.into(),
        message,
    }
}

fn duration_field(errors: &mut Vec<FieldError>, path: &str, text: &str) -> Option<TimeDelta> {
    match parse_duration(text) {
        Ok(d) if d.is_zero() => {
            errors.push(err(path, format!("must be longer than zero, got {text:?}")));
            None
        }
        Ok(d) => TimeDelta::from_std(d).ok(),
        Err(e) => {
            errors.push(err(path, e.to_string()));
            None
        }
    }
}

/// What to tell a user whose URL (a flag's or a field's) has no scheme, such as
/// `prometheus.monitoring:9090`, which a URL parser reads as a relative URL or as the scheme
/// `prometheus.monitoring`: the fix. `None` when it has one.
pub fn missing_scheme(url: &str) -> Option<String> {
    (!url.contains("://")).then(|| format!("has no scheme; write \"http://{url}\" (or https://)"))
}

fn compile_server(
    errors: &mut Vec<FieldError>,
    p: &crate::crd::PrometheusServer,
) -> PrometheusServer {
    let url_ok = p
        .url
        .split_once("://")
        .is_some_and(|(scheme, rest)| matches!(scheme, "http" | "https") && !rest.is_empty());
    if let Some(fix) = missing_scheme(&p.url) {
        errors.push(err("spec.prometheus.url", format!("{:?} {fix}", p.url)));
    } else if !url_ok {
        errors.push(err(
            "spec.prometheus.url",
            format!("{:?} is not an http:// or https:// URL", p.url),
        ));
    }
    if p.url.contains('@') {
        errors.push(err(
            "spec.prometheus.url",
            "must not carry credentials; put them in the Secret of spec.prometheus.secretRef"
                .into(),
        ));
    }
    for (i, h) in p.headers.iter().enumerate() {
        let token = !h.name.is_empty()
            && h.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+.^_`|~-".contains(&b));
        if !token {
            errors.push(err(
                format!("spec.prometheus.headers[{i}].name"),
                format!("{:?} is not an HTTP header name", h.name),
            ));
        }
        if h.value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            errors.push(err(
                format!("spec.prometheus.headers[{i}].value"),
                "holds control characters".into(),
            ));
        }
    }
    let timeout = p.timeout.as_deref().and_then(|t| {
        let d = duration_field(errors, "spec.prometheus.timeout", t)?
            .to_std()
            .ok()?;
        if d > MAX_PROMETHEUS_TIMEOUT {
            errors.push(err(
                "spec.prometheus.timeout",
                format!(
                    "must be at most {}s (the ceiling on a policy's Prometheus timeout), got {t:?}",
                    MAX_PROMETHEUS_TIMEOUT.as_secs()
                ),
            ));
            return None;
        }
        Some(d)
    });
    PrometheusServer {
        url: p.url.clone(),
        secret: p.secret_ref.as_ref().map(|s| s.name.clone()),
        headers: p
            .headers
            .iter()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect(),
        timeout,
    }
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

fn positive_quantity(
    errors: &mut Vec<FieldError>,
    path: String,
    q: &Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    type_: &str,
) -> Option<i128> {
    match q {
        None => {
            errors.push(err(
                path,
                format!("is required when target.type is {type_}"),
            ));
            None
        }
        Some(q) => match Quantity::parse(&q.0) {
            Ok(v) if v.milli() > 0 => Some(v.milli()),
            Ok(_) => {
                errors.push(err(
                    path,
                    format!("must be greater than zero, got {:?}", q.0),
                ));
                None
            }
            Err(e) => {
                errors.push(err(path, e.to_string()));
                None
            }
        },
    }
}

/// What a target is checked against: resource metrics take Utilization or AverageValue, pods
/// metrics AverageValue, the others Value or AverageValue.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SourceKind {
    Resource,
    Pods,
    Other,
}

/// The one source of a metric; errors name the field.
fn compile_source(
    errors: &mut Vec<FieldError>,
    path: &str,
    m: &crate::crd::MetricSpec,
) -> Option<MetricSource> {
    let set: Vec<&str> = [
        ("prometheus", m.prometheus.is_some()),
        ("resource", m.resource.is_some()),
        ("pods", m.pods.is_some()),
        ("object", m.object.is_some()),
        ("external", m.external.is_some()),
    ]
    .into_iter()
    .filter_map(|(n, s)| s.then_some(n))
    .collect();
    if set.len() != 1 {
        errors.push(err(
            path.to_string(),
            if set.is_empty() {
                "sets no source; set one of prometheus, resource, pods, object or external".into()
            } else {
                format!("sets {}; set exactly one source", set.join(" and "))
            },
        ));
        return None;
    }
    if let Some(p) = &m.prometheus {
        if p.query.trim().is_empty() {
            errors.push(err(
                format!("{path}.prometheus.query"),
                "must not be empty".into(),
            ));
        } else if let Err(message) = super::promql::check(&p.query) {
            errors.push(err(format!("{path}.prometheus.query"), message));
        }
        return Some(MetricSource::Prometheus {
            query: p.query.clone(),
        });
    }
    if let Some(r) = &m.resource {
        return match r.name.as_str() {
            "cpu" | "memory" => Some(MetricSource::Resource {
                cpu: r.name == "cpu",
                container: r.container.clone(),
            }),
            other => {
                errors.push(err(
                    format!("{path}.resource.name"),
                    unknown_value(other, &["cpu", "memory"]),
                ));
                None
            }
        };
    }
    if let Some(p) = &m.pods {
        return Some(MetricSource::Pods {
            metric: metric_ref(errors, &format!("{path}.pods.metric"), &p.metric),
        });
    }
    if let Some(o) = &m.object {
        let field = format!("{path}.object.describedObject");
        let d = &o.described_object;
        let api_version = d
            .api_version
            .clone()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "v1".into());
        let segments: Vec<&str> = api_version.split('/').collect();
        if segments.len() > 2 || segments.iter().any(|s| s.is_empty()) {
            errors.push(err(
                format!("{field}.apiVersion"),
                format!("{api_version:?} is not GROUP/VERSION or VERSION"),
            ));
        }
        if d.kind.is_empty() || !d.kind.chars().all(|c| c.is_ascii_alphanumeric()) {
            errors.push(err(
                format!("{field}.kind"),
                format!("{:?} is not a kind (letters and digits)", d.kind),
            ));
        }
        if !is_object_name(&d.name) {
            errors.push(err(
                format!("{field}.name"),
                format!(
                    "{:?} is not an object name (1 to 253 lowercase letters, digits, - and .)",
                    d.name
                ),
            ));
        }
        return Some(MetricSource::Object {
            api_version,
            kind: d.kind.clone(),
            name: d.name.clone(),
            metric: metric_ref(errors, &format!("{path}.object.metric"), &o.metric),
        });
    }
    m.external.as_ref().map(|e| MetricSource::External {
        metric: metric_ref(errors, &format!("{path}.external.metric"), &e.metric),
    })
}

/// A DNS-subdomain object name (and never `.` or `..`: it is a segment of the request path).
fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn compile_target(
    errors: &mut Vec<FieldError>,
    path: &str,
    target: &MetricTarget,
    kind: SourceKind,
) -> Option<Target> {
    let is_resource = kind == SourceKind::Resource;
    if kind == SourceKind::Pods && target.type_ != "AverageValue" {
        errors.push(err(
            format!("{path}.type"),
            format!(
                "{:?} is not valid for a pods metric; use AverageValue",
                target.type_
            ),
        ));
        return None;
    }
    match target.type_.as_str() {
        "Value" => {
            if is_resource {
                errors.push(err(
                    format!("{path}.type"),
                    "Value is not valid for a resource metric; use Utilization or AverageValue"
                        .into(),
                ));
                return None;
            }
            positive_quantity(errors, format!("{path}.value"), &target.value, "Value")
                .map(Target::Value)
        }
        "AverageValue" => {
            let path = format!("{path}.averageValue");
            let milli =
                positive_quantity(errors, path.clone(), &target.average_value, "AverageValue")?;
            if kind != SourceKind::Other && i64::try_from(milli).is_err() {
                // Pod usages and requests are the HPA's i64 milli-values.
                errors.push(err(
                    path,
                    format!(
                        "{} is above {}, the largest per-pod resource usage in milli-units",
                        crate::units::format_milli(milli),
                        crate::units::format_milli(i128::from(i64::MAX))
                    ),
                ));
                return None;
            }
            Some(Target::AverageValue(milli))
        }
        "Utilization" => {
            if !is_resource {
                errors.push(err(
                    format!("{path}.type"),
                    "Utilization is only valid for resource metrics; use Value or AverageValue"
                        .into(),
                ));
                return None;
            }
            match target.average_utilization {
                None => {
                    errors.push(err(
                        format!("{path}.averageUtilization"),
                        "is required when target.type is Utilization".into(),
                    ));
                    None
                }
                Some(u) if u <= 0 => {
                    errors.push(err(
                        format!("{path}.averageUtilization"),
                        format!("must be greater than zero, got {u}"),
                    ));
                    None
                }
                Some(u) => Some(Target::Utilization(u)),
            }
        }
        other => {
            errors.push(err(
                format!("{path}.type"),
                unknown_value(other, &["Value", "AverageValue", "Utilization"]),
            ));
            None
        }
    }
}

fn compile_rules(
    errors: &mut Vec<FieldError>,
    path: &str,
    rules: Option<&HPAScalingRules>,
    up: bool,
) -> (Rules, Option<f64>) {
    // autoscaling/v2 defaults (SetDefaults_HorizontalPodAutoscalerBehavior).
    let default_policies = if up {
        vec![
            RatePolicy {
                kind: RateKind::Pods,
                value: 4,
                period: TimeDelta::seconds(15),
            },
            RatePolicy {
                kind: RateKind::Percent,
                value: 100,
                period: TimeDelta::seconds(15),
            },
        ]
    } else {
        vec![RatePolicy {
            kind: RateKind::Percent,
            value: 100,
            period: TimeDelta::seconds(15),
        }]
    };
    let default_window = if up {
        TimeDelta::zero()
    } else {
        DEFAULT_DOWNSCALE_WINDOW
    };
    let Some(rules) = rules else {
        return (
            Rules {
                stabilization: default_window,
                select: SelectPolicy::Max,
                policies: default_policies,
            },
            None,
        );
    };
    let stabilization = match rules.stabilization_window_seconds {
        None => default_window,
        Some(s) if !(0..=3600).contains(&s) => {
            errors.push(err(
                format!("{path}.stabilizationWindowSeconds"),
                format!("must be between 0 and 3600, got {s}"),
            ));
            default_window
        }
        Some(s) => TimeDelta::seconds(i64::from(s)),
    };
    let select = match rules.select_policy.as_deref() {
        None | Some("Max") => SelectPolicy::Max,
        Some("Min") => SelectPolicy::Min,
        Some("Disabled") => SelectPolicy::Disabled,
        Some(other) => {
            errors.push(err(
                format!("{path}.selectPolicy"),
                unknown_value(other, &["Max", "Min", "Disabled"]),
            ));
            SelectPolicy::Max
        }
    };
    let policies = match &rules.policies {
        None => default_policies,
        Some(list) if list.is_empty() => {
            errors.push(err(
                format!("{path}.policies"),
                "must hold at least one policy when set".into(),
            ));
            default_policies
        }
        Some(list) => list
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let ppath = format!("{path}.policies[{i}]");
                let kind = match p.type_.as_str() {
                    "Pods" => Some(RateKind::Pods),
                    "Percent" => Some(RateKind::Percent),
                    other => {
                        errors.push(err(
                            format!("{ppath}.type"),
                            unknown_value(other, &["Pods", "Percent"]),
                        ));
                        None
                    }
                };
                if p.value <= 0 {
                    errors.push(err(
                        format!("{ppath}.value"),
                        format!("must be greater than zero, got {}", p.value),
                    ));
                }
                if !(1..=1800).contains(&p.period_seconds) {
                    errors.push(err(
                        format!("{ppath}.periodSeconds"),
                        format!("must be between 1 and 1800, got {}", p.period_seconds),
                    ));
                }
                kind.map(|kind| RatePolicy {
                    kind,
                    value: p.value,
                    period: TimeDelta::seconds(i64::from(p.period_seconds)),
                })
            })
            .collect(),
    };
    let tolerance = rules
        .tolerance
        .as_ref()
        .and_then(|q| match Quantity::parse(&q.0) {
            Ok(v) if v.as_f64() >= 0.0 => Some(v.as_f64()),
            Ok(_) => {
                errors.push(err(
                    format!("{path}.tolerance"),
                    format!("must not be negative, got {:?}", q.0),
                ));
                None
            }
            Err(e) => {
                errors.push(err(format!("{path}.tolerance"), e.to_string()));
                None
            }
        });
    (
        Rules {
            stabilization,
            select,
            policies,
        },
        tolerance,
    )
}

/// Validates a spec; `name` is used in messages only.
pub fn compile_spec(
    spec: &ScalingPolicySpec,
    name: String,
) -> Result<CompiledPolicy, ValidationErrors> {
    let mut errors = Vec::new();
    if spec.target_ref.kind.is_empty() {
        errors.push(err("spec.targetRef.kind", "is required".into()));
    }
    if spec.target_ref.name.is_empty() {
        errors.push(err("spec.targetRef.name", "is required".into()));
    }
    if let Some(t) = &spec.takeover {
        if spec.mode != crate::crd::Mode::Controller {
            errors.push(err(
                "spec.takeover",
                "needs mode Controller: kscale becomes the writer of the target".into(),
            ));
        }
        if t.hpa.is_empty() {
            errors.push(err("spec.takeover.hpa", "is required".into()));
        }
    }
    let min_replicas = spec.min_replicas.unwrap_or(1);
    if min_replicas < 0 {
        errors.push(err(
            "spec.minReplicas",
            format!("must not be negative, got {min_replicas}"),
        ));
    }
    if spec.max_replicas < 1 {
        errors.push(err(
            "spec.maxReplicas",
            format!("must be at least 1, got {}", spec.max_replicas),
        ));
    }
    if spec.max_replicas < min_replicas {
        errors.push(err(
            "spec.maxReplicas",
            format!(
                "{} is below spec.minReplicas ({min_replicas})",
                spec.max_replicas
            ),
        ));
    }
    let interval = spec
        .interval
        .as_deref()
        .map_or(Some(DEFAULT_INTERVAL), |text| {
            duration_field(&mut errors, "spec.interval", text)
        })
        .unwrap_or(DEFAULT_INTERVAL);
    if interval < MIN_INTERVAL {
        errors.push(err(
            "spec.interval",
            format!(
                "must be at least {}s (the floor on evaluations per policy), got {:?}",
                MIN_INTERVAL.num_seconds(),
                spec.interval.as_deref().unwrap_or_default()
            ),
        ));
    }

    let prometheus = spec
        .prometheus
        .as_ref()
        .map(|p| compile_server(&mut errors, p));
    if prometheus.is_some() && !spec.metrics.iter().any(|m| m.prometheus.is_some()) {
        errors.push(err(
            "spec.prometheus",
            "is set but no metric has a prometheus source".into(),
        ));
    }

    if spec.metrics.is_empty() {
        errors.push(err("spec.metrics", "must hold at least one metric".into()));
    }
    if spec.metrics.len() > 16 {
        errors.push(err(
            "spec.metrics",
            format!(
                "holds {} metrics; at most 16 are allowed",
                spec.metrics.len()
            ),
        ));
    }
    let mut metrics = Vec::with_capacity(spec.metrics.len());
    for (i, m) in spec.metrics.iter().enumerate() {
        let path = format!("spec.metrics[{i}]");
        if !is_metric_name(&m.name) {
            errors.push(err(
                format!("{path}.name"),
                format!("{:?} is not a valid metric name (lowercase letters, digits and _, not starting with a digit, at most 63)", m.name),
            ));
        } else if spec.metrics[..i].iter().any(|o| o.name == m.name) {
            errors.push(err(
                format!("{path}.name"),
                format!(
                    "{:?} is used by an earlier metric; names must be unique",
                    m.name
                ),
            ));
        }
        let source = compile_source(&mut errors, &path, m);
        let kind = if m.resource.is_some() {
            SourceKind::Resource
        } else if m.pods.is_some() {
            SourceKind::Pods
        } else {
            SourceKind::Other
        };
        let target = compile_target(&mut errors, &format!("{path}.target"), &m.target, kind);
        if let (Some(source), Some(target)) = (source, target) {
            metrics.push(CompiledMetric {
                name: m.name.clone(),
                source,
                target,
                activation: activation_threshold(&mut errors, &path, m),
            });
        }
    }

    let formula = spec.formula.as_deref().and_then(|text| {
        let names: Vec<&str> = spec.metrics.iter().map(|m| m.name.as_str()).collect();
        Formula::compile(text, &names)
            .map_err(|e| errors.push(err("spec.formula", format!("{text:?} {e}"))))
            .ok()
    });

    let (behavior, tolerances) = match &spec.behavior {
        None => (
            None,
            Tolerances {
                down: DEFAULT_TOLERANCE,
                up: DEFAULT_TOLERANCE,
            },
        ),
        Some(b) => {
            let (up, up_tol) = compile_rules(
                &mut errors,
                "spec.behavior.scaleUp",
                b.scale_up.as_ref(),
                true,
            );
            let (down, down_tol) = compile_rules(
                &mut errors,
                "spec.behavior.scaleDown",
                b.scale_down.as_ref(),
                false,
            );
            (
                Some(Behavior { up, down }),
                Tolerances {
                    down: down_tol.unwrap_or(DEFAULT_TOLERANCE),
                    up: up_tol.unwrap_or(DEFAULT_TOLERANCE),
                },
            )
        }
    };

    let mut schedules = Vec::with_capacity(spec.schedules.len());
    for (i, s) in spec.schedules.iter().enumerate() {
        let path = format!("spec.schedules[{i}]");
        if s.min_replicas.is_none() && s.max_replicas.is_none() {
            errors.push(err(
                path.clone(),
                "sets neither minReplicas nor maxReplicas".into(),
            ));
        }
        if let Some(m) = s.min_replicas {
            if m > spec.max_replicas {
                errors.push(err(
                    format!("{path}.minReplicas"),
                    format!("{m} is above spec.maxReplicas ({})", spec.max_replicas),
                ));
            }
            if m < 0 {
                errors.push(err(
                    format!("{path}.minReplicas"),
                    format!("must not be negative, got {m}"),
                ));
            }
        }
        if let Some(m) = s.max_replicas {
            if m < 1 {
                errors.push(err(
                    format!("{path}.maxReplicas"),
                    format!("must be at least 1, got {m}"),
                ));
            }
            let spec_min = spec.min_replicas.unwrap_or(1);
            if m < spec_min {
                errors.push(err(
                    format!("{path}.maxReplicas"),
                    format!(
                        "{m} is below spec.minReplicas ({spec_min}); a schedule ceiling never goes under the floor"
                    ),
                ));
            }
            if let Some(lo) = s.min_replicas.filter(|lo| *lo > m) {
                errors.push(err(
                    format!("{path}.maxReplicas"),
                    format!("{m} is below its minReplicas ({lo})"),
                ));
            }
        }
        let duration = duration_field(&mut errors, &format!("{path}.duration"), &s.duration);
        let label = s
            .name
            .clone()
            .unwrap_or_else(|| format!("schedule {:?}", s.cron));
        match Schedule::new(
            label,
            &s.cron,
            duration.unwrap_or(TimeDelta::zero()),
            s.timezone.as_deref(),
            s.min_replicas,
            s.max_replicas,
        ) {
            Ok(schedule) => schedules.push(schedule),
            Err(problems) => errors.extend(
                problems
                    .into_iter()
                    .map(|(field, message)| err(format!("{path}.{field}"), message)),
            ),
        }
    }

    let mut stale_after = DEFAULT_STALE_AFTER;
    let mut on_failure = FailureAction::Hold;
    let mut failure_threshold = 1;
    if let Some(f) = &spec.fallback {
        if let Some(n) = f.failure_threshold {
            if (1..=MAX_FAILURE_THRESHOLD).contains(&n) {
                failure_threshold = n;
            } else {
                errors.push(err(
                    "spec.fallback.failureThreshold",
                    format!("must be between 1 and {MAX_FAILURE_THRESHOLD} (consecutive failed evaluations), got {n}"),
                ));
            }
        }
        if let Some(text) = &f.stale_after
            && let Some(d) = duration_field(&mut errors, "spec.fallback.staleAfter", text)
        {
            stale_after = d;
        }
        on_failure = match (f.on_failure, f.replicas) {
            (None | Some(OnFailure::Hold), None) => FailureAction::Hold,
            (Some(OnFailure::Hold), Some(_)) => {
                errors.push(err(
                    "spec.fallback.replicas",
                    "only applies with onFailure: Replicas".into(),
                ));
                FailureAction::Hold
            }
            (Some(OnFailure::Replicas), None) => {
                errors.push(err(
                    "spec.fallback.replicas",
                    "is required when onFailure is Replicas".into(),
                ));
                FailureAction::Hold
            }
            (None | Some(OnFailure::Replicas), Some(n)) => {
                if n < min_replicas || n > spec.max_replicas {
                    errors.push(err(
                        "spec.fallback.replicas",
                        format!("{n} is outside [spec.minReplicas, spec.maxReplicas] = [{min_replicas}, {}]", spec.max_replicas),
                    ));
                }
                FailureAction::Replicas(n)
            }
        };
    }

    let forecast = spec
        .forecast
        .as_ref()
        .map(|f| compile_forecast(&mut errors, f, interval, &metrics));
    let pause = compile_pause(&mut errors, spec, min_replicas);
    let zero = compile_zero(&mut errors, spec, min_replicas);

    if !errors.is_empty() {
        return Err(ValidationErrors(errors));
    }
    Ok(CompiledPolicy {
        name,
        prometheus,
        mode: spec.mode,
        min_replicas,
        max_replicas: spec.max_replicas,
        interval,
        metrics,
        formula,
        behavior,
        tolerances,
        downscale_window: DEFAULT_DOWNSCALE_WINDOW,
        readiness: ReadinessSettings::default(),
        schedules,
        stale_after,
        on_failure,
        forecast,
        failure_threshold,
        pause,
        zero,
    })
}

/// `metrics[i].activationThreshold` in the metric's own units: a quantity of at least 0.
fn activation_threshold(
    errors: &mut Vec<FieldError>,
    path: &str,
    m: &crate::crd::MetricSpec,
) -> f64 {
    let Some(q) = &m.activation_threshold else {
        return 0.0;
    };
    let path = format!("{path}.activationThreshold");
    match Quantity::parse(&q.0) {
        Ok(v) if v.as_f64() >= 0.0 => v.as_f64(),
        Ok(_) => {
            errors.push(err(path, format!("must not be negative, got {:?}", q.0)));
            0.0
        }
        Err(e) => {
            errors.push(err(path, e.to_string()));
            0.0
        }
    }
}

/// `minReplicas: 0`, `idleReplicas`, `cooldown` and the activation thresholds, checked together
/// (the same rules as the CRD's admission).
fn compile_zero(
    errors: &mut Vec<FieldError>,
    spec: &ScalingPolicySpec,
    min_replicas: i32,
) -> Option<ZeroSettings> {
    let idle = match spec.idle_replicas {
        Some(n) if n < 0 => {
            errors.push(err(
                "spec.idleReplicas",
                format!("must not be negative, got {n}"),
            ));
            None
        }
        Some(n) if n >= min_replicas => {
            errors.push(err(
                "spec.idleReplicas",
                format!("{n} must be below spec.minReplicas ({min_replicas})"),
            ));
            None
        }
        Some(n) => Some(n),
        None if min_replicas == 0 => Some(0),
        None => None,
    };
    let enabled = spec.idle_replicas.is_some() || min_replicas == 0;
    let cooldown = match spec.cooldown.as_deref() {
        None => DEFAULT_COOLDOWN,
        Some(text) => match parse_duration(text).map(TimeDelta::from_std) {
            Ok(Ok(d)) if d <= MAX_COOLDOWN => d,
            Ok(_) => {
                errors.push(err(
                    "spec.cooldown",
                    format!("must be at most 24h, got {text:?}"),
                ));
                DEFAULT_COOLDOWN
            }
            Err(e) => {
                errors.push(err("spec.cooldown", e.to_string()));
                DEFAULT_COOLDOWN
            }
        },
    };
    if !enabled {
        if spec.cooldown.is_some() {
            errors.push(err(
                "spec.cooldown",
                "only applies with spec.minReplicas 0 or spec.idleReplicas".into(),
            ));
        }
        for (i, m) in spec.metrics.iter().enumerate() {
            if m.activation_threshold.is_some() {
                errors.push(err(
                    format!("spec.metrics[{i}].activationThreshold"),
                    "only applies with spec.minReplicas 0 or spec.idleReplicas".into(),
                ));
            }
        }
        return None;
    }
    let idle = idle?;
    if idle == 0
        && !spec
            .metrics
            .iter()
            .any(|m| m.prometheus.is_some() || m.object.is_some() || m.external.is_some())
    {
        let field = if min_replicas == 0 {
            "spec.minReplicas"
        } else {
            "spec.idleReplicas"
        };
        errors.push(err(
            field,
            "0 needs a prometheus, object or external metric to wake the target: resource and pods metrics have no pods to read at 0 replicas".into(),
        ));
    }
    // A running pod always uses some CPU and memory: with the default threshold of 0 such a
    // metric is active whenever the target runs, and the target never goes idle.
    for (i, m) in spec.metrics.iter().enumerate() {
        if m.resource.is_some() && m.activation_threshold.is_none() {
            errors.push(err(
                format!("spec.metrics[{i}].activationThreshold"),
                "is required on a resource metric when spec.minReplicas is 0 or spec.idleReplicas is set: a running pod always uses some cpu and memory, so with the default of 0 the target would never go idle".into(),
            ));
        }
    }
    Some(ZeroSettings {
        idle,
        active_min: min_replicas.max(1),
        cooldown,
    })
}

/// `spec.paused`, `spec.pausedReplicas`, `spec.pausedScaleIn`, `spec.pausedScaleOut`: a pin
/// stands alone and within the bounds; `paused` or both freezes hold.
fn compile_pause(
    errors: &mut Vec<FieldError>,
    spec: &ScalingPolicySpec,
    min_replicas: i32,
) -> Option<Pause> {
    let paused = spec.paused == Some(true);
    let scale_in = spec.paused_scale_in == Some(true);
    let scale_out = spec.paused_scale_out == Some(true);
    if let Some(n) = spec.paused_replicas {
        if paused || scale_in || scale_out {
            errors.push(err(
                "spec.pausedReplicas",
                "pins the count and cannot be combined with spec.paused, spec.pausedScaleIn or spec.pausedScaleOut".into(),
            ));
        }
        if n < min_replicas || n > spec.max_replicas {
            errors.push(err(
                "spec.pausedReplicas",
                format!(
                    "{n} is outside [spec.minReplicas, spec.maxReplicas] = [{min_replicas}, {}]",
                    spec.max_replicas
                ),
            ));
        }
        return Some(Pause::Pin(n));
    }
    match (paused, scale_in, scale_out) {
        (true, _, _) | (_, true, true) => Some(Pause::Hold),
        (false, true, false) => Some(Pause::ScaleIn),
        (false, false, true) => Some(Pause::ScaleOut),
        (false, false, false) => None,
    }
}

/// Default pod start-up time, and so forecast horizon.
pub const DEFAULT_STARTUP: TimeDelta = TimeDelta::seconds(60);

fn compile_forecast(
    errors: &mut Vec<FieldError>,
    f: &ForecastSpec,
    interval: TimeDelta,
    metrics: &[CompiledMetric],
) -> ForecastSettings {
    let mut duration = |field: &str, text: &Option<String>, default: TimeDelta| {
        text.as_deref()
            .and_then(|t| duration_field(errors, &format!("spec.forecast.{field}"), t))
            .unwrap_or(default)
    };
    let model = match f.model.unwrap_or_default() {
        ForecastModel::HoltWinters => ModelKind::HoltWinters,
        ForecastModel::Trend => ModelKind::Trend,
    };
    let season = match f.seasonality.unwrap_or_default() {
        Seasonality::Daily => TimeDelta::days(1),
        Seasonality::Weekly => TimeDelta::days(7),
    };
    let default_history = match (model, f.seasonality.unwrap_or_default()) {
        (ModelKind::Trend, _) => TimeDelta::days(1),
        (_, Seasonality::Daily) => TimeDelta::days(7),
        (_, Seasonality::Weekly) => TimeDelta::days(21),
    };
    let startup = duration("startup", &f.startup, DEFAULT_STARTUP);
    let horizon = duration("horizon", &f.horizon, startup);
    let history = duration("history", &f.history, default_history);
    let step = duration("step", &f.step, TimeDelta::minutes(1));
    let refit = duration("refitEvery", &f.refit_every, TimeDelta::hours(6));
    let confidence = f.confidence.unwrap_or(99.9);
    let min_headroom = f.min_headroom.unwrap_or(0.0);
    let mut field_error = |field: &str, message: String| {
        errors.push(err(format!("spec.forecast.{field}"), message));
    };
    if f.seasonality.is_some() && model == ModelKind::Trend {
        field_error(
            "seasonality",
            "only applies to the HoltWinters model".into(),
        );
    }
    if horizon > TimeDelta::hours(24) {
        field_error(
            "horizon",
            format!("must be at most 24h, got {}s", horizon.num_seconds()),
        );
    }
    if step < interval {
        field_error(
            "step",
            format!(
                "must be at least spec.interval ({}s), got {}s",
                interval.num_seconds(),
                step.num_seconds()
            ),
        );
    }
    if history < step * 2 || history > TimeDelta::days(60) {
        field_error(
            "history",
            format!(
                "must be between two steps and 60d, got {}s",
                history.num_seconds()
            ),
        );
    } else if history.num_milliseconds() / step.num_milliseconds().max(1) > MAX_HISTORY_STEPS {
        field_error(
            "history",
            format!("holds more than {MAX_HISTORY_STEPS} steps; use a longer spec.forecast.step"),
        );
    } else if model == ModelKind::HoltWinters && history < season * 2 {
        field_error(
            "history",
            format!(
                "must hold two seasons ({}d) for HoltWinters, got {}s",
                (season * 2).num_days(),
                history.num_seconds()
            ),
        );
    }
    if !(confidence.is_finite() && (50.0..=100.0).contains(&confidence)) {
        field_error(
            "confidence",
            format!("must be between 50 and 100 (percent), got {confidence}"),
        );
    }
    if !(min_headroom.is_finite() && (0.0..=100.0).contains(&min_headroom)) {
        field_error(
            "minHeadroom",
            format!("must be between 0 and 100 (targets' worth), got {min_headroom}"),
        );
    }
    if !metrics
        .iter()
        .any(|m| matches!(m.source, MetricSource::Prometheus { .. }))
    {
        errors.push(err(
            "spec.forecast",
            "forecasts Prometheus metrics, and the policy has none".into(),
        ));
    }
    ForecastSettings {
        model,
        season,
        horizon,
        history,
        step,
        refit,
        confidence: confidence / 100.0,
        min_headroom,
    }
}

/// The candidate closest to `word`, when it is close enough to be a slip of the keyboard: at
/// most two edits (one for words of up to four letters), case ignored.
pub(crate) fn suggest<'a>(
    word: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    let lower = word.to_lowercase();
    let limit = if word.chars().count() <= 4 { 1 } else { 2 };
    candidates
        .map(|c| (strsim::damerau_levenshtein(&lower, &c.to_lowercase()), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// `unknown value "X" (expected A, B or C)`, with `; did you mean B?` for a near miss.
fn unknown_value(other: &str, allowed: &[&str]) -> String {
    let list = match allowed {
        [] => String::new(),
        [one] => (*one).to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    };
    let mut message = format!("unknown value {other:?} (expected {list})");
    if let Some(near) = suggest(other, allowed.iter().copied()) {
        message.push_str(&format!("; did you mean {near}?"));
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile_metric(metric: &str) -> Result<CompiledPolicy, ValidationErrors> {
        let yaml = format!(
            "apiVersion: kscale.dev/v1alpha1\nkind: ScalingPolicy\nmetadata: {{name: p, namespace: n}}\nspec:\n  targetRef: {{kind: Deployment, name: web}}\n  maxReplicas: 5\n  metrics:\n  - {metric}\n"
        );
        let p: ScalingPolicy = serde_yaml::from_str(&yaml).unwrap();
        CompiledPolicy::from_resource(&p)
    }

    fn paths(r: Result<CompiledPolicy, ValidationErrors>) -> Vec<String> {
        r.unwrap_err().0.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn metrics_api_sources_compile_with_their_selectors_rendered() {
        let p = compile_metric(
            "{name: rps, pods: {metric: {name: http_requests, selector: {matchLabels: {verb: GET, code: '200'}, matchExpressions: [{key: path, operator: NotIn, values: [/b, /a]}, {key: canary, operator: DoesNotExist}]}}}, target: {type: AverageValue, averageValue: 500m}}",
        );
        // A value with `/` is not a label value.
        assert_eq!(
            paths(p),
            [
                "spec.metrics[0].pods.metric.selector.matchExpressions[0].values: \"/b\" is not a valid label value"
            ]
        );
        let p = compile_metric(
            "{name: rps, pods: {metric: {name: http_requests, selector: {matchLabels: {verb: GET, code: '200'}, matchExpressions: [{key: path, operator: NotIn, values: [b, a]}, {key: canary, operator: DoesNotExist}]}}}, target: {type: AverageValue, averageValue: 500m}}",
        )
        .unwrap();
        assert_eq!(
            p.metrics[0].source,
            MetricSource::Pods {
                metric: MetricRef {
                    name: "http_requests".into(),
                    selector: "!canary,code=200,path notin (a,b),verb=GET".into(),
                }
            }
        );
        let p = compile_metric(
            "{name: hits, object: {describedObject: {kind: Service, name: web}, metric: {name: 'hits:total'}}, target: {type: Value, value: '10'}}",
        )
        .unwrap();
        assert_eq!(
            p.metrics[0].source,
            MetricSource::Object {
                api_version: "v1".into(),
                kind: "Service".into(),
                name: "web".into(),
                metric: MetricRef {
                    name: "hits:total".into(),
                    selector: String::new(),
                },
            }
        );
        assert_eq!(p.metrics[0].target, Target::Value(10_000));
        compile_metric(
            "{name: q, external: {metric: {name: queue}}, target: {type: AverageValue, averageValue: '30'}}",
        )
        .unwrap();
    }

    #[test]
    fn metrics_api_sources_name_each_mistake() {
        assert_eq!(
            paths(compile_metric(
                "{name: rps, pods: {metric: {name: rps}}, target: {type: Value, value: '1'}}"
            )),
            [
                "spec.metrics[0].target.type: \"Value\" is not valid for a pods metric; use AverageValue"
            ]
        );
        assert_eq!(
            paths(compile_metric(
                "{name: q, external: {metric: {name: q}}, target: {type: Utilization, averageUtilization: 50}}"
            )),
            [
                "spec.metrics[0].target.type: Utilization is only valid for resource metrics; use Value or AverageValue"
            ]
        );
        assert_eq!(
            paths(compile_metric(
                "{name: q, external: {metric: {name: ..}}, target: {type: Value, value: '1'}}"
            )),
            [
                "spec.metrics[0].external.metric.name: \"..\" is not a valid metric name (1 to 253 letters, digits and _ . : | -, not . or ..)"
            ]
        );
        assert_eq!(
            paths(compile_metric(
                "{name: q, external: {metric: {name: 'a/b'}}, object: {describedObject: {kind: Service, name: web}, metric: {name: x}}, target: {type: Value, value: '1'}}"
            )),
            ["spec.metrics[0]: sets object and external; set exactly one source"]
        );
        assert_eq!(
            paths(compile_metric(
                "{name: o, object: {describedObject: {apiVersion: a/b/c, kind: 'Se/rvice', name: ../x}, metric: {name: x, selector: {matchExpressions: [{key: k, operator: Has}]}}}, target: {type: Value, value: '1'}}"
            )),
            [
                "spec.metrics[0].object.describedObject.apiVersion: \"a/b/c\" is not GROUP/VERSION or VERSION",
                "spec.metrics[0].object.describedObject.kind: \"Se/rvice\" is not a kind (letters and digits)",
                "spec.metrics[0].object.describedObject.name: \"../x\" is not an object name (1 to 253 lowercase letters, digits, - and .)",
                "spec.metrics[0].object.metric.selector.matchExpressions[0].operator: unknown value \"Has\" (expected In, NotIn, Exists or DoesNotExist)",
            ]
        );
        assert_eq!(
            paths(compile_metric(
                "{name: q, target: {type: Value, value: '1'}}"
            )),
            [
                "spec.metrics[0]: sets no source; set one of prometheus, resource, pods, object or external"
            ]
        );
    }

    /// A review's input: a near-miss enum value gets the same suggestion as a near-miss field.
    #[test]
    fn an_unknown_value_names_the_allowed_ones_and_the_near_miss() {
        assert_eq!(
            unknown_value("AverageValu", &["Value", "AverageValue", "Utilization"]),
            "unknown value \"AverageValu\" (expected Value, AverageValue or Utilization); did you mean AverageValue?"
        );
        assert_eq!(
            unknown_value("Both", &["Pods", "Percent"]),
            "unknown value \"Both\" (expected Pods or Percent)"
        );
    }
}
