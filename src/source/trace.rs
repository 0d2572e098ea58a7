//! Recorded workload traces (CSV) as a metric source for backtests.
//!
//! OWNED BY the trace/plot helper: fill in. Interface agreed with the backtest engine:

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

/// A loaded trace: one timestamp column plus one or more metric columns.
#[derive(Debug, Clone)]
pub struct Trace {
    /// Where it was read from (for messages).
    pub path: PathBuf,
    /// Metric column names in file order (the `timestamp` column excluded).
    pub columns: Vec<String>,
    /// Row timestamps, non-decreasing.
    pub times: Vec<DateTime<Utc>>,
    /// `values[column][row]`: `None` where the cell is empty (a gap).
    pub values: Vec<Vec<Option<f64>>>,
}

/// Why a trace could not be loaded; every variant names the file and, where it applies, the line.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// Placeholder until implemented.
    #[error("{path}: not implemented")]
    Todo {
        /// File.
        path: PathBuf,
    },
}

impl Trace {
    /// Reads and validates a CSV trace.
    pub fn load(path: &Path) -> Result<Trace, TraceError> {
        Err(TraceError::Todo { path: path.to_path_buf() })
    }

    /// Index of a metric column by name.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }
}
