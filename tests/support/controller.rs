//! What the controller end-to-end tests share: `kscale run` as a child process (as the shipped
//! RBAC's ServiceAccount), waiting for a condition or an Event, and the common scenario (a
//! Deployment of simulated pods scaled on an exporter metric).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kscale::crd::{ScalingPolicy, ScalingPolicyStatus};
use kube::api::{Api, ListParams, PostParams};

/// The controller as a child process, killed on drop.
pub struct Controller(pub Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn start_controller(
    env: &super::TestEnv,
    kubeconfig: &std::path::Path,
    log: &std::path::Path,
    admin_port: u16,
    namespace: &str,
    identity: &str,
) -> Controller {
    start_controller_at(
        kubeconfig,
        log,
        admin_port,
        namespace,
        identity,
        &env.prometheus_url,
    )
}

/// [`start_controller`] with `prometheus_url` as the daemon's default Prometheus.
pub fn start_controller_at(
    kubeconfig: &std::path::Path,
    log: &std::path::Path,
    admin_port: u16,
    namespace: &str,
    identity: &str,
    prometheus_url: &str,
) -> Controller {
    start_controller_with(
        kubeconfig,
        log,
        admin_port,
        namespace,
        identity,
        Some(prometheus_url),
        Lease::Flag(namespace),
    )
}

/// Where [`start_controller_with`]'s daemon is told its Lease lives.
pub enum Lease<'a> {
    /// `--leader-election-namespace`.
    Flag(&'a str),
    /// No flag; `POD_NAMESPACE` as the chart's downward API sets it.
    PodNamespace(&'a str),
}

/// The controller for `namespace` with `prometheus_url` as its default Prometheus (none when
/// `None`: the variable is removed from its environment) and its Lease placed by `lease`.
pub fn start_controller_with(
    kubeconfig: &std::path::Path,
    log: &std::path::Path,
    admin_port: u16,
    namespace: &str,
    identity: &str,
    prometheus_url: Option<&str>,
    lease: Lease<'_>,
) -> Controller {
    start_controller_args(
        kubeconfig,
        log,
        admin_port,
        namespace,
        identity,
        prometheus_url,
        lease,
        &[],
    )
}

/// [`start_controller_with`] with `extra` flags after the common ones (e.g. `--shards 6`).
#[allow(clippy::too_many_arguments)]
pub fn start_controller_args(
    kubeconfig: &std::path::Path,
    log: &std::path::Path,
    admin_port: u16,
    namespace: &str,
    identity: &str,
    prometheus_url: Option<&str>,
    lease: Lease<'_>,
    extra: &[&str],
) -> Controller {
    let log = std::fs::File::create(log).expect("controller log file");
    let mut command = Command::new(env!("CARGO_BIN_EXE_kscale"));
    command
        .args(["run", "--metrics-addr", &format!("127.0.0.1:{admin_port}")])
        .args(["--watch-namespace", namespace, "--instance", identity])
        .args(["--leader-lease-duration", "4s", "--leader-renew", "1s"])
        .env_remove("POD_NAMESPACE")
        .env_remove("KSCALE_PROMETHEUS_URL")
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "kscale=debug,info")
        .stdout(Stdio::null())
        .stderr(log);
    match lease {
        Lease::Flag(ns) => command.args(["--leader-election-namespace", ns]),
        Lease::PodNamespace(ns) => command.env("POD_NAMESPACE", ns),
    };
    if let Some(url) = prometheus_url {
        command.env("KSCALE_PROMETHEUS_URL", url);
    }
    command.args(extra);
    Controller(command.spawn().expect("kscale run starts"))
}

/// `kscale dry-run` of `policy` (written to `target/<file_name>-<pid>.yaml`) as the cluster
/// admin, with the test Prometheus as its default: whether it succeeded, and stdout then stderr.
pub fn dry_run(env: &super::TestEnv, policy: &ScalingPolicy, file_name: &str) -> (bool, String) {
    let file = super::repo_root().join(format!("target/{file_name}-{}.yaml", std::process::id()));
    std::fs::write(&file, serde_yaml::to_string(policy).expect("yaml")).expect("write policy");
    let out = Command::new(env!("CARGO_BIN_EXE_kscale"))
        .args(["dry-run", "--policy", file.to_str().expect("utf-8 path")])
        .env("KUBECONFIG", &env.kubeconfig)
        .env("KSCALE_PROMETHEUS_URL", &env.prometheus_url)
        .output()
        .expect("kscale dry-run runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A controller for `namespace`, running as the ServiceAccount bound to the shipped RBAC and
/// logging to `target/<log_name>-<pid>.log`; it stops, and its binding goes, when dropped.
pub struct Running {
    pub controller: Controller,
    pub binding: super::BindingGuard,
    pub log: std::path::PathBuf,
}

pub async fn run_controller(
    env: &super::TestEnv,
    client: &kube::Client,
    namespace: &str,
    log_name: &str,
    identity: &str,
) -> Running {
    run_controller_at(
        env,
        client,
        namespace,
        log_name,
        identity,
        &env.prometheus_url,
    )
    .await
}

/// [`run_controller`] with `prometheus_url` as the daemon's default Prometheus.
pub async fn run_controller_at(
    env: &super::TestEnv,
    client: &kube::Client,
    namespace: &str,
    log_name: &str,
    identity: &str,
    prometheus_url: &str,
) -> Running {
    let (kubeconfig, binding) = super::service_account_kubeconfig(env, client, namespace).await;
    let log = super::repo_root().join(format!("target/{log_name}-{}.log", std::process::id()));
    let controller = start_controller_at(
        &kubeconfig,
        &log,
        super::free_port(),
        namespace,
        identity,
        prometheus_url,
    );
    Running {
        controller,
        binding,
        log,
    }
}

/// Waits until condition `type_` of policy `name` satisfies `check` (which also sees the whole
/// status); panics with the last condition and reason after `timeout`.
pub async fn wait_condition(
    policies: &Api<ScalingPolicy>,
    name: &str,
    type_: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&Condition, &ScalingPolicyStatus) -> bool,
) {
    super::wait_until(what, timeout, || async {
        let p = policies.get(name).await.map_err(|e| e.to_string())?;
        let s = p.status.ok_or("no status yet")?;
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .ok_or_else(|| format!("no {type_} condition"))?;
        if check(c, &s) {
            Ok(())
        } else {
            Err(format!(
                "{c:?}; reason {:?}; metrics {:?}",
                s.reason, s.metrics
            ))
        }
    })
    .await;
}

/// Waits until an Event in `namespace` satisfies `check`.
pub async fn wait_event(
    client: &kube::Client,
    namespace: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&Event) -> bool,
) {
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    super::wait_until(what, timeout, || async {
        let list = events
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        if list.items.iter().any(&check) {
            Ok(())
        } else {
            Err(format!("{} events, none matches", list.items.len()))
        }
    })
    .await;
}

/// What every controller test starts from: a namespace, a 2-replica Deployment `web` of
/// simulated pods, an exporter metric at `initial`, and a ScalingPolicy `web` on it (1 s
/// interval, 5 per replica, scale-down stabilization `down_window_s`), created.
pub struct Scenario {
    pub ns: super::TestNamespace,
    /// Shared, so a [`Ramp`] can move the metric from a thread of its own.
    pub exporter: std::sync::Arc<super::TestExporter>,
    pub metric: String,
    pub query: String,
    pub policy: ScalingPolicy,
    pub policies: Api<ScalingPolicy>,
    pub deployments: Api<Deployment>,
}

/// A `metrics[]` entry (indented for a spec under `spec:`): `name` from Prometheus `query`, 5
/// per replica.
pub fn metric_yaml(name: &str, query: &str) -> String {
    format!(
        "  - name: {name}\n    prometheus: {{query: '{query}'}}\n    target: {{type: AverageValue, averageValue: \"5\"}}\n"
    )
}

impl Scenario {
    pub async fn start(
        env: &super::TestEnv,
        client: &kube::Client,
        prefix: &str,
        initial: f64,
        down_window_s: u32,
    ) -> Scenario {
        Scenario::start_with(env, client, prefix, 2, initial, |query| {
            format!(
                r#"  minReplicas: 1
  maxReplicas: 10
  interval: 1s
  metrics:
{}  behavior:
    scaleDown:
      stabilizationWindowSeconds: {down_window_s}
"#,
                metric_yaml("queue", query)
            )
        })
        .await
    }

    /// The scenario with `replicas` pods (waited for until Ready) and the policy's spec after
    /// `targetRef` as `spec(query)` gives it (lines indented by two spaces).
    pub async fn start_with(
        env: &super::TestEnv,
        client: &kube::Client,
        prefix: &str,
        replicas: i32,
        initial: f64,
        spec: impl FnOnce(&str) -> String,
    ) -> Scenario {
        super::install_crd(client).await;
        let ns = super::create_namespace(env, client, prefix).await;
        super::create_kwok_deployment(client, &ns.name, "web", replicas, "100m", "50m").await;
        let count = usize::try_from(replicas).expect("a replica count is not negative");
        super::wait_for_ready_pods(client, &ns.name, "app=web", count, Duration::from_secs(60))
            .await;
        let exporter = std::sync::Arc::new(super::TestExporter::start(env, &ns.name));
        let metric = format!("kscale_{prefix}_queue").replace('-', "_");
        exporter.set(&metric, &[], initial);
        let query = format!("sum({metric}{{exporter=\"{}\"}})", exporter.id);
        let policy = super::scaling_policy(&ns.name, "web", super::WEB_DEPLOYMENT, &spec(&query));
        let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
        policies
            .create(&PostParams::default(), &policy)
            .await
            .expect("policy created");
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
        Scenario {
            ns,
            exporter,
            metric,
            query,
            policy,
            policies,
            deployments,
        }
    }

    /// Sets the metric the policy scales on.
    pub fn set(&self, value: f64) {
        self.exporter.set(&self.metric, &[], value);
    }

    /// Waits until Prometheus returns `value` for the policy's query.
    pub async fn wait_visible(&self, env: &super::TestEnv, value: f64) {
        super::wait_prometheus_value(env, &self.query, value).await;
    }
}

/// Sets the replicas of Deployment `name` through its scale subresource as a person would
/// (`kubectl scale`, field manager `kubectl-scale`).
pub async fn scale_by_hand(api: &Api<Deployment>, name: &str, n: i32) {
    let pp = kube::api::PatchParams {
        field_manager: Some("kubectl-scale".into()),
        ..Default::default()
    };
    api.patch_scale(
        name,
        &pp,
        &kube::api::Patch::Merge(serde_json::json!({"spec": {"replicas": n}})),
    )
    .await
    .expect("manual scale");
}

/// A cell of `kubectl get sp <name>`: the apiserver's Table for the policy, whose columns are
/// the CRD's additionalPrinterColumns (`None`: an empty cell). Panics on an unknown column.
pub async fn printer_column(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    column: &str,
) -> Option<String> {
    let request = http::Request::get(format!(
        "/apis/kscale.dev/v1alpha1/namespaces/{namespace}/scalingpolicies/{name}"
    ))
    .header(
        "Accept",
        "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
    )
    .body(Vec::new())
    .expect("request builds");
    let table: serde_json::Value = client.request(request).await.expect("table read");
    let columns = table["columnDefinitions"].as_array().expect("columns");
    let i = columns
        .iter()
        .position(|c| c["name"] == column)
        .unwrap_or_else(|| panic!("no {column} column"));
    match &table["rows"][0]["cells"][i] {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        other => panic!("the {column} cell is {other}"),
    }
}
