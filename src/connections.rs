//! The gRPC port's connections, served with hyper's HTTP/2 server directly
//! (tonic's `Server` offers no idle timeout, no connection limit and no
//! back-off on accept errors): at most `grpc.maxConnections` at once (beyond
//! it new ones wait in the listen backlog), accept errors such as running out
//! of descriptors logged and backed off, TLS handshakes bounded in number and
//! time, and a connection with no RPC in flight for
//! `grpc.connectionIdleTimeout` closed with a GOAWAY.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tonic::body::Body;

use crate::tls::ReloadableTls;

/// TLS handshakes in progress at once; more accepted connections wait (their
/// wait counts in the handshake's time limit).
pub(crate) const MAX_TLS_HANDSHAKES: usize = 64;
/// A TLS handshake (wait for a slot included) that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After an idle connection's GOAWAY, how long it may take to close before it
/// is dropped (a client that never finished the HTTP/2 preface, or that does
/// not answer the GOAWAY's ping).
const CLOSE_GRACE: Duration = Duration::from_secs(5);
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub(crate) struct Limits {
    pub max_connections: usize,
    /// `Duration::ZERO`: never.
    pub idle_timeout: Duration,
    pub max_concurrent_streams: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// HTTP/2 flow-control window of a stream; the connection's is twice it.
    /// What a client can make us buffer before we read: hyper's default 1 MiB
    /// per connection would be 1 GiB over 1,024 connections.
    pub stream_window: u32,
}

/// What connections are accepted from.
pub(crate) enum Accept {
    Tcp(TcpListener, Option<Arc<ReloadableTls>>),
    Unix(UnixListener),
}

/// The service every connection runs (tonic's routes, with our layers).
pub(crate) trait GrpcService:
    tower::Service<
        http::Request<Incoming>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> GrpcService for S where
    S: tower::Service<
            http::Request<Incoming>,
            Response = http::Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// Serves connections until `stop` resolves; then closes the listener, sends
/// every connection a GOAWAY and resolves when they have all closed.
pub(crate) async fn serve<S: GrpcService>(
    accept: Accept,
    service: S,
    limits: Limits,
    stop: impl Future<Output = ()>,
) {
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .initial_stream_window_size(limits.stream_window)
        .initial_connection_window_size(limits.stream_window.saturating_mul(2))
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        // h2's defaults, stated: streams reset by the client before we saw
        // them (rapid reset), and by us for the client's protocol errors.
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(1024);
    let conns = Arc::new(Semaphore::new(limits.max_connections));
    let handshakes = Arc::new(Semaphore::new(MAX_TLS_HANDSHAKES));
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut backoff = Backoff::default();
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            biased;
            _ = &mut stop => break,
            p = conns.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            biased;
            _ = &mut stop => break,
            a = accept_one(&accept) => a,
        };
        let io = match accepted {
            Ok(io) => {
                backoff.reset();
                io
            }
            Err(e) => {
                let pause = backoff.failed(&e, "gRPC");
                tokio::select! {
                    biased;
                    _ = &mut stop => break,
                    _ = tokio::time::sleep(pause) => continue,
                }
            }
        };
        let conn = Connection {
            http2: http2.clone(),
            service: service.clone(),
            idle_timeout: limits.idle_timeout,
            closing: closing_rx.clone(),
            _permit: permit,
        };
        match io {
            Accepted::Tcp(tcp) => {
                let _ = tcp.set_nodelay(true);
                match &accept {
                    Accept::Tcp(_, Some(tls)) => {
                        let acceptor = tls.acceptor();
                        let handshakes = handshakes.clone();
                        tokio::spawn(async move {
                            let peer = tcp.peer_addr().ok();
                            let handshake = async {
                                let _slot = handshakes.acquire().await;
                                acceptor.accept(tcp).await
                            };
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                                Ok(Ok(stream)) => conn.run(stream).await,
                                // A refusal (no or an untrusted client
                                // certificate under mTLS) leaves a trace.
                                Ok(Err(e)) => {
                                    tracing::info!(?peer, error = %e, "TLS handshake refused")
                                }
                                Err(_) => tracing::debug!(?peer, "TLS handshake timed out"),
                            }
                        });
                    }
                    _ => {
                        tokio::spawn(conn.run(tcp));
                    }
                }
            }
            Accepted::Unix(unix) => {
                tokio::spawn(conn.run(unix));
            }
        }
    }
    // Closing the listener at once: new clients are refused, not left hanging.
    drop(accept);
    let _ = closing_tx.send(true);
    drop(closing_rx);
    closing_tx.closed().await;
}

/// Accept errors such as EMFILE repeat at once: each is logged and the next
/// accept waits, 10 ms doubling up to 1 s, until one succeeds.
#[derive(Default)]
pub(crate) struct Backoff(Duration);

impl Backoff {
    pub(crate) fn failed(&mut self, e: &std::io::Error, port: &str) -> Duration {
        self.0 = (self.0 * 2).clamp(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
        tracing::warn!(port, error = %e, backoff_ms = self.0.as_millis() as u64, "accept failed; backing off");
        self.0
    }

    pub(crate) fn reset(&mut self) {
        self.0 = Duration::ZERO;
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept_one(accept: &Accept) -> std::io::Result<Accepted> {
    match accept {
        Accept::Tcp(l, _) => l.accept().await.map(|(s, _)| Accepted::Tcp(s)),
        Accept::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}

struct Connection<S> {
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    service: S,
    idle_timeout: Duration,
    closing: watch::Receiver<bool>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl<S: GrpcService> Connection<S> {
    async fn run<IO>(mut self, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity {
            active: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        });
        let service = TowerToHyperService::new(Tracked {
            inner: self.service.clone(),
            activity: activity.clone(),
        });
        let conn = self.http2.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        // When the idle GOAWAY went out.
        let idle_timeout = self.idle_timeout;
        let mut goaway_at: Option<Instant> = None;
        let mut draining = false;
        loop {
            let wake = match goaway_at {
                Some(at) => Some(at + CLOSE_GRACE),
                None => activity.idle_deadline(idle_timeout),
            };
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = self.closing.changed(), if !draining => {
                    // Shutdown: in-flight RPCs finish; the server bounds the wait.
                    draining = true;
                    if goaway_at.is_none() {
                        conn.as_mut().graceful_shutdown();
                    }
                }
                _ = sleep => match goaway_at {
                    Some(_) if activity.active.load(Ordering::SeqCst) == 0 => return,
                    Some(_) => goaway_at = Some(Instant::now()),
                    None => {
                        if activity.idle_deadline(idle_timeout).is_some_and(|d| d <= Instant::now()) {
                            tracing::debug!(idle = ?idle_timeout, "closing an idle connection");
                            if !draining {
                                conn.as_mut().graceful_shutdown();
                            }
                            goaway_at = Some(Instant::now());
                        }
                    }
                },
            }
        }
    }
}

/// RPCs in flight on one connection, and since when it has had none.
struct Activity {
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Activity {
    /// When the connection will have been idle for `timeout` if nothing
    /// starts; with an RPC in flight, a time to look again.
    fn idle_deadline(&self, timeout: Duration) -> Option<Instant> {
        if timeout.is_zero() {
            return None;
        }
        if self.active.load(Ordering::SeqCst) > 0 {
            return Some(Instant::now() + timeout);
        }
        Some(*self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) + timeout)
    }
}

/// Held from a request's arrival until its response body is done.
struct Busy(Arc<Activity>);

impl Busy {
    fn new(a: &Arc<Activity>) -> Busy {
        a.active.fetch_add(1, Ordering::SeqCst);
        Busy(a.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: GrpcService> tower::Service<http::Request<Incoming>> for Tracked<S> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Incoming>) -> Self::Future {
        let busy = Busy::new(&self.activity);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // A streaming response (health Watch) keeps the connection busy.
            Ok(resp.map(move |b| {
                Body::new(b.map_frame(move |f| {
                    let _ = &busy;
                    f
                }))
            }))
        })
    }
}
