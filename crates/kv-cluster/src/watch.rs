//! Change streams: the bounded history of the changes this node applied (every `Store::apply`
//! that won, from client writes, replication, hints, read repair and anti-entropy alike), and
//! the cursors that watchers read it with. Knows nothing of HTTP or SSE (kv-node formats them).
//!
//! Per key the feed is in version order: the map applies a record only if it is newer than the
//! key's entry, so each `(key, version)` appears once, however many paths deliver it.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use kv_core::{MapObserver, Record, Version};
use parking_lot::Mutex;

/// How far before a resumed watcher's `Last-Event-ID` the history is replayed, in
/// milliseconds: changes reach a node out of version order (a write coordinated elsewhere
/// arrives a little after a newer one coordinated here; clocks differ by up to
/// `MAX_CLOCK_OFFSET_MS`), so replaying from the last id alone could skip one. The watcher
/// drops what it already holds (not newer than its version of the key).
pub const RESUME_SLACK_MS: u64 = 10_000;

/// Default cap on the events kept (`WATCH_HISTORY_EVENTS`).
pub const DEFAULT_HISTORY_EVENTS: usize = 100_000;
/// Default cap on the bytes of the events kept (`WATCH_HISTORY_BYTES`): keys plus values plus
/// [`EVENT_OVERHEAD_BYTES`] per event.
pub const DEFAULT_HISTORY_BYTES: usize = 32 << 20;
/// Bytes counted per event on top of its key and value: what holding it costs in memory, so that
/// `WATCH_HISTORY_BYTES` bounds the history's real size. The ring's slot (8), the `Arc`'s
/// allocation (16 + the 72-byte `Change`) and the header a cloned `Bytes` value shares (32,
/// allocator size class). Measured in a soak (100-byte values, 10-byte keys): about 237 bytes
/// of RSS per event against the 112 of key and value.
const EVENT_OVERHEAD_BYTES: usize = 128;

/// Caps of the history; the oldest events are dropped to stay within both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Most events kept.
    pub max_events: usize,
    /// Most bytes kept (keys, values and a fixed overhead per event).
    pub max_bytes: usize,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        HistoryLimits {
            max_events: DEFAULT_HISTORY_EVENTS,
            max_bytes: DEFAULT_HISTORY_BYTES,
        }
    }
}

/// One applied change: the key's new version and value (`None`: deleted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The key.
    pub key: String,
    /// Its new version.
    pub version: Version,
    /// The value's JSON bytes as stored, or `None` for a delete.
    pub value: Option<Bytes>,
}

impl Change {
    fn bytes(&self) -> usize {
        self.key.len() + self.value.as_ref().map_or(0, Bytes::len) + EVENT_OVERHEAD_BYTES
    }
}

/// What [`WatchHub::read`] found at a cursor.
#[derive(Debug)]
pub enum Read {
    /// Events from the cursor on (possibly none yet), and the cursor after them.
    Events(Vec<Arc<Change>>, u64),
    /// The events at the cursor were dropped before the watcher read them: it fell too far
    /// behind and must resynchronise.
    Lagged,
}

/// Where a new watcher starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    /// The first sequence number to read.
    pub cursor: u64,
    /// Events before this sequence number are a replay: pass only those above `replay_above`.
    pub replay_until: u64,
    /// The version a replay starts above (`None`: no replay).
    pub replay_above: Option<Version>,
}

/// Why a watch cannot start where it asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryGone {
    /// The oldest resume point this node can still serve without a gap.
    pub oldest: Version,
}

/// The ring of recent changes. Sequence numbers count every event ever pushed; the ring holds
/// `first_seq .. first_seq + events.len()`.
#[derive(Debug)]
struct History {
    events: VecDeque<Arc<Change>>,
    first_seq: u64,
    bytes: usize,
    /// The greatest version dropped so far (at first: the node's start), so a replay of the
    /// events above it is complete.
    floor: Version,
}

/// This node's change feed: a bounded ring written by the map observer (never blocking: a
/// short mutex, no allocation beyond the event, no waiting on readers) and read by any number
/// of watchers, each with its own cursor. A watcher costs no memory in the hub: when it falls
/// behind the ring's start it gets [`Read::Lagged`].
#[derive(Debug)]
pub struct WatchHub {
    history: Mutex<History>,
    /// The sequence number the next event will get; watchers wait on its changes.
    next_seq: tokio::sync::watch::Sender<u64>,
    limits: HistoryLimits,
    closed: std::sync::atomic::AtomicBool,
    /// Open client watches.
    watchers: std::sync::atomic::AtomicUsize,
    /// Open feeds that peers read for their merged watches.
    peer_feeds: std::sync::atomic::AtomicUsize,
}

/// Who reads a stream, for the counts in the node's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// A client's watch.
    Client,
    /// A peer merging this node's feed into a client's watch.
    Peer,
}

/// Counts one open stream in [`WatchHub::watchers`] or [`WatchHub::peer_feeds`] for as long as
/// it lives.
#[derive(Debug)]
pub struct WatcherGuard(Arc<WatchHub>, Reader);

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0
            .counter(self.1)
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl WatchHub {
    /// An empty hub. `started` is the first version it can vouch for: a resume from before it
    /// (changes this process never saw) is refused with [`HistoryGone`].
    pub fn new(limits: HistoryLimits, started: Version) -> WatchHub {
        WatchHub {
            history: Mutex::new(History {
                events: VecDeque::new(),
                first_seq: 0,
                bytes: 0,
                floor: started,
            }),
            next_seq: tokio::sync::watch::Sender::new(0),
            limits,
            closed: std::sync::atomic::AtomicBool::new(false),
            watchers: std::sync::atomic::AtomicUsize::new(0),
            peer_feeds: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Appends a change, dropping the oldest events beyond the caps, and wakes the watchers.
    pub fn push(&self, change: Change) {
        let next = {
            let mut history = self.history.lock();
            history.bytes += change.bytes();
            history.events.push_back(Arc::new(change));
            while history.events.len() > self.limits.max_events
                || (history.bytes > self.limits.max_bytes && !history.events.is_empty())
            {
                let Some(dropped) = history.events.pop_front() else {
                    break;
                };
                history.bytes = history.bytes.saturating_sub(dropped.bytes());
                history.first_seq += 1;
                history.floor = history.floor.max(dropped.version);
            }
            history.first_seq + history.events.len() as u64
        };
        self.next_seq.send_replace(next);
    }

    /// Where a new watcher starts: at the end (only new changes) without `after`, else at the
    /// ring's start with a replay filter: only events above `after` less [`RESUME_SLACK_MS`].
    /// Refused when `after` is older than what the ring can vouch for (the newest event it
    /// dropped, or the hub's start): a change after it may be gone.
    pub fn start(&self, after: Option<Version>) -> Result<Start, HistoryGone> {
        let history = self.history.lock();
        let end = history.first_seq + history.events.len() as u64;
        let Some(after) = after else {
            return Ok(Start {
                cursor: end,
                replay_until: end,
                replay_above: None,
            });
        };
        if after < history.floor {
            return Err(HistoryGone {
                oldest: history.floor,
            });
        }
        Ok(Start {
            cursor: history.first_seq,
            replay_until: end,
            replay_above: Some(resume_point(after)),
        })
    }

    /// Up to `max` events from `cursor` on.
    pub fn read(&self, cursor: u64, max: usize) -> Read {
        let history = self.history.lock();
        if cursor < history.first_seq {
            return Read::Lagged;
        }
        let skip = usize::try_from(cursor - history.first_seq).unwrap_or(usize::MAX);
        let events: Vec<Arc<Change>> = history
            .events
            .iter()
            .skip(skip)
            .take(max)
            .cloned()
            .collect();
        let next = cursor + events.len() as u64;
        Read::Events(events, next)
    }

    /// A receiver that sees the next sequence number change after each push.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.next_seq.subscribe()
    }

    /// Ends every watch (at shutdown): watchers see [`WatchHub::is_closed`] when woken.
    pub fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.next_seq.send_modify(|_| {});
    }

    /// True once [`WatchHub::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Counts a stream as open until the guard is dropped.
    pub fn watcher(self: &Arc<Self>, reader: Reader) -> WatcherGuard {
        self.counter(reader)
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        WatcherGuard(self.clone(), reader)
    }

    fn counter(&self, reader: Reader) -> &std::sync::atomic::AtomicUsize {
        match reader {
            Reader::Client => &self.watchers,
            Reader::Peer => &self.peer_feeds,
        }
    }

    /// Client watches open on this node now.
    pub fn watchers(&self) -> usize {
        self.watchers.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Feeds open for peers' merged watches now.
    pub fn peer_feeds(&self) -> usize {
        self.peer_feeds.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Events and bytes held now (for status and tests).
    pub fn held(&self) -> (usize, usize) {
        let history = self.history.lock();
        (history.events.len(), history.bytes)
    }
}

/// The version a replay starts above for a watcher that last saw `after`.
fn resume_point(after: Version) -> Version {
    Version {
        hlc: after.hlc.saturating_sub(RESUME_SLACK_MS << 16),
        node: 0,
    }
}

impl MapObserver for WatchHub {
    fn changed(&self, _: usize, _: &str, _: Option<Version>, _: Option<Version>) {}

    fn applied(&self, record: &Record) {
        self.push(Change {
            key: record.key.clone(),
            version: record.version,
            value: record.value.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(hlc_ms: u64) -> Version {
        Version {
            hlc: hlc_ms << 16,
            node: 1,
        }
    }

    #[test]
    fn the_bytes_counted_per_event_cover_what_it_holds() {
        use std::mem::size_of;
        // The ring's slot, the Arc's counts and the Change, the shared header of a cloned Bytes.
        let held = size_of::<Arc<Change>>()
            + 2 * size_of::<usize>()
            + size_of::<Change>()
            + 4 * size_of::<usize>();
        assert!(
            EVENT_OVERHEAD_BYTES >= held,
            "{EVENT_OVERHEAD_BYTES} counted per event, {held} held"
        );
        let event = change("k", 1, b"v");
        assert_eq!(event.bytes(), 2 + EVENT_OVERHEAD_BYTES);
    }

    fn change(key: &str, ms: u64, value: &'static [u8]) -> Change {
        Change {
            key: key.into(),
            version: v(ms),
            value: Some(Bytes::from_static(value)),
        }
    }

    fn keys(read: Read) -> (Vec<String>, u64) {
        match read {
            Read::Events(events, next) => (events.iter().map(|e| e.key.clone()).collect(), next),
            Read::Lagged => panic!("lagged"),
        }
    }

    #[test]
    fn a_watcher_reads_in_order_and_waits_at_the_end() {
        let hub = WatchHub::new(HistoryLimits::default(), Version::ZERO);
        let Start { cursor, .. } = hub.start(None).unwrap();
        assert_eq!(cursor, 0);
        hub.push(change("a", 1, b"1"));
        hub.push(change("b", 2, b"2"));
        let (got, next) = keys(hub.read(cursor, 10));
        assert_eq!((got, next), (vec!["a".into(), "b".into()], 2));
        let (got, next) = keys(hub.read(next, 10));
        assert_eq!((got.len(), next), (0, 2));
        let (got, _) = keys(hub.read(0, 1));
        assert_eq!(got, ["a"], "max is honoured");
    }

    #[test]
    fn the_history_is_capped_by_count_and_bytes_and_a_slow_cursor_lags() {
        let limits = HistoryLimits {
            max_events: 3,
            max_bytes: 1 << 20,
        };
        let hub = WatchHub::new(limits, Version::ZERO);
        for ms in 1..=5 {
            hub.push(change("k", ms, b"x"));
        }
        assert_eq!(hub.held().0, 3);
        assert!(matches!(hub.read(1, 10), Read::Lagged));
        let (got, next) = keys(hub.read(2, 10));
        assert_eq!((got.len(), next), (3, 5));

        let limits = HistoryLimits {
            max_events: 1000,
            max_bytes: 3 * (EVENT_OVERHEAD_BYTES + 1 + 100),
        };
        let hub = WatchHub::new(limits, Version::ZERO);
        for ms in 1..=10 {
            hub.push(change("k", ms, &[b'v'; 100]));
        }
        let (events, bytes) = hub.held();
        assert_eq!(events, 3);
        assert!(bytes <= limits.max_bytes);
    }

    #[test]
    fn a_resume_replays_from_the_slack_and_is_refused_past_what_was_dropped() {
        let limits = HistoryLimits {
            max_events: 2,
            max_bytes: 1 << 20,
        };
        let hub = WatchHub::new(limits, v(1_000));
        assert!(
            hub.start(Some(v(999))).is_err(),
            "from before the hub started"
        );
        assert!(hub.start(Some(v(1_000))).is_ok());
        let start = 100_000;
        hub.push(change("a", start, b"1"));
        let from = hub.start(Some(v(start))).unwrap();
        assert_eq!((from.cursor, from.replay_until), (0, 1));
        assert_eq!(from.replay_above, Some(resume_point(v(start))));
        hub.push(change("b", start + 1, b"1"));
        hub.push(change("c", start + 2, b"1"));
        hub.push(change("d", start + 3, b"1"));
        let gone = hub.start(Some(v(start))).unwrap_err();
        assert_eq!(gone.oldest, v(start + 1), "b was dropped");
        let from = hub.start(Some(v(start + 1))).unwrap();
        assert_eq!((from.cursor, from.replay_until), (2, 4));
    }

    #[test]
    fn the_observer_pushes_applied_records_only() {
        let hub = WatchHub::new(HistoryLimits::default(), Version::ZERO);
        let mut seen = hub.subscribe();
        hub.changed(0, "a", None, Some(v(1)));
        assert_eq!(hub.held().0, 0);
        hub.applied(&Record {
            key: "a".into(),
            version: v(1),
            value: None,
            expires_at_ms: None,
        });
        assert!(seen.has_changed().unwrap());
        assert_eq!(*seen.borrow_and_update(), 1);
        assert!(!hub.is_closed());
        hub.close();
        assert!(
            seen.has_changed().unwrap() && hub.is_closed(),
            "close wakes watchers"
        );
        let hub = Arc::new(hub);
        let guard = hub.watcher(Reader::Client);
        let peer = hub.watcher(Reader::Peer);
        assert_eq!((hub.watchers(), hub.peer_feeds()), (1, 1));
        drop(guard);
        assert_eq!((hub.watchers(), hub.peer_feeds()), (0, 1));
        drop(peer);
        assert_eq!(hub.peer_feeds(), 0);
        let Read::Events(events, _) = hub.read(0, 1) else {
            panic!("lagged")
        };
        assert_eq!(events[0].value, None, "a delete");
    }
}
