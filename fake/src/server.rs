//! The HTTP plumbing: accept loop, per-connection hyper service (so that a
//! `Reset` fault can drop a connection), routing, fault application, and
//! response helpers.

use super::api::{
    api_emails, api_permission, api_user, api_workspaces, gone, legacy_group_filter, legacy_groups,
    not_found,
};
use super::error::ApiError;
use super::oauth::{authorize, token};
use super::*;

/// Per-connection control handed to handlers through request extensions.
struct ConnControl {
    reset: Notify,
}

pub(super) async fn accept_loop(
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
    if req.uri().path().starts_with(super::control::PREFIX) {
        // The control API: not counted, not delayed, never faulted.
        return router.oneshot(req.map(Body::new)).await;
    }
    shared.total.fetch_add(1, Ordering::Relaxed);
    let now = shared.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    shared.max_in_flight.fetch_max(now, Ordering::Relaxed);
    let _leave = Leave(&shared.in_flight);
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

struct Leave<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(super) type St = AxState<Arc<Shared>>;

pub(super) fn router(shared: Arc<Shared>) -> Router {
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
        .route("/1.0/groups", get(legacy_group_filter))
        .route("/1.0/groups/{workspace}", get(legacy_groups))
        .merge(super::control::routes())
        .fallback(not_found)
        .with_state(shared)
}

/// Counts the hit, then applies the endpoint's next fault. `Ok` carries the
/// pagination fault still to apply, if any; `Err` is the faulted response
/// ([`ApiError::Fault`]).
pub(super) fn begin<'a>(
    shared: &'a Shared,
    endpoint: Endpoint,
    req: &Request,
) -> impl std::future::Future<Output = Result<Option<Fault>, ApiError>> + Send + 'a {
    // Only the connection handle may cross an await: a request body is not Sync.
    let ctl = req.extensions().get::<Arc<ConnControl>>().cloned();
    begin_with(shared, endpoint, ctl)
}

async fn begin_with(
    shared: &Shared,
    endpoint: Endpoint,
    ctl: Option<Arc<ConnControl>>,
) -> Result<Option<Fault>, ApiError> {
    if let Some(i) = endpoint.index() {
        shared.hits[i].fetch_add(1, Ordering::Relaxed);
    }
    let fault = shared.lock().take_fault(endpoint);
    let answer = match fault {
        None => return Ok(None),
        Some(Fault::Status(code)) => status_fault(endpoint, code, None),
        Some(Fault::StatusRetryAfter(code, secs)) => status_fault(endpoint, code, Some(secs)),
        Some(Fault::Delay(d)) => {
            tokio::time::sleep(d).await;
            return Ok(None);
        }
        Some(Fault::Garbage) => raw(
            StatusCode::OK,
            "application/json",
            "<html><body>Bitbucket is having a bad day {\"values\": [".to_owned(),
        ),
        Some(Fault::HugeBody(n)) => raw(StatusCode::OK, "application/json", huge_json(n)),
        Some(Fault::Reset) => match ctl {
            Some(ctl) => {
                ctl.reset.notify_one();
                // The connection, and this future with it, is dropped now.
                std::future::pending::<Response>().await
            }
            None => status_fault(endpoint, 500, None),
        },
        Some(page_fault) => return Ok(Some(page_fault)),
    };
    Err(ApiError::Fault(Box::new(answer)))
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

pub(super) fn raw(status: StatusCode, content_type: &'static str, body: String) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// 200 with `value` after `pad` bytes of whitespace, sent `stall` apart.
pub(super) fn stalled_json(value: &Value, pad: usize, stall: Duration) -> Response {
    use futures_util::StreamExt as _;
    let head = bytes_of(vec![b' '; pad]);
    let tail = bytes_of(value.to_string().into_bytes());
    let chunks = futures_util::stream::iter([head]).chain(futures_util::stream::once(async move {
        tokio::time::sleep(stall).await;
        tail
    }));
    let mut resp = Response::new(Body::from_stream(chunks.map(Ok::<_, Infallible>)));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

fn bytes_of(v: Vec<u8>) -> axum::body::Bytes {
    axum::body::Bytes::from(v)
}

pub(super) fn json_response(status: StatusCode, value: &Value) -> Response {
    raw(status, "application/json; charset=utf-8", value.to_string())
}

/// API 1.0/2.0 error shape (the spec's `error` definition).
pub(super) fn api_error(status: StatusCode, message: &str) -> Response {
    json_response(
        status,
        &json!({"type": "error", "error": {"message": message}}),
    )
}

pub(super) fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

pub(super) fn html_page(status: StatusCode, message: &str) -> Response {
    raw(
        status,
        "text/html; charset=utf-8",
        format!("<!DOCTYPE html><html><head><title>Bitbucket</title></head><body><p>{message}</p></body></html>\n"),
    )
}

pub(super) fn query_pairs(req: &Request) -> Vec<(String, String)> {
    req.uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

pub(super) fn first<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// `{...}` -> `%7B...%7D`, for uuids in URL paths.
pub(super) fn path_segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

pub(super) fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
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

pub(super) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|t| !t.is_empty())
}
