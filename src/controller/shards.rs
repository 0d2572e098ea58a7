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
//! - Every retry period (`--leader-renew`) a replica lists the Leases of its group (one LIST,
//!   label `kscale.dev/lease-group=<lease>`), renews what it holds up to its fair share,
//!   `ceil(N / live replicas)` ([`fair_share`]), releases the rest (emptying the holder, so
//!   another replica takes them at its next round), and takes free or expired shards while under
//!   its share ([`plan`]), starting from an offset of its own so that replicas starting together
//!   do not all race for shard 0. A dead replica's shards expire after the lease duration and
//!   are taken at the next round: failover within lease duration + retry period. A replica
//!   that comes back is seen through its membership Lease; the others' fair share falls and
//!   they release what exceeds it.
//! - [`super::leader::Leadership`] holds, per shard, until the renew deadline after the start
//!   of the round that last renewed it; every write for a policy checks its shard right before
//!   it is made ([`super::leader::Leadership::check_policy`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use futures::FutureExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, ListParams, Preconditions};
use kube::{Client, ResourceExt};
use tracing::{debug, info, warn};

use super::leader::{Elector, LeaderConfig, Leadership, Observation};

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
        }
    }

    /// One round, started at `started`: list the group's Leases, renew the membership Lease,
    /// count the live replicas, then renew, release and acquire shards by [`plan`].
    async fn round(&mut self, started: Instant) -> Result<(), kube::Error> {
        let selector = format!("{GROUP_LABEL}={}", self.cfg.name);
        let leases = self
            .api
            .list(&ListParams::default().labels(&selector))
            .await?
            .items;
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
        for lease in members {
            let name = lease.name_any();
            let Some(spec) = lease.spec.as_ref() else {
                continue;
            };
            let observed = self.others.entry(name.clone()).or_default();
            if observed.expired(spec, self.cfg.duration) {
                // A replica that stopped renewing is gone: its membership Lease is removed
                // (only as read; one that came back recreates its own).
                self.forget_member(&name, &lease).await;
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
                    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty())?;
                    (holder == self.cfg.identity || !elector.expired(spec)).then_some(holder)
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
        // Every write of the round at once (the membership Lease, the releases, the renewals
        // and the attempts), so a slow apiserver delays a renewal by one request, not by the
        // sum of them.
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
                let lease = current[*i as usize].take()?;
                let (api, identity) = (&*api, cfg.identity.as_str());
                Some(async move { super::leader::release_lease(api, identity, lease).await })
            })
            .collect();
        let wanted: HashSet<u32> = plan.renew.iter().chain(&plan.acquire).copied().collect();
        let attempts = shards
            .iter_mut()
            .enumerate()
            .filter_map(|(i, elector)| {
                let i = u32::try_from(i).ok()?;
                wanted.contains(&i).then_some((i, elector))
            })
            .map(|(i, elector)| {
                let lease = current[i as usize].take();
                async move { (i, elector.acquire_from(lease).await) }
            });
        let (renewed, results, ()) = futures::join!(
            member.acquire_from(own),
            futures::future::join_all(attempts),
            futures::future::join_all(releases).map(|_| ()),
        );
        if !plan.release.is_empty() {
            info!(shards = ?plan.release, live = live.len(), fair_share = fair_share(cfg.shards, live.len()), "released shards beyond this replica's fair share");
        }
        let mut now_held = HashSet::new();
        let mut failed = None;
        for (i, result) in results {
            match result {
                Ok(true) => {
                    self.leadership
                        .hold_until(i, started + self.cfg.renew_deadline);
                    now_held.insert(i);
                }
                Ok(false) => self.leadership.lose(i),
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
        debug!(elapsed = ?started.elapsed(), held = ?now_held, live = live.len(), "shard round");
        self.held = now_held;
        failed.map_or(Ok(()), Err)
    }

    /// Deletes the expired membership Lease `name`, conditionally on the version read.
    async fn forget_member(&mut self, name: &str, lease: &Lease) {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: lease.resource_version(),
                uid: lease.uid(),
            }),
            ..DeleteParams::default()
        };
        match self.api.delete(name, &params).await {
            Ok(_) => {
                info!(lease = %name, holder = ?lease.spec.as_ref().and_then(|s| s.holder_identity.clone()), "a replica stopped renewing its membership lease; removed");
                self.others.remove(name);
            }
            Err(e) => {
                debug!(lease = %name, error = %crate::api_error::human(&e), "removing an expired membership lease failed")
            }
        }
    }
}

/// Keeps this replica at its fair share of `cfg.shards` shards, one round every `cfg.renew`;
/// `leadership` holds each shard until the renew deadline after the start of the round that
/// renewed it. A round that takes longer than the renew deadline is abandoned (what it would
/// have renewed has lapsed by then). Runs until the task is dropped.
pub async fn campaign(client: Client, cfg: LeaderConfig, leadership: Leadership) {
    let mut campaign = Campaign::new(client, cfg.clone(), leadership);
    let reported = super::permissions::Once::default();
    loop {
        let started = Instant::now();
        match tokio::time::timeout(cfg.renew_deadline, campaign.round(started)).await {
            Ok(Ok(())) => {
                if reported.clear("lease") {
                    info!(lease = %cfg.name, "lease update works again");
                }
            }
            Ok(Err(e)) => super::leader::lease_failed(&reported, &cfg, &e),
            Err(_) => warn!(
                deadline = ?cfg.renew_deadline,
                "shard lease round took longer than --leader-renew-deadline; abandoned"
            ),
        }
        // Rounds start every retry period (at once after one that took longer), so a slow
        // round does not push the next renewal towards the renew deadline.
        tokio::time::sleep_until((started + cfg.renew).into()).await;
    }
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
