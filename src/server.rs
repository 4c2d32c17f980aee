//! The gRPC server: ConnectorService (behind the bearer-token check), health,
//! reflection, limits, the telemetry endpoint, and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tonic_health::ServingStatus;

use crate::config::{Config, ListenAddr};
use crate::connections::{self, Accept, Limits};
use crate::connector::{Connector, Connectors, SystemClock};
use crate::grpc::{self, Service};
use crate::metrics::Metrics;
use crate::pb::connector_service_server::ConnectorServiceServer;
use crate::sealing::Sealer;
use crate::startup::StartupError;
use crate::tls::{ReloadableTls, TlsFiles};
use crate::{bitbucket, pb, telemetry};

pub const SERVICE_NAME: &str = "connector.v1.ConnectorService";

/// A bound gRPC listener.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `addr`. A stale unix socket file left by a previous run is replaced.
    pub async fn bind(addr: &ListenAddr) -> Result<Listener, StartupError> {
        let failed = |source| StartupError::Listen {
            addr: addr.clone(),
            source,
        };
        match addr {
            ListenAddr::Tcp(a) => TcpListener::bind(a)
                .await
                .map(Listener::Tcp)
                .map_err(failed),
            ListenAddr::Unix(p) => {
                if let Ok(meta) = std::fs::symlink_metadata(p) {
                    use std::os::unix::fs::FileTypeExt as _;
                    if meta.file_type().is_socket() {
                        let _ = std::fs::remove_file(p);
                    }
                }
                UnixListener::bind(p)
                    .map(|l| Listener::Unix(l, p.clone()))
                    .map_err(failed)
            }
        }
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }
}

/// Everything a running server shares; built before the port is served.
pub struct App {
    pub metrics: Metrics,
    pub connectors: Arc<Connectors>,
    config: Config,
}

impl App {
    /// Builds the connectors (HTTP clients, sealer) from a validated config.
    pub fn new(config: Config) -> Result<App, StartupError> {
        let metrics = Metrics::new();
        let sealer = Arc::new(
            Sealer::new(
                &config.connector_data.keys,
                config.connector_data.accept_dex_plaintext,
            )
            .map_err(StartupError::Sealing)?,
        );
        let shared = match &config.cache.redis_url {
            Some(url) => Some(crate::cache::SharedCache::open(url).map_err(StartupError::Cache)?),
            None => None,
        };
        let mut list = Vec::new();
        for c in &config.connectors {
            let client = bitbucket::Client::for_connector(
                c,
                metrics.clone(),
                bitbucket::HttpOptions::default(),
            )
            .map_err(|e| StartupError::Connector {
                id: c.id.clone(),
                reason: e.to_string(),
            })?;
            let connector = Connector::new(
                c.clone(),
                client,
                Arc::new(SystemClock),
                sealer.clone(),
                metrics.clone(),
                shared.clone(),
            );
            list.push(Arc::new(connector));
        }
        Ok(App {
            metrics,
            connectors: Arc::new(Connectors::new(list)),
            config,
        })
    }
}

/// Serves until `shutdown` resolves, then drains: health goes NOT_SERVING,
/// new connections are refused, in-flight RPCs finish within
/// `grpc.shutdownTimeout`.
pub async fn serve(
    app: App,
    listener: Listener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartupError> {
    let cfg = &app.config.grpc;
    let in_flight = Arc::new(Semaphore::new(cfg.max_in_flight));
    let service = Service::new(app.connectors.clone(), cfg.default_timeout);
    let connector_server =
        ConnectorServiceServer::new(service).max_decoding_message_size(cfg.max_request_bytes);
    let connector_server = tower::Layer::layer(
        &grpc::Envelope::new(
            app.metrics.clone(),
            in_flight.clone(),
            cfg.default_timeout,
            cfg.auth_tokens.clone(),
        ),
        connector_server,
    );

    let (health, health_server) = tonic_health::server::health_reporter();
    let serving = Arc::new(AtomicBool::new(false));

    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(ReloadableTls::load(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: cfg.tls_client_ca.clone(),
        })?)),
        _ => None,
    };
    let mut routes = tonic::service::Routes::new(health_server).add_service(connector_server);
    if cfg.reflection {
        let v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        routes = routes.add_service(v1).add_service(v1alpha);
    }

    let telemetry = match app.config.telemetry.http {
        Some(addr) => {
            Some(telemetry::serve_http(addr, app.metrics.clone(), serving.clone()).await?)
        }
        None => None,
    };

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async {
        let _ = stop_rx.await;
    };
    let addr_text = match &listener {
        Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        Listener::Unix(_, p) => format!("unix:{}", p.display()),
    };
    let socket_path = match &listener {
        Listener::Unix(_, p) => Some(p.clone()),
        Listener::Tcp(_) => None,
    };
    let tls_watch = tls.clone().map(|t| tokio::spawn(t.watch()));
    let hangup = on_hangup(tls.clone());
    let service = tower::ServiceBuilder::new()
        .map_response(too_large_is_resource_exhausted)
        .service(routes.prepare());
    let accept = match listener {
        Listener::Tcp(l) => Accept::Tcp(l, tls),
        Listener::Unix(l, _) => Accept::Unix(l),
    };
    let limits = Limits {
        max_connections: cfg.max_connections,
        idle_timeout: cfg.connection_idle_timeout,
        max_concurrent_streams: cfg.max_concurrent_streams,
        keepalive_interval: cfg.keepalive_interval,
        keepalive_timeout: Duration::from_secs(20),
        // One message at the size cap (with its 5-byte prefix) per stream;
        // never under HTTP/2's default 65,535.
        stream_window: (cfg.max_request_bytes.saturating_add(5)).clamp(65_535, 1 << 30) as u32,
    };
    let server = tokio::spawn(connections::serve(accept, service, limits, stop));

    health.set_service_status("", ServingStatus::Serving).await;
    health
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;
    serving.store(true, Ordering::SeqCst);
    tracing::info!(
        addr = %addr_text,
        tls = cfg.tls_cert.is_some(),
        mtls = cfg.tls_client_ca.is_some(),
        auth_tokens = cfg.auth_tokens.len(),
        connectors = app.connectors.iter().count(),
        "serving gRPC"
    );

    tokio::pin!(server);
    tokio::select! {
        _ = shutdown => {}
        r = &mut server => {
            serving.store(false, Ordering::SeqCst);
            return r.map_err(StartupError::ServerTask);
        }
    }

    // Drain.
    let started = tokio::time::Instant::now();
    let drain_deadline = started + cfg.shutdown_timeout;
    serving.store(false, Ordering::SeqCst);
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    tracing::info!(timeout = ?cfg.shutdown_timeout, "shutting down: health NOT_SERVING, draining in-flight RPCs");
    let _ = stop_tx.send(());
    let permits = cfg.max_in_flight.min(u32::MAX as usize) as u32;
    let drained = tokio::time::timeout_at(drain_deadline, in_flight.acquire_many(permits)).await;
    match drained {
        Ok(_) => {
            // Let the last responses flush; open health watches end here.
            let flush =
                (drain_deadline - tokio::time::Instant::now()).min(Duration::from_millis(500));
            let _ = tokio::time::timeout(flush, &mut server).await;
            tracing::info!(took = ?started.elapsed(), "drained; exiting");
        }
        Err(_) => {
            let left = cfg.max_in_flight - in_flight.available_permits();
            tracing::warn!(
                in_flight = left,
                "shutdown timeout reached with RPCs still in flight; exiting"
            );
        }
    }
    for t in [telemetry, tls_watch, hangup].into_iter().flatten() {
        t.abort();
    }
    if let Some(p) = socket_path {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// SIGHUP reloads the TLS certificates when TLS is on, and never stops the
/// process (its default action would, silently): once this handler is
/// registered, the signal is caught for the rest of the process's life.
fn on_hangup(tls: Option<Arc<ReloadableTls>>) -> Option<tokio::task::JoinHandle<()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot handle SIGHUP");
                return None;
            }
        };
        Some(tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match &tls {
                    Some(t) => t.reload_logged("SIGHUP"),
                    None => tracing::info!("SIGHUP received; nothing to reload without TLS"),
                }
            }
        }))
    }
    #[cfg(not(unix))]
    {
        let _ = tls;
        None
    }
}

/// tonic answers an over-limit request message with OUT_OF_RANGE; gRPC's
/// convention (and our contract) is RESOURCE_EXHAUSTED.
fn too_large_is_resource_exhausted<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let code = resp.headers().get("grpc-status");
    if code.is_some_and(|c| c.as_bytes() == b"11") {
        resp.headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    resp
}
