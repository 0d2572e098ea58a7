//! The names under which the external metrics adapter publishes a policy's metrics and its
//! decision (`<policy>-<metric>`, `<policy>-desired-replicas`): the compiler refuses a metric
//! whose name would take another policy's decision name, and the adapter serves them.

/// Suffix of the metric holding a policy's desired replica count.
pub const DESIRED_REPLICAS: &str = "desired-replicas";

/// The external metric name of `policy`'s metric `metric`: `<policy>-<metric>`, or with
/// [`DESIRED_REPLICAS`] the name of its decision.
pub fn external_name(policy: &str, metric: &str) -> String {
    format!("{policy}-{metric}")
}

/// The policy whose decision name `<policy>-desired-replicas` the metric `metric` of `policy`
/// would publish, if any (policy `web-desired` with metric `replicas` names policy `web`'s
/// decision). The compiler refuses such a metric, and metric names hold no `-`, so no two
/// (policy, metric) pairs of one namespace publish the same name: the part after the last `-` is
/// the metric, and only a decision's name ends in `-desired-replicas`.
pub fn decision_name_owner(policy: &str, metric: &str) -> Option<String> {
    external_name(policy, metric)
        .strip_suffix(&format!("-{DESIRED_REPLICAS}"))
        .filter(|owner| !owner.is_empty())
        .map(str::to_string)
}
