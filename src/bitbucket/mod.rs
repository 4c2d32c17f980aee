//! The only code that speaks HTTP to Bitbucket Cloud.
//!
//! [`Client`] implements the domain's [`Bitbucket`] trait: it reads the wire
//! types of [`types`] and answers in the domain's facts ([`User`],
//! [`WorkspaceAccess`], [`Access::Denied`] with a [`Denial`], an
//! [`UpstreamError`] naming the endpoint template and status). Which HTTP
//! status or OAuth error string means what is decided here, and only here.
//! Base URLs are injected (config), never hard-coded here. Pagination follows
//! `next` only on the API base's scheme, host and port, up to [`MAX_PAGES`].

mod http;
mod token;
pub(crate) mod types;

use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, RefreshToken,
    TokenResponse as _, TokenUrl,
};
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use url::Url;

pub(crate) use self::http::{install_crypto, Auth, HttpOptions, DEFAULT_MAX_IN_FLIGHT};
use self::http::{Http, Response};
use self::token::{classify, OAuthClient, TokenHttp};
use self::types::{ApiEmail, ApiGroup, ApiUser, ApiWorkspaceAccess, ApiWorkspacePermission, Page};
use crate::config::{ConnectorConfig, TeamGroup};
use crate::connector::{
    Access, Bitbucket, Caller, Denial, Email, Group, GroupOwner, User, WorkspaceAccess,
};
pub(crate) use crate::connector::{Grant, UpstreamError};
use crate::metrics::Metrics;
use crate::secret::Secret;

/// Pages read from one collection at the most (100 entries each).
pub(crate) const MAX_PAGES: usize = 50;
const PAGELEN: &str = "100";

pub(crate) const EP_USER: &str = "/2.0/user";
pub(crate) const EP_EMAILS: &str = "/2.0/user/emails";
pub(crate) const EP_WORKSPACES: &str = "/2.0/user/workspaces";
pub(crate) const EP_PERMISSION: &str = "/2.0/user/workspaces/{workspace}/permission";
pub(crate) const EP_GROUPS: &str = "/1.0/groups/{workspace}";
/// `?group=ws/slug&group=…`: the listed groups the caller may see.
pub(crate) const EP_GROUP_FILTER: &str = "/1.0/groups";
/// `group=` filters sent in one request at the most (keeps URLs short).
pub(crate) const MAX_GROUP_FILTERS: usize = 50;

/// Where one connector's Bitbucket lives, and its OAuth consumer.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub auth_url: Url,
    pub token_url: Url,
    pub api_url: Url,
    pub legacy_api_url: Url,
}

/// A Bitbucket client for one OAuth consumer.
pub struct Client {
    http: Http,
    oauth: OAuthClient,
    token_url: Url,
    api: Url,
    legacy: Url,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("bitbucket::Client")
            .field("api", &self.api.as_str())
            .finish_non_exhaustive()
    }
}

impl Client {
    pub fn new(
        endpoints: &Endpoints,
        client_id: &str,
        client_secret: &Secret,
        metrics: Metrics,
        opts: HttpOptions,
    ) -> Result<Client, String> {
        let oauth = oauth2::Client::new(ClientId::new(client_id.to_string()))
            .set_client_secret(ClientSecret::new(client_secret.expose().to_string()))
            .set_auth_uri(AuthUrl::from_url(endpoints.auth_url.clone()))
            .set_token_uri(TokenUrl::from_url(endpoints.token_url.clone()))
            .set_auth_type(oauth2::AuthType::BasicAuth);
        Ok(Client {
            http: Http::new(metrics, opts)?,
            oauth,
            token_url: endpoints.token_url.clone(),
            api: endpoints.api_url.clone(),
            legacy: endpoints.legacy_api_url.clone(),
        })
    }

    /// The client of one configured connector: its endpoints and OAuth
    /// consumer, and its per-attempt timeout, in-flight bound and 429
    /// backoff in place of `opts`' defaults.
    pub fn for_connector(
        cfg: &ConnectorConfig,
        metrics: Metrics,
        opts: HttpOptions,
    ) -> Result<Client, String> {
        let endpoints = Endpoints {
            auth_url: cfg.auth_url.clone(),
            token_url: cfg.token_url.clone(),
            api_url: cfg.api_url.clone(),
            legacy_api_url: cfg.legacy_api_url.clone(),
        };
        let opts = HttpOptions {
            attempt_timeout: cfg.upstream_timeout,
            max_in_flight: cfg.upstream_max_in_flight,
            rate_limit_backoff: cfg.rate_limit_backoff,
            ..opts
        };
        Client::new(
            &endpoints,
            &cfg.client_id,
            &cfg.client_secret,
            metrics,
            opts,
        )
    }

    pub fn metrics(&self) -> &Metrics {
        self.http.metrics()
    }

    /// One token endpoint exchange: once, with the caller's deadline.
    async fn token(
        &self,
        grant: TokenGrant<'_>,
        deadline: Instant,
    ) -> Result<Grant, UpstreamError> {
        let http = TokenHttp {
            http: &self.http,
            url: &self.token_url,
            deadline,
        };
        let resp = match grant {
            TokenGrant::Code(code) => {
                self.oauth
                    .exchange_code(AuthorizationCode::new(code.to_string()))
                    .request_async(&http)
                    .await
            }
            TokenGrant::Refresh(rt) => {
                let rt = RefreshToken::new(rt.expose().to_string());
                self.oauth
                    .exchange_refresh_token(&rt)
                    .request_async(&http)
                    .await
            }
        }
        .map_err(classify)?;
        Ok(grant_of(&resp))
    }

    /// API 1.0 groups of a workspace, as the wire has them.
    async fn groups(
        &self,
        auth: Auth<'_>,
        slug: &str,
        deadline: Instant,
    ) -> Result<Vec<ApiGroup>, UpstreamError> {
        let url = join(&self.legacy, &["groups", slug]);
        let resp = self.http.get(EP_GROUPS, &url, auth, deadline).await?;
        decode(EP_GROUPS, &ok(EP_GROUPS, resp)?)
    }

    async fn paginate<T: DeserializeOwned>(
        &self,
        endpoint: &'static str,
        mut url: Url,
        auth: Auth<'_>,
        deadline: Instant,
    ) -> Result<Vec<T>, UpstreamError> {
        url.query_pairs_mut().append_pair("pagelen", PAGELEN);
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..MAX_PAGES {
            seen.insert(url.to_string());
            let resp = self.http.get(endpoint, &url, auth, deadline).await?;
            let page: Page<T> = decode(endpoint, &ok(endpoint, resp)?)?;
            out.extend(page.values);
            let Some(next) = page.next.filter(|n| !n.is_empty()) else {
                return Ok(out);
            };
            let next = Url::parse(&next).map_err(|_| UpstreamError::Invalid {
                endpoint,
                detail: "the next page link is not an absolute URL".into(),
            })?;
            if !same_origin(&next, &self.api) {
                return Err(UpstreamError::Invalid {
                    endpoint,
                    detail: format!(
                        "the next page link points to another host ({}), not followed",
                        origin(&next)
                    ),
                });
            }
            if seen.contains(next.as_str()) {
                return Err(UpstreamError::Invalid {
                    endpoint,
                    detail: "the next page link repeats a page already read".into(),
                });
            }
            url = next;
        }
        Err(UpstreamError::Invalid {
            endpoint,
            detail: format!("more than {MAX_PAGES} pages"),
        })
    }
}

enum TokenGrant<'a> {
    Code(&'a str),
    Refresh(&'a Secret),
}

impl Bitbucket for Client {
    const MAX_GROUP_FILTERS: usize = MAX_GROUP_FILTERS;

    fn authorize_url(&self, state: &str) -> String {
        let state = state.to_string();
        let (url, _) = self
            .oauth
            .authorize_url(move || CsrfToken::new(state))
            .url();
        url.into()
    }

    async fn exchange_code(&self, code: &str, deadline: Instant) -> Result<Grant, UpstreamError> {
        self.token(TokenGrant::Code(code), deadline).await
    }

    async fn redeem_refresh_token(
        &self,
        refresh_token: &Secret,
        deadline: Instant,
    ) -> Result<Grant, UpstreamError> {
        self.token(TokenGrant::Refresh(refresh_token), deadline)
            .await
    }

    async fn user(&self, token: &Secret, deadline: Instant) -> Result<User, UpstreamError> {
        let url = join(&self.api, &["user"]);
        let resp = self
            .http
            .get(EP_USER, &url, Auth::Bearer(token), deadline)
            .await?;
        let user: ApiUser = decode(EP_USER, &ok(EP_USER, resp)?)?;
        if user.uuid.trim().is_empty() {
            return Err(UpstreamError::Invalid {
                endpoint: EP_USER,
                detail: "the user has an empty uuid".into(),
            });
        }
        Ok(User {
            uuid: user.uuid,
            username: user.username,
            nickname: user.nickname,
        })
    }

    async fn emails(&self, token: &Secret, deadline: Instant) -> Result<Vec<Email>, UpstreamError> {
        let url = join(&self.api, &["user", "emails"]);
        let emails: Vec<ApiEmail> = self
            .paginate(EP_EMAILS, url, Auth::Bearer(token), deadline)
            .await?;
        Ok(emails
            .into_iter()
            .map(|e| Email {
                address: e.email,
                primary: e.is_primary,
                confirmed: e.is_confirmed,
            })
            .collect())
    }

    async fn workspaces(
        &self,
        token: &Secret,
        deadline: Instant,
    ) -> Result<Vec<WorkspaceAccess>, UpstreamError> {
        let url = join(&self.api, &["user", "workspaces"]);
        let access: Vec<ApiWorkspaceAccess> = self
            .paginate(EP_WORKSPACES, url, Auth::Bearer(token), deadline)
            .await?;
        Ok(access
            .into_iter()
            .map(|w| WorkspaceAccess {
                slug: w.workspace.slug,
                uuid: w.workspace.uuid,
                administrator: w.administrator,
            })
            .collect())
    }

    /// 403, 404 and 410 are refusals; a 401 stays an error (the user's token).
    async fn permission(
        &self,
        token: &Secret,
        workspace: &str,
        deadline: Instant,
    ) -> Result<Access<String>, UpstreamError> {
        let url = join(&self.api, &["user", "workspaces", workspace, "permission"]);
        let resp = self
            .http
            .get(EP_PERMISSION, &url, Auth::Bearer(token), deadline)
            .await?;
        match ok(EP_PERMISSION, resp) {
            Ok(resp) => {
                let p: ApiWorkspacePermission = decode(EP_PERMISSION, &resp)?;
                Ok(Access::Read(p.permission))
            }
            Err(UpstreamError::Denied { status, .. }) => Ok(Access::Denied(denial(status))),
            Err(e) => Err(e),
        }
    }

    /// API 1.0 lists a workspace's groups to its admins only: 403, 404 and
    /// 410 are refusals, and so is a 401 (a refused `teamGroupsAuth`).
    async fn group_list(
        &self,
        caller: Caller<'_>,
        workspace: &str,
        deadline: Instant,
    ) -> Result<Access<Vec<Group>>, UpstreamError> {
        let auth = match caller {
            Caller::User(token) => Auth::Bearer(token),
            Caller::Admin(a) => Auth::Basic {
                username: &a.username,
                password: &a.password,
            },
        };
        match self.groups(auth, workspace, deadline).await {
            Ok(g) => Ok(Access::Read(g.into_iter().map(group).collect())),
            Err(UpstreamError::Denied { status, .. }) => Ok(Access::Denied(denial(status))),
            Err(UpstreamError::Unauthorized { .. }) => Ok(Access::Denied(Denial::Unauthorized)),
            Err(e) => Err(e),
        }
    }

    /// API 1.0 "GET a list of matching groups": every group matching one of
    /// the `group={workspace}/{group_slug}` filters that the caller may see
    /// (a shared workspace's group: only its members; 200 with none else).
    async fn group_membership(
        &self,
        token: &Secret,
        wanted: &[TeamGroup],
        deadline: Instant,
    ) -> Result<Vec<Group>, UpstreamError> {
        let mut url = join(&self.legacy, &["groups"]);
        {
            let mut q = url.query_pairs_mut();
            for g in wanted {
                q.append_pair("group", &format!("{}/{}", g.workspace, g.group));
            }
        }
        let resp = self
            .http
            .get(EP_GROUP_FILTER, &url, Auth::Bearer(token), deadline)
            .await?;
        let body = ok(EP_GROUP_FILTER, resp)?;
        // "200 with an empty answer" may be an empty body as well as `[]`.
        if body.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Vec::new());
        }
        let groups: Vec<ApiGroup> = decode(EP_GROUP_FILTER, &body)?;
        Ok(groups.into_iter().map(group).collect())
    }
}

/// What a 403, 404 or 410 says.
fn denial(status: u16) -> Denial {
    match status {
        404 => Denial::NotFound,
        410 => Denial::Gone,
        _ => Denial::Forbidden,
    }
}

fn group(g: ApiGroup) -> Group {
    Group {
        slug: g.slug,
        members: g.members.into_iter().filter_map(|m| m.uuid).collect(),
        owner: g.owner.map(|o| GroupOwner {
            uuid: o.uuid,
            username: o.username,
            nickname: o.nickname,
        }),
    }
}

fn grant_of(resp: &token::BitbucketTokenResponse) -> Grant {
    Grant {
        access_token: Secret::new(resp.access_token().secret().clone()),
        refresh_token: resp
            .refresh_token()
            .map(|r| Secret::new(r.secret().clone())),
        expires_in: resp.expires_in(),
    }
}

/// `base` + path segments, each percent-encoded (a slug cannot add segments).
fn join(base: &Url, segments: &[&str]) -> Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty();
        for s in segments {
            path.push(s);
        }
    }
    url
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host() == b.host()
        && a.port_or_known_default() == b.port_or_known_default()
}

fn origin(u: &Url) -> String {
    match (u.host_str(), u.port()) {
        (Some(h), Some(p)) => format!("{}://{h}:{p}", u.scheme()),
        (Some(h), None) => format!("{}://{h}", u.scheme()),
        _ => u.scheme().to_string(),
    }
}

/// A 2xx response, or the error its status means.
fn ok(endpoint: &'static str, resp: Response) -> Result<Response, UpstreamError> {
    match resp.status.as_u16() {
        200..=299 => Ok(resp),
        401 => Err(UpstreamError::Unauthorized { endpoint }),
        s @ (403 | 404 | 410) => Err(UpstreamError::Denied {
            endpoint,
            status: s,
        }),
        s @ 500..=599 => Err(UpstreamError::Unavailable {
            endpoint,
            detail: format!("HTTP {s}"),
        }),
        s => Err(UpstreamError::Invalid {
            endpoint,
            detail: format!("unexpected HTTP {s}"),
        }),
    }
}

fn decode<T: DeserializeOwned>(
    endpoint: &'static str,
    resp: &Response,
) -> Result<T, UpstreamError> {
    serde_json::from_slice(&resp.body).map_err(|e| UpstreamError::Invalid {
        endpoint,
        // serde_json's message names a position and what it expected, not the data.
        detail: format!("unparseable JSON ({e})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_encodes_segments() {
        let base = Url::parse("https://api.example/2.0").unwrap();
        assert_eq!(
            join(&base, &["user", "workspaces", "a/../b", "permission"]).as_str(),
            "https://api.example/2.0/user/workspaces/a%2F..%2Fb/permission"
        );
        let base = Url::parse("https://api.example/2.0/").unwrap();
        assert_eq!(
            join(&base, &["user"]).as_str(),
            "https://api.example/2.0/user"
        );
    }

    #[test]
    fn origins() {
        let a = Url::parse("https://api.bitbucket.org/2.0").unwrap();
        assert!(same_origin(
            &Url::parse("https://api.bitbucket.org:443/2.0/x?page=2").unwrap(),
            &a
        ));
        assert!(!same_origin(
            &Url::parse("http://api.bitbucket.org/2.0").unwrap(),
            &a
        ));
        assert!(!same_origin(
            &Url::parse("https://evil.example/2.0").unwrap(),
            &a
        ));
        assert!(!same_origin(
            &Url::parse("https://api.bitbucket.org:8443/2.0").unwrap(),
            &a
        ));
    }
}
