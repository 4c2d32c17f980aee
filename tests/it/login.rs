//! HandleCallback over the real gRPC port against the fake Bitbucket over real
//! HTTP: identity, emails, teams, workspace groups and permissions, callback
//! errors, retries, upstream faults, deadlines.

use std::time::{Duration, Instant};

use fake_bitbucket::{
    Endpoint, Fault, Fixture, Membership, TokenQuirks, Workspace, ALICE_UUID, BOB_UUID,
    DEMO_ADMIN_PASSWORD, DEMO_ADMIN_USERNAME,
};
use tonic::Code;

use crate::harness::*;

/// `teamGroupsAuth` with the fixture's admin credential (looking-glass only).
fn with_admin(setup: Setup) -> Setup {
    setup
        .connector("teamGroupsAuth:")
        .connector(&format!("  username: {DEMO_ADMIN_USERNAME}"))
        .connector(&format!("  password: {DEMO_ADMIN_PASSWORD}"))
}

fn groups_of(i: &bitbucket_connector::pb::Identity) -> Vec<&str> {
    i.groups.iter().map(String::as_str).collect()
}

// ---------------------------------------------------------------------------
// Identity

#[tokio::test]
async fn alice_identity_matches_dex_without_groups_unless_asked() {
    let env = Env::start().await;
    let id = env.login("alice", scopes(false, false)).await.unwrap();
    assert_eq!(id.user_id, ALICE);
    assert_eq!(id.user_id, ALICE_UUID);
    assert_eq!(id.username, "alice");
    assert_eq!(id.preferred_username, "alice");
    // Not the confirmed non-primary listed first, not the unconfirmed one.
    assert_eq!(id.email, "alice@example.com");
    assert!(id.email_verified);
    assert!(id.groups.is_empty(), "{:?}", id.groups);
    assert!(id.connector_data.is_empty());
    assert_eq!(
        env.fake.hits(Endpoint::Workspaces),
        0,
        "workspaces read without a groups scope or teams"
    );
}

#[tokio::test]
async fn groups_scope_gives_the_workspace_slugs_in_upstream_order() {
    let env = Env::start().await;
    let id = env.login("alice", scopes(false, true)).await.unwrap();
    assert_eq!(groups_of(&id), ["wonderland", "looking-glass", "tea-party"]);
    assert_eq!(id.email, "alice@example.com");
}

#[tokio::test]
async fn a_user_without_username_gets_the_nickname() {
    let env = Env::start().await;
    let id = env.login("bob", scopes(false, true)).await.unwrap();
    assert_eq!(id.user_id, BOB_UUID);
    assert_eq!(id.username, "bob");
    assert_eq!(id.preferred_username, "bob");
    assert_eq!(id.email, "bob@example.com");
    assert!(id.email_verified);
    assert_eq!(groups_of(&id), ["wonderland"]);
}

#[tokio::test]
async fn primary_confirmed_email_is_found_on_a_later_page() {
    let env = Env::start().await;
    env.fake.set_max_pagelen(1);
    let id = env.login("alice", scopes(false, false)).await.unwrap();
    assert_eq!(id.email, "alice@example.com");
    assert!(
        env.fake.hits(Endpoint::Emails) >= 2,
        "emails read in {} page(s)",
        env.fake.hits(Endpoint::Emails)
    );
}

#[tokio::test]
async fn no_confirmed_primary_email_is_failed_precondition() {
    let env = Env::start().await;
    env.fake.update_fixture(|f| {
        let alice = f.users.iter_mut().find(|u| u.uuid == ALICE_UUID).unwrap();
        for e in &mut alice.emails {
            if e.is_primary {
                e.is_confirmed = false;
            }
        }
    });
    let err = env.login("alice", scopes(false, false)).await.unwrap_err();
    assert_status(&err, Code::FailedPrecondition, "NO_CONFIRMED_PRIMARY_EMAIL");
    assert_eq!(
        err.message(),
        "bitbucket: user has no confirmed, primary email"
    );
    env.assert_serving().await;
}

// ---------------------------------------------------------------------------
// Teams whitelist

#[tokio::test]
async fn teams_whitelist_keeps_only_listed_workspaces_in_upstream_order() {
    let env = Setup::default()
        .connector("teams: [tea-party, wonderland]")
        .start()
        .await;
    // `teams` set: groups are computed even without the groups scope.
    let id = env.login("alice", scopes(false, false)).await.unwrap();
    assert_eq!(groups_of(&id), ["wonderland", "tea-party"]);
    let id = env.login("alice", scopes(false, true)).await.unwrap();
    assert_eq!(groups_of(&id), ["wonderland", "tea-party"]);
}

#[tokio::test]
async fn teams_whitelist_miss_is_permission_denied() {
    let env = Setup::default()
        .connector("teams: [no-such-team]")
        .start()
        .await;
    let err = env.login("alice", scopes(false, true)).await.unwrap_err();
    assert_status(&err, Code::PermissionDenied, "NOT_IN_REQUIRED_TEAMS");
    assert_eq!(
        err.message(),
        "bitbucket: user \"alice\" is not in any of the required teams"
    );
    env.assert_serving().await;
}

#[tokio::test]
async fn teams_whitelist_matches_a_workspace_uuid() {
    let env = Setup::default()
        .connector("teams: [\"{0a1b2c3d-0000-4000-8000-000000000003}\"]")
        .start()
        .await;
    let id = env.login("alice", scopes(false, false)).await.unwrap();
    assert_eq!(groups_of(&id), ["tea-party"]);
    // bob is not in tea-party.
    let err = env.login("bob", scopes(false, false)).await.unwrap_err();
    assert_status(&err, Code::PermissionDenied, "NOT_IN_REQUIRED_TEAMS");
    assert_eq!(
        err.message(),
        "bitbucket: user \"bob\" is not in any of the required teams"
    );
}

// ---------------------------------------------------------------------------
// Pagination quirks

#[tokio::test]
async fn workspaces_over_three_pages_keep_their_order() {
    let env = Env::start().await;
    env.fake.set_max_pagelen(1);
    let id = env.login("alice", scopes(false, true)).await.unwrap();
    assert_eq!(groups_of(&id), ["wonderland", "looking-glass", "tea-party"]);
    assert_eq!(env.fake.hits(Endpoint::Workspaces), 3);
}

#[tokio::test]
async fn null_values_is_an_empty_page() {
    let env = Env::start().await;
    env.fake.set_max_pagelen(1);
    env.fake
        .inject(Endpoint::Workspaces, Fault::NullValues, Some(1));
    let id = env.login("alice", scopes(false, true)).await.unwrap();
    // Page 1 (wonderland) came back as `values: null`; its `next` was followed.
    assert_eq!(groups_of(&id), ["looking-glass", "tea-party"]);
    assert_eq!(env.fake.hits(Endpoint::Workspaces), 3);
    env.assert_serving().await;
}

#[tokio::test]
async fn null_values_on_the_only_page_gives_no_workspaces() {
    let env = Env::start().await;
    env.fake
        .inject(Endpoint::Workspaces, Fault::NullValues, None);
    let id = env.login("alice", scopes(false, true)).await.unwrap();
    assert!(id.groups.is_empty(), "{:?}", id.groups);
    env.assert_serving().await;
}

#[tokio::test]
async fn capitalised_values_is_accepted() {
    let env = Env::start().await;
    env.fake.set_max_pagelen(2);
    env.fake.inject(Endpoint::Any, Fault::CapitalValues, None);
    let id = env.login("alice", scopes(false, true)).await.unwrap();
    assert_eq!(groups_of(&id), ["wonderland", "looking-glass", "tea-party"]);
    assert_eq!(id.email, "alice@example.com");
    env.assert_serving().await;
}

#[tokio::test]
async fn foreign_next_link_is_upstream_invalid_and_never_requested() {
    let foreign = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let foreign_addr = foreign.local_addr().unwrap();
    let env = Env::start().await;
    env.fake.inject(
        Endpoint::Workspaces,
        Fault::ForeignNext(format!("http://{foreign_addr}/2.0/user/workspaces?page=2")),
        None,
    );
    let err = env.login("alice", scopes(false, true)).await.unwrap_err();
    assert_status(&err, Code::Internal, "UPSTREAM_INVALID");
    // Any connection would already be in the backlog by now.
    let accepted = tokio::time::timeout(Duration::from_millis(50), foreign.accept()).await;
    assert!(
        accepted.is_err(),
        "the foreign host received a connection: {accepted:?}"
    );
    env.assert_serving().await;
}

#[tokio::test]
async fn foreign_next_on_another_port_of_the_same_host_is_not_followed() {
    let foreign = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = foreign.local_addr().unwrap().port();
    let env = Env::start().await;
    env.fake.inject(
        Endpoint::Emails,
        Fault::ForeignNext(format!("http://127.0.0.1:{port}/2.0/user/emails?page=2")),
        None,
    );
    let err = env.login("alice", scopes(false, false)).await.unwrap_err();
    assert_status(&err, Code::Internal, "UPSTREAM_INVALID");
    let accepted = tokio::time::timeout(Duration::from_millis(50), foreign.accept()).await;
    assert!(accepted.is_err(), "connection made: {accepted:?}");
    env.assert_serving().await;
}

// ---------------------------------------------------------------------------
// Workspace groups and permissions

#[tokio::test]
async fn team_groups_list_only_the_groups_alice_is_in() {
    let env = Setup::default()
        .connector("includeTeamGroups: true")
        .start()
        .await;
    let id = env.login("alice", scopes(false, true)).await.unwrap();
    // alice owns wonderland (her token reads its groups); looking-glass and
    // tea-party are not readable with her token.
    assert_eq!(
        groups_of(&id),
        [
            "wonderland",
            "looking-glass",
            "tea-party",
            "wonderland/developers",
            "wonderland/administrators",
        ]
    );
    assert!(!id.groups.iter().any(|g| g == "wonderland/release-managers"));
}

#[tokio::test]
async fn unreadable_workspace_groups_degrade_and_are_counted() {
    let env = Setup {
        telemetry: true,
        ..Setup::default()
    }
    .connector("includeTeamGroups: true")
    .start()
    .await;
    let id = env.login("alice", scopes(false, true)).await.unwrap();
    assert!(
        !id.groups
            .iter()
            .any(|g| g.starts_with("looking-glass/") || g.starts_with("tea-party/")),
        "{:?}",
        id.groups
    );
    assert!(id.groups.iter().any(|g| g == "looking-glass"));
    let m = env.metrics().await;
    assert_eq!(
        metric(
            &m,
            "bitbucket_connector_team_groups_degraded_total{reason=\"forbidden\"}"
        ),
        Some(2.0),
        "{m}"
    );
    env.assert_serving().await;
}

#[tokio::test]
async fn injected_groups_403_drops_that_workspaces_groups_for_the_cache_ttl() {
    let env = Setup {
        telemetry: true,
        ..Setup::default()
    }
    .connector("includeTeamGroups: true")
    .connector("teams: [wonderland]")
    .start()
    .await;
    env.fake
        .inject(Endpoint::Groups, Fault::Status(403), Some(1));
    let id = env.login("alice", scopes(false, true)).await.unwrap();
    assert_eq!(groups_of(&id), ["wonderland"]);
    let m = env.metrics().await;
    assert_eq!(
        metric(
            &m,
            "bitbucket_connector_team_groups_degraded_total{reason=\"forbidden\"}"
        ),
        Some(1.0),
        "{m}"
    );
    // The refusal is cached like a list (teamGroupsCacheTTL): the next login
    // asks nobody and is degraded again. Without the cache it would read again.
    let hits = env.fake.hits(Endpoint::Groups);
    let id = env.login("alice", scopes(false, true)).await.unwrap();
    assert_eq!(groups_of(&id), ["wonderland"]);
    assert_eq!(env.fake.hits(Endpoint::Groups), hits);
    let m = env.metrics().await;
    assert_eq!(
        metric(
            &m,
            "bitbucket_connector_team_groups_degraded_total{reason=\"forbidden\"}"
        ),
        Some(2.0),
        "{m}"
    );
    env.assert_serving().await;
}

#[tokio::test]
async fn groups_404_and_410_are_counted_by_reason() {
    let env = Setup {
        telemetry: true,
        ..Setup::default()
    }
    .connector("includeTeamGroups: true")
    .connector("teams: [wonderland]")
    .connector("teamGroupsCacheTTL: 0s")
    .start()
    .await;
    env.fake
        .inject(Endpoint::Groups, Fault::Status(404), Some(1));
    env.fake
        .inject(Endpoint::Groups, Fault::Status(410), Some(1));
    for _ in 0..2 {
        let id = env.login("alice", scopes(false, true)).await.unwrap();
        assert_eq!(groups_of(&id), ["wonderland"]);
    }
    let m = env.metrics().await;
    for (r, n) in [("not_found", 1.0), ("gone", 1.0)] {
        assert_eq!(
            metric(
                &m,
                &format!("bitbucket_connector_team_groups_degraded_total{{reason=\"{r}\"}}")
            ),
            Some(n),
            "{m}"
        );
    }
    env.assert_serving().await;
}

#[tokio::test]
async fn team_groups_auth_makes_looking_glass_groups_readable() {
    let env = with_admin(Setup::default().connector("includeTeamGroups: true"))
        .start()
        .await;
    let id = env.login("alice", scopes(false, true)).await.unwrap();
    // wonderland: the credential is refused, alice administers it, her token
    // reads it. looking-glass: the credential. tea-party: nobody.
    assert_eq!(
        groups_of(&id),
        [
            "wonderland",
            "looking-glass",
            "tea-party",
            "wonderland/developers",
            "wonderland/administrators",
            "looking-glass/readers",
        ]
    );
}

#[tokio::test]
async fn workspace_permissions_follow_slugs_and_groups() {
    let env = with_admin(
        Setup::default()
            .connector("includeTeamGroups: true")
            .connector("getWorkspacePermissions: true"),
    )
    .start()
    .await;
    let id = env.login("alice", scopes(false, true)).await.unwrap();
    assert_eq!(
        groups_of(&id),
        [
            "wonderland",
            "looking-glass",
            "tea-party",
            "wonderland/developers",
            "wonderland/administrators",
            "looking-glass/readers",
            "wonderland:owner",
            "looking-glass:member",
            "tea-party:collaborator",
        ]
    );
}

#[tokio::test]
async fn workspace_permissions_without_team_groups() {
    let env = Setup::default()
        .connector("getWorkspacePermissions: true")
        .start()
        .await;
    let id = env.login("bob", scopes(false, true)).await.unwrap();
    assert_eq!(groups_of(&id), ["wonderland", "wonderland:member"]);
    assert_eq!(env.fake.hits(Endpoint::Groups), 0);
}

#[tokio::test]
async fn groups_have_no_duplicates_when_upstream_repeats_itself() {
    let env = Setup::default()
        .connector("includeTeamGroups: true")
        .connector("getWorkspacePermissions: true")
        .start()
        .await;
    env.fake.update_fixture(|f| {
        let w = f
            .workspaces
            .iter_mut()
            .find(|w| w.slug == "wonderland")
            .unwrap();
        // alice listed twice: /user/workspaces answers wonderland twice.
        w.members.push(Membership {
            user_uuid: ALICE_UUID.to_string(),
            permission: "owner".to_string(),
        });
        let devs = w
            .groups
            .iter_mut()
            .find(|g| g.slug == "developers")
            .unwrap();
        devs.members.push(ALICE_UUID.to_string());
    });
    let id = env.login("alice", scopes(false, true)).await.unwrap();
    assert_eq!(
        groups_of(&id),
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
async fn group_lists_are_cached_within_the_ttl() {
    let env = Setup::default()
        .connector("includeTeamGroups: true")
        .connector("teams: [wonderland]")
        .start()
        .await;
    let first = env.login("alice", scopes(false, true)).await.unwrap();
    assert_eq!(env.fake.hits(Endpoint::Groups), 1);
    let second = env.login("alice", scopes(false, true)).await.unwrap();
    assert_eq!(env.fake.hits(Endpoint::Groups), 1, "groups read again");
    assert_eq!(first.groups, second.groups);
    assert_eq!(
        groups_of(&second),
        [
            "wonderland",
            "wonderland/developers",
            "wonderland/administrators"
        ]
    );
}

#[tokio::test]
async fn group_cache_ttl_zero_reads_groups_every_login() {
    let env = Setup::default()
        .connector("includeTeamGroups: true")
        .connector("teams: [wonderland]")
        .connector("teamGroupsCacheTTL: 0s")
        .start()
        .await;
    env.login("alice", scopes(false, true)).await.unwrap();
    assert_eq!(env.fake.hits(Endpoint::Groups), 1);
    env.login("alice", scopes(false, true)).await.unwrap();
    assert_eq!(env.fake.hits(Endpoint::Groups), 2);
}

// ---------------------------------------------------------------------------
// The callback query

#[tokio::test]
async fn callback_error_is_unauthenticated_without_a_token_request() {
    let env = Env::start().await;
    let err = env
        .callback(
            "error=access_denied&error_description=The+user+denied+access&state=s",
            scopes(false, false),
        )
        .await
        .unwrap_err();
    assert_status(&err, Code::Unauthenticated, "CALLBACK_ERROR");
    assert_eq!(
        err.message(),
        "bitbucket: access_denied: The user denied access"
    );
    assert_eq!(env.fake.hits(Endpoint::Token), 0);
    assert_eq!(env.fake.total_hits(), 0);
}

#[tokio::test]
async fn callback_without_code_or_error_is_invalid_argument() {
    let env = Env::start().await;
    for q in ["state=s", "", "code=&state=s"] {
        let err = env.callback(q, scopes(false, false)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{q:?}: {err:?}");
        assert_eq!(reason(&err), "MALFORMED_CALLBACK", "{q:?}");
    }
    assert_eq!(env.fake.total_hits(), 0);
}

#[tokio::test]
async fn unknown_code_is_unauthenticated_invalid_code() {
    let env = Env::start().await;
    let err = env
        .callback("code=not-a-code&state=s", scopes(false, false))
        .await
        .unwrap_err();
    assert_status(&err, Code::Unauthenticated, "INVALID_CODE");
    assert_eq!(env.fake.hits(Endpoint::Token), 1);
    assert_eq!(env.fake.hits(Endpoint::User), 0);
}

#[tokio::test]
async fn used_code_is_unauthenticated_invalid_code() {
    let env = Env::start().await;
    let code = env.code("alice");
    let q = format!("code={code}&state=s");
    env.callback(&q, scopes(false, false)).await.unwrap();
    let err = env.callback(&q, scopes(false, false)).await.unwrap_err();
    assert_status(&err, Code::Unauthenticated, "INVALID_CODE");
    assert!(!err.message().contains(&code), "{}", err.message());
    assert_eq!(env.fake.hits(Endpoint::Token), 2);
}

// ---------------------------------------------------------------------------
// Retries and upstream faults

#[tokio::test]
async fn upstream_503_once_is_retried() {
    let env = Setup {
        telemetry: true,
        ..Setup::default()
    }
    .start()
    .await;
    env.fake.inject(Endpoint::User, Fault::Status(503), Some(1));
    let id = env.login("alice", scopes(false, false)).await.unwrap();
    assert_eq!(id.user_id, ALICE);
    assert_eq!(env.fake.hits(Endpoint::User), 2);
    let m = env.metrics().await;
    assert_eq!(
        metric(
            &m,
            "bitbucket_connector_upstream_retries_total{endpoint=\"/2.0/user\"}"
        ),
        Some(1.0),
        "{m}"
    );
    env.assert_serving().await;
}

#[tokio::test]
async fn upstream_503_always_is_unavailable_after_three_attempts() {
    let env = Env::start().await;
    env.fake.inject(Endpoint::User, Fault::Status(503), None);
    let started = Instant::now();
    let err = env.login("alice", scopes(false, false)).await.unwrap_err();
    assert_status(&err, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
    assert_eq!(env.fake.hits(Endpoint::User), 3);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    env.assert_serving().await;
}

#[tokio::test]
async fn upstream_429_with_retry_after_is_honoured() {
    let env = Env::start().await;
    env.fake
        .inject(Endpoint::User, Fault::StatusRetryAfter(429, 1), Some(1));
    let started = Instant::now();
    let id = env.login("alice", scopes(false, false)).await.unwrap();
    let took = started.elapsed();
    assert_eq!(id.user_id, ALICE);
    assert_eq!(env.fake.hits(Endpoint::User), 2);
    assert!(took >= Duration::from_millis(950), "retried after {took:?}");
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    env.assert_serving().await;
}

#[tokio::test]
async fn token_endpoint_503_is_unavailable_and_not_retried() {
    let env = Env::start().await;
    env.fake.inject(Endpoint::Token, Fault::Status(503), None);
    let err = env.login("alice", scopes(false, false)).await.unwrap_err();
    assert_status(&err, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
    assert_eq!(env.fake.hits(Endpoint::Token), 1);
    assert_eq!(env.fake.hits(Endpoint::User), 0);
    env.assert_serving().await;
}

#[tokio::test]
async fn garbage_json_is_internal_upstream_invalid() {
    let env = Env::start().await;
    env.fake.inject(Endpoint::User, Fault::Garbage, None);
    let err = env.login("alice", scopes(false, false)).await.unwrap_err();
    assert_status(&err, Code::Internal, "UPSTREAM_INVALID");
    assert_eq!(env.fake.hits(Endpoint::User), 1, "garbage is not retried");
    env.assert_serving().await;
}

#[tokio::test]
async fn garbage_from_the_token_endpoint_is_internal() {
    let env = Env::start().await;
    env.fake.inject(Endpoint::Token, Fault::Garbage, None);
    let err = env.login("alice", scopes(false, false)).await.unwrap_err();
    assert_status(&err, Code::Internal, "UPSTREAM_INVALID");
    env.assert_serving().await;
}

#[tokio::test]
async fn huge_body_is_internal() {
    let env = Env::start().await;
    env.fake
        .inject(Endpoint::Workspaces, Fault::HugeBody(8 << 20), None);
    let err = env.login("alice", scopes(false, true)).await.unwrap_err();
    assert_status(&err, Code::Internal, "UPSTREAM_INVALID");
    assert!(
        !err.message().contains("aaaa"),
        "body leaked into the message"
    );
    env.assert_serving().await;
}

#[tokio::test]
async fn upstream_timeout_is_unavailable() {
    let env = Setup::default()
        .connector("upstreamTimeout: 200ms")
        .start()
        .await;
    env.fake
        .inject(Endpoint::User, Fault::Delay(Duration::from_secs(3)), None);
    let started = Instant::now();
    let err = env.login("alice", scopes(false, false)).await.unwrap_err();
    let took = started.elapsed();
    assert_status(&err, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
    assert_eq!(env.fake.hits(Endpoint::User), 3);
    // 3 attempts of 200 ms plus backoff, not the harness's 2 s per attempt.
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    env.assert_serving().await;
}

#[tokio::test]
async fn connection_reset_once_is_retried() {
    let env = Env::start().await;
    env.fake.inject(Endpoint::User, Fault::Reset, Some(1));
    let id = env.login("alice", scopes(false, false)).await.unwrap();
    assert_eq!(id.user_id, ALICE);
    assert_eq!(env.fake.hits(Endpoint::User), 2);
    env.assert_serving().await;
}

#[tokio::test]
async fn connection_reset_always_is_unavailable() {
    let env = Env::start().await;
    env.fake.inject(Endpoint::User, Fault::Reset, None);
    let err = env.login("alice", scopes(false, false)).await.unwrap_err();
    assert_status(&err, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
    assert_eq!(env.fake.hits(Endpoint::User), 3);
    env.assert_serving().await;
}

#[tokio::test]
async fn caller_deadline_is_deadline_exceeded_and_the_server_keeps_serving() {
    let env = Env::start().await;
    env.fake.set_delay(Duration::from_secs(2));
    let mut req = tonic::Request::new(bitbucket_connector::pb::HandleCallbackRequest {
        scopes: scopes(false, false),
        raw_query: format!("code={}&state=s", env.code("alice")),
        ..Default::default()
    });
    // The deadline travels as `grpc-timeout` only: this client has no timer of
    // its own (tonic's Channel would start one and could answer CANCELLED
    // itself), so DEADLINE_EXCEEDED can only come from the service, which
    // cuts the caller's deadline short by max(50 ms, 1/20 of it).
    req.metadata_mut()
        .insert("grpc-timeout", "300m".parse().unwrap());
    let started = Instant::now();
    let answered = tokio::time::timeout(
        Duration::from_millis(1500),
        env.client_without_timer().handle_callback(req),
    )
    .await
    .expect("no answer 1.5 s into a 300 ms deadline: the service ignored it");
    let err = answered.unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(reason(&err), "DEADLINE_EXCEEDED", "{err:?}");
    assert!(took < Duration::from_millis(800), "took {took:?}");
    env.fake.set_delay(Duration::ZERO);
    env.assert_serving().await;
    env.login("alice", scopes(false, false)).await.unwrap();
}

/// Alice in 12 more workspaces, both group options on, 50 ms per upstream
/// answer: the most requests the fake saw at once, and the groups.
async fn widest_login(extra: Option<&str>) -> (u64, Vec<String>) {
    let mut setup = Setup::default()
        .connector("includeTeamGroups: true")
        .connector("getWorkspacePermissions: true");
    if let Some(line) = extra {
        setup = setup.connector(line);
    }
    let env = setup.start().await;
    env.fake.update_fixture(|f| {
        for w in 0..12 {
            f.workspaces.push(Workspace {
                slug: format!("extra-{w}"),
                uuid: format!("{{e0000000-0000-4000-8000-{w:012}}}"),
                name: format!("Extra {w}"),
                members: vec![Membership {
                    user_uuid: ALICE_UUID.to_string(),
                    permission: "member".into(),
                }],
                groups: vec![],
            });
        }
    });
    env.fake.set_delay(Duration::from_millis(50));
    let id = env.login("alice", scopes(false, true)).await.unwrap();
    env.assert_serving().await;
    (env.fake.max_concurrent_requests(), id.groups)
}

#[tokio::test]
async fn upstream_requests_in_flight_are_capped_per_connector() {
    let (wide, groups) = widest_login(None).await;
    // 14 permission calls (alice administers only wonderland) and
    // wonderland's groups; the other groups are known unreadable, not asked.
    assert!(wide >= 12, "a login's workspace calls run at once: {wide}");
    assert!(groups.iter().any(|g| g == "extra-11:member"), "{groups:?}");
    let (capped, capped_groups) = widest_login(Some("upstreamMaxInFlight: 3")).await;
    assert!(capped <= 3, "more than the cap at once: {capped}");
    assert_eq!(capped_groups, groups);
}

#[tokio::test]
async fn access_tokens_never_travel_in_the_query_string() {
    let env = with_admin(
        Setup::default()
            .connector("includeTeamGroups: true")
            .connector("getWorkspacePermissions: true"),
    )
    .start()
    .await;
    env.fake.set_max_pagelen(1);
    env.login("alice", scopes(true, true)).await.unwrap();
    env.login("bob", scopes(false, true)).await.unwrap();
    env.login("alice", scopes(false, false)).await.unwrap();
    assert!(env.fake.hits(Endpoint::Permission) > 0);
    assert!(env.fake.hits(Endpoint::Groups) > 0);
    assert_eq!(env.fake.token_in_query_seen(), 0);
}

// ---------------------------------------------------------------------------
// More edges

#[tokio::test]
async fn offline_access_returns_sealed_connector_data() {
    let env = Env::start().await;
    let id = env.login("alice", scopes(true, false)).await.unwrap();
    assert!(id.connector_data.starts_with(b"v1."), "not sealed");
    let id = env.login("alice", scopes(false, false)).await.unwrap();
    assert!(id.connector_data.is_empty());
}

#[tokio::test]
async fn token_response_quirks_are_accepted() {
    let env = Env::start().await;
    env.fake.set_token_quirks(TokenQuirks {
        expires_in_as_string: true,
        scope_singular: true,
        omit_token_type: true,
    });
    let id = env.login("alice", scopes(true, true)).await.unwrap();
    assert_eq!(id.user_id, ALICE);
    assert!(!id.connector_data.is_empty());
}

#[tokio::test]
async fn rejected_client_credentials_are_unauthenticated() {
    let env = Setup {
        fixture: Fixture::with_client(CLIENT_ID, "another-secret", REDIRECT),
        ..Setup::default()
    }
    .start()
    .await;
    let err = env.login("alice", scopes(false, false)).await.unwrap_err();
    assert_status(&err, Code::Unauthenticated, "CLIENT_REJECTED");
    assert!(!err.message().contains(CLIENT_SECRET), "{}", err.message());
    assert_eq!(env.fake.hits(Endpoint::Token), 1);
}

#[tokio::test]
async fn api_401_is_unauthenticated() {
    let env = Env::start().await;
    env.fake.inject(Endpoint::Emails, Fault::Status(401), None);
    let err = env.login("alice", scopes(false, false)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(env.fake.hits(Endpoint::Emails), 1, "401 is not retried");
    env.assert_serving().await;
}

#[tokio::test]
async fn upstream_502_and_504_are_retried() {
    let env = Env::start().await;
    env.fake.inject(Endpoint::User, Fault::Status(502), Some(1));
    env.fake.inject(Endpoint::User, Fault::Status(504), Some(1));
    env.login("alice", scopes(false, false)).await.unwrap();
    assert_eq!(env.fake.hits(Endpoint::User), 3);
    env.assert_serving().await;
}

#[tokio::test]
async fn upstream_500_is_unavailable_and_not_retried() {
    let env = Env::start().await;
    env.fake.inject(Endpoint::User, Fault::Status(500), None);
    let err = env.login("alice", scopes(false, false)).await.unwrap_err();
    assert_status(&err, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
    assert_eq!(env.fake.hits(Endpoint::User), 1);
    env.assert_serving().await;
}

#[tokio::test]
async fn a_retry_after_past_the_callers_deadline_fails_at_once() {
    let env = Env::start().await;
    env.fake
        .inject(Endpoint::User, Fault::StatusRetryAfter(429, 5), None);
    let mut req = tonic::Request::new(bitbucket_connector::pb::HandleCallbackRequest {
        scopes: scopes(false, false),
        raw_query: format!("code={}&state=s", env.code("alice")),
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(2));
    let started = Instant::now();
    let err = env.client().handle_callback(req).await.unwrap_err();
    let took = started.elapsed();
    assert_status(&err, Code::Unavailable, "UPSTREAM_RATE_LIMITED");
    assert!(took < Duration::from_millis(500), "waited {took:?}");
    assert_eq!(env.fake.hits(Endpoint::User), 1);
    env.assert_serving().await;
}

#[tokio::test]
async fn token_endpoint_reset_is_unavailable_and_not_retried() {
    let env = Env::start().await;
    env.fake.inject(Endpoint::Token, Fault::Reset, None);
    let err = env.login("alice", scopes(false, false)).await.unwrap_err();
    assert_status(&err, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
    assert_eq!(env.fake.hits(Endpoint::Token), 1);
    env.assert_serving().await;
}

#[tokio::test]
async fn token_endpoint_timeout_is_unavailable_and_not_retried() {
    let env = Setup::default()
        .connector("upstreamTimeout: 200ms")
        .start()
        .await;
    env.fake
        .inject(Endpoint::Token, Fault::Delay(Duration::from_secs(2)), None);
    let started = Instant::now();
    let err = env.login("alice", scopes(false, false)).await.unwrap_err();
    assert_status(&err, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
    assert_eq!(env.fake.hits(Endpoint::Token), 1);
    assert!(started.elapsed() < Duration::from_millis(800));
    env.assert_serving().await;
}

#[tokio::test]
async fn a_reset_mid_pagination_is_retried() {
    let env = Env::start().await;
    env.fake.set_max_pagelen(1);
    // The first Workspaces page is answered, the second reset once.
    env.fake
        .inject(Endpoint::Workspaces, Fault::Delay(Duration::ZERO), Some(1));
    env.fake.inject(Endpoint::Workspaces, Fault::Reset, Some(1));
    let id = env.login("alice", scopes(false, true)).await.unwrap();
    assert_eq!(groups_of(&id), ["wonderland", "looking-glass", "tea-party"]);
    assert_eq!(env.fake.hits(Endpoint::Workspaces), 4);
    env.assert_serving().await;
}

#[tokio::test]
async fn a_next_link_that_loops_is_upstream_invalid() {
    let env = Env::start().await;
    let again = format!("{}/user/workspaces?pagelen=100&page=1", env.fake.api_url());
    env.fake
        .inject(Endpoint::Workspaces, Fault::ForeignNext(again), None);
    let err = env.login("alice", scopes(false, true)).await.unwrap_err();
    assert_status(&err, Code::Internal, "UPSTREAM_INVALID");
    assert_eq!(env.fake.hits(Endpoint::Workspaces), 2);
    env.assert_serving().await;
}

#[tokio::test]
async fn upstream_metrics_name_endpoint_templates_not_workspaces() {
    let env = Setup {
        telemetry: true,
        ..Setup::default()
    }
    .connector("includeTeamGroups: true")
    .connector("getWorkspacePermissions: true")
    .start()
    .await;
    env.login("alice", scopes(false, true)).await.unwrap();
    let m = env.metrics().await;
    for sample in [
        "bitbucket_connector_upstream_requests_total{endpoint=\"/2.0/user/workspaces/{workspace}/permission\",status=\"200\"}",
        "bitbucket_connector_upstream_requests_total{endpoint=\"/1.0/groups/{workspace}\",status=\"200\"}",
        "bitbucket_connector_rpc_requests_total{method=\"HandleCallback\",code=\"OK\"}",
    ] {
        assert!(metric(&m, sample).is_some_and(|v| v >= 1.0), "{sample} missing:\n{m}");
    }
    for leak in [
        "wonderland",
        "looking-glass",
        "tea-party",
        "alice",
        "127.0.0.1",
    ] {
        assert!(!m.contains(leak), "{leak} in metrics:\n{m}");
    }
}

#[tokio::test]
async fn team_groups_do_not_depend_on_who_logged_in_before() {
    // No teamGroupsAuth: groups are read with each user's own token, and
    // bob's (a plain member of wonderland) cannot read wonderland's groups.
    let env = Setup::default()
        .connector("includeTeamGroups: true")
        .start()
        .await;
    let before = env.login("bob", scopes(false, true)).await.unwrap();
    assert_eq!(groups_of(&before), ["wonderland"]);
    // alice, an owner, reads (and caches) wonderland's groups.
    env.login("alice", scopes(false, true)).await.unwrap();
    let after = env.login("bob", scopes(false, true)).await.unwrap();
    assert_eq!(
        after.groups, before.groups,
        "bob's groups changed because alice logged in: the group cache is keyed by workspace only"
    );
}

#[tokio::test]
async fn a_refused_groups_read_is_retried_when_the_cache_is_off() {
    let env = Setup::default()
        .connector("includeTeamGroups: true")
        .connector("teams: [wonderland]")
        .connector("teamGroupsCacheTTL: 0s")
        .start()
        .await;
    env.fake
        .inject(Endpoint::Groups, Fault::Status(403), Some(1));
    let id = env.login("alice", scopes(false, true)).await.unwrap();
    assert_eq!(groups_of(&id), ["wonderland"]);
    let id = env.login("alice", scopes(false, true)).await.unwrap();
    assert_eq!(
        groups_of(&id),
        [
            "wonderland",
            "wonderland/developers",
            "wonderland/administrators"
        ]
    );
}

#[tokio::test]
async fn a_rejected_team_groups_credential_degrades_instead_of_failing_the_login() {
    let env = Setup {
        telemetry: true,
        ..Setup::default()
    }
    .connector("includeTeamGroups: true")
    .connector("teams: [looking-glass]")
    .connector("teamGroupsAuth: {username: admin@example.com, password: wrong-password}")
    .start()
    .await;
    let id = env.login("alice", scopes(false, true)).await.unwrap();
    assert_eq!(groups_of(&id), ["looking-glass"]);
    let m = env.metrics().await;
    assert_eq!(
        metric(
            &m,
            "bitbucket_connector_team_groups_degraded_total{reason=\"unauthorized\"}"
        ),
        Some(1.0),
        "{m}"
    );
}
