//! The custom and external metrics sources: `pods` and `object` metrics from
//! `custom.metrics.k8s.io/v1beta2`, `external` metrics from `external.metrics.k8s.io/v1beta1`,
//! read through the apiserver (which proxies them to whichever APIService owns the group, kscale's
//! own adapter included), as the HPA controller's metrics client reads them:
//!
//! - **pods**: `GET .../namespaces/NS/pods/*/METRIC?labelSelector=SCALE&metricLabelSelector=SEL`.
//!   Each item is one pod's value (`MilliValue`); the pods come from the controller's watch, so
//!   the evaluator applies the HPA's missing- and unready-pod rules ([`Sample::Pods`]). No item
//!   at all is the HPA's "no metrics returned from custom metrics API".
//! - **object**: `GET .../namespaces/NS/RESOURCE[.GROUP]/NAME/METRIC?metricLabelSelector=SEL`
//!   (a `Namespace` object: `.../namespaces/NS/metrics/METRIC`); exactly one item, as the HPA
//!   asks (a [`Sample::Series`] of one value).
//! - **external**: `GET .../namespaces/NS/METRIC?labelSelector=SEL`; the values are summed by the
//!   evaluator (a [`Sample::Series`]); no item is a missing metric, never 0.
//!
//! A provider is tenant-reachable input: every path segment is percent-encoded (compile.rs
//! already refuses `/`, `.` and `..` names), a request is bounded by [`TIMEOUT`] and its answer by
//! [`MAX_BODY_BYTES`] (read in chunks, never buffered past the cap). A failure (404: no such
//! metric; 503: the APIService is unavailable) is a [`Sample::Error`] naming the metric, the API
//! and the HTTP status; the policy's fallback applies.

use std::time::Duration;

use chrono::{DateTime, Utc};
use http_body_util::BodyExt as _;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use serde::Deserialize;

use crate::model::{PodUsage, Sample};
use crate::policy::compile::MetricRef;
use crate::source::resource::{chrono_time, milli_of, pod_sample};

/// The bound on one metrics-API request, answer included.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer read from a metrics API (4 MiB: some 20 000 pods' values).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// The most characters of a provider's error message that reach a status.
const MESSAGE_CHARS: usize = 300;
/// The HPA's window for an item without `windowSeconds` (`metricServerDefaultMetricWindow`).
const DEFAULT_WINDOW_SECONDS: i64 = 60;

/// The custom metrics API's path prefix.
pub const CUSTOM_PREFIX: &str = "/apis/custom.metrics.k8s.io/v1beta2";
/// The external metrics API's path prefix.
pub const EXTERNAL_PREFIX: &str = "/apis/external.metrics.k8s.io/v1beta1";

/// Why a metrics API gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum MetricsApiError {
    /// The request could not be sent or answered (connection, TLS, timeout).
    #[error("{api}: the request failed: {message}")]
    Request {
        /// The API group.
        api: &'static str,
        /// What went wrong.
        message: String,
    },
    /// The API answered with an HTTP error: 404 (no such metric, or the API is not registered),
    /// 503 (its APIService is unavailable), 403 (RBAC).
    #[error("{api} answered HTTP {status}{}", if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    Status {
        /// The API group.
        api: &'static str,
        /// The HTTP status.
        status: u16,
        /// The apiserver's or provider's message, shortened.
        message: String,
    },
    /// The answer was larger than [`MAX_BODY_BYTES`].
    #[error("{api}: the answer is larger than {MAX_BODY_BYTES} bytes; kscale stopped reading it")]
    TooLarge {
        /// The API group.
        api: &'static str,
    },
    /// The answer was not the API's JSON.
    #[error("{api}: the answer could not be read: {message}")]
    Decode {
        /// The API group.
        api: &'static str,
        /// What could not be read.
        message: String,
    },
    /// The answer had no items, or (object metrics) not exactly one.
    #[error("{0}")]
    Items(String),
}

// ------------------------------------------------------------------ wire types

/// `custom.metrics.k8s.io/v1beta2` `MetricValueList`.
#[derive(Debug, Clone, Deserialize)]
pub struct MetricValueList {
    /// The values.
    #[serde(default)]
    pub items: Vec<MetricValue>,
}

/// One value of a `MetricValueList`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricValue {
    /// The object the value describes (a pod, for pods metrics).
    #[serde(default)]
    pub described_object: DescribedObject,
    /// When the value was measured.
    pub timestamp: Time,
    /// The measurement window.
    #[serde(default)]
    pub window_seconds: Option<i64>,
    /// The value.
    pub value: K8sQuantity,
}

/// The `describedObject` of a [`MetricValue`].
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DescribedObject {
    /// The object's name.
    #[serde(default)]
    pub name: String,
}

/// `external.metrics.k8s.io/v1beta1` `ExternalMetricValueList`.
#[derive(Debug, Clone, Deserialize)]
pub struct ExternalMetricValueList {
    /// The values, one per series.
    #[serde(default)]
    pub items: Vec<ExternalMetricValue>,
}

/// One series of an `ExternalMetricValueList`.
#[derive(Debug, Clone, Deserialize)]
pub struct ExternalMetricValue {
    /// When the value was measured.
    pub timestamp: Time,
    /// The value.
    pub value: K8sQuantity,
}

// ------------------------------------------------------------------ paths

/// Percent-encodes everything but RFC 3986's unreserved characters, so a name or a selector
/// is one path segment or query value and nothing more.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn selector_query(key: &str, selector: &str) -> String {
    if selector.is_empty() {
        String::new()
    } else {
        format!("{key}={}", encode(selector))
    }
}

fn join_query(parts: &[String]) -> String {
    let parts: Vec<&str> = parts
        .iter()
        .map(String::as_str)
        .filter(|p| !p.is_empty())
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// The request path of a pods metric over the pods `pod_selector` selects.
pub fn pods_path(namespace: &str, metric: &MetricRef, pod_selector: &str) -> String {
    format!(
        "{CUSTOM_PREFIX}/namespaces/{}/pods/%2A/{}{}",
        encode(namespace),
        encode(&metric.name),
        join_query(&[
            selector_query("labelSelector", pod_selector),
            selector_query("metricLabelSelector", &metric.selector),
        ])
    )
}

/// The request path of an object metric: `resource` is the described kind's plural and `group`
/// its API group (empty for the core group), as discovery gives them.
pub fn object_path(
    namespace: &str,
    resource: &str,
    group: &str,
    kind: &str,
    name: &str,
    metric: &MetricRef,
) -> String {
    let query = join_query(&[selector_query("metricLabelSelector", &metric.selector)]);
    if kind == "Namespace" && group.is_empty() {
        // The HPA reads a Namespace's metrics as root-scoped metrics of the policy's namespace.
        return format!(
            "{CUSTOM_PREFIX}/namespaces/{}/metrics/{}{query}",
            encode(namespace),
            encode(&metric.name)
        );
    }
    let qualified = if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    };
    format!(
        "{CUSTOM_PREFIX}/namespaces/{}/{}/{}/{}{query}",
        encode(namespace),
        encode(&qualified),
        encode(name),
        encode(&metric.name)
    )
}

/// The request path of an external metric.
pub fn external_path(namespace: &str, metric: &MetricRef) -> String {
    format!(
        "{EXTERNAL_PREFIX}/namespaces/{}/{}{}",
        encode(namespace),
        encode(&metric.name),
        join_query(&[selector_query("labelSelector", &metric.selector)])
    )
}

// ------------------------------------------------------------------ the pure conversions

/// A pods metric's answer and the target's pods as [`Sample::Pods`]: each pod's value
/// (`MilliValue`, in the HPA's `i64` milli-units) with the HPA's default window; a pod without
/// an item has no usage (the evaluator's missing-pod rules). No item at all is an error, as in
/// the HPA.
pub fn pods_sample(
    metric: &str,
    pods: &[Pod],
    list: &MetricValueList,
) -> Result<Sample, MetricsApiError> {
    if list.items.is_empty() {
        return Err(MetricsApiError::Items(format!(
            "unable to get metric {metric}: no metrics returned from custom metrics API"
        )));
    }
    let by_name: std::collections::HashMap<&str, &MetricValue> = list
        .items
        .iter()
        .map(|i| (i.described_object.name.as_str(), i))
        .collect();
    let mut samples = Vec::with_capacity(pods.len());
    for pod in pods {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let usage = match by_name.get(name) {
            Some(item) => Some(PodUsage {
                milli: milli_of(&item.value).map_err(|e| {
                    MetricsApiError::Items(format!(
                        "unable to get metric {metric}: pod {name}: {e}"
                    ))
                })?,
                timestamp: chrono_time(&item.timestamp),
                window_seconds: item.window_seconds.unwrap_or(DEFAULT_WINDOW_SECONDS),
            }),
            None => None,
        };
        samples.push(pod_sample(pod, None, usage));
    }
    Ok(Sample::Pods(samples))
}

fn quantity_value(q: &K8sQuantity) -> Result<f64, String> {
    let milli = crate::units::Quantity::parse(&q.0)
        .map_err(|e| e.to_string())?
        .milli();
    Ok(milli as f64 / 1000.0)
}

/// An object metric's answer as a one-value [`Sample::Series`]: exactly one item, as the HPA
/// asks ("returned N results when we asked for exactly one").
pub fn object_sample(metric: &str, list: &MetricValueList) -> Result<Sample, MetricsApiError> {
    match list.items.as_slice() {
        [item] => Ok(Sample::Series {
            values: vec![quantity_value(&item.value).map_err(|e| {
                MetricsApiError::Items(format!("unable to get metric {metric}: {e}"))
            })?],
            timestamp: chrono_time(&item.timestamp),
        }),
        items => Err(MetricsApiError::Items(format!(
            "unable to get metric {metric}: the custom metrics API returned {} results when we asked for exactly one",
            items.len()
        ))),
    }
}

/// An external metric's answer as a [`Sample::Series`] of every series' value, timed by the
/// oldest; none is [`Sample::Missing`] (never 0).
pub fn external_sample(metric: &str, list: &ExternalMetricValueList) -> Sample {
    if list.items.is_empty() {
        return Sample::Missing {
            reason: format!("no metrics returned from external metrics API for {metric}"),
        };
    }
    let mut values = Vec::with_capacity(list.items.len());
    let mut oldest: Option<DateTime<Utc>> = None;
    for item in &list.items {
        match quantity_value(&item.value) {
            Ok(v) => values.push(v),
            Err(e) => {
                return Sample::Error {
                    message: format!("unable to get external metric {metric}: {e}"),
                };
            }
        }
        let t = chrono_time(&item.timestamp);
        oldest = Some(oldest.map_or(t, |o| o.min(t)));
    }
    Sample::Series {
        values,
        timestamp: oldest.unwrap_or(DateTime::<Utc>::MIN_UTC),
    }
}

// ------------------------------------------------------------------ I/O

/// GETs `path` from the apiserver under [`TIMEOUT`] and [`MAX_BODY_BYTES`] and decodes it.
pub async fn get<T: serde::de::DeserializeOwned>(
    client: &Client,
    api: &'static str,
    path: &str,
) -> Result<T, MetricsApiError> {
    tokio::time::timeout(TIMEOUT, get_unbounded(client, api, path))
        .await
        .map_err(|_| MetricsApiError::Request {
            api,
            message: format!("no answer within {}s", TIMEOUT.as_secs()),
        })?
}

async fn get_unbounded<T: serde::de::DeserializeOwned>(
    client: &Client,
    api: &'static str,
    path: &str,
) -> Result<T, MetricsApiError> {
    let request = hyper::Request::get(path)
        .header("Accept", "application/json")
        .body(kube::client::Body::from(Vec::new()))
        .map_err(|e| MetricsApiError::Request {
            api,
            message: e.to_string(),
        })?;
    let response = client
        .send(request)
        .await
        .map_err(|e| MetricsApiError::Request {
            api,
            message: crate::api_error::human(&e).to_string(),
        })?;
    let status = response.status().as_u16();
    let body = http_body_util::Limited::new(response.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                MetricsApiError::TooLarge { api }
            } else {
                MetricsApiError::Request {
                    api,
                    message: format!("reading the answer: {e}"),
                }
            }
        })?
        .to_bytes();
    if !(200..300).contains(&status) {
        return Err(MetricsApiError::Status {
            api,
            status,
            message: status_message(&body),
        });
    }
    serde_json::from_slice(&body).map_err(|e| MetricsApiError::Decode {
        api,
        message: e.to_string(),
    })
}

/// The `message` of a `metav1.Status` body, shortened; empty for any other body (a provider's
/// error page is never echoed).
fn status_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Status {
        #[serde(default)]
        message: String,
    }
    serde_json::from_slice::<Status>(body)
        .map(|s| s.message.chars().take(MESSAGE_CHARS).collect())
        .unwrap_or_default()
}

/// The sample of a pods metric over `pods` (the target's, from the watch, selected by
/// `pod_selector`). Never fails: an error is a [`Sample::Error`] naming the metric.
pub async fn pods_metric(
    client: &Client,
    namespace: &str,
    metric: &MetricRef,
    pod_selector: &str,
    pods: &[Pod],
) -> Sample {
    let path = pods_path(namespace, metric, pod_selector);
    let result = match get::<MetricValueList>(client, "custom.metrics.k8s.io", &path).await {
        Ok(list) => pods_sample(&metric.name, pods, &list),
        Err(e) => Err(e),
    };
    result.unwrap_or_else(|e| error_sample(&metric.name, "custom", e))
}

/// The sample of an object metric (the described object's `resource` plural and `group` from
/// discovery). Never fails.
pub async fn object_metric(
    client: &Client,
    namespace: &str,
    (resource, group, kind, name): (&str, &str, &str, &str),
    metric: &MetricRef,
) -> Sample {
    let path = object_path(namespace, resource, group, kind, name, metric);
    let result = match get::<MetricValueList>(client, "custom.metrics.k8s.io", &path).await {
        Ok(list) => object_sample(&metric.name, &list),
        Err(e) => Err(e),
    };
    result.unwrap_or_else(|e| error_sample(&metric.name, "custom", e))
}

/// The sample of an external metric. Never fails.
pub async fn external_metric(client: &Client, namespace: &str, metric: &MetricRef) -> Sample {
    let path = external_path(namespace, metric);
    match get::<ExternalMetricValueList>(client, "external.metrics.k8s.io", &path).await {
        Ok(list) => external_sample(&metric.name, &list),
        Err(e) => error_sample(&metric.name, "external", e),
    }
}

fn error_sample(metric: &str, which: &str, e: MetricsApiError) -> Sample {
    Sample::Error {
        message: match e {
            MetricsApiError::Items(m) => m,
            e => format!(
                "unable to get metric {metric}: unable to fetch metrics from {which} metrics API: {e}"
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn metric(name: &str, selector: &str) -> MetricRef {
        MetricRef {
            name: name.into(),
            selector: selector.into(),
        }
    }

    #[test]
    fn paths_encode_every_segment_and_selector() {
        assert_eq!(
            pods_path("shop", &metric("rps", ""), "app=web"),
            "/apis/custom.metrics.k8s.io/v1beta2/namespaces/shop/pods/%2A/rps?labelSelector=app%3Dweb"
        );
        assert_eq!(
            pods_path("shop", &metric("a:b|c", "k in (x,y)"), "app=web,tier!=db"),
            "/apis/custom.metrics.k8s.io/v1beta2/namespaces/shop/pods/%2A/a%3Ab%7Cc?labelSelector=app%3Dweb%2Ctier%21%3Ddb&metricLabelSelector=k%20in%20%28x%2Cy%29"
        );
        assert_eq!(
            object_path(
                "shop",
                "ingresses",
                "networking.k8s.io",
                "Ingress",
                "main",
                &metric("hits", "")
            ),
            "/apis/custom.metrics.k8s.io/v1beta2/namespaces/shop/ingresses.networking.k8s.io/main/hits"
        );
        assert_eq!(
            object_path(
                "shop",
                "services",
                "",
                "Service",
                "web",
                &metric("qps", "a=b")
            ),
            "/apis/custom.metrics.k8s.io/v1beta2/namespaces/shop/services/web/qps?metricLabelSelector=a%3Db"
        );
        assert_eq!(
            object_path(
                "shop",
                "namespaces",
                "",
                "Namespace",
                "other",
                &metric("jobs", "")
            ),
            "/apis/custom.metrics.k8s.io/v1beta2/namespaces/shop/metrics/jobs"
        );
        assert_eq!(
            external_path("shop", &metric("queue_depth", "queue=orders")),
            "/apis/external.metrics.k8s.io/v1beta1/namespaces/shop/queue_depth?labelSelector=queue%3Dorders"
        );
        // Nothing a tenant writes leaves its segment.
        assert_eq!(encode("../x/y?z#"), "..%2Fx%2Fy%3Fz%23");
    }

    fn pod(name: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "status": {"phase": "Running", "startTime": "2026-01-01T00:00:00Z",
                "conditions": [{"type": "Ready", "status": "True",
                    "lastTransitionTime": "2026-01-01T00:00:10Z"}]}
        }))
        .unwrap()
    }

    fn list(items: serde_json::Value) -> MetricValueList {
        serde_json::from_value(json!({ "items": items })).unwrap()
    }

    #[test]
    fn pods_values_are_milli_values_and_missing_pods_have_none() {
        let l = list(json!([
            {"describedObject": {"kind": "Pod", "name": "a"}, "metric": {"name": "rps"},
             "timestamp": "2026-01-01T00:01:00Z", "windowSeconds": 30, "value": "1500m"},
            {"describedObject": {"kind": "Pod", "name": "gone"}, "metric": {"name": "rps"},
             "timestamp": "2026-01-01T00:01:00Z", "value": "7"}
        ]));
        let Sample::Pods(pods) = pods_sample("rps", &[pod("a"), pod("b")], &l).unwrap() else {
            panic!("not pods");
        };
        assert_eq!(pods.len(), 2);
        let a = pods[0].usage.unwrap();
        assert_eq!((a.milli, a.window_seconds), (1500, 30));
        assert_eq!(pods[0].request_milli, None);
        assert!(pods[1].usage.is_none());
        let err = pods_sample("rps", &[pod("a")], &list(json!([]))).unwrap_err();
        assert!(
            err.to_string()
                .contains("no metrics returned from custom metrics API")
        );
    }

    #[test]
    fn an_object_metric_is_exactly_one_value() {
        let one = list(
            json!([{"describedObject": {"name": "main"}, "metric": {"name": "hits"},
            "timestamp": "2026-01-01T00:01:00Z", "value": "2500m"}]),
        );
        match object_sample("hits", &one).unwrap() {
            Sample::Series { values, .. } => assert_eq!(values, vec![2.5]),
            other => panic!("{other:?}"),
        }
        let two = list(json!([
            {"timestamp": "2026-01-01T00:01:00Z", "value": "1"},
            {"timestamp": "2026-01-01T00:01:00Z", "value": "2"}
        ]));
        assert!(
            object_sample("hits", &two)
                .unwrap_err()
                .to_string()
                .contains("returned 2 results when we asked for exactly one")
        );
    }

    #[test]
    fn external_series_are_kept_apart_and_none_is_missing() {
        let l: ExternalMetricValueList = serde_json::from_value(json!({"items": [
            {"metricName": "q", "timestamp": "2026-01-01T00:01:00Z", "value": "3"},
            {"metricName": "q", "timestamp": "2026-01-01T00:00:30Z", "value": "250m"}
        ]}))
        .unwrap();
        match external_sample("q", &l) {
            Sample::Series { values, timestamp } => {
                assert_eq!(values, vec![3.0, 0.25]);
                assert_eq!(timestamp.to_rfc3339(), "2026-01-01T00:00:30+00:00");
            }
            other => panic!("{other:?}"),
        }
        let none: ExternalMetricValueList = serde_json::from_value(json!({"items": []})).unwrap();
        assert!(matches!(
            external_sample("q", &none),
            Sample::Missing { .. }
        ));
    }

    #[test]
    fn only_a_status_message_is_echoed() {
        assert_eq!(
            status_message(
                br#"{"kind":"Status","message":"the server could not find the metric rps"}"#
            ),
            "the server could not find the metric rps"
        );
        assert_eq!(status_message(b"<html>proxy error</html>"), "");
    }
}
