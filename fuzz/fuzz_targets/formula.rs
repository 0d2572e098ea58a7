//! The formula compiler with its cost budget: no input panics, and an accepted formula
//! evaluates within the run-time budget (`--formula-timeout`'s default, 1 s).
#![no_main]

use std::time::{Duration, Instant};

use kscale::policy::formula::Formula;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    // The CRD's maxLength.
    if source.len() > 1024 {
        return;
    }
    let started = Instant::now();
    let compiled = Formula::compile(source, &["rps", "cpu"]);
    assert!(started.elapsed() < Duration::from_secs(1), "compile {source:?}");
    if let Ok(f) = compiled {
        let started = Instant::now();
        let _ = f.evaluate(&[7, 1_000_000], &[1e9, -3.5], 3, 2);
        assert!(started.elapsed() < Duration::from_secs(1), "evaluate {source:?}");
    }
});
