//! `kv-node --help` and `--version`: the usage text and the table of environment variables
//! (kept in the order of `.env.example`).

use std::io::Write;
use std::process::ExitCode;

/// Every variable with its default and meaning, for `kv-node --help`.
pub const HELP_VARIABLES: &[(&str, &str, &str)] = &[
    (
        "CURRENT_NODE_URL",
        "http://127.0.0.1:$PORT",
        "this node's URL as peers and the LB know it",
    ),
    (
        "CLUSTER_NODES",
        "this node alone",
        "comma-separated URLs of all nodes, this one included",
    ),
    (
        "NODE_NAME",
        "node1",
        "name shown in status, logs and metrics",
    ),
    ("PORT", "8000", "port to listen on"),
    (
        "BIND_ADDR",
        "127.0.0.1",
        "address to bind; 0.0.0.0 for multi-host",
    ),
    (
        "REPLICATION_FACTOR",
        "3",
        "N, copies of each key; capped at the number of nodes",
    ),
    (
        "DATA_DIR",
        "./data/$NODE_NAME",
        "this node's folder: IDENTITY, WAL segments, snapshots, hints",
    ),
    (
        "SNAPSHOT_INTERVAL_SECS",
        "300",
        "seconds between periodic checkpoints",
    ),
    (
        "WAL_SYNC",
        "always",
        "always (fsync before ack, group commit) | interval | never",
    ),
    (
        "WAL_SYNC_INTERVAL_MS",
        "100",
        "fsync period when WAL_SYNC=interval",
    ),
    (
        "WAL_MAX_BYTES",
        "67108864",
        "checkpoint when the WAL grows past this many bytes",
    ),
    (
        "WAL_PREALLOC_BYTES",
        "67108864",
        "WAL segments are preallocated (and recycled) at this size; 0 = off",
    ),
    (
        "WAL_BATCH_DELAY_US",
        "100",
        "WAL_SYNC=always: a group commit may wait this long for more writes; 0 = never",
    ),
    (
        "MIN_FREE_BYTES",
        "67108864",
        "below this much free disk the node turns read-only (507) until space returns; 0: off",
    ),
    (
        "TOMBSTONE_GRACE_SECS",
        "86400",
        "tombstones are collected once older than this and on every replica",
    ),
    (
        "ANTI_ENTROPY_INTERVAL_SECS",
        "30",
        "seconds between anti-entropy rounds; 0: on demand and when a peer returns",
    ),
    (
        "ANTI_ENTROPY_BYTES_PER_SEC",
        "16777216",
        "record bytes per second anti-entropy may move",
    ),
    (
        "HINT_WINDOW_SECS",
        "10800",
        "no new hints for a peer away longer than this; older hints are not replayed",
    ),
    (
        "HINT_MAX_BYTES",
        "1073741824",
        "hint bytes kept per peer",
    ),
    (
        "WATCH_HISTORY_EVENTS",
        "100000",
        "changes kept for watchers to resume from",
    ),
    (
        "WATCH_HISTORY_BYTES",
        "33554432",
        "memory of the changes kept for watchers: keys, values and 128 bytes each",
    ),
    (
        "WRITE_CONSISTENCY",
        "quorum",
        "default W: one | quorum | all | 1..N",
    ),
    (
        "READ_CONSISTENCY",
        "quorum",
        "default R: one | quorum | all | 1..N",
    ),
    (
        "VNODES",
        "kv_cluster::DEFAULT_VNODES",
        "virtual nodes per node; must match the LB's",
    ),
    (
        "MAX_KEY_BYTES",
        "1024",
        "longest key, in bytes of UTF-8 (400 beyond)",
    ),
    (
        "MAX_VALUE_BYTES",
        "1048576",
        "largest value, in bytes of JSON (413 beyond); at most 16707584, so it fits a replication batch",
    ),
    (
        "AUTH_TOKEN",
        "unset",
        "when set, /v1 requests need Authorization: Bearer <token>",
    ),
    (
        "CLUSTER_SECRET",
        "AUTH_TOKEN",
        "node-to-node calls carry it; /internal and membership need it",
    ),
    (
        "INSECURE_CLUSTER",
        "false",
        "true: run without a cluster secret on a non-loopback BIND_ADDR",
    ),
    (
        "MAX_CLOCK_OFFSET_MS",
        "500",
        "versions this far ahead of the node's clock are refused",
    ),
    (
        "HEALTH_CHECK_INTERVAL_MS",
        "500",
        "time between health checks of each peer",
    ),
    (
        "HEALTH_CHECK_TIMEOUT_MS",
        "500",
        "deadline of one health check",
    ),
    (
        "PEER_TIMEOUT_MS",
        "2000",
        "deadline of a replication, replica read or forward call",
    ),
    (
        "REQUEST_TIMEOUT_MS",
        "10000",
        "deadline of a client request (504 beyond)",
    ),
    (
        "SHUTDOWN_GRACE_SECS",
        "10",
        "how long SIGTERM waits for requests in flight",
    ),
    (
        "TRANSFER_KEYS_PER_SEC",
        "5000",
        "keys a node streams per second during a membership change",
    ),
    (
        "MAX_CONNECTIONS",
        "1024",
        "client and peer connections served at once; more wait",
    ),
    (
        "WORKER_THREADS",
        "0",
        "async worker threads; 0: one per core (scripts/cluster.sh: cores / nodes)",
    ),
    ("RUST_LOG", "info", "tracing filter"),
    ("LOG_FORMAT", "text", "text | json"),
    (
        "MIMALLOC_ALLOW_THP",
        "unset",
        "unset: transparent huge pages off for this process; 1: keep them",
    ),
    (
        "TLS_CERT_FILE",
        "unset",
        "PEM certificate chain; with TLS_KEY_FILE: serve HTTPS",
    ),
    ("TLS_KEY_FILE", "unset", "PEM private key of TLS_CERT_FILE"),
    (
        "TLS_CA_FILE",
        "unset",
        "PEM CA that https:// peers must chain to (no other root)",
    ),
];

/// Prints `kv-node --help`: usage, `restore`, and every variable with its default.
pub fn print_help() -> ExitCode {
    let mut text = format!(
        "kv-node {}: one storage node of kv, a distributed key-value store.\n\n\
         Usage: kv-node            (configured by environment variables)\n       \
         kv-node restore <backup file> [--data-dir DIR] [--force]\n       \
         kv-node tls-certs <dir> [host...]   (throwaway CA + node certificate)\n       \
         kv-node --help | --version\n\n{}\n\nEnvironment variables (default in brackets):\n",
        env!("CARGO_PKG_VERSION"),
        crate::restore::HELP
    );
    for (name, default, meaning) in HELP_VARIABLES {
        text.push_str(&format!("  {name:<26} {meaning} [{default}]\n"));
    }
    print_line(&text)
}

/// Prints one text to stdout; the exit code says whether that worked.
pub fn print_line(text: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}") {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}
