//! The daemon's own telemetry: Prometheus metrics for every decision, and health endpoints.
//!
//! `/metrics` (OpenMetrics text), `/healthz` (the process serves), `/readyz` (true only after
//! the first ScalingPolicy watch sync and the first evaluation tick).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::info;

use crate::policy::{CompiledPolicy, Decision, Rule};

/// Labels of one policy.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    /// Namespace.
    pub namespace: String,
    /// Policy name.
    pub policy: String,
}

/// Labels of one decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// Namespace.
    pub namespace: String,
    /// Policy name.
    pub policy: String,
    /// `up`, `down` or `hold`.
    pub direction: String,
    /// The rule that decided (`metrics`, `formula`, `fallback`, `min`, `max`, `disabled`).
    pub rule: String,
}

/// Labels of one policy metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MetricLabels {
    /// Namespace.
    pub namespace: String,
    /// Policy name.
    pub policy: String,
    /// The policy's metric name.
    pub metric: String,
}

/// Labels of a source error. Their cardinality is bounded by the policies: one set per policy,
/// metric source, server and kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceErrorLabels {
    /// The policy's namespace.
    pub namespace: String,
    /// The policy's name.
    pub policy: String,
    /// Where the metric came from: `default` (the daemon's `--prometheus-url`), the policy's own
    /// `spec.prometheus.url`, or `metrics.k8s.io` for resource metrics.
    pub server: String,
    /// `prometheus` or `resource`.
    pub source: String,
    /// `missing`, `stale`, `invalid` or `error`.
    pub kind: String,
}

/// Labels of a shard's gauge (`--shards`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabels {
    /// The shard's number, 0 to `--shards` - 1.
    pub shard: String,
}

/// Labels of a request the external metrics adapter forwarded to
/// `--external-metrics-upstream`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForwardLabels {
    /// `metric` (a metric's values) or `discovery` (the upstream's resource list).
    pub request: String,
    /// `ok` (a 2xx answer relayed), `http_error` (any other status, relayed), or why there was
    /// no answer: `connect`, `timeout`, `limit` (over the byte cap), `error` (TLS, a broken
    /// body).
    pub outcome: String,
}

/// Every metric kscale exports.
pub struct Metrics {
    registry: Registry,
    /// Evaluations per policy.
    pub evaluations: Family<PolicyLabels, Counter>,
    /// Decisions by direction and rule.
    pub decisions: Family<DecisionLabels, Counter>,
    /// The last desired replica count.
    pub desired_replicas: Family<PolicyLabels, Gauge>,
    /// The target's replica count when last evaluated.
    pub current_replicas: Family<PolicyLabels, Gauge>,
    /// Each metric's last value (NaN while not valid).
    pub metric_value: Family<MetricLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Each metric's target.
    pub metric_target: Family<MetricLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Each metric's last proposal (-1 while not valid).
    pub metric_proposal: Family<MetricLabels, Gauge>,
    /// Each forecast metric's last forecast upper bound (NaN while there is none).
    pub metric_forecast: Family<MetricLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Metrics that were not valid, by source and kind.
    pub source_errors: Family<SourceErrorLabels, Counter>,
    /// Writes to `/scale`, by policy.
    pub scale_writes: Family<PolicyLabels, Counter>,
    /// Time to evaluate one policy (reads, evaluation, writes).
    pub evaluation_seconds: Histogram,
    /// Time for one server's Prometheus queries of one tick.
    pub prometheus_seconds: Histogram,
    /// 1 while this instance is the one that evaluates and writes (with `--shards`: holds at
    /// least one shard).
    pub leader: Gauge,
    /// How many shards' Leases this instance holds (`--shards`; 1 or 0 with one Lease).
    pub shards_held: Gauge,
    /// Per shard, 1 while this instance holds its Lease and writes its policies.
    pub shard_leading: Family<ShardLabels, Gauge>,
    /// 1 while the policy's `Ready` condition is True, 0 while it is False (what to alert on).
    pub policy_ready: Family<PolicyLabels, Gauge>,
    /// 1 when the daemon has a default Prometheus (`--prometheus-url`), 0 when it has none.
    pub default_prometheus: Gauge,
    /// Shadow mode: the `status.desiredReplicas` of the HPA beside a DryRun policy.
    pub shadow_hpa_desired_replicas: Family<PolicyLabels, Gauge>,
    /// Shadow mode: kscale's desired replicas minus the HPA's.
    pub shadow_divergence_replicas: Family<PolicyLabels, Gauge>,
    /// Requests forwarded to the external metrics upstream, by outcome.
    pub forwarded: Family<ForwardLabels, Counter>,
    ready: AtomicBool,
    /// Settings that leave the daemon running but some policies failing; `/readyz` lists them.
    warnings: std::sync::Mutex<Vec<String>>,
    /// The label sets recorded per policy, so a deleted policy's series can be removed.
    exported: std::sync::Mutex<HashMap<PolicyLabels, Exported>>,
}

/// The label sets one policy's series were recorded under, beyond the policy's own.
#[derive(Debug, Default)]
struct Exported {
    /// Metric names (`MetricLabels::metric`).
    metrics: HashSet<String>,
    /// `(direction, rule)` of `DecisionLabels`.
    decisions: HashSet<(String, String)>,
    /// Source error label sets.
    source_errors: HashSet<SourceErrorLabels>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every kscale metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kscale");
        let m = Metrics {
            evaluations: Family::default(),
            decisions: Family::default(),
            desired_replicas: Family::default(),
            current_replicas: Family::default(),
            metric_value: Family::default(),
            metric_target: Family::default(),
            metric_proposal: Family::default(),
            metric_forecast: Family::default(),
            source_errors: Family::default(),
            scale_writes: Family::default(),
            evaluation_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            prometheus_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            leader: Gauge::default(),
            shards_held: Gauge::default(),
            shard_leading: Family::default(),
            policy_ready: Family::default(),
            default_prometheus: Gauge::default(),
            shadow_hpa_desired_replicas: Family::default(),
            shadow_divergence_replicas: Family::default(),
            forwarded: Family::default(),
            ready: AtomicBool::new(false),
            warnings: std::sync::Mutex::new(Vec::new()),
            exported: std::sync::Mutex::new(HashMap::new()),
            registry: Registry::default(),
        };
        registry.register("evaluations", "Policy evaluations", m.evaluations.clone());
        registry.register(
            "decisions",
            "Decisions by direction and rule",
            m.decisions.clone(),
        );
        registry.register(
            "desired_replicas",
            "Replica count the last evaluation decided",
            m.desired_replicas.clone(),
        );
        registry.register(
            "current_replicas",
            "Replica count of the target when last evaluated",
            m.current_replicas.clone(),
        );
        registry.register(
            "metric_value",
            "Each policy metric's last value (NaN while not valid)",
            m.metric_value.clone(),
        );
        registry.register(
            "metric_target",
            "Each policy metric's target",
            m.metric_target.clone(),
        );
        registry.register(
            "metric_proposal",
            "Each policy metric's last replica proposal (-1 while not valid)",
            m.metric_proposal.clone(),
        );
        registry.register(
            "metric_forecast",
            "Each forecast metric's last forecast, the upper bound sized for at now + horizon \
             (NaN while there is none)",
            m.metric_forecast.clone(),
        );
        registry.register(
            "source_errors",
            "Metrics that were missing, stale, invalid or failing",
            m.source_errors.clone(),
        );
        registry.register(
            "scale_writes",
            "Writes to a target's scale subresource",
            m.scale_writes.clone(),
        );
        registry.register(
            "evaluation_duration_seconds",
            "Time to read, evaluate and act on one policy",
            m.evaluation_seconds.clone(),
        );
        registry.register(
            "prometheus_tick_duration_seconds",
            "Time for one server's Prometheus queries of one tick",
            m.prometheus_seconds.clone(),
        );
        registry.register(
            "leader",
            "1 while this instance evaluates and writes",
            m.leader.clone(),
        );
        registry.register(
            "shards_held",
            "Shards (--shards) whose Lease this instance holds",
            m.shards_held.clone(),
        );
        registry.register(
            "shard_leading",
            "1 while this instance holds the shard's Lease and writes its policies",
            m.shard_leading.clone(),
        );
        registry.register(
            "shadow_hpa_desired_replicas",
            "Shadow mode: the desiredReplicas of the HPA beside a DryRun policy",
            m.shadow_hpa_desired_replicas.clone(),
        );
        registry.register(
            "shadow_divergence_replicas",
            "Shadow mode: kscale's desired replicas minus the HPA's (0 when they agree)",
            m.shadow_divergence_replicas.clone(),
        );
        registry.register(
            "policy_ready",
            "1 while the policy's Ready condition is True (evaluated, no conflict, every metric valid)",
            m.policy_ready.clone(),
        );
        registry.register(
            "default_prometheus_configured",
            "1 when the daemon has a default Prometheus (--prometheus-url), 0 when it has none",
            m.default_prometheus.clone(),
        );
        registry.register(
            "external_metrics_forwarded",
            "Requests the external metrics adapter forwarded to --external-metrics-upstream, by \
             request (metric or discovery) and outcome",
            m.forwarded.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Records a setting that leaves the daemon running but some policies failing: `/readyz`
    /// stays 200 and lists it.
    pub fn add_warning(&self, warning: String) {
        if let Ok(mut w) = self.warnings.lock()
            && !w.contains(&warning)
        {
            w.push(warning);
        }
    }

    /// The warnings `/readyz` lists.
    pub fn warnings(&self) -> Vec<String> {
        self.warnings.lock().map(|w| w.clone()).unwrap_or_default()
    }

    /// Records one decision.
    /// Shadow mode's gauges for a policy: set beside an HPA (`Some((hpa_desired, divergence))`),
    /// removed otherwise, so a policy that left shadow mode shows no stale divergence.
    pub fn record_shadow(&self, namespace: &str, name: &str, shadow: Option<(i32, i32)>) {
        let labels = PolicyLabels {
            namespace: namespace.to_string(),
            policy: name.to_string(),
        };
        match shadow {
            Some((hpa_desired, divergence)) => {
                self.shadow_hpa_desired_replicas
                    .get_or_create(&labels)
                    .set(i64::from(hpa_desired));
                self.shadow_divergence_replicas
                    .get_or_create(&labels)
                    .set(i64::from(divergence));
            }
            None => {
                self.shadow_hpa_desired_replicas.remove(&labels);
                self.shadow_divergence_replicas.remove(&labels);
            }
        }
    }

    pub fn record(
        &self,
        namespace: &str,
        policy: &CompiledPolicy,
        name: &str,
        decision: &Decision,
        wrote: bool,
    ) {
        let labels = PolicyLabels {
            namespace: namespace.to_string(),
            policy: name.to_string(),
        };
        self.evaluations.get_or_create(&labels).inc();
        let direction = match decision.replicas.cmp(&decision.current) {
            std::cmp::Ordering::Greater => "up",
            std::cmp::Ordering::Less => "down",
            std::cmp::Ordering::Equal => "hold",
        };
        let rule = match decision.rule {
            Rule::ScalingDisabled => "disabled",
            Rule::AboveMax => "max",
            Rule::BelowMin => "min",
            Rule::Metrics(_) => "metrics",
            Rule::Formula => "formula",
            Rule::Fallback(_) => "fallback",
            Rule::Paused(_) => "paused",
            Rule::PausedAtZero => "paused_at_zero",
            Rule::Idle => "idle",
        };
        self.decisions
            .get_or_create(&DecisionLabels {
                namespace: labels.namespace.clone(),
                policy: labels.policy.clone(),
                direction: direction.into(),
                rule: rule.into(),
            })
            .inc();
        let mut exported = self.exported.lock().ok();
        let mut exported = exported
            .as_mut()
            .map(|e| e.entry(labels.clone()).or_default());
        if let Some(e) = exported.as_mut() {
            e.decisions.insert((direction.into(), rule.into()));
        }
        self.desired_replicas
            .get_or_create(&labels)
            .set(i64::from(decision.replicas));
        self.current_replicas
            .get_or_create(&labels)
            .set(i64::from(decision.current));
        if wrote {
            self.scale_writes.get_or_create(&labels).inc();
        }
        for (m, o) in policy.metrics.iter().zip(&decision.metrics) {
            let ml = MetricLabels {
                namespace: labels.namespace.clone(),
                policy: labels.policy.clone(),
                metric: m.name.clone(),
            };
            self.metric_value
                .get_or_create(&ml)
                .set(o.value.unwrap_or(f64::NAN));
            self.metric_proposal
                .get_or_create(&ml)
                .set(o.proposal.map_or(-1, i64::from));
            self.metric_target.get_or_create(&ml).set(m.target.value());
            if let Some(e) = exported.as_mut() {
                e.metrics.insert(m.name.clone());
            }
            if policy.forecast.is_some()
                && matches!(m.source, crate::policy::MetricSource::Prometheus { .. })
            {
                self.metric_forecast
                    .get_or_create(&ml)
                    .set(o.forecast.map_or(f64::NAN, |(f, _)| f.upper));
            }
            if o.state.is_failure() {
                let (source, server) = match m.source {
                    crate::policy::MetricSource::Prometheus { .. } => (
                        "prometheus",
                        policy
                            .prometheus
                            .as_ref()
                            .map_or("default", |p| p.url.as_str()),
                    ),
                    crate::policy::MetricSource::Resource { .. } => ("resource", "metrics.k8s.io"),
                    crate::policy::MetricSource::Pods { .. } => ("pods", "custom.metrics.k8s.io"),
                    crate::policy::MetricSource::Object { .. } => {
                        ("object", "custom.metrics.k8s.io")
                    }
                    crate::policy::MetricSource::External { .. } => {
                        ("external", "external.metrics.k8s.io")
                    }
                };
                let error = SourceErrorLabels {
                    namespace: labels.namespace.clone(),
                    policy: labels.policy.clone(),
                    server: server.into(),
                    source: source.into(),
                    kind: o.state.as_str().to_lowercase(),
                };
                self.source_errors.get_or_create(&error).inc();
                if let Some(e) = exported.as_mut() {
                    e.source_errors.insert(error);
                }
            }
        }
    }

    /// `kscale_policy_ready` of a policy: 1 while its `Ready` condition is True.
    pub fn record_ready(&self, namespace: &str, name: &str, ready: bool) {
        let labels = PolicyLabels {
            namespace: namespace.to_string(),
            policy: name.to_string(),
        };
        self.policy_ready
            .get_or_create(&labels)
            .set(i64::from(ready));
        if let Ok(mut e) = self.exported.lock() {
            e.entry(labels).or_default();
        }
    }

    /// Removes every series of the policies `is_live` (given `namespace/name`) says are gone:
    /// a deleted policy leaves no frozen gauge and no counter behind (the label sets stay
    /// bounded by the live policies).
    pub fn retain_policies(&self, is_live: impl Fn(&str) -> bool) {
        let gone: Vec<(PolicyLabels, Exported)> = match self.exported.lock() {
            Ok(mut exported) => {
                let dead: Vec<PolicyLabels> = exported
                    .keys()
                    .filter(|l| !is_live(&format!("{}/{}", l.namespace, l.policy)))
                    .cloned()
                    .collect();
                dead.into_iter()
                    .filter_map(|l| exported.remove_entry(&l))
                    .collect()
            }
            Err(_) => return,
        };
        for (labels, e) in gone {
            for family in [
                &self.desired_replicas,
                &self.current_replicas,
                &self.policy_ready,
                &self.shadow_hpa_desired_replicas,
                &self.shadow_divergence_replicas,
            ] {
                family.remove(&labels);
            }
            self.evaluations.remove(&labels);
            self.scale_writes.remove(&labels);
            for (direction, rule) in e.decisions {
                self.decisions.remove(&DecisionLabels {
                    namespace: labels.namespace.clone(),
                    policy: labels.policy.clone(),
                    direction,
                    rule,
                });
            }
            for metric in e.metrics {
                let ml = MetricLabels {
                    namespace: labels.namespace.clone(),
                    policy: labels.policy.clone(),
                    metric,
                };
                self.metric_value.remove(&ml);
                self.metric_target.remove(&ml);
                self.metric_proposal.remove(&ml);
                self.metric_forecast.remove(&ml);
            }
            for error in e.source_errors {
                self.source_errors.remove(&error);
            }
        }
    }

    /// Removes the per-policy gauges (desired and current replicas, metric values, targets,
    /// proposals and forecasts, readiness, shadow mode), when this replica stops leading: they
    /// describe decisions it no longer makes, and a frozen copy beside the new leader's would
    /// mislead `max()` on a dashboard. Counters stay: they count what this replica did.
    pub fn forget_decisions(&self) {
        self.desired_replicas.clear();
        self.current_replicas.clear();
        self.metric_value.clear();
        self.metric_target.clear();
        self.metric_proposal.clear();
        self.metric_forecast.clear();
        self.policy_ready.clear();
        self.shadow_hpa_desired_replicas.clear();
        self.shadow_divergence_replicas.clear();
    }

    /// Records which shards this instance holds (`held`, one entry per shard):
    /// `kscale_shards_held` and, per shard, `kscale_shard_leading`.
    pub fn record_shards(&self, held: &[bool]) {
        let count = held.iter().filter(|h| **h).count();
        self.shards_held
            .set(i64::try_from(count).unwrap_or(i64::MAX));
        for (i, h) in held.iter().enumerate() {
            self.shard_leading
                .get_or_create(&ShardLabels {
                    shard: i.to_string(),
                })
                .set(i64::from(*h));
        }
    }

    /// Marks the daemon ready (first watch sync and first tick done).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// `/readyz`'s body when ready: `ok`, then one `warning:` line per setting that leaves some
/// policies failing (the daemon itself works, so it stays ready: see the README's Readiness).
fn ready_body(metrics: &Metrics) -> String {
    let mut body = String::from("ok\n");
    for w in metrics.warnings() {
        body.push_str("warning: ");
        body.push_str(&w);
        body.push('\n');
    }
    body
}

fn route(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => match metrics.encode() {
            Ok(text) => respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            ),
            Err(e) => respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("encoding metrics failed: {e}\n"),
            ),
        },
        "/healthz" | "/livez" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if metrics.is_ready() => {
            respond(StatusCode::OK, "text/plain", ready_body(metrics))
        }
        "/readyz" => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "waiting for the first watch sync and evaluation\n".into(),
        ),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

/// Binds the admin address (so a taken port fails at start-up, naming the flag's value).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// The admin listener's requests (plain HTTP).
struct Admin(Arc<Metrics>);

impl crate::listener::Handler<tokio::net::TcpStream> for Admin {
    type Io = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Conn = ();

    async fn handshake(&self, stream: tokio::net::TcpStream) -> Result<(Self::Io, ()), String> {
        Ok((crate::listener::plain(stream), ()))
    }

    async fn handle(&self, _: &(), req: Request<Incoming>) -> Response<Full<Bytes>> {
        route(&self.0, &req)
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` under `limits` (connections,
/// header size and timeouts: [`crate::listener`]) until the task is dropped; accept errors never
/// end it.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, limits: crate::listener::Limits) {
    let addr = listener
        .local_addr()
        .map_or_else(|e| format!("unknown ({e})"), |a: SocketAddr| a.to_string());
    info!(
        %addr,
        max_connections = limits.max_connections,
        "serving /metrics, /healthz, /readyz"
    );
    crate::listener::serve(listener, limits, Arc::new(Admin(metrics)), "metrics").await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A review's finding: a deleted policy's series stayed, frozen, and a former leader's
    /// gauges stayed beside the new leader's, so `max()` on a dashboard picked stale values.
    #[test]
    fn a_deleted_policys_series_and_a_former_leaders_gauges_are_removed() {
        let m = Metrics::new();
        let policy = |name: &str| {
            let yaml = format!(
                r#"
apiVersion: kscale.dev/v1alpha1
kind: ScalingPolicy
metadata: {{name: {name}, namespace: shop}}
spec:
  targetRef: {{apiVersion: apps/v1, kind: Deployment, name: {name}}}
  minReplicas: 1
  maxReplicas: 10
  metrics:
  - name: q
    prometheus: {{query: 'sum(q)'}}
    target: {{type: AverageValue, averageValue: "5"}}
"#
            );
            let p: crate::crd::ScalingPolicy = serde_yaml::from_str(&yaml).expect("policy");
            CompiledPolicy::from_resource(&p).expect("compiles")
        };
        for name in ["kept", "gone"] {
            let c = policy(name);
            let obs = crate::model::Observation {
                spec_replicas: 2,
                status_replicas: 2,
                ready_replicas: 2,
                pods: 2,
                forecasts: vec![],
                samples: vec![crate::model::Sample::Error {
                    message: "down".into(),
                }],
            };
            let d = crate::policy::evaluate(
                &c,
                &obs,
                &crate::policy::state::PolicyState::default(),
                chrono::Utc::now(),
            );
            m.record("shop", &c, name, &d, false);
            m.record_ready("shop", name, false);
            m.record_shadow("shop", name, Some((3, -1)));
        }
        let text = m.encode().expect("encode");
        assert!(text.contains(r#"policy="gone""#), "{text}");
        m.retain_policies(|key| key == "shop/kept");
        let text = m.encode().expect("encode");
        assert!(!text.contains(r#"policy="gone""#), "{text}");
        for family in [
            "kscale_desired_replicas{",
            "kscale_metric_value{",
            "kscale_source_errors_total{",
            "kscale_decisions_total{",
            "kscale_policy_ready{",
            "kscale_shadow_divergence_replicas{",
        ] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(family) && l.contains(r#"policy="kept""#)),
                "{family} of the live policy\n{text}"
            );
        }
        // Leadership lost: the gauges go, the counters stay.
        m.forget_decisions();
        let text = m.encode().expect("encode");
        for gauge in [
            "kscale_desired_replicas{",
            "kscale_metric_value{",
            "kscale_policy_ready{",
            "kscale_shadow_divergence_replicas{",
        ] {
            assert!(
                !text.lines().any(|l| l.starts_with(gauge)),
                "{gauge}\n{text}"
            );
        }
        assert!(
            text.lines()
                .any(|l| l.starts_with("kscale_evaluations_total{") && l.contains("kept")),
            "{text}"
        );
    }

    #[test]
    fn readyz_lists_the_warnings_and_source_errors_name_the_policy_and_server() {
        let m = Metrics::new();
        assert_eq!(ready_body(&m), "ok\n");
        m.add_warning("no default Prometheus".into());
        m.add_warning("no default Prometheus".into());
        assert_eq!(ready_body(&m), "ok\nwarning: no default Prometheus\n");

        let p: crate::crd::ScalingPolicy = serde_yaml::from_str(
            "apiVersion: kscale.dev/v1alpha1\nkind: ScalingPolicy\nmetadata: {name: web, namespace: shop}\nspec:\n  targetRef: {kind: Deployment, name: d}\n  maxReplicas: 3\n  prometheus: {url: 'http://thanos:9090'}\n  metrics:\n  - name: q\n    prometheus: {query: 'sum(q)'}\n    target: {type: AverageValue, averageValue: '10'}\n",
        )
        .unwrap();
        let policy = CompiledPolicy::from_resource(&p).unwrap();
        let obs = crate::model::Observation::steady(
            2,
            vec![crate::model::Sample::Error {
                message: "refused".into(),
            }],
        );
        let t = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let d = crate::policy::evaluate(&policy, &obs, &Default::default(), t);
        m.record("shop", &policy, "web", &d, false);
        let text = m.encode().unwrap();
        assert!(
            text.contains(r#"kscale_source_errors_total{namespace="shop",policy="web",server="http://thanos:9090",source="prometheus",kind="error"} 1"#),
            "{text}"
        );
    }
}
