//! Write stamps: the version the load balancer gives each plain write (`x-kv-version`), so that
//! the write can be retried on the next replica after its answer was lost (a node killed while
//! it was working): the retry is the same record, and last-writer-wins applies it once.
//!
//! A stamp is a hybrid logical clock in the nodes' format, `{hlc:016x}-{node:08x}` with
//! `hlc = unix_ms << 16 | counter`, and a random id for this process. The clock also observes
//! every version the nodes answer with (`ETag`), so a write sent after another one's answer
//! always gets a greater version, whoever stamped the first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::HeaderValue;

/// The header a stamped write carries; the nodes read the same name.
pub const VERSION_HEADER: &str = "x-kv-version";

/// Issues increasing versions for this load balancer.
#[derive(Debug)]
pub struct Stamper {
    node: u32,
    last: AtomicU64,
}

impl Stamper {
    /// A stamper with a random id.
    pub fn new() -> Stamper {
        Stamper {
            node: rand::random::<u32>(),
            last: AtomicU64::new(0),
        }
    }

    /// The next stamp: greater than every stamp issued or version observed before.
    pub fn stamp(&self) -> HeaderValue {
        let physical = unix_ms() << 16;
        let mut last = self.last.load(Ordering::Relaxed);
        let hlc = loop {
            let next = physical.max(last + 1);
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => break next,
                Err(seen) => last = seen,
            }
        };
        let text = format!("{hlc:016x}-{:08x}", self.node);
        HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("0"))
    }

    /// Moves the clock past a version a node answered with (`ETag: "<version>"`).
    pub fn observe(&self, etag: &HeaderValue) {
        let Some(hlc) = etag
            .to_str()
            .ok()
            .map(|t| t.trim_matches('"'))
            .and_then(|t| t.split_once('-'))
            .and_then(|(hlc, _)| u64::from_str_radix(hlc, 16).ok())
        else {
            return;
        };
        self.last.fetch_max(hlc, Ordering::AcqRel);
    }
}

impl Default for Stamper {
    fn default() -> Self {
        Stamper::new()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hlc(v: &HeaderValue) -> u64 {
        let text = v.to_str().unwrap();
        u64::from_str_radix(text.split_once('-').unwrap().0, 16).unwrap()
    }

    #[test]
    fn stamps_increase_and_pass_observed_versions() {
        let stamper = Stamper::new();
        let a = stamper.stamp();
        let b = stamper.stamp();
        assert!(hlc(&b) > hlc(&a));
        let ahead = hlc(&b) + (5000 << 16);
        stamper.observe(&HeaderValue::from_str(&format!("\"{ahead:016x}-00000001\"")).unwrap());
        assert!(hlc(&stamper.stamp()) > ahead);
        stamper.observe(&HeaderValue::from_static("garbage"));
        assert_eq!(a.to_str().unwrap().len(), 16 + 1 + 8);
    }
}
