//! Bitbucket's JSON, as read. Lenient where Bitbucket is known to vary
//! (`values: null`, `Values`), strict where the identity depends on it.

use serde::{Deserialize, Deserializer, Serialize};

/// `GET /2.0/user` (the `user` schema; only what an identity needs).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ApiUser {
    pub uuid: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub nickname: Option<String>,
}

/// One entry of `GET /2.0/user/emails`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ApiEmail {
    pub email: String,
    #[serde(default, deserialize_with = "null_as_false")]
    pub is_primary: bool,
    #[serde(default, deserialize_with = "null_as_false")]
    pub is_confirmed: bool,
}

/// One entry of `GET /2.0/user/workspaces` (`workspace_access`).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ApiWorkspaceAccess {
    #[serde(default, deserialize_with = "null_as_false")]
    pub administrator: bool,
    pub workspace: ApiWorkspaceBase,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ApiWorkspaceBase {
    pub slug: String,
    #[serde(default)]
    pub uuid: Option<String>,
}

/// `GET /2.0/user/workspaces/{workspace}/permission`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ApiWorkspacePermission {
    pub permission: String,
}

/// One group of `GET /1.0/groups/{workspace}` or `GET /1.0/groups?group=…`
/// (a JSON array).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub(crate) struct ApiGroup {
    pub slug: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub members: Vec<ApiGroupMember>,
    /// The workspace (team account) that owns the group.
    #[serde(default)]
    pub owner: Option<ApiGroupOwner>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub(crate) struct ApiGroupOwner {
    #[serde(default)]
    pub uuid: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub nickname: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub(crate) struct ApiGroupMember {
    #[serde(default)]
    pub uuid: Option<String>,
}

/// A page of a paginated 2.0 collection.
#[derive(Debug, Deserialize)]
#[serde(bound(deserialize = "T: Deserialize<'de>"))]
pub(crate) struct Page<T> {
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

/// Property tests on decoding arbitrary JSON: `cargo test --lib fuzz_`.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| Value::Number(n.into())),
            ".{0,20}".prop_map(Value::String),
            prop_oneof![
                Just("values"),
                Just("Values"),
                Just("next"),
                Just("uuid"),
                Just("slug")
            ]
            .prop_map(|s| Value::String(s.to_string())),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            let key = prop_oneof![
                Just("values".to_string()),
                Just("Values".to_string()),
                Just("next".to_string()),
                Just("uuid".to_string()),
                Just("slug".to_string()),
                Just("workspace".to_string()),
                Just("members".to_string()),
                Just("email".to_string()),
                Just("is_primary".to_string()),
                Just("is_confirmed".to_string()),
                Just("permission".to_string()),
                "[a-z_]{1,10}",
            ];
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(key, inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(2000)))]

        #[test]
        fn fuzz_decoding_bitbucket_json_never_panics(v in json()) {
            let bytes = serde_json::to_vec(&v).unwrap();
            let _ = serde_json::from_slice::<ApiUser>(&bytes);
            let _ = serde_json::from_slice::<Page<ApiEmail>>(&bytes);
            let _ = serde_json::from_slice::<Page<ApiWorkspaceAccess>>(&bytes);
            let _ = serde_json::from_slice::<ApiWorkspacePermission>(&bytes);
            let _ = serde_json::from_slice::<Vec<ApiGroup>>(&bytes);
        }

        #[test]
        fn fuzz_decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = serde_json::from_slice::<Page<ApiWorkspaceAccess>>(&bytes);
            let _ = serde_json::from_slice::<Vec<ApiGroup>>(&bytes);
            let _ = serde_json::from_slice::<ApiUser>(&bytes);
        }

        #[test]
        fn fuzz_well_formed_pages_decode_entry_for_entry(slugs in proptest::collection::vec("[a-z0-9-]{1,20}", 0..20), next in proptest::option::of("https://api\\.bitbucket\\.org/2\\.0/x\\?page=[0-9]{1,3}")) {
            let values: Vec<Value> = slugs.iter().map(|s| serde_json::json!({
                "type": "workspace_access", "administrator": false,
                "workspace": {"type": "workspace_base", "slug": s, "uuid": "{u}"}
            })).collect();
            let mut page = serde_json::json!({"values": values, "pagelen": 100, "page": 1});
            if let Some(n) = &next { page["next"] = Value::String(n.clone()); }
            let p: Page<ApiWorkspaceAccess> = serde_json::from_value(page).unwrap();
            prop_assert_eq!(p.values.iter().map(|w| w.workspace.slug.clone()).collect::<Vec<_>>(), slugs);
            prop_assert_eq!(p.next, next);
        }
    }
}
