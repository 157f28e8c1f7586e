//! Connections to the nodes, and the classification of what went wrong (which decides whether a
//! retry is safe).
//!
//! The data path does not use a pooled client with its own connection tasks: each node has a
//! stack of idle HTTP/1.1 connections (`hyper::client::conn::http1`), and a request takes one,
//! drives it in the task that serves the client's connection (no spawned task, no channel
//! between tasks), and its answer's body ([`ProxyBody`]) gives it back once the last byte is
//! through. A connection the node closed while it sat idle is noticed before the request is
//! written, and the request goes out on a fresh one. Health checks and the membership poll use a
//! small pooled client (`get_health`, `get_json`): they are rare.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::Full;
use http_body_util::Limited;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tower::Service;

use crate::error::ApiError;

/// Deadline to open a TCP connection to a node; a node that does not accept within it is down.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
/// How long an idle connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per node.
const POOL_MAX_IDLE_PER_NODE: usize = 128;

/// Headers that describe one connection, not the message, so a proxy must not pass them on
/// (RFC 9110 section 7.6.1). `Host` is set again from the node's URL.
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
    /// Raw path and query (origin form), passed on unchanged (`/v1/a%2Fb?w=all`).
    pub uri: Uri,
    /// Headers, hop-by-hop ones already removed.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

/// What one attempt at one node produced.
#[derive(Debug)]
pub enum Outcome<B = ProxyBody> {
    /// The node answered (any status); its body is still streaming.
    Answered(Response<B>),
    /// No connection could be opened: the node never saw the request, so any retry is safe.
    ConnectFailed(String),
    /// The node did not answer before the attempt's deadline.
    TimedOut,
    /// The connection failed after the request may have been sent.
    Failed(String),
}

/// Largest status document read from a node.
const MAX_STATUS_BYTES: usize = 1 << 20;

type NodeIo = MaybeHttpsStream<TokioIo<TcpStream>>;
type Connector = HttpsConnector<HttpConnector>;

/// One open connection to a node: the sending half and the connection itself, which must be
/// polled for anything to move.
struct NodeConnection {
    sender: http1::SendRequest<Full<Bytes>>,
    connection: http1::Connection<NodeIo, Full<Bytes>>,
    /// When it was last given back, for [`POOL_IDLE_TIMEOUT`].
    idle_since: Instant,
}

impl std::fmt::Debug for NodeConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConnection").finish_non_exhaustive()
    }
}

/// The idle connections to one node, and what every request to it needs.
#[derive(Debug)]
struct NodePool {
    /// The node's URL, parsed once, for connecting.
    uri: Uri,
    /// `Host` of every request to it.
    host: HeaderValue,
    /// Most recently used last.
    #[allow(
        clippy::vec_box,
        reason = "a request takes the connection out and carries it in its futures and body: moving a pointer is cheaper"
    )]
    idle: Mutex<Vec<Box<NodeConnection>>>,
}

impl NodePool {
    fn take(&self) -> Option<Box<NodeConnection>> {
        let mut idle = self.idle.lock();
        while let Some(connection) = idle.pop() {
            if connection.idle_since.elapsed() < POOL_IDLE_TIMEOUT {
                return Some(connection);
            }
        }
        None
    }

    fn give_back(&self, mut connection: Box<NodeConnection>) {
        connection.idle_since = Instant::now();
        let mut idle = self.idle.lock();
        if idle.len() < POOL_MAX_IDLE_PER_NODE {
            idle.push(connection);
        }
    }

    /// Drops the connections idle for longer than [`POOL_IDLE_TIMEOUT`] (the oldest are first).
    fn sweep(&self) {
        let mut idle = self.idle.lock();
        let stale = idle
            .iter()
            .take_while(|c| c.idle_since.elapsed() >= POOL_IDLE_TIMEOUT)
            .count();
        idle.drain(..stale);
    }
}

/// The connections to the nodes. Cheap to clone (everything is shared).
#[derive(Clone, Debug)]
pub struct Upstream {
    /// Opens connections: TCP (with a short timeout), then TLS for `https://` nodes.
    connector: Connector,
    /// Idle connections of the data path, by node URL.
    pools: Arc<Mutex<HashMap<String, Arc<NodePool>>>>,
    /// Pooled client of the rare requests (health checks, membership views).
    client: Client<Connector, Full<Bytes>>,
}

impl Upstream {
    /// Builds the connector (HTTP/1.1, TCP_NODELAY, short connect timeout) and the pools.
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
            .build(connector.clone());
        Upstream {
            connector,
            pools: Arc::new(Mutex::new(HashMap::new())),
            client,
        }
    }

    /// Drops idle connections older than [`POOL_IDLE_TIMEOUT`]; called now and then.
    pub fn sweep(&self) {
        let pools: Vec<Arc<NodePool>> = self.pools.lock().values().cloned().collect();
        for pool in pools {
            pool.sweep();
        }
    }

    fn pool(&self, node_url: &str) -> Result<Arc<NodePool>, ApiError> {
        let mut pools = self.pools.lock();
        if let Some(pool) = pools.get(node_url) {
            return Ok(Arc::clone(pool));
        }
        let uri: Uri = node_url
            .parse()
            .map_err(|e| ApiError::Internal(format!("bad node URL {node_url}: {e}")))?;
        let host = uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .ok_or_else(|| ApiError::Internal(format!("node URL {node_url} has no host")))?;
        let pool = Arc::new(NodePool {
            uri,
            host,
            idle: Mutex::new(Vec::new()),
        });
        pools.insert(node_url.to_owned(), Arc::clone(&pool));
        Ok(pool)
    }

    /// Sends `request` to the node at `node_url` and waits until `deadline` at most for its
    /// head.
    pub async fn send(
        &self,
        node_url: &str,
        request: &BufferedRequest,
        deadline: Instant,
    ) -> Result<Outcome, ApiError> {
        let pool = self.pool(node_url)?;
        let mut outgoing = Request::new(Full::new(request.body.clone()));
        *outgoing.method_mut() = request.method.clone();
        *outgoing.uri_mut() = request.uri.clone();
        let headers = outgoing.headers_mut();
        *headers = request.headers.clone();
        // Replaces the client's `Host`.
        headers.insert(header::HOST, pool.host.clone());
        let attempt = self.exchange(pool, outgoing);
        let deadline = tokio::time::Instant::from_std(deadline);
        Ok(tokio::time::timeout_at(deadline, attempt)
            .await
            .unwrap_or(Outcome::TimedOut))
    }

    /// One exchange on an idle connection (or a new one when none is left or the one taken
    /// turns out closed before the request was written), up to the answer's head.
    async fn exchange(&self, pool: Arc<NodePool>, mut request: Request<Full<Bytes>>) -> Outcome {
        loop {
            let (mut conn, reused) = match pool.take() {
                Some(conn) => (conn, true),
                // Boxed: the connect and handshake futures (TLS state included) would otherwise
                // widen every request's future, which is moved whole into place per request.
                None => match Box::pin(self.connect(&pool.uri)).await {
                    Ok(conn) => (conn, false),
                    Err(reason) => return Outcome::ConnectFailed(reason),
                },
            };
            let NodeConnection {
                sender, connection, ..
            } = &mut *conn;
            match drive(connection, sender.ready()).await {
                Some(Ok(())) => {}
                // Closed by the node while idle: nothing was written, so try another.
                _ if reused => continue,
                Some(Err(e)) => return Outcome::Failed(error_chain(&e)),
                None => return Outcome::Failed("the connection closed".to_owned()),
            }
            let mut send = std::pin::pin!(sender.try_send_request(request));
            let sent = match drive(connection, &mut send).await {
                Some(sent) => sent,
                None => {
                    // The connection ended first (the node closed it or died): dropping it
                    // settles the request, and tells whether it was ever written.
                    drop(conn);
                    match send.as_mut().await {
                        Err(mut e) => match e.take_message() {
                            Some(unsent) if reused => {
                                request = unsent;
                                continue;
                            }
                            // Never written: as safe to send elsewhere as a refused connect.
                            Some(_) => return Outcome::ConnectFailed(error_chain(e.error())),
                            None => return Outcome::Failed(error_chain(e.error())),
                        },
                        Ok(_) => return Outcome::Failed("the connection closed".to_owned()),
                    }
                }
            };
            match sent {
                Ok(response) => {
                    return Outcome::Answered(response.map(|body| ProxyBody {
                        body,
                        connection: Some(conn),
                        pool,
                    }))
                }
                Err(mut e) => match e.take_message() {
                    // Never written: safe to send on another connection.
                    Some(unsent) if reused => request = unsent,
                    _ => return Outcome::Failed(error_chain(e.error())),
                },
            }
        }
    }

    async fn connect(&self, uri: &Uri) -> Result<Box<NodeConnection>, String> {
        let mut connector = self.connector.clone();
        let io = connector
            .call(uri.clone())
            .await
            .map_err(|e| error_chain(e.as_ref()))?;
        let (sender, connection) = http1::handshake(io).await.map_err(|e| error_chain(&e))?;
        // Boxed once per connection, so that requests move a pointer, not the connection.
        Ok(Box::new(NodeConnection {
            sender,
            connection,
            idle_since: Instant::now(),
        }))
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

    async fn attempt(
        &self,
        request: Request<Full<Bytes>>,
        deadline: Duration,
    ) -> Outcome<Incoming> {
        match tokio::time::timeout(deadline, self.client.request(request)).await {
            Err(_) => Outcome::TimedOut,
            Ok(Ok(response)) => Outcome::Answered(response),
            Ok(Err(e)) if e.is_connect() => Outcome::ConnectFailed(error_chain(&e)),
            Ok(Err(e)) => Outcome::Failed(error_chain(&e)),
        }
    }
}

/// Polls `future` and the connection it needs together, in this task. `None` when the
/// connection ended before the future finished.
async fn drive<F: Future>(
    connection: &mut http1::Connection<NodeIo, Full<Bytes>>,
    future: F,
) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut ended = false;
    poll_fn(|cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        if ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut *connection).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => {
                // The connection is over; the future learns it now or never.
                ended = true;
                match future.as_mut().poll(cx) {
                    Poll::Ready(output) => Poll::Ready(Some(output)),
                    Poll::Pending => Poll::Ready(None),
                }
            }
        }
    })
    .await
}

/// A node's answer body on its way to the client. It drives the connection it arrives on
/// (in the client connection's task) and gives that connection back to its node's idle
/// stack once the whole body has passed; a body dropped half-read closes the connection.
pub struct ProxyBody {
    body: Incoming,
    connection: Option<Box<NodeConnection>>,
    pool: Arc<NodePool>,
}

impl std::fmt::Debug for ProxyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyBody").finish_non_exhaustive()
    }
}

impl http_body::Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        let Some(conn) = &mut this.connection else {
            return Poll::Pending;
        };
        match Pin::new(&mut conn.connection).poll(cx) {
            Poll::Pending => {}
            // Over (closed or failed): the body sees the end or the error itself.
            Poll::Ready(_) => this.connection = None,
        }
        Pin::new(&mut this.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            if http_body::Body::is_end_stream(&self.body) {
                self.pool.give_back(connection);
            }
        }
    }
}

/// Prepares a client's headers for a node, with one look at each header and removals (each a
/// lookup) only for what is there: hop-by-hop headers, `Expect` (the body has already been read
/// in full) and the node-to-node headers ([`strip_internal_headers`]) go. `Host` is left for
/// [`Upstream::send`], which sets it from the node's URL (replacing the client's).
pub fn strip_client_headers(headers: &mut HeaderMap) {
    let strip = |name: &HeaderName| {
        HOP_BY_HOP.contains(name) || name == header::EXPECT || is_internal_header(name.as_str())
    };
    if !headers.keys().any(strip) {
        return;
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::EXPECT);
    strip_internal_headers(headers);
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
pub fn into_client_response<B>(mut response: Response<B>) -> Response<B> {
    let headers = response.headers_mut();
    // One look at each header; removals (each a lookup) only when one is there.
    if headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        for name in &HOP_BY_HOP {
            headers.remove(name);
        }
    }
    response
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
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A node that answers every request `ok`; with `close_after_answer` it closes each
    /// connection right after its first answer (as a node whose idle timeout passed).
    /// Returns its URL and the number of connections it accepted.
    async fn counting_node(close_after_answer: bool) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if stream.write_all(answer).await.is_err() || close_after_answer {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (url, accepted)
    }

    fn get(path: &str) -> BufferedRequest {
        BufferedRequest {
            method: Method::GET,
            uri: Uri::try_from(path).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
        }
    }

    async fn body_of(upstream: &Upstream, url: &str) -> Bytes {
        let second = Duration::from_secs(5);
        match upstream
            .send(url, &get("/v1/k"), Instant::now() + second)
            .await
            .unwrap()
        {
            Outcome::Answered(response) => response.into_body().collect().await.unwrap().to_bytes(),
            other => panic!("no answer: {other:?}"),
        }
    }

    fn upstream() -> Upstream {
        Upstream::new(kv_http::tls::client_config(None).unwrap())
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_answer_is_read() {
        let (url, accepted) = counting_node(false).await;
        let upstream = upstream();
        for _ in 0..3 {
            assert_eq!(body_of(&upstream, &url).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_node_closed_while_idle_is_replaced_unseen() {
        let (url, accepted) = counting_node(true).await;
        let upstream = upstream();
        for _ in 0..3 {
            assert_eq!(body_of(&upstream, &url).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_failure() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let outcome = upstream()
            .send(&url, &get("/v1/k"), Instant::now() + Duration::from_secs(5))
            .await
            .unwrap();
        assert!(matches!(outcome, Outcome::ConnectFailed(_)), "{outcome:?}");
    }

    #[test]
    fn client_headers_lose_hop_by_hop_expect_and_internal_ones_only() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("expect", "100-continue"),
            ("x-kv-forwarded", "1"),
            ("x-kv-version", "0000000000000001-00000001"),
            ("x-request-id", "abc"),
            ("authorization", "Bearer t"),
            ("content-type", "application/json"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        strip_client_headers(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                "authorization",
                "content-type",
                "x-kv-version",
                "x-request-id"
            ]
        );
        // Nothing to strip: the map is left as it was.
        let before = headers.clone();
        strip_client_headers(&mut headers);
        assert_eq!(headers, before);
    }

    #[test]
    fn a_node_answer_loses_its_hop_by_hop_headers_only() {
        let mut response = Response::new(());
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert("x-kv-version", HeaderValue::from_static("v"));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let response = into_client_response(response);
        let mut left: Vec<&str> = response.headers().keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-kv-version"]);
        let plain = into_client_response(Response::new(()));
        assert!(plain.headers().is_empty());
    }

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
