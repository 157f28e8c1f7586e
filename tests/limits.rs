//! Black-box tests of files and limits: large values reach a returning replica through hints,
//! listings ship values between nodes only when asked and page through large values, and the data
//! folder and everything in it are owner-only.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use kv_cluster::peer::decode_batch;
use kv_tests::{client, send, wait_until, TestCluster};
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

/// A JSON string value of about `bytes` bytes whose content names `tag`.
fn big_value(tag: &str, bytes: usize) -> Value {
    let mut s = format!("{tag}:");
    s.push_str(&"x".repeat(bytes.saturating_sub(s.len())));
    json!(s)
}

fn put(node: &str, key: &str, value: &Value, query: &str) -> kv_tests::Answer {
    send(
        "POST",
        &format!("{node}/v1/{key}{query}"),
        Some(&json!({ "value": value }).to_string()),
    )
    .unwrap()
}

/// The node's own stored value for `key`, if it has a live one (no coordination).
fn local_value(node: &str, key: &str) -> Option<Vec<u8>> {
    let response = client()
        .get(format!("{node}/internal/entry/{key}"))
        .send()
        .ok()?;
    if response.status() != 200 {
        return None;
    }
    let bytes = response.bytes().ok()?;
    kv_core::Record::decode(&bytes)
        .ok()?
        .value
        .map(|v| v.to_vec())
}

/// Checks the folder `dir` is 0700 and everything under it 0700 (folders) or 0600 (files);
/// returns how many files it saw. A file removed meanwhile (a checkpoint ran) is skipped.
fn assert_owner_only(dir: &Path) -> usize {
    let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{} is {mode:o}", dir.display());
    let mut files = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            files += assert_owner_only(&path);
        } else {
            let mode = meta.permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} is {mode:o}", path.display());
            files += 1;
        }
    }
    files
}

#[test]
fn hints_of_900_kb_values_reach_a_returning_node() {
    let mut c = TestCluster::start(3);
    c.wait_converged();
    c.nodes[2].kill9();
    wait_until(Duration::from_secs(10), "node3 is seen down", || {
        c.nodes[0].sees_down(Some(c.url(2)))
    });
    let values: Vec<Value> = (0..40)
        .map(|i| big_value(&format!("v{i}"), 900 * 1024))
        .collect();
    for (i, value) in values.iter().enumerate() {
        let answer = put(c.url(0), &format!("big-{i}"), value, "?w=quorum");
        assert_eq!(answer.status, 200, "big-{i}: {}", answer.text);
    }
    wait_until(
        Duration::from_secs(10),
        "a hint per write is kept for node3",
        || {
            let pending: u64 = c.nodes[..2]
                .iter()
                .map(|n| n.status()["hints_pending"].as_u64().unwrap_or(0))
                .sum();
            pending >= 40
        },
    );
    // Hint files, WAL segments and the rest are owner-only while they exist.
    for node in &c.nodes {
        assert!(assert_owner_only(&node.data_dir) >= 2, "{}", node.name);
    }

    c.nodes[2].restart();
    let node3 = c.url(2).to_owned();
    wait_until(
        Duration::from_secs(60),
        "all 40 values are on node3",
        || {
            (0..40).all(|i| {
                local_value(&node3, &format!("big-{i}"))
                    .is_some_and(|v| v == values[i].to_string().as_bytes())
            })
        },
    );
    wait_until(Duration::from_secs(10), "no hint is left", || {
        c.nodes.iter().all(|n| n.status()["hints_pending"] == 0)
    });
}

#[test]
fn internal_listings_ship_values_only_when_asked() {
    let c = TestCluster::start(3);
    for i in 0..5 {
        let answer = put(
            c.url(0),
            &format!("list/{i}"),
            &json!(format!("secret-{i}")),
            // Every replica holds it before the answer: node2's own listing is read at once.
            "?w=all",
        );
        assert_eq!(answer.status, 200);
    }
    let fetch = |query: &str| {
        let response = client()
            .get(format!("{}/internal/keys?prefix=list/{query}", c.url(1)))
            .send()
            .unwrap();
        assert_eq!(response.status(), 200);
        let full = response.headers().get("x-kv-page-full").cloned();
        (response.bytes().unwrap(), full)
    };
    let (bytes, full) = fetch("");
    let records = decode_batch(&bytes).unwrap();
    assert_eq!(records.len(), 5);
    assert!(
        records
            .iter()
            .all(|r| r.value.as_ref().is_some_and(|v| v.is_empty())),
        "live keys without their values: {records:?}"
    );
    assert!(!String::from_utf8_lossy(&bytes).contains("secret-"));
    assert_eq!(full.unwrap(), "false");

    let (bytes, _) = fetch("&values=true");
    let records = decode_batch(&bytes).unwrap();
    let values: Vec<_> = records.iter().map(|r| r.value.clone().unwrap()).collect();
    assert_eq!(values[0].as_ref(), br#""secret-0""#);
    let (_, full) = fetch("&limit=5");
    assert_eq!(full.unwrap(), "true", "a page at its limit may have more");

    let bad = send(
        "GET",
        &format!("{}/internal/keys?values=maybe", c.url(1)),
        None,
    )
    .unwrap();
    assert_eq!(bad.status, 400);

    // The public listing still shows values when asked, and only keys otherwise.
    let listed = send("GET", &format!("{}/v1?prefix=list/", c.url(2)), None).unwrap();
    assert_eq!(listed.json["keys"].as_array().unwrap().len(), 5);
    assert!(listed.json.get("items").is_none());
    let listed = send(
        "GET",
        &format!("{}/v1?prefix=list/&values=true", c.url(2)),
        None,
    )
    .unwrap();
    assert_eq!(listed.json["items"][4]["value"], json!("secret-4"));
}

#[test]
fn a_listing_of_large_values_pages_through_every_one() {
    let c = TestCluster::start(3);
    let values: Vec<Value> = (0..12)
        .map(|i| big_value(&format!("v{i}"), 900 * 1024))
        .collect();
    for (i, value) in values.iter().enumerate() {
        let answer = put(c.url(0), &format!("large/{i:02}"), value, "?w=all");
        assert_eq!(answer.status, 200, "{}", answer.text);
    }
    let mut seen = Vec::new();
    let mut after = String::new();
    let mut pages = 0;
    for _ in 0..50 {
        let page = send(
            "GET",
            &format!(
                "{}/v1?prefix=large/&values=true&limit=100&after={after}",
                c.url(1)
            ),
            None,
        )
        .unwrap();
        assert_eq!(page.status, 200, "{}", page.text);
        assert_eq!(page.json["incomplete"], false, "every node's page arrived");
        pages += 1;
        for item in page.json["items"].as_array().unwrap() {
            seen.push((
                item["key"].as_str().unwrap().to_owned(),
                item["value"].clone(),
            ));
        }
        match page.json["next"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
    }
    let expected: Vec<(String, Value)> = values
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("large/{i:02}"), v.clone()))
        .collect();
    assert_eq!(seen.len(), expected.len());
    assert!(seen == expected, "every value, once, in order");
    assert!(pages > 1, "11 MB of values do not come in one page");
}
