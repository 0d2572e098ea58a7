//! Kubernetes quantities and Go-style durations, parsed the way the apiserver and the HPA read them.

use std::fmt;
use std::time::Duration;

/// A parse failure for a quantity or duration; the caller adds the field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}: {value:?}")]
pub struct UnitError {
    /// What is wrong.
    pub message: &'static str,
    /// The text that was given.
    pub value: String,
}

fn unit_error(message: &'static str, value: &str) -> UnitError {
    UnitError {
        message,
        value: value.to_string(),
    }
}

/// The largest magnitude, in units, that kscale computes with exactly: 10^29. Kubernetes
/// documents 2^63-1 (about 9.2·10^18) as the largest quantity, so every quantity it documents,
/// and its value in milli-units (up to 9.2·10^21, past `i64`), fits; larger ones are refused
/// with an error instead of saturating.
pub const MAX_EXACT_UNITS: f64 = 1e29;

const NANO_PER_UNIT: i128 = 1_000_000_000;
const MAX_EXACT_NANO: i128 = 100_000_000_000_000_000_000_000_000_000_000_000_000; // 10^38

/// A parsed Kubernetes resource quantity (`100`, `250m`, `1.5k`, `2Gi`, `1e3`, `1E`), held
/// exactly in nano-units as Kubernetes holds it (rounded up to a nano-unit, away from zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity {
    nano: i128,
}

impl Quantity {
    /// Parses the canonical Kubernetes quantity grammar: a signed decimal number followed by an
    /// optional binary (`Ki`..`Ei`), decimal (`n u m k M G T P E`) or exponent (`e3`, `E-2`)
    /// suffix. Exact over the whole range of Kubernetes quantities; a magnitude above
    /// [`MAX_EXACT_UNITS`] is an error, never a saturated value.
    pub fn parse(text: &str) -> Result<Quantity, UnitError> {
        let s = text.trim();
        if s.is_empty() {
            return Err(unit_error("empty quantity", text));
        }
        let split = s
            .char_indices()
            .find(|&(i, c)| !(c.is_ascii_digit() || c == '.' || ((c == '+' || c == '-') && i == 0)))
            .map_or(s.len(), |(i, _)| i);
        let (number, suffix) = s.split_at(split);
        let (negative, digits) = match number.as_bytes().first() {
            Some(b'-') => (true, &number[1..]),
            Some(b'+') => (false, &number[1..]),
            _ => (false, number),
        };
        if digits.is_empty() || digits == "." {
            return Err(unit_error("quantity must start with a number", text));
        }
        let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
        if fraction.contains('.') {
            return Err(unit_error("quantity has a malformed number", text));
        }
        let (exp10, binary): (i64, u32) = match suffix {
            "" => (0, 0),
            "n" => (-9, 0),
            "u" => (-6, 0),
            "m" => (-3, 0),
            "k" => (3, 0),
            "M" => (6, 0),
            "G" => (9, 0),
            "T" => (12, 0),
            "P" => (15, 0),
            "E" => (18, 0),
            "Ki" => (0, 10),
            "Mi" => (0, 20),
            "Gi" => (0, 30),
            "Ti" => (0, 40),
            "Pi" => (0, 50),
            "Ei" => (0, 60),
            other => {
                let exp = other
                    .strip_prefix('e')
                    .or_else(|| other.strip_prefix('E'))
                    .ok_or_else(|| unit_error("quantity has an unknown suffix", text))?;
                let exp: i64 = exp
                    .parse()
                    .map_err(|_| unit_error("quantity has a malformed exponent", text))?;
                (exp, 0)
            }
        };
        let out_of_range = || {
            unit_error(
                "quantity is larger than 10^29, the most kscale computes with exactly (Kubernetes documents 2^63-1 as its largest quantity)",
                text,
            )
        };
        // The digits as one integer, leading zeros dropped; its scale is 10^(exp10 - fraction).
        let significant = format!("{whole}{fraction}");
        let significant = significant.trim_start_matches('0');
        let mut mantissa: i128 = 0;
        for d in significant.bytes() {
            mantissa = mantissa
                .checked_mul(10)
                .and_then(|m| m.checked_add(i128::from(d - b'0')))
                .ok_or_else(out_of_range)?;
        }
        // nano = mantissa * 2^binary * 10^(exp10 - fraction + 9), rounded up away from zero.
        mantissa = mantissa
            .checked_mul(1i128 << binary)
            .ok_or_else(out_of_range)?;
        let shift = exp10
            .saturating_sub(fraction.len() as i64)
            .saturating_add(9);
        let nano = if mantissa == 0 {
            0
        } else if shift >= 0 {
            let factor = u32::try_from(shift)
                .ok()
                .and_then(|e| 10i128.checked_pow(e))
                .ok_or_else(out_of_range)?;
            mantissa.checked_mul(factor).ok_or_else(out_of_range)?
        } else {
            // Below a nano-unit: Kubernetes rounds up, so a non-zero quantity never becomes 0.
            match u32::try_from(-shift)
                .ok()
                .and_then(|e| 10i128.checked_pow(e))
            {
                Some(divisor) => ceil_div(mantissa, divisor),
                None => 1,
            }
        };
        if nano > MAX_EXACT_NANO {
            return Err(out_of_range());
        }
        Ok(Quantity {
            nano: if negative { -nano } else { nano },
        })
    }

    /// The value as a float (Kubernetes' `AsApproximateFloat64`).
    pub fn as_f64(self) -> f64 {
        // Whole units and the fraction apart, so a whole number converts with one rounding.
        let (whole, fraction) = (self.nano / NANO_PER_UNIT, self.nano % NANO_PER_UNIT);
        whole as f64 + fraction as f64 / NANO_PER_UNIT as f64
    }

    /// The value in thousandths, rounded up (away from zero) as Kubernetes' `MilliValue` does;
    /// exact where `MilliValue` saturates at `i64::MAX`.
    pub fn milli(self) -> i128 {
        let magnitude = ceil_div(self.nano.abs(), 1_000_000);
        if self.nano < 0 { -magnitude } else { magnitude }
    }
}

/// `ceil(a / b)` for a non-negative `a` and a positive `b`.
fn ceil_div(a: i128, b: i128) -> i128 {
    a / b + i128::from(a % b != 0)
}

/// Converts a float to thousandths rounding away from zero, as a Quantity's `MilliValue` does for
/// a value that a metrics API served. Exact for the float given; `None` for NaN, infinities and
/// magnitudes above [`MAX_EXACT_UNITS`] (never a saturated value).
pub fn to_milli(value: f64) -> Option<i128> {
    if !value.is_finite() || value.abs() > MAX_EXACT_UNITS {
        return None;
    }
    if value.abs() >= 9_007_199_254_740_992.0 {
        // 2^53 and above a float is a whole number: multiply exactly, not in floating point.
        return Some((value as i128) * 1000);
    }
    let scaled = value * 1000.0;
    // Undo float noise such as 0.1 * 1000 = 100.00000000000001 before rounding up.
    let nearest = scaled.round();
    let scaled = if (scaled - nearest).abs() < 1e-9 * nearest.abs().max(1.0) {
        nearest
    } else {
        scaled
    };
    let rounded = if scaled >= 0.0 {
        scaled.ceil()
    } else {
        scaled.floor()
    };
    Some(rounded as i128)
}

/// Formats milli-units exactly as a Kubernetes quantity (`"42"`, `"1500m"`,
/// `"1000000000000000000000"`).
pub fn format_milli(milli: i128) -> String {
    if milli % 1000 == 0 {
        format!("{}", milli / 1000)
    } else {
        format!("{milli}m")
    }
}

/// Formats a float as a compact quantity string (`"42"`, `"1500m"`), for status and the adapter:
/// exact milli-units up to [`MAX_EXACT_UNITS`], and the float's shortest exponent form past it
/// (`"1e30"`, a valid quantity too).
pub fn format_quantity(value: f64) -> String {
    match to_milli(value) {
        Some(milli) => format_milli(milli),
        None if value.is_finite() => format!("{value:e}"),
        None => value.to_string(),
    }
}

/// Parses a Go-style duration (`15s`, `1m30s`, `10h`, `500ms`, `2h45m`), as Kubernetes writes them.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(unit_error("empty duration", text));
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| unit_error("duration needs a unit (ns, us, ms, s, m, h)", text))?;
        if num_end == 0 {
            return Err(unit_error("duration has a malformed number", text));
        }
        let number: f64 = rest[..num_end]
            .parse()
            .map_err(|_| unit_error("duration has a malformed number", text))?;
        let after = &rest[num_end..];
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let seconds = match &after[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            _ => {
                return Err(unit_error(
                    "duration has an unknown unit (use ns, us, ms, s, m, h, d)",
                    text,
                ));
            }
        };
        total += number * seconds;
        rest = &after[unit_end..];
    }
    if !total.is_finite() || total > 1e12 {
        return Err(unit_error("duration is out of range", text));
    }
    Ok(Duration::from_secs_f64(total))
}

/// [`parse_duration`] as a clap value parser: the error as text.
pub fn parse_std_duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// A duration written back in the compact Go style (`90s` → `1m30s`).
pub struct GoDuration(pub Duration);

impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        let (h, rem) = (ms / 3_600_000, ms % 3_600_000);
        let (m, rem) = (rem / 60_000, rem % 60_000);
        let (s, milli) = (rem / 1000, rem % 1000);
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        if milli > 0 {
            write!(f, "{s}.{milli:03}s")
        } else if s > 0 {
            write!(f, "{s}s")
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(Quantity::parse("100").unwrap().milli(), 100_000);
        assert_eq!(Quantity::parse("250m").unwrap().milli(), 250);
        assert_eq!(Quantity::parse("1.5k").unwrap().as_f64(), 1500.0);
        assert_eq!(
            Quantity::parse("2Gi").unwrap().as_f64(),
            2.0 * 1024.0 * 1024.0 * 1024.0
        );
        assert_eq!(Quantity::parse("1e3").unwrap().as_f64(), 1000.0);
        assert_eq!(Quantity::parse("0.1").unwrap().milli(), 100);
        assert_eq!(Quantity::parse("0.0001").unwrap().milli(), 1);
        assert!(Quantity::parse("").is_err());
        assert!(Quantity::parse("abc").is_err());
        assert!(Quantity::parse("10 apples").is_err());
        assert!(Quantity::parse("1.2.3").is_err());
    }

    #[test]
    fn milli_rounds_up_like_kubernetes() {
        assert_eq!(to_milli(0.0001), Some(1));
        assert_eq!(to_milli(1.0), Some(1000));
        assert_eq!(to_milli(0.1), Some(100));
        assert_eq!(to_milli(-0.0001), Some(-1));
        assert_eq!(to_milli(f64::INFINITY), None);
        assert_eq!(to_milli(f64::NAN), None);
        assert_eq!(to_milli(3e16), Some(30_000_000_000_000_000_000));
        assert_eq!(to_milli(1e30), None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15s").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("10h").unwrap(), Duration::from_secs(36000));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("15").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5 minutes").is_err());
        assert_eq!(GoDuration(Duration::from_secs(90)).to_string(), "1m30s");
        assert_eq!(GoDuration(Duration::from_secs(36000)).to_string(), "10h");
    }

    #[test]
    fn format() {
        assert_eq!(format_quantity(42.0), "42");
        assert_eq!(format_quantity(1.5), "1500m");
    }
}
