//! Clock offsets between nodes: the estimate taken on each health check (Cristian's algorithm)
//! and the majority rule that decides whether this node's wall clock is too far from the others'
//! to coordinate writes (CockroachDB's maximum clock offset is the model).

use crate::cluster::Cluster;
use crate::error::{Error, Result};
use serde::Serialize;
use std::time::Duration;
use tracing::warn;

/// One peer's clock as measured by one health check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ClockSample {
    /// The peer's clock minus this node's, in milliseconds (positive: the peer is ahead).
    pub offset_ms: i64,
    /// How wrong `offset_ms` can be: half the round trip, rounded up to whole milliseconds.
    pub uncertainty_ms: u64,
}

impl ClockSample {
    /// Cristian's estimate: the peer read its clock (`peer_now_ms`) somewhere within the round
    /// trip that started at `sent_unix_us` on this node's clock and took `rtt`; assume the middle.
    /// Taking the send time from the wall clock and the round trip from the monotonic one keeps
    /// a wall-clock step during the call out of the estimate.
    pub fn estimate(peer_now_ms: u64, sent_unix_us: u64, rtt: Duration) -> ClockSample {
        let rtt_us = i128::try_from(rtt.as_micros()).unwrap_or(i128::MAX / 4);
        let midpoint_us = i128::from(sent_unix_us) + rtt_us / 2;
        let offset_us = i128::from(peer_now_ms) * 1000 - midpoint_us;
        // Round to the nearest millisecond, symmetric around zero.
        let offset_ms = (offset_us + offset_us.signum() * 500) / 1000;
        let half_rtt_us = (rtt_us + 1) / 2;
        ClockSample {
            offset_ms: i64::try_from(offset_ms).unwrap_or(if offset_ms < 0 {
                i64::MIN
            } else {
                i64::MAX
            }),
            uncertainty_ms: u64::try_from((half_rtt_us + 999) / 1000).unwrap_or(u64::MAX),
        }
    }

    /// Whether this sample puts the peer within `max` of this node, giving the measurement the
    /// benefit of its uncertainty: |offset| - uncertainty <= max.
    pub fn within(&self, max: Duration) -> bool {
        let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
        self.offset_ms
            .unsigned_abs()
            .saturating_sub(self.uncertainty_ms)
            <= max_ms
    }
}

/// This node's clock as judged against its up peers, for `GET /`, `/health` and write refusals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ClockState {
    /// False when this node is the odd one out and refuses to coordinate writes.
    pub ok: bool,
    /// `MAX_CLOCK_OFFSET_MS`.
    pub max_offset_ms: u64,
    /// This node's clock minus the cluster's (the median of this node and its measured up
    /// peers), in milliseconds; 0 when no peer was measured.
    pub offset_ms: i64,
    /// Nodes within the limit of this one, itself included.
    pub agreeing: usize,
    /// Nodes judged: this one plus every up peer with a measurement.
    pub judged: usize,
}

/// The majority rule over the measured offsets of the up peers: count the peers within `max`
/// (see [`ClockSample::within`]) plus this node; unless that is a strict majority of this node
/// and those peers, this node is the odd one out. A node with no measured up peer is always ok
/// (a single node never refuses). With two nodes far apart both refuse: neither can tell which
/// clock is wrong.
pub fn judge(samples: &[ClockSample], max: Duration) -> ClockState {
    let judged = samples.len() + 1;
    let agreeing = samples.iter().filter(|s| s.within(max)).count() + 1;
    ClockState {
        ok: agreeing * 2 > judged,
        max_offset_ms: u64::try_from(max.as_millis()).unwrap_or(u64::MAX),
        offset_ms: own_offset(samples),
        agreeing,
        judged,
    }
}

/// This node's offset from the median clock of the node set (this node counts as offset 0;
/// the middle two are averaged when the count is even), so one wild peer does not move it.
fn own_offset(samples: &[ClockSample]) -> i64 {
    let mut offsets: Vec<i64> = samples.iter().map(|s| s.offset_ms).collect();
    offsets.push(0);
    offsets.sort_unstable();
    let mid = offsets.len() / 2;
    let median = if offsets.len() % 2 == 1 {
        offsets[mid]
    } else {
        offsets[mid - 1] / 2 + offsets[mid] / 2
    };
    median.saturating_neg()
}

/// Microseconds since the Unix epoch on this machine's wall clock.
pub(crate) fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl Cluster {
    /// This node's clock against its up peers' (peers not measured yet, or down, do not count).
    pub fn clock_state(&self) -> ClockState {
        let samples = self.inner.detector.up_clock_samples();
        judge(&samples, self.inner.config.max_clock_offset)
    }

    /// Refuses with [`Error::ClockOffset`] when this node's clock is further than
    /// `MAX_CLOCK_OFFSET_MS` from a majority of the nodes: its versions could not be trusted to
    /// order writes, so it coordinates none until its clock is fixed.
    pub fn check_clock(&self) -> Result<()> {
        let state = self.clock_state();
        if state.ok {
            return Ok(());
        }
        metrics::counter!("kv_clock_offset_refusals_total").increment(1);
        warn!(
            offset_ms = state.offset_ms,
            max_ms = state.max_offset_ms,
            agreeing = state.agreeing,
            judged = state.judged,
            "clock too far from the other nodes; write refused"
        );
        Err(Error::ClockOffset {
            offset_ms: state.offset_ms,
            max_ms: state.max_offset_ms,
            agreeing: state.agreeing,
            judged: state.judged,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_millis(500);

    fn sample(offset_ms: i64, uncertainty_ms: u64) -> ClockSample {
        ClockSample {
            offset_ms,
            uncertainty_ms,
        }
    }

    #[test]
    fn estimate_takes_the_middle_of_the_round_trip() {
        // Sent at 1_000_000 ms, 10 ms round trip: the peer read its clock around 1_000_005.
        let s = ClockSample::estimate(1_000_005, 1_000_000_000, Duration::from_millis(10));
        assert_eq!(s, sample(0, 5));
        let behind = ClockSample::estimate(970_005, 1_000_000_000, Duration::from_millis(10));
        assert_eq!(behind, sample(-30_000, 5));
        let ahead = ClockSample::estimate(1_030_005, 1_000_000_000, Duration::from_millis(10));
        assert_eq!(ahead, sample(30_000, 5));
    }

    #[test]
    fn estimate_rounds_uncertainty_up_and_offset_to_nearest() {
        let s = ClockSample::estimate(1_000, 999_400, Duration::from_micros(300));
        // Midpoint 999_550 us; the peer said 1_000_000 us: 0.45 ms ahead rounds to 0.
        assert_eq!(s, sample(0, 1));
        let s = ClockSample::estimate(1_000, 998_000, Duration::from_micros(1_000));
        assert_eq!(s, sample(2, 1), "1.5 ms rounds away from zero");
        let s = ClockSample::estimate(0, 1_500, Duration::ZERO);
        assert_eq!(s, sample(-2, 0));
    }

    #[test]
    fn uncertainty_gives_the_benefit_of_the_doubt() {
        assert!(sample(500, 0).within(MAX));
        assert!(!sample(501, 0).within(MAX));
        assert!(!sample(-501, 0).within(MAX));
        assert!(sample(-700, 200).within(MAX));
        assert!(!sample(-701, 200).within(MAX));
        assert!(
            !sample(i64::MIN, 0).within(MAX),
            "no overflow at the extreme"
        );
    }

    #[test]
    fn a_lone_node_never_refuses() {
        let state = judge(&[], MAX);
        assert!(state.ok);
        assert_eq!((state.agreeing, state.judged, state.offset_ms), (1, 1, 0));
    }

    #[test]
    fn the_odd_one_out_refuses_and_sees_its_own_offset() {
        // This node is 30 s behind: both peers look 30 s ahead.
        let state = judge(&[sample(30_000, 1), sample(30_010, 1)], MAX);
        assert!(!state.ok);
        assert_eq!((state.agreeing, state.judged), (1, 3));
        assert_eq!(state.offset_ms, -30_000);
    }

    #[test]
    fn the_majority_keeps_serving_beside_a_skewed_peer() {
        let state = judge(&[sample(-30_000, 1), sample(3, 1)], MAX);
        assert!(state.ok);
        assert_eq!((state.agreeing, state.judged), (2, 3));
        assert_eq!(state.offset_ms, 0, "the median ignores the skewed peer");
    }

    #[test]
    fn two_nodes_far_apart_both_refuse() {
        let a = judge(&[sample(30_000, 1)], MAX);
        let b = judge(&[sample(-30_000, 1)], MAX);
        assert!(!a.ok && !b.ok);
        assert_eq!((a.offset_ms, b.offset_ms), (-15_000, 15_000));
    }

    #[test]
    fn a_tie_is_not_a_majority() {
        // Four nodes: this one agrees with one peer, two are far off: 2 of 4 is no majority.
        let state = judge(&[sample(0, 1), sample(9_000, 1), sample(9_000, 1)], MAX);
        assert!(!state.ok);
        let state = judge(
            &[
                sample(0, 1),
                sample(100, 1),
                sample(9_000, 1),
                sample(9_000, 1),
            ],
            MAX,
        );
        assert!(state.ok, "3 of 5");
    }
}
