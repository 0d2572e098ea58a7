//! The external metrics adapter end to end: kscale registered as `v1beta1.external.metrics.k8s.io`
//! in the real kube-apiserver (aggregation layer, front-proxy certificate), a stock autoscaling/v2
//! HPA run by the real kube-controller-manager scaling a Deployment of simulated pods on
//! `<policy>-desired-replicas`, static rules with escaped selectors, and direct callers refused.
//!
//! The APIService name is cluster-wide, so everything runs in one test.

mod support;

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use kscale::crd::ScalingPolicy;
use kube::api::{Api, PostParams};
fn metric_path(ns: &str, metric: &str, selector: Option<&str>) -> String {
    let mut p = format!("/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/{metric}");
    if let Some(s) = selector {
        p.push_str("?labelSelector=");
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                p.push(b as char);
            } else {
                p.push_str(&format!("%{b:02X}"));
            }
        }
    }
    p
}

use support::{external_metric_values as values, raw_get as raw};

async fn wait_values(client: &kube::Client, path: &str, want: &[&str], log: &Path) {
    let what = format!("{path} = {want:?}");
    let timeout = Duration::from_secs(60);
    let start = std::time::Instant::now();
    loop {
        let (code, body) = raw(client, path).await;
        let got = if code == 200 {
            values(&body)
        } else {
            Err(format!("{code}: {body}"))
        };
        if got.as_ref().is_ok_and(|v| v == want) {
            return;
        }
        if start.elapsed() > timeout {
            panic!(
                "{what} not reached within {timeout:?}: {got:?}\n{}",
                support::log_tail(log)
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn a_stock_hpa_scales_on_kscale_external_metrics() {
    let Some(env) = support::testenv() else {
        return;
    };
    let client = env.client().await;
    support::install_crd(&client).await;
    let ns = support::create_namespace(env, &client, "xm").await;
    let ns_name = ns.name.clone();
    // The chart's RBAC, the adapter's included (delegated authentication, and the reader role of
    // the HPA controller), bound to this test's ServiceAccount.
    let (kubeconfig, _binding) = support::service_account_kubeconfig(env, &client, &ns_name).await;

    support::create_kwok_deployment(&client, &ns_name, "web", 3, "100m", "50m").await;
    support::wait_for_ready_pods(&client, &ns_name, "app=web", 3, Duration::from_secs(60)).await;
    let exporter = support::TestExporter::start(env, &ns_name);
    let metric = "kscale_xm_queue";
    exporter.set(metric, &[("app", "web")], 15.0);
    let query = format!("sum({metric}{{exporter=\"{}\"}})", exporter.id);
    support::wait_prometheus_value(env, &query, 15.0).await;

    let policy = support::scaling_policy(
        &ns_name,
        "web",
        support::WEB_DEPLOYMENT,
        &format!(
            r#"  mode: ExternalMetric
  minReplicas: 1
  maxReplicas: 10
  interval: 1s
  metrics:
  - name: queue
    prometheus: {{query: '{query}'}}
    target: {{type: AverageValue, averageValue: "5"}}
  behavior:
    scaleDown:
      stabilizationWindowSeconds: 0
"#
        ),
    );
    Api::<ScalingPolicy>::namespaced(client.clone(), &ns_name)
        .create(&PostParams::default(), &policy)
        .await
        .expect("policy created");

    // Serving certificate for the name the aggregator verifies, from files (a mounted Secret).
    let dir = support::repo_root().join(format!("target/xm-{}", std::process::id()));
    let ca_pem = support::write_adapter_certificate(&dir, &ns_name);
    let rules = format!(
        "externalRules:\n- name: xm-queue-total\n  query: 'sum({metric}{{exporter=\"{}\",<<.LabelMatchers>>}})'\n  namespaced: false\n",
        exporter.id
    );
    std::fs::write(dir.join("rules.yaml"), rules).expect("rules");

    let port = support::free_port();
    let log = dir.join("daemon.log");
    let start_daemon = |port: u16, log: &Path| {
        let ports = (port, support::free_port());
        support::adapter_daemon(env, &kubeconfig, &ns_name, ports, &dir, log)
            .arg("--external-rules")
            .arg(dir.join("rules.yaml"))
            .spawn()
            .expect("kscale run starts")
    };
    let child = start_daemon(port, &log);
    let _daemon = support::ChildGuard(child);

    let _cleanup =
        support::register_external_metrics(env, &client, &ns_name, port, &ca_pem, &log).await;

    // Through kube-apiserver: the policy's metric and decision, discovery, errors.
    wait_values(
        &client,
        &metric_path(&ns_name, "web-queue", None),
        &["15"],
        &log,
    )
    .await;
    wait_values(
        &client,
        &metric_path(&ns_name, "web-desired-replicas", None),
        &["3"],
        &log,
    )
    .await;
    let (code, body) = raw(&client, "/apis/external.metrics.k8s.io/v1beta1").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"web-desired-replicas\"") && body.contains("\"xm-queue-total\""),
        "{body}"
    );
    let (code, body) = raw(&client, &metric_path(&ns_name, "nope", None)).await;
    assert_eq!(code, 404, "{body}");
    let (code, body) = raw(&client, &metric_path("other", "web-queue", None)).await;
    assert_eq!(
        code, 404,
        "a policy's metrics live in its namespace only: {body}"
    );

    // Static rule: the selector becomes matchers; PromQL syntax in it is escaped, not executed.
    let rule = |sel: &str| metric_path(&ns_name, "xm-queue-total", Some(sel));
    wait_values(&client, &rule("app=web"), &["15"], &log).await;
    wait_values(&client, &rule("app in (web,db)"), &["15"], &log).await;
    for injection in [
        r#"app=web"}/up{x="y"#,
        r#"app=x"}or{__name__=~".+"#,
        "app in (.*)",
        r#"app=web\",app!=x"#,
    ] {
        let (code, body) = raw(&client, &rule(injection)).await;
        assert_eq!(code, 200, "{injection}: {body}");
        assert_eq!(
            values(&body).expect("a list"),
            Vec::<String>::new(),
            "{injection} matched something: {body}"
        );
    }
    let (code, body) = raw(&client, &rule("app.kubernetes.io/name=web")).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("labelSelector"), "{body}");

    // A stock HPA, run by kube-controller-manager, follows kscale's decision up and down.
    support::apply_yaml(
        &client,
        &ns_name,
        &support::external_hpa_yaml("web-desired-replicas", "1"),
    )
    .await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns_name);
    // 30 / 5 per replica = 6.
    exporter.set(metric, &[("app", "web")], 30.0);
    wait_values(
        &client,
        &metric_path(&ns_name, "web-desired-replicas", None),
        &["6"],
        &log,
    )
    .await;
    support::wait_replicas(&deployments, 6, Duration::from_secs(60), &log).await;
    exporter.set(metric, &[("app", "web")], 10.0);
    wait_values(
        &client,
        &metric_path(&ns_name, "web-desired-replicas", None),
        &["2"],
        &log,
    )
    .await;
    support::wait_replicas(&deployments, 2, Duration::from_secs(60), &log).await;

    // Direct callers: no certificate or token, a forged user header, a bad token, a valid token
    // without RBAC, a client certificate from another CA: all refused.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let path = metric_path(&ns_name, "web-queue", None);
    let plain = support::tls_client_config(&ca_pem, None);
    let (code, body) = support::https_get(plain.clone(), addr, &path, &[])
        .await
        .expect("answer");
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("\"kind\":\"Status\""), "{body}");
    let forged = [
        ("X-Remote-User", "system:admin"),
        ("X-Remote-Group", "system:masters"),
    ];
    let (code, _) = support::https_get(plain.clone(), addr, &path, &forged)
        .await
        .expect("answer");
    assert_eq!(code, 401);
    let (code, _) = support::https_get(
        plain.clone(),
        addr,
        &path,
        &[("Authorization", "Bearer not-a-token")],
    )
    .await
    .expect("answer");
    assert_eq!(code, 401);
    support::apply_yaml(
        &client,
        &ns_name,
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: nobody}\n",
    )
    .await;
    let token = Api::<ServiceAccount>::namespaced(client.clone(), &ns_name)
        .create_token_request("nobody", &PostParams::default(), &TokenRequest::default())
        .await
        .expect("token")
        .status
        .expect("token status")
        .token
        .expect("a token");
    let bearer = format!("Bearer {token}");
    let (code, body) =
        support::https_get(plain.clone(), addr, &path, &[("Authorization", &bearer)])
            .await
            .expect("answer");
    assert_eq!(code, 403, "{body}");
    let pki = env.dir.join("pki");
    let read = |f: &str| std::fs::read_to_string(pki.join(f)).expect("testenv PKI");
    let admin_cert =
        support::tls_client_config(&ca_pem, Some((&read("admin.crt"), &read("admin.key"))));
    let refused = support::https_get(admin_cert, addr, &path, &forged).await;
    assert!(
        refused.is_err(),
        "a certificate from another CA must fail the handshake: {refused:?}"
    );
    // The front-proxy certificate kube-apiserver uses does work, with the user it names.
    let proxy = support::tls_client_config(
        &ca_pem,
        Some((
            &read("front-proxy-client.crt"),
            &read("front-proxy-client.key"),
        )),
    );
    let (code, body) = support::https_get(proxy.clone(), addr, &path, &forged)
        .await
        .expect("answer");
    assert_eq!(code, 200, "{body}");
    assert_eq!(values(&body).expect("a list"), vec!["10".to_string()]);
    let (code, _) = support::https_get(proxy.clone(), addr, &path, &[])
        .await
        .expect("answer");
    assert_eq!(code, 401, "a front-proxy request must name its user");

    // A second replica is a follower (the first holds the Lease); it evaluates and publishes
    // too, so either replica behind the Service answers with the same value.
    let follower_port = support::free_port();
    let follower_log = dir.join("follower.log");
    let _follower = support::ChildGuard(start_daemon(follower_port, &follower_log));
    let follower: std::net::SocketAddr =
        format!("127.0.0.1:{follower_port}").parse().expect("addr");
    support::wait_until(
        "the follower serves the leader's value",
        Duration::from_secs(30),
        || async {
            let (code, body) = support::https_get(proxy.clone(), follower, &path, &forged).await?;
            match (code, values(&body)) {
                (200, Ok(v)) if v == vec!["10".to_string()] => Ok(()),
                other => Err(format!("{other:?}: {body}")),
            }
        },
    )
    .await;
    let log_text = std::fs::read_to_string(&follower_log).unwrap_or_default();
    assert!(
        !log_text.contains("wrote=true"),
        "a follower must not write: {log_text}"
    );
}
