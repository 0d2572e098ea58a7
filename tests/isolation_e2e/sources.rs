//! See `main.rs`: the sources part of the abuse suite.
