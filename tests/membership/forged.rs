//! Membership views that cannot destroy data: forged views offered with the right cluster secret
//! are refused and change nothing, and a node keeps the keys a new owner does not confirm.

use super::{change, keys_of, new_node, view, wait_committed};
use kv_tests::{send, send_with, wait_until, Options, TestCluster};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SECRET: &str = "forged-view-test-secret";
const FEW_KEYS: usize = 300;

fn load_few(base: &str) {
    let ops: Vec<Value> = (0..FEW_KEYS)
        .map(|i| json!({"op": "put", "key": format!("f/{i:04}"), "value": i}))
        .collect();
    let answer = send(
        "POST",
        &format!("{base}/batch"),
        Some(&json!({ "ops": ops }).to_string()),
    )
    .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text);
}

fn member(url: &str, state: &str) -> Value {
    json!({"url": url, "state": state})
}

fn log_of(node: &kv_tests::Node) -> String {
    std::fs::read_to_string(&node.log).unwrap_or_default()
}

#[test]
fn forged_views_with_the_right_secret_are_refused_and_change_nothing() {
    let c = TestCluster::start_with(Options {
        env: vec![("CLUSTER_SECRET".into(), SECRET.into())],
        ..Options::default()
    });
    load_few(c.url(0));
    let mut urls: Vec<String> = c.nodes.iter().map(|n| n.url.clone()).collect();
    urls.sort();
    let active: Vec<Value> = urls.iter().map(|u| member(u, "active")).collect();
    let stranger = "http://127.0.0.1:9";
    let forged = [
        // The attack of issue 14: an epoch jump to a view of one unknown node.
        (
            409,
            json!({"epoch": 999_999, "members": [member(stranger, "active")]}),
        ),
        // An epoch jump with the right members.
        (409, json!({"epoch": 999_999, "members": active})),
        // The next epoch, but every current member dropped.
        (
            409,
            json!({"epoch": 2, "members": [member(stranger, "active")]}),
        ),
        // The next epoch, not a plan: a member turned joining and another leaving, no coordinator.
        (
            409,
            json!({"epoch": 1, "coordinator": urls[0], "members": [
                member(&urls[0], "active"), member(&urls[1], "joining"), member(&urls[2], "leaving"),
            ]}),
        ),
        // The next epoch with a new member straight in as active.
        (
            409,
            json!({"epoch": 1, "members": [
                member(&urls[0], "active"), member(&urls[1], "active"),
                member(&urls[2], "active"), member("http://127.0.0.2:9", "active"),
            ]}),
        ),
        // A view of the same epoch that differs.
        (
            409,
            json!({"epoch": 0, "members": [member(&urls[0], "active")]}),
        ),
        // Malformed: no members, a URL with a path, unsorted members.
        (400, json!({"epoch": 1, "members": []})),
        (
            400,
            json!({"epoch": 1, "members": [member("http://127.0.0.1:9/x", "active")]}),
        ),
        (
            400,
            json!({"epoch": 1, "members": [member(&urls[2], "active"), member(&urls[0], "active")]}),
        ),
    ];
    for node in &c.nodes {
        for (status, body) in &forged {
            let answer = send_with(
                "POST",
                &format!("{}/internal/members", node.url),
                Some(&body.to_string()),
                &[("x-kv-secret", SECRET), ("x-kv-from", "http://forger:1")],
            )
            .unwrap();
            assert_eq!(
                (answer.status, answer.json["error"].clone()),
                (*status, json!("view_refused")),
                "{body}: {}",
                answer.text
            );
        }
        let unauthenticated = send(
            "POST",
            &format!("{}/internal/members", node.url),
            Some(&forged[0].1.to_string()),
        )
        .unwrap();
        assert_eq!(unauthenticated.status, 401, "{}", unauthenticated.text);
    }
    // Nothing changes, for a few seconds of health rounds and cleanup passes.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for node in &c.nodes {
            assert_eq!(view(&node.url)["epoch"], 0, "{}", node.url);
            assert_eq!(keys_of(&node.url), FEW_KEYS as u64, "{}", node.url);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for node in &c.nodes {
        for i in 0..FEW_KEYS {
            let answer = send("GET", &format!("{}/v1/f/{i:04}?r=one", node.url), None).unwrap();
            assert_eq!(answer.json["value"], json!(i), "{} f/{i:04}", node.url);
        }
        let log = log_of(node);
        assert!(
            log.contains("refused a membership view")
                && log.contains("http://forger:1 from 127.0.0.1"),
            "{}: refusals are logged with the sender:\n{}",
            node.name,
            node.log_tail()
        );
    }
}

/// A fake node that answers every call as if it took it and holds nothing: health is ok,
/// replication batches are "applied", `/internal/entries` has no entry for any key.
struct LiarNode {
    url: String,
    stop: Arc<AtomicBool>,
    replicated: Arc<AtomicU64>,
}

impl LiarNode {
    fn start() -> LiarNode {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let replicated = Arc::new(AtomicU64::new(0));
        let (flag, count) = (stop.clone(), replicated.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let count = count.clone();
                        std::thread::spawn(move || serve_lies(stream, &count));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        LiarNode {
            url,
            stop,
            replicated,
        }
    }
}

impl Drop for LiarNode {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Serves one keep-alive connection (at most 10,000 requests, each within 30 s).
fn serve_lies(stream: TcpStream, replicated: &AtomicU64) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    for _ in 0..10_000 {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let (kind, answer): (&str, Vec<u8>) = if path.starts_with("/internal/entries") {
            // As many empty entries as keys asked for: the list frame's count, then 0 lengths.
            let count = body
                .get(..4)
                .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()));
            let mut out = count.to_le_bytes().to_vec();
            out.extend(std::iter::repeat_n(0u8, 4 * count as usize));
            ("application/octet-stream", out)
        } else {
            if path.starts_with("/internal/replicate") {
                replicated.fetch_add(1, Ordering::Relaxed);
            }
            (
                "application/json",
                br#"{"status": "ok", "applied": 0}"#.to_vec(),
            )
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\ncontent-length: {}\r\n\r\n",
            answer.len()
        );
        if writer.write_all(head.as_bytes()).is_err() || writer.write_all(&answer).is_err() {
            return;
        }
    }
}

#[test]
fn a_node_keeps_the_keys_a_new_owner_does_not_confirm() {
    let c = TestCluster::start_with(Options {
        env: vec![("WAL_SYNC".into(), "never".into())],
        ..Options::default()
    });
    load_few(c.url(0));
    let liar = LiarNode::start();
    change(c.url(0), json!({"add": [liar.url]}), false);
    wait_committed(c.url(0), 2);
    // Each node checks the keys it no longer owns with their new owners; the liar has none of
    // them, so each node keeps them and sends them again.
    wait_until(
        Duration::from_secs(20),
        "every node kept the keys the liar does not hold",
        || {
            c.nodes
                .iter()
                .all(|n| log_of(n).contains("keeping keys their new owners have not confirmed"))
        },
    );
    assert!(
        liar.replicated.load(Ordering::Relaxed) > 0,
        "the keys were sent to the liar"
    );
    assert!(
        c.nodes
            .iter()
            .any(|n| log_of(n).contains("sent keys their new owner lacked")),
        "keys an owner lacks are sent to it again"
    );
    for node in &c.nodes {
        assert_eq!(
            keys_of(&node.url),
            FEW_KEYS as u64,
            "{} dropped keys on the word of a view alone:\n{}",
            node.name,
            node.log_tail()
        );
        assert!(!log_of(node).contains("dropped keys this node no longer owns"));
    }
}

#[test]
fn a_node_that_lost_track_of_a_change_catches_up_from_a_majority() {
    let mut c = TestCluster::start_with(Options {
        env: vec![("WAL_SYNC".into(), "never".into())],
        ..Options::default()
    });
    load_few(c.url(0));
    let n4 = new_node(&c, "node4", "20000");
    change(c.url(0), json!({"add": [n4.url]}), false);
    wait_committed(c.url(0), 2);
    wait_committed(c.url(2), 2);
    // node3 forgets its view (an operator reset it): it starts again from CLUSTER_NODES at epoch
    // 0, two changes behind. It cannot check the commit step by step, so it adopts it only once
    // node1 and node2, the other members of its own view, both hold it.
    c.nodes[2].kill9();
    for file in ["members.json", "transfer.json"] {
        std::fs::remove_file(c.nodes[2].data_dir.join(file)).unwrap();
    }
    c.nodes[2].restart();
    wait_committed(c.url(2), 2);
    assert_eq!(view(c.url(2))["members"].as_array().unwrap().len(), 4);
    assert!(log_of(&c.nodes[2]).contains("caught up with the membership view held by a majority"));
    for i in (0..FEW_KEYS).step_by(7) {
        let answer = send("GET", &format!("{}/v1/f/{i:04}?r=all", n4.url), None).unwrap();
        assert_eq!(answer.json["value"], json!(i), "f/{i:04}");
    }
}
