//! The reference server: a minimal hyper HTTP/1.1 keep-alive server answering every request with
//! a small fixed JSON body shaped like a kv GET answer. Its throughput is this machine's HTTP
//! limit, the yardstick kv is compared against.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// The answer to every request (73 bytes, like `GET /v1/bench-4711` on kv).
pub const LIMIT_BODY: &str =
    r#"{"key":"bench-4711","value":"limit-server","version":"0000018f3a2b4c5d-1"}"#;

/// Pause after a failed `accept` (for example out of file descriptors) before trying again.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(50);

/// Serves every connection accepted on `listener` until the task is dropped, answering every
/// request with `status` and [`LIMIT_BODY`]. A status other than 200 lets tests check how the
/// load generator counts failures.
pub async fn serve(listener: TcpListener, status: StatusCode) {
    accept_forever(listener, "limit-server", move |stream| async move {
        let service = service_fn(move |request| answer(request, status));
        // A client that hangs up mid-request ends its connection; nothing to report.
        let _ = http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service)
            .await;
    })
    .await
}

/// Accepts connections until the task is dropped and runs `serve_one` on each in its own task
/// (`TCP_NODELAY` set); a failed `accept` is reported as `who` and retried after a pause.
pub async fn accept_forever<F, Fut>(listener: TcpListener, who: &str, serve_one: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_one(stream));
            }
            Err(e) => {
                eprintln!("kv-bench {who}: accept failed: {e}");
                tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
            }
        }
    }
}

/// Reads the request body (as a real server would) and returns the fixed answer.
async fn answer(
    request: Request<Incoming>,
    status: StatusCode,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let _ = request.into_body().collect().await;
    let mut response = Response::new(Full::new(Bytes::from_static(LIMIT_BODY.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}
