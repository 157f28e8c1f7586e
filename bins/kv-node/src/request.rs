//! Parsing and checking what a data request asks, before any work is done: the key, `w` / `r`,
//! the write body (`value`, `ttl_secs`), `?ttl=`, precondition headers and a carried version.
//! Bad input becomes a 400/413 [`ApiError`] here and changes nothing.

use crate::error::ApiError;
use axum::body::Body;
use axum::http::{header, HeaderMap};
use bytes::Bytes;
use kv_cluster::{
    Consistency, Precondition, Resend, WriteId, RESEND_AGE_HEADER, RESEND_HEADER, VERSION_HEADER,
    WRITE_ID_HEADER,
};
use kv_core::Version;
use percent_encoding::percent_decode_str;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::time::Duration;

/// Room for the `{"value": ...}` envelope around a value of the largest allowed size.
const BODY_ENVELOPE_BYTES: usize = 64 * 1024;
/// Longest TTL accepted: ten years, in seconds.
pub const MAX_TTL_SECS: u64 = 10 * 365 * 86_400;

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

/// What the query of a data request asks: consistency levels and a TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryOptions {
    /// W.
    pub w: Consistency,
    /// R.
    pub r: Consistency,
    /// `?ttl=`, in seconds.
    pub ttl_secs: Option<u64>,
}

/// Parses `w`, `r` and `ttl` from the query; levels default to the node's.
pub fn parse_query(
    query: Option<&str>,
    defaults: (Consistency, Consistency),
    n: usize,
) -> Result<QueryOptions, ApiError> {
    let (w, r) = defaults;
    let mut options = QueryOptions {
        w,
        r,
        ttl_secs: None,
    };
    for (name, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "w" => options.w = Consistency::parse("w", &value, n)?,
            "r" => options.r = Consistency::parse("r", &value, n)?,
            "ttl" => options.ttl_secs = Some(parse_ttl_text(&value)?),
            _ => {}
        }
    }
    Ok(options)
}

/// A TTL in the query: seconds, or a number with `s`, `m`, `h` or `d` (`60`, `60s`, `5m`, `1d`).
fn parse_ttl_text(text: &str) -> Result<u64, ApiError> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad_ttl(text)),
    };
    let secs = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| bad_ttl(text))?;
    check_ttl(secs, text)
}

fn check_ttl(secs: u64, shown: &str) -> Result<u64, ApiError> {
    if (1..=MAX_TTL_SECS).contains(&secs) {
        Ok(secs)
    } else {
        Err(bad_ttl(shown))
    }
}

fn bad_ttl(shown: &str) -> ApiError {
    ApiError::bad_request(
        "invalid_ttl",
        format!("ttl {shown:?}: expected whole seconds from 1 to {MAX_TTL_SECS} (or 30s, 5m, 2h, 1d in the query)"),
    )
}

/// A parsed write body: the value exactly as sent, and `ttl_secs` if given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteBody {
    /// The value's JSON bytes, exactly as the client sent them.
    pub value: Bytes,
    /// `ttl_secs`, checked.
    pub ttl_secs: Option<u64>,
}

/// The raw members of a write body: `value` (any JSON) and `ttl_secs`; others are ignored.
struct RawBody<'a> {
    value: &'a RawValue,
    ttl: Option<&'a RawValue>,
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for RawBody<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BodyVisitor;
        impl<'de> Visitor<'de> for BodyVisitor {
            type Value = RawBody<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(r#"a JSON object like {"value": ...}"#)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut value, mut ttl) = (None, None);
                while let Some(name) = map.next_key::<Cow<'de, str>>()? {
                    match name.as_ref() {
                        "value" => value = Some(map.next_value::<&'de RawValue>()?),
                        "ttl_secs" => ttl = Some(map.next_value::<&'de RawValue>()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                let value = value.ok_or_else(|| de::Error::missing_field("value"))?;
                Ok(RawBody { value, ttl })
            }
        }
        deserializer.deserialize_map(BodyVisitor)
    }
}

/// Parses a write body `{"value": V, "ttl_secs": N}`.
pub fn parse_write_body(body: &[u8], max_value: usize) -> Result<WriteBody, ApiError> {
    let parsed: RawBody<'_> = serde_json::from_slice(body).map_err(|e| {
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
    let ttl_secs = match parsed.ttl {
        None => None,
        Some(raw) if raw.get() == "null" => None,
        Some(raw) => {
            let secs = serde_json::from_str::<u64>(raw.get()).map_err(|_| bad_ttl(raw.get()))?;
            Some(check_ttl(secs, raw.get())?)
        }
    };
    Ok(WriteBody {
        value: Bytes::copy_from_slice(value.as_bytes()),
        ttl_secs,
    })
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

fn bad_precondition(why: &str) -> ApiError {
    ApiError::bad_request(
        "invalid_precondition",
        format!("bad precondition header: {why}"),
    )
}

/// The version a write brings in `x-kv-version`, at most `max_ahead` ahead of this node's clock:
/// further, and one bad client clock could make a key unwritable for everyone else (and drag
/// every node's clock along).
pub fn parse_supplied_version(
    headers: &HeaderMap,
    max_ahead: Duration,
) -> Result<Option<Version>, ApiError> {
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
    check_not_ahead(version, max_ahead).map_err(|ahead_ms| {
        bad(&format!(
            "the version is {ahead_ms} ms ahead of this node's clock; at most {} ms is accepted \
             (MAX_CLOCK_OFFSET_MS)",
            max_ahead.as_millis()
        ))
    })?;
    Ok(Some(version))
}

/// The write id of a plain write (`x-kv-write-id`, 16 hex digits) and, for a resend
/// (`x-kv-resend: 1`), how long ago its first send left (`x-kv-resend-age-ms`). Honoured from
/// anyone: an id can only make a write idempotent, and a forged one would have to guess a random
/// 64-bit id to touch another client's write.
pub fn parse_write_id(headers: &HeaderMap) -> Result<(Option<WriteId>, Option<Resend>), ApiError> {
    let id = match headers.get(WRITE_ID_HEADER) {
        None => None,
        Some(raw) => Some(
            raw.to_str()
                .map_err(|_| "not ASCII".to_owned())
                .and_then(|text| text.trim().parse::<WriteId>())
                .map_err(|why| {
                    ApiError::bad_request(
                        "invalid_write_id",
                        format!("{WRITE_ID_HEADER}: {why}; expected 16 hex digits"),
                    )
                })?,
        ),
    };
    let resend = match headers.get(RESEND_HEADER).map(|v| v.as_bytes()) {
        None | Some(b"0") => false,
        Some(b"1") => true,
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_write_id",
                format!("{RESEND_HEADER}: expected 1 or 0"),
            ))
        }
    };
    if resend && id.is_none() {
        return Err(ApiError::bad_request(
            "invalid_write_id",
            format!("{RESEND_HEADER} needs {WRITE_ID_HEADER}: a resend names the write it repeats"),
        ));
    }
    let age = match headers.get(RESEND_AGE_HEADER) {
        None => None,
        Some(raw) => Some(
            raw.to_str()
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
                .map(Duration::from_millis)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_write_id",
                        format!("{RESEND_AGE_HEADER}: expected whole milliseconds"),
                    )
                })?,
        ),
    };
    Ok((id, resend.then(|| Resend::new(age))))
}

/// `Err(ms ahead)` when `version` is further than `max_ahead` ahead of this node's clock.
pub fn check_not_ahead(version: Version, max_ahead: Duration) -> Result<(), u64> {
    let now = kv_cluster::now_ms();
    let limit = u64::try_from(max_ahead.as_millis()).unwrap_or(u64::MAX);
    if version.physical_ms() > now.saturating_add(limit) {
        return Err(version.physical_ms() - now);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_ids_and_resend_flags_are_checked() {
        let mut h = HeaderMap::new();
        assert_eq!(parse_write_id(&h).unwrap(), (None, None));
        h.insert(WRITE_ID_HEADER, "00000000000000ff".parse().unwrap());
        assert_eq!(parse_write_id(&h).unwrap(), (Some(WriteId(255)), None));
        h.insert(RESEND_HEADER, "1".parse().unwrap());
        let (id, resend) = parse_write_id(&h).unwrap();
        assert_eq!(id, Some(WriteId(255)));
        assert!(
            resend.unwrap().horizon() > kv_cluster::WRITE_ID_WINDOW,
            "age unknown"
        );
        h.insert(RESEND_AGE_HEADER, "250".parse().unwrap());
        let resend = parse_write_id(&h).unwrap().1.unwrap();
        assert!(resend.first_sent_ago() >= Duration::from_millis(250));
        assert!(resend.horizon() < Duration::from_secs(10));
        h.insert(RESEND_AGE_HEADER, "soon".parse().unwrap());
        assert!(parse_write_id(&h).is_err(), "an age is whole milliseconds");
        h.remove(RESEND_AGE_HEADER);
        h.insert(RESEND_HEADER, "yes".parse().unwrap());
        assert!(parse_write_id(&h).is_err(), "a resend flag is 1 or 0");
        h.insert(RESEND_HEADER, "1".parse().unwrap());
        h.insert(WRITE_ID_HEADER, "ff".parse().unwrap());
        assert!(parse_write_id(&h).is_err(), "an id is 16 hex digits");
        h.remove(WRITE_ID_HEADER);
        assert!(parse_write_id(&h).is_err(), "a resend without an id");
    }

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
        assert_eq!(&v.value[..], br#"{"a" : 1.50, "b": [1,2]}"#);
        assert_eq!(v.ttl_secs, None);
        assert_eq!(
            &parse_write_body(br#"{"value":null}"#, 100).unwrap().value[..],
            b"null"
        );
        assert_eq!(
            &parse_write_body(br#"{"value":"hello"}"#, 100)
                .unwrap()
                .value[..],
            b"\"hello\""
        );
        assert_eq!(
            parse_write_body(br#"{"value":1,"ttl_secs":60}"#, 100)
                .unwrap()
                .ttl_secs,
            Some(60)
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
        for ttl in ["0", "-5", "1.5", "\"60\"", "true", "999999999999"] {
            assert_eq!(
                code(format!(r#"{{"value": 1, "ttl_secs": {ttl}}}"#).as_bytes()),
                "invalid_ttl",
                "{ttl}"
            );
        }
    }

    #[test]
    fn the_query_gives_levels_and_ttl() {
        let d = (Consistency::Quorum, Consistency::One);
        let q = parse_query(None, d, 3).unwrap();
        assert_eq!((q.w, q.r, q.ttl_secs), (d.0, d.1, None));
        let q = parse_query(Some("w=all&r=2&ttl=5m"), d, 3).unwrap();
        assert_eq!(
            (q.w, q.r, q.ttl_secs),
            (Consistency::All, Consistency::Count(2), Some(300))
        );
        for (ttl, secs) in [("60", 60), ("60s", 60), ("2h", 7200), ("1d", 86_400)] {
            assert_eq!(
                parse_query(Some(&format!("ttl={ttl}")), d, 3)
                    .unwrap()
                    .ttl_secs,
                Some(secs)
            );
        }
        for bad in [
            "w=4", "r=most", "ttl=0", "ttl=5y", "ttl=-1", "ttl=", "ttl=1.5s",
        ] {
            assert!(parse_query(Some(bad), d, 3).is_err(), "{bad}");
        }
    }

    #[test]
    fn preconditions_and_versions_come_from_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(parse_precondition(&h).unwrap(), Precondition::Always);
        h.insert(header::IF_NONE_MATCH, "*".parse().unwrap());
        assert_eq!(parse_precondition(&h).unwrap(), Precondition::IfAbsent);
        h.insert(header::IF_MATCH, "*".parse().unwrap());
        assert!(parse_precondition(&h).is_err(), "both at once");
        let mut h = HeaderMap::new();
        h.insert(
            header::IF_MATCH,
            "\"0000000000010000-00000001\"".parse().unwrap(),
        );
        assert!(matches!(
            parse_precondition(&h).unwrap(),
            Precondition::IfMatch(_)
        ));
        let mut h = HeaderMap::new();
        h.insert(VERSION_HEADER, "ffffffffffff0000-00000001".parse().unwrap());
        let half_second = Duration::from_millis(500);
        assert!(
            parse_supplied_version(&h, half_second).is_err(),
            "far in the future"
        );
        let at = |ms: u64| Version {
            hlc: ms << 16,
            node: 1,
        };
        let (now, ahead) = (at(kv_cluster::now_ms()), at(kv_cluster::now_ms() + 5_000));
        assert_eq!(check_not_ahead(now, half_second), Ok(()));
        assert!(check_not_ahead(ahead, half_second).is_err());
        assert_eq!(check_not_ahead(ahead, Duration::from_secs(10)), Ok(()));
        h.insert(VERSION_HEADER, now.to_string().parse().unwrap());
        assert_eq!(parse_supplied_version(&h, half_second).unwrap(), Some(now));
    }
}
