//! The abuse suite (issue 13): for each kind of tenant fault, a hostile policy next to a healthy
//! one on the real test cluster (`scripts/testenv`). The healthy policy keeps its interval; the
//! hostile one shows an error in its status that names the limit and carries no upstream text.
//!
//! One module per area, so the kinds stay apart:
//! - `formula`: formula cost and evaluation budget, interval floor, history and status bounds.
//! - `sources`: Prometheus servers (black holes, huge bodies, redirects, Secrets, warnings).
//! - `adapter`: the external metrics adapter and listeners; colliding metric names.
//! - `writes`: conditional scale writes, leases, scale events, one writer per target.

#[path = "../support/mod.rs"]
mod support;

mod adapter;
mod formula;
mod sources;
mod writes;
