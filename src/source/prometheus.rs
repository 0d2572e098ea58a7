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
//! - an answer with `warnings` (Thanos with a store down returns partial data by default) gives
//!   [`Sample::Partial`]: the evaluator never scales down on it;
//! - any failure (connection, timeout, HTTP status, PromQL error, a response that is not an
//!   instant vector or scalar, an answer over a cap) gives [`Sample::Error`] with the error's
//!   text, scrubbed of the configured credentials. Nothing here ever turns a failure into 0.
//!
//! # What a server can make kscale do
//!
//! A policy names its own server, so answers are untrusted:
//!
//! - every answer is read in chunks up to [`AnswerLimits::max_bytes`]
//!   (`--prometheus-max-response-bytes`) and reading stops there; an answer with more than
//!   [`AnswerLimits::max_series`] series (`--prometheus-max-series`) is refused. Series labels
//!   are never kept, only values;
//! - the queries of one [`PrometheusSource::query_all`] call share one deadline, the timeout: a
//!   server that accepts and never answers costs its policies one timeout per tick, no more;
//! - redirects are not followed (the query, headers and credentials go to the configured URL
//!   only);
//! - no text of an answer reaches an error (and so a policy's status, which its author reads)
//!   except a documented Prometheus error's own message about the query (`bad_data: parse
//!   error ...`, cut at 300 characters). The body of anything else (an HTML error page, a
//!   redirect, JSON that is not a query answer) and the text of warnings are logged by the
//!   daemon instead.
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

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt as _;
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
    /// The caps on every answer (`--prometheus-max-response-bytes`, `--prometheus-max-series`).
    pub limits: AnswerLimits,
    /// The setting that gave [`url`](Self::url), named in its errors (`--prometheus-url`,
    /// `--prometheus` for the backtest, `spec.prometheus.url` for a policy's own server;
    /// `KSCALE_PROMETHEUS_URL` or the config file's key when the value came from there).
    pub url_setting: Cow<'static, str>,
    /// The setting that gave [`timeout`](Self::timeout), named in timeout errors
    /// (`--prometheus-timeout`, or `spec.prometheus.timeout` for a policy's own server).
    pub timeout_setting: &'static str,
}

/// The most kscale reads of one Prometheus answer. Both caps are enforced on every answer
/// (instant and range queries, the backtest's history reads too): the body is read in chunks
/// and reading stops as soon as it passes [`max_bytes`](Self::max_bytes), so no more than that
/// is ever buffered; an answer with more than [`max_series`](Self::max_series) series is an
/// error. An answer over a cap is an error sample naming the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerLimits {
    /// `--prometheus-max-response-bytes`: the largest body read (default
    /// [`DEFAULT_MAX_RESPONSE_BYTES`]).
    pub max_bytes: u64,
    /// `--prometheus-max-series`: the most series (instant vector elements or range series) in
    /// one answer (default [`DEFAULT_MAX_SERIES`]).
    pub max_series: usize,
}

/// Default of `--prometheus-max-response-bytes`: 8 MiB, room for a range chunk of 10,000 steps
/// over a few dozen series, and far above any instant query an autoscaler needs.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 8 * 1024 * 1024;

/// Default of `--prometheus-max-series`.
pub const DEFAULT_MAX_SERIES: usize = 10_000;

impl Default for AnswerLimits {
    fn default() -> Self {
        AnswerLimits {
            max_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            max_series: DEFAULT_MAX_SERIES,
        }
    }
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
            limits: AnswerLimits::default(),
            url_setting: Cow::Borrowed("--prometheus-url"),
            timeout_setting: "--prometheus-timeout",
        }
    }
}

/// A setting of [`PrometheusConfig`] that cannot be used. Each message starts with the flag at
/// fault.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The URL does not parse or is not http(s).
    #[error("{setting} {url}: {message}")]
    Url {
        /// The flag or field that gave the URL (`PrometheusConfig::url_setting`).
        setting: Cow<'static, str>,
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
    /// An answer cap is zero.
    #[error("{flag}: must be at least 1")]
    Limit {
        /// The flag at fault.
        flag: &'static str,
    },
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
    #[error("{cert} and {key} must be given together")]
    ClientCertPair {
        /// The certificate's flag.
        cert: &'static str,
        /// The key's flag.
        key: &'static str,
    },
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
    #[error("{setting} {url}: cannot build the HTTP client: {message}")]
    Client {
        /// The flag or field that gave the URL.
        setting: Cow<'static, str>,
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
    /// For [`Sample::Error`]: `timeout`, `connect`, `http`, `promql`, `decode`, `result_type`,
    /// `limit` (an answer over [`AnswerLimits`]) or `auth`. `None` otherwise (an empty result is not an error).
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
    timeout_setting: &'static str,
    max_concurrency: usize,
    limits: AnswerLimits,
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

/// The flags that name a client's credentials and answer cap in its errors: the Prometheus
/// source's ([`PROMETHEUS_FLAGS`]), or those of another upstream that shares this code (the
/// external metrics adapter's `--external-metrics-upstream`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CredentialFlags {
    /// The CA bundle's flag.
    pub ca: &'static str,
    /// The client certificate's flag.
    pub client_cert: &'static str,
    /// The client key's flag.
    pub client_key: &'static str,
    /// The bearer token file's flag.
    pub bearer_token: &'static str,
    /// The answer byte cap's flag.
    pub max_bytes: &'static str,
}

/// The Prometheus source's flags.
pub const PROMETHEUS_FLAGS: CredentialFlags = CredentialFlags {
    ca: "--prometheus-ca-file",
    client_cert: "--prometheus-client-cert-file",
    client_key: "--prometheus-client-key-file",
    bearer_token: "--prometheus-bearer-token-file",
    max_bytes: MAX_BYTES_FLAG,
};

const TOKEN_FLAG: &str = PROMETHEUS_FLAGS.bearer_token;
/// The flag of [`AnswerLimits::max_bytes`].
pub const MAX_BYTES_FLAG: &str = "--prometheus-max-response-bytes";
/// The flag of [`AnswerLimits::max_series`].
pub const MAX_SERIES_FLAG: &str = "--prometheus-max-series";

/// The token of a bearer token credential, trimmed; `flag` names it in errors.
pub(crate) fn read_token(m: &Material, flag: &str) -> Result<String, SourceError> {
    let content = |message: &str| SourceError::Content {
        origin: m.origin(flag),
        message: message.into(),
    };
    let token = String::from_utf8(m.read(flag)?)
        .map_err(|_| content("not UTF-8 text"))?
        .trim()
        .to_string();
    if token.is_empty() {
        return Err(content("the token is empty"));
    }
    Ok(token)
}

/// `Authorization: Bearer <token>`, marked sensitive; `flag` names the credential in errors.
pub(crate) fn bearer_header(
    m: &Material,
    token: &str,
    flag: &str,
) -> Result<HeaderValue, SourceError> {
    let mut value =
        HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| SourceError::Content {
            origin: m.origin(flag),
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
    client_tls(
        ClientTls {
            ca: cfg.ca.as_ref(),
            client_cert: cfg.client_cert.as_ref(),
            client_key: cfg.client_key.as_ref(),
        },
        &PROMETHEUS_FLAGS,
        &cfg.url_setting,
        &cfg.url,
    )
}

/// The TLS material of an https client: each `None` is left out (the system roots, no client
/// certificate).
#[derive(Debug, Clone, Copy)]
pub struct ClientTls<'a> {
    /// PEM certificates that replace the system roots.
    pub ca: Option<&'a Material>,
    /// PEM client certificate (chain), with `client_key`.
    pub client_cert: Option<&'a Material>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<&'a Material>,
}

/// A rustls client configuration from `tls`, on ring. Errors name the credential by `flags`
/// (or its Secret key), and the URL by `url_setting`.
pub fn client_tls(
    tls: ClientTls<'_>,
    flags: &CredentialFlags,
    url_setting: &str,
    url: &str,
) -> Result<rustls::ClientConfig, SourceError> {
    let (ca_flag, cert_flag, key_flag) = (flags.ca, flags.client_cert, flags.client_key);
    let mut roots = rustls::RootCertStore::empty();
    match tls.ca {
        Some(ca) => {
            let bytes = ca.read(ca_flag)?;
            let content = |message: String| SourceError::Content {
                origin: ca.origin(ca_flag),
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
            setting: Cow::Owned(url_setting.to_string()),
            url: strip_userinfo(url),
            message: e.to_string(),
        })?
        .with_root_certificates(roots);
    match (tls.client_cert, tls.client_key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let bytes = cert.read(cert_flag)?;
            let certs = CertificateDer::pem_slice_iter(&bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| SourceError::Content {
                    origin: cert.origin(cert_flag),
                    message: format!("bad PEM: {e}"),
                })?;
            if certs.is_empty() {
                return Err(SourceError::Content {
                    origin: cert.origin(cert_flag),
                    message: "no PEM certificate in it".into(),
                });
            }
            let key_bytes = key.read(key_flag)?;
            let private =
                PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| SourceError::Content {
                    origin: key.origin(key_flag),
                    message: format!("no usable PEM private key: {e}"),
                })?;
            builder
                .with_client_auth_cert(certs, private)
                .map_err(|e| SourceError::ClientCert {
                    origin: cert.origin(cert_flag),
                    message: format!("does not go with {}: {e}", key.origin(key_flag)),
                })
        }
        _ => Err(SourceError::ClientCertPair {
            cert: cert_flag,
            key: key_flag,
        }),
    }
}

impl PrometheusSource {
    /// Checks the settings, reads the certificate and token files once, and builds the client.
    /// Every error names the setting at fault.
    pub fn new(cfg: &PrometheusConfig) -> Result<Self, SourceError> {
        let shown_url = strip_userinfo(&cfg.url);
        if let Some(fix) = crate::policy::compile::missing_scheme(&shown_url) {
            return Err(SourceError::Url {
                setting: cfg.url_setting.clone(),
                url: shown_url,
                message: fix,
            });
        }
        let parsed = reqwest::Url::parse(&cfg.url).map_err(|e| SourceError::Url {
            setting: cfg.url_setting.clone(),
            url: shown_url.clone(),
            message: e.to_string(),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(SourceError::Url {
                setting: cfg.url_setting.clone(),
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
        if cfg.limits.max_bytes == 0 {
            return Err(SourceError::Limit {
                flag: MAX_BYTES_FLAG,
            });
        }
        if cfg.limits.max_series == 0 {
            return Err(SourceError::Limit {
                flag: MAX_SERIES_FLAG,
            });
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
            let token = read_token(m, TOKEN_FLAG)?;
            bearer_header(m, &token, TOKEN_FLAG)?;
            // A fixed token (not a file) is a fixed secret to scrub from error texts.
            if let Material::Bytes { .. } = m {
                secrets.push(token);
            }
        }
        let tls = tls_config(cfg)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            // A redirect would send the query, its headers and credentials to a URL nobody
            // allowed: a 3xx is an answer like any other non-Prometheus one (an error).
            .redirect(reqwest::redirect::Policy::none())
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
            .default_headers(headers)
            .build()
            .map_err(|e| SourceError::Client {
                setting: cfg.url_setting.clone(),
                url: shown_url.clone(),
                message: error_chain(&e),
            })?;
        let client =
            prometheus_http_query::Client::from(http, &cfg.url).map_err(|e| SourceError::Url {
                setting: cfg.url_setting.clone(),
                url: shown_url.clone(),
                message: error_chain(&e),
            })?;
        Ok(PrometheusSource {
            client,
            timeout: cfg.timeout,
            timeout_setting: cfg.timeout_setting,
            max_concurrency: cfg.max_concurrency,
            limits: cfg.limits,
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
    ///
    /// The whole call runs under one deadline, the server's timeout: a query still unanswered
    /// then (slow, or queued behind [`PrometheusConfig::max_concurrency`] slow ones) is an error
    /// sample saying so, and the answers already in are kept. One server that never answers
    /// therefore costs its own policies one timeout, never more.
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
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.timeout;
        async {
            // One token read per tick: a rotated token is picked up at the next tick.
            let token = match &self.bearer_token {
                None => Ok(None),
                Some(m) => read_token(m, TOKEN_FLAG)
                    .and_then(|t| bearer_header(m, &t, TOKEN_FLAG).map(|h| Some((h, t))))
                    .map_err(|e| e.to_string()),
            };
            let mut answers = std::pin::pin!(
                futures::stream::iter(distinct.clone())
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
            );
            let mut out = HashMap::with_capacity(distinct.len());
            while let Ok(Some((q, outcome))) =
                tokio::time::timeout_at(deadline, answers.next()).await
            {
                out.insert(q, outcome);
            }
            for q in distinct {
                out.entry(q).or_insert_with(|| QueryOutcome {
                    sample: Sample::Error {
                        message: format!(
                            "no answer within the server's {:?} deadline for this evaluation ({})",
                            self.timeout, self.timeout_setting
                        ),
                    },
                    duration: started.elapsed(),
                    error_kind: Some("timeout"),
                });
            }
            out
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
                let t = read_token(m, TOKEN_FLAG).map_err(|e| QueryError {
                    kind: "auth",
                    message: e.to_string(),
                })?;
                let h = bearer_header(m, &t, TOKEN_FLAG).map_err(|e| QueryError {
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
                .exchange(builder.post_raw(), parse_range)
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

    /// Sends a request and parses its answer, read in chunks under [`AnswerLimits`]. The HTTP
    /// client's own timeout bounds the request; this one also bounds anything around it, with a
    /// message that says so.
    async fn exchange<T>(
        &self,
        request: impl std::future::Future<
            Output = Result<reqwest::Response, prometheus_http_query::Error>,
        >,
        parse: fn(u16, &[u8], AnswerLimits) -> Result<T, QueryError>,
    ) -> Result<T, QueryError> {
        let limits = self.limits;
        let exchange = async {
            let response = request.await.map_err(|e| classify(&e, &self.url()))?;
            let status = response.status();
            let body = read_capped(response, limits.max_bytes, MAX_BYTES_FLAG).await?;
            parse(status.as_u16(), &body, limits)
        };
        let span = tracing::info_span!("prometheus_answer", url = %self.url());
        match tokio::time::timeout(self.timeout, exchange.instrument(span)).await {
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
        let result = self.exchange(builder.post_raw(), parse_instant).await;
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
                    message = format!("{message} ({} {:?})", self.timeout_setting, self.timeout);
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
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
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

/// The kind and text of a failed request to the Prometheus at `url` (shown without credentials).
pub fn classify(e: &prometheus_http_query::Error, url: &str) -> QueryError {
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
    // A transport failure reads as what happened, where, and its innermost cause (`Connection
    // refused (os error 111)`), not as the HTTP stack's four-level chain.
    let transport = matches!(e, E::Client(c) if c.inner().is_some_and(|r| !r.is_status()));
    let message = match e {
        E::Prometheus(_) => format!("Prometheus rejected the query: {}", error_chain(e)),
        _ if kind == "connect" => {
            format!("cannot connect to Prometheus at {url}: {}", root_cause(e))
        }
        _ if kind == "timeout" => format!(
            "Prometheus at {url} did not answer in time: {}",
            root_cause(e)
        ),
        _ if transport => format!(
            "the request to Prometheus at {url} failed: {}",
            root_cause(e)
        ),
        _ => error_chain(e),
    };
    QueryError { kind, message }
}

/// The innermost source of `e`: the cause the layers above it wrap.
fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cause = e;
    while let Some(s) = cause.source() {
        cause = s;
    }
    cause.to_string()
}

/// The JSON envelope of every Prometheus API answer. Unknown fields (`infos`, say) are ignored.
#[derive(serde::Deserialize)]
struct Envelope {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
    /// Set when the answer is partial (Thanos with a store down, say) or otherwise suspect.
    #[serde(default)]
    warnings: Vec<String>,
}

/// The `data` of a query answer. Series labels are not kept: kscale sums values, so an answer
/// costs 16 bytes per value in memory, less than its JSON text.
#[derive(serde::Deserialize)]
#[serde(tag = "resultType", content = "result", rename_all = "lowercase")]
enum Data {
    Vector(Vec<VectorElement>),
    Scalar(Point),
    Matrix(Vec<RangeSeries>),
    String(serde::de::IgnoredAny),
}

#[derive(serde::Deserialize)]
struct VectorElement {
    value: Point,
}

#[derive(serde::Deserialize)]
struct RangeSeries {
    values: Vec<Point>,
}

/// `[<unix seconds>, "<value>"]`.
#[derive(serde::Deserialize)]
struct Point(f64, #[serde(deserialize_with = "sample_value")] f64);

/// A sample value as Prometheus writes it: a decimal string, `NaN`, `+Inf` or `-Inf`.
fn sample_value<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let text = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
    match text.as_ref() {
        "NaN" => Ok(f64::NAN),
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        t => t
            .parse()
            .map_err(|_| serde::de::Error::custom("a sample value is not a number")),
    }
}

/// The error types the Prometheus HTTP API documents. An error answer of one of these is the
/// server's verdict on the query (a PromQL parse error, say), and its text is kept for the
/// policy's author; anything else a server sends is logged, never shown.
const PROMETHEUS_ERROR_TYPES: [&str; 8] = [
    "bad_data",
    "timeout",
    "canceled",
    "execution",
    "internal",
    "unavailable",
    "not_found",
    "too_many_requests",
];

/// The most characters of a Prometheus error text that reach a status.
const ERROR_TEXT_CHARS: usize = 300;

/// Reads a response body in chunks and stops as soon as it passes `max` bytes: an answer over
/// the cap is never buffered past it (a `Content-Length` over the cap is refused unread). `flag`
/// names the cap in the error (kind `limit`; `timeout` or `decode` for a failed read).
pub(crate) async fn read_capped(
    mut response: reqwest::Response,
    max: u64,
    flag: &str,
) -> Result<Vec<u8>, QueryError> {
    let over = || QueryError {
        kind: "limit",
        message: format!(
            "the answer is larger than the {max}-byte cap ({flag}); kscale stopped reading it"
        ),
    };
    if response.content_length().is_some_and(|n| n > max) {
        return Err(over());
    }
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if (body.len() + chunk.len()) as u64 > max {
                    return Err(over());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(QueryError {
                    kind: if e.is_timeout() { "timeout" } else { "decode" },
                    message: format!("reading the response body: {}", error_chain(&e)),
                });
            }
        }
    }
}

/// Reads an answer of `/api/v1/query` (HTTP status and body) into a [`Sample`] under the
/// default [`AnswerLimits`]. Anything but a Prometheus success is an error naming the HTTP
/// status; the text of an answer that is not Prometheus JSON (a proxy's error page, say) is
/// logged, never put in the error, because the error reaches the policy's status.
pub fn parse_response(status: u16, body: &str) -> Result<Sample, QueryError> {
    parse_instant(status, body.as_bytes(), AnswerLimits::default())
}

/// [`parse_response`] under the given caps. An answer with `warnings` gives
/// [`Sample::Partial`] (or a [`Sample::Missing`] that says so when it holds no series).
pub fn parse_instant(status: u16, body: &[u8], limits: AnswerLimits) -> Result<Sample, QueryError> {
    let (data, warnings) = parse_envelope(status, body)?;
    let sample = match data {
        Data::Vector(series) => {
            check_series(series.len(), limits)?;
            if series.is_empty() {
                return Ok(Sample::Missing {
                    reason: match warnings {
                        0 => NO_SERIES.into(),
                        n => format!("{NO_SERIES} {}", crate::model::partial_note(n)),
                    },
                });
            }
            let mut oldest = f64::INFINITY;
            let values = series
                .iter()
                .map(|s| {
                    oldest = oldest.min(s.value.0);
                    s.value.1
                })
                .collect();
            (values, to_datetime(oldest)?)
        }
        Data::Scalar(Point(t, v)) => (vec![v], to_datetime(t)?),
        Data::Matrix(_) => {
            return Err(QueryError {
                kind: "result_type",
                message: "the query returned a range vector; a metric's query must return an \
                          instant vector or a scalar (use e.g. rate() or last_over_time() over the range)"
                    .into(),
            });
        }
        Data::String(_) => {
            return Err(QueryError {
                kind: "result_type",
                message: "the query returned a string; a metric's query must return an instant \
                          vector or a scalar"
                    .into(),
            });
        }
    };
    let (values, timestamp) = sample;
    Ok(match warnings {
        0 => Sample::Series { values, timestamp },
        n => Sample::Partial {
            values,
            timestamp,
            warnings: n,
        },
    })
}

fn check_series(count: usize, limits: AnswerLimits) -> Result<(), QueryError> {
    if count > limits.max_series {
        return Err(QueryError {
            kind: "limit",
            message: format!(
                "the answer holds {count} series, more than the {}-series cap ({MAX_SERIES_FLAG})",
                limits.max_series
            ),
        });
    }
    Ok(())
}

/// Reads an answer of `/api/v1/query_range` into one `(time, value)` per step, the series summed
/// at each step as the evaluator sums them (a step where no series has a sample is left out).
/// Default [`AnswerLimits`].
pub fn parse_range_response(
    status: u16,
    body: &str,
) -> Result<Vec<(DateTime<Utc>, f64)>, QueryError> {
    parse_range(status, body.as_bytes(), AnswerLimits::default())
}

/// [`parse_range_response`] under the given caps. Warnings are logged: a history only feeds
/// forecasts, which only ever add to what current values need.
pub fn parse_range(
    status: u16,
    body: &[u8],
    limits: AnswerLimits,
) -> Result<Vec<(DateTime<Utc>, f64)>, QueryError> {
    let (data, _warnings) = parse_envelope(status, body)?;
    let mut sums: std::collections::BTreeMap<i64, f64> = std::collections::BTreeMap::new();
    match data {
        Data::Matrix(series) => {
            check_series(series.len(), limits)?;
            for s in series {
                for Point(t, v) in s.values {
                    let t = to_datetime(t)?.timestamp_millis();
                    *sums.entry(t).or_insert(0.0) += v;
                }
            }
        }
        Data::Scalar(Point(t, v)) => {
            sums.insert(to_datetime(t)?.timestamp_millis(), v);
        }
        Data::Vector(_) | Data::String(_) => {
            return Err(QueryError {
                kind: "result_type",
                message: "a range query returned an instant vector or a string".into(),
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

/// The start of a body, for the daemon's log only.
fn log_snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(1024)]);
    let text: String = text.trim().chars().take(300).collect();
    if text.is_empty() {
        "(empty body)".to_string()
    } else {
        text
    }
}

/// The answer's data and its number of warnings, or an error. No text of the body reaches the
/// error except a documented Prometheus error's own message; the rest is logged.
fn parse_envelope(status: u16, body: &[u8]) -> Result<(Data, usize), QueryError> {
    let logged = |what: &str| {
        tracing::warn!(
            http_status = status,
            body_start = %log_snippet(body),
            "{what}; the answer's text stays in this log"
        );
    };
    match serde_json::from_slice::<Envelope>(body) {
        Ok(Envelope {
            status: s,
            data: Some(data),
            warnings,
            ..
        }) if s == "success" && (200..300).contains(&status) => {
            if !warnings.is_empty() {
                let shown: Vec<String> = warnings
                    .iter()
                    .take(5)
                    .map(|w| w.chars().take(300).collect())
                    .collect();
                tracing::warn!(
                    http_status = status,
                    warnings = warnings.len(),
                    first = ?shown,
                    "Prometheus answered with warnings: the data is partial"
                );
            }
            Ok((data, warnings.len()))
        }
        Ok(Envelope {
            status: s,
            error_type: Some(kind),
            error,
            ..
        }) if s == "error" && PROMETHEUS_ERROR_TYPES.contains(&kind.as_str()) => {
            let text: String = error
                .unwrap_or_default()
                .chars()
                .take(ERROR_TEXT_CHARS)
                .collect();
            Err(QueryError {
                kind: if kind == "timeout" {
                    "timeout"
                } else {
                    "promql"
                },
                message: format!("Prometheus rejected the query (HTTP {status}): {kind}: {text}"),
            })
        }
        _ if !(200..300).contains(&status) => {
            logged("the server's answer is an HTTP error");
            Err(QueryError {
                kind: "http",
                message: format!("HTTP {status} from the server (body logged by the daemon)"),
            })
        }
        Ok(_) => {
            logged("the server's answer is not a Prometheus query answer");
            Err(QueryError {
                kind: "decode",
                message: format!(
                    "HTTP {status} from the server is not a Prometheus query answer (body logged by the daemon)"
                ),
            })
        }
        Err(e) => {
            logged("the server's answer does not parse as Prometheus JSON");
            // serde's message can quote the body (an unknown variant, say): only its position.
            let what = match body.iter().all(u8::is_ascii_whitespace) {
                true => "an empty body".to_string(),
                false => format!("line {} column {}", e.line(), e.column()),
            };
            Err(QueryError {
                kind: "decode",
                message: format!(
                    "HTTP {status} from the server is not Prometheus JSON (at {what}; body logged by the daemon)"
                ),
            })
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A success envelope around `data`, as Prometheus sends it.
    fn parse(data: &str) -> String {
        format!(r#"{{"status":"success","data":{data}}}"#)
    }

    fn convert(body: &str) -> Result<Sample, QueryError> {
        parse_response(200, body)
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
        let obs = crate::model::Observation::steady(
            4,
            vec![Sample::Series {
                values: vec![f64::NAN],
                timestamp: now,
            }],
        );
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
            "HTTP 502 from the server (body logged by the daemon)"
        );
        let e = parse_response(404, r#"{"kind":"Status","status":"Failure"}"#).unwrap_err();
        assert_eq!(e.kind, "http");
        let e = parse_response(200, "").unwrap_err();
        assert_eq!(e.kind, "decode");
        assert!(e.message.contains("an empty body"), "{}", e.message);
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
        // A URL without a scheme says so and how to fix it (not "relative URL without a base").
        let e = cfg(|c| c.url = "prometheus.monitoring:9090".into());
        assert_eq!(
            e,
            "--prometheus-url prometheus.monitoring:9090: has no scheme; write \"http://prometheus.monitoring:9090\" (or https://)"
        );
        let e = cfg(|c| {
            c.url = "thanos".into();
            c.url_setting = "spec.prometheus.url".into();
        });
        assert!(
            e.starts_with("spec.prometheus.url thanos: has no scheme"),
            "{e}"
        );
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

    #[test]
    fn warnings_make_a_partial_sample_without_their_text() {
        let body = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"pod":"a"},"value":[1700000000,"3"]}]},
            "warnings":["store 10.0.0.7:10901 unreachable"]}"#;
        assert_eq!(
            parse_response(200, body).unwrap(),
            Sample::Partial {
                values: vec![3.0],
                timestamp: ts(1_700_000_000.0),
                warnings: 1
            }
        );
        let empty = r#"{"status":"success","data":{"resultType":"vector","result":[]},"warnings":["a","b"]}"#;
        let Sample::Missing { reason } = parse_response(200, empty).unwrap() else {
            panic!("not missing")
        };
        assert!(
            reason.contains("partial data") && reason.contains("2 warnings"),
            "{reason}"
        );
        assert!(!reason.contains("unreachable"), "{reason}");
        // Without warnings (or with an empty list) the answer is complete.
        let complete = r#"{"status":"success","data":{"resultType":"scalar","result":[1700000000,"1"]},"warnings":[]}"#;
        assert!(matches!(
            parse_response(200, complete).unwrap(),
            Sample::Series { .. }
        ));
    }

    #[test]
    fn the_series_cap_refuses_larger_answers_naming_the_flag() {
        let limits = AnswerLimits {
            max_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            max_series: 2,
        };
        let vector = |n: usize| {
            let items: Vec<String> = (0..n)
                .map(|i| format!(r#"{{"metric":{{"i":"{i}"}},"value":[1700000000,"1"]}}"#))
                .collect();
            format!(
                r#"{{"status":"success","data":{{"resultType":"vector","result":[{}]}}}}"#,
                items.join(",")
            )
        };
        assert!(parse_instant(200, vector(2).as_bytes(), limits).is_ok());
        let e = parse_instant(200, vector(3).as_bytes(), limits).unwrap_err();
        assert_eq!(e.kind, "limit");
        assert!(
            e.message.contains("3 series") && e.message.contains("--prometheus-max-series"),
            "{}",
            e.message
        );
        let matrix = r#"{"status":"success","data":{"resultType":"matrix","result":[
            {"metric":{"a":"1"},"values":[[1700000000,"1"]]},
            {"metric":{"a":"2"},"values":[[1700000000,"1"]]},
            {"metric":{"a":"3"},"values":[[1700000000,"1"]]}]}}"#;
        let e = parse_range(200, matrix.as_bytes(), limits).unwrap_err();
        assert_eq!(e.kind, "limit");
    }

    #[test]
    fn bodies_that_are_not_prometheus_answers_stay_out_of_errors() {
        for (status, body) in [
            (
                200,
                r#"{"status":"success","data":{"resultType":"secret-leak","result":1}}"#,
            ),
            (200, "root:x:0:0:root:/root:/bin/bash"),
            (302, ""),
            (
                500,
                r#"{"status":"error","errorType":"leak","error":"internal-token-42"}"#,
            ),
            (401, "<html>login for internal-token-42</html>"),
        ] {
            let e = parse_response(status, body).unwrap_err();
            for needle in [
                "secret-leak",
                "root:x",
                "internal-token-42",
                "leak",
                "<html",
            ] {
                assert!(!e.message.contains(needle), "{body}: {}", e.message);
            }
            assert!(
                e.message.contains(&format!("HTTP {status}")),
                "{}",
                e.message
            );
        }
    }

    /// A server on 127.0.0.1 that answers every request with `head` and then `body_len` bytes of
    /// `fill` (it stops when the reader hangs up); returns its URL and the bytes it wrote.
    async fn streaming_server(
        head: &'static str,
        body_len: u64,
    ) -> (String, Arc<std::sync::atomic::AtomicU64>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = written.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 8192];
                    let _ = s.read(&mut buf).await;
                    if s.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let block = vec![b' '; 65536];
                    let mut sent = 0;
                    while sent < body_len {
                        if s.write_all(&block).await.is_err() {
                            break;
                        }
                        sent += block.len() as u64;
                        counter.fetch_add(block.len() as u64, std::sync::atomic::Ordering::SeqCst);
                    }
                });
            }
        });
        (url, written)
    }

    #[tokio::test]
    async fn the_byte_cap_stops_reading_a_streamed_answer() {
        // 1 GiB of whitespace (valid JSON padding) with no Content-Length.
        let (url, written) = streaming_server(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n",
            1 << 30,
        )
        .await;
        let src = PrometheusSource::new(&PrometheusConfig {
            url,
            timeout: Duration::from_secs(20),
            limits: AnswerLimits {
                max_bytes: 1 << 20,
                max_series: 10,
            },
            ..Default::default()
        })
        .unwrap();
        let o = src.query_all_outcomes(["up"]).await.remove("up").unwrap();
        assert_eq!(o.error_kind, Some("limit"), "{o:?}");
        let Sample::Error { message } = &o.sample else {
            panic!("{o:?}")
        };
        assert!(
            message.contains("1048576-byte cap (--prometheus-max-response-bytes)"),
            "{message}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let sent = written.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            sent < 64 << 20,
            "{sent} bytes written: the reader did not stop"
        );

        // A Content-Length over the cap is refused before reading.
        let (url, _) = streaming_server(
            "HTTP/1.1 200 OK\r\nContent-Length: 2000000000\r\nConnection: close\r\n\r\n",
            0,
        )
        .await;
        let src = PrometheusSource::new(&PrometheusConfig {
            url,
            limits: AnswerLimits {
                max_bytes: 1 << 20,
                max_series: 10,
            },
            ..Default::default()
        })
        .unwrap();
        let o = src.query_all_outcomes(["up"]).await.remove("up").unwrap();
        assert_eq!(o.error_kind, Some("limit"), "{o:?}");
    }

    #[tokio::test]
    async fn one_deadline_covers_all_of_a_servers_queries() {
        // Accepts and never answers; one query at a time, so the second waits in the queue.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let src = PrometheusSource::new(&PrometheusConfig {
            url,
            timeout: Duration::from_millis(800),
            max_concurrency: 1,
            ..Default::default()
        })
        .unwrap();
        let start = Instant::now();
        let outcomes = src.query_all_outcomes(["a", "b", "c"]).await;
        let took = start.elapsed();
        assert!(took < Duration::from_millis(1500), "{took:?}");
        assert_eq!(outcomes.len(), 3);
        for o in outcomes.values() {
            assert_eq!(o.error_kind, Some("timeout"), "{o:?}");
            let Sample::Error { message } = &o.sample else {
                panic!("{o:?}")
            };
            assert!(message.contains("--prometheus-timeout"), "{message}");
        }
    }

    #[test]
    fn answer_caps_of_zero_are_refused_naming_the_flag() {
        let e = PrometheusSource::new(&PrometheusConfig {
            limits: AnswerLimits {
                max_bytes: 0,
                max_series: 1,
            },
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().starts_with(MAX_BYTES_FLAG), "{e}");
        let e = PrometheusSource::new(&PrometheusConfig {
            limits: AnswerLimits {
                max_bytes: 1,
                max_series: 0,
            },
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().starts_with(MAX_SERIES_FLAG), "{e}");
    }
}
