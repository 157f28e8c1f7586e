//! Disk full on one node (its DATA_DIR on a 2 MiB tmpfs): its writes fail with a clear 503/507,
//! it stays up and serves reads, the others go on, a crash then loses nothing it acknowledged,
//! and once space is back a restart makes it take writes again (the WAL failure is sticky).

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

#[test]
fn a_full_disk_refuses_writes_keeps_reads_and_loses_nothing() {
    let scratch = tempfile::tempdir().unwrap();
    let mount_point = scratch.path().join("node1");
    let tmpfs = match Tmpfs::mount(&mount_point, "2m") {
        Ok(t) => t,
        Err(why) => {
            eprintln!("SKIPPED a_full_disk_refuses_writes_keeps_reads_and_loses_nothing: cannot mount a tmpfs (needs root): {why}");
            return;
        }
    };
    let mut c = ChaosCluster::start(&ChaosOptions {
        data_dirs: HashMap::from([(0, mount_point.clone())]),
        ..ChaosOptions::default()
    });
    let node = c.url(0).to_owned();
    let mut acked: HashMap<String, String> = HashMap::new();
    for i in 0..20 {
        let (key, value) = (format!("before-{i}"), format!("v{i}"));
        assert_eq!(put(&node, &key, &value, "?w=all").status, 200);
        acked.insert(key, value);
    }

    // Fill the disk through node1 alone (w=one: a 200 means it is in node1's WAL).
    let big = "x".repeat(32 * 1024);
    let started = Instant::now();
    let mut refusal = None;
    for i in 0..400 {
        let key = format!("fill-{i}");
        let value = format!("{i}-{big}");
        let answer = put(&node, &key, &value, "?w=one");
        if answer.status == 200 {
            acked.insert(key, value);
        } else {
            refusal = Some(answer);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "filling took too long"
        );
    }
    let refusal = refusal.expect("2 MiB never filled up");
    assert!(
        [503, 507].contains(&refusal.status) && refusal.json["error"].is_string(),
        "a full disk answered {} {}",
        refusal.status,
        refusal.text
    );
    // Sticky: even a tiny write is refused now; and the node says why.
    let tiny = put(&node, "tiny", "t", "?w=one");
    assert!([503, 507].contains(&tiny.status), "{}", tiny.text);
    let health = send("GET", &format!("{node}/health"), None).unwrap();
    assert_eq!(health.status, 200, "{}", health.text);
    assert_eq!(health.json["status"], "degraded", "{}", health.text);
    assert!(!c.nodes[0].status()["writes_refused"].is_null());
    // Reads go on, on this node; writes go on through the others.
    for i in (0..20).step_by(5) {
        let read = send("GET", &format!("{node}/v1/before-{i}?r=one"), None).unwrap();
        assert_eq!(
            (read.status, read.json["value"].clone()),
            (200, json!(format!("v{i}")))
        );
    }
    assert_eq!(put(c.url(1), "elsewhere", "e", "").status, 200);

    // Crash, give the space back, restart.
    c.nodes[0].kill9();
    tmpfs.resize("64m");
    c.nodes[0].restart();
    // What node1 recovered from its own disk is intact: every key holds its acknowledged value or
    // is absent. Absent is allowed for the one write in flight when the disk filled: its local
    // append failed, but with w=one another replica's ack was enough to acknowledge it.
    let mut absent_locally = Vec::new();
    for (key, value) in &acked {
        let local = send("GET", &format!("{node}/v1/{key}?r=one"), None).unwrap();
        match local.status {
            200 => assert_eq!(local.json["value"], json!(value), "{key} recovered damaged"),
            404 => absent_locally.push(key.clone()),
            _ => panic!("{key}: {} {}", local.status, local.text),
        }
    }
    assert!(
        absent_locally.len() <= 1,
        "node1 lost {absent_locally:?} from its disk\n{}",
        c.nodes[0].log_tail()
    );
    // And the cluster lost nothing it acknowledged.
    let missing: Vec<&String> = acked
        .iter()
        .filter(|(k, v)| {
            let read = send("GET", &format!("{node}/v1/{k}?r=all"), None).unwrap();
            read.json["value"] != json!(v)
        })
        .map(|(k, _)| k)
        .collect();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
    wait_until(Duration::from_secs(10), "node1 takes writes again", || {
        put(&node, "after", "a", "").status == 200
    });
    report(
        "disk_full",
        &[
            ("ops", (acked.len() + 2).to_string()),
            ("faults", "1".into()),
            ("acked", acked.len().to_string()),
            ("lost", missing.len().to_string()),
            ("refusal", refusal.status.to_string()),
            ("absent_locally", absent_locally.len().to_string()),
        ],
    );
    drop(c);
    drop(tmpfs);
}
