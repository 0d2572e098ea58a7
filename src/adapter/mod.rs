//! `external.metrics.k8s.io/v1beta1`: kscale as an aggregated API server, so a stock HPA (and
//! `kubectl get --raw`) reads kscale's metrics through kube-apiserver.
//!
//! - [`types`]: the wire types and `Status` errors.
//! - [`cache`]: what is served: each policy's metrics and desired replicas (filled by the
//!   controller after each evaluation) and the static rules' recent answers.
//! - [`rules`]: static external rules and the label selector → PromQL matchers translation.
//! - [`auth`]: front-proxy certificates, TokenReview, SubjectAccessReview.
//! - [`tls`]: serving certificate (files or self-signed) and client-certificate verification.
//! - [`forward`]: with `--external-metrics-upstream`, every name kscale does not serve goes to
//!   another provider (KEDA's, prometheus-adapter), whose answer is relayed.
//!
//! Served paths: `/apis`, `/apis/external.metrics.k8s.io`, `/apis/external.metrics.k8s.io/v1beta1`
//! (discovery), `/openapi/v2`, `/openapi/v3[/...]`, and
//! `/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/{metric}?labelSelector=...`.
//! `/healthz`, `/livez` and `/readyz` answer without authentication.

pub mod auth;
pub mod cache;
pub mod forward;
pub mod rules;
pub mod tls;
pub mod types;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use chrono::Utc;
use clap::builder::TypedValueParser as _;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::model::Sample;
use crate::source::query::QueryBackend;
use cache::Value;
pub use cache::{Cache, Evaluation};
use rules::CompiledRule;
use types::{ExternalMetricValue, ExternalMetricValueList, GROUP, GROUP_VERSION, Status, VERSION};

/// `kscale run` flags of the adapter.
#[derive(Debug, Clone, clap::Args)]
pub struct ExternalMetricsArgs {
    /// Serve external.metrics.k8s.io/v1beta1 over TLS on this address (off when unset).
    #[arg(long, env = "KSCALE_EXTERNAL_METRICS_ADDR")]
    pub external_metrics_addr: Option<SocketAddr>,
    /// Serving certificate (PEM chain), for example from a mounted Secret; self-signed when unset.
    #[arg(
        long,
        env = "KSCALE_EXTERNAL_METRICS_TLS_CERT_FILE",
        requires = "external_metrics_tls_key_file"
    )]
    pub external_metrics_tls_cert_file: Option<PathBuf>,
    /// The serving certificate's key (PEM).
    #[arg(
        long,
        env = "KSCALE_EXTERNAL_METRICS_TLS_KEY_FILE",
        requires = "external_metrics_tls_cert_file"
    )]
    pub external_metrics_tls_key_file: Option<PathBuf>,
    /// Names of the self-signed certificate (DNS names or IPs), comma-separated.
    #[arg(
        long,
        env = "KSCALE_EXTERNAL_METRICS_CERT_NAMES",
        value_delimiter = ',',
        default_value = "localhost,127.0.0.1"
    )]
    pub external_metrics_cert_names: Vec<String>,
    /// Static external rules (YAML: `externalRules: [{name, query, namespaced}]`).
    #[arg(long, env = "KSCALE_EXTERNAL_RULES")]
    pub external_rules: Option<PathBuf>,
    /// Connections the adapter holds at most. Beyond it a new connection closes the oldest idle
    /// one (TLS handshake, head being read, or keep-alive wait), or is refused when every
    /// connection is in a request. Head size, target length and timeouts:
    /// `--max-request-header-bytes`, `--max-request-target-bytes`, `--request-header-timeout`.
    #[arg(long, env = "KSCALE_EXTERNAL_METRICS_MAX_CONNECTIONS",
          default_value_t = crate::listener::DEFAULT_EXTERNAL_METRICS_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000).map(|v| v as usize))]
    pub external_metrics_max_connections: usize,
    /// The provider that serves every other name ([`forward`]).
    #[command(flatten)]
    pub upstream: forward::UpstreamArgs,
}

/// Why the adapter could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// TLS setup.
    #[error("external metrics adapter: {0}")]
    Tls(#[from] tls::TlsError),
    /// Front-proxy settings.
    #[error("external metrics adapter: {0}")]
    Auth(#[from] auth::AuthError),
    /// The rules file.
    #[error("external metrics adapter: {0}")]
    Rules(#[from] rules::RulesError),
    /// The upstream provider's settings.
    #[error("external metrics adapter: {0}")]
    Forward(#[from] forward::ForwardError),
    /// Binding the address.
    #[error("--external-metrics-addr {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// Everything a request handler needs.
pub struct Adapter {
    /// The served values.
    pub cache: Arc<Cache>,
    rules: Vec<CompiledRule>,
    /// Where rule queries go (`None` without rules).
    prometheus: Option<Arc<dyn QueryBackend>>,
    front_proxy: RwLock<Arc<auth::FrontProxy>>,
    tls: RwLock<Arc<rustls::ServerConfig>>,
    reviewer: auth::Reviewer,
    /// Where names kscale does not serve go (`--external-metrics-upstream`).
    forward: Option<Arc<forward::Forwarder>>,
}

/// How often the front-proxy settings and a certificate from files are read again (a rotated
/// front-proxy CA or a renewed serving certificate is picked up without a restart).
const RELOAD_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Where the serving certificate comes from.
enum CertSource {
    Files(PathBuf, PathBuf),
    SelfSigned(tls::ServingCert),
}

impl CertSource {
    fn load(&self) -> Result<tls::ServingCert, tls::TlsError> {
        match self {
            CertSource::Files(c, k) => tls::from_files(c, k),
            CertSource::SelfSigned(cert) => Ok(cert.clone()),
        }
    }
}

fn read<T: Clone>(lock: &RwLock<T>) -> T {
    match lock.read() {
        Ok(v) => v.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

fn write<T>(lock: &RwLock<T>, value: T) {
    match lock.write() {
        Ok(mut v) => *v = value,
        Err(poisoned) => *poisoned.into_inner() = value,
    }
}

/// A running adapter.
pub struct Running {
    /// The cache the controller fills.
    pub cache: Arc<Cache>,
    /// The bound address.
    pub addr: SocketAddr,
    /// The serving certificate (PEM), for a `caBundle` when it is self-signed.
    pub cert_pem: String,
    /// The accept loop.
    pub task: tokio::task::JoinHandle<()>,
}

impl Adapter {
    /// Reads the front-proxy settings and the rules, and binds; the accept loop runs in a task
    /// and serves under `limits` ([`crate::listener`]). With `forward`, names it does not serve
    /// go there ([`forward::Forwarder::new`] builds it from the flags).
    pub async fn start(
        args: &ExternalMetricsArgs,
        addr: SocketAddr,
        client: kube::Client,
        prometheus: Arc<dyn QueryBackend>,
        limits: crate::listener::Limits,
        forward: Option<forward::Forwarder>,
    ) -> Result<Running, AdapterError> {
        let rules = match &args.external_rules {
            Some(path) => rules::load(path)?,
            None => Vec::new(),
        };
        let source = match (
            &args.external_metrics_tls_cert_file,
            &args.external_metrics_tls_key_file,
        ) {
            (Some(c), Some(k)) => CertSource::Files(c.clone(), k.clone()),
            _ => CertSource::SelfSigned(tls::self_signed(&args.external_metrics_cert_names)?),
        };
        let cert = source.load()?;
        let cert_pem = cert.pem.clone();
        let front_proxy = auth::FrontProxy::load(&client).await?;
        let config = tls::server_config(cert, Some(&front_proxy.client_ca))?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AdapterError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| AdapterError::Bind { addr, source })?;
        let cache = Arc::new(Cache::new());
        let prometheus = (!rules.is_empty()).then_some(prometheus);
        let adapter = Arc::new(Adapter {
            cache: cache.clone(),
            rules,
            prometheus,
            front_proxy: RwLock::new(Arc::new(front_proxy)),
            tls: RwLock::new(config),
            reviewer: auth::Reviewer::new(client.clone()),
            forward: forward.map(Arc::new),
        });
        let upstream = adapter.forward.as_ref().map(|f| f.url().to_string());
        info!(%addr, rules = adapter.rules.len(), max_connections = limits.max_connections, upstream, "serving external.metrics.k8s.io/v1beta1");
        let reload = reload(adapter.clone(), client, source, cert_pem.clone());
        let task = tokio::spawn(async move {
            tokio::select! {
                () = crate::listener::serve(listener, limits, adapter, "external-metrics") => {}
                () = reload => {}
            }
        });
        Ok(Running {
            cache,
            addr,
            cert_pem,
            task,
        })
    }
}

/// Every [`RELOAD_EVERY`], reads the front-proxy settings and the certificate again and swaps
/// the TLS configuration when either changed; a failed read keeps the current one.
async fn reload(adapter: Arc<Adapter>, client: kube::Client, source: CertSource, mut pem: String) {
    let mut tick = tokio::time::interval(RELOAD_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        let front_proxy = match auth::FrontProxy::load(&client).await {
            Ok(f) => f,
            Err(e) => {
                warn!(error = %e, "external metrics: keeping the front-proxy settings");
                continue;
            }
        };
        let cert = match source.load() {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "external metrics: keeping the serving certificate");
                continue;
            }
        };
        if *read(&adapter.front_proxy) == front_proxy && cert.pem == pem {
            continue;
        }
        let new_pem = cert.pem.clone();
        match tls::server_config(cert, Some(&front_proxy.client_ca)) {
            Ok(config) => {
                write(&adapter.tls, config);
                write(&adapter.front_proxy, Arc::new(front_proxy));
                pem = new_pem;
                info!(
                    "external metrics: reloaded the front-proxy settings and serving certificate"
                );
            }
            Err(e) => warn!(error = %e, "external metrics: keeping the TLS configuration"),
        }
    }
}

impl crate::listener::Handler<tokio::net::TcpStream> for Adapter {
    type Io = hyper_util::rt::TokioIo<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;
    /// The common name of the client certificate, verified against the front-proxy CA in the
    /// handshake.
    type Conn = Option<String>;

    async fn handshake(
        &self,
        stream: tokio::net::TcpStream,
    ) -> Result<(Self::Io, Self::Conn), String> {
        let acceptor = tokio_rustls::TlsAcceptor::from(read(&self.tls));
        let tls = acceptor
            .accept(stream)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let proxy_cn = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| tls::common_name(c.as_ref()));
        Ok((hyper_util::rt::TokioIo::new(tls), proxy_cn))
    }

    async fn handle(&self, proxy_cn: &Self::Conn, req: Request<Incoming>) -> Response<Full<Bytes>> {
        Adapter::handle(self, proxy_cn.as_deref(), req).await
    }
}

fn json_response(code: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn health() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    r
}

fn ok<T: serde::Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(e) => failure(500, format!("encoding the response: {e}")),
    }
}

fn failure(code: u16, message: impl Into<String>) -> Response<Full<Bytes>> {
    let status = Status::failure(code, message);
    let body = serde_json::to_vec(&status).unwrap_or_default();
    json_response(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body,
    )
}

/// What a path asks for.
enum Route<'a> {
    Health,
    Groups,
    Group,
    Resources,
    OpenApiV2,
    OpenApiV3,
    OpenApiV3Group,
    Metric { namespace: &'a str, metric: &'a str },
    NotFound,
}

impl Route<'_> {
    /// The canonical path a discovery or OpenAPI route is authorized as (a non-resource URL).
    fn non_resource_path(&self) -> Option<&'static str> {
        match self {
            Route::Groups => Some("/apis"),
            Route::Group => Some("/apis/external.metrics.k8s.io"),
            Route::Resources => Some("/apis/external.metrics.k8s.io/v1beta1"),
            Route::OpenApiV2 => Some("/openapi/v2"),
            Route::OpenApiV3 => Some("/openapi/v3"),
            Route::OpenApiV3Group => Some("/openapi/v3/apis/external.metrics.k8s.io/v1beta1"),
            Route::Health | Route::Metric { .. } | Route::NotFound => None,
        }
    }
}

fn route(path: &str) -> Route<'_> {
    let prefix = "/apis/external.metrics.k8s.io/v1beta1";
    match path.trim_end_matches('/') {
        "/healthz" | "/livez" | "/readyz" => Route::Health,
        "/apis" => Route::Groups,
        "/apis/external.metrics.k8s.io" => Route::Group,
        p if p == prefix => Route::Resources,
        "/openapi/v2" => Route::OpenApiV2,
        "/openapi/v3" => Route::OpenApiV3,
        "/openapi/v3/apis/external.metrics.k8s.io/v1beta1" => Route::OpenApiV3Group,
        p => match p
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix("/namespaces/"))
        {
            Some(rest) => match rest.split('/').collect::<Vec<_>>()[..] {
                [namespace, metric] if !namespace.is_empty() && !metric.is_empty() => {
                    Route::Metric { namespace, metric }
                }
                _ => Route::NotFound,
            },
            None => Route::NotFound,
        },
    }
}

/// The `labelSelector` query parameter, percent-decoded.
fn label_selector(query: Option<&str>) -> Result<String, String> {
    for pair in query.unwrap_or("").split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == "labelSelector" {
            return form_decode(v);
        }
    }
    Ok(String::new())
}

fn form_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let b = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| "labelSelector: bad percent-encoding".to_string())?;
                out.push(b);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| "labelSelector is not UTF-8".to_string())
}

impl Adapter {
    /// Answers one request: authenticate, authorize, serve.
    pub async fn handle(
        &self,
        proxy_cn: Option<&str>,
        req: Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let route = route(&path);
        if matches!(route, Route::Health) {
            return health();
        }
        let user = match self.authenticate(proxy_cn, req.headers()).await {
            Ok(u) => u,
            Err(resp) => return *resp,
        };
        // What is authorized (and the key of the cached decision) is the parsed request, never
        // the raw path: a path that names nothing served is 404 without a review.
        let attrs = match &route {
            Route::Metric { namespace, metric } => auth::Attributes::Metric {
                namespace: namespace.to_string(),
                metric: metric.to_string(),
            },
            Route::NotFound => {
                return failure(404, "the server could not find the requested resource");
            }
            other => match other.non_resource_path() {
                Some(p) => auth::Attributes::NonResource(p),
                None => return failure(404, "the server could not find the requested resource"),
            },
        };
        match self.reviewer.authorize(&user, &attrs).await {
            Ok(true) => {}
            Ok(false) => {
                return failure(
                    403,
                    format!("user {:?} may not get {}", user.name, attrs.describe()),
                );
            }
            Err(e) => {
                warn!(error = %e, "authorization failed");
                return failure(500, "authorization is unavailable");
            }
        }
        if req.method() != Method::GET {
            return failure(405, format!("{} is not supported", req.method()));
        }
        match route {
            Route::Health => health(),
            Route::Groups => ok(&serde_json::json!({
                "kind": "APIGroupList", "apiVersion": "v1",
                "groups": [group_json()]
            })),
            Route::Group => {
                let mut g = group_json();
                g["kind"] = "APIGroup".into();
                g["apiVersion"] = "v1".into();
                ok(&g)
            }
            Route::Resources => ok(&self.resources()),
            Route::OpenApiV2 => ok(&serde_json::json!({
                "swagger": "2.0",
                "info": {"title": "kscale external metrics", "version": VERSION},
                "paths": {}
            })),
            Route::OpenApiV3 => ok(&serde_json::json!({
                "paths": {format!("apis/{GROUP_VERSION}"): {
                    "serverRelativeURL": format!("/openapi/v3/apis/{GROUP_VERSION}")
                }}
            })),
            Route::OpenApiV3Group => ok(&serde_json::json!({
                "openapi": "3.0.0",
                "info": {"title": "kscale external metrics", "version": VERSION},
                "paths": {}
            })),
            Route::Metric { namespace, metric } => {
                // A name kscale does not serve goes upstream with its query string untouched
                // (kscale's selector parser never sees it).
                if let Some(forward) = &self.forward
                    && !self.serves(namespace, metric)
                    && let Some(answer) = forward
                        .metric(namespace, metric, req.uri().query(), req.headers())
                        .await
                {
                    return answer;
                }
                match label_selector(req.uri().query())
                    .and_then(|s| rules::parse_selector(&s).map_err(|e| e.to_string()))
                {
                    Ok(selector) => self.metric(namespace, metric, &selector).await,
                    Err(message) => failure(400, message),
                }
            }
            Route::NotFound => failure(404, "the server could not find the requested resource"),
        }
    }

    async fn authenticate(
        &self,
        proxy_cn: Option<&str>,
        headers: &hyper::HeaderMap,
    ) -> Result<auth::User, Box<Response<Full<Bytes>>>> {
        if let Some(cn) = proxy_cn {
            return read(&self.front_proxy)
                .user(cn, headers)
                .map_err(|m| Box::new(failure(401, m)));
        }
        let token = headers
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let Some(token) = token else {
            return Err(Box::new(failure(
                401,
                "authentication required: a front-proxy client certificate or a bearer token",
            )));
        };
        match self.reviewer.authenticate(token).await {
            Ok(Some(user)) => Ok(user),
            Ok(None) => Err(Box::new(failure(401, "the bearer token is not valid"))),
            Err(e) => {
                warn!(error = %e, "token review failed");
                Err(Box::new(failure(500, "authentication is unavailable")))
            }
        }
    }

    /// Discovery: kscale's names, then the upstream's others ([`forward`]).
    fn resources(&self) -> serde_json::Value {
        let mut names = self.cache.names();
        names.extend(self.rules.iter().map(|r| r.rule.name.clone()));
        names.sort();
        names.dedup();
        let upstream = self
            .forward
            .as_ref()
            .map(forward::Forwarder::resources)
            .unwrap_or_default();
        forward::resource_list(forward::merge_resources(&names, upstream))
    }

    /// Whether kscale answers `metric` in `namespace` from what it holds: a static rule (any
    /// namespace) or a policy's published name.
    fn serves(&self, namespace: &str, metric: &str) -> bool {
        self.rules.iter().any(|r| r.rule.name == metric)
            || self.cache.get(namespace, metric).is_some()
    }

    async fn metric(
        &self,
        namespace: &str,
        metric: &str,
        selector: &[rules::Requirement],
    ) -> Response<Full<Bytes>> {
        // A static rule (the operator's) wins over a policy's metric of the same name, so no
        // policy can stand in for it.
        if let Some(rule) = self.rules.iter().find(|r| r.rule.name == metric) {
            return self.rule_metric(rule, namespace, selector).await;
        }
        if let Some(entry) = self.cache.get(namespace, metric) {
            return entry_response(metric, &entry, selector, Utc::now());
        }
        failure(
            404,
            format!("external metric {metric:?} is not served in namespace {namespace:?}"),
        )
    }

    async fn rule_metric(
        &self,
        rule: &CompiledRule,
        namespace: &str,
        selector: &[rules::Requirement],
    ) -> Response<Full<Bytes>> {
        let query = rule.render(namespace, selector);
        let Some(prometheus) = &self.prometheus else {
            return failure(500, "external rules are not set up");
        };
        let answer = match self.cache.rule_answer(&query) {
            Some(a) if a.fetched.elapsed() < rule.stale_after => {
                if a.fetched.elapsed() >= rule.refresh && self.cache.start_refresh(&query) {
                    let fetch = fetch(prometheus.clone(), query.clone());
                    let cache = self.cache.clone();
                    let query = query.clone();
                    tokio::spawn(async move {
                        cache.store_rule_answer(&query, fetch.await);
                    });
                }
                a.sample
            }
            _ => {
                // First request for this selector (or the answer expired): one bounded query.
                let sample = fetch(prometheus.clone(), query.clone()).await;
                self.cache.store_rule_answer(&query, sample.clone());
                sample
            }
        };
        let name = &rule.rule.name;
        match answer {
            Sample::Series { values, timestamp } => {
                let items = values
                    .iter()
                    .filter(|v| v.is_finite())
                    .map(|v| ExternalMetricValue::new(name, BTreeMap::new(), timestamp, *v))
                    .collect();
                ok(&ExternalMetricValueList::new(items))
            }
            Sample::Missing { .. } => ok(&ExternalMetricValueList::new(Vec::new())),
            Sample::Error { message } => {
                warn!(metric = %name, %query, error = %message, "external rule query failed");
                failure(500, format!("external metric {name:?}: the query failed"))
            }
            Sample::Partial { warnings, .. } => {
                // A partial sum could let the HPA scale down on missing data: no value instead.
                warn!(metric = %name, %query, warnings, "external rule query answered partial data");
                failure(
                    500,
                    format!("external metric {name:?}: the answer was partial"),
                )
            }
            Sample::Pods(_) => failure(500, format!("external metric {name:?}: no value")),
        }
    }
}

/// The answer for a cached policy metric at `now`: its value if the selector matches its labels
/// (an empty list if not), an error if it has no valid value or is older than its bound.
fn entry_response(
    metric: &str,
    entry: &cache::Entry,
    selector: &[rules::Requirement],
    now: chrono::DateTime<Utc>,
) -> Response<Full<Bytes>> {
    match &entry.value {
        Value::Number {
            value,
            timestamp,
            bound,
        } => {
            if now - *timestamp > *bound {
                return failure(
                    500,
                    format!(
                        "metric {metric}: the last value is from {} and older than its bound of {}s (the policy is no longer evaluated)",
                        timestamp.to_rfc3339(),
                        bound.num_seconds()
                    ),
                );
            }
            let items = if selector.iter().all(|r| r.matches(&entry.labels)) {
                vec![ExternalMetricValue::new(
                    metric,
                    entry.labels.clone(),
                    *timestamp,
                    *value,
                )]
            } else {
                Vec::new()
            };
            ok(&ExternalMetricValueList::new(items))
        }
        Value::Unavailable(message) => failure(500, message.clone()),
    }
}

/// The sample for a rule's `query`, owning what it needs so it can run on a task of its own.
async fn fetch(prometheus: Arc<dyn QueryBackend>, query: String) -> Sample {
    let mut all = prometheus.query_all(vec![query.clone()]).await;
    all.remove(&query).unwrap_or(Sample::Missing {
        reason: format!("Prometheus gave no answer for {query:?}"),
    })
}

fn group_json() -> serde_json::Value {
    let version = serde_json::json!({"groupVersion": GROUP_VERSION, "version": VERSION});
    serde_json::json!({"name": GROUP, "versions": [version.clone()], "preferredVersion": version})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert!(matches!(
            route("/apis/external.metrics.k8s.io/v1beta1/namespaces/default/web-queue"),
            Route::Metric {
                namespace: "default",
                metric: "web-queue"
            }
        ));
        assert!(matches!(
            route("/apis/external.metrics.k8s.io/v1beta1/"),
            Route::Resources
        ));
        assert!(matches!(
            route("/apis/external.metrics.k8s.io/v1beta1/namespaces/default/a/b"),
            Route::NotFound
        ));
        assert!(matches!(route("/api/v1/pods"), Route::NotFound));
    }

    async fn body(r: Response<Full<Bytes>>) -> (u16, serde_json::Value) {
        use http_body_util::BodyExt as _;
        let code = r.status().as_u16();
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        (code, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn cached_values_are_served_until_their_bound_then_refused() {
        let t0 = Utc::now();
        let entry = cache::Entry {
            labels: BTreeMap::from([("policy".to_string(), "web".to_string())]),
            value: Value::Number {
                value: 7.0,
                timestamp: t0,
                bound: chrono::TimeDelta::seconds(60),
            },
        };
        let (code, json) = body(entry_response(
            "web-queue",
            &entry,
            &[],
            t0 + chrono::TimeDelta::seconds(60),
        ))
        .await;
        assert_eq!(code, 200);
        assert_eq!(json["items"][0]["value"], "7");
        let (code, json) = body(entry_response(
            "web-queue",
            &entry,
            &[],
            t0 + chrono::TimeDelta::seconds(61),
        ))
        .await;
        assert_eq!(code, 500);
        assert_eq!(json["reason"], "InternalError");
        assert!(
            json["message"]
                .as_str()
                .unwrap()
                .contains("older than its bound")
        );
        let other = rules::parse_selector("policy=db").unwrap();
        let (code, json) = body(entry_response("web-queue", &entry, &other, t0)).await;
        assert_eq!(
            (code, json["items"].as_array().map(Vec::len)),
            (200, Some(0))
        );
        let missing = cache::Entry {
            labels: BTreeMap::new(),
            value: Value::Unavailable("metric \"queue\" has no valid value (Missing)".into()),
        };
        let (code, json) = body(entry_response("web-queue", &missing, &[], t0)).await;
        assert_eq!(code, 500);
        assert!(json["message"].as_str().unwrap().contains("Missing"));
    }

    #[test]
    fn selector_parameter_is_decoded() {
        assert_eq!(
            label_selector(Some("x=1&labelSelector=app%3Dweb%2Ctier+in+%28a%29")).unwrap(),
            "app=web,tier in (a)"
        );
        assert_eq!(label_selector(None).unwrap(), "");
        assert!(label_selector(Some("labelSelector=%zz")).is_err());
    }
}
