//! The quorum paths to one peer, on plain hyper: one keep-alive HTTP/1.1 connection per peer and
//! call kind (per in-flight slot), owned and driven by one task, that takes every call queued for
//! the peer when it is free and sends them as one request: reads as one `/internal/versions`
//! (digest) or `/internal/entries` call, replicated writes as one `/internal/replicate` call.
//!
//! The general peer client (reqwest, behind a [`Coalescer`](crate::coalesce::Coalescer)) costs a
//! call six task wake-ups on the coordinator (the spawned call, the coalescer's sender, the
//! pool's connection task and the three answers back) plus a URL parse and a pool checkout per
//! call. Here a call costs two: the caller queues its item and wakes a connection task, which
//! writes the request, reads the answer on the same task and hands each caller its answer
//! through a oneshot. Batching works as in the coalescer: at most [`LaneKind::IN_FLIGHT`] calls
//! per peer in flight, every call that arrives meanwhile leaves with the next one (at most
//! [`MAX_BATCH`], and within [`LaneKind::MAX_BYTES`] by [`LaneKind::weigh`], a heavier item
//! alone), and at most [`MAX_QUEUED`] wait; more fail at once.
//!
//! Every kind served here is safe to send twice: reads change nothing, and a replicated record
//! carries its version, so applying it again stores nothing new and answers the same held
//! version (hints and resends send the same records again too). So a call that fails on a
//! connection that was idle (the peer may have closed it) is sent again once on a fresh
//! connection before the callers see an error. For a kind that changes the peer
//! ([`LaneKind::CHANGES_PEER`]), a connect failure on that second try is reported as
//! [`CallError::Failed`], not [`CallError::Connect`], when the first try may have reached the
//! peer: `Connect` promises that the peer cannot have applied anything. Only `http://` peers use
//! this path; `https://` peers keep the reqwest client (and its TLS).

use crate::coalesce::{MAX_BATCH, MAX_QUEUED};
use crate::peer::{
    CallError, BATCH_REQUEST_IDS_HEADER, MAX_BATCH_BYTES, REQUEST_ID_HEADER, SECRET_HEADER,
};
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{oneshot, Notify};

/// A connection unused this long is closed (its task stays, and connects again when needed).
const IDLE_CLOSE: Duration = Duration::from_secs(60);

/// What one kind of call sends and how its answer is read.
pub(crate) trait LaneKind: Send + Sync + 'static {
    /// One caller's part of a call (a key to read, a record to replicate).
    type Item: Send + Sync + 'static;
    /// One caller's answer.
    type Answer: Send + 'static;
    /// The path called (`/internal/entries`, `/internal/versions`, `/internal/replicate`).
    const PATH: &'static str;
    /// What the items are, for errors ("reads", "writes").
    const WHAT: &'static str;
    /// Calls one peer may have in flight (one connection task each).
    const IN_FLIGHT: usize;
    /// Whether a call changes the peer (see the module documentation).
    const CHANGES_PEER: bool;
    /// Whether a 404 answer means the peer predates the path ([`CallError::Unsupported`]).
    const UNSUPPORTED_ON_404: bool;
    /// Most bytes of items (by [`weigh`](LaneKind::weigh)) in one call; one heavier item goes
    /// alone.
    const MAX_BYTES: usize = usize::MAX;
    /// The weight of an item towards [`MAX_BYTES`](LaneKind::MAX_BYTES).
    fn weigh(_item: &Self::Item) -> usize {
        0
    }
    /// The request body for these items, and a header to send with it, if any.
    fn encode(items: &[Self::Item]) -> (Bytes, Option<(HeaderName, HeaderValue)>);
    /// The answers, one per item, in order; a body that does not fit the items is an error.
    fn decode(items: &[Self::Item], body: &[u8]) -> Result<Vec<Self::Answer>, String>;
}

/// How lane tasks reach and authenticate to peers.
#[derive(Debug, Clone)]
pub(crate) struct LaneConfig {
    /// `x-kv-secret` of every call.
    pub secret: Option<HeaderValue>,
    /// Bound on one TCP connect.
    pub connect_timeout: Duration,
    /// Bound on one call, connecting included.
    pub request_timeout: Duration,
    /// Source address of the connections.
    pub local_address: Option<IpAddr>,
}

/// One queued call.
struct Call<I, A> {
    item: I,
    request_id: Arc<str>,
    reply: oneshot::Sender<Result<A, CallError>>,
}

/// The calls waiting for one peer, and the signal that wakes a free connection task.
struct Lane<I, A> {
    queue: Mutex<VecDeque<Call<I, A>>>,
    ready: Notify,
}

/// A peer's lane, or `None` for a peer not served here.
type MaybeLane<I, A> = Option<Arc<Lane<I, A>>>;

/// Each peer's lane of one call kind (`None` for a peer not served here).
type LaneMap<K> = HashMap<Arc<str>, MaybeLane<<K as LaneKind>::Item, <K as LaneKind>::Answer>>;

/// The lanes of one call kind, one per `http://` peer, created on first use.
pub(crate) struct Lanes<K: LaneKind> {
    config: Arc<LaneConfig>,
    lanes: Mutex<LaneMap<K>>,
}

impl<K: LaneKind> Lanes<K> {
    pub(crate) fn new(config: Arc<LaneConfig>) -> Self {
        Lanes {
            config,
            lanes: Mutex::new(HashMap::new()),
        }
    }

    /// Sends `item` to `peer`, merged with the other calls waiting for it; gives `item` back
    /// when `peer` is not served here (not a plain `http://` URL). The call is sent by the
    /// lane's tasks, so it completes (and keeps the connection usable) even when this future is
    /// dropped.
    pub(crate) async fn call(
        &self,
        peer: &Arc<str>,
        item: K::Item,
        request_id: Arc<str>,
    ) -> Result<Result<K::Answer, CallError>, K::Item> {
        let Some(lane) = self.lane(peer) else {
            return Err(item);
        };
        Ok(Self::call_on(&lane, peer, item, request_id).await)
    }

    async fn call_on(
        lane: &Lane<K::Item, K::Answer>,
        peer: &Arc<str>,
        item: K::Item,
        request_id: Arc<str>,
    ) -> Result<K::Answer, CallError> {
        let (reply, answer) = oneshot::channel();
        {
            let mut queue = lane.queue.lock();
            if queue.len() >= MAX_QUEUED {
                return Err(CallError::Failed {
                    peer: peer.to_string(),
                    reason: format!("{MAX_QUEUED} {} already wait for this peer", K::WHAT),
                });
            }
            queue.push_back(Call {
                item,
                request_id,
                reply,
            });
        }
        lane.ready.notify_one();
        answer.await.unwrap_or_else(|_| {
            Err(CallError::Failed {
                peer: peer.to_string(),
                reason: format!("the {} lane stopped", K::WHAT),
            })
        })
    }

    /// The lane of `peer`, made (with its tasks) on first use; `None` for a peer not served here
    /// (remembered too, so its URL is parsed once).
    fn lane(&self, peer: &Arc<str>) -> MaybeLane<K::Item, K::Answer> {
        let mut lanes = self.lanes.lock();
        if let Some(lane) = lanes.get(peer) {
            return lane.clone();
        }
        let Ok(target) = Target::parse(peer) else {
            lanes.insert(peer.clone(), None);
            return None;
        };
        let lane = Arc::new(Lane {
            queue: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
        });
        let workers = K::IN_FLIGHT.max(1);
        for _ in 0..workers {
            let worker = Worker::<K> {
                workers,
                lane: lane.clone(),
                peer: peer.clone(),
                target: target.clone(),
                config: self.config.clone(),
                conn: None,
            };
            tokio::spawn(worker.run());
        }
        lanes.insert(peer.clone(), Some(lane.clone()));
        Some(lane)
    }
}

/// How many calls at the head of `queue` make the next one: at most [`MAX_BATCH`], and no more
/// than [`LaneKind::MAX_BYTES`] by weight unless the first item alone is heavier.
fn batch_len<K: LaneKind>(queue: &VecDeque<Call<K::Item, K::Answer>>) -> usize {
    if K::MAX_BYTES == usize::MAX {
        return queue.len().min(MAX_BATCH);
    }
    let mut bytes = 0usize;
    let mut take = 0;
    for call in queue.iter().take(MAX_BATCH) {
        bytes = bytes.saturating_add(K::weigh(&call.item));
        if take > 0 && bytes > K::MAX_BYTES {
            break;
        }
        take += 1;
    }
    take
}

/// Where a peer listens: its host (for the connect and the `Host` header) and port.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    host: String,
    port: u16,
    authority: HeaderValue,
}

impl Target {
    fn parse(peer: &str) -> Result<Target, String> {
        let url = url::Url::parse(peer).map_err(|e| format!("bad peer URL {peer:?}: {e}"))?;
        if url.scheme() != "http" {
            return Err(format!("{peer:?} is not an http:// URL"));
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(format!("{peer:?} has no host")),
        };
        let port = url.port_or_known_default().unwrap_or(80);
        let authority = HeaderValue::from_str(
            url[url::Position::BeforeHost..url::Position::AfterPort].as_ref(),
        )
        .map_err(|_| format!("{peer:?}: host is not a header value"))?;
        Ok(Target {
            host,
            port,
            authority,
        })
    }
}

type Driver = Pin<Box<http1::Connection<TokioIo<TcpStream>, Full<Bytes>>>>;

/// One open connection: the request handle and the connection future this task drives.
struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    driver: Driver,
}

/// One connection task of a lane.
struct Worker<K: LaneKind> {
    /// The lane's connection tasks, this one included.
    workers: usize,
    lane: Arc<Lane<K::Item, K::Answer>>,
    peer: Arc<str>,
    target: Target,
    config: Arc<LaneConfig>,
    conn: Option<Conn>,
}

/// Why one exchange failed, and whether the connection could have been stale.
struct Failure {
    error: CallError,
    /// The peer may never have seen the request on a reused connection: worth one retry.
    retry: bool,
    /// The request may have reached the peer (it was not refused before being written).
    maybe_sent: bool,
}

impl<K: LaneKind> Worker<K> {
    async fn run(mut self) {
        loop {
            let calls: Vec<Call<K::Item, K::Answer>> = {
                let mut queue = self.lane.queue.lock();
                let take = batch_len::<K>(&queue);
                queue.drain(..take).collect()
            };
            if calls.is_empty() {
                let idle = tokio::time::timeout(IDLE_CLOSE, self.lane.ready.notified()).await;
                if idle.is_err() {
                    self.conn = None;
                    if Arc::strong_count(&self.lane) <= self.workers {
                        // Only the lane's own tasks still hold it: its client is gone.
                        return;
                    }
                }
                continue;
            }
            let mut items = Vec::with_capacity(calls.len());
            let mut ids = Vec::with_capacity(calls.len());
            let mut replies = Vec::with_capacity(calls.len());
            for call in calls {
                items.push(call.item);
                ids.push(call.request_id);
                replies.push(call.reply);
            }
            match self.call(&items, &ids).await {
                Ok(answers) if answers.len() == replies.len() => {
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(Ok(answer));
                    }
                }
                Ok(answers) => {
                    let error = CallError::Failed {
                        peer: self.peer.to_string(),
                        reason: format!("{} answers to a batch of {}", answers.len(), items.len()),
                    };
                    for reply in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
            // Wake a sibling task for calls left queued (a batch cut by its caps).
            if self.workers > 1 && !self.lane.queue.lock().is_empty() {
                self.lane.ready.notify_one();
            }
        }
    }

    /// One call for `items`, within the request deadline; once more on a fresh connection when
    /// a reused one failed.
    async fn call(
        &mut self,
        items: &[K::Item],
        ids: &[Arc<str>],
    ) -> Result<Vec<K::Answer>, CallError> {
        let (body, header) = K::encode(items);
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let peer = self.peer.clone();
        let timed_out = || CallError::Failed {
            peer: peer.to_string(),
            reason: "the peer did not answer in time".into(),
        };
        let first = tokio::time::timeout_at(
            deadline,
            self.exchange(items, ids, body.clone(), header.clone()),
        )
        .await;
        let failure = match first {
            Ok(Ok(answers)) => return Ok(answers),
            Ok(Err(failure)) => failure,
            Err(_) => {
                self.conn = None;
                return Err(timed_out());
            }
        };
        self.conn = None;
        if !failure.retry {
            return Err(failure.error);
        }
        let again = tokio::time::timeout_at(deadline, self.exchange(items, ids, body, header));
        match again.await {
            Ok(Ok(answers)) => Ok(answers),
            Ok(Err(second)) => {
                self.conn = None;
                match second.error {
                    // The first try may have changed the peer: not a "cannot have applied".
                    CallError::Connect { peer, reason }
                        if K::CHANGES_PEER && failure.maybe_sent =>
                    {
                        Err(CallError::Failed {
                            peer,
                            reason: format!("{} (cannot connect again: {reason})", failure.error),
                        })
                    }
                    error => Err(error),
                }
            }
            Err(_) => {
                self.conn = None;
                Err(timed_out())
            }
        }
    }

    async fn exchange(
        &mut self,
        items: &[K::Item],
        ids: &[Arc<str>],
        body: Bytes,
        header: Option<(HeaderName, HeaderValue)>,
    ) -> Result<Vec<K::Answer>, Failure> {
        let reused = self.conn.is_some();
        let peer = self.peer.clone();
        let fail = |reason: String, retry: bool| Failure {
            error: CallError::Failed {
                peer: peer.to_string(),
                reason,
            },
            retry: retry && reused,
            maybe_sent: true,
        };
        if self.conn.is_none() {
            self.conn = Some(self.connect().await.map_err(|error| Failure {
                error,
                retry: false,
                maybe_sent: false,
            })?);
        }
        let request = self.request(ids, body, header).map_err(|e| Failure {
            maybe_sent: false,
            ..fail(e, false)
        })?;
        let Some(conn) = self.conn.as_mut() else {
            return Err(Failure {
                maybe_sent: false,
                ..fail("no connection".into(), false)
            });
        };
        let mut send = Box::pin(conn.sender.send_request(request));
        let response = match drive(&mut conn.driver, &mut send).await {
            Some(response) => response,
            None => {
                // The connection ended first (the peer closed it, or died): drop it, which
                // settles the request it may still hold, and the next call connects again.
                self.conn = None;
                send.await
            }
        };
        let response = response.map_err(|e| Failure {
            // Canceled: the connection closed before the request was written.
            maybe_sent: !e.is_canceled(),
            ..fail(e.to_string(), true)
        })?;
        let status = response.status();
        let mut body = Box::pin(Limited::new(response.into_body(), MAX_BATCH_BYTES).collect());
        let collected = match self.conn.as_mut() {
            Some(conn) => match drive(&mut conn.driver, &mut body).await {
                Some(collected) => collected,
                None => {
                    self.conn = None;
                    body.await
                }
            },
            None => body.await,
        };
        let bytes = collected
            .map_err(|e| fail(e.to_string(), false))?
            .to_bytes();
        if status == StatusCode::NOT_FOUND && K::UNSUPPORTED_ON_404 {
            return Err(Failure {
                error: CallError::Unsupported {
                    peer: self.peer.to_string(),
                    path: K::PATH,
                },
                retry: false,
                maybe_sent: true,
            });
        }
        if status != StatusCode::OK {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
            return Err(fail(
                format!("{} answered {status}: {text}", K::PATH),
                false,
            ));
        }
        K::decode(items, &bytes).map_err(|e| fail(e, false))
    }

    fn request(
        &self,
        ids: &[Arc<str>],
        body: Bytes,
        header: Option<(HeaderName, HeaderValue)>,
    ) -> Result<Request<Full<Bytes>>, String> {
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(K::PATH)
            .header(HOST, self.target.authority.clone())
            .header(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
        if let Some(secret) = &self.config.secret {
            builder = builder.header(SECRET_HEADER, secret.clone());
        }
        if let Some(Ok(first)) = ids.first().map(|id| HeaderValue::from_str(id)) {
            builder = builder.header(REQUEST_ID_HEADER, first);
        }
        if ids.len() > 1 {
            let joined = ids.iter().map(|id| &**id).collect::<Vec<_>>().join(",");
            if let Ok(value) = HeaderValue::from_str(&joined) {
                builder = builder.header(BATCH_REQUEST_IDS_HEADER, value);
            }
        }
        if let Some((name, value)) = header {
            builder = builder.header(name, value);
        }
        builder.body(Full::new(body)).map_err(|e| e.to_string())
    }

    /// A new connection to the peer, within the connect deadline.
    async fn connect(&self) -> Result<Conn, CallError> {
        let connect_error = |reason: String| CallError::Connect {
            peer: self.peer.to_string(),
            reason,
        };
        let stream = tokio::time::timeout(self.config.connect_timeout, self.tcp())
            .await
            .map_err(|_| connect_error("connect timed out".into()))?
            .map_err(connect_error)?;
        let _ = stream.set_nodelay(true);
        let (sender, driver) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        Ok(Conn {
            sender,
            driver: Box::pin(driver),
        })
    }

    async fn tcp(&self) -> Result<TcpStream, String> {
        let addrs: Vec<SocketAddr> =
            tokio::net::lookup_host((self.target.host.as_str(), self.target.port))
                .await
                .map_err(|e| format!("cannot resolve {}: {e}", self.target.host))?
                .collect();
        let mut last = format!("{} resolves to no address", self.target.host);
        for addr in addrs {
            let socket = match addr {
                SocketAddr::V4(_) => TcpSocket::new_v4(),
                SocketAddr::V6(_) => TcpSocket::new_v6(),
            }
            .map_err(|e| e.to_string())?;
            if let Some(ip) = self.config.local_address {
                if ip.is_ipv4() != addr.is_ipv4() {
                    continue;
                }
                socket
                    .bind(SocketAddr::new(ip, 0))
                    .map_err(|e| format!("cannot bind {ip}: {e}"))?;
            }
            match socket.connect(addr).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(last)
    }
}

/// Polls `fut` while driving the connection it needs; `None` when the connection ended first
/// (the peer closed it, maybe right after its last answer, or died). The caller must then drop
/// the connection before polling `fut` on: an ended connection that is still held keeps the
/// request it had not sent, and `fut` would wait for it until the deadline.
async fn drive<F: Future + Unpin>(driver: &mut Driver, fut: &mut F) -> Option<F::Output> {
    tokio::select! {
        biased;
        out = fut => Some(out),
        _ = driver.as_mut() => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::{decode_keys, encode_entries, EntriesRead};
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use kv_core::{Record, Version};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    #[test]
    fn only_plain_http_peers_with_a_host_are_served() {
        let t = Target::parse("http://127.0.0.1:7001").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 7001));
        assert_eq!(t.authority, "127.0.0.1:7001");
        let t = Target::parse("http://kv-1").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("kv-1", 80));
        assert_eq!(t.authority, "kv-1");
        let t = Target::parse("http://[::1]:9/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9));
        assert_eq!(t.authority, "[::1]:9");
        assert!(Target::parse("https://127.0.0.1:7001").is_err());
        assert!(Target::parse("not a url").is_err());
        assert!(Target::parse("").is_err());
    }

    fn record(key: &str) -> Record {
        Record {
            key: key.to_owned(),
            version: Version { hlc: 9, node: 1 },
            value: Some(Bytes::from_static(b"1")),
            expires_at_ms: None,
        }
    }

    /// A fake peer: answers `/internal/entries` with an entry for keys starting with `k`, none
    /// for others, bytes that decode to nothing for the key `bad`; 401 without the secret. With
    /// `one_shot` it closes every connection after one answer. Counts its requests; the tasks
    /// serving its connections are kept, so a test can cut them.
    /// Serves `answer` on a free loopback port for the rest of the test; with `one_shot` every
    /// connection closes after one answer. The URL, and the tasks serving its connections (kept,
    /// so a test can cut them).
    async fn serve_fake<F, Fut>(one_shot: bool, answer: F) -> (String, Served)
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<hyper::Response<Full<Bytes>>, hyper::Error>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let served = Served::default();
        let connections = served.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let connection = hyper::server::conn::http1::Builder::new()
                    .keep_alive(!one_shot)
                    .serve_connection(TokioIo::new(stream), service_fn(answer.clone()));
                connections.lock().push(tokio::spawn(async move {
                    let _ = connection.await;
                }));
            }
        });
        (url, served)
    }

    async fn fake_peer(one_shot: bool) -> (String, Arc<AtomicUsize>, Served) {
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        let (url, served) = serve_fake(one_shot, move |request: Request<Incoming>| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                let authorised = request.headers().get(SECRET_HEADER)
                    == Some(&HeaderValue::from_static("s3cret"));
                let path_ok = request.uri().path() == EntriesRead::PATH;
                let body = request.into_body().collect().await?.to_bytes();
                let keys = decode_keys(&body, 100).unwrap_or_default();
                let mut response =
                    hyper::Response::new(Full::new(if keys.iter().any(|k| k == "bad") {
                        Bytes::from_static(b"\x01\x00\x00\x00junk")
                    } else {
                        let entries: Vec<_> = keys
                            .iter()
                            .map(|k| k.starts_with('k').then(|| record(k)))
                            .collect();
                        encode_entries(&entries)
                    }));
                if !authorised || !path_ok {
                    *response.status_mut() = StatusCode::UNAUTHORIZED;
                }
                Ok::<_, hyper::Error>(response)
            }
        })
        .await;
        (url, requests, served)
    }

    /// The tasks serving a fake peer's connections.
    type Served = Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>;

    /// Lanes of kind `K` that send `secret` as the cluster secret.
    /// The URL of a loopback port that nothing listens on (bound, then released).
    fn unreachable_peer() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    }

    fn lanes_of<K: LaneKind>(secret: &'static str) -> Arc<Lanes<K>> {
        Arc::new(Lanes::new(Arc::new(LaneConfig {
            secret: Some(HeaderValue::from_static(secret)),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            local_address: None,
        })))
    }

    async fn read(
        lanes: &Lanes<EntriesRead>,
        peer: &str,
        key: &str,
    ) -> Result<Option<Record>, CallError> {
        lanes
            .call(&Arc::from(peer), key.to_owned(), Arc::from("rid"))
            .await
            .expect("an http:// peer is served")
    }

    #[tokio::test]
    async fn reads_get_their_own_entries_and_concurrent_ones_share_calls() {
        let (peer, requests, _) = fake_peer(false).await;
        let lanes = lanes("s3cret");
        assert_eq!(read(&lanes, &peer, "k1").await.unwrap(), Some(record("k1")));
        assert_eq!(read(&lanes, &peer, "x1").await.unwrap(), None);
        let calls: Vec<_> = (0..200)
            .map(|i| {
                let (lanes, peer) = (lanes.clone(), peer.clone());
                tokio::spawn(async move {
                    let key = if i % 2 == 0 {
                        format!("k{i}")
                    } else {
                        format!("x{i}")
                    };
                    let got = read(&lanes, &peer, &key).await.unwrap();
                    assert_eq!(got, (i % 2 == 0).then(|| record(&key)), "{key}");
                })
            })
            .collect();
        for call in calls {
            call.await.unwrap();
        }
        let sent = requests.load(Ordering::SeqCst);
        assert!(
            sent < 2 + 200,
            "{sent} requests for 202 reads: nothing merged"
        );
    }

    #[tokio::test]
    async fn a_bad_answer_or_a_refusal_is_an_error_and_the_lane_goes_on() {
        let (peer, _, _) = fake_peer(false).await;
        let good = lanes("s3cret");
        assert!(read(&good, &peer, "bad").await.is_err());
        assert_eq!(read(&good, &peer, "k2").await.unwrap(), Some(record("k2")));
        let wrong = lanes("wrong");
        let refused = read(&wrong, &peer, "k2").await.unwrap_err();
        assert!(refused.to_string().contains("401"), "{refused}");
        assert!(!refused.is_connect());
    }

    #[tokio::test]
    async fn a_connection_the_peer_closed_is_replaced_without_an_error() {
        let (peer, requests, _) = fake_peer(true).await;
        let lanes = lanes("s3cret");
        for i in 0..5 {
            let key = format!("k{i}");
            assert_eq!(read(&lanes, &peer, &key).await.unwrap(), Some(record(&key)));
        }
        assert!(requests.load(Ordering::SeqCst) >= 5);
    }

    #[tokio::test]
    async fn a_connection_the_peer_dropped_while_idle_is_replaced_at_once() {
        // A peer killed and restarted drops the lane's idle connection. The next read must not
        // wait for the request deadline (5 s here) on the dead connection.
        let (peer, _, served) = fake_peer(false).await;
        let lanes = lanes("s3cret");
        assert_eq!(read(&lanes, &peer, "k1").await.unwrap(), Some(record("k1")));
        for connection in served.lock().drain(..) {
            connection.abort();
        }
        let again = tokio::time::timeout(Duration::from_secs(1), read(&lanes, &peer, "k2"))
            .await
            .expect("answered well before the request deadline");
        assert_eq!(again.unwrap(), Some(record("k2")));
    }

    #[tokio::test]
    async fn an_unreachable_peer_is_a_connect_error_and_https_is_not_served_here() {
        let peer = unreachable_peer();
        let lanes = lanes("s3cret");
        let error = read(&lanes, &peer, "k1").await.unwrap_err();
        assert!(error.is_connect(), "{error}");
        let https: Arc<str> = Arc::from("https://127.0.0.1:1");
        let refused = lanes.call(&https, "k1".to_owned(), Arc::from("r")).await;
        assert!(
            matches!(refused, Err(k) if k == "k1"),
            "the item comes back"
        );
    }

    // ---- The write kind: `/internal/replicate` over a lane. ----

    use crate::peer::{decode_batch, ReplicateAnswer, ReplicateItem, ReplicateWrite};
    use crate::recent_writes::{decode_write_ids, WriteId, BATCH_WRITE_IDS_HEADER};

    /// How a fake replica answers `/internal/replicate`.
    #[derive(Clone, Copy, PartialEq)]
    enum Replica {
        /// Applies each record that is newer than what it holds, answers the held versions.
        Honest,
        /// Applies, then answers 507 (its disk filled before the commit, say).
        Refuses,
        /// Answers 200 with one held version fewer than the records sent.
        Short,
        /// Answers 200 with a body that is not a replication answer.
        Garbage,
    }

    /// What a fake replica saw: its entries, the requests, and the write ids of each batch.
    #[derive(Default)]
    struct Seen {
        held: HashMap<String, Version>,
        requests: usize,
        write_ids: Vec<Option<WriteId>>,
        request_ids: Vec<String>,
    }

    async fn fake_replica(mode: Replica, one_shot: bool) -> (String, Arc<Mutex<Seen>>, Served) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let state = seen.clone();
        let (url, served) = serve_fake(one_shot, move |request: Request<Incoming>| {
            let state = state.clone();
            async move {
                let authorised = request.headers().get(SECRET_HEADER)
                    == Some(&HeaderValue::from_static("s3cret"));
                let path_ok = request.uri().path() == ReplicateWrite::PATH;
                let header = |name: &str| {
                    request
                        .headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                let ids = header(BATCH_WRITE_IDS_HEADER);
                let rids = header(BATCH_REQUEST_IDS_HEADER)
                    .or_else(|| header(REQUEST_ID_HEADER))
                    .unwrap_or_default();
                let body = request.into_body().collect().await?.to_bytes();
                let records = decode_batch(&body).unwrap_or_default();
                let mut seen = state.lock();
                seen.requests += 1;
                seen.request_ids.extend(rids.split(',').map(str::to_owned));
                match ids {
                    Some(ids) => seen
                        .write_ids
                        .extend(decode_write_ids(&ids, records.len()).unwrap()),
                    None => seen.write_ids.extend(records.iter().map(|_| None)),
                }
                let mut held = Vec::new();
                for record in &records {
                    let now = seen.held.entry(record.key.clone()).or_insert(Version::ZERO);
                    *now = (*now).max(record.version);
                    held.push(now.to_string());
                }
                if mode == Replica::Short {
                    held.pop();
                }
                let answer = ReplicateAnswer {
                    applied: records.len(),
                    held: Some(held),
                };
                let body = match mode {
                    Replica::Garbage => Bytes::from_static(b"{\"applied\": \"many\"}"),
                    _ => Bytes::from(serde_json::to_vec(&answer).unwrap()),
                };
                let mut response = hyper::Response::new(Full::new(body));
                if !authorised || !path_ok {
                    *response.status_mut() = StatusCode::UNAUTHORIZED;
                } else if mode == Replica::Refuses {
                    *response.status_mut() = StatusCode::INSUFFICIENT_STORAGE;
                }
                Ok::<_, hyper::Error>(response)
            }
        })
        .await;
        (url, seen, served)
    }

    fn lanes(secret: &'static str) -> Arc<Lanes<EntriesRead>> {
        lanes_of(secret)
    }

    fn write_lanes(secret: &'static str) -> Arc<Lanes<ReplicateWrite>> {
        lanes_of(secret)
    }

    fn versioned(key: &str, hlc: u64) -> Record {
        Record {
            version: Version { hlc, node: 1 },
            ..record(key)
        }
    }

    async fn write(
        lanes: &Lanes<ReplicateWrite>,
        peer: &str,
        item: ReplicateItem,
    ) -> Result<Version, CallError> {
        lanes
            .call(&Arc::from(peer), item, Arc::from("wid"))
            .await
            .expect("an http:// peer is served")
    }

    #[tokio::test]
    async fn writes_share_calls_and_each_gets_the_version_its_replica_holds() {
        let (peer, seen, _) = fake_replica(Replica::Honest, false).await;
        let lanes = write_lanes("s3cret");
        let stored = write(&lanes, &peer, (versioned("a", 5), Some(WriteId(7)))).await;
        assert_eq!(stored.unwrap(), Version { hlc: 5, node: 1 });
        // An older record is not applied: the answer is the newer version the replica holds,
        // never the record's own, so the coordinator cannot count it as stored.
        let older = write(&lanes, &peer, (versioned("a", 3), None)).await;
        assert_eq!(older.unwrap(), Version { hlc: 5, node: 1 });
        // Sent again (a resend), the same record is answered as held.
        let again = write(&lanes, &peer, (versioned("a", 5), None)).await;
        assert_eq!(again.unwrap(), Version { hlc: 5, node: 1 });
        let calls: Vec<_> = (0..200u64)
            .map(|i| {
                let (lanes, peer) = (lanes.clone(), peer.clone());
                tokio::spawn(async move {
                    let id = (i % 2 == 0).then_some(WriteId(i));
                    let held = write(&lanes, &peer, (versioned(&format!("k{i}"), 10 + i), id));
                    assert_eq!(
                        held.await.unwrap(),
                        Version {
                            hlc: 10 + i,
                            node: 1
                        }
                    );
                })
            })
            .collect();
        for call in calls {
            call.await.unwrap();
        }
        let seen = seen.lock();
        assert!(
            seen.requests < 3 + 200,
            "{} requests: nothing merged",
            seen.requests
        );
        assert_eq!(seen.held.len(), 201);
        assert_eq!(seen.write_ids.len(), 203, "one id slot per record sent");
        assert_eq!(seen.write_ids[0], Some(WriteId(7)), "write ids travel");
        let mut ids: Vec<_> = seen.write_ids[3..]
            .iter()
            .flatten()
            .map(|id| id.0)
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..200).step_by(2).collect::<Vec<_>>());
        assert!(
            seen.request_ids.iter().all(|rid| rid == "wid"),
            "request ids travel"
        );
        assert_eq!(seen.request_ids.len(), 203, "one request id per record");
    }

    #[tokio::test]
    async fn a_write_its_replica_did_not_confirm_is_an_error() {
        for mode in [Replica::Refuses, Replica::Short, Replica::Garbage] {
            let (peer, seen, _) = fake_replica(mode, false).await;
            let lanes = write_lanes("s3cret");
            let error = write(&lanes, &peer, (versioned("a", 5), None))
                .await
                .unwrap_err();
            assert!(!error.is_connect(), "{error}");
            assert!(matches!(error, CallError::Failed { .. }), "{error}");
            assert_eq!(seen.lock().requests, 1, "sent once: {error}");
        }
        let (peer, seen, _) = fake_replica(Replica::Honest, false).await;
        let refused = write(&write_lanes("wrong"), &peer, (versioned("a", 5), None))
            .await
            .unwrap_err();
        assert!(refused.to_string().contains("401"), "{refused}");
        assert!(!refused.is_connect());
        assert_eq!(seen.lock().requests, 1);
    }

    #[tokio::test]
    async fn a_write_lane_replaces_connections_the_replica_closed_or_dropped() {
        let (peer, seen, _) = fake_replica(Replica::Honest, true).await;
        let lanes = write_lanes("s3cret");
        for i in 0..5 {
            let held = write(&lanes, &peer, (versioned(&format!("k{i}"), 9), None)).await;
            assert_eq!(held.unwrap(), Version { hlc: 9, node: 1 });
        }
        assert_eq!(seen.lock().held.len(), 5);

        let (peer, _, served) = fake_replica(Replica::Honest, false).await;
        let held = write(&lanes, &peer, (versioned("k1", 9), None)).await;
        assert_eq!(held.unwrap(), Version { hlc: 9, node: 1 });
        for connection in served.lock().drain(..) {
            connection.abort();
        }
        let again = tokio::time::timeout(
            Duration::from_secs(1),
            write(&lanes, &peer, (versioned("k2", 9), None)),
        )
        .await
        .expect("answered well before the request deadline");
        assert_eq!(again.unwrap(), Version { hlc: 9, node: 1 });
    }

    #[tokio::test]
    async fn an_unreachable_replica_is_a_connect_error_and_https_keeps_its_write() {
        let peer = unreachable_peer();
        let lanes = write_lanes("s3cret");
        let error = write(&lanes, &peer, (versioned("a", 1), None))
            .await
            .unwrap_err();
        assert!(error.is_connect(), "{error}");
        let https: Arc<str> = Arc::from("https://127.0.0.1:1");
        let back = lanes
            .call(&https, (versioned("a", 1), None), Arc::from("r"))
            .await;
        assert!(
            matches!(back, Err((r, None)) if r.key == "a"),
            "the write comes back"
        );
    }

    /// Reads one HTTP/1.1 request (headers and a `content-length` body) from `stream`.
    async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if buf.len() >= end + 4 + len {
                    buf.drain(..end + 4 + len);
                    return Some(());
                }
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    #[tokio::test]
    async fn a_write_that_may_have_reached_a_replica_that_then_died_is_not_a_connect_error() {
        // The replica answers one write on a keep-alive connection, takes the next one, and
        // dies before answering (listener and connection gone). The lane sends it again on a
        // new connection, which is refused: the peer may have applied the first copy, so the
        // error must not say it cannot have (`Connect`).
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = format!("http://{}", listener.local_addr().unwrap());
        let (died, dead) = oneshot::channel();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            read_request(&mut stream, &mut buf).await.unwrap();
            let held = Version { hlc: 5, node: 1 }.to_string();
            let body = format!("{{\"applied\":1,\"held\":[\"{held}\"]}}");
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(answer.as_bytes()).await.unwrap();
            read_request(&mut stream, &mut buf).await.unwrap();
            drop(listener);
            drop(stream);
            let _ = died.send(());
        });
        // One connection task, so the second write goes on the first one's connection.
        let lanes: Lanes<OneAtATime> = Lanes::new(Arc::new(LaneConfig {
            secret: None,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            local_address: None,
        }));
        let peer: Arc<str> = Arc::from(peer);
        let send = |key: &str| {
            let item = (versioned(key, 5), None);
            lanes.call(&peer, item, Arc::from("w"))
        };
        let first = send("a").await.expect("served");
        assert_eq!(first.unwrap(), Version { hlc: 5, node: 1 });
        let error = send("b").await.expect("served").unwrap_err();
        assert!(dead.await.is_ok());
        assert!(!error.is_connect(), "{error}");
        assert!(
            error.to_string().contains("cannot connect again"),
            "{error}"
        );
    }

    /// Replication with one call in flight.
    struct OneAtATime;

    impl LaneKind for OneAtATime {
        type Item = ReplicateItem;
        type Answer = Version;
        const PATH: &'static str = ReplicateWrite::PATH;
        const WHAT: &'static str = ReplicateWrite::WHAT;
        const IN_FLIGHT: usize = 1;
        const CHANGES_PEER: bool = ReplicateWrite::CHANGES_PEER;
        const UNSUPPORTED_ON_404: bool = ReplicateWrite::UNSUPPORTED_ON_404;

        fn encode(items: &[ReplicateItem]) -> (Bytes, Option<(HeaderName, HeaderValue)>) {
            ReplicateWrite::encode(items)
        }

        fn decode(items: &[ReplicateItem], body: &[u8]) -> Result<Vec<Version>, String> {
            ReplicateWrite::decode(items, body)
        }
    }

    /// A kind of weighted items, to check the byte cap of a batch.
    struct Weighed;

    impl LaneKind for Weighed {
        type Item = usize;
        type Answer = ();
        const PATH: &'static str = "/weighed";
        const WHAT: &'static str = "items";
        const IN_FLIGHT: usize = 1;
        const CHANGES_PEER: bool = true;
        const UNSUPPORTED_ON_404: bool = false;
        const MAX_BYTES: usize = 100;

        fn weigh(item: &usize) -> usize {
            *item
        }

        fn encode(_: &[usize]) -> (Bytes, Option<(HeaderName, HeaderValue)>) {
            (Bytes::new(), None)
        }

        fn decode(items: &[usize], _: &[u8]) -> Result<Vec<()>, String> {
            Ok(vec![(); items.len()])
        }
    }

    #[test]
    fn batches_stay_within_the_byte_cap_and_a_heavy_item_goes_alone() {
        let mut queue: VecDeque<Call<usize, ()>> = [60, 30, 30, 200, 10, 10]
            .into_iter()
            .map(|item| Call {
                item,
                request_id: Arc::from("r"),
                reply: oneshot::channel().0,
            })
            .collect();
        let mut batches = Vec::new();
        while !queue.is_empty() {
            let take = batch_len::<Weighed>(&queue);
            batches.push(queue.drain(..take).map(|c| c.item).collect::<Vec<_>>());
        }
        assert_eq!(
            batches,
            vec![vec![60, 30], vec![30], vec![200], vec![10, 10]]
        );
        let many: VecDeque<Call<String, Option<Record>>> = (0..MAX_BATCH + 5)
            .map(|i| Call {
                item: i.to_string(),
                request_id: Arc::from("r"),
                reply: oneshot::channel().0,
            })
            .collect();
        assert_eq!(batch_len::<EntriesRead>(&many), MAX_BATCH);
    }
}
