//! Cron schedules of the agent (a resource's `cron:` passes and its `reconcile: { cron }`):
//! parsing, and when the next time comes. Times are UTC. croner's parser takes the usual
//! five fields (minute first) and an optional sixth in front for seconds.
//!
//! A time missed while the agent was not running is not made up for: the agent waits for
//! the next time after it starts.

use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use croner::Cron;

/// A parsed cron expression.
#[derive(Clone, Debug)]
pub struct Schedule {
    cron: Cron,
    text: String,
}

impl Schedule {
    /// Parses `expr`; the error says why, for `idsync check`.
    pub fn parse(expr: &str) -> Result<Schedule, String> {
        Cron::from_str(expr)
            .map(|cron| Schedule {
                cron,
                text: expr.to_owned(),
            })
            .map_err(|e| e.to_string())
    }

    /// The expression as configured.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The first time of the schedule strictly after `now` (`None`: none, e.g. a date
    /// that never comes).
    pub fn next_after(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&now, false).ok()
    }

    /// How long from `now` until the next time (strictly after it).
    pub fn wait_from(&self, now: DateTime<Utc>) -> Option<Duration> {
        let next = self.next_after(now)?;
        Some((next - now).to_std().unwrap_or_default())
    }

    /// How long from the current time until the next time.
    pub fn wait(&self) -> Option<Duration> {
        self.wait_from(utc_now()?)
    }
}

/// The current time in UTC, to the millisecond.
pub fn utc_now() -> Option<DateTime<Utc>> {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_millis();
    DateTime::<Utc>::from_timestamp_millis(i64::try_from(ms).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn the_next_time_is_strictly_after_now() {
        let nightly = Schedule::parse("0 3 * * *").unwrap();
        assert_eq!(
            nightly.wait_from(at("2026-05-01T02:59:30Z")),
            Some(Duration::from_secs(30))
        );
        // At the time itself (the reconcile just ran): the next day, not again now.
        assert_eq!(
            nightly.next_after(at("2026-05-01T03:00:00Z")),
            Some(at("2026-05-02T03:00:00Z"))
        );
        // Started after the time (the agent was down at 03:00): the next day's, no catch-up.
        assert_eq!(
            nightly.next_after(at("2026-05-01T09:12:00Z")),
            Some(at("2026-05-02T03:00:00Z"))
        );
        let weekly = Schedule::parse("30 4 * * SUN").unwrap();
        assert_eq!(
            weekly.next_after(at("2026-05-01T00:00:00Z")),
            Some(at("2026-05-03T04:30:00Z"))
        );
    }

    #[test]
    fn a_sixth_field_in_front_is_seconds() {
        let every_two = Schedule::parse("*/2 * * * * *").unwrap();
        assert_eq!(
            every_two.wait_from(at("2026-05-01T00:00:01.500Z")),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            every_two.next_after(at("2026-05-01T00:00:02Z")),
            Some(at("2026-05-01T00:00:04Z"))
        );
    }

    #[test]
    fn a_bad_expression_says_why() {
        let e = Schedule::parse("every night").unwrap_err();
        assert!(!e.is_empty());
        assert!(Schedule::parse("61 * * * *").is_err());
    }
}
