//! The targets' pods, from a watch instead of a list per evaluation.
//!
//! The HPA controller reads pods from an informer's lister; kscale does the same with a kube-rs
//! reflector. The store keeps only what evaluation reads (labels, deletion, containers'
//! requests, phase, conditions and start time): managed fields, annotations, owner references,
//! volumes and the like are stripped as objects arrive, which keeps the daemon's memory flat.
//!
//! A target's pods are those its scale subresource's `status.selector` selects. That selector
//! is a string in the apiserver's label-selector syntax (`metav1.FormatLabelSelector`), parsed
//! here by [`parse_selector`]. Until the store has synced, or for a selector this parser does
//! not take, [`PodCache::pods`] falls back to a list request, so an answer is never guessed.

use futures::FutureExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::core::{Expression, Selector, SelectorExt};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

/// A label selector string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("label selector {selector:?}: {message}")]
pub struct SelectorError {
    /// The selector as given.
    pub selector: String,
    /// What is wrong.
    pub message: String,
}

/// Parses a label selector in the apiserver's string syntax: `k=v`, `k==v`, `k!=v`,
/// `k in (a,b)`, `k notin (a,b)`, `k` (exists) and `!k` (does not exist), joined by commas.
/// An empty selector is refused: for a target it would select every pod of the namespace.
pub fn parse_selector(text: &str) -> Result<Selector, SelectorError> {
    let err = |message: &str| SelectorError {
        selector: text.to_string(),
        message: message.to_string(),
    };
    let mut exprs = Vec::new();
    let mut rest = text.trim();
    if rest.is_empty() || rest == "<none>" {
        return Err(err("is empty"));
    }
    loop {
        // One requirement runs to the next comma outside parentheses.
        let mut depth = 0usize;
        let mut end = None;
        for (i, c) in rest.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                ',' if depth == 0 => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let Some(end) = end else {
            exprs.push(parse_requirement(rest.trim()).map_err(|m| err(&m))?);
            break;
        };
        exprs.push(parse_requirement(rest[..end].trim()).map_err(|m| err(&m))?);
        rest = &rest[end + 1..];
    }
    Ok(exprs.into_iter().collect())
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(value: &str) -> bool {
    value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn parse_requirement(r: &str) -> Result<Expression, String> {
    if r.is_empty() {
        return Err("has an empty requirement".into());
    }
    let key_of = |k: &str| -> Result<String, String> {
        let k = k.trim();
        if valid_key(k) {
            Ok(k.to_string())
        } else {
            Err(format!("{k:?} is not a label key"))
        }
    };
    let value_of = |v: &str| -> Result<String, String> {
        let v = v.trim();
        if valid_value(v) {
            Ok(v.to_string())
        } else {
            Err(format!("{v:?} is not a label value"))
        }
    };
    if let Some(k) = r.strip_prefix('!') {
        return Ok(Expression::DoesNotExist(key_of(k)?));
    }
    if let Some((k, v)) = r.split_once("!=") {
        return Ok(Expression::NotEqual(key_of(k)?, value_of(v)?));
    }
    if let Some((k, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
        return Ok(Expression::Equal(key_of(k)?, value_of(v)?));
    }
    if let Some(open) = r.find('(') {
        let head = r[..open].trim();
        let body = r[open + 1..]
            .trim_end()
            .strip_suffix(')')
            .ok_or_else(|| format!("{r:?} has no closing parenthesis"))?;
        let values = body
            .split(',')
            .map(value_of)
            .collect::<Result<std::collections::BTreeSet<_>, _>>()?;
        let (key, op) = head
            .rsplit_once(char::is_whitespace)
            .ok_or_else(|| format!("{r:?} has no operator"))?;
        return match op {
            "in" => Ok(Expression::In(key_of(key)?, values)),
            "notin" => Ok(Expression::NotIn(key_of(key)?, values)),
            other => Err(format!("unknown operator {other:?} in {r:?}")),
        };
    }
    Ok(Expression::Exists(key_of(r)?))
}

/// What evaluation reads of a pod; the rest is dropped from the store.
fn strip(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    if let Some(spec) = pod.spec.as_mut() {
        spec.volumes = None;
        spec.affinity = None;
        spec.tolerations = None;
        for c in spec
            .containers
            .iter_mut()
            .chain(spec.init_containers.iter_mut().flatten())
        {
            c.env = None;
            c.env_from = None;
            c.volume_mounts = None;
            c.command = None;
            c.args = None;
            c.ports = None;
            c.liveness_probe = None;
            c.readiness_probe = None;
            c.startup_probe = None;
        }
    }
    if let Some(status) = pod.status.as_mut() {
        status.container_statuses = None;
        status.init_container_statuses = None;
        status.pod_ips = None;
        status.host_ip = None;
        status.host_ips = None;
    }
}

/// Why the pods of a target could not be read.
#[derive(Debug, thiserror::Error)]
#[error("listing pods in namespace {namespace} with selector {selector:?}: {}", crate::api_error::human(.source))]
pub struct PodsError {
    /// Namespace.
    pub namespace: String,
    /// Selector.
    pub selector: String,
    /// Cause.
    pub source: Box<kube::Error>,
}

/// The pods of every watched namespace, kept current by a watch.
#[derive(Clone)]
pub struct PodCache {
    client: Client,
    store: Option<Store<Pod>>,
}

impl PodCache {
    /// A cache that always lists (for one-shot callers like `kscale dry-run`).
    pub fn listing(client: Client) -> PodCache {
        PodCache {
            client,
            store: None,
        }
    }

    /// Starts a watch of the pods of `namespace` (all namespaces when `None`) on the current
    /// runtime. The watch retries with backoff; the returned handle stops it when aborted.
    pub fn watch(
        client: Client,
        namespace: Option<&str>,
    ) -> (PodCache, tokio::task::JoinHandle<()>) {
        let api: Api<Pod> = match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let (reader, writer) = reflector::store();
        let stream = reflector::reflector(
            writer,
            watcher(api, watcher::Config::default())
                .default_backoff()
                .modify(strip),
        )
        .applied_objects();
        let task = super::spawn_watch(stream, "pod");
        (
            PodCache {
                client,
                store: Some(reader),
            },
            task,
        )
    }

    /// The pods of `namespace` that `selector` selects: from the store once it has synced and
    /// the selector parses, otherwise from a list request.
    pub async fn pods(&self, namespace: &str, selector: &str) -> Result<Vec<Pod>, PodsError> {
        if let Some(store) = &self.store
            && store.wait_until_ready().now_or_never().is_some()
            && let Ok(parsed) = parse_selector(selector)
        {
            let mut pods: Vec<Pod> = store
                .state()
                .iter()
                .filter(|p| {
                    p.namespace().as_deref() == Some(namespace) && parsed.matches(p.labels())
                })
                .map(|p| Pod::clone(p))
                .collect();
            pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
            return Ok(pods);
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        api.list(&ListParams::default().labels(selector))
            .await
            .map(|l| l.items)
            .map_err(|e| PodsError {
                namespace: namespace.to_string(),
                selector: selector.to_string(),
                source: Box::new(e),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_what_format_label_selector_prints() {
        let s = parse_selector("app=web,tier in (a, b),!canary,zone,env!=dev,x==y").unwrap();
        assert!(s.matches(&labels(&[
            ("app", "web"),
            ("tier", "b"),
            ("zone", "z1"),
            ("env", "prod"),
            ("x", "y")
        ])));
        assert!(!s.matches(&labels(&[
            ("app", "web"),
            ("tier", "c"),
            ("zone", "z1"),
            ("x", "y")
        ])));
        assert!(!s.matches(&labels(&[
            ("app", "web"),
            ("tier", "a"),
            ("zone", "z1"),
            ("canary", "1"),
            ("x", "y")
        ])));
        let s = parse_selector("app.kubernetes.io/name notin (db)").unwrap();
        assert!(s.matches(&labels(&[("app.kubernetes.io/name", "web")])));
        assert!(!s.matches(&labels(&[("app.kubernetes.io/name", "db")])));
    }

    #[test]
    fn bad_selectors_are_errors_naming_the_part() {
        for (text, part) in [
            ("", "empty"),
            ("<none>", "empty"),
            ("app=web,", "empty requirement"),
            ("a in (x", "closing parenthesis"),
            ("a within (x)", "within"),
            ("a=b c", "label value"),
            ("=b", "label key"),
        ] {
            let e = parse_selector(text).unwrap_err();
            assert!(e.to_string().contains(part), "{text:?}: {e}");
        }
    }

    #[test]
    fn strip_keeps_what_evaluation_reads() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "labels": {"app": "web"}, "annotations": {"a": "b"},
                         "managedFields": [{"manager": "x"}], "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "c", "image": "i", "env": [{"name": "E", "value": "v"}],
                                     "resources": {"requests": {"cpu": "100m"}}}]},
            "status": {"phase": "Running", "startTime": "2026-01-01T00:00:00Z",
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        strip(&mut pod);
        assert!(pod.metadata.annotations.is_none() && pod.metadata.managed_fields.is_none());
        assert!(pod.metadata.deletion_timestamp.is_some());
        assert_eq!(pod.labels().get("app").map(String::as_str), Some("web"));
        let c = &pod.spec.as_ref().unwrap().containers[0];
        assert!(c.env.is_none() && c.resources.is_some());
        let st = pod.status.as_ref().unwrap();
        assert!(st.phase.is_some() && st.start_time.is_some() && st.conditions.is_some());
    }
}
