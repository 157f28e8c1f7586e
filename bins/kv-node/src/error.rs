//! The one place where errors become HTTP answers: status code plus the JSON body
//! `{"error": "<code>", "message": "<one human sentence>"}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tracing::error;

/// Every way a request can fail, as the client sees it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; `code` is the machine-readable reason.
    #[error("{message}")]
    BadRequest {
        /// `invalid_json`, `missing_value`, `invalid_key`, `invalid_consistency`, ...
        code: &'static str,
        /// What was wrong.
        message: String,
    },
    /// Missing or wrong bearer token, or missing cluster secret on `/internal`.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// No such key or route.
    #[error("{0}")]
    NotFound(String),
    /// The route exists but not for this method.
    #[error("method {method} is not allowed here; use {allow}")]
    MethodNotAllowed {
        /// The method the client used.
        method: String,
        /// The methods the route takes, for the `Allow` header.
        allow: &'static str,
    },
    /// The body or value is larger than allowed.
    #[error("{what} is larger than the limit of {limit} bytes")]
    PayloadTooLarge {
        /// "value" or "request body".
        what: &'static str,
        /// The limit in bytes.
        limit: usize,
    },
    /// The request did not finish within its deadline.
    #[error("the request did not finish within {0} ms")]
    Timeout(u64),
    /// A failure inside this node that the client cannot fix; the details go to the log.
    #[error("{0}")]
    Internal(String),
    /// A cluster-level failure (quorum, forwarding, storage).
    #[error(transparent)]
    Cluster(#[from] kv_cluster::Error),
}

impl From<kv_core::Error> for ApiError {
    fn from(e: kv_core::Error) -> Self {
        ApiError::Cluster(kv_cluster::Error::Store(e))
    }
}

impl ApiError {
    /// A 400 with a machine-readable code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// The status code and the JSON body this error answers with.
    pub fn status_and_body(&self) -> (StatusCode, serde_json::Value) {
        let (status, code) = self.status_and_code();
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            // Details of internal failures go to the log, not to the client.
            error!(error = %self, "internal error");
            "internal error; the node's log has the details".to_owned()
        } else {
            self.to_string()
        };
        let mut body = kv_http::error_body(code, &message);
        match self {
            ApiError::Cluster(kv_cluster::Error::PreconditionFailed { current }) => {
                body["current_version"] = json!(current.map(|v| v.to_string()));
            }
            ApiError::Cluster(kv_cluster::Error::Superseded { newest, .. }) => {
                body["current_version"] = json!(newest.to_string());
            }
            _ => {}
        }
        (status, body)
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        use kv_cluster::Error as C;
        match self {
            ApiError::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            ApiError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            ApiError::Timeout(_) | ApiError::Cluster(C::Timeout { .. }) => {
                (StatusCode::GATEWAY_TIMEOUT, "timeout")
            }
            ApiError::Cluster(C::PreconditionFailed { .. }) => {
                (StatusCode::PRECONDITION_FAILED, "precondition_failed")
            }
            ApiError::Cluster(C::BadPlan { .. }) => (StatusCode::BAD_REQUEST, "invalid_plan"),
            ApiError::Cluster(C::ChangeInProgress { .. }) => {
                (StatusCode::BAD_REQUEST, "change_in_progress")
            }
            ApiError::Cluster(C::MalformedView { .. }) => (StatusCode::BAD_REQUEST, "view_refused"),
            ApiError::Cluster(C::ViewRefused { .. } | C::ViewNeedsMajority { .. }) => {
                (StatusCode::CONFLICT, "view_refused")
            }
            ApiError::Cluster(C::BadConsistency { .. }) => {
                (StatusCode::BAD_REQUEST, "invalid_consistency")
            }
            ApiError::Cluster(
                C::Unavailable { .. }
                | C::TooFewReplicasUp { .. }
                | C::NoReplicaReachable { .. }
                | C::PeerProtocol { .. },
            ) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Cluster(C::Superseded { .. }) => (StatusCode::CONFLICT, "version_conflict"),
            ApiError::Cluster(C::ClockOffset { .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, "clock_offset")
            }
            ApiError::Cluster(C::OutcomeUnknown { .. }) => {
                (StatusCode::GATEWAY_TIMEOUT, "outcome_unknown")
            }
            ApiError::Cluster(C::Store(
                kv_core::Error::WalFailed { .. } | kv_core::Error::Closed,
            )) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Cluster(C::Store(kv_core::Error::DiskFull { .. })) => {
                (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
            }
            ApiError::Internal(_) | ApiError::Cluster(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = self.status_and_body();
        let mut response = (status, axum::Json(body)).into_response();
        match self {
            ApiError::MethodNotAllowed { allow, .. } => {
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            // Write answers say how many durable copies were confirmed, failures included.
            ApiError::Cluster(kv_cluster::Error::OutcomeUnknown { acked, .. }) => {
                response
                    .headers_mut()
                    .insert(crate::api::ACKS_HEADER, HeaderValue::from(acked));
            }
            ApiError::Cluster(
                kv_cluster::Error::TooFewReplicasUp { .. } | kv_cluster::Error::Superseded { .. },
            ) => {
                response
                    .headers_mut()
                    .insert(crate::api::ACKS_HEADER, HeaderValue::from(0));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_failures_are_503_with_both_numbers() {
        let err = ApiError::from(kv_cluster::Error::Unavailable {
            needed: 2,
            answered: 1,
        });
        assert_eq!(
            err.status_and_code(),
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        );
        assert_eq!(err.to_string(), "1 of 2 required replicas answered in time");
    }

    #[test]
    fn a_skewed_clock_is_503_clock_offset_with_the_offset_and_limit() {
        let err = ApiError::from(kv_cluster::Error::ClockOffset {
            offset_ms: -30_012,
            max_ms: 500,
            agreeing: 1,
            judged: 3,
        });
        let (status, body) = err.status_and_body();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["error"], "clock_offset");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains("-30012 ms"), "{message}");
        assert!(message.contains("MAX_CLOCK_OFFSET_MS=500"), "{message}");
    }

    #[test]
    fn failed_wal_refuses_writes_with_503() {
        let err = ApiError::from(kv_core::Error::WalFailed {
            reason: "fsync: EIO".into(),
        });
        assert_eq!(err.status_and_code().0, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn a_full_disk_refuses_writes_with_507_and_says_why() {
        let err = ApiError::from(kv_core::Error::DiskFull {
            path: "/data".into(),
            free_bytes: 1024,
            reserve_bytes: 67_108_864,
        });
        let (status, body) = err.status_and_body();
        assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE);
        assert_eq!(body["error"], "insufficient_storage");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains("/data") && message.contains("read-only"),
            "{message}"
        );
    }
}
