//! Durations as people write them in a policy: `500ms`, `30s`, `5m`, `1h`, or a bare integer
//! meaning seconds.
//!
//! Deliberately small: one unit per value, no fractions, no spaces, no days. Anything else is
//! an error with an example, rather than a guess (is `1.5m` 90 s? is `1M` a month?).

use std::time::Duration;

/// Parses the text form of a duration. The error reads "what is wrong; what would be right".
pub(crate) fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let hint = "write a whole number with one unit, such as \"500ms\", \"30s\", \"5m\" or \"1h\"";
    if number.is_empty() {
        return Err(format!("{text:?} is not a duration; {hint}"));
    }
    let Ok(n) = number.parse::<u64>() else {
        return Err(format!("{text:?} is too large; {hint}"));
    };
    let duration = match unit {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit {unit:?}; the units are ms, s, m and h: {hint}"
            ));
        }
    };
    duration.ok_or_else(|| format!("{text:?} is too large; {hint}"))
}

/// Parses a bare YAML integer (seconds).
pub(crate) fn from_seconds(n: i128) -> Result<Duration, String> {
    u64::try_from(n).map(Duration::from_secs).map_err(|_| {
        format!("{n} is not a valid number of seconds; write a duration such as \"30s\"")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_bare_seconds_are_understood() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("45"), Ok(Duration::from_secs(45)));
        assert_eq!(from_seconds(7), Ok(Duration::from_secs(7)));
    }

    #[test]
    fn fractions_unknown_units_and_negatives_are_refused() {
        for bad in ["1.5m", "2d", "s", "", "-1s", "1 h", "30sec", "1M"] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(from_seconds(-1).is_err());
    }

    #[test]
    fn overflowing_durations_are_refused_not_wrapped() {
        assert!(parse("99999999999999999999s").is_err());
        assert!(parse(&format!("{}h", u64::MAX)).is_err());
    }
}
