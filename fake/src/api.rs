//! API 2.0 (`/2.0/...`) and API 1.0 (`/1.0/groups/{workspace}`) handlers and
//! the JSON shapes they answer with.

use super::error::ApiError;
use super::server::*;
use super::*;

const AUTH_REQUIRED: &str = "This API is only accessible with the following authentication types: \
     session, password, apppassword, api_token, repo_access_token, workspace_access_token, \
     project_access_token";

/// The uuid of the user whose Bearer token authenticates the request.
fn bearer_user(st: &ServerState, headers: &HeaderMap) -> Result<String, ApiError> {
    let invalid = || ApiError::api(StatusCode::UNAUTHORIZED, "Invalid access token");
    let token = bearer_token(headers)
        .ok_or_else(|| ApiError::api(StatusCode::UNAUTHORIZED, AUTH_REQUIRED))?;
    let grant = st.access.get(token).ok_or_else(invalid)?;
    if grant.expires_at <= Instant::now() {
        return Err(ApiError::api(
            StatusCode::UNAUTHORIZED,
            "Access token expired. Use your refresh token to obtain a new access token.",
        ));
    }
    st.user(&grant.user_uuid).ok_or_else(invalid)?;
    Ok(grant.user_uuid.clone())
}

pub(super) async fn api_user(AxState(shared): St, req: Request) -> Result<Response, ApiError> {
    let fault = begin(&shared, Endpoint::User, &req).await?;
    let st = shared.lock();
    let uuid = bearer_user(&st, req.headers())?;
    let user = st
        .user(&uuid)
        .ok_or_else(|| ApiError::api(StatusCode::UNAUTHORIZED, "Invalid access token"))?;
    let body = user_json(&shared.base_url, user);
    Ok(match fault {
        Some(Fault::StalledBody { pad, stall }) => stalled_json(&body, pad, stall),
        _ => json_response(StatusCode::OK, &body),
    })
}

pub(super) async fn api_emails(AxState(shared): St, req: Request) -> Result<Response, ApiError> {
    let fault = begin(&shared, Endpoint::Emails, &req).await?;
    let st = shared.lock();
    let uuid = bearer_user(&st, req.headers())?;
    let base = &shared.base_url;
    let emails: &[Email] = st
        .user(&uuid)
        .map(|u| u.emails.as_slice())
        .unwrap_or_default();
    let page = Page::new(&req, emails.len(), st.settings.max_pagelen)?;
    let values = emails[page.range()]
        .iter()
        .map(|e| email_json(base, e))
        .collect();
    Ok(page.respond(base, &req, values, fault))
}

pub(super) async fn api_workspaces(
    AxState(shared): St,
    req: Request,
) -> Result<Response, ApiError> {
    let fault = begin(&shared, Endpoint::Workspaces, &req).await?;
    let st = shared.lock();
    let uuid = bearer_user(&st, req.headers())?;
    let q = query_pairs(&req);
    let admin_filter = match first(&q, "administrator") {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => {
            return Err(ApiError::api(
                StatusCode::BAD_REQUEST,
                "administrator must be true or false",
            ))
        }
    };
    let memberships: Vec<(&Workspace, bool)> = st
        .index
        .memberships
        .get(&uuid)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|&(w, m)| {
            let ws = &st.fixture.workspaces[w];
            (ws, is_admin_permission(&ws.members[m].permission))
        })
        .filter(|&(_, admin)| admin_filter.is_none_or(|want| want == admin))
        .collect();
    let base = &shared.base_url;
    let page = Page::new(&req, memberships.len(), st.settings.max_pagelen)?;
    let values = memberships[page.range()]
        .iter()
        .map(|&(ws, admin)| {
            json!({
                "type": "workspace_access",
                "administrator": admin,
                "workspace": workspace_base_json(base, ws),
                "links": {"self": {"href": format!(
                    "{base}/2.0/user/workspaces/{}/permission", ws.slug)}},
            })
        })
        .collect();
    Ok(page.respond(base, &req, values, fault))
}

pub(super) async fn api_permission(
    AxState(shared): St,
    Path(workspace): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    begin(&shared, Endpoint::Permission, &req).await?;
    let st = shared.lock();
    let uuid = bearer_user(&st, req.headers())?;
    let Some(ws) = st.workspace(&workspace) else {
        return Err(ApiError::api(
            StatusCode::NOT_FOUND,
            format!("No workspace with identifier '{workspace}'."),
        ));
    };
    let (Some(permission), Some(user)) = (st.permission(&uuid, ws), st.user(&uuid)) else {
        return Err(ApiError::api(
            StatusCode::FORBIDDEN,
            "You do not have access to this workspace.",
        ));
    };
    let base = &shared.base_url;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "type": "workspace_membership",
            "permission": permission,
            "added_on": "2021-03-01T09:00:00.000000+00:00",
            "last_accessed": "2026-05-04T08:00:00.000000+00:00",
            "user": account_json(base, user),
            "workspace": workspace_json(base, ws),
            "links": {"self": {"href": format!(
                "{base}/2.0/workspaces/{}/members/{}", ws.slug, path_segment(&user.uuid))}},
        }),
    ))
}

pub(super) async fn gone(AxState(_): St) -> ApiError {
    ApiError::api(
        StatusCode::GONE,
        "This API has been removed. See https://developer.atlassian.com/cloud/bitbucket/changelog/ \
         (CHANGE-2770).",
    )
}

pub(super) async fn not_found() -> ApiError {
    ApiError::api(StatusCode::NOT_FOUND, "Resource not found")
}

fn is_admin_permission(permission: &str) -> bool {
    permission == "owner"
}

/// One page of a collection, from the `page` and `pagelen` query parameters.
struct Page {
    number: usize,
    pagelen: usize,
    total: usize,
}

impl Page {
    fn new(req: &Request, total: usize, max_pagelen: usize) -> Result<Page, ApiError> {
        let q = query_pairs(req);
        let number = match first(&q, "page") {
            None => 1,
            Some(p) => match p.parse::<usize>() {
                Ok(n) if n >= 1 => n,
                _ => return Err(ApiError::api(StatusCode::BAD_REQUEST, "Invalid page")),
            },
        };
        let pagelen = match first(&q, "pagelen") {
            None => DEFAULT_PAGELEN,
            Some(p) => match p.parse::<usize>() {
                Ok(n) if n >= 1 => n,
                _ => return Err(ApiError::api(StatusCode::BAD_REQUEST, "Invalid pagelen")),
            },
        }
        .min(max_pagelen)
        .min(MAX_PAGELEN);
        Ok(Page {
            number,
            pagelen,
            total,
        })
    }

    fn range(&self) -> std::ops::Range<usize> {
        let start = (self.number - 1)
            .saturating_mul(self.pagelen)
            .min(self.total);
        start..start.saturating_add(self.pagelen).min(self.total)
    }

    fn respond(
        &self,
        base: &str,
        req: &Request,
        values: Vec<Value>,
        fault: Option<Fault>,
    ) -> Response {
        let mut body = Map::new();
        body.insert("pagelen".into(), self.pagelen.into());
        body.insert("size".into(), self.total.into());
        body.insert("page".into(), self.number.into());
        let next = if self.range().end < self.total {
            // Same path and parameters, next page; never echo a token.
            let mut ser = url::form_urlencoded::Serializer::new(String::new());
            for (k, v) in query_pairs(req) {
                if k != "page" && k != "access_token" {
                    ser.append_pair(&k, &v);
                }
            }
            ser.append_pair("page", &(self.number + 1).to_string());
            Some(format!("{base}{}?{}", req.uri().path(), ser.finish()))
        } else {
            None
        };
        let (values_key, values) = match fault {
            Some(Fault::NullValues) => ("values", Value::Null),
            Some(Fault::CapitalValues) => ("Values", Value::Array(values)),
            _ => ("values", Value::Array(values)),
        };
        body.insert(values_key.into(), values);
        let next = match fault {
            Some(Fault::ForeignNext(url)) => Some(url),
            _ => next,
        };
        if let Some(next) = next {
            body.insert("next".into(), next.into());
        }
        json_response(StatusCode::OK, &Value::Object(body))
    }
}

fn user_links(base: &str, uuid: &str) -> Value {
    let id = path_segment(uuid);
    json!({
        "self": {"href": format!("{base}/2.0/users/{id}")},
        "avatar": {"href": format!("{base}/account/{id}/avatar/")},
        "html": {"href": format!("{base}/{id}/")},
    })
}

/// `GET /2.0/user`: the spec's `user` (an `account`).
fn user_json(base: &str, u: &User) -> Value {
    let mut v = json!({
        "type": "user",
        "uuid": u.uuid,
        "account_id": u.account_id,
        "nickname": u.nickname,
        "display_name": u.display_name,
        "account_status": "active",
        "has_2fa_enabled": false,
        "is_staff": false,
        "created_on": "2019-05-21T10:14:46.513389+00:00",
        "links": user_links(base, &u.uuid),
    });
    if let (Some(name), Value::Object(obj)) = (&u.username, &mut v) {
        obj.insert("username".into(), name.clone().into());
        if let Some(Value::Object(links)) = obj.get_mut("links") {
            links.insert(
                "repositories".into(),
                json!({"href": format!("{base}/2.0/repositories/{}", path_segment(&u.uuid))}),
            );
        }
    }
    v
}

/// The `user` object nested in other resources (no private fields).
fn account_json(base: &str, u: &User) -> Value {
    json!({
        "type": "user",
        "uuid": u.uuid,
        "account_id": u.account_id,
        "nickname": u.nickname,
        "display_name": u.display_name,
        "links": user_links(base, &u.uuid),
    })
}

fn email_json(base: &str, e: &Email) -> Value {
    json!({
        "type": "email",
        "email": e.email,
        "is_primary": e.is_primary,
        "is_confirmed": e.is_confirmed,
        "links": {"self": {"href": format!("{base}/2.0/user/emails/{}", path_segment(&e.email))}},
    })
}

fn workspace_base_json(base: &str, ws: &Workspace) -> Value {
    json!({
        "type": "workspace_base",
        "uuid": ws.uuid,
        "slug": ws.slug,
        "name": ws.name,
        "links": {
            "avatar": {"href": format!("{base}/workspaces/{}/avatar/?ts=1715000000", ws.slug)},
            "self": {"href": format!("{base}/2.0/workspaces/{}", ws.slug)},
        },
    })
}

fn workspace_json(base: &str, ws: &Workspace) -> Value {
    let s = &ws.slug;
    json!({
        "type": "workspace",
        "uuid": ws.uuid,
        "slug": s,
        "name": ws.name,
        "is_private": true,
        "created_on": "2020-01-01T00:00:00.000000+00:00",
        "links": {
            "avatar": {"href": format!("{base}/workspaces/{s}/avatar/?ts=1715000000")},
            "html": {"href": format!("{base}/{s}/")},
            "members": {"href": format!("{base}/2.0/workspaces/{s}/members")},
            "owners": {"href": format!("{base}/2.0/workspaces/{s}/members?q=permission%3D%22owner%22")},
            "projects": {"href": format!("{base}/2.0/workspaces/{s}/projects")},
            "repositories": {"href": format!("{base}/2.0/repositories/{s}")},
            "snippets": {"href": format!("{base}/2.0/snippets/{s}")},
            "self": {"href": format!("{base}/2.0/workspaces/{s}")},
        },
    })
}

enum Caller {
    Admin(Vec<String>),
    User(String),
}

/// Who calls API 1.0's groups: an admin credential (HTTP Basic) or a user's
/// access token.
fn legacy_caller(st: &ServerState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    if let Some((user, pass)) = basic_credentials(headers) {
        return match st
            .fixture
            .admins
            .iter()
            .find(|a| a.username == user && a.password == pass)
        {
            Some(a) => Ok(Caller::Admin(a.workspaces.clone())),
            None => Err(ApiError::api(
                StatusCode::UNAUTHORIZED,
                "Invalid credentials",
            )),
        };
    }
    bearer_user(st, headers).map(Caller::User)
}

pub(super) async fn legacy_groups(
    AxState(shared): St,
    Path(workspace): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    begin(&shared, Endpoint::Groups, &req).await?;
    let mut st = shared.lock();
    let caller = legacy_caller(&st, req.headers())?;
    let Some(&w) = st.index.workspace_by_key.get(&workspace) else {
        return Err(ApiError::api(StatusCode::NOT_FOUND, "Workspace not found"));
    };
    let ws = &st.fixture.workspaces[w];
    let allowed = match &caller {
        Caller::Admin(slugs) => slugs.iter().any(|s| *s == ws.slug || *s == ws.uuid),
        Caller::User(uuid) => st
            .permission(uuid, ws)
            .is_some_and(|p| is_admin_permission(&p)),
    };
    if !allowed {
        return Err(ApiError::api(
            StatusCode::FORBIDDEN,
            "You must be an administrator of this workspace to list its groups.",
        ));
    }
    let groups: Vec<Arc<str>> = (0..ws.groups.len())
        .map(|g| st.group_body(&shared.base_url, w, g))
        .collect();
    drop(st);
    Ok(json_array(&groups))
}

impl ServerState {
    /// [`group_json`] as text, rendered once per fixture: a workspace's groups
    /// list hundreds of members, and every cold login may ask for them.
    fn group_body(&mut self, base: &str, w: usize, g: usize) -> Arc<str> {
        if let Some(body) = self.group_bodies.get(&(w, g)) {
            return body.clone();
        }
        let ws = &self.fixture.workspaces[w];
        let body: Arc<str> = group_json(base, self, ws, &ws.groups[g]).to_string().into();
        self.group_bodies.insert((w, g), body.clone());
        body
    }
}

/// `[a,b,…]` from JSON texts, as `Value::Array(..).to_string()` writes it.
fn json_array(items: &[Arc<str>]) -> Response {
    let mut text = String::with_capacity(2 + items.iter().map(|i| i.len() + 1).sum::<usize>());
    text.push('[');
    for (n, item) in items.iter().enumerate() {
        if n > 0 {
            text.push(',');
        }
        text.push_str(item);
    }
    text.push(']');
    raw(StatusCode::OK, "application/json; charset=utf-8", text)
}

/// A group as API 1.0 writes it, members and owner included.
fn group_json(base: &str, st: &ServerState, ws: &Workspace, g: &Group) -> Value {
    let owner = json!({
        "username": ws.slug,
        "display_name": ws.name,
        "uuid": ws.uuid,
        "is_team": true,
        "avatar": format!("{base}/workspaces/{}/avatar/", ws.slug),
        "resource_uri": format!("/1.0/users/{}", ws.slug),
    });
    let members: Vec<Value> = g
        .members
        .iter()
        .filter_map(|uuid| st.user(uuid))
        .map(|u| {
            json!({
                "username": u.username,
                "nickname": u.nickname,
                "display_name": u.display_name,
                "uuid": u.uuid,
                "account_id": u.account_id,
                "is_team": false,
                "avatar": format!("{base}/account/{}/avatar/", path_segment(&u.uuid)),
                "resource_uri": format!("/1.0/users/{}", path_segment(&u.uuid)),
            })
        })
        .collect();
    json!({
        "name": g.name,
        "slug": g.slug,
        "permission": "read",
        "auto_add": false,
        "email_forwarding_disabled": false,
        "owner": owner,
        "members": members,
    })
}

/// `GET /1.0/groups?group={workspace}/{group_slug}&…`: every listed group the
/// caller may see. A user sees a (shared) workspace's group only when a member
/// of it; an admin credential sees the groups of its workspaces. Unknown
/// workspaces, groups and malformed filters give nothing, as does a group
/// the caller may not see: always 200 with a list, possibly empty.
pub(super) async fn legacy_group_filter(
    AxState(shared): St,
    req: Request,
) -> Result<Response, ApiError> {
    begin(&shared, Endpoint::GroupFilter, &req).await?;
    let mut st = shared.lock();
    let caller = legacy_caller(&st, req.headers())?;
    let query = req.uri().query().unwrap_or_default();
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        if k != "group" {
            continue;
        }
        let Some((ws_slug, group_slug)) = v.split_once('/') else {
            continue;
        };
        let Some(&w) = st.index.workspace_by_key.get(ws_slug) else {
            continue;
        };
        let ws = &st.fixture.workspaces[w];
        let Some(g) = ws.groups.iter().position(|g| g.slug == group_slug) else {
            continue;
        };
        let visible = match &caller {
            Caller::Admin(slugs) => slugs.iter().any(|s| *s == ws.slug || *s == ws.uuid),
            Caller::User(uuid) => ws.groups[g].members.iter().any(|m| m == uuid),
        };
        if visible && seen.insert((w, g)) {
            out.push(st.group_body(&shared.base_url, w, g));
        }
    }
    drop(st);
    Ok(json_array(&out))
}
