//! kv-node: one storage node of kv. Wiring only: read the config, open the store (recovery),
//! start the cluster layer, serve HTTP, and shut down cleanly on SIGTERM or Ctrl-C.
//! `kv-node restore <file>` rebuilds a data folder from a backup instead (`restore.rs`);
//! `kv-node tls-certs <dir> [host...]` writes a throwaway CA and node certificate (`tls_certs.rs`).

mod admin;
mod api;
mod batch;
mod config;
mod error;
mod help;
mod internal;
mod list;
mod members;
mod request;
mod restore;
mod routes;
mod status;
mod telemetry;
mod tls;
mod tls_certs;
mod ui;
mod watch;
mod watch_merge;

use config::NodeConfig;
use kv_cluster::{Cluster, ClusterConfig};
use kv_core::{Store, StoreConfig};
use std::process::ExitCode;
use std::time::Duration;
use tracing::{error, info, warn};

/// How long a clean shutdown gives peers to take their hints before keeping them on disk.
const HINT_DELIVERY_BUDGET: Duration = Duration::from_secs(2);

/// mimalloc: measured faster than glibc malloc for the many small allocations of a request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let thp_warning = kv_http::limit_transparent_huge_pages();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--help" | "-h") => return help::print_help(),
        Some("restore") => return restore::main(&args[1..]),
        Some("tls-certs") => return tls_certs::main(&args[1..]),
        Some("--version" | "-V") => {
            return help::print_line(&format!("kv-node {}", env!("CARGO_PKG_VERSION")))
        }
        Some(other) => {
            eprintln!("kv-node: unknown argument {other:?}; kv-node is configured by environment variables (see kv-node --help)");
            return ExitCode::from(2);
        }
        None => {}
    }
    let config = match NodeConfig::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("kv-node: {e}");
            return ExitCode::from(2);
        }
    };
    let tls = match tls::load(&config.tls) {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("kv-node: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_tracing(config.log_format);
    if let Some(warning) = thp_warning {
        warn!("{warning}");
    }
    let runtime = match kv_http::runtime(config.worker_threads) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("kv-node: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, tls)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, message }) => {
            error!("{message}");
            eprintln!("kv-node: {message}");
            ExitCode::from(code)
        }
    }
}

/// Why the node stopped with an error, and its exit code: 2 when it refused to start on a data
/// folder that belongs to another node (a configuration mistake, like a bad variable), else 1.
struct Failure {
    code: u8,
    message: String,
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure { code: 1, message }
    }
}

/// Recovers the store, serves until a shutdown signal, then drains and checkpoints.
async fn run(config: NodeConfig, tls: tls::NodeTls) -> Result<(), Failure> {
    let mut store_config = StoreConfig::new(config.data_dir.clone(), kv_core::node_id(&config.url));
    store_config.owner = Some(kv_core::DataOwner {
        name: config.name.clone(),
        url: config.url.clone(),
    });
    store_config.sync = config.wal_sync;
    store_config.sync_interval = config.wal_sync_interval;
    store_config.snapshot_interval = config.snapshot_interval;
    store_config.wal_max_bytes = config.wal_max_bytes;
    store_config.wal_prealloc_bytes = config.wal_prealloc_bytes;
    store_config.wal_batch_delay = config.wal_batch_delay;
    store_config.min_free_bytes = config.min_free_bytes;
    store_config.tombstone_grace = config.tombstone_grace;
    // Before the store opens, so that what kv-core records from its threads is kept.
    let metrics = telemetry::init_metrics();
    telemetry::spawn_upkeep(metrics.clone());
    if config.open_cluster {
        warn!(
            listen = %config.listen,
            "no CLUSTER_SECRET (or AUTH_TOKEN): /internal, membership and /admin calls are open \
             to anyone who can reach this address; set CLUSTER_SECRET to close them"
        );
    }
    info!(node = %config.name, data_dir = %config.data_dir.display(), "recovering");
    let store = tokio::task::spawn_blocking(move || Store::open(store_config))
        .await
        .map_err(|e| format!("recovery task failed: {e}"))?
        .map_err(|e| Failure {
            code: if matches!(e, kv_core::Error::ForeignDataDir { .. }) {
                2
            } else {
                1
            },
            message: format!("cannot open the store: {e}"),
        })?;
    let status = store.status();
    info!(
        keys = status.keys,
        wal_bytes = status.wal_bytes,
        "recovered"
    );

    let cluster = Cluster::start(cluster_config(&config, tls.ca_pem), store.clone())
        .map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    info!(node = %config.name, url = %config.url, listen = %config.listen, nodes = config.nodes.len(), tls = tls.acceptor.is_some(), workers = config.worker_threads, "serving");
    let grace = config.shutdown_grace;
    let limits = kv_http::ServeLimits {
        max_connections: config.max_connections,
        // Room for the longest key, percent-encoded, plus ordinary headers.
        max_head_bytes: (3 * config.max_key_bytes + 16 * 1024).max(32 * 1024),
        ..kv_http::ServeLimits::default()
    };
    let app = routes::app(routes::AppState::new(config, cluster.clone(), metrics));
    let watches = cluster.watch_hub();
    let shutdown = async move {
        kv_http::shutdown_signal().await;
        // Watches never end by themselves: end them so they do not hold the grace period.
        watches.close();
        info!("shutting down: no new connections; finishing requests in flight");
    };
    if !kv_http::serve(listener, app, limits, tls.acceptor, shutdown, grace).await {
        warn!(
            grace_secs = grace.as_secs(),
            "requests still in flight after the grace period; closing"
        );
    }
    cluster.shutdown(HINT_DELIVERY_BUDGET).await;
    match store.shutdown().await {
        Ok(()) => info!("stopped cleanly"),
        // Every acknowledged write is in the WAL already (a failed WAL acknowledged nothing
        // after it failed), so the next start replays it: stopping is still clean.
        Err(e) => error!(
            error = %e,
            "stopped without a final checkpoint; the next start replays the WAL"
        ),
    }
    Ok(())
}

fn cluster_config(config: &NodeConfig, tls_ca_pem: Option<Vec<u8>>) -> ClusterConfig {
    ClusterConfig {
        me: config.url.clone(),
        nodes: config.nodes.clone(),
        replication_factor: config.replication_factor,
        vnodes: config.vnodes,
        secret: config.cluster_secret.clone(),
        health_interval: config.health_interval,
        health_timeout: config.health_timeout,
        connect_timeout: Duration::from_millis(500),
        peer_timeout: config.peer_timeout,
        // The forwarded-to coordinator's budget is shorter than this node's (see `api::data`).
        forward_timeout: config.request_timeout,
        write_consistency: config.write_consistency,
        read_consistency: config.read_consistency,
        hints_dir: config.data_dir.join("hints"),
        hint_limits: kv_cluster::HintLimits {
            window: config.hint_window,
            max_bytes_per_peer: config.hint_max_bytes,
        },
        members_file: config.data_dir.join("members.json"),
        transfer_keys_per_sec: config.transfer_keys_per_sec,
        // A node bound to one address talks to its peers from that address too.
        local_address: Some(config.listen.ip()).filter(|ip| !ip.is_unspecified()),
        tls_ca_pem,
        max_clock_offset: config.max_clock_offset,
        anti_entropy: kv_cluster::AntiEntropyConfig {
            interval: config.anti_entropy_interval,
            bytes_per_sec: config.anti_entropy_bytes_per_sec,
            grace: config.tombstone_grace,
        },
        watch_history: kv_cluster::HistoryLimits {
            max_events: config.watch_history_events,
            max_bytes: config.watch_history_bytes,
        },
    }
}
