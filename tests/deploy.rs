//! What ships in deploy/ and dashboards/, against the real test apiserver and Prometheus:
//! every rendered manifest and example is accepted (server-side dry run, then for real); the
//! daemon runs as the chart's ServiceAccount, scales the scalable-backend example's Deployment
//! with the example ScalingPolicy, and is refused what the chart does not grant; every dashboard
//! query returns data from Prometheus scraping that daemon.
//!
//! The HPA variant of the example (an HPA following `<policy>-desired-replicas` through the
//! aggregation layer) is exercised end to end by tests/external_metrics_e2e.rs.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kscale::crd::ScalingPolicy;
use kube::api::{Api, Patch, PatchParams};

/// Release namespace and full name of the chart as rendered into deploy/manifests.
const RELEASE: &str = "kscale";

/// Both tests install and remove the chart's cluster-wide objects: one at a time.
static CHART: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `*.yaml` under `dir`, recursively, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            out.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Removes what deploy/manifests/kscale.yaml creates outside the CRD (shared with other test
/// binaries) when a test ends, and waits until the release namespace is gone.
struct ChartCleanup(PathBuf);

impl Drop for ChartCleanup {
    fn drop(&mut self) {
        support::cleanup_blocking(&self.0, |client| async move {
            use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
            let dp = Default::default();
            let _ = Api::<ClusterRole>::all(client.clone())
                .delete(RELEASE, &dp)
                .await;
            for crb in [
                RELEASE.to_string(),
                format!("{RELEASE}:system:auth-delegator"),
            ] {
                let _ = Api::<ClusterRoleBinding>::all(client.clone())
                    .delete(&crb, &dp)
                    .await;
            }
            let _ = Api::<RoleBinding>::namespaced(client.clone(), "kube-system")
                .delete(&format!("{RELEASE}-auth-reader"), &dp)
                .await;
            let namespaces: Api<Namespace> = Api::all(client);
            let _ = namespaces.delete(RELEASE, &dp).await;
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(90) {
                if matches!(namespaces.get_opt(RELEASE).await, Ok(None)) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            eprintln!("warning: namespace {RELEASE} still terminating after 90 s");
        });
    }
}

/// Applies the rendered chart (CRD first, then the rest) and waits for the CRD.
async fn install_chart(client: &kube::Client, dry_run_first: bool) {
    let manifests = read(&support::repo_root().join("deploy/manifests/kscale.yaml"));
    support::apply_yaml_with(client, "default", &manifests, dry_run_first).await;
    support::install_crd(client).await;
}

#[tokio::test]
async fn manifests_and_examples_are_accepted_dry_run_then_for_real() {
    let Some(env) = support::testenv() else {
        return;
    };
    let _chart = CHART.lock().await;
    let client = env.client().await;
    let _cleanup = ChartCleanup(env.kubeconfig.clone());
    let root = support::repo_root();

    let rendered = read(&root.join("deploy/manifests/kscale.yaml"));
    let applied = support::apply_yaml_with(&client, "default", &rendered, true).await;
    let kinds: BTreeSet<String> = applied
        .iter()
        .filter_map(|o| o.types.as_ref().map(|t| t.kind.clone()))
        .collect();
    for kind in [
        "CustomResourceDefinition",
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "NetworkPolicy",
    ] {
        assert!(
            kinds.contains(kind),
            "deploy/manifests lacks a {kind}: {kinds:?}"
        );
    }
    support::install_crd(&client).await;

    // Every example, into a throwaway namespace (their objects name none).
    let ns = support::create_namespace(env, &client, "deploy-examples").await;
    let files = yaml_files(&root.join("deploy/examples"));
    assert!(files.len() >= 4, "{files:?}");
    for file in &files {
        let objects = support::apply_yaml_with(&client, &ns.name, &read(file), true).await;
        assert!(!objects.is_empty(), "{} holds no object", file.display());
    }
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
    let backend = policies
        .get("backend")
        .await
        .expect("example policy stored");
    assert_eq!(
        serde_json::to_value(backend.spec.mode).expect("mode"),
        "ExternalMetric",
        "b-hpa-external.yaml, applied last, leaves the policy in mode ExternalMetric"
    );
    // The APIService (a cluster singleton) is registered for real only by
    // tests/external_metrics_e2e.rs (with the test's own CA); the shipped one gets a dry run.
    let apiservice = read(&root.join("deploy/apiservice/external-metrics.yaml"));
    let doc = apiservice
        .split("\n---\n")
        .find(|d| d.contains("kind: APIService"))
        .expect("an APIService document");
    let obj: kube::api::DynamicObject = serde_yaml::from_str(doc).expect("APIService YAML");
    let api: Api<k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService> =
        Api::all(client.clone());
    api.patch(
        "v1beta1.external.metrics.k8s.io",
        &PatchParams::apply("kscale-tests").dry_run(),
        &Patch::Apply(&obj),
    )
    .await
    .expect("the APIService is accepted (dry run)");
}

#[test]
fn dashboard_is_grafana_json_with_unique_panel_ids() {
    let text = read(&support::repo_root().join("dashboards/kscale.json"));
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboards/kscale.json");
    assert!(
        dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion"
    );
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(vars, ["datasource", "namespace", "policy"]);
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for p in panels {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {id}");
        assert!(p["gridPos"]["w"].is_u64() && p["gridPos"]["h"].is_u64());
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {id} has no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            assert!(expr.contains("kscale_"), "panel {id}: {expr}");
        }
    }
}

#[test]
fn chart_carries_the_generated_crd() {
    let root = support::repo_root();
    assert_eq!(
        read(&root.join("deploy/helm/kscale/crds/scalingpolicies.kscale.dev.yaml")),
        read(&root.join("deploy/crd/scalingpolicies.kscale.dev.yaml")),
        "the chart's CRD is stale: run scripts/render-manifests"
    );
}

/// Every PromQL expression of the dashboard, with its panel title, and the queries of its
/// `label_values(<query>, label)` variables.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = read(&support::repo_root().join("dashboards/kscale.json"));
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            out.push((
                p["title"].as_str().unwrap_or("?").to_string(),
                t["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    for v in dash["templating"]["list"].as_array().expect("variables") {
        if let Some(def) = v["definition"].as_str() {
            let inner = def
                .strip_prefix("label_values(")
                .and_then(|s| s.rsplit_once(','))
                .map(|(q, _)| q.to_string())
                .expect("label_values(query, label)");
            out.push((format!("variable {}", v["name"]), inner));
        }
    }
    out
}

/// The daemon as a child process, killed on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The example's Deployment and Service as shipped, the Deployment's pods moved onto the
/// simulated node (kwok's node selector, usage annotations, an image nobody pulls).
fn example_backend_on_kwok() -> String {
    use serde::Deserialize;
    let text = read(&support::repo_root().join("deploy/examples/scalable-backend/backend.yaml"));
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let mut v = serde_yaml::Value::deserialize(doc).expect("backend.yaml");
        if v["kind"] == "Deployment" {
            assert_eq!(v["spec"]["replicas"], 3);
            let template = &mut v["spec"]["template"];
            template["metadata"]["annotations"] = serde_yaml::from_str(&format!(
                "{{{}: 50m, {}: 32Mi}}",
                support::USAGE_CPU_ANNOTATION,
                support::USAGE_MEMORY_ANNOTATION
            ))
            .expect("annotations");
            template["spec"]["nodeSelector"] =
                serde_yaml::from_str("{type: kwok}").expect("selector");
            template["spec"]["automountServiceAccountToken"] = false.into();
            template["spec"]["containers"][0]["image"] = "kscale.invalid/fake:latest".into();
        }
        docs.push(serde_yaml::to_string(&v).expect("YAML"));
    }
    docs.join("---\n")
}

/// Feeds the example policy's Prometheus metrics: `http_requests_total` growing by `rps` per
/// second and a latency histogram whose every request takes under 100 ms.
fn feed_backend_metrics(exporter: &support::TestExporter, start: Instant, rps: f64, p99: bool) {
    let total = rps * start.elapsed().as_secs_f64();
    exporter.set("http_requests_total", &[("service", "backend")], total);
    if p99 {
        for le in ["0.1", "+Inf"] {
            exporter.set(
                "http_request_duration_seconds_bucket",
                &[("service", "backend"), ("le", le)],
                total,
            );
        }
    }
}

#[tokio::test]
async fn example_scales_under_the_chart_service_account_and_every_dashboard_query_has_data() {
    let Some(env) = support::testenv() else {
        return;
    };
    let _chart = CHART.lock().await;
    let client = env.client().await;
    let _cleanup = ChartCleanup(env.kubeconfig.clone());
    install_chart(&client, false).await;
    let ns = support::create_namespace(env, &client, "deploy-backend").await;
    support::apply_yaml(&client, &ns.name, &example_backend_on_kwok()).await;
    support::wait_for_ready_pods(&client, &ns.name, "app=backend", 3, Duration::from_secs(60))
        .await;

    // Request rate only at first: the p99 query is empty, so the policy falls back (and a
    // source error is counted); then the histogram too.
    let exporter = support::TestExporter::start(env, &ns.name);
    let started = Instant::now();
    feed_backend_metrics(&exporter, started, 1000.0, false);
    let policy =
        read(&support::repo_root().join("deploy/examples/scalable-backend/a-scalingpolicy.yaml"));
    support::apply_yaml(&client, &ns.name, &policy).await;

    // The daemon as the chart's ServiceAccount (bound by the rendered manifests only).
    let kubeconfig = support::impersonating_kubeconfig(env, RELEASE, RELEASE, "deploy-chart-sa");
    let log = support::repo_root().join(format!("target/deploy-e2e-{}.log", std::process::id()));
    let admin_port = support::free_port();
    let adapter_port = support::free_port();
    // The adapter's serving certificate from files (the chart's cert-manager path), so the test
    // can verify it.
    let (ca_pem, cert_pem, key_pem) = support::serving_certificate(vec!["localhost".into()]);
    let tls_dir = support::repo_root().join(format!("target/deploy-tls-{}", std::process::id()));
    std::fs::create_dir_all(&tls_dir).expect("TLS dir");
    std::fs::write(tls_dir.join("tls.crt"), &cert_pem).expect("cert");
    std::fs::write(tls_dir.join("tls.key"), &key_pem).expect("key");
    let _daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_kscale"))
            .args(["run", "--metrics-addr", &format!("127.0.0.1:{admin_port}")])
            .args(["--watch-namespace", &ns.name])
            .args(["--leader-election-namespace", RELEASE])
            .args([
                "--leader-election-lease",
                &format!("deploy-test-{}", ns.name),
            ])
            .args([
                "--external-metrics-addr",
                &format!("127.0.0.1:{adapter_port}"),
            ])
            .arg("--external-metrics-tls-cert-file")
            .arg(tls_dir.join("tls.crt"))
            .arg("--external-metrics-tls-key-file")
            .arg(tls_dir.join("tls.key"))
            .env("KUBECONFIG", &kubeconfig)
            .env("KSCALE_PROMETHEUS_URL", &env.prometheus_url)
            .env("RUST_LOG", "kscale=debug,info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("daemon log"))
            .spawn()
            .expect("kscale run starts"),
    );

    // Prometheus scrapes the daemon through the same file_sd folder TestExporter uses.
    let targets = env.dir.join("prometheus/targets");
    let sd_file = targets.join(format!("kscale-deploy-{}.json", std::process::id()));
    let sd = serde_json::json!([{"targets": [format!("127.0.0.1:{admin_port}")], "labels": {"exporter": format!("kscale-{}", ns.name)}}]);
    std::fs::write(sd_file.with_extension("tmp"), sd.to_string()).expect("file_sd");
    std::fs::rename(sd_file.with_extension("tmp"), &sd_file).expect("file_sd");
    struct RemoveFile(PathBuf);
    impl Drop for RemoveFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _sd = RemoveFile(sd_file);

    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
    support::wait_until(
        "a fallback decision while p99 is missing",
        Duration::from_secs(60),
        || async {
            feed_backend_metrics(&exporter, started, 1000.0, false);
            let p = policies.get("backend").await.map_err(|e| e.to_string())?;
            let reason = p.status.and_then(|s| s.reason).ok_or("no status yet")?;
            if reason.contains("fallback") {
                Ok(())
            } else {
                Err(format!("{reason}; {}", support::log_tail(&log)))
            }
        },
    )
    .await;

    // 1000 req/s at 70 per replica: up to maxReplicas 10, within the scale-up rate policy.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    support::wait_until(
        "the backend at 10 replicas",
        Duration::from_secs(120),
        || async {
            feed_backend_metrics(&exporter, started, 1000.0, true);
            let d = deployments
                .get("backend")
                .await
                .map_err(|e| e.to_string())?;
            match d.spec.and_then(|s| s.replicas) {
                Some(10) => Ok(()),
                other => Err(format!("{other:?} replicas; {}", support::log_tail(&log))),
            }
        },
    )
    .await;
    // The status is written after the scale write that the Deployment shows, so wait for it.
    support::wait_until(
        "the policy's status at 10 desired replicas",
        Duration::from_secs(30),
        || async {
            let status = policies
                .get("backend")
                .await
                .map_err(|e| e.to_string())?
                .status;
            match status.as_ref().and_then(|s| s.desired_replicas) {
                Some(10) => Ok(()),
                _ => Err(format!("{status:?}")),
            }
        },
    )
    .await;

    // The adapter, as kube-apiserver's aggregation layer calls it (front-proxy certificate and
    // user headers): it reads the front-proxy CA (RoleBinding in kube-system) and authorizes
    // with a SubjectAccessReview (system:auth-delegator), both as the chart's ServiceAccount.
    let pki = env.dir.join("pki");
    let pem = |f: &str| std::fs::read_to_string(pki.join(f)).expect("testenv PKI");
    let proxy = support::tls_client_config(
        &ca_pem,
        Some((
            &pem("front-proxy-client.crt"),
            &pem("front-proxy-client.key"),
        )),
    );
    let path = format!(
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/{}/backend-desired-replicas",
        ns.name
    );
    let adapter: std::net::SocketAddr = format!("127.0.0.1:{adapter_port}")
        .parse()
        .expect("address");
    support::wait_until(
        "backend-desired-replicas from the adapter",
        Duration::from_secs(30),
        || async {
            let (code, body) = support::https_get(
                proxy.clone(),
                adapter,
                &path,
                &[
                    ("X-Remote-User", "system:admin"),
                    ("X-Remote-Group", "system:masters"),
                ],
            )
            .await?;
            if code == 200 && body.contains("\"value\":\"10\"") {
                Ok(())
            } else {
                Err(format!("{code} {body}; {}", support::log_tail(&log)))
            }
        },
    )
    .await;

    // What the chart does not grant is refused to the same identity.
    let sa = support::client_from_kubeconfig(&kubeconfig)
        .await
        .expect("ServiceAccount client");
    let scale = Patch::Merge(serde_json::json!({"spec": {"replicas": 1}}));
    let forbidden =
        |r: Result<_, kube::Error>| matches!(r, Err(kube::Error::Api(s)) if s.code == 403);
    assert!(
        forbidden(
            Api::<ReplicaSet>::namespaced(sa.clone(), &ns.name)
                .patch_scale("any", &PatchParams::default(), &scale)
                .await
                .map(|_| ())
        ),
        "replicasets/scale is not in values.scaleTargets: must be forbidden"
    );
    assert!(
        forbidden(
            Api::<Deployment>::namespaced(sa.clone(), &ns.name)
                .patch("backend", &PatchParams::default(), &scale)
                .await
                .map(|_| ())
        ),
        "only /scale of a Deployment may be written, not the Deployment"
    );
    assert!(
        forbidden(
            Api::<Secret>::namespaced(sa.clone(), "kube-system")
                .list(&Default::default())
                .await
                .map(|_| ())
        ),
        "no Secrets"
    );
    // An allowed kind is authorized (the object just does not exist).
    let allowed = Api::<StatefulSet>::namespaced(sa.clone(), &ns.name)
        .get_scale("none")
        .await;
    assert!(
        matches!(allowed, Err(kube::Error::Api(ref s)) if s.code == 404),
        "statefulsets/scale is allowed: {allowed:?}"
    );

    // Shadow mode, for its panel: a DryRun policy beside the HPA that drives its target.
    support::create_kwok_deployment(&client, &ns.name, "shadowed", 2, "100m", "50m").await;
    support::apply_yaml(
        &client,
        &ns.name,
        r#"
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: shadowed}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: shadowed}
  minReplicas: 1
  maxReplicas: 4
  metrics:
  - type: Resource
    resource: {name: cpu, target: {type: Utilization, averageUtilization: 50}}
---
apiVersion: kscale.dev/v1alpha1
kind: ScalingPolicy
metadata: {name: backend-shadow}
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: shadowed}
  mode: DryRun
  minReplicas: 1
  maxReplicas: 4
  interval: 2s
  metrics:
  - name: cpu
    resource: {name: cpu}
    target: {type: Utilization, averageUtilization: 50}
"#,
    )
    .await;

    // Every dashboard query returns data from Prometheus scraping this daemon.
    let queries = dashboard_queries();
    for (title, expr) in &queries {
        let promql = expr
            .replace("$namespace", &ns.name)
            .replace("$policy", "backend|backend-shadow")
            .replace("$__rate_interval", "1m");
        support::wait_until(
            &format!("data for dashboard query of {title:?}: {promql}"),
            Duration::from_secs(60),
            || async {
                feed_backend_metrics(&exporter, started, 1000.0, true);
                match support::prometheus_query(env, &promql) {
                    Ok(result) if !result.is_empty() => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
    }
    assert!(queries.len() >= 12, "{queries:?}");
}

/// The rendered Deployment: two leader-elected replicas, probes on the metrics port, limits, and
/// a container that cannot write its filesystem, gain privileges or keep capabilities.
#[test]
fn rendered_deployment_is_locked_down() {
    use serde::Deserialize;
    let text = read(&support::repo_root().join("deploy/manifests/kscale.yaml"));
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).expect("YAML"))
        .filter(|v| !v.is_null())
        .collect();
    let d = docs
        .iter()
        .find(|v| v["kind"] == "Deployment")
        .expect("a Deployment");
    assert_eq!(d["spec"]["replicas"], 2);
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());
    let env: Vec<&str> = c["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(
        env.contains(&"POD_NAME") && env.contains(&"POD_NAMESPACE"),
        "{env:?}"
    );
    // Sharding (`shards`) is set with replicaCount; one leader Lease by default.
    let shards = c["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "KSCALE_SHARDS")
        .expect("KSCALE_SHARDS");
    assert_eq!(shards["value"], "1");
    // The Lease Role is about Leases alone (list, watch and delete serve the shards: the
    // group's Leases are watched, a dead replica's membership Lease removed).
    let lease_role = docs
        .iter()
        .find(|v| {
            v["kind"] == "Role"
                && v["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with("-leader-election"))
        })
        .expect("the leader-election Role");
    for rule in lease_role["rules"].as_sequence().expect("rules") {
        assert_eq!(rule["resources"][0], "leases", "{rule:?}");
        assert_eq!(rule["resources"].as_sequence().map(Vec::len), Some(1));
        let verbs = rule["verbs"].as_sequence().expect("verbs");
        assert!(verbs.iter().any(|v| v == "watch"), "{rule:?}");
    }
    // Off by default: only one provider may own v1beta1.external.metrics.k8s.io.
    assert!(!docs.iter().any(|v| v["kind"] == "APIService"));
    // The ClusterRole grants no Secrets and no write beyond /scale, status and events.
    let role = docs
        .iter()
        .find(|v| v["kind"] == "ClusterRole")
        .expect("a ClusterRole");
    for rule in role["rules"].as_sequence().expect("rules") {
        let resources: Vec<&str> = rule["resources"]
            .as_sequence()
            .expect("resources")
            .iter()
            .filter_map(|r| r.as_str())
            .collect();
        assert!(!resources.contains(&"secrets"), "{rule:?}");
        let writes = rule["verbs"].as_sequence().expect("verbs").iter().any(|v| {
            matches!(
                v.as_str(),
                Some("create" | "update" | "patch" | "delete" | "*")
            )
        });
        if writes {
            assert!(
                resources
                    .iter()
                    .all(|r| r.ends_with("/scale") || r.ends_with("/status") || *r == "events"),
                "{rule:?}"
            );
        }
    }
}

/// The `helm install` command lines of `text`, each with its continuation lines joined and its
/// whitespace collapsed.
fn helm_installs(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        // A command line of a code block, not prose that mentions one.
        if !line.trim_start().starts_with("helm install ") {
            continue;
        }
        let mut command = line.trim_start().to_string();
        while command.ends_with('\\') {
            command.pop();
            command.push(' ');
            command.push_str(lines.next().unwrap_or_default());
        }
        out.push(command.split_whitespace().collect::<Vec<_>>().join(" "));
    }
    out
}

/// Issue 16: one install path, the same in every document: the chart into its own namespace
/// (`--create-namespace`, so the chart renders no Namespace of its own), with the default
/// Prometheus and the image's registry set.
#[test]
fn every_document_gives_the_same_install_command() {
    let root = support::repo_root();
    let docs = ["README.md", "deploy/examples/scalable-backend/README.md"];
    let mut commands = BTreeSet::new();
    for doc in docs {
        let found = helm_installs(&read(&root.join(doc)));
        assert!(!found.is_empty(), "{doc} gives no helm install command");
        for command in found {
            for needed in [
                "-n kscale --create-namespace",
                "--set prometheus.url=",
                "--set image.repository=",
                "--set image.tag=",
            ] {
                assert!(command.contains(needed), "{doc}: {command} lacks {needed}");
            }
            commands.insert(command);
        }
    }
    assert_eq!(commands.len(), 1, "the documents disagree: {commands:#?}");
    // With --create-namespace Helm creates the namespace; the chart must not render one too.
    let values: serde_yaml::Value =
        serde_yaml::from_str(&read(&root.join("deploy/helm/kscale/values.yaml"))).expect("values");
    assert_eq!(values["createNamespace"], serde_yaml::Value::Bool(false));
    // The image comes from the Dockerfile: the install path says so.
    let readme = read(&root.join("README.md"));
    assert!(readme.contains("docker build -t registry.example.com/kscale:0.1.0 ."));
    // No document offers a second way in.
    for doc in docs {
        let text = read(&root.join(doc));
        assert!(
            !text.contains("kubectl apply -f deploy/manifests"),
            "{doc} offers the plain manifests as an install path"
        );
    }
}
