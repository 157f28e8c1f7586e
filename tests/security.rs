//! Black-box attacks on a closed cluster, as a caller on the same network without the cluster
//! credential would try them: forged membership views, reads of `/internal`, records from the
//! future, a client posing as a forwarding node, admin calls, and a node bound beyond loopback
//! with no secret at all. Each must fail and change nothing.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use kv_core::{Record, Version};
use kv_tests::{bin_dir, free_port, send, send_with, wait_until, Options, TestCluster};
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

const SECRET: &str = "sec-5d1e9a7c3b2f4e6a8c0d";
const TOKEN: &str = "tok-0a9b8c7d6e5f4a3b2c1d";
const KEYS: usize = 30;

/// The view that emptied every node of the first wave: one made-up member at a huge epoch.
const FORGED_VIEW: &str =
    r#"{"epoch": 999999, "members": [{"url": "http://127.0.0.1:9", "state": "active"}]}"#;

fn cluster(env: &[(&str, &str)]) -> TestCluster {
    TestCluster::start_with(Options {
        lb: true,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Options::default()
    })
}

fn now_ms() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    u64::try_from(since.as_millis()).unwrap()
}

/// `POST /internal/replicate` with an encoded batch; status and body text.
fn replicate(node: &str, records: &[Record], secret: Option<&str>) -> (u16, String) {
    let mut request = kv_tests::client()
        .post(format!("{node}/internal/replicate"))
        .body(kv_cluster::peer::encode_batch(records).to_vec());
    if let Some(secret) = secret {
        request = request.header("x-kv-secret", secret);
    }
    let answer = request.send().unwrap();
    (answer.status().as_u16(), answer.text().unwrap())
}

/// Node `i`'s own copy of `key` (`/internal/entry`, with the secret): present or not.
fn holds(c: &TestCluster, i: usize, key: &str) -> bool {
    let answer = send_with(
        "GET",
        &format!("{}/internal/entry/{key}", c.url(i)),
        None,
        &[("x-kv-secret", SECRET)],
    )
    .unwrap();
    answer.status == 200
}

fn epoch(c: &TestCluster, i: usize) -> Value {
    send("GET", &format!("{}/admin/members", c.url(i)), None)
        .unwrap()
        .json["epoch"]
        .clone()
}

/// Runs every unauthenticated attack against every node of `c`, whose data API needs `auth`.
fn attack_everything(c: &TestCluster, auth: &[(&str, &str)]) {
    let wrong = [("x-kv-secret", "not-the-secret")];
    for i in 0..c.nodes.len() {
        let node = c.url(i);
        for headers in [&[][..], &wrong[..]] {
            for (method, path, body) in [
                ("POST", "/internal/members", Some(FORGED_VIEW)),
                ("GET", "/internal/members", None),
                ("GET", "/internal/keys", None),
                ("GET", "/internal/keys?values=true", None),
                ("GET", "/internal/entry/key-1", None),
                ("POST", "/internal/entries", Some("junk")),
                ("POST", "/internal/versions", Some("junk")),
                ("GET", "/internal/transfer", None),
                ("POST", "/internal/estimate", Some(FORGED_VIEW)),
                (
                    "POST",
                    "/internal/propose",
                    Some(r#"{"view": {"epoch": 1, "members": []}, "proposer": "x"}"#),
                ),
            ] {
                let answer = send_with(method, &format!("{node}{path}"), body, headers).unwrap();
                assert_eq!(
                    answer.status, 401,
                    "{method} {path} {headers:?}: {}",
                    answer.text
                );
                assert!(
                    !answer.text.contains("value-"),
                    "no data leaks: {}",
                    answer.text
                );
                assert_eq!(answer.json["error"], "unauthorized");
            }
        }
        // The data API's token is no admin credential for a caller without it.
        for (method, path, body) in [
            ("GET", "/admin/backup", None),
            ("POST", "/admin/checkpoint", None),
            (
                "POST",
                "/admin/members",
                Some(r#"{"remove": ["http://127.0.0.1:1"]}"#),
            ),
        ] {
            let answer = send(method, &format!("{node}{path}"), body).unwrap();
            assert_eq!(answer.status, 401, "{method} {path}: {}", answer.text);
        }
        let forged = Record::put(
            "key-1",
            Version {
                hlc: u64::MAX - 1,
                node: 7,
            },
            "1".into(),
        );
        assert_eq!(replicate(node, &[forged], None).0, 401);
    }
    // Through the LB, client requests cannot reach /internal either.
    let lb = c.lb_url.as_deref().unwrap();
    let via_lb = send_with(
        "POST",
        &format!("{lb}/internal/members"),
        Some(FORGED_VIEW),
        auth,
    );
    assert!([401, 404, 405].contains(&via_lb.unwrap().status));
}

/// For `within`, every node keeps every key and epoch 0: the attacks changed nothing.
fn assert_nothing_changes(c: &TestCluster, within: Duration) {
    let deadline = Instant::now() + within;
    let mut rounds = 0;
    while Instant::now() < deadline || rounds == 0 {
        for i in 0..c.nodes.len() {
            assert_eq!(epoch(c, i), 0, "node{} adopted a view", i + 1);
            let missing: Vec<usize> = (0..KEYS)
                .filter(|k| !holds(c, i, &format!("key-{k}")))
                .collect();
            assert!(missing.is_empty(), "node{} lost keys {missing:?}", i + 1);
        }
        rounds += 1;
    }
}

fn write_keys(c: &TestCluster, auth: &[(&str, &str)]) {
    let lb = c.lb_url.as_deref().unwrap();
    for k in 0..KEYS {
        let body = format!(r#"{{"value": "value-{k}"}}"#);
        let answer =
            send_with("POST", &format!("{lb}/v1/key-{k}?w=all"), Some(&body), auth).unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text);
    }
}

#[test]
fn attacks_without_the_cluster_secret_fail_and_change_nothing() {
    let c = cluster(&[("CLUSTER_SECRET", SECRET)]);
    write_keys(&c, &[]);
    attack_everything(&c, &[]);
    assert_nothing_changes(&c, Duration::from_secs(3));
}

#[test]
fn auth_token_alone_closes_the_internal_routes_too() {
    // No CLUSTER_SECRET: the token is the cluster credential as well.
    let c = cluster(&[("AUTH_TOKEN", TOKEN)]);
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("authorization", bearer.as_str())];
    write_keys(&c, &auth);
    attack_everything(&c, &auth);
    // Peers carry the token as the secret: replication kept working, so every node holds every
    // key (checked with the token in the secret header).
    for i in 0..3 {
        for k in 0..KEYS {
            let entry = send_with(
                "GET",
                &format!("{}/internal/entry/key-{k}", c.url(i)),
                None,
                &[("x-kv-secret", TOKEN)],
            )
            .unwrap();
            assert_eq!(entry.status, 200, "node{} key-{k}", i + 1);
        }
    }
    // The token opens /admin.
    let checkpoint = send_with(
        "POST",
        &format!("{}/admin/checkpoint", c.url(0)),
        None,
        &auth,
    );
    assert_eq!(checkpoint.unwrap().status, 200);
}

#[test]
fn records_and_versions_from_the_future_are_refused() {
    let c = cluster(&[("CLUSTER_SECRET", SECRET)]);
    write_keys(&c, &[]);
    let node = c.url(0);
    // Even with the secret, a record far ahead of the clock is refused: it would win over every
    // later write and freeze the clock.
    let frozen = Record::put(
        "key-1",
        Version {
            hlc: u64::MAX - 1,
            node: 7,
        },
        "\"evil\"".into(),
    );
    let (status, text) = replicate(node, &[frozen], Some(SECRET));
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("invalid_version"), "{text}");
    let ahead = Version {
        hlc: (now_ms() + 60_000) << 16,
        node: 7,
    };
    let (status, _) = replicate(
        node,
        &[Record::put("key-1", ahead, "\"evil\"".into())],
        Some(SECRET),
    );
    assert_eq!(status, 400);
    // A client's own version 30 s ahead is refused too (MAX_CLOCK_OFFSET_MS = 500 by default).
    let header = format!("{:016x}-00000007", (now_ms() + 30_000) << 16);
    let answer = send_with(
        "POST",
        &format!("{node}/v1/key-2"),
        Some(r#"{"value": "evil"}"#),
        &[("x-kv-version", &header)],
    )
    .unwrap();
    assert_eq!(answer.status, 400, "{}", answer.text);
    assert_eq!(answer.json["error"], "invalid_version");
    // Nothing changed, and a later write still wins, with a version near the wall clock.
    for k in [1, 2] {
        let read = send("GET", &format!("{node}/v1/key-{k}"), None).unwrap();
        assert_eq!(read.json["value"], format!("value-{k}"));
    }
    let wrote = send(
        "POST",
        &format!("{node}/v1/key-1"),
        Some(r#"{"value": "later"}"#),
    )
    .unwrap();
    assert_eq!(wrote.status, 200);
    let version = wrote.json["version"].as_str().unwrap();
    let physical = u64::from_str_radix(&version[..16], 16).unwrap() >> 16;
    assert!(
        physical.abs_diff(now_ms()) < 60_000,
        "clock not dragged: {version}"
    );
    // A record a little ahead (within twice the offset) from a peer is still taken.
    let near = Version {
        hlc: (now_ms() + 200) << 16,
        node: 7,
    };
    let (status, text) = replicate(
        node,
        &[Record::put("key-3", near, "\"peer\"".into())],
        Some(SECRET),
    );
    assert_eq!(status, 200, "{text}");
}

#[test]
fn a_client_cannot_pose_as_a_forwarding_node() {
    let c = cluster(&[("CLUSTER_SECRET", SECRET)]);
    // A conditional write goes to the key's first replica; find a node that is not it.
    let lb = c.lb_url.as_deref().unwrap();
    let forwarded = |i: usize| {
        send("GET", &format!("{}/", c.url(i)), None).unwrap().json["forwarded_requests"]
            .as_u64()
            .unwrap()
    };
    let mut checked = 0;
    for k in 0..20 {
        let key = format!("cond-{k}");
        for i in 0..3 {
            let before = forwarded(i);
            let answer = send_with(
                "PUT",
                &format!("{}/v1/{key}", c.url(i)),
                Some(r#"{"value": 1}"#),
                &[("if-none-match", "*"), ("x-kv-forwarded", "1")],
            )
            .unwrap();
            if forwarded(i) > before {
                // Forwarded in spite of the client's marker: the marker was ignored.
                checked += 1;
            }
            assert!([200, 412].contains(&answer.status), "{}", answer.text);
        }
        // Exactly one conditional create of each key won: the first replica serialised them.
        let read = send("GET", &format!("{lb}/v1/{key}"), None).unwrap();
        assert_eq!(read.json["value"], 1);
    }
    assert!(
        checked >= 20,
        "non-owners forwarded the marked requests ({checked})"
    );
}

#[test]
fn a_node_bound_beyond_loopback_without_a_secret_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin_dir().join("kv-node"))
        .env_clear()
        .env("BIND_ADDR", "0.0.0.0")
        .env("PORT", free_port().to_string())
        .env("DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("CLUSTER_SECRET"), "{stderr}");
    let created = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(created, 0, "nothing was opened in DATA_DIR");
}

#[test]
fn an_open_loopback_node_says_so_once() {
    let c = TestCluster::start(1);
    let put = send(
        "POST",
        &format!("{}/v1/k", c.url(0)),
        Some(r#"{"value": 1}"#),
    )
    .unwrap();
    assert_eq!(put.status, 200);
    let log = &c.nodes[0].log;
    wait_until(
        Duration::from_secs(5),
        "the open-cluster warning is logged",
        || {
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .contains("no CLUSTER_SECRET")
        },
    );
    let text = std::fs::read_to_string(log).unwrap();
    let warnings = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("CLUSTER_SECRET"))
        .count();
    assert_eq!(warnings, 1, "{text}");
    // Open means open: an admin call needs no credential here.
    let checkpoint = send("POST", &format!("{}/admin/checkpoint", c.url(0)), None).unwrap();
    assert_eq!(checkpoint.status, 200);
}
