//! Tests of the linearizability checker: hand-made histories it must reject or accept, property
//! tests against sequential and simulated concurrent registers, and a long concurrent history.

use super::*;
use crate::history::History;
use proptest::prelude::*;

/// An operation on `key` by `process` over `[start, end]` milliseconds.
fn op(process: usize, key: &str, action: Action, (start, end): (u64, u64), ok: bool) -> RegisterOp {
    let end = Duration::from_millis(end);
    RegisterOp {
        process,
        key: key.to_owned(),
        action,
        start: Duration::from_millis(start),
        ending: if ok {
            Ending::Returned(end)
        } else {
            Ending::Indeterminate {
                answered: end,
                reason: "504 timeout".into(),
            }
        },
    }
}

fn write(p: usize, value: &str, at: (u64, u64)) -> RegisterOp {
    op(p, "k", Action::Write(Some(value.into())), at, true)
}

fn failed_write(p: usize, value: &str, at: (u64, u64)) -> RegisterOp {
    op(p, "k", Action::Write(Some(value.into())), at, false)
}

fn delete(p: usize, at: (u64, u64), ok: bool) -> RegisterOp {
    op(p, "k", Action::Write(None), at, ok)
}

fn read(p: usize, seen: Option<&str>, at: (u64, u64)) -> RegisterOp {
    op(p, "k", Action::Read(seen.map(str::to_owned)), at, true)
}

fn verdict(ops: &[RegisterOp]) -> LinVerdict {
    check_register_ops(ops, &Limits::default())
}

/// Asserts a violation whose culprit line contains `culprit`.
fn assert_rejects(ops: &[RegisterOp], culprit: &str) -> Violation {
    let v = verdict(ops);
    assert_eq!(v.answer(), "no", "{v}");
    let violation = v.violation().expect("a violation").clone();
    let line = &violation.ops[violation.culprit];
    assert!(
        line.contains(culprit),
        "culprit {line}, expected {culprit}\n{v}"
    );
    violation
}

fn assert_accepts(ops: &[RegisterOp]) {
    let v = verdict(ops);
    assert_eq!(v.answer(), "yes", "{v}");
    assert!(v.is_linearizable());
}

#[test]
fn rejects_a_stale_read() {
    let ops = [
        write(0, "a", (0, 10)),
        write(0, "b", (20, 30)),
        read(1, Some("a"), (40, 50)),
    ];
    let violation = assert_rejects(&ops, "read -> a");
    assert!(
        violation.explanation.contains("holding b"),
        "{}",
        violation.explanation
    );
}

#[test]
fn rejects_a_lost_acknowledged_write() {
    assert_rejects(
        &[write(0, "a", (0, 10)), read(1, None, (20, 30))],
        "read -> none",
    );
    // Lost under an older value: b was acknowledged, a later read still sees a.
    assert_rejects(
        &[
            write(0, "a", (0, 10)),
            read(1, Some("a"), (12, 14)),
            write(2, "b", (15, 30)),
            read(1, Some("a"), (31, 35)),
        ],
        "p1 read -> a [0.031s",
    );
}

#[test]
fn rejects_a_read_of_a_value_never_written() {
    let violation = assert_rejects(
        &[write(0, "a", (0, 10)), read(1, Some("zz"), (5, 30))],
        "read -> zz",
    );
    assert!(violation.explanation.contains("no write of k wrote"));
}

#[test]
fn rejects_a_read_of_a_value_written_only_after_it() {
    let violation = assert_rejects(
        &[read(1, Some("a"), (0, 10)), write(0, "a", (20, 30))],
        "read -> a",
    );
    assert!(
        violation.explanation.contains("started only at 0.020s"),
        "{}",
        violation.explanation
    );
}

#[test]
fn rejects_new_then_old_reads_while_the_write_runs() {
    // The write spans both reads: either may see it, but once one did, a later one must too.
    assert_rejects(
        &[
            write(0, "new", (0, 100)),
            read(1, Some("new"), (10, 20)),
            read(2, None, (30, 40)),
        ],
        "p2 read -> none",
    );
    assert_rejects(
        &[
            write(0, "old", (0, 5)),
            write(0, "new", (10, 100)),
            read(1, Some("new"), (20, 30)),
            read(1, Some("old"), (40, 50)),
        ],
        "p1 read -> old",
    );
    // The same reads in the other order are fine.
    assert_accepts(&[
        write(0, "new", (0, 100)),
        read(1, None, (10, 20)),
        read(2, Some("new"), (30, 40)),
    ]);
}

#[test]
fn accepts_either_value_for_a_read_concurrent_with_a_write() {
    for seen in ["a", "b"] {
        assert_accepts(&[
            write(0, "a", (0, 10)),
            write(0, "b", (20, 40)),
            read(1, Some(seen), (25, 35)),
        ]);
        assert_accepts(&[
            write(0, "a", (0, 10)),
            read(1, Some(seen), (15, 50)),
            write(0, "b", (20, 30)),
        ]);
    }
    // Two concurrent writers: readers may see them in either order, but all in the same one.
    assert_accepts(&[
        write(0, "a", (0, 50)),
        write(1, "b", (0, 50)),
        read(2, Some("b"), (10, 20)),
        read(2, Some("a"), (30, 40)),
        read(3, Some("a"), (60, 70)),
    ]);
    assert_rejects(
        &[
            write(0, "a", (0, 50)),
            write(1, "b", (0, 50)),
            read(2, Some("b"), (10, 20)),
            read(2, Some("a"), (30, 40)),
            read(3, Some("b"), (60, 70)),
        ],
        "p3 read -> b",
    );
}

#[test]
fn accepts_an_indeterminate_write_seen_later() {
    assert_accepts(&[
        write(0, "a", (0, 10)),
        failed_write(0, "b", (20, 30)),
        read(1, Some("a"), (40, 50)),
        // Took effect after the client gave up.
        read(1, Some("b"), (60, 70)),
        read(2, Some("b"), (80, 90)),
    ]);
}

#[test]
fn accepts_an_indeterminate_write_never_seen() {
    assert_accepts(&[
        write(0, "a", (0, 10)),
        failed_write(0, "b", (20, 30)),
        failed_write(0, "c", (40, 50)),
        read(1, Some("a"), (60, 70)),
    ]);
}

#[test]
fn an_indeterminate_write_takes_effect_at_most_once() {
    assert_rejects(
        &[
            write(0, "a", (0, 10)),
            failed_write(0, "b", (20, 30)),
            read(1, Some("b"), (40, 50)),
            write(0, "c", (55, 58)),
            read(1, Some("b"), (60, 70)),
        ],
        "p1 read -> b [0.060s",
    );
    // Nor can it take effect before its call.
    assert_rejects(
        &[
            write(0, "a", (0, 10)),
            read(1, Some("b"), (11, 13)),
            failed_write(0, "b", (14, 30)),
        ],
        "p1 read -> b",
    );
}

#[test]
fn deletes_are_writes_of_nothing() {
    assert_accepts(&[
        write(0, "a", (0, 10)),
        delete(0, (20, 30), true),
        read(1, None, (40, 50)),
    ]);
    assert_rejects(
        &[
            write(0, "a", (0, 10)),
            delete(0, (20, 30), true),
            read(1, Some("a"), (40, 50)),
        ],
        "read -> a",
    );
    // Failed deletes share the value "absent": any of them may explain a read of nothing, each once.
    assert_accepts(&[
        write(0, "a", (0, 10)),
        delete(0, (20, 30), false),
        delete(0, (31, 32), false),
        read(1, None, (40, 50)),
        write(0, "b", (51, 52)),
        read(1, None, (60, 70)),
    ]);
    assert_rejects(
        &[
            write(0, "a", (0, 10)),
            delete(0, (20, 30), false),
            read(1, None, (40, 50)),
            write(0, "b", (51, 52)),
            read(1, None, (60, 70)),
        ],
        "p1 read -> none [0.060s",
    );
    // Only a delete called before the read ended can explain it.
    assert_rejects(
        &[
            write(0, "a", (0, 10)),
            read(1, None, (11, 13)),
            delete(0, (14, 30), false),
        ],
        "p1 read -> none",
    );
}

#[test]
fn keys_are_checked_apart_and_the_report_names_the_bad_one() {
    let on = |key: &str, mut op: RegisterOp| {
        op.key = key.to_owned();
        op
    };
    let mut ops = vec![
        on("x", write(0, "x1", (0, 10))),
        on("y", write(1, "y1", (5, 15))),
        on("x", read(2, Some("x1"), (12, 20))),
        on("y", read(2, None, (8, 9))),
        on("y", read(3, Some("y1"), (16, 18))),
    ];
    let v = verdict(&ops);
    assert_eq!((v.answer(), v.ops, v.keys.len()), ("yes", 5, 2), "{v}");
    ops.push(on("y", read(3, None, (20, 25))));
    let v = verdict(&ops);
    assert_eq!(v.answer(), "no", "{v}");
    assert_eq!(v.violation().expect("a violation").key, "y");
    assert!(matches!(v.keys["x"], KeyVerdict::Linearizable));
    // The first violation is the one whose culprit answered first.
    ops.push(on("x", read(3, Some("zz"), (21, 22))));
    assert_eq!(verdict(&ops).violation().expect("a violation").key, "x");
}

#[test]
fn the_search_budget_gives_unknown_rather_than_running_on() {
    let ops = [
        write(0, "a", (0, 10)),
        write(1, "b", (0, 10)),
        read(2, Some("b"), (20, 30)),
    ];
    let limits = Limits {
        max_states_per_key: 1,
        max_time: Duration::from_secs(5),
    };
    let v = check_register_ops(&ops, &limits);
    assert_eq!(v.answer(), "unknown", "{v}");
    assert!(v.to_string().contains("gave up"), "{v}");
    let expired = Limits {
        max_states_per_key: 1_000_000,
        max_time: Duration::ZERO,
    };
    let long = simulate(7, 4, 1_000, "k");
    assert_eq!(check_register_ops(&long, &expired).answer(), "unknown");
}

#[test]
fn report_lines_and_display() {
    let mut op = write(3, "v17", (12_003, 12_040));
    assert_eq!(line(&op), "p3 write v17 [12.003s..12.040s] ok");
    op.ending = Ending::Indeterminate {
        answered: Duration::from_millis(12_040),
        reason: "503 unavailable".into(),
    };
    assert_eq!(
        line(&op),
        "p3 write v17 [12.003s..12.040s] failed, may take effect: 503 unavailable"
    );
    let v = verdict(&[write(0, "a", (0, 10)), read(1, None, (20, 30))]);
    let text = v.to_string();
    assert!(text.starts_with("linearizable: no (1 keys, 2 operations)\nkey k: "));
    assert!(
        text.contains("  p1 read -> none [0.020s..0.030s] ok   <- here"),
        "{text}"
    );
}

#[test]
fn checks_recorded_history_ops() {
    let at = |ms: u64| Duration::from_millis(ms);
    let recorded = |process, kind, (start, end), outcome| Op {
        process,
        key: "k".into(),
        kind,
        start: at(start),
        end: at(end),
        outcome,
    };
    let mut ops = vec![
        recorded(0, Kind::Write("a".into()), (0, 10), Outcome::Ok(None)),
        recorded(
            0,
            Kind::Write("b".into()),
            (20, 30),
            Outcome::Failed("504".into()),
        ),
        recorded(1, Kind::Read, (40, 50), Outcome::Ok(Some("b".into()))),
        recorded(1, Kind::Read, (60, 70), Outcome::Failed("timeout".into())),
    ];
    let v = check(&ops);
    assert_eq!((v.answer(), v.ops), ("yes", 3), "{v}");
    ops.push(recorded(
        1,
        Kind::Read,
        (80, 90),
        Outcome::Ok(Some("a".into())),
    ));
    assert_eq!(check(&ops).answer(), "no");

    let history = History::new();
    history.record(0, "k", Kind::Write("a".into()), || Outcome::Ok(None));
    history.record(1, "k", Kind::Read, || Outcome::Ok(Some("a".into())));
    assert_eq!(history.check_linearizable().answer(), "yes");
    history.record(1, "k", Kind::Read, || Outcome::Ok(None));
    assert_eq!(history.check_linearizable().answer(), "no");
}

#[test]
fn a_long_concurrent_history_is_accepted() {
    // 2,000 operations on one key from 8 clients, with failed writes and deletes.
    let ops = simulate(2024, 8, 250, "k");
    assert_eq!(ops.len(), 2_000);
    let v = verdict(&ops);
    assert_eq!(v.answer(), "yes", "{v}");
}

/// A small deterministic generator (splitmix64) for the simulations.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..=max`.
    fn upto(&mut self, max: u64) -> u64 {
        self.next() % (max + 1)
    }
}

/// A history of a real linearizable register on `key`: `processes` clients each run `per_process`
/// operations one after another (40 % writes, 5 % deletes, the rest reads). Each operation takes
/// effect at a random instant inside its interval; 10 % of writes and deletes fail, and take
/// effect at a random instant after their call (up to well after the failure) or not at all.
/// Reads return what the register held at their instant. Times in microseconds.
fn simulate(seed: u64, processes: usize, per_process: usize, key: &str) -> Vec<RegisterOp> {
    let mut rng = SplitMix(seed);
    let mut ops = Vec::with_capacity(processes * per_process);
    let mut effects: Vec<(u64, usize)> = Vec::new();
    for process in 0..processes {
        let mut clock = rng.upto(50);
        for n in 0..per_process {
            let start = clock + 1 + rng.upto(20);
            let end = start + 1 + rng.upto(60);
            clock = end;
            let roll = rng.upto(99);
            let action = match roll {
                0..40 => Action::Write(Some(format!("v{process}-{n}"))),
                40..45 => Action::Write(None),
                _ => Action::Read(None),
            };
            let failed = roll < 45 && rng.upto(9) == 0;
            let effect = match (failed, rng.upto(1)) {
                (false, _) => Some(start + rng.upto(end - start)),
                (true, 0) => Some(start + rng.upto(3 * (end - start))),
                (true, _) => None,
            };
            if let Some(instant) = effect {
                effects.push((instant, ops.len()));
            }
            let answered = Duration::from_micros(end);
            ops.push(RegisterOp {
                process,
                key: key.to_owned(),
                action,
                start: Duration::from_micros(start),
                ending: if failed {
                    Ending::Indeterminate {
                        answered,
                        reason: "504 timeout".into(),
                    }
                } else {
                    Ending::Returned(answered)
                },
            });
        }
    }
    effects.sort();
    let mut register: Option<String> = None;
    for (_, i) in effects {
        match &mut ops[i].action {
            Action::Write(value) => register.clone_from(value),
            Action::Read(seen) => seen.clone_from(&register),
        }
    }
    ops
}

/// One operation of a sequential history: what it does (0..=4 write, 5..=8 read, 9 delete), the
/// pause before it and its duration (ms), and which client runs it.
type Step = (u8, u64, u64, usize);

/// A sequential history of a register (no two operations overlap) and, per operation, the value
/// the register held when it ran.
fn sequential(steps: &[Step]) -> (Vec<RegisterOp>, Vec<Option<String>>) {
    let mut clock = 0;
    let mut register: Option<String> = None;
    let mut ops = Vec::new();
    let mut held = Vec::new();
    for (n, &(what, pause, took, process)) in steps.iter().enumerate() {
        let at = (clock + pause, clock + pause + took);
        clock = at.1;
        held.push(register.clone());
        let op = match what {
            0..=4 => write(process, &format!("v{n}"), at),
            9 => delete(process, at, true),
            _ => read(process, register.as_deref(), at),
        };
        if let Action::Write(value) = &op.action {
            register.clone_from(value);
        }
        ops.push(op);
    }
    (ops, held)
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec((0u8..10, 1u64..20, 1u64..20, 0usize..4), 1..60)
}

proptest! {
    #[test]
    fn sequential_register_histories_are_accepted(steps in steps()) {
        let (ops, _) = sequential(&steps);
        let v = verdict(&ops);
        prop_assert_eq!(v.answer(), "yes", "{}", v);
    }

    #[test]
    fn a_sequential_read_of_a_value_not_current_is_rejected(
        steps in steps(),
        which in any::<prop::sample::Index>(),
        other in any::<prop::sample::Index>(),
    ) {
        let (mut ops, held) = sequential(&steps);
        let reads: Vec<usize> = (0..ops.len())
            .filter(|&i| matches!(ops[i].action, Action::Read(_)))
            .collect();
        prop_assume!(!reads.is_empty());
        let i = *which.get(&reads);
        // Any value but the current one: another written value, nothing, or a value never written.
        let wrong: Vec<Option<String>> = ops
            .iter()
            .filter_map(|op| match &op.action {
                Action::Write(value) => Some(value.clone()),
                Action::Read(_) => None,
            })
            .chain([None, Some("never-written".to_owned())])
            .filter(|value| *value != held[i])
            .collect();
        ops[i].action = Action::Read(other.get(&wrong).clone());
        let v = verdict(&ops);
        prop_assert_eq!(v.answer(), "no", "{}", v);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn simulated_concurrent_histories_are_accepted(
        seed in any::<u64>(),
        processes in 1usize..=8,
        per_process in 1usize..40,
        keys in 1usize..=3,
    ) {
        let ops: Vec<RegisterOp> = (0..keys)
            .flat_map(|k| simulate(seed ^ k as u64, processes, per_process, &format!("key{k}")))
            .collect();
        let v = verdict(&ops);
        prop_assert_eq!(v.answer(), "yes", "{}", v);
        prop_assert_eq!(v.keys.len(), keys);
    }
}

/// Brute force: tries every order of the operations that respects real time (an operation that
/// returned before another started comes first), placing each indeterminate write or leaving it
/// out. Exponential: small histories only.
fn linearizable_by_brute_force(ops: &[RegisterOp]) -> bool {
    fn ends(op: &RegisterOp) -> Option<Duration> {
        match op.ending {
            Ending::Returned(end) => Some(end),
            Ending::Indeterminate { .. } => None,
        }
    }
    fn search(ops: &[RegisterOp], left: &mut Vec<usize>, register: &Option<String>) -> bool {
        if left.iter().all(|&i| ends(&ops[i]).is_none()) {
            return true;
        }
        for n in 0..left.len() {
            let i = left[n];
            let blocked = left
                .iter()
                .any(|&j| ends(&ops[j]).is_some_and(|end| end < ops[i].start));
            let after = match &ops[i].action {
                _ if blocked => continue,
                Action::Write(value) => value.clone(),
                Action::Read(seen) if seen == register => seen.clone(),
                Action::Read(_) => continue,
            };
            left.remove(n);
            let found = search(ops, left, &after);
            left.insert(n, i);
            if found {
                return true;
            }
        }
        false
    }
    // Failed reads tell nothing; failed writes may also never happen, which the search cannot
    // express by placing, so it may leave them out at the end (all-indeterminate `left`) or
    // anywhere: try every subset of them left out.
    let ops: Vec<RegisterOp> = ops
        .iter()
        .filter(|op| {
            !matches!(
                (&op.action, &op.ending),
                (Action::Read(_), Ending::Indeterminate { .. })
            )
        })
        .cloned()
        .collect();
    let failed: Vec<usize> = (0..ops.len())
        .filter(|&i| ends(&ops[i]).is_none())
        .collect();
    (0..1u32 << failed.len()).any(|dropped| {
        let mut left: Vec<usize> = (0..ops.len())
            .filter(|i| {
                failed
                    .iter()
                    .position(|f| f == i)
                    .is_none_or(|bit| dropped & (1 << bit) == 0)
            })
            .collect();
        search(&ops, &mut left, &None)
    })
}

/// A small random history, linearizable or not: 2 or 3 clients, values from a pool of three,
/// reads returning any of them or nothing, some writes and deletes failed (times in ms).
fn small_history() -> impl Strategy<Value = Vec<RegisterOp>> {
    let one = (0usize..3, 0u8..4, 0u8..10, 0u64..6, 1u64..8, any::<bool>());
    prop::collection::vec(one, 1..8).prop_map(|steps| {
        let mut clocks = [0u64; 3];
        steps
            .into_iter()
            .map(|(process, value, what, pause, took, failed)| {
                let start = clocks[process] + pause;
                clocks[process] = start + took + 1;
                let value = (value > 0).then(|| format!("v{value}"));
                let at = (start, start + took);
                match what {
                    0..=3 => op(process, "k", Action::Write(value), at, !failed),
                    _ => op(process, "k", Action::Read(value), at, true),
                }
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn agrees_with_brute_force_on_small_histories(ops in small_history()) {
        let v = verdict(&ops);
        let expected = if linearizable_by_brute_force(&ops) { "yes" } else { "no" };
        prop_assert_eq!(v.answer(), expected, "{}", v);
    }
}
