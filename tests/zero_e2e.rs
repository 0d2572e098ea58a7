//! Scale to zero and back, end to end on the real control plane and Prometheus: a Deployment
//! goes to 0 one step per `behavior.scaleDown` period, the last only after the cooldown, and
//! wakes when its metric crosses the activation threshold (not at or below it); one a person
//! scaled to 0 stays at 0 with the `ScaledToZero` condition saying so; a daemon restart in the
//! middle of a cooldown neither zeroes early nor forgets kscale's own zero.

mod support;

use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kscale::crd::ScalingPolicyStatus;
use kube::api::{Api, ListParams};
use support::controller::{Scenario, run_controller, scale_by_hand, wait_condition};

/// A namespace with Deployment `web` of `replicas` simulated pods, an exporter metric at
/// `initial`, and a ScalingPolicy `web` on it: `minReplicas: 0`, 1s interval, 5 per replica,
/// `activationThreshold: 2`, the given cooldown, and one replica removed per `step_s` seconds.
/// The shared [`Scenario`] set-up with this policy.
struct Zero(Scenario);

impl std::ops::Deref for Zero {
    type Target = Scenario;
    fn deref(&self) -> &Scenario {
        &self.0
    }
}

impl Zero {
    async fn start(
        env: &support::TestEnv,
        client: &kube::Client,
        prefix: &str,
        replicas: i32,
        initial: f64,
        cooldown: &str,
        step_s: u32,
    ) -> Zero {
        let zero = Zero(
            Scenario::start_with(env, client, prefix, replicas, initial, |query| {
                format!(
                    r#"  minReplicas: 0
  maxReplicas: 10
  interval: 1s
  cooldown: {cooldown}
  metrics:
  - name: queue
    prometheus: {{query: '{query}'}}
    target: {{type: AverageValue, averageValue: "5"}}
    activationThreshold: "2"
  behavior:
    scaleDown:
      stabilizationWindowSeconds: 0
      policies: [{{type: Pods, value: 1, periodSeconds: {step_s}}}]
"#
                )
            })
            .await,
        );
        zero.wait_visible(env, initial).await;
        zero
    }

    /// Sets the metric and waits until Prometheus answers it.
    async fn set(&self, env: &support::TestEnv, value: f64) {
        self.exporter.set(&self.metric, &[], value);
        self.wait_visible(env, value).await;
    }

    async fn status(&self) -> ScalingPolicyStatus {
        self.policies
            .get("web")
            .await
            .ok()
            .and_then(|p| p.status)
            .unwrap_or_default()
    }
}

/// Waits until the daemon logged `n` evaluations whose line holds `needle` (each evaluation
/// logs its reason), and returns the policy's status then.
async fn evaluated(z: &Zero, log: &std::path::Path, needle: &str, n: usize) -> ScalingPolicyStatus {
    support::wait_until(
        "evaluations in the log",
        Duration::from_secs(30),
        || async {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let count = text
                .lines()
                .filter(|l| l.contains("evaluated") && l.contains(needle))
                .count();
            if count >= n {
                Ok(())
            } else {
                Err(format!("{count} of {n} evaluations with {needle:?}"))
            }
        },
    )
    .await;
    z.status().await
}

fn condition<'a>(
    s: &'a ScalingPolicyStatus,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    s.conditions.iter().find(|c| c.type_ == type_)
}

#[tokio::test]
async fn goes_to_zero_one_step_a_period_and_wakes_above_the_threshold() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    // 0 is inactive from the start; a new policy waits one whole cooldown (6s) first.
    let z = Zero::start(env, &client, "zero-cycle", 3, 0.0, "6s", 3).await;
    let running = run_controller(env, &client, &z.ns.name, "zero-cycle", "zero-cycle").await;
    support::wait_replicas(&z.deployments, 0, Duration::from_secs(60), &running.log).await;

    // 3→2→1→0, one replica per 3s period, none before the cooldown had run from the first
    // evaluation's lastActiveTime.
    let s = support::wait_until("the zero in status", Duration::from_secs(10), || async {
        let s = z.status().await;
        match condition(&s, "ScaledToZero") {
            Some(c) if c.status == "True" && c.reason == "ScaledToZero" => Ok(s),
            other => Err(format!("{other:?}; reason {:?}", s.reason)),
        }
    })
    .await;
    let events: Api<Event> = Api::namespaced(client.clone(), &z.ns.name);
    let mut steps: Vec<(chrono::DateTime<chrono::Utc>, String)> = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("SuccessfulRescale"))
        .filter_map(|e| {
            let t = e.event_time?.0;
            let t = chrono::DateTime::from_timestamp(t.as_second(), t.subsec_nanosecond() as u32)?;
            let size = e.note?.split(';').next()?.to_string();
            Some((t, size))
        })
        .collect();
    steps.sort();
    let sizes: Vec<&str> = steps.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(
        sizes,
        vec!["New size: 2", "New size: 1", "New size: 0"],
        "{steps:?}"
    );
    // During the cooldown the metric (0) brings it down to the active floor, 1, as the HPA
    // would; the step to 0 comes only once the cooldown from the first evaluation (a new policy's
    // lastActiveTime) has run out. Steps are a period apart (event times are taken after each
    // write, so allow for the writes' own latency).
    let first_seen = s
        .history
        .last_active_time
        .expect("lastActiveTime in status");
    assert!(
        steps[2].0 >= first_seen + chrono::TimeDelta::seconds(6),
        "{steps:?} {first_seen}"
    );
    for w in steps.windows(2) {
        assert!(
            w[1].0 - w[0].0 >= chrono::TimeDelta::milliseconds(2500),
            "steps a period apart: {steps:?}"
        );
    }
    assert!(
        s.history.scaled_to_zero_time.is_some(),
        "kscale's zero is in status"
    );

    // 2 is not above the activation threshold: it stays at 0.
    z.set(env, 2.0).await;
    let s = evaluated(&z, &running.log, "queue=2 (target", 3).await;
    assert_eq!(support::replicas(&z.deployments).await, 0, "{:?}", s.reason);
    assert!(
        s.reason.as_deref().unwrap_or("").starts_with("hold 0→0"),
        "{:?}",
        s.reason
    );

    // 20 is: 20 / 5 = 4, and the default scale-up allows 4 from 0.
    z.set(env, 20.0).await;
    support::wait_replicas(&z.deployments, 4, Duration::from_secs(20), &running.log).await;
    wait_condition(
        &z.policies,
        "web",
        "ScaledToZero",
        "ScaledToZero False after the wake",
        Duration::from_secs(10),
        |c, s| {
            c.status == "False"
                && c.reason == "NotScaledToZero"
                && s.history.scaled_to_zero_time.is_none()
                && s.reason
                    .as_deref()
                    .unwrap_or("")
                    .contains("queue=20 is above its activationThreshold 2")
        },
    )
    .await;
}

#[tokio::test]
async fn a_deployment_scaled_to_zero_by_hand_stays_at_zero() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    // Active all along (20 > 2): kscale runs it at 4.
    let z = Zero::start(env, &client, "zero-hand", 2, 20.0, "5m", 1).await;
    let running = run_controller(env, &client, &z.ns.name, "zero-hand", "zero-hand").await;
    support::wait_replicas(&z.deployments, 4, Duration::from_secs(30), &running.log).await;

    scale_by_hand(&z.deployments, "web", 0).await;
    wait_condition(
        &z.policies,
        "web",
        "ScaledToZero",
        "the hand-set zero in the conditions",
        Duration::from_secs(20),
        |c, s| {
            c.status == "False"
                && c.reason == "ScaledToZeroByOther"
                && condition(s, "ScalingActive").is_some_and(|a| a.reason == "ScalingDisabled")
        },
    )
    .await;
    // Several evaluations later, with the metric still active, it is still at 0.
    let s = evaluated(&z, &running.log, "by someone other than kscale", 3).await;
    assert_eq!(support::replicas(&z.deployments).await, 0, "{:?}", s.reason);
    assert!(
        s.reason
            .as_deref()
            .unwrap_or("")
            .contains("set to 0 replicas by someone other than kscale"),
        "{:?}",
        s.reason
    );

    // Handing it back (1 replica) resumes autoscaling.
    scale_by_hand(&z.deployments, "web", 1).await;
    support::wait_replicas(&z.deployments, 4, Duration::from_secs(20), &running.log).await;
}

#[tokio::test]
async fn a_restart_in_a_cooldown_neither_zeroes_early_nor_forgets_the_zero() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    // A 20s cooldown, one replica removed a second.
    let z = Zero::start(env, &client, "zero-restart", 2, 20.0, "20s", 1).await;
    let first = run_controller(env, &client, &z.ns.name, "zero-restart-a", "a").await;
    support::wait_replicas(&z.deployments, 4, Duration::from_secs(30), &first.log).await;

    // Inactive from here: during the cooldown the metric (0) brings it to the active floor 1,
    // never to 0.
    z.set(env, 0.0).await;
    let s = evaluated(&z, &first.log, "cooldown", 3).await;
    let last_active = s
        .history
        .last_active_time
        .expect("lastActiveTime is in status");
    drop(first);

    // A new daemon reads the cooldown's start from status.
    let second = run_controller(env, &client, &z.ns.name, "zero-restart-b", "b").await;
    support::wait_replicas(&z.deployments, 0, Duration::from_secs(60), &second.log).await;
    let s = z.status().await;
    let zeroed = s.history.scaled_to_zero_time.expect("kscale's zero");
    assert!(
        zeroed >= last_active + chrono::TimeDelta::seconds(20),
        "zeroed at {zeroed}, before the cooldown from {last_active} ran out"
    );
    assert_eq!(s.history.last_active_time, Some(last_active));
    drop(second);

    // Another restart at 0: it neither wakes on inactive data nor takes the zero for a hand-set
    // one (an active metric wakes it).
    let third = run_controller(env, &client, &z.ns.name, "zero-restart-c", "c").await;
    let s = evaluated(&z, &third.log, "hold 0→0", 3).await;
    assert_eq!(support::replicas(&z.deployments).await, 0, "{:?}", s.reason);
    assert_eq!(
        condition(&s, "ScaledToZero").map(|c| c.reason.as_str()),
        Some("ScaledToZero")
    );
    z.set(env, 20.0).await;
    support::wait_replicas(&z.deployments, 4, Duration::from_secs(20), &third.log).await;
}
