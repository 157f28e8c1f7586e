//! Black-box tests of the API beyond plain CRUD on a real 3-node cluster: conditional writes,
//! listing, batches.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use kv_tests::{send, send_with, TestCluster};
use serde_json::{json, Value};
use std::collections::BTreeSet;

fn put_if(node: &str, key: &str, value: Value, header: (&str, &str)) -> kv_tests::Answer {
    send_with(
        "PUT",
        &format!("{node}/v1/{key}"),
        Some(&json!({ "value": value }).to_string()),
        &[header],
    )
    .unwrap()
}

#[test]
fn if_match_and_if_none_match_guard_writes() {
    let c = TestCluster::start(3);
    let node = c.url(0);
    let created = put_if(node, "cfg", json!(1), ("If-None-Match", "*"));
    assert_eq!(created.status, 200, "{}", created.text);
    let again = put_if(node, "cfg", json!(2), ("If-None-Match", "*"));
    assert_eq!(
        (again.status, again.json["error"].clone()),
        (412, json!("precondition_failed"))
    );
    let etag = created.headers["etag"].to_str().unwrap().to_owned();
    assert_eq!(again.json["current_version"], etag.trim_matches('"'));

    // Through another node: the ETag is the version, whoever coordinates.
    let updated = put_if(c.url(1), "cfg", json!(3), ("If-Match", &etag));
    assert_eq!(updated.status, 200, "{}", updated.text);
    let stale = put_if(c.url(2), "cfg", json!(4), ("If-Match", &etag));
    assert_eq!(stale.status, 412);
    assert_eq!(stale.json["current_version"], updated.json["version"]);

    let del = send_with(
        "DELETE",
        &format!("{node}/v1/cfg"),
        None,
        &[("If-Match", &etag)],
    )
    .unwrap();
    assert_eq!(del.status, 412, "delete with a stale version is refused");
    let current = format!("\"{}\"", updated.json["version"].as_str().unwrap());
    let del = send_with(
        "DELETE",
        &format!("{node}/v1/cfg"),
        None,
        &[("If-Match", &current)],
    )
    .unwrap();
    assert_eq!(del.status, 200);
    assert_eq!(
        put_if(node, "cfg", json!(5), ("If-Match", "*")).status,
        412,
        "If-Match: * needs the key"
    );
    assert_eq!(
        put_if(node, "cfg", json!(6), ("If-None-Match", "*")).status,
        200,
        "re-created after delete"
    );
}

#[test]
fn bad_precondition_headers_are_400() {
    let c = TestCluster::start(1);
    for header in [
        ("If-Match", "\"not-a-version\""),
        ("If-None-Match", "\"abc\""),
        ("If-Match", ""),
    ] {
        let answer = put_if(c.url(0), "k", json!(1), header);
        assert_eq!(
            (answer.status, answer.json["error"].clone()),
            (400, json!("invalid_precondition")),
            "{header:?}"
        );
    }
    assert_eq!(
        send("GET", &format!("{}/v1/k", c.url(0)), None)
            .unwrap()
            .status,
        404,
        "nothing written"
    );
}

#[test]
fn racing_if_match_updates_have_exactly_one_winner() {
    let c = TestCluster::start(3);
    c.wait_converged();
    for round in 0..10 {
        let key = format!("race{round}");
        let first = send(
            "POST",
            &format!("{}/v1/{key}", c.url(0)),
            Some(r#"{"value": 0}"#),
        )
        .unwrap();
        let etag = first.headers["etag"].to_str().unwrap().to_owned();
        let racers: Vec<_> = (0..4)
            .map(|i| {
                let (url, key, etag) = (c.url(i % 3).to_owned(), key.clone(), etag.clone());
                std::thread::spawn(move || {
                    put_if(&url, &key, json!(i + 1), ("If-Match", &etag)).status
                })
            })
            .collect();
        let statuses: Vec<u16> = racers.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(
            statuses.iter().filter(|s| **s == 200).count(),
            1,
            "round {round}: {statuses:?}"
        );
        assert_eq!(
            statuses.iter().filter(|s| **s == 412).count(),
            3,
            "round {round}: {statuses:?}"
        );
    }
}

#[test]
fn listing_ten_thousand_keys_in_pages_of_100_returns_each_once() {
    let c = TestCluster::start(3);
    // Write through batches to keep the test quick.
    for chunk in 0..20 {
        let ops: Vec<Value> = (chunk * 500..(chunk + 1) * 500)
            .map(|i| json!({"op": "put", "key": format!("item/{i:05}"), "value": i}))
            .collect();
        let answer = send(
            "POST",
            &format!("{}/batch", c.url(chunk % 3)),
            Some(&json!({ "ops": ops }).to_string()),
        )
        .unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert!(answer.json["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["status"] == 200));
    }
    send(
        "POST",
        &format!("{}/v1/other", c.url(0)),
        Some(r#"{"value": 1}"#),
    )
    .unwrap();
    send("DELETE", &format!("{}/v1/item/00007", c.url(0)), None).unwrap();
    let mut seen = BTreeSet::new();
    let mut after = String::new();
    let mut pages = 0;
    loop {
        let url = format!(
            "{}/v1?prefix=item/&limit=100&after={after}",
            c.url(pages % 3)
        );
        let page = send("GET", &url, None).unwrap();
        assert_eq!(page.status, 200, "{}", page.text);
        let keys: Vec<String> = page.json["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect();
        assert!(keys.len() <= 100);
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "page sorted");
        for key in keys {
            assert!(seen.insert(key.clone()), "{key} listed twice");
        }
        pages += 1;
        assert!(pages < 200, "listing does not end");
        match page.json["next"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(
        seen.len(),
        9_999,
        "every live key once, the deleted one hidden"
    );
    assert!(!seen.contains("item/00007") && !seen.contains("other"));
    let with_values = send(
        "GET",
        &format!("{}/v1?prefix=item/0000&values=true&limit=3", c.url(1)),
        None,
    )
    .unwrap();
    assert_eq!(
        with_values.json["items"][0],
        json!({"key": "item/00000", "value": 0, "version": with_values.json["items"][0]["version"]})
    );
    assert_eq!(
        with_values.json["keys"],
        json!(["item/00000", "item/00001", "item/00002"])
    );
}

#[test]
fn batches_apply_each_op_and_report_each_result() {
    let c = TestCluster::start(3);
    let body = json!({"ops": [
        {"op": "put", "key": "a", "value": {"x": 1}},
        {"op": "put", "key": "b", "value": "two"},
        {"op": "delete", "key": "a"},
        {"op": "delete", "key": "never"},
        {"op": "get", "key": "b"},
    ]});
    let answer = send(
        "POST",
        &format!("{}/batch", c.url(0)),
        Some(&body.to_string()),
    )
    .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text);
    let results = answer.json["results"].as_array().unwrap();
    let statuses: Vec<u64> = results
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [200, 200, 200, 404, 200]);
    assert_eq!(results[1]["version"], results[4]["version"]);
    assert_eq!(results[4]["value"], "two");
    assert_eq!(
        send("GET", &format!("{}/v1/a", c.url(2)), None)
            .unwrap()
            .status,
        404
    );

    // One bad op refuses the whole batch; nothing is applied.
    for bad in [
        json!({"ops": [{"op": "put", "key": "c", "value": 1}, {"op": "put", "key": "d"}]}),
        json!({"ops": [{"op": "put", "key": "c", "value": 1}, {"op": "frob", "key": "d"}]}),
        json!({"ops": [{"op": "put", "key": "c", "value": 1}, {"op": "put", "key": "", "value": 1}]}),
        json!({"nope": []}),
    ] {
        let answer = send(
            "POST",
            &format!("{}/batch", c.url(1)),
            Some(&bad.to_string()),
        )
        .unwrap();
        assert_eq!(answer.status, 400, "{bad}: {}", answer.text);
    }
    assert_eq!(
        send("GET", &format!("{}/v1/c", c.url(0)), None)
            .unwrap()
            .status,
        404
    );
}

#[test]
fn ttl_expires_keys_on_every_node_and_across_restarts() {
    let mut c = TestCluster::start(3);
    let node = c.url(0).to_owned();
    let short = send(
        "POST",
        &format!("{node}/v1/session"),
        Some(r#"{"value": "s", "ttl_secs": 1}"#),
    )
    .unwrap();
    assert_eq!(short.status, 200, "{}", short.text);
    assert_eq!(short.json["ttl_secs"], 1);
    let long = send(
        "PUT",
        &format!("{node}/v1/cache?ttl=1h"),
        Some(r#"{"value": "c"}"#),
    )
    .unwrap();
    assert_eq!(long.status, 200, "{}", long.text);
    let read = send("GET", &format!("{}/v1/cache", c.url(1)), None).unwrap();
    let left = read.json["ttl_secs"].as_u64().unwrap();
    assert!((3590..=3600).contains(&left), "remaining ttl {left}");
    kv_tests::wait_until(
        std::time::Duration::from_secs(10),
        "the 1 s key reads 404 on every node",
        || {
            c.nodes.iter().all(|n| {
                send("GET", &format!("{}/v1/session?r=one", n.url), None)
                    .unwrap()
                    .status
                    == 404
            })
        },
    );
    let listed = send("GET", &format!("{node}/v1?prefix=session"), None).unwrap();
    assert_eq!(
        listed.json["keys"],
        json!([]),
        "expired keys are not listed"
    );
    // A restart replays the expiry from the WAL (and, after SIGTERM, from the snapshot).
    c.nodes[0].kill9();
    c.nodes[0].restart();
    assert!(c.nodes[1].terminate().success());
    c.nodes[1].restart();
    for node in &c.nodes {
        assert_eq!(
            send("GET", &format!("{}/v1/session?r=one", node.url), None)
                .unwrap()
                .status,
            404,
            "{}",
            node.name
        );
        let cache = send("GET", &format!("{}/v1/cache?r=one", node.url), None).unwrap();
        assert_eq!(cache.status, 200, "{}: {}", node.name, cache.text);
        assert!(cache.json["ttl_secs"].as_u64().unwrap() <= 3600);
    }
    // Expired keys can be written again, and If-None-Match sees them as absent.
    let again = send_with(
        "PUT",
        &format!("{node}/v1/session"),
        Some(r#"{"value": 2}"#),
        &[("If-None-Match", "*")],
    )
    .unwrap();
    assert_eq!(again.status, 200, "{}", again.text);
    assert!(again.json.get("ttl_secs").is_none());
}

#[test]
fn bad_ttls_are_400_and_change_nothing() {
    let c = TestCluster::start(1);
    let base = c.url(0);
    for (url, body) in [
        (format!("{base}/v1/t"), r#"{"value": 1, "ttl_secs": 0}"#),
        (format!("{base}/v1/t"), r#"{"value": 1, "ttl_secs": -3}"#),
        (format!("{base}/v1/t"), r#"{"value": 1, "ttl_secs": "60"}"#),
        (format!("{base}/v1/t"), r#"{"value": 1, "ttl_secs": 1.5}"#),
        (format!("{base}/v1/t?ttl=5y"), r#"{"value": 1}"#),
        (format!("{base}/v1/t?ttl=0"), r#"{"value": 1}"#),
        (
            format!("{base}/v1/t?ttl=10"),
            r#"{"value": 1, "ttl_secs": 10}"#,
        ),
    ] {
        let answer = send("POST", &url, Some(body)).unwrap();
        assert_eq!(
            (answer.status, answer.json["error"].clone()),
            (400, json!("invalid_ttl")),
            "{url} {body}: {}",
            answer.text
        );
    }
    assert_eq!(
        send("GET", &format!("{base}/v1/t"), None).unwrap().status,
        404
    );
}
