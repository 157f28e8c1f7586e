//! Every error the load balancer answers itself, and the one mapping of them to HTTP:
//! a status plus the body `{"error": "<code>", "message": "<one sentence>"}`.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// An error answered by the load balancer (a node's own error responses pass through untouched).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No route matches the path.
    #[error("no route for {method} {path}")]
    NotFound {
        /// Method of the request.
        method: String,
        /// Path of the request.
        path: String,
    },
    /// The route exists but not for this method.
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed {
        /// Method of the request.
        method: String,
        /// Path of the request.
        path: String,
    },
    /// `AUTH_TOKEN` is set and the request lacks the right bearer token.
    #[error("a valid 'Authorization: Bearer <token>' header is required")]
    Unauthorized,
    /// The key is not valid UTF-8 once percent-decoded (the nodes' `invalid_key`).
    #[error("{0}")]
    InvalidKey(String),
    /// The request could not be understood.
    #[error("{0}")]
    BadRequest(String),
    /// The request body is larger than the configured cap.
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge {
        /// The cap, in bytes.
        limit: usize,
    },
    /// The client did not send its body before the request deadline.
    #[error("the request body did not arrive within {} ms", .0.as_millis())]
    BodyTimeout(Duration),
    /// No replica could answer.
    #[error("none of the {tried} node(s) tried could answer: {reason}")]
    Unavailable {
        /// How many nodes were tried.
        tried: usize,
        /// Why the last one failed.
        reason: String,
    },
    /// The request deadline passed before a node answered.
    #[error("no node answered within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// A node failed after the request was sent; a write may have been applied, so it is not retried.
    #[error("node {node} failed after the request was sent ({reason}); it was not retried because it may have been applied")]
    BadGateway {
        /// The node that failed.
        node: String,
        /// What went wrong.
        reason: String,
    },
    /// A bug or an impossible state; the detail is logged, not sent.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// HTTP status and stable error code of this error.
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::InvalidKey(_) => (StatusCode::BAD_REQUEST, "invalid_key"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            ApiError::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            ApiError::BadGateway { .. } => (StatusCode::BAD_GATEWAY, "bad_gateway"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
        }
        let (status, code) = self.status_and_code();
        let mut response = kv_http::error_response(status, code, &self.to_string());
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_of(error: ApiError) -> (StatusCode, serde_json::Value) {
        let response = error.into_response();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn errors_are_json_with_code_and_message() {
        let (status, body) = body_of(ApiError::Unavailable {
            tried: 3,
            reason: "connection refused".into(),
        })
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["error"], "unavailable");
        assert_eq!(
            body["message"],
            "none of the 3 node(s) tried could answer: connection refused"
        );
    }

    #[tokio::test]
    async fn internal_details_stay_in_the_log() {
        let (status, body) = body_of(ApiError::Internal("secret detail".into())).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["message"], "internal error");
    }
}
