//! The names of each Service's EndpointSlices, kept up to date as the watch delivers
//! them, so a pass that recomputes a few Services fetches their slices from the cache
//! without looking at the others. At 10 000 Services, filtering every slice by its label on
//! each pass was most of the cost of an endpoint change. Names only: the slices themselves
//! stay in the reflector's store, once. Pure: [`ServiceSlices::apply`] takes watch events.

use std::{collections::HashMap, sync::Arc};

use kube::runtime::watcher;

use super::projection::CachedSlice;
use crate::model::ServiceRef;

/// A slice's identity: namespace and name.
type SliceKey = (Arc<str>, Arc<str>);

/// The slices of each Service (namespace and `kubernetes.io/service-name` label).
#[derive(Debug, Default)]
pub struct ServiceSlices {
    current: Index,
    /// Filled between a relist's `Init` and `InitDone`; the current index serves meanwhile,
    /// as the reflector's store does.
    relisting: Option<Index>,
}

#[derive(Debug, Default)]
struct Index {
    /// Sorted names. Most Services have one slice: a vector, where a set's first node was
    /// 300 bytes a Service.
    by_service: HashMap<ServiceRef, Vec<Arc<str>>>,
    /// Which Service each slice was filed under, to move it when its label changes.
    owner: HashMap<SliceKey, ServiceRef>,
}

impl Index {
    fn put(&mut self, s: &CachedSlice) {
        let Some(key) = key_of(s) else { return };
        self.remove(&key);
        let Some(name) = s.service.as_ref() else { return };
        // The namespace is shared with the key.
        let r = ServiceRef { namespace: key.0.clone(), name: name.as_str().into() };
        let names = self.by_service.entry(r.clone()).or_default();
        if let Err(at) = names.binary_search(&key.1) {
            names.insert(at, key.1.clone());
        }
        self.owner.insert(key, r);
    }

    fn remove(&mut self, key: &SliceKey) {
        let Some(r) = self.owner.remove(key) else { return };
        if let Some(m) = self.by_service.get_mut(&r) {
            m.retain(|n| *n != key.1);
            if m.is_empty() {
                self.by_service.remove(&r);
            }
        }
    }
}

fn key_of(s: &CachedSlice) -> Option<SliceKey> {
    Some((s.metadata.namespace.as_deref()?.into(), s.metadata.name.as_deref()?.into()))
}

impl ServiceSlices {
    /// Follows one watch event.
    pub fn apply(&mut self, ev: &watcher::Event<CachedSlice>) {
        match ev {
            watcher::Event::Apply(s) => self.current.put(s),
            watcher::Event::Delete(s) => {
                if let Some(key) = key_of(s) {
                    self.current.remove(&key);
                }
            }
            watcher::Event::Init => self.relisting = Some(Index::default()),
            watcher::Event::InitApply(s) => self.relisting.get_or_insert_with(Index::default).put(s),
            watcher::Event::InitDone => {
                // Slices the relist did not bring are gone.
                self.current = self.relisting.take().unwrap_or_default();
            }
        }
    }

    /// The names of Service `r`'s slices (in its namespace), in order.
    pub fn of(&self, r: &ServiceRef) -> impl Iterator<Item = &str> {
        self.current.by_service.get(r).into_iter().flatten().map(AsRef::as_ref)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, service: Option<&str>) -> CachedSlice {
        let mut s = CachedSlice::default();
        s.metadata.namespace = Some("ns".into());
        s.metadata.name = Some(name.into());
        s.service = service.map(Into::into);
        s
    }

    fn r(name: &str) -> ServiceRef {
        ServiceRef { namespace: "ns".into(), name: name.into() }
    }

    fn names<'a>(idx: &'a ServiceSlices, svc: &str) -> Vec<&'a str> {
        idx.of(&r(svc)).collect()
    }

    #[test]
    fn slices_follow_their_service_label_through_updates_relabels_and_deletes() {
        let mut idx = ServiceSlices::default();
        idx.apply(&watcher::Event::Apply(slice("web-a", Some("web"))));
        idx.apply(&watcher::Event::Apply(slice("web-b", Some("web"))));
        idx.apply(&watcher::Event::Apply(slice("loose", None)));
        assert_eq!(names(&idx, "web"), ["web-a", "web-b"]);
        idx.apply(&watcher::Event::Apply(slice("web-a", Some("web"))));
        assert_eq!(names(&idx, "web"), ["web-a", "web-b"], "an update is the same slice");
        idx.apply(&watcher::Event::Apply(slice("web-b", Some("api"))));
        assert_eq!(names(&idx, "web"), ["web-a"], "relabelled away");
        assert_eq!(names(&idx, "api"), ["web-b"]);
        idx.apply(&watcher::Event::Apply(slice("web-a", None)));
        assert!(names(&idx, "web").is_empty(), "label removed");
        idx.apply(&watcher::Event::Delete(slice("web-b", Some("api"))));
        assert!(names(&idx, "api").is_empty(), "deleted");
    }

    #[test]
    fn a_relist_replaces_everything_once_done_and_serves_the_old_meanwhile() {
        let mut idx = ServiceSlices::default();
        idx.apply(&watcher::Event::Apply(slice("web-a", Some("web"))));
        idx.apply(&watcher::Event::Apply(slice("old-a", Some("old"))));
        idx.apply(&watcher::Event::Init);
        idx.apply(&watcher::Event::InitApply(slice("web-a", Some("web"))));
        assert_eq!(names(&idx, "old"), ["old-a"], "until the relist is done");
        idx.apply(&watcher::Event::InitDone);
        assert_eq!(names(&idx, "web"), ["web-a"]);
        assert!(names(&idx, "old").is_empty(), "not relisted: gone");
    }
}
