//! (Compiled only under #[cfg(test)], from app.rs.) The whole router against tiny in-process fake nodes on 127.0.0.1:0: failover rules, health,
//! auth, request ids and JSON errors. No fixed sleeps: waits poll with a deadline.

use std::future::{Future, IntoFuture};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, Method, StatusCode};
use axum::response::IntoResponse;
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tower::ServiceExt;

use super::{app, LbState, SharedState};
use crate::config::{LbConfig, LogFormat};
use crate::health::spawn_checkers;

/// How a fake node answers.
#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    /// 200 with an echo of what it received.
    Healthy,
    /// 500 on everything.
    Failing,
    /// 503 on everything: "nothing was written".
    Refusing,
    /// Never answers.
    Hanging,
}

struct FakeNode {
    url: String,
    hits: Arc<AtomicUsize>,
}

impl FakeNode {
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn fake_node(behaviour: Behaviour) -> FakeNode {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let (name, counter) = (url.clone(), Arc::clone(&hits));
    let router = Router::new().fallback(move |request: Request| {
        let (name, counter) = (name.clone(), Arc::clone(&counter));
        async move { fake_answer(behaviour, &name, &counter, request).await }
    });
    tokio::spawn(axum::serve(listener, router).into_future());
    FakeNode { url, hits }
}

async fn fake_answer(
    behaviour: Behaviour,
    name: &str,
    hits: &AtomicUsize,
    request: Request,
) -> axum::response::Response {
    if request.uri().path() != "/health" {
        hits.fetch_add(1, Ordering::SeqCst);
    }
    match behaviour {
        Behaviour::Hanging => std::future::pending().await,
        Behaviour::Failing => {
            let body = json!({"error": "unavailable", "message": "node-side failure"});
            (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
        }
        Behaviour::Refusing => {
            let body = json!({"error": "clock_offset", "message": "nothing was written"});
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
        Behaviour::Healthy => {
            let mut echo = echo_of(name, &request);
            let body = request.into_body().collect().await.unwrap().to_bytes();
            echo["body"] = json!(String::from_utf8_lossy(&body));
            Json(echo).into_response()
        }
    }
}

/// What a healthy fake node saw, echoed back so tests can check what the LB sent.
fn echo_of(name: &str, request: &Request) -> Value {
    let header = |name| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    json!({
        "node": name,
        "method": request.method().as_str(),
        "uri": request.uri().to_string(),
        "authorization": header("authorization"),
        "request_id": header("x-request-id"),
        "kv_headers": request
            .headers()
            .iter()
            .filter(|(name, _)| name.as_str().starts_with("x-kv-"))
            .map(|(name, value)| format!("{name}={}", value.to_str().unwrap_or("?")))
            .collect::<Vec<_>>(),
    })
}

/// A URL nothing listens on: a port bound and released.
async fn refusing_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

fn config(nodes: &[&str]) -> LbConfig {
    LbConfig {
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
        listen: "127.0.0.1:0".parse().unwrap(),
        replication_factor: nodes.len(),
        vnodes: 64,
        auth_token: None,
        health_check_interval: Duration::from_millis(20),
        health_check_timeout: Duration::from_millis(200),
        request_timeout: Duration::from_secs(5),
        max_value_bytes: 1024,
        log_filter: "info".into(),
        log_format: LogFormat::Text,
        serve_limits: kv_http::ServeLimits::default(),
        worker_threads: 1,
        tls_identity: None,
        tls_ca_file: None,
    }
}

fn state(config: &LbConfig) -> SharedState {
    let upstream = crate::upstream::Upstream::new(kv_http::tls::client_config(None).unwrap());
    LbState::new(config, upstream, crate::metrics::detached_handle().unwrap())
}

/// A key whose preference list starts with `node`.
fn key_owned_by(state: &LbState, node: &str) -> String {
    (0..10_000)
        .map(|i| format!("key-{i}"))
        .find(|key| state.routing().ring.primary(key) == Some(node))
        .expect("some key has this primary")
}

async fn send(state: &SharedState, request: Request<Body>) -> (StatusCode, Value) {
    let response = app(Arc::clone(state)).oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, body)
}

fn request(method: Method, uri: &str, body: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::from(body.to_owned()))
        .unwrap()
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn get_and_post_fail_over_from_a_refusing_primary() {
    let (dead, a, b) = (
        refusing_url().await,
        fake_node(Behaviour::Healthy).await,
        fake_node(Behaviour::Healthy).await,
    );
    let state = state(&config(&[&dead, &a.url, &b.url]));
    let key = key_owned_by(&state, &dead);
    let (status, body) = send(&state, request(Method::GET, &format!("/v1/{key}"), "")).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(body["node"], json!(dead));
    let dead_index = state.routing().ring.position(&dead).unwrap();
    assert!(
        !state.routing().health.is_healthy(dead_index),
        "marked down passively"
    );

    let (status, body) = send(
        &state,
        request(Method::POST, &format!("/v1/{key}"), "{\"value\":1}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["body"], "{\"value\":1}", "body resent unchanged");
    assert_eq!(a.hits() + b.hits(), 2);
}

#[tokio::test]
async fn a_5xx_is_retried_for_reads_only() {
    let (bad, good) = (
        fake_node(Behaviour::Failing).await,
        fake_node(Behaviour::Healthy).await,
    );
    let state = state(&config(&[&bad.url, &good.url]));
    let key = key_owned_by(&state, &bad.url);

    let (status, body) = send(&state, request(Method::POST, &format!("/v1/{key}"), "{}")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        body["message"], "node-side failure",
        "node's answer passed through"
    );
    assert_eq!(
        good.hits(),
        0,
        "a write that may have been applied is not retried"
    );

    let (status, body) = send(&state, request(Method::GET, &format!("/v1/{key}"), "")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["node"], json!(good.url));
}

#[tokio::test]
async fn a_503_moves_any_request_on_since_the_node_wrote_nothing() {
    let (refusing, good) = (
        fake_node(Behaviour::Refusing).await,
        fake_node(Behaviour::Healthy).await,
    );
    let state = state(&config(&[&refusing.url, &good.url]));
    let key = key_owned_by(&state, &refusing.url);
    let (status, body) = send(&state, request(Method::POST, &format!("/v1/{key}"), "{}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["node"], json!(good.url));
    assert_eq!(refusing.hits(), 1);
    // When every node refuses, the client gets the last node's own answer.
    let state = state_refusing_only(&refusing.url).await;
    let (status, body) = send(&state, request(Method::POST, &format!("/v1/{key}"), "{}")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"], "clock_offset");
}

async fn state_refusing_only(first: &str) -> SharedState {
    let other = fake_node(Behaviour::Refusing).await;
    state(&config(&[first, &other.url]))
}

#[tokio::test]
async fn a_timeout_is_retried_for_reads_and_plain_writes_and_is_504_for_conditional_ones() {
    let (hung, good) = (
        fake_node(Behaviour::Hanging).await,
        fake_node(Behaviour::Healthy).await,
    );
    let mut config = config(&[&hung.url, &good.url]);
    config.request_timeout = Duration::from_millis(400);
    let state = state(&config);
    let key = key_owned_by(&state, &hung.url);

    let (status, body) = send(&state, request(Method::GET, &format!("/v1/{key}"), "")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["node"], json!(good.url));

    // A plain write carries a write id, so resending it (marked as a resend) is safe; the
    // proxy never gives it a version of its own.
    let (status, body) = send(&state, request(Method::PUT, &format!("/v1/{key}"), "{}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["node"], json!(good.url));
    assert_eq!(
        good.hits(),
        2,
        "the plain write moved on to the next replica"
    );
    let headers: Vec<&str> = body["kv_headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    assert_eq!(headers.len(), 3, "{headers:?}");
    assert!(headers.contains(&"x-kv-resend=1"), "{headers:?}");
    let age: u64 = headers
        .iter()
        .find_map(|h| h.strip_prefix("x-kv-resend-age-ms="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (100..2000).contains(&age),
        "sent after the first attempt timed out: {age} ms"
    );
    let id = headers
        .iter()
        .find_map(|h| h.strip_prefix("x-kv-write-id="))
        .unwrap();
    assert!(
        id.len() == 16
            && id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "{id}"
    );

    let mut conditional = request(Method::PUT, &format!("/v1/{key}"), "{}");
    conditional.headers_mut().insert(
        axum::http::header::IF_MATCH,
        axum::http::HeaderValue::from_static("*"),
    );
    let (status, body) = send(&state, conditional).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body["error"], "timeout");
    assert_eq!(
        good.hits(),
        2,
        "a conditional write is not sent to a second node"
    );
}

#[tokio::test]
async fn every_replica_down_is_503_json() {
    let state = state(&config(&[&refusing_url().await, &refusing_url().await]));
    for method in [Method::GET, Method::DELETE] {
        let (status, body) = send(&state, request(method, "/v1/k", "")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["error"], "unavailable");
        assert!(body["message"].as_str().unwrap().contains("2 node(s)"));
    }
}

async fn health_status(state: &SharedState) -> (StatusCode, String) {
    let (status, body) = send(state, request(Method::GET, "/health", "")).await;
    (
        status,
        body["status"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test]
async fn health_is_ok_degraded_or_down() {
    let (good, bad) = (
        fake_node(Behaviour::Healthy).await,
        fake_node(Behaviour::Failing).await,
    );
    let scenarios = [
        (vec![good.url.clone()], StatusCode::OK, "ok"),
        (
            vec![good.url.clone(), bad.url.clone()],
            StatusCode::OK,
            "degraded",
        ),
        (
            vec![bad.url.clone(), refusing_url().await],
            StatusCode::SERVICE_UNAVAILABLE,
            "down",
        ),
    ];
    for (nodes, want_status, want_word) in scenarios {
        let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
        let config = config(&nodes);
        let state = state(&config);
        let _checkers = spawn_checkers(
            state.routing().health.clone(),
            state.upstream.clone(),
            config.health_check_interval,
            config.health_check_timeout,
        );
        eventually(want_word, || async {
            health_status(&state).await == (want_status, want_word.to_owned())
        })
        .await;
    }
    let state = state(&config(&[&good.url]));
    let _checkers = spawn_checkers(
        state.routing().health.clone(),
        state.upstream.clone(),
        Duration::from_millis(20),
        Duration::from_millis(200),
    );
    eventually("latency recorded", || async {
        let (_, body) = send(&state, request(Method::GET, "/health", "")).await;
        body["nodes"][0]["latency_ms"].is_number()
    })
    .await;
}

#[tokio::test]
async fn auth_token_guards_data_routes_only() {
    let node = fake_node(Behaviour::Healthy).await;
    let mut config = config(&[&node.url]);
    config.auth_token = Some("s3cret".into());
    let state = state(&config);

    for auth in [None, Some("Bearer wrong"), Some("s3cret")] {
        let mut req = request(Method::GET, "/v1/k", "");
        if let Some(auth) = auth {
            req.headers_mut()
                .insert(header::AUTHORIZATION, auth.parse().unwrap());
        }
        let (status, body) = send(&state, req).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(body["error"], "unauthorized");
    }
    let mut req = request(Method::GET, "/v1/k", "");
    req.headers_mut()
        .insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
    let (status, body) = send(&state, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["authorization"], "Bearer s3cret",
        "passed on to the node"
    );
    assert_eq!(
        send(&state, request(Method::POST, "/batch", "[]")).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(&state, request(Method::GET, "/health", "")).await.0,
        StatusCode::OK
    );
    assert_eq!(node.hits(), 1);
}

#[tokio::test]
async fn node_to_node_headers_from_clients_never_reach_a_node() {
    let node = fake_node(Behaviour::Healthy).await;
    let state = state(&config(&[&node.url]));
    let client_version = "0000000000010000-0000abcd";
    for (method, uri) in [
        (Method::POST, "/v1/k"),
        (Method::GET, "/v1/k"),
        (Method::POST, "/batch"),
    ] {
        let mut req = request(method.clone(), uri, "{\"value\":1}");
        for (name, value) in [
            ("x-kv-forwarded", "1"),
            ("x-kv-secret", "guess"),
            ("x-kv-request-ids", "a,b"),
            ("X-KV-Future-Marker", "1"),
            ("x-kv-version", client_version),
        ] {
            req.headers_mut().insert(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        let (status, body) = send(&state, req).await;
        assert_eq!(status, StatusCode::OK, "{method} {uri}");
        assert_eq!(
            body["kv_headers"],
            json!([format!("x-kv-version={client_version}")]),
            "{method} {uri}: only the client's own version passes"
        );
    }
}

#[tokio::test]
async fn a_plain_write_gets_a_fresh_write_id_and_a_client_cannot_set_one() {
    let node = fake_node(Behaviour::Healthy).await;
    let state = state(&config(&[&node.url]));
    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut req = request(Method::POST, "/v1/k", "{\"value\":1}");
        for (name, value) in [("x-kv-write-id", "00000000000000aa"), ("x-kv-resend", "1")] {
            req.headers_mut().insert(name, value.parse().unwrap());
        }
        let (status, body) = send(&state, req).await;
        assert_eq!(status, StatusCode::OK);
        let headers = body["kv_headers"].as_array().unwrap().clone();
        assert_eq!(
            headers.len(),
            1,
            "no resend flag on a first send: {headers:?}"
        );
        let id = headers[0].as_str().unwrap().strip_prefix("x-kv-write-id=");
        let id = id.unwrap().to_owned();
        assert_ne!(id, "00000000000000aa", "the client's id was replaced");
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1], "each write gets its own id");
    for method in [Method::GET, Method::DELETE] {
        let mut req = request(method.clone(), "/v1/k", "");
        if method == Method::DELETE {
            req.headers_mut()
                .insert(header::IF_MATCH, "*".parse().unwrap());
        }
        let (_, body) = send(&state, req).await;
        assert_eq!(body["kv_headers"], json!([]), "{method}: no write id");
    }
}

#[tokio::test]
async fn request_id_is_kept_or_generated_and_travels() {
    let node = fake_node(Behaviour::Healthy).await;
    let state = state(&config(&[&node.url]));
    let mut req = request(Method::GET, "/v1/k", "");
    req.headers_mut()
        .insert("x-request-id", "trace-42".parse().unwrap());
    let response = app(Arc::clone(&state)).oneshot(req).await.unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-42");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["request_id"],
        "trace-42"
    );

    let response = app(Arc::clone(&state))
        .oneshot(request(Method::GET, "/v1/k", ""))
        .await
        .unwrap();
    let generated = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(generated.len(), 32);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["request_id"],
        json!(generated)
    );
}

#[tokio::test]
async fn raw_path_and_query_pass_unchanged_and_the_decoded_key_routes() {
    let nodes = [
        fake_node(Behaviour::Healthy).await,
        fake_node(Behaviour::Healthy).await,
        fake_node(Behaviour::Healthy).await,
    ];
    let urls: Vec<&str> = nodes.iter().map(|n| n.url.as_str()).collect();
    let mut config = config(&urls);
    config.replication_factor = 2;
    let state = state(&config);
    let (status, body) = send(
        &state,
        request(Method::GET, "/v1/users%2F42/name?r=one", ""),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["uri"], "/v1/users%2F42/name?r=one");
    assert_eq!(
        body["node"],
        json!(state.routing().ring.primary("users/42/name").unwrap())
    );
}

#[tokio::test]
async fn unkeyed_routes_go_round_robin() {
    let (a, b) = (
        fake_node(Behaviour::Healthy).await,
        fake_node(Behaviour::Healthy).await,
    );
    let state = state(&config(&[&a.url, &b.url]));
    let (first, second) = (
        send(&state, request(Method::POST, "/batch", "[]")).await.1,
        send(&state, request(Method::GET, "/v1", "")).await.1,
    );
    assert_ne!(first["node"], second["node"]);
    assert_eq!((a.hits(), b.hits()), (1, 1));
}

#[tokio::test]
async fn errors_of_the_lb_itself_are_json() {
    let node = fake_node(Behaviour::Healthy).await;
    let state = state(&config(&[&node.url]));
    let cases = [
        (
            Method::GET,
            "/nowhere",
            "",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::POST,
            "/health",
            "",
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            Method::GET,
            "/batch",
            "",
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            Method::GET,
            "/v1/%FF",
            "",
            StatusCode::BAD_REQUEST,
            "invalid_key",
        ),
    ];
    for (method, uri, body, want_status, want_code) in cases {
        let (status, json) = send(&state, request(method, uri, body)).await;
        assert_eq!(
            (status, json["error"].as_str()),
            (want_status, Some(want_code)),
            "{uri}"
        );
    }
    let too_big = "x".repeat(1024 + super::BODY_MARGIN_BYTES + 1);
    let (status, json) = send(&state, request(Method::POST, "/v1/k", &too_big)).await;
    assert_eq!(
        (status, json["error"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large"))
    );
    assert_eq!(node.hits(), 0);
}

#[tokio::test]
async fn status_and_metrics_answer() {
    let node = fake_node(Behaviour::Healthy).await;
    let state = state(&config(&[&node.url]));
    send(&state, request(Method::GET, "/v1/k", "")).await;
    let (status, body) = send(&state, request(Method::GET, "/", "")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["name"], "kv-lb");
    assert_eq!(body["vnodes"], 64);
    assert_eq!(body["counters"]["requests"], 1);
    assert_eq!(body["nodes"][0]["url"], json!(node.url));
    let response = app(state)
        .oneshot(request(Method::GET, "/metrics", ""))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}
