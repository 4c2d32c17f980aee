//! Tests of the fake, over real HTTP on loopback.

use super::schema;
use super::*;
use reqwest::StatusCode as S;
use std::io::{Read as _, Write as _};

fn client() -> reqwest::Client {
    // reqwest is built with `rustls-no-provider`: it needs a provider even
    // for plain http.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn start() -> (FakeBitbucket, reqwest::Client) {
    (
        FakeBitbucket::start(Fixture::demo()).await.unwrap(),
        client(),
    )
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

async fn post_token(
    fake: &FakeBitbucket,
    http: &reqwest::Client,
    basic: Option<(&str, &str)>,
    pairs: &[(&str, &str)],
) -> (S, Value) {
    let mut req = http
        .post(fake.token_url())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(pairs));
    if let Some((id, secret)) = basic {
        req = req.basic_auth(id, Some(secret));
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    (
        status,
        serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap(),
    )
}

const DEMO: Option<(&str, &str)> = Some(("demo-client", "demo-secret"));

/// Logs `username` in; returns the token response.
async fn login(fake: &FakeBitbucket, http: &reqwest::Client, username: &str) -> Value {
    let code = fake.issue_code("demo-client", username);
    let (status, body) = post_token(
        fake,
        http,
        DEMO,
        &[("grant_type", "authorization_code"), ("code", &code)],
    )
    .await;
    assert_eq!(status, S::OK, "{body}");
    body
}

async fn access_token(fake: &FakeBitbucket, http: &reqwest::Client, username: &str) -> String {
    login(fake, http, username).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn refresh(fake: &FakeBitbucket, http: &reqwest::Client, token: &str) -> (S, Value) {
    post_token(
        fake,
        http,
        DEMO,
        &[("grant_type", "refresh_token"), ("refresh_token", token)],
    )
    .await
}

async fn get(http: &reqwest::Client, url: &str, token: Option<&str>) -> reqwest::Response {
    let mut req = http.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

async fn get_json(http: &reqwest::Client, url: &str, token: Option<&str>) -> (S, Value) {
    let resp = get(http, url, token).await;
    let status = resp.status();
    let body = resp.bytes().await.unwrap();
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {}", String::from_utf8_lossy(&body)));
    (status, value)
}

fn schemas() -> Value {
    let path = format!("{}/{}", env!("CARGO_MANIFEST_DIR"), schema::SCHEMAS_FILE);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The violations of `value` against the schema `section.name` of the file.
fn violations(section: &str, name: &str, value: &Value) -> Vec<String> {
    static SCHEMAS: std::sync::LazyLock<schema::Schemas> =
        std::sync::LazyLock::new(|| schema::Schemas::new(schemas()).unwrap());
    SCHEMAS.validate(section, name, value).unwrap()
}

#[track_caller]
fn assert_valid(section: &str, name: &str, value: &Value) {
    let errors = violations(section, name, value);
    assert!(errors.is_empty(), "{name}: {errors:#?}\n{value:#}");
}

#[track_caller]
fn assert_invalid(section: &str, name: &str, value: &Value, what: &str) {
    let errors = violations(section, name, value);
    assert!(!errors.is_empty(), "{name} accepted {what}:\n{value:#}");
}

/// `value` with one change made by `f`.
fn spoiled(value: &Value, f: impl FnOnce(&mut Value)) -> Value {
    let mut v = value.clone();
    f(&mut v);
    v
}

fn query_of(location: &str) -> HashMap<String, String> {
    url::Url::parse(location)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect()
}

async fn authorize(fake: &FakeBitbucket, http: &reqwest::Client, query: &str) -> reqwest::Response {
    http.get(format!("{}?{query}", fake.auth_url()))
        .send()
        .await
        .unwrap()
}

// --- OAuth ---------------------------------------------------------------

#[tokio::test]
async fn authorize_redirects_to_the_registered_callback_with_code_and_state() {
    let (fake, http) = start().await;
    let resp = authorize(
        &fake,
        &http,
        "client_id=demo-client&response_type=code&state=s%2F1%20x",
    )
    .await;
    assert_eq!(resp.status(), S::FOUND);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        location.starts_with("http://127.0.0.1:5556/dex/callback?"),
        "{location}"
    );
    let q = query_of(&location);
    assert_eq!(q["state"], "s/1 x");
    let (status, body) = post_token(
        &fake,
        &http,
        DEMO,
        &[("grant_type", "authorization_code"), ("code", &q["code"])],
    )
    .await;
    assert_eq!(status, S::OK, "{body}");
    // The default user is the fixture's first: alice.
    let token = body["access_token"].as_str().unwrap();
    let (_, user) = get_json(&http, &format!("{}/user", fake.api_url()), Some(token)).await;
    assert_eq!(user["uuid"], fixture::ALICE_UUID);
}

#[tokio::test]
async fn authorize_with_an_unknown_client_is_a_400_page() {
    let (fake, http) = start().await;
    let resp = authorize(&fake, &http, "client_id=nope&response_type=code&state=x").await;
    assert_eq!(resp.status(), S::BAD_REQUEST);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(resp.headers().get("location").is_none());
}

#[tokio::test]
async fn authorize_with_deny_redirects_with_access_denied_and_state() {
    let (fake, http) = start().await;
    let resp = authorize(
        &fake,
        &http,
        "client_id=demo-client&response_type=code&state=abc&deny=1",
    )
    .await;
    assert_eq!(resp.status(), S::FOUND);
    let q = query_of(resp.headers()["location"].to_str().unwrap());
    assert_eq!(q["error"], "access_denied");
    assert!(!q["error_description"].is_empty());
    assert_eq!(q["state"], "abc");
    assert!(!q.contains_key("code"));
}

#[tokio::test]
async fn authorize_login_as_chooses_the_user_by_username_or_nickname() {
    let (fake, http) = start().await;
    let resp = authorize(
        &fake,
        &http,
        "client_id=demo-client&response_type=code&state=x&login_as=bob",
    )
    .await;
    let q = query_of(resp.headers()["location"].to_str().unwrap());
    let (_, body) = post_token(
        &fake,
        &http,
        DEMO,
        &[("grant_type", "authorization_code"), ("code", &q["code"])],
    )
    .await;
    let token = body["access_token"].as_str().unwrap();
    let (_, user) = get_json(&http, &format!("{}/user", fake.api_url()), Some(token)).await;
    assert_eq!(user["uuid"], fixture::BOB_UUID);
    assert_eq!(user["nickname"], "bob");
    assert!(user.get("username").is_none(), "bob has no username");

    let resp = authorize(
        &fake,
        &http,
        "client_id=demo-client&response_type=code&login_as=nobody",
    )
    .await;
    assert_eq!(resp.status(), S::BAD_REQUEST);
}

#[tokio::test]
async fn code_exchange_with_basic_auth_answers_like_bitbucket() {
    let (fake, http) = start().await;
    let body = login(&fake, &http, "alice").await;
    let keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut keys = keys;
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "access_token",
            "expires_in",
            "refresh_token",
            "scopes",
            "state",
            "token_type"
        ]
    );
    assert_eq!(body["scopes"], "account email");
    assert_eq!(body["expires_in"], 7200);
    assert_eq!(body["token_type"], "bearer");
    assert_eq!(body["state"], "authorization_code");
}

#[tokio::test]
async fn client_credentials_in_the_body_are_rejected_with_401() {
    let (fake, http) = start().await;
    let code = fake.issue_code("demo-client", "alice");
    let (status, body) = post_token(
        &fake,
        &http,
        None,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("client_id", "demo-client"),
            ("client_secret", "demo-secret"),
        ],
    )
    .await;
    assert_eq!(status, S::UNAUTHORIZED);
    assert_eq!(body["error"], "invalid_client");
    // The code was not spent.
    let (status, _) = post_token(
        &fake,
        &http,
        DEMO,
        &[("grant_type", "authorization_code"), ("code", &code)],
    )
    .await;
    assert_eq!(status, S::OK);
}

#[tokio::test]
async fn a_wrong_client_secret_is_rejected_with_401() {
    let (fake, http) = start().await;
    let code = fake.issue_code("demo-client", "alice");
    let (status, body) = post_token(
        &fake,
        &http,
        Some(("demo-client", "wrong")),
        &[("grant_type", "authorization_code"), ("code", &code)],
    )
    .await;
    assert_eq!(status, S::UNAUTHORIZED);
    assert_eq!(body["error"], "invalid_client");
}

#[tokio::test]
async fn a_code_is_single_use() {
    let (fake, http) = start().await;
    let code = fake.issue_code("demo-client", "alice");
    let pairs = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
    ];
    assert_eq!(post_token(&fake, &http, DEMO, &pairs).await.0, S::OK);
    let (status, body) = post_token(&fake, &http, DEMO, &pairs).await;
    assert_eq!(status, S::BAD_REQUEST);
    assert_eq!(body["error"], "invalid_grant");
    assert!(body["error_description"].is_string());
}

#[tokio::test]
async fn a_code_is_bound_to_its_client() {
    let mut fixture = Fixture::demo();
    fixture.clients.push(OAuthClient {
        client_id: "other".into(),
        client_secret: "other-secret".into(),
        redirect_uri: "http://127.0.0.1:1/cb".into(),
    });
    let fake = FakeBitbucket::start(fixture).await.unwrap();
    let http = client();
    let code = fake.issue_code("demo-client", "alice");
    let pairs = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
    ];
    let (status, body) = post_token(&fake, &http, Some(("other", "other-secret")), &pairs).await;
    assert_eq!(
        (status, &body["error"]),
        (S::BAD_REQUEST, &json!("invalid_grant"))
    );
    assert_eq!(post_token(&fake, &http, DEMO, &pairs).await.0, S::OK);
}

#[tokio::test]
async fn unknown_client_or_user_in_issue_code_gives_a_rejected_code() {
    let (fake, http) = start().await;
    for code in [
        fake.issue_code("demo-client", "nobody"),
        fake.issue_code("nope", "alice"),
    ] {
        let pairs = [
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
        ];
        let (status, body) = post_token(&fake, &http, DEMO, &pairs).await;
        assert_eq!(
            (status, &body["error"]),
            (S::BAD_REQUEST, &json!("invalid_grant"))
        );
    }
}

#[tokio::test]
async fn refresh_rotates_and_the_old_token_works_only_within_the_grace_window() {
    let (fake, http) = start().await;
    fake.set_refresh_grace(Duration::from_millis(300));
    let first = login(&fake, &http, "alice").await;
    let rt1 = first["refresh_token"].as_str().unwrap();

    let (status, second) = refresh(&fake, &http, rt1).await;
    assert_eq!(status, S::OK, "{second}");
    assert_eq!(second["state"], "refresh_token");
    let rt2 = second["refresh_token"].as_str().unwrap();
    assert_ne!(rt1, rt2, "every refresh returns a new refresh token");
    assert_ne!(first["access_token"], second["access_token"]);

    // Within the grace window the old token still works.
    let (status, _) = refresh(&fake, &http, rt1).await;
    assert_eq!(status, S::OK);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, body) = refresh(&fake, &http, rt1).await;
    assert_eq!(
        (status, &body["error"]),
        (S::BAD_REQUEST, &json!("invalid_grant"))
    );
    // The new one's window only starts with its own first use.
    let (status, _) = refresh(&fake, &http, rt2).await;
    assert_eq!(status, S::OK);
    // Access tokens from every redemption work.
    let token = second["access_token"].as_str().unwrap();
    assert_eq!(
        get(&http, &format!("{}/user", fake.api_url()), Some(token))
            .await
            .status(),
        S::OK
    );
}

#[tokio::test]
async fn an_expired_access_token_gets_401_with_an_error_body() {
    let (fake, http) = start().await;
    fake.set_access_token_ttl(Duration::from_millis(100));
    let token = access_token(&fake, &http, "alice").await;
    let url = format!("{}/user", fake.api_url());
    assert_eq!(get(&http, &url, Some(&token)).await.status(), S::OK);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (status, body) = get_json(&http, &url, Some(&token)).await;
    assert_eq!(status, S::UNAUTHORIZED);
    assert_eq!(body["type"], "error");
    assert!(body["error"]["message"].is_string());
}

#[tokio::test]
async fn revoke_grants_kills_the_users_refresh_and_access_tokens() {
    let (fake, http) = start().await;
    let alice = login(&fake, &http, "alice").await;
    let bob = login(&fake, &http, "bob").await;
    fake.revoke_grants("alice");
    let url = format!("{}/user", fake.api_url());
    let (status, _) = get_json(&http, &url, alice["access_token"].as_str()).await;
    assert_eq!(status, S::UNAUTHORIZED);
    let (status, body) = refresh(&fake, &http, alice["refresh_token"].as_str().unwrap()).await;
    assert_eq!(
        (status, &body["error"]),
        (S::BAD_REQUEST, &json!("invalid_grant"))
    );
    // Others are untouched; alice can log in again.
    assert_eq!(
        get(&http, &url, bob["access_token"].as_str())
            .await
            .status(),
        S::OK
    );
    login(&fake, &http, "alice").await;
}

#[tokio::test]
async fn token_quirks_change_the_token_response() {
    let (fake, http) = start().await;
    fake.set_token_quirks(TokenQuirks {
        expires_in_as_string: true,
        scope_singular: true,
        omit_token_type: true,
    });
    let body = login(&fake, &http, "alice").await;
    assert_eq!(body["expires_in"], "7200");
    assert_eq!(body["scope"], "account email");
    assert!(body.get("scopes").is_none());
    assert!(body.get("token_type").is_none());
}

#[tokio::test]
async fn unsupported_grant_type_and_missing_basic_are_oauth_errors() {
    let (fake, http) = start().await;
    let (status, body) = post_token(&fake, &http, DEMO, &[("grant_type", "password")]).await;
    assert_eq!(
        (status, &body["error"]),
        (S::BAD_REQUEST, &json!("unsupported_grant_type"))
    );
    let (status, body) = post_token(&fake, &http, None, &[("grant_type", "refresh_token")]).await;
    assert_eq!(
        (status, &body["error"]),
        (S::UNAUTHORIZED, &json!("invalid_client"))
    );
}

// --- API shapes ----------------------------------------------------------

#[tokio::test]
async fn user_matches_the_spec_schema() {
    let (fake, http) = start().await;
    let token = access_token(&fake, &http, "alice").await;
    let (status, user) = get_json(&http, &format!("{}/user", fake.api_url()), Some(&token)).await;
    assert_eq!(status, S::OK);
    assert_valid("definitions", "user", &user);
    assert_valid("definitions", "account", &user);
    assert_eq!(user["type"], "user");
    assert_eq!(user["uuid"], fixture::ALICE_UUID);
    assert_eq!(user["username"], "alice");
    assert_eq!(user["nickname"], "alice");
    assert_eq!(user["display_name"], "Alice Liddell");
    assert!(user["account_id"].is_string());
}

#[tokio::test]
async fn emails_match_the_schema_in_fixture_order() {
    let (fake, http) = start().await;
    let token = access_token(&fake, &http, "alice").await;
    let (status, page) = get_json(
        &http,
        &format!("{}/user/emails", fake.api_url()),
        Some(&token),
    )
    .await;
    assert_eq!(status, S::OK);
    assert_valid("local_definitions", "paginated_email", &page);
    let got: Vec<(&str, bool, bool)> = page["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["email"].as_str().unwrap(),
                e["is_primary"].as_bool().unwrap(),
                e["is_confirmed"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("alice@old.example.com", false, true),
            ("alice@example.com", true, true),
            ("alice@unconfirmed.example.com", false, false),
        ]
    );
    assert_eq!(
        (page["page"].clone(), page["size"].clone()),
        (json!(1), json!(3))
    );
    assert!(page.get("next").is_none());
}

#[tokio::test]
async fn workspaces_match_the_spec_schema() {
    let (fake, http) = start().await;
    let token = access_token(&fake, &http, "alice").await;
    let (status, page) = get_json(
        &http,
        &format!("{}/user/workspaces", fake.api_url()),
        Some(&token),
    )
    .await;
    assert_eq!(status, S::OK);
    assert_valid("definitions", "paginated_workspace_access", &page);
    let values = page["values"].as_array().unwrap();
    let slugs: Vec<&str> = values
        .iter()
        .map(|v| v["workspace"]["slug"].as_str().unwrap())
        .collect();
    assert_eq!(slugs, ["wonderland", "looking-glass", "tea-party"]);
    assert_eq!(values[0]["type"], "workspace_access");
    assert_eq!(values[0]["administrator"], true);
    assert_eq!(values[1]["administrator"], false);
    assert_eq!(values[0]["workspace"]["type"], "workspace_base");
    assert_eq!(values[0]["workspace"]["name"], "Wonderland");
    assert!(values[0]["workspace"]["uuid"]
        .as_str()
        .unwrap()
        .starts_with('{'));

    let (_, admin_only) = get_json(
        &http,
        &format!("{}/user/workspaces?administrator=true", fake.api_url()),
        Some(&token),
    )
    .await;
    assert_eq!(admin_only["size"], 1);
}

#[tokio::test]
async fn permission_matches_the_spec_schema_and_refuses_non_members() {
    let (fake, http) = start().await;
    let alice = access_token(&fake, &http, "alice").await;
    let bob = access_token(&fake, &http, "bob").await;
    let url = |ws: &str| format!("{}/user/workspaces/{ws}/permission", fake.api_url());

    for (ws, expected) in [
        ("wonderland", "owner"),
        ("looking-glass", "member"),
        ("tea-party", "collaborator"),
    ] {
        let (status, body) = get_json(&http, &url(ws), Some(&alice)).await;
        assert_eq!(status, S::OK);
        assert_valid("definitions", "workspace_membership", &body);
        assert_valid("local_definitions", "workspace_permission", &body);
        assert_eq!(body["permission"], expected);
        assert_eq!(body["user"]["uuid"], fixture::ALICE_UUID);
        assert_eq!(body["workspace"]["slug"], ws);
    }
    // By uuid too.
    let (status, body) = get_json(
        &http,
        &url("%7B0a1b2c3d-0000-4000-8000-000000000001%7D"),
        Some(&bob),
    )
    .await;
    assert_eq!((status, &body["permission"]), (S::OK, &json!("member")));

    let (status, body) = get_json(&http, &url("looking-glass"), Some(&bob)).await;
    assert_eq!(status, S::FORBIDDEN);
    assert_valid("definitions", "error", &body);
    let (status, body) = get_json(&http, &url("atlantis"), Some(&bob)).await;
    assert_eq!(status, S::NOT_FOUND);
    assert_valid("definitions", "error", &body);
}

#[tokio::test]
async fn unauthenticated_api_calls_get_401_with_the_spec_error_shape() {
    let (fake, http) = start().await;
    for path in [
        "/user",
        "/user/emails",
        "/user/workspaces",
        "/user/workspaces/wonderland/permission",
    ] {
        let url = format!("{}{path}", fake.api_url());
        let (status, body) = get_json(&http, &url, None).await;
        assert_eq!(status, S::UNAUTHORIZED, "{path}");
        assert_valid("definitions", "error", &body);
        let (status, _) = get_json(&http, &url, Some("not-a-token")).await;
        assert_eq!(status, S::UNAUTHORIZED, "{path}");
    }
    // Basic is not a way in to API 2.0 in the fake.
    let resp = http
        .get(format!("{}/user", fake.api_url()))
        .basic_auth("admin@example.com", Some("demo-admin-api-token"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), S::UNAUTHORIZED);
}

#[tokio::test]
async fn pagination_walks_three_pages_by_absolute_next_links() {
    let (fake, http) = start().await;
    fake.set_max_pagelen(1);
    let token = access_token(&fake, &http, "alice").await;
    let mut url = format!("{}/user/workspaces", fake.api_url());
    let mut slugs = Vec::new();
    for page_no in 1..=3 {
        let (status, page) = get_json(&http, &url, Some(&token)).await;
        assert_eq!(status, S::OK);
        assert_valid("definitions", "paginated_workspace_access", &page);
        assert_eq!(page["page"], page_no);
        assert_eq!(page["pagelen"], 1);
        assert_eq!(page["size"], 3);
        slugs.push(
            page["values"][0]["workspace"]["slug"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
        match page.get("next").and_then(Value::as_str) {
            Some(next) => {
                assert!(page_no < 3, "the last page has no next");
                assert!(
                    next.starts_with(&format!("{}/2.0/user/workspaces?", fake.base_url())),
                    "{next}"
                );
                url = next.to_owned();
            }
            None => assert_eq!(page_no, 3, "pages before the last have next"),
        }
    }
    assert_eq!(slugs, ["wonderland", "looking-glass", "tea-party"]);
}

#[tokio::test]
async fn pagelen_defaults_to_10_and_is_capped_at_100() {
    let mut fixture = Fixture::demo();
    fixture.users[0].emails = (0..150)
        .map(|i| Email {
            email: format!("a{i}@example.com"),
            is_primary: i == 0,
            is_confirmed: true,
        })
        .collect();
    let fake = FakeBitbucket::start(fixture).await.unwrap();
    let http = client();
    let token = access_token(&fake, &http, "alice").await;
    let emails = format!("{}/user/emails", fake.api_url());

    let (_, page) = get_json(&http, &emails, Some(&token)).await;
    assert_eq!(page["values"].as_array().unwrap().len(), 10);
    assert_eq!(
        (page["pagelen"].clone(), page["size"].clone()),
        (json!(10), json!(150))
    );

    let (_, page) = get_json(&http, &format!("{emails}?pagelen=1000"), Some(&token)).await;
    assert_eq!(page["values"].as_array().unwrap().len(), 100);
    let next = page["next"].as_str().unwrap();
    assert!(
        next.contains("pagelen=1000") && next.contains("page=2"),
        "{next}"
    );
    let (_, last) = get_json(&http, next, Some(&token)).await;
    assert_eq!(last["values"].as_array().unwrap().len(), 50);
    assert_eq!(last["values"][0]["email"], "a100@example.com");
    assert!(last.get("next").is_none());

    let (status, _) = get_json(&http, &format!("{emails}?page=0"), Some(&token)).await;
    assert_eq!(status, S::BAD_REQUEST);
}

#[tokio::test]
async fn removed_workspace_endpoints_answer_410_gone() {
    let (fake, http) = start().await;
    let token = access_token(&fake, &http, "alice").await;
    for path in ["/workspaces", "/user/permissions/workspaces"] {
        let (status, body) =
            get_json(&http, &format!("{}{path}", fake.api_url()), Some(&token)).await;
        assert_eq!(status, S::GONE, "{path}");
        assert_valid("definitions", "error", &body);
    }
}

// --- API 1.0 groups ------------------------------------------------------

fn group_members(groups: &Value, slug: &str) -> Vec<String> {
    groups
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["slug"] == slug)
        .unwrap_or_else(|| panic!("no group {slug}"))["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["uuid"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn groups_are_forbidden_to_members_who_are_not_admins() {
    let (fake, http) = start().await;
    let bob = access_token(&fake, &http, "bob").await;
    let alice = access_token(&fake, &http, "alice").await;
    let url = |ws: &str| format!("{}/groups/{ws}", fake.legacy_api_url());
    assert_eq!(
        get(&http, &url("wonderland"), Some(&bob)).await.status(),
        S::FORBIDDEN
    );
    assert_eq!(
        get(&http, &url("looking-glass"), Some(&alice))
            .await
            .status(),
        S::FORBIDDEN
    );
    assert_eq!(
        get(&http, &url("tea-party"), Some(&alice)).await.status(),
        S::FORBIDDEN
    );
    assert_eq!(
        get(&http, &url("wonderland"), None).await.status(),
        S::UNAUTHORIZED
    );
}

#[tokio::test]
async fn groups_are_readable_with_the_admin_credential_of_that_workspace() {
    let (fake, http) = start().await;
    let fetch = |ws: &str, password: &str| {
        http.get(format!("{}/groups/{ws}", fake.legacy_api_url()))
            .basic_auth("admin@example.com", Some(password))
            .send()
    };
    let resp = fetch("looking-glass", "demo-admin-api-token")
        .await
        .unwrap();
    assert_eq!(resp.status(), S::OK);
    let groups: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_valid("local_definitions", "legacy_groups", &groups);
    assert_eq!(group_members(&groups, "readers"), [fixture::ALICE_UUID]);
    assert!(group_members(&groups, "writers").is_empty());

    let resp = fetch("wonderland", "demo-admin-api-token").await.unwrap();
    assert_eq!(
        resp.status(),
        S::FORBIDDEN,
        "not this credential's workspace"
    );
    let resp = fetch("looking-glass", "wrong").await.unwrap();
    assert_eq!(resp.status(), S::UNAUTHORIZED);
    let resp = fetch("atlantis", "demo-admin-api-token").await.unwrap();
    assert_eq!(resp.status(), S::NOT_FOUND);
}

#[tokio::test]
async fn group_answers_follow_a_fixture_change_made_after_they_were_read() {
    let (fake, http) = start().await;
    let bob = access_token(&fake, &http, "bob").await;
    let list = || {
        http.get(format!("{}/groups/looking-glass", fake.legacy_api_url()))
            .basic_auth("admin@example.com", Some("demo-admin-api-token"))
            .send()
    };
    let filter = format!(
        "{}/groups?group=wonderland/administrators",
        fake.legacy_api_url()
    );
    let groups: Value =
        serde_json::from_slice(&list().await.unwrap().bytes().await.unwrap()).unwrap();
    assert!(group_members(&groups, "writers").is_empty());
    assert_eq!(get_json(&http, &filter, Some(&bob)).await.1, json!([]));
    fake.update_fixture(|f| {
        for ws in &mut f.workspaces {
            for g in &mut ws.groups {
                if (ws.slug.as_str(), g.slug.as_str()) == ("looking-glass", "writers")
                    || (ws.slug.as_str(), g.slug.as_str()) == ("wonderland", "administrators")
                {
                    g.members.push(BOB_UUID.to_owned());
                }
            }
        }
    });
    let groups: Value =
        serde_json::from_slice(&list().await.unwrap().bytes().await.unwrap()).unwrap();
    assert_eq!(group_members(&groups, "writers"), [BOB_UUID]);
    let (status, body) = get_json(&http, &filter, Some(&bob)).await;
    assert_eq!(status, S::OK);
    assert!(group_members(&body, "administrators").contains(&BOB_UUID.to_owned()));
}

#[tokio::test]
async fn groups_are_readable_with_an_owners_token() {
    let (fake, http) = start().await;
    let alice = access_token(&fake, &http, "alice").await;
    let (status, groups) = get_json(
        &http,
        &format!("{}/groups/wonderland", fake.legacy_api_url()),
        Some(&alice),
    )
    .await;
    assert_eq!(status, S::OK);
    assert_valid("local_definitions", "legacy_groups", &groups);
    assert_eq!(
        group_members(&groups, "developers"),
        [fixture::ALICE_UUID, fixture::BOB_UUID]
    );
    assert_eq!(
        group_members(&groups, "release-managers"),
        [fixture::BOB_UUID]
    );
    assert_eq!(
        group_members(&groups, "administrators"),
        [fixture::ALICE_UUID]
    );
    assert_eq!(
        groups[0]["owner"]["uuid"],
        "{0a1b2c3d-0000-4000-8000-000000000001}"
    );
}

// --- Behaviour around tokens and the fixture ------------------------------

#[tokio::test]
async fn an_access_token_in_the_query_is_ignored_and_counted() {
    let (fake, http) = start().await;
    let token = access_token(&fake, &http, "alice").await;
    assert_eq!(fake.token_in_query_seen(), 0);
    let (status, _) = get_json(
        &http,
        &format!("{}/user?access_token={token}", fake.api_url()),
        None,
    )
    .await;
    assert_eq!(status, S::UNAUTHORIZED);
    assert_eq!(fake.token_in_query_seen(), 1);
    // Still counted when a Bearer header makes the request succeed.
    let (status, _) = get_json(
        &http,
        &format!("{}/user/emails?access_token={token}", fake.api_url()),
        Some(&token),
    )
    .await;
    assert_eq!(status, S::OK);
    assert_eq!(fake.token_in_query_seen(), 2);
}

#[tokio::test]
async fn update_fixture_takes_effect_on_the_next_request() {
    let (fake, http) = start().await;
    let token = access_token(&fake, &http, "alice").await;
    let url = format!(
        "{}/user/workspaces/looking-glass/permission",
        fake.api_url()
    );
    assert_eq!(get(&http, &url, Some(&token)).await.status(), S::OK);
    fake.update_fixture(|f| {
        f.workspaces[1].members.clear();
        f.users[0].display_name = "Alice L.".into();
    });
    assert_eq!(get(&http, &url, Some(&token)).await.status(), S::FORBIDDEN);
    let (_, page) = get_json(
        &http,
        &format!("{}/user/workspaces", fake.api_url()),
        Some(&token),
    )
    .await;
    assert_eq!(page["size"], 2);
    let (_, user) = get_json(&http, &format!("{}/user", fake.api_url()), Some(&token)).await;
    assert_eq!(user["display_name"], "Alice L.");
    // A removed user's tokens stop working.
    fake.update_fixture(|f| {
        f.users.remove(0);
    });
    assert_eq!(
        get(&http, &format!("{}/user", fake.api_url()), Some(&token))
            .await
            .status(),
        S::UNAUTHORIZED
    );
}

#[tokio::test]
async fn hits_are_counted_per_endpoint_after_routing() {
    let (fake, http) = start().await;
    let token = access_token(&fake, &http, "alice").await;
    let api = fake.api_url();
    get(&http, &format!("{api}/user"), Some(&token)).await;
    get(&http, &format!("{api}/user"), None).await;
    get(&http, &format!("{api}/user/emails"), Some(&token)).await;
    get(&http, &format!("{api}/workspaces"), Some(&token)).await;
    get(&http, &format!("{}/nowhere", fake.base_url()), None).await;
    assert_eq!(fake.hits(Endpoint::Token), 1);
    assert_eq!(fake.hits(Endpoint::User), 2);
    assert_eq!(fake.hits(Endpoint::Emails), 1);
    assert_eq!(fake.hits(Endpoint::Workspaces), 0);
    assert_eq!(fake.hits(Endpoint::Authorize), 0);
    assert_eq!(fake.total_hits(), 6);
    assert_eq!(fake.hits(Endpoint::Any), 6);
}

// --- Faults --------------------------------------------------------------

#[tokio::test]
async fn fault_status_503_is_a_short_html_page_once() {
    let (fake, http) = start().await;
    let token = access_token(&fake, &http, "alice").await;
    fake.inject(Endpoint::User, Fault::Status(503), Some(1));
    let url = format!("{}/user", fake.api_url());
    let resp = get(&http, &url, Some(&token)).await;
    assert_eq!(resp.status(), S::SERVICE_UNAVAILABLE);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(resp.headers().get("retry-after").is_none());
    assert_eq!(get(&http, &url, Some(&token)).await.status(), S::OK);
}

#[tokio::test]
async fn fault_429_is_plain_text_without_retry_after() {
    let (fake, http) = start().await;
    fake.inject(Endpoint::Any, Fault::Status(429), None);
    let resp = get(&http, &format!("{}/user", fake.api_url()), None).await;
    assert_eq!(resp.status(), S::TOO_MANY_REQUESTS);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert!(resp.headers().get("retry-after").is_none());
    assert!(serde_json::from_slice::<Value>(&resp.bytes().await.unwrap()).is_err());
    let code = fake.issue_code("demo-client", "alice");
    let pairs = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
    ];
    let resp = http
        .post(fake.token_url())
        .basic_auth("demo-client", Some("demo-secret"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&pairs))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    assert_eq!(
        status,
        S::TOO_MANY_REQUESTS,
        "Any covers the token endpoint too"
    );
    fake.clear_faults();
    assert_eq!(post_token(&fake, &http, DEMO, &pairs).await.0, S::OK);
}

#[tokio::test]
async fn fault_status_retry_after_sets_the_header() {
    let (fake, http) = start().await;
    fake.inject(Endpoint::Emails, Fault::StatusRetryAfter(429, 7), Some(1));
    let resp = get(&http, &format!("{}/user/emails", fake.api_url()), None).await;
    assert_eq!(resp.status(), S::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "7");
}

#[tokio::test]
async fn fault_delay_and_the_global_delay_slow_the_answer() {
    let (fake, http) = start().await;
    let url = format!("{}/user", fake.api_url());
    fake.inject(
        Endpoint::User,
        Fault::Delay(Duration::from_millis(200)),
        Some(1),
    );
    let t = Instant::now();
    assert_eq!(get(&http, &url, None).await.status(), S::UNAUTHORIZED);
    assert!(t.elapsed() >= Duration::from_millis(200));

    fake.set_delay(Duration::from_millis(150));
    let t = Instant::now();
    get(&http, &format!("{}/nowhere", fake.base_url()), None).await;
    assert!(t.elapsed() >= Duration::from_millis(150));
    fake.set_delay(Duration::ZERO);
    let t = Instant::now();
    get(&http, &url, None).await;
    assert!(t.elapsed() < Duration::from_millis(150));
}

#[tokio::test]
async fn fault_garbage_is_a_200_that_is_not_json() {
    let (fake, http) = start().await;
    fake.inject(Endpoint::Token, Fault::Garbage, Some(1));
    let resp = http
        .post(fake.token_url())
        .body("grant_type=x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), S::OK);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    assert!(serde_json::from_slice::<Value>(&resp.bytes().await.unwrap()).is_err());
}

#[tokio::test]
async fn fault_huge_body_is_valid_json_of_the_requested_size() {
    let (fake, http) = start().await;
    fake.inject(Endpoint::Groups, Fault::HugeBody(5_000_000), Some(1));
    let resp = get(
        &http,
        &format!("{}/groups/wonderland", fake.legacy_api_url()),
        None,
    )
    .await;
    assert_eq!(resp.status(), S::OK);
    let body = resp.bytes().await.unwrap();
    assert_eq!(body.len(), 5_000_000);
    assert!(serde_json::from_slice::<Value>(&body).is_ok());
}

#[tokio::test]
async fn pagination_faults_apply_only_to_paginated_endpoints() {
    let (fake, http) = start().await;
    let token = access_token(&fake, &http, "alice").await;
    let api = fake.api_url();
    fake.inject(
        Endpoint::Any,
        Fault::ForeignNext("https://evil.example/steal".into()),
        Some(1),
    );
    // Not applicable to /user: it passes untouched and the fault stays queued.
    let (_, user) = get_json(&http, &format!("{api}/user"), Some(&token)).await;
    assert_eq!(user["type"], "user");
    let (_, page) = get_json(&http, &format!("{api}/user/workspaces"), Some(&token)).await;
    assert_eq!(page["next"], "https://evil.example/steal");

    fake.inject(Endpoint::Emails, Fault::NullValues, Some(1));
    let (_, page) = get_json(&http, &format!("{api}/user/emails"), Some(&token)).await;
    assert!(page["values"].is_null() && page.as_object().unwrap().contains_key("values"));

    fake.inject(Endpoint::Workspaces, Fault::CapitalValues, Some(1));
    let (_, page) = get_json(&http, &format!("{api}/user/workspaces"), Some(&token)).await;
    assert!(page.get("values").is_none());
    assert_eq!(page["Values"].as_array().unwrap().len(), 3);

    let (_, page) = get_json(&http, &format!("{api}/user/workspaces"), Some(&token)).await;
    assert_eq!(
        page["values"].as_array().unwrap().len(),
        3,
        "faults were used up"
    );
}

#[tokio::test]
async fn fault_reset_closes_the_connection_without_a_response() {
    let (fake, http) = start().await;
    fake.inject(Endpoint::User, Fault::Reset, Some(2));
    let err = http
        .get(format!("{}/user", fake.api_url()))
        .send()
        .await
        .expect_err("a reset connection is not a response");
    assert!(err.status().is_none(), "{err:?}");

    // On the wire: not one byte of a response.
    let addr = fake.base_url().trim_start_matches("http://").to_owned();
    let received = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /2.0/user HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = Vec::new();
        match s.read_to_end(&mut buf) {
            Ok(_) => buf,
            Err(e) => {
                assert_ne!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock,
                    "the connection stayed open"
                );
                assert_ne!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut,
                    "the connection stayed open"
                );
                buf
            }
        }
    })
    .await
    .unwrap();
    assert!(
        received.is_empty(),
        "{}",
        String::from_utf8_lossy(&received)
    );

    // The fake itself keeps serving.
    assert_eq!(
        get(&http, &format!("{}/user", fake.api_url()), None)
            .await
            .status(),
        S::UNAUTHORIZED
    );
}

#[tokio::test]
async fn faults_apply_a_number_of_times_or_until_cleared_first_match_first() {
    let (fake, http) = start().await;
    let url = format!("{}/user", fake.api_url());
    fake.inject(Endpoint::User, Fault::Status(502), Some(2));
    fake.inject(Endpoint::User, Fault::Status(504), None);
    assert_eq!(get(&http, &url, None).await.status(), S::BAD_GATEWAY);
    assert_eq!(get(&http, &url, None).await.status(), S::BAD_GATEWAY);
    assert_eq!(get(&http, &url, None).await.status(), S::GATEWAY_TIMEOUT);
    assert_eq!(get(&http, &url, None).await.status(), S::GATEWAY_TIMEOUT);
    fake.clear_faults();
    assert_eq!(get(&http, &url, None).await.status(), S::UNAUTHORIZED);
    assert_eq!(fake.hits(Endpoint::User), 5);
}

// --- Lifecycle -----------------------------------------------------------

#[tokio::test]
async fn shutdown_releases_the_port() {
    let (fake, http) = start().await;
    let url = format!("{}/user", fake.api_url());
    // An open keep-alive connection must not keep it alive.
    assert_eq!(get(&http, &url, None).await.status(), S::UNAUTHORIZED);
    let addr: SocketAddr = fake
        .base_url()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    fake.shutdown().await;
    assert!(get_err(&http, &url).await);
    assert!(TcpStream::connect(addr).await.is_err());
}

async fn get_err(http: &reqwest::Client, url: &str) -> bool {
    http.get(url).send().await.is_err()
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_server() {
    let (fake, _) = start().await;
    let addr: SocketAddr = fake
        .base_url()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let clone = fake.clone();
    drop(fake);
    assert!(
        TcpStream::connect(addr).await.is_ok(),
        "a clone keeps it running"
    );
    drop(clone);
    let mut stopped = false;
    for _ in 0..50 {
        if TcpStream::connect(addr).await.is_err() {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(stopped);
}

// --- Schemas -------------------------------------------------------------

#[tokio::test]
async fn the_schema_check_rejects_answers_that_do_not_follow_the_spec() {
    // A real answer of the fake, spoiled one way at a time: each must fail.
    let (fake, http) = start().await;
    let token = access_token(&fake, &http, "alice").await;
    let (_, user) = get_json(&http, &format!("{}/user", fake.api_url()), Some(&token)).await;
    assert_valid("definitions", "user", &user);
    let no_type = spoiled(&user, |v| {
        v.as_object_mut().unwrap().remove("type");
    });
    assert_invalid(
        "definitions",
        "user",
        &no_type,
        "no type (the spec's object requires it)",
    );
    let nickname = spoiled(&user, |v| v["nickname"] = json!(5));
    assert_invalid("definitions", "user", &nickname, "a number for nickname");
    let extra = spoiled(&user, |v| v["links"]["self"]["rel"] = json!("me"));
    assert_invalid(
        "definitions",
        "user",
        &extra,
        "a property a (closed) link has not",
    );
    let href = spoiled(&user, |v| v["links"]["self"]["href"] = json!("not a uri"));
    assert_invalid("definitions", "user", &href, "an href that is not a URI");

    // One line per violation, each starting with the pointer of its value.
    let both = spoiled(&nickname, |v| v["links"]["self"]["rel"] = json!("me"));
    let errors = violations("definitions", "user", &both);
    assert!(
        errors.iter().any(|e| e.starts_with("/nickname: ")),
        "{errors:#?}"
    );
    assert!(
        errors.iter().any(|e| e.starts_with("/links/self: ")),
        "{errors:#?}"
    );

    // An error body that is not the spec's error, and a page with a stray key.
    assert_invalid(
        "definitions",
        "error",
        &json!({"error": {"message": "x"}}),
        "no type",
    );
    let (_, page) = get_json(
        &http,
        &format!("{}/user/emails", fake.api_url()),
        Some(&token),
    )
    .await;
    assert_valid("local_definitions", "paginated_email", &page);
    let stray = spoiled(&page, |v| v["Values"] = json!([]));
    assert_invalid(
        "local_definitions",
        "paginated_email",
        &stray,
        "a key pages do not have",
    );
    let email = spoiled(&page, |v| v["values"][0]["is_primary"] = json!("yes"));
    assert_invalid(
        "local_definitions",
        "paginated_email",
        &email,
        "a string for is_primary",
    );
}

#[test]
fn a_schema_that_is_not_in_the_file_is_an_error_not_a_pass() {
    let schemas = schema::Schemas::new(schemas()).unwrap();
    assert!(schemas
        .validate("definitions", "no_such", &json!({}))
        .is_err());
}

#[tokio::test]
async fn the_schemas_follow_the_spec_where_it_is_nested() {
    // Guards the references: a workspace_membership's workspace is a full
    // workspace whose links are closed, its user an account, and the
    // spec's `object` (allOf) requires `type`.
    let (fake, http) = start().await;
    let token = access_token(&fake, &http, "alice").await;
    let url = format!("{}/user/workspaces/wonderland/permission", fake.api_url());
    let (_, body) = get_json(&http, &url, Some(&token)).await;
    assert_valid("definitions", "workspace_membership", &body);
    assert_valid("local_definitions", "workspace_permission", &body);
    let links = spoiled(&body, |v| {
        v["workspace"]["links"]["not_a_link_name"] = json!({"href": "http://x/"})
    });
    assert_invalid(
        "definitions",
        "workspace_membership",
        &links,
        "an unknown workspace link",
    );
    let name = spoiled(&body, |v| v["user"]["display_name"] = json!(1));
    assert_invalid(
        "definitions",
        "workspace_membership",
        &name,
        "a number for the user's display_name",
    );
    let no_type = spoiled(&body, |v| {
        v.as_object_mut().unwrap().remove("type");
    });
    assert_invalid("definitions", "workspace_membership", &no_type, "no type");
    let permission = spoiled(&body, |v| v["permission"] = json!("admin"));
    assert_valid("definitions", "workspace_membership", &permission);
    assert_invalid(
        "local_definitions",
        "workspace_permission",
        &permission,
        "an unknown permission",
    );
}

#[test]
fn schemas_file_is_up_to_date() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let spec_path = format!("{dir}/{}", schema::SPEC_FILE);
    let Ok(spec) = std::fs::read_to_string(&spec_path) else {
        println!(
            "note: {spec_path} not found; not checking {}",
            schema::SCHEMAS_FILE
        );
        return;
    };
    let spec: Value = serde_json::from_str(&spec).unwrap();
    let fresh = schema::extract(&spec).unwrap();
    let file = format!("{dir}/{}", schema::SCHEMAS_FILE);
    if std::env::var_os("UPDATE_BITBUCKET_SCHEMAS").is_some() {
        let mut text = serde_json::to_string_pretty(&fresh).unwrap();
        text.push('\n');
        std::fs::write(&file, text).unwrap();
        return;
    }
    let committed: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert!(
        committed == fresh,
        "{} is stale: regenerate with UPDATE_BITBUCKET_SCHEMAS=1 cargo test -p fake-bitbucket --lib tests::schemas_file_is_up_to_date",
        schema::SCHEMAS_FILE
    );
}

#[tokio::test]
async fn group_filter_answers_members_only_and_200_empty_otherwise() {
    let (fake, http) = start().await;
    let bob = access_token(&fake, &http, "bob").await;
    let url = format!(
        "{}/groups?group=wonderland/developers&group=wonderland/administrators&group=wonderland/release-managers&group=nowhere/x&group=junk",
        fake.legacy_api_url()
    );
    let (status, body) = get_json(&http, &url, Some(&bob)).await;
    assert_eq!(status, S::OK, "{body}");
    let slugs: Vec<&str> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["slug"].as_str().unwrap())
        .collect();
    // bob is in developers and release-managers, not administrators.
    assert_eq!(slugs, ["developers", "release-managers"]);
    assert_eq!(body[0]["owner"]["username"], "wonderland");
    assert!(body[0]["members"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["uuid"] == BOB_UUID));
    let url = format!(
        "{}/groups?group=wonderland/administrators",
        fake.legacy_api_url()
    );
    let (status, body) = get_json(&http, &url, Some(&bob)).await;
    assert_eq!((status, body), (S::OK, json!([])));
    let (status, _) = get_json(&http, &url, None).await;
    assert_eq!(status, S::UNAUTHORIZED);
    assert_eq!(fake.hits(Endpoint::GroupFilter), 3);
    assert_eq!(fake.hits(Endpoint::Groups), 0);
}
