//! Clock skew for the chaos tests: the environment that starts a process under libfaketime with
//! its wall clock moved by a fixed offset, and a measure of a running process's clock (its `Date`
//! header) so a test can check that the skew really took effect.

use crate::send;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// Where distributions put libfaketime (Debian/Ubuntu package `libfaketime`, Fedora, source builds).
const LIBFAKETIME_PATHS: [&str; 5] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib64/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
];

/// The path of `libfaketime.so.1`: `KV_LIBFAKETIME` when set, else the first of the usual places
/// that exists. Panics saying what is missing and how to install it: a skew test must never pass
/// because it could not skew anything.
pub fn libfaketime() -> PathBuf {
    if let Ok(path) = std::env::var("KV_LIBFAKETIME") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "KV_LIBFAKETIME={} is not a file",
            path.display()
        );
        return path;
    }
    LIBFAKETIME_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "libfaketime.so.1 is missing (looked in {LIBFAKETIME_PATHS:?}): this clock-skew \
                 test needs it. Install it with `apt-get install -y libfaketime` (.ci/run does), \
                 or point KV_LIBFAKETIME at the library"
            )
        })
}

/// Environment that runs a process with its wall clock moved by `offset_secs` (e.g. `+30`,
/// `-30`). Only the wall clock moves: monotonic clocks stay true, so timers and timeouts behave.
pub fn faketime_env(offset_secs: i64) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), libfaketime().display().to_string()),
        ("FAKETIME".into(), format!("{offset_secs:+}s")),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ("FAKETIME_DONT_RESET".into(), "1".into()),
    ]
}

/// How far the clock of the HTTP server at `base` is ahead of ours (negative: behind), in whole
/// seconds, from the `Date` header of its `GET /health` (one-second resolution, so expect
/// +/- 1 s around the true offset). `Err` when it did not answer or sent no usable `Date`.
pub fn clock_offset_secs(base: &str) -> Result<i64, String> {
    let answer = send("GET", &format!("{base}/health"), None)?;
    let ours = SystemTime::now();
    let date = answer
        .headers
        .get("date")
        .ok_or_else(|| format!("{base}/health sent no Date header"))?
        .to_str()
        .map_err(|e| e.to_string())?;
    let theirs = httpdate::parse_http_date(date).map_err(|e| format!("Date `{date}`: {e}"))?;
    Ok(match theirs.duration_since(ours) {
        Ok(ahead) => secs(ahead),
        Err(behind) => -secs(behind.duration()),
    })
}

/// Whole seconds, rounded to the nearest.
fn secs(d: Duration) -> i64 {
    i64::try_from((d.as_millis() + 500) / 1000).unwrap_or(i64::MAX)
}

/// Asserts that the server at `base` runs `expected_secs` ahead of us (negative: behind),
/// within `tolerance_secs`: the check that a skew really took effect.
pub fn assert_clock_offset(base: &str, expected_secs: i64, tolerance_secs: i64) {
    let offset = clock_offset_secs(base).unwrap_or_else(|e| panic!("clock of {base}: {e}"));
    assert!(
        (offset - expected_secs).abs() <= tolerance_secs,
        "{base} runs {offset:+} s off our clock, expected {expected_secs:+} s (+/- {tolerance_secs} s): \
         the faketime skew did not take effect"
    );
}
