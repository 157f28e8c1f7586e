//! Write versions: a hybrid logical clock (HLC) plus node id, the clock that issues them, and
//! stable node ids. Versions order the writes to one key; the greater one wins.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::reservation::{Reservation, RESERVATION_WINDOW_HLC};
use crate::Error;
use std::sync::Arc;

/// Bits of [`Version::hlc`] that hold the logical counter; the rest is unix milliseconds.
const LOGICAL_BITS: u32 = 16;

/// Ordered write version: hybrid logical clock + node id. Ordering: `(hlc, node)`. Last writer wins.
///
/// `hlc = (unix physical millis << 16) | logical counter`. The node id breaks ties between two
/// nodes that issued the same `hlc`, so two distinct writers never produce equal versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Version {
    /// Hybrid logical clock value.
    pub hlc: u64,
    /// Id of the node that issued the version (see [`node_id`]).
    pub node: u32,
}

impl Version {
    /// The smallest version; every issued version is greater.
    pub const ZERO: Version = Version { hlc: 0, node: 0 };

    /// Wall-clock time of the write in unix milliseconds (the physical part of the HLC).
    pub fn physical_ms(&self) -> u64 {
        self.hlc >> LOGICAL_BITS
    }
}

/// Opaque text form `{hlc:016x}-{node:08x}`, e.g. `0001890a5b3c0000-1a2b3c4d`.
impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}-{:08x}", self.hlc, self.node)
    }
}

/// Parses exactly the [`Display`](fmt::Display) form; anything else is [`Error::BadVersion`].
impl FromStr for Version {
    type Err = Error;

    fn from_str(s: &str) -> Result<Version, Error> {
        let bad = || Error::BadVersion(s.chars().take(64).collect());
        let (hlc, node) = s.split_once('-').ok_or_else(bad)?;
        let hlc = parse_lower_hex(hlc, 16).ok_or_else(bad)?;
        let node = parse_lower_hex(node, 8).ok_or_else(bad)?;
        let node = u32::try_from(node).map_err(|_| bad())?;
        Ok(Version { hlc, node })
    }
}

/// Parses exactly `digits` lowercase hex digits (no sign, no prefix).
fn parse_lower_hex(s: &str, digits: usize) -> Option<u64> {
    let canonical = s.len() == digits && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !canonical {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// HLC generator, thread-safe and lock-free, monotonic even if the wall clock goes backwards.
/// With a [`Reservation`], it never issues a version beyond the persisted bound without first
/// moving the bound, so a restart (which starts above the bound) never reissues one.
#[derive(Debug)]
pub struct Clock {
    node: u32,
    /// The greatest hlc issued or observed so far.
    last: AtomicU64,
    reservation: Option<Arc<Reservation>>,
}

impl Clock {
    /// A clock issuing versions for `node`.
    pub fn new(node: u32) -> Clock {
        Clock {
            node,
            last: AtomicU64::new(0),
            reservation: None,
        }
    }

    /// A clock for `node` bound by `reservation`, starting above its stored bound.
    pub(crate) fn reserved(node: u32, reservation: Arc<Reservation>) -> Clock {
        Clock {
            node,
            last: AtomicU64::new(reservation.reserved()),
            reservation: Some(reservation),
        }
    }

    /// Moves the reservation ahead while the clock is within half a window of it, so that ticks
    /// on the request path seldom wait for the file (called from the WAL writer's thread).
    pub(crate) fn reserve_ahead(&self) {
        if let Some(reservation) = &self.reservation {
            let last = self.last.load(Ordering::Acquire);
            let want = last.saturating_add(RESERVATION_WINDOW_HLC / 2);
            if want > reservation.reserved() {
                reservation.cover(want);
            }
        }
    }

    /// The node id stamped on every version this clock issues.
    pub fn node(&self) -> u32 {
        self.node
    }

    /// A version strictly greater than every version ticked or observed before.
    pub fn tick(&self) -> Version {
        let physical = now_ms() << LOGICAL_BITS;
        let mut last = self.last.load(Ordering::Acquire);
        loop {
            // The wall clock wins when it is ahead; otherwise count up from the last value
            // (a full logical counter carries into the millisecond part, still monotonic).
            let next = physical.max(last.saturating_add(1));
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if let Some(reservation) = &self.reservation {
                        reservation.cover(next);
                    }
                    return Version {
                        hlc: next,
                        node: self.node,
                    };
                }
                Err(current) => last = current,
            }
        }
    }

    /// The greatest hlc issued or observed so far (saved in snapshots).
    pub(crate) fn last_hlc(&self) -> u64 {
        self.last.load(Ordering::Acquire)
    }

    /// Merges a version seen elsewhere, so later ticks are greater than it.
    pub fn observe(&self, seen: Version) {
        self.last.fetch_max(seen.hlc, Ordering::AcqRel);
    }
}

/// Milliseconds since the unix epoch; 0 if the clock is set before 1970.
pub(crate) fn now_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX >> LOGICAL_BITS)
}

/// Stable node id from a node's URL or name: the crc32c of its bytes, the same on every machine.
pub fn node_id(name: &str) -> u32 {
    crc32c::crc32c(name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    #[test]
    fn display_is_fixed_width_hex() {
        let v = Version {
            hlc: 0x1234,
            node: 0xab,
        };
        assert_eq!(v.to_string(), "0000000000001234-000000ab");
    }

    #[test]
    fn from_str_rejects_non_canonical_forms() {
        for bad in [
            "",
            "-",
            "0000000000001234",
            "0000000000001234-000000AB",
            "+000000000001234-000000ab",
            "0000000000001234-000000ab-",
            "00000000000001234-000000ab",
            "0000000000001234-0000000ab",
            "0000000000001234_000000ab",
            "zzzzzzzzzzzzzzzz-000000ab",
        ] {
            assert!(
                matches!(bad.parse::<Version>(), Err(Error::BadVersion(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn ordering_is_hlc_then_node() {
        let a = Version { hlc: 1, node: 9 };
        let b = Version { hlc: 2, node: 0 };
        let c = Version { hlc: 2, node: 1 };
        assert!(Version::ZERO < a && a < b && b < c);
        assert_eq!(
            Version {
                hlc: 5 << 16 | 3,
                node: 0
            }
            .physical_ms(),
            5
        );
    }

    #[test]
    fn tick_is_greater_than_observed() {
        let clock = Clock::new(7);
        let far = Version {
            hlc: u64::MAX / 2,
            node: 99,
        };
        clock.observe(far);
        let next = clock.tick();
        assert!(next > far);
        assert_eq!(next.node, 7);
    }

    #[test]
    fn clock_is_monotonic_under_concurrent_ticks() {
        let clock = Arc::new(Clock::new(1));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let clock = Arc::clone(&clock);
                std::thread::spawn(move || {
                    let mut seen = Vec::with_capacity(10_000);
                    let mut last = Version::ZERO;
                    for _ in 0..10_000 {
                        let v = clock.tick();
                        assert!(v > last, "tick went backwards within a thread");
                        last = v;
                        seen.push(v);
                    }
                    seen
                })
            })
            .collect();
        let mut all: Vec<Version> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let total = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), total, "two ticks returned the same version");
    }

    #[test]
    fn node_id_is_stable() {
        assert_eq!(
            node_id("http://127.0.0.1:8001"),
            node_id("http://127.0.0.1:8001")
        );
        assert_ne!(
            node_id("http://127.0.0.1:8001"),
            node_id("http://127.0.0.1:8002")
        );
        // crc32c("123456789") is the standard check value.
        assert_eq!(node_id("123456789"), 0xe306_9283);
    }

    proptest! {
        #[test]
        fn display_from_str_round_trip(hlc in any::<u64>(), node in any::<u32>()) {
            let v = Version { hlc, node };
            prop_assert_eq!(v.to_string().parse::<Version>().unwrap(), v);
        }

        #[test]
        fn from_str_never_panics(s in ".{0,40}") {
            let _ = s.parse::<Version>();
        }
    }
}
