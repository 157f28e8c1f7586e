//! `kvctl watch KEY` / `kvctl watch --prefix P`: follows changes over Server-Sent Events (README
//! "Watches"). Reconnects with `Last-Event-ID` after a dropped connection (a node killed behind
//! the LB), drops events not newer than the version it already printed for their key (a resume
//! replays a little), and stops on `event: lagged`, which asks the caller to resynchronise.

use crate::cli::{Global, WatchArgs};
use crate::client::{key_path, query_value, transport, Http};
use crate::error::{code, CtlError};
use crate::out;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

/// One SSE block: the fields of one event.
#[derive(Debug, Default, PartialEq)]
struct Event {
    event: String,
    id: Option<String>,
    data: String,
}

/// Assembles SSE lines into events (the HTML standard's rules, for the fields kv sends).
#[derive(Debug, Default)]
struct Parser {
    current: Event,
    has_data: bool,
}

impl Parser {
    /// Takes one line (without its line ending); an event when the line ends a block.
    fn line(&mut self, line: &str) -> Option<Event> {
        if line.is_empty() {
            let done = std::mem::take(&mut self.current);
            let had = std::mem::take(&mut self.has_data);
            return (had || !done.event.is_empty()).then_some(done);
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.current.event = value.to_owned(),
            "id" => self.current.id = Some(value.to_owned()),
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        None
    }
}

/// What the watch does with an event.
enum Step {
    Print(Value),
    Skip,
    Lagged(String),
}

/// Versions printed per key: an event is printed only when newer (versions are fixed-width hex
/// and compare as strings).
#[derive(Debug, Default)]
struct Seen {
    newest: HashMap<String, String>,
}

impl Seen {
    fn step(&mut self, event: &Event) -> Step {
        let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
        if event.event == "lagged" {
            let message = data["message"].as_str().unwrap_or("the watch fell behind");
            return Step::Lagged(message.to_owned());
        }
        let (Some(key), Some(version)) = (data["key"].as_str(), data["version"].as_str()) else {
            return Step::Skip;
        };
        if self
            .newest
            .get(key)
            .is_some_and(|held| held.as_str() >= version)
        {
            return Step::Skip;
        }
        self.newest.insert(key.to_owned(), version.to_owned());
        Step::Print(json!({"event": event.event, "id": event.id, "data": data}))
    }
}

/// `kvctl watch`.
pub fn run(http: &Http, global: &Global, args: &WatchArgs) -> Result<(), CtlError> {
    let path = match (&args.key, &args.prefix) {
        (Some(key), None) => format!("{}?watch=true", key_path(key)),
        (None, prefix) => format!(
            "/v1?watch=true&prefix={}",
            query_value(prefix.as_deref().unwrap_or(""))
        ),
        (Some(_), Some(_)) => {
            return Err(CtlError::Usage(
                "watch takes a KEY or --prefix, not both".into(),
            ))
        }
    };
    let http = http.without_timeout()?;
    let url = format!("{}{path}", global.url.trim_end_matches('/'));
    let mut seen = Seen::default();
    let mut last_id: Option<String> = None;
    let mut printed = 0u64;
    let mut failures = 0u32;
    loop {
        let mut request = http.request("GET", &path, false);
        if let Some(id) = &last_id {
            request = request.header("Last-Event-ID", id.as_str());
        }
        let started = Instant::now();
        let response = match request.send() {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                let answer = http.send("GET", &path, http.request("GET", &path, false));
                return Err(match answer {
                    Ok(a) => crate::client::http_error("GET", &url, a),
                    Err(_) => CtlError::Transport {
                        url: url.clone(),
                        message: format!("answered {}", r.status()),
                    },
                });
            }
            Err(e) => {
                failures += 1;
                if failures > args.reconnects {
                    return Err(transport(&url, &e));
                }
                out::err(&format!("kvctl watch: {url}: {e}; reconnecting"));
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let mut parser = Parser::default();
        for line in BufReader::new(response).lines() {
            let Ok(line) = line else { break };
            let Some(event) = parser.line(line.trim_end_matches('\r')) else {
                continue;
            };
            match seen.step(&event) {
                Step::Skip => {}
                Step::Lagged(message) => {
                    return Err(CtlError::Reported {
                        code: code::UNAVAILABLE,
                        message: format!(
                        "kvctl watch: {message}; list the keys again, then watch from the listing"
                    ),
                    })
                }
                Step::Print(value) => {
                    if let Some(id) = &event.id {
                        last_id = Some(id.clone());
                    }
                    print_event(global.json, &value);
                    printed += 1;
                    if args.count.is_some_and(|n| printed >= n) {
                        return Ok(());
                    }
                }
            }
        }
        // The stream ended (a node died, the LB restarted): resume from the last id.
        if started.elapsed() > Duration::from_secs(10) {
            failures = 0;
        }
        failures += 1;
        if failures > args.reconnects {
            return Err(CtlError::Transport {
                url,
                message: "the stream ended and reconnecting failed".into(),
            });
        }
        out::err(&format!(
            "kvctl watch: stream ended; resuming from {}",
            last_id.as_deref().unwrap_or("now")
        ));
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn print_event(as_json: bool, value: &Value) {
    if as_json {
        out::line(&value.to_string());
        return;
    }
    let data = &value["data"];
    let key = data["key"].as_str().unwrap_or("");
    let version = data["version"].as_str().unwrap_or("");
    match value["event"].as_str() {
        Some("delete") => out::line(&format!("delete {key} {version}")),
        _ => out::line(&format!("put {key} {version} {}", data["value"])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(parser: &mut Parser, text: &str) -> Vec<Event> {
        text.lines().filter_map(|l| parser.line(l)).collect()
    }

    #[test]
    fn blocks_become_events_and_comments_are_ignored() {
        let mut parser = Parser::default();
        let events = feed(
            &mut parser,
            "retry: 1000\n: watching\n\nid: v1\nevent: put\ndata: {\"a\":\ndata: 1}\n\n: ping\n\n",
        );
        assert_eq!(
            events,
            vec![Event {
                event: "put".into(),
                id: Some("v1".into()),
                data: "{\"a\":\n1}".into()
            }]
        );
    }

    #[test]
    fn a_replayed_or_older_version_is_skipped_and_lagged_stops() {
        let mut seen = Seen::default();
        let put = |v: &str| Event {
            event: "put".into(),
            id: Some(v.into()),
            data: format!("{{\"key\":\"k\",\"value\":1,\"version\":\"{v}\"}}"),
        };
        assert!(matches!(seen.step(&put("0002")), Step::Print(_)));
        assert!(matches!(seen.step(&put("0002")), Step::Skip));
        assert!(matches!(seen.step(&put("0001")), Step::Skip));
        assert!(matches!(seen.step(&put("0003")), Step::Print(_)));
        let lagged = Event {
            event: "lagged".into(),
            id: None,
            data: "{\"message\":\"behind\"}".into(),
        };
        assert!(matches!(seen.step(&lagged), Step::Lagged(m) if m == "behind"));
    }
}
