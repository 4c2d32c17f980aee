//! Bitbucket's token endpoint through the `oauth2` crate, with a token
//! response type that accepts Bitbucket's variations.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::{
    AccessToken, EndpointNotSet, EndpointSet, HttpRequest, HttpResponse, RefreshToken,
    RequestTokenError, Scope, StandardRevocableToken, TokenResponse,
};
use serde::{Deserialize, Deserializer, Serialize};
use tokio::time::Instant;

use super::http::Http;
use super::UpstreamError;

pub(super) const TOKEN_ENDPOINT: &str = "/site/oauth2/access_token";

/// Bitbucket's token response: `expires_in` as a number or a string,
/// `scopes` (Bitbucket) or `scope` (RFC 6749), `token_type` optional.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct BitbucketTokenResponse {
    access_token: AccessToken,
    #[serde(default = "bearer", deserialize_with = "lenient_token_type")]
    token_type: BasicTokenType,
    #[serde(default, deserialize_with = "number_or_string")]
    expires_in: Option<u64>,
    #[serde(default)]
    refresh_token: Option<RefreshToken>,
    #[serde(default, alias = "scope", deserialize_with = "space_separated")]
    scopes: Option<Vec<Scope>>,
}

fn bearer() -> BasicTokenType {
    BasicTokenType::Bearer
}

fn lenient_token_type<'de, D: Deserializer<'de>>(d: D) -> Result<BasicTokenType, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    Ok(match s.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("bearer") | Some("") => BasicTokenType::Bearer,
        Some("mac") => BasicTokenType::Mac,
        Some(other) => BasicTokenType::Extension(other.to_string()),
    })
}

fn number_or_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrStr {
        Num(f64),
        Str(String),
    }
    match Option::<NumOrStr>::deserialize(d)? {
        None => Ok(None),
        Some(NumOrStr::Num(n)) if n.is_finite() && n >= 0.0 => Ok(Some(n as u64)),
        Some(NumOrStr::Str(s)) if s.trim().is_empty() => Ok(None),
        Some(NumOrStr::Str(s)) => s
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| serde::de::Error::custom("expires_in is not a number of seconds")),
        Some(NumOrStr::Num(_)) => Err(serde::de::Error::custom("expires_in is negative")),
    }
}

fn space_separated<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Scope>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum StrOrList {
        Str(String),
        List(Vec<String>),
    }
    Ok(Option::<StrOrList>::deserialize(d)?.map(|v| {
        let items: Vec<String> = match v {
            StrOrList::Str(s) => s.split([' ', ',']).map(str::to_string).collect(),
            StrOrList::List(l) => l,
        };
        items
            .into_iter()
            .filter(|s| !s.is_empty())
            .map(Scope::new)
            .collect()
    }))
}

impl TokenResponse for BitbucketTokenResponse {
    type TokenType = BasicTokenType;

    fn access_token(&self) -> &AccessToken {
        &self.access_token
    }
    fn token_type(&self) -> &BasicTokenType {
        &self.token_type
    }
    fn expires_in(&self) -> Option<Duration> {
        self.expires_in.map(Duration::from_secs)
    }
    fn refresh_token(&self) -> Option<&RefreshToken> {
        self.refresh_token.as_ref()
    }
    fn scopes(&self) -> Option<&Vec<Scope>> {
        self.scopes.as_ref()
    }
}

pub(super) type OAuthClient = oauth2::Client<
    BasicErrorResponse,
    BitbucketTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// What the token endpoint's answer failed with, for the oauth2 crate.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct TokenHttpError(pub UpstreamError);

/// Adapts [`Http`] to `oauth2::AsyncHttpClient`: one attempt (a code is
/// never sent twice once Bitbucket answered), the deadline and body cap kept;
/// 429 and 5xx become errors here, before oauth2 tries to parse them.
pub(super) struct TokenHttp<'a> {
    pub http: &'a Http,
    /// The token URL oauth2 was given, already parsed: oauth2's request
    /// carries the same one as an `http::Uri`.
    pub url: &'a url::Url,
    pub deadline: Instant,
}

impl<'c> oauth2::AsyncHttpClient<'c> for TokenHttp<'_> {
    type Error = TokenHttpError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, TokenHttpError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            debug_assert_eq!(parts.uri.path(), self.url.path());
            let mut req = self.http.post(self.url).body(body);
            for (name, value) in &parts.headers {
                req = req.header(name, value);
            }
            let resp = self
                .http
                .send_once(TOKEN_ENDPOINT, req, self.deadline)
                .await
                .map_err(TokenHttpError)?;
            if resp.status.is_server_error() || resp.status.as_u16() == 429 {
                return Err(TokenHttpError(UpstreamError::Unavailable {
                    endpoint: TOKEN_ENDPOINT,
                    detail: format!("HTTP {}", resp.status.as_u16()),
                }));
            }
            let mut out = http::Response::builder().status(resp.status.as_u16());
            for (name, value) in &resp.headers {
                out = out.header(name.as_str(), value.as_bytes());
            }
            out.body(resp.body.to_vec()).map_err(|e| {
                TokenHttpError(UpstreamError::Invalid {
                    endpoint: TOKEN_ENDPOINT,
                    detail: format!("unusable response: {e}"),
                })
            })
        })
    }
}

/// Turns oauth2's error into ours. Response bodies (which may carry tokens)
/// are dropped, never shown. An OAuth error names who was refused: the
/// consumer (`invalid_client`, `unauthorized_client`), else the grant.
pub(super) fn classify(e: RequestTokenError<TokenHttpError, BasicErrorResponse>) -> UpstreamError {
    match e {
        RequestTokenError::Request(TokenHttpError(u)) => u,
        RequestTokenError::ServerResponse(r) => {
            let error = r.error().as_ref().to_string();
            let description = r.error_description().cloned();
            if error == "invalid_client" || error == "unauthorized_client" {
                UpstreamError::ClientRejected { error, description }
            } else {
                UpstreamError::GrantRejected { error, description }
            }
        }
        RequestTokenError::Parse(err, _body) => UpstreamError::Invalid {
            endpoint: TOKEN_ENDPOINT,
            detail: format!("unparseable token response at {}", err.path()),
        },
        RequestTokenError::Other(msg) => UpstreamError::Invalid {
            endpoint: TOKEN_ENDPOINT,
            detail: msg,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> BitbucketTokenResponse {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn bitbucket_shape() {
        let t = parse(
            r#"{"access_token":"at","scopes":"account email","expires_in":7200,
                "refresh_token":"rt","token_type":"bearer","state":"authorization_code"}"#,
        );
        assert_eq!(t.access_token().secret(), "at");
        assert_eq!(t.expires_in(), Some(Duration::from_secs(7200)));
        assert_eq!(t.refresh_token().unwrap().secret(), "rt");
        assert_eq!(t.scopes().unwrap().len(), 2);
    }

    #[test]
    fn quirks_are_tolerated() {
        let t = parse(r#"{"access_token":"at","expires_in":"3600","scope":"account"}"#);
        assert_eq!(t.expires_in(), Some(Duration::from_secs(3600)));
        assert_eq!(*t.token_type(), BasicTokenType::Bearer);
        assert_eq!(t.scopes().unwrap()[0].as_str(), "account");
        let t = parse(r#"{"access_token":"at","token_type":"Bearer","expires_in":null}"#);
        assert_eq!(t.expires_in(), None);
    }

    #[test]
    fn garbage_expiry_is_an_error() {
        assert!(serde_json::from_str::<BitbucketTokenResponse>(
            r#"{"access_token":"a","expires_in":"soon"}"#
        )
        .is_err());
        assert!(serde_json::from_str::<BitbucketTokenResponse>(
            r#"{"access_token":"a","expires_in":-5}"#
        )
        .is_err());
    }

    #[test]
    fn debug_hides_tokens() {
        let t = parse(r#"{"access_token":"secret-at","refresh_token":"secret-rt"}"#);
        let d = format!("{t:?}");
        assert!(!d.contains("secret-at") && !d.contains("secret-rt"), "{d}");
    }
}
