//! The YAML config file -> a validated [`Config`].
//!
//! Two steps. `file` reads the YAML into serde types that mirror it (`Raw*`,
//! keys in dex's camelCase); every key is a `Field` that holds either its value
//! or what is wrong with it, so a bad value never hides the next problem, and
//! keys no struct names are collected by `serde_ignored` with their paths.
//! Then `check`, one validation pass, expands `$VAR`s where the contract says,
//! applies defaults and cross-key rules, and builds the [`Config`] the rest of
//! the crate reads, or reports every problem at once, in file order, as
//! `path.to.key: reason`. Durations use Go's syntax ([`GoDuration`]).
//!
//! Code and tests can also build a [`Config`] directly ([`Config::new`],
//! [`ConnectorConfig::new`]), with the same defaults as the file.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use url::Url;

use crate::secret::Secret;

mod check;
mod duration;
mod file;

pub use check::{decode_key, expand_env, parse_listen_addr};
use check::{parse_http_url, Check};
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
            check::did_you_mean("includeTeamsGroups", &allowed),
            Some("includeTeamGroups")
        );
        assert_eq!(check::did_you_mean("TLSCERT", &allowed), Some("tlsCert"));
        assert_eq!(check::did_you_mean("team", &allowed), Some("teams"));
        assert_eq!(check::did_you_mean("colour", &allowed), None);
        assert_eq!(check::did_you_mean("groups", &allowed), None);
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
