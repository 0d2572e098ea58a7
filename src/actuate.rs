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
        "{kind} {namespace}/{name}: kind {api_version}/{kind} is not served by the apiserver: {source}"
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
    /// An API call failed.
    #[error("{what} {kind} {namespace}/{name}: {source}")]
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

impl ActuateError {
    /// A short label for metrics and condition reasons.
    pub fn kind_label(&self) -> &'static str {
        match self {
            ActuateError::BadApiVersion(_) | ActuateError::UnknownKind { .. } => "InvalidTargetRef",
            ActuateError::NotScalable { .. } => "TargetNotScalable",
            ActuateError::HpaConflict { .. } => "ConflictingHPA",
            ActuateError::PolicyConflict { .. } => "ConflictingPolicy",
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
}

/// A resolved scale target.
#[derive(Clone)]
pub struct ScaleTarget {
    /// The reference as written in the policy.
    pub reference: CrossVersionObjectReference,
    /// Namespace.
    pub namespace: String,
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
        let api_version = reference
            .api_version
            .clone()
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
        let (ar, scalable) = match cached {
            Some(hit) => hit,
            None => {
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
                (ar, scalable)
            }
        };
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
        })
    }

    /// Sets `spec.replicas` through the scale subresource (a merge patch with field manager
    /// `kscale`). Callers write only when the count changes.
    pub async fn write(&self, replicas: i32) -> Result<(), ActuateError> {
        let patch = serde_json::json!({"spec": {"replicas": replicas}});
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PatchParams::default()
        };
        self.api
            .patch_scale(&self.reference.name, &pp, &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(|e| self.api_error("writing the scale of", e))
    }

    /// Fails with [`ActuateError::HpaConflict`] when a HorizontalPodAutoscaler in the namespace
    /// targets the same kind and name.
    pub async fn check_no_hpa(&self, client: &Client) -> Result<(), ActuateError> {
        let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &self.namespace);
        let list = hpas
            .list(&ListParams::default())
            .await
            .map_err(|e| self.api_error("listing HorizontalPodAutoscalers for", e))?;
        let group = |v: Option<&str>| {
            v.and_then(|v| v.split_once('/').map(|(g, _)| g.to_string()))
                .unwrap_or_default()
        };
        let ours = group(self.reference.api_version.as_deref().or(Some("apps/v1")));
        for hpa in list {
            let r = &hpa.spec.scale_target_ref;
            if r.kind == self.reference.kind
                && r.name == self.reference.name
                && group(r.api_version.as_deref()) == ours
            {
                return Err(ActuateError::HpaConflict {
                    kind: self.reference.kind.clone(),
                    namespace: self.namespace.clone(),
                    name: self.reference.name.clone(),
                    hpa: hpa.metadata.name.unwrap_or_default(),
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
