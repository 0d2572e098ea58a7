//! The one accept/serve loop behind every listener of the daemon (`/metrics` and the external
//! metrics adapter), with the limits that keep a flood of clients from exhausting the process.
//!
//! - **Connections** ([`Limits::max_connections`]): at most this many per listener. A new
//!   connection beyond it closes the oldest *idle* one (no request in progress: a TLS handshake,
//!   a head being read, or a keep-alive wait), so idle or slow clients cannot lock out a real
//!   one; when every connection is busy with a request, the new one is closed at once.
//! - **Request heads** ([`Limits::max_header_bytes`], [`Limits::max_headers`]): a larger head
//!   (request line plus headers) is answered 431 and the connection closed, by hyper before
//!   any handler runs; so a connection never buffers more than this.
//! - **Request targets** ([`Limits::max_request_target_bytes`]): a longer path and query is
//!   answered 414 before the handler (authentication, caches) sees it.
//! - **Time** ([`Limits::header_timeout`]): bound on a TLS handshake, on reading a request's
//!   head, and on an idle keep-alive connection waiting for its next request.
//! - **Accept errors** (out of file descriptors, `ECONNABORTED`...) never stop the loop: it backs
//!   off briefly (from [`ACCEPT_BACKOFF_MIN`] doubling to [`ACCEPT_BACKOFF_MAX`]) and accepts
//!   again, logging once per burst.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::builder::TypedValueParser as _;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

/// Default of `--metrics-max-connections`.
pub const DEFAULT_METRICS_MAX_CONNECTIONS: usize = 64;
/// Default of `--external-metrics-max-connections`.
pub const DEFAULT_EXTERNAL_METRICS_MAX_CONNECTIONS: usize = 512;
/// Default of `--max-request-header-bytes`.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
/// Default of `--max-request-target-bytes`.
pub const DEFAULT_MAX_REQUEST_TARGET_BYTES: usize = 8 * 1024;
/// Headers per request at most (hyper's default, stated here so it is documented and tested).
pub const MAX_HEADERS: usize = 100;
/// hyper's smallest read buffer: a head limit below it is raised to it.
const MIN_BUF: usize = 8 * 1024;
/// First pause after a failed accept.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between accepts while they keep failing.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// `kscale run` flags shared by every listener.
#[derive(Debug, Clone, clap::Args)]
pub struct ListenerArgs {
    /// Largest request head (request line plus headers) a listener reads, in bytes; a larger
    /// one is answered 431 (`/metrics` and the external metrics adapter).
    #[arg(long, env = "KSCALE_MAX_REQUEST_HEADER_BYTES", default_value_t = DEFAULT_MAX_HEADER_BYTES,
          value_parser = clap::value_parser!(u32).range(8192..=1_048_576).map(|v| v as usize))]
    pub max_request_header_bytes: usize,
    /// Longest request target (path and query) a listener serves, in bytes; a longer one is
    /// answered 414 before authentication.
    #[arg(long, env = "KSCALE_MAX_REQUEST_TARGET_BYTES", default_value_t = DEFAULT_MAX_REQUEST_TARGET_BYTES,
          value_parser = clap::value_parser!(u32).range(256..=1_048_576).map(|v| v as usize))]
    pub max_request_target_bytes: usize,
    /// Bound on a TLS handshake, on reading a request's head, and on an idle keep-alive
    /// connection waiting for its next request (Go-style duration).
    #[arg(long, env = "KSCALE_REQUEST_HEADER_TIMEOUT", default_value = "30s",
          value_parser = crate::units::parse_std_duration)]
    pub request_header_timeout: Duration,
    /// Connections the `/metrics` listener holds at most (see the external metrics adapter's
    /// `--external-metrics-max-connections` for what happens beyond it).
    #[arg(long, env = "KSCALE_METRICS_MAX_CONNECTIONS", default_value_t = DEFAULT_METRICS_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000).map(|v| v as usize))]
    pub metrics_max_connections: usize,
}

impl ListenerArgs {
    /// The limits of a listener holding at most `max_connections`.
    pub fn limits(&self, max_connections: usize) -> Limits {
        Limits {
            max_connections,
            max_header_bytes: self.max_request_header_bytes,
            max_headers: MAX_HEADERS,
            max_request_target_bytes: self.max_request_target_bytes,
            header_timeout: self.request_header_timeout,
        }
    }
}

/// What one listener allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections held at once.
    pub max_connections: usize,
    /// Largest request head in bytes (431 beyond).
    pub max_header_bytes: usize,
    /// Headers per request (431 beyond).
    pub max_headers: usize,
    /// Longest request target in bytes (414 beyond).
    pub max_request_target_bytes: usize,
    /// Bound on a handshake, a head, and a keep-alive wait.
    pub header_timeout: Duration,
}

impl Limits {
    /// The defaults of a listener holding at most `max_connections`.
    pub fn with_max_connections(max_connections: usize) -> Limits {
        Limits {
            max_connections,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: MAX_HEADERS,
            max_request_target_bytes: DEFAULT_MAX_REQUEST_TARGET_BYTES,
            header_timeout: Duration::from_secs(30),
        }
    }
}

/// Where connections come from: a [`TcpListener`], or a fake at this seam in tests.
pub trait Accept: Send + 'static {
    /// The accepted stream.
    type Stream: Send + 'static;
    /// The next connection.
    fn accept(
        &mut self,
    ) -> impl Future<Output = std::io::Result<(Self::Stream, SocketAddr)>> + Send;
}

impl Accept for TcpListener {
    type Stream = TcpStream;
    async fn accept(&mut self) -> std::io::Result<(TcpStream, SocketAddr)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, peer))
    }
}

/// What a listener serves: how a connection starts (plain, or a TLS handshake) and how a
/// request is answered.
pub trait Handler<S>: Send + Sync + 'static {
    /// The connection after its handshake.
    type Io: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static;
    /// What the handshake learned about the connection (a client certificate's name, say).
    type Conn: Send + Sync + 'static;
    /// Starts a connection; `Err` (logged at debug) closes it.
    fn handshake(
        &self,
        stream: S,
    ) -> impl Future<Output = Result<(Self::Io, Self::Conn), String>> + Send;
    /// Answers one request.
    fn handle(
        &self,
        conn: &Self::Conn,
        req: Request<Incoming>,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;
}

/// A plain-HTTP connection (no handshake).
pub fn plain(stream: TcpStream) -> hyper_util::rt::TokioIo<TcpStream> {
    hyper_util::rt::TokioIo::new(stream)
}

/// The live connections of one listener, oldest first, and whether each is in a request.
struct Slots {
    max: usize,
    inner: Mutex<SlotsInner>,
}

#[derive(Default)]
struct SlotsInner {
    next: u64,
    live: BTreeMap<u64, Slot>,
}

struct Slot {
    busy: usize,
    close: Arc<Notify>,
}

/// What the accept loop does with a new connection.
#[derive(Debug, PartialEq, Eq)]
enum Admission {
    /// Admitted under the limit.
    Admitted(u64),
    /// Admitted after closing the oldest idle connection.
    Evicted(u64),
    /// Every connection is busy: refused.
    Refused,
}

fn lock(m: &Mutex<SlotsInner>) -> std::sync::MutexGuard<'_, SlotsInner> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Slots {
    fn new(max: usize) -> Slots {
        Slots {
            max: max.max(1),
            inner: Mutex::new(SlotsInner::default()),
        }
    }

    /// A slot for a new connection, closing the oldest idle one at the limit.
    fn admit(&self) -> (Admission, Arc<Notify>) {
        let close = Arc::new(Notify::new());
        let mut s = lock(&self.inner);
        let mut evicted = false;
        if s.live.len() >= self.max {
            let idle = s.live.iter().find(|(_, c)| c.busy == 0).map(|(id, _)| *id);
            match idle.and_then(|id| s.live.remove(&id)) {
                Some(old) => {
                    // A stored permit: the connection closes even if it is not waiting yet.
                    old.close.notify_one();
                    evicted = true;
                }
                None => return (Admission::Refused, close),
            }
        }
        let id = s.next;
        s.next += 1;
        s.live.insert(
            id,
            Slot {
                busy: 0,
                close: close.clone(),
            },
        );
        let admission = if evicted {
            Admission::Evicted(id)
        } else {
            Admission::Admitted(id)
        };
        (admission, close)
    }

    fn release(&self, id: u64) {
        lock(&self.inner).live.remove(&id);
    }

    /// Marks a request in progress (`+1`) or done (`-1`) on connection `id`.
    fn busy(&self, id: u64, delta: isize) {
        if let Some(slot) = lock(&self.inner).live.get_mut(&id) {
            slot.busy = slot.busy.saturating_add_signed(delta);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.inner).live.len()
    }
}

/// Frees a connection's slot when its task ends, however it ends.
struct SlotGuard {
    slots: Arc<Slots>,
    id: u64,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots.release(self.id);
    }
}

/// Marks a request in progress for as long as it lives.
struct BusyGuard {
    slots: Arc<Slots>,
    id: u64,
}

impl BusyGuard {
    fn new(slots: Arc<Slots>, id: u64) -> BusyGuard {
        slots.busy(id, 1);
        BusyGuard { slots, id }
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.slots.busy(self.id, -1);
    }
}

/// Counts a burst of like failures so each burst is logged once, when it starts and when it
/// ends.
#[derive(Default)]
struct Burst {
    count: u64,
}

impl Burst {
    /// One more failure; true for the first of a burst.
    fn hit(&mut self) -> bool {
        self.count += 1;
        self.count == 1
    }

    /// The burst ended; how many failures it had.
    fn end(&mut self) -> Option<u64> {
        (self.count > 0).then(|| std::mem::take(&mut self.count))
    }
}

/// The pause after the `n`th consecutive accept error (`n` from 1).
fn backoff(n: u64) -> Duration {
    let shift = u32::try_from(n.saturating_sub(1).min(16)).unwrap_or(16);
    ACCEPT_BACKOFF_MIN
        .saturating_mul(1u32 << shift)
        .min(ACCEPT_BACKOFF_MAX)
}

fn plain_response(code: StatusCode, text: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Accepts connections from `accept` and serves them with `handler` under `limits` until the
/// task is dropped. `name` (`metrics`, `external-metrics`) labels the logs.
pub async fn serve<A, H>(mut accept: A, limits: Limits, handler: Arc<H>, name: &'static str)
where
    A: Accept,
    H: Handler<A::Stream>,
{
    let slots = Arc::new(Slots::new(limits.max_connections));
    let mut errors = Burst::default();
    let mut refused = Burst::default();
    loop {
        let (stream, peer) = match accept.accept().await {
            Ok(s) => s,
            Err(e) => {
                if errors.hit() {
                    warn!(listener = name, error = %e, "accept failed; backing off and accepting again");
                }
                tokio::time::sleep(backoff(errors.count)).await;
                continue;
            }
        };
        if let Some(n) = errors.end() {
            info!(listener = name, failures = n, "accepting connections again");
        }
        let (admission, close) = slots.admit();
        let id = match admission {
            Admission::Admitted(id) => {
                if let Some(n) = refused.end() {
                    info!(
                        listener = name,
                        refused = n,
                        "connections admitted again after refusals"
                    );
                }
                id
            }
            Admission::Evicted(id) => {
                debug!(listener = name, %peer, max = limits.max_connections, "connection limit: closed the oldest idle connection");
                id
            }
            Admission::Refused => {
                if refused.hit() {
                    warn!(
                        listener = name,
                        max = limits.max_connections,
                        "connection limit reached with every connection busy: refusing new connections"
                    );
                }
                drop(stream);
                continue;
            }
        };
        let handler = handler.clone();
        let slots = slots.clone();
        tokio::spawn(async move {
            let _slot = SlotGuard {
                slots: slots.clone(),
                id,
            };
            tokio::select! {
                () = connection(stream, peer, limits, handler, slots, id, name) => {}
                () = close.notified() => {
                    debug!(listener = name, %peer, "closed to admit a newer connection");
                }
            }
        });
    }
}

/// One connection: handshake, then requests until it ends.
async fn connection<S, H: Handler<S>>(
    stream: S,
    peer: SocketAddr,
    limits: Limits,
    handler: Arc<H>,
    slots: Arc<Slots>,
    id: u64,
    name: &'static str,
) {
    let (io, conn) =
        match tokio::time::timeout(limits.header_timeout, handler.handshake(stream)).await {
            Ok(Ok(started)) => started,
            Ok(Err(e)) => {
                debug!(listener = name, %peer, error = %e, "handshake failed");
                return;
            }
            Err(_) => {
                debug!(listener = name, %peer, "handshake timed out");
                return;
            }
        };
    let conn = Arc::new(conn);
    let max_target = limits.max_request_target_bytes;
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (handler, conn, busy) = (
            handler.clone(),
            conn.clone(),
            BusyGuard::new(slots.clone(), id),
        );
        async move {
            let _busy = busy;
            let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
            let response = if target > max_target {
                plain_response(
                    StatusCode::URI_TOO_LONG,
                    format!(
                        "the request target is {target} bytes, longer than the limit of {max_target} (--max-request-target-bytes)\n"
                    ),
                )
            } else {
                handler.handle(&conn, req).await
            };
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(limits.max_header_bytes.max(MIN_BUF))
        .max_buf_size(limits.max_header_bytes.max(MIN_BUF))
        .max_headers(limits.max_headers)
        .serve_connection(io, service)
        .await
    {
        debug!(listener = name, %peer, error = %e, "connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[test]
    fn at_the_limit_the_oldest_idle_connection_makes_room_and_busy_ones_are_kept() {
        let slots = Slots::new(2);
        let (a, close_a) = slots.admit();
        let (b, _) = slots.admit();
        assert_eq!((a, b), (Admission::Admitted(0), Admission::Admitted(1)));
        slots.busy(1, 1);
        // 0 is idle, so it goes; its task is told to close.
        let (c, _) = slots.admit();
        assert_eq!(c, Admission::Evicted(2));
        assert_eq!(slots.len(), 2);
        let notified = close_a.notified();
        tokio::pin!(notified);
        assert!(
            futures::FutureExt::now_or_never(notified).is_some(),
            "the evicted connection's close was signalled"
        );
        slots.busy(2, 1);
        // Both busy: refused, nothing evicted.
        assert_eq!(slots.admit().0, Admission::Refused);
        assert_eq!(slots.len(), 2);
        slots.busy(2, -1);
        assert_eq!(slots.admit().0, Admission::Evicted(3));
        slots.release(3);
        slots.release(1);
        assert_eq!(slots.len(), 0);
    }

    #[test]
    fn backoff_doubles_up_to_its_ceiling_and_bursts_log_once() {
        assert_eq!(backoff(1), ACCEPT_BACKOFF_MIN);
        assert_eq!(backoff(2), ACCEPT_BACKOFF_MIN * 2);
        assert_eq!(backoff(1000), ACCEPT_BACKOFF_MAX);
        let mut b = Burst::default();
        assert_eq!(b.end(), None);
        assert!(b.hit());
        assert!(!b.hit());
        assert_eq!(b.end(), Some(2));
        assert!(b.hit());
    }

    /// A listener whose first accepts fail as when the process is out of file descriptors.
    struct Flaky {
        failures: usize,
        inner: TcpListener,
    }

    impl Accept for Flaky {
        type Stream = TcpStream;
        async fn accept(&mut self) -> std::io::Result<(TcpStream, SocketAddr)> {
            if self.failures > 0 {
                self.failures -= 1;
                return Err(std::io::Error::from_raw_os_error(24)); // EMFILE
            }
            Accept::accept(&mut self.inner).await
        }
    }

    struct Echo;

    impl Handler<TcpStream> for Echo {
        type Io = hyper_util::rt::TokioIo<TcpStream>;
        type Conn = ();
        async fn handshake(&self, stream: TcpStream) -> Result<(Self::Io, ()), String> {
            Ok((plain(stream), ()))
        }
        async fn handle(&self, _: &(), req: Request<Incoming>) -> Response<Full<Bytes>> {
            plain_response(StatusCode::OK, req.uri().path().to_string())
        }
    }

    async fn start(failures: usize, limits: Limits) -> SocketAddr {
        let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        tokio::spawn(serve(
            Flaky { failures, inner },
            limits,
            Arc::new(Echo),
            "test",
        ));
        addr
    }

    /// Sends `head` on a fresh connection and reads until the server closes or answers.
    async fn exchange(addr: SocketAddr, head: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(head).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    fn get(path: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes()
    }

    #[tokio::test]
    async fn the_loop_survives_accept_errors() {
        let addr = start(8, Limits::with_max_connections(4)).await;
        let answer = exchange(addr, &get("/after-emfile")).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("/after-emfile"), "{answer}");
    }

    #[tokio::test]
    async fn long_targets_get_414_and_large_heads_431() {
        let limits = Limits {
            max_request_target_bytes: 100,
            max_header_bytes: 8192,
            ..Limits::with_max_connections(4)
        };
        let addr = start(0, limits).await;
        let ok = exchange(addr, &get(&format!("/{}", "a".repeat(99)))).await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        let long = exchange(addr, &get(&format!("/{}", "a".repeat(100)))).await;
        assert!(long.starts_with("HTTP/1.1 414"), "{long}");
        assert!(long.contains("--max-request-target-bytes"), "{long}");
        let big = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "b".repeat(9000)
        );
        let big = exchange(addr, big.as_bytes()).await;
        assert!(big.starts_with("HTTP/1.1 431"), "{big}");
        let mut many = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("X-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        let many = exchange(addr, many.as_bytes()).await;
        assert!(many.starts_with("HTTP/1.1 431"), "{many}");
    }

    #[tokio::test]
    async fn silent_connections_time_out() {
        let limits = Limits {
            header_timeout: Duration::from_millis(300),
            ..Limits::with_max_connections(3)
        };
        let addr = start(0, limits).await;
        // A silent connection is closed after the header timeout (read returns EOF).
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
            .await
            .expect("closed by the server")
            .unwrap_or(0);
        assert_eq!(n, 0);
        // So is a keep-alive connection idle after its request.
        let mut kept = TcpStream::connect(addr).await.unwrap();
        kept.write_all(&get("/once")).await.unwrap();
        let mut answer = Vec::new();
        let eof = tokio::time::timeout(Duration::from_secs(10), kept.read_to_end(&mut answer))
            .await
            .expect("closed by the server");
        assert!(eof.is_ok());
        assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    }

    #[tokio::test]
    async fn idle_connections_make_room_at_the_limit() {
        let addr = start(0, Limits::with_max_connections(3)).await;
        // Ten idle connections against a limit of three (none times out within the test): a
        // real request still answers.
        let mut idle = Vec::new();
        for _ in 0..10 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let answer = exchange(addr, &get("/legit")).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}
