//! Support for the black-box tests: builds the real `kv-node` and `kv-lb` binaries once, starts
//! them on free loopback ports with temporary data folders, and kills them by PID when dropped.
//!
//! Every wait polls with a deadline; nothing sleeps for a fixed time hoping a thing happened.

pub mod faults;
pub mod history;
pub mod linearizability;
pub mod load;
pub mod proxy;
pub mod skew;

use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a process gets to answer `/health` after it was started.
pub const START_DEADLINE: Duration = Duration::from_secs(30);

/// The folder holding the built binaries (`target/debug` or `target/release`), built once:
/// kv-node, kv-lb and kvctl, in one cargo command (building them apart would resolve the
/// shared dependencies' features differently and rebuild the binaries back and forth).
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // The test binary lives in <target>/<profile>/deps/.
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target profile dir")
            .to_owned();
        let release = dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-q", "-p", "kv-node", "-p", "kv-lb", "-p", "kvctl"]);
        if release {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(
            status.success(),
            "cargo build of kv-node, kv-lb and kvctl failed"
        );
        dir
    })
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    free_port_on(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
}

/// Lowest port handed out; below it are well-known services (and the quick start's 9000-9003).
const PORT_FLOOR: u16 = 10_000;
/// One past the highest port handed out: the kernel's ephemeral range (32768-60999 by default)
/// starts here.
const PORT_CEILING: u16 = 32_768;

/// A port that was free a moment ago on `ip`, for a server the test starts later.
///
/// Ports come from below the kernel's ephemeral range, so no outgoing connection of a parallel
/// test can take one between this probe and the server's bind (a port from `bind(0)` is in that
/// range, and a client's local port could land on it: a node then failed with "Address already
/// in use"). Within one test process the ports go round from a per-process start, so two tests
/// of the binary never get the same port while the range lasts.
pub fn free_port_on(ip: std::net::IpAddr) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(PORT_CEILING - PORT_FLOOR);
    if NEXT.load(Ordering::Relaxed) == 0 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let start = (nanos ^ std::process::id().wrapping_mul(2_654_435_761)) % span;
        let _ = NEXT.compare_exchange(0, start + 1, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = PORT_FLOOR + u16::try_from(offset).expect("offset below the span");
        if TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on {ip} between {PORT_FLOOR} and {PORT_CEILING}");
}

/// Polls `check` every 20 ms until it holds or `within` has passed; panics naming `what`.
pub fn wait_until(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The path of `libfaketime.so.1` (for `LD_PRELOAD` with `FAKETIME`), from `KV_LIBFAKETIME` or
/// the usual install folders; panics when it is not installed.
pub fn libfaketime() -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::env::var_os("KV_LIBFAKETIME")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    for lib in ["/usr/lib", "/usr/local/lib", "/usr/lib64"] {
        candidates.push(Path::new(lib).join("faketime/libfaketime.so.1"));
        // Debian and Ubuntu: /usr/lib/<multiarch triple>/faketime/.
        if let Ok(entries) = std::fs::read_dir(lib) {
            candidates.extend(
                entries
                    .flatten()
                    .map(|e| e.path().join("faketime/libfaketime.so.1")),
            );
        }
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .expect("libfaketime not installed: apt-get install faketime")
}

/// A blocking HTTP client with short deadlines, for tests.
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(15))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .expect("http client")
}

/// A status code and parsed JSON body (Null when the body is not JSON).
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Body parsed as JSON.
    pub json: Value,
    /// Raw body.
    pub text: String,
    /// Response headers.
    pub headers: reqwest::header::HeaderMap,
}

/// Sends a request and collects the answer; `Err` only for transport failures.
pub fn send(method: &str, url: &str, body: Option<&str>) -> Result<Answer, String> {
    send_with(method, url, body, &[])
}

/// Like [`send`] with extra headers.
pub fn send_with(
    method: &str,
    url: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Result<Answer, String> {
    let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
    let mut request = client().request(method, url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(body) = body {
        request = request.body(body.to_owned());
    }
    let response = request.send().map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().map_err(|e| e.to_string())?;
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok(Answer {
        status,
        json,
        text,
        headers,
    })
}

/// Waits until every running node of `nodes` sees its running peers up and the others down.
pub fn wait_converged(nodes: &[Node], within: Duration) {
    wait_until(within, "every node sees its running peers up", || {
        converged(nodes)
    });
}

/// True when every running node of `nodes` sees its running peers up and the others down.
fn converged(nodes: &[Node]) -> bool {
    nodes.iter().filter(|n| n.is_running()).all(|n| {
        n.status()["peers"].as_array().is_some_and(|peers| {
            peers.iter().all(|p| {
                let running = nodes.iter().any(|m| m.url == p["url"] && m.is_running());
                (p["state"] == "up") == running
            })
        })
    })
}

/// One kv-node process and what is needed to restart it the same way.
#[derive(Debug)]
pub struct Node {
    /// `node1`, `node2`, ...
    pub name: String,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// Its data folder.
    pub data_dir: PathBuf,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Node {
    /// A node that is not started yet: `env` is its whole environment (nothing is inherited).
    pub fn new(
        name: &str,
        url: &str,
        data_dir: PathBuf,
        log: PathBuf,
        env: Vec<(String, String)>,
    ) -> Node {
        Node {
            name: name.to_owned(),
            url: url.to_owned(),
            data_dir,
            log,
            env,
            child: None,
        }
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sets (or replaces) one environment variable for the next start.
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.to_owned(), value.to_owned()));
    }

    /// Waits (bounded) for the process to exit by itself; `None` if it still runs after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the process (appending to its log) without waiting for it.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log");
        let child = Command::new(bin_dir().join("kv-node"))
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn kv-node");
        self.child = Some(child);
    }

    /// True when `/health` answers 200.
    pub fn is_healthy(&self) -> bool {
        send("GET", &format!("{}/health", self.url), None).is_ok_and(|a| a.status == 200)
    }

    /// Waits until `/health` answers, or panics with the tail of the log.
    pub fn wait_healthy(&mut self) {
        let deadline = Instant::now() + START_DEADLINE;
        while !self.is_healthy() {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "{} exited with {status} while starting:\n{}",
                        self.name,
                        self.log_tail()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} never became healthy:\n{}",
                self.name,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last lines of the node's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait (bounded) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("node is running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{} did not stop within 30 s of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts it again with the same environment and waits for `/health`.
    pub fn restart(&mut self) {
        self.spawn();
        self.wait_healthy();
    }

    /// True while the process runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// `GET /` parsed.
    pub fn status(&self) -> Value {
        send("GET", &format!("{}/", self.url), None)
            .map(|a| a.json)
            .unwrap_or(Value::Null)
    }

    /// True when this node's failure detector believes `peer` down (`None`: every peer).
    pub fn sees_down(&self, peer: Option<&str>) -> bool {
        self.status()["peers"].as_array().is_some_and(|peers| {
            let mut matching = peers
                .iter()
                .filter(|p| peer.is_none_or(|url| p["url"] == url));
            let mut any = false;
            matching.all(|p| {
                any = true;
                p["state"] == "down"
            }) && any
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Options for [`TestCluster::start_with`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Number of nodes.
    pub nodes: usize,
    /// `REPLICATION_FACTOR`.
    pub replication_factor: usize,
    /// Start a kv-lb in front of the nodes.
    pub lb: bool,
    /// Extra environment for every node (and the LB).
    pub env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: 3,
            replication_factor: 3,
            lb: false,
            env: Vec::new(),
        }
    }
}

/// A set of real kv-node processes (and optionally a kv-lb) on free ports with temp data dirs.
#[derive(Debug)]
pub struct TestCluster {
    /// The nodes, `node1` first.
    pub nodes: Vec<Node>,
    /// The load balancer's URL, when one runs.
    pub lb_url: Option<String>,
    lb: Option<Child>,
    /// Where the data and logs live; removed on drop.
    pub dir: tempfile::TempDir,
}

impl TestCluster {
    /// `n` nodes with N = min(3, n), no LB.
    pub fn start(n: usize) -> TestCluster {
        TestCluster::start_with(Options {
            nodes: n,
            replication_factor: n.min(3),
            ..Options::default()
        })
    }

    /// Starts the nodes (and LB) and waits until all answer `/health`.
    pub fn start_with(options: Options) -> TestCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let ports: Vec<u16> = (0..options.nodes).map(|_| free_port()).collect();
        let urls: Vec<String> = ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect();
        let mut nodes = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let name = format!("node{}", i + 1);
            let data_dir = dir.path().join(&name);
            let mut env = vec![
                ("NODE_NAME".to_owned(), name.clone()),
                ("PORT".to_owned(), port.to_string()),
                ("CURRENT_NODE_URL".to_owned(), urls[i].clone()),
                ("CLUSTER_NODES".to_owned(), urls.join(",")),
                (
                    "REPLICATION_FACTOR".to_owned(),
                    options.replication_factor.to_string(),
                ),
                ("DATA_DIR".to_owned(), data_dir.display().to_string()),
                (
                    "RUST_LOG".to_owned(),
                    std::env::var("KV_TEST_LOG").unwrap_or_else(|_| "info".into()),
                ),
                ("HEALTH_CHECK_INTERVAL_MS".to_owned(), "200".to_owned()),
                // Segments are still preallocated (as by default), but 4 MiB each instead of 64 MiB,
                // so the hundreds of nodes of a suite run do not reserve tens of GB of disk.
                ("WAL_PREALLOC_BYTES".to_owned(), "4194304".to_owned()),
            ];
            env.extend(options.env.iter().cloned());
            let log = dir.path().join(format!("{name}.log"));
            nodes.push(Node {
                name,
                url: urls[i].clone(),
                data_dir,
                log,
                env,
                child: None,
            });
        }
        for node in &mut nodes {
            node.spawn();
        }
        for node in &mut nodes {
            node.wait_healthy();
        }
        // Healthy is not yet "sees its peers up": on a loaded machine the first health checks
        // can lag, and a test's first w=all write would get 503. Best effort (a test may start
        // nodes that cannot reach each other on purpose): wait a bounded time, then go on.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !converged(&nodes) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut cluster = TestCluster {
            nodes,
            lb_url: None,
            lb: None,
            dir,
        };
        if options.lb {
            cluster.start_lb(&urls, &options);
        }
        cluster
    }

    fn start_lb(&mut self, urls: &[String], options: &Options) {
        let port = free_port();
        let log_path = self.dir.path().join("lb.log");
        let log = std::fs::File::create(&log_path).expect("lb log");
        let child = Command::new(bin_dir().join("kv-lb"))
            .env_clear()
            .env("DATABASE_NODES", urls.join(","))
            .env("LB_PORT", port.to_string())
            .env("REPLICATION_FACTOR", options.replication_factor.to_string())
            .env(
                "RUST_LOG",
                std::env::var("KV_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn kv-lb");
        let url = format!("http://127.0.0.1:{port}");
        self.lb = Some(child);
        wait_until(START_DEADLINE, "the LB answers /health", || {
            send("GET", &format!("{url}/health"), None)
                .is_ok_and(|a| a.status == 200 && a.json["status"] == "ok")
        });
        self.lb_url = Some(url);
    }

    /// The load balancer's process id, when one runs.
    pub fn lb_pid(&self) -> Option<u32> {
        self.lb.as_ref().map(Child::id)
    }

    /// The URL of node `i` (0-based).
    pub fn url(&self, i: usize) -> &str {
        &self.nodes[i].url
    }

    /// Waits until every running node sees every other running node up.
    pub fn wait_converged(&self) {
        wait_converged(&self.nodes, Duration::from_secs(15));
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Some(mut lb) = self.lb.take() {
            let _ = lb.kill();
            let _ = lb.wait();
        }
        for node in &mut self.nodes {
            node.kill9();
        }
    }
}
