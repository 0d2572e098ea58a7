//! See `main.rs`: the formula part of the abuse suite.
