//! The Prometheus answer parsers (instant and range queries): no input panics. The first two
//! bytes are the HTTP status.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (status, body) = match data {
        [a, b, rest @ ..] => (u16::from_le_bytes([*a, *b]), rest),
        _ => (200, data),
    };
    if let Ok(body) = std::str::from_utf8(body) {
        let _ = kscale::source::prometheus::parse_response(status, body);
        let _ = kscale::source::prometheus::parse_range_response(status, body);
    }
});
