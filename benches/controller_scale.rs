//! The controller at scale, on the real test environment: 1,000 ScalingPolicies over 100
//! distinct PromQL queries against the real Prometheus, run by the release `kscale run`.
//!
//! It reports:
//! - Prometheus queries per interval in steady state (target: one per distinct query, 100),
//!   counted by Prometheus itself (`prometheus_http_requests_total{handler="/api/v1/query"}`);
//! - the delay from a metric change being visible in Prometheus to the scale write, over
//!   rounds that each move one query's value (10 policies), up and down (target: p99 under
//!   interval + 250 ms);
//! - the daemon's resident memory (target: under 64 MiB; at more than 1,000 policies, 256 MiB);
//! - kube-apiserver requests per interval in steady state, by its own
//!   `apiserver_request_total`: writes (target: none while nothing changes), `/scale` reads and
//!   status writes;
//! - how long after the daemon's start every policy had its first evaluation.
//!
//! The targets are 1,000 objects of a small custom resource with a `scale` subresource (kscale
//! scales any such kind), so that the figures measure kscale and not a thousand simulated pods
//! competing for this machine's two cores.
//!
//! Run: `scripts/testenv up && cargo bench --bench controller_scale`
//! (`BENCH_POLICIES`, `BENCH_QUERIES`, `BENCH_ROUNDS`, `BENCH_INTERVAL_S` change the sizes;
//! `BENCH_FIRST_EVAL_S` bounds the wait for every policy's first evaluation).
//!
//! The sharded row: `BENCH_SHARDS=6` runs `BENCH_DAEMONS` (default 3) daemons with
//! `--shards 6` and leader election; memory is then their sum, and each daemon's shards held
//! are reported.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

mod scale_targets;

use std::time::{Duration, Instant};

use kube::api::{Api, ApiResource, DynamicObject};
use scale_targets::{Rounds, Writes, env_usize, percentile, proc_status_kib, query_requests};

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
    let resource = scale_targets::install_target_crd(&client).await;
    let ns = support::create_namespace(env, &client, "bench").await;
    let targets: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns.name, &resource);

    let exporter = support::TestExporter::start(env, &ns.name);
    let moves = Rounds {
        env,
        exporter: &exporter,
        metric: "kscale_bench_load",
        objects: policies,
        queries,
        interval_s,
        round_timeout: Duration::from_secs(3 * interval_s + 10),
    };
    moves.rest();

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
    let names: Vec<String> = (0..policies).map(|i| format!("t{i}")).collect();
    scale_targets::create_targets(&targets, &names, 1).await;
    let specs = (0..policies)
        .map(|i| {
            serde_json::json!({
                "apiVersion": "kscale.dev/v1alpha1", "kind": "ScalingPolicy",
                "metadata": {"name": format!("p{i}"), "namespace": ns.name},
                "spec": {
                    "targetRef": {"apiVersion": scale_targets::TARGET_API_VERSION, "kind": scale_targets::TARGET_KIND, "name": format!("t{i}")},
                    "minReplicas": 1, "maxReplicas": 10, "interval": format!("{interval_s}s"),
                    "metrics": [{"name": "load", "prometheus": {"query": moves.query(i % queries)},
                                 "target": {"type": "AverageValue", "averageValue": "5"}}],
                    "behavior": {"scaleDown": {"stabilizationWindowSeconds": 0}}
                }
            })
        })
        .collect();
    scale_targets::create_all(&policies_api, specs).await;
    eprintln!("created in {:.1?}", started.elapsed());

    let writes = Writes::watch(&targets);

    let shards = env_usize("BENCH_SHARDS", 1);
    let daemon_count = if shards > 1 {
        env_usize("BENCH_DAEMONS", 3)
    } else {
        1
    };
    let shards_flag = shards.to_string();
    let daemons: Vec<(support::ChildGuard, u16, std::path::PathBuf)> = (0..daemon_count)
        .map(|i| {
            let admin_port = support::free_port();
            let log = support::repo_root().join(if daemon_count == 1 {
                "target/bench-controller-scale.log".to_string()
            } else {
                format!("target/bench-controller-scale-{i}.log")
            });
            let instance = format!("bench-{i}");
            let mut args = vec!["--watch-namespace", ns.name.as_str()];
            if shards > 1 {
                args.extend([
                    "--leader-elect",
                    "true",
                    "--leader-election-namespace",
                    ns.name.as_str(),
                    "--shards",
                    shards_flag.as_str(),
                    "--instance",
                    instance.as_str(),
                ]);
            }
            let daemon = scale_targets::start_kscale(env, &args, admin_port, &log);
            (daemon, admin_port, log)
        })
        .collect();
    let (admin_port, log) = (daemons[0].1, daemons[0].2.clone());

    // Every policy evaluated once.
    let policies_typed: Api<kscale::crd::ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
    // How far the first evaluations got within the bound is a figure, not a failure
    // (`BENCH_FIRST_EVAL_S`, default 300 s): the measurements go on from there.
    let first_bound = Duration::from_secs(env_usize("BENCH_FIRST_EVAL_S", 300) as u64);
    let first = match scale_targets::count_within(policies, first_bound, || {
        scale_targets::policies_evaluated(&policies_typed)
    })
    .await
    {
        Ok(took) => format!("{took:.1?}"),
        Err(short) => format!("not all: {short}"),
    };
    eprintln!("every policy evaluated once: {first} after start");

    // Steady state: queries per interval, counted by Prometheus, and apiserver requests,
    // counted by kube-apiserver.
    tokio::time::sleep(Duration::from_secs(interval_s)).await;
    let api0 = support::apiserver_request_counts(&client).await;
    let (q0, t0) = (query_requests(env), Instant::now());
    tokio::time::sleep(Duration::from_secs(3 * interval_s)).await;
    let (q1, t1) = (query_requests(env), Instant::now());
    let api1 = support::apiserver_request_counts(&client).await;
    let intervals = (t1 - t0).as_secs_f64() / interval_s as f64;
    // The second reading counts the first one's request too.
    let per_interval = (q1 - q0 - 1.0) / intervals;
    let api_per_interval = |keep: &dyn Fn(&str) -> bool| {
        api1.iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, v)| v - api0.get(k).copied().unwrap_or(0.0))
            .sum::<f64>()
            / intervals
    };
    let writes_per_interval = api_per_interval(&|k| {
        ["APPLY ", "PATCH ", "PUT ", "POST ", "DELETE "]
            .iter()
            .any(|verb| k.starts_with(verb))
    });
    let scale_reads_per_interval =
        api_per_interval(&|k| k == "GET bench.kscale.dev/benchtargets/scale");
    let status_writes_per_interval =
        api_per_interval(&|k| k.ends_with(" kscale.dev/scalingpolicies/status"));

    // Rounds: one query's value moves (up, then back down); its policies' writes are timed
    // from the first moment Prometheus returns the new value.
    let (delays, missed) = moves.run(&writes, rounds, &log.display().to_string()).await;
    assert_eq!(
        missed,
        0,
        "{missed} writes did not come; see {}",
        log.display()
    );

    let rss: u64 = daemons
        .iter()
        .map(|(d, _, _)| proc_status_kib(d.0.id(), "VmRSS:").unwrap_or(0))
        .sum();
    let hwm: u64 = daemons
        .iter()
        .map(|(d, _, _)| proc_status_kib(d.0.id(), "VmHWM:").unwrap_or(0))
        .sum();
    let held: Vec<String> = daemons
        .iter()
        .map(|(_, port, _)| {
            support::http_get(&format!("http://127.0.0.1:{port}"), "/metrics")
                .ok()
                .and_then(|(_, m)| {
                    m.lines()
                        .find(|l| l.starts_with("kscale_shards_held "))
                        .map(|l| l.trim_start_matches("kscale_shards_held ").to_string())
                })
                .unwrap_or_else(|| "?".into())
        })
        .collect();
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
    if shards > 1 {
        println!(
            "  sharded: {daemon_count} daemons, --shards {shards}; shards held per daemon at the end: {}",
            held.join(", ")
        );
    }
    println!(
        "  Prometheus queries per interval (steady state): {per_interval:.1} (target {queries})"
    );
    // The targets: at 1,000 policies, p99 under interval + 250 ms and 64 MiB; at
    // 10,000, interval + 1 s and 256 MiB.
    let (slack_ms, memory_mib) = if policies > 1000 {
        (1000, 256)
    } else {
        (250, 64)
    };
    println!(
        "  kube-apiserver requests per interval (steady state): {writes_per_interval:.1} writes (target 0: nothing changes), of them {status_writes_per_interval:.1} status writes; {scale_reads_per_interval:.1} /scale reads"
    );
    println!("  every policy evaluated once: {first} after the daemon's start");
    println!(
        "  change visible in Prometheus -> scale written, over {} writes in {rounds} rounds: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (target p99 < {} ms)",
        delays.len(),
        percentile(&delays, 50.0),
        percentile(&delays, 99.0),
        delays.last().copied().unwrap_or(f64::NAN),
        interval_s * 1000 + slack_ms
    );
    println!(
        "  kscale resident memory{}: {:.1} MiB now, {:.1} MiB peak (target < {memory_mib} MiB)",
        if daemon_count > 1 {
            " (sum of the daemons)"
        } else {
            ""
        },
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!("  mean evaluation (read scale, evaluate, write, status): {eval_mean_ms:.1} ms");
    drop(daemons);
}
