//! The binary as an operator runs it: check-config, serve, signals, startup errors.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use bitbucket_connector::pb;
use bitbucket_connector::pb::connector_service_client::ConnectorServiceClient;
use fake_bitbucket::{Endpoint, FakeBitbucket, Fault, Fixture};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::harness::*;

const BIN: &str = env!("CARGO_BIN_EXE_bitbucket-connector");

fn write_config(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn config_for(fake: &FakeBitbucket, addr: &str, extra_top: &str) -> String {
    format!(
        "grpc:\n  addr: {addr}\n  shutdownTimeout: 5s\n{extra_top}connectorData:\n  keys: [$TEST_DATA_KEY]\nconnectors:\n- type: bitbucket-cloud\n  id: bitbucket-cloud\n  name: Bitbucket\n  config:\n    clientID: {CLIENT_ID}\n    clientSecret: $TEST_CLIENT_SECRET\n    redirectURI: {REDIRECT}\n    authURL: {}\n    tokenURL: {}\n    apiURL: {}\n    legacyAPIURL: {}\n",
        fake.auth_url(),
        fake.token_url(),
        fake.api_url(),
        fake.legacy_api_url()
    )
}

/// `serve -c CONFIG` with the test secrets in its environment; stdout and
/// stderr captured, killed if the test ends first.
fn spawn_serve(config: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new(BIN)
        .args(["serve", "-c"])
        .arg(config)
        .env("TEST_DATA_KEY", KEY_A)
        .env("TEST_CLIENT_SECRET", CLIENT_SECRET)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// The binary serving the fake with JSON logs, once SERVING; keep the config
/// file alive as long as the child.
async fn serve_json_logs() -> (
    FakeBitbucket,
    tempfile::NamedTempFile,
    tokio::process::Child,
    Channel,
) {
    let fake = FakeBitbucket::start(Fixture::demo()).await.unwrap();
    let addr = free_port();
    let f = write_config(&config_for(
        &fake,
        &addr.to_string(),
        "logger:\n  format: json\n",
    ));
    let child = spawn_serve(f.path());
    let channel = lazy_channel(addr);
    wait_serving(&mut HealthClient::new(channel.clone())).await;
    (fake, f, child, channel)
}

fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
}

/// SIGTERM, then the exit status and output (within 10 s).
async fn sigterm_and_wait(child: tokio::process::Child) -> std::process::Output {
    sigterm(&child);
    tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .unwrap()
        .unwrap()
}

/// The per-RPC lines of a JSON log (every line must be JSON).
fn rpc_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|v: &serde_json::Value| v["message"] == "rpc")
        .collect()
}

fn check_config(path: &std::path::Path) -> std::process::Output {
    Command::new(BIN)
        .args(["check-config", "-c"])
        .arg(path)
        .env_remove("TEST_UNSET_KEY_VARIABLE")
        .env_remove("TEST_UNSET_SECRET_VARIABLE")
        .output()
        .unwrap()
}

#[test]
fn check_config_prints_every_problem_and_exits_1() {
    let f = write_config(
        "grpc:\n  addr: 127.0.0.1:5557\n  shutdownTimeot: 5s\nconnectorData:\n  keys: [$TEST_UNSET_KEY_VARIABLE]\nconnectors:\n- type: bitbucket-cloud\n  id: bb\n  config:\n    clientID: x\n    clientSecret: hunter2-secret\n    redirectURI: not-a-url\n",
    );
    let out = check_config(f.path());
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [
            "grpc.shutdownTimeot: unknown key (did you mean \"shutdownTimeout\"?)",
            "connectorData.keys[0]: environment variable $TEST_UNSET_KEY_VARIABLE is not set",
            "connectors[0].config.redirectURI: \"not-a-url\" is not an absolute URL: relative URL without a base",
        ],
        "{stderr}"
    );
    assert!(
        !stderr.contains("hunter2"),
        "a secret was printed: {stderr}"
    );
    assert!(out.stdout.is_empty());
}

/// Every kind of problem in one file, reported in one run, each as
/// `path.to.key: reason`: TLS files that cannot be read alongside unset
/// variables, unknown keys, wrong types, bad values and missing keys.
#[test]
fn check_config_reports_every_kind_of_problem_at_once_in_one_line_shape() {
    let dir = tempfile::tempdir().unwrap();
    let unreadable = dir.path().join("tls.key");
    std::fs::create_dir(&unreadable).unwrap(); // exists, but is no file to read
    let missing = dir.path().join("missing.crt");
    let f = write_config(&format!(
        "grpc:\n  addr: 127.0.0.1:5557\n  tlsCert: {}\n  tlsKey: {}\n  reflection: maybe\n  shutdownTimeout: 5 seconds\nlogger:\n  level: loud\nconnectorData:\n  keys: [$TEST_UNSET_KEY_VARIABLE, not-base64!]\nconnectors:\n- type: bitbucket-cloud\n  id: bb\n  config:\n    clientID: x\n    clientSecret: $TEST_UNSET_SECRET_VARIABLE\n    includeTeamsGroups: true\n    teams: {{a: b}}\n- type: gitlab\n  id: bb\n  config:\n    clientID: y\n    clientSecret: hunter2-secret\n    redirectURI: http://127.0.0.1:5556/cb\n",
        missing.display(),
        unreadable.display()
    ));
    let out = check_config(f.path());
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    let keys: Vec<&str> = lines
        .iter()
        .map(|l| l.split_once(": ").map(|(k, _)| k).unwrap_or(l))
        .collect();
    assert_eq!(
        keys,
        [
            "grpc.tlsCert",
            "grpc.tlsKey",
            "grpc.reflection",
            "grpc.shutdownTimeout",
            "logger.level",
            "connectorData.keys[0]",
            "connectorData.keys[1]",
            "connectors[0].config.includeTeamsGroups",
            "connectors[0].config.clientSecret",
            "connectors[0].config.redirectURI",
            "connectors[0].config.teams",
            "connectors[1].type",
            "connectors[1].id",
        ],
        "{stderr}"
    );
    let shape = |l: &str| {
        let (key, reason) = l.split_once(": ").unwrap_or_default();
        !reason.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._[]".contains(c))
    };
    for l in &lines {
        assert!(shape(l), "not `path.to.key: reason`: {l}");
    }
    for expected in [
        format!("grpc.tlsCert: cannot read {}: ", missing.display()),
        format!("grpc.tlsKey: cannot read {}: ", unreadable.display()),
        "connectorData.keys[0]: environment variable $TEST_UNSET_KEY_VARIABLE is not set".into(),
        "connectors[0].config.clientSecret: environment variable $TEST_UNSET_SECRET_VARIABLE is not set".into(),
        "connectors[0].config.includeTeamsGroups: unknown key (did you mean \"includeTeamGroups\"?)".into(),
        "connectors[0].config.redirectURI: required".into(),
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(&expected)),
            "no line starting {expected:?} in\n{stderr}"
        );
    }
    assert!(
        !stderr.contains("hunter2"),
        "a secret was printed: {stderr}"
    );
}

#[test]
fn check_config_names_the_file_when_the_file_itself_is_the_problem() {
    let f = write_config("grpc: [unclosed\n");
    let out = check_config(f.path());
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("{}: invalid YAML: ", f.path().display())),
        "{stderr}"
    );

    let out = check_config(std::path::Path::new("/nonexistent/bbc.yaml"));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("/nonexistent/bbc.yaml: cannot read: "),
        "{stderr}"
    );
}

#[test]
fn check_config_without_a_config_exits_1_naming_the_option() {
    let out = Command::new(BIN)
        .arg("check-config")
        .env_remove("BITBUCKET_CONNECTOR_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--config <CONFIG>"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let help = Command::new(BIN).arg("--help").output().unwrap();
    assert_eq!(help.status.code(), Some(0));
}

#[test]
fn check_config_summarises_a_good_config_without_secrets() {
    let f = write_config(include_str!("../../examples/config-dev.yaml"));
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(f.path())
        .env("CONNECTOR_DATA_KEY", KEY_A)
        .env("BITBUCKET_CLIENT_ID", "the-client-id")
        .env("BITBUCKET_CLIENT_SECRET", "the-very-secret-secret")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.contains("\"bitbucket-cloud\"") && stdout.contains("the-client-id"),
        "{stdout}"
    );
    assert!(!stdout.contains("the-very-secret-secret") && !stdout.contains(KEY_A));
}

#[test]
fn version_is_printed() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("bitbucket-connector {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn serve_refuses_a_taken_port_with_one_clear_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fake = rt.block_on(FakeBitbucket::start(Fixture::demo())).unwrap();
    let f = write_config(&config_for(&fake, &addr.to_string(), ""));
    let out = Command::new(BIN)
        .args(["serve", "-c"])
        .arg(f.path())
        .env("TEST_DATA_KEY", KEY_A)
        .env("TEST_CLIENT_SECRET", CLIENT_SECRET)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains(&format!("grpc.addr: cannot listen on {addr}")),
        "{stderr}"
    );
}

#[test]
fn serve_reads_the_config_path_from_the_environment() {
    let out = Command::new(BIN)
        .arg("serve")
        .env("BITBUCKET_CONNECTOR_CONFIG", "/nonexistent/bbc.yaml")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/bbc.yaml: cannot read"));
}

/// The access line per RPC, as a log collector reads it: INFO without an
/// `error` field when OK, INFO with the message for a caller's mistake, WARN
/// with the message for an upstream outage.
#[tokio::test]
async fn access_lines_carry_the_error_and_warn_on_server_faults() {
    let (fake, _config, child, channel) = serve_json_logs().await;
    let mut c = ConnectorServiceClient::new(channel);
    let login_url = |callback: &str| pb::LoginUrlRequest {
        callback_url: callback.into(),
        state: "s".into(),
        ..Default::default()
    };
    c.login_url(login_url(REDIRECT)).await.unwrap();
    c.login_url(login_url("http://evil.example/cb"))
        .await
        .unwrap_err();
    fake.inject(Endpoint::Token, Fault::Status(503), Some(1));
    let err = c
        .handle_callback(pb::HandleCallbackRequest {
            raw_query: format!("code={}", fake.issue_code(CLIENT_ID, "alice")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");

    let out = sigterm_and_wait(child).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines = rpc_lines(&stderr);
    assert_eq!(lines.len(), 3, "{stderr}");
    let (ok, mistake, outage) = (&lines[0], &lines[1], &lines[2]);
    assert_eq!(
        (&ok["rpc"], &ok["code"], &ok["level"]),
        (&"LoginURL".into(), &"OK".into(), &"INFO".into()),
        "{ok}"
    );
    assert!(ok.get("error").is_none(), "{ok}");
    assert_eq!(
        (&mistake["code"], &mistake["level"]),
        (&"INVALID_ARGUMENT".into(), &"INFO".into()),
        "{mistake}"
    );
    assert!(
        mistake["error"]
            .as_str()
            .unwrap()
            .starts_with("expected callback URL \"http://evil.example/cb\" did not match"),
        "{mistake}"
    );
    assert_eq!(
        (&outage["rpc"], &outage["code"], &outage["level"]),
        (
            &"HandleCallback".into(),
            &"UNAVAILABLE".into(),
            &"WARN".into()
        ),
        "{outage}"
    );
    assert_eq!(outage["error"], err.message(), "{outage}");
}

/// SIGTERM during a slow login: health flips to NOT_SERVING, the in-flight
/// login still completes, and the process exits 0 with JSON-only logs.
#[tokio::test]
async fn sigterm_drains_in_flight_rpcs_then_exits_0() {
    let (fake, _config, mut child, channel) = serve_json_logs().await;
    let mut health = HealthClient::new(channel.clone());

    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status, 1);

    fake.inject(
        Endpoint::User,
        Fault::Delay(Duration::from_millis(800)),
        Some(1),
    );
    let code = fake.issue_code(CLIENT_ID, "alice");
    let login = tokio::spawn(async move {
        let mut req = tonic::Request::new(pb::HandleCallbackRequest {
            raw_query: format!("code={code}"),
            ..Default::default()
        });
        req.metadata_mut()
            .insert("x-request-id", "req-from-the-host-42".parse().unwrap());
        ConnectorServiceClient::new(channel)
            .handle_callback(req)
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    sigterm(&child);

    // The watch may repeat SERVING before the flip; NOT_SERVING must follow.
    let flipped = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(m)) = watch.message().await {
            if m.status == 2 {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(flipped, Ok(true), "health did not go NOT_SERVING");
    let identity = login
        .await
        .unwrap()
        .expect("the in-flight login must complete");
    assert_eq!(identity.into_inner().identity.unwrap().username, "alice");

    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let out = child.wait_with_output().await.unwrap();
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(logs.lines().count() >= 3, "{logs}");
    let mut rpc_lines = Vec::new();
    for line in logs
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
    {
        let v = serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["rpc"] == "HandleCallback" {
            rpc_lines.push(v);
        }
    }
    // One structured line per RPC: the host's request id, the connector, the
    // code, and the upstream calls it made (token, user, emails).
    assert_eq!(rpc_lines.len(), 1, "{logs}");
    let l = &rpc_lines[0];
    assert_eq!(l["request_id"], "req-from-the-host-42", "{l}");
    assert_eq!(l["connector"], "bitbucket-cloud", "{l}");
    assert_eq!(l["code"], "OK", "{l}");
    assert_eq!(l["upstream_calls"], 3, "{l}");
    assert_eq!(
        l["upstream"], "/2.0/user:1,/2.0/user/emails:1,/site/oauth2/access_token:1",
        "{l}"
    );
    assert!(l["ms"].as_f64().unwrap() >= 800.0, "{l}");
}

/// The sidecar setup: gRPC on a unix socket.
#[tokio::test]
async fn serves_on_a_unix_socket() {
    let fake = FakeBitbucket::start(Fixture::demo()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("bbc.sock");
    let f = write_config(&config_for(&fake, &format!("unix:{}", sock.display()), ""));
    let mut child = spawn_serve(f.path());
    let path = sock.clone();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }));
    let mut health = HealthClient::new(channel.clone());
    wait_serving(&mut health).await;
    let resp = ConnectorServiceClient::new(channel)
        .login_url(pb::LoginUrlRequest {
            callback_url: REDIRECT.into(),
            state: "s".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(resp.into_inner().url.starts_with(&fake.auth_url()));
    sigterm(&child);
    assert_eq!(child.wait().await.unwrap().code(), Some(0));
    assert!(!sock.exists(), "the socket file should be removed on exit");
}

/// Plaintext on a non-loopback address without authTokens: a startup warning.
#[tokio::test]
async fn plaintext_on_a_public_address_without_tokens_warns_at_startup() {
    let fake = FakeBitbucket::start(Fixture::demo()).await.unwrap();
    let port = free_port().port();
    let f = write_config(&config_for(&fake, &format!("0.0.0.0:{port}"), ""));
    let child = spawn_serve(f.path());
    let channel = lazy_channel(format!("127.0.0.1:{port}"));
    wait_serving(&mut HealthClient::new(channel)).await;
    sigterm(&child);
    let out = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("serving plaintext gRPC on a non-loopback address without grpc.authTokens"),
        "{stderr}"
    );
}

#[test]
fn with_json_logs_a_startup_error_is_one_json_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fake = rt.block_on(FakeBitbucket::start(Fixture::demo())).unwrap();
    let f = write_config(&config_for(
        &fake,
        &addr.to_string(),
        "logger:\n  format: json\n",
    ));
    let out = Command::new(BIN)
        .args(["serve", "-c"])
        .arg(f.path())
        .env("TEST_DATA_KEY", KEY_A)
        .env("TEST_CLIENT_SECRET", CLIENT_SECRET)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(v["level"], "ERROR");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains(&format!("grpc.addr: cannot listen on {addr}")),
        "{v}"
    );
}

/// `demo --walkthrough`: the whole login and refresh in one command, over the
/// binary's own gRPC port and HTTP to its fake, each step printed.
#[test]
fn demo_walkthrough_logs_in_and_refreshes_printing_each_step() {
    let out = Command::new(BIN)
        .args(["demo", "--walkthrough", "--addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let steps: Vec<&str> = stdout
        .lines()
        .filter(|l| l.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .collect();
    assert_eq!(steps.len(), 4, "{stdout}");
    assert!(steps[0].starts_with("1. LoginURL("), "{stdout}");
    assert!(steps[2].starts_with("3. HandleCallback("), "{stdout}");
    assert!(steps[3].starts_with("4. Refresh("), "{stdout}");
    assert!(
        stdout.contains("/site/oauth2/authorize?") && stdout.contains("&state=demo-state"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("redirect to {REDIRECT}?code=")),
        "{stdout}"
    );
    assert_eq!(
        stdout
            .matches(&format!("user_id:            {ALICE}"))
            .count(),
        2,
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("alice@example.com (verified: true)").count(),
        2,
        "{stdout}"
    );
    assert!(stdout.contains("wonderland/developers"), "{stdout}");
    assert!(stdout.contains("connector_data:     v1."), "{stdout}");
    assert!(
        stdout
            .trim_end()
            .ends_with("Done: the login and the refresh worked."),
        "{stdout}"
    );
}

#[test]
fn demo_walkthrough_fails_with_the_step_that_failed() {
    let out = Command::new(BIN)
        .args([
            "demo",
            "--walkthrough",
            "--addr",
            "127.0.0.1:0",
            "--login-as",
            "mallory",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the browser step failed: (fake) Bitbucket answered 400 Bad Request"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("1. LoginURL(") && !stdout.contains("2. "),
        "{stdout}"
    );
}

fn hangup(child: &tokio::process::Child) {
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
}

/// After SIGHUPs: still running, health SERVING, then SIGTERM exits 0; the
/// process's stderr is returned.
async fn survives_hangups(mut child: tokio::process::Child, channel: Channel) -> String {
    let mut health = HealthClient::new(channel);
    wait_serving(&mut health).await;
    for _ in 0..3 {
        hangup(&child);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP stopped the process"
    );
    wait_serving(&mut health).await;
    let out = sigterm_and_wait(child).await;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    stderr
}

#[tokio::test]
async fn sighup_never_stops_a_plaintext_service_and_is_logged() {
    let fake = FakeBitbucket::start(Fixture::demo()).await.unwrap();
    let addr = free_port();
    let f = write_config(&config_for(&fake, &addr.to_string(), ""));
    let channel = lazy_channel(addr);
    let stderr = survives_hangups(spawn_serve(f.path()), channel).await;
    assert_eq!(
        stderr.matches("SIGHUP received; nothing to reload").count(),
        3,
        "{stderr}"
    );
}

#[tokio::test]
async fn sighup_never_stops_a_unix_socket_service() {
    let fake = FakeBitbucket::start(Fixture::demo()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("bbc.sock");
    let f = write_config(&config_for(&fake, &format!("unix:{}", sock.display()), ""));
    let path = sock.clone();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }));
    let stderr = survives_hangups(spawn_serve(f.path()), channel).await;
    assert!(stderr.contains("SIGHUP received"), "{stderr}");
}

/// With TLS, SIGHUP re-reads the certificates (and still never stops it).
#[tokio::test]
async fn sighup_reloads_tls_certificates_without_stopping() {
    let fake = FakeBitbucket::start(Fixture::demo()).await.unwrap();
    let tls = crate::security::TlsSetup::new();
    let addr = free_port();
    let lines: String = tls
        .grpc_lines(false)
        .iter()
        .map(|l| format!("  {l}\n"))
        .collect();
    let f = write_config(&config_for(&fake, &addr.to_string(), &lines));
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(
                    &tls.server_ca.ca_pem,
                ))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect_lazy();
    let stderr = survives_hangups(spawn_serve(f.path()), channel).await;
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.contains("TLS certificates reloaded") && l.contains("SIGHUP"))
            .count(),
        3,
        "{stderr}"
    );
}

/// Refusals made before a handler runs leave an access line like any RPC,
/// with their reason; caller text in a line is clipped.
#[tokio::test]
async fn refusals_and_long_caller_strings_in_access_lines() {
    let fake = FakeBitbucket::start(Fixture::demo()).await.unwrap();
    let addr = free_port();
    let f = write_config(&config_for(
        &fake,
        &addr.to_string(),
        "  authTokens: [the-token-value]\nlogger:\n  format: json\n",
    ));
    let child = spawn_serve(f.path());
    let channel = lazy_channel(addr);
    wait_serving(&mut HealthClient::new(channel.clone())).await;
    let mut c = ConnectorServiceClient::new(channel);
    let err = c
        .login_url(pb::LoginUrlRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let mut req = tonic::Request::new(pb::LoginUrlRequest {
        callback_url: format!("http://evil.example/\n{}", "a".repeat(60_000)),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", "Bearer the-token-value".parse().unwrap());
    c.login_url(req).await.unwrap_err();

    let out = sigterm_and_wait(child).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines = rpc_lines(&stderr);
    assert_eq!(lines.len(), 2, "{stderr}");
    let (refused, long) = (&lines[0], &lines[1]);
    assert_eq!(
        (&refused["rpc"], &refused["code"], &refused["reason"]),
        (
            &"LoginURL".into(),
            &"UNAUTHENTICATED".into(),
            &"MISSING_CREDENTIALS".into()
        ),
        "{refused}"
    );
    assert_eq!(long["reason"], "CALLBACK_URL_MISMATCH", "{long}");
    let error = long["error"].as_str().unwrap();
    assert!(error.len() < 600, "{} bytes", error.len());
    assert!(!error.contains('\n'), "{error}");
    assert!(stderr.len() < 20_000, "{} bytes of log", stderr.len());
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after_name.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Out of file descriptors, the accept loop logs and backs off instead of
/// spinning; open connections keep being served, and new ones are once
/// descriptors come back.
#[tokio::test]
async fn running_out_of_descriptors_is_logged_and_backed_off() {
    let fake = FakeBitbucket::start(Fixture::demo()).await.unwrap();
    let addr = free_port();
    let f = write_config(&config_for(&fake, &addr.to_string(), ""));
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 64 && exec {BIN} serve -c {}",
            f.path().display()
        ))
        .env("TEST_DATA_KEY", KEY_A)
        .env("TEST_CLIENT_SECRET", CLIENT_SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let channel = lazy_channel(addr);
    let mut health = HealthClient::new(channel);
    wait_serving(&mut health).await;
    let mut hogs = Vec::new();
    for _ in 0..100 {
        hogs.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = child.id().unwrap();
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - before;
    // A busy accept loop burns the whole 2 s (200 ticks at 100 Hz).
    assert!(
        used < 60,
        "{used} ticks of CPU in 2 s while out of descriptors"
    );
    wait_serving(&mut health).await;
    drop(hogs);
    let fresh = lazy_channel(addr);
    wait_serving(&mut HealthClient::new(fresh)).await;
    let out = sigterm_and_wait(child).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("accept failed; backing off"), "{stderr}");
    assert!(stderr.contains("Too many open files"), "{stderr}");
}
