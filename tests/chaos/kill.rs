//! Kill -9 of a random node every few seconds, restarted after a pause, under a recorded load of
//! racing reads, writes and deletes through the LB and every node: the history, final reads
//! included, must be linearizable (no acknowledged write lost, no stale or impossible read).

use kv_tests::faults::{chaos_duration, ChaosCluster, ChaosOptions, Rng};
use kv_tests::history::History;
use kv_tests::load::{assert_linearizable, settle_and_check, start_load, Load};
use std::time::{Duration, Instant};

#[test]
fn kill_9_of_random_nodes_under_load_stays_linearizable() {
    let mut rng = Rng::for_scenario("kill9");
    let mut c = ChaosCluster::start(&ChaosOptions {
        lb: true,
        env: vec![("PEER_TIMEOUT_MS".into(), "1000".into())],
        ..ChaosOptions::default()
    });
    c.wait_converged(Duration::from_secs(15));
    let run_for = chaos_duration(Duration::from_secs(14));
    let history = History::new();
    let load = start_load(
        &Load {
            prefix: "kill".into(),
            ..Load::default()
        },
        &c.every_entry(),
        &history,
        Instant::now() + run_for,
        rng.next_u64(),
    );
    let deadline = Instant::now() + run_for;
    let mut kills = 0;
    // One node down at a time: kill, pause, restart, wait until everyone sees everyone.
    while Instant::now() + Duration::from_secs(3) < deadline {
        pace(rng.between(Duration::from_millis(800), Duration::from_millis(2000)));
        let victim = rng.below(c.nodes.len());
        c.nodes[victim].kill9();
        kills += 1;
        pace(rng.between(Duration::from_millis(500), Duration::from_millis(2000)));
        c.nodes[victim].restart();
        c.wait_converged(Duration::from_secs(15));
    }
    load.finish();
    let verdict = settle_and_check(
        &c,
        "kill9",
        &history,
        vec![
            ("secs", run_for.as_secs().to_string()),
            ("faults", kills.to_string()),
        ],
    );
    assert!(kills >= 2, "only {kills} kills");
    assert_linearizable("kill9", &verdict);
    assert_enough_load("kill9", &history, 50);
}

/// Lets the load run for `d` between two faults (the schedule's pacing, not a wait for a state).
pub fn pace(d: Duration) {
    std::thread::sleep(d);
}

/// Fails when fewer than `least` writes were acknowledged: too little load to judge anything.
pub fn assert_enough_load(scenario: &str, history: &History, least: usize) {
    let acked = history
        .ops()
        .iter()
        .filter(|op| {
            !matches!(op.kind, kv_tests::history::Kind::Read)
                && matches!(op.outcome, kv_tests::history::Outcome::Ok(_))
        })
        .count();
    assert!(
        acked >= least,
        "{scenario}: only {acked} writes acknowledged, too little load to judge"
    );
}
