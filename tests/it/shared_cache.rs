//! `cache.redis.url`: service processes sharing one real redis-server on
//! loopback (started and stopped by the test), Redis going away mid-run, and
//! what Redis holds (never a token).

use std::process::Stdio;
use std::time::Duration;

use bitbucket_connector::pb;
use bitbucket_connector::pb::connector_service_client::ConnectorServiceClient;
use fake_bitbucket::{Endpoint, FakeBitbucket, Fixture};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;

use crate::harness::*;

const BIN: &str = env!("CARGO_BIN_EXE_bitbucket-connector");
const REDIS_PASSWORD: &str = "redis-test-password-7f3a";

/// A redis-server of its own on a free loopback port, with a password, no
/// persistence; killed on drop.
struct Redis {
    child: std::process::Child,
    port: u16,
}

impl Redis {
    async fn start() -> Redis {
        let port = free_port().port();
        let mut child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--requirepass", REDIS_PASSWORD])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("redis-server cannot be started ({e}): run scripts/install-test-deps")
            });
        for _ in 0..250 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Redis { child, port };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("redis-server did not listen on {port}");
    }

    fn url(&self) -> String {
        format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{}/0", self.port)
    }

    /// Every key and its value (all are strings).
    async fn dump(&self) -> Vec<(String, String)> {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut out = Vec::new();
        for k in keys {
            let v: String = redis::cmd("GET")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .unwrap();
            out.push((k, v));
        }
        out
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One service process: its config file, gRPC channel and telemetry address.
struct Service {
    child: tokio::process::Child,
    _config: tempfile::NamedTempFile,
    channel: Channel,
    telemetry: std::net::SocketAddr,
}

impl Service {
    async fn start(fake: &FakeBitbucket, redis_port: u16) -> Service {
        use std::io::Write as _;
        let addr = free_port();
        let telemetry = free_port();
        let config = format!(
            "grpc:\n  addr: {addr}\ntelemetry:\n  http: {telemetry}\ncache:\n  redis:\n    url: redis://:${{REDIS_PASSWORD}}@127.0.0.1:{redis_port}/0\nconnectorData:\n  keys: [$TEST_DATA_KEY]\nconnectors:\n- type: bitbucket-cloud\n  id: bitbucket-cloud\n  name: Bitbucket\n  config:\n    clientID: {CLIENT_ID}\n    clientSecret: $TEST_CLIENT_SECRET\n    redirectURI: {REDIRECT}\n    authURL: {}\n    tokenURL: {}\n    apiURL: {}\n    legacyAPIURL: {}\n    includeTeamGroups: true\n    getWorkspacePermissions: true\n    refreshCacheTTL: 5m\n",
            fake.auth_url(),
            fake.token_url(),
            fake.api_url(),
            fake.legacy_api_url()
        );
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(config.as_bytes()).unwrap();
        let child = tokio::process::Command::new(BIN)
            .args(["serve", "-c"])
            .arg(f.path())
            .env("TEST_DATA_KEY", KEY_A)
            .env("TEST_CLIENT_SECRET", CLIENT_SECRET)
            .env("REDIS_PASSWORD", REDIS_PASSWORD)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let channel = lazy_channel(addr);
        wait_serving(&mut HealthClient::new(channel.clone())).await;
        Service {
            child,
            _config: f,
            channel,
            telemetry,
        }
    }

    async fn login(&self, fake: &FakeBitbucket, user: &str) -> Result<pb::Identity, tonic::Status> {
        ConnectorServiceClient::new(self.channel.clone())
            .handle_callback(pb::HandleCallbackRequest {
                scopes: scopes(true, true),
                raw_query: format!("code={}&state=s", fake.issue_code(CLIENT_ID, user)),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().identity.unwrap())
    }

    async fn refresh(&self, identity: pb::Identity) -> Result<pb::Identity, tonic::Status> {
        ConnectorServiceClient::new(self.channel.clone())
            .refresh(pb::RefreshRequest {
                scopes: scopes(true, true),
                identity: Some(identity),
                connector_id: String::new(),
            })
            .await
            .map(|r| r.into_inner().identity.unwrap())
    }

    async fn metrics(&self) -> String {
        http_get(&format!("http://{}/metrics", self.telemetry))
            .await
            .1
    }

    /// SIGTERM, then everything it wrote to stdout and stderr.
    async fn stop(self) -> String {
        let pid = self.child.id().unwrap().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        let out = tokio::time::timeout(Duration::from_secs(15), self.child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

fn group_and_permission_hits(fake: &FakeBitbucket) -> (u64, u64) {
    (fake.hits(Endpoint::Groups), fake.hits(Endpoint::Permission))
}

#[tokio::test]
async fn a_second_process_on_the_same_redis_serves_a_login_without_group_or_permission_calls() {
    let redis = Redis::start().await;
    let fake = FakeBitbucket::start(Fixture::demo()).await.unwrap();
    let a = Service::start(&fake, redis.port).await;
    let b = Service::start(&fake, redis.port).await;

    let first = a.login(&fake, "alice").await.unwrap();
    let cold = group_and_permission_hits(&fake);
    assert_eq!(cold, (1, 2), "alice's cold login at a");

    let second = b.login(&fake, "alice").await.unwrap();
    assert_eq!(second.groups, first.groups);
    assert_eq!(group_and_permission_hits(&fake), cold, "b asked again");

    // b refreshes what a handed out: the refresh identity is shared too.
    let before = fake.total_hits();
    let refreshed = b.refresh(first.clone()).await.unwrap();
    assert_eq!(fake.total_hits(), before, "refresh at b went upstream");
    assert_eq!(refreshed.groups, first.groups);

    let m = b.metrics().await;
    for cache in ["groups", "permission", "refresh"] {
        let hits = metric(
            &m,
            &format!(r#"bitbucket_connector_cache_requests_total{{cache="{cache}",result="hit"}}"#),
        );
        assert!(hits.is_some_and(|h| h >= 1.0), "{cache} at b:\n{m}");
    }

    // Redis holds group and permission data and identities, never a secret.
    let entries = redis.dump().await;
    assert!(entries.len() >= 4, "{entries:?}");
    let mut secrets: Vec<String> = fake.issued_tokens();
    assert!(!secrets.is_empty());
    secrets.push(CLIENT_SECRET.to_string());
    secrets.push(KEY_A.to_string());
    secrets.push(REDIS_PASSWORD.to_string());
    for identity in [&first, &second, &refreshed] {
        secrets.push(String::from_utf8_lossy(&identity.connector_data).into_owned());
    }
    for (k, v) in &entries {
        assert!(k.starts_with("bbc:bitbucket-cloud:"), "{k}");
        for s in &secrets {
            assert!(
                !k.contains(s.as_str()) && !v.contains(s.as_str()),
                "a secret in {k} = {v}"
            );
        }
    }
    assert!(
        entries
            .iter()
            .any(|(k, v)| k.starts_with("bbc:bitbucket-cloud:permission:") && v.contains("member")),
        "{entries:?}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn with_redis_stopped_mid_run_logins_still_succeed_with_a_warning_and_a_metric() {
    let mut redis = Redis::start().await;
    let fake = FakeBitbucket::start(Fixture::demo()).await.unwrap();
    let svc = Service::start(&fake, redis.port).await;
    let first = svc.login(&fake, "alice").await.unwrap();

    redis.stop();
    let started = std::time::Instant::now();
    let again = svc.login(&fake, "alice").await.unwrap();
    assert_eq!(again.groups, first.groups);
    let bob = svc.login(&fake, "bob").await.unwrap();
    assert!(
        bob.groups.iter().any(|g| g == "wonderland:member"),
        "{bob:?}"
    );
    let refreshed = svc.refresh(first.clone()).await.unwrap();
    assert_eq!(refreshed.groups, first.groups);
    assert!(started.elapsed() < Duration::from_secs(10));

    let m = svc.metrics().await;
    let errors: f64 = ["groups", "permission", "refresh"]
        .iter()
        .filter_map(|c| {
            metric(
                &m,
                &format!(
                    r#"bitbucket_connector_cache_requests_total{{cache="{c}",result="error"}}"#
                ),
            )
        })
        .sum();
    assert!(errors >= 1.0, "{m}");
    let logs = svc.stop().await;
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("shared cache (Redis) unreachable"))
        .collect();
    assert!(!warnings.is_empty(), "{logs}");
    assert!(warnings.iter().all(|l| l.contains("WARN")), "{warnings:?}");
    assert!(!logs.contains(REDIS_PASSWORD), "{logs}");
}
