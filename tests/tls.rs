//! Black-box TLS tests: certificates made by `kv-node tls-certs`, three nodes and a kv-lb all
//! serving HTTPS and trusting only the test CA, so client -> LB -> node -> peer is TLS end to
//! end; a peer or client holding another CA's certificate is refused; bad TLS files exit 2.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use kv_tests::{bin_dir, free_port, wait_until, Node, START_DEADLINE};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Runs `kv-node tls-certs <dir>`: a fresh CA and a node certificate for 127.0.0.1.
fn make_certs(dir: &Path) -> PathBuf {
    let status = Command::new(bin_dir().join("kv-node"))
        .arg("tls-certs")
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success(), "kv-node tls-certs failed");
    dir.to_owned()
}

/// A client that trusts only the CA in `certs`.
fn client(certs: &Path) -> reqwest::blocking::Client {
    let pem = std::fs::read(certs.join("ca.pem")).unwrap();
    reqwest::blocking::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

fn tls_env(certs: &Path) -> Vec<(String, String)> {
    let file = |name: &str| certs.join(name).display().to_string();
    vec![
        ("TLS_CERT_FILE".into(), file("node.pem")),
        ("TLS_KEY_FILE".into(), file("node-key.pem")),
        ("TLS_CA_FILE".into(), file("ca.pem")),
    ]
}

/// Nodes on `urls` (https), node `i` using the certificates of `certs[i]`; not started yet.
fn nodes(dir: &Path, urls: &[String], certs: &[&Path]) -> Vec<Node> {
    urls.iter()
        .zip(certs)
        .enumerate()
        .map(|(i, (url, certs))| {
            let name = format!("node{}", i + 1);
            let port = url.rsplit(':').next().unwrap().to_owned();
            let mut env = vec![
                ("NODE_NAME".into(), name.clone()),
                ("PORT".into(), port),
                ("CURRENT_NODE_URL".into(), url.clone()),
                ("CLUSTER_NODES".into(), urls.join(",")),
                ("REPLICATION_FACTOR".into(), urls.len().to_string()),
                ("DATA_DIR".into(), dir.join(&name).display().to_string()),
                ("HEALTH_CHECK_INTERVAL_MS".into(), "200".into()),
                ("RUST_LOG".into(), "info".into()),
            ];
            env.extend(tls_env(certs));
            Node::new(
                &name,
                url,
                dir.join(&name),
                dir.join(format!("{name}.log")),
                env,
            )
        })
        .collect()
}

fn https_urls(count: usize) -> Vec<String> {
    (0..count)
        .map(|_| format!("https://127.0.0.1:{}", free_port()))
        .collect()
}

fn get_json(client: &reqwest::blocking::Client, url: &str) -> Option<(u16, Value)> {
    let response = client.get(url).send().ok()?;
    let status = response.status().as_u16();
    Some((status, response.json().unwrap_or(Value::Null)))
}

fn wait_healthy(node: &Node, client: &reqwest::blocking::Client) {
    let health = format!("{}/health", node.url);
    wait_until(
        START_DEADLINE,
        &format!("{} answers /health over TLS", node.name),
        || get_json(client, &health).is_some_and(|(status, _)| status == 200),
    );
}

/// A kv-lb child process, killed on drop.
struct Lb(Child);

impl Drop for Lb {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_lb(dir: &Path, url: &str, nodes: &[String], certs: &Path) -> Lb {
    let port = url.rsplit(':').next().unwrap();
    let log = std::fs::File::create(dir.join("lb.log")).unwrap();
    let child = Command::new(bin_dir().join("kv-lb"))
        .env_clear()
        .env("DATABASE_NODES", nodes.join(","))
        .env("LB_PORT", port)
        .env("REPLICATION_FACTOR", nodes.len().to_string())
        .env("HEALTH_CHECK_INTERVAL_MS", "200")
        .envs(tls_env(certs))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Lb(child)
}

#[test]
fn client_lb_node_and_peer_traffic_is_tls_and_other_cas_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ours = make_certs(&dir.path().join("ca-a"));
    let theirs = make_certs(&dir.path().join("ca-b"));
    let urls = https_urls(3);
    let mut cluster = nodes(dir.path(), &urls, &[&ours, &ours, &ours]);
    for node in &mut cluster {
        node.spawn();
    }
    let trusted = client(&ours);
    for node in &cluster {
        wait_healthy(node, &trusted);
    }
    let lb_url = format!("https://127.0.0.1:{}", free_port());
    let _lb = start_lb(dir.path(), &lb_url, &urls, &ours);
    wait_until(START_DEADLINE, "the LB sees every node up over TLS", || {
        get_json(&trusted, &format!("{lb_url}/health"))
            .is_some_and(|(status, body)| status == 200 && body["status"] == "ok")
    });

    // client -> LB -> node -> both peers, all TLS: w=all needs every peer's WAL.
    let put = trusted
        .put(format!("{lb_url}/v1/secure/key?w=all"))
        .body(r#"{"value": "over tls"}"#)
        .send()
        .unwrap();
    assert_eq!(put.status(), 200, "{:?}", put.text());
    for node in &cluster {
        let (status, body) =
            get_json(&trusted, &format!("{}/v1/secure/key?r=one", node.url)).unwrap();
        assert_eq!(
            (status, &body["value"]),
            (200, &Value::from("over tls")),
            "{}",
            node.name
        );
    }

    // A client trusting only another CA cannot even connect; nor can a plain-HTTP client.
    let stranger = client(&theirs);
    assert!(stranger.get(format!("{lb_url}/health")).send().is_err());
    assert!(stranger.get(format!("{}/health", urls[0])).send().is_err());
    let plain = lb_url.replace("https://", "http://");
    let answer = kv_tests::send("GET", &format!("{plain}/health"), None);
    assert!(answer.is_err() || answer.is_ok_and(|a| a.status != 200));
}

#[test]
fn a_peer_with_a_certificate_of_another_ca_is_seen_down_and_gets_no_writes() {
    let dir = tempfile::tempdir().unwrap();
    let ours = make_certs(&dir.path().join("ca-a"));
    let theirs = make_certs(&dir.path().join("ca-b"));
    let urls = https_urls(2);
    let mut pair = nodes(dir.path(), &urls, &[&ours, &theirs]);
    for node in &mut pair {
        node.spawn();
    }
    let trusted = client(&ours);
    wait_healthy(&pair[0], &trusted);
    wait_healthy(&pair[1], &client(&theirs));
    let status_url = format!("{}/", urls[0]);
    wait_until(Duration::from_secs(15), "node1 sees node2 down", || {
        get_json(&trusted, &status_url).is_some_and(|(_, body)| {
            body["peers"].as_array().is_some_and(|peers| {
                peers
                    .iter()
                    .any(|p| p["url"] == urls[1].as_str() && p["state"] == "down")
            })
        })
    });
    let put = trusted
        .put(format!("{}/v1/impostor?w=all", urls[0]))
        .body(r#"{"value": 1}"#)
        .send()
        .unwrap();
    assert!(
        put.status().is_server_error(),
        "w=all must fail: {}",
        put.status()
    );
    let log = std::fs::read_to_string(&pair[0].log).unwrap_or_default();
    assert!(!log.is_empty());
}

#[test]
fn unreadable_tls_files_stop_start_up_with_exit_2_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(&dir.path().join("ca-a"));
    let cases = [
        ("TLS_CERT_FILE", dir.path().join("missing.pem")),
        ("TLS_KEY_FILE", certs.join("ca.pem")),
        ("TLS_CA_FILE", certs.join("node-key.pem")),
    ];
    for (variable, bad) in cases {
        let mut env: Vec<(String, String)> = tls_env(&certs);
        env.retain(|(k, _)| k != variable);
        env.push((variable.into(), bad.display().to_string()));
        for binary in ["kv-node", "kv-lb"] {
            let out = Command::new(bin_dir().join(binary))
                .env_clear()
                .env("DATA_DIR", dir.path().join("data").display().to_string())
                .env("PORT", free_port().to_string())
                .env("LB_PORT", free_port().to_string())
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{binary} {variable}: {stderr}");
            assert!(stderr.contains(variable), "{binary}: {stderr}");
            assert_eq!(stderr.trim().lines().count(), 1, "{binary}: {stderr}");
        }
    }
}
