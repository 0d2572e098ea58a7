//! kscale and KEDA side by side, on the same test environment, the same Prometheus and the same
//! workloads, in one run: one system at a time on identical fresh objects.
//!
//! For each system: N objects of the bench's custom resource with a `/scale` subresource, each
//! scaled by one object of the system (a `ScalingPolicy`, or a `ScaledObject` with a Prometheus
//! trigger) on one of N/10 distinct queries, with the same threshold semantics (an average value
//! of 5 per replica), the same interval (10 s: kscale's `spec.interval`, KEDA's
//! `pollingInterval`) and the same behavior (the HPA's defaults, except a scale-down
//! stabilization window of 0 s on both, where KEDA's HPA would otherwise wait 300 s).
//!
//! It prints, per system: Prometheus queries per minute (Prometheus' own request counter);
//! apiserver requests per minute (the apiserver's `apiserver_request_total`, minus a baseline
//! window with neither system working, by verb and resource); the delay from a metric change
//! visible in Prometheus to the scale write (p50, p99); resident memory and CPU seconds of each
//! process (kscale: `kscale run`; KEDA: its operator and its metrics server; plus what the
//! shared kube-apiserver, kube-controller-manager and Prometheus spent above the baseline, since
//! KEDA's scaling runs through the cluster's HPA controller); the time from creating the
//! objects to every one evaluated once; and, one object each, the replica count each system
//! ends with when its query turns empty, turns NaN, or its Prometheus stops or turns slow (a
//! proxy in front of the shared Prometheus, seen by that object alone).
//!
//! Run: `scripts/testenv up --with keda && KSCALE_VS_KEDA_N=20 cargo bench --bench vs_keda`
//! (`KSCALE_VS_KEDA_N`, default 100; `KSCALE_VS_KEDA_ROUNDS`, default 10;
//! `KSCALE_VS_KEDA_WINDOW_S` and `KSCALE_VS_KEDA_BAD_WAIT_S`, default 60;
//! `KSCALE_VS_KEDA_INTERVAL_S`, both systems' interval, default 10; `KSCALE_VS_KEDA_CACHED=1`
//! sets KEDA's `useCachedMetrics`).
//! The bench starts KEDA itself if it is not running. While KEDA's phase runs, the bench owns
//! the APIService `v1beta1.external.metrics.k8s.io` (kscale's own adapter tests register that
//! name too: do not run them at the same time); it refuses to start if something else holds it.
//! Not in CI: KEDA takes about 13 minutes to build.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

mod scale_targets;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams};
use kube::core::GroupVersionKind;
use scale_targets::{
    Rounds, Writes, env_usize, percentile, proc_cpu_seconds, proc_status_kib, query_requests,
};
use support::{AuthProxy, ProxyFault, TestEnv};

/// The bad-data cases, one object each.
const BAD_CASES: [&str; 4] = ["empty", "nan", "stopped", "slow"];
/// The replicas a bad-data object has before its data goes bad (a value of 20 at 5 a replica).
const BAD_START: i64 = 4;
/// How late the slow Prometheus answers (longer than either system's query timeout: kscale's
/// 10 s, KEDA's 3 s).
const SLOW_BY: Duration = Duration::from_secs(30);
const EXTERNAL_METRICS: &str = "v1beta1.external.metrics.k8s.io";

struct Settings {
    n: usize,
    queries: usize,
    rounds: usize,
    interval_s: u64,
    window: Duration,
    bad_wait: Duration,
    /// How long a system may take to evaluate every object once before the bench records how
    /// far it got and goes on (`KSCALE_VS_KEDA_FIRST_EVAL_S`, default 900).
    first_eval_bound: Duration,
    keda_cached: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum System {
    Kscale,
    Keda,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Kscale => "kscale",
            System::Keda => "KEDA",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            System::Kscale => "kscale",
            System::Keda => "keda",
        }
    }

    fn resource(self) -> ApiResource {
        match self {
            System::Kscale => ApiResource::erase::<kscale::crd::ScalingPolicy>(&()),
            System::Keda => ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("keda.sh", "v1alpha1", "ScaledObject"),
                "scaledobjects",
            ),
        }
    }

    /// The object that scales `target` on `query` (from `server`, or the default Prometheus).
    fn scaler(
        self,
        name: &str,
        target: &str,
        query: &str,
        server: Option<&str>,
        env: &TestEnv,
        s: &Settings,
    ) -> serde_json::Value {
        let target_ref = serde_json::json!({
            "apiVersion": scale_targets::TARGET_API_VERSION,
            "kind": scale_targets::TARGET_KIND, "name": target});
        let behavior = serde_json::json!({"scaleDown": {"stabilizationWindowSeconds": 0}});
        match self {
            System::Kscale => {
                let mut spec = serde_json::json!({
                    "targetRef": target_ref, "minReplicas": 1, "maxReplicas": 10,
                    "interval": format!("{}s", s.interval_s),
                    "metrics": [{"name": "load", "prometheus": {"query": query},
                                 "target": {"type": "AverageValue", "averageValue": "5"}}],
                    "behavior": behavior});
                if let Some(url) = server {
                    spec["prometheus"] = serde_json::json!({"url": url});
                }
                serde_json::json!({"apiVersion": "kscale.dev/v1alpha1", "kind": "ScalingPolicy",
                                   "metadata": {"name": name}, "spec": spec})
            }
            System::Keda => serde_json::json!({
                "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
                "metadata": {"name": name},
                "spec": {
                    "scaleTargetRef": target_ref, "pollingInterval": s.interval_s,
                    "minReplicaCount": 1, "maxReplicaCount": 10,
                    "advanced": {"horizontalPodAutoscalerConfig": {"behavior": behavior}},
                    "triggers": [{"type": "prometheus", "useCachedMetrics": s.keda_cached,
                                  "metadata": {"serverAddress": server.unwrap_or(&env.prometheus_url),
                                               "query": query, "threshold": "5"}}]}}),
        }
    }
}

/// A process the bench reads from `/proc`.
struct Proc {
    name: String,
    pid: u32,
}

fn pid_from_file(path: &std::path::Path) -> u32 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {}", path.display()))
}

/// The counters a window is measured between.
struct Snapshot {
    at: Instant,
    queries: f64,
    api: BTreeMap<String, f64>,
    cpu: Vec<f64>,
    external: f64,
}

/// Where to read how many external metrics requests a metrics server has served (its own
/// `apiserver_request_total`): the HPA's reads through the aggregator, which the
/// kube-apiserver's counter does not include.
struct ExternalServer {
    tls: std::sync::Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
}

impl ExternalServer {
    fn keda(env: &TestEnv) -> ExternalServer {
        let keda = keda_env(env);
        let read = |p: &str| {
            std::fs::read_to_string(env.dir.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
        };
        let port = keda
            .get("KEDA_ADAPTER_PORT")
            .and_then(|p| p.parse().ok())
            .expect("KEDA_ADAPTER_PORT in keda.env");
        ExternalServer {
            tls: support::tls_client_config(
                &read("pki/ca.crt"),
                Some((&read("pki/admin.crt"), &read("pki/admin.key"))),
            ),
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    async fn served(&self) -> f64 {
        let (status, body) = support::https_get(self.tls.clone(), self.addr, "/metrics", &[])
            .await
            .unwrap_or_else(|e| panic!("KEDA metrics server /metrics: {e}"));
        assert_eq!(status, 200, "KEDA metrics server /metrics: {body}");
        apiserver_requests(&body)
            .iter()
            .filter(|(k, _)| k.contains(" external.metrics.k8s.io/"))
            .map(|(_, v)| v)
            .sum()
    }
}

/// `apiserver_request_total` summed by "VERB group/resource[/subresource]".
fn apiserver_requests(metrics: &str) -> BTreeMap<String, f64> {
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

async fn snapshot(
    env: &TestEnv,
    client: &kube::Client,
    procs: &[Proc],
    external: Option<&ExternalServer>,
) -> Snapshot {
    let (status, metrics) = support::raw_get(client, "/metrics").await;
    assert_eq!(status, 200, "apiserver /metrics: {metrics}");
    let external = match external {
        Some(server) => server.served().await,
        None => 0.0,
    };
    Snapshot {
        external,
        at: Instant::now(),
        queries: query_requests(env),
        api: apiserver_requests(&metrics),
        cpu: procs
            .iter()
            .map(|p| proc_cpu_seconds(p.pid).unwrap_or(f64::NAN))
            .collect(),
    }
}

/// Rates per minute between two snapshots.
struct Window {
    queries: f64,
    /// External metrics requests served by the system's metrics server.
    external: f64,
    api: BTreeMap<String, f64>,
    /// CPU seconds per minute, per process of the snapshot.
    cpu: Vec<f64>,
}

impl Window {
    fn between(a: &Snapshot, b: &Snapshot) -> Window {
        let minutes = (b.at - a.at).as_secs_f64() / 60.0;
        let api = b
            .api
            .iter()
            .map(|(k, v)| (k.clone(), (v - a.api.get(k).unwrap_or(&0.0)) / minutes))
            .filter(|(_, v)| *v > 0.0)
            .collect();
        Window {
            external: (b.external - a.external) / minutes,
            // The second reading counts the first one's request.
            queries: (b.queries - a.queries - 1.0) / minutes,
            api,
            cpu: a
                .cpu
                .iter()
                .zip(&b.cpu)
                .map(|(x, y)| (y - x) / minutes)
                .collect(),
        }
    }

    fn api_total(&self) -> f64 {
        self.api.values().sum()
    }
}

async fn measure(
    env: &TestEnv,
    client: &kube::Client,
    procs: &[Proc],
    external: Option<&ExternalServer>,
    length: Duration,
) -> Window {
    let a = snapshot(env, client, procs, external).await;
    tokio::time::sleep(length).await;
    let b = snapshot(env, client, procs, external).await;
    Window::between(&a, &b)
}

/// What one system's phase measured.
struct Figures {
    system: System,
    /// Creating the objects → every one evaluated once, or how far it got within the bound.
    first_eval: Result<Duration, scale_targets::Shortfall>,
    steady: Window,
    delays: Vec<f64>,
    /// Writes the rounds waited for in vain (`round_timeout`).
    missed: usize,
    /// Own processes: name, CPU seconds per minute (steady state), VmRSS and VmHWM in KiB at
    /// the end of the phase, CPU seconds over the whole phase.
    own: Vec<(String, f64, u64, u64, f64)>,
    bad: Vec<BadOutcome>,
}

/// Which column of `Figures::own` to add up over a system's own processes.
#[derive(Clone, Copy)]
enum Own {
    CpuPerMin,
    RssMib,
    PeakRssMib,
    CpuPhase,
}

impl Figures {
    fn own_sum(&self, what: Own) -> f64 {
        self.own
            .iter()
            .map(|x| match what {
                Own::CpuPerMin => x.1,
                Own::RssMib => x.2 as f64 / 1024.0,
                Own::PeakRssMib => x.3 as f64 / 1024.0,
                Own::CpuPhase => x.4,
            })
            .sum()
    }

    fn api_above(&self, baseline: &Window) -> f64 {
        self.steady.api_total() - baseline.api_total()
    }

    /// Metric change → scale write, the `q`th percentile in seconds.
    fn delay_s(&self, q: f64) -> f64 {
        percentile(&self.delays, q) / 1000.0
    }

    fn first_eval_text(&self) -> String {
        match &self.first_eval {
            Ok(took) => format!("{:.1} s", took.as_secs_f64()),
            Err(short) => format!("not all: {short}"),
        }
    }

    /// One bad-data case: the replicas at the end, the writes during, and the system's reason.
    fn bad_cell(&self, case: usize) -> String {
        let b = &self.bad[case];
        let during = if b.during.is_empty() {
            "no write".to_string()
        } else {
            format!(
                "writes {}",
                b.during
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join("→")
            )
        };
        // The HPA's messages repeat the metric's selector; the cause is at the end.
        let why = b.why.replace('|', "/");
        let why = match why.rsplit_once("external metrics API: ") {
            Some((_, cause)) => format!("HPA ScalingActive False: {cause}"),
            None => why,
        };
        format!("{} ({during}; {why})", b.end)
    }
}

/// One system's figures alone, printed as soon as its phase ends.
fn phase_report(s: &Settings, baseline: &Window, f: &Figures) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(o, "{} phase, N = {}:", f.system.name(), s.n);
    let _ = writeln!(o, "- Prometheus queries / min: {:.0}", f.steady.queries);
    let _ = writeln!(
        o,
        "- apiserver requests / min above baseline: {:.0}",
        f.api_above(baseline)
    );
    let _ = writeln!(
        o,
        "- external metrics API requests / min: {:.0}",
        f.steady.external
    );
    let _ = writeln!(
        o,
        "- metric change → scale write: p50 {:.2} s, p99 {:.2} s ({} timed, {} missed)",
        f.delay_s(50.0),
        f.delay_s(99.0),
        f.delays.len(),
        f.missed
    );
    let _ = writeln!(o, "- every object evaluated once: {}", f.first_eval_text());
    let _ = writeln!(
        o,
        "- own processes: RSS {:.1} MiB (peak {:.1}), CPU {:.2} s/min steady, {:.1} s over the phase",
        f.own_sum(Own::RssMib),
        f.own_sum(Own::PeakRssMib),
        f.own_sum(Own::CpuPerMin),
        f.own_sum(Own::CpuPhase)
    );
    for (i, case) in BAD_CASES.iter().enumerate() {
        let _ = writeln!(o, "- bad data, {case}: {}", f.bad_cell(i));
    }
    o
}

struct BadOutcome {
    end: i64,
    during: Vec<i64>,
    why: String,
}

/// A running system under test and what stops it.
struct Running {
    procs: Vec<Proc>,
    log: PathBuf,
    _daemon: Option<support::ChildGuard>,
    _apiservice: Option<support::ApiServiceGuard>,
}

fn keda_env(env: &TestEnv) -> BTreeMap<String, String> {
    let path = env.dir.join("keda.env");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (is KEDA up?)", path.display()));
    support::parse_env_lines(&text)
}

async fn start(system: System, env: &TestEnv, client: &kube::Client) -> Running {
    match system {
        System::Kscale => {
            let log = support::repo_root().join("target/bench-vs-keda-kscale.log");
            let daemon = scale_targets::start_kscale(env, &[], support::free_port(), &log);
            Running {
                procs: vec![Proc {
                    name: "kscale run".into(),
                    pid: daemon.0.id(),
                }],
                log,
                _daemon: Some(daemon),
                _apiservice: None,
            }
        }
        System::Keda => {
            let keda = keda_env(env);
            let get = |k: &str| {
                keda.get(k)
                    .cloned()
                    .unwrap_or_else(|| panic!("keda.env has no {k}"))
            };
            let log = env.dir.join("logs/keda-operator.log");
            let apiservices: Api<APIService> = Api::all(client.clone());
            if let Some(held) = apiservices
                .get_opt(EXTERNAL_METRICS)
                .await
                .expect("read APIService")
            {
                let owner = held
                    .spec
                    .as_ref()
                    .and_then(|s| s.service.as_ref())
                    .and_then(|s| s.name.clone())
                    .unwrap_or_default();
                assert_eq!(
                    owner,
                    get("KEDA_SERVICE"),
                    "{EXTERNAL_METRICS} is held by Service {owner:?}; the bench registers it for \
                     KEDA and will not take it from another user (stop that one first)"
                );
            }
            let ca = std::fs::read_to_string(get("KEDA_CA_FILE")).expect("KEDA's CA");
            let port: u16 = get("KEDA_ADAPTER_PORT").parse().expect("port");
            let guard = support::register_external_metrics_service(
                env,
                client,
                &get("KEDA_NAMESPACE"),
                &get("KEDA_SERVICE"),
                port,
                &ca,
                &env.dir.join("logs/keda-adapter.log"),
            )
            .await;
            Running {
                procs: vec![
                    Proc {
                        name: "keda-operator".into(),
                        pid: pid_from_file(std::path::Path::new(&get("KEDA_OPERATOR_PID_FILE"))),
                    },
                    Proc {
                        name: "keda-adapter (metrics server)".into(),
                        pid: pid_from_file(std::path::Path::new(&get("KEDA_ADAPTER_PID_FILE"))),
                    },
                ],
                log,
                _daemon: None,
                _apiservice: Some(guard),
            }
        }
    }
}

/// How many of the system's objects in `ns` have been evaluated once: a ScalingPolicy with a
/// desired replica count; for KEDA, an HPA with a current value of its external metric.
async fn evaluated(system: System, client: &kube::Client, ns: &str) -> Result<usize, String> {
    match system {
        System::Kscale => {
            scale_targets::policies_evaluated(&Api::namespaced(client.clone(), ns)).await
        }
        System::Keda => {
            let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), ns);
            let list = hpas
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            Ok(list
                .items
                .iter()
                .filter(|h| {
                    h.status
                        .as_ref()
                        .and_then(|s| s.current_metrics.as_ref())
                        .is_some_and(|m| m.iter().any(|m| m.external.is_some()))
                })
                .count())
        }
    }
}

/// Why the system holds `name` where it is: kscale's reason; the condition of KEDA's HPA that
/// is not True, or the value it reads.
async fn why(system: System, client: &kube::Client, ns: &str, name: &str) -> String {
    match system {
        System::Kscale => {
            let api: Api<kscale::crd::ScalingPolicy> = Api::namespaced(client.clone(), ns);
            api.get(name)
                .await
                .ok()
                .and_then(|p| p.status)
                .and_then(|s| s.reason)
                .unwrap_or_default()
        }
        System::Keda => {
            let api: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), ns);
            let Ok(hpa) = api.get(&format!("keda-hpa-{name}")).await else {
                return "no HPA".into();
            };
            let status = hpa.status.unwrap_or_default();
            let value = status
                .current_metrics
                .unwrap_or_default()
                .iter()
                .filter_map(|m| m.external.as_ref())
                .filter_map(|e| e.current.average_value.as_ref())
                .map(|q| q.0.clone())
                .next();
            let failing = status
                .conditions
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.status != "True" && c.type_ != "ScalingLimited");
            match (failing, value) {
                (Some(c), _) => format!(
                    "HPA {} {}: {}",
                    c.type_,
                    c.status,
                    c.message.unwrap_or_default()
                ),
                (None, Some(v)) => format!("HPA reads an average value of {v}"),
                (None, None) => "HPA reads no value".into(),
            }
        }
    }
}

async fn replicas_of(targets: &Api<DynamicObject>, name: &str) -> i64 {
    targets
        .get(name)
        .await
        .ok()
        .and_then(|t| t.data["spec"]["replicas"].as_i64())
        .unwrap_or(-1)
}

/// Stops what `start` started; KEDA's ScaledObjects are deleted first, while the operator
/// still runs (they carry its finalizer).
async fn stop(system: System, running: Running, scalers: &Api<DynamicObject>) {
    if system == System::Keda {
        let _ = scalers
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await;
        support::wait_until("ScaledObjects gone", Duration::from_secs(300), || async {
            let left = scalers
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .len();
            if left == 0 {
                Ok(())
            } else {
                Err(format!("{left} left"))
            }
        })
        .await;
    }
    drop(running);
}

#[allow(clippy::too_many_arguments)]
async fn bad_data(
    system: System,
    env: &TestEnv,
    client: &kube::Client,
    ns: &str,
    targets: &Api<DynamicObject>,
    scalers: &Api<DynamicObject>,
    writes: &Writes,
    s: &Settings,
) -> Vec<BadOutcome> {
    let exporter = support::TestExporter::start(env, &format!("{ns}-bad"));
    let (down, slow) = (
        AuthProxy::open(&env.prometheus_url),
        AuthProxy::open(&env.prometheus_url),
    );
    let metric = |case: &str| format!("kscale_vs_keda_{case}");
    let query = |case: &str| format!("sum({}{{exporter=\"{}\"}})", metric(case), exporter.id);
    for case in BAD_CASES {
        exporter.set(&metric(case), &[], 20.0);
    }
    support::wait_until(
        "bad-data series scraped",
        Duration::from_secs(30),
        || async {
            for case in BAD_CASES {
                if support::prometheus_scalar(env, &query(case)).ok().flatten() != Some(20.0) {
                    return Err(format!("{case} not visible yet"));
                }
            }
            Ok(())
        },
    )
    .await;
    let names: Vec<String> = BAD_CASES.iter().map(|c| format!("bad-{c}")).collect();
    scale_targets::create_targets(targets, &names, 1).await;
    let specs = BAD_CASES
        .iter()
        .map(|case| {
            let server = match *case {
                "stopped" => Some(down.url.as_str()),
                "slow" => Some(slow.url.as_str()),
                _ => None,
            };
            system.scaler(
                &format!("bad-{case}"),
                &format!("bad-{case}"),
                &query(case),
                server,
                env,
                s,
            )
        })
        .collect();
    scale_targets::create_all(scalers, specs).await;
    let ready_by = Instant::now() + Duration::from_secs(300);
    loop {
        let mut at = Vec::new();
        for name in &names {
            at.push(replicas_of(targets, name).await);
        }
        if at.iter().all(|r| *r == BAD_START) {
            break;
        }
        if Instant::now() > ready_by {
            eprintln!(
                "{}: bad-data objects at {at:?}, not all at {BAD_START} after 300 s; breaking them anyway",
                system.name()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let broke = Instant::now();
    exporter.remove(&metric("empty"));
    exporter.set(&metric("nan"), &[], f64::NAN);
    down.set_fault(ProxyFault::Down);
    slow.set_fault(ProxyFault::Slow(SLOW_BY));
    eprintln!(
        "{}: bad data applied; waiting {:?}",
        system.name(),
        s.bad_wait
    );
    tokio::time::sleep(s.bad_wait).await;
    let mut out = Vec::new();
    for name in &names {
        out.push(BadOutcome {
            end: replicas_of(targets, name).await,
            during: writes.after(name, broke),
            why: why(system, client, ns, name).await,
        });
    }
    out
}

async fn phase(
    system: System,
    env: &TestEnv,
    client: &kube::Client,
    target_resource: &ApiResource,
    s: &Settings,
) -> Figures {
    eprintln!("=== {} with {} objects", system.name(), s.n);
    let ns = support::create_namespace(env, client, &format!("vs-keda-{}", system.slug())).await;
    let targets: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns.name, target_resource);
    let scalers: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns.name, &system.resource());
    let exporter = support::TestExporter::start(env, &ns.name);
    let moves = Rounds {
        env,
        exporter: &exporter,
        metric: "kscale_vs_keda_load",
        objects: s.n,
        queries: s.queries,
        interval_s: s.interval_s,
        round_timeout: Duration::from_secs(3 * s.interval_s + 60),
    };
    moves.rest();
    let names: Vec<String> = (0..s.n).map(|i| format!("t{i}")).collect();
    scale_targets::create_targets(&targets, &names, 1).await;
    let writes = Writes::watch(&targets);
    support::wait_until(
        "resting values scraped",
        Duration::from_secs(30),
        || async {
            match support::prometheus_scalar(env, &moves.query(s.queries - 1)) {
                Ok(Some(_)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    let running = start(system, env, client).await;
    let cpu_start: Vec<f64> = running
        .procs
        .iter()
        .map(|p| proc_cpu_seconds(p.pid).unwrap_or(f64::NAN))
        .collect();
    let created = Instant::now();
    let specs = (0..s.n)
        .map(|i| {
            system.scaler(
                &format!("s{i}"),
                &format!("t{i}"),
                &moves.query(i % s.queries),
                None,
                env,
                s,
            )
        })
        .collect();
    scale_targets::create_all(&scalers, specs).await;
    // Timed from before the objects are created, as the figure's name says.
    let first_eval = scale_targets::count_within(s.n, s.first_eval_bound, || {
        evaluated(system, client, &ns.name)
    })
    .await
    .map(|_| created.elapsed())
    .map_err(|short| scale_targets::Shortfall {
        after: created.elapsed(),
        ..short
    });
    match &first_eval {
        Ok(took) => eprintln!("{}: all {} evaluated after {took:.1?}", system.name(), s.n),
        Err(short) => eprintln!(
            "{}: evaluated once: only {short}; measuring the rest anyway",
            system.name()
        ),
    }

    tokio::time::sleep(Duration::from_secs(s.interval_s)).await;
    let mut procs = running
        .procs
        .iter()
        .map(|p| Proc {
            name: p.name.clone(),
            pid: p.pid,
        })
        .collect::<Vec<_>>();
    procs.extend(shared_procs(env));
    let external = (system == System::Keda).then(|| ExternalServer::keda(env));
    let steady = measure(env, client, &procs, external.as_ref(), s.window).await;
    eprintln!("{}: steady window measured", system.name());

    let (delays, missed) = moves
        .run(&writes, s.rounds, &running.log.display().to_string())
        .await;
    let bad = bad_data(
        system, env, client, &ns.name, &targets, &scalers, &writes, s,
    )
    .await;
    let own = running
        .procs
        .iter()
        .zip(&steady.cpu)
        .zip(&cpu_start)
        .map(|((p, per_min), at_start)| {
            (
                p.name.clone(),
                *per_min,
                proc_status_kib(p.pid, "VmRSS:").unwrap_or(0),
                proc_status_kib(p.pid, "VmHWM:").unwrap_or(0),
                proc_cpu_seconds(p.pid).unwrap_or(f64::NAN) - at_start,
            )
        })
        .collect();
    stop(system, running, &scalers).await;
    Figures {
        system,
        first_eval,
        steady,
        delays,
        missed,
        own,
        bad,
    }
}

/// The shared control plane processes whose work a system causes (KEDA's scaling runs in the
/// HPA controller of kube-controller-manager; both systems' requests land on the apiserver).
fn shared_procs(env: &TestEnv) -> Vec<Proc> {
    [
        "kube-apiserver",
        "kube-controller-manager",
        "prometheus",
        "etcd",
    ]
    .iter()
    .map(|name| Proc {
        name: (*name).to_string(),
        pid: pid_from_file(&env.dir.join(format!("pids/{name}.pid"))),
    })
    .collect()
}

fn ratio(keda: f64, kscale: f64) -> String {
    if kscale > 0.0 && keda.is_finite() {
        format!("{:.1}×", keda / kscale)
    } else {
        "–".into()
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn report(s: &Settings, baseline: &Window, figures: &[Figures], loads: &[String]) -> String {
    use std::fmt::Write as _;
    let (k, e) = (&figures[0], &figures[1]);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "vs_keda: N = {} objects over {} distinct queries, interval {} s, steady window {} s, \
         {} rounds, KEDA useCachedMetrics {}",
        s.n,
        s.queries,
        s.interval_s,
        s.window.as_secs(),
        s.rounds,
        s.keda_cached
    );
    let _ = writeln!(
        o,
        "load average (1/5/15 min) after each phase: {}",
        loads.join(" | ")
    );
    let _ = writeln!(o);
    let _ = writeln!(o, "| figure | kscale | KEDA | KEDA / kscale |");
    let _ = writeln!(o, "|---|---|---|---|");
    let row = |o: &mut String, name: &str, a: f64, b: f64, unit: &str, digits: usize| {
        let _ = writeln!(
            o,
            "| {name} | {a:.digits$}{unit} | {b:.digits$}{unit} | {} |",
            ratio(b, a)
        );
    };
    row(
        &mut o,
        "Prometheus queries / min",
        k.steady.queries,
        e.steady.queries,
        "",
        0,
    );
    row(
        &mut o,
        "apiserver requests / min above baseline",
        k.api_above(baseline),
        e.api_above(baseline),
        "",
        0,
    );
    row(
        &mut o,
        "external metrics API requests / min (HPA → metrics server, through the aggregator)",
        k.steady.external,
        e.steady.external,
        "",
        0,
    );
    row(
        &mut o,
        "metric change → scale write, p50",
        k.delay_s(50.0),
        e.delay_s(50.0),
        " s",
        2,
    );
    row(
        &mut o,
        "metric change → scale write, p99",
        k.delay_s(99.0),
        e.delay_s(99.0),
        " s",
        2,
    );
    let _ = writeln!(
        o,
        "| metric change → scale write: writes timed / missed (none within {} s) | {} / {} | {} / {} | |",
        3 * s.interval_s + 60,
        k.delays.len(),
        k.missed,
        e.delays.len(),
        e.missed
    );
    let first_ratio = match (&k.first_eval, &e.first_eval) {
        (Ok(a), Ok(b)) => ratio(b.as_secs_f64(), a.as_secs_f64()),
        (Ok(a), Err(short)) => format!("> {}", ratio(short.after.as_secs_f64(), a.as_secs_f64())),
        _ => "–".into(),
    };
    let _ = writeln!(
        o,
        "| creating the objects → every one evaluated once | {} | {} | {first_ratio} |",
        k.first_eval_text(),
        e.first_eval_text()
    );
    row(
        &mut o,
        "own processes: resident memory at the end (MiB)",
        k.own_sum(Own::RssMib),
        e.own_sum(Own::RssMib),
        "",
        1,
    );
    row(
        &mut o,
        "own processes: peak resident memory (MiB)",
        k.own_sum(Own::PeakRssMib),
        e.own_sum(Own::PeakRssMib),
        "",
        1,
    );
    row(
        &mut o,
        "own processes: CPU s / min, steady state",
        k.own_sum(Own::CpuPerMin),
        e.own_sum(Own::CpuPerMin),
        "",
        2,
    );
    row(
        &mut o,
        "own processes: CPU s over the whole phase",
        k.own_sum(Own::CpuPhase),
        e.own_sum(Own::CpuPhase),
        "",
        1,
    );
    for (i, name) in [
        "kube-apiserver",
        "kube-controller-manager",
        "prometheus",
        "etcd",
    ]
    .iter()
    .enumerate()
    {
        let cost = |f: &Figures| f.steady.cpu[f.own.len() + i] - baseline.cpu[i];
        row(
            &mut o,
            &format!("{name}: CPU s / min above baseline"),
            cost(k),
            cost(e),
            "",
            2,
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "Per process:");
    for f in figures {
        for (name, per_min, rss, hwm, total) in &f.own {
            let _ = writeln!(
                o,
                "- {}: {name}: RSS {:.1} MiB (peak {:.1} MiB), CPU {per_min:.2} s/min steady, {total:.1} s over the phase",
                f.system.name(),
                *rss as f64 / 1024.0,
                *hwm as f64 / 1024.0
            );
        }
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "apiserver requests / min by verb and resource (baseline: {:.0} / min with neither system working):",
        baseline.api_total()
    );
    for f in figures {
        let mut extra: Vec<(String, f64)> = f
            .steady
            .api
            .iter()
            .map(|(key, v)| (key.clone(), v - baseline.api.get(key).unwrap_or(&0.0)))
            .filter(|(_, v)| *v >= 0.5)
            .collect();
        extra.sort_by(|a, b| b.1.total_cmp(&a.1));
        let list: Vec<String> = extra
            .iter()
            .take(8)
            .map(|(key, v)| format!("{key} {v:.0}"))
            .collect();
        let _ = writeln!(o, "- {}: {}", f.system.name(), list.join(", "));
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "Bad data (one object each, {BAD_START} replicas before; replicas {} s later):",
        s.bad_wait.as_secs()
    );
    let _ = writeln!(o);
    let _ = writeln!(o, "| case | kscale | KEDA |");
    let _ = writeln!(o, "|---|---|---|");
    for (i, case) in BAD_CASES.iter().enumerate() {
        let _ = writeln!(o, "| {case} | {} | {} |", k.bad_cell(i), e.bad_cell(i));
    }
    o
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass nothing useful.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n = env_usize("KSCALE_VS_KEDA_N", 100).max(1);
    let s = Settings {
        n,
        queries: n.div_ceil(10),
        rounds: env_usize("KSCALE_VS_KEDA_ROUNDS", 10),
        interval_s: env_usize("KSCALE_VS_KEDA_INTERVAL_S", 10).max(1) as u64,
        window: Duration::from_secs(env_usize("KSCALE_VS_KEDA_WINDOW_S", 60) as u64),
        bad_wait: Duration::from_secs(env_usize("KSCALE_VS_KEDA_BAD_WAIT_S", 60) as u64),
        first_eval_bound: Duration::from_secs(env_usize("KSCALE_VS_KEDA_FIRST_EVAL_S", 900) as u64),
        keda_cached: std::env::var("KSCALE_VS_KEDA_CACHED").is_ok_and(|v| v == "1"),
    };
    let Some(env) = support::testenv() else {
        eprintln!("vs_keda: the test environment is off (KSCALE_SKIP_TESTENV=1): nothing measured");
        return;
    };
    eprintln!(
        "vs_keda: starting KEDA (`scripts/testenv up --with keda`; the first time builds it)"
    );
    if let Err(e) = support::run_testenv_script(&["up", "--with", "keda"], &[]) {
        panic!("{e}");
    }
    let client = env.client().await;
    support::install_crd(&client).await;
    let target_resource = scale_targets::install_target_crd(&client).await;

    let shared = shared_procs(env);
    eprintln!(
        "vs_keda: baseline window ({:?}, neither system working)",
        s.window
    );
    let baseline = measure(env, &client, &shared, None, s.window).await;
    let mut figures = Vec::new();
    let mut loads = Vec::new();
    for system in [System::Kscale, System::Keda] {
        let f = phase(system, env, &client, &target_resource, &s).await;
        // Each phase's own figures as soon as it ends: a long run that dies later keeps them.
        let text = phase_report(&s, &baseline, &f);
        eprintln!("{text}");
        let out = support::repo_root().join(format!("target/vs-keda-{n}-{}.md", system.slug()));
        if std::fs::write(&out, &text).is_ok() {
            eprintln!(
                "vs_keda: {} phase written to {}",
                system.name(),
                out.display()
            );
        }
        figures.push(f);
        loads.push(load_average());
    }
    let text = report(&s, &baseline, &figures, &loads);
    println!("{text}");
    let out = support::repo_root().join(format!("target/vs-keda-{n}.md"));
    if std::fs::write(&out, &text).is_ok() {
        eprintln!("vs_keda: also written to {}", out.display());
    }
}
