//! The scaling controller: watches ScalingPolicies, reads their metrics, evaluates them with the
//! pure core and acts on the decision.
//!
//! Kubernetes state arrives through watches: a reflector store of ScalingPolicies (with
//! `DeserializeGuard`, so one malformed object cannot stop it) and one of pods. The loop wakes at
//! the next due time (and at least every 100 ms to notice new or changed policies, which are due
//! at once). Due times are aligned to multiples of each interval, so policies with the same
//! interval run in the same tick and every distinct PromQL query of a tick is sent once per
//! server ([`servers`]). Each server's queries form one group under the server's own deadline;
//! the loop does not wait for them: a group's policies are evaluated as soon as its answers are
//! in (policies without Prometheus queries at once), so a slow or silent server delays only its
//! own policies and the next ticks go on meanwhile. Evaluations run concurrently (at most
//! `--max-concurrent-evaluations`), those whose query answers changed first: each reads its
//! target's scale subresource, evaluates, writes the scale
//! (mode `Controller` only, only on a change, and only by the one policy that owns the target),
//! records an Event, and writes the status (server-side apply, field manager `kscale`).
//!
//! With leader election ([`leader`]), every replica keeps the watch warm but only the Lease
//! holder evaluates and writes; a new leader starts from the history in each policy's status.
//! With `--shards N` ([`shards`]) each replica evaluates and writes the policies of the shards
//! whose Leases it holds, and takes a shard over from the history in status in the same way.

pub mod forecast;
pub mod formula_budget;
pub mod hpas;
pub mod leader;
pub use crate::permissions;
pub mod scales;
pub mod servers;
pub mod shards;
pub mod sources;
pub mod takeover;
pub mod writes;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::DeserializeGuard;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::actuate::{
    ActuateError, FIELD_MANAGER, ScaleState, ScaleTarget, TargetKey, WriteOutcome,
};
use crate::crd::{Mode, ScalingPolicy, ScalingPolicyStatus};
use crate::model::{Observation, Sample};
use crate::policy::{CompiledPolicy, Decision, MetricSource};
use crate::source::pods::PodCache;
use crate::source::resource::{ResourceName, sample as resource_sample};
use crate::status::{k8s_time, status_from_decision};

pub use crate::source::query::{History, NO_PROMETHEUS, QueryBackend, Unavailable};

/// What the controller needs.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// Prometheus: the daemon's default and the policies' own servers.
    pub servers: servers::Servers,
    /// Event recorder.
    pub recorder: Recorder,
    /// The daemon's own metrics.
    pub metrics: Arc<crate::telemetry::Metrics>,
    /// Only this namespace's ScalingPolicies (all namespaces when `None`).
    pub watch_namespace: Option<String>,
    /// This instance's name in events.
    pub instance: String,
    /// The targets' pods (a watch in the daemon, a list per call elsewhere).
    pub pods: PodCache,
    /// Interval of policies without `spec.interval` (`--default-interval`).
    pub default_interval: chrono::TimeDelta,
    /// Discovery answers for the targets' kinds.
    pub kinds: crate::actuate::KindCache,
    /// The targets' scale (a `GET` per read, or from the watch of the targets' metadata in the
    /// daemon).
    pub scales: scales::Scales,
    /// Policies evaluated at once (`--max-concurrent-evaluations`).
    pub concurrency: usize,
    /// The external metrics adapter's cache, filled after every evaluation when it serves.
    pub external_metrics: Option<Arc<crate::adapter::Cache>>,
    /// The ScalingPolicy store, set once it has synced: the forwarding adapter keeps the names
    /// these policies publish for itself ([`crate::adapter::forward`]).
    pub synced_policies: crate::adapter::forward::SyncedPolicies,
    /// Forecasting state of the policies with `spec.forecast`.
    pub forecasts: forecast::Forecasts,
    /// Whether this replica may write now; checked right before every write (scale, status,
    /// events).
    pub leadership: leader::Leadership,
    /// Retries of a scale write that got 409 Conflict (`--scale-conflict-retries`).
    pub scale_conflict_retries: u32,
    /// The scale events this replica applied, merged with those read back from status.
    pub scale_events: writes::ScaleMemory,
    /// The run-time budget of formulas (`--formula-timeout`) and the ones refused for overrunning.
    pub formulas: formula_budget::FormulaBudget,
    /// The HorizontalPodAutoscalers, for the one-writer rule at every evaluation (a watch in the
    /// daemon, a list per call elsewhere).
    pub hpas: hpas::Hpas,
    /// Failures already logged (permission errors, repeated failures): logged once each.
    pub reported: permissions::Once,
}

impl Context {
    /// A context reporting events as `kscale` from `instance`.
    pub fn new(
        client: Client,
        prometheus: Arc<dyn QueryBackend>,
        instance: Option<String>,
    ) -> Context {
        let instance_name = instance.clone().unwrap_or_else(|| "kscale".into());
        let reporter = Reporter {
            controller: "kscale".into(),
            instance,
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            pods: PodCache::listing(client.clone()),
            default_interval: crate::policy::compile::DEFAULT_INTERVAL,
            kinds: crate::actuate::KindCache::default(),
            scales: scales::Scales::Reading,
            concurrency: 16,
            servers: servers::Servers::new(
                client.clone(),
                prometheus,
                Duration::from_secs(10),
                Vec::new(),
            ),
            client,
            metrics: Arc::new(crate::telemetry::Metrics::new()),
            watch_namespace: None,
            instance: instance_name,
            external_metrics: None,
            synced_policies: crate::adapter::forward::SyncedPolicies::default(),
            forecasts: forecast::Forecasts::default(),
            leadership: leader::Leadership::always(),
            scale_conflict_retries: 3,
            scale_events: writes::ScaleMemory::default(),
            formulas: formula_budget::FormulaBudget::default(),
            hpas: hpas::Hpas::Listing,
            reported: permissions::Once::default(),
        }
    }
}

/// Why one live evaluation could not complete; each names the policy and the cause.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The spec does not validate.
    #[error("policy {policy} is invalid: {errors}")]
    Invalid {
        /// Policy.
        policy: String,
        /// Problems.
        errors: crate::policy::ValidationErrors,
    },
    /// The target could not be resolved, read or written.
    #[error("policy {policy}: {source}")]
    Target {
        /// Policy.
        policy: String,
        /// Cause.
        source: ActuateError,
    },
}

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The evaluation failed (reported in status and events).
    #[error(transparent)]
    Eval(#[from] EvalError),
    /// This replica does not hold the leader Lease (any more): nothing was written.
    #[error("policy {policy}: {source}")]
    NotLeader {
        /// Policy.
        policy: String,
        /// Why.
        source: leader::NotLeader,
    },
    /// Writing status failed.
    #[error("policy {policy}: writing status: {}", crate::api_error::human(.source))]
    Status {
        /// Policy.
        policy: String,
        /// Cause.
        source: Box<kube::Error>,
    },
}

/// The result of one live evaluation.
#[derive(Debug)]
pub struct Evaluated {
    /// The compiled policy.
    pub policy: CompiledPolicy,
    /// What the target's scale said.
    pub scale: ScaleState,
    /// The decision (state already updated if the scale was written).
    pub decision: Decision,
    /// Whether the scale subresource was written.
    pub wrote: bool,
    /// Why nothing was written although the decision changed the count.
    pub not_written: Option<String>,
    /// Scale writes refused with 409 Conflict (the scale changed between read and write), each
    /// followed by a fresh read and a new decision.
    pub conflicts: u32,
    /// The replica count first read, when a conflict made the decision start again from a
    /// fresh read.
    pub first_read: Option<i32>,
    /// A Controller policy's target that an HPA drives ([`ActuateError::HpaConflict`]): found
    /// at every evaluation, dry runs included; nothing is written while it lasts.
    pub hpa_conflict: Option<ActuateError>,
    /// Shadow mode: a DryRun policy's target driven by an HPA, with the HPA's name and its
    /// `status.desiredReplicas`.
    pub shadow: Option<(String, i32)>,
    /// `spec.takeover` carried out at this evaluation, for `status.takeover`.
    pub took_over: Option<crate::crd::TakeoverStatus>,
    /// `spec.takeover` not carried out yet, and why (it waits for valid metrics, or this is a
    /// dry run), for the reason and `kscale dry-run`.
    pub takeover_pending: Option<String>,
}

/// The PromQL queries of a policy's Prometheus metrics.
pub fn queries_of(policy: &CompiledPolicy) -> impl Iterator<Item = &str> {
    policy.metrics.iter().filter_map(|m| match &m.source {
        MetricSource::Prometheus { query } => Some(query.as_str()),
        _ => None,
    })
}

fn pod_ready(p: &Pod) -> bool {
    p.status.as_ref().is_some_and(|s| {
        s.phase.as_deref() == Some("Running")
            && s.conditions
                .as_ref()
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    })
}

/// Reads everything `policy` needs and evaluates it at `now`: the target's scale, its pods, the
/// given Prometheus samples (by query) and resource metrics. With `write`, a changed count is
/// written to the scale subresource (after the one-writer check against `writers`, the writing
/// policy of each normalized target, and the leader check), conditionally on the scale read: if
/// the scale changed in between (409 Conflict), it is read again and the decision is made again
/// by [`evaluate`] from the fresh count, at most `ctx.scale_conflict_retries` times. Shared by
/// the controller and `kscale dry-run` (which never writes).
pub async fn evaluate_live(
    ctx: &Context,
    resource: &ScalingPolicy,
    policy: CompiledPolicy,
    prometheus: &HashMap<String, Sample>,
    now: DateTime<Utc>,
    write: bool,
    writers: Option<&HashMap<TargetKey, String>>,
) -> Result<Evaluated, EvalError> {
    let name = format!(
        "{}/{}",
        resource.namespace().unwrap_or_default(),
        resource.name_any()
    );
    let namespace = resource.namespace().unwrap_or_default();
    let target_err = |source| EvalError::Target {
        policy: name.clone(),
        source,
    };
    let target = ScaleTarget::resolve_cached(
        &ctx.client,
        Some(&ctx.kinds),
        &namespace,
        &resource.spec.target_ref,
    )
    .await
    .map_err(target_err)?;
    let mut scale = ctx.scales.read(&target).await.map_err(target_err)?;
    // spec.takeover waits for this evaluation's metrics: it is carried out below, once every
    // metric is valid, so a policy whose metrics fail never stops a working HPA.
    let pending = pending_takeover(resource, &policy);
    let mut hpa_conflict = hpa_conflict(ctx, &name, &policy, &target).await;
    let shadow = shadow_of(ctx, &name, &policy, &target).await;

    // The target's pods, read once for the readiness count and every resource metric.
    let pods: Option<Result<Vec<Pod>, String>> = match &scale.selector {
        Some(selector) => Some(
            ctx.pods
                .pods(&namespace, selector)
                .await
                .map_err(|e| e.to_string()),
        ),
        None => None,
    };
    // Without a selector, or without the pods, the ready count is unknown: it is never made up
    // from status.replicas. What needs it (a Value target's proposal, resource metrics) fails
    // naming why; an AverageValue target needs only status.replicas and still decides.
    let (pod_count, ready) = match &pods {
        Some(Ok(list)) => (
            list.len() as i32,
            list.iter().filter(|p| pod_ready(p)).count() as i32,
        ),
        Some(Err(e)) => {
            warn!(policy = %name, error = %e, "reading the target's pods failed; what needs the ready count holds");
            (0, 0)
        }
        None => (0, 0),
    };
    let pods_unknown = pods_unknown(&scale, &pods);

    let mut samples = Vec::with_capacity(policy.metrics.len());
    for m in &policy.metrics {
        let sample = match &m.source {
            MetricSource::Prometheus { query } => {
                sources::value_needs_pods(&pods_unknown, m.target).unwrap_or_else(|| {
                    prometheus
                        .get(query.as_str())
                        .cloned()
                        .unwrap_or(Sample::Missing {
                            reason: "the query was not run this tick".into(),
                        })
                })
            }
            MetricSource::Resource { cpu, container } => match (&scale.selector, &pods) {
                (Some(selector), Some(Ok(list))) => {
                    resource_sample(
                        &ctx.client,
                        &namespace,
                        selector,
                        list,
                        ResourceName::from_cpu_flag(*cpu),
                        container.as_deref(),
                    )
                    .await
                }
                _ => Sample::Error {
                    message: pods_unknown
                        .clone()
                        .unwrap_or_else(|| "the target's pods are unknown".into()),
                },
            },
            other => {
                let list = match &pods {
                    Some(Ok(list)) => Some(list.as_slice()),
                    _ => None,
                };
                let needs = (scale.selector.as_deref(), list, &pods_unknown);
                sources::sample(ctx, &namespace, other, m.target, needs)
                    .await
                    .unwrap_or(Sample::Missing {
                        reason: "no source read this metric".into(),
                    })
            }
        };
        samples.push(sample);
    }
    // The forecast's history comes from the policy's own server (only read when it forecasts).
    let history_backend = match policy.forecast {
        Some(_) => ctx.servers.backend_for(&namespace, &policy).await,
        None => ctx.servers.default_backend().clone(),
    };
    let forecasts = ctx
        .forecasts
        .predict(
            history_backend.as_ref(),
            &name,
            resource.metadata.generation,
            &policy,
            &samples,
            now,
        )
        .await;
    let mut obs = Observation {
        spec_replicas: scale.spec_replicas,
        status_replicas: scale.status_replicas,
        ready_replicas: ready,
        pods: pod_count,
        forecasts,
        samples,
    };
    // Status values are checked and saturated, and merged with the scale events this replica
    // applied (a failed status write does not lose them).
    let mut history = ctx.scale_events.history(resource, now);
    let generation = resource.metadata.generation;
    // A formula runs off the async workers under its run-time budget.
    let (mut policy, mut decision) = ctx
        .formulas
        .evaluate(&name, generation, policy, obs.clone(), history.clone(), now)
        .await;
    let mut took_over = None;
    let mut takeover_pending = None;
    if let Some(spec) = pending {
        let other_writer = writers
            .and_then(|w| w.get(&target.key))
            .filter(|w| **w != name);
        match (takeover_blocker(&policy, &decision, other_writer), write) {
            (Some(why), _) => {
                takeover_pending = Some(format!("takeover of HPA {} waits: {why}", spec.hpa));
            }
            (None, false) => {
                takeover_pending = Some(format!(
                    "dry run: the daemon takes HPA {} over ({:?}) at this evaluation",
                    spec.hpa,
                    spec.action.unwrap_or_default()
                ));
            }
            (None, true) => {
                ctx.leadership
                    .check_policy(&namespace, &resource.name_any())
                    .map_err(|e| target_err(target.not_leader(e)))?;
                let t = takeover::take_over(
                    &ctx.client,
                    &ctx.kinds,
                    &name,
                    spec,
                    &target,
                    scale.spec_replicas,
                    now,
                )
                .await
                .map_err(target_err)?;
                // The HPA just deleted or disabled may still be in the watch's store.
                if let Some(ActuateError::HpaConflict { hpa, .. }) = &hpa_conflict
                    && *hpa == t.hpa
                {
                    hpa_conflict = None;
                }
                // The HPA's recommendations are lost with it: the scale-down window starts full
                // of the count taken over, so nothing goes down before it has passed.
                history
                    .recommendations
                    .push(crate::policy::state::Recommendation {
                        replicas: t.replicas,
                        time: now,
                    });
                (policy, decision) = ctx
                    .formulas
                    .evaluate(&name, generation, policy, obs.clone(), history.clone(), now)
                    .await;
                took_over = Some(t);
            }
        }
    }
    let mut wrote = false;
    let mut not_written = None;
    let mut conflicts = 0u32;
    let first_read = scale.spec_replicas;
    while decision.replicas != decision.current {
        if let Some(conflict) = &hpa_conflict {
            not_written = Some(match &takeover_pending {
                Some(pending) => format!("{conflict}; {pending}"),
                None => conflict.to_string(),
            });
            break;
        }
        match policy.mode {
            Mode::Controller if write => {
                let other = writers
                    .and_then(|w| w.get(&target.key))
                    .filter(|w| **w != name);
                if let Some(other) = other {
                    return Err(target_err(ActuateError::PolicyConflict {
                        kind: resource.spec.target_ref.kind.clone(),
                        namespace: namespace.clone(),
                        name: resource.spec.target_ref.name.clone(),
                        policy: other.clone(),
                    }));
                }
                target
                    .check_no_hpa(&ctx.client, Some(&ctx.kinds))
                    .await
                    .map_err(target_err)?;
                // Right before the write: this replica still holds the valid Lease of the
                // policy's shard.
                ctx.leadership
                    .check_policy(&namespace, &resource.name_any())
                    .map_err(|e| target_err(target.not_leader(e)))?;
                let written = target.write(decision.replicas, &scale).await;
                // Whatever came of it, the next read asks the apiserver.
                ctx.scales.forget(&target);
                match written.map_err(target_err)? {
                    WriteOutcome::Written => {
                        decision.record_applied(&policy, now);
                        ctx.scale_events.remember(resource, &decision.state);
                        wrote = true;
                        break;
                    }
                    WriteOutcome::Conflict => {
                        conflicts += 1;
                        if conflicts > ctx.scale_conflict_retries {
                            return Err(target_err(
                                target.conflict(conflicts, ctx.scale_conflict_retries),
                            ));
                        }
                        info!(policy = %name, from = scale.spec_replicas, to = decision.replicas, "the scale changed between read and write (409 Conflict); reading it again");
                        // Someone else scaled in between: decide again from what is there now.
                        scale = target.read().await.map_err(target_err)?;
                        obs.spec_replicas = scale.spec_replicas;
                        obs.status_replicas = scale.status_replicas;
                        (policy, decision) = ctx
                            .formulas
                            .evaluate(&name, generation, policy, obs.clone(), history.clone(), now)
                            .await;
                    }
                }
            }
            Mode::Controller => {
                not_written = Some("dry run: nothing is written".to_string());
                break;
            }
            Mode::DryRun => {
                not_written = Some("mode DryRun: kscale reports and never writes".to_string());
                break;
            }
            Mode::ExternalMetric => {
                not_written = Some(
                    "mode ExternalMetric: the decision is published for an HPA, which stays the writer"
                        .to_string(),
                );
                break;
            }
        }
    }
    ctx.scale_events
        .remember_activity(resource, decision.state.last_active_time);
    ctx.scale_events
        .remember_recommendations(resource, &decision.state);
    Ok(Evaluated {
        policy,
        scale,
        decision,
        wrote,
        not_written,
        conflicts,
        first_read: (conflicts > 0).then_some(first_read),
        hpa_conflict,
        shadow,
        took_over,
        takeover_pending,
    })
}

/// The policy's `spec.takeover` when it is still to be carried out: a Controller policy whose
/// status records no takeover of that HPA (none yet, or one of another HPA before the spec
/// named this one).
fn pending_takeover<'a>(
    resource: &'a ScalingPolicy,
    policy: &CompiledPolicy,
) -> Option<&'a crate::crd::TakeoverSpec> {
    let spec = resource.spec.takeover.as_ref()?;
    let done = resource
        .status
        .as_ref()
        .and_then(|s| s.takeover.as_ref())
        .is_some_and(|t| t.hpa == spec.hpa);
    (policy.mode == Mode::Controller && !done).then_some(spec)
}

/// Why a pending takeover must wait, if it must: a failing metric or formula (kscale would
/// stop a working HPA and then only hold the count), or another policy that writes the target.
/// `None` when it may go ahead.
fn takeover_blocker(
    policy: &CompiledPolicy,
    decision: &crate::policy::Decision,
    other_writer: Option<&String>,
) -> Option<String> {
    if let Some(other) = other_writer {
        return Some(format!("policy {other} writes this target"));
    }
    if let Some(e) = &decision.formula_error {
        return Some(format!("the formula failed ({e})"));
    }
    let failing: Vec<String> = policy
        .metrics
        .iter()
        .zip(&decision.metrics)
        .filter(|(_, o)| o.state.is_failure() || o.state == crate::policy::MetricState::Partial)
        .map(|(m, o)| format!("metric {} {}", m.name, o.state.described()))
        .collect();
    (!failing.is_empty()).then(|| {
        format!(
            "{}, and kscale takes over only on valid metrics",
            failing.join(", ")
        )
    })
}

/// Shadow mode: for a DryRun policy, the HPA that drives its target and the replica count it
/// wants (`status.desiredReplicas`), if one does. When the HPAs cannot be read, the evaluation
/// goes on without (reported once while it lasts).
async fn shadow_of(
    ctx: &Context,
    name: &str,
    policy: &CompiledPolicy,
    target: &ScaleTarget,
) -> Option<(String, i32)> {
    if policy.mode != Mode::DryRun {
        return None;
    }
    match ctx
        .hpas
        .desired_by_hpa(&ctx.client, &ctx.kinds, target)
        .await
    {
        Ok(found) => {
            ctx.reported.clear(&format!("shadow/{name}"));
            found
        }
        Err(e) => {
            let error = e.to_string();
            if ctx.reported.first(&format!("shadow/{name}"), &error) {
                warn!(policy = %name, %error, "reading the HPA beside a DryRun policy failed (reported once while it lasts)");
            }
            None
        }
    }
}

/// The one-writer rule at every evaluation of a Controller policy (not only before a write, so
/// the conflict shows at once, in dry runs too): the HPA that drives the target, if one does.
/// When the HPAs cannot be read, the evaluation goes on; the write checks again and fails then.
async fn hpa_conflict(
    ctx: &Context,
    name: &str,
    policy: &CompiledPolicy,
    target: &ScaleTarget,
) -> Option<ActuateError> {
    if policy.mode != Mode::Controller {
        return None;
    }
    match ctx.hpas.check(&ctx.client, &ctx.kinds, target).await {
        Ok(()) => {
            ctx.reported.clear(&format!("hpas/{name}"));
            None
        }
        Err(conflict @ ActuateError::HpaConflict { .. }) => Some(conflict),
        Err(e) => {
            let error = e.to_string();
            if ctx.reported.first(&format!("hpas/{name}"), &error) {
                warn!(policy = %name, %error, "checking for an HPA on the target failed (reported once while it lasts)");
            }
            None
        }
    }
}

/// Why the target's ready pods are unknown, if they are: its scale has no selector (the HPA
/// refuses such a target: "selector is required"), or its pods could not be read.
fn pods_unknown(
    scale: &crate::actuate::ScaleState,
    pods: &Option<Result<Vec<Pod>, String>>,
) -> Option<String> {
    match (&scale.selector, pods) {
        (None, _) => Some(
            "selector is required: the target's scale subresource has no status.selector (for a custom resource, its CRD's scale subresource sets no labelSelectorPath), so its pods are unknown"
                .into(),
        ),
        (_, Some(Err(e))) => Some(format!("the target's pods could not be read: {e}")),
        _ => None,
    }
}

fn object_ref(p: &ScalingPolicy) -> ObjectReference {
    p.object_ref(&())
}

async fn publish(ctx: &Context, p: &ScalingPolicy, type_: EventType, reason: &str, note: String) {
    publish_on(ctx, &object_ref(p), type_, reason, "Scale", note).await;
}

/// Publishes an event with `action` (the Event API's "what was done or failed": `Scale`, or
/// `GetMetric NAME`). The recorder folds events of one reason and action into a series.
async fn publish_on(
    ctx: &Context,
    regarding: &ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    // Right before the write: this replica still holds the valid Lease of the policy's shard.
    if ctx
        .leadership
        .check_policy(
            regarding.namespace.as_deref().unwrap_or_default(),
            regarding.name.as_deref().unwrap_or_default(),
        )
        .is_err()
    {
        debug!(
            reason,
            "event not published: this replica is not the leader"
        );
        return;
    }
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    let namespace = regarding.namespace.as_deref().unwrap_or_default();
    match ctx.recorder.publish(&event, regarding).await {
        Ok(()) => event_published(ctx, namespace),
        Err(e) => event_failed(ctx, namespace, reason, &e),
    }
}

/// Logs a failed Event write once per namespace and failure (a 403 names the grant), then at
/// debug while it lasts.
fn event_failed(ctx: &Context, namespace: &str, reason: &str, e: &kube::Error) {
    let error = permissions::explain(e, permissions::Access::Events { namespace });
    if ctx.reported.first(&format!("events/{namespace}"), &error) {
        warn!(%error, reason, "publishing an event failed (reported once while it lasts)");
    } else {
        debug!(%error, reason, "publishing an event failed again");
    }
}

fn event_published(ctx: &Context, namespace: &str) {
    if ctx.reported.clear(&format!("events/{namespace}")) {
        info!(namespace, "publishing events works again");
    }
}

/// Records a rescale as an Event of its own. kube's `Recorder` folds every event with the same
/// reason into one series and keeps the first note, so a second rescale would show the first
/// one's sizes and reason; each rescale is a distinct fact, so it gets a distinct Event.
async fn publish_rescale(ctx: &Context, p: &ScalingPolicy, note: String) {
    publish_fact(ctx, p, "SuccessfulRescale", note).await;
}

/// Records a Normal Event of its own (not folded into an earlier one with the same reason).
async fn publish_fact(ctx: &Context, p: &ScalingPolicy, reason: &str, note: String) {
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let namespace = p.namespace().unwrap_or_default();
    let now = k8s_openapi::jiff::Timestamp::now();
    let event = K8sEvent {
        metadata: kube::api::ObjectMeta {
            name: Some(format!("{}.{:x}", p.name_any(), now.as_nanosecond())),
            namespace: Some(namespace.clone()),
            ..Default::default()
        },
        action: Some("Scale".into()),
        event_time: Some(MicroTime(now)),
        note: Some(note),
        reason: Some(reason.into()),
        regarding: Some(object_ref(p)),
        reporting_controller: Some("kscale".into()),
        reporting_instance: Some(ctx.instance.clone()),
        type_: Some("Normal".into()),
        ..Default::default()
    };
    let api: Api<K8sEvent> = Api::namespaced(ctx.client.clone(), &namespace);
    // Right before the write: this replica still holds the valid Lease of the policy's shard.
    if ctx
        .leadership
        .check_policy(&namespace, &p.name_any())
        .is_err()
    {
        debug!(
            reason,
            "event not published: this replica is not the leader"
        );
        return;
    }
    match api.create(&PostParams::default(), &event).await {
        Ok(_) => event_published(ctx, &namespace),
        Err(e) => event_failed(ctx, &namespace, reason, &e),
    }
}

async fn write_status(
    ctx: &Context,
    p: &ScalingPolicy,
    status: &ScalingPolicyStatus,
) -> Result<(), PolicyError> {
    let api: Api<ScalingPolicy> =
        Api::namespaced(ctx.client.clone(), &p.namespace().unwrap_or_default());
    let body = serde_json::json!({"apiVersion": "kscale.dev/v1alpha1", "kind": "ScalingPolicy", "status": status});
    let name = format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
    // Right before the write: this replica still holds the valid Lease of the policy's shard.
    ctx.leadership
        .check_policy(&p.namespace().unwrap_or_default(), &p.name_any())
        .map_err(|source| PolicyError::NotLeader {
            policy: name.clone(),
            source,
        })?;
    api.patch_status(
        &p.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map(|_| ())
    .map_err(|e| PolicyError::Status {
        policy: name,
        source: Box::new(e),
    })
}

impl PolicyError {
    /// The error as logged: a status write refused with 403 names the grant to add.
    fn explained(&self) -> String {
        match self {
            PolicyError::Status { policy, source } => {
                let namespace = policy.split('/').next().unwrap_or_default();
                format!(
                    "policy {policy}: writing status: {}",
                    permissions::explain(source, permissions::Access::Status { namespace })
                )
            }
            other => other.to_string(),
        }
    }
}

/// Whether the policy's status already reports this failure (Ready False, same reason and
/// message).
fn same_failure(p: &ScalingPolicy, reason: &str, message: &str) -> bool {
    p.status.as_ref().is_some_and(|s| {
        s.conditions.iter().any(|c| {
            c.type_ == "Ready" && c.status == "False" && c.reason == reason && c.message == message
        })
    })
}

/// The HPA's event reason for a metric it could not read, by source.
fn metric_failure_reason(source: &crate::policy::MetricSource) -> &'static str {
    match source {
        crate::policy::MetricSource::Prometheus { .. } => "FailedGetExternalMetric",
        crate::policy::MetricSource::Resource { .. } => "FailedGetResourceMetric",
        crate::policy::MetricSource::Pods { .. } => "FailedGetPodsMetric",
        crate::policy::MetricSource::Object { .. } => "FailedGetObjectMetric",
        crate::policy::MetricSource::External { .. } => "FailedGetExternalMetric",
    }
}

/// The metrics of `decision` that failed where the last status had them in another state (valid,
/// or failing another way): a new failure, as opposed to one that lasts.
fn new_metric_failures<'a>(
    p: &ScalingPolicy,
    policy: &'a CompiledPolicy,
    decision: &'a crate::policy::Decision,
) -> Vec<(
    &'a crate::policy::CompiledMetric,
    &'a crate::policy::MetricOutcome,
)> {
    policy
        .metrics
        .iter()
        .zip(&decision.metrics)
        .filter(|(_, o)| o.state.is_failure())
        .filter(|(m, o)| {
            let before = p
                .status
                .as_ref()
                .and_then(|s| s.metrics.iter().find(|old| old.name == m.name));
            before.is_none_or(|old| old.state != o.state.as_str())
        })
        .collect()
}

/// A Warning event per metric that newly failed (the HPA's `FailedGetExternalMetric` /
/// `FailedGetResourceMetric`), once per new failure rather than once per interval: the status
/// written after it records the metric's state, which the next evaluation compares with.
async fn publish_metric_failures(
    ctx: &Context,
    p: &ScalingPolicy,
    policy: &CompiledPolicy,
    decision: &crate::policy::Decision,
) {
    let outcome = crate::status::short_reason(policy, decision);
    for (m, o) in new_metric_failures(p, policy, decision) {
        let note = format!(
            "metric {}: {}: {}; the decision: {outcome}",
            m.name,
            o.state.as_str().to_lowercase(),
            o.message.as_deref().unwrap_or("unusable"),
        );
        warn!(policy = %p.name_any(), namespace = %p.namespace().unwrap_or_default(), metric = %m.name, state = o.state.as_str(), %note, "metric failed (reported once per new failure)");
        // One series per metric: the recorder groups events by reason and action, not by note,
        // so two metrics failing under one action would show only the first one's note.
        publish_on(
            ctx,
            &object_ref(p),
            EventType::Warning,
            metric_failure_reason(&m.source),
            &format!("GetMetric {}", m.name),
            note,
        )
        .await;
    }
}

/// A status for a policy that could not be evaluated: the condition says why, the history is kept.
fn failure_status(
    p: &ScalingPolicy,
    reason: &str,
    message: String,
    now: DateTime<Utc>,
) -> ScalingPolicyStatus {
    let mut status = p.status.clone().unwrap_or_default();
    status.observed_generation = p.metadata.generation;
    status.last_evaluation_time = Some(now);
    status.reason = Some(message.clone());
    status.short_reason = Some(reason.into());
    // No evaluation: the last values are no longer current.
    status.targets = None;
    let condition = k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        type_: "Ready".into(),
        status: "False".into(),
        reason: reason.into(),
        message,
        // Ready was already False: it did not transition now.
        last_transition_time: status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready" && c.status == "False")
            .map_or_else(|| k8s_time(now), |c| c.last_transition_time.clone()),
        observed_generation: p.metadata.generation,
    };
    status.conditions.retain(|c| c.type_ != "Ready");
    status.conditions.push(condition);
    status
}

/// The `Ready` condition of an evaluation that completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyCondition {
    /// True: kscale scales the target on valid metrics as the policy says.
    pub status: bool,
    /// `Evaluated`, `ConflictingHPA`, `TakeoverPending` (the HPA that `spec.takeover` names
    /// still drives the target) or `MetricsUnavailable`.
    pub reason: &'static str,
    /// Why, naming the HPA or each failing metric and its cause.
    pub message: String,
}

/// `Ready` is True only when the policy works as written: evaluated, free to write (no HPA on
/// its target) and every metric valid. A failing metric makes it False (`MetricsUnavailable`,
/// naming each metric and why, e.g. the missing `--prometheus-url`), so `kubectl wait
/// --for=condition=Ready` and alerts on `kscale_policy_ready` see a policy that only holds or
/// applies its fallback. `MetricsAvailable` says the same per decision, `ScalingActive` whether
/// the fallback decided.
pub fn ready_condition(e: &Evaluated) -> ReadyCondition {
    use crate::policy::MetricState;
    if let Some(conflict) = &e.hpa_conflict {
        return match &e.takeover_pending {
            Some(pending) => ReadyCondition {
                status: false,
                reason: "TakeoverPending",
                message: format!("{conflict}; {pending}"),
            },
            None => ReadyCondition {
                status: false,
                reason: conflict.kind_label(),
                message: conflict.to_string(),
            },
        };
    }
    let failing: Vec<String> = e
        .policy
        .metrics
        .iter()
        .zip(&e.decision.metrics)
        .filter(|(_, o)| {
            !matches!(
                o.state,
                MetricState::Valid | MetricState::Partial | MetricState::NoPods
            )
        })
        .map(|(m, o)| {
            format!(
                "metric {} {}: {}",
                m.name,
                o.state.described(),
                o.message.as_deref().unwrap_or("unusable")
            )
        })
        .collect();
    if !failing.is_empty() {
        return ReadyCondition {
            status: false,
            reason: "MetricsUnavailable",
            message: format!(
                "{}; the decision holds or the fallback applies (see status.reason)",
                failing.join("; ")
            ),
        };
    }
    ReadyCondition {
        status: true,
        reason: "Evaluated",
        message: e
            .not_written
            .clone()
            .unwrap_or_else(|| "the policy is evaluated every interval".into()),
    }
}

/// Evaluates one policy and reports the outcome in status, events and logs. A follower
/// (`leading` false) serving external metrics only evaluates and publishes: no writes, no status,
/// no events.
pub async fn reconcile(
    ctx: &Context,
    p: &ScalingPolicy,
    compiled: Result<CompiledPolicy, crate::policy::ValidationErrors>,
    prometheus: &HashMap<String, Sample>,
    now: DateTime<Utc>,
    writers: Option<&HashMap<TargetKey, String>>,
    leading: bool,
) -> Result<(), PolicyError> {
    let name = format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
    let started = std::time::Instant::now();
    let result = match compiled {
        Ok(policy) => evaluate_live(ctx, p, policy, prometheus, now, leading, writers).await,
        Err(errors) => Err(EvalError::Invalid {
            policy: name.clone(),
            errors,
        }),
    };
    ctx.metrics
        .evaluation_seconds
        .observe(started.elapsed().as_secs_f64());
    if let Some(cache) = &ctx.external_metrics {
        use crate::adapter::Evaluation;
        let evaluation = match &result {
            Ok(e) => Evaluation::Decided {
                policy: &e.policy,
                decision: &e.decision,
            },
            Err(EvalError::Invalid { .. }) => Evaluation::Invalid,
            Err(EvalError::Target { .. }) => Evaluation::TargetUnreadable,
        };
        cache.record(
            &p.namespace().unwrap_or_default(),
            &p.name_any(),
            evaluation,
            prometheus,
            now,
        );
    }
    if !leading {
        // A follower only publishes; the leader reports.
        return result.map(|_| ()).map_err(PolicyError::from);
    }
    if let Err(EvalError::Target {
        source: ActuateError::NotLeader { source, .. },
        ..
    }) = &result
    {
        // Leadership lapsed during this tick: no status, no events (they would be writes too).
        return Err(PolicyError::NotLeader {
            policy: name,
            source: source.clone(),
        });
    }
    let status = match &result {
        Ok(e) => {
            ctx.metrics.record(
                &p.namespace().unwrap_or_default(),
                &e.policy,
                &p.name_any(),
                &e.decision,
                e.wrote,
            );
            let mut status = status_from_decision(
                &e.policy,
                &e.decision,
                p.status.as_ref(),
                p.metadata.generation,
                now,
            );
            let mut reason = e.decision.reason(&e.policy);
            if let Some(conflict @ ActuateError::HpaConflict { hpa, .. }) = &e.hpa_conflict
                && e.decision.replicas != e.decision.current
            {
                // The columns say that nothing is written, not a change that never happens.
                status.short_reason = Some(crate::status::truncate_chars(
                    format!(
                        "not written: HPA {hpa} drives the target (wants {}→{})",
                        e.decision.current, e.decision.replicas
                    ),
                    crate::status::MAX_SHORT_REASON_CHARS,
                ));
                reason = format!("{reason}; not written: {conflict}");
                status.reason = Some(reason.clone());
            }
            if let Some(pending) = &e.takeover_pending {
                reason = format!("{reason}; {pending}");
                status.reason = Some(reason.clone());
            }
            if let Some(t) = &e.took_over {
                let note = takeover::describe(t);
                reason = format!("{reason}; {note}");
                status.reason = Some(reason.clone());
                status.takeover = Some(t.clone());
                info!(policy = %name, hpa = %t.hpa, action = %t.action, replicas = t.replicas, "took over from the HPA");
                publish(ctx, p, EventType::Normal, "TakenOver", note).await;
            }
            if let Some((hpa, hpa_desired)) = &e.shadow {
                let divergence = e.decision.replicas - hpa_desired;
                status.shadow = Some(crate::crd::ShadowStatus {
                    hpa: hpa.clone(),
                    hpa_desired_replicas: *hpa_desired,
                    divergence,
                });
                reason = format!(
                    "{reason}; shadow: HPA {hpa} wants {hpa_desired} (kscale {divergence:+})"
                );
                status.reason = Some(reason.clone());
            }
            ctx.metrics.record_shadow(
                &p.namespace().unwrap_or_default(),
                &p.name_any(),
                e.shadow
                    .as_ref()
                    .map(|(_, d)| (*d, e.decision.replicas - d)),
            );
            if let Some(first) = e.first_read {
                reason = format!(
                    "{reason}; the scale changed between kscale's read ({first} replicas) and its write, {} time(s) (409 Conflict), so the decision was made again from a fresh read of {} replicas",
                    e.conflicts, e.decision.current
                );
                status.reason = Some(reason.clone());
            }
            info!(policy = %name, target = %p.spec.target_ref.name, current = e.decision.current, desired = e.decision.replicas, wrote = e.wrote, %reason, "evaluated");
            publish_metric_failures(ctx, p, &e.policy, &e.decision).await;
            if e.conflicts > 0 && !e.wrote {
                // The re-decision from the fresh count wrote nothing: say why nothing changed.
                publish(ctx, p, EventType::Normal, "ScaleConflict", reason.clone()).await;
            }
            if let Some((event, note)) = pause_transition(p.status.as_ref(), &status, &reason) {
                publish_fact(ctx, p, event, note).await;
            }
            if e.wrote {
                publish_rescale(
                    ctx,
                    p,
                    format!("New size: {}; reason: {reason}", e.decision.replicas),
                )
                .await;
            }
            let ready = ready_condition(e);
            if let Some(conflict) = &e.hpa_conflict {
                let message = conflict.to_string();
                // One event per new conflict, not one per interval while it lasts.
                if !same_failure(p, conflict.kind_label(), &message) {
                    warn!(policy = %name, error = %message, "the target has another writer; nothing is written while it lasts");
                    publish(ctx, p, EventType::Warning, conflict.kind_label(), message).await;
                }
            }
            status
                .conditions
                .push(k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                    type_: "Ready".into(),
                    status: if ready.status { "True" } else { "False" }.into(),
                    reason: ready.reason.into(),
                    message: ready.message,
                    last_transition_time: p
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
                        .filter(|c| c.status == if ready.status { "True" } else { "False" })
                        .map_or_else(|| k8s_time(now), |c| c.last_transition_time.clone()),
                    observed_generation: p.metadata.generation,
                });
            status
        }
        Err(EvalError::Invalid { errors, .. }) => {
            warn!(policy = %name, %errors, "invalid policy");
            let message = errors.to_string();
            // One event per new failure, not one per interval while it lasts.
            if !same_failure(p, "InvalidPolicy", &message) {
                publish(ctx, p, EventType::Warning, "InvalidPolicy", message.clone()).await;
            }
            failure_status(p, "InvalidPolicy", message, now)
        }
        Err(EvalError::Target { source, .. }) => {
            // Logged by the caller, once while it lasts.
            debug!(policy = %name, error = %source, "target");
            let label = source.kind_label();
            let message = source.to_string();
            if !same_failure(p, label, &message) {
                publish(ctx, p, EventType::Warning, label, message.clone()).await;
            }
            failure_status(p, label, message, now)
        }
    };
    let mut status = status;
    status.reference = Some(crate::status::reference(&p.spec.target_ref));
    let ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    ctx.metrics
        .record_ready(&p.namespace().unwrap_or_default(), &p.name_any(), ready);
    let compiled = result.as_ref().ok().map(|e| &e.policy);
    if status_changed(p.status.as_ref(), &status, status_refresh(compiled, ready)) {
        write_status(ctx, p, &status).await?;
    }
    result.map(|_| ()).map_err(PolicyError::from)
}

/// The event of a pause starting, changing or ending, judged from the stored status (so a
/// restart or a new leader publishes nothing for a pause already reported): `ScalingPaused` or
/// `ScalingResumed`, with its note.
fn pause_transition(
    old: Option<&ScalingPolicyStatus>,
    new: &ScalingPolicyStatus,
    reason: &str,
) -> Option<(&'static str, String)> {
    let before = old.and_then(|s| s.paused.as_deref());
    match (before, new.paused.as_deref()) {
        (None, None) => None,
        (a, b) if a == b => None,
        (None, Some(now)) => Some(("ScalingPaused", format!("Paused: {now}; {reason}"))),
        (Some(was), Some(now)) => Some((
            "ScalingPaused",
            format!("Paused: {now} (was {was}); {reason}"),
        )),
        (Some(was), None) => Some((
            "ScalingResumed",
            format!("No longer paused (was {was}); {reason}"),
        )),
    }
}

/// A status whose only news is the time (`lastEvaluationTime`; the times of recommendations
/// whose counts did not change; `lastActiveTime` while a metric stays active) is written at
/// least this often while the policy is not Ready (a policy that keeps failing the same way
/// shows it is retried), and at most this often otherwise ([`status_refresh`]).
const STATUS_REFRESH: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// The longest a Ready policy's status goes unwritten when only its times move: at 10,000
/// policies, 17 writes a second.
const STATUS_REFRESH_MAX: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

/// How long a status whose only news is the time may wait ([`status_changed`]): while `ready`,
/// half the shortest span its history is read over (the stabilization windows, the scale-to-zero
/// cooldown), so a new leader continues the same windows within that much, between
/// [`STATUS_REFRESH`] and [`STATUS_REFRESH_MAX`]; otherwise [`STATUS_REFRESH`].
fn status_refresh(policy: Option<&CompiledPolicy>, ready: bool) -> chrono::TimeDelta {
    let Some(policy) = policy.filter(|_| ready) else {
        return STATUS_REFRESH;
    };
    let windows = match &policy.behavior {
        Some(b) => vec![b.up.stabilization, b.down.stabilization],
        None => vec![policy.downscale_window],
    };
    windows
        .into_iter()
        .chain(policy.zero.map(|z| z.cooldown))
        .filter(|w| *w > chrono::TimeDelta::zero())
        .min()
        .map_or(STATUS_REFRESH_MAX, |w| w / 2)
        .clamp(STATUS_REFRESH, STATUS_REFRESH_MAX)
}

/// `status` with the times that move at every evaluation set aside: `lastEvaluationTime`,
/// recommendation times (their counts stay), and `lastActiveTime` while it is the evaluation's
/// own time (a metric still active).
fn without_times(status: &ScalingPolicyStatus) -> ScalingPolicyStatus {
    let mut s = status.clone();
    if s.history.last_active_time.is_some() && s.history.last_active_time == s.last_evaluation_time
    {
        s.history.last_active_time = None;
    }
    s.last_evaluation_time = None;
    let epoch = DateTime::<Utc>::UNIX_EPOCH;
    for r in &mut s.history.recommendations {
        r.time = epoch;
    }
    s
}

/// Within this long of the last status write, a status whose decision is unchanged (only metric
/// values, proposals, the reason's figures or recommendations moved) waits: one policy writes its
/// status at most once per this period unless its decision changes, whatever its interval.
const STATUS_MIN_PERIOD: chrono::TimeDelta = chrono::TimeDelta::seconds(5);

/// Whether `new` says something `old` does not, or `old` is older than `refresh`
/// ([`status_refresh`]). A change of decision (replicas, generation, conditions, scale events)
/// is written at once; any other change but the times at most every [`STATUS_MIN_PERIOD`]; a
/// change of the times alone ([`without_times`]) only after `refresh`.
fn status_changed(
    old: Option<&ScalingPolicyStatus>,
    new: &ScalingPolicyStatus,
    refresh: chrono::TimeDelta,
) -> bool {
    let Some(old) = old else { return true };
    let (Some(then), Some(now)) = (old.last_evaluation_time, new.last_evaluation_time) else {
        return true;
    };
    if now - then >= refresh {
        return true;
    }
    if without_times(new) == without_times(old) {
        return false;
    }
    if now - then >= STATUS_MIN_PERIOD {
        return true;
    }
    let decision = |s: &ScalingPolicyStatus| {
        (
            s.current_replicas,
            s.desired_replicas,
            s.observed_generation,
            s.conditions
                .iter()
                .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
                .collect::<Vec<_>>(),
            s.history.scale_up_events.clone(),
            s.history.scale_down_events.clone(),
            s.history.last_scale_time,
            s.history.consecutive_failures,
            s.history.scaled_to_zero_time,
            // The cooldown's start is written as soon as no metric is active any more (while
            // one is, it moves with every evaluation and waits like the values do).
            s.history
                .last_active_time
                .filter(|t| Some(*t) != s.last_evaluation_time),
            // A metric's state too: the failure events compare with it.
            s.metrics
                .iter()
                .map(|m| (m.name.clone(), m.state.clone()))
                .collect::<Vec<_>>(),
            // A takeover is done once: its record must not wait (the next evaluation would
            // take over again). The pause events are edge-triggered from the stored
            // `status.paused`: a pause written late would be announced again meanwhile.
            (s.takeover.clone(), s.paused.clone()),
        )
    };
    decision(old) != decision(new)
}

/// Runs the controller until `shutdown` resolves. With `election`, only the Lease holder
/// evaluates and writes, and the Lease is released on shutdown.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()>,
    election: Option<leader::LeaderConfig>,
) -> Result<(), watcher::Error> {
    if let Some(cfg) = &election {
        ctx.leadership.start_election(cfg.shards);
    }
    let campaign = election.clone().map(|cfg| {
        if cfg.shards > 1 {
            tokio::spawn(shards::campaign(
                ctx.client.clone(),
                cfg,
                ctx.leadership.clone(),
            ))
        } else {
            tokio::spawn(leader::campaign(
                ctx.client.clone(),
                cfg,
                ctx.leadership.clone(),
            ))
        }
    });
    let api: Api<DeserializeGuard<ScalingPolicy>> = match &ctx.watch_namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let (reader, writer) = reflector::store();
    // Counts the store's changes, so a wake-up with nothing due and nothing changed skips the
    // scan of every policy.
    let changes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = changes.clone();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(|p| strip_unread(p.meta_mut())),
    )
    .touched_objects()
    .inspect(move |_| {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    });
    let watch = crate::source::spawn_watch(stream, "ScalingPolicy");
    tokio::pin!(shutdown);
    tokio::select! {
        r = reader.wait_until_ready() => if r.is_err() { warn!("the ScalingPolicy store closed before its first sync"); },
        _ = &mut shutdown => { watch.abort(); return Ok(()); }
    }
    info!("ScalingPolicy watch synced");
    ctx.synced_policies.set(reader.clone());
    let mut state = TickState::default();
    let mut inflight: InFlight = FuturesUnordered::new();
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            Some(done) = inflight.next(), if !inflight.is_empty() => {
                // A server answered (or its deadline passed), or an evaluation finished: start
                // what is ready. Policies that waited for it are due at once; an evaluation
                // that ends unblocks only its own policy, so the loop does not scan every
                // policy after each one.
                let unblocks = match &done {
                    Done::Evaluated(key) => {
                        // Ready after the first sync and the first evaluation.
                        ctx.metrics.set_ready();
                        state.deferred.contains(key)
                    }
                    Done::Fetched { .. } => !state.deferred.is_empty(),
                };
                state.finish(done);
                state.start_ready(&ctx, &mut inflight);
                wait = if unblocks {
                    Duration::ZERO
                } else {
                    state.next_wait()
                };
                continue;
            }
            _ = &mut shutdown => break,
        }
        let held = ctx.leadership.held();
        let is_leader = held.iter().any(|h| *h);
        ctx.metrics.leader.set(i64::from(is_leader));
        ctx.metrics.record_shards(&held);
        if state.take_shards(held) {
            // A shard lost: its policies' decisions are exported by its new holder from now on.
            ctx.metrics.forget_decisions();
        }
        if !state.needs_tick(
            changes.load(std::sync::atomic::Ordering::Relaxed),
            Utc::now(),
        ) {
            // Nothing due and no policy changed: nothing to scan.
        } else if is_leader {
            run_tick(&ctx, &reader, &mut state, &mut inflight).await;
        } else if ctx.external_metrics.is_some() {
            // A follower that serves external metrics evaluates too, to publish the same values
            // as the leader; it writes nothing (no scale, status or events).
            run_tick(&ctx, &reader, &mut state, &mut inflight).await;
        } else {
            // A follower evaluates nothing.
            state.schedule.clear();
        }
        // Wake at the next due time, and at least every POLL to notice new or changed policies.
        wait = state.next_wait();
        // Ready after the first sync and the first tick's work (a follower is ready to take
        // over); with work in flight, at its first evaluation.
        if inflight.is_empty() {
            ctx.metrics.set_ready();
        }
    }
    // Evaluations under way finish (a scale write is followed by its status); queries still in
    // flight are dropped and nothing new starts.
    state.urgent.clear();
    state.normal.clear();
    while state.evaluating > 0 {
        match inflight.next().await {
            Some(Done::Evaluated(_)) => state.evaluating -= 1,
            Some(Done::Fetched { .. }) => {}
            None => break,
        }
    }
    watch.abort();
    if let Some(c) = campaign {
        c.abort();
    }
    match &election {
        Some(cfg) if cfg.shards > 1 => shards::release_all(&ctx.client, cfg).await,
        Some(cfg) => leader::release(&ctx.client, cfg).await,
        None => {}
    }
    info!("controller stopped");
    Ok(())
}

/// How long a policy's normalized target key is reused before it is resolved again (its
/// generation changing resolves it at once); discovery answers themselves are cached too.
const KEY_TTL_S: u64 = 60;

/// Each Controller policy's target, normalized through discovery ([`crate::actuate::target_key`]):
/// `apps/v1`, another version of `apps` and no `apiVersion` name the same Deployment. Kept in
/// `keys` per policy and generation for [`KEY_TTL_S`] (a failure too, so a policy naming an
/// unknown kind costs one discovery request per [`KEY_TTL_S`], not one per tick).
async fn target_keys(
    ctx: &Context,
    all: &[Arc<DeserializeGuard<ScalingPolicy>>],
    keys: &mut KeyCache,
) -> HashMap<ObjectRef<DeserializeGuard<ScalingPolicy>>, TargetKey> {
    let live: HashSet<_> = all
        .iter()
        .map(|o| ObjectRef::from_obj(o.as_ref()))
        .collect();
    keys.retain(|k| live.contains(k));
    let mut out = HashMap::new();
    for obj in all {
        let Ok(p) = &obj.0 else { continue };
        if p.spec.mode != Mode::Controller {
            continue;
        }
        let r = ObjectRef::from_obj(obj.as_ref());
        let fresh = keys
            .get(&r)
            .is_some_and(|(generation, _)| *generation == p.metadata.generation);
        if !fresh {
            let key = crate::actuate::target_key(
                &ctx.client,
                Some(&ctx.kinds),
                &p.namespace().unwrap_or_default(),
                &p.spec.target_ref,
            )
            .await
            .ok();
            keys.insert(r.clone(), (p.metadata.generation, key));
        }
        if let Some((_, Some(key))) = keys.get(&r) {
            out.insert(r, key.clone());
        }
    }
    out
}

/// Per policy: the generation its key was resolved for and the key (if it resolved), for
/// [`KEY_TTL_S`].
type KeyCache = crate::actuate::Expiring<
    ObjectRef<DeserializeGuard<ScalingPolicy>>,
    (Option<i64>, Option<TargetKey>),
    KEY_TTL_S,
>;

/// The one policy allowed to write each target: among valid policies in mode `Controller`, the
/// oldest (then the first by name). The others report `ConflictingPolicy` and never write.
/// Validity comes from the schedule when it knows this generation, so policies are not
/// compiled again every tick.
fn writers(
    all: &[Arc<DeserializeGuard<ScalingPolicy>>],
    schedule: &Schedule,
    keys: &HashMap<ObjectRef<DeserializeGuard<ScalingPolicy>>, TargetKey>,
) -> HashMap<TargetKey, String> {
    let mut owners: HashMap<TargetKey, (Option<String>, String)> = HashMap::new();
    for obj in all {
        let Ok(p) = &obj.0 else { continue };
        if p.spec.mode != Mode::Controller {
            continue;
        }
        // A policy whose target does not resolve cannot write; it does not own its target.
        let Some(key) = keys.get(&ObjectRef::from_obj(obj.as_ref())) else {
            continue;
        };
        let valid = match schedule.get(&ObjectRef::from_obj(obj.as_ref())) {
            Some((_, generation, valid, _)) if *generation == p.metadata.generation => *valid,
            _ => CompiledPolicy::from_resource(p).is_ok(),
        };
        if !valid {
            continue;
        }
        let created = p
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string());
        let name = format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
        let candidate = (created, name);
        owners
            .entry(key.clone())
            .and_modify(|cur| {
                if candidate < *cur {
                    *cur = candidate.clone();
                }
            })
            .or_insert(candidate);
    }
    owners.into_iter().map(|(k, (_, n))| (k, n)).collect()
}

/// The longest the loop sleeps: a new or changed policy is evaluated within this.
const POLL: Duration = Duration::from_millis(100);

/// A ScalingPolicy as the loop keys it.
type PolicyRef = ObjectRef<DeserializeGuard<ScalingPolicy>>;

/// A due policy of a tick, until it is evaluated.
struct Pending {
    key: PolicyRef,
    /// The store's object, shared rather than copied: a daemon that falls behind has every
    /// policy queued, and a copy each would hold the store a second time.
    object: Arc<DeserializeGuard<ScalingPolicy>>,
    compiled: Result<CompiledPolicy, crate::policy::ValidationErrors>,
    /// New, or its spec changed: it goes first.
    fresh: bool,
    /// The writing policy of each normalized target, as of the tick; one map shared by every
    /// tick until an owner changes ([`TickState::share_writers`]).
    writers: Arc<HashMap<TargetKey, String>>,
    /// The tick's time.
    now: DateTime<Utc>,
    /// Whether this replica held the policy's shard (with one Lease: led) at the tick.
    leading: bool,
}

impl Pending {
    /// The policy; only well-formed ones are queued.
    fn policy(&self) -> Option<&ScalingPolicy> {
        self.object.0.as_ref().ok()
    }
}

/// An evaluation ready to start, with its server's answers.
struct Job {
    pending: Pending,
    samples: Arc<HashMap<String, Sample>>,
}

/// What a future in flight reports to the loop.
enum Done {
    /// One server's queries of a tick are answered or cut off at the server's deadline; its
    /// policies can be evaluated.
    Fetched {
        server: servers::ServerKey,
        samples: HashMap<String, Sample>,
        waiting: Vec<Pending>,
    },
    /// A policy's evaluation finished.
    Evaluated(PolicyRef),
}

/// The loop's work in flight: one future per server group of a tick, one per evaluation.
type InFlight = FuturesUnordered<BoxFuture<'static, Done>>;

/// A query's last values ([`fingerprint`]) and when it was last answered.
type LastAnswer = (Option<Vec<u64>>, std::time::Instant);

/// A query's last answer is forgotten when no policy asked for it for this long.
const FORGET_QUERY: Duration = Duration::from_secs(3600);

/// What the loop keeps between ticks.
#[derive(Default)]
struct TickState {
    schedule: Schedule,
    /// Per shard, whether this replica held its Lease at the last tick (one entry without
    /// sharding): a policy's writes are its shard holder's.
    held: Vec<bool>,
    /// Each query's last values (and when it was last answered), to put the policies whose
    /// inputs changed first.
    last: HashMap<(servers::ServerKey, String), LastAnswer>,
    /// Each Controller policy's normalized target key.
    keys: KeyCache,
    /// The writing policy of each target as of the last tick that changed it
    /// ([`TickState::share_writers`]).
    writers: Arc<HashMap<TargetKey, String>>,
    /// When `last` was last pruned.
    pruned: Option<std::time::Instant>,
    /// When the per-policy memory of deleted policies was last forgotten ([`PRUNE_EVERY`]).
    forgot: Option<std::time::Instant>,
    /// The policy store's change count at the last tick ([`TickState::needs_tick`]).
    store_changes: Option<u64>,
    /// Servers with a group of queries in flight: a server answers one group at a time, so a
    /// server that never answers holds at most one group (bounded by its deadline).
    busy_servers: HashSet<servers::ServerKey>,
    /// Policies waiting for their server's answers or being evaluated.
    busy: HashSet<PolicyRef>,
    /// Due policies left for a later tick because they or their server are busy.
    deferred: HashSet<PolicyRef>,
    /// Evaluations ready to start: those whose inputs changed first, then the others.
    urgent: VecDeque<Job>,
    normal: VecDeque<Job>,
    /// Evaluations in flight (at most `Context::concurrency`).
    evaluating: usize,
}

impl TickState {
    /// Takes in which shards this replica holds now. A shard newly held has its policies
    /// evaluated at once (with one Lease: a new leader evaluates every policy at once), from the
    /// history in their status. Returns whether a shard held before was lost.
    fn take_shards(&mut self, held: Vec<bool>) -> bool {
        let lost =
            (0..self.held.len()).any(|i| self.held[i] && !held.get(i).copied().unwrap_or(false));
        let gained: Vec<u32> = (0..held.len())
            .filter(|i| held[*i] && !self.held.get(*i).copied().unwrap_or(false))
            .filter_map(|i| u32::try_from(i).ok())
            .collect();
        if held.len() <= 1 {
            if !gained.is_empty() {
                self.schedule.clear();
            }
        } else if !gained.is_empty() {
            let shards = u32::try_from(held.len()).unwrap_or(u32::MAX);
            self.schedule.retain(|k, _| {
                !gained.contains(&shards::shard_of(
                    k.namespace.as_deref().unwrap_or_default(),
                    &k.name,
                    shards,
                ))
            });
            // The next wake-up scans the store even when nothing else is due.
            self.store_changes = None;
        }
        self.held = held;
        lost
    }

    /// Whether this replica held the shard of `key` at the last tick.
    fn leads(&self, key: &PolicyRef) -> bool {
        let shards = u32::try_from(self.held.len()).unwrap_or(u32::MAX);
        let shard = shards::shard_of(
            key.namespace.as_deref().unwrap_or_default(),
            &key.name,
            shards,
        );
        self.held.get(shard as usize).copied().unwrap_or(false)
    }

    /// How long the loop may sleep: until the next due policy that is not waiting for a busy
    /// server or evaluation, and at most [`POLL`].
    fn next_wait(&self) -> Duration {
        self.schedule
            .iter()
            .filter(|(k, _)| !self.deferred.contains(*k))
            .map(|(_, (at, _, _, _))| *at)
            .min()
            // Past due: at once. Nothing due (no policies, or all waiting): the next poll.
            .map_or(POLL, |at| {
                (at - Utc::now()).to_std().unwrap_or(Duration::ZERO)
            })
            .min(POLL)
    }

    /// Whether a tick has anything to do at `now`, the policy store having changed `changes`
    /// times so far: a policy is due (a deferred one included), none is scheduled yet (the first
    /// tick, or a new leader's), or a policy was added, changed or deleted since the last tick.
    /// Otherwise the loop's wake-up (at least every [`POLL`]) skips the scan of every policy.
    fn needs_tick(&mut self, changes: u64, now: DateTime<Utc>) -> bool {
        let changed = self.store_changes != Some(changes);
        self.store_changes = Some(changes);
        changed
            || self.schedule.is_empty()
            || self.schedule.values().any(|(at, _, _, _)| *at <= now)
    }

    /// Whether the policy `key` (now at `generation`) starts an evaluation at `now`: `None` when
    /// it is not due, or when it is due but its last evaluation is still pending (waiting for
    /// its server, queued or running). That pending evaluation answers this due time too: the
    /// policy is coalesced into it and next due a whole interval on, so a daemon that falls
    /// behind never queues a policy twice nor sends its queries again within the interval. A
    /// policy whose spec changed meanwhile waits for the pending evaluation instead
    /// ([`TickState::deferred`]) and goes at once after it. `Some(fresh)` when it starts (fresh:
    /// new, or its spec changed).
    fn take_due(
        &mut self,
        key: &PolicyRef,
        generation: Option<i64>,
        now: DateTime<Utc>,
    ) -> Option<bool> {
        let (is_due, fresh) = match self.schedule.get(key) {
            None => (true, true),
            Some((at, g, _, _)) => (*g != generation || *at <= now, *g != generation),
        };
        if !is_due {
            return None;
        }
        if self.busy.contains(key) {
            match self.schedule.get_mut(key) {
                Some((at, _, _, interval)) if !fresh => *at = next_due(now, *interval),
                _ => {
                    self.deferred.insert(key.clone());
                }
            }
            return None;
        }
        Some(fresh)
    }

    /// The map of writers for this tick's policies: the one the queued policies already share
    /// while no owner changed. A daemon that falls behind has every policy queued across many
    /// ticks; a map per tick (one entry per target) held by each tick's queued policies grew
    /// with the policies times the ticks they waited.
    fn share_writers(
        &mut self,
        now: HashMap<TargetKey, String>,
    ) -> Arc<HashMap<TargetKey, String>> {
        if *self.writers != now {
            self.writers = Arc::new(now);
        }
        self.writers.clone()
    }

    fn enqueue(&mut self, urgent: bool, job: Job) {
        if urgent {
            self.urgent.push_back(job);
        } else {
            self.normal.push_back(job);
        }
    }

    /// Takes in what a future in flight reports.
    fn finish(&mut self, done: Done) {
        match done {
            Done::Fetched {
                server,
                samples,
                waiting,
            } => {
                self.busy_servers.remove(&server);
                // Queries whose answer changed since they last ran: their policies go first, so
                // a change reaches the scale subresource without waiting behind the policies it
                // does not affect.
                let seen = std::time::Instant::now();
                let mut changed: HashSet<&str> = HashSet::new();
                for (query, sample) in &samples {
                    let print = fingerprint(sample);
                    let key = (server.clone(), query.clone());
                    let same = self.last.get(&key).is_some_and(|(p, _)| *p == print);
                    if !same {
                        changed.insert(query.as_str());
                    }
                    self.last.insert(key, (print, seen));
                }
                let urgent: Vec<bool> = waiting
                    .iter()
                    .map(|w| {
                        w.fresh
                            || w.compiled
                                .as_ref()
                                .is_ok_and(|c| queries_of(c).any(|q| changed.contains(q)))
                    })
                    .collect();
                let samples = Arc::new(samples);
                for (pending, urgent) in waiting.into_iter().zip(urgent) {
                    self.enqueue(
                        urgent,
                        Job {
                            pending,
                            samples: samples.clone(),
                        },
                    );
                }
                // Forget queries no policy asked for lately (deleted or changed policies).
                if self
                    .pruned
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(60))
                {
                    self.last.retain(|_, (_, at)| at.elapsed() < FORGET_QUERY);
                    self.pruned = Some(seen);
                }
            }
            Done::Evaluated(key) => {
                self.evaluating = self.evaluating.saturating_sub(1);
                self.busy.remove(&key);
            }
        }
    }

    /// Starts ready evaluations, changed inputs first, up to `ctx.concurrency` at once.
    fn start_ready(&mut self, ctx: &Arc<Context>, inflight: &mut InFlight) {
        while self.evaluating < ctx.concurrency.max(1) {
            let Some(job) = self.urgent.pop_front().or_else(|| self.normal.pop_front()) else {
                break;
            };
            self.evaluating += 1;
            let ctx = ctx.clone();
            inflight.push(Box::pin(async move {
                let Job { pending, samples } = job;
                let Pending {
                    key,
                    object,
                    compiled,
                    writers,
                    now,
                    leading,
                    ..
                } = pending;
                let Ok(p) = &object.0 else {
                    // Only well-formed policies are queued.
                    return Done::Evaluated(key);
                };
                let span = info_span!("evaluate", policy = %p.name_any(), namespace = %p.namespace().unwrap_or_default(), target = %p.spec.target_ref.name);
                if let Err(e) = reconcile(
                    &ctx,
                    p,
                    compiled,
                    &samples,
                    now,
                    Some(&writers),
                    leading,
                )
                .instrument(span)
                .await
                {
                    // Logged once while the same failure lasts (it is in status and events).
                    let error = e.explained();
                    if ctx.reported.first(&evaluation_key(p), &error) {
                        warn!(%error, "evaluation failed (reported once while it lasts)");
                    } else {
                        debug!(%error, "evaluation failed again");
                    }
                } else {
                    ctx.reported.clear(&evaluation_key(p));
                }
                Done::Evaluated(key)
            }));
        }
    }
}

/// The key of a policy's failed evaluations in [`Context::reported`].
fn evaluation_key(p: &ScalingPolicy) -> String {
    format!(
        "evaluation/{}/{}",
        p.namespace().unwrap_or_default(),
        p.name_any()
    )
}

/// The next evaluation after `now` for `interval`, aligned to multiples of the interval since
/// the epoch, so that every policy with the same interval is due in the same tick and their
/// identical queries are sent once. At least half an interval away, so a new policy (evaluated
/// at once) is not evaluated again a moment later.
fn next_due(now: DateTime<Utc>, interval: chrono::TimeDelta) -> DateTime<Utc> {
    let step = interval.num_milliseconds().max(1);
    let t = now.timestamp_millis();
    let mut next = (t.div_euclid(step) + 1) * step;
    if next - t < step / 2 {
        next += step;
    }
    DateTime::from_timestamp_millis(next).unwrap_or(now + interval)
}

/// What decides whether a query's answer changed: its values, or nothing when it is not a
/// series (missing, an error).
fn fingerprint(sample: &Sample) -> Option<Vec<u64>> {
    match sample {
        Sample::Series { values, .. } | Sample::Partial { values, .. } => {
            Some(values.iter().map(|v| v.to_bits()).collect())
        }
        _ => None,
    }
}

/// Drops what the controller never reads of a policy and what, at 10,000 policies, is the bulk
/// of the store: the field managers and `kubectl apply`'s copy of the whole object.
fn strip_unread(meta: &mut kube::api::ObjectMeta) {
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// How often the per-policy memory of deleted policies is forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// The `namespace/name` of each live policy, the key of the controller's per-policy memory.
fn live_names(live: &HashSet<PolicyRef>) -> HashSet<String> {
    live.iter()
        .filter_map(|r| r.namespace.as_deref().map(|ns| format!("{ns}/{}", r.name)))
        .collect()
}

/// How far ahead a policy this replica never evaluates is scheduled (a malformed one, or one of
/// another replica's shard).
const NEVER_DUE: chrono::TimeDelta = chrono::TimeDelta::days(3650);

/// Per policy: when it is next due, the generation last seen, whether it compiled, and its
/// interval.
type Schedule = HashMap<PolicyRef, (DateTime<Utc>, Option<i64>, bool, chrono::TimeDelta)>;

/// One tick: finds the due policies and starts their work without waiting for it. Each server's
/// distinct queries run as one group under the server's own deadline
/// ([`servers::Servers::query_server`]); a group's policies are evaluated as soon as its answers
/// are in, whatever the other servers do, and policies without Prometheus queries at once. A
/// policy still busy from an earlier tick, or whose server still answers an earlier group, waits
/// for it (the loop runs a tick again when it is done).
async fn run_tick(
    ctx: &Arc<Context>,
    reader: &Store<DeserializeGuard<ScalingPolicy>>,
    state: &mut TickState,
    inflight: &mut InFlight,
) {
    let now = Utc::now();
    let all = reader.state();
    let live: HashSet<_> = all
        .iter()
        .map(|o| ObjectRef::from_obj(o.as_ref()))
        .collect();
    state.schedule.retain(|k, _| live.contains(k));
    let keys = target_keys(ctx, &all, &mut state.keys).await;
    let writers = state.share_writers(writers(&all, &state.schedule, &keys));
    // What the daemon remembers per policy (forecasts, applied scale events, failures already
    // logged) is forgotten for deleted policies every PRUNE_EVERY: one set of names, one lookup
    // per entry.
    if state.forgot.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
        let names = live_names(&live);
        let is_live = |key: &str| names.contains(key);
        ctx.forecasts.retain(is_live);
        ctx.scale_events.retain(is_live);
        ctx.reported.retain_policies(is_live);
        ctx.metrics.retain_policies(is_live);
        state.forgot = Some(std::time::Instant::now());
    }
    state.deferred.clear();
    let mut due = Vec::new();
    let mut malformed = Vec::new();
    for obj in &all {
        let key = ObjectRef::from_obj(obj.as_ref());
        let leading = state.leads(&key);
        if !leading && ctx.external_metrics.is_none() {
            // Another replica's shard, and nothing to publish: never due here. Its validity is
            // kept per generation for the one-writer rule ([`writers`]) without compiling it
            // every tick; taking the shard removes the entry, so it is evaluated at once.
            let generation = obj.meta().generation;
            let known = state
                .schedule
                .get(&key)
                .filter(|(_, g, _, _)| *g == generation)
                .map(|(_, _, valid, interval)| (*valid, *interval));
            let (valid, interval) = known.unwrap_or_else(|| {
                let valid = matches!(&obj.0, Ok(p) if CompiledPolicy::from_resource(p).is_ok());
                (valid, ctx.default_interval)
            });
            state
                .schedule
                .insert(key, (now + NEVER_DUE, generation, valid, interval));
            continue;
        }
        let Some(fresh) = state.take_due(&key, obj.meta().generation, now) else {
            continue;
        };
        let generation = obj.meta().generation;
        match &obj.0 {
            Ok(p) => {
                // Compiled once per tick: for the interval, the queries and the evaluation.
                let compiled = CompiledPolicy::from_resource(p);
                let namespace = p.namespace().unwrap_or_default();
                let server_busy = compiled.as_ref().is_ok_and(|c| {
                    queries_of(c).next().is_some()
                        && state
                            .busy_servers
                            .contains(&servers::Servers::key_of(&namespace, c))
                });
                if server_busy {
                    state.deferred.insert(key);
                    continue;
                }
                let interval = match (&compiled, &p.spec.interval) {
                    (Ok(c), Some(_)) => c.interval,
                    _ => ctx.default_interval,
                };
                state.schedule.insert(
                    key.clone(),
                    (
                        next_due(now, interval),
                        generation,
                        compiled.is_ok(),
                        interval,
                    ),
                );
                due.push(Pending {
                    key,
                    object: obj.clone(),
                    compiled,
                    fresh,
                    writers: writers.clone(),
                    now,
                    leading,
                });
            }
            Err(invalid) => {
                // Malformed objects are reported once per generation and never stop the others.
                state.schedule.insert(
                    key,
                    (now + NEVER_DUE, generation, false, ctx.default_interval),
                );
                let meta = &invalid.metadata;
                warn!(policy = %format!("{}/{}", meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default()), error = %invalid.error, "malformed ScalingPolicy ignored");
                malformed.push((
                    ObjectReference {
                        api_version: Some("kscale.dev/v1alpha1".into()),
                        kind: Some("ScalingPolicy".into()),
                        name: meta.name.clone(),
                        namespace: meta.namespace.clone(),
                        uid: meta.uid.clone(),
                        resource_version: meta.resource_version.clone(),
                        ..Default::default()
                    },
                    invalid.error.clone(),
                ));
            }
        }
    }
    for (regarding, error) in malformed {
        publish_on(
            ctx,
            &regarding,
            EventType::Warning,
            "MalformedPolicy",
            "Scale",
            format!("kscale cannot read this ScalingPolicy and ignores it (other policies are unaffected): {error}"),
        )
        .await;
    }
    if due.is_empty() {
        return;
    }
    // Policies with Prometheus queries wait for their server; the others are ready now.
    let mut waiting: HashMap<servers::ServerKey, Vec<Pending>> = HashMap::new();
    for pending in due {
        state.busy.insert(pending.key.clone());
        let server = pending.compiled.as_ref().ok().and_then(|c| {
            queries_of(c).next().map(|_| {
                let namespace = pending
                    .policy()
                    .and_then(|p| p.metadata.namespace.as_deref());
                servers::Servers::key_of(namespace.unwrap_or_default(), c)
            })
        });
        match server {
            Some(server) => waiting.entry(server).or_default().push(pending),
            None => state.enqueue(
                pending.fresh,
                Job {
                    pending,
                    samples: Arc::default(),
                },
            ),
        }
    }
    let groups = servers::Servers::groups(waiting.values().flatten().filter_map(|w| {
        w.compiled.as_ref().ok().map(|c| {
            (
                w.policy()
                    .and_then(|p| p.metadata.namespace.as_deref())
                    .unwrap_or_default(),
                c,
            )
        })
    }));
    debug!(
        servers = groups.len(),
        distinct_queries = groups.iter().map(|(_, q)| q.len()).sum::<usize>(),
        "tick"
    );
    for (server, queries) in groups {
        let Some(policies) = waiting.remove(&server) else {
            continue;
        };
        state.busy_servers.insert(server.clone());
        let ctx = ctx.clone();
        let span = info_span!("prometheus", server = %server.as_ref().map_or("default", |(_, s)| s.url.as_str()), queries = queries.len());
        inflight.push(Box::pin(
            async move {
                let started = std::time::Instant::now();
                let samples = ctx.servers.query_server(&server, queries).await;
                ctx.metrics
                    .prometheus_seconds
                    .observe(started.elapsed().as_secs_f64());
                Done::Fetched {
                    server,
                    samples,
                    waiting: policies,
                }
            }
            .instrument(span),
        ));
    }
    // Every waiting policy has a query, so every server has a group; this is a safety net.
    for (_, policies) in waiting.drain() {
        for pending in policies {
            state.enqueue(
                pending.fresh,
                Job {
                    pending,
                    samples: Arc::default(),
                },
            );
        }
    }
    state.start_ready(ctx, inflight);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    const TEN_S: chrono::TimeDelta = chrono::TimeDelta::seconds(10);

    #[test]
    fn the_loop_sleeps_until_the_next_policy_that_is_not_waiting() {
        let mut state = TickState::default();
        assert_eq!(state.next_wait(), POLL, "no policies: no hot loop");
        let waiting: PolicyRef = ObjectRef::new("hostile").within("ns");
        let past = Utc::now() - chrono::TimeDelta::seconds(5);
        state
            .schedule
            .insert(waiting.clone(), (past, Some(1), true, TEN_S));
        assert_eq!(state.next_wait(), Duration::ZERO, "past due: at once");
        state.deferred.insert(waiting);
        assert_eq!(
            state.next_wait(),
            POLL,
            "a policy waiting for its busy server does not wake the loop"
        );
        let other: PolicyRef = ObjectRef::new("web").within("ns");
        let soon = Utc::now() + chrono::TimeDelta::milliseconds(50);
        state.schedule.insert(other, (soon, Some(1), true, TEN_S));
        assert!(state.next_wait() <= Duration::from_millis(50));
    }

    /// Issue 17 (sharding): a shard newly held has its policies evaluated at once, the others
    /// keep their schedule; with one Lease a new leader evaluates everything at once.
    #[test]
    fn a_shard_taken_over_is_evaluated_at_once() {
        let mut state = TickState::default();
        let later = Utc::now() + chrono::TimeDelta::seconds(30);
        let refs: Vec<PolicyRef> = (0..40)
            .map(|i| ObjectRef::new(&format!("p{i}")).within("ns"))
            .collect();
        for r in &refs {
            state
                .schedule
                .insert(r.clone(), (later, Some(1), true, TEN_S));
        }
        let shard = |r: &PolicyRef| shards::shard_of("ns", &r.name, 6);
        state.take_shards(vec![true, false, false, false, false, false]);
        assert!(
            state.schedule.keys().all(|r| shard(r) != 0),
            "shard 0's policies are due"
        );
        assert!(
            refs.iter()
                .filter(|r| shard(r) != 0)
                .all(|r| state.schedule.contains_key(r))
        );
        assert!(state.leads(&refs.iter().find(|r| shard(r) == 0).unwrap().clone()));
        assert!(!state.leads(&refs.iter().find(|r| shard(r) == 3).unwrap().clone()));
        let before = state.schedule.len();
        state.take_shards(vec![true, false, false, false, false, false]);
        assert_eq!(
            state.schedule.len(),
            before,
            "nothing new held: nothing rescheduled"
        );
        state.take_shards(vec![false, false, false, true, false, false]);
        assert!(state.schedule.keys().all(|r| shard(r) != 3));
        // One Lease: leading again evaluates every policy.
        let mut one = TickState::default();
        one.schedule
            .insert(refs[0].clone(), (later, Some(1), true, TEN_S));
        one.take_shards(vec![false]);
        assert_eq!(one.schedule.len(), 1);
        one.take_shards(vec![true]);
        assert!(one.schedule.is_empty());
        assert!(one.leads(&refs[0]));
    }

    /// Issue 17: a daemon that falls behind never queues a policy twice. A policy due while
    /// its last evaluation is still pending is coalesced into it (next due a whole interval
    /// on), so its queries are not sent again within the interval; a spec change waits for the
    /// pending evaluation and goes right after it.
    #[test]
    fn a_policy_due_while_its_evaluation_is_pending_is_not_queued_twice() {
        let mut state = TickState::default();
        let p: PolicyRef = ObjectRef::new("web").within("ns");
        assert_eq!(
            state.take_due(&p, Some(1), at(3)),
            Some(true),
            "new: at once"
        );
        state
            .schedule
            .insert(p.clone(), (next_due(at(3), TEN_S), Some(1), true, TEN_S));
        state.busy.insert(p.clone());
        assert_eq!(state.take_due(&p, Some(1), at(5)), None, "not due yet");
        // Due at 10 s while still pending: coalesced, next due at 20 s, not deferred.
        assert_eq!(state.take_due(&p, Some(1), at(10)), None);
        assert_eq!(state.schedule[&p].0, at(20));
        assert!(state.deferred.is_empty());
        assert_eq!(
            state.take_due(&p, Some(1), at(12)),
            None,
            "no second evaluation"
        );
        // Its spec changes while pending: it waits for the pending evaluation, then goes.
        assert_eq!(state.take_due(&p, Some(2), at(13)), None);
        assert!(state.deferred.contains(&p));
        state.finish(Done::Evaluated(p.clone()));
        assert_eq!(state.take_due(&p, Some(2), at(14)), Some(true));
        // Not pending any more and due: it starts.
        state
            .schedule
            .insert(p.clone(), (at(20), Some(2), true, TEN_S));
        assert_eq!(state.take_due(&p, Some(2), at(20)), Some(false));
    }

    /// Issue 17 (memory at 10,000 policies): the policies queued over many ticks share one map
    /// of writers until an owner changes, rather than holding a map per tick.
    #[test]
    fn queued_policies_share_one_map_of_writers_until_an_owner_changes() {
        let mut state = TickState::default();
        let target = |n: &str| TargetKey {
            namespace: "ns".into(),
            group: "apps".into(),
            kind: "Deployment".into(),
            name: n.into(),
        };
        let owned_by = |owner: &str| HashMap::from([(target("web"), owner.to_string())]);
        let first = state.share_writers(owned_by("ns/a"));
        let again = state.share_writers(owned_by("ns/a"));
        assert!(Arc::ptr_eq(&first, &again), "nothing changed: one map");
        let changed = state.share_writers(owned_by("ns/b"));
        assert!(!Arc::ptr_eq(&first, &changed));
        assert_eq!(changed[&target("web")], "ns/b");
        assert_eq!(
            first[&target("web")],
            "ns/a",
            "the policies queued before keep the map of their tick"
        );
    }

    /// Issue 17: the loop wakes at least every 100 ms, but scans the policies only when one is
    /// due or the store changed.
    #[test]
    fn a_wake_up_with_nothing_due_and_nothing_changed_scans_nothing() {
        let mut state = TickState::default();
        assert!(state.needs_tick(0, at(0)), "the first tick");
        assert!(state.needs_tick(0, at(0)), "nothing scheduled yet");
        let p: PolicyRef = ObjectRef::new("web").within("ns");
        state
            .schedule
            .insert(p.clone(), (at(10), Some(1), true, TEN_S));
        assert!(!state.needs_tick(0, at(1)));
        assert!(!state.needs_tick(0, at(9)));
        assert!(state.needs_tick(1, at(9)), "a policy was added or changed");
        assert!(!state.needs_tick(1, at(9)));
        assert!(state.needs_tick(1, at(10)), "due");
        state.deferred.insert(p);
        assert!(state.needs_tick(1, at(11)), "due, waiting for its server");
    }

    #[test]
    fn the_store_keeps_no_field_managers_nor_applied_copy() {
        let mut meta: kube::api::ObjectMeta = serde_json::from_value(serde_json::json!({
            "name": "web", "namespace": "ns", "generation": 3,
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "team": "a"},
            "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
        }))
        .unwrap();
        strip_unread(&mut meta);
        assert_eq!(meta.managed_fields, None);
        assert_eq!(
            meta.annotations.unwrap().into_keys().collect::<Vec<_>>(),
            ["team"]
        );
        assert_eq!(
            (meta.name.as_deref(), meta.generation),
            (Some("web"), Some(3))
        );
    }

    #[test]
    fn live_names_are_the_keys_of_the_per_policy_memory() {
        let live: HashSet<PolicyRef> = [
            ObjectRef::new("web").within("a"),
            ObjectRef::new("api").within("b"),
        ]
        .into();
        let names = live_names(&live);
        assert!(names.contains("a/web") && names.contains("b/api"));
        assert!(!names.contains("b/web") && !names.contains("web"));
    }

    #[test]
    fn due_times_align_to_the_interval_at_least_half_an_interval_ahead() {
        let ten = chrono::TimeDelta::seconds(10);
        // 1_800_000_000 is a multiple of 10 s.
        assert_eq!(next_due(at(3), ten), at(10));
        assert_eq!(next_due(at(6), ten), at(20));
        assert_eq!(next_due(at(10), ten), at(20));
        // Policies evaluated at different moments meet at the same boundary.
        assert_eq!(next_due(at(11), ten), next_due(at(14), ten));
    }

    #[test]
    fn status_is_rewritten_only_with_news_or_after_the_refresh() {
        let old = ScalingPolicyStatus {
            desired_replicas: Some(3),
            last_evaluation_time: Some(at(0)),
            ..Default::default()
        };
        let mut new = old.clone();
        new.last_evaluation_time = Some(at(10));
        assert!(!status_changed(Some(&old), &new, STATUS_REFRESH));
        new.last_evaluation_time = Some(at(60));
        assert!(status_changed(Some(&old), &new, STATUS_REFRESH));
        new.last_evaluation_time = Some(at(10));
        new.desired_replicas = Some(4);
        assert!(status_changed(Some(&old), &new, STATUS_REFRESH));
        assert!(status_changed(None, &new, STATUS_REFRESH));
    }

    /// Issue 17: apiserver writes only on change. A status whose only news is the time (the
    /// evaluation's, recommendations' with the same counts, an active metric's) is not written
    /// again before the refresh; a recommendation of another count is news.
    #[test]
    fn a_status_whose_only_news_is_the_time_waits_for_the_refresh() {
        use crate::policy::state::Recommendation;
        let status = |t: i64, recommended: i32| {
            let mut s = ScalingPolicyStatus {
                desired_replicas: Some(3),
                reason: Some("rps 100".into()),
                last_evaluation_time: Some(at(t)),
                ..Default::default()
            };
            s.history.last_active_time = Some(at(t));
            s.history.recommendations = vec![Recommendation {
                replicas: recommended,
                time: at(t),
            }];
            s
        };
        let old = status(0, 3);
        let refresh = STATUS_REFRESH_MAX;
        for t in [10, 60, 590] {
            assert!(!status_changed(Some(&old), &status(t, 3), refresh), "{t}");
        }
        assert!(status_changed(Some(&old), &status(600, 3), refresh));
        assert!(status_changed(Some(&old), &status(10, 2), refresh));
        // A metric that stops being active: its lastActiveTime stays behind, at once news.
        let mut idle = status(10, 3);
        idle.history.last_active_time = Some(at(0));
        assert!(status_changed(Some(&old), &idle, refresh));
    }

    #[test]
    fn the_refresh_is_half_the_shortest_window_within_its_bounds() {
        let policy = |behavior: &str| {
            let p: ScalingPolicy = serde_yaml::from_str(&format!(
                "apiVersion: kscale.dev/v1alpha1\nkind: ScalingPolicy\nmetadata: {{name: p, namespace: n}}\nspec:\n  targetRef: {{kind: Deployment, name: d}}\n  maxReplicas: 3\n  metrics:\n  - name: q\n    prometheus: {{query: 'sum(q)'}}\n    target: {{type: AverageValue, averageValue: '10'}}\n{behavior}"
            ))
            .unwrap();
            CompiledPolicy::from_resource(&p).unwrap()
        };
        let minutes = chrono::TimeDelta::minutes;
        // The HPA's default scale-down window, 300 s: every 150 s.
        let default = policy("");
        assert_eq!(
            status_refresh(Some(&default), true),
            chrono::TimeDelta::seconds(150)
        );
        // Not Ready: every minute, whatever the windows.
        assert_eq!(status_refresh(Some(&default), false), STATUS_REFRESH);
        assert_eq!(status_refresh(None, true), STATUS_REFRESH);
        // No window at all: the longest refresh.
        let none = policy("  behavior:\n    scaleDown: {stabilizationWindowSeconds: 0}\n");
        assert_eq!(status_refresh(Some(&none), true), minutes(10));
        // A short window: never below a minute.
        let short = policy("  behavior:\n    scaleDown: {stabilizationWindowSeconds: 30}\n");
        assert_eq!(status_refresh(Some(&short), true), STATUS_REFRESH);
        let long = policy("  behavior:\n    scaleDown: {stabilizationWindowSeconds: 3600}\n");
        assert_eq!(status_refresh(Some(&long), true), minutes(10));
    }

    /// Issue 13, kind 5: a policy evaluated every second whose values move but whose decision
    /// does not writes its status at most every `STATUS_MIN_PERIOD`; a new decision at once.
    #[test]
    fn value_only_changes_are_written_at_most_every_min_period() {
        let old = ScalingPolicyStatus {
            desired_replicas: Some(3),
            reason: Some("rps 100".into()),
            last_evaluation_time: Some(at(0)),
            ..Default::default()
        };
        let mut new = old.clone();
        new.reason = Some("rps 101".into());
        new.last_evaluation_time = Some(at(1));
        assert!(!status_changed(Some(&old), &new, STATUS_REFRESH));
        new.last_evaluation_time = Some(at(4));
        assert!(!status_changed(Some(&old), &new, STATUS_REFRESH));
        new.last_evaluation_time = Some(at(5));
        assert!(status_changed(Some(&old), &new, STATUS_REFRESH));
        new.last_evaluation_time = Some(at(1));
        new.desired_replicas = Some(4);
        assert!(status_changed(Some(&old), &new, STATUS_REFRESH));
    }

    #[test]
    fn pause_events_are_edge_triggered_on_the_stored_status() {
        let status = |paused: Option<&str>| ScalingPolicyStatus {
            paused: paused.map(String::from),
            ..Default::default()
        };
        let hold = status(Some("Hold"));
        let none = status(None);
        // Entering, from no status (a new policy) or an unpaused one.
        for old in [None, Some(&none)] {
            let (event, note) = pause_transition(old, &hold, "hold 3→3").unwrap();
            assert_eq!(event, "ScalingPaused");
            assert_eq!(note, "Paused: Hold; hold 3→3");
        }
        // Staying paused (every interval, after a restart: the status says so): nothing.
        assert_eq!(pause_transition(Some(&hold), &hold, "r"), None);
        assert_eq!(pause_transition(Some(&none), &none, "r"), None);
        assert_eq!(pause_transition(None, &none, "r"), None);
        // Changing and leaving.
        let pin = status(Some("Pinned to 4"));
        assert_eq!(
            pause_transition(Some(&hold), &pin, "scale up 3→4").unwrap(),
            (
                "ScalingPaused",
                "Paused: Pinned to 4 (was Hold); scale up 3→4".to_string()
            )
        );
        assert_eq!(
            pause_transition(Some(&pin), &none, "hold 4→4").unwrap(),
            (
                "ScalingResumed",
                "No longer paused (was Pinned to 4); hold 4→4".to_string()
            )
        );
    }

    #[test]
    fn a_lasting_failure_keeps_its_transition_time() {
        let mut p: ScalingPolicy = serde_yaml::from_str(
            "apiVersion: kscale.dev/v1alpha1\nkind: ScalingPolicy\nmetadata: {name: p, namespace: n}\nspec:\n  targetRef: {kind: Deployment, name: d}\n  maxReplicas: 3\n  metrics: []\n",
        )
        .unwrap();
        let first = failure_status(&p, "InvalidPolicy", "spec.metrics: empty".into(), at(0));
        p.status = Some(first.clone());
        assert!(same_failure(&p, "InvalidPolicy", "spec.metrics: empty"));
        assert!(!same_failure(&p, "InvalidPolicy", "another problem"));
        let again = failure_status(&p, "InvalidPolicy", "spec.metrics: empty".into(), at(10));
        assert!(!status_changed(Some(&first), &again, STATUS_REFRESH));
    }

    /// Issue 16: `Ready` is True only when the policy works as written; a failing metric (the
    /// missing default Prometheus, say) or an HPA on the target makes it False, naming why.
    #[test]
    fn ready_says_whether_the_policy_works_as_written() {
        use crate::model::{Observation, Sample};
        let p: ScalingPolicy = serde_yaml::from_str(
            "apiVersion: kscale.dev/v1alpha1\nkind: ScalingPolicy\nmetadata: {name: p, namespace: n}\nspec:\n  targetRef: {kind: Deployment, name: d}\n  maxReplicas: 3\n  metrics:\n  - name: q\n    prometheus: {query: 'sum(q)'}\n    target: {type: AverageValue, averageValue: '10'}\n",
        )
        .unwrap();
        let policy = CompiledPolicy::from_resource(&p).unwrap();
        let evaluated = |sample: Sample| {
            let obs = Observation::steady(2, vec![sample]);
            Evaluated {
                decision: crate::policy::evaluate(&policy, &obs, &Default::default(), at(0)),
                policy: policy.clone(),
                scale: ScaleState {
                    spec_replicas: 2,
                    status_replicas: 2,
                    selector: Some("app=d".into()),
                    resource_version: None,
                },
                wrote: false,
                not_written: None,
                conflicts: 0,
                first_read: None,
                hpa_conflict: None,
                shadow: None,
                took_over: None,
                takeover_pending: None,
            }
        };
        let valid = evaluated(Sample::Series {
            values: vec![20.0],
            timestamp: at(0),
        });
        let ready = ready_condition(&valid);
        assert_eq!((ready.status, ready.reason), (true, "Evaluated"));

        let unconfigured = evaluated(Sample::Error {
            message: NO_PROMETHEUS.into(),
        });
        let ready = ready_condition(&unconfigured);
        assert_eq!((ready.status, ready.reason), (false, "MetricsUnavailable"));
        for setting in [
            "--prometheus-url",
            "KSCALE_PROMETHEUS_URL",
            "prometheus.url",
        ] {
            assert!(ready.message.contains(setting), "{}", ready.message);
        }
        assert!(
            ready.message.starts_with("metric q failed: "),
            "{}",
            ready.message
        );

        let mut conflicted = evaluated(Sample::Series {
            values: vec![20.0],
            timestamp: at(0),
        });
        conflicted.hpa_conflict = Some(ActuateError::HpaConflict {
            kind: "Deployment".into(),
            namespace: "n".into(),
            name: "d".into(),
            hpa: "d-cpu".into(),
        });
        let ready = ready_condition(&conflicted);
        assert_eq!((ready.status, ready.reason), (false, "ConflictingHPA"));
        assert!(ready.message.contains("HorizontalPodAutoscaler d-cpu"));
    }

    /// Issue 15: a failing metric gets one Warning event when it starts failing (or fails
    /// another way), not one per interval while the failure lasts.
    #[test]
    fn a_metric_failure_is_new_once() {
        use crate::model::{Observation, Sample};
        let mut p: ScalingPolicy = serde_yaml::from_str(
            "apiVersion: kscale.dev/v1alpha1\nkind: ScalingPolicy\nmetadata: {name: p, namespace: n}\nspec:\n  targetRef: {kind: Deployment, name: d}\n  maxReplicas: 3\n  metrics:\n  - name: q\n    prometheus: {query: 'sum(q)'}\n    target: {type: Value, value: '10'}\n",
        )
        .unwrap();
        let policy = CompiledPolicy::from_resource(&p).unwrap();
        let decide = |sample: Sample| {
            let obs = Observation::steady(2, vec![sample]);
            crate::policy::evaluate(&policy, &obs, &Default::default(), at(0))
        };
        let failing = decide(Sample::Error {
            message: "connection refused".into(),
        });
        let names = |d: &crate::policy::Decision, p: &ScalingPolicy| {
            new_metric_failures(p, &policy, d)
                .iter()
                .map(|(m, _)| m.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&failing, &p), ["q"], "first evaluation: new");
        assert_eq!(
            metric_failure_reason(&policy.metrics[0].source),
            "FailedGetExternalMetric"
        );
        p.status = Some(status_from_decision(&policy, &failing, None, None, at(0)));
        assert!(
            names(&failing, &p).is_empty(),
            "the same failure again: not new"
        );
        let missing = decide(Sample::Missing {
            reason: "query returned no series".into(),
        });
        assert_eq!(names(&missing, &p), ["q"], "failing another way: new");
        let valid = decide(Sample::Series {
            values: vec![20.0],
            timestamp: at(0),
        });
        assert!(names(&valid, &p).is_empty());
        p.status = Some(status_from_decision(&policy, &valid, None, None, at(1)));
        assert_eq!(names(&failing, &p), ["q"], "failing after recovering: new");
        // The state change alone gets the status written, so the next evaluation sees it.
        let before = status_from_decision(&policy, &valid, None, None, at(1));
        let mut after = status_from_decision(&policy, &failing, Some(&before), None, at(2));
        after.conditions = before.conditions.clone();
        after.desired_replicas = before.desired_replicas;
        assert!(status_changed(Some(&before), &after, STATUS_REFRESH));
    }
}
