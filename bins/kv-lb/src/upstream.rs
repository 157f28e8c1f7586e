//! Connections to the nodes: one pooled keep-alive HTTP/1.1 client, one attempt at a time with a
//! deadline, and the classification of what went wrong (which decides whether a retry is safe).

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, Method, Request, Response, Uri};
use bytes::Bytes;
use http_body_util::Full;
use http_body_util::Limited;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::error::ApiError;

/// Deadline to open a TCP connection to a node; a node that does not accept within it is down.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
/// How long an idle pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per node.
const POOL_MAX_IDLE_PER_NODE: usize = 128;

/// Headers that describe one connection, not the message, so a proxy must not pass them on
/// (RFC 9110 section 7.6.1). `Host` is set again by the client from the node's URL.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// A client request, fully read, so it can be sent again to another replica.
#[derive(Debug, Clone)]
pub struct BufferedRequest {
    /// Method, passed on unchanged.
    pub method: Method,
    /// Raw path and query, passed on unchanged (`/v1/a%2Fb?w=all`).
    pub path_and_query: String,
    /// Headers, hop-by-hop ones already removed.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

/// What one attempt at one node produced.
#[derive(Debug)]
pub enum Outcome {
    /// The node answered (any status); its body is still streaming.
    Answered(Response<Incoming>),
    /// No connection could be opened: the node never saw the request, so any retry is safe.
    ConnectFailed(String),
    /// The node did not answer before the attempt's deadline.
    TimedOut,
    /// The connection failed after the request may have been sent.
    Failed(String),
}

/// Largest status document read from a node.
const MAX_STATUS_BYTES: usize = 1 << 20;

/// The pooled client to the nodes. Cheap to clone (the pool is shared).
#[derive(Clone, Debug)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Upstream {
    /// Builds the client: HTTP/1.1, keep-alive pool, TCP_NODELAY, short connect timeout.
    /// `tls` is used for `https://` nodes: it decides which certificates are trusted (the
    /// handshake counts as part of connecting, so a refused node is failed over like a
    /// refused connection).
    pub fn new(tls: rustls::ClientConfig) -> Self {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_nodelay(true);
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_NODE)
            .build(connector);
        Upstream { client }
    }

    /// Sends `request` to the node at `node_url` and waits at most `deadline` for its head.
    pub async fn send(
        &self,
        node_url: &str,
        request: &BufferedRequest,
        deadline: Duration,
    ) -> Result<Outcome, ApiError> {
        let mut outgoing = Request::new(Full::new(request.body.clone()));
        *outgoing.method_mut() = request.method.clone();
        *outgoing.uri_mut() = node_uri(node_url, &request.path_and_query)?;
        *outgoing.headers_mut() = request.headers.clone();
        Ok(self.attempt(outgoing, deadline).await)
    }

    /// `GET {node_url}/health`: the node's status, or why it could not be reached.
    pub async fn get_health(&self, node_url: &str, deadline: Duration) -> Result<u16, String> {
        let uri = node_uri(node_url, "/health").map_err(|e| e.to_string())?;
        let mut request = Request::new(Full::new(Bytes::new()));
        *request.uri_mut() = uri;
        let response = match self.attempt(request, deadline).await {
            Outcome::Answered(response) => response,
            Outcome::ConnectFailed(reason) | Outcome::Failed(reason) => return Err(reason),
            Outcome::TimedOut => return Err(format!("no answer within {deadline:?}")),
        };
        let status = response.status().as_u16();
        // Drain the (tiny) body so the connection goes back to the pool.
        let drained = tokio::time::timeout(deadline, drain(response.into_body())).await;
        match drained {
            Ok(Ok(())) => Ok(status),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("body not read within {deadline:?}")),
        }
    }

    /// `GET {node_url}{path}`: the body of a 200 answer, read within `deadline`.
    pub async fn get_json(
        &self,
        node_url: &str,
        path: &str,
        deadline: Duration,
    ) -> Result<Bytes, String> {
        use http_body_util::BodyExt;
        let uri = node_uri(node_url, path).map_err(|e| e.to_string())?;
        let mut request = Request::new(Full::new(Bytes::new()));
        *request.uri_mut() = uri;
        let response = match self.attempt(request, deadline).await {
            Outcome::Answered(response) if response.status() == 200 => response,
            Outcome::Answered(response) => {
                return Err(format!("{path} answered {}", response.status()))
            }
            Outcome::ConnectFailed(reason) | Outcome::Failed(reason) => return Err(reason),
            Outcome::TimedOut => return Err(format!("no answer within {deadline:?}")),
        };
        let body = Limited::new(response.into_body(), MAX_STATUS_BYTES);
        match tokio::time::timeout(deadline, body.collect()).await {
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("body not read within {deadline:?}")),
        }
    }

    async fn attempt(&self, request: Request<Full<Bytes>>, deadline: Duration) -> Outcome {
        match tokio::time::timeout(deadline, self.client.request(request)).await {
            Err(_) => Outcome::TimedOut,
            Ok(Ok(response)) => Outcome::Answered(response),
            Ok(Err(e)) if e.is_connect() => Outcome::ConnectFailed(error_chain(&e)),
            Ok(Err(e)) => Outcome::Failed(error_chain(&e)),
        }
    }
}

/// Prepares a client's headers for a node: hop-by-hop headers removed, `Host` too (the client
/// sets it from the node URL), and `Expect` (the body has already been read in full).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::HOST);
    headers.remove(header::EXPECT);
}

/// Removes every node-to-node header a client may have sent (`x-kv-forwarded`, `x-kv-secret`,
/// `x-kv-request-ids`, `x-kv-write-id`, `x-kv-resend` and anything else starting with `x-kv-`):
/// only nodes and this proxy may set them, so a client cannot pass for one through the LB. `x-kv-version`, a documented client feature
/// (a write's own version), is kept.
pub fn strip_internal_headers(headers: &mut HeaderMap) {
    let internal: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_internal_header(name.as_str()))
        .cloned()
        .collect();
    for name in internal {
        headers.remove(name);
    }
}

/// True for the node-to-node headers ([`strip_internal_headers`]); names are lower-case here.
fn is_internal_header(name: &str) -> bool {
    name.starts_with(INTERNAL_HEADER_PREFIX) && name != VERSION_HEADER
}

/// A write's own version, set by a client (the nodes read the same name); passed through.
pub const VERSION_HEADER: &str = "x-kv-version";
/// The id this proxy gives each plain write (16 lowercase hex digits), the same on every resend.
pub const WRITE_ID_HEADER: &str = "x-kv-write-id";
/// Marks a write sent again after an attempt whose answer was lost (`1`).
pub const RESEND_HEADER: &str = "x-kv-resend";
/// Milliseconds between a resent write's first send and this send.
pub const RESEND_AGE_HEADER: &str = "x-kv-resend-age-ms";

/// Prefix of every kv header; all but `x-kv-version` are node-to-node only.
const INTERNAL_HEADER_PREFIX: &str = "x-kv-";

/// Turns a node's response into ours: status, headers (minus hop-by-hop) and streamed body.
pub fn into_client_response(response: Response<Incoming>) -> axum::response::Response {
    let (mut parts, body) = response.into_parts();
    for name in &HOP_BY_HOP {
        parts.headers.remove(name);
    }
    Response::from_parts(parts, Body::new(body))
}

fn node_uri(node_url: &str, path_and_query: &str) -> Result<Uri, ApiError> {
    format!("{node_url}{path_and_query}")
        .parse()
        .map_err(|e| ApiError::Internal(format!("bad node URI {node_url}{path_and_query}: {e}")))
}

async fn drain(mut body: Incoming) -> Result<(), String> {
    use http_body_util::BodyExt;
    while let Some(frame) = body.frame().await {
        frame.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The error and its causes on one line: hyper's top-level message alone ("client error
/// (Connect)") does not say what happened.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn internal_headers_are_stripped_and_the_version_is_kept() {
        let mut headers = HeaderMap::new();
        for name in [
            "x-kv-forwarded",
            "x-kv-secret",
            "x-kv-request-ids",
            "X-KV-Anything",
        ] {
            headers.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("1"),
            );
        }
        headers.insert(
            "x-kv-version",
            HeaderValue::from_static("0000000000000001-00000001"),
        );
        headers.insert("x-request-id", HeaderValue::from_static("abc"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        strip_internal_headers(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "x-kv-version", "x-request-id"]);
    }
}
