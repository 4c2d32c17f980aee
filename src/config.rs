//! The YAML config file -> a validated [`Config`].
//!
//! Two steps. The file is read into serde types that mirror it (`Raw*`, keys
//! in dex's camelCase); every key is a `Field` that holds either its value or
//! what is wrong with it, so a bad value never hides the next problem, and keys
//! no struct names are collected by `serde_ignored` with their paths. Then one
//! validation pass (`Check`) expands `$VAR`s where the contract says, applies
//! defaults and cross-key rules, and builds the [`Config`] the rest of the
//! crate reads, or reports every problem at once, in file order, as
//! `path.to.key: reason`. Durations use Go's syntax ([`GoDuration`]).
//!
//! Code and tests can also build a [`Config`] directly ([`Config::new`],
//! [`ConnectorConfig::new`]), with the same defaults as the file.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde::de::value::MapAccessDeserializer;
use serde::de::{MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use url::Url;

use crate::secret::Secret;

mod duration;

pub use duration::{GoDuration, ParseDurationError};

pub const CONNECTOR_TYPE: &str = "bitbucket-cloud";
pub const DEFAULT_AUTH_URL: &str = "https://bitbucket.org/site/oauth2/authorize";
pub const DEFAULT_TOKEN_URL: &str = "https://bitbucket.org/site/oauth2/access_token";
pub const DEFAULT_API_URL: &str = "https://api.bitbucket.org/2.0";
pub const DEFAULT_LEGACY_API_URL: &str = "https://api.bitbucket.org/1.0";
pub const DEFAULT_ADDR: &str = "127.0.0.1:5557";

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub grpc: GrpcConfig,
    pub telemetry: TelemetryConfig,
    pub logger: LoggerConfig,
    pub connector_data: ConnectorDataConfig,
    pub connectors: Vec<ConnectorConfig>,
    pub cache: CacheConfig,
}

/// `cache`: the optional shared cache of the replicas.
#[derive(Debug, Clone, Default)]
pub struct CacheConfig {
    /// `cache.redis.url`, `$VAR`s expanded; a secret (it may carry a password).
    pub redis_url: Option<Secret>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcConfig {
    pub addr: ListenAddr,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub reflection: bool,
    pub auth_tokens: Vec<Secret>,
    pub shutdown_timeout: Duration,
    /// Largest request message accepted (bytes).
    pub max_request_bytes: usize,
    /// RPCs served at once; more are refused with RESOURCE_EXHAUSTED.
    pub max_in_flight: usize,
    /// Deadline applied to an RPC whose caller sent none.
    pub default_timeout: Duration,
    /// HTTP/2 keepalive ping interval.
    pub keepalive_interval: Duration,
    /// Connections held at once on the gRPC port; beyond it new ones wait.
    pub max_connections: usize,
    /// A connection with no RPC in flight for this long is closed (GOAWAY).
    pub connection_idle_timeout: Duration,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
}

#[derive(Debug, Clone, Default)]
pub struct TelemetryConfig {
    pub http: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LoggerConfig {
    pub level: tracing::Level,
    pub format: LogFormat,
}

impl Default for LoggerConfig {
    fn default() -> Self {
        LoggerConfig {
            level: tracing::Level::INFO,
            format: LogFormat::Text,
        }
    }
}

/// A 32-byte data key; `Debug` never shows it.
#[derive(Clone)]
pub struct DataKey(pub [u8; 32]);

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey([redacted])")
    }
}

#[derive(Debug, Clone)]
pub struct ConnectorDataConfig {
    pub keys: Vec<DataKey>,
    pub accept_dex_plaintext: bool,
}

#[derive(Debug, Clone)]
pub struct BasicAuth {
    pub username: String,
    pub password: Secret,
}

/// One `bitbucket-cloud` connector entry.
#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    pub id: String,
    pub name: String,
    pub client_id: String,
    pub client_secret: Secret,
    pub redirect_uri: String,
    pub teams: Vec<String>,
    pub include_team_groups: bool,
    pub get_workspace_permissions: bool,
    pub team_groups_auth: Option<BasicAuth>,
    pub team_groups_cache_ttl: Duration,
    pub auth_url: Url,
    pub token_url: Url,
    pub api_url: Url,
    pub legacy_api_url: Url,
    /// Timeout of one upstream HTTP request (one attempt).
    pub upstream_timeout: Duration,
    /// Upstream HTTP requests this connector has open at once; more wait
    /// (within their RPC's deadline).
    pub upstream_max_in_flight: usize,
    /// `ws/group` entries whose membership is checked with the user's token.
    pub team_groups: Vec<TeamGroup>,
    pub permission_cache_ttl: Duration,
    pub refresh_cache_ttl: Duration,
    /// How long a resource's breaker stays open after a 429 without
    /// Retry-After (doubled for each 429 in a row, at most 16 times as long).
    pub rate_limit_backoff: Duration,
}

/// One `teamGroups` entry: `workspace/group-slug`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TeamGroup {
    pub workspace: String,
    pub group: String,
}

impl ConnectorConfig {
    /// The one-line summary `check-config` prints; no secrets.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "connector {:?} ({}): clientID {:?}, redirectURI {}, teams {}",
            self.id,
            self.name,
            self.client_id,
            self.redirect_uri,
            if self.teams.is_empty() {
                "(any)".to_string()
            } else {
                format!("[{}]", self.teams.join(", "))
            }
        );
        if self.include_team_groups {
            s.push_str(", includeTeamGroups");
            match &self.team_groups_auth {
                Some(a) => s.push_str(&format!(" (as {})", a.username)),
                None => s.push_str(" (with the user's token)"),
            }
        }
        if self.get_workspace_permissions {
            s.push_str(", getWorkspacePermissions");
        }
        if !self.team_groups.is_empty() {
            s.push_str(&format!(", teamGroups ({})", self.team_groups.len()));
        }
        if !self.refresh_cache_ttl.is_zero() {
            s.push_str(&format!(", refreshCacheTTL {:?}", self.refresh_cache_ttl));
        }
        if self.api_url.as_str().trim_end_matches('/') != DEFAULT_API_URL {
            s.push_str(&format!(", apiURL {}", self.api_url));
        }
        s
    }
}

/// Every problem found in a config file, one `path: reason` each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

// Building a `Config` in code (the demo, tests): the same defaults as the file.

impl Config {
    /// One or more connectors, sealing with `keys[0]`; every other section
    /// as an empty file section would leave it.
    pub fn new(keys: Vec<DataKey>, connectors: Vec<ConnectorConfig>) -> Config {
        Config {
            grpc: GrpcConfig::default(),
            telemetry: TelemetryConfig::default(),
            logger: LoggerConfig::default(),
            connector_data: ConnectorDataConfig {
                keys,
                accept_dex_plaintext: false,
            },
            connectors,
            cache: CacheConfig::default(),
        }
    }
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            addr: ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 5557))),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            reflection: true,
            auth_tokens: Vec::new(),
            shutdown_timeout: Duration::from_secs(10),
            max_request_bytes: 64 * 1024,
            max_in_flight: 1024,
            default_timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(60),
            max_connections: 1024,
            connection_idle_timeout: Duration::from_secs(5 * 60),
            max_concurrent_streams: 100,
        }
    }
}

impl ConnectorConfig {
    /// A connector against Bitbucket Cloud's own endpoints, with every
    /// option at its default.
    pub fn new(
        id: impl Into<String>,
        client_id: impl Into<String>,
        client_secret: Secret,
        redirect_uri: impl Into<String>,
    ) -> ConnectorConfig {
        ConnectorConfig {
            id: id.into(),
            name: "Bitbucket Cloud".to_string(),
            client_id: client_id.into(),
            client_secret,
            redirect_uri: redirect_uri.into(),
            teams: Vec::new(),
            include_team_groups: false,
            get_workspace_permissions: false,
            team_groups_auth: None,
            team_groups_cache_ttl: Duration::from_secs(60),
            auth_url: default_url(DEFAULT_AUTH_URL),
            token_url: default_url(DEFAULT_TOKEN_URL),
            api_url: default_url(DEFAULT_API_URL),
            legacy_api_url: default_url(DEFAULT_LEGACY_API_URL),
            upstream_timeout: Duration::from_secs(10),
            upstream_max_in_flight: crate::bitbucket::DEFAULT_MAX_IN_FLIGHT,
            team_groups: Vec::new(),
            permission_cache_ttl: Duration::from_secs(600),
            refresh_cache_ttl: Duration::ZERO,
            rate_limit_backoff: Duration::from_secs(60),
        }
    }

    /// The same connector against other endpoints (a proxy, the fake):
    /// `authURL`, `tokenURL`, `apiURL`, `legacyAPIURL`, each checked as the
    /// file's are.
    pub fn with_endpoints(
        mut self,
        auth_url: &str,
        token_url: &str,
        api_url: &str,
        legacy_api_url: &str,
    ) -> Result<ConnectorConfig, String> {
        self.auth_url = parse_http_url(auth_url)?;
        self.token_url = parse_http_url(token_url)?;
        self.api_url = parse_http_url(api_url)?;
        self.legacy_api_url = parse_http_url(legacy_api_url)?;
        Ok(self)
    }
}

/// The built-in Bitbucket Cloud URLs; `default_urls_parse` tests each.
fn default_url(s: &'static str) -> Url {
    #[allow(clippy::expect_used)]
    Url::parse(s).expect("a built-in Bitbucket URL")
}

impl Config {
    /// Reads and validates a config file, with `$VAR`s taken from the process
    /// environment, and checks that the TLS files it names can be read: every
    /// problem is one `path.to.key: reason` line (the file's own name only
    /// where the file itself cannot be read or parsed).
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("{}: cannot read: {e}", path.display())]))?;
        let env: BTreeMap<String, String> = std::env::vars().collect();
        let tree = parse_yaml(&text)
            .map_err(|e| ConfigErrors(vec![format!("{}: {e}", path.display())]))?;
        Check::run(tree, &|name: &str| env.get(name).cloned(), true)
    }

    /// Parses and validates YAML text; `env` resolves `$VAR`s.
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
        let tree = parse_yaml(text).map_err(|e| ConfigErrors(vec![e]))?;
        Check::run(tree, env, false)
    }

    /// Problems that only show once files are looked at (TLS material).
    pub fn check_files(&self) -> Vec<String> {
        [
            ("grpc.tlsCert", &self.grpc.tls_cert),
            ("grpc.tlsKey", &self.grpc.tls_key),
            ("grpc.tlsClientCA", &self.grpc.tls_client_ca),
        ]
        .into_iter()
        .filter_map(|(key, p)| file_problem(key, p.as_deref()?))
        .collect()
    }
}

/// The YAML as a tree; a syntax error is one problem without a path.
fn parse_yaml(text: &str) -> Result<Value, String> {
    if text.trim().is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    // YAML 1.2 booleans (a secret `on` or `yes` stays a string), and errors
    // without the snippet of the file (it may hold a secret).
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    options.with_snippet = false;
    serde_saphyr::from_str_with_options(text, options).map_err(|e| {
        // The first line only: the rest quotes lines of the file.
        let e = e.to_string();
        let first = e.lines().next().unwrap_or_default().trim();
        let first = first.strip_prefix("error: ").unwrap_or(first);
        format!("invalid YAML: {first}")
    })
}

fn file_problem(key: &str, p: &Path) -> Option<String> {
    // Read, not only opened: a directory opens but does not read.
    let e = std::fs::read(p).err()?;
    Some(format!("{key}: cannot read {}: {e}", p.display()))
}

// The file as serde types. Every key is a `Field`, which holds what was there
// or the problem with it, so that one bad value never hides the others; keys
// that no struct names are collected by `serde_ignored` with their paths.

/// One key of the file: absent, `null`, a value, or why its value is unusable.
#[derive(Debug, Default)]
enum Field<T> {
    #[default]
    Absent,
    Null,
    Ok(T),
    Bad(String),
}

impl<T> Field<T> {
    /// Absent and `null` alike mean "not set".
    fn into_option(self) -> Result<Option<T>, String> {
        match self {
            Field::Absent | Field::Null => Ok(None),
            Field::Ok(v) => Ok(Some(v)),
            Field::Bad(e) => Err(e),
        }
    }
}

/// How a type is read as a `Field`: a scalar from its value, a section or a
/// list by visiting it (so that `serde_ignored` sees the keys inside).
trait Shape: Sized {
    fn field<'de, D: Deserializer<'de>>(d: D) -> Result<Field<Self>, D::Error>;
}

impl<'de, T: Shape> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::field(d)
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// A scalar key: its value, converted by `convert`.
fn scalar<'de, D: Deserializer<'de>, T>(
    d: D,
    convert: impl FnOnce(Value) -> Result<T, String>,
) -> Result<Field<T>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Null => Field::Null,
        v => convert(v).map_or_else(Field::Bad, Field::Ok),
    })
}

/// A string (numbers are accepted as their text), before any `$VAR` expansion.
#[derive(Debug)]
struct Text(String);

impl Shape for Text {
    fn field<'de, D: Deserializer<'de>>(d: D) -> Result<Field<Self>, D::Error> {
        scalar(d, |v| match v {
            Value::String(s) => Ok(Text(s)),
            Value::Number(n) => Ok(Text(n.to_string())),
            other => Err(format!("expected a string, got {}", kind(&other))),
        })
    }
}

impl Shape for bool {
    fn field<'de, D: Deserializer<'de>>(d: D) -> Result<Field<Self>, D::Error> {
        scalar(d, |v| match v {
            Value::Bool(b) => Ok(b),
            other => Err(format!("expected true or false, got {}", kind(&other))),
        })
    }
}

/// A number as written; whether it is a count in range is validation's call.
#[derive(Debug)]
struct Number(serde_json::Number);

impl Shape for Number {
    fn field<'de, D: Deserializer<'de>>(d: D) -> Result<Field<Self>, D::Error> {
        scalar(d, |v| match v {
            Value::Number(n) => Ok(Number(n)),
            other => Err(format!("expected a number, got {}", kind(&other))),
        })
    }
}

/// The durations of this file: Go's syntax, never negative.
impl Shape for Duration {
    fn field<'de, D: Deserializer<'de>>(d: D) -> Result<Field<Self>, D::Error> {
        Ok(match Text::field(d)? {
            Field::Ok(Text(s)) => match s.trim().parse::<GoDuration>() {
                Err(_) => Field::Bad(format!(
                    "{s:?} is not a duration (use Go's syntax: 500ms, 60s, 5m, 1h30m)"
                )),
                Ok(g) => match g.to_std() {
                    None => Field::Bad(format!("{s:?} is negative")),
                    Some(d) if d > MAX_DURATION => Field::Bad(format!(
                        "{s:?} is too long (at most {}s)",
                        MAX_DURATION.as_secs()
                    )),
                    Some(d) => Field::Ok(d),
                },
            },
            Field::Absent => Field::Absent,
            Field::Null => Field::Null,
            Field::Bad(e) => Field::Bad(e),
        })
    }
}

/// Longer than any timeout or TTL means; keeps `Instant + d` far from overflow.
const MAX_DURATION: Duration = Duration::from_secs(1_000_000_000);

/// A section: a mapping read into `T`.
#[derive(Debug, Default)]
struct Section<T>(T);

impl<T: for<'de> Deserialize<'de>> Shape for Section<T> {
    fn field<'de, D: Deserializer<'de>>(d: D) -> Result<Field<Self>, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Field<Section<T>>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(|t| Field::Ok(Section(t)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<Value>()?.is_some() {}
                Ok(Field::Bad("expected a mapping, got a list".into()))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Field::Null)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Field::Null)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Field::Bad("expected a mapping, got a boolean".into()))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Field::Bad("expected a mapping, got a number".into()))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Field::Bad("expected a mapping, got a number".into()))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Field::Bad("expected a mapping, got a number".into()))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Field::Bad("expected a mapping, got a string".into()))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// A list of `T`s, each a `Field` of its own (`key[i]`).
impl<T: Shape> Shape for Vec<Field<T>> {
    fn field<'de, D: Deserializer<'de>>(d: D) -> Result<Field<Self>, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Shape> Visitor<'de> for V<T> {
            type Value = Field<Vec<Field<T>>>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Field<T>>()? {
                    items.push(item);
                }
                Ok(Field::Ok(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<Value, Value>()?.is_some() {}
                Ok(Field::Bad("expected a list, got a mapping".into()))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Field::Null)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Field::Null)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Field::Bad("expected a list, got a boolean".into()))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Field::Bad("expected a list, got a number".into()))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Field::Bad("expected a list, got a number".into()))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Field::Bad("expected a list, got a number".into()))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Field::Bad("expected a list, got a string".into()))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

type List<T> = Field<Vec<Field<T>>>;

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawConfig {
    grpc: Field<Section<RawGrpc>>,
    telemetry: Field<Section<RawTelemetry>>,
    logger: Field<Section<RawLogger>>,
    connector_data: Field<Section<RawConnectorData>>,
    connectors: List<Section<RawConnector>>,
    cache: Field<Section<RawCache>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawGrpc {
    addr: Field<Text>,
    tls_cert: Field<Text>,
    tls_key: Field<Text>,
    #[serde(rename = "tlsClientCA")]
    tls_client_ca: Field<Text>,
    reflection: Field<bool>,
    auth_tokens: List<Text>,
    shutdown_timeout: Field<Duration>,
    max_request_bytes: Field<Number>,
    max_in_flight: Field<Number>,
    default_timeout: Field<Duration>,
    keepalive_interval: Field<Duration>,
    max_connections: Field<Number>,
    connection_idle_timeout: Field<Duration>,
    max_concurrent_streams: Field<Number>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawTelemetry {
    http: Field<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawLogger {
    level: Field<Text>,
    format: Field<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawConnectorData {
    keys: List<Text>,
    accept_dex_plaintext: Field<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawCache {
    redis: Field<Section<RawRedis>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawRedis {
    url: Field<Text>,
}

/// A dex connector entry.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawConnector {
    #[serde(rename = "type")]
    kind: Field<Text>,
    id: Field<Text>,
    name: Field<Text>,
    config: Field<Section<RawConnectorOptions>>,
}

/// A connector entry's `config`: dex's bitbucket-cloud keys, then ours.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawConnectorOptions {
    #[serde(rename = "clientID")]
    client_id: Field<Text>,
    client_secret: Field<Text>,
    #[serde(rename = "redirectURI")]
    redirect_uri: Field<Text>,
    teams: List<Text>,
    include_team_groups: Field<bool>,
    get_workspace_permissions: Field<bool>,
    team_groups_auth: Field<Section<RawBasicAuth>>,
    #[serde(rename = "teamGroupsCacheTTL")]
    team_groups_cache_ttl: Field<Duration>,
    #[serde(rename = "authURL")]
    auth_url: Field<Text>,
    #[serde(rename = "tokenURL")]
    token_url: Field<Text>,
    #[serde(rename = "apiURL")]
    api_url: Field<Text>,
    #[serde(rename = "legacyAPIURL")]
    legacy_api_url: Field<Text>,
    upstream_timeout: Field<Duration>,
    upstream_max_in_flight: Field<Number>,
    team_groups: List<Text>,
    #[serde(rename = "permissionCacheTTL")]
    permission_cache_ttl: Field<Duration>,
    #[serde(rename = "refreshCacheTTL")]
    refresh_cache_ttl: Field<Duration>,
    rate_limit_backoff: Field<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawBasicAuth {
    username: Field<Text>,
    password: Field<Text>,
}

/// The keys a derived struct accepts, as serde's derive lists them; for
/// "did you mean", so that no key is named twice.
fn keys_of<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    struct Keys<'a>(&'a mut &'static [&'static str]);
    impl<'de> Deserializer<'de> for Keys<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(serde::de::Error::custom("only the keys were wanted"))
        }
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("not a struct"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }
    let mut keys: &'static [&'static str] = &[];
    let _ = T::deserialize(Keys(&mut keys));
    keys
}

/// `a.b[0].c` from serde_ignored's path.
fn path_text(p: &serde_ignored::Path) -> String {
    use serde_ignored::Path as P;
    match p {
        P::Root => String::new(),
        P::Seq { parent, index } => format!("{}[{index}]", path_text(parent)),
        P::Map { parent, key } => join(&path_text(parent), key),
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            path_text(parent)
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// The allowed key closest to an unknown one, ignoring case, if it is near
/// enough to be a slip (one edit per four characters, at least one).
fn did_you_mean<'a>(key: &str, allowed: &[&'a str]) -> Option<&'a str> {
    let key = key.to_ascii_lowercase();
    allowed
        .iter()
        .map(|a| (strsim::osa_distance(&key, &a.to_ascii_lowercase()), *a))
        .filter(|(d, a)| *d <= (a.len().max(key.len()) / 4).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a)
}

/// The validation pass: raw file types -> `Config`, every problem recorded in
/// file order (a section's unknown keys first, then its keys as read).
struct Check<'a> {
    problems: Vec<String>,
    /// Unknown keys not reported yet: (path of their mapping, key).
    unknown: Vec<(String, String)>,
    env: &'a dyn Fn(&str) -> Option<String>,
    /// Also report TLS files that cannot be read (`Config::load`).
    check_files: bool,
}

impl Check<'_> {
    fn run(
        tree: Value,
        env: &dyn Fn(&str) -> Option<String>,
        check_files: bool,
    ) -> Result<Config, ConfigErrors> {
        let mut unknown = Vec::new();
        let raw: Result<Field<Section<RawConfig>>, _> =
            serde_ignored::deserialize(tree, |p: serde_ignored::Path| {
                if let serde_ignored::Path::Map { parent, key } = &p {
                    unknown.push((path_text(parent), key.clone()));
                }
            });
        let mut c = Check {
            problems: Vec::new(),
            unknown,
            env,
            check_files,
        };
        let cfg = match raw {
            Ok(raw) => c.section("", raw, |c, raw: RawConfig| c.config(raw)),
            // The `Field`s take any value, so this is not expected.
            Err(e) => {
                c.err("", e);
                None
            }
        };
        // Unknown keys under a section that was not read (none expected).
        for (parent, key) in std::mem::take(&mut c.unknown) {
            c.err(&join(&parent, &key), "unknown key");
        }
        match cfg {
            Some(cfg) if c.problems.is_empty() => Ok(cfg),
            _ => Err(ConfigErrors(c.problems)),
        }
    }

    fn err(&mut self, path: &str, msg: impl fmt::Display) {
        self.problems.push(format!("{path}: {msg}"));
    }

    /// A key's problem, if any, recorded; `None` when unset or unusable.
    fn get<T>(&mut self, path: &str, f: Field<T>) -> Option<T> {
        f.into_option().unwrap_or_else(|e| {
            self.err(path, e);
            None
        })
    }

    /// A section: its unknown keys, then `read` over it (an absent or `null`
    /// section reads as an empty one); `None` if it is no mapping.
    fn section<T, R>(
        &mut self,
        path: &str,
        f: Field<Section<T>>,
        read: impl FnOnce(&mut Self, T) -> R,
    ) -> Option<R>
    where
        T: Default + for<'de> Deserialize<'de>,
    {
        let raw = match f {
            Field::Absent | Field::Null => T::default(),
            Field::Ok(Section(t)) => t,
            Field::Bad(e) => {
                self.err(path, e);
                return None;
            }
        };
        let allowed = keys_of::<T>();
        let (here, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.unknown)
            .into_iter()
            .partition(|(parent, _)| parent == path);
        self.unknown = rest;
        for (_, key) in here {
            let hint = did_you_mean(&key, allowed)
                .map(|a| format!(" (did you mean {a:?}?)"))
                .unwrap_or_default();
            self.err(&join(path, &key), format!("unknown key{hint}"));
        }
        Some(read(self, raw))
    }

    /// A plain string, no expansion.
    fn raw_string(&mut self, path: &str, f: Field<Text>) -> Option<String> {
        self.get(path, f).map(|Text(s)| s)
    }

    /// A string with `$VAR` / `${VAR}` expanded.
    fn string(&mut self, path: &str, f: Field<Text>) -> Option<String> {
        let s = self.raw_string(path, f)?;
        expand_env(&s, self.env).map_err(|e| self.err(path, e)).ok()
    }

    /// A string that must be set and not blank, `$VAR`s expanded (or not):
    /// "required" only when nothing else was wrong with it.
    fn required(&mut self, path: &str, f: Field<Text>, expand: bool) -> String {
        let reported = matches!(f, Field::Bad(_));
        let v = if expand {
            let had = !matches!(f, Field::Absent | Field::Null);
            let v = self.string(path, f);
            if had && v.is_none() {
                return String::new();
            }
            v
        } else {
            self.raw_string(path, f)
        };
        match v {
            Some(s) if !s.trim().is_empty() => s,
            Some(_) => {
                self.err(path, "must not be empty");
                String::new()
            }
            None if reported => String::new(),
            None => {
                self.err(path, "required");
                String::new()
            }
        }
    }

    fn bool(&mut self, path: &str, f: Field<bool>, default: bool) -> bool {
        self.get(path, f).unwrap_or(default)
    }

    fn duration(&mut self, path: &str, f: Field<Duration>, default: Duration) -> Duration {
        self.get(path, f).unwrap_or(default)
    }

    fn count(&mut self, path: &str, f: Field<Number>, default: usize, min: usize) -> usize {
        let Some(Number(n)) = self.get(path, f) else {
            return default;
        };
        match n.as_u64().and_then(|n| usize::try_from(n).ok()) {
            Some(n) if n >= min => n,
            _ => {
                self.err(
                    path,
                    format!("expected a whole number of at least {min}, got {n}"),
                );
                default
            }
        }
    }

    /// A list of non-blank strings, `$VAR`s expanded or not.
    fn strings(&mut self, path: &str, f: List<Text>, expand: bool) -> Vec<String> {
        let items = self.get(path, f).unwrap_or_default();
        let mut out = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let p = format!("{path}[{i}]");
            let null = matches!(item, Field::Null);
            let s = if expand {
                self.string(&p, item)
            } else {
                self.raw_string(&p, item)
            };
            match s {
                Some(s) if !s.trim().is_empty() => out.push(s),
                Some(_) => self.err(&p, "must not be empty"),
                None if null => self.err(&p, "must not be empty"),
                None => {}
            }
        }
        out
    }

    fn url(&mut self, path: &str, f: Field<Text>, default: &'static str) -> Url {
        self.string(path, f)
            .and_then(|s| parse_http_url(&s).map_err(|e| self.err(path, e)).ok())
            .unwrap_or_else(|| default_url(default))
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let cache = self
            .section("cache", raw.cache, Self::cache)
            .unwrap_or_default();
        let grpc = self
            .section("grpc", raw.grpc, Self::grpc)
            .unwrap_or_default();
        let telemetry = self
            .section("telemetry", raw.telemetry, Self::telemetry)
            .unwrap_or_default();
        let logger = self
            .section("logger", raw.logger, Self::logger)
            .unwrap_or_default();
        let connector_data = self
            .section("connectorData", raw.connector_data, Self::connector_data)
            .unwrap_or_else(|| ConnectorDataConfig {
                keys: Vec::new(),
                accept_dex_plaintext: false,
            });
        let connectors = self.connectors(raw.connectors);
        Config {
            grpc,
            telemetry,
            logger,
            connector_data,
            connectors,
            cache,
        }
    }

    fn cache(&mut self, raw: RawCache) -> CacheConfig {
        if matches!(raw.redis, Field::Absent | Field::Null) {
            return CacheConfig::default();
        }
        let url = self.section("cache.redis", raw.redis, |c, r: RawRedis| {
            c.required("cache.redis.url", r.url, true)
        });
        let Some(url) = url.filter(|u| !u.is_empty()) else {
            return CacheConfig::default();
        };
        // The URL may carry a password: problems never repeat it.
        match Url::parse(&url) {
            Ok(u)
                if (u.scheme() == "redis" || u.scheme() == "rediss")
                    && u.host_str().is_some_and(|h| !h.is_empty()) =>
            {
                CacheConfig {
                    redis_url: Some(Secret::new(url)),
                }
            }
            Ok(u) if u.scheme() != "redis" && u.scheme() != "rediss" => {
                self.err(
                    "cache.redis.url",
                    format!("must be a redis:// or rediss:// URL, not {}://", u.scheme()),
                );
                CacheConfig::default()
            }
            _ => {
                self.err(
                    "cache.redis.url",
                    "is not a redis://[user:password@]host[:port][/db] URL",
                );
                CacheConfig::default()
            }
        }
    }

    fn grpc(&mut self, raw: RawGrpc) -> GrpcConfig {
        let d = GrpcConfig::default();
        let addr = match self.raw_string("grpc.addr", raw.addr) {
            None => d.addr,
            Some(s) => parse_listen_addr(&s).unwrap_or_else(|e| {
                self.err("grpc.addr", e);
                d.addr
            }),
        };
        let path = |c: &mut Self, key: &str, f: Field<Text>| {
            c.raw_string(key, f)
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        };
        let tls_cert = path(self, "grpc.tlsCert", raw.tls_cert);
        let tls_key = path(self, "grpc.tlsKey", raw.tls_key);
        let tls_client_ca = path(self, "grpc.tlsClientCA", raw.tls_client_ca);
        if self.check_files {
            for (key, p) in [
                ("grpc.tlsCert", &tls_cert),
                ("grpc.tlsKey", &tls_key),
                ("grpc.tlsClientCA", &tls_client_ca),
            ] {
                if let Some(e) = p.as_deref().and_then(|p| file_problem(key, p)) {
                    self.problems.push(e);
                }
            }
        }
        match (&tls_cert, &tls_key) {
            (Some(_), None) => self.err("grpc.tlsKey", "required when grpc.tlsCert is set"),
            (None, Some(_)) => self.err("grpc.tlsCert", "required when grpc.tlsKey is set"),
            _ => {}
        }
        if tls_client_ca.is_some() && tls_cert.is_none() {
            self.err(
                "grpc.tlsClientCA",
                "needs grpc.tlsCert and grpc.tlsKey (mTLS is TLS)",
            );
        }
        if matches!(addr, ListenAddr::Unix(_)) && tls_cert.is_some() {
            self.err("grpc.tlsCert", "TLS is not supported on a unix socket");
        }
        let auth_tokens = self
            .strings("grpc.authTokens", raw.auth_tokens, true)
            .into_iter()
            .map(Secret::new)
            .collect();
        GrpcConfig {
            addr,
            tls_cert,
            tls_key,
            tls_client_ca,
            reflection: self.bool("grpc.reflection", raw.reflection, d.reflection),
            auth_tokens,
            shutdown_timeout: self.duration(
                "grpc.shutdownTimeout",
                raw.shutdown_timeout,
                d.shutdown_timeout,
            ),
            max_request_bytes: self.count(
                "grpc.maxRequestBytes",
                raw.max_request_bytes,
                d.max_request_bytes,
                1024,
            ),
            max_in_flight: self.count("grpc.maxInFlight", raw.max_in_flight, d.max_in_flight, 1),
            default_timeout: self.duration(
                "grpc.defaultTimeout",
                raw.default_timeout,
                d.default_timeout,
            ),
            keepalive_interval: self.duration(
                "grpc.keepaliveInterval",
                raw.keepalive_interval,
                d.keepalive_interval,
            ),
            max_connections: self.count(
                "grpc.maxConnections",
                raw.max_connections,
                d.max_connections,
                1,
            ),
            connection_idle_timeout: self.duration(
                "grpc.connectionIdleTimeout",
                raw.connection_idle_timeout,
                d.connection_idle_timeout,
            ),
            max_concurrent_streams: self
                .count(
                    "grpc.maxConcurrentStreams",
                    raw.max_concurrent_streams,
                    d.max_concurrent_streams as usize,
                    1,
                )
                .min(u32::MAX as usize) as u32,
        }
    }

    fn telemetry(&mut self, raw: RawTelemetry) -> TelemetryConfig {
        let http = self
            .raw_string("telemetry.http", raw.http)
            .filter(|s| !s.is_empty());
        let http = http.and_then(|s| match parse_listen_addr(&s) {
            Ok(ListenAddr::Tcp(a)) => Some(a),
            Ok(ListenAddr::Unix(_)) => {
                self.err("telemetry.http", "must be host:port");
                None
            }
            Err(e) => {
                self.err("telemetry.http", e);
                None
            }
        });
        TelemetryConfig { http }
    }

    fn logger(&mut self, raw: RawLogger) -> LoggerConfig {
        let mut cfg = LoggerConfig::default();
        if let Some(l) = self.raw_string("logger.level", raw.level) {
            match l.to_ascii_lowercase().as_str() {
                "error" => cfg.level = tracing::Level::ERROR,
                "warn" | "warning" => cfg.level = tracing::Level::WARN,
                "info" => cfg.level = tracing::Level::INFO,
                "debug" => cfg.level = tracing::Level::DEBUG,
                "trace" => cfg.level = tracing::Level::TRACE,
                _ => self.err(
                    "logger.level",
                    format!("{l:?} is not one of error, warn, info, debug, trace"),
                ),
            }
        }
        if let Some(f) = self.raw_string("logger.format", raw.format) {
            match f.as_str() {
                "text" => cfg.format = LogFormat::Text,
                "json" => cfg.format = LogFormat::Json,
                _ => self.err("logger.format", format!("{f:?} is not one of text, json")),
            }
        }
        cfg
    }

    fn connector_data(&mut self, raw: RawConnectorData) -> ConnectorDataConfig {
        const P: &str = "connectorData.keys";
        let before = self.problems.len();
        let mut keys = Vec::new();
        let items = self.get(P, raw.keys).unwrap_or_default();
        for (i, item) in items.into_iter().enumerate() {
            let p = format!("{P}[{i}]");
            let null = matches!(item, Field::Null);
            match self.string(&p, item) {
                Some(s) => match decode_key(&s) {
                    Ok(k) => keys.push(k),
                    Err(e) => self.err(&p, e),
                },
                None if null => self.err(&p, "must not be empty"),
                None => {}
            }
        }
        if keys.is_empty() && self.problems.len() == before {
            self.err(
                P,
                "required: at least one key (base64 of 32 random bytes, e.g. `openssl rand -base64 32`)",
            );
        }
        ConnectorDataConfig {
            keys,
            accept_dex_plaintext: self.bool(
                "connectorData.acceptDexPlaintext",
                raw.accept_dex_plaintext,
                false,
            ),
        }
    }

    fn connectors(&mut self, f: List<Section<RawConnector>>) -> Vec<ConnectorConfig> {
        let items = match f {
            Field::Absent | Field::Null => Vec::new(),
            Field::Ok(items) => items,
            Field::Bad(e) => {
                self.err("connectors", e);
                return Vec::new();
            }
        };
        if items.is_empty() {
            self.err(
                "connectors",
                "at least one bitbucket-cloud connector is required",
            );
        }
        let mut out = Vec::new();
        let mut ids = HashSet::new();
        for (i, item) in items.into_iter().enumerate() {
            let p = format!("connectors[{i}]");
            if let Some(c) = self
                .section(&p, item, |c, raw| c.connector(&p, raw))
                .flatten()
            {
                if !ids.insert(c.id.clone()) {
                    self.err(
                        &join(&p, "id"),
                        format!("duplicate connector id {:?}", c.id),
                    );
                }
                out.push(c);
            }
        }
        out
    }

    fn connector(&mut self, p: &str, raw: RawConnector) -> Option<ConnectorConfig> {
        let ty = self.required(&join(p, "type"), raw.kind, false);
        if !ty.is_empty() && ty != CONNECTOR_TYPE {
            self.err(
                &join(p, "type"),
                format!("unsupported connector type {ty:?} (only {CONNECTOR_TYPE:?})"),
            );
        }
        let id = self.required(&join(p, "id"), raw.id, false);
        let name = self.raw_string(&join(p, "name"), raw.name);
        let cp = join(p, "config");
        if matches!(raw.config, Field::Absent) {
            self.err(&cp, "required");
        }
        let mut c = self
            .section(&cp, raw.config, |c, raw| c.connector_options(&cp, raw))?
            .with_id(id);
        if let Some(name) = name {
            c.name = name;
        }
        Some(c)
    }

    fn connector_options(&mut self, cp: &str, raw: RawConnectorOptions) -> ConnectorConfig {
        let k = |key: &str| join(cp, key);
        let client_id = self.required(&k("clientID"), raw.client_id, true);
        let client_secret = Secret::new(self.required(&k("clientSecret"), raw.client_secret, true));
        let redirect_uri = self.required(&k("redirectURI"), raw.redirect_uri, true);
        if !redirect_uri.is_empty() {
            if let Err(e) = parse_http_url(&redirect_uri) {
                self.err(&k("redirectURI"), e);
            }
        }
        let d = ConnectorConfig::new("", "", Secret::default(), "");
        let teams = self.strings(&k("teams"), raw.teams, true);
        let include_team_groups = self.bool(
            &k("includeTeamGroups"),
            raw.include_team_groups,
            d.include_team_groups,
        );
        let get_workspace_permissions = self.bool(
            &k("getWorkspacePermissions"),
            raw.get_workspace_permissions,
            d.get_workspace_permissions,
        );
        let ap = k("teamGroupsAuth");
        let team_groups_auth = if matches!(raw.team_groups_auth, Field::Absent | Field::Null) {
            None
        } else {
            self.section(&ap, raw.team_groups_auth, |c, a: RawBasicAuth| {
                let u = c.required(&join(&ap, "username"), a.username, true);
                let pw = c.required(&join(&ap, "password"), a.password, true);
                (!u.is_empty() && !pw.is_empty()).then(|| BasicAuth {
                    username: u,
                    password: Secret::new(pw),
                })
            })
            .flatten()
        };
        let team_groups_cache_ttl = self.duration(
            &k("teamGroupsCacheTTL"),
            raw.team_groups_cache_ttl,
            d.team_groups_cache_ttl,
        );
        let mut team_groups = Vec::new();
        for (i, entry) in self
            .strings(&k("teamGroups"), raw.team_groups, true)
            .into_iter()
            .enumerate()
        {
            match entry.trim().split_once('/') {
                Some((w, g)) if is_slug(w) && is_slug(g) => team_groups.push(TeamGroup {
                    workspace: w.to_string(),
                    group: g.to_string(),
                }),
                _ => self.err(
                    &format!("{}[{i}]", k("teamGroups")),
                    format!("expected \"workspace/group-slug\", got {entry:?}"),
                ),
            }
        }
        let permission_cache_ttl = self.duration(
            &k("permissionCacheTTL"),
            raw.permission_cache_ttl,
            d.permission_cache_ttl,
        );
        let refresh_cache_ttl = self.duration(
            &k("refreshCacheTTL"),
            raw.refresh_cache_ttl,
            d.refresh_cache_ttl,
        );
        let rate_limit_backoff = self.duration(
            &k("rateLimitBackoff"),
            raw.rate_limit_backoff,
            d.rate_limit_backoff,
        );
        if rate_limit_backoff.is_zero() {
            self.err(&k("rateLimitBackoff"), "must be more than 0s");
        }
        ConnectorConfig {
            client_id,
            client_secret,
            redirect_uri,
            teams,
            include_team_groups,
            get_workspace_permissions,
            team_groups_auth,
            team_groups_cache_ttl,
            auth_url: self.url(&k("authURL"), raw.auth_url, DEFAULT_AUTH_URL),
            token_url: self.url(&k("tokenURL"), raw.token_url, DEFAULT_TOKEN_URL),
            api_url: self.url(&k("apiURL"), raw.api_url, DEFAULT_API_URL),
            legacy_api_url: self.url(
                &k("legacyAPIURL"),
                raw.legacy_api_url,
                DEFAULT_LEGACY_API_URL,
            ),
            upstream_timeout: self.duration(
                &k("upstreamTimeout"),
                raw.upstream_timeout,
                d.upstream_timeout,
            ),
            upstream_max_in_flight: self.count(
                &k("upstreamMaxInFlight"),
                raw.upstream_max_in_flight,
                d.upstream_max_in_flight,
                1,
            ),
            team_groups,
            permission_cache_ttl,
            refresh_cache_ttl,
            rate_limit_backoff,
            ..d
        }
    }
}

impl ConnectorConfig {
    fn with_id(mut self, id: String) -> Self {
        self.id = id;
        self
    }
}

/// A Bitbucket slug: what a workspace or group slug may be made of.
fn is_slug(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~'))
}

/// Expands `$VAR` and `${VAR}` (dex's rule); `$$` is a literal `$`. An unset
/// variable is an error naming it.
pub fn expand_env(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.char_indices().peekable();
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    while let Some((_, c)) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        match chars.peek().copied() {
            Some((_, '$')) => {
                chars.next();
                out.push('$');
            }
            Some((start, '{')) => {
                chars.next();
                let rest = &s[start + 1..];
                let Some(end) = rest.find('}') else {
                    return Err("unterminated ${ in value".to_string());
                };
                let name = &rest[..end];
                if name.is_empty() || !name.chars().all(is_name) {
                    return Err(format!("invalid variable name ${{{name}}}"));
                }
                for _ in 0..=end {
                    chars.next();
                }
                out.push_str(&lookup(name, env)?);
            }
            Some((start, c)) if is_name(c) => {
                let mut end = start;
                while let Some(&(i, c)) = chars.peek() {
                    if !is_name(c) {
                        break;
                    }
                    end = i + c.len_utf8();
                    chars.next();
                }
                out.push_str(&lookup(&s[start..end], env)?);
            }
            _ => out.push('$'),
        }
    }
    Ok(out)
}

fn lookup(name: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    env(name).ok_or_else(|| format!("environment variable ${name} is not set"))
}

/// `host:port` or `unix:/path`.
pub fn parse_listen_addr(s: &str) -> Result<ListenAddr, String> {
    if let Some(p) = s.strip_prefix("unix:") {
        let p = p.strip_prefix("//").unwrap_or(p);
        if p.is_empty() {
            return Err("unix: needs a socket path".to_string());
        }
        return Ok(ListenAddr::Unix(PathBuf::from(p)));
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(ListenAddr::Tcp(a));
    }
    // A host name: only localhost resolves without asking DNS.
    if let Some(port) = s.strip_prefix("localhost:") {
        if let Ok(port) = port.parse::<u16>() {
            return Ok(ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], port))));
        }
    }
    if let Some(port) = s.strip_prefix(':') {
        if let Ok(port) = port.parse::<u16>() {
            return Ok(ListenAddr::Tcp(SocketAddr::from(([0, 0, 0, 0], port))));
        }
    }
    Err(format!(
        "{s:?} is not an address (use IP:port such as 127.0.0.1:5557, [::1]:5557, :5557, or unix:/path/to.sock)"
    ))
}

fn parse_http_url(s: &str) -> Result<Url, String> {
    let u = Url::parse(s).map_err(|e| format!("{s:?} is not an absolute URL: {e}"))?;
    if u.scheme() != "http" && u.scheme() != "https" {
        return Err(format!("{s:?} must be an http or https URL"));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(format!("{s:?} has no host"));
    }
    Ok(u)
}

/// Base64 (standard or URL-safe, padded or not) of exactly 32 bytes.
pub fn decode_key(s: &str) -> Result<DataKey, String> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let t = s.trim();
    let bytes = [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(t).ok())
        .ok_or_else(|| "not valid base64 (standard or URL-safe)".to_string())?;
    let arr: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
        format!(
            "must decode to 32 bytes, got {} (e.g. `openssl rand -base64 32`)",
            bytes.len()
        )
    })?;
    Ok(DataKey(arr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SECRET" => Some("s3cret-value".into()),
            "KEY" => Some("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".into()),
            "ID" => Some("client-id".into()),
            _ => None,
        }
    }

    const GOOD: &str = r#"
grpc:
  addr: 127.0.0.1:0
connectorData:
  keys: [$KEY]
connectors:
- type: bitbucket-cloud
  id: bitbucket-cloud
  name: Bitbucket Cloud
  config:
    clientID: ${ID}
    clientSecret: $SECRET
    redirectURI: http://127.0.0.1:5556/dex/callback
    teams: [my-team, "{6f0c3a52-0000-0000-0000-000000000000}"]
    includeTeamGroups: true
    teamGroupsCacheTTL: 1m30s
"#;

    #[test]
    fn parses_a_good_config_with_env_expansion() {
        let c = Config::parse(GOOD, &env).unwrap();
        let k = &c.connectors[0];
        assert_eq!(k.client_id, "client-id");
        assert_eq!(k.client_secret.expose(), "s3cret-value");
        assert_eq!(k.teams.len(), 2);
        assert_eq!(k.team_groups_cache_ttl, Duration::from_secs(90));
        assert_eq!(c.connector_data.keys[0].0[31], 31);
        assert_eq!(c.grpc.shutdown_timeout, Duration::from_secs(10));
        assert!(c.grpc.reflection);
        assert_eq!(k.api_url.as_str(), "https://api.bitbucket.org/2.0");
    }

    #[test]
    fn budget_keys_have_defaults_and_are_checked() {
        let c = Config::parse(GOOD, &env).unwrap();
        let k = &c.connectors[0];
        assert_eq!(k.permission_cache_ttl, Duration::from_secs(600));
        assert_eq!(k.refresh_cache_ttl, Duration::ZERO);
        assert_eq!(k.rate_limit_backoff, Duration::from_secs(60));
        assert!(k.team_groups.is_empty());
        let set = GOOD.replace(
            "    includeTeamGroups: true\n",
            "    teamGroups: [my-team/devs, \"${TEAM}/ops\"]\n    permissionCacheTTL: 1m\n    refreshCacheTTL: 30s\n    rateLimitBackoff: 5s\n",
        );
        let env_team = |n: &str| {
            if n == "TEAM" {
                Some("other".to_string())
            } else {
                env(n)
            }
        };
        let k = &Config::parse(&set, &env_team).unwrap().connectors[0];
        assert_eq!(
            k.team_groups,
            [
                TeamGroup {
                    workspace: "my-team".into(),
                    group: "devs".into()
                },
                TeamGroup {
                    workspace: "other".into(),
                    group: "ops".into()
                },
            ]
        );
        assert_eq!(k.permission_cache_ttl, Duration::from_secs(60));
        assert_eq!(k.refresh_cache_ttl, Duration::from_secs(30));
        assert_eq!(k.rate_limit_backoff, Duration::from_secs(5));
        let bad = GOOD.replace(
            "    includeTeamGroups: true\n",
            "    teamGroups: [devs, a/b/c, \"a/\"]\n    refreshCacheTTL: soon\n    rateLimitBackoff: 0s\n",
        );
        let e = Config::parse(&bad, &env).unwrap_err().0;
        for path in [
            "connectors[0].config.teamGroups[0]",
            "connectors[0].config.teamGroups[1]",
            "connectors[0].config.teamGroups[2]",
            "connectors[0].config.refreshCacheTTL",
            "connectors[0].config.rateLimitBackoff",
        ] {
            assert!(e.iter().any(|m| m.starts_with(path)), "{path} in {e:?}");
        }
    }

    #[test]
    fn connection_limits_default_and_must_be_positive() {
        let c = Config::parse(GOOD, &env).unwrap();
        assert_eq!(c.grpc.max_connections, 1024);
        assert_eq!(c.grpc.connection_idle_timeout, Duration::from_secs(300));
        assert_eq!(c.grpc.max_concurrent_streams, 100);
        let with = |lines: &str| GOOD.replacen("grpc:\n", &format!("grpc:\n{lines}"), 1);
        let c = Config::parse(
            &with("  maxConnections: 7\n  connectionIdleTimeout: 90s\n  maxConcurrentStreams: 3\n"),
            &env,
        )
        .unwrap();
        assert_eq!(c.grpc.max_connections, 7);
        assert_eq!(c.grpc.connection_idle_timeout, Duration::from_secs(90));
        assert_eq!(c.grpc.max_concurrent_streams, 3);
        let errs = Config::parse(
            &with(
                "  maxConnections: 0\n  connectionIdleTimeout: soon\n  maxConcurrentStreams: 0\n",
            ),
            &env,
        )
        .unwrap_err()
        .0;
        assert_eq!(errs.len(), 3, "{errs:?}");
        for (e, key) in errs.iter().zip([
            "grpc.maxConnections: ",
            "grpc.connectionIdleTimeout: ",
            "grpc.maxConcurrentStreams: ",
        ]) {
            assert!(e.starts_with(key), "{errs:?}");
        }
    }

    #[test]
    fn cache_redis_url_expands_vars_and_never_repeats_the_password() {
        assert!(Config::parse(GOOD, &env).unwrap().cache.redis_url.is_none());
        let with = |url: &str| format!("cache:\n  redis:\n    url: {url}\n{GOOD}");
        let env_pw = |n: &str| match n {
            "REDIS_PW" => Some("pw-0123456789".to_string()),
            n => env(n),
        };
        let c = Config::parse(&with("rediss://:$REDIS_PW@redis:6380/1"), &env_pw).unwrap();
        let url = c.cache.redis_url.unwrap();
        assert_eq!(url.expose(), "rediss://:pw-0123456789@redis:6380/1");
        assert!(!format!("{url:?}").contains("pw-0123456789"));
        for bad in [
            "http://:pw-0123456789@redis:6379",
            "redis://:pw-0123456789@",
            "nonsense pw-0123456789",
        ] {
            let e = Config::parse(&with(bad), &env).unwrap_err().0;
            assert!(
                e.iter().any(|m| m.starts_with("cache.redis.url: ")),
                "{e:?}"
            );
            assert!(!e.iter().any(|m| m.contains("pw-0123456789")), "{e:?}");
        }
        let e = Config::parse(&with("redis://:$UNSET_PW@redis"), &env)
            .unwrap_err()
            .0;
        assert!(
            e.iter()
                .any(|m| m.starts_with("cache.redis.url: ") && m.contains("UNSET_PW")),
            "{e:?}"
        );
        let e = Config::parse(&format!("cache:\n  redis:\n    uri: x\n{GOOD}"), &env)
            .unwrap_err()
            .0;
        assert!(
            e.iter()
                .any(|m| m.starts_with("cache.redis.uri: unknown key")),
            "{e:?}"
        );
    }

    #[test]
    fn upstream_max_in_flight_defaults_to_256_and_must_be_positive() {
        let c = Config::parse(GOOD, &env).unwrap();
        assert_eq!(c.connectors[0].upstream_max_in_flight, 256);
        let set = GOOD.replace(
            "    includeTeamGroups: true\n",
            "    upstreamMaxInFlight: 8\n",
        );
        assert_eq!(
            Config::parse(&set, &env).unwrap().connectors[0].upstream_max_in_flight,
            8
        );
        for bad in ["0", "-1", "many"] {
            let text = GOOD.replace(
                "    includeTeamGroups: true\n",
                &format!("    upstreamMaxInFlight: {bad}\n"),
            );
            let errs = Config::parse(&text, &env).unwrap_err().0;
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert!(
                errs[0].starts_with("connectors[0].config.upstreamMaxInFlight: "),
                "{errs:?}"
            );
        }
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let c = Config::parse(GOOD, &env).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cret-value"), "{dbg}");
        assert!(!dbg.contains("AAECAwQF"), "{dbg}");
        assert!(dbg.contains("[redacted]"));
        assert!(!c.connectors[0].summary().contains("s3cret"));
    }

    #[test]
    fn reports_every_problem_at_once_with_paths() {
        let text = r#"
grpc:
  adr: 127.0.0.1:5557
  shutdownTimeout: soon
connectorData:
  keys: [dG9vc2hvcnQ=]
connectors:
- type: github
  id: a
  config:
    clientSecret: $NOPE
    redirectURI: /callback
- type: bitbucket-cloud
  id: a
  config: {clientID: x, clientSecret: on, redirectURI: "https://x/cb"}
"#;
        let errs = Config::parse(text, &env).unwrap_err().0;
        let want = [
            "grpc.adr: unknown key",
            "grpc.shutdownTimeout: \"soon\" is not a duration",
            "connectorData.keys[0]: must decode to 32 bytes, got 8",
            "connectors[0].type: unsupported connector type \"github\"",
            "connectors[0].config.clientID: required",
            "connectors[0].config.clientSecret: environment variable $NOPE is not set",
            "connectors[0].config.redirectURI: \"/callback\" is not an absolute URL",
            "connectors[1].id: duplicate connector id \"a\"",
        ];
        for w in want {
            assert!(
                errs.iter().any(|e| e.starts_with(w)),
                "missing {w:?} in {errs:#?}"
            );
        }
        assert_eq!(errs.len(), want.len(), "{errs:#?}");
    }

    #[test]
    fn unknown_keys_suggest_the_nearest_allowed_key() {
        let allowed = ["includeTeamGroups", "teams", "teamGroupsAuth", "tlsCert"];
        assert_eq!(
            did_you_mean("includeTeamsGroups", &allowed),
            Some("includeTeamGroups")
        );
        assert_eq!(did_you_mean("TLSCERT", &allowed), Some("tlsCert"));
        assert_eq!(did_you_mean("team", &allowed), Some("teams"));
        assert_eq!(did_you_mean("colour", &allowed), None);
        assert_eq!(did_you_mean("groups", &allowed), None);
    }

    #[test]
    fn an_empty_file_names_what_is_required() {
        let errs = Config::parse("", &env).unwrap_err().0;
        assert!(errs
            .iter()
            .any(|e| e.starts_with("connectorData.keys: required")));
        assert!(errs
            .iter()
            .any(|e| e.starts_with("connectors: at least one")));
    }

    #[test]
    fn yaml_syntax_errors_are_one_problem() {
        let errs = Config::parse("grpc: [unclosed", &env).unwrap_err().0;
        assert_eq!(errs.len(), 1);
        assert!(errs[0].starts_with("invalid YAML"), "{errs:?}");
    }

    #[test]
    fn every_unknown_key_is_reported_with_its_path_and_the_rest_still_checked() {
        let text = GOOD
            .replacen("grpc:\n", "colour: red\ngrpc:\n  adr: x\n  tlsCrt: y\n", 1)
            .replace(
                "    includeTeamGroups: true\n",
                "    includeTeamGroups: yes\n    teamGroupsAuth: {user: u, password: p}\n",
            )
            .replace(
                "  name: Bitbucket Cloud\n",
                "  name: Bitbucket Cloud\n  nmae: x\n",
            );
        let errs = Config::parse(&text, &env).unwrap_err().0;
        assert_eq!(
            errs,
            [
                "colour: unknown key",
                "grpc.adr: unknown key (did you mean \"addr\"?)",
                "grpc.tlsCrt: unknown key (did you mean \"tlsCert\"?)",
                "connectors[0].nmae: unknown key (did you mean \"name\"?)",
                "connectors[0].config.includeTeamGroups: expected true or false, got a string",
                "connectors[0].config.teamGroupsAuth.user: unknown key",
                "connectors[0].config.teamGroupsAuth.username: required",
            ]
        );
    }

    #[test]
    fn a_config_built_in_code_has_the_defaults_of_an_empty_file_section() {
        let file = Config::parse(GOOD, &env).unwrap();
        let c = ConnectorConfig::new(
            "bitbucket-cloud",
            "client-id",
            Secret::new("s"),
            "http://127.0.0.1:5556/dex/callback",
        );
        let code = Config::new(file.connector_data.keys.clone(), vec![c]);
        let (f, k) = (&file.connectors[0], &code.connectors[0]);
        assert_eq!(
            (
                k.name.as_str(),
                k.api_url.as_str(),
                k.legacy_api_url.as_str(),
                k.auth_url.as_str(),
                k.token_url.as_str()
            ),
            (
                f.name.as_str(),
                f.api_url.as_str(),
                f.legacy_api_url.as_str(),
                f.auth_url.as_str(),
                f.token_url.as_str()
            )
        );
        assert_eq!(
            (
                k.upstream_timeout,
                k.upstream_max_in_flight,
                k.permission_cache_ttl,
                k.refresh_cache_ttl,
                k.rate_limit_backoff
            ),
            (
                f.upstream_timeout,
                f.upstream_max_in_flight,
                f.permission_cache_ttl,
                f.refresh_cache_ttl,
                f.rate_limit_backoff
            )
        );
        assert_eq!(
            format!("{:?}", code.grpc),
            format!(
                "{:?}",
                Config::parse(&GOOD.replace("  addr: 127.0.0.1:0\n", ""), &env)
                    .unwrap()
                    .grpc
            )
        );
        assert_eq!(format!("{:?}", code.logger), format!("{:?}", file.logger));
        let moved = ConnectorConfig::new("x", "y", Secret::new("z"), "http://h/cb")
            .with_endpoints(
                "http://127.0.0.1:1/a",
                "http://127.0.0.1:1/t",
                "http://127.0.0.1:1/2.0",
                "http://127.0.0.1:1/1.0",
            )
            .unwrap();
        assert_eq!(moved.api_url.as_str(), "http://127.0.0.1:1/2.0");
        assert!(
            ConnectorConfig::new("x", "y", Secret::new("z"), "http://h/cb")
                .with_endpoints("ftp://h/a", "http://h/t", "http://h/2.0", "http://h/1.0")
                .is_err()
        );
    }

    #[test]
    fn default_urls_parse() {
        for u in [
            DEFAULT_AUTH_URL,
            DEFAULT_TOKEN_URL,
            DEFAULT_API_URL,
            DEFAULT_LEGACY_API_URL,
        ] {
            assert_eq!(default_url(u).as_str().trim_end_matches('/'), u);
        }
    }

    #[test]
    fn durations_use_go_syntax_and_are_never_negative() {
        let with =
            |d: &str| GOOD.replacen("grpc:\n", &format!("grpc:\n  shutdownTimeout: {d}\n"), 1);
        let timeout = |d: &str| Config::parse(&with(d), &env).map(|c| c.grpc.shutdown_timeout);
        assert_eq!(timeout("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(timeout("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(timeout("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(timeout("0"), Ok(Duration::ZERO));
        assert_eq!(timeout("0s"), Ok(Duration::ZERO));
        assert_eq!(timeout("\" 5s \""), Ok(Duration::from_secs(5)));
        for bad in [
            "\"\"", "10", "s", "-1s", "1d", "1h-", "1..5s", "300000h", "[5s]",
        ] {
            let e = timeout(bad).unwrap_err().0;
            assert_eq!(e.len(), 1, "{bad}: {e:?}");
            assert!(e[0].starts_with("grpc.shutdownTimeout: "), "{bad}: {e:?}");
        }
        assert_eq!(
            timeout("-1s").unwrap_err().0,
            ["grpc.shutdownTimeout: \"-1s\" is negative"]
        );
        assert_eq!(
            timeout("1d").unwrap_err().0,
            ["grpc.shutdownTimeout: \"1d\" is not a duration (use Go's syntax: 500ms, 60s, 5m, 1h30m)"]
        );
    }

    #[test]
    fn env_expansion_rules() {
        assert_eq!(
            expand_env("a$ID-${ID}b", &env).unwrap(),
            "aclient-id-client-idb"
        );
        assert_eq!(expand_env("cost $$5", &env).unwrap(), "cost $5");
        assert_eq!(expand_env("trailing $", &env).unwrap(), "trailing $");
        assert!(expand_env("$MISSING", &env)
            .unwrap_err()
            .contains("$MISSING"));
        assert!(expand_env("${ID", &env).is_err());
        assert_eq!(
            expand_env("ünïcode $ID", &env).unwrap(),
            "ünïcode client-id"
        );
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen_addr("unix:/tmp/x.sock"),
            Ok(ListenAddr::Unix("/tmp/x.sock".into()))
        );
        assert!(matches!(
            parse_listen_addr("[::1]:5557"),
            Ok(ListenAddr::Tcp(_))
        ));
        assert!(matches!(parse_listen_addr(":5557"), Ok(ListenAddr::Tcp(_))));
        assert!(parse_listen_addr("example.com:5557").is_err());
    }

    #[test]
    fn keys_accept_both_base64_alphabets() {
        let std_key = "+/+/+/+/+/+/+/+/+/+/+/+/+/+/+/+/+/+/+/+/+/8=";
        let url_key = "-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_8";
        assert_eq!(
            decode_key(std_key).unwrap().0,
            decode_key(url_key).unwrap().0
        );
    }
}

/// Property tests: `cargo test --lib fuzz_` (PROPTEST_CASES=N for more).
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &str = "grpc:\n  addr: 127.0.0.1:5557\nconnectorData:\n  keys: [AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=]\nconnectors:\n- type: bitbucket-cloud\n  id: bb\n  config:\n    clientID: id\n    clientSecret: top-secret-value\n    redirectURI: http://127.0.0.1:5556/cb\n    teams: [a]\n    teamGroupsCacheTTL: 60s\n";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(1000)))]

        #[test]
        fn fuzz_arbitrary_text_never_panics(text in ".{0,400}") {
            let _ = Config::parse(&text, &no_env);
        }

        /// Any one line of a good config replaced by junk: either still valid,
        /// or every problem is a `path: reason` line, and the secret never shows.
        #[test]
        fn fuzz_mutated_configs_report_problems_with_paths(line in 0usize..14, junk in "[ -~]{0,30}") {
            let mut lines: Vec<String> = GOOD.lines().map(str::to_string).collect();
            let i = line % lines.len();
            let indent: String = lines[i].chars().take_while(|c| *c == ' ').collect();
            lines[i] = format!("{indent}{junk}");
            let text = lines.join("\n");
            match Config::parse(&text, &no_env) {
                Ok(_) => {}
                Err(ConfigErrors(errs)) => {
                    prop_assert!(!errs.is_empty());
                    for e in &errs {
                        prop_assert!(e.contains(": "), "{}", e);
                        prop_assert!(!e.contains("top-secret-value"), "{}", e);
                    }
                }
            }
        }

        #[test]
        fn fuzz_durations_never_panic(s in ".{0,30}") {
            let _ = s.parse::<GoDuration>();
        }

        #[test]
        fn fuzz_env_expansion_never_panics(s in ".{0,60}") {
            let _ = expand_env(&s, &|n: &str| (n.len() % 2 == 0).then(|| "v".to_string()));
        }
    }
}
