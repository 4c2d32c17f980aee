//! `bitbucket-connector fake-bitbucket`: the fake alone in its own process,
//! for end-to-end tests that run dex, the service and the fake separately
//! and drive the fake through its control API (`control`).

use std::io::Write as _;

use super::*;

/// The flags of `fake-bitbucket`.
#[derive(clap::Args, Debug)]
pub struct StandaloneArgs {
    /// Where to listen (port 0: a free one). The control API has no
    /// authentication: keep this on loopback.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub addr: SocketAddr,
    /// The OAuth consumer's key.
    #[arg(long, default_value = DEMO_CLIENT_ID)]
    pub client_id: String,
    /// The OAuth consumer's secret.
    #[arg(long, default_value = DEMO_CLIENT_SECRET)]
    pub client_secret: String,
    /// The OAuth consumer's callback URL.
    #[arg(long, default_value = DEMO_REDIRECT_URI, value_parser = parse_redirect)]
    pub redirect_uri: String,
    /// Another OAuth consumer, as ID:SECRET:REDIRECT_URI (repeatable).
    #[arg(long = "client", value_name = "ID:SECRET:REDIRECT_URI", value_parser = parse_client)]
    pub clients: Vec<OAuthClient>,
    /// Add user `wide` (wide@example.com), member of N more workspaces
    /// ws-01..ws-NN (owner of ws-01), each with groups `team` {wide} and
    /// `others` {}.
    #[arg(long, value_name = "N")]
    pub wide_user: Option<usize>,
}

/// The uuid of the `--wide-user` user.
pub const WIDE_UUID: &str = "{7e57a1de-0000-4000-8000-000000000001}";

fn parse_redirect(s: &str) -> Result<String, String> {
    match url::Url::parse(s) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => Ok(s.to_owned()),
        _ => Err(format!("{s:?} is not an absolute http(s) URL")),
    }
}

fn parse_client(s: &str) -> Result<OAuthClient, String> {
    let mut parts = s.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(id), Some(secret), Some(redirect)) if !id.is_empty() && !secret.is_empty() => {
            Ok(OAuthClient {
                client_id: id.to_owned(),
                client_secret: secret.to_owned(),
                redirect_uri: parse_redirect(redirect)?,
            })
        }
        _ => Err("expected ID:SECRET:REDIRECT_URI".to_owned()),
    }
}

impl StandaloneArgs {
    /// [`Fixture::demo`] with these consumers (the first from
    /// `--client-id`/`--client-secret`/`--redirect-uri`) and the wide user.
    pub fn fixture(&self) -> Fixture {
        let mut fixture = Fixture::with_client(
            self.client_id.clone(),
            self.client_secret.clone(),
            self.redirect_uri.clone(),
        );
        fixture.clients.extend(self.clients.iter().cloned());
        if let Some(n) = self.wide_user {
            add_wide_user(&mut fixture, n);
        }
        fixture
    }
}

/// Adds user `wide` (uuid [`WIDE_UUID`], username and nickname `wide`, email
/// `wide@example.com` confirmed and primary) and `n` workspaces `ws-01`..:
/// `wide` is their only member (owner of `ws-01`, `member` of the others),
/// each with groups `team` {wide} and `others` {}.
pub fn add_wide_user(fixture: &mut Fixture, n: usize) {
    fixture.users.push(User {
        uuid: WIDE_UUID.to_owned(),
        username: Some("wide".to_owned()),
        nickname: "wide".to_owned(),
        display_name: "Wide Member".to_owned(),
        account_id: "712020:7e57a1de-0000-4000-8000-000000000001".to_owned(),
        emails: vec![Email {
            email: "wide@example.com".to_owned(),
            is_primary: true,
            is_confirmed: true,
        }],
    });
    for i in 1..=n {
        let slug = format!("ws-{i:02}");
        fixture.workspaces.push(Workspace {
            uuid: format!("{{7e57a1de-0001-4000-8000-{i:012}}}"),
            name: format!("Workspace {i:02}"),
            members: vec![Membership {
                user_uuid: WIDE_UUID.to_owned(),
                permission: if i == 1 { "owner" } else { "member" }.to_owned(),
            }],
            groups: vec![
                Group {
                    slug: "team".to_owned(),
                    name: "Team".to_owned(),
                    members: vec![WIDE_UUID.to_owned()],
                },
                Group {
                    slug: "others".to_owned(),
                    name: "Others".to_owned(),
                    members: Vec::new(),
                },
            ],
            slug,
        });
    }
}

/// Serves the fake until SIGTERM/SIGINT. Once listening, prints exactly one
/// line to stdout, `fake-bitbucket listening on http://127.0.0.1:PORT`.
pub fn serve_standalone(args: StandaloneArgs) -> Result<(), String> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let fixture = args.fixture();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        // Before the line is printed, so that a signal sent as soon as it is
        // read is handled.
        let stop = stop_signal()?;
        let fake = FakeBitbucket::start_on(args.addr, fixture)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", args.addr))?;
        if !args.addr.ip().is_loopback() {
            tracing::warn!(addr = %args.addr, "fake-bitbucket: the control API (/_fake/) has no authentication and this is not a loopback address");
        }
        let mut out = std::io::stdout().lock();
        writeln!(out, "fake-bitbucket listening on {}", fake.base_url())
            .and_then(|()| out.flush())
            .map_err(|e| format!("cannot write to stdout: {e}"))?;
        drop(out);
        stop.await;
        fake.shutdown().await;
        Ok(())
    })
}

/// Registers SIGTERM and SIGINT now; the future resolves on either.
fn stop_signal() -> Result<impl std::future::Future<Output = ()>, String> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let register = |kind| signal(kind).map_err(|e| format!("cannot handle signals: {e}"));
        let mut term = register(SignalKind::terminate())?;
        let mut int = register(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
