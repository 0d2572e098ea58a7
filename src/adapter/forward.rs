//! Forwarding to another external metrics provider (`--external-metrics-upstream`).
//!
//! Only one APIService can own `v1beta1.external.metrics.k8s.io`. With an upstream, kscale owns
//! it and passes every request for a name it does not serve to the provider that owned it
//! before (KEDA's metrics server, prometheus-adapter, a vendor's), so both run side by side.
//!
//! # Which names stay in the process
//!
//! A metric request is answered by kscale, never forwarded, when its name is kscale's:
//!
//! - a static rule's name (`--external-rules`), or a name the cache holds for that namespace
//!   (a policy's `<policy>-<metric>` or `<policy>-desired-replicas`, once evaluated);
//! - a name a ScalingPolicy of that namespace publishes but that is not evaluated yet: the
//!   policy exists in the controller's store ([`SyncedPolicies`]) and the name is
//!   `<policy>-desired-replicas` or `<policy>-<metric>` for one of its `spec.metrics` (any
//!   `<policy>-...` name for a policy that does not parse). It answers 404 until evaluated.
//!
//! Before the ScalingPolicy store has synced (the first second after a start) kscale cannot tell
//! the two apart, and an unknown name answers 503 instead of being forwarded. Everything else
//! goes to the upstream.
//!
//! # What is forwarded
//!
//! The caller is authenticated and authorized by kscale first (as for its own names); the
//! upstream is then called as kscale itself (`--external-metrics-upstream-ca-file`, a client
//! certificate or a bearer token file, re-read on each request), never with the caller's
//! credentials or user headers. The request is `GET <upstream>/apis/external.metrics.k8s.io/
//! v1beta1/namespaces/<ns>/<metric>?<query>`: the query string (`labelSelector`,
//! `metricSelector`) is passed byte for byte, the path segments only when they cannot name
//! another path (the namespace is a DNS label; the metric has no `/`, `%`, `?`, `#` and is not
//! `.` or `..`), and the caller's `Accept` header is kept. The answer is relayed unchanged:
//! status, body and `Content-Type`.
//!
//! The upstream is bounded like a Prometheus: one pooled client keeps its TLS connections open
//! across requests, redirects are not followed, a request is bounded by
//! `--external-metrics-upstream-timeout` (connection included), and the body is read in chunks
//! up to `--external-metrics-upstream-max-response-bytes` (the code that reads Prometheus
//! answers, [`crate::source::prometheus`]). When the upstream does not answer (connection
//! refused, timeout, an answer over the cap, a TLS or body error), its names answer 503, the
//! failure is logged once, again every five minutes while it lasts, and at the recovery,
//! and `kscale_external_metrics_forwarded_total{outcome}` counts it. The caller never sees the
//! upstream's error text.
//!
//! # Discovery
//!
//! `/apis/external.metrics.k8s.io/v1beta1` lists kscale's names and, after them, the resources
//! of the upstream's own list whose names kscale does not serve. The upstream's list is read in
//! the background at most every [`DISCOVERY_REFRESH`] and never waited for: discovery answers
//! from memory, so an upstream that hangs cannot make kube-apiserver mark the APIService
//! unavailable (which would fail kscale's own names too). A failed read drops the upstream's
//! names from the list until the next read succeeds.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap};
use hyper::{Response, StatusCode};
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{ObjectRef, Store};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tracing::{info, warn};

use super::cache::DESIRED_REPLICAS;
use super::types::GROUP_VERSION;
use crate::crd::ScalingPolicy;
use crate::source::prometheus::{self as prom, ClientTls, CredentialFlags, Material, SourceError};
use crate::telemetry::ForwardLabels;

/// The flag that names the upstream.
pub const UPSTREAM_FLAG: &str = "--external-metrics-upstream";
/// The flag of the upstream timeout.
pub const TIMEOUT_FLAG: &str = "--external-metrics-upstream-timeout";

/// The upstream's credential and cap flags, named in their errors.
pub const UPSTREAM_FLAGS: CredentialFlags = CredentialFlags {
    ca: "--external-metrics-upstream-ca-file",
    client_cert: "--external-metrics-upstream-client-cert-file",
    client_key: "--external-metrics-upstream-client-key-file",
    bearer_token: "--external-metrics-upstream-bearer-token-file",
    max_bytes: "--external-metrics-upstream-max-response-bytes",
};

/// Default of `--external-metrics-upstream-timeout`, that of `--prometheus-timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the upstream's resource list is read again for discovery.
pub const DISCOVERY_REFRESH: Duration = Duration::from_secs(30);

/// `kscale run` flags of the upstream provider (all but the URL need the URL).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct UpstreamArgs {
    /// Forward every external metric kscale does not serve to this external metrics provider,
    /// for example `https://keda-operator-metrics-apiserver.keda:443` (https only; a path prefix
    /// is kept). kscale then owns the APIService beside it. Off when unset.
    #[arg(long, env = "KSCALE_EXTERNAL_METRICS_UPSTREAM")]
    pub external_metrics_upstream: Option<String>,
    /// PEM CA bundle that verifies the upstream's serving certificate (default: the system
    /// roots).
    #[arg(
        long,
        env = "KSCALE_EXTERNAL_METRICS_UPSTREAM_CA_FILE",
        requires = "external_metrics_upstream"
    )]
    pub external_metrics_upstream_ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate kscale presents to the upstream.
    #[arg(
        long,
        env = "KSCALE_EXTERNAL_METRICS_UPSTREAM_CLIENT_CERT_FILE",
        requires_all = ["external_metrics_upstream", "external_metrics_upstream_client_key_file"]
    )]
    pub external_metrics_upstream_client_cert_file: Option<std::path::PathBuf>,
    /// PEM key of the client certificate.
    #[arg(
        long,
        env = "KSCALE_EXTERNAL_METRICS_UPSTREAM_CLIENT_KEY_FILE",
        requires_all = ["external_metrics_upstream", "external_metrics_upstream_client_cert_file"]
    )]
    pub external_metrics_upstream_client_key_file: Option<std::path::PathBuf>,
    /// A file holding the bearer token kscale sends to the upstream (re-read on every request,
    /// so a rotated projected token is picked up).
    #[arg(
        long,
        env = "KSCALE_EXTERNAL_METRICS_UPSTREAM_BEARER_TOKEN_FILE",
        requires = "external_metrics_upstream"
    )]
    pub external_metrics_upstream_bearer_token_file: Option<std::path::PathBuf>,
    /// Bound on one upstream request, connection included (Go-style duration).
    #[arg(long, env = "KSCALE_EXTERNAL_METRICS_UPSTREAM_TIMEOUT",
          value_parser = crate::units::parse_std_duration)]
    pub external_metrics_upstream_timeout: Option<Duration>,
    /// The largest upstream answer read, in bytes (default that of
    /// --prometheus-max-response-bytes, 8 MiB); reading stops there and the request is a 503.
    #[arg(long, env = "KSCALE_EXTERNAL_METRICS_UPSTREAM_MAX_RESPONSE_BYTES",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub external_metrics_upstream_max_response_bytes: Option<u64>,
}

/// An upstream setting that cannot be used; each message starts with the flag at fault.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The URL does not parse, is not https, or carries what it must not.
    #[error("{UPSTREAM_FLAG} {url}: {message}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// A zero timeout.
    #[error("{TIMEOUT_FLAG}: must be greater than 0")]
    Timeout,
    /// A credential file.
    #[error(transparent)]
    Credential(#[from] SourceError),
    /// The HTTP client could not be built.
    #[error("{UPSTREAM_FLAG} {url}: cannot build the HTTP client: {message}")]
    Client {
        /// The URL.
        url: String,
        /// The error.
        message: String,
    },
}

/// The controller's ScalingPolicy store once it has synced (empty until then), shared with the
/// adapter so that it knows the names policies publish before they are evaluated.
#[derive(Clone, Default)]
pub struct SyncedPolicies(Arc<RwLock<Option<Store<DeserializeGuard<ScalingPolicy>>>>>);

impl SyncedPolicies {
    /// Records the synced store (the controller, after its first sync).
    pub fn set(&self, store: Store<DeserializeGuard<ScalingPolicy>>) {
        match self.0.write() {
            Ok(mut s) => *s = Some(store),
            Err(poisoned) => *poisoned.into_inner() = Some(store),
        }
    }

    fn store(&self) -> Option<Store<DeserializeGuard<ScalingPolicy>>> {
        match self.0.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// Which names are kscale's beyond those it serves right now: the seam between the forwarder
/// and the controller's ScalingPolicy store.
pub trait Owners: Send + Sync {
    /// `Some(true)` when a ScalingPolicy of `namespace` publishes `metric`, `Some(false)` when
    /// none does, `None` while that is not known yet (the store has not synced).
    fn owns(&self, namespace: &str, metric: &str) -> Option<bool>;
}

impl Owners for SyncedPolicies {
    fn owns(&self, namespace: &str, metric: &str) -> Option<bool> {
        let store = self.store()?;
        // `<policy>-<metric>`: a policy's name may hold `-`, so try each split.
        for (at, _) in metric.match_indices('-') {
            let (policy, suffix) = (&metric[..at], &metric[at + 1..]);
            let Some(p) = store.get(&ObjectRef::new(policy).within(namespace)) else {
                continue;
            };
            let published = match &p.0 {
                Ok(sp) => {
                    suffix == DESIRED_REPLICAS || sp.spec.metrics.iter().any(|m| m.name == suffix)
                }
                // A policy that does not parse publishes its names as unavailable.
                Err(_) => true,
            };
            if published {
                return Some(true);
            }
        }
        Some(false)
    }
}

/// How one forwarded request ended, for `kscale_external_metrics_forwarded_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answer, relayed.
    Ok,
    /// Any other answer, relayed.
    HttpError,
    /// No answer: the connection failed.
    Connect,
    /// No answer within the timeout.
    Timeout,
    /// An answer over the byte cap.
    Limit,
    /// No usable answer otherwise (TLS, a broken body, the token file).
    Error,
}

impl Outcome {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::HttpError => "http_error",
            Outcome::Connect => "connect",
            Outcome::Timeout => "timeout",
            Outcome::Limit => "limit",
            Outcome::Error => "error",
        }
    }

    /// The upstream gave no answer.
    pub fn is_failure(self) -> bool {
        !matches!(self, Outcome::Ok | Outcome::HttpError)
    }

    fn from_kind(kind: &str) -> Outcome {
        match kind {
            "timeout" => Outcome::Timeout,
            "connect" => Outcome::Connect,
            "limit" => Outcome::Limit,
            _ => Outcome::Error,
        }
    }

    /// What a caller is told (never the upstream's error text).
    fn describe(self) -> &'static str {
        match self {
            Outcome::Connect => "the connection failed",
            Outcome::Timeout => "no answer within the timeout",
            Outcome::Limit => "the answer is over the size cap",
            Outcome::Ok | Outcome::HttpError | Outcome::Error => "no usable answer",
        }
    }
}

/// An upstream answer, as relayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The HTTP status.
    pub status: StatusCode,
    /// The `Content-Type`, if any.
    pub content_type: Option<hyper::header::HeaderValue>,
    /// The body.
    pub body: Vec<u8>,
}

/// No answer: why, in full (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The kind.
    pub outcome: Outcome,
    /// The error text, for the daemon's log.
    pub message: String,
}

/// How long a failing upstream stays quiet in the log: one line when it starts failing, one
/// every this long while it keeps failing, one when it answers again.
pub const LOG_AGAIN_AFTER: Duration = Duration::from_secs(300);

/// An upstream failing since the last log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Failing {
    logged_at: Instant,
    /// Failures since that line.
    quiet: u64,
}

/// A log line about the upstream's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HealthLine {
    /// It started failing.
    Failing,
    /// It still fails, with this many failures since the last line.
    StillFailing(u64),
    /// It answers again.
    Recovered,
}

/// The line to log (if any) for one request's `failed` (or not) at `now`, updating `state`.
fn health_line(state: &mut Option<Failing>, failed: bool, now: Instant) -> Option<HealthLine> {
    match (state.as_mut(), failed) {
        (None, true) => {
            *state = Some(Failing {
                logged_at: now,
                quiet: 0,
            });
            Some(HealthLine::Failing)
        }
        (Some(f), true) if now.duration_since(f.logged_at) >= LOG_AGAIN_AFTER => {
            let quiet = f.quiet;
            *f = Failing {
                logged_at: now,
                quiet: 0,
            };
            Some(HealthLine::StillFailing(quiet))
        }
        (Some(f), true) => {
            f.quiet += 1;
            None
        }
        (Some(_), false) => {
            *state = None;
            Some(HealthLine::Recovered)
        }
        (None, false) => None,
    }
}

/// The upstream's resources last read for discovery.
#[derive(Default)]
struct Discovery {
    resources: Vec<serde_json::Value>,
    read_at: Option<Instant>,
    refreshing: bool,
}

/// The forwarding half of the adapter: one pooled client to the upstream.
pub struct Forwarder {
    http: reqwest::Client,
    /// `https://host[:port][/prefix]`, no trailing `/`.
    base: String,
    token: Option<Material>,
    timeout: Duration,
    max_bytes: u64,
    owners: Arc<dyn Owners>,
    counter: Family<ForwardLabels, Counter>,
    /// Since when the upstream fails, as logged (`None` while it answers).
    failing: Mutex<Option<Failing>>,
    discovery: Mutex<Discovery>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

const PREFIX: &str = "/apis/external.metrics.k8s.io/v1beta1";

/// A DNS-1123 label, what a namespace name is.
fn is_namespace(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A metric name that is one path segment as written (RFC 3986 `pchar`s without `%`), and not
/// `.` or `..`, so it cannot reach another upstream path: the names the HPA accepts (no `/` or
/// `%`) and those providers generate (KEDA's `s0-...`, Prometheus' `a_b:c`, Datadog's
/// `datadogmetric@ns:name`).
fn is_metric_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&c))
}

/// The upstream base URL from the flag: https, a host, no credentials, query or fragment; the
/// path prefix without its trailing `/`.
fn base_url(url: &str) -> Result<String, ForwardError> {
    let bad = |message: String| ForwardError::Url {
        url: url.to_string(),
        message,
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    if parsed.scheme() != "https" {
        return Err(bad(format!(
            "scheme {:?} is not https (an external metrics provider serves TLS)",
            parsed.scheme()
        )));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host".into()));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad(format!(
            "credentials belong in {} or {}, not in the URL",
            UPSTREAM_FLAGS.bearer_token, UPSTREAM_FLAGS.client_cert
        )));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(bad("a query or fragment is not allowed".into()));
    }
    Ok(parsed.as_str().trim_end_matches('/').to_string())
}

impl Forwarder {
    /// The forwarder the flags describe (`None` without `--external-metrics-upstream`): checks
    /// the URL, reads the CA and client certificate and checks the token file once.
    pub fn new(
        args: &UpstreamArgs,
        owners: Arc<dyn Owners>,
        counter: Family<ForwardLabels, Counter>,
    ) -> Result<Option<Forwarder>, ForwardError> {
        let Some(url) = &args.external_metrics_upstream else {
            return Ok(None);
        };
        let base = base_url(url)?;
        let timeout = args
            .external_metrics_upstream_timeout
            .unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() {
            return Err(ForwardError::Timeout);
        }
        let file = |p: &Option<std::path::PathBuf>| p.clone().map(Material::File);
        let (ca, cert, key) = (
            file(&args.external_metrics_upstream_ca_file),
            file(&args.external_metrics_upstream_client_cert_file),
            file(&args.external_metrics_upstream_client_key_file),
        );
        let tls = prom::client_tls(
            ClientTls {
                ca: ca.as_ref(),
                client_cert: cert.as_ref(),
                client_key: key.as_ref(),
            },
            &UPSTREAM_FLAGS,
            UPSTREAM_FLAG,
            url,
        )?;
        let token = file(&args.external_metrics_upstream_bearer_token_file);
        if let Some(m) = &token {
            let t = prom::read_token(m, UPSTREAM_FLAGS.bearer_token)?;
            prom::bearer_header(m, &t, UPSTREAM_FLAGS.bearer_token)?;
        }
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .https_only(true)
            // A redirect would take the request (and kscale's credentials) elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| ForwardError::Client {
                url: url.clone(),
                message: prom::error_chain(&e),
            })?;
        Ok(Some(Forwarder {
            http,
            base,
            token,
            timeout,
            max_bytes: args
                .external_metrics_upstream_max_response_bytes
                .unwrap_or(prom::DEFAULT_MAX_RESPONSE_BYTES),
            owners,
            counter,
            failing: Mutex::new(None),
            discovery: Mutex::new(Discovery::default()),
        }))
    }

    /// The upstream's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Answers a request for `metric` in `namespace` that kscale does not serve right now:
    /// `None` when the name is kscale's all the same (answer it locally), else the upstream's
    /// answer or why there is none. `query` is the raw query string.
    pub async fn metric(
        &self,
        namespace: &str,
        metric: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Option<Response<Full<Bytes>>> {
        if !is_namespace(namespace) {
            return Some(super::failure(
                400,
                format!("namespace {namespace:?} is not a valid namespace name"),
            ));
        }
        if !is_metric_segment(metric) {
            return Some(super::failure(
                400,
                format!(
                    "external metric name {metric:?}: only names without '/', '%', '?', '#' or \
                     spaces, other than '.' and '..', are forwarded to {UPSTREAM_FLAG}"
                ),
            ));
        }
        match self.owners.owns(namespace, metric) {
            Some(true) => return None,
            Some(false) => {}
            None => {
                return Some(super::failure(
                    503,
                    format!(
                        "external metric {metric:?}: kscale has not read its ScalingPolicies yet, \
                         so it cannot tell whether to forward this name; retry in a moment"
                    ),
                ));
            }
        }
        let mut path = format!("{PREFIX}/namespaces/{namespace}/{metric}");
        if let Some(q) = query {
            path.push('?');
            path.push_str(q);
        }
        let result = self.get(&path, headers.get(ACCEPT)).await;
        let outcome = self.note("metric", &result);
        Some(match result {
            Ok(answer) => relay(answer),
            Err(_) => super::failure(
                503,
                format!(
                    "external metric {metric:?} is served by the upstream provider \
                     ({UPSTREAM_FLAG}), which gave no answer: {}",
                    outcome.describe()
                ),
            ),
        })
    }

    /// The upstream's resources for discovery, from memory; starts a background read when the
    /// last is older than [`DISCOVERY_REFRESH`].
    pub fn resources(self: &Arc<Self>) -> Vec<serde_json::Value> {
        let mut d = lock(&self.discovery);
        if !d.refreshing && d.read_at.is_none_or(|t| t.elapsed() >= DISCOVERY_REFRESH) {
            d.refreshing = true;
            let this = self.clone();
            tokio::spawn(async move {
                let resources = this.read_resources().await;
                let mut d = lock(&this.discovery);
                d.resources = resources;
                d.read_at = Some(Instant::now());
                d.refreshing = false;
            });
        }
        d.resources.clone()
    }

    /// One read of the upstream's resource list: the entries with a forwardable name, or none
    /// when it fails.
    async fn read_resources(&self) -> Vec<serde_json::Value> {
        let result = self.get(PREFIX, None).await;
        let outcome = self.note("discovery", &result);
        let Ok(answer) = result else {
            return Vec::new();
        };
        if outcome != Outcome::Ok {
            warn!(upstream = %self.base, status = %answer.status, "external metrics upstream: its resource list is not available; discovery lists kscale's names only");
            return Vec::new();
        }
        match serde_json::from_slice::<serde_json::Value>(&answer.body) {
            Ok(list) => list["resources"]
                .as_array()
                .map(|rs| {
                    rs.iter()
                        .filter(|r| r["name"].as_str().is_some_and(is_metric_segment))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default(),
            Err(e) => {
                warn!(upstream = %self.base, error = %e, "external metrics upstream: its resource list is not JSON; discovery lists kscale's names only");
                Vec::new()
            }
        }
    }

    /// `GET <base><path_and_query>` as kscale, bounded in time and size.
    async fn get(
        &self,
        path_and_query: &str,
        accept: Option<&hyper::header::HeaderValue>,
    ) -> Result<Answer, Failure> {
        let fail = |outcome: Outcome, message: String| Failure { outcome, message };
        let mut request = self.http.get(format!("{}{path_and_query}", self.base));
        if let Some(a) = accept {
            request = request.header(ACCEPT, a.clone());
        }
        if let Some(m) = &self.token {
            let flag = UPSTREAM_FLAGS.bearer_token;
            let header = prom::read_token(m, flag)
                .and_then(|t| prom::bearer_header(m, &t, flag))
                .map_err(|e| fail(Outcome::Error, e.to_string()))?;
            request = request.header(AUTHORIZATION, header);
        }
        let max = self.max_bytes;
        let exchange = async {
            let response = request.send().await.map_err(|e| {
                let outcome = if e.is_timeout() {
                    Outcome::Timeout
                } else if e.is_connect() {
                    Outcome::Connect
                } else {
                    Outcome::Error
                };
                fail(outcome, prom::error_chain(&e))
            })?;
            let status = response.status();
            let content_type = response.headers().get(CONTENT_TYPE).cloned();
            let body = prom::read_capped(response, max, UPSTREAM_FLAGS.max_bytes)
                .await
                .map_err(|e| fail(Outcome::from_kind(e.kind), e.message))?;
            Ok(Answer {
                status: StatusCode::from_u16(status.as_u16())
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                content_type,
                body,
            })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(fail(
                Outcome::Timeout,
                format!(
                    "no answer within the {:?} timeout ({TIMEOUT_FLAG})",
                    self.timeout
                ),
            )),
        }
    }

    /// Counts one request; logs the upstream's failure once, again every [`LOG_AGAIN_AFTER`]
    /// while it lasts, and its recovery.
    fn note(&self, request: &str, result: &Result<Answer, Failure>) -> Outcome {
        let outcome = match result {
            Ok(a) if a.status.is_success() => Outcome::Ok,
            Ok(_) => Outcome::HttpError,
            Err(f) => f.outcome,
        };
        self.counter
            .get_or_create(&ForwardLabels {
                request: request.to_string(),
                outcome: outcome.as_str().to_string(),
            })
            .inc();
        let line = health_line(&mut lock(&self.failing), result.is_err(), Instant::now());
        match (line, result) {
            (Some(HealthLine::Failing), Err(f)) => {
                warn!(upstream = %self.base, outcome = outcome.as_str(), error = %f.message,
                    "external metrics upstream gave no answer; its metrics answer 503 until it does (logged again every 5 minutes while it lasts)");
            }
            (Some(HealthLine::StillFailing(quiet)), Err(f)) => {
                warn!(upstream = %self.base, outcome = outcome.as_str(), error = %f.message, failures_since_last_line = quiet,
                    "external metrics upstream still gives no answer; its metrics answer 503");
            }
            (Some(HealthLine::Recovered), _) => {
                info!(upstream = %self.base, "external metrics upstream answers again");
            }
            _ => {}
        }
        outcome
    }
}

/// The upstream's answer as kscale's: the same status, `Content-Type` and body.
fn relay(answer: Answer) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(answer.body)));
    *r.status_mut() = answer.status;
    if let Some(ct) = answer.content_type {
        r.headers_mut().insert(CONTENT_TYPE, ct);
    }
    r
}

/// The discovery entries of `own` names, then `upstream`'s entries for names not among them.
pub fn merge_resources(own: &[String], upstream: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    let mut out: Vec<serde_json::Value> = own
        .iter()
        .map(|n| {
            serde_json::json!({"name": n, "singularName": "", "namespaced": true,
                "kind": "ExternalMetricValueList", "verbs": ["get"]})
        })
        .collect();
    let mut seen: std::collections::HashSet<String> = own.iter().cloned().collect();
    for r in upstream {
        if let Some(name) = r["name"].as_str()
            && seen.insert(name.to_string())
        {
            out.push(r);
        }
    }
    out
}

/// The resource list answered for discovery, of `resources`.
pub fn resource_list(resources: Vec<serde_json::Value>) -> serde_json::Value {
    serde_json::json!({
        "kind": "APIResourceList", "apiVersion": "v1",
        "groupVersion": GROUP_VERSION, "resources": resources
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_that_could_reach_another_path_are_refused() {
        for ok in [
            "foreign-metric",
            "s0-prometheus-http_requests_total",
            "job:requests:rate5m",
            "datadogmetric@default:queue",
            "A.b~c",
        ] {
            assert!(is_metric_segment(ok), "{ok}");
        }
        for bad in [
            "", ".", "..", "a/b", "a%2Fb", "%2e%2e", "a?b", "a#b", "a b", "a\\b", "é",
        ] {
            assert!(!is_metric_segment(bad), "{bad:?}");
        }
        for ok in ["default", "team-a", "a", "x1"] {
            assert!(is_namespace(ok), "{ok}");
        }
        for bad in ["", "..", "Team", "-a", "a-", "a.b", "a_b", &"a".repeat(64)] {
            assert!(!is_namespace(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_upstream_url_is_https_without_credentials_and_keeps_its_prefix() {
        assert_eq!(
            base_url("https://keda-metrics.keda:443/").unwrap(),
            "https://keda-metrics.keda"
        );
        assert_eq!(
            base_url("https://10.0.0.1:6443/proxy/x/").unwrap(),
            "https://10.0.0.1:6443/proxy/x"
        );
        for (url, says) in [
            ("http://keda:80", "not https"),
            (
                "https://user:pw@keda",
                "--external-metrics-upstream-bearer-token-file",
            ),
            ("https://keda/?a=b", "query"),
            ("keda:443", "not https"),
            ("https://", "empty host"),
        ] {
            let e = base_url(url).unwrap_err().to_string();
            assert!(e.starts_with(UPSTREAM_FLAG), "{url}: {e}");
            assert!(e.contains(says), "{url}: {e}");
        }
    }

    #[test]
    fn discovery_lists_kscales_names_then_the_upstreams_others() {
        let upstream = vec![
            serde_json::json!({"name": "s0-queue", "namespaced": true, "kind": "ExternalMetricValueList", "verbs": ["get"]}),
            serde_json::json!({"name": "web-queue", "kind": "theirs"}),
            serde_json::json!({"name": "s0-queue", "kind": "again"}),
        ];
        let merged = merge_resources(&["web-queue".into(), "xm-total".into()], upstream);
        let names: Vec<&str> = merged.iter().filter_map(|r| r["name"].as_str()).collect();
        assert_eq!(names, ["web-queue", "xm-total", "s0-queue"]);
        assert_eq!(
            merged[0]["kind"], "ExternalMetricValueList",
            "kscale's entry wins"
        );
        assert_eq!(
            merged[2]["namespaced"], true,
            "the upstream's entry is kept as given"
        );
    }

    struct Nobody;
    impl Owners for Nobody {
        fn owns(&self, _: &str, _: &str) -> Option<bool> {
            Some(false)
        }
    }

    fn forwarder(counter: Family<ForwardLabels, Counter>) -> Forwarder {
        let args = UpstreamArgs {
            external_metrics_upstream: Some("https://127.0.0.1:1".into()),
            ..UpstreamArgs::default()
        };
        Forwarder::new(&args, Arc::new(Nobody), counter)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn a_failing_upstream_is_logged_once_then_every_few_minutes_and_at_recovery() {
        let t0 = Instant::now();
        let mut state = None;
        let mut at = |failed: bool, secs: u64| {
            health_line(&mut state, failed, t0 + Duration::from_secs(secs))
        };
        assert_eq!(at(false, 0), None);
        assert_eq!(at(true, 1), Some(HealthLine::Failing));
        assert_eq!(at(true, 2), None);
        assert_eq!(at(true, 300), None);
        assert_eq!(at(true, 301), Some(HealthLine::StillFailing(2)));
        assert_eq!(at(true, 302), None);
        assert_eq!(at(false, 303), Some(HealthLine::Recovered));
        assert_eq!(at(false, 304), None);
        assert_eq!(at(true, 305), Some(HealthLine::Failing));
    }

    #[test]
    fn failures_are_counted_each_time() {
        let counter = Family::<ForwardLabels, Counter>::default();
        let f = forwarder(counter.clone());
        let count = |request: &str, outcome: &str| {
            counter
                .get_or_create(&ForwardLabels {
                    request: request.into(),
                    outcome: outcome.into(),
                })
                .get()
        };
        let failed = |outcome| {
            Err(Failure {
                outcome,
                message: "boom".into(),
            })
        };
        let answer = |code: u16| {
            Ok(Answer {
                status: StatusCode::from_u16(code).unwrap(),
                content_type: None,
                body: Vec::new(),
            })
        };
        assert_eq!(
            f.note("metric", &failed(Outcome::Connect)),
            Outcome::Connect
        );
        f.note("metric", &failed(Outcome::Connect));
        f.note("discovery", &failed(Outcome::Timeout));
        assert_eq!(lock(&f.failing).map(|s| s.quiet), Some(2));
        assert_eq!(f.note("metric", &answer(404)), Outcome::HttpError);
        assert_eq!(*lock(&f.failing), None, "any answer is a recovery");
        assert_eq!(f.note("metric", &answer(200)), Outcome::Ok);
        assert_eq!(
            (
                count("metric", "connect"),
                count("discovery", "timeout"),
                count("metric", "http_error"),
                count("metric", "ok"),
                count("metric", "limit"),
            ),
            (2, 1, 1, 1, 0)
        );
    }

    #[test]
    fn a_zero_timeout_and_missing_credential_files_name_their_flag() {
        let counter = Family::<ForwardLabels, Counter>::default();
        let new = |args: UpstreamArgs| {
            Forwarder::new(&args, Arc::new(Nobody), counter.clone())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let base = || UpstreamArgs {
            external_metrics_upstream: Some("https://keda:443".into()),
            ..UpstreamArgs::default()
        };
        assert!(
            new(UpstreamArgs {
                external_metrics_upstream_timeout: Some(Duration::ZERO),
                ..base()
            })
            .starts_with(TIMEOUT_FLAG)
        );
        let missing = std::path::PathBuf::from("/nonexistent/kscale-test");
        assert!(
            new(UpstreamArgs {
                external_metrics_upstream_ca_file: Some(missing.clone()),
                ..base()
            })
            .starts_with(UPSTREAM_FLAGS.ca)
        );
        assert!(
            new(UpstreamArgs {
                external_metrics_upstream_bearer_token_file: Some(missing),
                ..base()
            })
            .starts_with(UPSTREAM_FLAGS.bearer_token)
        );
        let none = Forwarder::new(&UpstreamArgs::default(), Arc::new(Nobody), counter.clone());
        assert!(matches!(none, Ok(None)), "no upstream, no forwarder");
    }

    fn guard(json: serde_json::Value) -> Arc<DeserializeGuard<ScalingPolicy>> {
        Arc::new(serde_json::from_value(json).unwrap())
    }

    #[test]
    fn names_the_namespaces_policies_publish_stay_with_kscale() {
        use kube::runtime::watcher::Event;
        let policies = SyncedPolicies::default();
        assert_eq!(policies.owns("ns", "web-queue"), None, "not synced yet");
        let (reader, mut writer) = kube::runtime::reflector::store();
        let meta = |name: &str| serde_json::json!({"name": name, "namespace": "ns"});
        writer.apply_watcher_event(&Event::Apply(
            (*guard(serde_json::json!({
                "apiVersion": "kscale.dev/v1alpha1", "kind": "ScalingPolicy",
                "metadata": meta("web-api"),
                "spec": {
                    "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                    "minReplicas": 1, "maxReplicas": 3,
                    "metrics": [{"name": "queue", "prometheus": {"query": "up"},
                                 "target": {"type": "Value", "value": "1"}}]
                }
            })))
            .clone(),
        ));
        writer.apply_watcher_event(&Event::Apply(
            (*guard(serde_json::json!({
                "apiVersion": "kscale.dev/v1alpha1", "kind": "ScalingPolicy",
                "metadata": meta("broken"),
                "spec": {"metrics": "not a list"}
            })))
            .clone(),
        ));
        policies.set(reader);
        for (name, owned) in [
            ("web-api-queue", true),
            ("web-api-desired-replicas", true),
            ("web-api-other", false),
            ("web-queue", false),
            ("broken-anything", true),
            ("foreign-metric", false),
            ("web", false),
        ] {
            assert_eq!(policies.owns("ns", name), Some(owned), "{name}");
        }
        assert_eq!(
            policies.owns("other", "web-api-queue"),
            Some(false),
            "another namespace"
        );
    }
}
