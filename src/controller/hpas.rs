//! The HorizontalPodAutoscalers, for the one-writer rule at every evaluation.
//!
//! A Controller policy whose target an HPA drives is reported at its first evaluation (a
//! condition, a Warning event, `kscale dry-run`'s output), not only when kscale wants to write.
//! Checking at every evaluation with a list would cost one request per policy per interval, so
//! the daemon watches HPAs as it watches pods; `kscale dry-run` and the like list. The scale
//! write itself still lists right before writing ([`ScaleTarget::check_no_hpa`]), so an HPA
//! created since the watch last heard is never overwritten.

use futures::FutureExt as _;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::Client;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};

use crate::actuate::{ActuateError, KindCache, ScaleTarget};

/// Where the HPAs come from.
#[derive(Clone)]
pub enum Hpas {
    /// A list request per check (one-shot callers such as `kscale dry-run`).
    Listing,
    /// A watch's store; until it has synced, a check lists.
    Watch(Store<HorizontalPodAutoscaler>),
}

impl Hpas {
    /// Starts a watch of the HPAs of `namespace` (all namespaces when `None`) on the current
    /// runtime; the handle stops it when aborted.
    pub fn watch(client: Client, namespace: Option<&str>) -> (Hpas, tokio::task::JoinHandle<()>) {
        let api: Api<HorizontalPodAutoscaler> = match namespace {
            Some(ns) => Api::namespaced(client, ns),
            None => Api::all(client),
        };
        let (reader, writer) = reflector::store();
        let stream = reflector::reflector(
            writer,
            watcher(api, watcher::Config::default())
                .default_backoff()
                .modify(|hpa| {
                    // Only the namespace, name and scaleTargetRef are read.
                    hpa.metadata.managed_fields = None;
                    hpa.metadata.annotations = None;
                    hpa.status = None;
                }),
        )
        .applied_objects();
        let task = crate::source::spawn_watch(stream, "HorizontalPodAutoscaler");
        (Hpas::Watch(reader), task)
    }

    /// The one-writer rule for `target`: [`ActuateError::HpaConflict`] when an HPA drives it,
    /// or the error of listing them.
    pub async fn check(
        &self,
        client: &Client,
        kinds: &KindCache,
        target: &ScaleTarget,
    ) -> Result<(), ActuateError> {
        match self {
            Hpas::Watch(store) if store.wait_until_ready().now_or_never().is_some() => {
                let all = store.state();
                target
                    .check_no_hpa_among(client, Some(kinds), all.iter().map(|h| h.as_ref()))
                    .await
            }
            _ => target.check_no_hpa(client, Some(kinds)).await,
        }
    }
}
