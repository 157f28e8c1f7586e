//! (Compiled only under #[cfg(test)], from recovery.rs.) Recovery: replay, torn tails, foreign
//! files, the spare snapshot, old file formats; through `recover` and through the whole `Store`.

use super::*;
use crate::identity::{self, DataOwner, Identity};
use crate::vfs::OsFs;
use crate::{Store, StoreConfig};
use bytes::Bytes;
use std::fs::{self, OpenOptions};

const ID: DirId = DirId([9; 16]);
const FOLDER: FolderId = FolderId {
    id: ID,
    stored: true,
};

/// A segment in the current format, one batch per record, as `SYNC=always` writes them.
fn segment_with(dir: &Path, number: u64, records: &[Record]) -> PathBuf {
    let (_, salt) = segment::create(&OsFs, dir, number, ID).unwrap();
    let path = segment::path(dir, number);
    let mut bytes = fs::read(&path).unwrap();
    for r in records {
        let durable = bytes.len() as u64;
        let start = batch::begin(&mut bytes);
        frame::append(&mut bytes, |b| r.encode(b)).unwrap();
        batch::seal(&mut bytes, start, salt, durable);
    }
    fs::write(&path, bytes).unwrap();
    path
}

/// A segment in format version 1 (frames, no batches), as older programs wrote it.
fn v1_segment_with(dir: &Path, number: u64, records: &[Record]) -> PathBuf {
    let path = segment::path(dir, number);
    let mut bytes = segment::v1_header(number).to_vec();
    for r in records {
        frame::append(&mut bytes, |b| r.encode(b)).unwrap();
    }
    fs::write(&path, bytes).unwrap();
    path
}

fn rec(key: &str, hlc: u64) -> Record {
    Record {
        key: key.into(),
        version: Version { hlc, node: 1 },
        value: Some(Bytes::from_static(b"v")),
        expires_at_ms: None,
    }
}

#[test]
fn empty_folder_starts_at_segment_one() {
    let dir = tempfile::tempdir().unwrap();
    let got = recover(
        &OsFs,
        dir.path(),
        FOLDER,
        &ShardedMap::default(),
        &Clock::new(1),
    )
    .unwrap();
    assert_eq!(
        (got.next_segment, got.wal_bytes, got.last_snapshot),
        (1, 0, None)
    );
}

#[test]
fn replays_in_order_and_restores_the_clock() {
    let dir = tempfile::tempdir().unwrap();
    segment_with(dir.path(), 1, &[rec("a", 10), rec("b", 11)]);
    segment_with(dir.path(), 2, &[rec("a", 12)]);
    let (map, clock) = (ShardedMap::default(), Clock::new(1));
    let got = recover(&OsFs, dir.path(), FOLDER, &map, &clock).unwrap();
    assert_eq!(got.next_segment, 3);
    assert_eq!(got.synced_segments, 2, "both replayed segments are fsynced");
    assert_eq!(map.get("a").unwrap().version.hlc, 12);
    assert!(clock.last_hlc() >= 12);
}

#[test]
fn leftovers_of_a_crash_are_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    segment_with(dir.path(), 1, &[rec("a", 10)]);
    fs::write(dir.path().join(snapshot::TMP_FILE_NAME), b"half a snapshot").unwrap();
    // The newest segment's creation was interrupted: a partial header only.
    fs::write(segment::path(dir.path(), 2), b"KVWAL").unwrap();
    let map = ShardedMap::default();
    let got = recover(&OsFs, dir.path(), FOLDER, &map, &Clock::new(1)).unwrap();
    assert_eq!(got.next_segment, 2);
    assert_eq!(
        got.synced_segments, 1,
        "the removed half-made segment is not synced"
    );
    assert!(!dir.path().join(snapshot::TMP_FILE_NAME).exists());
    assert!(!segment::path(dir.path(), 2).exists());
    assert!(map.get("a").is_some());
}

#[test]
fn torn_tail_in_an_older_segment_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let first = segment_with(dir.path(), 1, &[rec("a", 10), rec("b", 11)]);
    segment_with(dir.path(), 2, &[rec("c", 12)]);
    let len = fs::metadata(&first).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&first)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let err = recover(
        &OsFs,
        dir.path(),
        FOLDER,
        &ShardedMap::default(),
        &Clock::new(1),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Corrupt { path, .. } if path == first));
}

fn config(dir: &Path) -> StoreConfig {
    let mut config = StoreConfig::new(dir.to_owned(), 1);
    config.snapshot_interval = std::time::Duration::ZERO;
    config.wal_prealloc_bytes = 64 * 1024;
    config
}

async fn put_all(store: &Store, keys: std::ops::Range<usize>) {
    for i in keys {
        let record = Record {
            key: format!("k{i}"),
            version: store.clock().tick(),
            value: Some(Bytes::from(format!("v{i}"))),
            expires_at_ms: None,
        };
        store.apply(vec![record]).await.unwrap();
    }
}

fn assert_holds(store: &Store, keys: std::ops::Range<usize>) {
    for i in keys {
        let got = store.get(&format!("k{i}")).and_then(|e| e.value);
        assert_eq!(got, Some(Bytes::from(format!("v{i}"))), "k{i}");
    }
}

fn flip(path: &Path, at: usize) {
    let mut bytes = fs::read(path).unwrap();
    bytes[at] ^= 0x20;
    fs::write(path, bytes).unwrap();
}

/// A store with `k0..k300` written around two checkpoints (so there is a spare), then crashed.
async fn two_checkpoints_then_crash(dir: &Path) {
    let store = Store::open(config(dir)).unwrap();
    put_all(&store, 0..100).await;
    store.checkpoint().await.unwrap();
    put_all(&store, 100..200).await;
    store.checkpoint().await.unwrap();
    put_all(&store, 200..300).await;
    drop(store);
}

fn snapshot_path(dir: &Path) -> PathBuf {
    dir.join(snapshot::FILE_NAME)
}

#[test]
fn a_foreign_segment_is_refused_before_anything_changes() {
    let dir = tempfile::tempdir().unwrap();
    segment_with(dir.path(), 1, &[rec("a", 10)]);
    let other = DirId([1; 16]);
    drop(segment::create(&OsFs, dir.path(), 2, other).unwrap());
    fs::write(dir.path().join(snapshot::TMP_FILE_NAME), b"half").unwrap();
    let err = recover(
        &OsFs,
        dir.path(),
        FOLDER,
        &ShardedMap::default(),
        &Clock::new(1),
    )
    .unwrap_err();
    match &err {
        Error::ForeignFile { path, file_id, .. } => {
            assert_eq!(path, &segment::path(dir.path(), 2));
            assert_eq!(file_id, &other.to_string());
        }
        other => panic!("expected ForeignFile, got {other}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("wal-00000002.log") && text.contains(&ID.to_string()),
        "{text}"
    );
    assert!(
        dir.path().join(snapshot::TMP_FILE_NAME).exists(),
        "nothing was changed"
    );
    let unknown = FolderId {
        stored: false,
        ..FOLDER
    };
    let text = recover(
        &OsFs,
        dir.path(),
        unknown,
        &ShardedMap::default(),
        &Clock::new(1),
    )
    .unwrap_err()
    .to_string();
    assert!(
        text.contains("no IDENTITY") && text.contains(&other.to_string()),
        "{text}"
    );
}

#[tokio::test]
async fn a_foreign_snapshot_is_refused_and_no_segment_is_deleted() {
    let (mine, theirs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    two_checkpoints_then_crash(mine.path()).await;
    let store = Store::open(config(theirs.path())).unwrap();
    for round in 0..6 {
        put_all(&store, round * 5..round * 5 + 5).await;
        store.checkpoint().await.unwrap();
    }
    drop(store);
    // Another node's snapshot, covering WAL up to a later segment than this folder has.
    fs::copy(snapshot_path(theirs.path()), snapshot_path(mine.path())).unwrap();
    let before = segment::list(&OsFs, mine.path()).unwrap();
    let foreign_start = snapshot::read_header(&OsFs, &snapshot_path(mine.path()))
        .unwrap()
        .start_segment;
    assert!(
        before.iter().any(|(n, _)| *n < foreign_start),
        "trusting it would delete segments: {before:?}, start {foreign_start}"
    );
    let err = Store::open(config(mine.path())).unwrap_err();
    assert!(
        matches!(&err, Error::ForeignFile { path, .. } if path == &snapshot_path(mine.path())),
        "{err}"
    );
    assert!(err.to_string().contains("snapshot.db"), "{err}");
    assert_eq!(
        segment::list(&OsFs, mine.path()).unwrap(),
        before,
        "no segment deleted"
    );
}

#[tokio::test]
async fn a_damaged_snapshot_falls_back_to_the_spare_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    two_checkpoints_then_crash(dir.path()).await;
    let len = fs::metadata(snapshot_path(dir.path())).unwrap().len() as usize;
    flip(&snapshot_path(dir.path()), len / 2);
    let store = Store::open(config(dir.path())).unwrap();
    assert_holds(&store, 0..300);
    assert_eq!(store.status().keys, 300);
    assert!(
        dir.path().join(snapshot::DAMAGED_FILE_NAME).exists(),
        "kept aside"
    );
    assert!(!snapshot_path(dir.path()).exists());
    // Checkpoints go on from there: the damaged file never becomes a spare.
    put_all(&store, 300..310).await;
    store.checkpoint().await.unwrap();
    put_all(&store, 310..320).await;
    store.checkpoint().await.unwrap();
    drop(store);
    let spare = snapshot::read_header(&OsFs, &dir.path().join(snapshot::SPARE_FILE_NAME)).unwrap();
    assert_eq!(
        spare.id,
        Some(identity::load(dir.path()).unwrap().unwrap().id)
    );
    let store = Store::open(config(dir.path())).unwrap();
    assert_holds(&store, 0..320);
}

#[tokio::test]
async fn the_wal_is_kept_back_to_the_spare_and_dropped_after() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    let mut starts = Vec::new();
    for round in 0..3 {
        put_all(&store, round * 50..round * 50 + 50).await;
        store.checkpoint().await.unwrap();
        starts.push(
            snapshot::read_header(&OsFs, &snapshot_path(dir.path()))
                .unwrap()
                .start_segment,
        );
        let oldest = segment::list(&OsFs, dir.path()).unwrap()[0].0;
        let spare_start = if round == 0 {
            starts[0]
        } else {
            starts[round - 1]
        };
        assert_eq!(
            oldest, spare_start,
            "round {round}: segments from the spare's on"
        );
    }
    let status = store.status();
    assert!(
        status.wal_bytes < 200,
        "only the WAL after snapshot.db counts: {}",
        status.wal_bytes
    );
}

#[tokio::test]
async fn both_snapshots_damaged_stops_start_up_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    two_checkpoints_then_crash(dir.path()).await;
    let spare = dir.path().join(snapshot::SPARE_FILE_NAME);
    flip(&snapshot_path(dir.path()), 60);
    flip(&spare, 60);
    let err = Store::open(config(dir.path())).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Corrupt { .. }), "{text}");
    assert!(
        text.contains("snapshot.db") && text.contains("snapshot.prev.db"),
        "{text}"
    );
    assert!(snapshot_path(dir.path()).exists(), "nothing moved");
}

#[tokio::test]
async fn a_spare_without_its_wal_cannot_stand_in() {
    let dir = tempfile::tempdir().unwrap();
    two_checkpoints_then_crash(dir.path()).await;
    let spare_start = snapshot::read_header(&OsFs, &dir.path().join(snapshot::SPARE_FILE_NAME))
        .unwrap()
        .start_segment;
    fs::remove_file(segment::path(dir.path(), spare_start)).unwrap();
    flip(&snapshot_path(dir.path()), 60);
    let text = Store::open(config(dir.path())).unwrap_err().to_string();
    assert!(
        text.contains("cannot stand in") && text.contains("missing"),
        "{text}"
    );
}

#[tokio::test]
async fn a_crash_between_the_two_renames_recovers_from_the_spare() {
    let dir = tempfile::tempdir().unwrap();
    two_checkpoints_then_crash(dir.path()).await;
    fs::rename(
        snapshot_path(dir.path()),
        dir.path().join(snapshot::TMP_FILE_NAME),
    )
    .unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    assert_holds(&store, 0..300);
}

#[tokio::test]
async fn old_format_files_are_read_and_adopt_the_folders_id() {
    let dir = tempfile::tempdir().unwrap();
    // A folder as an older kv left it: version 1 snapshot and segments, no IDENTITY.
    let map = ShardedMap::default();
    for r in [rec("a", 10), rec("b", 11)] {
        map.apply(&r);
    }
    let tmp = dir.path().join("new.db");
    snapshot::write_file(&OsFs, &tmp, &map, &Clock::new(1), 3, 0, ID).unwrap();
    let mut old = snapshot::v1_header_bytes(3, 1);
    old.extend_from_slice(&fs::read(&tmp).unwrap()[snapshot::HEADER_LEN..]);
    fs::write(snapshot_path(dir.path()), old).unwrap();
    fs::remove_file(&tmp).unwrap();
    for (number, record) in [(2, rec("stale", 5)), (3, rec("c", 12)), (4, rec("a", 13))] {
        let mut bytes = segment::v1_header(number).to_vec();
        frame::append(&mut bytes, |b| record.encode(b)).unwrap();
        fs::write(segment::path(dir.path(), number), bytes).unwrap();
    }
    let store = Store::open(config(dir.path())).unwrap();
    let hlc = |key: &str| store.get(key).map(|e| e.version.hlc);
    assert_eq!(
        (hlc("a"), hlc("b"), hlc("c")),
        (Some(13), Some(11), Some(12))
    );
    assert_eq!(hlc("stale"), None, "segment 2 is before the snapshot");
    let id = identity::load(dir.path())
        .unwrap()
        .expect("IDENTITY written")
        .id;
    let (newest, path) = segment::list(&OsFs, dir.path()).unwrap().pop().unwrap();
    assert_eq!(
        segment::read_header(&OsFs, &path, newest).unwrap().id,
        Some(id)
    );
    store.checkpoint().await.unwrap();
    let spare = snapshot::read_header(&OsFs, &dir.path().join(snapshot::SPARE_FILE_NAME)).unwrap();
    assert_eq!(spare.id, None, "the old snapshot is the spare now");
    drop(store);
    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(store.status().keys, 3);
    assert_eq!(store.data_dir_id(), id);
}

#[tokio::test]
async fn a_folder_of_another_node_is_refused_and_an_unowned_one_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let owner = |name: &str| DataOwner {
        name: name.into(),
        url: format!("http://127.0.0.1:1/{name}"),
    };
    // No owner yet (as after a restore into a new folder): the first node records itself.
    identity::store(dir.path(), &Identity::new(None)).unwrap();
    let mut node2 = config(dir.path());
    node2.owner = Some(owner("node2"));
    drop(Store::open(node2.clone()).unwrap());
    let found = identity::load(dir.path()).unwrap().unwrap();
    assert_eq!(found.owner, Some(owner("node2")));
    let mut node1 = config(dir.path());
    node1.owner = Some(owner("node1"));
    let err = Store::open(node1).unwrap_err();
    assert!(matches!(err, Error::ForeignDataDir { .. }), "{err}");
    assert!(err.to_string().contains("node2"), "{err}");
    drop(Store::open(node2).unwrap());
    assert_eq!(
        identity::load(dir.path()).unwrap().unwrap(),
        found,
        "unchanged"
    );
}

#[test]
fn version_1_segments_are_replayed_and_their_torn_tail_cut() {
    let dir = tempfile::tempdir().unwrap();
    v1_segment_with(dir.path(), 1, &[rec("a", 10), rec("b", 11)]);
    let last = v1_segment_with(dir.path(), 2, &[rec("a", 12), rec("c", 13)]);
    let len = fs::metadata(&last).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&last)
        .unwrap()
        .set_len(len - 2)
        .unwrap();
    let map = ShardedMap::default();
    let got = recover(&OsFs, dir.path(), FOLDER, &map, &Clock::new(1)).unwrap();
    assert_eq!(got.next_segment, 3);
    assert_eq!(map.get("a").unwrap().version.hlc, 12);
    assert!(map.get("b").is_some());
    assert!(map.get("c").is_none(), "the torn record is cut");
    assert!(fs::metadata(&last).unwrap().len() < len - 2);
}

#[test]
fn a_key_holding_a_valid_frame_does_not_turn_a_torn_batch_into_corruption() {
    // The key of the last record is the bytes of a whole, valid frame of another record
    // (one whose bytes happen to be ASCII, so that they make a key).
    let key = (1..10_000)
        .find_map(|hlc| {
            let mut lookalike = Vec::new();
            frame::append(&mut lookalike, |b| rec("inner", hlc).encode(b)).unwrap();
            String::from_utf8(lookalike).ok().filter(|k| k.is_ascii())
        })
        .unwrap();
    let mut inner = Vec::new();
    frame::append(&mut inner, |b| rec(&key, 98).encode(b)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = segment_with(dir.path(), 1, &[rec("a", 10), rec(&key, 11)]);
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - batch::BATCH_HEADER_LEN - inner.len();
    // A power cut lost the page holding the last batch's header, not the ones after it.
    bytes[last..last + batch::BATCH_HEADER_LEN].fill(0);
    fs::write(&path, &bytes).unwrap();
    let frame_inside = (last + 1..bytes.len())
        .any(|at| matches!(frame::read(&bytes, at), FrameRead::Complete(..)));
    assert!(
        frame_inside,
        "the torn batch holds a valid frame (format 1 would refuse)"
    );
    let map = ShardedMap::default();
    recover(&OsFs, dir.path(), FOLDER, &map, &Clock::new(1)).unwrap();
    assert!(map.get("a").is_some());
    assert!(map.get(&key).is_none(), "the torn batch is cut");
    assert_eq!(fs::metadata(&path).unwrap().len(), last as u64);
}

#[test]
fn damage_in_an_earlier_batch_names_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let path = segment_with(dir.path(), 1, &[rec("a", 10), rec("b", 11), rec("c", 12)]);
    let mut bytes = fs::read(&path).unwrap();
    // Three batches of equal length; flip a byte inside the second.
    let second = segment::HEADER_LEN + (bytes.len() - segment::HEADER_LEN) / 3;
    bytes[second + 30] ^= 0x20;
    fs::write(&path, &bytes).unwrap();
    match recover(
        &OsFs,
        dir.path(),
        FOLDER,
        &ShardedMap::default(),
        &Clock::new(1),
    ) {
        Err(Error::Corrupt {
            path: p,
            offset,
            reason,
        }) => {
            assert_eq!((p, offset), (path, second as u64), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// Found by the crash simulation (seed 17819626002198564837): a rotation whose folder fsync
/// failed removed the new segment, appends went on in the old one, and a power cut brought
/// the header-only segment back (its removal was not durable) and tore the old one's tail.
#[test]
fn torn_tail_before_header_only_segments_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let first = segment_with(dir.path(), 1, &[rec("a", 10), rec("b", 11)]);
    let intact = fs::metadata(&first).unwrap().len();
    let mut bytes = fs::read(&first).unwrap();
    bytes.extend_from_slice(&[0x17; 30]);
    fs::write(&first, bytes).unwrap();
    drop(segment::create(&OsFs, dir.path(), 2, ID).unwrap());
    drop(segment::create(&OsFs, dir.path(), 3, ID).unwrap());
    let map = ShardedMap::default();
    let got = recover(&OsFs, dir.path(), FOLDER, &map, &Clock::new(1)).unwrap();
    assert_eq!(got.next_segment, 4);
    assert!(map.get("b").is_some());
    assert_eq!(fs::metadata(&first).unwrap().len(), intact, "torn tail cut");
    // With records after it, the same tail is corruption.
    let mut bytes = fs::read(&first).unwrap();
    bytes.extend_from_slice(&[0x17; 30]);
    fs::write(&first, bytes).unwrap();
    segment_with(dir.path(), 4, &[rec("c", 12)]);
    let err = recover(
        &OsFs,
        dir.path(),
        FOLDER,
        &ShardedMap::default(),
        &Clock::new(1),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Corrupt { path, .. } if path == first));
}

/// One step of the spare model test.
#[derive(Clone, Debug)]
enum Step {
    Put(u8, u8),
    Delete(u8),
    Checkpoint,
    /// Crash, flip the byte at this fraction (per 65536) of `snapshot.db` when a spare exists,
    /// and start again.
    DamagedRestart(u16),
}

fn arb_step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0u8..6, any::<u8>()).prop_map(|(k, v)| Step::Put(k, v)),
        1 => (0u8..6).prop_map(Step::Delete),
        2 => Just(Step::Checkpoint),
        1 => any::<u16>().prop_map(Step::DamagedRestart),
    ]
}

/// Runs `steps` against a store and a `BTreeMap`; after every restart, with or without a
/// damaged snapshot, the store holds exactly the model.
async fn run_spare_model(steps: Vec<Step>) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.sync = crate::SyncMode::Never;
    let mut store = Store::open(cfg.clone()).unwrap();
    let mut model = std::collections::BTreeMap::new();
    let check = |store: &Store, model: &std::collections::BTreeMap<String, Option<u8>>| {
        for (key, value) in model {
            let got = store.get(key).map(|e| e.value.map(|v| v[0]));
            assert_eq!(got, Some(*value), "{key}");
        }
        assert_eq!(
            store.status().keys + store.status().tombstones,
            model.len() as u64
        );
    };
    for step in steps {
        let (key, value) = match step {
            Step::Put(k, v) => (k, Some(v)),
            Step::Delete(k) => (k, None),
            Step::Checkpoint => {
                store.checkpoint().await.unwrap();
                continue;
            }
            Step::DamagedRestart(at) => {
                drop(store);
                let current = snapshot_path(dir.path());
                if current.exists() && dir.path().join(snapshot::SPARE_FILE_NAME).exists() {
                    let len = fs::metadata(&current).unwrap().len() as usize;
                    flip(&current, len * usize::from(at) / 65536);
                }
                store = Store::open(cfg.clone()).unwrap();
                check(&store, &model);
                continue;
            }
        };
        let record = Record {
            key: format!("k{key}"),
            version: store.clock().tick(),
            value: value.map(|v| Bytes::from(vec![v])),
            expires_at_ms: None,
        };
        store.apply(vec![record.clone()]).await.unwrap();
        model.insert(record.key, value);
    }
    drop(store);
    check(&Store::open(cfg).unwrap(), &model);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    #[test]
    fn a_damaged_snapshot_never_loses_a_write(steps in proptest::collection::vec(arb_step(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run_spare_model(steps));
    }
}
