//! Durations and sizes written as strings with a unit (`"10s"`, `"1.5m"`,
//! `"64KiB"`) besides plain integers. Pure parsing: the file loader
//! ([`super::include`]) turns such strings under keys ending in `_ms` or
//! `_bytes` into integers before the typed parse, so every field, module
//! settings included, accepts them.

/// What a key's name says its value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// `*_ms`: milliseconds.
    Millis,
    /// `*_bytes`: bytes.
    Bytes,
}

/// The unit of a configuration key: snake_case names ending in `_ms` or
/// `_bytes`. Names with other characters (header names such as
/// `X-Timeout_ms` in a module's map) are not configuration fields.
pub fn unit_of_key(key: &str) -> Option<Unit> {
    if !key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
        return None;
    }
    if key.len() > 3 && key.ends_with("_ms") {
        Some(Unit::Millis)
    } else if key.len() > 6 && key.ends_with("_bytes") {
        Some(Unit::Bytes)
    } else {
        None
    }
}

/// The hint that goes with a refused duration.
pub const DURATION_HINT: &str =
    "expected a duration like \"10s\" or \"250ms\" (units ms, s, m, h) or an integer number of milliseconds";
/// The hint that goes with a refused size.
pub const SIZE_HINT: &str =
    "expected a size like \"64KiB\", \"1MiB\", \"10MB\" or \"512B\" or an integer number of bytes";

/// Parses a string for a key of this unit into the integer the key takes.
pub fn parse(unit: Unit, s: &str) -> Result<u64, String> {
    match unit {
        Unit::Millis => parse_duration_ms(s),
        Unit::Bytes => parse_size_bytes(s),
    }
}

/// `"250ms"`, `"10s"`, `"1.5m"`, `"2h"` (a bare number is milliseconds) to
/// milliseconds. A value finer than a millisecond is refused.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let (num, unit) = split_number(s).ok_or_else(|| format!("{s:?}: {DURATION_HINT}"))?;
    let factor = match unit {
        "" | "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; {DURATION_HINT}")),
    };
    scaled(num, factor)
        .ok_or_else(|| format!("{s:?}: not a whole number of milliseconds, or too large; {DURATION_HINT}"))
}

/// `"512B"`, `"10KB"`, `"64KiB"`, `"1.5MiB"` (a bare number is bytes) to
/// bytes. KB, MB, GB are powers of 1000; KiB, MiB, GiB powers of 1024.
/// Units are case-insensitive.
pub fn parse_size_bytes(s: &str) -> Result<u64, String> {
    let (num, unit) = split_number(s).ok_or_else(|| format!("{s:?}: {SIZE_HINT}"))?;
    let factor: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000 * 1000,
        "gb" => 1000 * 1000 * 1000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; {SIZE_HINT}")),
    };
    scaled(num, factor).ok_or_else(|| format!("{s:?}: not a whole number of bytes, or too large; {SIZE_HINT}"))
}

/// Splits `"1.5 m"` into (`"1.5"`, `"m"`): digits with at most one '.',
/// optional spaces, then the unit. None when there is no number.
fn split_number(s: &str) -> Option<(&str, &str)> {
    let s = s.trim();
    let end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    let ok = !num.is_empty()
        && num.matches('.').count() <= 1
        && !num.starts_with('.')
        && !num.ends_with('.')
        && !unit.trim_start().contains(char::is_whitespace);
    ok.then(|| (num, unit.trim_start()))
}

/// `num × factor` in exact decimal arithmetic; None unless it is a whole
/// number that fits.
fn scaled(num: &str, factor: u64) -> Option<u64> {
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if frac.len() > 9 {
        return None;
    }
    let denom = 10u64.pow(frac.len() as u32);
    let digits: u64 = format!("{int}{frac}").parse().ok()?;
    let total = digits.checked_mul(factor)?;
    (total % denom == 0).then_some(total / denom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("10s"), Ok(10_000));
        assert_eq!(parse_duration_ms("1.5m"), Ok(90_000));
        assert_eq!(parse_duration_ms("0.1s"), Ok(100));
        assert_eq!(parse_duration_ms("2h"), Ok(7_200_000));
        assert_eq!(parse_duration_ms(" 3 s "), Ok(3000));
        assert_eq!(parse_duration_ms("5000"), Ok(5000));
        for bad in ["", "s", "10x", "1.5ms", "-1s", "1..5s", ".5s", "10 s s", "1e3ms", "99999999999999999999h"] {
            let e = parse_duration_ms(bad).unwrap_err();
            assert!(e.contains("expected a duration like \"10s\" or \"250ms\""), "{bad:?}: {e}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size_bytes("512B"), Ok(512));
        assert_eq!(parse_size_bytes("64KiB"), Ok(65_536));
        assert_eq!(parse_size_bytes("1MiB"), Ok(1_048_576));
        assert_eq!(parse_size_bytes("10MB"), Ok(10_000_000));
        assert_eq!(parse_size_bytes("1.5KiB"), Ok(1536));
        assert_eq!(parse_size_bytes("2gib"), Ok(2 << 30));
        assert_eq!(parse_size_bytes("42"), Ok(42));
        for bad in ["", "KiB", "1.3B", "10 parsecs", "1TB"] {
            let e = parse_size_bytes(bad).unwrap_err();
            assert!(e.contains("expected a size like"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn keys_with_units() {
        assert_eq!(unit_of_key("upstream_read_ms"), Some(Unit::Millis));
        assert_eq!(unit_of_key("max_body_bytes"), Some(Unit::Bytes));
        assert_eq!(unit_of_key("X-Timeout_ms"), None);
        assert_eq!(unit_of_key("retries"), None);
        assert_eq!(unit_of_key("_ms"), None);
    }
}
