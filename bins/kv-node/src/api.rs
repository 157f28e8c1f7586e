//! The data API, `/v1/{key}`: one key operation, parsed by `request.rs`, then either forwarded
//! to the key's replicas or coordinated here through the cluster layer.

use crate::error::ApiError;
use crate::request::{
    parse_key, parse_precondition, parse_query, parse_supplied_version, parse_write_body,
    parse_write_id, read_body,
};
use crate::routes::{is_peer_call, request_id, AppState};
use crate::watch;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use kv_cluster::{
    now_ms, Consistency, ForwardRequest, ForwardResponse, Precondition, Resend, Route, Write,
    WriteId, FORWARDED_HEADER, RESEND_AGE_HEADER, RESEND_HEADER, VERSION_HEADER, WRITE_ID_HEADER,
};
use kv_core::Version;
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};

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
/// Header of every write answer: how many durable copies were confirmed.
pub const ACKS_HEADER: &str = "x-kv-acks";
/// Methods `/v1/{key}` takes, for `405` answers.
const ALLOWED: &str = "GET, HEAD, POST, PUT, DELETE";

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
    /// The id of a plain write (`x-kv-write-id`), remembered by the replicas that store it.
    pub write_id: Option<WriteId>,
    /// The write was sent before and may be applied (`x-kv-resend`), and how long ago.
    pub resend: Option<Resend>,
}

/// The kinds of key operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    /// Read the newest value.
    Get,
    /// Write this value (its exact JSON bytes), expiring after `ttl_secs` if given.
    Put {
        /// The value's JSON bytes.
        value: Bytes,
        /// Time to live in seconds.
        ttl_secs: Option<u64>,
    },
    /// Delete the key.
    Delete,
}

/// What a successful operation produced.
#[derive(Debug)]
pub enum Outcome {
    /// The key's value and version (after a read or a write), and its expiry if it has one.
    Value {
        /// The key.
        key: String,
        /// The value's JSON bytes.
        value: Bytes,
        /// Its version.
        version: Version,
        /// When it expires, in Unix milliseconds.
        expires_at_ms: Option<u64>,
        /// For a write: the durable copies confirmed (`X-KV-Acks`).
        acks: Option<usize>,
    },
    /// The key was deleted.
    Deleted {
        /// The key.
        key: String,
        /// Durable copies of the tombstone confirmed (`X-KV-Acks`).
        acks: usize,
    },
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
                expires_at_ms,
                acks,
            } => {
                let mut response = value_response(&key, &value, version, expires_at_ms);
                if let Some(acks) = acks {
                    response
                        .headers_mut()
                        .insert(ACKS_HEADER, HeaderValue::from(acks));
                }
                response
            }
            Outcome::Deleted { key, acks } => {
                let mut response =
                    axum::Json(serde_json::json!({"key": key, "deleted": true})).into_response();
                response
                    .headers_mut()
                    .insert(ACKS_HEADER, HeaderValue::from(acks));
                response
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
        Route::Local => coordinate(app, op, request_id).await,
    }
}

/// Runs one operation with this node as its coordinator.
async fn coordinate(app: &AppState, op: KeyOp, request_id: &str) -> Result<Outcome, ApiError> {
    let cluster = app.cluster();
    let levels = (op.w, op.r);
    match op.kind {
        OpKind::Get => match cluster.read(&op.key, op.r, request_id).await? {
            Some(entry) if entry.is_live_at(now_ms()) => Ok(Outcome::Value {
                key: op.key,
                value: entry.value.unwrap_or_default(),
                version: entry.version,
                expires_at_ms: entry.expires_at_ms,
                acks: None,
            }),
            _ => Err(not_found(&op.key)),
        },
        OpKind::Put { value, ttl_secs } => {
            let expires_at_ms =
                ttl_secs.map(|secs| now_ms().saturating_add(secs.saturating_mul(1000)));
            let write = Write {
                value: Some(value.clone()),
                expires_at_ms,
                version: op.version,
                id: op.write_id,
                resend: op.resend,
            };
            match cluster
                .write_if(&op.key, write, op.precondition, levels, request_id)
                .await?
            {
                Some(written) => Ok(Outcome::Value {
                    key: op.key,
                    value,
                    version: written.version,
                    expires_at_ms,
                    acks: Some(written.acks),
                }),
                None => Err(not_found(&op.key)),
            }
        }
        OpKind::Delete => {
            let write = Write {
                value: None,
                expires_at_ms: None,
                version: op.version,
                id: op.write_id,
                resend: op.resend,
            };
            match cluster
                .write_if(&op.key, write, op.precondition, levels, request_id)
                .await?
            {
                Some(written) => Ok(Outcome::Deleted {
                    key: op.key,
                    acks: written.acks,
                }),
                None => Err(not_found(&op.key)),
            }
        }
    }
}

/// The `/v1` request another node needs to run `op` as this one would.
fn forward_request(op: &KeyOp, auth: Option<&HeaderValue>) -> ForwardRequest {
    let key = utf8_percent_encode(&op.key, KEY_ESCAPES);
    let (method, body) = match &op.kind {
        OpKind::Get => (Method::GET, Bytes::new()),
        OpKind::Delete => (Method::DELETE, Bytes::new()),
        OpKind::Put { value, ttl_secs } => {
            let mut body = Vec::with_capacity(value.len() + 32);
            body.extend_from_slice(b"{\"value\":");
            body.extend_from_slice(value);
            if let Some(ttl) = ttl_secs {
                body.extend_from_slice(format!(",\"ttl_secs\":{ttl}").as_bytes());
            }
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
    let version = op.version.map(|v| {
        (
            header::HeaderName::from_static(VERSION_HEADER),
            v.to_string(),
        )
    });
    let write_id = op.write_id.map(|id| {
        (
            header::HeaderName::from_static(WRITE_ID_HEADER),
            id.to_string(),
        )
    });
    // The resend's age grows by the time it spent here.
    let resend = op.resend.into_iter().flat_map(|resend| {
        let age_ms = resend.first_sent_ago().as_millis().to_string();
        [
            (
                header::HeaderName::from_static(RESEND_HEADER),
                "1".to_owned(),
            ),
            (header::HeaderName::from_static(RESEND_AGE_HEADER), age_ms),
        ]
    });
    for (name, value) in precondition
        .into_iter()
        .chain(version)
        .chain(write_id)
        .chain(resend)
    {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    ForwardRequest {
        method,
        path_and_query: format!("/v1/{key}?w={}&r={}", op.w, op.r),
        headers,
        body,
    }
}

/// `{"key": K, "value": V, "version": "..."}` (plus `"ttl_secs"` left when the value expires)
/// with `ETag`, the value written exactly as stored.
fn value_response(
    key: &str,
    value: &[u8],
    version: Version,
    expires_at_ms: Option<u64>,
) -> Response {
    let version = version.to_string();
    let key_json = serde_json::to_string(key).unwrap_or_else(|_| "\"\"".to_owned());
    let mut body = Vec::with_capacity(key_json.len() + value.len() + version.len() + 64);
    body.extend_from_slice(b"{\"key\":");
    body.extend_from_slice(key_json.as_bytes());
    body.extend_from_slice(b",\"value\":");
    body.extend_from_slice(value);
    body.extend_from_slice(b",\"version\":\"");
    body.extend_from_slice(version.as_bytes());
    body.push(b'"');
    if let Some(expires) = expires_at_ms {
        let left_secs = expires.saturating_sub(now_ms()).div_ceil(1000);
        body.extend_from_slice(format!(",\"ttl_secs\":{left_secs}").as_bytes());
    }
    body.push(b'}');
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

/// `/v1/` with nothing after the slash: an empty key (the listing is `/v1` without a slash).
pub async fn empty_key() -> ApiError {
    ApiError::bad_request(
        "invalid_key",
        "the key is empty; use /v1/<key> (or GET /v1?prefix= to list keys)",
    )
}

/// `GET /v1/{key}?watch=true`: the key's changes, from the feeds of its replicas merged
/// (`watch_merge.rs`) when this node is one; otherwise a `307` to the key's first replica (the LB
/// routes there directly).
async fn watch_key(
    app: &AppState,
    key: String,
    parts: &axum::http::request::Parts,
) -> Result<Response, ApiError> {
    let after = watch::last_event_id(&parts.headers)?;
    let cluster = app.cluster();
    if cluster.is_replica(&key) {
        return Ok(
            crate::watch_merge::merged(cluster.clone(), watch::Filter::Key(key), after).await,
        );
    }
    let replica = cluster
        .replicas(&key)
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::Internal(format!("no replica of {key:?} in the ring")))?;
    let target = format!(
        "{replica}{}",
        parts.uri.path_and_query().map_or("", |p| p.as_str())
    );
    let location = HeaderValue::from_str(&target)
        .map_err(|e| ApiError::Internal(format!("bad replica URL {target}: {e}")))?;
    Ok((
        StatusCode::TEMPORARY_REDIRECT,
        [(header::LOCATION, location)],
    )
        .into_response())
}

/// `GET|HEAD|POST|PUT|DELETE /v1/{key}`.
pub async fn data(State(app): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let config = app.config();
    let cluster = app.cluster();
    let query = parse_query(
        parts.uri.query(),
        cluster.default_consistency(),
        cluster.replication_factor(),
    )?;
    if parts.method == Method::GET && watch::wants_watch(parts.uri.query())? {
        let key = parse_key(parts.uri.path(), "/v1/", config.max_key_bytes)?;
        return watch_key(&app, key, &parts).await;
    }
    let kind = match parts.method {
        Method::GET | Method::HEAD => OpKind::Get,
        Method::DELETE => OpKind::Delete,
        Method::POST | Method::PUT => {
            let body = parse_write_body(
                &read_body(body, config.max_value_bytes).await?,
                config.max_value_bytes,
            )?;
            if body.ttl_secs.is_some() && query.ttl_secs.is_some() {
                return Err(ApiError::bad_request(
                    "invalid_ttl",
                    "give the TTL once: ttl_secs in the body or ?ttl= in the query",
                ));
            }
            OpKind::Put {
                value: body.value,
                ttl_secs: body.ttl_secs.or(query.ttl_secs),
            }
        }
        ref other => {
            return Err(ApiError::MethodNotAllowed {
                method: other.to_string(),
                allow: ALLOWED,
            })
        }
    };
    let key = parse_key(parts.uri.path(), "/v1/", config.max_key_bytes)?;
    let (precondition, version, (write_id, resend)) = if kind == OpKind::Get {
        (Precondition::Always, None, (None, None))
    } else {
        (
            parse_precondition(&parts.headers)?,
            parse_supplied_version(&parts.headers, config.max_clock_offset)?,
            parse_write_id(&parts.headers)?,
        )
    };
    if precondition != Precondition::Always && version.is_some() {
        return Err(ApiError::bad_request(
            "invalid_version",
            format!("{VERSION_HEADER} cannot be combined with If-Match or If-None-Match"),
        ));
    }
    if write_id.is_some() && (precondition != Precondition::Always || version.is_some()) {
        return Err(ApiError::bad_request(
            "invalid_write_id",
            format!(
                "{WRITE_ID_HEADER} names a plain write: it cannot be combined with If-Match, \
                 If-None-Match or {VERSION_HEADER}"
            ),
        ));
    }
    let op = KeyOp {
        kind,
        key,
        w: query.w,
        r: query.r,
        precondition,
        version,
        write_id,
        resend,
    };
    let rid = request_id(&parts.headers);
    // A client cannot claim to be a forwarding node: the marker counts only with the secret.
    let forwarded =
        parts.headers.contains_key(FORWARDED_HEADER) && is_peer_call(&app, &parts.headers);
    let auth = parts.headers.get(header::AUTHORIZATION);
    let is_write = op.kind != OpKind::Get;
    // A coordinator that was forwarded to gives up before the node that forwarded to it does,
    // so that node hears the real outcome instead of timing out itself.
    let budget = if forwarded {
        config
            .request_timeout
            .saturating_sub(config.peer_timeout)
            .max(config.request_timeout / 2)
    } else {
        config.request_timeout
    };
    let work = execute(&app, op, auth, &rid, forwarded);
    match tokio::time::timeout(budget, work).await {
        Ok(result) => result.map(IntoResponse::into_response),
        // The write's replication runs in its own tasks and may still complete.
        Err(_) if is_write => Err(ApiError::Cluster(kv_cluster::Error::OutcomeUnknown {
            acked: 0,
            detail: format!("it was not confirmed within {} ms", budget.as_millis()),
        })),
        Err(_) => Err(ApiError::Timeout(
            u64::try_from(budget.as_millis()).unwrap_or(u64::MAX),
        )),
    }
}

/// Copies the owner's answer headers that describe the body.
fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for name in [header::CONTENT_TYPE, header::ETAG, header::ALLOW] {
        if let Some(value) = from.get(&name) {
            to.insert(name, value.clone());
        }
    }
    if let Some(value) = from.get(ACKS_HEADER) {
        to.insert(ACKS_HEADER, value.clone());
    }
}
