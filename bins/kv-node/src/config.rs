//! Node configuration: read once from the environment (envy), every value checked, defaults that
//! depend on other variables filled in. After `NodeConfig::from_env`, no code reads env vars.

use kv_cluster::Consistency;
use kv_core::SyncMode;
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// The raw environment: strings only, so that every parse error is ours and names its variable.
/// Fields are in the order of `.env.example` and `kv-node --help`.
#[derive(Debug, Default, Deserialize)]
struct NodeEnv {
    current_node_url: Option<String>,
    cluster_nodes: Option<String>,
    node_name: Option<String>,
    port: Option<String>,
    bind_addr: Option<String>,
    replication_factor: Option<String>,
    data_dir: Option<String>,
    snapshot_interval_secs: Option<String>,
    wal_sync: Option<String>,
    wal_sync_interval_ms: Option<String>,
    wal_max_bytes: Option<String>,
    wal_prealloc_bytes: Option<String>,
    wal_batch_delay_us: Option<String>,
    min_free_bytes: Option<String>,
    tombstone_grace_secs: Option<String>,
    anti_entropy_interval_secs: Option<String>,
    anti_entropy_bytes_per_sec: Option<String>,
    hint_window_secs: Option<String>,
    hint_max_bytes: Option<String>,
    watch_history_events: Option<String>,
    watch_history_bytes: Option<String>,
    write_consistency: Option<String>,
    read_consistency: Option<String>,
    vnodes: Option<String>,
    max_key_bytes: Option<String>,
    max_value_bytes: Option<String>,
    auth_token: Option<String>,
    cluster_secret: Option<String>,
    insecure_cluster: Option<String>,
    max_clock_offset_ms: Option<String>,
    health_check_interval_ms: Option<String>,
    health_check_timeout_ms: Option<String>,
    peer_timeout_ms: Option<String>,
    request_timeout_ms: Option<String>,
    shutdown_grace_secs: Option<String>,
    transfer_keys_per_sec: Option<String>,
    max_connections: Option<String>,
    worker_threads: Option<String>,
    log_format: Option<String>,
    // TLS (see `TlsFiles`).
    tls_cert_file: Option<String>,
    tls_key_file: Option<String>,
    tls_ca_file: Option<String>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The validated configuration of one node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Name shown in status, logs and metrics.
    pub name: String,
    /// This node's canonical URL.
    pub url: String,
    /// Every node's canonical URL, this one included.
    pub nodes: Vec<String>,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// N as configured (the cluster caps it at the number of nodes).
    pub replication_factor: usize,
    /// Where this node's files live.
    pub data_dir: PathBuf,
    /// Periodic checkpoint interval.
    pub snapshot_interval: Duration,
    /// WAL durability mode.
    pub wal_sync: SyncMode,
    /// fsync period for `WAL_SYNC=interval`.
    pub wal_sync_interval: Duration,
    /// WAL size that triggers a checkpoint.
    pub wal_max_bytes: u64,
    /// Size WAL segments are preallocated to (0: off).
    pub wal_prealloc_bytes: u64,
    /// Longest wait of a group commit for more writes to share its fsync (0: none).
    pub wal_batch_delay: Duration,
    /// Free disk space below which the node turns read-only (507) until space returns.
    pub min_free_bytes: u64,
    /// Age after which tombstones are collected (once anti-entropy knows every replica holds
    /// them).
    pub tombstone_grace: Duration,
    /// Time between anti-entropy rounds (zero: only on demand and when a peer comes back).
    pub anti_entropy_interval: Duration,
    /// Record bytes an anti-entropy round may move per second.
    pub anti_entropy_bytes_per_sec: u64,
    /// Hints are not kept for a peer away longer than this, nor replayed once older.
    pub hint_window: Duration,
    /// Hint bytes kept per peer.
    pub hint_max_bytes: u64,
    /// Most changes kept for watchers to resume from (`WATCH_HISTORY_EVENTS`).
    pub watch_history_events: usize,
    /// Most bytes (keys, values and 128 per change) of the changes kept for watchers
    /// (`WATCH_HISTORY_BYTES`).
    pub watch_history_bytes: usize,
    /// Default W.
    pub write_consistency: Consistency,
    /// Default R.
    pub read_consistency: Consistency,
    /// Virtual nodes per node.
    pub vnodes: usize,
    /// Longest key in bytes.
    pub max_key_bytes: usize,
    /// Largest value in bytes.
    pub max_value_bytes: usize,
    /// Bearer token required on `/v1` and admin routes.
    pub auth_token: Option<String>,
    /// The cluster credential: `CLUSTER_SECRET`, else `AUTH_TOKEN`. Node-to-node calls carry it;
    /// `/internal` and membership messages are refused without it. `None` only on an open
    /// cluster (see [`NodeConfig::open_cluster`]).
    pub cluster_secret: Option<String>,
    /// True when the node runs without a cluster credential: bound to a loopback address, or
    /// with `INSECURE_CLUSTER=true` elsewhere. Anyone who reaches the port can call `/internal`.
    pub open_cluster: bool,
    /// `MAX_CLOCK_OFFSET_MS`: the largest clock difference between nodes that kv tolerates.
    /// Versions from clients further ahead of this node's clock than this are refused, and from
    /// peers further ahead than twice this (their clock may be this far ahead, and their clock may
    /// have observed a client's version this far ahead of theirs). A node whose clock is further
    /// than this from a majority of the nodes (measured on health checks) coordinates no writes.
    pub max_clock_offset: Duration,
    /// Time between health checks of each peer.
    pub health_interval: Duration,
    /// Deadline of one health check.
    pub health_timeout: Duration,
    /// Deadline of one peer call.
    pub peer_timeout: Duration,
    /// Deadline of one client request.
    pub request_timeout: Duration,
    /// How long shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
    /// Keys a node streams per second to new replicas during a membership change.
    pub transfer_keys_per_sec: u64,
    /// Connections served at once.
    pub max_connections: usize,
    /// Async worker threads (`WORKER_THREADS`; unset or 0: one per core).
    pub worker_threads: usize,
    /// Log output format.
    pub log_format: LogFormat,
    /// TLS files (`TLS_CERT_FILE`, `TLS_KEY_FILE`, `TLS_CA_FILE`); all `None`: plain HTTP.
    pub tls: TlsFiles,
}

/// TLS files of a node, as paths; `tls.rs` reads them at start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain served to clients and peers (`TLS_CERT_FILE`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of that certificate (`TLS_KEY_FILE`).
    pub key_file: Option<PathBuf>,
    /// PEM CA certificates that peers' certificates must chain to (`TLS_CA_FILE`).
    pub ca_file: Option<PathBuf>,
}

impl TlsFiles {
    /// `TLS_CERT_FILE` and `TLS_KEY_FILE` come together or not at all.
    fn from_env(
        cert: Option<String>,
        key: Option<String>,
        ca: Option<String>,
    ) -> Result<TlsFiles, ConfigError> {
        let (cert_file, key_file) = (non_empty(cert), non_empty(key));
        match (&cert_file, &key_file) {
            (Some(cert), None) => {
                return Err(bad(
                    "TLS_KEY_FILE",
                    "",
                    format!("expected the key file of TLS_CERT_FILE={cert}"),
                ))
            }
            (None, Some(key)) => {
                return Err(bad(
                    "TLS_CERT_FILE",
                    "",
                    format!("expected the certificate file of TLS_KEY_FILE={key}"),
                ))
            }
            _ => {}
        }
        Ok(TlsFiles {
            cert_file: cert_file.map(PathBuf::from),
            key_file: key_file.map(PathBuf::from),
            ca_file: non_empty(ca).map(PathBuf::from),
        })
    }
}

/// A configuration error: one line naming the variable, its value and what was expected.
#[derive(Debug, thiserror::Error)]
#[error("{var}={value}: {expected}")]
pub struct ConfigError {
    var: &'static str,
    value: String,
    expected: String,
}

fn bad(var: &'static str, value: &str, expected: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        value: value.to_owned(),
        expected: expected.into(),
    }
}

impl NodeConfig {
    /// Reads and validates the process environment.
    pub fn from_env() -> Result<NodeConfig, ConfigError> {
        let env: NodeEnv = envy::from_env().map_err(|e| bad("environment", "", e.to_string()))?;
        env.validate()
    }
}

/// Turns a node URL into the canonical `scheme://host:port` form every node and the LB use on the
/// ring, so `http://localhost:8001/` and `http://localhost:8001` are the same node.
pub fn canonical_url(var: &'static str, raw: &str) -> Result<String, ConfigError> {
    let expected = "expected a URL like http://127.0.0.1:8001";
    let url = url::Url::parse(raw.trim()).map_err(|_| bad(var, raw, expected))?;
    let host = url.host_str().filter(|h| !h.is_empty());
    match (url.scheme(), host, url.port_or_known_default()) {
        ("http" | "https", Some(host), Some(port))
            if url.path() == "/" && url.query().is_none() =>
        {
            Ok(format!("{}://{host}:{port}", url.scheme()))
        }
        _ => Err(bad(var, raw, expected)),
    }
}

fn parse_num<T: std::str::FromStr + PartialOrd + Copy + std::fmt::Display>(
    var: &'static str,
    raw: Option<&str>,
    default: T,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    match raw.trim().parse::<T>() {
        Ok(v) if v >= min && v <= max => Ok(v),
        _ => Err(bad(
            var,
            raw,
            format!("expected a whole number from {min} to {max}"),
        )),
    }
}

fn millis(var: &'static str, raw: Option<&str>, default: u64) -> Result<Duration, ConfigError> {
    parse_num(var, raw, default, 1, 3_600_000).map(Duration::from_millis)
}

fn secs(var: &'static str, raw: Option<&str>, default: u64) -> Result<Duration, ConfigError> {
    parse_num(var, raw, default, 1, 10 * 365 * 86_400).map(Duration::from_secs)
}

fn non_empty(raw: Option<String>) -> Option<String> {
    raw.filter(|s| !s.trim().is_empty())
}

/// The cluster credential (`CLUSTER_SECRET`, else `AUTH_TOKEN`), or `None` for an open cluster,
/// which only a loopback bind or `INSECURE_CLUSTER=true` allows (Redis' protected mode).
fn cluster_credential(
    secret: Option<String>,
    auth_token: Option<String>,
    bind: IpAddr,
    insecure: Option<&str>,
) -> Result<Option<String>, ConfigError> {
    let insecure = match insecure.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        None | Some("" | "false" | "0" | "no") => false,
        Some("true" | "1" | "yes") => true,
        Some(_) => {
            let raw = insecure.unwrap_or_default();
            return Err(bad("INSECURE_CLUSTER", raw, "expected true or false"));
        }
    };
    let (var, credential) = match (secret, auth_token) {
        (Some(secret), _) => ("CLUSTER_SECRET", Some(secret)),
        (None, token) => ("AUTH_TOKEN", token),
    };
    match credential {
        // It travels in a header: printable ASCII only, checked here rather than at the first call.
        Some(c) if !c.bytes().all(|b| b.is_ascii_graphic()) => Err(bad(
            var,
            "<hidden>",
            "expected printable ASCII without spaces (it travels in an HTTP header)",
        )),
        Some(c) => Ok(Some(c)),
        None if bind.is_loopback() || insecure => Ok(None),
        None => Err(bad(
            "CLUSTER_SECRET",
            "",
            format!(
                "expected a secret shared by every node: BIND_ADDR={bind} is not a loopback \
                 address, so node-to-node calls must be authenticated (set CLUSTER_SECRET or \
                 AUTH_TOKEN, or INSECURE_CLUSTER=true to run open)"
            ),
        )),
    }
}

impl NodeEnv {
    fn validate(self) -> Result<NodeConfig, ConfigError> {
        let name = non_empty(self.node_name).unwrap_or_else(|| "node1".to_owned());
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(bad(
                "NODE_NAME",
                &name,
                "expected letters, digits, '-', '_' or '.'",
            ));
        }
        let port: u16 = parse_num("PORT", self.port.as_deref(), 8000, 1, 65535)?;
        let bind = self.bind_addr.as_deref().unwrap_or("127.0.0.1");
        let ip: IpAddr = bind.trim().parse().map_err(|_| {
            bad(
                "BIND_ADDR",
                bind,
                "expected an IP address like 127.0.0.1 or 0.0.0.0",
            )
        })?;
        let url = match non_empty(self.current_node_url) {
            Some(raw) => canonical_url("CURRENT_NODE_URL", &raw)?,
            None => format!("http://127.0.0.1:{port}"),
        };
        let nodes = match non_empty(self.cluster_nodes.clone()) {
            Some(raw) => raw
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| canonical_url("CLUSTER_NODES", s))
                .collect::<Result<Vec<_>, _>>()?,
            None => vec![url.clone()],
        };
        if !nodes.contains(&url) {
            let listed = self.cluster_nodes.unwrap_or_default();
            return Err(bad(
                "CURRENT_NODE_URL",
                &url,
                format!("expected one of the CLUSTER_NODES ({listed})"),
            ));
        }
        let replication_factor = parse_num(
            "REPLICATION_FACTOR",
            self.replication_factor.as_deref(),
            3,
            1,
            1000,
        )?;
        let n = replication_factor.min(nodes.len());
        let consistency =
            |var: &'static str, raw: Option<String>| -> Result<Consistency, ConfigError> {
                match raw {
                    None => Ok(Consistency::Quorum),
                    Some(raw) => Consistency::parse(var, &raw, n).map_err(|_| {
                        bad(
                            var,
                            &raw,
                            format!("expected one, quorum, all or a number from 1 to {n}"),
                        )
                    }),
                }
            };
        let wal_sync = match self.wal_sync.as_deref() {
            None => SyncMode::Always,
            Some(raw) => raw
                .trim()
                .to_ascii_lowercase()
                .parse()
                .map_err(|_| bad("WAL_SYNC", raw, "expected always, interval or never"))?,
        };
        let cluster_secret = cluster_credential(
            non_empty(self.cluster_secret),
            non_empty(self.auth_token.clone()),
            ip,
            self.insecure_cluster.as_deref(),
        )?;
        let log_format = match self.log_format.as_deref().map(str::trim) {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => return Err(bad("LOG_FORMAT", other, "expected text or json")),
        };
        Ok(NodeConfig {
            data_dir: non_empty(self.data_dir)
                .map_or_else(|| PathBuf::from("./data").join(&name), PathBuf::from),
            name,
            url,
            nodes,
            listen: SocketAddr::new(ip, port),
            replication_factor,
            snapshot_interval: secs(
                "SNAPSHOT_INTERVAL_SECS",
                self.snapshot_interval_secs.as_deref(),
                300,
            )?,
            wal_sync,
            wal_sync_interval: millis(
                "WAL_SYNC_INTERVAL_MS",
                self.wal_sync_interval_ms.as_deref(),
                100,
            )?,
            wal_max_bytes: parse_num(
                "WAL_MAX_BYTES",
                self.wal_max_bytes.as_deref(),
                64 << 20,
                4096,
                1 << 40,
            )?,
            wal_prealloc_bytes: parse_num(
                "WAL_PREALLOC_BYTES",
                self.wal_prealloc_bytes.as_deref(),
                64 << 20,
                0,
                1 << 40,
            )?,
            wal_batch_delay: parse_num(
                "WAL_BATCH_DELAY_US",
                self.wal_batch_delay_us.as_deref(),
                100,
                0,
                100_000,
            )
            .map(Duration::from_micros)?,
            min_free_bytes: parse_num(
                "MIN_FREE_BYTES",
                self.min_free_bytes.as_deref(),
                64 << 20,
                0,
                1 << 50,
            )?,
            tombstone_grace: secs(
                "TOMBSTONE_GRACE_SECS",
                self.tombstone_grace_secs.as_deref(),
                86_400,
            )?,
            // Zero: rounds only on demand (`POST /admin/repair`) and when a peer comes back.
            anti_entropy_interval: parse_num(
                "ANTI_ENTROPY_INTERVAL_SECS",
                self.anti_entropy_interval_secs.as_deref(),
                30,
                0,
                10 * 365 * 86_400,
            )
            .map(Duration::from_secs)?,
            anti_entropy_bytes_per_sec: parse_num(
                "ANTI_ENTROPY_BYTES_PER_SEC",
                self.anti_entropy_bytes_per_sec.as_deref(),
                16 << 20,
                1024,
                1 << 40,
            )?,
            hint_window: secs(
                "HINT_WINDOW_SECS",
                self.hint_window_secs.as_deref(),
                3 * 3600,
            )?,
            hint_max_bytes: parse_num(
                "HINT_MAX_BYTES",
                self.hint_max_bytes.as_deref(),
                1 << 30,
                0,
                1 << 50,
            )?,
            watch_history_events: parse_num(
                "WATCH_HISTORY_EVENTS",
                self.watch_history_events.as_deref(),
                kv_cluster::watch::DEFAULT_HISTORY_EVENTS,
                1,
                100_000_000,
            )?,
            watch_history_bytes: parse_num(
                "WATCH_HISTORY_BYTES",
                self.watch_history_bytes.as_deref(),
                kv_cluster::watch::DEFAULT_HISTORY_BYTES,
                4096,
                1 << 40,
            )?,
            write_consistency: consistency("WRITE_CONSISTENCY", self.write_consistency)?,
            read_consistency: consistency("READ_CONSISTENCY", self.read_consistency)?,
            vnodes: parse_num(
                "VNODES",
                self.vnodes.as_deref(),
                kv_cluster::DEFAULT_VNODES,
                1,
                4096,
            )?,
            max_key_bytes: parse_num(
                "MAX_KEY_BYTES",
                self.max_key_bytes.as_deref(),
                1024,
                1,
                65_536,
            )?,
            max_value_bytes: parse_num(
                "MAX_VALUE_BYTES",
                self.max_value_bytes.as_deref(),
                1 << 20,
                1,
                // Larger values could be written but never replicated (over a peer's batch limit).
                kv_cluster::peer::MAX_REPLICABLE_VALUE_BYTES,
            )?,
            auth_token: non_empty(self.auth_token),
            open_cluster: cluster_secret.is_none(),
            cluster_secret,
            max_clock_offset: parse_num(
                "MAX_CLOCK_OFFSET_MS",
                self.max_clock_offset_ms.as_deref(),
                500,
                1,
                3_600_000,
            )
            .map(Duration::from_millis)?,
            health_interval: millis(
                "HEALTH_CHECK_INTERVAL_MS",
                self.health_check_interval_ms.as_deref(),
                500,
            )?,
            health_timeout: millis(
                "HEALTH_CHECK_TIMEOUT_MS",
                self.health_check_timeout_ms.as_deref(),
                500,
            )?,
            peer_timeout: millis("PEER_TIMEOUT_MS", self.peer_timeout_ms.as_deref(), 2000)?,
            request_timeout: millis(
                "REQUEST_TIMEOUT_MS",
                self.request_timeout_ms.as_deref(),
                10_000,
            )?,
            shutdown_grace: secs(
                "SHUTDOWN_GRACE_SECS",
                self.shutdown_grace_secs.as_deref(),
                10,
            )?,
            transfer_keys_per_sec: parse_num(
                "TRANSFER_KEYS_PER_SEC",
                self.transfer_keys_per_sec.as_deref(),
                5000,
                1,
                10_000_000,
            )?,
            max_connections: parse_num(
                "MAX_CONNECTIONS",
                self.max_connections.as_deref(),
                1024,
                1,
                1_000_000,
            )?,
            worker_threads: match parse_num(
                "WORKER_THREADS",
                self.worker_threads.as_deref(),
                0,
                0,
                kv_http::MAX_WORKER_THREADS,
            )? {
                0 => kv_http::default_worker_threads(),
                n => n,
            },
            log_format,
            tls: TlsFiles::from_env(self.tls_cert_file, self.tls_key_file, self.tls_ca_file)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<NodeConfig, ConfigError> {
        let vars = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        envy::from_iter::<_, NodeEnv>(vars).unwrap().validate()
    }

    #[test]
    fn hint_limits_and_anti_entropy_pace_are_read_and_checked() {
        let c = env(&[]).unwrap();
        assert_eq!(c.hint_window, Duration::from_secs(3 * 3600));
        assert_eq!(c.hint_max_bytes, 1 << 30);
        assert_eq!(c.anti_entropy_interval, Duration::from_secs(30));
        let c = env(&[
            ("HINT_WINDOW_SECS", "60"),
            ("HINT_MAX_BYTES", "0"),
            ("ANTI_ENTROPY_INTERVAL_SECS", "0"),
        ])
        .unwrap();
        assert_eq!(c.hint_window, Duration::from_secs(60));
        assert_eq!(c.hint_max_bytes, 0, "zero keeps no hints");
        assert!(
            c.anti_entropy_interval.is_zero(),
            "zero: rounds on demand only"
        );
        assert!(env(&[("HINT_WINDOW_SECS", "0")]).is_err());
        assert!(env(&[("HINT_MAX_BYTES", "lots")]).is_err());
        assert_eq!(c.watch_history_bytes, 32 << 20);
        let c = env(&[
            ("WATCH_HISTORY_EVENTS", "10"),
            ("WATCH_HISTORY_BYTES", "65536"),
        ])
        .unwrap();
        assert_eq!((c.watch_history_events, c.watch_history_bytes), (10, 65536));
        assert!(env(&[("WATCH_HISTORY_EVENTS", "0")]).is_err());
        assert!(env(&[("WATCH_HISTORY_BYTES", "1")]).is_err());
    }

    #[test]
    fn no_environment_gives_one_node_on_port_8000() {
        let c = env(&[]).unwrap();
        assert_eq!(c.url, "http://127.0.0.1:8000");
        assert_eq!(c.nodes, vec![c.url.clone()]);
        assert_eq!(c.listen.to_string(), "127.0.0.1:8000");
        assert_eq!(c.data_dir, PathBuf::from("./data/node1"));
        assert_eq!(c.wal_sync, SyncMode::Always);
        assert_eq!(c.wal_prealloc_bytes, 64 << 20);
        assert_eq!(c.wal_batch_delay, Duration::from_micros(100));
        assert_eq!(c.write_consistency, Consistency::Quorum);
        assert_eq!(c.worker_threads, kv_http::default_worker_threads());
    }

    #[test]
    fn worker_threads_are_read_zero_meaning_one_per_core() {
        assert_eq!(env(&[("WORKER_THREADS", "1")]).unwrap().worker_threads, 1);
        let zero = env(&[("WORKER_THREADS", "0")]).unwrap();
        assert_eq!(zero.worker_threads, kv_http::default_worker_threads());
        for bad in ["-1", "many", "1025"] {
            let e = env(&[("WORKER_THREADS", bad)]).unwrap_err().to_string();
            assert!(e.contains("WORKER_THREADS"), "{e}");
        }
    }

    #[test]
    fn seed_variables_are_read_and_urls_canonicalised() {
        let c = env(&[
            ("CURRENT_NODE_URL", "http://localhost:8002/"),
            (
                "CLUSTER_NODES",
                "http://localhost:8001, http://localhost:8002,http://localhost:8003/",
            ),
            ("NODE_NAME", "node2"),
            ("PORT", "8002"),
            ("REPLICATION_FACTOR", "2"),
        ])
        .unwrap();
        assert_eq!(c.url, "http://localhost:8002");
        assert_eq!(c.nodes[2], "http://localhost:8003");
        assert_eq!(c.data_dir, PathBuf::from("./data/node2"));
        assert_eq!(c.replication_factor, 2);
    }

    #[test]
    fn the_cluster_credential_falls_back_to_the_token_and_is_required_off_loopback() {
        let c = env(&[("CLUSTER_SECRET", "s3cret"), ("AUTH_TOKEN", "tok")]).unwrap();
        assert_eq!(c.cluster_secret.as_deref(), Some("s3cret"));
        let c = env(&[("AUTH_TOKEN", "tok")]).unwrap();
        assert_eq!(c.cluster_secret.as_deref(), Some("tok"));
        assert!(!c.open_cluster);
        let c = env(&[]).unwrap();
        assert!(c.open_cluster && c.cluster_secret.is_none());
        let c = env(&[("BIND_ADDR", "::1")]).unwrap();
        assert!(c.open_cluster);
        let refused = env(&[("BIND_ADDR", "0.0.0.0")]).unwrap_err().to_string();
        assert!(
            refused.starts_with("CLUSTER_SECRET=: expected a secret"),
            "{refused}"
        );
        assert!(!refused.contains('\n'));
        let c = env(&[("BIND_ADDR", "0.0.0.0"), ("INSECURE_CLUSTER", "true")]).unwrap();
        assert!(c.open_cluster);
        let c = env(&[("BIND_ADDR", "0.0.0.0"), ("CLUSTER_SECRET", "x")]).unwrap();
        assert!(!c.open_cluster);
        let bad_secret = env(&[("CLUSTER_SECRET", "has space")])
            .unwrap_err()
            .to_string();
        assert!(bad_secret.starts_with("CLUSTER_SECRET=<hidden>: expected printable"));
        assert!(!bad_secret.contains("has space"));
        assert!(env(&[("INSECURE_CLUSTER", "maybe")]).is_err());
    }

    #[test]
    fn the_clock_offset_defaults_to_half_a_second() {
        assert_eq!(
            env(&[]).unwrap().max_clock_offset,
            Duration::from_millis(500)
        );
        assert_eq!(
            env(&[("MAX_CLOCK_OFFSET_MS", "250")])
                .unwrap()
                .max_clock_offset,
            Duration::from_millis(250)
        );
        assert!(env(&[("MAX_CLOCK_OFFSET_MS", "0")]).is_err());
    }

    #[test]
    fn bad_values_name_the_variable_value_and_expectation() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("REPLICATION_FACTOR", "0")],
                "REPLICATION_FACTOR=0: expected a whole number from 1",
            ),
            (
                &[("PORT", "70000")],
                "PORT=70000: expected a whole number from 1 to 65535",
            ),
            (&[("PORT", "abc")], "PORT=abc:"),
            (
                &[("MAX_VALUE_BYTES", "67108864")],
                "MAX_VALUE_BYTES=67108864: expected a whole number from 1 to 16707584",
            ),
            (
                &[("CLUSTER_NODES", "not a url")],
                "CLUSTER_NODES=not a url: expected a URL",
            ),
            (
                &[
                    ("CURRENT_NODE_URL", "http://127.0.0.1:9"),
                    ("CLUSTER_NODES", "http://127.0.0.1:8"),
                ],
                "CURRENT_NODE_URL=http://127.0.0.1:9: expected one of the CLUSTER_NODES",
            ),
            (
                &[("WAL_SYNC", "sometimes")],
                "WAL_SYNC=sometimes: expected always, interval or never",
            ),
            (
                &[("WAL_BATCH_DELAY_US", "200000")],
                "WAL_BATCH_DELAY_US=200000: expected a whole number from 0 to 100000",
            ),
            (
                &[("WRITE_CONSISTENCY", "4")],
                "WRITE_CONSISTENCY=4: expected one, quorum, all or a number from 1 to 1",
            ),
            (
                &[("BIND_ADDR", "localhost")],
                "BIND_ADDR=localhost: expected an IP address",
            ),
            (
                &[("LOG_FORMAT", "xml")],
                "LOG_FORMAT=xml: expected text or json",
            ),
            (&[("NODE_NAME", "../etc")], "NODE_NAME=../etc:"),
        ];
        for (pairs, want) in cases {
            let got = env(pairs).unwrap_err().to_string();
            assert!(got.starts_with(want), "{got:?} should start with {want:?}");
            assert!(!got.contains('\n'));
        }
    }
}
