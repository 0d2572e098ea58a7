//! The resource metrics source: a target's pods and their usage from `metrics.k8s.io`, as the
//! [`Sample::Pods`] a `resource: {name: cpu|memory, container?}` metric needs.
//!
//! It reads what the HPA controller reads (kube-controller-manager 1.36,
//! `pkg/controller/podautoscaler`):
//! - the pods matching the target's scale selector (`status.selector` of its scale subresource);
//! - the `metrics.k8s.io/v1beta1` PodMetrics matching the same selector.
//!
//! The I/O ([`fetch_pod_samples`], [`sample`]) is thin; [`pod_samples`] is the pure conversion
//! that carries the HPA's semantics:
//! - **Usage** of a pod is the sum over its containers of the resource's `MilliValue`
//!   (millicores for cpu; bytes × 1000 for memory). A pod whose metrics lack the resource for
//!   any container, or list no container, has no usage (as `getPodMetrics`). With a named
//!   container, only that container counts, and a pod whose metrics lack it has no usage (as
//!   `getContainerMetrics`).
//! - **Requests** follow `calculateRequests`: with a named container, that container's request;
//!   otherwise pod-level requests when the pod sets any (KEP-2837, on by default since 1.34),
//!   else the sum over the containers and the restartable init containers
//!   (`restartPolicy: Always`). A relevant container without a request, or a named container
//!   that is not in the pod, gives `request_milli: None`; the evaluator turns that into the HPA's
//!   "missing request" error for Utilization targets, and AverageValue targets ignore requests,
//!   as the HPA's `GetRawResourceReplicas` does.
//! - **Pod state:** phase, `deletionTimestamp` (`deleting`), the `Ready` condition (status
//!   reduced to "not `False`", as the HPA's `groupPods` tests `status == "False"`: a pod whose
//!   readiness is `"Unknown"` is not unready there) with its `lastTransitionTime`, and
//!   `status.startTime`.
//! - A pod without a PodMetrics entry gets `usage: None`: the evaluator applies the HPA's
//!   missing-pod rules. An empty PodMetrics list is an error, as in the HPA ("no metrics returned
//!   from resource metrics API").
//!
//! Errors are explicit: the `fetch_*` functions return [`ResourceSourceError`] with the API's
//! own text (metrics API not registered, 404 without metrics-server, RBAC), and [`sample`]
//! returns it as [`Sample::Error`] so that the controller can put it straight into an
//! observation.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::autoscaling::v1::Scale;
use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, ListParams};
use kube::{Client, Resource};
use serde::{Deserialize, Serialize};

use crate::model::{PodPhase, PodSample, PodUsage, Sample};
use crate::units::{Quantity, parse_duration};

/// The resource a `resource` metric measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceName {
    /// `cpu`, in millicores.
    Cpu,
    /// `memory`, in milli-bytes (bytes × 1000, as the HPA's `MilliValue`).
    Memory,
}

impl ResourceName {
    /// From the compiled policy's `MetricSource::Resource { cpu, .. }` flag.
    pub fn from_cpu_flag(cpu: bool) -> ResourceName {
        if cpu {
            ResourceName::Cpu
        } else {
            ResourceName::Memory
        }
    }

    /// The Kubernetes resource name (`cpu` or `memory`), the key in requests and usage maps.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceName::Cpu => "cpu",
            ResourceName::Memory => "memory",
        }
    }
}

/// Why the resource source produced no pods.
#[derive(Debug, thiserror::Error)]
pub enum ResourceSourceError {
    /// Listing PodMetrics failed: `metrics.k8s.io` not registered or unavailable (no
    /// metrics-server), forbidden by RBAC, a timeout. Carries the API's own error.
    #[error(
        "unable to get metrics for resource {resource}: unable to fetch metrics from resource metrics API: {}", crate::api_error::human(.source)
    )]
    MetricsApi {
        /// `cpu` or `memory`.
        resource: &'static str,
        /// The client error, with the apiserver's message.
        source: kube::Error,
    },
    /// The metrics API answered with no PodMetrics at all for the selector.
    #[error(
        "unable to get metrics for resource {resource}: no metrics returned from resource metrics API"
    )]
    NoMetrics {
        /// `cpu` or `memory`.
        resource: &'static str,
    },
    /// A PodMetrics object could not be read (bad timestamp, window or quantity).
    #[error("unable to get metrics for resource {resource}: PodMetrics {pod}: {message}")]
    BadMetrics {
        /// `cpu` or `memory`.
        resource: &'static str,
        /// The pod the PodMetrics object is for.
        pod: String,
        /// What is wrong with it.
        message: String,
    },
    /// Listing the target's pods failed.
    #[error("unable to get pods while calculating replica count: {}", crate::api_error::human(.0))]
    Pods(kube::Error),
    /// The target's scale subresource has no label selector.
    #[error(
        "the target's scale subresource has no status.selector (is the target's selector set?)"
    )]
    NoSelector,
}

impl ResourceSourceError {
    /// The error as the sample the evaluator expects: [`Sample::Error`] with this text.
    pub fn into_sample(self) -> Sample {
        Sample::Error {
            message: self.to_string(),
        }
    }
}

// ------------------------------------------------------------------ metrics.k8s.io types

/// A `metrics.k8s.io/v1beta1` PodMetrics (k8s-openapi has no type for it): one pod's usage
/// per container, measured over `window` ending at `timestamp`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PodMetrics {
    /// Object metadata; `name` is the pod's name.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// When the usage was measured (the end of the window).
    #[serde(default)]
    pub timestamp: Option<Time>,
    /// The measurement window, a Go duration string (`"10.5s"`).
    #[serde(default)]
    pub window: Option<String>,
    /// Per-container usage.
    #[serde(default)]
    pub containers: Vec<ContainerMetrics>,
}

/// One container's usage inside a [`PodMetrics`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerMetrics {
    /// Container name.
    pub name: String,
    /// Usage per resource name (`cpu`, `memory`).
    #[serde(default)]
    pub usage: BTreeMap<String, K8sQuantity>,
}

impl Resource for PodMetrics {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "PodMetrics".into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "metrics.k8s.io".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1beta1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

// ------------------------------------------------------------------ time conversion

/// Go's zero `time.Time` (0001-01-01T00:00:00Z): what the HPA sees for an absent timestamp.
fn go_zero_time() -> DateTime<Utc> {
    DateTime::from_timestamp(-62_135_596_800, 0).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// A Kubernetes `Time` as a chrono time (the inverse of [`crate::status::k8s_time`]).
pub fn chrono_time(t: &Time) -> DateTime<Utc> {
    let mut secs = t.0.as_second();
    let mut nanos = i64::from(t.0.subsec_nanosecond());
    if nanos < 0 {
        // jiff gives the fraction the sign of the seconds; chrono wants it non-negative.
        secs -= 1;
        nanos += 1_000_000_000;
    }
    // Every jiff timestamp (years -9999..=9999) fits chrono's range.
    DateTime::from_timestamp(secs, u32::try_from(nanos).unwrap_or(0))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

// ------------------------------------------------------------------ the pure conversion

/// Converts the target's pods and the PodMetrics listed for the same selector into the
/// [`PodSample`]s of [`Sample::Pods`], one per pod in `pods` order, with the HPA's semantics
/// (see the module documentation). PodMetrics of pods not in `pods` are ignored.
///
/// Errors: `metrics` is empty (the HPA's "no metrics returned from resource metrics API"), or a
/// PodMetrics object of one of `pods` has an unreadable timestamp, window or quantity.
pub fn pod_samples(
    pods: &[Pod],
    metrics: &[PodMetrics],
    resource: ResourceName,
    container: Option<&str>,
) -> Result<Vec<PodSample>, ResourceSourceError> {
    if metrics.is_empty() {
        return Err(ResourceSourceError::NoMetrics {
            resource: resource.as_str(),
        });
    }
    let by_name: HashMap<&str, &PodMetrics> = metrics
        .iter()
        .filter_map(|m| m.metadata.name.as_deref().map(|n| (n, m)))
        .collect();
    pods.iter()
        .map(|pod| {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let usage = match by_name.get(name.as_str()) {
                Some(m) => pod_usage(m, resource, container).map_err(|message| {
                    ResourceSourceError::BadMetrics {
                        resource: resource.as_str(),
                        pod: name.clone(),
                        message,
                    }
                })?,
                None => None,
            };
            Ok(pod_sample(
                pod,
                pod_request_milli(pod, resource, container),
                usage,
            ))
        })
        .collect()
}

/// One pod as the HPA's pod grouping sees it (phase, deletion, the `Ready` condition, start
/// time), with the request and usage given: shared by the resource and the pods metrics.
pub fn pod_sample(pod: &Pod, request_milli: Option<i64>, usage: Option<PodUsage>) -> PodSample {
    let status = pod.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .map(|c| {
            (
                c.status != "False",
                c.last_transition_time
                    .as_ref()
                    .map_or_else(go_zero_time, chrono_time),
            )
        });
    PodSample {
        phase: pod_phase(status.and_then(|s| s.phase.as_deref())),
        deleting: pod.metadata.deletion_timestamp.is_some(),
        ready,
        start_time: status.and_then(|s| s.start_time.as_ref()).map(chrono_time),
        request_milli,
        usage,
        name: pod.metadata.name.clone().unwrap_or_default(),
    }
}

fn pod_phase(phase: Option<&str>) -> PodPhase {
    match phase {
        Some("Pending") => PodPhase::Pending,
        Some("Running") => PodPhase::Running,
        Some("Succeeded") => PodPhase::Succeeded,
        Some("Failed") => PodPhase::Failed,
        _ => PodPhase::Unknown,
    }
}

/// A pod quantity in the HPA's `i64` milli-units: one past that range is an error, not a
/// saturated value.
pub(crate) fn milli_of(q: &K8sQuantity) -> Result<i64, String> {
    let milli = Quantity::parse(&q.0).map_err(|e| e.to_string())?.milli();
    i64::try_from(milli).map_err(|_| {
        format!(
            "quantity {:?} is above {}m, the largest milli-value a pod metric can hold",
            q.0,
            i64::MAX
        )
    })
}

/// One pod's usage from its PodMetrics: `Ok(None)` when the resource (or the named container)
/// is absent, as the HPA's metrics client leaves such pods out.
fn pod_usage(
    m: &PodMetrics,
    resource: ResourceName,
    container: Option<&str>,
) -> Result<Option<PodUsage>, String> {
    let key = resource.as_str();
    let milli = match container {
        Some(wanted) => {
            match m
                .containers
                .iter()
                .find(|c| c.name == wanted)
                .and_then(|c| c.usage.get(key))
            {
                Some(q) => milli_of(q)?,
                None => return Ok(None),
            }
        }
        None => {
            if m.containers.is_empty() {
                return Ok(None);
            }
            let mut sum = 0i64;
            for c in &m.containers {
                let Some(q) = c.usage.get(key) else {
                    return Ok(None);
                };
                sum = sum.saturating_add(milli_of(q)?);
            }
            sum
        }
    };
    let timestamp = m
        .timestamp
        .as_ref()
        .map(chrono_time)
        .ok_or_else(|| "no timestamp".to_string())?;
    let window = match m.window.as_deref() {
        Some(w) => parse_duration(w).map_err(|e| format!("window: {e}"))?,
        None => Duration::ZERO,
    };
    Ok(Some(PodUsage {
        milli,
        timestamp,
        window_seconds: window_seconds(window),
    }))
}

/// A window in whole seconds, rounded to the nearest (metrics-server serves e.g. `"10.003s"`).
fn window_seconds(window: Duration) -> i64 {
    i64::try_from(window.as_millis().saturating_add(500) / 1000).unwrap_or(i64::MAX)
}

fn is_restartable(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

fn request_of<'a>(c: &'a Container, key: &str) -> Option<&'a K8sQuantity> {
    c.resources.as_ref()?.requests.as_ref()?.get(key)
}

fn quantity_f64(q: &K8sQuantity) -> Option<f64> {
    Quantity::parse(&q.0).ok().map(Quantity::as_f64)
}

/// The HPA's `calculateRequests` for one pod, in milli-units; `None` where the HPA reports a
/// missing request (or a named container absent from the pod, or an unreadable quantity).
fn pod_request_milli(pod: &Pod, resource: ResourceName, container: Option<&str>) -> Option<i64> {
    let spec = pod.spec.as_ref()?;
    let key = resource.as_str();
    let pod_level_set = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .is_some_and(|r| {
            r.keys()
                .any(|k| k == "cpu" || k == "memory" || k.starts_with("hugepages-"))
        });
    if container.is_none() && pod_level_set {
        return pod_level_request_milli(pod, key);
    }
    let init = spec.init_containers.as_deref().unwrap_or_default();
    let mut sum = 0i64;
    for c in spec
        .containers
        .iter()
        .chain(init.iter().filter(|c| is_restartable(c)))
    {
        if container.is_none_or(|wanted| wanted == c.name) {
            let milli =
                i64::try_from(Quantity::parse(&request_of(c, key)?.0).ok()?.milli()).ok()?;
            sum = sum.saturating_add(milli);
            if container.is_some() {
                // Container names are unique inside a pod.
                return Some(sum);
            }
        }
    }
    // A named container that is not in the pod: the HPA fails ("container ... not found").
    if container.is_some() { None } else { Some(sum) }
}

/// `calculatePodLevelRequests`: the pod's effective request as `PodRequests` computes it (the
/// containers' aggregate per the sidecar KEP, overridden by pod-level requests, plus overhead);
/// `None` if nothing in the pod requests the resource.
fn pod_level_request_milli(pod: &Pod, key: &str) -> Option<i64> {
    let spec = pod.spec.as_ref()?;
    // Containers and restartable init containers add up ...
    let mut total: Option<f64> = None;
    let add = |acc: &mut Option<f64>, v: f64| *acc = Some(acc.unwrap_or(0.0) + v);
    for c in &spec.containers {
        if let Some(v) = request_of(c, key).and_then(quantity_f64) {
            add(&mut total, v);
        }
    }
    // ... and each init container needs its own request plus the sidecars started before it.
    let mut sidecars: Option<f64> = None;
    let mut init_max: Option<f64> = None;
    for c in spec.init_containers.as_deref().unwrap_or_default() {
        let v = request_of(c, key).and_then(quantity_f64);
        let during = if is_restartable(c) {
            if let Some(v) = v {
                add(&mut total, v);
                add(&mut sidecars, v);
            }
            sidecars
        } else {
            match (v, sidecars) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
            }
        };
        if let Some(d) = during {
            init_max = Some(init_max.map_or(d, |m: f64| m.max(d)));
        }
    }
    if let Some(m) = init_max {
        total = Some(total.map_or(m, |t| t.max(m)));
    }
    if let Some(v) = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get(key))
        .and_then(quantity_f64)
    {
        total = Some(v);
    }
    if let Some(v) = spec
        .overhead
        .as_ref()
        .and_then(|o| o.get(key))
        .and_then(quantity_f64)
    {
        add(&mut total, v);
    }
    total
        .and_then(crate::units::to_milli)
        .and_then(|m| i64::try_from(m).ok())
}

// ------------------------------------------------------------------ I/O

/// The label selector of a target's scale subresource (`status.selector`), which selects the
/// pods the resource metric covers.
pub fn scale_selector(scale: &Scale) -> Result<&str, ResourceSourceError> {
    scale
        .status
        .as_ref()
        .and_then(|s| s.selector.as_deref())
        .filter(|s| !s.is_empty())
        .ok_or(ResourceSourceError::NoSelector)
}

/// Lists the PodMetrics of `namespace` matching `selector` from `metrics.k8s.io/v1beta1`.
pub async fn list_pod_metrics(
    client: &Client,
    namespace: &str,
    selector: &str,
    resource: ResourceName,
) -> Result<Vec<PodMetrics>, ResourceSourceError> {
    let api: Api<PodMetrics> = Api::namespaced(client.clone(), namespace);
    api.list(&ListParams::default().labels(selector))
        .await
        .map(|l| l.items)
        .map_err(|source| ResourceSourceError::MetricsApi {
            resource: resource.as_str(),
            source,
        })
}

/// Lists the pods of `namespace` matching `selector`.
pub async fn list_pods(
    client: &Client,
    namespace: &str,
    selector: &str,
) -> Result<Vec<Pod>, ResourceSourceError> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    api.list(&ListParams::default().labels(selector))
        .await
        .map(|l| l.items)
        .map_err(ResourceSourceError::Pods)
}

/// Reads the target's pods and their metrics and converts them with [`pod_samples`].
///
/// `selector` is the target's scale `status.selector` (see [`scale_selector`]); an empty
/// selector is refused rather than matching every pod of the namespace. The two lists run
/// concurrently; a metrics error is reported first, as the HPA fetches metrics first.
pub async fn fetch_pod_samples(
    client: &Client,
    namespace: &str,
    selector: &str,
    resource: ResourceName,
    container: Option<&str>,
) -> Result<Vec<PodSample>, ResourceSourceError> {
    if selector.trim().is_empty() {
        return Err(ResourceSourceError::NoSelector);
    }
    let (metrics, pods) = tokio::join!(
        list_pod_metrics(client, namespace, selector, resource),
        list_pods(client, namespace, selector),
    );
    let metrics = metrics?;
    let pods = pods?;
    pod_samples(&pods, &metrics, resource, container)
}

/// The evaluator's input for `pods` (already read, from the controller's pod watch): their
/// PodMetrics converted with [`pod_samples`] into [`Sample::Pods`], or [`Sample::Error`] with the
/// error's text. Never fails, so the controller can put it straight into an observation.
pub async fn sample(
    client: &Client,
    namespace: &str,
    selector: &str,
    pods: &[Pod],
    resource: ResourceName,
    container: Option<&str>,
) -> Sample {
    if selector.trim().is_empty() {
        return ResourceSourceError::NoSelector.into_sample();
    }
    let result = match list_pod_metrics(client, namespace, selector, resource).await {
        Ok(metrics) => pod_samples(pods, &metrics, resource, container),
        Err(e) => Err(e),
    };
    match result {
        Ok(pods) => Sample::Pods(pods),
        Err(e) => e.into_sample(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const T0: &str = "2026-01-02T03:04:05Z";

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// A Running, Ready pod with the given spec (containers etc.).
    fn pod(name: &str, spec: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": spec,
            "status": {
                "phase": "Running",
                "startTime": "2026-01-02T03:00:00Z",
                "conditions": [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-01-02T02:59:00Z"},
                    {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-02T03:01:00Z"}
                ]
            }
        }))
        .unwrap()
    }

    fn container(name: &str, requests: Value) -> Value {
        json!({"name": name, "image": "x", "resources": {"requests": requests}})
    }

    fn one_container_pod(name: &str, cpu: &str) -> Pod {
        pod(
            name,
            json!({"containers": [container("app", json!({"cpu": cpu, "memory": "64Mi"}))]}),
        )
    }

    fn metrics(name: &str, containers: Value) -> PodMetrics {
        serde_json::from_value(json!({
            "apiVersion": "metrics.k8s.io/v1beta1",
            "kind": "PodMetrics",
            "metadata": {"name": name, "namespace": "ns", "labels": {"app": "web"}},
            "timestamp": T0,
            "window": "10.003s",
            "containers": containers
        }))
        .unwrap()
    }

    fn usage(name: &str, cpu: &str, memory: &str) -> Value {
        json!({"name": name, "usage": {"cpu": cpu, "memory": memory}})
    }

    fn cpu_samples(pods: &[Pod], m: &[PodMetrics], container: Option<&str>) -> Vec<PodSample> {
        pod_samples(pods, m, ResourceName::Cpu, container).unwrap()
    }

    #[test]
    fn sums_containers_and_reads_pod_state() {
        let p = pod(
            "web-1",
            json!({"containers": [
                container("app", json!({"cpu": "200m", "memory": "64Mi"})),
                container("proxy", json!({"cpu": "0.1", "memory": "32Mi"}))
            ]}),
        );
        // metrics-server serves nanocores; each container's MilliValue rounds up.
        let m = metrics(
            "web-1",
            json!([
                usage("app", "150000001n", "40Mi"),
                usage("proxy", "25m", "10Mi")
            ]),
        );
        let s = cpu_samples(&[p], &[m], None);
        assert_eq!(
            s,
            vec![PodSample {
                name: "web-1".into(),
                phase: PodPhase::Running,
                deleting: false,
                ready: Some((true, t("2026-01-02T03:01:00Z"))),
                start_time: Some(t("2026-01-02T03:00:00Z")),
                request_milli: Some(300),
                usage: Some(PodUsage {
                    milli: 151 + 25,
                    timestamp: t(T0),
                    window_seconds: 10,
                }),
            }]
        );
    }

    #[test]
    fn memory_counts_milli_bytes() {
        let p = one_container_pod("web-1", "100m");
        let m = metrics("web-1", json!([usage("app", "10m", "40Mi")]));
        let s = pod_samples(&[p], &[m], ResourceName::Memory, None).unwrap();
        assert_eq!(s[0].request_milli, Some(64 * 1024 * 1024 * 1000));
        assert_eq!(s[0].usage.unwrap().milli, 40 * 1024 * 1024 * 1000);
        // Decimal suffixes too.
        let p = pod(
            "web-2",
            json!({"containers": [container("app", json!({"memory": "1G"}))]}),
        );
        let m = metrics(
            "web-2",
            json!([{"name": "app", "usage": {"memory": "123456k"}}]),
        );
        let s = pod_samples(&[p], &[m], ResourceName::Memory, None).unwrap();
        assert_eq!(s[0].request_milli, Some(1_000_000_000_000));
        assert_eq!(s[0].usage.unwrap().milli, 123_456_000_000);
    }

    #[test]
    fn named_container_only() {
        let p = pod(
            "web-1",
            json!({"containers": [
                container("app", json!({"cpu": "200m"})),
                container("proxy", json!({}))
            ]}),
        );
        let m = metrics(
            "web-1",
            json!([usage("app", "150m", "1Mi"), usage("proxy", "25m", "1Mi")]),
        );
        let s = cpu_samples(
            std::slice::from_ref(&p),
            std::slice::from_ref(&m),
            Some("app"),
        );
        assert_eq!(s[0].request_milli, Some(200));
        assert_eq!(s[0].usage.unwrap().milli, 150);
        // The other container lacks a request: only the named one matters ...
        // ... but for the whole pod the request is missing.
        let s = cpu_samples(std::slice::from_ref(&p), std::slice::from_ref(&m), None);
        assert_eq!(s[0].request_milli, None);
        assert_eq!(s[0].usage.unwrap().milli, 175);
        // A container that is in neither the pod nor its metrics.
        let s = cpu_samples(&[p], &[m], Some("sidecar"));
        assert_eq!((s[0].request_milli, s[0].usage), (None, None));
    }

    #[test]
    fn restartable_init_containers_count_others_do_not() {
        let mut sidecar = container("log-shipper", json!({"cpu": "50m"}));
        sidecar["restartPolicy"] = json!("Always");
        let p = pod(
            "web-1",
            json!({
                "initContainers": [container("migrate", json!({"cpu": "2"})), sidecar],
                "containers": [container("app", json!({"cpu": "200m"}))]
            }),
        );
        let m = metrics(
            "web-1",
            json!([
                usage("app", "100m", "1Mi"),
                usage("log-shipper", "20m", "1Mi")
            ]),
        );
        let s = cpu_samples(std::slice::from_ref(&p), std::slice::from_ref(&m), None);
        assert_eq!(s[0].request_milli, Some(250));
        assert_eq!(s[0].usage.unwrap().milli, 120);
        let s = cpu_samples(&[p], &[m], Some("log-shipper"));
        assert_eq!(s[0].request_milli, Some(50));
        assert_eq!(s[0].usage.unwrap().milli, 20);
    }

    #[test]
    fn missing_request_is_none() {
        let p = pod(
            "web-1",
            json!({"containers": [container("app", json!({"memory": "64Mi"}))]}),
        );
        let m = metrics("web-1", json!([usage("app", "100m", "1Mi")]));
        let s = cpu_samples(&[p], &[m], None);
        assert_eq!(s[0].request_milli, None);
        assert!(s[0].usage.is_some());
        // No resources at all.
        let p = pod(
            "web-2",
            json!({"containers": [{"name": "app", "image": "x"}]}),
        );
        let m = metrics("web-2", json!([usage("app", "100m", "1Mi")]));
        assert_eq!(cpu_samples(&[p], &[m], None)[0].request_milli, None);
    }

    #[test]
    fn pod_level_requests_win_without_a_container() {
        let p = pod(
            "web-1",
            json!({
                "resources": {"requests": {"cpu": "1"}},
                "containers": [container("app", json!({"cpu": "200m"})), container("b", json!({}))]
            }),
        );
        let m = metrics("web-1", json!([usage("app", "100m", "1Mi")]));
        let s = cpu_samples(std::slice::from_ref(&p), std::slice::from_ref(&m), None);
        assert_eq!(s[0].request_milli, Some(1000));
        // A named container still uses its own request.
        let s = cpu_samples(
            std::slice::from_ref(&p),
            std::slice::from_ref(&m),
            Some("app"),
        );
        assert_eq!(s[0].request_milli, Some(200));
        // Pod-level cpu only: memory comes from the containers' aggregate, where present.
        let s = pod_samples(&[p], &[m], ResourceName::Memory, None).unwrap();
        assert_eq!(s[0].request_milli, None);
    }

    #[test]
    fn pods_without_metrics_are_missing_not_zero() {
        let pods = [
            one_container_pod("web-1", "100m"),
            one_container_pod("web-2", "100m"),
        ];
        let m = [
            metrics("web-2", json!([usage("app", "80m", "1Mi")])),
            metrics("other", json!([usage("app", "999m", "1Mi")])),
        ];
        let s = cpu_samples(&pods, &m, None);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].name.as_str(), s[0].usage), ("web-1", None));
        assert_eq!(s[0].request_milli, Some(100));
        assert_eq!(s[1].usage.unwrap().milli, 80);
        // A PodMetrics without containers, or without the resource for one container, is
        // missing too (the HPA's getPodMetrics).
        let m = [
            metrics("web-1", json!([])),
            metrics(
                "web-2",
                json!([usage("app", "80m", "1Mi"), {"name": "x", "usage": {"memory": "1Mi"}}]),
            ),
        ];
        let s = cpu_samples(&pods, &m, None);
        assert_eq!((s[0].usage, s[1].usage), (None, None));
    }

    #[test]
    fn no_metrics_at_all_is_an_error() {
        let err = pod_samples(
            &[one_container_pod("web-1", "100m")],
            &[],
            ResourceName::Cpu,
            None,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "unable to get metrics for resource cpu: no metrics returned from resource metrics API"
        );
        assert_eq!(
            err.into_sample(),
            Sample::Error {
                message: "unable to get metrics for resource cpu: no metrics returned from resource metrics API".into()
            }
        );
    }

    #[test]
    fn bad_quantity_or_window_is_an_error_naming_the_pod() {
        let p = one_container_pod("web-1", "100m");
        let m = metrics("web-1", json!([usage("app", "lots", "1Mi")]));
        let err = pod_samples(std::slice::from_ref(&p), &[m], ResourceName::Cpu, None).unwrap_err();
        assert!(err.to_string().contains("PodMetrics web-1"), "{err}");
        let mut m = metrics("web-1", json!([usage("app", "1m", "1Mi")]));
        m.window = Some("ten seconds".into());
        let err = pod_samples(&[p], &[m], ResourceName::Cpu, None).unwrap_err();
        assert!(err.to_string().contains("window"), "{err}");
    }

    fn with_status(mut p: Pod, status: Value) -> Pod {
        p.status = Some(serde_json::from_value(status).unwrap());
        p
    }

    #[test]
    fn readiness_unknown_is_not_unready_as_in_the_hpa() {
        let p = with_status(
            one_container_pod("web-1", "100m"),
            json!({"phase": "Running", "conditions": [
                {"type": "Ready", "status": "Unknown", "lastTransitionTime": "2026-01-02T03:02:00Z"}
            ]}),
        );
        let m = metrics("web-1", json!([usage("app", "1m", "1Mi")]));
        let s = cpu_samples(&[p], &[m], None);
        assert_eq!(s[0].ready, Some((true, t("2026-01-02T03:02:00Z"))));
        assert_eq!(s[0].start_time, None);
    }

    #[test]
    fn readiness_false_absent_and_without_transition_time() {
        let m = [
            metrics("a", json!([usage("app", "1m", "1Mi")])),
            metrics("b", json!([usage("app", "1m", "1Mi")])),
            metrics("c", json!([usage("app", "1m", "1Mi")])),
        ];
        let pods = [
            with_status(
                one_container_pod("a", "100m"),
                json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": T0}]}),
            ),
            with_status(one_container_pod("b", "100m"), json!({"phase": "Running"})),
            with_status(
                one_container_pod("c", "100m"),
                json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}),
            ),
        ];
        let s = cpu_samples(&pods, &m, None);
        assert_eq!(s[0].ready, Some((false, t(T0))));
        assert_eq!(s[1].ready, None);
        // Go's zero time, as the HPA would see it.
        assert_eq!(s[2].ready, Some((true, t("0001-01-01T00:00:00Z"))));
    }

    #[test]
    fn phases_and_deletion() {
        let phases = [
            ("Pending", PodPhase::Pending),
            ("Running", PodPhase::Running),
            ("Succeeded", PodPhase::Succeeded),
            ("Failed", PodPhase::Failed),
            ("Weird", PodPhase::Unknown),
        ];
        for (text, phase) in phases {
            let p = with_status(one_container_pod("web-1", "100m"), json!({"phase": text}));
            let m = metrics("web-1", json!([usage("app", "1m", "1Mi")]));
            assert_eq!(cpu_samples(&[p], &[m], None)[0].phase, phase, "{text}");
        }
        let mut p = one_container_pod("web-1", "100m");
        p.metadata.deletion_timestamp = Some(crate::status::k8s_time(t(T0)));
        let m = metrics("web-1", json!([usage("app", "1m", "1Mi")]));
        let s = cpu_samples(&[p], &[m], None);
        assert!(s[0].deleting);
        assert_eq!(s[0].phase, PodPhase::Running);
    }

    #[test]
    fn time_conversion_round_trips() {
        for s in [
            T0,
            "2026-01-02T03:04:05.123456789Z",
            "1969-12-31T23:59:59.5Z",
            "0001-01-01T00:00:00Z",
        ] {
            let c = t(s);
            assert_eq!(chrono_time(&crate::status::k8s_time(c)), c, "{s}");
        }
    }

    #[test]
    fn samples_feed_the_hpa_arithmetic() {
        use crate::policy::replicas::{ReadinessSettings, ResourceTarget, Tolerances, resource};
        // 3 pods requesting 100m, using 80m, 90m, 100m: 90% of requests against a 60% target.
        let pods: Vec<Pod> = (1..=3)
            .map(|i| one_container_pod(&format!("web-{i}"), "100m"))
            .collect();
        let m: Vec<PodMetrics> = [("web-1", "80m"), ("web-2", "90m"), ("web-3", "100m")]
            .iter()
            .map(|(n, cpu)| metrics(n, json!([usage("app", cpu, "1Mi")])))
            .collect();
        let s = cpu_samples(&pods, &m, None);
        let p = resource(
            &s,
            true,
            ResourceTarget::Utilization(60),
            3,
            Tolerances { down: 0.1, up: 0.1 },
            t(T0) + chrono::TimeDelta::minutes(10),
            ReadinessSettings::default(),
        )
        .unwrap();
        assert_eq!((p.replicas, p.value, p.ready), (5, 90.0, 3)); // ceil(1.5 * 3)
    }

    #[test]
    fn scale_selector_is_required() {
        let scale: Scale = serde_json::from_value(json!({
            "metadata": {"name": "web"},
            "status": {"replicas": 3, "selector": "app=web"}
        }))
        .unwrap();
        assert_eq!(scale_selector(&scale).unwrap(), "app=web");
        let scale: Scale = serde_json::from_value(json!({
            "metadata": {"name": "web"},
            "status": {"replicas": 3}
        }))
        .unwrap();
        assert!(matches!(
            scale_selector(&scale),
            Err(ResourceSourceError::NoSelector)
        ));
    }
}
