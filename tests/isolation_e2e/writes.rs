//! See `main.rs`: the writes part of the abuse suite (issue 13, kinds 6 and 7).
//!
//! - a manual scale between kscale's read of `/scale` and its write is not overwritten (the
//!   write is conditional on the resourceVersion read; a 409 makes kscale read again and decide
//!   again);
//! - with status writes denied by RBAC, a `Pods: 1 per 600s` rate limit still holds (scale
//!   events are kept in memory as well as in status);
//! - two daemons whose leases overlap (the leader's renewal stalls for longer than the lease):
//!   at most one writes at any time;
//! - two Controller policies on one Deployment, one naming `apiVersion: apps/v1` and one naming
//!   none: one writer (the oldest), the other reports ConflictingPolicy.
//!
//! Each scenario has a healthy neighbour (its own Deployment and policy in the same namespace,
//! served by the same daemon) that must keep its interval: its scale write lands within
//! interval + 1 s of its metric change being visible in Prometheus.
//!
//! How the races are provoked deterministically: the daemon talks to the real kube-apiserver
//! through [`ApiProxy`], a small plain-HTTP listener on 127.0.0.1 in the test that forwards every
//! request through a `kube::Client` (with the admin credentials) and records each request. The
//! proxy can run a hook right before it forwards a given write (the manual scale is made after
//! kscale read the scale and decided, and before its write reaches the apiserver: exactly the
//! lost-write window), and can hold the daemon's Lease requests (a renewal that stalls), while
//! every other request still goes through. Its log audits who wrote what, and when.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use kscale::crd::ScalingPolicy;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};

use crate::support;

/// The interval of every policy here.
const INTERVAL: Duration = Duration::from_secs(1);
/// The issue's bound for a healthy policy: its scale write lands within interval + 1 s of its
/// metric change being visible.
const NEIGHBOUR_BOUND: Duration = Duration::from_secs(2);

// ------------------------------------------------------------------ the apiserver proxy

/// One request the proxy forwarded.
#[derive(Debug, Clone)]
struct Logged {
    /// When the upstream answer came back.
    at: Instant,
    method: String,
    path: String,
    status: u16,
}

impl Logged {
    fn is_write(&self) -> bool {
        !matches!(self.method.as_str(), "GET" | "HEAD" | "OPTIONS")
    }

    fn is_lease(&self) -> bool {
        self.path.contains("/leases")
    }
}

type Hook = Pin<Box<dyn Future<Output = ()> + Send>>;

struct ProxyState {
    upstream: kube::Client,
    log: Mutex<Vec<Logged>>,
    /// Run once, right before the first PATCH of this path is forwarded.
    before_patch: Mutex<Option<(String, Hook)>>,
    /// While set, Lease requests are held (not forwarded).
    stall_leases: AtomicBool,
}

/// A plain-HTTP proxy to the real apiserver (see the module docs); stops on drop.
struct ApiProxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ApiProxy {
    async fn start(upstream: kube::Client) -> ApiProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(ProxyState {
            upstream,
            log: Mutex::new(Vec::new()),
            before_patch: Mutex::new(None),
            stall_leases: AtomicBool::new(false),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req| forward(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        ApiProxy { addr, state, task }
    }

    /// A kubeconfig that points at this proxy (no credentials: the proxy adds its own).
    fn kubeconfig(&self, file: &str) -> PathBuf {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: proxy\n  cluster: {{server: \"http://{}\"}}\nusers:\n- name: proxy\n  user: {{}}\ncontexts:\n- name: proxy\n  context: {{cluster: proxy, user: proxy}}\ncurrent-context: proxy\n",
            self.addr
        );
        let path = support::repo_root().join(format!("target/kubeconfig-{file}"));
        std::fs::write(&path, text).expect("write proxy kubeconfig");
        path
    }

    fn log(&self) -> Vec<Logged> {
        self.state.log.lock().expect("proxy log").clone()
    }

    fn set_before_patch(&self, path: String, hook: Hook) {
        *self.state.before_patch.lock().expect("hook") = Some((path, hook));
    }

    fn stall_leases(&self, stall: bool) {
        self.state.stall_leases.store(stall, Ordering::SeqCst);
    }
}

async fn forward(
    state: Arc<ProxyState>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<kube::client::Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or_else(|| path.clone(), |p| p.as_str().to_string());
    if path.contains("/leases") {
        while state.stall_leases.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if method == hyper::Method::PATCH {
        let hook = {
            let mut slot = state.before_patch.lock().expect("hook");
            match slot.take() {
                Some((p, hook)) if p == path => Some(hook),
                other => {
                    *slot = other;
                    None
                }
            }
        };
        if let Some(hook) = hook {
            hook.await;
        }
    }
    let (parts, body) = req.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let mut upstream = http::Request::builder()
        .method(parts.method.clone())
        .uri(path_and_query);
    for (name, value) in &parts.headers {
        if name != http::header::HOST && name != http::header::CONNECTION {
            upstream = upstream.header(name, value);
        }
    }
    let upstream = upstream
        .body(kube::client::Body::from(bytes))
        .expect("request");
    let (status, response) = match state.upstream.send(upstream).await {
        Ok(mut resp) => {
            resp.headers_mut().remove(http::header::CONNECTION);
            resp.headers_mut().remove(http::header::TRANSFER_ENCODING);
            (resp.status().as_u16(), resp)
        }
        Err(e) => {
            let mut resp =
                hyper::Response::new(kube::client::Body::from(e.to_string().into_bytes()));
            *resp.status_mut() = http::StatusCode::BAD_GATEWAY;
            (502, resp)
        }
    };
    state.log.lock().expect("proxy log").push(Logged {
        at: Instant::now(),
        method: method.to_string(),
        path,
        status,
    });
    Ok(response)
}

// ------------------------------------------------------------------ daemons

/// A `kscale run` child process (killed on drop) and its log.
struct Daemon {
    controller: support::controller::Controller,
    log: PathBuf,
}

fn start_daemon(
    env: &support::TestEnv,
    kubeconfig: &Path,
    namespace: &str,
    identity: &str,
) -> Daemon {
    let log = support::repo_root().join(format!(
        "target/isolation-writes-{identity}-{}.log",
        std::process::id()
    ));
    let controller = support::controller::start_controller(
        env,
        kubeconfig,
        &log,
        support::free_port(),
        namespace,
        identity,
    );
    Daemon { controller, log }
}

// ------------------------------------------------------------------ scenario

/// A namespace with a Deployment and an exporter metric per workload, and a policy each.
struct Scenario {
    ns: support::TestNamespace,
    exporter: support::TestExporter,
    policies: Api<ScalingPolicy>,
    deployments: Api<Deployment>,
    client: kube::Client,
}

impl Scenario {
    async fn start(env: &support::TestEnv, client: &kube::Client, prefix: &str) -> Scenario {
        support::install_crd(client).await;
        let ns = support::create_namespace(env, client, prefix).await;
        let exporter = support::TestExporter::start(env, &ns.name);
        Scenario {
            policies: Api::namespaced(client.clone(), &ns.name),
            deployments: Api::namespaced(client.clone(), &ns.name),
            client: client.clone(),
            ns,
            exporter,
        }
    }

    fn metric(&self, workload: &str) -> String {
        format!("kscale_writes_{}", workload.replace('-', "_"))
    }

    fn query(&self, workload: &str) -> String {
        format!(
            "sum({}{{exporter=\"{}\"}})",
            self.metric(workload),
            self.exporter.id
        )
    }

    fn set(&self, workload: &str, value: f64) {
        self.exporter.set(&self.metric(workload), &[], value);
    }

    /// Deployments `web` and `calm`, each at 2 replicas with metric value 10, and their
    /// policies: `web` with `web_behavior`, `calm` (the healthy neighbour) with
    /// [`CALM_BEHAVIOR`]; returns once both metrics are visible in Prometheus.
    async fn web_and_calm(
        env: &support::TestEnv,
        client: &kube::Client,
        prefix: &str,
        web_behavior: &str,
    ) -> Scenario {
        let sc = Scenario::start(env, client, prefix).await;
        sc.workload("web", 2, 10.0).await;
        sc.workload("calm", 2, 10.0).await;
        sc.policy(
            "web",
            "web",
            "{apiVersion: apps/v1, kind: Deployment, name: web}",
            web_behavior,
        )
        .await;
        sc.calm_policy().await;
        sc.wait_visible(env, "web", 10.0).await;
        sc.wait_visible(env, "calm", 10.0).await;
        sc
    }

    /// The healthy neighbour's policy: `calm` on Deployment `calm`, with [`CALM_BEHAVIOR`].
    async fn calm_policy(&self) {
        self.policy(
            "calm",
            "calm",
            "{apiVersion: apps/v1, kind: Deployment, name: calm}",
            CALM_BEHAVIOR,
        )
        .await;
    }

    async fn wait_visible(&self, env: &support::TestEnv, workload: &str, value: f64) {
        let query = self.query(workload);
        support::wait_until(
            &format!("{workload}'s metric at {value} in Prometheus"),
            Duration::from_secs(30),
            || async {
                match support::prometheus_scalar(env, &query) {
                    Ok(Some(v)) if (v - value).abs() < 1e-9 => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
    }

    /// A Deployment `name` of `replicas` simulated pods, its metric at `value`.
    async fn workload(&self, name: &str, replicas: i32, value: f64) {
        support::create_kwok_deployment(&self.client, &self.ns.name, name, replicas, "100m", "50m")
            .await;
        self.set(name, value);
    }

    /// Creates a Controller policy `name` on Deployment `target` (5 per replica of its metric,
    /// 1 s interval); `target_ref` and `behavior` are YAML flow mappings.
    async fn policy(&self, name: &str, metric_of: &str, target_ref: &str, behavior: &str) {
        let yaml = format!(
            r#"
apiVersion: kscale.dev/v1alpha1
kind: ScalingPolicy
metadata: {{name: {name}, namespace: {ns}}}
spec:
  targetRef: {target_ref}
  minReplicas: 1
  maxReplicas: 10
  interval: 1s
  metrics:
  - name: load
    prometheus: {{query: '{query}'}}
    target: {{type: AverageValue, averageValue: "5"}}
  behavior: {behavior}
"#,
            ns = self.ns.name,
            query = self.query(metric_of),
        );
        let policy: ScalingPolicy = serde_yaml::from_str(&yaml).expect("policy parses");
        self.policies
            .create(&PostParams::default(), &policy)
            .await
            .expect("policy created");
    }

    async fn replicas(&self, name: &str) -> i32 {
        self.deployments
            .get(name)
            .await
            .ok()
            .and_then(|d| d.spec)
            .and_then(|s| s.replicas)
            .unwrap_or(-1)
    }

    async fn wait_replicas(&self, name: &str, want: i32, timeout: Duration, log: &Path) {
        let start = Instant::now();
        loop {
            let got = self.replicas(name).await;
            if got == want {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "Deployment {name} has {got} replicas, wanted {want} within {timeout:?}; {}",
                support::log_tail(log)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Checks Deployment `name` stays at `want` replicas for `period`.
    async fn stays(&self, name: &str, want: i32, period: Duration, log: &Path) {
        let start = Instant::now();
        while start.elapsed() < period {
            let got = self.replicas(name).await;
            assert_eq!(
                got,
                want,
                "Deployment {name} moved to {got} after {:?}; {}",
                start.elapsed(),
                support::log_tail(log)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The healthy neighbour `calm` (a policy with no scale-down window) keeps its interval: its
    /// metric moves to `value` (`want` replicas), and the scale write lands within
    /// [`NEIGHBOUR_BOUND`] of the change being visible in Prometheus.
    async fn neighbour_keeps_its_interval(
        &self,
        env: &support::TestEnv,
        value: f64,
        want: i32,
        log: &Path,
    ) {
        self.set("calm", value);
        let query = self.query("calm");
        // Polled tightly: the bound is measured from the moment the change is visible.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(v)) = support::prometheus_scalar(env, &query)
                && (v - value).abs() < 1e-9
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "calm's metric never became visible"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let visible = Instant::now();
        loop {
            if self.replicas("calm").await == want {
                break;
            }
            assert!(
                visible.elapsed() < Duration::from_secs(30),
                "calm never reached {want}; {}",
                support::log_tail(log)
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let took = visible.elapsed();
        eprintln!("neighbour calm: scale write {took:?} after its metric was visible");
        assert!(
            took <= NEIGHBOUR_BOUND,
            "the healthy neighbour took {took:?} (> interval {INTERVAL:?} + 1 s) to scale; {}",
            support::log_tail(log)
        );
    }

    async fn events(&self) -> Vec<Event> {
        Api::<Event>::namespaced(self.client.clone(), &self.ns.name)
            .list(&ListParams::default())
            .await
            .expect("events")
            .items
    }
}

/// web's behavior where its rate policy is what is checked: one replica up per 600 s.
const ONE_POD_PER_600S: &str = "{scaleUp: {stabilizationWindowSeconds: 0, policies: [{type: Pods, value: 1, periodSeconds: 600}]}}";

/// The neighbour's policy: no scale-down window, so both directions are immediate.
const CALM_BEHAVIOR: &str = "{scaleDown: {stabilizationWindowSeconds: 0}}";

// ------------------------------------------------------------------ kind 6: lost writes

/// A manual `kubectl scale` lands after kscale read the scale and decided, and before its write
/// reaches the apiserver. On main the write (a merge patch without resourceVersion) silently
/// overwrote it; now the write is refused (409), kscale reads again and decides again from the
/// manual count, and says so.
#[tokio::test]
async fn a_manual_scale_between_read_and_write_is_not_overwritten() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    // web never scales down by itself, so a re-decision from the manual 6 holds 6.
    let sc = Scenario::web_and_calm(
        env,
        &client,
        "iso-race",
        "{scaleDown: {selectPolicy: Disabled}}",
    )
    .await;
    let ns = sc.ns.name.clone();
    support::wait_for_ready_pods(&client, &ns, "app=web", 2, Duration::from_secs(60)).await;

    let proxy = ApiProxy::start(client.clone()).await;
    let daemon = start_daemon(env, &proxy.kubeconfig(&format!("race-{ns}")), &ns, "race");
    support::wait_until(
        "web's first evaluation",
        Duration::from_secs(30),
        || async {
            let s = sc
                .policies
                .get("web")
                .await
                .map_err(|e| e.to_string())?
                .status;
            match s.and_then(|s| s.reason) {
                Some(r) if r.starts_with("hold 2→2") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    // Right before kscale's next write of web's scale reaches the apiserver, someone scales web
    // to 6 by hand (a merge patch without precondition, as `kubectl scale` does).
    let manual = sc.deployments.clone();
    let fired = Arc::new(AtomicBool::new(false));
    let fired_in_hook = fired.clone();
    proxy.set_before_patch(
        format!("/apis/apps/v1/namespaces/{ns}/deployments/web/scale"),
        Box::pin(async move {
            manual
                .patch_scale(
                    "web",
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({"spec": {"replicas": 6}})),
                )
                .await
                .expect("manual scale");
            fired_in_hook.store(true, Ordering::SeqCst);
        }),
    );
    // 20 / 5 = 4: kscale decides 2 → 4 from what it read, and writes.
    sc.set("web", 20.0);
    support::wait_until(
        "kscale's write of web's scale",
        Duration::from_secs(30),
        || async {
            let writes: Vec<_> = proxy
                .log()
                .into_iter()
                .filter(|l| l.method == "PATCH" && l.path.ends_with("/deployments/web/scale"))
                .collect();
            if fired.load(Ordering::SeqCst) && !writes.is_empty() {
                Ok(())
            } else {
                Err(format!("writes so far: {writes:?}"))
            }
        },
    )
    .await;
    // The write was refused, and the manual count stands for many intervals.
    let writes: Vec<_> = proxy
        .log()
        .into_iter()
        .filter(|l| l.method == "PATCH" && l.path.ends_with("/deployments/web/scale"))
        .collect();
    assert_eq!(
        writes[0].status, 409,
        "the stale write must be refused: {writes:?}"
    );
    sc.stays("web", 6, Duration::from_secs(5), &daemon.log)
        .await;
    let writes: Vec<_> = proxy
        .log()
        .into_iter()
        .filter(|l| l.method == "PATCH" && l.path.ends_with("/deployments/web/scale"))
        .collect();
    assert!(
        writes.iter().all(|l| l.status == 409),
        "no write of web's scale may succeed after the manual scale: {writes:?}"
    );
    // The policy says so: an event, and the log.
    support::wait_until(
        "the ScaleConflict event",
        Duration::from_secs(20),
        || async {
            let events = sc.events().await;
            events
                .iter()
                .find(|e| {
                    e.reason.as_deref() == Some("ScaleConflict")
                        && e.note.as_deref().is_some_and(|n| {
                            n.contains("409 Conflict") && n.contains("read (2 replicas)")
                        })
                })
                .map(|_| ())
                .ok_or_else(|| {
                    format!(
                        "events: {:?}",
                        events
                            .iter()
                            .map(|e| (e.reason.clone(), e.note.clone()))
                            .collect::<Vec<_>>()
                    )
                })
        },
    )
    .await;
    let status = sc
        .policies
        .get("web")
        .await
        .expect("web")
        .status
        .expect("status");
    assert_eq!(status.current_replicas, Some(6), "{status:?}");

    sc.neighbour_keeps_its_interval(env, 20.0, 4, &daemon.log)
        .await;
}

/// Status writes are denied by RBAC (the chart's ServiceAccount without `patch`/`update` on
/// `scalingpolicies/status`). On main the scale events were kept only in status, so a
/// `Pods: 1 per 600s` limit let one replica through at every interval; now they are kept in
/// memory as well, and the limit holds.
#[tokio::test]
async fn the_rate_limit_holds_when_status_writes_are_denied() {
    use k8s_openapi::api::rbac::v1::ClusterRole;
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    let sc = Scenario::web_and_calm(env, &client, "iso-rbac", ONE_POD_PER_600S).await;
    let ns = sc.ns.name.clone();

    // The chart's RBAC, less the status rule.
    let (kubeconfig, guard) = support::service_account_kubeconfig(env, &client, &ns).await;
    let roles: Api<ClusterRole> = Api::all(client.clone());
    let mut stripped = 0;
    for (kind, _, name) in guard.objects.clone() {
        if kind != "ClusterRole" {
            continue;
        }
        let mut role = roles.get(&name).await.expect("chart ClusterRole");
        if let Some(rules) = role.rules.as_mut() {
            let before = rules.len();
            rules.retain(|r| {
                !r.resources
                    .as_ref()
                    .is_some_and(|rs| rs.iter().any(|x| x == "scalingpolicies/status"))
            });
            stripped += before - rules.len();
        }
        roles
            .replace(&name, &PostParams::default(), &role)
            .await
            .expect("ClusterRole replaced");
    }
    assert_eq!(
        stripped, 1,
        "the chart grants scalingpolicies/status in one rule"
    );

    let daemon = start_daemon(env, &kubeconfig, &ns, "rbac");
    // The daemon runs, but cannot write any status.
    support::wait_until("a denied status write", Duration::from_secs(30), || async {
        let log = std::fs::read_to_string(&daemon.log).unwrap_or_default();
        if log.contains("writing status") && log.contains("forbidden") {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    })
    .await;
    // Demand for 10: the limit allows one replica per 600 s, so 3, and 3 it stays over many
    // intervals (on main it went 3, 4, 5, ... one per interval).
    sc.set("web", 50.0);
    sc.wait_replicas("web", 3, Duration::from_secs(30), &daemon.log)
        .await;
    sc.stays("web", 3, Duration::from_secs(8), &daemon.log)
        .await;
    assert!(
        sc.policies.get("web").await.expect("web").status.is_none(),
        "status writes are denied"
    );

    sc.neighbour_keeps_its_interval(env, 20.0, 4, &daemon.log)
        .await;
    drop(guard);
}

/// Two daemons; the leader's Lease renewals stall (held by its proxy) for far longer than the
/// lease duration, while all its other requests still go through. The follower takes the Lease
/// over after the lease duration. On main the stalled leader kept its leader flag (read once per
/// pass, and only updated when the stalled renewal returned) and went on writing next to the new
/// one; now it stops writing at its renew deadline, before the other may take over: every
/// write of the old leader comes before the first write of the new one.
#[tokio::test]
async fn two_daemons_whose_leases_overlap_never_both_write() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    let sc = Scenario::web_and_calm(env, &client, "iso-lease", CALM_BEHAVIOR).await;
    let ns = sc.ns.name.clone();

    let proxy_a = ApiProxy::start(client.clone()).await;
    let proxy_b = ApiProxy::start(client.clone()).await;
    let a = start_daemon(
        env,
        &proxy_a.kubeconfig(&format!("lease-a-{ns}")),
        &ns,
        "replica-a",
    );
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = || async {
        leases
            .get_opt("kscale-leader")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .unwrap_or_default()
    };
    support::wait_until("replica-a leads", Duration::from_secs(30), || async {
        match holder().await.as_str() {
            "replica-a" => Ok(()),
            other => Err(other.to_string()),
        }
    })
    .await;
    let b = start_daemon(
        env,
        &proxy_b.kubeconfig(&format!("lease-b-{ns}")),
        &ns,
        "replica-b",
    );
    // replica-a writes: demand moves, web follows.
    sc.set("web", 20.0);
    sc.wait_replicas("web", 4, Duration::from_secs(30), &a.log)
        .await;

    // replica-a's renewals stall from now on; its other requests still go through.
    proxy_a.stall_leases(true);
    let stalled = Instant::now();
    // Demand keeps moving, so whoever believes it leads has something to write.
    let values = [30.0, 15.0, 25.0, 10.0, 35.0, 20.0, 40.0, 15.0, 30.0, 20.0];
    for v in values {
        sc.set("web", v);
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    assert_eq!(holder().await, "replica-b", "replica-b took the Lease over");
    let writes = |proxy: &ApiProxy| -> Vec<Logged> {
        proxy
            .log()
            .into_iter()
            .filter(|l| l.is_write() && !l.is_lease() && l.status < 400)
            .collect()
    };
    let a_writes = writes(&proxy_a);
    let b_writes = writes(&proxy_b);
    let b_first = b_writes
        .first()
        .unwrap_or_else(|| panic!("replica-b never wrote; {}", support::log_tail(&b.log)))
        .at;
    let a_late: Vec<_> = a_writes
        .iter()
        .filter(|l| l.at >= b_first)
        .map(|l| {
            (
                l.method.clone(),
                l.path.clone(),
                l.at.duration_since(stalled),
            )
        })
        .collect();
    assert!(
        a_late.is_empty(),
        "replica-a wrote after replica-b's first write ({:?} after the stall): {a_late:?}; {}",
        b_first.duration_since(stalled),
        support::log_tail(&a.log)
    );
    if let Some(last) = a_writes.iter().rfind(|l| l.at >= stalled) {
        eprintln!(
            "replica-a's last write {:?} after its renewals stalled; replica-b's first {:?}",
            last.at.duration_since(stalled),
            b_first.duration_since(stalled)
        );
    }
    let a_log = std::fs::read_to_string(&a.log).unwrap_or_default();
    assert!(
        a_log.contains("stopped leading"),
        "replica-a says it stopped leading; {}",
        support::log_tail(&a.log)
    );
    // The new leader serves the healthy neighbour on time.
    sc.neighbour_keeps_its_interval(env, 20.0, 4, &b.log).await;
    proxy_a.stall_leases(false);
}

// ------------------------------------------------------------------ kind 7: one writer

/// Two Controller policies on one Deployment, the older naming `apiVersion: apps/v1`, the newer
/// naming none (which means apps/v1). On main their one-writer keys differed (the raw group,
/// "apps" and ""), so both wrote and the Deployment flapped between their counts; now the key
/// is normalized through discovery: only the older writes, the newer reports ConflictingPolicy.
#[tokio::test]
async fn one_writer_whether_or_not_the_target_names_its_api_version() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    let sc = Scenario::start(env, &client, "iso-writer").await;
    let ns = sc.ns.name.clone();
    sc.workload("web", 2, 20.0).await; // 20 / 5 = 4
    sc.set("web-more", 40.0); // 40 / 5 = 8
    sc.workload("calm", 2, 10.0).await;
    sc.policy(
        "web",
        "web",
        "{apiVersion: apps/v1, kind: Deployment, name: web}",
        CALM_BEHAVIOR,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // a later creationTimestamp
    sc.policy(
        "web-unversioned",
        "web-more",
        "{kind: Deployment, name: web}",
        CALM_BEHAVIOR,
    )
    .await;
    sc.calm_policy().await;
    sc.wait_visible(env, "web", 20.0).await;
    sc.wait_visible(env, "web-more", 40.0).await;
    sc.wait_visible(env, "calm", 10.0).await;

    let (kubeconfig, _guard) = support::service_account_kubeconfig(env, &client, &ns).await;
    let daemon = start_daemon(env, &kubeconfig, &ns, "writer");
    sc.wait_replicas("web", 4, Duration::from_secs(30), &daemon.log)
        .await;
    support::wait_until(
        "web-unversioned reports ConflictingPolicy",
        Duration::from_secs(20),
        || async {
            let s = sc
                .policies
                .get("web-unversioned")
                .await
                .map_err(|e| e.to_string())?
                .status
                .ok_or("no status")?;
            let ready = s
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .ok_or("no Ready")?;
            if ready.status == "False"
                && ready.reason == "ConflictingPolicy"
                && ready.message.contains(&format!("ScalingPolicy {ns}/web,"))
            {
                Ok(())
            } else {
                Err(format!("{ready:?}"))
            }
        },
    )
    .await;
    // One writer: web stays at the older policy's 4 (on main it flapped between 4 and 8).
    sc.stays("web", 4, Duration::from_secs(5), &daemon.log)
        .await;
    let managers: Vec<String> = sc
        .deployments
        .get("web")
        .await
        .expect("web")
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(managers.iter().any(|m| m == "kscale"), "{managers:?}");

    sc.neighbour_keeps_its_interval(env, 20.0, 4, &daemon.log)
        .await;
}

// ------------------------------------------------------------------ kind 6: forged status

/// Someone with `update` on `scalingpolicies/status` forges the history kscale reads back: a
/// scale event of `change: -2147483648` and a recommendation from the year 2100. On main the
/// rate-limit arithmetic overflowed (a panic in a debug build takes the whole daemon down, and
/// every policy with it; a release build wraps around), and a future time stayed inside every
/// window forever; now every value read back is checked and saturated: the forged event counts
/// nothing, the future time counts as now, the daemon keeps running, the `Pods: 1 per 600s`
/// limit still applies, and the status kscale writes next is sane.
#[tokio::test]
async fn a_forged_status_history_is_saturated() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    let sc = Scenario::web_and_calm(env, &client, "iso-forged", ONE_POD_PER_600S).await;
    let ns = sc.ns.name.clone();
    let (kubeconfig, _guard) = support::service_account_kubeconfig(env, &client, &ns).await;
    let mut daemon = start_daemon(env, &kubeconfig, &ns, "forged");
    support::wait_until(
        "web's first evaluation",
        Duration::from_secs(30),
        || async {
            let s = sc
                .policies
                .get("web")
                .await
                .map_err(|e| e.to_string())?
                .status;
            match s.and_then(|s| s.reason) {
                Some(r) if r.starts_with("hold 2→2") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let forged = serde_json::json!({"status": {
        "scaleUpEvents": [{"change": i32::MIN, "time": now}],
        "recommendations": [{"replicas": 1000, "time": "2100-01-01T00:00:00Z"}],
        "lastScaleTime": "2100-01-01T00:00:00Z",
    }});
    sc.policies
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&forged))
        .await
        .expect("forged status written");
    // Demand for 10; one replica per 600 s: 3, and 3 it stays.
    sc.set("web", 50.0);
    sc.wait_replicas("web", 3, Duration::from_secs(30), &daemon.log)
        .await;
    sc.stays("web", 3, Duration::from_secs(4), &daemon.log)
        .await;
    assert!(
        daemon
            .controller
            .0
            .try_wait()
            .expect("daemon status")
            .is_none(),
        "the daemon must survive a forged status; {}",
        support::log_tail(&daemon.log)
    );
    let status = sc
        .policies
        .get("web")
        .await
        .expect("web")
        .status
        .expect("status");
    let today = chrono::Utc::now() + chrono::TimeDelta::seconds(60);
    assert!(
        status
            .history
            .scale_up_events
            .iter()
            .all(|e| e.change >= 0 && e.time <= today),
        "{:?}",
        status.history
    );
    assert!(
        status
            .history
            .recommendations
            .iter()
            .all(|r| r.replicas >= 0 && r.time <= today),
        "{:?}",
        status.history
    );
    sc.neighbour_keeps_its_interval(env, 20.0, 4, &daemon.log)
        .await;
}
