//! What the benches that drive many scaled objects share (`controller_scale`, `vs_keda`): a
//! small custom resource with a `scale` subresource as the targets, a watch that timestamps
//! every scale write, rounds that move one query's value and time the writes it causes, and
//! readings of a process's memory and CPU from `/proc`.
//!
//! The targets are objects of a custom resource rather than Deployments, so that the figures
//! measure the autoscaler and not hundreds of simulated pods competing for the machine's cores.
//! Their `/scale` has a label selector (the HPA refuses a target without one) that matches no
//! pod, and `status.replicas` stays 1: nothing runs them.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};

use crate::support;

/// `apiVersion` of the bench targets.
pub const TARGET_API_VERSION: &str = "bench.kscale.dev/v1";
/// `kind` of the bench targets.
pub const TARGET_KIND: &str = "BenchTarget";

/// The variable `name` as a number, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The nearest-rank percentile `p` (0 to 100) of sorted values (NaN for none).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS:`, `VmHWM:`).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// User plus system CPU seconds a process has used so far (`/proc/<pid>/stat`, at the usual
/// 100 clock ticks per second).
pub fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; count from the closing parenthesis.
    let after = text.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Instant queries Prometheus has answered so far, by its own counter.
pub fn query_requests(env: &support::TestEnv) -> f64 {
    support::prometheus_scalar(
        env,
        r#"sum(prometheus_http_requests_total{handler="/api/v1/query"})"#,
    )
    .ok()
    .flatten()
    .unwrap_or(f64::NAN)
}

/// Installs the `BenchTarget` CRD (its scale has a selector, as a Deployment's does) and waits
/// until it is served.
pub async fn install_target_crd(client: &kube::Client) -> ApiResource {
    support::install_scale_crd(
        client,
        "bench.kscale.dev",
        TARGET_KIND,
        "benchtargets",
        true,
    )
    .await
}

/// Creates targets `names` with `replicas` (spec and status) and a selector of their own,
/// 16 at a time.
pub async fn create_targets(targets: &Api<DynamicObject>, names: &[String], replicas: i64) {
    futures::stream::iter(names.iter().cloned())
        .map(|name| {
            let targets = targets.clone();
            async move {
                let target: DynamicObject = serde_json::from_value(serde_json::json!({
                    "apiVersion": TARGET_API_VERSION, "kind": TARGET_KIND,
                    "metadata": {"name": name}, "spec": {"replicas": replicas}
                }))
                .expect("target");
                targets
                    .create(&PostParams::default(), &target)
                    .await
                    .unwrap_or_else(|e| panic!("create target {name}: {e}"));
                let status = serde_json::json!({"status": {
                    "replicas": replicas, "selector": format!("bench.kscale.dev/target={name}")}});
                targets
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                    .await
                    .unwrap_or_else(|e| panic!("status of target {name}: {e}"));
            }
        })
        .buffer_unordered(16)
        .collect::<()>()
        .await;
}

/// Creates `objects` (any kind, through `api`), 16 at a time.
pub async fn create_all(api: &Api<DynamicObject>, objects: Vec<serde_json::Value>) {
    futures::stream::iter(objects)
        .map(|object| {
            let api = api.clone();
            async move {
                let object: DynamicObject = serde_json::from_value(object.clone()).expect("object");
                api.create(&PostParams::default(), &object)
                    .await
                    .unwrap_or_else(|e| panic!("create {:?}: {e}", object.metadata.name));
            }
        })
        .buffer_unordered(16)
        .collect::<()>()
        .await;
}

/// Every scale write to the targets as a watch sees it: (target, replicas) → first time seen,
/// and each target's changes of `spec.replicas` in order.
#[derive(Clone, Default)]
pub struct Writes(Arc<Mutex<Seen>>);

#[derive(Default)]
struct Seen {
    first: HashMap<(String, i64), Instant>,
    changes: HashMap<String, Vec<(Instant, i64)>>,
}

impl Writes {
    /// Starts watching `targets`.
    pub fn watch(targets: &Api<DynamicObject>) -> Writes {
        let writes = Writes::default();
        let (seen, targets) = (writes.0.clone(), targets.clone());
        tokio::spawn(async move {
            let stream = watcher(targets, watcher::Config::default()).applied_objects();
            futures::pin_mut!(stream);
            while let Some(Ok(obj)) = stream.next().await {
                let replicas = obj.data["spec"]["replicas"].as_i64().unwrap_or(-1);
                let name = obj.metadata.name.clone().unwrap_or_default();
                if let Ok(mut w) = seen.lock() {
                    let now = Instant::now();
                    let changes = w.changes.entry(name.clone()).or_default();
                    if changes.last().is_none_or(|(_, r)| *r != replicas) {
                        changes.push((now, replicas));
                    }
                    w.first.entry((name, replicas)).or_insert(now);
                }
            }
        });
        writes
    }

    /// Forgets that `name` was seen at `replicas`.
    pub fn forget(&self, name: &str, replicas: i64) {
        if let Ok(mut w) = self.0.lock() {
            w.first.remove(&(name.to_string(), replicas));
        }
    }

    /// When `name` was first seen at `replicas` (since the last [`Writes::forget`]).
    pub fn seen(&self, name: &str, replicas: i64) -> Option<Instant> {
        self.0
            .lock()
            .ok()
            .and_then(|w| w.first.get(&(name.to_string(), replicas)).copied())
    }

    /// The replica counts `name` changed to after `since`, in order.
    pub fn after(&self, name: &str, since: Instant) -> Vec<i64> {
        self.0
            .lock()
            .ok()
            .and_then(|w| {
                w.changes.get(name).map(|c| {
                    c.iter()
                        .filter(|(t, _)| *t >= since)
                        .map(|(_, r)| *r)
                        .collect()
                })
            })
            .unwrap_or_default()
    }
}

/// The metric the rounds move: `<metric>{exporter, shard}`, 5 at rest (one replica at an
/// average-value target of 5), 10 while a round has it up (two replicas).
pub struct Rounds<'a> {
    pub env: &'a support::TestEnv,
    pub exporter: &'a support::TestExporter,
    pub metric: &'a str,
    /// The targets of shard `q` are those `i` with `i % queries == q`, named `t<i>`.
    pub objects: usize,
    pub queries: usize,
    pub interval_s: u64,
    /// How long a round may wait for its writes before the bench fails.
    pub round_timeout: Duration,
}

impl Rounds<'_> {
    /// The PromQL query of shard `q`.
    pub fn query(&self, q: usize) -> String {
        format!(
            "sum({}{{exporter=\"{}\",shard=\"{q}\"}})",
            self.metric, self.exporter.id
        )
    }

    /// Sets every shard to its resting value.
    pub fn rest(&self) {
        for q in 0..self.queries {
            self.exporter
                .set(self.metric, &[("shard", &q.to_string())], 5.0);
        }
    }

    /// Runs `rounds` rounds, each moving one shard's value (up, then back down), and returns
    /// the delays in milliseconds (sorted) from the first moment Prometheus answers the new
    /// value to each affected target's write, and how many writes did not come within
    /// `round_timeout` (`log` names where to look).
    pub async fn run(&self, writes: &Writes, rounds: usize, log: &str) -> (Vec<f64>, usize) {
        let mut delays = Vec::new();
        let mut missed = 0;
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        for round in 0..rounds {
            let shard = (round / 2 * 37) % self.queries;
            let up = round % 2 == 0;
            let value = if up { 10.0 } else { 5.0 };
            let want = if up { 2 } else { 1 };
            let affected: Vec<String> = (0..self.objects)
                .filter(|i| i % self.queries == shard)
                .map(|i| format!("t{i}"))
                .collect();
            for name in &affected {
                writes.forget(name, want);
            }
            self.exporter
                .set(self.metric, &[("shard", &shard.to_string())], value);
            let visible = loop {
                let sent = Instant::now();
                if support::prometheus_scalar(self.env, &self.query(shard))
                    .ok()
                    .flatten()
                    == Some(value)
                {
                    break sent;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            let deadline = Instant::now() + self.round_timeout;
            let times = loop {
                let seen: Vec<Instant> = affected
                    .iter()
                    .filter_map(|n| writes.seen(n, want))
                    .collect();
                if seen.len() == affected.len() {
                    break seen;
                }
                if Instant::now() >= deadline {
                    eprintln!(
                        "round {round}: only {}/{} targets reached {want} within {:?}; see {log}",
                        seen.len(),
                        affected.len(),
                        self.round_timeout
                    );
                    missed += affected.len() - seen.len();
                    break seen;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            for t in times {
                delays.push(t.saturating_duration_since(visible).as_secs_f64() * 1000.0);
            }
            // A pseudo-random pause, so changes land at every phase of the interval.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            tokio::time::sleep(Duration::from_millis(seed % (self.interval_s * 1000))).await;
            eprintln!("round {}/{rounds} done", round + 1);
        }
        delays.sort_by(f64::total_cmp);
        (delays, missed)
    }
}

/// How many of the ScalingPolicies in `api` have been evaluated (have a desired replica count).
pub async fn policies_evaluated(api: &Api<kscale::crd::ScalingPolicy>) -> Result<usize, String> {
    let list = api
        .list(&Default::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(list
        .items
        .iter()
        .filter(|p| {
            p.status
                .as_ref()
                .is_some_and(|s| s.desired_replicas.is_some())
        })
        .count())
}

/// Polls `count` until it reaches `n` (panics after `timeout`, naming `what`); how long that
/// took.
pub async fn wait_count<F, Fut>(what: &str, n: usize, timeout: Duration, count: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<usize, String>>,
{
    match count_within(n, timeout, count).await {
        Ok(took) => took,
        Err(short) => panic!("timed out waiting for {what}: {short}"),
    }
}

/// How far a count got when its bound ran out.
#[derive(Debug, Clone)]
pub struct Shortfall {
    /// The count at the bound (the last count that could be read).
    pub reached: usize,
    pub wanted: usize,
    pub after: Duration,
    /// The last error reading the count, if the last poll failed.
    pub last_error: Option<String>,
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} after {:.0} s",
            self.reached,
            self.wanted,
            self.after.as_secs_f64()
        )?;
        if let Some(e) = &self.last_error {
            write!(f, " (last read failed: {e})")?;
        }
        Ok(())
    }
}

/// Polls `count` every 200 ms until it reaches `n`: how long that took, or how far it got
/// within `timeout` (a figure to report, not a failure).
pub async fn count_within<F, Fut>(
    n: usize,
    timeout: Duration,
    count: F,
) -> Result<Duration, Shortfall>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<usize, String>>,
{
    let start = Instant::now();
    let mut reached = 0;
    loop {
        let last_error = match count().await {
            Ok(done) if done >= n => return Ok(start.elapsed()),
            Ok(done) => {
                reached = done;
                None
            }
            Err(e) => Some(e),
        };
        if start.elapsed() >= timeout {
            return Err(Shortfall {
                reached,
                wanted: n,
                after: start.elapsed(),
                last_error,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Starts the release `kscale run` (no leader election) against the test environment, with
/// `args` added, `/metrics` on 127.0.0.1:`admin_port` and its log in `log`.
///
/// `BENCH_DAEMON_WRAPPER` (words split on white space, such as `heaptrack -o target/kscale`)
/// runs the daemon under a profiler; the resident memory the bench reads is then the
/// wrapper's, not the daemon's, so only the profiler's figures count.
pub fn start_kscale(
    env: &support::TestEnv,
    args: &[&str],
    admin_port: u16,
    log: &std::path::Path,
) -> support::ChildGuard {
    let wrapper = std::env::var("BENCH_DAEMON_WRAPPER").unwrap_or_default();
    let mut wrapper = wrapper.split_whitespace();
    let mut command = match wrapper.next() {
        Some(program) => {
            let mut c = std::process::Command::new(program);
            c.args(wrapper).arg(env!("CARGO_BIN_EXE_kscale"));
            c
        }
        None => std::process::Command::new(env!("CARGO_BIN_EXE_kscale")),
    };
    support::ChildGuard(
        command
            .arg("run")
            // One daemon alone, unless the caller elects (a sharded row).
            .args(if args.contains(&"--leader-elect") {
                &[][..]
            } else {
                &["--leader-elect", "false"][..]
            })
            .args(args)
            .args(["--metrics-addr", &format!("127.0.0.1:{admin_port}")])
            .env("KUBECONFIG", &env.kubeconfig)
            .env("KSCALE_PROMETHEUS_URL", &env.prometheus_url)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .expect("kscale run starts"),
    )
}
