//! Per-metric replica proposals, with the HPA controller's arithmetic (autoscaling/v2).
//!
//! Prometheus metrics follow the External-metric rules (values summed over series, milli-units
//! rounded up as a served Quantity is); resource metrics follow the pod-metric rules with the
//! readiness, missing-pod and direction-flip guards. Every function here is pure.

use chrono::{DateTime, TimeDelta, Utc};

use crate::model::{PodPhase, PodSample};

/// Per-direction tolerance around a usage ratio of 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerances {
    /// Allowed ratio below 1 before scaling down.
    pub down: f64,
    /// Allowed ratio above 1 before scaling up.
    pub up: f64,
}

impl Tolerances {
    /// Whether `ratio` is close enough to 1 to leave the replica count alone.
    pub fn within(self, ratio: f64) -> bool {
        (1.0 - self.down) <= ratio && ratio <= (1.0 + self.up)
    }
}

/// The HPA controller's time settings for pod readiness (kube-controller-manager flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadinessSettings {
    /// `--horizontal-pod-autoscaler-cpu-initialization-period` (5m).
    pub cpu_initialization: TimeDelta,
    /// `--horizontal-pod-autoscaler-initial-readiness-delay` (30s).
    pub initial_readiness_delay: TimeDelta,
}

impl Default for ReadinessSettings {
    fn default() -> Self {
        ReadinessSettings {
            cpu_initialization: TimeDelta::minutes(5),
            initial_readiness_delay: TimeDelta::seconds(30),
        }
    }
}

/// `int32(math.Ceil(x))`. Negative proposals are kept, as the HPA keeps them (the combination
/// step raises them to 0). Out of range, Go's conversion is implementation-dependent (amd64
/// gives `MinInt32`, arm64 saturates); kscale saturates, as arm64 does and as the HPA's own
/// explicit caps do.
fn ceil_to_replicas(x: f64) -> i32 {
    let c = x.ceil();
    if c.is_nan() {
        0
    } else {
        c.clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32
    }
}

/// Why a set of series has no exact milli-unit sum.
fn out_of_range(v: f64) -> String {
    format!(
        "value {v:e} is beyond ±10^29, the most kscale computes with exactly; holding instead of saturating"
    )
}

/// Sum of the series for a `Value` target, in milli-units, exact (the HPA's `int64` sum caps a
/// positive overflow at `MaxInt64`, which turns a large value into a wrong one; kscale sums in
/// 128 bits and agrees with it wherever it does not overflow). A value past
/// [`crate::units::MAX_EXACT_UNITS`] is an error.
pub fn sum_milli_value(values: &[f64]) -> Result<i128, String> {
    let mut usage = 0i128;
    for v in values {
        let milli = crate::units::to_milli(*v).ok_or_else(|| out_of_range(*v))?;
        usage = usage.checked_add(milli).ok_or_else(|| out_of_range(*v))?;
    }
    Ok(usage)
}

/// Sum of the series for an `AverageValue` target, in milli-units, exact as
/// [`sum_milli_value`]. One HPA rule is kept for parity: a running sum that goes negative (which
/// the HPA takes for an `int64` overflow) becomes `MaxInt64`.
pub fn sum_milli_average(values: &[f64]) -> Result<i128, String> {
    let mut usage = 0i128;
    for v in values {
        let milli = crate::units::to_milli(*v).ok_or_else(|| out_of_range(*v))?;
        usage = usage.checked_add(milli).ok_or_else(|| out_of_range(*v))?;
        if usage < 0 {
            return Ok(i128::from(i64::MAX));
        }
    }
    Ok(usage)
}

/// External metric with a `Value` target: `ratio = usage / target`; with replicas running,
/// `ceil(ratio * ready)` unless within tolerance (an error when the selector matches no pod at
/// all); from zero, `ceil(ratio)`.
pub fn external_value(
    usage_milli: i128,
    target_milli: i128,
    spec_replicas: i32,
    ready: i32,
    pods: i32,
    tol: Tolerances,
) -> Result<i32, String> {
    let ratio = ratio(usage_milli, target_milli);
    if spec_replicas == 0 {
        return Ok(ceil_to_replicas(ratio));
    }
    if tol.within(ratio) {
        return Ok(spec_replicas);
    }
    if pods == 0 {
        return Err("no pods returned by selector while calculating replica count".into());
    }
    Ok(ceil_to_replicas(ratio * f64::from(ready)))
}

/// External metric with an `AverageValue` target: `ratio = usage / (target * status replicas)`;
/// outside tolerance, `ceil(usage / target)`; within, the status replica count.
pub fn external_average(
    usage_milli: i128,
    target_milli: i128,
    status_replicas: i32,
    tol: Tolerances,
) -> i32 {
    let ratio = match target_milli.checked_mul(i128::from(status_replicas)) {
        Some(per_replica) => ratio(usage_milli, per_replica),
        None => usage_milli as f64 / (target_milli as f64 * f64::from(status_replicas)),
    };
    if tol.within(ratio) {
        status_replicas
    } else {
        ceil_to_replicas(self::ratio(usage_milli, target_milli))
    }
}

/// `num / den` in floating point as the HPA divides (`float64(a) / float64(b)`), after dividing
/// both by their greatest common divisor. Below 2^53 the result is the HPA's to the bit (a
/// correctly rounded division of the same rational); above, where a milli-unit count no longer
/// fits a float, a ratio such as 5.4e22 / 9e21 still comes out as exactly 6.
fn ratio(num: i128, den: i128) -> f64 {
    let (mut a, mut b) = (num.unsigned_abs(), den.unsigned_abs());
    while b != 0 {
        (a, b) = (b, a % b);
    }
    if a <= 1 {
        return num as f64 / den as f64;
    }
    let g = a as i128; // a divides |den| <= i128::MAX, so it fits
    (num / g) as f64 / (den / g) as f64
}

/// How a resource target is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceTarget {
    /// Percent of the pods' requests.
    Utilization(i32),
    /// Raw average usage per pod, in milli-units.
    AverageMilli(i64),
}

/// A resource proposal and what it saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResourceProposal {
    /// Replicas proposed.
    pub replicas: i32,
    /// Utilization in percent (Utilization targets) or average usage (AverageValue, in units).
    pub value: f64,
    /// Pods counted ready with metrics.
    pub ready: i32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Group {
    Ignored,
    Unready,
    Missing,
    Ready,
}

fn group_pod(
    pod: &PodSample,
    is_cpu: bool,
    now: DateTime<Utc>,
    settings: ReadinessSettings,
) -> Group {
    if pod.deleting || pod.phase == PodPhase::Failed {
        return Group::Ignored;
    }
    if pod.phase == PodPhase::Pending {
        return Group::Unready;
    }
    let Some(usage) = pod.usage else {
        return Group::Missing;
    };
    if is_cpu {
        let unready = match (pod.ready, pod.start_time) {
            (Some((ready, transition)), Some(start)) => {
                if start + settings.cpu_initialization > now {
                    // Still initializing: skip unready pods and samples taken too soon after the
                    // last readiness change.
                    !ready
                        || usage.timestamp < transition + TimeDelta::seconds(usage.window_seconds)
                } else {
                    // Skip pods that are unready and never became ready.
                    !ready && start + settings.initial_readiness_delay > transition
                }
            }
            _ => true,
        };
        if unready {
            return Group::Unready;
        }
    }
    Group::Ready
}

/// Ratio of a pod set's usage to the target, as the HPA computes it (integer percentages for
/// utilization, integer averages for raw values). `extra` adds assumed usages for pods that have
/// none (missing or unready pods during the second pass).
fn usage_ratio(
    pods: &[(i64, i64)], // (usage, request) per counted pod
    target: ResourceTarget,
) -> Option<(f64, f64)> {
    match target {
        ResourceTarget::Utilization(pct) => {
            let (usage, request) = pods.iter().fold((0i64, 0i64), |(u, r), (pu, pr)| {
                (u.saturating_add(*pu), r.saturating_add(*pr))
            });
            if request == 0 {
                return None;
            }
            let utilization = (usage.saturating_mul(100) / request) as i32;
            Some((
                f64::from(utilization) / f64::from(pct),
                f64::from(utilization),
            ))
        }
        ResourceTarget::AverageMilli(t) => {
            if pods.is_empty() {
                return None;
            }
            let total = pods.iter().fold(0i64, |u, (pu, _)| u.saturating_add(*pu));
            let avg = total / pods.len() as i64;
            Some((avg as f64 / t as f64, avg as f64 / 1000.0))
        }
    }
}

/// Resource metric proposal (HPA `GetResourceReplicas` / `GetRawResourceReplicas`).
///
/// Errors carry the HPA's own messages.
pub fn resource(
    pods: &[PodSample],
    is_cpu: bool,
    target: ResourceTarget,
    current: i32,
    tol: Tolerances,
    now: DateTime<Utc>,
    settings: ReadinessSettings,
) -> Result<ResourceProposal, String> {
    if pods.is_empty() {
        return Err("no pods returned by selector while calculating replica count".into());
    }
    let mut counted: Vec<(i64, i64)> = Vec::with_capacity(pods.len());
    let mut missing: Vec<i64> = Vec::new(); // requests of pods without metrics
    let mut unready: Vec<i64> = Vec::new(); // requests of unready (and pending) pods
    let mut ready_count = 0i32;
    for pod in pods {
        let request = pod.request_milli.unwrap_or(0);
        match group_pod(pod, is_cpu, now, settings) {
            Group::Ignored => {}
            Group::Unready => unready.push(request),
            Group::Missing => missing.push(request),
            Group::Ready => {
                ready_count += 1;
                counted.push((pod.usage.map_or(0, |u| u.milli), request));
            }
        }
    }
    if counted.is_empty() {
        return Err("did not receive metrics for targeted pods (pods might be unready)".into());
    }
    if matches!(target, ResourceTarget::Utilization(_))
        && let Some(pod) = pods.iter().find(|p| p.request_milli.is_none())
    {
        return Err(format!(
            "missing request for {} in a container of Pod {}",
            if is_cpu { "cpu" } else { "memory" },
            pod.name
        ));
    }
    let (ratio, value) = usage_ratio(&counted, target)
        .ok_or_else(|| "no metrics returned matched known pods".to_string())?;
    let proposal = |replicas| ResourceProposal {
        replicas,
        value,
        ready: ready_count,
    };

    let scale_up_with_unready = !unready.is_empty() && ratio > 1.0;
    if !scale_up_with_unready && missing.is_empty() {
        if tol.within(ratio) {
            return Ok(proposal(current));
        }
        return Ok(proposal(ceil_to_replicas(ratio * f64::from(ready_count))));
    }

    if !missing.is_empty() {
        if ratio < 1.0 {
            // Scale-down: assume pods without metrics are busy.
            for request in &missing {
                let assumed = match target {
                    ResourceTarget::Utilization(pct) => request * i64::from(pct.max(100)) / 100,
                    ResourceTarget::AverageMilli(t) => t,
                };
                counted.push((assumed, *request));
            }
        } else if ratio > 1.0 {
            // Scale-up: assume they are idle.
            counted.extend(missing.iter().map(|r| (0, *r)));
        }
    }
    if scale_up_with_unready {
        counted.extend(unready.iter().map(|r| (0, *r)));
    }
    let (new_ratio, _) = usage_ratio(&counted, target)
        .ok_or_else(|| "no metrics returned matched known pods".to_string())?;
    if tol.within(new_ratio) || (ratio < 1.0 && new_ratio > 1.0) || (ratio > 1.0 && new_ratio < 1.0)
    {
        return Ok(proposal(current));
    }
    let new_replicas = ceil_to_replicas(new_ratio * counted.len() as f64);
    if (new_ratio < 1.0 && new_replicas > current) || (new_ratio > 1.0 && new_replicas < current) {
        return Ok(proposal(current));
    }
    Ok(proposal(new_replicas))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PodUsage;

    const TOL: Tolerances = Tolerances { down: 0.1, up: 0.1 };

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    fn calc(
        pods: &[PodSample],
        cpu: bool,
        target: ResourceTarget,
        current: i32,
    ) -> Result<ResourceProposal, String> {
        resource(
            pods,
            cpu,
            target,
            current,
            TOL,
            t(0),
            ReadinessSettings::default(),
        )
    }

    fn pod(name: &str, usage: Option<i64>, request: i64) -> PodSample {
        PodSample {
            name: name.into(),
            phase: PodPhase::Running,
            deleting: false,
            ready: Some((true, t(-3600))),
            start_time: Some(t(-3600)),
            request_milli: Some(request),
            usage: usage.map(|milli| PodUsage {
                milli,
                timestamp: t(-10),
                window_seconds: 30,
            }),
        }
    }

    #[test]
    fn external_value_table() {
        // usage 300, target 100, 3 current, 3 ready: ratio 3 -> 9.
        assert_eq!(external_value(300_000, 100_000, 3, 3, 3, TOL).unwrap(), 9);
        // within tolerance: keep.
        assert_eq!(external_value(105_000, 100_000, 3, 3, 3, TOL).unwrap(), 3);
        // ready pods, not spec replicas, multiply.
        assert_eq!(external_value(200_000, 100_000, 5, 2, 2, TOL).unwrap(), 4);
        // from zero: ceil(ratio), no tolerance.
        assert_eq!(external_value(105_000, 100_000, 0, 0, 0, TOL).unwrap(), 2);
        assert_eq!(external_value(0, 100_000, 0, 0, 0, TOL).unwrap(), 0);
        // Replicas wanted but the selector matches no pod: an error, as in the HPA.
        assert!(external_value(300_000, 100_000, 3, 0, 0, TOL).is_err());
        // Negative usage proposes a negative count; the combination raises it to 0.
        assert_eq!(external_value(-1000, 1000, 3, 3, 3, TOL).unwrap(), -3);
    }

    #[test]
    fn series_sums_follow_the_hpa() {
        assert_eq!(sum_milli_value(&[1.0, 2.5]), Ok(3500));
        assert_eq!(sum_milli_average(&[1.0, 2.5]), Ok(3500));
        // A negative running sum counts as an overflow for AverageValue targets only.
        assert_eq!(sum_milli_average(&[-1.0, 5.0]), Ok(i128::from(i64::MAX)));
        assert_eq!(sum_milli_average(&[5.0, -1.0]), Ok(4000));
        assert_eq!(sum_milli_value(&[-1.0, 5.0]), Ok(4000));
        // Past i64 milli-units the sum stays exact, where the HPA's caps at MaxInt64 (a
        // deliberate difference: the capped sum makes a wrong decision).
        assert_eq!(
            sum_milli_value(&[9e15, 9e15]),
            Ok(18_000_000_000_000_000_000)
        );
        assert_eq!(
            sum_milli_average(&[9e15, 9e15]),
            Ok(18_000_000_000_000_000_000)
        );
        // Past 10^29 a value is an error, not a saturated number.
        assert!(sum_milli_value(&[1e30]).unwrap_err().contains("10^29"));
        assert!(sum_milli_average(&[f64::MAX]).is_err());
    }

    #[test]
    fn external_average_table() {
        // 3 replicas, 100/pod target, usage 450 -> ratio 1.5 -> ceil(4.5) = 5.
        assert_eq!(external_average(450_000, 100_000, 3, TOL), 5);
        // usage 310 over 3 pods at 100: ratio 1.033 within tolerance -> 3.
        assert_eq!(external_average(310_000, 100_000, 3, TOL), 3);
        // boundary: exactly 1.1 is within.
        assert_eq!(external_average(330_000, 100_000, 3, TOL), 3);
        assert_eq!(external_average(331_000, 100_000, 3, TOL), 4);
        // zero status replicas: ratio is infinite -> ceil(usage/target).
        assert_eq!(external_average(250_000, 100_000, 0, TOL), 3);
        assert_eq!(external_average(0, 100_000, 0, TOL), 0);
    }

    #[test]
    fn cpu_utilization_simple() {
        let pods = [pod("a", Some(900), 1000), pod("b", Some(900), 1000)];
        let p = calc(&pods, true, ResourceTarget::Utilization(50), 2).unwrap();
        assert_eq!(p.value, 90.0);
        assert_eq!(p.replicas, 4); // ceil(1.8 * 2)
    }

    #[test]
    fn utilization_truncates_to_integer_percent() {
        // 100/300 = 33% (not 33.3), ratio 0.66 -> ceil(0.66*3) = 2.
        let pods = [
            pod("a", Some(100), 100),
            pod("b", Some(0), 100),
            pod("c", Some(0), 100),
        ];
        let p = calc(&pods, true, ResourceTarget::Utilization(50), 3).unwrap();
        assert_eq!(p.value, 33.0);
        assert_eq!(p.replicas, 2);
    }

    #[test]
    fn missing_pods_assumed_busy_on_scale_down() {
        // Two pods at 10%, one missing: on scale-down the missing one counts as 100%:
        // (10+10+100)/3 = 40% -> ratio 0.8 -> ceil(0.8*3) = 3 >= current -> keep 3.
        let pods = [
            pod("a", Some(100), 1000),
            pod("b", Some(100), 1000),
            pod("c", None, 1000),
        ];
        let p = calc(&pods, true, ResourceTarget::Utilization(50), 3).unwrap();
        assert_eq!(p.replicas, 3);
    }

    #[test]
    fn missing_pods_assumed_idle_on_scale_up() {
        // Two pods at 100% of a 50% target, one missing (idle): (100+100+0)/3 = 66% -> 1.33 -> 4.
        let pods = [
            pod("a", Some(1000), 1000),
            pod("b", Some(1000), 1000),
            pod("c", None, 1000),
        ];
        let p = calc(&pods, true, ResourceTarget::Utilization(50), 3).unwrap();
        assert_eq!(p.replicas, 4);
    }

    #[test]
    fn unready_pods_dampen_scale_up() {
        let mut unready = pod("c", Some(1000), 1000);
        unready.ready = Some((false, t(-10)));
        unready.start_time = Some(t(-20));
        let pods = [
            pod("a", Some(1000), 1000),
            pod("b", Some(1000), 1000),
            unready,
        ];
        // ready pods: 200% of 50% target... (1000+1000)/2000=100% -> ratio 2;
        // unready counted as 0: (1000+1000+0)/3000 = 66% -> 1.32 -> ceil(1.32*3)=4.
        let p = calc(&pods, true, ResourceTarget::Utilization(50), 3).unwrap();
        assert_eq!(p.replicas, 4);
    }

    #[test]
    fn direction_flip_keeps_current() {
        // Ready pods say scale down (20% of 50), but the missing pods assumed at 100% flip it up.
        let pods = [
            pod("a", Some(200), 1000),
            pod("b", None, 1000),
            pod("c", None, 1000),
        ];
        let p = calc(&pods, true, ResourceTarget::Utilization(50), 3).unwrap();
        assert_eq!(p.replicas, 3);
    }

    #[test]
    fn errors_use_hpa_messages() {
        let settings = ReadinessSettings::default();
        assert!(
            resource(
                &[],
                true,
                ResourceTarget::Utilization(50),
                1,
                TOL,
                t(0),
                settings
            )
            .unwrap_err()
            .contains("no pods returned")
        );
        let mut p = pod("a", Some(100), 100);
        p.request_milli = None;
        assert!(
            resource(
                &[p],
                true,
                ResourceTarget::Utilization(50),
                1,
                TOL,
                t(0),
                settings
            )
            .unwrap_err()
            .contains("missing request for cpu in a container of Pod a")
        );
        let pending = PodSample {
            phase: PodPhase::Pending,
            ..pod("a", None, 100)
        };
        assert!(
            resource(
                &[pending],
                true,
                ResourceTarget::Utilization(50),
                1,
                TOL,
                t(0),
                settings
            )
            .unwrap_err()
            .contains("did not receive metrics")
        );
    }

    #[test]
    fn average_value_uses_integer_average() {
        // (100 + 201)/2 = 150 (integer) -> ratio 1.5 against 100 -> ceil(1.5*2)=3
        let pods = [pod("a", Some(100), 0), pod("b", Some(201), 0)];
        let p = calc(&pods, false, ResourceTarget::AverageMilli(100), 2).unwrap();
        assert_eq!(p.replicas, 3);
    }
}
