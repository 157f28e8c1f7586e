//! Kill -9 of a random node every few seconds, restarted after a pause, under a recorded
//! read/write load through the LB: no acknowledged quorum write is lost, no read is impossible.

use kv_tests::faults::{
    chaos_duration, final_values, report, start_load, ChaosCluster, ChaosOptions, Load, Rng,
};
use kv_tests::history::History;
use std::time::{Duration, Instant};

#[test]
fn kill_9_of_random_nodes_under_load_loses_no_acknowledged_write() {
    let mut rng = Rng::for_scenario("kill9");
    let mut c = ChaosCluster::start(&ChaosOptions {
        lb: true,
        env: vec![("PEER_TIMEOUT_MS".into(), "1000".into())],
        ..ChaosOptions::default()
    });
    c.wait_converged(Duration::from_secs(15));
    let lb = c.lb.as_ref().unwrap().url.clone();
    let run_for = chaos_duration(Duration::from_secs(14));
    let history = History::new();
    let load = start_load(
        &Load {
            prefix: "kill".into(),
            ..Load::default()
        },
        &[lb],
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
    c.wait_converged(Duration::from_secs(15));
    c.wait_hints_delivered(Duration::from_secs(20));
    let finals = final_values(c.url(0), &history.keys(), "?r=all");
    let verdict = history.check(&finals);
    report(
        "kill9",
        &[
            ("secs", run_for.as_secs().to_string()),
            ("ops", verdict.ops.to_string()),
            ("faults", kills.to_string()),
            ("acked", verdict.acked.to_string()),
            ("failed_ops", verdict.failed.to_string()),
            ("lost", verdict.lost.len().to_string()),
            ("phantom", verdict.phantom.len().to_string()),
            ("stale", verdict.stale.to_string()),
        ],
    );
    assert!(verdict.acked > 50, "too little load to judge: {verdict:?}");
    assert!(kills >= 2, "only {kills} kills");
    assert!(verdict.lost.is_empty(), "lost writes: {:#?}", verdict.lost);
    assert!(
        verdict.phantom.is_empty(),
        "impossible reads: {:#?}",
        verdict.phantom
    );
}

/// Lets the load run for `d` between two faults (the schedule's pacing, not a wait for a state).
pub fn pace(d: Duration) {
    std::thread::sleep(d);
}
