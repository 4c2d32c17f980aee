//! A faithful fake Bitbucket Cloud (as it behaves in 2026), served over real
//! HTTP on loopback, for the `demo` command, the tests and the benchmarks.
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
//!   Bearer token, or an [`AdminCredential`] as HTTP Basic).
//!
//! Faults ([`Fault`]) can be injected per [`Endpoint`]. The server runs until
//! [`FakeBitbucket::shutdown`] or until the last clone of the handle is
//! dropped. It logs its listen address at info, requests (method and path,
//! never a query string or a header) at debug.

mod fixture;
#[cfg(test)]
mod schema;
#[cfg(test)]
mod tests;

pub use fixture::{
    AdminCredential, Email, Fixture, Group, Membership, OAuthClient, User, Workspace, ALICE_UUID,
    BOB_UUID, DEMO_ADMIN_PASSWORD, DEMO_ADMIN_USERNAME, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET,
    DEMO_REDIRECT_URI,
};

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
    /// In [`FakeBitbucket::inject`]: every endpoint above. In
    /// [`FakeBitbucket::hits`]: all requests, as [`FakeBitbucket::total_hits`].
    Any,
}

impl Endpoint {
    const COUNT: usize = 7;

    fn index(self) -> Option<usize> {
        match self {
            Endpoint::Authorize => Some(0),
            Endpoint::Token => Some(1),
            Endpoint::User => Some(2),
            Endpoint::Emails => Some(3),
            Endpoint::Workspaces => Some(4),
            Endpoint::Permission => Some(5),
            Endpoint::Groups => Some(6),
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
    /// possible one, 33 bytes, when asked for less).
    HugeBody(usize),
    /// Paginated endpoints only: the page's `next` is this URL.
    ForeignNext(String),
    /// Paginated endpoints only: `"values": null`.
    NullValues,
    /// Paginated endpoints only: `"Values"` instead of `"values"`.
    CapitalValues,
    /// Close the TCP connection (with a RST) without any HTTP response.
    Reset,
}

impl Fault {
    fn applies_to(&self, endpoint: Endpoint) -> bool {
        match self {
            Fault::ForeignNext(_) | Fault::NullValues | Fault::CapitalValues => {
                endpoint.is_paginated()
            }
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

    pub fn clear_faults(&self) {
        self.inner.shared.lock().faults.clear();
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

    /// The user revoked the consumer: every code, access token and refresh
    /// token of that user (by username or nickname) stops working.
    pub fn revoke_grants(&self, username: &str) {
        let mut st = self.inner.shared.lock();
        let Some(&u) = st.index.user_by_name.get(username) else {
            return;
        };
        let uuid = st.fixture.users[u].uuid.clone();
        st.codes.retain(|_, g| g.user_uuid != uuid);
        st.access.retain(|_, g| g.user_uuid != uuid);
        st.refresh.retain(|_, g| g.user_uuid != uuid);
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

struct ServerState {
    fixture: Fixture,
    index: Index,
    settings: Settings,
    faults: Vec<FaultEntry>,
    codes: HashMap<String, CodeGrant>,
    access: HashMap<String, AccessGrant>,
    refresh: HashMap<String, RefreshGrant>,
    issued: u64,
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
            codes: HashMap::new(),
            access: HashMap::new(),
            refresh: HashMap::new(),
            issued: 0,
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
        let pos = self.faults.iter().position(|e| {
            (e.endpoint == endpoint || e.endpoint == Endpoint::Any) && e.fault.applies_to(endpoint)
        })?;
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

// ---------------------------------------------------------------------------
// Server plumbing

/// Per-connection control handed to handlers through request extensions.
struct ConnControl {
    reset: Notify,
}

async fn accept_loop(
    listener: TcpListener,
    router: Router,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new());
    let http = Arc::new(http);
    while !*stop.borrow_and_update() {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(serve_connection(
                        stream,
                        http.clone(),
                        router.clone(),
                        shared.clone(),
                        stop.clone(),
                    ));
                }
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::debug!(error = %e, "fake bitbucket: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
    drop(listener);
    conns.shutdown().await;
}

async fn serve_connection(
    stream: TcpStream,
    http: Arc<hyper::server::conn::http1::Builder>,
    router: Router,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    // A second handle on the socket, kept so that a Reset fault can set
    // SO_LINGER 0 and make the close a RST once hyper's handle is dropped.
    let (stream, spare) = match duplicate(stream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "fake bitbucket: cannot set up connection");
            return;
        }
    };
    let ctl = Arc::new(ConnControl {
        reset: Notify::new(),
    });
    let svc_ctl = ctl.clone();
    let svc = hyper::service::service_fn(move |req| {
        handle(req, router.clone(), shared.clone(), svc_ctl.clone())
    });
    let mut conn = Box::pin(http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc));
    let reset = tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(error = %e, "fake bitbucket: connection ended");
            }
            false
        }
        _ = ctl.reset.notified() => true,
        _ = stop.changed() => false,
    };
    if reset {
        if let Ok(s) = TcpStream::from_std(spare) {
            let _ = s.set_zero_linger();
            drop(conn);
            drop(s);
        }
    }
}

fn duplicate(stream: TcpStream) -> std::io::Result<(TcpStream, std::net::TcpStream)> {
    let std_stream = stream.into_std()?;
    let spare = std_stream.try_clone()?;
    Ok((TcpStream::from_std(std_stream)?, spare))
}

async fn handle(
    mut req: http::Request<hyper::body::Incoming>,
    router: Router,
    shared: Arc<Shared>,
    ctl: Arc<ConnControl>,
) -> Result<Response, Infallible> {
    shared.total.fetch_add(1, Ordering::Relaxed);
    if req.uri().query().is_some_and(|q| {
        url::form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "access_token")
    }) {
        shared.token_in_query.fetch_add(1, Ordering::Relaxed);
    }
    tracing::debug!(method = %req.method(), path = %req.uri().path(), "fake bitbucket request");
    let delay = shared.lock().settings.delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    req.extensions_mut().insert(ctl);
    router.oneshot(req.map(Body::new)).await
}

type St = AxState<Arc<Shared>>;

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/site/oauth2/authorize", get(authorize))
        .route("/site/oauth2/access_token", post(token))
        .route("/2.0/user", get(api_user))
        .route("/2.0/user/emails", get(api_emails))
        .route("/2.0/user/workspaces", get(api_workspaces))
        .route(
            "/2.0/user/workspaces/{workspace}/permission",
            get(api_permission),
        )
        .route("/2.0/workspaces", get(gone))
        .route("/2.0/user/permissions/workspaces", get(gone))
        .route("/1.0/groups/{workspace}", get(legacy_groups))
        .fallback(not_found)
        .with_state(shared)
}

/// Counts the hit, then applies the endpoint's next fault. `Ok` carries the
/// pagination fault still to apply, if any; `Err` is the faulted response.
fn begin<'a>(
    shared: &'a Shared,
    endpoint: Endpoint,
    req: &Request,
) -> impl std::future::Future<Output = Result<Option<Fault>, Response>> + Send + 'a {
    // Only the connection handle may cross an await: a request body is not Sync.
    let ctl = req.extensions().get::<Arc<ConnControl>>().cloned();
    begin_with(shared, endpoint, ctl)
}

async fn begin_with(
    shared: &Shared,
    endpoint: Endpoint,
    ctl: Option<Arc<ConnControl>>,
) -> Result<Option<Fault>, Response> {
    if let Some(i) = endpoint.index() {
        shared.hits[i].fetch_add(1, Ordering::Relaxed);
    }
    let fault = shared.lock().take_fault(endpoint);
    match fault {
        None => Ok(None),
        Some(Fault::Status(code)) => Err(status_fault(endpoint, code, None)),
        Some(Fault::StatusRetryAfter(code, secs)) => Err(status_fault(endpoint, code, Some(secs))),
        Some(Fault::Delay(d)) => {
            tokio::time::sleep(d).await;
            Ok(None)
        }
        Some(Fault::Garbage) => Err(raw(
            StatusCode::OK,
            "application/json",
            "<html><body>Bitbucket is having a bad day {\"values\": [".to_owned(),
        )),
        Some(Fault::HugeBody(n)) => Err(raw(StatusCode::OK, "application/json", huge_json(n))),
        Some(Fault::Reset) => match ctl {
            Some(ctl) => {
                ctl.reset.notify_one();
                // The connection, and this future with it, is dropped now.
                std::future::pending::<Result<Option<Fault>, Response>>().await
            }
            None => Err(status_fault(endpoint, 500, None)),
        },
        Some(page_fault) => Ok(Some(page_fault)),
    }
}

fn status_fault(endpoint: Endpoint, code: u16, retry_after: Option<u64>) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let reason = status.canonical_reason().unwrap_or("Error");
    let mut resp = if status == StatusCode::TOO_MANY_REQUESTS {
        raw(
            status,
            "text/plain",
            "Rate limit for this resource has been exceeded".to_owned(),
        )
    } else if status.is_server_error() {
        raw(
            status,
            "text/html; charset=utf-8",
            format!(
                "<html><head><title>{code} {reason}</title></head><body><h1>{reason}</h1></body></html>\n"
            ),
        )
    } else if endpoint == Endpoint::Token {
        oauth_error(status, "server_error", reason)
    } else {
        api_error(status, reason)
    };
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

fn huge_json(n: usize) -> String {
    let head = "{\"type\":\"padding\",\"padding\":\"";
    let tail = "\"}";
    let fill = n.saturating_sub(head.len() + tail.len());
    let mut s = String::with_capacity(head.len() + fill + tail.len());
    s.push_str(head);
    s.extend(std::iter::repeat_n('a', fill));
    s.push_str(tail);
    s
}

fn raw(status: StatusCode, content_type: &'static str, body: String) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    raw(status, "application/json; charset=utf-8", value.to_string())
}

/// API 1.0/2.0 error shape (the spec's `error` definition).
fn api_error(status: StatusCode, message: &str) -> Response {
    json_response(
        status,
        &json!({"type": "error", "error": {"message": message}}),
    )
}

/// An API error that travels in a `Result` (a `Response` is too large to).
struct ApiError(StatusCode, &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        api_error(self.0, self.1)
    }
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

fn html_page(status: StatusCode, message: &str) -> Response {
    raw(
        status,
        "text/html; charset=utf-8",
        format!("<!DOCTYPE html><html><head><title>Bitbucket</title></head><body><p>{message}</p></body></html>\n"),
    )
}

fn query_pairs(req: &Request) -> Vec<(String, String)> {
    req.uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

fn first<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// `{...}` -> `%7B...%7D`, for uuids in URL paths.
fn path_segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

// ---------------------------------------------------------------------------
// OAuth

async fn authorize(AxState(shared): St, req: Request) -> Response {
    if let Err(resp) = begin(&shared, Endpoint::Authorize, &req).await {
        return resp;
    }
    let q = query_pairs(&req);
    let mut st = shared.lock();
    let client = first(&q, "client_id")
        .and_then(|id| st.index.client_by_id.get(id))
        .map(|&i| st.fixture.clients[i].clone());
    let Some(client) = client else {
        return html_page(StatusCode::BAD_REQUEST, "Invalid client_id");
    };
    if first(&q, "redirect_uri").is_some_and(|r| r != client.redirect_uri) {
        return html_page(
            StatusCode::BAD_REQUEST,
            "The redirect_uri does not match the consumer's callback URL",
        );
    }
    let Ok(mut target) = url::Url::parse(&client.redirect_uri) else {
        return html_page(
            StatusCode::BAD_REQUEST,
            "The consumer has no valid callback URL",
        );
    };
    let state = first(&q, "state");
    let error = if first(&q, "deny") == Some("1") {
        Some(("access_denied", "The user denied access to the application"))
    } else if first(&q, "response_type") != Some("code") {
        Some(("unsupported_response_type", "response_type must be code"))
    } else {
        None
    };
    {
        let mut pairs = target.query_pairs_mut();
        match error {
            Some((error, description)) => {
                pairs.append_pair("error", error);
                pairs.append_pair("error_description", description);
            }
            None => {
                let user = match first(&q, "login_as") {
                    Some(name) => st.index.user_by_name.get(name).copied(),
                    None => (!st.fixture.users.is_empty()).then_some(0),
                };
                let Some(user) = user else {
                    return html_page(StatusCode::BAD_REQUEST, "No such user to log in as");
                };
                let uuid = st.fixture.users[user].uuid.clone();
                let code = st.mint_code(&client.client_id, &uuid, Instant::now());
                pairs.append_pair("code", &code);
            }
        }
        if let Some(state) = state {
            pairs.append_pair("state", state);
        }
    }
    let mut resp = StatusCode::FOUND.into_response();
    match HeaderValue::from_str(target.as_str()) {
        Ok(v) => {
            resp.headers_mut().insert(LOCATION, v);
            resp
        }
        Err(_) => html_page(StatusCode::BAD_REQUEST, "Invalid callback URL"),
    }
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, pass) = decoded.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|t| !t.is_empty())
}

/// RFC 6749 has clients form-urlencode the id and secret before Basic; most
/// do not. Accept both spellings.
fn credential_matches(given: &str, expected: &str) -> bool {
    given == expected
        || url::form_urlencoded::parse(format!("x={given}").as_bytes())
            .next()
            .is_some_and(|(_, v)| v == expected)
}

async fn token(AxState(shared): St, req: Request) -> Response {
    if let Err(resp) = begin(&shared, Endpoint::Token, &req).await {
        return resp;
    }
    let basic = basic_credentials(req.headers());
    let is_form = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let Ok(body) = axum::body::to_bytes(req.into_body(), MAX_FORM_BYTES).await else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Unreadable request body",
        );
    };
    if !is_form {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The request body must be application/x-www-form-urlencoded",
        );
    }
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let now = Instant::now();
    let mut st = shared.lock();

    let Some((id, secret)) = basic else {
        let description = if first(&form, "client_id").is_some() {
            "Client credentials must be sent with HTTP Basic authentication"
        } else {
            "Missing client credentials"
        };
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", description);
    };
    let client = st
        .fixture
        .clients
        .iter()
        .find(|c| credential_matches(&id, &c.client_id))
        .filter(|c| credential_matches(&secret, &c.client_secret))
        .map(|c| c.client_id.clone());
    let Some(client_id) = client else {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Invalid OAuth client credentials",
        );
    };

    let grant = first(&form, "grant_type").unwrap_or_default();
    let user_uuid = match grant {
        "authorization_code" => {
            let Some(code) = first(&form, "code") else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "Missing code");
            };
            let redirect = st
                .index
                .client_by_id
                .get(&client_id)
                .map(|&i| &st.fixture.clients[i].redirect_uri);
            if first(&form, "redirect_uri").is_some_and(|r| Some(r) != redirect.map(String::as_str))
            {
                return invalid_grant("redirect_uri does not match the consumer's callback URL");
            }
            match st.codes.get(code) {
                None => return invalid_grant("Invalid or used authorization code"),
                Some(g) if g.expires_at <= now => {
                    st.codes.remove(code);
                    return invalid_grant("Authorization code has expired");
                }
                Some(g) if g.client_id != client_id => {
                    return invalid_grant("Authorization code was issued to another client")
                }
                Some(_) => st
                    .codes
                    .remove(code)
                    .map(|g| g.user_uuid)
                    .unwrap_or_default(),
            }
        }
        "refresh_token" => {
            let Some(token) = first(&form, "refresh_token") else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "Missing refresh_token",
                );
            };
            let grace = st.settings.refresh_grace;
            match st.refresh.get_mut(token) {
                None => return invalid_grant("Invalid refresh_token"),
                Some(g) if g.client_id != client_id => {
                    return invalid_grant("Refresh token was issued to another client")
                }
                Some(g) => match g.first_used {
                    Some(t) if now.duration_since(t) > grace => {
                        st.refresh.remove(token);
                        return invalid_grant("Refresh token has been rotated");
                    }
                    Some(_) => g.user_uuid.clone(),
                    None => {
                        g.first_used = Some(now);
                        g.user_uuid.clone()
                    }
                },
            }
        }
        "" => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing grant_type",
            )
        }
        _ => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "Unsupported grant type",
            )
        }
    };
    if st.user(&user_uuid).is_none() {
        return invalid_grant("The account no longer exists");
    }
    let (access, refresh, ttl) = st.issue_tokens(&client_id, &user_uuid, now);
    let quirks = st.settings.quirks;
    drop(st);

    let mut body = Map::new();
    body.insert("access_token".into(), access.into());
    let scope_key = if quirks.scope_singular {
        "scope"
    } else {
        "scopes"
    };
    body.insert(scope_key.into(), "account email".into());
    let secs = ttl.as_secs();
    body.insert(
        "expires_in".into(),
        if quirks.expires_in_as_string {
            secs.to_string().into()
        } else {
            secs.into()
        },
    );
    body.insert("refresh_token".into(), refresh.into());
    if !quirks.omit_token_type {
        body.insert("token_type".into(), "bearer".into());
    }
    body.insert("state".into(), grant.into());
    json_response(StatusCode::OK, &Value::Object(body))
}

fn invalid_grant(description: &str) -> Response {
    oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", description)
}

// ---------------------------------------------------------------------------
// API 2.0

const AUTH_REQUIRED: &str = "This API is only accessible with the following authentication types: \
     session, password, apppassword, api_token, repo_access_token, workspace_access_token, \
     project_access_token";

/// The uuid of the user whose Bearer token authenticates the request.
fn bearer_user(st: &ServerState, headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(token) = bearer_token(headers) else {
        return Err(ApiError(StatusCode::UNAUTHORIZED, AUTH_REQUIRED));
    };
    match st.access.get(token) {
        None => Err(ApiError(StatusCode::UNAUTHORIZED, "Invalid access token")),
        Some(g) if g.expires_at <= Instant::now() => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "Access token expired. Use your refresh token to obtain a new access token.",
        )),
        Some(g) if st.user(&g.user_uuid).is_none() => {
            Err(ApiError(StatusCode::UNAUTHORIZED, "Invalid access token"))
        }
        Some(g) => Ok(g.user_uuid.clone()),
    }
}

async fn api_user(AxState(shared): St, req: Request) -> Response {
    if let Err(resp) = begin(&shared, Endpoint::User, &req).await {
        return resp;
    }
    let st = shared.lock();
    let uuid = match bearer_user(&st, req.headers()) {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    match st.user(&uuid) {
        Some(user) => json_response(StatusCode::OK, &user_json(&shared.base_url, user)),
        None => api_error(StatusCode::UNAUTHORIZED, "Invalid access token"),
    }
}

async fn api_emails(AxState(shared): St, req: Request) -> Response {
    let fault = match begin(&shared, Endpoint::Emails, &req).await {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let st = shared.lock();
    let uuid = match bearer_user(&st, req.headers()) {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let base = &shared.base_url;
    let emails: &[Email] = st
        .user(&uuid)
        .map(|u| u.emails.as_slice())
        .unwrap_or_default();
    let page = Page::new(&req, emails.len(), st.settings.max_pagelen);
    match page {
        Ok(page) => {
            let values = emails[page.range()]
                .iter()
                .map(|e| email_json(base, e))
                .collect();
            page.respond(base, &req, values, fault)
        }
        Err(e) => e.into_response(),
    }
}

async fn api_workspaces(AxState(shared): St, req: Request) -> Response {
    let fault = match begin(&shared, Endpoint::Workspaces, &req).await {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let st = shared.lock();
    let uuid = match bearer_user(&st, req.headers()) {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let q = query_pairs(&req);
    let admin_filter = match first(&q, "administrator") {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "administrator must be true or false",
            )
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
    match Page::new(&req, memberships.len(), st.settings.max_pagelen) {
        Ok(page) => {
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
            page.respond(base, &req, values, fault)
        }
        Err(e) => e.into_response(),
    }
}

async fn api_permission(
    AxState(shared): St,
    Path(workspace): Path<String>,
    req: Request,
) -> Response {
    if let Err(resp) = begin(&shared, Endpoint::Permission, &req).await {
        return resp;
    }
    let st = shared.lock();
    let uuid = match bearer_user(&st, req.headers()) {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let Some(ws) = st.workspace(&workspace) else {
        return api_error(
            StatusCode::NOT_FOUND,
            &format!("No workspace with identifier '{workspace}'."),
        );
    };
    let (Some(permission), Some(user)) = (st.permission(&uuid, ws), st.user(&uuid)) else {
        return api_error(
            StatusCode::FORBIDDEN,
            "You do not have access to this workspace.",
        );
    };
    let base = &shared.base_url;
    json_response(
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
    )
}

async fn gone(AxState(_): St) -> Response {
    api_error(
        StatusCode::GONE,
        "This API has been removed. See https://developer.atlassian.com/cloud/bitbucket/changelog/ \
         (CHANGE-2770).",
    )
}

async fn not_found() -> Response {
    api_error(StatusCode::NOT_FOUND, "Resource not found")
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
                _ => return Err(ApiError(StatusCode::BAD_REQUEST, "Invalid page")),
            },
        };
        let pagelen = match first(&q, "pagelen") {
            None => DEFAULT_PAGELEN,
            Some(p) => match p.parse::<usize>() {
                Ok(n) if n >= 1 => n,
                _ => return Err(ApiError(StatusCode::BAD_REQUEST, "Invalid pagelen")),
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

// ---------------------------------------------------------------------------
// API 1.0

enum Caller {
    Admin(Vec<String>),
    User(String),
}

async fn legacy_groups(
    AxState(shared): St,
    Path(workspace): Path<String>,
    req: Request,
) -> Response {
    if let Err(resp) = begin(&shared, Endpoint::Groups, &req).await {
        return resp;
    }
    let st = shared.lock();
    let caller = if let Some((user, pass)) = basic_credentials(req.headers()) {
        match st
            .fixture
            .admins
            .iter()
            .find(|a| a.username == user && a.password == pass)
        {
            Some(a) => Caller::Admin(a.workspaces.clone()),
            None => return api_error(StatusCode::UNAUTHORIZED, "Invalid credentials"),
        }
    } else {
        match bearer_user(&st, req.headers()) {
            Ok(uuid) => Caller::User(uuid),
            Err(e) => return e.into_response(),
        }
    };
    let Some(ws) = st.workspace(&workspace) else {
        return api_error(StatusCode::NOT_FOUND, "Workspace not found");
    };
    let allowed = match &caller {
        Caller::Admin(slugs) => slugs.iter().any(|s| *s == ws.slug || *s == ws.uuid),
        Caller::User(uuid) => st
            .permission(uuid, ws)
            .is_some_and(|p| is_admin_permission(&p)),
    };
    if !allowed {
        return api_error(
            StatusCode::FORBIDDEN,
            "You must be an administrator of this workspace to list its groups.",
        );
    }
    let base = &shared.base_url;
    let owner = json!({
        "username": ws.slug,
        "display_name": ws.name,
        "uuid": ws.uuid,
        "is_team": true,
        "avatar": format!("{base}/workspaces/{}/avatar/", ws.slug),
        "resource_uri": format!("/1.0/users/{}", ws.slug),
    });
    let groups: Vec<Value> = ws
        .groups
        .iter()
        .map(|g| {
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
        })
        .collect();
    json_response(StatusCode::OK, &Value::Array(groups))
}
