//! Every watch a node serves merges the change feeds of the replicas of what it watches: this
//! node's own feed and each peer's (`GET /internal/watch`). One feed alone cannot hold every
//! acknowledged change: a write acknowledged by W replicas may reach another replica after a
//! newer write of its key overtook it there, and that replica never applies (nor streams) it.
//!
//! [`Resolver`] puts the feeds back together. Each feed is in version order per key (a node
//! applies a record only when it is newer than the key's entry), so once every replica of a key
//! whose feed is open has reported version `v` of the key or a newer one, no feed can still
//! bring an older change of it: the changes held up to `v` are passed in version order, each
//! `(key, version)` once ([`KeyOrder`]). A replica whose feed is down is not waited for, and no
//! change is held longer than [`HOLD_AT_MOST`] (a replica that is slow or cut off from the
//! writers): only then can a change arrive after a newer one of its key was passed, and it is
//! dropped ([`KeyOrder`]) rather than sent out of order. Each source is a stream of the format
//! `watch.rs` writes.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use kv_cluster::{Cluster, WatchHub};
use kv_core::Version;
use tokio::sync::mpsc;

use crate::watch::{self, Filter};

/// Keys whose last version a merged watch remembers (about 100 bytes each).
const REMEMBERED_KEYS: usize = 50_000;
/// Parsed events queued from all sources to the merging task (with the frames queued to the
/// watcher, what a watcher that reads nothing holds in memory: a few MiB of large values).
const QUEUED_EVENTS: usize = 16;
/// Wait before reopening a peer's feed that ended or failed.
const REOPEN_AFTER: Duration = Duration::from_secs(1);
/// Longest a new watch waits for its peers' feeds to open before it answers.
const OPEN_WAIT: Duration = Duration::from_secs(2);
/// Longest a change waits for the other replicas' feeds to report its key.
const HOLD_AT_MOST: Duration = Duration::from_secs(2);
/// Most changes (and bytes of them) held at once; beyond that the oldest are passed.
const HELD_CHANGES: usize = 10_000;
const HELD_BYTES: usize = 16 << 20;
/// A peer feed silent for this long (it pings every 15 s) is reopened.
const PEER_SILENT_FOR: Duration = Duration::from_secs(45);

/// One event block of a source: a change (key, version, the block's bytes) or a final `lagged`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Block {
    Change {
        key: String,
        version: Version,
        bytes: Bytes,
    },
    Lagged {
        history_gone: bool,
        bytes: Bytes,
    },
}

/// Splits a byte stream in the SSE format of `watch.rs` into [`Block`]s; comments, `retry:`
/// and anything unparsable are skipped.
#[derive(Debug, Default)]
struct BlockParser {
    buffer: BytesMut,
}

impl BlockParser {
    fn feed(&mut self, chunk: &[u8]) -> Vec<Block> {
        self.buffer.extend_from_slice(chunk);
        let mut blocks = Vec::new();
        while let Some(end) = find(&self.buffer, b"\n\n") {
            let block = self.buffer.split_to(end + 2).freeze();
            blocks.extend(parse_block(block));
        }
        blocks
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_block(block: Bytes) -> Option<Block> {
    let text = std::str::from_utf8(&block).ok()?;
    let (mut id, mut event, mut data) = (None, None, Vec::new());
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("id: ") {
            id = Some(v);
        } else if let Some(v) = line.strip_prefix("event: ") {
            event = Some(v);
        } else if let Some(v) = line.strip_prefix("data: ") {
            data.push(v);
        }
    }
    let json: serde_json::Value = serde_json::from_str(&data.join("\n")).ok()?;
    match event? {
        "lagged" => Some(Block::Lagged {
            history_gone: json["reason"] == "history_gone",
            bytes: block.clone(),
        }),
        "put" | "delete" => Some(Block::Change {
            key: json["key"].as_str()?.to_owned(),
            version: id?.parse().ok()?,
            bytes: block.clone(),
        }),
        _ => None,
    }
}

/// Per-key order of a merged stream: passes a change only if it is newer than the last one
/// passed for its key, so each `(key, version)` goes out once and never after a newer version
/// of its key. Remembers at most `capacity` keys; forgetting the oldest-passed one raises a
/// floor, and a change of a key no longer remembered passes only above the floor (at or below
/// it, it may be a repeat that can no longer be told apart).
#[derive(Debug)]
struct KeyOrder {
    last: HashMap<String, Version>,
    order: VecDeque<(String, Version)>,
    floor: Version,
    capacity: usize,
}

impl KeyOrder {
    fn new(capacity: usize) -> KeyOrder {
        KeyOrder {
            last: HashMap::new(),
            order: VecDeque::new(),
            floor: Version::ZERO,
            capacity: capacity.max(1),
        }
    }

    /// True when `admit` would pass this change.
    fn is_new(&self, key: &str, version: Version) -> bool {
        match self.last.get(key) {
            Some(last) => *last < version,
            None => version > self.floor,
        }
    }

    fn admit(&mut self, key: &str, version: Version) -> bool {
        if !self.is_new(key, version) {
            return false;
        }
        match self.last.get_mut(key) {
            Some(last) => *last = version,
            None => {
                self.last.insert(key.to_owned(), version);
            }
        }
        self.order.push_back((key.to_owned(), version));
        while self.last.len() > self.capacity || self.order.len() > 2 * self.capacity {
            let Some((old_key, old_version)) = self.order.pop_front() else {
                break;
            };
            if self.last.get(&old_key) == Some(&old_version) {
                self.last.remove(&old_key);
                self.floor = self.floor.max(old_version);
            }
        }
        true
    }
}

/// Whether a merged watch waits for a source's feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feed {
    /// Being opened: waited for (a change may already be on its way through it).
    Opening,
    /// Open: waited for.
    Open,
    /// Ended or failed (being reopened): not waited for.
    Down,
}

/// The changes of one key held back, and how far each source's feed has come for the key.
#[derive(Debug)]
struct HeldKey {
    /// Version -> the event's bytes.
    changes: BTreeMap<Version, Bytes>,
    /// Per source, the newest version of the key its feed reported.
    reached: Vec<Option<Version>>,
    /// The sources that replicate the key.
    replicas: Vec<usize>,
}

/// Puts the feeds of several replicas back into one stream, per key in version order (see the
/// module's documentation).
#[derive(Debug)]
struct Resolver {
    feeds: Vec<Feed>,
    keys: HashMap<String, HeldKey>,
    /// Held changes in arrival order, for the deadline and the caps (entries of changes passed
    /// since are skipped when they come up).
    arrivals: VecDeque<(Instant, String, Version)>,
    held: usize,
    held_bytes: usize,
    order: KeyOrder,
    hold_at_most: Duration,
}

impl Resolver {
    fn new(sources: usize, hold_at_most: Duration) -> Resolver {
        Resolver {
            feeds: vec![Feed::Opening; sources],
            keys: HashMap::new(),
            arrivals: VecDeque::new(),
            held: 0,
            held_bytes: 0,
            order: KeyOrder::new(REMEMBERED_KEYS),
            hold_at_most,
        }
    }

    /// A change reported by `source`; returns what can be passed now, in order. `replicas`
    /// names the sources that replicate `key` (asked once per key held).
    fn offer(
        &mut self,
        source: usize,
        key: &str,
        version: Version,
        bytes: Bytes,
        now: Instant,
        replicas: impl FnOnce(&str) -> Vec<usize>,
    ) -> Vec<Bytes> {
        if !self.order.is_new(key, version) {
            return Vec::new(); // passed already (another replica, or a resumed feed's replay)
        }
        let sources = self.feeds.len();
        let held = self.keys.entry(key.to_owned()).or_insert_with(|| HeldKey {
            changes: BTreeMap::new(),
            reached: vec![None; sources],
            replicas: replicas(key),
        });
        if let Some(reached) = held.reached.get_mut(source) {
            *reached = (*reached).max(Some(version));
        }
        if let std::collections::btree_map::Entry::Vacant(slot) = held.changes.entry(version) {
            self.held += 1;
            self.held_bytes += bytes.len();
            slot.insert(bytes);
            self.arrivals.push_back((now, key.to_owned(), version));
        }
        let mut out = Vec::new();
        self.release(key, None, &mut out);
        self.expire(now, &mut out);
        out
    }

    /// A source's feed opened, ended or failed; returns what can be passed now.
    fn feed(&mut self, source: usize, feed: Feed) -> Vec<Bytes> {
        let mut out = Vec::new();
        let Some(state) = self.feeds.get_mut(source) else {
            return out;
        };
        *state = feed;
        if feed == Feed::Down {
            let keys: Vec<String> = self.keys.keys().cloned().collect();
            for key in keys {
                self.release(&key, None, &mut out);
            }
        }
        out
    }

    /// When the oldest held change must be passed.
    fn deadline(&self) -> Option<Instant> {
        self.arrivals
            .front()
            .map(|(at, ..)| *at + self.hold_at_most)
    }

    /// Passes the changes held past their deadline or beyond the caps (with everything older
    /// of their keys).
    fn expire(&mut self, now: Instant, out: &mut Vec<Bytes>) {
        while let Some((at, ..)) = self.arrivals.front() {
            let over = self.held > HELD_CHANGES || self.held_bytes > HELD_BYTES;
            if !over && *at + self.hold_at_most > now {
                break;
            }
            if let Some((_, key, version)) = self.arrivals.pop_front() {
                self.release(&key, Some(version), out);
            }
        }
    }

    /// Passes `key`'s held changes, oldest first, while every open replica feed has reported
    /// them (or they are at or below `force`).
    fn release(&mut self, key: &str, force: Option<Version>, out: &mut Vec<Bytes>) {
        let Some(held) = self.keys.get_mut(key) else {
            return;
        };
        while let Some(entry) = held.changes.first_entry() {
            let version = *entry.key();
            let resolved = held.replicas.iter().all(|&s| {
                self.feeds.get(s) == Some(&Feed::Down)
                    || held.reached.get(s).copied().flatten() >= Some(version)
            });
            if !resolved && force.is_none_or(|f| version > f) {
                break;
            }
            let bytes = entry.remove();
            self.held -= 1;
            self.held_bytes -= bytes.len();
            if self.order.admit(key, version) {
                out.push(bytes);
            }
        }
        if held.changes.is_empty() {
            self.keys.remove(key);
        }
    }
}

/// What the sources of a merged watch tell its merging task.
#[derive(Debug)]
enum Event {
    /// A change or a final `lagged` from source `0` (this node) or `1..` (the peers).
    Block(usize, Block),
    /// A source's feed opened, ended or failed.
    Feed(usize, Feed),
}

/// Starts a watch of `filter` that merges this node's feed with the feeds of the peers that
/// replicate what it watches (every other member for a prefix, the key's other replicas for a
/// key). Answers once every feed is open (or failed, or [`OPEN_WAIT`] passed), so a change
/// applied anywhere after the answer is in the stream.
pub async fn merged(cluster: Cluster, filter: Filter, after: Option<Version>) -> Response {
    let (out, rx) = mpsc::channel::<Bytes>(watch::QUEUED_FRAMES);
    let (sources, events) = mpsc::channel::<Event>(QUEUED_EVENTS);
    let hub: Arc<WatchHub> = cluster.watch_hub();
    let me = cluster.url();
    let peers: Vec<Arc<str>> = match &filter {
        Filter::Key(key) => cluster
            .replicas(key)
            .into_iter()
            .filter(|r| *r != me)
            .collect(),
        Filter::Prefix(_) => cluster.other_members(),
    };
    // A key watch asks peers for that key alone (a peer too old for `key=` sends the key as a
    // prefix, and the merge drops the other keys that shares).
    let (prefix, exact_key) = match &filter {
        Filter::Key(key) => (key.clone(), true),
        Filter::Prefix(prefix) => (prefix.clone(), false),
    };
    let local = watch::stream(hub.clone(), filter.clone(), after, None);
    let opened = futures::future::join_all(peers.iter().map(|peer| {
        let open = cluster.open_peer_watch(peer, &prefix, exact_key, after, "watch");
        async move { tokio::time::timeout(OPEN_WAIT, open).await.ok()?.ok() }
    }))
    .await;
    let mut resolver = Resolver::new(peers.len() + 1, HOLD_AT_MOST);
    resolver.feed(0, Feed::Open);
    tokio::spawn(local_source(local, sources.clone()));
    for (i, (peer, first)) in peers.iter().zip(opened).enumerate() {
        resolver.feed(
            i + 1,
            if first.is_some() {
                Feed::Open
            } else {
                Feed::Down
            },
        );
        let feed = PeerFeed {
            cluster: cluster.clone(),
            source: i + 1,
            peer: peer.clone(),
            prefix: prefix.clone(),
            exact_key,
            after,
        };
        tokio::spawn(feed.follow(first, sources.clone()));
    }
    let mut index: HashMap<Arc<str>, usize> = HashMap::new();
    index.insert(me, 0);
    for (i, peer) in peers.into_iter().enumerate() {
        index.insert(peer, i + 1);
    }
    let replicas = move |key: &str| -> Vec<usize> {
        cluster
            .replicas(key)
            .iter()
            .filter_map(|r| index.get(r).copied())
            .collect()
    };
    let counted = hub.watcher(kv_cluster::watch::Reader::Client);
    tokio::spawn(async move {
        let _counted = counted;
        merge(events, out, filter, resolver, replicas).await;
    });
    watch::sse_response(rx)
}

/// This node's own feed, parsed; when it ends (lagged, shutdown) the merged watch ends.
async fn local_source(local: Response, sources: mpsc::Sender<Event>) {
    let mut body = local.into_body().into_data_stream();
    let mut parser = BlockParser::default();
    // Also stop when the watcher left: a quiet feed sends only pings, which are never passed on.
    while let Some(Ok(chunk)) = tokio::select! {
        chunk = body.next() => chunk,
        () = sources.closed() => return,
    } {
        for block in parser.feed(&chunk) {
            if sources.send(Event::Block(0, block)).await.is_err() {
                return;
            }
        }
    }
    let message = "this node's own feed ended (it is shutting down or the watcher fell behind)";
    let _ = sources
        .send(Event::Block(0, lagged("slow_consumer", message)))
        .await;
}

/// One peer's feed of a merged watch.
struct PeerFeed {
    cluster: Cluster,
    /// Its index among the watch's sources.
    source: usize,
    peer: Arc<str>,
    prefix: String,
    /// The feed of `prefix` as one key.
    exact_key: bool,
    /// The last version it sent (where a reopened feed resumes).
    after: Option<Version>,
}

impl PeerFeed {
    /// Reads the feed (`first`: already opened), reopening it after it ends or fails (with the
    /// last id it sent; without one after `history_gone`: the peer restarted, and its keys'
    /// other replicas cover the gap), until the watch ends.
    async fn follow(
        mut self,
        mut first: Option<kv_cluster::PeerWatch>,
        sources: mpsc::Sender<Event>,
    ) {
        while !sources.is_closed() {
            let response = match first.take() {
                Some(response) => Some(response),
                None => {
                    let open = self.cluster.open_peer_watch(
                        &self.peer,
                        &self.prefix,
                        self.exact_key,
                        self.after,
                        "watch",
                    );
                    match open.await {
                        Ok(response) => {
                            if sources
                                .send(Event::Feed(self.source, Feed::Open))
                                .await
                                .is_err()
                            {
                                return;
                            }
                            Some(response)
                        }
                        Err(_) => None,
                    }
                }
            };
            if let Some(response) = response {
                if !self.read(response, &sources).await {
                    return;
                }
                if sources
                    .send(Event::Feed(self.source, Feed::Down))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            tokio::select! {
                () = tokio::time::sleep(REOPEN_AFTER) => {}
                () = sources.closed() => return,
            }
        }
    }

    /// Passes one opened feed's changes on until it ends; false when the watch ended.
    async fn read(
        &mut self,
        mut response: kv_cluster::PeerWatch,
        sources: &mpsc::Sender<Event>,
    ) -> bool {
        let mut parser = BlockParser::default();
        while let Ok(Ok(Some(chunk))) = tokio::select! {
            chunk = tokio::time::timeout(PEER_SILENT_FOR, response.chunk()) => chunk,
            () = sources.closed() => return false,
        } {
            for block in parser.feed(&chunk) {
                let history_gone = match &block {
                    Block::Change { version, .. } => {
                        self.after = Some(*version);
                        false
                    }
                    Block::Lagged { history_gone, .. } => *history_gone,
                };
                if history_gone {
                    self.after = None;
                } else if sources
                    .send(Event::Block(self.source, block))
                    .await
                    .is_err()
                {
                    return false;
                }
            }
        }
        true
    }
}

/// Passes the sources' changes of `filter` through a [`Resolver`] to the watcher; a `lagged`
/// from a source ends the watch. Pings after 15 s without anything sent.
async fn merge(
    mut events: mpsc::Receiver<Event>,
    out: mpsc::Sender<Bytes>,
    filter: Filter,
    mut resolver: Resolver,
    replicas: impl Fn(&str) -> Vec<usize>,
) {
    if !watch::send(&out, watch::opening()).await {
        return;
    }
    let mut quiet_since = Instant::now();
    loop {
        let ping_at = quiet_since + watch::PING_INTERVAL;
        let wake_at = resolver.deadline().map_or(ping_at, |d| d.min(ping_at));
        let passed = tokio::select! {
            event = events.recv() => match event {
                Some(Event::Block(source, Block::Change { key, version, bytes })) => {
                    if !filter.matches(&key) {
                        continue;
                    }
                    resolver.offer(source, &key, version, bytes, Instant::now(), &replicas)
                }
                Some(Event::Block(_, Block::Lagged { bytes, .. })) => {
                    watch::send(&out, bytes).await;
                    return;
                }
                Some(Event::Feed(source, feed)) => resolver.feed(source, feed),
                None => return,
            },
            () = tokio::time::sleep_until(wake_at.into()) => {
                let mut passed = Vec::new();
                resolver.expire(Instant::now(), &mut passed);
                if passed.is_empty() && Instant::now() >= ping_at {
                    passed.push(Bytes::from_static(b": ping\n\n"));
                }
                passed
            }
        };
        if passed.is_empty() {
            continue;
        }
        quiet_since = Instant::now();
        let mut frame = BytesMut::new();
        for bytes in passed {
            frame.extend_from_slice(&bytes);
            if frame.len() >= watch::FRAME_BYTES && !watch::send(&out, frame.split().freeze()).await
            {
                return;
            }
        }
        if !frame.is_empty() && !watch::send(&out, frame.freeze()).await {
            return;
        }
    }
}

fn lagged(reason: &str, message: &str) -> Block {
    Block::Lagged {
        history_gone: reason == "history_gone",
        bytes: watch::lagged_frame(reason, message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(ms: u64) -> Version {
        Version {
            hlc: ms << 16,
            node: 1,
        }
    }

    #[test]
    fn blocks_are_parsed_across_chunk_boundaries() {
        let stream = b"retry: 1000\n: watching\n\nid: 0000000000010000-00000001\nevent: put\n\
                       data: {\"key\":\"a\",\"value\":[1,\ndata: 2],\"version\":\"x\"}\n\n: ping\n\n\
                       event: lagged\ndata: {\"error\":\"lagged\",\"reason\":\"history_gone\"}\n\n";
        let mut parser = BlockParser::default();
        let mut blocks = Vec::new();
        for chunk in stream.chunks(7) {
            blocks.extend(parser.feed(chunk));
        }
        assert_eq!(blocks.len(), 2, "{blocks:?}");
        let Block::Change { key, version, .. } = &blocks[0] else {
            panic!("{blocks:?}")
        };
        assert_eq!((key.as_str(), *version), ("a", v(1)));
        assert!(matches!(
            blocks[1],
            Block::Lagged {
                history_gone: true,
                ..
            }
        ));
    }

    #[test]
    fn key_order_drops_repeats_and_older_versions_per_key() {
        let mut order = KeyOrder::new(100);
        assert!(order.admit("a", v(2)));
        assert!(
            !order.admit("a", v(2)),
            "the same change from a second replica"
        );
        assert!(!order.admit("a", v(1)), "older after newer");
        assert!(order.admit("b", v(1)), "other keys are independent");
        assert!(order.admit("a", v(3)));
    }

    #[test]
    fn key_order_stays_bounded_and_refuses_what_it_cannot_tell() {
        let mut order = KeyOrder::new(2);
        for (i, key) in ["a", "b", "c", "d"].iter().enumerate() {
            assert!(order.admit(key, v(10 + i as u64)));
        }
        assert!(order.last.len() <= 2 && order.order.len() <= 4);
        assert!(
            !order.admit("a", v(10)),
            "a forgotten key's old version is refused"
        );
        assert!(order.admit("a", v(20)), "a newer one passes");
        for i in 0..1000 {
            order.admit("z", v(100 + i));
        }
        assert!(
            order.order.len() <= 4,
            "one busy key does not grow the queue"
        );
    }

    fn frame(key: &str, version: Version) -> Bytes {
        Bytes::from(format!("{key}@{}\n", version.hlc >> 16))
    }

    /// Offers `key@ms` from `source` at `now` (three sources, every one a replica).
    fn offer(r: &mut Resolver, source: usize, key: &str, ms: u64, now: Instant) -> Vec<String> {
        let out = r.offer(source, key, v(ms), frame(key, v(ms)), now, |_| {
            vec![0, 1, 2]
        });
        out.iter()
            .map(|b| String::from_utf8_lossy(b).trim().to_owned())
            .collect()
    }

    #[test]
    fn a_change_waits_until_every_open_replica_feed_reached_it() {
        let now = Instant::now();
        let mut r = Resolver::new(3, Duration::from_secs(2));
        for s in 0..3 {
            assert!(r.feed(s, Feed::Open).is_empty());
        }
        // Replica 2 got v2 first and never applies v1; replicas 0 and 1 apply v1 then v2.
        assert!(
            offer(&mut r, 2, "a", 2, now).is_empty(),
            "0 and 1 not heard"
        );
        assert!(offer(&mut r, 1, "a", 1, now).is_empty(), "0 not heard");
        assert_eq!(offer(&mut r, 0, "a", 1, now), ["a@1"], "every feed at >= 1");
        assert!(offer(&mut r, 1, "a", 2, now).is_empty(), "0 still at 1");
        assert_eq!(offer(&mut r, 0, "a", 2, now), ["a@2"]);
        assert!(offer(&mut r, 2, "a", 2, now).is_empty(), "a repeat");
        assert!(r.keys.is_empty() && r.held == 0 && r.held_bytes == 0);
        // Other keys do not wait for this one.
        assert!(offer(&mut r, 0, "b", 5, now).is_empty());
        assert!(offer(&mut r, 1, "c", 6, now).is_empty());
        assert!(offer(&mut r, 1, "b", 5, now).is_empty());
        assert_eq!(offer(&mut r, 2, "b", 5, now), ["b@5"]);
    }

    #[test]
    fn a_feed_that_is_down_is_not_waited_for_and_nothing_waits_past_the_hold() {
        let now = Instant::now();
        let mut r = Resolver::new(3, Duration::from_secs(2));
        assert!(
            offer(&mut r, 0, "a", 3, now).is_empty(),
            "opening feeds are waited for"
        );
        assert!(offer(&mut r, 1, "a", 1, now).is_empty());
        assert!(r.feed(1, Feed::Open).is_empty());
        assert_eq!(
            r.feed(2, Feed::Down),
            ["a@1\n"],
            "1 is resolved without feed 2"
        );
        // a@3 waits for feed 1; at the deadline it is passed anyway.
        assert_eq!(r.deadline(), Some(now + Duration::from_secs(2)));
        let mut out = Vec::new();
        r.expire(now + Duration::from_millis(1999), &mut out);
        assert!(out.is_empty());
        r.expire(now + Duration::from_secs(2), &mut out);
        assert_eq!(out, ["a@3\n"]);
        // Feed 1 brings a@2 late: never after a@3.
        assert!(offer(&mut r, 1, "a", 2, now + Duration::from_secs(3)).is_empty());
        assert!(r.keys.is_empty() && r.deadline().is_none());
    }

    #[test]
    fn the_held_changes_are_capped() {
        let now = Instant::now();
        let mut r = Resolver::new(3, Duration::from_secs(3600));
        let mut passed = 0;
        for i in 0..(HELD_CHANGES as u64 + 10) {
            passed += offer(&mut r, 0, &format!("k{i}"), i + 1, now).len();
        }
        assert_eq!(passed, 10, "the oldest beyond the cap are passed");
        assert!(r.held <= HELD_CHANGES);
    }

    #[test]
    fn interleaved_feeds_come_out_in_version_order_per_key() {
        // Three replicas apply random subsets of each key's versions, always in increasing
        // order; merged, every version any replica applied comes out once, in order.
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _case in 0..200 {
            let now = Instant::now();
            let mut r = Resolver::new(3, Duration::from_secs(3600));
            for s in 0..3 {
                r.feed(s, Feed::Open);
            }
            let keys = ["a", "b", "c"];
            // Per source, the (key, version) it applies, in its order.
            let mut feeds: Vec<VecDeque<(&str, u64)>> = vec![VecDeque::new(); 3];
            let mut applied = std::collections::BTreeSet::new();
            for (k, key) in keys.iter().enumerate() {
                let top = 2 + rng.random_range(0..6u64);
                for ms in 1..=top {
                    let version = ms * 10 + k as u64;
                    for feed in feeds.iter_mut() {
                        // Each applies the newest; older ones only sometimes (overtaken).
                        if ms == top || rng.random_bool(0.6) {
                            feed.push_back((key, version));
                            applied.insert((*key, version));
                        }
                    }
                }
            }
            let mut out = Vec::new();
            while feeds.iter().any(|f| !f.is_empty()) {
                let s = rng.random_range(0..3);
                if let Some((key, version)) = feeds[s].pop_front() {
                    out.extend(offer(&mut r, s, key, version, now));
                }
            }
            let mut last: HashMap<String, u64> = HashMap::new();
            for line in &out {
                let (key, version) = line.split_once('@').unwrap();
                let version: u64 = version.parse().unwrap();
                let before = last.insert(key.to_owned(), version);
                assert!(
                    before < Some(version),
                    "{key}@{version} after {before:?}: {out:?}"
                );
            }
            assert_eq!(out.len(), applied.len(), "{out:?} vs {applied:?}");
        }
    }
}
