//! Storage engine benchmarks, printed as a table: durable appends with group commit against the
//! disk's raw fsync rate, in-memory get/put, memory per key, checkpoint and recovery times.
//!
//! Run: `CARGO_TARGET_DIR=/work/target-core cargo bench -p kv-core` (set `KV_BENCH_DIR` to test
//! another disk; the default is the system temp folder). `KV_BENCH_ONLY=commit` prints only
//! the group-commit table: fsyncs and CPU per write with and without segment preallocation and
//! the batch delay, at 1, 4 and 32 writers back to back and 32 paced writers
//! (`KV_BENCH_SECS` per run, default 2).

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kv_core::map::ShardedMap;
use kv_core::{Record, Store, StoreConfig, SyncMode, Version};

const KEYS: u64 = 1_000_000;
const VALUE_LEN: usize = 100;
const DURABLE_SECS: u64 = 3;
const MEMORY_SECS: u64 = 1;

type BenchResult = Result<(), Box<dyn std::error::Error>>;

fn key(i: u64) -> String {
    format!("key{i:013}") // 16 bytes
}

fn out(line: &str) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

fn bench_dir() -> std::io::Result<tempfile::TempDir> {
    match std::env::var_os("KV_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir),
        None => tempfile::tempdir(),
    }
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    kb.unwrap_or(0) * 1024
}

/// Writes of 100 bytes, each followed by `sync_data`, for about two seconds.
fn raw_fsync_rate() -> Result<f64, Box<dyn std::error::Error>> {
    let dir = bench_dir()?;
    let mut file = std::fs::File::create(dir.path().join("fsync-probe"))?;
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(2) {
        file.write_all(&[7; VALUE_LEN])?;
        file.sync_data()?;
        n += 1;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// `writers` tasks each apply single-record puts in a loop for `DURABLE_SECS`.
async fn durable_rate(writers: usize) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let dir = bench_dir()?;
    let store = Store::open(StoreConfig::new(dir.path().to_owned(), 1))?;
    let deadline = Instant::now() + Duration::from_secs(DURABLE_SECS);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                let r = Record {
                    key: format!("w{w}/{i}"),
                    version: store.clock().tick(),
                    value: Some(Bytes::from_static(&[1; VALUE_LEN])),
                    expires_at_ms: None,
                };
                store.apply(vec![r]).await?;
                i += 1;
            }
            Ok::<u64, kv_core::Error>(i)
        });
    }
    let mut total = 0;
    while let Some(done) = tasks.join_next().await {
        total += done??;
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    let s = store.status();
    let per_fsync = s.wal_appends as f64 / s.wal_fsyncs.max(1) as f64;
    store.shutdown().await?;
    Ok((rate, per_fsync))
}

/// CPU time (user + system) this process has used, in microseconds (from `/proc/self/stat`,
/// clock ticks of 10 ms).
fn cpu_micros() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Fields 14 and 15 of the line (utime, stime) are 11 and 12 after the name.
    (ticks(11) + ticks(12)) * 10_000
}

/// One group-commit run: `writers` tasks apply single-record puts for `secs`; with `think`
/// each waits a random 0..2x`think` between its writes (independent clients at a low rate)
/// instead of writing back to back. Returns writes/s, fsyncs per write, CPU µs per write,
/// and the mean latency of a write in µs.
async fn commit_run(
    writers: usize,
    delay: Duration,
    prealloc: u64,
    think: Option<Duration>,
    secs: u64,
) -> Result<(f64, f64, f64, f64), Box<dyn std::error::Error>> {
    let dir = bench_dir()?;
    let mut config = StoreConfig::new(dir.path().to_owned(), 1);
    config.wal_batch_delay = delay;
    config.wal_prealloc_bytes = prealloc;
    let store = Store::open(config)?;
    // Let the checkpointer prepare its spare before measuring.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = store.status();
    let cpu_before = cpu_micros();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.spawn(async move {
            let mut i = 0u64;
            let mut waited = Duration::ZERO;
            let mut seed = (w as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            while Instant::now() < deadline {
                if let Some(think) = think {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let pause = think.mul_f64((seed % 2000) as f64 / 1000.0);
                    tokio::time::sleep(pause).await;
                }
                let r = Record {
                    key: format!("w{w}/{i}"),
                    version: store.clock().tick(),
                    value: Some(Bytes::from_static(&[1; VALUE_LEN])),
                    expires_at_ms: None,
                };
                let sent = Instant::now();
                store.apply(vec![r]).await?;
                waited += sent.elapsed();
                i += 1;
            }
            Ok::<(u64, Duration), kv_core::Error>((i, waited))
        });
    }
    let (mut total, mut waited) = (0, Duration::ZERO);
    while let Some(done) = tasks.join_next().await {
        let (n, w) = done??;
        total += n;
        waited += w;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_micros().saturating_sub(cpu_before) as f64;
    let after = store.status();
    let fsyncs = (after.wal_fsyncs - before.wal_fsyncs) as f64;
    store.shutdown().await?;
    let n = total.max(1) as f64;
    Ok((
        total as f64 / elapsed,
        fsyncs / n,
        cpu / n,
        waited.as_secs_f64() * 1e6 / n,
    ))
}

/// `KV_BENCH_ONLY=commit`: group commit with and without preallocation and batch delay.
async fn commit_table() -> BenchResult {
    let secs = std::env::var("KV_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    out("| writers | load | prealloc | delay µs | writes/s | fsyncs/write | CPU µs/write | mean latency µs |");
    out("|---:|---|---|---:|---:|---:|---:|---:|");
    let loads = [
        (1, None),
        (4, None),
        (32, None),
        (32, Some(Duration::from_millis(5))),
    ];
    for (writers, think) in loads {
        for (prealloc, delay) in [(0, 0), (64 << 20, 0), (64 << 20, 100), (64 << 20, 300)] {
            let (rate, fsyncs, cpu, latency) =
                commit_run(writers, Duration::from_micros(delay), prealloc, think, secs).await?;
            let load = match think {
                Some(t) => format!("paced, {} ms apart", t.as_millis()),
                None => "back to back".into(),
            };
            let prealloc = if prealloc > 0 { "64 MiB" } else { "off" };
            out(&format!(
                "| {writers} | {load} | {prealloc} | {delay} | {rate:.0} | {fsyncs:.2} | {cpu:.1} | {latency:.0} |"
            ));
        }
    }
    Ok(())
}

fn value_for(i: u64) -> Bytes {
    let mut v = vec![b'v'; VALUE_LEN];
    v[..8].copy_from_slice(&i.to_le_bytes());
    Bytes::from(v)
}

/// Runs `op(thread, i)` on `threads` threads for `MEMORY_SECS`; returns ops per second.
fn ops_rate(threads: u64, op: impl Fn(u64, u64) + Sync) -> f64 {
    let started = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let op = &op;
                s.spawn(move || {
                    let mut i = 0;
                    while started.elapsed() < Duration::from_secs(MEMORY_SECS) {
                        for _ in 0..1000 {
                            op(t, i);
                            i += 1;
                        }
                    }
                    i
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    total as f64 / started.elapsed().as_secs_f64()
}

fn memory_ops() {
    let map = Arc::new(ShardedMap::default());
    let keys: Vec<String> = (0..KEYS).map(key).collect();
    for (i, k) in (0..).zip(&keys) {
        map.apply(&Record {
            key: k.clone(),
            version: Version { hlc: 1, node: 1 },
            value: Some(value_for(i)),
            expires_at_ms: None,
        });
    }
    // Spread the threads' keys apart so they touch different shards most of the time.
    let spread = |t: u64, i: u64| ((i.wrapping_mul(7919) + t * (KEYS / 2)) % KEYS) as usize;
    for threads in [1, 2] {
        let gets = ops_rate(threads, |t, i| {
            std::hint::black_box(map.get(&keys[spread(t, i)]));
        });
        // A put brings its own key and value, as a request would: clone them from templates.
        let value = value_for(0);
        let puts = ops_rate(threads, |t, i| {
            let version = Version {
                hlc: 2 + i,
                node: t as u32,
            };
            map.apply(&Record {
                key: keys[spread(t, i)].clone(),
                version,
                value: Some(value.clone()),
                expires_at_ms: None,
            });
        });
        out(&format!(
            "| in-memory get, {threads} thread(s) | {:.2} M ops/s |",
            gets / 1e6
        ));
        out(&format!(
            "| in-memory put, {threads} thread(s) | {:.2} M ops/s |",
            puts / 1e6
        ));
    }
}

fn bulk_config(dir: &std::path::Path) -> StoreConfig {
    let mut config = StoreConfig::new(dir.to_owned(), 1);
    config.sync = SyncMode::Never;
    config.wal_max_bytes = u64::MAX;
    config.snapshot_interval = Duration::ZERO;
    config
}

/// Loads 1,000,000 keys: memory, WAL replay, checkpoint and snapshot recovery.
async fn million_keys() -> BenchResult {
    let dir = bench_dir()?;
    let before = rss_bytes();
    let store = Store::open(bulk_config(dir.path()))?;
    for chunk in 0..KEYS / 1000 {
        let records = (chunk * 1000..(chunk + 1) * 1000).map(|i| Record {
            key: key(i),
            version: store.clock().tick(),
            value: Some(value_for(i)),
            expires_at_ms: None,
        });
        store.apply(records.collect()).await?;
    }
    let raw = KEYS * (16 + VALUE_LEN as u64);
    let used = rss_bytes().saturating_sub(before);
    out(&format!("| RSS for 1,000,000 keys (16 B keys, 100 B values) | {:.0} MB = {:.2} x the {:.0} MB raw |", used as f64 / 1e6, used as f64 / raw as f64, raw as f64 / 1e6));
    drop(store); // crash: no checkpoint, everything is in the WAL
    let started = Instant::now();
    let store = Store::open(bulk_config(dir.path()))?;
    out(&format!(
        "| recovery, 1,000,000 keys from the WAL only | {:.2} s |",
        started.elapsed().as_secs_f64()
    ));
    let stats = store.checkpoint().await?;
    out(&format!(
        "| checkpoint, 1,000,000 keys ({:.0} MB snapshot) | {:.2} s |",
        stats.bytes as f64 / 1e6,
        stats.duration.as_secs_f64()
    ));
    store.shutdown().await?;
    drop(store);
    let started = Instant::now();
    let store = Store::open(bulk_config(dir.path()))?;
    out(&format!(
        "| recovery, 1,000,000 keys from the snapshot | {:.2} s |",
        started.elapsed().as_secs_f64()
    ));
    assert_eq!(store.status().keys, KEYS);
    Ok(())
}

fn main() -> BenchResult {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // KV_BENCH_ONLY=durable runs just the group-commit part (for profiling).
    let only_durable = std::env::var("KV_BENCH_ONLY").is_ok_and(|v| v == "durable");
    // KV_BENCH_ONLY=commit: preallocation and batch delay, fsyncs and CPU per write.
    if std::env::var("KV_BENCH_ONLY").is_ok_and(|v| v == "commit") {
        return rt.block_on(commit_table());
    }
    out("| benchmark | result |");
    out("|---|---|");
    if !only_durable {
        rt.block_on(million_keys())?;
    }
    let fsyncs = raw_fsync_rate()?;
    out(&format!(
        "| raw write+fsync (sync_data) rate of the disk | {fsyncs:.0} /s |"
    ));
    let mut single = 0.0;
    for writers in [1, 16, 64] {
        let (rate, per_fsync) = rt.block_on(durable_rate(writers))?;
        if writers == 1 {
            single = rate;
        }
        out(&format!(
            "| durable appends (SyncMode::Always), {writers} writers | {rate:.0} /s ({:.1} x 1 writer, {per_fsync:.1} appends per fsync) |",
            rate / single
        ));
    }
    if !only_durable {
        memory_ops();
    }
    Ok(())
}
