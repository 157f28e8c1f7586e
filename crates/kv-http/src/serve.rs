//! The serve loop: accepts connections up to `max_connections` (the rest wait in the kernel's
//! backlog), optionally completes a TLS handshake, and serves each connection with HTTP/1.1
//! keep-alive under three clocks: a request head must arrive within `head_timeout` of its first
//! byte (a slow-loris client is cut off), an idle keep-alive connection is closed after
//! `idle_timeout`, and a head larger than `max_head_bytes` gets 431. On shutdown it stops
//! accepting, closes idle connections, and lets busy ones finish within a grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;
use tracing::{debug, warn};

use crate::connection::{Activity, GuardedBody, RequestGuard, Watched};
use crate::tls::TlsAcceptor;

/// Default deadline for a whole request head, from its first byte (and for a TLS handshake).
pub const DEFAULT_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time an idle keep-alive connection is kept open.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default number of connections served at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default largest request head, in bytes.
pub const DEFAULT_MAX_HEAD_BYTES: usize = 32 * 1024;
/// Shortest time between two looks of a connection's watchdog.
const MIN_LOOK: Duration = Duration::from_millis(1);
/// Pause after a failed `accept` (such as too many open files) before the next one.
const ACCEPT_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Limits of the serve loop.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Largest request head (request line and headers) in bytes; beyond it the answer is 431.
    pub max_head_bytes: usize,
    /// Time allowed to send a whole request head once its first byte arrived, and to complete
    /// a TLS handshake.
    pub head_timeout: Duration,
    /// Time an idle keep-alive connection (no request in flight, no byte of a new one) is kept.
    pub idle_timeout: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_head_bytes: DEFAULT_MAX_HEAD_BYTES,
            head_timeout: DEFAULT_HEAD_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// What the serve loop hands each request to: an axum [`Router`], or a binary's own hot path
/// (kv-lb answers its data routes with hyper directly and passes the rest to a `Router`).
pub trait Handler: Clone + Send + Sync + 'static {
    /// The response body.
    type Body: http_body::Body<Data = Bytes, Error = Self::BodyError> + Send + Unpin + 'static;
    /// The response body's error.
    type BodyError: Into<Box<dyn std::error::Error + Send + Sync>>;

    /// Answers one request that arrived from `peer`.
    fn handle(
        &self,
        request: hyper::Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = hyper::Response<Self::Body>> + Send + use<Self>;
}

impl Handler for Router {
    type Body = Body;
    type BodyError = axum::Error;

    fn handle(
        &self,
        request: hyper::Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = hyper::Response<Body>> + Send + use<> {
        let mut request = request.map(Body::new);
        // The client's address, for handlers that log who sent what.
        request.extensions_mut().insert(ConnectInfo(peer));
        let app = self.clone();
        async move {
            match app.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        }
    }
}

/// Serves `app` on `listener` (over TLS when `tls` is given) until `shutdown` resolves, then
/// stops accepting and waits up to `grace` for open connections to finish their requests.
/// Returns whether they all did.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    app: H,
    limits: ServeLimits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> bool {
    let max_connections = limits.max_connections.max(1);
    let permits = Arc::new(Semaphore::new(max_connections));
    let (stop, stopped) = watch::channel(false);
    let http = Arc::new(http1_builder(&limits));
    tokio::pin!(shutdown);
    loop {
        // Waiting for a permit before accepting leaves extra connections in the backlog.
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_RETRY_PAUSE).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }
        let door = Door {
            app: app.clone(),
            http: Arc::clone(&http),
            limits,
            stop: stopped.clone(),
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => door.serve_connection(stream, peer).await,
                Some(acceptor) => {
                    let handshake = acceptor.accept(stream);
                    match tokio::time::timeout(limits.head_timeout, handshake).await {
                        Ok(Ok(stream)) => door.serve_connection(stream, peer).await,
                        Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake not done in time"),
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    // Receivers see the change even if they subscribed after it: none is missed.
    let _ = stop.send(true);
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(grace, permits.acquire_many(all))
        .await
        .is_ok();
    drained
}

fn http1_builder(limits: &ServeLimits) -> http1::Builder {
    let mut http = http1::Builder::new();
    // hyper's own head timer also runs on idle connections; ours are finer (see `Door`), so
    // hyper's only backs them up.
    let backstop = limits.head_timeout.max(limits.idle_timeout) + Duration::from_secs(1);
    http.timer(TokioTimer::new())
        .header_read_timeout(backstop)
        .max_buf_size(limits.max_head_bytes.max(8192))
        .keep_alive(true);
    http
}

/// What one connection task needs.
struct Door<H> {
    app: H,
    http: Arc<http1::Builder>,
    limits: ServeLimits,
    stop: watch::Receiver<bool>,
}

impl<H: Handler> Door<H> {
    /// Serves one connection until the client closes it, a deadline of [`ServeLimits`] passes
    /// (the connection is dropped), or shutdown drains it.
    async fn serve_connection<S>(mut self, stream: S, peer: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Activity::new();
        let io = TokioIo::new(Watched::new(stream, Arc::clone(&activity)));
        let (app, requests) = (self.app.clone(), Arc::clone(&activity));
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let guard = RequestGuard::new(Arc::clone(&requests));
            let answer = app.handle(request, peer);
            async move {
                let response = answer.await;
                Ok::<_, std::convert::Infallible>(
                    response.map(|body| GuardedBody::new(body, guard)),
                )
            }
        });
        let connection = self.http.serve_connection(io, service);
        tokio::pin!(connection);
        let mut draining = *self.stop.borrow();
        if draining {
            connection.as_mut().graceful_shutdown();
        }
        // One watchdog timer per connection, never re-armed per request: it wakes at the
        // connection's deadline, and never later than one head timeout from its last look, so
        // a head that starts in between is caught exactly at its own deadline (the look after
        // it finds the head's deadline ahead and sleeps until then).
        let (head_timeout, idle_timeout) = (self.limits.head_timeout, self.limits.idle_timeout);
        let next_look = |now: tokio::time::Instant| {
            let limit = now + head_timeout.max(MIN_LOOK);
            activity
                .deadline(head_timeout, idle_timeout)
                .map_or(limit, |deadline| deadline.min(limit))
        };
        let watchdog = tokio::time::sleep_until(next_look(tokio::time::Instant::now()));
        tokio::pin!(watchdog);
        loop {
            tokio::select! {
                ended = connection.as_mut() => {
                    if let Err(e) = ended {
                        debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                () = &mut watchdog => {
                    let now = tokio::time::Instant::now();
                    let current = activity.deadline(head_timeout, idle_timeout);
                    if current.is_some_and(|d| d <= now) {
                        debug!("closing a connection: idle, or its request head is late");
                        return;
                    }
                    watchdog.as_mut().reset(next_look(now));
                }
                changed = self.stop.changed(), if !draining => {
                    draining = true;
                    if changed.is_ok() {
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::time::Instant;

    const HEAD: Duration = Duration::from_millis(300);
    const IDLE: Duration = Duration::from_millis(900);

    async fn start(max_connections: usize) -> (std::net::SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", get(|| async { "hello" }));
        let limits = ServeLimits {
            max_connections,
            max_head_bytes: 8192,
            head_timeout: HEAD,
            idle_timeout: IDLE,
        };
        let (stop, mut stopped) = watch::channel(false);
        let shutdown = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        tokio::spawn(serve(
            listener,
            app,
            limits,
            None,
            shutdown,
            Duration::from_secs(1),
        ));
        (addr, stop)
    }

    /// Reads until the server closes the connection; returns what it sent and when it closed.
    async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (String, Duration) {
        let started = Instant::now();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let left = within.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
                Err(_) => panic!("still open after {within:?}"),
            }
        }
        (
            String::from_utf8_lossy(&seen).into_owned(),
            started.elapsed(),
        )
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    #[tokio::test]
    async fn keep_alive_serves_requests_then_closes_when_idle() {
        let (addr, _stop) = start(8).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        for _ in 0..2 {
            stream.write_all(GET).await.unwrap();
            let mut buf = [0u8; 1024];
            let n = stream.read(&mut buf).await.unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).ends_with("hello"));
        }
        let (_, after) = read_until_closed(&mut stream, IDLE * 4).await;
        assert!(
            after >= IDLE - Duration::from_millis(50),
            "closed too early: {after:?}"
        );
    }

    #[tokio::test]
    async fn a_half_sent_head_is_cut_at_the_head_deadline() {
        let (addr, _stop) = start(8).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let (_, after) = read_until_closed(&mut stream, IDLE).await;
        assert!(
            after < IDLE,
            "the head deadline, not the idle one: {after:?}"
        );
        assert!(
            after >= HEAD - Duration::from_millis(50),
            "closed too early: {after:?}"
        );
    }

    #[tokio::test]
    async fn a_head_half_sent_after_a_request_is_cut_at_its_own_deadline() {
        let (addr, _stop) = start(8).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(GET).await.unwrap();
        let mut buf = [0u8; 1024];
        assert!(stream.read(&mut buf).await.unwrap() > 0);
        tokio::time::sleep(HEAD / 3).await;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let (_, after) = read_until_closed(&mut stream, IDLE * 2).await;
        assert!(
            after >= HEAD - Duration::from_millis(50),
            "closed too early: {after:?}"
        );
        assert!(
            after < HEAD + HEAD / 2,
            "the head's own deadline, not the next look: {after:?}"
        );
    }

    #[tokio::test]
    async fn an_oversized_head_gets_431() {
        let (addr, _stop) = start(8).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let big = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(20_000)
        );
        let _ = stream.write_all(big.as_bytes()).await;
        let (answer, _) = read_until_closed(&mut stream, IDLE * 4).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_wait_and_shutdown_closes_idle_ones() {
        let (addr, stop) = start(1).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        first.write_all(GET).await.unwrap();
        let mut buf = [0u8; 1024];
        assert!(first.read(&mut buf).await.unwrap() > 0);
        let mut second = TcpStream::connect(addr).await.unwrap();
        second.write_all(GET).await.unwrap();
        let waited = tokio::time::timeout(HEAD / 2, second.read(&mut buf)).await;
        assert!(waited.is_err(), "the second connection waits for a permit");
        stop.send(true).unwrap();
        let (_, after) = read_until_closed(&mut first, HEAD).await;
        assert!(after < HEAD, "an idle connection closes at shutdown");
    }
}
