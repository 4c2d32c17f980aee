//! The commands behind `main.rs`: serve, check-config, demo.

use std::fmt;
#[cfg(feature = "demo")]
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

#[cfg(feature = "demo")]
use fake_bitbucket::{FakeBitbucket, Fixture};

#[cfg(feature = "demo")]
use crate::config::{BasicAuth, ConnectorConfig, DataKey};
use crate::config::{Config, ConfigErrors, LogFormat};
#[cfg(feature = "demo")]
use crate::secret::Secret;
use crate::server::{self, App, Listener};
use crate::startup::StartupError;
use crate::telemetry;
#[cfg(feature = "demo")]
use crate::walkthrough;

/// `check-config`: every problem, or one summary line per connector.
pub fn check_config(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(cfg) => {
            for c in &cfg.connectors {
                println!("{}", c.summary());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            for p in e.0 {
                eprintln!("{p}");
            }
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, StartupError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(StartupError::Runtime)
}

use crate::bitbucket::install_crypto;

/// The exit of a command: 0, or 1 with its error as one stderr line.
pub fn exit(result: Result<(), impl fmt::Display>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bitbucket-connector: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `serve`: load, bind, serve until SIGTERM/SIGINT.
pub fn serve(path: &Path) -> ExitCode {
    return_free_memory();
    let cfg = match Config::load(path) {
        Ok(cfg) => cfg,
        Err(e) => return exit(Err(StartupError::Config(e))),
    };
    let files = cfg.check_files();
    if !files.is_empty() {
        return exit(Err(StartupError::Config(ConfigErrors(files))));
    }
    let _log = telemetry::init_logging(&cfg.logger);
    install_crypto();
    let json = cfg.logger.format == LogFormat::Json;
    let result = runtime().and_then(|rt| {
        rt.block_on(async move {
            let listener = Listener::bind(&cfg.grpc.addr).await?;
            warn_if_exposed(&cfg);
            let app = App::new(cfg)?;
            server::serve(app, listener, shutdown_signal()).await
        })
    });
    match result {
        // With JSON logs every line the process writes is JSON, errors included.
        Err(e) if json => {
            tracing::error!(error = %e, "cannot serve");
            ExitCode::FAILURE
        }
        other => exit(other),
    }
}

fn warn_if_exposed(cfg: &Config) {
    if let crate::config::ListenAddr::Tcp(a) = cfg.grpc.addr {
        if !a.ip().is_loopback() && cfg.grpc.tls_cert.is_none() && cfg.grpc.auth_tokens.is_empty() {
            tracing::warn!(
                addr = %a,
                "serving plaintext gRPC on a non-loopback address without grpc.authTokens: anyone who reaches this port can mint identities; set tlsCert/tlsClientCA or authTokens"
            );
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

/// The config `demo` serves: the fake's endpoints, both group options on.
#[cfg(feature = "demo")]
pub fn demo_config(
    fake: &FakeBitbucket,
    fixture: &Fixture,
    addr: SocketAddr,
    telemetry: Option<SocketAddr>,
    data_key: DataKey,
) -> Result<Config, StartupError> {
    let (Some(client), Some(admin)) = (fixture.clients.first(), fixture.admins.first()) else {
        return Err(StartupError::DemoFixture);
    };
    let connector = ConnectorConfig {
        name: "Bitbucket Cloud (fake)".to_string(),
        include_team_groups: true,
        get_workspace_permissions: true,
        team_groups_auth: Some(BasicAuth {
            username: admin.username.clone(),
            password: Secret::new(admin.password.clone()),
        }),
        ..ConnectorConfig::new(
            "bitbucket-cloud",
            client.client_id.clone(),
            Secret::new(client.client_secret.clone()),
            client.redirect_uri.clone(),
        )
    }
    .with_endpoints(
        &fake.auth_url(),
        &fake.token_url(),
        &fake.api_url(),
        &fake.legacy_api_url(),
    )
    .map_err(StartupError::DemoEndpoint)?;
    let mut cfg = Config::new(vec![data_key], vec![connector]);
    cfg.grpc.addr = crate::config::ListenAddr::Tcp(addr);
    cfg.telemetry.http = telemetry;
    Ok(cfg)
}

/// `demo`: the fake Bitbucket plus the service, and a walkthrough to paste;
/// with `walkthrough`, a login as `login_as` and a refresh done at once, then exit.
#[cfg(feature = "demo")]
pub fn demo(
    addr: SocketAddr,
    telemetry: Option<SocketAddr>,
    walkthrough: bool,
    login_as: &str,
) -> Result<(), StartupError> {
    return_free_memory();
    install_crypto();
    let key = DataKey(rand::random());
    runtime()?.block_on(async move {
        let fixture = Fixture::demo();
        let fake = FakeBitbucket::start(fixture.clone())
            .await
            .map_err(StartupError::Fake)?;
        let cfg = demo_config(&fake, &fixture, addr, telemetry, key)?;
        let _log = telemetry::init_logging(&cfg.logger);
        let listener = Listener::bind(&cfg.grpc.addr).await?;
        let addr = listener.local_addr().unwrap_or(addr);
        let app = App::new(cfg)?;
        let redirect = cfg_redirect(&app);
        if !walkthrough {
            println!("{}", walkthrough::banner(addr, &fake.base_url(), &redirect));
            return server::serve(app, listener, shutdown_signal()).await;
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(server::serve(app, listener, async {
            let _ = stopped.await;
        }));
        let result = walkthrough::run(addr, &redirect, login_as)
            .await
            .map_err(StartupError::Walkthrough);
        let _ = stop.send(());
        let served = server.await.map_err(StartupError::DemoTask)?;
        result.and(served)
    })
}

#[cfg(feature = "demo")]
fn cfg_redirect(app: &App) -> String {
    app.connectors
        .iter()
        .next()
        .map(|c| c.config().redirect_uri.clone())
        .unwrap_or_default()
}

/// glibc's malloc keeps what a burst freed in its arenas, where the contract
/// wants memory back after the connections close: every 5 s, when more than
/// 8 MiB sits free, `malloc_trim` gives it to the system. Started by the
/// long-running commands only; chosen over mimalloc and jemalloc with the
/// figures in BENCHMARKS.md (attacks).
fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    let _ = std::thread::Builder::new()
        .name("malloc-trim".into())
        .spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_secs(5));
            // SAFETY: neither call takes a pointer; both lock the arenas themselves.
            let free = unsafe { libc::mallinfo2() }.fordblks;
            if free > 8 << 20 {
                unsafe { libc::malloc_trim(0) };
            }
        });
}
