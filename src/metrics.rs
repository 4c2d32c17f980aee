//! Prometheus metrics, as the contract's table lists them. Label values are
//! closed sets: the enums below (a variant's name is the value a scraper sees)
//! and endpoint templates, so no user, token or id from a URL becomes a label.
//! `/metrics` serves prometheus-client's own encoders: the Prometheus text
//! format, or OpenMetrics when the scraper asks for it.

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::Arc;

use prometheus_client::encoding::{prometheus_text, EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use strum::{IntoStaticStr, VariantArray};

const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A ConnectorService method (`unknown`: a path that is none of them).
#[allow(non_camel_case_types)]
#[derive(
    Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue, IntoStaticStr, VariantArray,
)]
pub enum Method {
    LoginURL,
    HandleCallback,
    Refresh,
    unknown,
}

/// A gRPC status code by its canonical name.
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
#[derive(
    Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue, IntoStaticStr, VariantArray,
)]
pub enum Code {
    OK,
    CANCELLED,
    UNKNOWN,
    INVALID_ARGUMENT,
    DEADLINE_EXCEEDED,
    NOT_FOUND,
    ALREADY_EXISTS,
    PERMISSION_DENIED,
    RESOURCE_EXHAUSTED,
    FAILED_PRECONDITION,
    ABORTED,
    OUT_OF_RANGE,
    UNIMPLEMENTED,
    INTERNAL,
    UNAVAILABLE,
    DATA_LOSS,
    UNAUTHENTICATED,
}

/// Why a workspace's groups could not be read (`unauthorized`: teamGroupsAuth
/// was rejected).
#[allow(non_camel_case_types)]
#[derive(
    Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue, IntoStaticStr, VariantArray,
)]
pub enum Reason {
    forbidden,
    not_found,
    gone,
    unauthorized,
}

/// A cache; also its key prefix in the shared cache.
#[allow(non_camel_case_types)]
#[derive(
    Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue, IntoStaticStr, VariantArray,
)]
pub enum Cache {
    groups,
    permission,
    refresh,
}

/// A cache lookup's result (`error`: the shared cache failed).
#[allow(non_camel_case_types)]
#[derive(
    Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue, IntoStaticStr, VariantArray,
)]
pub enum CacheResult {
    hit,
    miss,
    error,
}

impl CacheResult {
    pub fn of<V>(found: &Option<V>) -> CacheResult {
        match found {
            Some(_) => CacheResult::hit,
            None => CacheResult::miss,
        }
    }
}

/// How redeeming a refresh token ended (`revoked`: Bitbucket rejected it).
#[allow(non_camel_case_types)]
#[derive(
    Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue, IntoStaticStr, VariantArray,
)]
pub enum Outcome {
    ok,
    revoked,
    error,
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

/// `(a, b, c)`: every value of a label, for its help text.
fn values<T: VariantArray + Copy + Into<&'static str>>() -> String {
    let names: Vec<&str> = T::VARIANTS.iter().map(|&v| v.into()).collect();
    format!("({})", names.join(", "))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: Method,
    pub code: Code,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: Method,
}

/// `endpoint` is always one of the `&'static str` templates of
/// `bitbucket::EP_*` and `bitbucket::token::TOKEN_ENDPOINT`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub endpoint: &'static str,
    pub status: UpstreamStatus,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: Reason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct VersionLabels {
    pub version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub cache: Cache,
    pub result: CacheResult,
}

tokio::task_local! {
    /// Upstream HTTP requests made on behalf of the current RPC (its log line
    /// reports them). Unset outside an RPC.
    pub static UPSTREAM_CALLS: Arc<UpstreamTally>;
}

/// One RPC's upstream requests, counted by endpoint template.
#[derive(Debug, Default)]
pub(crate) struct UpstreamTally(std::sync::Mutex<Vec<(&'static str, u32)>>);

impl UpstreamTally {
    pub(crate) fn add(&self, endpoint: &'static str) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match v.iter_mut().find(|(e, _)| *e == endpoint) {
            Some((_, n)) => *n += 1,
            None => v.push((endpoint, 1)),
        }
    }

    pub(crate) fn total(&self) -> u32 {
        let v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        v.iter().map(|(_, n)| n).sum()
    }

    /// `endpoint:count` pairs joined by `,`, sorted by endpoint; "-" for none.
    /// Templates carry no spaces, so the field needs no quoting.
    pub(crate) fn summary(&self) -> String {
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
            format!(
                "ConnectorService RPCs answered, by method {} and gRPC status code",
                values::<Method>()
            ),
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
            format!(
                "Workspaces whose groups could not be read during a login, by reason {}",
                values::<Reason>()
            ),
            team_groups_degraded.clone(),
        );
        let refresh_redemptions = Family::<OutcomeLabels, Counter>::default();
        r.register(
            "refresh_redemptions",
            format!(
                "Refresh tokens redeemed at Bitbucket's token endpoint, by outcome {}",
                values::<Outcome>()
            ),
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
            format!(
                "Cache lookups by cache {} and result {}",
                values::<Cache>(),
                values::<CacheResult>()
            ),
            cache_requests.clone(),
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
        }
    }

    /// `/metrics` for a scraper that sent `accept`: content type and body.
    /// OpenMetrics when it lists `application/openmetrics-text` (Prometheus
    /// does), else the Prometheus text format (version 0.0.4), the contract's.
    pub fn exposition(&self, accept: Option<&str>) -> (&'static str, String) {
        if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
            (OPENMETRICS_CONTENT_TYPE, self.encode_openmetrics())
        } else {
            (prometheus_text::CONTENT_TYPE, self.encode())
        }
    }

    /// The Prometheus text format (0.0.4) of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// The OpenMetrics text of every metric.
    fn encode_openmetrics(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
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

    pub fn degraded(&self, reason: Reason) {
        self.team_groups_degraded
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn rate_limited(&self, endpoint: &'static str) {
        self.upstream_rate_limited
            .get_or_create(&EndpointLabels { endpoint })
            .inc();
    }

    pub fn cache(&self, cache: Cache, result: CacheResult) {
        self.cache_requests
            .get_or_create(&CacheLabels { cache, result })
            .inc();
    }

    pub fn redemption(&self, outcome: Outcome) {
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
                method: Method::LoginURL,
                code: Code::OK,
            })
            .inc();
        m.rpc_duration
            .get_or_create(&MethodLabels {
                method: Method::LoginURL,
            })
            .observe(0.002);
        m.upstream("/2.0/user", UpstreamStatus::Http(200), 0.01);
        m.upstream("/2.0/user", UpstreamStatus::Error, 0.01);
        m.retry("/2.0/user");
        m.degraded(Reason::forbidden);
        m.redemption(Outcome::ok);
        m.refresh_joined.inc();
        m.rate_limited("/2.0/user/emails");
        m.cache(Cache::permission, CacheResult::hit);
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

    /// Each variant of `T` is encoded as `label="name"`, and named in `help`.
    fn every_variant<T>(label: &str, help: Option<&str>, encoded: &str)
    where
        T: VariantArray + Copy + Into<&'static str>,
    {
        for &v in T::VARIANTS {
            let name: &str = v.into();
            assert!(
                encoded.contains(&format!("{label}=\"{name}\"")),
                "{label}={name} not encoded as its name:\n{encoded}"
            );
            if let Some(help) = help {
                assert!(help.contains(name), "{name} missing from the help: {help}");
            }
        }
    }

    fn help_of<'a>(text: &'a str, family: &str) -> &'a str {
        let prefix = format!("# HELP {family} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no help for {family} in\n{text}"))
    }

    #[test]
    fn every_label_value_is_its_variant_name_and_listed_in_the_help() {
        let m = Metrics::new();
        for &method in Method::VARIANTS {
            for &code in Code::VARIANTS {
                m.rpc_requests
                    .get_or_create(&RpcLabels { method, code })
                    .inc();
            }
        }
        for &r in Reason::VARIANTS {
            m.degraded(r);
        }
        for &o in Outcome::VARIANTS {
            m.redemption(o);
        }
        for &c in Cache::VARIANTS {
            for &r in CacheResult::VARIANTS {
                m.cache(c, r);
            }
        }
        let text = m.encode();
        let rpc = help_of(&text, "bitbucket_connector_rpc_requests_total");
        every_variant::<Method>("method", Some(rpc), &text);
        every_variant::<Code>("code", None, &text);
        let degraded = help_of(&text, "bitbucket_connector_team_groups_degraded_total");
        every_variant::<Reason>("reason", Some(degraded), &text);
        let redeemed = help_of(&text, "bitbucket_connector_refresh_redemptions_total");
        every_variant::<Outcome>("outcome", Some(redeemed), &text);
        let cache = help_of(&text, "bitbucket_connector_cache_requests_total");
        every_variant::<Cache>("cache", Some(cache), &text);
        every_variant::<CacheResult>("result", Some(cache), &text);
        assert_eq!(
            (
                Method::VARIANTS.len(),
                Code::VARIANTS.len(),
                Reason::VARIANTS.len()
            ),
            (4, 17, 4)
        );
    }

    #[test]
    fn exposition_follows_the_accept_header() {
        let m = Metrics::new();
        m.refresh_joined.inc();
        for accept in [None, Some("text/plain"), Some("*/*")] {
            let (content_type, body) = m.exposition(accept);
            assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
            assert!(body.contains("# TYPE bitbucket_connector_refresh_joined_total counter"));
            assert!(body.contains("\nbitbucket_connector_refresh_joined_total 1\n"));
            assert!(!body.contains("# EOF"));
        }
        let (content_type, body) = m.exposition(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        ));
        assert_eq!(
            content_type,
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert!(body.contains("# TYPE bitbucket_connector_refresh_joined counter"));
        assert!(body.contains("\nbitbucket_connector_refresh_joined_total 1\n"));
        assert!(body.ends_with("# EOF\n"));
    }
}
