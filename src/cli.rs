//! The `kscale` command line: `validate`, `backtest`, `crd`, `completions`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeDelta, Utc};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::backtest::plot::{PlotData, PlotRun, write_plot};
use crate::backtest::report::{LISTED_VIOLATIONS, ReportInput, summary_rows, write_report};
use crate::backtest::verdict::verdict;
use crate::backtest::{BacktestConfig, Run, Summary, run};
use crate::crd::ScalingPolicy;
use crate::load::load_policies;
use crate::policy::CompiledPolicy;
use crate::source::trace::Trace;
use crate::units::parse_duration;

/// kscale: scale Kubernetes workloads on the signals that matter.
#[derive(Debug, Parser)]
#[command(name = "kscale", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check policy files; prints every problem with its field path, exits 1 on any.
    Validate {
        /// Policy files (YAML; several documents per file are fine; documents of other kinds
        /// are skipped).
        #[arg(long = "policy", short = 'p', num_args = 1..)]
        policies: Vec<PathBuf>,
        /// Policy files given without `--policy`, as `kscale validate FILE...`.
        #[arg(value_name = "FILE", required_unless_present = "policies")]
        files: Vec<PathBuf>,
    },
    /// Replay a recorded trace through a policy and report what it would have done.
    Backtest(BacktestArgs),
    /// Run the controller: watch ScalingPolicies, evaluate them every interval, scale targets.
    // Boxed: the daemon's flags are many times the size of the other commands'.
    Run(Box<RunArgs>),
    /// Evaluate a policy once against the live cluster and Prometheus; never writes anything.
    DryRun(DryRunArgs),
    /// Print HorizontalPodAutoscalers (from the cluster or from files) as equivalent
    /// ScalingPolicies (YAML on standard output); what cannot be carried is named on standard
    /// error, and that HPA is left out (exit status 1).
    Import(ImportArgs),
    /// Summarize a period of shadow mode from Prometheus: a DryRun policy's desired replicas
    /// against the HPA's beside it (replica-hours of each, the time each was below the other,
    /// the largest gaps and when).
    ShadowReport(ShadowReportArgs),
    /// Print the ScalingPolicy CustomResourceDefinition (YAML).
    Crd,
    /// Print shell completions.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// How to reach Prometheus (flags with environment fallbacks).
#[derive(Debug, Clone, clap::Args)]
pub struct PrometheusArgs {
    /// The default Prometheus, e.g. http://prometheus.monitoring:9090.
    #[arg(long, env = "KSCALE_PROMETHEUS_URL")]
    pub prometheus_url: Option<String>,
    /// Where `prometheus_url` came from when not from `--prometheus-url` itself
    /// (`KSCALE_PROMETHEUS_URL`, or the config file's key), so its errors name what to fix;
    /// set by [`crate::config::parse`].
    #[arg(skip)]
    pub prometheus_url_source: Option<String>,
    /// Bound on one query (Go-style duration).
    #[arg(long, env = "KSCALE_PROMETHEUS_TIMEOUT", default_value = "10s", value_parser = parse_std_duration)]
    pub prometheus_timeout: std::time::Duration,
    /// A file holding a bearer token (re-read every tick).
    #[arg(long, env = "KSCALE_PROMETHEUS_BEARER_TOKEN_FILE")]
    pub prometheus_bearer_token_file: Option<PathBuf>,
    /// Basic-auth user (with KSCALE_PROMETHEUS_BASIC_AUTH_PASSWORD).
    #[arg(long, env = "KSCALE_PROMETHEUS_BASIC_AUTH_USER")]
    pub prometheus_basic_auth_user: Option<String>,
    /// Basic-auth password; prefer the environment variable over the flag.
    #[arg(
        long,
        env = "KSCALE_PROMETHEUS_BASIC_AUTH_PASSWORD",
        hide_env_values = true
    )]
    pub prometheus_basic_auth_password: Option<String>,
    /// PEM CA bundle for https URLs.
    #[arg(long, env = "KSCALE_PROMETHEUS_CA_FILE")]
    pub prometheus_ca_file: Option<PathBuf>,
    /// PEM client certificate.
    #[arg(long, env = "KSCALE_PROMETHEUS_CLIENT_CERT_FILE")]
    pub prometheus_client_cert_file: Option<PathBuf>,
    /// PEM client key.
    #[arg(long, env = "KSCALE_PROMETHEUS_CLIENT_KEY_FILE")]
    pub prometheus_client_key_file: Option<PathBuf>,
    /// Extra header on every request: NAME=VALUE (repeatable; in the environment, one per line).
    #[arg(
        long = "prometheus-header",
        env = "KSCALE_PROMETHEUS_HEADER",
        value_name = "NAME=VALUE",
        value_parser = parse_mapping,
        value_delimiter = '\n'
    )]
    pub prometheus_headers: Vec<(String, String)>,
    /// The largest Prometheus answer read, in bytes, for every server (the default and the
    /// policies' own), instant and range queries alike: reading stops at the cap and the query
    /// is an error naming it.
    #[arg(long, env = "KSCALE_PROMETHEUS_MAX_RESPONSE_BYTES", default_value_t = crate::source::prometheus::DEFAULT_MAX_RESPONSE_BYTES, value_parser = clap::value_parser!(u64).range(1..))]
    pub prometheus_max_response_bytes: u64,
    /// The most series one Prometheus answer may hold (instant vector elements, or range
    /// series); more is an error naming the cap.
    #[arg(long, env = "KSCALE_PROMETHEUS_MAX_SERIES", default_value_t = crate::source::prometheus::DEFAULT_MAX_SERIES, value_parser = clap::value_parser!(usize))]
    pub prometheus_max_series: usize,
}

impl PrometheusArgs {
    /// The answer caps these flags set.
    pub fn limits(&self) -> crate::source::prometheus::AnswerLimits {
        crate::source::prometheus::AnswerLimits {
            max_bytes: self.prometheus_max_response_bytes,
            max_series: self.prometheus_max_series,
        }
    }

    /// The query backend these flags describe: a Prometheus, or none (every query an error).
    pub fn backend(&self) -> Result<std::sync::Arc<dyn crate::controller::QueryBackend>, CliError> {
        use crate::source::prometheus::{BasicAuth, Material, PrometheusConfig, PrometheusSource};
        let Some(url) = &self.prometheus_url else {
            return Ok(std::sync::Arc::new(
                crate::controller::Unavailable::no_prometheus(),
            ));
        };
        let basic_auth = match (&self.prometheus_basic_auth_user, &self.prometheus_basic_auth_password) {
            (Some(user), Some(password)) => Some(BasicAuth { user: user.clone(), password: password.clone() }),
            (None, None) => None,
            _ => return Err(CliError::Config("--prometheus-basic-auth-user and KSCALE_PROMETHEUS_BASIC_AUTH_PASSWORD go together".into())),
        };
        let config = PrometheusConfig {
            url: url.clone(),
            url_setting: self
                .prometheus_url_source
                .clone()
                .map_or(std::borrow::Cow::Borrowed("--prometheus-url"), Into::into),
            timeout: self.prometheus_timeout,
            bearer_token: self
                .prometheus_bearer_token_file
                .clone()
                .map(Material::File),
            basic_auth,
            ca: self.prometheus_ca_file.clone().map(Material::File),
            client_cert: self.prometheus_client_cert_file.clone().map(Material::File),
            client_key: self.prometheus_client_key_file.clone().map(Material::File),
            headers: self.prometheus_headers.clone(),
            limits: self.limits(),
            ..PrometheusConfig::default()
        };
        let source = PrometheusSource::new(&config).map_err(|e| CliError::Config(e.to_string()))?;
        Ok(std::sync::Arc::new(source))
    }
}

/// `kscale run` arguments.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// A YAML file of defaults for these flags (keys: the long flag names); flags and their
    /// environment variables win over it.
    #[arg(long, env = "KSCALE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Evaluation interval of policies that set no `spec.interval` (Go-style duration).
    #[arg(long, env = "KSCALE_DEFAULT_INTERVAL", default_value = "15s", value_parser = parse_std_duration)]
    pub default_interval: std::time::Duration,
    /// Prometheus.
    #[command(flatten)]
    pub prometheus: PrometheusArgs,
    /// This instance's name in events (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    pub instance: Option<String>,
    /// Log format.
    #[arg(long, env = "KSCALE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Watch only this namespace's ScalingPolicies (default: all namespaces).
    #[arg(long, env = "KSCALE_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Elect a leader through a Lease, so several replicas can run (only the leader acts).
    #[arg(long, env = "KSCALE_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Namespace of the leader-election Lease (default: the daemon's own namespace, from
    /// POD_NAMESPACE, which the chart sets through the downward API, then the ServiceAccount's
    /// namespace file, then `default`).
    #[arg(long, env = "POD_NAMESPACE")]
    pub leader_election_namespace: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "KSCALE_LEADER_ELECTION_LEASE",
        default_value = "kscale-leader"
    )]
    pub leader_election_lease: String,
    /// How long a leader's renewal stays valid (failover takes at most this plus --leader-renew).
    #[arg(long, env = "KSCALE_LEADER_LEASE_DURATION", default_value = "10s", value_parser = parse_std_duration)]
    pub leader_lease_duration: std::time::Duration,
    /// How often the leader renews and candidates retry (shorter than --leader-renew-deadline).
    #[arg(long, env = "KSCALE_LEADER_RENEW", default_value = "2s", value_parser = parse_std_duration)]
    pub leader_renew: std::time::Duration,
    /// How long after the start of its last successful renewal the leader still writes, by its
    /// own clock (default: two thirds of --leader-lease-duration). Must be shorter than
    /// --leader-lease-duration, so a leader whose renewal stalls stops writing before another
    /// replica may take the Lease over.
    #[arg(long, env = "KSCALE_LEADER_RENEW_DEADLINE", value_parser = parse_std_duration)]
    pub leader_renew_deadline: Option<std::time::Duration>,
    /// Spread the policies over this many shards, one Lease each (`<lease>-0` ..), which the
    /// replicas share out: each holds at most ceil(shards / live replicas) and evaluates and
    /// writes only those shards' policies. 1 (the default) is the one leader Lease. Above 1 it
    /// needs --leader-elect.
    #[arg(long, env = "KSCALE_SHARDS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::controller::shards::MAX_SHARDS)))]
    pub shards: u32,
    /// How many times a scale write that lost a race (409 Conflict: the target's scale changed
    /// between kscale's read and its write) is re-read, re-decided and retried within one
    /// evaluation; after that the policy reports ScaleConflict and tries again next interval.
    #[arg(long, env = "KSCALE_SCALE_CONFLICT_RETRIES", default_value_t = 3, value_parser = clap::value_parser!(u8).range(0..=10))]
    pub scale_conflict_retries: u8,
    /// The only Prometheus servers a policy's `spec.prometheus.url` may name (repeatable, or
    /// comma-separated in the environment; default: any URL). Each entry is a URL: a policy's
    /// URL must have its scheme, host and port, and a path that starts with its path segment by
    /// segment (`http://prometheus.monitoring` does not admit
    /// `http://prometheus.monitoring.example.org`).
    #[arg(
        long = "policy-prometheus-allowed-prefix",
        env = "KSCALE_POLICY_PROMETHEUS_ALLOWED_PREFIX",
        value_delimiter = ','
    )]
    pub policy_prometheus_allowed_prefix: Vec<String>,
    /// How many policies are evaluated at once (each reads its target's scale and writes).
    #[arg(long, env = "KSCALE_MAX_CONCURRENT_EVALUATIONS", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_concurrent_evaluations: u16,
    /// How long one evaluation of a policy with a CEL formula may take (Go-style duration). A
    /// formula that overruns is refused until its policy changes, and its fallback applies.
    /// Formulas are bounded when compiled too, so an accepted one stays far below this.
    #[arg(long, env = "KSCALE_FORMULA_TIMEOUT", default_value = "1s", value_parser = parse_std_duration)]
    pub formula_timeout: std::time::Duration,
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(long, env = "KSCALE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: std::net::SocketAddr,
    /// Limits of the listeners (`/metrics` and the external metrics adapter).
    #[command(flatten)]
    pub listeners: crate::listener::ListenerArgs,
    #[command(flatten)]
    pub external_metrics: Box<crate::adapter::ExternalMetricsArgs>,
}

/// `kscale dry-run` arguments.
#[derive(Debug, clap::Args)]
pub struct DryRunArgs {
    /// The policy file (its first ScalingPolicy is evaluated).
    #[arg(long, short = 'p')]
    pub policy: PathBuf,
    /// Namespace of the target when the policy names none.
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// Prometheus.
    #[command(flatten)]
    pub prometheus: PrometheusArgs,
}

/// The mode of imported policies (`spec.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ImportMode {
    /// kscale writes the scale (remove or stop the HPA first: a target has one writer).
    #[value(name = "Controller")]
    Controller,
    /// kscale publishes the decision through external.metrics.k8s.io for an HPA.
    #[value(name = "ExternalMetric")]
    ExternalMetric,
    /// kscale only reports what it would do, beside the HPA (shadow mode).
    #[value(name = "DryRun")]
    DryRun,
}

impl From<ImportMode> for crate::crd::Mode {
    fn from(m: ImportMode) -> Self {
        match m {
            ImportMode::Controller => crate::crd::Mode::Controller,
            ImportMode::ExternalMetric => crate::crd::Mode::ExternalMetric,
            ImportMode::DryRun => crate::crd::Mode::DryRun,
        }
    }
}

/// `kscale import` arguments: HPAs from the cluster (`-n`, names, `-A`) or from files (`-f`),
/// as kubectl takes them.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// HPA names in the namespace (every HPA of the namespace when none is given).
    pub names: Vec<String>,
    /// Namespace of the HPAs read from the cluster.
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// Every HPA of every namespace.
    #[arg(long, short = 'A', conflicts_with_all = ["names", "namespace"])]
    pub all_namespaces: bool,
    /// Read HPAs from YAML files instead of the cluster (autoscaling/v1, v2beta2 or v2; several
    /// documents and `kubectl get hpa -o yaml` lists are fine; other kinds are skipped).
    #[arg(long = "filename", short = 'f', conflicts_with_all = ["names", "all_namespaces"])]
    pub files: Vec<PathBuf>,
    /// The mode of the policies written. DryRun (the default) runs beside the HPA without
    /// writing: the safe first step.
    #[arg(long, value_enum, default_value = "DryRun")]
    pub mode: ImportMode,
}

/// `kscale shadow-report` arguments.
#[derive(Debug, clap::Args)]
pub struct ShadowReportArgs {
    /// The DryRun policy's name.
    pub policy: String,
    /// Its namespace.
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// The Prometheus that scrapes the daemon's `/metrics`.
    #[arg(long, value_name = "URL")]
    pub prometheus: String,
    /// Start of the period (RFC 3339, or Unix seconds).
    #[arg(long, value_parser = parse_time)]
    pub from: DateTime<Utc>,
    /// End of the period (RFC 3339, or Unix seconds).
    #[arg(long, value_parser = parse_time)]
    pub to: DateTime<Utc>,
    /// Resolution (Go-style duration; at least the scrape interval makes sense).
    #[arg(long, value_parser = parse_delta, default_value = "15s")]
    pub step: TimeDelta,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

pub(crate) use crate::units::parse_std_duration;

/// Output format of a backtest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A summary table for people.
    Table,
    /// `{"summary": {...}, "steps": [...]}` for programs.
    Json,
}

/// `kscale backtest` arguments.
#[derive(Debug, clap::Args)]
pub struct BacktestArgs {
    /// The policy file (its first ScalingPolicy is used).
    #[arg(long, short = 'p')]
    pub policy: PathBuf,
    /// The trace: CSV with a `timestamp` column and one column per metric.
    #[arg(
        long,
        short = 't',
        required_unless_present = "prometheus",
        conflicts_with = "prometheus"
    )]
    pub trace: Option<PathBuf>,
    /// Replay history from this Prometheus instead of a trace: each Prometheus metric's query is
    /// read with range queries from --from to --to every --step (one trace column per metric).
    #[arg(long, value_name = "URL", requires_all = ["from", "to"])]
    pub prometheus: Option<String>,
    /// Start of the history (RFC 3339, or Unix seconds).
    #[arg(long, value_parser = parse_time, requires = "prometheus")]
    pub from: Option<DateTime<Utc>>,
    /// End of the history (RFC 3339, or Unix seconds).
    #[arg(long, value_parser = parse_time, requires = "prometheus")]
    pub to: Option<DateTime<Utc>>,
    /// Resolution of the history (Go-style duration; default: the policy's interval, which
    /// replays exactly what the controller would have seen).
    #[arg(long, value_parser = parse_delta, requires = "prometheus")]
    pub step: Option<TimeDelta>,
    /// The largest answer of one history range query, in bytes (as `kscale run`'s flag).
    #[arg(long, default_value_t = crate::source::prometheus::DEFAULT_MAX_RESPONSE_BYTES, value_parser = clap::value_parser!(u64).range(1..), requires = "prometheus")]
    pub prometheus_max_response_bytes: u64,
    /// The most series in one answer of a history range query (as `kscale run`'s flag).
    #[arg(long, default_value_t = crate::source::prometheus::DEFAULT_MAX_SERIES, requires = "prometheus")]
    pub prometheus_max_series: usize,
    /// Feed a metric from a column: NAME=COLUMN (repeatable).
    #[arg(long = "metric", value_name = "NAME=COLUMN", value_parser = parse_mapping)]
    pub metrics: Vec<(String, String)>,
    /// The demand column (for capacity, SLO and oracle); default: the first metric's column.
    #[arg(long, value_name = "COLUMN")]
    pub demand: Option<String>,
    /// Multiply every trace value by this (for example to turn counts per step into a rate).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Demand one ready replica absorbs; enables SLO-violation minutes and the oracle.
    #[arg(long)]
    pub capacity: Option<f64>,
    /// Time from adding a replica to it being ready (Go-style duration, e.g. 60s).
    #[arg(long, default_value = "0s", value_parser = parse_delta)]
    pub startup: TimeDelta,
    /// Replicas at the start (default: the policy's minReplicas).
    #[arg(long)]
    pub initial_replicas: Option<i32>,
    /// Treat the first stretch of the data as history only (Go-style duration): forecasts learn
    /// from it, as the controller re-reads history after a start; evaluations start after it.
    #[arg(long, default_value = "0s", value_parser = parse_delta)]
    pub warmup: TimeDelta,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Write a plot (.svg or .png): one panel per policy over the whole run, the busiest day and
    /// the worst SLO violation.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Write a self-contained HTML report (summaries side by side, the verdict, the SLO
    /// violations and the plot's panels; no script, no network).
    #[arg(long, value_name = "FILE.html")]
    pub report: Option<PathBuf>,
    /// A second policy to run on the same data, side by side.
    #[arg(long, value_name = "FILE")]
    pub compare: Option<PathBuf>,
}

fn parse_mapping(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected NAME=COLUMN, got {s:?}")),
    }
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(secs) = s.parse::<i64>() {
        return DateTime::from_timestamp(secs, 0).ok_or_else(|| format!("{s} is out of range"));
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("expected RFC 3339 (2026-01-02T15:04:05Z) or Unix seconds: {e}"))
}

fn parse_delta(s: &str) -> Result<TimeDelta, String> {
    parse_duration(s)
        .map_err(|e| e.to_string())
        .and_then(|d| TimeDelta::from_std(d).map_err(|e| e.to_string()))
}

/// A failure the CLI reports; the message names the file, flag or field.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Policy file problems.
    #[error(transparent)]
    Load(#[from] crate::load::LoadError),
    /// The policy is invalid.
    #[error("{path}: policy {name} is invalid:\n{problems}")]
    InvalidPolicy {
        /// File.
        path: PathBuf,
        /// Policy name.
        name: String,
        /// One problem per line.
        problems: String,
    },
    /// Trace problems.
    #[error(transparent)]
    Trace(#[from] crate::source::trace::TraceError),
    /// Backtest setup problems.
    #[error(transparent)]
    Backtest(#[from] crate::backtest::BacktestError),
    /// Plot problems.
    #[error(transparent)]
    Plot(#[from] crate::backtest::plot::PlotError),
    /// Writing output.
    #[error("cannot write output: {0}")]
    Output(String),
    /// Bad daemon configuration.
    #[error("{0}")]
    Config(String),
    /// Talking to the cluster failed.
    #[error("{0}")]
    Cluster(String),
    /// Validation found problems (already printed).
    #[error("{0} invalid {policies}", policies = if *.0 == 1 { "policy" } else { "policies" })]
    ValidationFailed(usize),
    /// An HPA file could not be read.
    #[error("{0}")]
    Import(#[from] crate::import::ImportError),
    /// Some HPAs could not be carried whole (each named on standard error).
    #[error("{0} of {1} HorizontalPodAutoscalers not imported (see above)")]
    NotImported(usize, usize),
    /// `validate` was given files, none of which holds a ScalingPolicy.
    #[error(
        "{which} ScalingPolicy (apiVersion kscale.dev/v1alpha1, kind ScalingPolicy); nothing was checked",
        which = if *.0 == 1 { "the file given holds no".to_string() } else { format!("none of the {} files given holds a", .0) }
    )]
    NoPolicyInFiles(usize),
}

/// Runs a parsed command line; output goes to `out`.
pub fn execute(cli: Cli, out: &mut dyn Write) -> Result<(), CliError> {
    match cli.command {
        Command::Validate { policies, files } => {
            let all: Vec<PathBuf> = policies.into_iter().chain(files).collect();
            validate(&all, out)
        }
        Command::Backtest(args) => backtest(&args, out),
        Command::Run(args) => run_daemon(&args),
        Command::DryRun(args) => dry_run(&args, out),
        Command::Import(args) => import(&args, out, &mut std::io::stderr()),
        Command::ShadowReport(args) => shadow_report(&args, out),
        Command::Crd => {
            let yaml = crate::crd::crd_yaml().map_err(|e| CliError::Output(e.to_string()))?;
            out.write_all(yaml.as_bytes())
                .map_err(|e| CliError::Output(e.to_string()))
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "kscale", out);
            Ok(())
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Config(format!("cannot start the async runtime: {e}")))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(log_colours(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR"),
        ))
        .with_writer(std::io::stderr);
    // A second initialization (tests) is harmless: keep the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Whether log lines carry ANSI colour codes: only on a terminal (never in a file or a pipe), and
/// not when `NO_COLOR` is set to anything but the empty string (no-color.org).
fn log_colours(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

async fn kube_client() -> Result<kube::Client, CliError> {
    kube::Client::try_default().await.map_err(|e| {
        CliError::Cluster(format!(
            "cannot reach the cluster (KUBECONFIG, then in-cluster config): {e}"
        ))
    })
}

fn run_daemon(args: &RunArgs) -> Result<(), CliError> {
    init_logging(args.log_format);
    let election = args
        .leader_elect
        .then(|| crate::controller::leader::LeaderConfig {
            namespace: crate::controller::leader::lease_namespace(
                args.leader_election_namespace.as_deref(),
                std::path::Path::new(crate::controller::leader::SERVICE_ACCOUNT_NAMESPACE),
            ),
            name: args.leader_election_lease.clone(),
            identity: args.instance.clone().unwrap_or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                format!("{}-{}", host.trim(), std::process::id())
            }),
            duration: args.leader_lease_duration,
            renew_deadline: args.leader_renew_deadline.unwrap_or_else(|| {
                crate::controller::leader::LeaderConfig::default_renew_deadline(
                    args.leader_lease_duration,
                )
            }),
            renew: args.leader_renew,
            shards: args.shards,
        });
    if args.shards > 1 && election.is_none() {
        return Err(CliError::Config(format!(
            "--shards {} needs --leader-elect (each shard is a Lease the replicas share out); use --shards 1 with --leader-elect=false",
            args.shards
        )));
    }
    if let Some(cfg) = &election {
        cfg.validate()
            .map_err(|e| CliError::Config(e.to_string()))?;
    }
    if let Some(cfg) = &election {
        if cfg.shards > 1 {
            tracing::info!(namespace = %cfg.namespace, leases = %format!("{}-0..{}-{}", cfg.name, cfg.name, cfg.shards - 1), identity = %cfg.identity, shards = cfg.shards, "sharded through these Leases (--shards, --leader-election-namespace, --leader-election-lease)");
        } else {
            tracing::info!(namespace = %cfg.namespace, lease = %cfg.name, identity = %cfg.identity, "leader election through this Lease (--leader-election-namespace, --leader-election-lease)");
        }
    }
    let backend = args.prometheus.backend()?;
    runtime()?.block_on(async {
        let client = kube_client().await?;
        let mut ctx =
            crate::controller::Context::new(client.clone(), backend.clone(), args.instance.clone());
        if args.prometheus.prometheus_url.is_none() {
            // The daemon works without one (resource metrics, policies with their own server),
            // so it starts, ready, and says so: in the log, on /readyz and as a metric.
            tracing::warn!("{}; policies without spec.prometheus.url fail their Prometheus metrics and their fallback applies", crate::controller::NO_PROMETHEUS);
            ctx.metrics.add_warning(crate::controller::NO_PROMETHEUS.to_string());
        } else {
            ctx.metrics.default_prometheus.set(1);
        }
        ctx.watch_namespace = args.watch_namespace.clone();
        let adapter = match args.external_metrics.external_metrics_addr {
            Some(addr) => {
                let forward = crate::adapter::forward::Forwarder::new(
                    &args.external_metrics.upstream,
                    std::sync::Arc::new(ctx.synced_policies.clone()),
                    ctx.metrics.forwarded.clone(),
                )
                .map_err(|e| CliError::Config(e.to_string()))?;
                let running = crate::adapter::Adapter::start(
                    &args.external_metrics,
                    addr,
                    client.clone(),
                    backend.clone(),
                    args.listeners
                        .limits(args.external_metrics.external_metrics_max_connections),
                    forward,
                )
                .await
                .map_err(|e| CliError::Config(e.to_string()))?;
                ctx.external_metrics = Some(running.cache.clone());
                Some(running.task)
            }
            None => None,
        };
        ctx.concurrency = usize::from(args.max_concurrent_evaluations);
        ctx.scale_conflict_retries = u32::from(args.scale_conflict_retries);
        ctx.formulas = crate::controller::formula_budget::FormulaBudget::new(args.formula_timeout);
        ctx.default_interval = chrono::TimeDelta::from_std(args.default_interval)
            .map_err(|e| CliError::Config(format!("--default-interval: {e}")))?;
        let allowed = crate::controller::servers::AllowedPrefix::parse_all(
            &args.policy_prometheus_allowed_prefix,
        )
        .map_err(CliError::Config)?;
        ctx.servers = crate::controller::servers::Servers::new(
            client.clone(),
            backend,
            args.prometheus.prometheus_timeout,
            allowed,
        )
        .with_limits(args.prometheus.limits());
        // The targets' pods come from a watch, as the HPA's come from an informer.
        let (hpas, hpa_watch) = crate::controller::hpas::Hpas::watch(
            client.clone(),
            args.watch_namespace.as_deref(),
        );
        ctx.hpas = hpas;
        // The targets' scale is read again only when their metadata watch shows a change.
        ctx.scales = crate::controller::scales::Scales::watching(
            client.clone(),
            args.watch_namespace.as_deref(),
        );
        let (pods, pod_watch) =
            crate::source::pods::PodCache::watch(client, args.watch_namespace.as_deref());
        ctx.pods = pods;
        let ctx = std::sync::Arc::new(ctx);
        let listener = crate::telemetry::bind(args.metrics_addr)
            .await
            .map_err(|e| CliError::Config(format!("--metrics-addr {}: {e}", args.metrics_addr)))?;
        let admin = tokio::spawn(crate::telemetry::serve(
            listener,
            ctx.metrics.clone(),
            args.listeners
                .limits(args.listeners.metrics_max_connections),
        ));
        let shutdown = async {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            {
                let mut term =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(s) => s,
                        Err(_) => return ctrl_c.await.unwrap_or(()),
                    };
                tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
            }
            #[cfg(not(unix))]
            let _ = ctrl_c.await;
        };
        let result = crate::controller::run(ctx, shutdown, election)
            .await
            .map_err(|e| CliError::Cluster(format!("the ScalingPolicy watch failed: {e}")));
        admin.abort();
        pod_watch.abort();
        hpa_watch.abort();
        if let Some(task) = adapter {
            task.abort();
        }
        result
    })
}

/// The status of the ScalingPolicy in the cluster with `resource`'s namespace and name, if
/// there is one (a policy not created yet has none), and where the state came from, for the
/// output.
async fn live_status(
    client: &kube::Client,
    resource: &crate::crd::ScalingPolicy,
) -> Result<(Option<crate::crd::ScalingPolicyStatus>, &'static str), CliError> {
    let namespace = resource.metadata.namespace.as_deref().unwrap_or("default");
    let Some(name) = resource.metadata.name.as_deref() else {
        return Ok((None, "none (the policy has no name)"));
    };
    let api: kube::Api<crate::crd::ScalingPolicy> =
        kube::Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await {
        Ok(Some(live)) if live.status.is_some() => {
            Ok((live.status, "the live ScalingPolicy's status"))
        }
        Ok(Some(_)) => Ok((None, "none (the live ScalingPolicy has no status yet)")),
        // A missing CRD is no live policy either.
        Ok(None) => Ok((None, "none (no ScalingPolicy of this name in the cluster)")),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            Ok((None, "none (no ScalingPolicy of this name in the cluster)"))
        }
        Err(kube::Error::Api(e)) if e.code == 403 => Ok((
            None,
            "none (reading ScalingPolicies is forbidden to this user: the evaluation starts from an empty history)",
        )),
        Err(e) => Err(CliError::Cluster(format!(
            "reading ScalingPolicy {namespace}/{name} for its status: {e}"
        ))),
    }
}

fn dry_run(args: &DryRunArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let (mut resource, mut policy) = first_document(&args.policy)?;
    if resource.metadata.namespace.is_none() {
        resource.metadata.namespace = Some(args.namespace.clone());
        // Compiled again only so that messages name the policy with its namespace.
        policy = CompiledPolicy::from_resource(&resource).map_err(|e| CliError::InvalidPolicy {
            path: args.policy.clone(),
            name: resource.metadata.name.clone().unwrap_or_default(),
            problems: e.to_string(),
        })?;
    }
    let backend = args.prometheus.backend()?;
    runtime()?.block_on(async {
        let client = kube_client().await?;
        // The evaluation goes on from the live policy's status when one of that name exists
        // (its stabilization window, scale events, kscale's own zero, the cooldown and the
        // failure count), as the controller's next evaluation would.
        let (live, state_from) = live_status(&client, &resource).await?;
        resource.status = live;
        let mut ctx = crate::controller::Context::new(client.clone(), backend.clone(), None);
        ctx.servers = crate::controller::servers::Servers::new(
            client,
            backend,
            args.prometheus.prometheus_timeout,
            Vec::new(),
        )
        .with_limits(args.prometheus.limits());
        let namespace = resource.metadata.namespace.clone().unwrap_or_default();
        let mut samples = ctx.servers.query([(namespace.as_str(), &policy)]).await;
        let samples = samples
            .remove(&crate::controller::servers::Servers::key_of(
                &namespace, &policy,
            ))
            .unwrap_or_default();
        let e = crate::controller::evaluate_live(
            &ctx,
            &resource,
            policy,
            &samples,
            chrono::Utc::now(),
            false,
            None,
        )
        .await
        .map_err(|e| CliError::Cluster(e.to_string()))?;
        let d = &e.decision;
        writeln!(out, "policy    {}", e.policy.name).map_err(io)?;
        writeln!(out, "state     {state_from}").map_err(io)?;
        writeln!(
            out,
            "target    {} {} (spec {}, status {})",
            resource.spec.target_ref.kind,
            resource.spec.target_ref.name,
            e.scale.spec_replicas,
            e.scale.status_replicas
        )
        .map_err(io)?;
        for (m, o) in e.policy.metrics.iter().zip(&d.metrics) {
            writeln!(
                out,
                "metric    {:<12} {:<8} value {:<12} proposal {}{}{}",
                m.name,
                o.state.as_str(),
                o.value.map_or("-".to_string(), |v| format!("{v}")),
                o.proposal.map_or("-".to_string(), |p| p.to_string()),
                o.forecast_note()
                    .map_or(String::new(), |note| format!("  ({note})")),
                o.message
                    .as_deref()
                    .map_or(String::new(), |m| format!("  ({m})"))
            )
            .map_err(io)?;
        }
        let ready = crate::controller::ready_condition(&e);
        writeln!(
            out,
            "condition {:<16} {:<5} {}",
            "Ready", ready.status, ready.reason
        )
        .map_err(io)?;
        for c in d.conditions() {
            writeln!(
                out,
                "condition {:<16} {:<5} {}",
                c.type_, c.status, c.reason
            )
            .map_err(io)?;
        }
        if let Some(conflict) = &e.hpa_conflict {
            writeln!(out, "conflict  {conflict}").map_err(io)?;
        }
        if let Some(pending) = &e.takeover_pending {
            writeln!(out, "takeover  {pending}").map_err(io)?;
        }
        if let Some((hpa, hpa_desired)) = &e.shadow {
            writeln!(
                out,
                "shadow    HPA {hpa} wants {hpa_desired}; kscale {} (divergence {:+})",
                d.replicas,
                d.replicas - hpa_desired
            )
            .map_err(io)?;
        }
        writeln!(
            out,
            "decision  {} replicas (dry run: nothing written)",
            d.replicas
        )
        .map_err(io)?;
        writeln!(out, "reason    {}", d.reason(&e.policy)).map_err(io)?;
        Ok(())
    })
}

fn io(e: std::io::Error) -> CliError {
    CliError::Output(e.to_string())
}

fn validate(paths: &[PathBuf], out: &mut dyn Write) -> Result<(), CliError> {
    let mut invalid = 0;
    let mut policies = 0;
    let mut first_error = None;
    for path in paths {
        match load_policies(path) {
            // A file of other kinds (the Deployment or HPA beside a policy, `dir/*.yaml`) is
            // skipped, as the README says, and said so.
            Err(crate::load::LoadError::NoPolicy { .. }) => {
                writeln!(out, "{}: no ScalingPolicy, skipped", path.display()).map_err(io)?;
            }
            Err(e) => {
                writeln!(out, "{e}").map_err(io)?;
                invalid += 1;
                first_error.get_or_insert(e);
            }
            Ok(docs) => {
                for doc in docs {
                    policies += 1;
                    let name = doc.name.as_deref().unwrap_or("(unnamed)");
                    match &doc.result {
                        Ok(_) => writeln!(out, "{}: {name}: valid", path.display()).map_err(io)?,
                        Err(problems) => {
                            invalid += 1;
                            writeln!(
                                out,
                                "{}: {name} (document {}): {} problem{}",
                                path.display(),
                                doc.document,
                                problems.len(),
                                if problems.len() == 1 { "" } else { "s" }
                            )
                            .map_err(io)?;
                            // In the file's order: the shape and the compiled checks are
                            // two passes, each in its own order.
                            let mut problems: Vec<_> = problems.iter().collect();
                            problems.sort_by_key(|p| doc.line_of(p).unwrap_or(usize::MAX));
                            for p in problems {
                                match doc.line_of(p) {
                                    Some(line) => writeln!(out, "  line {line}: {p}"),
                                    None => writeln!(out, "  {p}"),
                                }
                                .map_err(io)?;
                            }
                        }
                    }
                }
            }
        }
    }
    if invalid > 0 {
        return Err(CliError::ValidationFailed(invalid));
    }
    if policies == 0 {
        // Nothing was checked: a typo'd glob must not pass as "valid".
        return Err(CliError::NoPolicyInFiles(paths.len()));
    }
    Ok(())
}

/// `kscale import`: each HPA as a ScalingPolicy document on `out`; what cannot be carried on
/// `err`, naming the HPA and the field.
fn import(args: &ImportArgs, out: &mut dyn Write, err: &mut dyn Write) -> Result<(), CliError> {
    use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
    let hpas: Vec<(String, HorizontalPodAutoscaler)> = if args.files.is_empty() {
        runtime()?.block_on(async {
            let client = kube_client().await?;
            let api: kube::Api<HorizontalPodAutoscaler> = if args.all_namespaces {
                kube::Api::all(client)
            } else {
                kube::Api::namespaced(client, &args.namespace)
            };
            let what = if args.all_namespaces {
                "all namespaces".to_string()
            } else {
                format!("namespace {}", args.namespace)
            };
            let listing = |e: kube::Error| {
                CliError::Cluster(format!(
                    "listing HorizontalPodAutoscalers in {what}: {}",
                    crate::api_error::human(&e)
                ))
            };
            let items = if args.names.is_empty() {
                api.list(&Default::default()).await.map_err(listing)?.items
            } else {
                let mut items = Vec::new();
                for name in &args.names {
                    items.push(api.get(name).await.map_err(|e| {
                        CliError::Cluster(format!(
                            "HorizontalPodAutoscaler {}/{name}: {}",
                            args.namespace,
                            crate::api_error::human(&e)
                        ))
                    })?);
                }
                items
            };
            // The apiserver serves every HPA as autoscaling/v2, whatever it was written in.
            Ok::<_, CliError>(
                items
                    .into_iter()
                    .map(|h| ("autoscaling/v2".to_string(), h))
                    .collect(),
            )
        })?
    } else {
        let mut hpas = Vec::new();
        for path in &args.files {
            let shown = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|source| {
                CliError::Import(crate::import::ImportError::Read {
                    path: shown.clone(),
                    source,
                })
            })?;
            hpas.extend(crate::import::hpas_of_yaml(&shown, &text).map_err(CliError::Import)?);
        }
        hpas
    };
    if hpas.is_empty() {
        writeln!(err, "no HorizontalPodAutoscaler found").map_err(io)?;
        return Ok(());
    }
    let mut left_out = 0;
    let mut first = true;
    for (version, hpa) in &hpas {
        match crate::import::from_v2(hpa, version, args.mode.into()) {
            Ok(policy) => {
                for note in crate::import::notes(hpa) {
                    writeln!(err, "note: {note}").map_err(io)?;
                }
                let yaml = serde_yaml::to_string(&policy)
                    .map_err(|e| CliError::Config(format!("writing YAML: {e}")))?;
                if !first {
                    writeln!(out, "---").map_err(io)?;
                }
                first = false;
                write!(out, "{yaml}").map_err(io)?;
            }
            Err(problems) => {
                left_out += 1;
                for p in problems {
                    writeln!(err, "not imported: {p}").map_err(io)?;
                }
            }
        }
    }
    if left_out > 0 {
        return Err(CliError::NotImported(left_out, hpas.len()));
    }
    Ok(())
}

/// `kscale shadow-report`: the two shadow-mode gauges read back with range queries, summed up.
fn shadow_report(args: &ShadowReportArgs, out: &mut dyn Write) -> Result<(), CliError> {
    use crate::source::prometheus::{PrometheusConfig, PrometheusSource};
    let source = PrometheusSource::new(&PrometheusConfig {
        url: args.prometheus.clone(),
        timeout: std::time::Duration::from_secs(120),
        url_setting: "--prometheus".into(),
        ..PrometheusConfig::default()
    })
    .map_err(|e| CliError::Config(e.to_string()))?;
    let selector = format!(
        "{{namespace={},policy={}}}",
        promql_string(&args.namespace),
        promql_string(&args.policy)
    );
    // `max`: one series whatever the scrape adds (instance, pod) or a failover doubles.
    let kscale_query = format!("max(kscale_desired_replicas{selector})");
    let hpa_query = format!("max(kscale_shadow_hpa_desired_replicas{selector})");
    let (kscale, hpa) = runtime()?.block_on(async {
        let read = |q: String| {
            let source = &source;
            async move {
                source
                    .query_range(&q, args.from, args.to, args.step, &mut |_, _| {})
                    .await
                    .map_err(|e| {
                        CliError::Config(format!(
                            "--prometheus {}: {q}: {}",
                            args.prometheus, e.message
                        ))
                    })
            }
        };
        Ok::<_, CliError>((read(kscale_query).await?, read(hpa_query).await?))
    })?;
    let summary = crate::backtest::shadow::summarize(&kscale, &hpa, args.step)
        .map_err(|e| CliError::Config(format!("{}/{}: {e}", args.namespace, args.policy)))?;
    let what = format!("{}/{} beside its HPA", args.namespace, args.policy);
    write!(out, "{}", crate::backtest::shadow::render(&what, &summary)).map_err(io)
}

/// `text` as a PromQL string literal.
fn promql_string(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The first ScalingPolicy of a file, parsed and compiled, or every problem with it.
fn first_document(path: &Path) -> Result<(ScalingPolicy, CompiledPolicy), CliError> {
    let docs = load_policies(path)?;
    let mut docs = docs.into_iter();
    let Some(doc) = docs.next() else {
        return Err(crate::load::LoadError::NoPolicy {
            path: path.to_path_buf(),
        }
        .into());
    };
    match doc.result {
        Ok(loaded) => Ok(loaded),
        Err(problems) => Err(CliError::InvalidPolicy {
            path: path.to_path_buf(),
            name: doc.name.unwrap_or_else(|| "(unnamed)".into()),
            problems: problems
                .iter()
                .map(|p| format!("  {p}"))
                .collect::<Vec<_>>()
                .join("\n"),
        }),
    }
}

fn first_policy(path: &Path) -> Result<CompiledPolicy, CliError> {
    first_document(path).map(|(_, compiled)| compiled)
}

#[derive(Serialize)]
struct JsonStep<'a> {
    time: String,
    replicas: i32,
    ready_replicas: i32,
    metrics: serde_json::Map<String, serde_json::Value>,
    reason: &'a str,
}

#[derive(Serialize)]
struct JsonRun<'a> {
    summary: &'a Summary,
    steps: Vec<JsonStep<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    compare: Option<Box<JsonRun<'a>>>,
    /// The verdict line against the compared policy (with `--compare`).
    #[serde(skip_serializing_if = "Option::is_none")]
    verdict: Option<String>,
}

fn json_run<'a>(policy: &CompiledPolicy, r: &'a Run) -> JsonRun<'a> {
    JsonRun {
        summary: &r.summary,
        steps: r
            .steps
            .iter()
            .map(|s| JsonStep {
                time: s.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                replicas: s.replicas,
                ready_replicas: s.ready_replicas,
                metrics: policy
                    .metrics
                    .iter()
                    .zip(&s.metrics)
                    .map(|(m, v)| {
                        (
                            m.name.clone(),
                            v.and_then(serde_json::Number::from_f64)
                                .map_or(serde_json::Value::Null, serde_json::Value::Number),
                        )
                    })
                    .collect(),
                reason: s.reason.as_deref().unwrap_or(""),
            })
            .collect(),
        compare: None,
        verdict: None,
    }
}

fn backtest(args: &BacktestArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let policy = first_policy(&args.policy)?;
    let compare = args.compare.as_deref().map(first_policy).transpose()?;
    // In Prometheus mode each policy's metrics map to the columns of their own queries.
    let (trace, mappings) = match (&args.trace, &args.prometheus, args.from, args.to) {
        (Some(path), _, _, _) => (Trace::load(path)?, Vec::new()),
        (None, Some(url), Some(from), Some(to)) => {
            let policies: Vec<&CompiledPolicy> =
                std::iter::once(&policy).chain(compare.as_ref()).collect();
            let step = args.step.unwrap_or(policy.interval);
            let limits = crate::source::prometheus::AnswerLimits {
                max_bytes: args.prometheus_max_response_bytes,
                max_series: args.prometheus_max_series,
            };
            let history = prometheus_history(&policies, url, from, to, step, limits)?;
            (history.trace, history.columns)
        }
        _ => {
            return Err(CliError::Config(
                "give --trace FILE, or --prometheus URL with --from and --to".into(),
            ));
        }
    };
    let config_for = |mapping: Vec<(String, String)>| {
        // --metric wins over the column of the metric's own query.
        let mut metric_columns = args.metrics.clone();
        metric_columns.extend(
            mapping
                .into_iter()
                .filter(|(m, _)| !args.metrics.iter().any(|(given, _)| given == m)),
        );
        BacktestConfig {
            metric_columns,
            demand_column: args.demand.clone(),
            scale: args.scale,
            capacity: args.capacity,
            startup: args.startup,
            initial_replicas: args.initial_replicas,
            keep_reasons: args.format == Format::Json,
            warmup: args.warmup,
        }
    };
    let mut mappings = mappings.into_iter();
    let main_config = config_for(mappings.next().unwrap_or_default());
    let compare_config = config_for(mappings.next().unwrap_or_default());
    let main_run = run_with_progress(&policy, &trace, &main_config)?;
    let compare_run = compare
        .as_ref()
        .map(|c| run_with_progress(c, &trace, &compare_config))
        .transpose()?;

    match args.format {
        Format::Json => {
            let mut doc = json_run(&policy, &main_run);
            if let (Some(c), Some(r)) = (&compare, &compare_run) {
                doc.compare = Some(Box::new(json_run(c, r)));
                doc.verdict = Some(verdict(&main_run.summary, &r.summary));
            }
            serde_json::to_writer(&mut *out, &doc).map_err(|e| CliError::Output(e.to_string()))?;
            writeln!(out).map_err(io)?;
        }
        Format::Table => {
            let mut runs = vec![&main_run];
            runs.extend(compare_run.as_ref());
            write_table(&trace, args, &runs, out).map_err(io)?;
        }
    }
    if args.plot.is_none() && args.report.is_none() {
        return Ok(());
    }
    let mut runs = vec![(&policy, &main_run)];
    if let (Some(c), Some(r)) = (&compare, &compare_run) {
        runs.push((c, r));
    }
    let verdict_line = compare_run
        .as_ref()
        .map(|r| verdict(&main_run.summary, &r.summary));
    let data = plot_data(&trace, args, &runs, verdict_line.as_deref());
    if let Some(path) = &args.plot {
        write_plot(&data, path)?;
        if args.format == Format::Table {
            writeln!(out, "plot written to {}", path.display()).map_err(io)?;
        }
    }
    if let Some(path) = &args.report {
        let input = ReportInput {
            plot: &data,
            summaries: runs.iter().map(|(_, r)| &r.summary).collect(),
            verdict: verdict_line,
            setup: setup_lines(&trace, args, &main_run.summary),
        };
        write_report(&input, path)?;
        if args.format == Format::Table {
            writeln!(out, "report written to {}", path.display()).map_err(io)?;
        }
    }
    Ok(())
}

/// What `--plot` and `--report` draw: every run, titled with the trace and subtitled with the
/// verdict (or, alone, the run's figures).
fn plot_data(
    trace: &Trace,
    args: &BacktestArgs,
    runs: &[(&CompiledPolicy, &Run)],
    verdict_line: Option<&str>,
) -> PlotData {
    let (policy, main) = runs[0];
    let s = &main.summary;
    let subtitle = verdict_line.map_or_else(
        || {
            format!(
                "{:.1} replica-hours, {} scaling actions{}{}",
                s.replica_hours,
                s.scaling_actions,
                s.slo_violation_minutes
                    .map_or(String::new(), |v| format!(", {v:.1} SLO-violation minutes")),
                s.ratio_to_oracle.map_or(String::new(), |r| format!(
                    ", {r:.2}× the bounded oracle's replica-hours"
                )),
            )
        },
        str::to_string,
    );
    PlotData {
        title: format!(
            "{} on {}",
            policy.name,
            trace.path.file_name().map_or_else(
                || trace.path.display().to_string(),
                |f| f.to_string_lossy().into_owned()
            )
        ),
        subtitle,
        times: main.steps.iter().map(|s| s.time).collect(),
        demand: main.demand.clone(),
        capacity: args.capacity,
        runs: runs
            .iter()
            .map(|(p, r)| PlotRun {
                label: p.name.clone(),
                replicas: r.steps.iter().map(|s| s.replicas).collect(),
                ready: r.steps.iter().map(|s| s.ready_replicas).collect(),
                violations: r
                    .summary
                    .slo_violations
                    .iter()
                    .map(|v| (v.start, v.end))
                    .collect(),
            })
            .collect(),
    }
}

/// The trace and model lines of the table's heading, as (label, value).
fn setup_lines(trace: &Trace, args: &BacktestArgs, first: &Summary) -> Vec<(String, String)> {
    vec![
        (
            "trace".to_string(),
            format!(
                "{} ({} rows, {} → {})",
                trace.path.display(),
                trace.times.len(),
                first.start.format("%Y-%m-%d %H:%M"),
                first.end.format("%Y-%m-%d %H:%M")
            ),
        ),
        (
            "model".to_string(),
            format!(
                "scale {}, capacity {}, startup {}s",
                args.scale,
                args.capacity.map_or("none".to_string(), |c| c.to_string()),
                args.startup.num_seconds()
            ),
        ),
    ]
}

/// Reads `policies`' metric history from Prometheus, with a progress bar on stderr.
fn prometheus_history(
    policies: &[&CompiledPolicy],
    url: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    step: TimeDelta,
    limits: crate::source::prometheus::AnswerLimits,
) -> Result<crate::source::history::History, CliError> {
    use crate::source::prometheus::{PrometheusConfig, PrometheusSource};
    let source = PrometheusSource::new(&PrometheusConfig {
        url: url.to_string(),
        timeout: std::time::Duration::from_secs(120),
        limits,
        url_setting: "--prometheus".into(),
        ..PrometheusConfig::default()
    })
    .map_err(|e| CliError::Config(e.to_string()))?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} steps read")
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let history = runtime()?.block_on(crate::source::history::read(
        &source,
        policies,
        from,
        to,
        step,
        &mut |metric, done, total| {
            bar.set_message(metric.to_string());
            bar.set_length(total.max(0) as u64);
            bar.set_position(done.max(0) as u64);
        },
    ));
    bar.finish_and_clear();
    let history = history.map_err(|e| CliError::Config(format!("--prometheus {url}: {e}")))?;
    if history.trace.times.is_empty() {
        let names: Vec<&str> = policies.iter().map(|p| p.name.as_str()).collect();
        return Err(CliError::Config(format!(
            "--prometheus {url}: no samples for the metrics of {} between {from} and {to}",
            names.join(" and ")
        )));
    }
    Ok(history)
}

fn run_with_progress(
    policy: &CompiledPolicy,
    trace: &Trace,
    config: &BacktestConfig,
) -> Result<Run, CliError> {
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} evaluations ({eta})",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(policy.name.clone());
        Some(bar)
    } else {
        None
    };
    let result = run(policy, trace, config, &mut |done, total| {
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(done);
        }
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(result?)
}

fn write_table(
    trace: &Trace,
    args: &BacktestArgs,
    runs: &[&Run],
    out: &mut dyn Write,
) -> std::io::Result<()> {
    for (label, value) in setup_lines(trace, args, &runs[0].summary) {
        writeln!(out, "{label:<10}{value}")?;
    }
    writeln!(out)?;
    let summaries: Vec<&Summary> = runs.iter().map(|r| &r.summary).collect();
    let rows = summary_rows(&summaries);
    let width = runs
        .iter()
        .map(|r| r.summary.policy.len())
        .max()
        .unwrap_or(0)
        .max(24);
    for (label, values) in rows {
        write!(out, "{label:<22}")?;
        for v in values {
            write!(out, "  {v:<width$}")?;
        }
        writeln!(out)?;
    }
    if let Some(capacity) = args.capacity {
        for r in runs {
            write_violations(&r.summary, capacity, out)?;
        }
    }
    if let [ours, baseline, ..] = runs {
        writeln!(out, "\n{}", verdict(&ours.summary, &baseline.summary))?;
    }
    Ok(())
}

/// When each run was short of capacity: the first [`LISTED_VIOLATIONS`] stretches (JSON has
/// them all).
fn write_violations(s: &Summary, capacity: f64, out: &mut dyn Write) -> std::io::Result<()> {
    if s.slo_violations.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "\nSLO violations of {}: {} stretches",
        s.policy,
        s.slo_violations.len()
    )?;
    for v in s.slo_violations.iter().take(LISTED_VIOLATIONS) {
        writeln!(out, "  {}", v.describe(capacity))?;
    }
    if let Some(more) = s.slo_violations.len().checked_sub(LISTED_VIOLATIONS)
        && more > 0
    {
        writeln!(out, "  … and {more} more (--format json lists them all)")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_daemon_flag_has_an_environment_variable() {
        let cli = Cli::command();
        let command = cli.find_subcommand("run").unwrap();
        let missing: Vec<String> = command
            .get_arguments()
            .filter(|a| a.get_long().is_some() && a.get_env().is_none())
            .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
            .map(|a| format!("--{}", a.get_long().unwrap_or_default()))
            .collect();
        assert!(missing.is_empty(), "kscale run: {missing:?} lack `env`");
    }

    #[test]
    fn log_colours_only_on_a_terminal_without_no_color() {
        assert!(log_colours(true, None));
        assert!(
            !log_colours(false, None),
            "a file or a pipe gets no colour codes"
        );
        assert!(!log_colours(true, Some("1".into())));
        // NO_COLOR set but empty does not count (no-color.org).
        assert!(log_colours(true, Some("".into())));
    }
}
