//! Leader election through a `coordination.k8s.io/v1` Lease, so two replicas of the daemon can
//! run and only one evaluates and writes.
//!
//! Three durations, as in client-go's leader election:
//! - the lease duration (`--leader-lease-duration`): a candidate takes the Lease over once it has
//!   seen no change to it for this long, measured on the candidate's own monotonic clock from
//!   the moment it observed the last change (never by comparing the holder's `renewTime` with
//!   its own wall clock, so clock skew between nodes cannot shorten it);
//! - the renew deadline (`--leader-renew-deadline`, shorter than the lease duration): the
//!   holder counts itself the leader only until this long after the start of its last
//!   successful renewal, by its own monotonic clock ([`Leadership::check_for`]). A renewal that
//!   stalls therefore ends this replica's leadership before any other replica can take the
//!   Lease over;
//! - the retry period (`--leader-renew`): how often the holder renews and candidates retry.
//!
//! Every write of the Lease carries its resourceVersion, so two candidates cannot both win. The
//! controller checks [`Leadership::check_policy`] right before each write it makes (the scale, the
//! status, events), so a replica that lost the Lease in the middle of a tick stops writing at
//! once. On shutdown the holder releases the Lease (empty holder), so a successor takes over at
//! once.
//!
//! With `--shards N` above 1 there is one such Lease per shard (`<lease>-<i>`), campaigned for
//! by [`super::shards::campaign`]; [`Leadership`] then answers per shard.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};

pub use crate::actuate::NotLeader;
use tracing::{debug, info, warn};

/// Where a pod finds its own namespace when nothing else says it.
pub const SERVICE_ACCOUNT_NAMESPACE: &str =
    "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// The Lease's namespace: `flag` (`--leader-election-namespace`, or `POD_NAMESPACE`, which the
/// chart sets through the downward API) when given, else the namespace in `service_account_file`
/// (the pod's own), else `default` (outside a cluster).
pub fn lease_namespace(flag: Option<&str>, service_account_file: &std::path::Path) -> String {
    flag.map(str::trim)
        .filter(|ns| !ns.is_empty())
        .map(str::to_string)
        .or_else(|| {
            std::fs::read_to_string(service_account_file)
                .ok()
                .map(|ns| ns.trim().to_string())
                .filter(|ns| !ns.is_empty())
        })
        .unwrap_or_else(|| "default".to_string())
}

/// Election settings.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This instance's identity (unique per replica).
    pub identity: String,
    /// How long a renewal stays valid for the other candidates (`--leader-lease-duration`).
    pub duration: Duration,
    /// How long after the start of its last successful renewal the holder still counts itself
    /// the leader (`--leader-renew-deadline`); shorter than `duration`.
    pub renew_deadline: Duration,
    /// How often the holder renews, and a candidate retries (`--leader-renew`); shorter than
    /// `renew_deadline`.
    pub renew: Duration,
    /// How many shards the policies are spread over (`--shards`): 1 is the one leader Lease
    /// `name`; above 1, one Lease `<name>-<i>` per shard ([`super::shards`]).
    pub shards: u32,
}

/// Election settings that cannot work; each names the flags at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaderConfigError {
    /// The lease duration is under a second (a Lease counts whole seconds).
    #[error("--leader-lease-duration {0:?} is shorter than 1s (a Lease counts whole seconds)")]
    DurationTooShort(Duration),
    /// The renew deadline is not shorter than the lease duration.
    #[error(
        "--leader-renew-deadline {deadline:?} must be shorter than --leader-lease-duration {duration:?}, or a leader whose renewal stalls could still write after another replica took the Lease over"
    )]
    DeadlineNotShorter {
        /// The renew deadline.
        deadline: Duration,
        /// The lease duration.
        duration: Duration,
    },
    /// The retry period is not shorter than the renew deadline.
    #[error(
        "--leader-renew {renew:?} must be shorter than --leader-renew-deadline {deadline:?} (default: two thirds of --leader-lease-duration), or the leader could not renew before its deadline"
    )]
    RenewNotShorter {
        /// The retry period.
        renew: Duration,
        /// The renew deadline.
        deadline: Duration,
    },
}

impl LeaderConfig {
    /// The renew deadline used when `--leader-renew-deadline` is not given: two thirds of the
    /// lease duration (client-go's defaults are 10 s of 15 s).
    pub fn default_renew_deadline(duration: Duration) -> Duration {
        duration * 2 / 3
    }

    /// Checks `renew < renew_deadline < duration` and `duration >= 1s`.
    pub fn validate(&self) -> Result<(), LeaderConfigError> {
        if self.duration < Duration::from_secs(1) {
            return Err(LeaderConfigError::DurationTooShort(self.duration));
        }
        if self.renew_deadline >= self.duration {
            return Err(LeaderConfigError::DeadlineNotShorter {
                deadline: self.renew_deadline,
                duration: self.duration,
            });
        }
        if self.renew >= self.renew_deadline {
            return Err(LeaderConfigError::RenewNotShorter {
                renew: self.renew,
                deadline: self.renew_deadline,
            });
        }
        Ok(())
    }

    /// The lease duration as the Lease records it: whole seconds, rounded up, so a candidate
    /// never waits less than this replica's own deadline.
    fn duration_seconds(&self) -> i32 {
        let secs = self.duration.as_secs() + u64::from(self.duration.subsec_nanos() > 0);
        i32::try_from(secs).unwrap_or(i32::MAX)
    }
}

#[derive(Debug)]
enum Held {
    /// No election: this replica is the only writer.
    Always,
    /// Elected: per shard (one entry without sharding), leading until this instant (by this
    /// replica's monotonic clock), if ever.
    Until(Vec<Option<Instant>>),
}

/// Whether this replica may write now, per shard. Cheap to clone and to check; the election
/// campaign updates it and every writer checks it right before writing.
#[derive(Debug, Clone)]
pub struct Leadership(Arc<Mutex<Held>>);

impl Default for Leadership {
    fn default() -> Self {
        Leadership::always()
    }
}

impl Leadership {
    /// Without election: always the leader.
    pub fn always() -> Leadership {
        Leadership(Arc::new(Mutex::new(Held::Always)))
    }

    /// With election through one Lease: not the leader until [`campaign`] acquires it.
    pub fn elected() -> Leadership {
        Leadership(Arc::new(Mutex::new(Held::Until(vec![None]))))
    }

    /// Turns an "always" leadership into an elected one over `shards` Leases (1: the one
    /// leader Lease), none held until the campaign acquires them.
    pub fn start_election(&self, shards: u32) {
        if let Ok(mut held) = self.0.lock() {
            *held = Held::Until(vec![None; shards.max(1) as usize]);
        }
    }

    /// How many shards the policies are spread over (1 without election or sharding).
    pub fn shards(&self) -> u32 {
        match self.0.lock().as_deref() {
            Ok(Held::Until(v)) => u32::try_from(v.len()).unwrap_or(u32::MAX),
            _ => 1,
        }
    }

    /// The shard of the policy `namespace/name` ([`super::shards::shard_of`]).
    pub fn shard_of(&self, namespace: &str, name: &str) -> u32 {
        super::shards::shard_of(namespace, name, self.shards())
    }

    /// Whether this replica leads at least one shard at this instant (with one Lease: whether
    /// it is the leader).
    pub fn is_leader(&self) -> bool {
        self.held().iter().any(|h| *h)
    }

    /// Per shard, whether this replica may write its policies at this instant.
    pub fn held(&self) -> Vec<bool> {
        let Ok(held) = self.0.lock() else {
            return vec![false];
        };
        match &*held {
            Held::Always => vec![true],
            Held::Until(v) => {
                let now = Instant::now();
                v.iter().map(|u| u.is_some_and(|u| now < u)).collect()
            }
        }
    }

    /// `Ok` while this replica may write the policies of `shard`: no election, or that shard's
    /// Lease renewed recently enough (its held-until deadline, by this replica's own clock, is
    /// still ahead).
    pub fn check_for(&self, shard: u32) -> Result<(), NotLeader> {
        let Ok(held) = self.0.lock() else {
            return Err(NotLeader { shard: None });
        };
        match &*held {
            Held::Always => Ok(()),
            Held::Until(v) => {
                let n = u32::try_from(v.len()).unwrap_or(u32::MAX);
                let named = (n > 1).then_some((shard, n));
                match v.get(shard as usize) {
                    Some(Some(until)) if Instant::now() < *until => Ok(()),
                    _ => Err(NotLeader { shard: named }),
                }
            }
        }
    }

    /// [`Leadership::check_for`] the shard of the policy `namespace/name`: what every write
    /// for a policy (its scale, status, events) checks right before it is made.
    pub fn check_policy(&self, namespace: &str, name: &str) -> Result<(), NotLeader> {
        self.check_for(self.shard_of(namespace, name))
    }

    pub(super) fn hold_until(&self, shard: u32, until: Instant) {
        if let Ok(mut held) = self.0.lock()
            && let Held::Until(v) = &mut *held
            && let Some(t) = v.get_mut(shard as usize)
        {
            *t = Some(until);
        }
    }

    pub(super) fn lose(&self, shard: u32) {
        if let Ok(mut held) = self.0.lock()
            && let Held::Until(v) = &mut *held
            && let Some(t) = v.get_mut(shard as usize)
        {
            *t = None;
        }
    }
}

fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// What a candidate compares to see whether the holder renewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Record {
    holder: String,
    renew_time: Option<String>,
    acquire_time: Option<String>,
    transitions: Option<i32>,
    duration_seconds: Option<i32>,
}

impl Record {
    pub(super) fn of(spec: &LeaseSpec) -> Record {
        Record {
            holder: spec.holder_identity.clone().unwrap_or_default(),
            renew_time: spec.renew_time.as_ref().map(|t| t.0.to_string()),
            acquire_time: spec.acquire_time.as_ref().map(|t| t.0.to_string()),
            transitions: spec.lease_transitions,
            duration_seconds: spec.lease_duration_seconds,
        }
    }

    /// Whether the record names no holder or no renewal: a free Lease.
    fn free(&self) -> bool {
        self.holder.is_empty() || self.renew_time.is_none()
    }

    /// The lease duration the record states (`default` when it states none).
    fn duration(&self, default: Duration) -> Duration {
        self.duration_seconds.map_or(default, |s| {
            Duration::from_secs(u64::try_from(s).unwrap_or(0))
        })
    }
}

/// When a Lease's record was first seen, by this replica's monotonic clock.
///
/// Every sighting is of a record already written, so the time kept for the record the Lease
/// holds now is never before its write: a candidate that judges it expired (unchanged for the
/// lease duration since) is at least the lease duration past the holder's renewal, whatever
/// the holder's clock says. Sightings may come late or out of order (a LIST and a watch race);
/// a late one only delays the expiry.
#[derive(Debug, Default)]
pub(super) struct Observation(Option<(Record, Instant)>);

impl Observation {
    /// Takes in that `record` was seen at `at`: the same record keeps its earliest sighting; a
    /// different one replaces it unless it was seen before the one kept (a stale sighting).
    pub(super) fn seen(&mut self, record: Record, at: Instant) {
        match &mut self.0 {
            Some((kept, since)) if *kept == record => *since = (*since).min(at),
            Some((_, since)) if at < *since => {}
            _ => self.0 = Some((record, at)),
        }
    }

    /// Takes in `other`'s sighting (made elsewhere, e.g. by a watch), as [`Observation::seen`].
    pub(super) fn merge(&mut self, other: Observation) {
        if let Some((record, at)) = other.0 {
            self.seen(record, at);
        }
    }

    /// Whether the holder of `spec`, seen at `now`, has not renewed for its lease duration
    /// (`default` when the Lease says none), as this replica has watched it: an empty holder or
    /// renew time counts as expired at once.
    pub(super) fn expired_at(&mut self, spec: &LeaseSpec, default: Duration, now: Instant) -> bool {
        let record = Record::of(spec);
        if record.free() {
            self.seen(record, now);
            return true;
        }
        self.seen(record.clone(), now);
        match &self.0 {
            Some((kept, since)) if *kept == record => now > *since + record.duration(default),
            // A later sighting of another record: not this one's expiry to judge.
            _ => false,
        }
    }

    /// [`Observation::expired_at`] now.
    pub(super) fn expired(&mut self, spec: &LeaseSpec, default: Duration) -> bool {
        self.expired_at(spec, default, Instant::now())
    }

    /// From when the Lease may be taken as far as this replica has seen it: a free one from
    /// when it was seen free, a held one strictly after its lease duration from when its record
    /// was first seen (`None`: nothing seen).
    pub(super) fn due(&self, default: Duration) -> Option<Instant> {
        let (record, since) = self.0.as_ref()?;
        Some(if record.free() {
            *since
        } else {
            *since + record.duration(default)
        })
    }

    /// The holder of the record kept (`None`: nothing seen, or a free Lease).
    pub(super) fn holder(&self) -> Option<&str> {
        self.0
            .as_ref()
            .filter(|(r, _)| !r.free())
            .map(|(r, _)| r.holder.as_str())
    }
}

/// One candidate's view of one Lease.
pub(super) struct Elector {
    api: Api<Lease>,
    cfg: LeaderConfig,
    /// The last record seen, and when it was first seen.
    observed: Observation,
    /// Labels a Lease this candidate creates carries (none for the one leader Lease).
    labels: Option<std::collections::BTreeMap<String, String>>,
    /// The Lease as this candidate's last successful write left it (`None` after a conflict):
    /// what it renews from without reading the Lease first ([`Elector::renew_held`]).
    written: Option<Lease>,
}

impl Elector {
    /// A candidate for the Lease `cfg.name` in `cfg.namespace`, creating it with `labels`.
    pub(super) fn new(
        api: Api<Lease>,
        cfg: LeaderConfig,
        labels: Option<std::collections::BTreeMap<String, String>>,
    ) -> Elector {
        Elector {
            api,
            cfg,
            observed: Observation::default(),
            labels,
            written: None,
        }
    }

    /// Renews the Lease from the copy this candidate's last write returned, without reading it
    /// first: `None` when there is no such copy, or it is not held by this candidate. The write
    /// carries that copy's resourceVersion, so a Lease changed since (taken over, released)
    /// is not overwritten: the conflict answers `Ok(false)`, and the copy is dropped.
    pub(super) async fn renew_held(&mut self) -> Option<Result<bool, kube::Error>> {
        let lease = self.written.clone().filter(|l| {
            l.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                == Some(self.cfg.identity.as_str())
        })?;
        Some(self.acquire_from(Some(lease)).await)
    }

    /// The copy of the Lease this candidate's last write returned, given up (to release it).
    pub(super) fn take_written(&mut self) -> Option<Lease> {
        self.written.take()
    }

    /// Whether the holder of `spec` has not renewed for its lease duration, as this replica has
    /// watched it.
    pub(super) fn expired(&mut self, spec: &LeaseSpec) -> bool {
        self.observed.expired(spec, self.cfg.duration)
    }

    /// What this replica has seen of the Lease, and when.
    pub(super) fn observed(&mut self) -> &mut Observation {
        &mut self.observed
    }

    /// [`Elector::observed`], to read.
    pub(super) fn observation(&self) -> &Observation {
        &self.observed
    }

    /// One attempt to acquire or renew. Returns whether this instance holds the Lease afterwards.
    async fn try_acquire(&mut self) -> Result<bool, kube::Error> {
        let existing = self.api.get_opt(&self.cfg.name).await?;
        self.acquire_from(existing).await
    }

    /// One attempt to acquire or renew the Lease, `existing` as just read (`None`: it does not
    /// exist). Returns whether this instance holds the Lease afterwards.
    pub(super) async fn acquire_from(
        &mut self,
        existing: Option<Lease>,
    ) -> Result<bool, kube::Error> {
        let duration_s = self.cfg.duration_seconds();
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    labels: self.labels.clone(),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.cfg.identity.clone()),
                    lease_duration_seconds: Some(duration_s),
                    acquire_time: Some(now_micro()),
                    renew_time: Some(now_micro()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            let created = self.api.create(&PostParams::default(), &lease).await;
            return self.wrote(created);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.cfg.identity;
        if !ours && !self.expired(spec) {
            self.written = None;
            return Ok(false);
        }
        if !ours {
            spec.holder_identity = Some(self.cfg.identity.clone());
            spec.acquire_time = Some(now_micro());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.renew_time = Some(now_micro());
        spec.lease_duration_seconds = Some(duration_s);
        // replace carries metadata.resourceVersion: a concurrent writer gets 409 and loses.
        let replaced = self
            .api
            .replace(&lease.name_any(), &PostParams::default(), &lease)
            .await;
        self.wrote(replaced)
    }

    /// What a write of the Lease came to: held (its copy kept for the next renewal), lost to
    /// another writer (409: the copy dropped), or failed.
    fn wrote(&mut self, result: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
        match result {
            Ok(lease) => {
                self.written = Some(lease);
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                self.written = None;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// Releases the Lease if this instance holds it.
pub async fn release(client: &Client, cfg: &LeaderConfig) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    if let Ok(Some(lease)) = api.get_opt(&cfg.name).await {
        release_lease(&api, &cfg.identity, lease).await;
    }
}

/// Empties the holder of `lease` (as just read) if it is `identity`, conditionally on its
/// resourceVersion, so a candidate takes it over at once.
pub(super) async fn release_lease(api: &Api<Lease>, identity: &str, mut lease: Lease) {
    let name = lease.name_any();
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(identity) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    match api.replace(&name, &PostParams::default(), &lease).await {
        Ok(_) => info!(lease = %name, "leadership released"),
        Err(e) => {
            warn!(lease = %name, error = %crate::api_error::human(&e), "releasing the lease failed")
        }
    }
}

/// Logs a failed Lease update once while the same failure lasts (a 403 names the grant to
/// add), then at debug.
pub(super) fn lease_failed(
    reported: &super::permissions::Once,
    cfg: &LeaderConfig,
    e: &kube::Error,
) {
    let access = super::permissions::Access::Lease {
        namespace: &cfg.namespace,
    };
    let error = super::permissions::explain(e, access);
    if reported.first("lease", &error) {
        warn!(lease = %format!("{}/{}", cfg.namespace, cfg.name), %error, "lease update failed (reported once while it lasts)");
    } else {
        debug!(%error, "lease update failed again");
    }
}

/// Keeps trying to lead; `leadership` holds until the renew deadline after each successful
/// renewal's start. An attempt that takes longer than the renew deadline is abandoned (the
/// leadership has lapsed by then anyway). Runs until the task is dropped.
pub async fn campaign(client: Client, cfg: LeaderConfig, leadership: Leadership) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut elector = Elector::new(api, cfg.clone(), None);
    let mut was_leader = false;
    // A failure that repeats every renewal is logged once (then at debug), with what to change.
    let reported = super::permissions::Once::default();
    loop {
        let started = Instant::now();
        let attempt = tokio::time::timeout(cfg.renew_deadline, elector.try_acquire()).await;
        match attempt {
            Ok(Ok(true)) => {
                leadership.hold_until(0, started + cfg.renew_deadline);
                if reported.clear("lease") {
                    info!(lease = %cfg.name, "lease update works again");
                }
                if !was_leader {
                    info!(identity = %cfg.identity, lease = %cfg.name, "became the leader");
                }
            }
            Ok(Ok(false)) => {
                leadership.lose(0);
                if was_leader {
                    warn!(identity = %cfg.identity, "lost the lease to another instance");
                }
            }
            Ok(Err(e)) => lease_failed(&reported, &cfg, &e),
            Err(_) => warn!(
                deadline = ?cfg.renew_deadline,
                "lease update took longer than --leader-renew-deadline; abandoned"
            ),
        }
        let leading = leadership.is_leader();
        if was_leader && !leading {
            warn!(identity = %cfg.identity, "stopped leading: the lease was not renewed within --leader-renew-deadline");
        }
        was_leader = leading;
        tokio::time::sleep(cfg.renew).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(duration: u64, deadline_ms: u64, renew_ms: u64) -> LeaderConfig {
        LeaderConfig {
            namespace: "n".into(),
            name: "l".into(),
            identity: "me".into(),
            duration: Duration::from_secs(duration),
            renew_deadline: Duration::from_millis(deadline_ms),
            renew: Duration::from_millis(renew_ms),
            shards: 1,
        }
    }

    #[test]
    fn renew_deadline_must_be_shorter_than_the_lease() {
        assert_eq!(cfg(10, 6666, 2000).validate(), Ok(()));
        assert!(matches!(
            cfg(4, 4000, 1000).validate(),
            Err(LeaderConfigError::DeadlineNotShorter { .. })
        ));
        assert!(matches!(
            cfg(4, 5000, 1000).validate(),
            Err(LeaderConfigError::DeadlineNotShorter { .. })
        ));
        assert!(matches!(
            cfg(10, 2000, 2000).validate(),
            Err(LeaderConfigError::RenewNotShorter { .. })
        ));
        let e = cfg(4, 5000, 1000).validate().unwrap_err().to_string();
        assert!(e.contains("--leader-renew-deadline") && e.contains("--leader-lease-duration"));
        assert_eq!(
            LeaderConfig::default_renew_deadline(Duration::from_secs(15)),
            Duration::from_secs(10)
        );
        let mut c = cfg(4, 2000, 1000);
        c.duration = Duration::from_millis(4500);
        assert_eq!(c.duration_seconds(), 5, "rounded up");
    }

    #[test]
    fn the_lease_lives_in_the_daemons_own_namespace_by_default() {
        let dir = std::env::temp_dir().join(format!("kscale-lease-ns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("namespace");
        let missing = dir.join("missing");
        assert_eq!(lease_namespace(Some("ops"), &missing), "ops", "the flag");
        assert_eq!(lease_namespace(None, &missing), "default", "outside a pod");
        std::fs::write(&file, "kscale\n").unwrap();
        assert_eq!(lease_namespace(None, &file), "kscale", "the pod's own");
        assert_eq!(
            lease_namespace(Some(" "), &file),
            "kscale",
            "an empty POD_NAMESPACE"
        );
        assert_eq!(lease_namespace(Some("ops"), &file), "ops", "the flag wins");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn each_shard_is_checked_on_its_own() {
        let l = Leadership::always();
        assert_eq!(l.shards(), 1);
        assert_eq!(l.check_for(3), Ok(()), "no election: every write goes");
        l.start_election(6);
        assert_eq!(l.shards(), 6);
        assert!(!l.is_leader());
        l.hold_until(2, Instant::now() + Duration::from_secs(60));
        l.hold_until(4, Instant::now());
        assert_eq!(l.check_for(2), Ok(()));
        let e = l.check_for(4).unwrap_err();
        assert_eq!(
            e,
            NotLeader {
                shard: Some((4, 6))
            },
            "its deadline passed"
        );
        assert!(e.to_string().contains("shard 4 of 6 (--shards)"), "{e}");
        assert!(l.check_for(6).is_err(), "no such shard");
        assert_eq!(l.held(), vec![false, false, true, false, false, false]);
        assert!(l.is_leader());
        // A policy's writes are checked against its own shard.
        let (ns, name) = (0..100)
            .map(|i| ("shop".to_string(), format!("p{i}")))
            .find(|(ns, n)| l.shard_of(ns, n) == 2)
            .unwrap();
        assert_eq!(l.check_policy(&ns, &name), Ok(()));
        let other = (0..100)
            .map(|i| format!("q{i}"))
            .find(|n| l.shard_of("shop", n) != 2)
            .unwrap();
        assert!(l.check_policy("shop", &other).is_err());
        l.lose(2);
        assert!(!l.is_leader());
        // One Lease: the message is today's.
        let one = Leadership::elected();
        assert!(!one.check_for(0).unwrap_err().to_string().contains("shard"));
    }

    #[test]
    fn leadership_lapses_at_its_deadline() {
        assert!(Leadership::always().is_leader());
        let l = Leadership::elected();
        assert_eq!(l.check_for(0), Err(NotLeader { shard: None }));
        l.hold_until(0, Instant::now() + Duration::from_secs(60));
        assert!(l.is_leader());
        l.hold_until(0, Instant::now());
        assert!(!l.is_leader(), "a deadline that passed is not leadership");
        l.hold_until(0, Instant::now() + Duration::from_secs(60));
        l.lose(0);
        assert!(!l.is_leader());
    }
}
