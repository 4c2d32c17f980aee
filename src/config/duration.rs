//! Go's duration syntax, as dex's config uses it.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A duration as Go's `time.ParseDuration` reads it: a possibly signed
/// sequence of decimal numbers, each with an optional fraction and a unit
/// (`ns`, `us`/`µs`/`μs`, `ms`, `s`, `m`, `h`), such as `300ms`, `-1.5h` or
/// `2h45m`; a bare `0` is zero. Held as Go does, in nanoseconds of an `i64`,
/// so the same texts overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct GoDuration(i64);

/// Why a text is not a Go duration; displays as Go's error does, minus `time: `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseDurationError {
    message: String,
    input: String,
}

impl fmt::Display for ParseDurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.message, self.input)
    }
}

impl std::error::Error for ParseDurationError {}

impl GoDuration {
    pub const fn from_nanos(nanos: i64) -> Self {
        GoDuration(nanos)
    }

    pub const fn as_nanos(self) -> i64 {
        self.0
    }

    /// The duration, unless it is negative.
    pub fn to_std(self) -> Option<Duration> {
        u64::try_from(self.0).ok().map(Duration::from_nanos)
    }
}

const UNITS: [(&str, u64); 8] = [
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

const LIMIT: u64 = 1 << 63;

impl FromStr for GoDuration {
    type Err = ParseDurationError;

    /// A port of Go's `time.ParseDuration` (go/src/time/format.go), except
    /// that a sum wrapping past 2^64 is an error rather than Go's silent wrap.
    fn from_str(orig: &str) -> Result<Self, Self::Err> {
        let err = |message: String| ParseDurationError {
            message,
            input: orig.to_string(),
        };
        let invalid = || err("invalid duration".to_string());
        let (neg, mut s) = match orig.as_bytes().first() {
            Some(b'-') => (true, &orig[1..]),
            Some(b'+') => (false, &orig[1..]),
            _ => (false, orig),
        };
        if s == "0" {
            return Ok(GoDuration(0));
        }
        if s.is_empty() {
            return Err(invalid());
        }
        let mut total: u64 = 0;
        while !s.is_empty() {
            let first = s.as_bytes()[0];
            if !(first == b'.' || first.is_ascii_digit()) {
                return Err(invalid());
            }
            let (whole, rest) = leading_int(s).ok_or_else(invalid)?;
            let pre = rest.len() != s.len();
            s = rest;
            let (mut frac, mut scale, mut post) = (0u64, 1f64, false);
            if let Some(rest) = s.strip_prefix('.') {
                let (f, sc, after) = leading_fraction(rest);
                post = after.len() != rest.len();
                (frac, scale, s) = (f, sc, after);
            }
            if !pre && !post {
                return Err(invalid());
            }
            let unit_end = s
                .find(|c: char| c == '.' || c.is_ascii_digit())
                .unwrap_or(s.len());
            if unit_end == 0 {
                return Err(err("missing unit in duration".to_string()));
            }
            let unit_text = &s[..unit_end];
            s = &s[unit_end..];
            let Some(&(_, unit)) = UNITS.iter().find(|(name, _)| *name == unit_text) else {
                return Err(err(format!("unknown unit {unit_text:?} in duration")));
            };
            if whole > LIMIT / unit {
                return Err(invalid());
            }
            let mut v = whole * unit;
            if frac > 0 {
                // As Go: float64 keeps fractions of hours nanosecond-accurate.
                v += (frac as f64 * (unit as f64 / scale)) as u64;
                if v > LIMIT {
                    return Err(invalid());
                }
            }
            total = total
                .checked_add(v)
                .filter(|t| *t <= LIMIT)
                .ok_or_else(invalid)?;
        }
        if neg {
            // -2^63 is representable; `total <= 2^63` holds here.
            return Ok(GoDuration(0i64.wrapping_sub_unsigned(total)));
        }
        i64::try_from(total).map(GoDuration).map_err(|_| invalid())
    }
}

/// The leading `[0-9]*` of `s`; `None` past 2^63.
fn leading_int(s: &str) -> Option<(u64, &str)> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let mut x: u64 = 0;
    for b in s[..end].bytes() {
        if x > LIMIT / 10 {
            return None;
        }
        x = x * 10 + u64::from(b - b'0');
        if x > LIMIT {
            return None;
        }
    }
    Some((x, &s[end..]))
}

/// The leading `[0-9]*` of a fraction: digits past what a u64 holds are
/// read but add no precision (as Go).
fn leading_fraction(s: &str) -> (u64, f64, &str) {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (mut x, mut scale, mut overflow) = (0u64, 1f64, false);
    for b in s[..end].bytes() {
        if overflow {
            continue;
        }
        if x > (LIMIT - 1) / 10 {
            overflow = true;
            continue;
        }
        let y = x * 10 + u64::from(b - b'0');
        if y > LIMIT {
            overflow = true;
            continue;
        }
        x = y;
        scale *= 10.0;
    }
    (x, scale, &s[end..])
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: i64 = 1;
    const US: i64 = 1_000 * NS;
    const MS: i64 = 1_000 * US;
    const S: i64 = 1_000 * MS;
    const M: i64 = 60 * S;
    const H: i64 = 60 * M;

    /// `parseDurationTests` from Go's src/time/time_test.go (go1.26).
    const GO_PARSE_DURATION_TESTS: &[(&str, i64)] = &[
        // simple
        ("0", 0),
        ("5s", 5 * S),
        ("30s", 30 * S),
        ("1478s", 1478 * S),
        // sign
        ("-5s", -5 * S),
        ("+5s", 5 * S),
        ("-0", 0),
        ("+0", 0),
        // decimal
        ("5.0s", 5 * S),
        ("5.6s", 5 * S + 600 * MS),
        ("5.s", 5 * S),
        (".5s", 500 * MS),
        ("1.0s", S),
        ("1.00s", S),
        ("1.004s", S + 4 * MS),
        ("1.0040s", S + 4 * MS),
        ("100.00100s", 100 * S + MS),
        // different units
        ("10ns", 10 * NS),
        ("11us", 11 * US),
        ("12µs", 12 * US), // U+00B5
        ("12μs", 12 * US), // U+03BC
        ("13ms", 13 * MS),
        ("14s", 14 * S),
        ("15m", 15 * M),
        ("16h", 16 * H),
        // composite durations
        ("3h30m", 3 * H + 30 * M),
        ("10.5s4m", 4 * M + 10 * S + 500 * MS),
        ("-2m3.4s", -(2 * M + 3 * S + 400 * MS)),
        (
            "1h2m3s4ms5us6ns",
            H + 2 * M + 3 * S + 4 * MS + 5 * US + 6 * NS,
        ),
        ("39h9m14.425s", 39 * H + 9 * M + 14 * S + 425 * MS),
        // large value
        ("52763797000ns", 52763797000 * NS),
        // more than 9 digits after decimal point, see https://golang.org/issue/6617
        ("0.3333333333333333333h", 20 * M),
        // 9007199254740993 = 1<<53+1 cannot be stored precisely in a float64
        ("9007199254740993ns", ((1 << 53) + 1) * NS),
        // largest duration that can be represented by int64 in nanoseconds
        ("9223372036854775807ns", i64::MAX),
        ("9223372036854775.807us", i64::MAX),
        ("9223372036s854ms775us807ns", i64::MAX),
        ("-9223372036854775808ns", i64::MIN),
        ("-9223372036854775.808us", i64::MIN),
        ("-9223372036s854ms775us808ns", i64::MIN),
        // largest negative round trip value, see https://golang.org/issue/48629
        ("-2562047h47m16.854775808s", i64::MIN),
        // huge string; issue 15011.
        ("0.100000000000000000000h", 6 * M),
        // This value tests the first overflow check in leadingFraction.
        ("0.830103483285477580700h", 49 * M + 48 * S + 372539827 * NS),
    ];

    /// `parseDurationErrorTests` from the same file, less the inputs that are
    /// not UTF-8 (a Rust `&str` cannot hold them).
    const GO_PARSE_DURATION_ERROR_TESTS: &[&str] = &[
        // invalid
        "",
        "3",
        "-",
        "s",
        ".",
        "-.",
        ".s",
        "+.s",
        "1d",
        "\u{FFFD}",
        "\u{FFFD} hello \u{FFFD} world",
        // overflow
        "9223372036854775810ns",
        "9223372036854775808ns",
        "-9223372036854775809ns",
        "9223372036854776us",
        "3000000h",
        "9223372036854775.808us",
        "9223372036854ms775us808ns",
    ];

    #[test]
    fn parses_what_go_parses() {
        for (text, nanos) in GO_PARSE_DURATION_TESTS {
            assert_eq!(
                text.parse::<GoDuration>(),
                Ok(GoDuration::from_nanos(*nanos)),
                "{text:?}"
            );
        }
    }

    #[test]
    fn rejects_what_go_rejects_naming_the_input() {
        for text in GO_PARSE_DURATION_ERROR_TESTS {
            let e = text.parse::<GoDuration>().unwrap_err();
            assert!(
                e.to_string().contains(&format!("{text:?}")),
                "{text:?}: {e}"
            );
        }
    }

    #[test]
    fn errors_say_what_is_wrong_as_go_does() {
        let e = |s: &str| s.parse::<GoDuration>().unwrap_err().to_string();
        assert_eq!(e("1d"), r#"unknown unit "d" in duration "1d""#);
        assert_eq!(e("10"), r#"missing unit in duration "10""#);
        assert_eq!(e("1..5s"), r#"missing unit in duration "1..5s""#);
        assert_eq!(e("1h-"), r#"unknown unit "h-" in duration "1h-""#);
        assert_eq!(e(".s"), r#"invalid duration ".s""#);
    }

    #[test]
    fn a_sum_past_two_to_the_64_is_an_error_where_go_wraps() {
        assert!("9223372036854775808ns9223372036854775808ns"
            .parse::<GoDuration>()
            .is_err());
    }

    #[test]
    fn to_std_refuses_negatives() {
        assert_eq!(
            "1h30m".parse::<GoDuration>().unwrap().to_std(),
            Some(Duration::from_secs(5400))
        );
        assert_eq!(
            "0".parse::<GoDuration>().unwrap().to_std(),
            Some(Duration::ZERO)
        );
        assert_eq!("-1ns".parse::<GoDuration>().unwrap().to_std(), None);
    }
}
