//! Static external rules (in the spirit of prometheus-adapter's `externalRules`) and the
//! translation of an HPA `metricSelector` into PromQL label matchers.
//!
//! A rule names a metric and a PromQL template. `<<.LabelMatchers>>` in the template becomes the
//! request's label selector as matchers (plus `namespace="<ns>"` for a namespaced rule), joined
//! by commas and without braces, so `sum(queue_depth{<<.LabelMatchers>>})` is the usual form.
//! Every value is escaped as a PromQL string (and, for `in`/`notin`, as an RE2 literal first), and
//! every key must be a valid Prometheus label name: nothing in a selector can become PromQL
//! syntax.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The placeholder replaced by the label matchers.
pub const LABEL_MATCHERS: &str = "<<.LabelMatchers>>";

/// The `--external-rules` file: `externalRules: [...]`. The lead folds this section into the
/// daemon's config file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalRulesConfig {
    /// The rules.
    #[serde(default)]
    pub external_rules: Vec<ExternalRule>,
}

/// One static external metric.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalRule {
    /// The metric name the HPA asks for.
    pub name: String,
    /// PromQL with `<<.LabelMatchers>>` where the matchers go.
    pub query: String,
    /// Whether the request's namespace becomes a `namespace` matcher (default true).
    #[serde(default = "yes")]
    pub namespaced: bool,
    /// The label holding the namespace (default `namespace`).
    #[serde(default = "namespace_label")]
    pub namespace_label: String,
    /// How long a cached answer is served before it is refreshed in the background (Go
    /// duration, default `10s`).
    #[serde(default)]
    pub refresh_interval: Option<String>,
    /// After how long a cached answer is no longer served (Go duration, default `1m`).
    #[serde(default)]
    pub stale_after: Option<String>,
}

fn yes() -> bool {
    true
}

fn namespace_label() -> String {
    "namespace".into()
}

/// A rule checked at load time.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledRule {
    /// The rule as written.
    pub rule: ExternalRule,
    /// Background refresh after this age.
    pub refresh: std::time::Duration,
    /// Not served after this age.
    pub stale_after: std::time::Duration,
}

/// Why the rules file cannot be used; each names the file and the rule.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// The file could not be read.
    #[error("--external-rules {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The YAML is not a rules document.
    #[error("--external-rules {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Parser message with location.
        message: String,
    },
    /// A rule is invalid.
    #[error("--external-rules {path}: externalRules[{index}] ({name}): {message}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// Index in the list.
        index: usize,
        /// The rule's name.
        name: String,
        /// What is wrong.
        message: String,
    },
}

/// Reads and checks the rules file.
pub fn load(path: &Path) -> Result<Vec<CompiledRule>, RulesError> {
    let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let de = serde_yaml::Deserializer::from_str(&text);
    let config: ExternalRulesConfig =
        serde_path_to_error::deserialize(de).map_err(|e| RulesError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    compile(path, config)
}

/// Checks every rule of `config` (`path` is only for messages).
pub fn compile(path: &Path, config: ExternalRulesConfig) -> Result<Vec<CompiledRule>, RulesError> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(config.external_rules.len());
    for (index, rule) in config.external_rules.into_iter().enumerate() {
        let invalid = |message: String| RulesError::Invalid {
            path: path.to_path_buf(),
            index,
            name: rule.name.clone(),
            message,
        };
        if !valid_metric_name(&rule.name) {
            return Err(invalid(
                "name must be lowercase letters, digits, '-', '_' and '.', starting with a letter or digit".into(),
            ));
        }
        if !seen.insert(rule.name.clone()) {
            return Err(invalid("the name is used by an earlier rule".into()));
        }
        if !rule.query.contains(LABEL_MATCHERS) {
            return Err(invalid(format!(
                "query must contain {LABEL_MATCHERS} so that the HPA's selector applies"
            )));
        }
        let rest = rule.query.replace(LABEL_MATCHERS, "");
        if rest.contains("<<") {
            return Err(invalid(format!(
                "query uses a placeholder other than {LABEL_MATCHERS}"
            )));
        }
        if !valid_label_name(&rule.namespace_label) {
            return Err(invalid(format!(
                "namespaceLabel {:?} is not a Prometheus label name",
                rule.namespace_label
            )));
        }
        let duration = |field: &str, text: &Option<String>, default: u64| match text {
            None => Ok(std::time::Duration::from_secs(default)),
            Some(t) => {
                crate::units::parse_duration(t).map_err(|e| invalid(format!("{field}: {e}")))
            }
        };
        let refresh = duration("refreshInterval", &rule.refresh_interval, 10)?;
        let stale_after = duration("staleAfter", &rule.stale_after, 60)?;
        if stale_after <= refresh {
            return Err(invalid(
                "staleAfter must be longer than refreshInterval".into(),
            ));
        }
        out.push(CompiledRule {
            rule,
            refresh,
            stale_after,
        });
    }
    Ok(out)
}

/// A metric name usable as one URL path segment.
pub fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.len() <= 253
        && chars.all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' || c == '.'
        })
}

/// A Prometheus label name: `[a-zA-Z_][a-zA-Z0-9_]*`.
pub fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// One requirement of a Kubernetes label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `key=value` or `key==value`.
    Equals(String, String),
    /// `key!=value`.
    NotEquals(String, String),
    /// `key in (a,b)`.
    In(String, Vec<String>),
    /// `key notin (a,b)`.
    NotIn(String, Vec<String>),
    /// `key`.
    Exists(String),
    /// `!key`.
    DoesNotExist(String),
}

impl Requirement {
    fn key(&self) -> &str {
        match self {
            Requirement::Equals(k, _)
            | Requirement::NotEquals(k, _)
            | Requirement::In(k, _)
            | Requirement::NotIn(k, _)
            | Requirement::Exists(k)
            | Requirement::DoesNotExist(k) => k,
        }
    }

    /// Whether a value with `labels` satisfies this requirement (Kubernetes semantics: `!=` and
    /// `notin` match an absent label).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let got = labels.get(self.key());
        match self {
            Requirement::Equals(_, v) => got == Some(v),
            Requirement::NotEquals(_, v) => got != Some(v),
            Requirement::In(_, vs) => got.is_some_and(|g| vs.contains(g)),
            Requirement::NotIn(_, vs) => !got.is_some_and(|g| vs.contains(g)),
            Requirement::Exists(_) => got.is_some(),
            Requirement::DoesNotExist(_) => got.is_none(),
        }
    }
}

/// A label selector that cannot be used: the message is returned to the caller as a 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid labelSelector: {0}")]
pub struct SelectorError(pub String);

/// Parses a label selector string (`a=b,c!=d,e in (f,g),!h`). Values may hold any character but
/// `,`, `(`, `)` and white space; whatever they hold is escaped when it becomes PromQL.
pub fn parse_selector(text: &str) -> Result<Vec<Requirement>, SelectorError> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (req, after) = parse_requirement(rest)?;
        out.push(req);
        rest = after.trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r.trim_start();
            if rest.is_empty() {
                return Err(SelectorError("trailing ','".into()));
            }
        } else if !rest.is_empty() {
            return Err(SelectorError(format!("unexpected {:?}", first_chars(rest))));
        }
    }
    Ok(out)
}

fn first_chars(s: &str) -> String {
    s.chars().take(20).collect()
}

fn is_delim(c: char) -> bool {
    c == ',' || c == '(' || c == ')' || c.is_whitespace()
}

fn take_key(s: &str) -> Result<(String, &str), SelectorError> {
    let end = s
        .find(|c: char| is_delim(c) || c == '=' || c == '!')
        .unwrap_or(s.len());
    let key = &s[..end];
    if key.is_empty() {
        return Err(SelectorError(format!(
            "expected a label key at {:?}",
            first_chars(s)
        )));
    }
    if !valid_label_name(key) {
        return Err(SelectorError(format!(
            "label key {key:?} is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)"
        )));
    }
    Ok((key.to_string(), &s[end..]))
}

fn take_value(s: &str) -> (String, &str) {
    let end = s.find(is_delim).unwrap_or(s.len());
    (s[..end].to_string(), &s[end..])
}

fn parse_requirement(s: &str) -> Result<(Requirement, &str), SelectorError> {
    if let Some(r) = s.strip_prefix('!') {
        let (key, rest) = take_key(r.trim_start())?;
        return Ok((Requirement::DoesNotExist(key), rest));
    }
    let (key, rest) = take_key(s)?;
    let trimmed = rest.trim_start();
    if let Some(r) = trimmed
        .strip_prefix("==")
        .or_else(|| trimmed.strip_prefix('='))
    {
        let (v, rest) = take_value(r.trim_start());
        return Ok((Requirement::Equals(key, v), rest));
    }
    if let Some(r) = trimmed.strip_prefix("!=") {
        let (v, rest) = take_value(r.trim_start());
        return Ok((Requirement::NotEquals(key, v), rest));
    }
    for (word, notin) in [("notin", true), ("in", false)] {
        if let Some(r) = trimmed.strip_prefix(word)
            && r.starts_with(|c: char| c.is_whitespace() || c == '(')
        {
            let r = r.trim_start();
            let Some(mut r) = r.strip_prefix('(') else {
                return Err(SelectorError(format!("expected '(' after {word}")));
            };
            let mut values = Vec::new();
            loop {
                let (v, rest) = take_value(r.trim_start());
                let rest = rest.trim_start();
                if v.is_empty() && values.is_empty() && rest.starts_with(')') {
                    return Err(SelectorError(format!("{word} needs at least one value")));
                }
                values.push(v);
                if let Some(after) = rest.strip_prefix(',') {
                    r = after;
                } else if let Some(after) = rest.strip_prefix(')') {
                    let req = if notin {
                        Requirement::NotIn(key, values)
                    } else {
                        Requirement::In(key, values)
                    };
                    return Ok((req, after));
                } else {
                    return Err(SelectorError(format!("unterminated {word} (...)")));
                }
            }
        }
    }
    if trimmed.is_empty() || trimmed.starts_with(',') {
        return Ok((Requirement::Exists(key), trimmed));
    }
    Err(SelectorError(format!(
        "expected an operator after {key:?} at {:?}",
        first_chars(trimmed)
    )))
}

/// `value` as a PromQL double-quoted string literal: backslash, quote and every control
/// character escaped, so the literal ends exactly where it should.
pub fn promql_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `value` as an RE2 literal (every metacharacter escaped).
pub fn regex_literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The requirements (and the namespace matcher, if any) as PromQL label matchers, comma-joined.
pub fn label_matchers(requirements: &[Requirement], namespace: Option<(&str, &str)>) -> String {
    let alternation = |vs: &[String]| {
        let parts: Vec<String> = vs.iter().map(|v| regex_literal(v)).collect();
        promql_string(&parts.join("|"))
    };
    let mut out: Vec<String> = Vec::with_capacity(requirements.len() + 1);
    if let Some((label, ns)) = namespace {
        out.push(format!("{label}={}", promql_string(ns)));
    }
    for r in requirements {
        out.push(match r {
            Requirement::Equals(k, v) => format!("{k}={}", promql_string(v)),
            Requirement::NotEquals(k, v) => format!("{k}!={}", promql_string(v)),
            Requirement::In(k, vs) => format!("{k}=~{}", alternation(vs)),
            Requirement::NotIn(k, vs) => format!("{k}!~{}", alternation(vs)),
            Requirement::Exists(k) => format!("{k}!=\"\""),
            Requirement::DoesNotExist(k) => format!("{k}=\"\""),
        });
    }
    out.join(",")
}

impl CompiledRule {
    /// The PromQL for a request in `namespace` with `requirements`.
    pub fn render(&self, namespace: &str, requirements: &[Requirement]) -> String {
        let ns = self
            .rule
            .namespaced
            .then_some((self.rule.namespace_label.as_str(), namespace));
        self.rule
            .query
            .replace(LABEL_MATCHERS, &label_matchers(requirements, ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_operator() {
        let r = parse_selector("a=b, c==d,e!=f,g in (h, i),j notin(k),l,!m").unwrap();
        assert_eq!(
            r,
            vec![
                Requirement::Equals("a".into(), "b".into()),
                Requirement::Equals("c".into(), "d".into()),
                Requirement::NotEquals("e".into(), "f".into()),
                Requirement::In("g".into(), vec!["h".into(), "i".into()]),
                Requirement::NotIn("j".into(), vec!["k".into()]),
                Requirement::Exists("l".into()),
                Requirement::DoesNotExist("m".into()),
            ]
        );
        assert_eq!(parse_selector("").unwrap(), vec![]);
        assert_eq!(
            parse_selector("a=").unwrap(),
            vec![Requirement::Equals("a".into(), "".into())]
        );
    }

    #[test]
    fn rejects_malformed_selectors_and_non_prometheus_keys() {
        for bad in [
            "a=b,",
            "a in b",
            "a in (b",
            "a b",
            "app.kubernetes.io/name=x",
            "a-b=c",
            "=x",
            "a in ()",
            "a=b)",
        ] {
            assert!(parse_selector(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn promql_syntax_in_values_is_escaped_not_executed() {
        let r = parse_selector(r#"app=web"}/up{x="y,tier=a\"b"#).unwrap();
        let m = label_matchers(&r, Some(("namespace", "ns\"1")));
        assert_eq!(
            m,
            r#"namespace="ns\"1",app="web\"}/up{x=\"y",tier="a\\\"b""#
        );
        let r = parse_selector("app in (a|b,.*)").unwrap();
        assert_eq!(label_matchers(&r, None), r#"app=~"a\\|b|\\.\\*""#);
        assert_eq!(promql_string("a\nb\u{1}"), r#""a\nb\u0001""#);
    }

    #[test]
    fn matchers_follow_kubernetes_semantics() {
        let labels = BTreeMap::from([("a".to_string(), "1".to_string())]);
        let ok = |s: &str| {
            parse_selector(s)
                .unwrap()
                .iter()
                .all(|r| r.matches(&labels))
        };
        assert!(ok("a=1"));
        assert!(ok("b!=1"));
        assert!(ok("a in (1,2)"));
        assert!(ok("b notin (1)"));
        assert!(ok("a,!b"));
        assert!(!ok("a=2"));
        assert!(!ok("b"));
        assert!(!ok("a notin (1)"));
        let r = parse_selector("a,!b").unwrap();
        assert_eq!(label_matchers(&r, None), r#"a!="",b="""#);
    }

    #[test]
    fn the_example_rules_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/external-rules.yaml");
        let rules = load(&path).unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(
            rules[0].render("shop", &parse_selector("queue=orders").unwrap()),
            r#"sum(rabbitmq_queue_messages_ready{namespace="shop",queue="orders"})"#
        );
        assert!(matches!(
            load(Path::new("/nonexistent/rules.yaml")),
            Err(RulesError::Read { .. })
        ));
    }

    #[test]
    fn rules_are_checked_when_loaded() {
        let path = Path::new("rules.yaml");
        let parse = |y: &str| -> Result<Vec<CompiledRule>, RulesError> {
            compile(path, serde_yaml::from_str(y).unwrap())
        };
        let rules = parse(
            "externalRules:\n- name: queue\n  query: sum(q{<<.LabelMatchers>>})\n- name: global\n  query: sum(g{<<.LabelMatchers>>})\n  namespaced: false\n  refreshInterval: 5s\n  staleAfter: 30s\n",
        )
        .unwrap();
        assert_eq!(rules[0].render("ns", &[]), r#"sum(q{namespace="ns"})"#);
        assert_eq!(
            rules[1].render("ns", &parse_selector("a=b").unwrap()),
            r#"sum(g{a="b"})"#
        );
        assert_eq!(rules[1].refresh, std::time::Duration::from_secs(5));
        for bad in [
            "externalRules:\n- name: Queue\n  query: q{<<.LabelMatchers>>}\n",
            "externalRules:\n- name: q\n  query: q\n",
            "externalRules:\n- name: q\n  query: q{<<.LabelMatchers>>} <<.Series>>\n",
            "externalRules:\n- name: q\n  query: q{<<.LabelMatchers>>}\n- name: q\n  query: q{<<.LabelMatchers>>}\n",
            "externalRules:\n- name: q\n  query: q{<<.LabelMatchers>>}\n  staleAfter: 1s\n",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("rules.yaml: externalRules["), "{e}");
        }
    }
}
