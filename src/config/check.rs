//! The validation pass: the raw file types -> a [`Config`], every problem
//! recorded in file order, `$VAR`s expanded where the contract says.

use std::collections::HashSet;

use base64::Engine as _;
use serde::Deserialize;

use super::file::{
    join, keys_of, path_text, Field, List, Number, RawBasicAuth, RawCache, RawConfig, RawConnector,
    RawConnectorData, RawConnectorOptions, RawGrpc, RawLogger, RawRedis, RawTelemetry, Section,
    Text,
};
use super::*;

/// The allowed key closest to an unknown one, ignoring case, if it is near
/// enough to be a slip (one edit per four characters, at least one).
pub(super) fn did_you_mean<'a>(key: &str, allowed: &[&'a str]) -> Option<&'a str> {
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
pub(super) struct Check<'a> {
    problems: Vec<String>,
    /// Unknown keys not reported yet: (path of their mapping, key).
    unknown: Vec<(String, String)>,
    env: &'a dyn Fn(&str) -> Option<String>,
    /// Also report TLS files that cannot be read (`Config::load`).
    check_files: bool,
}

impl Check<'_> {
    pub(super) fn run(
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

pub(super) fn parse_http_url(s: &str) -> Result<Url, String> {
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
