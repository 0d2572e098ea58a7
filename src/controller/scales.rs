//! The targets' scale, read from the apiserver only when the target changed.
//!
//! Reading `<target>/scale` at every evaluation costs one request per policy per interval
//! (10,000 policies at 10 s: 1,000 a second). The scale subresource cannot be watched, but its
//! `resourceVersion` is the target object's, so the daemon watches the targets' metadata (one
//! watch per kind, started at the first target of that kind; names and resourceVersions only)
//! and keeps the last scale it read of each target. A read is answered from that copy while the
//! watch shows the same resourceVersion, and from a `GET` otherwise: a target the watch has not
//! listed yet, a kind it cannot watch (no `list`/`watch` grant: the `GET` goes on working), a
//! target that changed, or one kscale just wrote. A copy the watch has not caught up with is
//! harmless: every scale write carries the resourceVersion it read, so a stale one gets 409
//! Conflict and a fresh read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tracing::{info, warn};

use crate::actuate::{ActuateError, ScaleState, ScaleTarget};

/// (namespace, name) of a target.
type ObjectKey = (String, String);

/// (group, version, plural) of a target kind.
type KindKey = (String, String, String);

/// Where the scale comes from.
pub enum Scales {
    /// A `GET` per read (one-shot callers such as `kscale dry-run`).
    Reading,
    /// Watched targets' metadata, and the last scale read of each.
    Watching(Watched),
}

/// The metadata watches and the scales read.
pub struct Watched {
    client: Client,
    /// Watch only this namespace (all when `None`), as the policies are.
    namespace: Option<String>,
    kinds: Mutex<HashMap<KindKey, Arc<KindWatch>>>,
}

/// One kind's watch and the scales last read of its objects.
#[derive(Default)]
struct KindWatch {
    /// Each object's resourceVersion as the watch last saw it; `None` until the first list is
    /// complete (and again while a relist runs after the watch broke).
    versions: RwLock<Option<HashMap<ObjectKey, String>>>,
    /// The last scale read of each object.
    scales: Mutex<HashMap<ObjectKey, ScaleState>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for KindWatch {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Scales {
    /// Watches targets in `namespace` (all namespaces when `None`), each kind from its first
    /// read on. Watches start on the current runtime and stop when this is dropped.
    pub fn watching(client: Client, namespace: Option<&str>) -> Scales {
        Scales::Watching(Watched {
            client,
            namespace: namespace.map(str::to_string),
            kinds: Mutex::default(),
        })
    }

    /// The scale of `target`: the copy last read while the watch shows it unchanged, else a
    /// `GET`.
    pub async fn read(&self, target: &ScaleTarget) -> Result<ScaleState, ActuateError> {
        let Scales::Watching(watched) = self else {
            return target.read().await;
        };
        let kind = watched.kind(target);
        let key = (target.namespace.clone(), target.reference.name.clone());
        if let Some(copy) = kind.fresh(&key) {
            return Ok(copy);
        }
        let scale = target.read().await?;
        lock(&kind.scales).insert(key, scale.clone());
        Ok(scale)
    }

    /// Forgets the copy of `target`'s scale (after a write: the next read is a `GET`).
    pub fn forget(&self, target: &ScaleTarget) {
        if let Scales::Watching(watched) = self {
            let key = (target.namespace.clone(), target.reference.name.clone());
            lock(&watched.kind(target).scales).remove(&key);
        }
    }
}

impl Watched {
    /// The watch of `target`'s kind, started on first use.
    fn kind(&self, target: &ScaleTarget) -> Arc<KindWatch> {
        let resource = target.resource();
        let key = (
            resource.group.clone(),
            resource.version.clone(),
            resource.plural.clone(),
        );
        let mut kinds = lock(&self.kinds);
        if let Some(kind) = kinds.get(&key) {
            return kind.clone();
        }
        let kind = Arc::new(KindWatch::default());
        let task = tokio::spawn(watch(
            self.client.clone(),
            self.namespace.clone(),
            resource.clone(),
            Arc::downgrade(&kind),
        ));
        *lock(&kind.task) = Some(task);
        kinds.insert(key, kind.clone());
        kind
    }
}

impl KindWatch {
    /// The copy of `key`'s scale, if the watch has listed the kind and shows the object at the
    /// copy's resourceVersion.
    fn fresh(&self, key: &ObjectKey) -> Option<ScaleState> {
        let versions = self.versions.read().ok()?;
        let seen = versions.as_ref()?.get(key)?;
        let scales = lock(&self.scales);
        let copy = scales.get(key)?;
        (copy.resource_version.as_ref() == Some(seen)).then(|| copy.clone())
    }

    /// Stops serving copies until the next complete list.
    fn invalidate(&self) {
        let mut versions = match self.versions.write() {
            Ok(v) => v,
            Err(poisoned) => poisoned.into_inner(),
        };
        *versions = None;
    }

    /// Takes in one watch event.
    fn apply(
        &self,
        event: watcher::Event<(ObjectKey, Option<String>)>,
        relist: &mut Option<HashMap<ObjectKey, String>>,
    ) {
        let mut versions = match self.versions.write() {
            Ok(v) => v,
            Err(poisoned) => poisoned.into_inner(),
        };
        match event {
            // A relist: until it is complete no copy can be trusted (an update may have been
            // missed while the watch was down).
            watcher::Event::Init => {
                *relist = Some(HashMap::new());
                *versions = None;
            }
            watcher::Event::InitApply((key, Some(rv))) => {
                if let Some(list) = relist.as_mut() {
                    list.insert(key, rv);
                }
            }
            watcher::Event::InitDone => {
                let list = relist.take().unwrap_or_default();
                // Copies of objects gone meanwhile are dropped with them.
                lock(&self.scales).retain(|k, _| list.contains_key(k));
                *versions = Some(list);
            }
            watcher::Event::Apply((key, Some(rv))) => {
                if let Some(v) = versions.as_mut() {
                    v.insert(key, rv);
                }
            }
            watcher::Event::Delete((key, _)) => {
                if let Some(v) = versions.as_mut() {
                    v.remove(&key);
                }
                lock(&self.scales).remove(&key);
            }
            // No resourceVersion: nothing to compare with.
            watcher::Event::InitApply((_, None)) => {}
            watcher::Event::Apply((key, None)) => {
                if let Some(v) = versions.as_mut() {
                    v.remove(&key);
                }
            }
        }
    }
}

/// A watch event as (namespace, name) and resourceVersion.
fn versions_of<K: kube::Resource>(
    event: watcher::Event<K>,
) -> watcher::Event<(ObjectKey, Option<String>)> {
    let version = |meta: K| {
        (
            (meta.namespace().unwrap_or_default(), meta.name_any()),
            meta.meta().resource_version.clone(),
        )
    };
    match event {
        watcher::Event::Apply(o) => watcher::Event::Apply(version(o)),
        watcher::Event::Delete(o) => watcher::Event::Delete(version(o)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(o) => watcher::Event::InitApply(version(o)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// Runs the metadata watch of one kind until its [`KindWatch`] is dropped.
async fn watch(
    client: Client,
    namespace: Option<String>,
    resource: ApiResource,
    kind: std::sync::Weak<KindWatch>,
) {
    // Metadata only: names and resourceVersions are all that is kept.
    let api: Api<PartialObjectMeta<DynamicObject>> = match &namespace {
        Some(ns) => Api::namespaced_with(client, ns, &resource),
        None => Api::all_with(client, &resource),
    };
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    let mut relist = None;
    let mut failing = false;
    while let Some(event) = stream.next().await {
        let Some(kind) = kind.upgrade() else { return };
        match event {
            Ok(event) => {
                if std::mem::take(&mut failing) {
                    info!(kind = %resource.kind, "the targets' metadata watch works again");
                }
                kind.apply(versions_of(event), &mut relist);
            }
            Err(e) => {
                // Broken: updates may be missed from here on, so no copy is served until the
                // watch has listed again.
                kind.invalidate();
                if !std::mem::replace(&mut failing, true) {
                    warn!(kind = %resource.kind, error = %crate::api_error::human_watch(&e), "watching the targets' metadata failed: their scale is read at every evaluation meanwhile (grant list and watch on the kind to spare those reads; retrying with backoff)");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scale(rv: &str) -> ScaleState {
        ScaleState {
            spec_replicas: 2,
            status_replicas: 2,
            selector: Some("app=web".into()),
            resource_version: Some(rv.into()),
        }
    }

    fn key(name: &str) -> ObjectKey {
        ("ns".into(), name.into())
    }

    /// The copy of a scale is used only while the watch shows the target at the copy's
    /// resourceVersion; before the first list, after a change, a deletion or a relist that
    /// lost the object, the scale is read again.
    #[test]
    fn a_copy_serves_only_while_the_watch_shows_it_unchanged() {
        let kind = KindWatch::default();
        let mut relist = None;
        lock(&kind.scales).insert(key("web"), scale("7"));
        assert_eq!(kind.fresh(&key("web")), None, "not listed yet");
        kind.apply(watcher::Event::Init, &mut relist);
        kind.apply(
            watcher::Event::InitApply((key("web"), Some("7".into()))),
            &mut relist,
        );
        assert_eq!(kind.fresh(&key("web")), None, "the list is not complete");
        kind.apply(watcher::Event::InitDone, &mut relist);
        assert_eq!(kind.fresh(&key("web")), Some(scale("7")));
        assert_eq!(kind.fresh(&key("api")), None, "never read");

        // Someone scaled it (or its status moved): read again.
        kind.apply(
            watcher::Event::Apply((key("web"), Some("8".into()))),
            &mut relist,
        );
        assert_eq!(kind.fresh(&key("web")), None);
        lock(&kind.scales).insert(key("web"), scale("8"));
        assert_eq!(kind.fresh(&key("web")), Some(scale("8")));

        // Deleted: the copy goes with it.
        kind.apply(
            watcher::Event::Delete((key("web"), Some("8".into()))),
            &mut relist,
        );
        assert_eq!(kind.fresh(&key("web")), None);
        assert!(lock(&kind.scales).is_empty());

        // A relist that no longer has an object drops its copy.
        lock(&kind.scales).insert(key("api"), scale("3"));
        kind.apply(watcher::Event::Init, &mut relist);
        kind.apply(watcher::Event::InitDone, &mut relist);
        assert!(lock(&kind.scales).is_empty());
    }

    /// A review's finding: a watch that broke (an error, or the relist after it) may have
    /// missed an update, so no copy is served until the list is complete again.
    #[test]
    fn a_broken_watch_serves_no_copy_until_it_has_listed_again() {
        let kind = KindWatch::default();
        let mut relist = None;
        kind.apply(watcher::Event::Init, &mut relist);
        kind.apply(
            watcher::Event::InitApply((key("web"), Some("7".into()))),
            &mut relist,
        );
        kind.apply(watcher::Event::InitDone, &mut relist);
        lock(&kind.scales).insert(key("web"), scale("7"));
        assert_eq!(kind.fresh(&key("web")), Some(scale("7")));
        kind.invalidate();
        assert_eq!(kind.fresh(&key("web")), None, "after a watch error");
        kind.apply(watcher::Event::Init, &mut relist);
        assert_eq!(kind.fresh(&key("web")), None, "while relisting");
        kind.apply(
            watcher::Event::InitApply((key("web"), Some("7".into()))),
            &mut relist,
        );
        kind.apply(watcher::Event::InitDone, &mut relist);
        assert_eq!(kind.fresh(&key("web")), Some(scale("7")));
    }
}
