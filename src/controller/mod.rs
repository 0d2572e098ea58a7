//! The scaling controller: watches ScalingPolicies, reads their metrics, evaluates them with the
//! pure core and acts on the decision.
//!
//! Kubernetes state arrives through watches: a reflector store of ScalingPolicies (with
//! `DeserializeGuard`, so one malformed object cannot stop it) and one of pods. The loop wakes at
//! the next due time (and at least every 100 ms to notice new or changed policies, which are due
//! at once). Due times are aligned to multiples of each interval, so policies with the same
//! interval run in the same tick and every distinct PromQL query of a tick is sent once per
//! server ([`servers`]). The tick's policies are then evaluated concurrently, those whose query
//! answers changed first: each reads its target's scale subresource, evaluates, writes the scale
//! (mode `Controller` only, only on a change, and only by the one policy that owns the target),
//! records an Event, and writes the status (server-side apply, field manager `kscale`).
//!
//! With leader election ([`leader`]), every replica keeps the watch warm but only the Lease
//! holder evaluates and writes; a new leader starts from the history in each policy's status.

pub mod forecast;
pub mod formula_budget;
pub mod leader;
pub mod servers;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::DeserializeGuard;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::actuate::{ActuateError, FIELD_MANAGER, ScaleState, ScaleTarget};
use crate::crd::{Mode, ScalingPolicy, ScalingPolicyStatus};
use crate::model::{Observation, Sample};
use crate::policy::{CompiledPolicy, Decision, MetricSource};
use crate::source::pods::PodCache;
use crate::source::resource::{ResourceName, sample as resource_sample};
use crate::status::{k8s_time, status_from_decision};

/// A query's history: `(time, value)` per step.
pub type History = Vec<(DateTime<Utc>, f64)>;

/// Where Prometheus samples come from.
pub trait QueryBackend: Send + Sync {
    /// Runs each distinct query once and returns one sample per query.
    fn query_all(&self, queries: Vec<String>) -> BoxFuture<'_, HashMap<String, Sample>>;
    /// The query's history, summed over series, every `step` from `start` to `end`.
    fn query_range(
        &self,
        query: String,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        step: chrono::TimeDelta,
    ) -> BoxFuture<'_, Result<History, String>>;
}

/// A Prometheus that cannot be used (none is configured, or its Secret is missing, say): every
/// query is an explicit error saying why, never a zero.
pub struct Unavailable(pub String);

impl Unavailable {
    /// No Prometheus is configured.
    pub fn no_prometheus() -> Unavailable {
        Unavailable(NO_PROMETHEUS.into())
    }

    fn answer_all(&self, queries: Vec<String>) -> BoxFuture<'static, HashMap<String, Sample>> {
        let message = self.0.clone();
        Box::pin(async move {
            queries
                .into_iter()
                .map(|q| {
                    (
                        q,
                        Sample::Error {
                            message: message.clone(),
                        },
                    )
                })
                .collect()
        })
    }
}

impl QueryBackend for Unavailable {
    fn query_all(&self, queries: Vec<String>) -> BoxFuture<'_, HashMap<String, Sample>> {
        self.answer_all(queries)
    }

    fn query_range(
        &self,
        _query: String,
        _start: DateTime<Utc>,
        _end: DateTime<Utc>,
        _step: chrono::TimeDelta,
    ) -> BoxFuture<'_, Result<History, String>> {
        let message = self.0.clone();
        Box::pin(async move { Err(message) })
    }
}

const NO_PROMETHEUS: &str =
    "no Prometheus is configured (set --prometheus-url or KSCALE_PROMETHEUS_URL)";

impl QueryBackend for crate::source::prometheus::PrometheusSource {
    fn query_all(&self, queries: Vec<String>) -> BoxFuture<'_, HashMap<String, Sample>> {
        Box::pin(async move {
            let refs: Vec<&str> = queries.iter().map(|q| q.as_str()).collect();
            crate::source::prometheus::PrometheusSource::query_all(self, refs).await
        })
    }

    fn query_range(
        &self,
        query: String,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        step: chrono::TimeDelta,
    ) -> BoxFuture<'_, Result<History, String>> {
        Box::pin(async move {
            crate::source::prometheus::PrometheusSource::query_range(
                self,
                &query,
                start,
                end,
                step,
                &mut |_, _| {},
            )
            .await
            .map_err(|e| e.message)
        })
    }
}

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
    /// Policies evaluated at once (`--max-concurrent-evaluations`).
    pub concurrency: usize,
    /// The external metrics adapter's cache, filled after every evaluation when it serves.
    pub external_metrics: Option<Arc<crate::adapter::Cache>>,
    /// Forecasting state of the policies with `spec.forecast`.
    pub forecasts: forecast::Forecasts,
    /// The run-time budget of formulas (`--formula-timeout`) and the ones refused for overrunning.
    pub formulas: formula_budget::FormulaBudget,
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
            forecasts: forecast::Forecasts::default(),
            formulas: formula_budget::FormulaBudget::default(),
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
    /// Writing status failed.
    #[error("policy {policy}: writing status: {source}")]
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
}

/// The PromQL queries of a policy's Prometheus metrics.
pub fn queries_of(policy: &CompiledPolicy) -> impl Iterator<Item = &str> {
    policy.metrics.iter().filter_map(|m| match &m.source {
        MetricSource::Prometheus { query } => Some(query.as_str()),
        MetricSource::Resource { .. } => None,
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
/// written to the scale subresource (after the one-writer check). Shared by the controller and
/// `kscale dry-run` (which never writes).
pub async fn evaluate_live(
    ctx: &Context,
    resource: &ScalingPolicy,
    policy: CompiledPolicy,
    prometheus: &HashMap<String, Sample>,
    now: DateTime<Utc>,
    write: bool,
    writer: Option<&str>,
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
    let scale = target.read().await.map_err(target_err)?;

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
    let (pod_count, ready) = match &pods {
        Some(Ok(list)) => (
            list.len() as i32,
            list.iter().filter(|p| pod_ready(p)).count() as i32,
        ),
        Some(Err(e)) => {
            warn!(policy = %name, error = %e, "reading the target's pods failed; counting status replicas as ready");
            (scale.status_replicas, scale.status_replicas)
        }
        None => (scale.status_replicas, scale.status_replicas),
    };

    let mut samples = Vec::with_capacity(policy.metrics.len());
    for m in &policy.metrics {
        let sample = match &m.source {
            MetricSource::Prometheus { query } => prometheus
                .get(query.as_str())
                .cloned()
                .unwrap_or(Sample::Missing { reason: "the query was not run this tick".into() }),
            MetricSource::Resource { cpu, container } => match (&scale.selector, &pods) {
                (Some(selector), Some(Ok(list))) => resource_sample(&ctx.client, &namespace, selector, list, ResourceName::from_cpu_flag(*cpu), container.as_deref()).await,
                (_, Some(Err(e))) => Sample::Error { message: e.clone() },
                _ => Sample::Error { message: "the target's scale subresource has no status.selector, so its pods are unknown".into() },
            },
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
    let obs = Observation {
        spec_replicas: scale.spec_replicas,
        status_replicas: scale.status_replicas,
        ready_replicas: ready,
        pods: pod_count,
        forecasts,
        samples,
    };
    let history = resource
        .status
        .as_ref()
        .map(|s| s.history.clone().capped())
        .unwrap_or_default();
    // A formula runs off the async workers under its run-time budget.
    let (policy, mut decision) = ctx
        .formulas
        .evaluate(
            &name,
            resource.metadata.generation,
            policy,
            obs,
            history,
            now,
        )
        .await;
    let mut wrote = false;
    let mut not_written = None;
    if decision.replicas != decision.current {
        match policy.mode {
            Mode::Controller if write => {
                if let Some(other) = writer {
                    return Err(target_err(ActuateError::PolicyConflict {
                        kind: resource.spec.target_ref.kind.clone(),
                        namespace: namespace.clone(),
                        name: resource.spec.target_ref.name.clone(),
                        policy: other.to_string(),
                    }));
                }
                target.check_no_hpa(&ctx.client).await.map_err(target_err)?;
                target.write(decision.replicas).await.map_err(target_err)?;
                decision.record_applied(&policy, now);
                wrote = true;
            }
            Mode::Controller => not_written = Some("dry run: nothing is written".to_string()),
            Mode::DryRun => {
                not_written = Some("mode DryRun: kscale reports and never writes".to_string())
            }
            Mode::ExternalMetric => not_written = Some(
                "mode ExternalMetric: the decision is published for an HPA, which stays the writer"
                    .to_string(),
            ),
        }
    }
    Ok(Evaluated {
        policy,
        scale,
        decision,
        wrote,
        not_written,
    })
}

fn object_ref(p: &ScalingPolicy) -> ObjectReference {
    p.object_ref(&())
}

async fn publish(ctx: &Context, p: &ScalingPolicy, type_: EventType, reason: &str, note: String) {
    publish_on(ctx, &object_ref(p), type_, reason, note).await;
}

async fn publish_on(
    ctx: &Context,
    regarding: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Scale".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, regarding).await {
        warn!(error = %e, "publishing an event failed");
    }
}

/// Records a rescale as an Event of its own. kube's `Recorder` folds every event with the same
/// reason into one series and keeps the first note, so a second rescale would show the first
/// one's sizes and reason; each rescale is a distinct fact, so it gets a distinct Event.
async fn publish_rescale(ctx: &Context, p: &ScalingPolicy, note: String) {
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
        reason: Some("SuccessfulRescale".into()),
        regarding: Some(object_ref(p)),
        reporting_controller: Some("kscale".into()),
        reporting_instance: Some(ctx.instance.clone()),
        type_: Some("Normal".into()),
        ..Default::default()
    };
    let api: Api<K8sEvent> = Api::namespaced(ctx.client.clone(), &namespace);
    if let Err(e) = api.create(&PostParams::default(), &event).await {
        warn!(error = %e, "publishing the rescale event failed");
    }
}

async fn write_status(
    ctx: &Context,
    p: &ScalingPolicy,
    status: &ScalingPolicyStatus,
) -> Result<(), kube::Error> {
    let api: Api<ScalingPolicy> =
        Api::namespaced(ctx.client.clone(), &p.namespace().unwrap_or_default());
    let body = serde_json::json!({"apiVersion": "kscale.dev/v1alpha1", "kind": "ScalingPolicy", "status": status});
    api.patch_status(
        &p.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map(|_| ())
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

/// Evaluates one policy and reports the outcome in status, events and logs. A follower
/// (`leading` false) serving external metrics only evaluates and publishes: no writes, no status,
/// no events.
pub async fn reconcile(
    ctx: &Context,
    p: &ScalingPolicy,
    compiled: Result<CompiledPolicy, crate::policy::ValidationErrors>,
    prometheus: &HashMap<String, Sample>,
    now: DateTime<Utc>,
    writer: Option<&str>,
    leading: bool,
) -> Result<(), PolicyError> {
    let name = format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
    let started = std::time::Instant::now();
    let result = match compiled {
        Ok(policy) => evaluate_live(ctx, p, policy, prometheus, now, leading, writer).await,
        Err(errors) => Err(EvalError::Invalid {
            policy: name.clone(),
            errors,
        }),
    };
    ctx.metrics
        .evaluation_seconds
        .observe(started.elapsed().as_secs_f64());
    if let Some(cache) = &ctx.external_metrics {
        cache.record(
            &p.namespace().unwrap_or_default(),
            &p.name_any(),
            &result,
            prometheus,
            now,
        );
    }
    if !leading {
        // A follower only publishes; the leader reports.
        return result.map(|_| ()).map_err(PolicyError::from);
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
            let reason = e.decision.reason(&e.policy);
            info!(policy = %name, target = %p.spec.target_ref.name, current = e.decision.current, desired = e.decision.replicas, wrote = e.wrote, %reason, "evaluated");
            if e.wrote {
                publish_rescale(
                    ctx,
                    p,
                    format!("New size: {}; reason: {reason}", e.decision.replicas),
                )
                .await;
            }
            status
                .conditions
                .push(k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    reason: "Evaluated".into(),
                    message: e
                        .not_written
                        .clone()
                        .unwrap_or_else(|| "the policy is evaluated every interval".into()),
                    last_transition_time: p
                        .status
                        .as_ref()
                        .and_then(|s| {
                            s.conditions
                                .iter()
                                .find(|c| c.type_ == "Ready" && c.status == "True")
                        })
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
            warn!(policy = %name, error = %source, "target");
            let label = source.kind_label();
            let message = source.to_string();
            if !same_failure(p, label, &message) {
                publish(ctx, p, EventType::Warning, label, message.clone()).await;
            }
            failure_status(p, label, message, now)
        }
    };
    if status_changed(p.status.as_ref(), &status) {
        write_status(ctx, p, &status)
            .await
            .map_err(|e| PolicyError::Status {
                policy: name,
                source: Box::new(e),
            })?;
    }
    result.map(|_| ()).map_err(PolicyError::from)
}

/// A status that only moves `lastEvaluationTime` (a policy that keeps failing the same way, say)
/// is written at most this often. Anything else is written at once, the stabilization history
/// included, so a new leader continues the same windows.
const STATUS_REFRESH: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// Within this long of the last status write, a status whose decision is unchanged (only metric
/// values, proposals, the reason's figures or recommendations moved) waits: one policy writes its
/// status at most once per this period unless its decision changes, whatever its interval.
const STATUS_MIN_PERIOD: chrono::TimeDelta = chrono::TimeDelta::seconds(5);

/// Whether `new` says something `old` does not, or `old` is older than [`STATUS_REFRESH`]. A
/// change of decision (replicas, generation, conditions, scale events) is written at once; any
/// other change at most every [`STATUS_MIN_PERIOD`].
fn status_changed(old: Option<&ScalingPolicyStatus>, new: &ScalingPolicyStatus) -> bool {
    let Some(old) = old else { return true };
    let (Some(then), Some(now)) = (old.last_evaluation_time, new.last_evaluation_time) else {
        return true;
    };
    if now - then >= STATUS_REFRESH {
        return true;
    }
    let mut same = new.clone();
    same.last_evaluation_time = old.last_evaluation_time;
    if same == *old {
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
    let leading = Arc::new(std::sync::atomic::AtomicBool::new(election.is_none()));
    let campaign = election
        .clone()
        .map(|cfg| tokio::spawn(leader::campaign(ctx.client.clone(), cfg, leading.clone())));
    let api: Api<DeserializeGuard<ScalingPolicy>> = match &ctx.watch_namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    )
    .touched_objects();
    let watch = crate::source::spawn_watch(stream, "ScalingPolicy");
    tokio::pin!(shutdown);
    tokio::select! {
        r = reader.wait_until_ready() => if r.is_err() { warn!("the ScalingPolicy store closed before its first sync"); },
        _ = &mut shutdown => { watch.abort(); return Ok(()); }
    }
    info!("ScalingPolicy watch synced");
    let mut state = TickState::default();
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = &mut shutdown => break,
        }
        let is_leader = leading.load(std::sync::atomic::Ordering::SeqCst);
        ctx.metrics.leader.set(i64::from(is_leader));
        if is_leader && !state.leading {
            // A new leader evaluates every policy at once.
            state.schedule.clear();
        }
        state.leading = is_leader;
        if is_leader {
            run_tick(&ctx, &reader, &mut state).await;
        } else if ctx.external_metrics.is_some() {
            // A follower that serves external metrics evaluates too, to publish the same values
            // as the leader; it writes nothing (no scale, status or events).
            run_tick(&ctx, &reader, &mut state).await;
        } else {
            // A follower evaluates nothing.
            state.schedule.clear();
        }
        // Wake at the next due time, and at least every POLL to notice new or changed policies.
        let next = state.schedule.values().map(|(at, _, _)| *at).min();
        wait = next
            .and_then(|at| (at - Utc::now()).to_std().ok())
            .unwrap_or(Duration::ZERO)
            .min(POLL);
        // Ready after the first sync and the first tick (a follower is ready to take over).
        ctx.metrics.set_ready();
    }
    watch.abort();
    if let Some(c) = campaign {
        c.abort();
    }
    if let Some(cfg) = &election {
        leader::release(&ctx.client, cfg).await;
    }
    info!("controller stopped");
    Ok(())
}

/// A target as the one-writer rule sees it: namespace, API group, kind, name.
type TargetKey = (String, String, String, String);

fn target_key(p: &ScalingPolicy) -> TargetKey {
    let r = &p.spec.target_ref;
    let group = r
        .api_version
        .as_deref()
        .and_then(|v| v.split_once('/'))
        .map_or_else(String::new, |(g, _)| g.to_string());
    (
        p.namespace().unwrap_or_default(),
        group,
        r.kind.clone(),
        r.name.clone(),
    )
}

/// The one policy allowed to write each target: among valid policies in mode `Controller`, the
/// oldest (then the first by name). The others report `ConflictingPolicy` and never write.
/// Validity comes from the schedule when it knows this generation, so policies are not
/// compiled again every tick.
fn writers(
    all: &[Arc<DeserializeGuard<ScalingPolicy>>],
    schedule: &Schedule,
) -> HashMap<TargetKey, String> {
    let mut owners: HashMap<TargetKey, (Option<String>, String)> = HashMap::new();
    for obj in all {
        let Ok(p) = &obj.0 else { continue };
        if p.spec.mode != Mode::Controller {
            continue;
        }
        let valid = match schedule.get(&ObjectRef::from_obj(obj.as_ref())) {
            Some((_, generation, valid)) if *generation == p.metadata.generation => *valid,
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
            .entry(target_key(p))
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

/// What the loop keeps between ticks.
#[derive(Default)]
struct TickState {
    schedule: Schedule,
    /// Whether this replica led at the last tick: only the leader writes.
    leading: bool,
    /// Each query's last values, to put the policies whose inputs changed first in a tick.
    last: HashMap<(servers::ServerKey, String), Option<Vec<u64>>>,
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
        Sample::Series { values, .. } => Some(values.iter().map(|v| v.to_bits()).collect()),
        _ => None,
    }
}

/// Per policy: when it is next due, the generation last seen, and whether it compiled.
type Schedule =
    HashMap<ObjectRef<DeserializeGuard<ScalingPolicy>>, (DateTime<Utc>, Option<i64>, bool)>;

async fn run_tick(
    ctx: &Context,
    reader: &Store<DeserializeGuard<ScalingPolicy>>,
    state: &mut TickState,
) {
    let leading = state.leading;
    let schedule = &mut state.schedule;
    let now = Utc::now();
    let all = reader.state();
    let live: HashSet<_> = all
        .iter()
        .map(|o| ObjectRef::from_obj(o.as_ref()))
        .collect();
    schedule.retain(|k, _| live.contains(k));
    let writers = writers(&all, schedule);
    ctx.forecasts.retain(|key| {
        live.iter().any(|r| {
            r.namespace
                .as_deref()
                .is_some_and(|ns| key == format!("{ns}/{}", r.name))
        })
    });
    let mut due = Vec::new();
    let mut malformed = Vec::new();
    for obj in &all {
        let key = ObjectRef::from_obj(obj.as_ref());
        let generation = obj.meta().generation;
        let (is_due, fresh) = match schedule.get(&key) {
            None => (true, true),
            Some((at, g, _)) => (*g != generation || *at <= now, *g != generation),
        };
        if !is_due {
            continue;
        }
        match &obj.0 {
            Ok(p) => {
                // Compiled once per tick: for the interval, the queries and the evaluation.
                let compiled = CompiledPolicy::from_resource(p);
                let interval = match (&compiled, &p.spec.interval) {
                    (Ok(c), Some(_)) => c.interval,
                    _ => ctx.default_interval,
                };
                schedule.insert(key, (next_due(now, interval), generation, compiled.is_ok()));
                due.push((p.clone(), compiled, fresh));
            }
            Err(invalid) => {
                // Malformed objects are reported once per generation and never stop the others.
                schedule.insert(
                    key,
                    (now + chrono::TimeDelta::days(3650), generation, false),
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
            format!("kscale cannot read this ScalingPolicy and ignores it (other policies are unaffected): {error}"),
        )
        .await;
    }
    if due.is_empty() {
        return;
    }
    let namespaces: Vec<String> = due
        .iter()
        .map(|(p, _, _)| p.namespace().unwrap_or_default())
        .collect();
    let started = std::time::Instant::now();
    let samples = ctx
        .servers
        .query(
            due.iter()
                .zip(&namespaces)
                .filter_map(|((_, c, _), ns)| c.as_ref().ok().map(|c| (ns.as_str(), c))),
        )
        .instrument(info_span!("prometheus"))
        .await;
    let distinct: usize = samples.values().map(HashMap::len).sum();
    if distinct > 0 {
        ctx.metrics
            .prometheus_seconds
            .observe(started.elapsed().as_secs_f64());
    }
    debug!(policies = due.len(), distinct_queries = distinct, "tick");
    // Queries whose answer changed since they last ran: their policies go first, so a change
    // reaches the scale subresource without waiting behind the policies it does not affect.
    let mut changed: HashSet<(servers::ServerKey, &str)> = HashSet::new();
    for (server, answers) in &samples {
        for (query, sample) in answers {
            let print = fingerprint(sample);
            let key = (server.clone(), query.clone());
            if state.last.get(&key) != Some(&print) {
                changed.insert((server.clone(), query.as_str()));
                state.last.insert(key, print);
            }
        }
    }
    let mut work: Vec<_> = due
        .into_iter()
        .zip(&namespaces)
        .map(|((p, compiled, fresh), namespace)| {
            let server = compiled
                .as_ref()
                .ok()
                .map(|c| servers::Servers::key_of(namespace, c));
            let urgent = fresh
                || compiled.as_ref().is_ok_and(|c| {
                    queries_of(c).any(|q| changed.contains(&(server.clone().flatten(), q)))
                });
            (urgent, p, compiled, server)
        })
        .collect();
    work.sort_by_key(|(urgent, ..)| !*urgent);
    let none = HashMap::new();
    let samples = &samples;
    let writers = &writers;
    let none = &none;
    futures::stream::iter(work)
        .map(|(_, p, compiled, server)| async move {
            let policy_samples = server
                .and_then(|k| samples.get(&k))
                .unwrap_or(none);
            let span = info_span!("evaluate", policy = %p.name_any(), namespace = %p.namespace().unwrap_or_default(), target = %p.spec.target_ref.name);
            let writer = writers
                .get(&target_key(&p))
                .filter(|w| **w != format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()))
                .map(String::as_str);
            if let Err(e) = reconcile(ctx, &p, compiled, policy_samples, now, writer, leading)
                .instrument(span)
                .await
            {
                warn!(error = %e, "evaluation failed");
            }
        })
        .buffer_unordered(ctx.concurrency.max(1))
        .collect::<()>()
        .await;
    // Forget queries no policy asked for lately (their policies were deleted or changed).
    if state.last.len() > 4 * distinct.max(64) {
        state.last.retain(|(server, q), _| {
            samples
                .get(server)
                .is_some_and(|answers| answers.contains_key(q))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
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
        assert!(!status_changed(Some(&old), &new));
        new.last_evaluation_time = Some(at(60));
        assert!(status_changed(Some(&old), &new));
        new.last_evaluation_time = Some(at(10));
        new.desired_replicas = Some(4);
        assert!(status_changed(Some(&old), &new));
        assert!(status_changed(None, &new));
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
        assert!(!status_changed(Some(&old), &new));
        new.last_evaluation_time = Some(at(4));
        assert!(!status_changed(Some(&old), &new));
        new.last_evaluation_time = Some(at(5));
        assert!(status_changed(Some(&old), &new));
        new.last_evaluation_time = Some(at(1));
        new.desired_replicas = Some(4);
        assert!(status_changed(Some(&old), &new));
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
        assert!(!status_changed(Some(&first), &again));
    }
}
