//! SIGSTOP of a random node for a few seconds, then SIGCONT, one node at a time, under a recorded
//! load of racing reads, writes and deletes through the LB and every node. Requests sent to the
//! paused node wait in its socket backlog and are served late, after the others moved on: the
//! history, final reads included, must still be linearizable.

use crate::kill::{assert_enough_load, pace};
use kv_tests::faults::{chaos_duration, ChaosCluster, ChaosOptions, Rng};
use kv_tests::history::History;
use kv_tests::load::{assert_linearizable, settle_and_check, start_load, Load};
use std::time::{Duration, Instant};

#[test]
fn sigstop_of_a_replica_under_load_stays_linearizable() {
    let mut rng = Rng::for_scenario("sigstop");
    let c = ChaosCluster::start(&ChaosOptions {
        lb: true,
        env: vec![
            ("PEER_TIMEOUT_MS".into(), "1000".into()),
            ("HEALTH_CHECK_TIMEOUT_MS".into(), "300".into()),
        ],
        ..ChaosOptions::default()
    });
    c.wait_converged(Duration::from_secs(15));
    let run_for = chaos_duration(Duration::from_secs(14));
    let history = History::new();
    let load = start_load(
        &Load {
            prefix: "stop".into(),
            ..Load::default()
        },
        &c.every_entry(),
        &history,
        Instant::now() + run_for,
        rng.next_u64(),
    );
    let deadline = Instant::now() + run_for;
    let mut pauses = 0;
    // One node paused at a time; everyone sees everyone again before the next pause.
    while Instant::now() + Duration::from_secs(5) < deadline {
        pace(rng.between(Duration::from_millis(500), Duration::from_millis(1500)));
        let victim = rng.below(c.nodes.len());
        c.signal(victim, "STOP");
        pauses += 1;
        pace(rng.between(Duration::from_millis(2000), Duration::from_millis(4000)));
        c.signal(victim, "CONT");
        c.wait_converged(Duration::from_secs(15));
    }
    load.finish();
    let verdict = settle_and_check(
        &c,
        "sigstop",
        &history,
        vec![
            ("secs", run_for.as_secs().to_string()),
            ("faults", pauses.to_string()),
        ],
    );
    assert!(pauses >= 2, "only {pauses} pauses");
    assert_linearizable("sigstop", &verdict);
    assert_enough_load("sigstop", &history, 50);
}
