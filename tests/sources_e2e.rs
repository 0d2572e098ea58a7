//! Pods, Object and External metrics (issue 18, item 2) on the real control plane. A small
//! provider of our own (`support/metrics_provider.rs`) serves `custom.metrics.k8s.io/v1beta2`
//! and `external.metrics.k8s.io/v1beta1` through APIServices, so the real HPA controller and
//! kscale read the same values through kube-apiserver. For an HPA on each metric type (Object and
//! External with both `Value` and `AverageValue` targets):
//! - `kscale import` carries it one to one, and the imported policy's `kscale dry-run` decision
//!   equals the HPA's `status.desiredReplicas` once the HPA has settled;
//! - run beside its HPA in shadow mode (DryRun, as the shipped RBAC's ServiceAccount), it
//!   diverges by 0;
//! - kscale asks the provider what the HPA asks (path and selectors);
//! - a metric the provider does not serve (404) fails that metric by name, and the policy holds.

#[path = "support/metrics_provider.rs"]
mod metrics_provider;
mod support;
#[allow(dead_code)] // the forwarding tests' upstream; this file uses its HTTPS server only
#[path = "support/upstream.rs"]
mod upstream;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kscale::crd::{Mode, ScalingPolicy};
use kube::api::Api;
use metrics_provider::MetricsProvider;
use support::controller::{Lease, start_controller_with, wait_condition};
use support::import::{decision, kscale, policies_of, wait_shadow_agrees};

/// One HPA per metric type on its own Deployment. Values (see [`serve`]): the Pods metric is a
/// total of 600 shared by the pods; the Object metrics are 400m and 9; the External ones are
/// two series each (750m + 750m, 5 + 2).
const HPAS: &str = r#"
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: pods-avg}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: pods-avg}
  minReplicas: 1
  maxReplicas: 8
  metrics:
  - type: Pods
    pods:
      metric: {name: http_requests, selector: {matchLabels: {verb: GET}}}
      target: {type: AverageValue, averageValue: "100"}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: object-value}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: object-value}
  minReplicas: 1
  maxReplicas: 8
  metrics:
  - type: Object
    object:
      describedObject: {apiVersion: v1, kind: Service, name: front}
      metric: {name: latency_seconds}
      target: {type: Value, value: "1"}
  behavior:
    scaleDown: {stabilizationWindowSeconds: 0}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: object-avg}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: object-avg}
  minReplicas: 1
  maxReplicas: 8
  metrics:
  - type: Object
    object:
      describedObject: {apiVersion: v1, kind: Service, name: front}
      metric: {name: "queue:length"}
      target: {type: AverageValue, averageValue: "2"}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: external-value}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: external-value}
  minReplicas: 1
  maxReplicas: 8
  metrics:
  - type: External
    external:
      metric: {name: error-rate}
      target: {type: Value, value: "2"}
  behavior:
    scaleDown: {stabilizationWindowSeconds: 0}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: external-avg}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: external-avg}
  minReplicas: 1
  maxReplicas: 8
  metrics:
  - type: External
    external:
      metric: {name: queue_depth, selector: {matchExpressions: [{key: queue, operator: In, values: [orders, returns]}]}}
      target: {type: AverageValue, averageValue: "2"}
"#;

/// Each HPA: the replicas its Deployment starts with, and where the HPA settles.
/// - pods-avg: 600 over 2 pods is 300 each, 3× the target → 6; over 6 pods, 100 each: at target.
/// - object-value: 400m against 1 → ceil(0.4 × 2) = 1, and ceil(0.4 × 1) = 1.
/// - object-avg: ceil(9 / 2) = 5; 9 / (2 × 5) = 0.9 is within the tolerance.
/// - external-value: 1.5 against 2 → ceil(0.75 × 4) = 3, then ceil(0.75 × 3) = 3.
/// - external-avg: 7 / 2 → 4; 7 / (2 × 4) = 0.875 is outside the tolerance, ceil(3.5) = 4 again.
const SETTLED: [(&str, i32, i32); 5] = [
    ("pods-avg", 2, 6),
    ("object-value", 2, 1),
    ("object-avg", 2, 5),
    ("external-value", 4, 3),
    ("external-avg", 2, 4),
];

/// What the provider serves.
fn serve(provider: &MetricsProvider) {
    provider.set_pods_total("http_requests", 600_000);
    provider.set_object("services", "front", "latency_seconds", "400m");
    provider.set_object("services", "front", "queue:length", "9");
    provider.set_external("error-rate", &["750m", "750m"]);
    provider.set_external("queue_depth", &["5", "2"]);
}

/// A request as both clients may spell it: the decoded path, and the query's non-empty
/// parameters decoded and sorted (client-go sends an empty `metricLabelSelector=`, kscale
/// leaves it out; client-go writes a space `+`, kscale `%20`).
fn normalized(target: &str) -> (String, BTreeMap<String, String>) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        let mut out = Vec::new();
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%'
                && i + 2 < b.len()
                && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
            {
                out.push(v);
                i += 3;
                continue;
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    let params = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_string(), decode(v)))
        .collect();
    (decode(path), params)
}

/// The normalized metric requests for `namespace` of the callers `who` accepts.
fn metric_requests(
    seen: &[(String, Option<String>)],
    namespace: &str,
    who: impl Fn(&str) -> bool,
) -> BTreeSet<(String, BTreeMap<String, String>)> {
    seen.iter()
        .filter(|(target, user)| {
            target.contains(&format!("/namespaces/{namespace}/"))
                && user.as_deref().is_some_and(&who)
        })
        .map(|(target, _)| normalized(target))
        .collect()
}

#[tokio::test]
async fn pods_object_and_external_hpas_import_and_shadow_with_zero_divergence() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    support::install_crd(&client).await;
    let ns = support::create_namespace(env, &client, "sources").await;
    let log = support::repo_root().join(format!("target/sources-{}.log", std::process::id()));

    let provider = MetricsProvider::start(
        &env.kubeconfig,
        vec![
            format!("test-custom-metrics.{}.svc", ns.name),
            format!("test-external-metrics.{}.svc", ns.name),
        ],
    );
    serve(&provider);
    let _custom = support::register_api_service(
        env,
        &client,
        ("custom.metrics.k8s.io", "v1beta2"),
        (&ns.name, "test-custom-metrics", provider.addr.port()),
        &provider.ca_pem,
        &log,
    )
    .await;
    let _external = support::register_api_service(
        env,
        &client,
        ("external.metrics.k8s.io", "v1beta1"),
        (&ns.name, "test-external-metrics", provider.addr.port()),
        &provider.ca_pem,
        &log,
    )
    .await;

    for (name, start, _) in SETTLED {
        support::create_kwok_deployment(&client, &ns.name, name, start, "100m", "50m").await;
    }
    support::apply_yaml(&client, &ns.name, HPAS).await;
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns.name);
    for (name, _, want) in SETTLED {
        support::wait_hpa_settled(&hpas, name, want).await;
        support::wait_for_ready_pods(
            &client,
            &ns.name,
            &format!("app={name}"),
            usize::try_from(want).expect("positive"),
            Duration::from_secs(60),
        )
        .await;
    }

    // Until now only the HPA controller has read metrics.
    let kscale_sa = format!("system:serviceaccount:{}:kscale", ns.name);
    let by_hpa = metric_requests(&provider.seen(), &ns.name, |_| true);

    // Import: each HPA becomes one policy, metric for metric.
    let (code, stdout, stderr) = kscale(&["import", "-n", &ns.name], env);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let imported = policies_of(&stdout);
    let by_name: BTreeMap<String, &ScalingPolicy> = imported
        .iter()
        .map(|p| (p.metadata.name.clone().unwrap_or_default(), p))
        .collect();
    assert_eq!(by_name.len(), SETTLED.len(), "{stdout}");
    assert!(by_name["pods-avg"].spec.metrics[0].pods.is_some());
    assert!(by_name["object-value"].spec.metrics[0].object.is_some());
    assert!(by_name["external-avg"].spec.metrics[0].external.is_some());
    for (name, _, want) in SETTLED {
        let p = by_name[name];
        assert_eq!(p.spec.mode, Mode::DryRun);
        let (ok, text) = support::controller::dry_run(env, p, &format!("sources-{name}"));
        assert!(ok, "{text}");
        assert_eq!(
            decision(&text),
            Some(want),
            "{name}: kscale's dry-run of the imported policy against the HPA's desiredReplicas\n{text}"
        );
    }

    // Shadow mode beside each HPA, as the shipped RBAC's ServiceAccount: divergence 0.
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
    for p in &imported {
        policies
            .create(&Default::default(), p)
            .await
            .expect("an imported policy is admitted");
    }
    let (kubeconfig, _binding) = support::service_account_kubeconfig(env, &client, &ns.name).await;
    let port = support::free_port();
    let _controller = start_controller_with(
        &kubeconfig,
        &log,
        port,
        &ns.name,
        "sources-shadow",
        Some(&env.prometheus_url),
        Lease::Flag(&ns.name),
    );
    for (name, _, want) in SETTLED {
        wait_shadow_agrees(&policies, name, want).await;
    }

    // kscale asked the provider what the HPA controller asked, request for request.
    let by_kscale = metric_requests(&provider.seen(), &ns.name, |u| u == kscale_sa);
    assert_eq!(by_kscale.len(), SETTLED.len(), "{:#?}", provider.seen());
    for request in &by_kscale {
        assert!(
            by_hpa.contains(request),
            "kscale asked {request:?}, which the HPA controller never did: {by_hpa:#?}"
        );
    }

    // A metric the provider does not serve: 404, named in status; the policy holds.
    let mut missing = by_name["external-avg"].clone();
    missing.metadata.name = Some("missing".into());
    missing.metadata.annotations = None;
    if let Some(e) = missing.spec.metrics[0].external.as_mut() {
        e.metric.name = "no_such_metric".into();
    }
    policies
        .create(&Default::default(), &missing)
        .await
        .expect("admitted");
    wait_condition(
        &policies,
        "missing",
        "Ready",
        "the missing metric in Ready",
        Duration::from_secs(60),
        |c, s| {
            c.status == "False"
                && c.message.contains("no_such_metric")
                && c.message
                    .contains("external.metrics.k8s.io answered HTTP 404")
                && s.desired_replicas == Some(4)
        },
    )
    .await;
}
