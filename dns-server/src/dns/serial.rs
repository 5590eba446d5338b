//! SOA serials: RFC 1982 arithmetic, and the serial each zone serves.
//!
//! The zone's serial is owned here, not taken from the registry: every update of a zone
//! serves the previous serial plus one. So that a restart never goes backwards, a
//! *ceiling* per zone is kept in a [`SerialStore`]: no serial above it was ever served.
//! At start every stored ceiling is raised by [`LEASE`] in one write and each zone
//! continues just above its old ceiling; a running zone writes a new ceiling only once
//! every [`LEASE`] updates. A zone never seen before starts at the registry's serial (the
//! clock in seconds). Without a store serials increase within a process only; they start
//! from the clock again after a restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::store::StoreError;

/// Serials served between two writes of a zone's ceiling (also the jump after a restart).
pub(crate) const LEASE: u32 = 1000;

/// RFC 1982 `a > b` (undefined when they are 2^31 apart: false).
pub(crate) fn gt(a: u32, b: u32) -> bool {
    a != b && (a.wrapping_sub(b) as i32) > 0
}

/// Where the ceilings persist (the embedded store's `zone_serials` table).
pub trait SerialStore: Send + Sync {
    /// Every stored ceiling, by namespace.
    fn load(&self) -> Result<Vec<(String, u32)>, StoreError>;
    /// Stores these ceilings, durably, in one transaction.
    fn save(&self, ceilings: &[(String, u32)]) -> Result<(), StoreError>;
}

#[derive(Default, Clone, Copy)]
struct Entry {
    /// Last serial served.
    served: Option<u32>,
    /// The first serial to serve when nothing was served yet in this process.
    start: Option<u32>,
    /// Stored ceiling.
    ceiling: Option<u32>,
}

/// The serials of every zone.
#[derive(Default)]
pub(crate) struct Serials {
    store: Option<Arc<dyn SerialStore>>,
    map: Mutex<HashMap<String, Entry>>,
}

impl Serials {
    /// Loads the ceilings and raises them all by [`LEASE`] before anything is served.
    pub(crate) fn with_store(store: Arc<dyn SerialStore>) -> Result<Self, StoreError> {
        let loaded = store.load()?;
        let raised: Vec<(String, u32)> = loaded
            .iter()
            .map(|(ns, c)| (ns.clone(), c.wrapping_add(1).wrapping_add(LEASE)))
            .collect();
        store.save(&raised)?;
        let map = loaded
            .into_iter()
            .zip(&raised)
            .map(|((ns, c), (_, r))| {
                let e = Entry {
                    served: None,
                    start: Some(c.wrapping_add(1)),
                    ceiling: Some(*r),
                };
                (ns, e)
            })
            .collect();
        Ok(Serials {
            store: Some(store),
            map: Mutex::new(map),
        })
    }

    /// The serial for the next version of zone `ns` (`proposed`: the registry's, used for a
    /// zone never served). Writes a new ceiling first when the lease runs out; if that
    /// write fails the serial is still served (logged): DNS stays up.
    pub(crate) fn next(&self, ns: &str, proposed: u32) -> u32 {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let e = map.entry(ns.to_string()).or_default();
        let s = match (e.served, e.start) {
            (Some(prev), _) => prev.wrapping_add(1),
            (None, Some(start)) => start,
            (None, None) => proposed,
        };
        e.served = Some(s);
        if let Some(store) = &self.store
            && e.ceiling.is_none_or(|c| !gt(c, s))
        {
            let c = s.wrapping_add(LEASE);
            match store.save(&[(ns.to_string(), c)]) {
                Ok(()) => e.ceiling = Some(c),
                Err(err) => tracing::error!(
                    error = %err,
                    zone = ns,
                    serial = s,
                    "cannot store the SOA serial ceiling; a restart may serve a lower serial"
                ),
            }
        }
        s
    }

    /// The serial served for `ns`, if any.
    pub(crate) fn current(&self, ns: &str) -> Option<u32> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(ns).and_then(|e| e.served)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Mem(Mutex<HashMap<String, u32>>, Mutex<usize>);
    impl SerialStore for Mem {
        fn load(&self) -> Result<Vec<(String, u32)>, StoreError> {
            Ok(self
                .0
                .lock()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect())
        }
        fn save(&self, c: &[(String, u32)]) -> Result<(), StoreError> {
            *self.1.lock().unwrap() += 1;
            self.0.lock().unwrap().extend(c.iter().cloned());
            Ok(())
        }
    }

    #[test]
    fn rfc1982_comparison() {
        assert!(gt(2, 1));
        assert!(!gt(1, 2));
        assert!(gt(0, u32::MAX));
        assert!(gt(5, u32::MAX - 5));
        assert!(!gt(7, 7));
        assert!(!gt(1 << 31, 0) && !gt(0, 1 << 31));
    }

    #[test]
    fn serials_increase_across_restarts_with_few_writes() {
        let store = Arc::new(Mem::default());
        let mut last = 0;
        for restart in 0..5 {
            let s = Serials::with_store(store.clone()).unwrap();
            let writes = *store.1.lock().unwrap();
            // Near the wrap: the serial passes u32::MAX and must still go up (RFC 1982).
            let first = s.next("ns", u32::MAX - 1500);
            if restart > 0 {
                assert!(gt(first, last), "restart {restart}: {first} after {last}");
            }
            last = first;
            for _ in 0..2500 {
                let n = s.next("ns", 1);
                assert!(gt(n, last));
                last = n;
            }
            // One ceiling written per LEASE serials, not one per update.
            assert!(*store.1.lock().unwrap() - writes <= 4);
            assert_eq!(s.current("ns"), Some(last));
        }
    }
}
