//! Prefix watches in clusters where this node does not hold every key: this node's own feed
//! merged with every peer's (`GET /internal/watch`), each change passed once and, per key, in
//! version order ([`KeyOrder`]). Each source is a stream of the format `watch.rs` writes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use kv_cluster::{Cluster, WatchHub};
use kv_core::Version;
use tokio::sync::mpsc;

use crate::watch::{self, Filter};

/// Keys whose last version a merged watch remembers (about 100 bytes each).
const REMEMBERED_KEYS: usize = 50_000;
/// Parsed events queued from all sources to the merging task.
const QUEUED_EVENTS: usize = 256;
/// Wait before reopening a peer's feed that ended or failed.
const REOPEN_AFTER: Duration = Duration::from_secs(1);
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

    fn admit(&mut self, key: &str, version: Version) -> bool {
        match self.last.get_mut(key) {
            Some(last) if *last >= version => return false,
            Some(last) => *last = version,
            None if version <= self.floor => return false,
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

/// Starts a prefix watch that merges this node's feed with every peer's.
pub fn merged(cluster: Cluster, prefix: String, after: Option<Version>) -> Response {
    let (out, rx) = mpsc::channel::<Bytes>(watch::QUEUED_FRAMES);
    let (sources, events) = mpsc::channel::<Block>(QUEUED_EVENTS);
    let hub: Arc<WatchHub> = cluster.watch_hub();
    let local = watch::stream(hub, Filter::Prefix(prefix.clone()), after);
    tokio::spawn(local_source(local, sources.clone()));
    for peer in cluster.other_members() {
        let (cluster, prefix, sources) = (cluster.clone(), prefix.clone(), sources.clone());
        tokio::spawn(peer_source(cluster, peer, prefix, after, sources));
    }
    tokio::spawn(merge(events, out));
    watch::sse_response(rx)
}

/// This node's own feed, parsed; when it ends (lagged, shutdown) the merged watch ends.
async fn local_source(local: Response, sources: mpsc::Sender<Block>) {
    let mut body = local.into_body().into_data_stream();
    let mut parser = BlockParser::default();
    // Also stop when the watcher left: a quiet feed sends only pings, which are never passed on.
    while let Some(Ok(chunk)) = tokio::select! {
        chunk = body.next() => chunk,
        () = sources.closed() => return,
    } {
        for block in parser.feed(&chunk) {
            if sources.send(block).await.is_err() {
                return;
            }
        }
    }
    let message = "this node's own feed ended (it is shutting down or the watcher fell behind)";
    let _ = sources.send(lagged("slow_consumer", message)).await;
}

/// One peer's feed, reopened after it ends or fails (with the last id it sent; without one
/// after `history_gone`: the peer restarted, and its keys' other replicas cover the gap).
async fn peer_source(
    cluster: Cluster,
    peer: Arc<str>,
    prefix: String,
    mut after: Option<Version>,
    sources: mpsc::Sender<Block>,
) {
    while !sources.is_closed() {
        if let Ok(mut response) = cluster
            .open_peer_watch(&peer, &prefix, after, "watch")
            .await
        {
            let mut parser = BlockParser::default();
            while let Ok(Ok(Some(chunk))) = tokio::select! {
                chunk = tokio::time::timeout(PEER_SILENT_FOR, response.chunk()) => chunk,
                () = sources.closed() => return,
            } {
                for block in parser.feed(&chunk) {
                    match &block {
                        Block::Change { version, .. } => after = Some(*version),
                        Block::Lagged { history_gone, .. } if *history_gone => after = None,
                        Block::Lagged { .. } => {}
                    }
                    let history_gone = matches!(
                        block,
                        Block::Lagged {
                            history_gone: true,
                            ..
                        }
                    );
                    if !history_gone && sources.send(block).await.is_err() {
                        return;
                    }
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(REOPEN_AFTER) => {}
            () = sources.closed() => return,
        }
    }
}

/// Passes each source's changes through [`KeyOrder`] to the watcher; a `lagged` from a source
/// ends the watch. Pings after 15 s without a change.
async fn merge(mut events: mpsc::Receiver<Block>, out: mpsc::Sender<Bytes>) {
    let mut order = KeyOrder::new(REMEMBERED_KEYS);
    if !watch::send(&out, watch::opening()).await {
        return;
    }
    loop {
        let block = tokio::select! {
            block = events.recv() => block,
            () = tokio::time::sleep(watch::PING_INTERVAL) => {
                if !watch::send(&out, Bytes::from_static(b": ping\n\n")).await {
                    return;
                }
                continue;
            }
        };
        match block {
            Some(Block::Change {
                key,
                version,
                bytes,
            }) => {
                if order.admit(&key, version) && !watch::send(&out, bytes).await {
                    return;
                }
            }
            Some(Block::Lagged { bytes, .. }) => {
                watch::send(&out, bytes).await;
                return;
            }
            None => return,
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
}
