//! Issue 6: what operators see: metrics, probes.

use std::collections::HashMap;

use bitbucket_connector::pb;
use fake_bitbucket::{Endpoint, Fault};

use crate::harness::*;

/// `name{labels} value` lines of a Prometheus text exposition, by series.
fn series(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        assert!(
            out.insert(key.to_string(), v).is_none(),
            "duplicate series {key}"
        );
    }
    out
}

#[tokio::test]
async fn metrics_count_rpcs_upstream_calls_retries_and_degraded_groups() {
    let env = Setup {
        telemetry: true,
        ..Setup::default()
    }
    .connector("includeTeamGroups: true")
    .start()
    .await;
    env.fake.inject(Endpoint::User, Fault::Status(503), Some(1));
    env.login("alice", scopes(false, true)).await.unwrap();
    let err = env
        .client()
        .login_url(pb::LoginUrlRequest {
            callback_url: "http://wrong/".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let text = env.metrics().await;
    let s = series(&text);
    let get = |k: &str| {
        *s.get(k)
            .unwrap_or_else(|| panic!("no series {k} in\n{text}"))
    };
    assert_eq!(
        get(r#"bitbucket_connector_rpc_requests_total{method="HandleCallback",code="OK"}"#),
        1.0
    );
    assert_eq!(
        get(r#"bitbucket_connector_rpc_requests_total{method="LoginURL",code="INVALID_ARGUMENT"}"#),
        1.0
    );
    assert_eq!(
        get(r#"bitbucket_connector_rpc_duration_seconds_count{method="HandleCallback"}"#),
        1.0
    );
    assert_eq!(
        get(r#"bitbucket_connector_upstream_requests_total{endpoint="/2.0/user",status="503"}"#),
        1.0
    );
    assert_eq!(
        get(r#"bitbucket_connector_upstream_requests_total{endpoint="/2.0/user",status="200"}"#),
        1.0
    );
    assert_eq!(
        get(
            r#"bitbucket_connector_upstream_requests_total{endpoint="/site/oauth2/access_token",status="200"}"#
        ),
        1.0
    );
    assert_eq!(
        get(r#"bitbucket_connector_upstream_retries_total{endpoint="/2.0/user"}"#),
        1.0
    );
    // alice's groups: wonderland (owner: readable with her token), looking-glass
    // and tea-party (`administrator: false`, so known unreadable: not asked,
    // degraded).
    assert_eq!(
        get(
            r#"bitbucket_connector_upstream_requests_total{endpoint="/1.0/groups/{workspace}",status="200"}"#
        ),
        1.0
    );
    assert!(!s.contains_key(
        r#"bitbucket_connector_upstream_requests_total{endpoint="/1.0/groups/{workspace}",status="403"}"#
    ));
    assert_eq!(
        get(r#"bitbucket_connector_team_groups_degraded_total{reason="forbidden"}"#),
        2.0
    );
    assert_eq!(get("bitbucket_connector_rpc_in_flight"), 0.0);
    assert_eq!(
        get(&format!(
            r#"bitbucket_connector_build_info{{version="{}"}}"#,
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
    assert!(
        s.keys().any(
            |k| k.starts_with("bitbucket_connector_upstream_duration_seconds_bucket{")
                && k.contains("endpoint=\"/2.0/user/emails\"")
        ),
        "{text}"
    );
    // Labels never carry a user, a workspace or an id from a URL.
    for needle in [
        "alice",
        "wonderland",
        "looking-glass",
        "8c7e2f4a",
        "127.0.0.1",
    ] {
        assert!(
            !text.contains(needle),
            "{needle:?} leaked into the metrics:\n{text}"
        );
    }
}

#[tokio::test]
async fn probes_answer_on_the_telemetry_port() {
    let env = Setup {
        telemetry: true,
        ..Setup::default()
    }
    .start()
    .await;
    let t = env.telemetry.unwrap();
    assert_eq!(http_get(&format!("http://{t}/healthz")).await.0, 200);
    assert_eq!(http_get(&format!("http://{t}/readyz")).await.0, 200);
    assert_eq!(http_get(&format!("http://{t}/nope")).await.0, 404);
}

#[tokio::test]
async fn prometheus_text_by_default_openmetrics_on_request() {
    let env = Setup {
        telemetry: true,
        ..Setup::default()
    }
    .start()
    .await;
    let url = format!("http://{}/metrics", env.telemetry.unwrap());
    let plain = reqwest::get(&url).await.unwrap();
    assert_eq!(
        plain.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = plain.text().await.unwrap();
    assert!(text.contains("# TYPE bitbucket_connector_refresh_joined_total counter"));
    assert!(!text.contains("# EOF"));
    let om = reqwest::Client::new()
        .get(&url)
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert!(om.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = om.text().await.unwrap();
    assert!(text.contains("# TYPE bitbucket_connector_refresh_joined counter"));
    assert!(text.trim_end().ends_with("# EOF"));
}

#[tokio::test]
async fn an_rpc_past_its_deadline_is_still_counted_and_in_flight_returns_to_zero() {
    let env = Setup {
        telemetry: true,
        ..Setup::default()
    }
    .start()
    .await;
    env.fake.inject(
        Endpoint::User,
        Fault::Delay(std::time::Duration::from_secs(2)),
        None,
    );
    let mut req = tonic::Request::new(pb::HandleCallbackRequest {
        raw_query: format!("code={}", env.code("alice")),
        ..Default::default()
    });
    req.set_timeout(std::time::Duration::from_millis(300));
    let err = env.client().handle_callback(req).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{err:?}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let s = series(&env.metrics().await);
    assert_eq!(
        s.get(r#"bitbucket_connector_rpc_requests_total{method="HandleCallback",code="DEADLINE_EXCEEDED"}"#),
        Some(&1.0),
        "{s:?}"
    );
    assert_eq!(s.get("bitbucket_connector_rpc_in_flight"), Some(&0.0));
}
