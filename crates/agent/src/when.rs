//! Times and ages given on the command line and in the config: `--before`, `--sent-before`
//! and `retention` read them the same way.

use std::time::{Duration, SystemTime};

/// The example the messages give.
const AGE_EXAMPLE: &str = "an age like 90d, 12h or 30m";

/// An age (`90d`, `12h`, `1h 30m`), more than zero.
pub fn parse_age(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text.trim()) {
        Ok(d) if d.is_zero() => Err(format!("'{text}': give an age of more than 0")),
        Ok(d) => Ok(d),
        Err(_) => Err(format!("'{text}' is not {AGE_EXAMPLE}")),
    }
}

/// A point in time: an RFC 3339 time (`2026-01-31T00:00:00Z`), a date (`2026-01-31`,
/// midnight UTC), or an age counted back from now (`30d`).
pub fn parse_cutoff(text: &str) -> Result<SystemTime, String> {
    let text = text.trim();
    let date_only = text.len() == 10 && text.as_bytes().get(4) == Some(&b'-');
    let time = if date_only {
        humantime::parse_rfc3339(&format!("{text}T00:00:00Z"))
    } else {
        humantime::parse_rfc3339_weak(text)
    };
    if let Ok(t) = time {
        return Ok(t);
    }
    match humantime::parse_duration(text) {
        Ok(age) => Ok(SystemTime::now()
            .checked_sub(age)
            .unwrap_or(SystemTime::UNIX_EPOCH)),
        Err(_) => Err(format!(
            "'{text}' is neither an RFC 3339 time (2026-01-31T00:00:00Z), a date (2026-01-31) nor {AGE_EXAMPLE}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_dates_and_ages() {
        let t = parse_cutoff("2026-01-31T00:00:00Z").unwrap();
        assert_eq!(parse_cutoff("2026-01-31").unwrap(), t);
        let ago = parse_cutoff("30d").unwrap().elapsed().unwrap().as_secs();
        assert!(ago.abs_diff(30 * 86_400) < 60, "{ago}");
        assert!(
            parse_cutoff("yesterday")
                .unwrap_err()
                .contains("'yesterday'")
        );
        assert_eq!(parse_age("90d").unwrap(), Duration::from_secs(90 * 86_400));
        assert!(parse_age("0d").is_err());
        assert!(parse_age("9x").unwrap_err().contains("not an age"));
    }
}
