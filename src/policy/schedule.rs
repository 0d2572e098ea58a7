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
    ) -> Result<Schedule, Vec<(&'static str, String)>> {
        let mut errors = Vec::new();
        let parsed = parse_cron(cron).map_err(|e| errors.push(("cron", e))).ok();
        let tz: Option<Tz> = match tz {
            None => Some(Tz::UTC),
            Some(name) => name
                .parse()
                .map_err(|_| {
                    errors.push((
                        "timezone",
                        format!("unknown time zone {name:?} (use an IANA name like Europe/Berlin)"),
                    ));
                })
                .ok(),
        };
        match (parsed, tz) {
            (Some(cron), Some(tz)) if errors.is_empty() => Ok(Schedule {
                label,
                cron,
                duration,
                tz,
                min_replicas,
                max_replicas,
            }),
            _ => Err(errors),
        }
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

/// The five cron fields, in order, with their ranges, for errors.
const CRON_FIELDS: [&str; 5] = [
    "minute (0-59)",
    "hour (0-23)",
    "day-of-month (1-31)",
    "month (1-12 or JAN-DEC)",
    "day-of-week (0-7 or SUN-SAT; 0 and 7 are Sunday)",
];

fn cron_parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
}

/// Parses a five-field cron expression. An error names the field at fault and its range: each
/// field is tried alone (the others `*`) to find the one the parser refuses.
fn parse_cron(cron: &str) -> Result<Cron, String> {
    let fields: Vec<&str> = cron.split_whitespace().collect();
    if fields.len() != 5 {
        return Err(format!(
            "{cron:?} has {} fields; expected 5 (minute hour day-of-month month day-of-week)",
            fields.len()
        ));
    }
    let parser = cron_parser();
    parser.parse(cron).map_err(|whole| {
        let bad: Vec<String> = fields
            .iter()
            .enumerate()
            .filter_map(|(i, field)| {
                let mut alone = ["*"; 5];
                alone[i] = field;
                let e = parser.parse(&alone.join(" ")).err()?;
                Some(format!(
                    "the {} field {field:?} is not valid ({e})",
                    CRON_FIELDS[i]
                ))
            })
            .collect();
        if bad.is_empty() {
            // Each field parses alone; together they do not.
            format!("{cron:?} does not parse: {whole}")
        } else {
            format!("{cron:?}: {}", bad.join("; "))
        }
    })
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

    fn problems(cron: &str, tz: Option<&str>) -> Vec<(&'static str, String)> {
        Schedule::new("x".into(), cron, TimeDelta::hours(1), tz, Some(1), None).unwrap_err()
    }

    #[test]
    fn bad_cron_and_zone() {
        let p = problems("61 8 * * *", None);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].0, "cron");
        assert!(
            p[0].1.contains("the minute (0-59) field \"61\""),
            "{}",
            p[0].1
        );
        let p = problems("0 8 * *", None);
        assert_eq!(p[0].0, "cron");
        assert!(p[0].1.contains("has 4 fields; expected 5"), "{}", p[0].1);
        let p = problems("0 8 * * *", Some("Mars/Base"));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].0, "timezone");
    }

    /// A review's input: a bad day-of-week and a misspelled zone are both reported in one
    /// run, and the cron error names its field and range.
    #[test]
    fn a_bad_cron_and_a_bad_zone_are_both_reported_naming_the_field() {
        let p = problems("0 8 * * 1-8", Some("Europe/Berln"));
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].0, "cron");
        assert!(
            p[0].1
                .contains("the day-of-week (0-7 or SUN-SAT; 0 and 7 are Sunday) field \"1-8\""),
            "{}",
            p[0].1
        );
        assert_eq!(p[1].0, "timezone");
        assert!(p[1].1.contains("Europe/Berln"), "{}", p[1].1);
    }
}
