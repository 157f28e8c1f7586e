//! Black-box tests of `kvctl` against real 3-node clusters behind a kv-lb: every command, its
//! `--json` output parsed, and its exit codes (found, not found, precondition failed, unavailable
//! with a node down at w=all, auth without a token on a closed cluster, bad input); `doctor`
//! finds a node that is down and a node whose clock libfaketime moved 30 s.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use kv_tests::{bin_dir, free_port, send, wait_until, Node, Options, TestCluster};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one kvctl run may take (membership changes follow the transfer to its commit).
const RUN_DEADLINE: Duration = Duration::from_secs(90);

/// The kvctl binary (the harness builds it with kv-node and kv-lb).
fn kvctl_bin() -> PathBuf {
    bin_dir().join("kvctl")
}

/// What one kvctl run printed and how it exited.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// stdout parsed as JSON (panics with both streams when it is not).
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    fn expect(self, code: i32) -> Run {
        assert_eq!(self.code, code, "expected exit code {code}: {self:?}");
        self
    }
}

/// Runs kvctl with `KV_URL=url`, `KV_TOKEN=token` (if any), `args` and `stdin`; bounded.
fn kvctl(url: &str, token: Option<&str>, args: &[&str], stdin: Option<&str>) -> Run {
    let mut command = Command::new(kvctl_bin());
    command
        .env_clear()
        .env("KV_URL", url)
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(token) = token {
        command.env("KV_TOKEN", token);
    }
    let mut child = command.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + RUN_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kvctl {args:?} ran longer than {RUN_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        code: status.code().unwrap_or(-1),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const TOKEN: &str = "kvctl-test-token";

#[test]
fn data_commands_print_json_and_exit_with_the_documented_codes() {
    let mut c = TestCluster::start_with(Options {
        lb: true,
        env: env(&[("AUTH_TOKEN", TOKEN)]),
        ..Options::default()
    });
    let lb = c.lb_url.clone().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ctl = |args: &[&str]| kvctl(&lb, Some(TOKEN), args, None);

    // put: JSON when it parses, a string otherwise; from an argument, a file, stdin.
    let put = ctl(&["put", "users/1", r#"{"name":"ada"}"#, "--json"]).expect(0);
    let version = put.json()["version"].as_str().unwrap().to_owned();
    let other = ctl(&["put", "greeting", "hello", "--json"]).expect(0);
    let other_version = other.json()["version"].as_str().unwrap().to_owned();
    ctl(&["put", "number", "42", "--string"]).expect(0);
    let file = dir.path().join("value.json");
    std::fs::write(&file, "[1, 2, 3]\n").unwrap();
    ctl(&["put", "from/file", "--file", file.to_str().unwrap()]).expect(0);
    kvctl(&lb, Some(TOKEN), &["put", "from/stdin"], Some("a line\n")).expect(0);
    for (key, value) in [
        ("users/1", json!({"name": "ada"})),
        ("greeting", json!("hello")),
        ("number", json!("42")),
        ("from/file", json!([1, 2, 3])),
        ("from/stdin", json!("a line")),
    ] {
        let got = ctl(&["get", key, "--json"]).expect(0).json();
        assert_eq!((got["key"].as_str(), &got["value"]), (Some(key), &value));
    }
    let table = ctl(&["get", "users/1"]).expect(0);
    assert!(table.stdout.contains(&version), "{table:?}");

    // Not found: 1, with the error as JSON on stdout.
    let missing = ctl(&["get", "no/such/key", "--json"]).expect(1);
    assert_eq!(missing.json()["status"], 404);
    assert_eq!(missing.json()["exit_code"], 1);

    // Preconditions: 412 is 3; the right version and a new key pass.
    ctl(&["put", "users/1", "2", "--if-absent"]).expect(3);
    ctl(&["put", "users/1", "2", "--if-match", &other_version]).expect(3);
    let updated = ctl(&["put", "users/1", "2", "--if-match", &version, "--json"]).expect(0);
    assert_ne!(updated.json()["version"].as_str(), Some(version.as_str()));
    ctl(&["put", "fresh", "1", "--if-absent"]).expect(0);
    ctl(&["delete", "fresh", "--if-match", &version]).expect(3);

    // TTL shows on reads; a bad TTL is bad input (2) and writes nothing.
    ctl(&["put", "leased", "me", "--ttl", "60"]).expect(0);
    let ttl = ctl(&["get", "leased", "--json"]).expect(0).json()["ttl_secs"].clone();
    assert!(ttl.as_u64().is_some_and(|t| (1..=60).contains(&t)), "{ttl}");
    ctl(&["put", "badttl", "1", "--ttl", "soon"]).expect(2);
    ctl(&["get", "badttl"]).expect(1);

    // delete: 0, then the key is gone (1), and deleting it again is 1.
    assert_eq!(
        ctl(&["delete", "greeting", "--json"]).expect(0).json()["deleted"],
        true
    );
    ctl(&["get", "greeting"]).expect(1);
    ctl(&["delete", "greeting"]).expect(1);

    // batch from a file: 25 puts, all 200, exit 0.
    let ops: Vec<Value> = (0..25)
        .map(|i| json!({"op": "put", "key": format!("list/{i:02}"), "value": i}))
        .collect();
    let batch_file = dir.path().join("batch.json");
    std::fs::write(&batch_file, json!({ "ops": ops }).to_string()).unwrap();
    let batch = ctl(&["batch", batch_file.to_str().unwrap(), "--json"]).expect(0);
    let results = batch.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 25);
    assert!(results.iter().all(|r| r["status"] == 200), "{results:?}");
    // A bare array works too; a failed operation sets the exit code (a get of a missing key: 1).
    let mixed = dir.path().join("mixed.json");
    std::fs::write(
        &mixed,
        r#"[{"op": "put", "key": "b/1", "value": true}, {"op": "get", "key": "b/missing"}]"#,
    )
    .unwrap();
    let run = ctl(&["batch", mixed.to_str().unwrap(), "--json"]).expect(1);
    assert_eq!(run.json()["results"][0]["status"], 200);
    assert_eq!(run.json()["results"][1]["status"], 404);
    let junk = dir.path().join("junk.json");
    std::fs::write(&junk, "not json").unwrap();
    ctl(&["batch", junk.to_str().unwrap()]).expect(2);

    // list follows the cursor across pages, in key order; --limit stops early.
    let listed = ctl(&["list", "--prefix", "list/", "--page-size", "7", "--json"]).expect(0);
    let listed = listed.json();
    let keys: Vec<&str> = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..25).map(|i| format!("list/{i:02}")).collect();
    assert_eq!(keys, expected);
    assert!(listed["pages"].as_u64().unwrap() >= 4, "{listed}");
    let limited = ctl(&[
        "list", "--prefix", "list/", "--limit", "10", "--values", "--json",
    ]);
    let limited = limited.expect(0).json();
    assert_eq!(limited["keys"].as_array().unwrap().len(), 10);
    assert_eq!(limited["items"][3]["value"], 3);
    let plain = ctl(&["list", "--prefix", "list/"]).expect(0);
    assert_eq!(plain.stdout.lines().count(), 25, "{plain:?}");

    // Auth: no token or a wrong one on a closed cluster is 5.
    let anonymous = kvctl(&lb, None, &["get", "users/1", "--json"], None).expect(5);
    assert_eq!(anonymous.json()["status"], 401);
    kvctl(&lb, Some("wrong"), &["put", "x", "1"], None).expect(5);

    // Usage: a missing argument or a bad option is 2; nothing answering is 4.
    ctl(&["get"]).expect(2);
    ctl(&["list", "--page-size", "5000"]).expect(2);
    let nobody = format!("http://127.0.0.1:{}", free_port());
    kvctl(&nobody, Some(TOKEN), &["get", "users/1"], None).expect(4);

    // Unavailable: with one node down a write at w=all is refused (503): 4, nothing written.
    let down = c.nodes[2].url.clone();
    c.nodes[2].kill9();
    wait_until(
        Duration::from_secs(10),
        "node1 and node2 see node3 down",
        || c.nodes[0].sees_down(Some(&down)) && c.nodes[1].sees_down(Some(&down)),
    );
    let refused = ctl(&["put", "needs/all", "1", "--w", "all", "--json"]).expect(4);
    assert_eq!(refused.json()["status"], 503, "{refused:?}");
    ctl(&["get", "needs/all"]).expect(1);
    // At the default quorum the write goes on.
    ctl(&["put", "needs/quorum", "1"]).expect(0);
}

const SECRET: &str = "kvctl-cluster-secret";

/// A node that knows only itself, closed with the cluster's secret, for `members add`.
fn new_node(c: &TestCluster, name: &str) -> Node {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let vars = [
        ("NODE_NAME", name.to_owned()),
        ("PORT", port.to_string()),
        ("CURRENT_NODE_URL", url.clone()),
        ("CLUSTER_NODES", url.clone()),
        ("REPLICATION_FACTOR", "3".to_owned()),
        ("DATA_DIR", c.dir.path().join(name).display().to_string()),
        ("HEALTH_CHECK_INTERVAL_MS", "200".to_owned()),
        ("CLUSTER_SECRET", SECRET.to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ]
    .map(|(k, v)| (k.to_owned(), v));
    let mut node = Node::new(
        name,
        &url,
        c.dir.path().join(name),
        c.dir.path().join(format!("{name}.log")),
        vars.to_vec(),
    );
    node.spawn();
    node.wait_healthy();
    node
}

fn member_urls(view: &Value) -> Vec<String> {
    let mut urls: Vec<String> = view["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["url"].as_str().unwrap().to_owned())
        .collect();
    urls.sort();
    urls
}

#[test]
fn status_repair_members_backup_and_restore() {
    let mut c = TestCluster::start_with(Options {
        lb: true,
        env: env(&[("CLUSTER_SECRET", SECRET)]),
        ..Options::default()
    });
    c.wait_converged();
    let lb = c.lb_url.clone().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ctl = |args: &[&str]| kvctl(&lb, Some(SECRET), args, None);
    for i in 0..20 {
        ctl(&["put", &format!("s/{i}"), &i.to_string()]).expect(0);
    }

    // status: every node and the LB's view; exit 0 while all are healthy.
    let status = ctl(&["status", "--json"]).expect(0).json();
    assert_eq!(status["lb"]["name"], "kv-lb");
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for node in nodes {
        assert_eq!(node["healthy"], true, "{node}");
        assert_eq!(node["status"]["keys"], 20, "{node}");
        assert!(node["disk_free_bytes"].as_u64().unwrap() > 0, "{node}");
        assert!(node["status"]["clock"]["offset_ms"].is_i64(), "{node}");
    }
    let table = ctl(&["status"]).expect(0);
    for name in ["node1", "node2", "node3", "LB's view of"] {
        assert!(table.stdout.contains(name), "{table:?}");
    }
    // Straight to a node: the same nodes, no LB view.
    let direct = kvctl(c.url(1), None, &["status", "--json"], None)
        .expect(0)
        .json();
    assert!(direct["lb"].is_null());
    assert_eq!(direct["nodes"].as_array().unwrap().len(), 3);

    // repair: a complete round on a node (the LB picks one), then on every node.
    let repair = ctl(&["repair", "--json"]).expect(0).json();
    assert_eq!(repair[0]["report"]["complete"], true, "{repair}");
    assert_eq!(repair[0]["report"]["trigger"], "admin");
    let all = ctl(&["repair", "--all", "--json"]).expect(0).json();
    assert_eq!(all.as_array().unwrap().len(), 3);
    let last = ctl(&["repair", "--last", "--node", c.url(2), "--json"])
        .expect(0)
        .json();
    assert_eq!(last[0]["report"]["last"]["trigger"], "admin");
    // /admin without the secret is refused: 5.
    kvctl(&lb, None, &["repair"], None).expect(5);

    // backup by name and by URL, then restore into a fresh folder with kv-node restore.
    let file = dir.path().join("node1.db");
    let backup = ctl(&["backup", "node1", file.to_str().unwrap(), "--json"])
        .expect(0)
        .json();
    let bytes = std::fs::metadata(&file).unwrap().len();
    assert_eq!(backup["bytes"], bytes);
    assert_eq!(backup["entries"], 20);
    assert_eq!(backup["node"], c.url(0));
    let by_url = dir.path().join("node2.db");
    ctl(&["backup", c.url(1), by_url.to_str().unwrap()]).expect(0);
    assert!(std::fs::metadata(&by_url).unwrap().len() > 0);
    ctl(&["backup", "node9", by_url.to_str().unwrap()]).expect(1);
    let fresh = dir.path().join("restored");
    let restore = [
        "restore",
        file.to_str().unwrap(),
        "--data-dir",
        fresh.to_str().unwrap(),
    ];
    let restored = ctl(&[&restore[..], &["--json"][..]].concat())
        .expect(0)
        .json();
    assert!(
        restored["output"]
            .as_str()
            .unwrap()
            .contains("restored 20 entries"),
        "{restored}"
    );
    assert!(fresh.join("snapshot.db").is_file());
    ctl(&restore).expect(2); // the folder now holds data: refused without --force
    let mut forced = restore.to_vec();
    forced.push("--force");
    ctl(&forced).expect(0);
    let printed = ctl(&[&forced[..], &["--print"][..]].concat()).expect(0);
    assert!(printed.stdout.contains("restore") && printed.stdout.contains("--force"));

    // members: the view; a plan changes nothing; add and remove a fourth node with --yes.
    let view = ctl(&["members", "--json"]).expect(0).json();
    assert_eq!(view["members"].as_array().unwrap().len(), 3);
    let epoch = view["epoch"].as_u64().unwrap();
    let mut node4 = new_node(&c, "node4");
    let plan = ctl(&["members", "plan", "--add", &node4.url, "--json"])
        .expect(0)
        .json();
    assert_eq!(plan["applied"], false);
    assert_eq!(plan["nodes"].as_object().unwrap().len(), 4);
    assert!(plan["keys_moved"].as_u64().unwrap() > 0, "{plan}");
    // Without --yes and without a terminal nothing is applied: 2.
    ctl(&["members", "add", &node4.url]).expect(2);
    let same = ctl(&["members", "--json"]).expect(0).json();
    assert_eq!(same["epoch"].as_u64(), Some(epoch));
    let added = ctl(&["members", "add", &node4.url, "--yes", "--json"])
        .expect(0)
        .json();
    assert_eq!(added["applied"]["applied"], true);
    assert!(
        added["committed"]["epoch"].as_u64().unwrap() >= epoch + 2,
        "{added}"
    );
    assert_eq!(added["committed"]["in_transition"], false);
    let mut with4: Vec<String> = c.nodes.iter().map(|n| n.url.clone()).collect();
    with4.push(node4.url.clone());
    with4.sort();
    assert_eq!(member_urls(&added["committed"]), with4);
    wait_until(Duration::from_secs(15), "node4 holds keys", || {
        send("GET", &format!("{}/", node4.url), None)
            .is_ok_and(|a| a.json["keys"].as_u64().unwrap_or(0) > 0)
    });
    let removed = ctl(&["members", "remove", &node4.url, "--yes", "--json"])
        .expect(0)
        .json();
    let mut three: Vec<String> = c.nodes.iter().map(|n| n.url.clone()).collect();
    three.sort();
    assert_eq!(member_urls(&removed["committed"]), three);
    node4.kill9();

    // status with a node down: 4, and the node is named.
    let down = c.nodes[1].url.clone();
    c.nodes[1].kill9();
    let run = ctl(&["status", "--json"]).expect(4);
    let status = run.json();
    assert!(
        status["unhealthy"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u == down.as_str()),
        "{status}"
    );
    let entry = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["url"] == down.as_str())
        .unwrap()
        .clone();
    assert_eq!(entry["reachable"], false);
    assert!(
        entry["error"]
            .as_str()
            .unwrap()
            .contains("onnection refused"),
        "{entry}"
    );
}

#[test]
fn members_abort_replace_and_forced_remove() {
    let mut c = TestCluster::start_with(Options {
        lb: true,
        env: env(&[("CLUSTER_SECRET", SECRET)]),
        ..Options::default()
    });
    c.wait_converged();
    let lb = c.lb_url.clone().unwrap();
    let ctl = |args: &[&str]| kvctl(&lb, Some(SECRET), args, None);
    for i in 0..30 {
        ctl(&["put", &format!("r/{i}"), &i.to_string()]).expect(0);
    }
    let urls = |view: &Value| member_urls(view);
    let start = ctl(&["members", "--json"]).expect(0).json();
    let three = urls(&start);

    // A change that cannot finish (the joining node died) is aborted: the old members return.
    let mut node4 = new_node(&c, "node4");
    let n4 = node4.url.clone();
    let applied = ctl(&["members", "add", &n4, "--yes", "--no-wait", "--json"]).expect(0);
    assert_eq!(applied.json()["committed"], Value::Null);
    node4.kill9();
    ctl(&["members", "abort"]).expect(2); // no terminal, no --yes: nothing done
    let aborted = ctl(&["members", "abort", "--yes", "--json"])
        .expect(0)
        .json();
    assert_eq!(aborted["aborted"], true, "{aborted}");
    wait_until(Duration::from_secs(20), "the abort is adopted", || {
        let view = ctl(&["members", "--json"]).json();
        view["in_transition"] == false && urls(&view) == three
    });

    // replace: node3 leaves, node5 joins, in one change followed to its commit.
    let node5 = new_node(&c, "node5");
    let n3 = c.url(2).to_owned();
    let replaced = ctl(&["members", "replace", &n3, &node5.url, "--yes", "--json"]).expect(0);
    let replaced = replaced.json();
    assert_eq!(replaced["plan"]["applied"], false);
    let mut expected = vec![c.url(0).to_owned(), c.url(1).to_owned(), node5.url.clone()];
    expected.sort();
    assert_eq!(urls(&replaced["committed"]), expected, "{replaced}");
    c.nodes[2].kill9();

    // A dead node is removed only with --force (without it: 400 invalid_plan, exit 2).
    let n2 = c.url(1).to_owned();
    c.nodes[1].kill9();
    wait_until(
        Duration::from_secs(10),
        "node1 and node5 see node2 down",
        || c.nodes[0].sees_down(Some(&n2)) && node5.sees_down(Some(&n2)),
    );
    let refused = ctl(&["members", "remove", &n2, "--yes", "--json"]).expect(2);
    assert_eq!(refused.json()["error"], "invalid_plan", "{refused:?}");
    let removed = ctl(&["members", "remove", &n2, "--force", "--yes", "--json"]).expect(0);
    let mut two = vec![c.url(0).to_owned(), node5.url.clone()];
    two.sort();
    assert_eq!(urls(&removed.json()["committed"]), two);
    // Every key is still there, on the two nodes left.
    wait_until(
        Duration::from_secs(10),
        "the LB routes to the two nodes left",
        || ctl(&["get", "r/7"]).code == 0,
    );
    let listed = ctl(&["list", "--prefix", "r/", "--json"]).expect(0).json();
    assert_eq!(listed["keys"].as_array().unwrap().len(), 30, "{listed}");
}

/// The doctor's checks of one kind, as (status, subject, detail).
fn checks(report: &Value, kind: &str) -> Vec<(String, String, String)> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["check"] == kind)
        .map(|c| {
            (
                c["status"].as_str().unwrap().to_owned(),
                c["subject"].as_str().unwrap().to_owned(),
                c["detail"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn doctor_finds_a_down_node_and_a_skewed_clock() {
    let lib = kv_tests::libfaketime();
    let mut c = TestCluster::start_with(Options {
        lb: true,
        env: env(&[("CLUSTER_SECRET", SECRET), ("MIN_FREE_BYTES", "33554432")]),
        ..Options::default()
    });
    c.wait_converged();
    let lb = c.lb_url.clone().unwrap();
    let disk = tempfile::tempdir().unwrap();
    let data_dir = disk.path().to_str().unwrap().to_owned();
    let doctor = |token: Option<&str>| {
        kvctl(
            &lb,
            token,
            &[
                "doctor",
                "--data-dir",
                &data_dir,
                "--fsyncs",
                "50",
                "--json",
            ],
            None,
        )
    };

    // A healthy cluster: no check fails.
    let healthy = doctor(Some(SECRET)).expect(0).json();
    assert_eq!(healthy["failed"], 0, "{healthy}");
    let fsync = checks(&healthy, "fsync");
    assert_eq!(fsync.len(), 1);
    assert!(fsync[0].2.contains("fsyncs/s"), "{fsync:?}");
    assert_eq!(checks(&healthy, "fds").len(), 1);
    // Free disk against each node's own reserve (MIN_FREE_BYTES from its GET /).
    let disks = checks(&healthy, "disk");
    assert_eq!(disks.len(), 3);
    assert!(
        disks
            .iter()
            .all(|d| d.2.contains("reserve MIN_FREE_BYTES 32.0 MiB")),
        "{disks:?}"
    );
    assert_eq!(checks(&healthy, "version")[0].0, "ok");
    assert_eq!(checks(&healthy, "clock").len(), 3);
    assert!(
        checks(&healthy, "clock").iter().all(|c| c.0 == "ok"),
        "{healthy}"
    );
    // /internal is closed on every node (CLUSTER_SECRET); /v1 is open (no AUTH_TOKEN): a warning.
    let closed = checks(&healthy, "closed");
    assert!(
        closed.len() == 3 && closed.iter().all(|c| c.0 == "ok"),
        "{closed:?}"
    );
    assert_eq!(checks(&healthy, "credentials")[0].0, "warn");

    // node3 comes back 30 s behind; node2 goes down.
    c.nodes[2].kill9();
    c.nodes[2].set_env("LD_PRELOAD", &lib.display().to_string());
    c.nodes[2].set_env("FAKETIME", "-30s");
    c.nodes[2].set_env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    c.nodes[2].restart();
    let down = c.nodes[1].url.clone();
    c.nodes[1].kill9();
    wait_until(
        Duration::from_secs(10),
        "node1 and node3 see node2 down",
        || c.nodes[0].sees_down(Some(&down)) && c.nodes[2].sees_down(Some(&down)),
    );

    let report = doctor(Some(SECRET)).expect(6).json();
    let unreachable: Vec<_> = checks(&report, "reachable")
        .into_iter()
        .filter(|c| c.0 == "fail")
        .collect();
    assert_eq!(unreachable.len(), 1, "{report}");
    assert_eq!(unreachable[0].1, down);
    let clocks = checks(&report, "clock");
    let skewed: Vec<_> = clocks.iter().filter(|c| c.0 == "fail").collect();
    assert_eq!(skewed.len(), 1, "{clocks:?}");
    assert_eq!(skewed[0].1, "node3");
    let offset: i64 = skewed[0]
        .2
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no offset in {:?}", skewed[0]));
    assert!((offset + 30_000).abs() < 3_000, "{offset}");
    // node1's clock is right (it may warn that it cannot tell, with one peer up and off).
    assert!(
        clocks.iter().any(|c| c.1 == "node1" && c.0 != "fail"),
        "{clocks:?}"
    );
    // The survivors see node2 down.
    assert!(
        checks(&report, "peers")
            .iter()
            .any(|c| c.0 == "fail" && c.2.contains(&down)),
        "{report}"
    );
    // The human report: one line per check, with what to do.
    let text = kvctl(&lb, Some(SECRET), &["doctor"], None).expect(6);
    let line = text
        .stdout
        .lines()
        .find(|l| l.contains(" node3: clock "))
        .unwrap_or_else(|| panic!("{text:?}"));
    assert!(
        line.starts_with("FAIL") && line.contains("chrony"),
        "{line}"
    );
}

#[test]
fn completions_help_and_watch_need_no_cluster() {
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    for (shell, marker) in [
        ("bash", "_kvctl"),
        ("zsh", "#compdef kvctl"),
        ("fish", "complete -c kvctl"),
    ] {
        let run = kvctl(&nowhere, None, &["completions", shell], None).expect(0);
        assert!(run.stdout.contains(marker), "{shell}: {}", run.stdout);
        assert!(
            run.stdout.contains("doctor"),
            "{shell} completes the commands"
        );
    }
    kvctl(&nowhere, None, &["completions", "tcsh"], None).expect(2);
    let help = kvctl(&nowhere, None, &["--help"], None).expect(0);
    assert!(help.stdout.contains("Exit codes:") && help.stdout.contains("precondition failed"));
    // No node to watch, no reconnection allowed: unavailable.
    kvctl(&nowhere, None, &["watch", "k", "--reconnects", "0"], None).expect(4);
    kvctl(&nowhere, None, &["watch", "k", "--prefix", "p"], None).expect(2);
    kvctl(&nowhere, None, &["frobnicate"], None).expect(2);
    kvctl("localhost:9000", None, &["get", "k"], None).expect(2);
    let path = Path::new("/nonexistent/kvctl-ca.pem");
    let run = kvctl(
        &nowhere,
        None,
        &["get", "k", "--cacert", path.to_str().unwrap()],
        None,
    );
    run.expect(2);
}

#[test]
fn https_with_the_cluster_ca() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let made = Command::new(bin_dir().join("kv-node"))
        .arg("tls-certs")
        .arg(&certs)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(made.success(), "kv-node tls-certs failed");
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let file = |name: &str| certs.join(name).display().to_string();
    let vars = [
        ("NODE_NAME", "node1".to_owned()),
        ("PORT", port.to_string()),
        ("CURRENT_NODE_URL", url.clone()),
        ("CLUSTER_NODES", url.clone()),
        ("REPLICATION_FACTOR", "1".to_owned()),
        ("DATA_DIR", dir.path().join("node1").display().to_string()),
        ("TLS_CERT_FILE", file("node.pem")),
        ("TLS_KEY_FILE", file("node-key.pem")),
        ("TLS_CA_FILE", file("ca.pem")),
        ("RUST_LOG", "info".to_owned()),
    ]
    .map(|(k, v)| (k.to_owned(), v));
    let mut node = Node::new(
        "node1",
        &url,
        dir.path().join("node1"),
        dir.path().join("node1.log"),
        vars.to_vec(),
    );
    node.spawn();
    let ca = file("ca.pem");
    let ctl = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--cacert", ca.as_str()]);
        kvctl(&url, None, &all, None)
    };
    wait_until(
        Duration::from_secs(30),
        "the TLS node answers kvctl",
        || ctl(&["status"]).code == 0,
    );
    ctl(&["put", "secure", r#"{"tls": true}"#]).expect(0);
    let got = ctl(&["get", "secure", "--json"]).expect(0).json();
    assert_eq!(got["value"]["tls"], true);
    // Without the CA the server's certificate is not trusted: no answer, 4.
    let untrusted = kvctl(&url, None, &["get", "secure"], None).expect(4);
    assert!(untrusted.stderr.contains("certificate"), "{untrusted:?}");
    // A file that holds no certificate is bad input.
    kvctl(
        &url,
        None,
        &["get", "secure", "--cacert", &file("node-key.pem")],
        None,
    )
    .expect(2);
    node.kill9();
}

#[test]
fn watch_prints_the_changes_of_a_prefix_as_they_happen() {
    let c = TestCluster::start(3);
    let node = c.url(1).to_owned();
    let watcher = {
        let node = node.clone();
        std::thread::spawn(move || {
            kvctl(
                &node,
                None,
                &["watch", "--prefix", "w/", "--count", "3", "--json"],
                None,
            )
        })
    };
    // Writes go on until the watcher has printed its 3 events (it may connect after the first).
    let mut i = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !watcher.is_finished() {
        assert!(
            Instant::now() < deadline,
            "kvctl watch saw fewer than 3 events"
        );
        let answer = send(
            "POST",
            &format!("{}/v1/w/{i}", c.url(0)),
            Some(&json!({ "value": i }).to_string()),
        )
        .unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text);
        send(
            "POST",
            &format!("{}/v1/other/{i}", c.url(0)),
            Some(&json!({ "value": i }).to_string()),
        )
        .unwrap();
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let run = watcher.join().unwrap().expect(0);
    let events: Vec<Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3, "{run:?}");
    for event in &events {
        assert_eq!(event["event"], "put", "{event}");
        let key = event["data"]["key"].as_str().unwrap();
        assert!(key.starts_with("w/"), "only the prefix: {event}");
        assert_eq!(event["id"], event["data"]["version"], "{event}");
    }
}
