//! The domain's rules against an in-memory Bitbucket and a clock moved by
//! hand: no socket, no sleep. The same behaviour over the real gRPC port and
//! the fake over HTTP is pinned in tests/it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::*;
use crate::config::{BasicAuth, DataKey, TeamGroup};

const ALICE: &str = "{aaaaaaaa-0000-0000-0000-000000000001}";
const BOB: &str = "{bbbbbbbb-0000-0000-0000-000000000002}";
const TOKEN_ENDPOINT: &str = "/site/oauth2/access_token";

/// A clock that only moves when told to.
struct TestClock(Mutex<SystemTime>);

impl TestClock {
    fn new() -> Arc<TestClock> {
        Arc::new(TestClock(Mutex::new(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        )))
    }

    fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl Clock for TestClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

/// What the in-memory Bitbucket knows and answers.
#[derive(Default)]
struct Upstream {
    /// Access token -> its user.
    users: HashMap<String, User>,
    emails: Vec<Email>,
    workspaces: Vec<WorkspaceAccess>,
    permissions: HashMap<String, Access<String>>,
    group_lists: HashMap<String, Access<Vec<Group>>>,
    /// What a user's own token reads, where it differs from `group_lists`.
    user_group_lists: HashMap<String, Access<Vec<Group>>>,
    /// What `/1.0/groups?group=` shows the user, by `ws/group` filter.
    visible: HashMap<String, Group>,
    codes: HashMap<String, Grant>,
    refreshes: HashMap<String, Result<Grant, UpstreamError>>,
}

/// The [`Bitbucket`] double: answers from [`Upstream`], counts every call,
/// and can hold refresh token redemptions until the test lets them go.
#[derive(Default)]
struct Double {
    upstream: Mutex<Upstream>,
    calls: Mutex<Vec<String>>,
    redemption_gate: Option<Semaphore>,
}

impl Double {
    fn count(&self, call: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.as_str() == call)
            .count()
    }

    fn record(&self, call: impl Into<String>) {
        self.calls.lock().unwrap().push(call.into());
    }

    fn unauthorized(endpoint: &'static str) -> UpstreamError {
        UpstreamError::Unauthorized { endpoint }
    }
}

impl Bitbucket for Double {
    const MAX_GROUP_FILTERS: usize = 2;

    fn authorize_url(&self, state: &str) -> String {
        format!("https://bitbucket.invalid/site/oauth2/authorize?state={state}")
    }

    async fn exchange_code(&self, code: &str, _: Instant) -> Result<Grant, UpstreamError> {
        self.record("exchange_code");
        let up = self.upstream.lock().unwrap();
        up.codes
            .get(code)
            .cloned()
            .ok_or_else(|| UpstreamError::GrantRejected {
                error: "invalid_grant".into(),
                description: None,
            })
    }

    async fn redeem_refresh_token(
        &self,
        refresh_token: &Secret,
        _: Instant,
    ) -> Result<Grant, UpstreamError> {
        self.record("redeem");
        if let Some(gate) = &self.redemption_gate {
            let _permit = gate.acquire().await.unwrap();
        }
        let up = self.upstream.lock().unwrap();
        up.refreshes
            .get(refresh_token.expose())
            .cloned()
            .unwrap_or_else(|| {
                Err(UpstreamError::GrantRejected {
                    error: "invalid_grant".into(),
                    description: Some("unknown refresh token".into()),
                })
            })
    }

    async fn user(&self, token: &Secret, _: Instant) -> Result<User, UpstreamError> {
        self.record("user");
        let up = self.upstream.lock().unwrap();
        up.users
            .get(token.expose())
            .cloned()
            .ok_or_else(|| Double::unauthorized("/2.0/user"))
    }

    async fn emails(&self, token: &Secret, _: Instant) -> Result<Vec<Email>, UpstreamError> {
        self.record("emails");
        let up = self.upstream.lock().unwrap();
        if !up.users.contains_key(token.expose()) {
            return Err(Double::unauthorized("/2.0/user/emails"));
        }
        Ok(up.emails.clone())
    }

    async fn workspaces(
        &self,
        _: &Secret,
        _: Instant,
    ) -> Result<Vec<WorkspaceAccess>, UpstreamError> {
        self.record("workspaces");
        Ok(self.upstream.lock().unwrap().workspaces.clone())
    }

    async fn permission(
        &self,
        _: &Secret,
        workspace: &str,
        _: Instant,
    ) -> Result<Access<String>, UpstreamError> {
        self.record(format!("permission {workspace}"));
        let up = self.upstream.lock().unwrap();
        Ok(up
            .permissions
            .get(workspace)
            .cloned()
            .unwrap_or(Access::Denied(Denial::NotFound)))
    }

    async fn group_list(
        &self,
        caller: Caller<'_>,
        workspace: &str,
        _: Instant,
    ) -> Result<Access<Vec<Group>>, UpstreamError> {
        let who = match caller {
            Caller::User(_) => "user",
            Caller::Admin(_) => "admin",
        };
        self.record(format!("group_list {workspace} as {who}"));
        let up = self.upstream.lock().unwrap();
        let own = match caller {
            Caller::User(_) => up.user_group_lists.get(workspace),
            Caller::Admin(_) => None,
        };
        Ok(own
            .or_else(|| up.group_lists.get(workspace))
            .cloned()
            .unwrap_or(Access::Denied(Denial::NotFound)))
    }

    async fn group_membership(
        &self,
        _: &Secret,
        wanted: &[TeamGroup],
        _: Instant,
    ) -> Result<Vec<Group>, UpstreamError> {
        assert!(wanted.len() <= Self::MAX_GROUP_FILTERS, "{wanted:?}");
        self.record("group_membership");
        let up = self.upstream.lock().unwrap();
        Ok(wanted
            .iter()
            .filter_map(|t| up.visible.get(&format!("{}/{}", t.workspace, t.group)))
            .cloned()
            .collect())
    }
}

fn user(uuid: &str, username: &str) -> User {
    User {
        uuid: uuid.into(),
        username: Some(username.into()),
        nickname: Some(format!("{username}-nick")),
    }
}

fn ws(slug: &str, uuid: &str, administrator: bool) -> WorkspaceAccess {
    WorkspaceAccess {
        slug: slug.into(),
        uuid: Some(uuid.into()),
        administrator,
    }
}

fn group(slug: &str, members: &[&str]) -> Group {
    Group {
        slug: slug.into(),
        members: members.iter().map(|m| m.to_string()).collect(),
        owner: None,
    }
}

fn grant(access: &str, refresh: &str) -> Grant {
    Grant {
        access_token: Secret::new(access),
        refresh_token: Some(Secret::new(refresh)),
        expires_in: Some(Duration::from_secs(7200)),
    }
}

/// alice, with `at-1` (from `code-1`, refreshed by `rt-1` into `at-2`/`rt-2`),
/// in the workspaces alpha (which she administers) and beta.
fn upstream() -> Upstream {
    let mut up = Upstream {
        emails: vec![
            Email {
                address: "old@example.com".into(),
                primary: true,
                confirmed: false,
            },
            Email {
                address: "alice@example.com".into(),
                primary: true,
                confirmed: true,
            },
        ],
        workspaces: vec![ws("alpha", "{A1}", true), ws("beta", "{B2}", false)],
        ..Default::default()
    };
    up.users.insert("at-1".into(), user(ALICE, "alice"));
    up.users.insert("at-2".into(), user(ALICE, "alice"));
    up.codes.insert("code-1".into(), grant("at-1", "rt-1"));
    up.refreshes
        .insert("rt-1".into(), Ok(grant("at-2", "rt-2")));
    up.permissions
        .insert("beta".into(), Access::Read("member".into()));
    up
}

fn config() -> ConnectorConfig {
    let url = |s: &str| url::Url::parse(s).unwrap();
    ConnectorConfig {
        id: "bitbucket-cloud".into(),
        name: "Bitbucket Cloud".into(),
        client_id: "client".into(),
        client_secret: Secret::new("client-secret"),
        redirect_uri: "http://127.0.0.1:5556/dex/callback".into(),
        teams: Vec::new(),
        include_team_groups: false,
        get_workspace_permissions: false,
        team_groups_auth: None,
        team_groups_cache_ttl: Duration::ZERO,
        auth_url: url("https://bitbucket.invalid/site/oauth2/authorize"),
        token_url: url("https://bitbucket.invalid/site/oauth2/access_token"),
        api_url: url("https://api.bitbucket.invalid/2.0"),
        legacy_api_url: url("https://api.bitbucket.invalid/1.0"),
        upstream_timeout: Duration::from_secs(10),
        upstream_max_in_flight: 16,
        team_groups: Vec::new(),
        permission_cache_ttl: Duration::ZERO,
        refresh_cache_ttl: Duration::ZERO,
        rate_limit_backoff: Duration::from_secs(60),
    }
}

struct World {
    connector: Connector<Double>,
    clock: Arc<TestClock>,
    metrics: Metrics,
}

impl World {
    fn new(cfg: ConnectorConfig, up: Upstream) -> World {
        World::with_double(
            cfg,
            Double {
                upstream: Mutex::new(up),
                ..Default::default()
            },
        )
    }

    fn with_double(cfg: ConnectorConfig, double: Double) -> World {
        let clock = TestClock::new();
        let metrics = Metrics::new();
        let sealer = Arc::new(Sealer::new(&[DataKey([7; 32])], false).unwrap());
        let connector = Connector::new(cfg, double, clock.clone(), sealer, metrics.clone(), None);
        World {
            connector,
            clock,
            metrics,
        }
    }

    fn bitbucket(&self) -> &Double {
        &self.connector.bitbucket
    }

    async fn login(&self, scopes: Scopes) -> Result<Identity, Error> {
        self.connector
            .handle_callback(scopes, "code=code-1&state=s", deadline())
            .await
    }

    /// Connector data as a login at the clock's now would have sealed it,
    /// with the access token expiring `left` from now.
    fn sealed(&self, access: &str, refresh: &str, left: Duration) -> Vec<u8> {
        let tokens = Tokens {
            access_token: Secret::new(access),
            refresh_token: Some(Secret::new(refresh)),
            expiry: Some(self.clock.now() + left),
            user_uuid: Some(ALICE.into()),
        };
        self.connector.seal(&tokens).unwrap()
    }

    async fn refresh(&self, scopes: Scopes, data: &[u8]) -> Result<Identity, Error> {
        let previous = Identity {
            user_id: ALICE.into(),
            connector_data: Some(data.to_vec()),
            ..Default::default()
        };
        self.connector.refresh(scopes, &previous, deadline()).await
    }

    fn opened(&self, identity: &Identity) -> Tokens {
        let data = identity.connector_data.as_deref().unwrap();
        self.connector
            .sealer
            .open("bitbucket-cloud", data)
            .unwrap()
            .0
    }

    fn metric(&self, line: &str) -> Option<f64> {
        self.metrics.encode().lines().find_map(|l| {
            l.strip_prefix(line)
                .and_then(|rest| rest.trim().parse::<f64>().ok())
        })
    }
}

fn degraded_in(w: &World, reason: &str) -> Option<f64> {
    w.metric(&format!(
        "bitbucket_connector_team_groups_degraded_total{{reason=\"{reason}\"}}"
    ))
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

const GROUPS: Scopes = Scopes {
    offline_access: false,
    groups: true,
};
const OFFLINE: Scopes = Scopes {
    offline_access: true,
    groups: false,
};

#[test]
fn callback_query_parsing() {
    assert_eq!(parse_callback("code=abc&state=x").unwrap(), "abc");
    assert_eq!(parse_callback("?state=x&code=a%2Bb").unwrap(), "a+b");
    match parse_callback("error=access_denied&error_description=The+user+said+no") {
        Err(e @ Error::Callback { .. }) => {
            assert_eq!(e.to_string(), "bitbucket: access_denied: The user said no")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        parse_callback("error=server_error")
            .unwrap_err()
            .to_string(),
        "bitbucket: server_error"
    );
    for bad in ["", "state=x", "code=", "%%%", "code"] {
        assert!(
            matches!(parse_callback(bad), Err(Error::MalformedCallback(_))),
            "{bad:?}"
        );
    }
    assert!(matches!(
        parse_callback(&format!("code={}", "a".repeat(MAX_RAW_QUERY))),
        Err(Error::MalformedCallback(_))
    ));
}

#[test]
fn groups_are_ordered_member_only_and_unique() {
    let me = "{11111111-1111-1111-1111-111111111111}";
    let kept = vec![ws("alpha", "{a}", false), ws("beta", "{b}", false)];
    let details = vec![
        WorkspaceDetails {
            permission: Some("owner".into()),
            groups: Some(Arc::new(vec![
                group("devs", &[me]),
                group("ops", &["{someone-else}"]),
                group("admins", &["{11111111-1111-1111-1111-111111111111}"]),
            ])),
        },
        WorkspaceDetails {
            permission: Some("member".into()),
            groups: None,
        },
    ];
    assert_eq!(
        compose_groups(&kept, &details, me),
        [
            "alpha",
            "beta",
            "alpha/devs",
            "alpha/admins",
            "alpha:owner",
            "beta:member"
        ]
    );
}

#[test]
fn teams_match_by_slug_or_uuid() {
    let w = ws("my-team", "{6F0C3A52-0000-0000-0000-000000000000}", false);
    assert!(team_matches("my-team", &w));
    assert!(team_matches("MY-TEAM", &w));
    assert!(team_matches("{6f0c3a52-0000-0000-0000-000000000000}", &w));
    assert!(!team_matches("other", &w));
    assert!(!team_matches("{00000000-0000-0000-0000-000000000000}", &w));
}

#[test]
fn primary_email_must_be_confirmed() {
    let e = |email: &str, p, c| Email {
        address: email.into(),
        primary: p,
        confirmed: c,
    };
    assert_eq!(
        primary_email(&[
            e("a@x", true, false),
            e("b@x", false, true),
            e("c@x", true, true)
        ]),
        Some("c@x".into())
    );
    assert_eq!(
        primary_email(&[e("a@x", true, false), e("b@x", false, true)]),
        None
    );
}

#[test]
fn token_usability_margin() {
    let now = SystemTime::now();
    assert!(usable(None, now));
    assert!(usable(Some(now + Duration::from_secs(31)), now));
    assert!(!usable(Some(now + Duration::from_secs(29)), now));
    assert!(!usable(Some(now - Duration::from_secs(1)), now));
}

#[test]
fn slugs() {
    assert!(valid_slug("my-team_2"));
    for bad in ["", ".", "..", "a/b", "a b", "a?b"] {
        assert!(!valid_slug(bad), "{bad:?}");
    }
}

#[test]
fn cached_identities_never_carry_connector_data() {
    let i = Identity {
        user_id: "{a}".into(),
        username: "alice".into(),
        groups: vec!["w".into()],
        connector_data: Some(b"v1.sealed".to_vec()),
        email_verified: true,
        ..Default::default()
    };
    let back = CachedIdentity::of(&i).identity();
    assert_eq!(back.connector_data, None);
    assert_eq!(
        Identity {
            connector_data: None,
            ..i
        },
        back
    );
    assert_eq!(normal_uuid(" {ABC-1} "), "abc-1");
}

#[tokio::test]
async fn a_login_is_the_users_uuid_names_and_confirmed_primary_email() {
    let w = World::new(config(), upstream());
    let i = w.login(OFFLINE).await.unwrap();
    assert_eq!(i.user_id, ALICE);
    assert_eq!(i.username, "alice");
    assert_eq!(i.preferred_username, "alice-nick");
    assert_eq!(i.email, "alice@example.com");
    assert!(i.email_verified);
    assert!(i.groups.is_empty());
    let tokens = w.opened(&i);
    assert_eq!(tokens.access_token.expose(), "at-1");
    assert_eq!(tokens.refresh_token.as_ref().unwrap().expose(), "rt-1");
    assert_eq!(
        tokens.expiry,
        Some(w.clock.now() + Duration::from_secs(7200)),
        "the expiry is read from the injected clock"
    );
    assert_eq!(
        w.bitbucket().count("workspaces"),
        0,
        "no groups asked, no teams"
    );
}

#[tokio::test]
async fn teams_keep_the_workspaces_named_by_slug() {
    let cfg = ConnectorConfig {
        teams: vec!["BETA".into()],
        ..config()
    };
    let w = World::new(cfg, upstream());
    assert_eq!(w.login(GROUPS).await.unwrap().groups, ["beta"]);
}

#[tokio::test]
async fn teams_keep_the_workspaces_named_by_uuid() {
    let cfg = ConnectorConfig {
        teams: vec![
            "{a1}".into(),
            "{ffffffff-0000-0000-0000-000000000000}".into(),
        ],
        ..config()
    };
    let w = World::new(cfg, upstream());
    assert_eq!(w.login(GROUPS).await.unwrap().groups, ["alpha"]);
    // The whitelist applies without the groups scope too.
    let plain = w
        .login(Scopes {
            offline_access: false,
            groups: false,
        })
        .await
        .unwrap();
    assert_eq!(plain.groups, ["alpha"]);
}

#[tokio::test]
async fn no_team_matching_is_not_in_required_teams() {
    let cfg = ConnectorConfig {
        teams: vec!["gamma".into(), "{B3}".into()],
        ..config()
    };
    let w = World::new(cfg, upstream());
    match w.login(GROUPS).await {
        Err(Error::NotInRequiredTeams { username }) => assert_eq!(username, "alice"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn groups_are_workspaces_in_upstream_order_then_groups_then_permissions_once_each() {
    let cfg = ConnectorConfig {
        include_team_groups: true,
        get_workspace_permissions: true,
        team_groups_auth: Some(BasicAuth {
            username: "admin".into(),
            password: Secret::new("admin-password"),
        }),
        ..config()
    };
    let mut up = upstream();
    // Bitbucket listing a workspace twice, and a group twice.
    up.workspaces = vec![
        ws("beta", "{B2}", false),
        ws("alpha", "{A1}", true),
        ws("beta", "{B2}", false),
    ];
    up.group_lists.insert(
        "alpha".into(),
        Access::Read(vec![
            group("devs", &[BOB, ALICE]),
            group("ops", &[BOB]),
            group("devs", &[ALICE]),
            // Member uuids compare without braces and case.
            group("admins", &["AAAAAAAA-0000-0000-0000-000000000001"]),
        ]),
    );
    up.group_lists.insert(
        "beta".into(),
        Access::Read(vec![group("readers", &[ALICE])]),
    );
    let w = World::new(cfg, up);
    assert_eq!(
        w.login(GROUPS).await.unwrap().groups,
        [
            "beta",
            "alpha",
            "beta/readers",
            "alpha/devs",
            "alpha/admins",
            "beta:member",
            "alpha:owner",
        ]
    );
    // An administrator is an owner: only beta's permission is asked.
    assert_eq!(w.bitbucket().count("permission alpha"), 0);
    assert!(w.bitbucket().count("permission beta") >= 1);
    assert_eq!(w.bitbucket().count("group_list alpha as admin"), 1);
}

#[tokio::test]
async fn unreadable_group_lists_leave_that_workspaces_groups_out_and_count() {
    let cfg = ConnectorConfig {
        include_team_groups: true,
        team_groups_auth: Some(BasicAuth {
            username: "admin".into(),
            password: Secret::new("wrong"),
        }),
        ..config()
    };
    let mut up = upstream();
    up.group_lists
        .insert("alpha".into(), Access::Denied(Denial::Unauthorized));
    up.user_group_lists
        .insert("alpha".into(), Access::Read(vec![group("devs", &[ALICE])]));
    up.group_lists
        .insert("beta".into(), Access::Denied(Denial::Forbidden));
    up.workspaces.push(ws("gamma", "{C3}", true));
    up.user_group_lists
        .insert("gamma".into(), Access::Denied(Denial::Gone));
    let w = World::new(cfg, up);
    assert_eq!(
        w.login(GROUPS).await.unwrap().groups,
        ["alpha", "beta", "gamma", "alpha/devs"]
    );
    // alpha's admin credential was refused and alice administers alpha:
    // asked again with her own token, which may read it. beta she does not
    // administer: not asked again.
    assert_eq!(w.bitbucket().count("group_list alpha as admin"), 1);
    assert_eq!(w.bitbucket().count("group_list alpha as user"), 1);
    assert_eq!(w.bitbucket().count("group_list beta as user"), 0);
    assert_eq!(
        degraded_in(&w, "unauthorized"),
        None,
        "alpha was read in the end"
    );
    assert_eq!(degraded_in(&w, "forbidden"), Some(1.0));
    assert_eq!(degraded_in(&w, "gone"), Some(1.0));

    // The refused credential alone, for a workspace alice does not administer.
    let mut up = upstream();
    up.group_lists
        .insert("beta".into(), Access::Denied(Denial::Unauthorized));
    let w = World::new(
        ConnectorConfig {
            teams: vec!["beta".into()],
            ..w.connector.cfg.clone()
        },
        up,
    );
    assert_eq!(w.login(GROUPS).await.unwrap().groups, ["beta"]);
    assert_eq!(degraded_in(&w, "unauthorized"), Some(1.0));
}

#[tokio::test]
async fn without_team_groups_auth_a_non_admin_is_not_asked_for_group_lists() {
    let cfg = ConnectorConfig {
        include_team_groups: true,
        ..config()
    };
    let mut up = upstream();
    up.group_lists
        .insert("alpha".into(), Access::Read(vec![group("devs", &[ALICE])]));
    up.group_lists.insert(
        "beta".into(),
        Access::Read(vec![group("readers", &[ALICE])]),
    );
    let w = World::new(cfg, up);
    assert_eq!(
        w.login(GROUPS).await.unwrap().groups,
        ["alpha", "beta", "alpha/devs"]
    );
    assert_eq!(w.bitbucket().count("group_list alpha as user"), 1);
    assert_eq!(w.bitbucket().count("group_list beta as user"), 0);
    assert_eq!(degraded_in(&w, "forbidden"), Some(1.0));
}

#[tokio::test]
async fn team_groups_come_from_membership_checks_in_configured_order_and_chunks() {
    let tg = |w: &str, g: &str| TeamGroup {
        workspace: w.into(),
        group: g.into(),
    };
    let cfg = ConnectorConfig {
        // gamma is not one of alice's workspaces: never asked.
        team_groups: vec![
            tg("beta", "readers"),
            tg("gamma", "devs"),
            tg("alpha", "ops"),
            tg("alpha", "devs"),
        ],
        ..config()
    };
    let mut up = upstream();
    up.visible
        .insert("alpha/devs".into(), group("devs", &[ALICE]));
    up.visible
        .insert("beta/readers".into(), group("readers", &[ALICE]));
    // Visible but without alice among its members: not hers.
    up.visible.insert("alpha/ops".into(), group("ops", &[BOB]));
    let w = World::new(cfg, up);
    assert_eq!(
        w.login(GROUPS).await.unwrap().groups,
        ["alpha", "beta", "alpha/devs", "beta/readers"]
    );
    // Three wanted groups, two filters a request.
    assert_eq!(w.bitbucket().count("group_membership"), 2);
    assert_eq!(w.bitbucket().count("group_list alpha as user"), 0);
}

#[tokio::test]
async fn a_token_with_31_seconds_left_is_used_and_one_with_29_is_refreshed() {
    let w = World::new(config(), upstream());
    let data = w.sealed("at-1", "rt-1", Duration::from_secs(31));
    let i = w.refresh(OFFLINE, &data).await.unwrap();
    assert_eq!(w.bitbucket().count("redeem"), 0);
    assert_eq!(
        i.connector_data.as_deref(),
        Some(&data[..]),
        "unchanged tokens keep their sealed data"
    );

    let data = w.sealed("at-1", "rt-1", Duration::from_secs(29));
    let i = w.refresh(OFFLINE, &data).await.unwrap();
    assert_eq!(w.bitbucket().count("redeem"), 1);
    let tokens = w.opened(&i);
    assert_eq!(tokens.access_token.expose(), "at-2");
    assert_eq!(tokens.refresh_token.as_ref().unwrap().expose(), "rt-2");
    assert_eq!(tokens.user_uuid.as_deref(), Some(ALICE));
}

#[tokio::test]
async fn the_margin_moves_with_the_clock() {
    let w = World::new(config(), upstream());
    let data = w.sealed("at-1", "rt-1", Duration::from_secs(60));
    w.refresh(OFFLINE, &data).await.unwrap();
    assert_eq!(w.bitbucket().count("redeem"), 0);
    w.clock.advance(Duration::from_secs(31));
    w.refresh(OFFLINE, &data).await.unwrap();
    assert_eq!(w.bitbucket().count("redeem"), 1);
}

#[tokio::test]
async fn concurrent_refreshes_with_one_refresh_token_share_one_redemption() {
    let w = World::with_double(
        config(),
        Double {
            upstream: Mutex::new(upstream()),
            redemption_gate: Some(Semaphore::new(0)),
            ..Default::default()
        },
    );
    let data = w.sealed("at-1", "rt-1", Duration::ZERO);
    let release = async {
        while w.bitbucket().count("redeem") == 0 {
            tokio::task::yield_now().await;
        }
        // Let the other refreshes reach the shared redemption (or, were it
        // not shared, their own), then open the gate for as many as came.
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        w.bitbucket()
            .redemption_gate
            .as_ref()
            .unwrap()
            .add_permits(10);
    };
    let (a, b, c, ()) = tokio::join!(
        w.refresh(OFFLINE, &data),
        w.refresh(OFFLINE, &data),
        w.refresh(OFFLINE, &data),
        release
    );
    assert_eq!(w.bitbucket().count("redeem"), 1);
    for i in [a, b, c] {
        let tokens = w.opened(&i.unwrap());
        assert_eq!(tokens.refresh_token.as_ref().unwrap().expose(), "rt-2");
    }
    assert_eq!(w.connector.metrics.refresh_joined.get(), 2);
    // Once it is over, the next caller with the old token redeems again.
    w.refresh(OFFLINE, &data).await.unwrap();
    assert_eq!(w.bitbucket().count("redeem"), 2);
}

#[tokio::test]
async fn a_shared_redemption_failure_keeps_its_endpoint_and_status() {
    let mut up = upstream();
    up.refreshes.insert(
        "rt-1".into(),
        Err(UpstreamError::Unavailable {
            endpoint: TOKEN_ENDPOINT,
            detail: "HTTP 503".into(),
        }),
    );
    up.refreshes.insert(
        "rt-9".into(),
        Err(UpstreamError::RateLimited {
            endpoint: TOKEN_ENDPOINT,
            retry_after: Duration::from_millis(2500),
        }),
    );
    let w = World::new(config(), up);
    let e = w
        .refresh(OFFLINE, &w.sealed("at-1", "rt-1", Duration::ZERO))
        .await
        .unwrap_err();
    match e.unshared() {
        Error::Upstream(UpstreamError::Unavailable { endpoint, .. }) => {
            assert_eq!(*endpoint, TOKEN_ENDPOINT)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        e.to_string(),
        "bitbucket: /site/oauth2/access_token: HTTP 503"
    );
    let e = w
        .refresh(OFFLINE, &w.sealed("at-1", "rt-9", Duration::ZERO))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.unshared(),
            Error::Upstream(UpstreamError::RateLimited { retry_after, .. })
                if *retry_after == Duration::from_millis(2500)
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_rejected_refresh_token_is_a_revoked_grant() {
    let w = World::new(config(), upstream());
    let e = w
        .refresh(OFFLINE, &w.sealed("at-1", "rt-unknown", Duration::ZERO))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.unshared(),
            Error::TokenRevoked(Revoked::Upstream(UpstreamError::GrantRejected { .. }))
        ),
        "{e:?}"
    );
    assert_eq!(
        w.metric("bitbucket_connector_refresh_redemptions_total{outcome=\"revoked\"}"),
        Some(1.0)
    );
}

#[tokio::test]
async fn an_access_token_refused_before_its_expiry_is_redeemed_once() {
    let mut up = upstream();
    up.users.remove("at-1");
    let w = World::new(config(), up);
    let i = w
        .refresh(
            OFFLINE,
            &w.sealed("at-1", "rt-1", Duration::from_secs(3600)),
        )
        .await
        .unwrap();
    assert_eq!(w.bitbucket().count("redeem"), 1);
    assert_eq!(w.opened(&i).access_token.expose(), "at-2");

    // And when the new one is refused too, the grant is gone.
    w.bitbucket().upstream.lock().unwrap().users.clear();
    let e = w
        .refresh(
            OFFLINE,
            &w.sealed("at-1", "rt-1", Duration::from_secs(3600)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::TokenRevoked(Revoked::Upstream(UpstreamError::Unauthorized { .. }))
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_different_user_behind_the_tokens_is_denied() {
    let mut up = upstream();
    up.users.insert("at-1".into(), user(BOB, "bob"));
    let w = World::new(config(), up);
    let e = w
        .refresh(
            OFFLINE,
            &w.sealed("at-1", "rt-1", Duration::from_secs(3600)),
        )
        .await
        .unwrap_err();
    match e {
        Error::UserChanged { expected, actual } => {
            assert_eq!(expected, ALICE);
            assert_eq!(actual, BOB);
        }
        other => panic!("{other:?}"),
    }
    // Connector data sealed for alice, presented as bob's: denied before
    // any call.
    let calls = w.bitbucket().calls.lock().unwrap().len();
    let previous = Identity {
        user_id: BOB.into(),
        connector_data: Some(w.sealed("at-1", "rt-1", Duration::from_secs(3600))),
        ..Default::default()
    };
    let e = w
        .connector
        .refresh(OFFLINE, &previous, deadline())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::UserChanged { .. }), "{e:?}");
    assert_eq!(w.bitbucket().calls.lock().unwrap().len(), calls);
}

#[tokio::test]
async fn permissions_are_cached_for_the_permission_cache_ttl() {
    let cfg = ConnectorConfig {
        get_workspace_permissions: true,
        permission_cache_ttl: Duration::from_secs(600),
        ..config()
    };
    let w = World::new(cfg, upstream());
    let first = w.login(GROUPS).await.unwrap();
    assert_eq!(
        first.groups,
        ["alpha", "beta", "alpha:owner", "beta:member"]
    );
    w.clock.advance(Duration::from_secs(599));
    assert_eq!(w.login(GROUPS).await.unwrap().groups, first.groups);
    assert_eq!(w.bitbucket().count("permission beta"), 1);
    w.clock.advance(Duration::from_secs(1));
    w.bitbucket()
        .upstream
        .lock()
        .unwrap()
        .permissions
        .insert("beta".into(), Access::Read("collaborator".into()));
    assert_eq!(
        w.login(GROUPS).await.unwrap().groups,
        ["alpha", "beta", "alpha:owner", "beta:collaborator"]
    );
    assert_eq!(w.bitbucket().count("permission beta"), 2);
}

#[tokio::test]
async fn a_refresh_within_the_refresh_cache_ttl_asks_bitbucket_nothing() {
    let cfg = ConnectorConfig {
        refresh_cache_ttl: Duration::from_secs(60),
        ..config()
    };
    let w = World::new(cfg, upstream());
    let login = w.login(OFFLINE).await.unwrap();
    let data = login.connector_data.clone().unwrap();
    let calls = w.bitbucket().calls.lock().unwrap().len();

    w.clock.advance(Duration::from_secs(59));
    let cached = w.refresh(OFFLINE, &data).await.unwrap();
    assert_eq!(w.bitbucket().calls.lock().unwrap().len(), calls);
    assert_eq!(cached.email, "alice@example.com");
    assert_eq!(cached.connector_data.as_deref(), Some(&data[..]));

    w.clock.advance(Duration::from_secs(1));
    w.refresh(OFFLINE, &data).await.unwrap();
    assert_eq!(w.bitbucket().count("user"), 2, "the entry expired");
}

#[tokio::test]
async fn the_refresh_cache_is_not_used_once_the_access_token_needs_refreshing() {
    let cfg = ConnectorConfig {
        refresh_cache_ttl: Duration::from_secs(3600),
        ..config()
    };
    let w = World::new(cfg, upstream());
    let data = w.login(OFFLINE).await.unwrap().connector_data.unwrap();
    // 7200 s tokens: 31 s before the end the margin is passed.
    w.clock.advance(Duration::from_secs(7200 - 29));
    let i = w.refresh(OFFLINE, &data).await.unwrap();
    assert_eq!(w.bitbucket().count("redeem"), 1);
    assert_eq!(w.opened(&i).access_token.expose(), "at-2");
}

#[test]
fn upstream_errors_keep_their_messages() {
    let deadline = Error::from(UpstreamError::DeadlineExceeded {
        endpoint: "/2.0/user",
    });
    assert_eq!(
        deadline.to_string(),
        "deadline exceeded (/2.0/user: the caller's deadline passed)"
    );
    let unauthorized = Error::from(UpstreamError::Unauthorized {
        endpoint: "/2.0/user",
    });
    assert_eq!(
        unauthorized.to_string(),
        "bitbucket: the access token was not accepted (/2.0/user: HTTP 401 (token not accepted))"
    );
    let client = Error::from(UpstreamError::ClientRejected {
        error: "invalid_client".into(),
        description: Some("no such consumer".into()),
    });
    assert_eq!(
        client.to_string(),
        "bitbucket: the OAuth consumer's credentials were rejected: token endpoint: invalid_client: no such consumer"
    );
    let code = Error::from(UpstreamError::GrantRejected {
        error: "invalid_grant".into(),
        description: None,
    });
    assert!(matches!(code, Error::CodeRejected(_)), "{code:?}");
    let shared = Error::Shared(Arc::new(Error::from(UpstreamError::Denied {
        endpoint: "/2.0/user/emails",
        status: 403,
    })));
    assert_eq!(shared.to_string(), "bitbucket: /2.0/user/emails: HTTP 403");
    assert!(matches!(
        shared.unshared(),
        Error::Upstream(UpstreamError::Denied { status: 403, .. })
    ));
}
