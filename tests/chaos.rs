//! Chaos tests: real kv-node / kv-lb processes under faults (kill -9, SIGSTOP, partitions, rolling
//! restarts, skewed clocks, slow links, a full disk, damaged files), each run bounded in time and
//! checked on a recorded history (linearizable at the default quorum levels); plus
//! property tests of the decoders the fuzzers also hit, and hardening checks of the HTTP surface.
//!
//! The short versions run in `cargo test`; `scripts/chaos.sh` runs them longer (`KV_CHAOS_SECS`)
//! and prints a table of the `CHAOS-RESULT` lines they write to stderr. See docs/TESTING.md.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

#[path = "chaos/clock.rs"]
mod clock;
#[path = "chaos/decoders.rs"]
mod decoders;
#[path = "chaos/disk.rs"]
mod disk;
#[path = "chaos/hardening.rs"]
mod hardening;
#[path = "chaos/kill.rs"]
mod kill;
#[path = "chaos/partition.rs"]
mod partition;
#[path = "chaos/pause.rs"]
mod pause;
#[path = "chaos/recovery.rs"]
mod recovery;
#[path = "chaos/rolling.rs"]
mod rolling;
#[path = "chaos/slow.rs"]
mod slow;
