//! A slow node (300 ms added on each of its links, both ways): quorum writes and reads answered
//! by the two fast nodes take the fast quorum's time, not the slow node's.

use kv_tests::faults::{chaos_duration, percentile_ms, report, ChaosCluster, ChaosOptions};
use kv_tests::history;
use kv_tests::wait_until;
use std::time::{Duration, Instant};

const ADDED: Duration = Duration::from_millis(300);

#[test]
fn a_slow_node_does_not_set_the_latency_of_quorum_requests() {
    let c = ChaosCluster::start(&ChaosOptions {
        proxied: true,
        // The slow node must stay "up" (600 ms round trips): this is about slowness, not death.
        env: vec![
            ("HEALTH_CHECK_TIMEOUT_MS".into(), "3000".into()),
            ("PEER_TIMEOUT_MS".into(), "5000".into()),
        ],
        ..ChaosOptions::default()
    });
    c.wait_converged(Duration::from_secs(15));
    c.slow(2, ADDED);
    let client = history::load_client();
    // The fault is real: the slow node's own answers take two added delays.
    let started = Instant::now();
    assert_eq!(
        history::read(&client, c.url(2), "probe", "?r=one")
            .unwrap()
            .0,
        404
    );
    let probe = started.elapsed();
    assert!(probe >= 2 * ADDED, "the slow link answered in {probe:?}");

    let run_for = chaos_duration(Duration::from_secs(6));
    let deadline = Instant::now() + run_for;
    let (mut writes, mut reads, mut failures) = (Vec::new(), Vec::new(), 0);
    for i in 0..1_000_000 {
        if Instant::now() > deadline {
            break;
        }
        let node = c.url(i % 2);
        let key = format!("slow-{}", i % 40);
        let started = Instant::now();
        let wrote = history::write(&client, node, &key, &format!("v{i}"), "?w=quorum");
        writes.push(started.elapsed());
        let started = Instant::now();
        let read = history::read(&client, node, &key, "?r=quorum");
        reads.push(started.elapsed());
        let ok = |a: &Result<(u16, serde_json::Value), String>| matches!(a, Ok((200, _)));
        failures += usize::from(!ok(&wrote)) + usize::from(!ok(&read));
    }
    let (w50, w99) = (percentile_ms(&writes, 50), percentile_ms(&writes, 99));
    let (r50, r99) = (percentile_ms(&reads, 50), percentile_ms(&reads, 99));
    report(
        "slow_node",
        &[
            ("secs", run_for.as_secs().to_string()),
            ("ops", (writes.len() + reads.len()).to_string()),
            ("faults", "1".into()),
            (
                "acked",
                (writes.len() - failures.min(writes.len())).to_string(),
            ),
            ("failed_ops", failures.to_string()),
            ("added_ms", ADDED.as_millis().to_string()),
            ("write_p50_ms", w50.to_string()),
            ("write_p99_ms", w99.to_string()),
            ("read_p50_ms", r50.to_string()),
            ("read_p99_ms", r99.to_string()),
        ],
    );
    assert_eq!(failures, 0, "requests failed while a node was only slow");
    let half = ADDED.as_millis() / 2;
    assert!(
        w50 < half,
        "write p50 {w50} ms follows the slow node ({ADDED:?})"
    );
    assert!(
        r50 < half,
        "read p50 {r50} ms follows the slow node ({ADDED:?})"
    );

    // The slow node still gets every write, late.
    c.heal();
    wait_until(
        Duration::from_secs(20),
        "the slow node holds every key",
        || {
            (0..40).all(|k| {
                c.local_entry(2, &format!("slow-{k}")) == c.local_entry(0, &format!("slow-{k}"))
            })
        },
    );
}
