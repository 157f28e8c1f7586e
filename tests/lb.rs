//! Black-box tests of kv-lb in front of real nodes: owner routing without forwarding, health,
//! failover without client-visible errors while a node is killed and restarted, and the
//! hardened door: idle and half-sent (slow-loris) connections are closed, others still served.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use kv_tests::{send, wait_until, Options, TestCluster};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn with_lb(nodes: usize, n: usize) -> TestCluster {
    TestCluster::start_with(Options {
        nodes,
        replication_factor: n,
        lb: true,
        env: vec![("HEALTH_CHECK_INTERVAL_MS".into(), "200".into())],
    })
}

fn forwarded_total(c: &TestCluster) -> u64 {
    c.nodes
        .iter()
        .filter(|n| n.is_running())
        .map(|n| n.status()["forwarded_requests"].as_u64().unwrap())
        .sum()
}

#[test]
fn the_lb_sends_each_key_straight_to_its_owner() {
    // N = 1 of 4: three quarters of the keys would need a forward if sent to a random node.
    let c = with_lb(4, 1);
    let lb = c.lb_url.clone().unwrap();
    for i in 0..60 {
        let put = send(
            "POST",
            &format!("{lb}/v1/owner/{i}"),
            Some(&json!({"value": i}).to_string()),
        )
        .unwrap();
        assert_eq!(put.status, 200, "{}", put.text);
        let get = send("GET", &format!("{lb}/v1/owner/{i}"), None).unwrap();
        assert_eq!(get.json["value"], i);
        assert!(get.headers.contains_key("x-request-id"));
    }
    assert_eq!(
        forwarded_total(&c),
        0,
        "the LB must not hop through a non-owner"
    );
    let keys: Vec<u64> = c
        .nodes
        .iter()
        .map(|n| n.status()["keys"].as_u64().unwrap())
        .collect();
    assert_eq!(keys.iter().sum::<u64>(), 60, "one copy each: {keys:?}");
    assert!(
        keys.iter().filter(|k| **k > 0).count() >= 3,
        "keys spread over the nodes: {keys:?}"
    );
    // The same requests sent to one node directly do get forwarded: the counter works.
    for i in 0..20 {
        send("GET", &format!("{}/v1/owner/{i}", c.url(0)), None).unwrap();
    }
    assert!(forwarded_total(&c) > 0);
}

#[test]
fn health_is_ok_then_degraded_naming_the_dead_node_then_down() {
    let mut c = with_lb(3, 3);
    let lb = c.lb_url.clone().unwrap();
    let health = || send("GET", &format!("{lb}/health"), None).unwrap();
    let ok = health();
    assert_eq!((ok.status, ok.json["status"].clone()), (200, json!("ok")));
    assert_eq!(ok.json["nodes"].as_array().unwrap().len(), 3);
    c.nodes[1].kill9();
    let dead = c.url(1).to_owned();
    wait_until(Duration::from_secs(5), "the LB reports degraded", || {
        health().json["status"] == "degraded"
    });
    let degraded = health();
    assert_eq!(degraded.status, 200);
    let nodes = degraded.json["nodes"].as_array().unwrap();
    let entry = nodes.iter().find(|n| n["url"] == dead.as_str()).unwrap();
    assert_eq!(entry["healthy"], false);
    assert!(nodes
        .iter()
        .filter(|n| n["healthy"] == true)
        .all(|n| n["latency_ms"].is_number()));
    c.nodes[0].kill9();
    c.nodes[2].kill9();
    wait_until(Duration::from_secs(5), "the LB reports down", || {
        health().status == 503
    });
    assert_eq!(health().json["status"], "down");
}

#[derive(Default)]
struct Tally {
    reads: usize,
    writes: usize,
    failed_reads: Vec<String>,
    failed_writes: Vec<String>,
    acked: HashMap<String, i64>,
}

/// Reads and writes through the LB from 4 threads until `stop`, bounded at 20,000 operations.
fn client_load(lb: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Tally> {
    std::thread::spawn(move || {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let (lb, stop, tally) = (lb.clone(), stop.clone(), tally.clone());
                std::thread::spawn(move || {
                    for i in 0..5_000i64 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let key = format!("fo-{w}-{}", i % 40);
                        if i % 2 == 0 {
                            let answer = send(
                                "PUT",
                                &format!("{lb}/v1/{key}"),
                                Some(&json!({"value": i}).to_string()),
                            );
                            let mut t = tally.lock().unwrap();
                            t.writes += 1;
                            match answer {
                                Ok(a) if a.status == 200 => {
                                    t.acked.insert(key, i);
                                }
                                other => t.failed_writes.push(format!("{key}: {other:?}")),
                            }
                        } else {
                            let answer = send("GET", &format!("{lb}/v1/{key}"), None);
                            let mut t = tally.lock().unwrap();
                            t.reads += 1;
                            match answer {
                                Ok(a) if a.status == 200 || a.status == 404 => {}
                                other => t.failed_reads.push(format!("{key}: {other:?}")),
                            }
                        }
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        Arc::try_unwrap(tally).ok().unwrap().into_inner().unwrap()
    })
}

#[test]
fn failover_hides_a_killed_and_restarted_node_from_clients() {
    let mut c = with_lb(3, 3);
    c.wait_converged();
    let lb = c.lb_url.clone().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let load = client_load(lb.clone(), stop.clone());
    let mut victims = 0;
    let started = Instant::now();
    for victim in [0usize, 2] {
        wait_until(Duration::from_secs(10), "traffic flows", || {
            c.nodes[1].status()["keys"].as_u64().unwrap_or(0) > 10
        });
        c.nodes[victim].kill9();
        victims += 1;
        let down_at = Instant::now();
        wait_until(
            Duration::from_secs(10),
            "clients keep going while it is down",
            || down_at.elapsed() > Duration::from_secs(2),
        );
        c.nodes[victim].restart();
        c.wait_converged();
    }
    stop.store(true, Ordering::Relaxed);
    let tally = load.join().unwrap();
    assert_eq!(victims, 2);
    assert!(
        tally.reads > 50 && tally.writes > 50,
        "too little traffic: {} reads, {} writes in {:?}",
        tally.reads,
        tally.writes,
        started.elapsed()
    );
    assert!(
        tally.failed_reads.is_empty(),
        "failed reads: {:?}",
        tally.failed_reads
    );
    assert!(
        tally.failed_writes.is_empty(),
        "failed quorum writes: {:?}",
        tally.failed_writes
    );
    for (key, value) in &tally.acked {
        let answer = send("GET", &format!("{lb}/v1/{key}?r=all"), None).unwrap();
        assert_eq!(answer.status, 200, "{key}: {}", answer.text);
        let got: Value = answer.json["value"].clone();
        assert!(
            got.as_i64().unwrap() >= *value,
            "{key}: acknowledged {value}, read {got}"
        );
    }
}

/// Whether the server closed `stream`: a read sees end of file or an error (not "would block").
fn is_closed(stream: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// Opens `count` connections to `addr`, each sending `prefix` (possibly nothing), left open.
fn open_connections(addr: &str, count: usize, prefix: &[u8]) -> Vec<std::net::TcpStream> {
    use std::io::Write;
    (0..count)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream.write_all(prefix).unwrap();
            stream.set_nonblocking(true).unwrap();
            stream
        })
        .collect()
}

/// Waits (bounded) until every stream is closed; returns how long that took.
fn wait_all_closed(streams: &mut [std::net::TcpStream], within: Duration, what: &str) {
    let started = Instant::now();
    let mut open: Vec<usize> = (0..streams.len()).collect();
    while !open.is_empty() {
        open.retain(|&i| !is_closed(&mut streams[i]));
        assert!(
            started.elapsed() < within,
            "{} of {} {what} connections still open after {within:?}",
            open.len(),
            streams.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_lb_closes_idle_and_half_sent_connections_and_keeps_serving() {
    const HEAD_MS: u64 = 1000;
    const IDLE_MS: u64 = 8000;
    let c = TestCluster::start_with(Options {
        nodes: 1,
        replication_factor: 1,
        lb: true,
        env: vec![
            ("HEAD_TIMEOUT_MS".into(), HEAD_MS.to_string()),
            ("IDLE_TIMEOUT_MS".into(), IDLE_MS.to_string()),
        ],
    });
    let lb = c.lb_url.clone().unwrap();
    let addr = lb.trim_start_matches("http://").to_owned();
    let opened = Instant::now();
    let mut idle = open_connections(&addr, 400, b"");
    let mut half_sent =
        open_connections(&addr, 40, b"GET /health HTTP/1.1\r\nHost: lb\r\nX-Slow: ");

    // With 440 connections held open, ordinary requests still answer quickly.
    for i in 0..20 {
        let started = Instant::now();
        let put = send(
            "PUT",
            &format!("{lb}/v1/loris/{i}"),
            Some(r#"{"value": 1}"#),
        )
        .unwrap();
        let get = send("GET", &format!("{lb}/v1/loris/{i}"), None).unwrap();
        assert_eq!((put.status, get.status), (200, 200), "{}", put.text);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a write and a read took {:?}",
            started.elapsed()
        );
    }

    wait_all_closed(&mut half_sent, Duration::from_secs(60), "half-sent");
    let half_sent_closed = opened.elapsed();
    wait_all_closed(&mut idle, Duration::from_secs(60), "idle");
    // Half-sent heads are cut at the head deadline, well before the idle timeout.
    assert!(
        half_sent_closed < Duration::from_millis(IDLE_MS),
        "half-sent heads closed only after {half_sent_closed:?}"
    );
    assert!(
        opened.elapsed() >= Duration::from_millis(IDLE_MS),
        "idle connections closed before the idle timeout ({:?})",
        opened.elapsed()
    );
    // And the LB still serves new connections.
    assert_eq!(
        send("GET", &format!("{lb}/health"), None).unwrap().status,
        200
    );
}
