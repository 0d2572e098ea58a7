//! See `main.rs`: the adapter part of the abuse suite. kscale registered as
//! `v1beta1.external.metrics.k8s.io` in the real kube-apiserver (front-proxy certificate, the
//! chart's RBAC), then abused directly on its port while a legitimate request goes through the
//! aggregator; and two policies whose external metric names would collide.
//!
//! The APIService is a cluster singleton, so the tests of this module take [`APISERVICE`] in turn.
//! (`tests/external_metrics_e2e.rs`, another test binary, never runs at the same time.)

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::events::v1::Event;
use kscale::crd::ScalingPolicy;
use kube::api::{Api, ListParams, PostParams};
use tokio::io::AsyncReadExt as _;

use crate::support;
use support::{external_metric_values as values, raw_get as raw};

/// One test at a time holds `v1beta1.external.metrics.k8s.io`.
static APISERVICE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A running, registered adapter.
struct Adapter {
    addr: std::net::SocketAddr,
    ca_pem: String,
    log: PathBuf,
    pid: u32,
    _cleanup: support::ApiServiceGuard,
    _daemon: support::ChildGuard,
}

fn metric_path(ns: &str, metric: &str) -> String {
    format!("/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/{metric}")
}

async fn wait_values(client: &kube::Client, path: &str, want: &[&str], log: &Path) {
    let what = format!("{path} = {want:?} ({})", support::log_tail(log));
    support::wait_until(&what, Duration::from_secs(60), || async {
        let (code, body) = raw(client, path).await;
        match (code, values(&body)) {
            (200, Ok(v)) if v == want => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// Starts `kscale run` with the adapter (`extra` flags added) as the chart's ServiceAccount and
/// registers it as the APIService, with a CA kube-apiserver verifies.
async fn start_adapter(
    env: &support::TestEnv,
    client: &kube::Client,
    ns: &str,
    kubeconfig: &Path,
    extra: &[&str],
) -> Adapter {
    let dir = support::repo_root().join(format!("target/iso-adapter-{}-{ns}", std::process::id()));
    let ca_pem = support::write_adapter_certificate(&dir, ns);
    let port = support::free_port();
    let log = dir.join("daemon.log");
    let child = Command::new(env!("CARGO_BIN_EXE_kscale"))
        .args([
            "run",
            "--metrics-addr",
            &format!("127.0.0.1:{}", support::free_port()),
        ])
        .args(["--watch-namespace", ns, "--leader-election-namespace", ns])
        .args(["--external-metrics-addr", &format!("127.0.0.1:{port}")])
        .arg("--external-metrics-tls-cert-file")
        .arg(dir.join("tls.crt"))
        .arg("--external-metrics-tls-key-file")
        .arg(dir.join("tls.key"))
        .args(extra)
        .env("KUBECONFIG", kubeconfig)
        .env("KSCALE_PROMETHEUS_URL", &env.prometheus_url)
        .env("RUST_LOG", "kscale=debug,info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("kscale run starts");
    let pid = child.id();
    let daemon = support::ChildGuard(child);
    let cleanup = support::register_external_metrics(env, client, ns, port, &ca_pem, &log).await;
    Adapter {
        addr: format!("127.0.0.1:{port}").parse().expect("addr"),
        ca_pem,
        log,
        pid,
        _daemon: daemon,
        _cleanup: cleanup,
    }
}

/// A test's namespace with Deployment `web` (3 simulated pods), the chart's RBAC for the daemon,
/// and an exporter scraped by the test Prometheus.
struct Scene {
    client: kube::Client,
    ns: support::TestNamespace,
    kubeconfig: PathBuf,
    _binding: support::BindingGuard,
    exporter: support::TestExporter,
}

impl Scene {
    async fn new(env: &support::TestEnv, prefix: &str) -> Scene {
        let client = env.client().await;
        support::install_crd(&client).await;
        let ns = support::create_namespace(env, &client, prefix).await;
        let (kubeconfig, _binding) =
            support::service_account_kubeconfig(env, &client, &ns.name).await;
        support::create_kwok_deployment(&client, &ns.name, "web", 3, "100m", "50m").await;
        let exporter = support::TestExporter::start(env, &ns.name);
        Scene {
            client,
            ns,
            kubeconfig,
            _binding,
            exporter,
        }
    }
}

/// An ExternalMetric policy `name` on Deployment `web` reading `query`.
fn policy(ns: &str, name: &str, metric: &str, query: &str) -> ScalingPolicy {
    support::scaling_policy(
        ns,
        name,
        support::WEB_DEPLOYMENT,
        &format!(
            r#"  mode: ExternalMetric
  minReplicas: 1
  maxReplicas: 10
  interval: 1s
  metrics:
  - name: {metric}
    prometheus: {{query: '{query}'}}
    target: {{type: AverageValue, averageValue: "5"}}
"#
        ),
    )
}

/// The daemon's resident memory in KiB (Linux `/proc`).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// One request on a fresh front-proxy connection (user `abuser` in `system:masters`, so every
/// request is authorized and reaches the caches); the status code.
async fn proxied_status(
    config: std::sync::Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
    path: &str,
) -> Result<u16, String> {
    support::https_get(
        config,
        addr,
        path,
        &[
            ("X-Remote-User", "abuser"),
            ("X-Remote-Group", "system:masters"),
        ],
    )
    .await
    .map(|(code, _)| code)
}

/// Abuse on the adapter's own port while the real aggregator keeps using it: requests with
/// long distinct paths (never cached, never authorized), many idle TLS connections beyond
/// `--external-metrics-max-connections`. A legitimate `kubectl get --raw` through kube-apiserver
/// still answers, and the daemon stays within the chart's memory limit.
#[tokio::test]
async fn the_adapter_under_abuse_still_answers_through_the_apiserver() {
    let Some(env) = support::testenv() else {
        return;
    };
    let _one = APISERVICE.lock().await;
    let scene = Scene::new(env, "iso-adapter").await;
    let (client, ns, exporter) = (&scene.client, &scene.ns, &scene.exporter);
    let metric = "kscale_iso_adapter_queue";
    exporter.set(metric, &[], 15.0);
    let query = format!("sum({metric}{{exporter=\"{}\"}})", exporter.id);
    Api::<ScalingPolicy>::namespaced(client.clone(), &ns.name)
        .create(
            &PostParams::default(),
            &policy(&ns.name, "web", "queue", &query),
        )
        .await
        .expect("policy created");
    const MAX_CONNECTIONS: usize = 32;
    let adapter = start_adapter(
        env,
        client,
        &ns.name,
        &scene.kubeconfig,
        &[
            "--external-metrics-max-connections",
            &MAX_CONNECTIONS.to_string(),
        ],
    )
    .await;
    let legit = metric_path(&ns.name, "web-desired-replicas");
    wait_values(client, &legit, &["3"], &adapter.log).await;

    let pki = env.dir.join("pki");
    let read = |f: &str| std::fs::read_to_string(pki.join(f)).expect("testenv PKI");
    let proxy = support::tls_client_config(
        &adapter.ca_pem,
        Some((
            &read("front-proxy-client.crt"),
            &read("front-proxy-client.key"),
        )),
    );

    // Distinct long paths, authenticated as a front proxy would: a 9 KiB target is over the
    // target limit (414) and a 60 KiB head over the header limit (431), both answered before
    // authentication or any cache; a 7 KiB one is authorized (one small cache entry, a digest)
    // and not served (404).
    for (kib, want) in [(9, 414), (60, 431), (7, 404)] {
        for i in 0..200 {
            let path = format!(
                "{}-{i}-{}",
                metric_path(&ns.name, "x"),
                "a".repeat(kib * 1024)
            );
            assert_eq!(
                proxied_status(proxy.clone(), adapter.addr, &path).await,
                Ok(want),
                "{kib} KiB path {i}"
            );
        }
    }
    // The same through kube-apiserver (kubectl get --raw with a long path).
    let (code, body) = raw(
        client,
        &format!("{}-{}", metric_path(&ns.name, "x"), "a".repeat(9 * 1024)),
    )
    .await;
    assert_eq!(code, 414, "{body:.200}");

    // Many idle TLS connections (handshake done, no request) against a limit of 32.
    let plain = support::tls_client_config(&adapter.ca_pem, None);
    let mut idle = Vec::new();
    for _ in 0..(MAX_CONNECTIONS * 8) {
        let Ok(tcp) = tokio::net::TcpStream::connect(adapter.addr).await else {
            continue;
        };
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        if let Ok(tls) = tokio_rustls::TlsConnector::from(plain.clone())
            .connect(name, tcp)
            .await
        {
            idle.push(tls);
        }
    }
    // A legitimate request through the aggregator still answers.
    exporter.set(metric, &[], 30.0);
    wait_values(client, &legit, &["6"], &adapter.log).await;
    // The adapter closed the idle connections beyond its limit: at most MAX_CONNECTIONS of them
    // are still open (each probe is a read that sees EOF on a closed one).
    let mut open = 0;
    for tls in &mut idle {
        let mut byte = [0u8; 1];
        // Still waiting after the timeout: open. EOF or an error: closed by the server.
        if tokio::time::timeout(Duration::from_millis(20), tls.read(&mut byte))
            .await
            .is_err()
        {
            open += 1;
        }
    }
    assert!(
        open <= MAX_CONNECTIONS,
        "{open} of {} idle connections still open; limit {MAX_CONNECTIONS}",
        idle.len()
    );
    let rss = rss_kib(adapter.pid);
    assert!(
        rss < 256 * 1024,
        "resident memory {rss} KiB exceeds the chart's 256Mi limit"
    );
    drop(idle);
    wait_values(client, &legit, &["6"], &adapter.log).await;
}

/// Policy `web-desired` with metric `replicas` would publish `web-desired-replicas`, the name of
/// policy `web`'s decision. Created first, it is still the one refused (the rule does not depend
/// on which policy came first): its status and an event name the collision, and through the
/// aggregator `web-desired-replicas` is `web`'s decision, never the other policy's value.
#[tokio::test]
async fn colliding_external_metric_names_are_refused() {
    let Some(env) = support::testenv() else {
        return;
    };
    let _one = APISERVICE.lock().await;
    let scene = Scene::new(env, "iso-names").await;
    let (client, ns, exporter) = (&scene.client, &scene.ns, &scene.exporter);
    exporter.set("kscale_iso_names_queue", &[], 15.0);
    exporter.set("kscale_iso_names_hostile", &[], 777.0);
    let q = |m: &str| format!("sum({m}{{exporter=\"{}\"}})", exporter.id);
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
    // The hostile one first.
    policies
        .create(
            &PostParams::default(),
            &policy(
                &ns.name,
                "web-desired",
                "replicas",
                &q("kscale_iso_names_hostile"),
            ),
        )
        .await
        .expect("policy created");
    policies
        .create(
            &PostParams::default(),
            &policy(&ns.name, "web", "queue", &q("kscale_iso_names_queue")),
        )
        .await
        .expect("policy created");
    let adapter = start_adapter(env, client, &ns.name, &scene.kubeconfig, &[]).await;
    let decision = metric_path(&ns.name, "web-desired-replicas");
    wait_values(client, &decision, &["3"], &adapter.log).await;

    let refused = support::wait_until(
        "web-desired reports the collision",
        Duration::from_secs(30),
        || async {
            let p = policies
                .get("web-desired")
                .await
                .map_err(|e| e.to_string())?;
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready").cloned());
            match ready {
                Some(c) if c.status == "False" && c.reason == "InvalidPolicy" => Ok(c.message),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert!(
        refused.contains("spec.metrics[0].name")
            && refused.contains("\"web-desired-replicas\"")
            && refused.contains("policy \"web\""),
        "{refused}"
    );
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    support::wait_until(
        "an InvalidPolicy event",
        Duration::from_secs(30),
        || async {
            let list = events
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            list.items
                .iter()
                .find(|e| {
                    e.reason.as_deref() == Some("InvalidPolicy")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                            == Some("web-desired")
                })
                .map(|_| ())
                .ok_or_else(|| {
                    format!(
                        "{} events, none InvalidPolicy for web-desired",
                        list.items.len()
                    )
                })
        },
    )
    .await;

    // The healthy policy keeps evaluating and its decision follows its own metric.
    exporter.set("kscale_iso_names_queue", &[], 30.0);
    wait_values(client, &decision, &["6"], &adapter.log).await;
    let web = policies.get("web").await.expect("web");
    let ready = web
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.clone());
    assert_eq!(ready.as_deref(), Some("True"));
    // The hostile policy's value is never served as web's decision.
    let (_, body) = raw(client, &decision).await;
    assert!(!body.contains("777"), "{body}");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    assert_eq!(
        support::replicas(&deployments).await,
        3,
        "an ExternalMetric policy never writes"
    );
}
