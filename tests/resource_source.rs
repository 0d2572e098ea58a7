//! The resource metrics source (`kscale::source::resource`) against the real test environment:
//! kwok-simulated pods whose CPU usage metrics-server serves through `metrics.k8s.io`.
//!
//! Set `KSCALE_SKIP_TESTENV=1` to skip (loudly).

mod support;

use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use kscale::model::{Observation, PodPhase, PodSample, Sample};
use kscale::policy::replicas::{ReadinessSettings, ResourceTarget, Tolerances, resource};
use kscale::policy::{CompiledPolicy, PolicyState, evaluate};
use kscale::source::resource::{
    ResourceName, ResourceSourceError, fetch_pod_samples, sample, scale_selector,
};
use support::*;

/// metrics-server scrapes every 10 s (`--metric-resolution=10s`) and kwok derives usage from a
/// cumulative counter, so a new simulated value needs a scrape or two to show fully.
const METRICS_TIMEOUT: Duration = Duration::from_secs(90);

fn describe(samples: &[PodSample]) -> String {
    samples
        .iter()
        .map(|s| {
            format!(
                "[{} {:?} ready={:?} request={:?} usage={:?}]",
                s.name,
                s.phase,
                s.ready.map(|r| r.0),
                s.request_milli,
                s.usage.map(|u| (u.milli, u.timestamp, u.window_seconds))
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn deployment_pods_with_simulated_cpu_give_samples_and_the_hpa_proposal() {
    let Some(env) = testenv() else { return };
    let client = env.client().await;
    let ns = create_namespace(env, &client, "resource-src").await;
    create_kwok_deployment(&client, &ns.name, "web", 3, "200m", "20m").await;
    let pods = wait_for_ready_pods(&client, &ns.name, "app=web", 3, Duration::from_secs(60)).await;

    // The selector comes from the scale subresource, as the controller will read it.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let scale = deployments
        .get_scale("web")
        .await
        .expect("get scale of web");
    let selector = scale_selector(&scale)
        .expect("scale status.selector")
        .to_string();
    assert_eq!(selector, "app=web");

    // Different usage per pod, so a mix-up between pods and metrics shows.
    let mut wanted: Vec<(String, i64)> = Vec::new();
    for (pod, milli) in pods.iter().zip([100i64, 150, 200]) {
        let name = pod.metadata.name.clone().expect("pod name");
        set_pod_cpu_usage(&client, &ns.name, &name, &format!("{milli}m")).await;
        wanted.push((name, milli));
    }

    let samples = wait_until(
        "PodSamples with the simulated usage (±10%) for all 3 pods",
        METRICS_TIMEOUT,
        || async {
            let samples = fetch_pod_samples(&client, &ns.name, &selector, ResourceName::Cpu, None)
                .await
                .map_err(|e| e.to_string())?;
            let close = samples.len() == 3
                && wanted.iter().all(|(name, milli)| {
                    samples.iter().any(|s| {
                        &s.name == name
                            && s.usage
                                .is_some_and(|u| (u.milli - milli).abs() * 10 <= *milli)
                    })
                });
            if close {
                Ok(samples)
            } else {
                Err(format!("wanted {wanted:?}; got {}", describe(&samples)))
            }
        },
    )
    .await;

    eprintln!("samples: {}", describe(&samples));
    let now = Utc::now();
    for s in &samples {
        assert_eq!(s.phase, PodPhase::Running, "{}", describe(&samples));
        assert!(!s.deleting, "{}", describe(&samples));
        assert_eq!(s.request_milli, Some(200), "{}", describe(&samples));
        assert!(matches!(s.ready, Some((true, _))), "{}", describe(&samples));
        assert!(s.start_time.is_some(), "{}", describe(&samples));
        let u = s.usage.expect("usage");
        assert!(u.window_seconds > 0, "{}", describe(&samples));
        assert!(
            u.timestamp <= now + chrono::TimeDelta::seconds(5)
                && u.timestamp > now - chrono::TimeDelta::minutes(2),
            "usage timestamp {} vs now {now}",
            u.timestamp
        );
    }

    // The HPA arithmetic on what was read: 3 × 200m requested, about 450m used → about 75%
    // utilization against a 50% target → ceil(1.5 × 3) = 5 replicas. Computed exactly from the
    // samples as the HPA does (integer percent), and within the ±10% usage band it is 5.
    let usage: i64 = samples
        .iter()
        .filter_map(|s| s.usage)
        .map(|u| u.milli)
        .sum();
    let utilization = (usage * 100 / 600) as i32;
    let expected = (f64::from(utilization) / 50.0 * 3.0).ceil() as i32;
    assert_eq!(expected, 5, "utilization {utilization}%");
    // Pods started less than 5 minutes ago count only once a full metrics window has passed
    // since they became ready. They were Ready before their usage was set, and a usage within
    // 10% of the new value comes from a window that began after that, so all 3 count.
    let proposal = resource(
        &samples,
        true,
        ResourceTarget::Utilization(50),
        3,
        Tolerances { down: 0.1, up: 0.1 },
        now,
        ReadinessSettings::default(),
    )
    .unwrap_or_else(|e| panic!("resource proposal failed: {e}; {}", describe(&samples)));
    assert_eq!(
        (proposal.replicas, proposal.value, proposal.ready),
        (expected, f64::from(utilization), 3),
        "{}",
        describe(&samples)
    );

    // The same through the evaluator with a compiled policy (legacy behavior: a scale-up
    // from 3 may go to max(2 × 3, 4) = 6, so 5 stands).
    let policy = support::scaling_policy(
        &ns.name,
        "web",
        support::WEB_DEPLOYMENT,
        r#"  minReplicas: 1
  maxReplicas: 10
  metrics:
  - name: cpu
    resource: {name: cpu}
    target: {type: Utilization, averageUtilization: 50}
"#,
    );
    let policy = CompiledPolicy::from_resource(&policy).expect("policy compiles");
    let obs = Observation::steady(3, vec![Sample::Pods(samples.clone())]);
    let decision = evaluate(&policy, &obs, &PolicyState::default(), now);
    assert_eq!(
        (decision.replicas, decision.metrics[0].proposal),
        (expected, Some(expected)),
        "{}",
        decision.reason(&policy)
    );

    // The same pods as a raw AverageValue target of 100m: average about 150m → ceil(1.5 × 3).
    let average = usage / 3;
    let raw = resource(
        &samples,
        true,
        ResourceTarget::AverageMilli(100),
        3,
        Tolerances { down: 0.1, up: 0.1 },
        now,
        ReadinessSettings::default(),
    )
    .expect("raw resource proposal");
    assert_eq!(
        raw.replicas,
        (average as f64 / 100.0 * 3.0).ceil() as i32,
        "average {average}m"
    );

    // Memory: the Deployment requests 64Mi and kwok simulates 32Mi, counted in milli-bytes.
    let memory = fetch_pod_samples(&client, &ns.name, &selector, ResourceName::Memory, None)
        .await
        .expect("memory samples");
    for s in &memory {
        assert_eq!(s.request_milli, Some(64 * 1024 * 1024 * 1000), "{s:?}");
        if let Some(u) = s.usage {
            let bytes = u.milli / 1000;
            assert!(
                (16 * 1024 * 1024..=64 * 1024 * 1024).contains(&bytes),
                "simulated 32Mi, got {bytes} bytes"
            );
        }
    }

    // The named container is the only one, so it reads the same as the whole pod.
    let named = fetch_pod_samples(&client, &ns.name, &selector, ResourceName::Cpu, Some("app"))
        .await
        .expect("named container samples");
    assert!(
        named.iter().all(|s| s.request_milli == Some(200)),
        "{}",
        describe(&named)
    );
    let absent = fetch_pod_samples(
        &client,
        &ns.name,
        &selector,
        ResourceName::Cpu,
        Some("nope"),
    )
    .await
    .expect("absent container samples");
    assert!(
        absent
            .iter()
            .all(|s| s.request_milli.is_none() && s.usage.is_none()),
        "{}",
        describe(&absent)
    );
}

#[tokio::test]
async fn no_pods_and_forbidden_metrics_are_explicit_errors() {
    let Some(env) = testenv() else { return };
    let client = env.client().await;
    let ns = create_namespace(env, &client, "resource-src-err").await;

    // Nothing matches: the HPA's "no metrics returned" error, never an empty Pods sample.
    match sample(
        &client,
        &ns.name,
        "app=nothing",
        &[],
        ResourceName::Cpu,
        None,
    )
    .await
    {
        Sample::Error { message } => assert_eq!(
            message,
            "unable to get metrics for resource cpu: no metrics returned from resource metrics API"
        ),
        other => panic!("expected an error, got {other:?}"),
    }
    // An empty selector would match every pod of the namespace: refused.
    assert!(matches!(
        fetch_pod_samples(&client, &ns.name, "", ResourceName::Cpu, None).await,
        Err(ResourceSourceError::NoSelector)
    ));

    // A service account without RBAC: the apiserver's own "forbidden" text comes through.
    let kubeconfig = Kubeconfig::read_from(&env.kubeconfig).expect("read kubeconfig");
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{}:default", ns.name));
    let nobody = Client::try_from(config).expect("impersonating client");
    match sample(&nobody, &ns.name, "app=web", &[], ResourceName::Cpu, None).await {
        Sample::Error { message } => {
            assert!(
                message.starts_with(
                    "unable to get metrics for resource cpu: unable to fetch metrics from resource metrics API: "
                ) && message.contains("forbidden"),
                "{message}"
            );
        }
        other => panic!("expected a forbidden error, got {other:?}"),
    }
}
