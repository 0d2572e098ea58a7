//! The run-time budget of a policy's CEL formula in the controller.
//!
//! `policy::evaluate` stays pure (no clock), and the `cel` interpreter has no step hook to stop an
//! evaluation midway, so the budget is applied around the call: a policy with a formula is
//! evaluated on tokio's blocking pool, never on the async workers that serve every other policy,
//! and the controller waits at most `--formula-timeout` for it. A formula that overruns is an
//! error of that policy alone: its evaluation is redone at once with the formula refused, so its
//! fallback applies and its reason names the limit, and the formula is not run again until the
//! policy's generation changes.
//!
//! A thread cannot be cancelled: an overrunning evaluation keeps its blocking-pool thread until
//! it finishes. That is why the static bound comes first: [`crate::policy::formula_cost`] refuses
//! at compile time any formula whose worst case exceeds `MAX_FORMULA_COST` (a few milliseconds),
//! so no accepted formula can get near the deadline; the deadline is the second gate, against a
//! flaw in the estimate, and the quarantine keeps such a flaw to one thread per policy
//! generation rather than one per tick.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::warn;

use crate::model::Observation;
use crate::policy::{CompiledPolicy, Decision, PolicyState, evaluate};

/// Default of `--formula-timeout`: how long one evaluation of a policy with a formula may take.
pub const DEFAULT_FORMULA_TIMEOUT: Duration = Duration::from_secs(1);

/// The formulas refused for overrunning, per policy (`namespace/name`), with the generation they
/// were refused at and why.
#[derive(Debug)]
pub struct FormulaBudget {
    timeout: Duration,
    refused: Mutex<HashMap<String, (Option<i64>, String)>>,
}

impl Default for FormulaBudget {
    fn default() -> Self {
        FormulaBudget::new(DEFAULT_FORMULA_TIMEOUT)
    }
}

impl FormulaBudget {
    /// A budget of `timeout` per evaluation.
    pub fn new(timeout: Duration) -> FormulaBudget {
        FormulaBudget {
            timeout,
            refused: Mutex::new(HashMap::new()),
        }
    }

    fn refusal(&self, key: &str, generation: Option<i64>) -> Option<String> {
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        match refused.get(key) {
            Some((g, reason)) if *g == generation => Some(reason.clone()),
            Some(_) => {
                // A new generation gets a fresh chance.
                refused.remove(key);
                None
            }
            None => None,
        }
    }

    fn refuse(&self, key: &str, generation: Option<i64>, reason: String) {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), (generation, reason));
    }

    /// Evaluates `policy` (the policy `key` at `generation`) with its formula under the budget;
    /// a policy without a formula is evaluated in place. Returns the policy as evaluated (its
    /// formula refused after an overrun) and the decision.
    pub async fn evaluate(
        &self,
        key: &str,
        generation: Option<i64>,
        mut policy: CompiledPolicy,
        obs: Observation,
        history: PolicyState,
        now: DateTime<Utc>,
    ) -> (CompiledPolicy, Decision) {
        let Some(formula) = policy.formula.clone() else {
            let decision = evaluate(&policy, &obs, &history, now);
            return (policy, decision);
        };
        if let Some(reason) = self.refusal(key, generation) {
            policy.formula = Some(formula.refused(&reason));
            let decision = evaluate(&policy, &obs, &history, now);
            return (policy, decision);
        }
        let inputs = Arc::new((policy, obs, history));
        let started = std::time::Instant::now();
        let job = {
            let inputs = Arc::clone(&inputs);
            tokio::task::spawn_blocking(move || evaluate(&inputs.0, &inputs.1, &inputs.2, now))
        };
        let reason = match tokio::time::timeout(self.timeout, job).await {
            Ok(Ok(decision)) if started.elapsed() <= self.timeout => {
                let (policy, _, _) = Arc::unwrap_or_clone(inputs);
                return (policy, decision);
            }
            Ok(Err(e)) => {
                warn!(policy = key, error = %e, "evaluating the formula failed");
                "could not be evaluated (it stopped the evaluation); not run again until the \
                 policy changes"
                    .to_string()
            }
            // Past the budget, whether the timer fired first or the result came in before the
            // timer was first polled (a late poll must not make an overrun a success).
            Ok(Ok(_)) | Err(_) => {
                warn!(
                    policy = key,
                    timeout_ms = self.timeout.as_millis() as u64,
                    "the formula ran past its run-time budget"
                );
                format!(
                    "ran past its run-time budget (--formula-timeout {}ms); not run again until \
                     the policy changes",
                    self.timeout.as_millis()
                )
            }
        };
        self.refuse(key, generation, reason.clone());
        let (mut policy, obs, history) = Arc::unwrap_or_clone(inputs);
        policy.formula = Some(formula.refused(&reason));
        let decision = evaluate(&policy, &obs, &history, now);
        (policy, decision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ScalingPolicy;
    use crate::model::Sample;

    fn policy(formula: &str) -> CompiledPolicy {
        let p: ScalingPolicy = serde_yaml::from_str(&format!(
            r#"
apiVersion: kscale.dev/v1alpha1
kind: ScalingPolicy
metadata: {{name: p, namespace: default}}
spec:
  targetRef: {{apiVersion: apps/v1, kind: Deployment, name: web}}
  maxReplicas: 20
  metrics:
  - name: rps
    prometheus: {{query: rps}}
    target: {{type: AverageValue, averageValue: "100"}}
  formula: '{formula}'
  fallback: {{onFailure: Replicas, replicas: 7}}
"#
        ))
        .expect("policy yaml");
        CompiledPolicy::from_resource(&p).expect("valid policy")
    }

    fn obs(now: DateTime<Utc>) -> Observation {
        Observation::steady(
            3,
            vec![Sample::Series {
                values: vec![500.0],
                timestamp: now,
            }],
        )
    }

    /// A formula of a few thousand iterations: milliseconds, far above a budget of zero.
    fn slow_formula() -> String {
        let list = format!("[{}]", vec!["1"; 30].join(","));
        format!("{list}.all(rps, {list}.all(rps, rps > 0)) ? 6 : 0")
    }

    /// A formula that overruns (here: a budget of zero, which a formula of milliseconds never
    /// meets) is an error of its policy: the fallback applies, the reason names the limit, and
    /// it is not run again until the generation changes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_overrun_applies_the_fallback_until_the_generation_changes() {
        let now = DateTime::from_timestamp(1_700_000_000, 0).expect("time");
        let budget = FormulaBudget::new(Duration::ZERO);
        let p = policy(&slow_formula());
        let (_, d) = budget
            .evaluate(
                "default/p",
                Some(1),
                p.clone(),
                obs(now),
                PolicyState::default(),
                now,
            )
            .await;
        assert_eq!(d.replicas, 7, "{d:?}");
        let reason = d.reason(&p);
        assert!(reason.contains("--formula-timeout 0ms"), "{reason}");
        // Refused without running, whatever the budget now.
        let generous = FormulaBudget {
            timeout: Duration::from_secs(60),
            refused: Mutex::new(budget.refused.lock().expect("lock").clone()),
        };
        let (_, again) = generous
            .evaluate(
                "default/p",
                Some(1),
                p.clone(),
                obs(now),
                PolicyState::default(),
                now,
            )
            .await;
        assert_eq!(again.replicas, 7);
        // A new generation runs the formula again.
        let (_, fresh) = generous
            .evaluate(
                "default/p",
                Some(2),
                p.clone(),
                obs(now),
                PolicyState::default(),
                now,
            )
            .await;
        assert_eq!(fresh.replicas, 6, "{fresh:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_policy_without_a_formula_is_evaluated_in_place() {
        let now = DateTime::from_timestamp(1_700_000_000, 0).expect("time");
        let budget = FormulaBudget::new(Duration::ZERO);
        let mut plain = policy("rps");
        plain.formula = None;
        let (_, d) = budget
            .evaluate(
                "default/p",
                Some(1),
                plain,
                obs(now),
                PolicyState::default(),
                now,
            )
            .await;
        assert_eq!(d.replicas, 5);
    }
}
