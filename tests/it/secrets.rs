//! Secrets never reach logs (any level, both formats), error messages or
//! metrics: a full login and refresh with trace logging, then a search of
//! everything the process wrote for every secret it handled.

use std::process::Stdio;
use std::time::Duration;

use bitbucket_connector::pb;
use bitbucket_connector::pb::connector_service_client::ConnectorServiceClient;
use fake_bitbucket::{FakeBitbucket, Fixture};

use crate::harness::*;

const CLIENT_SECRET_X: &str = "cs-7f3a9e1b2c4d5e6f";
const ADMIN_PASSWORD: &str = "admin-pw-0a1b2c3d4e5f";
const BEARER: &str = "bearer-tok-9z8y7x6w5v";

fn authed<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {BEARER}").parse().unwrap());
    r
}

async fn run(format: &str) {
    let fixture = {
        let mut f = Fixture::with_client(CLIENT_ID, CLIENT_SECRET_X, REDIRECT);
        f.admins[0].password = ADMIN_PASSWORD.to_string();
        f
    };
    let admin_user = fixture.admins[0].username.clone();
    let fake = FakeBitbucket::start(fixture).await.unwrap();
    fake.set_access_token_ttl(Duration::from_secs(10));
    let port = free_port().port();
    let telemetry = free_port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "grpc:\n  addr: 127.0.0.1:{port}\n  authTokens: [$BBC_BEARER]\ntelemetry:\n  http: {telemetry}\nlogger:\n  level: trace\n  format: {format}\nconnectorData:\n  keys: [$BBC_KEY]\nconnectors:\n- type: bitbucket-cloud\n  id: bitbucket-cloud\n  config:\n    clientID: {CLIENT_ID}\n    clientSecret: $BBC_SECRET\n    redirectURI: {REDIRECT}\n    includeTeamGroups: true\n    getWorkspacePermissions: true\n    teamGroupsAuth:\n      username: {admin_user}\n      password: $BBC_ADMIN\n    authURL: {}\n    tokenURL: {}\n    apiURL: {}\n    legacyAPIURL: {}\n",
            fake.auth_url(),
            fake.token_url(),
            fake.api_url(),
            fake.legacy_api_url()
        ),
    )
    .unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_bitbucket-connector"))
        .args(["serve", "-c"])
        .arg(&cfg)
        .env_remove("RUST_LOG")
        .env("BBC_BEARER", BEARER)
        .env("BBC_KEY", KEY_B)
        .env("BBC_SECRET", CLIENT_SECRET_X)
        .env("BBC_ADMIN", ADMIN_PASSWORD)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let channel = lazy_channel(format!("127.0.0.1:{port}"));
    let mut c = ConnectorServiceClient::new(channel);
    let mut up = false;
    for _ in 0..200 {
        if c.login_url(authed(pb::LoginUrlRequest {
            callback_url: REDIRECT.into(),
            state: "s".into(),
            ..Default::default()
        }))
        .await
        .is_ok()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(up, "the service did not come up");

    let mut errors = Vec::new();
    let mut codes = Vec::new();
    // A login with everything on, then refreshes that redeem (ttl 10 s < 30 s margin).
    let code = fake.issue_code(CLIENT_ID, "alice");
    codes.push(code.clone());
    let ident = c
        .handle_callback(authed(pb::HandleCallbackRequest {
            scopes: scopes(true, true),
            raw_query: format!("code={code}&state=s"),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .identity
        .unwrap();
    let again = c
        .refresh(authed(pb::RefreshRequest {
            scopes: scopes(true, true),
            identity: Some(ident.clone()),
            connector_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
        .identity
        .unwrap();
    // Failures: a reused code, a revoked grant, tampered data, no token.
    errors.push(
        c.handle_callback(authed(pb::HandleCallbackRequest {
            raw_query: format!("code={code}"),
            ..Default::default()
        }))
        .await
        .unwrap_err(),
    );
    fake.revoke_grants("alice");
    errors.push(
        c.refresh(authed(pb::RefreshRequest {
            scopes: scopes(false, true),
            identity: Some(again.clone()),
            connector_id: String::new(),
        }))
        .await
        .unwrap_err(),
    );
    let mut tampered = again.clone();
    let n = tampered.connector_data.len();
    tampered.connector_data[n / 2] ^= 1;
    errors.push(
        c.refresh(authed(pb::RefreshRequest {
            identity: Some(tampered),
            ..Default::default()
        }))
        .await
        .unwrap_err(),
    );
    errors.push(
        c.login_url(pb::LoginUrlRequest::default())
            .await
            .unwrap_err(),
    );
    let metrics = http_get(&format!("http://{telemetry}/metrics")).await.1;

    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        logs.lines().count() > 10,
        "trace logging produced too little: {logs}"
    );
    assert!(logs.contains("HandleCallback"), "{logs}");

    let mut secrets: Vec<String> = vec![
        CLIENT_SECRET_X.into(),
        ADMIN_PASSWORD.into(),
        BEARER.into(),
        KEY_B.into(),
        KEY_B.trim_end_matches('=').into(),
    ];
    let tokens = fake.issued_tokens();
    assert!(
        tokens.len() >= 4,
        "expected access and refresh tokens, got {}",
        tokens.len()
    );
    secrets.extend(tokens);
    secrets.extend(codes);
    let messages: String = errors
        .iter()
        .map(|e| format!("{} {:?}\n", e.message(), e))
        .collect();
    for s in &secrets {
        assert!(
            !logs.contains(s.as_str()),
            "a secret reached the {format} logs"
        );
        assert!(
            !metrics.contains(s.as_str()),
            "a secret reached the metrics"
        );
        assert!(
            !messages.contains(s.as_str()),
            "a secret reached an error message"
        );
    }
    if format == "json" {
        for line in logs.lines() {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        }
    }
}

#[tokio::test]
async fn no_secret_in_text_logs_at_trace_level() {
    run("text").await;
}

#[tokio::test]
async fn no_secret_in_json_logs_at_trace_level() {
    run("json").await;
}
