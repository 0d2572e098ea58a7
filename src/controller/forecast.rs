//! The controller's side of `spec.forecast`: one [`ForecastState`] per policy, kept in memory.
//! After a start, a leader change or a spec change (new generation) the state is rebuilt from
//! Prometheus: each forecast metric's query is read with a range query over the forecast's
//! history at the policy's interval, the same values the evaluations would have fed, or coarser
//! when that would exceed `MAX_HISTORY_STEPS` points. So the
//! forecast survives a restart without storing the model anywhere. The models themselves are
//! pure ([`crate::policy::forecast`]); their fits run on tokio's blocking pool, off the async
//! workers.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, TimeDelta, Utc};
use tracing::{debug, info, warn};

use super::QueryBackend;
use crate::model::Sample;
use crate::policy::compile::MAX_HISTORY_STEPS;
use crate::policy::forecast::{ForecastState, Prediction};
use crate::policy::{CompiledPolicy, MetricSource};

/// How long to wait before re-reading a history that failed to load.
const RETRY: TimeDelta = TimeDelta::minutes(1);

struct Entry {
    generation: Option<i64>,
    state: ForecastState,
    /// The forecast metrics whose history has not been read yet (never tried, or the read
    /// failed), and when to try them again. A late read is merged into the live samples the
    /// state has gathered meanwhile ([`ForecastState::load_history`]), so nothing is lost.
    unread: Vec<usize>,
    read_at: DateTime<Utc>,
    /// The last read failure logged per metric, so a failure that lasts is logged once.
    warned: HashMap<usize, String>,
}

/// Every policy's forecasting state, by `namespace/name`.
#[derive(Default)]
pub struct Forecasts {
    policies: Mutex<HashMap<String, Entry>>,
}

impl Forecasts {
    /// Feeds this evaluation's samples to the policy's forecasters and returns their forecasts
    /// (empty without `spec.forecast`). A state that is new or of an older generation is
    /// rebuilt, its history read from Prometheus; a metric whose read failed is read again a
    /// minute later, meanwhile forecasting from the samples it has.
    pub async fn predict(
        &self,
        backend: &dyn QueryBackend,
        key: &str,
        generation: Option<i64>,
        policy: &CompiledPolicy,
        samples: &[Sample],
        now: DateTime<Utc>,
    ) -> Vec<Option<Prediction>> {
        let Some(settings) = policy.forecast else {
            self.forget(key);
            return Vec::new();
        };
        let taken = self.lock().remove(key);
        let mut entry = match taken {
            Some(e) if e.generation == generation => e,
            _ => {
                let state = ForecastState::new(policy);
                Entry {
                    generation,
                    unread: state.forecast_metrics().collect(),
                    state,
                    read_at: now,
                    warned: HashMap::new(),
                }
            }
        };
        // The histories read now; fitting them (and every fit after) runs off the async workers.
        let mut loaded = Vec::new();
        // `now < read_at - RETRY`: the clock went back; try rather than wait for it.
        if !entry.unread.is_empty() && (now >= entry.read_at || now < entry.read_at - RETRY) {
            let mut failed = Vec::new();
            for i in std::mem::take(&mut entry.unread) {
                let Some(m) = policy.metrics.get(i) else {
                    continue;
                };
                let MetricSource::Prometheus { query } = &m.source else {
                    continue;
                };
                // At the policy's interval (the values its evaluations would have fed), but
                // never more than `MAX_HISTORY_STEPS` points, the bound validation checks on
                // `history / step`: `interval: 1s, history: 60d` would otherwise ask for over
                // five million points per metric.
                // The held history: a fit's window and the buckets since the last scheduled
                // fit, so the model is fitted where a controller running all along fitted it.
                let start = now - settings.held();
                let end = now - policy.interval;
                let resolution = policy
                    .interval
                    .max(settings.held() / MAX_HISTORY_STEPS as i32)
                    .max(TimeDelta::seconds(1));
                match backend
                    .query_range(query.clone(), start, end, resolution)
                    .await
                {
                    Ok(points) => {
                        info!(policy = key, metric = %m.name, points = points.len(), "forecast history read");
                        entry.warned.remove(&i);
                        loaded.push((i, points));
                    }
                    Err(message) => {
                        if entry.warned.get(&i) != Some(&message) {
                            warn!(policy = key, metric = %m.name, %message, retry_in_s = RETRY.num_seconds(), "reading the forecast history failed; forecasting from the samples seen so far until it is read (logged once while the same failure lasts)");
                            entry.warned.insert(i, message);
                        } else {
                            debug!(policy = key, metric = %m.name, %message, "reading the forecast history failed again");
                        }
                        failed.push(i);
                    }
                }
            }
            entry.unread = failed;
            entry.read_at = now + RETRY;
        }
        // Loading a history replays its fits, and a surprise refits over the whole window
        // (a grid of parameter sets times the history): CPU-bound work that must not hold an
        // async worker, where the lease renewals and the other policies' reads run.
        let samples = samples.to_vec();
        let fitted = tokio::task::spawn_blocking(move || {
            for (i, points) in loaded {
                entry.state.load_history(i, points);
            }
            let forecasts = entry.state.observe_and_forecast(&samples, now);
            (entry, forecasts)
        })
        .await;
        match fitted {
            Ok((entry, forecasts)) => {
                self.lock().insert(key.to_string(), entry);
                forecasts
            }
            Err(e) => {
                // The state is lost with the task: it is rebuilt from the history next time.
                warn!(policy = key, error = %e, "the forecast's fit failed; this evaluation goes without a forecast");
                Vec::new()
            }
        }
    }

    /// Drops a policy's state (deleted, or no longer forecasting).
    pub fn forget(&self, key: &str) {
        self.lock().remove(key);
    }

    /// Keeps only the policies whose `namespace/name` `keep` accepts (the deleted go).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock().retain(|k, _| keep(k));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock cannot leave the map half-written: recover it.
        self.policies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::future::BoxFuture;

    use super::*;
    use crate::controller::History;
    use crate::crd::ScalingPolicy;

    /// A Prometheus whose history is a ramp of one per second, counting range queries; the
    /// first `failures` of them fail.
    struct Ramp {
        reads: AtomicUsize,
        failures: usize,
        /// The most points one range query asked for.
        most_points: AtomicUsize,
    }

    impl QueryBackend for Ramp {
        fn query_all(&self, _queries: Vec<String>) -> BoxFuture<'_, HashMap<String, Sample>> {
            Box::pin(async { HashMap::new() })
        }

        fn query_range(
            &self,
            _query: String,
            start: DateTime<Utc>,
            end: DateTime<Utc>,
            step: TimeDelta,
        ) -> BoxFuture<'_, Result<History, String>> {
            if self.reads.fetch_add(1, Ordering::SeqCst) < self.failures {
                return Box::pin(async { Err("connection refused".to_string()) });
            }
            let mut out = Vec::new();
            let mut t = start;
            while t <= end {
                out.push((t, t.timestamp() as f64 - 1.7e9));
                t += step;
            }
            self.most_points.fetch_max(out.len(), Ordering::SeqCst);
            Box::pin(async move { Ok(out) })
        }
    }

    fn policy() -> CompiledPolicy {
        policy_with("")
    }

    fn policy_with(interval: &str) -> CompiledPolicy {
        let p: ScalingPolicy = serde_yaml::from_str(&format!(
            r#"
apiVersion: kscale.dev/v1alpha1
kind: ScalingPolicy
metadata: {{name: p, namespace: default}}
spec:
  targetRef: {{apiVersion: apps/v1, kind: Deployment, name: web}}
  maxReplicas: 20
  {interval}
  metrics:
  - name: rps
    prometheus: {{query: rps}}
    target: {{type: AverageValue, averageValue: "100"}}
  forecast: {{model: Trend, history: 1h}}
"#,
        ))
        .expect("policy yaml");
        CompiledPolicy::from_resource(&p).expect("valid policy")
    }

    /// One policy's forecasts against a [`Ramp`], evaluated at the ramp's value.
    struct Fixture {
        rt: tokio::runtime::Runtime,
        backend: Ramp,
        forecasts: Forecasts,
        policy: CompiledPolicy,
    }

    impl Fixture {
        fn new(failures: usize) -> Fixture {
            Fixture {
                rt: tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("runtime"),
                backend: Ramp {
                    reads: AtomicUsize::new(0),
                    failures,
                    most_points: AtomicUsize::new(0),
                },
                forecasts: Forecasts::default(),
                policy: policy(),
            }
        }

        fn predict(&self, generation: i64, now: DateTime<Utc>) -> Vec<Option<Prediction>> {
            let sample = Sample::Series {
                values: vec![now.timestamp() as f64 - 1.7e9],
                timestamp: now,
            };
            self.rt.block_on(self.forecasts.predict(
                &self.backend,
                "default/p",
                Some(generation),
                &self.policy,
                &[sample],
                now,
            ))
        }

        fn reads(&self) -> usize {
            self.backend.reads.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn history_is_re_read_after_a_restart_and_on_a_new_generation() {
        let f = Fixture::new(0);
        let now = DateTime::from_timestamp(1_700_003_600, 0).expect("time");
        let first = f.predict(1, now);
        // A fresh process forecasts at once from the re-read history: the ramp, 60s ahead.
        let p = first[0].expect("a forecast from the history alone");
        assert!((p.point - 3660.0).abs() < 30.0, "{p:?}");
        assert_eq!(f.reads(), 1);
        let later = now + TimeDelta::seconds(15);
        f.predict(1, later);
        assert_eq!(f.reads(), 1, "same generation");
        f.predict(2, later);
        assert_eq!(f.reads(), 2, "new generation");
    }

    /// A failed history read is retried a minute later, not at every evaluation; the samples
    /// seen meanwhile keep the forecast going and are still there after the read.
    #[test]
    fn a_failed_history_read_is_retried_without_losing_live_samples() {
        let f = Fixture::new(2);
        let t0 = DateTime::from_timestamp(1_700_003_600, 0).expect("time");
        let mut last = Vec::new();
        // Every 15 s for 3 minutes: reads at 0 s (fails), 60 s (fails) and 120 s.
        for k in 0..12 {
            last = f.predict(1, t0 + TimeDelta::seconds(15 * k));
            assert_eq!(f.reads(), 1 + (k as usize) / 4, "at {k}");
            if (4..8).contains(&k) {
                // Forecasting from the live samples alone (a minute's bucket has completed),
                // after two failed reads.
                assert!(last[0].is_some(), "at {k}: {last:?}");
            }
        }
        // The read history and the live minutes together: the ramp, 60 s ahead of the last
        // evaluation.
        let p = last[0].expect("forecast");
        let want = (t0 + TimeDelta::seconds(165 + 60)).timestamp() as f64 - 1.7e9;
        assert!((p.point - want).abs() < 30.0, "{p:?} vs {want}");
    }

    /// Issue 13, kind 5: with `interval: 1s` and 60 days of history, one read asks for at most
    /// `MAX_HISTORY_STEPS` points (the bound validation checks), not over five million.
    #[test]
    fn a_history_read_asks_for_at_most_max_history_steps_points() {
        let mut f = Fixture::new(0);
        f.policy = policy_with("interval: 1s");
        let mut settings = f.policy.forecast.expect("forecast");
        settings.history = TimeDelta::days(60);
        settings.step = TimeDelta::minutes(1);
        f.policy.forecast = Some(settings);
        let now = DateTime::from_timestamp(1_700_003_600, 0).expect("time");
        f.predict(1, now);
        assert_eq!(f.reads(), 1);
        let points = f.backend.most_points.load(Ordering::SeqCst);
        assert!(points <= MAX_HISTORY_STEPS as usize + 1, "{points} points");
        assert!(points > 50_000, "still fine-grained: {points} points");
    }
}
