//! The load generator: `conns` workers, each with one keep-alive connection. Closed loop by
//! default (the next request leaves as soon as the previous answer is in); with a rate, open
//! loop (requests leave on a fixed schedule shared by the workers, latency counted from the
//! schedule). A warm-up phase is not recorded.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::SeedableRng;
use tokio::task::JoinHandle;

use crate::conn::Conn;
use crate::cpu::{CpuProbe, CpuUsage};
use crate::error::BenchError;
use crate::progress::{LiveCounters, Progress, ProgressMode};
use crate::request::{Api, RequestFactory, Target};
use crate::stats::{Outcome, RunStats};
use crate::workload::{Consistency, KeyDist, KeySampler, Mix, Op};

/// Pause after a refused connection, so a dead target is not hammered in a tight loop.
const CONNECT_RETRY_DELAY: Duration = Duration::from_millis(20);

/// When the measured phase ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopAt {
    /// After this much time.
    Elapsed(Duration),
    /// After this many requests have been sent (and answered or failed).
    Requests(u64),
}

/// Everything one `kv-bench run` needs, validated.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The API requests speak.
    pub api: Api,
    /// Where requests go.
    pub target: Target,
    /// The processes whose CPU time the measured phase is charged.
    pub cpu: CpuProbe,
    /// Number of workers, each with one connection.
    pub conns: usize,
    /// End of the measured phase.
    pub stop: StopAt,
    /// Unrecorded load before the measured phase.
    pub warmup: Duration,
    /// Size of the key space.
    pub keys: u64,
    /// Keys are `{key_prefix}{index}`.
    pub key_prefix: String,
    /// Bytes of the JSON string written by each write.
    pub value_size: usize,
    /// Keys per listing page.
    pub list_limit: u32,
    /// Operation weights.
    pub mix: Mix,
    /// How keys are drawn.
    pub dist: KeyDist,
    /// `?w=` for writes and deletes, when given.
    pub w: Option<Consistency>,
    /// `?r=` for reads, when given.
    pub r: Option<Consistency>,
    /// Write every key once before the run.
    pub preload: bool,
    /// Deadline of one request, connecting included.
    pub timeout: Duration,
    /// Requests per second in total (open loop), or `None` for a closed loop.
    pub rate: Option<u64>,
    /// How progress is shown on stderr.
    pub progress: ProgressMode,
}

/// What a run measured.
#[derive(Debug)]
pub struct RunResult {
    /// Counts and latencies of the measured phase, merged across workers.
    pub stats: RunStats,
    /// Length of the measured phase.
    pub elapsed: Duration,
    /// What the preload did, when asked for.
    pub preload: Option<PreloadResult>,
    /// CPU time used during the measured phase, or why it could not be measured (a server
    /// process exited).
    pub cpu: Result<CpuUsage, String>,
}

/// Outcome of `--preload`.
#[derive(Debug, Clone, Copy)]
pub struct PreloadResult {
    /// Keys written successfully.
    pub written: u64,
    /// Keys whose write failed.
    pub failed: u64,
    /// Time the preload took.
    pub elapsed: Duration,
}

/// Phase of a run, shared by the workers and the progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Load runs, nothing is recorded.
    Warmup = 0,
    /// Load runs and is recorded.
    Measure = 1,
    /// Workers stop after their current request.
    Done = 2,
}

/// A [`Phase`] readable from many tasks without locking.
#[derive(Debug)]
pub struct PhaseCell(AtomicU8);

impl PhaseCell {
    fn new(phase: Phase) -> Self {
        PhaseCell(AtomicU8::new(phase as u8))
    }

    /// The current phase.
    pub fn get(&self) -> Phase {
        match self.0.load(Ordering::Acquire) {
            0 => Phase::Warmup,
            1 => Phase::Measure,
            _ => Phase::Done,
        }
    }

    fn set(&self, phase: Phase) {
        self.0.store(phase as u8, Ordering::Release);
    }
}

/// The shared send schedule of an open-loop run: request `n` is due at `start + n / rate`.
#[derive(Debug)]
struct Pacer {
    start: tokio::time::Instant,
    rate: f64,
    next: AtomicU64,
}

impl Pacer {
    fn new(rate: u64) -> Self {
        Pacer {
            start: tokio::time::Instant::now(),
            rate: rate as f64,
            next: AtomicU64::new(0),
        }
    }

    /// Claims the next slot of the schedule; returns when it is due.
    fn claim(&self) -> tokio::time::Instant {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.start + Duration::from_secs_f64(n as f64 / self.rate)
    }
}

/// What every worker shares.
#[derive(Debug)]
struct WorkerContext {
    api: Api,
    target: Target,
    timeout: Duration,
    requests: RequestFactory,
    mix: Mix,
    sampler: KeySampler,
    phase: Arc<PhaseCell>,
    live: Arc<LiveCounters>,
    /// Measured requests handed out so far (only used with [`StopAt::Requests`]).
    tickets: AtomicU64,
    ticket_limit: Option<u64>,
    pacer: Option<Pacer>,
}

impl WorkerContext {
    /// Shared state for the workers of `config`; the first phase is the warm-up, if any.
    fn new(config: &RunConfig, requests: RequestFactory) -> Result<Self, BenchError> {
        let first_phase = match config.warmup.is_zero() {
            true => Phase::Measure,
            false => Phase::Warmup,
        };
        Ok(WorkerContext {
            api: config.api,
            target: config.target.clone(),
            timeout: config.timeout,
            requests,
            mix: config.mix,
            sampler: KeySampler::new(config.dist, config.keys).map_err(BenchError::Invalid)?,
            phase: Arc::new(PhaseCell::new(first_phase)),
            live: Arc::new(LiveCounters::new(config.progress)),
            tickets: AtomicU64::new(0),
            ticket_limit: match config.stop {
                StopAt::Requests(n) => Some(n),
                StopAt::Elapsed(_) => None,
            },
            pacer: config.rate.map(Pacer::new),
        })
    }

    /// Whether a worker may send one more request in `phase`.
    fn may_send(&self, phase: Phase) -> bool {
        match (phase, self.ticket_limit) {
            (Phase::Done, _) => false,
            (Phase::Measure, Some(limit)) => self.tickets.fetch_add(1, Ordering::Relaxed) < limit,
            _ => true,
        }
    }
}

/// Runs the whole benchmark: optional preload, warm-up, measured phase.
pub async fn run(config: &RunConfig) -> Result<RunResult, BenchError> {
    let requests = RequestFactory::new(
        config.api,
        &config.target,
        &config.key_prefix,
        config.value_size,
        config.w,
        config.r,
        config.list_limit,
    );
    let preload = match config.preload {
        true => Some(preload(config, &requests).await?),
        false => None,
    };
    let ctx = Arc::new(WorkerContext::new(config, requests)?);
    let workers: Vec<_> = (0..config.conns)
        .map(|_| tokio::spawn(worker(Arc::clone(&ctx))))
        .collect();
    let progress = Progress::start(config, Arc::clone(&ctx.live), Arc::clone(&ctx.phase));
    tokio::time::sleep(config.warmup).await;
    // CPU is sampled right at the edges of the measured phase.
    let cpu_start = config.cpu.sample();
    ctx.phase.set(Phase::Measure);
    let start = Instant::now();
    let stats = match config.stop {
        StopAt::Elapsed(duration) => {
            tokio::time::sleep(duration).await;
            ctx.phase.set(Phase::Done);
            let elapsed = start.elapsed();
            let cpu_end = config.cpu.sample();
            // Requests still in flight finish (or time out) but are no longer recorded.
            (join_workers(workers).await?, elapsed, cpu_end)
        }
        StopAt::Requests(_) => {
            let stats = join_workers(workers).await?;
            (stats, start.elapsed(), config.cpu.sample())
        }
    };
    ctx.phase.set(Phase::Done);
    progress.finish();
    let (stats, elapsed, cpu_end) = stats;
    Ok(RunResult {
        stats,
        elapsed,
        preload,
        cpu: cpu_start.and_then(|start| Ok(config.cpu.usage(&start, &cpu_end?))),
    })
}

/// One closed-loop worker: pick an operation and a key, send, wait, record, repeat.
async fn worker(ctx: Arc<WorkerContext>) -> Result<RunStats, BenchError> {
    let mut stats = RunStats::new()?;
    let mut conn = Conn::new(ctx.target.addr, ctx.timeout, ctx.api);
    let mut rng = SmallRng::from_os_rng();
    loop {
        let started_in = ctx.phase.get();
        if !ctx.may_send(started_in) {
            return Ok(stats);
        }
        let op = ctx.mix.pick(&mut rng);
        let key = ctx.sampler.sample(&mut rng);
        let request = ctx.requests.build(op, key).map_err(|e| {
            BenchError::Invalid(format!("cannot build a {} request: {e}", op.name()))
        })?;
        let start = match &ctx.pacer {
            Some(pacer) => {
                let due = pacer.claim();
                tokio::time::sleep_until(due).await;
                due.into_std()
            }
            None => Instant::now(),
        };
        let outcome = conn.exchange(op, request).await;
        let latency = start.elapsed();
        ctx.live.count(outcome, latency);
        // Only requests that started and ended inside the measured phase count.
        if started_in == Phase::Measure && ctx.phase.get() == Phase::Measure {
            stats.record(op, outcome, latency);
        }
        if outcome == Outcome::Connect {
            tokio::time::sleep(CONNECT_RETRY_DELAY).await;
        }
    }
}

/// Waits for every worker and merges their results.
async fn join_workers(
    workers: Vec<JoinHandle<Result<RunStats, BenchError>>>,
) -> Result<RunStats, BenchError> {
    let mut total = RunStats::new()?;
    for handle in workers {
        let stats = handle
            .await
            .map_err(|e| BenchError::Invalid(format!("a worker stopped unexpectedly: {e}")))??;
        total.merge(&stats)?;
    }
    Ok(total)
}

/// Writes every key once, `conns` at a time, so that reads of the run find their keys.
async fn preload(
    config: &RunConfig,
    requests: &RequestFactory,
) -> Result<PreloadResult, BenchError> {
    let start = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let tasks = (config.conns as u64).clamp(1, config.keys.max(1));
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let conn = Conn::new(config.target.addr, config.timeout, config.api);
            tokio::spawn(preload_keys(
                conn,
                requests.clone(),
                Arc::clone(&next),
                config.keys,
            ))
        })
        .collect();
    let (mut written, mut failed) = (0, 0);
    for handle in handles {
        let (w, f) = handle.await.map_err(|e| {
            BenchError::Invalid(format!("a preload task stopped unexpectedly: {e}"))
        })??;
        written += w;
        failed += f;
    }
    Ok(PreloadResult {
        written,
        failed,
        elapsed: start.elapsed(),
    })
}

/// One preload task: writes the next unclaimed key until all `keys` are claimed;
/// returns how many writes succeeded and failed.
async fn preload_keys(
    mut conn: Conn,
    requests: RequestFactory,
    next: Arc<AtomicU64>,
    keys: u64,
) -> Result<(u64, u64), BenchError> {
    let (mut written, mut failed) = (0u64, 0u64);
    loop {
        let key = next.fetch_add(1, Ordering::Relaxed);
        if key >= keys {
            return Ok((written, failed));
        }
        let request = requests
            .build(Op::Write, key)
            .map_err(|e| BenchError::Invalid(format!("cannot build a preload request: {e}")))?;
        match conn.exchange(Op::Write, request).await {
            outcome if outcome.is_success() => written += 1,
            Outcome::Connect => {
                failed += 1;
                tokio::time::sleep(CONNECT_RETRY_DELAY).await;
            }
            _ => failed += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use http::{HeaderValue, StatusCode};
    use tokio::net::TcpListener;

    use super::*;
    use crate::limit_server;
    use crate::report::summarize;

    async fn limit_server(status: StatusCode) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(limit_server::serve(listener, status));
        addr
    }

    fn config(addr: SocketAddr, stop: StopAt, mix: &str) -> RunConfig {
        RunConfig {
            api: Api::Kv,
            target: Target {
                addr,
                host: HeaderValue::from_str(&addr.to_string()).unwrap(),
                base_path: String::new(),
            },
            cpu: CpuProbe::new(&[]).unwrap(),
            conns: 4,
            stop,
            warmup: Duration::from_millis(200),
            keys: 100,
            key_prefix: "t-".into(),
            value_size: 10,
            list_limit: 100,
            mix: mix.parse().unwrap(),
            dist: KeyDist::Zipf(0.99),
            w: Some(Consistency::Quorum),
            r: None,
            preload: false,
            timeout: Duration::from_secs(2),
            rate: None,
            progress: ProgressMode::Off,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn timed_run_against_the_limit_server_adds_up() {
        let addr = limit_server(StatusCode::OK).await;
        let mut config = config(
            addr,
            StopAt::Elapsed(Duration::from_secs(1)),
            "read=8,write=1,delete=1",
        );
        config.preload = true;
        let result = run(&config).await.unwrap();
        let preload = result.preload.unwrap();
        assert_eq!((preload.written, preload.failed), (100, 0));
        assert!(
            result.elapsed >= Duration::from_secs(1) && result.elapsed < Duration::from_secs(2)
        );
        let ops = summarize(&result.stats, &config.mix, result.elapsed).unwrap();
        let all = ops.last().unwrap();
        assert!(all.ok > 100, "only {} requests in 1 s", all.ok);
        assert_eq!((all.errors, all.not_found), (0, 0));
        assert_eq!(ops[..3].iter().map(|o| o.count).sum::<u64>(), all.count);
        assert_eq!(result.stats.total().unwrap().latency_us.len(), all.count);
        assert!(ops.iter().all(|o| o.count > 0), "every op of the mix ran");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paced_run_sends_at_the_rate_not_as_fast_as_it_can() {
        let addr = limit_server(StatusCode::OK).await;
        let mut config = config(addr, StopAt::Elapsed(Duration::from_secs(1)), "read=1");
        config.rate = Some(400);
        let result = run(&config).await.unwrap();
        let all = result.stats.total().unwrap();
        // 400/s for the measured second, give or take the requests at its two edges; the
        // limit server answers tens of thousands per second unpaced.
        assert!(
            (360..=440).contains(&all.ok),
            "{} requests at 400/s",
            all.ok
        );
        assert_eq!(all.error_count(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd_answers_are_read_from_their_bodies_and_cpu_is_charged() {
        // The limit server answers 200 with a body that has no `kvs`: to etcd reads that is
        // an empty range (not_found, a success), to etcd writes a success.
        let addr = limit_server(StatusCode::OK).await;
        let mut config = config(addr, StopAt::Requests(600), "read=1,write=1");
        (config.api, config.w) = (Api::Etcd, None);
        config.cpu = CpuProbe::new(&[crate::cpu::Process {
            name: "me".into(),
            pid: std::process::id(),
        }])
        .unwrap();
        let result = run(&config).await.unwrap();
        let stats = &result.stats;
        assert_eq!(stats.read.ok + stats.write.not_found, 0);
        assert_eq!(stats.read.not_found + stats.write.ok, 600);
        assert!(stats.read.not_found > 0 && stats.write.ok > 0);
        let usage = result.cpu.unwrap();
        assert_eq!(usage.servers.len(), 1);
        assert_eq!(usage.servers[0].name, "me");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn request_count_run_sends_exactly_that_many() {
        let addr = limit_server(StatusCode::OK).await;
        let result = run(&config(addr, StopAt::Requests(777), "read=1,write=1"))
            .await
            .unwrap();
        let all = result.stats.total().unwrap();
        assert_eq!((all.ok, all.error_count()), (777, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_errors_are_failures_not_throughput() {
        let addr = limit_server(StatusCode::SERVICE_UNAVAILABLE).await;
        let result = run(&config(
            addr,
            StopAt::Elapsed(Duration::from_millis(800)),
            "read=1,write=1",
        ))
        .await
        .unwrap();
        let all = result.stats.total().unwrap();
        assert_eq!((all.ok, all.not_found), (0, 0));
        assert!(all.errors["503"] > 50, "{:?}", all.errors);
        assert_eq!(all.errors.len(), 1, "{:?}", all.errors);
        assert_eq!(all.latency_us.len(), 0);
        let ops = summarize(
            &result.stats,
            &"read=1,write=1".parse().unwrap(),
            result.elapsed,
        )
        .unwrap();
        assert!(ops.iter().all(|o| o.throughput == 0.0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn not_found_is_fine_for_reads_and_deletes_only() {
        let addr = limit_server(StatusCode::NOT_FOUND).await;
        let stats = run(&config(
            addr,
            StopAt::Requests(600),
            "read=1,write=1,delete=1",
        ))
        .await
        .unwrap()
        .stats;
        assert_eq!(
            stats.read.not_found + stats.delete.not_found + stats.write.errors["404"],
            600
        );
        assert!(stats.read.not_found > 0 && stats.delete.not_found > 0);
        assert_eq!(
            (
                stats.read.error_count(),
                stats.write.ok,
                stats.write.not_found
            ),
            (0, 0, 0)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_connections_are_connect_errors() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let mut config = config(addr, StopAt::Elapsed(Duration::from_millis(300)), "read=1");
        config.warmup = Duration::ZERO;
        let all = run(&config).await.unwrap().stats.total().unwrap();
        assert_eq!(all.successes(), 0);
        assert!(all.errors["connect"] > 0, "{:?}", all.errors);
    }
}
