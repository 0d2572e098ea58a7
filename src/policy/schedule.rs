//! Schedules: cron-started windows that override the replica bounds.

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// A compiled schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Label for reasons (the name, or the cron expression).
    pub label: String,
    cron: Cron,
    duration: TimeDelta,
    tz: Tz,
    /// Floor while open.
    pub min_replicas: Option<i32>,
    /// Ceiling while open.
    pub max_replicas: Option<i32>,
}

impl Schedule {
    /// Parses a five-field cron expression in the IANA zone `tz` (default UTC).
    pub fn new(
        label: String,
        cron: &str,
        duration: TimeDelta,
        tz: Option<&str>,
        min_replicas: Option<i32>,
        max_replicas: Option<i32>,
    ) -> Result<Schedule, (&'static str, String)> {
        let fields = cron.split_whitespace().count();
        if fields != 5 {
            return Err((
                "cron",
                format!(
                    "{cron:?} has {fields} fields; expected 5 (minute hour day-of-month month day-of-week)"
                ),
            ));
        }
        let parsed = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build()
            .parse(cron)
            .map_err(|e| ("cron", format!("{cron:?} does not parse: {e}")))?;
        let tz: Tz = match tz {
            None => Tz::UTC,
            Some(name) => name.parse().map_err(|_| {
                (
                    "timezone",
                    format!("unknown time zone {name:?} (use an IANA name like Europe/Berlin)"),
                )
            })?,
        };
        Ok(Schedule {
            label,
            cron: parsed,
            duration,
            tz,
            min_replicas,
            max_replicas,
        })
    }

    /// Whether the window is open at `now`: the latest start at or before `now` is less than
    /// `duration` ago.
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        let local = now.with_timezone(&self.tz);
        match self.cron.find_previous_occurrence(&local, true) {
            Ok(start) => now.signed_duration_since(start.with_timezone(&Utc)) < self.duration,
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn working_hours_in_berlin() {
        let s = Schedule::new(
            "work".into(),
            "0 8 * * 1-5",
            TimeDelta::hours(10),
            Some("Europe/Berlin"),
            Some(6),
            None,
        )
        .unwrap();
        // Monday 2026-11-23 08:30 Berlin = 07:30 UTC.
        assert!(s.is_active(Utc.with_ymd_and_hms(2026, 11, 23, 7, 30, 0).unwrap()));
        // 06:59 UTC = 07:59 Berlin: not yet.
        assert!(!s.is_active(Utc.with_ymd_and_hms(2026, 11, 23, 6, 59, 0).unwrap()));
        // 17:00 UTC = 18:00 Berlin: window closed at 18:00 exactly.
        assert!(!s.is_active(Utc.with_ymd_and_hms(2026, 11, 23, 17, 0, 0).unwrap()));
        // Saturday.
        assert!(!s.is_active(Utc.with_ymd_and_hms(2026, 11, 28, 9, 0, 0).unwrap()));
    }

    #[test]
    fn bad_cron_and_zone() {
        assert_eq!(
            Schedule::new(
                "x".into(),
                "61 8 * * *",
                TimeDelta::hours(1),
                None,
                Some(1),
                None
            )
            .unwrap_err()
            .0,
            "cron"
        );
        assert_eq!(
            Schedule::new(
                "x".into(),
                "0 8 * *",
                TimeDelta::hours(1),
                None,
                Some(1),
                None
            )
            .unwrap_err()
            .0,
            "cron"
        );
        assert_eq!(
            Schedule::new(
                "x".into(),
                "0 8 * * *",
                TimeDelta::hours(1),
                Some("Mars/Base"),
                Some(1),
                None
            )
            .unwrap_err()
            .0,
            "timezone"
        );
    }
}
