//! The scaling controller: watches ScalingPolicies, reads their metrics, evaluates them with the
//! pure core and acts on the decision.
//!
//! Kubernetes state arrives through a watch (a reflector store of ScalingPolicies, with
//! `DeserializeGuard` so one malformed object cannot stop it); a one-second tick picks the
//! policies whose `spec.interval` is due (a changed generation is due at once), sends every
//! distinct PromQL query of the tick once, then for each policy reads the target's scale
//! subresource and pods, evaluates, writes the scale (mode `Controller` only, and only on a
//! change), records an Event, and writes the status (server-side apply, field manager `kscale`).
//!
//! With leader election ([`leader`]), every replica keeps the watch warm but only the Lease
//! holder evaluates and writes; a new leader starts from the history in each policy's status.

pub mod forecast;
pub mod leader;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::future::LocalBoxFuture as BoxFuture;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::core::DeserializeGuard;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::actuate::{ActuateError, FIELD_MANAGER, ScaleState, ScaleTarget};
use crate::crd::{Mode, ScalingPolicy, ScalingPolicyStatus};
use crate::model::{Observation, Sample};
use crate::policy::{CompiledPolicy, Decision, MetricSource, evaluate};
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

/// No Prometheus configured: every query is an explicit error, never a zero.
pub struct NoPrometheus;

impl QueryBackend for NoPrometheus {
    fn query_all(&self, queries: Vec<String>) -> BoxFuture<'_, HashMap<String, Sample>> {
        Box::pin(async move {
            queries
                .into_iter()
                .map(|q| {
                    (
                        q,
                        Sample::Error {
                            message: NO_PROMETHEUS.into(),
                        },
                    )
                })
                .collect()
        })
    }

    fn query_range(
        &self,
        _query: String,
        _start: DateTime<Utc>,
        _end: DateTime<Utc>,
        _step: chrono::TimeDelta,
    ) -> BoxFuture<'_, Result<History, String>> {
        Box::pin(async { Err(NO_PROMETHEUS.to_string()) })
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
    /// Prometheus.
    pub prometheus: Arc<dyn QueryBackend>,
    /// Event recorder.
    pub recorder: Recorder,
    /// The daemon's own metrics.
    pub metrics: Arc<crate::telemetry::Metrics>,
    /// Only this namespace's ScalingPolicies (all namespaces when `None`).
    pub watch_namespace: Option<String>,
    /// This instance's name in events.
    pub instance: String,
    /// Forecasting state of the policies with `spec.forecast`.
    pub forecasts: forecast::Forecasts,
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
            client,
            prometheus,
            metrics: Arc::new(crate::telemetry::Metrics::new()),
            watch_namespace: None,
            instance: instance_name,
            forecasts: forecast::Forecasts::default(),
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
    let target = ScaleTarget::resolve(&ctx.client, &namespace, &resource.spec.target_ref)
        .await
        .map_err(target_err)?;
    let scale = target.read().await.map_err(target_err)?;

    let (pods, ready) = match &scale.selector {
        Some(selector) => {
            let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
            match api.list(&ListParams::default().labels(selector)).await {
                Ok(list) => {
                    let ready = list.items.iter().filter(|p| pod_ready(p)).count() as i32;
                    (list.items.len() as i32, ready)
                }
                Err(e) => {
                    warn!(policy = %name, error = %e, "listing the target's pods failed; counting status replicas as ready");
                    (scale.status_replicas, scale.status_replicas)
                }
            }
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
            MetricSource::Resource { cpu, container } => match &scale.selector {
                Some(selector) => resource_sample(&ctx.client, &namespace, selector, ResourceName::from_cpu_flag(*cpu), container.as_deref()).await,
                None => Sample::Error { message: "the target's scale subresource has no status.selector, so its pods are unknown".into() },
            },
        };
        samples.push(sample);
    }
    let forecasts = ctx
        .forecasts
        .predict(
            ctx.prometheus.as_ref(),
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
        pods,
        forecasts,
        samples,
    };
    let history = resource
        .status
        .as_ref()
        .map(|s| s.history.clone())
        .unwrap_or_default();
    let mut decision = evaluate(&policy, &obs, &history, now);
    let mut wrote = false;
    let mut not_written = None;
    if decision.replicas != decision.current {
        match policy.mode {
            Mode::Controller if write => {
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
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Scale".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &object_ref(p)).await {
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
        last_transition_time: k8s_time(now),
        observed_generation: p.metadata.generation,
    };
    status.conditions.retain(|c| c.type_ != "Ready");
    status.conditions.push(condition);
    status
}

/// Evaluates one policy and reports the outcome in status, events and logs.
pub async fn reconcile(
    ctx: &Context,
    p: &ScalingPolicy,
    compiled: Result<CompiledPolicy, crate::policy::ValidationErrors>,
    prometheus: &HashMap<String, Sample>,
    now: DateTime<Utc>,
) -> Result<(), PolicyError> {
    let name = format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
    let started = std::time::Instant::now();
    let result = match compiled {
        Ok(policy) => evaluate_live(ctx, p, policy, prometheus, now, true).await,
        Err(errors) => Err(EvalError::Invalid {
            policy: name.clone(),
            errors,
        }),
    };
    ctx.metrics
        .evaluation_seconds
        .observe(started.elapsed().as_secs_f64());
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
            publish(
                ctx,
                p,
                EventType::Warning,
                "InvalidPolicy",
                errors.to_string(),
            )
            .await;
            failure_status(p, "InvalidPolicy", errors.to_string(), now)
        }
        Err(EvalError::Target { source, .. }) => {
            warn!(policy = %name, error = %source, "target");
            let label = source.kind_label();
            publish(ctx, p, EventType::Warning, label, source.to_string()).await;
            failure_status(p, label, source.to_string(), now)
        }
    };
    write_status(ctx, p, &status)
        .await
        .map_err(|e| PolicyError::Status {
            policy: name,
            source: Box::new(e),
        })?;
    result.map(|_| ()).map_err(PolicyError::from)
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
    let watch = tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                warn!(error = %e, "ScalingPolicy watch error (retrying with backoff)");
            }
        }
    });
    tokio::pin!(shutdown);
    tokio::select! {
        r = reader.wait_until_ready() => if r.is_err() { warn!("the ScalingPolicy store closed before its first sync"); },
        _ = &mut shutdown => { watch.abort(); return Ok(()); }
    }
    info!("ScalingPolicy watch synced");
    let mut schedule = Schedule::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut shutdown => break,
        }
        let is_leader = leading.load(std::sync::atomic::Ordering::SeqCst);
        ctx.metrics.leader.set(i64::from(is_leader));
        if is_leader {
            run_tick(&ctx, &reader, &mut schedule).await;
        } else {
            // A follower evaluates nothing; when it leads, every policy is due at once.
            schedule.clear();
        }
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

type Schedule = HashMap<ObjectRef<DeserializeGuard<ScalingPolicy>>, (DateTime<Utc>, Option<i64>)>;

async fn run_tick(
    ctx: &Context,
    reader: &Store<DeserializeGuard<ScalingPolicy>>,
    schedule: &mut Schedule,
) {
    let now = Utc::now();
    let all = reader.state();
    let live: HashSet<_> = all
        .iter()
        .map(|o| ObjectRef::from_obj(o.as_ref()))
        .collect();
    schedule.retain(|k, _| live.contains(k));
    ctx.forecasts.retain(|key| {
        live.iter().any(|r| {
            r.namespace
                .as_deref()
                .is_some_and(|ns| key == format!("{ns}/{}", r.name))
        })
    });
    let mut due = Vec::new();
    for obj in &all {
        let key = ObjectRef::from_obj(obj.as_ref());
        let generation = obj.meta().generation;
        let is_due = match schedule.get(&key) {
            None => true,
            Some((at, g)) => *g != generation || *at <= now,
        };
        if !is_due {
            continue;
        }
        match &obj.0 {
            Ok(p) => {
                // Compiled once per tick: for the interval, the queries and the evaluation.
                let compiled = CompiledPolicy::from_resource(p);
                let interval = compiled
                    .as_ref()
                    .map_or(crate::policy::compile::DEFAULT_INTERVAL, |c| c.interval);
                schedule.insert(key, (now + interval, generation));
                due.push((p.clone(), compiled));
            }
            Err(invalid) => {
                // Malformed objects are reported once per generation and never stop the others.
                schedule.insert(key, (now + chrono::TimeDelta::days(3650), generation));
                warn!(policy = %format!("{}/{}", invalid.metadata.namespace.clone().unwrap_or_default(), invalid.metadata.name.clone().unwrap_or_default()), error = %invalid.error, "malformed ScalingPolicy ignored");
            }
        }
    }
    if due.is_empty() {
        return;
    }
    let mut queries: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    for (_, compiled) in &due {
        if let Ok(c) = compiled {
            for q in queries_of(c) {
                if seen.insert(q.to_string()) {
                    queries.push(q.to_string());
                }
            }
        }
    }
    let distinct = queries.len();
    let started = std::time::Instant::now();
    let samples = ctx
        .prometheus
        .query_all(queries)
        .instrument(info_span!("prometheus", distinct))
        .await;
    if distinct > 0 {
        ctx.metrics
            .prometheus_seconds
            .observe(started.elapsed().as_secs_f64());
    }
    debug!(policies = due.len(), distinct_queries = distinct, "tick");
    for (p, compiled) in due {
        let span = info_span!("evaluate", policy = %p.name_any(), namespace = %p.namespace().unwrap_or_default(), target = %p.spec.target_ref.name);
        if let Err(e) = reconcile(ctx, &p, compiled, &samples, now)
            .instrument(span)
            .await
        {
            warn!(error = %e, "evaluation failed");
        }
    }
}
