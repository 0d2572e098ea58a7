//! A small external metrics provider over HTTPS, standing in for KEDA's metrics server or
//! prometheus-adapter behind kscale's `--external-metrics-upstream`.
//!
//! It serves `external.metrics.k8s.io/v1beta1` discovery and `namespaces/{ns}/{metric}` for
//! the names set with [`Upstream::set`] (one value each, in any namespace), requires a bearer
//! token when started with one, and records every request it receives (target, `Authorization`,
//! `Accept`, forwarded user headers) and every connection it accepts. [`Upstream::stop`] closes
//! the listener and every open connection. [`Fault`] makes it misbehave.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};

/// One request as the upstream received it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    /// The request target (path and query) as sent.
    pub target: String,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The `Accept` header.
    pub accept: Option<String>,
    /// An `X-Remote-User` header (a caller's identity, which must never be forwarded).
    pub remote_user: Option<String>,
}

/// How the upstream misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answers normally.
    None,
    /// Accepts, reads the request and never answers.
    Hang,
    /// Answers 200 with a body of this many bytes.
    Oversized(usize),
}

struct State {
    token: Option<String>,
    values: Mutex<BTreeMap<String, String>>,
    seen: Mutex<Vec<Seen>>,
    connections: AtomicUsize,
    fault: Mutex<Fault>,
    stop: AtomicBool,
}

/// A running upstream; stopped on drop.
pub struct Upstream {
    /// Where it listens (127.0.0.1).
    pub addr: SocketAddr,
    /// The CA of its serving certificate (for `--external-metrics-upstream-ca-file`).
    pub ca_pem: String,
    state: Arc<State>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

const PREFIX: &str = "/apis/external.metrics.k8s.io/v1beta1";

impl Upstream {
    /// Starts serving on a free port of 127.0.0.1 with a certificate for `localhost` and
    /// `127.0.0.1`; with `token`, every request must carry `Authorization: Bearer <token>`. It
    /// runs on a thread and runtime of its own, so it answers whatever the test's runtime does.
    pub fn start(token: Option<&str>) -> Upstream {
        let (listener, acceptor, ca_pem) = https_listener(Vec::new());
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State {
            token: token.map(str::to_string),
            values: Mutex::new(BTreeMap::new()),
            seen: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            fault: Mutex::new(Fault::None),
            stop: AtomicBool::new(false),
        });
        let served = state.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let flags = served.clone();
                serve_https(
                    listener,
                    acceptor,
                    (&flags.stop, &flags.connections),
                    move |req| {
                        let state = served.clone();
                        async move { answer(&state, req).await }
                    },
                )
                .await
            });
        });
        Upstream {
            addr,
            ca_pem,
            state,
            thread: Mutex::new(Some(thread)),
        }
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Serves `metric` with `value` (a quantity string) in every namespace.
    pub fn set(&self, metric: &str, value: &str) {
        lock(&self.state.values).insert(metric.to_string(), value.to_string());
    }

    /// Misbehaves from now on.
    pub fn fault(&self, fault: Fault) {
        *lock(&self.state.fault) = fault;
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.state.seen).clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Closes the listener and every connection, and waits until they are closed.
    pub fn stop(&self) {
        stop_server(self.addr, &self.state.stop, &self.thread);
    }
}

/// Stops a [`serve_https`] loop listening on `addr` with flag `stop`, running on `thread`:
/// the listener and every connection close, and this waits until they have.
pub fn stop_server(
    addr: SocketAddr,
    stop: &AtomicBool,
    thread: &Mutex<Option<std::thread::JoinHandle<()>>>,
) {
    stop.store(true, Ordering::SeqCst);
    // Wake the accept loop.
    let _ = std::net::TcpStream::connect(addr);
    if let Some(thread) = lock(thread).take() {
        let _ = thread.join();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A listener on a free port of 127.0.0.1 (non-blocking, for tokio) and a TLS acceptor with a
/// certificate for `localhost`, `127.0.0.1` and `names`; the CA's PEM.
pub fn https_listener(
    names: Vec<String>,
) -> (std::net::TcpListener, tokio_rustls::TlsAcceptor, String) {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut names = names;
    names.extend(["localhost".into(), "127.0.0.1".into()]);
    let (ca_pem, cert_pem, key_pem) = crate::support::serving_certificate(names);
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("certificate PEM");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key PEM");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("non-blocking");
    (
        listener,
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        ca_pem,
    )
}

/// Accepts HTTPS connections and answers each request with `handler` until `stop` is set (and a
/// connection wakes the accept loop); the connections end with it. `connections` counts those
/// accepted.
pub async fn serve_https<H, Fut>(
    listener: std::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    (stop, connections_seen): (&AtomicBool, &AtomicUsize),
    handler: H,
) where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    // Dropped (and so every connection aborted) when this function returns.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        connections_seen.fetch_add(1, Ordering::SeqCst);
        let acceptor = acceptor.clone();
        let handler = handler.clone();
        connections.spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, std::convert::Infallible>(handler(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

pub fn reply(code: u16, content_type: &str, body: Vec<u8>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

pub fn status(code: u16, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "code": code});
    reply(code, "application/json", body.to_string().into_bytes())
}

async fn answer(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    lock(&state.seen).push(Seen {
        target: target.clone(),
        authorization: header("authorization"),
        accept: header("accept"),
        remote_user: header("x-remote-user"),
    });
    let fault = *lock(&state.fault);
    match fault {
        Fault::Hang => std::future::pending::<()>().await,
        Fault::Oversized(n) => return reply(200, "application/json", vec![b' '; n]),
        Fault::None => {}
    }
    if let Some(token) = &state.token
        && header("authorization").as_deref() != Some(&format!("Bearer {token}"))
    {
        return status(401, "upstream: a valid bearer token is required");
    }
    let path = req.uri().path();
    let values = lock(&state.values).clone();
    if path == PREFIX {
        let resources: Vec<serde_json::Value> = values
            .keys()
            .map(|n| {
                serde_json::json!({"name": n, "singularName": "", "namespaced": true,
                "kind": "ExternalMetricValueList", "verbs": ["get"]})
            })
            .collect();
        let list = serde_json::json!({"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": "external.metrics.k8s.io/v1beta1", "resources": resources});
        return reply(200, "application/json", list.to_string().into_bytes());
    }
    let metric = path
        .strip_prefix(PREFIX)
        .and_then(|r| r.strip_prefix("/namespaces/"))
        .and_then(|r| r.split_once('/'))
        .map(|(_, m)| m);
    match metric.and_then(|m| values.get(m).map(|v| (m, v))) {
        Some((name, value)) => {
            let list = serde_json::json!({
                "kind": "ExternalMetricValueList",
                "apiVersion": "external.metrics.k8s.io/v1beta1",
                "metadata": {},
                "items": [{"metricName": name, "metricLabels": {"served-by": "upstream"},
                           "timestamp": "2026-01-01T00:00:00Z", "value": value}]
            });
            reply(200, "application/json", list.to_string().into_bytes())
        }
        None => status(404, &format!("upstream: no metric at {path}")),
    }
}
