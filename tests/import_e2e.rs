//! `kscale import` on the real control plane (issue 18, item 3): HPAs written in
//! `autoscaling/v1` and `v2`, with Resource and ContainerResource metrics and a `behavior`, are
//! read from the cluster and printed as ScalingPolicies whose `kscale dry-run` decisions equal
//! each HPA's `status.desiredReplicas` once the real HPA controller has settled. Run beside
//! their HPAs in shadow mode (DryRun), they diverge by 0 (status, reason, `/metrics`) and write
//! nothing. An HPA with a metric kscale cannot carry is named on standard error, field by
//! field, and left out. (`sources_e2e.rs` does the same for Pods, Object and External metrics.)

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use kscale::crd::{Mode, ScalingPolicy};
use kube::api::Api;
use support::import::{import_and_dry_run, kscale, policies_of, shadow_beside};

/// Each HPA, its target and the count it settles at. The kwok pods request 100m cpu and 64Mi
/// memory and use 50m and 32Mi (50 % each), and start at 2 replicas.
const HPAS: &str = r#"
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: cpu-v2}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: cpu-v2}
  minReplicas: 1
  maxReplicas: 6
  metrics:
  - type: Resource
    resource: {name: cpu, target: {type: Utilization, averageUtilization: 50}}
  behavior:
    scaleDown:
      stabilizationWindowSeconds: 60
      policies: [{type: Pods, value: 1, periodSeconds: 30}]
---
apiVersion: autoscaling/v1
kind: HorizontalPodAutoscaler
metadata: {name: cpu-v1}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: cpu-v1}
  minReplicas: 1
  maxReplicas: 3
  targetCPUUtilizationPercentage: 40
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: mem-container}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: mem-container}
  minReplicas: 1
  maxReplicas: 4
  metrics:
  - type: ContainerResource
    containerResource: {name: memory, container: app, target: {type: AverageValue, averageValue: 16Mi}}
"#;

/// What each HPA settles at: cpu-v2 at its target (2); cpu-v1 wants 2 × 50/40 → 3, then
/// 3 × 1.25 → 4, clipped to 3; mem-container wants 2 × 32Mi/16Mi = 4, its maximum.
const SETTLED: [(&str, i32); 3] = [("cpu-v2", 2), ("cpu-v1", 3), ("mem-container", 4)];

#[tokio::test]
async fn imported_policies_decide_as_each_hpa_and_what_cannot_be_carried_is_named() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    support::install_crd(&client).await;
    let ns = support::create_namespace(env, &client, "import").await;
    for (name, _) in SETTLED {
        support::create_kwok_deployment(&client, &ns.name, name, 2, "100m", "50m").await;
    }
    for (name, _) in SETTLED {
        support::wait_for_ready_pods(
            &client,
            &ns.name,
            &format!("app={name}"),
            2,
            Duration::from_secs(60),
        )
        .await;
    }
    support::apply_yaml(&client, &ns.name, HPAS).await;

    // The real HPA controller settles: desired = current = the Deployment's count, pods ready.
    support::import::wait_settled(&client, &ns.name, &SETTLED).await;
    let imported = import_and_dry_run(env, &ns.name, &SETTLED);
    let by_name: BTreeMap<String, &ScalingPolicy> = imported
        .iter()
        .map(|p| (p.metadata.name.clone().unwrap_or_default(), p))
        .collect();
    // The behavior is carried as it is (the apiserver filled in the HPA's defaults).
    let down = by_name["cpu-v2"]
        .spec
        .behavior
        .as_ref()
        .and_then(|b| b.scale_down.as_ref())
        .expect("scaleDown");
    assert_eq!(down.stabilization_window_seconds, Some(60));

    // Shadow mode: the imported DryRun policies run beside their HPAs and record, at every
    // evaluation, what each HPA wanted; a faithful import diverges by 0.
    let shadow = shadow_beside(env, &client, &ns.name, &imported, &SETTLED, "import-shadow").await;
    let port = shadow.port;
    let (_, metrics) =
        support::http_get(&format!("http://127.0.0.1:{port}"), "/metrics").expect("/metrics");
    for (name, want) in SETTLED {
        let labels = format!("{{namespace=\"{}\",policy=\"{name}\"}}", ns.name);
        assert!(
            metrics.contains(&format!("kscale_shadow_divergence_replicas{labels} 0")),
            "{metrics}"
        );
        assert!(
            metrics.contains(&format!(
                "kscale_shadow_hpa_desired_replicas{labels} {want}"
            )),
            "{metrics}"
        );
    }
    // The shadow report reads the period back from Prometheus, which scrapes the daemon.
    let _scraped = support::ScrapeTarget::register(
        env,
        format!("127.0.0.1:{port}").parse().expect("address"),
        &ns.name,
    );
    let from = chrono::Utc::now();
    let hpa_series = format!(
        "count_over_time(kscale_shadow_hpa_desired_replicas{{namespace=\"{}\",policy=\"cpu-v1\"}}[1m])",
        ns.name
    );
    support::wait_until(
        "10 scrapes of the shadow gauges",
        Duration::from_secs(60),
        || async {
            match support::prometheus_scalar(env, &hpa_series) {
                Ok(Some(n)) if n >= 10.0 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let to = chrono::Utc::now();
    for (name, _) in SETTLED {
        let (code, stdout, stderr) = kscale(
            &[
                "shadow-report",
                name,
                "-n",
                &ns.name,
                "--prometheus",
                &env.prometheus_url,
                "--from",
                &from.timestamp().to_string(),
                "--to",
                &to.timestamp().to_string(),
                "--step",
                "1s",
            ],
            env,
        );
        assert_eq!(code, Some(0), "{stdout}{stderr}");
        assert!(
            stdout.contains(&format!("shadow report: {}/{name} beside its HPA", ns.name)),
            "{stdout}"
        );
        assert!(stdout.contains("they agreed at every sample"), "{stdout}");
        // Equal replica-hours over the samples both series have.
        let row = stdout
            .lines()
            .find(|l| l.starts_with("replica-hours"))
            .expect("replica-hours row");
        let cells: Vec<&str> = row.split_whitespace().skip(1).collect();
        assert_eq!(cells.len(), 2, "{row}");
        assert_eq!(cells[0], cells[1], "{stdout}");
    }

    // Nothing was written: every target is where its HPA put it.
    for (name, want) in SETTLED {
        let d: Api<k8s_openapi::api::apps::v1::Deployment> =
            Api::namespaced(client.clone(), &ns.name);
        assert_eq!(support::replicas_of(&d, name).await, want);
    }

    // An HPA kscale cannot carry: named field by field, left out; the others still printed.
    support::apply_yaml(
        &client,
        &ns.name,
        r#"
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: queue}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: queue-worker}
  maxReplicas: 5
  metrics:
  - type: Resource
    resource: {name: ephemeral-storage, target: {type: AverageValue, averageValue: 1Gi}}
"#,
    )
    .await;
    let (code, stdout, stderr) = kscale(&["import", "-n", &ns.name, "--mode", "Controller"], env);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "not imported: {}/queue: spec.metrics[0].resource.name: resource \"ephemeral-storage\": kscale reads cpu and memory only",
            ns.name
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("1 of 4 HorizontalPodAutoscalers not imported"),
        "{stderr}"
    );
    let imported = policies_of(&stdout);
    assert_eq!(imported.len(), 3, "{stdout}");
    assert!(imported.iter().all(|p| p.spec.mode == Mode::Controller));
}
