//! Issue 5: who may call us (TLS, mTLS, bearer tokens), limits, hostile input.

use std::time::Duration;

use bitbucket_connector::pb;
use bitbucket_connector::pb::connector_service_client::ConnectorServiceClient;
use fake_bitbucket::{Endpoint, Fault};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::harness::*;

pub struct Pki {
    pub ca_pem: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Pki {
            ca_pem: issuer.pem(),
            issuer,
        }
    }

    /// (certificate PEM, key PEM) for these names.
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

pub struct TlsSetup {
    pub dir: tempfile::TempDir,
    pub server_ca: Pki,
    pub client_ca: Pki,
}

impl TlsSetup {
    pub fn new() -> TlsSetup {
        let dir = tempfile::tempdir().unwrap();
        let server_ca = Pki::new("server CA");
        let client_ca = Pki::new("client CA");
        let (cert, key) = server_ca.leaf(&["localhost", "127.0.0.1"]);
        std::fs::write(dir.path().join("tls.crt"), cert).unwrap();
        std::fs::write(dir.path().join("tls.key"), key).unwrap();
        std::fs::write(dir.path().join("client-ca.crt"), &client_ca.ca_pem).unwrap();
        TlsSetup {
            dir,
            server_ca,
            client_ca,
        }
    }

    pub fn grpc_lines(&self, mtls: bool) -> Vec<String> {
        let p = |f: &str| self.dir.path().join(f).display().to_string();
        let mut v = vec![
            format!("tlsCert: {}", p("tls.crt")),
            format!("tlsKey: {}", p("tls.key")),
        ];
        if mtls {
            v.push(format!("tlsClientCA: {}", p("client-ca.crt")));
        }
        v
    }
}

async fn tls_channel(
    env: &Env,
    ca_pem: &str,
    client: Option<(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://localhost:{}", env.addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

async fn check(channel: Channel) -> Result<i32, tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|r| r.into_inner().status)
}

async fn start_tls(tls: &TlsSetup, mtls: bool) -> Env {
    Setup {
        grpc: tls.grpc_lines(mtls),
        ..Setup::default()
    }
    .start_plain_probe(false)
    .await
}

#[tokio::test]
async fn tls_serves_to_a_client_that_verifies_the_certificate() {
    let tls = TlsSetup::new();
    let env = start_tls(&tls, false).await;
    let ch = tls_channel(&env, &tls.server_ca.ca_pem, None)
        .await
        .unwrap();
    assert_eq!(check(ch.clone()).await.unwrap(), 1);
    let url = ConnectorServiceClient::new(ch)
        .login_url(pb::LoginUrlRequest {
            callback_url: REDIRECT.into(),
            state: "s".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(url.into_inner().url.starts_with("http://127.0.0.1"));
    // A client trusting another CA refuses the server.
    let other = Pki::new("other");
    assert!(tls_channel(&env, &other.ca_pem, None).await.is_err());
}

#[tokio::test]
async fn mtls_refuses_clients_without_a_certificate_from_the_client_ca() {
    let tls = TlsSetup::new();
    let env = start_tls(&tls, true).await;
    // No client certificate: refused at the handshake.
    let no_cert = match tls_channel(&env, &tls.server_ca.ca_pem, None).await {
        Err(_) => true,
        Ok(ch) => check(ch).await.is_err(),
    };
    assert!(no_cert, "a client without a certificate was served");
    // A certificate from another CA: refused.
    let rogue = Pki::new("rogue CA").leaf(&["client"]);
    let rogue_ok = match tls_channel(&env, &tls.server_ca.ca_pem, Some(rogue)).await {
        Err(_) => false,
        Ok(ch) => check(ch).await.is_ok(),
    };
    assert!(!rogue_ok, "a client signed by another CA was served");
    // The right client certificate: served.
    let good = tls.client_ca.leaf(&["identity-server"]);
    let ch = tls_channel(&env, &tls.server_ca.ca_pem, Some(good))
        .await
        .unwrap();
    assert_eq!(check(ch).await.unwrap(), 1);
}

fn with_token(token: Option<&str>) -> tonic::Request<pb::LoginUrlRequest> {
    let mut req = tonic::Request::new(pb::LoginUrlRequest {
        callback_url: REDIRECT.into(),
        state: "s".into(),
        ..Default::default()
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", t.parse().unwrap());
    }
    req
}

#[tokio::test]
async fn bearer_tokens_guard_the_connector_but_not_health_or_reflection() {
    let env = Setup::default()
        .grpc("authTokens: [first-token-value, second-token-value]")
        .start()
        .await;
    let mut c = env.client();
    let err = c.login_url(with_token(None)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(reason(&err), "MISSING_CREDENTIALS");
    let err = c
        .login_url(with_token(Some("Bearer wrong-token-value")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(reason(&err), "INVALID_CREDENTIALS");
    assert!(!err.message().contains("first-token-value"));
    let err = c
        .login_url(with_token(Some("first-token-value")))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::Unauthenticated,
        "the Bearer scheme is required"
    );
    c.login_url(with_token(Some("Bearer first-token-value")))
        .await
        .unwrap();
    c.login_url(with_token(Some("Bearer second-token-value")))
        .await
        .unwrap();
    // Orchestrators and `grpcurl list` need no token.
    assert_eq!(env.health_status("").await.unwrap(), 1);
    let mut h = HealthClient::new(env.channel.clone());
    h.check(HealthCheckRequest {
        service: String::new(),
    })
    .await
    .unwrap();
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(env.channel.clone())
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    assert!(
        matches!(
            answer.message_response,
            Some(MessageResponse::ListServicesResponse(_))
        ),
        "{answer:?}"
    );
}

#[tokio::test]
async fn an_oversized_request_is_resource_exhausted_and_the_server_stays_up() {
    let env = Setup::default().grpc("maxRequestBytes: 4096").start().await;
    let err = env
        .callback(&format!("code={}", "a".repeat(10_000)), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    env.assert_serving().await;
    // Under the message cap but over the raw_query cap (8 KiB): INVALID_ARGUMENT.
    let env = Setup::default().start().await;
    let err = env
        .callback(&format!("code={}", "a".repeat(9_000)), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(reason(&err), "MALFORMED_CALLBACK");
    env.assert_serving().await;
}

#[tokio::test]
async fn rpcs_beyond_max_in_flight_are_resource_exhausted() {
    let env = Setup::default().grpc("maxInFlight: 2").start().await;
    env.fake.set_delay(Duration::from_millis(300));
    let mut calls = Vec::new();
    for _ in 0..6 {
        let code = env.code("alice");
        let mut c = env.client();
        calls.push(tokio::spawn(async move {
            c.handle_callback(pb::HandleCallbackRequest {
                raw_query: format!("code={code}"),
                ..Default::default()
            })
            .await
        }));
    }
    let mut ok = 0;
    let mut exhausted = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) if e.code() == Code::ResourceExhausted => {
                assert_eq!(reason(&e), "TOO_MANY_REQUESTS");
                exhausted += 1
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(ok, 2, "exactly maxInFlight calls are served at once");
    assert_eq!(exhausted, 4);
    env.fake.set_delay(Duration::ZERO);
    env.login("alice", None).await.unwrap();
}

#[tokio::test]
async fn default_timeout_bounds_an_rpc_whose_caller_sets_none() {
    let env = Setup::default().grpc("defaultTimeout: 300ms").start().await;
    env.fake
        .inject(Endpoint::User, Fault::Delay(Duration::from_secs(3)), None);
    let started = std::time::Instant::now();
    // The caller sends no grpc-timeout and its channel has no timer: only
    // the service's defaultTimeout can end this RPC.
    let err = env.login("alice", None).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(reason(&err), "DEADLINE_EXCEEDED", "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    env.assert_serving().await;
}

/// New certificates are picked up on SIGHUP without dropping the server or
/// its open connections.
#[tokio::test]
async fn certificates_reload_on_sighup_without_dropping_connections() {
    use fake_bitbucket::{FakeBitbucket, Fixture};
    let fake = FakeBitbucket::start(Fixture::demo()).await.unwrap();
    let tls = TlsSetup::new();
    let port = free_port().port();
    let lines = tls.grpc_lines(false).join("\n  ");
    let config = format!(
        "grpc:\n  addr: 127.0.0.1:{port}\n  {lines}\nconnectorData:\n  keys: [{KEY_A}]\nconnectors:\n- type: bitbucket-cloud\n  id: bb\n  config:\n    clientID: {CLIENT_ID}\n    clientSecret: {CLIENT_SECRET}\n    redirectURI: {REDIRECT}\n    apiURL: {}\n",
        fake.api_url()
    );
    let cfg_path = tls.dir.path().join("config.yaml");
    std::fs::write(&cfg_path, config).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_bitbucket-connector"))
        .args(["serve", "-c"])
        .arg(&cfg_path)
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let probe = port;
    let mut old_channel = None;
    for _ in 0..100 {
        if let Ok(ch) = tls_channel_to(probe, &tls.server_ca.ca_pem).await {
            old_channel = Some(ch);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let old_channel = old_channel.expect("the TLS server did not come up");
    assert_eq!(check(old_channel.clone()).await.unwrap(), 1);

    let new_ca = Pki::new("rotated CA");
    let (cert, key) = new_ca.leaf(&["localhost"]);
    std::fs::write(tls.dir.path().join("tls.crt"), cert).unwrap();
    std::fs::write(tls.dir.path().join("tls.key"), key).unwrap();
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());

    let mut rotated = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(ch) = tls_channel_to(probe, &new_ca.ca_pem).await {
            assert_eq!(check(ch).await.unwrap(), 1);
            rotated = true;
            break;
        }
    }
    assert!(rotated, "the new certificate was not served after SIGHUP");
    assert!(
        tls_channel_to(probe, &tls.server_ca.ca_pem).await.is_err(),
        "new connections still get the old certificate"
    );
    assert_eq!(
        check(old_channel).await.unwrap(),
        1,
        "an open connection was dropped"
    );
    assert!(child.try_wait().unwrap().is_none(), "the server exited");
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert_eq!(child.wait().await.unwrap().code(), Some(0));
}

async fn tls_channel_to(port: u16, ca_pem: &str) -> Result<Channel, tonic::transport::Error> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    Channel::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
}

/// TLS handshakes in progress at once are capped (64, each within 10 s,
/// its wait for a slot included): with every slot held by a connection that
/// never sends a ClientHello, a real client's handshake waits until their
/// time is up and a slot frees, then completes; the service answers SERVING
/// and the silent connections are closed.
#[tokio::test]
async fn tls_handshakes_at_once_are_capped_and_a_client_waits_for_a_free_slot() {
    const CAP: usize = 64;
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    let tls = TlsSetup::new();
    let env = start_tls(&tls, false).await;
    let mut silent = Vec::new();
    for _ in 0..CAP {
        silent.push(tokio::net::TcpStream::connect(env.addr).await.unwrap());
    }
    let opened = std::time::Instant::now();
    // Their handshakes hold every slot; the client arrives well after them,
    // so a slot frees (at their timeout) before its own time is up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let client = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&tls.server_ca.ca_pem))
        .domain_name("localhost");
    let ch = Channel::from_shared(format!("https://localhost:{}", env.addr.port()))
        .unwrap()
        .tls_config(client)
        .unwrap()
        .connect_timeout(Duration::from_secs(20))
        .connect()
        .await
        .unwrap();
    let waited = opened.elapsed();
    assert!(
        waited >= HANDSHAKE_TIMEOUT - Duration::from_millis(500),
        "handshake done after {waited:?}, before a slot could free"
    );
    assert_eq!(check(ch).await.unwrap(), 1);
    // The silent ones were dropped at their time limit.
    for mut tcp in silent {
        use tokio::io::AsyncReadExt as _;
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
    }
}
