//! Black-box tests of real 3- and 5-node clusters: placement, forwarding, quorums, hinted
//! handoff, tombstones and convergence, with nodes killed by SIGKILL.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use kv_tests::{send, wait_until, Options, TestCluster};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn put(node: &str, key: &str, value: Value, query: &str) -> kv_tests::Answer {
    send(
        "POST",
        &format!("{node}/v1/{key}{query}"),
        Some(&json!({ "value": value }).to_string()),
    )
    .unwrap()
}

fn get(node: &str, key: &str, query: &str) -> kv_tests::Answer {
    send("GET", &format!("{node}/v1/{key}{query}"), None).unwrap()
}

/// The node's own stored entry for a key (no coordination): `Some(bytes)` when it has one.
fn local_entry(node: &str, key: &str) -> Option<String> {
    let answer = send("GET", &format!("{node}/internal/entry/{key}"), None).unwrap();
    (answer.status == 200).then_some(answer.text)
}

fn keys_on(node: &kv_tests::Node) -> u64 {
    node.status()["keys"].as_u64().unwrap_or(0)
}

#[test]
fn three_nodes_with_n3_store_every_key_everywhere_and_any_node_serves_any_key() {
    let c = TestCluster::start(3);
    for i in 0..60 {
        let answer = put(c.url(i % 3), &format!("k{i}"), json!(i), "");
        assert_eq!(answer.status, 200, "{}", answer.text);
    }
    wait_until(
        Duration::from_secs(10),
        "every node holds all 60 keys",
        || c.nodes.iter().all(|n| keys_on(n) == 60),
    );
    for i in 0..60 {
        for node in 0..3 {
            let answer = get(c.url(node), &format!("k{i}"), "");
            assert_eq!(
                (answer.status, answer.json["value"].clone()),
                (200, json!(i))
            );
        }
    }
    // With N = number of nodes, no request ever needs forwarding.
    assert!(c
        .nodes
        .iter()
        .all(|n| n.status()["forwarded_requests"] == 0));
}

#[test]
fn five_nodes_with_n3_keep_each_key_on_exactly_three_and_forward_the_rest() {
    let c = TestCluster::start_with(Options {
        nodes: 5,
        replication_factor: 3,
        ..Options::default()
    });
    let keys = 200;
    for i in 0..keys {
        let answer = put(c.url(i % 5), &format!("key/{i}"), json!({"i": i}), "");
        assert_eq!(answer.status, 200, "{}", answer.text);
    }
    wait_until(Duration::from_secs(10), "3 copies of every key", || {
        c.nodes.iter().map(keys_on).sum::<u64>() == 3 * keys as u64
    });
    for i in (0..keys).step_by(7) {
        let key = format!("key%2F{i}");
        let holders = c
            .nodes
            .iter()
            .filter(|n| local_entry(&n.url, &key).is_some())
            .count();
        assert_eq!(holders, 3, "key/{i} is on {holders} nodes");
        for node in 0..5 {
            assert_eq!(
                get(c.url(node), &format!("key/{i}"), "").json["value"]["i"],
                i
            );
        }
    }
    let forwarded: u64 = c
        .nodes
        .iter()
        .map(|n| n.status()["forwarded_requests"].as_u64().unwrap())
        .sum();
    assert!(
        forwarded > 0,
        "non-replicas must have forwarded some requests"
    );
    for node in &c.nodes {
        let share = keys_on(node) as f64 / keys as f64;
        assert!(
            (0.3..=0.9).contains(&share),
            "{} holds {share:.2} of the keys",
            node.name
        );
    }
}

/// Writes keys in a loop from several threads until told to stop; returns what was acknowledged.
fn write_load(
    nodes: Vec<String>,
    stop: Arc<AtomicBool>,
    prefix: &'static str,
) -> std::thread::JoinHandle<(HashMap<String, i64>, usize)> {
    std::thread::spawn(move || {
        let acked = Arc::new(Mutex::new(HashMap::new()));
        let failures = Arc::new(Mutex::new(0usize));
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let (nodes, stop, acked, failures) =
                    (nodes.clone(), stop.clone(), acked.clone(), failures.clone());
                std::thread::spawn(move || {
                    for i in 0..5_000i64 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let key = format!("{prefix}-{w}-{}", i % 50);
                        let node = &nodes[(i as usize + w) % nodes.len()];
                        match send(
                            "POST",
                            &format!("{node}/v1/{key}"),
                            Some(&json!({"value": i}).to_string()),
                        ) {
                            Ok(a) if a.status == 200 => {
                                acked.lock().unwrap().insert(key, i);
                            }
                            _ => *failures.lock().unwrap() += 1,
                        }
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        let acked = acked.lock().unwrap().clone();
        let failures = *failures.lock().unwrap();
        (acked, failures)
    })
}

#[test]
fn kill_9_of_one_node_loses_no_quorum_write_and_hints_catch_it_up() {
    let mut c = TestCluster::start(3);
    c.wait_converged();
    let survivors = vec![c.url(0).to_owned(), c.url(1).to_owned()];
    let stop = Arc::new(AtomicBool::new(false));
    let load = write_load(survivors.clone(), stop.clone(), "load");
    wait_until(Duration::from_secs(10), "some writes landed", || {
        keys_on(&c.nodes[0]) > 20
    });
    c.nodes[2].kill9();
    wait_until(Duration::from_secs(5), "node3 is seen down", || {
        c.nodes[0].sees_down(Some(c.url(2)))
    });
    // Keep writing while it is down, then also delete one key that node3 holds.
    for i in 0..30 {
        assert_eq!(
            put(&survivors[i % 2], &format!("while-down-{i}"), json!(i), "").status,
            200
        );
    }
    assert_eq!(
        put(&survivors[0], "never", json!("x"), "?w=all").status,
        503,
        "w=all cannot be met with a node down"
    );
    assert_eq!(put(&survivors[0], "doomed", json!("x"), "").status, 200);
    assert_eq!(
        send("DELETE", &format!("{}/v1/doomed", survivors[1]), None)
            .unwrap()
            .status,
        200
    );
    stop.store(true, Ordering::Relaxed);
    let (acked, failures) = load.join().unwrap();
    assert_eq!(failures, 0, "quorum writes failed while one node was down");
    assert!(
        c.nodes[0].status()["hints_pending"].as_u64().unwrap() > 0,
        "hints kept for node3"
    );

    c.nodes[2].restart();
    wait_until(Duration::from_secs(15), "hints delivered", || {
        c.nodes.iter().all(|n| n.status()["hints_pending"] == 0)
    });
    // Node3 now holds, locally, what it missed: delivered by hints, not read repair.
    for i in 0..30 {
        assert!(
            local_entry(c.url(2), &format!("while-down-{i}")).is_some(),
            "while-down-{i} never reached node3"
        );
    }
    let never = get(c.url(2), "never", "?r=all");
    assert_eq!(never.status, 404, "a write refused with 503 was applied");
    let doomed = get(c.url(2), "doomed", "?r=all");
    assert_eq!(
        doomed.status, 404,
        "a key deleted while node3 was down came back: {}",
        doomed.text
    );
    for (key, value) in &acked {
        let answer = get(c.url(2), key, "?r=all");
        assert_eq!(answer.status, 200, "{key}: {}", answer.text);
        assert!(
            answer.json["value"].as_i64().unwrap() >= *value,
            "{key} lost its acknowledged write {value}"
        );
    }
}

#[test]
fn concurrent_writers_on_one_key_converge_on_every_replica() {
    let c = TestCluster::start(3);
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let node = c.url(t % 3).to_owned();
            std::thread::spawn(move || {
                for i in 0..10 {
                    assert_eq!(put(&node, "hot", json!(format!("{t}-{i}")), "").status, 200);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    wait_until(
        Duration::from_secs(10),
        "all replicas hold the same entry",
        || {
            let entries: Vec<_> = c.nodes.iter().map(|n| local_entry(&n.url, "hot")).collect();
            entries[0].is_some() && entries.iter().all(|e| *e == entries[0])
        },
    );
    let answers: Vec<_> = (0..3)
        .map(|i| get(c.url(i), "hot", "?r=one").json)
        .collect();
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
}

#[test]
fn with_two_of_three_down_quorum_writes_get_503_and_w_one_succeeds() {
    let mut c = TestCluster::start(3);
    c.nodes[1].kill9();
    c.nodes[2].kill9();
    let node = c.url(0).to_owned();
    wait_until(Duration::from_secs(5), "node1 sees both peers down", || {
        c.nodes[0].sees_down(None)
    });
    let refused = put(&node, "k", json!(1), "");
    assert_eq!(refused.status, 503, "{}", refused.text);
    assert_eq!(refused.json["error"], "unavailable");
    let message = refused.json["message"].as_str().unwrap();
    assert!(
        message.contains('1') && message.contains('2'),
        "needed and answered in: {message}"
    );
    let accepted = put(&node, "k", json!(2), "?w=one");
    assert_eq!(accepted.status, 200, "{}", accepted.text);
    assert_eq!(get(&node, "k", "?r=one").json["value"], 2);
    assert_eq!(
        get(&node, "k", "").status,
        503,
        "quorum read with one node up"
    );
}

#[test]
fn cluster_secret_guards_internal_calls_and_replication_still_works() {
    let c = TestCluster::start_with(Options {
        env: vec![("CLUSTER_SECRET".into(), "s3cret".into())],
        ..Options::default()
    });
    assert_eq!(put(c.url(0), "k", json!(1), "?w=all").status, 200);
    let refused = send("GET", &format!("{}/internal/entry/k", c.url(1)), None).unwrap();
    assert_eq!(
        (refused.status, refused.json["error"].clone()),
        (401, json!("unauthorized"))
    );
    let bad = kv_tests::send_with(
        "POST",
        &format!("{}/internal/replicate", c.url(1)),
        Some("junk"),
        &[],
    )
    .unwrap();
    assert_eq!(bad.status, 401);
    let allowed = kv_tests::send_with(
        "GET",
        &format!("{}/internal/entry/k", c.url(1)),
        None,
        &[("x-kv-secret", "s3cret")],
    )
    .unwrap();
    assert_eq!(allowed.status, 200);
    // The batched read endpoint is guarded too, and refuses a body that is no key list.
    let refused = send("POST", &format!("{}/internal/entries", c.url(1)), Some("x")).unwrap();
    assert_eq!(refused.status, 401);
    let junk = kv_tests::send_with(
        "POST",
        &format!("{}/internal/entries", c.url(1)),
        Some("junk"),
        &[("x-kv-secret", "s3cret")],
    )
    .unwrap();
    assert_eq!(
        (junk.status, junk.json["error"].clone()),
        (400, json!("invalid_batch"))
    );
    // Quorum reads go through it (with the secret) and see the write.
    let read = send("GET", &format!("{}/v1/k?r=all", c.url(2)), None).unwrap();
    assert_eq!((read.status, read.json["value"].clone()), (200, json!(1)));
}

#[test]
fn a_dead_peer_is_marked_down_within_about_two_seconds() {
    let mut c = TestCluster::start_with(Options {
        env: vec![("HEALTH_CHECK_INTERVAL_MS".into(), "500".into())],
        ..Options::default()
    });
    c.wait_converged();
    c.nodes[1].kill9();
    let killed = std::time::Instant::now();
    let dead = c.url(1).to_owned();
    wait_until(
        Duration::from_secs(5),
        "node2 is seen down by node1",
        || {
            c.nodes[0].status()["peers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["url"] == dead && p["state"] == "down")
        },
    );
    assert!(
        killed.elapsed() < Duration::from_millis(2500),
        "took {:?}",
        killed.elapsed()
    );
    // Skipped without waiting for a timeout: quorum writes stay fast.
    let started = std::time::Instant::now();
    for i in 0..20 {
        assert_eq!(put(c.url(0), &format!("fast{i}"), json!(i), "").status, 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "20 writes took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_forwarded_request_returns_the_owners_answer_unchanged() {
    let c = TestCluster::start_with(Options {
        nodes: 4,
        replication_factor: 1,
        ..Options::default()
    });
    // With N = 1 most keys live on another node than the one asked.
    for i in 0..20 {
        let key = format!("fwd{i}");
        assert_eq!(put(c.url(0), &key, json!(i), "").status, 200);
        let via_other = get(c.url(1), &key, "");
        assert_eq!(
            (via_other.status, via_other.json["value"].clone()),
            (200, json!(i))
        );
        assert!(via_other.headers.contains_key("etag"));
        let missing = get(c.url(2), &format!("absent{i}"), "");
        assert_eq!(
            (missing.status, missing.json["error"].clone()),
            (404, json!("not_found"))
        );
    }
    let forwarded: u64 = c
        .nodes
        .iter()
        .map(|n| n.status()["forwarded_requests"].as_u64().unwrap())
        .sum();
    assert!(
        forwarded >= 30,
        "expected most requests to be forwarded, got {forwarded}"
    );
}
