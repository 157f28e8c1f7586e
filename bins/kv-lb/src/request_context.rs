//! Per-request context: the `X-Request-Id` (kept from the client or generated, passed on to the
//! node and returned), a tracing span carrying it, and the request metrics.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::{debug, info_span, Instrument};

use crate::metrics;

/// The request-id header, read from clients and sent to nodes.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Longest client-supplied id kept; longer ones are replaced by a generated id.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Middleware around every route: id, span, metrics.
pub async fn track(mut request: Request, next: Next) -> Response {
    let id = request_id(request.headers());
    request.headers_mut().insert(X_REQUEST_ID, id.clone());
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let span = info_span!(
        "request",
        request_id = id.to_str().unwrap_or_default(),
        %method,
        %route,
    );
    let started = Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    response.headers_mut().insert(X_REQUEST_ID, id);
    metrics::request_done(&route, method.as_str(), status, elapsed);
    kv_http::dashboard::record_request(method.as_str(), &route, status, elapsed);
    span.in_scope(|| {
        debug!(
            status,
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            "answered"
        )
    });
    response
}

/// The client's id when it is a short printable token, else a new random 128-bit hex id.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    let supplied = headers.get(&X_REQUEST_ID).filter(|value| {
        let bytes = value.as_bytes();
        (1..=MAX_REQUEST_ID_LEN).contains(&bytes.len()) && bytes.iter().all(u8::is_ascii_graphic)
    });
    match supplied {
        Some(value) => value.clone(),
        None => generated_id(),
    }
}

fn generated_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    let mut bits = rand::random::<u128>();
    for digit in id.iter_mut().rev() {
        *digit = HEX[(bits & 0xf) as usize];
        bits >>= 4;
    }
    HeaderValue::from_bytes(&id).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers_with(id: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(X_REQUEST_ID, HeaderValue::from_str(id).unwrap());
        headers
    }

    #[test]
    fn client_id_is_kept() {
        assert_eq!(request_id(&headers_with("abc-123")), "abc-123");
    }

    #[test]
    fn missing_or_unfit_id_is_generated() {
        for headers in [
            HeaderMap::new(),
            headers_with(""),
            headers_with("has space"),
            headers_with(&"x".repeat(MAX_REQUEST_ID_LEN + 1)),
        ] {
            let id = request_id(&headers);
            assert_eq!(id.len(), 32);
            assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit));
        }
        assert_ne!(request_id(&HeaderMap::new()), request_id(&HeaderMap::new()));
    }
}
