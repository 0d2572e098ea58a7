//! Backtest plots (SVG or PNG). OWNED BY the trace/plot helper: fill in.

use std::path::Path;

use chrono::{DateTime, Utc};

/// One simulated run to draw.
#[derive(Debug, Clone)]
pub struct PlotRun {
    /// Legend label, e.g. the policy name.
    pub label: String,
    /// Replicas after each evaluation (same length as `PlotData::times`).
    pub replicas: Vec<i32>,
    /// Ready replicas at each evaluation.
    pub ready: Vec<i32>,
}

/// Everything a plot shows.
#[derive(Debug, Clone)]
pub struct PlotData {
    /// Title line (policy and trace names).
    pub title: String,
    /// Second line (summary figures).
    pub subtitle: String,
    /// Evaluation times.
    pub times: Vec<DateTime<Utc>>,
    /// Demand at each evaluation, `None` where the metric was missing.
    pub demand: Vec<Option<f64>>,
    /// Demand one ready replica absorbs; when set, demand is drawn in replica units
    /// (demand / capacity) on the same axis as replicas, otherwise on its own axis.
    pub capacity: Option<f64>,
    /// The runs (one, or two with `--compare`).
    pub runs: Vec<PlotRun>,
}

/// Plot failures, naming the output file.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Placeholder until implemented.
    #[error("{0}: not implemented")]
    Todo(String),
}

/// Writes the plot; the format follows the extension (`.svg` or `.png`).
pub fn write_plot(data: &PlotData, path: &Path) -> Result<(), PlotError> {
    let _ = data;
    Err(PlotError::Todo(path.display().to_string()))
}
