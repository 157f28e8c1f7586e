//! The data path: read the client's request once, pick the candidate nodes (the key's replicas
//! in ring order, healthy first), send it to the first, and fail over to the next only when
//! that is safe. The node's answer streams back unchanged.
//!
//! Retry rules:
//! - connection refused / connect timeout: the node never saw the request, so every method is
//!   retried on the next candidate, and the node is marked down at once;
//! - timeout or a connection lost mid-request: `GET`/`HEAD` are retried, and so are plain writes
//!   to `/v1/{key}`: the proxy gives each a random write id (`x-kv-write-id`), and sends it again
//!   with the same id, `x-kv-resend: 1` and its age (`x-kv-resend-age-ms`); the node that gets the resend applies it only if no
//!   replica stored that id yet, so it applies at most once. The proxy never picks versions:
//!   the coordinating node does, from its own clock. A write with the client's own
//!   `x-kv-version` is retried too (it is the same record). Conditional writes (`If-Match`,
//!   `If-None-Match`) and other routes are not retried: they get 504 / 502;
//! - a 5xx answer: reads move on to the next replica; writes return the node's answer.

use std::fmt::Display;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderValue, Method, Request};
use bytes::Bytes;
use http_body::Body as _;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::Response;
use tracing::{debug, warn};

use crate::app::LbState;
use crate::error::ApiError;
use crate::metrics;
use crate::routing::Routing;
use crate::upstream::{
    into_client_response, strip_client_headers, BufferedRequest, Outcome, ProxyBody,
    RESEND_AGE_HEADER, RESEND_HEADER, VERSION_HEADER, WRITE_ID_HEADER,
};

/// `/v1/{*key}`, any method: to the key's first healthy replica. `raw_key` is the path after
/// `/v1/`, still percent-encoded.
pub async fn key_owner<B>(
    state: &LbState,
    raw_key: &str,
    request: Request<B>,
    request_id: &str,
) -> Result<Response<ProxyBody>, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Display + Send + Sync + 'static + Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let key = percent_encoding::percent_decode_str(raw_key)
        .decode_utf8()
        .map_err(|e| {
            ApiError::InvalidKey(format!(
                "the key is not valid UTF-8 once percent-decoded: {e}"
            ))
        })?;
    let routing = state.routing();
    let preference = routing
        .ring
        .preference_list(&key, routing.replication_factor);
    debug!(request_id, %key, ?preference, "routing by key");
    forward(state, &routing, preference, request, true, request_id).await
}

/// `/batch`, `/v1` (listing): to any healthy node, round-robin.
pub async fn any_node<B>(
    state: &LbState,
    request: Request<B>,
    request_id: &str,
) -> Result<Response<ProxyBody>, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Display + Send + Sync + 'static + Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let routing = state.routing();
    let preference = state.round_robin(&routing);
    forward(state, &routing, preference, request, false, request_id).await
}

/// Sends the request to `preference` (healthy nodes first) until one answers or retrying is
/// no longer safe, all within `REQUEST_TIMEOUT_MS`. With `name_writes`, plain writes get a
/// write id so that they may be resent too.
async fn forward<B>(
    state: &LbState,
    routing: &Routing,
    mut order: Vec<usize>,
    request: Request<B>,
    name_writes: bool,
    request_id: &str,
) -> Result<Response<ProxyBody>, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Display + Send + Sync + 'static + Into<Box<dyn std::error::Error + Send + Sync>>,
{
    state.counters.request();
    let mut request = buffer(request, state.body_limit, state.request_timeout).await?;
    let retryable = is_read(&request.method) || (name_writes && name_write(&mut request));
    // One clock read for the deadline, the first send and the first attempt's budget.
    let first_sent = Instant::now();
    let deadline = first_sent + state.request_timeout;
    let first_choice = order.first().copied();
    routing.health.order_healthy_first(&mut order);
    let mut failures = Failures {
        request_id,
        ..Failures::default()
    };
    let mut resend = false;
    for (position, &node) in order.iter().enumerate() {
        let Some(url) = routing.health.url(node) else {
            continue;
        };
        let (now, remaining) = if position == 0 {
            (first_sent, state.request_timeout)
        } else {
            let now = Instant::now();
            (now, deadline.saturating_duration_since(now))
        };
        if remaining.is_zero() {
            break;
        }
        if position > 0 {
            state.counters.retry();
        }
        let attempt = Attempt {
            node,
            url,
            retry_reads: is_read(&request.method),
            retryable,
            is_last: position + 1 == order.len(),
            budget: attempt_budget(remaining, retryable, order.len() - position),
        };
        if resend {
            mark_resend(&mut request, first_sent);
        }
        let outcome = state
            .upstream
            .send(url, &request, now + attempt.budget)
            .await?;
        // The node may have applied it: from now on, each send of a named write is a resend.
        resend |= matches!(outcome, Outcome::TimedOut | Outcome::Failed(_))
            && request.headers.contains_key(WRITE_ID_HEADER);
        match attempt.judge(state, routing, outcome, &mut failures) {
            Step::Answer(response) => {
                if first_choice != Some(node) {
                    state.counters.failover();
                }
                return Ok(into_client_response(response));
            }
            Step::TryNext => {}
            Step::GiveUp(error) => return Err(error),
        }
    }
    failures.into_result(Instant::now() >= deadline, state.request_timeout)
}

/// One attempt at one node, and what the proxy knows when it judges the outcome.
struct Attempt<'a> {
    node: usize,
    url: &'a str,
    retry_reads: bool,
    retryable: bool,
    is_last: bool,
    budget: Duration,
}

/// What to do after an attempt.
enum Step {
    /// Send this answer to the client.
    Answer(Response<ProxyBody>),
    /// Try the next candidate (the failure is noted).
    TryNext,
    /// Stop: retrying would not be safe.
    GiveUp(ApiError),
}

impl Attempt<'_> {
    /// Applies the retry rules of this module's doc to one outcome.
    fn judge(
        &self,
        state: &LbState,
        routing: &Routing,
        outcome: Outcome,
        failures: &mut Failures,
    ) -> Step {
        let url = self.url;
        match outcome {
            Outcome::Answered(response)
                if self.retry_reads && !self.is_last && response.status().is_server_error() =>
            {
                metrics::upstream_error(url, "status_5xx");
                failures.note(url, format!("answered {}", response.status()));
                failures.last_server_error = Some(response);
                Step::TryNext
            }
            // A node answers 503 only when it wrote nothing (too few replicas up, its clock off
            // the others', its WAL failed), and 507 only when its disk is full and the other
            // replicas could not make W without it, refused before anything was sent: any
            // request may move on.
            Outcome::Answered(response)
                if !self.is_last
                    && matches!(
                        response.status(),
                        hyper::StatusCode::SERVICE_UNAVAILABLE
                            | hyper::StatusCode::INSUFFICIENT_STORAGE
                    ) =>
            {
                let status = response.status().as_u16();
                metrics::upstream_error(
                    url,
                    if status == 507 {
                        "status_507"
                    } else {
                        "status_503"
                    },
                );
                failures.note(url, format!("answered {status}"));
                failures.last_server_error = Some(response);
                Step::TryNext
            }
            Outcome::Answered(response) => Step::Answer(response),
            Outcome::ConnectFailed(reason) => {
                metrics::upstream_error(url, "connect");
                routing.health.mark_down(self.node, &reason);
                failures.note(url, reason);
                Step::TryNext
            }
            Outcome::TimedOut => {
                metrics::upstream_error(url, "timeout");
                if !self.retryable {
                    return Step::GiveUp(ApiError::Timeout(state.request_timeout));
                }
                let waited = self.budget.as_millis();
                failures.note(url, format!("no answer within {waited} ms"));
                Step::TryNext
            }
            Outcome::Failed(reason) => {
                metrics::upstream_error(url, "io");
                if !self.retryable {
                    let node = url.to_owned();
                    return Step::GiveUp(ApiError::BadGateway { node, reason });
                }
                failures.note(url, reason);
                Step::TryNext
            }
        }
    }
}

/// Why every candidate failed so far, and the last 5xx a node sent (a read's best answer
/// when no replica does better: it carries the node's own explanation).
#[derive(Default)]
struct Failures<'a> {
    request_id: &'a str,
    tried: usize,
    last_reason: String,
    last_server_error: Option<Response<ProxyBody>>,
}

impl Failures<'_> {
    fn note(&mut self, node: &str, reason: String) {
        warn!(request_id = self.request_id, node, %reason, "attempt at a replica failed");
        self.tried += 1;
        self.last_reason = format!("{node}: {reason}");
    }

    fn into_result(
        self,
        deadline_passed: bool,
        timeout: Duration,
    ) -> Result<Response<ProxyBody>, ApiError> {
        if let Some(response) = self.last_server_error {
            return Ok(into_client_response(response));
        }
        if deadline_passed {
            return Err(ApiError::Timeout(timeout));
        }
        Err(ApiError::Unavailable {
            tried: self.tried,
            reason: self.last_reason,
        })
    }
}

/// Gives a plain write (`POST`, `PUT`, `DELETE` without preconditions or a version of its own)
/// a random write id; returns whether the request may be resent after a lost answer (a write
/// with the client's own version may be too: it is the same record).
fn name_write(request: &mut BufferedRequest) -> bool {
    let is_write = matches!(request.method, Method::POST | Method::PUT | Method::DELETE);
    let headers = &mut request.headers;
    if !is_write
        || headers.contains_key(header::IF_MATCH)
        || headers.contains_key(header::IF_NONE_MATCH)
    {
        return false;
    }
    if !headers.contains_key(VERSION_HEADER) {
        headers.insert(WRITE_ID_HEADER, new_write_id());
    }
    true
}

/// Marks a named write as a resend (`x-kv-resend: 1`), with the milliseconds since its first
/// send (`x-kv-resend-age-ms`, from this process's monotonic clock): the nodes trust a replica's
/// "never seen" only if it has remembered write ids for at least that long.
fn mark_resend(request: &mut BufferedRequest, first_sent: Instant) {
    let age_ms = first_sent.elapsed().as_millis();
    request
        .headers
        .insert(RESEND_HEADER, HeaderValue::from_static("1"));
    request.headers.insert(
        RESEND_AGE_HEADER,
        HeaderValue::from(u64::try_from(age_ms).unwrap_or(u64::MAX)),
    );
}

/// A random 64-bit write id as 16 lowercase hex digits.
fn new_write_id() -> HeaderValue {
    write_id_of(rand::random::<u64>())
}

/// `bits` as 16 lowercase hex digits, most significant first (no `format!`: a write's hot path).
fn write_id_of(mut bits: u64) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 16];
    for digit in id.iter_mut().rev() {
        *digit = HEX[(bits & 0xf) as usize];
        bits >>= 4;
    }
    HeaderValue::from_bytes(&id).unwrap_or_else(|_| HeaderValue::from_static("0000000000000000"))
}

/// `GET` and `HEAD` change nothing, so they may be retried after any failure.
fn is_read(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

/// Time allowed for one attempt. A retryable request shares what is left of the deadline
/// equally among the candidates left, so one hung node cannot eat the time of the replicas
/// behind it; one that is never retried after a timeout gets all of it.
fn attempt_budget(remaining: Duration, retryable: bool, candidates_left: usize) -> Duration {
    if !retryable || candidates_left <= 1 {
        return remaining;
    }
    let share = u32::try_from(candidates_left).unwrap_or(u32::MAX);
    remaining / share
}

/// Reads the whole body (at most `limit` bytes, within `timeout`) so it can be sent again.
/// A request without a body (most reads) costs no timer.
async fn buffer<B>(
    request: Request<B>,
    limit: usize,
    timeout: Duration,
) -> Result<BufferedRequest, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Display + Send + Sync + 'static + Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let body = if body.is_end_stream() {
        Bytes::new()
    } else {
        read_body(body, limit, timeout).await?
    };
    strip_client_headers(&mut parts.headers);
    let uri = match parts.uri.path_and_query() {
        // The origin form: what a node expects on the request line.
        Some(pq) if parts.uri.scheme().is_some() => pq
            .as_str()
            .parse()
            .map_err(|e| ApiError::BadRequest(format!("bad request target: {e}")))?,
        Some(_) => parts.uri,
        None => axum::http::Uri::from_static("/"),
    };
    Ok(BufferedRequest {
        method: parts.method,
        uri,
        headers: parts.headers,
        body,
    })
}

/// Reads a whole body of at most `limit` bytes. The frames already received are taken without
/// a timer (a small body usually arrives with its head); only a body still on its way is read
/// under `timeout`. One frame is kept as it is; several are joined once.
async fn read_body<B>(body: B, limit: usize, timeout: Duration) -> Result<Bytes, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Display + Send + Sync + 'static + Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut body = std::pin::pin!(Limited::new(body, limit));
    let mut read = BodyRead::default();
    // What is there now, without a timer.
    let finished = std::future::poll_fn(|cx| loop {
        match body.as_mut().poll_frame(cx) {
            std::task::Poll::Ready(Some(frame)) => {
                if let Err(e) = read.frame(frame.map(Some), limit) {
                    return std::task::Poll::Ready(Err(e));
                }
            }
            std::task::Poll::Ready(None) => return std::task::Poll::Ready(Ok(true)),
            std::task::Poll::Pending => return std::task::Poll::Ready(Ok(false)),
        }
    })
    .await?;
    if !finished {
        let rest = async {
            while let Some(frame) = body.as_mut().frame().await {
                read.frame(Some(frame).transpose(), limit)?;
            }
            Ok::<(), ApiError>(())
        };
        tokio::time::timeout(timeout, rest)
            .await
            .map_err(|_| ApiError::BodyTimeout(timeout))??;
    }
    Ok(read.into_bytes())
}

/// The data frames of a body read so far: the first kept as it is, later ones joined.
#[derive(Default)]
struct BodyRead {
    first: Option<Bytes>,
    joined: Option<bytes::BytesMut>,
}

impl BodyRead {
    /// Takes one polled frame (`Ok(None)`: a frame that is not data, such as trailers).
    fn frame<E>(
        &mut self,
        frame: Result<Option<http_body::Frame<Bytes>>, E>,
        limit: usize,
    ) -> Result<(), ApiError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let frame = frame.map_err(|e| body_error(e.into(), limit))?;
        let Some(data) = frame.and_then(|f| f.into_data().ok()) else {
            return Ok(());
        };
        if data.is_empty() {
            return Ok(());
        }
        match (&mut self.joined, self.first.take()) {
            (Some(joined), _) => joined.extend_from_slice(&data),
            (None, None) => self.first = Some(data),
            (None, Some(first)) => {
                let mut joined = bytes::BytesMut::with_capacity(first.len() + data.len());
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&data);
                self.joined = Some(joined);
            }
        }
        Ok(())
    }

    fn into_bytes(self) -> Bytes {
        match (self.joined, self.first) {
            (Some(joined), _) => joined.freeze(),
            (None, Some(first)) => first,
            (None, None) => Bytes::new(),
        }
    }
}

/// The error of a body that could not be read: too large, or broken off.
fn body_error(error: Box<dyn std::error::Error + Send + Sync>, limit: usize) -> ApiError {
    if error.downcast_ref::<LengthLimitError>().is_some() {
        ApiError::PayloadTooLarge { limit }
    } else {
        ApiError::BadRequest(format!("the request body could not be read: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_share_the_deadline_writes_keep_it() {
        let ten = Duration::from_secs(10);
        assert_eq!(attempt_budget(ten, true, 2), Duration::from_secs(5));
        assert_eq!(attempt_budget(ten, true, 1), ten);
        assert_eq!(attempt_budget(ten, false, 3), ten);
    }

    #[test]
    fn write_ids_are_16_lowercase_hex_digits() {
        assert_eq!(write_id_of(0x0123_4567_89ab_cdef), "0123456789abcdef");
        assert_eq!(write_id_of(0), "0000000000000000");
        assert_eq!(write_id_of(u64::MAX), "ffffffffffffffff");
        let id = new_write_id();
        assert_eq!(id.len(), 16);
        assert!(id
            .as_bytes()
            .iter()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }

    /// A body that hands out `frames` one by one, each after one `Pending` (a body still on its
    /// way), and then either ends or (`hang`) never does.
    struct Trickle {
        frames: std::collections::VecDeque<&'static [u8]>,
        ready: bool,
        hang: bool,
    }

    impl http_body::Body for Trickle {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            if self.frames.is_empty() && self.hang {
                return std::task::Poll::Pending;
            }
            if !self.ready {
                self.ready = true;
                cx.waker().wake_by_ref();
                return std::task::Poll::Pending;
            }
            self.ready = false;
            std::task::Poll::Ready(
                self.frames
                    .pop_front()
                    .map(|f| Ok(http_body::Frame::data(Bytes::from_static(f)))),
            )
        }
    }

    fn trickle(frames: &[&'static [u8]], hang: bool) -> Trickle {
        Trickle {
            frames: frames.iter().copied().collect(),
            ready: false,
            hang,
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn a_body_already_received_is_read_whole() {
        let body = http_body_util::Full::new(Bytes::from_static(b"{\"value\": 1}"));
        let read = read_body(body, 100, SECOND).await.unwrap();
        assert_eq!(read, "{\"value\": 1}");
    }

    #[tokio::test]
    async fn a_body_on_its_way_is_joined_from_its_frames() {
        let read = read_body(trickle(&[b"ab", b"", b"cd", b"e"], false), 100, SECOND)
            .await
            .unwrap();
        assert_eq!(read, "abcde");
        let one = read_body(trickle(&[b"abc"], false), 100, SECOND)
            .await
            .unwrap();
        assert_eq!(one, "abc");
        let none = read_body(trickle(&[], false), 100, SECOND).await.unwrap();
        assert!(none.is_empty());
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused() {
        let full = http_body_util::Full::new(Bytes::from_static(b"0123456789"));
        let error = read_body(full, 4, SECOND).await.unwrap_err();
        assert!(
            matches!(error, ApiError::PayloadTooLarge { limit: 4 }),
            "{error:?}"
        );
        let late = read_body(trickle(&[b"012", b"345"], false), 4, SECOND).await;
        assert!(
            matches!(late, Err(ApiError::PayloadTooLarge { limit: 4 })),
            "{late:?}"
        );
    }

    #[tokio::test]
    async fn a_body_that_stops_coming_times_out() {
        let started = Instant::now();
        let timeout = Duration::from_millis(100);
        let error = read_body(trickle(&[b"ab"], true), 100, timeout)
            .await
            .unwrap_err();
        assert!(matches!(error, ApiError::BodyTimeout(_)), "{error:?}");
        assert!(started.elapsed() >= timeout);
    }

    #[test]
    fn only_get_and_head_are_reads() {
        assert!(is_read(&Method::GET));
        assert!(is_read(&Method::HEAD));
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
            assert!(!is_read(&method));
        }
    }
}
