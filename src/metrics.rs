//! Prometheus metrics. Labels never carry a user, a token or an id from a URL:
//! upstream endpoints are templates, RPC codes are names.

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub endpoint: &'static str,
    pub status: UpstreamStatus,
}

/// An HTTP status, or `error` when no response arrived.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum UpstreamStatus {
    Http(u16),
    Error,
}

impl EncodeLabelValue for UpstreamStatus {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        match self {
            UpstreamStatus::Http(s) => write!(encoder, "{s}"),
            UpstreamStatus::Error => encoder.write_str("error"),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub cache: &'static str,
    pub result: &'static str,
}

tokio::task_local! {
    /// Upstream HTTP requests made on behalf of the current RPC (its log line
    /// reports them). Unset outside an RPC.
    pub static UPSTREAM_CALLS: Arc<UpstreamTally>;
}

/// One RPC's upstream requests, counted by endpoint template.
#[derive(Debug, Default)]
pub struct UpstreamTally(std::sync::Mutex<Vec<(&'static str, u32)>>);

impl UpstreamTally {
    pub fn add(&self, endpoint: &'static str) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match v.iter_mut().find(|(e, _)| *e == endpoint) {
            Some((_, n)) => *n += 1,
            None => v.push((endpoint, 1)),
        }
    }

    pub fn total(&self) -> u32 {
        let v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        v.iter().map(|(_, n)| n).sum()
    }

    /// `endpoint:count` pairs joined by `,`, sorted by endpoint; "-" for none.
    /// Templates carry no spaces, so the field needs no quoting.
    pub fn summary(&self) -> String {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if v.is_empty() {
            return "-".to_string();
        }
        v.sort_unstable();
        v.iter()
            .map(|(e, n)| format!("{e}:{n}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~16 s
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Every metric the service exports. Cheap to clone (all handles are `Arc`s).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub rpc_requests: Family<RpcLabels, Counter>,
    pub rpc_duration: HistogramFamily<MethodLabels>,
    pub rpc_in_flight: Gauge<i64, AtomicI64>,
    pub upstream_requests: Family<UpstreamLabels, Counter>,
    pub upstream_duration: HistogramFamily<EndpointLabels>,
    pub upstream_retries: Family<EndpointLabels, Counter>,
    pub team_groups_degraded: Family<ReasonLabels, Counter>,
    pub refresh_redemptions: Family<OutcomeLabels, Counter>,
    pub refresh_joined: Counter<u64, AtomicU64>,
    pub upstream_rate_limited: Family<EndpointLabels, Counter>,
    pub cache_requests: Family<CacheLabels, Counter>,
    pub shared_cache_errors: Counter<u64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("bitbucket_connector");
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        r.register(
            "rpc_requests",
            "ConnectorService RPCs answered, by method and gRPC status code",
            rpc_requests.clone(),
        );
        let rpc_duration: HistogramFamily<MethodLabels> =
            Family::new_with_constructor(latency_histogram);
        r.register(
            "rpc_duration_seconds",
            "ConnectorService RPC latency",
            rpc_duration.clone(),
        );
        let rpc_in_flight = Gauge::<i64, AtomicI64>::default();
        r.register(
            "rpc_in_flight",
            "ConnectorService RPCs being served",
            rpc_in_flight.clone(),
        );
        let upstream_requests = Family::<UpstreamLabels, Counter>::default();
        r.register(
            "upstream_requests",
            "HTTP requests to Bitbucket, by endpoint template and HTTP status (or error)",
            upstream_requests.clone(),
        );
        let upstream_duration: HistogramFamily<EndpointLabels> =
            Family::new_with_constructor(latency_histogram);
        r.register(
            "upstream_duration_seconds",
            "Latency of one HTTP request to Bitbucket",
            upstream_duration.clone(),
        );
        let upstream_retries = Family::<EndpointLabels, Counter>::default();
        r.register(
            "upstream_retries",
            "HTTP requests to Bitbucket that were retries",
            upstream_retries.clone(),
        );
        let team_groups_degraded = Family::<ReasonLabels, Counter>::default();
        r.register(
            "team_groups_degraded",
            "Workspaces whose groups could not be read during a login (forbidden, not_found, gone)",
            team_groups_degraded.clone(),
        );
        let refresh_redemptions = Family::<OutcomeLabels, Counter>::default();
        r.register(
            "refresh_redemptions",
            "Refresh tokens redeemed at Bitbucket's token endpoint, by outcome",
            refresh_redemptions.clone(),
        );
        let refresh_joined = Counter::<u64, AtomicU64>::default();
        r.register(
            "refresh_joined",
            "Refresh calls that shared another call's redemption of the same refresh token",
            refresh_joined.clone(),
        );
        let upstream_rate_limited = Family::<EndpointLabels, Counter>::default();
        r.register(
            "upstream_rate_limited",
            "Requests refused by Bitbucket with 429, and requests not sent while that resource's breaker was open",
            upstream_rate_limited.clone(),
        );
        let cache_requests = Family::<CacheLabels, Counter>::default();
        r.register(
            "cache_requests",
            "Cache lookups by cache (groups, permission, refresh) and result (hit, miss, error)",
            cache_requests.clone(),
        );
        let shared_cache_errors = Counter::<u64, AtomicU64>::default();
        r.register(
            "shared_cache_errors",
            "Operations on the shared (Redis) cache that failed; the in-process cache answered instead",
            shared_cache_errors.clone(),
        );
        let build_info = Family::<VersionLabels, Gauge>::default();
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        r.register("build_info", "Build information (always 1)", build_info);
        Metrics {
            registry: Arc::new(r),
            rpc_requests,
            rpc_duration,
            rpc_in_flight,
            upstream_requests,
            upstream_duration,
            upstream_retries,
            team_groups_degraded,
            refresh_redemptions,
            refresh_joined,
            upstream_rate_limited,
            cache_requests,
            shared_cache_errors,
        }
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The Prometheus text format (0.0.4): as OpenMetrics, but a counter's
    /// HELP and TYPE lines name it with its `_total` suffix, and no `# EOF`.
    pub fn encode(&self) -> String {
        let om = self.encode_openmetrics();
        let counters: std::collections::HashSet<&str> = om
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.strip_suffix(" counter"))
            .collect();
        let mut out = String::with_capacity(om.len() + 256);
        for line in om.lines() {
            if line == "# EOF" || line.starts_with("# UNIT ") {
                continue;
            }
            let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
                let rest = line.strip_prefix(prefix)?;
                let (name, tail) = rest.split_once(' ')?;
                counters
                    .contains(name)
                    .then(|| format!("{prefix}{name}_total {tail}"))
            });
            out.push_str(renamed.as_deref().unwrap_or(line));
            out.push('\n');
        }
        out
    }

    pub fn upstream(&self, endpoint: &'static str, status: UpstreamStatus, seconds: f64) {
        let _ = UPSTREAM_CALLS.try_with(|c| c.add(endpoint));
        self.upstream_requests
            .get_or_create(&UpstreamLabels { endpoint, status })
            .inc();
        self.upstream_duration
            .get_or_create(&EndpointLabels { endpoint })
            .observe(seconds);
    }

    pub fn retry(&self, endpoint: &'static str) {
        self.upstream_retries
            .get_or_create(&EndpointLabels { endpoint })
            .inc();
    }

    pub fn degraded(&self, reason: &'static str) {
        self.team_groups_degraded
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn rate_limited(&self, endpoint: &'static str) {
        self.upstream_rate_limited
            .get_or_create(&EndpointLabels { endpoint })
            .inc();
    }

    pub fn cache(&self, cache: &'static str, result: &'static str) {
        self.cache_requests
            .get_or_create(&CacheLabels { cache, result })
            .inc();
    }

    pub fn redemption(&self, outcome: &'static str) {
        self.refresh_redemptions
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_follow_the_contract() {
        let m = Metrics::new();
        m.rpc_requests
            .get_or_create(&RpcLabels {
                method: "LoginURL",
                code: "OK",
            })
            .inc();
        m.rpc_duration
            .get_or_create(&MethodLabels { method: "LoginURL" })
            .observe(0.002);
        m.upstream("/2.0/user", UpstreamStatus::Http(200), 0.01);
        m.upstream("/2.0/user", UpstreamStatus::Error, 0.01);
        m.retry("/2.0/user");
        m.degraded("forbidden");
        m.redemption("ok");
        m.refresh_joined.inc();
        m.rate_limited("/2.0/user/emails");
        m.cache("permission", "hit");
        let text = m.encode();
        for line in [
            "bitbucket_connector_rpc_requests_total{method=\"LoginURL\",code=\"OK\"} 1",
            "bitbucket_connector_upstream_requests_total{endpoint=\"/2.0/user\",status=\"200\"} 1",
            "bitbucket_connector_upstream_requests_total{endpoint=\"/2.0/user\",status=\"error\"} 1",
            "bitbucket_connector_upstream_retries_total{endpoint=\"/2.0/user\"} 1",
            "bitbucket_connector_team_groups_degraded_total{reason=\"forbidden\"} 1",
            "bitbucket_connector_refresh_redemptions_total{outcome=\"ok\"} 1",
            "bitbucket_connector_refresh_joined_total 1",
            "bitbucket_connector_upstream_rate_limited_total{endpoint=\"/2.0/user/emails\"} 1",
            "bitbucket_connector_cache_requests_total{cache=\"permission\",result=\"hit\"} 1",
            "bitbucket_connector_rpc_in_flight 0",
            "bitbucket_connector_build_info{version=\"",
            "# TYPE bitbucket_connector_rpc_duration_seconds histogram",
            "# TYPE bitbucket_connector_upstream_duration_seconds histogram",
            "# TYPE bitbucket_connector_rpc_requests_total counter",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("# EOF"));
        let t = UpstreamTally::default();
        assert_eq!(t.summary(), "-");
        t.add("/2.0/user/emails");
        t.add("/2.0/user");
        t.add("/2.0/user/emails");
        assert_eq!(
            (t.total(), t.summary().as_str()),
            (3, "/2.0/user:1,/2.0/user/emails:2")
        );
        assert!(m
            .encode_openmetrics()
            .contains("# TYPE bitbucket_connector_rpc_requests counter"));
    }
}
