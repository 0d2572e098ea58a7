//! Metric sources: where samples come from. Each returns typed [`crate::model::Sample`]s with
//! timestamps; missing data is a value, never a zero.

pub mod history;
pub mod prometheus;
pub mod resource;
pub mod trace;
