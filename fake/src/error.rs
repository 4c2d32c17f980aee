//! [`ApiError`]: what a handler answers instead of its resource, in the shape
//! Bitbucket uses on that endpoint.

use std::borrow::Cow;

use super::server::{api_error, html_page, oauth_error};
use super::*;

pub(super) enum ApiError {
    /// API 1.0 and 2.0: the spec's `error`, `{"type":"error","error":{"message":…}}`.
    Api(StatusCode, Cow<'static, str>),
    /// The token endpoint: RFC 6749's `{"error":…,"error_description":…}`.
    OAuth(StatusCode, &'static str, &'static str),
    /// The authorize endpoint, which a browser reads: a small HTML page.
    Page(StatusCode, &'static str),
    /// An injected fault's answer, as [`server::begin`] built it (boxed: a
    /// `Response` is too large to travel in every `Result`).
    Fault(Box<Response>),
}

impl ApiError {
    pub(super) fn api(status: StatusCode, message: impl Into<Cow<'static, str>>) -> ApiError {
        ApiError::Api(status, message.into())
    }

    /// 400 `invalid_grant`: a code or refresh token the token endpoint refuses.
    pub(super) fn invalid_grant(description: &'static str) -> ApiError {
        ApiError::OAuth(StatusCode::BAD_REQUEST, "invalid_grant", description)
    }

    pub(super) fn invalid_request(description: &'static str) -> ApiError {
        ApiError::OAuth(StatusCode::BAD_REQUEST, "invalid_request", description)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Api(status, message) => api_error(status, &message),
            ApiError::OAuth(status, error, description) => oauth_error(status, error, description),
            ApiError::Page(status, message) => html_page(status, message),
            ApiError::Fault(response) => *response,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn answer(e: ApiError) -> (StatusCode, String, String) {
        let resp = e.into_response();
        let status = resp.status();
        let ct = resp.headers()[CONTENT_TYPE].to_str().unwrap().to_owned();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, ct, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn each_kind_answers_with_its_status_and_its_endpoints_error_shape() {
        let (status, ct, body) = answer(ApiError::api(StatusCode::FORBIDDEN, "no")).await;
        assert_eq!(
            (status, ct.as_str()),
            (StatusCode::FORBIDDEN, "application/json; charset=utf-8")
        );
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap(),
            json!({"type": "error", "error": {"message": "no"}})
        );

        let (status, _, body) = answer(ApiError::invalid_grant("used")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap(),
            json!({"error": "invalid_grant", "error_description": "used"})
        );

        let (status, ct, body) =
            answer(ApiError::Page(StatusCode::BAD_REQUEST, "Invalid client_id")).await;
        assert_eq!(
            (status, ct.as_str()),
            (StatusCode::BAD_REQUEST, "text/html; charset=utf-8")
        );
        assert!(body.contains("<p>Invalid client_id</p>"), "{body}");

        let mut fault = Response::new(Body::from("as built"));
        *fault.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        fault
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let (status, ct, body) = answer(ApiError::Fault(Box::new(fault))).await;
        assert_eq!(
            (status, ct.as_str(), body.as_str()),
            (StatusCode::TOO_MANY_REQUESTS, "text/plain", "as built")
        );
    }
}
