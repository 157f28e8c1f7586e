//! Black-box tests of membership changes on real processes: nodes join and leave a running
//! cluster under load through the LB, data moves, nothing is lost, crashes mid-transfer resume;
//! forged views are refused and a view alone never makes a node drop keys (`membership/forged.rs`);
//! dead nodes are removed with `force`, nodes replaced, changes aborted, and two changes fired at
//! once end in one view with N copies of every key (`membership/dead.rs`).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

#[path = "membership/dead.rs"]
mod dead;
#[path = "membership/forged.rs"]
mod forged;

use kv_tests::{free_port, send, wait_until, Node, Options, TestCluster};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const KEYS: usize = 10_000;

fn cluster(transfer_rate: &str) -> TestCluster {
    TestCluster::start_with(Options {
        nodes: 3,
        replication_factor: 3,
        lb: true,
        env: vec![
            ("HEALTH_CHECK_INTERVAL_MS".into(), "200".into()),
            ("TRANSFER_KEYS_PER_SEC".into(), transfer_rate.into()),
            // Membership is the subject here, not fsync: a kill -9 keeps what reached the OS.
            ("WAL_SYNC".into(), "never".into()),
        ],
    })
}

/// A new node that knows only itself; it learns the cluster when a plan adds it.
fn new_node(c: &TestCluster, name: &str, transfer_rate: &str) -> Node {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let env = [
        ("NODE_NAME", name.to_owned()),
        ("PORT", port.to_string()),
        ("CURRENT_NODE_URL", url.clone()),
        ("CLUSTER_NODES", url.clone()),
        ("REPLICATION_FACTOR", "3".to_owned()),
        ("DATA_DIR", c.dir.path().join(name).display().to_string()),
        ("HEALTH_CHECK_INTERVAL_MS", "200".to_owned()),
        ("TRANSFER_KEYS_PER_SEC", transfer_rate.to_owned()),
        ("WAL_SYNC", "never".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ]
    .map(|(k, v)| (k.to_owned(), v));
    let mut node = Node::new(
        name,
        &url,
        c.dir.path().join(name),
        c.dir.path().join(format!("{name}.log")),
        env.to_vec(),
    );
    node.spawn();
    node.wait_healthy();
    node
}

fn load_keys(base: &str) {
    for chunk in 0..KEYS / 500 {
        let ops: Vec<Value> = (chunk * 500..(chunk + 1) * 500)
            .map(|i| json!({"op": "put", "key": format!("m/{i:05}"), "value": i}))
            .collect();
        let answer = send(
            "POST",
            &format!("{base}/batch"),
            Some(&json!({ "ops": ops }).to_string()),
        )
        .unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text);
    }
}

fn change(node: &str, body: Value, dry_run: bool) -> kv_tests::Answer {
    let url = format!(
        "{node}/admin/members{}",
        if dry_run { "?dry_run=true" } else { "" }
    );
    let answer = send("POST", &url, Some(&body.to_string())).unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text);
    answer
}

fn view(node: &str) -> Value {
    send("GET", &format!("{node}/admin/members"), None)
        .unwrap()
        .json
}

fn wait_committed(node: &str, epoch: u64) {
    wait_until(
        Duration::from_secs(60),
        &format!("epoch {epoch} is committed"),
        || {
            let v = view(node);
            v["epoch"].as_u64().unwrap_or(0) >= epoch && v["in_transition"] == false
        },
    );
}

fn keys_of(url: &str) -> u64 {
    send("GET", &format!("{url}/"), None).unwrap().json["keys"]
        .as_u64()
        .unwrap()
}

#[derive(Default)]
struct Tally {
    errors: Vec<String>,
    acked: HashMap<String, i64>,
}

/// Writes and reads through the LB from 2 threads until stopped (at most 20,000 operations).
fn client_load(lb: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Tally> {
    std::thread::spawn(move || {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let workers: Vec<_> = (0..2)
            .map(|w| {
                let (lb, stop, tally) = (lb.clone(), stop.clone(), tally.clone());
                std::thread::spawn(move || {
                    for i in 0..10_000i64 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let key = format!("live-{w}-{}", i % 100);
                        let (method, body) = if i % 2 == 0 {
                            ("PUT", Some(json!({"value": i}).to_string()))
                        } else {
                            ("GET", None)
                        };
                        let answer = send(method, &format!("{lb}/v1/{key}"), body.as_deref());
                        let mut t = tally.lock().unwrap();
                        match answer {
                            Ok(a) if a.status == 200 => {
                                if method == "PUT" {
                                    t.acked.insert(key, i);
                                }
                            }
                            Ok(a) if a.status == 404 && method == "GET" => {}
                            other => t.errors.push(format!("{method} {key}: {other:?}")),
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

fn assert_readable(lb: &str, acked: &HashMap<String, i64>) {
    for (key, value) in acked {
        let answer = send("GET", &format!("{lb}/v1/{key}?r=all"), None).unwrap();
        assert_eq!(answer.status, 200, "{key}: {}", answer.text);
        assert!(
            answer.json["value"].as_i64().unwrap() >= *value,
            "{key} lost {value}"
        );
    }
    for i in (0..KEYS).step_by(97) {
        let answer = send("GET", &format!("{lb}/v1/m/{i:05}?r=all"), None).unwrap();
        assert_eq!(
            (answer.status, answer.json["value"].clone()),
            (200, json!(i)),
            "m/{i:05}"
        );
    }
}

fn is_balanced(urls: &[String], copies: u64) -> bool {
    let ideal = copies as f64 / urls.len() as f64;
    urls.iter()
        .all(|url| (keys_of(url) as f64 - ideal).abs() <= 0.15 * ideal)
}

fn assert_balanced(urls: &[String], copies: u64) {
    let ideal = copies as f64 / urls.len() as f64;
    for url in urls {
        let keys = keys_of(url) as f64;
        assert!(
            (keys - ideal).abs() <= 0.15 * ideal,
            "{url} holds {keys} keys, ideal {ideal:.0}"
        );
    }
}

#[test]
fn grow_from_3_to_5_then_shrink_to_4_under_load_without_errors_or_loss() {
    let mut c = cluster("20000");
    let lb = c.lb_url.clone().unwrap();
    load_keys(&lb);
    let n4 = new_node(&c, "node4", "20000");
    let n5 = new_node(&c, "node5", "20000");

    // Plans that cannot be carried out are refused.
    for bad in [
        json!({"remove": ["http://127.0.0.1:1"]}),
        json!({"add": [c.url(0)]}),
        json!({}),
        json!({"add": ["not a url"]}),
    ] {
        let answer = send(
            "POST",
            &format!("{}/admin/members?dry_run=true", c.url(0)),
            Some(&bad.to_string()),
        )
        .unwrap();
        assert_eq!(
            (answer.status, answer.json["error"].clone()),
            (400, json!("invalid_plan")),
            "{bad}: {}",
            answer.text
        );
    }
    // A dry run changes nothing.
    let plan = change(c.url(0), json!({"add": [n4.url, n5.url]}), true);
    assert_eq!(plan.json["applied"], false);
    assert_eq!(view(c.url(0))["epoch"], 0);
    assert_eq!(keys_of(&n4.url), 0);
    let predicted: HashMap<String, i64> = plan.json["nodes"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(url, line)| (url.clone(), line["keys_after"].as_i64().unwrap()))
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let load = client_load(lb.clone(), stop.clone());
    change(c.url(1), json!({"add": [n4.url, n5.url]}), false);
    wait_committed(c.url(0), 2);
    let mut urls: Vec<String> = c.nodes.iter().map(|n| n.url.clone()).collect();
    urls.extend([n4.url.clone(), n5.url.clone()]);
    // The load's own keys, 3 copies each.
    let live_keys = 200;
    // Each old owner drops what moved away once it has seen the commit and the new owners have
    // confirmed every batch, each at its own pace; the load goes on meanwhile.
    wait_until(
        Duration::from_secs(30),
        "old owners dropped what moved away",
        || is_balanced(&urls, 3 * (KEYS + live_keys) as u64),
    );
    stop.store(true, Ordering::Relaxed);
    let tally = load.join().unwrap();
    assert!(
        tally.errors.is_empty(),
        "client errors during the join: {:?}",
        &tally.errors[..tally.errors.len().min(5)]
    );
    assert_balanced(&urls, 3 * (KEYS + live_keys) as u64);
    for url in &urls {
        let (want, got) = (predicted[url] as f64, keys_of(url) as f64);
        assert!(
            (got - want).abs() <= 0.10 * want + (3 * live_keys) as f64,
            "{url}: predicted {want}, got {got}"
        );
    }
    assert_readable(&lb, &tally.acked);

    // Shrink: remove node2 under load.
    let stop = Arc::new(AtomicBool::new(false));
    let load = client_load(lb.clone(), stop.clone());
    let removed = c.url(1).to_owned();
    change(c.url(0), json!({"remove": [removed]}), false);
    wait_committed(c.url(0), 4);
    wait_until(
        Duration::from_secs(10),
        "the removed node dropped its keys",
        || keys_of(&removed) == 0,
    );
    stop.store(true, Ordering::Relaxed);
    let tally = load.join().unwrap();
    assert!(
        tally.errors.is_empty(),
        "client errors during the removal: {:?}",
        &tally.errors[..tally.errors.len().min(5)]
    );
    c.nodes[1].kill9();
    urls.retain(|u| *u != removed);
    assert_balanced(&urls, 3 * (KEYS + live_keys) as u64);
    assert_readable(&lb, &tally.acked);
    drop((n4, n5));
}

#[test]
fn a_transfer_resumes_after_the_receiver_or_the_sender_is_killed() {
    let mut c = cluster("1500");
    let lb = c.lb_url.clone().unwrap();
    load_keys(&lb);
    let mut n4 = new_node(&c, "node4", "1500");
    change(c.url(0), json!({"add": [n4.url]}), false);
    wait_until(Duration::from_secs(10), "the transfer is under way", || {
        keys_of(&n4.url) > 500
    });
    n4.kill9();
    c.nodes[2].kill9();
    n4.restart();
    c.nodes[2].restart();
    wait_committed(c.url(0), 2);
    let urls: Vec<String> = c
        .nodes
        .iter()
        .map(|n| n.url.clone())
        .chain([n4.url.clone()])
        .collect();
    wait_until(
        Duration::from_secs(15),
        "keys settle on their owners",
        || urls.iter().map(|u| keys_of(u)).sum::<u64>() == 3 * KEYS as u64,
    );
    assert_balanced(&urls, 3 * KEYS as u64);
    for i in (0..KEYS).step_by(37) {
        let answer = send("GET", &format!("{}/v1/m/{i:05}?r=all", n4.url), None).unwrap();
        assert_eq!(
            (answer.status, answer.json["value"].clone()),
            (200, json!(i)),
            "m/{i:05}"
        );
    }
}
