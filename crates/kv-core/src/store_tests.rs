//! (Compiled only under #[cfg(test)], from store.rs.) Tests of the store as a whole: durability across clean and crash restarts, group commit,
//! the failed state, the lock, checkpoints, and a model-based property test.

use super::*;
use crate::{snapshot, Version};
use bytes::Bytes;
use proptest::prelude::*;
use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

fn config(dir: &Path) -> StoreConfig {
    let mut config = StoreConfig::new(dir.to_owned(), 1);
    // Small preallocated segments: some tests fill them and they grow past it.
    config.wal_prealloc_bytes = 64 * 1024;
    config
}

fn put(store: &Store, key: &str, value: &str) -> Record {
    Record {
        key: key.into(),
        version: store.clock().tick(),
        value: Some(Bytes::from(value.to_owned())),
        expires_at_ms: None,
    }
}

fn del(store: &Store, key: &str) -> Record {
    Record {
        key: key.into(),
        version: store.clock().tick(),
        value: None,
        expires_at_ms: None,
    }
}

fn value(store: &Store, key: &str) -> Option<Vec<u8>> {
    store.get(key).and_then(|e| e.value).map(|v| v.to_vec())
}

/// Polls `condition` until it holds or the deadline passes.
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn writes_survive_clean_and_crash_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    let a = put(&store, "a", "1");
    let b = put(&store, "b", "2");
    assert_eq!(store.apply(vec![a, b]).await.unwrap(), vec![true, true]);
    assert_eq!(
        store.apply(vec![del(&store, "b")]).await.unwrap(),
        vec![true]
    );
    store.shutdown().await.unwrap();
    assert!(matches!(
        store.apply(vec![put(&store, "c", "3")]).await,
        Err(Error::Closed)
    ));
    drop(store);
    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(value(&store, "a"), Some(b"1".to_vec()));
    assert!(store.get("b").unwrap().is_tombstone());
    assert_eq!(
        store.status().wal_bytes,
        segment::HEADER_LEN as u64,
        "shutdown checkpoint covers the WAL"
    );
    store.apply(vec![put(&store, "c", "3")]).await.unwrap();
    drop(store); // crash: no shutdown
    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(value(&store, "c"), Some(b"3".to_vec()));
    let status = store.status();
    assert_eq!((status.keys, status.tombstones), (2, 1));
}

#[tokio::test]
async fn last_writer_wins_and_stale_writes_are_not_logged() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    let old = put(&store, "k", "old");
    let new = put(&store, "k", "new");
    assert_eq!(
        store.apply(vec![new.clone(), old.clone()]).await.unwrap(),
        vec![true, false]
    );
    assert_eq!(
        store.apply(vec![new]).await.unwrap(),
        vec![false],
        "equal version is not newer"
    );
    let records = store.status().wal_records;
    assert_eq!(store.apply(vec![old]).await.unwrap(), vec![false]);
    assert_eq!(
        store.status().wal_records,
        records,
        "a stale record is not written"
    );
    assert_eq!(value(&store, "k"), Some(b"new".to_vec()));
    let remote = Version {
        hlc: store.clock().tick().hlc + 1_000_000,
        node: 9,
    };
    store
        .apply(vec![Record {
            key: "r".into(),
            version: remote,
            value: None,
            expires_at_ms: None,
        }])
        .await
        .unwrap();
    assert!(
        store.clock().tick() > remote,
        "apply observes versions into the clock"
    );
}

#[tokio::test]
async fn second_open_of_the_same_folder_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    assert!(matches!(
        Store::open(config(dir.path())),
        Err(Error::Locked { .. })
    ));
    drop(store);
    Store::open(config(dir.path())).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appenders_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..64 {
        let store = store.clone();
        tasks.spawn(async move {
            for i in 0..10 {
                let r = put(&store, &format!("w{writer}/{i}"), "v");
                assert_eq!(store.apply(vec![r]).await.unwrap(), vec![true]);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let s = store.status();
    assert_eq!((s.wal_appends, s.keys), (640, 640));
    assert_eq!(
        s.wal_fsyncs, s.wal_batches,
        "always mode: one fsync per batch"
    );
    assert!(
        s.wal_fsyncs * 4 < s.wal_appends,
        "{} fsyncs for {} appends",
        s.wal_fsyncs,
        s.wal_appends
    );
}

#[tokio::test]
async fn failed_write_refuses_writes_but_keeps_reads() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    store.apply(vec![put(&store, "kept", "yes")]).await.unwrap();
    store.inject_write_failure();
    let err = store
        .apply(vec![put(&store, "lost", "no")])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::WalFailed { .. }), "{err}");
    assert!(matches!(
        store.apply(vec![put(&store, "later", "no")]).await,
        Err(Error::WalFailed { .. })
    ));
    assert!(store.status().failed.unwrap().contains("injected"));
    assert_eq!(value(&store, "kept"), Some(b"yes".to_vec()));
    assert_eq!(store.get("lost"), None, "a failed write is not applied");
    assert!(
        store.checkpoint().await.is_err(),
        "no checkpoint on a failed WAL"
    );
    drop(store);
    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(value(&store, "kept"), Some(b"yes".to_vec()));
    assert!(
        store.status().failed.is_none(),
        "a restart clears the failed state"
    );
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

#[tokio::test]
async fn a_full_disk_cuts_the_batch_back_and_makes_the_store_read_only_until_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.min_free_bytes = 0;
    cfg.disk_probe_interval = Duration::from_millis(20);
    // Not preallocated: the file's length is where the batches end.
    cfg.wal_prealloc_bytes = 0;
    let store = Store::open(cfg.clone()).unwrap();
    store.apply(vec![put(&store, "kept", "yes")]).await.unwrap();
    let segment = store.current_segment_path().unwrap();
    let before = file_len(&segment);
    store.fake_free_space(Some(0));
    store.inject_disk_full();
    let big = "x".repeat(10_000);
    let err = store
        .apply(vec![put(&store, "lost", &big), put(&store, "lost2", "z")])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DiskFull { .. }), "{err}");
    assert_eq!(
        file_len(&segment),
        before,
        "the half-written batch is cut back to the last whole batch"
    );
    assert_eq!(store.get("lost"), None, "a refused write is not applied");
    // Read-only: later writes are refused, reads go on, the status says why; not failed.
    let later = store.apply(vec![put(&store, "later", "no")]).await;
    assert!(matches!(later, Err(Error::DiskFull { .. })), "{later:?}");
    assert_eq!(value(&store, "kept"), Some(b"yes".to_vec()));
    let status = store.status();
    assert!(status.failed.is_none(), "a full disk is not a WAL failure");
    let why = status.read_only.unwrap();
    assert!(why.contains("full") && why.contains("read-only"), "{why}");
    assert!(store.writable().is_err());
    assert!(
        store.checkpoint().await.is_ok(),
        "a checkpoint still runs while read-only"
    );
    // Space returns: the probe lifts the state, no restart.
    store.fake_free_space(Some(2 << 20));
    wait_until("writes resume", || store.writable().is_ok());
    assert!(store.read_only().is_none());
    store.apply(vec![put(&store, "after", "ok")]).await.unwrap();
    // Crash and recover: nothing of the cut batch shows up, nothing acknowledged is lost, and
    // the log after the cut is not taken for corruption.
    drop(store);
    let store = Store::open(cfg).unwrap();
    assert_eq!(value(&store, "kept"), Some(b"yes".to_vec()));
    assert_eq!(value(&store, "after"), Some(b"ok".to_vec()));
    assert_eq!((store.get("lost"), store.get("lost2")), (None, None));
    assert_eq!(store.get("later"), None);
}

#[tokio::test]
async fn the_reserve_makes_the_store_read_only_before_the_disk_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.min_free_bytes = 8 << 20;
    cfg.disk_probe_interval = Duration::from_millis(20);
    let store = Store::open(cfg).unwrap();
    store.apply(vec![put(&store, "kept", "yes")]).await.unwrap();
    store.fake_free_space(Some(5 << 20));
    wait_until("the store turns read-only", || store.read_only().is_some());
    let err = store
        .apply(vec![put(&store, "refused", "no")])
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::DiskFull { free_bytes, reserve_bytes, .. }
            if free_bytes == 5 << 20 && reserve_bytes == 8 << 20),
        "{err}"
    );
    assert!(err.to_string().contains("reserve"), "{err}");
    assert_eq!(value(&store, "kept"), Some(b"yes".to_vec()));
    store.fake_free_space(Some(9 << 20));
    wait_until("writes resume", || store.writable().is_ok());
    store.apply(vec![put(&store, "after", "ok")]).await.unwrap();
    assert_eq!(store.get("refused"), None);
}

#[tokio::test]
async fn shutdown_after_a_wal_failure_reports_it_and_still_stops() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    store.apply(vec![put(&store, "kept", "yes")]).await.unwrap();
    store.inject_write_failure();
    assert!(store.apply(vec![put(&store, "lost", "no")]).await.is_err());
    let err = store.shutdown().await.unwrap_err();
    assert!(matches!(err, Error::WalFailed { .. }), "{err}");
    assert!(store.shutdown().await.is_ok(), "a second call is a no-op");
    drop(store);
    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(value(&store, "kept"), Some(b"yes".to_vec()));
}

#[tokio::test]
async fn dropping_without_shutdown_writes_no_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.snapshot_interval = Duration::ZERO;
    let store = Store::open(cfg.clone()).unwrap();
    store.apply(vec![put(&store, "k", "v")]).await.unwrap();
    drop(store);
    assert!(!dir.path().join(snapshot::FILE_NAME).exists());
    assert_eq!(value(&Store::open(cfg).unwrap(), "k"), Some(b"v".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_drops_covered_wal_while_writes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    for i in 0..200 {
        store
            .apply(vec![put(&store, &format!("k{i}"), "v")])
            .await
            .unwrap();
    }
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                store
                    .apply(vec![put(&store, &format!("during{i}"), "v")])
                    .await
                    .unwrap();
            }
        })
    };
    let stats = store.checkpoint().await.unwrap();
    assert!(stats.keys >= 200 && stats.bytes > 0, "{stats:?}");
    writer.await.unwrap();
    assert!(store.status().last_snapshot.is_some());
    let segments = segment::list(&crate::vfs::OsFs, dir.path()).unwrap();
    assert_eq!(segments.len(), 1, "older segments removed: {segments:?}");
    drop(store);
    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(store.status().keys, 400);
}

#[tokio::test]
async fn expired_tombstones_are_dropped_at_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.tombstone_grace = Duration::ZERO;
    let store = Store::open(cfg.clone()).unwrap();
    store.apply(vec![put(&store, "a", "1")]).await.unwrap();
    let old = Record {
        key: "gone".into(),
        version: Version {
            hlc: 1 << 16,
            node: 1,
        },
        value: None,
        expires_at_ms: None,
    };
    store.apply(vec![old]).await.unwrap();
    assert_eq!(store.checkpoint().await.unwrap().tombstones_dropped, 1);
    assert_eq!(store.get("gone"), None);
    store.shutdown().await.unwrap();
    drop(store);
    let store = Store::open(cfg).unwrap();
    assert_eq!((store.status().keys, store.status().tombstones), (1, 0));
}

#[tokio::test]
async fn wal_size_bound_triggers_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.wal_max_bytes = 4096;
    cfg.sync = SyncMode::Never;
    let store = Store::open(cfg).unwrap();
    for i in 0..100 {
        store
            .apply(vec![put(&store, &format!("k{i}"), &"x".repeat(100))])
            .await
            .unwrap();
    }
    wait_until("a checkpoint ran", || {
        store.status().last_snapshot.is_some()
    });
}

#[tokio::test]
async fn interval_mode_fsyncs_without_further_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.sync = SyncMode::Interval;
    cfg.sync_interval = Duration::from_millis(20);
    let store = Store::open(cfg).unwrap();
    store.apply(vec![put(&store, "k", "v")]).await.unwrap();
    wait_until("the interval fsync ran", || store.status().wal_fsyncs > 0);
    store.shutdown().await.unwrap();
}

/// Writes three records through a store and crashes; returns the segment and the offsets of
/// its batches (one record each) and of its end.
async fn three_record_wal(dir: &Path) -> (PathBuf, Vec<usize>) {
    let store = Store::open(config(dir)).unwrap();
    for key in ["first", "second", "third"] {
        store.apply(vec![put(&store, key, "value")]).await.unwrap();
    }
    drop(store);
    let (number, path) = segment::list(&crate::vfs::OsFs, dir)
        .unwrap()
        .pop()
        .unwrap();
    let bytes = fs::read(&path).unwrap();
    let salt = segment::check_header(&path, &bytes, number).unwrap().salt;
    let mut starts = vec![segment::HEADER_LEN];
    while let crate::batch::BatchRead::Complete(_, next) =
        crate::batch::read(&bytes, *starts.last().unwrap(), salt)
    {
        starts.push(next);
    }
    assert_eq!(starts.len(), 4);
    (path, starts)
}

#[tokio::test]
async fn wal_cut_anywhere_in_its_last_record_recovers_the_records_before() {
    let dir = tempfile::tempdir().unwrap();
    let (path, starts) = three_record_wal(dir.path()).await;
    let whole = fs::read(&path).unwrap();
    for cut in starts[2] + 1..starts[3] {
        fs::write(&path, &whole[..cut]).unwrap();
        let store = Store::open(config(dir.path())).unwrap();
        assert_eq!(
            value(&store, "second"),
            Some(b"value".to_vec()),
            "cut at {cut}"
        );
        assert_eq!(store.get("third"), None, "cut at {cut}");
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            starts[2] as u64,
            "torn tail truncated"
        );
        drop(store);
        // Each open adds an empty segment; remove it so the damaged one is the newest again.
        let (_, newest) = segment::list(&crate::vfs::OsFs, dir.path())
            .unwrap()
            .pop()
            .unwrap();
        fs::remove_file(newest).unwrap();
    }
}

#[tokio::test]
async fn flipped_byte_in_a_middle_record_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let (path, starts) = three_record_wal(dir.path()).await;
    let mut bytes = fs::read(&path).unwrap();
    bytes[starts[1] + 12] ^= 0x01;
    fs::write(&path, &bytes).unwrap();
    match Store::open(config(dir.path())) {
        Err(Error::Corrupt {
            path: p, offset, ..
        }) => assert_eq!((p, offset), (path, starts[1] as u64)),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[tokio::test]
async fn foreign_file_is_bad_format_and_missing_segment_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = three_record_wal(dir.path()).await;
    let mut bytes = fs::read(&path).unwrap();
    bytes[0] = b'X';
    fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        Store::open(config(dir.path())),
        Err(Error::BadFormat { .. })
    ));
    fs::remove_file(&path).unwrap();
    fs::write(segment::path(dir.path(), 5), b"").unwrap();
    fs::write(segment::path(dir.path(), 6), b"").unwrap();
    assert!(matches!(
        Store::open(config(dir.path())),
        Err(Error::Corrupt { .. })
    ));
}

/// One step of the model test.
#[derive(Clone, Debug)]
enum Op {
    Put(u8, Vec<u8>),
    Delete(u8),
    /// A write with an old version (a late replica); must never win over a newer one.
    Stale(u8),
    Checkpoint,
    Restart {
        clean: bool,
    },
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..8, proptest::collection::vec(any::<u8>(), 0..20)).prop_map(|(k, v)| Op::Put(k, v)),
        2 => (0u8..8).prop_map(Op::Delete),
        1 => (0u8..8).prop_map(Op::Stale),
        1 => Just(Op::Checkpoint),
        1 => any::<bool>().prop_map(|clean| Op::Restart { clean }),
    ]
}

type Model = HashMap<String, (Version, Option<Vec<u8>>)>;

fn model_apply(model: &mut Model, r: &Record) {
    let newer = model.get(&r.key).is_none_or(|(v, _)| r.version > *v);
    if newer {
        model.insert(
            r.key.clone(),
            (r.version, r.value.as_ref().map(|b| b.to_vec())),
        );
    }
}

fn assert_matches(store: &Store, model: &Model) {
    let mut seen = 0;
    store.scan(|key, entry| {
        seen += 1;
        let (version, value) = model
            .get(key)
            .unwrap_or_else(|| panic!("unexpected key {key}"));
        assert_eq!(entry.version, *version, "{key}");
        assert_eq!(entry.value.as_deref(), value.as_deref(), "{key}");
    });
    assert_eq!(seen, model.len());
}

async fn run_model(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.sync = SyncMode::Never;
    let mut store = Store::open(cfg.clone()).unwrap();
    let mut model = Model::new();
    for op in ops {
        let record = |key: u8, value: Option<Vec<u8>>, version| Record {
            key: format!("key{key}"),
            version,
            value: value.map(Bytes::from),
            expires_at_ms: None,
        };
        let r = match op {
            Op::Put(k, v) => record(k, Some(v), store.clock().tick()),
            Op::Delete(k) => record(k, None, store.clock().tick()),
            Op::Stale(k) => record(k, Some(b"stale".to_vec()), Version { hlc: 5, node: 2 }),
            Op::Checkpoint => {
                store.checkpoint().await.unwrap();
                continue;
            }
            Op::Restart { clean } => {
                if clean {
                    store.shutdown().await.unwrap();
                }
                drop(store);
                store = Store::open(cfg.clone()).unwrap();
                assert_matches(&store, &model);
                continue;
            }
        };
        model_apply(&mut model, &r);
        store.apply(vec![r]).await.unwrap();
    }
    assert_matches(&store, &model);
    drop(store);
    assert_matches(&Store::open(cfg).unwrap(), &model);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn recovers_to_the_model_after_any_sequence(ops in proptest::collection::vec(arb_op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run_model(ops));
    }
}

#[tokio::test]
async fn the_data_folder_and_every_file_in_it_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = Store::open(config(&dir)).unwrap();
    store.apply(vec![put(&store, "a", "1")]).await.unwrap();
    store.checkpoint().await.unwrap();
    let backup = store.backup_temp_path();
    store.backup_to(&backup).unwrap();
    store.apply(vec![put(&store, "b", "2")]).await.unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700, "an existing loose folder is tightened");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
        files += 1;
    }
    assert!(
        files >= 4,
        "lock, WAL segments, snapshot and backup: {files}"
    );
    store.shutdown().await.unwrap();
}

/// A version handed out but never written here (its write went to the peers only, then the
/// process died) is never handed out again after a restart, even within the same millisecond.
#[test]
fn a_restart_never_reissues_a_version_the_clock_handed_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut issued = Vec::new();
    for _ in 0..3 {
        let store = Store::open(config(dir.path())).unwrap();
        for _ in 0..1000 {
            issued.push(store.clock().tick());
        }
        // No write, no checkpoint: only the reservation remembers these versions.
        drop(store);
    }
    let store = Store::open(config(dir.path())).unwrap();
    let next = store.clock().tick();
    let max = issued.iter().max().copied().unwrap();
    assert!(next > max, "{next} was issued again (max before: {max})");
    let mut sorted = issued.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), issued.len(), "a version was issued twice");
    // Each restart starts above the reservation (at most one 250 ms window ahead of what it
    // handed out), so even three restarts within one millisecond stay within what peers accept.
    let ahead_ms = next.physical_ms().saturating_sub(crate::version::now_ms());
    assert!(ahead_ms <= 4 * 250, "{ahead_ms} ms ahead of the wall clock");
}

/// Writers a millisecond apart share fsyncs when a commit may wait for them, and do not when
/// it may not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_delay_lets_paced_writers_share_fsyncs() {
    async fn paced(delay: Duration) -> (u64, u64) {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.wal_batch_delay = delay;
        let store = Store::open(cfg).unwrap();
        let before = store.status().wal_fsyncs;
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..4 {
            let store = store.clone();
            tasks.spawn(async move {
                for i in 0..25 {
                    let r = put(&store, &format!("w{w}/{i}"), "v");
                    store.apply(vec![r]).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        let fsyncs = store.status().wal_fsyncs - before;
        let delayed = store.inner.wal.delayed_commits.load(Ordering::Relaxed);
        (fsyncs, delayed)
    }
    let (fsyncs, delayed) = paced(Duration::from_millis(5)).await;
    assert!(delayed > 0, "no commit waited");
    assert!(
        fsyncs * 2 <= 100,
        "100 writes took {fsyncs} fsyncs with a 5 ms delay"
    );
    let (_, delayed) = paced(Duration::ZERO).await;
    assert_eq!(delayed, 0, "a zero delay never waits");
}

/// A lone writer, whom waiting never helps, pays the delay on few commits.
#[tokio::test]
async fn a_lone_writer_rarely_waits() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.wal_batch_delay = Duration::from_millis(2);
    let store = Store::open(cfg).unwrap();
    for i in 0..100 {
        store
            .apply(vec![put(&store, &format!("k{i}"), "v")])
            .await
            .unwrap();
    }
    let delayed = store.inner.wal.delayed_commits.load(Ordering::Relaxed);
    // Waits at the 1st, 3rd, 7th, 15th, 31st, 63rd chance, then one in 64.
    assert!(delayed <= 8, "{delayed} of 100 lone commits waited");
    assert!(delayed >= 1, "the first chance is taken");
}
