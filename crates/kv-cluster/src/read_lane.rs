//! The quorum-read path to one peer, on plain hyper: one keep-alive HTTP/1.1 connection per peer
//! and read kind, owned and driven by one task, that takes every read queued for the peer when it
//! is free and sends them as one `/internal/versions` (digest) or `/internal/entries` call.
//!
//! The general peer client (reqwest, behind a [`Coalescer`](crate::coalesce::Coalescer)) costs a
//! read six task wake-ups on the coordinator (the spawned fetch, the coalescer's sender, the
//! pool's connection task and the three answers back) plus a URL parse and a pool checkout per
//! call. Here a read costs two: the caller queues its key and wakes a connection task, which
//! writes the request, reads the answer on the same task and hands each caller its entry
//! through a oneshot. Batching works as in the coalescer: at most [`READ_IN_FLIGHT`] call per
//! peer in flight, every read that arrives meanwhile leaves with the next one (at most
//! [`MAX_BATCH`]), and at most [`MAX_QUEUED`] wait; more fail at once.
//!
//! Reads are idempotent, so a call that fails on a connection that was idle (the peer may have
//! closed it) is sent again once on a fresh connection before the callers see an error. Only
//! `http://` peers use this path; `https://` peers keep the reqwest client (and its TLS).

use crate::coalesce::{MAX_BATCH, MAX_QUEUED};
use crate::peer::{
    CallError, BATCH_REQUEST_IDS_HEADER, MAX_BATCH_BYTES, REQUEST_ID_HEADER, SECRET_HEADER,
};
use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, HOST};
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

/// Calls in flight per peer: one. While it is out, every read that arrives waits and leaves with
/// the next call, so under load a peer answers many reads per exchange (measured: 20-30 % less
/// server CPU per quorum GET than with two in flight, at the same or lower latency, see
/// docs/PERFORMANCE.md). A read stuck behind a slow call is covered by the speculative read of
/// another replica after 50 ms.
const READ_IN_FLIGHT: usize = 1;

/// A connection unused this long is closed (its task stays, and connects again when needed).
const IDLE_CLOSE: Duration = Duration::from_secs(60);

/// What one kind of read call sends and how its answer is read.
pub(crate) trait ReadKind: Send + Sync + 'static {
    /// One call's answer.
    type Answer: Send + 'static;
    /// The path called (`/internal/entries`, `/internal/versions`).
    const PATH: &'static str;
    /// The request body for these keys.
    fn encode(keys: &[String]) -> Bytes;
    /// The answers, one per key, in order; a body that does not fit the keys is an error.
    fn decode(keys: &[String], body: &[u8]) -> Result<Vec<Self::Answer>, String>;
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

/// One queued read.
struct Call<A> {
    key: String,
    request_id: Arc<str>,
    reply: oneshot::Sender<Result<A, CallError>>,
}

/// The reads waiting for one peer, and the signal that wakes a free connection task.
struct Lane<A> {
    queue: Mutex<VecDeque<Call<A>>>,
    ready: Notify,
}

/// A peer's lane, or `None` for a peer not served here.
type MaybeLane<A> = Option<Arc<Lane<A>>>;

/// The lanes of one read kind, one per `http://` peer, created on first use.
pub(crate) struct ReadLanes<K: ReadKind> {
    config: Arc<LaneConfig>,
    lanes: Mutex<HashMap<Arc<str>, MaybeLane<K::Answer>>>,
}

impl<K: ReadKind> ReadLanes<K> {
    pub(crate) fn new(config: Arc<LaneConfig>) -> Self {
        ReadLanes {
            config,
            lanes: Mutex::new(HashMap::new()),
        }
    }

    /// Reads `key` from `peer`, merged with the other reads waiting for it; `None` when `peer`
    /// is not served here (not a plain `http://` URL). The call is sent by the lane's tasks, so
    /// it completes (and keeps the connection usable) even when this future is dropped.
    pub(crate) async fn call(
        &self,
        peer: &Arc<str>,
        key: &str,
        request_id: Arc<str>,
    ) -> Option<Result<K::Answer, CallError>> {
        let lane = self.lane(peer)?;
        Some(Self::call_on(&lane, peer, key, request_id).await)
    }

    async fn call_on(
        lane: &Lane<K::Answer>,
        peer: &Arc<str>,
        key: &str,
        request_id: Arc<str>,
    ) -> Result<K::Answer, CallError> {
        let (reply, answer) = oneshot::channel();
        {
            let mut queue = lane.queue.lock();
            if queue.len() >= MAX_QUEUED {
                return Err(CallError::Failed {
                    peer: peer.to_string(),
                    reason: format!("{MAX_QUEUED} reads already wait for this peer"),
                });
            }
            queue.push_back(Call {
                key: key.to_owned(),
                request_id,
                reply,
            });
        }
        lane.ready.notify_one();
        answer.await.unwrap_or_else(|_| {
            Err(CallError::Failed {
                peer: peer.to_string(),
                reason: "the read lane stopped".into(),
            })
        })
    }

    /// The lane of `peer`, made (with its tasks) on first use; `None` for a peer not served here
    /// (remembered too, so its URL is parsed once).
    fn lane(&self, peer: &Arc<str>) -> Option<Arc<Lane<K::Answer>>> {
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
        for _ in 0..READ_IN_FLIGHT {
            let worker = Worker::<K> {
                lane: lane.clone(),
                peer: peer.clone(),
                target: target.clone(),
                config: self.config.clone(),
                conn: None,
                _kind: std::marker::PhantomData,
            };
            tokio::spawn(worker.run());
        }
        lanes.insert(peer.clone(), Some(lane.clone()));
        Some(lane)
    }
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
struct Worker<K: ReadKind> {
    lane: Arc<Lane<K::Answer>>,
    peer: Arc<str>,
    target: Target,
    config: Arc<LaneConfig>,
    conn: Option<Conn>,
    _kind: std::marker::PhantomData<K>,
}

/// Why one exchange failed, and whether the connection could have been stale.
struct Failure {
    error: CallError,
    /// The peer may never have seen the request on a reused connection: worth one retry.
    retry: bool,
}

impl<K: ReadKind> Worker<K> {
    async fn run(mut self) {
        loop {
            let calls: Vec<Call<K::Answer>> = {
                let mut queue = self.lane.queue.lock();
                let take = queue.len().min(MAX_BATCH);
                queue.drain(..take).collect()
            };
            if calls.is_empty() {
                let idle = tokio::time::timeout(IDLE_CLOSE, self.lane.ready.notified()).await;
                if idle.is_err() {
                    self.conn = None;
                    if Arc::strong_count(&self.lane) <= READ_IN_FLIGHT {
                        // Only the lane's own tasks still hold it: its client is gone.
                        return;
                    }
                }
                continue;
            }
            let mut keys = Vec::with_capacity(calls.len());
            let mut ids = Vec::with_capacity(calls.len());
            let mut replies = Vec::with_capacity(calls.len());
            for call in calls {
                keys.push(call.key);
                ids.push(call.request_id);
                replies.push(call.reply);
            }
            match self.call(&keys, &ids).await {
                Ok(answers) => {
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(Ok(answer));
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// One call for `keys`, within the request deadline; once more on a fresh connection when
    /// a reused one failed.
    async fn call(
        &mut self,
        keys: &[String],
        ids: &[Arc<str>],
    ) -> Result<Vec<K::Answer>, CallError> {
        let body = K::encode(keys);
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let peer = self.peer.clone();
        let timed_out = || CallError::Failed {
            peer: peer.to_string(),
            reason: "the peer did not answer in time".into(),
        };
        let first = tokio::time::timeout_at(deadline, self.exchange(keys, ids, body.clone())).await;
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
        match tokio::time::timeout_at(deadline, self.exchange(keys, ids, body)).await {
            Ok(Ok(answers)) => Ok(answers),
            Ok(Err(failure)) => {
                self.conn = None;
                Err(failure.error)
            }
            Err(_) => {
                self.conn = None;
                Err(timed_out())
            }
        }
    }

    async fn exchange(
        &mut self,
        keys: &[String],
        ids: &[Arc<str>],
        body: Bytes,
    ) -> Result<Vec<K::Answer>, Failure> {
        let reused = self.conn.is_some();
        let peer = self.peer.clone();
        let fail = |reason: String, retry: bool| Failure {
            error: CallError::Failed {
                peer: peer.to_string(),
                reason,
            },
            retry: retry && reused,
        };
        if self.conn.is_none() {
            self.conn = Some(self.connect().await.map_err(|error| Failure {
                error,
                retry: false,
            })?);
        }
        let request = self.request(ids, body).map_err(|e| fail(e, false))?;
        let Some(conn) = self.conn.as_mut() else {
            return Err(fail("no connection".into(), false));
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
        let response = response.map_err(|e| fail(e.to_string(), true))?;
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
        if status == StatusCode::NOT_FOUND {
            return Err(Failure {
                error: CallError::Unsupported {
                    peer: self.peer.to_string(),
                    path: K::PATH,
                },
                retry: false,
            });
        }
        if status != StatusCode::OK {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
            return Err(fail(
                format!("{} answered {status}: {text}", K::PATH),
                false,
            ));
        }
        K::decode(keys, &bytes).map_err(|e| fail(e, false))
    }

    fn request(&self, ids: &[Arc<str>], body: Bytes) -> Result<Request<Full<Bytes>>, String> {
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
    async fn fake_peer(one_shot: bool) -> (String, Arc<AtomicUsize>, Served) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        let served = Served::default();
        let connections = served.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counted = counted.clone();
                let service = service_fn(move |request: Request<Incoming>| {
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
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .keep_alive(!one_shot)
                    .serve_connection(TokioIo::new(stream), service);
                connections.lock().push(tokio::spawn(async move {
                    let _ = connection.await;
                }));
            }
        });
        (url, requests, served)
    }

    /// The tasks serving a fake peer's connections.
    type Served = Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>;

    fn lanes(secret: &'static str) -> Arc<ReadLanes<EntriesRead>> {
        Arc::new(ReadLanes::new(Arc::new(LaneConfig {
            secret: Some(HeaderValue::from_static(secret)),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            local_address: None,
        })))
    }

    async fn read(
        lanes: &ReadLanes<EntriesRead>,
        peer: &str,
        key: &str,
    ) -> Result<Option<Record>, CallError> {
        lanes
            .call(&Arc::from(peer), key, Arc::from("rid"))
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
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let lanes = lanes("s3cret");
        let error = read(&lanes, &peer, "k1").await.unwrap_err();
        assert!(error.is_connect(), "{error}");
        let https: Arc<str> = Arc::from("https://127.0.0.1:1");
        assert!(lanes.call(&https, "k1", Arc::from("r")).await.is_none());
    }
}
