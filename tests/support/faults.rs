//! Fault injection for the chaos tests: a cluster whose nodes sit behind [`Proxy`]s on their own
//! loopback addresses (so links can be cut or slowed per direction), optional kv-lbs, per-process
//! environment (e.g. a skewed clock), signals (pauses), a tmpfs data folder for disk-full runs and
//! a seeded random source. The recorded load lives in `load.rs`.

use crate::proxy::{Link, Proxy};
use crate::{bin_dir, send, wait_until, Node, START_DEADLINE};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long a scenario runs: `KV_CHAOS_SECS` when set (the long runs of `scripts/chaos.sh`),
/// otherwise `short` (the normal `cargo test`).
pub fn chaos_duration(short: Duration) -> Duration {
    std::env::var("KV_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(short, Duration::from_secs)
}

/// Prints one machine-readable result line; `scripts/chaos.sh` turns these into its table.
pub fn report(scenario: &str, figures: &[(&str, String)]) {
    let fields: Vec<String> = figures.iter().map(|(k, v)| format!("{k}={v}")).collect();
    eprintln!("CHAOS-RESULT scenario={scenario} {}", fields.join(" "));
}

/// A small xorshift generator: seeded from `KV_CHAOS_SEED` or the clock, printed for replays.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `scenario`; prints the seed so a failing run can be repeated.
    pub fn for_scenario(scenario: &str) -> Rng {
        let seed = std::env::var("KV_CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("{scenario}: KV_CHAOS_SEED={seed}");
        Rng(seed | 1)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A generator seeded with `seed` (for the load's threads: one per thread).
    pub fn from_seed(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// A duration between `low` and `high`.
    pub fn between(&mut self, low: Duration, high: Duration) -> Duration {
        let span = high.saturating_sub(low).as_millis().max(1) as u64;
        low + Duration::from_millis(self.next_u64() % span)
    }
}

/// Options for [`ChaosCluster::start`].
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// Number of nodes.
    pub nodes: usize,
    /// `REPLICATION_FACTOR`.
    pub replication_factor: usize,
    /// Start a kv-lb in front of the nodes (it reaches them as everybody does).
    pub lb: bool,
    /// Put every node behind a [`Proxy`] on its own loopback address.
    pub proxied: bool,
    /// Extra environment for every node and the LB.
    pub env: Vec<(String, String)>,
    /// When `lb` is set: one LB per entry, each with this extra environment on top of `env`
    /// (e.g. a skewed clock); empty means one LB.
    pub lb_env: Vec<Vec<(String, String)>>,
    /// Extra environment of single nodes, by index, on top of `env`.
    pub node_env: HashMap<usize, Vec<(String, String)>>,
    /// Data folders to use instead of fresh ones, by node index (e.g. a tmpfs).
    pub data_dirs: HashMap<usize, PathBuf>,
}

impl Default for ChaosOptions {
    fn default() -> Self {
        ChaosOptions {
            nodes: 3,
            replication_factor: 3,
            lb: false,
            proxied: false,
            env: Vec::new(),
            lb_env: Vec::new(),
            node_env: HashMap::new(),
            data_dirs: HashMap::new(),
        }
    }
}

/// A kv-lb process, killed when dropped.
#[derive(Debug)]
pub struct Lb {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// Its log file.
    pub log: PathBuf,
    child: Child,
}

impl Drop for Lb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Real node processes, each optionally behind a proxy, plus an optional LB.
#[derive(Debug)]
pub struct ChaosCluster {
    /// The nodes; `nodes[i].url` is the URL everyone uses (the proxy's, when proxied).
    pub nodes: Vec<Node>,
    /// `proxies[i]` sits in front of node `i` (empty when not proxied).
    pub proxies: Vec<Proxy>,
    /// The load balancer, when asked for (the first one when several are).
    pub lb: Option<Lb>,
    /// The further load balancers (`ChaosOptions::lb_env` beyond its first entry).
    pub more_lbs: Vec<Lb>,
    /// Data folders and logs; removed on drop.
    pub dir: tempfile::TempDir,
}

/// The loopback address node `i` listens and connects from when proxied: 127.0.0.(i+2).
pub fn node_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        0,
        u8::try_from(i + 2).expect("few nodes"),
    ))
}

impl ChaosCluster {
    /// Starts everything and waits until every node (and the LB) answers `/health`.
    pub fn start(options: &ChaosOptions) -> ChaosCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut proxies = Vec::new();
        let mut listens = Vec::new();
        for i in 0..options.nodes {
            let ip = if options.proxied {
                node_ip(i)
            } else {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            };
            let listen = SocketAddr::new(ip, crate::free_port_on(ip));
            if options.proxied {
                proxies.push(Proxy::start(listen));
            }
            listens.push(listen);
        }
        let urls: Vec<String> = if options.proxied {
            proxies.iter().map(Proxy::url).collect()
        } else {
            listens.iter().map(|a| format!("http://{a}")).collect()
        };
        let mut nodes: Vec<Node> = (0..options.nodes)
            .map(|i| {
                let name = format!("node{}", i + 1);
                let data_dir = options
                    .data_dirs
                    .get(&i)
                    .cloned()
                    .unwrap_or_else(|| dir.path().join(&name));
                let mut env = vec![
                    ("NODE_NAME".to_owned(), name.clone()),
                    ("BIND_ADDR".to_owned(), listens[i].ip().to_string()),
                    ("PORT".to_owned(), listens[i].port().to_string()),
                    ("CURRENT_NODE_URL".to_owned(), urls[i].clone()),
                    ("CLUSTER_NODES".to_owned(), urls.join(",")),
                    (
                        "REPLICATION_FACTOR".to_owned(),
                        options.replication_factor.to_string(),
                    ),
                    ("DATA_DIR".to_owned(), data_dir.display().to_string()),
                    ("RUST_LOG".to_owned(), log_level()),
                    ("HEALTH_CHECK_INTERVAL_MS".to_owned(), "200".to_owned()),
                    // Segments are still preallocated (as by default), but 4 MiB each instead of 64 MiB,
                    // so the hundreds of nodes of a suite run do not reserve tens of GB of disk.
                    ("WAL_PREALLOC_BYTES".to_owned(), "4194304".to_owned()),
                ];
                env.extend(options.env.iter().cloned());
                env.extend(options.node_env.get(&i).into_iter().flatten().cloned());
                let log = dir.path().join(format!("{name}.log"));
                Node::new(&name, &urls[i], data_dir, log, env)
            })
            .collect();
        for node in &mut nodes {
            node.spawn();
        }
        for node in &mut nodes {
            node.wait_healthy();
        }
        let lb_envs = match (options.lb, options.lb_env.is_empty()) {
            (false, _) => Vec::new(),
            (true, true) => vec![Vec::new()],
            (true, false) => options.lb_env.clone(),
        };
        let mut lbs = lb_envs
            .iter()
            .enumerate()
            .map(|(i, extra)| start_lb(dir.path(), i, &urls, options, extra));
        let lb = lbs.next();
        let more_lbs = lbs.collect();
        ChaosCluster {
            nodes,
            proxies,
            lb,
            more_lbs,
            dir,
        }
    }

    /// The URLs of every LB, the first one first.
    pub fn lb_urls(&self) -> Vec<String> {
        self.lb
            .iter()
            .chain(&self.more_lbs)
            .map(|lb| lb.url.clone())
            .collect()
    }

    /// Every LB's URL, then every node's: the targets of a load that uses every way in.
    pub fn every_entry(&self) -> Vec<String> {
        let nodes = self.nodes.iter().map(|n| n.url.clone());
        self.lb_urls().into_iter().chain(nodes).collect()
    }

    /// Sends `signal` (`STOP`, `CONT`, `TERM`...) to node `i`, which must be running.
    pub fn signal(&self, i: usize, signal: &str) {
        let pid = self.nodes[i].pid().expect("the node runs");
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid} failed");
    }

    /// The URL everyone uses for node `i`.
    pub fn url(&self, i: usize) -> &str {
        &self.nodes[i].url
    }

    /// Cuts node `i` off from every other node, both ways, with `link` (`Refuse` or `Blackhole`).
    /// Clients on 127.0.0.1 can still reach it, so a test can see what the minority answers.
    pub fn isolate(&self, i: usize, link: Link) {
        for (j, proxy) in self.proxies.iter().enumerate() {
            if j == i {
                for k in (0..self.nodes.len()).filter(|k| *k != i) {
                    proxy.set(node_ip(k), link);
                }
            } else {
                proxy.set(node_ip(i), link);
            }
        }
    }

    /// Adds `delay` to every link of node `i`: everything it receives and everything it sends.
    pub fn slow(&self, i: usize, delay: Duration) {
        for (j, proxy) in self.proxies.iter().enumerate() {
            if j == i {
                proxy.set_default(Link::Delay(delay));
            } else {
                proxy.set(node_ip(i), Link::Delay(delay));
            }
        }
    }

    /// Opens every link again.
    pub fn heal(&self) {
        for proxy in &self.proxies {
            proxy.heal();
        }
    }

    /// Waits until every running node sees every running peer up and the others down.
    pub fn wait_converged(&self, within: Duration) {
        crate::wait_converged(&self.nodes, within);
    }

    /// Waits until no node has hints pending.
    pub fn wait_hints_delivered(&self, within: Duration) {
        wait_until(within, "every node delivered its hints", || {
            self.nodes
                .iter()
                .all(|n| n.status()["hints_pending"].as_u64() == Some(0))
        });
    }

    /// Node `i`'s own stored record of `key` (`GET /internal/entry`), or `None`.
    pub fn local_entry(&self, i: usize, key: &str) -> Option<String> {
        send(
            "GET",
            &format!("{}/internal/entry/{key}", self.url(i)),
            None,
        )
        .ok()
        .filter(|a| a.status == 200)
        .map(|a| a.text)
    }
}

fn log_level() -> String {
    std::env::var("KV_TEST_LOG").unwrap_or_else(|_| "info".into())
}

fn start_lb(
    dir: &Path,
    index: usize,
    urls: &[String],
    options: &ChaosOptions,
    extra: &[(String, String)],
) -> Lb {
    let port = crate::free_port();
    let log = dir.join(if index == 0 {
        "lb.log".to_owned()
    } else {
        format!("lb{}.log", index + 1)
    });
    let file = std::fs::File::create(&log).expect("lb log");
    let child = Command::new(bin_dir().join("kv-lb"))
        .env_clear()
        .env("DATABASE_NODES", urls.join(","))
        .env("LB_PORT", port.to_string())
        .env("REPLICATION_FACTOR", options.replication_factor.to_string())
        .env("HEALTH_CHECK_INTERVAL_MS", "200")
        .env("RUST_LOG", log_level())
        .envs(options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .envs(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("dup log"))
        .stderr(file)
        .spawn()
        .expect("spawn kv-lb");
    let lb = Lb {
        url: format!("http://127.0.0.1:{port}"),
        log,
        child,
    };
    wait_until(START_DEADLINE, "the LB answers /health", || {
        send("GET", &format!("{}/health", lb.url), None)
            .is_ok_and(|a| a.status == 200 && a.json["status"] == "ok")
    });
    lb
}

/// A tmpfs mounted on a folder for as long as this lives (root only); unmounted when dropped.
#[derive(Debug)]
pub struct Tmpfs {
    /// The mount point.
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount` syntax, e.g. `2m`) on `path`; `Err` says why not.
    pub fn mount(path: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_owned());
        }
        Ok(Tmpfs {
            path: path.to_owned(),
        })
    }

    /// Changes the size in place; the files stay.
    pub fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "remount of {} failed",
            self.path.display()
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: the folder is released even if a process of ours still had it open.
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Milliseconds of the `p`-th percentile (0..=100) of `samples`.
pub fn percentile_ms(samples: &[Duration], p: usize) -> u128 {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted
        .get((sorted.len().saturating_sub(1)) * p / 100)
        .map_or(0, Duration::as_millis)
}
