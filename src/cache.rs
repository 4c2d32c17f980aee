//! The caches that save upstream calls: workspace group lists,
//! per-(user, workspace) permissions, and the refresh identity cache.
//!
//! Each is in-process, bounded in entries and in bytes (a weigher estimates
//! every entry's heap size), and expires entries after its TTL; a TTL of 0
//! turns it off. With `cache.redis.url` the replicas share one Redis as well:
//! Redis answers first, and while it cannot be reached the in-process cache
//! does (a warning, and `cache_requests_total{result="error"}`). They hold
//! what Bitbucket said about a user (slugs, permissions, names, email), never
//! a token: keys are user uuids and slugs, namespaced by connector id.

use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::connector::{Clock, SystemClock};
use crate::metrics::{Cache, CacheResult, Metrics};
use crate::secret::Secret;

/// Longest wait for Redis per operation: beyond it the in-process cache
/// answers, so a stalled Redis costs a login at most this much per lookup.
pub(crate) const REDIS_TIMEOUT: Duration = Duration::from_millis(250);

/// How an entry's key reads in Redis (after `bbc:{connector}:{cache}:`).
pub(crate) trait SharedKey {
    fn shared_key(&self) -> String;
}

impl SharedKey for (String, String) {
    fn shared_key(&self) -> String {
        format!("{}:{}", self.0, self.1)
    }
}

impl SharedKey for (String, bool) {
    fn shared_key(&self) -> String {
        format!("{}:{}", self.0, if self.1 { "groups" } else { "plain" })
    }
}

impl SharedKey for String {
    fn shared_key(&self) -> String {
        self.clone()
    }
}

/// One Redis shared by every connector's caches (and by the replicas).
pub struct SharedCache {
    client: redis::Client,
    conn: tokio::sync::OnceCell<redis::aio::ConnectionManager>,
    down: AtomicBool,
}

impl std::fmt::Debug for SharedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedCache(redis, [redacted])")
    }
}

impl SharedCache {
    /// Parses the URL; connects on first use (an unreachable Redis at start
    /// is not an error: the in-process caches answer until it is back).
    pub fn open(url: &Secret) -> Result<Arc<SharedCache>, String> {
        crate::bitbucket::install_crypto();
        let client = redis::Client::open(url.expose())
            // redis' message could repeat the URL, and with it the password.
            .map_err(|_| "cache.redis.url: not a usable Redis URL".to_string())?;
        Ok(Arc::new(SharedCache {
            client,
            conn: tokio::sync::OnceCell::new(),
            down: AtomicBool::new(false),
        }))
    }

    async fn conn(&self) -> Result<redis::aio::ConnectionManager, ()> {
        self.conn
            .get_or_try_init(|| async {
                let cfg = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(REDIS_TIMEOUT))
                    .set_response_timeout(Some(REDIS_TIMEOUT))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(500));
                redis::aio::ConnectionManager::new_lazy_with_config(self.client.clone(), cfg)
            })
            .await
            .cloned()
            .map_err(|e| self.failed(e.category()))
    }

    /// `why`: redis' error category or "timed out", never its message (which
    /// could name the URL).
    fn failed(&self, why: &str) {
        if !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                error = why,
                "shared cache (Redis) unreachable: caching in-process only until it is back"
            );
        }
    }

    fn succeeded(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::info!("shared cache (Redis) reachable again");
        }
    }

    /// One command within [`REDIS_TIMEOUT`]; failures are logged (once per
    /// outage) and answered with `Err`.
    async fn run<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, ()> {
        let mut conn = self.conn().await?;
        let why = match tokio::time::timeout(REDIS_TIMEOUT, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => {
                self.succeeded();
                return Ok(v);
            }
            Ok(Err(e)) => e.category().to_string(),
            Err(_) => "timed out".to_string(),
        };
        self.failed(&why);
        Err(())
    }

    pub async fn get(&self, key: &str) -> Result<Option<String>, ()> {
        self.run(redis::cmd("GET").arg(key).to_owned()).await
    }

    pub async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), ()> {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let cmd = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("PX")
            .arg(ms)
            .to_owned();
        self.run(cmd).await
    }
}

/// Entries held at most by one cache.
pub(crate) const MAX_ENTRIES: u64 = 100_000;
/// Estimated bytes held at most by one cache.
pub(crate) const MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Per-entry bookkeeping counted on top of an entry's own bytes.
const ENTRY_OVERHEAD: usize = 96;

/// The heap bytes an entry holds, as near as it matters for a memory bound.
pub(crate) trait Weigh {
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

/// A TTL cache with hit/miss/error metrics under `name`.
///
/// An in-process entry is stamped with its [`Clock`]'s time and is a miss
/// once the TTL has passed on that clock (so tests move time by hand); moka's
/// own TTL, on the monotonic clock, still evicts it.
pub(crate) struct TtlCache<K, V> {
    name: Cache,
    ttl: Duration,
    inner: Option<moka::sync::Cache<K, (V, SystemTime)>>,
    clock: Arc<dyn Clock>,
    /// Redis, and this cache's key prefix there (`bbc:{connector}:{name}:`).
    shared: Option<(Arc<SharedCache>, String)>,
    metrics: Metrics,
}

impl<K, V> TtlCache<K, V>
where
    K: Hash + Eq + Weigh + SharedKey + Send + Sync + 'static,
    V: Clone + Weigh + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// Shares this cache through Redis under `bbc:{connector_id}:{name}:`.
    pub(crate) fn shared(mut self, shared: Option<Arc<SharedCache>>, connector_id: &str) -> Self {
        let name: &str = self.name.into();
        self.shared = shared.map(|s| (s, format!("bbc:{connector_id}:{name}:")));
        self
    }

    /// Reads entry ages from `clock` instead of the wall clock.
    pub(crate) fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub(crate) fn new(name: Cache, ttl: Duration, metrics: Metrics) -> Self {
        Self::bounded(name, ttl, MAX_ENTRIES, MAX_BYTES, metrics)
    }

    pub(crate) fn bounded(
        name: Cache,
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
                .weigher(move |k: &K, (v, _): &(V, SystemTime)| {
                    let w = (k.weigh() + v.weigh() + ENTRY_OVERHEAD) as u64;
                    u32::try_from(w.max(floor)).unwrap_or(u32::MAX)
                })
                .build()
        });
        TtlCache {
            name,
            ttl,
            inner,
            clock: Arc::new(SystemClock),
            shared: None,
            metrics,
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Redis first when configured; the in-process entry when Redis fails.
    pub(crate) async fn get(&self, key: &K) -> Option<V> {
        let inner = self.inner.as_ref()?;
        if let Some((redis, prefix)) = &self.shared {
            match redis.get(&format!("{prefix}{}", key.shared_key())).await {
                Ok(found) => {
                    let hit = found.and_then(|v| serde_json::from_str::<V>(&v).ok());
                    self.metrics.cache(self.name, CacheResult::of(&hit));
                    return hit;
                }
                Err(()) => self.metrics.cache(self.name, CacheResult::error),
            }
        }
        let hit = inner.get(key).and_then(|(v, at)| {
            let now = self.clock.now();
            if now.duration_since(at).is_ok_and(|age| age >= self.ttl) {
                inner.invalidate(key);
                return None;
            }
            Some(v)
        });
        self.metrics.cache(self.name, CacheResult::of(&hit));
        hit
    }

    pub(crate) async fn put(&self, key: K, value: V) {
        let Some(inner) = &self.inner else {
            return;
        };
        if let Some((redis, prefix)) = &self.shared {
            if let Ok(v) = serde_json::to_string(&value) {
                let k = format!("{prefix}{}", key.shared_key());
                if redis.set(&k, &v, self.ttl).await.is_err() {
                    self.metrics.cache(self.name, CacheResult::error);
                }
            }
        }
        inner.insert(key, (value, self.clock.now()));
    }

    /// Entries held (after pending evictions ran).
    #[cfg(test)]
    pub(crate) fn len(&self) -> u64 {
        self.inner.as_ref().map_or(0, |c| {
            c.run_pending_tasks();
            c.entry_count()
        })
    }

    /// Estimated bytes held (after pending evictions ran).
    #[cfg(test)]
    pub(crate) fn weight(&self) -> u64 {
        self.inner.as_ref().map_or(0, |c| {
            c.run_pending_tasks();
            c.weighted_size()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_expire_after_the_ttl_and_count_hits_and_misses() {
        let m = Metrics::new();
        let c: TtlCache<String, String> =
            TtlCache::new(Cache::permission, Duration::from_millis(50), m.clone());
        c.put("k".into(), "v".into()).await;
        assert_eq!(c.get(&"k".to_string()).await.as_deref(), Some("v"));
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(c.get(&"k".to_string()).await, None);
        let text = m.encode();
        assert!(text.contains(
            "bitbucket_connector_cache_requests_total{cache=\"permission\",result=\"hit\"} 1"
        ));
        assert!(text.contains(
            "bitbucket_connector_cache_requests_total{cache=\"permission\",result=\"miss\"} 1"
        ));
    }

    #[tokio::test]
    async fn a_zero_ttl_is_off_and_asks_nothing() {
        let m = Metrics::new();
        let c: TtlCache<String, String> = TtlCache::new(Cache::refresh, Duration::ZERO, m.clone());
        c.put("k".into(), "v".into()).await;
        assert_eq!(c.get(&"k".to_string()).await, None);
        assert!(!c.enabled());
        assert!(!m.encode().contains("cache=\"refresh\""));
    }

    #[tokio::test]
    async fn bounded_in_entries_and_in_bytes() {
        let m = Metrics::new();
        let c: TtlCache<String, String> = TtlCache::bounded(
            Cache::groups,
            Duration::from_secs(60),
            100,
            64 * 1024,
            m.clone(),
        );
        for i in 0..1_000 {
            c.put(format!("k{i}"), "x".repeat(10)).await;
        }
        assert!(c.len() <= 100, "{} entries", c.len());
        let c: TtlCache<String, String> =
            TtlCache::bounded(Cache::groups, Duration::from_secs(60), 100, 64 * 1024, m);
        for i in 0..100 {
            c.put(format!("k{i}"), "x".repeat(16 * 1024)).await;
        }
        assert!(c.weight() <= 64 * 1024, "{} bytes", c.weight());
        assert!(c.len() <= 4, "{} entries of 16 KiB", c.len());
    }
}
