//! The commands behind `main.rs`: serve, check-config, demo.

#[cfg(feature = "demo")]
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

#[cfg(feature = "demo")]
use base64::Engine as _;
#[cfg(feature = "demo")]
use fake_bitbucket::{FakeBitbucket, Fixture};

use crate::config::Config;
use crate::server::{self, App, Listener};
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

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

use crate::bitbucket::install_crypto;

/// `serve`: load, bind, serve until SIGTERM/SIGINT.
pub fn serve(path: &Path) -> Result<(), String> {
    let cfg = Config::load(path).map_err(|e| e.to_string())?;
    let files = cfg.check_files();
    if !files.is_empty() {
        return Err(files.join("\n"));
    }
    let _log = telemetry::init_logging(&cfg.logger);
    install_crypto();
    let json = cfg.logger.format == crate::config::LogFormat::Json;
    let result = runtime()?.block_on(async move {
        let listener = Listener::bind(&cfg.grpc.addr).await?;
        warn_if_exposed(&cfg);
        let app = App::new(cfg)?;
        server::serve(app, listener, shutdown_signal()).await
    });
    match result {
        // With JSON logs every line the process writes is JSON, errors included.
        Err(e) if json => {
            tracing::error!(error = %e, "cannot serve");
            Err(String::new())
        }
        other => other,
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
    data_key: &str,
) -> Result<Config, String> {
    let (Some(client), Some(admin)) = (fixture.clients.first(), fixture.admins.first()) else {
        return Err("the demo fixture has no OAuth client or admin credential".into());
    };
    let yaml = format!(
        r#"
grpc:
  addr: "{addr}"
{telemetry}logger:
  level: info
connectorData:
  keys: ["{data_key}"]
connectors:
- type: bitbucket-cloud
  id: bitbucket-cloud
  name: Bitbucket Cloud (fake)
  config:
    clientID: {client_id}
    clientSecret: {client_secret}
    redirectURI: {redirect}
    includeTeamGroups: true
    getWorkspacePermissions: true
    teamGroupsAuth:
      username: {admin_user}
      password: {admin_password}
    authURL: {auth}
    tokenURL: {token}
    apiURL: {api}
    legacyAPIURL: {legacy}
"#,
        client_id = client.client_id,
        client_secret = client.client_secret,
        redirect = client.redirect_uri,
        admin_user = admin.username,
        admin_password = admin.password,
        auth = fake.auth_url(),
        token = fake.token_url(),
        api = fake.api_url(),
        legacy = fake.legacy_api_url(),
        telemetry = telemetry
            .map(|t| format!("telemetry:\n  http: \"{t}\"\n"))
            .unwrap_or_default(),
    );
    Config::parse(&yaml, &|_| None).map_err(|e| e.to_string())
}

/// `demo`: the fake Bitbucket plus the service, and a walkthrough to paste;
/// with `walkthrough`, a login as `login_as` and a refresh done at once, then exit.
#[cfg(feature = "demo")]
pub fn demo(
    addr: SocketAddr,
    telemetry: Option<SocketAddr>,
    walkthrough: bool,
    login_as: &str,
) -> Result<(), String> {
    install_crypto();
    let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    runtime()?.block_on(async move {
        let fixture = Fixture::demo();
        let fake = FakeBitbucket::start(fixture.clone())
            .await
            .map_err(|e| format!("cannot start the fake Bitbucket: {e}"))?;
        let cfg = demo_config(&fake, &fixture, addr, telemetry, &key)?;
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
        let result = walkthrough::run(addr, &redirect, login_as).await;
        let _ = stop.send(());
        let served = server
            .await
            .map_err(|e| format!("the server task failed: {e}"))?;
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
