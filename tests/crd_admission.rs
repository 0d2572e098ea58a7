//! The ScalingPolicy CRD on a real kube-apiserver: it installs, the examples are admitted, and
//! the CEL and OpenAPI rules reject bad policies with messages naming the field.

mod support;

use std::time::Duration;

use kscale::crd::ScalingPolicy;
use kscale::model::{Observation, Sample};
use kscale::policy::{CompiledPolicy, PolicyState, evaluate};
use kube::api::{Api, Patch, PatchParams, PostParams};

fn example(path: &str, namespace: &str) -> ScalingPolicy {
    let text = std::fs::read_to_string(support::repo_root().join(path)).expect("example exists");
    let mut p: ScalingPolicy = serde_yaml::from_str(&text).expect("example parses");
    p.metadata.namespace = Some(namespace.to_string());
    p
}

/// Creates a policy, retrying while the new resource is not yet served (discovery lag).
async fn create(api: &Api<ScalingPolicy>, p: &ScalingPolicy) -> Result<ScalingPolicy, kube::Error> {
    let mut tries = 0;
    loop {
        match api.create(&PostParams::default(), p).await {
            Err(kube::Error::Api(e)) if e.code == 404 && tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

#[tokio::test]
async fn crd_installs_and_admits_the_examples() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    support::install_crd(&client).await;
    let ns = support::create_namespace(env, &client, "crd-ok").await;
    let api: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
    for path in [
        "examples/backend-hpa-cpu.yaml",
        "examples/backend-rps.yaml",
        "examples/backend-rich.yaml",
        "examples/backend-forecast.yaml",
        "examples/worker-queue-zero.yaml",
    ] {
        let p = example(path, &ns.name);
        create(&api, &p)
            .await
            .unwrap_or_else(|e| panic!("{path} was rejected: {e}"));
    }

    // The status subresource takes what the evaluator reports, history included.
    let p = example("examples/backend-rps.yaml", &ns.name);
    let policy = CompiledPolicy::from_resource(&p).expect("valid");
    let now = chrono::Utc::now();
    let obs = Observation::steady(
        3,
        vec![Sample::Series {
            values: vec![450.0],
            timestamp: now,
        }],
    );
    let mut decision = evaluate(&policy, &obs, &PolicyState::default(), now);
    decision.record_applied(&policy, now);
    let status = kscale::status::status_from_decision(&policy, &decision, None, Some(1), now);
    let patched = api
        .patch_status(
            "backend",
            &PatchParams::apply("kscale-tests").force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "kscale.dev/v1alpha1", "kind": "ScalingPolicy", "status": status
            })),
        )
        .await
        .unwrap_or_else(|e| panic!("status rejected: {e}"));
    let got = patched.status.expect("status stored");
    assert_eq!(got.desired_replicas, Some(decision.replicas));
    assert_eq!(
        got.history, decision.state,
        "recommendation history survives the round trip"
    );
}

#[tokio::test]
async fn admission_rejects_bad_policies_naming_the_field() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    support::install_crd(&client).await;
    let ns = support::create_namespace(env, &client, "crd-bad").await;
    let api: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
    let base = example("examples/backend-rps.yaml", &ns.name);

    let cases: Vec<(&str, Mutation, &[&str])> = vec![
        (
            "min-above-max",
            |p| {
                p.spec.min_replicas = Some(5);
                p.spec.max_replicas = 2;
            },
            &["spec.maxReplicas", "must be at least spec.minReplicas"],
        ),
        (
            "unknown-target-type",
            |p| p.spec.metrics[0].target.type_ = "Sometimes".into(),
            &[
                "spec.metrics[0].target.type",
                "must be one of Value, AverageValue, Utilization",
            ],
        ),
        (
            "two-sources",
            |p| {
                p.spec.metrics[0].resource = Some(kscale::crd::ResourceSource {
                    name: "cpu".into(),
                    container: None,
                })
            },
            &[
                "spec.metrics[0]",
                "exactly one of prometheus, resource, pods, object or external",
            ],
        ),
        (
            "duplicate-names",
            |p| {
                let m = p.spec.metrics[0].clone();
                p.spec.metrics.push(m);
            },
            &["spec.metrics", "metric names must be unique"],
        ),
        (
            "bad-interval",
            |p| p.spec.interval = Some("soon".into()),
            &["spec.interval"],
        ),
        (
            "bad-metric-name",
            |p| p.spec.metrics[0].name = "Requests-Per-Second".into(),
            &["spec.metrics[0].name"],
        ),
        (
            "utilization-on-prometheus",
            |p| {
                p.spec.metrics[0].target.type_ = "Utilization".into();
                p.spec.metrics[0].target.average_utilization = Some(50);
            },
            &["target.type Utilization is only valid for resource metrics"],
        ),
        (
            "fallback-replicas-missing",
            |p| {
                p.spec.fallback = Some(kscale::crd::FallbackSpec {
                    stale_after: None,
                    on_failure: Some(kscale::crd::OnFailure::Replicas),
                    replicas: None,
                    failure_threshold: None,
                })
            },
            &[
                "spec.fallback.replicas",
                "required when onFailure is Replicas",
            ],
        ),
        (
            "policy-prometheus-not-http",
            |p| {
                p.spec.prometheus = Some(kscale::crd::PrometheusServer {
                    url: "file:///etc/passwd".into(),
                    secret_ref: None,
                    headers: Vec::new(),
                    timeout: None,
                })
            },
            &["spec.prometheus.url", "must start with http:// or https://"],
        ),
        (
            "policy-prometheus-bad-header",
            |p| {
                p.spec.prometheus = Some(kscale::crd::PrometheusServer {
                    url: "http://prometheus:9090".into(),
                    secret_ref: None,
                    headers: vec![kscale::crd::HttpHeader {
                        name: "Bad Header".into(),
                        value: "v".into(),
                    }],
                    timeout: None,
                })
            },
            &["spec.prometheus.headers[0].name"],
        ),
        (
            "forecast-seasonality-on-trend",
            |p| {
                p.spec.forecast = Some(kscale::crd::ForecastSpec {
                    model: Some(kscale::crd::ForecastModel::Trend),
                    seasonality: Some(kscale::crd::Seasonality::Weekly),
                    ..Default::default()
                })
            },
            &[
                "spec.forecast.seasonality",
                "only applies to the HoltWinters model",
            ],
        ),
        (
            "forecast-confidence-out-of-range",
            |p| {
                p.spec.forecast = Some(kscale::crd::ForecastSpec {
                    confidence: Some(30.0),
                    ..Default::default()
                })
            },
            &["spec.forecast.confidence"],
        ),
        (
            "forecast-min-headroom-negative",
            |p| {
                p.spec.forecast = Some(kscale::crd::ForecastSpec {
                    min_headroom: Some(-0.5),
                    ..Default::default()
                })
            },
            &["spec.forecast.minHeadroom"],
        ),
    ];
    expect_rejections(&api, &base, cases).await;
}

/// A metrics-API metric named `name`, for the admission cases below.
fn api_metric(name: &str) -> kscale::crd::MetricIdentifier {
    kscale::crd::MetricIdentifier {
        name: name.into(),
        selector: None,
    }
}

/// `metrics[0]` of `p` turned from a prometheus metric into a metrics-API one.
fn to_external(p: &mut ScalingPolicy, name: &str) {
    p.spec.metrics[0].prometheus = None;
    p.spec.metrics[0].external = Some(kscale::crd::ExternalMetricSource {
        metric: api_metric(name),
    });
}

#[tokio::test]
async fn admission_checks_the_metrics_api_sources() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    support::install_crd(&client).await;
    let ns = support::create_namespace(env, &client, "crd-sources").await;
    let api: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
    let base = example("examples/backend-rps.yaml", &ns.name);

    // Each source, with the target types it takes, is admitted.
    let mut ok = base.clone();
    ok.metadata.name = Some("sources-ok".into());
    let mut pods = ok.spec.metrics[0].clone();
    pods.name = "per_pod".into();
    pods.prometheus = None;
    pods.pods = Some(kscale::crd::PodsMetricSource {
        metric: kscale::crd::MetricIdentifier {
            name: "http_requests".into(),
            selector: Some(
                serde_json::from_value(serde_json::json!({"matchLabels": {"verb": "GET"}}))
                    .unwrap(),
            ),
        },
    });
    let mut object = ok.spec.metrics[0].clone();
    object.name = "hits".into();
    object.prometheus = None;
    object.target.type_ = "Value".into();
    object.target.value = object.target.average_value.take();
    object.object = Some(kscale::crd::ObjectMetricSource {
        described_object: k8s_openapi::api::autoscaling::v2::CrossVersionObjectReference {
            api_version: Some("networking.k8s.io/v1".into()),
            kind: "Ingress".into(),
            name: "main".into(),
        },
        metric: api_metric("requests-per-second"),
    });
    to_external(&mut ok, "queue:depth");
    ok.spec.metrics.extend([pods, object]);
    CompiledPolicy::from_resource(&ok).expect("kscale validate accepts it too");
    create(&api, &ok).await.unwrap_or_else(|e| {
        panic!("a policy with pods, object and external metrics was rejected: {e}")
    });

    let cases: Vec<(&str, Mutation, &[&str])> = vec![
        (
            "pods-value-target",
            |p| {
                p.spec.metrics[0].prometheus = None;
                p.spec.metrics[0].pods = Some(kscale::crd::PodsMetricSource {
                    metric: api_metric("rps"),
                });
                p.spec.metrics[0].target.type_ = "Value".into();
                p.spec.metrics[0].target.value = Some(
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity("1".into()),
                );
            },
            &[
                "spec.metrics[0].target.type",
                "pods metrics take an AverageValue target",
            ],
        ),
        (
            "external-utilization",
            |p| {
                to_external(p, "queue");
                p.spec.metrics[0].target.type_ = "Utilization".into();
                p.spec.metrics[0].target.average_utilization = Some(50);
            },
            &["target.type Utilization is only valid for resource metrics"],
        ),
        (
            "external-and-prometheus",
            |p| {
                p.spec.metrics[0].external = Some(kscale::crd::ExternalMetricSource {
                    metric: api_metric("queue"),
                })
            },
            &[
                "spec.metrics[0]",
                "exactly one of prometheus, resource, pods, object or external",
            ],
        ),
        (
            "metric-name-with-slash",
            |p| to_external(p, "../../secrets"),
            &["spec.metrics[0].external.metric.name"],
        ),
        (
            "metric-name-dot-dot",
            |p| to_external(p, ".."),
            &[
                "spec.metrics[0].external.metric.name",
                "must not be . or ..",
            ],
        ),
        (
            "object-without-described-object-name",
            |p| {
                p.spec.metrics[0].prometheus = None;
                p.spec.metrics[0].object = Some(kscale::crd::ObjectMetricSource {
                    described_object: Default::default(),
                    metric: api_metric("hits"),
                });
            },
            &["spec.metrics[0].object.describedObject"],
        ),
    ];
    expect_rejections(&api, &base, cases).await;
}

type Mutation = fn(&mut ScalingPolicy);

/// Creates `base` changed by each case's mutation, and checks the apiserver refuses it (422)
/// with every needle in its message.
async fn expect_rejections(
    api: &Api<ScalingPolicy>,
    base: &ScalingPolicy,
    cases: Vec<(&str, Mutation, &[&str])>,
) {
    for (name, mutate, needles) in cases {
        let mut p = base.clone();
        p.metadata.name = Some(name.to_string());
        mutate(&mut p);
        match create(api, &p).await {
            Ok(_) => panic!("{name}: the apiserver admitted an invalid policy"),
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 422, "{name}: {e:?}");
                for needle in needles {
                    assert!(
                        e.message.contains(needle),
                        "{name}: {:?} not in {:?}",
                        needle,
                        e.message
                    );
                }
            }
            Err(e) => panic!("{name}: unexpected error {e}"),
        }
    }
}

/// Creates `base` changed by each case's mutation, and checks both `kscale validate`
/// (`policy/compile.rs`) and the apiserver accept it.
async fn expect_admitted(
    api: &Api<ScalingPolicy>,
    base: &ScalingPolicy,
    cases: Vec<(&str, Mutation)>,
) {
    for (name, mutate) in cases {
        let mut p = base.clone();
        p.metadata.name = Some(name.to_string());
        mutate(&mut p);
        CompiledPolicy::from_resource(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
        create(api, &p)
            .await
            .unwrap_or_else(|e| panic!("{name} was rejected: {e}"));
    }
}

/// Issue 15: the pause fields and `fallback.failureThreshold` at admission, the same checks as
/// `kscale validate` (`policy/compile.rs`).
#[tokio::test]
async fn admission_checks_the_pause_fields_and_the_failure_threshold() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    support::install_crd(&client).await;
    let ns = support::create_namespace(env, &client, "crd-pause").await;
    let api: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
    // minReplicas 3, maxReplicas 10.
    let base = example("examples/backend-rps.yaml", &ns.name);
    fn threshold(p: &mut ScalingPolicy, n: i32) {
        if let Some(f) = p.spec.fallback.as_mut() {
            f.failure_threshold = Some(n);
        }
    }
    let cases: Vec<(&str, Mutation, &[&str])> = vec![
        (
            "pin-and-pause",
            |p| {
                p.spec.paused_replicas = Some(5);
                p.spec.paused = Some(true);
            },
            &["spec.pausedReplicas", "cannot be combined with spec.paused"],
        ),
        (
            "pin-and-freeze",
            |p| {
                p.spec.paused_replicas = Some(5);
                p.spec.paused_scale_out = Some(true);
            },
            &["spec.pausedReplicas", "cannot be combined"],
        ),
        (
            "pin-above-max",
            |p| p.spec.paused_replicas = Some(11),
            &[
                "spec.pausedReplicas",
                "must be within [spec.minReplicas, spec.maxReplicas]",
            ],
        ),
        (
            "pin-below-min",
            |p| p.spec.paused_replicas = Some(2),
            &[
                "spec.pausedReplicas",
                "must be within [spec.minReplicas, spec.maxReplicas]",
            ],
        ),
        (
            "pin-negative",
            |p| p.spec.paused_replicas = Some(-1),
            &["spec.pausedReplicas"],
        ),
        (
            "failure-threshold-zero",
            |p| threshold(p, 0),
            &["spec.fallback.failureThreshold"],
        ),
        (
            "failure-threshold-too-large",
            |p| threshold(p, 1001),
            &["spec.fallback.failureThreshold"],
        ),
    ];
    // kscale validate refuses each too, naming the same field.
    for (name, mutate, needles) in &cases {
        let mut p = base.clone();
        mutate(&mut p);
        let e = CompiledPolicy::from_resource(&p)
            .map(|_| ())
            .expect_err(name)
            .to_string();
        assert!(e.contains(needles[0]), "{name}: {e}");
    }
    expect_rejections(&api, &base, cases).await;

    // Valid ones are admitted: a pin within the bounds, both freezes, a threshold of 3.
    let admitted: Vec<(&str, Mutation)> = vec![
        ("pin", |p| p.spec.paused_replicas = Some(3)),
        ("paused", |p| p.spec.paused = Some(true)),
        ("both-freezes", |p| {
            p.spec.paused_scale_in = Some(true);
            p.spec.paused_scale_out = Some(true);
        }),
        ("pin-and-false-flags", |p| {
            p.spec.paused_replicas = Some(10);
            p.spec.paused = Some(false);
        }),
        ("threshold", |p| threshold(p, 3)),
    ];
    expect_admitted(&api, &base, admitted).await;
}

/// `minReplicas: 0`, `idleReplicas`, `cooldown` and `activationThreshold`: the apiserver and
/// `policy/compile.rs` refuse the same policies, each naming the field, and admit the good ones.
#[tokio::test]
async fn admission_and_compile_check_the_zero_fields() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    support::install_crd(&client).await;
    let ns = support::create_namespace(env, &client, "crd-zero").await;
    let api: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
    let base = example("examples/backend-rps.yaml", &ns.name);
    fn quantity(q: &str) -> Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity> {
        Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
            q.into(),
        ))
    }
    fn cpu_only(p: &mut ScalingPolicy) {
        cpu_only_at(p, 0);
    }
    /// Metric `i` becomes a CPU utilization metric.
    fn cpu_only_at(p: &mut ScalingPolicy, i: usize) {
        let m = &mut p.spec.metrics[i];
        m.prometheus = None;
        m.resource = Some(kscale::crd::ResourceSource {
            name: "cpu".into(),
            container: None,
        });
        m.target.type_ = "Utilization".into();
        m.target.average_value = None;
        m.target.average_utilization = Some(50);
    }

    // (name, mutation, what admission says, the field compile.rs names)
    let cases: Vec<(&str, Mutation, &[&str], &str)> = vec![
        (
            "idle-not-below-min",
            |p| p.spec.idle_replicas = Some(3),
            &["spec.idleReplicas must be below spec.minReplicas"],
            "spec.idleReplicas",
        ),
        (
            "idle-negative",
            |p| p.spec.idle_replicas = Some(-1),
            &["spec.idleReplicas"],
            "spec.idleReplicas",
        ),
        (
            "cooldown-without-zero",
            |p| p.spec.cooldown = Some("5m".into()),
            &["spec.cooldown only applies with spec.minReplicas 0 or spec.idleReplicas"],
            "spec.cooldown",
        ),
        (
            "cooldown-too-long",
            |p| {
                p.spec.min_replicas = Some(0);
                p.spec.cooldown = Some("25h".into());
            },
            &["spec.cooldown must be at most 24h"],
            "spec.cooldown",
        ),
        (
            "cooldown-not-a-duration",
            |p| {
                p.spec.min_replicas = Some(0);
                p.spec.cooldown = Some("soon".into());
            },
            &["spec.cooldown"],
            "spec.cooldown",
        ),
        (
            "activation-without-zero",
            |p| p.spec.metrics[0].activation_threshold = quantity("5"),
            &["activationThreshold only applies with spec.minReplicas 0 or spec.idleReplicas"],
            "spec.metrics[0].activationThreshold",
        ),
        (
            "zero-with-resource-metrics-only",
            |p| {
                p.spec.min_replicas = Some(0);
                cpu_only(p);
            },
            &[
                "spec.minReplicas",
                "needs a prometheus, object or external metric to wake the target",
            ],
            "spec.minReplicas",
        ),
        (
            "idle-zero-with-resource-metrics-only",
            |p| {
                p.spec.idle_replicas = Some(0);
                cpu_only(p);
            },
            &["needs a prometheus, object or external metric to wake the target"],
            "spec.idleReplicas",
        ),
        (
            "zero-with-a-resource-metric-without-threshold",
            |p| {
                p.spec.min_replicas = Some(0);
                let mut cpu = p.spec.metrics[0].clone();
                cpu.name = "cpu".into();
                p.spec.metrics.push(cpu);
                cpu_only_at(p, 1);
            },
            &[
                "activationThreshold is required on a resource metric",
                "would never go idle",
            ],
            "spec.metrics[1].activationThreshold",
        ),
    ];
    for (name, mutate, _, field) in &cases {
        let mut p = base.clone();
        mutate(&mut p);
        let compiled = CompiledPolicy::from_resource(&p).map(|_| ()).unwrap_err();
        assert!(
            compiled.0.iter().any(|e| e.path == *field),
            "{name}: compile.rs does not name {field}: {compiled}"
        );
    }
    let cases = cases
        .into_iter()
        .map(|(name, mutate, needles, _)| (name, mutate, needles))
        .collect();
    expect_rejections(&api, &base, cases).await;

    // A negative threshold: no CEL rule on a quantity fits the cost budget, so only compile.rs
    // refuses it (the controller reports it as InvalidPolicy).
    let mut p = base.clone();
    p.spec.min_replicas = Some(0);
    p.spec.metrics[0].activation_threshold = quantity("-1");
    let e = CompiledPolicy::from_resource(&p).map(|_| ()).unwrap_err();
    assert_eq!(e.0[0].path, "spec.metrics[0].activationThreshold", "{e}");
    assert!(e.to_string().contains("must not be negative"), "{e}");

    // Good ones: to zero with a threshold and a cooldown, and an idle count below minReplicas.
    let goods: Vec<(&str, Mutation)> = vec![
        ("to-zero", |p| {
            p.spec.min_replicas = Some(0);
            p.spec.cooldown = Some("90s".into());
            p.spec.metrics[0].activation_threshold = quantity("500m");
        }),
        ("idle-count", |p| {
            p.spec.idle_replicas = Some(1);
            p.spec.cooldown = Some("1h".into());
        }),
        ("to-zero-with-cpu-threshold", |p| {
            p.spec.min_replicas = Some(0);
            let mut cpu = p.spec.metrics[0].clone();
            cpu.name = "cpu".into();
            p.spec.metrics.push(cpu);
            cpu_only_at(p, 1);
            p.spec.metrics[1].activation_threshold = quantity("20");
        }),
        // An External metric wakes it too, as it does the HPA's minReplicas 0.
        ("to-zero-on-an-external-metric", |p| {
            p.spec.min_replicas = Some(0);
            let m = &mut p.spec.metrics[0];
            m.prometheus = None;
            m.external = Some(kscale::crd::ExternalMetricSource {
                metric: kscale::crd::MetricIdentifier {
                    name: "queue_depth".into(),
                    selector: None,
                },
            });
        }),
    ];
    expect_admitted(&api, &base, goods).await;
}
