//! Bitbucket's rate budget: the upstream calls a login and a refresh cost
//! (counted at the fake), the caches that save them, the 429 breaker, and
//! teamGroups membership checks with the user's own token.

use std::time::Duration;

use fake_bitbucket::{Endpoint, Fault};
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::harness::*;

const ENDPOINTS: [Endpoint; 8] = [
    Endpoint::Authorize,
    Endpoint::Token,
    Endpoint::User,
    Endpoint::Emails,
    Endpoint::Workspaces,
    Endpoint::Permission,
    Endpoint::Groups,
    Endpoint::GroupFilter,
];

/// Hits per endpoint, in [`ENDPOINTS`] order.
fn hits(env: &Env) -> Vec<u64> {
    ENDPOINTS.iter().map(|e| env.fake.hits(*e)).collect()
}

/// The hits made since `before`, as (endpoint, count) for the non-zero ones.
fn since(env: &Env, before: &[u64]) -> Vec<(Endpoint, u64)> {
    ENDPOINTS
        .iter()
        .zip(hits(env).iter().zip(before))
        .filter(|(_, (now, then))| now > then)
        .map(|(e, (now, then))| (*e, now - then))
        .collect()
}

fn both_group_options(setup: Setup) -> Setup {
    setup
        .connector("includeTeamGroups: true")
        .connector("getWorkspacePermissions: true")
}

#[tokio::test]
async fn a_cold_login_asks_permissions_only_where_administrator_does_not_answer() {
    let env = both_group_options(Setup::default()).start().await;
    let id = env.login("alice", scopes(false, true)).await.unwrap();
    // alice administers wonderland (owner: known from /2.0/user/workspaces, and
    // its groups are read with her token); looking-glass and tea-party need a
    // permission call each, and their groups are known unreadable.
    assert_eq!(
        since(&env, &[0; 8]),
        [
            (Endpoint::Token, 1),
            (Endpoint::User, 1),
            (Endpoint::Emails, 1),
            (Endpoint::Workspaces, 1),
            (Endpoint::Permission, 2),
            (Endpoint::Groups, 1),
        ]
    );
    assert_eq!(
        id.groups,
        [
            "wonderland",
            "looking-glass",
            "tea-party",
            "wonderland/developers",
            "wonderland/administrators",
            "wonderland:owner",
            "looking-glass:member",
            "tea-party:collaborator",
        ]
    );
}

#[tokio::test]
async fn a_warm_second_login_makes_no_permission_or_group_calls() {
    let env = Setup {
        telemetry: true,
        ..both_group_options(Setup::default())
    }
    .start()
    .await;
    let first = env.login("alice", scopes(false, true)).await.unwrap();
    let before = hits(&env);
    let second = env.login("alice", scopes(false, true)).await.unwrap();
    assert_eq!(second.groups, first.groups);
    assert_eq!(
        since(&env, &before),
        [
            (Endpoint::Token, 1),
            (Endpoint::User, 1),
            (Endpoint::Emails, 1),
            (Endpoint::Workspaces, 1),
        ]
    );
    let m = env.metrics().await;
    for (sample, want) in [
        (
            r#"bitbucket_connector_cache_requests_total{cache="permission",result="miss"}"#,
            2.0,
        ),
        (
            r#"bitbucket_connector_cache_requests_total{cache="permission",result="hit"}"#,
            2.0,
        ),
        (
            r#"bitbucket_connector_cache_requests_total{cache="groups",result="miss"}"#,
            1.0,
        ),
        (
            r#"bitbucket_connector_cache_requests_total{cache="groups",result="hit"}"#,
            1.0,
        ),
    ] {
        assert_eq!(metric(&m, sample), Some(want), "{sample}\n{m}");
    }
}

#[tokio::test]
async fn permission_cache_ttl_zero_asks_every_login() {
    let env = both_group_options(Setup::default())
        .connector("permissionCacheTTL: 0s")
        .start()
        .await;
    env.login("alice", scopes(false, true)).await.unwrap();
    let before = hits(&env);
    env.login("alice", scopes(false, true)).await.unwrap();
    let calls = since(&env, &before);
    assert!(calls.contains(&(Endpoint::Permission, 2)), "{calls:?}");
}

#[tokio::test]
async fn a_permission_changed_upstream_shows_after_the_permission_cache_ttl() {
    let env = both_group_options(Setup::default())
        .connector("permissionCacheTTL: 1s")
        .start()
        .await;
    let id = env.login("bob", scopes(false, true)).await.unwrap();
    assert!(id.groups.iter().any(|g| g == "wonderland:member"), "{id:?}");
    env.fake.update_fixture(|f| {
        f.workspaces[0].members[1].permission = "collaborator".into();
    });
    let id = env.login("bob", scopes(false, true)).await.unwrap();
    assert!(
        id.groups.iter().any(|g| g == "wonderland:member"),
        "cached: {id:?}"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let id = env.login("bob", scopes(false, true)).await.unwrap();
    assert!(
        id.groups.iter().any(|g| g == "wonderland:collaborator"),
        "{id:?}"
    );
}

#[tokio::test]
async fn refresh_inside_refresh_cache_ttl_makes_no_upstream_calls() {
    let env = Setup {
        telemetry: true,
        ..both_group_options(Setup::default())
    }
    .connector("refreshCacheTTL: 5m")
    .start()
    .await;
    let login = env.login("alice", scopes(true, true)).await.unwrap();
    let before = hits(&env);
    let refreshed = env
        .refresh(login.clone(), scopes(true, true))
        .await
        .unwrap();
    assert_eq!(since(&env, &before), []);
    assert_eq!(refreshed.groups, login.groups);
    assert_eq!(refreshed.email, "alice@example.com");
    assert_eq!(refreshed.user_id, ALICE);
    assert_eq!(refreshed.connector_data, login.connector_data);
    let m = env.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"bitbucket_connector_cache_requests_total{cache="refresh",result="hit"}"#
        ),
        Some(1.0),
        "{m}"
    );
    // Without groups in the scopes, the cached groups identity is not used.
    let before = hits(&env);
    let plain = env.refresh(login, scopes(true, false)).await.unwrap();
    assert!(plain.groups.is_empty());
    assert_eq!(
        since(&env, &before),
        [(Endpoint::User, 1), (Endpoint::Emails, 1)]
    );
}

#[tokio::test]
async fn refresh_cache_ttl_zero_asks_bitbucket_every_refresh() {
    let env = both_group_options(Setup::default()).start().await;
    let login = env.login("alice", scopes(true, true)).await.unwrap();
    let before = hits(&env);
    env.refresh(login, scopes(true, true)).await.unwrap();
    // The permission and group caches still answer (their TTLs' defaults).
    assert_eq!(
        since(&env, &before),
        [
            (Endpoint::User, 1),
            (Endpoint::Emails, 1),
            (Endpoint::Workspaces, 1),
        ]
    );
}

#[tokio::test]
async fn refresh_cache_is_not_used_once_the_access_token_needs_redeeming() {
    let env = Setup::default()
        .connector("refreshCacheTTL: 5m")
        .start()
        .await;
    // Access tokens that are already within the refresh margin.
    env.fake.set_access_token_ttl(Duration::from_secs(10));
    let login = env.login("alice", scopes(true, true)).await.unwrap();
    let before = hits(&env);
    let refreshed = env
        .refresh(login.clone(), scopes(true, true))
        .await
        .unwrap();
    let calls = since(&env, &before);
    assert!(calls.contains(&(Endpoint::Token, 1)), "{calls:?}");
    assert!(calls.contains(&(Endpoint::User, 1)), "{calls:?}");
    assert_ne!(refreshed.connector_data, login.connector_data);
}

#[tokio::test]
async fn refresh_cache_ttl_expires() {
    let env = Setup::default()
        .connector("refreshCacheTTL: 1s")
        .start()
        .await;
    let login = env.login("alice", scopes(true, true)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = hits(&env);
    env.refresh(login, scopes(true, true)).await.unwrap();
    let calls = since(&env, &before);
    assert!(calls.contains(&(Endpoint::User, 1)), "{calls:?}");
}

fn retry_after_seconds(s: &tonic::Status) -> String {
    s.get_details_error_info()
        .and_then(|i| i.metadata.get("retry_after_seconds").cloned())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_429_trips_the_breaker_of_that_resource_and_other_logins_go_on() {
    let env = Setup {
        telemetry: true,
        ..Setup::default()
    }
    .connector("getWorkspacePermissions: true")
    .connector("permissionCacheTTL: 0s")
    .connector("rateLimitBackoff: 2s")
    .start()
    .await;
    // Bitbucket's 429: text/plain, no Retry-After.
    env.fake
        .inject(Endpoint::Permission, Fault::Status(429), Some(1));
    let err = env.login("alice", scopes(false, true)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(reason(&err), "UPSTREAM_RATE_LIMITED");
    assert_eq!(retry_after_seconds(&err), "2");
    // Two permission calls went out at once; the 429 was not retried.
    let sent = env.fake.hits(Endpoint::Permission);
    assert!(sent <= 2, "{sent}");

    // While the breaker is open: no request to that resource, whoever logs in.
    let err = env.login("bob", scopes(false, true)).await.unwrap_err();
    assert_eq!(reason(&err), "UPSTREAM_RATE_LIMITED");
    let left: u64 = retry_after_seconds(&err).parse().unwrap();
    assert!((1..=2).contains(&left), "{left}");
    assert_eq!(env.fake.hits(Endpoint::Permission), sent);
    // A login that needs no permission goes on.
    let id = env.login("alice", scopes(false, false)).await.unwrap();
    assert_eq!(id.user_id, ALICE);
    assert_eq!(env.fake.hits(Endpoint::Permission), sent);

    let m = env.metrics().await;
    let limited = metric(
        &m,
        r#"bitbucket_connector_upstream_rate_limited_total{endpoint="/2.0/user/workspaces/{workspace}/permission"}"#,
    )
    .unwrap_or_default();
    // The 429 itself, and bob's refused workspace (one at least).
    assert!(limited >= 2.0, "{m}");

    tokio::time::sleep(Duration::from_millis(2100)).await;
    let id = env.login("alice", scopes(false, true)).await.unwrap();
    assert!(
        id.groups.iter().any(|g| g == "looking-glass:member"),
        "{id:?}"
    );
    assert!(env.fake.hits(Endpoint::Permission) > sent);
    env.assert_serving().await;
}

#[tokio::test]
async fn a_429_with_retry_after_beyond_the_wait_limit_opens_the_breaker_that_long() {
    let env = Env::start().await;
    env.fake
        .inject(Endpoint::Emails, Fault::StatusRetryAfter(429, 30), Some(1));
    let err = env.login("alice", scopes(false, false)).await.unwrap_err();
    assert_eq!(reason(&err), "UPSTREAM_RATE_LIMITED");
    let left: u64 = retry_after_seconds(&err).parse().unwrap();
    assert!((29..=30).contains(&left), "{left}");
    let err = env.login("alice", scopes(false, false)).await.unwrap_err();
    assert_eq!(reason(&err), "UPSTREAM_RATE_LIMITED");
    assert_eq!(env.fake.hits(Endpoint::Emails), 1);
}

#[tokio::test]
async fn a_429_at_the_token_endpoint_is_rate_limited_and_not_retried() {
    let env = Env::start().await;
    env.fake
        .inject(Endpoint::Token, Fault::Status(429), Some(1));
    let err = env.login("alice", scopes(false, false)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(reason(&err), "UPSTREAM_RATE_LIMITED");
    assert_eq!(env.fake.hits(Endpoint::Token), 1);
    assert_eq!(env.fake.hits(Endpoint::User), 0);
}

fn team_groups(setup: Setup) -> Setup {
    setup.connector(
        "teamGroups: [wonderland/developers, wonderland/release-managers, wonderland/administrators, looking-glass/readers, looking-glass/writers, tea-party/hatters, elsewhere/x]",
    )
}

#[tokio::test]
async fn team_groups_give_a_non_admin_member_the_listed_groups_they_are_in() {
    let env = Setup {
        telemetry: true,
        ..team_groups(Setup::default())
    }
    .start()
    .await;
    let id = env.login("bob", scopes(false, true)).await.unwrap();
    // bob is a plain member of wonderland: developers and release-managers,
    // not administrators; one request with his own token, no group list.
    assert_eq!(
        id.groups,
        [
            "wonderland",
            "wonderland/developers",
            "wonderland/release-managers"
        ]
    );
    assert_eq!(env.fake.hits(Endpoint::GroupFilter), 1);
    assert_eq!(env.fake.hits(Endpoint::Groups), 0);
    let m = env.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"bitbucket_connector_upstream_requests_total{endpoint="/1.0/groups",status="200"}"#
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test]
async fn team_groups_check_every_kept_workspace_in_one_request() {
    let env = team_groups(Setup::default())
        .connector("includeTeamGroups: true")
        .start()
        .await;
    let id = env.login("alice", scopes(false, true)).await.unwrap();
    assert_eq!(
        id.groups,
        [
            "wonderland",
            "looking-glass",
            "tea-party",
            "wonderland/developers",
            "wonderland/administrators",
            "looking-glass/readers",
        ]
    );
    assert_eq!(env.fake.hits(Endpoint::GroupFilter), 1);
    assert_eq!(env.fake.hits(Endpoint::Groups), 0);
    // Cached for teamGroupsCacheTTL like a group list.
    env.login("alice", scopes(false, true)).await.unwrap();
    assert_eq!(env.fake.hits(Endpoint::GroupFilter), 1);
}

#[tokio::test]
async fn team_groups_of_workspaces_outside_teams_are_not_asked() {
    let env = team_groups(Setup::default())
        .connector("teams: [looking-glass]")
        .start()
        .await;
    let id = env.login("alice", scopes(false, true)).await.unwrap();
    assert_eq!(id.groups, ["looking-glass", "looking-glass/readers"]);
    assert_eq!(env.fake.hits(Endpoint::GroupFilter), 1);
    let err = env.login("bob", scopes(false, true)).await.unwrap_err();
    assert_eq!(reason(&err), "NOT_IN_REQUIRED_TEAMS");
    assert_eq!(env.fake.hits(Endpoint::GroupFilter), 1);
}
