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
