//! The daemon's optional config file: defaults for `kscale run`'s flags.
//!
//! `kscale run --config FILE` (or `KSCALE_CONFIG`) reads a YAML mapping whose keys are the
//! long flag names of `kscale run` without the dashes in front, for example:
//!
//! ```yaml
//! prometheus-url: https://thanos-query.monitoring:9090
//! prometheus-timeout: 5s
//! prometheus-header: ["X-Scope-OrgID=platform"]
//! log-format: json
//! leader-elect: true
//! ```
//!
//! Precedence, highest first: a flag on the command line, its environment variable, the config
//! file, the built-in default. The file's values go through the same parsers as the flags, so
//! a bad value gets the same message, prefixed with the file and the key. An unknown key is an
//! error, not silently ignored.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};

use crate::cli::Cli;

/// Why the command line and the config file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The command line itself is wrong (or asks for help or the version).
    #[error(transparent)]
    Clap(#[from] clap::Error),
    /// The config file cannot be read.
    #[error("config file {}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not a YAML mapping of flag names to values.
    #[error("config file {}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
}

/// Parses `argv` into a [`Cli`]; for `kscale run` with `--config` or `KSCALE_CONFIG`, the config
/// file supplies every value that neither a flag nor an environment variable gave. Where the
/// Prometheus URL came from (its environment variable or the file's key) is noted, so its errors
/// name what to fix.
pub fn parse(argv: Vec<OsString>) -> Result<Cli, ConfigError> {
    let matches = Cli::command().try_get_matches_from(&argv)?;
    let (matches, file) = with_config_file(argv, matches)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    let from_file = file
        .as_ref()
        .filter(|(_, extra)| extra.iter().any(|a| a.to_str() == Some("--prometheus-url")));
    let source = match (from_file, matches.subcommand()) {
        (Some((path, _)), _) => Some(format!("prometheus-url (config file {})", path.display())),
        (None, Some((_, sub))) => sub
            .try_get_raw("prometheus_url")
            .ok()
            .flatten()
            .and_then(|_| sub.value_source("prometheus_url"))
            .filter(|s| *s == ValueSource::EnvVariable)
            .map(|_| "KSCALE_PROMETHEUS_URL".to_string()),
        (None, None) => None,
    };
    match &mut cli.command {
        crate::cli::Command::Run(run) => run.prometheus.prometheus_url_source = source,
        crate::cli::Command::DryRun(dry) => dry.prometheus.prometheus_url_source = source,
        _ => {}
    }
    Ok(cli)
}

/// A config file and the flags it stood for.
type Applied = (PathBuf, Vec<OsString>);

/// `matches` again with `kscale run`'s config file applied, and the file with the flags it
/// stood for (`None` without a file, or when it gave nothing).
fn with_config_file(
    argv: Vec<OsString>,
    matches: clap::ArgMatches,
) -> Result<(clap::ArgMatches, Option<Applied>), ConfigError> {
    let Some(("run", run)) = matches.subcommand() else {
        return Ok((matches, None));
    };
    let Some(path) = run.get_one::<PathBuf>("config").cloned() else {
        return Ok((matches, None));
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let extra = config_args(&path, &text, |id| {
        matches!(run.value_source(id), None | Some(ValueSource::DefaultValue))
    })?;
    if extra.is_empty() {
        return Ok((matches, None));
    }
    // The file's values are appended as flags, so clap parses and checks them like any flag.
    let mut full = argv;
    full.extend(extra.iter().cloned());
    let matches = Cli::command()
        .try_get_matches_from(&full)
        .map_err(|e| ConfigError::Invalid {
            path: path.clone(),
            message: e.to_string().trim_end().to_string(),
        })?;
    Ok((matches, Some((path, extra))))
}

/// The flags a config file stands for: `--key value` for each key whose flag `unset(id)` says
/// was not given otherwise. Keys must be long flags of `kscale run`.
fn config_args(
    path: &Path,
    text: &str,
    unset: impl Fn(&str) -> bool,
) -> Result<Vec<OsString>, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let value: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| invalid(e.to_string()))?;
    let map = match value {
        serde_yaml::Value::Mapping(m) => m,
        serde_yaml::Value::Null => return Ok(Vec::new()),
        _ => return Err(invalid("must be a mapping of flag names to values".into())),
    };
    let command = Cli::command();
    let run = command
        .find_subcommand("run")
        .ok_or_else(|| invalid("kscale has no run command".into()))?;
    let mut out = Vec::new();
    for (key, value) in map {
        let key = key
            .as_str()
            .ok_or_else(|| invalid(format!("key {key:?} is not a string")))?
            .to_string();
        let arg = run
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && a.get_id() != "config")
            .ok_or_else(|| {
                invalid(format!(
                    "unknown key {key:?}; keys are the long flags of `kscale run --help` without the leading dashes"
                ))
            })?;
        if !unset(arg.get_id().as_str()) {
            continue;
        }
        let scalar = |v: &serde_yaml::Value| -> Result<String, ConfigError> {
            match v {
                serde_yaml::Value::String(s) => Ok(s.clone()),
                serde_yaml::Value::Bool(b) => Ok(b.to_string()),
                serde_yaml::Value::Number(n) => Ok(n.to_string()),
                other => Err(invalid(format!(
                    "key {key:?}: expected a string, number or boolean, got {other:?}"
                ))),
            }
        };
        let values = match &value {
            serde_yaml::Value::Sequence(items) => {
                items.iter().map(scalar).collect::<Result<Vec<_>, _>>()?
            }
            serde_yaml::Value::Null => continue,
            v => vec![scalar(v)?],
        };
        for v in values {
            out.push(OsString::from(format!("--{key}")));
            out.push(OsString::from(v));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Command;

    fn run_args(argv: &[&str]) -> Result<crate::cli::RunArgs, ConfigError> {
        match parse(argv.iter().map(OsString::from).collect())?.command {
            Command::Run(args) => Ok(*args),
            other => panic!("not run: {other:?}"),
        }
    }

    #[test]
    fn the_file_fills_what_flags_leave_unset() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.yaml");
        std::fs::write(
            &file,
            "prometheus-url: http://prom:9090\nprometheus-timeout: 3s\nprometheus-header: [A=1, B=2]\nleader-elect: false\nmetrics-addr: 127.0.0.1:9999\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let a = run_args(&["kscale", "run", "--config", f]).unwrap();
        assert_eq!(
            a.prometheus.prometheus_url.as_deref(),
            Some("http://prom:9090")
        );
        assert_eq!(
            a.prometheus.prometheus_timeout,
            std::time::Duration::from_secs(3)
        );
        assert_eq!(a.prometheus.prometheus_headers.len(), 2);
        assert!(!a.leader_elect);
        assert_eq!(a.metrics_addr.port(), 9999);
        // A flag on the command line wins over the file.
        let a = run_args(&["kscale", "run", "--config", f, "--prometheus-timeout", "7s"]).unwrap();
        assert_eq!(
            a.prometheus.prometheus_timeout,
            std::time::Duration::from_secs(7)
        );
    }

    #[test]
    fn bad_files_name_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.yaml");
        let f = file.to_str().unwrap().to_string();
        for (body, needle) in [
            ("prometheus-ulr: x\n", "unknown key \"prometheus-ulr\""),
            ("prometheus-timeout: soon\n", "--prometheus-timeout"),
            ("- a\n", "must be a mapping"),
            (
                "prometheus-url: {a: b}\n",
                "key \"prometheus-url\": expected a string",
            ),
        ] {
            std::fs::write(&file, body).unwrap();
            let e = run_args(&["kscale", "run", "--config", &f])
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(&format!("config file {f}: ")), "{e}");
            assert!(e.contains(needle), "{needle} not in {e}");
        }
        let e = run_args(&["kscale", "run", "--config", "/nonexistent.yaml"]).unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent.yaml: cannot read"),
            "{e}"
        );
    }
}
