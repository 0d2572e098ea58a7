//! Permission errors turned into what to change, and reported once.
//!
//! A 403 from the apiserver says only that a verb on a resource is forbidden. The daemon knows
//! which grant of the Helm chart (or which flag) governs each of its requests, so each 403 it
//! meets names that grant: the Lease (leader election), a target's `/scale`, Events, the
//! ScalingPolicy status and the HPA list of the one-writer rule. A failure that repeats every
//! renewal or every interval is logged at `warn` once, then at `debug` until it changes or
//! clears ([`Once`]).

use std::collections::HashSet;
use std::sync::Mutex;

/// A request of the daemon that RBAC governs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access<'a> {
    /// get, create and update on the leader-election Lease (and list, watch and delete with `--shards`).
    Lease {
        /// The Lease's namespace.
        namespace: &'a str,
    },
    /// get, patch and update on a target kind's `/scale`.
    Scale {
        /// The target's kind.
        kind: &'a str,
    },
    /// create and patch on `events.k8s.io` Events.
    Events {
        /// The namespace of the Event.
        namespace: &'a str,
    },
    /// patch on `scalingpolicies/status`.
    Status {
        /// The policy's namespace.
        namespace: &'a str,
    },
    /// list and watch on HorizontalPodAutoscalers (the one-writer rule).
    Hpas {
        /// The namespace listed.
        namespace: &'a str,
    },
}

/// Whether `e` is the apiserver's 403 Forbidden.
pub fn is_forbidden(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403)
}

/// What to change so that `access` is allowed: the chart's grant, and the flag where one
/// decides where the request goes.
pub fn hint(access: Access<'_>) -> String {
    match access {
        Access::Lease { namespace } => format!(
            "the daemon's ServiceAccount may not get, create or update Leases (coordination.k8s.io), or with --shards list, watch and delete them, in namespace {namespace}: the Helm chart grants them in the release namespace only, so set --leader-election-namespace (POD_NAMESPACE, the daemon's own namespace by default) to that namespace, or grant a Role on leases there, or turn election off with --leader-elect=false (one replica only)"
        ),
        Access::Scale { kind } => format!(
            "the daemon's ServiceAccount may not read or write the scale subresource of {kind}: add the kind's API group and plural resource to the Helm chart's scaleTargets (a ClusterRole rule on <resource>/scale with verbs get, patch, update)"
        ),
        Access::Events { namespace } => format!(
            "the daemon's ServiceAccount may not create Events (events.k8s.io) in namespace {namespace}: grant create and patch on events.events.k8s.io (the Helm chart's ClusterRole does, or its Role in watchNamespace)"
        ),
        Access::Status { namespace } => format!(
            "the daemon's ServiceAccount may not patch scalingpolicies/status (kscale.dev) in namespace {namespace}: grant get, patch and update on scalingpolicies/status (the Helm chart's ClusterRole does, or its Role in watchNamespace)"
        ),
        Access::Hpas { namespace } => format!(
            "the daemon's ServiceAccount may not list or watch HorizontalPodAutoscalers (autoscaling) in namespace {namespace}, which the one-writer rule needs: grant list and watch on horizontalpodautoscalers.autoscaling (the Helm chart's ClusterRole does)"
        ),
    }
}

/// `error`, followed by [`hint`] when it is a 403. An apiserver error shows as its message,
/// code and reason (not the whole Status).
pub fn explain(error: &kube::Error, access: Access<'_>) -> String {
    let text = crate::api_error::human(error);
    match error {
        kube::Error::Api(s) if s.code == 403 => format!("{text}; {}", hint(access)),
        _ => text.to_string(),
    }
}

/// Remembers which failures were already reported, so a failure that repeats is reported once.
/// Keys are bounded by what they name (one per kind of request and namespace or policy).
#[derive(Default)]
pub struct Once(Mutex<HashSet<String>>);

impl Once {
    /// Whether `key` with this `message` is new; it is remembered. A new message for the same
    /// key is new again.
    pub fn first(&self, key: &str, message: &str) -> bool {
        let entry = format!("{key}\u{0}{message}");
        let Ok(mut seen) = self.0.lock() else {
            return true;
        };
        if seen.contains(&entry) {
            return false;
        }
        let prefix = format!("{key}\u{0}");
        seen.retain(|e| !e.starts_with(&prefix));
        seen.insert(entry);
        true
    }

    /// Forgets the failures of policies that are gone: keys of the form
    /// `<what>/<namespace>/<name>` whose `<namespace>/<name>` is not `live`. Other keys stay.
    pub fn retain_policies(&self, live: impl Fn(&str) -> bool) {
        let Ok(mut seen) = self.0.lock() else {
            return;
        };
        seen.retain(|e| {
            let key = e.split('\u{0}').next().unwrap_or_default();
            match key.split_once('/') {
                Some((_, policy)) if policy.contains('/') => live(policy),
                _ => true,
            }
        });
    }

    /// Forgets `key` (the failure cleared); returns whether it had been reported.
    pub fn clear(&self, key: &str) -> bool {
        let prefix = format!("{key}\u{0}");
        let Ok(mut seen) = self.0.lock() else {
            return false;
        };
        let before = seen.len();
        seen.retain(|e| !e.starts_with(&prefix));
        seen.len() != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forbidden() -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("leases is forbidden", "Forbidden")
                .with_code(403)
                .boxed(),
        )
    }

    #[test]
    fn a_403_names_the_grant_and_the_flag() {
        let e = explain(
            &forbidden(),
            Access::Lease {
                namespace: "default",
            },
        );
        assert!(e.contains("--leader-election-namespace"), "{e}");
        assert!(e.contains("namespace default"), "{e}");
        let e = explain(&forbidden(), Access::Scale { kind: "Rollout" });
        assert!(e.contains("scaleTargets") && e.contains("Rollout"), "{e}");
        for access in [
            Access::Events { namespace: "n" },
            Access::Status { namespace: "n" },
            Access::Hpas { namespace: "n" },
        ] {
            assert!(
                explain(&forbidden(), access).contains("grant"),
                "{access:?}"
            );
        }
        let other = kube::Error::Api(
            kube::core::Status::failure("gone", "NotFound")
                .with_code(404)
                .boxed(),
        );
        let e = explain(&other, Access::Lease { namespace: "n" });
        assert_eq!(e, "gone (NotFound, HTTP 404)");
        assert!(
            explain(&forbidden(), Access::Lease { namespace: "n" })
                .starts_with("leases is forbidden (Forbidden, HTTP 403); ")
        );
    }

    #[test]
    fn a_repeated_failure_is_reported_once() {
        let once = Once::default();
        assert!(once.first("lease", "403"));
        assert!(!once.first("lease", "403"), "the same failure again");
        assert!(once.first("lease", "timeout"), "failing another way");
        assert!(once.first("events/n", "403"), "another key");
        assert!(once.clear("lease"));
        assert!(!once.clear("lease"), "already cleared");
        assert!(
            once.first("lease", "timeout"),
            "failing again after recovering"
        );
        assert!(once.first("evaluation/n/gone", "403"));
        assert!(once.first("evaluation/n/kept", "403"));
        once.retain_policies(|p| p == "n/kept");
        assert!(
            once.first("evaluation/n/gone", "403"),
            "a deleted policy is forgotten"
        );
        assert!(!once.first("evaluation/n/kept", "403"));
        assert!(!once.first("events/n", "403"), "not a policy key: kept");
    }
}
