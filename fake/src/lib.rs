//! A faithful fake Bitbucket Cloud (as it behaves in 2026), served over real
//! HTTP on loopback, for the `demo` command, the tests and the benchmarks.
//!
//! This is the `fake-bitbucket` crate of the bitbucket-connector workspace
//! (`fake/`). It does not depend on the service; the service depends on it
//! only through its `demo` cargo feature (on by default), so it ships in the
//! binary only with `demo` (`demo`, `fake-bitbucket` and the walkthrough): a
//! build with `--no-default-features` has neither the fake nor its
//! unauthenticated fault injection. The tests and benchmarks use it as a
//! dev-dependency. Its control API (`/_fake/...`, for a test in another
//! process) is documented in `fake/src/control.rs` and in the README's
//! command line section.
//!
//! What it fakes, and where it deliberately differs from the real service:
//! - OAuth 2.0: `GET /site/oauth2/authorize` redirects at once (no consent
//!   page) to the consumer's registered callback with `code` and `state`.
//!   Fake-only query parameters: `login_as=<username or nickname>` (default:
//!   the fixture's first user) and `deny=1` (redirect with `error=access_denied`).
//!   `POST /site/oauth2/access_token` takes the client credentials only as HTTP
//!   Basic; codes are single-use, bound to the client, valid 10 minutes;
//!   every refresh rotates the refresh token and the old one keeps working for
//!   a grace window after its first use.
//! - API 2.0 (`/2.0`): `user`, `user/emails`, `user/workspaces`,
//!   `user/workspaces/{workspace}/permission`, with Bearer tokens only (an
//!   `access_token` query parameter is ignored, and counted). `/2.0/workspaces`
//!   and `/2.0/user/permissions/workspaces` answer 410 Gone.
//! - API 1.0: `GET /1.0/groups/{workspace}` for workspace admins (an owner's
//!   Bearer token, or an [`AdminCredential`] as HTTP Basic), and
//!   `GET /1.0/groups?group=ws/slug&group=…`: the listed groups the caller is a
//!   member of (an admin credential: those of its workspaces), 200 with an
//!   empty list when none.
//!
//! Faults ([`Fault`]) can be injected per [`Endpoint`]. The server runs until
//! [`FakeBitbucket::shutdown`] or until the last clone of the handle is
//! dropped. It logs its listen address at info, requests (method and path,
//! never a query string or a header) at debug.
//!
//! Layout: this file holds the public API and the state; `server` the
//! HTTP plumbing and fault application; `oauth` and `api` the endpoints,
//! which answer errors as `error::ApiError`;
//! `fixture` the data; `schema` (tests) the spec-derived schemas; `control`
//! the fake-only control API (`/_fake/...`, not in the schema checks, never
//! counted or faulted); `standalone` the `fake-bitbucket` command.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
#![warn(unreachable_pub)]

mod api;
mod control;
mod error;
mod fixture;
mod oauth;
#[cfg(test)]
mod schema;
mod server;
mod standalone;
#[cfg(test)]
mod tests;

pub use fixture::{
    AdminCredential, Email, Fixture, Group, Membership, OAuthClient, User, Workspace, ALICE_UUID,
    BOB_UUID, DEMO_ADMIN_PASSWORD, DEMO_ADMIN_USERNAME, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET,
    DEMO_REDIRECT_URI,
};
pub use standalone::{add_wide_user, serve_standalone, StandaloneArgs, WIDE_UUID};

// The submodules take these through `use super::*`.
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Request, State as AxState};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use http::header::{AUTHORIZATION, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, StatusCode};
use rand::distr::{Alphanumeric, SampleString as _};
use serde_json::{json, Map, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tower::ServiceExt as _;

use server::{accept_loop, router};

/// Authorization codes live this long, as on Bitbucket.
const CODE_TTL: Duration = Duration::from_secs(600);
const DEFAULT_ACCESS_TTL: Duration = Duration::from_secs(7200);
const DEFAULT_REFRESH_GRACE: Duration = Duration::from_secs(600);
const DEFAULT_PAGELEN: usize = 10;
const MAX_PAGELEN: usize = 100;
/// Token endpoint bodies larger than this are refused.
const MAX_FORM_BYTES: usize = 64 * 1024;
/// Dead grants are swept after this many token issuances (amortised O(1)).
const SWEEP_EVERY: u64 = 4096;

/// The endpoints the fake counts hits for and injects faults into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Authorize,
    Token,
    User,
    Emails,
    Workspaces,
    Permission,
    Groups,
    /// `GET /1.0/groups?group=ws/slug&…` (membership by filter).
    GroupFilter,
    /// In [`FakeBitbucket::inject`]: every endpoint above. In
    /// [`FakeBitbucket::hits`]: all requests, as [`FakeBitbucket::total_hits`].
    Any,
}

impl Endpoint {
    const COUNT: usize = 8;

    fn index(self) -> Option<usize> {
        match self {
            Endpoint::Authorize => Some(0),
            Endpoint::Token => Some(1),
            Endpoint::User => Some(2),
            Endpoint::Emails => Some(3),
            Endpoint::Workspaces => Some(4),
            Endpoint::Permission => Some(5),
            Endpoint::Groups => Some(6),
            Endpoint::GroupFilter => Some(7),
            Endpoint::Any => None,
        }
    }

    fn is_paginated(self) -> bool {
        matches!(self, Endpoint::Emails | Endpoint::Workspaces)
    }
}

/// A misbehaviour to inject with [`FakeBitbucket::inject`].
#[derive(Clone, Debug)]
pub enum Fault {
    /// That status with a short body: `text/plain` without `Retry-After` for
    /// 429 (as Bitbucket does), a small HTML page for 5xx, an error JSON else.
    Status(u16),
    /// As [`Fault::Status`], with `Retry-After: secs`.
    StatusRetryAfter(u16, u64),
    /// Answer normally after this extra delay.
    Delay(Duration),
    /// 200, `content-type: application/json`, a body that is not JSON.
    Garbage,
    /// 200 with a JSON object of exactly this many bytes (or the smallest
    /// possible one, 31 bytes, when asked for less).
    HugeBody(usize),
    /// Paginated endpoints only: the page's `next` is this URL.
    ForeignNext(String),
    /// Paginated endpoints only: `"values": null`.
    NullValues,
    /// Paginated endpoints only: `"Values"` instead of `"values"`.
    CapitalValues,
    /// Close the TCP connection (with a RST) without any HTTP response.
    Reset,
    /// `/2.0/user` only: its normal answer, after `pad` bytes of leading
    /// whitespace (still valid JSON) sent as a first chunk; the rest follows
    /// `stall` later. Holds a large body open at the client meanwhile.
    StalledBody { pad: usize, stall: Duration },
}

impl Fault {
    fn applies_to(&self, endpoint: Endpoint) -> bool {
        match self {
            Fault::ForeignNext(_) | Fault::NullValues | Fault::CapitalValues => {
                endpoint.is_paginated()
            }
            Fault::StalledBody { .. } => endpoint == Endpoint::User,
            _ => true,
        }
    }
}

/// Deviations of the token response seen from other OAuth servers and proxies.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokenQuirks {
    /// `"expires_in": "7200"` instead of `7200`.
    pub expires_in_as_string: bool,
    /// `"scope"` instead of Bitbucket's `"scopes"`.
    pub scope_singular: bool,
    /// No `token_type`.
    pub omit_token_type: bool,
}

/// A running fake. Cheap to clone; the server stops on [`FakeBitbucket::shutdown`]
/// or when the last clone is dropped (then without waiting for it).
#[derive(Clone)]
pub struct FakeBitbucket {
    inner: Arc<Inner>,
}

struct Inner {
    base_url: String,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

impl std::fmt::Debug for FakeBitbucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeBitbucket")
            .field("base_url", &self.inner.base_url)
            .finish_non_exhaustive()
    }
}

impl FakeBitbucket {
    /// Starts the fake on a free port of 127.0.0.1.
    pub async fn start(fixture: Fixture) -> std::io::Result<FakeBitbucket> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), fixture).await
    }

    pub async fn start_on(addr: SocketAddr, fixture: Fixture) -> std::io::Result<FakeBitbucket> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let base_url = format!("http://{local}");
        let shared = Arc::new(Shared {
            base_url: base_url.clone(),
            hits: Default::default(),
            total: AtomicU64::new(0),
            token_in_query: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            state: Mutex::new(ServerState::new(fixture)),
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(
            listener,
            router(shared.clone()),
            shared.clone(),
            stop_rx,
        ));
        tracing::info!(%base_url, "fake Bitbucket Cloud listening");
        Ok(FakeBitbucket {
            inner: Arc::new(Inner {
                base_url,
                shared,
                stop,
                task: Mutex::new(Some(task)),
            }),
        })
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn base_url(&self) -> String {
        self.inner.base_url.clone()
    }

    pub fn auth_url(&self) -> String {
        format!("{}/site/oauth2/authorize", self.inner.base_url)
    }

    pub fn token_url(&self) -> String {
        format!("{}/site/oauth2/access_token", self.inner.base_url)
    }

    pub fn api_url(&self) -> String {
        format!("{}/2.0", self.inner.base_url)
    }

    pub fn legacy_api_url(&self) -> String {
        format!("{}/1.0", self.inner.base_url)
    }

    /// Mints an authorization code as the authorize redirect would.
    /// `username` matches a user's `username`, else its `nickname`. With an
    /// unknown client or user the code is one the token endpoint rejects
    /// (`invalid_grant`).
    pub fn issue_code(&self, client_id: &str, username: &str) -> String {
        let mut st = self.inner.shared.lock();
        let user = st.index.user_by_name.get(username).copied();
        let client_known = st.index.client_by_id.contains_key(client_id);
        match user {
            Some(u) if client_known => {
                let uuid = st.fixture.users[u].uuid.clone();
                st.mint_code(client_id, &uuid, Instant::now())
            }
            _ => {
                tracing::debug!("fake bitbucket: issue_code for an unknown client or user");
                random_token(30)
            }
        }
    }

    /// Queues a fault for `endpoint` ([`Endpoint::Any`]: all), applied to the
    /// next `times` requests (`None`: every request until [`Self::clear_faults`]).
    /// A request takes the first queued fault that matches its endpoint and
    /// applies to it (pagination faults apply only to paginated endpoints).
    pub fn inject(&self, endpoint: Endpoint, fault: Fault, times: Option<u32>) {
        if times == Some(0) {
            return;
        }
        self.inner.shared.lock().faults.push(FaultEntry {
            endpoint,
            fault,
            remaining: times,
        });
    }

    /// Applies `fault` to each request for `endpoint` ([`Endpoint::Any`]:
    /// all) with this probability (clamped to 0..=1), until
    /// [`Self::clear_faults`]. Queued faults ([`Self::inject`]) go first; then
    /// each random fault that matches draws in turn, and the first hit applies.
    /// For load runs: a steady rate of failures on random endpoints.
    pub fn inject_random(&self, endpoint: Endpoint, fault: Fault, probability: f64) {
        let probability = if probability.is_nan() {
            0.0
        } else {
            probability.clamp(0.0, 1.0)
        };
        if probability == 0.0 {
            return;
        }
        self.inner.shared.lock().random_faults.push(RandomFault {
            endpoint,
            fault,
            probability,
        });
    }

    /// Drops every queued and random fault.
    pub fn clear_faults(&self) {
        let mut st = self.inner.shared.lock();
        st.faults.clear();
        st.random_faults.clear();
    }

    /// Latency added before answering every request.
    pub fn set_delay(&self, d: Duration) {
        self.inner.shared.lock().settings.delay = d;
    }

    /// Largest page the paginated endpoints serve (default and ceiling 100).
    pub fn set_max_pagelen(&self, n: usize) {
        self.inner.shared.lock().settings.max_pagelen = n.clamp(1, MAX_PAGELEN);
    }

    /// Lifetime of access tokens issued from now on (default 2 h).
    pub fn set_access_token_ttl(&self, d: Duration) {
        self.inner.shared.lock().settings.access_ttl = d;
    }

    /// How long a refresh token keeps working after its first use (default 10 min).
    pub fn set_refresh_grace(&self, d: Duration) {
        self.inner.shared.lock().settings.refresh_grace = d;
    }

    pub fn set_token_quirks(&self, q: TokenQuirks) {
        self.inner.shared.lock().settings.quirks = q;
    }

    /// The most requests this fake has been answering at the same time.
    pub fn max_concurrent_requests(&self) -> u64 {
        self.inner.shared.max_in_flight.load(Ordering::Relaxed)
    }

    /// Every access and refresh token minted (the latest 10,000), so that a
    /// test can search what the service wrote for them.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.inner.shared.lock().history.iter().cloned().collect()
    }

    /// The user revoked the consumer: every code, access token and refresh
    /// token of that user (by username or nickname) stops working.
    pub fn revoke_grants(&self, username: &str) {
        self.inner.shared.lock().revoke_user(username);
    }

    /// Changes the fixture in place; effective for the next request. Grants
    /// refer to users by uuid, so a removed user's tokens stop working. The
    /// closure runs under the fake's lock: do not call the fake from it.
    pub fn update_fixture(&self, f: impl FnOnce(&mut Fixture)) {
        let mut st = self.inner.shared.lock();
        f(&mut st.fixture);
        st.reindex();
    }

    /// Requests routed to `endpoint` (faulted ones included).
    pub fn hits(&self, endpoint: Endpoint) -> u64 {
        match endpoint.index() {
            Some(i) => self.inner.shared.hits[i].load(Ordering::Relaxed),
            None => self.total_hits(),
        }
    }

    /// Every request received, whatever its path.
    pub fn total_hits(&self) -> u64 {
        self.inner.shared.total.load(Ordering::Relaxed)
    }

    /// Requests that carried an `access_token` query parameter.
    pub fn token_in_query_seen(&self) -> u64 {
        self.inner.shared.token_in_query.load(Ordering::Relaxed)
    }

    /// Stops accepting, drops every open connection, and waits until the port
    /// is released. Other clones of the handle stay usable but get no answers.
    pub async fn shutdown(self) {
        self.inner.stop.send_replace(true);
        let task = self
            .inner
            .task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

// ---------------------------------------------------------------------------
// State

struct Shared {
    base_url: String,
    hits: [AtomicU64; Endpoint::COUNT],
    total: AtomicU64,
    token_in_query: AtomicU64,
    /// Requests being answered now, and the most seen at once.
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    state: Mutex<ServerState>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ServerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Settings {
    delay: Duration,
    max_pagelen: usize,
    access_ttl: Duration,
    refresh_grace: Duration,
    quirks: TokenQuirks,
}

struct FaultEntry {
    endpoint: Endpoint,
    fault: Fault,
    remaining: Option<u32>,
}

struct RandomFault {
    endpoint: Endpoint,
    fault: Fault,
    probability: f64,
}

struct CodeGrant {
    client_id: String,
    user_uuid: String,
    expires_at: Instant,
}

struct AccessGrant {
    user_uuid: String,
    expires_at: Instant,
}

struct RefreshGrant {
    client_id: String,
    user_uuid: String,
    first_used: Option<Instant>,
}

/// Lookups so that no request scans the whole fixture.
#[derive(Default)]
struct Index {
    client_by_id: HashMap<String, usize>,
    user_by_uuid: HashMap<String, usize>,
    /// By username, and by nickname where no username has it.
    user_by_name: HashMap<String, usize>,
    /// By slug and by `{uuid}`.
    workspace_by_key: HashMap<String, usize>,
    /// User uuid -> (workspace index, membership index), in fixture order.
    memberships: HashMap<String, Vec<(usize, usize)>>,
}

const HISTORY_MAX: usize = 10_000;

struct ServerState {
    fixture: Fixture,
    index: Index,
    settings: Settings,
    faults: Vec<FaultEntry>,
    random_faults: Vec<RandomFault>,
    codes: HashMap<String, CodeGrant>,
    access: HashMap<String, AccessGrant>,
    refresh: HashMap<String, RefreshGrant>,
    issued: u64,
    /// The most recent tokens minted, for tests that look for leaks.
    history: std::collections::VecDeque<String>,
    /// The most recent refresh tokens minted, for the control API.
    refresh_log: std::collections::VecDeque<control::RefreshLogEntry>,
    /// API 1.0 group objects as JSON text, by (workspace, group) index,
    /// rendered on first use and dropped with the index (`reindex`).
    group_bodies: HashMap<(usize, usize), Arc<str>>,
}

impl ServerState {
    fn new(fixture: Fixture) -> ServerState {
        let mut st = ServerState {
            fixture,
            index: Index::default(),
            settings: Settings {
                delay: Duration::ZERO,
                max_pagelen: MAX_PAGELEN,
                access_ttl: DEFAULT_ACCESS_TTL,
                refresh_grace: DEFAULT_REFRESH_GRACE,
                quirks: TokenQuirks::default(),
            },
            faults: Vec::new(),
            random_faults: Vec::new(),
            codes: HashMap::new(),
            access: HashMap::new(),
            refresh: HashMap::new(),
            issued: 0,
            history: Default::default(),
            refresh_log: Default::default(),
            group_bodies: HashMap::new(),
        };
        st.reindex();
        st
    }

    fn reindex(&mut self) {
        let f = &self.fixture;
        let mut ix = Index::default();
        for (i, c) in f.clients.iter().enumerate() {
            ix.client_by_id.entry(c.client_id.clone()).or_insert(i);
        }
        for (i, u) in f.users.iter().enumerate() {
            ix.user_by_uuid.entry(u.uuid.clone()).or_insert(i);
            if let Some(name) = &u.username {
                ix.user_by_name.insert(name.clone(), i);
            }
        }
        for (i, u) in f.users.iter().enumerate() {
            ix.user_by_name.entry(u.nickname.clone()).or_insert(i);
        }
        for (w, ws) in f.workspaces.iter().enumerate() {
            ix.workspace_by_key.entry(ws.slug.clone()).or_insert(w);
            ix.workspace_by_key.entry(ws.uuid.clone()).or_insert(w);
            for (m, member) in ws.members.iter().enumerate() {
                ix.memberships
                    .entry(member.user_uuid.clone())
                    .or_default()
                    .push((w, m));
            }
        }
        self.index = ix;
        self.group_bodies.clear();
    }

    fn user(&self, uuid: &str) -> Option<&User> {
        self.index
            .user_by_uuid
            .get(uuid)
            .map(|&i| &self.fixture.users[i])
    }

    fn workspace(&self, key: &str) -> Option<&Workspace> {
        self.index
            .workspace_by_key
            .get(key)
            .map(|&i| &self.fixture.workspaces[i])
    }

    fn permission(&self, user_uuid: &str, ws: &Workspace) -> Option<String> {
        ws.members
            .iter()
            .find(|m| m.user_uuid == user_uuid)
            .map(|m| m.permission.clone())
    }

    fn take_fault(&mut self, endpoint: Endpoint) -> Option<Fault> {
        let matches = |e: Endpoint, f: &Fault| {
            (e == endpoint || e == Endpoint::Any) && f.applies_to(endpoint)
        };
        let Some(pos) = self
            .faults
            .iter()
            .position(|e| matches(e.endpoint, &e.fault))
        else {
            return self
                .random_faults
                .iter()
                .filter(|r| matches(r.endpoint, &r.fault))
                .find(|r| rand::random::<f64>() < r.probability)
                .map(|r| r.fault.clone());
        };
        let entry = &mut self.faults[pos];
        let fault = entry.fault.clone();
        if let Some(n) = entry.remaining.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.faults.remove(pos);
            }
        }
        Some(fault)
    }

    fn mint_code(&mut self, client_id: &str, user_uuid: &str, now: Instant) -> String {
        let code = random_token(18);
        self.codes.insert(
            code.clone(),
            CodeGrant {
                client_id: client_id.to_owned(),
                user_uuid: user_uuid.to_owned(),
                expires_at: now + CODE_TTL,
            },
        );
        code
    }

    /// Returns (access token, refresh token, lifetime).
    fn issue_tokens(
        &mut self,
        client_id: &str,
        user_uuid: &str,
        now: Instant,
    ) -> (String, String, Duration) {
        self.issued += 1;
        if self.issued % SWEEP_EVERY == 0 {
            self.sweep(now);
        }
        let ttl = self.settings.access_ttl;
        let access = random_base64(48);
        let refresh = random_token(24);
        self.access.insert(
            access.clone(),
            AccessGrant {
                user_uuid: user_uuid.to_owned(),
                expires_at: now + ttl,
            },
        );
        self.refresh.insert(
            refresh.clone(),
            RefreshGrant {
                client_id: client_id.to_owned(),
                user_uuid: user_uuid.to_owned(),
                first_used: None,
            },
        );
        if self.history.len() + 2 > HISTORY_MAX {
            self.history.drain(..2);
        }
        self.history.push_back(access.clone());
        self.history.push_back(refresh.clone());
        self.log_refresh_token(&refresh, user_uuid);
        (access, refresh, ttl)
    }

    fn sweep(&mut self, now: Instant) {
        let grace = self.settings.refresh_grace;
        self.codes.retain(|_, g| g.expires_at > now);
        self.access.retain(|_, g| g.expires_at > now);
        self.refresh
            .retain(|_, g| g.first_used.is_none_or(|t| now.duration_since(t) <= grace));
    }
}

/// Alphanumeric, like Bitbucket's codes and refresh tokens.
fn random_token(len: usize) -> String {
    Alphanumeric.sample_string(&mut rand::rng(), len)
}

/// Bitbucket's access tokens are long and contain `-`, `_` and `=`.
fn random_base64(bytes: usize) -> String {
    let raw: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    base64::engine::general_purpose::URL_SAFE.encode(raw)
}

#[cfg(test)]
mod random_fault_tests {
    use super::*;

    fn state() -> ServerState {
        ServerState::new(Fixture::demo())
    }

    fn random(st: &mut ServerState, endpoint: Endpoint, fault: Fault, probability: f64) {
        st.random_faults.push(RandomFault {
            endpoint,
            fault,
            probability,
        });
    }

    #[test]
    fn random_faults_fire_at_their_rate_on_matching_endpoints_only() {
        let mut st = state();
        random(&mut st, Endpoint::User, Fault::Status(503), 0.25);
        let n = 20_000;
        let hits = (0..n)
            .filter(|_| st.take_fault(Endpoint::User).is_some())
            .count();
        // 25% of 20,000: 5,000, sd ~61; 10 sd either way never fails by chance.
        assert!((4_400..=5_600).contains(&hits), "{hits}");
        assert!((0..1000).all(|_| st.take_fault(Endpoint::Token).is_none()));
    }

    #[test]
    fn random_faults_apply_only_where_they_make_sense_and_queued_ones_go_first() {
        let mut st = state();
        random(&mut st, Endpoint::Any, Fault::NullValues, 1.0);
        assert!(st.take_fault(Endpoint::User).is_none());
        assert!(matches!(
            st.take_fault(Endpoint::Emails),
            Some(Fault::NullValues)
        ));
        st.faults.push(FaultEntry {
            endpoint: Endpoint::Emails,
            fault: Fault::Garbage,
            remaining: Some(1),
        });
        assert!(matches!(
            st.take_fault(Endpoint::Emails),
            Some(Fault::Garbage)
        ));
        assert!(matches!(
            st.take_fault(Endpoint::Emails),
            Some(Fault::NullValues)
        ));
    }

    #[tokio::test]
    async fn inject_random_clamps_and_clear_faults_removes_it() {
        let fake = FakeBitbucket::start(Fixture::demo()).await.unwrap();
        fake.inject_random(Endpoint::Token, Fault::Status(503), f64::NAN);
        fake.inject_random(Endpoint::Token, Fault::Status(503), -1.0);
        assert!(fake.inner.shared.lock().random_faults.is_empty());
        fake.inject_random(Endpoint::Token, Fault::Status(503), 7.0);
        assert!((0..100).all(|_| matches!(
            fake.inner.shared.lock().take_fault(Endpoint::Token),
            Some(Fault::Status(503))
        )));
        fake.clear_faults();
        assert!(fake
            .inner
            .shared
            .lock()
            .take_fault(Endpoint::Token)
            .is_none());
        fake.shutdown().await;
    }
}
