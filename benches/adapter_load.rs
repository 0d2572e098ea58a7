//! Load on the external metrics adapter over TLS, as kube-apiserver sends it: keep-alive
//! connections authenticated with the test environment's front-proxy client certificate,
//! 1,000 distinct metrics, every request authorized (SubjectAccessReview against the real
//! kube-apiserver of `scripts/testenv`, cached for 10 s as in production).
//!
//! `cargo bench --bench adapter_load` (starts `scripts/testenv` if needed). Phases:
//! 1. warm-up: 3 s at the target rate;
//! 2. open loop: `ADAPTER_BENCH_RATE` requests/s (default 1000) for `ADAPTER_BENCH_SECS` (default
//!    20) over `ADAPTER_BENCH_CONNS` connections (default 16); latency counts from each request's
//!    scheduled time, so a slow answer also delays (and charges) the ones queued behind it;
//! 3. closed loop: the same connections as fast as they go for 10 s (throughput ceiling).
//!
//! Prints requests/s and p50/p90/p99/max latency per phase. No assertion: speed targets live
//! here, not in tests.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kscale::adapter::cache::{Entry, Value};
use kscale::adapter::{Adapter, ExternalMetricsArgs};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

const METRICS: usize = 1000;
const NAMESPACE: &str = "bench";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

type Conn = BufReader<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

async fn connect(config: Arc<rustls::ClientConfig>, addr: SocketAddr) -> Conn {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    BufReader::new(tls)
}

/// One keep-alive GET; the status code.
async fn get(conn: &mut Conn, path: &str) -> u16 {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nX-Remote-User: bench-hpa\r\nX-Remote-Group: system:masters\r\n\r\n"
    );
    conn.get_mut()
        .write_all(req.as_bytes())
        .await
        .expect("write");
    let mut line = String::new();
    conn.read_line(&mut line).await.expect("status line");
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let mut length = 0usize;
    loop {
        line.clear();
        conn.read_line(&mut line).await.expect("header");
        if line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().expect("content-length");
        }
    }
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body).await.expect("body");
    status
}

struct Phase {
    latencies: Vec<Duration>,
    /// (seconds since the phase started, latency) of each request.
    timeline: Vec<(u64, Duration)>,
    /// From the actual write to the end of the answer (no timer or queueing delay).
    service: Vec<Duration>,
    errors: usize,
    elapsed: Duration,
}

fn quantile(sorted: &[Duration], f: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * f).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn report(name: &str, p: &mut Phase) {
    p.latencies.sort();
    p.service.sort();
    let q = |f: f64| quantile(&p.latencies, f);
    println!(
        "{name:<28} {:>7} requests {:>9.0} req/s  p50 {:>7.3} ms  p90 {:>7.3} ms  p99 {:>7.3} ms  max {:>8.3} ms  non-200 {}",
        p.latencies.len(),
        p.latencies.len() as f64 / p.elapsed.as_secs_f64(),
        q(0.50),
        q(0.90),
        q(0.99),
        p.latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        p.errors
    );
    println!(
        "{:<28} service time (write to last byte): p50 {:.3} ms  p99 {:.3} ms",
        "",
        quantile(&p.service, 0.5),
        quantile(&p.service, 0.99)
    );
    let mut seconds: BTreeMap<u64, Vec<Duration>> = BTreeMap::new();
    for (s, l) in &p.timeline {
        seconds.entry(*s).or_default().push(*l);
    }
    let per_second: Vec<String> = seconds
        .into_values()
        .map(|mut v| {
            v.sort();
            format!("{:.1}", quantile(&v, 0.99))
        })
        .collect();
    println!("{:<28} p99 per second (ms): {}", "", per_second.join(" "));
}

/// `rate` requests/s (0: as fast as possible) for `secs` over `conns` connections.
async fn run(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    conns: usize,
    rate: f64,
    secs: f64,
) -> Phase {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let config = config.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = connect(config, addr).await;
            let mut latencies = Vec::new();
            let mut timeline = Vec::new();
            let mut service = Vec::new();
            let mut errors = 0;
            let period = (rate > 0.0).then(|| Duration::from_secs_f64(conns as f64 / rate));
            // Spread the connections' schedules over one period.
            let mut next = start + period.map_or(Duration::ZERO, |p| p * c as u32 / conns as u32);
            let mut i = c;
            loop {
                if period.is_some() {
                    tokio::time::sleep_until(next.into()).await;
                } else {
                    next = Instant::now();
                }
                if next >= deadline {
                    break;
                }
                let path = format!(
                    "/apis/external.metrics.k8s.io/v1beta1/namespaces/{NAMESPACE}/p{}-queue",
                    i % METRICS
                );
                let sent = Instant::now();
                if get(&mut conn, &path).await != 200 {
                    errors += 1;
                }
                service.push(sent.elapsed());
                latencies.push(next.elapsed());
                timeline.push(((next - start).as_secs(), next.elapsed()));
                i += conns;
                if let Some(p) = period {
                    next += p;
                }
            }
            (latencies, timeline, service, errors)
        }));
    }
    let mut phase = Phase {
        latencies: Vec::new(),
        timeline: Vec::new(),
        service: Vec::new(),
        errors: 0,
        elapsed: Duration::ZERO,
    };
    for t in tasks {
        let (l, tl, sv, e) = t.await.expect("load task");
        phase.latencies.extend(l);
        phase.timeline.extend(tl);
        phase.service.extend(sv);
        phase.errors += e;
    }
    phase.elapsed = start.elapsed();
    phase
}

fn main() {
    let Some(env) = support::testenv() else {
        return;
    };
    let rate: f64 = env_or("ADAPTER_BENCH_RATE", 1000.0);
    let secs: f64 = env_or("ADAPTER_BENCH_SECS", 20.0);
    let conns: usize = env_or("ADAPTER_BENCH_CONNS", 16);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = env.client().await;
        let args = ExternalMetricsArgs {
            external_metrics_addr: None,
            external_metrics_tls_cert_file: None,
            external_metrics_tls_key_file: None,
            external_metrics_cert_names: vec!["localhost".into()],
            external_rules: None,
            external_metrics_max_connections:
                kscale::listener::DEFAULT_EXTERNAL_METRICS_MAX_CONNECTIONS,
            upstream: Default::default(),
        };
        let running = Adapter::start(
            &args,
            "127.0.0.1:0".parse().expect("addr"),
            client,
            Arc::new(kscale::controller::Unavailable::no_prometheus()),
            kscale::listener::Limits::with_max_connections(
                kscale::listener::DEFAULT_EXTERNAL_METRICS_MAX_CONNECTIONS,
            ),
            None,
        )
        .await
        .expect("adapter starts");
        // 1,000 distinct metrics, fresh for the whole run.
        for i in 0..METRICS {
            let policy = format!("p{i}");
            running.cache.publish(
                NAMESPACE,
                &policy,
                vec![(
                    "queue".to_string(),
                    Entry {
                        labels: BTreeMap::from([("policy".to_string(), policy.clone())]),
                        value: Value::Number {
                            value: i as f64 + 0.5,
                            timestamp: chrono::Utc::now(),
                            bound: chrono::TimeDelta::hours(1),
                        },
                    },
                )],
            );
        }
        let pki = env.dir.join("pki");
        let read = |f: &str| std::fs::read_to_string(pki.join(f)).expect("testenv PKI");
        let config = support::tls_client_config(
            &running.cert_pem,
            Some((&read("front-proxy-client.crt"), &read("front-proxy-client.key"))),
        );
        println!(
            "adapter on {} ({METRICS} metrics, {conns} TLS keep-alive connections, front-proxy certificate, SubjectAccessReview cache 10 s)",
            running.addr
        );
        let mut warm = run(config.clone(), running.addr, conns, rate, 3.0).await;
        report("warm-up (3 s)", &mut warm);
        let mut open = run(config.clone(), running.addr, conns, rate, secs).await;
        report(&format!("open loop {rate:.0} req/s ({secs:.0} s)"), &mut open);
        let mut closed = run(config, running.addr, conns, 0.0, 10.0).await;
        report("closed loop (10 s)", &mut closed);
        running.task.abort();
    });
}
