//! Samples from Prometheus instant queries, for the controller's ticks.
//!
//! [`PrometheusSource::query_all`] takes every policy's queries of one tick, sends each distinct
//! query string once (at most [`PrometheusConfig::max_concurrency`] at a time, each bounded by
//! [`PrometheusConfig::timeout`]) and returns one [`Sample`] per distinct string:
//!
//! - an instant vector gives [`Sample::Series`] with one value per returned series, in the order
//!   Prometheus returned them;
//! - a scalar gives a `Series` with its one value;
//! - an empty vector gives [`Sample::Missing`] ("query returned no series");
//! - NaN and ±Inf are passed through as values: the evaluator marks such a metric Invalid and
//!   names the value ([`crate::policy::evaluate`]);
//! - any failure (connection, timeout, HTTP status, PromQL error, a response that is not an
//!   instant vector or scalar) gives [`Sample::Error`] with the error's full text, scrubbed of the
//!   configured credentials. Nothing here ever turns a failure into 0.
//!
//! [`PrometheusSource::query_all_outcomes`] returns the same with each query's latency and a
//! short error kind ([`QueryOutcome`]), for the controller's own metrics.
//!
//! # Timestamps and staleness
//!
//! An instant query's result carries the *evaluation* time for every expression, plain selectors
//! included, not the time of the underlying samples (only `timestamp(metric)` on a plain
//! selector reveals that, and nothing does for aggregations or `rate()`). kscale does not try to
//! reconstruct sample ages from arbitrary PromQL. Freshness comes from Prometheus itself, and
//! is sound for scraped data:
//!
//! - when a target stops exposing a series, its scrape fails, or the target disappears from
//!   service discovery, Prometheus writes a staleness marker at the next scrape, and from then
//!   on instant vector selectors no longer return the series: the query goes empty and the
//!   metric becomes [`Sample::Missing`] within about one scrape interval;
//! - a series without staleness markers (remote-written, federated with honored timestamps, or
//!   across a Prometheus restart) drops out after the lookback delta (`--query.lookback-delta`,
//!   5m by default, which is also kscale's default `fallback.staleAfter`);
//! - range functions (`rate(x[1m])`, `max_over_time(x[10m])`) see only samples within their
//!   window, so their result disappears at most one window after the data stopped: the policy
//!   author chooses that window.
//!
//! [`Sample::Series::timestamp`](crate::model::Sample) is therefore the evaluation time that
//! Prometheus reports (the oldest, if series differ), not our own clock. The evaluator's
//! `fallback.staleAfter` check then catches answers evaluated in the past: a Prometheus whose
//! clock lags, or a caching proxy in front of it returning an old result. An exporter that
//! stopped never stays silently fresh: it goes Missing (see `tests/prometheus_source.rs`).
//!
//! # Credentials
//!
//! A bearer token file is re-read on every [`PrometheusSource::query_all`] call (one small read
//! per tick), so a rotated token (a projected service-account token, for instance) is picked
//! up without a restart. Basic auth and extra headers are fixed at construction.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use prometheus_http_query::response::{Data, PromqlResult};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::Instrument as _;

use crate::model::Sample;

/// The reason given when a query returns no series.
pub const NO_SERIES: &str = "query returned no series";

/// Basic-auth credentials. `Debug` does not show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct BasicAuth {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
}

impl fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BasicAuth")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// A credential: a file named by a flag, or bytes already read (a key of a Secret).
#[derive(Clone, PartialEq, Eq)]
pub enum Material {
    /// A file; the certificate files are read when the source is built, a token file every tick.
    File(PathBuf),
    /// Bytes already in memory; `origin` names them in errors (for example `Secret ns/name key
    /// ca.crt`).
    Bytes {
        /// Where the bytes come from.
        origin: String,
        /// The content.
        data: Vec<u8>,
    },
}

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Material::File(path) => f.debug_tuple("File").field(path).finish(),
            Material::Bytes { origin, .. } => f
                .debug_struct("Bytes")
                .field("origin", origin)
                .finish_non_exhaustive(),
        }
    }
}

impl Material {
    /// `flag path` for a file, the origin otherwise: how errors name this credential.
    fn origin(&self, flag: &str) -> String {
        match self {
            Material::File(path) => format!("{flag} {}", path.display()),
            Material::Bytes { origin, .. } => origin.clone(),
        }
    }

    fn read(&self, flag: &str) -> Result<Vec<u8>, SourceError> {
        match self {
            Material::File(path) => std::fs::read(path).map_err(|source| SourceError::Read {
                origin: self.origin(flag),
                source,
            }),
            Material::Bytes { data, .. } => Ok(data.clone()),
        }
    }
}

/// How to reach Prometheus. The field docs name the command-line flags that set them, which the
/// errors of [`PrometheusSource::new`] name too (or the Secret key the credential came from).
#[derive(Debug, Clone)]
pub struct PrometheusConfig {
    /// `--prometheus-url`: the base URL, e.g. `http://prometheus.monitoring:9090`; a path prefix
    /// (`https://host/prometheus`) is kept.
    pub url: String,
    /// `--prometheus-timeout`: the bound on one query, connection included. It is also sent to
    /// Prometheus as the query's `timeout` so that it stops evaluating too.
    pub timeout: Duration,
    /// `--prometheus-bearer-token-file`: a bearer token; a file is re-read every tick.
    pub bearer_token: Option<Material>,
    /// `--prometheus-basic-auth-user` and `--prometheus-basic-auth-password`.
    pub basic_auth: Option<BasicAuth>,
    /// `--prometheus-ca-file`: PEM certificates that replace the system roots for `https` URLs.
    pub ca: Option<Material>,
    /// `--prometheus-client-cert-file`: PEM client certificate (chain), with `client_key`.
    pub client_cert: Option<Material>,
    /// `--prometheus-client-key-file`: PEM private key of `client_cert`.
    pub client_key: Option<Material>,
    /// `--prometheus-header NAME=VALUE`: extra headers on every request (a tenant ID, say).
    pub headers: Vec<(String, String)>,
    /// `--prometheus-max-concurrency`: distinct queries in flight at once (at least 1).
    pub max_concurrency: usize,
}

impl Default for PrometheusConfig {
    fn default() -> Self {
        PrometheusConfig {
            url: "http://localhost:9090".into(),
            timeout: Duration::from_secs(10),
            bearer_token: None,
            basic_auth: None,
            ca: None,
            client_cert: None,
            client_key: None,
            headers: Vec::new(),
            max_concurrency: 8,
        }
    }
}

/// A setting of [`PrometheusConfig`] that cannot be used. Each message starts with the flag at
/// fault.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The URL does not parse or is not http(s).
    #[error("--prometheus-url {url}: {message}")]
    Url {
        /// The URL, without credentials.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The timeout is zero.
    #[error("--prometheus-timeout: must be greater than 0")]
    Timeout,
    /// The concurrency bound is zero.
    #[error("--prometheus-max-concurrency: must be at least 1")]
    Concurrency,
    /// A file cannot be read.
    #[error("{origin}: cannot read: {source}")]
    Read {
        /// The flag and the file.
        origin: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A credential was read but its content is unusable.
    #[error("{origin}: {message}")]
    Content {
        /// The flag and the file, or the Secret key.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// A client certificate without its key, or a key without its certificate.
    #[error(
        "--prometheus-client-cert-file and --prometheus-client-key-file must be given together"
    )]
    ClientCertPair,
    /// Bearer token and basic auth both set.
    #[error(
        "--prometheus-bearer-token-file and --prometheus-basic-auth-user are mutually exclusive"
    )]
    AuthConflict,
    /// A header that is not a valid HTTP header.
    #[error("--prometheus-header {name}: {message}")]
    Header {
        /// The header name as given.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The TLS settings do not combine (for instance a key that does not match the
    /// certificate).
    #[error("{origin}: {message}")]
    ClientCert {
        /// The certificate's flag and file, or its Secret key.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// The HTTP client could not be built.
    #[error("--prometheus-url {url}: cannot build the HTTP client: {message}")]
    Client {
        /// The URL, without credentials.
        url: String,
        /// The error.
        message: String,
    },
}

/// One query's result with what the controller exports about it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryOutcome {
    /// The sample.
    pub sample: Sample,
    /// Wall time of the request, from sending to the converted result.
    pub duration: Duration,
    /// For [`Sample::Error`]: `timeout`, `connect`, `http`, `promql`, `decode`, `result_type`
    /// or `auth`. `None` otherwise (an empty result is not an error).
    pub error_kind: Option<&'static str>,
}

/// A failed query: a short kind and the full text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryError {
    /// See [`QueryOutcome::error_kind`].
    pub kind: &'static str,
    /// The error text.
    pub message: String,
}

/// Instant-query access to one Prometheus. Cheap to share (`&self` everywhere).
#[derive(Clone)]
pub struct PrometheusSource {
    client: prometheus_http_query::Client,
    timeout: Duration,
    max_concurrency: usize,
    bearer_token: Option<Material>,
    /// Fixed secrets to scrub from error texts (password, header values, URL password).
    secrets: Arc<Vec<String>>,
}

impl fmt::Debug for PrometheusSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrometheusSource")
            .field("url", &strip_userinfo(self.client.base_url().as_str()))
            .field("timeout", &self.timeout)
            .field("max_concurrency", &self.max_concurrency)
            .field("bearer_token", &self.bearer_token)
            .finish_non_exhaustive()
    }
}

const TOKEN_FLAG: &str = "--prometheus-bearer-token-file";

fn read_token(m: &Material) -> Result<String, SourceError> {
    let content = |message: &str| SourceError::Content {
        origin: m.origin(TOKEN_FLAG),
        message: message.into(),
    };
    let token = String::from_utf8(m.read(TOKEN_FLAG)?)
        .map_err(|_| content("not UTF-8 text"))?
        .trim()
        .to_string();
    if token.is_empty() {
        return Err(content("the token is empty"));
    }
    Ok(token)
}

fn bearer_header(m: &Material, token: &str) -> Result<HeaderValue, SourceError> {
    let mut value =
        HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| SourceError::Content {
            origin: m.origin(TOKEN_FLAG),
            message: "the token holds characters not allowed in an HTTP header".into(),
        })?;
    value.set_sensitive(true);
    Ok(value)
}

/// Standard base64 with padding (for the basic-auth header).
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `scheme://user:pass@host/...` → `scheme://host/...`, for every URL in `text`.
fn strip_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == ')')
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => rest = &tail[at + 1..],
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

fn tls_config(cfg: &PrometheusConfig) -> Result<rustls::ClientConfig, SourceError> {
    const CA_FLAG: &str = "--prometheus-ca-file";
    const CERT_FLAG: &str = "--prometheus-client-cert-file";
    const KEY_FLAG: &str = "--prometheus-client-key-file";
    let mut roots = rustls::RootCertStore::empty();
    match &cfg.ca {
        Some(ca) => {
            let bytes = ca.read(CA_FLAG)?;
            let content = |message: String| SourceError::Content {
                origin: ca.origin(CA_FLAG),
                message,
            };
            let mut count = 0;
            for cert in CertificateDer::pem_slice_iter(&bytes) {
                let cert = cert.map_err(|e| content(format!("bad PEM: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| content(format!("bad certificate: {e}")))?;
                count += 1;
            }
            if count == 0 {
                return Err(content("no PEM certificate in it".into()));
            }
        }
        None => {
            // Errors are left out: an http URL needs no roots, and an https one fails with a
            // certificate error naming the problem.
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SourceError::Client {
            url: strip_userinfo(&cfg.url),
            message: e.to_string(),
        })?
        .with_root_certificates(roots);
    match (&cfg.client_cert, &cfg.client_key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let bytes = cert.read(CERT_FLAG)?;
            let certs = CertificateDer::pem_slice_iter(&bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| SourceError::Content {
                    origin: cert.origin(CERT_FLAG),
                    message: format!("bad PEM: {e}"),
                })?;
            if certs.is_empty() {
                return Err(SourceError::Content {
                    origin: cert.origin(CERT_FLAG),
                    message: "no PEM certificate in it".into(),
                });
            }
            let key_bytes = key.read(KEY_FLAG)?;
            let private =
                PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| SourceError::Content {
                    origin: key.origin(KEY_FLAG),
                    message: format!("no usable PEM private key: {e}"),
                })?;
            builder
                .with_client_auth_cert(certs, private)
                .map_err(|e| SourceError::ClientCert {
                    origin: cert.origin(CERT_FLAG),
                    message: format!("does not go with {}: {e}", key.origin(KEY_FLAG)),
                })
        }
        _ => Err(SourceError::ClientCertPair),
    }
}

impl PrometheusSource {
    /// Checks the settings, reads the certificate and token files once, and builds the client.
    /// Every error names the setting at fault.
    pub fn new(cfg: &PrometheusConfig) -> Result<Self, SourceError> {
        let shown_url = strip_userinfo(&cfg.url);
        let parsed = reqwest::Url::parse(&cfg.url).map_err(|e| SourceError::Url {
            url: shown_url.clone(),
            message: e.to_string(),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(SourceError::Url {
                url: shown_url,
                message: format!("scheme {:?} is not http or https", parsed.scheme()),
            });
        }
        if cfg.timeout.is_zero() {
            return Err(SourceError::Timeout);
        }
        if cfg.max_concurrency == 0 {
            return Err(SourceError::Concurrency);
        }
        if cfg.bearer_token.is_some() && cfg.basic_auth.is_some() {
            return Err(SourceError::AuthConflict);
        }
        let mut secrets = Vec::new();
        if let Some(p) = parsed.password() {
            secrets.push(p.to_string());
        }
        let mut headers = HeaderMap::new();
        for (name, value) in &cfg.headers {
            let header_err = |message: String| SourceError::Header {
                name: name.clone(),
                message,
            };
            let hname = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| header_err(format!("bad header name: {e}")))?;
            let mut hvalue = HeaderValue::from_str(value)
                .map_err(|e| header_err(format!("bad header value: {e}")))?;
            hvalue.set_sensitive(true);
            headers.append(hname, hvalue);
            secrets.push(value.clone());
        }
        if let Some(auth) = &cfg.basic_auth {
            let mut value = HeaderValue::from_str(&format!(
                "Basic {}",
                base64(format!("{}:{}", auth.user, auth.password).as_bytes())
            ))
            .map_err(|e| SourceError::Header {
                name: "--prometheus-basic-auth-user".into(),
                message: e.to_string(),
            })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
            secrets.push(auth.password.clone());
        }
        if let Some(m) = &cfg.bearer_token {
            let token = read_token(m)?;
            bearer_header(m, &token)?;
            // A fixed token (not a file) is a fixed secret to scrub from error texts.
            if let Material::Bytes { .. } = m {
                secrets.push(token);
            }
        }
        let tls = tls_config(cfg)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
            .default_headers(headers)
            .build()
            .map_err(|e| SourceError::Client {
                url: shown_url.clone(),
                message: error_chain(&e),
            })?;
        let client =
            prometheus_http_query::Client::from(http, &cfg.url).map_err(|e| SourceError::Url {
                url: shown_url.clone(),
                message: error_chain(&e),
            })?;
        Ok(PrometheusSource {
            client,
            timeout: cfg.timeout,
            max_concurrency: cfg.max_concurrency,
            bearer_token: cfg.bearer_token.clone(),
            secrets: Arc::new(secrets),
        })
    }

    /// Runs every distinct query once and returns one sample per distinct query string.
    pub async fn query_all<'a>(
        &self,
        queries: impl IntoIterator<Item = &'a str>,
    ) -> HashMap<String, Sample> {
        self.query_all_outcomes(queries)
            .await
            .into_iter()
            .map(|(q, o)| (q, o.sample))
            .collect()
    }

    /// Like [`query_all`](Self::query_all), with each query's latency and error kind.
    pub async fn query_all_outcomes<'a>(
        &self,
        queries: impl IntoIterator<Item = &'a str>,
    ) -> HashMap<String, QueryOutcome> {
        let mut seen = HashSet::new();
        // Owned: a stream over borrowed queries would make the future not `Send` (rustc cannot
        // prove the closure general over the borrow's lifetime).
        let distinct: Vec<String> = queries
            .into_iter()
            .filter(|q| seen.insert(*q))
            .map(str::to_string)
            .collect();
        let span = tracing::info_span!("prometheus_tick", distinct_queries = distinct.len());
        async {
            // One token read per tick: a rotated token is picked up at the next tick.
            let token = match &self.bearer_token {
                None => Ok(None),
                Some(m) => read_token(m)
                    .and_then(|t| bearer_header(m, &t).map(|h| Some((h, t))))
                    .map_err(|e| e.to_string()),
            };
            futures::stream::iter(distinct)
                .map(|q: String| {
                    let token = &token;
                    async move {
                        let outcome = match token {
                            Ok(t) => self.run(&q, t.as_ref()).await,
                            Err(message) => QueryOutcome {
                                sample: Sample::Error {
                                    message: message.clone(),
                                },
                                duration: Duration::ZERO,
                                error_kind: Some("auth"),
                            },
                        };
                        (q, outcome)
                    }
                })
                .buffer_unordered(self.max_concurrency)
                .collect::<HashMap<_, _>>()
                .await
        }
        .instrument(span)
        .await
    }

    /// `text` without URL credentials and without any configured secret (basic-auth password,
    /// header values, the current bearer token). Secrets shorter than 3 characters are left
    /// alone: replacing them would garble the text and hide little.
    fn scrub(&self, text: &str, token: Option<&str>) -> String {
        let mut text = strip_userinfo(text);
        for secret in self.secrets.iter().map(String::as_str).chain(token) {
            if secret.len() >= 3 {
                text = text.replace(secret, "<redacted>");
            }
        }
        text
    }

    /// The base URL, without credentials.
    pub fn url(&self) -> String {
        strip_userinfo(self.client.base_url().as_str())
    }

    /// Most steps Prometheus returns for one series of a range query (its limit is 11,000).
    pub const MAX_RANGE_POINTS: i64 = 10_000;

    /// The query's history from `start` to `end` every `step`, summed over series (see
    /// [`parse_range_response`]); a long range is read in chunks of at most
    /// [`Self::MAX_RANGE_POINTS`] steps, and `progress(done, total)` is called after each chunk.
    pub async fn query_range(
        &self,
        query: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        step: chrono::TimeDelta,
        progress: &mut (dyn FnMut(i64, i64) + Send),
    ) -> Result<Vec<(DateTime<Utc>, f64)>, QueryError> {
        let step_ms = step.num_milliseconds();
        if step_ms <= 0 || end < start {
            return Err(QueryError {
                kind: "range",
                message: format!(
                    "a range query needs a positive step and start ≤ end (step {step_ms}ms, {start} → {end})"
                ),
            });
        }
        let token = match &self.bearer_token {
            None => None,
            Some(m) => {
                let t = read_token(m).map_err(|e| QueryError {
                    kind: "auth",
                    message: e.to_string(),
                })?;
                let h = bearer_header(m, &t).map_err(|e| QueryError {
                    kind: "auth",
                    message: e.to_string(),
                })?;
                Some((h, t))
            }
        };
        let total = (end - start).num_milliseconds() / step_ms + 1;
        let mut out = Vec::new();
        let mut done = 0;
        while done < total {
            let n = (total - done).min(Self::MAX_RANGE_POINTS);
            let from = start.timestamp_millis() + done * step_ms;
            let to = from + (n - 1) * step_ms;
            // The client takes whole seconds for start and end; kscale's steps are whole seconds.
            let mut builder = self
                .client
                .query_range(
                    query,
                    from.div_euclid(1000),
                    to.div_euclid(1000),
                    step_ms as f64 / 1000.0,
                )
                .timeout(i64::try_from(self.timeout.as_millis()).unwrap_or(i64::MAX));
            if let Some((header, _)) = &token {
                builder = builder.header(AUTHORIZATION, header.clone());
            }
            let chunk = self
                .exchange(builder.post_raw(), parse_range_response)
                .await
                .map_err(|e| QueryError {
                    kind: e.kind,
                    message: format!(
                        "range query {query:?} from {} to {}: {}",
                        DateTime::from_timestamp_millis(from).unwrap_or_default(),
                        DateTime::from_timestamp_millis(to).unwrap_or_default(),
                        self.scrub(&e.message, token.as_ref().map(|(_, t)| t.as_str()))
                    ),
                })?;
            out.extend(chunk);
            done += n;
            progress(done, total);
        }
        Ok(out)
    }

    /// Sends a request and parses its answer. The HTTP client's own timeout bounds the request;
    /// this one also bounds anything around it, with a message that says so.
    async fn exchange<T>(
        &self,
        request: impl std::future::Future<
            Output = Result<reqwest::Response, prometheus_http_query::Error>,
        >,
        parse: fn(u16, &str) -> Result<T, QueryError>,
    ) -> Result<T, QueryError> {
        let exchange = async {
            let response = request.await.map_err(|e| classify(&e))?;
            let status = response.status();
            let body = response.text().await.map_err(|e| QueryError {
                kind: if e.is_timeout() { "timeout" } else { "decode" },
                message: format!("reading the response body: {}", error_chain(&e)),
            })?;
            parse(status.as_u16(), &body)
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => Err(QueryError {
                kind: "timeout",
                message: format!("no answer within the {:?} timeout", self.timeout),
            }),
            Ok(result) => result,
        }
    }

    async fn run(&self, query: &str, token: Option<&(HeaderValue, String)>) -> QueryOutcome {
        let start = Instant::now();
        let mut builder = self
            .client
            .query(query)
            .timeout(i64::try_from(self.timeout.as_millis()).unwrap_or(i64::MAX));
        if let Some((header, _)) = token {
            builder = builder.header(AUTHORIZATION, header.clone());
        }
        let result = self.exchange(builder.post_raw(), parse_response).await;
        let duration = start.elapsed();
        let outcome = match result {
            Ok(sample) => QueryOutcome {
                sample,
                duration,
                error_kind: None,
            },
            Err(e) => {
                let mut message = self.scrub(&e.message, token.map(|(_, t)| t.as_str()));
                if e.kind == "timeout" {
                    message = format!("{message} (--prometheus-timeout {:?})", self.timeout);
                }
                QueryOutcome {
                    sample: Sample::Error { message },
                    duration,
                    error_kind: Some(e.kind),
                }
            }
        };
        tracing::debug!(
            query,
            duration_ms = duration.as_secs_f64() * 1000.0,
            error_kind = outcome.error_kind,
            "prometheus query"
        );
        outcome
    }
}

/// An error and its sources as one line, leaving out a source whose text the previous one
/// already contains.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut last = text.clone();
    let mut source = e.source();
    while let Some(s) = source {
        let t = s.to_string();
        if !last.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        last = t;
        source = s.source();
    }
    text
}

/// The kind and text of a failed request.
pub fn classify(e: &prometheus_http_query::Error) -> QueryError {
    use prometheus_http_query::Error as E;
    let kind = match e {
        E::Prometheus(p) if p.is_timeout() => "timeout",
        E::Prometheus(_) => "promql",
        E::Client(c) => match c.inner() {
            Some(r) if r.is_timeout() => "timeout",
            Some(r) if r.is_connect() => "connect",
            Some(r) if r.is_status() => "http",
            Some(r) if r.is_decode() || r.is_body() => "decode",
            Some(_) => "http",
            None => "decode",
        },
        _ => "http",
    };
    let mut message = error_chain(e);
    if let E::Prometheus(_) = e {
        message = format!("Prometheus rejected the query: {message}");
    }
    QueryError { kind, message }
}

/// The JSON envelope of every Prometheus API answer.
#[derive(serde::Deserialize)]
struct Envelope {
    status: String,
    data: Option<PromqlResult>,
    #[serde(rename = "errorType")]
    error_type: Option<String>,
    error: Option<String>,
}

/// Reads an answer of `/api/v1/query` (HTTP status and body) into a [`Sample`]. Anything but a
/// Prometheus success is an error naming the HTTP status and, for answers that are not
/// Prometheus JSON (a proxy's error page, say), the start of the body.
pub fn parse_response(status: u16, body: &str) -> Result<Sample, QueryError> {
    parse_envelope(status, body).and_then(|data| convert(&data))
}

/// Reads an answer of `/api/v1/query_range` into one `(time, value)` per step, the series summed
/// at each step as the evaluator sums them (a step where no series has a sample is left out).
pub fn parse_range_response(
    status: u16,
    body: &str,
) -> Result<Vec<(DateTime<Utc>, f64)>, QueryError> {
    let data = parse_envelope(status, body)?;
    let mut sums: std::collections::BTreeMap<i64, f64> = std::collections::BTreeMap::new();
    match data.data() {
        Data::Matrix(series) => {
            for s in series {
                for sample in s.samples() {
                    let t = to_datetime(sample.timestamp())?.timestamp_millis();
                    *sums.entry(t).or_insert(0.0) += sample.value();
                }
            }
        }
        Data::Scalar(s) => {
            sums.insert(to_datetime(s.timestamp())?.timestamp_millis(), s.value());
        }
        Data::Vector(_) => {
            return Err(QueryError {
                kind: "result_type",
                message: "a range query returned an instant vector".into(),
            });
        }
    }
    sums.into_iter()
        .map(|(t, v)| {
            DateTime::from_timestamp_millis(t)
                .map(|t| (t, v))
                .ok_or_else(|| QueryError {
                    kind: "decode",
                    message: format!("Prometheus returned an unusable timestamp {t}ms"),
                })
        })
        .collect()
}

fn parse_envelope(status: u16, body: &str) -> Result<PromqlResult, QueryError> {
    let snippet = || {
        let text: String = body.trim().chars().take(300).collect();
        if text.is_empty() {
            "(empty body)".to_string()
        } else {
            text
        }
    };
    match serde_json::from_str::<Envelope>(body) {
        Ok(Envelope {
            status: s,
            data: Some(data),
            ..
        }) if s == "success" => Ok(data),
        Ok(Envelope {
            status: s,
            error_type: Some(kind),
            error,
            ..
        }) if s == "error" => Err(QueryError {
            kind: if kind == "timeout" {
                "timeout"
            } else {
                "promql"
            },
            message: format!(
                "Prometheus rejected the query (HTTP {status}): {kind}: {}",
                error.unwrap_or_default()
            ),
        }),
        _ if !(200..300).contains(&status) => Err(QueryError {
            kind: "http",
            message: format!("HTTP {status} from Prometheus: {}", snippet()),
        }),
        Ok(_) => Err(QueryError {
            kind: "decode",
            message: format!("not a Prometheus query answer: {}", snippet()),
        }),
        Err(e) => Err(QueryError {
            kind: "decode",
            message: format!("cannot parse the answer ({e}): {}", snippet()),
        }),
    }
}

fn to_datetime(seconds: f64) -> Result<DateTime<Utc>, QueryError> {
    let bad = || QueryError {
        kind: "decode",
        message: format!("Prometheus returned an unusable timestamp {seconds}"),
    };
    if !seconds.is_finite() {
        return Err(bad());
    }
    // Prometheus timestamps are milliseconds; the float is exact enough to round back.
    DateTime::from_timestamp_millis((seconds * 1000.0).round() as i64).ok_or_else(bad)
}

/// Converts a successful instant-query response to a [`Sample`]; see the module docs for the
/// rules. An `Err` is an answer kscale cannot use (a range vector, a bad timestamp).
pub fn convert(result: &PromqlResult) -> Result<Sample, QueryError> {
    match result.data() {
        Data::Vector(series) => {
            if series.is_empty() {
                return Ok(Sample::Missing {
                    reason: NO_SERIES.into(),
                });
            }
            let mut oldest = f64::INFINITY;
            let values = series
                .iter()
                .map(|s| {
                    oldest = oldest.min(s.sample().timestamp());
                    s.sample().value()
                })
                .collect();
            Ok(Sample::Series {
                values,
                timestamp: to_datetime(oldest)?,
            })
        }
        Data::Scalar(s) => Ok(Sample::Series {
            values: vec![s.value()],
            timestamp: to_datetime(s.timestamp())?,
        }),
        Data::Matrix(_) => Err(QueryError {
            kind: "result_type",
            message: "the query returned a range vector; a metric's query must return an \
                      instant vector or a scalar (use e.g. rate() or last_over_time() over the range)"
                .into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(json: &str) -> PromqlResult {
        serde_json::from_str(json).unwrap()
    }

    fn ts(s: f64) -> DateTime<Utc> {
        to_datetime(s).unwrap()
    }

    #[test]
    fn range_answers_are_summed_over_series_per_step() {
        let body = r#"{"status":"success","data":{"resultType":"matrix","result":[
            {"metric":{"pod":"a"},"values":[[1700000000,"1"],[1700000015,"2"]]},
            {"metric":{"pod":"b"},"values":[[1700000015,"10"],[1700000030,"20"]]}]}}"#;
        assert_eq!(
            parse_range_response(200, body).unwrap(),
            vec![
                (ts(1_700_000_000.0), 1.0),
                (ts(1_700_000_015.0), 12.0),
                (ts(1_700_000_030.0), 20.0)
            ]
        );
        let error = r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#;
        assert_eq!(parse_range_response(400, error).unwrap_err().kind, "promql");
    }

    #[test]
    fn empty_vector_is_missing() {
        let r = parse(r#"{"resultType":"vector","result":[]}"#);
        assert_eq!(
            convert(&r).unwrap(),
            Sample::Missing {
                reason: NO_SERIES.into()
            }
        );
    }

    #[test]
    fn scalar_is_one_value() {
        let r = parse(r#"{"resultType":"scalar","result":[1700000000.5,"42.25"]}"#);
        assert_eq!(
            convert(&r).unwrap(),
            Sample::Series {
                values: vec![42.25],
                timestamp: ts(1_700_000_000.5)
            }
        );
    }

    #[test]
    fn several_series_keep_every_value_and_the_oldest_timestamp() {
        let r = parse(
            r#"{"resultType":"vector","result":[
                {"metric":{"pod":"a"},"value":[1700000010.123,"1.5"]},
                {"metric":{"pod":"b"},"value":[1700000000,"2"]},
                {"metric":{},"value":[1700000020,"-3"]}]}"#,
        );
        assert_eq!(
            convert(&r).unwrap(),
            Sample::Series {
                values: vec![1.5, 2.0, -3.0],
                timestamp: ts(1_700_000_000.0)
            }
        );
        assert_eq!(
            ts(1_700_000_010.123).timestamp_subsec_millis(),
            123,
            "millisecond timestamps survive"
        );
    }

    #[test]
    fn nan_and_inf_pass_through_and_evaluate_as_invalid() {
        let r = parse(
            r#"{"resultType":"vector","result":[
                {"metric":{},"value":[1700000000,"NaN"]},
                {"metric":{},"value":[1700000000,"+Inf"]},
                {"metric":{},"value":[1700000000,"-Inf"]}]}"#,
        );
        let Sample::Series { values, .. } = convert(&r).unwrap() else {
            panic!("not a series")
        };
        assert!(values[0].is_nan());
        assert_eq!(values[1], f64::INFINITY);
        assert_eq!(values[2], f64::NEG_INFINITY);

        // And the evaluator names it instead of reading it as a number.
        let resource: crate::crd::ScalingPolicy = serde_yaml::from_str(
            r#"
apiVersion: kscale.dev/v1alpha1
kind: ScalingPolicy
metadata: {name: p, namespace: default}
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
  minReplicas: 1
  maxReplicas: 10
  metrics:
  - name: rps
    prometheus: {query: '0/0'}
    target: {type: AverageValue, averageValue: "10"}
"#,
        )
        .unwrap();
        let policy = crate::policy::CompiledPolicy::from_resource(&resource).unwrap();
        let now = ts(1_700_000_000.0);
        let obs = crate::model::Observation {
            spec_replicas: 4,
            status_replicas: 4,
            ready_replicas: 4,
            pods: 4,
            forecasts: Vec::new(),
            samples: vec![Sample::Series {
                values: vec![f64::NAN],
                timestamp: now,
            }],
        };
        let d = crate::policy::evaluate(&policy, &obs, &Default::default(), now);
        let reason = d.reason(&policy);
        assert_eq!(d.replicas, 4, "{reason}");
        assert_eq!(
            d.metrics[0].state,
            crate::policy::MetricState::Invalid,
            "{reason}"
        );
        assert!(reason.contains("NaN"), "{reason}");
    }

    #[test]
    fn answers_parse_to_samples_or_errors_with_the_http_status() {
        assert_eq!(
            parse_response(
                200,
                r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#
            )
            .unwrap(),
            Sample::Missing {
                reason: NO_SERIES.into()
            }
        );
        let e = parse_response(
            400,
            r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#,
        )
        .unwrap_err();
        assert_eq!(e.kind, "promql");
        assert_eq!(
            e.message,
            "Prometheus rejected the query (HTTP 400): bad_data: parse error"
        );
        let e = parse_response(
            503,
            r#"{"status":"error","errorType":"timeout","error":"query timed out"}"#,
        )
        .unwrap_err();
        assert_eq!(e.kind, "timeout");
        let e = parse_response(502, "<html>Bad Gateway</html>").unwrap_err();
        assert_eq!(e.kind, "http");
        assert_eq!(
            e.message,
            "HTTP 502 from Prometheus: <html>Bad Gateway</html>"
        );
        let e = parse_response(404, r#"{"kind":"Status","status":"Failure"}"#).unwrap_err();
        assert_eq!(e.kind, "http");
        let e = parse_response(200, "").unwrap_err();
        assert_eq!(e.kind, "decode");
        assert!(e.message.ends_with("(empty body)"), "{}", e.message);
    }

    #[test]
    fn range_vector_is_an_error() {
        let r = parse(
            r#"{"resultType":"matrix","result":[{"metric":{},"values":[[1700000000,"1"]]}]}"#,
        );
        let e = convert(&r).unwrap_err();
        assert_eq!(e.kind, "result_type");
        assert!(e.message.contains("range vector"), "{}", e.message);
    }

    #[test]
    fn bad_timestamp_is_an_error() {
        assert_eq!(to_datetime(f64::NAN).unwrap_err().kind, "decode");
        assert_eq!(to_datetime(1e300).unwrap_err().kind, "decode");
    }

    #[test]
    fn userinfo_is_stripped_from_urls() {
        assert_eq!(
            strip_userinfo(
                "error sending request for url (https://bob:s3cret@prom:9090/api/v1/query)"
            ),
            "error sending request for url (https://prom:9090/api/v1/query)"
        );
        assert_eq!(strip_userinfo("no url here"), "no url here");
        assert_eq!(
            strip_userinfo("http://a/x?q=u@b and http://c@d/"),
            "http://a/x?q=u@b and http://d/"
        );
    }

    #[test]
    fn base64_matches_rfc4648() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), coded);
        }
    }

    #[test]
    fn settings_errors_name_the_flag() {
        let cfg = |f: fn(&mut PrometheusConfig)| {
            let mut c = PrometheusConfig::default();
            f(&mut c);
            PrometheusSource::new(&c).unwrap_err().to_string()
        };
        let e = cfg(|c| c.ca = Some(Material::File("/nonexistent/ca.pem".into())));
        assert!(
            e.starts_with("--prometheus-ca-file /nonexistent/ca.pem: cannot read: "),
            "{e}"
        );
        let e = cfg(|c| c.url = "ftp://u:hunter22@x".into());
        assert!(e.starts_with("--prometheus-url ftp://x: "), "{e}");
        assert!(!e.contains("hunter22"), "{e}");
        let e = cfg(|c| c.url = "not a url".into());
        assert!(e.starts_with("--prometheus-url not a url: "), "{e}");
        let e = cfg(|c| c.bearer_token = Some(Material::File("/nonexistent/token".into())));
        assert!(
            e.starts_with("--prometheus-bearer-token-file /nonexistent/token: cannot read"),
            "{e}"
        );
        let e = cfg(|c| c.client_cert = Some(Material::File("/x".into())));
        assert!(e.contains("--prometheus-client-key-file"), "{e}");
        let e = cfg(|c| c.headers = vec![("bad name".into(), "v".into())]);
        assert!(e.starts_with("--prometheus-header bad name: "), "{e}");
        let e = cfg(|c| c.timeout = Duration::ZERO);
        assert!(e.starts_with("--prometheus-timeout"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").unwrap();
        let e = cfg_with_ca(&ca);
        assert!(
            e.contains("--prometheus-ca-file") && e.contains("no PEM"),
            "{e}"
        );
        fn cfg_with_ca(ca: &Path) -> String {
            let c = PrometheusConfig {
                ca: Some(Material::File(ca.to_path_buf())),
                ..Default::default()
            };
            PrometheusSource::new(&c).unwrap_err().to_string()
        }
    }

    #[test]
    fn error_text_is_scrubbed_of_credentials() {
        let src = PrometheusSource::new(&PrometheusConfig {
            url: "http://u:urlpass@127.0.0.1:9".into(),
            basic_auth: Some(BasicAuth {
                user: "bob".into(),
                password: "hunter22".into(),
            }),
            headers: vec![("X-Api-Key".into(), "key-123".into())],
            ..Default::default()
        });
        let src = src.unwrap();
        let text = src.scrub(
            "for url (http://u:urlpass@127.0.0.1:9/api): hunter22 key-123 tok-456 urlpass",
            Some("tok-456"),
        );
        assert_eq!(
            text,
            "for url (http://127.0.0.1:9/api): <redacted> <redacted> <redacted> <redacted>"
        );
    }

    #[test]
    fn debug_hides_the_password() {
        let a = BasicAuth {
            user: "u".into(),
            password: "hunter22".into(),
        };
        assert!(!format!("{a:?}").contains("hunter22"));
    }
}
