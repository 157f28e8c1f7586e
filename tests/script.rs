//! Black-box test of `scripts/cluster.sh`, the README's quick-start command: `up` on free ports,
//! a round trip through the load balancer, `down`, and no process left behind.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use kv_tests::{bin_dir, send};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

/// A base port with `count` free ports after it, and one more free port for the LB.
fn free_port_run(count: u16) -> (u16, u16) {
    for _ in 0..200 {
        // below the kernel's ephemeral range (32768-), where client connections take their ports
        let base = 10_000 + (rand_u16() % 22_000);
        let listeners: Vec<_> = (0..=count)
            .filter_map(|i| TcpListener::bind(("127.0.0.1", base + i)).ok())
            .collect();
        if listeners.len() == usize::from(count) + 1 {
            return (base, base + count);
        }
    }
    panic!("no run of free ports found");
}

fn rand_u16() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    (nanos ^ std::process::id()) as u16
}

fn script(root: &Path, args: &[&str]) -> std::process::Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh");
    Command::new("bash")
        .arg(script)
        .args(args)
        .env("KV_ROOT", root)
        .env("KV_BIN_DIR", bin_dir())
        .env("RUST_LOG", "info")
        .output()
        .unwrap()
}

fn pids(root: &Path) -> Vec<u32> {
    let run = root.join("run");
    std::fs::read_dir(&run)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// Stops whatever the script started under `root` if the test ends early (a failed assertion):
/// the script detaches its processes, so nothing else would.
struct StopOnDrop<'a>(&'a Path);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        for pid in pids(self.0) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

#[test]
fn cluster_sh_up_round_trip_down_leaves_nothing_behind() {
    let root = tempfile::tempdir().unwrap();
    let _cleanup = StopOnDrop(root.path());
    let (base, lb) = free_port_run(5); // room for a 4th node before the LB port
    let up = script(
        root.path(),
        &[
            "up",
            "--no-build",
            "--base-port",
            &base.to_string(),
            "--lb-port",
            &lb.to_string(),
        ],
    );
    let stdout = String::from_utf8_lossy(&up.stdout);
    assert!(
        up.status.success(),
        "up failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert!(
        stdout.contains(&format!("localhost:{lb}/v1/mykey")) || stdout.contains("/v1/mykey"),
        "prints the curl examples:\n{stdout}"
    );
    let started = pids(root.path());
    assert_eq!(started.len(), 4, "3 nodes and the LB");
    assert!(started.iter().all(|p| alive(*p)));
    // The three nodes share this machine: each gets its share of the cores as workers, the LB
    // one per core.
    let nproc = Command::new("nproc").output().unwrap();
    let nproc: usize = String::from_utf8_lossy(&nproc.stdout)
        .trim()
        .parse()
        .unwrap();
    let node_log = std::fs::read_to_string(root.path().join("run/node1.log")).unwrap();
    let wanted = format!("workers={}", (nproc / 3).max(1));
    assert!(
        node_log.contains(&wanted),
        "{wanted} in node1's log:\n{node_log}"
    );
    let lb_log = std::fs::read_to_string(root.path().join("run/lb.log")).unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let wanted = format!("workers={cores}");
    assert!(
        lb_log.contains(&wanted),
        "{wanted} in the LB's log:\n{lb_log}"
    );

    let lb_url = format!("http://127.0.0.1:{lb}");
    let put = send(
        "POST",
        &format!("{lb_url}/v1/mykey"),
        Some(r#"{"value": "hello"}"#),
    )
    .unwrap();
    assert_eq!(put.status, 200, "{}", put.text);
    assert_eq!(
        send("GET", &format!("{lb_url}/v1/mykey"), None)
            .unwrap()
            .json["value"],
        "hello"
    );
    assert!(
        root.path().join("data/node1").exists(),
        "data in ./data/node1..3"
    );
    assert_cluster_is_closed(root.path(), base);

    let status = script(root.path(), &["status"]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let table = String::from_utf8_lossy(&status.stdout);
    assert_eq!(
        table.lines().filter(|l| l.contains(" alive ")).count(),
        4,
        "{table}"
    );
    // Grow by one node and shrink again: data stays readable through the LB.
    let add = script(root.path(), &["add"]);
    assert!(
        add.status.success(),
        "{}{}",
        String::from_utf8_lossy(&add.stdout),
        String::from_utf8_lossy(&add.stderr)
    );
    let remove = script(root.path(), &["remove", "node2"]);
    assert!(
        remove.status.success(),
        "{}",
        String::from_utf8_lossy(&remove.stderr)
    );
    let table = String::from_utf8_lossy(&script(root.path(), &["status"]).stdout).into_owned();
    assert!(
        table.contains("node4") && !table.contains("node2"),
        "{table}"
    );
    assert_eq!(
        send("GET", &format!("{lb_url}/v1/mykey"), None)
            .unwrap()
            .json["value"],
        "hello"
    );
    // A killed node comes back with `start`.
    let node3: u32 = std::fs::read_to_string(root.path().join("run/node3.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    Command::new("kill")
        .args(["-KILL", &node3.to_string()])
        .status()
        .unwrap();
    kv_tests::wait_until(std::time::Duration::from_secs(10), "node3 is gone", || {
        !alive(node3)
    });
    let start = script(root.path(), &["start", "node3"]);
    assert!(
        start.status.success(),
        "{}",
        String::from_utf8_lossy(&start.stderr)
    );
    let mut started = started;
    started.extend(pids(root.path()));

    let down = script(root.path(), &["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    kv_tests::wait_until(
        std::time::Duration::from_secs(15),
        "every process is gone",
        || started.iter().all(|p| !alive(*p)),
    );
    assert!(
        send("GET", &format!("{lb_url}/health"), None).is_err(),
        "nothing listens any more"
    );
}

/// The quick-start cluster has a secret of its own (kept 0600 in run/cluster.env): `/internal`
/// and `/admin` refuse calls without it, and take calls with it.
fn assert_cluster_is_closed(root: &Path, base: u16) {
    use std::os::unix::fs::PermissionsExt;
    let env_file = root.join("run/cluster.env");
    let mode = std::fs::metadata(&env_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "run/cluster.env is private, mode {mode:o}");
    let text = std::fs::read_to_string(&env_file).unwrap();
    let secret = text
        .lines()
        .find_map(|l| l.strip_prefix("CLUSTER_SECRET="))
        .expect("run/cluster.env records CLUSTER_SECRET");
    assert!(secret.len() >= 32, "a long random secret: {secret:?}");
    let node1 = format!("http://127.0.0.1:{base}");
    for (method, path) in [("GET", "/internal/keys"), ("GET", "/internal/members")] {
        let refused = send(method, &format!("{node1}{path}"), None).unwrap();
        assert_eq!(refused.status, 401, "{method} {path}: {}", refused.text);
        let with_secret = kv_tests::send_with(
            method,
            &format!("{node1}{path}"),
            None,
            &[("x-kv-secret", secret)],
        )
        .unwrap();
        assert_eq!(with_secret.status, 200, "{method} {path} with the secret");
    }
    let backup = send("GET", &format!("{node1}/admin/backup"), None).unwrap();
    assert_eq!(backup.status, 401, "{}", backup.text);
}

#[test]
fn cluster_sh_up_tls_serves_https_trusting_only_its_own_ca() {
    let root = tempfile::tempdir().unwrap();
    let _cleanup = StopOnDrop(root.path());
    let (base, lb) = free_port_run(3);
    let up = script(
        root.path(),
        &[
            "up",
            "--tls",
            "--no-build",
            "--base-port",
            &base.to_string(),
            "--lb-port",
            &lb.to_string(),
        ],
    );
    let stdout = String::from_utf8_lossy(&up.stdout);
    assert!(
        up.status.success(),
        "up --tls failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert!(
        stdout.contains("--cacert"),
        "curl examples with --cacert:\n{stdout}"
    );
    let pem = std::fs::read(root.path().join("run/tls/ca.pem")).unwrap();
    let client = reqwest::blocking::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap();
    let lb_url = format!("https://127.0.0.1:{lb}");
    let put = client
        .post(format!("{lb_url}/v1/tls-key"))
        .body(r#"{"value": "sealed"}"#)
        .send()
        .unwrap();
    assert_eq!(put.status(), 200);
    for i in 0..3 {
        let node = format!("https://127.0.0.1:{}/v1/tls-key?r=one", base + i);
        let read: serde_json::Value = client.get(node).send().unwrap().json().unwrap();
        assert_eq!(read["value"], "sealed");
    }
    assert!(
        send("GET", &format!("http://127.0.0.1:{lb}/health"), None)
            .map_or(true, |a| a.status != 200),
        "plain HTTP is not served"
    );
    assert_cluster_is_closed_over_tls(&client, root.path(), base);
    let down = script(root.path(), &["down"]);
    assert!(down.status.success());
}

/// Over TLS too, `/internal` refuses a caller without the cluster's secret.
fn assert_cluster_is_closed_over_tls(client: &reqwest::blocking::Client, root: &Path, base: u16) {
    let refused = client
        .get(format!("https://127.0.0.1:{base}/internal/keys"))
        .send()
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert!(std::fs::read_to_string(root.join("run/cluster.env"))
        .unwrap()
        .contains("TLS=1"));
}

/// `replace NAME` swaps a node killed for good for a new one on the next port, and `remove NAME
/// --force` drops a dead node: the cluster's data stays readable at r=all (every replica) through
/// the LB, and a remove of a dead node without `--force` is refused with the node's message.
#[test]
fn cluster_sh_replaces_and_removes_dead_nodes() {
    let root = tempfile::tempdir().unwrap();
    let _cleanup = StopOnDrop(root.path());
    let (base, lb) = free_port_run(6); // room for node4 and node5 before the LB port
    let up = script(
        root.path(),
        &[
            "up",
            "--no-build",
            "--nodes",
            "4",
            "--base-port",
            &base.to_string(),
            "--lb-port",
            &lb.to_string(),
        ],
    );
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let lb_url = format!("http://127.0.0.1:{lb}");
    for i in 0..50 {
        let put = send(
            "POST",
            &format!("{lb_url}/v1/k{i}?w=all"),
            Some(&format!(r#"{{"value": {i}}}"#)),
        )
        .unwrap();
        assert_eq!(put.status, 200, "{}", put.text);
    }
    let kill = |name: &str| {
        let pid: u32 = std::fs::read_to_string(root.path().join(format!("run/{name}.pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        kv_tests::wait_until(
            std::time::Duration::from_secs(10),
            "the node is gone",
            || !alive(pid),
        );
    };
    let seen_down = |port: u16| {
        kv_tests::wait_until(
            std::time::Duration::from_secs(10),
            "node1 sees the node down",
            || {
                send("GET", &format!("http://127.0.0.1:{base}/"), None).is_ok_and(|a| {
                    a.json["peers"].as_array().is_some_and(|peers| {
                        peers.iter().any(|p| {
                            p["url"] == format!("http://127.0.0.1:{port}") && p["state"] == "down"
                        })
                    })
                })
            },
        );
    };
    kill("node2");
    seen_down(base + 1);
    let replace = script(root.path(), &["replace", "node2"]);
    assert!(
        replace.status.success(),
        "{}{}",
        String::from_utf8_lossy(&replace.stdout),
        String::from_utf8_lossy(&replace.stderr)
    );
    let table = String::from_utf8_lossy(&script(root.path(), &["status"]).stdout).into_owned();
    assert!(
        table.contains("node5") && !table.contains("node2"),
        "{table}"
    );

    kill("node3");
    seen_down(base + 2);
    let refused = script(root.path(), &["remove", "node3"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("force"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let remove = script(root.path(), &["remove", "node3", "--force"]);
    assert!(
        remove.status.success(),
        "{}{}",
        String::from_utf8_lossy(&remove.stdout),
        String::from_utf8_lossy(&remove.stderr)
    );
    for i in 0..50 {
        let get = send("GET", &format!("{lb_url}/v1/k{i}?r=all"), None).unwrap();
        assert_eq!(
            (get.status, get.json["value"].clone()),
            (200, serde_json::json!(i)),
            "k{i}"
        );
    }
    let down = script(root.path(), &["down"]);
    assert!(down.status.success());
}
