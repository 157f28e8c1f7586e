//! Per-worker results: what each request ended as, counted per operation, with an HDR latency
//! histogram in microseconds; merged across workers at the end of a run.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::error::BenchError;
use crate::workload::Op;

/// Largest latency the histograms hold, in microseconds (longer ones are clamped to it).
const MAX_LATENCY_US: u64 = 60_000_000;
/// Significant decimal digits the histograms keep (0.1 % relative error).
const HISTOGRAM_SIGFIGS: u8 = 3;

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answer.
    Ok,
    /// A 404 to a read or delete: the key did not exist, which a benchmark must expect.
    NotFound,
    /// Any other status: an error, labelled with its code.
    Status(u16),
    /// The TCP connection could not be opened.
    Connect,
    /// No complete answer within the per-request timeout.
    Timeout,
    /// The connection broke or the answer was not valid HTTP.
    Io,
}

impl Outcome {
    /// Classifies an HTTP status for `op`.
    pub fn from_status(op: Op, status: u16) -> Self {
        match status {
            200..=299 => Outcome::Ok,
            404 if op.accepts_not_found() => Outcome::NotFound,
            other => Outcome::Status(other),
        }
    }

    /// Whether the request counts as a success (it did what a client asked for).
    pub fn is_success(self) -> bool {
        matches!(self, Outcome::Ok | Outcome::NotFound)
    }

    /// Label under which an error is counted: `503`, `connect`, `timeout` or `io`.
    fn error_label(self) -> Option<String> {
        match self {
            Outcome::Ok | Outcome::NotFound => None,
            Outcome::Status(code) => Some(code.to_string()),
            Outcome::Connect => Some("connect".into()),
            Outcome::Timeout => Some("timeout".into()),
            Outcome::Io => Some("io".into()),
        }
    }
}

/// Builds an empty latency histogram with the shared bounds (so any two can be merged).
pub fn new_histogram() -> Result<Histogram<u64>, BenchError> {
    Ok(Histogram::new_with_bounds(
        1,
        MAX_LATENCY_US,
        HISTOGRAM_SIGFIGS,
    )?)
}

/// Counts and latencies of one operation.
#[derive(Debug, Clone)]
pub struct OpStats {
    /// Latency of successful requests, in microseconds.
    pub latency_us: Histogram<u64>,
    /// 2xx answers.
    pub ok: u64,
    /// 404 answers to reads or deletes.
    pub not_found: u64,
    /// Failed requests by label (`503`, `connect`, `timeout`, `io`).
    pub errors: BTreeMap<String, u64>,
}

impl OpStats {
    /// Empty counters.
    pub fn new() -> Result<Self, BenchError> {
        Ok(OpStats {
            latency_us: new_histogram()?,
            ok: 0,
            not_found: 0,
            errors: BTreeMap::new(),
        })
    }

    /// Counts one finished request; only successes enter the latency histogram, so a fast
    /// stream of refusals cannot make the latency look better.
    pub fn record(&mut self, outcome: Outcome, latency: Duration) {
        match outcome {
            Outcome::Ok => self.ok += 1,
            Outcome::NotFound => self.not_found += 1,
            failure => {
                if let Some(label) = failure.error_label() {
                    *self.errors.entry(label).or_insert(0) += 1;
                }
                return;
            }
        }
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us.saturating_record(micros.max(1));
    }

    /// Successful requests (2xx plus accepted 404).
    pub fn successes(&self) -> u64 {
        self.ok + self.not_found
    }

    /// Failed requests of every kind.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Adds another worker's counts to these.
    pub fn merge(&mut self, other: &OpStats) -> Result<(), BenchError> {
        self.latency_us.add(&other.latency_us)?;
        self.ok += other.ok;
        self.not_found += other.not_found;
        for (label, count) in &other.errors {
            *self.errors.entry(label.clone()).or_insert(0) += count;
        }
        Ok(())
    }
}

/// Results of a whole worker (or of all workers once merged), one [`OpStats`] per operation.
#[derive(Debug, Clone)]
pub struct RunStats {
    /// Reads.
    pub read: OpStats,
    /// Writes.
    pub write: OpStats,
    /// Deletes.
    pub delete: OpStats,
    /// Listing pages.
    pub list: OpStats,
}

impl RunStats {
    /// Empty counters for every operation.
    pub fn new() -> Result<Self, BenchError> {
        Ok(RunStats {
            read: OpStats::new()?,
            write: OpStats::new()?,
            delete: OpStats::new()?,
            list: OpStats::new()?,
        })
    }

    /// The counters of `op`.
    pub fn op(&self, op: Op) -> &OpStats {
        match op {
            Op::Read => &self.read,
            Op::Write => &self.write,
            Op::Delete => &self.delete,
            Op::List => &self.list,
        }
    }

    /// Counts one finished request of `op`.
    pub fn record(&mut self, op: Op, outcome: Outcome, latency: Duration) {
        let stats = match op {
            Op::Read => &mut self.read,
            Op::Write => &mut self.write,
            Op::Delete => &mut self.delete,
            Op::List => &mut self.list,
        };
        stats.record(outcome, latency);
    }

    /// Adds another worker's results to these.
    pub fn merge(&mut self, other: &RunStats) -> Result<(), BenchError> {
        self.read.merge(&other.read)?;
        self.write.merge(&other.write)?;
        self.delete.merge(&other.delete)?;
        self.list.merge(&other.list)
    }

    /// All operations together.
    pub fn total(&self) -> Result<OpStats, BenchError> {
        let mut all = self.read.clone();
        all.merge(&self.write)?;
        all.merge(&self.delete)?;
        all.merge(&self.list)?;
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_statuses_per_operation() {
        assert_eq!(Outcome::from_status(Op::Read, 200), Outcome::Ok);
        assert_eq!(Outcome::from_status(Op::Read, 404), Outcome::NotFound);
        assert_eq!(Outcome::from_status(Op::Delete, 404), Outcome::NotFound);
        assert_eq!(Outcome::from_status(Op::Write, 404), Outcome::Status(404));
        assert_eq!(Outcome::from_status(Op::Read, 503), Outcome::Status(503));
        assert_eq!(Outcome::from_status(Op::Read, 400), Outcome::Status(400));
        assert!(!Outcome::Status(503).is_success());
        assert!(!Outcome::Timeout.is_success());
    }

    #[test]
    fn records_errors_by_label_and_latency_only_for_successes() {
        let mut stats = RunStats::new().unwrap();
        stats.record(Op::Read, Outcome::Ok, Duration::from_micros(100));
        stats.record(Op::Read, Outcome::NotFound, Duration::from_micros(300));
        stats.record(Op::Read, Outcome::Status(503), Duration::from_micros(5));
        stats.record(Op::Read, Outcome::Status(503), Duration::from_micros(5));
        stats.record(Op::Write, Outcome::Connect, Duration::ZERO);
        stats.record(Op::Write, Outcome::Timeout, Duration::from_secs(5));
        assert_eq!(
            (
                stats.read.ok,
                stats.read.not_found,
                stats.read.error_count()
            ),
            (1, 1, 2)
        );
        assert_eq!(stats.read.errors["503"], 2);
        assert_eq!(stats.read.latency_us.len(), 2);
        assert_eq!(stats.write.errors.len(), 2);
        assert_eq!(stats.write.latency_us.len(), 0);
    }

    #[test]
    fn merge_adds_counts_and_histograms() {
        let mut a = RunStats::new().unwrap();
        let mut b = RunStats::new().unwrap();
        a.record(Op::Read, Outcome::Ok, Duration::from_micros(10));
        b.record(Op::Read, Outcome::Ok, Duration::from_micros(20));
        b.record(Op::Write, Outcome::Status(500), Duration::ZERO);
        a.merge(&b).unwrap();
        assert_eq!(a.read.ok, 2);
        assert_eq!(a.read.latency_us.max(), 20);
        let total = a.total().unwrap();
        assert_eq!((total.successes(), total.error_count()), (2, 1));
    }
}
