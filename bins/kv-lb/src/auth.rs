//! Bearer-token check of data routes when `AUTH_TOKEN` is set, compared in constant time.
//! The `Authorization` header is passed on to the node, which checks it too.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use crate::app::SharedState;
use crate::error::ApiError;

/// Middleware: 401 unless the request carries `Authorization: Bearer <AUTH_TOKEN>`.
pub async fn require_token(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(token) = &state.auth_token {
        if !bearer_matches(request.headers(), token) {
            return Err(ApiError::Unauthorized);
        }
    }
    Ok(next.run(request).await)
}

/// True when the `Authorization` header is `Bearer <token>` (scheme case-insensitive). The
/// comparison of the token itself takes the same time wherever the first difference is.
fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    let Some((scheme, presented)) = value.as_bytes().split_first_chunk::<7>() else {
        return false;
    };
    scheme.eq_ignore_ascii_case(b"bearer ") && bool::from(presented.ct_eq(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_auth(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn right_token_passes() {
        assert!(bearer_matches(&with_auth("Bearer s3cret"), "s3cret"));
        assert!(bearer_matches(&with_auth("bearer s3cret"), "s3cret"));
    }

    #[test]
    fn wrong_or_missing_token_fails() {
        assert!(!bearer_matches(&HeaderMap::new(), "s3cret"));
        assert!(!bearer_matches(&with_auth("Bearer s3cre"), "s3cret"));
        assert!(!bearer_matches(&with_auth("Bearer s3cret2"), "s3cret"));
        assert!(!bearer_matches(&with_auth("Basic s3cret"), "s3cret"));
        assert!(!bearer_matches(&with_auth("Bearer"), "s3cret"));
        assert!(!bearer_matches(&with_auth("s3cret"), "s3cret"));
    }
}
