//! Actuation against the real apiserver: the scale subresource of any scalable kind, both
//! ways, field manager `kscale`, and the one-writer rule.

mod support;

use std::time::Duration;

use k8s_openapi::api::autoscaling::v2::CrossVersionObjectReference;
use kscale::actuate::{ActuateError, ScaleTarget, WriteOutcome};

fn reference(api_version: Option<&str>, kind: &str, name: &str) -> CrossVersionObjectReference {
    CrossVersionObjectReference {
        api_version: api_version.map(str::to_string),
        kind: kind.to_string(),
        name: name.to_string(),
    }
}

#[tokio::test]
async fn scales_a_deployment_both_ways_through_the_scale_subresource() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    let ns = support::create_namespace(env, &client, "actuate").await;
    support::create_kwok_deployment(&client, &ns.name, "web", 3, "100m", "50m").await;
    support::wait_for_ready_pods(&client, &ns.name, "app=web", 3, Duration::from_secs(60)).await;

    let target = ScaleTarget::resolve(
        &client,
        &ns.name,
        &reference(Some("apps/v1"), "Deployment", "web"),
    )
    .await
    .expect("resolves");
    let scale = target.read().await.expect("reads scale");
    assert_eq!(scale.spec_replicas, 3);
    assert_eq!(scale.selector.as_deref(), Some("app=web"));
    target
        .check_no_hpa(&client, None)
        .await
        .expect("no HPA yet");

    let written = |o: Result<WriteOutcome, ActuateError>| {
        assert!(matches!(o, Ok(WriteOutcome::Written)), "{o:?}");
    };
    written(target.write(5, &scale).await);
    support::wait_for_ready_pods(&client, &ns.name, "app=web", 5, Duration::from_secs(60)).await;
    let scale = target.read().await.expect("reads scale");
    written(target.write(2, &scale).await);
    support::wait_for_ready_pods(&client, &ns.name, "app=web", 2, Duration::from_secs(60)).await;
    let scale = target.read().await.expect("reads scale");
    assert_eq!((scale.spec_replicas, scale.status_replicas), (2, 2));

    // A write is conditional on the scale read: after someone else scaled in between, it is
    // refused (409) and the other writer's count stands.
    let stale = target.read().await.expect("reads scale");
    let fresh = target.read().await.expect("reads scale");
    written(target.write(3, &fresh).await);
    let outcome = target.write(4, &stale).await;
    assert!(matches!(outcome, Ok(WriteOutcome::Conflict)), "{outcome:?}");
    assert_eq!(target.read().await.expect("reads").spec_replicas, 3);

    // The write is attributed to the field manager `kscale`.
    let deployments: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
        kube::Api::namespaced(client.clone(), &ns.name);
    let d = deployments.get("web").await.expect("deployment");
    let managers: Vec<String> = d
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers.iter().any(|m| m == "kscale"),
        "managers: {managers:?}"
    );

    // With an HPA on the same Deployment, kscale refuses to be a second writer.
    support::apply_yaml(
        &client,
        &ns.name,
        r#"apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: web-hpa}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
  minReplicas: 2
  maxReplicas: 4
  metrics:
  - type: Resource
    resource: {name: cpu, target: {type: Utilization, averageUtilization: 50}}
"#,
    )
    .await;
    match target.check_no_hpa(&client, None).await {
        Err(e @ ActuateError::HpaConflict { .. }) => {
            assert_eq!(e.kind_label(), "ConflictingHPA");
            assert!(
                e.to_string().contains("HorizontalPodAutoscaler web-hpa"),
                "{e}"
            );
        }
        other => panic!("expected an HPA conflict, got {other:?}"),
    }
    // A policy that names no apiVersion (apps/v1 by default) is the same target as the HPA's.
    let unversioned =
        ScaleTarget::resolve(&client, &ns.name, &reference(None, "Deployment", "web"))
            .await
            .expect("resolves");
    assert_eq!(unversioned.key, target.key);
    assert!(matches!(
        unversioned.check_no_hpa(&client, None).await,
        Err(ActuateError::HpaConflict { .. })
    ));
}

#[tokio::test]
async fn unscalable_and_unknown_targets_are_named() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    let ns = support::create_namespace(env, &client, "actuate-bad").await;
    let e = ScaleTarget::resolve(
        &client,
        &ns.name,
        &reference(Some("v1"), "ConfigMap", "settings"),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ActuateError::NotScalable { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("v1/ConfigMap has no scale subresource"),
        "{e}"
    );
    let e = ScaleTarget::resolve(
        &client,
        &ns.name,
        &reference(Some("apps/v1"), "Rocket", "x"),
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string().contains("kind apps/v1/Rocket is not served"),
        "{e}"
    );
    // A StatefulSet resolves too (any kind with /scale).
    ScaleTarget::resolve(
        &client,
        &ns.name,
        &reference(Some("apps/v1"), "StatefulSet", "db"),
    )
    .await
    .expect("StatefulSet has /scale");
}
