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

use metrics_provider::MetricsProvider;
use support::controller::wait_condition;
use support::import::{import_and_dry_run, shadow_beside};

/// An HPA `name` on Deployment `name` (1 to 8 replicas) with one metric (`metric`, the YAML
/// of an autoscaling/v2 `MetricSpec` without its type, indented for the list item) of `type_`;
/// with `down_now`, no scale-down stabilization.
fn hpa(name: &str, type_: &str, metric: &str, down_now: bool) -> String {
    let behavior = if down_now {
        "\n  behavior:\n    scaleDown: {stabilizationWindowSeconds: 0}"
    } else {
        ""
    };
    format!(
        "apiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata: {{name: {name}}}\nspec:\n  scaleTargetRef: {{apiVersion: apps/v1, kind: Deployment, name: {name}}}\n  minReplicas: 1\n  maxReplicas: 8\n  metrics:\n  - type: {type_}\n{metric}{behavior}\n---\n"
    )
}

/// One HPA per metric type on its own Deployment. Values (see [`serve`]): the Pods metric is a
/// total of 600 shared by the pods; the Object metrics are 400m and 9; the External ones are
/// two series each (750m + 750m, 5 + 2).
fn hpas() -> String {
    let object = |metric: &str, target: &str| {
        format!(
            "    object:\n      describedObject: {{apiVersion: v1, kind: Service, name: front}}\n      metric: {{name: \"{metric}\"}}\n      target: {target}"
        )
    };
    [
        hpa(
            "pods-avg",
            "Pods",
            "    pods:\n      metric: {name: http_requests, selector: {matchLabels: {verb: GET}}}\n      target: {type: AverageValue, averageValue: \"100\"}",
            false,
        ),
        hpa(
            "object-value",
            "Object",
            &object("latency_seconds", "{type: Value, value: \"1\"}"),
            true,
        ),
        hpa(
            "object-avg",
            "Object",
            &object("queue:length", "{type: AverageValue, averageValue: \"2\"}"),
            false,
        ),
        hpa(
            "external-value",
            "External",
            "    external:\n      metric: {name: error-rate}\n      target: {type: Value, value: \"2\"}",
            true,
        ),
        hpa(
            "external-avg",
            "External",
            "    external:\n      metric: {name: queue_depth, selector: {matchExpressions: [{key: queue, operator: In, values: [orders, returns]}]}}\n      target: {type: AverageValue, averageValue: \"2\"}",
            false,
        ),
    ]
    .concat()
}

/// Each HPA and where it settles (its Deployment starts at [`start`]).
/// - pods-avg: 600 over 2 pods is 300 each, 3× the target → 6; over 6 pods, 100 each: at target.
/// - object-value: 400m against 1 → ceil(0.4 × 2) = 1, and ceil(0.4 × 1) = 1.
/// - object-avg: ceil(9 / 2) = 5; 9 / (2 × 5) = 0.9 is within the tolerance.
/// - external-value: 1.5 against 2 → ceil(0.75 × 4) = 3, then ceil(0.75 × 3) = 3.
/// - external-avg: 7 / 2 → 4; 7 / (2 × 4) = 0.875 is outside the tolerance, ceil(3.5) = 4 again.
const SETTLED: [(&str, i32); 5] = [
    ("pods-avg", 6),
    ("object-value", 1),
    ("object-avg", 5),
    ("external-value", 3),
    ("external-avg", 4),
];

/// The replicas each Deployment starts with.
fn start(name: &str) -> i32 {
    if name == "external-value" { 4 } else { 2 }
}

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

    for (name, _) in SETTLED {
        support::create_kwok_deployment(&client, &ns.name, name, start(name), "100m", "50m").await;
    }
    // Every pod Ready before any HPA reads: for a Value target the HPA multiplies by the ready
    // pods, so a first sync that caught 1 of external-value's 4 ready settles at 1, not 3.
    for (name, _) in SETTLED {
        let selector = format!("app={name}");
        let count = usize::try_from(start(name)).expect("positive");
        support::wait_for_ready_pods(&client, &ns.name, &selector, count, Duration::from_secs(60))
            .await;
    }
    support::apply_yaml(&client, &ns.name, &hpas()).await;
    support::import::wait_settled(&client, &ns.name, &SETTLED).await;

    // Until now only the HPA controller has read metrics.
    let kscale_sa = format!("system:serviceaccount:{}:kscale", ns.name);
    let by_hpa = metric_requests(&provider.seen(), &ns.name, |_| true);

    // Import: each HPA becomes one policy, metric for metric, deciding as the HPA does.
    let imported = import_and_dry_run(env, &ns.name, &SETTLED);
    let source_of = |name: &str| {
        let p = imported
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
            .expect("imported");
        p.spec.metrics[0].clone()
    };
    assert!(source_of("pods-avg").pods.is_some());
    assert!(source_of("object-value").object.is_some());
    assert!(source_of("external-avg").external.is_some());

    // Shadow mode beside each HPA, as the shipped RBAC's ServiceAccount: divergence 0.
    let shadow = shadow_beside(
        env,
        &client,
        &ns.name,
        &imported,
        &SETTLED,
        "sources-shadow",
    )
    .await;
    let policies = &shadow.policies;

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
    let mut missing = imported
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("external-avg"))
        .expect("imported")
        .clone();
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
        policies,
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

    // The provider gone: its APIServices are unavailable (the aggregator answers 503, or
    // holds the request past kscale's 10s bound, depending on how the connection fails), every
    // such metric fails by name and each policy holds where it was.
    provider.stop();
    wait_condition(
        policies,
        "object-avg",
        "Ready",
        "the unavailable APIService in Ready",
        Duration::from_secs(60),
        |c, s| {
            c.status == "False"
                && c.message.contains("queue:length")
                && (c
                    .message
                    .contains("custom.metrics.k8s.io answered HTTP 503")
                    || c.message
                        .contains("custom.metrics.k8s.io: the request failed"))
                && s.desired_replicas == Some(5)
        },
    )
    .await;
}
