//! Prints the vnode table of `BENCH.md`: key balance and keys moved on a join, per vnode count.
//!
//! Run: `cargo run --release -p kv-ring --example vnode_table`

use std::io::{self, Write};
use std::time::Instant;

use kv_ring::Ring;

const KEYS: usize = 100_000;
const VNODE_COUNTS: [usize; 5] = [16, 64, 128, 256, 512];
/// Extra clusters (different host names) over which the worst balance is reported, so the
/// table does not hinge on one lucky set of URLs.
const CLUSTERS: usize = 20;

fn urls(cluster: usize, count: usize) -> Vec<String> {
    (1..=count)
        .map(|i| format!("http://10.0.{cluster}.{i}:{}", 8000 + i))
        .collect()
}

fn keys() -> impl Iterator<Item = String> {
    (0..KEYS).map(|i| format!("key-{i}"))
}

/// Busiest node's share divided by the idlest node's share of `keys()`.
fn max_over_min(ring: &Ring) -> f64 {
    let mut counts = vec![0usize; ring.len()];
    for key in keys() {
        if let Some(&primary) = ring.preference_list(&key, 1).first() {
            counts[primary] += 1;
        }
    }
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    let min = counts.iter().copied().min().unwrap_or(0).max(1) as f64;
    max / min
}

/// Percentage of `keys()` whose primary differs between the two rings.
fn moved_percent(before: &Ring, after: &Ring) -> f64 {
    let moved = keys()
        .filter(|key| before.primary(key) != after.primary(key))
        .count();
    100.0 * moved as f64 / KEYS as f64
}

fn worst_balance(nodes: usize, vnodes: usize) -> f64 {
    (0..CLUSTERS)
        .map(|cluster| max_over_min(&Ring::new(urls(cluster, nodes), vnodes)))
        .fold(0.0, f64::max)
}

fn row(vnodes: usize) -> String {
    let three = Ring::new(urls(0, 3), vnodes);
    let four = Ring::new(urls(0, 4), vnodes);
    let five = Ring::new(urls(0, 5), vnodes);
    let started = Instant::now();
    let hundred = Ring::new(urls(0, 100), vnodes);
    let build_100 = started.elapsed();
    // Each point costs a u64 hash plus a u32 owner index.
    let kib_100 = hundred.len() * vnodes * 12 / 1024;
    format!(
        "| {vnodes} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} % | {:.1} % | {:.2?} | {kib_100} |",
        max_over_min(&three),
        worst_balance(3, vnodes),
        max_over_min(&five),
        worst_balance(5, vnodes),
        moved_percent(&three, &four),
        moved_percent(&four, &five),
        build_100,
    )
}

fn main() -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{KEYS} keys; balance = busiest node's primary share / idlest node's; worst = over {CLUSTERS} clusters")?;
    writeln!(out, "| vnodes | 3 nodes | 3 worst | 5 nodes | 5 worst | moved 3->4 | moved 4->5 | build 100 nodes | KiB 100 nodes |")?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for vnodes in VNODE_COUNTS {
        writeln!(out, "{}", row(vnodes))?;
    }
    Ok(())
}
