//! Linearizability checker for per-key read/write registers (Herlihy & Wing): decides whether the
//! reads, writes and deletes of a client history fit one order that respects real time, each key
//! being a register that starts absent. Recording the history is `history.rs`'s job; the search
//! itself lives in `linearizability/search.rs`.

mod search;

use crate::history::{Kind, Op, Outcome};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

/// What an operation did to its key's register.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Set the register: `Some(value)` for a write, `None` for a delete.
    Write(Option<String>),
    /// Read the register and got this (`None`: the key was absent).
    Read(Option<String>),
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Answered with success at this time.
    Returned(Duration),
    /// Failed at this time (timeout, 503, 504, transport error). A write may have taken effect at
    /// any moment after its start, even after this answer, or never; a read tells nothing and is
    /// ignored.
    Indeterminate {
        /// When the failure was seen.
        answered: Duration,
        /// What the client got.
        reason: String,
    },
}

/// One operation on one key: the checker's input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterOp {
    /// Which client did it (for the report only: real time already orders a client's operations).
    pub process: usize,
    /// The register.
    pub key: String,
    /// Write, delete or read, with the value.
    pub action: Action,
    /// When it was sent.
    pub start: Duration,
    /// How and when it ended.
    pub ending: Ending,
}

/// How far the search may go before it answers `Unknown` instead of running on.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Distinct search states (set of placed operations, register value) explored per key.
    pub max_states_per_key: usize,
    /// Wall-clock time for the whole check, all keys together.
    pub max_time: Duration,
}

impl Default for Limits {
    /// Generous for histories of a few thousand operations per key; a few hundred MB at most.
    fn default() -> Self {
        Limits {
            max_states_per_key: 500_000,
            max_time: Duration::from_secs(30),
        }
    }
}

/// The verdict for one key.
#[derive(Clone, Debug)]
pub enum KeyVerdict {
    /// Some order of the operations respects real time and register semantics.
    Linearizable,
    /// No such order exists.
    Violation(Violation),
    /// The search hit its limits first.
    Unknown(String),
}

/// Why a key's history is not linearizable.
#[derive(Clone, Debug)]
pub struct Violation {
    /// The key.
    pub key: String,
    /// One or two sentences a human can act on.
    pub explanation: String,
    /// Every operation of the key, by start time, one line each (`p3 write v17 [12.003s..12.040s] ok`).
    pub ops: Vec<String>,
    /// Index in `ops` of the operation that no valid order can place.
    pub culprit: usize,
    /// When the culprit answered: the earliest culprit is the "first" violation.
    pub at: Duration,
}

/// The verdict for a whole history.
#[derive(Clone, Debug, Default)]
pub struct LinVerdict {
    /// Operations checked (failed reads are not counted: they tell nothing).
    pub ops: usize,
    /// One verdict per key.
    pub keys: BTreeMap<String, KeyVerdict>,
}

/// How many lines of a violating key's history `Display` prints before and after the culprit.
const REPORT_LINES_BEFORE: usize = 20;
const REPORT_LINES_AFTER: usize = 5;

impl LinVerdict {
    /// True when every key is linearizable.
    pub fn is_linearizable(&self) -> bool {
        self.keys
            .values()
            .all(|v| matches!(v, KeyVerdict::Linearizable))
    }

    /// The violation whose culprit answered first, if any.
    pub fn violation(&self) -> Option<&Violation> {
        self.keys
            .values()
            .filter_map(|v| match v {
                KeyVerdict::Violation(violation) => Some(violation),
                _ => None,
            })
            .min_by_key(|v| v.at)
    }

    /// Keys the search gave up on, with the reason.
    pub fn unknown(&self) -> Vec<(&str, &str)> {
        self.keys
            .iter()
            .filter_map(|(key, v)| match v {
                KeyVerdict::Unknown(reason) => Some((key.as_str(), reason.as_str())),
                _ => None,
            })
            .collect()
    }

    /// `yes`, `no` (some key has a violation) or `unknown` (none has, but the search gave up on one).
    pub fn answer(&self) -> &'static str {
        if self.violation().is_some() {
            "no"
        } else if self.is_linearizable() {
            "yes"
        } else {
            "unknown"
        }
    }
}

impl fmt::Display for LinVerdict {
    /// `linearizable: yes|no|unknown (K keys, N operations)`, then the first violation with the
    /// key's operations around it, or the keys the search gave up on.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "linearizable: {} ({} keys, {} operations)",
            self.answer(),
            self.keys.len(),
            self.ops
        )?;
        if let Some(violation) = self.violation() {
            return write!(f, "{violation}");
        }
        for (key, reason) in self.unknown() {
            writeln!(f, "key {key}: {reason}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "key {}: {}", self.key, self.explanation)?;
        let from = self.culprit.saturating_sub(REPORT_LINES_BEFORE);
        let to = (self.culprit + REPORT_LINES_AFTER + 1).min(self.ops.len());
        if from > 0 {
            writeln!(f, "  ... {from} earlier operations")?;
        }
        for (i, line) in self.ops.iter().enumerate().take(to).skip(from) {
            let mark = if i == self.culprit { "   <- here" } else { "" };
            writeln!(f, "  {line}{mark}")?;
        }
        if to < self.ops.len() {
            writeln!(f, "  ... {} later operations", self.ops.len() - to)?;
        }
        Ok(())
    }
}

/// Checks a recorded history with the default limits.
pub fn check(ops: &[Op]) -> LinVerdict {
    check_register_ops(&register_ops(ops), &Limits::default())
}

/// The checker's view of recorded operations: a write is a write of `Some(value)`, a delete one of
/// `None`, a read that failed is dropped, a write or delete that failed is indeterminate.
pub fn register_ops(ops: &[Op]) -> Vec<RegisterOp> {
    ops.iter()
        .filter_map(|op| {
            let (action, ending) = match (&op.kind, &op.outcome) {
                (Kind::Read, Outcome::Failed(_)) => return None,
                (Kind::Read, Outcome::Ok(seen)) => {
                    (Action::Read(seen.clone()), Ending::Returned(op.end))
                }
                (Kind::Write(value), Outcome::Ok(_)) => {
                    (Action::Write(Some(value.clone())), Ending::Returned(op.end))
                }
                (Kind::Write(value), Outcome::Failed(reason)) => (
                    Action::Write(Some(value.clone())),
                    Ending::Indeterminate {
                        answered: op.end,
                        reason: reason.clone(),
                    },
                ),
                (Kind::Delete, Outcome::Ok(_)) => (Action::Write(None), Ending::Returned(op.end)),
                (Kind::Delete, Outcome::Failed(reason)) => (
                    Action::Write(None),
                    Ending::Indeterminate {
                        answered: op.end,
                        reason: reason.clone(),
                    },
                ),
            };
            Some(RegisterOp {
                process: op.process,
                key: op.key.clone(),
                action,
                start: op.start,
                ending,
            })
        })
        .collect()
}

/// Checks every key on its own (a history is linearizable iff each key's sub-history is).
pub fn check_register_ops(ops: &[RegisterOp], limits: &Limits) -> LinVerdict {
    let deadline = Instant::now() + limits.max_time;
    let mut by_key: BTreeMap<&str, Vec<&RegisterOp>> = BTreeMap::new();
    for op in ops {
        let failed_read = matches!(
            (&op.action, &op.ending),
            (Action::Read(_), Ending::Indeterminate { .. })
        );
        if !failed_read {
            by_key.entry(&op.key).or_default().push(op);
        }
    }
    let mut verdict = LinVerdict::default();
    for (key, mut key_ops) in by_key {
        key_ops.sort_by_key(|op| op.start);
        verdict.ops += key_ops.len();
        let key_verdict = impossible_read(key, &key_ops).unwrap_or_else(|| {
            search::check_key(&key_ops, limits.max_states_per_key, deadline)
                .into_verdict(key, &key_ops)
        });
        verdict.keys.insert(key.to_owned(), key_verdict);
    }
    verdict
}

/// A read that no order can explain on its own: it names a value nobody wrote, or one whose
/// every write started after the read had ended. Caught by the search as well, but explained
/// better here.
fn impossible_read(key: &str, ops: &[&RegisterOp]) -> Option<KeyVerdict> {
    let mut first_start: HashMap<&str, Duration> = HashMap::new();
    for op in ops {
        if let Action::Write(Some(value)) = &op.action {
            first_start.entry(value).or_insert(op.start);
        }
    }
    ops.iter().enumerate().find_map(|(i, op)| {
        let (Action::Read(Some(value)), Ending::Returned(end)) = (&op.action, &op.ending) else {
            return None;
        };
        let explanation = match first_start.get(value.as_str()) {
            None => format!("`{}` returned a value no write of {key} wrote", line(op)),
            Some(start) if start > end => format!(
                "`{}` returned a value whose write started only at {}, after the read had ended",
                line(op),
                seconds(*start)
            ),
            Some(_) => return None,
        };
        Some(KeyVerdict::Violation(violation(key, ops, i, explanation)))
    })
}

/// Builds the report of a violation whose culprit is `ops[culprit]`.
fn violation(key: &str, ops: &[&RegisterOp], culprit: usize, explanation: String) -> Violation {
    Violation {
        key: key.to_owned(),
        explanation,
        ops: ops.iter().map(|op| line(op)).collect(),
        culprit,
        at: match &ops[culprit].ending {
            Ending::Returned(at) | Ending::Indeterminate { answered: at, .. } => *at,
        },
    }
}

/// One operation as a report line: `p3 write v17 [12.003s..12.040s] ok`.
pub fn line(op: &RegisterOp) -> String {
    let what = match &op.action {
        Action::Write(Some(value)) => format!("write {value}"),
        Action::Write(None) => "delete".to_owned(),
        Action::Read(seen) => format!("read -> {}", seen.as_deref().unwrap_or("none")),
    };
    let (end, result) = match &op.ending {
        Ending::Returned(end) => (*end, "ok".to_owned()),
        Ending::Indeterminate { answered, reason } => {
            (*answered, format!("failed, may take effect: {reason}"))
        }
    };
    format!(
        "p{} {what} [{}..{}] {result}",
        op.process,
        seconds(op.start),
        seconds(end)
    )
}

/// `12.003s`.
fn seconds(at: Duration) -> String {
    format!("{:.3}s", at.as_secs_f64())
}

#[cfg(test)]
mod tests;
