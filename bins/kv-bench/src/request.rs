//! Turns the target URL and the workload settings into ready-to-send requests, and classifies
//! the answers. For kv: `GET|POST|DELETE {base}/v1/{prefix}{index}?r=..|w=..` with a fixed-size
//! JSON value, and listing pages `GET {base}/v1?prefix={prefix}&after={prefix}{index}&limit=N`.
//! For etcd (its v3 JSON gateway): `POST {base}/v3/kv/range|put|deleterange` with the same keys
//! and values, base64-encoded as the gateway wants them.

use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::Full;

use crate::error::BenchError;
use crate::stats::Outcome;
use crate::workload::{Consistency, Op};

/// The API the load speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Api {
    /// kv's HTTP API (`/v1/{key}`), through a kv-lb or straight to a kv-node.
    Kv,
    /// etcd's v3 JSON gateway (`POST /v3/kv/range`, `/v3/kv/put`, `/v3/kv/deleterange`), sent
    /// to one member (the leader, for the fewest hops). Reads are linearizable ranges.
    Etcd,
}

impl Api {
    /// Classifies an answer to `op`. kv: 2xx is a success, so is a 404 to a read or a delete.
    /// etcd: only 200 is a success (a 404 means a wrong URL, not a missing key); a range that
    /// finds nothing, or a delete that deletes nothing, is counted as kv's 404 would be: a
    /// successful `not_found`.
    pub fn classify(self, op: Op, status: u16, body: &[u8]) -> Outcome {
        match self {
            Api::Kv => Outcome::from_status(op, status),
            Api::Etcd if status != 200 => Outcome::Status(status),
            // The gateway leaves zero-valued fields out: no `kvs` means no key in the range,
            // no `deleted` means nothing was deleted.
            Api::Etcd => match op {
                Op::Read if !contains(body, b"\"kvs\"") => Outcome::NotFound,
                Op::Delete if !contains(body, b"\"deleted\"") => Outcome::NotFound,
                _ => Outcome::Ok,
            },
        }
    }

    /// Whether [`Api::classify`] looks at the body (kv's answers are classified by status).
    pub fn needs_body(self) -> bool {
        self == Api::Etcd
    }

    /// Name as given to `--target`.
    pub fn name(self) -> &'static str {
        match self {
            Api::Kv => "kv",
            Api::Etcd => "etcd",
        }
    }
}

/// Whether `needle` occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Where the load goes: a resolved socket address plus what the HTTP requests must carry.
#[derive(Debug, Clone)]
pub struct Target {
    /// Address every worker connects to.
    pub addr: SocketAddr,
    /// `Host` header value (`host:port` as given in the URL).
    pub host: HeaderValue,
    /// Path prefix of the URL without a trailing slash (usually empty).
    pub base_path: String,
}

impl Target {
    /// Parses an `http://host[:port][/prefix]` URL and resolves its host once.
    pub async fn resolve(url: &str) -> Result<Self, BenchError> {
        let uri: Uri = url
            .parse()
            .map_err(|e| BenchError::Invalid(format!("--url {url:?}: {e}")))?;
        if uri.scheme_str() != Some("http") {
            return Err(BenchError::Invalid(format!(
                "--url {url:?}: expected an http:// URL"
            )));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| BenchError::Invalid(format!("--url {url:?}: no host")))?;
        let host = authority.host().to_string();
        let port = authority.port_u16().unwrap_or(80);
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|source| BenchError::Resolve {
                host: host.clone(),
                port,
                source,
            })?
            .next()
            .ok_or_else(|| BenchError::Resolve {
                host: host.clone(),
                port,
                source: std::io::Error::other("no address"),
            })?;
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|e| BenchError::Invalid(format!("--url {url:?}: {e}")))?;
        let base_path = uri.path().trim_end_matches('/').to_string();
        Ok(Target {
            addr,
            host,
            base_path,
        })
    }
}

/// Builds the requests of one workload; cheap to share between workers.
#[derive(Debug, Clone)]
pub struct RequestFactory {
    api: Api,
    host: HeaderValue,
    /// The raw key prefix (etcd requests carry whole keys, base64-encoded, in their bodies).
    key_prefix: String,
    /// `{base}/v3/kv` for etcd.
    etcd_path: String,
    /// The base64 value of an etcd put: the JSON value kv stores for the same write.
    etcd_value: String,
    /// Base64 of the first key after every key with the prefix (etcd's `range_end` of a listing).
    etcd_prefix_end: String,
    list_limit: u32,
    /// `{base}/v1/{encoded prefix}`: the key index is appended to it.
    key_path: String,
    read_query: String,
    write_query: String,
    write_body: Bytes,
    /// `{base}/v1?limit=N&prefix={prefix}&after={prefix}`: the key index is appended to it.
    list_path: String,
}

impl RequestFactory {
    /// Prepares requests in `api` for `target` with keys `{key_prefix}{index}` and values of
    /// `value_size` bytes; `w` and `r` become query parameters only when given (kv only).
    /// Listing pages ask for `list_limit` keys.
    pub fn new(
        api: Api,
        target: &Target,
        key_prefix: &str,
        value_size: usize,
        w: Option<Consistency>,
        r: Option<Consistency>,
        list_limit: u32,
    ) -> Self {
        let prefix = encode_query(key_prefix);
        let write_body = write_body(value_size);
        RequestFactory {
            api,
            host: target.host.clone(),
            key_prefix: key_prefix.to_string(),
            etcd_path: format!("{}/v3/kv", target.base_path),
            etcd_value: base64(stored_value(&write_body)),
            etcd_prefix_end: base64(&prefix_end(key_prefix.as_bytes())),
            list_limit,
            key_path: format!("{}/v1/{}", target.base_path, encode_path(key_prefix)),
            read_query: r.map(|r| format!("?r={r}")).unwrap_or_default(),
            write_query: w.map(|w| format!("?w={w}")).unwrap_or_default(),
            write_body,
            list_path: format!(
                "{}/v1?limit={list_limit}&prefix={prefix}&after={prefix}",
                target.base_path
            ),
        }
    }

    /// The request for `op` on key number `key`.
    pub fn build(&self, op: Op, key: u64) -> Result<Request<Full<Bytes>>, http::Error> {
        if self.api == Api::Etcd {
            return self.build_etcd(op, key);
        }
        if op == Op::List {
            return Request::builder()
                .method(Method::GET)
                .uri(format!("{}{key}", self.list_path))
                .header(HOST, self.host.clone())
                .body(Full::new(Bytes::new()));
        }
        let (method, query, body) = match op {
            Op::Read => (Method::GET, &self.read_query, Bytes::new()),
            Op::Write => (Method::POST, &self.write_query, self.write_body.clone()),
            Op::Delete => (Method::DELETE, &self.write_query, Bytes::new()),
            Op::List => (Method::GET, &self.read_query, Bytes::new()),
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{}{key}{query}", self.key_path))
            .header(HOST, self.host.clone());
        if !body.is_empty() {
            builder = builder.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        builder.body(Full::new(body))
    }

    /// The etcd request for `op` on key number `key`: a JSON body with the base64 key (and
    /// value), POSTed to the gateway. A listing page is a range from the drawn key to the end
    /// of the prefix, `list_limit` keys at most.
    fn build_etcd(&self, op: Op, key: u64) -> Result<Request<Full<Bytes>>, http::Error> {
        let key = base64(format!("{}{key}", self.key_prefix).as_bytes());
        let (call, body) = match op {
            Op::Read => ("range", format!("{{\"key\":\"{key}\"}}")),
            Op::Write => (
                "put",
                format!("{{\"key\":\"{key}\",\"value\":\"{}\"}}", self.etcd_value),
            ),
            Op::Delete => ("deleterange", format!("{{\"key\":\"{key}\"}}")),
            Op::List => (
                "range",
                format!(
                    "{{\"key\":\"{key}\",\"range_end\":\"{}\",\"limit\":{}}}",
                    self.etcd_prefix_end, self.list_limit
                ),
            ),
        };
        Request::builder()
            .method(Method::POST)
            .uri(format!("{}/{call}", self.etcd_path))
            .header(HOST, self.host.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(Full::new(Bytes::from(body)))
    }
}

/// The JSON value inside a kv write body `{"value":V}`: the bytes kv stores for it, and
/// what an etcd put stores for the same write.
fn stored_value(write_body: &[u8]) -> &[u8] {
    let start = b"{\"value\":".len();
    write_body
        .get(start..write_body.len().saturating_sub(1))
        .unwrap_or_default()
}

/// The smallest byte string above every string that starts with `prefix` (etcd's `range_end`
/// for a prefix): the prefix with trailing 0xff bytes dropped and its last byte incremented;
/// `[0]` (etcd: "to the end of the key space") when there is no such string.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Standard base64 (RFC 4648, `+/`, with `=` padding), as protobuf's JSON mapping wants bytes.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `{"value":"xxxx"}` where the JSON string holds exactly `value_size` bytes.
fn write_body(value_size: usize) -> Bytes {
    let mut body = String::with_capacity(value_size + 16);
    body.push_str("{\"value\":\"");
    body.push_str(&"x".repeat(value_size));
    body.push_str("\"}");
    Bytes::from(body)
}

/// Percent-encodes everything but unreserved characters and `/` (kv allows slashes in keys).
fn encode_path(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for byte in raw.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Percent-encodes everything but unreserved characters, for a query parameter value.
fn encode_query(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for byte in raw.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            addr: "127.0.0.1:9000".parse().unwrap(),
            host: HeaderValue::from_static("127.0.0.1:9000"),
            base_path: String::new(),
        }
    }

    #[test]
    fn builds_paths_queries_and_bodies() {
        let f = RequestFactory::new(
            Api::Kv,
            &target(),
            "b k/",
            5,
            Some(Consistency::One),
            None,
            100,
        );
        let get = f.build(Op::Read, 42).unwrap();
        assert_eq!(get.method(), Method::GET);
        assert_eq!(get.uri(), "/v1/b%20k/42");
        let post = f.build(Op::Write, 7).unwrap();
        assert_eq!(post.uri(), "/v1/b%20k/7?w=one");
        assert_eq!(post.headers()[HOST], "127.0.0.1:9000");
        let del = f.build(Op::Delete, 1).unwrap();
        assert_eq!(
            (del.method(), del.uri().to_string()),
            (&Method::DELETE, "/v1/b%20k/1?w=one".into())
        );
        let list = f.build(Op::List, 12).unwrap();
        assert_eq!(
            (list.method(), list.uri().to_string()),
            (
                &Method::GET,
                "/v1?limit=100&prefix=b%20k%2F&after=b%20k%2F12".into()
            )
        );
    }

    #[test]
    fn write_body_is_json_with_exact_value_size() {
        let body = write_body(100);
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed["value"].as_str().unwrap().len(), 100);
    }

    /// The request's method, path and JSON body.
    async fn parts(req: Request<Full<Bytes>>) -> (Method, String, serde_json::Value) {
        use http_body_util::BodyExt;
        let (head, body) = req.into_parts();
        assert_eq!(head.headers[CONTENT_TYPE], "application/json");
        assert_eq!(head.headers[HOST], "127.0.0.1:9000");
        let bytes = body.collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap();
        (head.method, head.uri.to_string(), json)
    }

    #[tokio::test]
    async fn etcd_requests_carry_base64_keys_and_the_value_kv_stores() {
        let f = RequestFactory::new(Api::Etcd, &target(), "bench-", 5, None, None, 100);
        let (method, uri, body) = parts(f.build(Op::Write, 42).unwrap()).await;
        assert_eq!((method, uri.as_str()), (Method::POST, "/v3/kv/put"));
        // base64("bench-42") and base64("\"xxxxx\""): kv stores the JSON value "xxxxx".
        assert_eq!(
            body,
            serde_json::json!({"key": "YmVuY2gtNDI=", "value": "Inh4eHh4Ig=="})
        );
        let (method, uri, body) = parts(f.build(Op::Read, 42).unwrap()).await;
        assert_eq!((method, uri.as_str()), (Method::POST, "/v3/kv/range"));
        assert_eq!(body, serde_json::json!({"key": "YmVuY2gtNDI="}));
        let (_, uri, body) = parts(f.build(Op::Delete, 42).unwrap()).await;
        assert_eq!(uri, "/v3/kv/deleterange");
        assert_eq!(body, serde_json::json!({"key": "YmVuY2gtNDI="}));
    }

    #[tokio::test]
    async fn etcd_listing_is_a_range_to_the_end_of_the_prefix() {
        let mut t = target();
        t.base_path = "/gw".into();
        let f = RequestFactory::new(Api::Etcd, &t, "b k/", 5, None, None, 25);
        let (_, uri, body) = parts(f.build(Op::List, 12).unwrap()).await;
        assert_eq!(uri, "/gw/v3/kv/range");
        // base64("b k/12") to base64("b k0"), the first key after the prefix.
        assert_eq!(
            body,
            serde_json::json!({"key": "YiBrLzEy", "range_end": "YiBrMA==", "limit": 25})
        );
        assert_eq!(prefix_end(b"a\xff\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), [0]);
        assert_eq!(prefix_end(b""), [0]);
    }

    #[test]
    fn base64_matches_rfc_4648() {
        for (raw, encoded) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
            (b"\xff\xfe", "//4="),
            (b"\x00\x10\x83\x10\x51\x87", "ABCDEFGH"),
        ] {
            assert_eq!(base64(raw), encoded, "{raw:?}");
        }
    }

    #[test]
    fn etcd_answers_are_classified_by_status_and_body() {
        let found =
            br#"{"header":{"revision":"7"},"kvs":[{"key":"YQ==","value":"Yg=="}],"count":"1"}"#;
        let missing =
            br#"{"header":{"cluster_id":"1","member_id":"2","revision":"7","raft_term":"2"}}"#;
        let e = Api::Etcd;
        assert_eq!(e.classify(Op::Read, 200, found), Outcome::Ok);
        assert_eq!(e.classify(Op::Read, 200, missing), Outcome::NotFound);
        assert_eq!(e.classify(Op::List, 200, missing), Outcome::Ok);
        assert_eq!(e.classify(Op::Write, 200, missing), Outcome::Ok);
        let deleted = br#"{"header":{"revision":"8"},"deleted":"1"}"#;
        assert_eq!(e.classify(Op::Delete, 200, deleted), Outcome::Ok);
        assert_eq!(e.classify(Op::Delete, 200, missing), Outcome::NotFound);
        // A 404 from etcd is a wrong path, never a missing key; other statuses are errors too.
        for status in [404, 400, 503, 204] {
            assert_eq!(e.classify(Op::Read, status, found), Outcome::Status(status));
        }
        // kv is classified by status alone.
        assert_eq!(Api::Kv.classify(Op::Read, 404, b""), Outcome::NotFound);
        assert_eq!(Api::Kv.classify(Op::Write, 201, b""), Outcome::Ok);
        assert!(Api::Etcd.needs_body() && !Api::Kv.needs_body());
    }

    #[tokio::test]
    async fn resolve_checks_the_url() {
        let t = Target::resolve("http://127.0.0.1:8001/base/")
            .await
            .unwrap();
        assert_eq!((t.addr.port(), t.base_path.as_str()), (8001, "/base"));
        assert!(Target::resolve("https://127.0.0.1").await.is_err());
        assert!(Target::resolve("not a url").await.is_err());
    }
}
