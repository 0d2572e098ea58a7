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

/// A parsed Kubernetes resource quantity (`100`, `250m`, `1.5k`, `2Gi`, `1e3`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantity {
    value: f64,
}

impl Quantity {
    /// Parses the canonical Kubernetes quantity grammar: a signed decimal number followed by an
    /// optional binary (`Ki`..`Ei`), decimal (`n u m k M G T P E`) or exponent (`e3`, `E-2`) suffix.
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
        if number.is_empty() || number == "+" || number == "-" || number == "." {
            return Err(unit_error("quantity must start with a number", text));
        }
        let base: f64 = number
            .parse()
            .map_err(|_| unit_error("quantity has a malformed number", text))?;
        let multiplier = match suffix {
            "" => 1.0,
            "n" => 1e-9,
            "u" => 1e-6,
            "m" => 1e-3,
            "k" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            "T" => 1e12,
            "P" => 1e15,
            "E" => 1e18,
            "Ki" => 1024.0,
            "Mi" => 1024f64.powi(2),
            "Gi" => 1024f64.powi(3),
            "Ti" => 1024f64.powi(4),
            "Pi" => 1024f64.powi(5),
            "Ei" => 1024f64.powi(6),
            other => {
                let exp = other
                    .strip_prefix('e')
                    .or_else(|| other.strip_prefix('E'))
                    .ok_or_else(|| unit_error("quantity has an unknown suffix", text))?;
                let exp: i32 = exp
                    .parse()
                    .map_err(|_| unit_error("quantity has a malformed exponent", text))?;
                10f64.powi(exp)
            }
        };
        let value = base * multiplier;
        if !value.is_finite() {
            return Err(unit_error("quantity is out of range", text));
        }
        Ok(Quantity { value })
    }

    /// The value as a float (Kubernetes' `AsApproximateFloat64`).
    pub fn as_f64(self) -> f64 {
        self.value
    }

    /// The value in thousandths, rounded up as Kubernetes' `MilliValue` does.
    pub fn milli(self) -> i64 {
        to_milli(self.value)
    }
}

/// Converts a float to thousandths rounding away from zero, as a Quantity's `MilliValue` does for
/// a value that a metrics API served; saturates instead of overflowing.
pub fn to_milli(value: f64) -> i64 {
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
    if rounded >= i64::MAX as f64 {
        i64::MAX
    } else if rounded <= i64::MIN as f64 {
        i64::MIN
    } else {
        rounded as i64
    }
}

/// Formats a float as a compact quantity string (`"42"`, `"1500m"`), for status and the adapter.
pub fn format_quantity(value: f64) -> String {
    let milli = to_milli(value);
    if milli % 1000 == 0 {
        format!("{}", milli / 1000)
    } else {
        format!("{milli}m")
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
        assert_eq!(to_milli(0.0001), 1);
        assert_eq!(to_milli(1.0), 1000);
        assert_eq!(to_milli(0.1), 100);
        assert_eq!(to_milli(-0.0001), -1);
        assert_eq!(to_milli(f64::INFINITY), i64::MAX);
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
