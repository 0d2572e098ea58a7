//! The frictions a new user met walking through the scalable-backend example (issue 16, item 5),
//! on the real control plane: each silent failure is now said at once, naming what to change.
//! - A daemon without a default Prometheus starts, warns (log, `/readyz`, a metric), and each
//!   policy that needs one reports `Ready=False` naming the setting, with one Warning event.
//! - An HPA on a Controller policy's target is reported at the first evaluation (condition and
//!   one Warning event), although kscale never wants to write, and `kscale dry-run` says it.
//! - The leader-election Lease defaults to the daemon's own namespace (`POD_NAMESPACE`); a Lease
//!   the chart's RBAC forbids is reported once, naming the flag, not every renewal.

mod support;

use std::time::Duration;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};
use support::controller::{Lease, Scenario, start_controller_with, wait_condition, wait_event};

/// The Events of `reason` about policy `name` in `namespace`.
async fn events_of(client: &kube::Client, namespace: &str, name: &str, reason: &str) -> Vec<Event> {
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    events
        .list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
        .collect()
}

/// How many times the series of `e` happened (a deduplicated Event counts its repeats).
fn occurrences(e: &Event) -> i32 {
    e.series.as_ref().map_or(1, |s| s.count) + e.deprecated_count.unwrap_or(0).max(0)
}

#[tokio::test]
async fn without_a_default_prometheus_the_daemon_warns_and_the_policy_names_the_setting() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    // 10 / 5 per replica = 2 replicas, if the metric could be read.
    let sc = Scenario::start(env, &client, "walk-noprom", 10.0, 0).await;
    let ns = &sc.ns.name;
    let (kubeconfig, _binding) = support::service_account_kubeconfig(env, &client, ns).await;
    let log = support::repo_root().join(format!("target/walk-noprom-{}.log", std::process::id()));
    let port = support::free_port();
    let admin = format!("http://127.0.0.1:{port}");
    let _controller = start_controller_with(
        &kubeconfig,
        &log,
        port,
        ns,
        "walk-noprom",
        None,
        Lease::Flag(ns),
    );

    wait_condition(
        &sc.policies,
        "web",
        "Ready",
        "Ready=False naming the missing default Prometheus",
        Duration::from_secs(30),
        |c, _| {
            c.status == "False"
                && c.reason == "MetricsUnavailable"
                && c.message.contains("metric queue is error")
                && c.message.contains("--prometheus-url")
                && c.message.contains("prometheus.url")
        },
    )
    .await;
    wait_event(
        &client,
        ns,
        "a FailedGetExternalMetric Warning naming the flag",
        Duration::from_secs(20),
        |e| {
            e.reason.as_deref() == Some("FailedGetExternalMetric")
                && e.type_.as_deref() == Some("Warning")
                && e.note
                    .as_deref()
                    .is_some_and(|n| n.contains("--prometheus-url"))
        },
    )
    .await;

    // Ready, with the warning: the daemon works (resource metrics, policies' own servers).
    let (code, body) = support::http_get(&admin, "/readyz").expect("/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.starts_with("ok\n") && body.contains("warning: no default Prometheus"),
        "{body}"
    );
    assert!(body.contains("KSCALE_PROMETHEUS_URL"), "{body}");
    let (_, metrics) = support::http_get(&admin, "/metrics").expect("/metrics");
    assert!(
        metrics.contains("kscale_default_prometheus_configured 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "kscale_policy_ready{{namespace=\"{ns}\",policy=\"web\"}} 0"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "kscale_source_errors_total{{namespace=\"{ns}\",policy=\"web\",server=\"default\",source=\"prometheus\",kind=\"error\"}}"
        )),
        "{metrics}"
    );
    let text = std::fs::read_to_string(&log).expect("daemon log");
    assert!(
        text.contains("no default Prometheus is configured"),
        "the start-up warning: {}",
        support::log_tail(&log)
    );

    // Many intervals later (1 s each): still one Warning, and the target untouched.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let warnings = events_of(&client, ns, "web", "FailedGetExternalMetric").await;
    assert_eq!(
        warnings.iter().map(occurrences).sum::<i32>(),
        1,
        "one Warning for a lasting failure: {warnings:?}"
    );
    assert_eq!(support::replicas(&sc.deployments).await, 2);
}

#[tokio::test]
async fn an_hpa_on_the_target_is_reported_at_the_first_evaluation_and_by_dry_run() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    // 10 / 5 per replica = 2: kscale never wants to write, so only the early check can see it.
    let sc = Scenario::start(env, &client, "walk-hpa", 10.0, 0).await;
    sc.wait_visible(env, 10.0).await;
    let ns = &sc.ns.name;
    let hpa: HorizontalPodAutoscaler = serde_yaml::from_str(
        "metadata: {name: web-cpu}\nspec:\n  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: web}\n  minReplicas: 2\n  maxReplicas: 2\n  metrics:\n  - type: Resource\n    resource: {name: cpu, target: {type: Utilization, averageUtilization: 50}}\n",
    )
    .expect("HPA");
    Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &hpa)
        .await
        .expect("HPA created");

    // dry-run says it, though nothing would be written.
    let mut dry = sc.policy.clone();
    dry.metadata.name = Some("web-dry".into());
    let (ok, text) = support::controller::dry_run(env, &dry, "walk-hpa-dry");
    assert!(ok, "{text}");
    assert!(
        text.contains("condition Ready            false ConflictingHPA"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "conflict  Deployment {ns}/web is also driven by HorizontalPodAutoscaler web-cpu"
        )),
        "{text}"
    );
    assert!(
        text.contains("decision  2 replicas (dry run: nothing written)"),
        "{text}"
    );

    let running =
        support::controller::run_controller(env, &client, ns, "walk-hpa", "walk-hpa").await;
    wait_condition(
        &sc.policies,
        "web",
        "Ready",
        "Ready=False ConflictingHPA at the first evaluation",
        Duration::from_secs(20),
        |c, s| {
            c.status == "False"
                && c.reason == "ConflictingHPA"
                && c.message.contains("HorizontalPodAutoscaler web-cpu")
                && s.desired_replicas == Some(2)
        },
    )
    .await;
    wait_event(
        &client,
        ns,
        "a ConflictingHPA Warning",
        Duration::from_secs(20),
        |e| e.reason.as_deref() == Some("ConflictingHPA") && e.type_.as_deref() == Some("Warning"),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let warnings = events_of(&client, ns, "web", "ConflictingHPA").await;
    assert_eq!(
        warnings.iter().map(occurrences).sum::<i32>(),
        1,
        "one Warning while the conflict lasts: {warnings:?}\n{}",
        support::log_tail(&running.log)
    );

    // The HPA goes: the policy is Ready at its next evaluation.
    Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), ns)
        .delete("web-cpu", &Default::default())
        .await
        .expect("HPA deleted");
    wait_condition(
        &sc.policies,
        "web",
        "Ready",
        "Ready=True once the HPA is gone",
        Duration::from_secs(20),
        |c, _| c.status == "True" && c.reason == "Evaluated",
    )
    .await;
}

#[tokio::test]
async fn the_lease_defaults_to_the_daemons_namespace_and_a_forbidden_one_names_the_flag_once() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    let sc = Scenario::start(env, &client, "walk-lease", 10.0, 0).await;
    let ns = &sc.ns.name;
    let (kubeconfig, _binding) = support::service_account_kubeconfig(env, &client, ns).await;

    // The Lease in `default`, which the chart's RBAC does not grant: said once, naming the flag.
    let log = support::repo_root().join(format!("target/walk-lease-{}.log", std::process::id()));
    let forbidden = start_controller_with(
        &kubeconfig,
        &log,
        support::free_port(),
        ns,
        "walk-lease",
        Some(&env.prometheus_url),
        Lease::Flag("default"),
    );
    support::wait_until(
        "the Lease refusal in the log",
        Duration::from_secs(20),
        || async {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("lease update failed") {
                Ok(())
            } else {
                Err(support::log_tail(&log))
            }
        },
    )
    .await;
    // At least four more renewals (1 s each) fail the same way.
    tokio::time::sleep(Duration::from_secs(5)).await;
    drop(forbidden);
    let text = std::fs::read_to_string(&log).expect("daemon log");
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("lease update failed"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", support::log_tail(&log));
    assert!(
        warnings[0].contains("--leader-election-namespace")
            && warnings[0].contains("POD_NAMESPACE")
            && warnings[0].contains("namespace default"),
        "{}",
        warnings[0]
    );
    assert!(
        text.matches("lease update failed again").count() >= 3,
        "the repeats go to debug: {}",
        support::log_tail(&log)
    );

    // No flag: POD_NAMESPACE (the chart's downward API) puts the Lease in the daemon's own
    // namespace, where the chart grants it; the daemon leads and scales.
    let log =
        support::repo_root().join(format!("target/walk-lease-own-{}.log", std::process::id()));
    let _controller = start_controller_with(
        &kubeconfig,
        &log,
        support::free_port(),
        ns,
        "walk-lease-own",
        Some(&env.prometheus_url),
        Lease::PodNamespace(ns),
    );
    wait_condition(
        &sc.policies,
        "web",
        "Ready",
        "Ready=True: the daemon leads from its own namespace",
        Duration::from_secs(30),
        |c, _| c.status == "True",
    )
    .await;
    let lease = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), ns)
        .get("kscale-leader")
        .await
        .expect("the Lease in the daemon's namespace");
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("walk-lease-own")
    );
}
