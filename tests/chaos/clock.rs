//! Clock skew with libfaketime (which must be installed: these tests fail, never pass, without it):
//!
//! - two LBs, one with its wall clock 30 s fast: for 40 pairs of writes to one key, A through one
//!   LB and, after its 200, B through the other, every later quorum read through both LBs and
//!   every node returns B; in both orders (the fast LB first, the fast LB second);
//! - a recorded load of racing reads, writes and deletes through two LBs (one +30 s) and three
//!   nodes (one -30 s): the history, final reads included, must be linearizable.
//!
//! Each test checks first that the skew took effect (the `Date` header of the skewed process).

use crate::kill::assert_enough_load;
use kv_tests::faults::{chaos_duration, report, ChaosCluster, ChaosOptions, Rng};
use kv_tests::history::{self, History};
use kv_tests::load::{assert_linearizable, settle_and_check, start_load, Load};
use kv_tests::skew::{assert_clock_offset, faketime_env};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How far the skewed processes' wall clocks are moved, in seconds.
const SKEW_SECS: i64 = 30;
/// How far a measured offset may be from the intended one (the `Date` header has 1 s steps).
const TOLERANCE_SECS: i64 = 3;
/// Pairs of writes per order in the two-LB test.
const PAIRS: usize = 40;

#[test]
fn a_later_write_through_another_lb_wins_whatever_the_lb_clocks() {
    let c = ChaosCluster::start(&ChaosOptions {
        lb: true,
        lb_env: vec![Vec::new(), faketime_env(SKEW_SECS)],
        ..ChaosOptions::default()
    });
    c.wait_converged(Duration::from_secs(15));
    let lbs = c.lb_urls();
    let (normal, fast) = (&lbs[0], &lbs[1]);
    assert_clock_offset(normal, 0, TOLERANCE_SECS);
    assert_clock_offset(fast, SKEW_SECS, TOLERANCE_SECS);
    let readers = c.every_entry();
    let normal_first = lost_second_writes(&readers, "skew-normal-first", normal, fast);
    let fast_first = lost_second_writes(&readers, "skew-fast-first", fast, normal);
    report(
        "two_lb_skew",
        &[
            ("faults", "1".into()),
            ("pairs", PAIRS.to_string()),
            ("failed_normal_then_fast", normal_first.len().to_string()),
            ("failed_fast_then_normal", fast_first.len().to_string()),
        ],
    );
    assert!(
        normal_first.is_empty() && fast_first.is_empty(),
        "writes through two LBs, one {SKEW_SECS} s fast, did not all succeed in order:\n\
         A through the normal LB, then B through the fast one: {} of {PAIRS} pairs failed \
         (a write refused, or a read not returning B), first ones:\n{}\n\
         A through the fast LB, then B through the normal one: {} of {PAIRS} pairs failed, \
         first ones:\n{}",
        normal_first.len(),
        first_lines(&normal_first),
        fast_first.len(),
        first_lines(&fast_first)
    );
}

/// The first few of `lines`, indented, for a failure message of readable size.
fn first_lines(lines: &[String]) -> String {
    lines
        .iter()
        .take(5)
        .map(|line| format!("  {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Writes `PAIRS` pairs to `key`: A through `first`, then (after its 200) B through `second`, then
/// reads it at `r=quorum` through every one of `readers`. Returns one line per failed pair: a
/// write not answered 200, or some read that did not return B (naming what each reader returned).
fn lost_second_writes(readers: &[String], key: &str, first: &str, second: &str) -> Vec<String> {
    let client = history::load_client();
    let mut failed = Vec::new();
    for pair in 0..PAIRS {
        let (a, b) = (format!("a{pair}"), format!("b{pair}"));
        let refused = [(&a, first), (&b, second)]
            .into_iter()
            .find_map(
                |(value, via)| match history::write(&client, via, key, value, "") {
                    Ok((200, _)) => None,
                    Ok((status, body)) => {
                        Some(format!("writing {value} through {via}: {status} {body}"))
                    }
                    Err(e) => Some(format!("writing {value} through {via}: {e}")),
                },
            );
        if let Some(refused) = refused {
            failed.push(format!("pair {pair}: {refused}"));
            continue;
        }
        let seen: Vec<String> = readers
            .iter()
            .map(
                |reader| match history::read(&client, reader, key, "?r=quorum") {
                    Ok((200, body)) => body["value"].as_str().unwrap_or("?").to_owned(),
                    Ok((status, body)) => format!("{status} {}", body["error"]),
                    Err(e) => e,
                },
            )
            .collect();
        if seen.iter().any(|v| *v != b) {
            let what: Vec<String> = readers
                .iter()
                .zip(&seen)
                .map(|(reader, v)| format!("{reader} -> {v}"))
                .collect();
            failed.push(format!("pair {pair} (B = {b}): {}", what.join(", ")));
        }
    }
    failed
}

#[test]
fn clock_skew_of_an_lb_and_a_node_under_load_stays_linearizable() {
    let mut rng = Rng::for_scenario("clock_skew");
    let c = ChaosCluster::start(&ChaosOptions {
        lb: true,
        lb_env: vec![Vec::new(), faketime_env(SKEW_SECS)],
        node_env: HashMap::from([(2, faketime_env(-SKEW_SECS))]),
        ..ChaosOptions::default()
    });
    c.wait_converged(Duration::from_secs(15));
    let lbs = c.lb_urls();
    assert_clock_offset(&lbs[0], 0, TOLERANCE_SECS);
    assert_clock_offset(&lbs[1], SKEW_SECS, TOLERANCE_SECS);
    assert_clock_offset(c.url(0), 0, TOLERANCE_SECS);
    assert_clock_offset(c.url(2), -SKEW_SECS, TOLERANCE_SECS);
    let run_for = chaos_duration(Duration::from_secs(12));
    let history = History::new();
    let load = start_load(
        &Load {
            prefix: "skew".into(),
            ..Load::default()
        },
        &c.every_entry(),
        &history,
        Instant::now() + run_for,
        rng.next_u64(),
    );
    load.join();
    let verdict = settle_and_check(
        &c,
        "clock_skew",
        &history,
        vec![
            ("secs", run_for.as_secs().to_string()),
            ("faults", "2".into()),
        ],
    );
    assert_linearizable("clock_skew", &verdict);
    assert_enough_load("clock_skew", &history, 50);
}
