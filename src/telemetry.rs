//! Logs (tracing, text or JSON) and the telemetry HTTP endpoint:
//! `/metrics`, `/healthz`, `/readyz`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::config::{LogFormat, LoggerConfig};
use crate::metrics::Metrics;

/// Installs the global subscriber. `RUST_LOG`, when set, overrides the level
/// per module (for debugging); the config's level is the default.
///
/// Lines are formatted on the caller's thread and written to stderr by a
/// dedicated thread, which batches them under load (one `write(2)` for many
/// lines instead of one per RPC, and no file lock taken on the request path).
/// Never lossy: when that thread falls 8k lines behind, callers wait. Keep
/// the guard until the process ends; dropping it flushes what is queued.
#[must_use = "dropping the guard stops the log writer"]
pub(crate) fn init_logging(cfg: &LoggerConfig) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::EnvFilter;
    let default = format!(
        "{},h2=warn,hyper=warn,hyper_util=warn,tower=warn,rustls=warn,reqwest=warn",
        cfg.level.as_str().to_ascii_lowercase()
    );
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        // The queue is allocated up front: 8k lines is 256 KiB, the default
        // 128k lines 4 MiB (the idle process's size: BENCHMARKS.md, memory).
        .buffered_lines_limit(8 * 1024)
        .thread_name("log-writer")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    // Colour only for a person at a terminal: escape codes in a collected log
    // are noise, and cost a fifth of the line's formatting.
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        .with_target(false);
    let _ = match cfg.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text if ansi => builder.try_init(),
        LogFormat::Text => builder.fmt_fields(plain_fields()).try_init(),
    };
    std::panic::set_hook(Box::new(log_panic));
    guard
}

/// `name=value` fields, the message bare: the default field formatter's
/// output without its styling, which it applies (as empty styles) even with
/// colour off (its cost: BENCHMARKS.md, "What the profile led to").
fn plain_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static {
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(
        |w: &mut tracing_subscriber::fmt::format::Writer<'_>,
         field: &tracing::field::Field,
         value: &dyn std::fmt::Debug| {
            if field.name() == "message" {
                write!(w, "{value:?}")
            } else {
                write!(w, "{field}={value:?}")
            }
        },
    )
    .delimited(" ")
}

/// A panic becomes one log event (one JSON object with `logger.format: json`),
/// not the default hook's free text. Tasks that panic are contained by tokio:
/// the RPC fails and the process keeps serving.
fn log_panic(info: &std::panic::PanicHookInfo<'_>) {
    let payload = info
        .payload()
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    let location = info
        .location()
        .map(|l| format!("{}:{}", l.file(), l.line()))
        .unwrap_or_default();
    let thread = std::thread::current();
    tracing::error!(
        thread = thread.name().unwrap_or("-"),
        location,
        panic = payload,
        "panicked"
    );
}

/// Serves the telemetry endpoint; the task ends when aborted.
pub(crate) async fn serve_http(
    addr: SocketAddr,
    metrics: Metrics,
    serving: Arc<AtomicBool>,
) -> Result<tokio::task::JoinHandle<()>, crate::startup::StartupError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| crate::startup::StartupError::TelemetryListen { addr, source })?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| {
                let m = metrics.clone();
                async move {
                    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
                    let (content_type, body) = m.exposition(accept);
                    ([(header::CONTENT_TYPE, content_type)], body)
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = serving.load(Ordering::SeqCst);
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n").into_response()
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not serving\n").into_response()
                    }
                }
            }),
        );
    tracing::info!(%addr, "serving telemetry (/metrics, /healthz, /readyz)");
    Ok(tokio::spawn(serve_connections(listener, app)))
}

/// A client that has not sent a complete request header within this long is
/// disconnected (slowloris), idle keep-alive connections included.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Telemetry connections held at once; beyond it new ones wait.
const MAX_CONNECTIONS: usize = 256;

/// HTTP/1.1 with hyper directly: `axum::serve` sets no header-read timeout.
async fn serve_connections(listener: tokio::net::TcpListener, app: Router) {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = crate::connections::Backoff::default();
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => {
                backoff.reset();
                tcp
            }
            Err(e) => {
                tokio::time::sleep(backoff.failed(&e, "telemetry")).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = http1.serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "telemetry connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn text_line(plain: bool) -> String {
        let buf = Buf::default();
        let writer = buf.clone();
        let builder = tracing_subscriber::fmt()
            .without_time()
            .with_ansi(false)
            .with_target(false)
            .with_writer(move || writer.clone());
        let emit = || {
            tracing::info!(
                rpc = %"LoginURL",
                code = %"OK",
                ms = 0.075,
                upstream_calls = 3u32,
                error = "expected \"x\"\nnext",
                "rpc"
            )
        };
        if plain {
            let subscriber = builder.fmt_fields(super::plain_fields()).finish();
            tracing::subscriber::with_default(subscriber, emit);
        } else {
            tracing::subscriber::with_default(builder.finish(), emit);
        }
        let out = buf.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn plain_text_lines_read_as_the_default_formatters() {
        let plain = text_line(true);
        assert_eq!(plain, text_line(false));
        assert_eq!(
            plain,
            " INFO rpc rpc=LoginURL code=OK ms=0.075 upstream_calls=3 error=\"expected \\\"x\\\"\\nnext\"\n"
        );
    }

    #[test]
    fn a_panic_is_one_json_log_line() {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(super::log_panic));
            let r = std::panic::catch_unwind(|| panic!("boom {}", 42));
            std::panic::set_hook(previous);
            assert!(r.is_err());
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "{out}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["message"], "panicked", "{v}");
        assert_eq!(v["panic"], "boom 42", "{v}");
        assert_eq!(v["level"], "ERROR", "{v}");
        assert!(
            v["location"].as_str().unwrap().contains("telemetry.rs"),
            "{v}"
        );
    }
}
