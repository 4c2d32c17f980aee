//! The data a [`super::FakeBitbucket`] serves: OAuth consumers, users,
//! workspaces with their members and groups, and workspace-admin credentials.

use std::fmt;

/// Everything the fake knows. Change it while running with
/// [`super::FakeBitbucket::update_fixture`].
#[derive(Clone, Debug, Default)]
pub struct Fixture {
    pub clients: Vec<OAuthClient>,
    pub users: Vec<User>,
    pub workspaces: Vec<Workspace>,
    pub admins: Vec<AdminCredential>,
}

/// An OAuth consumer. Bitbucket redirects to the consumer's registered
/// callback URL, so does the fake.
#[derive(Clone)]
pub struct OAuthClient {
    pub client_id: String,
    pub client_secret: String,
    pub redirect_uri: String,
}

impl fmt::Debug for OAuthClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuthClient")
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("redirect_uri", &self.redirect_uri)
            .finish()
    }
}

#[derive(Clone, Debug)]
pub struct User {
    /// With braces, as Bitbucket writes it: `{...}`.
    pub uuid: String,
    /// Absent for accounts that never had one; `/2.0/user` then omits it.
    pub username: Option<String>,
    pub nickname: String,
    pub display_name: String,
    pub account_id: String,
    pub emails: Vec<Email>,
}

#[derive(Clone, Debug)]
pub struct Email {
    pub email: String,
    pub is_primary: bool,
    pub is_confirmed: bool,
}

#[derive(Clone, Debug)]
pub struct Workspace {
    pub slug: String,
    /// With braces.
    pub uuid: String,
    pub name: String,
    pub members: Vec<Membership>,
    pub groups: Vec<Group>,
}

#[derive(Clone, Debug)]
pub struct Membership {
    pub user_uuid: String,
    /// `owner`, `create-project`, `collaborator` or `member`. Owners are the
    /// workspace's administrators (`administrator: true`, may read groups).
    pub permission: String,
}

#[derive(Clone, Debug)]
pub struct Group {
    pub slug: String,
    pub name: String,
    /// User uuids, with braces.
    pub members: Vec<String>,
}

/// A username + API token accepted as HTTP Basic by `/1.0/groups/{workspace}`
/// for the listed workspace slugs.
#[derive(Clone)]
pub struct AdminCredential {
    pub username: String,
    pub password: String,
    pub workspaces: Vec<String>,
}

impl fmt::Debug for AdminCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminCredential")
            .field("username", &self.username)
            .field("password", &"[redacted]")
            .field("workspaces", &self.workspaces)
            .finish()
    }
}

pub const DEMO_CLIENT_ID: &str = "demo-client";
pub const DEMO_CLIENT_SECRET: &str = "demo-secret";
pub const DEMO_REDIRECT_URI: &str = "http://127.0.0.1:5556/dex/callback";
pub const ALICE_UUID: &str = "{8c7e2f4a-3b1d-4e6f-9a0b-a11ce0000001}";
pub const BOB_UUID: &str = "{2d4f6a8c-5e7b-4c9d-8e1f-b0b000000002}";
pub const DEMO_ADMIN_USERNAME: &str = "admin@example.com";
pub const DEMO_ADMIN_PASSWORD: &str = "demo-admin-api-token";

impl Fixture {
    /// The demo world:
    ///
    /// - client `demo-client` / `demo-secret`, redirect `http://127.0.0.1:5556/dex/callback`;
    /// - `alice` (username and nickname `alice`), emails in this order:
    ///   `alice@old.example.com` (confirmed, not primary), `alice@example.com`
    ///   (confirmed, primary), `alice@unconfirmed.example.com` (unconfirmed);
    /// - `bob`: no `username` (only nickname `bob`), email `bob@example.com`;
    /// - workspaces, in this order:
    ///   - `wonderland`: alice owner, bob member; groups `developers` {alice, bob},
    ///     `release-managers` {bob}, `administrators` {alice};
    ///   - `looking-glass`: alice member; groups `readers` {alice}, `writers` {};
    ///   - `tea-party`: alice collaborator; group `hatters` {};
    /// - admin credential `admin@example.com` / `demo-admin-api-token` for
    ///   `looking-glass` only (so `tea-party`'s groups are readable by nobody
    ///   in the demo: neither alice's token nor the credential).
    pub fn demo() -> Fixture {
        let group = |slug: &str, name: &str, members: &[&str]| Group {
            slug: slug.to_owned(),
            name: name.to_owned(),
            members: members.iter().map(|m| (*m).to_owned()).collect(),
        };
        let member = |uuid: &str, permission: &str| Membership {
            user_uuid: uuid.to_owned(),
            permission: permission.to_owned(),
        };
        let email = |email: &str, is_primary: bool, is_confirmed: bool| Email {
            email: email.to_owned(),
            is_primary,
            is_confirmed,
        };
        Fixture {
            clients: vec![OAuthClient {
                client_id: DEMO_CLIENT_ID.to_owned(),
                client_secret: DEMO_CLIENT_SECRET.to_owned(),
                redirect_uri: DEMO_REDIRECT_URI.to_owned(),
            }],
            users: vec![
                User {
                    uuid: ALICE_UUID.to_owned(),
                    username: Some("alice".to_owned()),
                    nickname: "alice".to_owned(),
                    display_name: "Alice Liddell".to_owned(),
                    account_id: "712020:8c7e2f4a-a11c-4e00-9a0b-000000000001".to_owned(),
                    emails: vec![
                        email("alice@old.example.com", false, true),
                        email("alice@example.com", true, true),
                        email("alice@unconfirmed.example.com", false, false),
                    ],
                },
                User {
                    uuid: BOB_UUID.to_owned(),
                    username: None,
                    nickname: "bob".to_owned(),
                    display_name: "Bob Builder".to_owned(),
                    account_id: "712020:2d4f6a8c-b0b0-4c00-8e1f-000000000002".to_owned(),
                    emails: vec![email("bob@example.com", true, true)],
                },
            ],
            workspaces: vec![
                Workspace {
                    slug: "wonderland".to_owned(),
                    uuid: "{0a1b2c3d-0000-4000-8000-000000000001}".to_owned(),
                    name: "Wonderland".to_owned(),
                    members: vec![member(ALICE_UUID, "owner"), member(BOB_UUID, "member")],
                    groups: vec![
                        group("developers", "Developers", &[ALICE_UUID, BOB_UUID]),
                        group("release-managers", "Release managers", &[BOB_UUID]),
                        group("administrators", "Administrators", &[ALICE_UUID]),
                    ],
                },
                Workspace {
                    slug: "looking-glass".to_owned(),
                    uuid: "{0a1b2c3d-0000-4000-8000-000000000002}".to_owned(),
                    name: "Through the Looking-Glass".to_owned(),
                    members: vec![member(ALICE_UUID, "member")],
                    groups: vec![
                        group("readers", "Readers", &[ALICE_UUID]),
                        group("writers", "Writers", &[]),
                    ],
                },
                Workspace {
                    slug: "tea-party".to_owned(),
                    uuid: "{0a1b2c3d-0000-4000-8000-000000000003}".to_owned(),
                    name: "Mad Tea-Party".to_owned(),
                    members: vec![member(ALICE_UUID, "collaborator")],
                    groups: vec![group("hatters", "Hatters", &[])],
                },
            ],
            admins: vec![AdminCredential {
                username: DEMO_ADMIN_USERNAME.to_owned(),
                password: DEMO_ADMIN_PASSWORD.to_owned(),
                workspaces: vec!["looking-glass".to_owned()],
            }],
        }
    }

    /// [`Fixture::demo`] with this OAuth client instead of the demo client.
    pub fn with_client(
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
        redirect_uri: impl Into<String>,
    ) -> Fixture {
        Fixture {
            clients: vec![OAuthClient {
                client_id: client_id.into(),
                client_secret: client_secret.into(),
                redirect_uri: redirect_uri.into(),
            }],
            ..Fixture::demo()
        }
    }
}
