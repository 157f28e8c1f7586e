//! Results of a run: per-operation throughput and latency percentiles, printed as a table and
//! optionally written as JSON (`--json`) for scripts such as `scripts/bench.sh`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::cpu::{CpuUsage, ProcessCpu};
use crate::error::BenchError;
use crate::load::{RunConfig, RunResult};
use crate::stats::{OpStats, RunStats};
use crate::workload::{Mix, Op};

/// Everything a run reports; serialized as the `--json` file.
#[derive(Debug, Serialize)]
pub struct Report {
    /// `--label`, or the URL when none was given.
    pub label: String,
    /// Target URL.
    pub url: String,
    /// API of the target: `kv` or `etcd`.
    pub target: String,
    /// Workers (= connections).
    pub conns: usize,
    /// `--rate`: requests per second of an open-loop run; `None` for a closed loop.
    pub rate: Option<u64>,
    /// Tokio worker threads of the load generator.
    pub threads: usize,
    /// Length of the measured phase, in seconds.
    pub duration_secs: f64,
    /// Length of the unrecorded warm-up, in seconds.
    pub warmup_secs: f64,
    /// Size of the key space.
    pub keys: u64,
    /// Bytes of each written value.
    pub value_size: usize,
    /// Operation weights, `read=R,write=W,delete=D`.
    pub mix: String,
    /// Key distribution, `uniform` or `zipf:S`.
    pub dist: String,
    /// `?w=` sent with writes and deletes, if any.
    pub w: Option<String>,
    /// `?r=` sent with reads, if any.
    pub r: Option<String>,
    /// Keys written by `--preload` and writes that failed, if it ran.
    pub preload: Option<PreloadReport>,
    /// One entry per operation in the mix, then `all`.
    pub ops: Vec<OpReport>,
    /// CPU of the `--server-pid` processes during the measured phase; `None` without any, or
    /// when it could not be measured (`cpu_error` says why).
    pub server_cpu: Option<CpuReport>,
    /// CPU of kv-bench itself during the measured phase.
    pub client_cpu: Option<ProcessCpuReport>,
    /// Why the CPU could not be measured (a server process exited during the run).
    pub cpu_error: Option<String>,
}

/// CPU time of a set of server processes during the measured phase.
#[derive(Debug, Serialize)]
pub struct CpuReport {
    /// Seconds of CPU (user + system) of all of them together.
    pub secs: f64,
    /// Microseconds of their CPU per successful request; `None` when none succeeded.
    pub us_per_request: Option<f64>,
    /// The same per process, in `--server-pid` order.
    pub processes: Vec<ProcessCpuReport>,
}

/// CPU time of one process during the measured phase.
#[derive(Debug, Serialize)]
pub struct ProcessCpuReport {
    /// Name given with `--server-pid NAME=PID`, or the process's command.
    pub name: String,
    /// Process id.
    pub pid: u32,
    /// Seconds of CPU (user + system).
    pub secs: f64,
    /// Microseconds of CPU per successful request; `None` when none succeeded.
    pub us_per_request: Option<f64>,
}

impl ProcessCpuReport {
    fn new(used: &ProcessCpu, successes: u64) -> Self {
        ProcessCpuReport {
            name: used.name.clone(),
            pid: used.pid,
            secs: used.secs,
            us_per_request: per_request(used.secs, successes),
        }
    }
}

/// Microseconds of `secs` per one of `successes`, if any.
fn per_request(secs: f64, successes: u64) -> Option<f64> {
    (successes > 0).then(|| secs * 1e6 / successes as f64)
}

impl CpuReport {
    /// The servers' part of `usage`, per successful request; `None` when no server was given.
    fn new(usage: &CpuUsage, successes: u64) -> Option<Self> {
        if usage.servers.is_empty() {
            return None;
        }
        let secs = usage.servers.iter().map(|p| p.secs).sum();
        Some(CpuReport {
            secs,
            us_per_request: per_request(secs, successes),
            processes: usage
                .servers
                .iter()
                .map(|p| ProcessCpuReport::new(p, successes))
                .collect(),
        })
    }
}

/// What `--preload` did.
#[derive(Debug, Serialize)]
pub struct PreloadReport {
    /// Keys written.
    pub written: u64,
    /// Writes that failed.
    pub failed: u64,
    /// Seconds it took.
    pub secs: f64,
}

/// Counts, throughput and latency of one operation (or `all`).
#[derive(Debug, Serialize)]
pub struct OpReport {
    /// `read`, `write`, `delete` or `all`.
    pub op: String,
    /// Finished requests of the measured phase, failed ones included.
    pub count: u64,
    /// 2xx answers.
    pub ok: u64,
    /// 404 answers to reads and deletes (not errors).
    pub not_found: u64,
    /// Failed requests.
    pub errors: u64,
    /// Failed requests by status code or `connect` / `timeout` / `io`.
    pub errors_by: BTreeMap<String, u64>,
    /// Successful requests per second.
    pub throughput: f64,
    /// Latency of successful requests.
    pub latency_us: LatencyReport,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencyReport {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Slowest request.
    pub max: u64,
    /// Arithmetic mean.
    pub mean: f64,
}

impl Report {
    /// Summarizes `result` of the run configured by `config`.
    pub fn build(
        config: &RunConfig,
        url: &str,
        label: Option<&str>,
        threads: usize,
        result: &RunResult,
    ) -> Result<Self, BenchError> {
        let ops = summarize(&result.stats, &config.mix, result.elapsed)?;
        let successes = ops.last().map_or(0, |all| all.ok + all.not_found);
        let (server_cpu, client_cpu, cpu_error) = match &result.cpu {
            Ok(usage) => (
                CpuReport::new(usage, successes),
                usage
                    .client
                    .as_ref()
                    .map(|c| ProcessCpuReport::new(c, successes)),
                None,
            ),
            Err(e) => (None, None, Some(e.clone())),
        };
        Ok(Report {
            label: label.unwrap_or(url).to_string(),
            url: url.to_string(),
            target: config.api.name().to_string(),
            conns: config.conns,
            rate: config.rate,
            threads,
            duration_secs: result.elapsed.as_secs_f64(),
            warmup_secs: config.warmup.as_secs_f64(),
            keys: config.keys,
            value_size: config.value_size,
            mix: config.mix.to_string(),
            dist: config.dist.to_string(),
            w: config.w.map(|w| w.to_string()),
            r: config.r.map(|r| r.to_string()),
            preload: result.preload.map(|p| PreloadReport {
                written: p.written,
                failed: p.failed,
                secs: p.elapsed.as_secs_f64(),
            }),
            ops,
            server_cpu,
            client_cpu,
            cpu_error,
        })
    }

    /// Writes the report as pretty JSON to `path`.
    pub fn write_json(&self, path: &Path) -> Result<(), BenchError> {
        let output = |source| BenchError::Output {
            path: path.to_path_buf(),
            source,
        };
        let json = serde_json::to_vec_pretty(self).map_err(|e| output(std::io::Error::other(e)))?;
        std::fs::write(path, json).map_err(output)
    }
}

/// One report per operation with a weight in `mix`, then one for all operations together.
pub fn summarize(
    stats: &RunStats,
    mix: &Mix,
    elapsed: Duration,
) -> Result<Vec<OpReport>, BenchError> {
    let mut ops: Vec<OpReport> = Op::ALL
        .into_iter()
        .filter(|op| mix.weight(*op) > 0)
        .map(|op| summarize_op(op.name(), stats.op(op), elapsed))
        .collect();
    ops.push(summarize_op("all", &stats.total()?, elapsed));
    Ok(ops)
}

/// Counts, throughput (successes per second of `elapsed`) and latency percentiles of `stats`.
pub fn summarize_op(name: &str, stats: &OpStats, elapsed: Duration) -> OpReport {
    let secs = elapsed.as_secs_f64();
    let throughput = if secs > 0.0 {
        stats.successes() as f64 / secs
    } else {
        0.0
    };
    let h = &stats.latency_us;
    let latency_us = LatencyReport {
        p50: h.value_at_quantile(0.50),
        p90: h.value_at_quantile(0.90),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        max: h.max(),
        mean: h.mean(),
    };
    OpReport {
        op: name.to_string(),
        count: stats.successes() + stats.error_count(),
        ok: stats.ok,
        not_found: stats.not_found,
        errors: stats.error_count(),
        errors_by: stats.errors.clone(),
        throughput,
        latency_us,
    }
}

/// The human-readable result table.
pub fn render_table(report: &Report) -> String {
    let mut out = String::new();
    let consistency = |name: &str, value: &Option<String>| match value {
        Some(v) => format!(" {name}={v}"),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "{}: {} | {} conns{} | {:.1} s measured | mix {} | dist {} | keys {}{}{}",
        report.label,
        report.url,
        report.conns,
        report.rate.map_or(String::new(), |r| format!(" at {r}/s")),
        report.duration_secs,
        report.mix,
        report.dist,
        report.keys,
        consistency("r", &report.r),
        consistency("w", &report.w),
    );
    let _ = writeln!(
        out,
        "{:<7}{:>10}{:>11}{:>9}{:>9}{:>9}{:>9}{:>9}{:>11}  errors",
        "op", "count", "ops/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "not_found"
    );
    for op in &report.ops {
        let l = &op.latency_us;
        let _ = writeln!(
            out,
            "{:<7}{:>10}{:>11.1}{:>9}{:>9}{:>9}{:>9}{:>9}{:>11}  {}",
            op.op,
            op.count,
            op.throughput,
            millis(l.p50),
            millis(l.p90),
            millis(l.p99),
            millis(l.p999),
            millis(l.max),
            op.not_found,
            error_summary(op),
        );
    }
    if let Some(line) = cpu_line(report) {
        let _ = writeln!(out, "{line}");
    }
    out
}

/// `CPU per successful request: servers 151.2 µs (node1 50.1, lb 30.2, ...), kv-bench 20.3 µs`,
/// or why it could not be measured.
fn cpu_line(report: &Report) -> Option<String> {
    if let Some(e) = &report.cpu_error {
        return Some(format!("CPU not measured: {e}"));
    }
    let us = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let mut parts = Vec::new();
    if let Some(s) = &report.server_cpu {
        let each: Vec<String> = s
            .processes
            .iter()
            .map(|p| format!("{} {}", p.name, us(p.us_per_request)))
            .collect();
        parts.push(format!(
            "servers {} µs ({})",
            us(s.us_per_request),
            each.join(", ")
        ));
    }
    if let Some(c) = &report.client_cpu {
        parts.push(format!("kv-bench {} µs", us(c.us_per_request)));
    }
    (!parts.is_empty()).then(|| format!("CPU per successful request: {}", parts.join(", ")))
}

/// Microseconds as milliseconds with three decimals.
fn millis(micros: u64) -> String {
    format!("{:.3}", micros as f64 / 1000.0)
}

/// `0`, or the error count followed by its breakdown: `15 (503: 12, connect: 3)`.
fn error_summary(op: &OpReport) -> String {
    if op.errors == 0 {
        return "0".into();
    }
    let parts: Vec<String> = op
        .errors_by
        .iter()
        .map(|(label, n)| format!("{label}: {n}"))
        .collect();
    format!("{} ({})", op.errors, parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Outcome;

    fn sample_stats() -> RunStats {
        let mut stats = RunStats::new().unwrap();
        for micros in 1..=1000 {
            stats.record(Op::Read, Outcome::Ok, Duration::from_micros(micros));
        }
        for _ in 0..100 {
            stats.record(Op::Read, Outcome::NotFound, Duration::from_micros(2000));
        }
        for _ in 0..12 {
            stats.record(Op::Write, Outcome::Status(503), Duration::from_micros(1));
        }
        stats.record(Op::Write, Outcome::Ok, Duration::from_micros(500));
        stats
    }

    #[test]
    fn percentiles_and_throughput_are_right() {
        let stats = sample_stats();
        let read = summarize_op("read", &stats.read, Duration::from_secs(2));
        assert_eq!(
            (read.count, read.ok, read.not_found, read.errors),
            (1100, 1000, 100, 0)
        );
        assert!((read.throughput - 550.0).abs() < 1e-9);
        // 1100 samples: 1..=1000 us, then 100 at 2000 us.
        assert!(
            (549..=551).contains(&read.latency_us.p50),
            "{:?}",
            read.latency_us
        );
        assert!(
            (989..=991).contains(&read.latency_us.p90),
            "{:?}",
            read.latency_us
        );
        assert!(
            (1998..=2002).contains(&read.latency_us.p99),
            "{:?}",
            read.latency_us
        );
        assert!(
            (1998..=2002).contains(&read.latency_us.max),
            "{:?}",
            read.latency_us
        );
    }

    #[test]
    fn errors_do_not_count_as_throughput() {
        let stats = sample_stats();
        let write = summarize_op("write", &stats.write, Duration::from_secs(1));
        assert_eq!((write.count, write.ok, write.errors), (13, 1, 12));
        assert!((write.throughput - 1.0).abs() < 1e-9);
        assert_eq!(write.errors_by["503"], 12);
        assert_eq!(error_summary(&write), "12 (503: 12)");
    }

    #[test]
    fn summary_lists_mixed_ops_then_all() {
        let mix: Mix = "read=9,write=1".parse().unwrap();
        let ops = summarize(&sample_stats(), &mix, Duration::from_secs(1)).unwrap();
        let names: Vec<&str> = ops.iter().map(|o| o.op.as_str()).collect();
        assert_eq!(names, ["read", "write", "all"]);
        assert_eq!((ops[2].count, ops[2].errors), (1113, 12));
        assert_eq!(
            summarize_op("x", &OpStats::new().unwrap(), Duration::ZERO).throughput,
            0.0
        );
    }
}
