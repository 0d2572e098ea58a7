//! See `main.rs`: the sources part of the abuse suite (issue 13, kinds 2, 3, 4 and 8).
//!
//! Each test runs the daemon (as the chart's ServiceAccount, watching one throwaway namespace)
//! with two policies: a healthy neighbour `web` on the environment's Prometheus (interval 2 s)
//! and a hostile policy `hostile` whose `spec.prometheus.url` is a small server in the test on
//! 127.0.0.1 that misbehaves one way. The neighbour keeps its interval: after its metric changes,
//! its scale write lands within interval + 1 s of the change being visible in Prometheus (the
//! issue's own bound; the visibility is polled every 100 ms, so the measurement starts at most
//! 100 ms after the change was visible). The hostile policy's status names the limit and
//! carries no text of the hostile server's answers.
//!
//! The tests of this module run one at a time (a module lock): each measures the neighbour's
//! latency, and two daemons at once on the 2-core test machine would only measure each other.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kscale::crd::{ScalingPolicy, ScalingPolicyStatus};
use kube::api::{Api, PostParams};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::support;

/// One test of this module at a time (see the module docs).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The neighbour's interval.
const INTERVAL: Duration = Duration::from_secs(2);
/// The issue's bound on the neighbour's scale write after its metric changed.
const SLACK: Duration = Duration::from_secs(1);

// ------------------------------------------------------------------ hostile servers

/// How a test server answers.
#[derive(Clone)]
enum Behaviour {
    /// Accepts connections and never answers (nor reads).
    BlackHole,
    /// `200 OK` and a body of 1 GiB of vector elements, written as fast as it is read.
    Stream1GiB,
    /// `302 Found` to another URL.
    Redirect(String),
    /// `502 Bad Gateway` with an HTML page holding this marker.
    Html502(&'static str),
    /// A Prometheus answer of one series with this value, and `warnings` (Thanos with a store
    /// down answers so).
    Warnings(f64),
    /// A Prometheus answer of one series with this value.
    Value(f64),
}

/// What a test server saw.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    /// Request heads (request line and headers) as received.
    heads: Mutex<Vec<String>>,
    /// The most body bytes written on one connection.
    most_sent: AtomicU64,
}

impl Seen {
    fn heads(&self) -> Vec<String> {
        self.heads.lock().map(|h| h.clone()).unwrap_or_default()
    }
}

/// A server on 127.0.0.1 in a task of the test; stopped on drop.
struct TestServer {
    url: String,
    seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    async fn start(behaviour: Behaviour) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let seen = Arc::new(Seen::default());
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut held = Vec::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    seen.connections.fetch_add(1, Ordering::SeqCst);
                    let seen = seen.clone();
                    let behaviour = behaviour.clone();
                    held.push(tokio::spawn(answer(stream, behaviour, seen)));
                    held.retain(|t| !t.is_finished());
                }
            })
        };
        TestServer { url, seen, task }
    }
}

/// Reads a request head (up to 64 KiB).
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

async fn answer(mut stream: TcpStream, behaviour: Behaviour, seen: Arc<Seen>) {
    if let Behaviour::BlackHole = behaviour {
        // Hold the connection, read nothing, answer nothing.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(stream);
        return;
    }
    let Some(head) = read_head(&mut stream).await else {
        return;
    };
    if let Ok(mut heads) = seen.heads.lock() {
        heads.push(head);
    }
    let json = |body: String| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let reply = match behaviour {
        Behaviour::BlackHole => return,
        Behaviour::Stream1GiB => {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{\"status\":\"success\",\"data\":{\"resultType\":\"vector\",\"result\":[";
            if stream.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let element = "{\"metric\":{\"pod\":\"p\"},\"value\":[1700000000,\"1\"]},";
            let block = element.repeat(65536 / element.len());
            let mut sent: u64 = 0;
            while sent < 1 << 30 {
                if stream.write_all(block.as_bytes()).await.is_err() {
                    break;
                }
                sent += block.len() as u64;
                seen.most_sent.fetch_max(sent, Ordering::SeqCst);
            }
            return;
        }
        Behaviour::Redirect(to) => format!(
            "HTTP/1.1 302 Found\r\nLocation: {to}/api/v1/query\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
        Behaviour::Html502(marker) => {
            let body = format!(
                "<html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1><p>{marker}</p></body></html>"
            );
            format!(
                "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        }
        Behaviour::Warnings(v) => json(format!(
            r#"{{"status":"success","data":{{"resultType":"vector","result":[{{"metric":{{}},"value":[{},"{v}"]}}]}},"warnings":["store 10.0.0.7:10901 unreachable: partial response"]}}"#,
            now_seconds()
        )),
        Behaviour::Value(v) => json(format!(
            r#"{{"status":"success","data":{{"resultType":"vector","result":[{{"metric":{{}},"value":[{},"{v}"]}}]}}}}"#,
            now_seconds()
        )),
    };
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}

// ------------------------------------------------------------------ the daemon

/// The daemon as a child process, killed on drop.
struct Daemon {
    child: Child,
    log: PathBuf,
    _binding: support::BindingGuard,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// `kscale run` for `namespace` as the chart's ServiceAccount, on the environment's
    /// Prometheus, with `extra` flags.
    async fn start(
        env: &support::TestEnv,
        client: &kube::Client,
        namespace: &str,
        name: &str,
        extra: &[&str],
    ) -> Daemon {
        let (kubeconfig, binding) =
            support::service_account_kubeconfig(env, client, namespace).await;
        let log = support::repo_root().join(format!(
            "target/isolation-sources-{name}-{}.log",
            std::process::id()
        ));
        let file = std::fs::File::create(&log).expect("daemon log file");
        let child = Command::new(env!("CARGO_BIN_EXE_kscale"))
            .args([
                "run",
                "--metrics-addr",
                &format!("127.0.0.1:{}", support::free_port()),
            ])
            .args(["--watch-namespace", namespace])
            .args(["--leader-election-namespace", namespace])
            .args(["--instance", name])
            .args(["--leader-lease-duration", "4s", "--leader-renew", "1s"])
            .args(extra)
            .env("KUBECONFIG", &kubeconfig)
            .env("KSCALE_PROMETHEUS_URL", &env.prometheus_url)
            .env("RUST_LOG", "kscale=debug,info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("kscale run starts");
        Daemon {
            child,
            log,
            _binding: binding,
        }
    }

    /// `VmHWM` (peak resident memory) of the daemon, in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status")
    }
}

// ------------------------------------------------------------------ the scenario

/// A namespace with Deployments `web` (2 replicas) and `hostile` (`hostile_replicas`), the
/// neighbour policy `web` on an exporter metric at 10 (5 per replica: 2 replicas), and a
/// hostile policy on `hostile` whose spec is given.
struct Scenario {
    ns: support::TestNamespace,
    exporter: support::TestExporter,
    metric: String,
    query: String,
    policies: Api<ScalingPolicy>,
    deployments: Api<Deployment>,
}

impl Scenario {
    async fn start(
        env: &support::TestEnv,
        client: &kube::Client,
        prefix: &str,
        hostile_replicas: i32,
    ) -> Scenario {
        support::install_crd(client).await;
        let ns = support::create_namespace(env, client, prefix).await;
        support::create_kwok_deployment(client, &ns.name, "web", 2, "100m", "50m").await;
        support::create_kwok_deployment(
            client,
            &ns.name,
            "hostile",
            hostile_replicas,
            "100m",
            "50m",
        )
        .await;
        let exporter = support::TestExporter::start(env, &ns.name);
        let metric = format!("kscale_iso_{}_load", prefix.replace('-', "_"));
        exporter.set(&metric, &[], 10.0);
        let query = format!("sum({metric}{{exporter=\"{}\"}})", exporter.id);
        let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
        let web = support::scaling_policy(
            &ns.name,
            "web",
            support::WEB_DEPLOYMENT,
            &format!(
                r#"  minReplicas: 1
  maxReplicas: 20
  interval: {interval}s
  metrics:
  - name: load
    prometheus: {{query: '{query}'}}
    target: {{type: AverageValue, averageValue: "5"}}
  behavior:
    scaleDown: {{stabilizationWindowSeconds: 0}}
"#,
                interval = INTERVAL.as_secs(),
            ),
        );
        policies
            .create(&PostParams::default(), &web)
            .await
            .expect("neighbour policy created");
        let deployments = Api::namespaced(client.clone(), &ns.name);
        Scenario {
            ns,
            exporter,
            metric,
            query,
            policies,
            deployments,
        }
    }

    /// Creates the hostile policy: 1 s interval, metric `m` (AverageValue 5) from `spec.prometheus`
    /// = `prometheus` (JSON), on Deployment `hostile`.
    async fn hostile(&self, prometheus: serde_json::Value) {
        let p: ScalingPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "kscale.dev/v1alpha1",
            "kind": "ScalingPolicy",
            "metadata": {"name": "hostile", "namespace": self.ns.name},
            "spec": {
                "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "hostile"},
                "minReplicas": 1,
                "maxReplicas": 20,
                "interval": "1s",
                "prometheus": prometheus,
                "metrics": [{
                    "name": "m",
                    "prometheus": {"query": "sum(hostile_metric)"},
                    "target": {"type": "AverageValue", "averageValue": "5"}
                }],
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 0}}
            }
        }))
        .expect("hostile policy parses");
        self.policies
            .create(&PostParams::default(), &p)
            .await
            .expect("hostile policy admitted");
    }

    /// Waits until the hostile policy's status satisfies `check` (which sees its reason and the
    /// whole status as JSON); returns the status.
    async fn hostile_status(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&str, &str) -> bool,
    ) -> ScalingPolicyStatus {
        support::wait_until(what, timeout, || async {
            let p = self
                .policies
                .get("hostile")
                .await
                .map_err(|e| e.to_string())?;
            let s = p.status.ok_or("no status yet")?;
            let reason = s.reason.clone().unwrap_or_default();
            let json = serde_json::to_string(&s).map_err(|e| e.to_string())?;
            if check(&reason, &json) {
                Ok(s)
            } else {
                Err(format!("reason {reason:?}"))
            }
        })
        .await
    }

    /// The value of the neighbour's metric is `value` in Prometheus; returns when that was seen.
    async fn wait_visible(&self, env: &support::TestEnv, value: f64) -> Instant {
        let start = Instant::now();
        loop {
            if let Ok(Some(v)) = support::prometheus_scalar(env, &self.query)
                && (v - value).abs() < 1e-9
            {
                return Instant::now();
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{} = {value} never visible in Prometheus",
                self.query
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls Deployment `name` every 100 ms until it has `want` replicas; the time since `from`.
    async fn replicas_at(
        &self,
        name: &str,
        want: i32,
        from: Instant,
        timeout: Duration,
        log: &Path,
    ) -> Duration {
        loop {
            let got = self
                .deployments
                .get(name)
                .await
                .ok()
                .and_then(|d| d.spec)
                .and_then(|s| s.replicas)
                .unwrap_or(-1);
            if got == want {
                return from.elapsed();
            }
            assert!(
                from.elapsed() < timeout,
                "Deployment {name} has {got} replicas, wanted {want} within {timeout:?}; {}",
                support::log_tail(log)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The neighbour keeps its interval: it reaches 2 replicas, then after its metric goes to
    /// 30 (6 replicas) and back to 15 (3 replicas), each scale write lands within interval + 1 s
    /// of the new value being visible in Prometheus. Returns the two latencies.
    async fn neighbour_keeps_its_interval(
        &self,
        env: &support::TestEnv,
        daemon: &Daemon,
    ) -> [Duration; 2] {
        let far = Duration::from_secs(60);
        self.replicas_at("web", 2, Instant::now(), far, &daemon.log)
            .await;
        let mut took = [Duration::ZERO; 2];
        for (i, (value, want)) in [(30.0, 6), (15.0, 3)].into_iter().enumerate() {
            self.exporter.set(&self.metric, &[], value);
            let visible = self.wait_visible(env, value).await;
            took[i] = self
                .replicas_at("web", want, visible, far, &daemon.log)
                .await;
            eprintln!(
                "neighbour: {} → {want} replicas {:?} after the value was visible",
                value, took[i]
            );
            assert!(
                took[i] <= INTERVAL + SLACK,
                "the neighbour's scale write to {want} took {:?} after its metric was visible, more than interval {INTERVAL:?} + {SLACK:?}; {}",
                took[i],
                support::log_tail(&daemon.log)
            );
        }
        took
    }
}

fn hostile_replicas_now(s: &ScalingPolicyStatus) -> Option<i32> {
    s.desired_replicas
}

// ------------------------------------------------------------------ kind 2: waiting

/// A server that accepts and never answers, with the longest timeout a policy may set: the
/// neighbour keeps its interval meanwhile, and the hostile policy's status names its deadline.
#[tokio::test]
async fn black_hole_server_delays_only_its_own_policy() {
    let _serial = SERIAL.lock().await;
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    let sc = Scenario::start(env, &client, "iso-blackhole", 2).await;
    let hole = TestServer::start(Behaviour::BlackHole).await;
    sc.hostile(serde_json::json!({"url": hole.url, "timeout": "60s"}))
        .await;
    let daemon = Daemon::start(env, &client, &sc.ns.name, "blackhole", &[]).await;

    // The hostile server holds its group for a minute; the neighbour meanwhile keeps its pace.
    support::wait_until(
        "the daemon to reach the black hole",
        Duration::from_secs(30),
        || async {
            match hole.seen.connections.load(Ordering::SeqCst) {
                0 => Err("no connection yet".to_string()),
                _ => Ok(()),
            }
        },
    )
    .await;
    sc.neighbour_keeps_its_interval(env, &daemon).await;

    let status = sc
        .hostile_status(
            "the hostile policy's deadline error",
            Duration::from_secs(90),
            |reason, _| reason.contains("spec.prometheus.timeout") && reason.contains("60s"),
        )
        .await;
    eprintln!("hostile: {:?}", status.reason);
    assert_eq!(
        hostile_replicas_now(&status),
        Some(2),
        "{:?}",
        status.reason
    );
    // One group at a time per server: the black hole never holds more than a handful of
    // connections (one per query of a group in flight), not one per tick.
    let connections = hole.seen.connections.load(Ordering::SeqCst);
    assert!(
        connections <= 4,
        "{connections} connections to the black hole"
    );
}

// ------------------------------------------------------------------ kind 3: memory

/// A server streaming 1 GiB: reading stops at the byte cap, the daemon's memory stays bounded,
/// and the hostile policy's status names the cap.
#[tokio::test]
async fn a_gigabyte_answer_is_cut_at_the_byte_cap() {
    let _serial = SERIAL.lock().await;
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    let sc = Scenario::start(env, &client, "iso-huge", 2).await;
    let huge = TestServer::start(Behaviour::Stream1GiB).await;
    sc.hostile(serde_json::json!({"url": huge.url})).await;
    let cap: u64 = 4 * 1024 * 1024;
    let daemon = Daemon::start(
        env,
        &client,
        &sc.ns.name,
        "huge",
        &["--prometheus-max-response-bytes", &cap.to_string()],
    )
    .await;

    let status = sc
        .hostile_status(
            "the hostile policy's byte-cap error",
            Duration::from_secs(60),
            |reason, _| {
                reason.contains("--prometheus-max-response-bytes")
                    && reason.contains(&format!("{cap}-byte cap"))
            },
        )
        .await;
    eprintln!("hostile: {:?}", status.reason);
    sc.neighbour_keeps_its_interval(env, &daemon).await;

    let most = huge.seen.most_sent.load(Ordering::SeqCst);
    let connections = huge.seen.connections.load(Ordering::SeqCst);
    let peak = daemon.peak_rss_kib();
    eprintln!(
        "1 GiB server: {connections} connections, at most {most} bytes written on one (the cap is {cap}; the rest sits in socket buffers); daemon peak RSS {peak} KiB"
    );
    assert!(
        connections >= 3,
        "the hostile policy was queried {connections} times"
    );
    assert!(
        most < 64 * 1024 * 1024,
        "{most} bytes written on one connection: the reader did not stop at the cap"
    );
    assert!(
        peak < 256 * 1024,
        "daemon peak RSS {peak} KiB after {connections} gigabyte answers"
    );
}

// ------------------------------------------------------------------ kind 4: where requests go

/// A redirect is not followed: the second listener receives nothing, and the status names the
/// HTTP status only.
#[tokio::test]
async fn redirects_are_not_followed() {
    let _serial = SERIAL.lock().await;
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    let sc = Scenario::start(env, &client, "iso-redirect", 2).await;
    let target = TestServer::start(Behaviour::Value(1.0)).await;
    let redirector = TestServer::start(Behaviour::Redirect(target.url.clone())).await;
    sc.hostile(serde_json::json!({
        "url": redirector.url,
        "headers": [{"name": "X-Scope-OrgID", "value": "tenant-of-the-redirector"}],
    }))
    .await;
    let daemon = Daemon::start(env, &client, &sc.ns.name, "redirect", &[]).await;

    let status = sc
        .hostile_status(
            "the hostile policy's HTTP 302 error",
            Duration::from_secs(60),
            |reason, _| reason.contains("HTTP 302"),
        )
        .await;
    eprintln!("hostile: {:?}", status.reason);
    sc.neighbour_keeps_its_interval(env, &daemon).await;
    let asked = redirector.seen.connections.load(Ordering::SeqCst);
    assert!(asked >= 3, "the redirector was asked {asked} times");
    assert_eq!(
        target.seen.connections.load(Ordering::SeqCst),
        0,
        "the redirect's target received a connection: {:?}",
        target.seen.heads()
    );
}

/// A Secret without the opt-in label is never used: no request reaches the server (so no
/// credentials), and the status names the Secret and the label.
#[tokio::test]
async fn an_unlabelled_secret_is_not_sent() {
    let _serial = SERIAL.lock().await;
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    let sc = Scenario::start(env, &client, "iso-secret", 2).await;
    let listener = TestServer::start(Behaviour::Value(1.0)).await;
    // Shaped like a legacy ServiceAccount token Secret: exactly the key `token`.
    support::apply_yaml(
        &client,
        &sc.ns.name,
        "apiVersion: v1\nkind: Secret\nmetadata: {name: legacy-token}\nstringData: {token: sa-token-the-author-cannot-read}\n",
    )
    .await;
    sc.hostile(serde_json::json!({"url": listener.url, "secretRef": {"name": "legacy-token"}}))
        .await;
    let daemon = Daemon::start(env, &client, &sc.ns.name, "secret", &[]).await;

    let status = sc
        .hostile_status(
            "the hostile policy's missing-label error",
            Duration::from_secs(60),
            |reason, _| {
                reason.contains(&format!("Secret {}/legacy-token", sc.ns.name))
                    && reason.contains("kscale.dev/prometheus-credentials")
            },
        )
        .await;
    eprintln!("hostile: {:?}", status.reason);
    sc.neighbour_keeps_its_interval(env, &daemon).await;
    let heads = listener.seen.heads();
    assert!(
        heads
            .iter()
            .all(|h| !h.contains("sa-token-the-author-cannot-read")),
        "the token was sent: {heads:?}"
    );
    assert_eq!(
        listener.seen.connections.load(Ordering::SeqCst),
        0,
        "the server was asked without the label: {heads:?}"
    );

    // With the label (set by whoever may write the Secret), the credentials are used.
    support::apply_yaml(
        &client,
        &sc.ns.name,
        "apiVersion: v1\nkind: Secret\nmetadata: {name: legacy-token, labels: {kscale.dev/prometheus-credentials: \"true\"}}\nstringData: {token: sa-token-the-author-cannot-read}\n",
    )
    .await;
    support::wait_until(
        "a request with the token",
        Duration::from_secs(30),
        || async {
            let heads = listener.seen.heads();
            match heads
                .iter()
                .any(|h| h.contains("Bearer sa-token-the-author-cannot-read"))
            {
                true => Ok(()),
                false => Err(format!("{} requests", heads.len())),
            }
        },
    )
    .await;
}

/// A server answering an HTML 502: the status says "HTTP 502" and carries none of the page.
#[tokio::test]
async fn an_html_error_page_stays_out_of_the_status() {
    let _serial = SERIAL.lock().await;
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    let sc = Scenario::start(env, &client, "iso-html", 2).await;
    const MARKER: &str = "internal-admin-console-token-7f3a";
    let page = TestServer::start(Behaviour::Html502(MARKER)).await;
    sc.hostile(serde_json::json!({"url": page.url})).await;
    let daemon = Daemon::start(env, &client, &sc.ns.name, "html", &[]).await;

    let status = sc
        .hostile_status(
            "the hostile policy's HTTP 502 error",
            Duration::from_secs(60),
            |reason, _| reason.contains("HTTP 502") && reason.contains("body logged by the daemon"),
        )
        .await;
    eprintln!("hostile: {:?}", status.reason);
    sc.neighbour_keeps_its_interval(env, &daemon).await;
    let p = sc.policies.get("hostile").await.expect("hostile policy");
    let json = serde_json::to_string(&p.status).expect("status JSON");
    for needle in [MARKER, "<html", "Bad Gateway</h1>"] {
        assert!(!json.contains(needle), "{needle:?} in the status: {json}");
    }
    // The daemon's log has it, for the operator.
    let log = std::fs::read_to_string(&daemon.log).unwrap_or_default();
    assert!(log.contains(MARKER), "the page is not in the daemon's log");
}

// ------------------------------------------------------------------ kind 8: partial data

/// An answer with warnings is partial data: the low sum never scales down (4 replicas stay 4
/// although 5 / 5 per replica would give 1), and the reason says partial.
#[tokio::test]
async fn an_answer_with_warnings_never_scales_down() {
    let _serial = SERIAL.lock().await;
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    let sc = Scenario::start(env, &client, "iso-partial", 4).await;
    let partial = TestServer::start(Behaviour::Warnings(5.0)).await;
    sc.hostile(serde_json::json!({"url": partial.url})).await;
    let daemon = Daemon::start(env, &client, &sc.ns.name, "partial", &[]).await;

    let status = sc
        .hostile_status(
            "the hostile policy's partial-data hold",
            Duration::from_secs(60),
            |reason, _| reason.contains("partial data"),
        )
        .await;
    eprintln!("hostile: {:?}", status.reason);
    let reason = status.reason.clone().unwrap_or_default();
    assert!(reason.starts_with("hold 4→4"), "{reason}");
    assert!(
        !reason.contains("unreachable"),
        "warning text in the status: {reason}"
    );
    sc.neighbour_keeps_its_interval(env, &daemon).await;
    let now = sc
        .replicas_at(
            "hostile",
            4,
            Instant::now(),
            Duration::from_secs(5),
            &daemon.log,
        )
        .await;
    assert!(now < Duration::from_secs(5));
    // Several evaluations later it still holds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let d = sc
        .deployments
        .get("hostile")
        .await
        .expect("hostile deployment");
    assert_eq!(d.spec.and_then(|s| s.replicas), Some(4));
}

// ------------------------------------------------------------------ the timeout ceiling

/// `spec.prometheus.timeout` has a ceiling of 60s: the apiserver refuses more (and `1d`), the
/// compiler too; 60s is admitted.
#[tokio::test]
async fn the_prometheus_timeout_has_a_ceiling_at_admission() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    support::install_crd(&client).await;
    let ns = support::create_namespace(env, &client, "iso-timeout").await;
    let api: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
    let policy = |name: &str, timeout: &str| -> ScalingPolicy {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kscale.dev/v1alpha1",
            "kind": "ScalingPolicy",
            "metadata": {"name": name, "namespace": ns.name},
            "spec": {
                "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                "maxReplicas": 5,
                "prometheus": {"url": "http://prometheus.monitoring:9090", "timeout": timeout},
                "metrics": [{
                    "name": "m",
                    "prometheus": {"query": "up"},
                    "target": {"type": "Value", "value": "1"}
                }]
            }
        }))
        .expect("policy parses")
    };
    for (name, timeout) in [
        ("over", "61s"),
        ("hours", "2h"),
        ("days", "1d"),
        ("zero", "0s"),
    ] {
        match api
            .create(&PostParams::default(), &policy(name, timeout))
            .await
        {
            Ok(_) => panic!("timeout {timeout} admitted"),
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 422, "{timeout}: {e:?}");
                assert!(
                    e.message.contains("spec.prometheus.timeout")
                        && e.message.contains("at most 60s"),
                    "{timeout}: {}",
                    e.message
                );
            }
            Err(e) => panic!("{timeout}: {e}"),
        }
        let compiled = kscale::policy::CompiledPolicy::from_resource(&policy(name, timeout));
        let errors = compiled.expect_err(timeout).to_string();
        assert!(errors.contains("spec.prometheus.timeout"), "{errors}");
    }
    let ok = policy("ceiling", "60s");
    api.create(&PostParams::default(), &ok)
        .await
        .expect("60s is admitted");
    kscale::policy::CompiledPolicy::from_resource(&ok).expect("60s compiles");
}
