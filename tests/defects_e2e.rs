//! Decision defects of issue 15 (item 4) on the real control plane: a policy whose Prometheus is
//! unreachable records one Warning event; a custom resource whose scale has no selector holds,
//! as a real HPA on an identical resource refuses; admission refuses a schedule ceiling under
//! `spec.minReplicas`, as `validate` does.

mod support;

use std::time::Duration;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::events::v1::Event;
use kscale::crd::ScalingPolicy;
use kscale::policy::CompiledPolicy;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use support::controller::{run_controller, run_controller_at, wait_condition, wait_event};

/// A policy `name` in `ns` on `target` (`apiVersion`, `kind`, `name` as a flow mapping), one
/// metric `q` on `query` with `target_spec`, evaluated every second.
fn policy(ns: &str, name: &str, target: &str, query: &str, target_spec: &str) -> ScalingPolicy {
    support::scaling_policy(
        ns,
        name,
        target,
        &format!(
            r#"  minReplicas: 1
  maxReplicas: 10
  interval: 1s
  metrics:
  - name: q
    prometheus: {{query: '{query}'}}
    target: {target_spec}
"#
        ),
    )
}

#[tokio::test]
async fn an_unreachable_prometheus_records_one_warning_event() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    support::install_crd(&client).await;
    let ns = support::create_namespace(env, &client, "def-prom").await;
    support::create_kwok_deployment(&client, &ns.name, "web", 2, "100m", "50m").await;
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
    let p = policy(
        &ns.name,
        "web",
        support::WEB_DEPLOYMENT,
        "sum(up)",
        "{type: AverageValue, averageValue: \"5\"}",
    );
    policies
        .create(&PostParams::default(), &p)
        .await
        .expect("policy created");
    // The daemon's Prometheus is a port nothing listens on.
    let unreachable = format!("http://127.0.0.1:{}", support::free_port());
    let _controller = run_controller_at(
        env,
        &client,
        &ns.name,
        "defects-e2e-prom",
        "defects",
        &unreachable,
    )
    .await;

    wait_condition(
        &policies,
        "web",
        "ScalingActive",
        "the policy holds on the failed metric",
        Duration::from_secs(30),
        |c, s| {
            c.status == "False"
                && s.desired_replicas == Some(2)
                && s.metrics.first().is_some_and(|m| m.state == "Error")
        },
    )
    .await;
    let failed = |e: &Event| {
        e.reason.as_deref() == Some("FailedGetExternalMetric")
            && e.type_.as_deref() == Some("Warning")
            && e.note.as_deref().unwrap_or("").contains("metric q: error")
    };
    wait_event(
        &client,
        &ns.name,
        "a FailedGetExternalMetric event",
        Duration::from_secs(20),
        failed,
    )
    .await;

    // Several more intervals of the same failure: still one event, never repeated.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    let evaluated_since = |after: chrono::DateTime<chrono::Utc>| {
        let policies = policies.clone();
        async move {
            let p = policies.get("web").await.map_err(|e| e.to_string())?;
            match p.status.and_then(|s| s.last_evaluation_time) {
                Some(t) if t > after => Ok(()),
                other => Err(format!("last evaluation {other:?}")),
            }
        }
    };
    let mark = chrono::Utc::now() + chrono::TimeDelta::seconds(5);
    support::wait_until(
        "an evaluation 5s later (status refreshes at least every minute)",
        Duration::from_secs(90),
        || evaluated_since(mark),
    )
    .await;
    let list = events
        .list(&ListParams::default())
        .await
        .expect("events list");
    let found: Vec<&Event> = list.items.iter().filter(|e| failed(e)).collect();
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0].series.as_ref().is_none_or(|s| s.count <= 1),
        "the event was published again: {:?}",
        found[0].series
    );
}

/// Lets the test's kscale ServiceAccount read and scale `NoSelector` resources (the chart's
/// RBAC covers Deployments and StatefulSets).
const TARGET_RBAC: &str = r#"apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: kscale-noselectors}
rules:
- apiGroups: [defects.kscale.dev]
  resources: [noselectors, noselectors/scale]
  verbs: [get, list, watch, patch, update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: kscale-noselectors}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: kscale-noselectors}
subjects:
- {kind: ServiceAccount, name: kscale, namespace: NAMESPACE}
"#;

/// The issue's input: a custom resource whose scale subresource has no `labelSelectorPath`,
/// `status.replicas: 2`, no pods, and a query answering 300. A real HPA (External metric,
/// `Value` 100) on one such resource refuses: ScalingActive False, InvalidSelector. kscale on an
/// identical one with a `Value` 100 target holds at 2 and names the missing selector; with an
/// `AverageValue` 100 target, which needs only `status.replicas`, it scales 2→3.
#[tokio::test]
async fn a_target_without_a_selector_holds_as_the_hpa_refuses() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    support::install_crd(&client).await;
    let resource = support::install_scale_crd(
        &client,
        "defects.kscale.dev",
        "NoSelector",
        "noselectors",
        false,
    )
    .await;
    let ns = support::create_namespace(env, &client, "def-sel").await;
    support::apply_yaml(
        &client,
        &ns.name,
        &TARGET_RBAC.replace("NAMESPACE", &ns.name),
    )
    .await;
    let targets: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns.name, &resource);
    for name in ["hpa-target", "value-target", "average-target"] {
        let mut obj = DynamicObject::new(name, &resource);
        obj.data = serde_json::json!({"spec": {"replicas": 2}});
        targets
            .create(&PostParams::default(), &obj)
            .await
            .expect("target created");
        targets
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"status": {"replicas": 2}})),
            )
            .await
            .expect("status.replicas set");
    }
    let hpa: HorizontalPodAutoscaler = serde_yaml::from_str(&format!(
        r#"
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {{name: hpa-target, namespace: {ns}}}
spec:
  scaleTargetRef: {{apiVersion: defects.kscale.dev/v1, kind: NoSelector, name: hpa-target}}
  minReplicas: 1
  maxReplicas: 10
  metrics:
  - type: External
    external:
      metric: {{name: q}}
      target: {{type: Value, value: "100"}}
"#,
        ns = ns.name
    ))
    .expect("HPA parses");
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns.name);
    hpas.create(&PostParams::default(), &hpa)
        .await
        .expect("HPA created");

    let exporter = support::TestExporter::start(env, &ns.name);
    exporter.set("kscale_defects_q", &[], 300.0);
    let query = format!("sum(kscale_defects_q{{exporter=\"{}\"}})", exporter.id);
    support::wait_prometheus_value(env, &query, 300.0).await;
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
    for (name, target, spec) in [
        ("value", "value-target", "{type: Value, value: \"100\"}"),
        (
            "average",
            "average-target",
            "{type: AverageValue, averageValue: \"100\"}",
        ),
    ] {
        let target_ref =
            format!("{{apiVersion: defects.kscale.dev/v1, kind: NoSelector, name: {target}}}");
        policies
            .create(
                &PostParams::default(),
                &policy(&ns.name, name, &target_ref, &query, spec),
            )
            .await
            .expect("policy created");
    }
    let running = run_controller(env, &client, &ns.name, "defects-e2e-sel", "defects").await;

    // The HPA refuses the target.
    support::wait_until(
        "the HPA's ScalingActive=False InvalidSelector",
        Duration::from_secs(60),
        || async {
            let h = hpas.get("hpa-target").await.map_err(|e| e.to_string())?;
            let conditions = h.status.and_then(|s| s.conditions).unwrap_or_default();
            match conditions.iter().find(|c| c.type_ == "ScalingActive") {
                Some(c)
                    if c.status == "False" && c.reason.as_deref() == Some("InvalidSelector") =>
                {
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    // AverageValue needs no pods: 300 over 2 replicas at 100 each → 3.
    support::wait_until("average-target at 3", Duration::from_secs(30), || async {
        let t = targets
            .get("average-target")
            .await
            .map_err(|e| e.to_string())?;
        match t.data["spec"]["replicas"].as_i64() {
            Some(3) => Ok(()),
            other => Err(format!(
                "{other:?}; log {}",
                support::log_tail(&running.log)
            )),
        }
    })
    .await;

    // Value needs the ready pods, which a target without a selector cannot give: kscale holds
    // and names the missing selector, as the HPA does.
    wait_condition(
        &policies,
        "value",
        "ScalingActive",
        "the Value policy holds naming the selector",
        Duration::from_secs(30),
        |c, s| {
            c.status == "False"
                && s.desired_replicas == Some(2)
                && s.reason.as_deref().is_some_and(|r| {
                    r.starts_with("hold 2→2") && r.contains("selector is required")
                })
        },
    )
    .await;
    let t = targets.get("value-target").await.expect("value-target");
    assert_eq!(t.data["spec"]["replicas"].as_i64(), Some(2));
    let h = targets.get("hpa-target").await.expect("hpa-target");
    assert_eq!(h.data["spec"]["replicas"].as_i64(), Some(2));
}

/// A schedule ceiling under `spec.minReplicas` (and the mirror case, a floor over
/// `spec.maxReplicas`) is refused at admission naming the field, as `validate` refuses it.
#[tokio::test]
async fn admission_refuses_a_schedule_ceiling_under_min_replicas() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    support::install_crd(&client).await;
    let ns = support::create_namespace(env, &client, "def-sched").await;
    let api: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
    for (name, schedule, needles) in [
        (
            "ceiling-under-floor",
            "{cron: '0 9 * * *', duration: 8h, maxReplicas: 1}",
            [
                "spec.schedules",
                "a schedule's maxReplicas must be at least spec.minReplicas",
            ],
        ),
        (
            "floor-over-ceiling",
            "{cron: '0 9 * * *', duration: 8h, minReplicas: 11}",
            [
                "spec.schedules",
                "a schedule's minReplicas must be at most spec.maxReplicas",
            ],
        ),
    ] {
        let mut p = policy(
            &ns.name,
            name,
            support::WEB_DEPLOYMENT,
            "sum(up)",
            "{type: AverageValue, averageValue: \"5\"}",
        );
        p.spec.min_replicas = Some(2);
        p.spec.schedules = vec![serde_yaml::from_str(schedule).expect("schedule parses")];
        let compiled = CompiledPolicy::from_resource(&p).expect_err("validate refuses it");
        assert!(
            compiled.to_string().contains("spec.schedules[0]"),
            "{compiled}"
        );
        match api.create(&PostParams::default(), &p).await {
            Ok(_) => panic!("{name}: the apiserver admitted it"),
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 422, "{name}: {e:?}");
                for needle in needles {
                    assert!(
                        e.message.contains(needle),
                        "{name}: {needle:?} not in {e:?}"
                    );
                }
            }
            Err(e) => panic!("{name}: {e}"),
        }
    }
    // At spec.minReplicas exactly, admitted.
    let mut p = policy(
        &ns.name,
        "ceiling-at-floor",
        support::WEB_DEPLOYMENT,
        "sum(up)",
        "{type: AverageValue, averageValue: \"5\"}",
    );
    p.spec.min_replicas = Some(2);
    p.spec.schedules = vec![
        serde_yaml::from_str("{cron: '0 9 * * *', duration: 8h, maxReplicas: 2}")
            .expect("schedule parses"),
    ];
    api.create(&PostParams::default(), &p)
        .await
        .expect("admitted");
}
