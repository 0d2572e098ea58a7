//! Issue 17, many policies on one daemon: what each evaluation costs the apiserver, on the real
//! test environment. A policy whose inputs do not move reads its target's `/scale` from the
//! watch of the targets' metadata and writes no status; a change by someone else is read again
//! and acted on.
//!
//! Requests are counted by kube-apiserver's own `apiserver_request_total`; this file's tests are
//! the only ones of this binary that touch Deployments' `/scale` and ScalingPolicies' status.

mod support;

use std::time::Duration;

use support::controller::{Scenario, run_controller, scale_by_hand};

/// `GET apps/deployments/scale` and `APPLY kscale.dev/scalingpolicies/status` so far.
async fn scale_reads_and_status_writes(client: &kube::Client) -> (f64, f64) {
    let counts = support::apiserver_request_counts(client).await;
    let count = |key: &str| counts.get(key).copied().unwrap_or(0.0);
    (
        count("GET apps/deployments/scale"),
        count("APPLY kscale.dev/scalingpolicies/status"),
    )
}

/// Evaluations of policy `web` the daemon's log shows so far.
fn evaluations(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("evaluated") && l.contains("web"))
        .count()
}

#[tokio::test]
async fn a_steady_policy_reads_its_scale_and_writes_its_status_only_on_change() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    // 10 per 2 replicas at 5 each: the count holds at 2.
    let sc = Scenario::start(env, &client, "quiet", 10.0, 0).await;
    let running = run_controller(env, &client, &sc.ns.name, "scale-e2e-quiet", "quiet").await;
    support::wait_until(
        "the first status (2 replicas desired)",
        Duration::from_secs(60),
        || async {
            let p = sc.policies.get("web").await.map_err(|e| e.to_string())?;
            match p.status.as_ref().and_then(|s| s.desired_replicas) {
                Some(2) => Ok(()),
                other => Err(format!("desired {other:?}")),
            }
        },
    )
    .await;
    // Past the 5 s in which a status with other news than the time may wait.
    tokio::time::sleep(Duration::from_secs(7)).await;

    let (reads, writes) = scale_reads_and_status_writes(&client).await;
    let evaluated = evaluations(&running.log);
    // Ten intervals of 1 s with nothing new.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (reads_after, writes_after) = scale_reads_and_status_writes(&client).await;
    let evaluated_after = evaluations(&running.log);
    assert!(
        evaluated_after >= evaluated + 5,
        "the policy was evaluated meanwhile ({evaluated} then {evaluated_after} evaluations); log: {}",
        support::log_tail(&running.log)
    );
    assert_eq!(
        reads_after - reads,
        0.0,
        "no /scale read while the target did not change"
    );
    assert_eq!(
        writes_after - writes,
        0.0,
        "no status write while nothing but the time moved"
    );

    // Someone scales it by hand: the scale is read again, the decision (2) written back, and
    // the status says so.
    scale_by_hand(&sc.deployments, "web", 4).await;
    support::wait_replicas(&sc.deployments, 2, Duration::from_secs(30), &running.log).await;
    support::wait_until(
        "a status that saw the hand-set count",
        Duration::from_secs(30),
        || async {
            let p = sc.policies.get("web").await.map_err(|e| e.to_string())?;
            let s = p.status.unwrap_or_default();
            match s.history.scale_down_events.last() {
                Some(_) => Ok(()),
                None => Err(format!("no scale-down event yet: {:?}", s.reason)),
            }
        },
    )
    .await;
    let (reads_changed, writes_changed) = scale_reads_and_status_writes(&client).await;
    assert!(
        reads_changed > reads_after,
        "the changed target's scale was read again"
    );
    assert!(
        writes_changed > writes_after,
        "the new decision's status was written"
    );
}
