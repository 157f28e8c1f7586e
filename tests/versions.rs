//! Black-box tests of honest write outcomes and quorum reads that never go back in time:
//! `503` only when nothing was written, `X-KV-Acks` on every write answer, and a quorum read that
//! sees replicas disagree writes the newest record back to a quorum before it answers.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use kv_cluster::peer::encode_batch;
use kv_core::{Record, Version};
use kv_tests::{send, wait_until, TestCluster};
use serde_json::json;
use std::time::Duration;

fn acks(answer: &kv_tests::Answer) -> Option<u64> {
    answer
        .headers
        .get("x-kv-acks")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn put(node: &str, key: &str, value: serde_json::Value, query: &str) -> kv_tests::Answer {
    let body = json!({ "value": value }).to_string();
    send("POST", &format!("{node}/v1/{key}{query}"), Some(&body)).unwrap()
}

/// Node `node`'s own record of `key`, as the raw `/internal/entry` body.
fn local_entry(node: &str, key: &str) -> Option<Vec<u8>> {
    let response = kv_tests::client()
        .get(format!("{node}/internal/entry/{key}"))
        .send()
        .unwrap();
    (response.status() == 200).then(|| response.bytes().unwrap().to_vec())
}

#[test]
fn every_write_answer_says_how_many_durable_copies_were_confirmed() {
    let c = TestCluster::start(3);
    c.wait_converged();
    let node = c.url(0);
    let all = put(node, "a", json!(1), "?w=all");
    assert_eq!((all.status, acks(&all)), (200, Some(3)), "{}", all.text);
    let quorum = put(node, "q", json!(1), "");
    assert_eq!(quorum.status, 200);
    assert!(
        acks(&quorum).is_some_and(|n| n >= 2),
        "{:?}",
        quorum.headers
    );
    let one = put(node, "o", json!(1), "?w=one");
    assert!(acks(&one).is_some_and(|n| n >= 1));
    let deleted = send("DELETE", &format!("{node}/v1/a?w=all"), None).unwrap();
    assert_eq!((deleted.status, acks(&deleted)), (200, Some(3)));
    // A node that is not a replica forwards; the coordinator's count comes back unchanged.
    let forwarded = put(c.url(1), "a", json!(2), "?w=all");
    assert_eq!(acks(&forwarded), Some(3));
}

#[test]
fn a_write_refused_with_503_changed_nothing_anywhere() {
    let mut c = TestCluster::start(3);
    c.wait_converged();
    c.nodes[1].kill9();
    c.nodes[2].kill9();
    let node = c.url(0).to_owned();
    wait_until(Duration::from_secs(5), "node1 sees both peers down", || {
        c.nodes[0].sees_down(None)
    });
    for i in 0..10 {
        let refused = put(&node, &format!("refused-{i}"), json!(i), "");
        assert_eq!(refused.status, 503, "{}", refused.text);
        assert_eq!(refused.json["error"], "unavailable");
        assert_eq!(acks(&refused), Some(0));
        let message = refused.json["message"].as_str().unwrap();
        assert!(message.contains("nothing was written"), "{message}");
    }
    assert_eq!(c.nodes[0].status()["hints_pending"], 0, "no hint was kept");
    c.nodes[1].restart();
    c.nodes[2].restart();
    c.wait_converged();
    for i in 0..10 {
        for n in 0..3 {
            assert_eq!(
                local_entry(c.url(n), &format!("refused-{i}")),
                None,
                "node{} holds a write that was refused",
                n + 1
            );
        }
        let read = send("GET", &format!("{node}/v1/refused-{i}?r=all"), None).unwrap();
        assert_eq!(read.status, 404);
    }
}

#[test]
fn a_quorum_read_that_sees_disagreement_writes_back_before_answering() {
    let c = TestCluster::start(3);
    c.wait_converged();
    for (i, owner) in [0usize, 1, 2, 0, 1, 2].into_iter().enumerate() {
        let key = format!("abd-{i}");
        let node = c.url(owner);
        assert_eq!(put(node, &key, json!("old"), "?w=all").status, 200);
        // Only `owner` holds the newer record (as after a write that reached one replica).
        let version = Version {
            hlc: now_ms() << 16,
            node: 9,
        };
        let newer = Record::put(key.clone(), version, "\"new\"".into());
        let sent = kv_tests::client()
            .post(format!("{node}/internal/replicate"))
            .body(encode_batch(&[newer]).to_vec())
            .send()
            .unwrap();
        assert_eq!(sent.status(), 200);
        // The owner answers a quorum read from its own copy plus one peer's: they disagree, so
        // the newest is on a quorum before the answer leaves.
        let read = send("GET", &format!("{node}/v1/{key}"), None).unwrap();
        assert_eq!(read.json["value"], "new", "{}", read.text);
        let holders = (0..3)
            .filter(|&n| {
                local_entry(c.url(n), &key)
                    .is_some_and(|e| String::from_utf8_lossy(&e).contains("new"))
            })
            .count();
        assert!(
            holders >= 2,
            "{key}: the value read is on {holders} node(s)"
        );
        // And no later quorum read through any node returns the older value.
        for n in 0..3 {
            let again = send("GET", &format!("{}/v1/{key}", c.url(n)), None).unwrap();
            assert_eq!(again.json["value"], "new", "through node{}", n + 1);
        }
    }
}

#[test]
fn a_coordinator_behind_its_peers_fetches_their_newer_record_and_catches_up() {
    let c = TestCluster::start(3);
    c.wait_converged();
    for coordinator in 0..3usize {
        let key = format!("behind-{coordinator}");
        let node = c.url(coordinator);
        assert_eq!(put(node, &key, json!("old"), "?w=all").status, 200);
        // The two other replicas hold a newer record (a write the coordinator missed): its
        // digest read learns only their version, so it must fetch their record to answer it.
        let version = Version {
            hlc: now_ms() << 16,
            node: 9,
        };
        for other in (0..3).filter(|n| *n != coordinator) {
            inject(c.url(other), &key, version, "new");
        }
        let read = send("GET", &format!("{node}/v1/{key}"), None).unwrap();
        assert_eq!(read.status, 200, "{}", read.text);
        assert_eq!(read.json["value"], "new", "{}", read.text);
        // The coordinator's own copy is written back (the two peers already made a quorum, so
        // the answer may leave before that write lands).
        wait_until(
            Duration::from_secs(5),
            &format!("node{} holds the newer record", coordinator + 1),
            || local_entry(node, &key).is_some_and(|e| String::from_utf8_lossy(&e).contains("new")),
        );
        // And every quorum read, through any node, returns it.
        for n in 0..3 {
            let again = send("GET", &format!("{}/v1/{key}", c.url(n)), None).unwrap();
            assert_eq!(again.json["value"], "new", "through node{}", n + 1);
        }
    }
}

#[test]
fn the_digest_endpoint_answers_versions_and_refuses_a_bad_key_list() {
    let c = TestCluster::start(1);
    let node = c.url(0);
    let bad = kv_tests::client()
        .post(format!("{node}/internal/versions"))
        .body("junk")
        .send()
        .unwrap();
    assert_eq!(bad.status(), 400);
    let error: serde_json::Value = bad.json().unwrap();
    assert_eq!(error["error"], "invalid_batch", "{error}");
    assert_eq!(put(node, "d-1", json!("x"), "").status, 200);
    let keys = kv_cluster::peer::encode_keys(&["d-1".to_owned(), "d-2".to_owned()]);
    let answer = kv_tests::client()
        .post(format!("{node}/internal/versions"))
        .body(keys.to_vec())
        .send()
        .unwrap();
    assert_eq!(answer.status(), 200);
    let versions = kv_cluster::peer::decode_versions(&answer.bytes().unwrap(), 2).unwrap();
    assert!(versions[0].is_some(), "{versions:?}");
    assert_eq!(versions[1], None);
}

fn now_ms() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    u64::try_from(since.as_millis()).unwrap()
}

/// Puts `value` under `version` on node `node` only, as a replica would get it.
fn inject(node: &str, key: &str, version: Version, value: &str) {
    let record = Record::put(key.to_owned(), version, format!("\"{value}\"").into());
    let sent = kv_tests::client()
        .post(format!("{node}/internal/replicate"))
        .body(encode_batch(&[record]).to_vec())
        .send()
        .unwrap();
    assert_eq!(sent.status(), 200, "{}", sent.text().unwrap());
}

#[test]
fn a_replica_holding_a_newer_version_is_no_ack_and_the_write_goes_above_it() {
    let c = TestCluster::start(3);
    c.wait_converged();
    for i in 0..5 {
        let key = format!("stale-ack-{i}");
        // Two replicas hold a version from a clock 800 ms ahead of node1's (within what peers
        // may send): as if a write coordinated elsewhere had been acknowledged just before.
        let ahead = Version {
            hlc: (now_ms() + 800) << 16,
            node: 9,
        };
        inject(c.url(1), &key, ahead, "earlier");
        inject(c.url(2), &key, ahead, "earlier");
        // A write that starts after it must win, whatever node1's clock says.
        let later = put(c.url(0), &key, json!("later"), "");
        assert_eq!(later.status, 200, "{}", later.text);
        let version: Version = later.json["version"].as_str().unwrap().parse().unwrap();
        assert!(version > ahead, "{version} is not above {ahead}");
        for n in 0..3 {
            let read = send("GET", &format!("{}/v1/{key}", c.url(n)), None).unwrap();
            assert_eq!(read.json["value"], "later", "through node{}", n + 1);
        }
    }
}

#[test]
fn a_write_with_an_older_version_of_its_own_is_refused_and_changes_nothing() {
    let c = TestCluster::start(3);
    c.wait_converged();
    let node = c.url(0);
    let first = put(node, "own", json!("first"), "");
    assert_eq!(first.status, 200);
    let old = Version {
        hlc: (now_ms() - 60_000) << 16,
        node: 9,
    };
    let answer = kv_tests::send_with(
        "POST",
        &format!("{node}/v1/own"),
        Some(r#"{"value": "older"}"#),
        &[("x-kv-version", &old.to_string())],
    )
    .unwrap();
    assert_eq!(answer.status, 409, "{}", answer.text);
    assert_eq!(answer.json["error"], "version_conflict");
    assert_eq!(answer.json["current_version"], first.json["version"]);
    for n in 0..3 {
        let read = send("GET", &format!("{}/v1/own", c.url(n)), None).unwrap();
        assert_eq!(read.json["value"], "first");
    }
}

#[test]
fn racing_conditional_writes_have_one_winner_also_after_a_first_replica_died() {
    let mut c = TestCluster::start(3);
    c.wait_converged();
    let survivors = [c.url(1).to_owned(), c.url(2).to_owned()];
    let race = |key: &str| {
        let created = put(&survivors[0], key, json!(0), "");
        assert_eq!(created.status, 200, "{}", created.text);
        let version = created.json["version"].as_str().unwrap().to_owned();
        let winners: Vec<u16> = std::thread::scope(|scope| {
            let racers: Vec<_> = (0..6)
                .map(|i| {
                    let (node, version) = (&survivors[i % 2], &version);
                    scope.spawn(move || {
                        let if_match = format!("\"{version}\"");
                        kv_tests::send_with(
                            "PUT",
                            &format!("{node}/v1/{key}"),
                            Some(&json!({ "value": i + 1 }).to_string()),
                            &[("if-match", &if_match)],
                        )
                        .unwrap()
                        .status
                    })
                })
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        assert_eq!(
            winners.iter().filter(|s| **s == 200).count(),
            1,
            "{key}: {winners:?}"
        );
        assert!(
            winners.iter().all(|s| [200, 412].contains(s)),
            "{winners:?}"
        );
    };
    for k in 0..6 {
        race(&format!("before-{k}"));
    }
    // The first replica of about a third of the keys dies: the next live replica serialises.
    c.nodes[0].kill9();
    wait_until(Duration::from_secs(5), "node2 sees node1 down", || {
        c.nodes[1].sees_down(Some(c.url(0)))
    });
    wait_until(Duration::from_secs(5), "node3 sees node1 down", || {
        c.nodes[2].sees_down(Some(c.url(0)))
    });
    for k in 0..12 {
        race(&format!("after-{k}"));
    }
}
