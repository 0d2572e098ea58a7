//! Smoke tests of the test environment (`scripts/testenv`): a real kube-apiserver with
//! kwok-simulated pods, metrics-server behind the aggregation layer, and Prometheus.
//!
//! They start the environment with `scripts/testenv up` when needed (slow the first time
//! on a machine: Kubernetes is built from source) and leave it running; set
//! `KSCALE_SKIP_TESTENV=1` to skip them.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};

use support::*;

#[tokio::test]
async fn apiserver_reports_pinned_version() {
    let Some(env) = testenv() else { return };
    let client = env.client().await;
    let info = client.apiserver_version().await.expect("GET /version");
    assert_eq!(
        info.git_version,
        pinned_k8s_version(),
        "apiserver version: {info:?}"
    );
    assert_eq!(info.major, "1");
}

#[tokio::test]
async fn deployment_gets_ready_pods_and_scale_subresource_works_both_ways() {
    let Some(env) = testenv() else { return };
    let client = env.client().await;
    let ns = create_namespace(env, &client, "smoke-scale").await;
    create_kwok_deployment(&client, &ns.name, "web", 3, "100m", "10m").await;

    let pods = wait_for_ready_pods(&client, &ns.name, "app=web", 3, Duration::from_secs(60)).await;
    for p in &pods {
        let node = p.spec.as_ref().and_then(|s| s.node_name.as_deref());
        assert_eq!(node, Some(NODE_NAME), "pod {:?}", p.metadata.name);
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    wait_until(
        "deployment web readyReplicas=3",
        Duration::from_secs(30),
        || async {
            let d = deployments.get("web").await.map_err(|e| e.to_string())?;
            let ready = d.status.as_ref().and_then(|s| s.ready_replicas);
            if ready == Some(3) {
                Ok(())
            } else {
                Err(format!("readyReplicas={ready:?}"))
            }
        },
    )
    .await;

    // Up through the scale subresource ...
    let scale = serde_json::json!({"spec": {"replicas": 5}});
    deployments
        .patch_scale("web", &PatchParams::default(), &Patch::Merge(&scale))
        .await
        .expect("patch scale to 5");
    wait_for_ready_pods(&client, &ns.name, "app=web", 5, Duration::from_secs(60)).await;
    assert_eq!(
        deployments
            .get_scale("web")
            .await
            .expect("get scale")
            .spec
            .and_then(|s| s.replicas),
        Some(5)
    );

    // ... and down again: kwok's pod-delete stage finishes the deletions (no kubelet).
    let scale = serde_json::json!({"spec": {"replicas": 1}});
    deployments
        .patch_scale("web", &PatchParams::default(), &Patch::Merge(&scale))
        .await
        .expect("patch scale to 1");
    wait_for_ready_pods(&client, &ns.name, "app=web", 1, Duration::from_secs(60)).await;
}

#[tokio::test]
async fn metrics_api_serves_simulated_pod_usage() {
    let Some(env) = testenv() else { return };
    let client = env.client().await;
    let ns = create_namespace(env, &client, "smoke-metrics").await;
    create_kwok_deployment(&client, &ns.name, "busy", 1, "500m", "250m").await;
    let pods = wait_for_ready_pods(&client, &ns.name, "app=busy", 1, Duration::from_secs(60)).await;
    let pod = pods[0].metadata.name.clone().expect("pod name");

    let gvk = GroupVersionKind::gvk("metrics.k8s.io", "v1beta1", "PodMetrics");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "pods");
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns.name, &ar);
    let cpu = wait_until(
        &format!("metrics.k8s.io PodMetrics for {}/{pod}", ns.name),
        Duration::from_secs(90),
        || async {
            let m = api.get(&pod).await.map_err(|e| e.to_string())?;
            m.data
                .pointer("/containers/0/usage/cpu")
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .ok_or_else(|| format!("no container usage yet: {}", m.data))
        },
    )
    .await;
    let millis = parse_cpu_millis(&cpu).unwrap_or_else(|| panic!("bad cpu quantity {cpu}"));
    assert!(
        (200.0..=300.0).contains(&millis),
        "simulated usage 250m, metrics API says {cpu}"
    );
}

fn parse_cpu_millis(q: &str) -> Option<f64> {
    if let Some(n) = q.strip_suffix('n') {
        return n.parse::<f64>().ok().map(|v| v / 1e6);
    }
    if let Some(u) = q.strip_suffix('u') {
        return u.parse::<f64>().ok().map(|v| v / 1e3);
    }
    if let Some(m) = q.strip_suffix('m') {
        return m.parse().ok();
    }
    q.parse::<f64>().ok().map(|v| v * 1000.0)
}

#[tokio::test]
async fn stock_hpa_scales_deployment_on_cpu_utilization() {
    let Some(env) = testenv() else { return };
    let client = env.client().await;
    let ns = create_namespace(env, &client, "smoke-hpa").await;
    // 100m requested, 20m used: 20% utilization, below the 50% target.
    create_kwok_deployment(&client, &ns.name, "app", 1, "100m", "20m").await;
    let pods = wait_for_ready_pods(&client, &ns.name, "app=app", 1, Duration::from_secs(60)).await;
    apply_yaml(
        &client,
        &ns.name,
        r#"
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: app
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: app}
  minReplicas: 1
  maxReplicas: 4
  metrics:
  - type: Resource
    resource:
      name: cpu
      target: {type: Utilization, averageUtilization: 50}
"#,
    )
    .await;
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns.name);
    let describe = |h: &HorizontalPodAutoscaler| {
        let s = h.status.as_ref();
        format!(
            "currentReplicas={:?} desiredReplicas={:?} currentMetrics={:?} conditions={:?}",
            s.and_then(|s| s.current_replicas),
            s.map(|s| s.desired_replicas),
            s.and_then(|s| s.current_metrics.as_ref()),
            s.and_then(|s| s.conditions.as_ref()).map(|cs| cs
                .iter()
                .map(|c| format!("{}={} ({:?})", c.type_, c.status, c.message))
                .collect::<Vec<_>>())
        )
    };
    // The HPA first reads the low utilization through metrics.k8s.io ...
    wait_until(
        "HPA reading cpu utilization",
        Duration::from_secs(120),
        || async {
            let h = hpas.get("app").await.map_err(|e| e.to_string())?;
            let util = h
                .status
                .as_ref()
                .and_then(|s| s.current_metrics.as_ref())
                .and_then(|m| m.first())
                .and_then(|m| m.resource.as_ref())
                .and_then(|r| r.current.average_utilization);
            match util {
                Some(u) if u < 50 => Ok(()),
                _ => Err(describe(&h)),
            }
        },
    )
    .await;
    assert_eq!(
        Api::<Deployment>::namespaced(client.clone(), &ns.name)
            .get("app")
            .await
            .expect("get deployment")
            .spec
            .and_then(|s| s.replicas),
        Some(1),
        "no scaling expected at 20% utilization"
    );

    // ... then the simulated usage rises to 200% of the request and it scales up.
    let pod = pods[0].metadata.name.clone().expect("pod name");
    set_pod_cpu_usage(&client, &ns.name, &pod, "200m").await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    wait_until(
        "HPA scaling the deployment to 4",
        Duration::from_secs(120),
        || async {
            let d = deployments.get("app").await.map_err(|e| e.to_string())?;
            let replicas = d.spec.as_ref().and_then(|s| s.replicas);
            if replicas == Some(4) {
                Ok(())
            } else {
                let h = hpas.get("app").await.map_err(|e| e.to_string())?;
                Err(format!(
                    "deployment replicas={replicas:?}; hpa: {}",
                    describe(&h)
                ))
            }
        },
    )
    .await;
    wait_for_ready_pods(&client, &ns.name, "app=app", 4, Duration::from_secs(60)).await;
}

/// A tiny HTTPS server answering the discovery request of one API group version.
struct FakeApiServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl FakeApiServer {
    fn start(env: &TestEnv, group: &str, version: &str) -> FakeApiServer {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        // Any serving certificate does (the APIService skips verification); reuse the
        // environment's loopback one.
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(env.dir.join("pki/kwok.crt"))
                .expect("read cert")
                .collect::<Result<_, _>>()
                .expect("parse cert");
        let key = PrivateKeyDer::from_pem_file(env.dir.join("pki/kwok.key")).expect("read key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let discovery_path = format!("/apis/{group}/{version}");
        let body = serde_json::json!({
            "kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": format!("{group}/{version}"),
            "resources": [{"name": "widgets", "singularName": "widget", "namespaced": true,
                           "kind": "Widget", "verbs": ["get", "list"]}]
        })
        .to_string();
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(tcp) = conn else { continue };
                let config = config.clone();
                let body = body.clone();
                let discovery_path = discovery_path.clone();
                std::thread::spawn(move || {
                    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
                    let Ok(tls) = rustls::ServerConnection::new(config) else {
                        return;
                    };
                    let mut stream = rustls::StreamOwned::new(tls, tcp);
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head);
                    let path = head.split_whitespace().nth(1).unwrap_or("");
                    let path = path.split('?').next().unwrap_or("");
                    let (status, body) = if path == discovery_path {
                        ("200 OK", body.as_str())
                    } else {
                        ("404 Not Found", "{}")
                    };
                    let _ = write!(
                        stream,
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.flush();
                    stream.conn.send_close_notify();
                    let _ = stream.flush();
                });
            }
        });
        FakeApiServer { addr, stop }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

#[tokio::test]
async fn apiservice_backed_by_local_https_server_becomes_available() {
    let Some(env) = testenv() else { return };
    let client = env.client().await;
    let ns = create_namespace(env, &client, "smoke-aggr").await;
    let group = format!("{}.kscale.test", ns.name);
    let server = FakeApiServer::start(env, &group, "v1alpha1");
    let apiservice_name = format!("v1alpha1.{group}");
    apply_yaml(
        &client,
        &ns.name,
        &format!(
            r#"
apiVersion: v1
kind: Service
metadata: {{name: fake-api}}
spec: {{type: ExternalName, externalName: 127.0.0.1}}
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {{name: {apiservice_name}}}
spec:
  group: {group}
  version: v1alpha1
  service: {{name: fake-api, namespace: {ns}, port: {port}}}
  insecureSkipTLSVerify: true
  groupPriorityMinimum: 1000
  versionPriority: 15
"#,
            ns = ns.name,
            port = server.addr.port()
        ),
    )
    .await;
    let gvk = GroupVersionKind::gvk("apiregistration.k8s.io", "v1", "APIService");
    let apiservices: Api<DynamicObject> =
        Api::all_with(client.clone(), &ApiResource::from_gvk(&gvk));
    let available = wait_until(
        &format!("APIService {apiservice_name} Available"),
        Duration::from_secs(60),
        || async {
            let a = apiservices
                .get(&apiservice_name)
                .await
                .map_err(|e| e.to_string())?;
            let conds = a
                .data
                .pointer("/status/conditions")
                .cloned()
                .unwrap_or_default();
            let ok = conds.as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Available" && c["status"] == "True")
            });
            if ok {
                Ok(conds)
            } else {
                Err(conds.to_string())
            }
        },
    )
    .await;
    // The group is now served through kube-apiserver.
    let req = http::Request::get(format!("/apis/{group}/v1alpha1"))
        .body(Vec::new())
        .expect("request");
    let text = client
        .request_text(req)
        .await
        .expect("GET through the aggregator");
    let _ = apiservices
        .delete(&apiservice_name, &DeleteParams::default())
        .await;
    assert!(
        text.contains("\"widgets\""),
        "{text} (conditions {available})"
    );
}

#[tokio::test]
async fn exporter_metric_is_returned_by_promql() {
    let Some(env) = testenv() else { return };
    let exporter = TestExporter::start(env, "smoke-promql");
    let query = format!(
        "kscale_test_queue_depth{{exporter=\"{}\",queue=\"orders\"}}",
        exporter.id
    );
    exporter.set("kscale_test_queue_depth", &[("queue", "orders")], 7.0);
    // Discovery of a new file_sd target can take a few seconds ...
    wait_until(
        "first scrape of the test exporter",
        Duration::from_secs(30),
        || async {
            match prometheus_scalar(env, &query)? {
                Some(7.0) => Ok(()),
                other => Err(format!("{query} = {other:?}")),
            }
        },
    )
    .await;
    // ... after which a new value is visible within 2 s (1 s scrape interval).
    exporter.set("kscale_test_queue_depth", &[("queue", "orders")], 42.0);
    let start = Instant::now();
    wait_until(
        "new exporter value in Prometheus",
        Duration::from_secs(2),
        || async {
            match prometheus_scalar(env, &query)? {
                Some(42.0) => Ok(()),
                other => Err(format!("{query} = {other:?}")),
            }
        },
    )
    .await;
    eprintln!("new value visible after {:?}", start.elapsed());
}
