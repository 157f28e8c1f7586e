//! One connection's life: what it is doing (idle between requests, receiving a request head,
//! busy with a request), and when the serve loop must close it. Bytes read are seen through
//! [`Watched`], requests through [`RequestGuard`], which lives until the response body is sent.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

const IDLE: u8 = 0;
const HEAD: u8 = 1;
const BUSY: u8 = 2;

/// What a connection is doing, shared by its IO, its requests and its watchdog.
///
/// Idle (no request, no byte of the next one) -> Head (bytes of a request head arrived) ->
/// Busy (the head was parsed; until the response body is sent) -> Idle. Idle may last the
/// keep-alive idle timeout, Head the request-head deadline; Busy is bounded by the routes.
#[derive(Debug)]
pub(crate) struct Activity {
    state: AtomicU8,
    /// Milliseconds from `opened` to the start of the current state.
    since_ms: AtomicU64,
    in_flight: AtomicUsize,
    opened: Instant,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            state: AtomicU8::new(IDLE),
            since_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            opened: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn bytes_read(&self) {
        let started = self
            .state
            .compare_exchange(IDLE, HEAD, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if started {
            self.since_ms.store(self.now_ms(), Ordering::Release);
        }
    }

    /// When the connection must be closed if nothing changes (`None`: busy, no deadline here).
    pub(crate) fn deadline(
        &self,
        head_timeout: Duration,
        idle_timeout: Duration,
    ) -> Option<Instant> {
        let allowed = match self.state.load(Ordering::Acquire) {
            IDLE => idle_timeout,
            HEAD => head_timeout,
            _ => return None,
        };
        let since = Duration::from_millis(self.since_ms.load(Ordering::Acquire));
        Some(self.opened + since + allowed)
    }
}

/// Marks the connection busy from the moment a request head is parsed until the guard is
/// dropped: with the response body, once it is sent (or the connection ends).
#[derive(Debug)]
pub(crate) struct RequestGuard(Arc<Activity>);

impl RequestGuard {
    pub(crate) fn new(activity: Arc<Activity>) -> RequestGuard {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.state.store(BUSY, Ordering::Release);
        RequestGuard(activity)
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let activity = &self.0;
        if activity.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            activity
                .since_ms
                .store(activity.now_ms(), Ordering::Release);
            activity.state.store(IDLE, Ordering::Release);
        }
    }
}

/// A response body that holds its request's [`RequestGuard`] until it is dropped.
#[derive(Debug)]
pub(crate) struct GuardedBody<B = Body> {
    inner: B,
    _guard: RequestGuard,
}

impl<B> GuardedBody<B> {
    pub(crate) fn new(inner: B, guard: RequestGuard) -> GuardedBody<B> {
        GuardedBody {
            inner,
            _guard: guard,
        }
    }
}

impl<B> http_body::Body for GuardedBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A stream whose reads are reported to the connection's [`Activity`].
#[derive(Debug)]
pub(crate) struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Watched<S> {
    pub(crate) fn new(inner: S, activity: Arc<Activity>) -> Watched<S> {
        Watched { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_the_state() {
        let (head, idle) = (Duration::from_secs(2), Duration::from_secs(5));
        let activity = Activity::new();
        let opened = Instant::now();
        assert_eq!(activity.deadline(head, idle), Some(opened + idle));
        tokio::time::advance(Duration::from_secs(1)).await;
        activity.bytes_read();
        let head_deadline = activity.deadline(head, idle).unwrap();
        assert!(
            head_deadline < opened + idle,
            "a started head has the shorter deadline"
        );
        let guard = RequestGuard::new(Arc::clone(&activity));
        assert_eq!(activity.deadline(head, idle), None, "busy: no deadline");
        activity.bytes_read();
        assert_eq!(
            activity.deadline(head, idle),
            None,
            "body bytes keep it busy"
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        drop(guard);
        let idle_deadline = activity.deadline(head, idle).unwrap();
        assert!(
            idle_deadline >= opened + Duration::from_secs(31) + idle - Duration::from_millis(1)
        );
    }
}
