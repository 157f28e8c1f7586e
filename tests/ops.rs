//! Black-box tests of the operations features: `/metrics` (parsed as Prometheus text) moving
//! with traffic, one request id followed through the LB, the coordinator and a replica,
//! backups taken under load and restored into a fresh node, and SIGTERM under load.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

#[path = "ops/prometheus.rs"]
mod prometheus;

use kv_tests::{
    bin_dir, client, free_port, send, send_with, wait_until, Node, Options, TestCluster,
};
use prometheus::Exposition;
use serde_json::json;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

const TOKEN: &str = "ops-test-token";
const BEARER: &str = "Bearer ops-test-token";

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `GET {url}/metrics`, parsed strictly as Prometheus text.
fn scrape(url: &str) -> Exposition {
    let answer = send("GET", &format!("{url}/metrics"), None).unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text);
    let content_type = answer.headers["content-type"].to_str().unwrap();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    prometheus::parse(&answer.text).unwrap_or_else(|e| panic!("{url}/metrics: {e}"))
}

#[test]
fn metrics_parse_and_move_with_traffic() {
    // N = 1 of 3: one key has exactly one owner, so its counters alone must move.
    let c = TestCluster::start_with(Options {
        nodes: 3,
        replication_factor: 1,
        lb: true,
        env: Vec::new(),
    });
    let lb = c.lb_url.clone().unwrap();
    let writes = [
        ("route", "/v1/{*key}"),
        ("method", "POST"),
        ("status", "200"),
    ];
    let before: Vec<f64> = c
        .nodes
        .iter()
        .map(|n| scrape(&n.url).sum("kv_http_requests_total", &writes))
        .collect();
    let lb_posts = [("method", "POST"), ("status", "200")];
    let lb_before = scrape(&lb).sum("kv_lb_requests_total", &lb_posts);
    for i in 0..10 {
        let body = json!({ "value": i }).to_string();
        let put = send("POST", &format!("{lb}/v1/ops/metrics"), Some(&body)).unwrap();
        assert_eq!(put.status, 200, "{}", put.text);
    }
    let owner = c
        .nodes
        .iter()
        .position(|n| n.status()["keys"] == 1)
        .expect("one node owns the key");
    let m = scrape(c.url(owner));
    let rose = m.sum("kv_http_requests_total", &writes) - before[owner];
    assert!(rose >= 10.0, "the owner's write counter rose by {rose}");
    assert!(m.sum("kv_wal_appends_total", &[]) >= 10.0);
    assert!(m.sum("kv_wal_records_total", &[]) >= 10.0);
    assert!(m.sum("kv_wal_bytes_written_total", &[]) > 0.0);
    assert!(m.observations("kv_wal_fsync_seconds").unwrap() >= 1.0);
    assert!(m.observations("kv_wal_batch_records").unwrap() >= 1.0);
    assert!(m.observations("kv_http_request_duration_seconds").unwrap() >= 10.0);
    assert_eq!(m.sum("kv_keys", &[]), 1.0);
    assert!(m.sum("kv_wal_bytes", &[]) > 0.0);
    assert_eq!(m.sum("kv_peer_up", &[]), 2.0, "both peers up");
    assert_eq!(m.sum("kv_hints_pending", &[]), 0.0);
    let lb_rose = scrape(&lb).sum("kv_lb_requests_total", &lb_posts) - lb_before;
    assert!(lb_rose >= 10.0, "the LB's POST counter rose by {lb_rose}");
    assert_eq!(scrape(&lb).sum("kv_lb_node_healthy", &[]), 3.0);

    // A forced checkpoint answers its figures and shows up in the metrics.
    let cp = send("POST", &format!("{}/admin/checkpoint", c.url(owner)), None).unwrap();
    assert_eq!(cp.status, 200, "{}", cp.text);
    assert_eq!(cp.json["keys"], 1);
    assert!(cp.json["bytes"].as_u64().unwrap() > 0);
    let m = scrape(c.url(owner));
    assert!(m.sum("kv_checkpoints_total", &[("result", "ok")]) >= 1.0);
    assert!(m.observations("kv_checkpoint_duration_seconds").unwrap() >= 1.0);
    assert!(m.sum("kv_snapshot_bytes", &[]) > 0.0);
    assert!(m.sum("kv_snapshot_timestamp_seconds", &[]) > 1.6e9);
    let wrong = send("GET", &format!("{}/admin/checkpoint", c.url(owner)), None).unwrap();
    assert_eq!(wrong.status, 405);
    assert_eq!(wrong.headers["allow"], "POST");
}

/// Lines of a log file that mention `needle`.
fn lines_with(log: &Path, needle: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

#[test]
fn one_request_id_is_logged_by_the_lb_the_coordinator_and_a_replica() {
    let c = TestCluster::start_with(Options {
        nodes: 3,
        replication_factor: 3,
        lb: true,
        env: env(&[("RUST_LOG", "debug")]),
    });
    let lb = c.lb_url.clone().unwrap();
    let id = "test-trace-123";
    let put = send_with(
        "POST",
        &format!("{lb}/v1/traced"),
        Some(r#"{"value": 1}"#),
        &[("X-Request-Id", id)],
    )
    .unwrap();
    assert_eq!(put.status, 200, "{}", put.text);
    assert_eq!(put.headers["x-request-id"], id);
    let debug_lines = |log: &Path, route: &str| -> usize {
        lines_with(log, id)
            .iter()
            .filter(|l| l.contains("DEBUG") && l.contains(route))
            .count()
    };
    let lb_log = c.dir.path().join("lb.log");
    wait_until(
        Duration::from_secs(10),
        "all three processes log the id",
        || {
            let coordinators = c
                .nodes
                .iter()
                .filter(|n| debug_lines(&n.log, "/v1/") > 0)
                .count();
            let replicas = c
                .nodes
                .iter()
                .filter(|n| debug_lines(&n.log, "/internal/replicate") > 0)
                .count();
            debug_lines(&lb_log, "/v1/") > 0 && coordinators == 1 && replicas >= 1
        },
    );
    let acks: f64 = c
        .nodes
        .iter()
        .map(|n| scrape(&n.url).sum("kv_replication_acks_total", &[]))
        .sum();
    assert!(acks >= 1.0, "replication acks are counted");
}

/// Writes `{prefix}{i}` = i through `url` until `stop` or `max` writes or the first failure;
/// every acknowledged key is pushed to `acked` right after its 200.
fn write_load(
    url: &str,
    prefix: &str,
    max: usize,
    stop: &Arc<AtomicBool>,
    acked: &Arc<Mutex<Vec<String>>>,
) -> JoinHandle<()> {
    let (url, prefix) = (url.to_owned(), prefix.to_owned());
    let (stop, acked) = (Arc::clone(stop), Arc::clone(acked));
    std::thread::spawn(move || {
        for i in 0..max {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let key = format!("{prefix}{i}");
            let body = json!({ "value": key }).to_string();
            let headers = [("Authorization", BEARER)];
            match send_with("POST", &format!("{url}/v1/{key}"), Some(&body), &headers) {
                Ok(a) if a.status == 200 => acked.lock().unwrap().push(key),
                _ => return,
            }
        }
    })
}

/// Runs `kv-node restore` with `args` and only the environment given.
fn restore(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(bin_dir().join("kv-node"))
        .arg("restore")
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn assert_refused(out: &Output, says: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(says), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

#[test]
fn a_backup_taken_under_load_restores_every_earlier_write() {
    let c = TestCluster::start_with(Options {
        nodes: 1,
        replication_factor: 1,
        lb: false,
        env: env(&[("AUTH_TOKEN", TOKEN)]),
    });
    let url = c.url(0).to_owned();
    let no_token = send("GET", &format!("{url}/admin/backup"), None).unwrap();
    assert_eq!(no_token.status, 401, "admin routes need the token");
    let (stop, acked) = (Arc::new(AtomicBool::new(false)), Arc::default());
    let writers: Vec<_> = (0..3)
        .map(|w| write_load(&url, &format!("w{w}/"), 5_000, &stop, &acked))
        .collect();
    wait_until(
        Duration::from_secs(30),
        "300 writes are acknowledged",
        || acked.lock().unwrap().len() >= 300,
    );
    let before_backup: Vec<String> = acked.lock().unwrap().clone();
    let response = client()
        .get(format!("{url}/admin/backup"))
        .header("Authorization", BEARER)
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let file = c.dir.path().join("backup.db");
    let bytes = response.bytes().unwrap();
    std::fs::write(&file, &bytes).unwrap();
    stop.store(true, Ordering::Relaxed);
    writers.into_iter().for_each(|w| w.join().unwrap());
    assert!(
        acked.lock().unwrap().len() > before_backup.len(),
        "writes went on during the backup"
    );
    let leftovers = std::fs::read_dir(&c.nodes[0].data_dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("backup-")
        })
        .count();
    assert_eq!(leftovers, 0, "the temporary backup file is gone");

    // Bad files are refused and change nothing.
    let target = c.dir.path().join("restored");
    let target_arg = target.to_str().unwrap();
    let truncated = c.dir.path().join("truncated.db");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let out = restore(
        &[truncated.to_str().unwrap(), "--data-dir", target_arg],
        &[],
    );
    assert_refused(&out, "is not a usable kv backup");
    let foreign = c.dir.path().join("foreign.db");
    let noise: Vec<u8> = (0..8192u64)
        .map(|i| (i.wrapping_mul(6_364_136_223_846_793_005) >> 29) as u8)
        .collect();
    std::fs::write(&foreign, noise).unwrap();
    let out = restore(&[foreign.to_str().unwrap(), "--data-dir", target_arg], &[]);
    assert_refused(&out, "not a kv snapshot");
    assert!(!target.join("snapshot.db").exists());
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("stray"), b"x").unwrap();
    let out = restore(&[file.to_str().unwrap(), "--data-dir", target_arg], &[]);
    assert_refused(&out, "--force");

    // DATA_DIR from the environment, as the node computes it.
    let out = restore(
        &[file.to_str().unwrap(), "--force"],
        &[("DATA_DIR", target_arg)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("restored"));

    let port = free_port();
    let fresh_url = format!("http://127.0.0.1:{port}");
    let mut fresh = Node::new(
        "restored",
        &fresh_url,
        target.clone(),
        c.dir.path().join("restored.log"),
        env(&[
            ("NODE_NAME", "restored"),
            ("PORT", &port.to_string()),
            ("CURRENT_NODE_URL", &fresh_url),
            ("REPLICATION_FACTOR", "1"),
            ("DATA_DIR", target_arg),
            ("AUTH_TOKEN", TOKEN),
        ]),
    );
    fresh.restart();
    for key in &before_backup {
        let got = send_with(
            "GET",
            &format!("{fresh_url}/v1/{key}"),
            None,
            &[("Authorization", BEARER)],
        )
        .unwrap();
        assert_eq!(
            (got.status, got.json["value"].as_str()),
            (200, Some(key.as_str()))
        );
    }
}

#[test]
fn sigterm_under_load_exits_0_and_keeps_every_acknowledged_write() {
    let mut c = TestCluster::start_with(Options {
        nodes: 1,
        replication_factor: 1,
        lb: false,
        env: env(&[("AUTH_TOKEN", TOKEN)]),
    });
    let url = c.url(0).to_owned();
    let (stop, acked) = (Arc::new(AtomicBool::new(false)), Arc::default());
    let writers: Vec<_> = (0..4)
        .map(|w| write_load(&url, &format!("t{w}/"), 2_000, &stop, &acked))
        .collect();
    wait_until(
        Duration::from_secs(30),
        "200 writes are acknowledged",
        || acked.lock().unwrap().len() >= 200,
    );
    let status = c.nodes[0].terminate();
    assert_eq!(status.code(), Some(0), "{}", c.nodes[0].log_tail());
    stop.store(true, Ordering::Relaxed);
    writers.into_iter().for_each(|w| w.join().unwrap());
    let log = std::fs::read_to_string(&c.nodes[0].log).unwrap();
    assert!(log.contains("stopped cleanly"), "{log}");
    c.nodes[0].restart();
    let acked = acked.lock().unwrap().clone();
    let keys = c.nodes[0].status()["keys"].as_u64().unwrap() as usize;
    // Each writer stops at its first failure, which may be a write applied but not answered.
    assert!(
        (acked.len()..=acked.len() + 4).contains(&keys),
        "{keys} keys after {} acknowledged writes",
        acked.len()
    );
    for key in &acked {
        let got = send_with(
            "GET",
            &format!("{url}/v1/{key}"),
            None,
            &[("Authorization", BEARER)],
        )
        .unwrap();
        assert_eq!(got.status, 200, "{key} was acknowledged before SIGTERM");
    }
}
