//! `spec.takeover`: a Controller policy replaces the HPA that drives its target today.
//!
//! At the first evaluation as leader whose metrics are all valid (no `status.takeover` of that
//! HPA yet; with a failing metric or formula, or another policy writing the target, it waits,
//! so kscale never stops a working HPA only to hold the count), kscale reads the named HPA,
//! checks that it drives the policy's target, and stops it:
//! - `Disable` leaves the HPA in place but inert ([`crate::actuate::is_inert`]): both
//!   directions' `selectPolicy: Disabled`, bounds 1 and 2147483647. Its previous bounds and
//!   `behavior` go into the annotation [`RESTORE_PATCH`], a JSON merge patch that the hand-back
//!   applies as it is (`kubectl patch hpa NAME --type merge -p "$(kubectl get hpa NAME -o
//!   jsonpath='{.metadata.annotations.kscale\.dev/restore-patch}')"`).
//! - `Delete` deletes it.
//!
//! The HPA's recommendation history lives only in kube-controller-manager's memory, so the
//! controller then treats kscale's scale-down window as full of the current count (one
//! recommendation of it at the takeover's time): the first decision does not jump down, and
//! nothing scales down before the window has passed. The one-writer rule ignores an inert HPA.

use chrono::{DateTime, Utc};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};

use crate::actuate::{
    ActuateError, INERT_MAX_REPLICAS, INERT_MIN_REPLICAS, KindCache, ScaleTarget,
};
use crate::crd::{TakeoverAction, TakeoverSpec, TakeoverStatus};

/// The annotation naming the policy that took an HPA over.
pub const TAKEN_OVER_BY: &str = "kscale.dev/taken-over-by";

/// The annotation holding the JSON merge patch that gives a disabled HPA back its settings.
pub const RESTORE_PATCH: &str = "kscale.dev/restore-patch";

/// Carries out `spec` for the policy `policy` (namespace/name) on `target`, whose count is
/// `current`: the record for `status.takeover`, or why it could not be done (naming
/// `spec.takeover.hpa` and what to change).
pub async fn take_over(
    client: &Client,
    kinds: &KindCache,
    policy: &str,
    spec: &TakeoverSpec,
    target: &ScaleTarget,
    current: i32,
    now: DateTime<Utc>,
) -> Result<TakeoverStatus, ActuateError> {
    let api: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), target.namespace());
    let failed = |message: String| target.takeover_error(&spec.hpa, message);
    let record = |action: &str| TakeoverStatus {
        hpa: spec.hpa.clone(),
        action: action.to_string(),
        time: now,
        replicas: current,
    };
    let hpa = match api.get_opt(&spec.hpa).await {
        Ok(Some(hpa)) => hpa,
        // Already gone (deleted by hand, or by an earlier attempt whose status was lost).
        Ok(None) => return Ok(record("Absent")),
        Err(e) => return Err(failed(api_message("reading", "get", &e))),
    };
    let drives = target
        .driving_hpa(client, Some(kinds), std::iter::once(&hpa))
        .await
        .is_some();
    if !drives && !crate::actuate::is_inert(&hpa) {
        let r = &hpa.spec.scale_target_ref;
        return Err(failed(format!(
            "its scaleTargetRef is {} {}, not this policy's target; name the HPA that scales the target",
            r.kind, r.name
        )));
    }
    let action = spec.action.unwrap_or_default();
    if crate::actuate::is_inert(&hpa) {
        return Ok(record("Disable"));
    }
    let write_error = |what: &str, e: kube::Error| failed(api_message(what, what_verb(action), &e));
    match action {
        TakeoverAction::Delete => {
            api.delete(&spec.hpa, &DeleteParams::default())
                .await
                .map_err(|e| write_error("deleting", e))?;
            Ok(record("Delete"))
        }
        TakeoverAction::Disable => {
            let restore = serde_json::json!({
                "metadata": {"annotations": {TAKEN_OVER_BY: null, RESTORE_PATCH: null}},
                "spec": {
                    "minReplicas": hpa.spec.min_replicas,
                    "maxReplicas": hpa.spec.max_replicas,
                    "behavior": hpa.spec.behavior,
                }
            });
            // The resourceVersion read makes the patch conditional: an edit in between (whose
            // settings the restore patch would miss) is a 409, and the next evaluation reads again.
            let patch = serde_json::json!({
                "metadata": {
                    "resourceVersion": hpa.metadata.resource_version,
                    "annotations": {
                        TAKEN_OVER_BY: policy,
                        RESTORE_PATCH: restore.to_string(),
                    },
                },
                "spec": {
                    "minReplicas": INERT_MIN_REPLICAS,
                    "maxReplicas": INERT_MAX_REPLICAS,
                    "behavior": {
                        "scaleUp": {"selectPolicy": "Disabled"},
                        "scaleDown": {"selectPolicy": "Disabled"},
                    }
                }
            });
            api.patch(
                &spec.hpa,
                &PatchParams {
                    field_manager: Some(crate::actuate::FIELD_MANAGER.into()),
                    ..PatchParams::default()
                },
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|e| write_error("disabling", e))?;
            Ok(record("Disable"))
        }
    }
}

/// What failed, and for a 403 the grant to add (the chart's `takeover=true`).
fn api_message(what: &str, verb: &str, e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if s.code == 403 => format!(
            "{what} the HPA is forbidden: kscale needs {verb} on horizontalpodautoscalers (install the chart with --set takeover=true, which grants get, patch and delete): {}",
            crate::api_error::human(e)
        ),
        kube::Error::Api(s) if s.code == 409 => format!(
            "{what} the HPA: it changed after kscale read it (409 Conflict), so nothing was changed; the takeover is tried again at the next evaluation"
        ),
        _ => format!("{what} the HPA: {}", crate::api_error::human(e)),
    }
}

fn what_verb(action: TakeoverAction) -> &'static str {
    match action {
        TakeoverAction::Disable => "patch",
        TakeoverAction::Delete => "delete",
    }
}

/// The reason's words for a takeover done at this evaluation.
pub fn describe(t: &TakeoverStatus) -> String {
    let what = match t.action.as_str() {
        "Delete" => "deleted it",
        "Disable" => "disabled it",
        _ => "it no longer existed",
    };
    format!(
        "took over from HPA {} ({what}), carrying on from {} replicas with the scale-down window full of that count",
        t.hpa, t.replicas
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A review's finding: with the chart's default (`takeover: false`) the first call, a GET,
    /// is refused; the message names the verb and the chart value, not the HPA watch's grant.
    #[test]
    fn a_forbidden_takeover_names_the_chart_value() {
        let forbidden = kube::Error::Api(
            kube::core::Status::failure("horizontalpodautoscalers is forbidden", "Forbidden")
                .with_code(403)
                .boxed(),
        );
        let m = api_message("reading", "get", &forbidden);
        assert!(
            m.starts_with("reading the HPA is forbidden: kscale needs get on horizontalpodautoscalers (install the chart with --set takeover=true"),
            "{m}"
        );
        let conflict = kube::Error::Api(
            kube::core::Status::failure("the object has been modified", "Conflict")
                .with_code(409)
                .boxed(),
        );
        let m = api_message("disabling", "patch", &conflict);
        assert!(
            m.starts_with("disabling the HPA: it changed after kscale read it (409 Conflict)")
                && !m.contains("takeover=true"),
            "{m}"
        );
    }
}
