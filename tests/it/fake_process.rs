//! `fake-bitbucket`: the fake in its own process, driven over real HTTP
//! through its control API (`/_fake/...`), as the Python end-to-end tests do.

use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode as S;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_bitbucket-connector");
const PREFIX: &str = "fake-bitbucket listening on ";

struct FakeProcess {
    child: tokio::process::Child,
    /// The rest of stdout, after the listening line.
    stdout: BufReader<tokio::process::ChildStdout>,
    url: String,
    http: reqwest::Client,
}

fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// `fake-bitbucket ARGS`, once it has printed its URL (the one stdout line).
async fn spawn(args: &[&str]) -> FakeProcess {
    let mut child = tokio::process::Command::new(BIN)
        .arg("fake-bitbucket")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(20), stdout.read_line(&mut line))
        .await
        .expect("no listening line within 20 s")
        .unwrap();
    let url = line
        .strip_suffix('\n')
        .and_then(|l| l.strip_prefix(PREFIX))
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let port: u16 = url["http://127.0.0.1:".len()..].parse().unwrap();
    assert_ne!(port, 0);
    FakeProcess {
        child,
        stdout,
        url,
        http: http_client(),
    }
}

impl FakeProcess {
    async fn get_json(&self, path: &str, token: Option<&str>) -> (S, Value) {
        let mut req = self.http.get(format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        json_of(req.send().await.unwrap()).await
    }

    async fn post_json(&self, path: &str, body: Option<Value>) -> (S, Value) {
        let mut req = self.http.post(format!("{}{path}", self.url));
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        json_of(req.send().await.unwrap()).await
    }

    async fn hits(&self) -> Value {
        let (status, hits) = self.get_json("/_fake/hits", None).await;
        assert_eq!(status, S::OK, "{hits}");
        hits
    }

    /// The code from the authorize redirect, as a browser would get it.
    async fn code(&self, client_id: &str, login_as: &str) -> (String, String) {
        let resp = self
            .http
            .get(format!(
                "{}/site/oauth2/authorize?client_id={client_id}&response_type=code&state=st&login_as={login_as}",
                self.url
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), S::FOUND);
        let location = resp.headers()["location"].to_str().unwrap().to_owned();
        let code = url::Url::parse(&location)
            .unwrap()
            .query_pairs()
            .find(|(k, _)| k == "code")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_else(|| panic!("no code in {location}"));
        (location, code)
    }

    async fn token(&self, basic: (&str, &str), form: &[(&str, &str)]) -> (S, Value) {
        let resp = self
            .http
            .post(format!("{}/site/oauth2/access_token", self.url))
            .basic_auth(basic.0, Some(basic.1))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(
                url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(form)
                    .finish(),
            )
            .send()
            .await
            .unwrap();
        json_of(resp).await
    }

    /// Logs `user` in with the demo consumer; the token response.
    async fn login(&self, user: &str) -> Value {
        let (_, code) = self.code("demo-client", user).await;
        let (status, body) = self
            .token(
                DEMO,
                &[("grant_type", "authorization_code"), ("code", &code)],
            )
            .await;
        assert_eq!(status, S::OK, "{body}");
        body
    }

    async fn refresh(&self, refresh_token: &str) -> (S, Value) {
        self.token(
            DEMO,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
            ],
        )
        .await
    }

    async fn user_status(&self, access_token: &str) -> S {
        self.get_json("/2.0/user", Some(access_token)).await.0
    }

    fn sigterm(&self) {
        let pid = self.child.id().unwrap().to_string();
        assert!(std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
    }
}

const DEMO: (&str, &str) = ("demo-client", "demo-secret");

async fn json_of(resp: reqwest::Response) -> (S, Value) {
    let status = resp.status();
    let body = resp.bytes().await.unwrap();
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body)));
    (status, value)
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("no {key} in {v}"))
}

#[tokio::test]
async fn fake_process_counts_hits_without_its_control_requests_and_resets_them() {
    let fake = spawn(&[]).await;
    let zero = json!({"authorize":0,"token":0,"user":0,"emails":0,"workspaces":0,"permission":0,"groups":0,"group_filter":0,"total":0});
    assert_eq!(fake.hits().await, zero);
    let token = fake.login("alice").await;
    let access = str_of(&token, "access_token");
    assert_eq!(fake.user_status(access).await, S::OK);
    let (status, _) = fake.get_json("/2.0/user/emails", Some(access)).await;
    assert_eq!(status, S::OK);
    // Control requests in between (settings, a 404 under /_fake/) count nowhere.
    fake.post_json("/_fake/settings", Some(json!({}))).await;
    fake.get_json("/_fake/settings", None).await;
    let (status, _) = fake.get_json("/_fake/no-such-thing", None).await;
    assert_eq!(status, S::NOT_FOUND);
    let expected = json!({"authorize":1,"token":1,"user":1,"emails":1,"workspaces":0,"permission":0,"groups":0,"group_filter":0,"total":4});
    assert_eq!(fake.hits().await, expected);
    assert_eq!(fake.hits().await, expected);
    let (status, body) = fake.post_json("/_fake/hits/reset", None).await;
    assert_eq!(status, S::OK, "{body}");
    assert_eq!(fake.hits().await, zero);
}

#[tokio::test]
async fn fake_process_settings_set_the_token_lifetime_and_the_refresh_grace() {
    let fake = spawn(&[]).await;
    let (status, settings) = fake.get_json("/_fake/settings", None).await;
    assert_eq!(status, S::OK);
    assert_eq!(
        settings,
        json!({"delay_ms": 0, "access_token_ttl_secs": 7200, "refresh_grace_secs": 600})
    );
    assert_eq!(fake.login("alice").await["expires_in"], 7200);

    let (status, settings) = fake
        .post_json(
            "/_fake/settings",
            Some(json!({"access_token_ttl_secs": 42, "delay_ms": 1})),
        )
        .await;
    assert_eq!(status, S::OK, "{settings}");
    assert_eq!(
        settings,
        json!({"delay_ms": 1, "access_token_ttl_secs": 42, "refresh_grace_secs": 600})
    );
    let token = fake.login("alice").await;
    assert_eq!(token["expires_in"], 42);

    // Within the default grace, the rotated token still works.
    let old = str_of(&token, "refresh_token").to_owned();
    let (status, rotated) = fake.refresh(&old).await;
    assert_eq!(status, S::OK, "{rotated}");
    assert_eq!(rotated["expires_in"], 42);
    assert_ne!(str_of(&rotated, "refresh_token"), old);
    assert_eq!(fake.refresh(&old).await.0, S::OK);

    // Grace 0: once used, an old refresh token dies.
    fake.post_json("/_fake/settings", Some(json!({"refresh_grace_secs": 0})))
        .await;
    let newer = str_of(&rotated, "refresh_token").to_owned();
    assert_eq!(fake.refresh(&newer).await.0, S::OK);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (status, body) = fake.refresh(&newer).await;
    assert_eq!(status, S::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_grant", "{body}");
    assert_eq!(fake.refresh(&old).await.1["error"], "invalid_grant");
}

#[tokio::test]
async fn fake_process_settings_refuse_unknown_keys_and_bad_values_with_400() {
    let fake = spawn(&[]).await;
    for (body, needle) in [
        (json!({"delay": 5}), "unknown field `delay`"),
        (json!({"delay_ms": "5"}), "invalid type"),
        (json!([1]), "expected"),
        (
            json!({"access_token_ttl_secs": u64::MAX}),
            "access_token_ttl_secs must be at most",
        ),
    ] {
        let (status, answer) = fake.post_json("/_fake/settings", Some(body.clone())).await;
        assert_eq!(status, S::BAD_REQUEST, "{body} -> {answer}");
        assert!(
            str_of(&answer, "error").contains(needle),
            "{body} -> {answer}"
        );
    }
    // Nothing was applied.
    let (_, settings) = fake.get_json("/_fake/settings", None).await;
    assert_eq!(settings["delay_ms"], 0);
    assert_eq!(settings["access_token_ttl_secs"], 7200);

    // The delay is not applied to control requests: with a minute of it, they
    // still answer (well) within the client's timeout, and can take it back.
    fake.post_json("/_fake/settings", Some(json!({"delay_ms": 60_000})))
        .await;
    let within = |path: &str, secs| {
        fake.http
            .get(format!("{}{path}", fake.url))
            .timeout(Duration::from_secs(secs))
            .send()
    };
    assert_eq!(within("/_fake/hits", 20).await.unwrap().status(), S::OK);
    assert!(within("/2.0/user", 1).await.unwrap_err().is_timeout());
    let (status, settings) = fake
        .post_json("/_fake/settings", Some(json!({"delay_ms": 0})))
        .await;
    assert_eq!((status, &settings["delay_ms"]), (S::OK, &json!(0)));
}

#[tokio::test]
async fn fake_process_expire_access_tokens_makes_the_api_answer_401_until_refreshed() {
    let fake = spawn(&[]).await;
    let alice = fake.login("alice").await;
    let bob = fake.login("bob").await;
    let alice_access = str_of(&alice, "access_token");
    assert_eq!(fake.user_status(alice_access).await, S::OK);

    let (status, body) = fake.post_json("/_fake/expire-access-tokens", None).await;
    assert_eq!(status, S::OK, "{body}");
    assert_eq!(body, json!({"expired": 2}));
    let (status, error) = fake.get_json("/2.0/user", Some(alice_access)).await;
    assert_eq!(status, S::UNAUTHORIZED);
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("expired")),
        "{error}"
    );
    assert_eq!(
        fake.user_status(str_of(&bob, "access_token")).await,
        S::UNAUTHORIZED
    );

    // The refresh token still works, and its new access token too.
    let (status, fresh) = fake.refresh(str_of(&alice, "refresh_token")).await;
    assert_eq!(status, S::OK, "{fresh}");
    assert_eq!(
        fake.user_status(str_of(&fresh, "access_token")).await,
        S::OK
    );
    assert_eq!(
        fake.post_json("/_fake/expire-access-tokens", None).await.1,
        json!({"expired": 1})
    );
}

#[tokio::test]
async fn fake_process_lists_refresh_tokens_oldest_first_rotated_ones_used() {
    let fake = spawn(&[]).await;
    let (_, list) = fake.get_json("/_fake/refresh-tokens", None).await;
    assert_eq!(list, json!([]));
    let first = fake.login("alice").await;
    let r1 = str_of(&first, "refresh_token").to_owned();
    let (_, second) = fake.refresh(&r1).await;
    let r2 = str_of(&second, "refresh_token").to_owned();
    let bob = fake.login("bob").await;
    let r3 = str_of(&bob, "refresh_token").to_owned();

    let (status, list) = fake.get_json("/_fake/refresh-tokens", None).await;
    assert_eq!(status, S::OK);
    assert_eq!(
        list,
        json!([
            {"token": r1, "username": "alice", "used": true},
            {"token": r2, "username": "alice", "used": false},
            // bob has no username: his nickname.
            {"token": r3, "username": "bob", "used": false},
        ])
    );

    // A rotated token past its grace window is gone from the fake, still listed as used.
    fake.post_json("/_fake/settings", Some(json!({"refresh_grace_secs": 0})))
        .await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(fake.refresh(&r1).await.0, S::BAD_REQUEST);
    let (_, list) = fake.get_json("/_fake/refresh-tokens", None).await;
    assert_eq!(
        list[0],
        json!({"token": r1, "username": "alice", "used": true})
    );
    assert_eq!(list.as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn fake_process_revoke_kills_only_that_users_tokens() {
    let fake = spawn(&[]).await;
    let alice = fake.login("alice").await;
    let bob = fake.login("bob").await;
    let (status, body) = fake.post_json("/_fake/revoke?username=alice", None).await;
    assert_eq!(status, S::OK, "{body}");
    assert_eq!(
        fake.user_status(str_of(&alice, "access_token")).await,
        S::UNAUTHORIZED
    );
    let (status, body) = fake.refresh(str_of(&alice, "refresh_token")).await;
    assert_eq!(
        (status, &body["error"]),
        (S::BAD_REQUEST, &json!("invalid_grant"))
    );
    assert_eq!(fake.user_status(str_of(&bob, "access_token")).await, S::OK);
    // Revoked before use: listed as unused.
    let (_, list) = fake.get_json("/_fake/refresh-tokens", None).await;
    assert_eq!(list[0]["used"], false, "{list}");

    let (status, body) = fake.post_json("/_fake/revoke?username=nobody", None).await;
    assert_eq!(status, S::NOT_FOUND, "{body}");
    assert!(str_of(&body, "error").contains("nobody"), "{body}");
    let (status, _) = fake.post_json("/_fake/revoke", None).await;
    assert_eq!(status, S::BAD_REQUEST);
}

#[tokio::test]
async fn fake_process_wide_user_is_a_member_of_n_extra_workspaces() {
    let fake = spawn(&["--wide-user", "20"]).await;
    let wide = fake.login("wide").await;
    let token = str_of(&wide, "access_token");
    let (status, user) = fake.get_json("/2.0/user", Some(token)).await;
    assert_eq!(status, S::OK, "{user}");
    assert_eq!(
        (&user["username"], &user["nickname"], &user["uuid"]),
        (
            &json!("wide"),
            &json!("wide"),
            &json!(fake_bitbucket::WIDE_UUID)
        )
    );
    let (_, emails) = fake.get_json("/2.0/user/emails", Some(token)).await;
    assert_eq!(emails["values"].as_array().unwrap().len(), 1);
    assert_eq!(
        (
            &emails["values"][0]["email"],
            &emails["values"][0]["is_primary"],
            &emails["values"][0]["is_confirmed"]
        ),
        (&json!("wide@example.com"), &json!(true), &json!(true))
    );

    let (status, page) = fake
        .get_json("/2.0/user/workspaces?pagelen=100", Some(token))
        .await;
    assert_eq!(status, S::OK, "{page}");
    let slugs: Vec<&str> = page["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["workspace"]["slug"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (1..=20).map(|i| format!("ws-{i:02}")).collect();
    assert_eq!(slugs, expected);
    assert_eq!(page["values"][0]["administrator"], true, "{page}");
    assert_eq!(page["values"][1]["administrator"], false, "{page}");
    let (_, perm) = fake
        .get_json("/2.0/user/workspaces/ws-01/permission", Some(token))
        .await;
    assert_eq!(perm["permission"], "owner", "{perm}");
    let (_, perm) = fake
        .get_json("/2.0/user/workspaces/ws-20/permission", Some(token))
        .await;
    assert_eq!(perm["permission"], "member", "{perm}");
    // As owner of ws-01, wide reads its groups: `team` {wide}, `others` {}.
    let (status, groups) = fake.get_json("/1.0/groups/ws-01", Some(token)).await;
    assert_eq!(status, S::OK, "{groups}");
    let members = |slug: &str| -> Vec<Value> {
        groups
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["slug"] == slug)
            .unwrap_or_else(|| panic!("no group {slug} in {groups}"))["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["uuid"].clone())
            .collect()
    };
    assert_eq!(members("team"), [json!(fake_bitbucket::WIDE_UUID)]);
    assert_eq!(members("others"), Vec::<Value>::new());

    // The demo users are as they were.
    let alice = fake.login("alice").await;
    let (_, page) = fake
        .get_json(
            "/2.0/user/workspaces?pagelen=100",
            Some(str_of(&alice, "access_token")),
        )
        .await;
    assert_eq!(page["values"].as_array().unwrap().len(), 3, "{page}");
}

#[tokio::test]
async fn fake_process_serves_the_consumers_given_on_the_command_line() {
    let fake = spawn(&[
        "--client-id",
        "e2e-client",
        "--client-secret",
        "e2e-secret",
        "--redirect-uri",
        "http://127.0.0.1:40123/dex/callback",
        "--client",
        "second:s3cret:http://127.0.0.1:40124/dex/callback",
    ])
    .await;
    for (id, secret, port) in [
        ("e2e-client", "e2e-secret", 40123),
        ("second", "s3cret", 40124),
    ] {
        let (location, code) = fake.code(id, "alice").await;
        assert!(
            location.starts_with(&format!("http://127.0.0.1:{port}/dex/callback?code=")),
            "{location}"
        );
        let (status, body) = fake
            .token(
                (id, secret),
                &[("grant_type", "authorization_code"), ("code", &code)],
            )
            .await;
        assert_eq!(status, S::OK, "{body}");
    }
    // The demo consumer is replaced.
    let resp = fake
        .http
        .get(format!(
            "{}/site/oauth2/authorize?client_id=demo-client&response_type=code",
            fake.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), S::BAD_REQUEST);
}

#[tokio::test]
async fn fake_process_exits_0_on_sigterm_and_on_sigint() {
    for signal in ["-TERM", "-INT"] {
        let mut fake = spawn(&[]).await;
        assert_eq!(fake.hits().await["total"], 0);
        if signal == "-TERM" {
            fake.sigterm();
        } else {
            let pid = fake.child.id().unwrap().to_string();
            assert!(std::process::Command::new("kill")
                .args([signal, &pid])
                .status()
                .unwrap()
                .success());
        }
        let status = tokio::time::timeout(Duration::from_secs(10), fake.child.wait())
            .await
            .expect("still running 10 s after the signal")
            .unwrap();
        assert_eq!(status.code(), Some(0), "{signal}: {status:?}");
        let mut rest = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut fake.stdout, &mut rest)
            .await
            .unwrap();
        assert_eq!(rest, "", "stdout has more than the listening line");
    }
}

#[test]
fn fake_process_refuses_bad_flags_with_a_clear_line() {
    for (args, needle) in [
        (&["--nope"][..], "unexpected argument '--nope'"),
        (&["--wide-user", "lots"], "--wide-user"),
        (&["--redirect-uri", "callback"], "not an absolute"),
        (&["--client", "just-an-id"], "ID:SECRET:REDIRECT_URI"),
    ] {
        let out = std::process::Command::new(BIN)
            .arg("fake-bitbucket")
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("error: ") && first.contains(needle),
            "{args:?}: {stderr}"
        );
    }
}

#[tokio::test]
async fn fake_process_on_a_taken_port_exits_1_with_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = tokio::process::Command::new(BIN)
        .args(["fake-bitbucket", "--addr", &addr])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
}
