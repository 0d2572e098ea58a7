//! `spec.forecast` on the real test environment, as the live walkthrough met it (issue 16, F11):
//! demand steps from 50 to a flat 400 per second, which at 70 per replica needs 6 replicas. The
//! daemon, its history read from Prometheus at start, must stay at 6 on the flat 400 (it used to
//! climb to maxReplicas as its forecast grew `727 → 868 → 996` on a flat series), and `kscale
//! dry-run`, which reads the history afresh, must decide what the daemon decides.
//!
//! The walkthrough's timescale is shortened: 5 s buckets, 4 minutes of history, a scheduled refit
//! every minute (so the watch spans several), a horizon of 10 s.

mod support;

use std::time::{Duration, Instant};

use support::controller::{Scenario, dry_run, run_controller};

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

#[tokio::test]
async fn a_step_to_a_flat_rate_holds_the_replicas_it_needs_and_dry_run_agrees() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    let sc = Scenario::start_with(env, &client, "fcstep", 1, 50.0, |query| {
        format!(
            r#"  minReplicas: 1
  maxReplicas: 10
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
    scaleDown: {{stabilizationWindowSeconds: 0, tolerance: "0"}}
"#
        )
    })
    .await;
    let ns = sc.ns.name.clone();
    // A flat 50 in Prometheus before the daemon starts, so its history read is a flat series
    // (the walkthrough's daemon fitted its model on one).
    sc.wait_visible(env, 50.0).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let running = run_controller(env, &client, &ns, "forecast-e2e-step", "forecast-step").await;
    support::wait_replicas(&sc.deployments, 1, Duration::from_secs(60), &running.log).await;

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
        let replicas = support::replicas(&sc.deployments).await;
        let status = sc
            .policies
            .get("web")
            .await
            .expect("policy")
            .status
            .unwrap_or_default();
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

    // dry-run reads the history afresh (and the state from the live status) and decides what
    // the daemon decides.
    let (ok, text) = dry_run(env, &live, "forecast-e2e-step");
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
    drop(running);
}
