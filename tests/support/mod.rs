//! Test support for tests that need a real cluster and Prometheus.
//!
//! The environment is the one `scripts/testenv up` starts on 127.0.0.1 (kube-apiserver,
//! controller-manager, scheduler, kwok-simulated node, metrics-server, Prometheus).
//! [`testenv`] runs `scripts/testenv up` once per test binary (it is idempotent and reuses a
//! running environment) and leaves the environment running afterwards, so the next
//! `cargo test` starts fast; `scripts/testenv down` stops it. With `KSCALE_SKIP_TESTENV=1`
//! tests that need it return early with a loud message instead.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::discovery::{self, Scope};
use kube::{Client, Config};

pub mod controller;
pub mod import;

/// A namespaced CustomResourceDefinition `<plural>.<group>` (version `v1`) whose `scale`
/// subresource reads `.spec.replicas` and `.status.replicas`, as YAML. With `selector`, the scale
/// also reads its label selector from `.status.selector` (`labelSelectorPath`); without, it sets
/// none, so its scale has no selector.
pub fn scale_crd_yaml(group: &str, kind: &str, plural: &str, selector: bool) -> String {
    let (selector_path, selector_field) = if selector {
        (
            ", labelSelectorPath: .status.selector",
            ", selector: {type: string}",
        )
    } else {
        ("", "")
    };
    format!(
        r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {{name: {plural}.{group}}}
spec:
  group: {group}
  scope: Namespaced
  names: {{kind: {kind}, plural: {plural}, singular: {singular}}}
  versions:
  - name: v1
    served: true
    storage: true
    subresources:
      status: {{}}
      scale: {{specReplicasPath: .spec.replicas, statusReplicasPath: .status.replicas{selector_path}}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {{type: object, properties: {{replicas: {{type: integer}}}}}}
          status: {{type: object, properties: {{replicas: {{type: integer}}{selector_field}}}}}
"#,
        singular = kind.to_lowercase()
    )
}

/// Installs [`scale_crd_yaml`]'s CustomResourceDefinition, waits until the apiserver serves the
/// kind, and returns its resource.
pub async fn install_scale_crd(
    client: &Client,
    group: &str,
    kind: &str,
    plural: &str,
    selector: bool,
) -> kube::core::ApiResource {
    apply_yaml(
        client,
        "default",
        &scale_crd_yaml(group, kind, plural, selector),
    )
    .await;
    let gvk = GroupVersionKind::gvk(group, "v1", kind);
    wait_until(
        &format!("{kind} served"),
        Duration::from_secs(30),
        || async {
            discovery::pinned_kind(client, &gvk)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    )
    .await;
    kube::core::ApiResource::from_gvk_with_plural(&gvk, plural)
}

/// Name of the simulated node that `scripts/testenv` creates.
pub const NODE_NAME: &str = "kwok-node-0";
/// Pod annotations kwok reads to simulate a pod's resource usage (see kwok's
/// `usage-from-annotation` ClusterResourceUsage, loaded by `scripts/testenv`).
pub const USAGE_CPU_ANNOTATION: &str = "kwok.x-k8s.io/usage-cpu";
pub const USAGE_MEMORY_ANNOTATION: &str = "kwok.x-k8s.io/usage-memory";

/// A running test environment, as described by `target/testenv/env`.
#[derive(Debug, Clone)]
pub struct TestEnv {
    /// The checkout's root folder.
    pub root: PathBuf,
    pub kubeconfig: PathBuf,
    pub prometheus_url: String,
    /// `TESTENV_DIR`: state, logs, certificates and Prometheus' file_sd folder.
    pub dir: PathBuf,
}

static TESTENV: OnceLock<Option<TestEnv>> = OnceLock::new();

/// Root of this checkout.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Kubernetes version the environment pins (from `scripts/testenv.d/versions.env`).
pub fn pinned_k8s_version() -> String {
    let path = repo_root().join("scripts/testenv.d/versions.env");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    parse_env_lines(&text)
        .remove("K8S_VERSION")
        .unwrap_or_else(|| panic!("no K8S_VERSION in {}", path.display()))
}

/// Parses `KEY=value` lines (optional `export `, optional quotes, `#` comments).
pub fn parse_env_lines(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim();
            let v = v
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .or_else(|| v.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
                .unwrap_or(v);
            out.insert(k.trim().to_string(), v.to_string());
        }
    }
    out
}

/// Reads an env file written by `scripts/testenv up`.
pub fn read_env_file(root: &Path, path: &Path) -> Result<TestEnv, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read env file {}: {e}", path.display()))?;
    let mut vars = parse_env_lines(&text);
    let mut take = |k: &str| {
        vars.remove(k)
            .ok_or_else(|| format!("{} has no {k}= line", path.display()))
    };
    Ok(TestEnv {
        root: root.to_path_buf(),
        kubeconfig: PathBuf::from(take("KUBECONFIG")?),
        prometheus_url: take("PROMETHEUS_URL")?,
        dir: PathBuf::from(take("TESTENV_DIR")?),
    })
}

/// Runs `scripts/testenv <args>` with extra environment variables; returns stdout, or an
/// error with everything it printed.
pub fn run_testenv_script(args: &[&str], envs: &[(&str, &str)]) -> Result<String, String> {
    let script = repo_root().join("scripts/testenv");
    let mut cmd = Command::new(&script);
    cmd.args(args).current_dir(repo_root());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "`scripts/testenv {}` failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            args.join(" "),
            out.status
        ))
    }
}

/// The shared test environment, started on first use. `None` (after a loud message)
/// only when `KSCALE_SKIP_TESTENV=1` is set; any failure to start it panics.
pub fn testenv() -> Option<&'static TestEnv> {
    TESTENV
        .get_or_init(|| {
            if std::env::var("KSCALE_SKIP_TESTENV").is_ok_and(|v| v == "1") {
                // Straight to the stderr file descriptor: the test harness captures
                // `eprintln!` of passing tests, and this must not go unseen.
                let _ = std::io::stderr().write_all(
                    b"\n\
                      ************************************************************\n\
                      * KSCALE_SKIP_TESTENV=1: SKIPPING tests that need the test  *\n\
                      * environment (Kubernetes + Prometheus). They did NOT run.  *\n\
                      ************************************************************\n\n",
                );
                return None;
            }
            let root = repo_root();
            let started = Instant::now();
            eprintln!(
                "testenv: running `scripts/testenv up` (the first run on a machine builds \
                 Kubernetes from source and takes a while)"
            );
            // Its stderr goes straight to ours (not captured by the test harness), so a
            // slow cold build shows progress.
            let script = root.join("scripts/testenv");
            let status = Command::new(&script)
                .arg("up")
                .current_dir(&root)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::inherit())
                .status()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            assert!(
                status.success(),
                "`scripts/testenv up` failed ({status}); its messages are above, component logs \
                 are in target/testenv/logs/"
            );
            let dir = std::env::var("KSCALE_TESTENV_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|_| root.join("target/testenv"));
            let env = read_env_file(&root, &dir.join("env")).unwrap_or_else(|e| panic!("{e}"));
            eprintln!(
                "testenv: up after {:.1}s: {env:?}",
                started.elapsed().as_secs_f64()
            );
            Some(env)
        })
        .as_ref()
}

impl TestEnv {
    /// A client authenticated as the environment's cluster admin.
    pub async fn client(&self) -> Client {
        client_from_kubeconfig(&self.kubeconfig)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// A `kube::Client` from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client, String> {
    let kubeconfig = Kubeconfig::read_from(path)
        .map_err(|e| format!("cannot read kubeconfig {}: {e}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| format!("bad kubeconfig {}: {e}", path.display()))?;
    Client::try_from(config).map_err(|e| format!("cannot build client: {e}"))
}

// ------------------------------------------------------------------ waiting

/// Polls `check` every 200 ms until it returns `Ok(value)`; panics after `timeout` with
/// `what` and the last `Err` message (describe the observed state there).
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        let last = match check().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting for {what}; last observed: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ------------------------------------------------------------------ namespaces

/// A namespace for one test; deleted on drop (pass `KSCALE_KEEP_NAMESPACES=1` to keep it).
pub struct TestNamespace {
    pub name: String,
    kubeconfig: PathBuf,
}

static NS_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Creates a uniquely named namespace `<prefix>-<unique>` and waits until its default
/// ServiceAccount exists (pods cannot be created before that).
pub async fn create_namespace(env: &TestEnv, client: &Client, prefix: &str) -> TestNamespace {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut name = format!(
        "{}-{}-{}-{:x}",
        prefix.to_lowercase().replace('_', "-"),
        std::process::id(),
        NS_COUNTER.fetch_add(1, Ordering::SeqCst),
        nanos
    );
    name.truncate(63);
    let name = name.trim_end_matches('-').to_string();
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"kscale.test/throwaway": "true"}}
    }))
    .expect("namespace json");
    api.create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
    wait_until(
        &format!("ServiceAccount {name}/default"),
        Duration::from_secs(30),
        || async {
            sas.get_opt("default")
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "not created yet".to_string())
        },
    )
    .await;
    TestNamespace {
        name,
        kubeconfig: env.kubeconfig.clone(),
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::env::var("KSCALE_KEEP_NAMESPACES").is_ok_and(|v| v == "1") {
            eprintln!("keeping namespace {}", self.name);
            return;
        }
        let name = self.name.clone();
        let kubeconfig = self.kubeconfig.clone();
        // Drop cannot await; delete from a short-lived runtime on its own thread.
        let joined = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let client = client_from_kubeconfig(&kubeconfig).await?;
                let api: Api<Namespace> = Api::all(client);
                api.delete(&name, &DeleteParams::background())
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
        })
        .join();
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: deleting namespace {}: {e}", self.name),
            Err(_) => eprintln!("warning: deleting namespace {} panicked", self.name),
        }
    }
}

// ------------------------------------------------------------------ applying YAML

/// Server-side applies every document of a (multi-document) YAML string. Namespaced
/// objects without a namespace go to `namespace`. Returns the applied objects.
pub async fn apply_yaml(client: &Client, namespace: &str, yaml: &str) -> Vec<DynamicObject> {
    apply_yaml_with(client, namespace, yaml, false).await
}

/// [`apply_yaml`], each document first as a server-side dry run when `dry_run_first` (so the
/// apiserver's validation and admission judge it before anything is stored), then for real.
pub async fn apply_yaml_with(
    client: &Client,
    namespace: &str,
    yaml: &str,
    dry_run_first: bool,
) -> Vec<DynamicObject> {
    use serde::Deserialize;
    let mut applied = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(doc)
            .unwrap_or_else(|e| panic!("invalid YAML document: {e}\n{yaml}"));
        if value.is_null() {
            continue;
        }
        let mut obj: DynamicObject = serde_yaml::from_value(value)
            .unwrap_or_else(|e| panic!("YAML document is not a Kubernetes object: {e}\n{yaml}"));
        let types = obj
            .types
            .clone()
            .unwrap_or_else(|| panic!("object without apiVersion/kind:\n{yaml}"));
        let gvk = GroupVersionKind::try_from(&types)
            .unwrap_or_else(|e| panic!("bad apiVersion {:?}: {e}", types.api_version));
        let (resource, caps) = discovery::pinned_kind(client, &gvk)
            .await
            .unwrap_or_else(|e| panic!("cannot discover {gvk:?}: {e}"));
        let name = obj
            .metadata
            .name
            .clone()
            .unwrap_or_else(|| panic!("object without metadata.name:\n{yaml}"));
        let api: Api<DynamicObject> = if caps.scope == Scope::Namespaced {
            let ns = obj
                .metadata
                .namespace
                .get_or_insert_with(|| namespace.to_string())
                .clone();
            Api::namespaced_with(client.clone(), &ns, &resource)
        } else {
            Api::all_with(client.clone(), &resource)
        };
        if dry_run_first {
            api.patch(
                &name,
                &PatchParams::apply("kscale-tests").force().dry_run(),
                &Patch::Apply(&obj),
            )
            .await
            .unwrap_or_else(|e| panic!("server-side dry run of {} {name}: {e}", types.kind));
        }
        let result = api
            .patch(
                &name,
                &PatchParams::apply("kscale-tests").force(),
                &Patch::Apply(&obj),
            )
            .await
            .unwrap_or_else(|e| panic!("applying {} {name}: {e}", types.kind));
        applied.push(result);
    }
    applied
}

// ------------------------------------------------------------------ simulated workloads

/// YAML of a Deployment whose pods kwok runs on the simulated node: one container
/// requesting `cpu_request` CPU and 64Mi memory, simulated usage `cpu_usage` (kwok's
/// `kwok.x-k8s.io/usage-cpu` annotation; change it per pod with [`set_pod_cpu_usage`]).
pub fn kwok_deployment_yaml(
    name: &str,
    replicas: i32,
    cpu_request: &str,
    cpu_usage: &str,
) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  labels: {{app: {name}}}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
      annotations:
        {USAGE_CPU_ANNOTATION}: "{cpu_usage}"
        {USAGE_MEMORY_ANNOTATION}: "32Mi"
    spec:
      nodeSelector: {{type: kwok}}
      automountServiceAccountToken: false
      containers:
      - name: app
        image: kscale.invalid/fake:latest
        resources:
          requests: {{cpu: "{cpu_request}", memory: 64Mi}}
          limits: {{memory: 128Mi}}
"#
    )
}

/// Creates a Deployment as in [`kwok_deployment_yaml`].
pub async fn create_kwok_deployment(
    client: &Client,
    namespace: &str,
    name: &str,
    replicas: i32,
    cpu_request: &str,
    cpu_usage: &str,
) -> Deployment {
    apply_yaml(
        client,
        namespace,
        &kwok_deployment_yaml(name, replicas, cpu_request, cpu_usage),
    )
    .await;
    Api::<Deployment>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("reading back deployment {name}: {e}"))
}

fn pod_is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_summary(pods: &[Pod]) -> String {
    let mut s = String::new();
    for p in pods {
        let st = p.status.as_ref();
        let _ = write!(
            s,
            "[{} phase={} ready={} node={} deleting={}] ",
            p.metadata.name.as_deref().unwrap_or("?"),
            st.and_then(|s| s.phase.as_deref()).unwrap_or("-"),
            pod_is_ready(p),
            p.spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .unwrap_or("-"),
            p.metadata.deletion_timestamp.is_some()
        );
    }
    s
}

/// Waits until exactly `count` pods match `selector` and all are Running and Ready
/// (pods being deleted count too, so this also waits for scale-down to finish).
pub async fn wait_for_ready_pods(
    client: &Client,
    namespace: &str,
    selector: &str,
    count: usize,
    timeout: Duration,
) -> Vec<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let lp = ListParams::default().labels(selector);
    wait_until(
        &format!("{count} Ready pods matching {selector} in {namespace}"),
        timeout,
        || async {
            let pods = api.list(&lp).await.map_err(|e| e.to_string())?.items;
            let ready = pods
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none() && pod_is_ready(p))
                .count();
            if pods.len() == count && ready == count {
                Ok(pods)
            } else {
                Err(format!(
                    "{} pods, {ready} ready: {}",
                    pods.len(),
                    pod_summary(&pods)
                ))
            }
        },
    )
    .await
}

/// Sets a pod's simulated CPU usage (e.g. "250m"); kwok reports it to metrics-server.
pub async fn set_pod_cpu_usage(client: &Client, namespace: &str, pod: &str, cpu: &str) {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let patch = serde_json::json!({"metadata": {"annotations": {USAGE_CPU_ANNOTATION: cpu}}});
    api.patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|e| panic!("setting cpu usage of pod {namespace}/{pod}: {e}"));
}

// ------------------------------------------------------------------ Prometheus

/// Minimal HTTP/1.1 GET against a loopback `http://host:port` URL; returns (status, body).
pub fn http_get(base_url: &str, path_and_query: &str) -> Result<(u16, String), String> {
    let hostport = base_url
        .strip_prefix("http://")
        .ok_or_else(|| format!("not an http:// URL: {base_url}"))?
        .trim_end_matches('/');
    let addr: SocketAddr = hostport
        .parse()
        .map_err(|e| format!("bad address {hostport}: {e}"))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path_and_query} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\nAccept: */*\r\n\r\n"
    )
    .map_err(|e| format!("write to {addr}: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("malformed HTTP response: {text}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("malformed status line: {head}"))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size_line, rest) = body.split_once("\r\n").ok_or("truncated chunked body")?;
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size {size_line:?}: {e}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or("truncated chunk")?;
        out.push_str(chunk);
        body = rest.get(size + 2..).ok_or("truncated chunk end")?;
    }
}

fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Runs an instant PromQL query; returns `data.result` (a JSON array).
pub fn prometheus_query(env: &TestEnv, promql: &str) -> Result<Vec<serde_json::Value>, String> {
    let (status, body) = http_get(
        &env.prometheus_url,
        &format!("/api/v1/query?query={}", url_encode(promql)),
    )?;
    if status != 200 {
        return Err(format!("Prometheus answered {status}: {body}"));
    }
    let v: serde_json::Value = serde_json::from_str(&body)
        .map_err(|e| format!("bad JSON from Prometheus: {e}: {body}"))?;
    v.pointer("/data/result")
        .and_then(|r| r.as_array())
        .cloned()
        .ok_or_else(|| format!("no data.result in {body}"))
}

/// The value of the first sample of an instant query, if any.
pub fn prometheus_scalar(env: &TestEnv, promql: &str) -> Result<Option<f64>, String> {
    let result = prometheus_query(env, promql)?;
    Ok(result
        .first()
        .and_then(|s| s.pointer("/value/1"))
        .and_then(|v| v.as_str())
        .and_then(|v| v.parse().ok()))
}

/// Waits until Prometheus answers `promql` with `value` (an exporter's new value has been
/// scraped).
pub async fn wait_prometheus_value(env: &TestEnv, promql: &str, value: f64) {
    wait_until(
        "the metric in Prometheus",
        Duration::from_secs(20),
        || async {
            match prometheus_scalar(env, promql) {
                Ok(Some(v)) if (v - value).abs() < 1e-9 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
}

type Series = BTreeMap<(String, Vec<(String, String)>), f64>;

/// A tiny Prometheus exporter on 127.0.0.1 for tests. It registers itself with the
/// environment's Prometheus by writing a file_sd file into
/// `$TESTENV_DIR/prometheus/targets/`, removed again on drop. Scrape interval is 1 s.
pub struct TestExporter {
    pub addr: SocketAddr,
    /// Value of the `exporter` target label Prometheus attaches to every series.
    pub id: String,
    series: Arc<Mutex<Series>>,
    stop: Arc<AtomicBool>,
    _scrape: ScrapeTarget,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// An address the test Prometheus scrapes (`/metrics`, every second, with the target label
/// `exporter` set to the id), through its file_sd folder, until dropped.
pub struct ScrapeTarget {
    file: PathBuf,
}

impl ScrapeTarget {
    pub fn register(env: &TestEnv, addr: std::net::SocketAddr, id: &str) -> ScrapeTarget {
        let targets = env.dir.join("prometheus/targets");
        std::fs::create_dir_all(&targets).expect("create file_sd folder");
        let file = targets.join(format!(
            "test-exporter-{}-{}.json",
            std::process::id(),
            addr.port()
        ));
        let sd = serde_json::json!([{"targets": [addr.to_string()], "labels": {"exporter": id}}]);
        // Write then rename, so Prometheus never reads a half-written file.
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, sd.to_string()).expect("write file_sd file");
        std::fs::rename(&tmp, &file).expect("install file_sd file");
        ScrapeTarget { file }
    }
}

impl Drop for ScrapeTarget {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

impl TestExporter {
    pub fn start(env: &TestEnv, id: &str) -> TestExporter {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind exporter socket");
        let addr = listener.local_addr().expect("exporter address");
        let series: Arc<Mutex<Series>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let series = series.clone();
            let stop = stop.clone();
            std::thread::spawn(move || serve_metrics(listener, series, stop))
        };
        let scrape = ScrapeTarget::register(env, addr, id);
        TestExporter {
            addr,
            id: id.to_string(),
            series,
            stop,
            _scrape: scrape,
            thread: Some(thread),
        }
    }

    /// Sets gauge `name{labels}` to `value`.
    pub fn set(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        let mut labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        labels.sort();
        if let Ok(mut s) = self.series.lock() {
            s.insert((name.to_string(), labels), value);
        }
    }

    /// Removes every series named `name`.
    pub fn remove(&self, name: &str) {
        if let Ok(mut s) = self.series.lock() {
            s.retain(|(n, _), _| n != name);
        }
    }
}

impl Drop for TestExporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn render_metrics(series: &Series) -> String {
    let mut out = String::new();
    let mut last_name = "";
    for ((name, labels), value) in series {
        if name != last_name {
            let _ = writeln!(out, "# TYPE {name} gauge");
            last_name = name;
        }
        out.push_str(name);
        if !labels.is_empty() {
            out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(out, "{k}=\"{v}\"");
            }
            out.push('}');
        }
        let _ = writeln!(out, " {value}");
    }
    out
}

fn serve_metrics(listener: TcpListener, series: Arc<Mutex<Series>>, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        // Read the request head (we answer every path with the metrics).
        let mut buf = [0u8; 4096];
        let mut head = Vec::new();
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
            if head.len() > 64 * 1024 {
                break;
            }
        }
        let body = match series.lock() {
            Ok(s) => render_metrics(&s),
            Err(_) => String::new(),
        };
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

// ------------------------------------------------------------------ authenticating proxy

/// The address of an `http://ip:port` URL (the environment's Prometheus, say).
pub fn socket_addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap_or_else(|e| panic!("{url} is not http://ip:port: {e}"))
}

/// An HTTP proxy on 127.0.0.1 in front of Prometheus that demands `Authorization: Bearer
/// <token>` (401 otherwise), as an authenticating gateway in front of a real Prometheus does
/// ([`AuthProxy::start`]), or lets everything through ([`AuthProxy::open`]). Its
/// [`ProxyFault`] makes the Prometheus behind it look stopped or slow to whoever uses the proxy.
/// One request per connection (`Connection: close`). Counts the requests it forwards.
pub struct AuthProxy {
    pub url: String,
    addr: SocketAddr,
    pub forwarded: Arc<AtomicU32>,
    pub refused: Arc<AtomicU32>,
    fault: Arc<Mutex<ProxyFault>>,
    stop: Arc<AtomicBool>,
}

/// What an [`AuthProxy`] does to the requests it would forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyFault {
    /// Forward them.
    None,
    /// Close each connection without an answer, as a stopped server behind a load balancer.
    Down,
    /// Wait this long, then forward (slower than any client's timeout makes it an error).
    Slow(Duration),
}

impl AuthProxy {
    pub fn start(prometheus_url: &str, token: &str) -> AuthProxy {
        Self::start_with(prometheus_url, Some(format!("bearer {token}")))
    }

    /// A proxy that asks for no credentials.
    pub fn open(prometheus_url: &str) -> AuthProxy {
        Self::start_with(prometheus_url, None)
    }

    /// From now on, applies `fault` to every new request.
    pub fn set_fault(&self, fault: ProxyFault) {
        if let Ok(mut f) = self.fault.lock() {
            *f = fault;
        }
    }

    fn start_with(prometheus_url: &str, expected: Option<String>) -> AuthProxy {
        let upstream = socket_addr_of(prometheus_url);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (forwarded, refused) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let fault = Arc::new(Mutex::new(ProxyFault::None));
        {
            let (forwarded, refused, stop, fault) = (
                forwarded.clone(),
                refused.clone(),
                stop.clone(),
                fault.clone(),
            );
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = conn else { continue };
                    let (forwarded, refused, expected) =
                        (forwarded.clone(), refused.clone(), expected.clone());
                    let fault = fault.lock().map(|f| *f).unwrap_or(ProxyFault::None);
                    std::thread::spawn(move || {
                        proxy_one(
                            client,
                            upstream,
                            expected.as_deref(),
                            fault,
                            &forwarded,
                            &refused,
                        )
                    });
                }
            });
        }
        AuthProxy {
            url: format!("http://{addr}"),
            addr,
            forwarded,
            refused,
            fault,
            stop,
        }
    }
}

fn proxy_one(
    mut client: TcpStream,
    upstream: SocketAddr,
    expected: Option<&str>,
    fault: ProxyFault,
    forwarded: &AtomicU32,
    refused: &AtomicU32,
) {
    match fault {
        ProxyFault::None => {}
        ProxyFault::Down => return,
        ProxyFault::Slow(delay) => std::thread::sleep(delay),
    }
    let _ = client.set_read_timeout(Some(Duration::from_secs(10)));
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match client.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let mut length = 0usize;
    let mut authorized = expected.is_none();
    let mut lines: Vec<&str> = Vec::new();
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if let Some(v) = lower.strip_prefix("authorization:") {
            authorized = expected.is_none_or(|e| v.trim() == e);
        }
        if !lower.starts_with("connection:") {
            lines.push(line);
        }
    }
    while data.len() < head_end + length {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    }
    if !authorized {
        refused.fetch_add(1, Ordering::SeqCst);
        let _ = client.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Type: text/plain\r\nContent-Length: 13\r\nConnection: close\r\n\r\nunauthorized\n",
        );
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream) else {
        return;
    };
    let mut request = lines.join("\r\n");
    request.push_str("\r\nConnection: close\r\n\r\n");
    let mut out = request.into_bytes();
    out.extend_from_slice(&data[head_end..head_end + length]);
    if server.write_all(&out).is_err() {
        return;
    }
    let mut response = Vec::new();
    let _ = server.read_to_end(&mut response);
    forwarded.fetch_add(1, Ordering::SeqCst);
    let _ = client.write_all(&response);
}

impl Drop for AuthProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

// ------------------------------------------------------------------ kscale's CRD

/// The `targetRef` of Deployment `web`, as a YAML flow mapping.
pub const WEB_DEPLOYMENT: &str = "{apiVersion: apps/v1, kind: Deployment, name: web}";

/// A ScalingPolicy `name` in `ns` on `target_ref` (a YAML flow mapping); `spec` is the rest of
/// its spec as YAML lines indented by two spaces.
pub fn scaling_policy(
    ns: &str,
    name: &str,
    target_ref: &str,
    spec: &str,
) -> kscale::crd::ScalingPolicy {
    let yaml = format!(
        "apiVersion: kscale.dev/v1alpha1\nkind: ScalingPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  targetRef: {target_ref}\n{spec}"
    );
    serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("policy parses: {e}\n{yaml}"))
}

/// Installs (server-side applies) kscale's ScalingPolicy CRD and waits until it is Established.
pub async fn install_crd(client: &Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::runtime::wait::{await_condition, conditions};
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = kscale::crd::crd();
    let name = crd.metadata.name.clone().expect("CRD has a name");
    crds.patch(
        &name,
        &PatchParams::apply("kscale-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .unwrap_or_else(|e| panic!("the apiserver rejected the CRD: {e}"));
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(crds, &name, conditions::is_crd_established()),
    )
    .await
    .expect("CRD established within 30s")
    .expect("watching the CRD");
}

/// Release namespace of `deploy/rbac/kscale.yaml` (the chart's RBAC, rendered by
/// `scripts/render-manifests`).
const RBAC_RELEASE_NAMESPACE: &str = "kscale";

/// (kind, namespace, name) of an object.
pub type ObjectRef = (String, Option<String>, String);

/// A kubeconfig that impersonates ServiceAccount `kscale` of `namespace`, with the chart's own
/// ServiceAccount and RBAC (`deploy/rbac/kscale.yaml`, rendered from deploy/helm/kscale) as if
/// the chart were installed in `namespace`: the daemon runs with exactly the RBAC users install.
///
/// The rendered objects are moved, not edited: objects and subjects in the release namespace go
/// to `namespace` (so the leader-election Role grants Leases there); every object outside it
/// (cluster-scoped, or in kube-system) gets the suffix `-<namespace>`, as do the role references
/// to it, so no two tests share one, and the returned guard deletes them.
pub async fn service_account_kubeconfig(
    env: &TestEnv,
    client: &kube::Client,
    namespace: &str,
) -> (std::path::PathBuf, BindingGuard) {
    let text = std::fs::read_to_string(repo_root().join("deploy/rbac/kscale.yaml"))
        .expect("deploy/rbac/kscale.yaml");
    let (yaml, objects) = chart_rbac_for_namespace(&text, namespace);
    // The guard first, so whatever gets applied is removed even when applying fails halfway.
    let guard = BindingGuard {
        objects,
        kubeconfig: env.kubeconfig.clone(),
    };
    apply_yaml(client, namespace, &yaml).await;
    let path = impersonating_kubeconfig(env, namespace, "kscale", &format!("sa-{namespace}"));
    (path, guard)
}

/// `deploy/rbac/kscale.yaml` moved into `namespace` (see [`service_account_kubeconfig`]), and
/// every object it puts outside `namespace`.
fn chart_rbac_for_namespace(text: &str, namespace: &str) -> (String, Vec<ObjectRef>) {
    use serde::Deserialize;
    use serde_yaml::Value;
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("deploy/rbac/kscale.yaml: YAML"))
        .filter(|v| !v.is_null())
        .collect();
    let str_at = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_string);
    let object_ref = |doc: &Value| -> ObjectRef {
        (
            str_at(doc, "kind").expect("object without kind"),
            str_at(&doc["metadata"], "namespace"),
            str_at(&doc["metadata"], "name").expect("object without metadata.name"),
        )
    };
    // Every object outside the release namespace, and its name for this test.
    let renamed: std::collections::BTreeMap<ObjectRef, String> = docs
        .iter()
        .map(object_ref)
        .filter(|(_, ns, _)| ns.as_deref() != Some(RBAC_RELEASE_NAMESPACE))
        .map(|r| {
            let name = format!("{}-{namespace}", r.2);
            (r, name)
        })
        .collect();
    let mut out = String::new();
    for mut doc in docs {
        let (kind, ns, name) = object_ref(&doc);
        if ns.as_deref() == Some(RBAC_RELEASE_NAMESPACE) {
            doc["metadata"]["namespace"] = namespace.into();
        } else if let Some(new_name) = renamed.get(&(kind, ns.clone(), name)) {
            doc["metadata"]["name"] = new_name.as_str().into();
        }
        // A RoleBinding's Role is in the binding's own (original) namespace.
        if let Some(role_ref) = doc.get_mut("roleRef") {
            let ref_kind = str_at(role_ref, "kind").expect("roleRef.kind");
            let ref_name = str_at(role_ref, "name").expect("roleRef.name");
            let ref_ns = if ref_kind == "Role" { ns } else { None };
            if let Some(new_name) = renamed.get(&(ref_kind, ref_ns, ref_name)) {
                role_ref["name"] = new_name.as_str().into();
            }
        }
        if let Some(subjects) = doc.get_mut("subjects").and_then(Value::as_sequence_mut) {
            for subject in subjects {
                if str_at(subject, "namespace").as_deref() == Some(RBAC_RELEASE_NAMESPACE) {
                    subject["namespace"] = namespace.into();
                }
            }
        }
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&doc).expect("YAML"));
    }
    let outside = renamed
        .into_iter()
        .map(|((kind, ns, _), name)| (kind, ns, name))
        .collect();
    (out, outside)
}

/// A copy of the admin kubeconfig that impersonates ServiceAccount `namespace/name` (with the
/// groups kube-apiserver gives a ServiceAccount token), written to `target/kubeconfig-<file>`.
pub fn impersonating_kubeconfig(
    env: &TestEnv,
    namespace: &str,
    name: &str,
    file: &str,
) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&env.kubeconfig).expect("kubeconfig");
    let mut config: serde_yaml::Value = serde_yaml::from_str(&text).expect("kubeconfig YAML");
    let users = config["users"].as_sequence_mut().expect("kubeconfig users");
    for user in users {
        let u = &mut user["user"];
        u["as"] = format!("system:serviceaccount:{namespace}:{name}").into();
        u["as-groups"] = serde_yaml::to_value([
            "system:serviceaccounts",
            &format!("system:serviceaccounts:{namespace}"),
            "system:authenticated",
        ])
        .expect("groups");
    }
    let path = repo_root().join(format!("target/kubeconfig-{file}"));
    std::fs::write(&path, serde_yaml::to_string(&config).expect("kubeconfig"))
        .expect("write kubeconfig");
    path
}

/// Deletes what [`service_account_kubeconfig`] put outside the test's namespace (the chart's
/// ClusterRoles and ClusterRoleBindings, its RoleBinding in kube-system) when the test ends.
pub struct BindingGuard {
    pub objects: Vec<ObjectRef>,
    pub kubeconfig: std::path::PathBuf,
}

impl Drop for BindingGuard {
    fn drop(&mut self) {
        let objects = self.objects.clone();
        cleanup_blocking(&self.kubeconfig, move |client| async move {
            use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
            let dp = DeleteParams::default();
            for (kind, ns, name) in objects {
                let c = client.clone();
                let deleted = match (kind.as_str(), ns.as_deref()) {
                    ("ClusterRole", None) => Api::<ClusterRole>::all(c)
                        .delete(&name, &dp)
                        .await
                        .map(drop),
                    ("ClusterRoleBinding", None) => Api::<ClusterRoleBinding>::all(c)
                        .delete(&name, &dp)
                        .await
                        .map(drop),
                    ("Role", Some(ns)) => Api::<Role>::namespaced(c, ns)
                        .delete(&name, &dp)
                        .await
                        .map(drop),
                    ("RoleBinding", Some(ns)) => Api::<RoleBinding>::namespaced(c, ns)
                        .delete(&name, &dp)
                        .await
                        .map(drop),
                    _ => {
                        eprintln!("warning: {kind} {ns:?}/{name} left behind (no cleanup for it)");
                        Ok(())
                    }
                };
                match deleted {
                    Ok(()) => {}
                    // Gone already (a namespaced one with its namespace): nothing left behind.
                    Err(kube::Error::Api(ref s)) if s.code == 404 => {}
                    Err(e) => eprintln!("warning: deleting {kind} {name}: {e}"),
                }
            }
        });
    }
}

/// Runs `cleanup` with an admin client on a runtime of its own and waits for it: for `Drop`
/// implementations, which may run inside or outside a test's runtime.
pub fn cleanup_blocking<F, Fut>(kubeconfig: &Path, cleanup: F)
where
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let kubeconfig = kubeconfig.to_path_buf();
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async move {
            let client = client_from_kubeconfig(&kubeconfig).await.ok()?;
            cleanup(client).await;
            Some(())
        })
    })
    .join();
}

// ------------------------------------------------------------------ HTTPS with client certificates

/// A TLS client trusting `ca_pem` and, with `client`, presenting that certificate and key (PEM).
pub fn tls_client_config(ca_pem: &str, client: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(der.expect("CA PEM")).expect("CA certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .expect("client certificate PEM"),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("client key PEM"),
            )
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// A CA and a serving certificate for `names` (what the aggregator or a test client checks);
/// (ca, cert, key) PEM.
pub fn serving_certificate(names: Vec<String>) -> (String, String, String) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kscale-test-ca");
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(names)
        .expect("params")
        .signed_by(&key, &ca)
        .expect("serving certificate");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// One HTTPS GET over a fresh connection (`Connection: close`); the status and body, or the
/// connection or TLS error.
pub async fn https_get(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        let _ = write!(request, "{k}: {v}\r\n");
    }
    request.push_str("\r\n");
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let mut raw = Vec::new();
    tls.read_to_end(&mut raw)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP response")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line: {head}"))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok((status, dechunk(body)?));
    }
    Ok((status, body.to_string()))
}

// ------------------------------------------------------------------ daemons under test

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The last 30 lines of a daemon's log, newest first, for a failure message.
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(30).collect();
    format!("daemon log (newest first):\n{}", lines.join("\n"))
}

/// `spec.replicas` of Deployment `web` (-1 if it cannot be read).
pub async fn replicas(api: &Api<Deployment>) -> i32 {
    replicas_of(api, "web").await
}

/// Deployment `name`'s `spec.replicas`, or -1 when it cannot be read.
pub async fn replicas_of(api: &Api<Deployment>, name: &str) -> i32 {
    api.get(name)
        .await
        .ok()
        .and_then(|d| d.spec)
        .and_then(|s| s.replicas)
        .unwrap_or(-1)
}

/// Waits until Deployment `web` has `want` replicas; how long that took.
pub async fn wait_replicas(
    api: &Api<Deployment>,
    want: i32,
    timeout: Duration,
    log: &std::path::Path,
) -> Duration {
    let start = Instant::now();
    loop {
        let got = replicas(api).await;
        if got == want {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            panic!(
                "Deployment web has {got} replicas, wanted {want} within {timeout:?}; {}",
                log_tail(log)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// ------------------------------------------------------------------ the external metrics APIService

/// A child process (a daemon under test), killed on drop.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET through kube-apiserver (what `kubectl get --raw` does): status code and body (the
/// Status message for an error).
pub async fn raw_get(client: &Client, path: &str) -> (u16, String) {
    let req = http::Request::get(path).body(Vec::new()).expect("request");
    match client.request_text(req).await {
        Ok(body) => (200, body),
        Err(kube::Error::Api(s)) => (s.code, s.message),
        Err(e) => (0, e.to_string()),
    }
}

/// `apiserver_request_total` summed by "VERB group/resource[/subresource]".
pub fn apiserver_requests(metrics: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let mut get = BTreeMap::new();
        for pair in labels.split("\",") {
            if let Some((k, v)) = pair.split_once("=\"") {
                get.insert(k.trim(), v.trim_end_matches('"'));
            }
        }
        let label = |k: &str| get.get(k).copied().unwrap_or("");
        let group = match label("group") {
            "" => "core",
            g => g,
        };
        let mut key = format!("{} {group}/{}", label("verb"), label("resource"));
        if !label("subresource").is_empty() {
            key = format!("{key}/{}", label("subresource"));
        }
        *out.entry(key).or_insert(0.0) += value;
    }
    out
}

/// kube-apiserver's `apiserver_request_total` so far, summed by "VERB group/resource[/subresource]"
/// (read through `client`, which must be allowed `/metrics`).
pub async fn apiserver_request_counts(client: &Client) -> BTreeMap<String, f64> {
    let (code, body) = raw_get(client, "/metrics").await;
    assert_eq!(code, 200, "kube-apiserver /metrics: {body}");
    apiserver_requests(&body)
}

/// The values of a successful ExternalMetricValueList answer.
pub fn external_metric_values(body: &str) -> Result<Vec<String>, String> {
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))?;
    if v["kind"] != "ExternalMetricValueList" {
        return Err(format!("not a list: {body}"));
    }
    Ok(v["items"]
        .as_array()
        .ok_or("no items")?
        .iter()
        .map(|i| i["value"].as_str().unwrap_or("").to_string())
        .collect())
}

/// Deletes `v1beta1.external.metrics.k8s.io` on drop.
pub struct ApiServiceGuard(PathBuf, String);

impl Drop for ApiServiceGuard {
    fn drop(&mut self) {
        use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
        let name = self.1.clone();
        cleanup_blocking(&self.0, move |client| async move {
            let _ = Api::<APIService>::all(client)
                .delete(&name, &Default::default())
                .await;
        });
    }
}

/// Registers the adapter listening on 127.0.0.1:`port` as `v1beta1.external.metrics.k8s.io`
/// (an ExternalName Service in `namespace` to loopback, as `scripts/testenv` does for
/// metrics-server, and the APIService trusting `ca_pem`), and waits until it is Available
/// (`log` is the daemon's, for the failure message). The guard deletes the APIService.
pub async fn register_external_metrics(
    env: &TestEnv,
    client: &Client,
    namespace: &str,
    port: u16,
    ca_pem: &str,
    log: &Path,
) -> ApiServiceGuard {
    register_external_metrics_service(
        env,
        client,
        namespace,
        "kscale-external-metrics",
        port,
        ca_pem,
        log,
    )
    .await
}

/// [`register_external_metrics`] through a Service named `service` (whose
/// `<service>.<namespace>.svc` the serving certificate must name): KEDA's metrics server, say.
pub async fn register_external_metrics_service(
    env: &TestEnv,
    client: &Client,
    namespace: &str,
    service: &str,
    port: u16,
    ca_pem: &str,
    log: &Path,
) -> ApiServiceGuard {
    register_api_service(
        env,
        client,
        ("external.metrics.k8s.io", "v1beta1"),
        (namespace, service, port),
        ca_pem,
        log,
    )
    .await
}

/// Registers the server on 127.0.0.1:`port` as the APIService of `group`/`version` (an
/// ExternalName Service `service` in `namespace` to loopback, the APIService trusting `ca_pem`)
/// and waits until it is Available (`log` for the failure message). The guard deletes the
/// APIService.
pub async fn register_api_service(
    env: &TestEnv,
    client: &Client,
    (group, version): (&str, &str),
    (namespace, service, port): (&str, &str, u16),
    ca_pem: &str,
    log: &Path,
) -> ApiServiceGuard {
    use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
    let name = format!("{version}.{group}");
    let guard = ApiServiceGuard(env.kubeconfig.clone(), name.clone());
    let ca_bundle = serde_json::to_string(&k8s_openapi::ByteString(ca_pem.as_bytes().to_vec()))
        .expect("base64");
    apply_yaml(
        client,
        namespace,
        &format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: {service}, namespace: {namespace}}}
spec: {{type: ExternalName, externalName: 127.0.0.1}}
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {{name: {name}}}
spec:
  group: {group}
  version: {version}
  service: {{name: {service}, namespace: {namespace}, port: {port}}}
  caBundle: {ca_bundle}
  groupPriorityMinimum: 100
  versionPriority: 100
"#
        ),
    )
    .await;
    let apiservices: Api<APIService> = Api::all(client.clone());
    let start = Instant::now();
    loop {
        let s = apiservices.get(&name).await.expect("APIService");
        let available = s
            .status
            .as_ref()
            .and_then(|st| st.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Available"))
            .cloned();
        if available.as_ref().is_some_and(|c| c.status == "True") {
            return guard;
        }
        if start.elapsed() > Duration::from_secs(60) {
            panic!(
                "APIService {name} not Available: {available:?}\n{}",
                log_tail(log)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `kscale run` as `kubeconfig`'s user serving external metrics on 127.0.0.1:`port` with the
/// certificate [`write_adapter_certificate`] wrote in `dir`, `/metrics` on 127.0.0.1:
/// `metrics_port`, watching `namespace` only and electing its leader there, against the test
/// Prometheus, its log in `log`. Add flags, then spawn it.
pub fn adapter_daemon(
    env: &TestEnv,
    kubeconfig: &Path,
    namespace: &str,
    ports: (u16, u16),
    dir: &Path,
    log: &Path,
) -> Command {
    let (port, metrics_port) = ports;
    let mut command = Command::new(env!("CARGO_BIN_EXE_kscale"));
    command
        .args([
            "run",
            "--metrics-addr",
            &format!("127.0.0.1:{metrics_port}"),
        ])
        .args(["--watch-namespace", namespace])
        .args(["--leader-election-namespace", namespace])
        .args(["--external-metrics-addr", &format!("127.0.0.1:{port}")])
        .arg("--external-metrics-tls-cert-file")
        .arg(dir.join("tls.crt"))
        .arg("--external-metrics-tls-key-file")
        .arg(dir.join("tls.key"))
        .env("KUBECONFIG", kubeconfig)
        .env("KSCALE_PROMETHEUS_URL", &env.prometheus_url)
        .env("RUST_LOG", "kscale=debug,info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"));
    command
}

/// A stock autoscaling/v2 HPA `web` on Deployment `web` (1 to 10 replicas, no scale-down
/// stabilization) with one External metric `metric` and target `AverageValue: average_value`.
pub fn external_hpa_yaml(metric: &str, average_value: &str) -> String {
    format!(
        r#"apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {{name: web}}
spec:
  scaleTargetRef: {{apiVersion: apps/v1, kind: Deployment, name: web}}
  minReplicas: 1
  maxReplicas: 10
  metrics:
  - type: External
    external:
      metric: {{name: {metric}}}
      target: {{type: AverageValue, averageValue: "{average_value}"}}
  behavior:
    scaleDown: {{stabilizationWindowSeconds: 0}}
"#
    )
}

/// Writes `dir/tls.crt` and `dir/tls.key`: a serving certificate for the names the aggregator
/// verifies for a Service `kscale-external-metrics` in `namespace` (and localhost); the CA (PEM).
pub fn write_adapter_certificate(dir: &Path, namespace: &str) -> String {
    std::fs::create_dir_all(dir).expect("test dir");
    let (ca_pem, cert_pem, key_pem) = serving_certificate(vec![
        format!("kscale-external-metrics.{namespace}.svc"),
        "localhost".into(),
        "127.0.0.1".into(),
    ]);
    std::fs::write(dir.join("tls.crt"), &cert_pem).expect("cert");
    std::fs::write(dir.join("tls.key"), &key_pem).expect("key");
    ca_pem
}

/// Waits until HPA `name` has settled at `want`: `status.desiredReplicas` and
/// `status.currentReplicas` both `want`.
pub async fn wait_hpa_settled(
    hpas: &Api<k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler>,
    name: &str,
    want: i32,
) {
    wait_until(
        &format!("HPA {name} settled at {want}"),
        Duration::from_secs(120),
        || async {
            let h = hpas.get(name).await.map_err(|e| e.to_string())?;
            let s = h.status.ok_or("no status")?;
            if s.desired_replicas == want && s.current_replicas == Some(want) {
                Ok(())
            } else {
                let conditions: Vec<String> = s
                    .conditions
                    .iter()
                    .flatten()
                    .map(|c| {
                        format!(
                            "{}={} {}: {}",
                            c.type_,
                            c.status,
                            c.reason.as_deref().unwrap_or("-"),
                            c.message.as_deref().unwrap_or("")
                        )
                    })
                    .collect();
                Err(format!(
                    "desired {} current {:?}; currentMetrics {}; conditions {conditions:?}",
                    s.desired_replicas,
                    s.current_replicas,
                    serde_json::to_string(&s.current_metrics).unwrap_or_default()
                ))
            }
        },
    )
    .await;
}
