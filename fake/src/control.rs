//! The control API, `/_fake/...`: what an end-to-end test in another process
//! does with the in-process handle (hits, settings, expiry, revocation).
//!
//! It exists only in the fake; Bitbucket has nothing like it. It has no
//! authentication. Its requests are not counted (neither per endpoint nor in
//! the total), not delayed by `delay_ms`, and never faulted.
//!
//! - `GET /_fake/hits`: `{"authorize":n,"token":n,"user":n,"emails":n,
//!   "workspaces":n,"permission":n,"groups":n,"group_filter":n,"total":n}`;
//! - `POST /_fake/hits/reset`: zeroes them (and the `access_token` query count);
//! - `GET /_fake/settings`, `POST /_fake/settings` with any subset of
//!   `{"delay_ms":u64,"access_token_ttl_secs":u64,"refresh_grace_secs":u64}`:
//!   applies it and answers with all three (unknown keys: 400);
//! - `POST /_fake/expire-access-tokens`: every access token issued so far
//!   expires now; answers `{"expired":n}` (those that were still live);
//! - `GET /_fake/refresh-tokens`: every refresh token issued (the latest
//!   10,000), oldest first: `[{"token":"...","username":"...","used":bool}]`,
//!   `used` once it has been redeemed at least once; `username` is the
//!   user's username, else their nickname;
//! - `POST /_fake/revoke?username=NAME`: as [`FakeBitbucket::revoke_grants`]
//!   (unknown user: 404).
//!
//! Errors are `{"error":"..."}` with 400 or 404.

use super::server::*;
use super::*;

use serde::Deserialize;

/// Paths starting with this are the control API.
pub(super) const PREFIX: &str = "/_fake/";

/// Longest `access_token_ttl_secs` accepted (10 years; beyond, `Instant`
/// arithmetic could overflow).
const MAX_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

const HIT_NAMES: [(&str, Endpoint); Endpoint::COUNT] = [
    ("authorize", Endpoint::Authorize),
    ("token", Endpoint::Token),
    ("user", Endpoint::User),
    ("emails", Endpoint::Emails),
    ("workspaces", Endpoint::Workspaces),
    ("permission", Endpoint::Permission),
    ("groups", Endpoint::Groups),
    ("group_filter", Endpoint::GroupFilter),
];

pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/_fake/hits", get(hits))
        .route("/_fake/hits/reset", post(reset_hits))
        .route("/_fake/settings", get(settings).post(set_settings))
        .route("/_fake/expire-access-tokens", post(expire_access_tokens))
        .route("/_fake/refresh-tokens", get(refresh_tokens))
        .route("/_fake/revoke", post(revoke))
}

/// One refresh token as issued, for `GET /_fake/refresh-tokens`.
pub(super) struct RefreshLogEntry {
    token: String,
    username: String,
    user_uuid: String,
    /// Set when the grant was revoked: whether it had been used by then.
    used_when_revoked: Option<bool>,
}

impl ServerState {
    /// Called for every refresh token minted.
    pub(super) fn log_refresh_token(&mut self, token: &str, user_uuid: &str) {
        let username = self
            .user(user_uuid)
            .map(|u| u.username.clone().unwrap_or_else(|| u.nickname.clone()))
            .unwrap_or_default();
        if self.refresh_log.len() >= HISTORY_MAX {
            self.refresh_log.pop_front();
        }
        self.refresh_log.push_back(RefreshLogEntry {
            token: token.to_owned(),
            username,
            user_uuid: user_uuid.to_owned(),
            used_when_revoked: None,
        });
    }

    /// Whether this logged refresh token has been redeemed. A grant leaves
    /// the map only once used and past its grace window, or when revoked.
    fn refresh_used(&self, entry: &RefreshLogEntry) -> bool {
        match self.refresh.get(&entry.token) {
            Some(g) => g.first_used.is_some(),
            None => entry.used_when_revoked.unwrap_or(true),
        }
    }

    /// [`FakeBitbucket::revoke_grants`]; false for an unknown user.
    pub(super) fn revoke_user(&mut self, username: &str) -> bool {
        let Some(&u) = self.index.user_by_name.get(username) else {
            return false;
        };
        let uuid = self.fixture.users[u].uuid.clone();
        for i in 0..self.refresh_log.len() {
            let entry = &self.refresh_log[i];
            if entry.user_uuid == uuid && entry.used_when_revoked.is_none() {
                let used = self.refresh_used(entry);
                self.refresh_log[i].used_when_revoked = Some(used);
            }
        }
        self.codes.retain(|_, g| g.user_uuid != uuid);
        self.access.retain(|_, g| g.user_uuid != uuid);
        self.refresh.retain(|_, g| g.user_uuid != uuid);
        true
    }

    /// Every access token issued so far expires now; returns how many were live.
    fn expire_access_tokens(&mut self, now: Instant) -> usize {
        let mut expired = 0;
        for g in self.access.values_mut() {
            if g.expires_at > now {
                g.expires_at = now;
                expired += 1;
            }
        }
        expired
    }
}

impl FakeBitbucket {
    /// Every access token issued so far expires now (the next API call with
    /// one gets 401 "Access token expired"); returns how many were live.
    pub fn expire_access_tokens(&self) -> usize {
        self.inner
            .shared
            .lock()
            .expire_access_tokens(Instant::now())
    }

    /// Zeroes the hit counters, the total and the `access_token` query count.
    pub fn reset_hits(&self) {
        self.inner.shared.reset_hits();
    }
}

impl Shared {
    fn reset_hits(&self) {
        for h in &self.hits {
            h.store(0, Ordering::Relaxed);
        }
        self.total.store(0, Ordering::Relaxed);
        self.token_in_query.store(0, Ordering::Relaxed);
    }
}

fn control_error(status: StatusCode, message: &str) -> Response {
    json_response(status, &json!({ "error": message }))
}

async fn hits(AxState(shared): St) -> Response {
    let mut body = Map::new();
    for (name, endpoint) in HIT_NAMES {
        let n = endpoint
            .index()
            .map_or(0, |i| shared.hits[i].load(Ordering::Relaxed));
        body.insert(name.into(), n.into());
    }
    body.insert("total".into(), shared.total.load(Ordering::Relaxed).into());
    json_response(StatusCode::OK, &Value::Object(body))
}

async fn reset_hits(AxState(shared): St) -> Response {
    shared.reset_hits();
    json_response(StatusCode::OK, &json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsBody {
    delay_ms: Option<u64>,
    access_token_ttl_secs: Option<u64>,
    refresh_grace_secs: Option<u64>,
}

fn settings_json(s: &Settings) -> Value {
    json!({
        "delay_ms": u64::try_from(s.delay.as_millis()).unwrap_or(u64::MAX),
        "access_token_ttl_secs": s.access_ttl.as_secs(),
        "refresh_grace_secs": s.refresh_grace.as_secs(),
    })
}

async fn settings(AxState(shared): St) -> Response {
    json_response(StatusCode::OK, &settings_json(&shared.lock().settings))
}

async fn set_settings(AxState(shared): St, body: axum::body::Bytes) -> Response {
    let parsed: SettingsBody = if body.iter().all(u8::is_ascii_whitespace) {
        SettingsBody {
            delay_ms: None,
            access_token_ttl_secs: None,
            refresh_grace_secs: None,
        }
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return control_error(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "settings: {e} (expected a JSON object with any of delay_ms, access_token_ttl_secs, refresh_grace_secs)"
                    ),
                )
            }
        }
    };
    if parsed
        .access_token_ttl_secs
        .is_some_and(|t| t > MAX_TTL_SECS)
    {
        return control_error(
            StatusCode::BAD_REQUEST,
            &format!("settings: access_token_ttl_secs must be at most {MAX_TTL_SECS}"),
        );
    }
    let mut st = shared.lock();
    if let Some(ms) = parsed.delay_ms {
        st.settings.delay = Duration::from_millis(ms);
    }
    if let Some(secs) = parsed.access_token_ttl_secs {
        st.settings.access_ttl = Duration::from_secs(secs);
    }
    if let Some(secs) = parsed.refresh_grace_secs {
        st.settings.refresh_grace = Duration::from_secs(secs);
    }
    json_response(StatusCode::OK, &settings_json(&st.settings))
}

async fn expire_access_tokens(AxState(shared): St) -> Response {
    let expired = shared.lock().expire_access_tokens(Instant::now());
    json_response(StatusCode::OK, &json!({ "expired": expired }))
}

async fn refresh_tokens(AxState(shared): St) -> Response {
    let st = shared.lock();
    let list: Vec<Value> = st
        .refresh_log
        .iter()
        .map(|e| json!({"token": e.token, "username": e.username, "used": st.refresh_used(e)}))
        .collect();
    json_response(StatusCode::OK, &Value::Array(list))
}

async fn revoke(AxState(shared): St, req: Request) -> Response {
    let q = query_pairs(&req);
    let Some(username) = first(&q, "username").filter(|u| !u.is_empty()) else {
        return control_error(
            StatusCode::BAD_REQUEST,
            "revoke: the username query parameter is required",
        );
    };
    if shared.lock().revoke_user(username) {
        json_response(StatusCode::OK, &json!({ "revoked": username }))
    } else {
        control_error(
            StatusCode::NOT_FOUND,
            &format!("revoke: no user with username or nickname {username:?}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn control_requests_are_never_faulted_delayed_or_counted() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let fake = FakeBitbucket::start(Fixture::demo()).await.unwrap();
        fake.inject(Endpoint::Any, Fault::Status(503), None);
        fake.inject(Endpoint::Any, Fault::Reset, None);
        fake.set_delay(Duration::from_secs(60));
        let http = reqwest::Client::new();
        for path in ["/_fake/hits", "/_fake/settings", "/_fake/refresh-tokens"] {
            let resp = http
                .get(format!("{}{path}", fake.base_url()))
                .timeout(Duration::from_secs(20))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), reqwest::StatusCode::OK, "{path}");
        }
        let resp = http
            .post(format!("{}/_fake/expire-access-tokens", fake.base_url()))
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::OK);
        assert_eq!(fake.total_hits(), 0);
        assert_eq!(fake.hits(Endpoint::Token), 0);
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn expire_access_tokens_and_reset_hits_from_the_handle() {
        let fake = FakeBitbucket::start(Fixture::demo()).await.unwrap();
        let code = fake.issue_code(DEMO_CLIENT_ID, "alice");
        let now = Instant::now();
        let (access, _, _) = {
            let mut st = fake.inner.shared.lock();
            let uuid = st.codes[&code].user_uuid.clone();
            st.issue_tokens(DEMO_CLIENT_ID, &uuid, now)
        };
        fake.inner.shared.total.store(5, Ordering::Relaxed);
        fake.inner.shared.hits[0].store(3, Ordering::Relaxed);
        assert_eq!(fake.expire_access_tokens(), 1);
        assert_eq!(fake.expire_access_tokens(), 0);
        assert!(fake.inner.shared.lock().access[&access].expires_at <= Instant::now());
        fake.reset_hits();
        assert_eq!((fake.total_hits(), fake.hits(Endpoint::Authorize)), (0, 0));
        fake.shutdown().await;
    }
}
