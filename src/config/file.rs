//! The file as serde types. Every key is a `Field`, which holds what was there
//! or the problem with it, so that one bad value never hides the others; keys
//! that no struct names are collected by `serde_ignored` with their paths.

use std::fmt;
use std::time::Duration;

use serde::de::value::MapAccessDeserializer;
use serde::de::{MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::GoDuration;

/// One key of the file: absent, `null`, a value, or why its value is unusable.
#[derive(Debug, Default)]
pub(super) enum Field<T> {
    #[default]
    Absent,
    Null,
    Ok(T),
    Bad(String),
}

impl<T> Field<T> {
    fn and_then<U>(self, f: impl FnOnce(T) -> Result<U, String>) -> Field<U> {
        match self {
            Field::Absent => Field::Absent,
            Field::Null => Field::Null,
            Field::Ok(v) => f(v).map_or_else(Field::Bad, Field::Ok),
            Field::Bad(e) => Field::Bad(e),
        }
    }

    /// Absent and `null` alike mean "not set".
    pub(super) fn into_option(self) -> Result<Option<T>, String> {
        match self {
            Field::Absent | Field::Null => Ok(None),
            Field::Ok(v) => Ok(Some(v)),
            Field::Bad(e) => Err(e),
        }
    }
}

/// How a type is read as a `Field`: a scalar from its value, a section or a
/// list by visiting it (so that `serde_ignored` sees the keys inside).
pub(super) trait Shape: Sized {
    fn field<'de, D: Deserializer<'de>>(d: D) -> Result<Field<Self>, D::Error>;
}

impl<'de, T: Shape> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::field(d)
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// A scalar key: its value, converted by `convert`.
fn scalar<'de, D: Deserializer<'de>, T>(
    d: D,
    convert: impl FnOnce(Value) -> Result<T, String>,
) -> Result<Field<T>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Null => Field::Null,
        v => convert(v).map_or_else(Field::Bad, Field::Ok),
    })
}

/// A string (numbers are accepted as their text), before any `$VAR` expansion.
#[derive(Debug)]
pub(super) struct Text(pub(super) String);

impl Shape for Text {
    fn field<'de, D: Deserializer<'de>>(d: D) -> Result<Field<Self>, D::Error> {
        scalar(d, |v| match v {
            Value::String(s) => Ok(Text(s)),
            Value::Number(n) => Ok(Text(n.to_string())),
            other => Err(format!("expected a string, got {}", kind(&other))),
        })
    }
}

impl Shape for bool {
    fn field<'de, D: Deserializer<'de>>(d: D) -> Result<Field<Self>, D::Error> {
        scalar(d, |v| match v {
            Value::Bool(b) => Ok(b),
            other => Err(format!("expected true or false, got {}", kind(&other))),
        })
    }
}

/// A number as written; whether it is a count in range is validation's call.
#[derive(Debug)]
pub(super) struct Number(pub(super) serde_json::Number);

impl Shape for Number {
    fn field<'de, D: Deserializer<'de>>(d: D) -> Result<Field<Self>, D::Error> {
        scalar(d, |v| match v {
            Value::Number(n) => Ok(Number(n)),
            other => Err(format!("expected a number, got {}", kind(&other))),
        })
    }
}

/// The durations of this file: Go's syntax, never negative.
impl Shape for Duration {
    fn field<'de, D: Deserializer<'de>>(d: D) -> Result<Field<Self>, D::Error> {
        Ok(Text::field(d)?.and_then(|Text(s)| {
            let bad =
                || format!("{s:?} is not a duration (use Go's syntax: 500ms, 60s, 5m, 1h30m)");
            let go: GoDuration = s.trim().parse().map_err(|_| bad())?;
            match go.to_std() {
                None => Err(format!("{s:?} is negative")),
                Some(d) if d > MAX_DURATION => Err(format!(
                    "{s:?} is too long (at most {}s)",
                    MAX_DURATION.as_secs()
                )),
                Some(d) => Ok(d),
            }
        }))
    }
}

/// Longer than any timeout or TTL means; keeps `Instant + d` far from overflow.
const MAX_DURATION: Duration = Duration::from_secs(1_000_000_000);

/// A section: a mapping read into `T`.
#[derive(Debug, Default)]
pub(super) struct Section<T>(pub(super) T);

/// A mapping or a list, visited in place so that `serde_ignored` follows the
/// keys inside; any other value is a problem, and `null` is not set.
trait Container: Sized {
    const EXPECTED: &'static str;

    fn map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Field<Self>, A::Error> {
        while map.next_entry::<Value, Value>()?.is_some() {}
        Ok(Field::Bad(format!(
            "expected {}, got a mapping",
            Self::EXPECTED
        )))
    }

    fn seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Field<Self>, A::Error> {
        while seq.next_element::<Value>()?.is_some() {}
        Ok(Field::Bad(format!(
            "expected {}, got a list",
            Self::EXPECTED
        )))
    }
}

impl<T: for<'de> Deserialize<'de>> Container for Section<T> {
    const EXPECTED: &'static str = "a mapping";

    fn map<'de, A: MapAccess<'de>>(map: A) -> Result<Field<Self>, A::Error> {
        T::deserialize(MapAccessDeserializer::new(map)).map(|t| Field::Ok(Section(t)))
    }
}

/// A list of `T`s, each a `Field` of its own (`key[i]`).
impl<T: Shape> Container for Vec<Field<T>> {
    const EXPECTED: &'static str = "a list";

    fn seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Field<Self>, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Field<T>>()? {
            items.push(item);
        }
        Ok(Field::Ok(items))
    }
}

struct ContainerVisitor<T>(std::marker::PhantomData<T>);

impl<T: Container> ContainerVisitor<T> {
    fn got<E>(what: &str) -> Result<Field<T>, E> {
        Ok(Field::Bad(format!("expected {}, got {what}", T::EXPECTED)))
    }
}

impl<'de, T: Container> Visitor<'de> for ContainerVisitor<T> {
    type Value = Field<T>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(T::EXPECTED)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        T::map(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        T::seq(seq)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Field::Null)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Self::got("a boolean")
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Self::got("a number")
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Self::got("a number")
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Self::got("a number")
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Self::got("a string")
    }
}

impl<T: Container> Shape for T {
    fn field<'de, D: Deserializer<'de>>(d: D) -> Result<Field<Self>, D::Error> {
        d.deserialize_any(ContainerVisitor(std::marker::PhantomData))
    }
}

pub(super) type List<T> = Field<Vec<Field<T>>>;

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct RawConfig {
    pub(super) grpc: Field<Section<RawGrpc>>,
    pub(super) telemetry: Field<Section<RawTelemetry>>,
    pub(super) logger: Field<Section<RawLogger>>,
    pub(super) connector_data: Field<Section<RawConnectorData>>,
    pub(super) connectors: List<Section<RawConnector>>,
    pub(super) cache: Field<Section<RawCache>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct RawGrpc {
    pub(super) addr: Field<Text>,
    pub(super) tls_cert: Field<Text>,
    pub(super) tls_key: Field<Text>,
    #[serde(rename = "tlsClientCA")]
    pub(super) tls_client_ca: Field<Text>,
    pub(super) reflection: Field<bool>,
    pub(super) auth_tokens: List<Text>,
    pub(super) shutdown_timeout: Field<Duration>,
    pub(super) max_request_bytes: Field<Number>,
    pub(super) max_in_flight: Field<Number>,
    pub(super) default_timeout: Field<Duration>,
    pub(super) keepalive_interval: Field<Duration>,
    pub(super) max_connections: Field<Number>,
    pub(super) connection_idle_timeout: Field<Duration>,
    pub(super) max_concurrent_streams: Field<Number>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct RawTelemetry {
    pub(super) http: Field<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct RawLogger {
    pub(super) level: Field<Text>,
    pub(super) format: Field<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct RawConnectorData {
    pub(super) keys: List<Text>,
    pub(super) accept_dex_plaintext: Field<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct RawCache {
    pub(super) redis: Field<Section<RawRedis>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct RawRedis {
    pub(super) url: Field<Text>,
}

/// A dex connector entry.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct RawConnector {
    #[serde(rename = "type")]
    pub(super) kind: Field<Text>,
    pub(super) id: Field<Text>,
    pub(super) name: Field<Text>,
    pub(super) config: Field<Section<RawConnectorOptions>>,
}

/// A connector entry's `config`: dex's bitbucket-cloud keys, then ours.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct RawConnectorOptions {
    #[serde(rename = "clientID")]
    pub(super) client_id: Field<Text>,
    pub(super) client_secret: Field<Text>,
    #[serde(rename = "redirectURI")]
    pub(super) redirect_uri: Field<Text>,
    pub(super) teams: List<Text>,
    pub(super) include_team_groups: Field<bool>,
    pub(super) get_workspace_permissions: Field<bool>,
    pub(super) team_groups_auth: Field<Section<RawBasicAuth>>,
    #[serde(rename = "teamGroupsCacheTTL")]
    pub(super) team_groups_cache_ttl: Field<Duration>,
    #[serde(rename = "authURL")]
    pub(super) auth_url: Field<Text>,
    #[serde(rename = "tokenURL")]
    pub(super) token_url: Field<Text>,
    #[serde(rename = "apiURL")]
    pub(super) api_url: Field<Text>,
    #[serde(rename = "legacyAPIURL")]
    pub(super) legacy_api_url: Field<Text>,
    pub(super) upstream_timeout: Field<Duration>,
    pub(super) upstream_max_in_flight: Field<Number>,
    pub(super) team_groups: List<Text>,
    #[serde(rename = "permissionCacheTTL")]
    pub(super) permission_cache_ttl: Field<Duration>,
    #[serde(rename = "refreshCacheTTL")]
    pub(super) refresh_cache_ttl: Field<Duration>,
    pub(super) rate_limit_backoff: Field<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct RawBasicAuth {
    pub(super) username: Field<Text>,
    pub(super) password: Field<Text>,
}

/// The keys a derived struct accepts, as serde's derive lists them; for
/// "did you mean", so that no key is named twice.
pub(super) fn keys_of<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    struct Keys<'a>(&'a mut &'static [&'static str]);
    impl<'de> Deserializer<'de> for Keys<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(serde::de::Error::custom("only the keys were wanted"))
        }
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("not a struct"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }
    let mut keys: &'static [&'static str] = &[];
    let _ = T::deserialize(Keys(&mut keys));
    keys
}

/// `a.b[0].c` from serde_ignored's path.
pub(super) fn path_text(p: &serde_ignored::Path) -> String {
    use serde_ignored::Path as P;
    match p {
        P::Root => String::new(),
        P::Seq { parent, index } => format!("{}[{index}]", path_text(parent)),
        P::Map { parent, key } => join(&path_text(parent), key),
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            path_text(parent)
        }
    }
}

/// `path.key`, or `key` at the top.
pub(super) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}
