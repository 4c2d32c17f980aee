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

use crate::connector::{self, Connector, Connectors, Error, Scopes};
use crate::metrics::{MethodLabels, Metrics, RpcLabels, UpstreamTally, UPSTREAM_CALLS};
use crate::pb;

/// The ErrorInfo domain of every error this service returns.
pub const ERROR_DOMAIN: &str = "bitbucket-connector";

/// Deadlines are cut this much short of the caller's, so that our own
/// DEADLINE_EXCEEDED answer wins over the transport's cancellation.
const DEADLINE_MARGIN: Duration = Duration::from_millis(50);

/// `connector.v1.ConnectorService`.
#[derive(Clone)]
pub struct Service {
    connectors: Arc<Connectors>,
    metrics: Metrics,
    in_flight: Arc<Semaphore>,
    default_timeout: Duration,
}

impl Service {
    pub fn new(
        connectors: Arc<Connectors>,
        metrics: Metrics,
        in_flight: Arc<Semaphore>,
        default_timeout: Duration,
    ) -> Self {
        Service {
            connectors,
            metrics,
            in_flight,
            default_timeout,
        }
    }

    /// Runs one RPC: admission, deadline, metrics, the log line, error mapping.
    async fn rpc<T, Fut>(
        &self,
        method: &'static str,
        meta: &tonic::metadata::MetadataMap,
        connector_id: &str,
        f: impl FnOnce(Arc<Connector>, Instant) -> Fut,
    ) -> Result<Response<T>, Status>
    where
        Fut: Future<Output = Result<T, Error>>,
    {
        let deadline = Instant::now() + timeout(meta, self.default_timeout);
        let mut record = Record {
            _in_flight: InFlight::new(&self.metrics),
            service: self,
            method,
            connector: connector_id_for_logs(connector_id),
            request_id: request_id(meta),
            started: std::time::Instant::now(),
            deadline,
            upstream_calls: Arc::default(),
            done: false,
        };
        let result = match self.in_flight.try_acquire() {
            Err(_) => Err(status(
                Code::ResourceExhausted,
                "too many requests in flight; retry with backoff".into(),
                "TOO_MANY_REQUESTS",
            )),
            Ok(_permit) => match self.connectors.select(connector_id) {
                Err(e) => Err(into_status(&e)),
                Ok(c) => {
                    record.connector = connector_id_for_logs(c.id());
                    UPSTREAM_CALLS
                        .scope(record.upstream_calls.clone(), f(c.clone(), deadline))
                        .await
                        .map_err(|e| into_status(&e))
                }
            },
        };
        match &result {
            Ok(_) => record.finish(Code::Ok, None, None),
            Err(s) => {
                let info = s.get_details_error_info();
                record.finish(
                    s.code(),
                    Some(s.message()),
                    info.as_ref().map(|i| i.reason.as_str()),
                )
            }
        }
        result.map(Response::new)
    }
}

/// One RPC's metrics and log line. Dropped unfinished (the caller went away,
/// or the transport's deadline fired first), it still records the RPC.
struct Record<'a> {
    _in_flight: InFlight<'a>,
    service: &'a Service,
    method: &'static str,
    connector: String,
    request_id: String,
    started: std::time::Instant,
    deadline: Instant,
    upstream_calls: Arc<UpstreamTally>,
    done: bool,
}

impl Record<'_> {
    fn finish(&mut self, code: Code, error: Option<&str>, reason: Option<&str>) {
        self.done = true;
        let metrics = &self.service.metrics;
        let method = self.method;
        let elapsed = self.started.elapsed();
        metrics
            .rpc_requests
            .get_or_create(&RpcLabels {
                method,
                code: code_name(code),
            })
            .inc();
        metrics
            .rpc_duration
            .get_or_create(&MethodLabels { method })
            .observe(elapsed.as_secs_f64());
        // Whole microseconds, so the line reads 13.281, not 13.281203999999999.
        let ms = elapsed.as_micros() as f64 / 1000.0;
        // Shown with Display, not Debug (which escapes and quotes char by
        // char, the bulk of the line's cost): method and code are static names,
        // and both ids are reduced to printable ASCII without spaces first
        // (`connector_id_for_logs`, `request_id`). `error` stays Debug-quoted.
        let connector = tracing::field::display(self.connector.as_str());
        let code = code_name(code);
        let request_id = tracing::field::display(self.request_id.as_str());
        let upstream_calls = self.upstream_calls.total();
        let upstream = tracing::field::display(self.upstream_calls.summary());
        let rpc = tracing::field::display(method);
        // `error: None` and `reason: None` record no field; reasons are
        // static SCREAMING_SNAKE names.
        let reason = reason.map(tracing::field::display);
        if error.is_some() && is_server_fault(code) {
            tracing::warn!(rpc, connector, code = %code, reason, ms, upstream_calls, upstream, request_id, error, "rpc");
        } else {
            tracing::info!(rpc, connector, code = %code, reason, ms, upstream_calls, upstream, request_id, error, "rpc");
        }
    }
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        if !self.done {
            let (code, why, reason) = if Instant::now() >= self.deadline {
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
        let (meta, _, req) = req.into_parts();
        let id = req.connector_id.clone();
        self.rpc("LoginURL", &meta, &id, |c, _| async move {
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
        let (meta, _, req) = req.into_parts();
        let id = req.connector_id.clone();
        self.rpc("HandleCallback", &meta, &id, |c, deadline| async move {
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
        let (meta, _, req) = req.into_parts();
        let id = req.connector_id.clone();
        self.rpc("Refresh", &meta, &id, |c, deadline| async move {
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

struct InFlight<'a>(&'a Metrics);

impl<'a> InFlight<'a> {
    fn new(m: &'a Metrics) -> Self {
        m.rpc_in_flight.inc();
        InFlight(m)
    }
}

impl Drop for InFlight<'_> {
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
fn timeout(meta: &tonic::metadata::MetadataMap, default: Duration) -> Duration {
    let t = meta
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map_or(default, |t| t.min(default));
    t.saturating_sub(DEADLINE_MARGIN.max(t / 20).min(t / 2))
}

/// gRPC's `TimeoutValue TimeoutUnit`: at most 8 digits and one of H M S m u n.
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
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

fn request_id(meta: &tonic::metadata::MetadataMap) -> String {
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
pub fn status(code: Code, message: String, reason: &str) -> Status {
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

/// The one mapping from domain errors to gRPC statuses (see README's table).
pub fn into_status(e: &Error) -> Status {
    let (code, reason) = match e {
        Error::UnknownConnector(_) => (Code::NotFound, "UNKNOWN_CONNECTOR"),
        Error::AmbiguousConnector(_) => (Code::NotFound, "AMBIGUOUS_CONNECTOR"),
        Error::CallbackUrlMismatch { .. } => (Code::InvalidArgument, "CALLBACK_URL_MISMATCH"),
        Error::MalformedCallback(_) => (Code::InvalidArgument, "MALFORMED_CALLBACK"),
        Error::CallbackError { .. } => (Code::Unauthenticated, "CALLBACK_ERROR"),
        Error::CodeRejected(_) => (Code::Unauthenticated, "INVALID_CODE"),
        Error::ClientRejected(_) => (Code::Unauthenticated, "CLIENT_REJECTED"),
        Error::TokenRevoked(_) => (Code::Unauthenticated, "TOKEN_REVOKED"),
        Error::Unauthenticated(_) => (Code::Unauthenticated, "UPSTREAM_UNAUTHENTICATED"),
        Error::NoVerifiedEmail => (Code::FailedPrecondition, "NO_CONFIRMED_PRIMARY_EMAIL"),
        Error::NotInRequiredTeams { .. } => (Code::PermissionDenied, "NOT_IN_REQUIRED_TEAMS"),
        Error::UserChanged { .. } => (Code::PermissionDenied, "USER_CHANGED"),
        Error::BadConnectorData(_) => (Code::InvalidArgument, "CONNECTOR_DATA_INVALID"),
        Error::Unavailable(_) => (Code::Unavailable, "UPSTREAM_UNAVAILABLE"),
        Error::RateLimited { .. } => (Code::Unavailable, "UPSTREAM_RATE_LIMITED"),
        Error::UpstreamInvalid(_) => (Code::Internal, "UPSTREAM_INVALID"),
        Error::UpstreamForbidden(_) => (Code::FailedPrecondition, "UPSTREAM_FORBIDDEN"),
        Error::DeadlineExceeded(_) => (Code::DeadlineExceeded, "DEADLINE_EXCEEDED"),
        Error::Internal(_) => (Code::Internal, "INTERNAL"),
    };
    let mut metadata = HashMap::new();
    match e {
        Error::CallbackError { error, .. } => {
            metadata.insert("error".to_string(), error.clone());
        }
        Error::NotInRequiredTeams { username } => {
            metadata.insert("username".to_string(), username.clone());
        }
        _ => {}
    }
    if let Error::RateLimited {
        retry_after_seconds,
        ..
    } = e
    {
        metadata.insert(
            "retry_after_seconds".to_string(),
            retry_after_seconds.to_string(),
        );
    }
    status_with(code, e.to_string(), reason, metadata)
}

pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
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
        let mut meta = tonic::metadata::MetadataMap::new();
        meta.insert("x-request-id", "req-42".parse().unwrap());
        assert_eq!(request_id(&meta), "req-42");
        meta.insert("x-request-id", "a b".parse().unwrap());
        let generated = request_id(&meta);
        assert_eq!(generated.len(), 16, "{generated}");
        assert!(generated.bytes().all(|b| b.is_ascii_hexdigit()));
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
    fn identity_debug_hides_connector_data() {
        let i = pb::Identity {
            connector_data: b"{\"accessToken\":\"secret\"}".to_vec(),
            ..Default::default()
        };
        let d = format!("{i:?}");
        assert!(!d.contains("secret"), "{d}");
    }
}
