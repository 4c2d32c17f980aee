//! Issue 4: Refresh and sealed connector data, over the real gRPC port against
//! the fake Bitbucket over real HTTP: token reuse and redemption, single
//! flight, rotation grace, unreadable data, revoked grants, user and team
//! changes, dex plaintext data, data key rotation.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bitbucket_connector::config::DataKey;
use bitbucket_connector::pb;
use bitbucket_connector::sealing::{Origin, Sealer, Tokens};
use fake_bitbucket::{Endpoint, FakeBitbucket, Fault, BOB_UUID};
use tonic::Code;

use crate::harness::*;

const SECOND: &str = "second";
const FIRST: &str = "bitbucket-cloud";

// ---------------------------------------------------------------------------
// Helpers

fn data_key(b64: &str) -> DataKey {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    DataKey(raw.try_into().unwrap())
}

/// Opens connector data as a service configured with `keys` would.
fn open(keys: &[&str], connector_id: &str, data: &[u8]) -> Option<(Tokens, Origin)> {
    let keys: Vec<DataKey> = keys.iter().map(|k| data_key(k)).collect();
    Sealer::new(&keys, false)
        .unwrap()
        .open(connector_id, data)
        .ok()
}

/// The tokens inside data sealed with KEY_A for the default connector.
fn tokens_a(data: &[u8]) -> Tokens {
    let (t, origin) = open(&[KEY_A], FIRST, data).expect("data does not open with KEY_A");
    assert_eq!(origin, Origin::Current);
    t
}

/// Connector data as text (it is ASCII), for readable assertion failures.
fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

/// A Refresh on an explicit connector id.
async fn refresh_on(
    env: &Env,
    connector_id: &str,
    identity: pb::Identity,
    scopes: Option<pb::Scopes>,
) -> Result<pb::Identity, tonic::Status> {
    env.client()
        .refresh(pb::RefreshRequest {
            scopes,
            identity: Some(identity),
            connector_id: connector_id.to_string(),
        })
        .await
        .map(|r| r.into_inner().identity.unwrap())
}

/// A login as `user` on an explicit connector id.
async fn login_on(
    env: &Env,
    connector_id: &str,
    user: &str,
    scopes: Option<pb::Scopes>,
) -> Result<pb::Identity, tonic::Status> {
    env.client()
        .handle_callback(pb::HandleCallbackRequest {
            scopes,
            raw_query: format!("code={}&state=s", env.code(user)),
            connector_data: Vec::new(),
            connector_id: connector_id.to_string(),
        })
        .await
        .map(|r| r.into_inner().identity.unwrap())
}

/// A refresh request's identity: what the host stored at login, with `data`.
fn stored(user_id: &str, data: Vec<u8>) -> pb::Identity {
    pb::Identity {
        user_id: user_id.to_string(),
        username: "alice".into(),
        preferred_username: "alice".into(),
        email: "alice@example.com".into(),
        email_verified: true,
        groups: Vec::new(),
        connector_data: data,
    }
}

/// The identity without its connector data, for comparisons.
fn who(i: &pb::Identity) -> (String, String, String, String, bool, Vec<String>) {
    (
        i.user_id.clone(),
        i.username.clone(),
        i.preferred_username.clone(),
        i.email.clone(),
        i.email_verified,
        i.groups.clone(),
    )
}

/// The OAuth code exchange done by hand: (access token, refresh token).
async fn raw_tokens(fake: &FakeBitbucket, user: &str) -> (String, String) {
    bitbucket_connector::install_crypto();
    let code = fake.issue_code(CLIENT_ID, user);
    let body: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "authorization_code")
        .append_pair("code", &code)
        .finish();
    let resp = reqwest::Client::new()
        .post(fake.token_url())
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let v: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    (
        v["access_token"].as_str().unwrap().to_string(),
        v["refresh_token"].as_str().unwrap().to_string(),
    )
}

/// dex's plaintext connector data.
fn dex_plaintext(access: &str, refresh: &str, expiry: &str) -> Vec<u8> {
    serde_json::json!({"accessToken": access, "refreshToken": refresh, "expiry": expiry})
        .to_string()
        .into_bytes()
}

/// `t` as Go's RFC 3339 in UTC, whole seconds.
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    time::OffsetDateTime::from_unix_timestamp(secs)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// Every spelling of `token` that must not appear in sealed data.
fn spellings(token: &str) -> Vec<String> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let b = token.as_bytes();
    vec![
        token.to_string(),
        STANDARD.encode(b),
        STANDARD_NO_PAD.encode(b),
        URL_SAFE.encode(b),
        URL_SAFE_NO_PAD.encode(b),
    ]
}

/// INVALID_ARGUMENT / CONNECTOR_DATA_INVALID, and nothing of the data echoed
/// (neither whole nor an 8-byte slice of its middle).
fn assert_data_invalid(err: &tonic::Status, data: &[u8]) {
    assert_status(err, Code::InvalidArgument, "CONNECTOR_DATA_INVALID");
    if data.len() < 8 {
        return;
    }
    let mid = data.len() / 2;
    let needles = [data, &data[mid - 4..mid + 4]];
    for hay in [err.message().as_bytes(), err.details()] {
        for needle in needles {
            assert!(
                !hay.windows(needle.len()).any(|w| w == needle),
                "connector data echoed in the error: {err:?}"
            );
        }
    }
}

/// A login with offline access on a service whose tokens live 10 s (under
/// the 30 s margin: every Refresh must redeem).
async fn login_expiring(env: &Env) -> pb::Identity {
    env.fake.set_access_token_ttl(Duration::from_secs(10));
    env.login("alice", scopes(true, false)).await.unwrap()
}

// ---------------------------------------------------------------------------
// HandleCallback's connector data

#[tokio::test]
async fn callback_with_offline_access_returns_sealed_data() {
    let env = Env::start().await;
    let id = env.login("alice", scopes(true, false)).await.unwrap();
    assert!(
        id.connector_data.starts_with(b"v1."),
        "{:?}",
        id.connector_data
    );
    let t = tokens_a(&id.connector_data);
    assert_eq!(t.user_uuid.as_deref(), Some(ALICE));
    assert!(t.refresh_token.is_some());
    assert!(t.expiry.is_some());
}

#[tokio::test]
async fn callback_without_offline_access_returns_no_data() {
    let env = Env::start().await;
    let id = env.login("alice", scopes(false, true)).await.unwrap();
    assert!(id.connector_data.is_empty());
}

// ---------------------------------------------------------------------------
// Reuse, redemption, single flight

#[tokio::test]
async fn refresh_before_expiry_reuses_the_token_returns_the_same_bytes_and_recomputes_the_identity()
{
    let env = Env::start().await;
    let login = env.login("alice", scopes(true, true)).await.unwrap();
    assert_eq!(login.email, "alice@example.com");
    let tokens = env.fake.hits(Endpoint::Token);

    // Bitbucket changes under the login: new primary email, out of tea-party.
    env.fake.update_fixture(|f| {
        let alice = f.users.iter_mut().find(|u| u.uuid == ALICE).unwrap();
        for e in &mut alice.emails {
            e.is_primary = e.email == "alice@old.example.com";
        }
        let tea = f
            .workspaces
            .iter_mut()
            .find(|w| w.slug == "tea-party")
            .unwrap();
        tea.members.retain(|m| m.user_uuid != ALICE);
    });
    // What the host sends back is stale; it must not be echoed.
    let mut previous = login.clone();
    previous.username = "stale".into();
    previous.email = "stale@example.com".into();
    previous.groups = vec!["stale-group".into()];

    let with_groups = env
        .refresh(previous.clone(), scopes(true, true))
        .await
        .unwrap();
    assert_eq!(
        text(&with_groups.connector_data),
        text(&login.connector_data)
    );
    assert_eq!(with_groups.user_id, ALICE);
    assert_eq!(with_groups.username, "alice");
    assert_eq!(with_groups.preferred_username, "alice");
    assert_eq!(with_groups.email, "alice@old.example.com");
    assert!(with_groups.email_verified);
    assert_eq!(with_groups.groups, ["wonderland", "looking-glass"]);

    let without_groups = env.refresh(previous, scopes(true, false)).await.unwrap();
    assert_eq!(
        text(&without_groups.connector_data),
        text(&login.connector_data)
    );
    assert!(
        without_groups.groups.is_empty(),
        "{:?}",
        without_groups.groups
    );
    assert_eq!(without_groups.email, "alice@old.example.com");

    assert_eq!(
        env.fake.hits(Endpoint::Token),
        tokens,
        "a token call was made"
    );
}

#[tokio::test]
async fn refresh_after_expiry_redeems_once_and_returns_new_data() {
    let env = Env::start().await;
    let login = login_expiring(&env).await;
    let before = env.fake.hits(Endpoint::Token);
    let refreshed = env
        .refresh(login.clone(), scopes(true, false))
        .await
        .unwrap();
    assert_eq!(env.fake.hits(Endpoint::Token), before + 1);
    assert!(refreshed.connector_data.starts_with(b"v1."));
    assert_ne!(text(&refreshed.connector_data), text(&login.connector_data));
    let (old, new) = (
        tokens_a(&login.connector_data),
        tokens_a(&refreshed.connector_data),
    );
    assert_ne!(old.access_token, new.access_token);
    assert_ne!(old.refresh_token, new.refresh_token);
    assert_eq!(new.user_uuid.as_deref(), Some(ALICE));
    assert_eq!(who(&refreshed), who(&login));
}

#[tokio::test]
async fn old_data_after_the_rotation_grace_window_is_token_revoked_and_new_data_works() {
    let env = Env::start().await;
    env.fake.set_refresh_grace(Duration::from_millis(300));
    let login = login_expiring(&env).await;
    let new = env
        .refresh(login.clone(), scopes(true, false))
        .await
        .unwrap();
    assert_ne!(text(&new.connector_data), text(&login.connector_data));

    tokio::time::sleep(Duration::from_millis(500)).await;
    let err = env
        .refresh(login.clone(), scopes(true, false))
        .await
        .unwrap_err();
    assert_status(&err, Code::Unauthenticated, "TOKEN_REVOKED");

    let newer = env.refresh(new.clone(), scopes(true, false)).await.unwrap();
    assert_eq!(newer.user_id, ALICE);
    assert_ne!(text(&newer.connector_data), text(&new.connector_data));
}

#[tokio::test]
async fn concurrent_refreshes_of_the_same_expired_data_redeem_once() {
    let env = Setup {
        telemetry: true,
        ..Setup::default()
    }
    .start()
    .await;
    let login = login_expiring(&env).await;
    env.fake.inject(
        Endpoint::Token,
        Fault::Delay(Duration::from_millis(300)),
        None,
    );
    let before = env.fake.hits(Endpoint::Token);
    let calls = (0..20).map(|_| env.refresh(login.clone(), scopes(true, true)));
    let results = futures_util::future::join_all(calls).await;
    assert_eq!(
        env.fake.hits(Endpoint::Token),
        before + 1,
        "token requests at the fake"
    );
    let ids: Vec<pb::Identity> = results
        .into_iter()
        .map(|r| r.expect("a concurrent refresh failed"))
        .collect();
    let first = who(&ids[0]);
    assert_eq!(first.0, ALICE);
    assert_eq!(first.5, ["wonderland", "looking-glass", "tea-party"]);
    let access = tokens_a(&ids[0].connector_data).access_token;
    assert_ne!(access, tokens_a(&login.connector_data).access_token);
    for id in &ids {
        assert_eq!(who(id), first);
        // Every caller got the one redemption's tokens.
        assert_eq!(tokens_a(&id.connector_data).access_token, access);
    }
    let m = env.metrics().await;
    assert_eq!(
        metric(
            &m,
            "bitbucket_connector_refresh_redemptions_total{outcome=\"ok\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "bitbucket_connector_refresh_joined_total"),
        Some(19.0),
        "{m}"
    );
}

#[tokio::test]
async fn a_token_endpoint_outage_is_unavailable_and_the_data_stays_usable() {
    let env = Env::start().await;
    let login = login_expiring(&env).await;
    env.fake.inject(Endpoint::Token, Fault::Status(503), None);
    let err = env
        .refresh(login.clone(), scopes(true, false))
        .await
        .unwrap_err();
    assert_status(&err, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
    // Not a revocation, and the failed redemption is not remembered.
    env.fake.clear_faults();
    let ok = env
        .refresh(login.clone(), scopes(true, false))
        .await
        .unwrap();
    assert_eq!(ok.user_id, ALICE);
    assert_ne!(text(&ok.connector_data), text(&login.connector_data));
}

// ---------------------------------------------------------------------------
// Unreadable connector data

#[tokio::test]
async fn tampered_data_is_invalid_argument() {
    let env = Env::start().await;
    let login = env.login("alice", scopes(true, false)).await.unwrap();
    let mut data = login.connector_data.clone();
    let mid = data.len() / 2;
    // Another base64url character: the envelope decodes, authentication fails.
    data[mid] = if data[mid] == b'A' { b'B' } else { b'A' };
    let before = env.fake.total_hits();
    let err = env
        .refresh(stored(ALICE, data.clone()), scopes(true, false))
        .await
        .unwrap_err();
    assert_data_invalid(&err, &data);
    assert_eq!(env.fake.total_hits(), before, "Bitbucket was called");
}

#[tokio::test]
async fn data_sealed_with_an_unknown_key_is_invalid_argument() {
    let env = Setup::default().keys(&[KEY_B]).start().await;
    let login = env.login("alice", scopes(true, false)).await.unwrap();
    let fake = env.stop().await;
    let env = Setup::default().keys(&[KEY_A]).start_with(fake).await;
    let err = env
        .refresh(login.clone(), scopes(true, false))
        .await
        .unwrap_err();
    assert_data_invalid(&err, &login.connector_data);
}

#[tokio::test]
async fn data_sealed_for_another_connector_is_invalid_argument() {
    let env = Setup {
        second_connector: true,
        ..Setup::default()
    }
    .start()
    .await;
    let login = login_on(&env, SECOND, "alice", scopes(true, false))
        .await
        .unwrap();
    assert!(login.connector_data.starts_with(b"v1."));
    let err = refresh_on(&env, FIRST, login.clone(), scopes(true, false))
        .await
        .unwrap_err();
    assert_data_invalid(&err, &login.connector_data);
    // On its own connector it opens.
    refresh_on(&env, SECOND, login, scopes(true, false))
        .await
        .unwrap();
}

#[tokio::test]
async fn empty_data_is_invalid_argument() {
    let env = Env::start().await;
    let err = env
        .refresh(stored(ALICE, Vec::new()), scopes(true, false))
        .await
        .unwrap_err();
    assert_data_invalid(&err, b"");
}

#[tokio::test]
async fn garbage_data_is_invalid_argument() {
    let env = Env::start().await;
    let cases: Vec<Vec<u8>> = vec![
        vec![0xff, 0x00, 0x13, 0x37, 0xde, 0xad, 0xbe, 0xef, 0x80, 0x7f],
        b"not-connector-data-at-all".to_vec(),
        b"v1.!!!!not base64url!!!!".to_vec(),
        b"v1.QUJD".to_vec(),
        b"v2.c2VjcmV0LWRhdGEtaW4tYS1mdXR1cmUtZm9ybWF0".to_vec(),
    ];
    for data in cases {
        let err = env
            .refresh(stored(ALICE, data.clone()), scopes(true, false))
            .await
            .unwrap_err();
        assert_data_invalid(&err, &data);
    }
    env.assert_serving().await;
}

// ---------------------------------------------------------------------------
// Revoked grants, changed users, lost teams

#[tokio::test]
async fn revoked_grant_with_a_valid_access_token_is_token_revoked() {
    let env = Env::start().await;
    let login = env.login("alice", scopes(true, false)).await.unwrap();
    env.fake.revoke_grants("alice");
    let before = env.fake.hits(Endpoint::Token);
    let err = env.refresh(login, scopes(true, false)).await.unwrap_err();
    assert_status(&err, Code::Unauthenticated, "TOKEN_REVOKED");
    // The API's 401 made the service try the refresh token.
    assert_eq!(env.fake.hits(Endpoint::Token), before + 1);
}

#[tokio::test]
async fn revoked_grant_with_an_expired_access_token_is_token_revoked() {
    let env = Env::start().await;
    let login = login_expiring(&env).await;
    env.fake.revoke_grants("alice");
    let before = env.fake.hits(Endpoint::User);
    let err = env.refresh(login, scopes(true, false)).await.unwrap_err();
    assert_status(&err, Code::Unauthenticated, "TOKEN_REVOKED");
    assert_eq!(env.fake.hits(Endpoint::User), before, "API called anyway");
}

#[tokio::test]
async fn a_user_id_other_than_the_sealed_user_is_user_changed() {
    let env = Env::start().await;
    let login = env.login("alice", scopes(true, false)).await.unwrap();
    let mut previous = login.clone();
    previous.user_id = BOB_UUID.to_string();
    let err = env
        .refresh(previous, scopes(true, false))
        .await
        .unwrap_err();
    assert_status(&err, Code::PermissionDenied, "USER_CHANGED");
}

#[tokio::test]
async fn dex_plaintext_of_another_user_is_user_changed() {
    let env = Setup {
        accept_dex_plaintext: true,
        ..Setup::default()
    }
    .start()
    .await;
    let (access, refresh) = raw_tokens(&env.fake, "alice").await;
    let expiry = rfc3339(SystemTime::now() + Duration::from_secs(3600));
    let data = dex_plaintext(&access, &refresh, &expiry);
    let err = env
        .refresh(stored(BOB_UUID, data), scopes(true, false))
        .await
        .unwrap_err();
    assert_status(&err, Code::PermissionDenied, "USER_CHANGED");
}

#[tokio::test]
async fn a_user_removed_from_the_required_team_is_denied_on_refresh() {
    let env = Setup::default()
        .connector("teams: [wonderland]")
        .start()
        .await;
    let login = env.login("alice", scopes(true, false)).await.unwrap();
    assert_eq!(login.groups, ["wonderland"]);
    env.fake.update_fixture(|f| {
        let w = f
            .workspaces
            .iter_mut()
            .find(|w| w.slug == "wonderland")
            .unwrap();
        w.members.retain(|m| m.user_uuid != ALICE);
    });
    let err = env.refresh(login, scopes(true, false)).await.unwrap_err();
    assert_status(&err, Code::PermissionDenied, "NOT_IN_REQUIRED_TEAMS");
}

// ---------------------------------------------------------------------------
// dex plaintext connector data

#[tokio::test]
async fn dex_plaintext_is_refused_without_accept_dex_plaintext() {
    let env = Env::start().await;
    let (access, refresh) = raw_tokens(&env.fake, "alice").await;
    let expiry = rfc3339(SystemTime::now() + Duration::from_secs(3600));
    let data = dex_plaintext(&access, &refresh, &expiry);
    let err = env
        .refresh(stored(ALICE, data.clone()), scopes(true, false))
        .await
        .unwrap_err();
    assert_data_invalid(&err, &data);
    for t in [&access, &refresh] {
        assert!(!err.message().contains(t.as_str()), "{}", err.message());
    }
}

#[tokio::test]
async fn dex_plaintext_is_resealed_without_the_tokens() {
    let env = Setup {
        accept_dex_plaintext: true,
        ..Setup::default()
    }
    .start()
    .await;
    let (access, refresh) = raw_tokens(&env.fake, "alice").await;
    let expiry = rfc3339(SystemTime::now() + Duration::from_secs(3600));
    let data = dex_plaintext(&access, &refresh, &expiry);
    let before = env.fake.hits(Endpoint::Token);
    let id = env
        .refresh(stored(ALICE, data), scopes(true, true))
        .await
        .unwrap();
    assert_eq!(env.fake.hits(Endpoint::Token), before, "token not reused");
    assert_eq!(id.user_id, ALICE);
    assert_eq!(id.groups, ["wonderland", "looking-glass", "tea-party"]);
    assert!(id.connector_data.starts_with(b"v1."));
    let sealed = String::from_utf8(id.connector_data.clone()).unwrap();
    for t in [&access, &refresh] {
        for s in spellings(t) {
            assert!(!sealed.contains(&s), "a token is readable in {sealed}");
        }
    }
    let t = tokens_a(&id.connector_data);
    assert_eq!(t.access_token.expose(), access);
    assert_eq!(
        t.refresh_token.as_ref().map(|r| r.expose()),
        Some(refresh.as_str())
    );
    assert_eq!(t.user_uuid.as_deref(), Some(ALICE));

    // The resealed data is ordinary data now: same bytes back, no token call.
    let again = env.refresh(id.clone(), scopes(true, true)).await.unwrap();
    assert_eq!(text(&again.connector_data), text(&id.connector_data));
    assert_eq!(env.fake.hits(Endpoint::Token), before);
}

#[tokio::test]
async fn dex_plaintext_with_the_zero_expiry_never_redeems() {
    let env = Setup {
        accept_dex_plaintext: true,
        ..Setup::default()
    }
    .start()
    .await;
    let (access, refresh) = raw_tokens(&env.fake, "alice").await;
    let data = dex_plaintext(&access, &refresh, "0001-01-01T00:00:00Z");
    let before = env.fake.hits(Endpoint::Token);
    let id = env
        .refresh(stored(ALICE, data), scopes(true, false))
        .await
        .unwrap();
    assert_eq!(env.fake.hits(Endpoint::Token), before);
    assert_eq!(id.email, "alice@example.com");
    let t = tokens_a(&id.connector_data);
    assert_eq!(t.expiry, None, "never expires must be kept");
    assert_eq!(t.access_token.expose(), access);
}

#[tokio::test]
async fn dex_plaintext_past_its_expiry_redeems_once() {
    let env = Setup {
        accept_dex_plaintext: true,
        ..Setup::default()
    }
    .start()
    .await;
    let (access, refresh) = raw_tokens(&env.fake, "alice").await;
    let expiry = rfc3339(SystemTime::now() - Duration::from_secs(3600));
    let data = dex_plaintext(&access, &refresh, &expiry);
    let before = env.fake.hits(Endpoint::Token);
    let id = env
        .refresh(stored(ALICE, data), scopes(true, false))
        .await
        .unwrap();
    assert_eq!(env.fake.hits(Endpoint::Token), before + 1);
    assert_eq!(id.user_id, ALICE);
    let t = tokens_a(&id.connector_data);
    assert_ne!(t.access_token.expose(), access);
    assert_ne!(
        t.refresh_token.as_ref().map(|r| r.expose()),
        Some(refresh.as_str())
    );
}

// ---------------------------------------------------------------------------
// Data key rotation

#[tokio::test]
async fn key_rotation_reseals_with_the_first_key_and_retires_the_old_one() {
    let env = Setup::default().keys(&[KEY_A]).start().await;
    let login = env.login("alice", scopes(true, false)).await.unwrap();
    let fake = env.stop().await;

    // [B, A]: A-sealed data still opens, and comes back sealed with B.
    let env = Setup::default()
        .keys(&[KEY_B, KEY_A])
        .start_with(fake)
        .await;
    let before = env.fake.hits(Endpoint::Token);
    let resealed = env
        .refresh(login.clone(), scopes(true, false))
        .await
        .unwrap();
    assert_eq!(env.fake.hits(Endpoint::Token), before, "tokens changed");
    assert_ne!(text(&resealed.connector_data), text(&login.connector_data));
    let (new, origin) = open(&[KEY_B], FIRST, &resealed.connector_data).expect("not sealed with B");
    assert_eq!(origin, Origin::Current);
    assert!(open(&[KEY_A], FIRST, &resealed.connector_data).is_none());
    let old = tokens_a(&login.connector_data);
    assert_eq!(new.access_token, old.access_token);
    assert_eq!(new.refresh_token, old.refresh_token);
    // B-sealed data is current: the same bytes come back.
    let again = env
        .refresh(resealed.clone(), scopes(true, false))
        .await
        .unwrap();
    assert_eq!(text(&again.connector_data), text(&resealed.connector_data));
    let fake = env.stop().await;

    // [B]: the resealed data works, the A-sealed data does not.
    let env = Setup::default().keys(&[KEY_B]).start_with(fake).await;
    let ok = env
        .refresh(resealed.clone(), scopes(true, false))
        .await
        .unwrap();
    assert_eq!(text(&ok.connector_data), text(&resealed.connector_data));
    let err = env
        .refresh(login.clone(), scopes(true, false))
        .await
        .unwrap_err();
    assert_data_invalid(&err, &login.connector_data);
}
