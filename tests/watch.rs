//! Black-box tests of change streams (`?watch=true`, Server-Sent Events) against real nodes and
//! the LB: every acknowledged change of a prefix is seen, per key in version order, during a
//! write load; a watcher through the LB survives the kill -9 of its node by resuming with
//! `Last-Event-ID`; a consumer that reads nothing is cut off with `event: lagged` while the
//! node's memory stays bounded.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use kv_tests::{send, wait_until, Options, TestCluster};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How far before `Last-Event-ID` a node replays (kv_cluster::watch::RESUME_SLACK_MS).
const RESUME_SLACK_MS: u64 = 10_000;

/// One thing read from a stream.
#[derive(Debug, Clone)]
enum Item {
    Event {
        kind: String,
        id: Option<String>,
        data: Value,
    },
    Comment(String),
    /// The stream ended (EOF or an error), and why.
    End(String),
}

/// A streaming client: no overall timeout (a watch lasts as long as it lasts).
fn stream_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(None::<Duration>)
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

/// Opens a watch; `Err` when no 200 stream came back.
fn open(url: &str, last_id: Option<&str>) -> Result<reqwest::blocking::Response, String> {
    let mut request = stream_client().get(url);
    if let Some(id) = last_id {
        request = request.header("Last-Event-ID", id);
    }
    let response = request.send().map_err(|e| e.to_string())?;
    let kind = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if response.status() != 200 || kind != "text/event-stream" {
        return Err(format!(
            "{} {kind}: {:?}",
            response.status(),
            response.text()
        ));
    }
    Ok(response)
}

/// Parses the stream on a thread; items arrive on the channel, `End` last.
fn read_events(response: reqwest::blocking::Response) -> mpsc::Receiver<Item> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut reader = BufReader::new(response);
        let (mut kind, mut id, mut data) = (String::new(), None, Vec::<String>::new());
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) => {
                    let _ = tx.send(Item::End("eof".into()));
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Item::End(e.to_string()));
                    return;
                }
                Ok(_) => {}
            }
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !data.is_empty() {
                    let item = Item::Event {
                        kind: std::mem::take(&mut kind),
                        id: id.take(),
                        data: serde_json::from_str(&data.join("\n")).unwrap_or(Value::Null),
                    };
                    data.clear();
                    if tx.send(item).is_err() {
                        return;
                    }
                }
            } else if let Some(comment) = line.strip_prefix(':') {
                let _ = tx.send(Item::Comment(comment.trim().to_owned()));
            } else if let Some(v) = line.strip_prefix("event: ") {
                kind = v.to_owned();
            } else if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("data: ") {
                data.push(v.to_owned());
            }
        }
    });
    rx
}

/// A put; the version when acknowledged.
fn put(base: &str, key: &str, value: &str) -> Option<String> {
    let answer = send("PUT", &format!("{base}/v1/{key}"), Some(value)).ok()?;
    (answer.status == 200).then(|| answer.json["version"].as_str().unwrap().to_owned())
}

/// What a watcher collected: its events (kind, key, version) per connection, in order.
#[derive(Debug, Default)]
struct Seen {
    connections: Vec<Vec<(String, String, String)>>,
    lagged: Vec<Value>,
    pings: usize,
}

impl Seen {
    fn push(&mut self, item: &Item) {
        match item {
            Item::Event { kind, id, data } if kind == "put" || kind == "delete" => {
                let version = data["version"].as_str().unwrap().to_owned();
                assert_eq!(id.as_deref(), Some(version.as_str()), "id is the version");
                let key = data["key"].as_str().unwrap().to_owned();
                self.connections
                    .last_mut()
                    .unwrap()
                    .push((kind.clone(), key, version));
            }
            Item::Event { kind, data, .. } if kind == "lagged" => self.lagged.push(data.clone()),
            Item::Comment(c) if c == "ping" => self.pings += 1,
            _ => {}
        }
    }

    /// Per connection, each key's versions strictly increase.
    fn check_per_key_order(&self) {
        for (n, events) in self.connections.iter().enumerate() {
            let mut last: HashMap<&str, &str> = HashMap::new();
            for (_, key, version) in events {
                if let Some(before) = last.insert(key, version) {
                    assert!(
                        before < version.as_str(),
                        "connection {n}: {key} at {version} after {before}"
                    );
                }
            }
        }
    }

    /// Applies the documented client rule (drop an event not newer than the key's version held)
    /// and returns the accepted (key, version) pairs and how many were dropped.
    fn accepted(&self) -> (HashSet<(String, String)>, usize) {
        let mut held: HashMap<String, String> = HashMap::new();
        let (mut accepted, mut dropped) = (HashSet::new(), 0);
        for (_, key, version) in self.connections.iter().flatten() {
            if held.get(key).is_some_and(|h| h >= version) {
                dropped += 1;
                continue;
            }
            held.insert(key.clone(), version.clone());
            accepted.insert((key.clone(), version.clone()));
        }
        (accepted, dropped)
    }
}

/// True when the watcher accepted every acknowledged `(key, version)`: each one, not only the
/// newest of its key (a node serving a watch merges the feeds of the key's replicas, so a
/// version that a newer one overtook on its way to one replica still comes from another).
fn covered(acked: &HashSet<(String, String)>, accepted: &HashSet<(String, String)>) -> bool {
    acked.is_subset(accepted)
}

/// The acknowledged changes the watcher has not accepted (for failure messages).
fn missing(
    acked: &HashSet<(String, String)>,
    accepted: &HashSet<(String, String)>,
) -> Vec<(String, String)> {
    let mut missing: Vec<_> = acked.difference(accepted).cloned().collect();
    missing.sort();
    missing.truncate(10);
    missing
}

/// Follows one watch URL on a thread into `seen`, until the stream ends.
fn follow(url: String, seen: Arc<Mutex<Seen>>) -> thread::JoinHandle<()> {
    let response = open(&url, None).unwrap();
    seen.lock().unwrap().connections.push(Vec::new());
    let events = read_events(response);
    thread::spawn(move || {
        for item in events {
            seen.lock().unwrap().push(&item);
            if matches!(item, Item::End(_)) {
                return;
            }
        }
    })
}

/// Writes `writes` puts (and every 7th a delete) over `keys` keys under `prefix` from
/// `threads` threads, alternating the targets; returns the acknowledged put versions and the
/// acknowledged deletes per key.
fn write_load(
    targets: &[String],
    prefix: &str,
    keys: usize,
    threads: usize,
    writes: usize,
) -> (HashSet<(String, String)>, HashMap<String, usize>) {
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let targets = targets.to_vec();
            let prefix = prefix.to_owned();
            thread::spawn(move || {
                let (mut puts, mut deletes) = (HashSet::new(), HashMap::new());
                for i in 0..writes {
                    let base = &targets[(t + i) % targets.len()];
                    let key = format!("{prefix}{}", (t * 31 + i) % keys);
                    if i % 7 == 6 {
                        let url = format!("{base}/v1/{key}");
                        if send("DELETE", &url, None).is_ok_and(|a| a.status == 200) {
                            *deletes.entry(key).or_insert(0) += 1;
                        }
                    } else if let Some(v) = put(base, &key, &format!("{{\"value\": [{t}, {i}]}}")) {
                        puts.insert((key, v));
                    }
                }
                (puts, deletes)
            })
        })
        .collect();
    let (mut puts, mut deletes) = (HashSet::new(), HashMap::new());
    for handle in handles {
        let (p, d) = handle.join().unwrap();
        puts.extend(p);
        for (k, n) in d {
            *deletes.entry(k).or_insert(0) += n;
        }
    }
    (puts, deletes)
}

#[test]
fn a_prefix_watcher_sees_every_acknowledged_change_in_order_through_a_node_and_the_lb() {
    let c = TestCluster::start_with(Options {
        lb: true,
        // Shorter than the quiet wait for a ping below: the LB must not cut a watch at it.
        env: vec![("REQUEST_TIMEOUT_MS".into(), "5000".into())],
        ..Options::default()
    });
    let lb = c.lb_url.clone().unwrap();
    let via_node = Arc::new(Mutex::new(Seen::default()));
    let via_lb = Arc::new(Mutex::new(Seen::default()));
    let key_watch = Arc::new(Mutex::new(Seen::default()));
    let followers = [
        follow(
            format!("{}/v1?prefix=w/&watch=true", c.url(0)),
            via_node.clone(),
        ),
        follow(format!("{lb}/v1?prefix=w/&watch=true"), via_lb.clone()),
        follow(format!("{lb}/v1/w/3?watch=true"), key_watch.clone()),
    ];
    let targets = vec![lb.clone(), c.url(1).to_owned(), c.url(2).to_owned()];
    // Other keys change too: a watcher of w/ must not see them.
    put(&lb, "other/1", "{\"value\": 0}").unwrap();
    let (puts, deletes) = write_load(&targets, "w/", 12, 4, 60);
    assert!(puts.len() > 150, "only {} puts acknowledged", puts.len());

    for (name, seen) in [("node", &via_node), ("lb", &via_lb)] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !covered(&puts, &seen.lock().unwrap().accepted().0) {
            let accepted = seen.lock().unwrap().accepted().0;
            assert!(
                Instant::now() < deadline,
                "the watcher through the {name} missed acknowledged puts, e.g. {:?}",
                missing(&puts, &accepted)
            );
            thread::sleep(Duration::from_millis(50));
        }
        let seen = seen.lock().unwrap();
        seen.check_per_key_order();
        assert_eq!(seen.connections.len(), 1);
        let events = &seen.connections[0];
        assert!(events.iter().all(|(_, key, _)| key.starts_with("w/")));
        let (_, dropped) = seen.accepted();
        assert_eq!(dropped, 0, "{name}: no repeats within one connection");
        // Deletes are events too (a delete's answer has no version to check each one by).
        let acked_deletes: usize = deletes.values().sum();
        let seen_deletes = events.iter().filter(|(kind, ..)| kind == "delete").count();
        assert!(
            acked_deletes == 0 || seen_deletes > 0,
            "{name}: {acked_deletes} deletes acknowledged, none seen"
        );
    }
    let wanted: HashSet<_> = puts.iter().filter(|(k, _)| k == "w/3").cloned().collect();
    wait_until(
        Duration::from_secs(10),
        "the key watcher sees w/3's puts",
        || covered(&wanted, &key_watch.lock().unwrap().accepted().0),
    );
    assert!(key_watch.lock().unwrap().connections[0]
        .iter()
        .all(|(_, k, _)| k == "w/3"));

    // A quiet watch through the LB outlives REQUEST_TIMEOUT_MS and gets keep-alive comments.
    wait_until(
        Duration::from_secs(25),
        "a ': ping' through the LB on a quiet stream",
        || via_lb.lock().unwrap().pings > 0,
    );
    assert!(
        !followers[1].is_finished(),
        "the LB kept the quiet stream open"
    );
}

#[test]
fn a_watcher_through_the_lb_resumes_after_its_node_is_killed() {
    let mut c = TestCluster::start_with(Options {
        lb: true,
        ..Options::default()
    });
    let lb = c.lb_url.clone().unwrap();
    let url = format!("{lb}/v1?prefix=k/&watch=true");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let resumed_from = Arc::new(Mutex::new(Vec::<String>::new()));

    // The watcher: on any end of stream, reconnect through the LB with Last-Event-ID.
    let watcher = {
        let (seen, stop, resumed_from) = (seen.clone(), stop.clone(), resumed_from.clone());
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut last_id: Option<String> = None;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok(response) = open(&url, last_id.as_deref()) else {
                    thread::sleep(Duration::from_millis(100));
                    continue;
                };
                if let Some(id) = &last_id {
                    resumed_from.lock().unwrap().push(id.clone());
                }
                seen.lock().unwrap().connections.push(Vec::new());
                let events = read_events(response);
                while !stop.load(Ordering::Relaxed) {
                    let Ok(item) = events.recv_timeout(Duration::from_millis(100)) else {
                        continue;
                    };
                    if let Item::Event { id: Some(id), .. } = &item {
                        last_id = Some(id.clone());
                    }
                    seen.lock().unwrap().push(&item);
                    if matches!(item, Item::End(_)) {
                        break;
                    }
                }
            }
        })
    };
    wait_until(Duration::from_secs(10), "the watcher is connected", || {
        c.nodes.iter().any(|n| n.status()["watch"]["watchers"] == 1)
    });
    let watched = c
        .nodes
        .iter()
        .position(|n| n.status()["watch"]["watchers"] == 1)
        .unwrap();

    let acked_count = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (lb, stop, acked_count) = (lb.clone(), stop.clone(), acked_count.clone());
        thread::spawn(move || {
            let mut acked = HashSet::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && i < 20_000 {
                let key = format!("k/{}", i % 20);
                if let Some(v) = put(&lb, &key, &format!("{{\"value\": {i}}}")) {
                    acked.insert((key, v));
                    acked_count.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
            acked
        })
    };
    wait_until(Duration::from_secs(10), "the watcher sees writes", || {
        seen.lock().unwrap().connections[0].len() >= 50
    });
    c.nodes[watched].kill9();
    let at_kill = acked_count.load(Ordering::Relaxed);
    wait_until(
        Duration::from_secs(30),
        "the watcher reconnected and 100 more writes were acknowledged",
        || {
            seen.lock().unwrap().connections.len() >= 2
                && acked_count.load(Ordering::Relaxed) >= at_kill + 100
        },
    );
    stop.store(true, Ordering::Relaxed);
    let acked = writer.join().unwrap();
    assert!(
        acked.len() > 100,
        "only {} writes acknowledged",
        acked.len()
    );
    wait_until(
        Duration::from_secs(20),
        "every acknowledged write is seen once resumed",
        || covered(&acked, &seen.lock().unwrap().accepted().0),
    );

    let seen = seen.lock().unwrap();
    seen.check_per_key_order();
    let resumed = resumed_from.lock().unwrap();
    assert!(
        !resumed.is_empty(),
        "the watcher resumed with Last-Event-ID"
    );
    // The resumed connection starts near the last id, not from the beginning: what it repeats
    // lies within the documented replay slack before that id.
    let after_kill = &seen.connections[1];
    let from = parse_hlc(&resumed[0]);
    let earliest = after_kill
        .iter()
        .map(|(_, _, v)| parse_hlc(v))
        .min()
        .unwrap();
    assert!(
        earliest + (RESUME_SLACK_MS << 16) >= from,
        "the resumed stream replayed from {earliest:x}, more than the slack before {from:x}"
    );
    assert!(seen.lagged.is_empty(), "no lagged event: {:?}", seen.lagged);
    drop(seen);
    watcher.join().unwrap();
}

/// The hybrid-clock part of a version (`{hlc:016x}-{node:08x}`).
fn parse_hlc(version: &str) -> u64 {
    u64::from_str_radix(version.split('-').next().unwrap(), 16).unwrap()
}

/// Resident memory of a process in KiB (`VmRSS` of /proc/PID/status).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_consumer_that_reads_nothing_is_cut_off_and_memory_stays_bounded() {
    const VALUE_BYTES: usize = 128 * 1024;
    const WRITES: usize = 400; // 50 MiB through a watcher that reads nothing
    let c = TestCluster::start_with(Options {
        nodes: 1,
        replication_factor: 1,
        env: vec![("WATCH_HISTORY_BYTES".into(), (1 << 20).to_string())],
        ..Options::default()
    });
    let base = c.url(0).to_owned();
    let pid = c.nodes[0].pid().unwrap();
    // Warm the paths a burst uses, so the figure below is the watcher's, not first use.
    let value = format!("{{\"value\": \"{}\"}}", "x".repeat(VALUE_BYTES));
    for _ in 0..20 {
        send("PUT", &format!("{base}/v1/big?w=one"), Some(&value)).unwrap();
    }
    let response = open(&format!("{base}/v1?prefix=&watch=true"), None).unwrap();
    let before = rss_kib(pid);

    let started = Instant::now();
    let writers: Vec<_> = (0..2)
        .map(|_| {
            let (base, value) = (base.clone(), value.clone());
            thread::spawn(move || {
                for _ in 0..WRITES / 2 {
                    let a = send("PUT", &format!("{base}/v1/big?w=one"), Some(&value)).unwrap();
                    assert_eq!(a.status, 200);
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let after = rss_kib(pid);
    let grown_mib = after.saturating_sub(before) / 1024;
    eprintln!(
        "slow consumer: {WRITES} writes of {} KiB in {:?}; node RSS {} -> {} MiB (+{grown_mib} MiB)",
        VALUE_BYTES / 1024,
        started.elapsed(),
        before / 1024,
        after / 1024
    );
    assert!(
        grown_mib < 24,
        "RSS grew by {grown_mib} MiB while {} MiB passed a watcher that read nothing",
        (WRITES * VALUE_BYTES) >> 20
    );

    // Now read: what the socket buffers held, then the final event, then the end.
    let stream = read_events(response);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut items = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match stream.recv_timeout(left) {
            Ok(Item::End(why)) => {
                assert_eq!(why, "eof", "the node ends the stream cleanly after lagged");
                break;
            }
            Ok(item) => items.push(item),
            Err(e) => panic!("the cut-off stream did not end: {e}"),
        }
    }
    let kinds: Vec<&str> = items
        .iter()
        .filter_map(|i| match i {
            Item::Event { kind, .. } => Some(kind.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(kinds.last(), Some(&"lagged"), "the stream ends with lagged");
    assert!(
        kinds.len() < WRITES,
        "{} events were kept for it",
        kinds.len()
    );
    let Some(Item::Event { data, .. }) =
        items.iter().rev().find(|i| matches!(i, Item::Event { .. }))
    else {
        unreachable!()
    };
    assert_eq!(data["reason"], "slow_consumer");
    assert!(data["message"].as_str().unwrap().contains("list"));
    // The node serves on, and a new watcher starts fine.
    let fresh = open(&format!("{base}/v1/big?watch=true"), None).unwrap();
    let events = read_events(fresh);
    put(&base, "big", "{\"value\": 1}").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let got = loop {
        match events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Item::Event { kind, data, .. }) => break (kind, data),
            Ok(_) => continue,
            Err(e) => panic!("no event on a new watch: {e}"),
        }
    };
    assert_eq!(got.0, "put");
    assert_eq!(got.1["value"], 1);
}

#[test]
fn a_prefix_watch_merges_the_peers_feeds_when_nodes_outnumber_replicas() {
    // 4 nodes, N = 2: node 1 holds about half the keys; the rest comes from its peers' feeds.
    let c = TestCluster::start_with(Options {
        nodes: 4,
        replication_factor: 2,
        ..Options::default()
    });
    c.wait_converged();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let follower = follow(
        format!("{}/v1?prefix=m/&watch=true", c.url(0)),
        seen.clone(),
    );
    // The peers' feeds open in the background: wait until each peer serves one.
    wait_until(
        Duration::from_secs(10),
        "every peer streams its feed",
        || {
            c.nodes[1..]
                .iter()
                .all(|n| n.status()["watch"]["peer_feeds"] == 1)
        },
    );
    let targets: Vec<String> = (0..4).map(|i| c.url(i).to_owned()).collect();
    let (puts, _) = write_load(&targets, "m/", 40, 4, 40);
    assert!(puts.len() > 100, "only {} puts acknowledged", puts.len());
    wait_until(
        Duration::from_secs(20),
        "the merged watcher sees every acknowledged put",
        || puts.is_subset(&seen.lock().unwrap().accepted().0),
    );
    let seen = seen.lock().unwrap();
    seen.check_per_key_order();
    assert_eq!(
        seen.accepted().1,
        0,
        "each change once, though two replicas sent it"
    );
    assert!(!follower.is_finished());
    drop(seen);

    // A watcher that leaves closes the feeds its node opened on the peers.
    let watchers = |n: usize| {
        c.nodes[0].status()["watch"]["watchers"] == n
            && c.nodes[1..]
                .iter()
                .all(|node| node.status()["watch"]["peer_feeds"] == n)
    };
    let extra = open(&format!("{}/v1?prefix=m/&watch=true", c.url(0)), None).unwrap();
    wait_until(Duration::from_secs(10), "two merged watches", || {
        watchers(2)
    });
    drop(extra);
    wait_until(
        Duration::from_secs(40),
        "the peers' feeds of a watcher that left are closed",
        || watchers(1),
    );

    // A key watch on a node that is not a replica of the key is sent to one that is.
    let no_redirects = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(None::<Duration>)
        .build()
        .unwrap();
    let (key, location) = (0..64)
        .find_map(|i| {
            let key = format!("r/{i}");
            let url = format!("{}/v1/{key}?watch=true", c.url(0));
            let answer = no_redirects.get(&url).send().unwrap();
            let location = answer
                .headers()
                .get("location")?
                .to_str()
                .unwrap()
                .to_owned();
            assert_eq!(answer.status(), 307);
            Some((key, location))
        })
        .expect("node 1 replicates every one of 64 keys with N = 2 of 4");
    assert!(
        location.ends_with(&format!("/v1/{key}?watch=true")),
        "{location}"
    );
    assert!(c.nodes[1..].iter().any(|n| location.starts_with(&n.url)));
    let redirected = read_events(open(&location, None).unwrap());
    put(c.url(0), &key, "{\"value\": \"here\"}").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let value = loop {
        match redirected.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Item::Event { data, .. }) => break data["value"].clone(),
            Ok(_) => continue,
            Err(e) => panic!("no event on the redirected key watch: {e}"),
        }
    };
    assert_eq!(value, "here");
    drop(redirected);
}

#[test]
fn a_peer_feed_of_one_key_carries_that_key_only() {
    // What a node asks its peers for when it serves a key watch (`/internal/watch?key=K`; the
    // `prefix=K` beside it is for peers that predate `key=`).
    let c = TestCluster::start_with(Options {
        nodes: 1,
        replication_factor: 1,
        ..Options::default()
    });
    let base = c.url(0).to_owned();
    let feed = read_events(open(&format!("{base}/internal/watch?prefix=a&key=a"), None).unwrap());
    let prefix_feed = read_events(open(&format!("{base}/internal/watch?prefix=a"), None).unwrap());
    put(&base, "ab", "{\"value\": 1}").unwrap();
    put(&base, "a", "{\"value\": 2}").unwrap();
    let first_event = |events: &mpsc::Receiver<Item>| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Item::Event { data, .. }) => break data["key"].as_str().unwrap().to_owned(),
                Ok(_) => continue,
                Err(e) => panic!("no event on the feed: {e}"),
            }
        }
    };
    assert_eq!(first_event(&feed), "a", "the key feed skips ab");
    assert_eq!(
        first_event(&prefix_feed),
        "ab",
        "the prefix feed has ab first"
    );
    assert_eq!(c.nodes[0].status()["watch"]["peer_feeds"], 2);
}
