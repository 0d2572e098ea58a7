//! Recorded workload traces (CSV) as a metric source for backtests.
//!
//! A trace is a CSV file with a header line: a `timestamp` column plus one or more metric
//! columns, e.g. `timestamp,value`. Timestamps are `YYYY-MM-DD HH:MM:SS` (UTC, no zone,
//! optionally with a fraction of a second) or RFC 3339 with an offset, which is converted to UTC.
//! Steps may be irregular; timestamps must never go backwards (equal ones are allowed).
//!
//! An empty cell is a gap (`None`); `NaN`, `+Inf` and `-Inf` are kept as the matching `f64`
//! so the evaluator can treat them as invalid samples instead of zeros.

use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};

/// The timestamp formats a trace may use, as shown in error messages.
const ACCEPTED_TIME_FORMATS: &str =
    "`YYYY-MM-DD HH:MM:SS` (UTC) or RFC 3339 with an offset, e.g. `2014-07-01T00:00:00+02:00`";

/// A loaded trace: one timestamp column plus one or more metric columns.
#[derive(Debug, Clone)]
pub struct Trace {
    /// Where it was read from (for messages).
    pub path: PathBuf,
    /// Metric column names in file order (the `timestamp` column excluded).
    pub columns: Vec<String>,
    /// Row timestamps, non-decreasing.
    pub times: Vec<DateTime<Utc>>,
    /// `values[column][row]`: `None` where the cell is empty (a gap).
    pub values: Vec<Vec<Option<f64>>>,
}

/// Why a trace could not be loaded; every variant names the file and, where it applies, the line.
///
/// Line numbers are 1-based as an editor shows them: the header is line 1.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be opened or read.
    #[error("{}: cannot read trace: {source}", .path.display())]
    Io {
        /// File.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// Reading the CSV failed part-way: an I/O error or malformed content (e.g. not UTF-8).
    #[error("{}, line {line}: cannot read trace: {source}", .path.display())]
    Csv {
        /// File.
        path: PathBuf,
        /// Line where the failing record starts.
        line: u64,
        /// The CSV reader's error.
        source: csv::Error,
    },
    /// The file has no content at all, not even a header.
    #[error("{}: the trace is empty; expected a header line such as `timestamp,value`", .path.display())]
    Empty {
        /// File.
        path: PathBuf,
    },
    /// The header has no `timestamp` column.
    #[error("{}, line 1: the header has no `timestamp` column (columns found: {found})", .path.display())]
    NoTimestampColumn {
        /// File.
        path: PathBuf,
        /// The header's columns, quoted and comma-separated.
        found: String,
    },
    /// The header has a `timestamp` column but nothing else.
    #[error(
        "{}, line 1: the header has a `timestamp` column but no metric column; \
         add at least one, e.g. `timestamp,value`",
        .path.display()
    )]
    NoMetricColumn {
        /// File.
        path: PathBuf,
    },
    /// Two header columns have the same name.
    #[error("{}, line 1: column `{column}` appears more than once in the header", .path.display())]
    DuplicateColumn {
        /// File.
        path: PathBuf,
        /// The repeated name.
        column: String,
    },
    /// A data row has a different number of fields from the header.
    #[error("{}, line {line}: {found} field(s), but the header has {expected}", .path.display())]
    FieldCount {
        /// File.
        path: PathBuf,
        /// Line of the row.
        line: u64,
        /// Number of header columns.
        expected: usize,
        /// Number of fields in the row.
        found: usize,
    },
    /// A timestamp cell is in no accepted format.
    #[error(
        "{}, line {line}, column `timestamp`: cannot parse {text:?} as a time; accepted formats: {formats}",
        .path.display(),
        formats = ACCEPTED_TIME_FORMATS
    )]
    BadTimestamp {
        /// File.
        path: PathBuf,
        /// Line of the row.
        line: u64,
        /// The cell's text.
        text: String,
    },
    /// A metric cell is neither empty nor a number.
    #[error(
        "{}, line {line}, column `{column}`: cannot parse {text:?} as a number \
         (leave the cell empty for a gap; `NaN`, `+Inf` and `-Inf` are accepted)",
        .path.display()
    )]
    BadValue {
        /// File.
        path: PathBuf,
        /// Line of the row.
        line: u64,
        /// The metric column's name.
        column: String,
        /// The cell's text.
        text: String,
    },
    /// A row's timestamp is earlier than the previous row's.
    #[error(
        "{}: timestamps go backwards: line {line} has {time}, earlier than {prev_time} on line {prev_line}",
        .path.display(),
        time = .time.format("%Y-%m-%d %H:%M:%S%.f UTC"),
        prev_time = .prev_time.format("%Y-%m-%d %H:%M:%S%.f UTC")
    )]
    NotMonotonic {
        /// File.
        path: PathBuf,
        /// Line of the earlier row in the file.
        prev_line: u64,
        /// Its time.
        prev_time: DateTime<Utc>,
        /// Line of the offending row.
        line: u64,
        /// Its time.
        time: DateTime<Utc>,
    },
    /// The header is there but no data row follows.
    #[error("{}: trace has a header but no rows", .path.display())]
    NoRows {
        /// File.
        path: PathBuf,
    },
}

impl Trace {
    /// Reads and validates a CSV trace.
    pub fn load(path: &Path) -> Result<Trace, TraceError> {
        let file = std::fs::File::open(path).map_err(|source| TraceError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Trace::from_reader(path, std::io::BufReader::with_capacity(1 << 16, file))
    }

    /// Reads and validates a CSV trace from `input`, the contents of `path` (named in errors).
    pub fn from_reader(path: &Path, input: impl std::io::Read) -> Result<Trace, TraceError> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .trim(csv::Trim::All)
            .from_reader(input);
        let mut record = csv::StringRecord::new();

        if !read_record(&mut reader, &mut record, path)? {
            return Err(TraceError::Empty {
                path: path.to_path_buf(),
            });
        }
        let header = Header::parse(&record, path)?;
        let width = header.width;
        let ts_col = header.timestamp;
        let mut times: Vec<DateTime<Utc>> = Vec::new();
        let mut values: Vec<Vec<Option<f64>>> = vec![Vec::new(); header.metrics.len()];
        let mut prev_line = 1;

        while read_record(&mut reader, &mut record, path)? {
            let line = record_line(&record);
            if record.len() != width {
                return Err(TraceError::FieldCount {
                    path: path.to_path_buf(),
                    line,
                    expected: width,
                    found: record.len(),
                });
            }
            let text = record.get(ts_col).unwrap_or_default();
            let time = parse_time(text).ok_or_else(|| TraceError::BadTimestamp {
                path: path.to_path_buf(),
                line,
                text: text.to_string(),
            })?;
            if let Some(&prev_time) = times.last()
                && time < prev_time
            {
                return Err(TraceError::NotMonotonic {
                    path: path.to_path_buf(),
                    prev_line,
                    prev_time,
                    line,
                    time,
                });
            }
            for (column, (&field, name)) in values
                .iter_mut()
                .zip(header.metrics.iter().zip(&header.columns))
            {
                let text = record.get(field).unwrap_or_default();
                let value = parse_value(text).ok_or_else(|| TraceError::BadValue {
                    path: path.to_path_buf(),
                    line,
                    column: name.clone(),
                    text: text.to_string(),
                })?;
                column.push(value);
            }
            times.push(time);
            prev_line = line;
        }

        if times.is_empty() {
            return Err(TraceError::NoRows {
                path: path.to_path_buf(),
            });
        }
        Ok(Trace {
            path: path.to_path_buf(),
            columns: header.columns,
            times,
            values,
        })
    }

    /// Index of a metric column by name.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }
}

/// The header's layout: where the timestamp is and which fields are metrics.
struct Header {
    /// Number of fields every row must have.
    width: usize,
    /// Field index of the `timestamp` column.
    timestamp: usize,
    /// Field index of each metric column, in file order.
    metrics: Vec<usize>,
    /// Name of each metric column, parallel to `metrics`.
    columns: Vec<String>,
}

impl Header {
    fn parse(record: &csv::StringRecord, path: &Path) -> Result<Header, TraceError> {
        let timestamp = record
            .iter()
            .position(|name| name.eq_ignore_ascii_case("timestamp"))
            .ok_or_else(|| TraceError::NoTimestampColumn {
                path: path.to_path_buf(),
                found: record
                    .iter()
                    .map(|name| format!("{name:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let mut metrics = Vec::new();
        let mut columns: Vec<String> = Vec::new();
        for (index, name) in record.iter().enumerate() {
            if index == timestamp {
                continue;
            }
            if name.eq_ignore_ascii_case("timestamp") || columns.iter().any(|c| c == name) {
                return Err(TraceError::DuplicateColumn {
                    path: path.to_path_buf(),
                    column: name.to_string(),
                });
            }
            metrics.push(index);
            columns.push(name.to_string());
        }
        if metrics.is_empty() {
            return Err(TraceError::NoMetricColumn {
                path: path.to_path_buf(),
            });
        }
        Ok(Header {
            width: record.len(),
            timestamp,
            metrics,
            columns,
        })
    }
}

/// Reads the next record into `record`; `false` at the end of the file.
fn read_record<R: std::io::Read>(
    reader: &mut csv::Reader<R>,
    record: &mut csv::StringRecord,
    path: &Path,
) -> Result<bool, TraceError> {
    reader
        .read_record(record)
        .map_err(|source| TraceError::Csv {
            path: path.to_path_buf(),
            line: source
                .position()
                .map_or_else(|| reader.position().line(), csv::Position::line),
            source,
        })
}

/// The 1-based line on which a record starts.
fn record_line(record: &csv::StringRecord) -> u64 {
    record.position().map_or(0, csv::Position::line)
}

/// Parses a metric cell: empty is a gap, anything else must be a number
/// (`NaN`, `inf`, `+Inf`, `-Inf` included, in any letter case).
fn parse_value(text: &str) -> Option<Option<f64>> {
    if text.is_empty() {
        return Some(None);
    }
    text.parse::<f64>().ok().map(Some)
}

/// Parses a timestamp in one of [`ACCEPTED_TIME_FORMATS`].
fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    if let Some(time) = parse_plain_time(text.as_bytes()) {
        return Some(time);
    }
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Some(time.with_timezone(&Utc));
    }
    NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
        .ok()
        .map(|naive| naive.and_utc())
}

/// Fast path for exactly `YYYY-MM-DD HH:MM:SS` (the bundled traces' format), in UTC.
fn parse_plain_time(b: &[u8]) -> Option<DateTime<Utc>> {
    if b.len() != 19
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b' '
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<u32> {
        b[range].iter().try_fold(0u32, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
        })
    };
    let year = i32::try_from(num(0..4)?).ok()?;
    NaiveDate::from_ymd_opt(year, num(5..7)?, num(8..10)?)?
        .and_hms_opt(num(11..13)?, num(14..16)?, num(17..19)?)
        .map(|naive| naive.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_trace(content: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new()
            .suffix(".csv")
            .tempfile()
            .expect("create temp file");
        file.write_all(content.as_bytes()).expect("write temp file");
        file.flush().expect("flush temp file");
        file
    }

    fn load_str(content: &str) -> Result<Trace, TraceError> {
        let file = write_trace(content);
        Trace::load(file.path())
    }

    fn load_err(content: &str) -> (TraceError, String) {
        let file = write_trace(content);
        let err = Trace::load(file.path()).expect_err("trace should be rejected");
        let msg = err.to_string();
        let path = file.path().display().to_string();
        assert!(msg.contains(&path), "message {msg:?} should name {path}");
        (err, msg)
    }

    fn utc(text: &str) -> DateTime<Utc> {
        NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S")
            .expect("test time")
            .and_utc()
    }

    #[test]
    fn loads_plain_trace() {
        let trace =
            load_str("timestamp,value\n2014-07-01 00:00:00,10844\n2014-07-01 00:30:00,8127.5\n")
                .expect("valid trace");
        assert_eq!(trace.columns, vec!["value"]);
        assert_eq!(trace.column("value"), Some(0));
        assert_eq!(trace.column("missing"), None);
        assert_eq!(
            trace.times,
            vec![utc("2014-07-01 00:00:00"), utc("2014-07-01 00:30:00")]
        );
        assert_eq!(trace.values, vec![vec![Some(10844.0), Some(8127.5)]]);
    }

    #[test]
    fn empty_cells_are_gaps_and_specials_parse() {
        let trace = load_str(
            "timestamp,value\n\
             2014-07-01 00:00:00,1\n\
             2014-07-01 00:05:00,\n\
             2014-07-01 00:10:00,NaN\n\
             2014-07-01 00:15:00,nan\n\
             2014-07-01 00:20:00,+Inf\n\
             2014-07-01 00:25:00,-Inf\n\
             2014-07-01 00:30:00, 2 \n",
        )
        .expect("valid trace");
        let v = &trace.values[0];
        assert_eq!(v.len(), 7);
        assert_eq!(v[0], Some(1.0));
        assert_eq!(v[1], None);
        assert!(v[2].is_some_and(f64::is_nan));
        assert!(v[3].is_some_and(f64::is_nan));
        assert_eq!(v[4], Some(f64::INFINITY));
        assert_eq!(v[5], Some(f64::NEG_INFINITY));
        assert_eq!(v[6], Some(2.0));
    }

    #[test]
    fn rfc3339_offsets_convert_to_utc_and_irregular_steps_are_fine() {
        let trace = load_str(
            "timestamp,value\n\
             2014-07-01T02:00:00+02:00,1\n\
             2014-07-01T00:00:00Z,2\n\
             2014-07-01T00:07:13.5Z,3\n\
             2014-06-30T21:00:00-05:00,4\n\
             2014-07-02 09:00:00,5\n",
        )
        .expect("valid trace");
        let t0 = utc("2014-07-01 00:00:00");
        assert_eq!(trace.times[0], t0);
        assert_eq!(trace.times[1], t0);
        assert_eq!(
            trace.times[2],
            t0 + chrono::Duration::milliseconds(7 * 60_000 + 13_500)
        );
        assert_eq!(trace.times[3], utc("2014-07-01 02:00:00"));
        assert_eq!(trace.times[4], utc("2014-07-02 09:00:00"));
    }

    #[test]
    fn multiple_columns_any_order() {
        let trace = load_str(
            "cpu,timestamp,requests\n\
             0.5,2014-07-01 00:00:00,100\n\
             ,2014-07-01 00:01:00,110\n\
             0.7,2014-07-01 00:02:00,\n",
        )
        .expect("valid trace");
        assert_eq!(trace.columns, vec!["cpu", "requests"]);
        assert_eq!(trace.column("requests"), Some(1));
        assert_eq!(trace.values[0], vec![Some(0.5), None, Some(0.7)]);
        assert_eq!(trace.values[1], vec![Some(100.0), Some(110.0), None]);
        assert_eq!(trace.times.len(), 3);
    }

    #[test]
    fn missing_file_is_an_io_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("nope.csv");
        let err = Trace::load(&path).expect_err("missing file");
        assert!(matches!(err, TraceError::Io { .. }));
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn empty_file() {
        let (err, _) = load_err("");
        assert!(matches!(err, TraceError::Empty { .. }), "{err}");
        let (err, _) = load_err("\n\n");
        assert!(matches!(err, TraceError::Empty { .. }), "{err}");
    }

    #[test]
    fn header_without_timestamp_lists_columns() {
        let (err, msg) = load_err("time,value\n2014-07-01 00:00:00,1\n");
        assert!(matches!(err, TraceError::NoTimestampColumn { .. }), "{err}");
        assert!(msg.contains("line 1"), "{msg}");
        assert!(msg.contains("\"time\", \"value\""), "{msg}");
    }

    #[test]
    fn header_without_metric_column() {
        let (err, msg) = load_err("timestamp\n2014-07-01 00:00:00\n");
        assert!(matches!(err, TraceError::NoMetricColumn { .. }), "{err}");
        assert!(msg.contains("no metric column"), "{msg}");
    }

    #[test]
    fn duplicate_column() {
        let (err, msg) = load_err("timestamp,a,a\n2014-07-01 00:00:00,1,2\n");
        assert!(matches!(err, TraceError::DuplicateColumn { .. }), "{err}");
        assert!(msg.contains("`a`"), "{msg}");
    }

    #[test]
    fn wrong_field_count_names_line() {
        let (err, msg) =
            load_err("timestamp,value\n2014-07-01 00:00:00,1\n2014-07-01 00:05:00,1,2\n");
        assert!(
            matches!(
                err,
                TraceError::FieldCount {
                    line: 3,
                    expected: 2,
                    found: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert!(msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn bad_timestamp_is_quoted_with_formats() {
        let (err, msg) = load_err("timestamp,value\n2014-07-01 00:00:00,1\n07/01/2014 00:05,2\n");
        assert!(
            matches!(err, TraceError::BadTimestamp { line: 3, .. }),
            "{err}"
        );
        assert!(msg.contains("\"07/01/2014 00:05\""), "{msg}");
        assert!(msg.contains("YYYY-MM-DD HH:MM:SS"), "{msg}");
        assert!(msg.contains("RFC 3339"), "{msg}");
        // Out-of-range fields in the fast format are rejected too.
        let (err, _) = load_err("timestamp,value\n2014-02-30 00:00:00,1\n");
        assert!(
            matches!(err, TraceError::BadTimestamp { line: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn bad_value_names_line_column_and_text() {
        let (err, msg) =
            load_err("timestamp,a,b\n2014-07-01 00:00:00,1,2\n2014-07-01 00:05:00,3,12abc\n");
        assert!(
            matches!(&err, TraceError::BadValue { line: 3, column, text, .. } if column == "b" && text == "12abc"),
            "{err}"
        );
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("`b`"), "{msg}");
        assert!(msg.contains("\"12abc\""), "{msg}");
    }

    #[test]
    fn backwards_timestamps_name_both_lines() {
        let (err, msg) = load_err(
            "timestamp,value\n\
             2014-07-01 00:00:00,1\n\
             2014-07-01 00:05:00,1\n\
             2014-07-01 00:05:00,1\n\
             2014-07-01 00:04:59,1\n",
        );
        assert!(
            matches!(
                err,
                TraceError::NotMonotonic {
                    prev_line: 4,
                    line: 5,
                    ..
                }
            ),
            "{err}"
        );
        assert!(msg.contains("line 5"), "{msg}");
        assert!(msg.contains("line 4"), "{msg}");
        assert!(msg.contains("2014-07-01 00:04:59"), "{msg}");
        assert!(msg.contains("2014-07-01 00:05:00"), "{msg}");
    }

    #[test]
    fn header_only_has_no_rows() {
        let (err, msg) = load_err("timestamp,value\n");
        assert!(matches!(err, TraceError::NoRows { .. }), "{err}");
        assert!(msg.contains("trace has a header but no rows"), "{msg}");
    }

    #[test]
    fn invalid_utf8_names_line() {
        let file = write_trace("timestamp,value\n2014-07-01 00:00:00,1\n");
        let mut bytes = std::fs::read(file.path()).expect("read back");
        bytes.extend_from_slice(b"2014-07-01 00:05:00,\xff\n");
        std::fs::write(file.path(), bytes).expect("rewrite");
        let err = Trace::load(file.path()).expect_err("bad utf-8");
        assert!(matches!(err, TraceError::Csv { line: 3, .. }), "{err}");
    }

    #[test]
    fn bundled_traces_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/traces");
        if !dir.is_dir() {
            eprintln!("skipping: {} not found", dir.display());
            return;
        }
        // Data rows = lines - 1 (header).
        for (name, rows) in [
            ("Twitter_volume_AAPL.csv", 15_902),
            ("Twitter_volume_GOOG.csv", 15_842),
            ("elb_request_count_8c0756.csv", 4_032),
            ("nyc_taxi.csv", 10_320),
        ] {
            let path = dir.join(name);
            let started = std::time::Instant::now();
            let trace = Trace::load(&path).unwrap_or_else(|e| panic!("{e}"));
            let took = started.elapsed();
            assert_eq!(trace.times.len(), rows, "{name}");
            assert_eq!(trace.columns, vec!["value"], "{name}");
            assert_eq!(trace.values[0].len(), rows, "{name}");
            assert!(trace.times.windows(2).all(|w| w[0] <= w[1]), "{name}");
            eprintln!("{name}: {rows} rows in {took:?}");
        }
    }
}
