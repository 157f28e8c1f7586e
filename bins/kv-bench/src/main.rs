//! kv-bench: an HTTP/1.1 load generator for kv (`run`), the reference server that marks this
//! machine's HTTP limit (`limit-server`) and the reference proxy that marks what one proxy hop
//! costs (`limit-proxy`). This file is wiring: parse the command line,
//! build the tokio runtime, call the subcommand, print the result.
//!
//! Modules: `cli` (arguments), `workload` (mix, keys, consistency), `request` (target, kv and
//! etcd requests, classification of answers), `conn` (one keep-alive connection), `load`
//! (workers and phases), `cpu` (server CPU time from /proc), `stats` (counts and histograms),
//! `progress` (stderr display), `report` (table and JSON), `limit_server`, `limit_proxy`.

mod cli;
mod conn;
mod cpu;
mod error;
mod limit_proxy;
mod limit_server;
mod load;
mod progress;
mod report;
mod request;
mod stats;
mod workload;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, LimitArgs, LimitProxyArgs, RunArgs};
use crate::error::BenchError;
use crate::progress::ProgressMode;
use crate::report::Report;

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Run(args) => run_command(&args),
        Command::LimitServer(args) => limit_server_command(&args),
        Command::LimitProxy(args) => limit_proxy_command(&args),
    };
    result.unwrap_or_else(|e| {
        eprintln!("kv-bench: {e}");
        ExitCode::from(2)
    })
}

/// A multi-threaded tokio runtime with `threads` workers (all cores when not given).
fn runtime(threads: Option<u32>) -> Result<(tokio::runtime::Runtime, usize), BenchError> {
    let threads = threads
        .map(|t| t as usize)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)?;
    Ok((runtime, threads))
}

/// `kv-bench run`: exits 0 when at least one request succeeded, 1 when none did.
fn run_command(args: &RunArgs) -> Result<ExitCode, BenchError> {
    let (runtime, threads) = runtime(args.threads)?;
    let progress = match (args.quiet, std::io::stderr().is_terminal()) {
        (true, _) => ProgressMode::Off,
        (false, true) => ProgressMode::Bar,
        (false, false) => ProgressMode::Lines,
    };
    let report = runtime.block_on(async {
        let config = args.to_config(progress).await?;
        if config.preload {
            eprintln!("kv-bench: preloading {} keys", config.keys);
        }
        let result = load::run(&config).await?;
        if let Some(p) = result.preload {
            eprintln!(
                "kv-bench: preloaded {} keys in {:.1} s ({} failed)",
                p.written,
                p.elapsed.as_secs_f64(),
                p.failed
            );
        }
        Report::build(&config, &args.url, args.label.as_deref(), threads, &result)
    })?;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(report::render_table(&report).as_bytes());
    if let Some(path) = &args.json {
        report.write_json(path)?;
    }
    let successes = report.ops.last().map_or(0, |all| all.ok + all.not_found);
    Ok(if successes > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Binds `addr`; returns the listener and the address it got (the port, when 0 was asked for).
async fn listen(
    addr: std::net::SocketAddr,
) -> Result<(tokio::net::TcpListener, std::net::SocketAddr), BenchError> {
    let failed = |source| BenchError::Listen {
        addr: addr.to_string(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(failed)?;
    let local = listener.local_addr().map_err(failed)?;
    Ok((listener, local))
}

/// `kv-bench limit-server`: serves until Ctrl-C or SIGTERM.
fn limit_server_command(args: &LimitArgs) -> Result<ExitCode, BenchError> {
    let (runtime, _threads) = runtime(args.threads)?;
    let addr = args.listen_addr();
    let status = http::StatusCode::from_u16(args.status)
        .map_err(|e| BenchError::Invalid(format!("--status {}: {e}", args.status)))?;
    runtime.block_on(async {
        let (listener, local) = listen(addr).await?;
        eprintln!("kv-bench limit-server: listening on http://{local}");
        tokio::select! {
            () = limit_server::serve(listener, status) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `kv-bench limit-proxy`: proxies to `--upstream` until Ctrl-C or SIGTERM.
fn limit_proxy_command(args: &LimitProxyArgs) -> Result<ExitCode, BenchError> {
    let (runtime, _threads) = runtime(args.threads)?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], args.port));
    runtime.block_on(async {
        let (listener, local) = listen(addr).await?;
        eprintln!(
            "kv-bench limit-proxy: listening on http://{local}, forwarding to {}",
            args.upstream
        );
        tokio::select! {
            () = limit_proxy::serve(listener, args.upstream) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok(ExitCode::SUCCESS)
    })
}
