//! The YAML config file -> a validated [`Config`].
//!
//! The file is read into a generic tree first and walked by hand, so that every
//! problem (unknown key, wrong type, missing value, unset `$VAR`, bad duration…)
//! is reported at once with its key path, as `path.to.key: reason`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;
use url::Url;

use crate::secret::Secret;

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

impl Config {
    /// Reads and validates a config file, with `$VAR`s taken from the process
    /// environment, and checks that the TLS files it names can be read: every
    /// problem is one `path.to.key: reason` line (the file's own name only
    /// where the file itself cannot be read or parsed).
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("{}: cannot read: {e}", path.display())]))?;
        let env: BTreeMap<String, String> = std::env::vars().collect();
        Config::parse_inner(&text, &|name: &str| env.get(name).cloned(), true).map_err(
            |ConfigErrors(errs)| {
                ConfigErrors(
                    errs.into_iter()
                        .map(|e| match e.strip_prefix(YAML_ERROR) {
                            Some(rest) => format!("{}: {YAML_ERROR}{rest}", path.display()),
                            None => e,
                        })
                        .collect(),
                )
            },
        )
    }

    /// Parses and validates YAML text; `env` resolves `$VAR`s.
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
        Config::parse_inner(text, env, false)
    }

    fn parse_inner(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
        check_files: bool,
    ) -> Result<Config, ConfigErrors> {
        let tree: Value = if text.trim().is_empty() {
            Value::Object(Default::default())
        } else {
            // YAML 1.2 booleans (a secret `on` or `yes` stays a string), and
            // errors without the snippet of the file (it may hold a secret).
            let mut options = serde_saphyr::Options::default();
            options.strict_booleans = true;
            options.with_snippet = false;
            serde_saphyr::from_str_with_options(text, options)
                .map_err(|e| ConfigErrors(vec![yaml_error(&e.to_string())]))?
        };
        let mut w = Walker {
            errors: Vec::new(),
            env,
            check_files,
        };
        let cfg = w.config(&tree);
        match cfg {
            Some(cfg) if w.errors.is_empty() => Ok(cfg),
            _ => Err(ConfigErrors(w.errors)),
        }
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

fn file_problem(key: &str, p: &Path) -> Option<String> {
    // Read, not only opened: a directory opens but does not read.
    let e = std::fs::read(p).err()?;
    Some(format!("{key}: cannot read {}: {e}", p.display()))
}

const YAML_ERROR: &str = "invalid YAML: ";

/// The parser's first line only: its rendering quotes lines of the file,
/// which may hold a secret.
fn yaml_error(e: &str) -> String {
    let first = e.lines().next().unwrap_or_default().trim();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    format!("{YAML_ERROR}{first}")
}

struct Walker<'a> {
    errors: Vec<String>,
    env: &'a dyn Fn(&str) -> Option<String>,
    /// Also report TLS files that cannot be read (`Config::load`).
    check_files: bool,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

type Map = serde_json::Map<String, Value>;

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

impl Walker<'_> {
    fn err(&mut self, path: &str, msg: impl fmt::Display) {
        self.errors.push(format!("{path}: {msg}"));
    }

    /// A mapping with only `allowed` keys; `null` counts as empty.
    fn object<'v>(
        &mut self,
        path: &str,
        v: Option<&'v Value>,
        allowed: &[&str],
    ) -> Option<&'v Map> {
        static EMPTY: std::sync::OnceLock<Map> = std::sync::OnceLock::new();
        match v {
            None | Some(Value::Null) => Some(EMPTY.get_or_init(Map::new)),
            Some(Value::Object(m)) => {
                for k in m.keys() {
                    if !allowed.contains(&k.as_str()) {
                        let hint = did_you_mean(k, allowed)
                            .map(|a| format!(" (did you mean {a:?}?)"))
                            .unwrap_or_default();
                        self.err(&join(path, k), format!("unknown key{hint}"));
                    }
                }
                Some(m)
            }
            Some(other) => {
                self.err(
                    path,
                    format!("expected a mapping, got {}", type_name(other)),
                );
                None
            }
        }
    }

    /// A plain string, no expansion. Numbers are accepted as their text.
    fn raw_string(&mut self, path: &str, v: Option<&Value>) -> Option<String> {
        match v {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(other) => {
                self.err(path, format!("expected a string, got {}", type_name(other)));
                None
            }
        }
    }

    /// A string with `$VAR` / `${VAR}` expanded.
    fn string(&mut self, path: &str, v: Option<&Value>) -> Option<String> {
        let s = self.raw_string(path, v)?;
        match expand_env(&s, self.env) {
            Ok(s) => Some(s),
            Err(e) => {
                self.err(path, e);
                None
            }
        }
    }

    fn required(&mut self, path: &str, v: Option<String>) -> String {
        let reported = format!("{path}: ");
        if v.is_none() && self.errors.iter().any(|e| e.starts_with(&reported)) {
            return String::new();
        }
        match v {
            Some(s) if !s.trim().is_empty() => s,
            Some(_) => {
                self.err(path, "must not be empty");
                String::new()
            }
            None => {
                self.err(path, "required");
                String::new()
            }
        }
    }

    fn bool(&mut self, path: &str, v: Option<&Value>, default: bool) -> bool {
        match v {
            None | Some(Value::Null) => default,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                self.err(
                    path,
                    format!("expected true or false, got {}", type_name(other)),
                );
                default
            }
        }
    }

    fn duration(&mut self, path: &str, v: Option<&Value>, default: Duration) -> Duration {
        let Some(s) = self.raw_string(path, v) else {
            return default;
        };
        match parse_go_duration(&s) {
            Ok(d) => d,
            Err(e) => {
                self.err(path, e);
                default
            }
        }
    }

    fn usize(&mut self, path: &str, v: Option<&Value>, default: usize, min: usize) -> usize {
        match v {
            None | Some(Value::Null) => default,
            Some(Value::Number(n)) => match n.as_u64().and_then(|n| usize::try_from(n).ok()) {
                Some(n) if n >= min => n,
                _ => {
                    self.err(
                        path,
                        format!("expected a whole number of at least {min}, got {n}"),
                    );
                    default
                }
            },
            Some(other) => {
                self.err(path, format!("expected a number, got {}", type_name(other)));
                default
            }
        }
    }

    fn list<'v>(&mut self, path: &str, v: Option<&'v Value>) -> &'v [Value] {
        match v {
            None | Some(Value::Null) => &[],
            Some(Value::Array(a)) => a,
            Some(other) => {
                self.err(path, format!("expected a list, got {}", type_name(other)));
                &[]
            }
        }
    }

    fn string_list(&mut self, path: &str, v: Option<&Value>, expand: bool) -> Vec<String> {
        let items = self.list(path, v);
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let p = format!("{path}[{i}]");
            let s = if expand {
                self.string(&p, Some(item))
            } else {
                self.raw_string(&p, Some(item))
            };
            match s {
                Some(s) if !s.trim().is_empty() => out.push(s),
                Some(_) => self.err(&p, "must not be empty"),
                None if item.is_null() => self.err(&p, "must not be empty"),
                None => {}
            }
        }
        out
    }

    fn url(&mut self, path: &str, v: Option<&Value>, default: &str) -> Url {
        let fallback = || Url::parse(default).expect_default();
        let Some(s) = self.string(path, v) else {
            return fallback();
        };
        match parse_http_url(&s) {
            Ok(u) => u,
            Err(e) => {
                self.err(path, e);
                fallback()
            }
        }
    }

    fn config(&mut self, root: &Value) -> Option<Config> {
        let top = self.object(
            "",
            Some(root),
            &[
                "grpc",
                "telemetry",
                "logger",
                "connectorData",
                "connectors",
                "cache",
            ],
        )?;
        let cache = self.cache(top.get("cache"));
        let grpc = self.grpc(top.get("grpc"));
        let telemetry = self.telemetry(top.get("telemetry"));
        let logger = self.logger(top.get("logger"));
        let connector_data = self.connector_data(top.get("connectorData"));
        let connectors = self.connectors(top.get("connectors"));
        Some(Config {
            grpc,
            telemetry,
            logger,
            connector_data,
            connectors,
            cache,
        })
    }

    fn cache(&mut self, v: Option<&Value>) -> CacheConfig {
        let Some(m) = self.object("cache", v, &["redis"]) else {
            return CacheConfig::default();
        };
        if matches!(m.get("redis"), None | Some(Value::Null)) {
            return CacheConfig::default();
        }
        let Some(r) = self.object("cache.redis", m.get("redis"), &["url"]) else {
            return CacheConfig::default();
        };
        let url = self.string("cache.redis.url", r.get("url"));
        let url = self.required("cache.redis.url", url);
        if url.is_empty() {
            return CacheConfig::default();
        }
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

    fn grpc(&mut self, v: Option<&Value>) -> GrpcConfig {
        const P: &str = "grpc";
        let m = self
            .object(
                P,
                v,
                &[
                    "addr",
                    "tlsCert",
                    "tlsKey",
                    "tlsClientCA",
                    "reflection",
                    "authTokens",
                    "shutdownTimeout",
                    "maxRequestBytes",
                    "maxInFlight",
                    "defaultTimeout",
                    "keepaliveInterval",
                    "maxConnections",
                    "connectionIdleTimeout",
                    "maxConcurrentStreams",
                ],
            )
            .cloned()
            .unwrap_or_default();
        let addr_s = self
            .raw_string("grpc.addr", m.get("addr"))
            .unwrap_or_else(|| DEFAULT_ADDR.to_string());
        let addr = match parse_listen_addr(&addr_s) {
            Ok(a) => a,
            Err(e) => {
                self.err("grpc.addr", e);
                ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 5557)))
            }
        };
        let path = |w: &mut Self, key: &str| {
            w.raw_string(&join(P, key), m.get(key))
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        };
        let tls_cert = path(self, "tlsCert");
        let tls_key = path(self, "tlsKey");
        let tls_client_ca = path(self, "tlsClientCA");
        if self.check_files {
            for (key, p) in [
                ("grpc.tlsCert", &tls_cert),
                ("grpc.tlsKey", &tls_key),
                ("grpc.tlsClientCA", &tls_client_ca),
            ] {
                if let Some(e) = p.as_deref().and_then(|p| file_problem(key, p)) {
                    self.errors.push(e);
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
            .string_list("grpc.authTokens", m.get("authTokens"), true)
            .into_iter()
            .map(Secret::new)
            .collect();
        GrpcConfig {
            addr,
            tls_cert,
            tls_key,
            tls_client_ca,
            reflection: self.bool("grpc.reflection", m.get("reflection"), true),
            auth_tokens,
            shutdown_timeout: self.duration(
                "grpc.shutdownTimeout",
                m.get("shutdownTimeout"),
                Duration::from_secs(10),
            ),
            max_request_bytes: self.usize(
                "grpc.maxRequestBytes",
                m.get("maxRequestBytes"),
                64 * 1024,
                1024,
            ),
            max_in_flight: self.usize("grpc.maxInFlight", m.get("maxInFlight"), 1024, 1),
            default_timeout: self.duration(
                "grpc.defaultTimeout",
                m.get("defaultTimeout"),
                Duration::from_secs(30),
            ),
            keepalive_interval: self.duration(
                "grpc.keepaliveInterval",
                m.get("keepaliveInterval"),
                Duration::from_secs(60),
            ),
            max_connections: self.usize("grpc.maxConnections", m.get("maxConnections"), 1024, 1),
            connection_idle_timeout: self.duration(
                "grpc.connectionIdleTimeout",
                m.get("connectionIdleTimeout"),
                Duration::from_secs(5 * 60),
            ),
            max_concurrent_streams: self
                .usize(
                    "grpc.maxConcurrentStreams",
                    m.get("maxConcurrentStreams"),
                    100,
                    1,
                )
                .min(u32::MAX as usize) as u32,
        }
    }

    fn telemetry(&mut self, v: Option<&Value>) -> TelemetryConfig {
        let Some(m) = self.object("telemetry", v, &["http"]) else {
            return TelemetryConfig::default();
        };
        let http = self
            .raw_string("telemetry.http", m.get("http"))
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

    fn logger(&mut self, v: Option<&Value>) -> LoggerConfig {
        let Some(m) = self.object("logger", v, &["level", "format"]) else {
            return LoggerConfig::default();
        };
        let mut cfg = LoggerConfig::default();
        if let Some(l) = self.raw_string("logger.level", m.get("level")) {
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
        if let Some(f) = self.raw_string("logger.format", m.get("format")) {
            match f.as_str() {
                "text" => cfg.format = LogFormat::Text,
                "json" => cfg.format = LogFormat::Json,
                _ => self.err("logger.format", format!("{f:?} is not one of text, json")),
            }
        }
        cfg
    }

    fn connector_data(&mut self, v: Option<&Value>) -> ConnectorDataConfig {
        const P: &str = "connectorData";
        let mut cfg = ConnectorDataConfig {
            keys: Vec::new(),
            accept_dex_plaintext: false,
        };
        let Some(m) = self.object(P, v, &["keys", "acceptDexPlaintext"]) else {
            return cfg;
        };
        let items = self.list("connectorData.keys", m.get("keys"));
        for (i, item) in items.iter().enumerate() {
            let p = format!("connectorData.keys[{i}]");
            let Some(s) = self.string(&p, Some(item)) else {
                if item.is_null() {
                    self.err(&p, "must not be empty");
                }
                continue;
            };
            match decode_key(&s) {
                Ok(k) => cfg.keys.push(k),
                Err(e) => self.err(&p, e),
            }
        }
        if cfg.keys.is_empty()
            && !self
                .errors
                .iter()
                .any(|e| e.starts_with("connectorData.keys"))
        {
            self.err(
                "connectorData.keys",
                "required: at least one key (base64 of 32 random bytes, e.g. `openssl rand -base64 32`)",
            );
        }
        cfg.accept_dex_plaintext = self.bool(
            "connectorData.acceptDexPlaintext",
            m.get("acceptDexPlaintext"),
            false,
        );
        cfg
    }

    fn connectors(&mut self, v: Option<&Value>) -> Vec<ConnectorConfig> {
        let items = self.list("connectors", v);
        if items.is_empty() && !matches!(v, Some(Value::Array(_)) | None | Some(Value::Null)) {
            return Vec::new();
        }
        if items.is_empty() {
            self.err(
                "connectors",
                "at least one bitbucket-cloud connector is required",
            );
        }
        let mut out = Vec::new();
        let mut ids = HashSet::new();
        for (i, item) in items.iter().enumerate() {
            let p = format!("connectors[{i}]");
            if let Some(c) = self.connector(&p, item) {
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

    fn connector(&mut self, p: &str, v: &Value) -> Option<ConnectorConfig> {
        let m = self.object(p, Some(v), &["type", "id", "name", "config"])?;
        let ty = self.raw_string(&join(p, "type"), m.get("type"));
        let ty = self.required(&join(p, "type"), ty);
        if !ty.is_empty() && ty != CONNECTOR_TYPE {
            self.err(
                &join(p, "type"),
                format!("unsupported connector type {ty:?} (only {CONNECTOR_TYPE:?})"),
            );
        }
        let id = self.raw_string(&join(p, "id"), m.get("id"));
        let id = self.required(&join(p, "id"), id);
        let name = self
            .raw_string(&join(p, "name"), m.get("name"))
            .unwrap_or_else(|| "Bitbucket Cloud".to_string());
        let cp = join(p, "config");
        if m.get("config").is_none() {
            self.err(&cp, "required");
        }
        let c = self.object(
            &cp,
            m.get("config"),
            &[
                "clientID",
                "clientSecret",
                "redirectURI",
                "teams",
                "includeTeamGroups",
                "getWorkspacePermissions",
                "teamGroupsAuth",
                "teamGroupsCacheTTL",
                "authURL",
                "tokenURL",
                "apiURL",
                "legacyAPIURL",
                "upstreamTimeout",
                "upstreamMaxInFlight",
                "teamGroups",
                "permissionCacheTTL",
                "refreshCacheTTL",
                "rateLimitBackoff",
            ],
        )?;
        let k = |key: &str| join(&cp, key);
        let client_id = self.string(&k("clientID"), c.get("clientID"));
        let client_id = self.required(&k("clientID"), client_id);
        let client_secret = self.string(&k("clientSecret"), c.get("clientSecret"));
        let client_secret = Secret::new(self.required(&k("clientSecret"), client_secret));
        let redirect = self.string(&k("redirectURI"), c.get("redirectURI"));
        let redirect_uri = self.required(&k("redirectURI"), redirect);
        if !redirect_uri.is_empty() {
            if let Err(e) = parse_http_url(&redirect_uri) {
                self.err(&k("redirectURI"), e);
            }
        }
        let teams = self.string_list(&k("teams"), c.get("teams"), true);
        let include_team_groups =
            self.bool(&k("includeTeamGroups"), c.get("includeTeamGroups"), false);
        let get_workspace_permissions = self.bool(
            &k("getWorkspacePermissions"),
            c.get("getWorkspacePermissions"),
            false,
        );
        let ap = k("teamGroupsAuth");
        let team_groups_auth = match c.get("teamGroupsAuth") {
            None | Some(Value::Null) => None,
            some => self
                .object(&ap, some, &["username", "password"])
                .and_then(|a| {
                    let u = self.string(&join(&ap, "username"), a.get("username"));
                    let u = self.required(&join(&ap, "username"), u);
                    let pw = self.string(&join(&ap, "password"), a.get("password"));
                    let pw = self.required(&join(&ap, "password"), pw);
                    (!u.is_empty() && !pw.is_empty()).then(|| BasicAuth {
                        username: u,
                        password: Secret::new(pw),
                    })
                }),
        };
        let team_groups_cache_ttl = self.duration(
            &k("teamGroupsCacheTTL"),
            c.get("teamGroupsCacheTTL"),
            Duration::from_secs(60),
        );
        let mut team_groups = Vec::new();
        for (i, entry) in self
            .string_list(&k("teamGroups"), c.get("teamGroups"), true)
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
            c.get("permissionCacheTTL"),
            Duration::from_secs(600),
        );
        let refresh_cache_ttl = self.duration(
            &k("refreshCacheTTL"),
            c.get("refreshCacheTTL"),
            Duration::ZERO,
        );
        let rate_limit_backoff = self.duration(
            &k("rateLimitBackoff"),
            c.get("rateLimitBackoff"),
            Duration::from_secs(60),
        );
        if rate_limit_backoff.is_zero() {
            self.err(&k("rateLimitBackoff"), "must be more than 0s");
        }
        Some(ConnectorConfig {
            id,
            name,
            client_id,
            client_secret,
            redirect_uri,
            teams,
            include_team_groups,
            get_workspace_permissions,
            team_groups_auth,
            team_groups_cache_ttl,
            auth_url: self.url(&k("authURL"), c.get("authURL"), DEFAULT_AUTH_URL),
            token_url: self.url(&k("tokenURL"), c.get("tokenURL"), DEFAULT_TOKEN_URL),
            api_url: self.url(&k("apiURL"), c.get("apiURL"), DEFAULT_API_URL),
            legacy_api_url: self.url(
                &k("legacyAPIURL"),
                c.get("legacyAPIURL"),
                DEFAULT_LEGACY_API_URL,
            ),
            upstream_timeout: self.duration(
                &k("upstreamTimeout"),
                c.get("upstreamTimeout"),
                Duration::from_secs(10),
            ),
            upstream_max_in_flight: self.usize(
                &k("upstreamMaxInFlight"),
                c.get("upstreamMaxInFlight"),
                crate::bitbucket::DEFAULT_MAX_IN_FLIGHT,
                1,
            ),
            team_groups,
            permission_cache_ttl,
            refresh_cache_ttl,
            rate_limit_backoff,
        })
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

trait ExpectDefault {
    fn expect_default(self) -> Url;
}

impl ExpectDefault for Result<Url, url::ParseError> {
    /// Built-in default URLs are constants known to parse.
    #[allow(clippy::expect_used)]
    fn expect_default(self) -> Url {
        self.expect("built-in default URL parses")
    }
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

/// Go's `time.ParseDuration` syntax: `300ms`, `1.5h`, `1h30m`, `0`.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (use Go's syntax: 500ms, 60s, 5m, 1h30m)");
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    if t.is_empty() || t.starts_with('-') {
        return Err(bad());
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    let mut total = 0f64;
    let mut rest = t;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_end == 0 {
            return Err(bad());
        }
        let n: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += n * scale;
        rest = &rest[unit_end..];
    }
    if !total.is_finite() || total > 1e9 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(total))
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
    fn go_durations() {
        assert_eq!(parse_go_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_go_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "10", "s", "-1s", "1d", "1h-", "1..5s"] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?}");
        }
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
            let _ = parse_go_duration(&s);
        }

        #[test]
        fn fuzz_env_expansion_never_panics(s in ".{0,60}") {
            let _ = expand_env(&s, &|n: &str| (n.len() % 2 == 0).then(|| "v".to_string()));
        }
    }
}
