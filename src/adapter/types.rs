//! The `external.metrics.k8s.io/v1beta1` wire types, written by hand (no crate provides them),
//! and the Kubernetes `Status` used for every error.
//!
//! The JSON matches `k8s.io/metrics/pkg/apis/external_metrics/v1beta1`: the HPA controller reads
//! `items[].value` as a Quantity string and sums it over the items.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

/// The API group served.
pub const GROUP: &str = "external.metrics.k8s.io";
/// The version served.
pub const VERSION: &str = "v1beta1";
/// `group/version`.
pub const GROUP_VERSION: &str = "external.metrics.k8s.io/v1beta1";

/// Empty list metadata (`metadata: {}`).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ListMeta {}

/// One value of an external metric.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalMetricValue {
    /// The metric's name as requested.
    pub metric_name: String,
    /// Labels identifying this value (for example the Prometheus series' labels).
    pub metric_labels: BTreeMap<String, String>,
    /// When the value was measured (RFC 3339, seconds, as `metav1.Time`).
    pub timestamp: String,
    /// The measurement window in seconds, when known.
    #[serde(rename = "window", skip_serializing_if = "Option::is_none")]
    pub window_seconds: Option<i64>,
    /// The value as a Kubernetes Quantity string (`"42"`, `"1500m"`).
    pub value: String,
}

impl ExternalMetricValue {
    /// A value measured at `timestamp`.
    pub fn new(
        metric_name: &str,
        metric_labels: BTreeMap<String, String>,
        timestamp: DateTime<Utc>,
        value: f64,
    ) -> ExternalMetricValue {
        ExternalMetricValue {
            metric_name: metric_name.to_string(),
            metric_labels,
            timestamp: timestamp.to_rfc3339_opts(SecondsFormat::Secs, true),
            window_seconds: None,
            value: crate::units::format_quantity(value),
        }
    }
}

/// The response of `GET .../namespaces/{ns}/{metric}`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalMetricValueList {
    /// Always `ExternalMetricValueList`.
    pub kind: &'static str,
    /// Always `external.metrics.k8s.io/v1beta1`.
    pub api_version: &'static str,
    /// Empty.
    pub metadata: ListMeta,
    /// The values.
    pub items: Vec<ExternalMetricValue>,
}

impl ExternalMetricValueList {
    /// A list of `items`.
    pub fn new(items: Vec<ExternalMetricValue>) -> ExternalMetricValueList {
        ExternalMetricValueList {
            kind: "ExternalMetricValueList",
            api_version: GROUP_VERSION,
            metadata: ListMeta {},
            items,
        }
    }
}

/// A Kubernetes `Status` failure, as every apiserver returns errors.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// Always `Status`.
    pub kind: &'static str,
    /// Always `v1`.
    pub api_version: &'static str,
    /// Empty.
    pub metadata: ListMeta,
    /// Always `Failure`.
    pub status: &'static str,
    /// For a person.
    pub message: String,
    /// `NotFound`, `BadRequest`, `Unauthorized`, `Forbidden`, `MethodNotAllowed`, `InternalError`.
    pub reason: &'static str,
    /// The HTTP status code.
    pub code: u16,
}

impl Status {
    /// A failure with `code`; the reason follows from the code.
    pub fn failure(code: u16, message: impl Into<String>) -> Status {
        let reason = match code {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            405 => "MethodNotAllowed",
            503 => "ServiceUnavailable",
            _ => "InternalError",
        };
        Status {
            kind: "Status",
            api_version: "v1",
            metadata: ListMeta {},
            status: "Failure",
            message: message.into(),
            reason,
            code,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_list_has_the_json_the_hpa_reads() {
        let ts = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.678Z")
            .unwrap()
            .with_timezone(&Utc);
        let labels = BTreeMap::from([("policy".to_string(), "web".to_string())]);
        let list = ExternalMetricValueList::new(vec![ExternalMetricValue::new(
            "web-queue",
            labels,
            ts,
            1.5,
        )]);
        let json = serde_json::to_value(&list).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "kind": "ExternalMetricValueList",
                "apiVersion": "external.metrics.k8s.io/v1beta1",
                "metadata": {},
                "items": [{
                    "metricName": "web-queue",
                    "metricLabels": {"policy": "web"},
                    "timestamp": "2026-01-02T03:04:05Z",
                    "value": "1500m"
                }]
            })
        );
    }

    /// Issue 15: values past `i64` milli-units are served exactly, not saturated; past 10^29
    /// in exponent form (a valid quantity too).
    #[test]
    fn large_values_are_served_exactly() {
        let at = DateTime::from_timestamp(0, 0).unwrap();
        let served = |v: f64| ExternalMetricValue::new("m", BTreeMap::new(), at, v).value;
        assert_eq!(served(3e16), "30000000000000000");
        assert_eq!(served(1e21), "1000000000000000000000");
        assert_eq!(served(2.5e-3), "3m");
        assert_eq!(served(1e30), "1e30");
    }

    #[test]
    fn status_carries_reason_and_code() {
        let json = serde_json::to_value(Status::failure(404, "nope")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": "nope", "reason": "NotFound", "code": 404})
        );
    }
}
