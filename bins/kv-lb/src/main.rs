//! kv-lb: the owner-routing load balancer of kv. This file is wiring only: read the
//! configuration, build the pieces, serve, shut down gracefully.
//!
//! # Layout
//! - `config`: environment variables -> [`config::LbConfig`]; `--help` text.
//! - `app`: the router and shared state; `request_context` (request id, span, metrics) and
//!   `auth` (bearer token) wrap the routes.
//! - `proxy`: ring lookup, healthy-first order, failover rules; `upstream`: the pooled client.
//! - `health`: node health, the active checker, `GET /health`; `status`: `GET /`;
//!   `metrics`: `GET /metrics`; `error`: the one mapping of errors to JSON responses.

mod app;
mod auth;
mod config;
mod error;
mod health;
mod metrics;
mod proxy;
mod request_context;
mod routing;
mod stamp;
mod status;
mod upstream;

use std::future::IntoFuture;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use crate::config::{LbConfig, LogFormat};

/// Extra time granted at shutdown beyond the request deadline, for answers still streaming.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// mimalloc: measured faster than glibc malloc for the many small allocations of a request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
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
    init_tracing(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("kv-lb: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
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
    let _ = match config.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

async fn run(config: LbConfig) -> Result<(), String> {
    let handle = metrics::install().map_err(|e| format!("cannot set up metrics: {e}"))?;
    let state = app::LbState::new(&config, handle.clone());
    tokio::spawn(routing::follow_membership(
        state.clone(),
        config.health_check_interval,
        config.health_check_timeout,
    ));
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(metrics::UPKEEP_INTERVAL);
        loop {
            ticks.tick().await;
            handle.run_upkeep();
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
        "kv-lb listening"
    );
    serve(
        listener,
        app::app(state),
        config.request_timeout + SHUTDOWN_GRACE,
    )
    .await
}

/// Serves until SIGTERM or Ctrl-C, then stops accepting and waits up to `drain` for the
/// requests in flight.
async fn serve(listener: TcpListener, app: axum::Router, drain: Duration) -> Result<(), String> {
    let (stop, mut stopped) = watch::channel(false);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        // An error means the sender is gone, which also means: stop.
        let _ = stopped.wait_for(|stop| *stop).await;
    });
    let mut server = tokio::spawn(server.into_future());
    tokio::select! {
        finished = &mut server => return flatten(finished),
        () = shutdown_signal() => {}
    }
    info!(
        drain_ms = drain.as_millis() as u64,
        "shutting down: finishing requests in flight"
    );
    let _ = stop.send(true);
    match tokio::time::timeout(drain, &mut server).await {
        Ok(finished) => flatten(finished),
        Err(_) => {
            warn!("requests still in flight after the drain period; exiting anyway");
            Ok(())
        }
    }
}

fn flatten(finished: Result<std::io::Result<()>, tokio::task::JoinError>) -> Result<(), String> {
    match finished {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("server error: {e}")),
        Err(e) => Err(format!("server task failed: {e}")),
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => info!("Ctrl-C received"),
        () = terminate => info!("SIGTERM received"),
    }
}
