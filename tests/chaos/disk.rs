//! Disk full on one node (its DATA_DIR on a 3 MiB tmpfs, `MIN_FREE_BYTES` 256 KiB): the node turns
//! read-only, not failed. Writes that need it answer `507 insufficient_storage`, writes the others
//! can carry still succeed through it, reads go on, `/health` stays 200 and says why; once the
//! tmpfs is grown back its writes resume by themselves within seconds, no restart; and neither
//! that nor a later kill -9 loses anything it acknowledged.

use kv_tests::faults::{report, ChaosCluster, ChaosOptions, Tmpfs};
use kv_tests::{send, wait_until};
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn put(node: &str, key: &str, value: &str, query: &str) -> kv_tests::Answer {
    send(
        "POST",
        &format!("{node}/v1/{key}{query}"),
        Some(&json!({ "value": value }).to_string()),
    )
    .unwrap()
}

/// Every key in `acked` reads back with its value from `node` at consistency `r`.
fn missing(node: &str, acked: &HashMap<String, String>, r: &str) -> Vec<String> {
    acked
        .iter()
        .filter(|(k, v)| {
            let read = send("GET", &format!("{node}/v1/{k}?r={r}"), None).unwrap();
            read.status != 200 || read.json["value"] != json!(v)
        })
        .map(|(k, _)| k.clone())
        .collect()
}

#[test]
fn a_full_disk_makes_a_node_read_only_and_it_resumes_when_space_returns() {
    let scratch = tempfile::tempdir().unwrap();
    let mount_point = scratch.path().join("node1");
    let tmpfs = Tmpfs::mount(&mount_point, "3m").unwrap_or_else(|why| {
        panic!(
            "this test needs to mount a tmpfs (run it as root, with `mount` available, as CI \
             does): {why}"
        )
    });
    let mut c = ChaosCluster::start(&ChaosOptions {
        data_dirs: HashMap::from([(0, mount_point.clone())]),
        node_env: HashMap::from([(0, vec![("MIN_FREE_BYTES".into(), "262144".into())])]),
        ..ChaosOptions::default()
    });
    let node = c.url(0).to_owned();
    // w=all through node1: a 200 means node1's own WAL holds it.
    let mut on_node1: HashMap<String, String> = HashMap::new();
    let mut acked: HashMap<String, String> = HashMap::new();
    let big = "x".repeat(32 * 1024);
    let started = Instant::now();
    let mut refusal = None;
    let mut unsure = 0;
    for i in 0..400 {
        let (key, value) = (format!("fill-{i}"), format!("{i}-{big}"));
        let answer = put(&node, &key, &value, "?w=all");
        match answer.status {
            200 => {
                on_node1.insert(key.clone(), value.clone());
                acked.insert(key, value);
            }
            507 => {
                refusal = Some(answer);
                break;
            }
            // The write in flight when the disk filled: stored elsewhere, not on node1.
            503 | 504 => unsure += 1,
            other => panic!("filling: {other} {}", answer.text),
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "filling took too long"
        );
    }
    let refusal = refusal.expect("3 MiB never filled up, or the node never answered 507");
    assert_eq!(
        refusal.json["error"], "insufficient_storage",
        "{}",
        refusal.text
    );
    assert!(unsure <= 3, "{unsure} writes with an unknown outcome");
    // Read-only, not failed: it says why, /health stays 200.
    let tiny = put(&node, "tiny", "t", "?w=all");
    assert_eq!(tiny.status, 507, "{}", tiny.text);
    let health = send("GET", &format!("{node}/health"), None).unwrap();
    assert_eq!(health.status, 200, "{}", health.text);
    assert!(health.json["read_only"].is_string(), "{}", health.text);
    assert!(
        health.json.get("writes_refused").is_none(),
        "{}",
        health.text
    );
    let status = c.nodes[0].status();
    assert!(status["read_only"].is_string(), "{status}");
    assert!(status["writes_refused"].is_null(), "{status}");
    // Writes the other replicas can carry go through node1 as coordinator; reads go on.
    for i in 0..5 {
        let (key, value) = (format!("during-{i}"), format!("d{i}"));
        let answer = put(&node, &key, &value, "?w=quorum");
        assert_eq!(answer.status, 200, "{}", answer.text);
        acked.insert(key, value);
    }
    assert!(missing(&node, &on_node1, "one").is_empty(), "local reads");

    // Space returns: writes needing node1 resume by themselves, no restart.
    tmpfs.resize("64m");
    let grown = Instant::now();
    wait_until(Duration::from_secs(10), "node1 takes writes again", || {
        put(&node, "after", "a", "?w=all").status == 200
    });
    let resumed_ms = grown.elapsed().as_millis();
    on_node1.insert("after".into(), "a".into());
    acked.insert("after".into(), "a".into());
    let status = c.nodes[0].status();
    assert!(status["read_only"].is_null(), "{status}");

    // Nothing acknowledged is lost: cluster-wide now, and on node1's own disk after kill -9.
    let lost = missing(&node, &acked, "all");
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    c.nodes[0].kill9();
    c.nodes[0].restart();
    let lost_locally = missing(&node, &on_node1, "one");
    assert!(
        lost_locally.is_empty(),
        "node1 lost {lost_locally:?} from its disk\n{}",
        c.nodes[0].log_tail()
    );
    report(
        "disk_full",
        &[
            ("ops", (acked.len() + unsure + 2).to_string()),
            ("faults", "1".into()),
            ("acked", acked.len().to_string()),
            ("lost", (lost.len() + lost_locally.len()).to_string()),
            ("refusal", refusal.status.to_string()),
            ("unsure", unsure.to_string()),
            ("resumed_ms", resumed_ms.to_string()),
        ],
    );
    drop(c);
    drop(tmpfs);
}
