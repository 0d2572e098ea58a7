//! See `main.rs`: the writes part of the abuse suite.
