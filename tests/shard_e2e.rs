//! `kscale run --shards 6` end to end on the real control plane (issue 17, item 2): three
//! daemons share six shard Leases, 60 policies on 60 Deployments are each evaluated and written
//! by the holder of their shard alone, a killed daemon's shards are taken over while the metric
//! moves (every target reaches its new count, once, without going back), and the daemon started
//! again takes its share back.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use kscale::controller::shards::{GROUP_LABEL, ROLE_LABEL, shard_lease_name, shard_of};
use kscale::crd::ScalingPolicy;
use kube::api::{Api, ListParams, PostParams};
use support::controller::{Controller, Lease as LeaseFlag, start_controller_args};

const SHARDS: u32 = 6;
const POLICIES: usize = 60;
const LEASE: &str = "kscale-leader";
const DAEMONS: [&str; 3] = ["shard-a", "shard-b", "shard-c"];

/// The daemons under test, each with its log and admin port.
struct Daemons {
    kubeconfig: PathBuf,
    namespace: String,
    prometheus_url: String,
    logs: Vec<PathBuf>,
    ports: Vec<u16>,
    running: Vec<Option<Controller>>,
}

impl Daemons {
    /// The daemon `i`, started (again: a fresh log of its own).
    fn start(&mut self, i: usize, life: u32) {
        let log = support::repo_root().join(format!(
            "target/shard-{}-{life}-{}.log",
            DAEMONS[i],
            std::process::id()
        ));
        self.logs.push(log.clone());
        self.running[i] = Some(start_controller_args(
            &self.kubeconfig,
            &log,
            self.ports[i],
            &self.namespace,
            DAEMONS[i],
            Some(&self.prometheus_url),
            LeaseFlag::Flag(&self.namespace),
            &["--shards", &SHARDS.to_string()],
        ));
    }
}

/// Each shard's holder, as the Leases say.
async fn holders(leases: &Api<Lease>) -> Result<BTreeMap<u32, String>, String> {
    let list = leases
        .list(&ListParams::default().labels(&format!("{GROUP_LABEL}={LEASE},{ROLE_LABEL}=shard")))
        .await
        .map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for i in 0..SHARDS {
        let name = shard_lease_name(LEASE, i);
        let holder = list
            .items
            .iter()
            .find(|l| l.metadata.name.as_deref() == Some(name.as_str()))
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default();
        out.insert(i, holder);
    }
    Ok(out)
}

/// Waits until the live daemons `live` hold SHARDS / live.len() shards each; the holders.
async fn wait_balanced(leases: &Api<Lease>, live: &[&str], what: &str) -> BTreeMap<u32, String> {
    support::wait_until(what, Duration::from_secs(60), || async {
        let h = holders(leases).await?;
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for holder in h.values() {
            *counts.entry(holder.as_str()).or_default() += 1;
        }
        let share = SHARDS as usize / live.len();
        if live.iter().all(|d| counts.get(d) == Some(&share)) {
            Ok(h)
        } else {
            Err(format!("holders {h:?}"))
        }
    })
    .await
}

/// How long until every shard of `shards` has a holder other than `dead` (polled every 50 ms;
/// at most a minute, after which the caller's own wait reports what is behind).
async fn taken_over(leases: &Api<Lease>, shards: &[u32], dead: &str) -> Duration {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if let Ok(h) = holders(leases).await
            && shards
                .iter()
                .all(|i| h.get(i).is_some_and(|by| !by.is_empty() && by != dead))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

/// How long until every target of `names` has `want` replicas (polled every 50 ms; at most a
/// minute, after which the caller's own wait reports what is behind).
async fn reached(deployments: &Api<Deployment>, names: &[String], want: i32) -> Duration {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if let Ok(list) = deployments.list(&ListParams::default()).await
            && names.iter().all(|n| {
                list.items.iter().any(|d| {
                    d.metadata.name.as_ref() == Some(n)
                        && d.spec.as_ref().and_then(|s| s.replicas) == Some(want)
                })
            })
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

/// One `evaluated` line of a daemon's log.
#[derive(Debug, Clone)]
struct Evaluated {
    daemon: &'static str,
    policy: String,
    current: i32,
    desired: i32,
    wrote: bool,
}

/// The value of field `key` in a log line (`key=value`, up to the next space).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..].split(' ').next()
}

/// Every evaluation the daemon `daemon` logged to `log` (one line per evaluation it reported).
fn evaluations(daemon: &'static str, log: &Path) -> Vec<Evaluated> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let rest = &line[line.find(": evaluated ")? + 11..];
            let rest = format!(" {rest}");
            Some(Evaluated {
                daemon,
                policy: field(&rest, "policy")?.rsplit('/').next()?.to_string(),
                current: field(&rest, "current")?.parse().ok()?,
                desired: field(&rest, "desired")?.parse().ok()?,
                wrote: field(&rest, "wrote")? == "true",
            })
        })
        .collect()
}

/// Every evaluation of every daemon's logs so far.
fn all_evaluations(d: &Daemons) -> Vec<Evaluated> {
    d.logs
        .iter()
        .flat_map(|log| {
            let name = DAEMONS
                .iter()
                .find(|n| {
                    log.file_name()
                        .and_then(|f| f.to_str())
                        .is_some_and(|f| f.starts_with(&format!("shard-{n}-")))
                })
                .expect("a daemon's log");
            evaluations(name, log)
        })
        .collect()
}

/// Policies per number of scale writes from `from` to `to`.
fn writes_of(evals: &[Evaluated], from: i32, to: i32) -> BTreeMap<String, Vec<&'static str>> {
    let mut out: BTreeMap<String, Vec<&'static str>> = BTreeMap::new();
    for e in evals
        .iter()
        .filter(|e| e.wrote && e.current == from && e.desired == to)
    {
        out.entry(e.policy.clone()).or_default().push(e.daemon);
    }
    out
}

fn target(i: usize) -> String {
    format!("t{i:02}")
}

/// Waits until every target has `want` replicas; how long it took for the last one.
async fn wait_all(
    deployments: &Api<Deployment>,
    want: i32,
    timeout: Duration,
    what: &str,
) -> Duration {
    let start = Instant::now();
    support::wait_until(what, timeout, || async {
        let list = deployments
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let behind: Vec<String> = list
            .items
            .iter()
            .filter(|d| d.spec.as_ref().and_then(|s| s.replicas) != Some(want))
            .filter_map(|d| d.metadata.name.clone())
            .collect();
        if behind.is_empty() && list.items.len() == POLICIES {
            Ok(())
        } else {
            Err(format!(
                "{} of {} not at {want}: {behind:?}",
                behind.len(),
                list.items.len()
            ))
        }
    })
    .await;
    start.elapsed()
}

/// Waits until every target went from `want - 1` to `want` replicas, and checks that each
/// policy's write of that step was made once, by one daemon: that daemon per policy, and how
/// long the last target took.
async fn step_to(
    deployments: &Api<Deployment>,
    d: &Daemons,
    want: i32,
    what: &str,
) -> (Duration, BTreeMap<String, &'static str>) {
    let took = wait_all(deployments, want, Duration::from_secs(60), what).await;
    let once = writes_of(&all_evaluations(d), want - 1, want);
    assert_eq!(once.len(), POLICIES, "{what}: {once:?}");
    assert!(
        once.values().all(|w| w.len() == 1),
        "{what}: double writes: {once:?}"
    );
    let writers = once.into_iter().map(|(p, w)| (p, w[0])).collect();
    (took, writers)
}

/// Polls every target's replicas until stopped; a count that ever goes down is recorded.
fn watch_for_flaps(
    deployments: Api<Deployment>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut last: HashMap<String, i32> = HashMap::new();
        let mut flaps = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            if let Ok(list) = deployments.list(&ListParams::default()).await {
                for d in list.items {
                    let name = d.metadata.name.clone().unwrap_or_default();
                    let n = d.spec.and_then(|s| s.replicas).unwrap_or(0);
                    if let Some(before) = last.insert(name.clone(), n)
                        && n < before
                    {
                        flaps.push(format!("{name}: {before} -> {n}"));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        flaps
    })
}

#[tokio::test]
async fn three_daemons_share_six_shards_and_take_a_dead_ones_over() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    support::install_crd(&client).await;
    let ns = support::create_namespace(env, &client, "shard").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
    for i in 0..POLICIES {
        support::create_kwok_deployment(&client, &ns.name, &target(i), 1, "10m", "5m").await;
    }
    // One series all policies read (one Prometheus query per daemon and interval): 5 per replica.
    let exporter = support::TestExporter::start(env, &ns.name);
    let metric = "kscale_shard_e2e_load";
    let query = format!("sum({metric}{{exporter=\"{}\"}})", exporter.id);
    exporter.set(metric, &[], 5.0);
    support::wait_prometheus_value(env, &query, 5.0).await;

    let (kubeconfig, _binding) = support::service_account_kubeconfig(env, &client, &ns.name).await;
    let mut d = Daemons {
        kubeconfig,
        namespace: ns.name.clone(),
        prometheus_url: env.prometheus_url.clone(),
        logs: Vec::new(),
        ports: DAEMONS.iter().map(|_| support::free_port()).collect(),
        running: DAEMONS.iter().map(|_| None).collect(),
    };
    for i in 0..DAEMONS.len() {
        d.start(i, 0);
    }
    // The replicas share the shards out among themselves: two each.
    let held = wait_balanced(&leases, &DAEMONS, "three daemons to hold two shards each").await;
    eprintln!("shards: {held:?}");
    // Each daemon's /metrics says so (its gauges follow within one loop wake-up).
    for port in &d.ports {
        support::wait_until("kscale_shards_held 2", Duration::from_secs(10), || async {
            let (_, metrics) = support::http_get(&format!("http://127.0.0.1:{port}"), "/metrics")?;
            let leading = metrics
                .lines()
                .filter(|l| l.starts_with("kscale_shard_leading{") && l.ends_with(" 1"))
                .count();
            if metrics.contains("kscale_shards_held 2") && leading == 2 {
                Ok(())
            } else {
                Err(format!("{leading} shards leading: {metrics}"))
            }
        })
        .await;
    }

    for i in 0..POLICIES {
        let name = target(i);
        let spec = format!(
            "  minReplicas: 1\n  maxReplicas: 10\n  interval: 1s\n  metrics:\n{}",
            support::controller::metric_yaml("load", &query)
        );
        let policy = support::scaling_policy(
            &ns.name,
            &name,
            &format!("{{apiVersion: apps/v1, kind: Deployment, name: {name}}}"),
            &spec,
        );
        policies
            .create(&PostParams::default(), &policy)
            .await
            .expect("policy created");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flaps = watch_for_flaps(deployments.clone(), stop.clone());

    // Demand doubles: every target goes to 2, each written by its shard's holder alone.
    exporter.set(metric, &[], 10.0);
    step_to(&deployments, &d, 2, "every target at 2").await;
    let owner =
        |name: &str, held: &BTreeMap<u32, String>| held[&shard_of(&ns.name, name, SHARDS)].clone();
    let evals = all_evaluations(&d);
    for i in 0..POLICIES {
        let name = target(i);
        let by: BTreeSet<&str> = evals
            .iter()
            .filter(|e| e.policy == name)
            .map(|e| e.daemon)
            .collect();
        assert_eq!(
            by,
            BTreeSet::from([owner(&name, &held).as_str()]),
            "{name} (shard {}) was evaluated by {by:?}",
            shard_of(&ns.name, &name, SHARDS)
        );
    }
    // Demand rises again and a daemon dies at once, without releasing its Leases.
    let victim = 2;
    let victims: Vec<String> = (0..POLICIES)
        .map(target)
        .filter(|n| owner(n, &held) == DAEMONS[victim])
        .collect();
    assert!(!victims.is_empty());
    exporter.set(metric, &[], 15.0);
    d.running[victim] = None;
    let killed = Instant::now();
    let dead_shards: Vec<u32> = held
        .iter()
        .filter(|(_, h)| *h == DAEMONS[victim])
        .map(|(i, _)| *i)
        .collect();
    let survivors: Vec<String> = (0..POLICIES)
        .map(target)
        .filter(|n| !victims.contains(n))
        .collect();
    let (taken, others, (_, writers)) = tokio::join!(
        taken_over(&leases, &dead_shards, DAEMONS[victim]),
        reached(&deployments, &survivors, 3),
        step_to(&deployments, &d, 3, "every target at 3 after the kill"),
    );
    let failover = killed.elapsed();
    eprintln!(
        "after the kill: the dead daemon's shards {dead_shards:?} taken over in {taken:?}; all {POLICIES} targets ({} of the dead daemon's) at 3 in {failover:?}, the live daemons' own in {others:?} (lease 4s + interval 1s = 5s; renew 1s)",
        victims.len()
    );
    assert!(
        failover <= Duration::from_secs(20),
        "the dead daemon's policies took {failover:?}"
    );
    let after = wait_balanced(
        &leases,
        &DAEMONS[..2],
        "the survivors to hold three shards each",
    )
    .await;
    eprintln!("shards after the kill: {after:?}");
    for name in &victims {
        assert_ne!(
            writers[name], DAEMONS[victim],
            "{name}: written after the kill by the dead daemon"
        );
    }

    // The daemon comes back and takes its share back; the others release what exceeds theirs.
    d.start(victim, 1);
    let back = wait_balanced(
        &leases,
        &DAEMONS,
        "the restarted daemon to take two shards back",
    )
    .await;
    eprintln!("shards after the restart: {back:?}");
    exporter.set(metric, &[], 20.0);
    let (_, writers) = step_to(&deployments, &d, 4, "every target at 4 after the restart").await;
    for (name, by) in &writers {
        assert_eq!(
            *by,
            owner(name, &back),
            "{name} (shard {}) written by {by}",
            shard_of(&ns.name, name, SHARDS)
        );
    }
    assert!(
        writers.values().any(|by| *by == DAEMONS[victim]),
        "the restarted daemon wrote nothing: {writers:?}"
    );

    stop.store(true, Ordering::Relaxed);
    let flaps = flaps.await.expect("the flap watch");
    assert!(flaps.is_empty(), "replica counts went back: {flaps:?}");
    drop(d.running);
}
