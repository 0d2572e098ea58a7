//! Backtests: replay recorded demand through a policy with a simulated clock.

pub mod plot;
