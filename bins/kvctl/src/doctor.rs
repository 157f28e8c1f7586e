//! `kvctl doctor`: checks the cluster and this machine, one line each with what to do about it.
//! Exits 0 when no check failed (warnings allowed), 6 when one did.

use crate::cli::{DoctorArgs, Global};
use crate::client::Http;
use crate::error::{code, CtlError};
use crate::ops::{self, NodeInfo};
use crate::out;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Ok,
    Warn,
    Fail,
    Skip,
}

impl Level {
    fn word(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
            Level::Skip => "skip",
        }
    }
}

/// One line of the report.
#[derive(Debug)]
struct Finding {
    check: &'static str,
    level: Level,
    subject: String,
    detail: String,
    fix: String,
}

#[derive(Debug, Default)]
struct Report {
    findings: Vec<Finding>,
}

impl Report {
    fn add(&mut self, check: &'static str, level: Level, subject: &str, detail: String, fix: &str) {
        self.findings.push(Finding {
            check,
            level,
            subject: subject.to_owned(),
            detail,
            fix: fix.to_owned(),
        });
    }
}

/// The fsync rate below which a disk fails the check, and below which it is worth a warning.
const FSYNC_FAIL_PER_SEC: f64 = 20.0;
const FSYNC_WARN_PER_SEC: f64 = 100.0;
/// File descriptors: a node serves `MAX_CONNECTIONS` (1024) connections plus its files and peers.
const NOFILE_FAIL: u64 = 1024;
const NOFILE_WARN: u64 = 4096;
/// The nodes' default `MIN_FREE_BYTES`, when a node does not report its own.
const DEFAULT_RESERVE: u64 = 64 * 1024 * 1024;

/// Fsyncs per second of a temp file in `dir`: `count` times 4 KiB written then `sync_data`.
fn fsync_rate(dir: &Path, count: u32) -> std::io::Result<f64> {
    let mut file = tempfile::tempfile_in(dir)?;
    let block = [0x5au8; 4096];
    let started = Instant::now();
    for _ in 0..count.max(1) {
        file.write_all(&block)?;
        file.sync_data()?;
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    Ok(f64::from(count.max(1)) / secs)
}

fn check_fsync(report: &mut Report, args: &DoctorArgs) {
    let Some(dir) = &args.data_dir else {
        report.add(
            "fsync",
            Level::Skip,
            "this machine",
            "no --data-dir given".into(),
            "run `kvctl doctor --data-dir DATA_DIR` on a node's host to time its disk",
        );
        return;
    };
    let subject = dir.display().to_string();
    match fsync_rate(dir, args.fsyncs) {
        Ok(rate) => {
            let level = if rate < FSYNC_FAIL_PER_SEC {
                Level::Fail
            } else if rate < FSYNC_WARN_PER_SEC {
                Level::Warn
            } else {
                Level::Ok
            };
            report.add(
                "fsync",
                level,
                &subject,
                format!("{rate:.0} fsyncs/s ({} timed)", args.fsyncs),
                if level == Level::Ok {
                    ""
                } else {
                    "WAL_SYNC=always waits for this disk on every group commit: move DATA_DIR to a faster disk (SSD), or accept WAL_SYNC=interval"
                },
            );
        }
        Err(e) => report.add(
            "fsync",
            Level::Fail,
            &subject,
            format!("cannot time fsyncs there: {e}"),
            "check that the folder exists and is writable by this user",
        ),
    }
}

fn check_fds(report: &mut Report) {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let Some(soft) = limit.current else {
        report.add(
            "fds",
            Level::Ok,
            "this machine",
            "no file-descriptor limit".into(),
            "",
        );
        return;
    };
    let hard = limit
        .maximum
        .map_or_else(|| "unlimited".to_owned(), |h| h.to_string());
    let level = if soft < NOFILE_FAIL {
        Level::Fail
    } else if soft < NOFILE_WARN {
        Level::Warn
    } else {
        Level::Ok
    };
    report.add(
        "fds",
        level,
        "this machine",
        format!("open files limit {soft} (hard {hard})"),
        if level == Level::Ok {
            ""
        } else {
            "a node needs MAX_CONNECTIONS (1024) plus its files and peers: raise it (`ulimit -n 65536`, LimitNOFILE=65536 in the systemd unit)"
        },
    );
}

/// The median of some numbers (the lower middle one).
fn median(mut values: Vec<i64>) -> i64 {
    values.sort_unstable();
    values
        .get(values.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or(0)
}

fn check_clocks(report: &mut Report, nodes: &[NodeInfo]) {
    let measured: Vec<(&NodeInfo, i64)> = nodes
        .iter()
        .filter_map(|n| n.offset_from_here_ms.map(|o| (n, o)))
        .collect();
    if measured.is_empty() {
        return;
    }
    let limit = nodes
        .iter()
        .find_map(|n| n.field("clock")["max_offset_ms"].as_i64())
        .unwrap_or(500);
    // kvctl's own clock votes too, so that two nodes that disagree still name the odd one.
    let mut votes: Vec<i64> = measured.iter().map(|(_, o)| *o).collect();
    votes.push(0);
    let reference = median(votes);
    for (node, offset) in &measured {
        let off = offset - reference;
        let says_off = node.field("clock")["ok"] == false;
        let peers_view: Vec<String> = nodes
            .iter()
            .filter(|other| other.url != node.url)
            .filter_map(|other| {
                other.field("peers").as_array().and_then(|peers| {
                    peers
                        .iter()
                        .find(|p| p["url"] == node.url.as_str())
                        .and_then(|p| p["clock"]["offset_ms"].as_i64())
                        .map(|o| format!("{} measures {o:+} ms", other.name()))
                })
            })
            .collect();
        // The node's own judgement counts only its up peers: with one of two peers off, the
        // good node cannot tell which clock is wrong and refuses too. kvctl's vote decides.
        let level = if off.abs() > limit {
            Level::Fail
        } else if off.abs() > limit / 2 || says_off {
            Level::Warn
        } else {
            Level::Ok
        };
        let mut detail =
            format!("clock {off:+} ms from the others (limit MAX_CLOCK_OFFSET_MS={limit})");
        if says_off {
            detail.push_str(&format!(
                "; it refuses to coordinate writes (503 clock_offset): {} of {} nodes agree with it",
                out::cell(&node.field("clock")["agreeing"]),
                out::cell(&node.field("clock")["judged"])
            ));
        }
        if !peers_view.is_empty() {
            detail.push_str(&format!("; {}", peers_view.join(", ")));
        }
        report.add(
            "clock",
            level,
            &node.name(),
            detail,
            match level {
                Level::Ok | Level::Skip => "",
                Level::Warn if off.abs() <= limit / 2 => {
                    "its clock is fine: fix the clock of the node marked FAIL, or bring its down peers back"
                }
                _ => "fix time sync on its host (chrony or NTP: `chronyc tracking`, `timedatectl`); no restart needed",
            },
        );
    }
}

fn check_nodes(report: &mut Report, nodes: &[NodeInfo]) {
    for node in nodes {
        let Some(status) = &node.status else {
            report.add(
                "reachable",
                Level::Fail,
                &node.url,
                format!(
                    "does not answer: {}",
                    node.error.as_deref().unwrap_or("no answer")
                ),
                "start it (`scripts/cluster.sh start NAME`), or if it is gone for good remove it: `kvctl members remove --force URL`",
            );
            continue;
        };
        let name = node.name();
        match &node.health {
            Some((200, body)) if body["status"] == "ok" => {
                report.add(
                    "reachable",
                    Level::Ok,
                    &name,
                    format!("{} healthy", node.url),
                    "",
                );
            }
            Some((_, body)) => report.add(
                "reachable",
                Level::Fail,
                &name,
                format!("/health says {}", body),
                "read the node's log; a syncing node heals by itself after an anti-entropy round",
            ),
            None => report.add(
                "reachable",
                Level::Fail,
                &name,
                "/health did not answer".into(),
                "read the node's log",
            ),
        }
        if let Some(why) = status["writes_refused"].as_str() {
            report.add(
                "wal",
                Level::Fail,
                &name,
                format!("writes refused: {why}"),
                "the WAL failed (a disk error): check the disk, then restart the node",
            );
        }
        // Peers as this node sees them.
        for peer in status["peers"].as_array().into_iter().flatten() {
            let state = peer["state"].as_str().unwrap_or("unknown");
            let url = out::cell(&peer["url"]);
            if state != "up" {
                let peer_runs = nodes.iter().any(|n| n.url == url && n.status.is_some());
                report.add(
                    "peers",
                    Level::Fail,
                    &name,
                    format!("sees {url} {state}"),
                    if peer_runs {
                        "kvctl reaches it but this node does not: check the network, firewall and TLS between them"
                    } else {
                        "that node is down: start it or remove it"
                    },
                );
            }
        }
        // Disk against the reserve.
        let reserve = status["min_free_bytes"].as_u64().unwrap_or(DEFAULT_RESERVE);
        if let Some(why) = status["read_only"].as_str() {
            report.add(
                "disk",
                Level::Fail,
                &name,
                format!("read-only: {why}"),
                "free space on its DATA_DIR disk (or grow it); writes resume by themselves",
            );
        } else if let Some(free) = node.disk_free {
            let level = if free < reserve {
                Level::Fail
            } else if free < reserve.saturating_mul(4) {
                Level::Warn
            } else {
                Level::Ok
            };
            report.add(
                "disk",
                level,
                &name,
                format!(
                    "{} free, reserve MIN_FREE_BYTES {}",
                    out::bytes(free),
                    out::bytes(reserve)
                ),
                if level == Level::Ok {
                    ""
                } else {
                    "free space on its DATA_DIR disk: below the reserve the node turns read-only (507)"
                },
            );
        }
        if status["hints_pending"].as_u64().unwrap_or(0) > 0 {
            report.add(
                "hints",
                Level::Warn,
                &name,
                format!("{} hints pending", status["hints_pending"]),
                "a peer missed writes: they are delivered when it is back; if it is gone, remove it",
            );
        }
    }
    let peers_all_up = report
        .findings
        .iter()
        .all(|f| f.check != "peers" || f.level != Level::Fail);
    if peers_all_up && nodes.iter().all(|n| n.status.is_some()) {
        report.add(
            "peers",
            Level::Ok,
            "cluster",
            format!("all {} nodes see each other up", nodes.len()),
            "",
        );
    }
}

fn check_versions(report: &mut Report, lb: Option<&Value>, nodes: &[NodeInfo]) {
    let mut versions: Vec<(String, String)> = nodes
        .iter()
        .filter_map(|n| {
            n.field("version")
                .as_str()
                .map(|v| (n.name(), v.to_owned()))
        })
        .collect();
    if let Some(version) = lb.and_then(|lb| lb["version"].as_str()) {
        versions.push(("kv-lb".into(), version.to_owned()));
    }
    let mut distinct: Vec<&str> = versions.iter().map(|(_, v)| v.as_str()).collect();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() <= 1 {
        report.add(
            "version",
            Level::Ok,
            "cluster",
            format!("every process runs {}", distinct.first().unwrap_or(&"?")),
            "",
        );
    } else {
        let list: Vec<String> = versions.iter().map(|(n, v)| format!("{n} {v}")).collect();
        report.add(
            "version",
            Level::Warn,
            "cluster",
            format!("versions differ: {}", list.join(", ")),
            "finish the rolling upgrade: restart the remaining processes on the new version",
        );
    }
}

fn check_credentials(report: &mut Report, http: &Http, nodes: &[NodeInfo]) {
    // Data routes: open, closed and our token works, or closed and we have none / a wrong one.
    let anonymous = http.request("GET", "/v1?limit=1", true);
    let open = http.send("GET", "/v1?limit=1", anonymous).map(|a| a.status);
    match (open, http.has_token()) {
        (Ok(401), false) => report.add(
            "credentials",
            Level::Fail,
            &http.base,
            "the cluster needs a token (AUTH_TOKEN) and none is given".into(),
            "set KV_TOKEN or pass --token",
        ),
        (Ok(401), true) => {
            let with = http.request("GET", "/v1?limit=1", false);
            match http.send("GET", "/v1?limit=1", with).map(|a| a.status) {
                Ok(200) => report.add(
                    "credentials",
                    Level::Ok,
                    &http.base,
                    "data routes need a token, and the given one works".into(),
                    "",
                ),
                other => report.add(
                    "credentials",
                    Level::Fail,
                    &http.base,
                    format!("the given token is refused ({other:?})"),
                    "check KV_TOKEN against the cluster's AUTH_TOKEN",
                ),
            }
        }
        (Ok(200), _) => report.add(
            "credentials",
            Level::Warn,
            &http.base,
            "data routes are open: no AUTH_TOKEN".into(),
            "set AUTH_TOKEN on the nodes and the LB unless only trusted clients reach them",
        ),
        (Ok(other), _) => report.add(
            "credentials",
            Level::Warn,
            &http.base,
            format!("GET /v1 without a token answered {other}"),
            "",
        ),
        (Err(_), _) => {}
    }
    // Node-to-node routes: /internal must refuse a caller without the cluster secret.
    for node in nodes.iter().filter(|n| n.status.is_some()) {
        let at = http.at(&node.url);
        let request = at.request("GET", "/internal/keys?limit=1", true);
        match at.send("GET", "/internal/keys?limit=1", request).map(|a| a.status) {
            Ok(401 | 403) => report.add(
                "closed",
                Level::Ok,
                &node.name(),
                "/internal refuses callers without the cluster secret".into(),
                "",
            ),
            Ok(status) => report.add(
                "closed",
                Level::Warn,
                &node.name(),
                format!("/internal answered {status} without a secret: the node runs open"),
                "set CLUSTER_SECRET on every node (scripts/cluster.sh does): an open node is safe on loopback only",
            ),
            Err(_) => {}
        }
    }
}

/// `kvctl doctor`.
pub fn run(global: &Global, args: &DoctorArgs) -> Result<(), CtlError> {
    let mut report = Report::default();
    check_fsync(&mut report, args);
    check_fds(&mut report);
    let http = global.http()?;
    match ops::discover(&http) {
        Err(e) => report.add(
            "reachable",
            Level::Fail,
            &http.base,
            e.to_string(),
            "check --url / KV_URL, and that the LB or node runs",
        ),
        Ok(cluster) => {
            let nodes = ops::probe_all(&http, &cluster);
            if let Some(lb) = &cluster.lb {
                let healthy = lb["healthy_nodes"].as_u64().unwrap_or(0);
                let total = lb["nodes"].as_array().map_or(0, Vec::len);
                report.add(
                    "lb",
                    if healthy as usize == total {
                        Level::Ok
                    } else {
                        Level::Warn
                    },
                    &http.base,
                    format!("the LB sees {healthy}/{total} nodes healthy"),
                    if healthy as usize == total {
                        ""
                    } else {
                        "see the nodes' lines below"
                    },
                );
            }
            check_nodes(&mut report, &nodes);
            check_clocks(&mut report, &nodes);
            check_versions(&mut report, cluster.lb.as_ref(), &nodes);
            check_credentials(&mut report, &http, &nodes);
        }
    }
    let failed = report
        .findings
        .iter()
        .filter(|f| f.level == Level::Fail)
        .count();
    if global.json {
        let checks: Vec<Value> = report
            .findings
            .iter()
            .map(|f| {
                json!({
                    "check": f.check,
                    "status": f.level.word().to_lowercase(),
                    "subject": f.subject,
                    "detail": f.detail,
                    "fix": f.fix,
                })
            })
            .collect();
        out::json(&json!({ "checks": checks, "failed": failed }));
    } else {
        for f in &report.findings {
            let fix = if f.fix.is_empty() {
                String::new()
            } else {
                format!(" -> {}", f.fix)
            };
            out::line(&format!(
                "{:<4} {:<11} {}: {}{fix}",
                f.level.word(),
                f.check,
                f.subject,
                f.detail
            ));
        }
    }
    if failed == 0 {
        Ok(())
    } else {
        Err(CtlError::Reported {
            code: code::OTHER,
            message: format!("doctor: {failed} check(s) failed"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_names_the_odd_clock_out() {
        assert_eq!(median(vec![0, 30_000, 0]), 0);
        assert_eq!(median(vec![30_000, 0]), 0);
        assert_eq!(median(vec![5]), 5);
        assert_eq!(median(vec![]), 0);
    }

    #[test]
    fn fsyncs_are_timed_in_a_folder() {
        let dir = tempfile::tempdir();
        let rate = dir.ok().and_then(|d| fsync_rate(d.path(), 5).ok());
        assert!(rate.is_some_and(|r| r > 0.0), "{rate:?}");
        let missing = fsync_rate(Path::new("/nonexistent/kvctl-doctor"), 5);
        assert!(missing.is_err());
    }
}
