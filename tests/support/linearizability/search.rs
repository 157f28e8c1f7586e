//! The search behind the linearizability checker, for one key: Wing & Gong's backtracking over
//! the key's call and return events, with Lowe's memoisation of explored states.

use super::{line, violation, Action, Ending, KeyVerdict, RegisterOp};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// A register value, interned: `ABSENT` is "no value", `1..` the distinct written values.
type Value = u32;
const ABSENT: Value = 0;

/// How many search steps pass between two looks at the clock.
const STEPS_PER_CLOCK_CHECK: u64 = 1024;

/// What the search concluded about one key.
#[derive(Debug)]
pub(super) enum SearchResult {
    /// Some order works.
    Linearizable,
    /// No order works. `placed` is the longest valid order found (operation indexes), after which
    /// the register held `value` and operation `culprit` had to have taken effect already.
    Stuck {
        placed: Vec<usize>,
        value: Option<String>,
        culprit: usize,
    },
    /// The limits were hit first; the text says which.
    GaveUp(String),
}

impl SearchResult {
    /// The verdict a caller reads, with a human explanation for a violation.
    pub(super) fn into_verdict(self, key: &str, ops: &[&RegisterOp]) -> KeyVerdict {
        match self {
            SearchResult::Linearizable => KeyVerdict::Linearizable,
            SearchResult::GaveUp(reason) => KeyVerdict::Unknown(reason),
            SearchResult::Stuck {
                placed,
                value,
                culprit,
            } => {
                let last = placed
                    .last()
                    .map(|&i| format!(" (the last: `{}`)", line(ops[i])))
                    .unwrap_or_default();
                let holding = value.map_or("absent".to_owned(), |v| format!("holding {v}"));
                let explanation = format!(
                    "`{}` fits no valid order: the longest valid order of {key}'s operations \
                     places {} of {}{last} and leaves the key {holding}",
                    line(ops[culprit]),
                    placed.len(),
                    ops.len(),
                );
                KeyVerdict::Violation(violation(key, ops, culprit, explanation))
            }
        }
    }
}

/// Decides whether one key's operations (sorted by start) are linearizable.
pub(super) fn check_key(ops: &[&RegisterOp], max_states: usize, deadline: Instant) -> SearchResult {
    Search::new(ops).run(max_states, deadline)
}

/// What an operation does, with its value interned.
#[derive(Clone, Copy, Debug)]
enum Effect {
    Write(Value),
    Read(Value),
}

/// A node of the timeline: the call or the return of operation `op`.
#[derive(Clone, Copy, Debug)]
struct Event {
    op: usize,
    is_return: bool,
}

/// One key's call and return events in time order, as a doubly linked list. Placing an
/// operation lifts its events out; backtracking puts them back. Lifts are undone in exactly the
/// reverse order, so a node's own links still say where it goes back (dancing links).
///
/// Node 0 is the head, the last node the tail; the tail counts as a return, so a scan for the
/// next return always stops. On equal times calls come first: such operations are treated as
/// concurrent, which can only accept more histories, never reject a good one.
#[derive(Debug)]
struct Timeline {
    events: Vec<Event>,
    next: Vec<usize>,
    prev: Vec<usize>,
    /// Per operation: its call node (`usize::MAX` if it is not on the timeline).
    call: Vec<usize>,
    /// Per operation: its return node, if it has one.
    ret: Vec<Option<usize>>,
}

impl Timeline {
    /// `on_timeline[i]`: whether operation `i` takes part at all; `returns[i]`: when it returned.
    fn new(ops: &[&RegisterOp], on_timeline: &[bool], returns: &[Option<Duration>]) -> Timeline {
        let mut stamped: Vec<(Duration, bool, usize)> = Vec::with_capacity(2 * ops.len());
        for (i, op) in ops.iter().enumerate().filter(|(i, _)| on_timeline[*i]) {
            stamped.push((op.start, false, i));
            if let Some(end) = returns[i] {
                stamped.push((end, true, i));
            }
        }
        stamped.sort();
        let sentinel = Event {
            op: usize::MAX,
            is_return: true,
        };
        let mut events = vec![sentinel];
        let mut call = vec![usize::MAX; ops.len()];
        let mut ret = vec![None; ops.len()];
        for (is_return, op) in stamped.into_iter().map(|(_, r, op)| (r, op)) {
            if is_return {
                ret[op] = Some(events.len());
            } else {
                call[op] = events.len();
            }
            events.push(Event { op, is_return });
        }
        events.push(sentinel);
        let nodes = events.len();
        Timeline {
            events,
            next: (1..=nodes).collect(),
            prev: (0..nodes).map(|i| i.saturating_sub(1)).collect(),
            call,
            ret,
        }
    }

    fn first(&self) -> usize {
        self.next[0]
    }

    /// The first return node at or after `node`.
    fn first_return_from(&self, mut node: usize) -> usize {
        while !self.events[node].is_return {
            node = self.next[node];
        }
        node
    }

    fn unlink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = next;
        self.prev[next] = prev;
    }

    fn relink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = node;
        self.prev[next] = node;
    }

    fn lift(&mut self, op: usize) {
        self.unlink(self.call[op]);
        if let Some(ret) = self.ret[op] {
            self.unlink(ret);
        }
    }

    fn unlift(&mut self, op: usize) {
        if let Some(ret) = self.ret[op] {
            self.relink(ret);
        }
        self.relink(self.call[op]);
    }
}

/// A set of operation indexes.
#[derive(Debug)]
struct Bitset(Vec<u64>);

impl Bitset {
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
    fn contains(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
}

/// One step on the search stack: the operation placed, the indeterminate write placed right
/// before it (if any), the register value before both, and whether it was no choice.
#[derive(Debug)]
struct Frame {
    op: usize,
    helper: Option<usize>,
    before: Value,
    forced: bool,
}

/// What each operation does, with values as numbers, and the value of each number.
fn interned<'a>(ops: &[&'a RegisterOp]) -> (Vec<Effect>, Vec<Option<String>>) {
    let mut ids: HashMap<&'a str, Value> = HashMap::new();
    let mut names = vec![None];
    let mut intern = |value: &'a Option<String>| match value {
        None => ABSENT,
        Some(v) => *ids.entry(v).or_insert_with(|| {
            names.push(Some(v.clone()));
            (names.len() - 1) as Value
        }),
    };
    let effects = ops
        .iter()
        .map(|op| match &op.action {
            Action::Write(v) => Effect::Write(intern(v)),
            Action::Read(v) => Effect::Read(intern(v)),
        })
        .collect();
    (effects, names)
}

/// The state of the search for one key.
///
/// Wing & Gong: walk the timeline from its head; a call may be *placed* (linearized now) if the
/// register allows it, which lifts it out and restarts the walk; reaching the return of an
/// operation not yet placed means this branch is dead, so the last placement is undone and the
/// walk goes on after it. Lowe: a (placed set, register value) pair already explored is never
/// explored again, since its future does not depend on how it was reached.
///
/// Reads of the current value are placed first and without branching: placing such a read now
/// is never worse than later (it changes nothing, and waiting only adds constraints), so if the
/// state after it fails, the state before it fails too and the search backs up past both. This
/// keeps the states explored near one per operation where Wing & Gong alone would try every
/// order of the reads running at the same time.
///
/// Indeterminate writes have no return: they may take effect at any time after their call, or
/// never. Placing one is only useful right before a read of its value (any valid order can be
/// rewritten so: an unread write can be left out, a read one moved up to its first reader), so
/// they are placed only together with such a read, and left out when nobody read their value.
/// This keeps a history with many failed writes from multiplying the search by their subsets.
#[derive(Debug)]
struct Search {
    effects: Vec<Effect>,
    names: Vec<Option<String>>,
    timeline: Timeline,
    /// Indeterminate writes on the timeline by value, in call order.
    indeterminate: HashMap<Value, Vec<usize>>,
    placed: Bitset,
    value: Value,
    stack: Vec<Frame>,
    seen: HashMap<Value, HashSet<Box<[u64]>>>,
    states: usize,
    /// Return nodes still on the timeline: zero means every determinate operation is placed.
    returns_left: usize,
}

impl Search {
    fn new(ops: &[&RegisterOp]) -> Search {
        let (effects, names) = interned(ops);
        let returns: Vec<Option<Duration>> = ops
            .iter()
            .map(|op| match op.ending {
                Ending::Returned(end) => Some(end),
                Ending::Indeterminate { .. } => None,
            })
            .collect();
        let read: HashSet<Value> = (0..ops.len())
            .filter_map(|i| match (effects[i], returns[i]) {
                (Effect::Read(v), Some(_)) => Some(v),
                _ => None,
            })
            .collect();
        // Failed reads and failed writes whose value nobody read stay off the timeline.
        let on_timeline: Vec<bool> = (0..ops.len())
            .map(|i| match (effects[i], returns[i]) {
                (_, Some(_)) => true,
                (Effect::Write(v), None) => read.contains(&v),
                (Effect::Read(_), None) => false,
            })
            .collect();
        let timeline = Timeline::new(ops, &on_timeline, &returns);
        let mut indeterminate: HashMap<Value, Vec<usize>> = HashMap::new();
        for i in (0..ops.len()).filter(|&i| on_timeline[i] && returns[i].is_none()) {
            if let Effect::Write(v) = effects[i] {
                indeterminate.entry(v).or_default().push(i);
            }
        }
        for list in indeterminate.values_mut() {
            list.sort_by_key(|&i| timeline.call[i]);
        }
        Search {
            effects,
            names,
            returns_left: timeline.ret.iter().flatten().count(),
            timeline,
            indeterminate,
            placed: Bitset(vec![0; ops.len().div_ceil(64)]),
            value: ABSENT,
            stack: Vec::new(),
            seen: HashMap::new(),
            states: 0,
        }
    }

    fn run(mut self, max_states: usize, deadline: Instant) -> SearchResult {
        let started = Instant::now();
        let mut deepest: Option<(usize, SearchResult)> = None;
        let mut steps: u64 = 0;
        // `None`: a state was just reached, the walk starts over; `Some(node)`: it is at `node`.
        let mut walk: Option<usize> = None;
        while self.returns_left > 0 {
            steps += 1;
            if self.states > max_states
                || (steps.is_multiple_of(STEPS_PER_CLOCK_CHECK) && Instant::now() >= deadline)
            {
                return SearchResult::GaveUp(format!(
                    "search gave up after {} states in {:?} (limits: {max_states} states per key \
                     or the check's deadline)",
                    self.states,
                    started.elapsed()
                ));
            }
            let node = match walk {
                Some(node) => node,
                None => match self.matching_read() {
                    Some(read) if self.try_place(read, true) => continue,
                    // Explored before, and it failed: so does this state.
                    Some(_) => {
                        walk = self.backtrack();
                        if walk.is_none() {
                            break;
                        }
                        continue;
                    }
                    None => self.timeline.first(),
                },
            };
            let event = self.timeline.events[node];
            if !event.is_return {
                walk = if self.try_place(node, false) {
                    None
                } else {
                    Some(self.timeline.next[node])
                };
                continue;
            }
            // The return of an operation not placed yet: this branch is dead.
            if deepest
                .as_ref()
                .is_none_or(|(depth, _)| self.stack.len() > *depth)
            {
                deepest = Some((self.stack.len(), self.stuck_at(event.op)));
            }
            walk = self.backtrack();
            if walk.is_none() {
                break;
            }
        }
        if self.returns_left == 0 {
            return SearchResult::Linearizable;
        }
        deepest.map_or_else(
            || SearchResult::GaveUp("the search ended without meeting a dead end".into()),
            |(_, stuck)| stuck,
        )
    }

    /// The call node of a determinate read of the current value that may take effect now.
    fn matching_read(&self) -> Option<usize> {
        let mut node = self.timeline.first();
        while !self.timeline.events[node].is_return {
            let op = self.timeline.events[node].op;
            let read_now = matches!(self.effects[op], Effect::Read(v) if v == self.value);
            if read_now && self.timeline.ret[op].is_some() {
                return Some(node);
            }
            node = self.timeline.next[node];
        }
        None
    }

    /// Undoes placements up to and including the last one that was a choice; returns the node
    /// after it, where the walk goes on, or `None` when no choice is left.
    fn backtrack(&mut self) -> Option<usize> {
        loop {
            let frame = self.stack.pop()?;
            let forced = frame.forced;
            let next = self.undo(frame);
            if !forced {
                return Some(next);
            }
        }
    }

    /// Places the operation called at `node` now if the register allows it and the resulting
    /// state is new; `forced` marks a placement that was no choice (a read of the current value).
    fn try_place(&mut self, node: usize, forced: bool) -> bool {
        let op = self.timeline.events[node].op;
        if self.timeline.ret[op].is_none() {
            // Indeterminate writes are placed only as helpers of a read.
            return false;
        }
        let (helper, after) = match self.effects[op] {
            Effect::Write(v) => (None, v),
            Effect::Read(v) if v == self.value => (None, v),
            Effect::Read(v) => match self.indeterminate_write_of(v, node) {
                Some(write) => (Some(write), v),
                None => return false,
            },
        };
        self.placed.set(op);
        if let Some(write) = helper {
            self.placed.set(write);
        }
        if !self.remember(after) {
            self.placed.clear(op);
            if let Some(write) = helper {
                self.placed.clear(write);
            }
            return false;
        }
        self.stack.push(Frame {
            op,
            helper,
            before: self.value,
            forced,
        });
        self.value = after;
        self.timeline.lift(op);
        if let Some(write) = helper {
            self.timeline.lift(write);
        }
        self.returns_left -= 1;
        true
    }

    /// An indeterminate write of `value` not placed yet that may take effect now: its call is
    /// before the first return still on the timeline (the walk, now at `node`, has not passed
    /// one). Any one will do: from here on they are all open until the end.
    fn indeterminate_write_of(&self, value: Value, node: usize) -> Option<usize> {
        let candidates = self.indeterminate.get(&value)?;
        let open_until = self.timeline.first_return_from(node);
        candidates
            .iter()
            .copied()
            .take_while(|&w| self.timeline.call[w] < open_until)
            .find(|&w| !self.placed.contains(w))
    }

    /// Records the state (placed set, `after`); false if it was explored before.
    fn remember(&mut self, after: Value) -> bool {
        let known = self.seen.entry(after).or_default();
        if known.contains(self.placed.0.as_slice()) {
            return false;
        }
        known.insert(self.placed.0.clone().into_boxed_slice());
        self.states += 1;
        true
    }

    /// Undoes the last placement; returns the node where the walk goes on.
    fn undo(&mut self, frame: Frame) -> usize {
        if let Some(write) = frame.helper {
            self.timeline.unlift(write);
            self.placed.clear(write);
        }
        self.timeline.unlift(frame.op);
        self.placed.clear(frame.op);
        self.value = frame.before;
        self.returns_left += 1;
        self.timeline.next[self.timeline.call[frame.op]]
    }

    /// The current partial order, as the report of a dead end at `culprit`.
    fn stuck_at(&self, culprit: usize) -> SearchResult {
        let placed = self
            .stack
            .iter()
            .flat_map(|f| f.helper.into_iter().chain([f.op]))
            .collect();
        SearchResult::Stuck {
            placed,
            value: self.names[self.value as usize].clone(),
            culprit,
        }
    }
}
