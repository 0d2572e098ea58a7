//! The policy loader (YAML → ScalingPolicy → CompiledPolicy): no input panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = kscale::load::parse_policies(std::path::Path::new("fuzz.yaml"), text);
    }
});
