//! Black-box tests of write ids (`x-kv-write-id`, `x-kv-resend`): a resent write applies at most
//! once, even when another client wrote the key in between, and a resend no replica can vouch
//! for (a replica restarted since the first send may have forgotten it) answers
//! `504 outcome_unknown` and changes nothing.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use kv_tests::{send, send_with, wait_until, Answer, TestCluster};
use serde_json::json;
use std::time::Duration;

const ID: &str = "1234abcd5678ef90";

fn write(node: &str, method: &str, key: &str, value: &str, headers: &[(&str, &str)]) -> Answer {
    let body = json!({ "value": value }).to_string();
    let body = (method != "DELETE").then_some(body.as_str());
    send_with(method, &format!("{node}/v1/{key}"), body, headers).unwrap()
}

fn first(node: &str, method: &str, key: &str) -> Answer {
    write(node, method, key, "first", &[("x-kv-write-id", ID)])
}

fn resend(node: &str, method: &str, key: &str) -> Answer {
    resend_aged(node, method, key, "500")
}

/// A resend whose first send left `age_ms` ago, as the LB says.
fn resend_aged(node: &str, method: &str, key: &str, age_ms: &str) -> Answer {
    let headers = [
        ("x-kv-write-id", ID),
        ("x-kv-resend", "1"),
        ("x-kv-resend-age-ms", age_ms),
    ];
    write(node, method, key, "first", &headers)
}

fn read_all(c: &TestCluster, key: &str) -> Vec<(u16, serde_json::Value)> {
    (0..3)
        .map(|i| {
            let answer = send("GET", &format!("{}/v1/{key}?r=all", c.url(i)), None).unwrap();
            (answer.status, answer.json["value"].clone())
        })
        .collect()
}

#[test]
fn a_resend_confirms_the_first_write_and_never_overwrites_a_later_one() {
    let c = TestCluster::start(3);
    c.wait_converged();
    let (a, b, other) = (c.url(0), c.url(1), c.url(2));

    let sent = first(a, "POST", "k");
    assert_eq!(sent.status, 200, "{}", sent.text);
    let version = sent.json["version"].as_str().unwrap().to_owned();
    let later = write(other, "PUT", "k", "later", &[]);
    assert_eq!(later.status, 200, "{}", later.text);
    assert!(later.json["version"].as_str().unwrap() > version.as_str());

    // The LB lost the first answer and resends through another node: it must not apply again.
    let again = resend(b, "POST", "k");
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(
        again.json["version"], version,
        "the resend answers the first write's version"
    );
    assert!(again.headers.contains_key("x-kv-acks"));
    for (status, value) in read_all(&c, "k") {
        assert_eq!(
            (status, value),
            (200, json!("later")),
            "the resend overwrote a later write"
        );
    }
    let seen = send_with(
        "POST",
        &format!("{a}/internal/seen"),
        Some(&json!({"key": "k", "id": ID}).to_string()),
        &[],
    )
    .unwrap();
    assert_eq!(seen.status, 200, "{}", seen.text);
    assert_eq!(seen.json["seen"], json!(version));

    // The same for a delete: resent after the key was written again, it deletes nothing.
    assert_eq!(first(a, "DELETE", "d").status, 404, "nothing to delete yet");
    assert_eq!(write(a, "PUT", "d", "x", &[]).status, 200);
    let deleted = first(a, "DELETE", "d");
    assert_eq!(deleted.status, 200, "{}", deleted.text);
    assert_eq!(write(other, "PUT", "d", "back", &[]).status, 200);
    let again = resend(b, "DELETE", "d");
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.json["deleted"], json!(true));
    for (status, value) in read_all(&c, "d") {
        assert_eq!(
            (status, value),
            (200, json!("back")),
            "the resend deleted again"
        );
    }
}

#[test]
fn a_resend_is_applied_anew_only_when_every_replica_can_vouch_it_never_saw_it() {
    let mut c = TestCluster::start(3);
    c.wait_converged();
    // Nodes that started with no data forgot nothing: an id none of them saw is a new write.
    let answer = resend_aged(c.url(0), "POST", "fresh", "30000");
    assert_eq!(answer.status, 200, "{}", answer.text);
    for (status, value) in read_all(&c, "fresh") {
        assert_eq!((status, value), (200, json!("first")));
    }

    // A node restarted with data may have applied the first send before and forgotten it.
    c.nodes[2].kill9();
    c.nodes[2].restart();
    c.wait_converged();
    let answer = resend_aged(c.url(0), "POST", "unknown", "30000");
    assert_eq!(answer.status, 504, "{}", answer.text);
    assert_eq!(answer.json["error"], "outcome_unknown");
    for (status, _) in read_all(&c, "unknown") {
        assert_eq!(status, 404, "a resend answered 504 wrote something");
    }

    // Without an age a resend may be as old as the window: no node vouches for that.
    let headers = [("x-kv-write-id", ID), ("x-kv-resend", "1")];
    let answer = write(c.url(0), "POST", "unknown", "first", &headers);
    assert_eq!(answer.status, 504, "{}", answer.text);

    // It can vouch for a resend whose first send is younger than its own run.
    wait_until(
        Duration::from_secs(15),
        "a fresh resend is applied once the restarted node has run longer than its age",
        || {
            let answer = resend_aged(c.url(1), "POST", "aged", "0");
            assert!([200, 504].contains(&answer.status), "{}", answer.text);
            answer.status == 200
        },
    );
    for (status, value) in read_all(&c, "aged") {
        assert_eq!((status, value), (200, json!("first")));
    }
}

#[test]
fn bad_write_ids_are_400_and_change_nothing() {
    let c = TestCluster::start(1);
    let node = c.url(0);
    for headers in [
        vec![("x-kv-write-id", "xyz")],
        vec![("x-kv-resend", "1")],
        vec![("x-kv-write-id", ID), ("x-kv-resend", "yes")],
        vec![("x-kv-write-id", ID), ("if-none-match", "*")],
    ] {
        let answer = write(node, "POST", "k", "v", &headers);
        assert_eq!(answer.status, 400, "{headers:?}: {}", answer.text);
        assert_eq!(answer.json["error"], "invalid_write_id", "{headers:?}");
    }
    let seen = send_with(
        "POST",
        &format!("{node}/internal/seen"),
        Some("{\"key\": \"k\"}"),
        &[],
    )
    .unwrap();
    assert_eq!(seen.status, 400, "{}", seen.text);
    let read = send("GET", &format!("{node}/v1/k"), None).unwrap();
    assert_eq!(read.status, 404);
}
