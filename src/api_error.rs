//! Kubernetes client errors as a person reads them. kube's own text for an apiserver refusal
//! appends the whole `Status` in Rust's debug notation (`Status { status: Some(Failure), ...
//! details: Some(...) }`); logs, statuses and CLI errors show [`human`] instead: the apiserver's
//! message, its reason and the HTTP code.

use std::fmt;

/// `e` for people: see the module documentation.
pub fn human(e: &kube::Error) -> Human<'_> {
    Human(e)
}

/// What [`human`] returns: displays the error.
#[derive(Debug, Clone, Copy)]
pub struct Human<'a>(&'a kube::Error);

impl fmt::Display for Human<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            kube::Error::Api(s) if s.reason.is_empty() => {
                write!(f, "{} (HTTP {})", s.message, s.code)
            }
            kube::Error::Api(s) => write!(f, "{} ({}, HTTP {})", s.message, s.reason, s.code),
            other => other.fmt(f),
        }
    }
}

/// A watch stream's error for people, as [`human`].
pub fn human_watch(e: &kube::runtime::watcher::Error) -> HumanWatch<'_> {
    HumanWatch(e)
}

/// What [`human_watch`] returns: displays the error.
#[derive(Debug, Clone, Copy)]
pub struct HumanWatch<'a>(&'a kube::runtime::watcher::Error);

impl fmt::Display for HumanWatch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use kube::runtime::watcher::Error as W;
        match self.0 {
            W::InitialListFailed(e) => write!(f, "the initial list failed: {}", human(e)),
            W::WatchStartFailed(e) => write!(f, "starting the watch failed: {}", human(e)),
            W::WatchFailed(e) => write!(f, "the watch stream failed: {}", human(e)),
            other => other.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_apiserver_refusal_reads_without_debug_notation() {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "status": "Failure",
            "message": "leases.coordination.k8s.io \"kscale-leader\" is forbidden: User \"system:serviceaccount:kscale:kscale\" cannot get resource \"leases\" in the namespace \"default\"",
            "reason": "Forbidden",
            "details": {"name": "kscale-leader", "kind": "leases"},
            "code": 403
        }))
        .unwrap();
        let e = kube::Error::Api(Box::new(status));
        assert!(e.to_string().contains("Some("), "kube's own text: {e}");
        let text = human(&e).to_string();
        assert!(!text.contains("Some("), "{text}");
        assert!(
            text.ends_with("in the namespace \"default\" (Forbidden, HTTP 403)"),
            "{text}"
        );
        let watch = kube::runtime::watcher::Error::InitialListFailed(e);
        let text = human_watch(&watch).to_string();
        assert!(
            text.starts_with("the initial list failed: leases"),
            "{text}"
        );
        assert!(!text.contains("Some("), "{text}");
    }
}
