//! See `main.rs`: the formula part of the abuse suite (issue 13, kinds 1 and 5).
//!
//! - Kind 1: formulas of seven and twelve nested comprehensions next to a healthy policy. The
//!   apiserver admits them (a CEL rule cannot bound a formula's nesting: see the `formula` field
//!   of `src/crd.rs`), kscale refuses them when it compiles them, naming the cost limit in their
//!   status, and the healthy policy keeps its interval.
//! - Kind 5: `interval: 1ms` is rejected at admission, naming the floor.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kscale::crd::ScalingPolicy;
use kube::api::{Api, PostParams};

use crate::support;

/// The controller as a child process, killed on drop.
struct Controller(Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `depth` comprehensions over ten elements nested inside each other (the issue's example at
/// seven levels is 254 characters), used as a condition on the metric `rps`.
fn nested(depth: usize) -> String {
    let mut s = "rps > 0".to_string();
    for _ in 0..depth {
        s = format!("[1,2,3,4,5,6,7,8,9,10].all(rps, {s})");
    }
    format!("{s} ? rps : 1")
}

fn policy(ns: &str, name: &str, target: &str, query: &str, extra: &str) -> ScalingPolicy {
    support::scaling_policy(
        ns,
        name,
        &format!("{{apiVersion: apps/v1, kind: Deployment, name: {target}}}"),
        &format!(
            r#"  minReplicas: 1
  maxReplicas: 10
  interval: 1s
  metrics:
  - name: rps
    prometheus: {{query: '{query}'}}
    target: {{type: AverageValue, averageValue: "5"}}
{extra}"#
        ),
    )
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
async fn nested_comprehensions_are_refused_and_the_neighbour_keeps_its_interval() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    support::install_crd(&client).await;
    let ns = support::create_namespace(env, &client, "iso-formula").await;
    support::create_kwok_deployment(&client, &ns.name, "web", 2, "100m", "50m").await;
    support::create_kwok_deployment(&client, &ns.name, "hog", 1, "100m", "50m").await;
    support::wait_for_ready_pods(&client, &ns.name, "app=web", 2, Duration::from_secs(60)).await;
    let exporter = support::TestExporter::start(env, &ns.name);
    let metric = "kscale_iso_formula_rps";
    exporter.set(metric, &[], 10.0);
    let query = format!("sum({metric}{{exporter=\"{}\"}})", exporter.id);
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
    create(&policies, &policy(&ns.name, "web", "web", &query, ""))
        .await
        .expect("the healthy policy is admitted");
    for depth in [7, 12] {
        let hostile = policy(
            &ns.name,
            &format!("nested-{depth}"),
            "hog",
            &query,
            &format!("  formula: '{}'\n", nested(depth)),
        );
        create(&policies, &hostile)
            .await
            .expect("admitted: the apiserver cannot bound a formula's nesting");
    }

    let log = support::repo_root().join(format!(
        "target/isolation-formula-{}.log",
        std::process::id()
    ));
    let (kubeconfig, _binding) = support::service_account_kubeconfig(env, &client, &ns.name).await;
    let _controller = Controller(
        Command::new(env!("CARGO_BIN_EXE_kscale"))
            .args([
                "run",
                "--metrics-addr",
                &format!("127.0.0.1:{}", support::free_port()),
            ])
            .args(["--watch-namespace", &ns.name])
            .args([
                "--leader-election-namespace",
                &ns.name,
                "--instance",
                "iso-formula",
            ])
            .args(["--leader-lease-duration", "4s", "--leader-renew", "1s"])
            .env("KUBECONFIG", &kubeconfig)
            .env("KSCALE_PROMETHEUS_URL", &env.prometheus_url)
            .env("RUST_LOG", "kscale=debug,info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("kscale run starts"),
    );

    // Each hostile policy: an error in its own status naming the field, its estimate and the
    // limit; nothing from the formula ran.
    for depth in [7, 12] {
        let name = format!("nested-{depth}");
        support::wait_until(
            &format!("{name}'s status"),
            Duration::from_secs(30),
            || async {
                let p = policies.get(&name).await.map_err(|e| e.to_string())?;
                let s = p.status.ok_or("no status yet")?;
                let ready = s
                    .conditions
                    .iter()
                    .find(|c| c.type_ == "Ready")
                    .ok_or("no Ready")?;
                if ready.status == "False"
                    && ready.reason == "InvalidPolicy"
                    && ready.message.contains("spec.formula")
                    && ready.message.contains("estimated worst-case cost of")
                    && ready.message.contains("over the limit of 100000")
                {
                    Ok(())
                } else {
                    Err(format!("{ready:?}"))
                }
            },
        )
        .await;
    }

    // The healthy neighbour: 10 / 5 = 2 replicas, then 20 / 5 = 4 within its interval plus 1 s
    // of the new value being visible in Prometheus. 4 is what one evaluation may reach from 2:
    // without `behavior` the HPA's scale-up limit is max(2 × current, 4) = 4, so a larger step
    // would take two intervals and the bound would measure the rate limit, not the isolation.
    support::wait_until(
        "the healthy policy's first status",
        Duration::from_secs(30),
        || async {
            let p = policies.get("web").await.map_err(|e| e.to_string())?;
            match p.status.and_then(|s| s.desired_replicas) {
                Some(2) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    exporter.set(metric, &[], 20.0);
    support::wait_prometheus_value(env, &query, 20.0).await;
    let visible = Instant::now();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    support::wait_replicas(&deployments, 4, Duration::from_secs(20), &log).await;
    let took = visible.elapsed();
    eprintln!("the healthy policy's scale write landed {took:?} after the metric was visible");
    // The issue's bound: interval (1 s) + 1 s. Measured from when Prometheus answers the new
    // value, so the scrape delay is not counted.
    assert!(
        took <= Duration::from_secs(2),
        "the healthy policy took {took:?}\n{}",
        support::log_tail(&log)
    );
    // The hostile targets were never written.
    let hog = deployments.get("hog").await.expect("hog");
    assert_eq!(hog.spec.and_then(|s| s.replicas), Some(1));
}

#[tokio::test]
async fn an_interval_below_one_second_is_rejected_at_admission() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    support::install_crd(&client).await;
    let ns = support::create_namespace(env, &client, "iso-interval").await;
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
    for (i, interval) in ["1ms", "999ms", "0s", "500us", "0.5s"].iter().enumerate() {
        let mut p = policy(&ns.name, &format!("fast-{i}"), "web", "sum(x)", "");
        p.spec.interval = Some((*interval).to_string());
        match create(&policies, &p).await {
            Err(kube::Error::Api(e)) => assert!(
                e.code == 422 && e.message.contains("spec.interval must be at least 1s"),
                "{interval}: {e:?}"
            ),
            other => panic!("interval {interval} was not rejected: {other:?}"),
        }
    }
    // The floor itself, longer intervals and day units are admitted.
    for (i, interval) in ["1s", "1000ms", "15s", "1m30s", "1d", "0.5s500ms"]
        .iter()
        .enumerate()
    {
        let mut p = policy(&ns.name, &format!("ok-{i}"), "web", "sum(x)", "");
        p.spec.interval = Some((*interval).to_string());
        create(&policies, &p)
            .await
            .unwrap_or_else(|e| panic!("interval {interval} was rejected: {e}"));
    }
}
