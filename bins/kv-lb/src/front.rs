//! The front door of every connection: the path is matched by hand, and the data routes
//! (`/v1`, `/v1/`, `/v1/{*key}`, `/batch`) are answered right here with hyper's types: no
//! router, no middleware, metric handles kept per thread. Everything else (`/`, `/health`,
//! `/metrics`, `/ui`, 404s) goes to the axum `Router` of `app.rs`, which also carries the data
//! routes (to this same code) for the unit tests.
//!
//! What each data request gets: its `X-Request-Id` (the client's, or a new one) sent to the
//! node and returned, the bearer-token check, `kv_lb_requests_total` and
//! `kv_lb_request_duration_seconds`, the dashboard's per-route window, and a debug line.
//! Warnings of the data path carry the request id as a field (no span per request).

use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::http::{Method, Request, Response};
use axum::response::IntoResponse;
use axum::Router;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use kv_http::Handler;
use tracing::debug;

use crate::app::{LbState, SharedState};
use crate::error::ApiError;
use crate::request_context::{request_id, X_REQUEST_ID};
use crate::upstream::ProxyBody;
use crate::{metrics, proxy};

/// A boxed error of either kind of body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The data routes, in the order of their metric labels (`metrics::DATA_ROUTES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataRoute {
    /// `/v1`: the listing, any node.
    List,
    /// `/v1/`: the listing too.
    ListSlash,
    /// `/v1/{*key}`: the key's replicas.
    Key,
    /// `/batch` (`POST` only): any node.
    Batch,
}

impl DataRoute {
    /// The data route of `path`, if it is one.
    pub fn of(path: &str) -> Option<DataRoute> {
        match path {
            "/v1" => Some(DataRoute::List),
            "/v1/" => Some(DataRoute::ListSlash),
            "/batch" => Some(DataRoute::Batch),
            _ if path.starts_with("/v1/") => Some(DataRoute::Key),
            _ => None,
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The route's template, as in metrics and logs (`/v1/{*key}`).
    pub fn template(self) -> &'static str {
        crate::metrics::DATA_ROUTES[self.index()]
    }
}

/// The whole front door: data routes here, the rest to `router`.
#[derive(Clone)]
pub struct Front {
    state: SharedState,
    router: Router,
}

impl Front {
    /// The door of `state`, with `router` (`app::app`) for every route that is not data.
    pub fn new(state: SharedState, router: Router) -> Front {
        Front { state, router }
    }
}

/// The future of one request, boxed: hyper moves it into place, and a pointer moves cheaper
/// than the whole state machine (measured: `memcpy` was 7 % of kv-lb's samples unboxed).
type Answer = Pin<Box<dyn Future<Output = Response<LbBody>> + Send>>;

impl Handler for Front {
    type Body = LbBody;
    type BodyError = BoxError;

    fn handle(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<LbBody>> + Send + use<> {
        // Each kind is boxed on its own, so a data request's box (and the copy into it) is only
        // as large as the data path's future, not the router's.
        let answer: Answer = match DataRoute::of(request.uri().path()) {
            Some(route) => {
                let state = Arc::clone(&self.state);
                Box::pin(async move { data(&state, route, request).await })
            }
            None => {
                let answer = self.router.handle(request, peer);
                Box::pin(async move { answer.await.map(LbBody::Local) })
            }
        };
        answer
    }
}

/// Answers one data request: request id, auth, the route, metrics.
pub async fn data<B>(state: &LbState, route: DataRoute, mut request: Request<B>) -> Response<LbBody>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Display + Send + Sync + 'static + Into<BoxError>,
{
    let started = Instant::now();
    let id = request_id(request.headers());
    request.headers_mut().insert(X_REQUEST_ID, id.clone());
    let method = request.method().clone();
    let id_text = id.to_str().unwrap_or_default();
    let mut response = match answer(state, route, request, id_text).await {
        Ok(response) => response.map(LbBody::Node),
        Err(error) => error.into_response().map(LbBody::Local),
    };
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    metrics::data_request_done(route.index(), &method, status, elapsed);
    debug!(
        request_id = id_text,
        %method,
        route = route.template(),
        status,
        elapsed_ms = elapsed.as_secs_f64() * 1000.0,
        "answered"
    );
    response.headers_mut().insert(X_REQUEST_ID, id);
    response
}

async fn answer<B>(
    state: &LbState,
    route: DataRoute,
    request: Request<B>,
    request_id: &str,
) -> Result<Response<ProxyBody>, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Display + Send + Sync + 'static + Into<BoxError>,
{
    if let Some(token) = &state.auth_token {
        if !kv_http::bearer_matches(request.headers(), token) {
            return Err(ApiError::Unauthorized);
        }
    }
    match route {
        DataRoute::Key => {
            // A clone of the URI shares its bytes: the key borrows from it, not from the request.
            let uri = request.uri().clone();
            let raw_key = uri.path().get("/v1/".len()..).unwrap_or_default();
            proxy::key_owner(state, raw_key, request, request_id).await
        }
        DataRoute::Batch if request.method() != Method::POST => Err(ApiError::MethodNotAllowed {
            method: request.method().to_string(),
            path: request.uri().path().to_owned(),
        }),
        DataRoute::List | DataRoute::ListSlash | DataRoute::Batch => {
            proxy::any_node(state, request, request_id).await
        }
    }
}

/// A response body: a node's answer streaming through, or one made here.
#[derive(Debug)]
pub enum LbBody {
    /// A node's answer.
    Node(ProxyBody),
    /// Made by the load balancer (errors, status routes).
    Local(Body),
}

impl http_body::Body for LbBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            LbBody::Node(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(BoxError::from))),
            LbBody::Local(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(BoxError::from))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            LbBody::Node(body) => body.is_end_stream(),
            LbBody::Local(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            LbBody::Node(body) => body.size_hint(),
            LbBody::Local(body) => body.size_hint(),
        }
    }
}
