//! The CSV trace loader: no input panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kscale::source::trace::Trace::from_reader(std::path::Path::new("fuzz.csv"), data);
});
