//! Actuation: reading and writing a target's `scale` subresource, for any scalable kind.
//!
//! kscale writes nothing but `<target>/scale`, only when the count changes, with the field
//! manager `kscale`, and refuses a target that a HorizontalPodAutoscaler also drives: each
//! target has exactly one writer.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::autoscaling::v2::{CrossVersionObjectReference, HorizontalPodAutoscaler};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, discovery};

/// The field manager of every kscale write.
pub const FIELD_MANAGER: &str = "kscale";

/// How long a discovery answer is reused, in seconds.
const KIND_TTL_S: u64 = 300;

/// Discovery answers (the resource of a kind, and whether it has `/scale`), kept for
/// [`KIND_TTL_S`]: resolving a kind on every evaluation would cost a discovery request per policy
/// per interval. Failures are not kept, so a CRD installed later is found at the next try.
#[derive(Default)]
pub struct KindCache {
    entries: Mutex<Expiring<GroupVersionKind, (ApiResource, bool), KIND_TTL_S>>,
}

/// Answers kept for `TTL_S` seconds: each remembers when it was stored, and an older one is no
/// answer (the discovery answers of [`KindCache`], the controller's normalized target keys).
#[derive(Debug)]
pub struct Expiring<K, V, const TTL_S: u64> {
    entries: HashMap<K, (Instant, V)>,
}

impl<K, V, const TTL_S: u64> Default for Expiring<K, V, TTL_S> {
    fn default() -> Self {
        Expiring {
            entries: HashMap::new(),
        }
    }
}

impl<K: Eq + std::hash::Hash, V, const TTL_S: u64> Expiring<K, V, TTL_S> {
    /// The value of `key`, if it was stored less than `TTL_S` seconds ago.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.entries
            .get(key)
            .filter(|(at, _)| at.elapsed() < Duration::from_secs(TTL_S))
            .map(|(_, v)| v)
    }

    /// Stores `value` for `key`, from now.
    pub fn insert(&mut self, key: K, value: V) {
        self.entries.insert(key, (Instant::now(), value));
    }

    /// Keeps only the keys for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.entries.retain(|k, _| keep(k));
    }
}

/// Why the target could not be read or written; messages name the target.
#[derive(Debug, thiserror::Error)]
pub enum ActuateError {
    /// `targetRef.apiVersion` does not parse.
    #[error("spec.targetRef.apiVersion {0:?} is not group/version or version")]
    BadApiVersion(String),
    /// The kind is not served.
    #[error(
        "{kind} {namespace}/{name}: kind {api_version}/{kind} is not served by the apiserver: {}", crate::api_error::human(.source)
    )]
    UnknownKind {
        /// apiVersion.
        api_version: String,
        /// Kind.
        kind: String,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Discovery error.
        source: Box<kube::Error>,
    },
    /// The kind has no scale subresource.
    #[error(
        "{kind} {namespace}/{name}: {api_version}/{kind} has no scale subresource, so it cannot be scaled"
    )]
    NotScalable {
        /// apiVersion.
        api_version: String,
        /// Kind.
        kind: String,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// An HPA drives the same target.
    #[error(
        "{kind} {namespace}/{name} is also driven by HorizontalPodAutoscaler {hpa}; a target has exactly one writer, so kscale will not scale it (delete the HPA, or use mode ExternalMetric and keep the HPA as the writer)"
    )]
    HpaConflict {
        /// Kind.
        kind: String,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The HPA's name.
        hpa: String,
    },
    /// An older ScalingPolicy in mode Controller drives the same target.
    #[error(
        "{kind} {namespace}/{name} is also driven by ScalingPolicy {policy}, which is older; a target has exactly one writer, so this policy does not scale it (delete one of them, or set this one to mode DryRun or ExternalMetric)"
    )]
    PolicyConflict {
        /// Kind.
        kind: String,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The policy that writes.
        policy: String,
    },
    /// Every conditional scale write lost its race: the scale kept changing between kscale's
    /// read and its write.
    #[error(
        "{kind} {namespace}/{name}: the scale changed between kscale's read and its write {attempts} times in a row (409 Conflict each time; --scale-conflict-retries allows {retries} retries); nothing was overwritten, and the policy decides again next interval"
    )]
    ScaleConflict {
        /// Kind.
        kind: String,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Writes attempted.
        attempts: u32,
        /// Retries allowed.
        retries: u32,
    },
    /// This replica may not write (it does not hold the leader Lease).
    #[error("{kind} {namespace}/{name}: {source}")]
    NotLeader {
        /// Kind.
        kind: String,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Why.
        source: NotLeader,
    },
    /// `spec.takeover` could not be carried out.
    #[error("{kind} {namespace}/{name}: spec.takeover.hpa {hpa}: {message}")]
    Takeover {
        /// Kind.
        kind: String,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The HPA named.
        hpa: String,
        /// What went wrong, naming what to change.
        message: String,
    },
    /// An API call failed (a 403 names the grant to add).
    #[error(
        "{what} {kind} {namespace}/{name}: {}",
        api_message(what, kind, namespace, source)
    )]
    Api {
        /// What was attempted.
        what: &'static str,
        /// Kind.
        kind: String,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The error.
        source: Box<kube::Error>,
    },
}

/// An API error, with what to change when it is a 403: the HPA list of the one-writer rule, or
/// the target kind's `/scale`.
fn api_message(what: &str, kind: &str, namespace: &str, source: &kube::Error) -> String {
    use crate::permissions::{Access, explain};
    let access = if what.contains("HorizontalPodAutoscalers") {
        Access::Hpas { namespace }
    } else {
        Access::Scale { kind }
    };
    explain(source, access)
}

/// The bounds an inert HPA is given (`spec.takeover` with `Disable`).
pub const INERT_MIN_REPLICAS: i32 = 1;
/// See [`INERT_MIN_REPLICAS`].
pub const INERT_MAX_REPLICAS: i32 = i32::MAX;

/// Whether `hpa` can never write its target: both directions' `selectPolicy` are `Disabled`
/// (its recommendation stays the current count) and its bounds are 1 and 2147483647 (the HPA
/// controller forces `minReplicas` and `maxReplicas` on the count before any policy, and leaves
/// a target at 0 alone while `minReplicas` is not 0).
pub fn is_inert(hpa: &HorizontalPodAutoscaler) -> bool {
    let disabled = |rules: Option<&k8s_openapi::api::autoscaling::v2::HPAScalingRules>| {
        rules.and_then(|r| r.select_policy.as_deref()) == Some("Disabled")
    };
    let spec = &hpa.spec;
    spec.behavior
        .as_ref()
        .is_some_and(|b| disabled(b.scale_up.as_ref()) && disabled(b.scale_down.as_ref()))
        && spec.min_replicas.unwrap_or(1) <= INERT_MIN_REPLICAS
        && spec.max_replicas == INERT_MAX_REPLICAS
}

impl ActuateError {
    /// A short label for metrics and condition reasons.
    pub fn kind_label(&self) -> &'static str {
        match self {
            ActuateError::BadApiVersion(_) | ActuateError::UnknownKind { .. } => "InvalidTargetRef",
            ActuateError::NotScalable { .. } => "TargetNotScalable",
            ActuateError::HpaConflict { .. } => "ConflictingHPA",
            ActuateError::Takeover { .. } => "FailedTakeover",
            ActuateError::PolicyConflict { .. } => "ConflictingPolicy",
            ActuateError::ScaleConflict { .. } => "ScaleConflict",
            ActuateError::NotLeader { .. } => "NotLeader",
            ActuateError::Api {
                what: "reading the scale of",
                ..
            } => "FailedGetScale",
            ActuateError::Api { .. } => "FailedUpdateScale",
        }
    }
}

/// What the scale subresource says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleState {
    /// `spec.replicas`.
    pub spec_replicas: i32,
    /// `status.replicas`.
    pub status_replicas: i32,
    /// `status.selector`, the label selector of the target's pods.
    pub selector: Option<String>,
    /// `metadata.resourceVersion` of the scale read: the precondition of the write that follows.
    pub resource_version: Option<String>,
}

/// How a scale write ended.
#[derive(Debug)]
pub enum WriteOutcome {
    /// Written.
    Written,
    /// 409 Conflict: the scale changed since it was read (its resourceVersion moved); nothing
    /// was written.
    Conflict,
}

/// A target as the one-writer rule sees it, normalized through discovery: the API group and
/// kind the apiserver serves (not the `apiVersion` as written, which may be missing or name
/// another version of the same group), the namespace and the name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetKey {
    /// Namespace.
    pub namespace: String,
    /// API group (`""` for the core group).
    pub group: String,
    /// Kind.
    pub kind: String,
    /// Name.
    pub name: String,
}

impl std::fmt::Display for TargetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.group.is_empty() {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        } else {
            write!(
                f,
                "{}.{} {}/{}",
                self.kind, self.group, self.namespace, self.name
            )
        }
    }
}

/// A resolved scale target.
#[derive(Clone)]
pub struct ScaleTarget {
    /// The reference as written in the policy.
    pub reference: CrossVersionObjectReference,
    /// Namespace.
    pub namespace: String,
    /// The normalized key (group and kind as discovery serves them).
    pub key: TargetKey,
    resource: ApiResource,
    api: Api<DynamicObject>,
}

impl std::fmt::Debug for ScaleTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}/{}",
            self.reference.kind, self.namespace, self.reference.name
        )
    }
}

/// The key of `reference` in `namespace`, normalized through discovery (answers from `cache`
/// when it has them): a missing `apiVersion` means `apps/v1`, as in [`ScaleTarget::resolve`],
/// and any version of a group gives the same key. The one-writer rule and the HPA check both
/// compare these keys.
pub async fn target_key(
    client: &Client,
    cache: Option<&KindCache>,
    namespace: &str,
    reference: &CrossVersionObjectReference,
) -> Result<TargetKey, ActuateError> {
    let (ar, _, _) = discover(client, cache, namespace, reference).await?;
    Ok(key_of(&ar, namespace, &reference.name))
}

/// The served resource (plural and group) of `reference`'s kind, through discovery and
/// `cache`: what an `object` metric's path names. A missing `apiVersion` means `v1` here (the
/// core group), as an HPA's `describedObject` reads.
pub async fn described_resource(
    client: &Client,
    cache: Option<&KindCache>,
    namespace: &str,
    reference: &CrossVersionObjectReference,
) -> Result<ApiResource, ActuateError> {
    let mut reference = reference.clone();
    if reference.api_version.as_deref().is_none_or(str::is_empty) {
        reference.api_version = Some("v1".into());
    }
    discover(client, cache, namespace, &reference)
        .await
        .map(|(ar, _, _)| ar)
}

fn key_of(ar: &ApiResource, namespace: &str, name: &str) -> TargetKey {
    TargetKey {
        namespace: namespace.to_string(),
        group: ar.group.clone(),
        kind: ar.kind.clone(),
        name: name.to_string(),
    }
}

/// The served resource of `reference`'s kind, whether it has `/scale`, and the apiVersion used.
async fn discover(
    client: &Client,
    cache: Option<&KindCache>,
    namespace: &str,
    reference: &CrossVersionObjectReference,
) -> Result<(ApiResource, bool, String), ActuateError> {
    let api_version = reference
        .api_version
        .clone()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "apps/v1".to_string());
    let (group, version) = parse_gv(&api_version)?;
    let gvk = GroupVersionKind::gvk(&group, &version, &reference.kind);
    let cached = cache.and_then(|c| {
        c.entries
            .lock()
            .ok()
            .and_then(|m| m.get(&gvk).map(|(ar, scalable)| (ar.clone(), *scalable)))
    });
    if let Some((ar, scalable)) = cached {
        return Ok((ar, scalable, api_version));
    }
    let (ar, caps) = discovery::pinned_kind(client, &gvk)
        .await
        .map_err(|source| ActuateError::UnknownKind {
            api_version: api_version.clone(),
            kind: reference.kind.clone(),
            namespace: namespace.to_string(),
            name: reference.name.clone(),
            source: Box::new(source),
        })?;
    let scalable = caps
        .subresources
        .iter()
        .any(|(sub, _)| sub.plural == "scale");
    if let Some(mut m) = cache.and_then(|c| c.entries.lock().ok()) {
        m.insert(gvk, (ar.clone(), scalable));
    }
    Ok((ar, scalable, api_version))
}

fn parse_gv(api_version: &str) -> Result<(String, String), ActuateError> {
    match api_version.split_once('/') {
        Some((g, v)) if !g.is_empty() && !v.is_empty() && !v.contains('/') => {
            Ok((g.to_string(), v.to_string()))
        }
        None if !api_version.is_empty() => Ok((String::new(), api_version.to_string())),
        _ => Err(ActuateError::BadApiVersion(api_version.to_string())),
    }
}

impl ScaleTarget {
    /// Resolves `reference` in `namespace` through discovery and checks it has `/scale`.
    /// A missing `apiVersion` means `apps/v1`, as for the common Deployment.
    pub async fn resolve(
        client: &Client,
        namespace: &str,
        reference: &CrossVersionObjectReference,
    ) -> Result<ScaleTarget, ActuateError> {
        Self::resolve_cached(client, None, namespace, reference).await
    }

    /// [`resolve`](Self::resolve), with discovery answers from `cache` when it has them.
    pub async fn resolve_cached(
        client: &Client,
        cache: Option<&KindCache>,
        namespace: &str,
        reference: &CrossVersionObjectReference,
    ) -> Result<ScaleTarget, ActuateError> {
        let (ar, scalable, api_version) = discover(client, cache, namespace, reference).await?;
        if !scalable {
            return Err(ActuateError::NotScalable {
                api_version,
                kind: reference.kind.clone(),
                namespace: namespace.to_string(),
                name: reference.name.clone(),
            });
        }
        Ok(ScaleTarget {
            reference: reference.clone(),
            namespace: namespace.to_string(),
            key: key_of(&ar, namespace, &reference.name),
            api: Api::namespaced_with(client.clone(), namespace, &ar),
            resource: ar,
        })
    }

    /// The target's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// [`ActuateError::Takeover`] for this target.
    pub fn takeover_error(&self, hpa: &str, message: String) -> ActuateError {
        ActuateError::Takeover {
            kind: self.reference.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.reference.name.clone(),
            hpa: hpa.to_string(),
            message,
        }
    }

    /// The served resource of the target's kind.
    pub fn resource(&self) -> &ApiResource {
        &self.resource
    }

    fn api_error(&self, what: &'static str, source: kube::Error) -> ActuateError {
        ActuateError::Api {
            what,
            kind: self.reference.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.reference.name.clone(),
            source: Box::new(source),
        }
    }

    /// Reads the scale subresource.
    pub async fn read(&self) -> Result<ScaleState, ActuateError> {
        let scale = self
            .api
            .get_scale(&self.reference.name)
            .await
            .map_err(|e| self.api_error("reading the scale of", e))?;
        Ok(ScaleState {
            spec_replicas: scale.spec.and_then(|s| s.replicas).unwrap_or(0),
            status_replicas: scale.status.as_ref().map_or(0, |s| s.replicas),
            selector: scale
                .status
                .and_then(|s| s.selector)
                .filter(|s| !s.is_empty()),
            resource_version: scale.metadata.resource_version,
        })
    }

    /// Sets `spec.replicas` through the scale subresource: a merge patch with field manager
    /// `kscale` that carries the resourceVersion `read` saw, so the apiserver applies it only if
    /// the scale has not changed since (a manual `kubectl scale` in between makes it answer
    /// 409 Conflict, [`WriteOutcome::Conflict`], and nothing is overwritten). Callers write only
    /// when the count changes.
    pub async fn write(
        &self,
        replicas: i32,
        read: &ScaleState,
    ) -> Result<WriteOutcome, ActuateError> {
        let patch = match &read.resource_version {
            Some(rv) => serde_json::json!({
                "metadata": {"resourceVersion": rv},
                "spec": {"replicas": replicas},
            }),
            None => serde_json::json!({"spec": {"replicas": replicas}}),
        };
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PatchParams::default()
        };
        match self
            .api
            .patch_scale(&self.reference.name, &pp, &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(WriteOutcome::Written),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(WriteOutcome::Conflict),
            Err(e) => Err(self.api_error("writing the scale of", e)),
        }
    }

    /// [`ActuateError::NotLeader`] for this target.
    pub fn not_leader(&self, source: NotLeader) -> ActuateError {
        ActuateError::NotLeader {
            kind: self.reference.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.reference.name.clone(),
            source,
        }
    }

    /// [`ActuateError::ScaleConflict`] for this target.
    pub fn conflict(&self, attempts: u32, retries: u32) -> ActuateError {
        ActuateError::ScaleConflict {
            kind: self.reference.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.reference.name.clone(),
            attempts,
            retries,
        }
    }

    /// Fails with [`ActuateError::HpaConflict`] when a HorizontalPodAutoscaler in the namespace
    /// targets the same object: its `scaleTargetRef` normalized through discovery like the
    /// policy's own (so `apps/v1`, another version of `apps` or no `apiVersion` all name the
    /// same Deployment). An HPA whose reference discovery cannot resolve is compared by kind and
    /// name alone: in doubt, kscale does not write.
    pub async fn check_no_hpa(
        &self,
        client: &Client,
        cache: Option<&KindCache>,
    ) -> Result<(), ActuateError> {
        let list = self.list_hpas(client).await?;
        self.check_no_hpa_among(client, cache, list.iter()).await
    }

    /// The HPAs of the target's namespace, listed.
    pub async fn list_hpas(
        &self,
        client: &Client,
    ) -> Result<Vec<HorizontalPodAutoscaler>, ActuateError> {
        let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &self.namespace);
        Ok(hpas
            .list(&ListParams::default())
            .await
            .map_err(|e| self.api_error("listing HorizontalPodAutoscalers for", e))?
            .items)
    }

    /// The one-writer rule against `hpas` (the target's namespace's, from a list or a watch):
    /// [`ActuateError::HpaConflict`] naming the first HPA that drives this target.
    pub async fn check_no_hpa_among(
        &self,
        client: &Client,
        cache: Option<&KindCache>,
        hpas: impl Iterator<Item = &HorizontalPodAutoscaler>,
    ) -> Result<(), ActuateError> {
        match self.driving_hpa(client, cache, hpas).await {
            Some(hpa) => Err(ActuateError::HpaConflict {
                kind: self.reference.kind.clone(),
                namespace: self.namespace.clone(),
                name: self.reference.name.clone(),
                hpa: hpa.metadata.name.clone().unwrap_or_default(),
            }),
            None => Ok(()),
        }
    }

    /// The first of `hpas` whose `scaleTargetRef` is this target (same namespace, name and
    /// resource; the kind alone when its group cannot be resolved) and that can write it (not
    /// [`is_inert`]).
    pub async fn driving_hpa<'a>(
        &self,
        client: &Client,
        cache: Option<&KindCache>,
        hpas: impl Iterator<Item = &'a HorizontalPodAutoscaler>,
    ) -> Option<&'a HorizontalPodAutoscaler> {
        for hpa in hpas {
            if hpa.metadata.namespace.as_deref() != Some(self.namespace.as_str()) || is_inert(hpa) {
                continue;
            }
            let r = &hpa.spec.scale_target_ref;
            if r.name != self.key.name {
                continue;
            }
            let same = match target_key(client, cache, &self.namespace, r).await {
                Ok(key) => key == self.key,
                Err(_) => r.kind == self.key.kind,
            };
            if same {
                return Some(hpa);
            }
        }
        None
    }
}

/// A write refused because this replica does not hold a valid Lease (with `--shards`, the
/// Lease of the policy's shard).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{}", not_leader_message(*.shard))]
pub struct NotLeader {
    /// The shard and the shard count, with `--shards` above 1; `None` with one Lease.
    pub shard: Option<(u32, u32)>,
}

fn not_leader_message(shard: Option<(u32, u32)>) -> String {
    match shard {
        None => "not written: this replica does not hold the leader Lease (or its renew deadline, --leader-renew-deadline, passed before the Lease was renewed)".to_string(),
        Some((i, n)) => format!(
            "not written: this replica does not hold the Lease of shard {i} of {n} (--shards), or its renew deadline, --leader-renew-deadline, passed before the Lease was renewed"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expired_answer_is_no_answer() {
        let mut fresh: Expiring<&str, i32, 60> = Expiring::default();
        fresh.insert("a", 1);
        fresh.insert("b", 2);
        assert_eq!(fresh.get(&"a"), Some(&1));
        fresh.retain(|k| *k != "a");
        assert_eq!((fresh.get(&"a"), fresh.get(&"b")), (None, Some(&2)));
        let mut expired: Expiring<&str, i32, 0> = Expiring::default();
        expired.insert("a", 1);
        assert_eq!(expired.get(&"a"), None);
    }

    #[test]
    fn group_versions() {
        assert_eq!(parse_gv("apps/v1").unwrap(), ("apps".into(), "v1".into()));
        assert_eq!(parse_gv("v1").unwrap(), (String::new(), "v1".into()));
        assert!(parse_gv("").is_err());
        assert!(parse_gv("a/b/c").is_err());
        assert!(parse_gv("/v1").is_err());
    }
}
