//! Command line of kv-bench: the `run` and `limit-server` subcommands, the duration syntax
//! (`10s`, `500ms`, `2m`), and the step from raw arguments to a validated [`RunConfig`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::cpu::{CpuProbe, Process};
use crate::error::BenchError;
use crate::load::{RunConfig, StopAt};
use crate::progress::ProgressMode;
use crate::request::{Api, Target};
use crate::workload::{Consistency, KeyDist, Mix};

/// Length of the measured phase when neither `--duration` nor `--requests` is given.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);
/// Largest `--value-size` accepted (kv's default `MAX_VALUE_BYTES` is 1 MiB).
const MAX_VALUE_SIZE: usize = 64 << 20;

/// Load generator and reference server for benchmarking kv.
#[derive(Debug, Parser)]
#[command(name = "kv-bench", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Closed-loop HTTP/1.1 load against a kv node or load balancer (or an etcd member, with
    /// `--target etcd`); prints a result table.
    Run(Box<RunArgs>),
    /// Minimal HTTP server answering every request with a fixed ~70-byte JSON body: the HTTP
    /// limit of this machine, to compare kv against.
    LimitServer(LimitArgs),
    /// The leanest HTTP/1.1 reverse proxy in front of one upstream (one upstream connection per
    /// client connection, no routing): what one proxy hop costs on this machine.
    LimitProxy(LimitProxyArgs),
}

/// Arguments of `kv-bench limit-proxy`.
#[derive(Debug, Args)]
pub struct LimitProxyArgs {
    /// Port to listen on, on 127.0.0.1.
    #[arg(long, default_value_t = 8998)]
    pub port: u16,
    /// Address of the server every request goes to, for example 127.0.0.1:8001.
    #[arg(long)]
    pub upstream: SocketAddr,
    /// Tokio worker threads; default: all cores.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,
}

/// Arguments of `kv-bench run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Base URL of a kv load balancer or node; with `--target etcd`, the client URL of one etcd
    /// member (its leader, for the fewest hops: `etcdctl endpoint status` shows which).
    #[arg(long, default_value = "http://127.0.0.1:9000")]
    pub url: String,
    /// API of the target: `kv` (`/v1/{key}`) or `etcd` (the v3 JSON gateway: `POST
    /// /v3/kv/range`, `/v3/kv/put`, `/v3/kv/deleterange` with base64 keys and values; reads are
    /// linearizable ranges). Keys and values are the same as for kv: etcd stores the JSON value
    /// text kv would store. A range that finds nothing counts as `not_found`, like kv's 404;
    /// any status but 200 is an error. `--w` and `--r` are kv-only.
    #[arg(long, value_enum, default_value_t = Api::Kv)]
    pub target: Api,
    /// A server process whose CPU time (user + system, from /proc/PID/stat) the measured phase
    /// is charged: `NAME=PID` or `PID`; repeat or separate with commas. The table and the JSON
    /// results then show the servers' CPU µs per successful request, in all and per process
    /// (kv-bench's own CPU is always shown). Linux only.
    #[arg(long = "server-pid", value_name = "[NAME=]PID", value_delimiter = ',',
          value_parser = |s: &str| s.parse::<Process>())]
    pub server_pids: Vec<Process>,
    /// Concurrent workers, each with one keep-alive connection.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub conns: u32,
    /// Length of the measured phase (`10s`, `500ms`, `2m`); default 10s.
    #[arg(long, value_parser = parse_duration, conflicts_with = "requests")]
    pub duration: Option<Duration>,
    /// Stop after this many measured requests instead of after a duration.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,
    /// Unrecorded load before the measured phase.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Size of the key space: keys are `{key-prefix}0` .. `{key-prefix}{keys-1}`.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub keys: u64,
    /// Prefix of every key.
    #[arg(long, default_value = "bench-")]
    pub key_prefix: String,
    /// Bytes of the JSON string written as each value.
    #[arg(long, default_value_t = 100)]
    pub value_size: usize,
    /// Operation weights, `read=95,write=5[,delete=0][,list=0]`; a `list` is one listing page
    /// (`GET /v1?prefix=KEY-PREFIX&after=KEY&limit=LIST-LIMIT`) starting at a drawn key.
    #[arg(long, default_value = "read=95,write=5", value_parser = |s: &str| s.parse::<Mix>())]
    pub mix: Mix,
    /// Keys per listing page of a `list` operation.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub list_limit: u32,
    /// Key distribution: `uniform` or `zipf:S` (for example `zipf:0.99`).
    #[arg(long, default_value = "uniform", value_parser = |s: &str| s.parse::<KeyDist>())]
    pub dist: KeyDist,
    /// Write consistency sent as `?w=` (one, quorum, all, N); the server default when omitted.
    #[arg(long, value_parser = |s: &str| s.parse::<Consistency>())]
    pub w: Option<Consistency>,
    /// Read consistency sent as `?r=` (one, quorum, all, N); the server default when omitted.
    #[arg(long, value_parser = |s: &str| s.parse::<Consistency>())]
    pub r: Option<Consistency>,
    /// Write every key once before the run, so that reads find their keys.
    #[arg(long)]
    pub preload: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Name of this run in the table and the JSON results.
    #[arg(long)]
    pub label: Option<String>,
    /// Tokio worker threads; default: all cores.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,
    /// No progress display on stderr (the table still goes to stdout).
    #[arg(long)]
    pub quiet: bool,
    /// Open-loop pacing: send this many requests per second in total, on a fixed schedule,
    /// instead of as fast as the answers come. Latency is then counted from each request's
    /// scheduled time, so a stalled server shows up as latency, not as fewer requests.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub rate: Option<u64>,
    /// Deadline of one request, connecting included; a late answer counts as a `timeout` error.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Arguments of `kv-bench limit-server`.
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Port to listen on, on 127.0.0.1.
    #[arg(long, default_value_t = 8999)]
    pub port: u16,
    /// Full address to listen on instead of 127.0.0.1:PORT.
    #[arg(long, conflicts_with = "port")]
    pub addr: Option<SocketAddr>,
    /// Status of every answer (a non-2xx status is useful to test error accounting).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u16).range(200..=599))]
    pub status: u16,
    /// Tokio worker threads; default: all cores.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,
}

impl LimitArgs {
    /// The address to bind.
    pub fn listen_addr(&self) -> SocketAddr {
        self.addr
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], self.port)))
    }
}

impl RunArgs {
    /// Checks the arguments, resolves the target and builds the run's configuration.
    pub async fn to_config(&self, progress: ProgressMode) -> Result<RunConfig, BenchError> {
        if self.value_size > MAX_VALUE_SIZE {
            return Err(BenchError::Invalid(format!(
                "--value-size {}: at most {MAX_VALUE_SIZE} bytes",
                self.value_size
            )));
        }
        if self.timeout.is_zero() {
            return Err(BenchError::Invalid("--timeout must be above 0".into()));
        }
        if self.target == Api::Etcd && (self.w.is_some() || self.r.is_some()) {
            return Err(BenchError::Invalid(
                "--w and --r are kv's: etcd has no per-request consistency (a put commits \
                 through raft to a majority, a range is linearizable)"
                    .into(),
            ));
        }
        let stop = match (self.requests, self.duration) {
            (Some(n), _) => StopAt::Requests(n),
            (None, Some(d)) => StopAt::Elapsed(d),
            (None, None) => StopAt::Elapsed(DEFAULT_DURATION),
        };
        Ok(RunConfig {
            api: self.target,
            target: Target::resolve(&self.url).await?,
            cpu: CpuProbe::new(&self.server_pids)?,
            conns: self.conns as usize,
            stop,
            warmup: self.warmup,
            keys: self.keys,
            key_prefix: self.key_prefix.clone(),
            value_size: self.value_size,
            list_limit: self.list_limit,
            mix: self.mix,
            dist: self.dist,
            w: self.w,
            r: self.r,
            preload: self.preload,
            timeout: self.timeout,
            rate: self.rate,
            progress,
        })
    }
}

/// Parses `10s`, `1.5s`, `500ms`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| {
        format!("duration {text:?}: expected a number with a unit, like 10s or 500ms")
    })?;
    let seconds_per_unit = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "us" => 0.000_001,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "duration {text:?}: unknown unit {other:?} (ms, s, m, h)"
            ))
        }
    };
    Duration::try_from_secs_f64(value * seconds_per_unit)
        .map_err(|_| format!("duration {text:?}: out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "s", "ten", "10x", "-1s", "1e999s", "1.2.3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn cli_parses_a_full_run_line() {
        let cli = Cli::try_parse_from([
            "kv-bench",
            "run",
            "--url",
            "http://127.0.0.1:1",
            "--conns",
            "4",
            "--requests",
            "10",
            "--mix",
            "read=1,delete=1",
            "--dist",
            "zipf:0.9",
            "--w",
            "all",
            "--r",
            "2",
            "--rate",
            "500",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(
            (args.conns, args.requests, args.w, args.r),
            (
                4,
                Some(10),
                Some(Consistency::All),
                Some(Consistency::Count(2))
            )
        );
        assert_eq!(args.dist, KeyDist::Zipf(0.9));
        assert_eq!(args.rate, Some(500));
        assert!(Cli::try_parse_from(["kv-bench", "run", "--rate", "0"]).is_err());
        assert!(Cli::try_parse_from(["kv-bench", "run", "--mix", "read=0"]).is_err());
        assert!(
            Cli::try_parse_from(["kv-bench", "run", "--duration", "1s", "--requests", "5"])
                .is_err()
        );
        assert!(Cli::try_parse_from(["kv-bench", "run", "--conns", "0"]).is_err());
    }
}
