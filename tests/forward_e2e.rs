//! The forwarding external metrics adapter (`--external-metrics-upstream`, issue 18 item 1).
//!
//! - At the forwarder's seam, against a small HTTPS upstream of our own (no cluster needed):
//!   the query string passes byte for byte, the caller's credentials stay behind, the answer is
//!   relayed unchanged, one connection serves many requests, and an upstream that refuses,
//!   hangs or answers too much is a 503 counted by outcome.
//! - End to end on the test environment: kscale owns `v1beta1.external.metrics.k8s.io`; a name
//!   it does not serve comes from the upstream through kube-apiserver and a stock HPA (the real
//!   kube-controller-manager) scales a Deployment on it; kscale's own names are answered by
//!   kscale even though the upstream serves the same name; with the upstream stopped only its
//!   names fail.

mod support;
#[path = "support/upstream.rs"]
mod upstream;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use kscale::adapter::forward::{Forwarder, Owners, UpstreamArgs};
use kscale::crd::ScalingPolicy;
use kscale::telemetry::ForwardLabels;
use kube::api::{Api, PostParams};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use upstream::{Fault, Upstream};

const METRICS: &str = "/apis/external.metrics.k8s.io/v1beta1";
const TOKEN: &str = "upstream-token-for-kscale";

/// The names kscale keeps: a fixed set, and namespace `unsynced` not known yet.
struct Kept(BTreeSet<&'static str>);

impl Owners for Kept {
    fn owns(&self, namespace: &str, metric: &str) -> Option<bool> {
        (namespace != "unsynced").then(|| self.0.contains(metric))
    }
}

/// The upstream's CA and kscale's token to it, as files in `dir`.
fn credential_files(dir: &Path, upstream: &Upstream) -> (std::path::PathBuf, std::path::PathBuf) {
    let (ca, token) = (dir.join("upstream-ca.crt"), dir.join("upstream-token"));
    std::fs::write(&ca, &upstream.ca_pem).expect("CA file");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("token file");
    (ca, token)
}

fn forwarder(
    upstream: &Upstream,
    dir: &Path,
    timeout: Duration,
    max_bytes: u64,
) -> (Arc<Forwarder>, Family<ForwardLabels, Counter>) {
    let (ca, token) = credential_files(dir, upstream);
    let args = UpstreamArgs {
        external_metrics_upstream: Some(upstream.url()),
        external_metrics_upstream_ca_file: Some(ca),
        external_metrics_upstream_bearer_token_file: Some(token),
        external_metrics_upstream_timeout: Some(timeout),
        external_metrics_upstream_max_response_bytes: Some(max_bytes),
        ..UpstreamArgs::default()
    };
    let counter = Family::<ForwardLabels, Counter>::default();
    let kept = Kept(BTreeSet::from(["web-queue", "web-desired-replicas"]));
    let f = Forwarder::new(&args, Arc::new(kept), counter.clone())
        .expect("settings")
        .expect("a forwarder");
    (Arc::new(f), counter)
}

fn count(counter: &Family<ForwardLabels, Counter>, request: &str, outcome: &str) -> u64 {
    counter
        .get_or_create(&ForwardLabels {
            request: request.into(),
            outcome: outcome.into(),
        })
        .get()
}

/// Status, `Content-Type` and body of an answer.
async fn parts(
    r: hyper::Response<http_body_util::Full<hyper::body::Bytes>>,
) -> (u16, String, String) {
    let code = r.status().as_u16();
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = r.into_body().collect().await.expect("body").to_bytes();
    (
        code,
        content_type,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn forwarded_requests_keep_their_query_and_leave_the_callers_credentials_behind() {
    let upstream = Upstream::start(Some(TOKEN));
    upstream.set("foreign-metric", "42");
    let dir = tempfile::tempdir().expect("temp dir");
    let (f, counter) = forwarder(&upstream, dir.path(), Duration::from_secs(5), 1 << 20);

    let mut headers = http::HeaderMap::new();
    headers.insert("authorization", "Bearer the-callers-token".parse().unwrap());
    headers.insert("x-remote-user", "system:admin".parse().unwrap());
    headers.insert("accept", "application/json, */*".parse().unwrap());
    // A selector kscale's own parser refuses (a dotted label name) and a metricSelector: the
    // upstream decides what they mean.
    let query =
        "labelSelector=app.kubernetes.io%2Fname%3Dweb%2Ctier+in+%28a%2Cb%29&metricSelector=x%3Dy";
    let answer = f
        .metric("team-a", "foreign-metric", Some(query), &headers)
        .await
        .expect("forwarded");
    let (code, content_type, body) = parts(answer).await;
    assert_eq!(
        (code, content_type.as_str()),
        (200, "application/json"),
        "{body}"
    );
    assert_eq!(
        support::external_metric_values(&body).expect("a list"),
        ["42"]
    );
    assert!(
        body.contains("\"served-by\":\"upstream\""),
        "relayed as is: {body}"
    );
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].target,
        format!("{METRICS}/namespaces/team-a/foreign-metric?{query}")
    );
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str()),
        "kscale calls as itself"
    );
    assert_eq!(
        seen[0].remote_user, None,
        "the caller's identity stays behind"
    );
    assert_eq!(seen[0].accept.as_deref(), Some("application/json, */*"));

    // The upstream's errors are its answers: relayed with their status and body.
    let (code, _, body) = parts(
        f.metric("team-a", "not-there", None, &headers)
            .await
            .expect("forwarded"),
    )
    .await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("upstream: no metric"), "{body}");

    // One pooled connection for all of them.
    for _ in 0..3 {
        f.metric("team-a", "foreign-metric", None, &headers)
            .await
            .expect("forwarded");
    }
    assert_eq!(upstream.connections(), 1, "the TLS connection is kept open");
    assert_eq!(
        (
            count(&counter, "metric", "ok"),
            count(&counter, "metric", "http_error")
        ),
        (4, 1)
    );

    // Names kscale keeps are answered locally; unknown ownership is a 503, not a guess; names
    // that could reach another upstream path never leave.
    assert!(
        f.metric("team-a", "web-queue", None, &headers)
            .await
            .is_none()
    );
    let (code, _, body) = parts(
        f.metric("unsynced", "foreign-metric", None, &headers)
            .await
            .expect("an answer"),
    )
    .await;
    assert_eq!(code, 503, "{body}");
    let before = upstream.seen().len();
    for (ns, metric) in [
        ("team-a", ".."),
        ("team-a", "a%2Fb"),
        ("..", "foreign-metric"),
        ("Team-A", "foreign-metric"),
    ] {
        let (code, _, body) = parts(
            f.metric(ns, metric, None, &headers)
                .await
                .expect("an answer"),
        )
        .await;
        assert_eq!(code, 400, "{ns}/{metric}: {body}");
    }
    assert_eq!(
        upstream.seen().len(),
        before,
        "nothing reached the upstream"
    );

    // Discovery never waits: the first call starts a read, later ones see its result.
    let resources = || {
        f.resources()
            .iter()
            .filter_map(|r| r["name"].as_str().map(str::to_string))
            .collect::<Vec<_>>()
    };
    support::wait_until(
        "the upstream's names in discovery",
        Duration::from_secs(10),
        || {
            let names = resources();
            async move {
                if names == ["foreign-metric"] {
                    Ok(())
                } else {
                    Err(format!("{names:?}"))
                }
            }
        },
    )
    .await;
    assert_eq!(count(&counter, "discovery", "ok"), 1);
}

#[tokio::test]
async fn an_upstream_that_answers_too_much_hangs_or_is_gone_is_a_503_counted_by_outcome() {
    let upstream = Upstream::start(Some(TOKEN));
    upstream.set("foreign-metric", "42");
    let dir = tempfile::tempdir().expect("temp dir");
    let (f, counter) = forwarder(&upstream, dir.path(), Duration::from_millis(500), 1024);
    let headers = http::HeaderMap::new();
    let get = || async {
        parts(
            f.metric("team-a", "foreign-metric", None, &headers)
                .await
                .expect("forwarded"),
        )
        .await
    };

    upstream.fault(Fault::Oversized(64 * 1024));
    let (code, _, body) = get().await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("over the size cap"), "{body}");
    assert!(
        body.contains("--external-metrics-upstream"),
        "names the flag: {body}"
    );

    upstream.fault(Fault::Hang);
    let (code, _, body) = get().await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no answer within the timeout"), "{body}");

    upstream.stop();
    let (code, _, body) = get().await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("the connection failed"), "{body}");
    assert!(
        body.contains("\"reason\":\"ServiceUnavailable\""),
        "a Kubernetes Status: {body}"
    );
    assert_eq!(
        (
            count(&counter, "metric", "limit"),
            count(&counter, "metric", "timeout"),
            count(&counter, "metric", "connect"),
            count(&counter, "metric", "ok"),
        ),
        (1, 1, 1, 0)
    );
}

/// The values (or the error) of `path` through kube-apiserver, until they are `want`.
async fn wait_values(client: &kube::Client, path: &str, want: &[&str], log: &Path) {
    support::wait_until(
        &format!("{path} = {want:?}"),
        Duration::from_secs(60),
        || async {
            let (code, body) = support::raw_get(client, path).await;
            match support::external_metric_values(&body) {
                Ok(v) if code == 200 && v == want => Ok(()),
                other => Err(format!("{code}: {other:?}\n{}", support::log_tail(log))),
            }
        },
    )
    .await;
}

fn metric_path(ns: &str, metric: &str) -> String {
    format!("{METRICS}/namespaces/{ns}/{metric}")
}

/// `application/x-www-form-urlencoded` decoding of one query value.
fn form_decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).expect("hex"));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).expect("UTF-8")
}

#[tokio::test]
async fn kscale_owns_the_apiservice_and_forwards_the_names_it_does_not_serve() {
    let Some(env) = support::testenv() else {
        return;
    };
    // kube-rs retries a 503 with a backoff of up to minutes; the upstream's failure is a 503 to
    // observe, so this client does not retry (the HPA controller does not either).
    let client = {
        let kubeconfig = kube::config::Kubeconfig::read_from(&env.kubeconfig).expect("kubeconfig");
        let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("config");
        config.default_retry = false;
        kube::Client::try_from(config).expect("client")
    };
    support::install_crd(&client).await;
    let ns = support::create_namespace(env, &client, "fwd").await;
    let ns_name = ns.name.clone();
    let (kubeconfig, _binding) = support::service_account_kubeconfig(env, &client, &ns_name).await;
    support::create_kwok_deployment(&client, &ns_name, "web", 2, "100m", "50m").await;

    // kscale's own metric: policy web, metric queue = 15, served as web-queue.
    let exporter = support::TestExporter::start(env, &ns_name);
    let metric = "kscale_fwd_queue";
    exporter.set(metric, &[("app", "web")], 15.0);
    let query = format!("sum({metric}{{exporter=\"{}\"}})", exporter.id);
    support::wait_prometheus_value(env, &query, 15.0).await;
    let policy = support::scaling_policy(
        &ns_name,
        "web",
        support::WEB_DEPLOYMENT,
        &format!(
            "  mode: ExternalMetric\n  minReplicas: 1\n  maxReplicas: 10\n  interval: 1s\n  metrics:\n  - name: queue\n    prometheus: {{query: '{query}'}}\n    target: {{type: AverageValue, averageValue: \"5\"}}\n"
        ),
    );
    Api::<ScalingPolicy>::namespaced(client.clone(), &ns_name)
        .create(&PostParams::default(), &policy)
        .await
        .expect("policy created");

    // The upstream serves foreign-metric, and web-queue too: kscale must never ask it for that.
    let upstream = Upstream::start(Some(TOKEN));
    upstream.set("foreign-metric", "30");
    upstream.set("web-queue", "999");

    let dir = support::repo_root().join(format!("target/fwd-{}", std::process::id()));
    let ca_pem = support::write_adapter_certificate(&dir, &ns_name);
    let (upstream_ca, upstream_token) = credential_files(&dir, &upstream);
    let (port, metrics_port) = (support::free_port(), support::free_port());
    let log = dir.join("daemon.log");
    let child =
        support::adapter_daemon(env, &kubeconfig, &ns_name, (port, metrics_port), &dir, &log)
            .args(["--external-metrics-upstream", &upstream.url()])
            .arg("--external-metrics-upstream-ca-file")
            .arg(&upstream_ca)
            .arg("--external-metrics-upstream-bearer-token-file")
            .arg(&upstream_token)
            .args(["--external-metrics-upstream-timeout", "2s"])
            .spawn()
            .expect("kscale run starts");
    let _daemon = support::ChildGuard(child);
    let _apiservice =
        support::register_external_metrics(env, &client, &ns_name, port, &ca_pem, &log).await;

    // Through kube-apiserver: the upstream's name from the upstream, kscale's from kscale.
    wait_values(
        &client,
        &metric_path(&ns_name, "foreign-metric"),
        &["30"],
        &log,
    )
    .await;
    wait_values(&client, &metric_path(&ns_name, "web-queue"), &["15"], &log).await;
    wait_values(
        &client,
        &metric_path(&ns_name, "web-desired-replicas"),
        &["3"],
        &log,
    )
    .await;
    // A selector only the upstream understands passes through kube-apiserver and kscale.
    let selector = "app.kubernetes.io/name=web,tier in (a,b)";
    let encoded: String = selector
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (code, body) = support::raw_get(
        &client,
        &format!(
            "{}?labelSelector={encoded}",
            metric_path(&ns_name, "foreign-metric")
        ),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let forwarded = upstream
        .seen()
        .into_iter()
        .rev()
        .find_map(|s| {
            s.target
                .split_once("?labelSelector=")
                .map(|(_, q)| form_decode(q.split('&').next().unwrap_or("")))
        })
        .expect("the selector reached the upstream");
    assert_eq!(forwarded, selector);
    // Discovery lists both.
    support::wait_until(
        "discovery lists both providers' names",
        Duration::from_secs(60),
        || async {
            let (code, body) = support::raw_get(&client, METRICS).await;
            if code == 200
                && body.contains("\"foreign-metric\"")
                && body.contains("\"web-desired-replicas\"")
            {
                Ok(())
            } else {
                Err(format!("{code}: {body}"))
            }
        },
    )
    .await;

    // A stock HPA scales on the upstream's metric: 30 / 5 per replica = 6, then 10 / 5 = 2.
    support::apply_yaml(
        &client,
        &ns_name,
        &support::external_hpa_yaml("foreign-metric", "5"),
    )
    .await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns_name);
    support::wait_replicas(&deployments, 6, Duration::from_secs(90), &log).await;
    upstream.set("foreign-metric", "10");
    support::wait_replicas(&deployments, 2, Duration::from_secs(90), &log).await;

    // kscale's names in its namespace never left the process (another namespace's `web-...` is
    // not kscale's: an earlier test's HPA there may still ask), and every forwarded request
    // was kscale's own.
    let seen = upstream.seen();
    let own = format!("/namespaces/{ns_name}/web-");
    assert!(
        seen.iter().all(|s| !s.target.contains(&own)),
        "kscale's names reached the upstream: {:?}",
        seen.iter()
            .filter(|s| s.target.contains(&own))
            .collect::<Vec<_>>()
    );
    assert!(
        seen.iter().all(
            |s| s.authorization.as_deref() == Some(&*format!("Bearer {TOKEN}"))
                && s.remote_user.is_none()
        ),
        "{seen:?}"
    );

    // The upstream stops: its names fail with 503, kscale's still answer, discovery too.
    upstream.stop();
    support::wait_until(
        "the upstream's name fails",
        Duration::from_secs(30),
        || async {
            match support::raw_get(&client, &metric_path(&ns_name, "foreign-metric")).await {
                (503, message) if message.contains("--external-metrics-upstream") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    for _ in 0..3 {
        let (code, body) =
            support::raw_get(&client, &metric_path(&ns_name, "foreign-metric")).await;
        assert_eq!(code, 503, "{body}");
    }
    wait_values(&client, &metric_path(&ns_name, "web-queue"), &["15"], &log).await;
    let (code, body) = support::raw_get(&client, METRICS).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"web-desired-replicas\""), "{body}");

    // /metrics counts by outcome; the failure is logged once per kind, not per request.
    let (code, metrics) =
        support::http_get(&format!("http://127.0.0.1:{metrics_port}"), "/metrics")
            .expect("/metrics");
    assert_eq!(code, 200);
    let counted = |outcome: &str| {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("kscale_external_metrics_forwarded_total{")
                    && l.contains("request=\"metric\"")
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert!(counted("ok") >= 4.0, "{metrics}");
    let failed: Vec<&str> = ["connect", "timeout", "error"]
        .into_iter()
        .filter(|o| counted(o) > 0.0)
        .collect();
    let failures: f64 = failed.iter().map(|o| counted(o)).sum();
    assert!(failures >= 4.0, "{metrics}");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let logged = text
        .lines()
        .filter(|l| l.contains("external metrics upstream gave no answer"))
        .count();
    assert_eq!(
        logged, 1,
        "one log line for {failures} failures of kinds {failed:?}"
    );
}
