//! The structural check of a policy document against the CRD's own OpenAPI schema (the one
//! `kscale crd` prints), as the apiserver runs it before the CEL rules: every unknown field
//! (with a near-miss suggestion), type error, missing required field and unknown enum value of a
//! document, all at once, each with its path.
//!
//! The walk also builds the copy serde reads: a field in error is dropped, a misspelled field
//! whose suggestion is not set is read under the suggested name, and a missing required field
//! gets a placeholder, so that the semantic checks of `policy::compile` still run over the rest
//! of the document. Their findings about a field already reported here are consequences, and
//! the caller drops them ([`is_consequence`]).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use serde_yaml::{Mapping, Value};

use crate::policy::FieldError;

/// What the walk found.
pub(crate) struct Shape {
    /// Every structural problem, in document order.
    pub errors: Vec<FieldError>,
    /// The document without the fields in error, misspelled fields under their suggested names
    /// and placeholders for missing required fields: what serde and `compile` read.
    pub cleaned: Value,
}

/// Root keys outside the CRD's schema: the apiserver reads them itself, and so does serde here.
/// `status` is written by kscale, not by the user, and is passed through unchecked too.
const UNCHECKED_ROOT_KEYS: [&str; 4] = ["apiVersion", "kind", "metadata", "status"];

fn schema() -> Option<&'static JSONSchemaProps> {
    static SCHEMA: OnceLock<Option<JSONSchemaProps>> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            crate::crd::crd()
                .spec
                .versions
                .into_iter()
                .next()?
                .schema?
                .open_api_v3_schema
        })
        .as_ref()
}

/// Checks one YAML document (a mapping with `apiVersion`, `kind`, `metadata`, `spec`).
pub(crate) fn check(doc: &Value) -> Shape {
    let mut errors = Vec::new();
    let cleaned = match (schema(), untag(doc)) {
        (Some(root), Value::Mapping(m)) => {
            Value::Mapping(walk_object(m, root, "", &UNCHECKED_ROOT_KEYS, &mut errors))
        }
        _ => doc.clone(),
    };
    Shape { errors, cleaned }
}

/// Whether `found` (a problem the semantic checks found in the cleaned copy) follows from one
/// of the structural problems `reported`: it concerns the same field, a field inside it, or
/// names it in its message.
pub(crate) fn is_consequence(found: &FieldError, reported: &[FieldError]) -> bool {
    reported.iter().any(|r| {
        found.path == r.path
            || found.path.starts_with(&format!("{}.", r.path))
            || found.path.starts_with(&format!("{}[", r.path))
            || found.message.contains(r.path.as_str())
    })
}

fn untag(v: &Value) -> &Value {
    match v {
        Value::Tagged(t) => untag(&t.value),
        other => other,
    }
}

fn child_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn err(path: impl Into<String>, message: String) -> FieldError {
    FieldError {
        path: path.into(),
        message,
    }
}

/// A field the walk dropped: `None` with no error for a pruned null, `None` with an error for a
/// field in error.
fn walk(v: &Value, s: &JSONSchemaProps, path: &str, errors: &mut Vec<FieldError>) -> Option<Value> {
    let v = untag(v);
    if v.is_null() {
        // The apiserver prunes a null it may not keep; serde reads an absent field.
        return (s.nullable == Some(true)).then_some(Value::Null);
    }
    if s.x_kubernetes_int_or_string == Some(true) {
        return match v {
            Value::Number(_) | Value::String(_) => Some(v.clone()),
            other => {
                errors.push(type_error(path, "an integer or a string", other));
                None
            }
        };
    }
    match (s.type_.as_deref(), v) {
        (Some("object"), Value::Mapping(m)) => {
            Some(Value::Mapping(walk_object(m, s, path, &[], errors)))
        }
        (Some("array"), Value::Sequence(items)) => {
            let Some(JSONSchemaPropsOrArray::Schema(item)) = &s.items else {
                return Some(v.clone());
            };
            let mut out = Vec::with_capacity(items.len());
            for (i, it) in items.iter().enumerate() {
                let p = format!("{path}[{i}]");
                // An item in error keeps its slot (as a placeholder), so later items keep the
                // indices the user sees.
                let checked = if untag(it).is_null() {
                    errors.push(type_error(&p, expected(item), it));
                    None
                } else {
                    walk(it, item, &p, errors)
                };
                out.push(checked.unwrap_or_else(|| placeholder(item)));
            }
            Some(Value::Sequence(out))
        }
        (Some("string"), Value::String(text)) => match &s.enum_ {
            Some(allowed) if !allowed.iter().any(|a| a.0.as_str() == Some(text)) => {
                let names: Vec<&str> = allowed.iter().filter_map(|a| a.0.as_str()).collect();
                let mut message = format!(
                    "unknown value {text:?}; expected one of {}",
                    names.join(", ")
                );
                if let Some(near) = suggest(text, names.iter().copied()) {
                    message.push_str(&format!("; did you mean {near}?"));
                }
                errors.push(err(path, message));
                None
            }
            _ => Some(v.clone()),
        },
        (Some("integer"), Value::Number(n)) if n.is_i64() || n.is_u64() => {
            let fits = s.format.as_deref() != Some("int32")
                || n.as_i64().is_some_and(|i| i32::try_from(i).is_ok());
            if fits {
                Some(v.clone())
            } else {
                errors.push(err(
                    path,
                    format!("must be a 32-bit integer (at most {}), got {n}", i32::MAX),
                ));
                None
            }
        }
        (Some("number"), Value::Number(_)) | (Some("boolean"), Value::Bool(_)) => Some(v.clone()),
        (Some("object" | "array" | "string" | "integer" | "number" | "boolean"), other) => {
            errors.push(type_error(path, expected(s), other));
            None
        }
        // No type (free-form): the schema does not say, so neither does this check.
        _ => Some(v.clone()),
    }
}

fn walk_object(
    m: &Mapping,
    s: &JSONSchemaProps,
    path: &str,
    unchecked: &[&str],
    errors: &mut Vec<FieldError>,
) -> Mapping {
    let empty = BTreeMap::new();
    let props = s.properties.as_ref().unwrap_or(&empty);
    let free_form = s.properties.is_none()
        || s.x_kubernetes_preserve_unknown_fields == Some(true)
        || matches!(
            s.additional_properties,
            Some(JSONSchemaPropsOrBool::Bool(true))
        );
    let values_schema = match &s.additional_properties {
        Some(JSONSchemaPropsOrBool::Schema(v)) => Some(&**v),
        _ => None,
    };
    let mut out = Mapping::new();
    let mut reported = Vec::new();
    for (k, v) in m {
        let Some(key) = untag(k).as_str() else {
            errors.push(err(
                path_or_document(path),
                format!("has a key that is not a string: {}", describe(k)),
            ));
            continue;
        };
        let child = child_path(path, key);
        if unchecked.contains(&key) {
            out.insert(k.clone(), v.clone());
            continue;
        }
        let (name, field_schema) = match props.get(key) {
            Some(fs) => (key, fs),
            None if values_schema.is_some() || free_form => {
                if let Some(vs) = values_schema {
                    if let Some(x) = walk(v, vs, &child, errors) {
                        out.insert(k.clone(), x);
                    }
                } else {
                    out.insert(k.clone(), v.clone());
                }
                continue;
            }
            None => {
                let near = suggest(key, props.keys().map(String::as_str));
                let mut message = "unknown field".to_string();
                if let Some(near) = near {
                    message.push_str(&format!("; did you mean {near}?"));
                }
                errors.push(err(&child, message));
                // Read a misspelled field under the name it was meant to have (when that one
                // is not set as well), so the checks that follow see the user's value.
                match near {
                    Some(near) if !m.contains_key(near) && !out.contains_key(near) => {
                        (near, &props[near])
                    }
                    _ => continue,
                }
            }
        };
        let before = errors.len();
        match walk(v, field_schema, &child, errors) {
            Some(x) => {
                out.insert(Value::String(name.to_string()), x);
            }
            None if errors.len() > before => reported.push(name.to_string()),
            None => {}
        }
    }
    for r in s.required.iter().flatten() {
        if out.contains_key(r.as_str()) {
            continue;
        }
        if !reported.contains(r) {
            errors.push(err(child_path(path, r), "is required".into()));
        }
        if let Some(fs) = props.get(r) {
            out.insert(Value::String(r.clone()), placeholder(fs));
        }
    }
    out
}

fn path_or_document(path: &str) -> &str {
    if path.is_empty() { "(document)" } else { path }
}

/// A value of the schema's shape that stands in for a missing or broken required field, so the
/// semantic checks can run over the rest; what they say about it is a consequence and dropped.
fn placeholder(s: &JSONSchemaProps) -> Value {
    if let Some(first) = s.enum_.as_ref().and_then(|e| e.first())
        && let Some(text) = first.0.as_str()
    {
        return Value::String(text.to_string());
    }
    if s.x_kubernetes_int_or_string == Some(true) {
        return Value::String("0".into());
    }
    match s.type_.as_deref() {
        Some("object") => {
            let mut m = Mapping::new();
            for r in s.required.iter().flatten() {
                if let Some(fs) = s.properties.as_ref().and_then(|p| p.get(r)) {
                    m.insert(Value::String(r.clone()), placeholder(fs));
                }
            }
            Value::Mapping(m)
        }
        Some("array") => Value::Sequence(Vec::new()),
        Some("string") => Value::String(String::new()),
        Some("integer") => Value::Number(s.minimum.map_or(0, |m| m as i64).into()),
        Some("number") => Value::Number(s.minimum.unwrap_or(0.0).into()),
        Some("boolean") => Value::Bool(false),
        _ => Value::Null,
    }
}

fn expected(s: &JSONSchemaProps) -> &'static str {
    match s.type_.as_deref() {
        Some("object") => "an object (key: value pairs)",
        Some("array") => "a list",
        Some("string") => "a string",
        Some("integer") => "an integer",
        Some("number") => "a number",
        Some("boolean") => "true or false",
        _ => "a value",
    }
}

fn describe(v: &Value) -> String {
    match untag(v) {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "an object".into(),
        Value::Tagged(_) => "a tagged value".into(),
    }
}

fn type_error(path: &str, expected: &str, found: &Value) -> FieldError {
    err(path, format!("must be {expected}, got {}", describe(found)))
}

/// The candidate closest to `word`, when it is close enough to be a slip of the keyboard: at
/// most two edits (one for words of up to four letters), case ignored.
pub(crate) fn suggest<'a>(
    word: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    let lower = word.to_lowercase();
    let limit = if word.chars().count() <= 4 { 1 } else { 2 };
    candidates
        .map(|c| (strsim::damerau_levenshtein(&lower, &c.to_lowercase()), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(yaml: &str) -> Shape {
        check(&serde_yaml::from_str(yaml).unwrap())
    }

    fn messages(s: &Shape) -> Vec<String> {
        s.errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn suggestions_are_near_misses_only() {
        let names = ["maxReplicas", "minReplicas", "metrics", "mode"];
        assert_eq!(
            suggest("maxReplica", names.into_iter()),
            Some("maxReplicas")
        );
        assert_eq!(
            suggest("MinReplicas", names.into_iter()),
            Some("minReplicas")
        );
        assert_eq!(suggest("metrcis", names.into_iter()), Some("metrics"));
        assert_eq!(suggest("mdoe", names.into_iter()), Some("mode"));
        assert_eq!(suggest("replicas", names.into_iter()), None);
        assert_eq!(suggest("foo", names.into_iter()), None);
    }

    #[test]
    fn every_structural_problem_at_once() {
        let s = shape(
            r#"
apiVersion: kscale.dev/v1alpha1
kind: ScalingPolicy
metadata: {name: x}
spec:
  targetRef: {kind: Deployment, name: x}
  maxReplica: 10
  minReplicas: three
  mode: Dryrun
  metrics:
  - name: rps
    prometheus: {query: up}
    target: {type: Value, value: 1}
    activationTreshold: "1"
  - null
"#,
        );
        assert_eq!(
            messages(&s),
            [
                "spec.maxReplica: unknown field; did you mean maxReplicas?",
                "spec.minReplicas: must be an integer, got the string \"three\"",
                "spec.mode: unknown value \"Dryrun\"; expected one of Controller, ExternalMetric, DryRun; did you mean DryRun?",
                "spec.metrics[0].activationTreshold: unknown field; did you mean activationThreshold?",
                "spec.metrics[1]: must be an object (key: value pairs), got null",
            ]
        );
        // The misspelled field is read under its name; the broken ones are dropped or stand-ins.
        let spec = &s.cleaned["spec"];
        assert_eq!(spec["maxReplicas"], Value::from(10));
        assert!(spec.get("minReplicas").is_none());
        assert!(spec.get("mode").is_none());
        assert_eq!(spec["metrics"][0]["activationThreshold"], Value::from("1"));
        assert_eq!(spec["metrics"][1]["name"], Value::from(""));
    }

    #[test]
    fn missing_required_fields_are_named_and_filled() {
        let s = shape("spec: {targetRef: {kind: Deployment, name: x}}\n");
        assert_eq!(
            messages(&s),
            ["spec.maxReplicas: is required", "spec.metrics: is required"]
        );
        assert_eq!(s.cleaned["spec"]["maxReplicas"], Value::from(1));
        assert_eq!(s.cleaned["spec"]["metrics"], Value::Sequence(Vec::new()));
    }

    #[test]
    fn consequences_of_a_reported_field_are_recognised() {
        let reported = [err("spec.minReplicas", "must be an integer".into())];
        let same = err("spec.minReplicas", "must not be negative".into());
        let inside = err("spec.metrics[0].target.type", "x".into());
        let naming = err("spec.maxReplicas", "2 is below spec.minReplicas (5)".into());
        let other = err("spec.interval", "x".into());
        assert!(is_consequence(&same, &reported));
        assert!(is_consequence(&naming, &reported));
        assert!(!is_consequence(&other, &reported));
        assert!(is_consequence(
            &inside,
            &[err("spec.metrics[0]", "x".into())]
        ));
    }
}
