//! kscale: a Kubernetes autoscaler and external metrics adapter.
//!
//! Code map, following the data flow (sources → evaluation → actuation, serving or backtest):
//! - [`crd`]: the `ScalingPolicy` resource (spec, status, CRD with CEL validation).
//! - [`model`]: samples, observations: what sources hand to the evaluator.
//! - [`policy`]: validation ([`policy::compile`]) and the pure evaluation core ([`policy::evaluate`]).
//! - [`telemetry`]: the daemon's `/metrics`, `/healthz` and `/readyz`.
//! - [`listener`]: the accept/serve loop and limits shared by every listener.
//! - [`status`]: a decision as a ScalingPolicy status (conditions, metrics, history).
//! - [`source`]: metric sources (recorded traces for now).
//! - [`api_error`]: Kubernetes client errors as people read them (no `Some(...)`).
//! - [`actuate`]: reading and writing a target's `scale` subresource; one writer per target.
//! - [`backtest`]: replays a trace through a policy with a simulated clock and capacity model.
//! - [`load`]: reading policy files, with errors naming file, document and field.
//! - [`controller`]: the scaling controller (watch, tick, evaluate, act, status, events).
//! - [`adapter`]: the `external.metrics.k8s.io` aggregated API (serves the controller's values).
//! - [`cli`]: the `kscale` command line.
//! - [`units`]: Kubernetes quantities and Go-style durations.

pub mod actuate;
pub mod adapter;
pub mod api_error;
pub mod backtest;
pub mod cli;
pub mod config;
pub mod controller;
pub mod crd;
pub mod import;
pub mod listener;
pub mod load;
pub mod model;
pub mod permissions;
pub mod policy;
pub mod source;
pub mod state;
pub mod status;
pub mod telemetry;
pub mod units;
