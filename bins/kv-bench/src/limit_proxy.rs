//! The reference proxy: the leanest HTTP/1.1 reverse proxy hyper allows, to mark what one proxy
//! hop costs on this machine. Each client connection gets its own upstream connection, driven in
//! the same task (no pool, no channel between tasks, no routing, no retries); requests and
//! answers stream through unchanged. kv-lb does far more per request (routing by key, health,
//! retries, stamping, request ids, metrics); the gap between the two is what kv-lb itself costs.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1 as client;
use hyper::server::conn::http1 as server;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

use crate::limit_server::accept_forever;

type Body = http_body_util::combinators::BoxBody<bytes::Bytes, hyper::Error>;

/// Proxies every connection accepted on `listener` to `upstream` until the task is dropped.
pub async fn serve(listener: TcpListener, upstream: SocketAddr) {
    accept_forever(listener, "limit-proxy", move |stream| async move {
        if let Err(e) = proxy_connection(stream, upstream).await {
            eprintln!("kv-bench limit-proxy: {e}");
        }
    })
    .await
}

/// One client connection and its own upstream connection, both driven by this task.
async fn proxy_connection(stream: TcpStream, upstream: SocketAddr) -> Result<(), String> {
    let up = TcpStream::connect(upstream)
        .await
        .map_err(|e| format!("cannot connect to {upstream}: {e}"))?;
    let _ = up.set_nodelay(true);
    let (sender, upstream_conn) = client::handshake::<_, Incoming>(TokioIo::new(up))
        .await
        .map_err(|e| format!("handshake with {upstream}: {e}"))?;
    let sender = Arc::new(Mutex::new(sender));
    let service = service_fn(move |request: Request<Incoming>| {
        let sender = Arc::clone(&sender);
        async move { Ok::<_, std::convert::Infallible>(forward(&sender, request).await) }
    });
    let downstream = server::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    // The client side ends the pair: when it hangs up, the upstream connection is dropped.
    tokio::select! {
        _ = downstream => {}
        _ = upstream_conn => {}
    }
    Ok(())
}

/// Sends the request upstream unchanged and streams the answer back; 502 if that fails.
async fn forward(
    sender: &Mutex<client::SendRequest<Incoming>>,
    request: Request<Incoming>,
) -> Response<Body> {
    let mut sender = sender.lock().await;
    match sender.send_request(request).await {
        Ok(response) => response.map(BodyExt::boxed),
        Err(e) => {
            let body = Full::new(bytes::Bytes::from(format!("upstream failed: {e}")))
                .map_err(|never| match never {})
                .boxed();
            let mut response = Response::new(body);
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            response
        }
    }
}
