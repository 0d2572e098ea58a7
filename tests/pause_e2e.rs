//! Issue 15, item 2, end to end on the test cluster: `spec.paused` holds a Deployment while its
//! metric rises, `spec.pausedReplicas` pins it, `spec.pausedScaleIn` and `spec.pausedScaleOut`
//! freeze one direction each; each start, change and end of a pause is one Event (none repeated
//! every interval, none after a restart), and `kubectl get sp` shows the pause in its `Paused`
//! column.

mod support;

use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kscale::crd::{ScalingPolicy, ScalingPolicyStatus};
use kube::api::{Api, ListParams, Patch, PatchParams};
use support::controller::{Scenario, run_controller, wait_event};

const WAIT: Duration = Duration::from_secs(40);

/// Merge-patches the policy's spec with `fields` (`null` removes one).
async fn patch_spec(policies: &Api<ScalingPolicy>, fields: serde_json::Value) {
    policies
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "spec": fields })),
        )
        .await
        .expect("spec patched");
}

/// Waits for a status of the current generation whose `paused` is `paused` and whose reason
/// holds every needle; returns it.
async fn wait_status(
    policies: &Api<ScalingPolicy>,
    paused: Option<&str>,
    needles: &[&str],
) -> ScalingPolicyStatus {
    support::wait_until(
        &format!("status paused {paused:?} with {needles:?}"),
        WAIT,
        || async {
            let p = policies.get("web").await.map_err(|e| e.to_string())?;
            let s = p.status.ok_or("no status yet")?;
            let reason = s.reason.clone().unwrap_or_default();
            let current = s.observed_generation == p.metadata.generation;
            if current
                && s.paused.as_deref() == paused
                && needles.iter().all(|n| reason.contains(n))
            {
                Ok(s)
            } else {
                Err(format!("paused {:?}, reason {reason:?}", s.paused))
            }
        },
    )
    .await
}

/// The notes of the Events with `reason` about the policy, oldest first.
async fn notes(client: &kube::Client, namespace: &str, reason: &str) -> Vec<String> {
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let mut list: Vec<Event> = events
        .list(&ListParams::default())
        .await
        .expect("events listed")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect();
    list.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    list.into_iter().filter_map(|e| e.note).collect()
}

/// The `Paused` column of `kubectl get sp web`.
async fn paused_column(client: &kube::Client, namespace: &str) -> Option<String> {
    support::controller::printer_column(client, namespace, "web", "Paused").await
}

async fn replicas_now(sc: &Scenario) -> i32 {
    support::replicas(&sc.deployments).await
}

#[tokio::test]
async fn pause_pin_and_freezes_on_a_deployment() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    // 2 replicas, metric 10 at 5 per replica, no scale-down stabilization.
    let sc = Scenario::start(env, &client, "pause", 10.0, 0).await;
    sc.wait_visible(env, 10.0).await;
    let ns = sc.ns.name.clone();
    let policies = &sc.policies;
    let controller = run_controller(env, &client, &ns, "pause-e2e", "pause").await;
    let status = wait_status(policies, None, &["hold 2→2", "queue=10"]).await;
    let paused = status.conditions.iter().find(|c| c.type_ == "Paused");
    assert_eq!(
        paused.map(|c| (c.status.as_str(), c.reason.as_str())),
        Some(("False", "NotPaused"))
    );
    assert_eq!(paused_column(&client, &ns).await, None);

    // Pause: the metric asks for 6, the Deployment stays at 2, status says both.
    patch_spec(policies, serde_json::json!({"paused": true})).await;
    sc.set(30.0);
    sc.wait_visible(env, 30.0).await;
    let status = wait_status(
        policies,
        Some("Hold"),
        &[
            "hold 2→2: paused by spec.paused",
            "without the pause: scale up 2→6",
            "queue=30",
        ],
    )
    .await;
    assert_eq!(replicas_now(&sc).await, 2);
    let paused = status.conditions.iter().find(|c| c.type_ == "Paused");
    assert_eq!(
        paused.map(|c| (c.status.as_str(), c.reason.as_str())),
        Some(("True", "Paused"))
    );
    assert_eq!(paused_column(&client, &ns).await.as_deref(), Some("Hold"));
    wait_event(&client, &ns, "a ScalingPaused event", WAIT, |e| {
        e.reason.as_deref() == Some("ScalingPaused")
            && e.note
                .as_deref()
                .unwrap_or("")
                .starts_with("Paused: Hold; hold 2→2")
    })
    .await;

    // A restart while paused: the new process reads the pause from status and says nothing.
    // (A new metric value shows in the reason once the new process evaluates.)
    drop(controller);
    let controller = run_controller(env, &client, &ns, "pause-e2e-2", "pause-2").await;
    sc.set(32.0);
    wait_status(
        policies,
        Some("Hold"),
        &["without the pause: scale up 2→6", "queue=32"],
    )
    .await;
    assert_eq!(replicas_now(&sc).await, 2);
    assert_eq!(notes(&client, &ns, "ScalingPaused").await.len(), 1);

    // Pin to 4: written at once, whatever the metric says.
    patch_spec(
        policies,
        serde_json::json!({"paused": null, "pausedReplicas": 4}),
    )
    .await;
    support::wait_replicas(&sc.deployments, 4, WAIT, &controller.log).await;
    wait_status(
        policies,
        Some("Pinned to 4"),
        &["scale up 2→4: pinned to 4 by spec.pausedReplicas"],
    )
    .await;
    assert_eq!(
        paused_column(&client, &ns).await.as_deref(),
        Some("Pinned to 4")
    );
    // The metric at 4 replicas' worth before the freezes, so that none binds at once.
    sc.set(20.0);
    wait_status(
        policies,
        Some("Pinned to 4"),
        &["hold 4→4: pinned to 4", "queue=20"],
    )
    .await;

    // Freeze scale-in: the metric falls to 2 replicas' worth, the count holds at 4 ...
    patch_spec(
        policies,
        serde_json::json!({"pausedReplicas": null, "pausedScaleIn": true}),
    )
    .await;
    // The transition is evaluated on the metric it was made at (its event says queue=20); only
    // then does the metric move, so the event's note does not depend on which comes first.
    wait_status(policies, Some("ScaleIn frozen"), &["hold 4→4", "queue=20"]).await;
    sc.set(10.0);
    sc.wait_visible(env, 10.0).await;
    wait_status(
        policies,
        Some("ScaleIn frozen"),
        &[
            "hold 4→4: scale-in frozen by spec.pausedScaleIn",
            "without the pause: scale down 4→2",
        ],
    )
    .await;
    assert_eq!(replicas_now(&sc).await, 4);
    // ... and rises to 8 when it asks for 8.
    sc.set(40.0);
    support::wait_replicas(&sc.deployments, 8, WAIT, &controller.log).await;
    wait_status(policies, Some("ScaleIn frozen"), &["hold 8→8", "queue=40"]).await;

    // Freeze scale-out: asked for 10, the count holds at 8; asked for 2, it falls to 2.
    patch_spec(
        policies,
        serde_json::json!({"pausedScaleIn": null, "pausedScaleOut": true}),
    )
    .await;
    wait_status(policies, Some("ScaleOut frozen"), &["hold 8→8", "queue=40"]).await;
    sc.set(60.0);
    sc.wait_visible(env, 60.0).await;
    wait_status(
        policies,
        Some("ScaleOut frozen"),
        &[
            "hold 8→8: scale-out frozen by spec.pausedScaleOut",
            "queue=60",
        ],
    )
    .await;
    assert_eq!(replicas_now(&sc).await, 8);
    sc.set(10.0);
    support::wait_replicas(&sc.deployments, 2, WAIT, &controller.log).await;

    // Resume: the column empties and one ScalingResumed event says what ended.
    patch_spec(policies, serde_json::json!({"pausedScaleOut": null})).await;
    wait_status(policies, None, &["hold 2→2"]).await;
    assert_eq!(paused_column(&client, &ns).await, None);
    wait_event(&client, &ns, "a ScalingResumed event", WAIT, |e| {
        e.reason.as_deref() == Some("ScalingResumed")
            && e.note
                .as_deref()
                .unwrap_or("")
                .starts_with("No longer paused (was ScaleOut frozen); hold 2→2")
    })
    .await;
    // One event per transition, however many 1s evaluations ran in between.
    let paused = notes(&client, &ns, "ScalingPaused").await;
    let expected = [
        "Paused: Hold; hold 2→2: paused by spec.paused",
        "Paused: Pinned to 4 (was Hold); scale up 2→4: pinned to 4 by spec.pausedReplicas",
        "Paused: ScaleIn frozen (was Pinned to 4); hold 4→4: queue=20",
        "Paused: ScaleOut frozen (was ScaleIn frozen); hold 8→8: queue=40",
    ];
    assert_eq!(paused.len(), expected.len(), "{paused:#?}");
    for (note, start) in paused.iter().zip(expected) {
        assert!(
            note.starts_with(start),
            "{note:?} does not start with {start:?}"
        );
    }
    assert_eq!(notes(&client, &ns, "ScalingResumed").await.len(), 1);
}
