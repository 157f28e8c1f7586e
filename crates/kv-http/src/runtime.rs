//! The async runtime both binaries run on, with `WORKER_THREADS` worker threads.
//!
//! One worker per core (tokio's default) suits a process that has the machine to itself. Several
//! kv processes on one machine (the local cluster of `scripts/cluster.sh`: three nodes and the load
//! balancer) each with a worker per core keep waking each other's idle workers to steal work they
//! do not need; on two cores, nodes with one worker each used 7-19 % less CPU per request than
//! with two (docs/PERFORMANCE.md, "Worker threads"). `cluster.sh` therefore gives each node its
//! share of the cores unless `WORKER_THREADS` is set.

/// Most worker threads `WORKER_THREADS` accepts.
pub const MAX_WORKER_THREADS: usize = 1024;

/// Worker threads when `WORKER_THREADS` is unset (or 0): one per core this process may use.
pub fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// A multi-thread runtime with `worker_threads` workers (at least 1), timers and I/O enabled.
/// The count is always given explicitly, so tokio never reads `TOKIO_WORKER_THREADS` (whose bad
/// values it would meet with a panic).
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads.clamp(1, MAX_WORKER_THREADS))
        .enable_all()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_has_the_workers_it_was_given() {
        for workers in [1, 3] {
            let rt = runtime(workers).expect("runtime");
            assert_eq!(rt.metrics().num_workers(), workers);
        }
        assert_eq!(runtime(0).expect("runtime").metrics().num_workers(), 1);
        assert!(default_worker_threads() >= 1);
    }
}
