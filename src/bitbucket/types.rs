//! Bitbucket's JSON, as read. Lenient where Bitbucket is known to vary
//! (`values: null`, `Values`), strict where the identity depends on it.

use serde::{Deserialize, Deserializer};

/// `GET /2.0/user` (the `user` schema; only what an identity needs).
#[derive(Debug, Clone, Deserialize)]
pub struct ApiUser {
    pub uuid: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub nickname: Option<String>,
    #[serde(default)]
    pub display_name: Option<String>,
}

/// One entry of `GET /2.0/user/emails`.
#[derive(Debug, Clone, Deserialize)]
pub struct ApiEmail {
    pub email: String,
    #[serde(default, deserialize_with = "null_as_false")]
    pub is_primary: bool,
    #[serde(default, deserialize_with = "null_as_false")]
    pub is_confirmed: bool,
}

/// One entry of `GET /2.0/user/workspaces` (`workspace_access`).
#[derive(Debug, Clone, Deserialize)]
pub struct ApiWorkspaceAccess {
    #[serde(default, deserialize_with = "null_as_false")]
    pub administrator: bool,
    pub workspace: ApiWorkspaceBase,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ApiWorkspaceBase {
    pub slug: String,
    #[serde(default)]
    pub uuid: Option<String>,
}

/// `GET /2.0/user/workspaces/{workspace}/permission`.
#[derive(Debug, Clone, Deserialize)]
pub struct ApiWorkspacePermission {
    pub permission: String,
}

/// One group of `GET /1.0/groups/{workspace}` (a JSON array).
#[derive(Debug, Clone, Deserialize)]
pub struct ApiGroup {
    pub slug: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub members: Vec<ApiGroupMember>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ApiGroupMember {
    #[serde(default)]
    pub uuid: Option<String>,
}

/// A page of a paginated 2.0 collection.
#[derive(Debug, Deserialize)]
#[serde(bound(deserialize = "T: Deserialize<'de>"))]
pub struct Page<T> {
    #[serde(default, alias = "Values", deserialize_with = "null_as_empty")]
    pub values: Vec<T>,
    #[serde(default)]
    pub next: Option<String>,
}

fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

fn null_as_false<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_accept_null_and_capitalised_values() {
        let p: Page<ApiEmail> = serde_json::from_str(r#"{"values": null, "pagelen": 10}"#).unwrap();
        assert!(p.values.is_empty());
        let p: Page<ApiEmail> =
            serde_json::from_str(r#"{"Values": [{"email": "a@b", "is_primary": true}]}"#).unwrap();
        assert_eq!(p.values.len(), 1);
        assert!(!p.values[0].is_confirmed);
        let p: Page<ApiEmail> = serde_json::from_str(r#"{}"#).unwrap();
        assert!(p.values.is_empty() && p.next.is_none());
    }

    #[test]
    fn a_user_without_uuid_is_rejected() {
        assert!(serde_json::from_str::<ApiUser>(r#"{"nickname": "x"}"#).is_err());
    }

    #[test]
    fn groups_with_null_members() {
        let g: Vec<ApiGroup> =
            serde_json::from_str(r#"[{"slug": "devs", "members": null, "name": "Devs"}]"#).unwrap();
        assert!(g[0].members.is_empty());
    }
}
