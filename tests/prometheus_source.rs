//! The Prometheus source against the test environment's real Prometheus
//! (`scripts/testenv`; `KSCALE_SKIP_TESTENV=1` skips these loudly).

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use kscale::crd::ScalingPolicy;
use kscale::model::{Observation, Sample};
use kscale::policy::{CompiledPolicy, MetricState, PolicyState, evaluate};
use kscale::source::prometheus::{Material, NO_SERIES, PrometheusConfig, PrometheusSource};

fn source(url: &str, timeout: Duration) -> PrometheusSource {
    PrometheusSource::new(&PrometheusConfig {
        url: url.to_string(),
        timeout,
        ..Default::default()
    })
    .expect("build the source")
}

async fn one(src: &PrometheusSource, query: &str) -> Sample {
    src.query_all([query])
        .await
        .remove(query)
        .expect("one sample per query")
}

/// Bytes a client sent on one connection.
type ConnLog = Arc<Mutex<Vec<u8>>>;

/// A TCP relay on 127.0.0.1 in front of Prometheus that keeps every byte the client sent, to
/// count requests and read their headers. Stops on drop.
struct CountingProxy {
    url: String,
    addr: SocketAddr,
    sent: Arc<Mutex<Vec<ConnLog>>>,
    stop: Arc<AtomicBool>,
}

impl CountingProxy {
    fn start(upstream: &str) -> CountingProxy {
        let upstream = support::socket_addr_of(upstream);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let sent: Arc<Mutex<Vec<ConnLog>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        {
            let sent = sent.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = conn else { continue };
                    let Ok(server) = TcpStream::connect(upstream) else {
                        continue;
                    };
                    let log: ConnLog = Arc::default();
                    sent.lock().unwrap().push(log.clone());
                    let (mut c_read, mut s_write) =
                        (client.try_clone().unwrap(), server.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 8192];
                        while let Ok(n) = c_read.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            // Log before forwarding: once the answer is back, the test may read
                            // the log, so the request must already be in it.
                            log.lock().unwrap().extend_from_slice(&buf[..n]);
                            if s_write.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = s_write.shutdown(Shutdown::Write);
                    });
                    let (mut s_read, mut c_write) = (server, client);
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut s_read, &mut c_write);
                        let _ = c_write.shutdown(Shutdown::Both);
                    });
                }
            });
        }
        CountingProxy {
            url: format!("http://{addr}"),
            addr,
            sent,
            stop,
        }
    }

    /// Everything clients sent so far, as text.
    fn sent_text(&self) -> String {
        let logs = self.sent.lock().unwrap();
        logs.iter()
            .map(|l| String::from_utf8_lossy(&l.lock().unwrap()).into_owned())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn query_requests(&self) -> usize {
        self.sent_text().matches(" /api/v1/query HTTP/1.1").count()
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// Polls the source until `check` accepts the sample; panics with the last one after `limit`.
async fn wait_for_sample(
    src: &PrometheusSource,
    query: &str,
    limit: Duration,
    what: &str,
    check: impl Fn(&Sample) -> bool,
) -> Sample {
    let start = Instant::now();
    loop {
        let s = one(src, query).await;
        if check(&s) {
            return s;
        }
        if start.elapsed() > limit {
            panic!("{what}: not seen within {limit:?}; last sample of {query:?}: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn exporter_metric_comes_back_as_a_fresh_series() {
    let Some(env) = support::testenv() else {
        return;
    };
    let exporter = support::TestExporter::start(env, "prom-source-value");
    exporter.set("kscale_source_test_gauge", &[("pod", "a")], 42.5);
    exporter.set("kscale_source_test_gauge", &[("pod", "b")], 7.0);
    let src = source(&env.prometheus_url, Duration::from_secs(5));
    let query = r#"kscale_source_test_gauge{exporter="prom-source-value"}"#;
    let sample = wait_for_sample(
        &src,
        query,
        Duration::from_secs(20),
        "both series",
        |s| matches!(s, Sample::Series { values, .. } if values.len() == 2),
    )
    .await;
    let Sample::Series {
        mut values,
        timestamp,
    } = sample
    else {
        unreachable!()
    };
    values.sort_by(f64::total_cmp);
    assert_eq!(values, vec![7.0, 42.5]);
    let age = Utc::now().signed_duration_since(timestamp);
    assert!(
        age.num_seconds().abs() < 10,
        "the timestamp is Prometheus' evaluation time, close to now: {timestamp} ({age:?} ago)"
    );

    let sum = one(
        &src,
        r#"sum(kscale_source_test_gauge{exporter="prom-source-value"})"#,
    )
    .await;
    assert!(
        matches!(&sum, Sample::Series { values, .. } if values == &vec![49.5]),
        "{sum:?}"
    );
}

#[tokio::test]
async fn identical_queries_across_policies_are_sent_once() {
    let Some(env) = support::testenv() else {
        return;
    };
    let proxy = CountingProxy::start(&env.prometheus_url);
    let src = source(&proxy.url, Duration::from_secs(5));
    // Two policies' metrics in one tick: "up" twice, plus two others.
    let queries = [
        "up",
        "vector(1)",
        "up",
        "scalar(vector(2))",
        "vector(1)",
        "up",
    ];
    let outcomes = src.query_all_outcomes(queries).await;
    assert_eq!(outcomes.len(), 3, "{outcomes:?}");
    assert_eq!(proxy.query_requests(), 3, "{}", proxy.sent_text());
    for (q, o) in &outcomes {
        assert!(matches!(o.sample, Sample::Series { .. }), "{q}: {o:?}");
        assert_eq!(o.error_kind, None, "{q}: {o:?}");
        assert!(o.duration > Duration::ZERO, "{q}: {o:?}");
    }
    assert!(
        matches!(&outcomes["scalar(vector(2))"].sample, Sample::Series { values, .. } if values == &vec![2.0])
    );

    // The next tick asks again (nothing is cached across ticks).
    let samples = src.query_all(["up", "up"]).await;
    assert_eq!(samples.len(), 1);
    assert_eq!(proxy.query_requests(), 4, "{}", proxy.sent_text());
}

#[tokio::test]
async fn bearer_token_file_is_reread_each_tick() {
    let Some(env) = support::testenv() else {
        return;
    };
    let proxy = CountingProxy::start(&env.prometheus_url);
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "first-token\n").unwrap();
    let src = PrometheusSource::new(&PrometheusConfig {
        url: proxy.url.clone(),
        timeout: Duration::from_secs(5),
        bearer_token: Some(Material::File(token.clone())),
        headers: vec![("X-Scope-OrgID".into(), "tenant-1".into())],
        ..Default::default()
    })
    .unwrap();
    assert!(matches!(
        one(&src, "vector(1)").await,
        Sample::Series { .. }
    ));
    std::fs::write(&token, "second-token").unwrap();
    assert!(matches!(
        one(&src, "vector(1)").await,
        Sample::Series { .. }
    ));
    let sent = proxy.sent_text().to_ascii_lowercase();
    assert!(
        sent.contains("authorization: bearer first-token\r\n"),
        "{sent}"
    );
    assert!(
        sent.contains("authorization: bearer second-token\r\n"),
        "{sent}"
    );
    assert!(sent.contains("x-scope-orgid: tenant-1\r\n"), "{sent}");

    // A token file that went away fails the tick's queries with the flag named, not 0.
    std::fs::remove_file(&token).unwrap();
    let outcome = src.query_all_outcomes(["vector(1)"]).await;
    let o = &outcome["vector(1)"];
    assert_eq!(o.error_kind, Some("auth"));
    assert!(
        matches!(&o.sample, Sample::Error { message } if message.starts_with("--prometheus-bearer-token-file ")),
        "{o:?}"
    );
}

#[tokio::test]
async fn empty_result_is_missing() {
    let Some(env) = support::testenv() else {
        return;
    };
    let src = source(&env.prometheus_url, Duration::from_secs(5));
    assert_eq!(
        one(&src, "kscale_no_such_metric_anywhere").await,
        Sample::Missing {
            reason: NO_SERIES.into()
        }
    );
}

#[tokio::test]
async fn nan_is_passed_through_and_evaluates_as_invalid() {
    let Some(env) = support::testenv() else {
        return;
    };
    let src = source(&env.prometheus_url, Duration::from_secs(5));
    let query = "0/0";
    let sample = one(&src, query).await;
    assert!(
        matches!(&sample, Sample::Series { values, .. } if values.len() == 1 && values[0].is_nan()),
        "{sample:?}"
    );
    let inf = one(&src, "vector(1)/0").await;
    assert!(
        matches!(&inf, Sample::Series { values, .. } if values == &vec![f64::INFINITY]),
        "{inf:?}"
    );

    let resource: ScalingPolicy = serde_yaml::from_str(
        r#"
apiVersion: kscale.dev/v1alpha1
kind: ScalingPolicy
metadata: {name: p, namespace: default}
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
  minReplicas: 1
  maxReplicas: 10
  metrics:
  - name: ratio
    prometheus: {query: '0/0'}
    target: {type: AverageValue, averageValue: "1"}
"#,
    )
    .unwrap();
    let policy = CompiledPolicy::from_resource(&resource).unwrap();
    let obs = Observation::steady(3, vec![sample]);
    let d = evaluate(&policy, &obs, &PolicyState::default(), Utc::now());
    assert_eq!(d.metrics[0].state, MetricState::Invalid, "{d:?}");
    assert_eq!(d.replicas, 3, "{}", d.reason(&policy));
}

#[tokio::test]
async fn promql_error_is_an_error_with_prometheus_text() {
    let Some(env) = support::testenv() else {
        return;
    };
    let src = source(&env.prometheus_url, Duration::from_secs(5));
    let outcomes = src.query_all_outcomes(["sum(rate(x[1m])"]).await;
    let o = &outcomes["sum(rate(x[1m])"];
    assert_eq!(o.error_kind, Some("promql"), "{o:?}");
    let Sample::Error { message } = &o.sample else {
        panic!("{o:?}")
    };
    eprintln!("PromQL error: {message}");
    assert!(message.contains("bad_data"), "{message}");
    assert!(message.contains("parse error"), "{message}");
}

#[tokio::test]
async fn unreachable_prometheus_is_an_error_within_the_timeout() {
    // A port that was just free: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let src = source(
        &format!("http://kscale:hunter22@127.0.0.1:{port}"),
        Duration::from_secs(2),
    );
    let start = Instant::now();
    let outcomes = src.query_all_outcomes(["up"]).await;
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let o = &outcomes["up"];
    assert_eq!(o.error_kind, Some("connect"), "{o:?}");
    let Sample::Error { message } = &o.sample else {
        panic!("{o:?}")
    };
    eprintln!("unreachable: {message}");
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    // What happened, where, and the innermost cause; not the HTTP stack's chain.
    assert!(
        message.starts_with(&format!(
            "cannot connect to Prometheus at http://127.0.0.1:{port}/: "
        )) && message.contains("refused"),
        "{message}"
    );
    assert!(!message.contains("error sending request"), "{message}");
    assert!(
        !message.contains("hunter22"),
        "credentials leaked: {message}"
    );
}

#[tokio::test]
async fn silent_prometheus_is_a_timeout_error() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let held = std::thread::spawn(move || {
        let conn = listener.accept();
        std::thread::sleep(Duration::from_secs(3));
        drop(conn);
    });
    let src = source(&format!("http://{addr}"), Duration::from_secs(1));
    let start = Instant::now();
    let outcomes = src.query_all_outcomes(["up"]).await;
    let took = start.elapsed();
    assert!(took < Duration::from_millis(2500), "{took:?}");
    let o = &outcomes["up"];
    assert_eq!(o.error_kind, Some("timeout"), "{o:?}");
    assert!(matches!(&o.sample, Sample::Error { .. }), "{o:?}");
    eprintln!("silent: {o:?}");
    let _ = held.join();
}

#[tokio::test]
async fn stopped_exporter_goes_missing_not_silently_fresh() {
    let Some(env) = support::testenv() else {
        return;
    };
    let src = source(&env.prometheus_url, Duration::from_secs(5));

    // A series the exporter stops exposing is marked stale at the next scrape.
    let exporter = support::TestExporter::start(env, "prom-source-stops");
    exporter.set("kscale_source_stop_gauge", &[], 3.0);
    exporter.set("kscale_source_other_gauge", &[], 1.0);
    let gone = r#"kscale_source_stop_gauge{exporter="prom-source-stops"}"#;
    let sum_gone = r#"sum(kscale_source_stop_gauge{exporter="prom-source-stops"})"#;
    for q in [gone, sum_gone] {
        wait_for_sample(
            &src,
            q,
            Duration::from_secs(20),
            "the gauge",
            |s| matches!(s, Sample::Series { values, .. } if values == &vec![3.0]),
        )
        .await;
    }
    exporter.remove("kscale_source_stop_gauge");
    let start = Instant::now();
    for q in [gone, sum_gone] {
        wait_for_sample(
            &src,
            q,
            Duration::from_secs(10),
            "a removed series going Missing",
            |s| {
                *s == Sample::Missing {
                    reason: NO_SERIES.into(),
                }
            },
        )
        .await;
    }
    eprintln!("removed series went missing after {:?}", start.elapsed());

    // A whole exporter that stops (process gone, target gone) takes its series with it.
    let other = r#"kscale_source_other_gauge{exporter="prom-source-stops"}"#;
    assert!(matches!(one(&src, other).await, Sample::Series { .. }));
    drop(exporter);
    let start = Instant::now();
    wait_for_sample(
        &src,
        other,
        Duration::from_secs(15),
        "a stopped exporter's series going Missing",
        |s| matches!(s, Sample::Missing { .. }),
    )
    .await;
    eprintln!("stopped exporter went missing after {:?}", start.elapsed());
}

#[tokio::test]
async fn tls_settings_reach_a_real_https_server() {
    // The environment's kube-apiserver is a real TLS endpoint with its own CA and client
    // certificates; it answers /api/v1/query with 404, which proves the handshake worked.
    let Some(env) = support::testenv() else {
        return;
    };
    let kubeconfig = std::fs::read_to_string(&env.kubeconfig).unwrap();
    let server = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .expect("server: line in the kubeconfig")
        .to_string();
    let pki = env.dir.join("pki");
    let query = |cfg: PrometheusConfig| async move {
        let src = PrometheusSource::new(&cfg).expect("build the source");
        src.query_all_outcomes(["up"]).await.remove("up").unwrap()
    };
    let base = PrometheusConfig {
        url: server.clone(),
        timeout: Duration::from_secs(5),
        ..Default::default()
    };

    // Without the CA: the certificate is refused, with a message that says so.
    let o = query(base.clone()).await;
    eprintln!("no CA: {o:?}");
    assert_eq!(o.error_kind, Some("connect"), "{o:?}");
    assert!(
        matches!(&o.sample, Sample::Error { message } if message.to_lowercase().contains("certificate")),
        "{o:?}"
    );

    // With the CA and the admin client certificate: TLS works and the HTTP status shows.
    let o = query(PrometheusConfig {
        ca: Some(Material::File(pki.join("ca.crt"))),
        client_cert: Some(Material::File(pki.join("admin.crt"))),
        client_key: Some(Material::File(pki.join("admin.key"))),
        ..base.clone()
    })
    .await;
    eprintln!("CA and client certificate: {o:?}");
    assert_eq!(o.error_kind, Some("http"), "{o:?}");
    assert!(
        matches!(&o.sample, Sample::Error { message } if message.starts_with("HTTP 404 ")),
        "{o:?}"
    );

    // A key that does not match the certificate is refused up front, naming both flags.
    let e = PrometheusSource::new(&PrometheusConfig {
        ca: Some(Material::File(pki.join("ca.crt"))),
        client_cert: Some(Material::File(pki.join("admin.crt"))),
        client_key: Some(Material::File(pki.join("kwok.key"))),
        ..base
    })
    .unwrap_err()
    .to_string();
    eprintln!("mismatched key: {e}");
    assert!(
        e.starts_with("--prometheus-client-cert-file ")
            && e.contains("--prometheus-client-key-file"),
        "{e}"
    );
}
