//! What the adapter serves from memory: each evaluated policy's metrics and desired replicas
//! (filled by the controller after every evaluation), and recent answers of the static rules.
//!
//! A request never waits for Prometheus for a policy metric: the controller's loop refreshes the
//! values, and a value older than its bound is an error, never a stale number.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use chrono::{DateTime, TimeDelta, Utc};

use crate::model::Sample;
use crate::policy::{CompiledPolicy, Decision, MetricSource, MetricState};

/// What one evaluation gives the adapter (the controller's seam, [`Cache::record`]): the
/// decision, or why there is none. The adapter depends on the evaluation's types, never on the
/// controller that makes them.
#[derive(Debug, Clone, Copy)]
pub enum Evaluation<'a> {
    /// The policy was evaluated.
    Decided {
        /// The compiled policy.
        policy: &'a CompiledPolicy,
        /// Its decision.
        decision: &'a Decision,
    },
    /// The spec does not validate.
    Invalid,
    /// The target could not be resolved, read or written.
    TargetUnreadable,
}

pub use crate::policy::external_names::{DESIRED_REPLICAS, decision_name_owner, external_name};

/// One served value, or why there is none.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A number measured at `timestamp`, valid until `timestamp + bound`.
    Number {
        /// The value.
        value: f64,
        /// When it was measured.
        timestamp: DateTime<Utc>,
        /// How long it stays servable.
        bound: TimeDelta,
    },
    /// No usable value: the message is safe to show a caller (no source error text).
    Unavailable(String),
}

/// A policy's metric as served.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Labels shown as `metricLabels` (and matched by the label selector).
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: Value,
}

type Key = (String, String);

/// The policy metrics, by (namespace, metric name), and which names each policy published.
#[derive(Default)]
pub struct Cache {
    entries: RwLock<HashMap<Key, Arc<Entry>>>,
    by_policy: Mutex<HashMap<Key, Published>>,
    last_sweep: Mutex<Option<Instant>>,
    /// By the SHA-256 of the rendered query (the selector comes from the caller), so each entry
    /// is small whatever the selector's length.
    rule_answers: Mutex<HashMap<[u8; 32], RuleAnswer>>,
}

fn query_key(query: &str) -> [u8; 32] {
    super::auth::sha256(query.as_bytes())
}

/// A cached answer of a static rule's query.
#[derive(Debug, Clone)]
pub struct RuleAnswer {
    /// The sample Prometheus returned (or the failure).
    pub sample: Sample,
    /// When it was fetched.
    pub fetched: Instant,
    /// When it was last asked for.
    pub used: Instant,
    /// A background refresh is running.
    pub refreshing: bool,
}

/// What one policy published last.
struct Published {
    names: Vec<String>,
    at: Instant,
    /// Forgotten when not published again for this long (a deleted policy).
    keep: std::time::Duration,
}

/// How often forgotten policies are swept out.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(600);
/// A policy not evaluated for this long (or twice its values' bound, if longer) is forgotten.
const FORGET_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Cached rule answers kept at most; beyond it, answers not asked for recently are dropped.
const MAX_RULE_ANSWERS: usize = 10_000;

impl Cache {
    /// An empty cache.
    pub fn new() -> Cache {
        Cache::default()
    }

    /// Replaces everything `policy` in `namespace` published with `entries` (metric names
    /// without the policy prefix).
    pub fn publish(&self, namespace: &str, policy: &str, entries: Vec<(String, Entry)>) {
        let names: Vec<String> = entries
            .iter()
            .map(|(m, _)| external_name(policy, m))
            .collect();
        let keep = entries
            .iter()
            .filter_map(|(_, e)| match &e.value {
                Value::Number { bound, .. } => bound.to_std().ok().map(|b| b * 2),
                Value::Unavailable(_) => None,
            })
            .fold(FORGET_AFTER, std::cmp::max);
        let key = (namespace.to_string(), policy.to_string());
        let now = Instant::now();
        let published = Published {
            names: names.clone(),
            at: now,
            keep,
        };
        let old = lock(&self.by_policy)
            .insert(key, published)
            .map(|p| p.names);
        let due = {
            let mut last = lock(&self.last_sweep);
            let due = last.is_none_or(|t| now.duration_since(t) >= SWEEP_EVERY);
            if due {
                *last = Some(now);
            }
            due
        };
        if due {
            self.sweep(now);
        }
        let mut map = match self.entries.write() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        for gone in old.into_iter().flatten() {
            map.remove(&(namespace.to_string(), gone));
        }
        for (name, (_, entry)) in names.into_iter().zip(entries) {
            map.insert((namespace.to_string(), name), Arc::new(entry));
        }
    }

    /// Forgets the policies not published again within their keep time (deleted policies).
    fn sweep(&self, now: Instant) {
        let mut forgotten = Vec::new();
        lock(&self.by_policy).retain(|(ns, _), p| {
            let live = now.duration_since(p.at) < p.keep;
            if !live {
                forgotten.extend(p.names.iter().map(|n| (ns.clone(), n.clone())));
            }
            live
        });
        let mut map = match self.entries.write() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        for gone in forgotten {
            map.remove(&gone);
        }
    }

    /// The entry for `metric` in `namespace`.
    pub fn get(&self, namespace: &str, metric: &str) -> Option<Arc<Entry>> {
        let map = match self.entries.read() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.get(&(namespace.to_string(), metric.to_string()))
            .cloned()
    }

    /// Every published metric name (for discovery), sorted and without duplicates.
    pub fn names(&self) -> Vec<String> {
        let map = match self.entries.read() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut names: Vec<String> = map.keys().map(|(_, n)| n.clone()).collect();
        names.sort();
        names.dedup();
        names
    }

    /// Records one evaluation of policy `name` in `namespace` (the controller's seam): on
    /// success every metric as `<policy>-<metric>` and the decision as
    /// `<policy>-desired-replicas`; on failure each of them answers with the failure.
    pub fn record(
        &self,
        namespace: &str,
        name: &str,
        result: Evaluation<'_>,
        prometheus: &HashMap<String, Sample>,
        now: DateTime<Utc>,
    ) {
        let labels = |metric: &str| {
            BTreeMap::from([
                ("policy".to_string(), name.to_string()),
                ("metric".to_string(), metric.to_string()),
            ])
        };
        let entries = match result {
            Evaluation::Decided { policy, decision } => {
                let bound = policy.stale_after + policy.interval;
                let mut entries: Vec<(String, Entry)> = policy
                    .metrics
                    .iter()
                    .zip(&decision.metrics)
                    .map(|(m, outcome)| {
                        let value = match (outcome.state, outcome.value) {
                            (MetricState::Valid, Some(v)) => Value::Number {
                                value: v,
                                timestamp: sample_time(&m.source, prometheus).unwrap_or(now),
                                bound,
                            },
                            (state, _) => Value::Unavailable(format!(
                                "metric {:?} of policy {namespace}/{name} has no valid value ({})",
                                m.name,
                                state.as_str()
                            )),
                        };
                        (
                            m.name.clone(),
                            Entry {
                                labels: labels(&m.name),
                                value,
                            },
                        )
                    })
                    .collect();
                entries.push((
                    DESIRED_REPLICAS.to_string(),
                    Entry {
                        labels: labels(DESIRED_REPLICAS),
                        value: Value::Number {
                            value: f64::from(decision.replicas),
                            timestamp: now,
                            bound,
                        },
                    },
                ));
                entries
            }
            failed @ (Evaluation::Invalid | Evaluation::TargetUnreadable) => {
                let message = if matches!(failed, Evaluation::TargetUnreadable) {
                    "the policy's target could not be read (see its status)"
                } else {
                    "the policy is invalid (see its status)"
                };
                let unavailable = |metric: &str| Entry {
                    labels: labels(metric),
                    value: Value::Unavailable(format!("policy {namespace}/{name}: {message}")),
                };
                let previous = lock(&self.by_policy)
                    .get(&(namespace.to_string(), name.to_string()))
                    .map(|p| p.names.clone());
                let prefix = format!("{name}-");
                let mut metrics: Vec<String> = previous
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|n| n.strip_prefix(&prefix).map(str::to_string))
                    .collect();
                if !metrics.iter().any(|m| m == DESIRED_REPLICAS) {
                    metrics.push(DESIRED_REPLICAS.to_string());
                }
                metrics
                    .iter()
                    .map(|m| (m.clone(), unavailable(m)))
                    .collect()
            }
        };
        self.publish(namespace, name, entries);
    }

    /// The cached answer for a rendered rule query, marking it used.
    pub fn rule_answer(&self, query: &str) -> Option<RuleAnswer> {
        let mut map = lock(&self.rule_answers);
        map.get_mut(&query_key(query)).map(|a| {
            a.used = Instant::now();
            a.clone()
        })
    }

    /// Marks a cached answer as being refreshed; false if a refresh already runs.
    pub fn start_refresh(&self, query: &str) -> bool {
        let mut map = lock(&self.rule_answers);
        match map.get_mut(&query_key(query)) {
            Some(a) if !a.refreshing => {
                a.refreshing = true;
                true
            }
            _ => false,
        }
    }

    /// Stores a fresh answer for a rendered rule query.
    pub fn store_rule_answer(&self, query: &str, sample: Sample) {
        let key = query_key(query);
        let mut map = lock(&self.rule_answers);
        let now = Instant::now();
        if map.len() >= MAX_RULE_ANSWERS && !map.contains_key(&key) {
            let oldest_kept = now.checked_sub(std::time::Duration::from_secs(600));
            map.retain(|_, a| oldest_kept.is_none_or(|t| a.used >= t));
            if map.len() >= MAX_RULE_ANSWERS {
                map.clear();
            }
        }
        let used = map.get(&key).map_or(now, |a| a.used);
        map.insert(
            key,
            RuleAnswer {
                sample,
                fetched: now,
                used,
                refreshing: false,
            },
        );
    }
}

/// The timestamp Prometheus gave a metric's sample, if it is a Prometheus metric.
fn sample_time(
    source: &MetricSource,
    prometheus: &HashMap<String, Sample>,
) -> Option<DateTime<Utc>> {
    match source {
        MetricSource::Prometheus { query } => match prometheus.get(query.as_str()) {
            Some(Sample::Series { timestamp, .. } | Sample::Partial { timestamp, .. }) => {
                Some(*timestamp)
            }
            _ => None,
        },
        MetricSource::Resource { .. }
        | MetricSource::Pods { .. }
        | MetricSource::Object { .. }
        | MetricSource::External { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number(v: f64) -> Entry {
        Entry {
            labels: BTreeMap::new(),
            value: Value::Number {
                value: v,
                timestamp: Utc::now(),
                bound: TimeDelta::seconds(60),
            },
        }
    }

    proptest::proptest! {
        /// With the compiler's rules (metric names of lowercase letters, digits and `_`, and
        /// no metric that names another policy's decision), distinct (policy, metric) pairs in a
        /// namespace never publish the same name.
        #[test]
        fn published_names_never_collide(
            p1 in "[a-z]([a-z0-9-]{0,12}[a-z0-9])?(-desired)?",
            p2 in "[a-z]([a-z0-9-]{0,12}[a-z0-9])?(-desired)?",
            m1 in "([a-z_][a-z0-9_]{0,6}|replicas|desired)",
            m2 in "([a-z_][a-z0-9_]{0,6}|replicas|desired)",
        ) {
            let name = |p: &str, m: Option<&str>| match m {
                Some(m) => external_name(p, m),
                None => external_name(p, DESIRED_REPLICAS),
            };
            let valid = |p: &str, m: Option<&str>| m.is_none_or(|m| decision_name_owner(p, m).is_none());
            for (a, b) in [(Some(m1.as_str()), Some(m2.as_str())), (Some(m1.as_str()), None), (None, Some(m2.as_str())), (None, None)] {
                if valid(&p1, a) && valid(&p2, b) && (p1.as_str(), a) != (p2.as_str(), b) {
                    proptest::prop_assert_ne!(name(&p1, a), name(&p2, b));
                }
            }
        }
    }

    #[test]
    fn the_compiler_refuses_a_metric_that_names_another_policys_decision() {
        let policy = |name: &str| -> crate::crd::ScalingPolicy {
            serde_yaml::from_str(&format!(
                "apiVersion: kscale.dev/v1alpha1\nkind: ScalingPolicy\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n  targetRef: {{kind: Deployment, name: web}}\n  maxReplicas: 3\n  metrics:\n  - name: replicas\n    prometheus: {{query: 'sum(x)'}}\n    target: {{type: Value, value: \"10\"}}\n"
            ))
            .unwrap()
        };
        let refused = crate::policy::CompiledPolicy::from_resource(&policy("web-desired"))
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("spec.metrics[0].name")
                && refused.contains("\"web-desired-replicas\"")
                && refused.contains("policy \"web\""),
            "{refused}"
        );
        assert!(crate::policy::CompiledPolicy::from_resource(&policy("web")).is_ok());
    }

    #[test]
    fn a_metric_that_names_another_policys_decision_is_found() {
        assert_eq!(
            decision_name_owner("web-desired", "replicas").as_deref(),
            Some("web")
        );
        assert_eq!(decision_name_owner("web", "replicas"), None);
        assert_eq!(decision_name_owner("web-desired", "rps"), None);
    }

    #[test]
    fn publish_replaces_what_the_policy_published_before() {
        let c = Cache::new();
        c.publish(
            "ns",
            "web",
            vec![("a".into(), number(1.0)), ("b".into(), number(2.0))],
        );
        assert!(c.get("ns", "web-a").is_some());
        c.publish("ns", "web", vec![("a".into(), number(3.0))]);
        assert!(c.get("ns", "web-b").is_none());
        assert!(c.get("other", "web-a").is_none());
        assert_eq!(c.names(), vec!["web-a".to_string()]);
        assert_eq!(
            c.get("ns", "web-a")
                .map(|e| e.value.clone())
                .and_then(|v| match v {
                    Value::Number { value, .. } => Some(value),
                    Value::Unavailable(_) => None,
                }),
            Some(3.0)
        );
        // A policy that is not published again is forgotten at a later sweep.
        c.publish("ns", "db", vec![("a".into(), number(1.0))]);
        c.sweep(Instant::now() + FORGET_AFTER / 2);
        assert_eq!(c.names(), vec!["db-a".to_string(), "web-a".to_string()]);
        c.sweep(Instant::now() + FORGET_AFTER);
        assert_eq!(c.names(), Vec::<String>::new());
    }
}
