//! Black-box tests of one real kv-node process: the data API of SPEC section 3 with every error
//! case, configuration errors, and durability across kill -9 and restarts.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use kv_tests::{bin_dir, send, send_with, Options, TestCluster};
use serde_json::json;
use std::process::Command;

fn single(env: &[(&str, &str)]) -> TestCluster {
    TestCluster::start_with(Options {
        nodes: 1,
        replication_factor: 1,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Options::default()
    })
}

#[test]
fn crud_round_trip_with_versions_and_etags() {
    let c = single(&[]);
    let url = format!("{}/v1/mykey", c.url(0));
    // The seed's curl example: a body without Content-Type.
    let put = send("POST", &url, Some(r#"{"value": "hello"}"#)).unwrap();
    assert_eq!(put.status, 200, "{}", put.text);
    assert_eq!(put.json["key"], "mykey");
    assert_eq!(put.json["value"], "hello");
    let v1 = put.json["version"].as_str().unwrap().to_owned();
    assert_eq!(put.headers["etag"].to_str().unwrap(), format!("\"{v1}\""));

    let get = send("GET", &url, None).unwrap();
    assert_eq!(
        (get.status, get.json["value"].clone()),
        (200, json!("hello"))
    );
    assert_eq!(get.json["version"], v1.as_str());

    let put2 = send(
        "PUT",
        &url,
        Some(r#"{"value": {"n": 1.50, "list": [1, null, true]}}"#),
    )
    .unwrap();
    assert_eq!(put2.status, 200);
    let v2 = put2.json["version"].as_str().unwrap().to_owned();
    assert!(v2 > v1, "versions must grow: {v1} then {v2}");
    let get = send("GET", &url, None).unwrap();
    assert!(
        get.text
            .contains(r#""value":{"n": 1.50, "list": [1, null, true]}"#),
        "value kept exactly: {}",
        get.text
    );

    let del = send("DELETE", &url, None).unwrap();
    assert_eq!(
        (del.status, del.json.clone()),
        (200, json!({"key": "mykey", "deleted": true}))
    );
    let gone = send("GET", &url, None).unwrap();
    assert_eq!(
        (gone.status, gone.json["error"].clone()),
        (404, json!("not_found"))
    );
    assert_eq!(send("DELETE", &url, None).unwrap().status, 404);
}

#[test]
fn keys_with_slashes_and_escapes_are_distinct_keys() {
    let c = single(&[]);
    let base = c.url(0);
    for (path, key) in [
        ("users/42/name", "users/42/name"),
        ("a%20b", "a b"),
        ("%C3%BC", "ü"),
        ("a%2Fb", "a/b"),
    ] {
        let put = send(
            "POST",
            &format!("{base}/v1/{path}"),
            Some(&format!(r#"{{"value": "{key}"}}"#)),
        )
        .unwrap();
        assert_eq!(put.status, 200, "{path}: {}", put.text);
        assert_eq!(put.json["key"], key);
    }
    let get = send("GET", &format!("{base}/v1/users/42/name"), None).unwrap();
    assert_eq!(get.json["value"], "users/42/name");
    // "a/b" written through %2F is the same key as a literal slash.
    assert_eq!(
        send("GET", &format!("{base}/v1/a/b"), None).unwrap().json["value"],
        "a/b"
    );
}

#[test]
fn every_bad_input_gets_a_json_error_and_changes_nothing() {
    let c = single(&[("MAX_VALUE_BYTES", "100"), ("MAX_KEY_BYTES", "16")]);
    let base = c.url(0);
    let key = format!("{base}/v1/k");
    assert_eq!(
        send("POST", &key, Some(r#"{"value": 1}"#)).unwrap().status,
        200
    );
    let cases: Vec<(&str, String, Option<&str>, u16, &str)> = vec![
        ("POST", key.clone(), Some("{not json"), 400, "invalid_json"),
        ("POST", key.clone(), Some("[1,2]"), 400, "invalid_json"),
        ("POST", key.clone(), Some(""), 400, "invalid_json"),
        (
            "POST",
            key.clone(),
            Some(r#"{"val": 2}"#),
            400,
            "missing_value",
        ),
        ("PUT", key.clone(), Some(r#"{}"#), 400, "missing_value"),
        (
            "POST",
            format!("{base}/v1/"),
            Some(r#"{"value": 2}"#),
            400,
            "invalid_key",
        ),
        ("DELETE", format!("{base}/v1"), None, 400, "invalid_key"),
        ("GET", format!("{base}/v1/"), None, 400, "invalid_key"),
        (
            "POST",
            format!("{base}/v1/{}", "k".repeat(17)),
            Some(r#"{"value": 2}"#),
            400,
            "invalid_key",
        ),
        ("GET", format!("{base}/v1/%FF"), None, 400, "invalid_key"),
        (
            "POST",
            format!("{key}?w=7"),
            Some(r#"{"value": 2}"#),
            400,
            "invalid_consistency",
        ),
        (
            "GET",
            format!("{key}?r=most"),
            None,
            400,
            "invalid_consistency",
        ),
        (
            "POST",
            key.clone(),
            Some(&*Box::leak(
                format!(r#"{{"value": "{}"}}"#, "x".repeat(200)).into_boxed_str(),
            )),
            413,
            "payload_too_large",
        ),
        (
            "PATCH",
            key.clone(),
            Some(r#"{"value": 2}"#),
            405,
            "method_not_allowed",
        ),
        ("GET", format!("{base}/nowhere"), None, 404, "not_found"),
    ];
    for (method, url, body, status, code) in cases {
        let answer = send(method, &url, body).unwrap();
        assert_eq!(answer.status, status, "{method} {url}: {}", answer.text);
        assert_eq!(
            answer.json["error"], code,
            "{method} {url}: {}",
            answer.text
        );
        assert!(answer.json["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    let big = "x".repeat(2 << 20);
    let answer = send("POST", &key, Some(&format!(r#"{{"value": "{big}"}}"#))).unwrap();
    assert_eq!(answer.status, 413);
    // Still serving, data intact.
    let get = send("GET", &key, None).unwrap();
    assert_eq!((get.status, get.json["value"].clone()), (200, json!(1)));
}

#[test]
fn auth_token_guards_the_data_api() {
    let c = single(&[("AUTH_TOKEN", "s3cret")]);
    let url = format!("{}/v1/k", c.url(0));
    let none = send("POST", &url, Some(r#"{"value": 1}"#)).unwrap();
    assert_eq!(
        (none.status, none.json["error"].clone()),
        (401, json!("unauthorized"))
    );
    let wrong = send_with("GET", &url, None, &[("Authorization", "Bearer nope")]).unwrap();
    assert_eq!(wrong.status, 401);
    let ok = send_with(
        "POST",
        &url,
        Some(r#"{"value": 1}"#),
        &[("Authorization", "Bearer s3cret")],
    )
    .unwrap();
    assert_eq!(ok.status, 200);
    let health = send("GET", &format!("{}/health", c.url(0)), None).unwrap();
    assert_eq!(health.status, 200, "/health needs no token");
}

#[test]
fn status_and_health_describe_the_node() {
    let c = single(&[]);
    let health = send("GET", &format!("{}/health", c.url(0)), None).unwrap();
    assert_eq!(
        (health.status, health.json["status"].clone()),
        (200, json!("ok"))
    );
    assert_eq!(
        health.json["epoch"], 0,
        "the membership epoch travels with health checks"
    );
    send(
        "POST",
        &format!("{}/v1/a", c.url(0)),
        Some(r#"{"value": 1}"#),
    )
    .unwrap();
    let status = c.nodes[0].status();
    assert_eq!(status["name"], "node1");
    assert_eq!(status["url"], c.url(0));
    assert_eq!(status["keys"], 1);
    assert!(status["wal_bytes"].as_u64().unwrap() > 0);
    assert_eq!(status["replication_factor"], 1);
    assert!(status["version"].is_string() && status["uptime_secs"].is_u64());
    assert_eq!(status["hints_pending"], 0);
    let answer = send("GET", &format!("{}/v1/a", c.url(0)), None).unwrap();
    assert!(answer.headers.contains_key("x-request-id"));
}

fn write_many(base: &str, range: std::ops::Range<usize>) {
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let base = base.to_owned();
            let range = range.clone();
            std::thread::spawn(move || {
                for i in range.filter(|i| i % 8 == t) {
                    let answer = send(
                        "POST",
                        &format!("{base}/v1/key-{i}"),
                        Some(&format!(r#"{{"value": {{"i": {i}}}}}"#)),
                    )
                    .unwrap();
                    assert_eq!(answer.status, 200, "{}", answer.text);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

fn assert_all_present(base: &str, range: std::ops::Range<usize>) {
    for i in range {
        let answer = send("GET", &format!("{base}/v1/key-{i}"), None).unwrap();
        assert_eq!(answer.status, 200, "key-{i} lost: {}", answer.text);
        assert_eq!(answer.json["value"]["i"], i);
    }
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let mut c = single(&[]);
    let base = c.url(0).to_owned();
    write_many(&base, 0..1000);
    c.nodes[0].kill9();
    c.nodes[0].restart();
    assert_all_present(&base, 0..1000);
    assert_eq!(c.nodes[0].status()["keys"], 1000);
}

#[test]
fn acknowledged_writes_survive_kill_9_after_checkpoints() {
    // A small WAL bound makes checkpoints run while the writes go on.
    let mut c = single(&[("WAL_MAX_BYTES", "8192")]);
    let base = c.url(0).to_owned();
    write_many(&base, 0..500);
    // A clean stop writes a checkpoint and exits 0.
    assert!(c.nodes[0].terminate().success());
    assert!(c.nodes[0].data_dir.join("snapshot.db").exists());
    c.nodes[0].restart();
    write_many(&base, 500..1000);
    for i in (0..1000).step_by(10) {
        send("DELETE", &format!("{base}/v1/key-{i}"), None).unwrap();
    }
    c.nodes[0].kill9();
    c.nodes[0].restart();
    for i in 0..1000 {
        let answer = send("GET", &format!("{base}/v1/key-{i}"), None).unwrap();
        let want = if i % 10 == 0 { 404 } else { 200 };
        assert_eq!(
            answer.status, want,
            "key-{i} after restart: {}",
            answer.text
        );
    }
}

fn run_node(env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    Command::new(bin_dir().join("kv-node"))
        .env_clear()
        .env("DATA_DIR", dir.path())
        .envs(env.iter().copied())
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn bad_configuration_exits_2_with_one_line_naming_the_variable() {
    for (var, value) in [
        ("REPLICATION_FACTOR", "0"),
        ("PORT", "99999"),
        ("CLUSTER_NODES", "::not a url::"),
        ("WAL_SYNC", "maybe"),
    ] {
        let out = run_node(&[(var, value)], &[]);
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(&format!("{var}={value}")), "{stderr}");
        assert!(!stderr.contains("panicked"));
    }
    let out = run_node(
        &[
            ("CURRENT_NODE_URL", "http://127.0.0.1:1"),
            ("CLUSTER_NODES", "http://127.0.0.1:2"),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn help_lists_every_variable_and_version_prints() {
    let out = run_node(&[], &["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "CURRENT_NODE_URL",
        "CLUSTER_NODES",
        "NODE_NAME",
        "PORT",
        "REPLICATION_FACTOR",
        "DATA_DIR",
        "WAL_SYNC",
        "AUTH_TOKEN",
        "CLUSTER_SECRET",
        "VNODES",
    ] {
        assert!(help.contains(var), "--help misses {var}");
    }
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.env.example")).unwrap();
    for line in help
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.chars().all(|c| c.is_ascii_uppercase() || c == '_') && w.len() > 2)
    {
        assert!(example.contains(line), ".env.example misses {line}");
    }
    let out = run_node(&[], &["--version"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("kv-node "));
}

/// `THP_enabled` of /proc/PID/status: `Some(false)` once the process turned transparent huge
/// pages off for itself (`None` on a kernel without the line).
fn thp_enabled(pid: u32) -> Option<bool> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("THP_enabled:"))?;
    Some(line.split_whitespace().nth(1)? != "0")
}

#[test]
fn node_and_lb_turn_transparent_huge_pages_off_unless_mimalloc_allow_thp_is_set() {
    let off = single(&[]);
    let enabled = thp_enabled(off.nodes[0].pid().unwrap()).expect(
        "this test needs Linux 5.0+ (/proc/PID/status with a THP_enabled line), which it lacks",
    );
    assert!(!enabled, "THP still enabled for kv-node by default");
    let with_lb = TestCluster::start_with(Options {
        nodes: 1,
        replication_factor: 1,
        lb: true,
        ..Options::default()
    });
    let lb_pid = with_lb.lb_pid().expect("the LB runs");
    assert_eq!(
        thp_enabled(lb_pid),
        Some(false),
        "THP still enabled for kv-lb by default"
    );
    let kept = single(&[("MIMALLOC_ALLOW_THP", "1")]);
    assert_eq!(thp_enabled(kept.nodes[0].pid().unwrap()), Some(true));
}
