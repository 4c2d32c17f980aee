//! Starts the service (in-process, on a real loopback port) against a fresh
//! fake Bitbucket, and talks to it with the generated gRPC client.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bitbucket_connector::config::{decode_key, Config, ConnectorConfig, ListenAddr};
use bitbucket_connector::pb;
use bitbucket_connector::pb::connector_service_client::ConnectorServiceClient;
use bitbucket_connector::secret::Secret;
use bitbucket_connector::server::{self, App, Listener};
use bitbucket_connector::startup::StartupError;
use fake_bitbucket::{FakeBitbucket, Fixture};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

pub const REDIRECT: &str = "http://127.0.0.1:5556/dex/callback";
pub const CLIENT_ID: &str = "demo-client";
pub const CLIENT_SECRET: &str = "demo-secret";
pub const KEY_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
pub const KEY_B: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
pub const ALICE: &str = "{8c7e2f4a-3b1d-4e6f-9a0b-a11ce0000001}";

/// What to put in the config besides the fake's endpoints.
#[derive(Clone)]
pub struct Setup {
    pub fixture: Fixture,
    /// Extra lines under `connectors[0].config` (YAML, no indentation).
    pub connector: Vec<String>,
    /// Extra lines under `grpc` (YAML, no indentation).
    pub grpc: Vec<String>,
    pub keys: Vec<String>,
    pub accept_dex_plaintext: bool,
    /// A second connector, `second`, on the same fake.
    pub second_connector: bool,
    pub telemetry: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            fixture: Fixture::demo(),
            connector: Vec::new(),
            grpc: Vec::new(),
            keys: vec![KEY_A.to_string()],
            accept_dex_plaintext: false,
            second_connector: false,
            telemetry: false,
        }
    }
}

impl Setup {
    pub fn connector(mut self, line: &str) -> Self {
        self.connector.push(line.to_string());
        self
    }
    pub fn grpc(mut self, line: &str) -> Self {
        self.grpc.push(line.to_string());
        self
    }
    pub fn keys(mut self, keys: &[&str]) -> Self {
        self.keys = keys.iter().map(|k| k.to_string()).collect();
        self
    }

    pub async fn start(self) -> Env {
        self.start_plain_probe(true).await
    }

    /// `probe = false` for servers that plaintext health checks cannot reach (TLS).
    pub async fn start_plain_probe(self, probe: bool) -> Env {
        let fake = FakeBitbucket::start(self.fixture.clone()).await.unwrap();
        self.start_inner(fake, probe).await
    }

    /// The service against an already running fake (to restart the service
    /// with another config while the fake keeps its tokens).
    pub async fn start_with(self, fake: FakeBitbucket) -> Env {
        self.start_inner(fake, true).await
    }

    async fn start_inner(self, fake: FakeBitbucket, probe: bool) -> Env {
        let telemetry = self.telemetry.then(free_port);
        let app = App::new(self.config(&fake, telemetry)).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(app, Listener::Tcp(listener), async {
            let _ = stopped.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let env = Env {
            fake,
            addr,
            channel,
            telemetry,
            stop: Some(stop),
            task: Some(task),
        };
        if probe {
            env.wait_serving().await;
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        env
    }

    /// The service's config, built in Rust; through the YAML file format
    /// when a test gave raw YAML lines.
    fn config(&self, fake: &FakeBitbucket, telemetry: Option<SocketAddr>) -> Config {
        if !self.connector.is_empty() || !self.grpc.is_empty() {
            let yaml = self.yaml(fake, telemetry);
            return Config::parse(&yaml, &|_| None).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        }
        let connector = |id: &str| {
            ConnectorConfig {
                name: "Bitbucket".to_string(),
                upstream_timeout: Duration::from_secs(2),
                ..ConnectorConfig::new(id, CLIENT_ID, Secret::new(CLIENT_SECRET), REDIRECT)
            }
            .with_endpoints(
                &fake.auth_url(),
                &fake.token_url(),
                &fake.api_url(),
                &fake.legacy_api_url(),
            )
            .unwrap()
        };
        let mut connectors = vec![connector("bitbucket-cloud")];
        if self.second_connector {
            connectors.push(connector("second"));
        }
        let keys = self.keys.iter().map(|k| decode_key(k).unwrap()).collect();
        let mut cfg = Config::new(keys, connectors);
        cfg.grpc.addr = ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 0)));
        cfg.connector_data.accept_dex_plaintext = self.accept_dex_plaintext;
        cfg.logger.level = tracing::Level::DEBUG;
        cfg.telemetry.http = telemetry;
        cfg
    }

    fn yaml(&self, fake: &FakeBitbucket, telemetry: Option<SocketAddr>) -> String {
        let indent = |lines: &[String], n: usize| {
            lines
                .iter()
                .map(|l| format!("{}{l}\n", " ".repeat(n)))
                .collect::<String>()
        };
        let connector = |id: &str, extra: &[String]| {
            // Extra lines may override the harness's upstreamTimeout.
            let timeout = if extra.iter().any(|l| l.starts_with("upstreamTimeout:")) {
                ""
            } else {
                "    upstreamTimeout: 2s\n"
            };
            format!(
                "- type: bitbucket-cloud\n  id: {id}\n  name: Bitbucket\n  config:\n    clientID: {CLIENT_ID}\n    clientSecret: {CLIENT_SECRET}\n    redirectURI: {REDIRECT}\n    authURL: {}\n    tokenURL: {}\n    apiURL: {}\n    legacyAPIURL: {}\n{timeout}{}",
                fake.auth_url(),
                fake.token_url(),
                fake.api_url(),
                fake.legacy_api_url(),
                indent(extra, 4)
            )
        };
        let mut y = format!(
            "grpc:\n  addr: 127.0.0.1:0\n{}connectorData:\n  keys: [{}]\n  acceptDexPlaintext: {}\nlogger:\n  level: debug\n",
            indent(&self.grpc, 2),
            self.keys.join(", "),
            self.accept_dex_plaintext
        );
        if let Some(t) = telemetry {
            y.push_str(&format!("telemetry:\n  http: {t}\n"));
        }
        y.push_str("connectors:\n");
        y.push_str(&connector("bitbucket-cloud", &self.connector));
        if self.second_connector {
            y.push_str(&connector("second", &[]));
        }
        y
    }
}

pub fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

pub struct Env {
    pub fake: FakeBitbucket,
    pub addr: SocketAddr,
    pub channel: Channel,
    pub telemetry: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), StartupError>>>,
}

pub fn scopes(offline_access: bool, groups: bool) -> Option<pb::Scopes> {
    Some(pb::Scopes {
        offline_access,
        groups,
    })
}

impl Env {
    pub async fn start() -> Env {
        Setup::default().start().await
    }

    pub fn client(&self) -> ConnectorServiceClient<Channel> {
        ConnectorServiceClient::new(self.channel.clone())
    }

    pub fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel.clone())
    }

    pub async fn health_status(&self, service: &str) -> Result<i32, tonic::Status> {
        self.health()
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .map(|r| r.into_inner().status)
    }

    async fn wait_serving(&self) {
        for _ in 0..200 {
            if self.health_status("").await.ok() == Some(1) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the service did not become SERVING");
    }

    /// The service still answers health checks with SERVING.
    pub async fn assert_serving(&self) {
        assert_eq!(
            self.health_status("").await.unwrap(),
            1,
            "health is not SERVING"
        );
        assert_eq!(
            self.health_status("connector.v1.ConnectorService")
                .await
                .unwrap(),
            1
        );
    }

    pub fn code(&self, user: &str) -> String {
        self.fake.issue_code(CLIENT_ID, user)
    }

    pub async fn callback(
        &self,
        raw_query: &str,
        scopes: Option<pb::Scopes>,
    ) -> Result<pb::Identity, tonic::Status> {
        self.client()
            .handle_callback(pb::HandleCallbackRequest {
                scopes,
                raw_query: raw_query.to_string(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().identity.unwrap())
    }

    /// A login as `user` without the browser: a code minted at the fake.
    pub async fn login(
        &self,
        user: &str,
        scopes: Option<pb::Scopes>,
    ) -> Result<pb::Identity, tonic::Status> {
        let q = format!("code={}&state=s", self.code(user));
        self.callback(&q, scopes).await
    }

    pub async fn refresh(
        &self,
        identity: pb::Identity,
        scopes: Option<pb::Scopes>,
    ) -> Result<pb::Identity, tonic::Status> {
        self.client()
            .refresh(pb::RefreshRequest {
                scopes,
                identity: Some(identity),
                connector_id: String::new(),
            })
            .await
            .map(|r| r.into_inner().identity.unwrap())
    }

    pub async fn metrics(&self) -> String {
        let addr = self.telemetry.expect("Setup.telemetry = true");
        http_get(&format!("http://{addr}/metrics")).await.1
    }

    /// Stops the service (drain included) and hands back the fake.
    pub async fn stop(mut self) -> FakeBitbucket {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
        self.fake.clone()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// The value of one sample line of the Prometheus text, if present.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The ErrorInfo reason of a status.
pub fn reason(s: &tonic::Status) -> String {
    use tonic_types::StatusExt as _;
    s.get_details_error_info()
        .map(|i| {
            assert_eq!(i.domain, "bitbucket-connector");
            i.reason
        })
        .unwrap_or_default()
}

/// A minimal HTTP/1.1 GET on loopback: (status, body).
pub async fn http_get(url: &str) -> (u16, String) {
    bitbucket_connector::install_crypto();
    let resp = reqwest::Client::new().get(url).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// The generated client over plain HTTP/2 (hyper), without tonic's Channel:
/// a `grpc-timeout` it sends starts no timer on this side, so only the
/// service can enforce it.
pub type ClientWithoutTimer = ConnectorServiceClient<
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        tonic::body::Body,
    >,
>;

impl Env {
    pub fn client_without_timer(&self) -> ClientWithoutTimer {
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build_http();
        let origin = format!("http://{}", self.addr).parse().unwrap();
        ConnectorServiceClient::with_origin(http, origin)
    }
}

/// The code and ErrorInfo reason of a status, both as expected.
pub fn assert_status(err: &tonic::Status, code: tonic::Code, why: &str) {
    assert_eq!(err.code(), code, "{err:?}");
    assert_eq!(reason(err), why, "{err:?}");
}

/// A channel to a service process that may not listen yet.
pub fn lazy_channel(addr: impl std::fmt::Display) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy()
}

/// Waits (up to 6 s) until the overall health status is SERVING.
pub async fn wait_serving(health: &mut HealthClient<Channel>) {
    for _ in 0..300 {
        let r = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await;
        if r.is_ok_and(|r| r.into_inner().status == 1) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not serving");
}
