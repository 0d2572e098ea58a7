//! Running `kscale run` in end-to-end tests: the daemon as a child process (as the shipped
//! ServiceAccount), and waits on a policy's conditions and on Events.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kscale::crd::{ScalingPolicy, ScalingPolicyStatus};
use kube::api::{Api, ListParams};

use super::{BindingGuard, TestEnv};

/// The controller as a child process, killed on drop.
pub struct Controller(pub Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn start_controller(
    env: &TestEnv,
    kubeconfig: &std::path::Path,
    log: &std::path::Path,
    admin_port: u16,
    namespace: &str,
    identity: &str,
) -> Controller {
    start_controller_at(
        kubeconfig,
        log,
        admin_port,
        namespace,
        identity,
        &env.prometheus_url,
    )
}

/// [`start_controller`] with `prometheus_url` as the daemon's default Prometheus.
pub fn start_controller_at(
    kubeconfig: &std::path::Path,
    log: &std::path::Path,
    admin_port: u16,
    namespace: &str,
    identity: &str,
    prometheus_url: &str,
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
        .env("KSCALE_PROMETHEUS_URL", prometheus_url)
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
    pub _controller: Controller,
    pub _binding: BindingGuard,
    pub log: std::path::PathBuf,
}

pub async fn run_controller(
    env: &TestEnv,
    client: &kube::Client,
    namespace: &str,
    log_name: &str,
    identity: &str,
) -> Running {
    run_controller_at(
        env,
        client,
        namespace,
        log_name,
        identity,
        &env.prometheus_url,
    )
    .await
}

/// [`run_controller`] with `prometheus_url` as the daemon's default Prometheus.
pub async fn run_controller_at(
    env: &TestEnv,
    client: &kube::Client,
    namespace: &str,
    log_name: &str,
    identity: &str,
    prometheus_url: &str,
) -> Running {
    let (kubeconfig, binding) = super::service_account_kubeconfig(env, client, namespace).await;
    let log = super::repo_root().join(format!("target/{log_name}-{}.log", std::process::id()));
    let controller = start_controller_at(
        &kubeconfig,
        &log,
        super::free_port(),
        namespace,
        identity,
        prometheus_url,
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
