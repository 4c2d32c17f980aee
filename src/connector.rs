//! The domain: where a Bitbucket user becomes an identity.
//!
//! dex's connector contract (`connector/connector.go`) in Rust: login URL,
//! callback, refresh. No gRPC and no HTTP types here. Bitbucket is reached
//! through the [`Bitbucket`] trait, which this module defines in the facts it
//! needs ([`User`], [`WorkspaceAccess`], [`Access::Denied`], [`UpstreamError`],
//! ...) and `crate::bitbucket::Client` implements over HTTP; time is read from
//! an injected [`Clock`]. What is left here are the rules: the teams
//! whitelist, group order, permissions, caches, refresh decisions, sealing.
//! Errors become gRPC statuses in [`crate::grpc`], and only there.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::stream::{self, StreamExt as _};
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::cache::{SharedCache, SharedKey, TtlCache, Weigh};
use crate::config::{BasicAuth, ConnectorConfig, TeamGroup};
use crate::metrics::{self, Cache, Metrics, Outcome};
use crate::sealing::{OpenError, Origin, Sealer, Tokens};
use crate::secret::Secret;

/// An access token with less than this left is refreshed first.
pub(crate) const REFRESH_MARGIN: Duration = Duration::from_secs(30);
/// Workspaces whose permission and groups are read at once, per login.
pub(crate) const WORKSPACE_CONCURRENCY: usize = 100;
/// Longest `raw_query` accepted.
pub(crate) const MAX_RAW_QUERY: usize = 8 * 1024;

/// What the host's client asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scopes {
    pub offline_access: bool,
    pub groups: bool,
}

/// A user as the host sees them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub username: String,
    pub preferred_username: String,
    pub email: String,
    pub email_verified: bool,
    pub groups: Vec<String>,
    /// Sealed tokens; `None` when the host did not ask for offline access.
    pub connector_data: Option<Vec<u8>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("user_id", &self.user_id)
            .field("username", &self.username)
            .field("email", &self.email)
            .field("groups", &self.groups)
            .field(
                "connector_data",
                &self.connector_data.as_ref().map(|d| d.len()),
            )
            .finish()
    }
}

/// Where the domain reads the time: the wall clock in service, a hand-moved
/// one in tests (token expiry, cache TTLs).
pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Bitbucket Cloud as the rules need it, for one OAuth consumer. Implemented
/// over HTTP by `crate::bitbucket::Client`, in memory by the unit tests.
/// Every call gives up at `deadline`. A refusal that a login goes on without
/// (a workspace's permission or groups not readable) is an [`Access::Denied`],
/// not an error.
pub trait Bitbucket: Send + Sync + 'static {
    /// `group=` filters that [`Bitbucket::group_membership`] takes at once.
    const MAX_GROUP_FILTERS: usize;

    /// The authorize URL for `state` (`client_id`, `response_type=code`).
    fn authorize_url(&self, state: &str) -> String;

    /// Redeems an authorization code; never retried once Bitbucket answered.
    fn exchange_code(
        &self,
        code: &str,
        deadline: Instant,
    ) -> impl Future<Output = Result<Grant, UpstreamError>> + Send;

    /// Redeems a refresh token; Bitbucket answers with a new one.
    fn redeem_refresh_token(
        &self,
        refresh_token: &Secret,
        deadline: Instant,
    ) -> impl Future<Output = Result<Grant, UpstreamError>> + Send;

    /// The token's user; the uuid is never empty.
    fn user(
        &self,
        token: &Secret,
        deadline: Instant,
    ) -> impl Future<Output = Result<User, UpstreamError>> + Send;

    fn emails(
        &self,
        token: &Secret,
        deadline: Instant,
    ) -> impl Future<Output = Result<Vec<Email>, UpstreamError>> + Send;

    /// The user's workspaces, in Bitbucket's order.
    fn workspaces(
        &self,
        token: &Secret,
        deadline: Instant,
    ) -> impl Future<Output = Result<Vec<WorkspaceAccess>, UpstreamError>> + Send;

    /// The user's permission in a workspace (`owner`, `member`, ...).
    fn permission(
        &self,
        token: &Secret,
        workspace: &str,
        deadline: Instant,
    ) -> impl Future<Output = Result<Access<String>, UpstreamError>> + Send;

    /// A workspace's groups with their members (API 1.0: workspace admins only).
    fn group_list(
        &self,
        caller: Caller<'_>,
        workspace: &str,
        deadline: Instant,
    ) -> impl Future<Output = Result<Access<Vec<Group>>, UpstreamError>> + Send;

    /// The groups among `wanted` that the token's user may see (a shared
    /// workspace's group: only its members), at most
    /// [`Bitbucket::MAX_GROUP_FILTERS`] of them.
    fn group_membership(
        &self,
        token: &Secret,
        wanted: &[TeamGroup],
        deadline: Instant,
    ) -> impl Future<Output = Result<Vec<Group>, UpstreamError>> + Send;
}

/// Who reads a workspace's groups.
#[derive(Clone, Copy)]
pub enum Caller<'a> {
    /// The user, with their access token.
    User(&'a Secret),
    /// The `teamGroupsAuth` credential.
    Admin(&'a BasicAuth),
}

/// Tokens from the token endpoint.
#[derive(Clone, PartialEq, Eq)]
pub struct Grant {
    pub access_token: Secret,
    pub refresh_token: Option<Secret>,
    pub expires_in: Option<Duration>,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("access_token", &self.access_token)
            .field("refresh_token", &self.refresh_token)
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

/// A Bitbucket user (only what an identity needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uuid: String,
    pub username: Option<String>,
    pub nickname: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email {
    pub address: String,
    pub primary: bool,
    pub confirmed: bool,
}

/// One of the user's workspaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceAccess {
    pub slug: String,
    pub uuid: Option<String>,
    /// The user administers it (and so owns it).
    pub administrator: bool,
}

/// A workspace group and the uuids of its members.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Group {
    pub slug: String,
    pub members: Vec<String>,
    /// The workspace that owns it, when Bitbucket says.
    pub owner: Option<GroupOwner>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupOwner {
    pub uuid: Option<String>,
    pub username: Option<String>,
    pub nickname: Option<String>,
}

/// What a read that may be refused gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access<T> {
    Read(T),
    Denied(Denial),
}

/// Why Bitbucket refused to show something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Denial {
    /// The credential was not accepted (a wrong `teamGroupsAuth`).
    Unauthorized,
    Forbidden,
    NotFound,
    Gone,
}

/// Why a request to Bitbucket did not give a usable answer. Messages name the
/// endpoint template, never a URL, a token or a body.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("{endpoint}: {detail}")]
    Connect {
        endpoint: &'static str,
        detail: String,
    },
    #[error("{endpoint}: {detail}")]
    Transport {
        endpoint: &'static str,
        detail: String,
    },
    #[error("{endpoint}: no answer within {after:?}")]
    Timeout {
        endpoint: &'static str,
        after: Duration,
    },
    #[error("{endpoint}: HTTP {status}")]
    Status { endpoint: &'static str, status: u16 },
    #[error("{endpoint}: {detail}")]
    Unavailable {
        endpoint: &'static str,
        detail: String,
    },
    #[error("{endpoint}: the caller's deadline passed")]
    DeadlineExceeded { endpoint: &'static str },
    #[error("{endpoint}: {detail}")]
    Invalid {
        endpoint: &'static str,
        detail: String,
    },
    /// Bitbucket answered 429, or this resource's breaker is open.
    #[error("{endpoint}: rate limited by Bitbucket; retry in {}s", retry_after_seconds(*retry_after))]
    RateLimited {
        endpoint: &'static str,
        retry_after: Duration,
    },
    /// The access token was not accepted (401).
    #[error("{endpoint}: HTTP 401 (token not accepted)")]
    Unauthorized { endpoint: &'static str },
    /// 403, 404 or 410 where the answer is needed.
    #[error("{endpoint}: HTTP {status}")]
    Denied { endpoint: &'static str, status: u16 },
    /// The token endpoint refused the OAuth consumer itself
    /// (`invalid_client`, `unauthorized_client`).
    #[error("token endpoint: {error}{}", description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    ClientRejected {
        error: String,
        description: Option<String>,
    },
    /// The token endpoint refused the code or refresh token (`invalid_grant`, ...).
    #[error("token endpoint: {error}{}", description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    GrantRejected {
        error: String,
        description: Option<String>,
    },
}

impl UpstreamError {
    /// The token endpoint refused the consumer or the grant (an OAuth error).
    pub fn rejected(&self) -> bool {
        matches!(
            self,
            UpstreamError::ClientRejected { .. } | UpstreamError::GrantRejected { .. }
        )
    }
}

/// Whole seconds, rounded up, at least 1: what `retry_after_seconds` says.
pub(crate) fn retry_after_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0).max(u64::from(d.is_zero()))
}

/// Every way a login or refresh can fail that a host may act on. Mapped to
/// gRPC status codes and ErrorInfo reasons in `grpc.rs`, and only there.
/// Upstream failures keep their facts (endpoint template, HTTP status,
/// retry-after) as an [`UpstreamError`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown connector_id {0:?}")]
    UnknownConnector(String),
    #[error("connector_id is required: {0} connectors are configured")]
    AmbiguousConnector(usize),
    #[error(
        "expected callback URL {received:?} did not match the URL in the config {configured:?}"
    )]
    CallbackUrlMismatch {
        received: String,
        configured: String,
    },
    #[error("{0}")]
    MalformedCallback(String),
    /// The user (or Bitbucket) refused at the authorize page: `error=…`.
    #[error("bitbucket: {error}{}", description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Callback {
        error: String,
        description: Option<String>,
    },
    #[error("bitbucket: the authorization code was rejected: {0}")]
    CodeRejected(UpstreamError),
    #[error("bitbucket: the OAuth consumer's credentials were rejected: {0}")]
    ClientRejected(UpstreamError),
    #[error("bitbucket: the user's grant is no longer valid ({0}); the user must log in again")]
    TokenRevoked(Revoked),
    #[error("bitbucket: user has no confirmed, primary email")]
    NoVerifiedEmail,
    #[error("bitbucket: user {username:?} is not in any of the required teams")]
    NotInRequiredTeams { username: String },
    #[error("bitbucket: user changed: connector data belongs to {expected}, Bitbucket answered {actual}")]
    UserChanged { expected: String, actual: String },
    #[error("connector_data is not usable: {0}")]
    BadConnectorData(#[from] OpenError),
    /// Any other upstream failure: unavailable, rate limited, invalid,
    /// forbidden, a token not accepted, the deadline passed.
    #[error("{}", upstream_message(.0))]
    Upstream(UpstreamError),
    #[error("deadline exceeded ({0})")]
    DeadlineExceeded(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// The outcome of a refresh token redemption that several calls shared.
    #[error(transparent)]
    Shared(Arc<Error>),
}

/// Why a grant is no longer usable.
#[derive(Debug, thiserror::Error)]
pub enum Revoked {
    #[error("{0}")]
    Upstream(UpstreamError),
    #[error("the access token expired and there is no refresh token")]
    NoRefreshToken,
}

fn upstream_message(e: &UpstreamError) -> String {
    match e {
        UpstreamError::DeadlineExceeded { .. } => format!("deadline exceeded ({e})"),
        UpstreamError::Unauthorized { .. } => {
            format!("bitbucket: the access token was not accepted ({e})")
        }
        e => format!("bitbucket: {e}"),
    }
}

impl From<UpstreamError> for Error {
    fn from(e: UpstreamError) -> Error {
        match e {
            e @ UpstreamError::ClientRejected { .. } => Error::ClientRejected(e),
            e @ UpstreamError::GrantRejected { .. } => Error::CodeRejected(e),
            e => Error::Upstream(e),
        }
    }
}

impl Error {
    /// The error itself, looking through a shared redemption's.
    pub fn unshared(&self) -> &Error {
        match self {
            Error::Shared(e) => e.unshared(),
            e => e,
        }
    }
}

/// One configured `bitbucket-cloud` connector, over the Bitbucket `B`
/// (HTTP in service, in memory in unit tests).
pub struct Connector<B = crate::bitbucket::Client> {
    cfg: ConnectorConfig,
    bitbucket: B,
    clock: Arc<dyn Clock>,
    sealer: Arc<Sealer>,
    metrics: Metrics,
    groups_cache: TtlCache<GroupsKey, GroupsOutcome>,
    permission_cache: TtlCache<(String, String), Option<String>>,
    refresh_cache: TtlCache<(String, bool), CachedIdentity>,
    redemptions: Redemptions,
    warned_workspaces: Mutex<HashSet<String>>,
}

impl<B> std::fmt::Debug for Connector<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("id", &self.cfg.id)
            .finish_non_exhaustive()
    }
}

impl<B: Bitbucket> Connector<B> {
    /// `bitbucket` is the client for this connector's OAuth consumer and
    /// endpoints; every time the rules read comes from `clock`.
    pub fn new(
        cfg: ConnectorConfig,
        bitbucket: B,
        clock: Arc<dyn Clock>,
        sealer: Arc<Sealer>,
        metrics: Metrics,
        shared: Option<Arc<SharedCache>>,
    ) -> Connector<B> {
        Connector {
            groups_cache: TtlCache::new(Cache::groups, cfg.team_groups_cache_ttl, metrics.clone())
                .shared(shared.clone(), &cfg.id)
                .clock(clock.clone()),
            permission_cache: TtlCache::new(
                Cache::permission,
                cfg.permission_cache_ttl,
                metrics.clone(),
            )
            .shared(shared.clone(), &cfg.id)
            .clock(clock.clone()),
            refresh_cache: TtlCache::new(Cache::refresh, cfg.refresh_cache_ttl, metrics.clone())
                .shared(shared, &cfg.id)
                .clock(clock.clone()),
            cfg,
            bitbucket,
            clock,
            sealer,
            metrics,
            redemptions: Redemptions::default(),
            warned_workspaces: Mutex::new(HashSet::new()),
        }
    }

    pub fn id(&self) -> &str {
        &self.cfg.id
    }

    pub fn config(&self) -> &ConnectorConfig {
        &self.cfg
    }

    /// dex's `LoginURL`: the callback must be the configured redirect URI.
    pub fn login_url(&self, callback_url: &str, state: &str) -> Result<String, Error> {
        if callback_url != self.cfg.redirect_uri {
            return Err(Error::CallbackUrlMismatch {
                received: callback_url.to_string(),
                configured: self.cfg.redirect_uri.clone(),
            });
        }
        Ok(self.bitbucket.authorize_url(state))
    }

    /// dex's `HandleCallback`.
    pub async fn handle_callback(
        &self,
        scopes: Scopes,
        raw_query: &str,
        deadline: Instant,
    ) -> Result<Identity, Error> {
        let code = parse_callback(raw_query)?;
        let grant = self.bitbucket.exchange_code(&code, deadline).await?;
        let user = self
            .fetch_identity(&grant.access_token, scopes, deadline)
            .await?;
        let mut identity = user.identity;
        self.remember(scopes, &identity).await;
        if scopes.offline_access {
            let tokens = tokens_from_grant(&grant, None, &identity.user_id, self.clock.now());
            identity.connector_data = Some(self.seal(&tokens)?);
        }
        Ok(identity)
    }

    /// dex's `Refresh`: reuse or redeem the tokens, read the user again.
    pub async fn refresh(
        &self,
        scopes: Scopes,
        previous: &Identity,
        deadline: Instant,
    ) -> Result<Identity, Error> {
        let data = previous
            .connector_data
            .as_deref()
            .filter(|d| !d.is_empty())
            .ok_or(Error::BadConnectorData(OpenError::Empty))?;
        let (tokens, origin) = self.sealer.open(&self.cfg.id, data)?;
        if let Some(uuid) = &tokens.user_uuid {
            if !previous.user_id.is_empty() && !same_uuid(uuid, &previous.user_id) {
                return Err(Error::UserChanged {
                    expected: previous.user_id.clone(),
                    actual: uuid.clone(),
                });
            }
        }

        // refreshCacheTTL: an identity computed within the window, while the
        // sealed access token is still usable, is answered without Bitbucket.
        let cached = match &tokens.user_uuid {
            Some(u) if usable(tokens.expiry, self.clock.now()) => {
                self.refresh_cache.get(&self.refresh_key(scopes, u)).await
            }
            _ => None,
        };
        if let Some(hit) = cached {
            if previous.user_id.is_empty() || same_uuid(&hit.user_id, &previous.user_id) {
                let mut identity = hit.identity();
                identity.connector_data = Some(if origin == Origin::Current {
                    data.to_vec()
                } else {
                    self.seal(&tokens)?
                });
                return Ok(identity);
            }
        }

        let mut current = tokens.clone();
        let mut redeemed = false;
        if !usable(current.expiry, self.clock.now()) {
            current = self.redeem(&tokens, deadline).await?;
            redeemed = true;
        }
        let fetched = match self
            .fetch_identity(&current.access_token, scopes, deadline)
            .await
        {
            // A reused access token may die before its expiry (revoked,
            // rotated elsewhere): the refresh token decides.
            Err(Error::Upstream(UpstreamError::Unauthorized { .. })) if !redeemed => {
                current = self.redeem(&tokens, deadline).await?;
                self.fetch_identity(&current.access_token, scopes, deadline)
                    .await
                    .map_err(revoked_if_unauthorized)
            }
            other => other.map_err(revoked_if_unauthorized),
        }?;

        let mut identity = fetched.identity;
        let expected = if previous.user_id.is_empty() {
            tokens.user_uuid.clone()
        } else {
            Some(previous.user_id.clone())
        };
        if let Some(expected) = expected {
            if !same_uuid(&expected, &identity.user_id) {
                return Err(Error::UserChanged {
                    expected,
                    actual: identity.user_id,
                });
            }
        }
        current.user_uuid = Some(identity.user_id.clone());
        self.remember(scopes, &identity).await;
        identity.connector_data = Some(if current == tokens && origin == Origin::Current {
            data.to_vec()
        } else {
            self.seal(&current)?
        });
        Ok(identity)
    }

    fn groups_needed(&self, scopes: Scopes) -> bool {
        scopes.groups || !self.cfg.teams.is_empty()
    }

    fn refresh_key(&self, scopes: Scopes, user_uuid: &str) -> (String, bool) {
        (normal_uuid(user_uuid), self.groups_needed(scopes))
    }

    /// Keeps a computed identity for refreshCacheTTL (without connector data).
    async fn remember(&self, scopes: Scopes, identity: &Identity) {
        if self.refresh_cache.enabled() {
            self.refresh_cache
                .put(
                    self.refresh_key(scopes, &identity.user_id),
                    CachedIdentity::of(identity),
                )
                .await;
        }
    }

    fn seal(&self, tokens: &Tokens) -> Result<Vec<u8>, Error> {
        self.sealer
            .seal(&self.cfg.id, tokens)
            .map_err(|e| Error::Internal(format!("sealing connector data: {e}")))
    }

    /// Redeems the refresh token, once for all concurrent callers holding it.
    async fn redeem(&self, tokens: &Tokens, deadline: Instant) -> Result<Tokens, Error> {
        let Some(rt) = tokens.refresh_token.clone() else {
            return Err(Error::TokenRevoked(Revoked::NoRefreshToken));
        };
        let (cell, leader) = self.redemptions.join(&rt);
        if !leader {
            self.metrics.refresh_joined.inc();
        }
        // A joiner waits at most until its own deadline.
        let shared = cell.get_or_init(|| async {
            let r = self.bitbucket.redeem_refresh_token(&rt, deadline).await;
            self.metrics.redemption(match &r {
                Ok(_) => Outcome::ok,
                Err(e) if e.rejected() => Outcome::revoked,
                Err(_) => Outcome::error,
            });
            r.map_err(|e| {
                Arc::new(match e {
                    e if e.rejected() => Error::TokenRevoked(Revoked::Upstream(e)),
                    e => Error::Upstream(e),
                })
            })
        });
        let result = match tokio::time::timeout_at(deadline, shared).await {
            Ok(r) => r.clone().map_err(Error::Shared),
            Err(_) => Err(Error::DeadlineExceeded(
                "waiting for a shared refresh token redemption".into(),
            )),
        };
        if cell.initialized() {
            self.redemptions.forget(&rt, &cell);
        }
        let grant = result?;
        Ok(tokens_from_grant(
            &grant,
            Some(&rt),
            tokens.user_uuid.as_deref().unwrap_or_default(),
            self.clock.now(),
        ))
    }

    async fn fetch_identity(
        &self,
        token: &Secret,
        scopes: Scopes,
        deadline: Instant,
    ) -> Result<Fetched, Error> {
        let groups_needed = self.groups_needed(scopes);
        let (user, emails, workspaces) = tokio::try_join!(
            async {
                self.bitbucket
                    .user(token, deadline)
                    .await
                    .map_err(Error::from)
            },
            async {
                self.bitbucket
                    .emails(token, deadline)
                    .await
                    .map_err(Error::from)
            },
            async {
                if groups_needed {
                    self.bitbucket
                        .workspaces(token, deadline)
                        .await
                        .map(Some)
                        .map_err(Error::from)
                } else {
                    Ok(None)
                }
            },
        )?;
        let email = primary_email(&emails).ok_or(Error::NoVerifiedEmail)?;
        let username = user
            .username
            .clone()
            .or_else(|| user.nickname.clone())
            .unwrap_or_default();
        let groups = match workspaces {
            Some(ws) => self.groups(token, &user, &username, ws, deadline).await?,
            None => Vec::new(),
        };
        Ok(Fetched {
            identity: Identity {
                user_id: user.uuid.clone(),
                username,
                preferred_username: user.nickname.clone().unwrap_or_default(),
                email,
                email_verified: true,
                groups,
                connector_data: None,
            },
        })
    }

    async fn groups(
        &self,
        token: &Secret,
        user: &User,
        username: &str,
        workspaces: Vec<WorkspaceAccess>,
        deadline: Instant,
    ) -> Result<Vec<String>, Error> {
        let kept: Vec<WorkspaceAccess> = workspaces
            .into_iter()
            .filter(|w| {
                self.cfg.teams.is_empty() || self.cfg.teams.iter().any(|t| team_matches(t, w))
            })
            .collect();
        if !self.cfg.teams.is_empty() && kept.is_empty() {
            return Err(Error::NotInRequiredTeams {
                username: username.to_string(),
            });
        }
        for w in &kept {
            if !valid_slug(&w.slug) {
                return Err(Error::Upstream(UpstreamError::Invalid {
                    endpoint: crate::bitbucket::EP_WORKSPACES,
                    detail: "a workspace slug is not a valid slug".into(),
                }));
            }
        }
        let members = if self.cfg.team_groups.is_empty() {
            None
        } else {
            Some(
                self.team_group_memberships(token, &user.uuid, &kept, deadline)
                    .await?,
            )
        };
        let lists = self.cfg.include_team_groups && members.is_none();
        let mut details: Vec<WorkspaceDetails> = if lists || self.cfg.get_workspace_permissions {
            let lookups: Vec<_> = kept
                .iter()
                .map(|w| self.workspace_details(token, &user.uuid, w, lists, deadline))
                .collect();
            stream::iter(lookups)
                .buffered(WORKSPACE_CONCURRENCY)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<_, _>>()?
        } else {
            kept.iter()
                .map(|_| WorkspaceDetails {
                    permission: None,
                    groups: None,
                })
                .collect()
        };
        if let Some(members) = members {
            for (w, d) in kept.iter().zip(details.iter_mut()) {
                let mine: Vec<Group> = members
                    .iter()
                    .filter(|g| g.workspace.eq_ignore_ascii_case(&w.slug))
                    .map(|g| Group {
                        slug: g.group.clone(),
                        members: vec![user.uuid.clone()],
                        owner: None,
                    })
                    .collect();
                d.groups = Some(Arc::new(mine));
            }
        }
        Ok(compose_groups(&kept, &details, &user.uuid))
    }

    /// teamGroups: which of the listed groups of the kept workspaces the user
    /// is in, asked with the user's own token (`/1.0/groups?group=ws/slug`,
    /// all of them in one request: Bitbucket answers every listed group the
    /// caller may see, and a shared workspace's group only to its members).
    async fn team_group_memberships(
        &self,
        token: &Secret,
        user_uuid: &str,
        kept: &[WorkspaceAccess],
        deadline: Instant,
    ) -> Result<Arc<Vec<TeamGroup>>, Error> {
        let wanted: Vec<(TeamGroup, Option<String>)> = self
            .cfg
            .team_groups
            .iter()
            .filter_map(|tg| {
                kept.iter()
                    .find(|w| w.slug.eq_ignore_ascii_case(&tg.workspace))
                    .map(|w| {
                        (
                            TeamGroup {
                                workspace: w.slug.clone(),
                                group: tg.group.clone(),
                            },
                            w.uuid.clone(),
                        )
                    })
            })
            .collect();
        if wanted.is_empty() {
            return Ok(Arc::new(Vec::new()));
        }
        let key = GroupsKey {
            slug: wanted
                .iter()
                .map(|(g, _)| format!("{}/{}", g.workspace, g.group))
                .collect::<Vec<_>>()
                .join(" "),
            user: Some(normal_uuid(user_uuid)),
            kind: GroupsKind::Membership,
        };
        if let Some(GroupsOutcome::Members(hit)) = self.groups_cache.get(&key).await {
            return Ok(hit);
        }
        let mut found = Vec::new();
        for chunk in wanted.chunks(B::MAX_GROUP_FILTERS.max(1)) {
            let filters: Vec<TeamGroup> = chunk.iter().map(|(g, _)| g.clone()).collect();
            let visible = self
                .bitbucket
                .group_membership(token, &filters, deadline)
                .await?;
            for g in visible {
                if !g.members.iter().any(|m| same_uuid(m, user_uuid)) {
                    continue;
                }
                let candidates: Vec<&(TeamGroup, Option<String>)> = chunk
                    .iter()
                    .filter(|(t, _)| t.group.eq_ignore_ascii_case(&g.slug))
                    .collect();
                let hit = match candidates.as_slice() {
                    [only] => Some(*only),
                    many => many.iter().copied().find(|(t, ws_uuid)| {
                        g.owner.as_ref().is_some_and(|o| {
                            o.uuid
                                .as_deref()
                                .zip(ws_uuid.as_deref())
                                .is_some_and(|(a, b)| same_uuid(a, b))
                                || o.username
                                    .as_deref()
                                    .is_some_and(|n| n.eq_ignore_ascii_case(&t.workspace))
                                || o.nickname
                                    .as_deref()
                                    .is_some_and(|n| n.eq_ignore_ascii_case(&t.workspace))
                        })
                    }),
                };
                if let Some((t, _)) = hit {
                    if !found.contains(t) {
                        found.push(t.clone());
                    }
                }
            }
        }
        // In the configured order.
        let found: Vec<TeamGroup> = wanted
            .into_iter()
            .map(|(t, _)| t)
            .filter(|t| found.contains(t))
            .collect();
        let found = Arc::new(found);
        self.groups_cache
            .put(key, GroupsOutcome::Members(found.clone()))
            .await;
        Ok(found)
    }

    async fn workspace_details(
        &self,
        token: &Secret,
        user_uuid: &str,
        access: &WorkspaceAccess,
        lists: bool,
        deadline: Instant,
    ) -> Result<WorkspaceDetails, Error> {
        let slug = access.slug.as_str();
        let permission = async {
            if !self.cfg.get_workspace_permissions {
                return Ok(None);
            }
            // `/2.0/user/workspaces` says who administers a workspace, and a
            // workspace's administrators are its owners: no call needed.
            if access.administrator {
                return Ok(Some("owner".to_string()));
            }
            let key = (normal_uuid(user_uuid), slug.to_ascii_lowercase());
            if let Some(hit) = self.permission_cache.get(&key).await {
                return Ok(hit);
            }
            let p = match self.bitbucket.permission(token, slug, deadline).await? {
                Access::Read(p) => Some(p),
                Access::Denied(reason) => {
                    tracing::debug!(
                        workspace = slug,
                        ?reason,
                        "workspace permission not readable"
                    );
                    None
                }
            };
            self.permission_cache.put(key, p.clone()).await;
            Ok(p)
        };
        let groups = async {
            if !lists {
                return Ok(None);
            }
            self.workspace_groups(token, user_uuid, access, deadline)
                .await
        };
        let (permission, groups) = tokio::try_join!(permission, groups)?;
        Ok(WorkspaceDetails { permission, groups })
    }

    /// API 1.0 groups: with `teamGroupsAuth` when configured, else (or when
    /// that credential is refused and the user administers the workspace)
    /// with the user's own token. A list read with `teamGroupsAuth` is shared
    /// by every login; one read with a user's token only by that user's.
    async fn workspace_groups(
        &self,
        token: &Secret,
        user_uuid: &str,
        access: &WorkspaceAccess,
        deadline: Instant,
    ) -> Result<Option<Arc<Vec<Group>>>, Error> {
        let slug = access.slug.as_str();
        let as_user = GroupsKey {
            slug: slug.to_string(),
            user: Some(normal_uuid(user_uuid)),
            kind: GroupsKind::List,
        };
        let outcome = match &self.cfg.team_groups_auth {
            Some(a) => {
                let shared = GroupsKey {
                    slug: slug.to_string(),
                    user: None,
                    kind: GroupsKind::List,
                };
                match self.read_groups(shared, Caller::Admin(a), deadline).await? {
                    GroupsOutcome::Unreadable(_) if access.administrator => {
                        self.read_groups(as_user, Caller::User(token), deadline)
                            .await?
                    }
                    outcome => outcome,
                }
            }
            // API 1.0 lists a workspace's groups to its admins only, and
            // `administrator` already says the user is none: not asked.
            None if !access.administrator => GroupsOutcome::Unreadable(Denial::Forbidden),
            None => {
                self.read_groups(as_user, Caller::User(token), deadline)
                    .await?
            }
        };
        match outcome {
            GroupsOutcome::Read(g) => Ok(Some(g)),
            GroupsOutcome::Members(_) => Ok(None),
            GroupsOutcome::Unreadable(reason) => {
                self.metrics.degraded(degraded_reason(reason));
                let first = {
                    let mut warned = self
                        .warned_workspaces
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    if warned.len() > 10_000 {
                        warned.clear();
                    }
                    warned.insert(slug.to_string())
                };
                if first {
                    tracing::warn!(
                        connector = %self.cfg.id,
                        workspace = slug,
                        reason = <&str>::from(degraded_reason(reason)),
                        "workspace groups are not readable (API 1.0 needs a workspace admin: set teamGroupsAuth, and check its credential); logins go on without this workspace's groups"
                    );
                }
                Ok(None)
            }
        }
    }

    /// One groups read, through the cache; refusals are cached too.
    async fn read_groups(
        &self,
        key: GroupsKey,
        caller: Caller<'_>,
        deadline: Instant,
    ) -> Result<GroupsOutcome, Error> {
        if let Some(hit) = self.groups_cache.get(&key).await {
            return Ok(hit);
        }
        // A refused credential (a wrong teamGroupsAuth) is a refusal too:
        // the login goes on without groups rather than failing.
        let outcome = match self
            .bitbucket
            .group_list(caller, &key.slug, deadline)
            .await?
        {
            Access::Read(g) => GroupsOutcome::Read(Arc::new(g)),
            Access::Denied(reason) => GroupsOutcome::Unreadable(reason),
        };
        self.groups_cache.put(key, outcome.clone()).await;
        Ok(outcome)
    }
}

struct Fetched {
    identity: Identity,
}

struct WorkspaceDetails {
    permission: Option<String>,
    groups: Option<Arc<Vec<Group>>>,
}

/// Workspace slugs in upstream order, then `ws/group` for groups that list
/// the user, then `ws:permission`; no duplicates.
fn compose_groups(
    kept: &[WorkspaceAccess],
    details: &[WorkspaceDetails],
    user_uuid: &str,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut push = |g: String| {
        if seen.insert(g.clone()) {
            out.push(g);
        }
    };
    for w in kept {
        push(w.slug.clone());
    }
    for (w, d) in kept.iter().zip(details) {
        for g in d.groups.iter().flat_map(|g| g.iter()) {
            if g.members.iter().any(|m| same_uuid(m, user_uuid)) {
                push(format!("{}/{}", w.slug, g.slug));
            }
        }
    }
    for (w, d) in kept.iter().zip(details) {
        if let Some(p) = &d.permission {
            push(format!("{}:{}", w.slug, p));
        }
    }
    out
}

/// A `teams` entry matches a workspace by slug, or by uuid (`{...}`).
fn team_matches(team: &str, w: &WorkspaceAccess) -> bool {
    let team = team.trim();
    if team.starts_with('{') {
        return w.uuid.as_deref().is_some_and(|u| same_uuid(u, team));
    }
    team.eq_ignore_ascii_case(&w.slug)
}

fn same_uuid(a: &str, b: &str) -> bool {
    let strip = |s: &str| {
        s.trim()
            .trim_start_matches('{')
            .trim_end_matches('}')
            .to_ascii_lowercase()
    };
    strip(a) == strip(b)
}

fn valid_slug(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~'))
}

fn primary_email(emails: &[Email]) -> Option<String> {
    emails
        .iter()
        .find(|e| e.primary && e.confirmed && !e.address.trim().is_empty())
        .map(|e| e.address.clone())
}

/// A token whose expiry is more than [`REFRESH_MARGIN`] away (or never).
fn usable(expiry: Option<SystemTime>, now: SystemTime) -> bool {
    match expiry {
        None => true,
        Some(t) => t
            .duration_since(now)
            .is_ok_and(|left| left > REFRESH_MARGIN),
    }
}

/// In a refresh, a token that Bitbucket does not accept means the grant is gone.
fn revoked_if_unauthorized(e: Error) -> Error {
    match e {
        Error::Upstream(e @ UpstreamError::Unauthorized { .. }) => {
            Error::TokenRevoked(Revoked::Upstream(e))
        }
        e => e,
    }
}

fn tokens_from_grant(
    grant: &Grant,
    previous_refresh: Option<&Secret>,
    uuid: &str,
    now: SystemTime,
) -> Tokens {
    Tokens {
        access_token: grant.access_token.clone(),
        // Bitbucket always rotates; keep the old one if it ever does not.
        refresh_token: grant
            .refresh_token
            .clone()
            .or_else(|| previous_refresh.cloned()),
        expiry: grant.expires_in.map(|d| now + d),
        user_uuid: (!uuid.is_empty()).then(|| uuid.to_string()),
    }
}

/// `code=…` from the callback's query string, or the error it carries.
pub(crate) fn parse_callback(raw_query: &str) -> Result<String, Error> {
    if raw_query.len() > MAX_RAW_QUERY {
        return Err(Error::MalformedCallback(format!(
            "raw_query is longer than {MAX_RAW_QUERY} bytes"
        )));
    }
    let q = raw_query.strip_prefix('?').unwrap_or(raw_query);
    let mut code = None;
    let mut error = None;
    let mut description = None;
    for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
        match k.as_ref() {
            "code" if code.is_none() => code = Some(v.into_owned()),
            "error" if error.is_none() => error = Some(v.into_owned()),
            "error_description" if description.is_none() => description = Some(v.into_owned()),
            _ => {}
        }
    }
    if let Some(error) = error.filter(|e| !e.is_empty()) {
        return Err(Error::Callback {
            error: clip(&error, 200),
            description: description.filter(|d| !d.is_empty()).map(|d| clip(&d, 500)),
        });
    }
    match code {
        Some(c) if !c.is_empty() => Ok(c),
        _ => Err(Error::MalformedCallback(
            "raw_query carries neither a code nor an error".into(),
        )),
    }
}

fn clip(s: &str, max: usize) -> String {
    let s: String = s.chars().filter(|c| !c.is_control()).collect();
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Whose view of a workspace's groups: `user: None` for the shared
/// `teamGroupsAuth` credential, else the user whose token read them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct GroupsKey {
    /// A workspace slug (`List`), or the `ws/group` filters asked (`Membership`).
    slug: String,
    user: Option<String>,
    kind: GroupsKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum GroupsKind {
    List,
    Membership,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
enum GroupsOutcome {
    Read(Arc<Vec<Group>>),
    /// A refused teamGroupsAuth, 403, 404 or 410.
    Unreadable(Denial),
    /// teamGroups: the listed groups the user is in.
    Members(Arc<Vec<TeamGroup>>),
}

/// The `team_groups_degraded_total` reason of an unreadable group list.
fn degraded_reason(reason: Denial) -> metrics::Reason {
    match reason {
        Denial::Unauthorized => metrics::Reason::unauthorized,
        Denial::Forbidden => metrics::Reason::forbidden,
        Denial::NotFound => metrics::Reason::not_found,
        Denial::Gone => metrics::Reason::gone,
    }
}

impl SharedKey for GroupsKey {
    fn shared_key(&self) -> String {
        let kind = match self.kind {
            GroupsKind::List => "list",
            GroupsKind::Membership => "member",
        };
        format!(
            "{kind}:{}:{}",
            self.user.as_deref().unwrap_or("*"),
            self.slug
        )
    }
}

impl Weigh for GroupsKey {
    fn weigh(&self) -> usize {
        self.slug.len() + self.user.weigh()
    }
}

impl Weigh for GroupsOutcome {
    fn weigh(&self) -> usize {
        match self {
            GroupsOutcome::Read(groups) => groups
                .iter()
                .map(|g| 64 + g.slug.len() + g.members.iter().map(|m| 32 + m.len()).sum::<usize>())
                .sum(),
            GroupsOutcome::Unreadable(_) => 0,
            GroupsOutcome::Members(m) => m
                .iter()
                .map(|t| 48 + t.workspace.len() + t.group.len())
                .sum(),
        }
    }
}

/// What the refresh identity cache keeps: the identity without connector
/// data (so without tokens).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct CachedIdentity {
    user_id: String,
    username: String,
    preferred_username: String,
    email: String,
    groups: Vec<String>,
}

impl CachedIdentity {
    fn of(i: &Identity) -> Self {
        CachedIdentity {
            user_id: i.user_id.clone(),
            username: i.username.clone(),
            preferred_username: i.preferred_username.clone(),
            email: i.email.clone(),
            groups: i.groups.clone(),
        }
    }

    fn identity(&self) -> Identity {
        Identity {
            user_id: self.user_id.clone(),
            username: self.username.clone(),
            preferred_username: self.preferred_username.clone(),
            email: self.email.clone(),
            email_verified: true,
            groups: self.groups.clone(),
            connector_data: None,
        }
    }
}

impl Weigh for CachedIdentity {
    fn weigh(&self) -> usize {
        self.user_id.len()
            + self.username.len()
            + self.preferred_username.len()
            + self.email.len()
            + self.groups.weigh()
    }
}

/// A uuid as a cache key: without braces, lower case.
fn normal_uuid(u: &str) -> String {
    u.trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .to_ascii_lowercase()
}

type Redemption = Arc<OnceCell<Result<Grant, Arc<Error>>>>;

/// Single flight for refresh tokens: callers that hold the same refresh token
/// while its redemption is in flight share it, since Bitbucket rotates the
/// token on every use. A later caller redeems again, which Bitbucket allows
/// during its grace window for a used token.
#[derive(Default)]
struct Redemptions {
    inflight: Mutex<HashMap<String, Redemption>>,
}

impl Redemptions {
    /// The shared cell for this token, and whether this caller created it.
    fn join(&self, rt: &Secret) -> (Redemption, bool) {
        let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cell) = map.get(rt.expose()) {
            return (cell.clone(), false);
        }
        let cell: Redemption = Arc::new(OnceCell::new());
        map.insert(rt.expose().to_string(), cell.clone());
        (cell, true)
    }

    /// Ends the redemption's sharing once it has a result.
    fn forget(&self, rt: &Secret, cell: &Redemption) {
        let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(rt.expose()).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            map.remove(rt.expose());
        }
    }
}

/// The configured connectors, selected by `connector_id`.
#[derive(Debug, Default)]
pub struct Connectors {
    list: Vec<Arc<Connector>>,
}

impl Connectors {
    pub fn new(list: Vec<Arc<Connector>>) -> Self {
        Connectors { list }
    }

    /// Empty `id` selects the only connector.
    pub fn select(&self, id: &str) -> Result<&Arc<Connector>, Error> {
        if id.is_empty() {
            return match self.list.as_slice() {
                [only] => Ok(only),
                many => Err(Error::AmbiguousConnector(many.len())),
            };
        }
        self.list
            .iter()
            .find(|c| c.id() == id)
            .ok_or_else(|| Error::UnknownConnector(clip(id, 100)))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Connector>> {
        self.list.iter()
    }
}

#[cfg(test)]
mod tests;

/// Property tests: `cargo test --lib fuzz_` (PROPTEST_CASES=N for more).
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(2000)))]

        #[test]
        fn fuzz_raw_query_parsing_never_panics(q in ".{0,300}") {
            let _ = parse_callback(&q);
        }

        #[test]
        fn fuzz_raw_query_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let q = String::from_utf8_lossy(&bytes);
            let _ = parse_callback(&q);
        }

        #[test]
        fn fuzz_any_code_round_trips_through_the_query(code in "[^\\x00]{1,100}", state in ".{0,50}") {
            let q: String = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("state", &state)
                .append_pair("code", &code)
                .finish();
            prop_assert_eq!(parse_callback(&q).unwrap(), code);
        }

        #[test]
        fn fuzz_callback_errors_keep_their_text_but_no_control_characters(e in "[a-z_]{1,30}", d in ".{0,100}") {
            let q: String = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("error", &e)
                .append_pair("error_description", &d)
                .finish();
            let msg = parse_callback(&q).unwrap_err().to_string();
            let prefix = format!("bitbucket: {}", e);
            prop_assert!(msg.starts_with(&prefix));
            prop_assert!(!msg.chars().any(|c| c.is_control()));
        }
    }
}
