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

/// How long a discovery answer is reused.
const KIND_TTL: Duration = Duration::from_secs(300);

/// Discovery answers (the resource of a kind, and whether it has `/scale`), kept for
/// [`KIND_TTL`]: resolving a kind on every evaluation would cost a discovery request per policy
/// per interval. Failures are not kept, so a CRD installed later is found at the next try.
#[derive(Default)]
pub struct KindCache {
    entries: Mutex<HashMap<GroupVersionKind, (Instant, ApiResource, bool)>>,
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
        source: crate::controller::leader::NotLeader,
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
    use crate::controller::permissions::{Access, explain};
    let access = if what.contains("HorizontalPodAutoscalers") {
        Access::Hpas { namespace }
    } else {
        Access::Scale { kind }
    };
    explain(source, access)
}

impl ActuateError {
    /// A short label for metrics and condition reasons.
    pub fn kind_label(&self) -> &'static str {
        match self {
            ActuateError::BadApiVersion(_) | ActuateError::UnknownKind { .. } => "InvalidTargetRef",
            ActuateError::NotScalable { .. } => "TargetNotScalable",
            ActuateError::HpaConflict { .. } => "ConflictingHPA",
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
        c.entries.lock().ok().and_then(|m| {
            m.get(&gvk)
                .filter(|(at, _, _)| at.elapsed() < KIND_TTL)
                .map(|(_, ar, scalable)| (ar.clone(), *scalable))
        })
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
        m.insert(gvk, (Instant::now(), ar.clone(), scalable));
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
        })
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
    pub fn not_leader(&self, source: crate::controller::leader::NotLeader) -> ActuateError {
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
        let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &self.namespace);
        let list = hpas
            .list(&ListParams::default())
            .await
            .map_err(|e| self.api_error("listing HorizontalPodAutoscalers for", e))?;
        self.check_no_hpa_among(client, cache, list.items.iter())
            .await
    }

    /// The one-writer rule against `hpas` (the target's namespace's, from a list or a watch):
    /// [`ActuateError::HpaConflict`] naming the first HPA that drives this target.
    pub async fn check_no_hpa_among(
        &self,
        client: &Client,
        cache: Option<&KindCache>,
        hpas: impl Iterator<Item = &HorizontalPodAutoscaler>,
    ) -> Result<(), ActuateError> {
        for hpa in hpas {
            if hpa.metadata.namespace.as_deref() != Some(self.namespace.as_str()) {
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
                return Err(ActuateError::HpaConflict {
                    kind: self.reference.kind.clone(),
                    namespace: self.namespace.clone(),
                    name: self.reference.name.clone(),
                    hpa: hpa.metadata.name.clone().unwrap_or_default(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_versions() {
        assert_eq!(parse_gv("apps/v1").unwrap(), ("apps".into(), "v1".into()));
        assert_eq!(parse_gv("v1").unwrap(), (String::new(), "v1".into()));
        assert!(parse_gv("").is_err());
        assert!(parse_gv("a/b/c").is_err());
        assert!(parse_gv("/v1").is_err());
    }
}
