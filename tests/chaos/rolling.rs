//! Rolling restarts: each node in turn gets SIGTERM (it must exit 0 after finishing what it was
//! doing) and is started again, under a recorded load of racing reads, writes and deletes through
//! the LB and every node. The history, final reads included, must be linearizable: a restart
//! must neither lose an acknowledged write nor reissue a version.

use crate::kill::{assert_enough_load, pace};
use kv_tests::faults::{chaos_duration, ChaosCluster, ChaosOptions, Rng};
use kv_tests::history::History;
use kv_tests::load::{assert_linearizable, settle_and_check, start_load, Load};
use std::time::{Duration, Instant};

/// A bound on the restarts of one run, besides its duration.
const MAX_RESTARTS: usize = 1000;

#[test]
fn rolling_restarts_under_load_stay_linearizable() {
    let mut rng = Rng::for_scenario("rolling");
    let mut c = ChaosCluster::start(&ChaosOptions {
        lb: true,
        env: vec![("PEER_TIMEOUT_MS".into(), "1000".into())],
        ..ChaosOptions::default()
    });
    c.wait_converged(Duration::from_secs(15));
    let run_for = chaos_duration(Duration::from_secs(15));
    let history = History::new();
    let started = Instant::now();
    let load = start_load(
        &Load {
            prefix: "roll".into(),
            ..Load::default()
        },
        &c.every_entry(),
        &history,
        // Every node restarts at least once, however short the run.
        started + run_for.max(Duration::from_secs(60)),
        rng.next_u64(),
    );
    let deadline = started + run_for;
    let n = c.nodes.len();
    let mut restarts = 0;
    while restarts < MAX_RESTARTS
        && (restarts < n || Instant::now() + Duration::from_secs(4) < deadline)
    {
        pace(rng.between(Duration::from_millis(500), Duration::from_millis(1500)));
        let node = &mut c.nodes[restarts % n];
        let status = node.terminate();
        assert!(
            status.success(),
            "{} exited with {status} after SIGTERM:\n{}",
            node.name,
            node.log_tail()
        );
        node.restart();
        restarts += 1;
        c.wait_converged(Duration::from_secs(15));
    }
    pace(Duration::from_millis(500));
    load.finish();
    let verdict = settle_and_check(
        &c,
        "rolling",
        &history,
        vec![
            ("secs", started.elapsed().as_secs().to_string()),
            ("faults", restarts.to_string()),
        ],
    );
    assert_linearizable("rolling", &verdict);
    assert_enough_load("rolling", &history, 50);
}
