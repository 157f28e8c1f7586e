//! The data API, `/v1/{key}`: request parsing (key, `w`/`r`, body), then either forwarding to the
//! key's replicas or coordinating the read, write or delete here.

use crate::error::ApiError;
use crate::routes::{request_id, AppState};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use kv_cluster::{Consistency, ForwardRequest, Route, FORWARDED_HEADER};
use kv_core::Version;
use percent_encoding::percent_decode_str;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;

/// Room for the `{"value": ...}` envelope around a value of the largest allowed size.
const BODY_ENVELOPE_BYTES: usize = 64 * 1024;
/// Methods `/v1/{key}` takes, for `405` answers.
const ALLOWED: &str = "GET, HEAD, POST, PUT, DELETE";

/// Extracts the key from a `/v1/...` or `/internal/entry/...` path: everything after `prefix`,
/// percent-decoded, 1 to `max` bytes of UTF-8.
pub fn parse_key(path: &str, prefix: &str, max: usize) -> Result<String, ApiError> {
    let raw = path.strip_prefix(prefix).unwrap_or_default();
    let key = percent_decode_str(raw).decode_utf8().map_err(|_| {
        ApiError::bad_request(
            "invalid_key",
            "the key is not valid UTF-8 once percent-decoded",
        )
    })?;
    if key.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_key",
            "the key is empty; use /v1/<key>",
        ));
    }
    if key.len() > max {
        return Err(ApiError::bad_request(
            "invalid_key",
            format!("the key is {} bytes long; the limit is {max}", key.len()),
        ));
    }
    Ok(key.into_owned())
}

/// The consistency levels of one request: query `w` / `r`, or the node's defaults.
fn parse_levels(
    query: Option<&str>,
    defaults: (Consistency, Consistency),
    n: usize,
) -> Result<(Consistency, Consistency), ApiError> {
    let (mut w, mut r) = defaults;
    for (name, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "w" => w = Consistency::parse("w", &value, n)?,
            "r" => r = Consistency::parse("r", &value, n)?,
            _ => {}
        }
    }
    Ok((w, r))
}

/// The body of a write: a JSON object with a `value` member holding any JSON value, kept as the
/// exact bytes the client sent. Other members are ignored.
struct WriteBody<'a> {
    value: &'a RawValue,
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for WriteBody<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BodyVisitor;
        impl<'de> Visitor<'de> for BodyVisitor {
            type Value = WriteBody<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(r#"a JSON object like {"value": ...}"#)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut value = None;
                while let Some(name) = map.next_key::<Cow<'de, str>>()? {
                    if name == "value" {
                        value = Some(map.next_value::<&'de RawValue>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                value
                    .map(|value| WriteBody { value })
                    .ok_or_else(|| de::Error::missing_field("value"))
            }
        }
        deserializer.deserialize_map(BodyVisitor)
    }
}

/// Parses a write body; the returned bytes are the value exactly as sent.
pub fn parse_write_body(body: &[u8], max_value: usize) -> Result<Bytes, ApiError> {
    let parsed: WriteBody<'_> = serde_json::from_slice(body).map_err(|e| {
        if e.to_string().starts_with("missing field `value`") {
            ApiError::bad_request(
                "missing_value",
                r#"the body needs a "value" member: {"value": ...}"#,
            )
        } else {
            ApiError::bad_request(
                "invalid_json",
                format!(r#"the body is not a JSON object like {{"value": ...}}: {e}"#),
            )
        }
    })?;
    let value = parsed.value.get();
    if value.len() > max_value {
        return Err(ApiError::PayloadTooLarge {
            what: "value",
            limit: max_value,
        });
    }
    Ok(Bytes::copy_from_slice(value.as_bytes()))
}

/// `{"key": K, "value": V, "version": "..."}` with `ETag`, the value written as stored.
fn value_response(key: &str, value: &[u8], version: Version) -> Response {
    let version = version.to_string();
    let key_json = serde_json::to_string(key).unwrap_or_else(|_| "\"\"".to_owned());
    let mut body = Vec::with_capacity(key_json.len() + value.len() + version.len() + 40);
    body.extend_from_slice(b"{\"key\":");
    body.extend_from_slice(key_json.as_bytes());
    body.extend_from_slice(b",\"value\":");
    body.extend_from_slice(value);
    body.extend_from_slice(b",\"version\":\"");
    body.extend_from_slice(version.as_bytes());
    body.extend_from_slice(b"\"}");
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{version}\"")) {
        headers.insert(header::ETAG, etag);
    }
    response
}

fn not_found(key: &str) -> ApiError {
    ApiError::NotFound(format!("key {key:?} does not exist"))
}

/// `/v1` without a key.
pub async fn no_key() -> ApiError {
    ApiError::bad_request("invalid_key", "the key is empty; use /v1/<key>")
}

/// `GET|HEAD|POST|PUT|DELETE /v1/{key}`.
pub async fn data(State(app): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let method = parts.method.clone();
    if !matches!(
        method,
        Method::GET | Method::HEAD | Method::POST | Method::PUT | Method::DELETE
    ) {
        return Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            allow: ALLOWED,
        });
    }
    let config = app.config();
    let key = parse_key(parts.uri.path(), "/v1/", config.max_key_bytes)?;
    let cluster = app.cluster();
    let (w, r) = parse_levels(
        parts.uri.query(),
        cluster.default_consistency(),
        cluster.replication_factor(),
    )?;
    let is_write = matches!(method, Method::POST | Method::PUT);
    let body = read_body(body, config.max_value_bytes).await?;
    let value = if is_write {
        Some(parse_write_body(&body, config.max_value_bytes)?)
    } else {
        None
    };
    let rid = request_id(&parts.headers);
    let work = async {
        match cluster.route(&key, parts.headers.contains_key(FORWARDED_HEADER)) {
            Route::Forward(targets) => {
                let request = ForwardRequest {
                    method: method.clone(),
                    path_and_query: parts
                        .uri
                        .path_and_query()
                        .map_or("/", |p| p.as_str())
                        .to_owned(),
                    headers: forwardable_headers(&parts.headers),
                    body,
                };
                let idempotent = matches!(method, Method::GET | Method::HEAD);
                let answer = cluster
                    .forward(&targets, &request, &rid, idempotent)
                    .await?;
                let mut response = (answer.status, answer.body).into_response();
                copy_headers(&answer.headers, response.headers_mut());
                Ok(response)
            }
            Route::Local => match (method.clone(), value) {
                (Method::POST | Method::PUT, Some(value)) => {
                    let version = cluster.write(&key, Some(value.clone()), w, &rid).await?;
                    Ok(value_response(&key, &value, version))
                }
                (Method::DELETE, _) => match cluster.delete(&key, w, r, &rid).await? {
                    Some(_) => Ok(axum::Json(serde_json::json!({"key": key, "deleted": true}))
                        .into_response()),
                    None => Err(not_found(&key)),
                },
                _ => match cluster.read(&key, r, &rid).await? {
                    Some(entry) => match entry.value {
                        Some(value) => Ok(value_response(&key, &value, entry.version)),
                        None => Err(not_found(&key)),
                    },
                    None => Err(not_found(&key)),
                },
            },
        }
    };
    match tokio::time::timeout(config.request_timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::Timeout(
            u64::try_from(config.request_timeout.as_millis()).unwrap_or(u64::MAX),
        )),
    }
}

/// Reads the whole body, refusing more than a maximal value plus its JSON envelope.
async fn read_body(body: Body, max_value: usize) -> Result<Bytes, ApiError> {
    let limit = max_value.saturating_add(BODY_ENVELOPE_BYTES);
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge {
            what: "request body",
            limit,
        })
}

/// Headers a forwarded request keeps: authorization, content type and preconditions.
fn forwardable_headers(from: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for name in [
        header::AUTHORIZATION,
        header::CONTENT_TYPE,
        header::IF_MATCH,
        header::IF_NONE_MATCH,
    ] {
        if let Some(value) = from.get(&name) {
            headers.insert(name, value.clone());
        }
    }
    headers
}

/// Copies the owner's answer headers that describe the body.
fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for name in [header::CONTENT_TYPE, header::ETAG, header::ALLOW] {
        if let Some(value) = from.get(&name) {
            to.insert(name, value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_percent_decoded_and_checked() {
        assert_eq!(
            parse_key("/v1/users/42/name", "/v1/", 100).unwrap(),
            "users/42/name"
        );
        assert_eq!(parse_key("/v1/a%20b%2Fc", "/v1/", 100).unwrap(), "a b/c");
        assert_eq!(parse_key("/v1/%C3%BC", "/v1/", 100).unwrap(), "ü");
        assert!(parse_key("/v1/", "/v1/", 100).is_err());
        assert!(parse_key("/v1/%FF", "/v1/", 100).is_err());
        assert!(parse_key("/v1/abcd", "/v1/", 3).is_err());
    }

    #[test]
    fn write_bodies_keep_the_value_bytes_exactly() {
        let v = parse_write_body(br#"{"value": {"a" : 1.50, "b": [1,2]}, "x": 1}"#, 100).unwrap();
        assert_eq!(&v[..], br#"{"a" : 1.50, "b": [1,2]}"#);
        assert_eq!(
            &parse_write_body(br#"{"value":null}"#, 100).unwrap()[..],
            b"null"
        );
        assert_eq!(
            &parse_write_body(br#"{"value":"hello"}"#, 100).unwrap()[..],
            b"\"hello\""
        );
    }

    #[test]
    fn bad_bodies_get_the_right_code() {
        let code = |body: &[u8]| match parse_write_body(body, 10) {
            Err(ApiError::BadRequest { code, .. }) => code,
            Err(ApiError::PayloadTooLarge { .. }) => "too_large",
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(code(b"{"), "invalid_json");
        assert_eq!(code(b"[1]"), "invalid_json");
        assert_eq!(code(b"\"value\""), "invalid_json");
        assert_eq!(code(b""), "invalid_json");
        assert_eq!(code(br#"{"valu": 1}"#), "missing_value");
        assert_eq!(code(br#"{}"#), "missing_value");
        assert_eq!(code(br#"{"value": "0123456789"}"#), "too_large");
    }

    #[test]
    fn levels_come_from_the_query_or_the_defaults() {
        let d = (Consistency::Quorum, Consistency::One);
        assert_eq!(parse_levels(None, d, 3).unwrap(), d);
        assert_eq!(
            parse_levels(Some("w=all&r=2"), d, 3).unwrap(),
            (Consistency::All, Consistency::Count(2))
        );
        assert!(parse_levels(Some("w=4"), d, 3).is_err());
        assert!(parse_levels(Some("r=most"), d, 3).is_err());
    }
}
