//! The history of a chaos run: every client operation with its start, end and result, and the
//! checker that decides from it whether an acknowledged write was lost or a read was impossible.
//!
//! # The model the checker assumes
//!
//! Each key has exactly one writer (a client thread that writes it sequentially), and every value
//! written is unique (`"<writer>-<seq>"`), so a read names the write it saw. Writes of one key are
//! thus totally ordered by their start time. The checker computes:
//!
//! - **lost write**: at the end (all nodes up, hints delivered), the key's value comes from a write
//!   older than its newest *acknowledged* write (or the key is missing). Must be 0.
//! - **phantom read**: a read returned a value no write of that key wrote, or one whose write
//!   started only after the read ended. Must be 0.
//! - **stale read**: a read returned write `j` (or nothing) although a later write `k > j` of the
//!   key had been acknowledged before the read started. With R + W > N and no failures this does
//!   not happen; around a failure it can (e.g. the LB moved a read while a hint was pending), so
//!   it is counted and reported rather than asserted.
//!
//! Writes that got anything but a 200 are *indeterminate*: they may or may not have been applied,
//! so a read may see them, but nothing requires that it does.

use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What one operation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A write of this unique value.
    Write(String),
    /// A delete (200 and 404 both succeed: afterwards the key is absent). `check` ignores
    /// deletes; `check_linearizable` treats them as writes of "absent".
    Delete,
    /// A read.
    Read,
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Write: 200. Read: 200 with this value, or 404 (`None`).
    Ok(Option<String>),
    /// Anything else (status or transport error): the write is indeterminate, the read void.
    Failed(String),
}

/// One client operation.
#[derive(Clone, Debug)]
pub struct Op {
    /// Which client thread did it.
    pub process: usize,
    /// The key.
    pub key: String,
    /// Write or read.
    pub kind: Kind,
    /// When it was sent, since the history began.
    pub start: Duration,
    /// When its answer arrived.
    pub end: Duration,
    /// Its result.
    pub outcome: Outcome,
}

/// A shared, append-only log of operations.
#[derive(Debug, Clone)]
pub struct History {
    epoch: Instant,
    ops: Arc<Mutex<Vec<Op>>>,
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}

/// What the checker found.
#[derive(Debug, Default, Clone)]
pub struct Verdict {
    /// Operations recorded.
    pub ops: usize,
    /// Writes attempted / acknowledged.
    pub writes: usize,
    /// Writes that got 200.
    pub acked: usize,
    /// Reads that got an answer (200 or 404).
    pub reads_ok: usize,
    /// Operations that failed (non-200/404 or transport error).
    pub failed: usize,
    /// One line per lost acknowledged write.
    pub lost: Vec<String>,
    /// One line per impossible read.
    pub phantom: Vec<String>,
    /// Reads older than a write acknowledged before they started.
    pub stale: usize,
}

impl History {
    /// An empty history starting now.
    pub fn new() -> History {
        History {
            epoch: Instant::now(),
            ops: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Runs `call` and records it with its start and end times.
    pub fn record(
        &self,
        process: usize,
        key: &str,
        kind: Kind,
        call: impl FnOnce() -> Outcome,
    ) -> Outcome {
        let start = self.epoch.elapsed();
        let outcome = call();
        let end = self.epoch.elapsed();
        self.ops.lock().expect("history lock").push(Op {
            process,
            key: key.to_owned(),
            kind,
            start,
            end,
            outcome: outcome.clone(),
        });
        outcome
    }

    /// A copy of every operation so far.
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().expect("history lock").clone()
    }

    /// Every key written so far.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .ops()
            .into_iter()
            .filter(|op| matches!(op.kind, Kind::Write(_) | Kind::Delete))
            .map(|op| op.key)
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// Checks that every key's reads and writes fit one real-time order (`linearizability.rs`).
    pub fn check_linearizable(&self) -> crate::linearizability::LinVerdict {
        crate::linearizability::check(&self.ops())
    }

    /// Checks the history against the final value of every key (`None` = missing).
    pub fn check(&self, finals: &HashMap<String, Option<String>>) -> Verdict {
        let ops = self.ops();
        let mut verdict = Verdict {
            ops: ops.len(),
            ..Verdict::default()
        };
        let writes = writes_by_key(&ops);
        for op in &ops {
            match (&op.kind, &op.outcome) {
                (Kind::Write(_) | Kind::Delete, Outcome::Ok(_)) => {
                    verdict.writes += 1;
                    verdict.acked += 1;
                }
                (Kind::Write(_) | Kind::Delete, Outcome::Failed(_)) => {
                    verdict.writes += 1;
                    verdict.failed += 1;
                }
                (Kind::Read, Outcome::Failed(_)) => verdict.failed += 1,
                (Kind::Read, Outcome::Ok(seen)) => {
                    verdict.reads_ok += 1;
                    let empty = Vec::new();
                    let key_writes = writes.get(&op.key).unwrap_or(&empty);
                    check_read(op, seen.as_deref(), key_writes, &mut verdict);
                }
            }
        }
        for (key, key_writes) in &writes {
            let last_acked = key_writes.iter().rposition(|w| w.acked);
            let Some(last_acked) = last_acked else {
                continue;
            };
            let final_value = finals.get(key).cloned().flatten();
            let at = final_value
                .as_deref()
                .and_then(|v| key_writes.iter().position(|w| w.value == v));
            match (final_value, at) {
                (None, _) => verdict.lost.push(format!(
                    "{key}: missing at the end; {} was acknowledged",
                    key_writes[last_acked].value
                )),
                (Some(v), None) => verdict
                    .phantom
                    .push(format!("{key}: ends with {v}, which nobody wrote")),
                (Some(v), Some(i)) if i < last_acked => verdict.lost.push(format!(
                    "{key}: ends with {v}, older than the acknowledged {}",
                    key_writes[last_acked].value
                )),
                _ => {}
            }
        }
        verdict
    }
}

/// A write as the checker sees it.
#[derive(Debug)]
struct Write<'a> {
    value: &'a str,
    start: Duration,
    end: Duration,
    acked: bool,
}

/// Each key's writes in order (one writer per key, so start order is the order).
fn writes_by_key(ops: &[Op]) -> HashMap<String, Vec<Write<'_>>> {
    let mut writers: HashMap<&str, usize> = HashMap::new();
    let mut writes: HashMap<String, Vec<Write<'_>>> = HashMap::new();
    for op in ops {
        if let Kind::Write(value) = &op.kind {
            let writer = *writers.entry(&op.key).or_insert(op.process);
            assert_eq!(writer, op.process, "{} has two writers", op.key);
            writes.entry(op.key.clone()).or_default().push(Write {
                value,
                start: op.start,
                end: op.end,
                acked: matches!(op.outcome, Outcome::Ok(_)),
            });
        }
    }
    for list in writes.values_mut() {
        list.sort_by_key(|w| w.start);
    }
    writes
}

fn check_read(op: &Op, seen: Option<&str>, writes: &[Write<'_>], verdict: &mut Verdict) {
    // Index of the write the read saw; -1 when it saw nothing.
    let seen_at: isize = match seen {
        None => -1,
        Some(value) => match writes.iter().position(|w| w.value == value) {
            Some(i) if writes[i].start <= op.end => i as isize,
            Some(_) => {
                verdict.phantom.push(format!(
                    "{}: read {value} at {:?}, before that write was sent",
                    op.key, op.end
                ));
                return;
            }
            None => {
                verdict
                    .phantom
                    .push(format!("{}: read {value}, which nobody wrote", op.key));
                return;
            }
        },
    };
    let newer_acked_before = writes
        .iter()
        .enumerate()
        .any(|(i, w)| i as isize > seen_at && w.acked && w.end < op.start);
    if newer_acked_before {
        verdict.stale += 1;
    }
}

/// Turns a data API answer into an outcome: the value as compact JSON text, 404 as `None`.
pub fn outcome_of(answer: Result<(u16, Value), String>, is_read: bool) -> Outcome {
    match answer {
        Ok((200, body)) if is_read => Outcome::Ok(body["value"].as_str().map(str::to_owned)),
        Ok((200, _)) => Outcome::Ok(None),
        Ok((404, _)) if is_read => Outcome::Ok(None),
        Ok((status, body)) => Outcome::Failed(format!("{status} {}", body["error"])),
        Err(e) => Outcome::Failed(e),
    }
}

/// Turns a delete's answer into an outcome: 200 and 404 both leave the key absent.
pub fn outcome_of_delete(answer: Result<(u16, Value), String>) -> Outcome {
    match answer {
        Ok((200 | 404, _)) => Outcome::Ok(None),
        Ok((status, body)) => Outcome::Failed(format!("{status} {}", body["error"])),
        Err(e) => Outcome::Failed(e),
    }
}

/// A client with pooled connections and short deadlines, one per load thread.
pub fn load_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(1))
        .build()
        .expect("http client")
}

/// `POST {base}/v1/{key}{query}` with `{"value": value}`; status and JSON body.
pub fn write(
    client: &reqwest::blocking::Client,
    base: &str,
    key: &str,
    value: &str,
    query: &str,
) -> Result<(u16, Value), String> {
    let response = client
        .post(format!("{base}/v1/{key}{query}"))
        .body(json!({ "value": value }).to_string())
        .send()
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response.json().unwrap_or(Value::Null);
    Ok((status, body))
}

/// `DELETE {base}/v1/{key}{query}`; status and JSON body.
pub fn delete(
    client: &reqwest::blocking::Client,
    base: &str,
    key: &str,
    query: &str,
) -> Result<(u16, Value), String> {
    let response = client
        .delete(format!("{base}/v1/{key}{query}"))
        .send()
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response.json().unwrap_or(Value::Null);
    Ok((status, body))
}

/// `GET {base}/v1/{key}{query}`; status and JSON body.
pub fn read(
    client: &reqwest::blocking::Client,
    base: &str,
    key: &str,
    query: &str,
) -> Result<(u16, Value), String> {
    let response = client
        .get(format!("{base}/v1/{key}{query}"))
        .send()
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response.json().unwrap_or(Value::Null);
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(process: usize, key: &str, kind: Kind, at: (u64, u64), outcome: Outcome) -> Op {
        Op {
            process,
            key: key.into(),
            kind,
            start: Duration::from_millis(at.0),
            end: Duration::from_millis(at.1),
            outcome,
        }
    }

    fn history(ops: Vec<Op>) -> History {
        let h = History::new();
        *h.ops.lock().unwrap() = ops;
        h
    }

    fn ok(v: Option<&str>) -> Outcome {
        Outcome::Ok(v.map(str::to_owned))
    }

    #[test]
    fn finds_lost_stale_and_phantom() {
        let h = history(vec![
            op(0, "k", Kind::Write("a".into()), (0, 10), ok(None)),
            op(0, "k", Kind::Write("b".into()), (20, 30), ok(None)),
            op(
                0,
                "k",
                Kind::Write("c".into()),
                (40, 50),
                Outcome::Failed("503".into()),
            ),
            op(1, "k", Kind::Read, (35, 36), ok(Some("a"))), // stale: b acked at 30
            op(1, "k", Kind::Read, (25, 26), ok(Some("a"))), // concurrent with b: fine
            op(1, "k", Kind::Read, (45, 46), ok(Some("c"))), // indeterminate write seen: fine
            op(1, "k", Kind::Read, (1, 2), ok(Some("b"))),   // b not sent yet: phantom
            op(1, "k", Kind::Read, (60, 61), ok(Some("zz"))), // never written: phantom
        ]);
        let finals = HashMap::from([("k".to_owned(), Some("a".to_owned()))]);
        let v = h.check(&finals);
        assert_eq!((v.ops, v.writes, v.acked, v.failed), (8, 3, 2, 1));
        assert_eq!(v.stale, 1);
        assert_eq!(v.phantom.len(), 2, "{:?}", v.phantom);
        assert_eq!(v.lost.len(), 1, "a is older than the acknowledged b");
        let fine = HashMap::from([("k".to_owned(), Some("c".to_owned()))]);
        assert!(
            h.check(&fine).lost.is_empty(),
            "a later, unacked write may win"
        );
        let missing = HashMap::new();
        assert_eq!(h.check(&missing).lost.len(), 1);
    }

    #[test]
    fn a_delete_is_a_write_of_absent_for_the_linearizability_checker() {
        let deleted = |read: Option<&str>| {
            history(vec![
                op(0, "k", Kind::Write("a".into()), (0, 10), ok(None)),
                op(1, "k", Kind::Delete, (20, 30), ok(None)),
                op(2, "k", Kind::Read, (40, 50), ok(read)),
            ])
            .check_linearizable()
            .answer()
        };
        assert_eq!(deleted(None), "yes");
        assert_eq!(
            deleted(Some("a")),
            "no",
            "a read after an acknowledged delete"
        );
        let failed_delete = history(vec![
            op(0, "k", Kind::Write("a".into()), (0, 10), ok(None)),
            op(
                1,
                "k",
                Kind::Delete,
                (20, 30),
                Outcome::Failed("504".into()),
            ),
            op(2, "k", Kind::Read, (40, 50), ok(None)),
            op(2, "k", Kind::Read, (60, 70), ok(Some("a"))),
        ]);
        assert_eq!(
            failed_delete.check_linearizable().answer(),
            "no",
            "a failed delete may take effect, but not be undone"
        );
        assert_eq!(
            outcome_of_delete(Ok((404, Value::Null))),
            ok(None),
            "404: the key is absent after the delete"
        );
    }
}
