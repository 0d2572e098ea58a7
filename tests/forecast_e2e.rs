//! `spec.forecast` on the real test environment, as the live walkthrough met it (issue 16, F11):
//! demand steps from 50 to a flat 400 per second, which at 70 per replica needs 6 replicas. The
//! daemon, its history read from Prometheus at start, must stay at 6 on the flat 400 (it used to
//! climb to maxReplicas as its forecast grew `727 → 868 → 996` on a flat series), and `kscale
//! dry-run`, which reads the history afresh, must decide what the daemon decides.
//!
//! The walkthrough's timescale is shortened: 5 s buckets, 4 minutes of history, a scheduled refit
//! every minute (so the watch spans several), a horizon of 10 s.
//!
//! The step down (issue 16): from a flat 800 to a flat 400 the forecast's upper bound used to grow
//! after the fall (`upper bound 716 → 874`, clipped to maxReplicas), and the scale-down window
//! then held the target there. The count must come down as the window allows and never go up.

mod support;

use std::time::{Duration, Instant};

use support::controller::{Running, Scenario, dry_run, run_controller};

/// Per-replica target of the request rate.
const TARGET: f64 = 70.0;

/// The `decision  N replicas` line of a dry-run's output.
fn dry_run_decision(text: &str) -> Option<i32> {
    text.lines()
        .find_map(|l| l.strip_prefix("decision"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The policy both tests run: the request rate at [`TARGET`] a replica, forecast on the shortened
/// timescale, scaling up at once and down after `scale_down_window` seconds.
fn policy_spec(query: &str, max_replicas: i32, scale_down_window: u32) -> String {
    format!(
        r#"  minReplicas: 1
  maxReplicas: {max_replicas}
  interval: 1s
  metrics:
  - name: rps
    prometheus: {{query: '{query}'}}
    target: {{type: AverageValue, averageValue: "{TARGET}"}}
  forecast: {{model: Trend, history: 4m, step: 5s, horizon: 10s, refitEvery: 1m}}
  behavior:
    scaleUp:
      stabilizationWindowSeconds: 0
      tolerance: "0"
      policies: [{{type: Pods, value: 20, periodSeconds: 1}}]
    scaleDown: {{stabilizationWindowSeconds: {scale_down_window}, tolerance: "0"}}
"#
    )
}

/// `kscale dry-run` reads the history afresh (and the state from the live status) and decides
/// `needed`, as the daemon did (`reason`), its rps line naming the forecast.
fn assert_dry_run_decides(
    env: &support::TestEnv,
    live: &kscale::crd::ScalingPolicy,
    needed: i32,
    reason: &str,
) {
    let namespace = live.metadata.namespace.as_deref().unwrap_or_default();
    let (ok, text) = dry_run(env, live, &format!("forecast-e2e-{namespace}"));
    assert!(ok, "{text}");
    assert_eq!(
        dry_run_decision(&text),
        Some(needed),
        "dry-run decides {needed}, as the daemon does:\n{text}\ndaemon: {reason}"
    );
    let metric = text
        .lines()
        .find(|l| l.starts_with("metric ") && l.contains("rps"))
        .unwrap_or_else(|| panic!("no rps line: {text}"));
    assert!(
        metric.contains(&format!("proposal {needed}")) && metric.contains("Trend forecast"),
        "{metric}"
    );
}

/// A scenario `name` of [`policy_spec`] on a flat `value` that Prometheus has shown for 30 s
/// before the daemon starts (so its history read is a flat series, as the walkthrough's was),
/// and the daemon once it runs the replicas `value` needs.
async fn start_on_a_flat(
    env: &'static support::TestEnv,
    client: &kube::Client,
    name: &str,
    value: f64,
    max_replicas: i32,
    scale_down_window: u32,
) -> (Scenario, Running) {
    let sc = Scenario::start_with(env, client, &format!("fc{name}"), 1, value, |query| {
        policy_spec(query, max_replicas, scale_down_window)
    })
    .await;
    sc.wait_visible(env, value).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let (log, identity) = (format!("forecast-e2e-{name}"), format!("forecast-{name}"));
    let running = run_controller(env, client, &sc.ns.name, &log, &identity).await;
    let needed = (value / TARGET).ceil() as i32;
    support::wait_replicas(
        &sc.deployments,
        needed,
        Duration::from_secs(60),
        &running.log,
    )
    .await;
    (sc, running)
}

#[tokio::test]
async fn a_step_to_a_flat_rate_holds_the_replicas_it_needs_and_dry_run_agrees() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    let (sc, running) = start_on_a_flat(env, &client, "step", 50.0, 10, 0).await;
    let ns = sc.ns.name.clone();

    // The step: 400/70 needs 6.
    sc.set(400.0);
    sc.wait_visible(env, 400.0).await;
    let needed = (400.0 / TARGET).ceil() as i32;
    support::wait_replicas(
        &sc.deployments,
        needed,
        Duration::from_secs(60),
        &running.log,
    )
    .await;

    // Three minutes of the flat 400 (three scheduled refits, and the step in every fit's
    // window): the count stays at 6, never more.
    let watch = Duration::from_secs(180);
    let start = Instant::now();
    let evaluated = format!("evaluated policy={ns}/web ");
    let evaluations_logged = || {
        std::fs::read_to_string(&running.log)
            .unwrap_or_default()
            .matches(&evaluated)
            .count()
    };
    let logged_before = evaluations_logged();
    while start.elapsed() < watch {
        let (replicas, status) = observe(&sc).await;
        assert!(
            replicas <= needed && status.desired_replicas.is_none_or(|d| d <= needed),
            "{:?} into the flat 400: {replicas} replicas, desired {:?}: {}\n{}",
            start.elapsed(),
            status.desired_replicas,
            status.reason.unwrap_or_default(),
            support::log_tail(&running.log)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Status is written only when more than the time changes, so the daemon's log (one INFO
    // line per evaluation) shows it kept deciding through the watch.
    let evaluations = evaluations_logged() - logged_before;
    assert!(
        evaluations >= 10,
        "the daemon logged {evaluations} evaluations of web in {watch:?}"
    );
    let live = sc.policies.get("web").await.expect("policy");
    let status = live.status.clone().unwrap_or_default();
    assert_eq!(status.desired_replicas, Some(needed), "{:?}", status.reason);
    let reason = status.reason.unwrap_or_default();
    assert!(
        reason.contains("Trend forecast") && reason.contains("upper bound"),
        "the reason names the forecast and its upper bound: {reason}"
    );

    assert_dry_run_decides(env, &live, needed, &reason);
    drop(running);
}

#[tokio::test]
async fn a_step_down_brings_the_count_down_and_never_up_and_dry_run_agrees() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    // 800/70 needs 12; the scale-down window of 30 s holds it that long after the fall.
    let (sc, running) = start_on_a_flat(env, &client, "down", 800.0, 15, 30).await;
    let high = (800.0 / TARGET).ceil() as i32;
    // A minute of the flat 800, so the fall meets a forecaster with a history of it.
    tokio::time::sleep(Duration::from_secs(60)).await;

    sc.set(400.0);
    sc.wait_visible(env, 400.0).await;
    let needed = (400.0 / TARGET).ceil() as i32;
    // From the fall on the count and the decision only come down (the window holds 12 for
    // 30 s, then it falls to 6) and never go up; two minutes bound the watch.
    let watch = Duration::from_secs(120);
    let start = Instant::now();
    let mut least = high;
    while start.elapsed() < watch {
        let (replicas, status) = observe(&sc).await;
        let desired = status.desired_replicas.unwrap_or(least);
        assert!(
            replicas <= least && desired <= least,
            "{:?} after the fall: {replicas} replicas, desired {desired}, after {least}: {}\n{}",
            start.elapsed(),
            status.reason.unwrap_or_default(),
            support::log_tail(&running.log)
        );
        least = least.min(replicas).min(desired);
        if replicas == needed && start.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    support::wait_replicas(
        &sc.deployments,
        needed,
        Duration::from_secs(30),
        &running.log,
    )
    .await;
    let live = sc.policies.get("web").await.expect("policy");
    let status = live.status.clone().unwrap_or_default();
    assert_eq!(status.desired_replicas, Some(needed), "{:?}", status.reason);
    let reason = status.reason.unwrap_or_default();
    assert_dry_run_decides(env, &live, needed, &reason);
    drop(running);
}

/// The backend's replica count and the policy's status, read now.
async fn observe(sc: &Scenario) -> (i32, kscale::crd::ScalingPolicyStatus) {
    let replicas = support::replicas(&sc.deployments).await;
    let status = sc
        .policies
        .get("web")
        .await
        .expect("policy")
        .status
        .unwrap_or_default();
    (replicas, status)
}
