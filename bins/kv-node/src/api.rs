//! The data API, `/v1/{key}`: request parsing (key, `w`/`r`, body), then either forwarding to the
//! key's replicas or coordinating the read, write or delete here.

use crate::error::ApiError;
use crate::routes::{request_id, AppState};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use kv_cluster::{
    Consistency, ForwardRequest, ForwardResponse, Precondition, Route, FORWARDED_HEADER,
    VERSION_HEADER,
};
use kv_core::{Entry, Version};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;

/// Room for the `{"value": ...}` envelope around a value of the largest allowed size.
const BODY_ENVELOPE_BYTES: usize = 64 * 1024;
/// Bytes escaped when a key is put back into a path: `/` stays, so keys read naturally in logs.
const KEY_ESCAPES: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'?')
    .add(b'<')
    .add(b'>')
    .add(b'`')
    .add(b'{')
    .add(b'}');
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
pub fn parse_levels(
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

/// The precondition of a write from its `If-Match` / `If-None-Match` headers.
pub fn parse_precondition(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    let text = |name| {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .map(str::trim)
                    .map_err(|_| bad_precondition("is not ASCII"))
            })
            .transpose()
    };
    match (text(header::IF_MATCH)?, text(header::IF_NONE_MATCH)?) {
        (None, None) => Ok(Precondition::Always),
        (Some(_), Some(_)) => Err(bad_precondition(
            "If-Match and If-None-Match cannot be combined",
        )),
        (Some("*"), None) => Ok(Precondition::IfExists),
        (Some(tag), None) => {
            let tag = tag.strip_prefix("W/").unwrap_or(tag);
            let tag = tag
                .strip_prefix('"')
                .and_then(|t| t.strip_suffix('"'))
                .unwrap_or(tag);
            tag.parse::<Version>()
                .map(Precondition::IfMatch)
                .map_err(|_| {
                    bad_precondition("If-Match must be \"<version>\" as sent in ETag, or *")
                })
        }
        (None, Some("*")) => Ok(Precondition::IfAbsent),
        (None, Some(_)) => Err(bad_precondition(
            "If-None-Match takes only * (create if absent)",
        )),
    }
}

/// How far ahead of this node's clock a version a write brings may be: further, and one bad
/// client clock could make a key unwritable for everyone else.
const MAX_VERSION_AHEAD_MS: u64 = 60_000;

/// The version a write brings in `x-kv-version`, checked against this machine's clock.
pub fn parse_supplied_version(headers: &HeaderMap) -> Result<Option<Version>, ApiError> {
    let Some(raw) = headers.get(VERSION_HEADER) else {
        return Ok(None);
    };
    let bad =
        |why: &str| ApiError::bad_request("invalid_version", format!("{VERSION_HEADER}: {why}"));
    let version: Version = raw
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| bad("expected a version as sent in ETag"))?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    if version.physical_ms() > now_ms.saturating_add(MAX_VERSION_AHEAD_MS) {
        return Err(bad(
            "the version is more than 60 s ahead of this node's clock",
        ));
    }
    Ok(Some(version))
}

fn bad_precondition(why: &str) -> ApiError {
    ApiError::bad_request(
        "invalid_precondition",
        format!("bad precondition header: {why}"),
    )
}

/// One operation on one key, parsed and checked: what a `/v1` request or a batch entry asks.
#[derive(Debug, Clone)]
pub struct KeyOp {
    /// What to do.
    pub kind: OpKind,
    /// The key, decoded.
    pub key: String,
    /// W.
    pub w: Consistency,
    /// R.
    pub r: Consistency,
    /// Condition of a write or delete.
    pub precondition: Precondition,
    /// The version a write carries itself (`x-kv-version`), making a retry of it idempotent.
    pub version: Option<Version>,
}

/// The kinds of key operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    /// Read the newest value.
    Get,
    /// Write this value (its exact JSON bytes).
    Put(Bytes),
    /// Delete the key.
    Delete,
}

/// What a successful operation produced.
#[derive(Debug)]
pub enum Outcome {
    /// The key's value and version (after a read or a write).
    Value {
        key: String,
        value: Bytes,
        version: Version,
    },
    /// The key was deleted.
    Deleted { key: String },
    /// Another node coordinated it; its answer, unchanged.
    Forwarded(ForwardResponse),
}

impl IntoResponse for Outcome {
    fn into_response(self) -> Response {
        match self {
            Outcome::Value {
                key,
                value,
                version,
            } => value_response(&key, &value, version),
            Outcome::Deleted { key } => {
                axum::Json(serde_json::json!({"key": key, "deleted": true})).into_response()
            }
            Outcome::Forwarded(answer) => {
                let mut response = (answer.status, answer.body).into_response();
                copy_headers(&answer.headers, response.headers_mut());
                response
            }
        }
    }
}

/// Runs one operation: forwarded to the key's replicas, or coordinated here.
pub async fn execute(
    app: &AppState,
    op: KeyOp,
    auth: Option<&HeaderValue>,
    request_id: &str,
    forwarded: bool,
) -> Result<Outcome, ApiError> {
    let cluster = app.cluster();
    let conditional = op.precondition != Precondition::Always;
    match cluster.route(&op.key, forwarded, conditional) {
        Route::Forward(targets) => {
            let idempotent = op.kind == OpKind::Get;
            let request = forward_request(&op, auth);
            let answer = cluster
                .forward(&targets, &request, request_id, idempotent)
                .await?;
            Ok(Outcome::Forwarded(answer))
        }
        Route::Local => match op.kind {
            OpKind::Get => match cluster.read(&op.key, op.r, request_id).await? {
                Some(Entry {
                    value: Some(value),
                    version,
                }) => Ok(Outcome::Value {
                    key: op.key,
                    value,
                    version,
                }),
                _ => Err(not_found(&op.key)),
            },
            OpKind::Put(value) => {
                let version = cluster
                    .write_if(
                        &op.key,
                        Some(value.clone()),
                        op.version,
                        op.precondition,
                        op.w,
                        op.r,
                        request_id,
                    )
                    .await?;
                match version {
                    Some(version) => Ok(Outcome::Value {
                        key: op.key,
                        value,
                        version,
                    }),
                    None => Err(not_found(&op.key)),
                }
            }
            OpKind::Delete => match cluster
                .write_if(
                    &op.key,
                    None,
                    op.version,
                    op.precondition,
                    op.w,
                    op.r,
                    request_id,
                )
                .await?
            {
                Some(_) => Ok(Outcome::Deleted { key: op.key }),
                None => Err(not_found(&op.key)),
            },
        },
    }
}

/// The `/v1` request another node needs to run `op` as this one would.
fn forward_request(op: &KeyOp, auth: Option<&HeaderValue>) -> ForwardRequest {
    let key = utf8_percent_encode(&op.key, KEY_ESCAPES);
    let (method, body) = match &op.kind {
        OpKind::Get => (Method::GET, Bytes::new()),
        OpKind::Delete => (Method::DELETE, Bytes::new()),
        OpKind::Put(value) => {
            let mut body = Vec::with_capacity(value.len() + 12);
            body.extend_from_slice(b"{\"value\":");
            body.extend_from_slice(value);
            body.push(b'}');
            (Method::PUT, Bytes::from(body))
        }
    };
    let mut headers = HeaderMap::new();
    if let Some(auth) = auth {
        headers.insert(header::AUTHORIZATION, auth.clone());
    }
    let precondition = match op.precondition {
        Precondition::Always => None,
        Precondition::IfMatch(v) => Some((header::IF_MATCH, format!("\"{v}\""))),
        Precondition::IfExists => Some((header::IF_MATCH, "*".to_owned())),
        Precondition::IfAbsent => Some((header::IF_NONE_MATCH, "*".to_owned())),
    };
    if let Some((name, value)) = precondition {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    if let Some(version) = op.version {
        if let Ok(value) = HeaderValue::from_str(&version.to_string()) {
            headers.insert(VERSION_HEADER, value);
        }
    }
    ForwardRequest {
        method,
        path_and_query: format!("/v1/{key}?w={}&r={}", op.w, op.r),
        headers,
        body,
    }
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

/// `GET|HEAD|POST|PUT|DELETE /v1/{key}`.
pub async fn data(State(app): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let config = app.config();
    let kind = match parts.method {
        Method::GET | Method::HEAD => OpKind::Get,
        Method::DELETE => OpKind::Delete,
        Method::POST | Method::PUT => {
            let body = read_body(body, config.max_value_bytes).await?;
            OpKind::Put(parse_write_body(&body, config.max_value_bytes)?)
        }
        ref other => {
            return Err(ApiError::MethodNotAllowed {
                method: other.to_string(),
                allow: ALLOWED,
            })
        }
    };
    let key = parse_key(parts.uri.path(), "/v1/", config.max_key_bytes)?;
    let cluster = app.cluster();
    let (w, r) = parse_levels(
        parts.uri.query(),
        cluster.default_consistency(),
        cluster.replication_factor(),
    )?;
    let (precondition, version) = if kind == OpKind::Get {
        (Precondition::Always, None)
    } else {
        (
            parse_precondition(&parts.headers)?,
            parse_supplied_version(&parts.headers)?,
        )
    };
    if precondition != Precondition::Always && version.is_some() {
        return Err(ApiError::bad_request(
            "invalid_version",
            format!("{VERSION_HEADER} cannot be combined with If-Match or If-None-Match"),
        ));
    }
    let op = KeyOp {
        kind,
        key,
        w,
        r,
        precondition,
        version,
    };
    let rid = request_id(&parts.headers);
    let forwarded = parts.headers.contains_key(FORWARDED_HEADER);
    let auth = parts.headers.get(header::AUTHORIZATION);
    let work = execute(&app, op, auth, &rid, forwarded);
    match tokio::time::timeout(config.request_timeout, work).await {
        Ok(result) => result.map(IntoResponse::into_response),
        Err(_) => Err(ApiError::Timeout(
            u64::try_from(config.request_timeout.as_millis()).unwrap_or(u64::MAX),
        )),
    }
}

/// Reads the whole body, refusing more than a maximal value plus its JSON envelope.
pub async fn read_body(body: Body, max_value: usize) -> Result<Bytes, ApiError> {
    let limit = max_value.saturating_add(BODY_ENVELOPE_BYTES);
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge {
            what: "request body",
            limit,
        })
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
