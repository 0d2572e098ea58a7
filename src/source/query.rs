//! Where Prometheus answers come from, for the controller's evaluations and the adapter's
//! static rules alike: the [`QueryBackend`] seam, the real Prometheus behind it, and
//! [`Unavailable`], a server that cannot be used and says why.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;

use crate::model::Sample;

/// A query's history: `(time, value)` per step.
pub type History = Vec<(DateTime<Utc>, f64)>;

/// Where Prometheus samples come from.
pub trait QueryBackend: Send + Sync {
    /// Runs each distinct query once and returns one sample per query.
    fn query_all(&self, queries: Vec<String>) -> BoxFuture<'_, HashMap<String, Sample>>;
    /// The query's history, summed over series, every `step` from `start` to `end`.
    fn query_range(
        &self,
        query: String,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        step: chrono::TimeDelta,
    ) -> BoxFuture<'_, Result<History, String>>;
}

/// A Prometheus that cannot be used (none is configured, or its Secret is missing, say): every
/// query is an explicit error saying why, never a zero.
pub struct Unavailable(pub String);

impl Unavailable {
    /// No Prometheus is configured.
    pub fn no_prometheus() -> Unavailable {
        Unavailable(NO_PROMETHEUS.into())
    }

    fn answer_all(&self, queries: Vec<String>) -> BoxFuture<'static, HashMap<String, Sample>> {
        let message = self.0.clone();
        Box::pin(async move {
            queries
                .into_iter()
                .map(|q| {
                    (
                        q,
                        Sample::Error {
                            message: message.clone(),
                        },
                    )
                })
                .collect()
        })
    }
}

impl QueryBackend for Unavailable {
    fn query_all(&self, queries: Vec<String>) -> BoxFuture<'_, HashMap<String, Sample>> {
        self.answer_all(queries)
    }

    fn query_range(
        &self,
        _query: String,
        _start: DateTime<Utc>,
        _end: DateTime<Utc>,
        _step: chrono::TimeDelta,
    ) -> BoxFuture<'_, Result<History, String>> {
        let message = self.0.clone();
        Box::pin(async move { Err(message) })
    }
}

/// Why a policy without `spec.prometheus` has no server: names every place the setting goes.
pub const NO_PROMETHEUS: &str = "no default Prometheus is configured: set --prometheus-url, KSCALE_PROMETHEUS_URL or the Helm chart's prometheus.url (or give the policy spec.prometheus.url)";

impl QueryBackend for crate::source::prometheus::PrometheusSource {
    fn query_all(&self, queries: Vec<String>) -> BoxFuture<'_, HashMap<String, Sample>> {
        Box::pin(async move {
            let refs: Vec<&str> = queries.iter().map(|q| q.as_str()).collect();
            crate::source::prometheus::PrometheusSource::query_all(self, refs).await
        })
    }

    fn query_range(
        &self,
        query: String,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        step: chrono::TimeDelta,
    ) -> BoxFuture<'_, Result<History, String>> {
        Box::pin(async move {
            crate::source::prometheus::PrometheusSource::query_range(
                self,
                &query,
                start,
                end,
                step,
                &mut |_, _| {},
            )
            .await
            .map_err(|e| e.message)
        })
    }
}
