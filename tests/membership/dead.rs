//! Dead nodes, replacements, aborts and racing changes, on real processes: a node killed for
//! good is removed with `force` and its ranges re-replicated from the survivors; a node is
//! replaced (live and dead); a change in progress is aborted; two changes fired at once through
//! two nodes end in one view. Afterwards the members hold exactly N copies of every key (counted
//! on each node's own data, `/internal/entry`) and every acknowledged key reads back.
//! Anti-entropy is slowed to once an hour here, so the copies come from the membership change.

use super::{keys_of, view, wait_committed};
use kv_tests::{free_port, send, wait_until, Answer, Node, Options, TestCluster};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

const N: usize = 3;

fn env(rate: &str) -> Vec<(String, String)> {
    [
        ("TRANSFER_KEYS_PER_SEC", rate),
        ("WAL_SYNC", "never"),
        ("ANTI_ENTROPY_INTERVAL_SECS", "3600"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn start(nodes: usize, rate: &str) -> TestCluster {
    TestCluster::start_with(Options {
        nodes,
        replication_factor: N,
        lb: false,
        env: env(rate),
    })
}

/// A new node that knows only itself, on a new port and data dir.
fn spare(c: &TestCluster, name: &str, rate: &str) -> Node {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut vars: Vec<(String, String)> = [
        ("NODE_NAME", name.to_owned()),
        ("PORT", port.to_string()),
        ("CURRENT_NODE_URL", url.clone()),
        ("CLUSTER_NODES", url.clone()),
        ("REPLICATION_FACTOR", N.to_string()),
        ("DATA_DIR", c.dir.path().join(name).display().to_string()),
        ("HEALTH_CHECK_INTERVAL_MS", "200".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.clone()))
    .collect();
    vars.extend(env(rate));
    let mut node = Node::new(
        name,
        &url,
        c.dir.path().join(name),
        c.dir.path().join(format!("{name}.log")),
        vars,
    );
    node.spawn();
    node.wait_healthy();
    node
}

/// Writes `count` keys `prefix/i` (value i) through `node` at w=all; returns them.
fn write_keys(node: &str, prefix: &str, count: usize) -> Vec<String> {
    let keys: Vec<String> = (0..count).map(|i| format!("{prefix}/{i:05}")).collect();
    for (chunk_no, chunk) in keys.chunks(500).enumerate() {
        let ops: Vec<Value> = chunk
            .iter()
            .enumerate()
            .map(|(j, k)| json!({"op": "put", "key": k, "value": chunk_no * 500 + j}))
            .collect();
        let answer = send(
            "POST",
            &format!("{node}/batch?w=all"),
            Some(&json!({ "ops": ops }).to_string()),
        )
        .unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text);
        for result in answer.json["results"].as_array().unwrap() {
            assert_eq!(result["status"], 200, "{result}");
        }
    }
    keys
}

/// True when `node` itself holds an entry for `key` (its own data, no forwarding).
fn holds(node: &str, key: &str) -> bool {
    send("GET", &format!("{node}/internal/entry/{key}"), None).is_ok_and(|a| a.status == 200)
}

/// Keys whose copy count on `nodes` is not exactly N, with the count (at most 5 listed).
fn wrong_copies(nodes: &[&str], keys: &[String]) -> Vec<(String, usize)> {
    let mut wrong = Vec::new();
    for key in keys {
        let copies = nodes.iter().filter(|n| holds(n, key)).count();
        if copies != N {
            wrong.push((key.clone(), copies));
            if wrong.len() == 5 {
                break;
            }
        }
    }
    wrong
}

fn wait_n_copies(nodes: &[&str], keys: &[String], within: Duration) {
    let mut last = Vec::new();
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        last = wrong_copies(nodes, keys);
        if last.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("keys without exactly {N} copies on {nodes:?} after {within:?}: {last:?}");
}

/// Every key reads back through `node` at r=all with the value it was written with.
fn assert_read_back(node: &str, keys: &[String]) {
    for key in keys {
        let answer = send("GET", &format!("{node}/v1/{key}?r=all"), None).unwrap();
        assert_eq!(answer.status, 200, "{key}: {}", answer.text);
        let i: u64 = key.rsplit('/').next().unwrap().parse().unwrap();
        assert_eq!(answer.json["value"], json!(i), "{key}");
    }
}

fn post(node: &str, body: Value, dry_run: bool) -> Answer {
    let url = format!(
        "{node}/admin/members{}",
        if dry_run { "?dry_run=true" } else { "" }
    );
    send("POST", &url, Some(&body.to_string())).unwrap()
}

fn ok(answer: Answer) -> Value {
    assert_eq!(answer.status, 200, "{}", answer.text);
    answer.json
}

fn member_urls(node: &str) -> Vec<String> {
    let mut urls: Vec<String> = view(node)["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["url"].as_str().unwrap().to_owned())
        .collect();
    urls.sort();
    urls
}

#[test]
fn a_node_killed_for_good_is_removed_with_force_and_every_key_has_n_copies_again() {
    let t0 = std::time::Instant::now();
    let mut c = start(4, "20000");
    eprintln!("{:?} started", t0.elapsed());
    let keys = write_keys(c.url(0), "dead", 800);
    eprintln!("{:?} written", t0.elapsed());
    let dead = c.url(3).to_owned();
    c.nodes[3].kill9();
    wait_until(
        Duration::from_secs(10),
        "the survivors see node4 down",
        || c.nodes[..3].iter().all(|n| n.sees_down(Some(&dead))),
    );

    // Writes acknowledged while node4 is down (quorum): node4 gets only hints, which the
    // removal discards; the survivors must still end with N copies of them.
    let mut keys = keys;
    for i in 0..100 {
        let key = format!("dead/after/{i:05}");
        let answer = send(
            "PUT",
            &format!("{}/v1/{key}", c.url(i % 3)),
            Some(&json!({ "value": i }).to_string()),
        )
        .unwrap();
        assert_eq!(answer.status, 200, "{key}: {}", answer.text);
        keys.push(key);
    }

    // Without force: refused, and the message says what to add.
    let refused = post(c.url(0), json!({"remove": [dead]}), false);
    assert_eq!(refused.status, 400, "{}", refused.text);
    assert_eq!(refused.json["error"], "invalid_plan");
    let message = refused.json["message"].as_str().unwrap();
    assert!(
        message.contains("down") && message.contains("force"),
        "{message}"
    );
    assert_eq!(view(c.url(0))["epoch"], 0, "a refusal changes nothing");

    // The dry run says the node is down.
    let plan = ok(post(
        c.url(0),
        json!({"remove": [dead], "force": true}),
        true,
    ));
    assert_eq!(plan["applied"], false);
    assert_eq!(plan["down"], json!([dead]));
    assert_eq!(plan["view"]["down"], json!([dead]));
    assert!(plan["keys_moved"].as_u64().unwrap() > 0, "{plan}");

    let applied = ok(post(
        c.url(1),
        json!({"remove": [dead], "force": true}),
        false,
    ));
    assert_eq!(applied["applied"], true);
    eprintln!("{:?} applied", t0.elapsed());
    wait_committed(c.url(0), 2);
    eprintln!("{:?} committed", t0.elapsed());
    let survivors = [c.url(0), c.url(1), c.url(2)];
    for node in survivors {
        wait_committed(node, 2);
        assert!(!member_urls(node).contains(&dead));
    }
    wait_n_copies(&survivors, &keys, Duration::from_secs(30));
    eprintln!("{:?} copies", t0.elapsed());
    assert_read_back(c.url(2), &keys);
    eprintln!("{:?} read back", t0.elapsed());
}

#[test]
fn a_node_is_replaced_while_up_and_after_it_died() {
    let mut c = start(3, "20000");
    let keys = write_keys(c.url(0), "repl", 600);

    // Live: node3 streams its ranges to node4, then drops them once node4 confirms.
    let n4 = spare(&c, "node4", "20000");
    let old = c.url(2).to_owned();
    let report = ok(post(
        c.url(0),
        json!({"replace": {old.clone(): n4.url.clone()}}),
        false,
    ));
    assert_eq!(report["down"], json!([]));
    eprintln!(
        "live replace of a node holding {} keys: keys_moved {}",
        keys.len(),
        report["keys_moved"]
    );
    wait_committed(c.url(0), 2);
    let members = [c.url(0), c.url(1), n4.url.as_str()];
    wait_committed(&n4.url, 2);
    wait_n_copies(&members, &keys, Duration::from_secs(30));
    wait_until(
        Duration::from_secs(30),
        "the replaced node dropped its keys",
        || keys_of(&old) == 0,
    );
    assert_read_back(&n4.url, &keys);
    c.nodes[2].kill9();

    // Dead: node1 is killed for good and replaced by node5, from the survivors.
    let n5 = spare(&c, "node5", "20000");
    let dead = c.url(0).to_owned();
    c.nodes[0].kill9();
    wait_until(Duration::from_secs(10), "node2 sees node1 down", || {
        c.nodes[1].sees_down(Some(&dead))
    });
    let report = ok(post(
        c.url(1),
        json!({"replace": {dead.clone(): n5.url.clone()}}),
        false,
    ));
    assert_eq!(report["down"], json!([dead]), "{report}");
    wait_committed(c.url(1), 4);
    wait_committed(&n5.url, 4);
    let members = [c.url(1), n4.url.as_str(), n5.url.as_str()];
    wait_n_copies(&members, &keys, Duration::from_secs(30));
    assert_read_back(&n5.url, &keys);
    let mut expected: Vec<String> = members.iter().map(|m| m.to_string()).collect();
    expected.sort();
    assert_eq!(member_urls(&n4.url), expected);
}

#[test]
fn a_change_in_progress_is_aborted_and_no_key_is_lost() {
    // Slow transfers, so the change is still running when it is aborted.
    let c = start(3, "50");
    let keys = write_keys(c.url(0), "abort", 1500);
    let n4 = spare(&c, "node4", "50");
    let leaving = c.url(2).to_owned();
    ok(post(
        c.url(0),
        json!({"add": [n4.url], "remove": [leaving]}),
        false,
    ));
    wait_until(Duration::from_secs(20), "the transfer is under way", || {
        keys_of(&n4.url) > 50
    });
    assert_eq!(view(c.url(1))["in_transition"], true);

    // One change at a time: a second plan is refused, naming the one in progress.
    let n5 = spare(&c, "node5", "50");
    let second = post(c.url(1), json!({"add": [n5.url]}), false);
    assert_eq!(second.status, 400, "{}", second.text);
    assert_eq!(second.json["error"], "change_in_progress");
    let message = second.json["message"].as_str().unwrap();
    assert!(message.contains(&n4.url), "names the change: {message}");

    // Writes during the change, acknowledged at the default quorum.
    let during: Vec<String> = (0..100).map(|i| format!("abort/during/{i:05}")).collect();
    for (i, key) in during.iter().enumerate() {
        let answer = send(
            "PUT",
            &format!("{}/v1/{key}", c.url(1)),
            Some(&json!({ "value": i }).to_string()),
        )
        .unwrap();
        assert_eq!(answer.status, 200, "{key}: {}", answer.text);
    }

    let aborted = ok(post(c.url(1), json!({"abort": true}), false));
    assert_eq!(aborted["aborted"], true);
    assert_eq!(aborted["view"]["epoch"], 2);
    let nodes = [c.url(0), c.url(1), c.url(2)];
    let mut original: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
    original.sort();
    for node in nodes {
        wait_committed(node, 2);
        assert_eq!(member_urls(node), original, "back to the previous view");
    }
    assert_eq!(
        post(c.url(0), json!({"abort": true}), false).status,
        400,
        "nothing left to abort"
    );
    // The joining node gives back what it received once the owners confirm they hold it.
    wait_until(
        Duration::from_secs(30),
        "the aborted node dropped the keys it received",
        || keys_of(&n4.url) == 0,
    );
    let all: Vec<String> = keys.iter().chain(&during).cloned().collect();
    wait_n_copies(&nodes, &all, Duration::from_secs(30));
    assert_read_back(c.url(2), &keys);
    for (i, key) in during.iter().enumerate() {
        let answer = send("GET", &format!("{}/v1/{key}?r=all", c.url(0)), None).unwrap();
        assert_eq!(
            (answer.status, answer.json["value"].clone()),
            (200, json!(i))
        );
    }
    // A new change goes through after the abort.
    ok(post(c.url(2), json!({"add": [n5.url]}), false));
    wait_committed(c.url(0), 4);
}

#[test]
fn two_changes_fired_at_once_through_two_nodes_end_in_one_view_with_n_copies() {
    let c = start(3, "20000");
    let keys = write_keys(c.url(0), "race", 1000);
    let n4 = spare(&c, "node4", "20000");
    let n5 = spare(&c, "node5", "20000");
    // Writes go on through node3 during the race; the acknowledged ones must survive it.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (node, stop) = (c.url(2).to_owned(), stop.clone());
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            for i in 0..5000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let key = format!("race/live/{i:05}");
                let put = send(
                    "PUT",
                    &format!("{node}/v1/{key}"),
                    Some(&json!({ "value": i }).to_string()),
                );
                if put.is_ok_and(|a| a.status == 200) {
                    acked.push(key);
                }
            }
            acked
        })
    };
    let barrier = Arc::new(Barrier::new(2));
    let fire = |via: String, add: String| {
        let barrier = barrier.clone();
        std::thread::spawn(move || {
            barrier.wait();
            post(&via, json!({ "add": [add] }), false)
        })
    };
    let a = fire(c.url(0).to_owned(), n4.url.clone());
    let b = fire(c.url(1).to_owned(), n5.url.clone());
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    eprintln!("racing changes: {} / {}", a.status, b.status);
    let outcomes = [(&a, &n4.url, &n5.url), (&b, &n5.url, &n4.url)];
    assert!(
        a.status == 200 || b.status == 200,
        "one of them goes through: {} / {}",
        a.text,
        b.text
    );
    for (answer, _, other) in outcomes {
        if answer.status != 200 {
            assert_eq!(answer.status, 400, "{}", answer.text);
            assert_eq!(
                answer.json["error"], "change_in_progress",
                "{}",
                answer.text
            );
            let message = answer.json["message"].as_str().unwrap();
            assert!(
                message.contains(other.as_str()),
                "names the other: {message}"
            );
        }
    }
    // Whatever happened, every node ends in one committed view.
    let everyone = [
        c.url(0),
        c.url(1),
        c.url(2),
        n4.url.as_str(),
        n5.url.as_str(),
    ];
    wait_committed(c.url(2), 2);
    let members = member_urls(c.url(2));
    wait_until(
        Duration::from_secs(30),
        "every member holds the same committed view",
        || {
            members.iter().all(|m| {
                let v = view(m);
                v["in_transition"] == false && member_urls(m) == members
            })
        },
    );
    let winners: Vec<&str> = [n4.url.as_str(), n5.url.as_str()]
        .into_iter()
        .filter(|u| members.iter().any(|m| m == u))
        .collect();
    assert!(!winners.is_empty(), "{members:?}");
    stop.store(true, Ordering::Relaxed);
    let acked = writer.join().unwrap();
    assert!(acked.len() > 10, "writes went on: {}", acked.len());
    let member_refs: Vec<&str> = members.iter().map(String::as_str).collect();
    let all: Vec<String> = keys.iter().chain(&acked).cloned().collect();
    wait_n_copies(&member_refs, &all, Duration::from_secs(30));
    for node in everyone
        .iter()
        .filter(|u| !members.iter().any(|m| m == **u))
    {
        assert_eq!(keys_of(node), 0, "{node} is no member and holds nothing");
    }
    assert_read_back(c.url(2), &all);
}

/// What two sides of a partition could do: each applies its own plan of the same epoch. Here
/// the lower-ranked plan runs (slow transfers) when the higher-ranked rival is offered to every
/// node; each adopts it (the tie rule), restarts its transfer for it, and the commit that follows
/// is the rival's, with N copies of every key on its members and nothing on the loser's node.
#[test]
fn a_node_that_adopts_a_rival_plan_restarts_its_transfer_for_it() {
    let c = start(3, "200");
    let keys = write_keys(c.url(0), "rival", 1500);
    let n4 = spare(&c, "node4", "200");
    let n5 = spare(&c, "node5", "200");
    let urls: Vec<&str> = c.nodes.iter().map(|n| n.url.as_str()).collect();
    let base = kv_cluster::View::seed(&urls);
    let a = base
        .plan(std::slice::from_ref(&n4.url), &[], c.url(0))
        .unwrap();
    let b = base
        .plan(std::slice::from_ref(&n5.url), &[], c.url(1))
        .unwrap();
    let (low, high) = if a.rank() < b.rank() { (a, b) } else { (b, a) };
    let via = low.coordinator.clone().unwrap();
    let low_new = low
        .members
        .iter()
        .find(|m| m.state == kv_cluster::MemberState::Joining)
        .unwrap()
        .url
        .clone();
    let high_new = high
        .members
        .iter()
        .find(|m| m.state == kv_cluster::MemberState::Joining)
        .unwrap()
        .url
        .clone();
    ok(post(&via, json!({ "add": [low_new] }), false));
    wait_until(
        Duration::from_secs(20),
        "the first plan's transfer is under way",
        || keys_of(&low_new) > 50,
    );
    let body = serde_json::to_string(&high).unwrap();
    for node in urls
        .iter()
        .copied()
        .chain([n4.url.as_str(), n5.url.as_str()])
    {
        let answer = send("POST", &format!("{node}/internal/members"), Some(&body)).unwrap();
        assert_eq!(answer.status, 200, "{node}: {}", answer.text);
    }
    for node in &urls {
        wait_committed(node, 2);
    }
    let mut members: Vec<String> = urls.iter().map(|u| u.to_string()).collect();
    members.push(high_new.clone());
    members.sort();
    assert_eq!(member_urls(c.url(0)), members, "the rival plan won");
    assert!(
        c.nodes.iter().any(|n| std::fs::read_to_string(&n.log)
            .unwrap_or_default()
            .contains("restarting the transfer for it")),
        "a node restarted its transfer for the rival plan"
    );
    let member_refs: Vec<&str> = members.iter().map(String::as_str).collect();
    wait_n_copies(&member_refs, &keys, Duration::from_secs(30));
    wait_until(
        Duration::from_secs(30),
        "the losing plan's node gives back what it received",
        || keys_of(&low_new) == 0,
    );
    assert_read_back(&high_new, &keys);
}

/// `POST /internal/replicate` of `records` to `node` (no cluster secret here), as a coordinator,
/// a hint replay or a read repair sends them.
fn push(node: &str, records: &[kv_core::Record]) {
    let answer = kv_tests::client()
        .post(format!("{node}/internal/replicate"))
        .body(kv_cluster::peer::encode_batch(records).to_vec())
        .send()
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200, "{node}");
}

/// What lost one key its last copy-count in the race above: a record coordinated under the
/// transition view reached a node after that node's cleanup for the commit had run (a hint
/// replayed late, a slow fan-out, a read repair), and nothing ever dropped it. Here such
/// stragglers arrive deterministically, after the cleanup: some on every node (the late copies
/// of one write), some only on the node that no longer owns the key, newer than the owners'
/// copies. Each non-owner drops them once the owners hold them: N copies again, and the newer
/// values reach the owners first.
#[test]
fn records_that_reach_a_node_after_its_cleanup_are_dropped_once_the_owners_hold_them() {
    let c = start(3, "20000");
    let keys = write_keys(c.url(0), "late", 40);
    let n4 = spare(&c, "node4", "20000");
    ok(post(c.url(0), json!({ "add": [n4.url.clone()] }), false));
    let members = [c.url(0), c.url(1), c.url(2), n4.url.as_str()];
    for m in members {
        wait_committed(m, 2);
    }
    wait_n_copies(&members, &keys, Duration::from_secs(30));
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let hlc = u64::try_from(since_epoch.as_millis()).unwrap() << 16;
    let late = |i: usize| {
        let version = kv_core::Version {
            hlc: hlc + i as u64,
            node: 7,
        };
        kv_core::Record::put(keys[i].clone(), version, format!("{}", 1000 + i).into())
    };
    let (everywhere, newer_on_non_owner): (Vec<usize>, Vec<usize>) =
        (0..keys.len()).partition(|i| i % 2 == 0);
    let all: Vec<kv_core::Record> = everywhere.iter().map(|&i| late(i)).collect();
    for m in members {
        push(m, &all);
    }
    for &i in &newer_on_non_owner {
        let outsider = members
            .iter()
            .find(|m| !holds(m, &keys[i]))
            .expect("one member is no owner");
        push(outsider, &[late(i)]);
    }
    assert_eq!(
        members.iter().filter(|m| holds(m, &keys[0])).count(),
        4,
        "the straggler landed on the node that does not own it"
    );
    wait_n_copies(&members, &keys, Duration::from_secs(30));
    for (i, key) in keys.iter().enumerate() {
        let answer = send("GET", &format!("{}/v1/{key}?r=all", c.url(0)), None).unwrap();
        assert_eq!(answer.status, 200, "{key}: {}", answer.text);
        assert_eq!(answer.json["value"], json!(1000 + i), "{key}");
    }
}
