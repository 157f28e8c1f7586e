//! The data commands: `get`, `put`, `delete`, `list` (follows the listing's cursor), `batch`.

use crate::cli::{BatchArgs, DeleteArgs, GetArgs, Global, ListArgs, PutArgs};
use crate::client::{key_path, query_value, Http};
use crate::error::{status_code, CtlError};
use crate::out;
use serde_json::{json, Value};
use std::io::Read;
use std::path::Path;

/// `?a=b&c=d` from the pairs that are set (values escaped), or nothing.
fn query(pairs: &[(&str, Option<&str>)]) -> String {
    let set: Vec<String> = pairs
        .iter()
        .filter_map(|(name, value)| value.map(|v| format!("{name}={}", query_value(v))))
        .collect();
    if set.is_empty() {
        String::new()
    } else {
        format!("?{}", set.join("&"))
    }
}

/// A key must be non-empty (the server refuses it too, but say so before sending).
fn check_key(key: &str) -> Result<(), CtlError> {
    if key.is_empty() {
        return Err(CtlError::Usage("the key is empty".into()));
    }
    Ok(())
}

/// An `If-Match` header value: a version is quoted (as an ETag), `*` and quoted ones are kept.
fn if_match_header(version: &str) -> String {
    if version == "*" || (version.starts_with('"') && version.ends_with('"') && version.len() > 1) {
        version.to_owned()
    } else {
        format!("\"{version}\"")
    }
}

/// `kvctl get KEY`.
pub fn get(http: &Http, global: &Global, args: &GetArgs) -> Result<(), CtlError> {
    check_key(&args.key)?;
    let path = format!(
        "{}{}",
        key_path(&args.key),
        query(&[("r", args.r.as_deref())])
    );
    let body = http.call("GET", &path, None)?;
    if global.json {
        out::json(&body);
    } else if args.value_only {
        out::line(&body["value"].to_string());
    } else {
        let mut table = out::table(&["key", "value", "version", "ttl_secs"]);
        table.add_row(vec![
            out::cell(&body["key"]),
            body["value"].to_string(),
            out::cell(&body["version"]),
            out::cell(&body["ttl_secs"]),
        ]);
        out::print_table(&table);
    }
    Ok(())
}

/// The raw text of a value: the argument, the file, or stdin. Strings from a file or stdin lose
/// one trailing newline (`echo hello | kvctl put k` stores "hello").
fn raw_value(args: &PutArgs) -> Result<(String, bool), CtlError> {
    if let Some(value) = &args.value {
        return Ok((value.clone(), false));
    }
    let mut bytes = Vec::new();
    match args.file.as_deref() {
        Some(path) if path != Path::new("-") => {
            bytes = std::fs::read(path)
                .map_err(|e| CtlError::Usage(format!("--file {}: {e}", path.display())))?;
        }
        _ => {
            std::io::stdin()
                .read_to_end(&mut bytes)
                .map_err(|e| CtlError::Usage(format!("cannot read the value from stdin: {e}")))?;
        }
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| CtlError::Usage("the value is not UTF-8 text".into()))?;
    Ok((text, true))
}

/// JSON if it parses as JSON (and `--string` is not given), else a JSON string.
pub fn parse_value(raw: &str, from_stream: bool, force_string: bool) -> Value {
    if !force_string {
        if let Ok(value) = serde_json::from_str::<Value>(raw) {
            return value;
        }
    }
    let text = if from_stream {
        raw.strip_suffix("\r\n")
            .or_else(|| raw.strip_suffix('\n'))
            .unwrap_or(raw)
    } else {
        raw
    };
    Value::String(text.to_owned())
}

/// `kvctl put KEY [VALUE]`.
pub fn put(http: &Http, global: &Global, args: &PutArgs) -> Result<(), CtlError> {
    check_key(&args.key)?;
    let (raw, from_stream) = raw_value(args)?;
    let value = parse_value(&raw, from_stream, args.string);
    let path = format!(
        "{}{}",
        key_path(&args.key),
        query(&[("w", args.w.as_deref()), ("ttl", args.ttl.as_deref())])
    );
    let mut request = http
        .request("PUT", &path, false)
        .body(json!({ "value": value }).to_string());
    if let Some(version) = &args.if_match {
        request = request.header("If-Match", if_match_header(version));
    }
    if args.if_absent {
        request = request.header("If-None-Match", "*");
    }
    let answer = http.send("PUT", &path, request)?;
    let body = crate::client::ok_or_error("PUT", &format!("{}{path}", http.base), answer)?;
    if global.json {
        out::json(&body);
    } else {
        let mut table = out::table(&["key", "version", "ttl_secs"]);
        table.add_row(vec![
            out::cell(&body["key"]),
            out::cell(&body["version"]),
            out::cell(&body["ttl_secs"]),
        ]);
        out::print_table(&table);
    }
    Ok(())
}

/// `kvctl delete KEY`.
pub fn delete(http: &Http, global: &Global, args: &DeleteArgs) -> Result<(), CtlError> {
    check_key(&args.key)?;
    let path = format!(
        "{}{}",
        key_path(&args.key),
        query(&[("w", args.w.as_deref())])
    );
    let mut request = http.request("DELETE", &path, false);
    if let Some(version) = &args.if_match {
        request = request.header("If-Match", if_match_header(version));
    }
    let answer = http.send("DELETE", &path, request)?;
    let body = crate::client::ok_or_error("DELETE", &format!("{}{path}", http.base), answer)?;
    if global.json {
        out::json(&body);
    } else {
        out::line(&format!("deleted {}", out::cell(&body["key"])));
    }
    Ok(())
}

/// `kvctl list`: pages through `GET /v1` with the `next` cursor until it is `null` or
/// `--limit` keys are in.
pub fn list(http: &Http, global: &Global, args: &ListArgs) -> Result<(), CtlError> {
    let mut keys: Vec<Value> = Vec::new();
    let mut items: Vec<Value> = Vec::new();
    let mut after: Option<String> = None;
    let mut incomplete = false;
    let mut pages = 0u64;
    loop {
        let want = match args.limit {
            Some(limit) => (limit - keys.len() as u64).min(args.page_size),
            None => args.page_size,
        };
        if want == 0 {
            break;
        }
        let limit = want.to_string();
        let path = format!(
            "/v1{}",
            query(&[
                ("prefix", args.prefix.as_deref()),
                ("limit", Some(&limit)),
                ("after", after.as_deref()),
                ("values", args.values.then_some("true")),
            ])
        );
        let page = http.call("GET", &path, None)?;
        pages += 1;
        incomplete |= page["incomplete"] == true;
        if let Some(page_keys) = page["keys"].as_array() {
            keys.extend(page_keys.iter().cloned());
        }
        if let Some(page_items) = page["items"].as_array() {
            items.extend(page_items.iter().cloned());
        }
        match page["next"].as_str() {
            Some(next) if Some(next) != after.as_deref() => after = Some(next.to_owned()),
            _ => break,
        }
    }
    if incomplete {
        out::err("kvctl: warning: some node did not answer; keys held only there may be missing");
    }
    if global.json {
        let mut body = json!({ "keys": keys, "incomplete": incomplete, "pages": pages });
        if args.values {
            body["items"] = Value::Array(items);
        }
        out::json(&body);
    } else if args.values {
        let mut table = out::table(&["key", "value", "version"]);
        for item in &items {
            table.add_row(vec![
                out::cell(&item["key"]),
                item["value"].to_string(),
                out::cell(&item["version"]),
            ]);
        }
        out::print_table(&table);
    } else {
        for key in &keys {
            out::line(&out::cell(key));
        }
    }
    Ok(())
}

/// `kvctl batch FILE`: exits 0 when every operation answered 2xx, else with the exit code of
/// the first one that did not (a `get` of a missing key: 1).
pub fn batch(http: &Http, global: &Global, args: &BatchArgs) -> Result<(), CtlError> {
    let text = if args.file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| CtlError::Usage(format!("cannot read the batch from stdin: {e}")))?;
        text
    } else {
        std::fs::read_to_string(&args.file)
            .map_err(|e| CtlError::Usage(format!("{}: {e}", args.file.display())))?
    };
    let parsed: Value = serde_json::from_str(&text)
        .map_err(|e| CtlError::Usage(format!("{}: not JSON: {e}", args.file.display())))?;
    let body = match parsed {
        Value::Array(ops) => json!({ "ops": ops }),
        Value::Object(_) if parsed.get("ops").is_some() => parsed,
        _ => {
            return Err(CtlError::Usage(format!(
                "{}: expected {{\"ops\": [...]}} or an array of operations",
                args.file.display()
            )))
        }
    };
    let path = format!(
        "/batch{}",
        query(&[("w", args.w.as_deref()), ("r", args.r.as_deref())])
    );
    let answer = http.call("POST", &path, Some(&body))?;
    let results = answer["results"].as_array().cloned().unwrap_or_default();
    if global.json {
        out::json(&answer);
    } else {
        let ops = body["ops"].as_array().cloned().unwrap_or_default();
        let mut table = out::table(&["#", "op", "key", "status", "value / version / error"]);
        for (i, result) in results.iter().enumerate() {
            let op = ops.get(i).map_or(Value::Null, |o| o["op"].clone());
            let key = ops.get(i).map_or(Value::Null, |o| o["key"].clone());
            let detail = if let Some(error) = result["error"].as_str() {
                format!("{error}: {}", out::cell(&result["message"]))
            } else if result.get("value").is_some() {
                format!("{} @ {}", result["value"], out::cell(&result["version"]))
            } else {
                out::cell(&result["version"])
            };
            table.add_row(vec![
                (i + 1).to_string(),
                out::cell(&op),
                out::cell(&key),
                out::cell(&result["status"]),
                detail,
            ]);
        }
        out::print_table(&table);
    }
    let failed = results.iter().enumerate().find_map(|(i, r)| {
        let status = r["status"].as_u64().and_then(|s| u16::try_from(s).ok())?;
        (!(200..300).contains(&status)).then_some((i, status, r))
    });
    let key_of = |i: usize| out::cell(&body["ops"][i]["key"]);
    match failed {
        None => Ok(()),
        Some((i, status, result)) => Err(CtlError::Reported {
            code: status_code(status),
            message: format!(
                "operation {} ({}) answered {status} {}",
                i + 1,
                key_of(i),
                out::cell(&result["error"])
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_json_when_they_parse_and_strings_otherwise() {
        assert_eq!(parse_value("42", false, false), json!(42));
        assert_eq!(
            parse_value(r#"{"a": [1]}"#, false, false),
            json!({"a": [1]})
        );
        assert_eq!(parse_value(r#""quoted""#, false, false), json!("quoted"));
        assert_eq!(parse_value("hello", false, false), json!("hello"));
        assert_eq!(parse_value("42", false, true), json!("42"));
        assert_eq!(parse_value("hello\n", true, false), json!("hello"));
        assert_eq!(parse_value("hello\n", false, false), json!("hello\n"));
        assert_eq!(parse_value("{\"a\":1}\n", true, false), json!({"a": 1}));
    }

    #[test]
    fn queries_and_conditions_are_escaped() {
        assert_eq!(query(&[("w", None), ("ttl", None)]), "");
        assert_eq!(
            query(&[("prefix", Some("a/b c")), ("limit", Some("10"))]),
            "?prefix=a%2Fb%20c&limit=10"
        );
        assert_eq!(if_match_header("00ab-1"), "\"00ab-1\"");
        assert_eq!(if_match_header("*"), "*");
        assert_eq!(if_match_header("\"v\""), "\"v\"");
    }
}
