//! Leader election through a `coordination.k8s.io/v1` Lease, so two replicas of the daemon can
//! run and only one evaluates and writes.
//!
//! The holder renews the Lease every `renew`; another instance takes it over once the holder's
//! last renewal is older than `duration`. Every write carries the Lease's resourceVersion, so two
//! candidates cannot both win. On shutdown the holder releases the Lease (empty holder), so a
//! successor takes over at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use tracing::{info, warn};

/// Election settings.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This instance's identity (unique per replica).
    pub identity: String,
    /// How long a renewal stays valid.
    pub duration: Duration,
    /// How often the holder renews, and a candidate retries.
    pub renew: Duration,
}

fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

fn expired(spec: &LeaseSpec, default: Duration) -> bool {
    let Some(renewed) = spec.renew_time.as_ref() else {
        return true;
    };
    let duration = spec.lease_duration_seconds.map_or(default, |s| {
        Duration::from_secs(u64::try_from(s).unwrap_or(0))
    });
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(renewed.0);
    age.as_secs_f64() > duration.as_secs_f64()
}

/// One attempt to acquire or renew. Returns whether this instance holds the Lease afterwards.
async fn try_acquire(api: &Api<Lease>, cfg: &LeaderConfig) -> Result<bool, kube::Error> {
    let duration_s = i32::try_from(cfg.duration.as_secs()).unwrap_or(15);
    let existing = api.get_opt(&cfg.name).await?;
    let Some(mut lease) = existing else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(duration_s),
                acquire_time: Some(now_micro()),
                renew_time: Some(now_micro()),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let ours = holder == cfg.identity;
    if !ours && !holder.is_empty() && !expired(spec, cfg.duration) {
        return Ok(false);
    }
    if !ours {
        spec.holder_identity = Some(cfg.identity.clone());
        spec.acquire_time = Some(now_micro());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(now_micro());
    spec.lease_duration_seconds = Some(duration_s);
    // replace carries metadata.resourceVersion: a concurrent writer gets 409 and loses.
    match api
        .replace(&lease.name_any(), &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Releases the Lease if this instance holds it.
pub async fn release(client: &Client, cfg: &LeaderConfig) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => info!(lease = %cfg.name, "leadership released"),
        Err(e) => warn!(lease = %cfg.name, error = %e, "releasing the lease failed"),
    }
}

/// Keeps trying to lead; `leading` is true exactly while this instance holds a valid Lease.
/// Runs until the task is dropped.
pub async fn campaign(client: Client, cfg: LeaderConfig, leading: Arc<AtomicBool>) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut last_renewal: Option<std::time::Instant> = None;
    loop {
        match try_acquire(&api, &cfg).await {
            Ok(true) => {
                if !leading.swap(true, Ordering::SeqCst) {
                    info!(identity = %cfg.identity, lease = %cfg.name, "became the leader");
                }
                last_renewal = Some(std::time::Instant::now());
            }
            Ok(false) => {
                if leading.swap(false, Ordering::SeqCst) {
                    warn!(identity = %cfg.identity, "lost the lease to another instance");
                }
            }
            Err(e) => {
                warn!(error = %e, "lease update failed");
                // Keep leading only while the last renewal is still valid.
                if last_renewal.is_none_or(|t| t.elapsed() >= cfg.duration)
                    && leading.swap(false, Ordering::SeqCst)
                {
                    warn!(identity = %cfg.identity, "stopped leading: the lease could not be renewed in time");
                }
            }
        }
        tokio::time::sleep(cfg.renew).await;
    }
}
