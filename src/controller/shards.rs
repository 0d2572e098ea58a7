//! Sharding (`kscale run --shards N`, N above 1): the policies are spread over N shards, each
//! with a Lease of its own, and the daemon's replicas share the shards out among themselves
//! through those Leases alone (no coordinator of kscale's own).
//!
//! - A policy belongs to shard `fnv1a64("<namespace>/<name>") % N` ([`shard_of`]): 64-bit FNV-1a
//!   over the UTF-8 bytes, a fixed function, so every replica, build and Rust version agrees. The
//!   namespace and name (not the uid) decide, as they key everything else the controller keeps
//!   per policy, and a policy deleted and created again (`kubectl replace --force`, a GitOps
//!   re-sync) stays on its shard instead of moving to another replica.
//! - Shard `i`'s Lease is `<lease>-<i>` ([`shard_lease_name`]), elected as the one leader Lease
//!   is ([`super::leader`]: the same three durations, resourceVersion on every write, each
//!   replica timing a Lease on its own monotonic clock).
//! - Each replica also renews a membership Lease of its own, `<lease>-member-<hash of its
//!   identity>` ([`member_lease_name`]), so a replica that holds no shard yet is seen. The live
//!   replicas are the holders of the member and shard Leases this replica has seen renewed
//!   within their lease duration, itself included.
//! - Every retry period (`--leader-renew`) a replica runs a round: it renews the Leases it
//!   held from the copies its own last writes returned (conditional on their resourceVersion,
//!   without waiting for a read), lists the Leases of its group (one LIST, label
//!   `kscale.dev/lease-group=<lease>`), keeps what it holds up to its fair share,
//!   `ceil(N / live replicas)` ([`fair_share`]), releases the rest (emptying the holder, so
//!   another replica takes them), and takes free or expired shards while under its share
//!   ([`plan`]), starting from an offset of its own so that replicas starting together do not
//!   all race for shard 0 (one that loses a race runs its next round at once).
//! - Failover: a replica also watches the group's Leases, so it sees each renewal when it is
//!   made, not at its next LIST, and times the Lease from then (a sighting is never earlier than
//!   the write, so the judgement stays on this replica's own clock and only a late sighting can
//!   shift it, later). It wakes for a round as soon as a Lease it watches expires or is released
//!   ([`first_due`]), and that round runs from the watch's copies of the Leases instead of a
//!   LIST (its writes carry the resourceVersions read, so a stale copy costs a conflict and a
//!   round, never a second holder), so a dead replica's shards are taken the lease duration
//!   after its last renewal plus one write, rather than up to a retry period and a round later.
//!   Without the watch (it retries with backoff), rounds still see everything through their
//!   LIST, up to a retry period later. A replica that comes back is seen through its
//!   membership Lease; the others' fair share falls and they release what exceeds it, which
//!   the returning replica sees at once.
//! - [`super::leader::Leadership`] holds, per shard, until the renew deadline after the start
//!   of the round that last renewed it; every write for a policy checks its shard right before
//!   it is made ([`super::leader::Leadership::check_policy`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::api::{Api, DeleteParams, ListParams, Preconditions};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, ResourceExt};
use tracing::{debug, info, warn};

use super::leader::{Elector, LeaderConfig, Leadership, Observation, Record};

/// The most shards `--shards` accepts.
pub const MAX_SHARDS: u32 = 256;

/// The label that groups a sharded daemon's Leases (value: `--leader-election-lease`).
pub const GROUP_LABEL: &str = "kscale.dev/lease-group";

/// The label that tells a shard Lease (`shard`) from a membership Lease (`member`).
pub const ROLE_LABEL: &str = "kscale.dev/lease-role";

/// 64-bit FNV-1a of `bytes` (offset basis 0xcbf29ce484222325, prime 0x100000001b3).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The shard of the policy `namespace/name` among `shards`: `fnv1a64("<namespace>/<name>") %
/// shards` (0 with one shard or none).
pub fn shard_of(namespace: &str, name: &str, shards: u32) -> u32 {
    if shards <= 1 {
        return 0;
    }
    let hash = fnv1a64(format!("{namespace}/{name}").as_bytes());
    u32::try_from(hash % u64::from(shards)).unwrap_or(0)
}

/// The Lease of shard `shard`: `<lease>-<shard>`.
pub fn shard_lease_name(lease: &str, shard: u32) -> String {
    format!("{lease}-{shard}")
}

/// The membership Lease of the replica `identity`: `<lease>-member-<fnv1a64(identity) in hex>`
/// (a valid object name whatever the identity; the Lease's holder carries the identity itself).
pub fn member_lease_name(lease: &str, identity: &str) -> String {
    format!("{lease}-member-{:016x}", fnv1a64(identity.as_bytes()))
}

/// The most shards one of `live` replicas holds: `ceil(shards / live)` (all of them when no
/// replica is counted).
pub fn fair_share(shards: u32, live: usize) -> u32 {
    let live = u32::try_from(live.max(1)).unwrap_or(u32::MAX);
    shards.div_ceil(live)
}

/// What one round does with each shard.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Held, within the fair share: renewed.
    pub renew: Vec<u32>,
    /// Held beyond the fair share: released (the highest first go).
    pub release: Vec<u32>,
    /// Free or expired, while under the fair share: tried.
    pub acquire: Vec<u32>,
}

/// The round of the replica `me` given, per shard, its live holder (`None`: free, or its
/// holder's renewal expired) and the number of `live` replicas (`me` included). Free shards are
/// tried from `start` on, wrapping around.
pub fn plan(me: &str, holders: &[Option<String>], live: usize, start: u32) -> Plan {
    let shards = u32::try_from(holders.len()).unwrap_or(u32::MAX);
    let fair = fair_share(shards, live) as usize;
    let mut plan = Plan::default();
    let held: Vec<u32> = (0..shards)
        .filter(|i| holders[*i as usize].as_deref() == Some(me))
        .collect();
    let (keep, extra) = held.split_at(held.len().min(fair));
    plan.renew = keep.to_vec();
    plan.release = extra.iter().rev().copied().collect();
    let want = fair.saturating_sub(keep.len());
    plan.acquire = (0..shards)
        .map(|i| (start.checked_rem(shards).unwrap_or(0) + i) % shards.max(1))
        .filter(|i| holders[*i as usize].is_none())
        .take(want)
        .collect();
    plan
}

/// The labels of the group's Leases with `role`.
fn labels(lease: &str, role: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (GROUP_LABEL.to_string(), lease.to_string()),
        (ROLE_LABEL.to_string(), role.to_string()),
    ])
}

/// The label selector of the group's Leases: `kscale.dev/lease-group=<lease>`.
fn group_selector(lease: &str) -> String {
    format!("{GROUP_LABEL}={lease}")
}

/// The group's Leases as this replica's watch delivers them, between two looks of the
/// campaign: per Lease name, the last record and when it was first seen (at most one entry per
/// Lease of the group).
#[derive(Default)]
struct Sightings {
    seen: std::sync::Mutex<HashMap<String, Observation>>,
    /// Wakes the campaign when something was seen.
    changed: tokio::sync::Notify,
    /// Whether the watch listed the group and has not failed since: its copies of the Leases
    /// are then complete enough for a round to run from them.
    synced: std::sync::atomic::AtomicBool,
}

impl Sightings {
    /// The Lease `name` was seen holding `spec` at `at`.
    fn record(&self, name: String, spec: &LeaseSpec, at: Instant) {
        if let Ok(mut seen) = self.seen.lock() {
            seen.entry(name).or_default().seen(Record::of(spec), at);
        }
        self.changed.notify_one();
    }

    /// What was seen since the last call.
    fn take(&self) -> HashMap<String, Observation> {
        self.seen
            .lock()
            .map(|mut seen| std::mem::take(&mut *seen))
            .unwrap_or_default()
    }
}

/// Watches the group's Leases, so that each renewal (and each release) is seen when it is
/// made rather than at this replica's next round, and a dead replica's Leases are judged
/// expired on time. Runs for ever (the watch retries with backoff); while it fails, rounds
/// still see every Lease through their own LIST, later.
async fn watch_group(
    api: Api<Lease>,
    cfg: LeaderConfig,
    sightings: Arc<Sightings>,
    copies: reflector::store::Writer<Lease>,
) {
    use std::sync::atomic::Ordering;
    let lease = cfg.name;
    let config = watcher::Config::default().labels(&group_selector(&lease));
    let stream = reflector::reflector(copies, watcher(api, config).default_backoff());
    futures::pin_mut!(stream);
    let reported = super::permissions::Once::default();
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(l) | watcher::Event::InitApply(l)) => {
                let at = Instant::now();
                if let Some(spec) = l.spec.as_ref() {
                    sightings.record(l.name_any(), spec, at);
                }
                if reported.clear("watch") {
                    info!(%lease, "watching the shard leases works again");
                }
            }
            Ok(watcher::Event::InitDone) => sightings.synced.store(true, Ordering::Relaxed),
            Ok(_) => {}
            Err(e) => {
                sightings.synced.store(false, Ordering::Relaxed);
                let error = match &e {
                    watcher::Error::InitialListFailed(k)
                    | watcher::Error::WatchStartFailed(k)
                    | watcher::Error::WatchFailed(k) => super::permissions::explain(
                        k,
                        super::permissions::Access::Lease {
                            namespace: &cfg.namespace,
                        },
                    ),
                    other => crate::api_error::human_watch(other).to_string(),
                };
                if reported.first("watch", &error) {
                    warn!(%lease, %error, "watching the shard leases failed: a dead replica's shards are taken over up to a retry period (--leader-renew) later meanwhile (retrying with backoff)");
                } else {
                    debug!(%error, "watching the shard leases failed again");
                }
            }
        }
    }
}

/// One replica's campaign for its share of the shards.
struct Campaign {
    api: Api<Lease>,
    cfg: LeaderConfig,
    leadership: Leadership,
    /// One candidate per shard Lease.
    shards: Vec<Elector>,
    /// This replica's membership Lease.
    member: Elector,
    /// The other replicas' membership Leases, as observed.
    others: HashMap<String, Observation>,
    /// Where this replica starts looking for free shards.
    start: u32,
    /// The shards this replica held after the last round (for the log).
    held: HashSet<u32>,
    /// When the last round judged the Leases it listed (when it started, if its LIST failed).
    judged: Option<Instant>,
}

impl Campaign {
    fn new(client: Client, cfg: LeaderConfig, leadership: Leadership) -> Campaign {
        let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
        let shards = (0..cfg.shards)
            .map(|i| {
                let lease = LeaderConfig {
                    name: shard_lease_name(&cfg.name, i),
                    ..cfg.clone()
                };
                Elector::new(api.clone(), lease, Some(labels(&cfg.name, "shard")))
            })
            .collect();
        let member = Elector::new(
            api.clone(),
            LeaderConfig {
                name: member_lease_name(&cfg.name, &cfg.identity),
                ..cfg.clone()
            },
            Some(labels(&cfg.name, "member")),
        );
        let start = u32::try_from(fnv1a64(cfg.identity.as_bytes()) % u64::from(cfg.shards.max(1)))
            .unwrap_or(0);
        Campaign {
            api,
            cfg,
            leadership,
            shards,
            member,
            others: HashMap::new(),
            start,
            held: HashSet::new(),
            judged: None,
        }
    }

    /// Takes in what the watch saw since the last look: each shard Lease's and each other
    /// replica's membership Lease's records, at the instants they were seen.
    fn take_sightings(&mut self, sightings: &Sightings) {
        let member_prefix = format!("{}-member-", self.cfg.name);
        let own = member_lease_name(&self.cfg.name, &self.cfg.identity);
        for (name, seen) in sightings.take() {
            if let Some(i) = name
                .strip_prefix(&format!("{}-", self.cfg.name))
                .and_then(|i| i.parse::<usize>().ok())
                && let Some(elector) = self.shards.get_mut(i)
            {
                elector.observed().merge(seen);
            } else if name.starts_with(&member_prefix) && name != own {
                self.others.entry(name).or_default().merge(seen);
            }
        }
    }

    /// The first instant, after the last round judged the Leases, from which one of them may
    /// be taken or stops counting as live, as far as this replica has seen: another replica's
    /// shard or membership Lease expiring, or a shard seen released. `None`: nothing due.
    fn next_due(&self) -> Option<Instant> {
        let observed = self
            .shards
            .iter()
            .map(Elector::observation)
            .chain(self.others.values());
        first_due(observed, &self.cfg.identity, self.cfg.duration, self.judged)
    }

    /// One round, started at `started`: list the group's Leases, renew the membership Lease,
    /// count the live replicas, then renew, release and acquire shards by [`plan`]. Returns
    /// whether an attempt to take a shard lost to another replica (the shard it will try next
    /// may be free: the next round need not wait).
    async fn round(
        &mut self,
        started: Instant,
        watched: Option<Vec<Lease>>,
    ) -> Result<bool, kube::Error> {
        // Whatever comes of the LIST, what was due by now is not waited for again.
        self.judged = Some(started);
        // What this replica held is renewed from the copies its last writes returned while the
        // LIST is under way, so a slow LIST does not eat into the renew deadline.
        let params = ListParams::default().labels(&group_selector(&self.cfg.name));
        let Campaign {
            api,
            shards,
            member,
            held,
            leadership,
            cfg,
            ..
        } = self;
        let (leadership, until) = (&*leadership, started + cfg.renew_deadline);
        let renewals = shards
            .iter_mut()
            .enumerate()
            .filter_map(|(i, elector)| {
                let i = u32::try_from(i).ok()?;
                held.contains(&i).then_some((i, elector))
            })
            .map(|(i, elector)| async move {
                let renewed = elector.renew_held().await;
                if matches!(renewed, Some(Ok(true))) {
                    // Held at once, not when the LIST is back.
                    leadership.hold_until(i, until);
                }
                (i, renewed)
            });
        let list = async {
            match watched {
                Some(items) => Ok(items),
                None => api.list(&params).await.map(|l| l.items),
            }
        };
        let (listed, renewed_early, member_renewed) = futures::join!(
            list,
            futures::future::join_all(renewals),
            member.renew_held(),
        );
        // Renewed: held until the renew deadline. Anything else is tried again below from the
        // Lease as listed.
        let renewed_early: HashSet<u32> = renewed_early
            .into_iter()
            .filter(|(_, r)| matches!(r, Some(Ok(true))))
            .map(|(i, _)| i)
            .collect();
        let member_renewed = matches!(member_renewed, Some(Ok(true)));
        let leases = listed?;
        let now = Instant::now();
        let listed = now.duration_since(started);
        self.judged = Some(now);
        let mut by_name: HashMap<String, Lease> =
            leases.into_iter().map(|l| (l.name_any(), l)).collect();
        let member_name = member_lease_name(&self.cfg.name, &self.cfg.identity);
        let own = by_name.remove(&member_name);
        let mut live: HashSet<String> = HashSet::from([self.cfg.identity.clone()]);
        let member_prefix = format!("{}-member-", self.cfg.name);
        let members: Vec<Lease> = by_name
            .iter()
            .filter(|(n, _)| n.starts_with(&member_prefix))
            .map(|(_, l)| l.clone())
            .collect();
        self.others
            .retain(|n, _| members.iter().any(|l| l.name_any() == *n));
        // A replica that stopped renewing is gone: its membership Lease is removed (only as
        // read; one that came back recreates its own).
        let mut gone = Vec::new();
        for lease in members {
            let Some(spec) = lease.spec.as_ref() else {
                continue;
            };
            let observed = self.others.entry(lease.name_any()).or_default();
            if observed.expired_at(spec, self.cfg.duration, now) {
                gone.push(lease);
            } else if let Some(holder) = spec.holder_identity.clone() {
                live.insert(holder);
            }
        }
        let mut current: Vec<Option<Lease>> = Vec::with_capacity(self.shards.len());
        let mut holders: Vec<Option<String>> = Vec::with_capacity(self.shards.len());
        for (i, elector) in self.shards.iter_mut().enumerate() {
            let lease = by_name.remove(&shard_lease_name(
                &self.cfg.name,
                u32::try_from(i).unwrap_or(u32::MAX),
            ));
            let holder = lease
                .as_ref()
                .and_then(|l| l.spec.as_ref())
                .and_then(|spec| {
                    let expired = elector.observed().expired_at(spec, self.cfg.duration, now);
                    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty())?;
                    (holder == self.cfg.identity || !expired).then_some(holder)
                });
            if let Some(h) = &holder {
                live.insert(h.clone());
            }
            holders.push(holder);
            current.push(lease);
        }
        let plan = plan(&self.cfg.identity, &holders, live.len(), self.start);
        for i in plan.release.iter().copied() {
            // Stop writing first, then hand the Lease over.
            self.leadership.lose(i);
        }
        // Every write of the round at once (the membership Lease, the removals of dead
        // replicas' membership Leases, the releases, the renewals and the attempts), so a slow
        // apiserver delays a renewal or a takeover by one request, not by the sum of them.
        let Campaign {
            api,
            cfg,
            shards,
            member,
            ..
        } = self;
        let releases: Vec<_> = plan
            .release
            .iter()
            .filter_map(|i| {
                // The copy this round's renewal returned is newer than the one listed.
                let written = shards.get_mut(*i as usize)?.take_written();
                let lease = written.or_else(|| current[*i as usize].take())?;
                let (api, identity) = (&*api, cfg.identity.as_str());
                Some(async move { super::leader::release_lease(api, identity, lease).await })
            })
            .collect();
        let removals = gone.iter().map(|lease| forget_member(api, lease));
        let wanted: HashSet<u32> = plan.renew.iter().chain(&plan.acquire).copied().collect();
        let attempts = shards
            .iter_mut()
            .enumerate()
            .filter_map(|(i, elector)| {
                let i = u32::try_from(i).ok()?;
                (wanted.contains(&i) && !renewed_early.contains(&i)).then_some((i, elector))
            })
            .map(|(i, elector)| {
                let lease = current[i as usize].take();
                async move { (i, elector.acquire_from(lease).await) }
            });
        let member_renewal = async {
            if member_renewed {
                Ok(true)
            } else {
                member.acquire_from(own).await
            }
        };
        let (renewed, results, (), removed) = futures::join!(
            member_renewal,
            futures::future::join_all(attempts),
            futures::future::join_all(releases).map(|_| ()),
            futures::future::join_all(removals),
        );
        for name in removed.into_iter().flatten() {
            self.others.remove(&name);
        }
        if !plan.release.is_empty() {
            info!(shards = ?plan.release, live = live.len(), fair_share = fair_share(self.cfg.shards, live.len()), "released shards beyond this replica's fair share");
        }
        let mut now_held: HashSet<u32> = renewed_early
            .iter()
            .filter(|i| wanted.contains(i))
            .copied()
            .collect();
        let mut failed = None;
        let mut lost_race = false;
        for (i, result) in results {
            match result {
                Ok(true) => {
                    self.leadership
                        .hold_until(i, started + self.cfg.renew_deadline);
                    now_held.insert(i);
                }
                Ok(false) => {
                    self.leadership.lose(i);
                    lost_race |= plan.acquire.contains(&i);
                }
                Err(e) => {
                    // Not renewed this round: held until its renew deadline lapses, as with
                    // one Lease.
                    if self.held.contains(&i) {
                        now_held.insert(i);
                    }
                    failed = Some(e);
                }
            }
        }
        for i in (0..self.cfg.shards).filter(|i| !wanted.contains(i)) {
            self.leadership.lose(i);
        }
        match renewed {
            Ok(true) => {}
            Ok(false) => {
                debug!(lease = %member_name, "the membership lease was not renewed this round")
            }
            Err(e) => failed = Some(e),
        }
        for i in now_held.difference(&self.held) {
            info!(identity = %self.cfg.identity, shard = i, lease = %shard_lease_name(&self.cfg.name, *i), "took a shard");
        }
        for i in self.held.difference(&now_held) {
            if !plan.release.contains(i) {
                warn!(identity = %self.cfg.identity, shard = i, "lost a shard to another instance");
            }
        }
        debug!(?listed, elapsed = ?started.elapsed(), held = ?now_held, live = live.len(), "shard round");
        self.held = now_held;
        failed.map_or(Ok(lost_race), Err)
    }
}

/// The first instant after `judged` from which one of the Leases `observed` (none held by `me`)
/// may be taken or stops counting as live, their lease duration being `duration` unless they
/// state one ([`Observation::due`]). Instants up to `judged` were judged by a round already.
fn first_due<'a>(
    observed: impl IntoIterator<Item = &'a Observation>,
    me: &str,
    duration: Duration,
    judged: Option<Instant>,
) -> Option<Instant> {
    observed
        .into_iter()
        .filter(|o| o.holder() != Some(me))
        .filter_map(|o| o.due(duration))
        .filter(|due| judged.is_none_or(|judged| *due > judged))
        .min()
}

/// Deletes the expired membership Lease `lease` (as read), conditionally on the version read;
/// its name when it is gone.
async fn forget_member(api: &Api<Lease>, lease: &Lease) -> Option<String> {
    let name = lease.name_any();
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: lease.resource_version(),
            uid: lease.uid(),
        }),
        ..DeleteParams::default()
    };
    match api.delete(&name, &params).await {
        Ok(_) => {
            info!(lease = %name, holder = ?lease.spec.as_ref().and_then(|s| s.holder_identity.clone()), "a replica stopped renewing its membership lease; removed");
            Some(name)
        }
        Err(e) => {
            debug!(lease = %name, error = %crate::api_error::human(&e), "removing an expired membership lease failed");
            None
        }
    }
}

/// How long after a Lease's expiry the campaign wakes to take it: its expiry is strict (past
/// the lease duration), and a timer may fire a little early.
const DUE_MARGIN: Duration = Duration::from_millis(5);

/// Keeps this replica at its fair share of `cfg.shards` shards; `leadership` holds each shard
/// until the renew deadline after the start of the round that renewed it. A round runs every
/// retry period (`cfg.renew`), and also as soon as a Lease becomes takeable as the watch of the
/// group's Leases saw it (another replica's expiring, one released), and at once after an
/// attempt that lost a shard to another replica. A round that takes longer than the renew
/// deadline is abandoned (what it would have renewed has lapsed by then). Runs until the task
/// is dropped.
pub async fn campaign(client: Client, cfg: LeaderConfig, leadership: Leadership) {
    let sightings = Arc::new(Sightings::default());
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let (copies, writer) = reflector::store();
    let watch = watch_group(api, cfg.clone(), sightings.clone(), writer);
    let rounds = async {
        let mut campaign = Campaign::new(client, cfg.clone(), leadership);
        let reported = super::permissions::Once::default();
        // Rounds started at once in a row after lost races: each lost race is another
        // replica's gain, so they end; bounded all the same.
        let mut retries = 0;
        // Whether the round was woken by a Lease becoming takeable.
        let mut woken = false;
        loop {
            let started = Instant::now();
            campaign.take_sightings(&sightings);
            // Woken by a Lease becoming takeable, a round runs from the watch's copies of the
            // group's Leases (when the watch is synced) rather than waiting for a LIST: the
            // copies are at least as fresh as what told it to wake, and every write carries
            // the resourceVersion it read, so a stale copy costs a conflict, never a double
            // holder. Other rounds LIST.
            let watched = (woken && sightings.synced.load(std::sync::atomic::Ordering::Relaxed))
                .then(|| copies.state().iter().map(|l| Lease::clone(l)).collect());
            let mut again = false;
            match tokio::time::timeout(cfg.renew_deadline, campaign.round(started, watched)).await {
                Ok(Ok(lost_race)) => {
                    if reported.clear("lease") {
                        info!(lease = %cfg.name, "lease update works again");
                    }
                    again = lost_race && retries < cfg.shards;
                }
                Ok(Err(e)) => super::leader::lease_failed(&reported, &cfg, &e),
                Err(_) => warn!(
                    deadline = ?cfg.renew_deadline,
                    "shard lease round took longer than --leader-renew-deadline; abandoned"
                ),
            }
            woken = false;
            if again {
                retries += 1;
                continue;
            }
            retries = 0;
            // Rounds start every retry period (at once after one that took longer), so a slow
            // round does not push the next renewal towards the renew deadline; earlier when a
            // Lease becomes takeable.
            let regular = started + cfg.renew;
            loop {
                campaign.take_sightings(&sightings);
                let due = campaign.next_due().map(|due| due + DUE_MARGIN);
                let wake = due.map_or(regular, |due| due.min(regular));
                tokio::select! {
                    () = tokio::time::sleep_until(wake.into()) => {
                        // A Lease became takeable first (or both are past: a slow round).
                        woken = due.is_some_and(|due| due <= regular);
                        break;
                    }
                    () = sightings.changed.notified() => {}
                }
            }
        }
    };
    // The watch never ends, nor do the rounds: both run until the task is dropped.
    futures::join!(watch, rounds);
}

/// Releases every shard Lease this replica holds and deletes its membership Lease, so the
/// others take its shards over at their next round.
pub async fn release_all(client: &Client, cfg: &LeaderConfig) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    for i in 0..cfg.shards {
        if let Ok(Some(lease)) = api.get_opt(&shard_lease_name(&cfg.name, i)).await {
            super::leader::release_lease(&api, &cfg.identity, lease).await;
        }
    }
    let member = member_lease_name(&cfg.name, &cfg.identity);
    if let Err(e) = api.delete(&member, &DeleteParams::default()).await {
        debug!(lease = %member, error = %crate::api_error::human(&e), "deleting the membership lease failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_fnv1a_and_never_changes() {
        // The published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        // Policies' shards, fixed for ever: a change would move policies between replicas
        // of different versions during a rolling upgrade.
        assert_eq!(shard_of("default", "web", 6), 1);
        let fixed: Vec<u32> = (0..8)
            .map(|i| shard_of("shop", &format!("p{i}"), 6))
            .collect();
        assert_eq!(fixed, FIXED_SHARDS);
        assert_eq!(shard_of("shop", "p0", 1), 0);
        assert_eq!(shard_of("shop", "p0", 0), 0);
    }

    const FIXED_SHARDS: [u32; 8] = [4, 5, 2, 3, 0, 1, 4, 5];

    #[test]
    fn the_hash_spreads_policies_evenly() {
        let mut counts = [0u32; 6];
        for i in 0..6000 {
            counts[shard_of("ns", &format!("policy-{i}"), 6) as usize] += 1;
        }
        assert!(
            counts.iter().all(|c| (800..=1200).contains(c)),
            "{counts:?}"
        );
    }

    #[test]
    fn lease_names() {
        assert_eq!(shard_lease_name("kscale-leader", 5), "kscale-leader-5");
        let m = member_lease_name("kscale-leader", "Pod_Name/ÿ");
        assert!(
            m.starts_with("kscale-leader-member-") && m.len() == 21 + 16,
            "{m}"
        );
        assert!(
            m.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
    }

    #[test]
    fn fair_share_is_the_ceiling() {
        assert_eq!(fair_share(6, 3), 2);
        assert_eq!(fair_share(6, 4), 2);
        assert_eq!(fair_share(6, 5), 2);
        assert_eq!(fair_share(6, 7), 1);
        assert_eq!(fair_share(7, 3), 3);
        assert_eq!(fair_share(6, 1), 6);
        assert_eq!(fair_share(6, 0), 6, "no replica counted: all");
    }

    fn holders(v: &[Option<&str>]) -> Vec<Option<String>> {
        v.iter().map(|h| h.map(str::to_string)).collect()
    }

    #[test]
    fn a_replica_alone_takes_every_shard() {
        let p = plan("a", &holders(&[None; 6]), 1, 4);
        assert_eq!(p.acquire, vec![4, 5, 0, 1, 2, 3], "from its own offset");
        assert!(p.renew.is_empty() && p.release.is_empty());
    }

    #[test]
    fn a_replica_over_its_share_releases_the_rest() {
        let all = holders(&[Some("a"); 6]);
        // b and c appeared: a keeps 2.
        let p = plan("a", &all, 3, 0);
        assert_eq!(p.renew, vec![0, 1]);
        assert_eq!(p.release, vec![5, 4, 3, 2]);
        assert!(p.acquire.is_empty());
        // b takes what is free, up to its share, never a live holder's shard.
        let h = holders(&[Some("a"), Some("a"), None, None, None, None]);
        let p = plan("b", &h, 3, 1);
        assert_eq!(p.acquire, vec![2, 3]);
        let h = holders(&[Some("a"), Some("a"), Some("b"), Some("b"), None, None]);
        let p = plan("c", &h, 3, 0);
        assert_eq!(p.acquire, vec![4, 5]);
    }

    fn spec(holder: &str, renewed: &str) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_string()).filter(|h| !h.is_empty()),
            renew_time: (!holder.is_empty()).then(|| {
                k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(renewed.parse().unwrap())
            }),
            lease_duration_seconds: Some(4),
            ..LeaseSpec::default()
        }
    }

    /// Issue 17 (failover within lease duration + interval): a renewal the watch saw when it
    /// was made is judged from then, however late a round's LIST sees it, so a dead replica's
    /// shard is due its lease duration after its last renewal, and the campaign wakes then.
    /// The clock is faked by passing instants.
    #[test]
    fn a_shard_is_due_a_lease_duration_after_the_renewal_was_seen() {
        let (d, at) = (Duration::from_secs(4), clock());
        let renewed = spec("c", "2026-11-30T14:00:00Z");
        // The watch saw c's last renewal at 0 ms; the campaign takes the sighting in.
        let sightings = Sightings::default();
        sightings.record("l-4".into(), &renewed, at(0));
        let mut shard = Observation::default();
        for (name, seen) in sightings.take() {
            assert_eq!(name, "l-4");
            shard.merge(seen);
        }
        assert!(sightings.take().is_empty(), "taken once");
        // A round lists 900 ms later: the same record keeps its first sighting.
        assert!(!shard.expired_at(&renewed, d, at(900)));
        assert_eq!(shard.due(d), Some(at(4000)));
        // Due strictly after the lease duration.
        assert!(!shard.expired_at(&renewed, d, at(4000)));
        assert!(shard.expired_at(&renewed, d, at(4001)));
        // The campaign wakes then (a round at 900 ms judged what was due by then), and not
        // again once a round judged it.
        assert_eq!(first_due([&shard], "a", d, Some(at(900))), Some(at(4000)));
        assert_eq!(first_due([&shard], "a", d, Some(at(4001))), None);
        // Its own Leases are never waited on.
        assert_eq!(first_due([&shard], "c", d, Some(at(900))), None);
    }

    #[test]
    fn a_late_or_stale_sighting_only_delays_an_expiry() {
        let (d, at) = (Duration::from_secs(4), clock());
        let first = spec("c", "2026-11-30T14:00:00Z");
        let second = spec("c", "2026-11-30T14:00:01Z");
        let mut o = Observation::default();
        // A round saw the first record, then the watch the renewal: the clock restarts.
        assert!(!o.expired_at(&first, d, at(0)));
        o.merge(observed(&second, at(1000)));
        assert_eq!(o.due(d), Some(at(5000)));
        // A sighting of the first record made before the renewal's is stale: ignored.
        o.merge(observed(&first, at(500)));
        assert_eq!(o.due(d), Some(at(5000)));
        // An earlier sighting of the same record (the watch's, taken in after a LIST's) wins.
        o.merge(observed(&second, at(800)));
        assert_eq!(o.due(d), Some(at(4800)));
        // A LIST that returns an older record later than the watch saw the newer one (it read
        // before the renewal) restarts the clock: later, never earlier.
        assert!(!o.expired_at(&first, d, at(1200)));
        assert_eq!(o.due(d), Some(at(5200)));
        // Judging a record other than the one kept (seen later) never says expired.
        let mut o = Observation::default();
        o.merge(observed(&second, at(9000)));
        assert!(!o.expired_at(&first, d, at(8000)));
        // The lease duration the Lease states is used.
        let mut long = spec("c", "2026-11-30T14:00:00Z");
        long.lease_duration_seconds = Some(10);
        let mut o = Observation::default();
        assert!(!o.expired_at(&long, d, at(0)));
        assert!(!o.expired_at(&long, d, at(9000)));
        assert!(o.expired_at(&long, d, at(10_001)));
    }

    #[test]
    fn a_released_shard_is_due_when_seen_free() {
        let (d, at) = (Duration::from_secs(4), clock());
        let mut o = Observation::default();
        assert!(!o.expired_at(&spec("a", "2026-11-30T14:00:00Z"), d, at(0)));
        // The watch sees it released at 300 ms, after the round at 100 ms: wake at once.
        o.merge(observed(&spec("", ""), at(300)));
        assert_eq!(o.holder(), None);
        assert_eq!(first_due([&o], "c", d, Some(at(100))), Some(at(300)));
        assert!(o.expired_at(&spec("", ""), d, at(301)), "free: takeable");
        assert_eq!(first_due([&o], "c", d, Some(at(301))), None);
        // Of several, the first.
        let mut late = Observation::default();
        late.merge(observed(&spec("b", "2026-11-30T14:00:00Z"), at(200)));
        assert_eq!(first_due([&late, &o], "c", d, Some(at(100))), Some(at(300)));
        assert_eq!(
            first_due([&late, &o], "c", d, Some(at(301))),
            Some(at(4200))
        );
    }

    /// A fake clock: the instant `ms` milliseconds after the test's start.
    fn clock() -> impl Fn(u64) -> Instant {
        let t0 = Instant::now();
        move |ms| t0 + Duration::from_millis(ms)
    }

    fn observed(spec: &LeaseSpec, at: Instant) -> Observation {
        let mut o = Observation::default();
        o.seen(Record::of(spec), at);
        o
    }

    #[test]
    fn a_dead_replicas_shards_are_shared_out() {
        // c died: its shards 4 and 5 expired; a and b now have a share of 3 each.
        let h = holders(&[Some("a"), Some("a"), Some("b"), Some("b"), None, None]);
        assert_eq!(plan("a", &h, 2, 0).acquire, vec![4]);
        assert_eq!(plan("b", &h, 2, 5).acquire, vec![5]);
        // Whoever is quicker may take both sides' shard; the other's share stays unmet
        // until the next round, and no shard is ever held twice.
        let h = holders(&[Some("a"), Some("a"), Some("b"), Some("b"), Some("a"), None]);
        assert_eq!(plan("b", &h, 2, 0).acquire, vec![5]);
        assert!(plan("a", &h, 2, 0).acquire.is_empty());
    }
}
