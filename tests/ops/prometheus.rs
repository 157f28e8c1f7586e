//! A strict parser of the Prometheus text exposition format (0.0.4), for checking `/metrics`.
//!
//! Why not a crate: `prometheus-parse` 0.2 silently drops every sample whose label value holds
//! a `}` (our `route="/v1/{*key}"`), and `nom-openmetrics` 0.2 rejects the blank lines between
//! families and does not know histograms in Prometheus mode. Both are valid Prometheus text.

use std::collections::{BTreeMap, HashMap};

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name as written (`x_bucket`, `x_sum`, `x_count` for histograms).
    pub name: String,
    /// Label names to unescaped values.
    pub labels: BTreeMap<String, String>,
    /// The value (`NaN`, `+Inf` and `-Inf` included).
    pub value: f64,
}

/// A parsed exposition: the declared type of each family and every sample in order.
#[derive(Debug, Default)]
pub struct Exposition {
    /// Family name to `counter`, `gauge`, `histogram`, `summary` or `untyped`.
    pub types: HashMap<String, String>,
    /// Every sample.
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Sum of the samples named `name` whose labels include every pair of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// Observations of histogram `name` over all its label sets; `None` if it has no samples.
    pub fn observations(&self, name: &str) -> Option<f64> {
        assert_eq!(
            self.types.get(name).map(String::as_str),
            Some("histogram"),
            "{name} must be declared a histogram"
        );
        let count = format!("{name}_count");
        self.samples
            .iter()
            .any(|s| s.name == count)
            .then(|| self.sum(&count, &[]))
    }
}

/// Parses a whole exposition; the error names the line and what is wrong with it.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    for (number, line) in text.lines().enumerate() {
        let fail = |what: &str| format!("line {}: {what}: {line:?}", number + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let words: Vec<&str> = comment.split_whitespace().collect();
            if let ["TYPE", name, kind] = words[..] {
                let known = ["counter", "gauge", "histogram", "summary", "untyped"];
                if !known.contains(&kind) || !valid_name(name) {
                    return Err(fail("bad TYPE line"));
                }
                if out.types.insert(name.into(), kind.into()).is_some() {
                    return Err(fail("second TYPE line for one family"));
                }
            }
            continue;
        }
        let sample = parse_sample(line).map_err(|e| fail(&e))?;
        let family = family_of(&sample.name, &out.types).ok_or_else(|| fail("no TYPE line"))?;
        if out.types[family] == "histogram" && sample.name.ends_with("_bucket") {
            sample
                .labels
                .get("le")
                .ok_or_else(|| fail("bucket without le"))?;
        }
        out.samples.push(sample);
    }
    Ok(out)
}

/// The declared family a sample belongs to (its name, or the name less a histogram or summary
/// suffix).
fn family_of<'a>(name: &'a str, types: &HashMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = name.strip_suffix(suffix)?;
        matches!(types.get(base)?.as_str(), "histogram" | "summary").then_some(base)
    })
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `name{label="value",...} value [timestamp]`.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
    let name = &line[..name_end];
    if !valid_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inside) = rest.strip_prefix('{') {
        rest = parse_labels(inside, &mut labels)?;
    }
    let mut fields = rest.split_whitespace();
    let value = match fields.next() {
        Some("+Inf") => f64::INFINITY,
        Some("-Inf") => f64::NEG_INFINITY,
        Some("NaN") => f64::NAN,
        Some(v) => v.parse().map_err(|_| format!("bad value {v:?}"))?,
        None => return Err("no value".into()),
    };
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err("text after the timestamp".into());
    }
    Ok(Sample {
        name: name.into(),
        labels,
        value,
    })
}

/// Reads `a="x",b="y"}` into `labels`; returns what follows the closing brace.
fn parse_labels<'a>(
    mut rest: &'a str,
    labels: &mut BTreeMap<String, String>,
) -> Result<&'a str, String> {
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Ok(after);
        }
        let eq = rest.find('=').ok_or("label without '='")?;
        let name = rest[..eq].trim();
        if !valid_name(name) || name.contains(':') {
            return Err(format!("bad label name {name:?}"));
        }
        let mut chars = rest[eq + 1..].trim_start().char_indices();
        let start = rest.len() - rest[eq + 1..].trim_start().len();
        if chars.next().map(|(_, c)| c) != Some('"') {
            return Err(format!("label {name} has no quoted value"));
        }
        let mut value = String::new();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, c) => value.push(c),
            }
        };
        if labels.insert(name.into(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = &rest[start + end + 1..];
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err("expected ',' or '}' after a label".into());
        }
    }
}

#[test]
fn parses_braces_escapes_blank_lines_and_histograms() {
    let text = "# HELP kv_x requests\n# TYPE kv_x counter\n\
                kv_x{route=\"/v1/{*key}\",q=\"a\\\"b\\\\c\\n\"} 10\nkv_x 2 1700000000000\n\n\
                # TYPE kv_h histogram\nkv_h_bucket{le=\"0.1\"} 1\nkv_h_bucket{le=\"+Inf\"} 3\n\
                kv_h_sum 0.5\nkv_h_count 3\n";
    let e = parse(text).unwrap();
    assert_eq!(e.samples.len(), 6);
    assert_eq!(e.samples[0].labels["route"], "/v1/{*key}");
    assert_eq!(e.samples[0].labels["q"], "a\"b\\c\n");
    assert_eq!(e.sum("kv_x", &[("route", "/v1/{*key}")]), 10.0);
    assert_eq!(e.sum("kv_x", &[]), 12.0);
    assert_eq!(e.observations("kv_h"), Some(3.0));
    assert_eq!(e.samples[3].labels["le"], "+Inf");
}

#[test]
fn rejects_what_is_not_prometheus_text() {
    for bad in [
        "kv_x 1\n",                                 // no TYPE
        "# TYPE kv_x counter\nkv_x{a=\"1\" 1\n",    // unterminated labels
        "# TYPE kv_x counter\nkv_x{a=1} 1\n",       // unquoted value
        "# TYPE kv_x counter\nkv_x one\n",          // bad value
        "# TYPE kv_x counter\n# TYPE kv_x gauge\n", // two types
        "# TYPE kv_h histogram\nkv_h_bucket 1\n",   // bucket without le
        "# TYPE kv_x counter\nkv_x{a=\"\\q\"} 1\n", // bad escape
        "# TYPE 9x counter\n",                      // bad name
    ] {
        assert!(parse(bad).is_err(), "accepted {bad:?}");
    }
}
