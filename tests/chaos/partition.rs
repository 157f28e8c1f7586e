//! A partition that isolates one node both ways (black hole: connections hang), then heals:
//! the majority keeps serving quorum reads and writes, the minority acknowledges no quorum
//! write, after the heal every replica holds the newest version of every key, and the history
//! of racing reads, writes and deletes (final reads included) is linearizable.

use crate::kill::{assert_enough_load, pace};
use kv_tests::faults::{chaos_duration, ChaosCluster, ChaosOptions, Rng};
use kv_tests::history::{self, History, Kind, Outcome};
use kv_tests::load::{assert_linearizable, settle_and_check, start_load, Load};
use kv_tests::proxy::Link;
use kv_tests::wait_until;
use std::time::{Duration, Instant};

#[test]
fn an_isolated_node_catches_up_after_the_partition_heals_and_the_history_is_linearizable() {
    let mut rng = Rng::for_scenario("partition");
    let c = ChaosCluster::start(&ChaosOptions {
        proxied: true,
        env: vec![
            ("PEER_TIMEOUT_MS".into(), "1000".into()),
            ("HEALTH_CHECK_TIMEOUT_MS".into(), "300".into()),
            ("REQUEST_TIMEOUT_MS".into(), "4000".into()),
        ],
        ..ChaosOptions::default()
    });
    c.wait_converged(Duration::from_secs(15));
    let run_for = chaos_duration(Duration::from_secs(10));
    // One partition per 10 s of run time, each of a random node: before, during, after.
    let cycles = (run_for.as_secs() / 10).max(1) as usize;
    let phase = run_for / (4 * cycles as u32);
    let everyone: Vec<String> = (0..3).map(|i| c.url(i).to_owned()).collect();
    let history = History::new();
    // The isolated node's own writes: quorum ones must fail, `w=one` ones are kept. Recorded apart,
    // since `one` levels are not linearizable by contract.
    let probes = History::new();
    let load = Load {
        prefix: "part".into(),
        ..Load::default()
    };
    let (mut served, mut failed, mut minority_acked) = (0, 0, 0);
    let mut healed = Instant::now();
    for cycle in 0..cycles {
        // Before: everyone serves.
        start_load(
            &load,
            &everyone,
            &history,
            Instant::now() + phase,
            rng.next_u64(),
        )
        .join();

        // During: one node cut off from its peers; clients only use the majority...
        let minority = rng.below(3);
        let majority: Vec<String> = (0..3)
            .filter(|i| *i != minority)
            .map(|i| everyone[i].clone())
            .collect();
        c.isolate(minority, Link::Blackhole);
        eprintln!(
            "partition: cut {cycle} isolates entry {minority}; meanwhile entries 0 and 1 of the \
             process ids mean {majority:?}"
        );
        let cut_at = history.ops().len();
        let during = start_load(
            &load,
            &majority,
            &history,
            Instant::now() + 2 * phase,
            rng.next_u64(),
        );
        // ...and check what the isolated node itself answers meanwhile.
        minority_acked += probe_minority(c.url(minority), &probes, cycle);
        during.join();
        let during_ops: Vec<_> = history.ops().split_off(cut_at);
        served += during_ops.len();
        failed += during_ops
            .iter()
            .filter(|op| matches!(op.outcome, Outcome::Failed(_)))
            .count();

        c.heal();
        healed = Instant::now();
        // After: everyone again, while the hints flow.
        start_load(
            &load,
            &everyone,
            &history,
            Instant::now() + phase,
            rng.next_u64(),
        )
        .join();
    }
    c.wait_converged(Duration::from_secs(15));
    c.wait_hints_delivered(Duration::from_secs(20));
    let keys: Vec<String> = history.keys().into_iter().chain(probes.keys()).collect();
    wait_until(
        Duration::from_secs(20),
        "every replica holds the same, newest entry of every key",
        || {
            keys.iter().all(|key| {
                let entries: Vec<_> = (0..3).map(|i| c.local_entry(i, key)).collect();
                entries.iter().all(|e| *e == entries[0])
            })
        },
    );
    let converged_ms = healed.elapsed().as_millis();
    let verdict = settle_and_check(
        &c,
        "partition",
        &history,
        vec![
            ("secs", run_for.as_secs().to_string()),
            ("faults", cycles.to_string()),
            ("majority_failed", format!("{failed}/{served}")),
            ("minority_acked", minority_acked.to_string()),
            ("converged_ms", converged_ms.to_string()),
        ],
    );
    assert!(
        served > 20 && failed * 20 <= served,
        "the majority failed {failed} of {served} quorum operations during the partition"
    );
    assert_eq!(
        minority_acked, 0,
        "the isolated node acknowledged quorum writes"
    );
    assert_linearizable("partition", &verdict);
    assert_enough_load("partition", &history, 50);
}

/// Sends quorum writes (must not be acknowledged) and `w=one` writes (kept, and must reach
/// everyone after the heal) to the isolated node; returns how many quorum writes it acknowledged.
/// Their keys are outside the load's.
fn probe_minority(node: &str, history: &History, cycle: usize) -> usize {
    let client = history::load_client();
    let mut acked = 0;
    for i in 0..3 {
        let (key, value) = (format!("minority-q{i}"), format!("c{cycle}-q{i}"));
        let outcome = history.record(100, &key, Kind::Write(value.clone()), || {
            history::outcome_of(history::write(&client, node, &key, &value, ""), false)
        });
        if matches!(outcome, Outcome::Ok(_)) {
            acked += 1;
        }
        let (key, value) = (format!("minority-one{i}"), format!("c{cycle}-one{i}"));
        let outcome = history.record(101, &key, Kind::Write(value.clone()), || {
            history::outcome_of(history::write(&client, node, &key, &value, "?w=one"), false)
        });
        assert!(
            matches!(outcome, Outcome::Ok(_)),
            "w=one on the isolated node: {outcome:?}"
        );
        pace(Duration::from_millis(100));
    }
    acked
}
