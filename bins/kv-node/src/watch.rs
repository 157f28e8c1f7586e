//! Change streams over Server-Sent Events: `GET /v1/{key}?watch=true` and
//! `GET /v1?prefix=P&watch=true` answer `text/event-stream` and send this node's applied changes
//! (`kv_cluster::watch::WatchHub`) as `put` / `delete` events, resumable with `Last-Event-ID`.
//! The wire format is in README.md ("Watches").

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use kv_cluster::watch::{Change, Read, Reader, Start};
use kv_cluster::WatchHub;
use kv_core::Version;
use tokio::sync::mpsc;

use crate::error::ApiError;

/// A keep-alive comment is sent after this long without an event, so proxies and clients
/// can tell a quiet stream from a dead one.
pub const PING_INTERVAL: Duration = Duration::from_secs(15);
/// Frames queued between the reader task and the connection: all a watcher may hold here.
pub const QUEUED_FRAMES: usize = 8;
/// Events read from the history per frame (a frame also stops at `FRAME_BYTES`).
const EVENTS_PER_READ: usize = 256;
/// A frame is sent once it holds this many bytes.
pub const FRAME_BYTES: usize = 256 * 1024;
/// A watcher that takes no frame for this long is dropped (it reads nothing at all).
const STALLED_AFTER: Duration = Duration::from_secs(30);
/// Reconnection delay suggested to clients (`retry:`), in milliseconds.
const RETRY_MS: u64 = 1000;

/// What a watch follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// One key.
    Key(String),
    /// Every key starting with this (empty: every key).
    Prefix(String),
}

impl Filter {
    pub fn matches(&self, key: &str) -> bool {
        match self {
            Filter::Key(k) => k == key,
            Filter::Prefix(p) => key.starts_with(p.as_str()),
        }
    }
}

/// True when the query asks for a watch (`watch=true` / `1`); `false` / `0` / absent: no.
pub fn wants_watch(query: Option<&str>) -> Result<bool, ApiError> {
    let mut watch = false;
    for (name, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if name == "watch" {
            watch = match value.as_ref() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => {
                    return Err(ApiError::bad_request(
                        "invalid_query",
                        format!("watch={value}: expected true or false"),
                    ))
                }
            };
        }
    }
    Ok(watch)
}

/// The version a resumed watch continues after: the `Last-Event-ID` header (a `version`).
pub fn last_event_id(headers: &HeaderMap) -> Result<Option<Version>, ApiError> {
    let Some(raw) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let text = raw.to_str().unwrap_or_default().trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        ApiError::bad_request(
            "invalid_version",
            format!(
                "Last-Event-ID: {:?} is not a version (the id of an event of this stream)",
                text.chars().take(64).collect::<String>()
            ),
        )
    })
}

/// `GET /internal/watch?prefix=P` (or `?key=K` for one key; peers only): this node's own feed,
/// which a peer merges into a watch (`watch_merge.rs`).
pub async fn own_feed(
    axum::extract::State(app): axum::extract::State<crate::routes::AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    let after = last_event_id(&headers)?;
    let param = |wanted: &str| {
        url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
            .find(|(name, _)| name == wanted)
            .map(|(_, value)| value.into_owned())
    };
    let filter = match param("key") {
        Some(key) => Filter::Key(key),
        None => Filter::Prefix(param("prefix").unwrap_or_default()),
    };
    Ok(stream(
        app.cluster().watch_hub(),
        filter,
        after,
        Some(Reader::Peer),
    ))
}

/// Starts streaming the changes `filter` selects, after `after` if given; counted in the
/// node's status as `reader` (`None`: part of a merged watch, which counts itself).
pub fn stream(
    hub: Arc<WatchHub>,
    filter: Filter,
    after: Option<Version>,
    reader: Option<Reader>,
) -> Response {
    let wake = hub.subscribe();
    let (tx, rx) = mpsc::channel::<Bytes>(QUEUED_FRAMES);
    let opening = opening();
    match hub.start(after) {
        Ok(start) => {
            tokio::spawn(pump(hub, filter, start, wake, tx, opening, reader));
        }
        Err(gone) => {
            let mut frame = opening.to_vec();
            frame.extend_from_slice(&lagged_frame(
                "history_gone",
                &format!(
                    "this node no longer holds the changes after {}: list the keys again, then \
                     watch from the listing (oldest id it can resume after: {})",
                    after.unwrap_or_default(),
                    gone.oldest
                ),
            ));
            // The channel is new and empty, so this cannot fail for lack of room.
            let _ = tx.try_send(Bytes::from(frame));
        }
    }
    sse_response(rx)
}

/// The first frame of every stream: the suggested reconnection delay and a comment.
pub fn opening() -> Bytes {
    Bytes::from(format!("retry: {RETRY_MS}\n: watching\n\n"))
}

/// A `200 text/event-stream` answer whose body is the frames `rx` receives, until it closes.
pub fn sse_response(rx: mpsc::Receiver<Bytes>) -> Response {
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|frame| (Ok::<Bytes, std::convert::Infallible>(frame), rx))
    });
    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// Reads the history from the watcher's cursor and queues frames until the watcher goes away,
/// falls behind the history (`lagged`), stops reading, or the node shuts down.
async fn pump(
    hub: Arc<WatchHub>,
    filter: Filter,
    start: Start,
    mut wake: tokio::sync::watch::Receiver<u64>,
    tx: mpsc::Sender<Bytes>,
    opening: Bytes,
    reader: Option<Reader>,
) {
    let _counted = reader.map(|reader| hub.watcher(reader));
    if !send(&tx, opening).await {
        return;
    }
    let mut cursor = start.cursor;
    loop {
        if hub.is_closed() {
            return;
        }
        let events = match hub.read(cursor, EVENTS_PER_READ) {
            Read::Events(events, _) => events,
            Read::Lagged => {
                let message = "this watcher fell behind the changes the node keeps: list the \
                               keys again, then watch from the listing";
                send(&tx, lagged_frame("slow_consumer", message)).await;
                return;
            }
        };
        let mut frame = Vec::new();
        let mut consumed = 0u64;
        for (seq, change) in (cursor..).zip(&events) {
            consumed += 1;
            let replayed_and_old = seq < start.replay_until
                && start
                    .replay_above
                    .is_some_and(|above| change.version <= above);
            if filter.matches(&change.key) && !replayed_and_old {
                push_event(&mut frame, change);
            }
            if frame.len() >= FRAME_BYTES {
                break;
            }
        }
        cursor += consumed;
        if !frame.is_empty() {
            if !send(&tx, Bytes::from(frame)).await {
                return;
            }
            continue;
        }
        if consumed > 0 {
            continue;
        }
        // Caught up: wait for a change, the watcher leaving, or the ping interval.
        tokio::select! {
            changed = wake.changed() => if changed.is_err() { return },
            () = tx.closed() => return,
            () = tokio::time::sleep(PING_INTERVAL) => {
                if !send(&tx, Bytes::from_static(b": ping\n\n")).await {
                    return;
                }
            }
        }
    }
}

/// Queues a frame; false when the watcher is gone or took nothing for [`STALLED_AFTER`].
pub async fn send(tx: &mpsc::Sender<Bytes>, frame: Bytes) -> bool {
    matches!(
        tokio::time::timeout(STALLED_AFTER, tx.send(frame)).await,
        Ok(Ok(()))
    )
}

/// Appends one event: `id`, `event`, then the JSON of the change on `data:` lines (a stored
/// value may hold line breaks; SSE joins `data:` lines with `\n`, which JSON reads as space).
fn push_event(frame: &mut Vec<u8>, change: &Change) {
    let key = serde_json::to_string(&change.key).unwrap_or_else(|_| "\"\"".to_owned());
    let version = &change.version;
    let (kind, json) = match &change.value {
        Some(value) => {
            let mut json = format!("{{\"key\":{key},\"value\":").into_bytes();
            json.extend_from_slice(value);
            json.extend_from_slice(format!(",\"version\":\"{version}\"}}").as_bytes());
            ("put", json)
        }
        None => (
            "delete",
            format!("{{\"key\":{key},\"deleted\":true,\"version\":\"{version}\"}}").into_bytes(),
        ),
    };
    frame.extend_from_slice(format!("id: {version}\nevent: {kind}\n").as_bytes());
    for line in json.split(|&b| b == b'\n' || b == b'\r') {
        frame.extend_from_slice(b"data: ");
        frame.extend_from_slice(line);
        frame.push(b'\n');
    }
    frame.push(b'\n');
}

/// The last event of a stream that cannot go on: no `id`, so `Last-Event-ID` stays the last
/// change received.
pub fn lagged_frame(reason: &str, message: &str) -> Bytes {
    let data = serde_json::json!({ "error": "lagged", "reason": reason, "message": message });
    Bytes::from(format!("event: lagged\ndata: {data}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(key: &str, value: Option<&'static [u8]>) -> Change {
        Change {
            key: key.into(),
            version: Version {
                hlc: 1 << 16,
                node: 2,
            },
            value: value.map(Bytes::from_static),
        }
    }

    #[test]
    fn events_carry_the_get_and_delete_shapes() {
        let mut frame = Vec::new();
        push_event(&mut frame, &change("a\"b", Some(b"{\"x\": 1}")));
        push_event(&mut frame, &change("k", None));
        let text = String::from_utf8(frame).unwrap();
        assert_eq!(
            text,
            "id: 0000000000010000-00000002\nevent: put\n\
             data: {\"key\":\"a\\\"b\",\"value\":{\"x\": 1},\"version\":\"0000000000010000-00000002\"}\n\n\
             id: 0000000000010000-00000002\nevent: delete\n\
             data: {\"key\":\"k\",\"deleted\":true,\"version\":\"0000000000010000-00000002\"}\n\n"
        );
    }

    #[test]
    fn a_value_with_line_breaks_spans_data_lines() {
        let mut frame = Vec::new();
        push_event(&mut frame, &change("k", Some(b"[1,\n2]")));
        let text = String::from_utf8(frame).unwrap();
        let data: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        let json: serde_json::Value = serde_json::from_str(&data.join("\n")).unwrap();
        assert_eq!(json["value"], serde_json::json!([1, 2]));
    }

    #[test]
    fn the_watch_parameter_and_last_event_id_are_checked() {
        assert!(wants_watch(Some("prefix=a&watch=true")).unwrap());
        assert!(!wants_watch(Some("watch=0")).unwrap());
        assert!(!wants_watch(None).unwrap());
        assert!(wants_watch(Some("watch=yes")).is_err());
        let mut headers = HeaderMap::new();
        assert_eq!(last_event_id(&headers).unwrap(), None);
        headers.insert(
            "last-event-id",
            HeaderValue::from_static("0000000000010000-00000002"),
        );
        assert_eq!(
            last_event_id(&headers).unwrap(),
            Some(Version {
                hlc: 1 << 16,
                node: 2
            })
        );
        headers.insert("last-event-id", HeaderValue::from_static("nope"));
        assert!(last_event_id(&headers).is_err());
    }

    /// Reads the stream's body until `until` appears in it (or 5 s pass).
    async fn read_until(response: Response, until: &str) -> String {
        use http_body_util::BodyExt;
        let mut body = response.into_body();
        let mut text = String::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !text.contains(until) {
            let frame = tokio::time::timeout_at(deadline, body.frame()).await;
            let Ok(Some(Ok(frame))) = frame else {
                panic!("{until:?} never came; got {text:?}")
            };
            if let Ok(data) = frame.into_data() {
                text.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
        text
    }

    fn change_at(key: &str, ms: u64) -> Change {
        Change {
            key: key.into(),
            version: Version {
                hlc: ms << 16,
                node: 1,
            },
            value: Some(Bytes::from_static(b"1")),
        }
    }

    #[tokio::test]
    async fn a_resumed_stream_replays_the_slack_before_its_id_then_goes_live() {
        let hub = Arc::new(WatchHub::new(
            kv_cluster::HistoryLimits::default(),
            Version::ZERO,
        ));
        let ms = 1_000_000;
        hub.push(change_at("k/old", ms - 20_000));
        hub.push(change_at("k/near", ms - 5_000));
        hub.push(change_at("x/other", ms - 1_000));
        let resume_from = change_at("k/last", ms).version;
        hub.push(change_at("k/last", ms));
        let response = stream(
            hub.clone(),
            Filter::Prefix("k/".into()),
            Some(resume_from),
            Some(Reader::Client),
        );
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        hub.push(change_at("k/live", ms + 1));
        let text = read_until(response, "k/live").await;
        assert!(!text.contains("k/old"), "older than the slack: {text}");
        assert!(!text.contains("x/other"), "outside the prefix: {text}");
        let near = text.find("k/near").unwrap();
        let last = text.find("k/last").unwrap();
        assert!(near < last && last < text.find("k/live").unwrap());
        assert_eq!(hub.watchers(), 1);
    }

    #[tokio::test]
    async fn a_watcher_behind_the_history_gets_lagged_and_the_end() {
        let limits = kv_cluster::HistoryLimits {
            max_events: 2,
            max_bytes: 1 << 20,
        };
        let hub = Arc::new(WatchHub::new(limits, Version::ZERO));
        let response = stream(
            hub.clone(),
            Filter::Prefix(String::new()),
            None,
            Some(Reader::Client),
        );
        // The pump has not run yet (one thread): it falls behind before its first read.
        for ms in 1..=10 {
            hub.push(change_at("k", ms));
        }
        let text = read_until(response, "event: lagged").await;
        assert!(
            text.contains("slow_consumer") && !text.contains("event: put"),
            "{text}"
        );

        let gone = stream(hub, Filter::Key("k".into()), Some(Version::ZERO), None);
        let text = read_until(gone, "event: lagged").await;
        assert!(text.contains("history_gone"), "{text}");
    }

    #[test]
    fn filters_select_a_key_or_a_prefix() {
        assert!(Filter::Key("a".into()).matches("a"));
        assert!(!Filter::Key("a".into()).matches("ab"));
        assert!(Filter::Prefix("a/".into()).matches("a/b"));
        assert!(!Filter::Prefix("a/".into()).matches("b/a"));
        assert!(Filter::Prefix(String::new()).matches("anything"));
    }
}
