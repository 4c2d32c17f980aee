//! One HTTP exchange with Bitbucket: deadline, per-attempt timeout, retries
//! with jittered exponential backoff (idempotent GETs only), a body size cap,
//! and metrics by endpoint template.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rand::Rng as _;
use reqwest::header::{HeaderMap, AUTHORIZATION, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use tokio::time::Instant;
use url::Url;

use super::UpstreamError;
use crate::metrics::{Metrics, UpstreamStatus};
use crate::secret::Secret;

/// How a request authenticates. Tokens travel only in the Authorization header.
#[derive(Clone, Copy)]
pub(crate) enum Auth<'a> {
    Bearer(&'a Secret),
    Basic {
        username: &'a str,
        password: &'a Secret,
    },
}

/// Bounds the sockets a burst of logins opens to Bitbucket (or an HTTP/1.1
/// proxy, where each request in flight is a connection): well under the
/// usual 1,024 open-files limit, and above what one login of a user in 100
/// workspaces needs at once.
pub(crate) const DEFAULT_MAX_IN_FLIGHT: usize = 256;

#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Timeout of one attempt.
    pub attempt_timeout: Duration,
    /// Attempts of an idempotent GET, the first included.
    pub max_attempts: u32,
    /// First backoff; doubled each retry, with jitter.
    pub backoff: Duration,
    /// Largest response body read.
    pub max_body_bytes: usize,
    /// Longest Retry-After honoured; a longer one fails at once.
    pub max_retry_after: Duration,
    /// Requests open at once through this client; more wait for a slot.
    pub max_in_flight: usize,
    /// A resource's breaker after a 429 without Retry-After: open this long,
    /// doubled for each 429 in a row (at most 16 times).
    pub rate_limit_backoff: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            attempt_timeout: Duration::from_secs(10),
            max_attempts: 3,
            backoff: Duration::from_millis(100),
            max_body_bytes: 4 * 1024 * 1024,
            max_retry_after: Duration::from_secs(10),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            rate_limit_backoff: Duration::from_secs(60),
        }
    }
}

/// A response that arrived, body read in full (within the cap).
pub(super) struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The body's share of [`BODY_BUDGET`], given back with the response.
    _budget: Share,
}

/// Response bytes (KiB) that all clients of the process hold at once: 16
/// bodies at the 4 MiB cap, where a login needs a few KiB. Beyond it a
/// response fails (UNAVAILABLE) instead of growing the heap.
pub(super) const BODY_BUDGET_KIB: usize = 64 * 1024;
static BODY_BUDGET: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(BODY_BUDGET_KIB);

/// A body's share of a budget of KiB, grown as its chunks arrive.
struct Share {
    budget: &'static tokio::sync::Semaphore,
    held: Option<tokio::sync::SemaphorePermit<'static>>,
}

impl Share {
    fn new(budget: &'static tokio::sync::Semaphore) -> Share {
        Share { budget, held: None }
    }

    /// Holds enough for `len` bytes, or fails at once (never waits).
    fn grow_to(&mut self, len: usize) -> Result<(), ExchangeError> {
        let held = self.held.as_ref().map_or(0, |p| p.num_permits());
        let more = len.div_ceil(1024).saturating_sub(held);
        if more == 0 {
            return Ok(());
        }
        let p = u32::try_from(more)
            .ok()
            .and_then(|n| self.budget.try_acquire_many(n).ok())
            .ok_or(ExchangeError::OverBudget)?;
        match self.held.as_mut() {
            Some(h) => h.merge(p),
            None => self.held = Some(p),
        }
        Ok(())
    }
}

pub(super) struct Http {
    client: reqwest::Client,
    metrics: Metrics,
    opts: HttpOptions,
    slots: tokio::sync::Semaphore,
    breakers: Breakers,
}

/// Bitbucket counts its rate limit per OAuth consumer and resource: after a
/// 429, no request to that resource (endpoint template) goes out until the
/// advised or backed-off time, whichever login asks.
#[derive(Default)]
struct Breakers(std::sync::Mutex<std::collections::HashMap<&'static str, Breaker>>);

struct Breaker {
    until: Instant,
    trips: u32,
}

impl Breakers {
    /// How long the endpoint's breaker stays open, if it is.
    fn open_for(&self, endpoint: &'static str) -> Option<Duration> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let left = map
            .get(endpoint)?
            .until
            .saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Opens the breaker after a 429; returns how long it stays open.
    fn trip(
        &self,
        endpoint: &'static str,
        advised: Option<Duration>,
        backoff: Duration,
    ) -> Duration {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let b = map.entry(endpoint).or_insert(Breaker {
            until: Instant::now(),
            trips: 0,
        });
        // 429s of requests already in flight when the breaker opened are
        // one trip, not several: only a 429 on a closed breaker escalates.
        if b.until <= Instant::now() {
            b.trips = b.trips.saturating_add(1);
        }
        let wait = advised
            .unwrap_or_else(|| backoff.saturating_mul(1 << (b.trips.max(1) - 1).min(4)))
            .max(Duration::from_millis(1));
        b.until = b.until.max(Instant::now() + wait);
        b.until.saturating_duration_since(Instant::now())
    }

    /// Any other answer closes it and forgets the 429s in a row.
    fn reset(&self, endpoint: &'static str) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(endpoint).is_some_and(|b| b.until <= Instant::now()) {
            map.remove(endpoint);
        }
    }
}

enum Attempt {
    Done(Response),
    /// Worth another try, after the given delay if the server said so.
    Retry(UpstreamError, Option<Duration>),
    Fail(UpstreamError),
}

impl Http {
    pub(super) fn new(metrics: Metrics, opts: HttpOptions) -> Result<Http, String> {
        install_crypto();
        let slots = opts.max_in_flight.max(1);
        let client = reqwest::Client::builder()
            .user_agent(concat!("bitbucket-connector/", env!("CARGO_PKG_VERSION")))
            // Redirects could carry the Authorization header elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(opts.attempt_timeout)
            // Over HTTP/1.1 (a proxy, or the fake) every request in flight is
            // a connection: keep as many warm as may be used at once, no more.
            .pool_max_idle_per_host(slots)
            // Under the servers' own idle limits (hyper's default 30 s, ALBs
            // 60 s, nginx 75 s): a pooled connection the server is closing
            // just as a POST goes out fails that POST, which is not retried.
            .pool_idle_timeout(Duration::from_secs(20))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Http {
            client,
            metrics,
            slots: tokio::sync::Semaphore::new(slots),
            breakers: Breakers::default(),
            opts,
        })
    }

    pub(super) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A GET, retried on 429, 502, 503, 504, timeouts and connection errors,
    /// never past `deadline`. Returns any response that is not retryable.
    pub(super) async fn get(
        &self,
        endpoint: &'static str,
        url: &Url,
        auth: Auth<'_>,
        deadline: Instant,
    ) -> Result<Response, UpstreamError> {
        let mut attempt = 1;
        loop {
            self.closed(endpoint)?;
            let req = self.request(Method::GET, url, auth);
            let (err, retry_after) = match self.attempt(endpoint, req, deadline).await {
                Attempt::Done(r) => return Ok(r),
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry(e, ra) => (e, ra),
            };
            let limited = matches!(err, UpstreamError::RateLimited { .. });
            if attempt >= self.opts.max_attempts {
                return Err(err);
            }
            let wait = match retry_after {
                // A 429 is waited out only when the breaker reopens soon enough.
                Some(ra) if ra > self.opts.max_retry_after => return Err(err),
                Some(ra) => ra,
                None if limited => return Err(err),
                None => self.backoff(attempt),
            };
            if Instant::now() + wait >= deadline {
                return Err(err);
            }
            tokio::time::sleep(wait).await;
            self.metrics.retry(endpoint);
            attempt += 1;
        }
    }

    /// A request sent once: the token endpoint must not see a code twice.
    /// Only a connection that could not be made is tried again.
    pub(super) async fn send_once(
        &self,
        endpoint: &'static str,
        req: reqwest::RequestBuilder,
        deadline: Instant,
    ) -> Result<Response, UpstreamError> {
        self.closed(endpoint)?;
        let Some(retry) = req.try_clone() else {
            return self.attempt_result(endpoint, req, deadline).await;
        };
        match self.attempt(endpoint, req, deadline).await {
            Attempt::Done(r) => Ok(r),
            Attempt::Fail(e) => Err(e),
            Attempt::Retry(e @ UpstreamError::Connect { .. }, _) => {
                let wait = self.backoff(1);
                if Instant::now() + wait >= deadline {
                    return Err(e);
                }
                tokio::time::sleep(wait).await;
                self.metrics.retry(endpoint);
                self.attempt_result(endpoint, retry, deadline).await
            }
            Attempt::Retry(e @ UpstreamError::RateLimited { .. }, _) => Err(e),
            Attempt::Retry(UpstreamError::Status { status, .. }, _) => {
                // Answered: not retried, but still an outage to the caller.
                Err(UpstreamError::Unavailable {
                    endpoint,
                    detail: format!("HTTP {status}"),
                })
            }
            Attempt::Retry(e, _) => Err(e),
        }
    }

    async fn attempt_result(
        &self,
        endpoint: &'static str,
        req: reqwest::RequestBuilder,
        deadline: Instant,
    ) -> Result<Response, UpstreamError> {
        match self.attempt(endpoint, req, deadline).await {
            Attempt::Done(r) => Ok(r),
            Attempt::Fail(e) | Attempt::Retry(e, _) => Err(e),
        }
    }

    /// Refuses, without sending, a request to a resource whose breaker is open.
    fn closed(&self, endpoint: &'static str) -> Result<(), UpstreamError> {
        match self.breakers.open_for(endpoint) {
            None => Ok(()),
            Some(left) => {
                self.metrics.rate_limited(endpoint);
                Err(UpstreamError::RateLimited {
                    endpoint,
                    retry_after: left,
                })
            }
        }
    }

    pub(super) fn request(
        &self,
        method: Method,
        url: &Url,
        auth: Auth<'_>,
    ) -> reqwest::RequestBuilder {
        let req = self.client.request(method, url.clone());
        match auth {
            Auth::Bearer(token) => req.header(AUTHORIZATION, format!("Bearer {}", token.expose())),
            Auth::Basic { username, password } => req.basic_auth(username, Some(password.expose())),
        }
    }

    pub(super) fn post(&self, url: &Url) -> reqwest::RequestBuilder {
        self.client.post(url.clone())
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.opts.backoff.saturating_mul(1 << (attempt - 1).min(10));
        base.mul_f64(rand::rng().random_range(0.5..1.0))
    }

    async fn attempt(
        &self,
        endpoint: &'static str,
        req: reqwest::RequestBuilder,
        deadline: Instant,
    ) -> Attempt {
        if Instant::now() >= deadline {
            return Attempt::Fail(UpstreamError::DeadlineExceeded { endpoint });
        }
        // A slot is waited for within the deadline, and held for one attempt
        // only (never across a backoff), so waiting cannot deadlock.
        let Ok(Ok(_slot)) = tokio::time::timeout_at(deadline, self.slots.acquire()).await else {
            return Attempt::Fail(UpstreamError::DeadlineExceeded { endpoint });
        };
        let budget = self
            .opts
            .attempt_timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(budget, self.exchange(req)).await;
        let secs = started.elapsed().as_secs_f64();
        let outcome = match outcome {
            Ok(o) => o,
            Err(_) => {
                self.metrics.upstream(endpoint, UpstreamStatus::Error, secs);
                if Instant::now() >= deadline {
                    return Attempt::Fail(UpstreamError::DeadlineExceeded { endpoint });
                }
                return Attempt::Retry(
                    UpstreamError::Timeout {
                        endpoint,
                        after: budget,
                    },
                    None,
                );
            }
        };
        match outcome {
            Err(ExchangeError::Transport(e)) => {
                self.metrics.upstream(endpoint, UpstreamStatus::Error, secs);
                let detail = describe_transport(&e);
                tracing::debug!(endpoint, error = %detail, "upstream request failed");
                let err = if e.is_connect() {
                    UpstreamError::Connect { endpoint, detail }
                } else {
                    UpstreamError::Transport { endpoint, detail }
                };
                Attempt::Retry(err, None)
            }
            Err(ExchangeError::TooLarge(status)) => {
                self.metrics
                    .upstream(endpoint, UpstreamStatus::Http(status.as_u16()), secs);
                Attempt::Fail(UpstreamError::Invalid {
                    endpoint,
                    detail: format!(
                        "response body larger than {} bytes",
                        self.opts.max_body_bytes
                    ),
                })
            }
            Err(ExchangeError::OverBudget) => {
                self.metrics.upstream(endpoint, UpstreamStatus::Error, secs);
                tracing::warn!(
                    endpoint,
                    budget_kib = BODY_BUDGET_KIB,
                    "upstream response bodies held at once are over budget; failing this one"
                );
                Attempt::Fail(UpstreamError::Unavailable {
                    endpoint,
                    detail: "too many large responses held at once".into(),
                })
            }
            Ok(resp) => {
                let status = resp.status;
                self.metrics
                    .upstream(endpoint, UpstreamStatus::Http(status.as_u16()), secs);
                match status.as_u16() {
                    429 => {
                        self.metrics.rate_limited(endpoint);
                        let open = self.breakers.trip(
                            endpoint,
                            retry_after(&resp.headers),
                            self.opts.rate_limit_backoff,
                        );
                        let advised = retry_after(&resp.headers).map(|_| open);
                        tracing::warn!(
                            endpoint,
                            retry_after_seconds = open.as_secs_f64().ceil() as u64,
                            "Bitbucket rate limit (429): no requests to this resource until the breaker closes"
                        );
                        Attempt::Retry(
                            UpstreamError::RateLimited {
                                endpoint,
                                retry_after: open,
                            },
                            advised,
                        )
                    }
                    502..=504 => {
                        self.breakers.reset(endpoint);
                        let ra = retry_after(&resp.headers);
                        Attempt::Retry(
                            UpstreamError::Status {
                                endpoint,
                                status: status.as_u16(),
                            },
                            ra,
                        )
                    }
                    _ => {
                        self.breakers.reset(endpoint);
                        Attempt::Done(resp)
                    }
                }
            }
        }
    }

    async fn exchange(&self, req: reqwest::RequestBuilder) -> Result<Response, ExchangeError> {
        let mut resp = req.send().await.map_err(ExchangeError::Transport)?;
        let status = resp.status();
        let max = self.opts.max_body_bytes;
        if resp.content_length().is_some_and(|n| n > max as u64) {
            return Err(ExchangeError::TooLarge(status));
        }
        let headers = std::mem::take(resp.headers_mut());
        let mut body = BytesMut::new();
        let mut budget = Share::new(&BODY_BUDGET);
        while let Some(chunk) = resp.chunk().await.map_err(ExchangeError::Transport)? {
            let len = body.len() + chunk.len();
            if len > max {
                return Err(ExchangeError::TooLarge(status));
            }
            budget.grow_to(len)?;
            body.extend_from_slice(&chunk);
        }
        Ok(Response {
            status,
            headers,
            body: body.freeze(),
            _budget: budget,
        })
    }
}

/// Installs ring as the process's TLS provider, shared by reqwest and tonic
/// (reqwest is built without one of its own). Idempotent.
pub(crate) fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

enum ExchangeError {
    Transport(reqwest::Error),
    TooLarge(StatusCode),
    /// [`BODY_BUDGET`] is spent.
    OverBudget,
}

/// A transport error without the URL (which could carry identifiers).
fn describe_transport(e: &reqwest::Error) -> String {
    let kind = if e.is_connect() {
        "connection failed"
    } else if e.is_timeout() {
        "timed out"
    } else if e.is_body() || e.is_decode() {
        "connection broken while reading the response"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(e);
    let mut root = None;
    while let Some(s) = source {
        root = Some(s.to_string());
        source = s.source();
    }
    match root {
        Some(r) => format!("{kind}: {r}"),
        None => kind.to_string(),
    }
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    v.parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_only() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn breaker_backs_off_per_trip_not_per_concurrent_429() {
        let b = Breakers::default();
        let backoff = Duration::from_secs(10);
        assert_eq!(b.open_for("/x"), None);
        let first = b.trip("/x", None, backoff);
        assert!(
            first > Duration::from_secs(9) && first <= backoff,
            "{first:?}"
        );
        // Another 429 of the same burst: the same level.
        let again = b.trip("/x", None, backoff);
        assert!(again <= backoff, "{again:?}");
        assert!(b.open_for("/y").is_none(), "per resource");
        assert!(b.open_for("/x").is_some());
        // Retry-After wins, and the breaker stays open at least as long.
        assert!(b.trip("/z", Some(Duration::from_secs(3)), backoff) <= Duration::from_secs(3));
        // Once it has closed, the next 429 doubles the wait.
        b.0.lock().unwrap().get_mut("/x").unwrap().until = Instant::now();
        let second = b.trip("/x", None, backoff);
        assert!(
            second > Duration::from_secs(19) && second <= 2 * backoff,
            "{second:?}"
        );
        for _ in 0..10 {
            b.0.lock().unwrap().get_mut("/x").unwrap().until = Instant::now();
            b.trip("/x", None, backoff);
        }
        assert!(b.open_for("/x").unwrap() <= 16 * backoff);
        // A success after it closed forgets the trips.
        b.0.lock().unwrap().get_mut("/x").unwrap().until = Instant::now();
        b.reset("/x");
        assert!(b.trip("/x", None, backoff) <= backoff);
    }

    #[test]
    fn backoff_grows_and_is_jittered() {
        let http = Http::new(Metrics::new(), HttpOptions::default()).unwrap();
        for _ in 0..50 {
            let b1 = http.backoff(1);
            let b2 = http.backoff(2);
            assert!(b1 >= Duration::from_millis(50) && b1 < Duration::from_millis(100));
            assert!(b2 >= Duration::from_millis(100) && b2 < Duration::from_millis(200));
        }
    }

    #[test]
    fn bodies_share_one_budget_and_give_it_back() {
        static BUDGET: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(8);
        let mut a = Share::new(&BUDGET);
        assert!(a.grow_to(1).is_ok());
        assert!(a.grow_to(5 * 1024).is_ok());
        assert_eq!(BUDGET.available_permits(), 3);
        let mut b = Share::new(&BUDGET);
        assert!(b.grow_to(3 * 1024).is_ok());
        assert!(matches!(
            b.grow_to(3 * 1024 + 1),
            Err(ExchangeError::OverBudget)
        ));
        drop(a);
        assert!(b.grow_to(8 * 1024).is_ok());
        assert_eq!(BUDGET.available_permits(), 0);
        drop(b);
        assert_eq!(BUDGET.available_permits(), 8);
    }
}
