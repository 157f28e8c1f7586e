//! Damaged and misplaced files on restart, as SPEC section 7 says: a torn WAL tail is cut (the
//! node starts and keeps every acknowledged write); corruption followed by valid records, or a
//! corrupt snapshot without a spare, stops start-up with a non-zero exit and a message naming the
//! file and the offset; a corrupt snapshot with a spare is replaced by the spare and the WAL after
//! it (every acknowledged write kept); a node started on another node's data folder exits 2.

use kv_tests::faults::{report, ChaosCluster, ChaosOptions};
use kv_tests::{send, Node};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn put(node: &str, key: &str, value: &str) {
    let answer = send(
        "POST",
        &format!("{node}/v1/{key}"),
        Some(&json!({ "value": value }).to_string()),
    )
    .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text);
}

fn value_of(node: &str, key: &str) -> Option<String> {
    let answer = send("GET", &format!("{node}/v1/{key}"), None).unwrap();
    answer.json["value"].as_str().map(str::to_owned)
}

/// The WAL segments of a data folder, oldest first.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("wal-") && n.ends_with(".log") && n != "wal-spare.log"
            })
        })
        .collect();
    found.sort();
    found
}

/// The segment holding the most batches (the one the records just written went to). Segments
/// are preallocated (`WAL_PREALLOC_BYTES`), so the file length says nothing of the data.
fn fullest_segment(dir: &Path) -> PathBuf {
    segments(dir)
        .into_iter()
        .max_by_key(|p| data_end(&std::fs::read(p).unwrap()))
        .expect("a WAL segment")
}

/// Where a segment's batches end (the rest of a preallocated file is zeros).
fn data_end(bytes: &[u8]) -> usize {
    *batch_starts(bytes).last().unwrap()
}

fn flip_byte(path: &Path, at: usize) -> u8 {
    let mut bytes = std::fs::read(path).unwrap();
    let old = bytes[at];
    bytes[at] ^= 0x5a;
    std::fs::write(path, bytes).unwrap();
    old
}

/// Starts the node and expects it to refuse: non-zero exit, and a log naming `file` and an offset.
fn expect_refusal(node: &mut Node, file: &str) -> String {
    let log_len = std::fs::metadata(&node.log).map_or(0, |m| m.len() as usize);
    node.spawn();
    let status = node.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| {
        panic!(
            "{} started on damaged data:\n{}",
            node.name,
            node.log_tail()
        )
    });
    let log = std::fs::read_to_string(&node.log).unwrap();
    let new_lines = log[log_len..].to_owned();
    assert!(!status.success(), "exit status {status} on damaged data");
    assert!(
        new_lines.contains(file),
        "the refusal does not name {file}:\n{new_lines}"
    );
    assert!(
        new_lines.contains("offset"),
        "the refusal names no offset:\n{new_lines}"
    );
    new_lines
}

#[test]
fn torn_tail_is_cut_and_corruption_or_a_bad_snapshot_stops_start_up() {
    let mut c = ChaosCluster::start(&ChaosOptions {
        nodes: 1,
        replication_factor: 1,
        ..ChaosOptions::default()
    });
    let url = c.url(0).to_owned();
    let dir = c.nodes[0].data_dir.clone();
    for i in 0..40 {
        put(&url, &format!("k{i}"), &format!("v{i}"));
    }

    // 1. Torn tail: a crash in the middle of an append leaves half a frame at the end.
    c.nodes[0].kill9();
    let segment = fullest_segment(&dir);
    let mut bytes = std::fs::read(&segment).unwrap();
    let intact = data_end(&bytes);
    let mut torn = 200u32.to_le_bytes().to_vec();
    torn.extend_from_slice(&[0xab; 4 + 37]);
    bytes.resize(bytes.len().max(intact + torn.len()), 0);
    bytes[intact..intact + torn.len()].copy_from_slice(&torn);
    std::fs::write(&segment, &bytes).unwrap();
    c.nodes[0].restart();
    for i in 0..40 {
        assert_eq!(
            value_of(&url, &format!("k{i}")),
            Some(format!("v{i}")),
            "k{i} after the cut"
        );
    }
    let log = std::fs::read_to_string(&c.nodes[0].log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("torn") && l.contains(&intact.to_string())),
        "no warning naming the torn tail's offset {intact}:\n{}",
        c.nodes[0].log_tail()
    );
    put(&url, "after-cut", "still writable");

    // 2. Corruption followed by valid records: refuse to start, name the file and offset.
    c.nodes[0].kill9();
    let segment = fullest_segment(&dir);
    let len = data_end(&std::fs::read(&segment).unwrap());
    assert!(
        len > 1000,
        "segment too small to corrupt in the middle: {len}"
    );
    let at = len / 3;
    let old = flip_byte(&segment, at);
    let name = segment.file_name().unwrap().to_str().unwrap().to_owned();
    let refusal = expect_refusal(&mut c.nodes[0], &name);
    // Repaired by hand, the same folder starts again with everything in it.
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[at] = old;
    std::fs::write(&segment, bytes).unwrap();
    c.nodes[0].restart();
    assert_eq!(value_of(&url, "k39"), Some("v39".into()));

    // 3. A corrupt snapshot: a clean stop writes the first one (so there is no spare yet);
    // damage its middle.
    let status = c.nodes[0].terminate();
    assert!(status.success(), "SIGTERM exit {status}");
    let snapshot = dir.join("snapshot.db");
    let len = std::fs::metadata(&snapshot).unwrap().len() as usize;
    flip_byte(&snapshot, len / 2);
    let snapshot_refusal = expect_refusal(&mut c.nodes[0], "snapshot.db");
    report(
        "recovery",
        &[
            ("faults", "3".into()),
            ("acked", "41".into()),
            ("lost", "0".into()),
        ],
    );
    eprintln!("wal refusal: {}", refusal.trim());
    eprintln!("snapshot refusal: {}", snapshot_refusal.trim());
}

fn checkpoint(node: &str) {
    let answer = send("POST", &format!("{node}/admin/checkpoint"), None).unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text);
}

#[test]
fn a_damaged_snapshot_is_replaced_by_the_spare_and_every_acknowledged_key_survives() {
    let mut c = ChaosCluster::start(&ChaosOptions {
        nodes: 1,
        replication_factor: 1,
        ..ChaosOptions::default()
    });
    let url = c.url(0).to_owned();
    let dir = c.nodes[0].data_dir.clone();
    // Two checkpoints, so the first snapshot is the spare of the second; writes around both.
    for (round, keys) in [0..60, 60..120, 120..180].into_iter().enumerate() {
        for i in keys {
            put(&url, &format!("k{i}"), &format!("v{i}"));
        }
        if round < 2 {
            checkpoint(&url);
        }
    }
    c.nodes[0].kill9();
    let snapshot = dir.join("snapshot.db");
    assert!(dir.join("snapshot.prev.db").exists(), "a spare was kept");
    let len = std::fs::metadata(&snapshot).unwrap().len() as usize;
    flip_byte(&snapshot, len / 2);
    let log_len = std::fs::metadata(&c.nodes[0].log).map_or(0, |m| m.len() as usize);
    c.nodes[0].restart();
    let lost: Vec<usize> = (0..180)
        .filter(|i| value_of(&url, &format!("k{i}")) != Some(format!("v{i}")))
        .collect();
    assert!(lost.is_empty(), "keys lost after the fallback: {lost:?}");
    let log = std::fs::read_to_string(&c.nodes[0].log).unwrap()[log_len..].to_owned();
    assert!(
        log.contains("snapshot.db is damaged") && log.contains("snapshot.prev.db"),
        "the fallback is not logged:\n{log}"
    );
    assert!(
        dir.join("snapshot.damaged.db").exists(),
        "the damaged file is kept aside"
    );
    // The node goes on: a write, a clean stop (a new snapshot), a start, everything there.
    put(&url, "after", "fallback");
    let status = c.nodes[0].terminate();
    assert!(status.success(), "SIGTERM exit {status}");
    c.nodes[0].restart();
    assert_eq!(value_of(&url, "after"), Some("fallback".into()));
    assert_eq!(value_of(&url, "k0"), Some("v0".into()));
    report(
        "spare-snapshot",
        &[
            ("faults", "1".into()),
            ("acked", "181".into()),
            ("lost", lost.len().to_string()),
        ],
    );
}

#[test]
fn a_node_started_on_another_nodes_data_folder_exits_2_and_changes_nothing() {
    let mut c = ChaosCluster::start(&ChaosOptions {
        nodes: 2,
        replication_factor: 2,
        ..ChaosOptions::default()
    });
    let url = c.url(0).to_owned();
    put(&url, "kept", "yes");
    let node1_dir = c.nodes[0].data_dir.clone();
    let node2_dir = c.nodes[1].data_dir.clone();
    let identity = std::fs::read(node1_dir.join("IDENTITY")).unwrap();
    let status = c.nodes[0].terminate();
    assert!(status.success(), "SIGTERM exit {status}");
    c.nodes[1].kill9();

    // node2 pointed at node1's folder (a copy-paste slip in its environment).
    c.nodes[1].set_env("DATA_DIR", &node1_dir.display().to_string());
    let log_len = std::fs::metadata(&c.nodes[1].log).map_or(0, |m| m.len() as usize);
    c.nodes[1].spawn();
    let status = c.nodes[1]
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| {
            panic!(
                "node2 started on node1's folder:\n{}",
                c.nodes[1].log_tail()
            )
        });
    let log = std::fs::read_to_string(&c.nodes[1].log).unwrap()[log_len..].to_owned();
    assert_eq!(status.code(), Some(2), "exit status {status}:\n{log}");
    assert!(
        log.contains("belongs to node node1") && log.contains("not to this node node2"),
        "the refusal does not say whose folder it is:\n{log}"
    );
    assert!(
        log.contains("Point DATA_DIR at this node's own folder"),
        "no remedy:\n{log}"
    );
    assert_eq!(
        std::fs::read(node1_dir.join("IDENTITY")).unwrap(),
        identity,
        "node1's identity is unchanged"
    );

    // Each node on its own folder starts as before, with its data.
    c.nodes[1].set_env("DATA_DIR", &node2_dir.display().to_string());
    c.nodes[1].restart();
    c.nodes[0].restart();
    assert_eq!(value_of(&url, "kept"), Some("yes".into()));
    eprintln!("refusal: {}", log.trim());
}

/// Batch starts of a format-3 WAL segment: `[header 48][batch: [len u32][crc][durable u64][crc]
/// body]...`; the last entry is the end of the data: the end of the file, or where the zeros of
/// a preallocated segment begin.
fn batch_starts(bytes: &[u8]) -> Vec<usize> {
    assert_eq!(&bytes[..8], b"KVWALSEG");
    assert_eq!(bytes[8..12], 3u32.to_le_bytes(), "WAL format version 3");
    let mut starts = vec![48];
    let mut at = 48;
    while at + 20 <= bytes.len() && bytes[at..at + 20] != [0; 20] {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        at += 20 + len;
        starts.push(at);
    }
    assert!(
        at <= bytes.len(),
        "the last batch runs past the end of the file"
    );
    assert!(
        bytes[at..].iter().all(|&b| b == 0),
        "after the batches only the zeros of preallocation"
    );
    starts
}

#[test]
fn flipped_byte_in_an_old_batch_is_refused_and_a_hole_in_the_last_batch_is_cut() {
    let mut c = ChaosCluster::start(&ChaosOptions {
        nodes: 1,
        replication_factor: 1,
        ..ChaosOptions::default()
    });
    let url = c.url(0).to_owned();
    let dir = c.nodes[0].data_dir.clone();
    // One acknowledged write at a time: one batch (group commit) each.
    for i in 0..20 {
        put(
            &url,
            &format!("b{i}"),
            &format!("value {i} {}", "x".repeat(i * 10)),
        );
    }
    c.nodes[0].kill9();
    let segment = fullest_segment(&dir);
    let name = segment.file_name().unwrap().to_str().unwrap().to_owned();
    let whole = std::fs::read(&segment).unwrap();
    let starts = batch_starts(&whole);
    assert!(starts.len() > 10, "{} batches", starts.len() - 1);

    // 1. A flipped byte in the body of an old batch: refused, naming the file and the batch's
    //    offset, whatever the valid-looking bytes after it.
    let old = starts[starts.len() / 2];
    let at = old + 20 + (starts[starts.len() / 2 + 1] - old - 20) / 2;
    flip_byte(&segment, at);
    let refusal = expect_refusal(&mut c.nodes[0], &name);
    assert!(
        refusal.contains(&format!("offset {old}")),
        "the refusal does not name the damaged batch's offset {old}:\n{refusal}"
    );

    // 2. A hole (zeros, as from pages a power cut never wrote) inside the last batch, which was
    //    never acknowledged as far as recovery can tell: cut, and the node starts.
    let last = starts[starts.len() - 2];
    let mut bytes = whole.clone();
    bytes[last..last + 12].fill(0);
    std::fs::write(&segment, &bytes).unwrap();
    c.nodes[0].restart();
    let log = std::fs::read_to_string(&c.nodes[0].log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("torn") && l.contains(&last.to_string())),
        "no warning naming the cut at {last}:\n{}",
        c.nodes[0].log_tail()
    );
    for i in 0..19 {
        assert!(
            value_of(&url, &format!("b{i}")).is_some_and(|v| v.starts_with(&format!("value {i} "))),
            "b{i} after the cut"
        );
    }
    put(&url, "after-hole", "writable");
    report(
        "recovery-batches",
        &[
            ("faults", "2".into()),
            ("batches", (starts.len() - 1).to_string()),
            ("lost", "0".into()),
        ],
    );
    eprintln!("old batch refusal: {}", refusal.trim());
}
