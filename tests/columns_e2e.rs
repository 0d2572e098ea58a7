//! Issue 16: `kubectl get sp` shows its target as `<kind>/<name>` (the `Reference` column, as
//! the HPA's REFERENCE), each metric against its target (the `Targets` column, as the HPA's
//! TARGETS) and a short reason (the `Reason` column), both from the live status the
//! controller writes; the whole reason stays in `-o wide`'s `Detail` column.

mod support;

use std::time::Duration;

use support::controller::{Scenario, printer_column, run_controller};

#[tokio::test]
async fn kubectl_shows_targets_and_a_short_reason() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    // 2 replicas, queue 10 against 5 per replica: 5/5, hold.
    let sc = Scenario::start(env, &client, "columns", 10.0, 0).await;
    sc.wait_visible(env, 10.0).await;
    let ns = sc.ns.name.clone();
    let _controller = run_controller(env, &client, &ns, "columns-e2e", "columns").await;
    let cells = |want_targets: &'static str, want_reason: &'static str| {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            let targets = printer_column(&client, &ns, "web", "Targets").await;
            let reason = printer_column(&client, &ns, "web", "Reason").await;
            if targets.as_deref() == Some(want_targets) && reason.as_deref() == Some(want_reason) {
                Ok(())
            } else {
                Err(format!("Targets {targets:?}, Reason {reason:?}"))
            }
        }
    };
    support::wait_until(
        "the columns at a steady 10",
        Duration::from_secs(40),
        || cells("5/5 (queue)", "hold 2→2 by queue"),
    )
    .await;
    // The target as the HPA's REFERENCE column shows it.
    assert_eq!(
        printer_column(&client, &ns, "web", "Reference")
            .await
            .as_deref(),
        Some("Deployment/web")
    );
    // Queue 40: 8 replicas at 5 each, reached under the default scale-up rate.
    sc.set(40.0);
    support::wait_until(
        "the columns after the scale-up",
        Duration::from_secs(90),
        || cells("5/5 (queue)", "hold 8→8 by queue"),
    )
    .await;
    // The whole reason is `-o wide`'s Detail.
    assert_eq!(
        printer_column(&client, &ns, "web", "Detail")
            .await
            .as_deref(),
        Some("hold 8→8: queue=40 (target 5/replica) → 8")
    );
}
