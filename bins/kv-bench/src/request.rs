//! Turns the target URL and the workload settings into ready-to-send kv requests:
//! `GET|POST|DELETE {base}/v1/{prefix}{index}?r=..|w=..` with a fixed-size JSON value, and
//! listing pages `GET {base}/v1?prefix={prefix}&after={prefix}{index}&limit=N`.

use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::Full;

use crate::error::BenchError;
use crate::workload::{Consistency, Op};

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
    host: HeaderValue,
    /// `{base}/v1/{encoded prefix}`: the key index is appended to it.
    key_path: String,
    read_query: String,
    write_query: String,
    write_body: Bytes,
    /// `{base}/v1?limit=N&prefix={prefix}&after={prefix}`: the key index is appended to it.
    list_path: String,
}

impl RequestFactory {
    /// Prepares requests for `target` with keys `{key_prefix}{index}` and values of
    /// `value_size` bytes; `w` and `r` become query parameters only when given. Listing pages
    /// ask for `list_limit` keys.
    pub fn new(
        target: &Target,
        key_prefix: &str,
        value_size: usize,
        w: Option<Consistency>,
        r: Option<Consistency>,
        list_limit: u32,
    ) -> Self {
        let prefix = encode_query(key_prefix);
        RequestFactory {
            host: target.host.clone(),
            key_path: format!("{}/v1/{}", target.base_path, encode_path(key_prefix)),
            read_query: r.map(|r| format!("?r={r}")).unwrap_or_default(),
            write_query: w.map(|w| format!("?w={w}")).unwrap_or_default(),
            write_body: write_body(value_size),
            list_path: format!(
                "{}/v1?limit={list_limit}&prefix={prefix}&after={prefix}",
                target.base_path
            ),
        }
    }

    /// The request for `op` on key number `key`.
    pub fn build(&self, op: Op, key: u64) -> Result<Request<Full<Bytes>>, http::Error> {
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
        let f = RequestFactory::new(&target(), "b k/", 5, Some(Consistency::One), None, 100);
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
