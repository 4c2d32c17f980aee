//! Issue 13: hostile and broken callers cost bounded resources; every refusal
//! carries an ErrorInfo, is logged and counted. Raw HTTP/2 (the `h2` crate)
//! where a well-behaved client cannot misbehave enough.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bitbucket_connector::pb;
use bytes::Bytes;
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::harness::*;

const LOGIN_URL: &str = "/connector.v1.ConnectorService/LoginURL";

/// A raw HTTP/2 connection to the service.
async fn h2_connect(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send.ready().await.unwrap()
}

/// The HEADERS of a unary gRPC call.
fn grpc_headers(
    addr: SocketAddr,
    path: &str,
    timeout: Option<&str>,
    token: Option<&str>,
) -> http::Request<()> {
    let mut b = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = timeout {
        b = b.header("grpc-timeout", t);
    }
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(()).unwrap()
}

/// A gRPC length-prefixed message.
fn frame(msg: &[u8]) -> Bytes {
    let mut v = vec![0u8];
    v.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    v.extend_from_slice(msg);
    v.into()
}

/// The status of a response, from its headers (trailers-only) or trailers.
async fn status_of(resp: h2::client::ResponseFuture) -> tonic::Status {
    let resp = resp.await.unwrap();
    if let Some(s) = tonic::Status::from_header_map(resp.headers()) {
        return s;
    }
    let mut body = resp.into_body();
    while let Some(d) = body.data().await {
        let d = d.unwrap();
        let _ = body.flow_control().release_capacity(d.len());
    }
    let trailers = body.trailers().await.unwrap().unwrap();
    tonic::Status::from_header_map(&trailers).unwrap()
}

/// One unary call sent as raw bytes (`body` already framed, or not).
async fn raw_call(addr: SocketAddr, token: Option<&str>, body: Bytes) -> tonic::Status {
    let mut send = h2_connect(addr).await;
    let (resp, mut stream) = send
        .send_request(grpc_headers(addr, LOGIN_URL, Some("10S"), token), false)
        .unwrap();
    stream.send_data(body, true).unwrap();
    status_of(resp).await
}

fn error_reason(s: &tonic::Status) -> String {
    let info = s
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo: {s:?}"));
    assert_eq!(info.domain, "bitbucket-connector");
    info.reason
}

/// The value of one sample line of the metrics text, 0 if absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_stream_without_a_body_is_in_flight_and_gets_deadline_exceeded_at_its_deadline() {
    let mut setup = Setup::default().grpc("defaultTimeout: 60s");
    setup.telemetry = true;
    let env = setup.start().await;
    let mut send = h2_connect(env.addr).await;
    let started = Instant::now();
    let (resp, _body_never_sent) = send
        .send_request(
            grpc_headers(env.addr, LOGIN_URL, Some("1500m"), None),
            false,
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = env.metrics().await;
    assert_eq!(sample(&m, "bitbucket_connector_rpc_in_flight"), 1.0, "{m}");

    let s = status_of(resp).await;
    let took = started.elapsed();
    assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
    assert_eq!(error_reason(&s), "DEADLINE_EXCEEDED");
    // At its own deadline (1.5 s less the margin), not defaultTimeout's 60 s.
    assert!(took >= Duration::from_millis(1300), "{took:?}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    let m = env.metrics().await;
    assert_eq!(sample(&m, "bitbucket_connector_rpc_in_flight"), 0.0, "{m}");
    assert_eq!(
        sample(
            &m,
            "bitbucket_connector_rpc_requests_total{method=\"LoginURL\",code=\"DEADLINE_EXCEEDED\"}"
        ),
        1.0,
        "{m}"
    );
    env.assert_serving().await;
}

#[tokio::test]
async fn streams_without_a_body_take_max_in_flight_slots() {
    let env = Setup::default().grpc("maxInFlight: 2").start().await;
    let mut send = h2_connect(env.addr).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(
            send.send_request(grpc_headers(env.addr, LOGIN_URL, Some("20S"), None), false)
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let login_url = || pb::LoginUrlRequest {
        callback_url: REDIRECT.into(),
        state: "s".into(),
        ..Default::default()
    };
    let err = env.client().login_url(login_url()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(reason(&err), "TOO_MANY_REQUESTS");

    // The slots come back when the streams go away.
    drop(held);
    drop(send);
    assert!(
        eventually(Duration::from_secs(2), || async {
            env.client().login_url(login_url()).await.is_ok()
        })
        .await,
        "the held slots were not released"
    );
}

#[tokio::test]
async fn an_undecodable_message_is_invalid_argument_malformed_request() {
    let env = Setup::default().start().await;
    let cases: [(&str, Bytes); 4] = [
        // callback_url (field 2, a string) that is not UTF-8
        ("invalid UTF-8", frame(&[0x12, 0x02, 0xff, 0xfe])),
        // field 2 sent as a varint
        ("wrong wire type", frame(&[0x10, 0x01])),
        // a length-delimited field longer than the message
        ("truncated field", frame(&[0x12, 0x10, b'a'])),
        // the frame announces 16 bytes, 3 come
        (
            "truncated frame",
            Bytes::from_static(&[0, 0, 0, 0, 16, 0x12, 0x01, b'a']),
        ),
    ];
    for (what, body) in cases {
        let s = raw_call(env.addr, None, body).await;
        assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
        assert_eq!(error_reason(&s), "MALFORMED_REQUEST", "{what}");
        assert!(
            s.message().starts_with("malformed request: "),
            "{what}: {s:?}"
        );
    }
    env.assert_serving().await;
}

#[tokio::test]
async fn an_oversized_message_is_resource_exhausted_with_a_reason() {
    let env = Setup::default().grpc("maxRequestBytes: 4096").start().await;
    let err = env
        .client()
        .login_url(pb::LoginUrlRequest {
            callback_url: "a".repeat(10_000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(error_reason(&err), "MESSAGE_TOO_LARGE");
    env.assert_serving().await;
}

#[tokio::test]
async fn refusals_before_the_handler_are_counted() {
    let mut setup = Setup::default()
        .grpc("authTokens: [the-token-value]")
        .grpc("maxRequestBytes: 4096");
    setup.telemetry = true;
    let env = setup.start().await;
    let no_token = raw_call(env.addr, None, frame(&[])).await;
    assert_eq!(no_token.code(), Code::Unauthenticated);
    assert_eq!(error_reason(&no_token), "MISSING_CREDENTIALS");
    let wrong = raw_call(env.addr, Some("guess"), frame(&[])).await;
    assert_eq!(error_reason(&wrong), "INVALID_CREDENTIALS");
    let undecodable = raw_call(env.addr, Some("the-token-value"), frame(&[0x10, 0x01])).await;
    assert_eq!(error_reason(&undecodable), "MALFORMED_REQUEST");
    let mut big = vec![0x12, 0x90, 0x4e]; // callback_url of 10,000 bytes
    big.extend(std::iter::repeat_n(b'a', 10_000));
    let oversized = raw_call(env.addr, Some("the-token-value"), frame(&big)).await;
    assert_eq!(error_reason(&oversized), "MESSAGE_TOO_LARGE");

    let m = env.metrics().await;
    let count = |code: &str| {
        sample(
            &m,
            &format!(
                "bitbucket_connector_rpc_requests_total{{method=\"LoginURL\",code=\"{code}\"}}"
            ),
        )
    };
    assert_eq!(count("UNAUTHENTICATED"), 2.0, "{m}");
    assert_eq!(count("INVALID_ARGUMENT"), 1.0, "{m}");
    assert_eq!(count("RESOURCE_EXHAUSTED"), 1.0, "{m}");
}

#[tokio::test]
async fn caller_strings_are_clipped_in_messages() {
    let env = Setup::default().start().await;
    let long = format!("http://evil.example/{}", "a".repeat(60_000));
    let err = env
        .client()
        .login_url(pb::LoginUrlRequest {
            callback_url: long,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(reason(&err), "CALLBACK_URL_MISMATCH");
    assert!(err.message().len() < 600, "{} bytes", err.message().len());
    assert!(
        err.message()
            .starts_with("expected callback URL \"http://evil.example/aaa"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("…"), "{}", err.message());

    let err = env
        .client()
        .login_url(pb::LoginUrlRequest {
            callback_url: "http://x/\n\u{1b}[31m".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(!err.message().chars().any(char::is_control), "{err:?}");

    let identity = env.login("alice", scopes(true, false)).await.unwrap();
    let err = env
        .refresh(
            pb::Identity {
                user_id: format!("{{forged}}\n{}", "u".repeat(60_000)),
                ..identity
            },
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(reason(&err), "USER_CHANGED");
    assert!(err.message().len() < 600, "{} bytes", err.message().len());
    assert!(!err.message().chars().any(char::is_control), "{err:?}");
    assert!(
        err.message().contains("{forged}\\nuuu"),
        "{}",
        err.message()
    );
}

/// A raw HTTP/2 connection whose end can be awaited.
async fn h2_connect_watched(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let ended = tokio::spawn(conn);
    (send.ready().await.unwrap(), ended)
}

#[tokio::test]
async fn an_idle_connection_is_closed_but_not_one_with_an_rpc_in_flight() {
    let env = Setup::default()
        .grpc("connectionIdleTimeout: 1s")
        .start()
        .await;
    // One RPC, then nothing: closed about a second later.
    let (mut send, ended) = h2_connect_watched(env.addr).await;
    let (resp, mut body) = send
        .send_request(grpc_headers(env.addr, LOGIN_URL, Some("10S"), None), false)
        .unwrap();
    body.send_data(frame(&[]), true).unwrap();
    assert_eq!(status_of(resp).await.code(), Code::InvalidArgument);
    let idle_from = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(15), ended)
        .await
        .expect("the idle connection was not closed");
    assert!(r.unwrap().is_ok(), "closed without a GOAWAY");
    assert!(idle_from.elapsed() >= Duration::from_millis(900));

    // A stream held for 3 s on a connection idle after 1 s: the stream ends
    // at its own deadline, the connection is not cut under it.
    let (mut send, _ended) = h2_connect_watched(env.addr).await;
    let (resp, _no_body) = send
        .send_request(grpc_headers(env.addr, LOGIN_URL, Some("3S"), None), false)
        .unwrap();
    assert_eq!(status_of(resp).await.code(), Code::DeadlineExceeded);
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_idle_timeout() {
    use tokio::io::AsyncReadExt as _;
    let env = Setup::default()
        .grpc("connectionIdleTimeout: 1s")
        .start()
        .await;
    let mut silent = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a connection that never spoke HTTP/2 was held"
    );
}

#[tokio::test]
async fn connections_beyond_max_connections_wait_for_a_free_slot() {
    let env = Setup::default().grpc("maxConnections: 2").start().await;
    // The harness's own channel holds one; one more fills the limit.
    let (held, _held_ended) = h2_connect_watched(env.addr).await;
    let fresh = || lazy_channel(env.addr);
    let mut waiting =
        bitbucket_connector::pb::connector_service_client::ConnectorServiceClient::new(fresh());
    let login_url = || {
        let mut r = tonic::Request::new(pb::LoginUrlRequest {
            callback_url: REDIRECT.into(),
            state: "s".into(),
            ..Default::default()
        });
        r.set_timeout(Duration::from_millis(500));
        r
    };
    let err = waiting.login_url(login_url()).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            Code::DeadlineExceeded | Code::Cancelled | Code::Unavailable
        ),
        "{err:?}"
    );
    env.assert_serving().await;
    // Queued connections are taken in order: the one that gave up goes first.
    drop(waiting);
    drop(held);
    assert!(
        eventually(Duration::from_millis(2500), || async {
            bitbucket_connector::pb::connector_service_client::ConnectorServiceClient::new(fresh())
                .login_url(login_url())
                .await
                .is_ok()
        })
        .await,
        "a freed slot was not reused"
    );
}

#[tokio::test]
async fn a_telemetry_client_without_a_complete_request_header_is_disconnected() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let env = Setup {
        telemetry: true,
        ..Default::default()
    }
    .start()
    .await;
    let addr = env.telemetry.unwrap();
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    for s in [&mut slow, &mut silent] {
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf)).await;
        assert!(r.is_ok(), "held past the header timeout");
    }
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    // A complete request is still answered.
    assert!(env
        .metrics()
        .await
        .contains("bitbucket_connector_rpc_in_flight"));
}

/// With `authTokens` set, the token is checked from the HEADERS frame before
/// the stream is admitted: streams without a valid one, bodies never sent,
/// are refused at once and never hold a `maxInFlight` slot.
#[tokio::test]
async fn streams_without_a_valid_token_are_refused_at_once_and_take_no_slot() {
    let mut setup = Setup::default()
        .grpc("maxInFlight: 2")
        .grpc("authTokens: [the-token-value]");
    setup.telemetry = true;
    let env = setup.start().await;
    let mut send = h2_connect(env.addr).await;
    let mut bodies_never_sent = Vec::new();
    let mut answers = Vec::new();
    for i in 0..6 {
        let token = (i % 2 == 1).then_some("guess");
        let (resp, body) = send
            .send_request(grpc_headers(env.addr, LOGIN_URL, Some("60S"), token), false)
            .unwrap();
        bodies_never_sent.push(body);
        answers.push((token, resp));
    }
    for (token, resp) in answers {
        // Within 20 s of a 60 s deadline: not held until it.
        let s = tokio::time::timeout(Duration::from_secs(20), status_of(resp))
            .await
            .expect("a stream without a token was held");
        assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
        let expected = match token {
            None => "MISSING_CREDENTIALS",
            Some(_) => "INVALID_CREDENTIALS",
        };
        assert_eq!(error_reason(&s), expected);
    }

    // Their streams still open: nothing in flight, and both slots free.
    let m = env.metrics().await;
    assert_eq!(sample(&m, "bitbucket_connector_rpc_in_flight"), 0.0, "{m}");
    assert_eq!(
        sample(
            &m,
            "bitbucket_connector_rpc_requests_total{method=\"LoginURL\",code=\"UNAUTHENTICATED\"}"
        ),
        6.0,
        "{m}"
    );
    let mut held = Vec::new();
    for _ in 0..2 {
        let (resp, body) = send
            .send_request(
                grpc_headers(env.addr, LOGIN_URL, Some("60S"), Some("the-token-value")),
                false,
            )
            .unwrap();
        held.push((resp, body));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = env.metrics().await;
    assert_eq!(sample(&m, "bitbucket_connector_rpc_in_flight"), 2.0, "{m}");
    drop(bodies_never_sent);
}

/// An unauthenticated caller learns nothing of the load: with every slot taken
/// it is still told UNAUTHENTICATED, and only a caller with a token is told
/// to back off.
#[tokio::test]
async fn with_every_slot_taken_a_caller_without_a_token_is_still_unauthenticated() {
    let mut setup = Setup::default()
        .grpc("maxInFlight: 2")
        .grpc("authTokens: [the-token-value]");
    setup.telemetry = true;
    let env = setup.start().await;
    let mut send = h2_connect(env.addr).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(
            send.send_request(
                grpc_headers(env.addr, LOGIN_URL, Some("60S"), Some("the-token-value")),
                false,
            )
            .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = env.metrics().await;
    assert_eq!(sample(&m, "bitbucket_connector_rpc_in_flight"), 2.0, "{m}");

    let no_token = raw_call(env.addr, None, frame(&[])).await;
    assert_eq!(no_token.code(), Code::Unauthenticated, "{no_token:?}");
    assert_eq!(error_reason(&no_token), "MISSING_CREDENTIALS");
    let with_token = raw_call(env.addr, Some("the-token-value"), frame(&[])).await;
    assert_eq!(with_token.code(), Code::ResourceExhausted, "{with_token:?}");
    assert_eq!(error_reason(&with_token), "TOO_MANY_REQUESTS");
    let m = env.metrics().await;
    assert_eq!(sample(&m, "bitbucket_connector_rpc_in_flight"), 2.0, "{m}");
}

/// The service as its own process (the body budget is a static of the
/// process): `serve` with the fake as upstream, logs to a file.
struct OwnProcess {
    _config: tempfile::NamedTempFile,
    log: tempfile::NamedTempFile,
    _child: tokio::process::Child,
    channel: tonic::transport::Channel,
}

impl OwnProcess {
    async fn start(fake: &fake_bitbucket::FakeBitbucket) -> OwnProcess {
        use std::io::Write as _;
        let addr = free_port();
        let mut config = tempfile::NamedTempFile::new().unwrap();
        write!(
            config,
            "grpc:\n  addr: {addr}\n  shutdownTimeout: 5s\nconnectorData:\n  keys: [$TEST_DATA_KEY]\nconnectors:\n- type: bitbucket-cloud\n  id: bitbucket-cloud\n  name: Bitbucket\n  config:\n    clientID: {CLIENT_ID}\n    clientSecret: $TEST_CLIENT_SECRET\n    redirectURI: {REDIRECT}\n    authURL: {}\n    tokenURL: {}\n    apiURL: {}\n    legacyAPIURL: {}\n",
            fake.auth_url(),
            fake.token_url(),
            fake.api_url(),
            fake.legacy_api_url()
        )
        .unwrap();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_bitbucket-connector"))
            .args(["serve", "-c"])
            .arg(config.path())
            .env("TEST_DATA_KEY", KEY_A)
            .env("TEST_CLIENT_SECRET", CLIENT_SECRET)
            .stdout(std::process::Stdio::null())
            .stderr(log.reopen().unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let channel = lazy_channel(addr);
        wait_serving(&mut tonic_health::pb::health_client::HealthClient::new(
            channel.clone(),
        ))
        .await;
        OwnProcess {
            _config: config,
            log,
            _child: child,
            channel,
        }
    }

    async fn login_on(
        channel: tonic::transport::Channel,
        fake: &fake_bitbucket::FakeBitbucket,
    ) -> Result<pb::Identity, tonic::Status> {
        let code = fake.issue_code(CLIENT_ID, "alice");
        pb::connector_service_client::ConnectorServiceClient::new(channel)
            .handle_callback(pb::HandleCallbackRequest {
                scopes: scopes(false, false),
                raw_query: format!("code={code}&state=s"),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().identity.unwrap())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap()
    }
}

/// How long each stalled body waits between its padding and the rest.
const STALL: Duration = Duration::from_secs(4);

/// `n` logins at once whose `/2.0/user` answers are 4 MiB − 1 KiB, stalled
/// for [`STALL`] after the first 4 MiB − 2 KiB; how many succeeded and how
/// many failed (each UNAVAILABLE, before any stall ended).
async fn stalled_logins(
    svc: &OwnProcess,
    fake: &fake_bitbucket::FakeBitbucket,
    n: usize,
) -> (usize, usize) {
    use fake_bitbucket::{Endpoint, Fault};
    fake.inject(
        Endpoint::User,
        Fault::StalledBody {
            pad: 4 * 1024 * 1024 - 2048,
            stall: STALL,
        },
        Some(n as u32),
    );
    let started = Instant::now();
    let mut logins = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (channel, fake) = (svc.channel.clone(), fake.clone());
        logins.spawn(async move {
            let r = OwnProcess::login_on(channel, &fake).await;
            (r.map(|_| ()), started.elapsed())
        });
    }
    let (mut ok, mut failed) = (0, 0);
    while let Some(done) = logins.join_next().await {
        match done.unwrap() {
            (Ok(()), took) => {
                assert!(took >= STALL, "{took:?}");
                ok += 1;
            }
            (Err(s), took) => {
                assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                // At once, not after the stall of the bodies that fit.
                assert!(took < STALL, "{took:?}");
                failed += 1;
            }
        }
    }
    (ok, failed)
}

const OVER_BUDGET: &str = "upstream response bodies held at once are over budget; failing this one";

/// 20 `/2.0/user` answers of 4 MiB − 1 KiB held open at once need more than
/// the process's 64 MiB body budget: some logins fail UNAVAILABLE at once,
/// each with the over-budget warning, the others (at most 16 fit) succeed
/// once their bodies complete. Then the budget is all given back: 15 such
/// logins at once all succeed, a normal one too, and health is SERVING.
#[tokio::test]
async fn large_upstream_bodies_held_at_once_beyond_the_process_budget_fail_unavailable() {
    use fake_bitbucket::{FakeBitbucket, Fixture};
    const N: usize = 20;
    let fake = FakeBitbucket::start(Fixture::demo()).await.unwrap();
    let svc = OwnProcess::start(&fake).await;

    let (ok, over) = stalled_logins(&svc, &fake, N).await;
    assert!((1..=16).contains(&ok), "ok {ok}, over budget {over}");
    assert_eq!(ok + over, N);
    assert!(over >= N - 16, "ok {ok}, over budget {over}");
    let log = svc.log();
    assert_eq!(log.matches(OVER_BUDGET).count(), over, "{log}");

    // Every share given back.
    assert_eq!(stalled_logins(&svc, &fake, 15).await, (15, 0));
    OwnProcess::login_on(svc.channel.clone(), &fake)
        .await
        .unwrap();
    assert_eq!(svc.log().matches(OVER_BUDGET).count(), over);
    wait_serving(&mut tonic_health::pb::health_client::HealthClient::new(
        svc.channel.clone(),
    ))
    .await;
}

/// Whether `attempt` succeeds within `limit` (tried every 20 ms).
async fn eventually<F, Fut>(limit: Duration, mut attempt: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < until {
        if attempt().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
