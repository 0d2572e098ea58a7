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

/// The history of one or more policies' Prometheus metrics.
#[derive(Debug)]
pub struct History {
    /// One column per distinct query.
    pub trace: Trace,
    /// For each policy, in the order given: `(metric, column)` for each of its Prometheus
    /// metrics (the backtest's `--metric NAME=COLUMN` mappings).
    pub columns: Vec<Vec<(String, String)>>,
}

/// Reads every Prometheus metric of `policies` from `from` to `to` every `step`: one trace
/// column per distinct query (a query two policies share is read once), named after the first
/// metric that uses it, or `policy.metric` when another query has that name already; one row
/// per step at which any query has a value. Resource metrics get no column (the backtest
/// derives them from demand and capacity). `progress(metric, done, total)` follows the chunks.
pub async fn read(
    source: &PrometheusSource,
    policies: &[&CompiledPolicy],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    step: TimeDelta,
    progress: &mut (dyn FnMut(&str, i64, i64) + Send),
) -> Result<History, HistoryError> {
    // Distinct queries in order of first use: (column, query, policy, metric).
    let mut queries: Vec<(String, &str, &str, &str)> = Vec::new();
    let mut mappings = Vec::with_capacity(policies.len());
    for policy in policies {
        let mut mapping = Vec::new();
        for m in &policy.metrics {
            let MetricSource::Prometheus { query } = &m.source else {
                continue;
            };
            let column = match queries.iter().find(|(_, q, _, _)| q == query) {
                Some((column, ..)) => column.clone(),
                None => {
                    let taken = |c: &str| queries.iter().any(|(name, ..)| name == c);
                    let column = if taken(&m.name) {
                        format!("{}.{}", policy.name, m.name)
                    } else {
                        m.name.clone()
                    };
                    queries.push((column.clone(), query, &policy.name, &m.name));
                    column
                }
            };
            mapping.push((m.name.clone(), column));
        }
        mappings.push(mapping);
    }
    let mut rows: BTreeMap<DateTime<Utc>, Vec<Option<f64>>> = BTreeMap::new();
    for (i, (column, query, policy, metric)) in queries.iter().enumerate() {
        let points = source
            .query_range(query, from, to, step, &mut |done, total| {
                progress(column, done, total)
            })
            .await
            .map_err(|e: QueryError| HistoryError {
                policy: policy.to_string(),
                metric: metric.to_string(),
                message: e.message,
            })?;
        for (t, v) in points {
            rows.entry(t).or_insert_with(|| vec![None; queries.len()])[i] = Some(v);
        }
    }
    let columns: Vec<String> = queries.into_iter().map(|(c, ..)| c).collect();
    let mut values = vec![Vec::with_capacity(rows.len()); columns.len()];
    let mut times = Vec::with_capacity(rows.len());
    for (t, row) in rows {
        times.push(t);
        for (c, v) in row.into_iter().enumerate() {
            values[c].push(v);
        }
    }
    Ok(History {
        trace: Trace {
            path: source.url().into(),
            columns,
            times,
            values,
        },
        columns: mappings,
    })
}
