//! The README's comparison backtest (the request-rate example against the HPA on CPU, on the
//! shipped ELB trace), shared by the CLI and browser tests: `#[path]`-included, since those test
//! binaries do not build the test environment's support module.

/// `kscale backtest` arguments of the comparison; add output flags after them.
pub const ELB_COMPARISON: [&str; 13] = [
    "backtest",
    "-p",
    "examples/backend-rps.yaml",
    "-t",
    "examples/traces/elb_request_count_8c0756.csv",
    "--scale",
    "1.5",
    "--capacity",
    "100",
    "--startup",
    "60s",
    "--compare",
    "examples/backend-hpa-cpu.yaml",
];

/// The comparison's arguments followed by `extra`.
pub fn elb_comparison<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    ELB_COMPARISON
        .iter()
        .copied()
        .chain(extra.iter().copied())
        .collect()
}
