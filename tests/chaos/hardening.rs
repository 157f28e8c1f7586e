//! Hardening of the HTTP surface, checked from outside: size limits (400 / 413 / 431), a
//! slow-loris client cannot hold a node, a cap on concurrent connections, `/internal` closed
//! without the cluster secret, and no token or value in the info-level logs.

use kv_tests::faults::{ChaosCluster, ChaosOptions};
use kv_tests::{send, send_with, wait_until};
use serde_json::json;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn one_node(env: &[(&str, &str)]) -> ChaosCluster {
    ChaosCluster::start(&ChaosOptions {
        nodes: 1,
        replication_factor: 1,
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..ChaosOptions::default()
    })
}

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().unwrap()
}

/// Sends raw bytes on a fresh connection and returns the status line's code (0: no answer).
fn raw_status(url: &str, request: &[u8]) -> u16 {
    let mut stream = TcpStream::connect(addr_of(url)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The server may answer and close before it read everything: a failed write is fine.
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn oversized_keys_and_bodies_are_refused_with_400_and_413() {
    let c = one_node(&[]);
    let url = c.url(0);
    let long_key = "k".repeat(2_000);
    let key = send(
        "POST",
        &format!("{url}/v1/{long_key}"),
        Some(r#"{"value":1}"#),
    )
    .unwrap();
    assert_eq!(
        (key.status, key.json["error"].clone()),
        (400, json!("invalid_key"))
    );
    let big = format!(r#"{{"value":"{}"}}"#, "v".repeat(1_100_000));
    let body = send("POST", &format!("{url}/v1/big"), Some(&big)).unwrap();
    assert_eq!(body.status, 413, "{}", body.text);
    // Chunked, no Content-Length: the limit holds while streaming too.
    let mut chunked =
        b"POST /v1/chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..80 {
        chunked.extend_from_slice(format!("{:x}\r\n{}\r\n", 65_536, "a".repeat(65_536)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(raw_status(url, &chunked), 413, "5 MiB chunked body");
    assert!(c.nodes[0].is_healthy(), "the node survived");
}

#[test]
fn oversized_request_heads_are_refused_with_431() {
    let c = one_node(&[]);
    let url = c.url(0);
    let huge_header = "h".repeat(64 * 1024);
    let header = send_with(
        "GET",
        &format!("{url}/health"),
        None,
        &[("x-big", &huge_header)],
    );
    assert_eq!(
        header.map(|a| a.status).unwrap_or(0),
        431,
        "a 64 KiB header"
    );
    let mut many = b"GET /health HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..500 {
        many.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(raw_status(url, &many), 431, "500 headers");
    assert!(c.nodes[0].is_healthy(), "the node survived");
}

/// How long a client may take to send its request head before the node closes the connection.
const HEAD_DEADLINE: Duration = Duration::from_secs(15);

/// Sends a request head one byte a second; returns how long the node kept the connection open
/// (`None`: still open after `HEAD_DEADLINE` plus a margin).
fn slow_loris(addr: SocketAddr) -> Option<Duration> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).ok()?;
    // The read timeout paces the loop: one byte, then up to a second of listening.
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    let mut byte = [0u8; 1];
    for i in 0..(HEAD_DEADLINE.as_secs() + 5) {
        let next = head.get(i as usize).copied().unwrap_or(b'a');
        if stream.write_all(&[next]).is_err() {
            return Some(started.elapsed());
        }
        match stream.read(&mut byte) {
            Ok(_) => return Some(started.elapsed()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

#[test]
fn a_slow_loris_client_is_cut_off_and_cannot_hold_the_node() {
    let c = one_node(&[]);
    let addr = addr_of(c.url(0));
    let loris: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(move || slow_loris(addr)))
        .collect();
    // Meanwhile everybody else is served promptly.
    for i in 0..20 {
        let started = Instant::now();
        let answer = send(
            "POST",
            &format!("{}/v1/k{i}", c.url(0)),
            Some(r#"{"value":1}"#),
        )
        .unwrap();
        assert_eq!(answer.status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a write took {:?}",
            started.elapsed()
        );
    }
    for handle in loris {
        let held = handle.join().unwrap();
        assert!(
            held.is_some_and(|d| d <= HEAD_DEADLINE),
            "a slow-loris connection was held for {held:?} (limit {HEAD_DEADLINE:?})"
        );
    }
}

/// Open sockets of a process (its listener included), from /proc.
fn sockets_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(Result::ok)
                .filter(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn concurrent_connections_are_capped() {
    const CAP: usize = 16;
    let c = one_node(&[("MAX_CONNECTIONS", "16")]);
    let pid = c.nodes[0].pid().unwrap();
    let addr = addr_of(c.url(0));
    let idle: Vec<TcpStream> = (0..4 * CAP)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    assert!(idle.len() >= 2 * CAP, "could not even open the connections");
    // Give the node time to accept what it will: poll what it holds for two seconds.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut held = 0;
    while Instant::now() < deadline && held <= CAP + 4 {
        held = held.max(sockets_of(pid));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        held <= CAP + 4,
        "the node holds {held} sockets with a cap of {CAP}"
    );
    drop(idle);
    wait_until(Duration::from_secs(10), "the node serves again", || {
        c.nodes[0].is_healthy()
    });
}

#[test]
fn internal_endpoints_refuse_calls_without_the_cluster_secret() {
    let c = ChaosCluster::start(&ChaosOptions {
        lb: true,
        env: vec![("CLUSTER_SECRET".into(), "clu5ter-secret".into())],
        ..ChaosOptions::default()
    });
    assert_eq!(
        send(
            "POST",
            &format!("{}/v1/k", c.url(0)),
            Some(r#"{"value":1}"#)
        )
        .unwrap()
        .status,
        200
    );
    let lb = &c.lb.as_ref().unwrap().url;
    for (method, path, body) in [
        ("GET", "/internal/entry/k", None),
        ("GET", "/internal/keys", None),
        ("POST", "/internal/replicate", Some("\u{1}\0\0\0")),
    ] {
        for secret in [None, Some("wrong"), Some("")] {
            let headers: Vec<(&str, &str)> =
                secret.map(|s| ("x-kv-secret", s)).into_iter().collect();
            let answer = send_with(method, &format!("{}{path}", c.url(1)), body, &headers).unwrap();
            assert_eq!(
                answer.status, 401,
                "{method} {path} with {secret:?}: {}",
                answer.text
            );
        }
        // The LB never passes /internal through.
        let via_lb = send(method, &format!("{lb}{path}"), body).unwrap();
        assert!(
            [401, 404, 405].contains(&via_lb.status),
            "{method} {path} through the LB: {} {}",
            via_lb.status,
            via_lb.text
        );
    }
}

#[test]
fn info_logs_never_contain_tokens_or_values() {
    const TOKEN: &str = "tok-3f9a1c77e2d4b5a6";
    const SECRET: &str = "sec-8b2e4d6f0a1c3e5g";
    const VALUE: &str = "val-q7w8e9r0t1y2u3i4";
    let c = ChaosCluster::start(&ChaosOptions {
        lb: true,
        env: vec![
            ("AUTH_TOKEN".into(), TOKEN.into()),
            ("CLUSTER_SECRET".into(), SECRET.into()),
            ("RUST_LOG".into(), "info".into()),
        ],
        ..ChaosOptions::default()
    });
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("authorization", bearer.as_str())];
    let lb = c.lb.as_ref().unwrap().url.clone();
    let body = json!({ "value": VALUE }).to_string();
    for base in [lb.as_str(), c.url(0), c.url(1)] {
        let wrote =
            send_with("POST", &format!("{base}/v1/secret-key"), Some(&body), &auth).unwrap();
        assert_eq!(wrote.status, 200, "{}", wrote.text);
        let read = send_with("GET", &format!("{base}/v1/secret-key"), None, &auth).unwrap();
        assert_eq!(read.json["value"], VALUE);
        // Wrong and missing tokens, bad bodies carrying the value: logged as errors, if at all.
        let wrong = [("authorization", "Bearer tok-3f9a1c77e2d4b5a7")];
        assert_eq!(
            send_with("GET", &format!("{base}/v1/secret-key"), None, &wrong)
                .unwrap()
                .status,
            401
        );
        let bad = format!("{{\"value\": \"{VALUE}\"");
        assert_eq!(
            send_with("POST", &format!("{base}/v1/k2"), Some(&bad), &auth)
                .unwrap()
                .status,
            400
        );
    }
    let mut logs = vec![c.lb.as_ref().unwrap().log.clone()];
    logs.extend(c.nodes.iter().map(|n| n.log.clone()));
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap();
        for needle in [TOKEN, SECRET, VALUE] {
            assert!(
                !text.contains(needle),
                "{} contains {needle}",
                log.display()
            );
        }
    }
}
