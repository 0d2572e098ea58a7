//! See `main.rs`: the adapter part of the abuse suite.
