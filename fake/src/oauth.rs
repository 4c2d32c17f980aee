//! `/site/oauth2/authorize` and `/site/oauth2/access_token`.

use super::error::ApiError;
use super::server::*;
use super::*;

pub(super) async fn authorize(AxState(shared): St, req: Request) -> Result<Response, ApiError> {
    begin(&shared, Endpoint::Authorize, &req).await?;
    let q = query_pairs(&req);
    let mut st = shared.lock();
    let client = first(&q, "client_id")
        .and_then(|id| st.index.client_by_id.get(id))
        .map(|&i| st.fixture.clients[i].clone());
    let Some(client) = client else {
        return Err(ApiError::Page(StatusCode::BAD_REQUEST, "Invalid client_id"));
    };
    if first(&q, "redirect_uri").is_some_and(|r| r != client.redirect_uri) {
        return Err(ApiError::Page(
            StatusCode::BAD_REQUEST,
            "The redirect_uri does not match the consumer's callback URL",
        ));
    }
    let Ok(mut target) = url::Url::parse(&client.redirect_uri) else {
        return Err(ApiError::Page(
            StatusCode::BAD_REQUEST,
            "The consumer has no valid callback URL",
        ));
    };
    let state = first(&q, "state");
    let error = if first(&q, "deny") == Some("1") {
        Some(("access_denied", "The user denied access to the application"))
    } else if first(&q, "response_type") != Some("code") {
        Some(("unsupported_response_type", "response_type must be code"))
    } else {
        None
    };
    {
        let mut pairs = target.query_pairs_mut();
        match error {
            Some((error, description)) => {
                pairs.append_pair("error", error);
                pairs.append_pair("error_description", description);
            }
            None => {
                let user = match first(&q, "login_as") {
                    Some(name) => st.index.user_by_name.get(name).copied(),
                    None => (!st.fixture.users.is_empty()).then_some(0),
                };
                let Some(user) = user else {
                    return Err(ApiError::Page(
                        StatusCode::BAD_REQUEST,
                        "No such user to log in as",
                    ));
                };
                let uuid = st.fixture.users[user].uuid.clone();
                let code = st.mint_code(&client.client_id, &uuid, Instant::now());
                pairs.append_pair("code", &code);
            }
        }
        if let Some(state) = state {
            pairs.append_pair("state", state);
        }
    }
    let location = HeaderValue::from_str(target.as_str())
        .map_err(|_| ApiError::Page(StatusCode::BAD_REQUEST, "Invalid callback URL"))?;
    Ok((StatusCode::FOUND, [(LOCATION, location)]).into_response())
}

/// RFC 6749 has clients form-urlencode the id and secret before Basic; most
/// do not. Accept both spellings.
fn credential_matches(given: &str, expected: &str) -> bool {
    given == expected
        || url::form_urlencoded::parse(format!("x={given}").as_bytes())
            .next()
            .is_some_and(|(_, v)| v == expected)
}

pub(super) async fn token(AxState(shared): St, req: Request) -> Result<Response, ApiError> {
    begin(&shared, Endpoint::Token, &req).await?;
    let basic = basic_credentials(req.headers());
    let is_form = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let body = axum::body::to_bytes(req.into_body(), MAX_FORM_BYTES)
        .await
        .map_err(|_| ApiError::invalid_request("Unreadable request body"))?;
    if !is_form {
        return Err(ApiError::invalid_request(
            "The request body must be application/x-www-form-urlencoded",
        ));
    }
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let now = Instant::now();
    let mut st = shared.lock();

    let Some((id, secret)) = basic else {
        let description = if first(&form, "client_id").is_some() {
            "Client credentials must be sent with HTTP Basic authentication"
        } else {
            "Missing client credentials"
        };
        return Err(ApiError::OAuth(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            description,
        ));
    };
    let client = st
        .fixture
        .clients
        .iter()
        .find(|c| credential_matches(&id, &c.client_id))
        .filter(|c| credential_matches(&secret, &c.client_secret))
        .map(|c| c.client_id.clone());
    let Some(client_id) = client else {
        return Err(ApiError::OAuth(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Invalid OAuth client credentials",
        ));
    };

    let grant = first(&form, "grant_type").unwrap_or_default();
    let user_uuid = match grant {
        "authorization_code" => {
            let Some(code) = first(&form, "code") else {
                return Err(ApiError::invalid_request("Missing code"));
            };
            let redirect = st
                .index
                .client_by_id
                .get(&client_id)
                .map(|&i| &st.fixture.clients[i].redirect_uri);
            if first(&form, "redirect_uri").is_some_and(|r| Some(r) != redirect.map(String::as_str))
            {
                return Err(ApiError::invalid_grant(
                    "redirect_uri does not match the consumer's callback URL",
                ));
            }
            match st.codes.get(code) {
                None => {
                    return Err(ApiError::invalid_grant(
                        "Invalid or used authorization code",
                    ))
                }
                Some(g) if g.expires_at <= now => {
                    st.codes.remove(code);
                    return Err(ApiError::invalid_grant("Authorization code has expired"));
                }
                Some(g) if g.client_id != client_id => {
                    return Err(ApiError::invalid_grant(
                        "Authorization code was issued to another client",
                    ))
                }
                Some(_) => st
                    .codes
                    .remove(code)
                    .map(|g| g.user_uuid)
                    .unwrap_or_default(),
            }
        }
        "refresh_token" => {
            let Some(token) = first(&form, "refresh_token") else {
                return Err(ApiError::invalid_request("Missing refresh_token"));
            };
            let grace = st.settings.refresh_grace;
            match st.refresh.get_mut(token) {
                None => return Err(ApiError::invalid_grant("Invalid refresh_token")),
                Some(g) if g.client_id != client_id => {
                    return Err(ApiError::invalid_grant(
                        "Refresh token was issued to another client",
                    ))
                }
                Some(g) => match g.first_used {
                    Some(t) if now.duration_since(t) > grace => {
                        st.refresh.remove(token);
                        return Err(ApiError::invalid_grant("Refresh token has been rotated"));
                    }
                    Some(_) => g.user_uuid.clone(),
                    None => {
                        g.first_used = Some(now);
                        g.user_uuid.clone()
                    }
                },
            }
        }
        "" => return Err(ApiError::invalid_request("Missing grant_type")),
        _ => {
            return Err(ApiError::OAuth(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "Unsupported grant type",
            ))
        }
    };
    if st.user(&user_uuid).is_none() {
        return Err(ApiError::invalid_grant("The account no longer exists"));
    }
    let (access, refresh, ttl) = st.issue_tokens(&client_id, &user_uuid, now);
    let quirks = st.settings.quirks;
    drop(st);

    let mut body = Map::new();
    body.insert("access_token".into(), access.into());
    let scope_key = if quirks.scope_singular {
        "scope"
    } else {
        "scopes"
    };
    body.insert(scope_key.into(), "account email".into());
    let secs = ttl.as_secs();
    body.insert(
        "expires_in".into(),
        if quirks.expires_in_as_string {
            secs.to_string().into()
        } else {
            secs.into()
        },
    );
    body.insert("refresh_token".into(), refresh.into());
    if !quirks.omit_token_type {
        body.insert("token_type".into(), "bearer".into());
    }
    body.insert("state".into(), grant.into());
    Ok(json_response(StatusCode::OK, &Value::Object(body)))
}
