//! A policy's metric history read from Prometheus with range queries, as a [`Trace`]: the
//! backtest replays it exactly as it replays a CSV trace (`kscale backtest --prometheus`).

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};

use super::prometheus::{PrometheusSource, QueryError};
use super::trace::Trace;
use crate::policy::{CompiledPolicy, MetricSource};

/// A range query that failed, naming the metric.
#[derive(Debug, thiserror::Error)]
#[error("metric {metric:?} of policy {policy}: {message}")]
pub struct HistoryError {
    /// Policy name.
    pub policy: String,
    /// Metric name.
    pub metric: String,
    /// The query error.
    pub message: String,
}

/// Reads every Prometheus metric of `policy` from `from` to `to` every `step`: one trace column
/// per metric, named after it, one row per step at which any metric has a value. Resource
/// metrics get no column (the backtest derives them from demand and capacity).
/// `progress(metric, done, total)` follows the chunks.
pub async fn read(
    source: &PrometheusSource,
    policy: &CompiledPolicy,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    step: TimeDelta,
    progress: &mut (dyn FnMut(&str, i64, i64) + Send),
) -> Result<Trace, HistoryError> {
    let mut columns = Vec::new();
    let mut rows: BTreeMap<DateTime<Utc>, Vec<Option<f64>>> = BTreeMap::new();
    let prometheus: Vec<(&str, &str)> = policy
        .metrics
        .iter()
        .filter_map(|m| match &m.source {
            MetricSource::Prometheus { query } => Some((m.name.as_str(), query.as_str())),
            MetricSource::Resource { .. } => None,
        })
        .collect();
    for (i, (name, query)) in prometheus.iter().enumerate() {
        let points = source
            .query_range(query, from, to, step, &mut |done, total| {
                progress(name, done, total)
            })
            .await
            .map_err(|e: QueryError| HistoryError {
                policy: policy.name.clone(),
                metric: name.to_string(),
                message: e.message,
            })?;
        for (t, v) in points {
            rows.entry(t)
                .or_insert_with(|| vec![None; prometheus.len()])[i] = Some(v);
        }
        columns.push(name.to_string());
    }
    let mut values = vec![Vec::with_capacity(rows.len()); columns.len()];
    let mut times = Vec::with_capacity(rows.len());
    for (t, row) in rows {
        times.push(t);
        for (c, v) in row.into_iter().enumerate() {
            values[c].push(v);
        }
    }
    Ok(Trace {
        path: source.url().into(),
        columns,
        times,
        values,
    })
}
