//! The recorded load of the chaos scenarios: client threads that read, write and delete the same
//! few keys through every way in (LBs and nodes), each operation recorded in a [`History`]; the
//! final reads once the faults are over; and the linearizability verdict each scenario prints
//! for `scripts/chaos.sh` and asserts.

use crate::faults::{report, ChaosCluster, Rng};
use crate::history::{self, History, Kind, Outcome};
use crate::linearizability::LinVerdict;
use crate::wait_until;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The shape of a recorded load: several client threads reading, writing and deleting the same
/// few keys, so that writes to one key really race and the linearizability checker has something
/// to judge. Every value written is unique (`w<worker>-<n>`), so a read names the write it saw.
#[derive(Debug, Clone)]
pub struct Load {
    /// Client threads.
    pub workers: usize,
    /// Keys every worker uses (`<prefix>-0`, `<prefix>-1`, ...): few, so that writes overlap.
    pub keys: usize,
    /// Per mille of operations that are writes.
    pub write_permille: u64,
    /// Per mille of operations that are deletes (the rest are reads).
    pub delete_permille: u64,
    /// Query string of writes and deletes, e.g. `""` (the default levels) or `"?w=quorum"`.
    pub write_query: String,
    /// Query string of reads.
    pub read_query: String,
    /// Most operations per worker (a bound besides `stop`).
    pub max_ops_per_worker: usize,
    /// Pause between two operations of one worker, to leave the two cores to the nodes.
    pub pace: Duration,
    /// Prefix of every key, so loads of one test do not share keys.
    pub prefix: String,
}

impl Default for Load {
    fn default() -> Self {
        Load {
            workers: 4,
            keys: 12,
            write_permille: 400,
            delete_permille: 50,
            write_query: String::new(),
            read_query: String::new(),
            max_ops_per_worker: 100_000,
            pace: Duration::from_millis(5),
            prefix: "k".into(),
        }
    }
}

/// Numbers the values of every load of this process, so no two writes ever carry the same value.
static NEXT_VALUE: AtomicU64 = AtomicU64::new(0);

/// A running load; [`Running::finish`] stops it now, [`Running::join`] lets it run to its end.
#[derive(Debug)]
pub struct Running {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl Running {
    /// Waits until the workers stop by themselves (deadline or operation budget).
    pub fn join(self) {
        for worker in self.workers {
            worker.join().expect("load worker");
        }
    }

    /// Stops the workers (each finishes its current operation) and waits for them.
    pub fn finish(self) {
        self.stop.store(true, Ordering::SeqCst);
        for worker in self.workers {
            worker.join().expect("load worker");
        }
    }
}

/// Starts `load` against `targets` (worker `w` uses `targets[(w + op) % len]`), recording
/// into `history`; it stops by itself at `deadline` or after its operation budget.
pub fn start_load(
    load: &Load,
    targets: &[String],
    history: &History,
    deadline: Instant,
    seed: u64,
) -> Running {
    let stop = Arc::new(AtomicBool::new(false));
    let workers = (0..load.workers)
        .map(|w| {
            let (load, targets, history, stop) = (
                load.clone(),
                targets.to_vec(),
                history.clone(),
                Arc::clone(&stop),
            );
            let rng = Rng::from_seed(seed.wrapping_add(w as u64 * 7919));
            std::thread::spawn(move || {
                run_worker(w, &load, &targets, &history, &stop, deadline, rng)
            })
        })
        .collect();
    Running { stop, workers }
}

/// One client thread of [`start_load`]: one operation at a time, each recorded.
fn run_worker(
    w: usize,
    load: &Load,
    targets: &[String],
    history: &History,
    stop: &AtomicBool,
    deadline: Instant,
    mut rng: Rng,
) {
    let client = history::load_client();
    for op in 0..load.max_ops_per_worker {
        if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
            return;
        }
        let entry = (w + op) % targets.len();
        let (target, process) = (&targets[entry], process_id(w, entry));
        let key = format!("{}-{}", load.prefix, rng.below(load.keys));
        let dice = rng.next_u64() % 1000;
        if dice < load.write_permille {
            let value = format!("w{w}-{}", NEXT_VALUE.fetch_add(1, Ordering::Relaxed));
            history.record(process, &key, Kind::Write(value.clone()), || {
                let answer = history::write(&client, target, &key, &value, &load.write_query);
                history::outcome_of(answer, false)
            });
        } else if dice < load.write_permille + load.delete_permille {
            history.record(process, &key, Kind::Delete, || {
                history::outcome_of_delete(history::delete(
                    &client,
                    target,
                    &key,
                    &load.write_query,
                ))
            });
        } else {
            history.record(process, &key, Kind::Read, || {
                let answer = history::read(&client, target, &key, &load.read_query);
                history::outcome_of(answer, true)
            });
        }
        std::thread::sleep(load.pace);
    }
}

/// The process id of worker `w`'s operations through `targets[entry]`: `100 * w + entry`, so a
/// report line (`p203 write ...`) says which way in the operation took.
fn process_id(w: usize, entry: usize) -> usize {
    100 * w + entry
}

/// Process ids of the final reads: `FINAL_READER + <index of the target>`.
pub const FINAL_READER: usize = 9000;

/// Reads every key of `history` through each of `targets` with `query` (e.g. `""`: the default
/// quorum) and records the reads in it, so the checker judges them with the rest: once the faults
/// are over, an acknowledged write that was lost, or an entry that serves an older value than
/// another, shows up as a violation. A failed read is recorded (it tells nothing) and retried for
/// a bounded time; a key that no read gets through `within` fails the test.
pub fn record_final_reads(history: &History, targets: &[String], query: &str, within: Duration) {
    let client = history::load_client();
    for key in history.keys() {
        for (t, target) in targets.iter().enumerate() {
            wait_until(
                within,
                &format!("a final read of {key} through {target}"),
                || {
                    let outcome = history.record(FINAL_READER + t, &key, Kind::Read, || {
                        history::outcome_of(history::read(&client, target, &key, query), true)
                    });
                    matches!(outcome, Outcome::Ok(_))
                },
            );
        }
    }
}

/// What the process ids of a load through `targets` mean, for the report: `names[i]` names
/// `targets[i]` (e.g. `lb2`, `node3`).
pub fn legend(targets: &[String], names: &[String]) -> String {
    let entries: Vec<String> = targets
        .iter()
        .zip(names)
        .enumerate()
        .map(|(i, (url, name))| format!("{i} = {name} {url}"))
        .collect();
    format!(
        "process p<100 * worker + entry> went through entry {}; p{FINAL_READER}+entry are the \
         final reads",
        entries.join(", ")
    )
}

/// Checks `history` for linearizability and prints the verdict for `scripts/chaos.sh`: a line
/// `CHAOS-LINEARIZABLE scenario=<scenario> verdict=<yes|no|unknown>`, then `legend` and the
/// checker's report (on `no` the first violating key and its operations), each line prefixed
/// with `CHAOS-LIN-REPORT <scenario> | `.
pub fn check_linearizable(scenario: &str, history: &History, legend: &str) -> LinVerdict {
    let started = Instant::now();
    let verdict = history.check_linearizable();
    let mut text = format!(
        "CHAOS-LINEARIZABLE scenario={scenario} verdict={} check_ms={}\n",
        verdict.answer(),
        started.elapsed().as_millis()
    );
    for line in std::iter::once(legend).chain(verdict.to_string().lines()) {
        text.push_str(&format!("CHAOS-LIN-REPORT {scenario} | {line}\n"));
    }
    eprint!("{text}");
    verdict
}

/// Fails the test when the checker found a violation, with its report (the first violating key
/// and its operations); an `unknown` verdict (the search gave up) is only reported.
pub fn assert_linearizable(scenario: &str, verdict: &LinVerdict) {
    assert!(
        verdict.violation().is_none(),
        "{scenario}: the history is not linearizable:\n{verdict}"
    );
    assert!(
        verdict.ops > 0,
        "{scenario}: an empty history proves nothing"
    );
}

/// The end of every history-recording scenario: waits until every node sees its running peers
/// (hints may still be pending: quorum reads must not need them), reads every key through every
/// LB and node at the default levels, checks the whole history, prints the verdict and the
/// `CHAOS-RESULT` line (`figures` plus `ops`, `acked`, `failed_ops` and `linearizable`), and
/// returns the verdict for the scenario to assert with [`assert_linearizable`].
pub fn settle_and_check(
    c: &ChaosCluster,
    scenario: &str,
    history: &History,
    mut figures: Vec<(&str, String)>,
) -> LinVerdict {
    c.wait_converged(Duration::from_secs(20));
    let entries = c.every_entry();
    record_final_reads(history, &entries, "", Duration::from_secs(15));
    let names: Vec<String> = (1..=c.lb_urls().len())
        .map(|i| format!("lb{i}"))
        .chain(c.nodes.iter().map(|n| n.name.clone()))
        .collect();
    let verdict = check_linearizable(scenario, history, &legend(&entries, &names));
    let ops = history.ops();
    let acked = ops
        .iter()
        .filter(|op| !matches!(op.kind, Kind::Read) && matches!(op.outcome, Outcome::Ok(_)))
        .count();
    let failed = ops
        .iter()
        .filter(|op| matches!(op.outcome, Outcome::Failed(_)))
        .count();
    figures.extend([
        ("ops", ops.len().to_string()),
        ("acked", acked.to_string()),
        ("failed_ops", failed.to_string()),
        ("linearizable", verdict.answer().to_owned()),
    ]);
    report(scenario, &figures);
    verdict
}
