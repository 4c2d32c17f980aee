//! The domain: where a Bitbucket user becomes an identity.
//!
//! dex's connector contract (`connector/connector.go`) in Rust: login URL,
//! callback, refresh. No gRPC and no HTTP types here; Bitbucket is reached
//! through [`crate::bitbucket::Client`], the host through [`crate::grpc`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::stream::{self, StreamExt as _};
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::bitbucket::types::{ApiEmail, ApiGroup, ApiGroupMember, ApiUser, ApiWorkspaceAccess};
use crate::bitbucket::{self, Auth, Grant, UpstreamError};
use crate::cache::{SharedCache, SharedKey, TtlCache, Weigh};
use crate::config::{ConnectorConfig, TeamGroup};
use crate::metrics::{Cache, Metrics, Outcome, Reason};
use crate::sealing::{OpenError, Origin, Sealer, Tokens};
use crate::secret::Secret;

/// An access token with less than this left is refreshed first.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(30);
/// Workspaces whose permission and groups are read at once, per login.
pub const WORKSPACE_CONCURRENCY: usize = 100;
/// Longest `raw_query` accepted.
pub const MAX_RAW_QUERY: usize = 8 * 1024;

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

/// Every way a login or refresh can fail that a host may act on. Mapped to
/// gRPC status codes and ErrorInfo reasons in `grpc.rs`, and only there.
#[derive(Debug, Clone, thiserror::Error)]
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
    CallbackError {
        error: String,
        description: Option<String>,
    },
    #[error("bitbucket: the authorization code was rejected: {0}")]
    CodeRejected(String),
    #[error("bitbucket: the OAuth consumer's credentials were rejected: {0}")]
    ClientRejected(String),
    #[error("bitbucket: the user's grant is no longer valid ({0}); the user must log in again")]
    TokenRevoked(String),
    #[error("bitbucket: the access token was not accepted ({0})")]
    Unauthenticated(String),
    #[error("bitbucket: user has no confirmed, primary email")]
    NoVerifiedEmail,
    #[error("bitbucket: user {username:?} is not in any of the required teams")]
    NotInRequiredTeams { username: String },
    #[error("bitbucket: user changed: connector data belongs to {expected}, Bitbucket answered {actual}")]
    UserChanged { expected: String, actual: String },
    #[error("connector_data is not usable: {0}")]
    BadConnectorData(#[from] OpenError),
    #[error("bitbucket: {0}")]
    Unavailable(String),
    /// Bitbucket's rate limit: a 429, or the resource's breaker still open.
    #[error("bitbucket: {message}")]
    RateLimited {
        message: String,
        retry_after_seconds: u64,
    },
    #[error("bitbucket: {0}")]
    UpstreamInvalid(String),
    #[error("bitbucket: {0}")]
    UpstreamForbidden(String),
    #[error("deadline exceeded ({0})")]
    DeadlineExceeded(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<UpstreamError> for Error {
    fn from(e: UpstreamError) -> Error {
        let msg = e.to_string();
        match e {
            UpstreamError::Connect { .. }
            | UpstreamError::Transport { .. }
            | UpstreamError::Timeout { .. }
            | UpstreamError::Status { .. }
            | UpstreamError::Unavailable { .. } => Error::Unavailable(msg),
            UpstreamError::DeadlineExceeded { .. } => Error::DeadlineExceeded(msg),
            UpstreamError::RateLimited { retry_after, .. } => Error::RateLimited {
                message: msg,
                retry_after_seconds: bitbucket::retry_after_seconds(retry_after),
            },
            UpstreamError::Invalid { .. } => Error::UpstreamInvalid(msg),
            UpstreamError::Unauthorized { .. } => Error::Unauthenticated(msg),
            UpstreamError::Denied { .. } => Error::UpstreamForbidden(msg),
            UpstreamError::Rejected { ref error, .. }
                if error == "invalid_client" || error == "unauthorized_client" =>
            {
                Error::ClientRejected(msg)
            }
            UpstreamError::Rejected { .. } => Error::CodeRejected(msg),
        }
    }
}

/// One configured `bitbucket-cloud` connector.
pub struct Connector {
    cfg: ConnectorConfig,
    client: bitbucket::Client,
    sealer: Arc<Sealer>,
    metrics: Metrics,
    groups_cache: TtlCache<GroupsKey, GroupsOutcome>,
    permission_cache: TtlCache<(String, String), Option<String>>,
    refresh_cache: TtlCache<(String, bool), CachedIdentity>,
    redemptions: Redemptions,
    warned_workspaces: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("id", &self.cfg.id)
            .finish_non_exhaustive()
    }
}

impl Connector {
    pub fn new(
        cfg: ConnectorConfig,
        sealer: Arc<Sealer>,
        metrics: Metrics,
        http: bitbucket::HttpOptions,
        shared: Option<Arc<SharedCache>>,
    ) -> Result<Connector, String> {
        let endpoints = bitbucket::Endpoints {
            auth_url: cfg.auth_url.clone(),
            token_url: cfg.token_url.clone(),
            api_url: cfg.api_url.clone(),
            legacy_api_url: cfg.legacy_api_url.clone(),
        };
        let http = bitbucket::HttpOptions {
            attempt_timeout: cfg.upstream_timeout,
            max_in_flight: cfg.upstream_max_in_flight,
            rate_limit_backoff: cfg.rate_limit_backoff,
            ..http
        };
        let client = bitbucket::Client::new(
            &endpoints,
            &cfg.client_id,
            &cfg.client_secret,
            metrics.clone(),
            http,
        )?;
        Ok(Connector {
            groups_cache: TtlCache::new(Cache::groups, cfg.team_groups_cache_ttl, metrics.clone())
                .shared(shared.clone(), &cfg.id),
            permission_cache: TtlCache::new(
                Cache::permission,
                cfg.permission_cache_ttl,
                metrics.clone(),
            )
            .shared(shared.clone(), &cfg.id),
            refresh_cache: TtlCache::new(Cache::refresh, cfg.refresh_cache_ttl, metrics.clone())
                .shared(shared, &cfg.id),
            cfg,
            client,
            sealer,
            metrics,
            redemptions: Redemptions::default(),
            warned_workspaces: Mutex::new(HashSet::new()),
        })
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
        Ok(self.client.authorize_url(state).into())
    }

    /// dex's `HandleCallback`.
    pub async fn handle_callback(
        &self,
        scopes: Scopes,
        raw_query: &str,
        deadline: Instant,
    ) -> Result<Identity, Error> {
        let code = parse_callback(raw_query)?;
        let grant = self.client.exchange_code(&code, deadline).await?;
        let user = self
            .fetch_identity(&grant.access_token, scopes, deadline)
            .await?;
        let mut identity = user.identity;
        self.remember(scopes, &identity).await;
        if scopes.offline_access {
            let tokens = tokens_from_grant(&grant, None, &identity.user_id);
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
            Some(u) if usable(tokens.expiry, SystemTime::now()) => {
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
        if !usable(current.expiry, SystemTime::now()) {
            current = self.redeem(&tokens, deadline).await?;
            redeemed = true;
        }
        let fetched = match self
            .fetch_identity(&current.access_token, scopes, deadline)
            .await
        {
            // A reused access token may die before its expiry (revoked,
            // rotated elsewhere): the refresh token decides.
            Err(Error::Unauthenticated(_)) if !redeemed => {
                current = self.redeem(&tokens, deadline).await?;
                self.fetch_identity(&current.access_token, scopes, deadline)
                    .await
                    .map_err(|e| match e {
                        Error::Unauthenticated(m) => Error::TokenRevoked(m),
                        e => e,
                    })
            }
            Err(Error::Unauthenticated(m)) => Err(Error::TokenRevoked(m)),
            other => other,
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
            return Err(Error::TokenRevoked(
                "the access token expired and there is no refresh token".into(),
            ));
        };
        let (cell, leader) = self.redemptions.join(&rt);
        if !leader {
            self.metrics.refresh_joined.inc();
        }
        // A joiner waits at most until its own deadline.
        let shared = cell.get_or_init(|| async {
            let r = self.client.refresh(&rt, deadline).await;
            self.metrics.redemption(match &r {
                Ok(_) => Outcome::ok,
                Err(UpstreamError::Rejected { .. }) => Outcome::revoked,
                Err(_) => Outcome::error,
            });
            r.map_err(|e| match e {
                UpstreamError::Rejected { .. } => Error::TokenRevoked(e.to_string()),
                e => Error::from(e),
            })
        });
        let result = match tokio::time::timeout_at(deadline, shared).await {
            Ok(r) => r.clone(),
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
            async { self.client.user(token, deadline).await.map_err(Error::from) },
            async {
                self.client
                    .emails(token, deadline)
                    .await
                    .map_err(Error::from)
            },
            async {
                if groups_needed {
                    self.client
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
        user: &ApiUser,
        username: &str,
        workspaces: Vec<ApiWorkspaceAccess>,
        deadline: Instant,
    ) -> Result<Vec<String>, Error> {
        let kept: Vec<ApiWorkspaceAccess> = workspaces
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
            if !valid_slug(&w.workspace.slug) {
                return Err(Error::UpstreamInvalid(format!(
                    "{}: a workspace slug is not a valid slug",
                    bitbucket::EP_WORKSPACES
                )));
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
                let mine: Vec<ApiGroup> = members
                    .iter()
                    .filter(|g| g.workspace.eq_ignore_ascii_case(&w.workspace.slug))
                    .map(|g| ApiGroup {
                        slug: g.group.clone(),
                        members: vec![ApiGroupMember {
                            uuid: Some(user.uuid.clone()),
                        }],
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
        kept: &[ApiWorkspaceAccess],
        deadline: Instant,
    ) -> Result<Arc<Vec<TeamGroup>>, Error> {
        let wanted: Vec<(TeamGroup, Option<String>)> = self
            .cfg
            .team_groups
            .iter()
            .filter_map(|tg| {
                kept.iter()
                    .find(|w| w.workspace.slug.eq_ignore_ascii_case(&tg.workspace))
                    .map(|w| {
                        (
                            TeamGroup {
                                workspace: w.workspace.slug.clone(),
                                group: tg.group.clone(),
                            },
                            w.workspace.uuid.clone(),
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
        for chunk in wanted.chunks(bitbucket::MAX_GROUP_FILTERS) {
            let filters: Vec<(&str, &str)> = chunk
                .iter()
                .map(|(g, _)| (g.workspace.as_str(), g.group.as_str()))
                .collect();
            let visible = self.client.group_filter(token, &filters, deadline).await?;
            for g in visible {
                if !g
                    .members
                    .iter()
                    .any(|m| m.uuid.as_deref().is_some_and(|u| same_uuid(u, user_uuid)))
                {
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
        access: &ApiWorkspaceAccess,
        lists: bool,
        deadline: Instant,
    ) -> Result<WorkspaceDetails, Error> {
        let slug = access.workspace.slug.as_str();
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
            let p = match self.client.permission(token, slug, deadline).await {
                Ok(p) => Some(p),
                Err(UpstreamError::Denied { status, .. }) => {
                    tracing::debug!(
                        workspace = slug,
                        status,
                        "workspace permission not readable"
                    );
                    None
                }
                Err(e) => return Err(Error::from(e)),
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
        access: &ApiWorkspaceAccess,
        deadline: Instant,
    ) -> Result<Option<Arc<Vec<ApiGroup>>>, Error> {
        let slug = access.workspace.slug.as_str();
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
                let basic = Auth::Basic {
                    username: &a.username,
                    password: &a.password,
                };
                match self.read_groups(shared, basic, deadline).await? {
                    GroupsOutcome::Unreadable { .. } if access.administrator => {
                        self.read_groups(as_user, Auth::Bearer(token), deadline)
                            .await?
                    }
                    outcome => outcome,
                }
            }
            // API 1.0 lists a workspace's groups to its admins only, and
            // `administrator` already says the user is none: not asked.
            None if !access.administrator => GroupsOutcome::Unreadable { status: 403 },
            None => {
                self.read_groups(as_user, Auth::Bearer(token), deadline)
                    .await?
            }
        };
        match outcome {
            GroupsOutcome::Read(g) => Ok(Some(g)),
            GroupsOutcome::Members(_) => Ok(None),
            GroupsOutcome::Unreadable { status } => {
                self.metrics.degraded(degraded_reason(status));
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
                        status,
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
        auth: Auth<'_>,
        deadline: Instant,
    ) -> Result<GroupsOutcome, Error> {
        if let Some(hit) = self.groups_cache.get(&key).await {
            return Ok(hit);
        }
        let outcome = match self.client.groups(auth, &key.slug, deadline).await {
            Ok(g) => GroupsOutcome::Read(Arc::new(g)),
            Err(UpstreamError::Denied { status, .. }) => GroupsOutcome::Unreadable { status },
            // The credential itself was refused (a wrong teamGroupsAuth):
            // the login goes on without groups rather than failing.
            Err(UpstreamError::Unauthorized { .. }) => GroupsOutcome::Unreadable { status: 401 },
            Err(e) => return Err(e.into()),
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
    groups: Option<Arc<Vec<ApiGroup>>>,
}

/// Workspace slugs in upstream order, then `ws/group` for groups that list
/// the user, then `ws:permission`; no duplicates.
fn compose_groups(
    kept: &[ApiWorkspaceAccess],
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
        push(w.workspace.slug.clone());
    }
    for (w, d) in kept.iter().zip(details) {
        for g in d.groups.iter().flat_map(|g| g.iter()) {
            if g.members
                .iter()
                .any(|m| m.uuid.as_deref().is_some_and(|u| same_uuid(u, user_uuid)))
            {
                push(format!("{}/{}", w.workspace.slug, g.slug));
            }
        }
    }
    for (w, d) in kept.iter().zip(details) {
        if let Some(p) = &d.permission {
            push(format!("{}:{}", w.workspace.slug, p));
        }
    }
    out
}

/// A `teams` entry matches a workspace by slug, or by uuid (`{...}`).
fn team_matches(team: &str, w: &ApiWorkspaceAccess) -> bool {
    let team = team.trim();
    if team.starts_with('{') {
        return w
            .workspace
            .uuid
            .as_deref()
            .is_some_and(|u| same_uuid(u, team));
    }
    team.eq_ignore_ascii_case(&w.workspace.slug)
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

fn primary_email(emails: &[ApiEmail]) -> Option<String> {
    emails
        .iter()
        .find(|e| e.is_primary && e.is_confirmed && !e.email.trim().is_empty())
        .map(|e| e.email.clone())
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

fn tokens_from_grant(grant: &Grant, previous_refresh: Option<&Secret>, uuid: &str) -> Tokens {
    Tokens {
        access_token: grant.access_token.clone(),
        // Bitbucket always rotates; keep the old one if it ever does not.
        refresh_token: grant
            .refresh_token
            .clone()
            .or_else(|| previous_refresh.cloned()),
        expiry: grant.expires_in.map(|d| SystemTime::now() + d),
        user_uuid: (!uuid.is_empty()).then(|| uuid.to_string()),
    }
}

/// `code=…` from the callback's query string, or the error it carries.
pub fn parse_callback(raw_query: &str) -> Result<String, Error> {
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
        return Err(Error::CallbackError {
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
    Read(Arc<Vec<ApiGroup>>),
    /// 401 (a refused teamGroupsAuth), 403, 404 or 410.
    Unreadable {
        status: u16,
    },
    /// teamGroups: the listed groups the user is in.
    Members(Arc<Vec<TeamGroup>>),
}

/// The `team_groups_degraded_total` reason of an unreadable group list.
fn degraded_reason(status: u16) -> Reason {
    match status {
        401 => Reason::unauthorized,
        403 => Reason::forbidden,
        404 => Reason::not_found,
        _ => Reason::gone,
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
                .map(|g| {
                    64 + g.slug.len() + g.members.iter().map(|m| 32 + m.uuid.weigh()).sum::<usize>()
                })
                .sum(),
            GroupsOutcome::Unreadable { .. } => 0,
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

type Redemption = Arc<OnceCell<Result<Grant, Error>>>;

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
mod tests {
    use super::*;
    use crate::bitbucket::types::{ApiGroupMember, ApiWorkspaceBase};

    fn ws(slug: &str, uuid: &str) -> ApiWorkspaceAccess {
        ApiWorkspaceAccess {
            administrator: false,
            workspace: ApiWorkspaceBase {
                slug: slug.into(),
                uuid: Some(uuid.into()),
            },
        }
    }

    fn group(slug: &str, members: &[&str]) -> ApiGroup {
        ApiGroup {
            slug: slug.into(),
            members: members
                .iter()
                .map(|u| ApiGroupMember {
                    uuid: Some(u.to_string()),
                })
                .collect(),
            owner: None,
        }
    }

    #[test]
    fn callback_query_parsing() {
        assert_eq!(parse_callback("code=abc&state=x").unwrap(), "abc");
        assert_eq!(parse_callback("?state=x&code=a%2Bb").unwrap(), "a+b");
        match parse_callback("error=access_denied&error_description=The+user+said+no") {
            Err(e @ Error::CallbackError { .. }) => {
                assert_eq!(e.to_string(), "bitbucket: access_denied: The user said no")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_callback("error=server_error")
                .unwrap_err()
                .to_string(),
            "bitbucket: server_error"
        );
        for bad in ["", "state=x", "code=", "%%%", "code"] {
            assert!(
                matches!(parse_callback(bad), Err(Error::MalformedCallback(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_callback(&format!("code={}", "a".repeat(MAX_RAW_QUERY))),
            Err(Error::MalformedCallback(_))
        ));
    }

    #[test]
    fn groups_are_ordered_member_only_and_unique() {
        let me = "{11111111-1111-1111-1111-111111111111}";
        let kept = vec![ws("alpha", "{a}"), ws("beta", "{b}")];
        let details = vec![
            WorkspaceDetails {
                permission: Some("owner".into()),
                groups: Some(Arc::new(vec![
                    group("devs", &[me]),
                    group("ops", &["{someone-else}"]),
                    group("admins", &["{11111111-1111-1111-1111-111111111111}"]),
                ])),
            },
            WorkspaceDetails {
                permission: Some("member".into()),
                groups: None,
            },
        ];
        assert_eq!(
            compose_groups(&kept, &details, me),
            [
                "alpha",
                "beta",
                "alpha/devs",
                "alpha/admins",
                "alpha:owner",
                "beta:member"
            ]
        );
    }

    #[test]
    fn teams_match_by_slug_or_uuid() {
        let w = ws("my-team", "{6F0C3A52-0000-0000-0000-000000000000}");
        assert!(team_matches("my-team", &w));
        assert!(team_matches("MY-TEAM", &w));
        assert!(team_matches("{6f0c3a52-0000-0000-0000-000000000000}", &w));
        assert!(!team_matches("other", &w));
        assert!(!team_matches("{00000000-0000-0000-0000-000000000000}", &w));
    }

    #[test]
    fn primary_email_must_be_confirmed() {
        let e = |email: &str, p, c| ApiEmail {
            email: email.into(),
            is_primary: p,
            is_confirmed: c,
        };
        assert_eq!(
            primary_email(&[
                e("a@x", true, false),
                e("b@x", false, true),
                e("c@x", true, true)
            ]),
            Some("c@x".into())
        );
        assert_eq!(
            primary_email(&[e("a@x", true, false), e("b@x", false, true)]),
            None
        );
    }

    #[test]
    fn token_usability_margin() {
        let now = SystemTime::now();
        assert!(usable(None, now));
        assert!(usable(Some(now + Duration::from_secs(31)), now));
        assert!(!usable(Some(now + Duration::from_secs(29)), now));
        assert!(!usable(Some(now - Duration::from_secs(1)), now));
    }

    #[test]
    fn slugs() {
        assert!(valid_slug("my-team_2"));
        for bad in ["", ".", "..", "a/b", "a b", "a?b"] {
            assert!(!valid_slug(bad), "{bad:?}");
        }
    }

    #[test]
    fn cached_identities_never_carry_connector_data() {
        let i = Identity {
            user_id: "{a}".into(),
            username: "alice".into(),
            groups: vec!["w".into()],
            connector_data: Some(b"v1.sealed".to_vec()),
            email_verified: true,
            ..Default::default()
        };
        let back = CachedIdentity::of(&i).identity();
        assert_eq!(back.connector_data, None);
        assert_eq!(
            Identity {
                connector_data: None,
                ..i
            },
            back
        );
        assert_eq!(normal_uuid(" {ABC-1} "), "abc-1");
    }
}

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
