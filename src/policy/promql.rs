//! The PromQL syntax of `spec.metrics[].prometheus.query`, checked when a policy compiles (so
//! `kscale validate`, the backtest and the controller's status all report it) with the
//! `promql-parser` crate, and bounded: a query longer than [`MAX_QUERY_BYTES`] or nested deeper
//! than [`MAX_QUERY_NESTING`] is refused before the parser sees it.
//!
//! The parser's own messages carry no position, so this module finds one: for a lexical error
//! (a stray character, an unterminated string), the shortest prefix of the query that fails
//! the same way ends at it; for an unbalanced bracket, a scan that skips strings and comments
//! finds it. A grammar error with neither is reported with the parser's message alone.

/// The longest query a policy may hold (also the CRD's `maxLength`).
pub const MAX_QUERY_BYTES: usize = 4096;

/// The deepest nesting of brackets a query may have. Parsing and dropping the parsed tree
/// recurse once per level; this keeps a hostile query from exhausting a worker's stack.
pub const MAX_QUERY_NESTING: usize = 64;

/// Why a query is refused: a message that names the position (1-based, in characters) when one
/// is known.
pub fn check(query: &str) -> Result<(), String> {
    if query.len() > MAX_QUERY_BYTES {
        return Err(format!(
            "is {} bytes long; at most {MAX_QUERY_BYTES} are allowed",
            query.len()
        ));
    }
    let brackets = scan_brackets(query);
    if let Err(BracketError::TooDeep(at)) = brackets {
        return Err(format!(
            "nests brackets more than {MAX_QUERY_NESTING} deep (at character {at})"
        ));
    }
    let Err(message) = promql_parser::parser::parse(query) else {
        return Ok(());
    };
    // The bracket at fault, where the scan found one (the lexer reports an unclosed bracket at
    // the end of the query); else where the lexer stopped; else how far the query parses.
    let position = match brackets {
        Err(BracketError::Unclosed { at, .. } | BracketError::Unexpected { at, .. }) => {
            Some(format!("at character {at}"))
        }
        _ => lexical_error_at(query, &message).or_else(|| parses_up_to(query)),
    };
    Err(match position {
        Some(position) => format!("is not valid PromQL: {message} ({position})"),
        None => format!("is not valid PromQL: {message}"),
    })
}

/// The most prefixes [`parses_up_to`] tries: the search is bounded whatever the query.
const MAX_PREFIX_PARSES: usize = 32;

/// For a grammar error: `parses up to character N`, the end of the longest start of the query
/// (cut at a space or after a closing bracket, outside brackets) that is a query by itself,
/// trying at most [`MAX_PREFIX_PARSES`] of them from the longest.
fn parses_up_to(query: &str) -> Option<String> {
    let mut cuts = Vec::new();
    let mut depth = 0usize;
    for (i, (byte, c)) in query.char_indices().enumerate() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    cuts.push((byte + 1, i + 1));
                }
            }
            c if c.is_whitespace() && depth == 0 && i > 0 => cuts.push((byte, i)),
            _ => {}
        }
    }
    cuts.iter()
        .rev()
        .filter(|(byte, _)| !query[..*byte].trim().is_empty())
        .take(MAX_PREFIX_PARSES)
        .find(|(byte, _)| promql_parser::parser::parse(&query[..*byte]).is_ok())
        .map(|(_, chars)| format!("it parses up to character {chars}"))
}

/// For an error of the lexer: `at character N`, where the shortest failing prefix ends.
fn lexical_error_at(query: &str, message: &str) -> Option<String> {
    let fails_alike = |end: usize| {
        promql_parser::parser::lex::lexer(&query[..end])
            .err()
            .is_some_and(|m| m == message)
    };
    if !fails_alike(query.len()) {
        return None;
    }
    // Character boundaries; a prefix that reproduces the error contains its cause, and so does
    // every longer one: a binary search finds the shortest.
    let ends: Vec<usize> = query
        .char_indices()
        .map(|(i, c)| i + c.len_utf8())
        .collect();
    let first = ends.partition_point(|&end| !fails_alike(end));
    (first < ends.len()).then(|| format!("at character {}", first + 1))
}

#[derive(Debug, PartialEq, Eq)]
enum BracketError {
    /// An opening bracket never closed, with its 1-based character position.
    Unclosed { open: char, at: usize },
    /// A closing bracket with no (or the wrong) opening one.
    Unexpected { close: char, at: usize },
    /// Nested past [`MAX_QUERY_NESTING`].
    TooDeep(usize),
}

/// The first bracket error of a query, outside string literals and comments.
fn scan_brackets(query: &str) -> Result<(), BracketError> {
    let mut stack: Vec<(char, usize)> = Vec::new();
    let mut chars = query.chars().enumerate();
    while let Some((i, c)) = chars.next() {
        let at = i + 1;
        match c {
            '"' | '\'' | '`' => {
                // A string: to its closing quote; backslash escapes except in raw strings.
                while let Some((_, s)) = chars.next() {
                    if s == c {
                        break;
                    }
                    if s == '\\' && c != '`' {
                        chars.next();
                    }
                }
            }
            '#' => {
                for (_, s) in chars.by_ref() {
                    if s == '\n' {
                        break;
                    }
                }
            }
            '(' | '[' | '{' => {
                stack.push((c, at));
                if stack.len() > MAX_QUERY_NESTING {
                    return Err(BracketError::TooDeep(at));
                }
            }
            ')' | ']' | '}' => {
                let expected = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                match stack.pop() {
                    Some((open, _)) if open == expected => {}
                    _ => return Err(BracketError::Unexpected { close: c, at }),
                }
            }
            _ => {}
        }
    }
    match stack.pop() {
        Some((open, at)) => Err(BracketError::Unclosed { open, at }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_queries_pass() {
        for q in [
            "sum(rate(http_requests_total{job=\"api\"}[1m]))",
            "avg_over_time(queue_depth[5m]) / 10",
            "sum by (pod) (rate(x[5m])) # a comment (with a bracket",
            "up{instance=\"a(b\"}",
            "histogram_quantile(0.99, sum by (le) (rate(latency_bucket[5m])))",
        ] {
            assert_eq!(check(q), Ok(()), "{q}");
        }
    }

    #[test]
    fn lexical_errors_name_their_character() {
        let e = check("sum(rate(x[1m])) $ 2").unwrap_err();
        assert!(e.contains("at character 18"), "{e}");
        let e = check("up{job=\"api}").unwrap_err();
        assert!(e.starts_with("is not valid PromQL: "), "{e}");
        assert!(e.contains("at character"), "{e}");
    }

    #[test]
    fn bracket_errors_name_their_character() {
        // The lexer finds this one itself; the position is the bracket's.
        let e = check("sum(rate(x[1m])").unwrap_err();
        assert_eq!(
            e,
            "is not valid PromQL: unclosed left parenthesis (at character 4)"
        );
        // The lexer does not: the scan does.
        let e = check("sum(x)[1m").unwrap_err();
        assert!(e.contains("at character 7"), "{e}");
        // An unclosed bracket is named where it opens, not where the query ends.
        let e = check("sum(x{a=\"b\"}[1m]").unwrap_err();
        assert!(e.ends_with("(at character 4)"), "{e}");
        let e = check("sum(x))").unwrap_err();
        assert!(e.contains("(at character 7)"), "{e}");
    }

    #[test]
    fn grammar_and_type_errors_are_refused() {
        for q in [
            "sum(x) +",
            "rate(x)",
            "sum(x) by",
            "1 +* 2",
            "foo(x)",
            "x{a=b}",
        ] {
            let e = check(q).unwrap_err();
            assert!(e.starts_with("is not valid PromQL: "), "{q}: {e}");
        }
        // A grammar error says how far the query parses.
        assert_eq!(
            check("sum(rate(x[1m])) by job"),
            Err("is not valid PromQL: invalid promql query (it parses up to character 16)".into())
        );
        assert!(
            check("rate(x)")
                .unwrap_err()
                .contains("expected type matrix in call to function 'rate'")
        );
    }

    #[test]
    fn length_and_nesting_are_bounded_before_parsing() {
        let long = format!("sum(x{})", " ".repeat(MAX_QUERY_BYTES));
        assert!(check(&long).unwrap_err().contains("at most 4096"));
        let deep = format!("{}1{}", "(".repeat(65), ")".repeat(65));
        assert_eq!(
            check(&deep).unwrap_err(),
            "nests brackets more than 64 deep (at character 65)"
        );
        let ok = format!("{}1{}", "(".repeat(64), ")".repeat(64));
        assert_eq!(check(&ok), Ok(()));
    }
}
