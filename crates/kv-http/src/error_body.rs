//! The JSON body of every error kv answers: `{"error": "<code>", "message": "<one sentence>"}`.
//! Each binary keeps its own `impl IntoResponse` (which picks status and code) and calls this.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// The body `{"error": code, "message": message}`.
pub fn error_body(code: &str, message: &str) -> Value {
    json!({ "error": code, "message": message })
}

/// A response with `status` and the JSON error body (`Content-Type: application/json`).
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    (status, axum::Json(error_body(code, message))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn the_body_is_json_with_code_and_message() {
        let response = error_response(StatusCode::NOT_FOUND, "not_found", "no key 'a'");
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            response.headers()[axum::http::header::CONTENT_TYPE],
            "application/json"
        );
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body, json!({"error": "not_found", "message": "no key 'a'"}));
    }
}
