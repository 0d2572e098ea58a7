//! `kscale run` end to end on the real control plane and the real Prometheus: a Deployment of
//! simulated pods scales on a Prometheus metric, up at once, down after the stabilization window,
//! holds when the metric disappears, and `kscale dry-run` reports without writing.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::events::v1::Event;
use kscale::crd::ScalingPolicy;
use kube::api::{Api, ListParams, PostParams};
use support::controller::{
    Controller, Scenario, run_controller, start_controller, wait_condition, wait_event,
};

/// The apiserver-restart test needs the apiserver to itself: the other tests of this file hold
/// this lock for reading, that one for writing.
static APISERVER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

#[tokio::test]
async fn scales_a_deployment_on_a_prometheus_metric() {
    let _shared = APISERVER.read().await;
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    let sc = Scenario::start(env, &client, "e2e", 10.0, 8).await;
    sc.wait_visible(env, 10.0).await;
    let (ns, policy, policies, deployments) = (&sc.ns, &sc.policy, &sc.policies, &sc.deployments);
    // A policy the apiserver admits but kscale cannot evaluate (its formula names an unknown
    // metric): reported in its own status and events, with no effect on the other policy.
    let mut broken = policy.clone();
    broken.metadata.name = Some("broken".into());
    broken.spec.formula = Some("max(queue, nope)".into());
    policies
        .create(&PostParams::default(), &broken)
        .await
        .expect("the apiserver admits it: CEL formulas are checked by kscale");

    let log =
        support::repo_root().join(format!("target/controller-e2e-{}.log", std::process::id()));
    let admin_port = support::free_port();
    let admin = format!("http://127.0.0.1:{admin_port}");
    let (kubeconfig, _binding) = support::service_account_kubeconfig(env, &client, &ns.name).await;
    let _controller = start_controller(env, &kubeconfig, &log, admin_port, &ns.name, "e2e");

    // 10 / 5 per replica = 2: the controller holds at 2 and reports it.
    support::wait_until("the first status", Duration::from_secs(30), || async {
        let p = policies.get("web").await.map_err(|e| e.to_string())?;
        let s = p.status.ok_or("no status yet")?;
        match (s.desired_replicas, s.reason.clone()) {
            (Some(2), Some(r)) if r.starts_with("hold 2→2") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    wait_condition(
        policies,
        "broken",
        "Ready",
        "the broken policy's status",
        Duration::from_secs(20),
        |c, _| {
            c.status == "False"
                && c.reason == "InvalidPolicy"
                && c.message.contains("spec.formula")
                && c.message.contains("\"nope\"")
        },
    )
    .await;

    // Ready after the first sync and evaluation; healthy all along.
    support::wait_until("/readyz", Duration::from_secs(20), || async {
        match support::http_get(&admin, "/readyz") {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(support::http_get(&admin, "/healthz").map(|r| r.0), Ok(200));

    // Rises to 30: 6 replicas, within a few intervals of the sample being visible.
    sc.set(30.0);
    let took = support::wait_replicas(deployments, 6, Duration::from_secs(20), &log).await;
    eprintln!("scale-up written {took:?} after the metric changed");
    // The status follows the scale write in the same evaluation.
    let status = support::wait_until("status desired 6", Duration::from_secs(10), || async {
        let p = policies.get("web").await.map_err(|e| e.to_string())?;
        let s = p.status.ok_or("no status")?;
        if s.desired_replicas == Some(6) {
            Ok(s)
        } else {
            Err(format!("desired {:?}", s.desired_replicas))
        }
    })
    .await;
    assert!(
        status.reason.as_deref().unwrap_or("").contains("queue=30"),
        "{:?}",
        status.reason
    );
    assert!(
        !status.history.scale_up_events.is_empty(),
        "scale events are kept in status"
    );
    wait_event(
        &client,
        &ns.name,
        "a SuccessfulRescale event",
        Duration::from_secs(10),
        |e| {
            e.reason.as_deref() == Some("SuccessfulRescale")
                && e.note.as_deref().unwrap_or("").contains("New size: 6")
        },
    )
    .await;

    // Every decision is in /metrics too.
    let (code, text) = support::http_get(&admin, "/metrics").expect("/metrics answers");
    assert_eq!(code, 200);
    let labels = format!("namespace=\"{}\",policy=\"web\"", ns.name);
    assert!(
        text.contains(&format!("kscale_desired_replicas{{{labels}}} 6")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "kscale_metric_value{{{labels},metric=\"queue\"}} 30"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("kscale_scale_writes_total{{{labels}}} 1")),
        "{text}"
    );
    assert!(
        text.contains("kscale_evaluation_duration_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("kscale_leader 1"), "{text}");

    // Falls to 5: 1 replica, but only after the 8 s stabilization window.
    let fell = Instant::now();
    sc.set(5.0);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        support::replicas(deployments).await,
        6,
        "scale-down must wait out the stabilization window"
    );
    support::wait_replicas(deployments, 1, Duration::from_secs(30), &log).await;
    // The window runs 8 s from the last recommendation of 6, which the controller (1 s
    // interval) can have made up to one interval before the metric fell.
    assert!(
        fell.elapsed() >= Duration::from_secs(7),
        "scaled down after {:?}, inside the 8 s window",
        fell.elapsed()
    );

    // The metric disappears: Missing, never 0; the count holds and the status says why.
    sc.set(40.0);
    support::wait_replicas(deployments, 8, Duration::from_secs(20), &log).await;
    sc.exporter.remove(&sc.metric);
    wait_condition(
        policies,
        "web",
        "MetricsAvailable",
        "MetricsAvailable=False",
        Duration::from_secs(60),
        |c, _| c.status == "False",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        support::replicas(deployments).await,
        8,
        "a missing metric must not scale down"
    );
    let p = policies.get("web").await.expect("policy");
    let reason = p.status.and_then(|s| s.reason).unwrap_or_default();
    assert!(
        reason.contains("queue missing") || reason.contains("queue stale"),
        "{reason}"
    );

    // dry-run: one live evaluation, printed, nothing written.
    let mut dry = policy.clone();
    dry.metadata.name = Some("web-dry".into());
    sc.set(100.0);
    sc.wait_visible(env, 100.0).await;
    drop(_controller);
    let before = support::replicas(deployments).await;
    let (ok, text) = support::controller::dry_run(env, &dry, "controller-e2e-policy");
    assert!(ok, "{text}");
    assert!(
        text.contains("decision  10 replicas (dry run: nothing written)"),
        "{text}"
    );
    assert!(text.contains("queue=100"), "{text}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        support::replicas(deployments).await,
        before,
        "dry-run must not write"
    );
}

/// Two replicas of the daemon: only the Lease holder acts; when it is killed, the other takes
/// over within 15 s and continues the stabilization window from status instead of flapping.
#[tokio::test]
async fn failover_continues_the_stabilization_window() {
    let _shared = APISERVER.read().await;
    use k8s_openapi::api::coordination::v1::Lease;
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    let sc = Scenario::start(env, &client, "ha", 30.0, 20).await;
    let (ns, deployments) = (&sc.ns, &sc.deployments);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);

    let logs = [
        support::repo_root().join(format!("target/ha-a-{}.log", std::process::id())),
        support::repo_root().join(format!("target/ha-b-{}.log", std::process::id())),
    ];
    let (kubeconfig, _binding) = support::service_account_kubeconfig(env, &client, &ns.name).await;
    let mut a = Some(start_controller(
        env,
        &kubeconfig,
        &logs[0],
        support::free_port(),
        &ns.name,
        "replica-a",
    ));
    let mut b = Some(start_controller(
        env,
        &kubeconfig,
        &logs[1],
        support::free_port(),
        &ns.name,
        "replica-b",
    ));
    support::wait_replicas(deployments, 6, Duration::from_secs(30), &logs[0]).await;
    let holder = |l: Lease| l.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    let leader = holder(leases.get("kscale-leader").await.expect("the lease exists"));
    assert!(
        leader == "replica-a" || leader == "replica-b",
        "holder {leader:?}"
    );

    // Demand falls: the leader records recommendations of 1 but holds 6 for the 20 s window.
    sc.set(5.0);
    let fell = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Kill the leader without letting it release the Lease.
    if leader == "replica-a" {
        a.take()
    } else {
        b.take()
    };
    let killed = Instant::now();
    let follower = if leader == "replica-a" {
        "replica-b"
    } else {
        "replica-a"
    };
    support::wait_until(
        "the follower to take the lease",
        Duration::from_secs(15),
        || async {
            let h = holder(
                leases
                    .get("kscale-leader")
                    .await
                    .map_err(|e| e.to_string())?,
            );
            if h == follower {
                Ok(())
            } else {
                Err(format!("holder {h:?}"))
            }
        },
    )
    .await;
    let takeover = killed.elapsed();
    eprintln!("failover took {takeover:?}");
    assert!(
        takeover <= Duration::from_secs(15),
        "failover took {takeover:?}"
    );

    // No flap: the new leader continues the window from status; 6 until 20 s after the fall.
    while fell.elapsed() < Duration::from_secs(18) {
        assert_eq!(
            support::replicas(deployments).await,
            6,
            "scaled down {:?} after the fall, inside the 20 s window",
            fell.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let log = if follower == "replica-a" {
        &logs[0]
    } else {
        &logs[1]
    };
    support::wait_replicas(deployments, 1, Duration::from_secs(20), log).await;
    drop((a, b));
}

/// A TCP relay to Prometheus on a fixed loopback port that can be stopped and started again:
/// "Prometheus went away" for one controller without disturbing other tests.
struct Relay {
    port: u16,
    upstream: std::net::SocketAddr,
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Open client connections, cut when the relay stops (clients keep connections alive).
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Relay {
    fn new(prometheus_url: &str) -> Relay {
        let upstream = support::socket_addr_of(prometheus_url);
        let mut r = Relay {
            port: support::free_port(),
            upstream,
            stop: None,
            conns: Default::default(),
        };
        r.start();
        r
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn start(&mut self) {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind(("127.0.0.1", self.port)).expect("relay port");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let upstream = self.upstream;
        let flag = stop.clone();
        let conns = self.conns.clone();
        std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        if let (Ok(c), Ok(mut list)) = (client.try_clone(), conns.lock()) {
                            list.push(c);
                        }
                        let Ok(server) = std::net::TcpStream::connect(upstream) else {
                            continue;
                        };
                        let (mut cr, mut sw) = (
                            client.try_clone().expect("clone"),
                            server.try_clone().expect("clone"),
                        );
                        let (mut sr, mut cw) = (server, client);
                        let f1 = flag.clone();
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut cr, &mut sw);
                            let _ = sw.shutdown(std::net::Shutdown::Write);
                            drop(f1);
                        });
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut sr, &mut cw);
                            let _ = cw.shutdown(std::net::Shutdown::Both);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            // Dropping the listener closes the port: new connections are refused.
        });
        self.stop = Some(stop);
    }

    fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            s.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Ok(mut list) = self.conns.lock() {
                for c in list.drain(..) {
                    let _ = c.shutdown(std::net::Shutdown::Both);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Prometheus goes away mid-run: no scale-down, `MetricsAvailable=False` with the error text,
/// and the controller recovers by itself when Prometheus returns.
#[tokio::test]
async fn prometheus_outage_holds_and_recovers() {
    let _shared = APISERVER.read().await;
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    let sc = Scenario::start(env, &client, "outage", 30.0, 0).await;
    let (ns, policies, deployments) = (&sc.ns, &sc.policies, &sc.deployments);

    let mut relay = Relay::new(&env.prometheus_url);
    let (kubeconfig, _binding) = support::service_account_kubeconfig(env, &client, &ns.name).await;
    let log = support::repo_root().join(format!("target/outage-{}.log", std::process::id()));
    let log_file = std::fs::File::create(&log).expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_kscale"))
        .args([
            "run",
            "--metrics-addr",
            &format!("127.0.0.1:{}", support::free_port()),
        ])
        .args([
            "--watch-namespace",
            &ns.name,
            "--leader-elect",
            "false",
            "--prometheus-timeout",
            "2s",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("KSCALE_PROMETHEUS_URL", relay.url())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("kscale run starts");
    let _controller = Controller(child);
    support::wait_replicas(deployments, 6, Duration::from_secs(30), &log).await;

    // Prometheus goes away while demand (unseen) falls: never a scale-down on no data.
    relay.stop();
    sc.set(5.0);
    wait_condition(
        policies,
        "web",
        "MetricsAvailable",
        "MetricsAvailable=False naming the error",
        Duration::from_secs(30),
        |c, s| {
            s.metrics.first().is_some_and(|m| {
                c.status == "False"
                    && m.state == "Error"
                    && m.message.as_deref().unwrap_or("").contains("127.0.0.1")
            })
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        support::replicas(deployments).await,
        6,
        "an unreachable Prometheus must not scale down"
    );

    // It returns: the controller recovers on its own and acts on the real value (5 → 1).
    relay.start();
    support::wait_replicas(deployments, 1, Duration::from_secs(30), &log).await;
    // The status is written right after the scale (same evaluation).
    wait_condition(
        policies,
        "web",
        "MetricsAvailable",
        "MetricsAvailable=True after recovery",
        Duration::from_secs(10),
        |c, _| c.status == "True",
    )
    .await;
}

/// Restarts the environment's kube-apiserver with the same command line (etcd keeps the data).
async fn restart_apiserver(env: &support::TestEnv, client: &kube::Client) {
    let pid_file = env.dir.join("pids/kube-apiserver.pid");
    let pid = std::fs::read_to_string(&pid_file).expect("apiserver pid file");
    let pid = pid.trim().to_string();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("apiserver command line");
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let status = Command::new("kill").arg(&pid).status().expect("kill runs");
    assert!(status.success(), "kill {pid}");
    let gone = Instant::now();
    // Gone, or a zombie nobody has reaped yet (its parent was the set-up script).
    let alive = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit(')')
                    .next()
                    .map(|rest| !rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(false)
    };
    // It may hang in graceful shutdown while watches are open (as `scripts/testenv down` knows):
    // after 5 s it is killed.
    while alive(&pid) {
        if gone.elapsed() > Duration::from_secs(5) {
            let _ = Command::new("kill").args(["-9", &pid]).status();
        }
        assert!(
            gone.elapsed() < Duration::from_secs(30),
            "the apiserver did not stop"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(env.dir.join("logs/kube-apiserver.log"))
        .expect("apiserver log");
    // The apiserver outlives this test (as the set-up script's processes do); it is not waited
    // for here, and `scripts/testenv down` stops it by its pid file.
    #[allow(clippy::zombie_processes)]
    let child = Command::new("setsid")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("apiserver restarts");
    // setsid execs the apiserver in the same process.
    std::fs::write(&pid_file, child.id().to_string()).expect("pid file");
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    support::wait_until(
        "the restarted apiserver",
        Duration::from_secs(90),
        || async {
            api.list(&ListParams::default().limit(1))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    )
    .await;
}

/// The apiserver restarts under a running controller: it recovers by itself (the watch and
/// the client reconnect) and goes on scaling.
#[tokio::test]
async fn controller_survives_an_apiserver_restart() {
    let _exclusive = APISERVER.write().await;
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    let sc = Scenario::start(env, &client, "restart", 10.0, 0).await;
    let running = run_controller(env, &client, &sc.ns.name, "restart", "restart").await;
    let log = running.log.clone();
    sc.set(30.0);
    support::wait_replicas(&sc.deployments, 6, Duration::from_secs(30), &log).await;

    restart_apiserver(env, &client).await;
    let client = env.client().await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &sc.ns.name);
    sc.set(45.0);
    support::wait_replicas(&deployments, 9, Duration::from_secs(60), &log).await;
}

/// Someone scales the target by hand: the controller sees the new count on its next
/// evaluation and brings the target back to what the metric asks for, both ways, saying why.
#[tokio::test]
async fn manual_scale_is_corrected_on_the_next_evaluation() {
    let _shared = APISERVER.read().await;
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    let sc = Scenario::start(env, &client, "manual", 30.0, 0).await;
    let running = run_controller(env, &client, &sc.ns.name, "manual", "manual").await;
    let log = running.log.clone();
    support::wait_replicas(&sc.deployments, 6, Duration::from_secs(30), &log).await;

    let by_hand = |n: i32| {
        let api = sc.deployments.clone();
        async move {
            let pp = kube::api::PatchParams {
                field_manager: Some("kubectl-scale".into()),
                ..Default::default()
            };
            api.patch_scale(
                "web",
                &pp,
                &kube::api::Patch::Merge(serde_json::json!({"spec": {"replicas": n}})),
            )
            .await
            .expect("manual scale");
        }
    };
    for (manual, verb) in [(9, "scale down 9→6"), (2, "scale up 2→6")] {
        by_hand(manual).await;
        support::wait_replicas(&sc.deployments, 6, Duration::from_secs(20), &log).await;
        support::wait_until(
            "the reason of the correction",
            Duration::from_secs(10),
            || async {
                let p = sc.policies.get("web").await.map_err(|e| e.to_string())?;
                let history = p
                    .status
                    .as_ref()
                    .map(|s| (s.reason.clone(), s.current_replicas));
                // The status after the correction reports the corrected count, and the correcting
                // decision was recorded as an event with its reason.
                let events: Api<Event> = Api::namespaced(client.clone(), &sc.ns.name);
                let list = events
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| e.to_string())?;
                if list
                    .items
                    .iter()
                    .any(|e| e.note.as_deref().unwrap_or("").contains(verb))
                {
                    Ok(())
                } else {
                    Err(format!("no event saying {verb:?}; status {history:?}"))
                }
            },
        )
        .await;
    }
}

/// A CPU-utilization policy scales on what the real metrics pipeline serves: kwok's simulated
/// usage, scraped by metrics-server, read through `metrics.k8s.io` with the pods from the
/// controller's pod watch. Up when usage is high (clipped at maxReplicas), down when it falls.
#[tokio::test]
async fn scales_on_cpu_utilization_from_metrics_server() {
    let _shared = APISERVER.read().await;
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    support::install_crd(&client).await;
    let ns = support::create_namespace(env, &client, "cpu").await;
    // 2 pods requesting 200m and using 180m each: 90 % against a 50 % target.
    support::create_kwok_deployment(&client, &ns.name, "web", 2, "200m", "180m").await;
    support::wait_for_ready_pods(&client, &ns.name, "app=web", 2, Duration::from_secs(60)).await;
    let policy = support::scaling_policy(
        &ns.name,
        "web",
        support::WEB_DEPLOYMENT,
        r#"  minReplicas: 1
  maxReplicas: 4
  interval: 2s
  metrics:
  - name: cpu
    resource: {name: cpu}
    target: {type: Utilization, averageUtilization: 50}
  behavior:
    scaleDown: {stabilizationWindowSeconds: 0}
"#,
    );
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
    policies
        .create(&PostParams::default(), &policy)
        .await
        .expect("policy created");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);

    let running = run_controller(env, &client, &ns.name, "cpu-e2e", "cpu").await;
    let log = running.log.clone();

    // ceil(2 × 90/50) = 4 once metrics-server has the usage; maxReplicas is 4 anyway.
    support::wait_replicas(&deployments, 4, Duration::from_secs(120), &log).await;
    // The rescale's reason names the cpu value it acted on (later evaluations may briefly see
    // the new pods without metrics; the event records the decision that scaled).
    wait_event(
        &client,
        &ns.name,
        "a SuccessfulRescale to 4 on cpu",
        Duration::from_secs(20),
        |e| {
            e.reason.as_deref() == Some("SuccessfulRescale")
                && e.note
                    .as_deref()
                    .is_some_and(|n| n.contains("New size: 4") && n.contains("cpu="))
        },
    )
    .await;
    wait_condition(
        &policies,
        "web",
        "MetricsAvailable",
        "the cpu metric valid in status",
        Duration::from_secs(60),
        |c, s| {
            c.status == "True"
                && s.metrics
                    .iter()
                    .any(|m| m.name == "cpu" && m.state == "Valid" && m.value.is_some())
        },
    )
    .await;

    // Usage falls to 20m on every pod: 10 % → ceil(4 × 10/50) = 1 (no stabilization window).
    let pods =
        support::wait_for_ready_pods(&client, &ns.name, "app=web", 4, Duration::from_secs(60))
            .await;
    for p in &pods {
        let name = p.metadata.name.clone().expect("pod name");
        support::set_pod_cpu_usage(&client, &ns.name, &name, "20m").await;
    }
    support::wait_replicas(&deployments, 1, Duration::from_secs(120), &log).await;
}

/// A policy names its own Prometheus (`spec.prometheus`) behind an authenticating gateway, with
/// the token in a Secret of its namespace: a wrong token holds the count with the 401 in
/// status; the rotated Secret is picked up without a restart and the policy scales.
#[tokio::test]
async fn policy_prometheus_with_credentials_from_a_secret() {
    let _shared = APISERVER.read().await;
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    let sc = Scenario::start(env, &client, "ownprom", 30.0, 0).await;
    sc.wait_visible(env, 30.0).await;
    let proxy = support::AuthProxy::start(&env.prometheus_url, "s3cret-token");
    support::apply_yaml(
        &client,
        &sc.ns.name,
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: prom-auth, namespace: {}, labels: {{kscale.dev/prometheus-credentials: \"true\"}}}}\nstringData: {{token: wrong-token}}\n",
            sc.ns.name
        ),
    )
    .await;
    let patch = serde_json::json!({"spec": {"prometheus": {
        "url": proxy.url,
        "secretRef": {"name": "prom-auth"},
        "headers": [{"name": "X-Scope-OrgID", "value": "team-a"}],
        "timeout": "5s",
    }}});
    sc.policies
        .patch(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .expect("spec.prometheus admitted");

    let running = run_controller(env, &client, &sc.ns.name, "ownprom", "own").await;
    let log = running.log.clone();

    // The wrong token: the gateway's 401 in status, and no scaling on it.
    wait_condition(
        &sc.policies,
        "web",
        "MetricsAvailable",
        "MetricsAvailable=False with the 401",
        Duration::from_secs(30),
        |c, s| c.status == "False" && s.reason.as_deref().unwrap_or("").contains("401"),
    )
    .await;
    assert_eq!(support::replicas(&sc.deployments).await, 2);
    assert!(proxy.refused.load(std::sync::atomic::Ordering::SeqCst) > 0);
    assert_eq!(proxy.forwarded.load(std::sync::atomic::Ordering::SeqCst), 0);

    // Rotate the Secret: picked up at the next evaluation, 30 / 5 = 6 replicas.
    support::apply_yaml(
        &client,
        &sc.ns.name,
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: prom-auth, namespace: {}, labels: {{kscale.dev/prometheus-credentials: \"true\"}}}}\nstringData: {{token: s3cret-token}}\n",
            sc.ns.name
        ),
    )
    .await;
    support::wait_replicas(&sc.deployments, 6, Duration::from_secs(30), &log).await;
    assert!(proxy.forwarded.load(std::sync::atomic::Ordering::SeqCst) > 0);
}

/// One writer per target, and one bad object harms nothing: a second, newer Controller policy
/// on the same Deployment reports `ConflictingPolicy` and never writes; a ScalingPolicy stored
/// under a looser schema (as after a CRD upgrade) that kscale cannot read gets a
/// `MalformedPolicy` Warning event, and the watch and the other policies go on.
#[tokio::test]
async fn conflicting_and_malformed_policies_do_not_disturb_the_writer() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    // The CRD is loosened for a moment: no other test may create policies meanwhile.
    let _exclusive = APISERVER.write().await;
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    let sc = Scenario::start(env, &client, "conflict", 30.0, 0).await;
    let ns = sc.ns.name.clone();

    // A looser CRD admits an object kscale's types cannot read; then the real CRD is back.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut loose = kscale::crd::crd();
    for v in &mut loose.spec.versions {
        let schema = v
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            .expect("schema");
        let spec = schema
            .properties
            .as_mut()
            .and_then(|p| p.get_mut("spec"))
            .expect("spec schema");
        *spec = serde_json::from_value(
            serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
        )
        .expect("loose schema");
    }
    crds.patch(
        "scalingpolicies.kscale.dev",
        &kube::api::PatchParams::apply("kscale-tests").force(),
        &kube::api::Patch::Apply(&loose),
    )
    .await
    .expect("loose CRD applied");
    let gvk = kube::core::GroupVersionKind::gvk("kscale.dev", "v1alpha1", "ScalingPolicy");
    let resource = kube::core::ApiResource::from_gvk_with_plural(&gvk, "scalingpolicies");
    let dynamic: Api<kube::core::DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &resource);
    let malformed: kube::core::DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "kscale.dev/v1alpha1", "kind": "ScalingPolicy",
        "metadata": {"name": "malformed", "namespace": ns},
        "spec": {"targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                 "maxReplicas": "ten", "metrics": "none"}
    }))
    .expect("object");
    support::wait_until(
        "the loose schema to admit the object",
        Duration::from_secs(30),
        || async {
            dynamic
                .create(&PostParams::default(), &malformed)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    )
    .await;
    support::install_crd(&client).await;

    // A newer Controller policy on the same target that would want 10 replicas.
    let mut late = sc.policy.clone();
    late.metadata.name = Some("web-late".into());
    late.spec.metrics[0].target.average_value = Some(
        k8s_openapi::apimachinery::pkg::api::resource::Quantity("1".into()),
    );
    tokio::time::sleep(Duration::from_millis(1100)).await; // a later creationTimestamp
    sc.policies
        .create(&PostParams::default(), &late)
        .await
        .expect("late policy created");

    let running = run_controller(env, &client, &ns, "conflict", "conflict").await;
    let log = running.log.clone();

    // The older policy writes: 30 / 5 = 6.
    support::wait_replicas(&sc.deployments, 6, Duration::from_secs(30), &log).await;
    wait_condition(
        &sc.policies,
        "web-late",
        "Ready",
        "web-late reports ConflictingPolicy",
        Duration::from_secs(20),
        |c, _| {
            c.status == "False"
                && c.reason == "ConflictingPolicy"
                && c.message.contains(&format!("ScalingPolicy {ns}/web,"))
        },
    )
    .await;
    wait_event(
        &client,
        &ns,
        "a MalformedPolicy event",
        Duration::from_secs(20),
        |e| {
            e.reason.as_deref() == Some("MalformedPolicy")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("malformed")
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        support::replicas(&sc.deployments).await,
        6,
        "only the older policy writes"
    );
    // The writer still evaluates: the metric rises, it scales.
    sc.set(40.0);
    support::wait_replicas(&sc.deployments, 8, Duration::from_secs(30), &log).await;
}

/// Moves the scenario's metric along a line from a thread of its own, in whole units (so the
/// replicas a value needs are exact), clamped to `[floor, ceiling]`; stops when dropped.
struct Ramp {
    /// (when, value then, slope per second): the line the metric follows.
    line: std::sync::Arc<std::sync::Mutex<(Instant, f64, f64)>>,
    bounds: (f64, f64),
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ramp {
    fn start(sc: &Scenario, from: f64, per_second: f64, bounds: (f64, f64)) -> Ramp {
        let line = std::sync::Arc::new(std::sync::Mutex::new((Instant::now(), from, per_second)));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (line, stop) = (line.clone(), stop.clone());
            let (exporter, metric) = (sc.exporter.clone(), sc.metric.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let now = *line.lock().expect("ramp line");
                    exporter.set(&metric, &[], Ramp::value_on(now, bounds));
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Ramp {
            line,
            bounds,
            stop,
            thread: Some(thread),
        }
    }

    fn value_on((at, value, slope): (Instant, f64, f64), (floor, ceiling): (f64, f64)) -> f64 {
        (value + slope * at.elapsed().as_secs_f64())
            .round()
            .clamp(floor, ceiling)
    }

    /// Goes on from the current value at `per_second`.
    fn turn(&self, per_second: f64) {
        let mut line = self.line.lock().expect("ramp line");
        *line = (
            Instant::now(),
            Ramp::value_on(*line, self.bounds),
            per_second,
        );
    }
}

impl Drop for Ramp {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a decision's reason says about the `queue` metric of a 5-per-replica policy:
/// `scale up 6→9: queue=27 (target 5/replica) → 9 (upper bound 44.1 of the Trend forecast 40 in 60s → 9)`.
#[derive(Debug)]
struct QueueReason {
    current: i32,
    desired: i32,
    value: f64,
    /// The Trend forecast's upper bound, when there was one.
    forecast: Option<f64>,
}

impl QueueReason {
    fn parse(reason: &str) -> Option<QueueReason> {
        let (head, rest) = reason.split_once(": ")?;
        let (current, desired) = head.rsplit(' ').next()?.split_once('→')?;
        let number = |after: &str| -> Option<f64> {
            let (_, tail) = rest.split_once(after)?;
            tail.split([' ', ',', ';', ')']).next()?.parse().ok()
        };
        Some(QueueReason {
            current: current.parse().ok()?,
            desired: desired.parse().ok()?,
            value: number("queue=")?,
            forecast: number("upper bound "),
        })
    }

    /// What the current value alone needs at 5 per replica (the policy's tolerance is 0).
    fn needed_now(&self) -> i32 {
        (self.value / 5.0).ceil() as i32
    }
}

/// The daemon's log without the terminal colour codes.
fn plain_log(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, up to a final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `spec.forecast` end to end: on a rising metric the Trend forecast scales the Deployment
/// above what the current value needs, saying so; a restarted daemon re-reads the history from
/// Prometheus (`query_range`) and forecasts from its very first evaluation; when demand turns
/// down the count follows it, never below what the current value needs.
#[tokio::test]
async fn forecast_scales_ahead_of_a_ramp_and_survives_a_restart() {
    let _shared = APISERVER.read().await;
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    let sc = Scenario::start(env, &client, "forecast", 10.0, 0).await;
    let ns = sc.ns.name.clone();
    // Predict 60 s ahead from 2 s buckets of the last 2 minutes, refitted every 10 s; the
    // median error as headroom. Tolerance 0 and free scale-up: the count is exactly what the
    // decision asks for, so what the current value needs is ceil(value / 5).
    let patch = serde_json::json!({"spec": {
        "maxReplicas": 20,
        "forecast": {"model": "Trend", "history": "2m", "step": "2s", "horizon": "60s",
                     "refitEvery": "10s", "confidence": 50},
        "behavior": {
            "scaleUp": {"stabilizationWindowSeconds": 0, "tolerance": "0",
                        "policies": [{"type": "Pods", "value": 20, "periodSeconds": 1}]},
            "scaleDown": {"stabilizationWindowSeconds": 0, "tolerance": "0"},
        },
    }});
    sc.policies
        .patch(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .expect("spec.forecast admitted");
    // Demand rises by one every two seconds from 10.
    let ramp = Ramp::start(&sc, 10.0, 0.5, (5.0, 80.0));
    let running = run_controller(env, &client, &ns, "forecast", "forecast").await;

    // 1. The forecast, not the current value, scales up: a rescale to more than the value at
    // that evaluation needs (with tolerance 0 the current value alone asks for exactly that).
    wait_event(
        &client,
        &ns,
        "a rescale above current demand by the Trend forecast",
        Duration::from_secs(90),
        |e| {
            let note = e.note.as_deref().unwrap_or("");
            let Some((_, reason)) = note.split_once("; reason: ") else {
                return false;
            };
            e.reason.as_deref() == Some("SuccessfulRescale")
                && QueueReason::parse(reason).is_some_and(|r| {
                    r.desired > r.current
                        && r.desired > r.needed_now()
                        && r.forecast.is_some_and(|f| f > r.value)
                })
        },
    )
    .await;
    let p = sc.policies.get("web").await.expect("policy");
    let status = p.status.expect("status");
    assert!(
        status.metrics.first().is_some_and(|m| m.forecast.is_some()),
        "the forecast is in status: {:?}",
        status.metrics
    );

    // 2. Restart: the new process reads the history back from Prometheus and forecasts from its
    // first evaluation. Learning from its own samples alone, it could not: the first sample
    // opens a bucket, and a forecast needs a completed one. First, 25 s of ramp in Prometheus.
    let scraped = format!(
        "count_over_time({}{{exporter=\"{}\"}}[2m])",
        sc.metric, sc.exporter.id
    );
    support::wait_until(
        "25 samples of the ramp in Prometheus",
        Duration::from_secs(60),
        || async {
            match support::prometheus_scalar(env, &scraped) {
                Ok(Some(n)) if n >= 25.0 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    drop(running);
    let running = run_controller(env, &client, &ns, "forecast-restarted", "forecast").await;
    let first = support::wait_until(
        "the restarted daemon's first evaluation",
        Duration::from_secs(45),
        || async {
            let log = plain_log(&running.log);
            log.lines()
                .find(|l| l.contains(" evaluated ") && l.contains(&format!("{ns}/web")))
                .map(|l| (log.clone(), l.to_string()))
                .ok_or_else(|| support::log_tail(&running.log))
        },
    )
    .await;
    let (log, line) = first;
    let read = log
        .lines()
        .take_while(|l| *l != line)
        .find(|l| l.contains("forecast history read"))
        .unwrap_or_else(|| panic!("no history read before the first evaluation:\n{log}"));
    let points: usize = read
        .split("points=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no point count in {read:?}"));
    assert!(points >= 15, "{points} points of history: {read}");
    let reason = line
        .split_once("reason=")
        .map(|(_, r)| r.trim())
        .unwrap_or_else(|| panic!("no reason in {line:?}"));
    let first = QueueReason::parse(reason).unwrap_or_else(|| panic!("reason {reason:?}"));
    assert!(
        first.forecast.is_some_and(|f| f > first.value),
        "the first evaluation after the restart forecasts the ramp: {reason}"
    );

    // dry-run goes through the same path: it reads the history and shows the forecast.
    let mut dry = sc.policies.get("web").await.expect("policy");
    dry.metadata = kube::api::ObjectMeta {
        name: Some("web-dry".into()),
        namespace: Some(ns.clone()),
        ..Default::default()
    };
    dry.status = None;
    let (ok, text) = support::controller::dry_run(env, &dry, "controller-e2e-forecast");
    assert!(ok, "{text}");
    let metric_line = text
        .lines()
        .find(|l| l.starts_with("metric "))
        .unwrap_or_else(|| panic!("no metric line: {text}"));
    assert!(metric_line.contains("Trend forecast"), "{text}");

    // 3. Demand turns down: the forecast falls below the current value, and the count follows
    // the current value, never below what it needs.
    ramp.turn(-1.5);
    let mut seen = std::collections::BTreeSet::new();
    let mut forecast_below = 0;
    let (mut highest, mut lowest) = (0, i32::MAX);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = sc.policies.get("web").await.expect("policy");
        let s = p.status.unwrap_or_default();
        if let (Some(at), Some(reason)) = (s.last_evaluation_time, s.reason.clone())
            && seen.insert(format!("{at:?}"))
        {
            let r = QueueReason::parse(&reason).unwrap_or_else(|| panic!("reason {reason:?}"));
            assert!(
                r.desired >= r.needed_now().min(20),
                "below current demand: {reason}"
            );
            forecast_below += usize::from(r.forecast.is_some_and(|f| f < r.value));
            highest = highest.max(r.desired);
            lowest = lowest.min(r.desired);
        }
        let value = support::prometheus_scalar(env, &sc.query).ok().flatten();
        if forecast_below >= 3 && value == Some(5.0) && lowest < highest {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{forecast_below} evaluations with the forecast below demand, replicas {lowest}..{highest}, value {value:?}; {}",
            support::log_tail(&running.log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "{} evaluations while demand fell, {forecast_below} with the forecast below it; replicas {highest} → {lowest}",
        seen.len()
    );
    drop(ramp);
}
