//! The controller at scale, on the real test environment: 1,000 ScalingPolicies over 100
//! distinct PromQL queries against the real Prometheus, run by the release `kscale run`.
//!
//! It reports:
//! - Prometheus queries per interval in steady state (target: one per distinct query, 100),
//!   counted by Prometheus itself (`prometheus_http_requests_total{handler="/api/v1/query"}`);
//! - the delay from a metric change being visible in Prometheus to the scale write, over
//!   rounds that each move one query's value (10 policies), up and down (target: p99 under
//!   interval + 250 ms);
//! - the daemon's resident memory (target: under 64 MiB).
//!
//! The targets are 1,000 objects of a small custom resource with a `scale` subresource (kscale
//! scales any such kind), so that the figures measure kscale and not a thousand simulated pods
//! competing for this machine's two cores.
//!
//! Run: `scripts/testenv up && cargo bench --bench controller_scale`
//! (`BENCH_POLICIES`, `BENCH_QUERIES`, `BENCH_ROUNDS`, `BENCH_INTERVAL_S` change the sizes).

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn query_requests(env: &support::TestEnv) -> f64 {
    support::prometheus_scalar(
        env,
        r#"sum(prometheus_http_requests_total{handler="/api/v1/query"})"#,
    )
    .ok()
    .flatten()
    .unwrap_or(f64::NAN)
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass nothing useful.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let policies = env_usize("BENCH_POLICIES", 1000);
    let queries = env_usize("BENCH_QUERIES", 100).clamp(1, policies);
    let rounds = env_usize("BENCH_ROUNDS", 20);
    let interval_s = env_usize("BENCH_INTERVAL_S", 10) as u64;
    let Some(env) = support::testenv() else {
        eprintln!(
            "controller_scale: the test environment is off (KSCALE_SKIP_TESTENV=1): nothing measured"
        );
        return;
    };
    let client = env.client().await;
    support::install_crd(&client).await;
    let resource =
        support::install_scale_crd(&client, "bench.kscale.dev", "BenchTarget", "benchtargets")
            .await;
    let ns = support::create_namespace(env, &client, "bench").await;
    let targets: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns.name, &resource);

    let exporter = support::TestExporter::start(env, &ns.name);
    for q in 0..queries {
        exporter.set("kscale_bench_load", &[("shard", &q.to_string())], 5.0);
    }
    let query_of = |q: usize| {
        format!(
            "sum(kscale_bench_load{{exporter=\"{}\",shard=\"{q}\"}})",
            exporter.id
        )
    };

    eprintln!(
        "creating {policies} targets and {policies} ScalingPolicies in {}",
        ns.name
    );
    let started = Instant::now();
    let policies_api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns.name,
        &ApiResource::erase::<kscale::crd::ScalingPolicy>(&()),
    );
    futures::stream::iter(0..policies)
        .map(|i| {
            let (targets, policies_api, ns, query) = (
                targets.clone(),
                policies_api.clone(),
                ns.name.clone(),
                query_of(i % queries),
            );
            async move {
                let target: DynamicObject = serde_json::from_value(serde_json::json!({
                    "apiVersion": "bench.kscale.dev/v1", "kind": "BenchTarget",
                    "metadata": {"name": format!("t{i}")}, "spec": {"replicas": 1}
                }))
                .expect("target");
                targets
                    .create(&PostParams::default(), &target)
                    .await
                    .expect("create target");
                targets
                    .patch_status(
                        &format!("t{i}"),
                        &PatchParams::default(),
                        &Patch::Merge(serde_json::json!({"status": {"replicas": 1}})),
                    )
                    .await
                    .expect("target status");
                let policy: DynamicObject = serde_json::from_value(serde_json::json!({
                    "apiVersion": "kscale.dev/v1alpha1", "kind": "ScalingPolicy",
                    "metadata": {"name": format!("p{i}"), "namespace": ns},
                    "spec": {
                        "targetRef": {"apiVersion": "bench.kscale.dev/v1", "kind": "BenchTarget", "name": format!("t{i}")},
                        "minReplicas": 1, "maxReplicas": 10, "interval": format!("{interval_s}s"),
                        "metrics": [{"name": "load", "prometheus": {"query": query},
                                     "target": {"type": "AverageValue", "averageValue": "5"}}],
                        "behavior": {"scaleDown": {"stabilizationWindowSeconds": 0}}
                    }
                }))
                .expect("policy");
                policies_api
                    .create(&PostParams::default(), &policy)
                    .await
                    .expect("create policy");
            }
        })
        .buffer_unordered(16)
        .collect::<()>()
        .await;
    eprintln!("created in {:.1?}", started.elapsed());

    // Scale writes as the watch sees them: (target, replicas) → first time seen.
    let writes: Arc<Mutex<HashMap<(String, i64), Instant>>> = Arc::default();
    {
        let writes = writes.clone();
        let targets = targets.clone();
        tokio::spawn(async move {
            let stream = watcher(targets, watcher::Config::default()).applied_objects();
            futures::pin_mut!(stream);
            while let Some(Ok(obj)) = stream.next().await {
                let replicas = obj.data["spec"]["replicas"].as_i64().unwrap_or(-1);
                let name = obj.metadata.name.clone().unwrap_or_default();
                if let Ok(mut w) = writes.lock() {
                    w.entry((name, replicas)).or_insert_with(Instant::now);
                }
            }
        });
    }

    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let log = support::repo_root().join("target/bench-controller-scale.log");
    let daemon = Child(
        Command::new(env!("CARGO_BIN_EXE_kscale"))
            .args([
                "run",
                "--leader-elect",
                "false",
                "--watch-namespace",
                &ns.name,
            ])
            .args(["--metrics-addr", &format!("127.0.0.1:{admin_port}")])
            .env("KUBECONFIG", &env.kubeconfig)
            .env("KSCALE_PROMETHEUS_URL", &env.prometheus_url)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("kscale run starts"),
    );
    let pid = daemon.0.id();

    // Every policy evaluated once.
    let policies_typed: Api<kscale::crd::ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
    let first = Instant::now();
    support::wait_until(
        "every policy evaluated",
        Duration::from_secs(300),
        || async {
            let list = policies_typed
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?;
            let done = list
                .items
                .iter()
                .filter(|p| {
                    p.status
                        .as_ref()
                        .is_some_and(|s| s.desired_replicas.is_some())
                })
                .count();
            if done == policies {
                Ok(())
            } else {
                Err(format!("{done}/{policies} evaluated"))
            }
        },
    )
    .await;
    eprintln!(
        "all {policies} policies evaluated {:.1?} after start",
        first.elapsed()
    );

    // Steady state: queries per interval, counted by Prometheus.
    tokio::time::sleep(Duration::from_secs(interval_s)).await;
    let (q0, t0) = (query_requests(env), Instant::now());
    tokio::time::sleep(Duration::from_secs(3 * interval_s)).await;
    let (q1, t1) = (query_requests(env), Instant::now());
    // The second reading counts the first one's request too.
    let per_interval = (q1 - q0 - 1.0) / ((t1 - t0).as_secs_f64() / interval_s as f64);

    // Rounds: one query's value moves (up, then back down); its policies' writes are timed
    // from the first moment Prometheus returns the new value.
    let mut delays = Vec::new();
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    for round in 0..rounds {
        let shard = (round / 2 * 37) % queries;
        let up = round % 2 == 0;
        let value = if up { 10.0 } else { 5.0 };
        let want = if up { 2 } else { 1 };
        let affected: Vec<String> = (0..policies)
            .filter(|i| i % queries == shard)
            .map(|i| format!("t{i}"))
            .collect();
        if let Ok(mut w) = writes.lock() {
            for name in &affected {
                w.remove(&(name.clone(), want));
            }
        }
        exporter.set("kscale_bench_load", &[("shard", &shard.to_string())], value);
        let visible = loop {
            let sent = Instant::now();
            if support::prometheus_scalar(env, &query_of(shard))
                .ok()
                .flatten()
                == Some(value)
            {
                break sent;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let deadline = Instant::now() + Duration::from_secs(3 * interval_s + 10);
        let times = loop {
            let seen: Vec<Instant> = match writes.lock() {
                Ok(w) => affected
                    .iter()
                    .filter_map(|n| w.get(&(n.clone(), want)).copied())
                    .collect(),
                Err(_) => Vec::new(),
            };
            if seen.len() == affected.len() {
                break seen;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: {}/{} targets reached {want}; see {}",
                seen.len(),
                affected.len(),
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        for t in times {
            delays.push(t.saturating_duration_since(visible).as_secs_f64() * 1000.0);
        }
        // A pseudo-random pause, so changes land at every phase of the interval.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(seed % (interval_s * 1000))).await;
        eprintln!("round {}/{rounds} done", round + 1);
    }
    delays.sort_by(f64::total_cmp);

    let rss = proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    let hwm = proc_status_kib(pid, "VmHWM:").unwrap_or(0);
    let (_, metrics) = support::http_get(&format!("http://127.0.0.1:{admin_port}"), "/metrics")
        .unwrap_or((0, String::new()));
    let eval_line = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let eval_mean_ms = eval_line("kscale_evaluation_duration_seconds_sum")
        / eval_line("kscale_evaluation_duration_seconds_count")
        * 1000.0;

    println!(
        "controller_scale: {policies} policies, {queries} distinct queries, interval {interval_s}s, real kube-apiserver and Prometheus"
    );
    println!(
        "  Prometheus queries per interval (steady state): {per_interval:.1} (target {queries})"
    );
    println!(
        "  change visible in Prometheus -> scale written, over {} writes in {rounds} rounds: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (target p99 < {} ms)",
        delays.len(),
        percentile(&delays, 50.0),
        percentile(&delays, 99.0),
        delays.last().copied().unwrap_or(f64::NAN),
        interval_s * 1000 + 250
    );
    println!(
        "  kscale resident memory: {:.1} MiB now, {:.1} MiB peak (target < 64 MiB)",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!("  mean evaluation (read scale, evaluate, write, status): {eval_mean_ms:.1} ms");
    drop(daemon);
}
