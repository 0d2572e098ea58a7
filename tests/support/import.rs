//! What the `kscale import` end-to-end tests share: the CLI against the test cluster, the
//! policies it prints, a dry-run's decision, and the wait for a shadow policy to agree with its
//! HPA.

use std::process::Command;
use std::time::Duration;

use kscale::crd::{ScalingPolicy, ShadowStatus};
use kube::api::Api;

use super::TestEnv;

/// Runs `kscale ARGS` against the test cluster: exit code, standard output, standard error.
pub fn kscale(args: &[&str], env: &TestEnv) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kscale"))
        .args(args)
        .env("KUBECONFIG", &env.kubeconfig)
        .output()
        .expect("kscale runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The ScalingPolicies of a multi-document YAML text.
pub fn policies_of(yaml: &str) -> Vec<ScalingPolicy> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| {
            <ScalingPolicy as serde::Deserialize>::deserialize(d).expect("a ScalingPolicy document")
        })
        .collect()
}

/// The `decision  N replicas` of a dry-run's output.
pub fn decision(text: &str) -> Option<i32> {
    let line = text.lines().find(|l| l.starts_with("decision "))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Waits until DryRun policy `name`, beside HPA `name`, records that the HPA wants `want` and
/// decides `want` itself: divergence 0 in status and in the reason.
pub async fn wait_shadow_agrees(policies: &Api<ScalingPolicy>, name: &str, want: i32) {
    super::wait_until(
        &format!("{name}'s shadow status"),
        Duration::from_secs(60),
        || async {
            let p = policies.get(name).await.map_err(|e| e.to_string())?;
            let s = p.status.ok_or("no status yet")?;
            let shadow = s
                .shadow
                .clone()
                .ok_or(format!("no shadow: {:?}", s.reason))?;
            if shadow
                == (ShadowStatus {
                    hpa: name.to_string(),
                    hpa_desired_replicas: want,
                    divergence: 0,
                })
                && s.desired_replicas == Some(want)
                && s.reason.as_deref().is_some_and(|r| {
                    r.ends_with(&format!("; shadow: HPA {name} wants {want} (kscale +0)"))
                })
            {
                Ok(())
            } else {
                Err(format!(
                    "{shadow:?} desired {:?} {:?}",
                    s.desired_replicas, s.reason
                ))
            }
        },
    )
    .await;
}

/// Waits until each HPA `(name, want)` of `namespace` has settled at `want` and its pods
/// (`app=<name>`) are all ready.
pub async fn wait_settled(client: &kube::Client, namespace: &str, settled: &[(&str, i32)]) {
    let hpas: Api<k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler> =
        Api::namespaced(client.clone(), namespace);
    for (name, want) in settled {
        super::wait_hpa_settled(&hpas, name, *want).await;
        super::wait_for_ready_pods(
            client,
            namespace,
            &format!("app={name}"),
            usize::try_from(*want).expect("positive"),
            Duration::from_secs(60),
        )
        .await;
    }
}

/// `kscale import -n NAMESPACE`: one DryRun policy per HPA of `settled`, each of whose
/// `kscale dry-run` decisions equals the count its HPA settled at. The policies, in print order.
pub fn import_and_dry_run(
    env: &TestEnv,
    namespace: &str,
    settled: &[(&str, i32)],
) -> Vec<ScalingPolicy> {
    let (code, stdout, stderr) = kscale(&["import", "-n", namespace], env);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let imported = policies_of(&stdout);
    assert_eq!(imported.len(), settled.len(), "{stdout}");
    for (name, want) in settled {
        let p = imported
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("{name} was not imported: {stdout}"));
        assert_eq!(p.spec.mode, kscale::crd::Mode::DryRun, "the default mode");
        assert_eq!(p.spec.target_ref.name, *name);
        let (ok, text) = super::controller::dry_run(env, p, &format!("import-{name}"));
        assert!(ok, "{text}");
        assert_eq!(
            decision(&text),
            Some(*want),
            "{name}: kscale's dry-run of the imported policy against the HPA's desiredReplicas\n{text}"
        );
    }
    imported
}

/// Imported DryRun policies running beside their HPAs under a controller that runs as the
/// shipped RBAC's ServiceAccount; stops (and unbinds) when dropped.
pub struct Shadow {
    /// The policies' API.
    pub policies: Api<ScalingPolicy>,
    /// The controller's `/metrics` port.
    pub port: u16,
    _controller: super::controller::Controller,
    _binding: super::BindingGuard,
}

/// Creates `imported` in `namespace`, starts the controller (`identity`, its log in
/// `target/<identity>-<pid>.log`) and waits until each policy of `settled` agrees with its HPA.
pub async fn shadow_beside(
    env: &TestEnv,
    client: &kube::Client,
    namespace: &str,
    imported: &[ScalingPolicy],
    settled: &[(&str, i32)],
    identity: &str,
) -> Shadow {
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), namespace);
    for p in imported {
        policies
            .create(&Default::default(), p)
            .await
            .expect("an imported policy is admitted");
    }
    let (kubeconfig, binding) = super::service_account_kubeconfig(env, client, namespace).await;
    let log = super::repo_root().join(format!("target/{identity}-{}.log", std::process::id()));
    let port = super::free_port();
    let controller = super::controller::start_controller_with(
        &kubeconfig,
        &log,
        port,
        namespace,
        identity,
        Some(&env.prometheus_url),
        super::controller::Lease::Flag(namespace),
    );
    for (name, want) in settled {
        wait_shadow_agrees(&policies, name, *want).await;
    }
    Shadow {
        policies,
        port,
        _controller: controller,
        _binding: binding,
    }
}
