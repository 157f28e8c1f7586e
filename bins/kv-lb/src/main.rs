//! kv-lb: the owner-routing load balancer of kv. This file is wiring only: read the
//! configuration, build the pieces, serve, shut down gracefully.
//!
//! # Layout
//! - `config`: environment variables -> [`config::LbConfig`]; `--help` text.
//! - `app`: the router and shared state; `request_context` (request id, span, metrics) and
//!   `auth` (bearer token) wrap the routes.
//! - `front`: the front door: data routes matched by hand and answered with hyper directly, the
//!   rest handed to the router.
//! - `proxy`: ring lookup, healthy-first order, failover rules; `upstream`: connections to the
//!   nodes, driven in the client connection's task.
//! - `health`: node health, the active checker, `GET /health`; `status`: `GET /`;
//!   `metrics`: `GET /metrics`; `error`: the one mapping of errors to JSON responses.

mod app;
mod auth;
mod config;
mod error;
mod front;
mod health;
mod metrics;
mod proxy;
mod request_context;
mod routing;
mod status;
mod ui;
mod upstream;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::{info, warn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::{LbConfig, LogFormat};

/// Extra time granted at shutdown beyond the request deadline, for answers still streaming.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// mimalloc: measured faster than glibc malloc for the many small allocations of a request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let thp_warning = kv_http::limit_transparent_huge_pages();
    if let Some(code) = answer_arguments() {
        return code;
    }
    let config = match LbConfig::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("kv-lb: {e}");
            return ExitCode::from(2);
        }
    };
    let tls = match LbTls::load(&config) {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("kv-lb: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&config);
    if let Some(warning) = thp_warning {
        tracing::warn!("{warning}");
    }
    let runtime = match kv_http::runtime(config.worker_threads) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("kv-lb: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, tls)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "kv-lb stopped");
            eprintln!("kv-lb: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--help` and `--version`; configuration itself comes only from the environment.
fn answer_arguments() -> Option<ExitCode> {
    let argument = std::env::args().nth(1)?;
    let text = match argument.as_str() {
        "-h" | "--help" => config::help_text(),
        "-V" | "--version" => format!("kv-lb {}\n", env!("CARGO_PKG_VERSION")),
        other => {
            eprintln!("kv-lb: unknown argument '{other}' (configuration comes from environment variables; see --help)");
            return Some(ExitCode::from(2));
        }
    };
    let written = std::io::stdout().lock().write_all(text.as_bytes());
    Some(if written.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn init_tracing(config: &LbConfig) {
    let filter = EnvFilter::try_new(&config.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    // A second subscriber cannot exist in this process; ignoring the error is safe.
    // Recent warnings are also kept for the dashboard (`kv_http::dashboard`).
    let warnings = kv_http::dashboard::WarningsLayer;
    let _ = match config.log_format {
        LogFormat::Text => builder.finish().with(warnings).try_init(),
        LogFormat::Json => builder.json().finish().with(warnings).try_init(),
    };
}

/// TLS of the LB, read at start-up: the acceptor it serves HTTPS with, the client's trust.
struct LbTls {
    acceptor: Option<kv_http::TlsAcceptor>,
    client: rustls::ClientConfig,
}

impl LbTls {
    /// Reads every TLS file that is set; the error names its variable.
    fn load(config: &LbConfig) -> Result<LbTls, String> {
        let acceptor = match &config.tls_identity {
            Some((cert, key)) => {
                kv_http::tls::read_certificates(cert)
                    .map_err(|e| format!("TLS_CERT_FILE={}: {e}", cert.display()))?;
                let acceptor = kv_http::tls::acceptor_from_pem(cert, key)
                    .map_err(|e| format!("TLS_KEY_FILE={}: {e}", key.display()))?;
                Some(acceptor)
            }
            None => None,
        };
        let ca = config.tls_ca_file.as_deref();
        let client = kv_http::tls::client_config(ca).map_err(|e| {
            let shown = ca.map(|p| p.display().to_string()).unwrap_or_default();
            format!("TLS_CA_FILE={shown}: {e}")
        })?;
        Ok(LbTls { acceptor, client })
    }
}

async fn run(config: LbConfig, tls: LbTls) -> Result<(), String> {
    let handle = metrics::install().map_err(|e| format!("cannot set up metrics: {e}"))?;
    let upstream = upstream::Upstream::new(tls.client);
    let state = app::LbState::new(&config, upstream, handle.clone());
    tokio::spawn(routing::follow_membership(
        state.clone(),
        config.health_check_interval,
        config.health_check_timeout,
    ));
    let upstream = state.upstream.clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(metrics::UPKEEP_INTERVAL);
        loop {
            ticks.tick().await;
            handle.run_upkeep();
            upstream.sweep();
        }
    });
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    info!(
        listen = %config.listen,
        nodes = ?state.routing().ring.nodes(),
        replication_factor = state.routing().replication_factor,
        vnodes = state.vnodes,
        auth = config.auth_token.is_some(),
        tls = tls.acceptor.is_some(),
        workers = config.worker_threads,
        "kv-lb listening"
    );
    let shutdown = async {
        kv_http::shutdown_signal().await;
        info!("shutting down: finishing requests in flight");
    };
    let drain = config.request_timeout + SHUTDOWN_GRACE;
    let app = front::Front::new(Arc::clone(&state), app::app(Arc::clone(&state)));
    let limits = config.serve_limits;
    if !kv_http::serve(listener, app, limits, tls.acceptor, shutdown, drain).await {
        warn!("requests still in flight after the drain period; exiting anyway");
    }
    Ok(())
}
