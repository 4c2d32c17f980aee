//! Where gRPC ends: proto <-> domain conversions, the per-RPC envelope
//! (in-flight limit, deadline, metrics, one log line), and the one place
//! domain errors become `tonic::Status`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::connector::{self, Connector, Connectors, Error, Scopes, UpstreamError};
use crate::metrics::{
    self, Method, MethodLabels, Metrics, RpcLabels, UpstreamTally, UPSTREAM_CALLS,
};
use crate::pb;
use crate::secret::Secret;
use std::sync::atomic::{AtomicBool, Ordering};
use subtle::ConstantTimeEq as _;

/// The ErrorInfo domain of every error this service returns.
pub(crate) const ERROR_DOMAIN: &str = "bitbucket-connector";

/// Deadlines are cut this much short of the caller's, so that our own
/// DEADLINE_EXCEEDED answer wins over the transport's cancellation.
const DEADLINE_MARGIN: Duration = Duration::from_millis(50);

/// `connector.v1.ConnectorService`: the handlers. Admission, the deadline,
/// metrics and the log line are the [`Envelope`]'s, around it.
#[derive(Clone)]
pub(crate) struct Service {
    connectors: Arc<Connectors>,
    default_timeout: Duration,
}

impl Service {
    pub(crate) fn new(connectors: Arc<Connectors>, default_timeout: Duration) -> Self {
        Service {
            connectors,
            default_timeout,
        }
    }

    /// Runs one handler: connector selection, upstream-call counting, error mapping.
    async fn rpc<T, Fut>(
        &self,
        extensions: &tonic::Extensions,
        connector_id: &str,
        f: impl FnOnce(Arc<Connector>, Instant) -> Fut,
    ) -> Result<Response<T>, Status>
    where
        Fut: Future<Output = Result<T, Error>>,
    {
        // Outside an envelope (never in the server), a call of our own.
        let call = extensions
            .get::<Call>()
            .cloned()
            .unwrap_or_else(|| Call::new(Instant::now() + self.default_timeout));
        call.0.handled.store(true, Ordering::Relaxed);
        call.set_connector(connector_id);
        let c = self
            .connectors
            .select(connector_id)
            .map_err(|e| into_status(&e))?;
        call.set_connector(c.id());
        UPSTREAM_CALLS
            .scope(call.0.upstream_calls.clone(), f(c.clone(), call.0.deadline))
            .await
            .map(Response::new)
            .map_err(|e| into_status(&e))
    }
}

/// What the envelope knows of one RPC, handed to its handler in the request's
/// extensions.
#[derive(Clone)]
struct Call(Arc<CallState>);

struct CallState {
    deadline: Instant,
    /// Set when the handler starts: a status without it is a refusal made
    /// before (credentials, decoding, size).
    handled: AtomicBool,
    connector: std::sync::Mutex<String>,
    upstream_calls: Arc<UpstreamTally>,
}

impl Call {
    fn new(deadline: Instant) -> Call {
        Call(Arc::new(CallState {
            deadline,
            handled: AtomicBool::new(false),
            connector: std::sync::Mutex::new("-".into()),
            upstream_calls: Arc::default(),
        }))
    }

    fn set_connector(&self, id: &str) {
        *self.0.connector.lock().unwrap_or_else(|e| e.into_inner()) = connector_id_for_logs(id);
    }
}

/// The per-RPC envelope of `ConnectorService`, a tower layer outside tonic's
/// codec: the bearer token is checked from the HEADERS frame before
/// anything else, so a caller without one is refused at once and never holds
/// a slot; an admitted RPC counts against `grpc.maxInFlight` and its deadline
/// from its HEADERS frame, whether or not a body ever comes; and every
/// outcome (refusals before the handler included) gets an ErrorInfo, a
/// metrics sample and one log line.
#[derive(Clone)]
pub(crate) struct Envelope {
    metrics: Metrics,
    in_flight: Arc<Semaphore>,
    default_timeout: Duration,
    /// `grpc.authTokens`; empty: no token required.
    tokens: Arc<[Secret]>,
}

impl Envelope {
    pub(crate) fn new(
        metrics: Metrics,
        in_flight: Arc<Semaphore>,
        default_timeout: Duration,
        tokens: Vec<Secret>,
    ) -> Self {
        Envelope {
            metrics,
            in_flight,
            default_timeout,
            tokens: tokens.into(),
        }
    }
}

impl<S> tower::Layer<S> for Envelope {
    type Service = Enveloped<S>;
    fn layer(&self, inner: S) -> Enveloped<S> {
        Enveloped {
            inner,
            envelope: self.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Enveloped<S> {
    inner: S,
    envelope: Envelope,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Enveloped<S> {
    const NAME: &'static str = S::NAME;
}

/// Our DEADLINE_EXCEEDED comes this long after the handler's own deadline,
/// so that a handler's more specific answer wins when both are due.
const ENVELOPE_SLACK: Duration = Duration::from_millis(20);

impl<S, B> tower::Service<http::Request<tonic::body::Body>> for Enveloped<S>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // tonic's generated servers are always ready.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let envelope = self.envelope.clone();
        let started = std::time::Instant::now();
        let deadline = Instant::now() + timeout(req.headers(), envelope.default_timeout);
        let call = Call::new(deadline);
        req.extensions_mut().insert(call.clone());
        let admitted = check_token(&envelope.tokens, req.headers());
        let record = Record {
            _in_flight: admitted.is_ok().then(|| InFlight::new(&envelope.metrics)),
            metrics: envelope.metrics.clone(),
            method: method_of(req.uri().path()),
            call: call.clone(),
            request_id: request_id(req.headers()),
            started,
            done: false,
        };
        let permit = admitted.map(|()| envelope.in_flight.clone().try_acquire_owned());
        Box::pin(async move {
            let mut record = record;
            let _permit = match permit {
                Ok(Ok(p)) => p,
                Err(unauthenticated) => return Ok(record.answer(unauthenticated)),
                Ok(Err(_)) => {
                    return Ok(record.answer(status(
                        Code::ResourceExhausted,
                        "too many requests in flight; retry with backoff".into(),
                        "TOO_MANY_REQUESTS",
                    )))
                }
            };
            let resp =
                match tokio::time::timeout_at(deadline + ENVELOPE_SLACK, inner.call(req)).await {
                    Ok(Ok(resp)) => resp,
                    Ok(Err(never)) => match never {},
                    Err(_) => return Ok(record.answer(status(
                        Code::DeadlineExceeded,
                        "deadline exceeded (the request was not complete by the caller's deadline)"
                            .into(),
                        "DEADLINE_EXCEEDED",
                    ))),
                };
            // Errors are trailers-only responses: the status is in the headers.
            match Status::from_header_map(resp.headers()) {
                Some(s) if s.code() != Code::Ok => {
                    let info = s.get_details_error_info();
                    match info {
                        None if !call.0.handled.load(Ordering::Relaxed) => {
                            Ok(record.answer(refusal(s)))
                        }
                        info => {
                            let reason = info.map(|i| i.reason);
                            record.finish(s.code(), Some(s.message()), reason.as_deref());
                            Ok(resp.map(tonic::body::Body::new))
                        }
                    }
                }
                _ => {
                    record.finish(Code::Ok, None, None);
                    Ok(resp.map(tonic::body::Body::new))
                }
            }
        })
    }
}

/// `authorization: Bearer <token>` when `grpc.authTokens` is set; compared in
/// constant time against every configured token.
#[allow(clippy::result_large_err)]
fn check_token(tokens: &[Secret], headers: &http::HeaderMap) -> Result<(), Status> {
    if tokens.is_empty() {
        return Ok(());
    }
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Err(status(
            Code::Unauthenticated,
            "missing authorization metadata (expected `authorization: Bearer <token>`)".into(),
            "MISSING_CREDENTIALS",
        ));
    };
    let presented = value
        .as_bytes()
        .strip_prefix(b"Bearer ")
        .or_else(|| value.as_bytes().strip_prefix(b"bearer "))
        .unwrap_or_default();
    let mut ok = subtle::Choice::from(0u8);
    for t in tokens {
        ok |= t.expose().as_bytes().ct_eq(presented);
    }
    if bool::from(ok) && !presented.is_empty() {
        Ok(())
    } else {
        Err(status(
            Code::Unauthenticated,
            "invalid bearer token".into(),
            "INVALID_CREDENTIALS",
        ))
    }
}

/// A status tonic made before our handler ran, with the contract's code and an
/// ErrorInfo: an undecodable message is the caller's fault, not INTERNAL, and
/// an oversized one RESOURCE_EXHAUSTED, not OUT_OF_RANGE.
fn refusal(s: Status) -> Status {
    let message = clip_for_caller(s.message());
    match s.code() {
        Code::Internal => status(
            Code::InvalidArgument,
            format!("malformed request: {message}"),
            "MALFORMED_REQUEST",
        ),
        Code::OutOfRange | Code::ResourceExhausted => {
            status(Code::ResourceExhausted, message, "MESSAGE_TOO_LARGE")
        }
        Code::Unimplemented => status(Code::Unimplemented, message, "UNIMPLEMENTED"),
        code => status(code, message, "REFUSED"),
    }
}

fn method_of(path: &str) -> Method {
    match path.rsplit('/').next() {
        Some("LoginURL") => Method::LoginURL,
        Some("HandleCallback") => Method::HandleCallback,
        Some("Refresh") => Method::Refresh,
        _ => Method::unknown,
    }
}

/// One RPC's metrics and log line. Dropped unfinished (the caller went away),
/// it still records the RPC.
struct Record {
    /// None for a caller refused before admission (no valid token).
    _in_flight: Option<InFlight>,
    metrics: Metrics,
    method: Method,
    call: Call,
    request_id: String,
    started: std::time::Instant,
    done: bool,
}

impl Record {
    /// Records `s` and answers it.
    fn answer(&mut self, s: Status) -> http::Response<tonic::body::Body> {
        let reason = s.get_details_error_info().map(|i| i.reason);
        self.finish(s.code(), Some(s.message()), reason.as_deref());
        s.into_http()
    }

    fn finish(&mut self, code: Code, error: Option<&str>, reason: Option<&str>) {
        self.done = true;
        let metrics = &self.metrics;
        let method = self.method;
        let elapsed = self.started.elapsed();
        metrics
            .rpc_requests
            .get_or_create(&RpcLabels {
                method,
                code: rpc_code(code),
            })
            .inc();
        metrics
            .rpc_duration
            .get_or_create(&MethodLabels { method })
            .observe(elapsed.as_secs_f64());
        // Whole microseconds, so the line reads 13.281, not 13.281203999999999.
        let ms = elapsed.as_micros() as f64 / 1000.0;
        // Shown with Display, not Debug (which escapes and quotes char by
        // char, the bulk of the line's cost): method, code and reason are
        // static names, and both ids are reduced to printable ASCII without
        // spaces first (`connector_id_for_logs`, `request_id`). `error` stays
        // Debug-quoted, and caller text in it is clipped (`clip_for_caller`).
        let connector_id = self
            .call
            .0
            .connector
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let connector = tracing::field::display(connector_id.as_str());
        let code = code_name(code);
        let request_id = tracing::field::display(self.request_id.as_str());
        let upstream_calls = self.call.0.upstream_calls.total();
        let upstream = tracing::field::display(self.call.0.upstream_calls.summary());
        let rpc = tracing::field::display(<&str>::from(method));
        // `error: None` and `reason: None` record no field.
        let reason = reason.map(tracing::field::display);
        if error.is_some() && is_server_fault(code) {
            tracing::warn!(rpc, connector, code = %code, reason, ms, upstream_calls, upstream, request_id, error, "rpc");
        } else {
            tracing::info!(rpc, connector, code = %code, reason, ms, upstream_calls, upstream, request_id, error, "rpc");
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if !self.done {
            let (code, why, reason) = if Instant::now() >= self.call.0.deadline {
                (
                    Code::DeadlineExceeded,
                    "the caller's deadline passed",
                    "DEADLINE_EXCEEDED",
                )
            } else {
                (Code::Cancelled, "the caller cancelled the RPC", "CANCELLED")
            };
            self.finish(code, Some(why), Some(reason));
        }
    }
}

#[tonic::async_trait]
impl pb::connector_service_server::ConnectorService for Service {
    async fn login_url(
        &self,
        req: Request<pb::LoginUrlRequest>,
    ) -> Result<Response<pb::LoginUrlResponse>, Status> {
        let (_, ext, req) = req.into_parts();
        let id = req.connector_id.clone();
        self.rpc(&ext, &id, |c, _| async move {
            let url = c.login_url(&req.callback_url, &req.state)?;
            Ok(pb::LoginUrlResponse {
                url,
                connector_data: Vec::new(),
            })
        })
        .await
    }

    async fn handle_callback(
        &self,
        req: Request<pb::HandleCallbackRequest>,
    ) -> Result<Response<pb::HandleCallbackResponse>, Status> {
        let (_, ext, req) = req.into_parts();
        let id = req.connector_id.clone();
        self.rpc(&ext, &id, |c, deadline| async move {
            let identity = c
                .handle_callback(scopes(req.scopes), &req.raw_query, deadline)
                .await?;
            Ok(pb::HandleCallbackResponse {
                identity: Some(identity.into()),
            })
        })
        .await
    }

    async fn refresh(
        &self,
        req: Request<pb::RefreshRequest>,
    ) -> Result<Response<pb::RefreshResponse>, Status> {
        let (_, ext, req) = req.into_parts();
        let id = req.connector_id.clone();
        self.rpc(&ext, &id, |c, deadline| async move {
            let previous: connector::Identity = req
                .identity
                .map(Into::into)
                .ok_or(Error::BadConnectorData(crate::sealing::OpenError::Empty))?;
            let identity = c.refresh(scopes(req.scopes), &previous, deadline).await?;
            Ok(pb::RefreshResponse {
                identity: Some(identity.into()),
            })
        })
        .await
    }
}

struct InFlight(Metrics);

impl InFlight {
    fn new(m: &Metrics) -> Self {
        m.rpc_in_flight.inc();
        InFlight(m.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.rpc_in_flight.dec();
    }
}

fn scopes(s: Option<pb::Scopes>) -> Scopes {
    let s = s.unwrap_or_default();
    Scopes {
        offline_access: s.offline_access,
        groups: s.groups,
    }
}

impl From<connector::Identity> for pb::Identity {
    fn from(i: connector::Identity) -> Self {
        pb::Identity {
            user_id: i.user_id,
            username: i.username,
            preferred_username: i.preferred_username,
            email: i.email,
            email_verified: i.email_verified,
            groups: i.groups,
            connector_data: i.connector_data.unwrap_or_default(),
        }
    }
}

impl From<pb::Identity> for connector::Identity {
    fn from(i: pb::Identity) -> Self {
        connector::Identity {
            user_id: i.user_id,
            username: i.username,
            preferred_username: i.preferred_username,
            email: i.email,
            email_verified: i.email_verified,
            groups: i.groups,
            connector_data: (!i.connector_data.is_empty()).then_some(i.connector_data),
        }
    }
}

/// The caller's `grpc-timeout` (capped by `default`), less a small margin.
fn timeout(meta: &http::HeaderMap, default: Duration) -> Duration {
    let t = meta
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map_or(default, |t| t.min(default));
    t.saturating_sub(DEADLINE_MARGIN.max(t / 20).min(t / 2))
}

/// gRPC's `TimeoutValue TimeoutUnit`: at most 8 digits and one of H M S m u n.
pub(crate) fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The requested id as logged before it is resolved: "-" for empty, clipped.
fn connector_id_for_logs(id: &str) -> String {
    match id {
        "" => "-".to_string(),
        // Caller-supplied (an unknown id is logged too): nothing that could
        // break or forge a log line survives, as the line shows it unquoted.
        id => id
            .chars()
            .take(64)
            .map(|c| if c.is_ascii_graphic() { c } else { '?' })
            .collect(),
    }
}

fn request_id(meta: &http::HeaderMap) -> String {
    meta.get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()))
}

fn is_server_fault(code: &str) -> bool {
    matches!(
        code,
        "INTERNAL" | "UNAVAILABLE" | "DEADLINE_EXCEEDED" | "RESOURCE_EXHAUSTED" | "UNKNOWN"
    )
}

/// A status with an ErrorInfo detail.
pub(crate) fn status(code: Code, message: String, reason: &str) -> Status {
    status_with(code, message, reason, HashMap::new())
}

fn status_with(
    code: Code,
    message: String,
    reason: &str,
    metadata: HashMap<String, String>,
) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata),
    )
}

/// Longest string the caller sent that a message or a log line echoes.
const CALLER_TEXT_MAX: usize = 256;

/// A string the caller sent, as echoed in a message shown without quoting: at
/// most 256 characters (then `…`), control characters escaped.
pub(crate) fn clip_for_caller(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(CALLER_TEXT_MAX + 8));
    for (n, c) in s.chars().enumerate() {
        if n == CALLER_TEXT_MAX {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The same for a string that the message Debug-quotes (which escapes it).
fn truncate_for_caller(s: &str) -> String {
    match s.char_indices().nth(CALLER_TEXT_MAX) {
        Some((end, _)) => format!("{}…", &s[..end]),
        None => s.to_string(),
    }
}

/// `e` with the strings the caller sent clipped, before it becomes a
/// message; `None` when it carries none.
fn caller_text_clipped(e: &Error) -> Option<Error> {
    Some(match e {
        Error::UnknownConnector(id) => Error::UnknownConnector(truncate_for_caller(id)),
        Error::CallbackUrlMismatch {
            received,
            configured,
        } => Error::CallbackUrlMismatch {
            received: truncate_for_caller(received),
            configured: configured.clone(),
        },
        Error::Callback { error, description } => Error::Callback {
            error: clip_for_caller(error),
            description: description.as_deref().map(clip_for_caller),
        },
        Error::UserChanged { expected, actual } => Error::UserChanged {
            expected: clip_for_caller(expected),
            actual: actual.clone(),
        },
        _ => return None,
    })
}

/// The code and reason of an upstream failure, by what happened.
fn upstream_status(e: &UpstreamError) -> (Code, &'static str) {
    match e {
        UpstreamError::Connect { .. }
        | UpstreamError::Transport { .. }
        | UpstreamError::Timeout { .. }
        | UpstreamError::Status { .. }
        | UpstreamError::Unavailable { .. } => (Code::Unavailable, "UPSTREAM_UNAVAILABLE"),
        UpstreamError::DeadlineExceeded { .. } => (Code::DeadlineExceeded, "DEADLINE_EXCEEDED"),
        UpstreamError::RateLimited { .. } => (Code::Unavailable, "UPSTREAM_RATE_LIMITED"),
        UpstreamError::Invalid { .. } => (Code::Internal, "UPSTREAM_INVALID"),
        UpstreamError::Unauthorized { .. } => (Code::Unauthenticated, "UPSTREAM_UNAUTHENTICATED"),
        UpstreamError::Denied { .. } => (Code::FailedPrecondition, "UPSTREAM_FORBIDDEN"),
        UpstreamError::ClientRejected { .. } => (Code::Unauthenticated, "CLIENT_REJECTED"),
        UpstreamError::GrantRejected { .. } => (Code::Unauthenticated, "INVALID_CODE"),
    }
}

/// The one mapping from domain errors to gRPC statuses (see README's table).
pub(crate) fn into_status(e: &Error) -> Status {
    let e = e.unshared();
    let clipped = caller_text_clipped(e);
    let e = clipped.as_ref().unwrap_or(e);
    let (code, reason) = match e {
        Error::UnknownConnector(_) => (Code::NotFound, "UNKNOWN_CONNECTOR"),
        Error::AmbiguousConnector(_) => (Code::NotFound, "AMBIGUOUS_CONNECTOR"),
        Error::CallbackUrlMismatch { .. } => (Code::InvalidArgument, "CALLBACK_URL_MISMATCH"),
        Error::MalformedCallback(_) => (Code::InvalidArgument, "MALFORMED_CALLBACK"),
        Error::Callback { .. } => (Code::Unauthenticated, "CALLBACK_ERROR"),
        Error::CodeRejected(_) => (Code::Unauthenticated, "INVALID_CODE"),
        Error::ClientRejected(_) => (Code::Unauthenticated, "CLIENT_REJECTED"),
        Error::TokenRevoked(_) => (Code::Unauthenticated, "TOKEN_REVOKED"),
        Error::NoVerifiedEmail => (Code::FailedPrecondition, "NO_CONFIRMED_PRIMARY_EMAIL"),
        Error::NotInRequiredTeams { .. } => (Code::PermissionDenied, "NOT_IN_REQUIRED_TEAMS"),
        Error::UserChanged { .. } => (Code::PermissionDenied, "USER_CHANGED"),
        Error::BadConnectorData(_) => (Code::InvalidArgument, "CONNECTOR_DATA_INVALID"),
        Error::Upstream(u) => upstream_status(u),
        Error::DeadlineExceeded(_) => (Code::DeadlineExceeded, "DEADLINE_EXCEEDED"),
        Error::Internal(_) => (Code::Internal, "INTERNAL"),
        // `unshared` looked through it.
        Error::Shared(_) => (Code::Internal, "INTERNAL"),
    };
    let mut metadata = HashMap::new();
    match e {
        Error::Callback { error, .. } => {
            metadata.insert("error".to_string(), error.clone());
        }
        Error::NotInRequiredTeams { username } => {
            metadata.insert("username".to_string(), username.clone());
        }
        _ => {}
    }
    if let Error::Upstream(UpstreamError::RateLimited { retry_after, .. }) = e {
        metadata.insert(
            "retry_after_seconds".to_string(),
            connector::retry_after_seconds(*retry_after).to_string(),
        );
    }
    status_with(code, e.to_string(), reason, metadata)
}

pub(crate) fn code_name(code: Code) -> &'static str {
    rpc_code(code).into()
}

fn rpc_code(code: Code) -> metrics::Code {
    use metrics::Code as M;
    match code {
        Code::Ok => M::OK,
        Code::Cancelled => M::CANCELLED,
        Code::Unknown => M::UNKNOWN,
        Code::InvalidArgument => M::INVALID_ARGUMENT,
        Code::DeadlineExceeded => M::DEADLINE_EXCEEDED,
        Code::NotFound => M::NOT_FOUND,
        Code::AlreadyExists => M::ALREADY_EXISTS,
        Code::PermissionDenied => M::PERMISSION_DENIED,
        Code::ResourceExhausted => M::RESOURCE_EXHAUSTED,
        Code::FailedPrecondition => M::FAILED_PRECONDITION,
        Code::Aborted => M::ABORTED,
        Code::OutOfRange => M::OUT_OF_RANGE,
        Code::Unimplemented => M::UNIMPLEMENTED,
        Code::Internal => M::INTERNAL,
        Code::Unavailable => M::UNAVAILABLE,
        Code::DataLoss => M::DATA_LOSS,
        Code::Unauthenticated => M::UNAUTHENTICATED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "100", "123456789S", "-1S", "1x", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn ids_in_log_lines_cannot_break_or_forge_a_line() {
        assert_eq!(connector_id_for_logs(""), "-");
        assert_eq!(connector_id_for_logs("bitbucket-cloud"), "bitbucket-cloud");
        assert_eq!(
            connector_id_for_logs("x\ncode=OK ms=1\u{1b}[31m"),
            "x?code=OK?ms=1?[31m"
        );
        assert_eq!(connector_id_for_logs(&"a".repeat(100)).len(), 64);
        let mut meta = http::HeaderMap::new();
        meta.insert("x-request-id", "req-42".parse().unwrap());
        assert_eq!(request_id(&meta), "req-42");
        meta.insert("x-request-id", "a b".parse().unwrap());
        let generated = request_id(&meta);
        assert_eq!(generated.len(), 16, "{generated}");
        assert!(generated.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn bearer_tokens_from_the_headers() {
        let tokens = [Secret::new("first"), Secret::new("second")];
        let reason = |auth: Option<&[u8]>| {
            let mut h = http::HeaderMap::new();
            if let Some(a) = auth {
                h.insert(
                    http::header::AUTHORIZATION,
                    http::HeaderValue::from_bytes(a).unwrap(),
                );
            }
            match check_token(&tokens, &h) {
                Ok(()) => "ok".to_string(),
                Err(s) => {
                    assert_eq!(s.code(), Code::Unauthenticated);
                    assert!(!s.message().contains("first"), "{s:?}");
                    s.get_details_error_info().unwrap().reason
                }
            }
        };
        assert_eq!(reason(Some(b"Bearer first")), "ok");
        assert_eq!(reason(Some(b"bearer second")), "ok");
        assert_eq!(reason(None), "MISSING_CREDENTIALS");
        for bad in [
            &b"first"[..],
            b"Bearer ",
            b"Bearer firs",
            b"Bearer first ",
            b"Basic first",
            b"Bearer \xfffirst",
        ] {
            assert_eq!(reason(Some(bad)), "INVALID_CREDENTIALS", "{bad:?}");
        }
        assert!(check_token(&[], &http::HeaderMap::new()).is_ok());
    }

    #[test]
    fn every_error_has_a_reason() {
        let s = into_status(&Error::NotInRequiredTeams {
            username: "alice".into(),
        });
        assert_eq!(s.code(), Code::PermissionDenied);
        assert_eq!(
            s.message(),
            "bitbucket: user \"alice\" is not in any of the required teams"
        );
        let info = s.get_details_error_info().unwrap();
        assert_eq!(info.reason, "NOT_IN_REQUIRED_TEAMS");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(
            info.metadata.get("username").map(String::as_str),
            Some("alice")
        );
    }

    #[test]
    fn upstream_errors_map_by_kind_through_a_shared_redemption() {
        let shared = |e: Error| Error::Shared(Arc::new(e));
        let s = into_status(&shared(Error::Upstream(UpstreamError::RateLimited {
            endpoint: "/site/oauth2/access_token",
            retry_after: Duration::from_millis(2500),
        })));
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(
            s.message(),
            "bitbucket: /site/oauth2/access_token: rate limited by Bitbucket; retry in 3s"
        );
        let info = s.get_details_error_info().unwrap();
        assert_eq!(info.reason, "UPSTREAM_RATE_LIMITED");
        assert_eq!(
            info.metadata.get("retry_after_seconds").map(String::as_str),
            Some("3")
        );
        let s = into_status(&shared(Error::TokenRevoked(connector::Revoked::Upstream(
            UpstreamError::GrantRejected {
                error: "invalid_grant".into(),
                description: None,
            },
        ))));
        assert_eq!(s.code(), Code::Unauthenticated);
        assert_eq!(s.get_details_error_info().unwrap().reason, "TOKEN_REVOKED");
        for (e, code, reason) in [
            (
                UpstreamError::Status {
                    endpoint: "/2.0/user",
                    status: 503,
                },
                Code::Unavailable,
                "UPSTREAM_UNAVAILABLE",
            ),
            (
                UpstreamError::Denied {
                    endpoint: "/2.0/user/emails",
                    status: 404,
                },
                Code::FailedPrecondition,
                "UPSTREAM_FORBIDDEN",
            ),
            (
                UpstreamError::Unauthorized {
                    endpoint: "/2.0/user",
                },
                Code::Unauthenticated,
                "UPSTREAM_UNAUTHENTICATED",
            ),
            (
                UpstreamError::DeadlineExceeded {
                    endpoint: "/2.0/user",
                },
                Code::DeadlineExceeded,
                "DEADLINE_EXCEEDED",
            ),
            (
                UpstreamError::Invalid {
                    endpoint: "/2.0/user",
                    detail: "unparseable JSON".into(),
                },
                Code::Internal,
                "UPSTREAM_INVALID",
            ),
        ] {
            let s = into_status(&Error::Upstream(e));
            assert_eq!(s.code(), code, "{reason}");
            assert_eq!(s.get_details_error_info().unwrap().reason, reason);
        }
    }

    #[test]
    fn identity_debug_hides_connector_data() {
        let i = pb::Identity {
            connector_data: b"{\"accessToken\":\"secret\"}".to_vec(),
            ..Default::default()
        };
        let d = format!("{i:?}");
        assert!(!d.contains("secret"), "{d}");
    }
}
