//! Peer client: the node-to-node `/internal` calls (replicate, fetch, health) and request forwarding,
//! over one pooled keep-alive `reqwest::Client` with connect and request deadlines. The small calls
//! of the quorum paths (one record, one key) to `http://` peers go through the lanes of
//! [`read_lane`](crate::read_lane) (plain hyper, one task per connection); to `https://` peers
//! through a [`Coalescer`] per kind. Both merge concurrent calls to one peer into batches.

use crate::clock::ClockSample;
use crate::coalesce::{Coalescer, SendBatch};
use crate::read_lane::{LaneConfig, LaneKind, Lanes};
use crate::recent_writes::{encode_write_ids, Seen, WriteId, BATCH_WRITE_IDS_HEADER};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use kv_core::{Record, Version};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Header that carries `CLUSTER_SECRET` on node-to-node calls.
pub const SECRET_HEADER: &str = "x-kv-secret";
/// Header that marks a client request forwarded by another node: it is never forwarded again.
pub const FORWARDED_HEADER: &str = "x-kv-forwarded";
/// Header of a write that carries its own version (stamped by the load balancer, or a client's
/// own, like Cassandra's `USING TIMESTAMP`): a retry of it is the same write.
pub const VERSION_HEADER: &str = "x-kv-version";
/// Header naming the node (its URL) that offers a membership view, for the receiver's log.
pub const FROM_HEADER: &str = "x-kv-from";
/// Header that carries the request id across processes.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Header of a coalesced batch: the request ids of all its calls, comma-separated, in order.
pub const BATCH_REQUEST_IDS_HEADER: &str = "x-kv-request-ids";
/// Path of the replication endpoint: a batch of records to apply durably.
pub const REPLICATE_PATH: &str = "/internal/replicate";
/// Path prefix of the single-entry read endpoint; the percent-encoded key follows.
pub const ENTRY_PATH: &str = "/internal/entry/";
/// Path of the digest read endpoint: a list of keys in, the version (or none) per key out, no
/// values (see [`encode_versions`]).
pub const VERSIONS_PATH: &str = "/internal/versions";
/// Path where a node says whether it stored a write id for a key (a resend's check).
pub const SEEN_PATH: &str = "/internal/seen";
/// Path of the many-entry read endpoint: a list of keys in, one entry (or none) per key out.
pub const ENTRIES_PATH: &str = "/internal/entries";
/// Path of the local key-page endpoint used by cluster-wide listings.
pub const KEYS_PATH: &str = "/internal/keys";
/// Path of the membership view: `GET` reads a node's, `POST` offers it a newer one.
pub const MEMBERS_PATH: &str = "/internal/members";
/// Path of a node's transfer state during a membership change.
pub const TRANSFER_PATH: &str = "/internal/transfer";
/// Path where a node estimates what a proposed view would move.
pub const ESTIMATE_PATH: &str = "/internal/estimate";
/// Path of the promise step of a membership change.
pub const PROPOSE_PATH: &str = "/internal/propose";
/// Largest body a peer accepts in one `/internal` call (a record batch, a key list), and the
/// largest listing page a node reads from a peer.
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Size a node keeps each batch it sends to a peer within (replication, hints, transfers,
/// listing pages): records join a batch while it stays within this, and a larger record goes
/// alone. A quarter of [`MAX_BATCH_BYTES`], so a lone record of the largest allowed value fits.
pub const SEND_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Largest value a node may be configured to accept (`MAX_VALUE_BYTES`): a record holding it,
/// with a key of the longest the format allows and the batch framing, still fits in one
/// [`MAX_BATCH_BYTES`] batch, so every value that is written can be replicated.
pub const MAX_REPLICABLE_VALUE_BYTES: usize =
    MAX_BATCH_BYTES - kv_core::MAX_KEY_LEN - BATCH_FRAMING_BYTES;
/// Batch framing around one record: the count, its length prefix, and its record header and
/// expiry (generous, so the bound above holds whatever the header grows to).
const BATCH_FRAMING_BYTES: usize = 4096;
/// Response header of `/internal/keys`: `true` when the node holds more matching keys after the
/// page's last one (the page reached `limit`, or was cut at [`SEND_BATCH_BYTES`]).
pub const PAGE_FULL_HEADER: &str = "x-kv-page-full";
/// Deadline of one anti-entropy call (a keys call scans the peer's map).
const AAE_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Most keys one `/internal/entries` call may ask for.
pub const MAX_ENTRIES_KEYS: usize = 1024;

/// What one health check of a peer learned.
#[derive(Debug, Clone, Copy)]
pub struct HealthProbe {
    /// Round trip of the check.
    pub latency: Duration,
    /// Rank (epoch, digest) of the peer's membership view, when it sent one.
    pub rank: Option<(u64, u32)>,
    /// The peer's clock against this node's, when it sent its `now_ms`.
    pub clock: Option<ClockSample>,
}

/// Path of a node's own change feed, streamed to peers that merge it into prefix watches.
pub const WATCH_PATH: &str = "/internal/watch";
/// Longest life of one peer feed stream; the merging node reopens it (with `Last-Event-ID`).
pub const WATCH_CALL_TIMEOUT: Duration = Duration::from_secs(3600);

/// Why a call to a peer failed; decides whether a retry elsewhere is safe.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The connection could not be made: the peer cannot have seen the request.
    #[error("cannot connect to {peer}: {reason}")]
    Connect {
        /// The peer's URL.
        peer: String,
        /// The transport's words.
        reason: String,
    },
    /// The peer does not serve the path called (404): a node from before it existed.
    #[error("{peer} does not serve {path}")]
    Unsupported {
        /// The peer's URL.
        peer: String,
        /// The path called.
        path: &'static str,
    },
    /// The request may have reached the peer but no usable answer came back.
    #[error("call to {peer} failed: {reason}")]
    Failed {
        /// The peer's URL.
        peer: String,
        /// What went wrong.
        reason: String,
    },
}

impl CallError {
    /// True when the peer cannot have applied the request (safe to retry a write elsewhere).
    pub fn is_connect(&self) -> bool {
        matches!(self, CallError::Connect { .. })
    }

    fn from_reqwest(peer: &str, err: &reqwest::Error) -> CallError {
        let reason = err.to_string();
        if err.is_connect() {
            CallError::Connect {
                peer: peer.to_owned(),
                reason,
            }
        } else {
            CallError::Failed {
                peer: peer.to_owned(),
                reason,
            }
        }
    }

    fn failed(peer: &str, reason: impl Into<String>) -> CallError {
        CallError::Failed {
            peer: peer.to_owned(),
            reason: reason.into(),
        }
    }
}

/// A client request to pass on unchanged to another node.
#[derive(Debug, Clone)]
pub struct ForwardRequest {
    /// The HTTP method.
    pub method: Method,
    /// Path and query exactly as the client sent them.
    pub path_and_query: String,
    /// Headers worth passing on (authorization, content type, preconditions).
    pub headers: HeaderMap,
    /// The request body, unparsed.
    pub body: Bytes,
}

/// The owner's answer to a forwarded request, passed back to the client unchanged.
#[derive(Debug, Clone)]
pub struct ForwardResponse {
    /// The owner's status code.
    pub status: StatusCode,
    /// The owner's response headers.
    pub headers: HeaderMap,
    /// The owner's body.
    pub body: Bytes,
}

/// The HTTP side of the peer client: one pooled client and the secret every call carries.
#[derive(Debug, Clone)]
struct Transport {
    http: reqwest::Client,
    secret: Option<HeaderValue>,
}

/// One record to replicate, with the id of the client write it belongs to (if any).
pub type ReplicateItem = (Record, Option<WriteId>);

/// Pooled HTTP client for every call a node makes to its peers.
#[derive(Clone)]
pub struct PeerClient {
    transport: Transport,
    replicate_one: Arc<Coalescer<ReplicateItem, Version>>,
    fetch_one: Arc<Coalescer<String, Option<Record>>>,
    /// Quorum reads from `http://` peers (the lean path); `fetch_one` serves the others.
    read_entries: Arc<Lanes<EntriesRead>>,
    /// Digest reads (versions only) from `http://` peers.
    read_versions: Arc<Lanes<VersionsRead>>,
    /// Replication of quorum writes to `http://` peers; `replicate_one` serves the others.
    write_lanes: Arc<Lanes<ReplicateWrite>>,
}

/// Quorum-read calls per `http://` peer in flight: one. While it is out, every read that
/// arrives waits and leaves with the next call, so under load a peer answers many reads per
/// exchange (measured: 20-30 % less server CPU per quorum GET than with two in flight, at the
/// same or lower latency, see docs/PERFORMANCE.md). A read stuck behind a slow call is covered
/// by the speculative read of another replica after 50 ms.
const READ_IN_FLIGHT: usize = 1;

/// Replication calls per `http://` peer in flight: one, like reads. Each waits for the peer's
/// fsync (~1 ms); the writes that arrive meanwhile leave together with the next call. Measured
/// against two (docs/PERFORMANCE.md, "Replication lanes"): less server CPU per quorum POST via
/// kv-lb (185 against 232 µs) at a lower p50, the same at 750 writes/s.
const WRITE_IN_FLIGHT: usize = 1;

/// A replication of records (with their write ids): `POST /internal/replicate`, answered with
/// the version the peer holds for each record's key.
pub(crate) struct ReplicateWrite;

impl LaneKind for ReplicateWrite {
    type Item = ReplicateItem;
    type Answer = Version;
    const PATH: &'static str = REPLICATE_PATH;
    const WHAT: &'static str = "writes";
    const IN_FLIGHT: usize = WRITE_IN_FLIGHT;
    const CHANGES_PEER: bool = true;
    const UNSUPPORTED_ON_404: bool = false;
    const MAX_BYTES: usize = SEND_BATCH_BYTES;

    fn weigh((record, _): &ReplicateItem) -> usize {
        batch_item_bytes(record)
    }

    fn encode(items: &[ReplicateItem]) -> (Bytes, Option<(HeaderName, HeaderValue)>) {
        let body = encode_list(items, |(record, _), out| record.encode(out));
        let write_ids: Vec<Option<WriteId>> = items.iter().map(|(_, id)| *id).collect();
        // Left out when no record has one, so the request stays what older nodes read.
        let header = encode_write_ids(&write_ids)
            .and_then(|text| HeaderValue::from_str(&text).ok())
            .map(|value| (HeaderName::from_static(BATCH_WRITE_IDS_HEADER), value));
        (body, header)
    }

    fn decode(items: &[ReplicateItem], body: &[u8]) -> Result<Vec<Version>, String> {
        let answer: ReplicateAnswer =
            serde_json::from_slice(body).map_err(|e| format!("bad replication answer: {e}"))?;
        answer.held_versions_of(items.iter().map(|(record, _)| record.version))
    }
}

/// A digest read: `POST /internal/versions`, the version of each key without its value.
pub(crate) struct VersionsRead;

impl LaneKind for VersionsRead {
    type Item = String;
    type Answer = Option<Version>;
    const PATH: &'static str = VERSIONS_PATH;
    const WHAT: &'static str = "reads";
    const IN_FLIGHT: usize = READ_IN_FLIGHT;
    const CHANGES_PEER: bool = false;
    const UNSUPPORTED_ON_404: bool = true;

    fn encode(keys: &[String]) -> (Bytes, Option<(HeaderName, HeaderValue)>) {
        (encode_keys(keys), None)
    }

    fn decode(keys: &[String], body: &[u8]) -> Result<Vec<Option<Version>>, String> {
        decode_versions(body, keys.len())
    }
}

/// A quorum read of whole entries: `POST /internal/entries`.
pub(crate) struct EntriesRead;

impl LaneKind for EntriesRead {
    type Item = String;
    type Answer = Option<Record>;
    const PATH: &'static str = ENTRIES_PATH;
    const WHAT: &'static str = "reads";
    const IN_FLIGHT: usize = READ_IN_FLIGHT;
    const CHANGES_PEER: bool = false;
    const UNSUPPORTED_ON_404: bool = true;

    fn encode(keys: &[String]) -> (Bytes, Option<(HeaderName, HeaderValue)>) {
        (encode_keys(keys), None)
    }

    fn decode(keys: &[String], body: &[u8]) -> Result<Vec<Option<Record>>, String> {
        let entries = decode_entries(body)?;
        check_entries(keys, &entries)?;
        Ok(entries)
    }
}

/// An `/internal/entries` answer must hold one entry (or none) per key asked, for that key.
fn check_entries(keys: &[String], entries: &[Option<Record>]) -> Result<(), String> {
    if entries.len() != keys.len() {
        return Err(format!("{} entries for {} keys", entries.len(), keys.len()));
    }
    for (key, entry) in keys.iter().zip(entries) {
        if entry.as_ref().is_some_and(|r| r.key != *key) {
            return Err(format!("an entry for another key than {key:?}"));
        }
    }
    Ok(())
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClient")
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

impl PeerClient {
    /// Builds the client; `request_timeout` bounds every call, `connect_timeout` the TCP connect.
    /// `local_address`, when given, is the source address of every connection to a peer (a node
    /// bound to one address of a multi-homed host talks from that address too). `ca_pem`, when
    /// given, holds the only CA certificates (PEM) that `https://` peers may chain to.
    pub fn new(
        secret: Option<&str>,
        connect_timeout: Duration,
        request_timeout: Duration,
        local_address: Option<std::net::IpAddr>,
        ca_pem: Option<&[u8]>,
    ) -> Result<PeerClient, String> {
        let mut builder = reqwest::Client::builder().tls_built_in_root_certs(false);
        if let Some(pem) = ca_pem {
            let roots = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| format!("TLS_CA_FILE holds no usable certificate: {e}"))?;
            for root in roots {
                builder = builder.add_root_certificate(root);
            }
        }
        let http = builder
            .local_address(local_address)
            .connect_timeout(connect_timeout)
            .timeout(request_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .http1_only()
            .build()
            .map_err(|e| format!("cannot build the peer HTTP client: {e}"))?;
        let secret = match secret {
            Some(s) => Some(
                HeaderValue::from_str(s)
                    .map_err(|_| "CLUSTER_SECRET must be printable ASCII".to_owned())?,
            ),
            None => None,
        };
        let lane_config = Arc::new(LaneConfig {
            secret: secret.clone(),
            connect_timeout,
            request_timeout,
            local_address,
        });
        let transport = Transport { http, secret };
        let sender = transport.clone();
        let replicate: SendBatch<ReplicateItem, Version> = Arc::new(move |peer, items, ids| {
            let sender = sender.clone();
            let (records, write_ids): (Vec<Record>, Vec<Option<WriteId>>) =
                items.into_iter().unzip();
            Box::pin(async move { sender.replicate(&peer, &records, &write_ids, &ids).await })
        });
        let sender = transport.clone();
        let fetch: SendBatch<String, Option<Record>> = Arc::new(move |peer, keys, ids| {
            let sender = sender.clone();
            Box::pin(async move { sender.fetch_many(&peer, &keys, &ids).await })
        });
        Ok(PeerClient {
            transport,
            replicate_one: Arc::new(
                Coalescer::new(replicate)
                    .with_byte_cap(|(record, _)| batch_item_bytes(record), SEND_BATCH_BYTES),
            ),
            fetch_one: Arc::new(Coalescer::new(fetch)),
            read_entries: Arc::new(Lanes::new(lane_config.clone())),
            read_versions: Arc::new(Lanes::new(lane_config.clone())),
            write_lanes: Arc::new(Lanes::new(lane_config)),
        })
    }

    fn request(&self, method: Method, url: String, request_id: &str) -> reqwest::RequestBuilder {
        self.transport.request(method, url, request_id)
    }

    /// Sends records to `peer`, in as many calls as [`SEND_BATCH_BYTES`] asks for, one after
    /// the other; it answers only once all of them are durable in the peer's WAL.
    pub async fn replicate(
        &self,
        peer: &str,
        records: &[Record],
        request_id: &str,
    ) -> Result<(), CallError> {
        let ids = [Arc::from(request_id)];
        self.transport
            .replicate(peer, records, &[], &ids)
            .await
            .map(drop)
    }

    /// Sends one record (with its write id) to `peer`, merged with concurrent ones into a batch;
    /// answers, once the peer holds it durably, with the version the peer holds for the key: the
    /// record's own when it stored it (or already held it), a newer one when it holds a newer
    /// write.
    pub async fn replicate_record(
        &self,
        peer: &Arc<str>,
        item: ReplicateItem,
        request_id: Arc<str>,
    ) -> Result<Version, CallError> {
        match self.write_lanes.call(peer, item, request_id.clone()).await {
            Ok(answer) => answer,
            Err(item) => self.replicate_one.call(peer, item, request_id).await,
        }
    }

    /// Asks `peer` whether it stored write `id` of `key`, and whether its memory reaches
    /// `horizon` back (`POST /internal/seen`), within the peer-call deadline.
    pub async fn seen(
        &self,
        peer: &str,
        key: &str,
        id: WriteId,
        horizon: Duration,
        request_id: &str,
    ) -> Result<Seen, CallError> {
        let horizon_ms = u64::try_from(horizon.as_millis()).unwrap_or(u64::MAX);
        let body = serde_json::json!({"key": key, "id": id.to_string(), "horizon_ms": horizon_ms});
        let request = self
            .request(Method::POST, format!("{peer}{SEEN_PATH}"), request_id)
            .json(&body);
        Self::json_call(peer, SEEN_PATH, request).await
    }

    /// Reads `peer`'s local entry for `key` (tombstones included), `None` when it has none;
    /// concurrent reads from one peer are merged into one `/internal/entries` call.
    pub async fn fetch(
        &self,
        peer: &Arc<str>,
        key: &str,
        request_id: Arc<str>,
    ) -> Result<Option<Record>, CallError> {
        match self
            .read_entries
            .call(peer, key.to_owned(), request_id.clone())
            .await
        {
            Ok(answer) => answer,
            Err(key) => self.fetch_one.call(peer, key, request_id).await,
        }
    }

    /// Reads the version of `peer`'s local entry for `key` (tombstones included), `None` when it
    /// has none: a digest read, without the value. A peer that does not know
    /// [`VERSIONS_PATH`] (a node from before digest reads, during an upgrade) and an `https://`
    /// peer are asked for the whole entry instead.
    pub async fn fetch_version(
        &self,
        peer: &Arc<str>,
        key: &str,
        request_id: Arc<str>,
    ) -> Result<Option<Version>, CallError> {
        match self
            .read_versions
            .call(peer, key.to_owned(), request_id.clone())
            .await
        {
            Ok(Err(CallError::Unsupported { .. })) | Err(_) => {}
            Ok(answer) => return answer,
        }
        let entry = self.fetch(peer, key, request_id).await?;
        Ok(entry.map(|record| record.version))
    }

    /// Asks `peer` for its local page of keys (tombstones included) after `after` with `prefix`;
    /// live keys come with their values only when `values` is true (else with an empty value).
    /// Returns the page and whether the peer holds more keys after it.
    pub async fn list(
        &self,
        peer: &str,
        page: &PageQuery<'_>,
        request_id: &str,
    ) -> Result<(Vec<Record>, bool), CallError> {
        let url = {
            let mut query = url::form_urlencoded::Serializer::new(String::new());
            query.append_pair("prefix", page.prefix);
            query.append_pair("limit", &page.limit.to_string());
            if let Some(after) = page.after {
                query.append_pair("after", after);
            }
            if page.values {
                query.append_pair("values", "true");
            }
            format!("{peer}{KEYS_PATH}?{}", query.finish())
        };
        let request = self.request(Method::GET, url, request_id);
        let response = send_expecting_ok(peer, request, KEYS_PATH).await?;
        let full = response
            .headers()
            .get(PAGE_FULL_HEADER)
            .map(|v| v.as_bytes() == b"true");
        let body = read_capped(peer, response, MAX_BATCH_BYTES).await?;
        let records = decode_batch(&body).map_err(|e| CallError::failed(peer, e))?;
        // A node without the header caps pages by count only.
        let full = full.unwrap_or(records.len() >= page.limit);
        Ok((records, full))
    }

    /// Opens `peer`'s own change feed of the keys under `prefix`, or of that one key with
    /// `exact_key` (`GET /internal/watch`, SSE, resumed after `after`); the answer's body streams for as long as the peer serves it (at
    /// most [`WATCH_CALL_TIMEOUT`], then the caller reopens it).
    pub async fn watch(
        &self,
        peer: &str,
        prefix: &str,
        exact_key: bool,
        after: Option<kv_core::Version>,
        request_id: &str,
    ) -> Result<reqwest::Response, CallError> {
        let query = {
            let mut query = url::form_urlencoded::Serializer::new(String::new());
            query.append_pair("prefix", prefix);
            if exact_key {
                // Only that key (a peer before this parameter streams the prefix: a superset).
                query.append_pair("key", prefix);
            }
            query.finish()
        };
        let mut request = self
            .request(
                Method::GET,
                format!("{peer}{WATCH_PATH}?{query}"),
                request_id,
            )
            .timeout(WATCH_CALL_TIMEOUT);
        if let Some(after) = after {
            request = request.header("last-event-id", after.to_string());
        }
        send_expecting_ok(peer, request, WATCH_PATH).await
    }

    /// Probes `GET /health` with its own deadline: the round trip, the rank of the peer's
    /// membership view and its clock against ours, when its answer carried them.
    pub async fn health(&self, peer: &str, timeout: Duration) -> Result<HealthProbe, CallError> {
        let started = Instant::now();
        let sent_unix_us = crate::clock::unix_us();
        let request = self
            .request(Method::GET, format!("{peer}/health"), "health-check")
            .timeout(timeout);
        let response = send_expecting_ok(peer, request, "/health").await?;
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        // The peer read its clock somewhere between sending and the end of its answer.
        let latency = started.elapsed();
        let rank = body["epoch"]
            .as_u64()
            .zip(body["digest"].as_u64().and_then(|d| u32::try_from(d).ok()));
        let clock = body["now_ms"]
            .as_u64()
            .map(|now| ClockSample::estimate(now, sent_unix_us, latency));
        Ok(HealthProbe {
            latency,
            rank,
            clock,
        })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        peer: &str,
        path: &str,
    ) -> Result<T, CallError> {
        let request = self.request(Method::GET, format!("{peer}{path}"), "membership");
        Self::json_call(peer, path, request).await
    }

    async fn post_json<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        peer: &str,
        path: &str,
        body: &B,
    ) -> Result<T, CallError> {
        let request = self.request(Method::POST, format!("{peer}{path}"), "membership");
        Self::json_call(peer, path, request.json(body)).await
    }

    /// Sends a membership call and decodes the JSON of its 200 answer.
    async fn json_call<T: serde::de::DeserializeOwned>(
        peer: &str,
        path: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<T, CallError> {
        send_expecting_ok(peer, request, path)
            .await?
            .json()
            .await
            .map_err(|e| CallError::failed(peer, e.to_string()))
    }

    /// An anti-entropy call: `body` as JSON to `path`, with a deadline long enough for the peer
    /// to scan its map.
    async fn aae_call<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        peer: &str,
        path: &str,
        body: &B,
    ) -> Result<T, CallError> {
        let request = self
            .request(Method::POST, format!("{peer}{path}"), "anti-entropy")
            .timeout(AAE_CALL_TIMEOUT)
            .json(body);
        Self::json_call(peer, path, request).await
    }

    /// The peer's hash-tree roots of some arcs.
    pub async fn aae_roots(
        &self,
        peer: &str,
        query: &crate::antientropy::ArcsQuery,
    ) -> Result<crate::antientropy::RootsAnswer, CallError> {
        self.aae_call(peer, crate::antientropy::ROOTS_PATH, query)
            .await
    }

    /// The peer's hash-tree leaves of some arcs.
    pub async fn aae_leaves(
        &self,
        peer: &str,
        query: &crate::antientropy::ArcsQuery,
    ) -> Result<crate::antientropy::LeavesAnswer, CallError> {
        self.aae_call(peer, crate::antientropy::LEAVES_PATH, query)
            .await
    }

    /// The peer's keys and versions in some tree segments.
    pub async fn aae_keys(
        &self,
        peer: &str,
        query: &crate::antientropy::SegmentsQuery,
    ) -> Result<crate::antientropy::KeysAnswer, CallError> {
        self.aae_call(peer, crate::antientropy::KEYS_PATH, query)
            .await
    }

    /// The peer's membership view.
    pub async fn fetch_view(&self, peer: &str) -> Result<crate::membership::View, CallError> {
        self.get_json(peer, MEMBERS_PATH).await
    }

    /// Offers the peer a view as node `from`; it adopts it if it is a step it can check.
    pub async fn push_view(
        &self,
        peer: &str,
        view: &crate::membership::View,
        from: &str,
    ) -> Result<(), CallError> {
        let request = self
            .request(Method::POST, format!("{peer}{MEMBERS_PATH}"), "membership")
            .header(FROM_HEADER, from)
            .json(view);
        Self::json_call::<serde_json::Value>(peer, MEMBERS_PATH, request)
            .await
            .map(|_| ())
    }

    /// `peer`'s own entries for `keys` (at most [`MAX_ENTRIES_KEYS`]), in order, `None` for a key
    /// it holds no entry for (one `/internal/entries` call, not coalesced).
    pub async fn fetch_entries(
        &self,
        peer: &str,
        keys: &[String],
        request_id: &str,
    ) -> Result<Vec<Option<Record>>, CallError> {
        let ids = [Arc::from(request_id)];
        self.transport.fetch_many(peer, keys, &ids).await
    }

    /// The peer's part in the membership change in progress.
    pub async fn transfer_state(
        &self,
        peer: &str,
    ) -> Result<crate::rebalance::TransferState, CallError> {
        self.get_json(peer, TRANSFER_PATH).await
    }

    /// What `view` would move of the keys the peer is first owner of.
    pub async fn estimate(
        &self,
        peer: &str,
        view: &crate::membership::View,
    ) -> Result<crate::rebalance::Estimate, CallError> {
        self.post_json(peer, ESTIMATE_PATH, view).await
    }

    /// Asks `peer` to promise (or, with `release`, to give back its promise of) a next view.
    pub async fn propose(
        &self,
        peer: &str,
        proposal: &crate::proposal::Proposal,
    ) -> Result<crate::proposal::PromiseAnswer, CallError> {
        self.post_json(peer, PROPOSE_PATH, proposal).await
    }

    /// Passes a client request on to `peer`, marked as forwarded, and returns its answer unchanged.
    /// `timeout` is longer than a peer call's: the replica coordinates the request first.
    pub async fn forward(
        &self,
        peer: &str,
        request: &ForwardRequest,
        request_id: &str,
        timeout: Duration,
    ) -> Result<ForwardResponse, CallError> {
        let url = format!("{peer}{}", request.path_and_query);
        let builder = self
            .request(request.method.clone(), url, request_id)
            .timeout(timeout)
            .headers(request.headers.clone())
            .header(FORWARDED_HEADER, "1")
            .body(request.body.clone());
        let response = builder
            .send()
            .await
            .map_err(|e| CallError::from_reqwest(peer, &e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .map_err(|e| CallError::from_reqwest(peer, &e))?;
        Ok(ForwardResponse {
            status,
            headers,
            body,
        })
    }
}

impl Transport {
    fn request(&self, method: Method, url: String, request_id: &str) -> reqwest::RequestBuilder {
        let mut builder = self.http.request(method, url);
        if let Some(secret) = &self.secret {
            builder = builder.header(SECRET_HEADER, secret.clone());
        }
        if let Ok(rid) = HeaderValue::from_str(request_id) {
            builder = builder.header(REQUEST_ID_HEADER, rid);
        }
        builder
    }

    /// A call on behalf of the client requests `ids`: the first is the call's request id, and a
    /// batch of several carries them all in [`BATCH_REQUEST_IDS_HEADER`] for the peer's log.
    fn batch_request(
        &self,
        method: Method,
        url: String,
        ids: &[Arc<str>],
    ) -> reqwest::RequestBuilder {
        let first = ids.first().map_or("", |id| id);
        let builder = self.request(method, url, first);
        if ids.len() < 2 {
            return builder;
        }
        let joined = ids.iter().map(|id| &**id).collect::<Vec<_>>().join(",");
        match HeaderValue::from_str(&joined) {
            Ok(value) => builder.header(BATCH_REQUEST_IDS_HEADER, value),
            Err(_) => builder,
        }
    }

    /// Sends `records` in consecutive batches of at most [`SEND_BATCH_BYTES`] (see
    /// [`byte_capped`]); stops at the first that fails. `write_ids` is empty or holds one per
    /// record. Returns the version the peer holds for each record's key, in order.
    async fn replicate(
        &self,
        peer: &str,
        records: &[Record],
        write_ids: &[Option<WriteId>],
        ids: &[Arc<str>],
    ) -> Result<Vec<Version>, CallError> {
        if records.is_empty() {
            return self.replicate_batch(peer, records, &[], ids).await;
        }
        let mut held = Vec::with_capacity(records.len());
        for batch in byte_capped(records, SEND_BATCH_BYTES) {
            let batch_ids = write_ids
                .get(held.len()..held.len() + batch.len())
                .unwrap_or_default();
            held.extend(self.replicate_batch(peer, batch, batch_ids, ids).await?);
        }
        Ok(held)
    }

    /// One `/internal/replicate` call; the write ids travel in [`BATCH_WRITE_IDS_HEADER`] (left
    /// out when no record has one, so the body stays what older nodes read).
    async fn replicate_batch(
        &self,
        peer: &str,
        records: &[Record],
        write_ids: &[Option<WriteId>],
        ids: &[Arc<str>],
    ) -> Result<Vec<Version>, CallError> {
        let mut request = self
            .batch_request(Method::POST, format!("{peer}{REPLICATE_PATH}"), ids)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(encode_batch(records));
        if let Some(value) = encode_write_ids(write_ids) {
            request = request.header(BATCH_WRITE_IDS_HEADER, value);
        }
        let response = request
            .send()
            .await
            .map_err(|e| CallError::from_reqwest(peer, &e))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(CallError::failed(peer, format!("status {status}: {text}")));
        }
        let answer: ReplicateAnswer = response
            .json()
            .await
            .map_err(|e| CallError::failed(peer, format!("bad replication answer: {e}")))?;
        answer
            .held_versions(records)
            .map_err(|reason| CallError::failed(peer, reason))
    }

    async fn fetch_many(
        &self,
        peer: &str,
        keys: &[String],
        ids: &[Arc<str>],
    ) -> Result<Vec<Option<Record>>, CallError> {
        let request = self
            .batch_request(Method::POST, format!("{peer}{ENTRIES_PATH}"), ids)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(encode_keys(keys));
        let response = send_expecting_ok(peer, request, ENTRIES_PATH).await?;
        let body = response
            .bytes()
            .await
            .map_err(|e| CallError::from_reqwest(peer, &e))?;
        let entries = decode_entries(&body).map_err(|e| CallError::failed(peer, e))?;
        check_entries(keys, &entries).map_err(|e| CallError::failed(peer, e))?;
        Ok(entries)
    }
}

/// What one node's page of a listing asks for.
#[derive(Debug, Clone, Copy)]
pub struct PageQuery<'a> {
    /// Keys start with this.
    pub prefix: &'a str,
    /// Keys sort after this.
    pub after: Option<&'a str>,
    /// At most this many keys.
    pub limit: usize,
    /// Ship the values of live keys (else they come empty).
    pub values: bool,
}

/// Reads a response body of at most `limit` bytes; a longer one is an error, not a huge buffer.
async fn read_capped(
    peer: &str,
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Bytes, CallError> {
    let mut body = BytesMut::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| CallError::from_reqwest(peer, &e))?
    {
        if body.len() + chunk.len() > limit {
            return Err(CallError::failed(
                peer,
                format!("answer over the {limit}-byte limit"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Sends a request and insists on a 200 answer; `what` names the call in the error.
async fn send_expecting_ok(
    peer: &str,
    request: reqwest::RequestBuilder,
    what: &str,
) -> Result<reqwest::Response, CallError> {
    let response = request
        .send()
        .await
        .map_err(|e| CallError::from_reqwest(peer, &e))?;
    if response.status() != StatusCode::OK {
        return Err(CallError::failed(
            peer,
            format!("{what} answered {}", response.status()),
        ));
    }
    Ok(response)
}

/// Bytes one record adds to a batch written by [`encode_batch`]: its length prefix and encoding.
pub fn batch_item_bytes(record: &Record) -> usize {
    4 + record.encoded_len()
}

/// Splits `records` into consecutive runs whose encoded batch ([`encode_batch`]) stays within
/// `max_bytes`; a record too large for that on its own gets a run of its own.
pub fn byte_capped(records: &[Record], max_bytes: usize) -> impl Iterator<Item = &[Record]> {
    let mut rest = records;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 4;
        let mut take = 0;
        for record in rest {
            bytes += batch_item_bytes(record);
            if take > 0 && bytes > max_bytes {
                break;
            }
            take += 1;
        }
        let (batch, tail) = rest.split_at(take);
        rest = tail;
        Some(batch)
    })
}

/// The answer of `POST /internal/replicate`: how many records were applied, and for each record,
/// in order, the version the replica now holds for its key (the record's own when it stored it
/// or already held it; a newer one when a newer write was there first).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicateAnswer {
    /// Records that changed the replica's state.
    pub applied: usize,
    /// The version held for each record's key, as text. Absent in answers of nodes from before
    /// versions were reported (a mixed-version cluster during an upgrade): each record then
    /// counts as stored, as it did then.
    #[serde(default)]
    pub held: Option<Vec<String>>,
}

impl ReplicateAnswer {
    /// The held versions, one per record sent; an answer that does not match the batch is an
    /// error (the replica cannot be counted for any of it).
    pub fn held_versions(&self, records: &[Record]) -> Result<Vec<Version>, String> {
        self.held_versions_of(records.iter().map(|r| r.version))
    }

    /// [`held_versions`](Self::held_versions) for records of these versions, in order.
    pub fn held_versions_of(
        &self,
        sent: impl ExactSizeIterator<Item = Version>,
    ) -> Result<Vec<Version>, String> {
        let Some(held) = &self.held else {
            return Ok(sent.collect());
        };
        if held.len() != sent.len() {
            return Err(format!(
                "{} held versions for {} records",
                held.len(),
                sent.len()
            ));
        }
        held.iter()
            .map(|v| v.parse().map_err(|e| format!("bad held version: {e}")))
            .collect()
    }
}

/// Encodes a batch of records for `/internal/replicate`: the list frame of
/// [`encode_list`] around each record's `Record::encode` bytes. TCP and HTTP framing already
/// protect the bytes in flight, so no checksum is added here.
pub fn encode_batch(records: &[Record]) -> Bytes {
    encode_list(records, |record, out| record.encode(out))
}

/// Decodes a batch written by [`encode_batch`]; any inconsistency is an error, never a panic.
pub fn decode_batch(buf: &[u8]) -> Result<Vec<Record>, String> {
    if buf.len() > MAX_BATCH_BYTES {
        return Err(format!("batch of {} bytes is over the limit", buf.len()));
    }
    decode_list(buf, "record", usize::MAX, |bytes| {
        Record::decode(bytes).map_err(|e| e.to_string())
    })
}

/// Encodes the keys of an `/internal/entries` call (the list frame around each key's bytes).
pub fn encode_keys(keys: &[String]) -> Bytes {
    encode_list(keys, |key, out| out.extend_from_slice(key.as_bytes()))
}

/// Decodes [`encode_keys`]: at most [`MAX_ENTRIES_KEYS`] UTF-8 keys of 1 to `max_key_bytes`.
pub fn decode_keys(buf: &[u8], max_key_bytes: usize) -> Result<Vec<String>, String> {
    decode_list(buf, "key", MAX_ENTRIES_KEYS, |bytes| {
        if bytes.is_empty() || bytes.len() > max_key_bytes {
            return Err(format!("bad length {}", bytes.len()));
        }
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| "not UTF-8".to_owned())
    })
}

/// Encodes the answer of an `/internal/entries` call: per key the record's bytes, or nothing
/// (length 0) for a key the node has no entry for.
pub fn encode_entries(entries: &[Option<Record>]) -> Bytes {
    encode_list(entries, |entry, out| {
        if let Some(record) = entry {
            record.encode(out);
        }
    })
}

/// Decodes [`encode_entries`]; any inconsistency is an error, never a panic.
pub fn decode_entries(buf: &[u8]) -> Result<Vec<Option<Record>>, String> {
    decode_list(buf, "entry", usize::MAX, |bytes| match bytes {
        [] => Ok(None),
        _ => Record::decode(bytes).map(Some).map_err(|e| e.to_string()),
    })
}

/// Bytes of one present version in [`encode_versions`]: the marker, `hlc` and `node`.
const VERSION_ITEM_BYTES: usize = 1 + 8 + 4;

/// Encodes the answer of an `/internal/versions` call: `[count: u32 LE]`, then per key either
/// `[0]` (no entry) or `[1][hlc: u64 LE][node: u32 LE]`. 13 bytes per key, whatever the value.
pub fn encode_versions(versions: &[Option<Version>]) -> Bytes {
    let mut out = BytesMut::with_capacity(4 + versions.len() * VERSION_ITEM_BYTES);
    out.put_u32_le(u32::try_from(versions.len()).unwrap_or(u32::MAX));
    for version in versions {
        match version {
            None => out.put_u8(0),
            Some(v) => {
                out.put_u8(1);
                out.put_u64_le(v.hlc);
                out.put_u32_le(v.node);
            }
        }
    }
    out.freeze()
}

/// Decodes [`encode_versions`] holding exactly `expected` items; any other count, a cut item,
/// an unknown marker or bytes after the last item are errors, never a panic.
pub fn decode_versions(mut buf: &[u8], expected: usize) -> Result<Vec<Option<Version>>, String> {
    if buf.remaining() < 4 {
        return Err("version list shorter than its header".into());
    }
    let count = buf.get_u32_le() as usize;
    if count != expected {
        return Err(format!("{count} versions for {expected} keys"));
    }
    let mut versions = Vec::with_capacity(count.min(MAX_ENTRIES_KEYS));
    for i in 0..count {
        if !buf.has_remaining() {
            return Err(format!("version {i} is missing"));
        }
        match buf.get_u8() {
            0 => versions.push(None),
            1 if buf.remaining() >= VERSION_ITEM_BYTES - 1 => {
                let hlc = buf.get_u64_le();
                let node = buf.get_u32_le();
                versions.push(Some(Version { hlc, node }));
            }
            1 => return Err(format!("version {i} is cut short")),
            other => return Err(format!("version {i} has the unknown marker {other}")),
        }
    }
    if buf.has_remaining() {
        return Err(format!("{} bytes after the last version", buf.remaining()));
    }
    Ok(versions)
}

/// The frame of every list on the peer wire: `[count: u32 LE]`, then per item
/// `[len: u32 LE][bytes written by put]`.
fn encode_list<T>(items: &[T], mut put: impl FnMut(&T, &mut Vec<u8>)) -> Bytes {
    let mut out = BytesMut::with_capacity(4 + items.len() * 64);
    out.put_u32_le(u32::try_from(items.len()).unwrap_or(u32::MAX));
    let mut scratch = Vec::new();
    for item in items {
        scratch.clear();
        put(item, &mut scratch);
        out.put_u32_le(u32::try_from(scratch.len()).unwrap_or(u32::MAX));
        out.put_slice(&scratch);
    }
    out.freeze()
}

/// Reads a list framed by [`encode_list`] of at most `max_count` items, each decoded by `item`;
/// a count the bytes cannot hold, a cut item, or bytes after the last one are errors.
fn decode_list<T>(
    mut buf: &[u8],
    what: &str,
    max_count: usize,
    mut item: impl FnMut(&[u8]) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    if buf.remaining() < 4 {
        return Err(format!("{what} list shorter than its header"));
    }
    let count = buf.get_u32_le() as usize;
    // Each item takes at least its 4-byte length prefix; a larger count is a lie.
    if count > max_count || count > buf.remaining() / 4 {
        return Err(format!(
            "{what} list claims {count} items in {} bytes",
            buf.remaining()
        ));
    }
    let mut items = Vec::with_capacity(count);
    for i in 0..count {
        if buf.remaining() < 4 {
            return Err(format!("{what} {i} has no length"));
        }
        let len = buf.get_u32_le() as usize;
        if buf.remaining() < len {
            return Err(format!("{what} {i} is cut short"));
        }
        items.push(item(&buf[..len]).map_err(|e| format!("{what} {i}: {e}"))?);
        buf.advance(len);
    }
    if buf.has_remaining() {
        return Err(format!("{} bytes after the last {what}", buf.remaining()));
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_core::Version;

    fn record(key: &str, value: Option<&str>) -> Record {
        Record {
            key: key.to_owned(),
            version: Version {
                hlc: 7 << 16,
                node: 3,
            },
            value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
            expires_at_ms: None,
        }
    }

    #[test]
    fn batch_round_trips() {
        let records = vec![
            record("a", Some("1")),
            record("b/c", None),
            record("ü", Some("\"x\"")),
        ];
        let decoded = decode_batch(&encode_batch(&records)).unwrap();
        assert_eq!(decoded, records);
        assert!(decode_batch(&encode_batch(&[])).unwrap().is_empty());
    }

    #[test]
    fn key_lists_and_entry_lists_round_trip_and_refuse_damage() {
        let keys = vec!["a".to_owned(), "b/c".to_owned(), "ü".to_owned()];
        assert_eq!(decode_keys(&encode_keys(&keys), 1024).unwrap(), keys);
        let bytes = encode_keys(&keys);
        for cut in 0..bytes.len() {
            assert!(decode_keys(&bytes[..cut], 1024).is_err(), "cut at {cut}");
        }
        assert!(decode_keys(&bytes, 1).is_err(), "a key over the limit");
        assert!(decode_keys(&encode_keys(&[String::new()]), 1024).is_err());
        assert!(decode_keys(&[0, 0, 1, 0, 0, 0, 0, 0], 1024).is_err());

        let entries = vec![Some(record("a", Some("1"))), None, Some(record("c", None))];
        assert_eq!(decode_entries(&encode_entries(&entries)).unwrap(), entries);
        let bytes = encode_entries(&entries);
        for cut in 0..bytes.len() {
            assert!(decode_entries(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = bytes.to_vec();
        extra.push(0);
        assert!(decode_entries(&extra).is_err());
    }

    #[test]
    fn version_lists_round_trip_and_refuse_damage() {
        let versions = vec![
            Some(Version {
                hlc: 7 << 16,
                node: 3,
            }),
            None,
            Some(Version {
                hlc: u64::MAX,
                node: u32::MAX,
            }),
            Some(Version::ZERO),
        ];
        let bytes = encode_versions(&versions);
        assert_eq!(bytes.len(), 4 + 3 * VERSION_ITEM_BYTES + 1);
        assert_eq!(decode_versions(&bytes, versions.len()).unwrap(), versions);
        assert!(decode_versions(&encode_versions(&[]), 0)
            .unwrap()
            .is_empty());
        for cut in 0..bytes.len() {
            assert!(
                decode_versions(&bytes[..cut], versions.len()).is_err(),
                "cut at {cut}"
            );
        }
        assert!(
            decode_versions(&bytes, 3).is_err(),
            "another count than asked"
        );
        assert!(
            decode_versions(&bytes, 5).is_err(),
            "another count than asked"
        );
        let mut extra = bytes.to_vec();
        extra.push(0);
        assert!(decode_versions(&extra, versions.len()).is_err());
        let mut marker = bytes.to_vec();
        marker[4] = 2;
        assert!(decode_versions(&marker, versions.len()).is_err());
        assert!(decode_versions(&[255, 255, 255, 255], u32::MAX as usize).is_err());
    }

    #[test]
    fn byte_capped_runs_fit_and_a_large_record_goes_alone() {
        let big = "x".repeat(1000);
        let records: Vec<Record> = [10, 10, 1000, 10, 400, 400, 400, 10]
            .iter()
            .enumerate()
            .map(|(i, n)| record(&format!("k{i}"), Some(&big[..*n])))
            .collect();
        let runs: Vec<&[Record]> = byte_capped(&records, 900).collect();
        assert_eq!(runs.iter().map(|r| r.len()).sum::<usize>(), records.len());
        assert_eq!(runs.concat(), records, "in order, nothing lost");
        for run in &runs {
            let bytes = encode_batch(run).len();
            assert!(
                bytes <= 900 || run.len() == 1,
                "{bytes} bytes in {}",
                run.len()
            );
            let counted: usize = 4 + run.iter().map(batch_item_bytes).sum::<usize>();
            assert_eq!(counted, bytes, "the count matches the encoding");
        }
        assert!(runs.iter().any(|r| r.len() == 1 && r[0].key == "k2"));
        assert!(
            runs.iter().any(|r| r.len() > 1),
            "small records share a batch"
        );
        assert_eq!(byte_capped(&[], 900).count(), 0);
    }

    #[test]
    fn the_largest_allowed_record_fits_in_one_batch_a_peer_accepts() {
        let record = Record {
            key: "k".repeat(kv_core::MAX_KEY_LEN),
            version: Version { hlc: 1, node: 1 },
            value: Some(Bytes::from(vec![b'1'; MAX_REPLICABLE_VALUE_BYTES])),
            expires_at_ms: Some(u64::MAX),
        };
        let batch = encode_batch(std::slice::from_ref(&record));
        assert!(batch.len() <= MAX_BATCH_BYTES, "{} bytes", batch.len());
        assert_eq!(decode_batch(&batch).unwrap(), vec![record]);
    }

    #[test]
    fn damaged_batches_are_errors_not_panics() {
        let bytes = encode_batch(&[record("a", Some("1")), record("b", Some("2"))]);
        for cut in 0..bytes.len() {
            assert!(decode_batch(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = bytes.to_vec();
        extra.push(0);
        assert!(decode_batch(&extra).is_err());
        assert!(decode_batch(&[255, 255, 255, 255]).is_err());
    }
}
