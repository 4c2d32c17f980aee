//! The in-process caches that save upstream calls: workspace group lists,
//! per-(user, workspace) permissions, and the refresh identity cache.
//!
//! Each is bounded in entries and in bytes (a weigher estimates every entry's
//! heap size) and expires entries after its TTL; a TTL of 0 turns it off. They
//! hold what Bitbucket said about a user (slugs, permissions, names, email),
//! never a token: keys are user uuids and slugs.

use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;

/// Entries held at most by one cache.
pub const MAX_ENTRIES: u64 = 100_000;
/// Estimated bytes held at most by one cache.
pub const MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Per-entry bookkeeping counted on top of an entry's own bytes.
const ENTRY_OVERHEAD: usize = 96;

/// The heap bytes an entry holds, as near as it matters for a memory bound.
pub trait Weigh {
    fn weigh(&self) -> usize;
}

impl Weigh for String {
    fn weigh(&self) -> usize {
        self.len()
    }
}

impl<T: Weigh> Weigh for Option<T> {
    fn weigh(&self) -> usize {
        self.as_ref().map_or(0, Weigh::weigh)
    }
}

impl<T: Weigh> Weigh for Vec<T> {
    fn weigh(&self) -> usize {
        self.iter()
            .map(|t| t.weigh() + std::mem::size_of::<T>())
            .sum()
    }
}

impl<T: Weigh> Weigh for Arc<T> {
    fn weigh(&self) -> usize {
        (**self).weigh()
    }
}

impl<A: Weigh, B: Weigh> Weigh for (A, B) {
    fn weigh(&self) -> usize {
        self.0.weigh() + self.1.weigh()
    }
}

impl Weigh for bool {
    fn weigh(&self) -> usize {
        0
    }
}

/// A TTL cache with hit/miss metrics under `name`.
pub struct TtlCache<K, V> {
    name: &'static str,
    inner: Option<moka::sync::Cache<K, V>>,
    metrics: Metrics,
}

impl<K, V> TtlCache<K, V>
where
    K: Hash + Eq + Weigh + Send + Sync + 'static,
    V: Clone + Weigh + Send + Sync + 'static,
{
    pub fn new(name: &'static str, ttl: Duration, metrics: Metrics) -> Self {
        Self::bounded(name, ttl, MAX_ENTRIES, MAX_BYTES, metrics)
    }

    pub fn bounded(
        name: &'static str,
        ttl: Duration,
        max_entries: u64,
        max_bytes: u64,
        metrics: Metrics,
    ) -> Self {
        let inner = (!ttl.is_zero()).then(|| {
            // moka bounds one sum of weights: each entry weighs at least
            // max_bytes / max_entries, so neither bound can be passed.
            let floor = (max_bytes / max_entries.max(1)).max(1);
            moka::sync::Cache::builder()
                .time_to_live(ttl)
                .max_capacity(max_bytes)
                .weigher(move |k: &K, v: &V| {
                    let w = (k.weigh() + v.weigh() + ENTRY_OVERHEAD) as u64;
                    u32::try_from(w.max(floor)).unwrap_or(u32::MAX)
                })
                .build()
        });
        TtlCache {
            name,
            inner,
            metrics,
        }
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    pub fn get(&self, key: &K) -> Option<V> {
        let inner = self.inner.as_ref()?;
        let hit = inner.get(key);
        self.metrics
            .cache(self.name, if hit.is_some() { "hit" } else { "miss" });
        hit
    }

    pub fn put(&self, key: K, value: V) {
        if let Some(inner) = &self.inner {
            inner.insert(key, value);
        }
    }

    pub fn invalidate(&self, key: &K) {
        if let Some(inner) = &self.inner {
            inner.invalidate(key);
        }
    }

    /// Entries held (after pending evictions ran).
    pub fn len(&self) -> u64 {
        self.inner.as_ref().map_or(0, |c| {
            c.run_pending_tasks();
            c.entry_count()
        })
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Estimated bytes held (after pending evictions ran).
    pub fn weight(&self) -> u64 {
        self.inner.as_ref().map_or(0, |c| {
            c.run_pending_tasks();
            c.weighted_size()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_after_the_ttl_and_count_hits_and_misses() {
        let m = Metrics::new();
        let c: TtlCache<String, String> =
            TtlCache::new("permission", Duration::from_millis(50), m.clone());
        c.put("k".into(), "v".into());
        assert_eq!(c.get(&"k".to_string()).as_deref(), Some("v"));
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(c.get(&"k".to_string()), None);
        let text = m.encode();
        assert!(text.contains(
            "bitbucket_connector_cache_requests_total{cache=\"permission\",result=\"hit\"} 1"
        ));
        assert!(text.contains(
            "bitbucket_connector_cache_requests_total{cache=\"permission\",result=\"miss\"} 1"
        ));
    }

    #[test]
    fn a_zero_ttl_is_off_and_asks_nothing() {
        let m = Metrics::new();
        let c: TtlCache<String, String> = TtlCache::new("refresh", Duration::ZERO, m.clone());
        c.put("k".into(), "v".into());
        assert_eq!(c.get(&"k".to_string()), None);
        assert!(!c.enabled());
        assert!(!m.encode().contains("cache=\"refresh\""));
    }

    #[test]
    fn bounded_in_entries_and_in_bytes() {
        let m = Metrics::new();
        let c: TtlCache<String, String> =
            TtlCache::bounded("groups", Duration::from_secs(60), 100, 64 * 1024, m.clone());
        for i in 0..1_000 {
            c.put(format!("k{i}"), "x".repeat(10));
        }
        assert!(c.len() <= 100, "{} entries", c.len());
        let c: TtlCache<String, String> =
            TtlCache::bounded("groups", Duration::from_secs(60), 100, 64 * 1024, m);
        for i in 0..100 {
            c.put(format!("k{i}"), "x".repeat(16 * 1024));
        }
        assert!(c.weight() <= 64 * 1024, "{} bytes", c.weight());
        assert!(c.len() <= 4, "{} entries of 16 KiB", c.len());
    }
}
