//! The operator commands: `status`, `members`, `repair`, `backup`, `restore`, and the cluster
//! discovery they share (`--url` may be the LB or any node).

use crate::cli::{
    ApplyArgs, BackupArgs, Global, MembersAction, MembersArgs, RepairArgs, RestoreArgs,
};
use crate::client::Http;
use crate::error::{code, CtlError};
use crate::out;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What `--url` is and which nodes it names.
#[derive(Debug)]
pub struct Cluster {
    /// The LB's `GET /` when `--url` is the LB.
    pub lb: Option<Value>,
    /// Every node URL: the LB's nodes, or the members of the node's view.
    pub nodes: Vec<String>,
    /// `GET /` of `--url` when it is a node.
    pub entry: Option<Value>,
}

impl Cluster {
    /// A node to send `/admin` calls to: `--url` when it is a node, else the first node that
    /// answers `/health` with 200, the ones the LB believes healthy first (the LB does not proxy
    /// `/admin`, and its view of health can be a second old).
    pub fn admin_node(&self, http: &Http) -> Result<String, CtlError> {
        let Some(lb) = &self.lb else {
            return Ok(http.base.clone());
        };
        let mut nodes: Vec<&Value> = lb["nodes"].as_array().into_iter().flatten().collect();
        nodes.sort_by_key(|n| n["healthy"] != true);
        nodes
            .iter()
            .filter_map(|n| n["url"].as_str())
            .find(|url| {
                http.at(url)
                    .get_public("/health")
                    .is_ok_and(|a| a.status == 200)
            })
            .map(str::to_owned)
            .ok_or_else(|| CtlError::Reported {
                code: code::UNAVAILABLE,
                message: format!("no node behind the LB at {} answers /health", http.base),
            })
    }
}

/// The URLs of the members of a node's `GET /` view.
fn members_of(status: &Value) -> Vec<String> {
    let from_view = status["membership"]["members"].as_array().map(|members| {
        members
            .iter()
            .filter_map(|m| m["url"].as_str().map(str::to_owned))
            .collect::<Vec<_>>()
    });
    from_view
        .or_else(|| {
            status["nodes"].as_array().map(|nodes| {
                nodes
                    .iter()
                    .filter_map(|n| n.as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Asks `--url` what it is and which nodes make up the cluster.
pub fn discover(http: &Http) -> Result<Cluster, CtlError> {
    let answer = http.get_public("/")?;
    if answer.status != 200 {
        return Err(crate::client::http_error(
            "GET",
            &format!("{}/", http.base),
            answer,
        ));
    }
    let status = answer.json;
    if status["name"] == "kv-lb" {
        let mut nodes: Vec<String> = status["nodes"]
            .as_array()
            .map(|nodes| {
                nodes
                    .iter()
                    .filter_map(|n| n["url"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        // The LB's list follows the view; a healthy node's view also names joining nodes.
        let healthy = status["nodes"].as_array().and_then(|n| {
            n.iter()
                .find(|n| n["healthy"] == true)
                .and_then(|n| n["url"].as_str())
        });
        if let Some(url) = healthy {
            if let Ok(answer) = http.at(url).get_public("/") {
                for member in members_of(&answer.json) {
                    if !nodes.contains(&member) {
                        nodes.push(member);
                    }
                }
            }
        }
        return Ok(Cluster {
            lb: Some(status),
            nodes,
            entry: None,
        });
    }
    let mut nodes = members_of(&status);
    if nodes.is_empty() {
        nodes.push(http.base.clone());
    }
    Ok(Cluster {
        lb: None,
        nodes,
        entry: Some(status),
    })
}

/// One node as `status` and `doctor` see it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// Its URL.
    pub url: String,
    /// `GET /`, when it answered.
    pub status: Option<Value>,
    /// Why it did not.
    pub error: Option<String>,
    /// `GET /health` status code and body.
    pub health: Option<(u16, Value)>,
    /// `kv_disk_free_bytes` of its `/metrics`.
    pub disk_free: Option<u64>,
    /// Its wall clock minus ours (ms), from `now_ms` of `/health` against the request's midpoint.
    pub offset_from_here_ms: Option<i64>,
}

impl NodeInfo {
    /// True when it answered and reports healthy.
    pub fn healthy(&self) -> bool {
        self.health
            .as_ref()
            .is_some_and(|(status, body)| *status == 200 && body["status"] == "ok")
    }

    /// Its name, or its URL when it did not answer.
    pub fn name(&self) -> String {
        self.status
            .as_ref()
            .and_then(|s| s["name"].as_str())
            .map_or_else(|| self.url.clone(), str::to_owned)
    }

    /// A field of its `GET /`.
    pub fn field(&self, name: &str) -> Value {
        self.status
            .as_ref()
            .map_or(Value::Null, |s| s[name].clone())
    }

    /// As JSON for `--json`.
    pub fn to_json(&self) -> Value {
        json!({
            "url": self.url,
            "reachable": self.status.is_some(),
            "error": self.error,
            "healthy": self.healthy(),
            "health": self.health.as_ref().map(|(_, body)| body.clone()),
            "disk_free_bytes": self.disk_free,
            "clock_offset_from_kvctl_ms": self.offset_from_here_ms,
            "status": self.status,
        })
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The value of an unlabelled Prometheus sample.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (metric, value) = l.split_once(' ')?;
        (metric == name).then(|| value.trim().parse().ok())?
    })
}

/// Asks one node for `GET /`, `/health` and `/metrics`.
pub fn probe(http: &Http, url: &str) -> NodeInfo {
    let node = http.at(url);
    let mut info = NodeInfo {
        url: url.to_owned(),
        status: None,
        error: None,
        health: None,
        disk_free: None,
        offset_from_here_ms: None,
    };
    match node.get_public("/") {
        Ok(answer) if answer.status == 200 => info.status = Some(answer.json),
        Ok(answer) => info.error = Some(format!("GET / answered {}", answer.status)),
        Err(e) => {
            info.error = Some(e.to_string());
            return info;
        }
    }
    let sent = unix_ms();
    if let Ok(answer) = node.get_public("/health") {
        let received = unix_ms();
        if let Some(now) = answer.json["now_ms"].as_i64() {
            info.offset_from_here_ms = Some(now - (sent + received) / 2);
        }
        info.health = Some((answer.status, answer.json));
    }
    if let Ok(answer) = node.get_public("/metrics") {
        info.disk_free = metric(&answer.text, "kv_disk_free_bytes").map(|v| v as u64);
    }
    info
}

/// Every node of the cluster, probed one after another (a handful of nodes: no threads needed).
pub fn probe_all(http: &Http, cluster: &Cluster) -> Vec<NodeInfo> {
    cluster.nodes.iter().map(|url| probe(http, url)).collect()
}

fn ago(ms: Option<u64>) -> String {
    let Some(ms) = ms else {
        return "never".into();
    };
    let secs = (unix_ms() - i64::try_from(ms).unwrap_or(0)).max(0) / 1000;
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        _ => format!("{}h ago", secs / 3600),
    }
}

/// The anti-entropy cell: syncing, or the last round's outcome and age.
fn repair_cell(status: &Value) -> String {
    let ae = &status["anti_entropy"];
    if ae["syncing"] == true {
        return "syncing (restored)".into();
    }
    let last = &ae["last_round"];
    if last.is_null() {
        return "no round yet".into();
    }
    if let Some(why) = last["skipped"].as_str() {
        return format!(
            "skipped ({}), {}",
            why.chars().take(40).collect::<String>(),
            ago(last["started_at_ms"].as_u64())
        );
    }
    let outcome = if last["complete"] == true {
        "complete"
    } else {
        "incomplete"
    };
    format!(
        "{outcome}, {} ranges differed, {}",
        out::cell(&last["ranges_differed"]),
        ago(last["started_at_ms"].as_u64())
    )
}

fn health_cell(info: &NodeInfo) -> String {
    match (&info.health, &info.error) {
        (Some((_, body)), _) => {
            let mut text = out::cell(&body["status"]);
            if let Some(why) = body["writes_refused"].as_str() {
                text.push_str(&format!(" (writes refused: {why})"));
            }
            text
        }
        (None, Some(e)) => format!("DOWN: {}", e.chars().take(60).collect::<String>()),
        (None, None) => "unknown".into(),
    }
}

/// `kvctl status`.
pub fn status(http: &Http, global: &Global) -> Result<(), CtlError> {
    let cluster = discover(http)?;
    let nodes = probe_all(http, &cluster);
    let down: Vec<String> = nodes
        .iter()
        .filter(|n| !n.healthy())
        .map(|n| n.url.clone())
        .collect();
    if global.json {
        out::json(&json!({
            "url": http.base,
            "lb": cluster.lb,
            "nodes": nodes.iter().map(NodeInfo::to_json).collect::<Vec<_>>(),
            "unhealthy": down,
        }));
    } else {
        let mut table = out::table(&[
            "node",
            "url",
            "state",
            "health",
            "keys",
            "disk free",
            "read-only",
            "WAL",
            "hints",
            "epoch",
            "clock",
            "anti-entropy",
            "version",
        ]);
        for info in &nodes {
            let state = cluster
                .entry
                .iter()
                .chain(nodes.iter().filter_map(|n| n.status.as_ref()))
                .find_map(|s| {
                    s["membership"]["members"].as_array().and_then(|m| {
                        m.iter()
                            .find(|m| m["url"] == info.url.as_str())
                            .map(|m| out::cell(&m["state"]))
                    })
                })
                .unwrap_or_else(|| "-".into());
            let clock = &info.field("clock");
            let clock_cell = if clock.is_null() {
                "-".into()
            } else {
                format!(
                    "{} ms{}",
                    out::cell(&clock["offset_ms"]),
                    if clock["ok"] == false { " (OFF)" } else { "" }
                )
            };
            table.add_row(vec![
                info.name(),
                info.url.clone(),
                state,
                health_cell(info),
                out::cell(&info.field("keys")),
                info.disk_free.map_or_else(|| "-".into(), out::bytes),
                out::cell(&info.field("read_only")),
                info.field("wal_bytes")
                    .as_u64()
                    .map_or_else(|| "-".into(), out::bytes),
                out::cell(&info.field("hints_pending")),
                out::cell(&info.field("membership")["epoch"]),
                clock_cell,
                info.status.as_ref().map_or_else(|| "-".into(), repair_cell),
                out::cell(&info.field("version")),
            ]);
        }
        out::print_table(&table);
        if let Some(lb) = &cluster.lb {
            out::line(&format!(
                "LB {} (version {}, up {}s): {}/{} nodes healthy, membership epoch {}, {} requests, {} retries, {} failovers",
                http.base,
                out::cell(&lb["version"]),
                out::cell(&lb["uptime_secs"]),
                out::cell(&lb["healthy_nodes"]),
                lb["nodes"].as_array().map_or(0, Vec::len),
                out::cell(&lb["membership_epoch"]),
                out::cell(&lb["counters"]["requests"]),
                out::cell(&lb["counters"]["retries"]),
                out::cell(&lb["counters"]["failovers"]),
            ));
            let mut lb_table = out::table(&["LB's view of", "healthy", "latency ms"]);
            for node in lb["nodes"].as_array().into_iter().flatten() {
                lb_table.add_row(vec![
                    out::cell(&node["url"]),
                    out::cell(&node["healthy"]),
                    out::cell(&node["latency_ms"]),
                ]);
            }
            out::print_table(&lb_table);
        } else {
            out::line(&format!("{} is a node: no LB view", http.base));
        }
    }
    if down.is_empty() {
        Ok(())
    } else {
        Err(CtlError::Reported {
            code: code::UNAVAILABLE,
            message: format!("not healthy: {}", down.join(", ")),
        })
    }
}

/// Asks before a change unless `--yes`; without a terminal a missing `--yes` is a usage error.
fn confirm(question: &str, yes: bool) -> Result<(), CtlError> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(CtlError::Usage(format!(
            "{question} needs confirmation: pass --yes (stdin is not a terminal)"
        )));
    }
    let _ = write!(std::io::stderr(), "{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .map_err(|e| CtlError::Usage(format!("cannot read the answer: {e}")))?;
    if matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        Ok(())
    } else {
        Err(CtlError::Reported {
            code: code::BAD_INPUT,
            message: "not applied".into(),
        })
    }
}

fn print_plan(plan: &Value) {
    let mut table = out::table(&[
        "node",
        "state after",
        "keys now",
        "gains keys",
        "gains bytes",
        "loses keys",
        "loses bytes",
        "keys after",
    ]);
    let states: Vec<(String, String)> = plan["view"]["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| (out::cell(&m["url"]), out::cell(&m["state"])))
        .collect();
    if let Some(nodes) = plan["nodes"].as_object() {
        for (url, moves) in nodes {
            let state = states
                .iter()
                .find(|(u, _)| u == url)
                .map_or_else(|| "-".into(), |(_, s)| s.clone());
            table.add_row(vec![
                url.clone(),
                state,
                out::cell(&moves["keys_before"]),
                out::cell(&moves["gain_keys"]),
                moves["gain_bytes"]
                    .as_u64()
                    .map_or_else(|| "-".into(), out::bytes),
                out::cell(&moves["lose_keys"]),
                moves["lose_bytes"]
                    .as_u64()
                    .map_or_else(|| "-".into(), out::bytes),
                out::cell(&moves["keys_after"]),
            ]);
        }
    }
    out::print_table(&table);
    out::line(&format!(
        "epoch {} -> {}: {} keys get a new replica, balance after {}{}",
        plan["view"]["epoch"]
            .as_u64()
            .map_or(0, |e| e.saturating_sub(1)),
        out::cell(&plan["view"]["epoch"]),
        out::cell(&plan["keys_moved"]),
        out::cell(&plan["balance_after"]),
        if plan["incomplete"] == true {
            " (incomplete: some node did not answer; its keys are missing from the figures)"
        } else {
            ""
        }
    ));
}

fn print_view(view: &Value) {
    let mut table = out::table(&["member", "state", "transfer", "done"]);
    for member in view["members"].as_array().into_iter().flatten() {
        let url = out::cell(&member["url"]);
        let transfer = &view["transfer"][url.as_str()];
        let progress = if transfer.is_null() {
            "-".into()
        } else {
            format!(
                "{}/{} keys (epoch {})",
                out::cell(&transfer["sent"]),
                out::cell(&transfer["total"]),
                out::cell(&transfer["epoch"])
            )
        };
        table.add_row(vec![
            url,
            out::cell(&member["state"]),
            progress,
            out::cell(&transfer["done"]),
        ]);
    }
    out::print_table(&table);
    out::line(&format!(
        "epoch {}, {}",
        out::cell(&view["epoch"]),
        if view["in_transition"] == true {
            "a change is in progress"
        } else {
            "no change in progress"
        }
    ));
}

/// The URLs of a view's members whose state passes `keep`.
fn member_set(view: &Value, keep: impl Fn(&str) -> bool) -> BTreeSet<String> {
    view["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| keep(m["state"].as_str().unwrap_or("")))
        .filter_map(|m| m["url"].as_str().map(str::to_owned))
        .collect()
}

/// Keys streamed and to stream by every node in the change at `epoch`.
fn transfer_totals(view: &Value, epoch: u64) -> (u64, u64) {
    view["transfer"]
        .as_object()
        .into_iter()
        .flat_map(|t| t.values())
        .filter(|t| t["epoch"].as_u64() == Some(epoch))
        .fold((0, 0), |(sent, total), t| {
            (
                sent + t["sent"].as_u64().unwrap_or(0),
                total + t["total"].as_u64().unwrap_or(0),
            )
        })
}

/// Polls `GET /admin/members` until the change planned at `epoch` is committed (epoch + 1 and
/// no transition), with a progress bar of the keys streamed.
fn follow(
    node: &Http,
    epoch: u64,
    expected: &BTreeSet<String>,
    wait: Duration,
    quiet: bool,
) -> Result<Value, CtlError> {
    let bar = ProgressBar::new(0);
    if quiet {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} keys ({elapsed})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message("moving data");
    let deadline = Instant::now() + wait;
    loop {
        let answer = node.get_public("/admin/members");
        if let Ok(answer) = answer {
            let view = answer.json;
            let now = view["epoch"].as_u64().unwrap_or(0);
            let (sent, total) = transfer_totals(&view, epoch);
            bar.set_length(total);
            bar.set_position(sent.min(total));
            if now > epoch && view["in_transition"] == false {
                // A commit and an abort both end at a later epoch: tell them by the members.
                let members = member_set(&view, |_| true);
                if members == *expected {
                    bar.finish_with_message(format!("committed at epoch {now}"));
                    return Ok(view);
                }
                bar.abandon_with_message("the change was aborted");
                return Err(CtlError::Reported {
                    code: code::OTHER,
                    message: format!(
                        "the change ended at epoch {now} without its plan (aborted?): members are {}",
                        members.into_iter().collect::<Vec<_>>().join(", ")
                    ),
                });
            }
        }
        if Instant::now() > deadline {
            bar.abandon();
            return Err(CtlError::Reported {
                code: code::UNAVAILABLE,
                message: format!(
                    "the change at epoch {epoch} did not commit within {}s; it goes on: follow it with `kvctl members`",
                    wait.as_secs()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Dry run, confirmation, apply, follow.
fn apply_change(
    node: &Http,
    global: &Global,
    body: Value,
    what: &str,
    apply: &ApplyArgs,
) -> Result<(), CtlError> {
    let plan = node.call("POST", "/admin/members?dry_run=true", Some(&body))?;
    if !global.json {
        print_plan(&plan);
    }
    confirm(&format!("apply this plan ({what})?"), apply.yes)?;
    let applied = node.call("POST", "/admin/members", Some(&body))?;
    let epoch = applied["view"]["epoch"].as_u64().unwrap_or(0);
    // After the commit: every member of the plan's view but the leaving ones.
    let expected = member_set(&applied["view"], |state| state != "leaving");
    if !global.json {
        out::line(&format!("applied: epoch {epoch}, data is moving"));
    }
    let committed = if apply.no_wait {
        Value::Null
    } else {
        follow(
            node,
            epoch,
            &expected,
            Duration::from_secs(apply.wait_secs),
            global.json,
        )?
    };
    if global.json {
        out::json(&json!({ "plan": plan, "applied": applied, "committed": committed }));
    } else if !committed.is_null() {
        print_view(&committed);
    }
    Ok(())
}

/// `kvctl members ...`.
pub fn members(http: &Http, global: &Global, args: MembersArgs) -> Result<(), CtlError> {
    let cluster = discover(http)?;
    let node = http.at(&cluster.admin_node(http)?);
    match args.action.unwrap_or(MembersAction::Show) {
        MembersAction::Show => {
            let view = node.call("GET", "/admin/members", None)?;
            if global.json {
                out::json(&view);
            } else {
                print_view(&view);
            }
            Ok(())
        }
        MembersAction::Plan { add, remove } => {
            if add.is_empty() && remove.is_empty() {
                return Err(CtlError::Usage(
                    "plan what? give --add URL and/or --remove URL".into(),
                ));
            }
            let plan = node.call(
                "POST",
                "/admin/members?dry_run=true",
                Some(&json!({ "add": add, "remove": remove })),
            )?;
            if global.json {
                out::json(&plan);
            } else {
                print_plan(&plan);
            }
            Ok(())
        }
        MembersAction::Add { urls, apply } => {
            let what = format!("add {}", urls.join(", "));
            apply_change(&node, global, json!({ "add": urls }), &what, &apply)
        }
        MembersAction::Remove { urls, force, apply } => {
            let what = format!("remove {}", urls.join(", "));
            let mut body = json!({ "remove": urls });
            if force {
                body["force"] = json!(true);
            }
            apply_change(&node, global, body, &what, &apply)
        }
        MembersAction::Replace { old, new, apply } => {
            let what = format!("replace {old} by {new}");
            let body = json!({ "replace": { old: new } });
            apply_change(&node, global, body, &what, &apply)
        }
        MembersAction::Abort { yes } => {
            confirm("abort the membership change in progress?", yes)?;
            let answer = node.call("POST", "/admin/members", Some(&json!({ "abort": true })))?;
            if global.json {
                out::json(&answer);
            } else {
                out::line(&format!("aborted: {answer}"));
            }
            Ok(())
        }
    }
}

/// `kvctl repair`: exits 4 when a round did not complete (a peer was not reached).
pub fn repair(http: &Http, global: &Global, args: &RepairArgs) -> Result<(), CtlError> {
    let cluster = discover(http)?;
    let targets = if args.all {
        cluster.nodes.clone()
    } else if let Some(node) = &args.node {
        vec![node.clone()]
    } else {
        vec![cluster.admin_node(http)?]
    };
    let mut reports = Vec::new();
    for url in &targets {
        let report = if args.last {
            http.at(url).call("GET", "/admin/repair", None)?
        } else {
            http.at(url).call("POST", "/admin/repair", None)?
        };
        reports.push(json!({ "node": url, "report": report }));
    }
    if global.json {
        out::json(&Value::Array(reports.clone()));
    } else {
        let mut table = out::table(&[
            "node", "trigger", "complete", "passes", "ranges", "differed", "sent", "received",
            "zombies", "bytes", "ms",
        ]);
        for entry in &reports {
            let r = if args.last {
                &entry["report"]["last"]
            } else {
                &entry["report"]
            };
            table.add_row(vec![
                out::cell(&entry["node"]),
                out::cell(&r["trigger"]),
                if r["skipped"].is_string() {
                    format!("skipped: {}", out::cell(&r["skipped"]))
                } else {
                    out::cell(&r["complete"])
                },
                out::cell(&r["passes"]),
                out::cell(&r["ranges_compared"]),
                out::cell(&r["ranges_differed"]),
                out::cell(&r["records_sent"]),
                out::cell(&r["records_received"]),
                out::cell(&r["zombies_dropped"]),
                r["bytes"].as_u64().map_or_else(|| "-".into(), out::bytes),
                out::cell(&r["duration_ms"]),
            ]);
            for peer in r["peers"].as_array().into_iter().flatten() {
                if let Some(error) = peer["error"].as_str() {
                    out::err(&format!(
                        "kvctl: {}: exchange with {} did not finish: {error}",
                        out::cell(&entry["node"]),
                        out::cell(&peer["peer"])
                    ));
                }
            }
        }
        out::print_table(&table);
    }
    if args.last {
        return Ok(());
    }
    let incomplete: Vec<String> = reports
        .iter()
        .filter(|e| e["report"]["complete"] != true)
        .map(|e| out::cell(&e["node"]))
        .collect();
    if incomplete.is_empty() {
        Ok(())
    } else {
        Err(CtlError::Reported {
            code: code::UNAVAILABLE,
            message: format!("the round did not complete on {}", incomplete.join(", ")),
        })
    }
}

/// A node named by URL, or by its `NODE_NAME` among the cluster's nodes.
fn resolve_node(http: &Http, node: &str) -> Result<String, CtlError> {
    if node.starts_with("http://") || node.starts_with("https://") {
        return Ok(node.trim_end_matches('/').to_owned());
    }
    let cluster = discover(http)?;
    for url in &cluster.nodes {
        if let Ok(answer) = http.at(url).get_public("/") {
            if answer.json["name"] == node {
                return Ok(url.clone());
            }
        }
    }
    Err(CtlError::Reported {
        code: code::NOT_FOUND,
        message: format!(
            "no node named {node} answered among {}",
            cluster.nodes.join(", ")
        ),
    })
}

/// `kvctl backup NODE FILE`: streams `GET /admin/backup` to FILE.part, checks the length,
/// renames it to FILE.
pub fn backup(http: &Http, global: &Global, args: &BackupArgs) -> Result<(), CtlError> {
    let url = resolve_node(http, &args.node)?;
    let node = http.at(&url).without_timeout()?;
    let mut response = node.get_stream("/admin/backup")?;
    let header = |name: &str| -> Option<u64> {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    };
    let length = header("content-length");
    let entries = header("x-kv-backup-entries");
    let created = header("x-kv-backup-created-ms");
    let part = part_path(&args.file);
    // A backup holds every value of the node: readable by its owner only, like DATA_DIR.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&part)
        .map_err(|e| CtlError::Io(format!("{}: {e}", part.display())))?;
    let bar = ProgressBar::new(length.unwrap_or(0));
    if global.json {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) =
        ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} ({bytes_per_sec})")
    {
        bar.set_style(style);
    }
    let copied = std::io::copy(&mut response, &mut bar.wrap_write(&mut file));
    bar.finish_and_clear();
    let cleanup = |message: String| {
        let _ = std::fs::remove_file(&part);
        CtlError::Reported {
            code: code::UNAVAILABLE,
            message,
        }
    };
    let copied = copied.map_err(|e| cleanup(format!("the download from {url} broke: {e}")))?;
    if let Some(length) = length {
        if copied != length {
            return Err(cleanup(format!(
                "the download from {url} is short: {copied} of {length} bytes"
            )));
        }
    }
    file.sync_all()
        .and_then(|()| std::fs::rename(&part, &args.file))
        .map_err(|e| CtlError::Io(format!("{}: {e}", args.file.display())))?;
    let summary = json!({
        "node": url,
        "file": args.file,
        "bytes": copied,
        "entries": entries,
        "created_ms": created,
    });
    if global.json {
        out::json(&summary);
    } else {
        out::line(&format!(
            "backup of {url}: {} ({} entries) written to {}",
            out::bytes(copied),
            entries.map_or_else(|| "?".into(), |e| e.to_string()),
            args.file.display()
        ));
    }
    Ok(())
}

fn part_path(file: &Path) -> PathBuf {
    let mut name = file
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".part");
    file.with_file_name(name)
}

/// The kv-node program: `--kv-node`, else next to kvctl, else `kv-node` on PATH.
fn kv_node_program(args: &RestoreArgs) -> PathBuf {
    if let Some(path) = &args.kv_node {
        return path.clone();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("kv-node")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("kv-node"))
}

/// A word quoted for a POSIX shell when it needs it.
fn shell_word(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-=:@+,".contains(c))
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// `kvctl restore FILE --data-dir DIR`: runs `kv-node restore` on this machine (the node must
/// be stopped; the restore takes the folder's lock), or prints that command with `--print`.
pub fn restore(global: &Global, args: &RestoreArgs) -> Result<(), CtlError> {
    let program = kv_node_program(args);
    let mut words = vec![
        program.display().to_string(),
        "restore".into(),
        args.file.display().to_string(),
        "--data-dir".into(),
        args.data_dir.display().to_string(),
    ];
    if args.force {
        words.push("--force".into());
    }
    let command_line = words
        .iter()
        .map(|w| shell_word(w))
        .collect::<Vec<_>>()
        .join(" ");
    if args.print {
        if global.json {
            out::json(&json!({ "command": words }));
        } else {
            out::line(&command_line);
        }
        return Ok(());
    }
    // With --json, kv-node's own line goes into the JSON instead of onto stdout.
    let mut command = std::process::Command::new(&program);
    command
        .args(&words[1..])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .stdout(if global.json {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::inherit()
        });
    let ran = command.output().map_err(|e| {
        CtlError::Io(format!(
            "cannot run {}: {e}; install kv-node next to kvctl, put it on PATH or pass --kv-node",
            program.display()
        ))
    })?;
    match ran.status.code() {
        Some(0) => {
            if global.json {
                let said = String::from_utf8_lossy(&ran.stdout).trim().to_owned();
                out::json(&json!({ "ok": true, "command": words, "output": said }));
            }
            Ok(())
        }
        Some(2) => Err(CtlError::Reported {
            code: code::BAD_INPUT,
            message: format!("`{command_line}` refused the restore (exit 2); nothing changed"),
        }),
        other => Err(CtlError::Reported {
            code: code::OTHER,
            message: format!("`{command_line}` failed ({other:?})"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_read_unlabelled_samples_only() {
        let text =
            "# TYPE kv_disk_free_bytes gauge\nkv_disk_free_bytes 1234\nkv_disk_free_bytes_x 9\n";
        assert_eq!(metric(text, "kv_disk_free_bytes"), Some(1234.0));
        assert_eq!(metric(text, "kv_missing"), None);
    }

    #[test]
    fn members_come_from_the_view_or_the_node_list() {
        let status = json!({"membership": {"members": [{"url": "http://a:1", "state": "active"}]}});
        assert_eq!(members_of(&status), vec!["http://a:1".to_owned()]);
        let status = json!({"nodes": ["http://b:2"]});
        assert_eq!(members_of(&status), vec!["http://b:2".to_owned()]);
    }

    #[test]
    fn the_committed_members_are_the_plan_without_the_leaving_ones() {
        let plan = json!({"members": [
            {"url": "a", "state": "active"},
            {"url": "b", "state": "leaving"},
            {"url": "c", "state": "joining"},
        ]});
        let expected = member_set(&plan, |s| s != "leaving");
        assert_eq!(expected.into_iter().collect::<Vec<_>>(), vec!["a", "c"]);
    }

    #[test]
    fn transfer_totals_count_the_change_in_progress_only() {
        let view = json!({"transfer": {
            "a": {"epoch": 3, "sent": 5, "total": 10},
            "b": {"epoch": 2, "sent": 7, "total": 7},
            "c": null,
        }});
        assert_eq!(transfer_totals(&view, 3), (5, 10));
    }

    #[test]
    fn shell_words_are_quoted_when_needed() {
        assert_eq!(shell_word("/data/node1"), "/data/node1");
        assert_eq!(shell_word("my file"), "'my file'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(
            part_path(Path::new("/x/b.db")),
            PathBuf::from("/x/b.db.part")
        );
    }
}
