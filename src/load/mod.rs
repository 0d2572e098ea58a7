//! Reading ScalingPolicies from YAML files (several documents per file), with errors that name
//! the file, the document, the field and its line.
//!
//! A document goes through three checks, and reports what all of them find in one run: the
//! structure against the CRD's schema ([`shape`]: unknown fields with a suggestion, types,
//! required fields, enum values), serde, and the semantic checks of `policy::compile` over
//! what remains.

mod lines;
mod shape;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::crd::ScalingPolicy;
use crate::policy::{CompiledPolicy, FieldError};

/// A file that could not be read or parsed at all.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// I/O.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// YAML syntax.
    #[error("{path}: document {document}: not valid YAML: {message}")]
    Yaml {
        /// File.
        path: PathBuf,
        /// 1-based document index.
        document: usize,
        /// Parser message (with line and column).
        message: String,
    },
    /// No ScalingPolicy in the file.
    #[error("{path}: holds no ScalingPolicy (apiVersion kscale.dev/v1alpha1, kind ScalingPolicy)")]
    NoPolicy {
        /// File.
        path: PathBuf,
    },
}

/// One ScalingPolicy document of a file, valid or not.
#[derive(Debug)]
pub struct LoadedPolicy {
    /// 1-based document index in the file.
    pub document: usize,
    /// `metadata.name`, if it could be read.
    pub name: Option<String>,
    /// The compiled policy, or every problem found.
    pub result: Result<(ScalingPolicy, CompiledPolicy), Vec<FieldError>>,
    /// The 1-based line of each field path in the file.
    lines: HashMap<String, usize>,
}

impl LoadedPolicy {
    /// The line in the file of the field a problem names (of its closest enclosing field for a
    /// missing one), when known.
    pub fn line_of(&self, problem: &FieldError) -> Option<usize> {
        lines::line_of(&self.lines, &problem.path)
    }
}

/// Reads every ScalingPolicy in `path`. Documents of other kinds are skipped; a file with none is
/// an error.
pub fn load_policies(path: &Path) -> Result<Vec<LoadedPolicy>, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_policies(path, &text)
}

/// Reads every ScalingPolicy in `text`, the contents of `path` (named in errors), as
/// [`load_policies`] does.
pub fn parse_policies(path: &Path, text: &str) -> Result<Vec<LoadedPolicy>, LoadError> {
    let mut out = Vec::new();
    let mut lines = lines::field_lines(text).into_iter();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc_lines = lines.next().unwrap_or_default();
        let document = i + 1;
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| LoadError::Yaml {
            path: path.to_path_buf(),
            document,
            message: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str());
        let api_version = value.get("apiVersion").and_then(|k| k.as_str());
        if kind != Some("ScalingPolicy") {
            continue;
        }
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .map(str::to_string);
        let result = parse_one(&value, api_version);
        out.push(LoadedPolicy {
            document,
            name,
            result,
            lines: doc_lines,
        });
    }
    if out.is_empty() {
        return Err(LoadError::NoPolicy {
            path: path.to_path_buf(),
        });
    }
    Ok(out)
}

fn parse_one(
    value: &serde_yaml::Value,
    api_version: Option<&str>,
) -> Result<(ScalingPolicy, CompiledPolicy), Vec<FieldError>> {
    let mut errors = Vec::new();
    if api_version != Some("kscale.dev/v1alpha1") {
        errors.push(FieldError {
            path: "apiVersion".into(),
            message: format!(
                "{:?} is not served; use kscale.dev/v1alpha1",
                api_version.unwrap_or("")
            ),
        });
    }
    let shape = shape::check(value);
    let structural = shape.errors;
    errors.extend(structural.iter().cloned());
    let policy: ScalingPolicy = match serde_path_to_error::deserialize(shape.cleaned) {
        Ok(p) => p,
        Err(e) => {
            let path = e.path().to_string();
            errors.push(FieldError {
                path: if path == "." {
                    "(document)".into()
                } else {
                    path
                },
                message: e.into_inner().to_string(),
            });
            return Err(errors);
        }
    };
    match CompiledPolicy::from_resource(&policy) {
        Ok(c) if errors.is_empty() => Ok((policy, c)),
        Ok(_) => Err(errors),
        Err(e) => {
            errors.extend(
                e.0.into_iter()
                    .filter(|found| !shape::is_consequence(found, &structural)),
            );
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load(text: &str) -> Result<Vec<LoadedPolicy>, LoadError> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        load_policies(f.path())
    }

    const GOOD: &str = r#"
apiVersion: kscale.dev/v1alpha1
kind: ScalingPolicy
metadata: {name: backend, namespace: shop}
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: backend}
  minReplicas: 3
  maxReplicas: 10
  metrics:
  - name: rps
    prometheus: {query: 'sum(rate(http_requests_total[1m]))'}
    target: {type: AverageValue, averageValue: "100"}
"#;

    #[test]
    fn good_policy_loads() {
        let p = load(GOOD).unwrap();
        assert_eq!(p.len(), 1);
        assert!(p[0].result.is_ok(), "{:?}", p[0].result.as_ref().err());
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let bad = GOOD
            .replace("minReplicas: 3", "minReplicas: 5")
            .replace("maxReplicas: 10", "maxReplicas: 2")
            .replace("type: AverageValue", "type: Sometimes");
        let p = load(&bad).unwrap();
        let errs = p[0].result.as_ref().unwrap_err();
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert!(
            text.contains(&"spec.maxReplicas: 2 is below spec.minReplicas (5)".to_string()),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.starts_with("spec.metrics[0].target.type: unknown value \"Sometimes\"")),
            "{text:?}"
        );
    }

    #[test]
    fn unknown_fields_are_named() {
        let bad = GOOD.replace("minReplicas: 3", "minReplica: 3");
        let p = load(&bad).unwrap();
        let errs = p[0].result.as_ref().unwrap_err();
        assert_eq!(
            errs[0].to_string(),
            "spec.minReplica: unknown field; did you mean minReplicas?"
        );
    }

    #[test]
    fn type_errors_name_the_path() {
        let bad = GOOD.replace("maxReplicas: 10", "maxReplicas: ten");
        let p = load(&bad).unwrap();
        let errs = p[0].result.as_ref().unwrap_err();
        assert_eq!(
            errs[0].to_string(),
            "spec.maxReplicas: must be an integer, got the string \"ten\""
        );
    }

    #[test]
    fn no_policy_and_bad_yaml() {
        assert!(matches!(
            load("kind: ConfigMap\n"),
            Err(LoadError::NoPolicy { .. })
        ));
        let e = load("a: [\n").unwrap_err();
        assert!(e.to_string().contains("not valid YAML"), "{e}");
    }
}
