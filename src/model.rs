//! The evaluation core's inputs and outputs: samples, observations, decisions.
//!
//! Missing data is a value here, never a zero: a source that cannot produce a number returns
//! [`Sample::Missing`] or [`Sample::Error`] with the reason, and the evaluator decides what that
//! means (the policy's fallback).

use chrono::{DateTime, TimeDelta, Utc};

/// One metric's reading, as a source delivers it.
#[derive(Debug, Clone, PartialEq)]
pub enum Sample {
    /// A scalar from Prometheus (or a trace): the values of every returned series and the
    /// timestamp of the oldest one. The evaluator sums the series, as the HPA does for External
    /// metrics, and checks the timestamp against the staleness bound.
    Series {
        /// One value per series; an empty vector means the query returned nothing.
        values: Vec<f64>,
        /// When the sample was taken.
        timestamp: DateTime<Utc>,
    },
    /// A [`Series`](Sample::Series) from an answer that says it is incomplete: Prometheus-API
    /// `warnings` (Thanos answers from the stores it reached when one is down, for instance).
    /// A sum over part of the data can be too low, so the evaluator never scales down on it: it
    /// may hold or go up, and the reason says the data was partial.
    Partial {
        /// One value per series returned.
        values: Vec<f64>,
        /// When the sample was taken (the oldest series').
        timestamp: DateTime<Utc>,
        /// How many warnings the answer carried (their text is logged, never in status).
        warnings: usize,
    },
    /// Resource usage of the target's pods from `metrics.k8s.io`, with the pods themselves.
    Pods(Vec<PodSample>),
    /// The source had nothing for this metric (for example an empty query result).
    Missing {
        /// Why, for a person.
        reason: String,
    },
    /// The source failed (timeout, HTTP or query error).
    Error {
        /// The error text.
        message: String,
    },
}

/// How reasons name a [`Sample::Partial`]: `(partial data: the server answered with N
/// warning(s), logged by the daemon)`.
pub fn partial_note(warnings: usize) -> String {
    format!(
        "(partial data: the server answered with {warnings} warning{}, logged by the daemon)",
        if warnings == 1 { "" } else { "s" }
    )
}

/// A pod phase, as far as the HPA cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodPhase {
    /// Not yet running.
    Pending,
    /// Running.
    Running,
    /// Finished successfully.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Unknown.
    Unknown,
}

/// A pod of the target with its resource usage, for resource metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct PodSample {
    /// Pod name.
    pub name: String,
    /// Pod phase.
    pub phase: PodPhase,
    /// The pod has a deletion timestamp.
    pub deleting: bool,
    /// The PodReady condition: `Some((not_false, last_transition_time))`, `None` if absent.
    /// `not_false` is false only for status `"False"`: the HPA's pod grouping treats `"Unknown"`
    /// like `"True"`.
    pub ready: Option<(bool, DateTime<Utc>)>,
    /// `status.startTime`.
    pub start_time: Option<DateTime<Utc>>,
    /// Sum of the relevant containers' requests for the resource, in milli-units;
    /// `None` if a container has no request.
    pub request_milli: Option<i64>,
    /// Usage from metrics.k8s.io, `None` if the pod has no metrics.
    pub usage: Option<PodUsage>,
}

/// One pod's usage from metrics.k8s.io.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PodUsage {
    /// Usage in milli-units (millicores, or milli-bytes as the HPA counts memory).
    pub milli: i64,
    /// When the usage was measured.
    pub timestamp: DateTime<Utc>,
    /// The measurement window, in seconds.
    pub window_seconds: i64,
}

/// What the evaluator sees of the target and its metrics at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// `scale.spec.replicas`: the count the target is asked to run.
    pub spec_replicas: i32,
    /// `scale.status.replicas`: the count that exists.
    pub status_replicas: i32,
    /// Pods that are Running and Ready.
    pub ready_replicas: i32,
    /// Pods the target's selector matches, in any phase.
    pub pods: i32,
    /// One sample per `spec.metrics` entry, in the same order.
    pub samples: Vec<Sample>,
    /// One forecast per `spec.metrics` entry (`spec.forecast` only; empty or `None` otherwise),
    /// made by the forecaster (`policy::forecast`) from the history.
    pub forecasts: Vec<Option<Prediction>>,
}

impl Observation {
    /// A target at rest: all `replicas` asked for exist, run and are ready (the backtest's
    /// simulated target), with one sample per `spec.metrics` entry and no forecasts.
    pub fn steady(replicas: i32, samples: Vec<Sample>) -> Self {
        Self {
            spec_replicas: replicas,
            status_replicas: replicas,
            ready_replicas: replicas,
            pods: replicas,
            samples,
            forecasts: Vec::new(),
        }
    }
}

/// A condition of the decision, mirroring the HPA's condition types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecisionCondition {
    /// `AbleToScale`, `ScalingActive`, `ScalingLimited` or `MetricsAvailable`.
    pub type_: &'static str,
    /// Whether the condition holds.
    pub status: bool,
    /// CamelCase reason, as the HPA writes it.
    pub reason: &'static str,
    /// A sentence.
    pub message: &'static str,
}

/// Which model a policy asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// Damped-trend Holt (level and trend).
    Trend,
    /// Additive Holt-Winters (level, damped trend and a season).
    HoltWinters,
}

impl ModelKind {
    /// The name used in reasons and the CRD.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Trend => "Trend",
            ModelKind::HoltWinters => "HoltWinters",
        }
    }
}

/// One metric's forecast at an evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// The model's point forecast for `now + horizon`.
    pub point: f64,
    /// The upper bound sized for: the point plus the headroom (see the module docs), never
    /// below 0.
    pub upper: f64,
    /// The model that made it.
    pub model: ModelKind,
    /// The horizon.
    pub horizon: TimeDelta,
}
