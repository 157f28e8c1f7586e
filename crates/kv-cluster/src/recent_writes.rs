//! Write ids this node applied recently, so that a write resent after a lost answer (the load
//! balancer's `x-kv-resend`) is applied at most once. Owns the in-memory `(key, id) -> version`
//! table and the decision a resend's coordinator takes from the replicas' answers.

use kv_core::Version;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// Header of a plain write carrying its write id (16 lowercase hex digits), set by the LB.
pub const WRITE_ID_HEADER: &str = "x-kv-write-id";
/// Header (`1`) of a write that was sent before and may have been applied: a resend.
pub const RESEND_HEADER: &str = "x-kv-resend";
/// Header of a resend: milliseconds since the first send of the write left its sender (the LB's
/// monotonic clock, so no wall clock is trusted). Without it a resend is taken as up to
/// [`WRITE_ID_WINDOW`] old.
pub const RESEND_AGE_HEADER: &str = "x-kv-resend-age-ms";
/// Added to a resend's age for what no one measures: the time the resend and the coordinator's
/// questions spend in flight between processes (the time the coordinator holds the resend is
/// measured: [`Resend::first_sent_ago`]). A replica could wrongly vouch only if it stored the first
/// send, crashed, and was running again (recovered, serving) within that unmeasured flight time
/// beyond the slack: a restart takes far longer than the milliseconds a call between nodes
/// takes, so a small slack suffices, and a node that restarted a moment before a failover can
/// still vouch.
pub const RESEND_SLACK: Duration = Duration::from_millis(50);
/// Header of a replication batch: per record, in order, its write id or `-`.
pub const BATCH_WRITE_IDS_HEADER: &str = "x-kv-write-ids";
/// How long a node remembers a write id: longer than any resend of the LB, which happens
/// within its `REQUEST_TIMEOUT_MS` (10 s) of the first send.
pub const WRITE_ID_WINDOW: Duration = Duration::from_secs(60);
/// Most write ids remembered; beyond this the oldest are forgotten first.
pub const MAX_RECENT_WRITES: usize = 100_000;

/// A random 64-bit id naming one client write across its resends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WriteId(pub u64);

impl fmt::Display for WriteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FromStr for WriteId {
    type Err = String;

    /// Exactly 16 hex digits (lower or upper case).
    fn from_str(text: &str) -> Result<WriteId, String> {
        if text.len() != 16 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{text:?} is not 16 hex digits"));
        }
        u64::from_str_radix(text, 16)
            .map(WriteId)
            .map_err(|e| e.to_string())
    }
}

/// Encodes the ids of a replication batch for [`BATCH_WRITE_IDS_HEADER`]; `None` when no record
/// carries one (the header is then left out, as older nodes send it).
pub fn encode_write_ids(ids: &[Option<WriteId>]) -> Option<String> {
    if ids.iter().all(Option::is_none) {
        return None;
    }
    let parts: Vec<String> = ids
        .iter()
        .map(|id| id.map_or_else(|| "-".to_owned(), |id| id.to_string()))
        .collect();
    Some(parts.join(","))
}

/// Decodes [`encode_write_ids`] for a batch of `count` records.
pub fn decode_write_ids(text: &str, count: usize) -> Result<Vec<Option<WriteId>>, String> {
    let ids: Vec<Option<WriteId>> = text
        .split(',')
        .map(|part| match part.trim() {
            "-" => Ok(None),
            id => id.parse().map(Some),
        })
        .collect::<Result<_, _>>()?;
    if ids.len() != count {
        return Err(format!("{} write ids for {count} records", ids.len()));
    }
    Ok(ids)
}

/// A write sent before that may have been applied: how long ago its first send left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resend {
    received: Instant,
    first_sent_ago: Duration,
}

impl Resend {
    /// A resend received now whose first send left `first_sent_ago` ago (`None`: unknown, taken
    /// as a whole [`WRITE_ID_WINDOW`]).
    pub fn new(first_sent_ago: Option<Duration>) -> Resend {
        Resend {
            received: Instant::now(),
            first_sent_ago: first_sent_ago.unwrap_or(WRITE_ID_WINDOW),
        }
    }

    /// How long ago the first send left, as of now (for passing the resend on to another node).
    pub fn first_sent_ago(&self) -> Duration {
        self.first_sent_ago + self.received.elapsed()
    }

    /// How far back a replica's memory must reach to vouch that it never applied the write:
    /// since before the first send could have reached it, with [`RESEND_SLACK`] for transit.
    pub fn horizon(&self) -> Duration {
        self.first_sent_ago() + RESEND_SLACK
    }
}

/// What a node knows of one `(key, write id)`: the answer of `POST /internal/seen`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Seen {
    /// The version it stored the write under, as text; `None` when it has not seen it.
    pub seen: Option<String>,
    /// True when "not seen" is reliable: the node has remembered every id it applied for as
    /// far back as the question asked (at most [`WRITE_ID_WINDOW`]): it has run that long, or it
    /// started with no data at all, and it has forgotten nothing younger.
    pub complete: bool,
    /// True while a resend of this write is being decided or applied on that node: another
    /// resend must not apply it a second time.
    #[serde(default)]
    pub pending: bool,
}

/// Bounded memory of `(key, write id) -> version` for writes this node stored, as coordinator
/// or replica.
///
/// Entries live [`WRITE_ID_WINDOW`]; at most [`MAX_RECENT_WRITES`] are kept, the oldest dropped
/// first. A miss means "never applied here" only as far back as the table reaches: the node's
/// start (a node that started with data may have applied ids before, and forgot them; one that
/// started with none did not), and never for a window after it had to drop a younger entry.
#[derive(Debug)]
pub struct RecentWrites {
    /// When this process started remembering; `None` when it started with no data, so it has
    /// applied nothing it does not remember.
    started: Option<Instant>,
    capacity: usize,
    state: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    versions: HashMap<(String, WriteId), Version>,
    /// Insertion order, for expiry and the cap: `(when, key, id)`.
    order: VecDeque<(Instant, String, WriteId)>,
    /// A young entry was dropped: misses are unreliable until then.
    incomplete_until: Option<Instant>,
    /// Resends being decided or applied on this node, per write (bounded by the requests in
    /// flight: each holds one mark and gives it back when it ends).
    pending: HashMap<(String, WriteId), usize>,
}

impl RecentWrites {
    /// An empty table. `fresh`: the node started with no data (no keys, no tombstones, no WAL,
    /// no snapshot), so no earlier run of it applied an id it forgot.
    pub fn new(fresh: bool) -> RecentWrites {
        let started = (!fresh).then(Instant::now);
        RecentWrites::with_capacity(started, MAX_RECENT_WRITES)
    }

    fn with_capacity(started: Option<Instant>, capacity: usize) -> RecentWrites {
        RecentWrites {
            started,
            capacity,
            state: Mutex::new(Table::default()),
        }
    }

    /// Remembers that this node stored the write `id` of `key` at `version` (a later try of the
    /// same write, at a greater version, replaces it).
    pub fn remember(&self, key: &str, id: WriteId, version: Version) {
        self.remember_at(Instant::now(), key, id, version);
    }

    /// What this node knows of `id` for `key`; a miss is reliable ("complete") if the table
    /// reaches `horizon` back.
    pub fn seen(&self, key: &str, id: WriteId, horizon: Duration) -> Seen {
        self.seen_at(Instant::now(), key, id, horizon)
    }

    fn remember_at(&self, now: Instant, key: &str, id: WriteId, version: Version) {
        let mut table = self.state.lock();
        table.expire(now);
        let slot = (key.to_owned(), id);
        if let Some(held) = table.versions.get_mut(&slot) {
            *held = (*held).max(version);
            return;
        }
        while table.versions.len() >= self.capacity {
            let Some((when, key, id)) = table.order.pop_front() else {
                break;
            };
            table.versions.remove(&(key, id));
            // Forgetting an id younger than the window makes misses unreliable for a window.
            table.incomplete_until = Some(when + WRITE_ID_WINDOW);
            metrics::counter!("kv_write_ids_dropped_total").increment(1);
        }
        table.versions.insert(slot, version);
        table.order.push_back((now, key.to_owned(), id));
    }

    fn seen_at(&self, now: Instant, key: &str, id: WriteId, horizon: Duration) -> Seen {
        let mut table = self.state.lock();
        self.answer(&mut table, now, key, id, horizon)
    }

    /// [`RecentWrites::seen`] under the lock already held.
    fn answer(
        &self,
        table: &mut Table,
        now: Instant,
        key: &str,
        id: WriteId,
        horizon: Duration,
    ) -> Seen {
        table.expire(now);
        let complete = horizon <= WRITE_ID_WINDOW
            && self
                .started
                .is_none_or(|started| now.saturating_duration_since(started) >= horizon)
            && table.incomplete_until.is_none_or(|until| now >= until);
        let slot = (key.to_owned(), id);
        Seen {
            seen: table.versions.get(&slot).map(|v| v.to_string()),
            complete,
            pending: table.pending.contains_key(&slot),
        }
    }

    /// Marks a resend of `id` for `key` as being decided here, until [`RecentWrites::unmark`]:
    /// a concurrent resend's coordinator then hears `pending` from this node. Returns what this
    /// node knew just before (`pending` when another resend of it is under way here).
    pub fn mark_pending(&self, key: &str, id: WriteId, horizon: Duration) -> Seen {
        let mut table = self.state.lock();
        let seen = self.answer(&mut table, Instant::now(), key, id, horizon);
        *table.pending.entry((key.to_owned(), id)).or_insert(0) += 1;
        seen
    }

    /// Gives back one mark of [`RecentWrites::mark_pending`].
    pub fn unmark(&self, key: &str, id: WriteId) {
        let mut table = self.state.lock();
        let slot = (key.to_owned(), id);
        if let Some(count) = table.pending.get_mut(&slot) {
            *count -= 1;
            if *count == 0 {
                table.pending.remove(&slot);
            }
        }
    }

    /// Entries remembered now.
    pub fn len(&self) -> usize {
        self.state.lock().versions.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Table {
    /// Drops entries older than the window (bounded by what is there).
    fn expire(&mut self, now: Instant) {
        while let Some((when, _, _)) = self.order.front() {
            if now.saturating_duration_since(*when) < WRITE_ID_WINDOW {
                break;
            }
            if let Some((_, key, id)) = self.order.pop_front() {
                self.versions.remove(&(key, id));
            }
        }
    }
}

/// What the coordinator of a resend does, from the replicas' [`Seen`] answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResendDecision {
    /// A replica stored it at this version: confirm that record, do not write a new one.
    Applied(Version),
    /// No replica that could hold it did: apply it as a new write.
    New,
    /// Cannot tell whether it was applied: answer `504 outcome_unknown`.
    Unknown,
}

/// Decides a resend from each replica's answer (`None`: it did not answer in time) and whether
/// the failure detector believes that replica down.
///
/// "Not seen" is trusted only when every replica that answered is complete and is not deciding
/// another resend of the same write, and every one that did not answer is believed down. A copy stranded on such a down node (the original
/// coordinator, typically, killed after storing it locally) was never acknowledged by a quorum,
/// carries a lower version than the new write, and holds the same value: when it comes back
/// (hint, repair) it loses to the new write, so the write takes effect once as clients see it.
pub fn decide_resend(answers: &[(Option<Seen>, bool)]) -> ResendDecision {
    let applied = answers
        .iter()
        .filter_map(|(seen, _)| seen.as_ref()?.seen.as_deref()?.parse::<Version>().ok())
        .max();
    if let Some(version) = applied {
        return ResendDecision::Applied(version);
    }
    let reliable = answers.iter().all(|(seen, down)| match seen {
        Some(seen) => seen.complete && seen.seen.is_none() && !seen.pending,
        None => *down,
    });
    if reliable {
        ResendDecision::New
    } else {
        ResendDecision::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(hlc: u64) -> Version {
        Version { hlc, node: 1 }
    }

    const ID: WriteId = WriteId(0xfeed);

    #[test]
    fn write_ids_round_trip_as_16_hex_digits() {
        assert_eq!(WriteId(0xab).to_string(), "00000000000000ab");
        assert_eq!("00000000000000ab".parse(), Ok(WriteId(0xab)));
        assert_eq!("FFFFFFFFFFFFFFFF".parse(), Ok(WriteId(u64::MAX)));
        for bad in [
            "",
            "ab",
            "00000000000000abc",
            "+000000000000000",
            "000000000000000g",
        ] {
            assert!(bad.parse::<WriteId>().is_err(), "{bad:?}");
        }
        let ids = [Some(WriteId(1)), None, Some(WriteId(u64::MAX))];
        let text = encode_write_ids(&ids).unwrap();
        assert_eq!(text, "0000000000000001,-,ffffffffffffffff");
        assert_eq!(decode_write_ids(&text, 3).unwrap(), ids);
        assert!(decode_write_ids(&text, 2).is_err(), "count mismatch");
        assert!(decode_write_ids("1,-", 2).is_err());
        assert_eq!(encode_write_ids(&[None, None]), None);
    }

    const W: Duration = WRITE_ID_WINDOW;

    #[test]
    fn remembered_ids_are_seen_until_the_window_ends() {
        let start = Instant::now();
        let recent = RecentWrites::with_capacity(Some(start), 10);
        recent.remember_at(start, "k", ID, v(5));
        let at = |s: u64| start + Duration::from_secs(s);
        let seen = |s, key, id| recent.seen_at(at(s), key, id, W).seen;
        assert_eq!(seen(1, "k", ID), Some(v(5).to_string()));
        assert_eq!(seen(1, "other", ID), None);
        assert_eq!(seen(1, "k", WriteId(1)), None);
        // A later try of the same write at a greater version replaces it; an older does not.
        recent.remember_at(at(2), "k", ID, v(9));
        recent.remember_at(at(2), "k", ID, v(7));
        assert_eq!(seen(3, "k", ID), Some(v(9).to_string()));
        assert_eq!(seen(61, "k", ID), None, "expired");
        assert!(recent.is_empty());
    }

    #[test]
    fn a_restarted_node_vouches_only_as_far_back_as_it_has_run() {
        let start = Instant::now();
        let recent = RecentWrites::with_capacity(Some(start), 10);
        let complete = |after: u64, horizon: u64| {
            let now = start + Duration::from_secs(after);
            let horizon = Duration::from_secs(horizon);
            recent.seen_at(now, "k", ID, horizon).complete
        };
        assert!(!complete(0, 1));
        assert!(!complete(5, 6), "the first send may predate this run");
        assert!(complete(5, 5));
        assert!(!complete(59, 60));
        assert!(complete(60, 60));
        assert!(
            !complete(600, 61),
            "nothing is remembered longer than the window"
        );
        let fresh = RecentWrites::with_capacity(None, 10);
        assert!(
            fresh.seen_at(start, "k", ID, W).complete,
            "no data: nothing forgotten"
        );
    }

    #[test]
    fn a_resend_s_horizon_is_its_age_plus_the_slack_and_grows() {
        let resend = Resend::new(Some(Duration::from_millis(300)));
        assert!(resend.horizon() >= Duration::from_millis(300) + RESEND_SLACK);
        assert!(resend.horizon() < Duration::from_secs(30));
        assert!(resend.first_sent_ago() >= Duration::from_millis(300));
        assert!(
            Resend::new(None).horizon() > W,
            "an unknown age reaches past the window"
        );
    }

    #[test]
    fn the_cap_drops_the_oldest_and_a_young_drop_makes_misses_unreliable() {
        let start = Instant::now();
        let at = |s: u64| start + W + Duration::from_secs(s);
        let recent = RecentWrites::with_capacity(Some(start), 2);
        recent.remember_at(at(0), "a", ID, v(1));
        recent.remember_at(at(1), "b", ID, v(2));
        assert!(recent.seen_at(at(1), "z", ID, W).complete);
        recent.remember_at(at(2), "c", ID, v(3));
        assert_eq!(recent.len(), 2);
        assert_eq!(
            recent.seen_at(at(2), "a", ID, W).seen,
            None,
            "oldest dropped"
        );
        assert_eq!(
            recent.seen_at(at(2), "b", ID, W).seen,
            Some(v(2).to_string())
        );
        assert!(!recent.seen_at(at(2), "a", ID, W).complete);
        // Complete again once the dropped entry would have expired anyway.
        assert!(recent.seen_at(at(60), "a", ID, W).complete);
    }

    fn answer(seen: Option<u64>, complete: bool) -> Option<Seen> {
        Some(Seen {
            seen: seen.map(|hlc| v(hlc).to_string()),
            complete,
            pending: false,
        })
    }

    #[test]
    fn a_resend_under_way_elsewhere_makes_another_unknown() {
        let recent = RecentWrites::with_capacity(None, 10);
        let before = recent.mark_pending("k", ID, W);
        assert!(!before.pending && before.complete && before.seen.is_none());
        let again = recent.mark_pending("k", ID, W);
        assert!(again.pending, "a second resend here sees the first");
        let elsewhere = Some(recent.seen("k", ID, W));
        let no = answer(None, true);
        assert_eq!(
            decide_resend(&[(no.clone(), false), (elsewhere, false)]),
            ResendDecision::Unknown
        );
        recent.unmark("k", ID);
        assert!(recent.seen("k", ID, W).pending, "one mark left");
        recent.unmark("k", ID);
        recent.unmark("k", ID);
        assert!(!recent.seen("k", ID, W).pending);
        assert!(!recent.seen("other", ID, W).pending);
        assert_eq!(
            decide_resend(&[(no.clone(), false), (no, false)]),
            ResendDecision::New
        );
    }

    #[test]
    fn a_resend_seen_anywhere_confirms_the_newest_seen_version() {
        let answers = [
            (answer(None, true), false),
            (answer(Some(4), false), false),
            (answer(Some(7), true), false),
            (None, false),
        ];
        assert_eq!(decide_resend(&answers), ResendDecision::Applied(v(7)));
    }

    #[test]
    fn a_resend_is_new_only_when_every_replica_that_could_hold_it_says_no() {
        let no = || answer(None, true);
        assert_eq!(
            decide_resend(&[(no(), false), (no(), false), (None, true)]),
            ResendDecision::New,
            "the silent replica is believed down"
        );
        assert_eq!(
            decide_resend(&[(no(), false), (no(), false), (None, false)]),
            ResendDecision::Unknown,
            "a silent replica believed up may hold it"
        );
        assert_eq!(
            decide_resend(&[(no(), false), (answer(None, false), false), (None, true)]),
            ResendDecision::Unknown,
            "a replica restarted within the window may have forgotten it"
        );
        assert_eq!(
            decide_resend(&[(no(), false), (no(), false), (no(), false)]),
            ResendDecision::New
        );
    }
}
