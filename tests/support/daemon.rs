//! The daemon under test: `kscale run` as a child process for one namespace, and waits on what
//! it reports (conditions, events). Shared by the controller end-to-end test files.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kscale::crd::{ScalingPolicy, ScalingPolicyStatus};
use kube::api::{Api, ListParams};

/// The controller as a child process, killed on drop.
pub struct Controller(pub Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn start_controller(
    env: &super::TestEnv,
    kubeconfig: &std::path::Path,
    log: &std::path::Path,
    admin_port: u16,
    namespace: &str,
    identity: &str,
) -> Controller {
    let log = std::fs::File::create(log).expect("controller log file");
    let child = Command::new(env!("CARGO_BIN_EXE_kscale"))
        .args(["run", "--metrics-addr", &format!("127.0.0.1:{admin_port}")])
        .args([
            "--watch-namespace",
            namespace,
            "--leader-election-namespace",
            namespace,
            "--instance",
            identity,
        ])
        .args(["--leader-lease-duration", "4s", "--leader-renew", "1s"])
        .env("KUBECONFIG", kubeconfig)
        .env("KSCALE_PROMETHEUS_URL", &env.prometheus_url)
        .env("RUST_LOG", "kscale=debug,info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("kscale run starts");
    Controller(child)
}

/// A controller for `namespace`, running as the ServiceAccount bound to the shipped RBAC and
/// logging to `target/<log_name>-<pid>.log`; it stops, and its binding goes, when dropped.
pub struct Running {
    _controller: Controller,
    _binding: super::BindingGuard,
    /// The daemon's log file.
    pub log: std::path::PathBuf,
}

pub async fn run_controller(
    env: &super::TestEnv,
    client: &kube::Client,
    namespace: &str,
    log_name: &str,
    identity: &str,
) -> Running {
    let (kubeconfig, binding) = super::service_account_kubeconfig(env, client, namespace).await;
    let log = super::repo_root().join(format!("target/{log_name}-{}.log", std::process::id()));
    let controller = start_controller(
        env,
        &kubeconfig,
        &log,
        super::free_port(),
        namespace,
        identity,
    );
    Running {
        _controller: controller,
        _binding: binding,
        log,
    }
}

/// Waits until condition `type_` of policy `name` satisfies `check` (which also sees the whole
/// status); panics with the last condition and reason after `timeout`.
pub async fn wait_condition(
    policies: &Api<ScalingPolicy>,
    name: &str,
    type_: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&Condition, &ScalingPolicyStatus) -> bool,
) {
    super::wait_until(what, timeout, || async {
        let p = policies.get(name).await.map_err(|e| e.to_string())?;
        let s = p.status.ok_or("no status yet")?;
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .ok_or_else(|| format!("no {type_} condition"))?;
        if check(c, &s) {
            Ok(())
        } else {
            Err(format!(
                "{c:?}; reason {:?}; metrics {:?}",
                s.reason, s.metrics
            ))
        }
    })
    .await;
}

/// Waits until an Event in `namespace` satisfies `check`.
pub async fn wait_event(
    client: &kube::Client,
    namespace: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&Event) -> bool,
) {
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    super::wait_until(what, timeout, || async {
        let list = events
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        if list.items.iter().any(&check) {
            Ok(())
        } else {
            Err(format!("{} events, none matches", list.items.len()))
        }
    })
    .await;
}

/// Sets the replicas of Deployment `name` through its scale subresource as a person would
/// (`kubectl scale`, field manager `kubectl-scale`).
pub async fn scale_by_hand(api: &Api<k8s_openapi::api::apps::v1::Deployment>, name: &str, n: i32) {
    let pp = kube::api::PatchParams {
        field_manager: Some("kubectl-scale".into()),
        ..Default::default()
    };
    api.patch_scale(
        name,
        &pp,
        &kube::api::Patch::Merge(serde_json::json!({"spec": {"replicas": n}})),
    )
    .await
    .expect("manual scale");
}
