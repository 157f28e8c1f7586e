//! Configuration of the load balancer: environment variables read once with envy, checked and
//! turned into a typed [`LbConfig`]. After [`LbConfig::from_env`] no code reads the environment.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tracing_subscriber::EnvFilter;
use url::Url;

/// Node list used when `DATABASE_NODES` is unset: the three nodes `scripts/cluster.sh up` starts.
pub const DEFAULT_DATABASE_NODES: &str =
    "http://127.0.0.1:8001,http://127.0.0.1:8002,http://127.0.0.1:8003";
const DEFAULT_LB_PORT: u16 = 9000;
const DEFAULT_BIND_ADDR: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
const DEFAULT_REPLICATION_FACTOR: usize = 3;
const DEFAULT_HEALTH_CHECK_INTERVAL_MS: u64 = 1000;
const DEFAULT_HEALTH_CHECK_TIMEOUT_MS: u64 = 500;
const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 10_000;
const DEFAULT_MAX_VALUE_BYTES: usize = 1_048_576;
const DEFAULT_MAX_CONNECTIONS: usize = kv_http::serve::DEFAULT_MAX_CONNECTIONS;
const DEFAULT_HEAD_TIMEOUT_MS: u64 = 10_000;
const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;
/// Upper bound of every `*_MS` variable (one hour): keeps deadline arithmetic far from overflow.
const MAX_MILLIS: u64 = 3_600_000;
const MAX_VNODES: usize = 4096;
const MAX_VALUE_BYTES_LIMIT: usize = 1 << 30;

/// Text of `kv-lb --help`: every variable with its default, in the order of `.env.example`.
pub fn help_text() -> String {
    format!(
        "\
kv-lb {version}: owner-routing load balancer of kv

Usage: kv-lb [--help | --version]
Configuration is read from the environment (default in brackets):

  DATABASE_NODES            comma-separated node URLs             [{DEFAULT_DATABASE_NODES}]
  LB_PORT                   port to listen on                     [{DEFAULT_LB_PORT}]
  BIND_ADDR                 address to bind (0.0.0.0: all)        [{DEFAULT_BIND_ADDR}]
  REPLICATION_FACTOR        replicas per key (N), as on the nodes [{DEFAULT_REPLICATION_FACTOR}, capped at the node count]
  VNODES                    virtual nodes per node, as on nodes   [{vnodes}]
  AUTH_TOKEN                bearer token required on /v1, /batch  [unset: no auth]
  HEALTH_CHECK_INTERVAL_MS  period of GET /health on each node    [{DEFAULT_HEALTH_CHECK_INTERVAL_MS}]
  HEALTH_CHECK_TIMEOUT_MS   deadline of one health check          [{DEFAULT_HEALTH_CHECK_TIMEOUT_MS}]
  REQUEST_TIMEOUT_MS        deadline of one request, failover too [{DEFAULT_REQUEST_TIMEOUT_MS}]
  MAX_VALUE_BYTES           value size limit (body cap: + 64 KiB) [{DEFAULT_MAX_VALUE_BYTES}]
  RUST_LOG                  tracing filter                        [info]
  LOG_FORMAT                text or json                          [text]
  MIMALLOC_ALLOW_THP        1: keep transparent huge pages        [unset: off for kv-lb]
  MAX_CONNECTIONS           client connections served at once     [{DEFAULT_MAX_CONNECTIONS}]
  HEAD_TIMEOUT_MS           deadline of a request head once begun [{DEFAULT_HEAD_TIMEOUT_MS}]
  IDLE_TIMEOUT_MS           idle keep-alive connection closed     [{DEFAULT_IDLE_TIMEOUT_MS}]
  WORKER_THREADS            async worker threads (0: 1 per core)  [0]
  TLS_CERT_FILE             PEM certificate; with the key: HTTPS  [unset: plain HTTP]
  TLS_KEY_FILE              PEM private key of TLS_CERT_FILE      [unset]
  TLS_CA_FILE               PEM CA the nodes (https://) chain to  [unset]
",
        version = env!("CARGO_PKG_VERSION"),
        vnodes = kv_ring::DEFAULT_VNODES,
    )
}

/// Raw environment, all strings, so every parse error is ours and names its variable.
#[derive(Debug, Default, Deserialize)]
struct LbEnv {
    database_nodes: Option<String>,
    lb_port: Option<String>,
    bind_addr: Option<String>,
    replication_factor: Option<String>,
    vnodes: Option<String>,
    auth_token: Option<String>,
    health_check_interval_ms: Option<String>,
    health_check_timeout_ms: Option<String>,
    request_timeout_ms: Option<String>,
    max_value_bytes: Option<String>,
    rust_log: Option<String>,
    log_format: Option<String>,
    max_connections: Option<String>,
    head_timeout_ms: Option<String>,
    idle_timeout_ms: Option<String>,
    worker_threads: Option<String>,
    tls_cert_file: Option<String>,
    tls_key_file: Option<String>,
    tls_ca_file: Option<String>,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The checked configuration of the load balancer.
#[derive(Clone, Debug)]
pub struct LbConfig {
    /// Node URLs (`DATABASE_NODES`) in canonical `http://host:port` form; the ring sorts them.
    pub nodes: Vec<String>,
    /// Address to listen on (`BIND_ADDR`:`LB_PORT`).
    pub listen: SocketAddr,
    /// Replicas per key (`REPLICATION_FACTOR`), already capped at the number of nodes.
    pub replication_factor: usize,
    /// Virtual nodes per node (`VNODES`); must match the nodes' value.
    pub vnodes: usize,
    /// Bearer token required on data routes (`AUTH_TOKEN`); `None` when unset or empty.
    pub auth_token: Option<String>,
    /// Period of the active health checks (`HEALTH_CHECK_INTERVAL_MS`).
    pub health_check_interval: Duration,
    /// Deadline of one health check (`HEALTH_CHECK_TIMEOUT_MS`).
    pub health_check_timeout: Duration,
    /// Deadline of one proxied request, failovers included (`REQUEST_TIMEOUT_MS`).
    pub request_timeout: Duration,
    /// Largest value accepted (`MAX_VALUE_BYTES`); request bodies may exceed it by a margin.
    pub max_value_bytes: usize,
    /// Tracing filter (`RUST_LOG`), already checked to parse.
    pub log_filter: String,
    /// Log line format (`LOG_FORMAT`).
    pub log_format: LogFormat,
    /// Limits of the client-facing door (`MAX_CONNECTIONS`, `HEAD_TIMEOUT_MS`, `IDLE_TIMEOUT_MS`).
    pub serve_limits: kv_http::ServeLimits,
    /// Async worker threads (`WORKER_THREADS`; unset or 0: one per core).
    pub worker_threads: usize,
    /// PEM certificate chain and key to serve HTTPS with (`TLS_CERT_FILE`, `TLS_KEY_FILE`).
    pub tls_identity: Option<(PathBuf, PathBuf)>,
    /// PEM CA that `https://` nodes must chain to (`TLS_CA_FILE`).
    pub tls_ca_file: Option<PathBuf>,
}

/// A rejected variable: printed as `NAME=value: expected ...` and exit code 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    variable: &'static str,
    value: String,
    expected: String,
}

impl ConfigError {
    fn new(variable: &'static str, value: &str, expected: impl Into<String>) -> Self {
        ConfigError {
            variable,
            value: value.to_owned(),
            expected: expected.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}={}: expected {}",
            self.variable, self.value, self.expected
        )
    }
}

impl std::error::Error for ConfigError {}

impl LbConfig {
    /// Reads and checks the process environment.
    pub fn from_env() -> Result<LbConfig, ConfigError> {
        let env: LbEnv = envy::from_env().map_err(|e| {
            ConfigError::new(
                "environment",
                &e.to_string(),
                "UTF-8 values for every variable",
            )
        })?;
        env.validate()
    }
}

impl LbEnv {
    /// Turns the raw strings into a typed configuration; the first bad variable wins.
    fn validate(self) -> Result<LbConfig, ConfigError> {
        let nodes = parse_nodes(self.database_nodes.as_deref())?;
        let port = parse_port(self.lb_port.as_deref())?;
        let bind = parse_bind_addr(self.bind_addr.as_deref())?;
        let replication_factor = parse_count(
            "REPLICATION_FACTOR",
            self.replication_factor.as_deref(),
            DEFAULT_REPLICATION_FACTOR,
            usize::MAX,
        )?
        .min(nodes.len());
        let vnodes = parse_count(
            "VNODES",
            self.vnodes.as_deref(),
            kv_ring::DEFAULT_VNODES,
            MAX_VNODES,
        )?;
        Ok(LbConfig {
            nodes,
            listen: SocketAddr::new(bind, port),
            replication_factor,
            vnodes,
            auth_token: self.auth_token.filter(|token| !token.is_empty()),
            health_check_interval: parse_millis(
                "HEALTH_CHECK_INTERVAL_MS",
                self.health_check_interval_ms.as_deref(),
                DEFAULT_HEALTH_CHECK_INTERVAL_MS,
            )?,
            health_check_timeout: parse_millis(
                "HEALTH_CHECK_TIMEOUT_MS",
                self.health_check_timeout_ms.as_deref(),
                DEFAULT_HEALTH_CHECK_TIMEOUT_MS,
            )?,
            request_timeout: parse_millis(
                "REQUEST_TIMEOUT_MS",
                self.request_timeout_ms.as_deref(),
                DEFAULT_REQUEST_TIMEOUT_MS,
            )?,
            max_value_bytes: parse_count(
                "MAX_VALUE_BYTES",
                self.max_value_bytes.as_deref(),
                DEFAULT_MAX_VALUE_BYTES,
                MAX_VALUE_BYTES_LIMIT,
            )?,
            log_filter: parse_log_filter(self.rust_log.as_deref())?,
            log_format: parse_log_format(self.log_format.as_deref())?,
            serve_limits: kv_http::ServeLimits {
                max_connections: parse_count(
                    "MAX_CONNECTIONS",
                    self.max_connections.as_deref(),
                    DEFAULT_MAX_CONNECTIONS,
                    MAX_CONNECTIONS_LIMIT,
                )?,
                head_timeout: parse_millis(
                    "HEAD_TIMEOUT_MS",
                    self.head_timeout_ms.as_deref(),
                    DEFAULT_HEAD_TIMEOUT_MS,
                )?,
                idle_timeout: parse_millis(
                    "IDLE_TIMEOUT_MS",
                    self.idle_timeout_ms.as_deref(),
                    DEFAULT_IDLE_TIMEOUT_MS,
                )?,
                ..kv_http::ServeLimits::default()
            },
            worker_threads: parse_worker_threads(self.worker_threads.as_deref())?,
            tls_identity: parse_tls_identity(self.tls_cert_file, self.tls_key_file)?,
            tls_ca_file: non_empty(self.tls_ca_file).map(PathBuf::from),
        })
    }
}

fn non_empty(raw: Option<String>) -> Option<String> {
    raw.filter(|value| !value.trim().is_empty())
}

/// `TLS_CERT_FILE` and `TLS_KEY_FILE`: both or neither.
fn parse_tls_identity(
    cert: Option<String>,
    key: Option<String>,
) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
    match (non_empty(cert), non_empty(key)) {
        (Some(cert), Some(key)) => Ok(Some((cert.into(), key.into()))),
        (None, None) => Ok(None),
        (Some(cert), None) => Err(ConfigError::new(
            "TLS_KEY_FILE",
            "",
            format!("the private key file of TLS_CERT_FILE={cert}"),
        )),
        (None, Some(key)) => Err(ConfigError::new(
            "TLS_CERT_FILE",
            "",
            format!("the certificate file of TLS_KEY_FILE={key}"),
        )),
    }
}

/// `DATABASE_NODES`: at least one `http://` or `https://` `host[:port]` base URL. Each is
/// rewritten in the canonical form `scheme://host:port` (lower-case host, explicit port) that the nodes also use
/// for `CLUSTER_NODES`, so the ring here and on the nodes hashes the same strings.
fn parse_nodes(raw: Option<&str>) -> Result<Vec<String>, ConfigError> {
    let raw = raw.unwrap_or(DEFAULT_DATABASE_NODES);
    let mut nodes = Vec::new();
    for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let node = canonical_node_url(entry).map_err(|detail| {
            ConfigError::new(
                "DATABASE_NODES",
                raw,
                format!("comma-separated node URLs such as http://127.0.0.1:8001 ({detail})"),
            )
        })?;
        nodes.push(node);
    }
    if nodes.is_empty() {
        return Err(ConfigError::new(
            "DATABASE_NODES",
            raw,
            "comma-separated node URLs such as http://127.0.0.1:8001 (at least one)",
        ));
    }
    Ok(nodes)
}

/// `http://Host:port/` -> `http://host:port`; the reason when `entry` is not a node base URL.
fn canonical_node_url(entry: &str) -> Result<String, String> {
    let url = Url::parse(entry).map_err(|e| format!("'{entry}': {e}"))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(format!("'{entry}' is not http:// or https://"));
    }
    let host = url.host_str().filter(|host| !host.is_empty());
    let (Some(host), Some(port)) = (host, url.port_or_known_default()) else {
        return Err(format!("'{entry}' has no host"));
    };
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "'{entry}' has a path, query or fragment; give the node's base URL"
        ));
    }
    Ok(format!("{}://{host}:{port}", url.scheme()))
}

fn parse_port(raw: Option<&str>) -> Result<u16, ConfigError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_LB_PORT);
    };
    match raw.trim().parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(ConfigError::new(
            "LB_PORT",
            raw,
            "a port number from 1 to 65535",
        )),
    }
}

fn parse_bind_addr(raw: Option<&str>) -> Result<IpAddr, ConfigError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_BIND_ADDR);
    };
    raw.trim().parse().map_err(|_| {
        ConfigError::new(
            "BIND_ADDR",
            raw,
            "an IP address such as 127.0.0.1 or 0.0.0.0",
        )
    })
}

/// `WORKER_THREADS`: 1 to [`kv_http::MAX_WORKER_THREADS`]; unset or 0: one per core.
fn parse_worker_threads(raw: Option<&str>) -> Result<usize, ConfigError> {
    let max = kv_http::MAX_WORKER_THREADS;
    match raw.map(|r| (r, r.trim().parse::<usize>())) {
        None | Some((_, Ok(0))) => Ok(kv_http::default_worker_threads()),
        Some((_, Ok(n))) if n <= max => Ok(n),
        Some((raw, _)) => Err(ConfigError::new(
            "WORKER_THREADS",
            raw,
            format!("a whole number from 0 to {max} (0: one per core)"),
        )),
    }
}

/// A whole number in `1..=max`, or `default` when unset.
fn parse_count(
    variable: &'static str,
    raw: Option<&str>,
    default: usize,
    max: usize,
) -> Result<usize, ConfigError> {
    let Some(raw) = raw else {
        return Ok(default);
    };
    match raw.trim().parse::<usize>() {
        Ok(count) if (1..=max).contains(&count) => Ok(count),
        _ if max == usize::MAX => Err(ConfigError::new(variable, raw, "a whole number >= 1")),
        _ => Err(ConfigError::new(
            variable,
            raw,
            format!("a whole number from 1 to {max}"),
        )),
    }
}

/// A whole number of milliseconds in `1..=MAX_MILLIS`, or `default` when unset.
fn parse_millis(
    variable: &'static str,
    raw: Option<&str>,
    default: u64,
) -> Result<Duration, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Duration::from_millis(default));
    };
    match raw.trim().parse::<u64>() {
        Ok(ms) if (1..=MAX_MILLIS).contains(&ms) => Ok(Duration::from_millis(ms)),
        _ => Err(ConfigError::new(
            variable,
            raw,
            format!("a whole number of milliseconds from 1 to {MAX_MILLIS}"),
        )),
    }
}

fn parse_log_filter(raw: Option<&str>) -> Result<String, ConfigError> {
    let filter = raw.unwrap_or("info");
    EnvFilter::try_new(filter).map_err(|e| {
        ConfigError::new(
            "RUST_LOG",
            filter,
            format!("a tracing filter such as info or kv_lb=debug ({e})"),
        )
    })?;
    Ok(filter.to_owned())
}

fn parse_log_format(raw: Option<&str>) -> Result<LogFormat, ConfigError> {
    match raw.map(str::trim) {
        None | Some("text") => Ok(LogFormat::Text),
        Some("json") => Ok(LogFormat::Json),
        Some(other) => Err(ConfigError::new("LOG_FORMAT", other, "text or json")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<LbConfig, ConfigError> {
        let vars = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let env: LbEnv = envy::from_iter(vars).expect("all fields are optional strings");
        env.validate()
    }

    fn error(pairs: &[(&str, &str)]) -> String {
        env(pairs).expect_err("should be rejected").to_string()
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let config = env(&[]).unwrap();
        assert_eq!(config.nodes.len(), 3);
        assert_eq!(config.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(config.replication_factor, 3);
        assert_eq!(config.vnodes, kv_ring::DEFAULT_VNODES);
        assert_eq!(config.auth_token, None);
        assert_eq!(config.request_timeout, Duration::from_secs(10));
        assert_eq!(config.max_value_bytes, 1_048_576);
        assert_eq!(config.log_format, LogFormat::Text);
        assert_eq!(config.serve_limits.max_connections, 1024);
        assert_eq!(config.serve_limits.head_timeout, Duration::from_secs(10));
        assert_eq!(config.serve_limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(config.worker_threads, kv_http::default_worker_threads());
        assert_eq!(
            env(&[("WORKER_THREADS", "0")]).unwrap().worker_threads,
            kv_http::default_worker_threads()
        );
        assert_eq!(env(&[("WORKER_THREADS", "2")]).unwrap().worker_threads, 2);
        assert_eq!(config.tls_identity, None);
        assert_eq!(config.tls_ca_file, None);
    }

    #[test]
    fn https_nodes_and_tls_files_are_accepted() {
        let config = env(&[
            (
                "DATABASE_NODES",
                "https://Node-A:8443/,https://127.0.0.1:8002",
            ),
            ("TLS_CERT_FILE", "run/tls/node.pem"),
            ("TLS_KEY_FILE", "run/tls/node-key.pem"),
            ("TLS_CA_FILE", "run/tls/ca.pem"),
            ("HEAD_TIMEOUT_MS", "2000"),
            ("IDLE_TIMEOUT_MS", "5000"),
        ])
        .unwrap();
        assert_eq!(
            config.nodes,
            ["https://node-a:8443", "https://127.0.0.1:8002"]
        );
        assert_eq!(
            config.tls_identity,
            Some(("run/tls/node.pem".into(), "run/tls/node-key.pem".into()))
        );
        assert_eq!(config.tls_ca_file, Some("run/tls/ca.pem".into()));
        assert_eq!(config.serve_limits.head_timeout, Duration::from_secs(2));
        assert_eq!(config.serve_limits.idle_timeout, Duration::from_secs(5));
    }

    #[test]
    fn values_are_parsed() {
        let config = env(&[
            ("DATABASE_NODES", " http://10.0.0.1:8001/ , http://Node-B,"),
            ("LB_PORT", "9100"),
            ("BIND_ADDR", "0.0.0.0"),
            ("REPLICATION_FACTOR", "5"),
            ("VNODES", "64"),
            ("AUTH_TOKEN", "s3cret"),
            ("LOG_FORMAT", "json"),
        ])
        .unwrap();
        assert_eq!(config.nodes, ["http://10.0.0.1:8001", "http://node-b:80"]);
        assert_eq!(config.listen, "0.0.0.0:9100".parse().unwrap());
        assert_eq!(config.replication_factor, 2, "capped at the node count");
        assert_eq!(config.vnodes, 64);
        assert_eq!(config.auth_token.as_deref(), Some("s3cret"));
        assert_eq!(config.log_format, LogFormat::Json);
    }

    #[test]
    fn empty_auth_token_means_no_auth() {
        assert_eq!(env(&[("AUTH_TOKEN", "")]).unwrap().auth_token, None);
    }

    #[test]
    fn every_bad_value_names_variable_value_and_expectation() {
        let cases: &[(&str, &str, &str)] = &[
            ("DATABASE_NODES", "", "DATABASE_NODES=: expected comma-separated node URLs such as http://127.0.0.1:8001 (at least one)"),
            ("DATABASE_NODES", "localhost:8001", "'localhost:8001' is not http://"),
            ("DATABASE_NODES", "ftp://a:1", "'ftp://a:1' is not http:// or https://"),
            ("DATABASE_NODES", "http://", "'http://': empty host"),
            ("DATABASE_NODES", "http://a:1/x", "'http://a:1/x' has a path, query or fragment"),
            ("LB_PORT", "0", "LB_PORT=0: expected a port number from 1 to 65535"),
            ("LB_PORT", "70000", "LB_PORT=70000: expected a port number"),
            ("BIND_ADDR", "localhost", "BIND_ADDR=localhost: expected an IP address"),
            ("REPLICATION_FACTOR", "0", "REPLICATION_FACTOR=0: expected a whole number >= 1"),
            ("REPLICATION_FACTOR", "three", "REPLICATION_FACTOR=three: expected a whole number >= 1"),
            ("VNODES", "0", "VNODES=0: expected a whole number from 1 to 4096"),
            ("VNODES", "100000", "VNODES=100000: expected a whole number from 1 to 4096"),
            ("HEALTH_CHECK_INTERVAL_MS", "0", "HEALTH_CHECK_INTERVAL_MS=0: expected a whole number of milliseconds"),
            ("HEALTH_CHECK_TIMEOUT_MS", "-5", "HEALTH_CHECK_TIMEOUT_MS=-5: expected a whole number of milliseconds"),
            ("REQUEST_TIMEOUT_MS", "99999999999", "REQUEST_TIMEOUT_MS=99999999999: expected a whole number of milliseconds from 1 to 3600000"),
            ("MAX_VALUE_BYTES", "1k", "MAX_VALUE_BYTES=1k: expected a whole number from 1 to 1073741824"),
            ("RUST_LOG", "kv_lb=loud", "RUST_LOG=kv_lb=loud: expected a tracing filter"),
            ("LOG_FORMAT", "xml", "LOG_FORMAT=xml: expected text or json"),
            ("MAX_CONNECTIONS", "0", "MAX_CONNECTIONS=0: expected a whole number from 1 to 1000000"),
            ("HEAD_TIMEOUT_MS", "0", "HEAD_TIMEOUT_MS=0: expected a whole number of milliseconds"),
            ("IDLE_TIMEOUT_MS", "x", "IDLE_TIMEOUT_MS=x: expected a whole number of milliseconds"),
            ("WORKER_THREADS", "two", "WORKER_THREADS=two: expected a whole number from 0 to 1024 (0: one per core)"),
            ("WORKER_THREADS", "1025", "WORKER_THREADS=1025: expected a whole number from 0 to 1024"),
            ("TLS_CERT_FILE", "cert.pem", "TLS_KEY_FILE=: expected the private key file of TLS_CERT_FILE=cert.pem"),
            ("TLS_KEY_FILE", "key.pem", "TLS_CERT_FILE=: expected the certificate file of TLS_KEY_FILE=key.pem"),
        ];
        for (variable, value, wanted) in cases {
            let message = error(&[(variable, value)]);
            assert!(
                message.contains(wanted),
                "{variable}={value}: got {message:?}"
            );
            assert!(!message.contains('\n'), "one line: {message:?}");
        }
    }
}
