//! `spec.takeover` on the real control plane, with the real HPA controller (issue 18, item 5):
//! a Controller policy takes a Deployment over from the HPA that drives it, under load.
//! - `Disable`: the HPA is left inert (both directions Disabled, bounds 1 and 2147483647, its
//!   settings in `kscale.dev/restore-patch`). The policy ran in shadow mode first, so its own
//!   history already says 1 where the HPA ran 4; still no replica count changes at the
//!   handover, and nothing scales down before the policy's scale-down window has passed since
//!   the takeover, then it does; the hand-back (the restore patch applied as the README says)
//!   gives the HPA its settings back.
//! - `Delete`: the HPA is deleted and the count stays.
//! - A takeover waits for valid metrics: while db's query returns nothing, its HPA keeps
//!   driving it and the policy's `Ready` says `TakeoverPending`; once the metric is there, the
//!   takeover happens.
//! - Admission refuses `spec.takeover` outside mode Controller, naming the field.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kscale::crd::ScalingPolicy;
use kube::api::{Api, Patch, PatchParams, PostParams};

const WINDOW_S: i64 = 20;

fn hpa_yaml(name: &str, utilization: i32, max: i32) -> String {
    format!(
        r#"
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {{name: {name}-cpu}}
spec:
  scaleTargetRef: {{apiVersion: apps/v1, kind: Deployment, name: {name}}}
  minReplicas: 1
  maxReplicas: {max}
  metrics:
  - type: Resource
    resource: {{name: cpu, target: {{type: Utilization, averageUtilization: {utilization}}}}}
"#
    )
}

fn policy(ns: &str, name: &str, query: &str, action: &str) -> ScalingPolicy {
    support::scaling_policy(
        ns,
        name,
        &format!("{{apiVersion: apps/v1, kind: Deployment, name: {name}}}"),
        &format!(
            r#"  minReplicas: 1
  maxReplicas: 10
  interval: 1s
  takeover: {{hpa: {name}-cpu, action: {action}}}
  metrics:
{}  behavior:
    scaleDown:
      stabilizationWindowSeconds: {WINDOW_S}
"#,
            support::controller::metric_yaml("queue", query)
        ),
    )
}

#[tokio::test]
async fn a_policy_takes_over_from_an_hpa_without_a_jump_and_hands_back() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    support::install_crd(&client).await;
    let ns = support::create_namespace(env, &client, "takeover").await;
    // web: 50 % cpu against a 25 % target, so its HPA runs it at its maximum, 4. api: at its
    // 50 % target, 2.
    support::create_kwok_deployment(&client, &ns.name, "web", 2, "100m", "50m").await;
    support::create_kwok_deployment(&client, &ns.name, "api", 2, "100m", "50m").await;
    support::create_kwok_deployment(&client, &ns.name, "db", 2, "100m", "50m").await;
    support::apply_yaml(&client, &ns.name, &hpa_yaml("web", 25, 4)).await;
    support::apply_yaml(&client, &ns.name, &hpa_yaml("api", 50, 4)).await;
    support::apply_yaml(&client, &ns.name, &hpa_yaml("db", 50, 4)).await;
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns.name);
    support::wait_hpa_settled(&hpas, "web-cpu", 4).await;
    support::wait_hpa_settled(&hpas, "api-cpu", 2).await;
    support::wait_hpa_settled(&hpas, "db-cpu", 2).await;
    support::wait_for_ready_pods(&client, &ns.name, "app=web", 4, Duration::from_secs(60)).await;

    // The load kscale scales on, at 5 per replica: web's 5 wants 1 replica where its HPA runs 4,
    // so without the takeover's full window the first decision would jump from 4 to 1; api's 10
    // wants the 2 its HPA runs.
    let exporter = support::TestExporter::start(env, &ns.name);
    exporter.set("kscale_takeover_queue", &[("app", "web")], 5.0);
    exporter.set("kscale_takeover_queue", &[("app", "api")], 10.0);
    let query = |app: &str| {
        format!(
            "sum(kscale_takeover_queue{{exporter=\"{}\",app=\"{app}\"}})",
            exporter.id
        )
    };
    support::wait_prometheus_value(env, &query("web"), 5.0).await;
    support::wait_prometheus_value(env, &query("api"), 10.0).await;

    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
    // Admission: a takeover is for a writer only.
    let mut dry = policy(&ns.name, "dry", &query("web"), "Disable");
    dry.spec.mode = kscale::crd::Mode::DryRun;
    let refused = policies.create(&PostParams::default(), &dry).await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains("spec.takeover needs mode Controller")),
        "{refused:?}"
    );

    // web first runs beside its HPA in shadow mode (DryRun, no takeover), as an adopter would,
    // until its own history says 1: the window that history fills is what a takeover must not
    // trust, since the HPA ran 4 all along.
    let mut shadow = policy(&ns.name, "web", &query("web"), "Disable");
    shadow.spec.mode = kscale::crd::Mode::DryRun;
    shadow.spec.takeover = None;
    policies
        .create(&PostParams::default(), &shadow)
        .await
        .expect("web in shadow mode");
    policies
        .create(
            &PostParams::default(),
            &policy(&ns.name, "api", &query("api"), "Delete"),
        )
        .await
        .expect("api created");
    // db's metric is not exported yet: its query returns nothing.
    policies
        .create(
            &PostParams::default(),
            &policy(&ns.name, "db", &query("db"), "Delete"),
        )
        .await
        .expect("db created");
    // What the chart's takeover=true adds to kscale's grants.
    support::apply_yaml(
        &client,
        &ns.name,
        &format!(
            r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: kscale-takeover}}
rules:
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, list, watch, patch, delete]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: kscale-takeover}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: kscale-takeover}}
subjects:
- {{kind: ServiceAccount, name: kscale, namespace: {}}}
"#,
            ns.name
        ),
    )
    .await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let running =
        support::controller::run_controller(env, &client, &ns.name, "takeover", "takeover").await;
    support::wait_until(
        "web's shadow history at 1",
        Duration::from_secs(60),
        || async {
            let p = policies.get("web").await.map_err(|e| e.to_string())?;
            let s = p.status.ok_or("no status")?;
            match (s.desired_replicas, s.shadow.map(|x| x.hpa_desired_replicas)) {
                (Some(1), Some(4)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    // Then the takeover: mode Controller, spec.takeover.
    policies
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {
                "mode": "Controller",
                "takeover": {"hpa": "web-cpu", "action": "Disable"},
            }})),
        )
        .await
        .expect("web takes over");

    // The handover: status.takeover recorded, and no count moved meanwhile.
    let started = Instant::now();
    let mut taken = Vec::new();
    for (name, want) in [("web", 4), ("api", 2)] {
        let t = support::wait_until(
            &format!("{name}'s takeover"),
            Duration::from_secs(30),
            || async {
                assert_eq!(
                    support::replicas_of(&deployments, name).await,
                    want,
                    "{name}'s count moved at the handover; {}",
                    support::log_tail(&running.log)
                );
                let p = policies.get(name).await.map_err(|e| e.to_string())?;
                p.status
                    .and_then(|s| s.takeover)
                    .ok_or_else(|| "no status.takeover yet".to_string())
            },
        )
        .await;
        assert_eq!(
            (t.hpa.as_str(), t.replicas),
            (&*format!("{name}-cpu"), want)
        );
        taken.push(t);
    }
    assert_eq!(taken[0].action, "Disable");
    assert_eq!(taken[1].action, "Delete");
    // A few more intervals: still no move.
    while started.elapsed() < Duration::from_secs(5) {
        assert_eq!(support::replicas_of(&deployments, "web").await, 4);
        assert_eq!(support::replicas_of(&deployments, "api").await, 2);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // db: no valid metric, so no takeover; its HPA stays and still drives it.
    let db = policies.get("db").await.expect("db");
    let status = db.status.expect("db's status");
    assert!(status.takeover.is_none(), "{:?}", status.takeover);
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert_eq!(ready.reason, "TakeoverPending", "{}", ready.message);
    assert!(
        ready
            .message
            .contains("takeover of HPA db-cpu waits: metric queue is missing"),
        "{}",
        ready.message
    );
    assert!(hpas.get_opt("db-cpu").await.expect("get").is_some());
    // Once the metric is there, the takeover goes ahead, from the HPA's 2.
    exporter.set("kscale_takeover_queue", &[("app", "db")], 10.0);
    let t = support::wait_until("db's takeover", Duration::from_secs(60), || async {
        let p = policies.get("db").await.map_err(|e| e.to_string())?;
        p.status
            .and_then(|s| s.takeover)
            .ok_or_else(|| "no status.takeover yet".to_string())
    })
    .await;
    assert_eq!(
        (t.hpa.as_str(), t.action.as_str(), t.replicas),
        ("db-cpu", "Delete", 2)
    );
    assert!(hpas.get_opt("db-cpu").await.expect("get").is_none());
    assert_eq!(support::replicas_of(&deployments, "db").await, 2);

    // Disable: the HPA is inert and keeps its settings for the hand-back; Delete: it is gone.
    let web_hpa = hpas.get("web-cpu").await.expect("the disabled HPA stays");
    assert!(kscale::actuate::is_inert(&web_hpa), "{:?}", web_hpa.spec);
    let annotations = web_hpa.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations
            .get("kscale.dev/taken-over-by")
            .map(String::as_str),
        Some(&*format!("{}/web", ns.name))
    );
    let restore = annotations
        .get("kscale.dev/restore-patch")
        .expect("the restore patch")
        .clone();
    assert!(
        hpas.get_opt("api-cpu").await.expect("get").is_none(),
        "the deleted HPA"
    );
    support::controller::wait_event(
        &client,
        &ns.name,
        "a TakenOver event",
        Duration::from_secs(20),
        |e| {
            e.reason.as_deref() == Some("TakenOver")
                && e.note.as_deref().is_some_and(|n| {
                    n.starts_with(
                        "took over from HPA web-cpu (disabled it), carrying on from 4 replicas",
                    )
                })
        },
    )
    .await;

    // Nothing scales down before the window has passed since the takeover, then it does.
    let moved = support::wait_until(
        "web scaled down after the window",
        Duration::from_secs(90),
        || async {
            match support::replicas_of(&deployments, "web").await {
                4 => Err("still 4".to_string()),
                n => Ok((chrono::Utc::now(), n)),
            }
        },
    )
    .await;
    let after = moved.0 - taken[0].time;
    assert!(
        after >= chrono::TimeDelta::seconds(WINDOW_S - 1),
        "web went to {} only {after} after the takeover; the window is {WINDOW_S} s\n{}",
        moved.1,
        support::log_tail(&running.log)
    );
    assert!(moved.1 < 4);

    // The hand-back: kscale stops writing (DryRun), and the restore patch gives the HPA back.
    policies
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"mode": "DryRun", "takeover": null}})),
        )
        .await
        .expect("policy to DryRun");
    let restore: serde_json::Value = serde_json::from_str(&restore).expect("JSON merge patch");
    hpas.patch("web-cpu", &PatchParams::default(), &Patch::Merge(&restore))
        .await
        .expect("the restore patch applies");
    let back = hpas.get("web-cpu").await.expect("HPA");
    assert_eq!(
        (back.spec.min_replicas, back.spec.max_replicas),
        (Some(1), 4)
    );
    assert!(!kscale::actuate::is_inert(&back));
    let annotations = back.metadata.annotations.unwrap_or_default();
    assert!(!annotations.contains_key("kscale.dev/restore-patch"));
    assert!(!annotations.contains_key("kscale.dev/taken-over-by"));
}
