//! Failure detector: what this node believes about each peer's health, fed by periodic health
//! checks and by connection errors seen on real calls.

use crate::clock::ClockSample;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Consecutive failed health checks (timeouts, errors) after which a peer is marked down. A refused
/// connection marks it down at once: nothing listens there.
pub const DOWN_AFTER_FAILURES: u32 = 2;

/// What this node believes about one peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// Not checked yet; treated as up so that a fresh cluster serves at once.
    Unknown,
    /// Answered its last health check.
    Up,
    /// Failed repeated checks or refused a connection; skipped without waiting for a timeout.
    Down,
}

/// One peer's health as shown in `GET /`.
#[derive(Clone, Debug, Serialize)]
pub struct PeerStatus {
    /// The peer's URL.
    pub url: String,
    /// What this node believes.
    pub state: PeerState,
    /// Round trip of the last successful health check.
    pub latency_ms: Option<f64>,
    /// Failed checks in a row.
    pub consecutive_failures: u32,
    /// Seconds since the state last changed.
    pub since_secs: u64,
    /// Wall-clock time of the last successful check, in Unix milliseconds.
    pub last_seen_unix_ms: Option<u64>,
    /// The peer's clock against this node's, from its last health check that carried one.
    pub clock: Option<ClockSample>,
}

#[derive(Debug)]
struct Health {
    state: Mutex<(PeerState, Instant)>,
    failures: AtomicU32,
    latency_us: AtomicU64,
    last_seen_unix_ms: AtomicU64,
    clock: Mutex<Option<ClockSample>>,
}

/// Health of every peer, shared by the request path (is it up?) and the check loop (record results).
#[derive(Debug)]
pub struct FailureDetector {
    peers: RwLock<HashMap<String, Arc<Health>>>,
}

fn fresh_health() -> Arc<Health> {
    Arc::new(Health {
        state: Mutex::new((PeerState::Unknown, Instant::now())),
        failures: AtomicU32::new(0),
        latency_us: AtomicU64::new(u64::MAX),
        last_seen_unix_ms: AtomicU64::new(0),
        clock: Mutex::new(None),
    })
}

impl FailureDetector {
    /// A detector for `peers` (this node excluded), all `Unknown` until checked.
    pub fn new(peers: impl IntoIterator<Item = String>) -> FailureDetector {
        let detector = FailureDetector {
            peers: RwLock::new(HashMap::new()),
        };
        detector.set_peers(peers);
        detector
    }

    /// Follows a membership change: new peers start `Unknown`, departed ones are forgotten,
    /// the others keep their state.
    pub fn set_peers(&self, peers: impl IntoIterator<Item = String>) {
        let mut map = self.peers.write();
        let wanted: HashMap<String, Arc<Health>> = peers
            .into_iter()
            .map(|url| {
                let health = map.get(&url).cloned().unwrap_or_else(fresh_health);
                (url, health)
            })
            .collect();
        *map = wanted;
    }

    /// The peers, sorted by URL.
    pub fn peers(&self) -> Vec<String> {
        let mut peers: Vec<String> = self.peers.read().keys().cloned().collect();
        peers.sort();
        peers
    }

    fn get(&self, peer: &str) -> Option<Arc<Health>> {
        self.peers.read().get(peer).cloned()
    }

    /// False only for a peer believed down; unknown URLs (this node) count as up.
    pub fn is_up(&self, peer: &str) -> bool {
        self.state(peer) != PeerState::Down
    }

    /// The current belief about `peer`.
    pub fn state(&self, peer: &str) -> PeerState {
        self.get(peer).map_or(PeerState::Up, |h| h.state.lock().0)
    }

    /// Round trip of the peer's last successful health check (`None`: never measured, or a
    /// stranger); a hint for which replicas to ask first.
    pub fn latency(&self, peer: &str) -> Option<Duration> {
        let micros = self.get(peer)?.latency_us.load(Ordering::Relaxed);
        (micros != u64::MAX).then(|| Duration::from_micros(micros))
    }

    /// Records a successful check; returns true when the peer just came (back) up.
    pub fn record_success(&self, peer: &str, latency: Duration) -> bool {
        let Some(health) = self.get(peer) else {
            return false;
        };
        health.failures.store(0, Ordering::Relaxed);
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        health.latency_us.store(micros, Ordering::Relaxed);
        health.last_seen_unix_ms.store(unix_ms(), Ordering::Relaxed);
        self.transition(&health, PeerState::Up)
    }

    /// Records the peer's clock as measured by a health check; a check whose answer carried no
    /// clock (an older node) forgets the previous measurement rather than keep a stale one.
    pub fn record_clock(&self, peer: &str, sample: Option<ClockSample>) {
        if let Some(health) = self.get(peer) {
            *health.clock.lock() = sample;
        }
    }

    /// The clock measurements of the peers believed up (unknown and down peers do not count);
    /// cheap enough for every write.
    pub fn up_clock_samples(&self) -> Vec<ClockSample> {
        self.peers
            .read()
            .values()
            .filter(|h| h.state.lock().0 == PeerState::Up)
            .filter_map(|h| *h.clock.lock())
            .collect()
    }

    /// Records a failed check or call; `refused` marks the peer down at once.
    pub fn record_failure(&self, peer: &str, refused: bool) {
        let Some(health) = self.get(peer) else {
            return;
        };
        let failures = health.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if refused || failures >= DOWN_AFTER_FAILURES {
            self.transition(&health, PeerState::Down);
        }
    }

    fn transition(&self, health: &Health, to: PeerState) -> bool {
        let mut state = health.state.lock();
        if state.0 == to {
            return false;
        }
        let came_up = state.0 == PeerState::Down || state.0 == PeerState::Unknown;
        *state = (to, Instant::now());
        to == PeerState::Up && came_up
    }

    /// Every peer's health, sorted by URL.
    pub fn snapshot(&self) -> Vec<PeerStatus> {
        self.peers()
            .into_iter()
            .filter_map(|url| self.get(&url).map(|h| (url, h)))
            .map(|(url, h)| {
                let (state, since) = *h.state.lock();
                let latency = h.latency_us.load(Ordering::Relaxed);
                let seen = h.last_seen_unix_ms.load(Ordering::Relaxed);
                PeerStatus {
                    url,
                    state,
                    latency_ms: (latency != u64::MAX).then(|| latency as f64 / 1000.0),
                    consecutive_failures: h.failures.load(Ordering::Relaxed),
                    since_secs: since.elapsed().as_secs(),
                    last_seen_unix_ms: (seen != 0).then_some(seen),
                    clock: *h.clock.lock(),
                }
            })
            .collect()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: &str = "http://127.0.0.1:1";

    #[test]
    fn unknown_counts_as_up_and_refusal_marks_down_at_once() {
        let fd = FailureDetector::new([PEER.to_owned()]);
        assert_eq!(fd.state(PEER), PeerState::Unknown);
        assert!(fd.is_up(PEER));
        fd.record_failure(PEER, true);
        assert!(!fd.is_up(PEER));
    }

    #[test]
    fn timeouts_need_repeated_failures() {
        let fd = FailureDetector::new([PEER.to_owned()]);
        fd.record_success(PEER, Duration::from_millis(1));
        for _ in 1..DOWN_AFTER_FAILURES {
            fd.record_failure(PEER, false);
            assert!(fd.is_up(PEER));
        }
        fd.record_failure(PEER, false);
        assert!(!fd.is_up(PEER));
    }

    #[test]
    fn coming_back_up_is_reported_once() {
        let fd = FailureDetector::new([PEER.to_owned()]);
        assert!(fd.record_success(PEER, Duration::from_millis(2)));
        assert!(!fd.record_success(PEER, Duration::from_millis(2)));
        fd.record_failure(PEER, true);
        assert!(fd.record_success(PEER, Duration::from_millis(2)));
        let status = &fd.snapshot()[0];
        assert_eq!(status.state, PeerState::Up);
        assert_eq!(status.latency_ms, Some(2.0));
        assert_eq!(fd.latency(PEER), Some(Duration::from_millis(2)));
        assert_eq!(fd.latency("http://127.0.0.1:9"), None);
    }

    #[test]
    fn peers_follow_membership_changes_and_keep_their_state() {
        let fd = FailureDetector::new([PEER.to_owned()]);
        fd.record_failure(PEER, true);
        fd.set_peers([PEER.to_owned(), "http://127.0.0.1:3".to_owned()]);
        assert!(!fd.is_up(PEER), "kept its state");
        assert_eq!(fd.state("http://127.0.0.1:3"), PeerState::Unknown);
        fd.set_peers(["http://127.0.0.1:3".to_owned()]);
        assert_eq!(fd.peers(), vec!["http://127.0.0.1:3".to_owned()]);
    }

    #[test]
    fn clock_samples_are_kept_per_peer_and_shown() {
        let fd = FailureDetector::new([PEER.to_owned()]);
        assert_eq!(fd.snapshot()[0].clock, None);
        let sample = ClockSample {
            offset_ms: -30_000,
            uncertainty_ms: 2,
        };
        fd.record_clock(PEER, Some(sample));
        fd.record_clock("http://127.0.0.1:9", Some(sample));
        assert_eq!(fd.snapshot()[0].clock, Some(sample));
        assert_eq!(fd.snapshot().len(), 1, "strangers are not recorded");
        assert_eq!(
            fd.up_clock_samples(),
            vec![],
            "an unknown peer does not count"
        );
        fd.record_success(PEER, Duration::from_millis(1));
        assert_eq!(fd.up_clock_samples(), vec![sample]);
        fd.record_failure(PEER, true);
        assert_eq!(fd.up_clock_samples(), vec![], "a down peer does not count");
        fd.record_clock(PEER, None);
        assert_eq!(fd.snapshot()[0].clock, None);
    }

    #[test]
    fn this_node_and_strangers_count_as_up() {
        let fd = FailureDetector::new([PEER.to_owned()]);
        assert!(fd.is_up("http://127.0.0.1:2"));
        fd.record_failure("http://127.0.0.1:2", true);
        assert!(fd.snapshot().len() == 1);
    }
}
