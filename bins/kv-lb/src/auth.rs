//! Bearer-token check of data routes when `AUTH_TOKEN` is set (`kv_http::bearer_matches`: the
//! scheme in any case, the token compared in constant time).
//! The `Authorization` header is passed on to the node, which checks it too.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::app::SharedState;
use crate::error::ApiError;

/// Middleware: 401 unless the request carries `Authorization: Bearer <AUTH_TOKEN>`.
pub async fn require_token(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(token) = &state.auth_token {
        if !kv_http::bearer_matches(request.headers(), token) {
            return Err(ApiError::Unauthorized);
        }
    }
    Ok(next.run(request).await)
}
